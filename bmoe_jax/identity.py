"""Run identity: digests of what determines a resumable run's result (the model's weights, the data), and
the differences between two fingerprints named key by key.

A resumable pass (fine-tuning, a factor pass, router training) records these in its fingerprint
(``checkpoint.ResumableRun``); a rerun into the same directory with another model or other data is then
refused instead of mixing two runs. A posterior records the digest of the model it was fitted on.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import jax
import numpy as np

DIGEST_SIZE = 16  # bytes of blake2b: 32 hex characters


def _update(h, name: str, leaf) -> None:
  a = np.ascontiguousarray(np.asarray(leaf))
  h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
  h.update(a.view(np.uint8).reshape(-1) if a.size else b"")


def tree_digest(tree: Any) -> str:
  """Hex digest of a tree of arrays: every leaf's path, dtype, shape and bytes (``None`` leaves skipped).
  Two trees have one digest exactly when they are equal bit for bit (up to hash collisions)."""
  h = hashlib.blake2b(digest_size=DIGEST_SIZE)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    _update(h, jax.tree_util.keystr(path), leaf)
  return h.hexdigest()


class DataDigest:
  """A running digest of a stream of batches (``task.Batch``): what a batch holds of the data (tokens, masks,
  positions, labels, choices); a prefix cache (``states_bsd``, a function of the model and the data) is left
  out. ``value()`` -> {"batches", "rows", "digest"}."""

  def __init__(self):
    self._h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    self.batches = 0
    self.rows = 0

  def update(self, batch) -> "DataDigest":
    for name, field in batch._asdict().items():
      if name != "states_bsd":  # None fields have no leaves; ``cont`` is a tuple of arrays
        for path, leaf in jax.tree_util.tree_flatten_with_path(field)[0]:
          _update(self._h, f"{self.batches}.{name}{jax.tree_util.keystr(path)}", leaf)
    self.batches += 1
    self.rows += int(np.shape(batch.labels_b)[0])
    return self

  def value(self) -> dict:
    return {"batches": self.batches, "rows": self.rows, "digest": self._h.hexdigest()}


def data_digest(batches: Iterable) -> dict:
  """{"batches", "rows", "digest"} of a list of batches (``DataDigest``)."""
  d = DataDigest()
  for b in batches:
    d.update(b)
  return d.value()


def task_identity(task) -> dict:
  """What a ``task.Task`` scores, as a fingerprint entry: its classes, cached-prefix layer and routing plan."""
  routing = None if task.routing is None else task.routing.to_dict()
  return {"class_ids": task.class_ids, "start_layer": task.start_layer, "routing": routing}


def upgrade(old: dict) -> dict:
  """A saved fingerprint in the current schema: its model config (``"config"``) read through today's
  ``MoEConfig``, so a field added since (at its default: it changes nothing) does not make a finished run
  "different"; a config that no longer parses is left as saved (and then differs)."""
  from bmoe_jax.config import MoEConfig

  if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
    return old
  try:
    return {**old, "config": MoEConfig.from_dict(old["config"]).to_dict()}
  except (ValueError, TypeError, KeyError):
    return old


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """The dotted keys at which two JSON-like fingerprints differ (leaves, or a whole subtree one side lacks)."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new), key=str):
      name = f"{prefix}.{k}" if prefix else str(k)
      if k not in old or k not in new:
        out.append(f"{name} (only in the {'new' if k not in old else 'saved'} run)")
      else:
        out.extend(differences(old[k], new[k], name))
    return out
  return [] if old == new else [prefix or "(the whole fingerprint)"]
