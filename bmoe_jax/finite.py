"""Finite or nothing: find the non-finite entries of a tree of arrays and refuse them with one message naming
where they are (weights at conversion and load, a diverged fine-tuning step, K-FAC factors, predictions)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class NonFiniteError(ValueError):
  """Non-finite values where finite ones are needed (the message names the tensors, block or method)."""


def path_name(path) -> str:
  """A tree path as ``layers/3/mlp/experts/w_down`` (dict keys, list indices and attributes joined by /)."""
  part = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return "/".join(part(k) for k in path)


def nonfinite_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
  """(name, array) of every floating leaf holding a NaN or an infinity."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, np.inexact):
      continue
    a = np.asarray(leaf)
    if not np.isfinite(a).all():
      bad.append((path_name(path), a))
  return bad


def describe(bad: list[tuple[str, np.ndarray]], limit: int = 5) -> str:
  """``name (n NaN, m inf of size), ...`` for the first ``limit`` non-finite leaves."""
  parts = [f"{name} ({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} inf of {a.size})"
           for name, a in bad[:limit]]
  return ", ".join(parts) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def require_finite(tree: Any, what: str, hint: str = "") -> None:
  """Raise ``NonFiniteError`` naming ``what`` and the non-finite leaves of ``tree``; ``hint``: what to do."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise NonFiniteError(f"{what}: non-finite values in {describe(bad)}" + (f"; {hint}" if hint else ""))
