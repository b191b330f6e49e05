"""The pipeline's steps as jitted functions with declared input and output shardings on a mesh.

Each builder takes example arguments (``*_like``: arrays or ShapeDtypeStructs of the right shapes), so the
shardings are fixed when the function is built; the returned function is a ``jax.jit`` traced and run
under ``jax.set_mesh(mesh)`` (so the routed experts run expert-parallel on an expert axis):

* ``forward``: (params, batch) -> vocabulary logits [b, s, V], split (data, -, model).
* ``task_logits``: (params, batch) -> answer logits [b, C], split on data.
* ``train_step``: one AdamW update of the trainable subset (``train.make_train_step``); the trainable
  weights and optimizer moments keep the parameters' shardings.
* ``factor_update``: ``kfac.update`` of one batch; every block's statistics split on the expert axis.
* ``log_evidence``: the Laplace log marginal likelihood of a posterior split on the expert axis.
* ``predictive``: the closed-form Bayesian-MoE predictive [b, C], split on data.

Numbers equal the single-device ones (``tests/sharding``); the compiler inserts the collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from bmoe_jax import sharding as S
from bmoe_jax import train as T
from bmoe_jax.config import MoEConfig
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as PO
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.model import forward as model_forward
from bmoe_jax.task import DEFAULT_LINK, Task, class_probs


class _OnMesh:
  """A jitted function that is traced and run under ``jax.set_mesh(mesh)``: the model's sorted expert
  path then runs expert-parallel (``nn.moe.experts_expert_parallel``) when the mesh has an expert axis."""

  def __init__(self, mesh, fn, **jit_kw):
    self.mesh, self.jitted = mesh, jax.jit(fn, **jit_kw)

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def _data_spec(mesh, b: int, ndim: int) -> NamedSharding:
  return S.leading_sharding(mesh, "data", b, ndim)


def forward(task: Task, mesh, batch_like, rules=S.RULES):
  """The model's forward pass on a mesh: (params, batch) -> vocabulary logits [b, s, V].

  Args:
    task: the ``task.Task``: its config, and the cached-prefix / routing keywords of ``Task.forward_kw``.
    mesh: the mesh (``sharding.make_mesh``).
    batch_like: an example ``task.Batch`` (arrays or ShapeDtypeStructs) whose shapes fix the shardings: later
      batches must have its shapes and the same None fields.
    rules: logical axis -> mesh axis for the parameters and the logits (``sharding.RULES`` or ``FSDP_RULES``).

  Returns:
    ``fn(params, batch) -> logits [b, s, V]`` (``model.forward(...).logits``, V = ``cfg.vocab_size``), jitted and
      run under ``jax.set_mesh(mesh)`` (``fn.lower(params, batch)`` lowers it); ``params`` placed with
      ``sharding.param_shardings(task.cfg, mesh, rules)`` (``shard_params``), ``batch`` with ``batch_shardings``
      (``shard_batch``); the logits split over ``data`` on b and over ``vocab``'s mesh axis on V where they divide.
  """
  cfg = task.cfg
  psh, bsh = S.param_shardings(cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  b, s = batch_like.tokens_bs.shape
  out = NamedSharding(mesh, S.spec_for(("batch", None, "vocab"), (b, s, cfg.vocab_size), mesh, rules))

  def fn(params, batch):
    return model_forward(params, cfg, batch.tokens_bs, batch.mask_bs, **task.forward_kw(batch)).logits
  return _OnMesh(mesh, fn, in_shardings=(psh, bsh), out_shardings=out)


def task_logits(task: Task, mesh, batch_like, rules=S.RULES):
  """The class logits on a mesh: (params, batch) -> f [b, C] (``Task.logits``), split on data.

  Args:
    task: the ``task.Task`` whose C answer logits are read.
    mesh: the mesh (``sharding.make_mesh``).
    batch_like: an example ``task.Batch`` (arrays or ShapeDtypeStructs) whose shapes fix the shardings: later
      batches must have its shapes and the same None fields.
    rules: logical axis -> mesh axis for the parameters (``sharding.RULES`` or ``FSDP_RULES``).

  Returns:
    ``fn(params, batch) -> f [b, C]`` (``Task.logits``: absent choices masked), jitted and run under
      ``jax.set_mesh(mesh)`` (``fn.lower`` lowers it); ``params`` placed with ``sharding.param_shardings(task.cfg,
      mesh, rules)``, ``batch`` with ``batch_shardings``; f split over ``data`` on b where it divides.
  """
  psh, bsh = S.param_shardings(task.cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  b = batch_like.tokens_bs.shape[0]
  return _OnMesh(mesh, task.logits,
                 in_shardings=(psh, bsh), out_shardings=_data_spec(mesh, b, 2))


def train_step(task: Task, mesh, params_like, batch_like, tc: T.TrainConfig, *, total_steps: int,
               dataset_size: int, rules=S.RULES):
  """One AdamW fine-tuning step on a mesh (``train.make_train_step``), with its optimizer init and parameter split.

  Args:
    task: the ``task.Task`` whose answers' cross-entropy is minimised.
    mesh: the mesh (``sharding.make_mesh``).
    params_like: the full parameter tree (arrays or ShapeDtypeStructs, ``params.param_specs(task.cfg)``'s
      structure): it selects the trainable leaves and gives the optimizer state's shapes.
    batch_like: an example ``task.Batch`` (arrays or ShapeDtypeStructs) whose shapes fix the batch shardings:
      later batches must have its shapes and the same None fields.
    tc: the fine-tuning config: ``trainable`` / ``layers`` (the trainable subset), the AdamW schedule (``lr``,
      ``schedule``, warm-up, ``weight_decay``, ``grad_accum``) and ``prior_precision``.
    total_steps: the optimizer steps the learning-rate schedule spans (after gradient accumulation: micro-steps
      // ``tc.grad_accum``); sets the ``warmup_ratio`` warm-up's length and the decay's.
    dataset_size: N, the number of training examples: the objective is the batch's mean cross-entropy plus
      ``tc.prior_precision / (2 N) * ||train - anchor||^2``.
    rules: logical axis -> mesh axis for the parameters (``sharding.RULES`` or ``FSDP_RULES``).

  Returns:
    ``(step, init, split)``: ``split(params) -> (train, frozen)`` places both parts (None at the other's
      leaves) on the mesh with the parameters' shardings; ``init(train) -> opt_state`` (moments sharded like
      the weights, counters replicated); and the jitted ``step(train, opt_state, batch, frozen, anchor) ->
      (train, opt_state, loss, right)``, run under ``jax.set_mesh(mesh)``, where ``anchor`` is the prior's mean
      (the trainable part of the pretrained weights, ``split(pretrained)[0]``), ``loss`` the batch's mean
      cross-entropy without the prior term (NaN when a gradient is not finite: discard that step) and
      ``right`` the number of correct argmax answers, both replicated scalars.
  """
  cfg = task.cfg
  mask = T.trainable_mask(params_like, cfg, tc.trainable, tc.layers)
  psh = S.param_shardings(cfg, mesh, rules)
  train_sh, frozen_sh = T.split(psh, mask)
  opt = T.make_optimizer(tc, total_steps)
  rep = S.replicated(mesh)
  # the moments mirror the weights (their shardings); counters and the like are replicated
  opt_like = jax.eval_shape(opt.init, T.split(params_like, mask)[0])
  opt_sh = optax.tree_map_params(opt, lambda _, sh: sh, opt_like, train_sh, transform_non_params=lambda _: rep)
  init = jax.jit(opt.init, in_shardings=(train_sh,), out_shardings=opt_sh)
  bsh = S.batch_shardings(batch_like, mesh)
  step = _OnMesh(mesh, T.make_train_step(task, opt, tc.prior_precision / (2.0 * dataset_size)),
                 in_shardings=(train_sh, opt_sh, bsh, frozen_sh, train_sh),
                 out_shardings=(train_sh, opt_sh, rep, rep))

  def split(params):
    tr, fr = T.split(params, mask)
    return jax.device_put(tr, train_sh), jax.device_put(fr, frozen_sh)
  return step, init, split


def factor_shardings(cfg: MoEConfig, mesh, spec: kfac.FactorSpec, dtype=jnp.float32):
  """Shardings of a ``kfac.FactorState``: each block's statistics split on the expert axis.

  Args:
    cfg: the model's config (each block's expert count e, ``kfac.block_dims``).
    mesh: the mesh (``sharding.make_mesh``).
    spec: the ``kfac.FactorSpec`` whose blocks (full or rank-r statistics) the state holds.
    dtype: the statistics' dtype, as passed to ``kfac.init`` (the shardings do not depend on it).

  Returns:
    A ``kfac.FactorState`` of ``NamedSharding``: per block, its ``LayerStats`` (``a_eff`` [e, f, f], ``g_edd``
      [e, d, d], ``rows_e`` [e]) or ``lowrank.LowRankStats`` split over ``expert`` on e and, for rank-3 arrays,
      over ``model`` on their second dimension, where the axes divide (``sharding.expert_shardings``; shared and
      router blocks have e = 1); ``num_sequences`` and ``log_lik`` replicated.
  """
  state = jax.eval_shape(lambda: kfac.init(cfg, spec, dtype))
  def one(blk, stats):
    return S.expert_shardings(stats, mesh, kfac.block_dims(cfg, blk)[0])
  rep = S.replicated(mesh)
  return kfac.FactorState({blk: one(blk, st) for blk, st in state.stats.items()}, rep, rep)


def factor_update(task: Task, mesh, batch_like, spec: kfac.FactorSpec, rules=S.RULES, dtype=jnp.float32):
  """The K-FAC factor pass (``kfac.init`` / ``kfac.update``) on a mesh, statistics split on the expert axis.

  Args:
    task: the ``task.Task`` whose logits' curvature is summed.
    mesh: the mesh (``sharding.make_mesh``).
    batch_like: an example ``task.Batch`` (arrays or ShapeDtypeStructs) whose shapes fix the batch shardings:
      later batches must have its shapes and the same None fields.
    spec: the ``kfac.FactorSpec``: the Bayesian layers and blocks, label and token modes, factor rank.
    rules: logical axis -> mesh axis for the parameters (``sharding.RULES`` or ``FSDP_RULES``).
    dtype: the statistics' dtype (``kfac.init``; default float32).

  Returns:
    ``(update, init)``: ``init() -> FactorState`` is the zero state on the mesh (``factor_shardings``);
      ``update(state, params, batch, key) -> FactorState`` adds one batch (``kfac.update``, jitted and run under
      ``jax.set_mesh(mesh)``; the per-device partial sums over the data axis are all-reduced by the compiler),
      with ``params`` placed with ``param_shardings``, ``batch`` with ``batch_shardings`` and ``key`` a
      replicated PRNG key (used by ``spec.labels == "mc"``); the state keeps its shardings.
  """
  cfg = task.cfg
  ssh = factor_shardings(cfg, mesh, spec, dtype)
  psh, bsh = S.param_shardings(cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  rep = S.replicated(mesh)
  update = _OnMesh(mesh, lambda st, p, batch, key: kfac.update(st, p, task, batch, spec, key),
                   in_shardings=(ssh, psh, bsh, rep), out_shardings=ssh)
  init = jax.jit(lambda: kfac.init(cfg, spec, dtype), out_shardings=ssh)
  return update, init


def posterior_shardings(post: PO.Posterior, mesh):
  """Every per-expert array (factors, MAP weights, distances, prior precisions) split on the expert axis.

  Args:
    post: a ``laplace.posterior.Posterior`` (arrays or ShapeDtypeStructs; only shapes are read).
    mesh: the mesh (``sharding.make_mesh``).

  Returns:
    A ``Posterior`` of ``NamedSharding``: per block, ``factors`` (``kfac.Factors``), ``w_map`` [e, f, d],
      ``sq_dist_e`` [e] and ``log_prior_prec_e`` [e] split over ``expert`` on e (e = ``w_map[blk].shape[0]``)
      and, for rank-3 arrays, over ``model`` on their second dimension, where the axes divide
      (``sharding.expert_shardings``); ``scale`` and ``log_lik`` replicated.
  """
  def block(blk, tree):
    return S.expert_shardings(tree, mesh, post.w_map[blk].shape[0])
  rep = S.replicated(mesh)
  return PO.Posterior({b: block(b, f) for b, f in post.factors.items()},
                      {b: block(b, w) for b, w in post.w_map.items()},
                      {b: block(b, v) for b, v in post.sq_dist_e.items()},
                      {b: block(b, v) for b, v in post.log_prior_prec_e.items()}, rep, rep)


def log_evidence(post_like: PO.Posterior, mesh):
  """The Laplace log marginal likelihood of a posterior split on the expert axis.

  Args:
    post_like: an example ``laplace.posterior.Posterior`` (arrays or ShapeDtypeStructs) whose blocks and shapes
      fix the input shardings (``posterior_shardings``).
    mesh: the mesh (``sharding.make_mesh``).

  Returns:
    The jitted ``fn(post) -> scalar``: ``posterior.log_marginal_likelihood(post)`` at the posterior's own
      per-expert prior precisions (``post.log_prior_prec_e``), replicated.
  """
  return jax.jit(PO.log_marginal_likelihood, in_shardings=(posterior_shardings(post_like, mesh),),
                 out_shardings=S.replicated(mesh))


def predictive(task: Task, mesh, post_like: PO.Posterior, batch_like, rules=S.RULES, link: str = DEFAULT_LINK):
  """(params, posterior, batch) -> closed-form class probabilities [b, C] (``link``), split on data.

  Args:
    task: the ``task.Task`` whose class logits are linearised.
    mesh: the mesh (``sharding.make_mesh``).
    post_like: an example ``laplace.posterior.Posterior`` (arrays or ShapeDtypeStructs) whose blocks and shapes
      fix its shardings (``posterior_shardings``).
    batch_like: an example ``task.Batch`` (arrays or ShapeDtypeStructs) whose shapes fix the batch shardings:
      later batches must have its shapes and the same None fields.
    rules: logical axis -> mesh axis for the parameters (``sharding.RULES`` or ``FSDP_RULES``).
    link: the Gaussian-to-probability link of ``task.class_probs``: "probit_pairwise" (default) or "probit"
      (closed forms), or "mc" (1000 softmax samples, fixed key 0).

  Returns:
    ``fn(params, post, batch) -> p [b, C]``: ``class_probs`` of the MAP logits and their covariance Sigma_f
      [b, C, C] (``predictive.jacobian_stats`` / ``logit_covariance``, at ``post.log_prior_prec_e``), jitted and
      run under ``jax.set_mesh(mesh)``; ``params`` placed with ``param_shardings``, ``post`` with
      ``posterior_shardings``, ``batch`` with ``batch_shardings``; p split over ``data`` on b where it divides.
  """
  psh, bsh = S.param_shardings(task.cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  b = batch_like.tokens_bs.shape[0]

  def fn(params, post, batch):
    stats = PR.jacobian_stats(params, task, batch, post)
    return class_probs(stats.f_bc, PR.logit_covariance(stats, post), link)
  return _OnMesh(mesh, fn, in_shardings=(psh, posterior_shardings(post_like, mesh), bsh),
                 out_shardings=_data_spec(mesh, b, 2))

