"""K-FAC factors against brute force on tiny models: the exact GGN block (materialised Jacobian) where
K-FAC must be exact, and a per-expert Python loop over per-example gradients elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.task import Task
from bmoe_jax.laplace.kfac import Block, FactorSpec, factor_stats
from bmoe_jax.task import Batch
from tests.fixtures import exact_ggn_block

CLASSES = jnp.array([3, 7, 11, 19])


def _model(num_layers=2, **kw):
  cfg = B.tiny_config(num_layers=num_layers, moe_layers=(True,) * num_layers, num_experts=3, **kw)
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3)


def _ggn_block(params, cfg, batch, block):
  return exact_ggn_block(params, Task(cfg, CLASSES), batch, block)


def _batch(b, s, cfg, seed=0):
  rng = np.random.RandomState(seed)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, s)))
  return Batch(tokens, jnp.ones((b, s), jnp.int32), jnp.full((b,), s - 1), jnp.asarray(rng.randint(0, 4, b)))


# the families' architecture variants: q/k norms (Qwen3-MoE, OLMoE), Granite's multipliers and logits scaling,
# DeepSeek-V3's sigmoid gates, DeepSeek-V2's latent attention
VARIANTS = {"plain": {}, "qk_head": {"qk_norm": "head"}, "qk_full": {"qk_norm": "full", "qkv_clip": 0.8},
            "granite": {"embedding_multiplier": 3.0, "attention_multiplier": 0.3, "residual_multiplier": 0.5,
                        "logits_scaling": 2.5, "norm_topk_prob": True},
            "sigmoid": {"router_scoring": "sigmoid", "router_bias": True, "norm_topk_prob": True,
                        "routed_scaling_factor": 2.5},
            # DeepSeek-V2: MLA (q latent, interleaved yarn RoPE), group-limited greedy, ungated shared experts
            "mla": {"num_kv_heads": 4, "head_dim": 4, "q_lora_rank": 6, "kv_lora_rank": 8, "qk_nope_head_dim": 6,
                    "v_head_dim": 5, "rope_interleave": True, "rope_type": "yarn", "rope_factor": 4.0,
                    "yarn_original_max_position": 4, "yarn_mscale_all_dim": 0.7, "topk_method": "group_limited_greedy",
                    "n_group": 3, "topk_group": 2, "routed_scaling_factor": 1.5, "shared_expert_gate": False}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["routed", "shared"])
def test_last_token_top_layer_equals_exact_ggn_block(kind, variant):
  """One sequence, answer position only, the last layer: A (x) G is the exact GGN block, for the routed
  experts and for the (sigmoid-gated) shared expert; for each family's architecture variant."""
  cfg, params = _model(**VARIANTS[variant])
  batch = _batch(1, 5, cfg)
  spec = FactorSpec(layers=(1,), labels="exact", tokens="last", shared=True)
  stats = factor_stats(params, Task(cfg, CLASSES), batch, spec)[Block(1, kind)]
  exact = _ggn_block(params, cfg, batch, Block(1, kind))
  assert exact.shape[0] == (cfg.num_experts if kind == "routed" else 1)
  for e in range(exact.shape[0]):
    np.testing.assert_allclose(np.kron(stats.a_eff[e], stats.g_edd[e]), exact[e], atol=1e-6, rtol=1e-4)
  assert int(stats.rows_e.sum()) == (cfg.num_experts_per_tok if kind == "routed" else 1)


def test_expand_single_token_equals_exact_ggn_every_layer():
  cfg, params = _model(num_layers=2)
  batch = _batch(1, 1, cfg, seed=1)
  stats = factor_stats(params, Task(cfg, CLASSES), batch, FactorSpec(layers=(0, 1), tokens="expand", shared=True))
  assert len(stats) == 4
  for blk, st in stats.items():
    exact = _ggn_block(params, cfg, batch, blk)
    for e in range(exact.shape[0]):
      np.testing.assert_allclose(np.kron(st.a_eff[e], st.g_edd[e]), exact[e], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("tokens", ["last", "expand", "reduce"])
@pytest.mark.parametrize("labels", ["exact", "empirical"])
def test_factor_sums_match_per_expert_loop(tokens, labels):
  """vmapped per-expert sums = a Python loop over experts and examples of brute-force gradients (routed
  experts, and the shared expert: one row per real token, or per sequence for ``reduce``)."""
  cfg, params = _model()
  batch = _batch(3, 4, cfg, seed=2)
  batch = batch._replace(mask_bs=batch.mask_bs.at[1, 3].set(0), answer_pos_b=jnp.array([3, 2, 3]))
  spec = FactorSpec(layers=(0, 1), labels=labels, tokens=tokens, shared=True)
  stats = jax.jit(factor_stats, static_argnums=(1, 3))(params, Task(cfg, CLASSES), batch, spec)
  k = cfg.num_experts_per_tok
  for layer in (0, 1):
    a_ref = np.zeros((cfg.num_experts, 16, 16))
    g_ref = np.zeros((cfg.num_experts, cfg.hidden_size, cfg.hidden_size))
    a_sh = np.zeros((1, cfg.shared_expert_size, cfg.shared_expert_size))
    g_sh = np.zeros((1, cfg.hidden_size, cfg.hidden_size))
    for b in range(3):
      one = jax.tree.map(lambda x: x[b:b + 1], batch)
      zero = B.zero_perturbations(cfg, 1, 4)
      logits, taps = Task(cfg, CLASSES).logits_and_taps(params, one, zero)
      p = np.asarray(jax.nn.softmax(logits[0]))
      ys = range(4) if labels == "exact" else [int(one.labels_b[0])]
      grads = {y: jax.grad(lambda z: -jax.nn.log_softmax(Task(cfg, CLASSES).logits_and_taps(params, one, z)[0][0])[y])(zero)
               for y in ys}
      weight = {y: (p[y] if labels == "exact" else 1.0) for y in ys}
      positions = [int(one.answer_pos_b[0])] if tokens == "last" else [t for t in range(4) if one.mask_bs[0, t]]
      tap = taps[layer]
      for e in range(cfg.num_experts):
        slots = [(t, j) for t in positions for j in range(k) if int(tap.expert_bsk[0, t, j]) == e]
        if not slots:
          continue
        a_rows = [np.asarray(tap.down_in_bskf[0, t, j]) for t, j in slots]
        g_rows = {y: [np.asarray(grads[y][layer]["routed"][0, t, j]) for t, j in slots] for y in ys}
        if tokens == "reduce":
          a_rows = [np.mean(a_rows, axis=0)]
          g_rows = {y: [np.sum(g_rows[y], axis=0)] for y in ys}
        a_ref[e] += sum(np.outer(a, a) for a in a_rows)
        g_ref[e] += sum(weight[y] * np.outer(g, g) for y in ys for g in g_rows[y])
      a_rows = [np.asarray(tap.shared_in_bsf[0, t]) for t in positions]
      g_rows = {y: [np.asarray(grads[y][layer]["shared"][0, t]) for t in positions] for y in ys}
      if tokens == "reduce":
        a_rows = [np.mean(a_rows, axis=0)]
        g_rows = {y: [np.sum(g_rows[y], axis=0)] for y in ys}
      a_sh[0] += sum(np.outer(a, a) for a in a_rows)
      g_sh[0] += sum(weight[y] * np.outer(g, g) for y in ys for g in g_rows[y])
    np.testing.assert_allclose(stats[Block(layer)].a_eff, a_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer)].g_edd, g_ref, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer, "shared")].a_eff, a_sh, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer, "shared")].g_edd, g_sh, atol=1e-6, rtol=1e-4)
    assert np.abs(g_sh).max() > 1e-8
