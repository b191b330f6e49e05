"""laplace-torch 0.3 as an external oracle, on an equivalent dense torch MLP.

The MLP ``x -> tanh(W1 x) -> W2`` with W2 the Bayesian layer is one "expert" whose down_proj maps the
features straight to the C logits: every example routes to it with weight 1, ``a = tanh(W1 x)`` and
``d f_c / d y = e_c``. Our pure pieces (label cotangents, per-expert sums, finalize, posterior, evidence,
projected Jacobian rows, closed-form Sigma_f, probit) must reproduce laplace-torch's last-layer K-FAC
Laplace: its factors ``H_facs.kfacs = [[G, A]]`` (G summed, A averaged), ``log_marginal_likelihood()``
(zero prior mean) and the GLM predictive covariance. Float64 on both sides.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.task import probit

if os.environ.get("CI"):
  import laplace  # noqa: F401  (under CI the oracle must be installed: fail, never skip)
else:
  pytest.importorskip("laplace")
import torch  # noqa: E402  (a test dependency: pyproject's test extras)

N, D_IN, H, C, PRIOR = 11, 3, 6, 4, 0.7


def _torch_fit():
  from laplace import Laplace
  from torch.utils.data import DataLoader, TensorDataset

  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(D_IN, H, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(H, C, bias=False)).double()
  x = torch.randn(N, D_IN, dtype=torch.float64)
  y = torch.randint(0, C, (N,))
  x_test = torch.randn(5, D_IN, dtype=torch.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                 prior_precision=PRIOR)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))  # several batches: laplace-torch rescales
    out = {"G": la.H_facs.kfacs[0][0].numpy(), "A": la.H_facs.kfacs[0][1].numpy(),
           "lml": float(la.log_marginal_likelihood()),
           "f_var": la._glm_predictive_distribution(x_test)[1].detach().numpy(),
           "probit": la(x_test, pred_type="glm", link_approx="probit").detach().numpy()}
  w1, w2 = (model[i].weight.detach().numpy() for i in (0, 2))
  return out, w1, w2, x.numpy(), y.numpy(), x_test.numpy()


def test_factors_evidence_and_glm_predictive_match_laplace_torch():
  ref, w1, w2, x, y, x_test = _torch_fit()
  with jax.enable_x64(True):
    phi = jnp.tanh(jnp.asarray(x) @ w1.T)  # [n, H]: the expert's down_proj input
    w_down = jnp.asarray(w2.T)[None]  # [e=1, f=H, d=C], y = a @ W
    f_nc = phi @ w_down[0]
    ct_lnc, w_ln = kfac.label_cotangents(f_nc, jnp.asarray(y), "exact")
    stats = kfac.expert_sums(phi, ct_lnc, w_ln, jnp.zeros(N, jnp.int32), jnp.ones(N, bool), 1)
    log_lik = jnp.sum(jax.nn.log_softmax(f_nc)[jnp.arange(N), y])
    fac = kfac.eigen_factors(stats)
    factors = {kfac.Block(0): fac}
    a = np.asarray(jnp.einsum("ir,r,jr->ij", fac.a_vec_eff[0], fac.a_eig_ef[0], fac.a_vec_eff[0]))
    g = np.asarray(jnp.einsum("ir,r,jr->ij", fac.g_vec_edd[0], fac.g_eig_ed[0], fac.g_vec_edd[0]))
    np.testing.assert_allclose(a, ref["A"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g, ref["G"], rtol=1e-10, atol=1e-12)

    post = P.build(factors, {kfac.Block(0): w_down}, num_sequences=N, prior_mean="zero", prior_precision=PRIOR, log_lik=log_lik)
    assert post.scale.dtype == jnp.float64 and post.log_prior_prec_e[kfac.Block(0)].dtype == jnp.float64
    np.testing.assert_allclose(float(P.log_marginal_likelihood(post)), ref["lml"], rtol=1e-10)

    phi_test = jnp.tanh(jnp.asarray(x_test) @ w1.T)
    n_test = phi_test.shape[0]
    g_rows = jnp.broadcast_to(jnp.eye(C)[None, :, None, :], (n_test, C, 1, C))  # d f_c / d y = e_c
    jac = PR.project_rows(fac, phi_test[:, None, :], g_rows, jnp.zeros((n_test, 1), jnp.int32),
                          jnp.ones((n_test, 1), bool))
    cov = PR.layer_covariance(fac, jac, post.scale, jnp.exp(post.log_prior_prec_e[kfac.Block(0)]))
    np.testing.assert_allclose(np.asarray(cov), ref["f_var"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(probit(phi_test @ w_down[0], cov)), ref["probit"], rtol=1e-9)
