"""Bootstrap intervals, paired bootstrap differences and the Holm adjustment: the statistics every reported
difference goes through, independent of which metric is compared (``bmoe_jax.metrics`` builds its paired
differences on ``paired_bootstrap``)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(metric: Callable, *arrays, num_samples: int = 1000, level: float = 0.95, seed: int = 0):
  """(low, high) percentile interval of ``metric(*arrays)`` over example resamples (seeded; resamples where the
  metric is undefined, NaN, are left out).

  Args:
    metric: ``metric(*arrays) -> float`` on the resampled arrays (e.g. ``ece``); NaN where undefined.
    arrays: per-example arrays sharing their first axis n (e.g. probs [n, C], labels [n]); each resample draws n
      indices with replacement and indexes every array with them.
    num_samples: the number of bootstrap resamples.
    level: the interval's coverage (0.95: the 2.5th to the 97.5th percentile).
    seed: the seed of the ``np.random.RandomState`` drawing the resamples.

  Returns:
    (low, high) floats: the percentile interval (NaN when every resample is NaN).
  """
  n = len(arrays[0])
  rng = np.random.RandomState(seed)
  vals = []
  for _ in range(num_samples):
    idx = rng.randint(0, n, n)
    vals.append(metric(*(np.asarray(a)[idx] for a in arrays)))
  lo, hi = np.nanpercentile(vals, [50 * (1 - level), 100 - 50 * (1 - level)])  # error_auroc: NaN when undefined
  return float(lo), float(hi)


def paired_bootstrap(diff: Callable, sizes: tuple, num_samples: int, level: float, seed: int) -> dict:
  """The estimate ``diff(*all indices)``, the percentile interval of ``diff`` over resamples (one index draw per
  set in ``sizes``) and the two-sided bootstrap p-value (twice the smaller tail beyond 0, at most 1). Resamples
  where ``diff`` is undefined (NaN, e.g. an AUROC of a resample with one class) are left out of both.

  Args:
    diff: ``diff(*index_arrays) -> float``, the statistic on the examples those indices pick (one int array per
      set; all of a set's indices give the estimate).
    sizes: the number of examples of each independently resampled set (e.g. (n,) or (n_in, n_out)).
    num_samples: the bootstrap resamples.
    level: the interval's coverage (0.95: the 2.5th to the 97.5th percentile).
    seed: the seed of the ``np.random.default_rng`` drawing the resamples.

  Returns:
    ``{"diff": the estimate, "ci": (low, high), "p": the two-sided p-value}``; the interval and p are NaN when
      every resample is undefined.
  """
  rng = np.random.default_rng(seed)
  boot = np.array([diff(*(rng.integers(0, n, n) for n in sizes)) for _ in range(num_samples)], np.float64)
  boot = boot[np.isfinite(boot)]
  if boot.size == 0:
    return {"diff": diff(*(np.arange(n) for n in sizes)), "ci": (float("nan"),) * 2, "p": float("nan")}
  lo, hi = np.percentile(boot, [50 * (1 - level), 100 - 50 * (1 - level)])
  p = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
  return {"diff": diff(*(np.arange(n) for n in sizes)), "ci": (float(lo), float(hi)), "p": float(p)}


def holm(pvalues) -> np.ndarray:
  """Holm's step-down adjustment of ``pvalues`` (family-wise error): reject where the adjusted p <= alpha.

  Args:
    pvalues: [m] raw p-values of the m hypotheses of one family, in any order.

  Returns:
    float64 [m] adjusted p-values in the input order: with ``p_(1) <= ... <= p_(m)`` sorted, the i-th smallest
    becomes ``min(1, max_{j <= i} (m - j + 1) p_(j))``.
  """
  p = np.asarray(pvalues, np.float64)
  order = np.argsort(p, kind="mergesort")
  m = len(p)
  adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
  out = np.empty(m)
  out[order] = adjusted
  return out
