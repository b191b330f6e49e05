"""Predictives of stochastic routers, alone and combined with the Bayesian-MoE expert posterior.

* ``routed_probs``: the mean of S sampled forwards' class probabilities, ``(1/S) sum_s softmax(f(x; draw s))``;
  draw s uses key ``fold_in(key, s)`` and sample index s (ensemble member s mod M). One compiled program
  (``jax.lax.map`` over the draws, the task static) serves every draw, batch shape and router state.
* ``laplace_router_method``: the Laplace router (``Block(l, "router")`` posteriors): S router weights drawn from
  the posterior, full forwards (the selection re-routes), mean softmax (the thesis drew 10).
* ``routed_bayesian_moe``: per routing draw s, the linearised Laplace predictive of the experts **that draw
  selected** (``laplace.predictive.jacobian_stats`` under the sampled routing: ``f_s`` and
  ``Sigma_f,s = sum_e J_e,s Sigma_e J_e,s^T``), turned into class probabilities by the link, then averaged
  over the S draws: ``p = (1/S) sum_s E_{f ~ N(f_s, Sigma_f,s)} softmax(f)``. With the deterministic router it
  is Bayesian-MoE; without an expert posterior it is the router's own predictive.

The sampled predictives (stochastic routers, the Laplace router) also give their draws' epistemic scores
(``bmoe_jax.epistemic``: mutual information, centred logit variance) from the same pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from bmoe_jax import epistemic as EP
from bmoe_jax.routing.plan import with_draw
from bmoe_jax.task import DEFAULT_LINK, Batch, Task, class_probs


def draw_keys(key, num_samples: int) -> jax.Array:
  """[S] typed keys ``fold_in(key, s)``."""
  return jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(num_samples))


def routed_logits(params, task: Task, batch: Batch, keys_s) -> jax.Array:
  """[S, b, C]: the class logits of each draw (``params`` carry the routing state, ``routing.attach``)."""
  def one(args):
    s, key = args
    return task.logits(with_draw(params, key, s), batch)
  return jax.lax.map(one, (jnp.arange(keys_s.shape[0], dtype=jnp.int32), keys_s))


def routed_probs(params, task: Task, batch: Batch, keys_s) -> jax.Array:
  """[b, C]: the mean over draws of softmax(f)."""
  return jnp.mean(jax.nn.softmax(routed_logits(params, task, batch, keys_s), axis=-1), axis=0)


routed_scores_jit = jax.jit(lambda params, batch, task, keys_s: EP.sample_scores(
    routed_logits(params, task, batch, keys_s)), static_argnames="task")


def num_draws(task: Task, num_samples: int) -> int:
  """Forward draws of a plan's predictive: an ensemble plan's members (its exact average), else ``num_samples``
  (1 for a deterministic plan)."""
  plan = task.routing
  if plan is None or not plan.stochastic:
    return 1
  members = [rc.router_members for _, rc in plan.layers if rc.kind == "ensemble"]
  return max(members) if members else num_samples


def routed_method(params, task: Task, *, num_samples: int = 8, key=None) -> Callable[[Batch], jax.Array]:
  """The Method (Batch -> class probabilities) of a stochastic routing plan."""
  keys = draw_keys(jax.random.key(0) if key is None else key, num_draws(task, num_samples))
  return EP.ScoredMethod(lambda batch: routed_scores_jit(params, batch=batch, task=task, keys_s=keys))


def routed_bayesian_moe(post, params, task: Task, *, num_samples: int = 8, key=None, link: str = DEFAULT_LINK,
                        mc_samples: int = 1000) -> Callable[[Batch], jax.Array]:
  """The Method of Bayesian-MoE's expert posterior ``post`` under a stochastic routing plan (module docstring)."""
  from bmoe_jax.laplace import predictive as PR

  keys = draw_keys(jax.random.key(0) if key is None else key, num_draws(task, num_samples))

  def run(batch):
    total = 0.0
    for s in range(keys.shape[0]):
      stats = PR.jacobian_stats_jit(with_draw(params, keys[s], s), task=task, batch=batch, post=post)
      total = total + class_probs(stats.f_bc, PR.logit_covariance(stats, post), link, jax.random.fold_in(keys[s], 1),
                                  mc_samples)
    return total / keys.shape[0]
  return run


def _sampled_scores(post, params, task: Task, batch: Batch, key, num_samples: int):
  from bmoe_jax.laplace import predictive as PR
  return EP.sample_scores(PR.nn_samples(params, task, batch, post, key, num_samples))


_sampled_scores_jit = jax.jit(_sampled_scores, static_argnames=("task", "num_samples"))


def laplace_router_method(post, params, task: Task, *, num_samples: int = 8, key=None) -> Callable[[Batch], jax.Array]:
  """The Method of a Laplace router: the mean softmax of ``num_samples`` forwards with router weights (every
  block of ``post``) drawn from the posterior."""
  key = jax.random.key(0) if key is None else key
  return EP.ScoredMethod(lambda batch: _sampled_scores_jit(post, params, batch=batch, task=task, key=key,
                                                           num_samples=num_samples))
