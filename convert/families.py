"""Per-family tables: which config attributes each family handles (with transformers' defaults),
which it ignores, how they map to ``MoEConfig``, and which checkpoint keys go where.

Key rules are anchored regexes over HF tensor names; ``{layer}``/``{expert}``/``{proj}`` in a target are
filled from the match (``names`` renames captured values, e.g. Mixtral's w1/w2/w3).
Rule kinds: ``copy`` (reshape only), ``linear`` (torch [out, in] -> [in, out], then reshape;
``in_dims`` = how many leading target dims are the input), ``expert_linear`` (one expert's linear into
the stacked [e, ...] parameter), ``fused_gate_up`` ([e, 2f, d] -> w_gate, w_up [e, d, f]),
``fused_down`` ([e, d, f] -> [e, f, d]), ``skip`` (buffers with no parameter, e.g. rotary inv_freq).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from convert.errors import ConversionError

LAYER = r"model\.layers\.(?P<layer>\d+)\."
GATE_UP_DOWN = r"(?P<proj>gate|up|down)"


class Rule(NamedTuple):
  pattern: str
  target: str | tuple[str, ...] | None
  kind: str
  in_dims: int = 1
  names: dict[str, dict[str, str]] | None = None


COMMON_RULES = (
    Rule(r"model\.embed_tokens\.weight", "embed/embedding", "copy"),
    Rule(r"model\.norm\.weight", "final_norm/scale", "copy"),
    Rule(r"lm_head\.weight", "lm_head/kernel", "linear"),
    Rule(LAYER + r"input_layernorm\.weight", "layers/{layer}/attn_norm/scale", "copy"),
    Rule(LAYER + r"post_attention_layernorm\.weight", "layers/{layer}/mlp_norm/scale", "copy"),
    Rule(LAYER + r"self_attn\.(?P<proj>[qkv])_proj\.weight", "layers/{layer}/attn/w{proj}", "linear"),
    Rule(LAYER + r"self_attn\.(?P<proj>[qkvo])_proj\.bias", "layers/{layer}/attn/b{proj}", "copy"),
    Rule(LAYER + r"self_attn\.o_proj\.weight", "layers/{layer}/attn/wo", "linear", in_dims=2),
    Rule(LAYER + r"self_attn\.rotary_emb\.inv_freq", None, "skip"),
    Rule(LAYER + r"self_attn\.(?P<proj>[qk])_norm\.weight", "layers/{layer}/attn/{proj}_norm", "copy"),
    Rule(LAYER + r"mlp\." + GATE_UP_DOWN + r"_proj\.weight", "layers/{layer}/mlp/w_{proj}", "linear"),
)
EXPERTS = "layers/{layer}/mlp/experts/"


def _routed_rules(block: str, proj_pattern: str = GATE_UP_DOWN + "_proj",
                  names: dict | None = None) -> tuple[Rule, ...]:
  """Router + per-expert keys (as on disk) + fused keys (transformers 5 in-memory layout)."""
  return (
      Rule(LAYER + block + r"\.gate\.weight", "layers/{layer}/mlp/router/kernel", "linear"),
      Rule(LAYER + block + r"\.experts\.(?P<expert>\d+)\." + proj_pattern + r"\.weight",
           EXPERTS + "w_{proj}", "expert_linear", names=names),
      Rule(LAYER + block + r"\.experts\.gate_up_proj", (EXPERTS + "w_gate", EXPERTS + "w_up"), "fused_gate_up"),
      Rule(LAYER + block + r"\.experts\.down_proj", EXPERTS + "w_down", "fused_down"),
  )


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  architectures: tuple[str, ...]
  handled: frozenset
  ignored: frozenset
  defaults: dict[str, Any]
  build: Callable[[Any, dict], dict]
  rules: tuple[Rule, ...]
  aliases: tuple[tuple[str, str], ...] = ()  # (another name transformers writes, the name the table reads)


def _windows(g, n_layers: int, layer_types, size) -> tuple[int, ...] | None:
  if layer_types is None:
    return None
  if len(layer_types) != n_layers:
    g.fail(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers={n_layers}")
  out = []
  for i, t in enumerate(layer_types):
    if t == "full_attention":
      out.append(0)
    elif t == "sliding_attention":
      if not size:
        g.fail(f"layer_types[{i}] is sliding_attention but the sliding window is {size!r}")
      out.append(int(size))
    else:
      g.fail(f"layer_types[{i}]={t!r} is not supported (full_attention or sliding_attention)")
  return tuple(out) if any(out) else None


def _sparse_layers(g, n: int, n_exp: int) -> tuple[bool, ...]:
  """Qwen's layer pattern: MoE where the layer is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
  step = int(g("decoder_sparse_step"))
  if step < 1:
    g.fail(f"decoder_sparse_step={step} must be >= 1")
  only = set(g("mlp_only_layers") or [])
  return tuple(i not in only and n_exp > 0 and (i + 1) % step == 0 for i in range(n))


def _build_qwen2_moe(g, common: dict) -> dict:
  n = common["num_layers"]
  n_exp = int(g("num_experts"))
  use_sw, mwl = bool(g("use_sliding_window")), int(g("max_window_layers"))
  types = g("layer_types") or [
      "sliding_attention" if (i + 1) % 2 and i < mwl and use_sw else "full_attention" for i in range(n)]
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=int(g("moe_intermediate_size")),
      num_experts=n_exp, num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=_sparse_layers(g, n, n_exp),
      shared_expert_size=int(g("shared_expert_intermediate_size")), shared_expert_gate=True,
      norm_topk_prob=bool(g("norm_topk_prob")), qkv_bias=bool(g("qkv_bias")),
      attn_windows=_windows(g, n, types, g("sliding_window") if use_sw else 0))


def _build_mixtral(g, common: dict) -> dict:
  n = common["num_layers"]
  sw = g("sliding_window")
  return dict(
      intermediate_size=0, moe_intermediate_size=int(g("intermediate_size")),
      num_experts=int(g("num_local_experts")), num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=(True,) * n, norm_topk_prob=True,
      attn_windows=(int(sw),) * n if sw else None)


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
      norm_topk_prob=bool(g("norm_topk_prob")) and int(top_k) > 1, norm_topk_eps=1e-20, qkv_bias=bias, attn_out_bias=bias)


QWEN2_MOE = Family(
    name="qwen2_moe", model_types=("qwen2_moe",), architectures=("Qwen2MoeForCausalLM",),
    handled=frozenset({"intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                       "num_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
                       "mlp_only_layers", "qkv_bias", "use_sliding_window", "sliding_window",
                       "max_window_layers", "layer_types"}),
    ignored=frozenset(),
    defaults=dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rope_parameters=None, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, decoder_sparse_step=1,
                  moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                  num_experts_per_tok=4, num_experts=60, norm_topk_prob=False, mlp_only_layers=None,
                  qkv_bias=True, layer_types=None),
    build=_build_qwen2_moe,
    rules=COMMON_RULES + _routed_rules(r"mlp") + (
        Rule(LAYER + r"mlp\.shared_expert\." + GATE_UP_DOWN + r"_proj\.weight",
             "layers/{layer}/mlp/shared/w_{proj}", "linear"),
        Rule(LAYER + r"mlp\.shared_expert_gate\.weight", "layers/{layer}/mlp/shared_gate/kernel", "linear"),
    ))

MIXTRAL = Family(
    name="mixtral", model_types=("mixtral",), architectures=("MixtralForCausalLM",),
    handled=frozenset({"intermediate_size", "num_local_experts", "num_experts_per_tok", "sliding_window"}),
    ignored=frozenset({"router_jitter_noise"}),
    defaults=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                  max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=1e6, rope_scaling=None, rope_parameters=None, sliding_window=None,
                  num_experts_per_tok=2, num_local_experts=8),
    build=_build_mixtral,
    rules=COMMON_RULES
    + _routed_rules(r"block_sparse_moe", r"(?P<proj>w[123])", names={"proj": {"w1": "gate", "w2": "down",
                                                                              "w3": "up"}})
    + _routed_rules(r"mlp"))

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
    rules=COMMON_RULES + _routed_rules(r"mlp") + (
        Rule(LAYER + r"mlp\.shared_experts\." + GATE_UP_DOWN + r"_proj\.weight",
             "layers/{layer}/mlp/shared/w_{proj}", "linear"),
    ))

def _build_qwen3_moe(g, common: dict) -> dict:
  n, n_exp = common["num_layers"], int(g("num_experts"))
  sw = g("sliding_window") if g("use_sliding_window") else None  # transformers: every layer, or none
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=int(g("moe_intermediate_size")),
      num_experts=n_exp, num_experts_per_tok=int(g("num_experts_per_tok")), moe_layers=_sparse_layers(g, n, n_exp),
      norm_topk_prob=bool(g("norm_topk_prob")), qkv_bias=bias, attn_out_bias=bias, qk_norm="head",
      attn_windows=(int(sw),) * n if sw else None)


def _build_olmoe(g, common: dict) -> dict:
  n = common["num_layers"]
  if common["head_dim"] * common["num_heads"] != common["hidden_size"]:
    g.fail(f"head_dim={common['head_dim']} x num_attention_heads={common['num_heads']} must equal hidden_size="
           f"{common['hidden_size']} (OLMoE's q_norm spans the hidden size)")
  clip = g("clip_qkv")
  if clip is not None and float(clip) <= 0:
    g.fail(f"clip_qkv={clip} must be positive or null")
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=0, moe_intermediate_size=int(g("intermediate_size")), num_experts=int(g("num_experts")),
      num_experts_per_tok=int(g("num_experts_per_tok")), moe_layers=(True,) * n,
      norm_topk_prob=bool(g("norm_topk_prob")), qkv_bias=bias, attn_out_bias=bias, qk_norm="full",
      qkv_clip=float(clip or 0.0))


QWEN3_MOE = Family(
    name="qwen3_moe", model_types=("qwen3_moe",), architectures=("Qwen3MoeForCausalLM",),
    handled=frozenset({"intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                       "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "attention_bias",
                       "use_sliding_window", "sliding_window"}),
    # transformers' Qwen3-MoE has no max_window_layers (the hub files carry it; its sliding window, when on,
    # covers every layer).
    ignored=frozenset({"max_window_layers"}),
    defaults=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                  num_attention_heads=32, num_key_value_heads=4, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
                  use_sliding_window=False, sliding_window=4096, decoder_sparse_step=1,
                  moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                  mlp_only_layers=None),
    build=_build_qwen3_moe,
    rules=COMMON_RULES + _routed_rules(r"mlp"),
    aliases=(("num_local_experts", "num_experts"),))  # transformers 5 saves num_local_experts

OLMOE = Family(
    name="olmoe", model_types=("olmoe",), architectures=("OlmoeForCausalLM",),
    handled=frozenset({"intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                       "attention_bias", "clip_qkv"}),
    ignored=frozenset(),
    defaults=dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
                  clip_qkv=None, num_experts_per_tok=8, num_experts=64, norm_topk_prob=False),
    build=_build_olmoe,
    rules=COMMON_RULES + _routed_rules(r"mlp"),
    aliases=(("num_local_experts", "num_experts"),))


def _build_granite(g, common: dict) -> dict:
  """Granite-MoE (and -Shared): top-k of the logits, then softmax over them (= renormalised softmax top-k)."""
  n = common["num_layers"]
  scalars = {}
  for name in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"):
    v = g(name)
    if v is None or float(v) <= 0:
      g.fail(f"{name}={v!r} must be a positive number")
    scalars[name] = float(v)
  bias = bool(g("attention_bias"))
  shared = int(g("shared_intermediate_size")) if "shared_intermediate_size" in g.handled else 0
  return dict(
      intermediate_size=0, moe_intermediate_size=int(g("intermediate_size")),
      num_experts=int(g("num_local_experts")), num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=(True,) * n, norm_topk_prob=True, shared_expert_size=shared, qkv_bias=bias, attn_out_bias=bias,
      **scalars)


_GRANITE_HANDLED = frozenset({"intermediate_size", "num_local_experts", "num_experts_per_tok", "attention_bias",
                              "embedding_multiplier", "attention_multiplier", "residual_multiplier",
                              "logits_scaling"})
_GRANITE_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
                         embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
                         attention_multiplier=1.0, num_local_experts=8, num_experts_per_tok=2)
# On disk: block_sparse_moe.router.layer / input_linear [e, 2f, d] / output_linear [e, d, f]; transformers 5 in
# memory: router.weight / experts.gate_up_proj / experts.down_proj.
_GRANITE_RULES = COMMON_RULES + (
    Rule(LAYER + r"block_sparse_moe\.router(\.layer)?\.weight", "layers/{layer}/mlp/router/kernel", "linear"),
    Rule(LAYER + r"block_sparse_moe\.(input_linear\.weight|experts\.gate_up_proj)",
         (EXPERTS + "w_gate", EXPERTS + "w_up"), "fused_gate_up"),
    Rule(LAYER + r"block_sparse_moe\.(output_linear\.weight|experts\.down_proj)", EXPERTS + "w_down", "fused_down"),
)

GRANITEMOE = Family(
    name="granitemoe", model_types=("granitemoe",), architectures=("GraniteMoeForCausalLM",),
    handled=_GRANITE_HANDLED, ignored=frozenset(), defaults=_GRANITE_DEFAULTS, build=_build_granite,
    rules=_GRANITE_RULES)

GRANITEMOE_SHARED = Family(
    name="granitemoeshared", model_types=("granitemoeshared",), architectures=("GraniteMoeSharedForCausalLM",),
    handled=_GRANITE_HANDLED | {"shared_intermediate_size"}, ignored=frozenset(),
    defaults=dict(_GRANITE_DEFAULTS, shared_intermediate_size=0), build=_build_granite,
    rules=_GRANITE_RULES + (  # the shared MLP: input_linear [2F, d] (gate, up), output_linear [d, F], ungated
        Rule(LAYER + r"shared_mlp\.input_linear\.weight", ("layers/{layer}/mlp/shared/w_gate",
                                                           "layers/{layer}/mlp/shared/w_up"), "fused_gate_up"),
        Rule(LAYER + r"shared_mlp\.output_linear\.weight", "layers/{layer}/mlp/shared/w_down", "fused_down"),
    ))


def _build_llama(g, common: dict) -> dict:
  if g("mlp_bias"):
    g.fail("mlp_bias=true is not supported (the MLP has no biases)")
  if int(g("pretraining_tp")) != 1:
    g.fail(f"pretraining_tp={g('pretraining_tp')} is not supported (only 1)")
  bias = bool(g("attention_bias"))
  return dict(intermediate_size=int(g("intermediate_size")), moe_intermediate_size=0, num_experts=0,
              num_experts_per_tok=0, moe_layers=(False,) * common["num_layers"], qkv_bias=bias,
              attn_out_bias=bias)


# Dense llama: the source of sparse upcycling (convert/upcycle.py) and a dense reference model.
LLAMA = Family(
    name="llama", model_types=("llama",), architectures=("LlamaForCausalLM",),
    handled=frozenset({"intermediate_size", "attention_bias", "mlp_bias", "pretraining_tp"}),
    ignored=frozenset(),
    defaults=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
                  mlp_bias=False, pretraining_tp=1),
    build=_build_llama, rules=COMMON_RULES)

FAMILIES = (QWEN2_MOE, QWEN3_MOE, OLMOE, GRANITEMOE, GRANITEMOE_SHARED, MIXTRAL, DEEPSEEK_V1, LLAMA)
_NOT_YET = {"deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3"}


def family_for(raw: dict, where: str) -> Family:
  mt = raw.get("model_type")
  for fam in FAMILIES:
    if mt in fam.model_types:
      archs = raw.get("architectures") or []
      if archs and not set(archs) & set(fam.architectures):
        raise ConversionError(f"{where}: architectures={archs} is not a causal LM of family {fam.name} "
                              f"(expected one of {list(fam.architectures)})")
      return fam
  supported = sorted(t for f in FAMILIES for t in f.model_types)
  hint = f" ({_NOT_YET[mt]} is planned but not supported yet)" if mt in _NOT_YET else ""
  raise ConversionError(f"{where}: model_type={mt!r} is not supported{hint}; supported: {supported}")
