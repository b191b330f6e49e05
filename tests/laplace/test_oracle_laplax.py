"""laplax 0.0.2 (JAX) as a second external oracle: its full-GGN Laplace and linearised (GLM) predictive.

The MLP ``x -> tanh(x W1) -> W`` with ``W`` [f=H, d=C] the Bayesian layer is one "expert" whose down_proj
maps the features straight to the C logits (every example routes to it with weight 1, ``a = tanh(x W1)``,
``d f_c / d y = e_c``). laplax sees the same network as ``model_fn(input=x, params={"w_fd": W})``.

1. laplax is used right: its dense GGN and GLM predictive covariance equal a materialised reference
   (Jacobian by autodiff, per-example Hessian of the cross-entropy in the logits, (GGN + lambda I)^{-1}).
2. GGN convention: laplax's full GGN over N examples is ``sum_n kron(a_n a_n^T, G_n)`` with our per-example
   rows (``kfac.label_cotangents``/``kfac.expert_sums``): W flattened row-major, summed over examples
   (not averaged), prior not included.
3. Where K-FAC is exact (one training example: GGN = A (x) G), our closed-form Sigma_f (``finalize``,
   ``posterior.build``, ``project_rows``, ``layer_covariance``) equals laplax's full-GGN predictive, also
   with the curvature rescaled to a larger dataset (our ``dataset_size``, laplax's ``num_total_samples``).
Float64 on both sides.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR

if os.environ.get("CI"):
  import laplax  # under CI the oracle must be installed: fail, never skip
else:
  laplax = pytest.importorskip("laplax")
from laplax.curv import create_ggn_mv, create_posterior_fn  # noqa: E402
from laplax.eval import pushforward as pf  # noqa: E402
from loguru import logger  # noqa: E402  (a laplax dependency; it logs every call at DEBUG)

logger.disable("laplax")

N, D_IN, H, C, N_TEST, PRIOR = 9, 3, 5, 4, 6, 0.7
BLK = kfac.Block(0)  # the routed experts of "layer 0"


def _rel(x, ref):
  return float(np.max(np.abs(np.asarray(x) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref))))


def _problem():
  """A random (untrained: neither side needs a MAP) network and data; float64 under ``jax.enable_x64``."""
  k = jax.random.split(jax.random.key(0), 5)
  w1_ih = jax.random.normal(k[0], (D_IN, H), jnp.float64)
  w_fd = jax.random.normal(k[1], (H, C), jnp.float64)
  x_ni = jax.random.normal(k[2], (N, D_IN), jnp.float64)
  y_n = jax.random.randint(k[3], (N,), 0, C)
  xt_bi = jax.random.normal(k[4], (N_TEST, D_IN), jnp.float64)

  def model_fn(input, params):  # laplax calls it per example, with these keyword names
    return jnp.tanh(input @ w1_ih) @ params["w_fd"]

  return model_fn, w1_ih, w_fd, x_ni, y_n, xt_bi


def _laplax_glm(model_fn, w_fd, x_ni, y_n, xt_bi, dataset_size=None):
  """laplax's dense GGN [P, P], posterior covariance [P, P] and GLM logit covariance [b, C, C]."""
  params = {"w_fd": w_fd}
  data = {"input": x_ni, "target": y_n}
  if dataset_size is None:
    # Top-level API; its num_curv_samples/num_total_samples (default 1/1) scale the GGN by curv/total.
    posterior_fn, ggn = laplax.laplace(model_fn, params, data, loss_fn="cross_entropy", curv_type="full")
  else:
    # create_ggn_mv scales by num_total_samples / num_curv_samples, like our dataset_size / num_sequences.
    mv = create_ggn_mv(model_fn, params, data, loss_fn="cross_entropy", num_curv_samples=x_ni.shape[0],
                       num_total_samples=dataset_size)
    posterior_fn = create_posterior_fn("full", mv, layout=params)
    ggn = None
  post = posterior_fn({"prior_prec": PRIOR})
  sigma = post.state["scale"] @ post.state["scale"].T
  predictive = pf.set_lin_pushforward(model_fn, params, posterior_fn, {"prior_prec": PRIOR},
                                      pushforward_fns=[pf.lin_setup, pf.lin_pred_mean, pf.lin_pred_cov])
  out = jax.vmap(predictive)(xt_bi)  # laplax's predictive takes one input
  f_map_bc = jax.vmap(model_fn, (0, None))(xt_bi, params)
  np.testing.assert_allclose(np.asarray(out["pred_mean"]), np.asarray(f_map_bc), rtol=1e-12)
  return ggn, sigma, out["pred_cov"]


def _dense_reference(model_fn, w_fd, x_ni, y_n, xt_bi):
  """Materialised GGN of sum_n CE, Sigma = (GGN + lambda I)^{-1} and J Sigma J^T on the test inputs."""
  def f_flat(x_i, w_p):
    return model_fn(x_i, {"w_fd": w_p.reshape(H, C)})

  w_p = w_fd.reshape(-1)
  jac_ncp = jax.vmap(jax.jacfwd(f_flat, argnums=1), (0, None))(x_ni, w_p)
  ce = lambda f_c, y: -jax.nn.log_softmax(f_c)[y]
  hess_ncc = jax.vmap(jax.hessian(ce))(jax.vmap(f_flat, (0, None))(x_ni, w_p), y_n)
  ggn_pp = jnp.einsum("ncp,nck,nkq->pq", jac_ncp, hess_ncc, jac_ncp)
  sigma_pp = jnp.linalg.inv(ggn_pp + PRIOR * jnp.eye(H * C))
  jt_bcp = jax.vmap(jax.jacfwd(f_flat, argnums=1), (0, None))(xt_bi, w_p)
  return ggn_pp, sigma_pp, jnp.einsum("bcp,pq,bkq->bck", jt_bcp, sigma_pp, jt_bcp)


def _our_rows(w1_ih, w_fd, x_ni, y_n):
  """Our per-example rows: down_proj inputs a [n, f], exact-label cotangents [C, n, d] and weights [C, n]."""
  phi_nf = jnp.tanh(x_ni @ w1_ih)
  ct_lnd, w_ln = kfac.label_cotangents(phi_nf @ w_fd, y_n, "exact")
  return phi_nf, ct_lnd, w_ln


def test_laplax_full_ggn_and_glm_predictive_match_dense_reference():
  with jax.enable_x64(True):
    model_fn, _, w_fd, x_ni, y_n, xt_bi = _problem()
    ggn, sigma, cov_bcc = _laplax_glm(model_fn, w_fd, x_ni, y_n, xt_bi)
    ggn_ref, sigma_ref, cov_ref = _dense_reference(model_fn, w_fd, x_ni, y_n, xt_bi)
    assert ggn.dtype == jnp.float64 and cov_bcc.dtype == jnp.float64
    assert _rel(ggn, ggn_ref) < 1e-10
    assert _rel(sigma, sigma_ref) < 1e-8
    assert _rel(cov_bcc, cov_ref) < 1e-8


def test_laplax_ggn_is_the_sum_of_our_per_example_kronecker_rows():
  """Flattening (row-major W [f, d]: index i*d + j), no 1/N and no prior in laplax's curvature."""
  with jax.enable_x64(True):
    model_fn, w1_ih, w_fd, x_ni, y_n, xt_bi = _problem()
    ggn, _, _ = _laplax_glm(model_fn, w_fd, x_ni, y_n, xt_bi)
    phi_nf, ct_lnd, w_ln = _our_rows(w1_ih, w_fd, x_ni, y_n)

    def one(n):  # one example's A and G sums, through our per-expert summation
      st = kfac.expert_sums(phi_nf[n][None], ct_lnd[:, n][:, None], w_ln[:, n][:, None], jnp.zeros(1, jnp.int32),
                            jnp.ones(1, bool), 1)
      return jnp.kron(st.a_eff[0], st.g_edd[0])

    rows_pp = jax.vmap(one)(jnp.arange(N)).sum(0)
    assert _rel(rows_pp, ggn) < 1e-10
    # The convention matters: a column-major W or a mean over examples would be far off.
    w_col_pp = rows_pp.reshape(H, C, H, C).transpose(1, 0, 3, 2).reshape(H * C, H * C)
    assert _rel(w_col_pp, ggn) > 1e-2 and _rel(rows_pp / N, ggn) > 1e-2


@pytest.mark.parametrize("dataset_size", [None, 3])
def test_closed_form_sigma_f_matches_laplax_where_kfac_is_exact(dataset_size):
  """One training example: the last layer's GGN is exactly A (x) G, so K-FAC loses nothing."""
  with jax.enable_x64(True):
    model_fn, w1_ih, w_fd, x_ni, y_n, xt_bi = _problem()
    x1, y1 = x_ni[:1], y_n[:1]
    _, _, ref_bcc = _laplax_glm(model_fn, w_fd, x1, y1, xt_bi, dataset_size)

    phi_nf, ct_lnd, w_ln = _our_rows(w1_ih, w_fd, x1, y1)
    stats = kfac.expert_sums(phi_nf, ct_lnd, w_ln, jnp.zeros(1, jnp.int32), jnp.ones(1, bool), 1)
    log_lik = jax.nn.log_softmax(phi_nf @ w_fd)[0, y1[0]]
    fac = kfac.eigen_factors(stats)
    factors = {BLK: fac}
    post = P.build(factors, {BLK: w_fd[None]}, num_sequences=1, dataset_size=dataset_size, prior_mean="zero",
                   prior_precision=PRIOR, log_lik=log_lik)

    phit_bf = jnp.tanh(xt_bi @ w1_ih)
    g_bctd = jnp.broadcast_to(jnp.eye(C)[None, :, None, :], (N_TEST, C, 1, C))  # d f_c / d y = e_c
    jac = PR.project_rows(fac, phit_bf[:, None, :], g_bctd, jnp.zeros((N_TEST, 1), jnp.int32),
                          jnp.ones((N_TEST, 1), bool))
    cov_bcc = PR.layer_covariance(fac, jac, post.scale, jnp.exp(post.log_prior_prec_e[BLK]))
    assert cov_bcc.dtype == jnp.float64
    assert _rel(cov_bcc, ref_bcc) < 1e-6
    np.testing.assert_allclose(np.asarray(jnp.diagonal(cov_bcc, axis1=1, axis2=2)),
                               np.asarray(jnp.diagonal(ref_bcc, axis1=1, axis2=2)), rtol=1e-6)
