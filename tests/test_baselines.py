"""Baselines on a tiny model: each returns probabilities through the same interface and does what it
claims (temperature minimises validation NLL, dropout 0 is MAP, last-layer Laplace equals a dense
J Sigma J^T, identical ensemble members are MAP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax import baselines as BL
from bmoe_jax.baselines import last_layer as LL
from bmoe_jax.baselines.methods import fit_temperature
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace.kfac import Batch
from tests.tasks import CLASSES, synthetic_task


@pytest.fixture(scope="module")
def setup():
  cfg = B.tiny_config(num_experts=4)
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3), synthetic_task(cfg, 3), synthetic_task(cfg, 1, seed=1)


def _ok(probs, b):
  assert probs.shape == (b, 4) and np.allclose(np.asarray(probs).sum(-1), 1, atol=1e-5)


def test_temperature_scaling_minimises_validation_nll(setup):
  cfg, params, fit, val = setup
  method, t = BL.temperature_scaling(params, cfg, CLASSES, fit)
  f = jnp.concatenate([B.laplace.kfac.task_logits(params, cfg, b, CLASSES)[0] for b in fit])
  y = jnp.concatenate([b.labels_b for b in fit])
  nll = lambda tt: float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(f / tt), y[:, None], 1)))
  assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05)) + 1e-7
  _ok(method(val[0]), 8)
  # overconfident logits get T > 1, underconfident ones T < 1
  rng = np.random.RandomState(0)
  y = rng.randint(0, 3, 500)
  clean = np.eye(3)[y] * 2.0 + rng.randn(500, 3)
  assert fit_temperature(clean * 10, y) > 1 > fit_temperature(clean * 0.05, y)


def test_mc_dropout_and_ensembles(setup):
  cfg, params, _, val = setup
  map_p = BL.map_method(params, cfg, CLASSES)(val[0])
  np.testing.assert_allclose(BL.mc_dropout(params, cfg, CLASSES, rate=0.0, num_samples=3)(val[0]), map_p, atol=1e-6)
  drop = BL.mc_dropout(params, cfg, CLASSES, rate=0.3, num_samples=8, key=jax.random.key(1))
  p1 = drop(val[0])
  _ok(p1, 8)
  assert np.abs(np.asarray(p1 - map_p)).max() > 1e-3
  np.testing.assert_array_equal(p1, drop(val[0]))  # seeded
  np.testing.assert_allclose(BL.ensemble([params, params], cfg, CLASSES)(val[0]), map_p, atol=1e-6)
  other = B.init_params(cfg, jax.random.key(5), std=0.3)
  mix = BL.ensemble([params, other], cfg, CLASSES)(val[0])
  np.testing.assert_allclose(mix, (map_p + BL.map_method(other, cfg, CLASSES)(val[0])) / 2, atol=1e-6)
  with pytest.raises(ValueError, match="rate=1.0"):
    BL.mc_dropout(params, cfg, CLASSES, rate=1.0)


def test_last_layer_laplace_equals_dense_glm(setup):
  cfg, params, fit, val = setup
  method, post = LL.last_layer_laplace(params, cfg, CLASSES, fit, prior_precision=2.0)
  probs = method(val[0])
  _ok(probs, 8)
  # dense reference: J wrt W = head[:, classes] [d, C], Sigma materialised from the posterior
  w_dc = LL.head_rows(params, cfg, CLASSES)
  phi = LL.features(params, cfg, val[0])
  d, c = w_dc.shape
  basis = jnp.eye(d * c).reshape(d * c, 1, d, c)
  sig = jax.vmap(lambda v: P.covariance_apply(post, LL.BLOCK, v)[0])(basis).reshape(d * c, d * c)
  jac = jax.vmap(lambda p: jnp.kron(p[:, None], jnp.eye(c)))(phi)  # [b, d*c, c]: d f_c / d W[i, j]
  cov = np.einsum("bpc,pq,bqk->bck", jac, sig, jac)
  f = phi @ w_dc
  want = jax.nn.softmax(f / jnp.sqrt(1 + jnp.pi / 8 * jnp.diagonal(cov, axis1=1, axis2=2)), -1)
  np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-6)
  # the MAP logits are the model's
  np.testing.assert_allclose(f, B.laplace.kfac.task_logits(params, cfg, val[0], CLASSES)[0], atol=1e-4)
  # evidence-optimal prior by default
  _, post_opt = LL.last_layer_laplace(params, cfg, CLASSES, fit)
  assert float(P.log_marginal_likelihood(post_opt)) >= float(P.log_marginal_likelihood(post))


def test_bayesian_moe_method(setup):
  cfg, params, fit, val = setup
  spec = B.laplace.FactorSpec(layers=(0, 1), rank=4)
  state = B.laplace.fit_factors(params, cfg, fit, CLASSES, spec, progress=False)
  post = B.laplace.build(B.laplace.kfac.finalize(state), params, num_sequences=int(state.num_sequences))
  p = BL.bayesian_moe(post, params, cfg, CLASSES)(val[0])
  _ok(p, 8)
  np.testing.assert_allclose(p, B.laplace.predict(post, params, cfg, val[0], CLASSES, link="probit").probs_bc,
                             atol=1e-6)
  # variants sharing the factors (one Jacobian pass per batch) equal the separate methods
  posts = {"a": post, "b": B.laplace.optimize_prior_precision(post, "layer")[0]}
  variants = BL.bayesian_moe_variants(posts, params, cfg, CLASSES)
  for name, po in posts.items():
    for batch in val:
      np.testing.assert_allclose(variants[name](batch), BL.bayesian_moe(po, params, cfg, CLASSES)(batch), atol=1e-6)
  other = B.laplace.build(B.laplace.kfac.finalize(state), params, num_sequences=2)
  with pytest.raises(ValueError, match="share one factors dict"):
    BL.bayesian_moe_variants({"a": post, "c": other}, params, cfg, CLASSES)


def test_cloze_batches_score_per_example_tokens():
  """task_logits gathers Batch.class_ids_bc per example; last-layer Laplace refuses them clearly."""
  import jax.numpy as jnp

  from bmoe_jax.baselines.last_layer import last_layer_laplace
  from bmoe_jax.laplace.kfac import task_logits
  from bmoe_jax.model import forward

  cfg = B.tiny_config(vocab_size=64)
  params = B.init_params(cfg, jax.random.key(3), std=0.2)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
  ids = jnp.asarray([[3, 9, 11], [40, 2, 7]])
  batch = Batch(tokens, jnp.ones((2, 6), jnp.int32), jnp.asarray([5, 3]), jnp.asarray([0, 2]), class_ids_bc=ids)
  logits = forward(params, cfg, tokens, batch.mask_bs).logits
  want = np.stack([np.asarray(logits[0, 5])[[3, 9, 11]], np.asarray(logits[1, 3])[[40, 2, 7]]])
  np.testing.assert_allclose(np.asarray(task_logits(params, cfg, batch, None)[0]), want, atol=1e-5)
  with pytest.raises(ValueError, match="one set of class tokens"):
    last_layer_laplace(params, cfg, None, [batch])
