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
from tests.fixtures import exact_ggn_block, example

CLASSES = jnp.array([3, 7, 11, 19])
# Llama-4: chunked RoPE layer 0 with the weightless q/k norm, NoPE layer 1 with the attention temperature, a top-1
# sigmoid score scaling the expert's input, an ungated shared expert
LLAMA4 = {"num_experts_per_tok": 1, "router_scoring": "sigmoid", "router_on_input": True, "qk_norm": "l2",
          "rope_interleave": True, "rope_layers": (True, False), "attn_chunks": (2, 0), "nope_attn_scale": 0.5,
          "nope_floor_scale": 2.0, "shared_expert_gate": False}
# Qwen3-Next: Gated DeltaNet on the top layer (2 key heads serving 4 value heads), gated attention with the per-head
# q/k norm and partial RoPE below it, norms by 1 + w
QWEN3_NEXT = {"linear_layers": (False, True), "linear_k_heads": 2, "linear_v_heads": 4, "linear_k_dim": 4,
              "linear_v_dim": 6, "linear_conv_width": 3, "attn_output_gate": True, "norm_unit_offset": True,
              "qk_norm": "head", "rotary_dim": 4, "norm_topk_prob": True}
GPT_OSS = {"attn_sinks": True, "attn_windows": (3, 0), "router_logit_bias": True, "expert_bias": True,
           "swiglu_limit": 0.4, "norm_topk_prob": True, "attn_out_bias": True}


def _model(num_layers=2, num_experts=3, **kw):
  cfg = B.tiny_config(num_layers=num_layers, moe_layers=(True,) * num_layers, num_experts=num_experts, **kw)
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3, bias_std=0.3 if cfg.expert_bias else 0.0)


def _ggn_block(params, cfg, batch, block):
  return exact_ggn_block(params, Task(cfg, CLASSES), batch, block)


def _batch(b, s, cfg, seed=0):
  rng = np.random.RandomState(seed)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, s)))
  return Batch(tokens, jnp.ones((b, s), jnp.int32), jnp.full((b,), s - 1), jnp.asarray(rng.randint(0, 4, b)))


# the families' architecture variants: q/k norms (Qwen3-MoE, OLMoE), Granite's multipliers and logits scaling,
# DeepSeek-V3's sigmoid gates, DeepSeek-V2's latent attention, GLM-4.5's partial RoPE with grouped sigmoid routing
VARIANTS = {"plain": {}, "qk_head": {"qk_norm": "head"}, "qk_full": {"qk_norm": "full", "qkv_clip": 0.8},
            "granite": {"embedding_multiplier": 3.0, "attention_multiplier": 0.3, "residual_multiplier": 0.5,
                        "logits_scaling": 2.5, "norm_topk_prob": True},
            "sigmoid": {"router_scoring": "sigmoid", "router_bias": True, "norm_topk_prob": True,
                        "routed_scaling_factor": 2.5},
            # GLM-4.5: partial RoPE (4 of 8 dims), sigmoid scores with selection bias within the best of 2 groups
            # of 2 experts, ungated shared expert
            "glm": {"num_experts": 4, "rotary_dim": 4, "router_scoring": "sigmoid", "router_bias": True,
                    "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                    "norm_topk_eps": 1e-20, "routed_scaling_factor": 2.5, "shared_expert_gate": False},
            # GPT-OSS: attention sinks, a sliding window, an affine router, biased experts with the clamped SwiGLU
            "gpt_oss": GPT_OSS, "llama4": LLAMA4, "qwen3_next": QWEN3_NEXT,
            # Phi-3.5-MoE: LayerNorms with bias, longrope past its original context, the sparsemixer, the head's bias
            "phimoe": {"layer_norm": True, "lm_head_bias": True, "router_scoring": "sparsemixer",
                       "router_jitter_eps": 0.5, "rope_type": "longrope", "longrope_short_factor": (1.0, 1.5, 2.0, 3.0),
                       "longrope_long_factor": (2.0,) * 4,
                       "longrope_original_max_position": 3, "longrope_short_mscale": 1.1,
                       "longrope_long_mscale": 1.3},
            # DeepSeek-V2: MLA (q latent, interleaved yarn RoPE), group-limited greedy, ungated shared experts
            "mla": {"num_kv_heads": 4, "head_dim": 4, "q_lora_rank": 6, "kv_lora_rank": 8, "qk_nope_head_dim": 6,
                    "v_head_dim": 5, "rope_interleave": True, "rope_type": "yarn", "rope_factor": 4.0,
                    "yarn_original_max_position": 4, "yarn_mscale_all_dim": 0.7, "topk_method": "group_limited_greedy",
                    "n_group": 3, "topk_group": 2, "routed_scaling_factor": 1.5, "shared_expert_gate": False},
            # DeepSeek-V3.2: MLA with the lightning indexer keeping 2 of up to 5 keys per query
            "indexer": {"num_kv_heads": 4, "head_dim": 4, "q_lora_rank": 6, "kv_lora_rank": 8, "qk_nope_head_dim": 6,
                        "v_head_dim": 5, "rope_interleave": True, "index_topk": 2, "index_heads": 16,
                        "index_head_dim": 6, "router_scoring": "sigmoid", "router_bias": True,
                        "norm_topk_prob": True, "shared_expert_gate": False}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_last_token_top_layer_equals_exact_ggn_block(variant):
  """One sequence, answer position only, the last layer: A (x) G is the exact GGN block, for the routed
  experts and for the (sigmoid-gated) shared expert; for each family's architecture variant."""
  cfg, params = _model(**VARIANTS[variant])
  batch = _batch(1, 5, cfg)
  spec = FactorSpec(layers=(1,), labels="exact", tokens="last", shared=True)
  all_stats = jax.jit(factor_stats, static_argnums=(1, 3))(params, Task(cfg, CLASSES), batch, spec)
  for kind in ("routed", "shared"):
    stats = all_stats[Block(1, kind)]
    exact = _ggn_block(params, cfg, batch, Block(1, kind))
    assert exact.shape[0] == (cfg.num_experts if kind == "routed" else 1)
    for e in range(exact.shape[0]):
      np.testing.assert_allclose(np.kron(stats.a_eff[e], stats.g_edd[e]), exact[e], atol=1e-6, rtol=1e-4)
    assert int(stats.rows_e.sum()) == (cfg.num_experts_per_tok if kind == "routed" else 1)


def test_expand_single_token_equals_exact_ggn_every_layer():
  cfg, params = _model(num_layers=2)
  batch = _batch(1, 1, cfg, seed=1)
  stats = jax.jit(factor_stats, static_argnums=(1, 3))(params, Task(cfg, CLASSES), batch,
                                                        FactorSpec(layers=(0, 1), tokens="expand", shared=True))
  assert len(stats) == 4
  for blk, st in stats.items():
    exact = _ggn_block(params, cfg, batch, blk)
    for e in range(exact.shape[0]):
      np.testing.assert_allclose(np.kron(st.a_eff[e], st.g_edd[e]), exact[e], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def loop_case():
  """A 3-sequence batch (one padded token, answers at other positions) and, per example, brute force in one
  compiled program: the class probabilities, the taps and the gradient of each class's CE w.r.t. each
  expert's output (``grads[layer][kind][b, y]``)."""
  cfg, params = _model()
  batch = _batch(3, 4, cfg, seed=2)
  batch = batch._replace(mask_bs=batch.mask_bs.at[1, 3].set(0), answer_pos_b=jnp.array([3, 2, 3]))
  task = Task(cfg, CLASSES)

  def one(b):
    ex, zero = example(batch, b), B.zero_perturbations(cfg, 1, 4)
    logits, taps = task.logits_and_taps(params, ex, zero)
    grads = jax.jacrev(lambda z: -jax.nn.log_softmax(task.logits_and_taps(params, ex, z)[0][0]))(zero)
    return jax.nn.softmax(logits[0]), taps, grads

  per_b = jax.jit(lambda: jax.lax.map(one, jnp.arange(3)))()
  return cfg, params, batch, jax.tree.map(np.asarray, per_b)


def _loop_sums(a_rows, g_rows, weight, reduce):
  """sum of a a^T over rows and of weight[y] g g^T over classes and rows (``reduce``: one row per sequence, the
  mean of the inputs and the sum of the gradients)."""
  if reduce:
    a_rows, g_rows = [np.mean(a_rows, axis=0)], {y: [np.sum(g, axis=0)] for y, g in g_rows.items()}
  return (sum(np.outer(a, a) for a in a_rows),
          sum(weight[y] * np.outer(g, g) for y in g_rows for g in g_rows[y]))


@pytest.mark.parametrize("tokens", ["last", "expand", "reduce"])
@pytest.mark.parametrize("labels", ["exact", "empirical"])
def test_factor_sums_match_per_expert_loop(tokens, labels, loop_case):
  """vmapped per-expert sums = a Python loop over experts and examples of brute-force gradients (routed
  experts, and the shared expert: one row per real token, or per sequence for ``reduce``)."""
  cfg, params, batch, (probs, taps, grads) = loop_case
  spec = FactorSpec(layers=(0, 1), labels=labels, tokens=tokens, shared=True)
  stats = jax.jit(factor_stats, static_argnums=(1, 3))(params, Task(cfg, CLASSES), batch, spec)
  k, mask, answer, labels_b = cfg.num_experts_per_tok, *map(np.asarray, batch[1:4])
  for layer in (0, 1):
    a_ref = np.zeros((cfg.num_experts, 16, 16))
    g_ref = np.zeros((cfg.num_experts, cfg.hidden_size, cfg.hidden_size))
    a_sh = np.zeros((1, cfg.shared_expert_size, cfg.shared_expert_size))
    g_sh = np.zeros((1, cfg.hidden_size, cfg.hidden_size))
    tap, g_routed, g_shared = taps[layer], grads[layer]["routed"], grads[layer]["shared"]
    for b in range(3):
      ys = range(4) if labels == "exact" else [int(labels_b[b])]
      weight = {y: (probs[b, y] if labels == "exact" else 1.0) for y in ys}
      positions = [int(answer[b])] if tokens == "last" else [t for t in range(4) if mask[b, t]]
      for e in range(cfg.num_experts):
        slots = [(t, j) for t in positions for j in range(k) if tap.expert_bsk[b, 0, t, j] == e]
        if slots:
          a, g = _loop_sums([tap.down_in_bskf[b, 0, t, j] for t, j in slots],
                            {y: [g_routed[b, y, 0, t, j] for t, j in slots] for y in ys}, weight, tokens == "reduce")
          a_ref[e] += a
          g_ref[e] += g
      a, g = _loop_sums([tap.shared_in_bsf[b, 0, t] for t in positions],
                        {y: [g_shared[b, y, 0, t] for t in positions] for y in ys}, weight, tokens == "reduce")
      a_sh[0] += a
      g_sh[0] += g
    np.testing.assert_allclose(stats[Block(layer)].a_eff, a_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer)].g_edd, g_ref, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer, "shared")].a_eff, a_sh, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(stats[Block(layer, "shared")].g_edd, g_sh, atol=1e-6, rtol=1e-4)
    assert np.abs(g_sh).max() > 1e-8
