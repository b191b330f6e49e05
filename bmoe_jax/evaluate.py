"""One call compares any set of methods on any set of datasets: metrics, OOD detection, reports.

``evaluate(methods, datasets, in_distribution="obqa", out_dir="runs/eval")`` runs every ``Method``
(``bmoe_jax.baselines``) on every dataset's batches and writes ``results.json`` (metrics per method and
dataset, entropy-based OOD AUROC/AUPRC of each shifted dataset against the in-distribution one, wall
times, and the run record: config, versions, seed), ``results.md`` (the tables) and reliability diagrams
``plots/reliability_<method>_<dataset>.png``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from bmoe_jax import metrics as M
from bmoe_jax.files import read_json, write_json, write_text
from bmoe_jax.finite import NonFiniteError
from bmoe_jax.task import Batch

TABLE_METRICS = ("acc", "ece", "nll", "brier")
SELECTIVE_METRICS = ("aurc", "acc_at_80", "err_auroc")  # the second table: selective prediction


def run_record(config: dict | None = None, seed: int | None = None) -> dict:
  """What produced a result: config, seed, package versions, machine.

  Args:
    config: the run's configuration, stored as given (JSON-serialisable for ``results.json``); None: ``{}``.
    seed: the run's seed; None: not recorded (null).

  Returns:
    A dict: ``"config"``, ``"seed"``, ``"versions"`` ({package: version} of python, jax and those of flax, optax,
    orbax.checkpoint, transformers and numpy that import), ``"machine"`` (``"<arch> <jax backend> x<devices>"``)
    and ``"started"`` (local time, ``"%Y-%m-%d %H:%M:%S"``).
  """
  import jax

  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for pkg in ("flax", "optax", "orbax.checkpoint", "transformers", "numpy"):
    try:
      versions[pkg] = __import__(pkg, fromlist=["__version__"]).__version__
    except ImportError:
      pass
  return {"config": config or {}, "seed": seed, "versions": versions,
          "machine": f"{platform.machine()} {jax.default_backend()} x{jax.device_count()}",
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def collect(method, batches: Sequence[Batch], progress: bool = False, desc: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(probs [n, C], labels [n]) of a method over batches.

  Args:
    method: a ``Method`` (``batch -> probs [b, C]``); a scorer's (``epistemic.ScoredMethod``) scores are dropped.
    batches: the batches, none with a row that is all padding (ValueError).
    progress: whether to show a progress bar.
    desc: the progress bar's label and the prefix of error messages.

  Returns:
    (probs, labels): float64 [n, C] and the labels [n] (the batches' dtype), n the examples of all batches in
    order.
  """
  return collect_scored(method, batches, progress, desc)[:2]


def collect_scored(method, batches: Sequence[Batch], progress: bool = False, desc: str = "",
                   seconds: list | None = None) -> tuple[np.ndarray, np.ndarray, dict | None]:
  """(probs [n, C], labels [n], epistemic scores {name: [n]} or None): the scores of a method that gives them
  (``epistemic.ScoredMethod``: MC dropout, ensembles, Bayesian-MoE, sampled routers), from the same pass.

  Args:
    method: a ``Method`` (``batch -> probs [b, C]``) or one with ``with_scores`` (``batch -> (probs [b, C],
      {name: [b]})``, ``epistemic.ScoredMethod``).
    batches: the batches, none with a row that is all padding (ValueError).
    progress: whether to show a progress bar.
    desc: the progress bar's label and the prefix of error messages.
    seconds: a list that gets each batch's wall time in seconds (until its probabilities are on the host);
      None: not timed.

  Returns:
    (probs, labels, scores): float64 [n, C], the labels [n] (the batches' dtype), and {name: float64 [n]} for a
    method with ``with_scores`` (else None), n the examples of all batches in order.

  Raises:
    ValueError: a row of a batch is all padding.
    NonFiniteError: a batch's probabilities are not all finite.
  """
  from tqdm.auto import tqdm

  probs, labels, scores = [], [], []
  scored = hasattr(method, "with_scores")
  for i, b in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
    empty = np.flatnonzero(~np.asarray(b.mask_bs).astype(bool).any(-1))
    if empty.size:
      raise ValueError(f"{desc or 'evaluation'}: batch {i} rows {empty[:8].tolist()} are all padding (mask all "
                       "zero): there is nothing to predict; drop those rows")
    t0 = time.perf_counter()
    p, sc = method.with_scores(b) if scored else (method(b), None)
    p = np.asarray(p, np.float64)
    if seconds is not None:
      seconds.append(time.perf_counter() - t0)
    if not np.isfinite(p).all():
      rows = np.flatnonzero(~np.isfinite(p).all(-1))
      raise NonFiniteError(f"{desc or 'method'}: non-finite probabilities in batch {i} (rows {rows[:8].tolist()} "
                           "of it): check the model's weights (NaN?) and the method's posterior or inputs")
    probs.append(p)
    labels.append(np.asarray(b.labels_b))
    scores.append(sc)
  merged = {k: np.concatenate([np.asarray(sc[k], np.float64) for sc in scores]) for k in scores[0]} if scored else None
  return np.concatenate(probs), np.concatenate(labels), merged


def _labels_digest(datasets: Mapping[str, Sequence[Batch]]) -> str:
  h = hashlib.sha256()
  for ds_name, batches in datasets.items():
    h.update(ds_name.encode())
    for b in batches:
      h.update(np.asarray(b.labels_b, np.int64).tobytes() + repr(np.shape(b.mask_bs)).encode())
  return h.hexdigest()[:16]


def _saved_method(path: Path, key: dict) -> dict | None:
  """A method's saved metrics when they were made under the same ``key`` (else None: recomputed)."""
  if not path.exists():
    return None
  saved = read_json(path)
  return saved["per"] if saved.get("key") == key and "per" in saved else None


def _evaluate_method(name: str, method, datasets: Mapping[str, Sequence[Batch]], in_distribution: str | None,
                     ci: bool, plots_dir: Path | None, progress: bool) -> dict:
  """One method's metrics per dataset; OOD detection of every other dataset against ``in_distribution`` by
  predictive entropy and, for a method that gives them, by its epistemic scores."""
  per, probs, scores = {}, {}, {}
  for ds_name, batches in datasets.items():
    t = time.perf_counter()
    p, y, scores[ds_name] = collect_scored(method, batches, progress, f"{name}/{ds_name}")
    seconds = time.perf_counter() - t  # the predictions only: the metrics' bootstrap is not the method's cost
    per[ds_name] = {**M.summary(p, y, ci=ci), "n": int(len(y)), "seconds": seconds}
    probs[ds_name] = p
    if plots_dir is not None:
      from bmoe_jax.plots import reliability_diagram
      reliability_diagram(p, y, plots_dir / "plots" / f"reliability_{name}_{ds_name}.png", title=f"{name} {ds_name}")
  if in_distribution is not None:
    for ds_name in datasets:
      if ds_name != in_distribution:
        per[ds_name]["ood"] = M.ood_summary(probs[in_distribution], probs[ds_name], scores[in_distribution],
                                            scores[ds_name])
  return per


def evaluate(methods: Mapping[str, object], datasets: Mapping[str, Sequence[Batch]], *,
             in_distribution: str | None = None, out_dir: str | Path | None = None, ci: bool = False,
             plots: bool = True, record: dict | None = None, progress: bool = True,
             resume_key: dict | None = None) -> dict:
  """Metrics of every method on every dataset (and OOD scores against ``in_distribution``).

  Args:
    methods: {name: ``Method``}, evaluated in order; a method with epistemic scores (``epistemic.ScoredMethod``)
      is also scored by them for OOD detection.
    datasets: {name: batches}, every method runs on every dataset.
    in_distribution: the dataset every other one is scored against for OOD detection (ValueError when not a
      key of ``datasets``); None: no OOD detection.
    out_dir: where ``results.json``, ``results.md``, ``plots/`` and (with ``resume_key``) ``methods/`` are
      written; None: nothing is written.
    ci: whether to add bootstrap 95% intervals (1000 resamples) of every metric (``metrics.summary``).
    plots: whether to draw the reliability diagrams ``plots/reliability_<method>_<dataset>.png`` (with
      ``out_dir`` only).
    record: the run record stored under ``"record"``; None: ``run_record()`` (no config, no seed).
    progress: whether to show progress bars.
    resume_key: (with ``out_dir``) each finished method's metrics are saved to OUT/methods/NAME.json with this
      key, the datasets and their labels; a rerun with the same key reuses them, so a stopped evaluation
      restarts at the first unfinished method. The key must identify everything the methods depend on (model,
      posterior, routers, settings): the caller's run identity. JSON-serialisable. None: nothing is reused.

  Returns:
    A dict: ``"record"``; ``"in_distribution"``; ``"methods"``: {method: {dataset: ``metrics.summary`` plus
    ``"n"`` (examples) and ``"seconds"`` (wall time of the predictions, metrics not included), and for each
    dataset other than ``in_distribution`` ``"ood"``: ``metrics.ood_summary``}}; ``"seconds"``: the total wall
    time.
  """
  if in_distribution is not None and in_distribution not in datasets:
    raise ValueError(f"in_distribution={in_distribution!r} is not one of the datasets {list(datasets)}")
  t_all = time.perf_counter()
  results = {"record": record or run_record(), "in_distribution": in_distribution, "methods": {}}
  out = Path(out_dir) if out_dir is not None else None
  labels = None if resume_key is None or out is None else _labels_digest(datasets)  # once, not per method
  for name, method in methods.items():
    key = None if labels is None else json.loads(json.dumps(dict(  # as it reads back
        resume_key, method=name, in_distribution=in_distribution, ci=ci, labels=labels)))
    saved = None if key is None else _saved_method(out / "methods" / f"{name}.json", key)
    if saved is not None:
      results["methods"][name] = saved
      continue
    per = _evaluate_method(name, method, datasets, in_distribution, ci, out if plots else None, progress)
    results["methods"][name] = per
    if key is not None:
      (out / "methods").mkdir(parents=True, exist_ok=True)
      write_json(out / "methods" / f"{name}.json", {"key": key, "per": per}, indent=None, default=float)
    # Each method compiles a program per batch shape, and each CPU executable holds its own memory mappings
    # (LLVM JIT sections): an evaluation of 20 methods over four sets exhausted vm.max_map_count (65530) and
    # aborted ("LLVM ERROR: Unable to allocate section memory"). A finished method's programs are dropped.
    jax.clear_caches()
  results["seconds"] = time.perf_counter() - t_all
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results))
  return results


def _ood_cell(ood: dict) -> str:
  return " / ".join("—" if ood.get(k) is None else f"{ood[k]:.4f}" for k in ("auroc", "auroc_mi", "auroc_var_f"))


def markdown(results: dict) -> str:
  """One table per metric group: rows methods, columns datasets (ACC / ECE / NLL / Brier), then OOD AUROC.

  Args:
    results: the dict ``evaluate`` returns (or its ``results.json`` read back).

  Returns:
    The Markdown report (newline-terminated): the ACC / ECE / NLL / Brier table, the selective-prediction table
    (AURC, ACC_AT_80, ERR_AUROC), the OOD AUROC table (entropy / mi / var_f) when some dataset has ``"ood"``,
    and the total wall time; bootstrap intervals in brackets when computed, "—" where a value is undefined.
  """
  methods = list(results["methods"])
  datasets = list(next(iter(results["methods"].values()))) if methods else []
  lines = ["# Evaluation", ""]
  if results.get("in_distribution"):
    lines += [f"In-distribution: {results['in_distribution']}. Metrics: ACC, ECE (15 bins), NLL, Brier "
              "(with bootstrap 95% intervals when computed).", ""]
  def cell(r, m):
    ci = r.get("ci95", {}).get(m)
    if r.get(m) is None:  # undefined (error detection with no error), or a result saved before the metric existed
      return "—"
    return f"{r[m]:.4f}" if ci is None else f"{r[m]:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"

  for group in (TABLE_METRICS, SELECTIVE_METRICS):
    if group is SELECTIVE_METRICS:
      lines += ["", "Selective prediction by confidence (the top-class probability): AURC (lower is better), accuracy "
                "on the 80% most confident, error-detection AUROC (confidence separating right from wrong).", ""]
    lines += ["| method | " + " | ".join(f"{d} {m.upper()}" for d in datasets for m in group) + " |",
              "|" + "---|" * (1 + len(datasets) * len(group))]
    for name in methods:
      row = results["methods"][name]
      lines.append(f"| {name} | " + " | ".join(cell(row[d], m) for d in datasets for m in group) + " |")
  shifts = [d for d in datasets if any("ood" in results["methods"][n][d] for n in methods)]
  if shifts:
    lines += ["", "OOD detection AUROC by predictive entropy / mutual information / expected logit variance (— : the "
              "method has no epistemic score).", "",
              "| method | " + " | ".join(f"{d} OOD AUROC" for d in shifts) + " |", "|" + "---|" * (1 + len(shifts))]
    for name in methods:
      lines.append(f"| {name} | " + " | ".join(_ood_cell(results["methods"][name][d]["ood"]) for d in shifts) + " |")
  lines += ["", f"Wall time: {results['seconds']:.1f} s."]
  return "\n".join(lines) + "\n"
