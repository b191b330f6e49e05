"""The fine-tuned carved SmolLM2 on real data over several seeds (issue 15): ``bmoe demo --data-dir`` once
per seed (carving, MAP fine-tuning on OBQA, Bayesian-MoE with grid and evidence lambda, temperature
scaling; evaluation on OBQA test and under shift on ARC-C, ARC-E and four MMLU subjects), then one table
of the mean over seeds with a 95% t-interval, and each method's difference to MAP paired by seed.

  .venv/bin/python experiments/demo_seeds.py --data-dir ../shared/data --seeds 0,1,2

Each seed runs ``bmoe demo --data-dir DATA --out-dir RUNS/sSEED --seed SEED --ci [DEMO FLAGS]`` (a seed
whose ``results.json`` exists is not rerun); the seed draws the carving's calibration windows, the data
subsets and the fine-tuning order, so the intervals hold all three sources of noise. Within a seed every
method sees the same questions. Writes OUT/{results.json, results.md} and copies each seed's demo.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

METRICS = ("acc", "nll", "ece", "brier")
CHANCE = 0.25  # four choices (OBQA, MMLU; ARC: almost all questions)


def run_seed(seed: int, runs: Path, data_dir: str, extra: list[str]) -> Path:
  out = runs / f"s{seed}"
  if not (out / "results.json").exists():
    cmd = [sys.executable, "-m", "bmoe_jax.cli", "demo", "--data-dir", data_dir, "--out-dir", str(out),
           "--seed", str(seed), "--ci", "--quiet", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
  return out


def t_interval(x) -> tuple[float, float, float]:
  """Mean and 95% Student-t interval over seeds (the interval is the mean itself for one seed)."""
  x = np.asarray(x, float)
  if len(x) < 2:
    return float(x.mean()), float(x.mean()), float(x.mean())
  half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
  return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def aggregate(per_seed: list[dict]) -> dict:
  """{method: {dataset: {metric: (mean, lo, hi), metric_vs_map: (mean, lo, hi)}}} over seeds."""
  methods = per_seed[0]["methods"]
  out = {}
  for m in methods:
    out[m] = {}
    for ds in methods[m]:
      row = {}
      for k in METRICS:
        vals = [r["methods"][m][ds][k] for r in per_seed]
        row[k] = t_interval(vals)
        boot = per_seed[0]["methods"][m][ds].get("ci95", {}).get(k)
        if len(per_seed) == 1 and boot:  # one seed: its bootstrap interval over questions
          row[k] = (vals[0], *boot)
        if m != "map" and "map" in methods:
          row[f"{k}_vs_map"] = t_interval(np.subtract(vals, [r["methods"]["map"][ds][k] for r in per_seed]))
      row["acc_ci_per_seed"] = [r["methods"][m][ds].get("ci95", {}).get("acc") for r in per_seed]
      row["acc_per_seed"] = [r["methods"][m][ds]["acc"] for r in per_seed]
      out[m][ds] = row
  return out


def _cell(v: tuple) -> str:
  return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def table(agg: dict, in_dist: str, prior: list[dict]) -> str:
  datasets = list(next(iter(agg.values())))
  short = {ds: ds.split("_test")[0] + ("" if not ds.startswith("mmlu") else " (4 subjects)") for ds in datasets}
  lines = []
  for k in METRICS:
    lines += [f"### {k.upper()} (mean over seeds, 95% t-interval over seeds; one seed: bootstrap over questions; "
              f"in-distribution: {in_dist})", "",
              "| method | " + " | ".join(short[ds] for ds in datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for m, per in agg.items():
      lines.append(f"| {m} | " + " | ".join(_cell(per[ds][k]) for ds in datasets) + " |")
    diff = [m for m in agg if f"{k}_vs_map" in agg[m][datasets[0]]]
    lines += ["", f"{k.upper()} minus MAP's, paired by seed:", "",
              "| method | " + " | ".join(short[ds] for ds in datasets) + " |", "|---|" + "---:|" * len(datasets)]
    lines += [f"| {m} | " + " | ".join(_cell(agg[m][ds][f"{k}_vs_map"]) for ds in datasets) + " |" for m in diff]
    lines.append("")
  lines += ["### Accuracy per seed (bootstrap 95% interval over that seed's questions)", "",
            "| method | seed | " + " | ".join(short[ds] for ds in datasets) + " |",
            "|---|---:|" + "---:|" * len(datasets)]
  for m, per in agg.items():
    for i, p in enumerate(prior):
      cells = [(per[ds]["acc_per_seed"][i], per[ds]["acc_ci_per_seed"][i]) for ds in datasets]
      cell = lambda a, c: f"{a:.3f}" + ("" if c is None else f" [{c[0]:.3f}, {c[1]:.3f}]")
      lines.append(f"| {m} | {p['seed']} | " + " | ".join(cell(a, c) for a, c in cells) + " |")
  lines += ["", "### Prior precision and temperature per seed", "",
            "| seed | grid lambda (bmoe) | evidence lambda (bmoe_ml) | T (ts) |", "|---:|---:|---:|---:|"]
  lines += [f"| {p['seed']} | {p['bmoe']:.3g} | {p['bmoe_ml']:.3g} | {p['ts']:.3f} |" for p in prior]
  return "\n".join(lines)


def fitted(run: Path, seed: int) -> dict:
  info = json.loads((run / "demo.json").read_text())
  post = info["posterior"]
  return {"seed": seed, "bmoe": post["bmoe"]["prior_precision"], "bmoe_ml": post["bmoe_ml"]["prior_precision"],
          "ts": info["temperature"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--runs", default="runs/demo_seeds", help="the demos' outputs (not committed)")
  ap.add_argument("--out", default="experiments/results/carved_obqa")
  args, extra = ap.parse_known_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = [run_seed(s, Path(args.runs), args.data_dir, extra) for s in seeds]
  per_seed = [json.loads((r / "results.json").read_text()) for r in runs]
  agg = aggregate(per_seed)
  prior = [fitted(r, s) for r, s in zip(runs, seeds)]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for r, s in zip(runs, seeds):
    shutil.copy(r / "demo.json", out / f"demo_s{s}.json")
  (out / "results.json").write_text(json.dumps({"aggregate": agg, "prior": prior, "seeds": seeds, "demo_flags": extra,
                                                "per_seed": per_seed}, indent=2))
  cmd = " ".join(["python experiments/demo_seeds.py", "--data-dir", args.data_dir, "--seeds", args.seeds,
                  "--runs", args.runs, "--out", args.out, *extra])
  above = {ds: agg["map"][ds]["acc"][1] > CHANCE for ds in agg["map"]}
  (out / "results.md").write_text(
      f"# Fine-tuned carved SmolLM2: MAP vs temperature scaling vs Bayesian-MoE ({len(seeds)} seed{'s' * (len(seeds) > 1)})\n\n"
      + table(agg, per_seed[0]["in_distribution"], prior)
      + f"\n\nMAP accuracy's interval above chance ({CHANCE}): {above}.\n\nMade by `{cmd}`.\n")
  print((out / "results.md").read_text())


if __name__ == "__main__":
  main()
