"""The accumulation state: batches add up, finalize reconstructs the factors, bad input is named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.task import Task
from bmoe_jax.laplace import kfac
from tests.fixtures import factor_stats, kfac_update, posterior_of, predict, top_layer_moe

CLASSES = jnp.array([1, 2, 5])


def _setup():
  return top_layer_moe()


def test_two_batches_add_up_to_one_and_finalize_reconstructs():
  cfg, params, batch = _setup()
  spec = kfac.FactorSpec(layers=(1,), tokens="expand")
  halves = [jax.tree.map(lambda x: x[i:i + 2], batch) for i in (0, 2)]
  state = kfac.init(cfg, spec)
  for h in halves:
    state = kfac_update(state, params, Task(cfg, CLASSES), h, spec)
  whole = factor_stats(params, Task(cfg, CLASSES), batch, spec)[kfac.Block(1)]
  np.testing.assert_allclose(state.stats[kfac.Block(1)].a_eff, whole.a_eff, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.stats[kfac.Block(1)].g_edd, whole.g_edd, atol=1e-7)
  assert int(state.num_sequences) == 4
  fac = kfac.finalize(state)[kfac.Block(1)]
  rows = np.maximum(np.asarray(whole.rows_e), 1)[:, None, None]
  a_back = jnp.einsum("eij,ej,ekj->eik", fac.a_vec_eff, fac.a_eig_ef, fac.a_vec_eff)
  np.testing.assert_allclose(a_back, whole.a_eff / rows, rtol=1e-5, atol=1e-5)
  g_back = jnp.einsum("eij,ej,ekj->eik", fac.g_vec_edd, fac.g_eig_ed, fac.g_vec_edd)
  np.testing.assert_allclose(g_back, whole.g_edd, atol=1e-7)
  assert (fac.a_eig_ef >= 0).all() and (fac.g_eig_ed >= 0).all()


def test_mc_labels_are_seeded_and_unbiased_in_expectation():
  cfg, params, batch = _setup()
  spec_mc = kfac.FactorSpec(layers=(1,), labels="mc")
  a = factor_stats(params, Task(cfg, CLASSES), batch, spec_mc, jax.random.key(3))[kfac.Block(1)]
  b = factor_stats(params, Task(cfg, CLASSES), batch, spec_mc, jax.random.key(3))[kfac.Block(1)]
  np.testing.assert_array_equal(a.g_edd, b.g_edd)
  draws = jax.jit(jax.vmap(lambda k: kfac.factor_stats(params, Task(cfg, CLASSES), batch, spec_mc, k)[
      kfac.Block(1)].g_edd))(jax.random.split(jax.random.key(4), 400)).mean(0)
  exact = factor_stats(params, Task(cfg, CLASSES), batch, kfac.FactorSpec(layers=(1,)))[kfac.Block(1)].g_edd
  np.testing.assert_allclose(draws, exact, atol=0.15 * float(jnp.abs(exact).max()))


def test_bad_inputs():
  cfg, params, batch = _setup()
  with pytest.raises(ValueError, match="not MoE layers"):
    kfac.init(cfg, kfac.FactorSpec(layers=(0,)))
  with pytest.raises(ValueError, match="no shared experts"):
    kfac.init(B.tiny_config(shared_expert_size=0, shared_expert_gate=False), kfac.FactorSpec(layers=(1,), shared=True))
  with pytest.raises(ValueError, match="kind 'gate'"):
    kfac.as_block((1, "gate"))
  assert kfac.as_block("3.shared") == kfac.Block(3, "shared") and kfac.as_block(2) == kfac.Block(2, "routed")
  with pytest.raises(ValueError, match="labels='fisher'"):
    kfac.FactorSpec(layers=(1,), labels="fisher")
  spec = kfac.FactorSpec(layers=(1,))
  state = kfac.init(cfg, spec)
  bad = state._replace(stats={kfac.Block(1): state.stats[kfac.Block(1)]._replace(g_edd=state.stats[kfac.Block(1)].g_edd.at[0, 0, 0].set(jnp.nan))})
  with pytest.raises(FloatingPointError, match="MoE layer 1"):
    kfac.finalize(bad)
  # An expert that received no rows gets zero factors (its posterior is the prior), not NaN.
  fac = kfac.finalize(state)[kfac.Block(1)]
  assert np.isfinite(fac.a_eig_ef).all() and (fac.rows_e == 0).all()
  # traceable: the finiteness check needs concrete sums, so it is left out under jit / eval_shape (scale plans)
  shapes = jax.eval_shape(kfac.finalize, bad)[kfac.Block(1)]
  assert shapes.g_vec_edd.shape == state.stats[kfac.Block(1)].g_edd.shape


def test_lowrank_bad_and_empty():
  cfg, params, batch = _setup()
  spec = kfac.FactorSpec(layers=(1,), rank=4)
  state = kfac.init(cfg, spec)
  fac = kfac.finalize(state)[kfac.Block(1)]  # no rows yet: zero factors with orthonormal bases, not NaN
  assert np.isfinite(fac.a_vec_eff).all() and (fac.a_eig_ef == 0).all() and (fac.rows_e == 0).all()
  bad = state._replace(stats={kfac.Block(1): state.stats[kfac.Block(1)]._replace(g_edr=state.stats[kfac.Block(1)].g_edr.at[0, 0, 0].set(jnp.inf))})
  with pytest.raises(FloatingPointError, match="MoE layer 1"):
    kfac.finalize(bad)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    kfac.update(state, params, Task(cfg, CLASSES), batch, kfac.FactorSpec(layers=(1,), labels="mc", rank=4))


def test_select_layers():
  cfg = B.tiny_config(num_layers=9, moe_layers=(False,) + (True,) * 8)
  assert kfac.select_layers(cfg) == tuple(range(1, 9))
  quarters = [kfac.select_layers(cfg, f"Q{q}") for q in range(1, 5)]
  assert quarters == [(1, 2), (3, 4), (5, 6), (7, 8)]
  cfg7 = B.tiny_config(num_layers=7, moe_layers=(True,) * 7)
  assert sum((kfac.select_layers(cfg7, f"Q{q}") for q in range(1, 5)), ()) == tuple(range(7))
  assert kfac.select_layers(cfg, [8, 3, 3]) == (3, 8)
  with pytest.raises(ValueError, match=r"\[0\] not MoE layers"):
    kfac.select_layers(cfg, [0, 1])
  with pytest.raises(ValueError, match="'Q5'"):
    kfac.select_layers(cfg, "Q5")
  with pytest.raises(ValueError, match="fewer than four quarters"):
    kfac.select_layers(B.tiny_config(), "Q1")


def test_choice_mask_removes_missing_choices():
  """An example with 3 of 4 choices: its 4th logit gets no probability, no gradient, no curvature."""
  from bmoe_jax.laplace import posterior as P
  from bmoe_jax.laplace import predictive as PR

  cfg, params, batch = _setup()
  C4 = jnp.array([1, 2, 5, 9])
  spec = kfac.FactorSpec(layers=(1,), tokens="expand")
  full = factor_stats(params, Task(cfg, C4), batch, spec)[kfac.Block(1)]
  all_true = batch._replace(choice_mask_bc=jnp.ones((4, 4), bool))
  same = factor_stats(params, Task(cfg, C4), all_true, spec)[kfac.Block(1)]
  np.testing.assert_allclose(same.g_edd, full.g_edd, rtol=1e-6)
  mask = jnp.ones((4, 4), bool).at[0, 3].set(False)
  masked = batch._replace(choice_mask_bc=mask, labels_b=batch.labels_b.at[0].set(1))
  stats = factor_stats(params, Task(cfg, C4), masked, spec)[kfac.Block(1)]
  # example 0 alone, classes 0..2 only, equals the masked sum's share: compare through a 3-class run
  one = jax.tree.map(lambda x: x[:1], masked._replace(choice_mask_bc=None))
  three = factor_stats(params, Task(cfg, C4[:3]), one, spec)[kfac.Block(1)]
  rest = factor_stats(params, Task(cfg, C4), jax.tree.map(lambda x: x[1:], masked._replace(choice_mask_bc=None)), spec)[kfac.Block(1)]
  np.testing.assert_allclose(stats.g_edd, three.g_edd + rest.g_edd, rtol=1e-4, atol=1e-7)
  post = posterior_of(kfac.finalize(kfac_update(kfac.init(cfg, spec), params, Task(cfg, C4), masked, spec)), params,
                      num_sequences=4)
  pred = predict(post, params, Task(cfg, C4), masked, link="probit")
  assert float(pred.probs_bc[0, 3]) < 1e-30 and np.allclose(pred.probs_bc.sum(-1), 1, atol=1e-6)
  assert np.all(np.asarray(pred.f_cov_bcc[0, 3]) == 0) and np.abs(np.asarray(pred.f_cov_bcc[0, :3, :3])).max() > 0


@pytest.mark.parametrize("tokens", ["last", "expand", "reduce"])
def test_all_padding_rows_add_nothing(tokens):
  """A batch padded with empty rows (mask all zero) gives the factors, sequence count and log-likelihood of the
  batch without them; NaN weights are named by the lowest block they reach."""
  from bmoe_jax.finite import NonFiniteError

  cfg, params, batch = _setup()
  spec = kfac.FactorSpec(layers=(1,), tokens=tokens)
  pad = jax.tree.map(lambda x: jnp.zeros_like(x[:2]), batch)
  padded = jax.tree.map(lambda x, p: jnp.concatenate([x, p]), batch, pad)
  one = lambda b: kfac_update(kfac.init(cfg, spec), params, Task(cfg, CLASSES), b, spec)
  want, got = one(batch), one(padded)
  assert int(got.num_sequences) == int(want.num_sequences) == batch.tokens_bs.shape[0]
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # float noise of another batch size only
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(np.asarray(y)).max()))
  bad = jax.tree.map(lambda a: a, params)
  bad["layers"][1]["mlp"]["experts"]["w_up"] = bad["layers"][1]["mlp"]["experts"]["w_up"] * jnp.nan
  if tokens == "last":
    with pytest.raises(NonFiniteError, match=r"non-finite statistics after 1 batches, first in block 1.routed"):
      B.laplace.fit_factors(bad, Task(cfg, CLASSES), [batch], spec, progress=False)
