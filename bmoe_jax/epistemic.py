"""Per-example epistemic scores of a predictive: what a temperature cannot give.

A method that averages several predictions (MC dropout's masks, an ensemble's members, draws of Bayesian-MoE's
Gaussian logits) knows how much they disagree; two scores of that disagreement, per example:

* ``mi``: the mutual information between the answer and the draw, ``H(mean_s p_s) - mean_s H(p_s)`` (nats;
  the epistemic part of the predictive entropy, the BALD score);
* ``var_f``: the expected variance of the class logits about their mean over the valid classes,
  ``mean_c Var_s(f_sc - mean_c' f_sc')``. Centred because a shift common to all classes changes no probability
  (continuation scores are log-likelihoods, and their common shift varies most); for Gaussian logits
  ``N(f, Sigma)`` it is the closed form ``tr(H Sigma H) / C`` with ``H`` the centring over the valid classes.

Choices an example lacks (``task.CHOICE_MASK_VALUE`` logits) are left out of the centring and the mean. All
functions are pure jax (jit/vmap-safe), shapes ``[s draws, b examples, C classes]``. ``ScoredMethod`` is how a
method hands them to the evaluation (``evaluate.collect_scored``) with its probabilities, from the same pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from bmoe_jax.task import CHOICE_MASK_VALUE, gaussian_logit_samples

SCORES = ("mi", "var_f")
GAUSSIAN_DRAWS = 64  # draws of N(f, Sigma) behind the Gaussian predictive's mutual information


class ScoredMethod:
  """A Method (batch -> probs [b, C]) that also gives per-example epistemic scores:
  ``fn(batch) -> (probs_bc, {"mi": [b], "var_f": [b]})``."""

  def __init__(self, fn: Callable):
    self.with_scores = fn

  def __call__(self, batch):
    return self.with_scores(batch)[0]


def _entropy(p_bc):
  return -jnp.sum(jnp.where(p_bc > 0, p_bc * jnp.log(jnp.where(p_bc > 0, p_bc, 1.0)), 0.0), -1)


def mutual_information(p_sbc) -> jax.Array:
  """[b] H(mean_s p_s) - mean_s H(p_s), clipped at 0 (float rounding).

  Args:
    p_sbc: [s draws, b, C] class probabilities of each draw (rows sum to one; zeros allowed, 0 log 0 = 0).

  Returns:
    [b] the mutual information between the answer and the draw (nats, >= 0; the BALD score).
  """
  return jnp.maximum(_entropy(jnp.mean(p_sbc, 0)) - jnp.mean(jax.vmap(_entropy)(p_sbc), 0), 0.0)


def _valid(f_bc):
  return (f_bc > CHOICE_MASK_VALUE / 2).astype(f_bc.dtype)


def centred_variance(f_sbc) -> jax.Array:
  """[b] mean over the valid classes of the draws' variance of the class-centred logits.

  Args:
    f_sbc: [s draws, b, C] logits; the classes at ``CHOICE_MASK_VALUE`` in the first draw are absent (left out
      of the centring and the mean).

  Returns:
    [b] ``mean_c Var_s(f_sc - mean_c' f_sc')`` over the valid classes (population variance over the s draws).
  """
  valid_bc = _valid(f_sbc[0])
  n_b = jnp.sum(valid_bc, -1)
  f_sbc = jnp.where(valid_bc > 0, f_sbc, 0.0)
  centred = f_sbc - (jnp.sum(f_sbc, -1, keepdims=True) / n_b[:, None]) * valid_bc
  return jnp.sum(jnp.var(centred, 0) * valid_bc, -1) / n_b


def sample_scores(f_sbc) -> tuple[jax.Array, dict]:
  """(mean softmax [b, C], {"mi": [b], "var_f": [b]}) of logit draws ``f_sbc``.

  Args:
    f_sbc: [s draws, b, C] logits (absent choices at ``CHOICE_MASK_VALUE``), e.g. MC-dropout passes or
      ensemble members.

  Returns:
    (p_bc, scores): the predictive ``mean_s softmax(f_s)`` [b, C], and the scores ``{"mi": [b], "var_f": [b]}``:
    the ``mutual_information`` of the draws' softmaxes (nats) and ``centred_variance(f_sbc)``.
  """
  p_sbc = jax.nn.softmax(f_sbc, -1)
  return jnp.mean(p_sbc, 0), {"mi": mutual_information(p_sbc), "var_f": centred_variance(f_sbc)}


def gaussian_scores(f_bc, cov_bcc, key, num_samples: int = GAUSSIAN_DRAWS) -> dict:
  """{"mi": [b] from ``num_samples`` seeded draws of N(f, Sigma), "var_f": [b] in closed form}.

  Args:
    f_bc: [b, C] mean logits (absent choices at ``CHOICE_MASK_VALUE``).
    cov_bcc: [b, C, C] the logits' covariance Sigma (symmetric PSD; negative eigenvalues are clipped in the draws).
    key: the PRNG key of the draws behind ``"mi"``.
    num_samples: the number of draws of N(f, Sigma) behind ``"mi"`` (default ``GAUSSIAN_DRAWS``).

  Returns:
    ``{"mi": [b], "var_f": [b]}``: the Monte-Carlo mutual information of the draws' softmaxes (nats), and the
    exact ``tr(H Sigma H) / C_valid`` with H the centring over the C_valid valid classes.
  """
  valid_bc = _valid(f_bc)
  n_b = jnp.sum(valid_bc, -1)
  h_bcc = (jnp.eye(f_bc.shape[-1], dtype=f_bc.dtype) - valid_bc[:, None, :] / n_b[:, None, None]) * valid_bc[:, :, None]
  centred_cov = jnp.einsum("bij,bjk,blk->bil", h_bcc, cov_bcc, h_bcc)
  var_b = jnp.trace(centred_cov, axis1=1, axis2=2) / n_b
  draws = jax.nn.softmax(gaussian_logit_samples(f_bc, cov_bcc, key, num_samples), -1)
  return {"mi": mutual_information(draws), "var_f": var_b}
