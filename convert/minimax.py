"""MiniMax-M2 (transformers' ``minimax_m2``): every layer MoE; grouped-query attention with partial RoPE (the
release's legacy ``rotary_dim``, or ``partial_rotary_factor``) and RMSNorm over the full width of q and of k (all
heads together, as OLMoE); sigmoid routing whose choice adds a per-expert selection bias
(``e_score_correction_bias``, kept on the MoE block), the chosen scores renormalised without an epsilon; no shared
expert. Both key layouts are read: transformers' (``mlp.gate``, ``mlp.experts``) and the release's Mixtral-style
``block_sparse_moe`` with ``w1`` / ``w2`` / ``w3``."""

from __future__ import annotations

from convert.family_table import COMMON_RULES, LAYER, Family, Rule, routed_rules


# The release's config.json keys that transformers' MiniMaxM2 reads nowhere: each must state what transformers
# assumes (the value here), or the gate refuses the checkpoint rather than convert a model it computes otherwise.
_RELEASE_FIXED = {"use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True,
                  "shared_intermediate_size": 0, "postnorm": False, "layernorm_full_attention_beta": 1.0,
                  "layernorm_linear_attention_beta": 1.0, "layernorm_mlp_beta": 1.0, "sliding_window": None}


def _build_minimax_m2(g, common: dict) -> dict:
  for name, want in _RELEASE_FIXED.items():
    if name in g.raw and g(name) != want:
      g.fail(f"{name}={g(name)!r} is not supported: transformers' MiniMax-M2 assumes {want!r}")
  types = g("attn_type_list")
  if types is not None and (len(types) != common["num_layers"] or set(types) != {1}):
    g.fail(f"attn_type_list={types}: MiniMax-M2 has full attention (1) in every one of num_hidden_layers="
           f"{common['num_layers']} layers (0 is MiniMax-01's linear attention)")
  return dict(
      intermediate_size=0, moe_intermediate_size=int(g("intermediate_size")),
      num_experts=int(g("num_local_experts")), num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=(True,) * common["num_layers"], norm_topk_prob=True, router_scoring="sigmoid", router_bias=True,
      qk_norm="full")


MINIMAX_M2 = Family(
    name="minimax_m2", model_types=("minimax_m2",), architectures=("MiniMaxM2ForCausalLM",),
    handled=frozenset({"intermediate_size", "num_local_experts", "num_experts_per_tok", "rotary_dim",
                       "partial_rotary_factor", "attn_type_list", *_RELEASE_FIXED}),
    # router_jitter_noise: training-time input noise; the multi-token-prediction modules are not part of the causal
    # LM (their tensors, if any, are refused as unexpected); swa_rope_theta: unused without a sliding window
    ignored=frozenset({"router_jitter_noise", "use_mtp", "num_mtp_modules", "mtp_transformer_layers",
                       "swa_rope_theta"}),
    # transformers' MiniMaxM2Config defaults (MiniMax-M2's sizes, rope theta 5e6)
    defaults=dict(vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62,
                  num_attention_heads=48, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                  max_position_embeddings=196608, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=5e6, rope_scaling=None, rope_parameters=None, num_experts_per_tok=8,
                  num_local_experts=256, rotary_dim=None, partial_rotary_factor=None, attn_type_list=None,
                  **_RELEASE_FIXED),
    build=_build_minimax_m2,
    rules=COMMON_RULES + routed_rules(r"mlp") + routed_rules(
        r"block_sparse_moe", r"(?P<proj>w[123])", names={"proj": {"w1": "gate", "w2": "down", "w3": "up"}}) + (
        Rule(LAYER + r"(mlp|block_sparse_moe)\.e_score_correction_bias", "layers/{layer}/mlp/router/bias", "copy"),),
    aliases=(("num_experts", "num_local_experts"),))
