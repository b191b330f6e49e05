"""Last-layer Laplace: K-FAC on the answer rows of the LM head, W = head[:, class_ids] [d, C].

With ``phi`` the final (normed) hidden state at the answer position, ``f = phi W``: one "expert" whose
down_proj maps ``phi`` to the C logits, so the same pure functions as Bayesian-MoE apply (``expert_sums``,
``finalize``, ``posterior.build``, ``project_rows``, ``layer_covariance``): A = mean of phi phi^T, G = sum
of (diag p - p p^T) over the fit data (exact labels), evidence-optimal prior precision by default.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from bmoe_jax.config import MoEConfig
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.model import forward

BLOCK = kfac.Block(0, "routed")  # the head's answer rows, as one expert


def head_rows(params, cfg: MoEConfig, class_ids_c) -> jax.Array:
  head_dv = params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  return head_dv[:, class_ids_c].astype(jnp.float32)


def features(params, cfg: MoEConfig, batch: kfac.Batch, **forward_kw) -> jax.Array:
  """phi [b, d]: the final normed hidden state at each answer position."""
  out = forward(params, cfg, batch.tokens_bs, batch.mask_bs, return_hidden=True,
                logit_positions_b=batch.answer_pos_b, **kfac.batch_forward_kw(batch, forward_kw))
  h_bsd = out.hidden_states[-1]
  return jnp.take_along_axis(h_bsd, batch.answer_pos_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def _logits(phi_bd, w_dc, batch):
  f = phi_bd @ w_dc
  if batch.choice_mask_bc is not None:
    f = jnp.where(batch.choice_mask_bc, f, kfac.CHOICE_MASK_VALUE)
  return f


def last_layer_laplace(params, cfg: MoEConfig, class_ids_c, fit_batches: Sequence[kfac.Batch], *,
                       prior_precision: float | None = None, dataset_size: int | None = None,
                       link: str = "probit", **forward_kw):
  """Fit and return (method, posterior). ``prior_precision=None``: maximise the evidence (LPO)."""
  if not fit_batches:
    raise ValueError("last-layer Laplace needs fit batches")
  if class_ids_c is None or any(b.class_ids_bc is not None for b in fit_batches):
    raise ValueError("last-layer Laplace needs one set of class tokens (lettered prompts); cloze-style "
                     "batches score different head rows per example")
  w_dc = head_rows(params, cfg, class_ids_c)

  # params, weights and posterior are jit arguments (never compile-time constants of the model's size)
  @jax.jit
  def stats_of(p, w_dc, b):
    phi = features(p, cfg, b, **forward_kw)
    f = _logits(phi, w_dc, b)
    ct_lbc, w_lb = kfac.label_cotangents(f, b.labels_b, "exact")
    log_lik = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(f), b.labels_b[:, None], 1))
    valid = jnp.ones(phi.shape[0], bool)
    return kfac.expert_sums(phi, ct_lbc, w_lb, jnp.zeros(phi.shape[0], jnp.int32), valid, 1), log_lik

  total, log_lik, n = None, 0.0, 0
  for b in fit_batches:
    st, ll = stats_of(params, w_dc, b)
    total = st if total is None else jax.tree.map(jnp.add, total, st)
    log_lik, n = log_lik + ll, n + int(b.labels_b.shape[0])
  factors = kfac.finalize(kfac.FactorState({BLOCK: total}, jnp.asarray(n), jnp.asarray(log_lik)))
  post = P.build(factors, None, weights={BLOCK: w_dc[None]}, num_sequences=n, dataset_size=dataset_size,
                 prior_mean="zero", prior_precision=1.0 if prior_precision is None else prior_precision,
                 log_lik=log_lik)
  if prior_precision is None:
    post, _ = P.optimize_prior_precision(post, "global", steps=200)
  c = w_dc.shape[1]

  @jax.jit
  def predict(p, w_dc, post, b):
    fac, prec = post.factors[BLOCK], jnp.exp(post.log_prior_prec_e[BLOCK])
    phi = features(p, cfg, b, **forward_kw)
    f = _logits(phi, w_dc, b)
    g_bctd = jnp.broadcast_to(jnp.eye(c, dtype=phi.dtype)[None, :, None, :], (phi.shape[0], c, 1, c))
    if b.choice_mask_bc is not None:  # masked logits are constants: no Jacobian
      g_bctd = g_bctd * b.choice_mask_bc[:, :, None, None]
    jac = PR.project_rows(fac, phi[:, None], g_bctd, jnp.zeros((phi.shape[0], 1), jnp.int32),
                          jnp.ones((phi.shape[0], 1), bool))
    cov = PR.layer_covariance(fac, jac, post.scale, prec)
    return PR.probit(f, cov) if link == "probit" else PR.mc_softmax(f, cov, jax.random.key(0), 1000)

  return (lambda b: predict(params, w_dc, post, b)), post
