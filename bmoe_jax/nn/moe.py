"""Router and routed experts: three expert paths with identical results.

Shapes in names: n tokens (flattened batch x sequence), d model width, f expert width, e experts,
k slots per token (top-k), p padded slot rows, c capacity rows per expert, m tiles, r rows per tile.

* ``dense``: every expert on every token, then the top-k slots are picked out. Exact reference;
  costs e/k times the routed work.
* ``sorted``: slots are sorted by expert. Without differentiation, a loop over experts runs each expert's rows in
  chunks of 8r, 4r, 2r and r rows (its load rounded up to r rows: no capacity, little padding; trip counts
  follow the loads). Under jvp/vjp (a ``custom_jvp``: the derivatives come from a fixed-shape form with the same
  values) each expert's first ``n*k // e`` slots (its share of a balanced load) run as one batched einsum over
  experts and the slots past that share go to overflow tiles, a ``lax.scan`` over every tile that skips unused
  ones. Dropless: the buffers are sized for the worst case. The fast path on CPU.
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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.nn.layers import activation, dot, mm
from bmoe_jax.routing.gating import Routing, route  # noqa: F401  (the MoE layer's deterministic router)

EXPERT_IMPLS = ("dense", "sorted", "ragged")


def _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, dtype):
  if perturb_nkd is not None:
    y_nkd = y_nkd + perturb_nkd.astype(y_nkd.dtype)
  out_nd = mm("nk,nkd->nd", gate_nk.astype(y_nkd.dtype), y_nkd)
  return out_nd.astype(dtype), h_nkf


def experts_dense(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None):
  """Reference path. Returns (output [n, d], down_proj inputs per slot [n, k, f])."""
  h_nef = activation(act)(mm("nd,edf->nef", x_nd, w["w_gate"])) * mm("nd,edf->nef", x_nd, w["w_up"])
  h_nkf = jnp.take_along_axis(h_nef, expert_nk[:, :, None], axis=1)
  y_ned = mm("nef,efd->ned", h_nef, w["w_down"])
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
  """Rows per overflow tile: the power of two at or below half the mean expert load, at most 64 (measured on CPU,
  random Mixtral d=512, 16 experts top-2, 1024 tokens: 64 gives the fastest forward; one layer's value_and_grad
  is ~5% faster at 32)."""
  target = min(64, max(1, num_slots // (2 * num_experts)))
  return 1 << (target.bit_length() - 1)


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


def _sort_slots(expert_nk, num_experts):
  """Order slots by expert; returns (order, expert of each sorted slot, group sizes, group starts)."""
  flat_s = expert_nk.reshape(-1)
  order_s = jnp.argsort(flat_s, stable=True).astype(jnp.int32)
  sorted_e_s = flat_s[order_s]
  sizes_e = jnp.bincount(flat_s, length=num_experts).astype(jnp.int32)
  starts_e = jnp.cumsum(sizes_e) - sizes_e
  return order_s, sorted_e_s, sizes_e, starts_e


class Layout(NamedTuple):
  """Where ``experts_sorted`` puts each slot. Rows ``[0, e * capacity)`` are the capacity block (expert
  ``i`` owns rows ``[i * capacity, (i + 1) * capacity)``); the rows after it are overflow tiles of ``r`` rows,
  each owned by one expert."""
  row_s: jax.Array  # [n k] padded row of each slot
  slot_p: jax.Array  # [p] slot of each padded row (>= n k for padding)
  tile_e_m: jax.Array  # [m] expert of each overflow tile
  used_tiles: jax.Array  # overflow tiles holding valid slots (the rest are skipped)


def _layout(expert_nk, groups: int, e: int, capacity: int, r: int) -> Layout:
  """Slots of each of the first ``e`` groups fill that expert's capacity rows in order, the rest go to the group's
  overflow tiles; group ``e`` (if ``groups = e + 1``: slots not to compute) goes to tiles after every valid one."""
  slots = expert_nk.size
  order_s, sorted_e_s, sizes_e, starts_e = _sort_slots(expert_nk, groups)
  rank_s = jnp.arange(slots, dtype=jnp.int32) - starts_e[sorted_e_s]
  cap_e = jnp.where(jnp.arange(groups) < e, capacity, 0)
  over_e = (jnp.maximum(sizes_e - cap_e, 0) + r - 1) // r * r
  over_ends_e = jnp.cumsum(over_e)
  over_row_s = e * capacity + over_ends_e[sorted_e_s] - over_e[sorted_e_s] + rank_s - cap_e[sorted_e_s]
  row_sorted_s = jnp.where(rank_s < cap_e[sorted_e_s], sorted_e_s * capacity + rank_s, over_row_s)
  row_s = jnp.zeros((slots,), jnp.int32).at[order_s].set(row_sorted_s, unique_indices=True)
  worst = (slots if groups > e else max(slots - capacity, 0)) + groups * (r - 1)  # every slot past a capacity
  p = e * capacity + -(-worst // r) * r
  # padding rows take distinct out-of-range slots, so the indices of every take_rows gather and scatter are unique
  slot_p = (slots + jnp.arange(p, dtype=jnp.int32)).at[row_s].set(jnp.arange(slots, dtype=jnp.int32),
                                                                  unique_indices=True)
  tiles = (p - e * capacity) // r
  tile_e_m = jnp.minimum(jnp.searchsorted(over_ends_e, jnp.arange(tiles) * r, side="right"), e - 1)
  return Layout(row_s, slot_p, tile_e_m, over_ends_e[e - 1] // r)


def experts_sorted(x_nd, expert_nk, gate_nk, w: dict, act: str, perturb_nkd=None,
                   tile_rows: int | None = None, valid_nk=None, capacity: int | None = None,
                   chunk_rows: int | None = None):
  """Dropless sorted path. Same results as ``experts_dense`` (to float rounding).

  Slots are sorted by expert. The forward is ``_chunked_slots`` (per expert, chunks of ``8 chunk_rows`` down to
  ``chunk_rows`` rows; default ``default_chunk_rows``). Its derivatives (a ``custom_jvp``; ``jax.jvp``/``linearize``
  and reverse mode through them) are those of ``_tiled_slots``: each expert's first ``capacity`` slots (default:
  the mean load, ``n k // e``) go to its rows of a capacity block ``[e, capacity, d]`` computed as one batched
  einsum (the balanced case's cost); the slots past an expert's capacity go to overflow tiles of ``tile_rows``
  rows aligned to expert boundaries, a ``lax.scan`` over every tile that skips unused ones with ``lax.cond``
  (under ``vmap`` with batched routing the cond becomes a select: still exact, every tile is then computed).
  Rows move in and out of the padded buffer with ``take_rows`` (gathers both ways under reverse mode).

  ``valid_nk``: slots to compute (default all); the others go to a trailing group that is never computed and
  gives zero outputs (the expert-parallel path: slots of experts on other devices).
  """
  n, k = expert_nk.shape
  e = w["w_gate"].shape[0]
  sizes = (tile_rows or default_tile_rows(n * k, e), n * k // e if capacity is None else capacity,
           chunk_rows or default_chunk_rows(n * k, e))
  groups = e if valid_nk is None else e + 1
  if valid_nk is not None:
    expert_nk = jnp.where(valid_nk, expert_nk, e)
  h_nkf, y_nkd = _slot_mlp(act, groups, sizes, x_nd, expert_nk, w["w_gate"], w["w_up"], w["w_down"])
  return _combine(y_nkd, h_nkf, gate_nk, perturb_nkd, x_nd.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _slot_mlp(act, groups, sizes, x_nd, expert_nk, wg_edf, wu_edf, wd_efd):
  """(down_proj inputs [n, k, f], outputs [n, k, d]) of every slot: ``_chunked_slots``, with the derivatives of
  ``_tiled_slots`` (same values; ``sizes`` = (tile rows, capacity, chunk rows))."""
  return _chunked_slots(act, groups, sizes[2], x_nd, expert_nk, wg_edf, wu_edf, wd_efd)


@_slot_mlp.defjvp
def _slot_mlp_jvp(act, groups, sizes, primals, tangents):
  return jax.jvp(functools.partial(_tiled_slots, act, groups, sizes[:2]), primals, tangents)


def _tiled_slots(act, groups, sizes, x_nd, expert_nk, wg_edf, wu_edf, wd_efd):
  """The differentiable form of ``_slot_mlp``: capacity block plus a scan over overflow tiles (fixed shapes)."""
  n, k = expert_nk.shape
  e, d, f = wg_edf.shape
  slots = n * k
  r, capacity = sizes
  w = {"w_gate": wg_edf, "w_up": wu_edf, "w_down": wd_efd}
  lay = _layout(expert_nk, groups, e, capacity, r)
  x_sd = jnp.broadcast_to(x_nd[:, None], (n, k, d)).reshape(slots, d)
  x_pd = take_rows(x_sd, lay.slot_p, lay.row_s)
  fn = activation(act)
  x_ecd = x_pd[:e * capacity].reshape(e, capacity, d)
  h_ecf = fn(mm("ecd,edf->ecf", x_ecd, w["w_gate"])) * mm("ecd,edf->ecf", x_ecd, w["w_up"])
  y_ecd = mm("ecf,efd->ecd", h_ecf, w["w_down"])
  h_mrf, y_mrd = _overflow_tiles(x_pd[e * capacity:], lay, w, fn, r)
  h_pf = jnp.concatenate([h_ecf.reshape(-1, f), h_mrf.reshape(-1, f)])
  y_pd = jnp.concatenate([y_ecd.reshape(-1, d), y_mrd.reshape(-1, d)])
  return take_rows(h_pf, lay.row_s, lay.slot_p).reshape(n, k, -1), take_rows(y_pd, lay.row_s, lay.slot_p).reshape(
      n, k, -1)


CHUNK_CLASSES = 4  # chunk sizes 8r, 4r, 2r, r: a load of L slots runs as L // 8r full chunks plus at most three


def default_chunk_rows(num_slots: int, num_experts: int) -> int:
  """The smallest chunk of the forward's per-expert chunks: the power of two at or below a quarter of the mean
  expert load, at most 32 (measured on CPU, random Mixtral d=512, 16 experts top-2, 1024 tokens, loads 1-416:
  32-row chunks up to 256 ran the experts in 0.72-1.04x the capacity-plus-tiles form's time over several noisy
  runs; 16-row chunks or chunks up to 512 rows no different, 64-row chunks no better)."""
  target = min(32, max(1, num_slots // (4 * num_experts)))
  return 1 << (target.bit_length() - 1)


def chunk_counts(units, c: int):
  """Chunks of class ``c`` (``8 >> c`` units of r rows each) for a load of ``units`` units: ``units // 8`` full
  chunks for class 0, then one chunk per set bit of the remainder."""
  top = 1 << (CHUNK_CLASSES - 1)
  return units // top if c == 0 else (units // (top >> c)) % 2


def _chunked_slots(act, groups, r, x_nd, expert_nk, wg_edf, wu_edf, wd_efd):
  """The forward of ``_slot_mlp``. Each of the first ``e`` groups' slots fill that expert's rows of a buffer, its
  load rounded up to ``r`` rows (``units_e`` units of r); a loop over experts slices each expert's weights once
  and runs its rows in chunks of 8r rows (``units_e // 8`` of them), then one chunk of 4r, 2r, r per set bit of
  ``units_e % 8`` (loops with trip counts of the loads: no worst-case buffer is computed). Group ``e`` (slots not to
  compute) gets zeros."""
  n, k = expert_nk.shape
  e, d, f = wg_edf.shape
  slots = n * k
  order_s, sorted_e_s, sizes_e, starts_e = _sort_slots(expert_nk, groups)
  units_e = (sizes_e[:e] + r - 1) // r
  first_e = jnp.cumsum(units_e) - units_e
  top = 1 << (CHUNK_CLASSES - 1)
  p = max((slots + e * (r - 1) + r - 1) // r, top) * r  # every load rounded up to r rows, at worst; >= a chunk
  rank_s = jnp.arange(slots, dtype=jnp.int32) - starts_e[sorted_e_s]
  row_sorted_s = jnp.where(sorted_e_s < e, first_e[jnp.minimum(sorted_e_s, e - 1)] * r + rank_s, p)
  row_s = jnp.zeros((slots,), jnp.int32).at[order_s].set(row_sorted_s, unique_indices=True)
  slot_p = jnp.full((p,), slots, jnp.int32).at[row_s].set(jnp.arange(slots, dtype=jnp.int32), mode="drop")
  x_pd = x_nd.at[slot_p // k].get(mode="fill", fill_value=0)  # slot s is token s // k; padding rows are zeros
  fn = activation(act)

  def expert(j, bufs):
    ws = (wg_edf[j], wu_edf[j], wd_efd[j])
    units = units_e[j]
    for c in range(CHUNK_CLASSES):
      m = top >> c  # units per chunk
      count, start = chunk_counts(units, c), first_e[j] + (0 if c == 0 else units // (2 * m) * 2 * m)

      def chunk(i, bufs, m=m, start=start):
        row = (start + i * m) * r
        h_rf, y_rd = _tile_mlp(fn, jax.lax.dynamic_slice_in_dim(x_pd, row, m * r), *ws)
        return tuple(jax.lax.dynamic_update_slice_in_dim(b, v, row, 0) for b, v in zip(bufs, (h_rf, y_rd)))
      bufs = jax.lax.fori_loop(0, count, chunk, bufs)
    return bufs

  tile = (jax.ShapeDtypeStruct((p, d), x_pd.dtype), wg_edf[0], wu_edf[0], wd_efd[0])
  h_pf, y_pd = jax.lax.fori_loop(0, e, expert, _zeros_like_tile(fn, *tile, like=(x_pd, wg_edf, wu_edf, wd_efd)))
  return tuple(b.at[row_s].get(mode="fill", fill_value=0).reshape(n, k, -1) for b in (h_pf, y_pd))


def _overflow_tiles(x_pd, lay: Layout, w: dict, fn, r: int):
  """([m, r, f] hidden, [m, r, d] output) of the overflow tiles; unused tiles give zeros."""
  m = lay.tile_e_m.shape[0]
  if m == 0:  # no overflow possible (one expert, one-row tiles)
    tile = jax.ShapeDtypeStruct((r, x_pd.shape[1]), x_pd.dtype)
    outs = jax.eval_shape(functools.partial(_tile_mlp, fn), tile, *(w[k][0] for k in ("w_gate", "w_up", "w_down")))
    return tuple(jnp.zeros((0,) + o.shape, o.dtype) for o in outs)
  return _overflow_scan(fn, x_pd.reshape(m, r, -1), w["w_gate"], w["w_up"], w["w_down"], lay.tile_e_m,
                        lay.used_tiles)


def _tile_mlp(fn, x_rd, wg_df, wu_df, wd_fd):
  h_rf = fn(dot(x_rd, wg_df)) * dot(x_rd, wu_df)
  return h_rf, dot(h_rf, wd_fd)


def _zeros_like_tile(fn, *args, like=None):
  """Zero (hidden, output) of one tile (``args``: arrays or shapes); inside ``shard_map`` varying over the same mesh
  axes as ``like`` (default ``args``)."""
  zeros = tuple(jnp.zeros(o.shape, o.dtype) for o in jax.eval_shape(functools.partial(_tile_mlp, fn), *args))
  vma = tuple(sorted(set().union(*(_varying_axes(a) for a in (args if like is None else like)))))
  return tuple(jax.lax.pcast(z, vma, to="varying") for z in zeros) if vma else zeros


def _overflow_scan(fn, x_mrd, wg_edf, wu_edf, wd_efd, tile_e_m, used_tiles):
  """A ``lax.scan`` over every overflow tile, unused ones skipped by a cond (zeros)."""
  # Remat everything but the matmul outputs: without it, reverse mode saves each tile's [d, f] weight
  # slices as scan residuals (a copy of every used expert's weights per tile).
  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  def tile(_, inp):
    # The expert's weights are sliced outside the cond, so the backward pass accumulates [d, f]
    # cotangents per tile rather than full [e, d, f] ones out of each cond.
    x_rd, expert, i = inp
    ws = (wg_edf[expert], wu_edf[expert], wd_efd[expert])
    return None, jax.lax.cond(i < used_tiles, functools.partial(_tile_mlp, fn),
                              functools.partial(_zeros_like_tile, fn), x_rd, *ws)

  m = x_mrd.shape[0]
  _, (h_mrf, y_mrd) = jax.lax.scan(tile, None, (x_mrd, tile_e_m, jnp.arange(m)))
  return h_mrf, y_mrd


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
  inv_s = jnp.zeros_like(order_s).at[order_s].set(jnp.arange(n * k, dtype=order_s.dtype), unique_indices=True)
  x_sd = take_rows(jnp.broadcast_to(x_nd[:, None], (n, k, x_nd.shape[1])).reshape(n * k, -1), order_s, inv_s)
  x_sd, sizes_e, *wts = _tie_batching(x_sd, sizes_e, w["w_gate"], w["w_up"], w["w_down"])
  w = dict(zip(("w_gate", "w_up", "w_down"), wts))
  h_sf = activation(act)(jax.lax.ragged_dot(x_sd, w["w_gate"], sizes_e)) * jax.lax.ragged_dot(
      x_sd, w["w_up"], sizes_e)
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
                                   tile_rows, valid_nk=mine_nk, capacity=expert_nk.size // e)
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
