"""Epistemic scores against numpy brute force: the mutual information's definition, the centred variance of
draws (shift-invariant, masked choices left out), and the Gaussian closed form against many draws."""

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax import epistemic as EP
from bmoe_jax.task import CHOICE_MASK_VALUE


def _np_entropy(p):
  return -np.sum(p * np.log(p), -1)


def _random_gaussian(rng, b, c):
  a = rng.normal(size=(b, c, c))
  return rng.normal(size=(b, c)) * 2, np.einsum("bij,bkj->bik", a, a) * 0.5


def test_sample_scores_are_the_definitions():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(7, 5, 4)) * 2
  p = np.exp(f) / np.exp(f).sum(-1, keepdims=True)
  mean, sc = EP.sample_scores(jnp.asarray(f))
  np.testing.assert_allclose(mean, p.mean(0), atol=1e-6)
  np.testing.assert_allclose(sc["mi"], _np_entropy(p.mean(0)) - _np_entropy(p).mean(0), atol=1e-5)
  centred = f - f.mean(-1, keepdims=True)
  np.testing.assert_allclose(sc["var_f"], centred.var(0).mean(-1), rtol=1e-5)
  # a shift common to the classes, different per draw, changes no probability and no score
  shifted = EP.sample_scores(jnp.asarray(f + rng.normal(size=(7, 5, 1)) * 50))[1]
  np.testing.assert_allclose(shifted["mi"], sc["mi"], atol=1e-5)
  np.testing.assert_allclose(shifted["var_f"], sc["var_f"], rtol=1e-3)
  same = EP.sample_scores(jnp.asarray(np.repeat(f[:1], 4, 0)))[1]  # identical draws: nothing epistemic
  np.testing.assert_allclose(same["mi"], 0, atol=1e-6)
  np.testing.assert_allclose(same["var_f"], 0, atol=1e-6)


def test_masked_choices_are_left_out():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(6, 3, 4)).astype(np.float32)
  masked = f.copy()
  masked[:, 1, 3] = CHOICE_MASK_VALUE  # example 1 has three choices
  got = EP.sample_scores(jnp.asarray(masked))[1]
  want = EP.sample_scores(jnp.asarray(f[:, 1:2, :3]))[1]
  np.testing.assert_allclose(got["var_f"][1], want["var_f"][0], rtol=1e-5)
  np.testing.assert_allclose(got["mi"][1], want["mi"][0], atol=1e-6)
  mean, cov = _random_gaussian(rng, 3, 4)
  mean[1, 3], cov[1, 3, :], cov[1, :, 3] = CHOICE_MASK_VALUE, 0.0, 0.0
  g = EP.gaussian_scores(jnp.asarray(mean), jnp.asarray(cov), jax.random.key(0))
  g3 = EP.gaussian_scores(jnp.asarray(mean[1:2, :3]), jnp.asarray(cov[1:2, :3, :3]), jax.random.key(0))
  np.testing.assert_allclose(g["var_f"][1], g3["var_f"][0], rtol=1e-5)


def test_gaussian_scores_match_their_draws():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    mean, cov = _random_gaussian(rng, 4, 3)
    g = EP.gaussian_scores(jnp.asarray(mean), jnp.asarray(cov), jax.random.key(3), num_samples=200_000)
    h = np.eye(3) - 1 / 3
    np.testing.assert_allclose(g["var_f"], np.trace(h @ cov @ h, axis1=1, axis2=2) / 3, rtol=1e-10)
    draws = mean + np.einsum("bij,nbj->nbi", np.linalg.cholesky(cov + 1e-12 * np.eye(3)),
                             rng.normal(size=(200_000, 4, 3)))
    mc = EP.sample_scores(jnp.asarray(draws))[1]
    np.testing.assert_allclose(g["var_f"], mc["var_f"], rtol=0.02)  # the closed form is the draws' limit
    np.testing.assert_allclose(g["mi"], mc["mi"], rtol=0.02, atol=2e-4)
    assert np.all(np.asarray(g["mi"]) > 0)


def test_scores_jit_and_vmap():
  f = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  batched = jax.jit(jax.vmap(lambda x: EP.sample_scores(x)[1]["mi"]))(f)
  np.testing.assert_allclose(batched[1], EP.sample_scores(f[1])[1]["mi"], atol=1e-6)
