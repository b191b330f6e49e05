"""MAP, temperature scaling, MC dropout, ensembles and Bayesian-MoE as ``Method``s."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax import epistemic as EP
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.params import Block, read_blocks, write_blocks
from bmoe_jax.task import DEFAULT_LINK, Batch, Task, class_probs

Method = Callable[[Batch], jax.Array]


logits_jit = jax.jit(lambda params, batch, task: task.logits(params, batch), static_argnames="task")
"""The class logits f [b, C], one process-wide jit (``task`` static): every method and every parameter tree
of one shape reuses one executable per batch shape."""


class LogitCache:
  """Class logits per (parameter tree, batch), each computed once: MAP and temperature scaling (and the
  pretrained model, when it is the same tree) share one forward per evaluation batch. Holds the trees and
  batches it has seen, so their ids stay valid; build one per evaluation."""

  def __init__(self, task: Task):
    self.task, self._memo = task, {}

  def __call__(self, params, batch: Batch) -> jax.Array:
    key = (id(params), id(batch.tokens_bs))
    if key not in self._memo:
      self._memo[key] = (params, batch, logits_jit(params, batch, task=self.task))
    return self._memo[key][2]


def _logits_fn(task: Task, cache: LogitCache | None):
  if cache is not None and cache.task != task:
    raise ValueError("the LogitCache was built for another task")
  return cache if cache is not None else (lambda p, b: logits_jit(p, b, task=task))


def map_method(params, task: Task, cache: LogitCache | None = None) -> Method:
  logits = _logits_fn(task, cache)
  return lambda batch: jax.nn.softmax(logits(params, batch), -1)


def fit_temperature(logits_nc, labels_n, *, grid=None) -> float:
  """The temperature minimising NLL of softmax(f / T): a log-spaced grid, then Newton steps on log T
  (the NLL is smooth in log T; the result is checked against the grid's best)."""
  f = jnp.asarray(logits_nc, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  y = jnp.asarray(labels_n)

  def nll(log_t):
    logp = jax.nn.log_softmax(f / jnp.exp(log_t), -1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

  grid = np.log(np.logspace(-2, 2, 81) if grid is None else np.asarray(grid))
  vals = np.asarray(jax.vmap(nll)(jnp.asarray(grid, f.dtype)))
  log_t = jnp.asarray(grid[int(np.argmin(vals))], f.dtype)
  grad, hess = jax.grad(nll), jax.grad(jax.grad(nll))
  for _ in range(20):
    h = hess(log_t)
    step = jnp.where(h > 0, grad(log_t) / jnp.maximum(h, 1e-12), 0.0)
    log_t = jnp.clip(log_t - jnp.clip(step, -0.5, 0.5), grid[0] - 2, grid[-1] + 2)
  if float(nll(log_t)) > float(vals.min()):
    log_t = jnp.asarray(grid[int(np.argmin(vals))], f.dtype)
  return float(jnp.exp(log_t))


def temperature_scaling(params, task: Task, val_batches: Sequence[Batch],
                        cache: LogitCache | None = None) -> tuple[Method, float]:
  """Fit T on validation batches; the method returns softmax(f / T). Returns (method, T). ``cache``: shared
  with ``map_method`` of the same ``params``, the evaluation's forwards are not repeated."""
  if not val_batches:
    raise ValueError("temperature scaling needs validation batches")
  logits = _logits_fn(task, cache)
  f = jnp.concatenate([logits(params, b) for b in val_batches])
  y = jnp.concatenate([b.labels_b for b in val_batches])
  t = fit_temperature(f, y)
  return (lambda batch: jax.nn.softmax(logits(params, batch) / t, -1)), t


def mc_dropout(params, task: Task, *, rate: float = 0.1, num_samples: int = 16, key: jax.Array | None = None,
               layers: Sequence[int] | None = None) -> Method:
  """MC dropout on the routed experts' hidden units: each of ``num_samples`` forward passes drops every
  expert's down_proj input unit with probability ``rate`` (scaling the rest by 1/(1-rate)), one mask
  per pass shared by all tokens (as variational dropout ties masks over time). Averages the softmax.
  ``layers``: MoE layers to drop in (default all). Seeded by ``key``; every call reuses the same masks."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"rate={rate}: expected 0 <= rate < 1")
  blocks = [Block(l) for l in (task.cfg.moe_layer_ids if layers is None else layers)]
  key = jax.random.key(0) if key is None else key

  def one(p, sample_key, batch):
    dropped = {}
    for i, (blk, w_efd) in enumerate(sorted(read_blocks(p, blocks).items())):
      keep_ef = jax.random.bernoulli(jax.random.fold_in(sample_key, i), 1.0 - rate, w_efd.shape[:2])
      dropped[blk] = w_efd * (keep_ef[..., None] / (1.0 - rate)).astype(w_efd.dtype)
    return task.logits(write_blocks(p, dropped), batch)

  keys = jax.random.split(key, num_samples)
  run = jax.jit(lambda p, ks, batch: EP.sample_scores(jax.lax.map(lambda k: one(p, k, batch), ks)))
  return EP.ScoredMethod(lambda batch: run(params, keys, batch))


def ensemble(param_list: Sequence, task: Task) -> Method:
  """Average of the members' softmax (checkpoint ensemble: checkpoints of one run; deep ensemble:
  independently fine-tuned seeds)."""
  if not param_list:
    raise ValueError("an ensemble needs at least one member")
  logits = _logits_fn(task, None)
  return EP.ScoredMethod(lambda batch: EP.sample_scores(jnp.stack([logits(p, batch) for p in param_list])))


def bayesian_moe_variants(posts: dict, params, task: Task, *, link: str = DEFAULT_LINK, key: jax.Array | None = None,
                          num_samples: int = 1000, temperatures: dict | None = None) -> dict[str, Method]:
  """Closed-form Bayesian-MoE methods for posteriors that share their factors and differ only in prior
  precision (fixed, evidence, grid): the lambda-independent Jacobian statistics are computed once per
  batch (cached by batch) and every variant only redoes the cheap contraction. ``temperatures``: {name: T}
  for variants whose logits are tempered, N(f* / T, Sigma_f / T^2) (Bayesian-MoE + temperature scaling)."""
  if not posts:
    return {}
  first = next(iter(posts.values()))
  if any(p.factors is not first.factors for p in posts.values()):
    raise ValueError("bayesian_moe_variants: the posteriors must share one factors dict (built from one fit)")
  cache: dict[int, tuple] = {}

  def stats(batch):
    k = id(batch.tokens_bs)
    if k not in cache:  # the batch is kept with its statistics, so its id cannot be reused
      cache[k] = (batch, PR.jacobian_stats_jit(params, task=task, batch=batch, post=first))
    return cache[k][1]

  score_key = jax.random.fold_in(jax.random.key(0) if key is None else key, 1)

  def make(post, t):
    def run(batch):
      s = stats(batch)
      f_bc, cov = s.f_bc / t, PR.logit_covariance(s, post) / t**2
      return class_probs(f_bc, cov, link, key, num_samples), EP.gaussian_scores(f_bc, cov, score_key)
    return EP.ScoredMethod(run)
  return {name: make(post, float((temperatures or {}).get(name, 1.0))) for name, post in posts.items()}


def bayesian_moe(post: P.Posterior, params, task: Task, *, method: str = "closed", link: str = DEFAULT_LINK,
                 key: jax.Array | None = None, num_samples: int = 1000) -> Method:
  """The Bayesian-MoE predictive (``bmoe_jax.laplace.predict``) as a Method."""
  if method == "closed":
    return bayesian_moe_variants({"bmoe": post}, params, task, link=link, key=key, num_samples=num_samples)["bmoe"]
  return lambda batch: PR.predict(post, params, task, batch, method=method, link=link, key=key,
                                  num_samples=num_samples).probs_bc
