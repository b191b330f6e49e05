"""The cells of the papers' tables (PROTOCOL.md), each driving the pipeline's stages and each rerunnable alone:

* ``finetune_cell``: MAP on one dataset and seed (resumable; every epoch's save kept: both regimes and the
  checkpoint ensembles come from it);
* ``link_cell``: the link, chosen once by dev NLL (``protocol.LINK_CHOICE``);
* ``evaluate_cell``: one dataset, seed and regime: the registry's methods, the Bayesian-MoE variants (one
  factor pass) and their test (and shift) probabilities with epistemic scores, saved per method;
* ``ensemble_cell``: the deep ensemble of a dataset and regime (the seeds' models).

Every cell writes under ``WORK/<dataset>/`` and skips what is already there, so a stopped run restarts at the
first unfinished method; the report (``report.py``) reads only these files.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from bmoe_jax import baselines as BL
from bmoe_jax import laplace as LA
from bmoe_jax.evaluate import collect_scored, run_record
from bmoe_jax.files import read_json, write_json
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.configs import RunConfig
from bmoe_jax.pipeline.data import eval_key
from bmoe_jax.pipeline.methods import Context, build_methods
from bmoe_jax.train import load_checkpoints
from experiments.tables import protocol as P


@dataclasses.dataclass(frozen=True)
class Setup:
  """Where the cells read and write, and the protocol's sizes (tests shrink them)."""
  model: str  # the healed testbed's directory
  data_dir: str
  work: Path
  data: object = P.DATA
  train: object = P.TRAIN
  datasets: dict = dataclasses.field(default_factory=lambda: P.DATASETS)
  link_choice: tuple = P.LINK_CHOICE
  progress: bool = True

  def run_dir(self, name: str, seed: int) -> Path:
    return self.work / name / f"seed{seed}"


def _prepare(s: Setup, name: str, splits):
  """(healed params, cfg, batches, task) of a dataset, the frozen prefix cached once."""
  ds = s.datasets[name]
  params, cfg, tok = ST.load_model(RunConfig(model=s.model))
  data = dataclasses.replace(s.data, data_dir=s.data_dir, train=ds.train, val=ds.dev, test=ds.test, shift=ds.shift,
                             max_train=ds.max_train)
  batches, task, _ = ST.load_data(data, tok, cfg, splits, P.DATA_SEED)
  task, batches = ST.cache_prefix(params, task, batches, min(cfg.moe_layer_ids), s.progress)
  return params, cfg, batches, task


def finetune_cell(s: Setup, name: str, seed: int) -> dict:
  out = s.run_dir(name, seed)
  if (out / "finetune.json").exists():
    return read_json(out / "finetune.json")
  params, _, batches, task = _prepare(s, name, ("train", "val"))
  per_epoch = len(batches["train"])
  tc = dataclasses.replace(s.train, seed=seed, eval_every=per_epoch, checkpoint_every=per_epoch)
  t0 = time.perf_counter()
  res = ST.finetune(params, task, batches, tc, out, progress=s.progress)
  record = {"protocol": P.VERSION, "history": res.history, "steps_per_epoch": per_epoch,
            "seconds": time.perf_counter() - t0, "train_config": dataclasses.asdict(tc)}
  write_json(out / "finetune.json", record)
  return record


def regime_epoch(record: dict, regime: str) -> int:
  """The epoch of a regime: the lowest dev NLL (early) or the last (long)."""
  nll = [h["val_nll"] for h in record["history"]]
  return int(np.argmin(nll)) + 1 if regime == "early" else len(nll)


def regime_params(s: Setup, name: str, seed: int, regime: str, params, cfg):
  """(epoch, its parameters, the checkpoint ensemble's members) of a fine-tuning run's regime."""
  record = read_json(s.run_dir(name, seed) / "finetune.json")
  epoch = regime_epoch(record, regime)
  epochs = [e for e in P.checkpoint_epochs(epoch) if e <= len(record["history"])]
  steps = [e * record["steps_per_epoch"] for e in epochs]
  saved = dict(load_checkpoints(s.run_dir(name, seed) / "checkpoints", params, cfg, steps=steps))
  return epoch, saved[epoch * record["steps_per_epoch"]], [saved[k] for k in steps]


def link_cell(s: Setup) -> str:
  """The link with the lowest dev NLL of BMoE grid (``protocol.LINK_CHOICE``), chosen once and recorded."""
  path = s.work / "link.json"
  if path.exists():
    return read_json(path)["link"]
  name, seed, regime = s.link_choice
  healed, cfg, batches, task = _prepare(s, name, ("train", "val"))
  _, params, _ = regime_params(s, name, seed, regime, healed, cfg)
  posts, _ = ST.fit(params, task, batches, P.FIT, s.run_dir(name, seed) / regime / "fit", pretrained=healed, seed=seed,
                    wanted=("bmoe_fixed",), progress=s.progress)
  val = ST.validation_stats(params, task, batches["val"], posts["bmoe_fixed"], P.FIT.grid_values, s.progress,
                            s.run_dir(name, seed) / regime / "fit" / "validation")  # resumable
  dev = {link: ST.grid(posts["bmoe_fixed"], val, dataclasses.replace(P.FIT, link=link))[1]["val_nll"]
         for link in ("probit_pairwise", "probit", "mc")}
  best = min(dev, key=dev.get)
  write_json(path, {"protocol": P.VERSION, "link": best, "dev_nll": dev, "where": s.link_choice})
  return best


def _bmoe_methods(params, healed, task, batches, link: str, seed: int, out: Path, progress: bool):
  """The Bayesian-MoE variants of one factor pass: grid, evidence per mode, + temperature."""
  fc = dataclasses.replace(P.FIT, link=link)
  posts, info = ST.fit(params, task, batches, fc, out, pretrained=healed, seed=seed,
                       wanted=("bmoe", "bmoe_fixed", "bmoe_ts"), progress=progress)
  named = {"bmoe_grid": posts["bmoe"], "bmoe_ts": posts["bmoe_ts"]}
  fitted = {"bmoe_grid": info["bmoe"], "bmoe_ts": info["bmoe_ts"], "spec": info["spec"]}
  for method, mode in P.EVIDENCE.items():
    named[method], curve = LA.optimize_prior_precision(posts["bmoe_fixed"], mode)
    fitted[method] = {"mode": mode, "prior_precision": ST.mean_prior_precision(named[method]),
                      "log_marglik": curve["log_marglik"][-1]}
  methods = BL.bayesian_moe_variants(named, params, task, link=link, key=None,
                                     temperatures={"bmoe_ts": info["bmoe_ts"]["temperature"]})
  return methods, fitted


def save_method(path: Path, method, eval_sets: dict, progress: bool) -> float:
  """Every evaluation set's probabilities, labels and epistemic scores of one method, to ``path`` (npz)."""
  t0, arrays = time.perf_counter(), {}
  for key, batches in eval_sets.items():
    probs, labels, scores = collect_scored(method, batches, progress, f"{path.stem}/{key}")
    arrays.update({f"{key}/probs": probs, f"{key}/labels": labels})
    arrays.update({f"{key}/{k}": v for k, v in (scores or {}).items()})
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  seconds = time.perf_counter() - t0
  write_json(path.with_suffix(".json"), {"seconds": seconds})  # kept beside it: a resumed cell reports it too
  tmp.replace(path)  # complete or absent
  return seconds


def evaluate_cell(s: Setup, name: str, seed: int, regime: str, link: str) -> dict:
  out = s.run_dir(name, seed) / regime
  if (out / "cell.json").exists():
    return read_json(out / "cell.json")
  healed, cfg, batches, task = _prepare(s, name, ("train", "val", "eval"))
  epoch, params, members = regime_params(s, name, seed, regime, healed, cfg)
  eval_sets = {eval_key(spec): batches[eval_key(spec)] for spec in (s.datasets[name].test,) + s.datasets[name].shift}
  ctx = Context(params, task, val=batches["val"], members={"ckpt_ensemble": members}, seed=seed, link=link)
  methods, fitted = build_methods(P.REGISTRY_METHODS, ctx, P.EVAL)
  bmoe, fitted_bmoe = _bmoe_methods(params, healed, task, batches, link, seed, out / "fit", s.progress)
  seconds = {}
  for method_name, method in {**methods, **bmoe}.items():
    path = out / "methods" / f"{method_name}.npz"
    if not path.exists():
      save_method(path, method, eval_sets, s.progress)
    side = path.with_suffix(".json")  # absent for a method saved before the times were kept beside it
    seconds[method_name] = read_json(side)["seconds"] if side.exists() else None
  record = {"protocol": P.VERSION, "epoch": epoch, "link": link, "fitted": {**fitted, **fitted_bmoe},
            "seconds": seconds, "eval_sets": list(eval_sets), "record": run_record(seed=seed)}
  write_json(out / "cell.json", record, default=float)
  return record


def ensemble_cell(s: Setup, name: str, regime: str, seeds=P.SEEDS) -> Path:
  """The deep ensemble of ``seeds``' models of a regime, saved like a method (``WORK/<name>/<regime>``)."""
  path = s.work / name / f"{P.ENSEMBLE}_{regime}.npz"
  if path.exists():
    return path
  healed, cfg, batches, task = _prepare(s, name, ("train", "val", "eval"))  # the evaluate cell's classes C
  members = [regime_params(s, name, seed, regime, healed, cfg)[1] for seed in seeds]
  eval_sets = {eval_key(spec): batches[eval_key(spec)] for spec in (s.datasets[name].test,) + s.datasets[name].shift}
  save_method(path, BL.ensemble(members, task), eval_sets, s.progress)
  return path
