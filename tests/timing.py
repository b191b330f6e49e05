"""A pytest plugin that records, per test, its wall time and the XLA compile time spent in it.

Loaded by ``tests/conftest.py``; it writes only when ``BMOE_TEST_TIMINGS`` names a directory: one JSON line
per test (``nodeid``, ``wall_s``, ``compile_s``, ``trace_s``, ``lower_s``, ``compiles``, ``worker``) to
``<dir>/timings-<worker>.jsonl``, so pytest-xdist workers never share a file. ``compile_s`` is XLA's backend
compile (``/jax/core/compile/backend_compile_duration``), ``trace_s`` and ``lower_s`` JAX's tracing to a jaxpr
and lowering to MLIR, ``compiles`` the number of XLA compilations (an op run outside ``jax.jit`` is one
compilation the first time its shapes are seen: ~20 ms each at -O0); all in this process; subprocesses a test
starts count in its wall time only.
A module-scoped fixture's set-up is charged to the first test that uses it, as pytest's own durations do.
``python -m tests.durations`` runs the suite with it and writes the tables.
"""

import json
import os
import time
from pathlib import Path

import pytest

EVENTS = {
  "/jax/core/compile/backend_compile_duration": "compile_s",
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
}


class _Recorder:
  """Sums JAX's compile-duration events into the running test's counters."""

  def __init__(self, out_dir: Path):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out_dir.mkdir(parents=True, exist_ok=True)
    self.path = out_dir / f"timings-{worker}.jsonl"
    self.worker = worker
    self.current = None

  def on_duration(self, event: str, duration: float, **_):
    key = EVENTS.get(event)
    if key is not None and self.current is not None:
      self.current[key] += duration
      if key == "compile_s":
        self.current["compiles"] += 1

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(self, item, nextitem):
    self.current = {"compile_s": 0.0, "trace_s": 0.0, "lower_s": 0.0, "compiles": 0}
    start = time.perf_counter()
    yield
    row = {"nodeid": item.nodeid, "wall_s": time.perf_counter() - start, "worker": self.worker, **self.current}
    self.current = None
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def register(config) -> None:
  """Registers the recorder when ``BMOE_TEST_TIMINGS`` is set (called from conftest's ``pytest_configure``)."""
  out = os.environ.get("BMOE_TEST_TIMINGS")
  if not out:
    return
  from jax import monitoring
  rec = _Recorder(Path(out))
  monitoring.register_event_duration_secs_listener(rec.on_duration)
  config.pluginmanager.register(rec, "bmoe-timings")
