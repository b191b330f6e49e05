"""Incremental SVD factors: equal to the batch result when the rows' rank is at most r, converge to the
full factors as r grows, and reject a rank larger than the factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.task import Task
from bmoe_jax.laplace import kfac, lowrank
from tests.fixtures import kfac_update, top_layer_moe

finalize = jax.jit(kfac.finalize)  # values only: the finiteness check of a concrete finalize is tested elsewhere


def test_incremental_svd_equals_batch_sum_when_rank_fits():
  rng = np.random.RandomState(0)
  num_e, n, r = 3, 6, 4
  basis = rng.randn(num_e, r, n)  # each expert's rows live in an r-dim subspace
  expert = rng.randint(0, num_e, 40)
  x = np.einsum("cr,crn->cn", rng.randn(40, r), basis[expert])
  valid = rng.rand(40) > 0.2
  b = jnp.zeros((num_e, n, r))
  for chunk in range(4):  # four batches, windows of 2 rows: many SVD updates per expert
    sl = slice(10 * chunk, 10 * chunk + 10)
    b = jax.jit(lowrank.update_factor, static_argnums=4)(b, jnp.asarray(x[sl], jnp.float32),
                                                          jnp.asarray(expert[sl]), jnp.asarray(valid[sl]), 2)
  for e in range(num_e):
    sel = (expert == e) & valid
    want = x[sel].T @ x[sel]
    np.testing.assert_allclose(np.asarray(b[e] @ b[e].T), want, rtol=1e-4, atol=1e-4)
  eig, vec = lowrank.eigenform(b)
  np.testing.assert_allclose(np.einsum("eir,er,ejr->eij", vec, eig, vec), np.einsum("eir,ejr->eij", b, b),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.einsum("eir,eis->ers", vec, vec), np.broadcast_to(np.eye(r), (num_e, r, r)),
                             atol=1e-5)


def _setup():
  return top_layer_moe(seq=6)


def _kron_blocks(fac):
  a = jnp.einsum("eir,er,ejr->eij", fac.a_vec_eff, fac.a_eig_ef, fac.a_vec_eff)
  g = jnp.einsum("eir,er,ejr->eij", fac.g_vec_edd, fac.g_eig_ed, fac.g_vec_edd)
  return np.stack([np.kron(a[e], g[e]) for e in range(a.shape[0])])


@pytest.mark.parametrize("tokens", ["last", "expand"])
def test_lowrank_converges_to_full(tokens):
  cfg, params, batch = _setup()
  classes = jnp.array([1, 2, 5])
  halves = [jax.tree.map(lambda x: x[i:i + 2], batch) for i in (0, 2)]

  def run(rank):
    spec = kfac.FactorSpec(layers=(1,), tokens=tokens, rank=rank)
    state = kfac.init(cfg, spec)
    for h in halves:
      state = kfac_update(state, params, Task(cfg, classes), h, spec)
    return state, finalize(state)[kfac.Block(1)]

  full_state, full = run(None)
  ref = _kron_blocks(full)
  errs = []
  for rank in (1, 2, 4, 8, 16):
    state, fac = run(rank)
    np.testing.assert_array_equal(state.stats[kfac.Block(1)].rows_e, full_state.stats[kfac.Block(1)].rows_e)
    np.testing.assert_allclose(float(state.log_lik), float(full_state.log_lik), rtol=1e-6)
    errs.append(np.abs(_kron_blocks(fac) - ref).max() / np.abs(ref).max())
    # the remainders: the trace each rank-r factor drops, spread over the complement of its span
    for rest, eig_full, eig, vec in ((fac.a_rest_e, full.a_eig_ef, fac.a_eig_ef, fac.a_vec_eff),
                                     (fac.g_rest_e, full.g_eig_ed, fac.g_eig_ed, fac.g_vec_edd)):
      n, r = vec.shape[1:]
      total = np.sum(eig_full, 1)
      want = np.maximum(total - np.sum(eig, 1), 0) / max(n - r, 1)
      np.testing.assert_allclose(rest, want, rtol=2e-3, atol=1e-5 * float(np.max(total)) / max(n - r, 1))
  assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
  assert errs[0] > 1e-2 and errs[-1] < 1e-4, errs  # f = 16 = full rank of A; G's rows number <= 16 here


def test_rank_larger_than_factor_is_rejected():
  cfg = B.tiny_config(num_experts=3, moe_layers=(False, True))
  with pytest.raises(ValueError, match="rank=17 exceeds a factor dimension.*f=16"):
    kfac.init(cfg, kfac.FactorSpec(layers=(1,), rank=17))
  with pytest.raises(ValueError, match="rank=0"):
    kfac.FactorSpec(layers=(1,), rank=0)


def test_remainder_brings_the_evidence_prior_precision_back_to_full_rank():
  """LPO's lambda* with rank-2 factors: without the remainder far below the full-rank lambda*, with it
  close (the effective number of parameters is no longer capped at r^2 per expert)."""
  from bmoe_jax.laplace import posterior as P
  from bmoe_jax.params import read_blocks

  cfg, params, batch = _setup()
  task = Task(cfg, jnp.array([1, 2, 5]))
  blk = kfac.Block(1)
  w_map = read_blocks(params, [blk])
  mu0 = {blk: w_map[blk] - 0.05 * jax.random.normal(jax.random.key(1), w_map[blk].shape)}

  def lam(rank, remainder=True):
    spec = kfac.FactorSpec(layers=(1,), tokens="expand", rank=rank)
    state = kfac_update(kfac.init(cfg, spec), params, task, batch, spec)
    post = P.build(finalize(state), w_map, prior_mean=mu0, num_sequences=4, dataset_size=400,
                   log_lik=state.log_lik, remainder=remainder)
    best, _ = P.optimize_prior_precision(post, "global", steps=300, learning_rate=0.1)
    return float(jnp.exp(best.log_prior_prec_e[blk][0]))

  full, bare, kept = lam(None), lam(2, remainder=False), lam(2)
  print(f"lambda*: full {full:.3g}, rank 2 without remainder {bare:.3g}, with {kept:.3g}")
  assert abs(np.log(kept / full)) < 0.5 * abs(np.log(bare / full))
