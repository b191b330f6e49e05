"""Routing stability (the thesis' motivation experiment "mtv-1") and the cost of a router.

**Stability.** For every MoE layer l, the router input ``u`` of every real token (the forward's taps) is
perturbed, ``u' = u + eps``, ``eps ~ N(0, sigma^2 I)`` with ``sigma = gamma * L_l``, ``L_l`` the mean L2 norm of
the layer's router inputs over the evaluated tokens; the Jaccard index ``|E ∩ E'| / |E ∪ E'|`` of the top-k
sets before and after is averaged over tokens, per layer and gamma (the thesis' grid ``GAMMAS``). One layer is
perturbed at a time, everything upstream as in the forward. A stochastic router draws with the *same* key
before and after (common random numbers), so the index measures sensitivity to the input, not sampling
noise; that is reported apart, as ``resample``: the Jaccard of two independent draws on the same input.

**Cost.** ``router_flops`` counts the extra multiply-adds (x2) per token of a router over the deterministic
one at inference, from the config alone; ``forward_flops`` the whole forward per token (sequence length
``seq``, causal attention averaged over positions). The predictive of a stochastic router runs S forwards.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.nn import gating as G
from bmoe_jax.routing import routers as R
from bmoe_jax.routing.plan import layer_router, with_draw
from bmoe_jax.task import Batch, Task

GAMMAS = (0.001, 0.002, 0.005, 0.007, 0.01, 0.02, 0.05)


def _route_again(params, task: Task, layer: int, u_nd, key=None):
  """The layer's routing of inputs ``u_nd`` exactly as the forward routes (its router, dtype, training mode and
  key, or ``key``)."""
  cfg = task.cfg
  router = params["layers"][layer]["mlp"]["router"]
  found = layer_router(params, task.routing, layer)
  if found is None:
    return G.route_of(cfg, u_nd, router)
  rc, rp, layer_key, sample = found
  x = R.RouterIn(u_nd, router["kernel"], layer_key if key is None else key, sample, G.Gating.of(cfg),
                 cfg.num_experts_per_tok, task.routing.train, router.get("bias"))
  return R.apply(rc, rp, x)[0]


def _batch_stats(params, task: Task, batch: Batch, gammas, norms, key):
  """Per MoE layer: (sum of Jaccard per gamma [g], sum of resample Jaccard, tokens, sum of ||u||)."""
  _, taps = task.logits_and_taps(params, batch)
  mask_n = batch.mask_bs.reshape(-1).astype(jnp.float32)
  e = task.cfg.num_experts
  out = {}
  for layer, tap in taps.items():
    x_nd = tap.router_in_bsd.reshape(-1, tap.router_in_bsd.shape[-1])  # the model's dtype, as the forward
    u_nd = x_nd.astype(jnp.float32)
    ids_nk = tap.expert_bsk.reshape(u_nd.shape[0], -1)
    lkey = jax.random.fold_in(key, layer)
    noise_nd = jax.random.normal(lkey, u_nd.shape)
    noisy = [x_nd if g == 0 else (u_nd + g * norms[layer] * noise_nd).astype(x_nd.dtype) for g in gammas]
    jac = [jnp.sum(mask_n * G.jaccard(ids_nk, _route_again(params, task, layer, v).expert_nk, e)) for v in noisy]
    other = _route_again(params, task, layer, x_nd, key=jax.random.fold_in(lkey, 1)).expert_nk
    out[layer] = (jnp.stack(jac), jnp.sum(mask_n * G.jaccard(ids_nk, other, e)), jnp.sum(mask_n),
                  jnp.sum(mask_n * jnp.linalg.norm(u_nd, axis=-1)))
  return out


_batch_stats_jit = jax.jit(_batch_stats, static_argnames=("task", "gammas"))


def routing_stability(params, task: Task, batches: Sequence[Batch], *, gammas: Sequence[float] = GAMMAS,
                      key=None) -> dict:
  """{layer: {"gamma": [...], "jaccard": [...], "resample": float, "mean_norm": float}} (module docstring):
  the routing stability of every MoE layer the task's forward runs.

  Args:
    params (dict): the parameter tree; with ``task.routing``, carrying the routers' state (``attach``), whose key and
      sample index are replaced by a draw from ``key`` (sample 0).
    task: the scored task: its ``cfg``, its ``routing`` plan (None: deterministic routers), its forward.
    batches: the evaluated batches; only real tokens (``mask_bs`` 1) count.
    gammas: the noise scales, relative to each layer's mean router-input norm (sigma = gamma * L_l);
      default: the thesis' grid ``GAMMAS``.
    key (jax.Array | None): PRNG key of the input noise and the routers' draws; None: ``jax.random.key(0)``.

  Returns:
    ``{layer: {"gamma": list(gammas), "jaccard": [mean Jaccard index per gamma], "resample": mean Jaccard
      index of two independent draws on the unperturbed input (1.0 for a deterministic router), "mean_norm":
      L_l, the mean L2 norm of the router inputs}}``, means over the real tokens of all batches.
  """
  key = jax.random.key(0) if key is None else key
  params = with_draw(params, jax.random.fold_in(key, 7), 0) if task.routing is not None else params
  zeros = {l: jnp.zeros(()) for l in task.cfg.moe_layer_ids}
  # pass 1: the mean router-input norm per layer (gamma 0 costs one routing)
  first = [_batch_stats_jit(params, task=task, batch=b, gammas=(0.0,), norms=zeros, key=key) for b in batches]
  norms = {l: sum(s[l][3] for s in first) / sum(s[l][2] for s in first) for l in first[0]}
  sums = [_batch_stats_jit(params, task=task, batch=b, gammas=tuple(gammas), norms=norms,
                           key=jax.random.fold_in(key, i)) for i, b in enumerate(batches)]
  out = {}
  for l in norms:
    tokens = float(sum(s[l][2] for s in sums))
    out[l] = {"gamma": list(gammas), "jaccard": [float(x) for x in np.asarray(sum(s[l][0] for s in sums)) / tokens],
              "resample": float(sum(s[l][1] for s in sums)) / tokens, "mean_norm": float(norms[l])}
  return out


# --- cost -------------------------------------------------------------------------------------------------


def router_flops(rc: R.RouterConfig, d: int, e: int, tokens_per_forward: int = 128) -> float:
  """Extra FLOPs per token of router ``rc`` over the deterministic router (``2 d E``) at inference.
  Elementwise work (noise, exp, softmax, top-k) is counted as one FLOP per element and operation.

  Args:
    rc: the router's options (``kind``, ``inner_samples`` S, ``hidden_ratio``, ``swag_rank``, ``per_expert``).
    d: the model width (the router input's).
    e: the number of experts E.
    tokens_per_forward: tokens sharing one swag weight draw, over which its cost is spread (swag only;
      default 128, ``forward_flops``' default ``seq``).

  Returns:
    The extra FLOPs (2 per multiply-add, 1 per elementwise operation) per token of one forward; 0 for
      "deterministic" and "ensemble".
  """
  h = max(1, d // rc.hidden_ratio)
  s = rc.inner_samples
  mlp = lambda out: 2 * d * h + 2 * h * out
  return {
      "deterministic": 0.0,
      "temperature": 3.0 * e,  # Gumbel noise, scaling, add
      "mcdr": 3.0 * d,  # the mean of S masks is one Binomial draw: sample, mask, rescale
      "swag": (rc.swag_rank + 4.0) * d * e / tokens_per_forward,  # one weight draw per forward
      "ensemble": 0.0,
      "mfvr": 2.0 * d * e + mlp(e) + s * 5.0 * e + e,
      "fcvr": 2.0 * d * e + mlp(e * (e + 1) // 2) + s * (2.0 * e * e + 5.0 * e) + e,
      "vtsr": mlp(e if rc.per_expert else 1) + 5.0 * e,
  }[rc.kind]


def forward_flops(cfg, seq: int = 128) -> float:
  """FLOPs per token of the model's forward (matmuls; attention over ``seq`` causal positions, on average
  ``(seq + 1) / 2`` keys per query; the LM head on every position).

  Args:
    cfg (MoEConfig): the model's config (``MoEConfig``).
    seq: the sequence length (tokens per forward).

  Returns:
    FLOPs (2 per multiply-add) per token: every layer's token mixer (attention projections and scores; a linear
      attention's projections, convolution and delta-rule state update and read), its MLP (dense, or the router,
      k routed experts and the optionally gated shared expert), and the LM head.
  """
  d = cfg.hidden_size
  total = 0.0
  for i in range(cfg.num_layers):
    total += _mixer_flops(cfg, i, seq)
    if cfg.moe_layers[i]:
      mlp = 2 * d * cfg.num_experts + cfg.num_experts_per_tok * 3 * 2 * d * cfg.moe_intermediate_size
      if cfg.shared_expert_size:
        mlp += 3 * 2 * d * cfg.shared_expert_size + (2 * d if cfg.shared_expert_gate else 0)
    else:
      mlp = 3 * 2 * d * cfg.intermediate_size
    total += mlp
  return total + 2 * d * cfg.vocab_size


def _mixer_flops(cfg, i: int, seq: int) -> float:
  """FLOPs per token of layer ``i``'s token mixer (``forward_flops``)."""
  from bmoe_jax.params import layer_specs
  specs = layer_specs(cfg, i)
  if cfg.linear_on(i):  # projections; conv over q|k|v; per value head: decay, read, write and query the c x v state
    p = specs["linear_attn"]
    proj = 2 * sum(float(np.prod(p[n].shape)) for n in ("wq", "wk", "wv", "wz", "wb", "wa", "wo"))
    conv = 2 * sum(float(np.prod(p[n].shape)) for n in ("conv_q", "conv_k", "conv_v"))
    return proj + conv + 8.0 * cfg.linear_v_heads * cfg.linear_k_dim * cfg.linear_v_dim
  # every projection is one matmul per token (MLA's latents too), not the b* biases or the norms
  attn = 2 * sum(float(np.prod(sp.shape)) for name, sp in specs["attn"].items() if name.startswith("w"))
  qk, v = (cfg.qk_nope_head_dim + cfg.head_dim, cfg.v_head_dim) if cfg.mla else (cfg.head_dim, cfg.head_dim)
  return attn + 2 * cfg.num_heads * (qk + v) * (seq + 1) / 2
