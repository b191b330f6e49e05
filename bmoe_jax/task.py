"""What is scored: the batch, the task output and its class probabilities.

A ``Task`` is built once from the model config and the answer tokens and handed to every stage
(fine-tuning, K-FAC, predictives, baselines, evaluation), like laplax's ``model_fn(input, params)``:

  task = Task(cfg, class_ids)                       # lettered prompts: one answer token per class
  f_bc = task.logits(params, batch)                 # [b, C] logits at each example's answer position
  f_bc, taps = task.logits_and_taps(params, batch, perturb)   # + the MoE taps (K-FAC, predictives)

The task output ``f [b, C]`` takes one of three forms, by what the batch carries:

* lettered: ``f = logits[b, answer_pos_b, class_ids]`` (one answer token per class, shared);
* first-token cloze: ``logits[b, answer_pos_b, batch.class_ids_bc[b]]`` (per-example tokens;
  ``class_ids=None``);
* continuation (``batch.cont``, ``bmoe_jax.data.continuation``): the choices' weighted log-likelihoods
  ``f_c = sum_t weight_btc[b, t, c] * log softmax(logits[b, pos_bt[b, t]])[tok_bt[b, t]]``, all choices
  packed after their shared context in one row.

Choices an example lacks (``batch.choice_mask_bc``, ARC has 3-5) get ``CHOICE_MASK_VALUE``: probability
~0, no gradient, no curvature. Whatever the form, the loss is the cross-entropy of softmax(f), so the GGN
of any parameter block is ``sum_n J_n^T (diag p - p p^T) J_n`` with ``J_n = df/dtheta`` (``laplace.kfac``);
``output_mask`` marks the positions whose logits enter f (the K-FAC ``last`` rows).

**Frozen prefix.** When only layers >= L train or are Bayesian, the input states of layer L can be
computed once per batch (``with_prefix``): the batches then carry ``states_bsd`` and the task carries
``start_layer = L``, so every model call on them runs only the top layers. A batch with cached states
and a task without ``start_layer`` (or the reverse) is refused.

``class_probs(f_mean, f_cov, link, key, num_samples)`` turns Gaussian logits ``N(f_mean, f_cov)`` into
class probabilities ``E softmax(f)``: ``mc`` (the mean softmax of ``num_samples`` seeded draws) or a closed
form. ``E softmax(f)`` is unchanged by a shift common to all classes, fixed or random; continuation scores
(log-likelihoods, all far below 0) make that matter. ``probit_pairwise`` (the default) acts on the
contrasts ``f_c - f_k`` and is shift-invariant; laplace-torch's ``probit`` (``softmax(f / sqrt(1 + pi/8
diag cov))``) is not: on continuation scores it pulls the most uncertain choice towards 0, i.e. up
(``experiments/link_compare.py``: it cost 10 points of ARC-E accuracy). Against many-draw mc on random
4-class Gaussians (``tests/test_task.py``) the pairwise form is the closer one in every regime measured;
a probit on logits centred at their mean (also shift-invariant) was less accurate and is not offered.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig

CHOICE_MASK_VALUE = -1e9
LINKS = ("probit_pairwise", "probit", "mc")
DEFAULT_LINK = "probit_pairwise"


class Continuation(NamedTuple):
  """Packed continuation scoring (``bmoe_jax.data.continuation``): one row per question."""
  positions_bs: jax.Array  # RoPE positions: each choice's continue its context's
  segments_bs: jax.Array  # 0: the shared context, c + 1: choice c (nn.layers.attention_mask)
  pos_bt: jax.Array  # [b, t] the position whose next-token logits score token t
  tok_bt: jax.Array  # [b, t] the scored token ids
  weight_btc: jax.Array  # [b, t, C] the token's normalisation weight in its choice's column (0: padding)


class Batch(NamedTuple):
  """One batch of b multiple-choice questions of s tokens (a pytree: it passes through ``jax.jit``).

  Attributes:
    tokens_bs: int [b, s] token ids, padded with the pad token.
    mask_bs: int [b, s] attention mask: 1 on real tokens, 0 on padding.
    answer_pos_b: int [b] the position whose next-token logits score the answer (the prompt's last token).
    labels_b: int [b] the correct class of each question, an index into the C classes.
    choice_mask_bc: optional bool [b, C], False where an example has fewer choices than the C classes (ARC has
      3-5); those logits get ``CHOICE_MASK_VALUE``. None: every example has C choices.
    states_bsd: optional [b, s, d] cached input states of layer ``Task.start_layer`` (``with_prefix``).
    class_ids_bc: optional int [b, C] per-example class token ids (cloze-style choices); None: ``Task.class_ids``.
    cont: optional continuation scoring (``Continuation``); ``answer_pos_b`` is then the context's last token.
  """
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
  # Optional: continuation scoring (``Continuation``); answer_pos_b is then the context's last token.
  cont: Continuation | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """The scored output of a model on ``Batch``es (hashable: a static argument of ``jax.jit``).

  Args:
    cfg: the model's config.
    class_ids: the C answer token ids shared by every example (lettered prompts), or None when the
      batches carry their own (``Batch.class_ids_bc``, cloze-style).
    start_layer: the layer whose cached inputs the batches carry (0: no cache, full forwards).
    routing: a ``routing.RoutingPlan`` (Bayesian routers by layer; their state travels in ``params``,
      ``routing.attach``); None: every layer routes deterministically.
  """
  cfg: MoEConfig
  class_ids: tuple[int, ...] | None = None
  start_layer: int = 0
  routing: Any = None

  def __post_init__(self):
    if self.class_ids is not None:
      object.__setattr__(self, "class_ids", tuple(int(i) for i in np.asarray(self.class_ids).reshape(-1)))
    if not 0 <= self.start_layer <= self.cfg.num_layers:
      raise ValueError(f"start_layer={self.start_layer}: expected 0..{self.cfg.num_layers}")
    if self.routing is not None:
      self.routing.check(self.cfg)
      low = [l for l in self.routing.layer_ids if l < self.start_layer]
      if low:
        raise ValueError(f"routers in layers {low} lie below the cached prefix (start_layer={self.start_layer})")

  def forward_kw(self, batch: Batch) -> dict:
    """The ``model.forward`` keywords of ``batch``: its cached prefix states, if any."""
    if (batch.states_bsd is None) != (self.start_layer == 0):
      raise ValueError(
          "batch and task disagree on the cached prefix: the batch carries states_bsd but the task has "
          "start_layer=0; build the task with with_prefix()" if batch.states_bsd is not None else
          f"the task starts at layer {self.start_layer} but the batch carries no cached states (states_bsd)")
    kw = layout_kw(batch)
    if self.routing is not None:
      kw["routing"] = self.routing
    return kw if self.start_layer == 0 else {"start_layer": self.start_layer, "states_bsd": batch.states_bsd, **kw}

  def logits_and_taps(self, params, batch: Batch, perturb=None):
    """(f [b, C], taps) with the MoE layers' taps and zero-perturbation hooks (``model.forward``)."""
    from bmoe_jax.model import forward

    cont = batch.cont
    out = forward(params, self.cfg, batch.tokens_bs, batch.mask_bs, perturb=perturb, return_taps=True,
                  logit_positions_b=batch.answer_pos_b if cont is None else cont.pos_bt, **self.forward_kw(batch))
    if cont is not None:
      logp_btv = jax.nn.log_softmax(out.logits, axis=-1)
      logp_bt = jnp.take_along_axis(logp_btv, cont.tok_bt[..., None], axis=-1)[..., 0]
      f_bc = jnp.einsum("bt,btc->bc", logp_bt, cont.weight_btc)
    elif batch.class_ids_bc is not None:
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
    """phi [b, d]: the final normed hidden state at each answer position (the LM head's input), divided by
    ``logits_scaling`` (Granite) so that phi @ W is the model's logits (plus the head's bias, if it has one:
    ``params.head_bias``)."""
    from bmoe_jax.model import forward

    if batch.cont is not None:
      raise ValueError("features(): continuation-scored batches have no single answer position; their "
                       "output reads the logits of every scored token")
    out = forward(params, self.cfg, batch.tokens_bs, batch.mask_bs, return_hidden=True,
                  logit_positions_b=batch.answer_pos_b, **self.forward_kw(batch))
    h_bsd = out.hidden_states[-1]
    phi_bd = jnp.take_along_axis(h_bsd, batch.answer_pos_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return phi_bd / self.cfg.logits_scaling


def layout_kw(batch: Batch) -> dict:
  """The ``model.forward`` keywords of a batch's sequence layout: packed positions and segments.

  Args:
    batch: the batch; only ``batch.cont`` is read.

  Returns:
    ``{}`` for a batch without ``cont`` (default positions, one segment); else ``{"positions_bs": [b, s] RoPE
    positions, "segments_bs": [b, s] segment ids}`` of its packed continuation rows.
  """
  if batch.cont is None:
    return {}
  return {"positions_bs": batch.cont.positions_bs, "segments_bs": batch.cont.segments_bs}


def output_mask(batch: Batch) -> jax.Array:
  """[b, s] bool: the positions whose logits enter the task output (the answer position; for
  continuation batches every position that predicts a scored token).

  Args:
    batch: the batch; reads ``tokens_bs``'s shape, ``answer_pos_b`` and, if present, ``cont``.

  Returns:
    bool [b, s]: True at each row's ``answer_pos_b``, or (continuation) at each ``cont.pos_bt`` whose token has a
    non-zero weight in some choice.
  """
  b, s = batch.tokens_bs.shape
  if batch.cont is None:
    return jax.nn.one_hot(batch.answer_pos_b, s, dtype=bool)
  used_bt = jnp.sum(batch.cont.weight_btc != 0, axis=-1) > 0
  rows_bt = jnp.broadcast_to(jnp.arange(b)[:, None], used_bt.shape)
  return jnp.zeros((b, s), bool).at[rows_bt, batch.cont.pos_bt].max(used_bt)


def nll_and_correct(f_bc, labels_b):
  """(mean negative log-likelihood, number correct) of logits f [b, C] for labels [b].

  Args:
    f_bc: [b, C] class logits (unnormalised; log-softmaxed here).
    labels_b: int [b] the correct classes.

  Returns:
    (nll, correct): the scalar mean NLL over the b examples (nats), and the scalar int count of examples whose
    argmax logit is the label.
  """
  logp_bc = jax.nn.log_softmax(f_bc)
  nll_b = -jnp.take_along_axis(logp_bc, labels_b[:, None], 1)[:, 0]
  return jnp.mean(nll_b), jnp.sum(jnp.argmax(f_bc, -1) == labels_b)


# --- class probabilities of Gaussian logits --------------------------------------------------------------


def probit(f_mean_bc, f_cov_bcc):
  """laplace-torch's probit: ``softmax(f / sqrt(1 + pi/8 diag cov))``. Not shift-invariant: adding one
  number to every logit (a softmax leaves p unchanged) changes it, and variance common to all classes
  flattens it; prefer ``probit_pairwise`` unless matching laplace-torch.

  Args:
    f_mean_bc: [b, C] the logits' mean.
    f_cov_bcc: [b, C, C] the logits' covariance; only its diagonal is used.

  Returns:
    p [b, C] class probabilities (rows sum to one).
  """
  var_bc = jnp.diagonal(f_cov_bcc, axis1=-2, axis2=-1)
  return jax.nn.softmax(f_mean_bc / jnp.sqrt(1.0 + jnp.pi / 8.0 * var_bc), axis=-1)


def _contrast_variance(f_cov_bcc):
  """[b, c, k] Var(f_c - f_k) = cov_cc + cov_kk - 2 cov_ck (>= 0)."""
  var_bc = jnp.diagonal(f_cov_bcc, axis1=-2, axis2=-1)
  return jnp.maximum(var_bc[:, :, None] + var_bc[:, None, :] - 2.0 * f_cov_bcc, 0.0)


def probit_pairwise(f_mean_bc, f_cov_bcc):
  """Mean-field softmax on pairwise contrasts (Lu, Ie & Sha 2020, "mean-field 2" with the full
  covariance): ``p_c ∝ 1 / sum_k exp(-(f_c - f_k) / sqrt(1 + pi/8 Var(f_c - f_k)))``, renormalised.
  Shift-invariant, exact without variance, and for two classes MacKay's probit of the logit difference.

  Args:
    f_mean_bc: [b, C] the logits' mean.
    f_cov_bcc: [b, C, C] the logits' full covariance (through ``Var(f_c - f_k)``, clipped at 0).

  Returns:
    p [b, C] class probabilities (rows sum to one).
  """
  d_bck = f_mean_bc[:, :, None] - f_mean_bc[:, None, :]
  log_p_bc = -jax.nn.logsumexp(-d_bck / jnp.sqrt(1.0 + jnp.pi / 8.0 * _contrast_variance(f_cov_bcc)), axis=-1)
  return jax.nn.softmax(log_p_bc, axis=-1)


def gaussian_logit_samples(f_mean_bc, f_cov_bcc, key, num_samples: int):
  """[n, b, c] draws of N(f*, Sigma_f) (symmetric PSD square root: robust to singular Sigma_f).

  Args:
    f_mean_bc: [b, C] the mean f*.
    f_cov_bcc: [b, C, C] the symmetric covariance Sigma_f (negative eigenvalues are clipped to 0).
    key: the PRNG key of the draws.
    num_samples: n, the number of draws.

  Returns:
    [n, b, C] logit draws, in ``f_mean_bc``'s dtype.
  """
  eig_bc, vec_bcc = jnp.linalg.eigh(f_cov_bcc)
  root_bcc = vec_bcc * jnp.sqrt(jnp.maximum(eig_bc, 0))[:, None, :]
  z_nbc = jax.random.normal(key, (num_samples,) + f_mean_bc.shape, f_mean_bc.dtype)
  return f_mean_bc + jnp.einsum("bij,nbj->nbi", root_bcc, z_nbc)


def mc_softmax(f_mean_bc, f_cov_bcc, key, num_samples: int = 1000):
  """Monte-Carlo ``E softmax(f)``, f ~ N(f_mean, f_cov): the mean softmax of seeded draws
  (``gaussian_logit_samples``).

  Args:
    f_mean_bc: [b, C] the logits' mean.
    f_cov_bcc: [b, C, C] the logits' covariance (symmetric PSD).
    key: the PRNG key of the draws.
    num_samples: the number of draws.

  Returns:
    p [b, C] class probabilities (rows sum to one).
  """
  return jnp.mean(jax.nn.softmax(gaussian_logit_samples(f_mean_bc, f_cov_bcc, key, num_samples), -1), 0)


def class_probs(f_mean_bc, f_cov_bcc, link: str = DEFAULT_LINK, key: jax.Array | None = None,
                num_samples: int = 1000) -> jax.Array:
  """p [b, C] = E softmax(f), f ~ N(f_mean [b, C], f_cov [b, C, C]); ``link``: one of ``LINKS`` (the
  probits are closed forms; mc is seeded by ``key``, default key 0).

  Args:
    f_mean_bc: [b, C] the logits' mean.
    f_cov_bcc: [b, C, C] the logits' covariance.
    link: ``"probit_pairwise"`` (``probit_pairwise``), ``"probit"`` (``probit``) or ``"mc"`` (``mc_softmax``);
      ValueError otherwise.
    key: the PRNG key of the mc draws (None: ``jax.random.key(0)``); unused by the probits.
    num_samples: the number of mc draws; unused by the probits.

  Returns:
    p [b, C] class probabilities (rows sum to one).
  """
  closed = {"probit_pairwise": probit_pairwise, "probit": probit}
  if link in closed:
    return closed[link](f_mean_bc, f_cov_bcc)
  if link != "mc":
    raise ValueError(f"link={link!r}: expected one of {LINKS}")
  return mc_softmax(f_mean_bc, f_cov_bcc, jax.random.key(0) if key is None else key, num_samples)


# --- the frozen prefix, computed once -------------------------------------------------------------------


def prefix_states(params, task: Task, batches: Sequence[Batch], start: int, progress: bool = True) -> list:
  """Each batch's input states of layer ``start`` (the frozen prefix run once; from the batches' own cached
  states when the task already starts at a lower layer).

  Args:
    params: the model's parameter tree (those of the layers < ``start`` are used).
    task: the task; its ``cfg`` and ``start_layer`` are used, its ``routing`` is not (every layer routes
      deterministically here).
    batches: the batches to cache; they carry ``states_bsd`` exactly when ``task.start_layer`` > 0.
    start: the layer whose input states are computed, ``task.start_layer <= start <= cfg.num_layers``
      (ValueError otherwise).
    progress: whether to show a progress bar.

  Returns:
    One [b, s, d] array per batch, in order: the input states of layer ``start`` (computed, not queued).
  """
  from tqdm.auto import tqdm

  from bmoe_jax.model import prefix_states as model_prefix

  if start < task.start_layer:
    raise ValueError(f"the task starts at layer {task.start_layer}: cannot cache the lower layer {start}")
  plan = task.routing
  sampled = [l for l in range(task.start_layer, start)
             if plan is not None and plan.router(l) is not None and plan.router(l).kind != "deterministic"]
  if sampled:  # before any work: the cache runs the prefix with the deterministic routers
    raise ValueError(f"layers {sampled} run {plan.router(sampled[0]).kind} routers, below the cache's layer {start}: "
                     f"a cached prefix would route them deterministically; cache below layer {sampled[0] + 1}")
  cfg = task.cfg
  plain = dataclasses.replace(task, routing=None)
  fn = jax.jit(lambda p, b: model_prefix(p, cfg, b.tokens_bs, b.mask_bs, stop_layer=start, **plain.forward_kw(b)))
  states = [fn(params, b) for b in tqdm(batches, desc=f"cache layers <{start}", disable=not progress, leave=False)]
  return jax.block_until_ready(states)  # done here, not queued ahead of the next stage's work


def with_prefix(params, task: Task, batch_lists: Sequence[Sequence[Batch]], start: int,
                progress: bool = True) -> tuple[Task, tuple[list[Batch], ...]]:
  """(task starting at layer ``start``, the batch lists with their layer-``start`` inputs attached).
  ``start`` equal to the task's own start returns everything unchanged; a task that already starts at a lower
  layer caches from its batches' states. Every call on the results then skips layers < start, which
  must be frozen (the cache holds ``params``' prefix).

  Args:
    params: the model's parameter tree (those of the layers < ``start`` are cached).
    task: the task; routers (``task.routing``) must lie in layers >= ``start`` (ValueError otherwise).
    batch_lists: lists of batches (e.g. train and evaluation sets), each matching the task's own cache.
    start: the layer the returned task starts at, >= ``task.start_layer`` (ValueError when lower); equal:
      nothing is computed.
    progress: whether to show a progress bar.

  Returns:
    (task, lists): the task with ``start_layer=start``, and a tuple with one list per entry of ``batch_lists``,
    each batch carrying ``states_bsd`` [b, s, d], the input states of layer ``start``.
  """
  if start == task.start_layer:
    return task, tuple(list(bl) for bl in batch_lists)
  out = tuple([b._replace(states_bsd=s) for b, s in zip(bl, prefix_states(params, task, bl, start, progress))]
              for bl in batch_lists)
  return dataclasses.replace(task, start_layer=start), out


def same_prefix(params_a, params_b, start: int) -> bool:
  """Whether two parameter trees agree below layer ``start`` (embedding and layers < start): then a prefix
  cached with one serves the other.

  Args:
    params_a: a parameter tree (``{"embed": ..., "layers": [...], ...}``).
    params_b: another parameter tree of the same structure.
    start: the number of bottom layers compared (0: the embedding only).

  Returns:
    True when every leaf of ``params["embed"]`` and ``params["layers"][:start]`` is exactly equal in both.
  """
  pick = lambda p: (p["embed"], p["layers"][:start])
  a_tree, b_tree = pick(params_a), pick(params_b)
  if jax.tree.structure(a_tree) != jax.tree.structure(b_tree):
    return False
  return all(a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))
