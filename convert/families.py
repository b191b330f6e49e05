"""Per-family tables: which config attributes each family handles (with transformers' defaults),
which it ignores, how they map to ``MoEConfig``, and which checkpoint keys go where.

Key rules are anchored regexes over HF tensor names; ``{layer}``/``{expert}``/``{proj}`` in a target are
filled from the match (``names`` renames captured values, e.g. Mixtral's w1/w2/w3).
Rule kinds: ``copy`` (reshape only), ``linear`` (torch [out, in] -> [in, out], then reshape;
``in_dims`` = how many leading target dims are the input), ``expert_linear`` (one expert's linear into
the stacked [e, ...] parameter), ``fused_gate_up`` ([e, 2f, d] -> w_gate, w_up [e, d, f]),
``fused_down`` ([e, d, f] -> [e, f, d]), ``interleaved`` ([..., 2f] -> gate [..., ::2], up [..., 1::2]: GPT-OSS), ``halves`` ([..., 2f] -> gate, up: Llama-4),
``tensor`` (as stored, the exact shape), ``split`` (one fused tensor into several parameters by the rule's
``split`` function: Qwen3-Next's projections), ``skip`` (buffers with no parameter, e.g. rotary inv_freq).
"""

from __future__ import annotations

import warnings

from convert.deepseek import DEEPSEEK_V1, DEEPSEEK_V2, DEEPSEEK_V3, DEEPSEEK_V32
from convert.ernie import ERNIE4_5_MOE
from convert.errors import ConversionError
from convert.glm import GLM4_MOE
from convert.gpt_oss import GPT_OSS
from convert.llama4 import LLAMA4_TEXT
from convert.minimax import MINIMAX_M2
from convert.phimoe import PHIMOE
from convert.qwen3_next import QWEN3_5_MOE_TEXT, QWEN3_NEXT
from convert.family_table import (COMMON_RULES, EXPERTS, GATE_UP_DOWN, LAYER, Family, Rule, routed_rules,
                                  sparse_layers, windows)


def _build_qwen2_moe(g, common: dict) -> dict:
  n = common["num_layers"]
  n_exp = int(g("num_experts"))
  use_sw, mwl = bool(g("use_sliding_window")), int(g("max_window_layers"))
  types = g("layer_types") or [
      "sliding_attention" if (i + 1) % 2 and i < mwl and use_sw else "full_attention" for i in range(n)]
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=int(g("moe_intermediate_size")),
      num_experts=n_exp, num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=sparse_layers(g, n, n_exp),
      shared_expert_size=int(g("shared_expert_intermediate_size")), shared_expert_gate=True,
      norm_topk_prob=bool(g("norm_topk_prob")), qkv_bias=bool(g("qkv_bias")),
      attn_windows=windows(g, n, types, g("sliding_window") if use_sw else 0))


def _build_mixtral(g, common: dict) -> dict:
  n = common["num_layers"]
  sw = g("sliding_window")
  return dict(
      intermediate_size=0, moe_intermediate_size=int(g("intermediate_size")),
      num_experts=int(g("num_local_experts")), num_experts_per_tok=int(g("num_experts_per_tok")),
      moe_layers=(True,) * n, norm_topk_prob=True,
      attn_windows=(int(sw),) * n if sw else None)


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
    rules=COMMON_RULES + routed_rules(r"mlp") + (
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
    + routed_rules(r"block_sparse_moe", r"(?P<proj>w[123])", names={"proj": {"w1": "gate", "w2": "down",
                                                                              "w3": "up"}})
    + routed_rules(r"mlp"))

def _build_qwen3_moe(g, common: dict) -> dict:
  n, n_exp = common["num_layers"], int(g("num_experts"))
  sw = g("sliding_window") if g("use_sliding_window") else None  # transformers: every layer, or none
  bias = bool(g("attention_bias"))
  return dict(
      intermediate_size=int(g("intermediate_size")), moe_intermediate_size=int(g("moe_intermediate_size")),
      num_experts=n_exp, num_experts_per_tok=int(g("num_experts_per_tok")), moe_layers=sparse_layers(g, n, n_exp),
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
    rules=COMMON_RULES + routed_rules(r"mlp"),
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
    rules=COMMON_RULES + routed_rules(r"mlp"),
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

FAMILIES = (QWEN2_MOE, QWEN3_MOE, OLMOE, GRANITEMOE, GRANITEMOE_SHARED, MIXTRAL, DEEPSEEK_V1, DEEPSEEK_V2, DEEPSEEK_V3,
            DEEPSEEK_V32,
            GLM4_MOE, MINIMAX_M2, ERNIE4_5_MOE, GPT_OSS, LLAMA4_TEXT, QWEN3_NEXT, QWEN3_5_MOE_TEXT, PHIMOE, LLAMA)


# model_types that are one of our families under another name, and that family (their configs and tensors are its)
ALIASES = {"kimi_k2": "deepseek_v3"}  # Moonshot's Kimi-K2 / K2-Instruct / K2-Thinking: DeepSeek-V3's architecture
# multimodal model_types whose text model (``text_config``) is one of our families
MULTIMODAL = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text"}


def family_for(raw: dict, where: str) -> Family:
  """The family of a config.json: by ``model_type``; else by a known alias (``ALIASES``) or by ``architectures``
  naming one family's causal-LM class (a re-badged model: converted as that family, with a warning that says so;
  the family's strict attribute gate still applies)."""
  mt = raw.get("model_type")
  archs = raw.get("architectures") or []
  for fam in FAMILIES:
    if mt in fam.model_types:
      if archs and not set(archs) & set(fam.architectures):
        raise ConversionError(f"{where}: architectures={archs} is not a causal LM of family {fam.name} "
                              f"(expected one of {list(fam.architectures)})")
      return fam
  by_arch = [f for f in FAMILIES if set(archs) & set(f.architectures)]
  by_alias = [f for f in FAMILIES if f.name == ALIASES.get(mt)]
  if by_alias and by_arch and by_arch != by_alias:
    raise ConversionError(f"{where}: model_type={mt!r} is {by_alias[0].name}'s architecture, but architectures="
                          f"{archs} names {by_arch[0].name}'s")
  if len(by_arch or by_alias) == 1:
    fam = (by_arch or by_alias)[0]
    warnings.warn(f"{where}: model_type={mt!r} is converted as {fam.name} ("
                  + (f"architectures={archs}" if by_arch else "a known alias") + ")", stacklevel=2)
    return fam
  supported = sorted(t for f in FAMILIES for t in f.model_types)
  if mt in MULTIMODAL:
    raise ConversionError(f"{where}: model_type={mt!r} is a multimodal model, not supported as a whole; its text "
                          f"model (text_config) is family {MULTIMODAL[mt]}: convert a checkpoint of the text model "
                          "alone")
  raise ConversionError(f"{where}: model_type={mt!r} is not supported; supported: {supported}")
