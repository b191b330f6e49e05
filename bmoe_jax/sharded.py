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
  cfg = task.cfg
  psh, bsh = S.param_shardings(cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  b, s = batch_like.tokens_bs.shape
  out = NamedSharding(mesh, S.spec_for(("batch", None, "vocab"), (b, s, cfg.vocab_size), mesh, rules))

  def fn(params, batch):
    return model_forward(params, cfg, batch.tokens_bs, batch.mask_bs, **task.forward_kw(batch)).logits
  return _OnMesh(mesh, fn, in_shardings=(psh, bsh), out_shardings=out)


def task_logits(task: Task, mesh, batch_like, rules=S.RULES):
  psh, bsh = S.param_shardings(task.cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  b = batch_like.tokens_bs.shape[0]
  return _OnMesh(mesh, task.logits,
                 in_shardings=(psh, bsh), out_shardings=_data_spec(mesh, b, 2))


def train_step(task: Task, mesh, params_like, batch_like, tc: T.TrainConfig, *, total_steps: int,
               dataset_size: int, rules=S.RULES):
  """Returns (step, init, split): ``split(params) -> (train, frozen)`` places both parts on the mesh,
  ``init(train) -> opt_state`` (sharded like the weights), and the jitted ``step(train, opt_state,
  batch, frozen, anchor) -> (train, opt_state, loss, right)``."""
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
  """Shardings of a ``kfac.FactorState``: each block's statistics split on the expert axis."""
  state = jax.eval_shape(lambda: kfac.init(cfg, spec, dtype))
  def one(blk, stats):
    return S.expert_shardings(stats, mesh, kfac.block_dims(cfg, blk)[0])
  rep = S.replicated(mesh)
  return kfac.FactorState({blk: one(blk, st) for blk, st in state.stats.items()}, rep, rep)


def factor_update(task: Task, mesh, batch_like, spec: kfac.FactorSpec, rules=S.RULES, dtype=jnp.float32):
  """Returns (update, init): ``init()`` is the zero state on the mesh; ``update(state, params, batch, key)``
  adds one batch (the per-device partial sums over the data axis are all-reduced by the compiler)."""
  cfg = task.cfg
  ssh = factor_shardings(cfg, mesh, spec, dtype)
  psh, bsh = S.param_shardings(cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  rep = S.replicated(mesh)
  update = _OnMesh(mesh, lambda st, p, batch, key: kfac.update(st, p, task, batch, spec, key),
                   in_shardings=(ssh, psh, bsh, rep), out_shardings=ssh)
  init = jax.jit(lambda: kfac.init(cfg, spec, dtype), out_shardings=ssh)
  return update, init


def posterior_shardings(post: PO.Posterior, mesh):
  """Every per-expert array (factors, MAP weights, distances, prior precisions) split on the expert axis."""
  def block(blk, tree):
    return S.expert_shardings(tree, mesh, post.w_map[blk].shape[0])
  rep = S.replicated(mesh)
  return PO.Posterior({b: block(b, f) for b, f in post.factors.items()},
                      {b: block(b, w) for b, w in post.w_map.items()},
                      {b: block(b, v) for b, v in post.sq_dist_e.items()},
                      {b: block(b, v) for b, v in post.log_prior_prec_e.items()}, rep, rep)


def log_evidence(post_like: PO.Posterior, mesh):
  return jax.jit(PO.log_marginal_likelihood, in_shardings=(posterior_shardings(post_like, mesh),),
                 out_shardings=S.replicated(mesh))


def predictive(task: Task, mesh, post_like: PO.Posterior, batch_like, rules=S.RULES, link: str = DEFAULT_LINK):
  """(params, posterior, batch) -> closed-form class probabilities [b, C] (``link``), split on data."""
  psh, bsh = S.param_shardings(task.cfg, mesh, rules), S.batch_shardings(batch_like, mesh)
  b = batch_like.tokens_bs.shape[0]

  def fn(params, post, batch):
    stats = PR.jacobian_stats(params, task, batch, post)
    return class_probs(stats.f_bc, PR.logit_covariance(stats, post), link)
  return _OnMesh(mesh, fn, in_shardings=(psh, posterior_shardings(post_like, mesh), bsh),
                 out_shardings=_data_spec(mesh, b, 2))

