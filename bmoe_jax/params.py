"""Parameter layout: one table of shapes and logical axis names, from which init, shape checks
(converters), parameter counts and shardings are all derived.

Layout (``torch [out, in]`` weights are stored transposed, ``[in, out]``; experts stacked)::

  embed/embedding [vocab, d]                 final_norm/scale [d]      lm_head/kernel [d, vocab]
  layers/i/attn_norm/scale [d]               layers/i/mlp_norm/scale [d]
  (Phi-3.5-MoE: every norm's bias [d], lm_head/bias [vocab])
  layers/i/attn/{wq [d,h,c], wk [d,kv,c], wv [d,kv,c], wo [h,c,d], bq [h,c], bk/bv [kv,c], bo [d]}
                q_norm/k_norm: [c] (qk_norm "head") or [h,c] / [kv,c] ("full"); output gate wg [d,h,c] (bg [h,c])
  linear attention layer (Gated DeltaNet; k key heads of width c, h value heads of width v, conv width w):
  layers/i/linear_attn/{wq, wk [d,k,c], wv, wz [d,h,v], wb, wa [d,h], conv_q, conv_k [w,k,c], conv_v [w,h,v],
                        dt_bias, a_log [h], norm [v], wo [h,v,d]}
  MLA (DeepSeek-V2/V3; n nope, r rope = head_dim, v value widths, q / l the q / kv latent ranks):
  layers/i/attn/{wq [d,h,n+r] | wq_a [d,q], q_a_norm [q], wq_b [q,h,n+r]; wkv_a [d,l+r], kv_a_norm [l],
                 wkv_b [l,h,n+v], wo [h,v,d]; with attention bias bq_a [q], bkv_a [l+r], bo [d];
                 DeepSeek-V3.2's indexer/{wq [q,i,c], wk [d,c], k_norm, k_norm_bias [c], w_weights [d,i]}}
  dense layer: layers/i/mlp/{w_gate [d,f], w_up [d,f], w_down [f,d]}
  MoE layer:   layers/i/mlp/router/kernel [d,e]   (router/bias [e]: a selection bias, DeepSeek-V3)
               layers/i/mlp/experts/{w_gate [e,d,f], w_up [e,d,f], w_down [e,f,d]}
               layers/i/mlp/shared/{w_gate, w_up, w_down}     layers/i/mlp/shared_gate/kernel [d,1]

Bayesian blocks (``Block``) are read and written here, and only here: a layer's routed experts'
down_proj ``[e, f, d]``, its shared expert's as ``[1, f_shared, d]``, its router weight as ``[1, d, E]`` (kind
``"router"``: the Laplace router, one more linear layer), or the LM head's answer rows as ``[1, d, C]``
(kind ``"head"``, last-layer Laplace; layer = the number of layers).

A parameter tree may carry one more top-level entry, ``"routing"``: the state of Bayesian routers
(``bmoe_jax.routing.plan.attach``), read only by a forward given a routing plan.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names, mapped to mesh axes by the sharding rules
  init: str  # "normal" | "ones" | "zeros"


def _mlp_specs(d: int, f: int, expert: int | None = None) -> dict[str, ParamSpec]:
  if expert is None:
    return {"w_gate": ParamSpec((d, f), ("embed", "mlp"), "normal"),
            "w_up": ParamSpec((d, f), ("embed", "mlp"), "normal"),
            "w_down": ParamSpec((f, d), ("mlp", "embed"), "normal")}
  return {"w_gate": ParamSpec((expert, d, f), ("expert", "embed", "mlp"), "normal"),
          "w_up": ParamSpec((expert, d, f), ("expert", "embed", "mlp"), "normal"),
          "w_down": ParamSpec((expert, f, d), ("expert", "mlp", "embed"), "normal")}


def _mla_specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
  d, h, r, n, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
  q, l = cfg.q_lora_rank, cfg.kv_lora_rank
  if q:
    attn = {"wq_a": ParamSpec((d, q), ("embed", "lora"), "normal"),
            "q_a_norm": ParamSpec((q,), ("lora",), "ones"),
            "wq_b": ParamSpec((q, h, n + r), ("lora", "heads", "head_dim"), "normal")}
  else:
    attn = {"wq": ParamSpec((d, h, n + r), ("embed", "heads", "head_dim"), "normal")}
  attn.update({"wkv_a": ParamSpec((d, l + r), ("embed", "lora"), "normal"),
               "kv_a_norm": ParamSpec((l,), ("lora",), "ones"),
               "wkv_b": ParamSpec((l, h, n + v), ("lora", "heads", "head_dim"), "normal"),
               "wo": ParamSpec((h, v, d), ("heads", "head_dim", "embed"), "normal")})
  if cfg.index_topk:  # DeepSeek-V3.2's indexer (small: replicated)
    i, c = cfg.index_heads, cfg.index_head_dim
    attn["indexer"] = {"wq": ParamSpec((q, i, c), ("lora", None, None), "normal"),
                       "wk": ParamSpec((d, c), ("embed", None), "normal"), "k_norm": ParamSpec((c,), (None,), "ones"),
                       "k_norm_bias": ParamSpec((c,), (None,), "zeros"),
                       "w_weights": ParamSpec((d, i), ("embed", None), "normal")}
  if cfg.qkv_bias:  # DeepSeek's attention_bias: on the two down-projections and o_proj
    if q:
      attn["bq_a"] = ParamSpec((q,), ("lora",), "zeros")
    attn["bkv_a"] = ParamSpec((l + r,), ("lora",), "zeros")
  return attn


def _attention_specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
  if cfg.mla:
    attn = _mla_specs(cfg)
    if cfg.attn_out_bias:
      attn["bo"] = ParamSpec((cfg.hidden_size,), ("embed",), "zeros")
    return attn
  d, h, kv, c = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = {"wq": ParamSpec((d, h, c), ("embed", "heads", "head_dim"), "normal"),
          "wk": ParamSpec((d, kv, c), ("embed", "kv_heads", "head_dim"), "normal"),
          "wv": ParamSpec((d, kv, c), ("embed", "kv_heads", "head_dim"), "normal"),
          "wo": ParamSpec((h, c, d), ("heads", "head_dim", "embed"), "normal")}
  if cfg.qkv_bias:
    attn["bq"] = ParamSpec((h, c), ("heads", "head_dim"), "zeros")
    attn["bk"] = ParamSpec((kv, c), ("kv_heads", "head_dim"), "zeros")
    attn["bv"] = ParamSpec((kv, c), ("kv_heads", "head_dim"), "zeros")
  if cfg.attn_output_gate:
    attn["wg"] = ParamSpec((d, h, c), ("embed", "heads", "head_dim"), "normal")
    if cfg.qkv_bias:
      attn["bg"] = ParamSpec((h, c), ("heads", "head_dim"), "zeros")
  if cfg.qk_norm == "head":
    attn["q_norm"] = ParamSpec((c,), ("head_dim",), _norm_init(cfg))
    attn["k_norm"] = ParamSpec((c,), ("head_dim",), _norm_init(cfg))
  elif cfg.qk_norm == "full":
    attn["q_norm"] = ParamSpec((h, c), ("heads", "head_dim"), "ones")
    attn["k_norm"] = ParamSpec((kv, c), ("kv_heads", "head_dim"), "ones")
  if cfg.attn_out_bias:
    attn["bo"] = ParamSpec((d,), ("embed",), "zeros")
  if cfg.attn_sinks:
    attn["sinks"] = ParamSpec((h,), ("heads",), "zeros")
  return attn


def _norm_init(cfg: MoEConfig) -> str:
  """The init of an RMSNorm scale: ones, or zeros when the norm multiplies by 1 + w (``norm_unit_offset``)."""
  return "zeros" if cfg.norm_unit_offset else "ones"


def _linear_attention_specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
  """A Gated DeltaNet token mixer (``nn.linear_attention.gated_deltanet``)."""
  d, k, h, c, v, w = (cfg.hidden_size, cfg.linear_k_heads, cfg.linear_v_heads, cfg.linear_k_dim, cfg.linear_v_dim,
                      cfg.linear_conv_width)
  qk, hv = ("embed", "kv_heads", "head_dim"), ("embed", "heads", "head_dim")
  return {"wq": ParamSpec((d, k, c), qk, "normal"), "wk": ParamSpec((d, k, c), qk, "normal"),
          "wv": ParamSpec((d, h, v), hv, "normal"), "wz": ParamSpec((d, h, v), hv, "normal"),
          "wb": ParamSpec((d, h), ("embed", "heads"), "normal"), "wa": ParamSpec((d, h), ("embed", "heads"), "normal"),
          "conv_q": ParamSpec((w, k, c), (None, "kv_heads", "head_dim"), "normal"),
          "conv_k": ParamSpec((w, k, c), (None, "kv_heads", "head_dim"), "normal"),
          "conv_v": ParamSpec((w, h, v), (None, "heads", "head_dim"), "normal"),
          "dt_bias": ParamSpec((h,), ("heads",), "ones"), "a_log": ParamSpec((h,), ("heads",), "zeros"),
          "norm": ParamSpec((v,), ("head_dim",), "ones"), "wo": ParamSpec((h, v, d), ("heads", "head_dim", "embed"),
                                                                          "normal")}


def _routed_specs(cfg: MoEConfig) -> dict[str, Any]:
  """The router and the routed experts of an MoE layer."""
  d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  router = {"kernel": ParamSpec((d, e), ("embed", "expert"), "normal")}
  if cfg.router_bias:
    router["bias"] = ParamSpec((e,), ("expert",), "zeros")
  if cfg.router_logit_bias:
    router["logit_bias"] = ParamSpec((e,), ("expert",), "zeros")
  experts = _mlp_specs(d, f, e)
  if cfg.expert_bias:
    experts.update({"b_gate": ParamSpec((e, f), ("expert", "mlp"), "zeros"),
                    "b_up": ParamSpec((e, f), ("expert", "mlp"), "zeros"),
                    "b_down": ParamSpec((e, d), ("expert", "embed"), "zeros")})
  return {"router": router, "experts": experts}


def layer_specs(cfg: MoEConfig, i: int) -> dict[str, Any]:
  d = cfg.hidden_size
  if cfg.moe_layers[i]:
    mlp: dict[str, Any] = _routed_specs(cfg)
    if cfg.shared_expert_size:
      mlp["shared"] = _mlp_specs(d, cfg.shared_expert_size)
      if cfg.shared_expert_gate:
        mlp["shared_gate"] = {"kernel": ParamSpec((d, 1), ("embed", None), "normal")}
  else:
    mlp = _mlp_specs(d, cfg.intermediate_size)
  mixer = {"linear_attn": _linear_attention_specs(cfg)} if cfg.linear_on(i) else {"attn": _attention_specs(cfg)}
  return {"attn_norm": _norm_specs(cfg), "mlp_norm": _norm_specs(cfg), **mixer, "mlp": mlp}


def _norm_specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
  """A block norm: scale [d] (and bias [d] for a LayerNorm, ``layer_norm``)."""
  d = cfg.hidden_size
  out = {"scale": ParamSpec((d,), ("embed",), _norm_init(cfg))}
  if cfg.layer_norm:
    out["bias"] = ParamSpec((d,), ("embed",), "zeros")
  return out


def param_specs(cfg: MoEConfig) -> dict[str, Any]:
  specs: dict[str, Any] = {
      "embed": {"embedding": ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal")},
      "layers": [layer_specs(cfg, i) for i in range(cfg.num_layers)],
      "final_norm": _norm_specs(cfg),
  }
  if not cfg.tie_word_embeddings:
    specs["lm_head"] = {"kernel": ParamSpec((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal")}
  if cfg.lm_head_bias:
    specs.setdefault("lm_head", {})["bias"] = ParamSpec((cfg.vocab_size,), ("vocab",), "zeros")
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(cfg: MoEConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02,
                bias_std: float = 0.0) -> dict[str, Any]:
  """Random init: normal(0, std) weights, unit norms, zero biases and sinks (as transformers' init); ``bias_std``
  > 0 draws those from normal(0, bias_std) instead (tests that exercise them)."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))

  def make(spec: ParamSpec, k):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros" and bias_std == 0:
      return jnp.zeros(spec.shape, dtype)
    if spec.init == "zeros":
      return (bias_std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
    return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def logical_axes(cfg: MoEConfig) -> dict[str, Any]:
  """The logical axis names of every parameter, in the params' tree structure."""
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: MoEConfig, dtype=jnp.float32) -> dict[str, Any]:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec)


def count_params(cfg: MoEConfig) -> dict[str, int]:
  """Total, routed-expert, and per-token active parameter counts."""
  specs = param_specs(cfg)
  total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(specs, is_leaf=_is_spec))
  expert = 0
  for i in cfg.moe_layer_ids:
    expert += sum(int(np.prod(s.shape)) for s in jax.tree.leaves(specs["layers"][i]["mlp"]["experts"],
                                                                  is_leaf=_is_spec))
  per_expert_share = cfg.num_experts_per_tok / cfg.num_experts if cfg.num_experts else 0.0
  active = total - expert + int(round(expert * per_expert_share))
  return {"total": total, "routed_experts": expert, "active_per_token": active,
          "embedding": cfg.vocab_size * cfg.hidden_size}


BLOCK_KINDS = ("routed", "shared", "router", "head")


class Block(NamedTuple):
  """One Bayesian set of weights: the routed experts' down_proj (``kind="routed"``), the shared expert's
  (``"shared"``), the router weight (``"router"``) of MoE layer ``layer``, or the LM head's answer rows
  (``"head"``).
  ``str(Block(3, "shared")) == "3.shared"``."""
  layer: int
  kind: str = "routed"

  def __str__(self):
    return f"{self.layer}.{self.kind}"


def as_block(key) -> Block:
  """A ``Block`` from a Block/tuple, an int layer id (its routed experts) or a string ``"3.shared"``."""
  if isinstance(key, str):
    layer, _, kind = key.partition(".")
    key = (int(layer), kind or "routed")
  if isinstance(key, (int, np.integer)):
    key = (int(key), "routed")
  blk = Block(int(key[0]), str(key[1]))
  if blk.kind not in BLOCK_KINDS:
    raise ValueError(f"block {key!r}: kind {blk.kind!r}, expected one of {BLOCK_KINDS}")
  return blk


def block_dims(cfg: MoEConfig, blk: Block) -> tuple[int, int, int]:
  """(experts, input width f, output width d) of an expert block's down_proj (the router: one "expert" from
  the model width to the experts' logits)."""
  if blk.kind == "shared":
    return 1, cfg.shared_expert_size, cfg.hidden_size
  if blk.kind == "router":
    return 1, cfg.hidden_size, cfg.num_experts
  if blk.kind == "head":
    raise ValueError(f"block {blk}: the head's width is the number of classes; use head_rows")
  return cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size


def head_rows(params, class_ids) -> jax.Array:
  """The LM head's answer rows W [d, C] (the tied embedding's when the model has no ``lm_head``)."""
  head_dv = params["lm_head"]["kernel"] if "kernel" in params.get("lm_head", {}) else params["embed"]["embedding"].T
  return head_dv[:, jnp.asarray(class_ids)]


def head_bias(params, class_ids) -> jax.Array | None:
  """The LM head's bias at the answer rows [C] (Phi-3.5-MoE's ``lm_head/bias``); None for a head without one."""
  bias_v = params.get("lm_head", {}).get("bias")
  return None if bias_v is None else bias_v[jnp.asarray(class_ids)]


def read_block(params, key, class_ids=None) -> jax.Array:
  """A block's weights ``[e, f, d]`` (shared expert ``[1, f_shared, d]``; head ``[1, d, C]`` of ``class_ids``)."""
  blk = as_block(key)
  if blk.kind == "head":
    if class_ids is None:
      raise ValueError(f"block {blk}: reading the head's answer rows needs class_ids")
    return head_rows(params, class_ids)[None]
  mlp = params["layers"][blk.layer]["mlp"]
  if blk.kind == "router":
    if "router" not in mlp:
      raise ValueError(f"block {blk}: layer {blk.layer} is not an MoE layer")
    return mlp["router"]["kernel"][None]
  if blk.kind == "shared":
    if "shared" not in mlp:
      raise ValueError(f"block {blk}: MoE layer {blk.layer} has no shared expert")
    return mlp["shared"]["w_down"][None]
  if "experts" not in mlp:
    raise ValueError(f"block {blk}: layer {blk.layer} is not an MoE layer")
  return mlp["experts"]["w_down"]


def read_blocks(params, keys, class_ids=None) -> dict[Block, jax.Array]:
  """``{block: read_block(...)}`` for every key."""
  return {as_block(k): read_block(params, k, class_ids) for k in keys}


def write_blocks(params, w_by_block: dict) -> dict[str, Any]:
  """A shallow copy of ``params`` with the given blocks' weights (``[e, f, d]``) replaced."""
  layers = list(params["layers"])
  for key, w in w_by_block.items():
    blk = as_block(key)
    if blk.kind == "head":
      raise ValueError(f"block {blk}: the head's answer rows are not written back into a model")
    lp = dict(layers[blk.layer])
    mlp = dict(lp["mlp"])
    if blk.kind == "shared":
      mlp["shared"] = {**mlp["shared"], "w_down": w[0]}
    elif blk.kind == "router":
      mlp["router"] = {**mlp["router"], "kernel": w[0]}
    else:
      mlp["experts"] = {**mlp["experts"], "w_down": w}
    lp["mlp"] = mlp
    layers[blk.layer] = lp
  return {**params, "layers": layers}
