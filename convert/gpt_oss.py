"""GPT-OSS (transformers' ``gpt_oss``): grouped-query attention with q/k/v/o biases and a learned sink logit per
head, alternating sliding-window and full layers (``layer_types``, ``sliding_window``), yarn RoPE (not truncated);
every layer an MoE whose router is affine (weight and bias; softmax over the top-k logits) and whose experts
carry biases and the clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``; gate and up interleaved in
``gate_up_proj``). The released checkpoints store the experts in MXFP4 (``convert.mxfp4``), dequantised exactly
on load."""

from __future__ import annotations

import numpy as np

from convert.family_table import COMMON_RULES, EXPERTS, LAYER, Family, Rule, windows


def _build_gpt_oss(g, common: dict) -> dict:
  n, k = common["num_layers"], int(g("num_experts_per_tok"))
  legacy = g("experts_per_token")  # the original release's name, written beside the transformers one
  if legacy is not None and int(legacy) != k:
    g.fail(f"experts_per_token={legacy} disagrees with num_experts_per_tok={k}")
  limit = float(g("swiglu_limit"))
  if not limit > 0:
    g.fail(f"swiglu_limit={limit!r}: expected a positive clamp (GPT-OSS's experts always clamp)")
  f = int(g("intermediate_size"))
  types = g("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=f, moe_intermediate_size=f, num_experts=int(g("num_local_experts")),
      num_experts_per_tok=k, moe_layers=(True,) * n, norm_topk_prob=True,  # softmax over the top-k logits
      router_logit_bias=True, expert_bias=True, swiglu_limit=limit, swiglu_alpha=float(g("swiglu_alpha")),
      attn_sinks=True, qkv_bias=bias, attn_out_bias=bias,
      attn_windows=windows(g, n, types, g("sliding_window")))


GPT_OSS = Family(
    name="gpt_oss", model_types=("gpt_oss",), architectures=("GptOssForCausalLM",),
    handled=frozenset({"intermediate_size", "num_local_experts", "num_experts_per_tok", "experts_per_token",
                       "swiglu_limit", "swiglu_alpha", "attention_bias", "layer_types", "sliding_window"}),
    # initial_context_length: the release's note of the pre-training context (yarn's
    # original_max_position_embeddings states it for RoPE)
    ignored=frozenset({"initial_context_length"}),
    # transformers' GptOssConfig defaults (gpt-oss-120b's sizes; yarn with theta 150000 when RoPE is unstated)
    defaults=dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=64, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=150000.0, rope_parameters=None,
                  rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 4096},
                  num_local_experts=128, num_experts_per_tok=4, experts_per_token=None, swiglu_limit=7.0,
                  swiglu_alpha=1.702, attention_bias=True, layer_types=None, sliding_window=128),
    build=_build_gpt_oss,
    rules=COMMON_RULES + (
        Rule(LAYER + r"self_attn\.sinks", "layers/{layer}/attn/sinks", "copy"),
        Rule(LAYER + r"mlp\.router\.weight", "layers/{layer}/mlp/router/kernel", "linear"),
        Rule(LAYER + r"mlp\.router\.bias", "layers/{layer}/mlp/router/logit_bias", "copy"),
        Rule(LAYER + r"mlp\.experts\.gate_up_proj", (EXPERTS + "w_gate", EXPERTS + "w_up"), "interleaved"),
        Rule(LAYER + r"mlp\.experts\.gate_up_proj_bias", (EXPERTS + "b_gate", EXPERTS + "b_up"), "interleaved"),
        Rule(LAYER + r"mlp\.experts\.down_proj", EXPERTS + "w_down", "tensor"),
        Rule(LAYER + r"mlp\.experts\.down_proj_bias", EXPERTS + "b_down", "tensor"),
    ),
    aliases=(("num_experts", "num_local_experts"),))


def hf_config(cfg, need) -> dict:
  """The ``gpt_oss`` config.json of ``cfg`` (the inverse of the gate above; ``need(cond, msg)`` refuses what has
  no equivalent), without the model's common fields (``export._common`` adds them)."""
  need(all(cfg.moe_layers) and not cfg.shared_expert_size, "every GPT-OSS layer is MoE, without shared experts")
  need(cfg.attn_sinks and cfg.expert_bias and cfg.router_logit_bias and cfg.swiglu_limit > 0,
       "GPT-OSS has attention sinks, expert biases, an affine router and the clamped SwiGLU")
  need(cfg.norm_topk_prob and cfg.norm_topk_eps == 0.0 and cfg.router_scoring == "softmax",
       "GPT-OSS's router: softmax over the top-k logits")
  need(cfg.qkv_bias == cfg.attn_out_bias and cfg.qk_norm == "none", "attention bias on q, k, v, o together, no q/k norm")
  sizes = set(cfg.attn_windows or (0,)) - {0}
  need(len(sizes) <= 1, f"sliding windows differ across layers: {sorted(sizes)}")
  types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.num_layers)]
  return dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", intermediate_size=cfg.moe_intermediate_size,
              num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha, attention_bias=cfg.qkv_bias,
              layer_types=types, sliding_window=max(sizes, default=None))


def hf_expert_tensors(cfg, experts_of) -> dict:
  """The fused expert and router tensors transformers' ``GptOssForCausalLM`` holds, from ``experts_of(layer)``
  (the layer's ``experts`` dict of numpy arrays): gate and up interleaved along the last axis."""
  out = {}
  for i in cfg.moe_layer_ids:
    w, pre = experts_of(i), f"model.layers.{i}.mlp.experts."
    for name, gate, up in (("gate_up_proj", w["w_gate"], w["w_up"]), ("gate_up_proj_bias", w["b_gate"], w["b_up"])):
      fused = np.empty(gate.shape[:-1] + (2 * gate.shape[-1],), gate.dtype)
      fused[..., 0::2], fused[..., 1::2] = gate, up
      out[pre + name] = fused
    out[pre + "down_proj"], out[pre + "down_proj_bias"] = w["w_down"], w["b_down"]
  return out
