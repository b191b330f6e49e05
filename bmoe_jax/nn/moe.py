"""Router and routed experts: three expert paths with identical results.

Shapes in names: n tokens (flattened batch x sequence), d model width, f expert width, e experts,
k slots per token (top-k), p padded slot rows, m tiles, r rows per tile.

* ``dense``: every expert on every token, then the top-k slots are picked out. Exact reference;
  costs e/k times the routed work.
* ``sorted``: slots are sorted by expert into tiles of ``r`` rows that each belong to one expert,
  then a ``lax.scan`` over tiles runs each against its expert's weights. Dropless: the padded buffer
  is sized for the worst case (n*k + e*(r-1) rows). The fast path on CPU.
  Under a mesh with an ``expert`` axis (``jax.set_mesh``) it runs expert-parallel: ``shard_map`` over
  the experts, each device computing only its own experts' slots (``experts_expert_parallel``).
* ``ragged``: slots sorted by expert, then ``jax.lax.ragged_dot`` (GPU/TPU grouped GEMM; far slower
  than an equal einsum on XLA:CPU).

Every path takes ``perturb_nkd`` (added to each routed expert's output, before the routing weight):
the gradient with respect to it is the gradient with respect to each expert's output, which is what
K-FAC's output factor needs. All paths are jit/vmap/jvp/vjp-safe (integer sorting carries no tangent).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.nn.layers import activation
from bmoe_jax.routing.gating import Routing, route  # noqa: F401  (the MoE layer's deterministic router)

EXPERT_IMPLS = ("dense", "sorted", "ragged")


def _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, dtype):
  if perturb_nkd is not None:
    y_nkd = y_nkd + perturb_nkd.astype(y_nkd.dtype)
  out_nd = jnp.einsum("nk,nkd->nd", gate_nk.astype(y_nkd.dtype), y_nkd)
  return out_nd.astype(dtype), h_nkf


def experts_dense(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None):
  """Reference path. Returns (output [n, d], down_proj inputs per slot [n, k, f])."""
  h_nef = activation(act)(jnp.einsum("nd,edf->nef", x_nd, w["w_gate"])) * jnp.einsum(
      "nd,edf->nef", x_nd, w["w_up"])
  h_nkf = jnp.take_along_axis(h_nef, expert_nk[:, :, None], axis=1)
  y_ned = jnp.einsum("nef,efd->ned", h_nef, w["w_down"])
  y_nkd = jnp.take_along_axis(y_ned, expert_nk[:, :, None], axis=1)
  return _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, x_nd.dtype)


def _varying_axes(x) -> frozenset:
  """The mesh axes ``x`` varies over inside ``shard_map`` (empty outside it)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))  # older JAX


def default_tile_rows(num_slots: int, num_experts: int) -> int:
  """Rows per tile: the power of two at or below the mean expert load, at most 128 (measured on CPU:
  fewer, larger tiles amortise the per-tile weight reads; padding grows by at most e*(r-1) rows)."""
  target = min(128, max(1, num_slots // num_experts))
  return 1 << (target.bit_length() - 1)


def _sort_slots(expert_nk, num_experts):
  """Order slots by expert; returns (order, expert of each sorted slot, group sizes, group starts)."""
  flat_s = expert_nk.reshape(-1)
  order_s = jnp.argsort(flat_s, stable=True).astype(jnp.int32)
  sorted_e_s = flat_s[order_s]
  sizes_e = jnp.bincount(flat_s, length=num_experts).astype(jnp.int32)
  starts_e = jnp.cumsum(sizes_e) - sizes_e
  return order_s, sorted_e_s, sizes_e, starts_e


def _tile_layout(expert_nk, groups: int, r: int, e: int):
  """The padded buffer of ``experts_sorted``: (row of each original slot [n k], token feeding each padded
  row [p] (n = the appended zero row), expert of each tile [p / r], number of tiles in use)."""
  n, k = expert_nk.shape
  slots = n * k
  order_s, sorted_e_s, sizes_e, starts_e = _sort_slots(expert_nk, groups)
  padded_sizes_e = (sizes_e + r - 1) // r * r
  padded_ends_e = jnp.cumsum(padded_sizes_e)
  padded_starts_e = padded_ends_e - padded_sizes_e
  p = -(-(slots + groups * (r - 1)) // r) * r  # static worst case, a multiple of r
  dest_sorted_s = padded_starts_e[sorted_e_s] + jnp.arange(slots, dtype=jnp.int32) - starts_e[sorted_e_s]
  dest_s = jnp.zeros((slots,), jnp.int32).at[order_s].set(dest_sorted_s)
  src_p = jnp.full((p,), n, jnp.int32).at[dest_sorted_s].set(order_s // k)
  tile_e_m = jnp.minimum(jnp.searchsorted(padded_ends_e, jnp.arange(p // r) * r, side="right"), e - 1)
  used_tiles = padded_ends_e[e - 1] // r  # tiles past this hold only padding (or invalid slots): skipped
  return dest_s, src_p, tile_e_m, used_tiles


def experts_sorted(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None,
                   tile_rows: int | None = None, valid_nk=None):
  """Tile-sorted dropless path. Same results as ``experts_dense``.

  Slots are sorted by expert into a padded buffer where each expert's rows start on a tile boundary,
  so every tile of ``r`` rows belongs to one expert; a ``lax.scan`` over tiles multiplies each tile by
  its expert's weights, indexed inside the loop (no per-tile weight copies are materialised). Tiles
  that hold only padding are skipped with ``lax.cond`` (under ``vmap`` the cond becomes a select:
  still exact, the padding tiles are then computed too).

  ``valid_nk``: slots to compute (default all); the others go to a trailing group whose tiles are
  skipped and give zero outputs (the expert-parallel path: slots of experts on other devices).
  """
  n, k = expert_nk.shape
  e, d, f = w["w_gate"].shape
  slots = n * k
  r = tile_rows or default_tile_rows(slots, e)
  groups = e if valid_nk is None else e + 1
  if valid_nk is not None:
    expert_nk = jnp.where(valid_nk, expert_nk, e)
  dest_s, src_p, tile_e_m, used_tiles = _tile_layout(expert_nk, groups, r, e)
  p = src_p.shape[0]
  m = p // r
  x_pd = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)], axis=0)[src_p]
  fn = activation(act)

  def compute(x_rd, wg_df, wu_df, wd_fd):
    h_rf = fn(x_rd @ wg_df) * (x_rd @ wu_df)
    return h_rf, h_rf @ wd_fd

  def skip(x_rd, wg_df, wu_df, wd_fd):
    h_dtype = jnp.result_type(x_rd, wg_df, wu_df)
    zeros = jnp.zeros((r, f), h_dtype), jnp.zeros((r, d), jnp.result_type(h_dtype, wd_fd))
    # inside shard_map both branches must vary over the same mesh axes as their inputs
    vma = tuple(sorted(set().union(*(_varying_axes(a) for a in (x_rd, wg_df, wu_df, wd_fd)))))
    return tuple(jax.lax.pcast(z, vma, to="varying") for z in zeros) if vma else zeros

  # Remat everything but the matmul outputs: without it, reverse mode saves each tile's [d, f] weight
  # slices as scan residuals (a copy of every used expert's weights per tile); measured on CPU this
  # halves the cost of a backward pass w.r.t. activations (the K-FAC and predictive vjps).
  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  def tile(_, inp):
    # The expert's weights are sliced outside the cond, so the backward pass accumulates [d, f]
    # cotangents per tile rather than full [e, d, f] ones out of each cond.
    x_rd, expert, i = inp
    ws = (w["w_gate"][expert], w["w_up"][expert], w["w_down"][expert])
    return None, jax.lax.cond(i < used_tiles, compute, skip, x_rd, *ws)

  _, (h_mrf, y_mrd) = jax.lax.scan(tile, None, (x_pd.reshape(m, r, d), tile_e_m, jnp.arange(m)))
  h_nkf = h_mrf.reshape(p, -1)[dest_s].reshape(n, k, -1)
  y_nkd = y_mrd.reshape(p, -1)[dest_s].reshape(n, k, -1)
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
  order_s, _, sizes_e, _ = _sort_slots(expert_nk, e)
  x_sd = x_nd[order_s // k]
  x_sd, sizes_e, *wts = _tie_batching(x_sd, sizes_e, w["w_gate"], w["w_up"], w["w_down"])
  w = dict(zip(("w_gate", "w_up", "w_down"), wts))
  h_sf = activation(act)(jax.lax.ragged_dot(x_sd, w["w_gate"], sizes_e)) * jax.lax.ragged_dot(
      x_sd, w["w_up"], sizes_e)
  y_sd = jax.lax.ragged_dot(h_sf, w["w_down"], sizes_e)
  inv_s = jnp.zeros_like(order_s).at[order_s].set(jnp.arange(n * k, dtype=order_s.dtype))
  h_nkf = h_sf[inv_s].reshape(n, k, -1)
  y_nkd = y_sd[inv_s].reshape(n, k, -1)
  return _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, x_nd.dtype)


def _expert_mesh():
  """The ambient mesh (``jax.set_mesh``) when it has an expert axis of size > 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
    return None
  return mesh


def experts_expert_parallel(mesh, x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None,
                            tile_rows: int | None = None):
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
                                   tile_rows, valid_nk=mine_nk)
    return jax.lax.psum(out_nd, "expert"), jax.lax.psum(h_nkf, "expert")

  if e % num:
    raise ValueError(f"{e} experts do not split over a mesh expert axis of {num}")
  wspecs = {name: wspec for name in w}
  fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, wspecs, None if perturb_nkd is None else rows),
                     out_specs=(rows, rows))
  return fn(x_nd, expert_nk, gate_nk, w, perturb_nkd)


def routed_experts(impl: str, x_nd, expert_nk, gate_nk, w, act, perturb_nkd=None, tile_rows=None):
  w = {name: jnp.asarray(a) for name, a in w.items()}  # numpy weights cannot be indexed by tracers
  if expert_nk.size == 0:  # no tokens: nothing routed
    n, k = expert_nk.shape
    return (jnp.zeros_like(x_nd),
            jnp.zeros((n, k, w["w_down"].shape[1]), jnp.result_type(x_nd, w["w_gate"])))
  if impl == "dense":
    return experts_dense(x_nd, expert_nk, gate_nk, w, act, perturb_nkd)
  if impl == "sorted":
    mesh = _expert_mesh()
    if mesh is not None and w["w_gate"].shape[0] % mesh.shape["expert"] == 0:
      return experts_expert_parallel(mesh, x_nd, expert_nk, gate_nk, w, act, perturb_nkd, tile_rows)
    return experts_sorted(x_nd, expert_nk, gate_nk, w, act, perturb_nkd, tile_rows)
  if impl == "ragged":
    return experts_ragged(x_nd, expert_nk, gate_nk, w, act, perturb_nkd)
  raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
