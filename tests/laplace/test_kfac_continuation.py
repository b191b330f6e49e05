"""K-FAC for continuation scoring (f_c = the choices' summed log-likelihoods, ``bmoe_jax.task``): exact
where one row carries the Jacobian, per-position rows that match a brute-force loop, and the measured
error of dropping the cross-terms between scoring positions with multi-token choices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.data import continuation as C
from bmoe_jax.laplace.kfac import Block, FactorSpec
from bmoe_jax.task import Task, output_mask
from tests.fixtures import exact_ggn_block, factor_stats


def _model():
  cfg = B.tiny_config(num_experts=3, moe_layers=(True, True))
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3)


def cont_batch(cfg, choice_lengths, ctx_len=4, seed=0, num_classes=4):
  """Packed rows of random tokens: per example a context of ``ctx_len`` tokens and choices of the given
  lengths, every choice token scored (weight 1)."""
  rng = np.random.RandomState(seed)
  rows = []
  for lengths in choice_lengths:
    tokens = list(rng.randint(0, cfg.vocab_size, ctx_len))
    segs, pos, scored = [0] * ctx_len, list(range(ctx_len)), []
    for c, n in enumerate(lengths):
      scored += [(len(tokens) + i, c, 1.0) for i in range(n)]
      tokens += list(rng.randint(0, cfg.vocab_size, n))
      segs += [c + 1] * n
      pos += list(range(ctx_len, ctx_len + n))
    rows.append(C.Row(tokens, segs, pos, scored, False))
  labels = [int(rng.randint(len(ls))) for ls in choice_lengths]
  return C.collate(rows, labels, [len(ls) for ls in choice_lengths], num_classes, pad_id=0, pad_to=4)


def _kfac_vs_exact(cfg, params, batch, kind="routed"):
  spec = FactorSpec(layers=(1,), labels="exact", tokens="last", shared=True)
  stats = factor_stats(params, Task(cfg), batch, spec)[Block(1, kind)]
  exact = np.asarray(exact_ggn_block(params, Task(cfg), batch, Block(1, kind)))
  # the K-FAC estimate of the summed GGN: the mean of a a^T over rows times the sum of g g^T (kfac.finalize)
  kfac = np.stack([np.kron(stats.a_eff[e] / max(int(stats.rows_e[e]), 1), stats.g_edd[e])
                   for e in range(exact.shape[0])])
  return kfac, exact


@pytest.mark.parametrize("kind", ["routed", "shared"])
def test_single_token_choices_top_layer_equal_exact_ggn(kind):
  """One question, one-token choices, the last layer: every choice is read at the context's last
  position, one row carries the whole Jacobian, and A (x) G is the exact GGN block."""
  cfg, params = _model()
  kfac, exact = _kfac_vs_exact(cfg, params, cont_batch(cfg, [[1, 1, 1, 1]]), kind)
  np.testing.assert_allclose(kfac, exact, atol=1e-6, rtol=1e-4)


def test_multi_token_choices_error_is_the_dropped_cross_terms():
  """Multi-token choices: K-FAC ``last`` keeps each scoring position as its own row and drops the
  cross-terms between positions. Measured: the relative Frobenius error per expert is neither zero nor
  total, and it vanishes when the choices shrink to one token (above)."""
  cfg, params = _model()
  kfac, exact = _kfac_vs_exact(cfg, params, cont_batch(cfg, [[2, 3, 1, 2]], seed=3))
  err = [np.linalg.norm(k - x) / np.linalg.norm(x) for k, x in zip(kfac, exact) if np.linalg.norm(x) > 0]
  print("K-FAC 'last' relative error per expert, multi-token continuation:", np.round(err, 3))
  assert err and all(0.01 < e < 1.0 for e in err)


def test_rows_are_the_scoring_positions():
  """Per-expert A and G sums of ``last`` = a loop over the positions whose logits enter f (context's
  last token and each choice token followed by another), with per-class gradients weighted by p_c;
  padded rows and masked choices contribute nothing."""
  cfg, params = _model()
  batch = cont_batch(cfg, [[2, 1, 3], [1, 2, 2, 1]], seed=1)
  task = Task(cfg)
  stats = factor_stats(params, task, batch, FactorSpec(layers=(0, 1), labels="exact", tokens="last"))
  out_bs = np.asarray(output_mask(batch))
  k = cfg.num_experts_per_tok
  fwd = jax.jit(lambda one, z: task.logits_and_taps(params, one, z))
  grad_of = jax.jit(lambda one, z, y: jax.grad(
      lambda z: -jax.nn.log_softmax(task.logits_and_taps(params, one, z)[0][0])[y])(z))
  for layer in (0, 1):
    a_ref = np.zeros((cfg.num_experts, 16, 16))
    g_ref = np.zeros((cfg.num_experts, cfg.hidden_size, cfg.hidden_size))
    for b in range(2):
      one = jax.tree.map(lambda x: x[b:b + 1], batch)
      zero = B.zero_perturbations(cfg, 1, batch.tokens_bs.shape[1])
      f, taps = jax.tree.map(np.asarray, fwd(one, zero))
      p = np.asarray(jax.nn.softmax(f[0]))
      num_c = len([[2, 1, 3], [1, 2, 2, 1]][b])
      tap = taps[layer]
      for y in range(num_c):
        grad = jax.tree.map(np.asarray, grad_of(one, zero, y))
        for t in np.flatnonzero(out_bs[b]):
          for j in range(k):
            e, g = int(tap.expert_bsk[0, t, j]), np.asarray(grad[layer]["routed"][0, t, j])
            g_ref[e] += p[y] * np.outer(g, g)
            if y == 0:
              a = np.asarray(tap.down_in_bskf[0, t, j])
              a_ref[e] += np.outer(a, a)
    np.testing.assert_allclose(stats[Block(layer)].a_eff, a_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer)].g_edd, g_ref, atol=1e-6, rtol=1e-4)
    assert int(stats[Block(layer)].rows_e.sum()) == out_bs.sum() * k
