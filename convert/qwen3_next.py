"""Qwen3-Next (``qwen3_next``) and the Qwen3.5-MoE text model (``qwen3_5_moe_text``): hybrid layers, most of them
Gated DeltaNet linear attention (``nn.linear_attention``), every ``full_attention_interval``-th one gated softmax
attention (the q projection also gives a per-head sigmoid gate of the output; per-head q/k RMSNorm; partial RoPE,
``partial_rotary_factor``, rotate-half); RMSNorms that scale by ``1 + w`` (``norm_unit_offset``); MoE blocks as
Qwen2-MoE's (softmax top-k, renormalised, a sigmoid-gated shared expert). Qwen3-Next fuses the linear attention's
projections per key head (``in_proj_qkvz``: q, k, then the head's value and gate rows; ``in_proj_ba``); Qwen3.5 keeps
them apart (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), always renormalises the top-k and has
MoE in every layer. Qwen3.5's multimodal RoPE sections (``mrope_section``) coincide with plain RoPE on text, whose
three position ids are equal. The multi-token-prediction weights (``mtp.*``) are not part of the causal LM."""

from __future__ import annotations

import numpy as np

from convert.family_table import (BASE_RULES, COMMON_RULES, GATE_UP_DOWN, LAYER, Family, Rule, routed_rules,
                                  sparse_layers)

_LIN = LAYER + r"linear_attn\."
_T = "layers/{layer}/linear_attn/"


def _expect(a: np.ndarray, shape: tuple, what: str) -> None:
  if tuple(a.shape) != tuple(shape):
    raise ValueError(f"expected {list(shape)} ({what})")


def _split_qkvz(a, shapes, cfg):
  """Qwen3-Next's in_proj_qkvz [k (2c + 2rv), d], grouped by key head: q, k, then its r value heads' v and z."""
  (d, k, c), _, (_, h, v), _ = shapes
  r = h // k
  _expect(a, (k * (2 * c + 2 * r * v), d), "per key head: q, k, the value heads' v, z; then the model width")
  w = a.reshape(k, 2 * c + 2 * r * v, d).transpose(2, 0, 1)
  q, key, val, z = np.split(w, [c, 2 * c, 2 * c + r * v], axis=-1)
  return [q, key, val.reshape(d, h, v), z.reshape(d, h, v)]


def _split_ba(a, shapes, cfg):
  """Qwen3-Next's in_proj_ba [k 2r, d], grouped by key head: its r value heads' b, then their a."""
  (d, h), _ = shapes
  k = cfg.linear_k_heads
  r = h // k
  _expect(a, (2 * h, d), "per key head: the value heads' b, then a; then the model width")
  w = a.reshape(k, 2 * r, d).transpose(2, 0, 1)
  return [w[..., :r].reshape(d, h), w[..., r:].reshape(d, h)]


def _split_columns(a, shapes, what: str):
  """A [sum of the targets' trailing sizes, in] tensor -> the targets, each transposed to [in, ...]."""
  sizes = [int(np.prod(s[1:])) for s in shapes]
  _expect(a, (sum(sizes), shapes[0][0]), what)
  parts = np.split(a.T, np.cumsum(sizes)[:-1], axis=-1)
  return [p.reshape(s) for p, s in zip(parts, shapes)]


def _split_qkv(a, shapes, cfg):
  """Qwen3.5's in_proj_qkv [k c + k c + h v, d]: every q head, every k head, every v head."""
  return _split_columns(a, shapes, "q, k, v rows, then the model width")


def _split_conv(a, shapes, cfg):
  """conv1d.weight [k c + k c + h v, 1, w] (depthwise, channels as q|k|v) -> conv_q, conv_k [w, k, c], conv_v."""
  _expect(a, (sum(int(np.prod(s[1:])) for s in shapes), 1, shapes[0][0]), "channels q|k|v, 1, the kernel width")
  return _split_columns(a[:, 0], shapes, "channels q|k|v, then the kernel width")


def _split_q_gate(a, shapes, cfg):
  """The gated attention's q_proj weight [h 2c, d] (or bias [h 2c]): per head its c query rows, then c gate rows."""
  h, c = shapes[0][-2:]
  w = a.reshape(h, 2 * c, -1)
  if a.ndim == 1:
    return [w[:, :c, 0], w[:, c:, 0]]
  _expect(a, (2 * h * c, shapes[0][0]), "per head: query rows, then gate rows; then the model width")
  return [w[:, :c].transpose(2, 0, 1), w[:, c:].transpose(2, 0, 1)]


_ATTN = LAYER + r"self_attn\."
_GATED_Q = (  # before BASE_RULES: the doubled q_proj fills wq and the output gate wg
    Rule(_ATTN + r"q_proj\.weight", ("layers/{layer}/attn/wq", "layers/{layer}/attn/wg"), "split",
         split=_split_q_gate),
    Rule(_ATTN + r"q_proj\.bias", ("layers/{layer}/attn/bq", "layers/{layer}/attn/bg"), "split", split=_split_q_gate),
)
_LINEAR_COMMON = (
    Rule(_LIN + r"conv1d\.weight", (_T + "conv_q", _T + "conv_k", _T + "conv_v"), "split", split=_split_conv),
    Rule(_LIN + r"dt_bias", _T + "dt_bias", "copy"),
    Rule(_LIN + r"A_log", _T + "a_log", "copy"),
    Rule(_LIN + r"norm\.weight", _T + "norm", "copy"),
    Rule(_LIN + r"out_proj\.weight", _T + "wo", "linear", in_dims=2),
)
_MOE = routed_rules(r"mlp") + (
    Rule(LAYER + r"mlp\.shared_expert\." + GATE_UP_DOWN + r"_proj\.weight", "layers/{layer}/mlp/shared/w_{proj}",
         "linear"),
    Rule(LAYER + r"mlp\.shared_expert_gate\.weight", "layers/{layer}/mlp/shared_gate/kernel", "linear"),
    Rule(r"mtp\..*", None, "skip"),  # multi-token prediction (transformers ignores it on load)
)


def _linear_layers(g, n: int) -> tuple[bool, ...]:
  types = g("layer_types")
  if types is None:
    interval = int(g("full_attention_interval"))
    if interval < 1:
      g.fail(f"full_attention_interval={interval} must be >= 1")
    types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
  if len(types) != n or any(t not in ("linear_attention", "full_attention") for t in types):
    g.fail(f"layer_types={types}: expected {n} entries, each linear_attention or full_attention")
  return tuple(t == "linear_attention" for t in types)


def _hybrid_fields(g, common: dict) -> dict:
  """The fields Qwen3-Next and Qwen3.5-MoE share: the layer pattern, the linear attention, the gated attention, the
  shared expert, the norms."""
  if not g("attn_output_gate"):
    g.fail("attn_output_gate=false: transformers' Qwen3-Next / Qwen3.5 attention always gates its output")
  bias = bool(g("attention_bias"))
  return dict(
      moe_intermediate_size=int(g("moe_intermediate_size")), num_experts=int(g("num_experts")),
      num_experts_per_tok=int(g("num_experts_per_tok")),
      shared_expert_size=int(g("shared_expert_intermediate_size")), shared_expert_gate=True,
      qkv_bias=bias, attn_out_bias=bias, qk_norm="head", attn_output_gate=True, norm_unit_offset=True,
      linear_layers=_linear_layers(g, common["num_layers"]), linear_k_heads=int(g("linear_num_key_heads")),
      linear_v_heads=int(g("linear_num_value_heads")), linear_k_dim=int(g("linear_key_head_dim")),
      linear_v_dim=int(g("linear_value_head_dim")), linear_conv_width=int(g("linear_conv_kernel_dim")))


def _build_qwen3_next(g, common: dict) -> dict:
  n_exp = int(g("num_experts"))
  return dict(_hybrid_fields(g, common), intermediate_size=int(g("intermediate_size")),
              moe_layers=sparse_layers(g, common["num_layers"], n_exp), norm_topk_prob=bool(g("norm_topk_prob")))


def _build_qwen3_5_moe_text(g, common: dict) -> dict:
  return dict(_hybrid_fields(g, common), intermediate_size=0, moe_layers=(True,) * common["num_layers"],
              norm_topk_prob=True)


_HYBRID_HANDLED = frozenset({
    "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok", "layer_types",
    "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "attention_bias", "partial_rotary_factor", "attn_output_gate"})
# mamba_ssm_dtype: the dtype serving engines keep the recurrent state in (transformers computes it in float32);
# mtp_*: the multi-token-prediction module (its weights are skipped)
_HYBRID_IGNORED = frozenset({"mamba_ssm_dtype", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings"})
# transformers' Qwen3NextConfig defaults (Qwen3-Next-80B-A3B's sizes); partial_rotary_factor 0.25 as its __post_init__
_HYBRID_DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False, linear_conv_kernel_dim=4,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10, num_experts=512,
    layer_types=None, full_attention_interval=4, partial_rotary_factor=0.25, attn_output_gate=True)

QWEN3_NEXT = Family(
    name="qwen3_next", model_types=("qwen3_next",), architectures=("Qwen3NextForCausalLM",),
    handled=_HYBRID_HANDLED | {"intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"},
    ignored=_HYBRID_IGNORED,
    defaults=dict(_HYBRID_DEFAULTS, intermediate_size=5632, decoder_sparse_step=1, mlp_only_layers=None,
                  norm_topk_prob=True),
    build=_build_qwen3_next,
    rules=_GATED_Q + COMMON_RULES + _LINEAR_COMMON + _MOE + (
        Rule(_LIN + r"in_proj_qkvz\.weight", (_T + "wq", _T + "wk", _T + "wv", _T + "wz"), "split",
             split=_split_qkvz),
        Rule(_LIN + r"in_proj_ba\.weight", (_T + "wb", _T + "wa"), "split", split=_split_ba),
    ))

QWEN3_5_MOE_TEXT = Family(
    name="qwen3_5_moe_text", model_types=("qwen3_5_moe_text",), architectures=("Qwen3_5MoeForCausalLM",),
    handled=_HYBRID_HANDLED | {"mrope_section"},  # only as a rope_parameters key (hf_config._rope)
    ignored=_HYBRID_IGNORED,
    # transformers' Qwen3_5MoeTextConfig defaults (Qwen3.5-35B-A3B's sizes)
    defaults=dict(_HYBRID_DEFAULTS, vocab_size=248320, num_hidden_layers=40, num_experts_per_tok=8, num_experts=256),
    build=_build_qwen3_5_moe_text,
    rules=_GATED_Q + BASE_RULES + _LINEAR_COMMON + _MOE + (
        Rule(_LIN + r"in_proj_qkv\.weight", (_T + "wq", _T + "wk", _T + "wv"), "split", split=_split_qkv),
        Rule(_LIN + r"in_proj_(?P<proj>[zab])\.weight", _T + "w{proj}", "linear"),
    ))


def hf_config(cfg, need, family: str) -> dict:
  """The ``qwen3_next`` / ``qwen3_5_moe_text`` config.json of ``cfg`` (the inverse of the gates above; ``need(cond,
  msg)`` refuses what has no equivalent), without the model's common fields (``export._common`` adds them)."""
  need(cfg.linear_on_any and cfg.attn_output_gate and cfg.norm_unit_offset and cfg.qk_norm == "head"
       and cfg.qkv_bias == cfg.attn_out_bias and not cfg.attn_windows,
       "Gated DeltaNet layers, gated attention with the per-head q/k norm, norms by 1 + w, no sliding window")
  need(cfg.shared_expert_gate and cfg.router_scoring == "softmax" and cfg.norm_topk_eps == 0.0,
       "softmax top-k routing and a sigmoid-gated shared expert")
  out = dict(model_type=family, moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
             num_experts_per_tok=cfg.num_experts_per_tok, shared_expert_intermediate_size=cfg.shared_expert_size,
             attention_bias=cfg.qkv_bias, linear_num_key_heads=cfg.linear_k_heads,
             linear_num_value_heads=cfg.linear_v_heads, linear_key_head_dim=cfg.linear_k_dim,
             linear_value_head_dim=cfg.linear_v_dim, linear_conv_kernel_dim=cfg.linear_conv_width,
             layer_types=["linear_attention" if cfg.linear_on(i) else "full_attention" for i in range(cfg.num_layers)])
  if family == "qwen3_5_moe_text":
    need(all(cfg.moe_layers) and cfg.norm_topk_prob, "MoE on every layer, renormalised (Qwen3.5 always is)")
    return dict(out, architectures=["Qwen3_5MoeForCausalLM"])
  return dict(out, architectures=["Qwen3NextForCausalLM"], intermediate_size=cfg.intermediate_size,
              norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
              mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m])


def hf_mixer_tensors(cfg, layer: dict, pre: str, family: str) -> dict:
  """One layer's token-mixer tensors under their HF names (``pre`` = "model.layers.{i}."): the gated q_proj (query and
  gate rows per head, and its bias), or the linear attention's projections fused as ``family`` stores them."""
  if "attn" in layer:
    a = layer["attn"]
    h, c = a["wq"].shape[1:]
    out = {pre + "self_attn.q_proj.weight": np.concatenate([a["wq"], a["wg"]], -1).reshape(-1, h * 2 * c).T}
    if "bq" in a:
      out[pre + "self_attn.q_proj.bias"] = np.concatenate([a["bq"], a["bg"]], -1).reshape(-1)
    return out
  p, la = layer["linear_attn"], pre + "linear_attn."
  d, k, _ = p["wq"].shape
  out = {la + "conv1d.weight": np.concatenate([p[n].reshape(p[n].shape[0], -1) for n in ("conv_q", "conv_k", "conv_v")],
                                              -1).T[:, None],
         la + "dt_bias": p["dt_bias"], la + "A_log": p["a_log"], la + "norm.weight": p["norm"],
         la + "out_proj.weight": p["wo"].reshape(-1, d).T}
  if family == "qwen3_5_moe_text":
    out[la + "in_proj_qkv.weight"] = np.concatenate([p[n].reshape(d, -1) for n in ("wq", "wk", "wv")], -1).T
    out.update({la + f"in_proj_{n}.weight": p["w" + n].reshape(d, -1).T for n in "zab"})
    return out
  grouped = [p[n].reshape(d, k, -1) for n in ("wq", "wk", "wv", "wz")]  # per key head: q, k, its value heads' v, z
  out[la + "in_proj_qkvz.weight"] = np.concatenate(grouped, -1).reshape(d, -1).T
  out[la + "in_proj_ba.weight"] = np.concatenate([p[n].reshape(d, k, -1) for n in ("wb", "wa")], -1).reshape(d, -1).T
  return out
