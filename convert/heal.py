"""Healing a carved MoE: its carved layers trained to reproduce the dense model they were cut from.

Carving (``convert.carve``) splits each chosen FFN into a shared expert and routed experts with unit gates
and a least-squares router; the MoE then loses quality and its routing is not learned. LLaMA-MoE and
MoEfication continue training after the split; so does this module:

1. **Gates that learn.** The carve is rewritten as a Qwen2-MoE (``heal_math.softmax_gated``: softmax top-k
   gates renormalised over the k, a sigmoid-gated shared expert) that starts at nearly the same function.
2. **Layer-wise phase** (``heal_layerwise_epochs``): every carved layer alone, on the dense model's own
   MLP inputs, matches the dense FFN's output (normalised squared error, as CMoE fits its routers); all
   carved layers at once (``vmap`` over their stacked parameters), no LM head.
3. **End-to-end phase** (``heal_epochs``): the carved layers (from the cached input of the lowest one up)
   and the head, loss ``KL(dense || carved)`` per token on the teacher's top-k tokens plus a bucket
   (``heal_math.topk_kl``).

Both phases add ``heal_aux_coef`` times the Switch / Mixtral load-balancing loss of every carved layer.
Only the carved layers' MLPs train (routers, routed experts, shared expert and its gate); attention,
norms, embeddings and every other layer stay the dense model's. The data (``heal_data``) is computed once
and cached. The loop is resumable: orbax saves the MLPs and the optimizer state every
``heal_checkpoint_every`` steps, each epoch's window order is a seeded permutation, and a rerun continues
to the same weights. Validation (held-out windows of the text's tail): top-k KL, perplexity of the true
next tokens, and each layer's expert load.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmoe_jax import interrupt as INT
from bmoe_jax.config import MoEConfig
from convert import heal_math as HM
from convert.heal_data import HealData

FINGERPRINT_FILE = "heal_fingerprint.json"


class HealState(NamedTuple):
  step: int
  mlps: Any  # the carved layers' MLP parameters, stacked (``heal_math.stack_layers``)
  opt_state: Any


class Phase(NamedTuple):
  name: str  # "layerwise" | "end_to_end"
  first: int  # global step at which it starts
  steps: int


def phases(uc, n_windows: int) -> list[Phase]:
  per_epoch = n_windows // uc.heal_batch
  if per_epoch < 1:
    raise ValueError(f"heal: {n_windows} training windows make no batch of heal_batch={uc.heal_batch}")
  lw, e2e = uc.heal_layerwise_epochs * per_epoch, uc.heal_epochs * per_epoch
  return [Phase("layerwise", 0, lw), Phase("end_to_end", lw, e2e)]


def optimizer(uc, steps: int) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, uc.heal_lr, max(1, steps // 20), max(steps, 2),
                                             end_value=0.1 * uc.heal_lr)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))


def _aux(taps: dict, layer_ids, cfg: MoEConfig):
  """(mean load-balancing loss over the carved layers, [l, e] slot shares)."""
  got = [HM.load_balance(taps[i].router_logits_bse.reshape(-1, cfg.num_experts),
                         taps[i].expert_bsk.reshape(-1, cfg.num_experts_per_tok)) for i in layer_ids]
  return sum(a for a, _ in got) / len(got), jnp.stack([f for _, f in got])


def end_to_end_loss(mlps, params, cfg: MoEConfig, layer_ids, batch: HealData, aux_coef: float):
  """(KL + aux_coef * balance, (KL, balance)) of one batch, from the cached input of the lowest carved layer."""
  from bmoe_jax.model import forward

  out = forward(HM.with_layers(params, layer_ids, mlps), cfg, batch.tokens_ns, start_layer=min(layer_ids),
                states_bsd=batch.states_nsd, return_taps=True)
  v = out.logits.shape[-1]
  kl = jnp.mean(HM.topk_kl(batch.t_logp_nsk.reshape(-1, batch.t_logp_nsk.shape[-1]),
                           batch.t_idx_nsk.reshape(-1, batch.t_idx_nsk.shape[-1]),
                           jax.nn.log_softmax(out.logits.reshape(-1, v), -1)))
  aux, _ = _aux(out.taps, layer_ids, cfg)
  return kl + aux_coef * aux, (kl, aux)


def dense_targets(dense_params, dense_cfg: MoEConfig, layer_ids, batch: HealData):
  """([l, b, s, d] MLP inputs, [l, b, s, d] dense FFN outputs) of the carved layers in the dense model."""
  from bmoe_jax.model import mlp_inputs
  from bmoe_jax.nn.layers import gated_mlp

  xs = mlp_inputs(dense_params, dense_cfg, batch.tokens_ns, layers=tuple(layer_ids), start_layer=min(layer_ids),
                  states_bsd=batch.states_nsd)
  x_lbsd = jnp.stack([xs[i] for i in layer_ids])
  y_lbsd = jnp.stack([gated_mlp(dense_params["layers"][i]["mlp"], xs[i], dense_cfg.hidden_act) for i in layer_ids])
  return jax.lax.stop_gradient(x_lbsd), jax.lax.stop_gradient(y_lbsd)


def layerwise_loss(mlps, cfg: MoEConfig, x_lbsd, y_lbsd, aux_coef: float):
  """Mean over the carved layers of ||MoE(x) - FFN(x)||^2 / ||FFN(x)||^2 + aux_coef * balance."""
  from bmoe_jax.model import moe_block

  def one(mlp, x_bsd, y_bsd):
    got_bsd, tap = moe_block(mlp, cfg, x_bsd)
    err = jnp.sum(jnp.square(got_bsd - y_bsd)) / jnp.sum(jnp.square(y_bsd))
    aux, _ = HM.load_balance(tap.router_logits_bse.reshape(-1, cfg.num_experts),
                             tap.expert_bsk.reshape(-1, cfg.num_experts_per_tok))
    return err, aux

  err_l, aux_l = jax.vmap(one)(mlps, x_lbsd, y_lbsd)
  return jnp.mean(err_l) + aux_coef * jnp.mean(aux_l), (jnp.mean(err_l), jnp.mean(aux_l))


def make_steps(cfg, dense_cfg, layer_ids, uc, opt):
  """jit-compiled ``{phase: (mlps, opt_state, params, dense_params, batch) -> (mlps, opt_state, loss, aux)}``."""
  def update(loss_fn, mlps, opt_state, *args):
    (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(mlps, *args)
    upd, opt_state = opt.update(grads, opt_state, mlps)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return optax.apply_updates(mlps, upd), opt_state, jnp.where(finite, loss, jnp.nan), aux

  def e2e(mlps, opt_state, params, dense_params, batch):
    return update(lambda m: end_to_end_loss(m, params, cfg, layer_ids, batch, uc.heal_aux_coef), mlps, opt_state)

  def lw(mlps, opt_state, params, dense_params, batch):
    x, y = dense_targets(dense_params, dense_cfg, layer_ids, batch)
    return update(lambda m: layerwise_loss(m, cfg, x, y, uc.heal_aux_coef), mlps, opt_state)

  return {"layerwise": jax.jit(lw), "end_to_end": jax.jit(e2e)}


def make_eval(cfg: MoEConfig, layer_ids):
  """jit: (mlps, params, batch) -> (summed KL, summed next-token NLL, NLL count, [l, e] slot counts)."""
  from bmoe_jax.model import forward

  @jax.jit
  def fn(mlps, params, batch: HealData):
    out = forward(HM.with_layers(params, layer_ids, mlps), cfg, batch.tokens_ns, start_layer=min(layer_ids),
                  states_bsd=batch.states_nsd, return_taps=True)
    logp = jax.nn.log_softmax(out.logits, -1)
    k = batch.t_idx_nsk.shape[-1]
    kl = jnp.sum(HM.topk_kl(batch.t_logp_nsk.reshape(-1, k), batch.t_idx_nsk.reshape(-1, k),
                            logp.reshape(-1, logp.shape[-1])))
    nll = -jnp.sum(jnp.take_along_axis(logp[:, :-1], batch.tokens_ns[:, 1:, None], -1))
    counts = jnp.stack([jnp.sum(jax.nn.one_hot(out.taps[i].expert_bsk, cfg.num_experts), axis=(0, 1, 2))
                        for i in layer_ids])
    return kl, nll, batch.tokens_ns[:, 1:].size, counts
  return fn


def evaluate(eval_fn, mlps, params, valid: HealData, batch: int, top_k: int) -> dict:
  kl = nll = count = 0.0
  counts = 0
  positions = 0
  for lo in range(0, len(valid.tokens_ns), batch):
    b = valid.take(slice(lo, lo + batch))
    got = eval_fn(mlps, params, b)
    kl, nll, count, counts = kl + float(got[0]), nll + float(got[1]), count + int(got[2]), counts + np.asarray(got[3])
    positions += b.tokens_ns.size
  shares = counts / counts.sum(1, keepdims=True)
  return {"valid_kl": kl / positions, "valid_ppl": float(np.exp(nll / count)),
          "load_evenness": [round(HM.load_evenness(f, top_k), 4) for f in shares],
          "load": np.round(shares, 4).tolist()}


def batch_rows(step_in_phase: int, n_windows: int, batch: int, seed: int, phase_index: int) -> np.ndarray:
  """The window rows of a phase's step: epoch e's order is a permutation seeded by (seed, phase, e)."""
  per_epoch = n_windows // batch
  epoch, pos = divmod(step_in_phase, per_epoch)
  perm = np.random.default_rng([seed, phase_index, epoch]).permutation(n_windows)
  return np.sort(perm[pos * batch:(pos + 1) * batch])


class _Loop(NamedTuple):
  """What every healing step needs (``heal``'s locals)."""
  params: dict  # the model in its softmax-gated form (its carved MLPs are replaced by the state's)
  dense_params: dict
  train: HealData
  valid: HealData
  uc: Any
  steps: dict  # {phase name: jitted step}
  opts: dict  # {phase name: optimizer}
  eval_fn: Any
  top_k: int
  run: Any  # ResumableRun or None


def heal(cfg: MoEConfig, params: dict, dense: tuple[MoEConfig, dict], data: dict[str, HealData], uc, *,
         work_dir: str | Path | None = None, fingerprint: dict | None = None,
         progress: bool = True) -> tuple[MoEConfig, dict, dict]:
  """Carved ``(cfg, params)`` -> healed ``(cfg, params, report)`` (module docstring). ``dense``: the dense
  model's (cfg, params); ``data``: {"train", "valid"} (``heal_data.cached``); ``uc``: an
  ``UpcycleConfig`` (its ``heal_*`` fields); ``work_dir``: where the resumable saves go (None: no saves),
  ``fingerprint``: what they must match on a rerun."""
  from tqdm.auto import tqdm

  from bmoe_jax.checkpoint import ResumableRun

  (dense_cfg, dense_params), layer_ids = dense, tuple(cfg.moe_layer_ids)
  train, valid = data["train"], data["valid"]
  x0 = dense_targets(dense_params, dense_cfg, layer_ids, train.take(slice(0, min(len(train.tokens_ns), 4))))[0]
  cfg, params = HM.softmax_gated(cfg, params, {i: np.asarray(x0[j]).reshape(-1, cfg.hidden_size)
                                                for j, i in enumerate(layer_ids)}, uc.heal_router_std)
  params = jax.tree.map(jnp.asarray, params)
  plan = phases(uc, len(train.tokens_ns))
  opts = {p.name: optimizer(uc, p.steps) for p in plan}
  run = None if work_dir is None else ResumableRun(work_dir, fingerprint or {}, keep=2,
                                                   fingerprint_file=FINGERPRINT_FILE)
  loop = _Loop(params, dense_params, train, valid, uc,
               {p.name: make_steps(cfg, dense_cfg, layer_ids, uc, opts[p.name])[p.name] for p in plan if p.steps},
               opts, make_eval(cfg, layer_ids), cfg.num_experts_per_tok, run)
  mlps0 = HM.stack_layers(params, layer_ids)
  state = HealState(0, mlps0, opts[next((p.name for p in plan if p.steps), plan[0].name)].init(mlps0))
  state, history, acc = _resume(run, state)
  t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
  if not history:
    _record(loop, state, history, "start", (0.0, 0), 0.0)
  bar = tqdm(total=sum(p.steps for p in plan), initial=state.step, desc="heal", unit="step", disable=not progress)
  try:
    with INT.safe_points():
      for index, phase in enumerate(plan):
        end = phase.first + phase.steps
        if state.step >= end:
          continue
        if state.step == phase.first and index:  # a fresh optimizer (and schedule) per phase
          state = state._replace(opt_state=opts[phase.name].init(state.mlps))
        while state.step < end:
          state, loss = _step(loop, state, phase, index)
          acc = (acc[0] + loss, acc[1] + 1)
          bar.update(1)
          bar.set_postfix(phase=phase.name, loss=f"{loss:.4f}", valid_ppl=f"{history[-1]['valid_ppl']:.2f}")
          if state.step % uc.heal_eval_every == 0 or state.step == end:
            _record(loop, state, history, phase.name, acc, time.perf_counter() - t0)
            acc = (0.0, 0)
          INT.save_point(run, state.step % uc.heal_checkpoint_every == 0 or state.step == end,
                         lambda: run.save(state.step, {"mlps": state.mlps, "opt": state.opt_state},
                                          {"history": history, "loss_since_eval": list(acc)}),
                         f"healing step {state.step}")
  finally:
    bar.close()
    if run is not None:
      run.close()
  healed = jax.tree.map(np.asarray, HM.with_layers(params, layer_ids, state.mlps))
  return cfg, healed, _report(plan, uc, train, valid, history)


def _report(plan, uc, train: HealData, valid: HealData, history: list) -> dict:
  """Healing's record: its phases, data sizes, the teacher's kept mass and perplexity, the validation curve."""
  return {"phases": [p._asdict() for p in plan], "tokens_per_step": uc.heal_batch * uc.heal_seq,
          "train_windows": int(len(train.tokens_ns)), "valid_windows": int(len(valid.tokens_ns)),
          "teacher_topk_mass": float(np.mean(np.exp(np.asarray(valid.t_logp_nsk)).sum(-1))),
          "dense_valid_ppl": float(np.exp(-np.mean(np.asarray(valid.t_next_ns)[:, :-1]))),
          "history": history}


def _resume(run, state: HealState):
  """(state, history, (loss sum, count) since the last validation) of the newest save, or the given start."""
  got = None if run is None else run.resume({"mlps": state.mlps, "opt": state.opt_state})
  if got is None:
    return state, [], (0.0, 0)
  step, tree, meta = got
  loss_sum, loss_n = meta.get("loss_since_eval", (0.0, 0))
  return HealState(step, tree["mlps"], tree["opt"]), list(meta.get("history", [])), (float(loss_sum), int(loss_n))


def _step(loop: _Loop, state: HealState, phase: Phase, index: int) -> tuple[HealState, float]:
  """One optimizer step of ``phase`` on its seeded batch; a non-finite loss or gradient stops the run."""
  from bmoe_jax.finite import NonFiniteError

  uc = loop.uc
  rows = batch_rows(state.step - phase.first, len(loop.train.tokens_ns), uc.heal_batch, uc.seed, index)
  batch = HealData(*(jnp.asarray(a) for a in loop.train.take(rows)))
  mlps, opt_state, loss, _ = loop.steps[phase.name](state.mlps, state.opt_state, loop.params, loop.dense_params,
                                                    batch)
  loss = float(loss)
  if not np.isfinite(loss):
    where = "" if loop.run is None else f" (the last finite save is kept in {loop.run.directory})"
    raise NonFiniteError(f"heal: the {phase.name} loss or a gradient is not finite at step {state.step + 1}; "
                         f"lower heal_lr={uc.heal_lr}{where}")
  return HealState(state.step + 1, mlps, opt_state), loss


def _record(loop: _Loop, state: HealState, history: list, phase: str, acc: tuple[float, int], seconds: float):
  """Append a validation record (``evaluate``) with the mean training loss since the last one."""
  ev = evaluate(loop.eval_fn, state.mlps, loop.params, loop.valid, loop.uc.heal_batch, loop.top_k)
  history.append({"step": state.step, "phase": phase, "tokens": state.step * loop.uc.heal_batch * loop.uc.heal_seq,
                  "train_loss": acc[0] / acc[1] if acc[1] else None, "seconds": round(seconds, 1), **ev})
