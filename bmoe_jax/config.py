"""The one family-agnostic model configuration (frozen dataclass)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")
# softmax: top-k of softmax(router logits), gates = those probabilities (renormalised with norm_topk_prob);
# select: top-k of the router logits, every selected expert enters with gate 1 (carved MoEs, convert.carve).
# sparsemixer (Phi-3.5-MoE, top-2 at inference): the best expert gated by a softmax over the experts whose logit is
# within a relative gap 2 * router_jitter_eps of the best, then the same over the rest for the second.
SUPPORTED_SCORING = ("softmax", "sigmoid", "select", "sparsemixer")
# the deterministic router's selection (``nn.gating``): plain top-k, or limited to topk_group of n_group
# expert groups (DeepSeek-V2's group_limited_greedy, DeepSeek-V3's noaux_tc)
SUPPORTED_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# RMSNorm on the attention's q and k projections, before RoPE: none; per head over the head dim (Qwen3-MoE,
# scale [c]); over the full projection width (OLMoE, scale [heads, c]).
SUPPORTED_QK_NORM = ("none", "head", "full", "l2")
# The deterministic router's logits: "float32" (the default) from float32 copies of its input and weight;
# "native" by a matmul in the parameters' own dtype, then cast to float32 (transformers' order for Qwen-MoE,
# Mixtral, OLMoE and Granite in bfloat16: the same top-k sets on near-ties).
SUPPORTED_ROUTER_DTYPES = ("float32", "native")


def check_bounds(owner, bounds: dict[str, tuple]) -> None:
  """Refuse fields of the dataclass ``owner`` outside ``bounds``, naming the field and its command-line flag.

  Args:
    owner: the dataclass instance whose fields are checked (its class name goes into the message).
    bounds: ``{field: (low, high)}`` or ``{field: (low, high, strict)}``: the inclusive range, a bound None when
      open; ``strict`` true excludes low (high is always included). A field whose value is None (unset)
      passes; any other must be an int or float (not a bool) in range.

  Raises:
    ValueError: a field out of range or not a number, naming it and its flag ``--field-name``.
  """
  for name, (lo, hi, *strict) in bounds.items():
    v = getattr(owner, name)
    if v is None:
      continue
    strict = bool(strict and strict[0])
    bad = (lo is not None and (v <= lo if strict else v < lo)) or (hi is not None and v > hi)
    if bad or isinstance(v, bool) or not isinstance(v, (int, float)):
      want = " and ".join(x for x in ((f"> {lo}" if strict else f">= {lo}") if lo is not None else "",
                                      f"<= {hi}" if hi is not None else "") if x)
      raise ValueError(f"{type(owner).__name__}.{name} (--{name.replace('_', '-')}) = {v!r}: expected a number "
                       f"{want}")


# the scalar fields' annotations -> (accepted Python types, what the message asks for)
_SCALAR_KINDS = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false"),
                 "str": (str, "a string")}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Architecture of a decoder-only MoE transformer, independent of the HF family it came from.

  Layer pattern: ``moe_layers[i]`` says whether layer ``i`` holds a routed-expert block (else a dense
  MLP of width ``intermediate_size``). ``attn_windows[i]`` is the sliding-window length of layer ``i``
  (0: full causal attention).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  moe_intermediate_size: int
  num_experts: int
  num_experts_per_tok: int
  moe_layers: tuple[bool, ...]
  shared_expert_size: int = 0
  shared_expert_gate: bool = False
  norm_topk_prob: bool = False
  norm_topk_eps: float = 0.0
  routed_scaling_factor: float = 1.0
  router_scoring: str = "softmax"
  router_dtype: str = "float32"
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  router_bias: bool = False  # a per-expert selection bias (DeepSeek-V3's e_score_correction_bias): router/bias [E]
  router_logit_bias: bool = False  # the router is affine (GPT-OSS): router/logit_bias [E] added to the logits
  # GPT-OSS's experts: biases on gate, up and down (experts/b_gate, b_up [E, f], b_down [E, d]) and the clamped
  # SwiGLU (swiglu_limit > 0): (clip(up, -limit, limit) + 1) * g * sigmoid(swiglu_alpha * g), g = min(gate, limit)
  expert_bias: bool = False
  swiglu_limit: float = 0.0
  swiglu_alpha: float = 1.702
  attn_sinks: bool = False  # a learned sink logit per head joins each query's softmax (GPT-OSS): attn/sinks [h]
  # Llama-4: the router's (top-1) score scales the expert's input instead of its output
  router_on_input: bool = False
  # Llama-4's layers: rope_layers[i] False is a NoPE layer (no RoPE, no q/k norm; with nope_attn_scale > 0 its
  # queries at index t are scaled by 1 + nope_attn_scale * log1p(floor((t + 1) / nope_floor_scale))); None: RoPE on
  # every layer. attn_chunks[i] > 0: a query sees only the keys of its own chunk of that many positions (counted
  # from the first real token); None: no chunking.
  rope_layers: tuple[bool, ...] | None = None
  attn_chunks: tuple[int, ...] | None = None
  nope_attn_scale: float = 0.0
  nope_floor_scale: float = 8192.0
  # Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5; ``nn.linear_attention``): linear_layers[i] True makes layer
  # i's token mixer the gated delta rule, with linear_k_heads query/key heads of width linear_k_dim, linear_v_heads
  # value heads of width linear_v_dim and a causal depthwise convolution linear_conv_width wide; None: attention
  # in every layer.
  linear_layers: tuple[bool, ...] | None = None
  linear_k_heads: int = 0
  linear_v_heads: int = 0
  linear_k_dim: int = 0
  linear_v_dim: int = 0
  linear_conv_width: int = 4
  attn_output_gate: bool = False  # Qwen3-Next: sigmoid(x W_g) (attn/wg [d, h, c]) multiplies each head's output
  # Qwen3-Next's RMSNorms (decoder, final, q/k): x_hat * (1 + w) in float32, then cast; w is stored zero-centred
  norm_unit_offset: bool = False
  qkv_bias: bool = False
  attn_out_bias: bool = False
  qk_norm: str = "none"
  qkv_clip: float = 0.0  # > 0: q, k, v clamped to [-qkv_clip, qkv_clip] after the q/k norm (OLMoE's clip_qkv)
  # Granite-MoE's scalars: embeddings x embedding_multiplier; attention scores x attention_multiplier (0: the
  # usual head_dim ** -0.5); each sublayer's output x residual_multiplier before the residual add; logits /
  # logits_scaling.
  embedding_multiplier: float = 1.0
  attention_multiplier: float = 0.0
  residual_multiplier: float = 1.0
  logits_scaling: float = 1.0
  # Multi-head latent attention (DeepSeek-V2/V3), on when kv_lora_rank > 0: q from the input (or through a rank
  # q_lora_rank bottleneck with its RMSNorm), per-head k_nope and v from a rank kv_lora_rank latent (RMSNorm'd),
  # and one RoPE key of width head_dim shared by all heads. A head's q/k width is qk_nope_head_dim + head_dim,
  # its v width v_head_dim; the scores are scaled by that q/k width ** -0.5 (times yarn's mscale_all_dim term).
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  v_head_dim: int = 0
  # DeepSeek-V3.2's lightning indexer (with MLA's q latent): index_heads heads of width index_head_dim score the keys;
  # each query attends to its index_topk best (``nn.layers.index_selection``); 0: every key it may see
  index_topk: int = 0
  index_heads: int = 0
  index_head_dim: int = 0
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_interleave: bool = False  # RoPE rotates pairs (x0, x1), (x2, x3), ... (DeepSeek, ERNIE) instead of halves
  # partial RoPE (GLM-4.5's partial_rotary_factor): only the first rotary_dim of each q/k head's head_dim are
  # rotated (their frequencies over rotary_dim), the rest pass unrotated; 0: all of head_dim
  rotary_dim: int = 0
  # yarn (rope_type "yarn", transformers' _compute_yarn_parameters): the pre-training context, the ramp's
  # rotation bounds, mscale / mscale_all_dim (0: unset), an explicit attention_factor (0: derived), truncate.
  yarn_original_max_position: int = 0
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 0.0
  yarn_mscale_all_dim: float = 0.0
  yarn_attention_factor: float = 0.0
  yarn_truncate: bool = True
  # longrope (Phi-3.5-MoE, as transformers' PhimoeRotaryEmbedding runs it): frequencies divided by the short factors
  # [head_dim / 2] at every length; cos and sin times longrope_long_mscale once the batch's largest position reaches
  # longrope_original_max_position, else longrope_short_mscale; the long factors are kept for export only (that
  # forward never reads them)
  longrope_short_factor: tuple[float, ...] | None = None
  longrope_long_factor: tuple[float, ...] | None = None
  longrope_short_mscale: float = 1.0
  longrope_long_mscale: float = 1.0
  longrope_original_max_position: int = 0
  # llama3 (rope_type "llama3", transformers' _compute_llama3_parameters): its frequency bands and pre-training context
  llama3_low_freq_factor: float = 1.0
  llama3_high_freq_factor: float = 4.0
  llama3_original_max_position: int = 8192
  rms_norm_eps: float = 1e-6
  layer_norm: bool = False  # Phi-3.5-MoE: LayerNorms with bias (eps rms_norm_eps) in place of the RMSNorms
  lm_head_bias: bool = False  # Phi-3.5-MoE: lm_head/bias [vocab] added to the logits
  router_jitter_eps: float = 0.0  # sparsemixer's relative gap (Phi-3.5-MoE's router_jitter_noise)
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  attn_windows: tuple[int, ...] | None = None
  max_position_embeddings: int = 4096
  family: str = "generic"

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"MoEConfig: {msg}")

    for f in dataclasses.fields(self):
      v, kind = getattr(self, f.name), _SCALAR_KINDS.get(f.type)
      if kind is not None:
        ok = isinstance(v, kind[0]) and (kind[0] is bool or not isinstance(v, bool))
        need(ok, f"{f.name} must be {kind[1]}, got {v!r}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
    need(self.num_heads % self.num_kv_heads == 0,
         f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    need(len(self.moe_layers) == self.num_layers,
         f"moe_layers has {len(self.moe_layers)} entries, expected num_layers={self.num_layers}")
    if any(self.moe_layers):
      need(self.num_experts > 0 and self.moe_intermediate_size > 0,
           "MoE layers need num_experts > 0 and moe_intermediate_size > 0")
      need(0 < self.num_experts_per_tok <= self.num_experts,
           f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
    if not all(self.moe_layers):
      need(self.intermediate_size > 0, "dense layers need intermediate_size > 0")
    need(self.hidden_act in SUPPORTED_ACTIVATIONS,
         f"hidden_act={self.hidden_act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
    self._check_rope(need)
    self._check_attention(need)
    self._check_layer_variants(need)
    need(self.attention_multiplier >= 0, f"attention_multiplier must be >= 0, got {self.attention_multiplier}")
    need(self.logits_scaling != 0, "logits_scaling must be non-zero")
    self._check_routing(need)

  def _check_attention(self, need) -> None:
    """Latent attention, DeepSeek-V3.2's indexer, the q/k norm and clip."""
    if self.mla:
      need(self.qk_nope_head_dim > 0 and self.v_head_dim > 0 and self.q_lora_rank >= 0,
           "multi-head latent attention (kv_lora_rank > 0) needs qk_nope_head_dim > 0 and v_head_dim > 0")
      need(self.num_kv_heads == self.num_heads and self.qk_norm == "none" and not self.qkv_clip,
           "multi-head latent attention has one k/v per head (num_kv_heads = num_heads), no q/k norm or clip")
    if self.index_topk:
      need(self.mla and self.q_lora_rank > 0 and self.index_heads > 0 and self.index_head_dim >= self.head_dim,
           f"the indexer (index_topk={self.index_topk}) needs latent attention with a q latent (q_lora_rank > 0), "
           f"index_heads > 0 and index_head_dim >= the RoPE width head_dim={self.head_dim}")
    need(self.index_topk >= 0, f"index_topk must be >= 0, got {self.index_topk}")
    need(self.qk_norm in SUPPORTED_QK_NORM,
         f"qk_norm={self.qk_norm!r} is not supported (supported: {SUPPORTED_QK_NORM})")
    need(self.qkv_clip >= 0, f"qkv_clip must be >= 0, got {self.qkv_clip}")

  def _check_routing(self, need) -> None:
    """The router's dtype, selection method and groups, and its scoring rule."""
    need(self.router_dtype in SUPPORTED_ROUTER_DTYPES,
         f"router_dtype={self.router_dtype!r} is not supported (supported: {SUPPORTED_ROUTER_DTYPES})")
    need(self.topk_method in SUPPORTED_TOPK_METHODS,
         f"topk_method={self.topk_method!r} is not supported (supported: {SUPPORTED_TOPK_METHODS})")
    if self.topk_method != "greedy" and any(self.moe_layers):
      need(self.n_group >= 1 and self.num_experts % self.n_group == 0 and 1 <= self.topk_group <= self.n_group,
           f"n_group={self.n_group} must divide num_experts={self.num_experts} and 1 <= topk_group="
           f"{self.topk_group} <= n_group")
      need(self.topk_method != "noaux_tc" or self.num_experts // self.n_group >= 2,
           f"noaux_tc ranks groups by their two best experts: n_group={self.n_group} leaves groups of "
           f"{self.num_experts // self.n_group}")
      need(self.topk_group * (self.num_experts // self.n_group) >= self.num_experts_per_tok,
           f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts cannot hold "
           f"num_experts_per_tok={self.num_experts_per_tok}")
    need(self.router_scoring != "sparsemixer" or self.num_experts_per_tok == 2 or not any(self.moe_layers),
         f"sparsemixer routing selects 2 experts per token, got num_experts_per_tok={self.num_experts_per_tok}")
    need(not (self.layer_norm and self.norm_unit_offset), "layer_norm and norm_unit_offset exclude each other")
    need(self.router_scoring in SUPPORTED_SCORING,
         f"router_scoring={self.router_scoring!r} is not supported (supported: {SUPPORTED_SCORING})")

  def _check_layer_variants(self, need) -> None:
    """The per-layer patterns (windows, chunks, NoPE) and the 2025 families' mechanisms (GPT-OSS, Llama-4)."""
    for name in ("attn_windows", "rope_layers", "attn_chunks", "linear_layers"):
      value = getattr(self, name)
      need(value is None or len(value) == self.num_layers,
           f"{name} has {len(value or ())} entries, expected one per layer ({self.num_layers})")
    need(self.swiglu_limit >= 0, f"swiglu_limit must be >= 0 (0: the plain gated activation), got {self.swiglu_limit}")
    need(not (self.attn_sinks and self.mla), "attention sinks (attn_sinks) are not defined for latent attention")
    need(not self.router_on_input or self.num_experts_per_tok == 1,
         f"router_on_input (the score scales the expert's input) needs top-1 routing, got {self.num_experts_per_tok}")
    if self.linear_on_any:
      dims = {n: getattr(self, n) for n in ("linear_k_heads", "linear_v_heads", "linear_k_dim", "linear_v_dim",
                                            "linear_conv_width")}
      need(all(v > 0 for v in dims.values()), f"linear attention layers need positive {dims}")
      need(self.linear_v_heads % self.linear_k_heads == 0,
           f"linear_v_heads={self.linear_v_heads} must be a multiple of linear_k_heads={self.linear_k_heads}")
      need(not self.mla, "linear attention layers beside latent attention are not defined")

  def _check_rope(self, need) -> None:
    """The RoPE fields: a supported type, yarn's parameters, even widths, a partial width within the head."""
    need(self.rope_type in SUPPORTED_ROPE_TYPES,
         f"rope_type={self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if self.rope_type == "yarn":
      need(self.rope_factor > 0 and self.yarn_original_max_position > 0,
           "yarn RoPE needs rope_factor > 0 and yarn_original_max_position > 0")
    need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
    need(self.rotary_dim == 0 or (self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim),
         f"rotary_dim={self.rotary_dim} must be 0 (all of head_dim) or even and in (0, head_dim={self.head_dim}]")
    need(not (self.rotary_dim and self.mla), "partial RoPE (rotary_dim) is not defined for latent attention")
    if self.rope_type == "longrope":
      dim = self.rotary_dim or self.head_dim
      need(all(f is not None and len(f) == dim // 2 for f in (self.longrope_short_factor, self.longrope_long_factor))
           and self.longrope_original_max_position > 0,
           f"longrope RoPE needs longrope_short_factor and longrope_long_factor with {dim // 2} entries each (half "
           "the rotated width) and longrope_original_max_position > 0")

  @property
  def mla(self) -> bool:
    """Whether the attention is multi-head latent attention (DeepSeek-V2/V3)."""
    return self.kv_lora_rank > 0

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    return tuple(i for i, m in enumerate(self.moe_layers) if m)

  def window(self, layer: int) -> int:
    return 0 if self.attn_windows is None else int(self.attn_windows[layer])

  def chunk(self, layer: int) -> int:
    """Layer ``layer``'s attention chunk (0: none)."""
    return 0 if self.attn_chunks is None else int(self.attn_chunks[layer])

  @property
  def linear_on_any(self) -> bool:
    """Whether any layer's token mixer is linear attention."""
    return self.linear_layers is not None and any(self.linear_layers)

  def linear_on(self, layer: int) -> bool:
    """Whether layer ``layer``'s token mixer is Gated DeltaNet linear attention (else softmax attention)."""
    return self.linear_layers is not None and bool(self.linear_layers[layer])

  def rope_on(self, layer: int) -> bool:
    """Whether layer ``layer`` rotates q and k (False: a NoPE layer)."""
    return self.rope_layers is None or bool(self.rope_layers[layer])

  def replace(self, **kw) -> "MoEConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"MoEConfig.from_dict: unknown fields {unknown}")
    d = dict(d)
    d["moe_layers"] = tuple(bool(x) for x in d["moe_layers"])
    for name, kind in (("attn_windows", int), ("attn_chunks", int), ("rope_layers", bool), ("linear_layers", bool),
                       ("longrope_short_factor", float), ("longrope_long_factor", float)):
      if d.get(name) is not None:
        d[name] = tuple(kind(x) for x in d[name])
    return cls(**d)


def tiny_config(**overrides) -> MoEConfig:
  """A small random-init config for tests and examples.

  Args:
    overrides: ``MoEConfig`` fields replacing the defaults (e.g. ``num_layers=3`` with a ``moe_layers`` of 3).

  Returns:
    The ``MoEConfig``: vocabulary 128, width 32, 2 MoE layers, 4 query / 2 key-value heads of width 8, 4 experts
    of width 16 with top-2 routing, a gated shared expert of width 24, dense MLP width 64, q/k/v biases.
  """
  base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
              moe_layers=(True, True), shared_expert_size=24, shared_expert_gate=True,
              norm_topk_prob=False, qkv_bias=True)
  base.update(overrides)
  return MoEConfig(**base)
