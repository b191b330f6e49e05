"""The sorted expert path's row loops: forward, tangent and transpose, each doing the work of the loads.

Shapes in names: p padded rows, d model width, f expert width, e experts, r rows per unit, s slots.

Slots are sorted by expert into a padded buffer: expert ``j`` owns rows ``[first_e[j] r, (first_e[j] + units_e[j])
r)``, its load rounded up to ``r`` rows (``units_e[j]`` units). A loop over experts slices each expert's weights
once and runs its rows in chunks of ``8r`` rows (``units // 8`` of them), then one chunk of ``4r``, ``2r``, ``r`` per
set bit of ``units % 8``: trip counts follow the loads, so no worst-case buffer is computed.

``rows_mlp`` (a ``custom_jvp``) runs the expert MLPs this way. Its tangent map and the transpose of that map are
the same loops over the same chunks (a ``jax.custom_derivatives.linear_call``): forward mode, reverse mode (the
MAP step, K-FAC's and the predictive's pullbacks) and ``linearize`` all cost what the routed rows cost, with no
capacity block, overflow tiles or scatter-adds. In the transpose each expert's weight cotangents are summed over
its chunks in a local accumulator and written once. ``vmap`` over either goes through ``nn.linear_batching``.
Derivatives of order two through the transpose (e.g. a Hessian) are not supported: ``linear_call`` treats its
residuals as constants.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmoe_jax.nn import linear_batching  # noqa: F401  (registers vmap of linear_call)
from bmoe_jax.nn.layers import dot, glu

CHUNK_CLASSES = 4  # chunk sizes 8r, 4r, 2r, r: a load of L units runs as L // 8 full chunks plus at most three


def default_chunk_rows(num_slots: int, num_experts: int) -> int:
  """``r``: the power of two at or below a quarter of the mean expert load, at most 32 (measured on CPU, random
  Mixtral d=512, 16 experts top-2, 1024 tokens, loads 1-416: 32-row chunks up to 256 were fastest; 16-row chunks
  or chunks up to 512 rows no different, 64-row chunks no better)."""
  target = min(32, max(1, num_slots // (4 * num_experts)))
  return 1 << (target.bit_length() - 1)


def chunk_counts(units, c: int):
  """Chunks of class ``c`` (``8 >> c`` units each) for a load of ``units`` units: ``units // 8`` for class 0, then
  one chunk per set bit of the remainder."""
  top = 1 << (CHUNK_CLASSES - 1)
  return units // top if c == 0 else (units // (top >> c)) % 2


class Layout(NamedTuple):
  """Where each slot's row is. Slots of group ``e`` (not to compute) get distinct rows past the buffer."""
  row_s: jax.Array  # [s] padded row of each slot
  slot_p: jax.Array  # [p] slot of each padded row (distinct values >= s for padding rows)
  units_e: jax.Array  # [e] rows of each expert, in units of r
  first_e: jax.Array  # [e] first unit of each expert


def sort_slots(expert_nk, num_groups: int):
  """Order slots by group; returns (order, group of each sorted slot, group sizes, group starts)."""
  flat_s = expert_nk.reshape(-1)
  order_s = jnp.argsort(flat_s, stable=True).astype(jnp.int32)
  sizes_g = jnp.bincount(flat_s, length=num_groups).astype(jnp.int32)
  return order_s, flat_s[order_s], sizes_g, jnp.cumsum(sizes_g) - sizes_g


def layout(expert_nk, e: int, r: int) -> Layout:
  """Rows of ``expert_nk``'s slots (values in ``[0, e]``; ``e``: not computed) for ``e`` experts and units of r."""
  slots = expert_nk.size
  order_s, sorted_g_s, sizes_g, starts_g = sort_slots(expert_nk, e + 1)
  units_e = (sizes_g[:e] + r - 1) // r
  first_e = jnp.cumsum(units_e) - units_e
  p = padded_rows(slots, e, r)
  rank_s = jnp.arange(slots, dtype=jnp.int32) - starts_g[sorted_g_s]
  row_sorted_s = jnp.where(sorted_g_s < e, first_e[jnp.minimum(sorted_g_s, e - 1)] * r + rank_s, p + rank_s)
  row_s = jnp.zeros((slots,), jnp.int32).at[order_s].set(row_sorted_s, unique_indices=True)
  slot_p = (slots + jnp.arange(p, dtype=jnp.int32)).at[row_s].set(jnp.arange(slots, dtype=jnp.int32), mode="drop",
                                                                  unique_indices=True)
  return Layout(row_s, slot_p, units_e, first_e)


def padded_rows(slots: int, e: int, r: int) -> int:
  """Rows of the buffer: every load rounded up to r rows, at worst; at least one largest chunk."""
  return max((slots + e * (r - 1) + r - 1) // r, 1 << (CHUNK_CLASSES - 1)) * r


def _vma(a) -> set:
  """The mesh axes ``a`` varies over inside ``shard_map`` (empty outside it)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)
  return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))


def _varying_zeros(shape, dtype, like):
  """Zeros that, inside ``shard_map``, vary over the same mesh axes as the arrays ``like`` (loop carries must)."""
  z = jnp.zeros(shape, dtype)
  vma = set().union(*(_vma(a) for a in like))
  return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _sum_to_vma(ct, primal):
  """A cotangent summed over the mesh axes it varies over and ``primal`` does not (inside ``shard_map``: weights
  replicated over the data axes get the sum of every data shard's cotangent, as JAX's own transposes do)."""
  extra = tuple(sorted(_vma(ct) - _vma(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def for_each_chunk(units_e, first_e, r: int, body, carry, start=None, finish=None):
  """For each expert ``j``: ``local = start(j)``; for each of its chunks ``(carry, local) = body(j, row, rows,
  carry, local)`` (``row`` dynamic, ``rows`` static); then ``carry = finish(j, carry, local)``."""
  top = 1 << (CHUNK_CLASSES - 1)

  def expert(j, carry):
    units = units_e[j]
    state = (carry, () if start is None else start(j))
    for c in range(CHUNK_CLASSES):
      m = top >> c
      first = first_e[j] + (0 if c == 0 else units // (2 * m) * 2 * m)

      def chunk(i, state, m=m, first=first):
        return body(j, (first + i * m) * r, m * r, *state)
      state = jax.lax.fori_loop(0, chunk_counts(units, c), chunk, state)
    return state[0] if finish is None else finish(j, *state)
  return jax.lax.fori_loop(0, units_e.shape[0], expert, carry)


def _rows(a, row, rows):
  return jax.lax.dynamic_slice_in_dim(a, row, rows)


def _put(bufs, values, row):
  return tuple(jax.lax.dynamic_update_slice_in_dim(b, v.astype(b.dtype), row, 0) for b, v in zip(bufs, values))


def _forward(act, r, x_pd, units_e, first_e, wg_edf, wu_edf, wd_efd, residuals: bool):
  """(h [p, f], y [p, d]) of every padded row (zeros past the loads); with ``residuals`` also the gate and up
  projections (a, b [p, f]) first."""
  p, (f, d) = x_pd.shape[0], wd_efd.shape[1:]  # d: the output width (the input's may differ: folded biases)
  hdt, ydt = _out_dtypes(x_pd, wg_edf, wd_efd)
  like = (x_pd, wg_edf, wu_edf, wd_efd)
  bufs = tuple(_varying_zeros((p, c), t, like) for c, t in ((f, hdt),) * (2 * residuals) + ((f, hdt), (d, ydt)))

  def body(j, row, rows, bufs, local):
    x_rd = _rows(x_pd, row, rows)
    a_rf, b_rf = dot(x_rd, wg_edf[j]), dot(x_rd, wu_edf[j])
    h_rf = glu(act, a_rf, b_rf)
    out = (a_rf, b_rf) * residuals + (h_rf, dot(h_rf, wd_efd[j]))
    return _put(bufs, out, row), local
  return for_each_chunk(units_e, first_e, r, body, bufs)


def _out_dtypes(x_pd, wg_edf, wd_efd):
  """dtypes of (h, y)."""
  h = jax.eval_shape(dot, x_pd[:1], wg_edf[0])
  return h.dtype, jax.eval_shape(dot, h, wd_efd[0]).dtype


def _glu_partials(act, a_rf, b_rf):
  """(d h / d a, d h / d b) of the elementwise ``h = glu(act, a, b)``."""
  pa_rf = jax.jvp(lambda a: glu(act, a, b_rf), (a_rf,), (jnp.ones_like(a_rf),))[1]
  pb_rf = jax.jvp(lambda b: glu(act, a_rf, b), (b_rf,), (jnp.ones_like(b_rf),))[1]
  return pa_rf, pb_rf


def _tangent(act, r, mask, res, lin):
  """The tangent map: (dh [p, f], dy [p, d]) from the tangents of (x, w_gate, w_up, w_down) that ``mask`` marks
  present (``lin``, in that order); ``res`` = (x, a, b, h, w_gate, w_up, w_down, units, first)."""
  x_pd, a_pf, b_pf, h_pf, wg_edf, wu_edf, wd_efd, units_e, first_e = res
  it = iter(lin)
  dx_pd, dwg_edf, dwu_edf, dwd_efd = (next(it) if m else None for m in mask)
  (p, f), d = h_pf.shape, wd_efd.shape[2]
  outs = tuple(_varying_zeros((p, c), t, res + tuple(lin)) for c, t in zip((f, d), _out_dtypes(x_pd, wg_edf, wd_efd)))

  def body(j, row, rows, outs, local):
    x_rd, a_rf, b_rf, h_rf = (_rows(v, row, rows) for v in (x_pd, a_pf, b_pf, h_pf))
    da_rf = db_rf = jnp.zeros_like(a_rf)
    if dx_pd is not None:
      dx_rd = _rows(dx_pd, row, rows)
      da_rf, db_rf = da_rf + dot(dx_rd, wg_edf[j]), db_rf + dot(dx_rd, wu_edf[j])
    if dwg_edf is not None:
      da_rf = da_rf + dot(x_rd, dwg_edf[j])
    if dwu_edf is not None:
      db_rf = db_rf + dot(x_rd, dwu_edf[j])
    pa_rf, pb_rf = _glu_partials(act, a_rf, b_rf)
    dh_rf = pa_rf * da_rf + pb_rf * db_rf
    dy_rd = dot(dh_rf, wd_efd[j])
    if dwd_efd is not None:
      dy_rd = dy_rd + dot(h_rf, dwd_efd[j])
    return _put(outs, (dh_rf, dy_rd), row), local
  return for_each_chunk(units_e, first_e, r, body, outs)


def _transpose(act, r, mask, res, cts):
  """The transpose of ``_tangent``: cotangents of the present tangents from those of (h, y). Each expert's weight
  cotangents are summed over its chunks (in at least float32) and written once."""
  x_pd, a_pf, b_pf, h_pf, wg_edf, wu_edf, wd_efd, units_e, first_e = res
  ct_h_pf, ct_y_pd = cts
  wg_efd, wu_efd, wd_edf = (jnp.swapaxes(w, 1, 2) for w in (wg_edf, wu_edf, wd_efd))  # once, not per chunk
  like = res + tuple(cts)
  weights = [i for i in range(3) if mask[1 + i]]
  p, d = x_pd.shape
  outs = (_varying_zeros((p, d), x_pd.dtype, like) if mask[0] else None,) + tuple(
      _varying_zeros(w.shape, w.dtype, like) for i, w in enumerate((wg_edf, wu_edf, wd_efd)) if i in weights)

  def start(j):
    ws = (wg_edf, wu_edf, wd_efd)
    return tuple(_varying_zeros(ws[i].shape[1:], jnp.promote_types(ws[i].dtype, jnp.float32), like) for i in weights)

  def body(j, row, rows, outs, acc):
    x_rd, a_rf, b_rf, h_rf, ch_rf, cy_rd = (_rows(v, row, rows) for v in (x_pd, a_pf, b_pf, h_pf, ct_h_pf, ct_y_pd))
    cdh_rf = ch_rf + dot(cy_rd, wd_edf[j])
    pa_rf, pb_rf = _glu_partials(act, a_rf, b_rf)
    cda_rf, cdb_rf = cdh_rf * pa_rf, cdh_rf * pb_rf
    pairs = ((x_rd, cda_rf), (x_rd, cdb_rf), (h_rf, cy_rd))
    acc = tuple(s + jnp.einsum("ri,ro->io", *pairs[i], preferred_element_type=s.dtype)
                for s, i in zip(acc, weights))
    if mask[0]:
      outs = _put(outs[:1], (dot(cda_rf, wg_efd[j]) + dot(cdb_rf, wu_efd[j]),), row) + outs[1:]
    return outs, acc

  def finish(j, outs, acc):
    return outs[:1] + tuple(jax.lax.dynamic_update_index_in_dim(o, a.astype(o.dtype), j, 0)
                            for o, a in zip(outs[1:], acc))
  outs = for_each_chunk(units_e, first_e, r, body, outs, start=start, finish=finish)
  primals = (x_pd,) + tuple((wg_edf, wu_edf, wd_efd)[i] for i in weights)
  return [_sum_to_vma(o, v) for o, v in zip(outs, primals) if o is not None]


def _is_zero(t) -> bool:
  return type(t) is jax.custom_derivatives.SymbolicZero


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def rows_mlp(act: str, r: int, x_pd, units_e, first_e, wg_edf, wu_edf, wd_efd):
  """(h [p, f], y [p, d]): the expert MLP of every padded row of ``x_pd`` (laid out as ``layout`` says)."""
  return _forward(act, r, x_pd, units_e, first_e, wg_edf, wu_edf, wd_efd, residuals=False)


@functools.partial(rows_mlp.defjvp, symbolic_zeros=True)
def _rows_mlp_jvp(act, r, primals, tangents):
  x_pd, units_e, first_e, wg_edf, wu_edf, wd_efd = primals
  a_pf, b_pf, h_pf, y_pd = _forward(act, r, *primals, residuals=True)
  present = (tangents[0],) + tuple(tangents[3:])
  mask = tuple(not _is_zero(t) for t in present)
  lin = [t for t, m in zip(present, mask) if m]
  if not lin:
    return (h_pf, y_pd), (jnp.zeros_like(h_pf), jnp.zeros_like(y_pd))
  res = (x_pd, a_pf, b_pf, h_pf, wg_edf, wu_edf, wd_efd, units_e, first_e)
  dh_pf, dy_pd = jax.custom_derivatives.linear_call(functools.partial(_tangent, act, r, mask),
                                                    functools.partial(_transpose, act, r, mask), res, lin)
  return (h_pf, y_pd), (dh_pf, dy_pd)
