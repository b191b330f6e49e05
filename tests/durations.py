"""Runs the test suite with per-test timing and writes where its time goes, by module and by test.

    python -m tests.durations [--out DIR] [--top N] [-- PYTEST_ARGS...]
    python -m tests.durations --from DIR        # tables from an earlier run's timings-*.jsonl

Every test's wall time and the XLA compile / trace / lowering time spent in it (``tests/timing.py``) go to
``DIR/timings-<worker>.jsonl``; the tables go to ``DIR/durations.md`` and ``DIR/durations.json``. Arguments
after ``--`` go to pytest unchanged (e.g. ``-- -n 2 tests/laplace``); without them it runs what the README's
test command runs. The run's own wall time is in the tables' header: with ``-n 2`` the per-test times add up to
about twice it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("wall_s", "compile_s", "trace_s", "lower_s")


def read_rows(out: Path) -> list[dict]:
  """Every test's row from ``out/timings-*.jsonl``."""
  rows = []
  for path in sorted(out.glob("timings-*.jsonl")):
    rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  if not rows:
    raise SystemExit(f"{out}: no timings-*.jsonl rows (was the suite run with BMOE_TEST_TIMINGS={out}?)")
  return rows


def by_module(rows: list[dict]) -> list[dict]:
  """Rows summed per test file, slowest first."""
  acc = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0) | {"tests": 0, "compiles": 0})
  for r in rows:
    m = acc[r["nodeid"].split("::")[0]]
    m["tests"] += 1
    m["compiles"] += r.get("compiles", 0)
    for k in FIELDS:
      m[k] += r[k]
  return sorted(({"module": k, **v} for k, v in acc.items()), key=lambda r: -r["wall_s"])


def _table(rows: list[dict], key: str, top: int) -> list[str]:
  lines = [f"| {key} | tests | wall s | compile s | compiles | trace+lower s | compile share |",
           "|---|---|---|---|---|---|---|"]
  for r in rows[:top]:
    share = r["compile_s"] / r["wall_s"] if r["wall_s"] else 0.0
    lines.append(f"| `{r[key]}` | {r.get('tests', 1)} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
                 f"{r.get('compiles', '')} | "
                 f"{r['trace_s'] + r['lower_s']:.1f} | {share:.0%} |")
  return lines


def write_tables(out: Path, top: int, header: str = "") -> str:
  """Writes ``durations.md`` / ``durations.json`` in ``out`` from its JSONL rows; returns the Markdown."""
  rows = read_rows(out)
  modules = by_module(rows)
  tests = sorted(rows, key=lambda r: -r["wall_s"])
  total = {k: sum(r[k] for r in rows) for k in FIELDS}
  md = [f"# Test durations{header}", "",
        f"{len(rows)} tests; summed over tests: wall {total['wall_s']:.0f} s, XLA compile {total['compile_s']:.0f} s, "
        f"trace + lowering {total['trace_s'] + total['lower_s']:.0f} s (this process only; subprocesses count in "
        "wall time).", "", f"## By module (top {top})", "", *_table(modules, "module", top), "",
        f"## By test (top {top})", "", *_table(tests, "nodeid", top), ""]
  text = "\n".join(md)
  (out / "durations.md").write_text(text)
  (out / "durations.json").write_text(json.dumps({"total": total, "modules": modules, "tests": tests}, indent=1))
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", type=Path, default=ROOT / "runs" / "test-durations", help="where rows and tables go")
  p.add_argument("--from", dest="source", type=Path, help="only write the tables from an earlier run's rows")
  p.add_argument("--top", type=int, default=20, help="rows in each table")
  p.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: tests)")
  a = p.parse_args(argv)
  if a.source is not None:
    print(write_tables(a.source, a.top))
    return 0
  a.out.mkdir(parents=True, exist_ok=True)
  for old in a.out.glob("timings-*.jsonl"):
    old.unlink()
  cmd = [sys.executable, "-m", "pytest", "-q", *(a.pytest_args or ["tests"])]
  start = time.perf_counter()
  rc = subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, BMOE_TEST_TIMINGS=str(a.out.resolve())))
  wall = time.perf_counter() - start
  print(write_tables(a.out, a.top, header=f" (`{' '.join(cmd[1:])}`: {wall:.0f} s wall, exit {rc})"))
  return rc


if __name__ == "__main__":
  sys.exit(main())
