"""The user-facing loop: a resumable factor pass over a dataset, and posterior save/load (orbax).

  state = fit_factors(params, cfg, batches, class_ids, spec, checkpoint_dir="runs/kfac")
  post = posterior.build(kfac.finalize(state), params, num_sequences=int(state.num_sequences),
                         log_lik=state.log_lik)
  post, curve = posterior.optimize_prior_precision(post, "layer")
  pred = predictive.predict(post, params, cfg, test_batch, class_ids)
  save_posterior("runs/posterior", post); post = load_posterior("runs/posterior")
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace.posterior import Posterior

POSTERIOR_FORMAT = "bmoe_jax/posterior-v2"  # v2: keyed by block ("3.routed", "3.shared")


def _state_tree(state: kfac.FactorState) -> dict:
  return {"stats": {str(l): s._asdict() for l, s in state.stats.items()},
          "num_sequences": state.num_sequences, "log_lik": state.log_lik}


def _tree_state(tree: dict, like: kfac.FactorState) -> kfac.FactorState:
  stats = {blk: type(s)(**{k: jnp.asarray(v) for k, v in tree["stats"][str(blk)].items()})
           for blk, s in like.stats.items()}
  return kfac.FactorState(stats, jnp.asarray(tree["num_sequences"]), jnp.asarray(tree["log_lik"]))


def fit_factors(params, cfg: MoEConfig, batches: Iterable[kfac.Batch], class_ids_c, spec: kfac.FactorSpec,
                *, key: jax.Array | None = None, checkpoint_dir: str | Path | None = None,
                checkpoint_every: int = 50, progress: bool = True, total: int | None = None,
                mesh=None, **forward_kw) -> kfac.FactorState:
  """One pass over ``batches`` accumulating every expert's factors (``kfac.update``, jitted).

  With ``checkpoint_dir`` the state is saved (orbax) every ``checkpoint_every`` batches and at the end;
  a rerun with the same directory restores the latest save and skips the batches it already holds, so an
  interrupted pass resumes to the same result. ``batches`` must then be deterministic (same order).
  ``labels="mc"`` draws batch i's labels from ``fold_in(key, i)``: resumed runs draw the same labels.
  ``mesh``: the statistics live split on its expert axis (pass params and batches placed on it).
  """
  if spec.labels == "mc" and key is None:
    raise ValueError("FactorSpec(labels='mc') needs key=")
  from bmoe_jax.xla_cpu import warn_if_broken
  warn_if_broken()
  state = kfac.init(cfg, spec)
  jit_kw = {}
  if mesh is not None:  # statistics split on the expert axis (bmoe_jax.sharded.factor_shardings)
    from bmoe_jax.sharded import factor_shardings
    jit_kw["out_shardings"] = factor_shardings(cfg, mesh, spec)
    state = jax.device_put(state, jit_kw["out_shardings"])
  step = jax.jit(functools.partial(kfac.update, cfg=cfg, spec=spec, **forward_kw), **jit_kw)
  done = 0
  mngr = None
  if checkpoint_dir is not None:
    import orbax.checkpoint as ocp

    directory = Path(checkpoint_dir).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"spec": {"layers": list(spec.layers), "labels": spec.labels, "tokens": spec.tokens,
                     "rank": spec.rank, "shared": spec.shared}, "config": cfg.to_dict()}
    meta_file = directory / "factor_pass.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) != json.loads(json.dumps(meta)):
      raise ValueError(f"{meta_file}: the checkpoints there are of a different FactorSpec or model "
                       f"config; expected {meta['spec']}. Use a new checkpoint_dir.")
    meta_file.write_text(json.dumps(meta, indent=2))
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    latest = mngr.latest_step()
    if latest is not None:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
      state = _tree_state(mngr.restore(latest, args=ocp.args.StandardRestore(abstract)), state)
      done = latest

  def save(i):
    if mngr is not None and mngr.latest_step() != i:
      import orbax.checkpoint as ocp
      mngr.save(i, args=ocp.args.StandardSave(_state_tree(state)))
      mngr.wait_until_finished()

  from tqdm.auto import tqdm

  bar = tqdm(total=total, initial=done, desc="K-FAC factors", unit="batch", disable=not progress)
  i = 0
  try:
    for i, batch in enumerate(batches, start=1):
      if i <= done:
        continue
      sub = None if key is None else jax.random.fold_in(key, i - 1)
      state = step(state, params, batch=batch, class_ids_c=class_ids_c, key=sub)
      bar.update(1)
      if i % checkpoint_every == 0:
        save(i)
    if i < done:
      raise ValueError(f"{checkpoint_dir} holds a pass over {done} batches but the data has only {i}")
    save(max(i, done))
  finally:
    bar.close()
    if mngr is not None:
      mngr.close()
  return state


def _posterior_tree(post: Posterior) -> dict:
  return {"factors": {str(l): f._asdict() for l, f in post.factors.items()},
          "w_map": {str(l): w for l, w in post.w_map.items()},
          "sq_dist_e": {str(l): v for l, v in post.sq_dist_e.items()},
          "log_prior_prec_e": {str(l): v for l, v in post.log_prior_prec_e.items()},
          "scale": post.scale, "log_lik": post.log_lik}


def save_posterior(path: str | Path, post: Posterior, metadata: dict | None = None) -> Path:
  """Write the posterior (orbax) and ``posterior.json`` (format, layers, ranks, prior precisions)."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if (path / "state").exists():
    raise FileExistsError(f"{path / 'state'} already exists; choose an empty directory")
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "state", _posterior_tree(post))
    ckptr.wait_until_finished()
  meta = {"format": POSTERIOR_FORMAT, "blocks": [str(b) for b in sorted(post.factors)],
          "rank": {str(l): [int(f.a_vec_eff.shape[-1]), int(f.g_vec_edd.shape[-1])] for l, f in post.factors.items()},
          "prior_precision": {str(l): np.exp(np.asarray(v, np.float64)).tolist()
                              for l, v in post.log_prior_prec_e.items()},
          "scale": float(post.scale), "metadata": metadata or {}}
  (path / "posterior.json").write_text(json.dumps(meta, indent=2))
  return path


def load_posterior(path: str | Path) -> Posterior:
  path = Path(path).absolute()
  meta_file = path / "posterior.json"
  if not meta_file.exists():
    raise FileNotFoundError(f"{meta_file} not found: not a directory written by save_posterior")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != POSTERIOR_FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {POSTERIOR_FORMAT!r}")
  from bmoe_jax.checkpoint import restore_local
  tree = restore_local(path / "state")
  keyed = lambda d, fn=jnp.asarray: {kfac.as_block(k): fn(v) for k, v in d.items()}
  factors = keyed(tree["factors"], lambda v: kfac.Factors(**{k: jnp.asarray(x) for k, x in v.items()}))
  return Posterior(factors, keyed(tree["w_map"]), keyed(tree["sq_dist_e"]), keyed(tree["log_prior_prec_e"]),
                   jnp.asarray(tree["scale"]), jnp.asarray(tree["log_lik"]))

