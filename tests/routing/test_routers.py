"""Each router's sampler against its distribution: moments, KL closed forms against Monte Carlo, the
degenerate limits that must give the MAP router, and one compiled forward for every sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax import routing as RT
from bmoe_jax.nn import gating as G
from bmoe_jax.routing import routers as R

D, E, K = 12, 6, 2


def _inputs(n=40, seed=0, train=False, gating=G.Gating(), key=1, sample=0):
  u = jax.random.normal(jax.random.key(seed), (n, D))
  w = jax.random.normal(jax.random.key(seed + 1), (D, E)) / np.sqrt(D)
  return R.RouterIn(u, w, jax.random.key(key), jnp.asarray(sample, jnp.int32), gating, K, train)


def _params(kind, **kw):
  rc = R.RouterConfig(kind=kind, **kw)
  x = _inputs()
  return rc, R.init(rc, x.kernel_de, jax.random.key(9)), x


@pytest.mark.parametrize("kind", R.KINDS)
def test_every_router_gives_valid_routing_under_jit_and_vmap_over_keys(kind):
  rc, p, x = _params(kind)
  for train in (False, True):
    fn = jax.jit(lambda key: R.apply(rc, p, x._replace(key=key, train=train)))
    routing, aux = jax.vmap(fn)(jax.random.split(jax.random.key(0), 3))
    ids = np.asarray(routing.expert_nk)
    assert ids.shape == (3, 40, K) and ids.min() >= 0 and ids.max() < E
    assert (np.sort(ids, -1)[..., 1:] != np.sort(ids, -1)[..., :-1]).all()  # k distinct experts
    assert np.isfinite(np.asarray(routing.gate_nk)).all() and np.isfinite(np.asarray(aux)).all()


def test_fresh_variational_routers_start_at_the_map_mean():
  for kind in ("mfvr", "fcvr"):
    rc, p, x = _params(kind)
    r, kl = R.apply(rc, p, x._replace(train=True))
    assert np.asarray(kl).min() >= -1e-6  # dmu = 0, variance ~ 1: KL ~ 0
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=0.05)


def test_temperature_router_samples_k_from_softmax_over_t():
  rc = R.RouterConfig(kind="temperature", sample_temperature=0.7)
  x = _inputs(n=1)
  n = 100_000
  routing = jax.vmap(lambda key: R.apply(rc, {}, x._replace(key=key))[0])(jax.random.split(jax.random.key(0), n))
  first = np.asarray(routing.expert_nk[:, 0, 0])
  p = np.asarray(jax.nn.softmax((x.u_nd @ x.kernel_de)[0] / 0.7))
  freq = np.bincount(first, minlength=E) / n
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p.max() / n) + 1e-3)
  # gates from the unscaled logits at the drawn experts
  l = x.u_nd @ x.kernel_de
  expect = G.gates_at(jnp.broadcast_to(l, (n,) + l.shape), routing.expert_nk, x.gating)
  np.testing.assert_allclose(np.asarray(routing.gate_nk), np.asarray(expect), rtol=1e-6)


def test_mcdr_mean_mask_has_the_moments_of_s_dropout_passes():
  rc, p, x = _params("mcdr", router_dropout=0.2, inner_samples=7)
  u1 = x._replace(u_nd=jnp.ones((20_000, D)), kernel_de=jnp.eye(D, E))
  routing = R.apply(rc, {"kernel": jnp.eye(D, E)}, u1)[0]
  m = np.asarray(routing.logits_ne)  # = the mean mask of the first E units (identity router)
  keep = 0.8
  np.testing.assert_allclose(m.mean(), 1.0, atol=5e-3)
  np.testing.assert_allclose(m.var(), (1 - keep) / (7 * keep), rtol=0.05)  # the mean of 7 dropout masks
  train = np.asarray(R.apply(rc, {"kernel": jnp.eye(D, E)}, u1._replace(train=True))[0].logits_ne)
  assert set(np.unique(train).round(6)) <= {0.0, 1.25}  # one mask: 0 or 1/keep


def test_mcdr_without_dropout_is_its_own_deterministic_router():
  rc, p, x = _params("mcdr", router_dropout=0.0)
  r = R.apply(rc, p, x)[0]
  d = G.route(x.u_nd, x.kernel_de, K, norm_topk_prob=False)
  np.testing.assert_array_equal(np.asarray(r.expert_nk), np.asarray(d.expert_nk))
  np.testing.assert_allclose(np.asarray(r.gate_nk), np.asarray(d.gate_nk), rtol=1e-6)


def _mc_kl(mu, cov, n=400_000, seed=0):
  """MC estimate of KL(N(mu, cov) || N(0, I)) = E_q[log q - log p]."""
  e = mu.shape[0]
  chol = np.linalg.cholesky(cov)
  z = np.random.RandomState(seed).randn(n, e)
  x = mu + z @ chol.T
  logdet = 2 * np.log(np.diag(chol)).sum()
  log_q = -0.5 * (z ** 2).sum(1) - 0.5 * logdet
  log_p = -0.5 * (x ** 2).sum(1)
  return np.mean(log_q - log_p)


def test_kl_closed_forms_match_monte_carlo():
  rng = np.random.RandomState(0)
  mu = rng.randn(4) * 0.5
  logvar = rng.randn(4) * 0.3
  kl = float(R.kl_diag(jnp.asarray(mu)[None], jnp.asarray(logvar)[None])[0])
  np.testing.assert_allclose(kl, _mc_kl(mu, np.diag(np.exp(logvar))), atol=0.02)
  v = jnp.asarray(rng.randn(1, 10) * 0.4, jnp.float32)
  l_nee, raw = R.tril_from_vector(v, 4)
  l = np.asarray(l_nee[0], np.float64)
  assert np.allclose(np.triu(l, 1), 0) and (np.diag(l) > 0).all()
  np.testing.assert_allclose(np.log(np.diag(l)), np.asarray(raw[0]), rtol=1e-6)
  kl = float(R.kl_chol(jnp.asarray(mu, jnp.float32)[None], raw, l_nee)[0])
  np.testing.assert_allclose(kl, _mc_kl(mu, l @ l.T), atol=0.03)


def test_fcvr_samples_have_covariance_l_lt():
  rc, p, x = _params("fcvr")
  p = {**p, "w2": 0.3 * jax.random.normal(jax.random.key(5), p["w2"].shape)}
  x1 = x._replace(u_nd=x.u_nd[:1], train=True)
  n = 100_000
  logits = jax.vmap(lambda key: R.apply(rc, p, x1._replace(key=key))[0].logits_ne[0])(
      jax.random.split(jax.random.key(1), n))
  l_nee, _ = R.tril_from_vector(R._mlp(p, x1.u_nd), E)
  cov = np.cov(np.asarray(logits), rowvar=False)
  np.testing.assert_allclose(cov, np.asarray(l_nee[0] @ l_nee[0].T), atol=0.04)
  np.testing.assert_allclose(np.asarray(logits).mean(0), np.asarray(x1.u_nd @ x1.kernel_de)[0], atol=0.03)


def test_variational_inference_routing_is_log_mean_softmax_and_collapses_to_the_mean():
  rc, p, x = _params("mfvr", inner_samples=50_000)
  x = x._replace(u_nd=x.u_nd[:3])
  p = {**p, "mu": 0.1 * jax.random.normal(jax.random.key(2), (D, E))}
  mean_l = x.u_nd @ x.kernel_de + x.u_nd @ p["mu"]
  r = R.apply(rc, p, x)[0]
  var = np.exp(np.asarray(R._mlp(p, x.u_nd)))
  eps = np.random.RandomState(0).randn(50_000, *mean_l.shape)
  ref = np.mean(np.asarray(jax.nn.softmax(np.asarray(mean_l) + np.sqrt(var) * eps)), 0)
  np.testing.assert_allclose(np.exp(np.asarray(r.logits_ne)), ref, atol=4e-3)
  # without variance the samples are the mean: the MAP top-k of the shifted logits
  r0 = R._variational(x, mean_l, lambda eps: 1e-6 * eps, 5)
  np.testing.assert_array_equal(np.asarray(r0.expert_nk), np.asarray(G.topk_ids(mean_l, K)))


@pytest.mark.parametrize("kind", ("mfvr", "fcvr"))
def test_variational_routing_stays_finite_when_mean_probabilities_underflow(kind):
  """Logits spread by hundreds (a carved router's): every expert but one has mean probability 0 in float32,
  yet the top-k, the gates ("select": 1) and the log mean probabilities stay finite."""
  rc, p, x = _params(kind)
  x = x._replace(kernel_de=300.0 * x.kernel_de, gating=G.Gating(scoring="select"))
  r = R.apply(rc, p, x)[0]
  assert np.isfinite(np.asarray(r.logits_ne)).all() and np.asarray(r.logits_ne).min() < -100.0
  np.testing.assert_array_equal(np.asarray(r.gate_nk), 1.0)
  np.testing.assert_array_equal(np.asarray(r.expert_nk), np.asarray(G.topk_ids(r.logits_ne, K)))


def test_swag_draws_have_the_swag_moments():
  rc = R.RouterConfig(kind="swag", swag_scale=0.5, swag_rank=3)
  rng = np.random.RandomState(0)
  mean = rng.randn(2, 3).astype(np.float32)
  sq = (mean ** 2 + rng.rand(2, 3) * 0.5).astype(np.float32)
  dev = rng.randn(3, 2, 3).astype(np.float32) * 0.5
  p = {"mean": mean, "sq_mean": sq, "dev": dev, "count": jnp.asarray(3.0)}
  n = 200_000
  draws = np.asarray(jax.vmap(lambda k: R.swag_draw(rc, p, k))(jax.random.split(jax.random.key(0), n)))
  flat = draws.reshape(n, -1)
  d2 = dev.reshape(3, -1)
  cov = 0.5 * (np.diag((sq - mean ** 2).ravel()) + d2.T @ d2 / 2) / 2
  np.testing.assert_allclose(flat.mean(0), mean.ravel(), atol=0.01)
  np.testing.assert_allclose(np.cov(flat, rowvar=False), cov, atol=0.01)


def test_ensemble_sample_index_picks_the_member():
  rc, _, x = _params("ensemble", router_members=3)
  kernels = jax.random.normal(jax.random.key(3), (3, D, E))
  for s in range(5):
    r = R.apply(rc, {"kernels": kernels}, x._replace(sample=jnp.asarray(s)))[0]
    d = G.route(x.u_nd, kernels[s % 3], K, norm_topk_prob=False)
    np.testing.assert_array_equal(np.asarray(r.expert_nk), np.asarray(d.expert_nk))


def test_vtsr_training_gates_keep_the_family_value_and_reach_the_temperature():
  for scoring in ("softmax", "select"):
    rc, p, x = _params("vtsr", per_expert=True)
    x = x._replace(train=True, gating=G.Gating(scoring=scoring))

    def loss(p):
      r, aux = R.apply(rc, p, x)
      return jnp.sum(r.gate_nk * jnp.arange(K)), (r, aux)
    (val, (r, aux)), grads = jax.value_and_grad(loss, has_aux=True)(p)
    z = (x.u_nd @ x.kernel_de) / R.temperature_of(p, x.u_nd)
    np.testing.assert_allclose(np.asarray(r.gate_nk), np.asarray(G.gates_at(z, r.expert_nk, x.gating)), rtol=1e-6)
    assert float(jnp.abs(grads["w2"]).sum()) > 0 and float(jnp.abs(grads["w1"]).sum()) > 0
    np.testing.assert_allclose(np.asarray(aux), -np.mean(np.log(np.asarray(R.temperature_of(p, x.u_nd))), -1),
                               rtol=1e-6)


def test_plan_runs_stochastic_routers_in_the_model_and_round_trips():
  cfg = B.tiny_config(moe_layers=(False, True))
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
  plan = RT.RoutingPlan.of({1: R.RouterConfig(kind="temperature", sample_temperature=5.0)})
  assert RT.RoutingPlan.from_dict(plan.to_dict()) == plan
  with pytest.raises(ValueError, match="carry no routing state"):
    B.forward(params, cfg, tokens, routing=plan)
  with pytest.raises(ValueError, match="not MoE layers"):
    RT.RoutingPlan.of({0: R.RouterConfig(kind="temperature")}).check(cfg)
  traces = []

  def forward(p):
    traces.append(1)  # runs once per trace: a retrace per draw would append again
    return B.forward(p, cfg, tokens, routing=plan, return_taps=True)

  fwd = jax.jit(forward)
  a = fwd(RT.attach(params, {}, key=0))
  again = fwd(RT.attach(params, {}, key=0))
  b = fwd(RT.with_draw(RT.attach(params, {}, key=0), 1, 0))
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(again.logits))  # seeded
  assert not np.array_equal(np.asarray(a.taps[1].expert_bsk), np.asarray(b.taps[1].expert_bsk))
  assert len(traces) == 1  # one compiled program for every draw


def test_swag_state_moments_equal_the_snapshots_statistics():
  from bmoe_jax.routing import swag
  rng = np.random.RandomState(1)
  snaps = rng.randn(7, 3, 2).astype(np.float32)
  st = swag.init(snaps[0], rank=4)
  for w in snaps:
    st = swag.update(st, w)
  np.testing.assert_allclose(np.asarray(st.mean), snaps.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(st.sq_mean), (snaps ** 2).mean(0), rtol=1e-5, atol=1e-6)
  assert float(st.count) == 7
  np.testing.assert_allclose(np.asarray(st.dev[-1]), snaps[-1] - snaps.mean(0), rtol=1e-5, atol=1e-6)
  # only the last K=4 deviations are kept; before K snapshots the unused rows stay 0 and are never drawn
  young = swag.update(swag.init(snaps[0], rank=4), snaps[0])
  assert np.all(np.asarray(young.dev[:-1]) == 0)
  rc = R.RouterConfig(kind="swag")
  one = R.swag_draw(rc, swag.as_params(young), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(one), snaps[0], atol=1e-6)  # one snapshot: no spread
