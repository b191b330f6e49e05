"""Per-expert Kronecker factors of the GGN of the task loss w.r.t. every Bayesian expert's down_proj.

The Bayesian set is a tuple of ``Block``s: the routed experts of an MoE layer (``Block(l, "routed")``,
down_proj ``[e, f, d]``) and, optionally, its shared expert (``Block(l, "shared")``, one expert of width
``shared_expert_size``, treated as ``[1, f_shared, d]``: every real token is one of its rows, with the
shared-expert gate inside its output gradient). Every dict of factors, posteriors and statistics is keyed
by blocks.

Task output: the C class logits ``f = task.logits(params, batch)`` (``bmoe_jax.task``). For expert e of
MoE layer l,
with down_proj inputs ``a`` (per routed slot) and gradients ``g`` of the loss w.r.t. that expert's output
(routing weight included, read off the zero perturbations of ``bmoe_jax.model.forward``)::

  GGN_e ~= A_e (x) G_e,   A_e = sum over rows of a a^T,   G_e = sum over rows of g g^T.

Label modes (how g is formed): ``exact`` (expectation over the C classes under the model's predictive,
C vector-Jacobian products: sum_c p_c g_c g_c^T, so Fisher = GGN exactly), ``mc`` (one label sampled from
the predictive), ``empirical`` (the true label).
Token modes: ``last`` (only the positions whose logits enter f contribute: the answer position, or for
continuation scoring every position that predicts a scored token of a choice), ``expand`` (every real
routed token is a row for A and for G), ``reduce`` (per sequence and expert: mean of a over its tokens,
sum of g).

Forms: ``rank=None`` keeps the full f x f and d x d sums per expert; ``rank=r`` keeps rank-r factors
by incremental SVD (``bmoe_jax.laplace.lowrank``), never forming a d x d matrix.

These are sums; ``finalize`` divides A by its row count so that A (x) G is the K-FAC estimate of the
summed GGN: exact for one sequence with one contributing row (see the tests), and the usual
"expectation of A times sum of G" approximation otherwise. Routing is held at its MAP value.

**Continuation scoring** (``task.Continuation``): f_c sums the log-probabilities of choice c's tokens,
read at several positions. The loss is still the cross-entropy of softmax(f), so the GGN is
``sum_n J_n^T (diag p - p p^T) J_n`` with ``J_n = df/dtheta`` of the C scores (the vocabulary softmax
inside f is part of the network), and ``exact`` labels give its output factor exactly. For expert e,
``J_n = sum_t a_t (x) g_t`` over the rows t it saw, so ``A (x) G`` is exact only when one row carries
the whole Jacobian (one sequence, the Bayesian layer is the last, every choice one token, all read at one
position). With multi-token choices ``last`` treats each scoring position as an independent row and
drops the cross-terms between positions (the ``expand`` approximation of Eschenhagen et al. 2023);
``tests/laplace/test_kfac_continuation.py`` measures that error against the materialised GGN.
All functions are pure and jit-able; the per-expert work is a ``jax.vmap`` over the expert axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmoe_jax.config import MoEConfig
from bmoe_jax.laplace import lowrank
from bmoe_jax.model import zero_perturbations
from bmoe_jax.params import Block, as_block, block_dims  # noqa: F401  (re-exported)
from bmoe_jax.task import Batch, Task, output_mask

from bmoe_jax.laplace.spec import LABEL_MODES, TOKEN_MODES, FactorSpec, select_layers  # noqa: F401  (re-exported)


def block_slots(taps, grads, blk: Block):
  """A block's slots from the forward taps and the (label-batched) perturbation gradients: down_proj
  inputs a [b, s, k, f], output gradients g [l, b, s, k, d] and expert ids [b, s, k] (the shared expert
  and the router are one slot per token, expert 0).

  Args:
    taps: the forward's ``model.MoETaps`` by MoE layer id (``task.logits_and_taps``): ``down_in_bskf`` and
      ``expert_bsk`` for routed experts, ``shared_in_bsf`` for the shared expert, ``router_in_bsd`` for the router.
    grads: the pullback of ``model.zero_perturbations`` vmapped over l label draws (or classes): by layer id, a
      dict by kind of ``routed`` [l, b, s, k, d], ``shared`` [l, b, s, d] and ``router`` [l, b, s, E] (the
      gradients w.r.t. the expert outputs, routing weight included, or w.r.t. the router logits).
    blk: the block whose slots to read (its ``layer`` must be in ``taps`` and ``grads``).

  Returns:
    ``(a, g, expert)``: the down_proj inputs a [b, s, k, f], the output gradients g [l, b, s, k, d] and the
    expert id of each slot [b, s, k] int. Shared expert: k = 1, f = ``shared_expert_size``, expert 0. Router:
    k = 1, a = the router input u [b, s, 1, d_model], g = the logits' gradients [l, b, s, 1, E], expert 0.
  """
  tap = taps[blk.layer]
  if blk.kind == "routed":
    return tap.down_in_bskf, grads[blk.layer]["routed"], tap.expert_bsk
  if blk.kind == "router":  # the router weight: inputs u, gradients of the logits, one "expert"
    u_bsd = tap.router_in_bsd
    return (u_bsd[:, :, None], grads[blk.layer]["router"][:, :, :, None],
            jnp.zeros(u_bsd.shape[:2] + (1,), jnp.int32))
  a_bsf = tap.shared_in_bsf
  return (a_bsf[:, :, None], grads[blk.layer]["shared"][:, :, :, None],
          jnp.zeros(a_bsf.shape[:2] + (1,), jnp.int32))


class LayerStats(NamedTuple):
  """Full (``rank=None``) K-FAC sums of one block, per expert (``expert_sums``).

  Attributes:
    a_eff: [e, f, f] sum over the expert's rows of a a^T (down_proj inputs).
    g_edd: [e, d, d] sum over its rows and label draws of w g g^T (output gradients, label weights w).
    rows_e: [e] int: the number of rows that entered A.
  """
  a_eff: jax.Array  # [e, f, f] sum of a a^T
  g_edd: jax.Array  # [e, d, d] sum of g g^T
  rows_e: jax.Array  # [e] rows that entered A


def label_cotangents(f_bc, labels_b, mode: str, key=None):
  """Cotangents on the logits f [b, c] (one per label draw) and their weights [draws, b]:
  d(-log p_y)/df = p - onehot(y), p = softmax(f).

  Args:
    f_bc: [b, c] the logits (the MAP's).
    labels_b: [b] int the true labels (read by ``"empirical"`` only).
    mode: ``"exact"`` (every class y, weight p_y: sum_y p_y ct ct^T is the Fisher = GGN), ``"mc"`` (one label
      drawn from p, weight 1); any other value reads as ``"empirical"`` (``labels_b``, weight 1).
    key: PRNG key of the ``"mc"`` draw (required there: None raises ``ValueError``); ignored otherwise.

  Returns:
    ``(ct_lbc, w_lb)`` in f's dtype: cotangents [l, b, c] and their weights [l, b], with l = c draws (one per
    class, in class order) for ``"exact"`` and l = 1 otherwise.
  """
  p_bc = jax.nn.softmax(f_bc, axis=-1)
  c = f_bc.shape[-1]
  if mode == "mc" and key is None:
    raise ValueError("labels='mc' needs a PRNG key")
  if mode == "exact":
    y_lb = jnp.broadcast_to(jnp.arange(c)[:, None], (c, f_bc.shape[0]))
    w_lb = p_bc.T
  elif mode == "mc":
    y_lb = jax.random.categorical(key, f_bc)[None]
    w_lb = jnp.ones_like(y_lb, f_bc.dtype)
  else:
    y_lb = labels_b[None]
    w_lb = jnp.ones_like(y_lb, f_bc.dtype)
  ct_lbc = p_bc[None] - jax.nn.one_hot(y_lb, c, dtype=f_bc.dtype)
  return ct_lbc, w_lb


def nonempty_rows(batch: Batch) -> jax.Array:
  """[b] bool: the rows holding at least one real token. An all-padding row (a batch padded to a fixed size)
  is no sequence: it adds no rows, no count and no log-likelihood to a factor pass.

  Args:
    batch: the batch (its ``mask_bs`` [b, s], nonzero at real tokens).

  Returns:
    [b] bool: True where the row has at least one real token.
  """
  return jnp.any(batch.mask_bs.astype(bool), axis=-1)


def _rows(a_bskf, g_lbskd, expert_bsk, batch: Batch, mode):
  """Select the rows each token mode uses: returns a [rows, f], g [labels, rows, d], expert [rows],
  row weight [rows] (0 for rows that must not count). ``last``: the positions whose logits enter the
  task output (``task.output_mask``: one answer position, gathered; for continuation batches every
  position that predicts a scored token)."""
  b, s, k, _ = a_bskf.shape
  if mode == "last" and batch.cont is None:
    pos_b = batch.answer_pos_b
    take = lambda x: jnp.take_along_axis(x, pos_b.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)
    a_bskf, expert_bsk = take(a_bskf), take(expert_bsk)
    g_lbskd = jax.vmap(take)(g_lbskd)
    valid_bs = nonempty_rows(batch)[:, None]
  elif mode == "last":
    valid_bs = output_mask(batch) & batch.mask_bs.astype(bool)
  else:
    valid_bs = batch.mask_bs.astype(bool)
  valid_bsk = jnp.broadcast_to(valid_bs[:, :, None], expert_bsk.shape)
  return (a_bskf.reshape(-1, a_bskf.shape[-1]), g_lbskd.reshape(g_lbskd.shape[0], -1, g_lbskd.shape[-1]),
          expert_bsk.reshape(-1), valid_bsk.reshape(-1))


def _reduce_rows(a_rf, g_lrd, expert_r, valid_r, b, num_experts):
  """``reduce`` mode: one row per (sequence, expert): mean of a, sum of g over that expert's tokens."""
  seq_r = jnp.repeat(jnp.arange(b), a_rf.shape[0] // b)
  onehot_re = jax.nn.one_hot(expert_r, num_experts, dtype=a_rf.dtype) * valid_r[:, None]
  member_rbe = onehot_re[:, None, :] * jax.nn.one_hot(seq_r, b, dtype=a_rf.dtype)[:, :, None]
  count_be = member_rbe.sum(0)
  a_bef = jnp.einsum("rbe,rf->bef", member_rbe, a_rf) / jnp.maximum(count_be, 1)[..., None]
  g_lbed = jnp.einsum("rbe,lrd->lbed", member_rbe, g_lrd)
  expert = jnp.broadcast_to(jnp.arange(num_experts), (b, num_experts)).reshape(-1)
  return (a_bef.reshape(-1, a_bef.shape[-1]), g_lbed.reshape(g_lbed.shape[0], -1, g_lbed.shape[-1]),
          expert, (count_be > 0).reshape(-1))


def expert_sums(a_rf, g_lrd, w_lr, expert_r, valid_r, num_experts) -> LayerStats:
  """Per-expert A and G sums of rows (vmapped over experts). Usable on any network's rows.

  Args:
    a_rf: [r, f] the rows' down_proj inputs a.
    g_lrd: [l, r, d] the rows' output gradients g, one per label draw.
    w_lr: [l, r] the label draws' weights (g enters G as sqrt(w) g).
    expert_r: [r] int the expert of each row, in [0, num_experts).
    valid_r: [r] bool whether the row counts (False rows add nothing, not even to the count).
    num_experts: e, the number of experts (static).

  Returns:
    ``LayerStats``: ``a_eff`` [e, f, f] = sum of a a^T and ``g_edd`` [e, d, d] = sum over draws of w g g^T over
    each expert's valid rows, and ``rows_e`` [e] their number.
  """
  def one(e):
    sel_r = (expert_r == e) & valid_r
    a_sel = a_rf * sel_r[:, None]
    g_sel = g_lrd * (sel_r[None, :, None] * jnp.sqrt(w_lr)[:, :, None])
    return (a_sel.T @ a_sel, jnp.einsum("lrd,lre->de", g_sel, g_sel), sel_r.sum())
  a_eff, g_edd, rows_e = jax.vmap(one)(jnp.arange(num_experts))
  return LayerStats(a_eff, g_edd, rows_e)


def _block_rows(params, task: Task, batch: Batch, spec: FactorSpec, key):
  """One forward and one vjp per label draw (vmapped). Per block: rows a [r, f], g [labels, r, d], their
  label weights [labels, r], expert ids [r], validity [r]; and the log-likelihood of the batch."""
  b, s = batch.tokens_bs.shape
  cfg = task.cfg
  zero = zero_perturbations(cfg, b, s, blocks=spec.blocks)

  def f(perturb):
    return task.logits_and_taps(params, batch, perturb)

  f_bc, pullback, taps = jax.vjp(f, zero, has_aux=True)
  f_bc = jax.lax.stop_gradient(f_bc)
  ll_b = jnp.take_along_axis(jax.nn.log_softmax(f_bc), batch.labels_b[:, None], axis=1)[:, 0]
  log_lik = jnp.sum(jnp.where(nonempty_rows(batch), ll_b, 0.0))
  ct_lbc, w_lb = label_cotangents(f_bc, batch.labels_b, spec.labels, key)
  grads = jax.vmap(lambda ct: pullback(ct)[0])(ct_lbc)
  out = {}
  for blk in spec.blocks:
    a_bskf, g_lbskd, expert_bsk = block_slots(taps, grads, blk)
    a, g, expert, valid = _rows(a_bskf, g_lbskd, expert_bsk, batch, spec.tokens)
    rows_per_seq = a.shape[0] // b
    if spec.tokens == "reduce":
      num_e = block_dims(cfg, blk)[0]
      a, g, expert, valid = _reduce_rows(a, g, expert, valid, b, num_e)
      rows_per_seq = num_e
    out[blk] = (a, g, jnp.repeat(w_lb, rows_per_seq, axis=1), expert, valid)
  return out, log_lik


def factor_stats(params, task: Task, batch: Batch, spec: FactorSpec,
                 key: jax.Array | None = None) -> dict[Block, LayerStats]:
  """Full A/G sums of one batch for every expert of ``spec.blocks``.

  Args:
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``).
    batch: one batch.
    spec: the factor pass (blocks, label and token modes; ``rank`` is ignored: the sums are always full).
    key: PRNG key of the ``labels="mc"`` draws; None for the other label modes.

  Returns:
    ``{block: LayerStats}`` of this batch alone (the batch's log-likelihood is dropped; ``update`` keeps it).
  """
  rows, _ = _block_rows(params, task, batch, spec, key)
  return {blk: expert_sums(a, g, w, e, v, block_dims(task.cfg, blk)[0]) for blk, (a, g, w, e, v) in rows.items()}


class FactorState(NamedTuple):
  """Running sums over a factor pass (optax-style: ``init`` / ``update`` / ``finalize``). ``stats`` per
  block: ``LayerStats`` (full) or ``lowrank.LowRankStats``; ``log_lik``: sum of log p(y|x) at the MAP."""
  stats: dict[Block, LayerStats | lowrank.LowRankStats]
  num_sequences: jax.Array
  log_lik: jax.Array


class Factors(NamedTuple):
  """Per-expert eigendecomposed factors: A_e = Q_A diag(eig_A) Q_A^T (mean over rows), G_e likewise
  (sum over rows), so that A_e (x) G_e estimates the summed GGN block of expert e.

  ``a_rest_e`` / ``g_rest_e`` (low-rank factors): each factor's isotropic remainder, the eigenvalue it
  has on the complement of its rank-r span: ``(tr A - sum a_r) / (f - r_a)`` from the exact trace kept by
  the factor pass (``tr G`` alike). ``A (x) G`` is then approximated by ``(A_r + alpha P_A) (x) (G_r +
  beta P_G)``, still diagonal in the factors' completed eigenbases, so the posterior, its evidence,
  samples and predictive stay closed-form (``laplace.posterior``). 0 for full factors; None reads as 0.
  Without them the evidence sees no curvature outside the rank-r span and picks a far too small prior
  precision."""
  a_eig_ef: jax.Array
  a_vec_eff: jax.Array
  g_eig_ed: jax.Array
  g_vec_edd: jax.Array
  rows_e: jax.Array
  a_rest_e: jax.Array | None = None
  g_rest_e: jax.Array | None = None


def init(cfg: MoEConfig, spec: FactorSpec, dtype=jnp.float32) -> FactorState:
  """Zero running sums of a factor pass (the start of ``update``), after checking ``spec`` against the model.

  Args:
    cfg: the model's config.
    spec: the factor pass.
    dtype: the sums' dtype (``fit.factor_dtype``: the Bayesian weights', at least float32).

  Returns:
    ``FactorState`` of zeros: per block ``LayerStats`` (full factors) or ``lowrank.LowRankStats`` (B [e, f, r]
    and [e, d, r], traces [e]), row counts [e] int32, ``num_sequences`` int32 and ``log_lik`` of ``dtype``.
    Raises ``ValueError`` if a layer is not an MoE layer, no layer is given, ``shared`` is asked of a model
    without shared experts, or ``rank`` exceeds a block's f or d.
  """
  bad = [l for l in spec.layers if not (0 <= l < cfg.num_layers and cfg.moe_layers[l])]
  if bad:
    raise ValueError(f"FactorSpec.layers {bad} are not MoE layers (MoE layers: {cfg.moe_layer_ids})")
  if not spec.layers:
    raise ValueError("FactorSpec.layers is empty: choose at least one MoE layer")
  if spec.shared and not cfg.shared_expert_size:
    raise ValueError("FactorSpec(shared=True): this model has no shared experts (shared_expert_size=0)")
  stats = {}
  for blk in spec.blocks:
    e, f, d = block_dims(cfg, blk)
    rows = jnp.zeros((e,), jnp.int32)
    if spec.rank_of(blk) is None:
      stats[blk] = LayerStats(jnp.zeros((e, f, f), dtype), jnp.zeros((e, d, d), dtype), rows)
      continue
    if spec.rank > min(f, d):
      raise ValueError(f"rank={spec.rank} exceeds a factor dimension of block {blk} (expert width f={f}, "
                       f"model width d={d}); use rank <= {min(f, d)} or rank=None for full factors")
    zeros_e = jnp.zeros((e,), dtype)
    stats[blk] = lowrank.LowRankStats(jnp.zeros((e, f, spec.rank), dtype), jnp.zeros((e, d, spec.rank), dtype), rows,
                                      zeros_e, zeros_e)
  return FactorState(stats, jnp.zeros((), jnp.int32), jnp.zeros((), dtype))


def update(state: FactorState, params, task: Task, batch: Batch, spec: FactorSpec,
           key: jax.Array | None = None) -> FactorState:
  """Add one batch. Pure and jit-able (``task`` and ``spec`` static).

  Args:
    state: the running sums so far (``init``, or a previous ``update``).
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``); static.
    batch: the batch to add.
    spec: the factor pass ``state`` was initialised with; static.
    key: PRNG key of this batch's ``labels="mc"`` draws (``fit_factors`` folds in the batch index); None for
      the other label modes.

  Returns:
    ``state`` with the batch added: full sums incremented, low-rank factors folded in
    (``lowrank.update_factor``) with their exact traces; row counts per expert; ``num_sequences`` plus the
    batch's non-empty rows; ``log_lik`` plus their sum of log p(y|x) at the MAP.
  """
  rows, log_lik = _block_rows(params, task, batch, spec, key)
  cfg = task.cfg
  stats = {}
  for blk, (a, g, w, expert, valid) in rows.items():
    old = state.stats[blk]
    num_e = block_dims(cfg, blk)[0]
    if spec.rank_of(blk) is None:
      stats[blk] = jax.tree.map(lambda s, n: s + n.astype(s.dtype), old, expert_sums(a, g, w, expert, valid, num_e))
      continue
    num_l = g.shape[0]
    g_rows = (g * jnp.sqrt(w)[..., None]).reshape(-1, g.shape[-1])
    slot = jnp.where(valid, expert, num_e)
    per_expert = lambda v_r: jax.ops.segment_sum(v_r, slot, num_segments=num_e + 1)[:-1]
    dt = old.a_tr_e.dtype
    stats[blk] = lowrank.LowRankStats(
        lowrank.update_factor(old.a_efr, a.astype(old.a_efr.dtype), expert, valid),
        lowrank.update_factor(old.g_edr, g_rows.astype(old.g_edr.dtype), jnp.tile(expert, num_l),
                              jnp.tile(valid, num_l)),
        old.rows_e + jnp.bincount(slot, length=num_e + 1)[:-1],
        old.a_tr_e + per_expert(jnp.sum(jnp.square(a.astype(dt)), -1)),
        old.g_tr_e + per_expert(jnp.sum(w.astype(dt)[..., None] * jnp.square(g.astype(dt)), (0, 2))))
  return FactorState(stats, state.num_sequences + jnp.sum(nonempty_rows(batch)).astype(state.num_sequences.dtype),
                     state.log_lik + log_lik.astype(state.log_lik.dtype))


def eigen_factors(stats: LayerStats | lowrank.LowRankStats, name: str = "") -> Factors:
  """Eigendecompose one block's sums (vmapped over experts): full ``eigh`` (A divided by its row count),
  or the SVD of the low-rank B (eigenvectors [e, n, r]). Experts that received no rows get zero factors
  (their posterior is the prior). Raises ``FloatingPointError`` on non-finite sums, naming the block ``name``
  (on concrete sums: under ``jit`` / ``eval_shape`` the check is the caller's).

  Args:
    stats: one block's sums: ``LayerStats`` (full) or ``lowrank.LowRankStats``.
    name: the block's name in the error message.

  Returns:
    ``Factors``: eigenvalues ``a_eig_ef`` [e, r_a] of A / rows (negatives clipped to 0) with eigenvectors
    ``a_vec_eff`` [e, f, r_a], ``g_eig_ed`` [e, r_g] of G (a sum) with ``g_vec_edd`` [e, d, r_g], ``rows_e``;
    full factors: r_a = f, r_g = d, eigenvalues ascending, remainders 0; low rank: r_a = r_g = r, descending,
    and ``a_rest_e`` / ``g_rest_e`` [e] the isotropic remainders from the exact traces.
  """
  leaves = list(stats[:2])
  concrete = not any(isinstance(x, jax.core.Tracer) for x in leaves)
  if concrete and not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
    raise FloatingPointError(f"non-finite K-FAC factor sums in block {name}: NaN/inf activations or gradients "
                             "in the factor pass")
  rows_e = jnp.maximum(stats.rows_e, 1).astype(leaves[0].dtype)
  if isinstance(stats, LayerStats):
    a_eig, a_vec = jax.vmap(jnp.linalg.eigh)(stats.a_eff / rows_e[:, None, None])
    g_eig, g_vec = jax.vmap(jnp.linalg.eigh)(stats.g_edd)
    # Factors are PSD: clip round-off negatives.
    return Factors(jnp.maximum(a_eig, 0), a_vec, jnp.maximum(g_eig, 0), g_vec, stats.rows_e,
                   jnp.zeros_like(rows_e), jnp.zeros_like(rows_e))
  a_eig, a_vec = lowrank.eigenform(stats.a_efr)
  a_eig, (g_eig, g_vec) = jnp.maximum(a_eig / rows_e[:, None], 0), lowrank.eigenform(stats.g_edr)
  g_eig = jnp.maximum(g_eig, 0)
  (f, ra), (d, rg) = a_vec.shape[1:], g_vec.shape[1:]
  a_rest = jnp.maximum(stats.a_tr_e / rows_e - jnp.sum(a_eig, 1), 0) / max(f - ra, 1)
  g_rest = jnp.maximum(stats.g_tr_e - jnp.sum(g_eig, 1), 0) / max(d - rg, 1)
  return Factors(a_eig, a_vec, g_eig, g_vec, stats.rows_e, a_rest.astype(a_eig.dtype), g_rest.astype(a_eig.dtype))


def finalize(state: FactorState) -> dict[Block, Factors]:
  """``eigen_factors`` of every block of a factor pass.

  Args:
    state: the running sums at the end of the pass (``update``, ``fit.fit_factors``).

  Returns:
    ``{block: Factors}``, keys made ``Block``s (``as_block``). Raises ``FloatingPointError`` on non-finite sums.
  """
  out = {}
  for key, s in state.stats.items():
    blk = as_block(key)
    out[blk] = eigen_factors(s, f"{blk} (MoE layer {blk.layer}, {blk.kind})")
  return out
