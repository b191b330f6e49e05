"""Shared by the benchmark scripts: the median wall time of a JAX call after one warm-up (compilation), and
writing a result as JSON plus its Markdown table."""

import json
import statistics
import time
from pathlib import Path

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


def write_results(out: str | Path, res: dict, markdown: str) -> None:
  """``res`` to ``out`` (JSON) and ``markdown`` beside it (.md); the table is also printed."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=2))
  out.with_suffix(".md").write_text(markdown)
  print(markdown)
