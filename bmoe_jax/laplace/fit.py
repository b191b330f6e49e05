"""The user-facing loop: a resumable factor pass over a dataset, and posterior save/load (orbax).

  task = Task(cfg, class_ids)
  state = fit_factors(params, task, batches, spec, checkpoint_dir="runs/kfac")
  factors = kfac.finalize(state)
  post = posterior.build(factors, read_blocks(params, factors), prior_mean=read_blocks(pretrained, factors),
                         num_sequences=int(state.num_sequences), log_lik=state.log_lik)
  post, curve = posterior.optimize_prior_precision(post, "layer")
  pred = predictive.predict(post, params, task, test_batch)
  save_posterior("runs/posterior", post); post = load_posterior("runs/posterior")
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bmoe_jax import interrupt as INT
from bmoe_jax.checkpoint import ResumableRun
from bmoe_jax.files import begin_artefact, incomplete, read_json, write_json
from bmoe_jax.finite import NonFiniteError, nonfinite_leaves
from bmoe_jax.identity import DataDigest, task_identity, tree_digest
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace.posterior import Posterior
from bmoe_jax.params import read_block
from bmoe_jax.task import Batch, Task

POSTERIOR_FORMAT = "bmoe_jax/posterior-v2"  # v2: keyed by block ("3.routed", "3.shared")


def _state_tree(state: kfac.FactorState) -> dict:
  return {"stats": {str(l): s._asdict() for l, s in state.stats.items()},
          "num_sequences": state.num_sequences, "log_lik": state.log_lik}


def _tree_state(tree: dict, like: kfac.FactorState) -> kfac.FactorState:
  stats = {blk: type(s)(**{k: jnp.asarray(v) for k, v in tree["stats"][str(blk)].items()})
           for blk, s in like.stats.items()}
  return kfac.FactorState(stats, jnp.asarray(tree["num_sequences"]), jnp.asarray(tree["log_lik"]))


def factor_dtype(params, spec: kfac.FactorSpec):
  """The accumulation dtype of a factor pass: the Bayesian weights' dtype, at least float32 (float64
  parameters under ``jax_enable_x64`` give float64 factors and evidence).

  Args:
    params: the model's parameters.
    spec: the factor pass (the weights of its first block are read).

  Returns:
    The promotion of that block's weight dtype and float32.
  """
  w = read_block(params, spec.blocks[0])
  return jnp.promote_types(w.dtype, jnp.float32)


def spec_fingerprint(spec: kfac.FactorSpec) -> dict:
  """The spec as a factor pass's fingerprint. The block switches added with the Laplace router (``router``,
  ``experts``) are left out at their defaults: they then compute what a pass from before them computed, which
  must resume.

  Args:
    spec: the factor pass.

  Returns:
    ``dataclasses.asdict(spec)`` without ``router`` / ``experts`` where they are at their defaults.
  """
  d = dataclasses.asdict(spec)
  defaults = {"router": False, "experts": True}
  return {k: v for k, v in d.items() if not (k in defaults and v == defaults[k])}


def _jitted_update(task: Task, spec: kfac.FactorSpec, dtype, mesh):
  """(``kfac.update`` jitted for this pass, freed with it; the initial state), the statistics split on the mesh's
  expert axis when one is given (``bmoe_jax.sharded.factor_shardings``)."""
  state = kfac.init(task.cfg, spec, dtype)
  jit_kw = {}
  if mesh is not None:
    from bmoe_jax.sharded import factor_shardings
    jit_kw["out_shardings"] = factor_shardings(task.cfg, mesh, spec, dtype)
    state = jax.device_put(state, jit_kw["out_shardings"])
  return jax.jit(functools.partial(kfac.update, task=task, spec=spec), **jit_kw), state


def fit_factors(params, task: Task, batches: Iterable[Batch], spec: kfac.FactorSpec, *,
                key: jax.Array | None = None, checkpoint_dir: str | Path | None = None,
                checkpoint_every: int = 50, progress: bool = True, total: int | None = None,
                mesh=None) -> kfac.FactorState:
  """One pass over ``batches`` accumulating every expert's factors (``kfac.update``, jitted).

  A rerun with the same ``checkpoint_dir`` restores the latest save and skips the batches it already holds, so
  an interrupted pass resumes to the same result; it refuses a directory saved with another fingerprint (spec,
  task, dtype, config, model weights, key) or other data.

  Args:
    params: the model's parameters (the MAP).
    task: the scored output (``bmoe_jax.task.Task``).
    batches: the fit data, one ``Batch`` at a time; with ``checkpoint_dir`` it must be deterministic (same
      batches in the same order).
    spec: the factor pass.
    key: PRNG key of ``labels="mc"`` (required there): batch i (0-based) draws its labels from
      ``fold_in(key, i)``, so resumed runs draw the same labels. None for the other label modes.
    checkpoint_dir: where the state is saved (orbax, ``checkpoint.ResumableRun``) and resumed from; None: no
      saves.
    checkpoint_every: save every this many batches (and at the end).
    progress: show a tqdm progress bar.
    total: the number of batches, for the progress bar only.
    mesh: a device mesh: the statistics live split on its expert axis (pass params and batches placed on it);
      None: no sharding.

  Returns:
    The final ``kfac.FactorState`` (for ``kfac.finalize``). Raises ``NonFiniteError`` on non-finite statistics
    and ``ValueError`` when a checkpoint holds more batches than ``batches`` or was taken on other data.
  """
  if spec.labels == "mc" and key is None:
    raise ValueError("FactorSpec(labels='mc') needs key=")
  dtype = factor_dtype(params, spec)
  step, state = _jitted_update(task, spec, dtype, mesh)
  run, done, saved_meta, state = _open_run(checkpoint_dir, _fingerprint(params, task, spec, dtype, key), state)
  bar = tqdm(total=total, initial=done, desc="K-FAC factors", unit="batch", disable=not progress)
  i, seen = 0, DataDigest()
  try:
    with INT.safe_points():
      for i, batch in enumerate(batches, start=1):
        if run is not None:
          seen.update(batch)
        if i == done:
          _check_same_data(checkpoint_dir, saved_meta, seen.value())
        if i <= done:
          continue
        sub = None if key is None else jax.random.fold_in(key, i - 1)
        state = step(state, params, batch=batch, key=sub)
        bar.update(1)
        INT.save_point(run, i % checkpoint_every == 0, lambda: _save(run, i, state, seen), f"factor-pass batch {i}")
      if i < done:
        raise ValueError(f"{checkpoint_dir} holds a pass over {done} batches but the data has only {i}")
      _check_finite(state, max(i, done))
      if run is not None:
        _save(run, max(i, done), state, seen)
  finally:
    bar.close()
    if run is not None:
      run.close()
  return state


def _open_run(checkpoint_dir, fingerprint: dict, state: kfac.FactorState):
  """(run or None, batches done, the save's meta, state) of a factor pass: resumed from ``checkpoint_dir``'s
  latest save, or fresh."""
  if checkpoint_dir is None:
    return None, 0, {}, state
  run = ResumableRun(checkpoint_dir, fingerprint, keep=2, fingerprint_file="factor_pass.json")
  got = run.resume(_state_tree(state))
  if got is None:
    return run, 0, {}, state
  done, tree, saved_meta = got
  return run, done, saved_meta, _tree_state(tree, state)


def _save(run: ResumableRun, i: int, state: kfac.FactorState, seen: DataDigest) -> None:
  """Save the statistics after batch ``i`` (only finite ones: a non-finite pass stops, naming the batch)."""
  _check_finite(state, i)
  run.save(i, _state_tree(state), {"data": seen.value()})


def _fingerprint(params, task: Task, spec: kfac.FactorSpec, dtype, key) -> dict:
  """What determines a factor pass besides its data (checked batch by batch on resume): spec, task, dtype,
  config, the model's weights and the MC-label key."""
  return {"spec": spec_fingerprint(spec), "task": task_identity(task),
          "dtype": str(dtype), "config": task.cfg.to_dict(), "model": tree_digest(params),
          "key": None if key is None else tree_digest(key)}


def _check_finite(state: kfac.FactorState, batches: int) -> None:
  """Non-finite statistics name the lowest block holding them (a NaN propagates upwards from there)."""
  bad = sorted(blk for blk, st in state.stats.items() if nonfinite_leaves(st))
  if bad or not np.isfinite(np.asarray(state.log_lik)):
    where = f"first in block {bad[0]} ({len(bad)} blocks: {', '.join(map(str, bad[:6]))})" if bad else \
        "in the log-likelihood"
    raise NonFiniteError(f"K-FAC factor pass: non-finite statistics after {batches} batches, {where}: the model's "
                         "weights or activations hold NaN / inf at or below that layer; check the model")


def _check_same_data(checkpoint_dir, saved_meta: dict, seen: dict) -> None:
  """A resumed pass must continue over the data it started on: the first batches' digest (``identity``)
  equals the one saved with the checkpoint."""
  saved = saved_meta.get("data")
  if saved != seen:
    raise ValueError(f"{checkpoint_dir}: the saved factor pass covered {seen['batches']} batches of other data "
                     f"(saved {saved}, given {seen}); a resume would mix two datasets: use a new --out, or "
                     "delete the directory to start over")


def _posterior_tree(post: Posterior) -> dict:
  return {"factors": {str(l): f._asdict() for l, f in post.factors.items()},
          "w_map": {str(l): w for l, w in post.w_map.items()},
          "sq_dist_e": {str(l): v for l, v in post.sq_dist_e.items()},
          "log_prior_prec_e": {str(l): v for l, v in post.log_prior_prec_e.items()},
          "scale": post.scale, "log_lik": post.log_lik}


def save_posterior(path: str | Path, post: Posterior, metadata: dict | None = None, *,
                   overwrite: bool = False) -> Path:
  """Write the posterior (orbax ``state``) and then ``posterior.json`` (format, blocks, ranks, prior precisions,
  scale, digest, metadata), the record that makes it complete (``files.begin_artefact``: an interrupted save's
  parts are replaced).

  Args:
    path: the directory to write (created if needed).
    post: the posterior.
    metadata: JSON-serialisable extras stored under ``"metadata"`` (``bmoe fit`` records the model's digest as
      ``"model"``, which ``load_posterior`` checks); None: ``{}``.
    overwrite: replace a complete posterior already in ``path``; False: it raises ``FileExistsError``.

  Returns:
    The directory written, absolute.
  """
  import orbax.checkpoint as ocp

  path = begin_artefact(path, "posterior.json", ("state",), overwrite=overwrite)
  tree = jax.tree.map(jnp.asarray, _posterior_tree(post))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "state", tree)
    ckptr.wait_until_finished()
  meta = {"format": POSTERIOR_FORMAT, "blocks": [str(b) for b in sorted(post.factors)],
          "rank": {str(l): [int(f.a_vec_eff.shape[-1]), int(f.g_vec_edd.shape[-1])] for l, f in post.factors.items()},
          "prior_precision": {str(l): np.exp(np.asarray(v, np.float64)).tolist()
                              for l, v in post.log_prior_prec_e.items()},
          "scale": float(post.scale), "digest": tree_digest(tree), "metadata": metadata or {}}
  write_json(path / "posterior.json", meta)
  return path


def load_posterior(path: str | Path, params=None) -> Posterior:
  """The posterior saved in ``path``; with ``params`` (the model it is used with), refused unless it was fitted
  on that model (``check_model``).

  Args:
    path: a directory written by ``save_posterior``.
    params: the model's parameters to check the posterior against; None: no check.

  Returns:
    The ``Posterior``, keyed by ``Block``. Raises ``FileNotFoundError`` without ``posterior.json`` (an incomplete
    save), ``checkpoint.CorruptSaveError`` on a digest mismatch, ``ValueError`` on another format or (with
    ``params``) another model.
  """
  path = Path(path).absolute()
  meta_file = path / "posterior.json"
  if not meta_file.exists():
    raise FileNotFoundError(f"{meta_file} not found: not a directory written by save_posterior"
                            f"{incomplete(path, meta_file.name, ('state',))}")
  meta = read_json(meta_file)
  if meta.get("format") != POSTERIOR_FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {POSTERIOR_FORMAT!r}")
  from bmoe_jax.checkpoint import restore_local, verify_digest
  tree = restore_local(path / "state")
  verify_digest(tree, meta.get("digest"), path / "state", f"{meta_file.name}: digest")
  keyed = lambda d, fn=jnp.asarray: {kfac.as_block(k): fn(v) for k, v in d.items()}
  factors = keyed(tree["factors"], lambda v: kfac.Factors(**{k: jnp.asarray(x) for k, x in v.items()}))
  post = Posterior(factors, keyed(tree["w_map"]), keyed(tree["sq_dist_e"]), keyed(tree["log_prior_prec_e"]),
                   jnp.asarray(tree["scale"]), jnp.asarray(tree["log_lik"]))
  if params is not None:
    check_model(post, params, meta.get("metadata", {}).get("model"), where=str(path))
  return post


def check_model(post: Posterior, params, model_digest: str | None = None, where: str = "the posterior") -> None:
  """Refuse a posterior fitted on another model: its MAP weights must be the model's weights of every block,
  and, when recorded (``bmoe fit`` records it), the digest of the whole model (``identity.tree_digest``) must
  match. Raises ``ValueError`` otherwise.

  Args:
    post: the posterior (its ``w_map``).
    params: the model's parameters.
    model_digest: the recorded ``tree_digest`` of the fitted model's parameters; None: only the blocks are
      compared.
    where: how the posterior is named in the error message.
  """
  for blk, w in post.w_map.items():
    mine = read_block(params, blk)
    if mine.shape != w.shape or not np.array_equal(np.asarray(mine), np.asarray(w)):
      raise ValueError(f"{where} was fitted on another model: its MAP weights of {blk} differ from the model's "
                       f"(shapes {tuple(w.shape)} vs {tuple(mine.shape)}); fit it on this model (bmoe fit)")
  if model_digest is not None and tree_digest(params) != model_digest:
    raise ValueError(f"{where} was fitted on another model: the model's weights differ outside the Bayesian "
                     f"blocks (digest {tree_digest(params)}, recorded {model_digest}); fit it on this model")

