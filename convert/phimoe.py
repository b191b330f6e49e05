"""Phi-3.5-MoE (transformers' ``phimoe``): LayerNorms with bias in place of RMSNorms, q/k/v/o biases, an LM head
with a bias (``lm_head_bias``), an optional sliding window on every layer, longrope RoPE (``hf_config._longrope``),
and the sparsemixer router: top-2 with each gate a softmax over the logits within ``router_jitter_noise`` of the best
(``nn.gating.sparsemixer_gates``; ``router_jitter_noise`` is that window at inference, not noise). Every layer is
MoE, without a shared expert; the release stores the experts per expert as Mixtral (``block_sparse_moe``,
``w1``/``w2``/``w3``), transformers 5 fused (``mlp.router``, ``mlp.experts.gate_up_proj`` / ``down_proj``)."""

from __future__ import annotations

from convert.family_table import BASE_RULES, EXPERTS, LAYER, Family, Rule, routed_rules


def _build_phimoe(g, common: dict) -> dict:
  n, k = common["num_layers"], int(g("num_experts_per_tok"))
  if k != 2:
    g.fail(f"num_experts_per_tok={k}: Phi-3.5-MoE's sparsemixer router selects 2 experts")
  jitter = float(g("router_jitter_noise"))
  if jitter < 0:
    g.fail(f"router_jitter_noise={jitter} must be >= 0 (the sparsemixer's relative window)")
  original = g("original_max_position_embeddings")
  if original is not None and original != common.get("longrope_original_max_position", original):
    g.fail(f"original_max_position_embeddings={original} contradicts the rope parameters' "
           f"{common['longrope_original_max_position']}")
  sw = g("sliding_window")
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=0, moe_intermediate_size=int(g("intermediate_size")), num_experts=int(g("num_local_experts")),
      num_experts_per_tok=2, moe_layers=(True,) * n, router_scoring="sparsemixer", router_jitter_eps=jitter,
      qkv_bias=bias, attn_out_bias=bias, layer_norm=True, lm_head_bias=bool(g("lm_head_bias")),
      attn_windows=(int(sw),) * n if sw else None)


_NORMS = tuple(
    Rule(pattern, target, "copy") for pattern, target in (
        (r"model\.norm\.bias", "final_norm/bias"),
        (LAYER + r"input_layernorm\.bias", "layers/{layer}/attn_norm/bias"),
        (LAYER + r"post_attention_layernorm\.bias", "layers/{layer}/mlp_norm/bias"),
        (r"lm_head\.bias", "lm_head/bias")))

PHIMOE = Family(
    name="phimoe", model_types=("phimoe",), architectures=("PhiMoEForCausalLM", "PhimoeForCausalLM"),
    handled=frozenset({"intermediate_size", "num_local_experts", "num_experts_per_tok", "router_jitter_noise",
                       "attention_bias", "lm_head_bias", "sliding_window", "original_max_position_embeddings",
                       "short_mscale"}),  # short_mscale: only as a rope_parameters key (hf_config._rope)
    # input_jitter_noise: training-time noise on the router's input (transformers applies it only in training)
    ignored=frozenset({"input_jitter_noise"}),
    # transformers' PhimoeConfig defaults (Phi-3.5-MoE's sizes)
    defaults=dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                  max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=1e6, rope_scaling=None, rope_parameters=None, sliding_window=None,
                  num_experts_per_tok=2, num_local_experts=16, router_jitter_noise=0.01, attention_bias=False,
                  lm_head_bias=False, original_max_position_embeddings=None),
    build=_build_phimoe,
    rules=BASE_RULES + _NORMS
    + routed_rules(r"block_sparse_moe", r"(?P<proj>w[123])", names={"proj": {"w1": "gate", "w2": "down",
                                                                              "w3": "up"}})
    + (Rule(LAYER + r"mlp\.router\.weight", "layers/{layer}/mlp/router/kernel", "linear"),
       Rule(LAYER + r"mlp\.experts\.gate_up_proj", (EXPERTS + "w_gate", EXPERTS + "w_up"), "fused_gate_up"),
       Rule(LAYER + r"mlp\.experts\.down_proj", EXPERTS + "w_down", "fused_down")))


def hf_config(cfg, need) -> dict:
  """The ``phimoe`` config.json of ``cfg`` (the inverse of the gate above; ``need(cond, msg)`` refuses what has no
  equivalent), without the model's common fields (``export._common`` adds them, the longrope parameters too)."""
  need(all(cfg.moe_layers) and cfg.num_experts_per_tok == 2 and cfg.router_scoring == "sparsemixer"
       and not cfg.shared_expert_size, "every layer MoE, the top-2 sparsemixer, no shared expert")
  need(cfg.layer_norm and cfg.qkv_bias == cfg.attn_out_bias and cfg.qk_norm == "none",
       "LayerNorms; attention bias on q, k, v, o together; no q/k norm")
  windows = set(cfg.attn_windows or (0,))
  need(len(windows) == 1, f"sliding windows differ across layers: {sorted(windows)}")
  return dict(architectures=["PhimoeForCausalLM"], model_type="phimoe", intermediate_size=cfg.moe_intermediate_size,
              num_local_experts=cfg.num_experts, num_experts_per_tok=2, router_jitter_noise=cfg.router_jitter_eps,
              attention_bias=cfg.qkv_bias, lm_head_bias=cfg.lm_head_bias, sliding_window=max(windows) or None)
