"""Last-layer Laplace: K-FAC on the answer rows of the LM head, W = head[:, class_ids] [d, C].

With ``phi`` the final (normed) hidden state at the answer position, ``f = phi W``: one "expert" whose
weights map ``phi`` to the C logits (``Block(num_layers, "head")``, read by ``params.read_block``), so the
same pure functions as Bayesian-MoE apply (``expert_sums``, ``eigen_factors``, ``posterior.build``,
``project_rows``, ``layer_covariance``): A = mean of phi phi^T, G = sum of (diag p - p p^T) over the fit
data (exact labels), evidence-optimal prior precision (zero prior mean) by default.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.params import Block, head_bias, read_block
from bmoe_jax.task import CHOICE_MASK_VALUE, DEFAULT_LINK, Batch, Task, class_probs


def head_block(task: Task) -> Block:
  return Block(task.cfg.num_layers, "head")


def _logits(phi_bd, w_dc, batch, bias_c=None):
  f = phi_bd @ w_dc if bias_c is None else phi_bd @ w_dc + bias_c  # Phi-3.5-MoE's head bias: a constant shift
  if batch.choice_mask_bc is not None:
    f = jnp.where(batch.choice_mask_bc, f, CHOICE_MASK_VALUE)
  return f


def _fit_stats(params, task: Task, w_dc, fit_batches):
  """The head block's A/G sums, the log-likelihood and the number of examples of the fit data."""
  @jax.jit  # params and weights are jit arguments (never compile-time constants of the model's size)
  def stats_of(p, w_dc, b):
    phi = task.features(p, b)
    f = _logits(phi, w_dc, b, head_bias(p, task.class_ids))
    ct_lbc, w_lb = kfac.label_cotangents(f, b.labels_b, "exact")
    log_lik = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(f), b.labels_b[:, None], 1))
    valid = jnp.ones(phi.shape[0], bool)
    return kfac.expert_sums(phi, ct_lbc, w_lb, jnp.zeros(phi.shape[0], jnp.int32), valid, 1), log_lik

  total, log_lik, n = None, 0.0, 0
  for b in fit_batches:
    st, ll = stats_of(params, w_dc, b)
    total = st if total is None else jax.tree.map(jnp.add, total, st)
    log_lik, n = log_lik + ll, n + int(b.labels_b.shape[0])
  return total, log_lik, n


def last_layer_laplace(params, task: Task, fit_batches: Sequence[Batch], *, prior_precision: float | None = None,
                       dataset_size: int | None = None, link: str = DEFAULT_LINK):
  """Fit and return (method, posterior). ``prior_precision=None``: maximise the evidence (LPO)."""
  if not fit_batches:
    raise ValueError("last-layer Laplace needs fit batches")
  if task.class_ids is None or any(b.class_ids_bc is not None or b.cont is not None for b in fit_batches):
    raise ValueError("last-layer Laplace needs one set of class tokens (lettered prompts): cloze batches "
                     "score different head rows per example, and continuation-scored batches (scoring="
                     "'continuation') read every row through the vocabulary softmax; use scoring='letters' or "
                     "another method")
  blk = head_block(task)
  w_dc = read_block(params, blk, task.class_ids)[0].astype(jnp.float32)
  total, log_lik, n = _fit_stats(params, task, w_dc, fit_batches)
  post = P.build({blk: kfac.eigen_factors(total, f"{blk} (LM head answer rows)")}, {blk: w_dc[None]},
                 prior_mean="zero", num_sequences=n, dataset_size=dataset_size,
                 prior_precision=1.0 if prior_precision is None else prior_precision, log_lik=log_lik)
  if prior_precision is None:
    post, _ = P.optimize_prior_precision(post, "global", steps=200)
  c = w_dc.shape[1]

  @jax.jit
  def predict(p, w_dc, post, b):
    fac, prec = post.factors[blk], jnp.exp(post.log_prior_prec_e[blk])
    phi = task.features(p, b)
    g_bctd = jnp.broadcast_to(jnp.eye(c, dtype=phi.dtype)[None, :, None, :], (phi.shape[0], c, 1, c))
    if b.choice_mask_bc is not None:  # masked logits are constants: no Jacobian
      g_bctd = g_bctd * b.choice_mask_bc[:, :, None, None]
    jac = PR.project_rows(fac, phi[:, None], g_bctd, jnp.zeros((phi.shape[0], 1), jnp.int32),
                          jnp.ones((phi.shape[0], 1), bool))
    cov = PR.layer_covariance(fac, jac, post.scale, prec)
    return class_probs(_logits(phi, w_dc, b, head_bias(p, task.class_ids)), cov, link)

  return (lambda b: predict(params, w_dc, post, b)), post
