"""MAP fine-tuning of a chosen parameter subset on multiple-choice batches (optax AdamW).

The objective per step is the mean answer-letter cross-entropy of the batch plus an L2 pull towards
the pretrained weights,  ``(prior_precision / (2 N)) * ||theta - theta_0||^2``  over the trainable
parameters (N = ``dataset_size``): the negative log posterior per example under the prior
``N(theta_0, I / prior_precision)``, the same prior the Laplace posterior uses (``prior_mean=
"pretrained"``). Only the trainable subset is differentiated, updated and checkpointed.

The loop is resumable: orbax saves the trainable weights, the optimizer state and the early-stopping
state every ``checkpoint_every`` steps; a rerun with the same directory restores the latest save and
replays the same batch order (the epoch's order is a seeded permutation), so it ends with the same
parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmoe_jax import interrupt as INT
from bmoe_jax.config import MoEConfig, check_bounds
from bmoe_jax.checkpoint import ResumableRun
from bmoe_jax.finite import NonFiniteError
from bmoe_jax.identity import data_digest, task_identity, tree_digest
from bmoe_jax.task import Batch, Task, nll_and_correct, with_prefix

SUBSETS = ("experts", "experts_router", "router", "attention", "all")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  trainable: str = "experts"  # experts | experts_router | router (MAP router tuning) | attention | all
  layers: tuple[int, ...] | None = None  # restrict to these layers (None: every layer)
  lr: float = 1e-4  # peak learning rate (AdamW)
  schedule: str = "cosine"  # cosine | linear | constant (after linear warm-up)
  warmup_steps: int = 0
  warmup_ratio: float = 0.0  # warm-up as a fraction of the optimizer steps, used when warmup_steps is 0
  weight_decay: float = 0.0  # AdamW's decoupled decay (towards zero); the prior below pulls to theta_0
  prior_precision: float = 0.0
  grad_accum: int = 1
  epochs: int = 1
  max_steps: int | None = None  # optimizer steps (after accumulation); None: epochs x batches
  eval_every: int = 0  # optimizer steps between validation NLLs (0: never)
  patience: int = 0  # stop after this many evaluations without improvement (0: never stop early)
  checkpoint_every: int = 50
  keep_checkpoints: int = 2  # the latest saves kept on disk (resume uses the last; a checkpoint ensemble all)
  seed: int = 0

  def __post_init__(self):
    if self.trainable not in SUBSETS:
      raise ValueError(f"trainable={self.trainable!r}: expected one of {SUBSETS}")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(f"schedule={self.schedule!r}: expected cosine, linear or constant")
    check_bounds(self, {"lr": (0, None, True), "warmup_steps": (0, None), "warmup_ratio": (0, 1),
                        "weight_decay": (0, None), "prior_precision": (0, None), "grad_accum": (1, None),
                        "epochs": (1, None), "max_steps": (1, None), "eval_every": (0, None), "patience": (0, None),
                        "checkpoint_every": (1, None), "keep_checkpoints": (1, None)})


def trainable_mask(params, cfg: MoEConfig, which: str, layers: Sequence[int] | None = None):
  """A tree of bools like ``params``: True for the leaves ``which`` selects (in ``layers``)."""
  chosen = set(range(cfg.num_layers) if layers is None else layers)
  bad = sorted(chosen - set(range(cfg.num_layers)))
  if bad:
    raise ValueError(f"layers {bad} do not exist (the model has {cfg.num_layers})")

  def pick(path, _):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if which == "all":
      return True
    if keys[0] != "layers" or keys[1] not in chosen:
      return False
    if which == "attention":
      return keys[2] in ("attn", "linear_attn")
    if keys[2] != "mlp" or not cfg.moe_layers[keys[1]]:
      return False
    if which == "router":
      return keys[3] == "router"
    return keys[3] == "experts" or (which == "experts_router" and keys[3] == "router")

  mask = jax.tree_util.tree_map_with_path(pick, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"trainable={which!r} with layers={layers} selects no parameters")
  return mask


def split(params, mask):
  """(trainable, frozen) trees with None where a leaf belongs to the other part."""
  train = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return train, frozen


def merge(train, frozen):
  return jax.tree.map(lambda t, f: f if t is None else t, train, frozen, is_leaf=lambda x: x is None)


def make_optimizer(tc: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
  decay = max(total_steps - warmup, 1)
  if tc.schedule == "cosine":
    main = optax.cosine_decay_schedule(tc.lr, decay)
  elif tc.schedule == "linear":
    main = optax.linear_schedule(tc.lr, 0.0, decay)
  else:
    main = optax.constant_schedule(tc.lr)
  sched = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), main], [warmup]) if warmup else main
  opt = optax.adamw(sched, weight_decay=tc.weight_decay)
  return optax.MultiSteps(opt, every_k_schedule=tc.grad_accum) if tc.grad_accum > 1 else opt


def batch_loss(params, task: Task, batch: Batch):
  """Mean cross-entropy of the answers (and the batch's correct count)."""
  return nll_and_correct(task.logits(params, batch), batch.labels_b)


class TrainState(NamedTuple):
  step: int  # micro-steps done (batches consumed)
  train: Any  # trainable leaves (None elsewhere)
  opt_state: Any
  best_nll: float
  best_train: Any
  bad_evals: int


class TrainResult(NamedTuple):
  params: Any  # the best (early stopping) or final parameters
  history: list[dict]
  state: TrainState


def evaluate_nll(params, task: Task, batches: Sequence[Batch], fwd=None) -> tuple[float, float]:
  """(mean NLL, accuracy) over batches (``fwd``: a jitted ``batch_loss`` to reuse)."""
  fwd = fwd or jax.jit(lambda p, b: batch_loss(p, task, b))
  tot, correct, n = 0.0, 0, 0
  for b in batches:
    loss, right = fwd(params, b)
    m = b.labels_b.shape[0]
    tot, correct, n = tot + float(loss) * m, correct + int(right), n + m
  return tot / max(n, 1), correct / max(n, 1)


def first_trainable_layer(mask) -> int:
  """The lowest layer with a trainable leaf (0 if the embedding trains; num_layers if only the head)."""
  if any(jax.tree.leaves(mask["embed"])):
    return 0
  layers = [i for i, lm in enumerate(mask["layers"]) if any(jax.tree.leaves(lm))]
  return min(layers) if layers else len(mask["layers"])


def make_train_step(task: Task, opt: optax.GradientTransformation, coef: float):
  """One optimizer update, a pure function ``(train, opt_state, batch, frozen, anchor) -> (train,
  opt_state, loss, right)``: cross-entropy plus ``coef * ||train - anchor||^2`` (jit it); ``loss`` is NaN when
  any gradient is not finite (a diverged step: do not keep its result). ``frozen`` and
  ``anchor`` are arguments, not closure constants: XLA would otherwise embed the frozen weights (most of
  the model) in the compiled step."""
  def objective(train, batch, frozen, anchor):
    loss, right = batch_loss(merge(train, frozen), task, batch)
    sq = sum(jnp.sum(jnp.square(t - a)) for t, a in zip(jax.tree.leaves(train), jax.tree.leaves(anchor)))
    return loss + coef * sq, (loss, right)

  def step(train, opt_state, batch, frozen, anchor):
    (_, (loss, right)), grads = jax.value_and_grad(objective, has_aux=True)(train, batch, frozen, anchor)
    updates, opt_state = opt.update(grads, opt_state, train)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return optax.apply_updates(train, updates), opt_state, jnp.where(finite, loss, jnp.nan), right
  return step


def _open_run(checkpoint_dir, tc: TrainConfig, task: Task, identity, state: TrainState):
  """(run or None, state, history, (loss sum, count) since the last evaluation) of a fine-tuning run: resumed
  from ``checkpoint_dir``'s latest save, or fresh."""
  if checkpoint_dir is None:
    return None, state, [], (0.0, 0)
  run = ResumableRun(checkpoint_dir, {**_fingerprint(tc, task.cfg), **identity}, keep=tc.keep_checkpoints,
                     fingerprint_file=FINGERPRINT_FILE)
  return (run, *_restore(run, state))


def finetune(params, task: Task, train_batches: Sequence[Batch], tc: TrainConfig, *,
             val_batches: Sequence[Batch] = (), dataset_size: int | None = None, pretrained=None,
             checkpoint_dir: str | Path | None = None, progress: bool = True,
             cache_prefix: bool = False) -> TrainResult:
  """Fine-tune ``tc.trainable`` on ``train_batches`` (see the module docstring).

  ``pretrained``: the anchor of the L2 prior (default ``params``). ``cache_prefix``: when nothing below
  layer L trains, run layers < L once per batch and train on their cached output (same result, each step
  then costs only the top layers; memory: one [b, s, d] array per batch)."""
  if not train_batches:
    raise ValueError("no training batches")
  mask = trainable_mask(params, task.cfg, tc.trainable, tc.layers)
  identity = None if checkpoint_dir is None else _identity(params, pretrained, task, train_batches, val_batches,
                                                         dataset_size)
  if cache_prefix and not task.start_layer:
    task, (train_batches, val_batches) = with_prefix(params, task, (train_batches, val_batches),
                                                     first_trainable_layer(mask), progress)
  train0, frozen = split(params, mask)
  anchor = split(pretrained if pretrained is not None else params, mask)[0]
  n_data = dataset_size or sum(int(b.labels_b.shape[0]) for b in train_batches)
  micro_total = _micro_steps(tc, len(train_batches))
  opt = make_optimizer(tc, micro_total // tc.grad_accum)
  step_fn = jax.jit(make_train_step(task, opt, tc.prior_precision / (2.0 * n_data)))
  fwd = jax.jit(lambda p, b: batch_loss(p, task, b))
  state = TrainState(0, train0, opt.init(train0), float("inf"), train0, 0)
  run, state, history, (loss_sum, loss_n) = _open_run(checkpoint_dir, tc, task, identity, state)
  from tqdm.auto import tqdm

  bar = tqdm(total=micro_total, initial=state.step, desc="fine-tune", unit="batch", disable=not progress)
  stopped = False
  try:
    with INT.safe_points():
      while state.step < micro_total and not stopped:
        epoch, pos = divmod(state.step, len(train_batches))
        i = np.random.RandomState(tc.seed + epoch).permutation(len(train_batches))[pos]
        train, opt_state, loss, _ = step_fn(state.train, state.opt_state, train_batches[i], frozen, anchor)
        _require_finite_loss(float(loss), state.step + 1, epoch, i, tc, run)
        state = state._replace(step=state.step + 1, train=train, opt_state=opt_state)
        loss_sum, loss_n = loss_sum + float(loss), loss_n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")
        opt_step = state.step // tc.grad_accum
        if state.step % tc.grad_accum == 0 and tc.eval_every and opt_step % tc.eval_every == 0 and val_batches:
          state, stopped, record = _validate(state, merge(state.train, frozen), task, val_batches, fwd, tc, run,
                                             (epoch, i), loss_sum / loss_n, len(train_batches))
          history.append(record)
          loss_sum, loss_n = 0.0, 0
        INT.save_point(run, state.step % tc.checkpoint_every == 0 or state.step == micro_total or stopped,
                       lambda: run.save(state.step, _tree(state), {"history": history,
                                                                   "loss_since_eval": [loss_sum, loss_n]}),
                       f"fine-tuning step {state.step} of {micro_total}")
  finally:
    bar.close()
    if run is not None:
      run.close()
  best = state.best_train if np.isfinite(state.best_nll) else state.train
  return TrainResult(merge(best, frozen), history, state)


def _micro_steps(tc: TrainConfig, n_batches: int) -> int:
  """Batches the run consumes: ``epochs`` passes, capped by ``max_steps`` optimizer steps."""
  total = tc.epochs * n_batches
  return total if tc.max_steps is None else min(total, tc.max_steps * tc.grad_accum)


def _validate(state: TrainState, params, task: Task, val_batches, fwd, tc: TrainConfig, run, where, train_loss: float,
              n_batches: int):
  """(state after early stopping's bookkeeping, stop now?, the history record) of one validation."""
  nll, acc = evaluate_nll(params, task, val_batches, fwd)
  _require_finite_loss(nll, state.step, *where, tc, run, "the validation NLL")
  record = {"step": state.step // tc.grad_accum, "epoch": round(state.step / n_batches, 3), "train_loss": train_loss,
            "val_nll": nll, "val_acc": acc}
  return (*_early_stopping(state, nll, tc.patience), record)


def _require_finite_loss(loss: float, step: int, epoch: int, batch: int, tc: TrainConfig, run: ResumableRun | None,
                         what: str = "the loss or a gradient") -> None:
  """A diverged step stops the run: ``NonFiniteError`` naming the step and the last (finite) save kept."""
  if np.isfinite(loss):
    return
  last = None if run is None else run.latest_step()
  kept = (f"the last finite save, step {last}, is kept in {run.directory}" if last is not None else
          "nothing was saved")
  raise NonFiniteError(f"fine-tuning diverged at step {step} (epoch {epoch}, batch {batch}): {what} is not "
                       f"finite, so no model is returned; {kept}. Lower --lr (now {tc.lr:g}) or check the data and "
                       "the starting weights")


def _early_stopping(state: TrainState, nll: float, patience: int) -> tuple[TrainState, bool]:
  if nll < state.best_nll:
    return state._replace(best_nll=nll, best_train=state.train, bad_evals=0), False
  state = state._replace(bad_evals=state.bad_evals + 1)
  return state, bool(patience) and state.bad_evals >= patience


FINGERPRINT_FILE = "finetune.json"


def _fingerprint(tc: TrainConfig, cfg: MoEConfig) -> dict:
  return {"train_config": dataclasses.asdict(tc), "config": cfg.to_dict()}


def _identity(params, pretrained, task: Task, train_batches, val_batches, dataset_size) -> dict:
  """What else determines a fine-tuning run's result: the starting weights, the prior's anchor, the data
  (digests, ``identity``), the scored classes and the dataset size of the prior's scale."""
  return {"model": tree_digest(params), "pretrained": None if pretrained is None else tree_digest(pretrained),
          "data": {"train": data_digest(train_batches), "val": data_digest(val_batches)},
          "task": task_identity(task), "dataset_size": dataset_size}


def _tree(state: TrainState) -> dict:
  """Flat leaves (the trees hold None for frozen parameters, which orbax does not store)."""
  return {"train": jax.tree.leaves(state.train), "opt_state": jax.tree.leaves(state.opt_state),
          "best_train": jax.tree.leaves(state.best_train),
          "scalars": {"step": np.asarray(state.step, np.int64), "best_nll": np.asarray(state.best_nll, np.float64),
                      "bad_evals": np.asarray(state.bad_evals, np.int64)}}


def _restore(run: ResumableRun, like: TrainState, step: int | None = None):
  """(state, history, (training-loss sum, count) since the last evaluation) of ``step`` (default: the newest
  readable save; ``like``, [] and zeros when there is none)."""
  if step is None:
    got = run.resume(_tree(like))
    if got is None:
      return like, [], (0.0, 0)
    _, st, meta = got
  else:
    st, meta = run.restore(_tree(like), step)
  sc = st["scalars"]
  unflat = lambda tree, leaves: jax.tree.unflatten(jax.tree.structure(tree), [jnp.asarray(x) for x in leaves])
  state = TrainState(int(sc["step"]), unflat(like.train, st["train"]), unflat(like.opt_state, st["opt_state"]),
                     float(sc["best_nll"]), unflat(like.best_train, st["best_train"]), int(sc["bad_evals"]))
  loss_sum, loss_n = meta.get("loss_since_eval", (0.0, 0))
  return state, list(meta.get("history", [])), (float(loss_sum), int(loss_n))


def load_checkpoints(checkpoint_dir: str | Path, params, cfg: MoEConfig,
                     steps: Sequence[int] | None = None) -> list[tuple[int, Any]]:
  """The saved steps of a fine-tuning run as full parameter trees: (step, params) for every kept step
  (or ``steps``), oldest first. The members of a checkpoint ensemble.

  The run's trainable leaves come from the checkpoints; the frozen ones from ``params`` (the model the
  run started from, or its result: they agree outside the trainable subset)."""
  from bmoe_jax.identity import upgrade

  directory = Path(checkpoint_dir).absolute()
  if not (directory / FINGERPRINT_FILE).exists():
    raise FileNotFoundError(f"{directory / FINGERPRINT_FILE} not found: expected the checkpoints directory of a "
                            "fine-tuning run (bmoe finetune --out RUN writes RUN/checkpoints)")
  with ResumableRun(directory, None, fingerprint_file=FINGERPRINT_FILE, read_only=True) as run:
    meta = json.loads(json.dumps(upgrade(run.fingerprint)))  # config fields added since: at their defaults
    if meta["config"] != json.loads(json.dumps(cfg.to_dict())):
      raise ValueError(f"{run.fingerprint_path}: the run fine-tuned a different model config than the one given")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    tc_dict = {k: v for k, v in meta["train_config"].items() if k in known}
    if tc_dict.get("layers") is not None:
      tc_dict["layers"] = tuple(tc_dict["layers"])
    tc = TrainConfig(**tc_dict)
    mask = trainable_mask(params, cfg, tc.trainable, tc.layers)
    train0, frozen = split(params, mask)
    like = TrainState(0, train0, jax.eval_shape(make_optimizer(tc, 1).init, train0), 0.0, train0, 0)
    saved = run.steps()
    steps = sorted(saved if steps is None else steps)
    missing = sorted(set(steps) - set(saved))
    if missing or not steps:
      raise ValueError(f"{directory}: steps {missing or steps} not saved (saved: {saved})")
    return [(step, merge(_restore(run, like, step)[0].train, frozen)) for step in steps]
