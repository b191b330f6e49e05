"""Posterior algebra against dense matrices: eigenbasis and Woodbury forms equal the dense inverse,
the evidence equals the dense formula, samples have the posterior covariance, LPO finds the optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmoe_jax.laplace import lowrank
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace.kfac import Block, Factors

E, F, D = 3, 4, 5


def _psd(rng, n, rank):
  x = rng.randn(n, rank)
  return x @ x.T


def _factors(rng, rank=None):
  """Factors of random PSD A [e,f,f] (mean) and G [e,d,d] (sum): full eigh, or rank-r via lowrank."""
  a = np.stack([_psd(rng, F, 3) for _ in range(E)])
  g = np.stack([_psd(rng, D, 4) for _ in range(E)])
  if rank is None:
    a_eig, a_vec = np.linalg.eigh(a)
    g_eig, g_vec = np.linalg.eigh(g)
  else:
    a_eig, a_vec = lowrank.eigenform(jnp.asarray(np.linalg.cholesky(a + 1e-9 * np.eye(F))[..., :rank]))
    g_eig, g_vec = lowrank.eigenform(jnp.asarray(np.linalg.cholesky(g + 1e-9 * np.eye(D))[..., :rank]))
  fac = Factors(*(jnp.asarray(x, jnp.float32) for x in (np.maximum(a_eig, 0), a_vec, np.maximum(g_eig, 0),
                                                          g_vec)), jnp.full((E,), 3))
  if rank is not None:  # each factor's isotropic remainder on the complement of its rank-r span
    fac = fac._replace(a_rest_e=jnp.asarray(rng.uniform(0.2, 1.0, E), jnp.float32),
                       g_rest_e=jnp.asarray(rng.uniform(0.5, 2.0, E), jnp.float32))
  return fac


def _dense_prec(fac, scale, prec_e):
  out = []
  for e in range(E):
    a = np.asarray(fac.a_vec_eff[e] * fac.a_eig_ef[e]) @ np.asarray(fac.a_vec_eff[e]).T
    g = np.asarray(fac.g_vec_edd[e] * fac.g_eig_ed[e]) @ np.asarray(fac.g_vec_edd[e]).T
    if fac.a_rest_e is not None:  # (A_r + alpha P_A) (x) (G_r + beta P_G)
      ua, ug = np.asarray(fac.a_vec_eff[e]), np.asarray(fac.g_vec_edd[e])
      a = a + float(fac.a_rest_e[e]) * (np.eye(F) - ua @ ua.T)
      g = g + float(fac.g_rest_e[e]) * (np.eye(D) - ug @ ug.T)
    out.append(scale * np.kron(a, g) + prec_e[e] * np.eye(F * D))
  return np.stack(out).astype(np.float64)


def _post(fac, rng, prec=(0.5, 2.0, 1.3), scale_n=(6, 4), prior_mean="pretrained"):
  w = rng.randn(E, F, D).astype(np.float32)
  w0 = w - 0.3 * rng.randn(E, F, D).astype(np.float32)
  mu0 = {0: jnp.asarray(w0)} if prior_mean == "pretrained" else prior_mean
  post = P.build({0: fac}, {0: jnp.asarray(w)}, num_sequences=scale_n[1], dataset_size=scale_n[0], prior_mean=mu0,
                 prior_precision={0: np.asarray(prec)}, log_lik=-3.0)
  return post, w, w0


@pytest.mark.parametrize("rank", [None, 2])
def test_covariance_and_sqrt_equal_dense_inverse(rank):
  """Including, at rank 2, each factor's isotropic remainder on the complement of its span."""
  rng = np.random.RandomState(0)
  fac = _factors(rng, rank)
  post, _, _ = _post(fac, rng)
  prec_e = np.exp(np.asarray(post.log_prior_prec_e[Block(0)], np.float64))
  cov = np.linalg.inv(_dense_prec(fac, 1.5, prec_e))
  basis = jnp.eye(F * D).reshape(F * D, F, D)
  got = jax.vmap(lambda v: P.covariance_apply(post, 0, jnp.broadcast_to(v, (E, F, D))))(basis)
  sqrt = jax.vmap(lambda v: P._apply_spectral(post.factors[Block(0)], post.scale, jnp.asarray(prec_e, jnp.float32),
                                             jnp.broadcast_to(v, (E, F, D)), -0.5))(basis)
  for e in range(E):
    np.testing.assert_allclose(np.asarray(got[:, e]).reshape(F * D, F * D), cov[e], rtol=1e-4, atol=1e-5)
    l = np.asarray(sqrt[:, e], np.float64).reshape(F * D, F * D)
    np.testing.assert_allclose(l @ l.T, cov[e], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("prior_mean", ["pretrained", "zero"])
def test_evidence_equals_dense_formula(rank, prior_mean):
  rng = np.random.RandomState(1)
  fac = _factors(rng, rank)
  post, w, w0 = _post(fac, rng, prior_mean=prior_mean)
  prec_e = np.exp(np.asarray(post.log_prior_prec_e[Block(0)], np.float64))
  dense = _dense_prec(fac, 1.5, prec_e)
  mu0 = w0 if prior_mean == "pretrained" else np.zeros_like(w)
  want = -3.0 * 1.5
  for e in range(E):
    delta = (w[e] - mu0[e]).reshape(-1).astype(np.float64)
    want += (-0.5 * prec_e[e] * delta @ delta + 0.5 * F * D * np.log(prec_e[e])
             - 0.5 * np.linalg.slogdet(dense[e])[1])
  np.testing.assert_allclose(float(P.log_marginal_likelihood(post)), want, rtol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
def test_samples_have_posterior_covariance(rank):
  rng = np.random.RandomState(2)
  fac = _factors(rng, rank)
  post, _, _ = _post(fac, rng)
  eps = P.sample_perturbations(post, jax.random.key(0), 20000)[Block(0)]
  cov = np.linalg.inv(_dense_prec(fac, 1.5, np.exp(np.asarray(post.log_prior_prec_e[Block(0)], np.float64))))
  for e in range(E):
    x = np.asarray(eps[:, e], np.float64).reshape(20000, -1)
    emp = x.T @ x / 20000
    assert np.abs(emp - cov[e]).max() < 0.05 * np.abs(cov[e]).max()


def test_dataset_size_scales_curvature():
  rng = np.random.RandomState(3)
  fac = _factors(rng)
  post, _, _ = _post(fac, rng, scale_n=(8, 4))
  doubled = fac._replace(g_eig_ed=2 * fac.g_eig_ed)
  post2, _, _ = _post(doubled, np.random.RandomState(3), scale_n=(4, 4))
  post2 = post2._replace(w_map=post.w_map, sq_dist_e=post.sq_dist_e, log_lik=post.log_lik)
  np.testing.assert_allclose(float(P.log_marginal_likelihood(post)), float(P.log_marginal_likelihood(post2)),
                             rtol=1e-6)


def test_lpo_finds_the_evidence_maximum():
  rng = np.random.RandomState(4)
  fac = _factors(rng)
  post, _, _ = _post(fac, rng)
  best, curve = P.optimize_prior_precision(post, "global", steps=400, learning_rate=0.05, init=1.0)
  grid = np.exp(np.linspace(-4, 4, 801))
  vals = [float(P.log_marginal_likelihood(post, P.expand_prior_precision(g, {0: E}))) for g in grid]
  lam = float(jnp.exp(best.log_prior_prec_e[Block(0)][0]))
  assert abs(np.log(lam) - np.log(grid[int(np.argmax(vals))])) < 0.02
  assert curve["log_marglik"][-1] >= max(vals) - 1e-3
  assert curve["log_marglik"][-1] > curve["log_marglik"][0]
  per_expert, _ = P.optimize_prior_precision(post, "expert", steps=400, learning_rate=0.05, init=1.0)
  assert float(P.log_marginal_likelihood(per_expert)) >= curve["log_marglik"][-1] - 1e-4
  assert len(set(np.round(np.asarray(per_expert.log_prior_prec_e[Block(0)]), 3))) == E


def test_lpo_curve_is_one_quantity_from_start_to_end():
  """The curve's prior precision is exp of the mean free log lambda at every point, the last included: in
  "layer" mode with a routed block of E experts and a shared block of one, the mean of the two lambdas' logs
  (the last point once averaged over the E + 1 experts instead)."""
  rng = np.random.RandomState(6)
  fac = _factors(rng)
  one = jax.tree.map(lambda x: x[:1], fac)
  routed, shared = Block(0, "routed"), Block(0, "shared")
  w = {routed: jnp.asarray(rng.randn(E, F, D), jnp.float32), shared: jnp.asarray(rng.randn(1, F, D), jnp.float32)}
  post = P.build({routed: fac, shared: one}, w, num_sequences=4, dataset_size=6, log_lik=-3.0,
                 prior_mean={routed: w[routed] - 0.1, shared: w[shared] - 3.0})  # lambdas far apart
  final, curve = P.optimize_prior_precision(post, "layer", steps=20, learning_rate=0.3)
  assert len(curve["prior_precision"]) == len(curve["log_marglik"]) == 21
  logs = [float(final.log_prior_prec_e[b][0]) for b in (routed, shared)]
  assert abs(logs[0] - logs[1]) > 0.1  # two different lambdas: the two averages would differ
  assert curve["prior_precision"][-1] == pytest.approx(np.exp(np.mean(logs)), rel=1e-5)
  assert curve["prior_precision"][0] == pytest.approx(1.0, rel=1e-5)  # the start: the posterior's lambda


def test_bad_prior_and_shapes():
  rng = np.random.RandomState(5)
  fac = _factors(rng)
  params = {0: jnp.zeros((E, F, D))}
  for bad in (0.0, -1.0, np.nan, [1.0, 0.0, 1.0]):
    with pytest.raises(ValueError, match="positive and finite"):
      P.build({0: fac}, params, prior_mean="zero", num_sequences=3,
              prior_precision={0: np.asarray(bad)} if isinstance(bad, list) else bad)
  with pytest.raises(ValueError, match="num_sequences=0"):
    P.build({0: fac}, params, prior_mean="zero", num_sequences=0)
  with pytest.raises(ValueError, match="prior_mean='mode'"):
    P.build({0: fac}, params, num_sequences=3, prior_mean="mode")
  with pytest.raises(ValueError, match="shapes differ"):
    P.build({0: fac}, params, num_sequences=3, prior_mean={0: jnp.zeros((E, F, D + 1))})
  with pytest.raises(ValueError, match="do not match the weights"):
    P.build({0: fac}, {0: jnp.zeros((E, F + 1, D))}, prior_mean="zero", num_sequences=3)
  with pytest.raises(TypeError, match="prior_mean"):
    P.build({0: fac}, params, num_sequences=3)  # the prior mean is an explicit choice
  # centred at the MAP, the evidence grows with lambda forever: LPO refuses it (a grid on validation data is fine)
  at_map = P.build({0: fac}, {0: jnp.ones((E, F, D))}, prior_mean="map", num_sequences=3)
  assert float(jnp.max(at_map.sq_dist_e[Block(0)])) == 0.0
  lml = [float(P.log_marginal_likelihood(at_map._replace(log_prior_prec_e=P.expand_prior_precision(lam, {0: E}))))
         for lam in (1.0, 1e2, 1e4)]
  assert lml[0] < lml[1] < lml[2]
  with pytest.raises(ValueError, match="grows with the prior precision"):
    P.optimize_prior_precision(at_map, "layer")
  post = P.build({0: fac}, params, prior_mean="zero", num_sequences=3)
  with pytest.raises(ValueError, match="mode='per_head'"):
    P.optimize_prior_precision(post, "per_head")
