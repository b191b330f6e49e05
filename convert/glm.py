"""GLM-4.5 / 4.6 / 4.7 MoE (transformers' ``glm4_moe``): grouped-query attention with partial RoPE (the first
``partial_rotary_factor`` of each head rotated, rotate-half layout), q/k/v biases, an optional per-head q/k norm,
dense first layers, then MoE layers routed as DeepSeek-V3 (sigmoid scores, selection by scores plus
``e_score_correction_bias`` within the best ``topk_group`` of ``n_group`` groups, optional renormalisation,
``routed_scaling_factor``) with ``n_shared_experts`` ungated shared experts. The multi-token-prediction layers past
``num_hidden_layers`` are not part of the causal LM: their tensors are skipped."""

from __future__ import annotations

from convert.deepseek import SELECTION_BIAS, SHARED_EXPERTS
from convert.family_table import COMMON_RULES, Family, routed_rules


def _build_glm4_moe(g, common: dict) -> dict:
  first = int(g("first_k_dense_replace"))
  if first < 0:
    g.fail(f"first_k_dense_replace={first} must be >= 0")
  for name in ("n_group", "topk_group"):
    if int(g(name)) < 1:
      g.fail(f"{name}={g(name)} must be >= 1")
  f_moe = int(g("moe_intermediate_size"))
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=f_moe,
      num_experts=int(g("n_routed_experts")), num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=tuple(i >= first for i in range(common["num_layers"])),
      shared_expert_size=int(g("n_shared_experts")) * f_moe, shared_expert_gate=False,
      routed_scaling_factor=float(g("routed_scaling_factor")), router_scoring="sigmoid", topk_method="noaux_tc",
      n_group=int(g("n_group")), topk_group=int(g("topk_group")), router_bias=True,
      norm_topk_prob=bool(g("norm_topk_prob")), norm_topk_eps=1e-20,
      qkv_bias=bool(g("attention_bias")), attn_out_bias=False,  # o_proj has no bias
      qk_norm="head" if g("use_qk_norm") else "none")


GLM4_MOE = Family(
    name="glm4_moe", model_types=("glm4_moe",), architectures=("Glm4MoeForCausalLM",),
    handled=frozenset({"intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                       "num_experts_per_tok", "first_k_dense_replace", "routed_scaling_factor", "n_group",
                       "topk_group", "norm_topk_prob", "use_qk_norm", "attention_bias", "partial_rotary_factor"}),
    # num_nextn_predict_layers: the multi-token-prediction layers (skipped, as DeepSeek-V3's)
    ignored=frozenset({"num_nextn_predict_layers"}),
    # transformers' Glm4MoeConfig defaults (GLM-4.5-Air's sizes); partial_rotary_factor 0.5 as its __post_init__
    defaults=dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
                  num_attention_heads=96, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
                  moe_intermediate_size=1408, num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128,
                  routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1,
                  norm_topk_prob=True, use_qk_norm=False, partial_rotary_factor=0.5),
    build=_build_glm4_moe,
    rules=COMMON_RULES + routed_rules(r"mlp") + (SHARED_EXPERTS, SELECTION_BIAS),
    aliases=(("num_local_experts", "n_routed_experts"), ("num_mtp_layers", "num_nextn_predict_layers")),
    skip_layers_past_end=True)
