"""The routers of arXiv 2509.23830 (Li, "Bayesian Mixture-of-Experts"; VMoER, Li & Wicker), as pure functions.

Notation as the thesis: ``u`` [n, d] the router input (the MoE layer's normed input), ``l = u W_r`` the MAP
router's logits (``W_r`` frozen: ``stop_gradient``), E experts, top-k. Every router returns a
``gating.Routing`` (expert ids, the family's gates, logits) and a per-token regulariser ``aux_n`` (the KL
of the variational routers, ``-log T`` of VTSR, else 0); the gates always follow the model family's own
rule (``gating.gates_at``) on the logits the router gates with.

=============  ===========================================================================================
kind           what it does (thesis defaults; deviations marked *)
=============  ===========================================================================================
deterministic  top-k of ``l``: the MAP router (float32 logits). A plan's deterministic layers skip it and run
               the forward's own route (``gating.route_of``, in the model's dtype under ``router_dtype``).
temperature    k experts without replacement from ``softmax(l / T)`` (Gumbel-top-k), gates from the
               unscaled ``l``; T = 0.3; no training.
mcdr           dropout (p = 0.05) on ``u``, kept on at inference; S = 35 router passes per token whose
               logits are averaged, then top-k. ``l`` is linear in the mask, so the S passes are one pass
               with the mean mask, drawn exactly as Binomial(S, 1 - p) / S. Its own router weight,
               fine-tuned with dropout (one mask per token in training).
swag           SWAG over the router weight (Maddox et al. 2019): mean, diagonal and rank-K deviations
               collected while training the router on (``routing.train``); one weight draw per forward,
               ``W = mean + sqrt(scale) (sigma z1 + D^T z2 / sqrt(K - 1)) / sqrt(2)``, scale 0.5.
ensemble       DER: M independently trained router weights; forward sample s uses member s mod M, so the
               predictive over M forwards is the ensemble average of class probabilities.
mfvr           q(l | u) = N(l + dmu(u), diag sigma^2(u)): dmu = Linear(d, E) (*initialised at 0: the
               posterior mean starts at the MAP), log sigma^2 = MLP(d -> d/4 -> E, ReLU, no bias; last
               layer N(0, 1e-3)); KL to the prior N(l, I). Training: one reparameterised sample per token;
               inference: S = 35 samples, ``log mean softmax`` as gating logits, then top-k.
fcvr           as mfvr with a Cholesky factor L(u) (MLP d -> d/4 -> E(E+1)/2, diagonal exponentiated).
vtsr           T(u) = softplus(MLP(u)) + 1e-6 (d -> d/4 -> 1 shared, or -> E per expert); inference draws
               k experts without replacement from ``softmax(l / T(u))``, gates from ``l / T(u)``.
               Training: Gumbel-top-k in the forward; * the gradient reaches T through the gates of the
               scaled logits times ``exp(s - stop_gradient(s))``, s the relaxed (tau = 1) log-probability
               of each drawn expert: a straight-through estimator over the drawn experts only (the
               thesis' hard one-hot Gumbel sample followed by top-k is degenerate for k > 1).
=============  ===========================================================================================

A router's parameters are a dict of arrays (``init``); its options a ``RouterConfig`` (hashable, static under
``jax.jit``). All functions are jit/vmap/jvp-safe (no ``custom_vjp``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from bmoe_jax.nn.gating import Gating, Routing, gates_at, gumbel_topk, route, topk_ids

KINDS = ("deterministic", "temperature", "mcdr", "swag", "ensemble", "mfvr", "fcvr", "vtsr")
TEMPERATURE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """One layer's router (the thesis' defaults)."""
  kind: str = "deterministic"  # router: deterministic | temperature | mcdr | swag | ensemble | mfvr | fcvr | vtsr
  sample_temperature: float = 0.3  # temperature router: T of the sampling distribution softmax(l / T)
  router_dropout: float = 0.05  # mcdr: dropout rate on the router input
  inner_samples: int = 35  # mcdr, mfvr, fcvr: samples per token inside the router at inference
  hidden_ratio: int = 4  # mfvr, fcvr, vtsr: hidden width d // hidden_ratio of their MLPs
  per_expert: bool = False  # vtsr: one temperature per expert (else one shared)
  swag_scale: float = 0.5  # swag: covariance scale of the weight draws
  swag_rank: int = 20  # swag: deviation columns kept (the last K snapshots)
  router_members: int = 5  # ensemble: independently trained routers

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"router kind={self.kind!r}: expected one of {KINDS}")
    bad = {k: v for k, v in dataclasses.asdict(self).items() if k != "kind" and not _OK[k](v)}
    if bad:
      raise ValueError(f"router options out of range: {bad}")

  @property
  def stochastic(self) -> bool:
    return self.kind != "deterministic"


_OK = {"sample_temperature": lambda v: v > 0, "router_dropout": lambda v: 0 <= v < 1, "inner_samples": lambda v: v >= 1,
       "hidden_ratio": lambda v: v >= 1, "per_expert": lambda v: True, "swag_scale": lambda v: v >= 0,
       "swag_rank": lambda v: v >= 2, "router_members": lambda v: v >= 1}


class RouterIn(NamedTuple):
  """Everything a router reads besides its own parameters."""
  u_nd: jax.Array  # router input
  kernel_de: jax.Array  # the MAP router weight W_r (frozen)
  key: jax.Array  # this layer's PRNG key for this forward
  sample: jax.Array  # int32 index of the forward sample (ensemble members)
  gating: Gating
  k: int
  train: bool
  bias_e: jax.Array | None = None  # the family's selection bias (DeepSeek-V3), used by the deterministic router


def _map_logits(x: RouterIn) -> jax.Array:
  return x.u_nd.astype(jnp.float32) @ jax.lax.stop_gradient(x.kernel_de).astype(jnp.float32)


def _gated(logits_ne, expert_nk, gating: Gating) -> Routing:
  return Routing(expert_nk, gates_at(logits_ne, expert_nk, gating), logits_ne)


def _zeros_n(x: RouterIn):
  return jnp.zeros(x.u_nd.shape[:1], jnp.float32)


def _route_with(x: RouterIn, kernel_de) -> Routing:
  g = x.gating
  return route(x.u_nd, kernel_de, x.k, norm_topk_prob=g.norm_topk_prob, norm_eps=g.norm_eps, scaling=g.scaling,
               scoring=g.scoring, topk_method=g.topk_method, n_group=g.n_group, topk_group=g.topk_group,
               bias_e=x.bias_e)


def _mlp(p: dict, u_nd) -> jax.Array:
  return jax.nn.relu(u_nd.astype(jnp.float32) @ p["w1"]) @ p["w2"]


# --- baselines --------------------------------------------------------------------------------------------


def _deterministic(rc: RouterConfig, p: dict, x: RouterIn):
  return _route_with(x, x.kernel_de), _zeros_n(x)


def _temperature(rc: RouterConfig, p: dict, x: RouterIn):
  l_ne = _map_logits(x)
  return _gated(l_ne, gumbel_topk(x.key, l_ne / rc.sample_temperature, x.k), x.gating), _zeros_n(x)


# --- weight space -----------------------------------------------------------------------------------------


def _mcdr(rc: RouterConfig, p: dict, x: RouterIn):
  keep = 1.0 - rc.router_dropout
  shape = x.u_nd.shape
  if x.train:
    mask_nd = jax.random.bernoulli(x.key, keep, shape).astype(jnp.float32) / keep
  else:  # the mean of S dropout masks: Binomial(S, keep) / S per unit, rescaled
    mask_nd = jax.random.binomial(x.key, rc.inner_samples, keep, shape).astype(jnp.float32) / (
        rc.inner_samples * keep)
  return _route_with(x._replace(u_nd=x.u_nd.astype(jnp.float32) * mask_nd), p["kernel"]), _zeros_n(x)


def swag_draw(rc: RouterConfig, p: dict, key) -> jax.Array:
  """One router weight [d, E] from a SWAG posterior,
  ``mean + sqrt(scale) (sigma z1 + D^T z2 / sqrt(K' - 1)) / sqrt(2)``: sigma^2 = max(sq_mean - mean^2, 0),
  D the deviations, z1, z2 standard normal, K' = min(count, K) the deviations collected so far (``K' - 1``
  floored at 1; z2 is 0 on the uncollected ones).

  Args:
    rc: the router's options (``swag_scale``: the covariance scale).
    p: the ``swag.SwagState`` fields: ``mean`` and ``sq_mean`` [d, E], the last K deviations ``dev`` [K, d, E]
      (newest last; zeros not yet collected) and ``count`` (float32 scalar, snapshots so far).
    key (jax.Array): PRNG key of the draw.

  Returns:
    float32 [d, E] a router weight.
  """
  k1, k2 = jax.random.split(key)
  var_de = jnp.maximum(p["sq_mean"] - jnp.square(p["mean"]), 0.0)
  diag_de = jnp.sqrt(var_de) * jax.random.normal(k1, var_de.shape)
  rank = p["dev"].shape[0]
  used = jnp.minimum(p["count"], rank)
  z_k = jax.random.normal(k2, (rank,)) * (jnp.arange(rank) >= rank - used)  # columns not yet collected: 0
  low_de = jnp.einsum("k,kde->de", z_k, p["dev"]) / jnp.sqrt(jnp.maximum(used - 1.0, 1.0))
  return p["mean"] + jnp.sqrt(rc.swag_scale) * (diag_de + low_de) / jnp.sqrt(2.0)


def _swag(rc: RouterConfig, p: dict, x: RouterIn):
  return _route_with(x, swag_draw(rc, p, x.key)), _zeros_n(x)


def _ensemble(rc: RouterConfig, p: dict, x: RouterIn):
  kernels = p["kernels"]
  return _route_with(x, kernels[x.sample % kernels.shape[0]]), _zeros_n(x)


# --- logit space ------------------------------------------------------------------------------------------


def tril_from_vector(v_nm: jax.Array, e: int) -> tuple[jax.Array, jax.Array]:
  """(L [n, e, e], log diag L [n, e]): lower-triangular Cholesky factors from [n, e(e+1)/2] head outputs
  (row-major lower triangle), the diagonal exponentiated.

  Args:
    v_nm: [n, e(e+1)/2] head outputs (any leading batch dims).
    e: the factors' size (the number of experts).

  Returns:
    (L [n, e, e] lower-triangular with a positive diagonal, log diag L [n, e] = the raw diagonal entries),
      in ``v_nm``'s dtype.
  """
  rows, cols = jnp.tril_indices(e)
  raw_nee = jnp.zeros(v_nm.shape[:-1] + (e, e), v_nm.dtype).at[..., rows, cols].set(v_nm)
  eye = jnp.eye(e, dtype=bool)
  raw_diag_ne = jnp.diagonal(raw_nee, axis1=-2, axis2=-1)
  return jnp.where(eye, jnp.exp(jnp.where(eye, raw_nee, 0.0)), raw_nee), raw_diag_ne


def kl_diag(dmu_ne, logvar_ne) -> jax.Array:
  """[n] KL(N(dmu, diag exp(logvar)) || N(0, I)): mfvr's KL to its prior N(l, I), in nats.

  Args:
    dmu_ne (jax.Array): [n, E] the posterior mean's offset from the MAP logits.
    logvar_ne (jax.Array): [n, E] the log variances.

  Returns:
    [n] the KL of each token.
  """
  return 0.5 * jnp.sum(jnp.exp(logvar_ne) + jnp.square(dmu_ne) - 1.0 - logvar_ne, axis=-1)


def kl_chol(dmu_ne, raw_diag_ne, l_nee) -> jax.Array:
  """[n] KL(N(dmu, L L^T) || N(0, I)): fcvr's KL to its prior N(l, I), in nats.

  Args:
    dmu_ne (jax.Array): [n, E] the posterior mean's offset from the MAP logits.
    raw_diag_ne (jax.Array): [n, E] log diag L (``tril_from_vector``'s second output).
    l_nee (jax.Array): [n, E, E] the lower-triangular Cholesky factor L of the covariance.

  Returns:
    [n] the KL of each token.
  """
  e = dmu_ne.shape[-1]
  return 0.5 * (jnp.sum(jnp.square(l_nee), axis=(-2, -1)) + jnp.sum(jnp.square(dmu_ne), -1) - e
                - 2.0 * jnp.sum(raw_diag_ne, -1))


def _variational(x: RouterIn, mu_ne, noise_fn: Callable, samples: int):
  """Routing from samples ``mu + noise_fn(eps)``: one in training, else the mean softmax of ``samples``, as the
  log-mean-exp of log-softmaxes (``log`` of a mean probability that underflows to 0 would give -inf, and NaN
  gates when such an expert is among the top k, as with a carved router's logits spread by hundreds)."""
  if x.train:
    l_ne = mu_ne + noise_fn(jax.random.normal(x.key, mu_ne.shape))
    return _gated(l_ne, topk_ids(l_ne, x.k), x.gating)
  eps_sne = jax.random.normal(x.key, (samples,) + mu_ne.shape)
  logp_sne = jax.nn.log_softmax(mu_ne + jax.vmap(noise_fn)(eps_sne), axis=-1)
  g_ne = jax.nn.logsumexp(logp_sne, axis=0) - jnp.log(samples)
  return _gated(g_ne, topk_ids(g_ne, x.k), x.gating)


def _mfvr(rc: RouterConfig, p: dict, x: RouterIn):
  dmu_ne = x.u_nd.astype(jnp.float32) @ p["mu"]
  logvar_ne = _mlp(p, x.u_nd)
  sigma_ne = jnp.exp(0.5 * logvar_ne)
  routing = _variational(x, _map_logits(x) + dmu_ne, lambda eps: sigma_ne * eps, rc.inner_samples)
  return routing, kl_diag(dmu_ne, logvar_ne)


def _fcvr(rc: RouterConfig, p: dict, x: RouterIn):
  e = x.kernel_de.shape[1]
  dmu_ne = x.u_nd.astype(jnp.float32) @ p["mu"]
  l_nee, raw_diag_ne = tril_from_vector(_mlp(p, x.u_nd), e)
  routing = _variational(x, _map_logits(x) + dmu_ne, lambda eps: jnp.einsum("nij,nj->ni", l_nee, eps),
                         rc.inner_samples)
  return routing, kl_chol(dmu_ne, raw_diag_ne, l_nee)


# --- selection space --------------------------------------------------------------------------------------


def temperature_of(p: dict, u_nd) -> jax.Array:
  """[n, 1] or [n, E]: VTSR's T(u) = softplus(MLP(u)) + 1e-6.

  Args:
    p: the vtsr router's parameters: ``w1`` [d, h] and ``w2`` [h, 1] (shared) or [h, E] (``per_expert``).
    u_nd (jax.Array): [n, d] router inputs (cast to float32).

  Returns:
    float32 [n, 1] (one shared temperature) or [n, E] (one per expert), all positive.
  """
  return jax.nn.softplus(_mlp(p, u_nd)) + TEMPERATURE_EPS


def _vtsr(rc: RouterConfig, p: dict, x: RouterIn):
  t_nt = temperature_of(p, x.u_nd)
  z_ne = _map_logits(x) / t_nt
  aux_n = -jnp.mean(jnp.log(t_nt), axis=-1)
  if not x.train:
    return _gated(z_ne, gumbel_topk(x.key, z_ne, x.k), x.gating), aux_n
  g_ne = jax.random.gumbel(x.key, z_ne.shape)
  expert_nk = topk_ids(jax.lax.stop_gradient(z_ne) + g_ne, x.k)
  s_nk = jnp.take_along_axis(jax.nn.log_softmax(z_ne + g_ne, axis=-1), expert_nk, axis=-1)
  gate_nk = gates_at(z_ne, expert_nk, x.gating) * jnp.exp(s_nk - jax.lax.stop_gradient(s_nk))
  return Routing(expert_nk, gate_nk, z_ne), aux_n


APPLY: dict[str, Callable] = {
    "deterministic": _deterministic, "temperature": _temperature, "mcdr": _mcdr, "swag": _swag,
    "ensemble": _ensemble, "mfvr": _mfvr, "fcvr": _fcvr, "vtsr": _vtsr,
}


def apply(rc: RouterConfig, p: dict, x: RouterIn) -> tuple[Routing, jax.Array]:
  """(routing, per-token regulariser [n]) of one layer's router (the module docstring's table, by ``rc.kind``).

  Args:
    rc: the router's options.
    p: its parameters (``init``; {} for "deterministic" and "temperature").
    x: its inputs: the router input u [n, d], the MAP weight, this layer's key, the sample index, the family's
      gating, k, training mode and the selection bias.

  Returns:
    (``gating.Routing`` of the n tokens, float32 [n] per-token regulariser: the KL of mfvr/fcvr, ``-log T`` of
      vtsr averaged over its temperatures, else 0).
  """
  return APPLY[rc.kind](rc, p, x)


# --- parameters -------------------------------------------------------------------------------------------


def _mlp_init(key, d: int, hidden: int, out: int) -> dict:
  k1, k2 = jax.random.split(key)
  w1 = jax.random.uniform(k1, (d, hidden), jnp.float32, -1.0, 1.0) / jnp.sqrt(d)  # torch Linear's default
  return {"w1": w1, "w2": 1e-3 * jax.random.normal(k2, (hidden, out), jnp.float32)}


def init(rc: RouterConfig, kernel_de: jax.Array, key: jax.Array) -> dict:
  """A fresh router's parameters for MAP router weight ``kernel_de`` [d, E] (float32).

  Args:
    rc: the router's options (``kind``, ``hidden_ratio``, ``swag_rank``, ``router_members``, ``per_expert``).
    kernel_de: [d, E] the MAP router weight.
    key: PRNG key of the MLP heads' init (mfvr, fcvr, vtsr; unused by the other kinds).

  Returns:
    {} for "deterministic" and "temperature"; mcdr ``kernel`` [d, E] (= the MAP weight); swag ``mean``,
      ``sq_mean`` [d, E], ``dev`` [K, d, E] zeros, ``count`` 0; ensemble ``kernels`` [M, d, E] (M copies of the
      MAP weight); mfvr/fcvr ``mu`` [d, E] zeros and the MLP ``w1`` [d, h], ``w2`` [h, E] (mfvr) or
      [h, E(E+1)/2] (fcvr); vtsr ``w1`` [d, h], ``w2`` [h, 1] or [h, E] (``per_expert``); h = max(1, d // hidden_ratio).
  """
  w_de = jnp.asarray(kernel_de, jnp.float32)
  d, e = w_de.shape
  hidden = max(1, d // rc.hidden_ratio)
  if rc.kind in ("deterministic", "temperature"):
    return {}
  if rc.kind == "mcdr":
    return {"kernel": w_de}
  if rc.kind == "swag":
    return {"mean": w_de, "sq_mean": jnp.square(w_de), "dev": jnp.zeros((rc.swag_rank, d, e), jnp.float32),
            "count": jnp.zeros((), jnp.float32)}
  if rc.kind == "ensemble":
    return {"kernels": jnp.broadcast_to(w_de, (rc.router_members, d, e))}
  if rc.kind in ("mfvr", "fcvr"):
    out = e if rc.kind == "mfvr" else e * (e + 1) // 2
    return {"mu": jnp.zeros((d, e), jnp.float32), **_mlp_init(key, d, hidden, out)}
  return _mlp_init(key, d, hidden, e if rc.per_expert else 1)  # vtsr
