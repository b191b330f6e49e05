"""Parameter layout: one table of shapes and logical axis names, from which init, shape checks
(converters), parameter counts and shardings are all derived.

Layout (``torch [out, in]`` weights are stored transposed, ``[in, out]``; experts stacked)::

  embed/embedding [vocab, d]                 final_norm/scale [d]      lm_head/kernel [d, vocab]
  layers/i/attn_norm/scale [d]               layers/i/mlp_norm/scale [d]
  layers/i/attn/{wq [d,h,c], wk [d,kv,c], wv [d,kv,c], wo [h,c,d], bq [h,c], bk/bv [kv,c], bo [d]}
  dense layer: layers/i/mlp/{w_gate [d,f], w_up [d,f], w_down [f,d]}
  MoE layer:   layers/i/mlp/router/kernel [d,e]
               layers/i/mlp/experts/{w_gate [e,d,f], w_up [e,d,f], w_down [e,f,d]}
               layers/i/mlp/shared/{w_gate, w_up, w_down}     layers/i/mlp/shared_gate/kernel [d,1]
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


def layer_specs(cfg: MoEConfig, i: int) -> dict[str, Any]:
  d, h, kv, c = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = {"wq": ParamSpec((d, h, c), ("embed", "heads", "head_dim"), "normal"),
          "wk": ParamSpec((d, kv, c), ("embed", "kv_heads", "head_dim"), "normal"),
          "wv": ParamSpec((d, kv, c), ("embed", "kv_heads", "head_dim"), "normal"),
          "wo": ParamSpec((h, c, d), ("heads", "head_dim", "embed"), "normal")}
  if cfg.qkv_bias:
    attn["bq"] = ParamSpec((h, c), ("heads", "head_dim"), "zeros")
    attn["bk"] = ParamSpec((kv, c), ("kv_heads", "head_dim"), "zeros")
    attn["bv"] = ParamSpec((kv, c), ("kv_heads", "head_dim"), "zeros")
  if cfg.attn_out_bias:
    attn["bo"] = ParamSpec((d,), ("embed",), "zeros")
  if cfg.moe_layers[i]:
    mlp: dict[str, Any] = {
        "router": {"kernel": ParamSpec((d, cfg.num_experts), ("embed", "expert"), "normal")},
        "experts": _mlp_specs(d, cfg.moe_intermediate_size, cfg.num_experts)}
    if cfg.shared_expert_size:
      mlp["shared"] = _mlp_specs(d, cfg.shared_expert_size)
      if cfg.shared_expert_gate:
        mlp["shared_gate"] = {"kernel": ParamSpec((d, 1), ("embed", None), "normal")}
  else:
    mlp = _mlp_specs(d, cfg.intermediate_size)
  return {"attn_norm": {"scale": ParamSpec((d,), ("embed",), "ones")},
          "mlp_norm": {"scale": ParamSpec((d,), ("embed",), "ones")},
          "attn": attn, "mlp": mlp}


def param_specs(cfg: MoEConfig) -> dict[str, Any]:
  specs: dict[str, Any] = {
      "embed": {"embedding": ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal")},
      "layers": [layer_specs(cfg, i) for i in range(cfg.num_layers)],
      "final_norm": {"scale": ParamSpec((cfg.hidden_size,), ("embed",), "ones")},
  }
  if not cfg.tie_word_embeddings:
    specs["lm_head"] = {"kernel": ParamSpec((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal")}
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(cfg: MoEConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict[str, Any]:
  """Random init: normal(0, std) weights, unit norms, zero biases (as transformers' init)."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))

  def make(spec: ParamSpec, k):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
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
