"""ERNIE-4.5-MoE (transformers' ``ernie4_5_moe``): grouped-query attention with RoPE on interleaved pairs, MoE
layers every ``moe_layer_interval`` from ``moe_layer_start_index`` to ``moe_layer_end_index``, softmax scores whose
choice adds a per-expert selection bias (``moe_statics.e_score_correction_bias``), the chosen scores renormalised
(divided by their sum clamped at ``moe_norm_min``: the sum of the top-k of a softmax is at least 1 / E, so a
``moe_norm_min`` no larger never binds and the division is exact), ``moe_num_shared_experts`` ungated shared
experts. The multi-token-prediction tensors (``mtp*``) are not part of the causal LM and are skipped."""

from __future__ import annotations

from convert.deepseek import SHARED_EXPERTS
from convert.family_table import COMMON_RULES, LAYER, Family, Rule, routed_rules


def _moe_layers(g, n: int) -> tuple[bool, ...]:
  start, end, step = (int(g(k)) for k in ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"))
  end = n - 1 if end == -1 else end
  if step < 1 or start < 0:
    g.fail(f"moe_layer_interval={step} must be >= 1 and moe_layer_start_index={start} >= 0")
  return tuple((i + 1) % step == 0 and start <= i <= end for i in range(n))


def _build_ernie4_5_moe(g, common: dict) -> dict:
  if g("use_bias"):
    g.fail("use_bias=true is not supported (it also puts biases on the MLP projections, which the model has not)")
  n_exp = int(g("moe_num_experts"))
  if float(g("moe_norm_min")) > 1.0 / n_exp:
    g.fail(f"moe_norm_min={g('moe_norm_min')} may clamp the renormalisation (the top-k sum is only known to be "
           f">= 1 / moe_num_experts = {1.0 / n_exp:g}); not supported")
  f_moe = int(g("moe_intermediate_size"))
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=f_moe, num_experts=n_exp,
      num_experts_per_tok=int(g("moe_k")), moe_layers=_moe_layers(g, common["num_layers"]),
      shared_expert_size=int(g("moe_num_shared_experts")) * f_moe, shared_expert_gate=False, norm_topk_prob=True,
      router_bias=True, rope_interleave=True)


ERNIE4_5_MOE = Family(
    name="ernie4_5_moe", model_types=("ernie4_5_moe",), architectures=("Ernie4_5_MoeForCausalLM",),
    handled=frozenset({"intermediate_size", "moe_intermediate_size", "moe_num_experts", "moe_k",
                       "moe_num_shared_experts", "moe_layer_start_index", "moe_layer_end_index",
                       "moe_layer_interval", "moe_norm_min", "use_bias"}),
    ignored=frozenset({"num_nextn_predict_layers"}),  # the MTP layer (its tensors skipped)
    # transformers' Ernie4_5_MoeConfig defaults (ERNIE-4.5-21B-A3B's sizes)
    defaults=dict(vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
                  num_attention_heads=20, num_key_value_heads=4, head_dim=None, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                  rope_scaling=None, rope_parameters=None, use_bias=False, moe_intermediate_size=1536, moe_k=6,
                  moe_num_experts=64, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=-1,
                  moe_layer_interval=1, moe_norm_min=1e-12),
    build=_build_ernie4_5_moe,
    rules=COMMON_RULES + routed_rules(r"mlp") + (
        SHARED_EXPERTS,
        Rule(LAYER + r"mlp\.(gate\.)?moe_statics\.e_score_correction_bias", "layers/{layer}/mlp/router/bias", "copy"),
        Rule(r"model\.mtp\w*\..*", None, "skip")),
    aliases=(("num_experts", "moe_num_experts"), ("num_experts_per_tok", "moe_k"),
             ("num_mtp_layers", "num_nextn_predict_layers")))
