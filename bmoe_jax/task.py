"""What is scored: the batch, the task output and its class probabilities.

A ``Task`` is built once from the model config and the answer tokens and handed to every stage
(fine-tuning, K-FAC, predictives, baselines, evaluation), like laplax's ``model_fn(input, params)``:

  task = Task(cfg, class_ids)                       # lettered prompts: one answer token per class
  f_bc = task.logits(params, batch)                 # [b, C] logits at each example's answer position
  f_bc, taps = task.logits_and_taps(params, batch, perturb)   # + the MoE taps (K-FAC, predictives)

The task output is ``f = logits[b, answer_pos_b, class_ids]``, or ``logits[b, answer_pos_b,
batch.class_ids_bc[b]]`` for cloze-style batches (per-example choice tokens; ``class_ids=None``). Choices
an example lacks (``batch.choice_mask_bc``, ARC has 3-5) get ``CHOICE_MASK_VALUE``: probability ~0, no
gradient, no curvature.

**Frozen prefix.** When only layers >= L train or are Bayesian, the input states of layer L can be
computed once per batch (``with_prefix``): the batches then carry ``states_bsd`` and the task carries
``start_layer = L``, so every model call on them runs only the top layers. A batch with cached states
and a task without ``start_layer`` (or the reverse) is refused.

``class_probs(f_mean, f_cov, link, key, num_samples)`` turns Gaussian logits ``N(f_mean, f_cov)`` into
class probabilities: ``probit`` (``softmax(f / sqrt(1 + pi/8 diag cov))``) or ``mc`` (the mean softmax of
``num_samples`` seeded draws).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig

CHOICE_MASK_VALUE = -1e9
LINKS = ("probit", "mc")


class Batch(NamedTuple):
  tokens_bs: jax.Array
  mask_bs: jax.Array
  answer_pos_b: jax.Array
  labels_b: jax.Array  # index into the C classes
  # Optional [b, c] bool: False where an example has fewer choices than the C classes (ARC has 3-5).
  choice_mask_bc: jax.Array | None = None
  # Optional [b, s, d]: cached input states of layer ``Task.start_layer`` (``with_prefix``).
  states_bsd: jax.Array | None = None
  # Optional [b, c] int: per-example class token ids (cloze-style choices); else ``Task.class_ids``.
  class_ids_bc: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """The scored output of a model on ``Batch``es (hashable: a static argument of ``jax.jit``).

  Args:
    cfg: the model's config.
    class_ids: the C answer token ids shared by every example (lettered prompts), or None when the
      batches carry their own (``Batch.class_ids_bc``, cloze-style).
    start_layer: the layer whose cached inputs the batches carry (0: no cache, full forwards).
  """
  cfg: MoEConfig
  class_ids: tuple[int, ...] | None = None
  start_layer: int = 0

  def __post_init__(self):
    if self.class_ids is not None:
      object.__setattr__(self, "class_ids", tuple(int(i) for i in np.asarray(self.class_ids).reshape(-1)))
    if not 0 <= self.start_layer <= self.cfg.num_layers:
      raise ValueError(f"start_layer={self.start_layer}: expected 0..{self.cfg.num_layers}")

  def forward_kw(self, batch: Batch) -> dict:
    """The ``model.forward`` keywords of ``batch``: its cached prefix states, if any."""
    if (batch.states_bsd is None) != (self.start_layer == 0):
      raise ValueError(
          "batch and task disagree on the cached prefix: the batch carries states_bsd but the task has "
          "start_layer=0; build the task with with_prefix()" if batch.states_bsd is not None else
          f"the task starts at layer {self.start_layer} but the batch carries no cached states (states_bsd)")
    return {} if self.start_layer == 0 else {"start_layer": self.start_layer, "states_bsd": batch.states_bsd}

  def logits_and_taps(self, params, batch: Batch, perturb=None):
    """(f [b, C], taps) with the MoE layers' taps and zero-perturbation hooks (``model.forward``)."""
    from bmoe_jax.model import forward

    out = forward(params, self.cfg, batch.tokens_bs, batch.mask_bs, perturb=perturb, return_taps=True,
                  logit_positions_b=batch.answer_pos_b, **self.forward_kw(batch))
    if batch.class_ids_bc is not None:
      f_bc = jnp.take_along_axis(out.logits, batch.class_ids_bc, axis=1)
    elif self.class_ids is None:
      raise ValueError("the task has no class_ids and the batch no class_ids_bc: nothing to score")
    else:
      f_bc = out.logits[:, jnp.asarray(self.class_ids)]
    if batch.choice_mask_bc is not None:
      f_bc = jnp.where(batch.choice_mask_bc, f_bc, CHOICE_MASK_VALUE)
    return f_bc, out.taps

  def logits(self, params, batch: Batch) -> jax.Array:
    """f [b, C]: the class logits of every example."""
    return self.logits_and_taps(params, batch)[0]

  def features(self, params, batch: Batch) -> jax.Array:
    """phi [b, d]: the final normed hidden state at each answer position (the LM head's input)."""
    from bmoe_jax.model import forward

    out = forward(params, self.cfg, batch.tokens_bs, batch.mask_bs, return_hidden=True,
                  logit_positions_b=batch.answer_pos_b, **self.forward_kw(batch))
    h_bsd = out.hidden_states[-1]
    return jnp.take_along_axis(h_bsd, batch.answer_pos_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def nll_and_correct(f_bc, labels_b):
  """(mean negative log-likelihood, number correct) of logits f [b, C] for labels [b]."""
  logp_bc = jax.nn.log_softmax(f_bc)
  nll_b = -jnp.take_along_axis(logp_bc, labels_b[:, None], 1)[:, 0]
  return jnp.mean(nll_b), jnp.sum(jnp.argmax(f_bc, -1) == labels_b)


# --- class probabilities of Gaussian logits --------------------------------------------------------------


def probit(f_mean_bc, f_cov_bcc):
  var_bc = jnp.diagonal(f_cov_bcc, axis1=-2, axis2=-1)
  return jax.nn.softmax(f_mean_bc / jnp.sqrt(1.0 + jnp.pi / 8.0 * var_bc), axis=-1)


def gaussian_logit_samples(f_mean_bc, f_cov_bcc, key, num_samples: int):
  """[n, b, c] draws of N(f*, Sigma_f) (symmetric PSD square root: robust to singular Sigma_f)."""
  eig_bc, vec_bcc = jnp.linalg.eigh(f_cov_bcc)
  root_bcc = vec_bcc * jnp.sqrt(jnp.maximum(eig_bc, 0))[:, None, :]
  z_nbc = jax.random.normal(key, (num_samples,) + f_mean_bc.shape, f_mean_bc.dtype)
  return f_mean_bc + jnp.einsum("bij,nbj->nbi", root_bcc, z_nbc)


def mc_softmax(f_mean_bc, f_cov_bcc, key, num_samples: int = 1000):
  return jnp.mean(jax.nn.softmax(gaussian_logit_samples(f_mean_bc, f_cov_bcc, key, num_samples), -1), 0)


def class_probs(f_mean_bc, f_cov_bcc, link: str = "probit", key: jax.Array | None = None,
                num_samples: int = 1000) -> jax.Array:
  """p [b, C] = E softmax(f), f ~ N(f_mean [b, C], f_cov [b, C, C]); ``link`` probit or mc (seeded by
  ``key``, default key 0)."""
  if link == "probit":
    return probit(f_mean_bc, f_cov_bcc)
  if link != "mc":
    raise ValueError(f"link={link!r}: expected one of {LINKS}")
  return mc_softmax(f_mean_bc, f_cov_bcc, jax.random.key(0) if key is None else key, num_samples)


# --- the frozen prefix, computed once -------------------------------------------------------------------


def prefix_states(params, task: Task, batches: Sequence[Batch], start: int, progress: bool = True) -> list:
  """Each batch's input states of layer ``start`` (the frozen prefix run once)."""
  from tqdm.auto import tqdm

  from bmoe_jax.model import prefix_states as model_prefix

  if task.start_layer:
    raise ValueError(f"the task already starts at layer {task.start_layer}: cache from full batches")
  cfg = task.cfg
  fn = jax.jit(lambda p, b: model_prefix(p, cfg, b.tokens_bs, b.mask_bs, stop_layer=start))
  return [fn(params, b) for b in tqdm(batches, desc=f"cache layers <{start}", disable=not progress, leave=False)]


def with_prefix(params, task: Task, batch_lists: Sequence[Sequence[Batch]], start: int,
                progress: bool = True) -> tuple[Task, tuple[list[Batch], ...]]:
  """(task starting at layer ``start``, the batch lists with their layer-``start`` inputs attached).
  ``start=0`` returns everything unchanged. Every call on the results then skips layers < start, which
  must be frozen (the cache holds ``params``' prefix)."""
  if not start:
    return task, tuple(list(bl) for bl in batch_lists)
  out = tuple([b._replace(states_bsd=s) for b, s in zip(bl, prefix_states(params, task, bl, start, progress))]
              for bl in batch_lists)
  return dataclasses.replace(task, start_layer=start), out


def same_prefix(params_a, params_b, start: int) -> bool:
  """Whether two parameter trees agree below layer ``start`` (embedding and layers < start): then a prefix
  cached with one serves the other."""
  pick = lambda p: (p["embed"], p["layers"][:start])
  return all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(pick(params_a)), jax.tree.leaves(pick(params_b))))
