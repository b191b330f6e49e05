"""Linearised (GLM) predictives of the per-expert Laplace posterior, and class probabilities.

The task output is ``f(x) in R^C`` (answer-letter logits). Linearised around the MAP, ``f ~ N(f*, Sigma_f)``
with ``Sigma_f = sum_e J_e Sigma_e J_e^T`` over the Bayesian experts (of every ``kfac.Block``: routed
experts, and shared experts when the spec includes them). **Routing is held at its MAP value**:
the Jacobian is taken with every token's top-k expert choice fixed at the MAP's (top-k is piecewise
constant; the routing weights' smooth dependence on earlier Bayesian layers is differentiated through),
so the linearised routes never re-route. ``nn_mc`` runs the full network and may re-route.

Three routes, each tested against the others and against a materialised Jacobian:

1. ``closed``: C vector-Jacobian products (one per class, vmapped) give every routed slot's
   ``g_c = d f_c / d y`` (routing weight included); with the slot's down_proj input ``a``, expert e's
   Jacobian row is ``M_c = sum_t a_t g_ct^T`` [f, d]. It is never formed: it is projected on the factors'
   eigenvectors, ``P_c = U_A^T M_c U_G`` (r_a x r_g, summed slot by slot). Low-rank factors also need
   the parts of ``M`` outside the spans (``posterior.spectrum``'s four groups): by inclusion-exclusion
   from ``<M_c, M_k>`` (a Gram over slots), ``RA_i = (U_A^T M_c M_k^T U_A)_ii`` and ``RG_j = (U_G^T M_c^T
   M_k U_G)_jj`` (from ``U_A^T M`` and ``M U_G``). All are independent of the prior precision
   (``jacobian_stats``), so tuning lambda on validation data costs one pass.
2. ``jvp_mc``: structured samples ``eps ~ N(0, Sigma)`` in the eigenbasis, ``f* + J eps`` by ``jax.jvp``
   of the linearised network (``jax.linearize`` once, ``vmap`` over samples).
3. ``nn_mc``: sampled weights, full forward passes (not linearised).

Then ``p = E softmax(f)`` by ``bmoe_jax.task.class_probs``: ``mc`` over Gaussian logits (seeded, cheap for
small C) or a closed form (``probit_pairwise``, the default, on the contrasts ``f_c - f_k``; laplace-torch's
``probit``).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace.kfac import Block, Factors, block_slots
from bmoe_jax.model import zero_perturbations
from bmoe_jax.params import write_blocks
from bmoe_jax.task import DEFAULT_LINK, Batch, Task, class_probs

METHODS = ("closed", "jvp_mc", "nn_mc")


class LayerJacobian(NamedTuple):
  """One block's lambda-independent Jacobian statistics for the closed-form predictive (``project_rows``).

  Attributes:
    proj_becrq: [b, e, c, r_a, r_g] the Jacobian rows M_c projected on U_A (x) U_G: U_A^T M_c U_G.
    gram_becc: [b, e, c, c] <M_c, M_k> (low-rank factors only; None for full factors).
    ra_becci: [b, e, c, c, r_a] (U_A^T M_c M_k^T U_A)_ii (low-rank only).
    rg_beccj: [b, e, c, c, r_g] (U_G^T M_c^T M_k U_G)_jj (low-rank only).
  """
  proj_becrq: jax.Array  # [b, e, c, r_a, r_g] Jacobian rows projected on U_A (x) U_G
  gram_becc: jax.Array | None  # [b, e, c, c] <M_c, M_c'> (low-rank factors only)
  ra_becci: jax.Array | None = None  # [b, e, c, c, r_a] (U_A^T M_c M_k^T U_A)_ii (low-rank only)
  rg_beccj: jax.Array | None = None  # [b, e, c, c, r_g] (U_G^T M_c^T M_k U_G)_jj (low-rank only)


class JacobianStats(NamedTuple):
  """The lambda-independent statistics of one batch for the closed-form predictive (``jacobian_stats``).

  Attributes:
    f_bc: [b, c] the MAP logits.
    blocks: each Bayesian block's ``LayerJacobian``.
  """
  f_bc: jax.Array  # MAP logits
  blocks: dict[Block, LayerJacobian]


class Predictive(NamedTuple):
  """A batch's predictive (``predict``).

  Attributes:
    probs_bc: [b, c] the class probabilities E softmax(f).
    f_mean_bc: [b, c] the logits' mean: the MAP logits (closed route) or the samples' mean.
    f_cov_bcc: [b, c, c] the logits' covariance: Sigma_f (closed route) or the samples' (unbiased) covariance.
  """
  probs_bc: jax.Array
  f_mean_bc: jax.Array
  f_cov_bcc: jax.Array | None  # closed route: Sigma_f; sampling routes: the sample covariance


GATHER_ABOVE_EXPERTS = 16  # measured on CPU: at 8 experts projecting on all bases is ~3x faster


def project_rows(fac: Factors, a_btf, g_bctd, expert_bt, valid_bt, gather: bool | None = None) -> LayerJacobian:
  """Per-expert projections of the Jacobian rows ``sum_t a_t g_ct^T`` of b inputs (t: routed slots).

  Pure and shape-generic.

  Args:
    fac: the block's factors (eigenvectors ``a_vec_eff`` [e, f, r_a], ``g_vec_edd`` [e, d, r_g]).
    a_btf: [b, t, f] each slot's down_proj input a.
    g_bctd: [b, c, t, d] each slot's output gradient g_c = d f_c / d y, per class.
    expert_bt: [b, t] int the expert of each slot.
    valid_bt: [b, t] bool whether the slot counts (padding: False).
    gather: how slots are projected: True: each on its own expert's eigenvectors; False: on every expert's, then
      picked; None: gather above ``GATHER_ABOVE_EXPERTS`` experts. Both are exact.

  Returns:
    ``LayerJacobian``: ``proj_becrq`` [b, e, c, r_a, r_g]; for low-rank factors also ``gram_becc``, ``ra_becci``
    and ``rg_beccj`` (None for full factors).
  """
  num_e = fac.a_vec_eff.shape[0]
  onehot_bte = jax.nn.one_hot(expert_bt, num_e, dtype=a_btf.dtype) * valid_bt[..., None].astype(a_btf.dtype)
  if gather is None:
    gather = num_e > GATHER_ABOVE_EXPERTS
  if gather:  # each slot on its own expert's eigenvectors: t (f + d) r memory, no e-fold work
    pa_btr = jnp.einsum("btf,btfr->btr", a_btf, fac.a_vec_eff[expert_bt])
    pg_bctq = jnp.einsum("bctd,btdq->bctq", g_bctd, fac.g_vec_edd[expert_bt])
  else:  # every slot on every expert's basis, then pick its own: e-fold work, faster for few experts
    pa_btr = jnp.take_along_axis(jnp.einsum("btf,efr->bter", a_btf, fac.a_vec_eff),
                                 expert_bt[:, :, None, None], axis=2)[:, :, 0]
    pg_bctq = jnp.take_along_axis(jnp.einsum("bctd,edq->bcteq", g_bctd, fac.g_vec_edd),
                                  expert_bt[:, None, :, None, None], axis=3)[:, :, :, 0]
  # sum over slots t of expert e: one contraction over t (no [b, t, c, r, q] outer products in memory)
  proj = jnp.einsum("bter,bctq->becrq", onehot_bte[..., None] * pa_btr[:, :, None, :], pg_bctq)
  gram = None
  if not P.is_full_rank(fac):
    # <M_c, M_k> of expert e = sum over slot pairs (t, u) both routed to e of (a_t.a_u)(g_ct.g_ku),
    # contracted as sum_t g_ct . (sum_u aa_tu g_ku): b t^2 c d + b c^2 t d work, no [b, c, t, c, t] array.
    same_btu = (expert_bt[:, :, None] == expert_bt[:, None, :]) & valid_bt[:, :, None] & valid_bt[:, None, :]
    aa_btu = jnp.einsum("btf,buf->btu", a_btf, a_btf) * same_btu.astype(a_btf.dtype)
    h_bktd = jnp.einsum("btu,bkud->bktd", aa_btu, g_bctd)
    row_bckt = jnp.einsum("bctd,bktd->bckt", g_bctd, h_bktd)
    gram = jnp.einsum("bte,bckt->beck", onehot_bte, row_bckt)
    xa_becrd = jnp.einsum("bte,btr,bctd->becrd", onehot_bte, pa_btr, g_bctd)  # U_A^T M_c per expert
    yg_becfq = jnp.einsum("bte,btf,bctq->becfq", onehot_bte, a_btf, pg_bctq)  # M_c U_G per expert
    return LayerJacobian(proj, gram, jnp.einsum("becrd,bekrd->beckr", xa_becrd, xa_becrd),
                         jnp.einsum("becfq,bekfq->beckq", yg_becfq, yg_becfq))
  return LayerJacobian(proj, gram)


def jacobian_stats(params, task: Task, batch: Batch, post: P.Posterior) -> JacobianStats:
  """One forward and C vjps: the lambda-independent statistics of the closed-form predictive.

  Args:
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``); static under ``jacobian_stats_jit``.
    batch: the batch; every real token's slots enter the Jacobian.
    post: the posterior (its blocks and factors' eigenvectors; its prior precision is not read).

  Returns:
    ``JacobianStats``: the MAP logits [b, c] and a ``LayerJacobian`` per block of ``post.factors`` (computed
    from float32 slots).
  """
  b, s = batch.tokens_bs.shape

  def f(perturb):
    return task.logits_and_taps(params, batch, perturb)

  f_bc, pullback, taps = jax.vjp(f, zero_perturbations(task.cfg, b, s, blocks=post.factors), has_aux=True)
  c = f_bc.shape[-1]
  grads = jax.vmap(lambda ct: pullback(ct)[0])(jnp.broadcast_to(jnp.eye(c, dtype=f_bc.dtype)[:, None], (c, b, c)))
  blocks = {}
  for blk, fac in post.factors.items():
    a_bskf, g_cbskd, expert_bsk = block_slots(taps, grads, blk)
    k = expert_bsk.shape[-1]
    valid_bt = jnp.repeat(batch.mask_bs.astype(bool), k, axis=1)
    a_btf = a_bskf.reshape(b, s * k, -1).astype(jnp.float32)
    g_bctd = jnp.moveaxis(g_cbskd, 0, 1).reshape(b, c, s * k, -1).astype(jnp.float32)
    blocks[blk] = project_rows(fac, a_btf, g_bctd, expert_bsk.reshape(b, s * k), valid_bt)
  return JacobianStats(jax.lax.stop_gradient(f_bc), blocks)


# One compiled Jacobian pass per (task, shapes) for the whole process: the prior-precision grid and every
# Bayesian-MoE method of an evaluation reuse each other's executables (compiling one takes seconds).
jacobian_stats_jit = jax.jit(jacobian_stats, static_argnames="task")


def layer_covariance(fac: Factors, jac: LayerJacobian, scale, prec_e) -> jax.Array:
  """[b, c, c] contribution of one block's experts to Sigma_f: ``<M_c, Sigma_e M_k>`` summed over the
  four eigen-groups of ``posterior.spectrum`` (module docstring).

  Args:
    fac: the block's factors.
    jac: the block's Jacobian statistics (``project_rows``) for the same factors.
    scale: s, the curvature's scale (``Posterior.scale``).
    prec_e: [e] the prior precision lambda per expert (not its log).

  Returns:
    [b, c, c] sum over the block's experts of J_e Sigma_e J_e^T.
  """
  ss, sp, ps, pp = (1.0 / x for x in P.spectrum(fac, scale, prec_e))
  span = jnp.einsum("becrq,erq,bekrq->bck", jac.proj_becrq, ss, jac.proj_becrq)
  if jac.gram_becc is None:
    return span
  pp_i = jnp.einsum("becrq,bekrq->beckr", jac.proj_becrq, jac.proj_becrq)  # sum over j of P_c P_k
  pp_j = jnp.einsum("becrq,bekrq->beckq", jac.proj_becrq, jac.proj_becrq)  # sum over i
  in_span = jnp.sum(pp_i, -1)
  a_only = jnp.einsum("beckr,er->bck", jac.ra_becci - pp_i, sp)
  g_only = jnp.einsum("beckq,eq->bck", jac.rg_beccj - pp_j, ps)
  rest = jac.gram_becc - jnp.sum(jac.ra_becci, -1) - jnp.sum(jac.rg_beccj, -1) + in_span
  return span + a_only + g_only + jnp.einsum("beck,e->bck", rest, pp)


def logit_covariance(stats: JacobianStats, post: P.Posterior, log_prior_prec_e=None) -> jax.Array:
  """Sigma_f [b, c, c] from the statistics and the posterior (or another prior precision).

  Args:
    stats: the batch's statistics (``jacobian_stats``, on ``post``'s factors).
    post: the posterior (factors and scale; its prior precision unless ``log_prior_prec_e`` is given).
    log_prior_prec_e: ``{block: [e] log lambda}``; None: ``post.log_prior_prec_e``.

  Returns:
    [b, c, c] the linearised logits' covariance, summed over the blocks of ``stats``.
  """
  log_prec = post.log_prior_prec_e if log_prior_prec_e is None else log_prior_prec_e
  cov = 0.0
  for l, jac in stats.blocks.items():
    cov = cov + layer_covariance(post.factors[l], jac, post.scale, jnp.exp(log_prec[l]))
  return cov


def jvp_samples(params, task: Task, batch: Batch, post: P.Posterior, key, num_samples: int):
  """[n, b, c] linearised samples f* + J eps, eps ~ N(0, Sigma) structured per expert.

  Args:
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``).
    batch: the batch.
    post: the posterior.
    key: PRNG key of the weight draws (``posterior.sample_perturbations``).
    num_samples: n, the number of draws.

  Returns:
    [n, b, c] the linearised logits, one jvp per draw (linearised at W_map, in at least float32).
  """
  def f(w_by_block):
    return task.logits(write_blocks(params, w_by_block), batch)

  w_map = {l: w.astype(jnp.promote_types(w.dtype, jnp.float32)) for l, w in post.w_map.items()}
  f_bc, f_jvp = jax.linearize(f, w_map)
  eps = P.sample_perturbations(post, key, num_samples)  # tangents in the primals' dtype (jvp requires it)
  return f_bc + jax.vmap(f_jvp)({l: e.astype(w_map[l].dtype) for l, e in eps.items()})


def nn_samples(params, task: Task, batch: Batch, post: P.Posterior, key, num_samples: int):
  """[n, b, c] logits of full forward passes with sampled down_proj weights (routing recomputed by the
  forward, but the router and everything before the Bayesian layers are at the MAP).

  Args:
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``).
    batch: the batch.
    post: the posterior.
    key: PRNG key of the weight draws (``posterior.sample_perturbations``).
    num_samples: n, the number of draws (forwards run one after another, ``jax.lax.map``).

  Returns:
    [n, b, c] the logits of each sampled network.
  """
  eps = P.sample_perturbations(post, key, num_samples)

  def one(eps_one):
    w = {l: (post.w_map[l] + eps_one[l]).astype(post.w_map[l].dtype) for l in eps_one}
    return task.logits(write_blocks(params, w), batch)

  return jax.lax.map(one, eps)


def predict(post: P.Posterior, params, task: Task, batch: Batch, *, method: str = "closed",
            link: str = DEFAULT_LINK, key: jax.Array | None = None, num_samples: int = 1000) -> Predictive:
  """Class probabilities with uncertainty.

  Args:
    post: the posterior.
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``).
    batch: the batch.
    method: ``"closed"`` (linearised, Sigma_f in closed form), ``"jvp_mc"`` (linearised samples) or ``"nn_mc"``
      (sampled networks); see the module docstring.
    link: closed route only: how E softmax(f) is taken, one of ``task.LINKS`` (``"mc"``: ``num_samples``
      Gaussian logit draws). The sampling routes average the samples' softmax.
    key: PRNG key of the ``"mc"`` link or of the sampling routes' weight draws; None: ``jax.random.key(0)``.
    num_samples: the number of Gaussian logit draws (``link="mc"``) or of weight draws (sampling routes).

  Returns:
    ``Predictive``: probabilities [b, c], the logits' mean [b, c] and covariance [b, c, c].
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")
  key = jax.random.key(0) if key is None else key
  if method == "closed":
    stats = jacobian_stats(params, task, batch, post)
    cov = logit_covariance(stats, post)
    return Predictive(class_probs(stats.f_bc, cov, link, key, num_samples), stats.f_bc, cov)
  sampler = jvp_samples if method == "jvp_mc" else nn_samples
  f_nbc = sampler(params, task, batch, post, key, num_samples)
  mean = f_nbc.mean(0)
  centred = f_nbc - mean
  cov = jnp.einsum("nbi,nbj->bij", centred, centred) / max(num_samples - 1, 1)
  return Predictive(jax.nn.softmax(f_nbc, -1).mean(0), mean, cov)


class GridStats(NamedTuple):
  """A validation set's linearised predictive at every prior precision of a grid (``grid_stats``): all a grid
  search needs, for any link and temperature, in O(grid x n x C^2) memory instead of the Jacobian statistics'.

  Attributes:
    prior_precision_g: [g] the grid's global prior precisions lambda (not logs), float64.
    f_nc: [n, c] the MAP logits of the n validation examples.
    cov_gncc: [g, n, c, c] the logits' covariance Sigma_f at each grid point.
    labels_n: [n] int the labels.
  """
  prior_precision_g: np.ndarray
  f_nc: np.ndarray
  cov_gncc: np.ndarray
  labels_n: np.ndarray


def grid_covariances(stats: JacobianStats, post: P.Posterior, grid) -> jax.Array:
  """[g, b, c, c] Sigma_f of one batch at each global prior precision of ``grid``.

  Args:
    stats: the batch's statistics (``jacobian_stats``, on ``post``'s factors).
    post: the posterior (factors and scale; its own prior precision is not read).
    grid: [g] the prior precisions lambda (not logs), one global value each.

  Returns:
    [g, b, c, c] ``logit_covariance`` at each lambda.
  """
  num_e = {l: w.shape[0] for l, w in post.w_map.items()}
  return jnp.stack([logit_covariance(stats, post, P.expand_prior_precision(float(lam), num_e, post.scale.dtype))
                    for lam in np.asarray(grid, np.float64)])


def grid_stats(post: P.Posterior, val: Iterable[tuple[JacobianStats, jax.Array]], grid) -> GridStats:
  """The ``GridStats`` of the (statistics, labels) pairs of ``val``, consumed one at a time: a generator that
  computes each batch's statistics holds one batch's at a time (they are large: [b, e, C, r_a, r_g] per block).

  Args:
    post: the posterior the statistics were taken on.
    val: (``jacobian_stats`` of a validation batch, its labels [b] int) pairs; any iterable.
    grid: [g] the prior precisions lambda (not logs), one global value each.

  Returns:
    ``GridStats`` of the concatenated batches (ValueError when ``val`` is empty).
  """
  f, cov, y = [], [], []
  for stats, labels_b in val:
    f.append(np.asarray(stats.f_bc))
    cov.append(np.asarray(grid_covariances(stats, post, grid)))
    y.append(np.asarray(labels_b))
    del stats  # the caller's generator may free it before computing the next batch's
  if not f:
    raise ValueError("grid search of the prior precision: no validation batches (pass a non-empty validation set)")
  return GridStats(np.asarray(grid, np.float64), np.concatenate(f), np.concatenate(cov, 1), np.concatenate(y))


def grid_search_prior_precision(post: P.Posterior, val: GridStats | Iterable[tuple[JacobianStats, jax.Array]],
                                grid=None, link: str = DEFAULT_LINK, key: jax.Array | None = None,
                                num_samples: int = 1000, temperature: float = 1.0) -> tuple[P.Posterior, dict]:
  """Global lambda minimising validation NLL over ``grid`` (the pipeline's default:
  ``pipeline.configs.FitConfig.grid``). Every grid point, link and temperature costs only a [n, C, C] predictive.

  Args:
    post: the posterior (its factors; its own prior precision is not read).
    val: a ``GridStats`` (``grid_stats``: reuse it across links and temperatures), or (``jacobian_stats`` of a
      validation batch on ``post``'s factors, its labels [b] int) pairs, reduced by ``grid_stats``.
    grid: the candidate prior precisions lambda (not logs), one global value each; None: ``val``'s (a
      ``GridStats``). A ``GridStats`` of another grid is a ValueError.
    link: how E softmax(f) is taken, one of ``task.LINKS``.
    key: PRNG key of the ``"mc"`` link (the same draws at every grid point); None: ``jax.random.key(0)``.
    num_samples: Gaussian logit draws of the ``"mc"`` link.
    temperature: T: the predictive of the tempered logits f / T, N(f* / T, Sigma_f / T^2) (Bayesian-MoE after
      temperature scaling); 1: untempered.

  Returns:
    ``(posterior, curve)``: ``post`` with the best lambda for every expert of every block (the first on ties),
    and ``{"prior_precision": [...], "nll": [...]}`` (the grid, and the mean NLL per example at each point).
  """
  if not isinstance(val, GridStats):
    if grid is None:
      raise ValueError("grid search of the prior precision: pass grid= (the candidate lambdas)")
    val = grid_stats(post, val, grid)
  elif grid is not None and not np.array_equal(np.asarray(grid, np.float64), val.prior_precision_g):
    raise ValueError(f"grid search: grid={list(grid)} differs from the GridStats' {val.prior_precision_g.tolist()}")
  key = jax.random.key(0) if key is None else key
  f_nc, labels = jnp.asarray(val.f_nc) / temperature, jnp.asarray(val.labels_n)[:, None]
  nlls = [float(-jnp.mean(jnp.log(jnp.take_along_axis(
      class_probs(f_nc, jnp.asarray(cov) / temperature**2, link, key, num_samples), labels, 1) + 1e-12)))
      for cov in val.cov_gncc]
  best = float(val.prior_precision_g[int(np.argmin(nlls))])
  num_e = {l: w.shape[0] for l, w in post.w_map.items()}
  return (post._replace(log_prior_prec_e=P.expand_prior_precision(best, num_e, post.scale.dtype)),
          {"prior_precision": val.prior_precision_g.tolist(), "nll": nlls})
