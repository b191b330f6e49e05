"""Carving: a dense FFN split into a shared expert and E routed experts by its neurons (MoEfication, Zhang
et al. 2022; LLaMA-MoE, Zhu et al. 2024; CMoE, Pei et al. 2025), instead of copied into E equal experts.

For each chosen layer, on calibration text (a seeded sample of ``calib_tokens`` tokens):

1. **Activations.** The FFN input ``x`` (``bmoe_jax.model.mlp_inputs``) and each neuron's down_proj input
   ``h_j = act(x w_gate_j) (x w_up_j)``; a neuron's contribution to a token is ``|h_j| * ||w_down_j||``
   and it is *active* on a token when that contribution is among the token's top ``active_frac`` of
   neurons.
2. **Shared expert.** The ``shared_neurons`` most often active neurons.
3. **Routed experts.** The rest, split into E equal experts by balanced k-means of their activation
   patterns (binary vectors over the calibration tokens: neurons that fire together share an expert).
4. **Router**, without training: least squares from ``x`` to each expert's output norm
   ``||h_e W_down_e||`` (ridge-regularised), so the router's top-k are the experts it predicts to
   matter most. ``router_steps > 0`` then trains it briefly on the same tokens (Adam, cross-entropy to
   the oracle's top-k set: the k experts of largest output norm). Fitted on 80% of the calibration
   tokens; its agreement with the oracle top-k is reported on the other 20%.

The MoE layer is ``shared(x) + sum_{e in top-k} 1 * expert_e(x)``: ``MoEConfig.router_scoring="select"``
(gate exactly 1 for a selected expert), so with every expert selected (k = E) it is the dense FFN
exactly: the neurons are only partitioned. **Layout**: bmoe_jax's own converted directory (config.json +
orbax params, ``bmoe_jax.checkpoint.save_params``), because no transformers MoE family has unit gates:
written as Qwen2-MoE, transformers would weight each expert by its softmax probability.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig
from bmoe_jax.nn.layers import activation


class LayerCarve(NamedTuple):
  shared_idx: np.ndarray  # [s] neuron ids of the shared expert
  expert_idx: np.ndarray  # [e, f] neuron ids of each routed expert
  router_de: np.ndarray  # [d, e]
  oracle_agreement: float  # fraction of the oracle's top-k experts the router's top-k finds (held-out tokens)
  load_entropy: float  # how evenly the router's top-k picks spread over the experts (1: even, 0: static)


def calibration_tokens(tok, text: str, num_tokens: int, seq_len: int, seed: int) -> np.ndarray:
  """[n, seq_len] token windows drawn without overlap (seeded) from the tokenised ``text``."""
  ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
  n_windows = len(ids) // seq_len
  want = -(-num_tokens // seq_len)
  if n_windows < want:
    raise ValueError(f"calibration text has {len(ids)} tokens: fewer than calib_tokens={num_tokens}")
  pick = np.sort(np.random.default_rng(seed).permutation(n_windows)[:want])
  return ids[:n_windows * seq_len].reshape(n_windows, seq_len)[pick]


def collect_inputs(params, cfg: MoEConfig, windows_ns, layers, batch_size: int = 8, progress: bool = True):
  """{layer: [tokens, d] float32}: every chosen layer's FFN input on the calibration windows."""
  from tqdm.auto import tqdm

  from bmoe_jax.model import mlp_inputs

  fn = jax.jit(lambda p, t: mlp_inputs(p, cfg, t, layers=tuple(layers)))
  out = {l: [] for l in layers}
  for lo in tqdm(range(0, len(windows_ns), batch_size), desc="calibration", disable=not progress, leave=False):
    got = fn(params, jnp.asarray(windows_ns[lo:lo + batch_size]))
    for l in layers:
      out[l].append(np.asarray(got[l], np.float32).reshape(-1, cfg.hidden_size))
  return {l: np.concatenate(v) for l, v in out.items()}


def neuron_activations(mlp: dict, x_nd: np.ndarray, act: str) -> np.ndarray:
  """h [n, F] = act(x w_gate) * (x w_up) of a dense gated MLP."""
  x = jnp.asarray(x_nd)
  return np.asarray(activation(act)(x @ jnp.asarray(mlp["w_gate"])) * (x @ jnp.asarray(mlp["w_up"])))


def active_pattern(h_nf: np.ndarray, w_down_fd: np.ndarray, active_frac: float) -> np.ndarray:
  """[n, F] bool: per token, the neurons whose contribution |h| ||w_down|| is in its top ``active_frac``."""
  contrib_nf = np.abs(h_nf) * np.linalg.norm(w_down_fd, axis=1)[None]
  top = max(1, int(round(active_frac * h_nf.shape[1])))
  kth = np.partition(contrib_nf, -top, axis=1)[:, -top][:, None]
  return contrib_nf >= kth


def balanced_kmeans(x_rn: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
  """[k, r/k] row ids of ``x`` [r, n] in k clusters of equal size (k-means; each step assigns greedily in
  order of increasing distance, a cluster taking rows until full)."""
  r = x_rn.shape[0]
  if r % k:
    raise ValueError(f"{r} neurons do not split into {k} equal experts")
  cap = r // k
  centers = x_rn[np.random.default_rng(seed).choice(r, k, replace=False)].astype(np.float64)
  assign = np.zeros(r, np.int64)
  for _ in range(iters):
    d_rk = (np.sum(x_rn ** 2, 1)[:, None] - 2 * x_rn @ centers.T + np.sum(centers ** 2, 1)[None])
    assign = np.full(r, -1)
    load = np.zeros(k, np.int64)
    for flat in np.argsort(d_rk, axis=None, kind="stable"):
      i, c = divmod(int(flat), k)
      if assign[i] < 0 and load[c] < cap:
        assign[i], load[c] = c, load[c] + 1
    new = np.stack([x_rn[assign == c].mean(0) for c in range(k)])
    if np.allclose(new, centers):
      break
    centers = new
  return np.stack([np.flatnonzero(assign == c) for c in range(k)])


def expert_norms(h_nf: np.ndarray, w_down_fd: np.ndarray, expert_idx: np.ndarray) -> np.ndarray:
  """[n, e]: the norm of each routed expert's output on each token."""
  return np.stack([np.linalg.norm(h_nf[:, idx] @ w_down_fd[idx], axis=1) for idx in expert_idx], axis=1)


def fit_router(x_nd: np.ndarray, norms_ne: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
  """[d, e]: least squares from the FFN input to the experts' output norms (ridge relative to tr(X^T X)/d)."""
  xtx = x_nd.T.astype(np.float64) @ x_nd
  reg = ridge * np.trace(xtx) / xtx.shape[0]
  return np.linalg.solve(xtx + reg * np.eye(xtx.shape[0]), x_nd.T.astype(np.float64) @ norms_ne).astype(np.float32)


def agreement(router_de, x_nd, norms_ne, top_k: int) -> float:
  """The fraction of the oracle's top-k experts (largest output norms) in the router's top-k."""
  mine = np.argsort(-(x_nd @ router_de), axis=1)[:, :top_k]
  oracle = np.argsort(-norms_ne, axis=1)[:, :top_k]
  return float(np.mean([len(set(a) & set(b)) / top_k for a, b in zip(mine, oracle)]))


def load_entropy(router_de, x_nd, top_k: int) -> float:
  """How evenly the router's top-k spreads over the E experts: the entropy H of the pick frequencies,
  (H - log k) / (log E - log k): 1 when every expert is picked equally often, 0 when the same k experts
  serve every token (a static router)."""
  picks = np.argsort(-(x_nd @ router_de), axis=1)[:, :top_k]
  freq_e = np.bincount(picks.ravel(), minlength=router_de.shape[1]) / picks.size
  h = -np.sum(freq_e * np.log(np.where(freq_e > 0, freq_e, 1.0)))
  e = router_de.shape[1]
  return float((h - np.log(top_k)) / (np.log(e) - np.log(top_k))) if e > top_k else 1.0


def train_router(router_de, x_nd, norms_ne, top_k: int, steps: int, lr: float = 1e-3, seed: int = 0):
  """Adam on the cross-entropy between softmax(x W) and the oracle's top-k set (uniform over it)."""
  import optax

  oracle = np.argsort(-norms_ne, axis=1)[:, :top_k]
  target_ne = np.zeros_like(norms_ne, np.float32)
  np.put_along_axis(target_ne, oracle, 1.0 / top_k, axis=1)
  x, t = jnp.asarray(x_nd), jnp.asarray(target_ne)
  scale = float(np.std(x_nd @ router_de)) or 1.0
  w = jnp.asarray(router_de / scale)  # logits of unit spread: the softmax starts neither flat nor saturated
  opt = optax.adam(lr)

  @jax.jit
  def step(w, state):
    loss, g = jax.value_and_grad(lambda w: -jnp.mean(jnp.sum(t * jax.nn.log_softmax(x @ w), -1)))(w)
    upd, state = opt.update(g, state)
    return optax.apply_updates(w, upd), state, loss

  state = opt.init(w)
  for _ in range(steps):
    w, state, _ = step(w, state)
  return np.asarray(w)


def carve_layer(mlp: dict, x_nd: np.ndarray, act: str, *, num_experts: int, top_k: int, shared_neurons: int,
                active_frac: float, router_steps: int, seed: int) -> LayerCarve:
  """Split one dense FFN (module docstring, steps 1-4)."""
  w_down = np.asarray(mlp["w_down"], np.float32)
  h_nf = neuron_activations(mlp, x_nd, act)
  active_nf = active_pattern(h_nf, w_down, active_frac)
  order = np.argsort(-active_nf.mean(0), kind="stable")
  shared_idx, rest = np.sort(order[:shared_neurons]), order[shared_neurons:]
  groups = balanced_kmeans(active_nf[:, rest].T.astype(np.float32), num_experts, seed=seed)
  expert_idx = np.sort(rest[groups], axis=1)
  norms_ne = expert_norms(h_nf, w_down, expert_idx)
  fit_n, held_n = _split(len(x_nd), seed)
  router = fit_router(x_nd[fit_n], norms_ne[fit_n])
  if router_steps:
    router = train_router(router, x_nd[fit_n], norms_ne[fit_n], top_k, router_steps, seed=seed)
  x_held, norms_held = x_nd[held_n], norms_ne[held_n]
  return LayerCarve(shared_idx, expert_idx, router, agreement(router, x_held, norms_held, top_k),
                    load_entropy(router, x_held, top_k))


def _split(n: int, seed: int, held_out: float = 0.2):
  """Seeded (fit, held-out) token indices: the router is fitted on one, its agreement measured on the other."""
  perm = np.random.default_rng(seed).permutation(n)
  cut = n - max(1, int(held_out * n))
  return np.sort(perm[:cut]), np.sort(perm[cut:])


def carved_mlp(mlp: dict, carve: LayerCarve) -> dict:
  """The MoE layer's parameters: experts stacked from the neuron groups, the shared expert, the router."""
  w = {k: np.asarray(v, np.float32) for k, v in mlp.items()}
  experts = {"w_gate": np.stack([w["w_gate"][:, i] for i in carve.expert_idx]),
             "w_up": np.stack([w["w_up"][:, i] for i in carve.expert_idx]),
             "w_down": np.stack([w["w_down"][i] for i in carve.expert_idx])}
  out = {"router": {"kernel": carve.router_de}, "experts": experts}
  if len(carve.shared_idx):
    s = carve.shared_idx
    out["shared"] = {"w_gate": w["w_gate"][:, s], "w_up": w["w_up"][:, s], "w_down": w["w_down"][s]}
  return out


def carved_config(cfg: MoEConfig, layers, *, num_experts: int, top_k: int, shared_neurons: int) -> MoEConfig:
  width = cfg.intermediate_size - shared_neurons
  if width <= 0 or width % num_experts:
    raise ValueError(f"carve: {cfg.intermediate_size} neurons minus shared_neurons={shared_neurons} do not "
                     f"split into num_experts={num_experts} equal experts")
  return cfg.replace(moe_layers=tuple(i in layers for i in range(cfg.num_layers)), num_experts=num_experts,
                     num_experts_per_tok=top_k, moe_intermediate_size=width // num_experts,
                     shared_expert_size=shared_neurons, shared_expert_gate=False, norm_topk_prob=False,
                     router_scoring="select", family="carved")


def carve(cfg: MoEConfig, params: dict, tok, text: str, *, layers, num_experts: int, top_k: int,
          shared_neurons: int, active_frac: float, calib_tokens: int, router_steps: int, seed: int,
          calib_seq: int = 256, progress: bool = True) -> tuple[MoEConfig, dict, dict]:
  """Dense ``(cfg, params)`` -> the carved MoE ``(cfg, params, report)`` with ``layers`` carved (module
  docstring); ``report``: per layer the router's agreement with the oracle top-k (held-out tokens) and
  the shared expert's mean share of the FFN output energy per calibration token."""
  if any(cfg.moe_layers):
    raise ValueError(f"carve: the source already has MoE layers {list(cfg.moe_layer_ids)}; pass a dense model")
  if not 0 < active_frac <= 1:
    raise ValueError(f"carve: active_frac={active_frac} must be in (0, 1]")
  new_cfg = carved_config(cfg, layers, num_experts=num_experts, top_k=top_k, shared_neurons=shared_neurons)
  windows = calibration_tokens(tok, text, calib_tokens, calib_seq, seed)
  inputs = collect_inputs(params, cfg, windows, layers, progress=progress)
  out = {k: v for k, v in params.items() if k != "layers"}
  out["layers"], report = [], {}
  for i, layer in enumerate(params["layers"]):
    layer = dict(layer)
    if i in layers:
      lc = carve_layer(layer["mlp"], inputs[i], cfg.hidden_act, num_experts=num_experts, top_k=top_k,
                       shared_neurons=shared_neurons, active_frac=active_frac, router_steps=router_steps,
                       seed=seed + i)
      report[i] = {"oracle_agreement": lc.oracle_agreement, "load_entropy": lc.load_entropy,
                   "shared_energy": shared_energy(layer["mlp"], inputs[i], cfg.hidden_act, lc.shared_idx)}
      layer["mlp"] = carved_mlp(layer["mlp"], lc)
    out["layers"].append(layer)
  return new_cfg, out, {"calib_windows": int(len(windows)), "calib_seq": calib_seq, "layers": report}


def shared_energy(mlp: dict, x_nd: np.ndarray, act: str, shared_idx: np.ndarray) -> float:
  """The mean over calibration tokens of ||shared(x)||^2 / ||FFN(x)||^2 (per token: a few tokens with
  massive activations would dominate a ratio of sums)."""
  h_nf = neuron_activations(mlp, x_nd, act)
  w_down = np.asarray(mlp["w_down"], np.float32)
  full_n = np.sum((h_nf @ w_down) ** 2, 1)
  part_n = np.sum((h_nf[:, shared_idx] @ w_down[shared_idx]) ** 2, 1)
  return float(np.mean(part_n / np.maximum(full_n, 1e-30)))
