"""Faults replayed through the CLI as a user meets them, before and after issue 39 (one writer per output
directory, records written whole, artefacts complete once their record is, Ctrl-C and a full disk answered
in one line, GGUF errors naming the field).

  .venv/bin/python experiments/faults.py --before e246a6c --out experiments/results/faults

Every case runs ``python -m bmoe_jax.cli ...`` in subprocesses on the tiny fixtures of ``bad_input_cases`` (a
two-layer MoE with a tokenizer trained on OBQA prompts, 40-row OBQA files), against each source tree:

* **kill at every write**: ``finetune``, ``fit`` and ``route-train`` SIGKILLed (a real SIGKILL, sent by the
  process to itself) right after the k-th call of anything that persists (a resumable save, an orbax save, a
  record written by ``Path.write_text`` or ``files.write_text``), for every k; then the same command again. A
  rerun that refuses is followed by deleting the output directory and running it once more (a manual deletion).
  The final artefacts' digests are compared with an uninterrupted run's.
* **two writers**: the same ``fit`` / ``finetune`` started twice into one ``--out``, the second 1 s later.
* **Ctrl-C** during ``finetune``'s loop, 0-1 s after its first save (4 tries), and SIGTERM (2 tries); then the
  rerun.
* **full disk**: ``finetune`` into a 450 KiB tmpfs (where this machine lets us mount one; the run needs ~1 MiB),
  then the rerun after the tmpfs grows to 64 MiB.
* **malformed GGUF**: SmolLM2's GGUF truncated at 1 MiB, and with an absurd tensor count.

Writes OUT/results.json and OUT/results.md (before / after per case: exit codes, lines a user reads, tracebacks,
crashes, manual deletions, whether the rerun finished with the uninterrupted result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.bad_input_cases import ROOT, Ctx, make_fixtures  # noqa: E402
from experiments.bad_inputs import checkout  # noqa: E402

HOOK = """
import os, sys, signal, pathlib
k, n = int(os.environ.get("KILL_AT_WRITE", "0")), [0]
def hook(owner, name):
  orig = getattr(owner, name)
  def persist(*a, **kw):
    got = orig(*a, **kw)
    n[0] += 1
    if n[0] == k:
      os.kill(os.getpid(), signal.SIGKILL)
    return got
  setattr(owner, name, persist)
from bmoe_jax.checkpoint import ResumableRun
import orbax.checkpoint as ocp
hook(ResumableRun, "save"); hook(ocp.StandardCheckpointer, "save"); hook(pathlib.Path, "write_text")
from bmoe_jax import files
if hasattr(files, "write_text"):
  hook(files, "write_text")
from bmoe_jax.cli import main
rc = main(sys.argv[1:])
print(f"WRITES {n[0]}", file=sys.stderr)
sys.exit(rc)
"""
COMMON = ["--train", "obqa:train", "--max-train", "16", "--max-eval", "8", "--batch-size", "8", "--max-length", "64",
          "--scoring", "letters", "--quiet"]
ARTEFACTS = {"finetune": [("model/bmoe_config.json", "params_digest"), ("run.json", "history")],
             "fit": [("posterior/posterior.json", "digest")],
             "route-train": [("routers/routing.json", "digest"), ("run.json", "history")]}


def argv_of(ctx: Ctx, command: str, out: Path, epochs: int = 2) -> list[str]:
  common = ["--data-dir", str(ctx.data), *COMMON, "--out", str(out)]
  if command == "finetune":
    return ["finetune", "--model", str(ctx.work / "model"), "--val", "obqa:dev", "--epochs", str(epochs),
            "--eval-every", "1", "--checkpoint-every", "2", "--lr", "1e-2", "--layers", "1", *common]
  model = str(ctx.work / "tuned" / "model")
  if command == "fit":
    return ["fit", "--model", model, "--prior-mean", "zero", "--rank", "4", *common]
  return ["route-train", "--model", model, "--kind", "mfvr", "--route-layers", "last:1", "--route-epochs", "2",
          "--route-checkpoint-every", "1", *common]


def start(ctx: Ctx, argv: list[str], kill_at: int = 0) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(ctx.repo), "JAX_PLATFORMS": "cpu", "KILL_AT_WRITE": str(kill_at)}
  env.pop("JAX_ENABLE_X64", None)
  return subprocess.Popen([sys.executable, "-c", HOOK, *argv], cwd=ctx.repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,  # as a terminal's foreground job: SIGINT not ignored
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen, timeout: int = 600) -> dict:
  out, err = proc.communicate(timeout=timeout)
  text = err + out
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WRITES ")]
  writes = re.search(r"WRITES (\d+)", err)
  return {"rc": proc.returncode, "lines": len(lines), "tracebacks": text.count("Traceback (most recent call last)"),
          "crash": -proc.returncode in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS),
          "last": lines[-1][:200] if lines else "",
          "writes": int(writes.group(1)) if writes else None}


def artefacts(command: str, out: Path):
  got = {}
  for path, key in ARTEFACTS[command]:
    try:
      got[path] = json.loads((out / path).read_text())[key]
    except (OSError, ValueError, KeyError):
      got[path] = None
  return got


def rerun_until_done(ctx: Ctx, command: str, out: Path, epochs: int = 2) -> dict:
  """The same command again; when it refuses, the user deletes the directory and runs it once more."""
  r = finish(start(ctx, argv_of(ctx, command, out, epochs)))
  r["deleted"] = 0
  if r["rc"] != 0:
    shutil.rmtree(out, ignore_errors=True)
    again = finish(start(ctx, argv_of(ctx, command, out, epochs)))
    r.update(deleted=1, rc_after_delete=again["rc"], tracebacks=r["tracebacks"] + again["tracebacks"])
  return r


def kill_at_every_write(ctx: Ctx, command: str) -> dict:
  whole = ctx.work / "faults" / f"{command}_whole"
  shutil.rmtree(whole, ignore_errors=True)
  ref = finish(start(ctx, argv_of(ctx, command, whole)))
  want, rows = artefacts(command, whole), []
  for k in range(1, ref["writes"] + 1):
    out = ctx.work / "faults" / f"{command}_kill{k}"
    shutil.rmtree(out, ignore_errors=True)
    killed = finish(start(ctx, argv_of(ctx, command, out), kill_at=k))
    r = rerun_until_done(ctx, command, out)
    rows.append({"k": k, "killed_rc": killed["rc"], "rerun_rc": r["rc"], "rerun_last": r["last"],
                 "deleted": r["deleted"], "tracebacks": r["tracebacks"], "same": artefacts(command, out) == want})
    print(f"[{ctx.repo.name}] {command} kill at write {k}/{ref['writes']}: {rows[-1]}", flush=True)
  return {"writes": ref["writes"], "rows": rows, "finished_by_rerun": sum(r["rerun_rc"] == 0 for r in rows),
          "manual_deletions": sum(r["deleted"] for r in rows), "tracebacks": sum(r["tracebacks"] for r in rows),
          "same_result": sum(r["same"] for r in rows)}


def two_writers(ctx: Ctx, command: str) -> dict:
  out = ctx.work / "faults" / f"{command}_two"
  shutil.rmtree(out, ignore_errors=True)
  first = start(ctx, argv_of(ctx, command, out))
  time.sleep(1.0)
  t = time.perf_counter()
  second = start(ctx, argv_of(ctx, command, out))
  b = finish(second)
  b["seconds_to_exit"] = round(time.perf_counter() - t, 1)
  a = finish(first)
  return {"first_rc": a["rc"], "second": b, "first_complete": all(v is not None for v in artefacts(command, out).values())}


def signal_during(ctx: Ctx, signum: int, seed: int) -> dict:
  """``finetune`` (60 epochs of 2 steps) signalled at a random time (0-1 s) after its first save, then rerun."""
  out = ctx.work / "faults" / f"signal{signum}_{seed}"
  shutil.rmtree(out, ignore_errors=True)
  proc = start(ctx, argv_of(ctx, "finetune", out, epochs=60))
  deadline = time.time() + 300
  while not any((out / "checkpoints").glob("[0-9]*")) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  time.sleep((seed * 0.618) % 1.0)
  proc.send_signal(signum)
  r = finish(proc)
  again = rerun_until_done(ctx, "finetune", out, epochs=60)
  return {**{k: r[k] for k in ("rc", "lines", "tracebacks", "crash", "last")}, "rerun_rc": again["rc"],
          "deleted": again["deleted"]}


def full_disk(ctx: Ctx) -> dict | None:
  mnt = ctx.work / "faults" / "tmpfs"
  mnt.mkdir(parents=True, exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mnt)], capture_output=True).returncode:
    return None  # no permission to mount here
  try:
    out = mnt / "ft"
    r = finish(start(ctx, argv_of(ctx, "finetune", out)))
    empty = [str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file() and p.stat().st_size == 0]
    temporary = [e for e in empty if ".orbax-checkpoint-tmp" in e]  # an unfinished save, removed by the rerun
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    again = rerun_until_done(ctx, "finetune", out)
    return {**{k: r[k] for k in ("rc", "lines", "tracebacks", "crash", "last")}, "empty_files": empty,
            "empty_in_temporaries": temporary,
            "rerun_rc": again["rc"], "deleted": again["deleted"]}
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)


def bad_gguf(ctx: Ctx) -> list[dict]:
  from convert.sources import fetch_gguf

  good = Path(fetch_gguf("smollm2")).read_bytes()
  rows = []
  for name, raw in (("truncated at 1 MiB", good[:1 << 20]),
                    ("tensor count 2^60", good[:8] + struct.pack("<Q", 1 << 60) + good[16:1 << 20])):
    f = ctx.work / "faults" / f"bad_{len(rows)}.gguf"
    f.write_bytes(raw)
    shutil.rmtree(ctx.work / "faults" / "up", ignore_errors=True)
    r = finish(start(ctx, ["upcycle", str(f), str(ctx.work / "faults" / "up"), "--method", "copy"]))
    rows.append({"case": name, **{k: r[k] for k in ("rc", "lines", "tracebacks", "last")}})
  return rows


CASES = {"kill": lambda ctx: {c: kill_at_every_write(ctx, c) for c in ("finetune", "fit", "route-train")},
         "two_writers": lambda ctx: {c: two_writers(ctx, c) for c in ("fit", "finetune")},
         "sigint": lambda ctx: [signal_during(ctx, signal.SIGINT, s) for s in range(4)],
         "sigterm": lambda ctx: [signal_during(ctx, signal.SIGTERM, s) for s in range(2)],
         "full_disk": full_disk, "gguf": bad_gguf}


def run_tree(ctx: Ctx, cases, old: dict | None = None, progress=None) -> dict:
  """Every case of ``cases`` run on ``ctx``'s tree; the others taken from ``old`` (a saved run of that tree);
  ``progress(results so far)`` after each case."""
  make_fixtures(ctx)
  (ctx.work / "faults").mkdir(exist_ok=True)
  if not (ctx.work / "tuned" / "model").exists():
    assert finish(start(ctx, argv_of(ctx, "finetune", ctx.work / "tuned")))["rc"] == 0
  res = {}
  for name in CASES:
    res[name] = CASES[name](ctx) if name in cases or name not in (old or {}) else old[name]
    if progress is not None:
      progress(res)
  print(f"[{ctx.repo.name}] done", flush=True)
  return res


def summary_rows(res: dict) -> list[tuple[str, str]]:
  """(case, what the user met) for one tree."""
  rows = []
  for c, k in res["kill"].items():
    rows.append((f"`{c}` SIGKILLed after each of its {k['writes']} writes, then rerun",
                 f"rerun finished {k['finished_by_rerun']}/{len(k['rows'])}; manual deletions {k['manual_deletions']}; "
                 f"tracebacks {k['tracebacks']}; result equal to an uninterrupted run {k['same_result']}/{len(k['rows'])}"))
  for c, t in res["two_writers"].items():
    s = t["second"]
    rows.append((f"two `{c}` into one `--out`", f"second: exit {s['rc']} after {s['seconds_to_exit']} s, {s['lines']} "
                 f"lines, {s['tracebacks']} tracebacks; first exit {t['first_rc']}, complete: {t['first_complete']}"))
  for name in ("sigint", "sigterm"):
    runs = res[name]
    rows.append((f"{'Ctrl-C' if name == 'sigint' else 'SIGTERM'} during `finetune` ({len(runs)} tries)",
                 f"exits {[r['rc'] for r in runs]}; crashes {sum(r['crash'] for r in runs)}; lines "
                 f"{[r['lines'] for r in runs]}; tracebacks {sum(r['tracebacks'] for r in runs)}; reruns finished "
                 f"{sum(r['rerun_rc'] == 0 for r in runs)}/{len(runs)}, manual deletions {sum(r['deleted'] for r in runs)}"))
  d = res["full_disk"]
  rows.append(("full disk (450 KiB tmpfs) during `finetune`, rerun after it grows", "no tmpfs here" if d is None else
               f"exit {d['rc']}, {d['lines']} lines, {d['tracebacks']} tracebacks, 0-byte files {len(d['empty_files'])} "
               f"({len(d.get('empty_in_temporaries', []))} inside orbax's unfinished saves); "
               f"rerun exit {d['rerun_rc']}, manual deletions {d['deleted']}"))
  for g in res["gguf"]:
    rows.append((f"GGUF {g['case']}", f"exit {g['rc']}, {g['tracebacks']} tracebacks: {g['last']}"))
  return rows


def totals(res: dict) -> dict:
  runs = res["sigint"] + res["sigterm"] + ([res["full_disk"]] if res["full_disk"] else [])
  kill_rows = [r for k in res["kill"].values() for r in k["rows"]]
  return {"tracebacks": sum(r["tracebacks"] for r in runs + kill_rows + res["gguf"]) +
          sum(t["second"]["tracebacks"] for t in res["two_writers"].values()),
          "crashes": sum(r["crash"] for r in runs),
          "manual_deletions": sum(r["deleted"] for r in runs + kill_rows)}


def write(out: Path, result: dict) -> str:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
  if "after" not in result:  # the before tree's rows, saved while the after tree runs
    return ""
  after = summary_rows(result["after"])
  before = summary_rows(result["before"]) if "before" in result else [("", "—")] * len(after)
  lines = ["# Faults through the CLI, before and after issue 39", "",
           "| case | before | after |", "|---|---|---|"]
  lines += [f"| {a[0]} | {b[1].replace('|', '/')} | {a[1].replace('|', '/')} |" for b, a in zip(before, after)]
  tb, ta = (totals(result[k]) if k in result else {} for k in ("before", "after"))
  lines += ["", f"Totals (tracebacks, crashes, manual deletions): before {tb}, after {ta}.", "",
            "Made by " + ", then ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
            + f" (before: {result.get('before_rev')})."]
  md = "\n".join(lines) + "\n"
  (out / "results.md").write_text(md)
  return md


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--work", default="runs/faults", help="fixtures, case directories, the --before checkout")
  ap.add_argument("--before", default=None, help="a git revision to run the cases against too")
  ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
  ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                  help="run these; the others are taken from OUT/results.json when it has them")
  args = ap.parse_args(argv)
  work, data = Path(args.work).absolute(), str(Path(args.data_dir).absolute())
  saved = Path(args.out) / "results.json"
  old = json.loads(saved.read_text()) if saved.exists() else {}
  command = " ".join(["python", *sys.argv])
  result = {"command": command, "before_rev": args.before,
            "commands": [*old.get("commands", [old["command"]] if "command" in old else []), command]}
  if args.before:
    same = old.get("before_rev") == args.before
    result["before"] = run_tree(Ctx(checkout(args.before, work / "before"), work / "before_work", data), args.cases,
                                old.get("before") if same else None)
    write(Path(args.out), result)
  partial = lambda res: (Path(args.out) / "partial_after.json").write_text(json.dumps(res, default=str))
  previous = old.get("after") or (json.loads((Path(args.out) / "partial_after.json").read_text())
                                  if (Path(args.out) / "partial_after.json").exists() else None)
  result["after"] = run_tree(Ctx(ROOT, work / "after_work", data), args.cases, previous, partial)
  (Path(args.out) / "partial_after.json").unlink(missing_ok=True)
  print(write(Path(args.out), result))


if __name__ == "__main__":
  main()
