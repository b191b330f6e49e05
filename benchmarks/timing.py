"""Shared by the benchmark scripts: the median wall time of a JAX call after one warm-up (compilation)."""

import statistics
import time

import jax


def median_time(fn, repeats: int) -> float:
  """Seconds: median over ``repeats`` calls of ``fn()``, each waited on, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
