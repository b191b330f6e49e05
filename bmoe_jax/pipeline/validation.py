"""The validation set's predictive at every prior precision of a grid (``LA.predictive.GridStats``), streamed batch by
batch and resumable: a full-rank pass over a dev set is C vector-Jacobian products per batch (tens of minutes on a
CPU), so each batch's small result ([grid, b, C, C] covariances, MAP logits, labels) is saved as it is computed and a
rerun with the same ``resume_dir`` skips the batches already done."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bmoe_jax import laplace as LA
from bmoe_jax.identity import tree_digest
from bmoe_jax.task import Task

FILE = "validation_stats.npz"


def validation_stats(params, task: Task, val_batches, post, grid_values, progress: bool = False,
                     resume_dir: str | Path | None = None) -> LA.predictive.GridStats:
  """The ``GridStats`` of ``val_batches`` under ``post`` on the grid ``grid_values``: each batch's Jacobian statistics
  are computed once, reduced to [grid, b, C, C] covariances and freed before the next batch's (full-rank factors:
  hundreds of MB per layer per batch), so every link, temperature and lambda of a grid search costs only the
  contraction. ``resume_dir``: each batch's result is saved there (``validation_stats.npz``, written atomically)
  and a rerun on the same posterior, grid and data resumes after the saved batches; None: nothing saved."""
  grid = np.asarray(grid_values, np.float64)
  key = tree_digest((post.factors, post.scale, post.w_map, grid))
  path = None if resume_dir is None else Path(resume_dir) / FILE
  parts = _load(path, key)
  bar = tqdm(val_batches, desc="validation statistics", unit="batch", disable=not progress)
  for i, batch in enumerate(bar):
    if i < len(parts):
      if not np.array_equal(parts[i].labels_n, np.asarray(batch.labels_b)):
        raise ValueError(f"{path}: batch {i}'s labels differ from the saved ones: other validation data")
      continue
    stats = LA.predictive.jacobian_stats_jit(params, task=task, batch=batch, post=post)
    parts.append(LA.predictive.grid_stats(post, [(stats, batch.labels_b)], grid))
    del stats
    if path is not None:
      _save(path, key, parts)
  if not parts:
    raise ValueError("grid search of the prior precision: no validation batches (pass a non-empty validation set)")
  return LA.predictive.GridStats(grid, *(np.concatenate([getattr(p, f) for p in parts], axis)
                                         for f, axis in (("f_nc", 0), ("cov_gncc", 1), ("labels_n", 0))))


def _load(path: Path | None, key: str) -> list:
  """The saved batches' ``GridStats`` (one per batch), or [] when nothing was saved for this posterior and grid."""
  if path is None or not path.exists():
    return []
  with np.load(path) as z:
    if str(z["key"]) != key:
      return []  # another posterior or grid: recomputed (and overwritten) from the start
    n = int(z["batches"])
    return [LA.predictive.GridStats(z["grid"], z[f"f{i}"], z[f"cov{i}"], z[f"y{i}"]) for i in range(n)]


def _save(path: Path, key: str, parts: list) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {"key": np.asarray(key), "batches": np.asarray(len(parts)), "grid": parts[0].prior_precision_g}
  for i, p in enumerate(parts):
    arrays.update({f"f{i}": p.f_nc, f"cov{i}": p.cov_gncc, f"y{i}": p.labels_n})
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
