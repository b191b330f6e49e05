"""The config half of Flax -> HF export: each family's ``config.json`` from our ``MoEConfig`` (the inverse of its
config gate), refusing what has no exact equivalent in that family (``hf_config``); ``convert.export`` writes the
tensors."""

from __future__ import annotations

from typing import Any

from bmoe_jax.config import MoEConfig
from convert import gpt_oss as GO
from convert import llama4 as L4
from convert import phimoe as PM
from convert import qwen3_next as QN
from convert.errors import ConversionError


def _need(cond: bool, family: str, msg: str):
  if not cond:
    raise ConversionError(f"cannot export as {family}: {msg}")


def _common(cfg: MoEConfig, v1_rope: bool) -> dict[str, Any]:
  out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
             hidden_act=cfg.hidden_act, rms_norm_eps=cfg.rms_norm_eps,
             tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
             torch_dtype="float32")
  scaling = _rope_scaling(cfg)
  if v1_rope:
    out.update(rope_theta=cfg.rope_theta, rope_scaling=scaling)
  else:
    out["rope_parameters"] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **(scaling or {})}
    if cfg.rotary_dim:
      out["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
  return out


def _rope_scaling(cfg: MoEConfig) -> dict[str, Any] | None:
  if cfg.rope_type == "default":
    return None
  out = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
  if cfg.rope_type == "llama3":
    out.update(low_freq_factor=cfg.llama3_low_freq_factor, high_freq_factor=cfg.llama3_high_freq_factor,
               original_max_position_embeddings=cfg.llama3_original_max_position)
  if cfg.rope_type == "longrope":
    return {"rope_type": "longrope", "short_factor": list(cfg.longrope_short_factor),
            "long_factor": list(cfg.longrope_long_factor), "short_mscale": cfg.longrope_short_mscale,
            "long_mscale": cfg.longrope_long_mscale, "original_max_position_embeddings": cfg.longrope_original_max_position}
  if cfg.rope_type == "yarn":
    out.update(original_max_position_embeddings=cfg.yarn_original_max_position, beta_fast=cfg.yarn_beta_fast,
               beta_slow=cfg.yarn_beta_slow, truncate=cfg.yarn_truncate)
    out.update({k: v for k, v in (("mscale", cfg.yarn_mscale), ("mscale_all_dim", cfg.yarn_mscale_all_dim),
                                  ("attention_factor", cfg.yarn_attention_factor)) if v})
  return out


def _uniform_window(cfg: MoEConfig, family: str) -> int:
  wins = set(cfg.attn_windows or (0,))
  _need(len(wins - {0}) <= 1, family, f"sliding windows differ across layers: {sorted(wins)}")
  return max(wins)


def _qwen2_moe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  _need(cfg.shared_expert_gate or not cfg.shared_expert_size, family,
        "Qwen2-MoE's shared expert is gated (a zero-width one stands for none)")
  _need(cfg.norm_topk_eps == 0.0 and not cfg.attn_out_bias, family, "norm_topk_eps / attn_out_bias not representable")
  w = _uniform_window(cfg, family)
  types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.num_layers)]
  return dict(_common(cfg, False), architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
              intermediate_size=cfg.intermediate_size or cfg.moe_intermediate_size,
              moe_intermediate_size=cfg.moe_intermediate_size,
              shared_expert_intermediate_size=cfg.shared_expert_size, num_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
              decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m],
              qkv_bias=cfg.qkv_bias, use_sliding_window=bool(w), sliding_window=w or None,
              max_window_layers=cfg.num_layers, layer_types=types)


def _qwen3_moe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  _need(not cfg.shared_expert_size and cfg.norm_topk_eps == 0.0, family, "no shared expert, no norm_topk_eps")
  _need(cfg.qkv_bias == cfg.attn_out_bias, family, "attention bias on q, k, v, o together")
  w = _uniform_window(cfg, family)
  _need(all(cfg.window(i) == w for i in range(cfg.num_layers)), family, "a sliding window on every layer or none")
  return dict(_common(cfg, False), architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
              intermediate_size=cfg.intermediate_size or cfg.moe_intermediate_size,
              moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
              decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m],
              attention_bias=cfg.qkv_bias, use_sliding_window=bool(w), sliding_window=w or None)


def _olmoe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  _need(all(cfg.moe_layers) and not cfg.shared_expert_size and cfg.norm_topk_eps == 0.0, family,
        "every OLMoE layer is MoE, without shared experts")
  _need(cfg.qkv_bias == cfg.attn_out_bias and not cfg.attn_windows, family,
        "attention bias on q, k, v, o together; no sliding window")
  _need(cfg.head_dim * cfg.num_heads == cfg.hidden_size, family, "head_dim x heads = hidden_size")
  return dict(_common(cfg, False), architectures=["OlmoeForCausalLM"], model_type="olmoe",
              intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
              attention_bias=cfg.qkv_bias, clip_qkv=cfg.qkv_clip or None)


def _mixtral(cfg: MoEConfig, family: str) -> dict[str, Any]:
  _need(all(cfg.moe_layers), family, "every Mixtral layer is MoE")
  _need(cfg.norm_topk_prob and not cfg.shared_expert_size and not cfg.qkv_bias and not cfg.attn_out_bias,
        family, "Mixtral renormalises top-k and has no shared expert or attention bias")
  _need(all(cfg.window(i) == cfg.window(0) for i in range(cfg.num_layers)), family, "per-layer windows")
  return dict(_common(cfg, False), architectures=["MixtralForCausalLM"], model_type="mixtral",
              intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok, sliding_window=cfg.window(0) or None)


def _deepseek_v1(cfg: MoEConfig, family: str) -> dict[str, Any]:
  f = cfg.moe_intermediate_size
  _need(not cfg.shared_expert_gate and cfg.shared_expert_size % f == 0, family,
        "shared experts are n_shared_experts x moe_intermediate_size, ungated")
  _need(cfg.qkv_bias == cfg.attn_out_bias and not cfg.attn_windows, family, "attention bias on q,k,v,o together; "
        "no sliding window")
  _need(any(cfg.moe_layers), family, "no MoE layer")
  first = cfg.moe_layers.index(True)
  freq = next((q for q in range(1, cfg.num_layers + 1) if all(
      m == (i >= first and i % q == 0) for i, m in enumerate(cfg.moe_layers))), None)
  _need(freq is not None, family, f"layer pattern {cfg.moe_layers} is not first_k_dense_replace + moe_layer_freq")
  return dict(_common(cfg, True), architectures=["DeepseekForCausalLM"], model_type="deepseek",
              intermediate_size=cfg.intermediate_size, moe_intermediate_size=f,
              n_shared_experts=cfg.shared_expert_size // f or None, n_routed_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=first, moe_layer_freq=freq,
              norm_topk_prob=cfg.norm_topk_prob, scoring_func="softmax", attention_bias=cfg.qkv_bias)


def _granite(cfg: MoEConfig, family: str) -> dict[str, Any]:
  _need(all(cfg.moe_layers) and cfg.norm_topk_prob and cfg.norm_topk_eps == 0.0, family,
        "every Granite layer is MoE with renormalised top-k gates")
  _need(not cfg.shared_expert_gate and (family == "granitemoeshared" or not cfg.shared_expert_size), family,
        "an ungated shared MLP (granitemoeshared only)")
  _need(cfg.qkv_bias == cfg.attn_out_bias and not cfg.attn_windows, family,
        "attention bias on q, k, v, o together; no sliding window")
  arch = "GraniteMoeSharedForCausalLM" if family == "granitemoeshared" else "GraniteMoeForCausalLM"
  out = dict(_common(cfg, False), architectures=[arch], model_type=family,
             intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.num_experts,
             num_experts_per_tok=cfg.num_experts_per_tok, attention_bias=cfg.qkv_bias,
             embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
             attention_multiplier=cfg.attention_multiplier or cfg.head_dim ** -0.5,
             logits_scaling=cfg.logits_scaling)
  if family == "granitemoeshared":
    out["shared_intermediate_size"] = cfg.shared_expert_size
  return out


def _dense_then_moe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  """DeepSeek-V2 / V3 and GLM-4.5's MoE layout: first_k_dense_replace dense layers, then MoE layers with
  n_shared_experts ungated shared experts of moe_intermediate_size."""
  f = cfg.moe_intermediate_size
  _need(not cfg.shared_expert_gate and cfg.shared_expert_size % f == 0, family,
        "shared experts are n_shared_experts x moe_intermediate_size, ungated")
  first = cfg.moe_layers.index(True) if any(cfg.moe_layers) else cfg.num_layers
  _need(all(cfg.moe_layers[first:]), family, f"layer pattern {cfg.moe_layers} is not first_k_dense_replace dense "
        "layers, then MoE")
  return dict(intermediate_size=cfg.intermediate_size or f, moe_intermediate_size=f,
              n_shared_experts=cfg.shared_expert_size // f, n_routed_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=first,
              routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group)


def _v3_routing(cfg: MoEConfig, family: str) -> None:
  _need(cfg.router_scoring == "sigmoid" and cfg.topk_method == "noaux_tc" and cfg.router_bias, family,
        "sigmoid scores, noaux_tc group selection with its selection bias")
  _need(not cfg.norm_topk_prob or cfg.norm_topk_eps == 1e-20, family, "renormalisation with eps 1e-20")


def _glm4_moe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  """GLM-4.5: grouped-query attention with partial RoPE, q/k/v biases (o has none), DeepSeek-V3's routing."""
  _need(not cfg.attn_out_bias and not cfg.attn_windows, family, "biases on q, k, v only; no sliding window")
  _v3_routing(cfg, family)
  return dict(_common(cfg, False), **_dense_then_moe(cfg, family), architectures=["Glm4MoeForCausalLM"],
              model_type=family, norm_topk_prob=cfg.norm_topk_prob, use_qk_norm=cfg.qk_norm == "head",
              attention_bias=cfg.qkv_bias,
              # always stated: without it, transformers' GLM assumes 0.5
              partial_rotary_factor=(cfg.rotary_dim or cfg.head_dim) / cfg.head_dim)


def _minimax_m2(cfg: MoEConfig, family: str) -> dict[str, Any]:
  """MiniMax-M2: every layer MoE, full-width q/k norms, partial RoPE, sigmoid routing with a selection bias."""
  _need(all(cfg.moe_layers) and not cfg.shared_expert_size, family, "every layer MoE, no shared expert")
  _need(cfg.router_scoring == "sigmoid" and cfg.router_bias and cfg.topk_method == "greedy" and cfg.norm_topk_prob
        and cfg.norm_topk_eps == 0.0, family, "sigmoid scores with a selection bias over all experts, renormalised")
  _need(not (cfg.qkv_bias or cfg.attn_out_bias or cfg.attn_windows), family, "no attention bias or sliding window")
  return dict(_common(cfg, False), architectures=["MiniMaxM2ForCausalLM"], model_type=family,
              intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_tok)


def _ernie4_5_moe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  """ERNIE-4.5-MoE: RoPE on interleaved pairs, MoE every k-th layer within a range, softmax routing with a selection
  bias (renormalised), ungated shared experts."""
  f = cfg.moe_intermediate_size
  _need(not cfg.shared_expert_gate and cfg.shared_expert_size % f == 0 and any(cfg.moe_layers), family,
        "MoE layers; shared experts are moe_num_shared_experts x moe_intermediate_size, ungated")
  _need(cfg.router_scoring == "softmax" and cfg.router_bias and cfg.topk_method == "greedy" and cfg.norm_topk_prob
        and cfg.norm_topk_eps == 0.0, family, "softmax scores with a selection bias over all experts, renormalised")
  _need(cfg.rope_interleave and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.attn_windows), family,
        "RoPE on interleaved pairs; no attention bias or sliding window")
  ids = cfg.moe_layer_ids
  step = next((q for q in range(1, cfg.num_layers + 1) if all(
      m == ((i + 1) % q == 0 and ids[0] <= i <= ids[-1]) for i, m in enumerate(cfg.moe_layers))), None)
  _need(step is not None, family, f"layer pattern {cfg.moe_layers} is not every moe_layer_interval-th layer of a range")
  return dict(_common(cfg, False), architectures=["Ernie4_5_MoeForCausalLM"], model_type=family,
              intermediate_size=cfg.intermediate_size or f, moe_intermediate_size=f, moe_num_experts=cfg.num_experts,
              moe_k=cfg.num_experts_per_tok, moe_num_shared_experts=cfg.shared_expert_size // f,
              moe_layer_start_index=ids[0], moe_layer_end_index=ids[-1], moe_layer_interval=step, use_bias=False)


def _deepseek(cfg: MoEConfig, family: str) -> dict[str, Any]:
  """DeepSeek-V2 / V3: MLA, dense layers before first_k_dense_replace, then MoE with ungated shared experts."""
  _need(cfg.mla, family, "multi-head latent attention (kv_lora_rank > 0)")
  _need(cfg.qkv_bias == cfg.attn_out_bias and not cfg.attn_windows, family,
        "attention bias on the down-projections and o together; no sliding window")
  out = dict(_common(cfg, False), **_dense_then_moe(cfg, family), model_type=family,
             q_lora_rank=cfg.q_lora_rank or None,
             kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.head_dim,
             v_head_dim=cfg.v_head_dim, attention_bias=cfg.qkv_bias)
  if family == "deepseek_v2":
    _need(cfg.router_scoring == "softmax" and not cfg.norm_topk_prob and not cfg.router_bias and cfg.rope_interleave,
          family, "softmax scores without renormalisation or selection bias; interleaved RoPE")
    _need(cfg.topk_method in ("greedy", "group_limited_greedy"), family, f"topk_method={cfg.topk_method!r}")
    return dict(out, architectures=["DeepseekV2ForCausalLM"], topk_method=cfg.topk_method, norm_topk_prob=False,
                scoring_func="softmax")
  _v3_routing(cfg, family)
  out.update(norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave, topk_method="noaux_tc",
             scoring_func="sigmoid", architectures=["DeepseekV3ForCausalLM"])
  if family == "deepseek_v32":
    _need(cfg.index_topk and cfg.q_lora_rank and cfg.rope_interleave, family,
          "the lightning indexer over a q latent, RoPE on interleaved pairs")
    out.update(architectures=["DeepseekV32ForCausalLM"], index_topk=cfg.index_topk, index_n_heads=cfg.index_heads,
               index_head_dim=cfg.index_head_dim)
  return out


def _qwen_hybrid(cfg: MoEConfig, family: str) -> dict[str, Any]:
  return dict(_common(cfg, False), **QN.hf_config(cfg, lambda cond, msg: _need(cond, family, msg), family))


def _phimoe(cfg: MoEConfig, family: str) -> dict[str, Any]:
  return dict(_common(cfg, False), **PM.hf_config(cfg, lambda cond, msg: _need(cond, family, msg)))


def _gpt_oss(cfg: MoEConfig, family: str) -> dict[str, Any]:
  return dict(_common(cfg, False), **GO.hf_config(cfg, lambda cond, msg: _need(cond, family, msg)))


def _llama4_text(cfg: MoEConfig, family: str) -> dict[str, Any]:
  return dict(_common(cfg, False), **L4.hf_config(cfg, lambda cond, msg: _need(cond, family, msg)))


# family -> (its HF config from ours, the q/k norms it can have)
_HF = {"qwen2_moe": (_qwen2_moe, ("none",)), "qwen3_moe": (_qwen3_moe, ("head",)), "olmoe": (_olmoe, ("full",)),
       "mixtral": (_mixtral, ("none",)), "deepseek_v1": (_deepseek_v1, ("none",)),
       "granitemoe": (_granite, ("none",)), "granitemoeshared": (_granite, ("none",)),
       "deepseek_v2": (_deepseek, ("none",)), "deepseek_v3": (_deepseek, ("none",)),
       "glm4_moe": (_glm4_moe, ("none", "head")), "minimax_m2": (_minimax_m2, ("full",)),
       "ernie4_5_moe": (_ernie4_5_moe, ("none",)), "gpt_oss": (_gpt_oss, ("none",)),
       "llama4_text": (_llama4_text, ("none", "l2")), "deepseek_v32": (_deepseek, ("none",)),
       "phimoe": (_phimoe, ("none",)), "qwen3_next": (_qwen_hybrid, ("head",)),
       "qwen3_5_moe_text": (_qwen_hybrid, ("head",))}
DEEPSEEK = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
SCALED_GROUPED = DEEPSEEK + ("glm4_moe",)  # routed_scaling_factor, group selection
SIGMOID = SCALED_GROUPED + ("minimax_m2",)  # sigmoid scores
SELECTION_BIAS = SIGMOID + ("ernie4_5_moe",)  # a per-expert selection bias
INTERLEAVED_ROPE = DEEPSEEK + ("ernie4_5_moe", "llama4_text")
PARTIAL_ROPE = ("glm4_moe", "minimax_m2", "qwen3_next", "qwen3_5_moe_text")


def hf_config(cfg: MoEConfig, family: str) -> dict[str, Any]:
  """Inverse of the family's config gate; errors where ``cfg`` has no exact HF equivalent."""
  if family not in _HF:
    raise ConversionError(f"cannot export: unknown family {family!r} (known: {sorted(_HF)})")
  build, qk_norms = _HF[family]
  deepseek, grouped = family in DEEPSEEK, family in SCALED_GROUPED
  _need(grouped or cfg.routed_scaling_factor == 1.0, family, "routed_scaling_factor != 1")
  _need(deepseek or not cfg.mla, family, "multi-head latent attention (DeepSeek-V2/V3 only)")
  _need(family in INTERLEAVED_ROPE or not cfg.rope_interleave, family, "RoPE on interleaved pairs")
  _need(family in PARTIAL_ROPE or not cfg.rotary_dim, family, "partial RoPE (rotary_dim; GLM-4.5, MiniMax-M2 only)")
  granite = family.startswith("granitemoe")
  _need(granite or (cfg.embedding_multiplier, cfg.attention_multiplier, cfg.residual_multiplier,
                    cfg.logits_scaling) == (1.0, 0.0, 1.0, 1.0), family, "Granite's multipliers / logits_scaling")
  _need(family in SIGMOID + ("llama4_text",) or cfg.router_scoring == "softmax"
        or (family, cfg.router_scoring) == ("phimoe", "sparsemixer"), family,
        f"router_scoring={cfg.router_scoring!r}")
  _need(family in SELECTION_BIAS or not cfg.router_bias, family, "a per-expert selection bias")
  _need(grouped or cfg.topk_method == "greedy", family, "group-limited selection (DeepSeek-V2/V3, GLM-4.5 only)")
  _need(cfg.qk_norm in qk_norms, family, f"qk_norm={cfg.qk_norm!r}, the family has {' or '.join(qk_norms)}")
  _need(cfg.qkv_clip == 0.0 or family == "olmoe", family, "qkv_clip (only OLMoE clips q, k, v)")
  _need(family == "gpt_oss" or not (cfg.attn_sinks or cfg.expert_bias or cfg.router_logit_bias or cfg.swiglu_limit),
        family, "attention sinks, expert biases, an affine router or the clamped SwiGLU (GPT-OSS only)")
  _need(family == "llama4_text" or not (cfg.router_on_input or cfg.rope_layers or cfg.attn_chunks
                                        or cfg.qk_norm == "l2"),
        family, "an input-side router score, NoPE or chunked layers or the weightless q/k norm (Llama-4 only)")
  _need(family == "deepseek_v32" or not cfg.index_topk, family, "the lightning indexer (DeepSeek-V3.2 only)")
  _need(family == "phimoe" or not (cfg.layer_norm or cfg.lm_head_bias or cfg.rope_type == "longrope"), family,
        "LayerNorms, an LM head bias or longrope RoPE (Phi-3.5-MoE only)")
  _need(family in ("qwen3_next", "qwen3_5_moe_text") or not (
      cfg.linear_on_any or cfg.attn_output_gate or cfg.norm_unit_offset), family,
        "linear attention, the attention's output gate or norms by 1 + w (Qwen3-Next / Qwen3.5 only)")
  return build(cfg, family)
