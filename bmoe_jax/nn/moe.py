"""Router and routed experts: three expert paths with identical results.

Shapes in names: n tokens (flattened batch x sequence), d model width, f expert width, e experts,
k slots per token (top-k), p padded slot rows.

* ``dense``: every expert on every token, then the top-k slots are picked out. Exact reference;
  costs e/k times the routed work.
* ``sorted``: slots are sorted by expert into a buffer (each load rounded up to r rows); a loop over experts runs
  each expert's rows in chunks of 8r, 4r, 2r and r rows (trip counts follow the loads: no capacity, little
  padding). The derivatives are the same loops (``nn.expert_rows``: a tangent map and its transpose), so the MAP
  step, K-FAC's pullbacks and the predictive pay only for the routed rows. Dropless. The fast path on CPU.
  Under a mesh with an ``expert`` axis (``jax.set_mesh``) it runs expert-parallel: ``shard_map`` over
  the experts, each device computing only its own experts' slots (``experts_expert_parallel``).
* ``ragged``: slots sorted by expert, then ``jax.lax.ragged_dot`` (GPU/TPU grouped GEMM; far slower
  than an equal einsum on XLA:CPU).

Every path takes ``perturb_nkd`` (added to each routed expert's output, before the routing weight):
the gradient with respect to it is the gradient with respect to each expert's output, which is what
K-FAC's output factor needs. All paths are jit/vmap/jvp/vjp-safe (integer sorting carries no tangent; rows are
moved by ``take_rows``, a ``custom_jvp`` whose transpose is a gather, not a scatter-add).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.nn import expert_rows as R
from bmoe_jax.nn.layers import glu, mm
from bmoe_jax.nn.gating import Routing, route  # noqa: F401  (the MoE layer's deterministic router)

EXPERT_IMPLS = ("dense", "sorted", "ragged")


def _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, dtype):
  if perturb_nkd is not None:
    y_nkd = y_nkd + perturb_nkd.astype(y_nkd.dtype)
  out_nd = mm("nk,nkd->nd", gate_nk.astype(y_nkd.dtype), y_nkd)
  return out_nd.astype(dtype), h_nkf


def experts_dense(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None):
  """Reference path. Returns (output [n, d], down_proj inputs per slot [n, k, f])."""
  h_nef = glu(act, mm("nd,edf->nef", x_nd, w["w_gate"]), mm("nd,edf->nef", x_nd, w["w_up"]))
  h_nkf = jnp.take_along_axis(h_nef, expert_nk[:, :, None], axis=1)
  y_ned = mm("nef,efd->ned", h_nef, w["w_down"])
  y_nkd = jnp.take_along_axis(y_ned, expert_nk[:, :, None], axis=1)
  return _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, x_nd.dtype)


@jax.custom_jvp
def take_rows(x_ad, idx_b, inv_a):
  """``y[b] = x[idx[b]]`` (zero where ``idx[b]`` is out of range), for an injective ``idx`` whose inverse is
  ``inv`` (``inv[idx[b]] = b``; out of range for rows of ``x`` no ``b`` takes). Both index arrays must be free of
  repeats, out-of-range entries included (the scatter below promises unique indices).

  The same values as ``x[idx]``, but the tangent map is written as the scatter ``zeros.at[inv].set(dx)``, whose
  transpose is the gather ``ct[inv]``: reverse mode (K-FAC's and the predictive's pullbacks, the MAP step) then
  moves rows back with a gather instead of the scatter-add that transposes a gather. A ``custom_jvp``, so
  ``jax.jvp``/``linearize`` and everything built on them see an ordinary linear map.
  """
  return x_ad.at[idx_b].get(mode="fill", fill_value=0)


@take_rows.defjvp
def _take_rows_jvp(primals, tangents):
  x_ad, idx_b, inv_a = primals
  dx_ad = tangents[0]
  dy_bd = jnp.zeros(idx_b.shape + x_ad.shape[1:], dx_ad.dtype).at[inv_a].set(dx_ad, mode="drop",
                                                                              unique_indices=True)
  return take_rows(x_ad, idx_b, inv_a), dy_bd


def experts_sorted(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None,
                   chunk_rows: int | None = None, valid_nk=None):
  """Dropless sorted path. Same results as ``experts_dense`` (to float rounding).

  Slots are sorted by expert into a buffer where each expert's load is rounded up to ``chunk_rows`` rows (default
  ``expert_rows.default_chunk_rows``); ``expert_rows.rows_mlp`` runs each expert's rows in chunks of 8 down to 1
  times ``chunk_rows``, and so do its tangent map and that map's transpose: every derivative costs what the
  routed rows cost. Rows move in and out of the buffer with ``take_rows`` (gathers both ways under reverse mode).

  ``valid_nk``: slots to compute (default all); the others are never computed and give zero outputs (the
  expert-parallel path: slots of experts on other devices).
  """
  n, k = expert_nk.shape
  e = w["w_gate"].shape[0]
  r = chunk_rows or R.default_chunk_rows(n * k, e)
  if valid_nk is not None:
    expert_nk = jnp.where(valid_nk, expert_nk, e)
  lay = R.layout(expert_nk, e, r)
  x_sd = jnp.broadcast_to(x_nd[:, None], (n, k, x_nd.shape[1])).reshape(n * k, -1)
  x_pd = take_rows(x_sd, lay.slot_p, lay.row_s)
  h_pf, y_pd = R.rows_mlp(act, r, x_pd, lay.units_e, lay.first_e, w["w_gate"], w["w_up"], w["w_down"])
  h_nkf, y_nkd = (take_rows(b, lay.row_s, lay.slot_p).reshape(n, k, -1) for b in (h_pf, y_pd))
  return _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, x_nd.dtype)


def _tie_batching(*arrays):
  """Make ``vmap`` batch all of ``arrays`` or none of them, values and derivatives unchanged.

  ``jax.lax.ragged_dot``'s batching rule needs lhs, rhs and group sizes all batched (other cases are
  NYI in JAX), but under ``vmap`` over tokens the weights are not batched, and under ``vmap`` over
  weights the group sizes are not. Each array is passed through a select on a constant-true predicate
  whose other operand is a scalar of every other array: a no-op that XLA folds away without ``vmap``.
  Cost: under ``vmap`` over tokens the expert weights get a batch axis (one copy per vmapped example),
  so prefer ``sorted`` or ``dense`` for per-example vmaps of large models.
  """
  scalars = [jax.lax.stop_gradient(a.reshape(-1)[0]) for a in arrays]
  out = []
  for i, a in enumerate(arrays):
    for j, s in enumerate(scalars):
      if j != i:
        a = jnp.where(True, a, s.astype(a.dtype))
    out.append(a)
  return out


def experts_ragged(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None):
  """Grouped-GEMM path with ``jax.lax.ragged_dot`` (for GPU/TPU)."""
  n, k = expert_nk.shape
  e = w["w_gate"].shape[0]
  order_s, _, sizes_e, _ = R.sort_slots(expert_nk, e)
  inv_s = jnp.zeros_like(order_s).at[order_s].set(jnp.arange(n * k, dtype=order_s.dtype), unique_indices=True)
  x_sd = take_rows(jnp.broadcast_to(x_nd[:, None], (n, k, x_nd.shape[1])).reshape(n * k, -1), order_s, inv_s)
  x_sd, sizes_e, *wts = _tie_batching(x_sd, sizes_e, w["w_gate"], w["w_up"], w["w_down"])
  w = dict(zip(("w_gate", "w_up", "w_down"), wts))
  h_sf = glu(act, jax.lax.ragged_dot(x_sd, w["w_gate"], sizes_e), jax.lax.ragged_dot(x_sd, w["w_up"], sizes_e))
  y_sd = jax.lax.ragged_dot(h_sf, w["w_down"], sizes_e)
  h_nkf = take_rows(h_sf, inv_s, order_s).reshape(n, k, -1)
  y_nkd = take_rows(y_sd, inv_s, order_s).reshape(n, k, -1)
  return _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, x_nd.dtype)


def _expert_mesh():
  """The ambient mesh (``jax.set_mesh``) when it has an expert axis of size > 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
    return None
  return mesh


def experts_expert_parallel(mesh, x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None,
                            chunk_rows: int | None = None):
  """The sorted path with the experts split over the mesh's ``expert`` axis (``jax.shard_map``): each
  device runs only the slots routed to its own experts against its local weights (the others are
  skipped), and the partial outputs are summed over the axis (``psum``). Tokens stay split over the
  data axes. Same results as ``experts_sorted``; no expert weight leaves its device (under plain GSPMD
  the sorted path's dynamic expert index makes XLA all-gather every layer's expert weights)."""
  n = x_nd.shape[0]
  e = w["w_gate"].shape[0]
  num = mesh.shape["expert"]
  data = tuple(a for a in mesh.axis_names if a not in ("expert", "model") and mesh.shape[a] > 1)
  tok = data if data and n % int(np.prod([mesh.shape[a] for a in data])) == 0 else None
  P = jax.sharding.PartitionSpec
  rows, wspec = P(tok), P("expert")

  def local(x_nd, expert_nk, gate_nk, w, perturb_nkd):
    e_loc = w["w_gate"].shape[0]
    ids_nk = expert_nk - jax.lax.axis_index("expert") * e_loc
    mine_nk = (ids_nk >= 0) & (ids_nk < e_loc)
    gate_nk = jnp.where(mine_nk, gate_nk, 0).astype(gate_nk.dtype)
    out_nd, h_nkf = experts_sorted(x_nd, jnp.where(mine_nk, ids_nk, 0), gate_nk, w, act, perturb_nkd,
                                   chunk_rows, valid_nk=mine_nk)
    return jax.lax.psum(out_nd, "expert"), jax.lax.psum(h_nkf, "expert")

  if e % num:
    raise ValueError(f"{e} experts do not split over a mesh expert axis of {num}")
  wspecs = {name: wspec for name in w}
  fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, wspecs, None if perturb_nkd is None else rows),
                     out_specs=(rows, rows))
  return fn(x_nd, expert_nk, gate_nk, w, perturb_nkd)


def fold_biases(x_nd, w: dict):
  """(x, w) with the experts' gate/up biases folded into their weights: ``[x, 1] @ [[W], [b]] = x W + b``, so
  every path (and its derivatives) runs unchanged; ``b_down`` stays (``routed_experts`` adds it per slot)."""
  if "b_gate" not in w:
    return x_nd, w
  x_nd = jnp.concatenate([x_nd, jnp.ones(x_nd.shape[:-1] + (1,), x_nd.dtype)], -1)
  w = {**{k: v for k, v in w.items() if not k.startswith("b_")},
       **{f"w_{n}": jnp.concatenate([w[f"w_{n}"], w[f"b_{n}"][:, None].astype(w[f"w_{n}"].dtype)], 1)
          for n in ("gate", "up")}}
  return x_nd, w


def routed_experts(impl: str, x_nd, expert_nk, gate_nk, w, act, perturb_nkd=None, chunk_rows=None):
  """(output [n, d], down_proj inputs per slot [n, k, f]) of the routed experts ``w`` (``w_gate``, ``w_up`` [e, d,
  f], ``w_down`` [e, f, d], optional biases ``b_gate``, ``b_up`` [e, f], ``b_down`` [e, d]) on the slots
  ``expert_nk`` weighted by ``gate_nk``, by the path ``impl`` (module docstring); ``act``: ``layers.glu``'s."""
  w = {name: jnp.asarray(a) for name, a in w.items()}  # numpy weights cannot be indexed by tracers
  if expert_nk.size == 0:  # no tokens: nothing routed
    n, k = expert_nk.shape
    return (jnp.zeros_like(x_nd),
            jnp.zeros((n, k, w["w_down"].shape[1]), jnp.result_type(x_nd, w["w_gate"])))
  b_down = w.pop("b_down", None)
  out_nd, h_nkf = _routed(impl, *fold_biases(x_nd, w), expert_nk, gate_nk, act, perturb_nkd, chunk_rows)
  if b_down is not None:  # each slot's expert output gains its bias before the routing weight
    out_nd = out_nd + mm("nk,nkd->nd", gate_nk.astype(out_nd.dtype), b_down[expert_nk].astype(out_nd.dtype))
  return out_nd, h_nkf


def _routed(impl: str, x_nd, w, expert_nk, gate_nk, act, perturb_nkd, chunk_rows):
  if impl == "dense":
    return experts_dense(x_nd, expert_nk, gate_nk, w, act, perturb_nkd)
  if impl == "sorted":
    mesh = _expert_mesh()
    if mesh is not None and w["w_gate"].shape[0] % mesh.shape["expert"] == 0:
      return experts_expert_parallel(mesh, x_nd, expert_nk, gate_nk, w, act, perturb_nkd, chunk_rows)
    return experts_sorted(x_nd, expert_nk, gate_nk, w, act, perturb_nkd, chunk_rows)
  if impl == "ragged":
    return experts_ragged(x_nd, expert_nk, gate_nk, w, act, perturb_nkd)
  raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
