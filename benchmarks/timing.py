"""Shared by the benchmark scripts: the median wall time of a JAX call after one warm-up (compilation), and
writing a result as JSON plus its Markdown table."""

import json
import os
import platform
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


def cpu_description() -> str:
  """The CPU the timings ran on: model, the vector extensions that decide float32/bf16 speed, core count
  (machines of one kind differ: the same benchmark's bf16 rows differ 10x between avx512_bf16 and avx2 CPUs)."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name":
        model = value.strip()
      elif key.strip() == "flags":
        flags = set(value.split())
        break
  except OSError:
    pass
  ext = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
  return f"{model} ({', '.join(ext) or 'no avx2'}), {os.cpu_count()} CPUs"


def write_results(out: str | Path, res: dict, markdown: str) -> None:
  """``res`` to ``out`` (JSON) and ``markdown`` beside it (.md); the table is also printed."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=2))
  out.with_suffix(".md").write_text(markdown)
  print(markdown)
