"""A family's gating, split into its two steps so that any router can reuse the second one.

Every router produces gating logits ``l [n, e]`` and a selection of ``k`` experts per token; the weights of
the selected experts then follow the model family's own rule (``gates_at``), whatever chose them:

* ``softmax`` (Qwen2-MoE, Mixtral, DeepSeek-V1 greedy): ``softmax(l)`` at the selected experts, renormalised
  over them when ``norm_topk_prob`` (Mixtral's and Granite's top-k-then-softmax is exactly this),
  times ``routed_scaling_factor``;
* ``sigmoid`` (DeepSeek-V3): ``sigmoid(l)`` at the selected experts, renormalised (``norm_topk_prob``, with
  ``norm_topk_eps``) and scaled as above;
* ``select`` (carved MoEs, ``convert.carve``): gate 1 for every selected expert, as
  ``exp(log p - stop_gradient(log p))`` so that the gradient reaches the logits through ``log softmax(l)``
  (a straight-through estimator free of ``custom_vjp``);
* ``sparsemixer`` (Phi-3.5-MoE, top-2, as transformers runs it at inference): the first expert's gate is the
  softmax, at it, of the logits within a relative gap ``2 * jitter_eps`` of the best (the others at -inf); the
  second's the same over the logits without the first expert (``sparsemixer_gates``).

``route`` is the deterministic MAP router, the MoE layer's default: selection = top-k of the scores (softmax
probabilities or sigmoids), optionally plus a per-expert selection bias (DeepSeek-V3's
``e_score_correction_bias``, used for selection only) and limited to ``topk_group`` of ``n_group`` expert groups
(``topk_method``: ``group_limited_greedy``, DeepSeek-V2: groups ranked by their best score;
``noaux_tc``, DeepSeek-V3: by the sum of their two best biased scores). A stochastic router selects
differently (``gumbel_topk``: k of all experts without replacement; group limits and the selection bias are the
deterministic router's) and calls ``gates_at`` on the logits it chose to gate with. All functions are pure and
jit/vmap/jvp-safe.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmoe_jax.nn.layers import dot


class Routing(NamedTuple):
  """One layer's routing of n tokens: what ``route`` and every router (``routing.routers``) return.

  Attributes:
    expert_nk: int32 [n, k] expert ids of each token's k slots.
    gate_nk: float32 [n, k] their routing weights (after renormalisation and scaling).
    logits_ne: float32 [n, E] router logits (a stochastic router's: the logits it gated with).
  """
  expert_nk: jax.Array  # int32 expert ids of each token's k slots
  gate_nk: jax.Array  # routing weights (after renormalisation and scaling)
  logits_ne: jax.Array  # float32 router logits


class Gating(NamedTuple):
  """The family's gating rule (``MoEConfig`` fields ``router_scoring``, ``norm_topk_prob``, ``norm_topk_eps``,
  ``routed_scaling_factor``, ``topk_method``, ``n_group``, ``topk_group``)."""
  scoring: str = "softmax"
  norm_topk_prob: bool = False
  norm_eps: float = 0.0
  scaling: float = 1.0
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  jitter_eps: float = 0.0

  @classmethod
  def of(cls, cfg) -> "Gating":
    return cls(cfg.router_scoring, cfg.norm_topk_prob, cfg.norm_topk_eps, cfg.routed_scaling_factor,
               cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.router_jitter_eps)


def sparsemixer_gates(logits_ne: jax.Array, expert_nk: jax.Array, jitter_eps: float) -> jax.Array:
  """[n, 2] Phi-3.5-MoE's gates of the experts ``expert_nk`` (transformers' ``sparsemixer`` at inference).

  Args:
    logits_ne: [n, E] float32 router logits.
    expert_nk: [n, 2] int expert ids: the first and the second choice (any rule chose them).
    jitter_eps: the relative gap: logits l with (m - l) / max(|l|, m) > 2 jitter_eps, m the best remaining logit,
      are left out of each softmax.

  Returns:
    [n, 2] gates: the first expert's softmax weight among the logits near the best; the second's among those near
      the best of the logits without the first. The windows are constant: the gradient flows through the softmaxes.
  """
  def near_softmax_at(base_ne, id_n1):
    top_n1 = jnp.max(base_ne, axis=-1, keepdims=True)
    gap_ne = (top_n1 - logits_ne) / jnp.maximum(jnp.abs(logits_ne), top_n1)
    z_ne = jnp.where(jax.lax.stop_gradient(gap_ne) > 2 * jitter_eps, -jnp.inf, base_ne)
    return jnp.take_along_axis(jax.nn.softmax(z_ne, axis=-1), id_n1, axis=-1)

  first_n1 = expert_nk[:, :1]
  rest_ne = jnp.where(select_mask(first_n1, logits_ne.shape[-1]), -jnp.inf, logits_ne)
  return jnp.concatenate([near_softmax_at(logits_ne, first_n1), near_softmax_at(rest_ne, expert_nk[:, 1:2])], -1)


def _group_limited(choice_ne: jax.Array, method: str, n_group: int, topk_group: int) -> jax.Array:
  """``choice_ne`` with every expert outside the ``topk_group`` best of ``n_group`` contiguous groups at -inf."""
  n, e = choice_ne.shape
  grouped_ngm = choice_ne.reshape(n, n_group, e // n_group)
  if method == "group_limited_greedy":
    group_ng = jnp.max(grouped_ngm, axis=-1)
  else:  # noaux_tc
    group_ng = jnp.sum(jax.lax.top_k(grouped_ngm, 2)[0], axis=-1)
  keep_ng = select_mask(jax.lax.top_k(group_ng, topk_group)[1], n_group)
  return jnp.where(jnp.repeat(keep_ng, e // n_group, axis=-1), choice_ne, -jnp.inf)


def route(x_nd: jax.Array, router_de: jax.Array, top_k: int, *, norm_topk_prob: bool,
          norm_eps: float = 0.0, scaling: float = 1.0, scoring: str = "softmax",
          logit_offset_ne: jax.Array | None = None, native: bool = False, topk_method: str = "greedy",
          n_group: int = 1, topk_group: int = 1, bias_e: jax.Array | None = None,
          logit_bias_e: jax.Array | None = None, jitter_eps: float = 0.0) -> Routing:
  """Deterministic top-k routing in float32 (see the module docstring for ``scoring``).

  Args:
    x_nd: [n, d] router inputs (the MoE layer's normed input, flattened over batch and sequence).
    router_de: [d, E] router weight.
    top_k: k, the experts selected per token.
    norm_topk_prob: renormalise the selected experts' scores to sum to 1 (``softmax``/``sigmoid`` only).
    norm_eps: added to that renormalisation's denominator (DeepSeek-V3's ``norm_topk_eps``); 0: none.
    scaling: the routed scaling factor multiplying the gates (``softmax``/``sigmoid`` only); 1: none.
    scoring: "softmax", "sigmoid" or "select" (gate 1 with a straight-through gradient; ignores the
      renormalisation, scaling, ``topk_method`` and ``bias_e``).
    logit_offset_ne: [n, E] added to the logits (zero perturbations whose gradient is the logits' gradient);
      None: nothing added.
    native: the logits' matmul runs in the inputs' dtype (e.g. bfloat16) and is cast to float32 after it
      (``MoEConfig.router_dtype``); by default (False) both operands are cast to float32 first.
    topk_method: "greedy" (top-k of all experts), "group_limited_greedy" (DeepSeek-V2) or "noaux_tc"
      (DeepSeek-V3): top-k within the ``topk_group`` best of ``n_group`` expert groups.
    n_group: number of contiguous expert groups (dividing E); only for the group-limited methods.
    topk_group: groups a token may select from; only for the group-limited methods.
    bias_e: [E] selection bias added to the scores for the choice of experts only (the gates stay the unbiased
      scores; DeepSeek-V3's ``e_score_correction_bias``); None: no bias.
    logit_bias_e: [E] the router's own bias, added to the logits (an affine router: GPT-OSS); None: none.
    jitter_eps: the relative gap of "sparsemixer" scoring (``sparsemixer_gates``); other scorings ignore it.

  Returns:
    ``Routing(expert_nk, gate_nk, logits_ne)``: int32 [n, k] expert ids (best first), float32 [n, k] gates,
      float32 [n, E] logits (offset included).
  """
  if native:
    logits_ne = dot(x_nd, router_de.astype(x_nd.dtype)).astype(jnp.float32)
  else:
    logits_ne = x_nd.astype(jnp.float32) @ router_de.astype(jnp.float32)
  if logit_bias_e is not None:
    logits_ne = logits_ne + logit_bias_e.astype(jnp.float32)
  if logit_offset_ne is not None:
    logits_ne = logits_ne + logit_offset_ne
  if scoring == "select":
    logp_ne = jax.nn.log_softmax(logits_ne, axis=-1)
    logp_nk, expert_nk = jax.lax.top_k(logp_ne, top_k)
    gate_nk = jnp.exp(logp_nk - jax.lax.stop_gradient(logp_nk))
    return Routing(expert_nk.astype(jnp.int32), gate_nk, logits_ne)
  if scoring == "sparsemixer":  # the best logit, then the best of the rest (ties: the lower id)
    expert_nk = topk_ids(jax.lax.stop_gradient(logits_ne), top_k)
    return Routing(expert_nk, sparsemixer_gates(logits_ne, expert_nk, jitter_eps), logits_ne)
  scores_ne = jax.nn.sigmoid(logits_ne) if scoring == "sigmoid" else jax.nn.softmax(logits_ne, axis=-1)
  if topk_method == "greedy" and bias_e is None:
    gate_nk, expert_nk = jax.lax.top_k(scores_ne, top_k)
  else:
    choice_ne = scores_ne if bias_e is None else scores_ne + bias_e.astype(jnp.float32)
    if topk_method != "greedy":
      choice_ne = _group_limited(choice_ne, topk_method, n_group, topk_group)
    expert_nk = jax.lax.top_k(jax.lax.stop_gradient(choice_ne), top_k)[1]
    gate_nk = jnp.take_along_axis(scores_ne, expert_nk, axis=-1)
  return Routing(expert_nk.astype(jnp.int32), _normalise(gate_nk, norm_topk_prob, norm_eps, scaling), logits_ne)


def _normalise(gate_nk, norm_topk_prob: bool, norm_eps: float, scaling: float):
  if norm_topk_prob:
    gate_nk = gate_nk / (jnp.sum(gate_nk, axis=-1, keepdims=True) + norm_eps)
  if scaling != 1.0:
    gate_nk = gate_nk * scaling
  return gate_nk


def route_of(cfg, x_nd: jax.Array, router: dict, logit_offset_ne: jax.Array | None = None) -> Routing:
  """The family's deterministic routing of ``x_nd`` as the forward runs it: ``route`` with every option from the
  config (gating rule, ``router_dtype``, group-limited top-k) and the router's bias.

  Args:
    cfg: the ``MoEConfig``.
    x_nd: [n, d] router inputs (the MLP's normalised inputs), in the model's dtype.
    router: a layer's router parameters: ``"kernel"`` [d, E], for aux-free balancing ``"bias"`` [E], for an affine
      router ``"logit_bias"`` [E].
    logit_offset_ne: [n, E] added to the router logits (the Laplace router block's zero perturbation); None: 0.

  Returns:
    The ``Routing`` (experts [n, k], gates [n, k], logits [n, E]).
  """
  return route(x_nd, router["kernel"], cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
               norm_eps=cfg.norm_topk_eps, scaling=cfg.routed_scaling_factor, scoring=cfg.router_scoring,
               logit_offset_ne=logit_offset_ne, native=cfg.router_dtype == "native", topk_method=cfg.topk_method,
               n_group=cfg.n_group, topk_group=cfg.topk_group, bias_e=router.get("bias"),
               logit_bias_e=router.get("logit_bias"), jitter_eps=cfg.router_jitter_eps)


def gates_at(logits_ne: jax.Array, expert_nk: jax.Array, gating: Gating) -> jax.Array:
  """[n, k] the family's weights of the experts ``expert_nk`` under gating logits ``logits_ne``. With the
  top-k experts of ``logits_ne`` it equals ``route``'s gates.

  Args:
    logits_ne: [n, E] gating logits (float32).
    expert_nk: [n, k] int expert ids, chosen by any rule.
    gating: the family's gating rule (``scoring`` "softmax", "sigmoid", "select" or "sparsemixer",
      renormalisation, scaling).

  Returns:
    [n, k] gates: the scores (softmax over all E experts, or sigmoids) at ``expert_nk``, renormalised and
      scaled as ``gating`` says; for "select", ones whose gradient is that of ``log softmax(logits)``.
  """
  if gating.scoring == "select":
    logp_nk = jnp.take_along_axis(jax.nn.log_softmax(logits_ne, axis=-1), expert_nk, axis=-1)
    return jnp.exp(logp_nk - jax.lax.stop_gradient(logp_nk))
  if gating.scoring == "sparsemixer":
    return sparsemixer_gates(logits_ne, expert_nk, gating.jitter_eps)
  if gating.scoring not in ("softmax", "sigmoid"):
    raise ValueError(f"gating scoring={gating.scoring!r}: expected softmax, sigmoid, select or sparsemixer")
  scores_ne = jax.nn.sigmoid(logits_ne) if gating.scoring == "sigmoid" else jax.nn.softmax(logits_ne, axis=-1)
  gate_nk = jnp.take_along_axis(scores_ne, expert_nk, axis=-1)
  return _normalise(gate_nk, gating.norm_topk_prob, gating.norm_eps, gating.scaling)


def topk_ids(logits_ne: jax.Array, k: int) -> jax.Array:
  """[n, k] int32: the k largest logits' experts (ties: the lower id first, as ``route``).

  Args:
    logits_ne: [n, E] logits (or any scores).
    k: experts per token.

  Returns:
    [n, k] int32 expert ids, largest logit first.
  """
  return jax.lax.top_k(logits_ne, k)[1].astype(jnp.int32)


def gumbel_topk(key: jax.Array, logits_ne: jax.Array, k: int) -> jax.Array:
  """[n, k] int32: k experts drawn without replacement from ``softmax(logits)``, in draw order (the
  Gumbel-top-k trick: the top k of ``logits + Gumbel noise`` has the law of k sequential categorical draws,
  each renormalised over the experts not yet drawn; Vieira 2014, Kool et al. 2019).

  Args:
    key: PRNG key of the Gumbel noise.
    logits_ne: [n, E] logits of the sampling distribution (no gradient flows through the draw).
    k: experts drawn per token (at most E).

  Returns:
    [n, k] int32 expert ids, in draw order.
  """
  g_ne = jax.random.gumbel(key, logits_ne.shape, jnp.float32)
  return topk_ids(jax.lax.stop_gradient(logits_ne) + g_ne, k)


def select_mask(expert_nk: jax.Array, num_experts: int) -> jax.Array:
  """[n, e] bool: which experts each token selected.

  Args:
    expert_nk: [n, k] int expert ids.
    num_experts: E, the number of experts.

  Returns:
    [n, E] bool: True at every expert among a token's k ids.
  """
  return jnp.any(jax.nn.one_hot(expert_nk, num_experts, dtype=bool), axis=1)


def jaccard(expert_a_nk: jax.Array, expert_b_nk: jax.Array, num_experts: int) -> jax.Array:
  """[n] |A ∩ B| / |A ∪ B| of two selections of the same tokens (routing stability).

  Args:
    expert_a_nk: [n, k] int expert ids of the first selection.
    expert_b_nk: [n, k'] int expert ids of the second selection (of the same n tokens).
    num_experts: E, the number of experts.

  Returns:
    [n] float: each token's Jaccard index in [0, 1] (0 when both selections are empty).
  """
  a_ne, b_ne = select_mask(expert_a_nk, num_experts), select_mask(expert_b_nk, num_experts)
  inter = jnp.sum(a_ne & b_ne, axis=-1)
  union = jnp.sum(a_ne | b_ne, axis=-1)
  return inter / jnp.maximum(union, 1)
