"""The DeepSeek families: DeepSeek-MoE V1 (the hub's remote code), DeepSeek-V2, DeepSeek-V3 and DeepSeek-V3.2
(transformers' classes): multi-head latent attention, yarn RoPE, shared experts, group-limited and sigmoid routing;
V3.2's lightning indexer (DeepSeek Sparse Attention).

Where the hub's remote code and transformers disagree, the converter follows transformers and refuses the
configurations on which they differ (V2's ``norm_topk_prob``, which transformers ignores).
"""

from __future__ import annotations

from convert.family_table import COMMON_RULES, GATE_UP_DOWN, LAYER, Family, Rule, routed_rules

_INDEXER = LAYER + r"self_attn\.indexer\."


def _build_deepseek_v1(g, common: dict) -> dict:
  n = common["num_layers"]
  n_exp = g("n_routed_experts")
  if not n_exp:
    g.fail("n_routed_experts is null: this is a dense model, not an MoE")
  if g("scoring_func") != "softmax":
    g.fail(f"scoring_func={g('scoring_func')!r} is not supported by DeepSeek-MoE V1 (softmax)")
  freq, first = int(g("moe_layer_freq")), int(g("first_k_dense_replace"))
  if freq < 1:
    g.fail(f"moe_layer_freq={freq} must be >= 1")
  top_k = g("num_experts_per_tok")
  if not top_k:
    g.fail("num_experts_per_tok is missing or null")
  f_moe = int(g("moe_intermediate_size"))
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=f_moe,
      num_experts=int(n_exp), num_experts_per_tok=int(top_k),
      moe_layers=tuple(i >= first and i % freq == 0 for i in range(n)),
      shared_expert_size=int(g("n_shared_experts") or 0) * f_moe, shared_expert_gate=False,
      # V1's gate renormalises only when top_k > 1.
      norm_topk_prob=bool(g("norm_topk_prob")) and int(top_k) > 1, norm_topk_eps=1e-20, qkv_bias=bias,
      attn_out_bias=bias)


DEEPSEEK_V1 = Family(
    name="deepseek_v1", model_types=("deepseek",), architectures=("DeepseekForCausalLM",),
    handled=frozenset({"intermediate_size", "moe_intermediate_size", "n_shared_experts", "n_routed_experts",
                       "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace", "norm_topk_prob",
                       "scoring_func", "attention_bias"}),
    ignored=frozenset({"aux_loss_alpha", "seq_aux", "pretraining_tp"}),
    # The remote code's DeepseekConfig defaults (not the 16B checkpoint's values).
    defaults=dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rope_parameters=None, moe_intermediate_size=1407,
                  n_shared_experts=None, n_routed_experts=None, num_experts_per_tok=None, moe_layer_freq=1,
                  first_k_dense_replace=0, norm_topk_prob=False, scoring_func="softmax",
                  attention_bias=False),
    build=_build_deepseek_v1,
    rules=COMMON_RULES + routed_rules(r"mlp") + (
        Rule(LAYER + r"mlp\.shared_experts\." + GATE_UP_DOWN + r"_proj\.weight",
             "layers/{layer}/mlp/shared/w_{proj}", "linear"),
    ))


def _mla(g, common: dict) -> dict:
  """Multi-head latent attention fields (RoPE width = head_dim = qk_rope_head_dim, as transformers sets it)."""
  heads, rope_dim, nope = common["num_heads"], int(g("qk_rope_head_dim")), int(g("qk_nope_head_dim"))
  if common["num_kv_heads"] != heads:
    g.fail(f"num_key_value_heads={common['num_kv_heads']} must equal num_attention_heads={heads} (multi-head "
           "latent attention expands one latent into every head)")
  for name, want in (("head_dim", rope_dim), ("qk_head_dim", nope + rope_dim)):
    if g(name) not in (None, want):
      g.fail(f"{name}={g(name)} contradicts qk_rope_head_dim={rope_dim} / qk_nope_head_dim={nope} "
             f"(transformers sets it to {want})")
  if "mlp_bias" in g.handled and g("mlp_bias"):
    g.fail("mlp_bias=true is not supported (the MLPs have no biases)")
  bias = bool(g("attention_bias"))
  return dict(head_dim=rope_dim, qk_nope_head_dim=nope, v_head_dim=int(g("v_head_dim")),
              q_lora_rank=int(g("q_lora_rank") or 0), kv_lora_rank=int(g("kv_lora_rank")), qkv_bias=bias,
              attn_out_bias=bias)


def _deepseek_moe(g, common: dict) -> dict:
  """Layers from first_k_dense_replace on are MoE (transformers ignores the hub's moe_layer_freq: it must be 1),
  with n_shared_experts ungated shared experts of moe_intermediate_size."""
  first, freq = g("first_k_dense_replace"), g("moe_layer_freq")
  if first is None or int(first) < 0:
    g.fail(f"first_k_dense_replace={first!r} must be an integer >= 0")
  if freq is not None and int(freq) != 1:
    g.fail(f"moe_layer_freq={freq} is not supported (transformers' DeepSeek-V2/V3 put an MoE block in every layer "
           "from first_k_dense_replace on: 1)")
  f_moe, n_exp = int(g("moe_intermediate_size")), int(g("n_routed_experts"))
  return dict(intermediate_size=int(g("intermediate_size")), moe_intermediate_size=f_moe, num_experts=n_exp,
              num_experts_per_tok=int(g("num_experts_per_tok")),
              moe_layers=tuple(i >= int(first) for i in range(common["num_layers"])),
              shared_expert_size=int(g("n_shared_experts")) * f_moe, shared_expert_gate=False,
              routed_scaling_factor=float(g("routed_scaling_factor")))


def _build_deepseek_v2(g, common: dict) -> dict:
  """Softmax scores; greedy or group-limited greedy top-k; no renormalisation; interleaved RoPE (V2's complex
  rotation)."""
  if g("scoring_func") != "softmax":
    g.fail(f"scoring_func={g('scoring_func')!r}: transformers' DeepSeek-V2 scores with softmax")
  if g("norm_topk_prob"):
    g.fail("norm_topk_prob=true is not supported: transformers' DeepSeek-V2 ignores it (the hub's remote code "
           "renormalises), so the two disagree on this checkpoint")
  method = g("topk_method")
  if method not in ("greedy", "group_limited_greedy"):
    g.fail(f"topk_method={method!r} is not supported by DeepSeek-V2 (greedy or group_limited_greedy)")
  out = dict(_mla(g, common), **_deepseek_moe(g, common), rope_interleave=True, topk_method=method)
  if method != "greedy":
    out.update(n_group=int(g("n_group")), topk_group=int(g("topk_group")))
  return out


def _build_deepseek_v3(g, common: dict) -> dict:
  """Sigmoid scores, selection by scores + e_score_correction_bias within the best topk_group of n_group groups
  (noaux_tc), optional renormalisation (+1e-20), routed_scaling_factor."""
  for name, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
    if g(name) not in (None, want):
      g.fail(f"{name}={g(name)!r}: transformers' DeepSeek-V3 always routes with {want}")
  if g("n_group") is None or g("topk_group") is None:
    g.fail("n_group and topk_group must be integers (DeepSeek-V3 always selects within groups)")
  return dict(_mla(g, common), **_deepseek_moe(g, common), rope_interleave=bool(g("rope_interleave")),
              router_scoring="sigmoid", topk_method="noaux_tc", n_group=int(g("n_group")),
              topk_group=int(g("topk_group")), router_bias=True, norm_topk_prob=bool(g("norm_topk_prob")),
              norm_topk_eps=1e-20)


_MLA_RULES = tuple(
    Rule(LAYER + r"self_attn\." + hf, f"layers/{{layer}}/attn/{ours}", kind)
    for hf, ours, kind in ((r"q_a_proj\.weight", "wq_a", "linear"), (r"q_a_proj\.bias", "bq_a", "copy"),
                           (r"q_a_layernorm\.weight", "q_a_norm", "copy"), (r"q_b_proj\.weight", "wq_b", "linear"),
                           (r"kv_a_proj_with_mqa\.weight", "wkv_a", "linear"),
                           (r"kv_a_proj_with_mqa\.bias", "bkv_a", "copy"),
                           (r"kv_a_layernorm\.weight", "kv_a_norm", "copy"),
                           (r"kv_b_proj\.weight", "wkv_b", "linear")))
SHARED_EXPERTS = Rule(LAYER + r"mlp\.shared_experts\." + GATE_UP_DOWN + r"_proj\.weight",
                      "layers/{layer}/mlp/shared/w_{proj}", "linear")
SELECTION_BIAS = Rule(LAYER + r"mlp\.gate\.e_score_correction_bias", "layers/{layer}/mlp/router/bias", "copy")
_V2_HANDLED = frozenset({
    "intermediate_size", "moe_intermediate_size", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "routed_scaling_factor", "scoring_func", "topk_method", "n_group",
    "topk_group", "norm_topk_prob", "attention_bias", "mlp_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "qk_head_dim"})
# transformers' DeepseekV2Config defaults; scoring_func, moe_layer_freq: the hub files' keys (transformers has none)
_V2_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
    mlp_bias=False, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, n_group=None, n_routed_experts=64,
    n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
    topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
    moe_intermediate_size=1407, scoring_func="softmax", moe_layer_freq=1, qk_head_dim=None)

DEEPSEEK_V2 = Family(
    name="deepseek_v2", model_types=("deepseek_v2",), architectures=("DeepseekV2ForCausalLM",),
    handled=_V2_HANDLED, ignored=frozenset({"aux_loss_alpha", "seq_aux", "pretraining_tp"}),
    defaults=_V2_DEFAULTS, build=_build_deepseek_v2,
    rules=COMMON_RULES + _MLA_RULES + routed_rules(r"mlp") + (SHARED_EXPERTS,),
    aliases=(("num_experts", "n_routed_experts"),))

DEEPSEEK_V3 = Family(
    name="deepseek_v3", model_types=("deepseek_v3",), architectures=("DeepseekV3ForCausalLM",),
    handled=(_V2_HANDLED - {"mlp_bias"}) | {"rope_interleave"},
    # num_nextn_predict_layers: the multi-token-prediction modules (model.layers.N.* past num_hidden_layers) are
    # not part of the causal LM's forward: their tensors are skipped. ep_size: expert-parallel degree.
    ignored=frozenset({"aux_loss_alpha", "seq_aux", "pretraining_tp", "num_nextn_predict_layers", "ep_size"}),
    defaults=dict(_V2_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                  moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                  n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                  num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                  rope_interleave=True, scoring_func=None, topk_method=None),
    build=_build_deepseek_v3,
    rules=COMMON_RULES + _MLA_RULES + routed_rules(r"mlp") + (
        SHARED_EXPERTS, SELECTION_BIAS),
    aliases=(("num_local_experts", "n_routed_experts"), ("num_mtp_layers", "num_nextn_predict_layers")),
    skip_layers_past_end=True)


def _build_deepseek_v32(g, common: dict) -> dict:
  """V3's architecture (MLA with a q latent, RoPE on interleaved pairs, sigmoid noaux_tc routing) with the lightning
  indexer on every layer; the MLP pattern from ``mlp_layer_types`` (else first_k_dense_replace)."""
  if not g("q_lora_rank"):
    g.fail(f"q_lora_rank={g('q_lora_rank')!r}: DeepSeek-V3.2's indexer reads the q latent (a positive rank)")
  n = common["num_layers"]
  types = g("layer_types")
  if types is not None and list(types) != ["indexed_attention"] * n:
    g.fail(f"layer_types={types}: transformers' DeepSeek-V3.2 has {n} indexed_attention layers")
  if not g("rope_interleave"):
    g.fail("rope_interleave=false: transformers' DeepSeek-V3.2 always rotates interleaved pairs")
  out = _build_deepseek_v3(g, common)
  mlp_types = g("mlp_layer_types")
  if mlp_types is not None:
    if len(mlp_types) != n or set(mlp_types) - {"dense", "sparse"}:
      g.fail(f"mlp_layer_types={mlp_types}: expected {n} entries, each dense or sparse")
    out["moe_layers"] = tuple(t == "sparse" for t in mlp_types)
  topk, heads, width = int(g("index_topk")), int(g("index_n_heads")), int(g("index_head_dim"))
  if min(topk, heads, width) < 1:
    g.fail(f"index_topk={topk}, index_n_heads={heads}, index_head_dim={width} must be positive")
  return dict(out, index_topk=topk, index_heads=heads, index_head_dim=width)


DEEPSEEK_V32 = Family(
    name="deepseek_v32", model_types=("deepseek_v32",), architectures=("DeepseekV32ForCausalLM",),
    handled=_V2_HANDLED | {"rope_interleave", "head_dim", "index_topk", "index_head_dim", "index_n_heads",
                           "mlp_layer_types", "layer_types"},
    ignored=DEEPSEEK_V3.ignored,
    # transformers' DeepseekV32Config defaults (DeepSeek-V3.2's sizes)
    defaults=dict(DEEPSEEK_V3.defaults, max_position_embeddings=163840, index_topk=2048, index_head_dim=128,
                  index_n_heads=64, mlp_layer_types=None, layer_types=None, head_dim=64, moe_layer_freq=None),
    build=_build_deepseek_v32,
    rules=DEEPSEEK_V3.rules + tuple(
        Rule(_INDEXER + hf, f"layers/{{layer}}/attn/indexer/{ours}", kind)
        for hf, ours, kind in ((r"wq_b\.weight", "wq", "linear"), (r"wk\.weight", "wk", "linear"),
                               (r"k_norm\.weight", "k_norm", "copy"), (r"k_norm\.bias", "k_norm_bias", "copy"),
                               (r"weights_proj\.weight", "w_weights", "linear"))),
    aliases=DEEPSEEK_V3.aliases, skip_layers_past_end=True)
