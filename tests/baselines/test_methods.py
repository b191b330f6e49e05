"""Baselines on a tiny model: each returns probabilities through the same interface and does what it
claims (temperature minimises validation NLL, dropout 0 is MAP, last-layer Laplace equals a dense
J Sigma J^T, identical ensemble members are MAP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.params import head_rows
from bmoe_jax.task import Batch, Task, probit_pairwise
from bmoe_jax import baselines as BL
from bmoe_jax.baselines import last_layer as LL
from bmoe_jax.baselines.methods import fit_temperature, logits_jit
from bmoe_jax.laplace import posterior as P
from tests.fixtures import CLASSES, posterior_of, predict, synthetic_task


@pytest.fixture(scope="module")
def setup():
  cfg = B.tiny_config(num_experts=4)
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3), synthetic_task(cfg, 3), synthetic_task(cfg, 1, seed=1)


def _ok(probs, b):
  assert probs.shape == (b, 4) and np.allclose(np.asarray(probs).sum(-1), 1, atol=1e-5)


def test_temperature_scaling_minimises_validation_nll(setup):
  cfg, params, fit, val = setup
  method, t = BL.temperature_scaling(params, Task(cfg, CLASSES), fit)
  f = jnp.concatenate([logits_jit(params, b, Task(cfg, CLASSES)) for b in fit])
  y = jnp.concatenate([b.labels_b for b in fit])
  nll = lambda tt: float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(f / tt), y[:, None], 1)))
  assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05)) + 1e-7
  _ok(method(val[0]), 8)
  # overconfident logits get T > 1, underconfident ones T < 1
  rng = np.random.RandomState(0)
  y = rng.randint(0, 3, 500)
  clean = np.eye(3)[y] * 2.0 + rng.randn(500, 3)
  assert fit_temperature(clean * 10, y) > 1 > fit_temperature(clean * 0.05, y)


def test_logit_cache_shares_one_forward_between_map_and_ts(setup):
  cfg, params, fit, val = setup
  task = Task(cfg, CLASSES)
  cache = BL.LogitCache(task)
  ts, t = BL.temperature_scaling(params, task, fit, cache)
  fitted = len(cache._memo)
  assert fitted == len(fit)  # the validation forwards, once each
  map_p, ts_p = BL.map_method(params, task, cache)(val[0]), ts(val[0])
  assert len(cache._memo) == fitted + 1  # MAP and TS of the same tree and batch: one forward
  np.testing.assert_allclose(map_p, BL.map_method(params, task)(val[0]), atol=1e-6)
  np.testing.assert_allclose(ts_p, jax.nn.softmax(task.logits(params, val[0]) / t, -1), atol=1e-6)
  other = B.init_params(cfg, jax.random.key(5), std=0.3)
  assert np.abs(np.asarray(BL.map_method(other, task, cache)(val[0]) - map_p)).max() > 1e-3  # keyed by tree
  with pytest.raises(ValueError, match="another task"):
    BL.map_method(params, Task(cfg, CLASSES[:2]), cache)


def test_mc_dropout_and_ensembles(setup):
  cfg, params, _, val = setup
  map_p = BL.map_method(params, Task(cfg, CLASSES))(val[0])
  np.testing.assert_allclose(BL.mc_dropout(params, Task(cfg, CLASSES), rate=0.0, num_samples=3)(val[0]), map_p, atol=1e-6)
  drop = BL.mc_dropout(params, Task(cfg, CLASSES), rate=0.3, num_samples=8, key=jax.random.key(1))
  p1 = drop(val[0])
  _ok(p1, 8)
  assert np.abs(np.asarray(p1 - map_p)).max() > 1e-3
  np.testing.assert_array_equal(p1, drop(val[0]))  # seeded
  np.testing.assert_allclose(BL.ensemble([params, params], Task(cfg, CLASSES))(val[0]), map_p, atol=1e-6)
  other = B.init_params(cfg, jax.random.key(5), std=0.3)
  mix = BL.ensemble([params, other], Task(cfg, CLASSES))(val[0])
  np.testing.assert_allclose(mix, (map_p + BL.map_method(other, Task(cfg, CLASSES))(val[0])) / 2, atol=1e-6)
  with pytest.raises(ValueError, match="rate=1.0"):
    BL.mc_dropout(params, Task(cfg, CLASSES), rate=1.0)
  # epistemic scores from the same pass: none between identical members, the draws' spread otherwise
  same = BL.ensemble([params, params], Task(cfg, CLASSES)).with_scores(val[0])[1]
  np.testing.assert_allclose(same["mi"], 0, atol=1e-6)
  np.testing.assert_allclose(same["var_f"], 0, atol=1e-6)
  f = jnp.stack([logits_jit(p, val[0], task=Task(cfg, CLASSES)) for p in (params, other)])
  mix_p, mix_s = BL.ensemble([params, other], Task(cfg, CLASSES)).with_scores(val[0])
  np.testing.assert_allclose(mix_s["var_f"], jnp.var(f - f.mean(-1, keepdims=True), 0).mean(-1), rtol=1e-5)
  assert np.all(np.asarray(mix_s["mi"]) > 0) and np.all(np.asarray(drop.with_scores(val[0])[1]["mi"]) > 0)


def test_last_layer_laplace_keeps_the_head_bias(setup):
  """A head with a bias (Phi-3.5-MoE): the posterior mean's answer logits are the model's, bias included."""
  cfg, params, fit, val = setup
  cfg = cfg.replace(lm_head_bias=True)
  bias = 2.0 * jax.random.normal(jax.random.key(3), (cfg.vocab_size,))
  params = {**params, "lm_head": {**params.get("lm_head", {}), "bias": bias}}
  method, _ = LL.last_layer_laplace(params, Task(cfg, CLASSES), fit, prior_precision=1e9)
  np.testing.assert_allclose(method(val[0]), jax.nn.softmax(Task(cfg, CLASSES).logits(params, val[0]), -1),
                             atol=1e-4)


def test_last_layer_laplace_equals_dense_glm(setup):
  cfg, params, fit, val = setup
  method, post = LL.last_layer_laplace(params, Task(cfg, CLASSES), fit, prior_precision=2.0)
  probs = method(val[0])
  _ok(probs, 8)
  # dense reference: J wrt W = head[:, classes] [d, C], Sigma materialised from the posterior
  w_dc = head_rows(params, CLASSES)
  phi = Task(cfg, CLASSES).features(params, val[0])
  d, c = w_dc.shape
  basis = jnp.eye(d * c).reshape(d * c, 1, d, c)
  sig = jax.vmap(lambda v: P.covariance_apply(post, LL.head_block(Task(cfg, CLASSES)), v)[0])(basis).reshape(d * c, d * c)
  jac = jax.vmap(lambda p: jnp.kron(p[:, None], jnp.eye(c)))(phi)  # [b, d*c, c]: d f_c / d W[i, j]
  cov = np.einsum("bpc,pq,bqk->bck", jac, sig, jac)
  f = phi @ w_dc
  np.testing.assert_allclose(probs, probit_pairwise(f, cov), rtol=1e-4, atol=1e-6)  # the default link
  want = jax.nn.softmax(f / jnp.sqrt(1 + jnp.pi / 8 * jnp.diagonal(cov, axis1=1, axis2=2)), -1)
  laplace_torch, _ = LL.last_layer_laplace(params, Task(cfg, CLASSES), fit, prior_precision=2.0, link="probit")
  np.testing.assert_allclose(laplace_torch(val[0]), want, rtol=1e-4, atol=1e-6)
  # the MAP logits are the model's
  np.testing.assert_allclose(f, Task(cfg, CLASSES).logits(params, val[0]), atol=1e-4)
  # evidence-optimal prior by default
  _, post_opt = LL.last_layer_laplace(params, Task(cfg, CLASSES), fit)
  assert float(P.log_marginal_likelihood(post_opt)) >= float(P.log_marginal_likelihood(post))


def test_bayesian_moe_method(setup):
  cfg, params, fit, val = setup
  spec = B.laplace.FactorSpec(layers=(0, 1), rank=4)
  state = B.laplace.fit_factors(params, Task(cfg, CLASSES), fit, spec, progress=False)
  post = posterior_of(B.laplace.kfac.finalize(state), params, prior_mean="zero", num_sequences=int(state.num_sequences))
  p = BL.bayesian_moe(post, params, Task(cfg, CLASSES))(val[0])
  _ok(p, 8)
  np.testing.assert_allclose(p, predict(post, params, Task(cfg, CLASSES), val[0]).probs_bc, atol=1e-6)
  # variants sharing the factors (one Jacobian pass per batch) equal the separate methods
  posts = {"a": post, "b": B.laplace.optimize_prior_precision(post, "layer")[0]}
  variants = BL.bayesian_moe_variants(posts, params, Task(cfg, CLASSES))
  for name, po in posts.items():
    for batch in val:
      np.testing.assert_allclose(variants[name](batch), BL.bayesian_moe(po, params, Task(cfg, CLASSES))(batch), atol=1e-6)
  # its epistemic scores: the centred logit variance of the closed-form N(f, J Sigma J^T)
  pred = predict(post, params, Task(cfg, CLASSES), val[0])
  h = np.eye(4) - 1 / 4
  want = np.trace(h @ np.asarray(pred.f_cov_bcc, np.float64) @ h, axis1=1, axis2=2) / 4
  np.testing.assert_allclose(variants["a"].with_scores(val[0])[1]["var_f"], want, rtol=1e-4)
  other = posterior_of(B.laplace.kfac.finalize(state), params, num_sequences=2)
  with pytest.raises(ValueError, match="share one factors dict"):
    BL.bayesian_moe_variants({"a": post, "c": other}, params, Task(cfg, CLASSES))


def test_last_layer_laplace_refuses_cloze_batches():
  cfg = B.tiny_config(vocab_size=64)
  params = B.init_params(cfg, jax.random.key(3), std=0.2)
  batch = Batch(jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32), jnp.asarray([5, 3]), jnp.asarray([0, 2]),
                class_ids_bc=jnp.asarray([[3, 9, 11], [40, 2, 7]]))
  with pytest.raises(ValueError, match="one set of class tokens"):
    LL.last_layer_laplace(params, Task(cfg, None), [batch])


def test_features_times_head_rows_are_the_logits_with_logits_scaling():
  """Granite divides the logits by logits_scaling: the last-layer features carry it, so phi W stays the logits."""
  cfg = B.tiny_config(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  rng = np.random.RandomState(0)
  batch = Batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (3, 6))), jnp.ones((3, 6), jnp.int32),
                jnp.array([5, 2, 4]), jnp.array([0, 1, 3]))
  task = Task(cfg, CLASSES)
  np.testing.assert_allclose(task.features(params, batch) @ head_rows(params, CLASSES), task.logits(params, batch),
                             atol=1e-5)
