"""The numerics of healing a carved MoE (``convert.heal``): pure functions of arrays, jit- and vmap-safe.

Shapes in names: n tokens, v vocabulary, k kept teacher tokens (top-k) or routed slots, e experts,
l carved layers (their MoE parameters stacked on a leading axis), d model width.

* ``softmax_gated``: a carved MoE with unit gates (``router_scoring="select"``) rewritten as a Qwen2-MoE
  (softmax top-k gates renormalised over the k, a sigmoid-gated shared expert) that computes nearly the
  same function: every routed expert's down_proj is multiplied by k and the router scaled so its logits
  have a small spread (the k renormalised gates start near 1/k each); the shared expert's down_proj is
  doubled and its gate kernel set to zero (sigmoid 0 = 1/2). The top-k sets are unchanged (a positive
  scale keeps the order), so the healed model starts where the carve left it, and its gates can learn.
* ``topk_kl``: KL(teacher || student) per token on the teacher's top-k tokens plus one bucket for the
  rest of the vocabulary: the exact KL of the two distributions coarsened to k + 1 outcomes, a lower
  bound of the full KL (equal to it when the bucket is empty).
* ``load_balance``: the Switch / Mixtral auxiliary loss ``E * sum_e f_e P_e`` (f_e: the share of routed
  slots that go to e, P_e: e's mean router probability); 1 when routing is uniform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig


def softmax_gated(cfg: MoEConfig, params: dict, x_by_layer: dict, init_std: float) -> tuple[MoEConfig, dict]:
  """The Qwen2-MoE form of a carved MoE (module docstring). ``x_by_layer``: {layer: [n, d]} MLP inputs on
  which each router is scaled so that its logits' standard deviation (over tokens and experts) is
  ``init_std``."""
  if cfg.router_scoring != "select":
    raise ValueError(f"softmax_gated: expects a carved MoE (router_scoring='select'), got {cfg.router_scoring!r}")
  k = cfg.num_experts_per_tok
  new_cfg = cfg.replace(router_scoring="softmax", norm_topk_prob=True, family="qwen2_moe",
                        shared_expert_gate=bool(cfg.shared_expert_size))
  layers = []
  for i, layer in enumerate(params["layers"]):
    if not cfg.moe_layers[i]:
      layers.append(layer)
      continue
    mlp = {name: dict(v) for name, v in layer["mlp"].items()}
    kernel = np.asarray(mlp["router"]["kernel"], np.float32)
    spread = float(np.std(np.asarray(x_by_layer[i], np.float32) @ kernel)) or 1.0
    mlp["router"]["kernel"] = kernel * (init_std / spread)
    mlp["experts"]["w_down"] = np.asarray(mlp["experts"]["w_down"], np.float32) * k
    if "shared" in mlp:
      mlp["shared"]["w_down"] = np.asarray(mlp["shared"]["w_down"], np.float32) * 2.0
      mlp["shared_gate"] = {"kernel": np.zeros((cfg.hidden_size, 1), np.float32)}
    layers.append({**layer, "mlp": mlp})
  return new_cfg, {**params, "layers": layers}


def topk_kl(t_logp_nk: jax.Array, t_idx_nk: jax.Array, s_logp_nv: jax.Array) -> jax.Array:
  """[n]: KL(teacher || student) on the teacher's top-k tokens plus the rest's bucket (module docstring).
  ``t_logp_nk``: the teacher's log-probabilities of its top-k tokens ``t_idx_nk``; ``s_logp_nv``: the
  student's log-softmax over the vocabulary."""
  s_logp_nk = jnp.take_along_axis(s_logp_nv, t_idx_nk, axis=-1)
  t_p_nk = jnp.exp(t_logp_nk)
  kept = jnp.sum(t_p_nk * (t_logp_nk - s_logp_nk), axis=-1)
  t_rest_n = jnp.clip(1.0 - jnp.sum(t_p_nk, -1), 0.0, 1.0)
  s_rest_n = jnp.clip(1.0 - jnp.sum(jnp.exp(s_logp_nk), -1), 1e-12, 1.0)
  rest = jnp.where(t_rest_n > 0, t_rest_n * (jnp.log(jnp.maximum(t_rest_n, 1e-12)) - jnp.log(s_rest_n)), 0.0)
  return kept + rest


def load_balance(logits_ne: jax.Array, expert_nk: jax.Array, weight_n: jax.Array | None = None):
  """(``E * sum_e f_e P_e``, f_e [e]): the auxiliary loss and each expert's share of the routed slots,
  over the tokens with ``weight_n`` 1 (default all)."""
  n, e = logits_ne.shape
  w_n = jnp.ones((n,), jnp.float32) if weight_n is None else weight_n.astype(jnp.float32)
  counts_e = jnp.sum(jax.nn.one_hot(expert_nk, e, dtype=jnp.float32) * w_n[:, None, None], axis=(0, 1))
  f_e = counts_e / jnp.maximum(jnp.sum(counts_e), 1.0)
  p_e = jnp.sum(jax.nn.softmax(logits_ne, -1) * w_n[:, None], 0) / jnp.maximum(jnp.sum(w_n), 1.0)
  return e * jnp.sum(jax.lax.stop_gradient(f_e) * p_e), f_e


def load_evenness(f_e: np.ndarray, top_k: int) -> float:
  """(H(f) - log k) / (log E - log k) of the slot shares f: 1 when every expert serves equally, 0 when the
  same k experts serve every token (as ``convert.carve.load_entropy``)."""
  f_e = np.asarray(f_e, np.float64)
  e = f_e.shape[0]
  h = -np.sum(f_e * np.log(np.where(f_e > 0, f_e, 1.0)))
  return float((h - np.log(top_k)) / (np.log(e) - np.log(top_k))) if e > top_k else 1.0


def stack_layers(params: dict, layer_ids) -> dict:
  """The MoE MLP parameters of ``layer_ids`` stacked on a leading axis (one tree)."""
  return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *[params["layers"][i]["mlp"]
                                                                             for i in layer_ids])


def with_layers(params: dict, layer_ids, stacked: dict) -> dict:
  """``params`` with the MLPs of ``layer_ids`` taken from ``stacked`` (``stack_layers``'s layout)."""
  layers = list(params["layers"])
  for j, i in enumerate(layer_ids):
    layers[i] = {**layers[i], "mlp": jax.tree.map(lambda a: a[j], stacked)}
  return {**params, "layers": layers}
