"""Training Bayesian routers on top of the MAP router, progressively from the last MoE layer backwards.

As in the thesis (stage 2b): the model, its experts and its MAP router weights ``W_r`` are frozen; each
chosen layer gets the router of a ``RouterConfig``, trained on the task's cross-entropy (the same
continuation / letter scoring as every other stage), one layer at a time from the top layer down, each
stage running the layers above it with their finished routers (in training mode: one sample per token).

What is trained, by kind:

* ``mfvr`` / ``fcvr``: the residual mean and variance networks; loss ``CE + (beta / batches) * sum over the
  batch's real tokens of KL`` (the thesis' ``beta / num_training_batches``, KL summed over tokens).
* ``vtsr``: the temperature network; loss ``CE + temp_reg * mean over tokens of -log T``.
* ``mcdr``: its own router weight (from ``W_r``) with dropout on the router input; loss CE.
* ``swag``: the router weight from ``W_r`` by SGD at a constant learning rate (momentum 0.9); a SWAG
  snapshot at the end of each ``1 / swag_rank`` of the run, ``swag_rank`` in all (``routing.swag``).
* ``ensemble`` (DER): ``router_members`` router weights, member m from ``W_r + N(0, (init_noise *
  std(W_r))^2)`` with seed m and its own batch order; loss CE. Member m of a lower layer trains under
  member m of the layers above.
* ``temperature`` / ``deterministic``: nothing.

Adam (optax) unless stated; every stage checkpoints with orbax every ``route_checkpoint_every`` steps
(``out/<layer>[.<member>]``) and a rerun resumes it, replaying the same batch order and PRNG keys (the key of
step t is ``fold_in(seed, t)``), so a resumed run ends where an uninterrupted one does. Deviation from the
thesis: its learning rate (1e-5, Adam, on a 3B model fine-tuned for 5-10 epochs of 5000 questions) leaves
freshly initialised routers almost untrained on a few hundred questions; ``route_lr`` defaults to 1e-3.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmoe_jax import interrupt as INT
from bmoe_jax.checkpoint import ResumableRun
from bmoe_jax.config import check_bounds
from bmoe_jax.identity import data_digest, task_identity, tree_digest
from bmoe_jax.routing import routers as R
from bmoe_jax.routing import swag as S
from bmoe_jax.routing.plan import RoutingPlan, attach
from bmoe_jax.task import Batch, Task, nll_and_correct

AMORTISED = ("mcdr", "mfvr", "fcvr", "vtsr")  # new parameters per layer (routers.init)
KERNEL = ("swag", "ensemble")  # the router weight itself, retrained


@dataclasses.dataclass(frozen=True)
class RouteTrainConfig:
  route_layers: str = "last:1"  # MoE layers given the router: last:N (the top N) or comma-separated ids
  route_lr: float = 1e-3  # Adam learning rate of the router networks (thesis 1e-5 on a 3B model)
  route_epochs: int = 5  # epochs per layer
  kl_beta: float = 0.01  # mfvr/fcvr: loss = CE + (kl_beta / batches) * sum over tokens of KL
  temp_reg: float = 1e-3  # vtsr: loss = CE + temp_reg * mean over tokens of -log T
  swag_lr: float = 0.01  # swag: constant SGD learning rate (momentum 0.9) of the collection run
  init_noise: float = 0.1  # ensemble: member init W_r + N(0, (init_noise * std(W_r))^2)
  route_checkpoint_every: int = 50  # steps between orbax saves of a stage
  seed: int = 0

  def __post_init__(self):
    check_bounds(self, {"route_lr": (0, None, True), "route_epochs": (1, None), "kl_beta": (0, None),
                        "temp_reg": (0, None), "swag_lr": (0, None, True), "init_noise": (0, None),
                        "route_checkpoint_every": (1, None)})


def parse_layers(cfg, spec: str) -> tuple[int, ...]:
  """The MoE layers of ``spec`` (``last:N``: the top N; or comma-separated ids), top layer first."""
  moe = list(cfg.moe_layer_ids)
  spec = str(spec).strip()
  if spec.startswith("last:"):
    n = int(spec[5:])
    if not 1 <= n <= len(moe):
      raise ValueError(f"route_layers={spec!r}: the model has {len(moe)} MoE layers")
    layers = moe[-n:]
  else:
    layers = [int(x) for x in spec.split(",") if x.strip()]
    bad = [l for l in layers if l not in moe]
    if bad or not layers:
      raise ValueError(f"route_layers={spec!r}: {bad or 'empty'} not MoE layers (MoE layers: {moe})")
  return tuple(sorted(set(layers), reverse=True))


class Stage(NamedTuple):
  """One optimisation run: trainable ``theta`` and how the model reads it."""
  name: str
  theta: Any
  loss: Callable  # (theta, params, batch, key) -> (loss, (ce, reg))
  opt: optax.GradientTransformation
  collect: Callable | None = None  # (extra, theta) -> extra, after the steps in collect_steps (SWAG)
  extra: Any = ()
  collect_steps: frozenset = frozenset()


def with_kernel(params, layer: int, w_de) -> dict:
  """``params`` with layer ``layer``'s router weight replaced."""
  layers = list(params["layers"])
  lp = dict(layers[layer])
  lp["mlp"] = {**lp["mlp"], "router": {**lp["mlp"]["router"], "kernel": w_de}}
  layers[layer] = lp
  return {**params, "layers": layers}


def _masked(aux_bs, mask_bs, reduce: str):
  m = mask_bs.astype(jnp.float32)
  total = jnp.sum(aux_bs * m)
  return total if reduce == "sum" else total / jnp.maximum(jnp.sum(m), 1.0)


def _objective(task: Task, rc: R.RouterConfig, done: dict, layer: int, rtc: RouteTrainConfig, num_batches: int,
               sample: int):
  """(theta, params, batch, key) -> (loss, (ce, reg)) of the stage training ``layer``'s router."""
  kernel_kind = rc.kind in KERNEL
  plan = RoutingPlan.of({**{l: rc for l in done}, **({} if kernel_kind else {layer: rc})}, train=True)
  t = dataclasses.replace(task, routing=plan if plan.layers else None)

  def loss(theta, params, batch: Batch, key):
    p = with_kernel(params, layer, theta) if kernel_kind else params
    p = attach(p, {**done, **({} if kernel_kind else {layer: theta})}, key=key, sample=sample)
    f_bc, taps = t.logits_and_taps(p, batch)
    ce, _ = nll_and_correct(f_bc, batch.labels_b)
    reg = jnp.zeros((), jnp.float32)
    if rc.kind in ("mfvr", "fcvr"):
      reg = rtc.kl_beta / num_batches * _masked(taps[layer].router_aux_bs, batch.mask_bs, "sum")
    elif rc.kind == "vtsr":
      reg = rtc.temp_reg * _masked(taps[layer].router_aux_bs, batch.mask_bs, "mean")
    return ce + reg, (ce, reg)
  return loss


def stages_of(params, task: Task, rc: R.RouterConfig, layer: int, done: dict, rtc: RouteTrainConfig,
              num_batches: int) -> list[Stage]:
  """The optimisation runs that train ``layer``'s router ``rc`` (several for an ensemble)."""
  w_de = jnp.asarray(params["layers"][layer]["mlp"]["router"]["kernel"], jnp.float32)
  key = jax.random.fold_in(jax.random.key(rtc.seed), layer)
  if rc.kind in AMORTISED:
    return [Stage(f"{layer}", R.init(rc, w_de, key), _objective(task, rc, done, layer, rtc, num_batches, 0),
                  optax.adam(rtc.route_lr))]
  if rc.kind == "swag":
    total = rtc.route_epochs * num_batches
    return [Stage(f"{layer}", w_de, _objective(task, rc, done, layer, rtc, num_batches, 0),
                  optax.sgd(rtc.swag_lr, momentum=0.9), collect=S.update, extra=S.init(w_de, rc.swag_rank),
                  collect_steps=frozenset(-(-j * total // rc.swag_rank) for j in range(1, rc.swag_rank + 1)))]
  if rc.kind == "ensemble":
    scale = rtc.init_noise * jnp.std(w_de)
    return [Stage(f"{layer}.{m}", w_de + scale * jax.random.normal(jax.random.fold_in(key, m), w_de.shape),
                  _objective(task, rc, done, layer, rtc, num_batches, m), optax.adam(rtc.route_lr))
            for m in range(rc.router_members)]
  return []


def router_params_of(rc: R.RouterConfig, results: list) -> dict:
  """A layer's router parameters from its stages' (theta, extra)."""
  if rc.kind in AMORTISED:
    return results[0][0]
  if rc.kind == "swag":
    return S.as_params(results[0][1])
  if rc.kind == "ensemble":
    return {"kernels": jnp.stack([theta for theta, _ in results])}
  return {}


def train_routers(params, task: Task, batches: Sequence[Batch], rc: R.RouterConfig, rtc: RouteTrainConfig, *,
                  out: str | Path | None = None,
                  progress: bool = True) -> tuple[RoutingPlan, dict[int, dict], list[dict]]:
  """(plan, {layer: router parameters}, history): router ``rc`` trained in ``rtc.route_layers``, top-down."""
  if not batches:
    raise ValueError("no training batches for the routers")
  layers = parse_layers(task.cfg, rtc.route_layers)
  low = [l for l in layers if l < task.start_layer]
  if low:
    raise ValueError(f"route_layers {low} lie below the cached prefix (layer {task.start_layer})")
  done: dict[int, dict] = {}
  history: list[dict] = []
  identity = {} if out is None else {"model": tree_digest(params), "data": data_digest(batches),
                                     "task": task_identity(task)}
  for layer in layers:
    results = []
    for stage in stages_of(params, task, rc, layer, done, rtc, len(batches)):
      run_dir = None if out is None else Path(out) / f"layer{stage.name}"
      fingerprint = {"router": dataclasses.asdict(rc), "route_train": dataclasses.asdict(rtc), "stage": stage.name,
                     "config": task.cfg.to_dict(), "done": sorted(done), **identity}
      theta, extra, hist = run_stage(stage, params, batches, rtc, run_dir, fingerprint, f"{rc.kind} layer", progress)
      results.append((theta, extra))
      history.extend({"stage": stage.name, **h} for h in hist)
    done[layer] = router_params_of(rc, results)
  return RoutingPlan.of({l: rc for l in layers}), done, history


class LoopState(NamedTuple):
  step: Any  # int: steps done
  theta: Any
  opt_state: Any
  extra: Any  # SWAG moments (or ())


def run_stage(stage: Stage, params, batches: Sequence[Batch], rtc: RouteTrainConfig, run_dir, fingerprint: dict,
              desc: str = "layer", progress: bool = True):
  """(theta, extra, history) after ``rtc.route_epochs`` epochs of ``stage``, resumable from ``run_dir``."""
  from tqdm.auto import tqdm

  total = rtc.route_epochs * len(batches)
  step_fn = jax.jit(_step_fn(stage))
  state = LoopState(0, stage.theta, stage.opt.init(stage.theta), stage.extra)
  history: list[dict] = []
  run = None if run_dir is None else ResumableRun(run_dir, fingerprint, keep=1, fingerprint_file="route_train.json")
  got = None if run is None else run.resume(_flat(state))
  losses = []  # (loss, ce, reg) of the epoch's steps so far: saved, so that a resumed epoch's mean is the same
  if got is not None:
    state, history = _unflat(state, got[1]), list(got[2].get("history", []))
    losses = [tuple(x) for x in got[2].get("epoch_losses", [])]
  bar = tqdm(total=total, initial=state.step, desc=f"route-train {desc} {stage.name}",
             unit="batch", disable=not progress)
  try:
    with INT.safe_points():
      while state.step < total:
        epoch, pos = divmod(state.step, len(batches))
        i = np.random.RandomState(rtc.seed + 7919 * _stage_seed(stage.name) + epoch).permutation(len(batches))[pos]
        key = jax.random.fold_in(jax.random.key(rtc.seed), state.step)
        theta, opt_state, loss, ce, reg = step_fn(state.theta, state.opt_state, params, batches[i], key)
        step = state.step + 1
        extra = stage.collect(state.extra, theta) if step in stage.collect_steps else state.extra
        state = LoopState(step, theta, opt_state, extra)
        losses.append((float(loss), float(ce), float(reg)))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")
        if step % len(batches) == 0:
          l, c, r = np.mean(losses, axis=0)
          history.append({"epoch": step // len(batches), "loss": float(l), "ce": float(c), "reg": float(r)})
          losses = []
        INT.save_point(run, step % rtc.route_checkpoint_every == 0 or step == total,
                       lambda: run.save(step, _flat(state), {"history": history,
                                                             "epoch_losses": [list(x) for x in losses]}),
                       f"router training ({stage.name}) step {step} of {total}")
  finally:
    bar.close()
    if run is not None:
      run.close()
  return state.theta, state.extra, history


def _stage_seed(name: str) -> int:
  return sum(int(x) * 1000 ** i for i, x in enumerate(name.split(".")))


def _step_fn(stage: Stage):
  def step(theta, opt_state, params, batch, key):
    (loss, (ce, reg)), grads = jax.value_and_grad(stage.loss, has_aux=True)(theta, params, batch, key)
    updates, opt_state = stage.opt.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss, ce, reg
  return step


def _flat(state: LoopState) -> dict:
  return {"step": np.asarray(state.step, np.int64), "theta": jax.tree.leaves(state.theta),
          "opt_state": jax.tree.leaves(state.opt_state), "extra": jax.tree.leaves(state.extra)}


def _unflat(like: LoopState, saved: dict) -> LoopState:
  unflat = lambda tree, leaves: jax.tree.unflatten(jax.tree.structure(tree), [jnp.asarray(x) for x in leaves])
  return LoopState(int(saved["step"]), unflat(like.theta, saved["theta"]), unflat(like.opt_state, saved["opt_state"]),
                   unflat(like.extra, saved["extra"]))
