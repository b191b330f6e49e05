"""Bad inputs and interruptions replayed through the CLI, before and after issue 17 (nothing silently wrong).

Every case runs ``python -m bmoe_jax.cli ...`` in a subprocess on tiny models (a converted two-layer MoE with a
tokenizer trained on OBQA prompts, a tiny random Mixtral HF checkpoint, 40-row OBQA files), once against each
source tree, and is classified by what a user sees:

- ``message``: a non-zero exit with one message naming what is wrong (the case's pattern: the file, field or flag);
- ``correct``: exit 0 and the result is right (the case's check, e.g. every row of a BOM file scored);
- ``unclear``: a non-zero exit whose message does not name the cause;
- ``traceback``: a raw Python traceback;
- ``silent``: exit 0 with a wrong result (a bad input accepted, a changed run resumed, a NaN model saved).

  .venv/bin/python experiments/bad_inputs.py --before fe2c663 --out experiments/results/bad_inputs

``--before REV`` checks the revision out into ``WORK/before`` (a git worktree) and runs the cases there too.
Writes OUT/results.json and OUT/results.md (one row per case: before, after).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.bad_input_cases import CASES, ROOT, Case, Ctx, cli, make_fixtures  # noqa: E402


# --- driver -----------------------------------------------------------------------------------------------------

def classify(case: Case, ctx: Ctx, d: Path, rc: int, out: str) -> str:
  if rc == 0:
    return "correct" if case.ok is not None and case.ok(ctx, d, out) else "silent"
  if "Traceback (most recent call last)" in out:
    return "traceback"
  return "message" if re.search(case.expect, out, re.I | re.S) else "unclear"


def excerpt(out: str) -> str:
  """The line a user reads: the error line, else the last line of output."""
  lines = [line.strip() for line in out.splitlines() if line.strip()]
  errs = [line for line in lines if re.search(r"error: |Warning: ", line)]
  line = (errs or lines or [""])[-1]
  return line if len(line) <= 220 else line[:217] + "..."


def run_cases(ctx: Ctx, cases: list[Case]) -> list[dict]:
  make_fixtures(ctx)
  rows = []
  for i, case in enumerate(cases):
    d = ctx.work / "cases" / f"{i:02d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t = time.perf_counter()
    try:
      rc, out = cli(ctx, case.setup(ctx, d))
      outcome = classify(case, ctx, d, rc, out)
    except Exception as err:  # a setup step of the case failed in this version
      rc, out, outcome = -1, f"setup failed: {err}", "setup failed"
    rows.append({"case": case.name, "group": case.group, "rc": rc, "outcome": outcome, "message": excerpt(out),
                 "seconds": round(time.perf_counter() - t, 1)})
    print(f"[{ctx.repo.name}] {case.name}: {outcome} (rc {rc}) {rows[-1]['message'][:100]}", flush=True)
  return rows


def checkout(rev: str, where: Path) -> Path:
  if not where.exists():
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True)
  return where


def table(before: list[dict] | None, after: list[dict]) -> str:
  head = "| # | case | before | after | what the user reads after |\n|---:|---|---|---|---|\n"
  rows = []
  for i, a in enumerate(after):
    b = before[i]["outcome"] if before else "—"
    rows.append(f"| {i + 1} | {a['case']} | {b} | **{a['outcome']}** | {a['message'].replace('|', '/')} |")
  return head + "\n".join(rows) + "\n"


def counts(rows: list[dict]) -> dict:
  out: dict[str, int] = {}
  for r in rows:
    out[r["outcome"]] = out.get(r["outcome"], 0) + 1
  return dict(sorted(out.items()))


def write(out: Path, result: dict) -> str:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  summary = {k: counts(result[k]) for k in ("before", "after") if k in result}
  reruns = "".join(f"Rerun after a fix: `{c}`.\n" for c in result.get("reruns", []))
  md = (f"# Bad inputs through the CLI ({len(result['after'])} cases)\n\nOutcome counts: {json.dumps(summary)}\n\n"
        f"{table(result.get('before'), result['after'])}\nMade by `{result['command']}`.\n{reruns}")
  (out / "results.md").write_text(md)
  return md


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--work", default="runs/bad_inputs", help="fixtures, case directories, the --before checkout")
  ap.add_argument("--before", default=None, help="a git revision to run the cases against too")
  ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
  ap.add_argument("--only", default=None, help="regex: run only the cases whose name matches")
  ap.add_argument("--rerun", action="store_true", help="with --only: replace those cases' 'after' rows in OUT")
  args = ap.parse_args(argv)
  cases = [c for c in CASES if args.only is None or re.search(args.only, c.name)]
  work = Path(args.work).absolute()
  data = str(Path(args.data_dir).absolute())
  command = " ".join(["python", *sys.argv])
  if args.rerun:
    result = json.loads((Path(args.out) / "results.json").read_text())
    fresh = {r["case"]: r for r in run_cases(Ctx(ROOT, work / "after_work", data), cases)}
    result["after"] = [fresh.get(r["case"], r) for r in result["after"]]
    result["reruns"] = result.get("reruns", []) + [command]
  else:
    result = {"command": command, "before_rev": args.before}
    if args.before:
      repo = checkout(args.before, work / "before")
      result["before"] = run_cases(Ctx(repo, work / "before_work", data), cases)
    result["after"] = run_cases(Ctx(ROOT, work / "after_work", data), cases)
  print(write(Path(args.out), result))


if __name__ == "__main__":
  main()
