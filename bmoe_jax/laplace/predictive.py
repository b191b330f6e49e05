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

from typing import NamedTuple

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
  proj_becrq: jax.Array  # [b, e, c, r_a, r_g] Jacobian rows projected on U_A (x) U_G
  gram_becc: jax.Array | None  # [b, e, c, c] <M_c, M_c'> (low-rank factors only)
  ra_becci: jax.Array | None = None  # [b, e, c, c, r_a] (U_A^T M_c M_k^T U_A)_ii (low-rank only)
  rg_beccj: jax.Array | None = None  # [b, e, c, c, r_g] (U_G^T M_c^T M_k U_G)_jj (low-rank only)


class JacobianStats(NamedTuple):
  f_bc: jax.Array  # MAP logits
  blocks: dict[Block, LayerJacobian]


class Predictive(NamedTuple):
  probs_bc: jax.Array
  f_mean_bc: jax.Array
  f_cov_bcc: jax.Array | None  # closed route: Sigma_f; sampling routes: the sample covariance


GATHER_ABOVE_EXPERTS = 16  # measured on CPU: at 8 experts projecting on all bases is ~3x faster


def project_rows(fac: Factors, a_btf, g_bctd, expert_bt, valid_bt, gather: bool | None = None) -> LayerJacobian:
  """Per-expert projections of the Jacobian rows ``sum_t a_t g_ct^T`` of b inputs (t: routed slots).

  Pure and shape-generic: ``a`` [b, t, f], ``g`` [b, c, t, d], ``expert`` [b, t] int, ``valid`` [b, t].
  ``gather`` picks how slots are projected (None: by the number of experts; both are exact).
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
  """One forward and C vjps: the lambda-independent statistics of the closed-form predictive."""
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
  four eigen-groups of ``posterior.spectrum`` (module docstring)."""
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
  """Sigma_f [b, c, c] from the statistics and the posterior (or another prior precision)."""
  log_prec = post.log_prior_prec_e if log_prior_prec_e is None else log_prior_prec_e
  cov = 0.0
  for l, jac in stats.blocks.items():
    cov = cov + layer_covariance(post.factors[l], jac, post.scale, jnp.exp(log_prec[l]))
  return cov


def jvp_samples(params, task: Task, batch: Batch, post: P.Posterior, key, num_samples: int):
  """[n, b, c] linearised samples f* + J eps, eps ~ N(0, Sigma) structured per expert."""
  def f(w_by_block):
    return task.logits(write_blocks(params, w_by_block), batch)

  f_bc, f_jvp = jax.linearize(f, {l: w.astype(jnp.float32) for l, w in post.w_map.items()})
  eps = P.sample_perturbations(post, key, num_samples)
  return f_bc + jax.vmap(f_jvp)(eps)


def nn_samples(params, task: Task, batch: Batch, post: P.Posterior, key, num_samples: int):
  """[n, b, c] logits of full forward passes with sampled down_proj weights (routing recomputed by the
  forward, but the router and everything before the Bayesian layers are at the MAP)."""
  eps = P.sample_perturbations(post, key, num_samples)

  def one(eps_one):
    w = {l: (post.w_map[l] + eps_one[l]).astype(post.w_map[l].dtype) for l in eps_one}
    return task.logits(write_blocks(params, w), batch)

  return jax.lax.map(one, eps)


def predict(post: P.Posterior, params, task: Task, batch: Batch, *, method: str = "closed",
            link: str = DEFAULT_LINK, key: jax.Array | None = None, num_samples: int = 1000) -> Predictive:
  """Class probabilities with uncertainty. ``method``: closed | jvp_mc | nn_mc; ``link`` (closed only):
  ``task.LINKS`` (mc: ``num_samples`` Gaussian logit draws, seeded by ``key``)."""
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


def grid_search_prior_precision(post: P.Posterior, val: list[tuple[JacobianStats, jax.Array]], grid,
                                link: str = DEFAULT_LINK, key: jax.Array | None = None,
                                num_samples: int = 1000, temperature: float = 1.0) -> tuple[P.Posterior, dict]:
  """Global lambda minimising validation NLL over ``grid`` (the pipeline's default:
  ``pipeline.configs.FitConfig.grid``). ``temperature`` T: the predictive of the tempered logits f / T,
  N(f* / T, Sigma_f / T^2) (Bayesian-MoE after temperature scaling).

  ``val``: (``jacobian_stats`` of a validation batch, its labels) pairs, computed once; every grid
  point then costs only the contraction. Returns the posterior at the best lambda and the curve
  ``{"prior_precision": [...], "nll": [...]}`` (mean NLL per example)."""
  grid = np.asarray(grid, np.float64)
  key = jax.random.key(0) if key is None else key
  num_e = {l: w.shape[0] for l, w in post.w_map.items()}
  nlls = []
  for lam in grid:
    log_prec = P.expand_prior_precision(float(lam), num_e, post.scale.dtype)
    total, count = 0.0, 0
    for stats, labels_b in val:
      cov = logit_covariance(stats, post, log_prec)
      probs = class_probs(stats.f_bc / temperature, cov / temperature**2, link, key, num_samples)
      total += float(-jnp.sum(jnp.log(jnp.take_along_axis(probs, labels_b[:, None], 1) + 1e-12)))
      count += labels_b.shape[0]
    nlls.append(total / max(count, 1))
  best = float(grid[int(np.argmin(nlls))])
  return (post._replace(log_prior_prec_e=P.expand_prior_precision(best, num_e, post.scale.dtype)),
          {"prior_precision": grid.tolist(), "nll": nlls})
