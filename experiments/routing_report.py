"""Tables and plots of ``experiments/routing_carved.py``'s results.json: mean over runs (seeds) with a 95%
t-interval over seeds, per layer set. ``python experiments/routing_report.py OUT`` rewrites OUT/results.md and
OUT/*.png from OUT/results.json; ``--against OTHER`` adds a table comparing OUT's layer sets with OTHER's on the
seeds both hold (same seed, same questions: e.g. last-4-layer routers against single-layer ones)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmoe_jax.plots import stability_curves  # noqa: E402
from experiments.demo_seeds import t_interval  # noqa: E402

CALIB = ("acc", "nll", "ece", "ece10", "mce", "brier")


def _cell(vals, digits=3) -> str:
  m, lo, hi = t_interval(vals)
  return f"{m:.{digits}f}" if len(vals) < 2 else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _short(ds: str) -> str:
  return ds.split("_test")[0] + (" (4 subj.)" if ds.startswith("mmlu") else "")


def calibration_table(runs, layers, ind) -> list[str]:
  res = [r["layers"][layers]["results"] for r in runs]
  methods = list(res[0])
  lines = [f"| method | " + " | ".join(k.upper() for k in CALIB) + " |", "|---|" + "---:|" * len(CALIB)]
  for m in methods:
    lines.append(f"| {m} | " + " | ".join(_cell([x[m][ind][k] for x in res]) for k in CALIB) + " |")
  return lines


def paired_table(runs, layers, ind, metrics=("acc", "nll", "ece", "brier")) -> list[str]:
  """Each method's metric minus MAP's, paired by seed (the interval is over seeds)."""
  res = [r["layers"][layers]["results"] for r in runs]
  lines = ["| method | " + " | ".join(f"Δ{k.upper()}" for k in metrics) + " |", "|---|" + "---:|" * len(metrics)]
  for m in [m for m in res[0] if m != "map"]:
    lines.append(f"| {m} | " + " | ".join(_cell([x[m][ind][k] - x["map"][ind][k] for x in res]) for k in metrics)
                 + " |")
  return lines


def shift_table(runs, layers, ind) -> list[str]:
  res = [r["layers"][layers]["results"] for r in runs]
  methods = list(res[0])
  shifts = [d for d in res[0][methods[0]] if d != ind]
  lines = ["| method | " + " | ".join(f"{_short(d)} ACC / NLL" for d in shifts) + " | "
           + " | ".join(f"{_short(d)} AUROC" for d in shifts) + " |", "|---|" + "---:|" * (2 * len(shifts))]
  for m in methods:
    acc = [f"{np.mean([x[m][d]['acc'] for x in res]):.3f} / {np.mean([x[m][d]['nll'] for x in res]):.3f}"
           for d in shifts]
    auc = [_cell([x[m][d]["ood"]["auroc"] for x in res]) for d in shifts]
    lines.append(f"| {m} | " + " | ".join(acc + auc) + " |")
  return lines


def stability_rows(runs, layers) -> tuple[list[str], dict]:
  """Mean Jaccard over the routers' layers per gamma (``pipeline.routing.mean_curves``), mean over runs."""
  from bmoe_jax.pipeline.routing import mean_curves
  per_run = [mean_curves(r["layers"][layers]["routing"]) for r in runs]
  gammas = next(iter(per_run[0].values()))[0]
  lines = ["| method | " + " | ".join(f"γ={g:g}" for g in gammas) + " | resample |",
           "|---|" + "---:|" * (len(gammas) + 1)]
  curves = {}
  for m in per_run[0]:
    j = [p[m][1] for p in per_run]
    curves[m] = (gammas, np.mean(j, axis=0))
    lines.append(f"| {m} | " + " | ".join(_cell([x[i] for x in j]) for i in range(len(gammas)))
                 + f" | {_cell([p[m][2] for p in per_run])} |")
  return lines, curves


def cost_table(runs, layers) -> list[str]:
  """Analytic router FLOPs, forward draws, and the measured time of one batch relative to MAP's (mean over the
  runs timed on fresh batches: a run whose MAP time is under 1 ms answered from the evaluation's cache, as
  seed 0's timing did before ``time_methods`` gave every call a fresh copy of the batch)."""
  one = runs[0]["layers"][layers]
  fwd = one["routing"]["forward_flops_per_token"]
  draws = {m: i.get("draws", 1) for m, i in one["info"].items()}
  t = [r["layers"][layers]["seconds_per_batch"] for r in runs]
  timed = [(r["seed"], x) for r, x in zip(runs, t) if x.get("map", 0.0) >= 1e-3]
  lines = ["| method | router FLOPs / token | % of a forward | forward draws per prediction | time / MAP's |",
           "|---|---:|---:|---:|---:|"]
  for m in t[0]:
    f = one["routing"]["router_flops_per_token"].get(m, 0.0)
    ratio = _cell([x[m] / x["map"] for _, x in timed], 2) if timed else "—"
    lines.append(f"| {m} | {f:,.0f} | {100 * f / fwd:.3f}% | {draws.get(m, 1)} | {ratio} |")
  lines += ["", f"Forward FLOPs per token (sequence 128): {fwd:,.0f}.", "",
            f"Times: one compiled call on the first in-distribution batch, median of the repeats, relative to MAP's "
            f"in the same run; seeds {[s for s, _ in timed]} (a run whose MAP answered from the evaluation's cache, "
            f"under 1 ms, is left out). Wall clock on 2 CPU cores shared with other work: read them as ±20%."]
  return lines


def _top_layer_stability(routing: dict, m: str, gamma_index: int) -> tuple[str, str]:
  """(Jaccard at one gamma, resample Jaccard) of method ``m`` in the top routed layer, or dashes."""
  stab = routing["stability"]
  top = max(stab["map"], key=int)
  if top not in stab.get(m, {}):
    return "—", "—"
  return f"{stab[m][top]['jaccard'][gamma_index]:.3f}", f"{stab[m][top]['resample']:.3f}"


def layer_sets_table(runs, other_runs, ind, gamma_index=4) -> list[str]:
  """Per method present in both: ΔNLL / ΔECE / ΔACC against the same run's MAP, the top layer's Jaccard at one
  gamma and its resample Jaccard, for every layer set of both results, on the seeds both hold (mean over them)."""
  mine = {r["seed"]: r for r in runs}
  pairs = [(mine[r["seed"]], r) for r in other_runs if r["seed"] in mine]
  if not pairs:
    return []
  sets = [(ls, 0) for ls in pairs[0][0]["layers"]] + [(ls, 1) for ls in pairs[0][1]["layers"]]
  methods = [m for m in pairs[0][0]["layers"][sets[0][0]]["results"] if m != "map"
             and all(m in p[i]["layers"][ls]["results"] for p in pairs for ls, i in sets)]
  routing = pairs[0][0]["layers"][sets[0][0]]["routing"]
  top = max(routing["stability"]["map"], key=int)
  gamma = routing["stability"]["map"][top]["gamma"][gamma_index]
  head = ["ΔNLL", "ΔECE", "ΔACC", f"Jaccard γ={gamma:g}", "resample"]
  lines = [f"Seeds {sorted(p[0]['seed'] for p in pairs)}, {_short(ind)}; Δ against the same run's MAP; Jaccard of "
           f"the top-k sets in the top layer ({top}); means over the seeds.", "",
           "| method | layers | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(head)]
  same = []
  for m in methods:
    rows = []
    for ls, i in sets:
      res = [p[i]["layers"][ls]["results"] for p in pairs]
      d = [np.mean([x[m][ind][k] - x["map"][ind][k] for x in res]) for k in ("nll", "ece", "acc")]
      stab = [_top_layer_stability(p[i]["layers"][ls]["routing"], m, gamma_index) for p in pairs]
      cells = list(stab[0]) if "—" in stab[0] else [f"{np.mean([float(s[j]) for s in stab]):.3f}"
                                                         for j in range(2)]
      rows.append((d, f"| {m} | `{ls}` | " + " | ".join(f"{v:+.3f}" for v in d) + f" | {cells[0]} | {cells[1]} |"))
    if all(np.allclose(r[0], rows[0][0], atol=1e-4) for r in rows):
      same.append(m)  # e.g. ts, bmoe, and the joint posterior (every carved layer): no router layer set in them
    else:
      lines += [r[1] for r in rows]
  if same:
    lines += ["", f"Equal (within 1e-4) in every layer set, since they do not depend on it: {', '.join(same)}."]
  return lines


def write_report(out: Path, against: Path | None = None) -> Path:
  out = Path(out)
  d = json.loads((out / "results.json").read_text())
  runs = d["runs"]
  ind = runs[0]["in_distribution"]
  lines = ["# Bayesian routers on the carved SmolLM2 testbed", "",
           f"`{d['command']}`", "",
           f"{len(runs)} run(s) (seeds {[r['seed'] for r in runs]}); mean with a 95% t-interval over seeds. "
           f"In-distribution: {ind}; ECE with 15 and 10 bins.", ""]
  for layers in runs[0]["layers"]:
    lines += [f"## Routers in layers `{layers}`", "", f"### In-distribution calibration ({_short(ind)})", ""]
    lines += calibration_table(runs, layers, ind)
    lines += ["", "Minus MAP's, paired by seed:", ""] + paired_table(runs, layers, ind)
    lines += ["", "### Under shift: accuracy / NLL, and OOD detection by predictive entropy (AUROC)", ""]
    lines += shift_table(runs, layers, ind)
    stab, curves = stability_rows(runs, layers)
    lines += ["", "### Routing stability (mean Jaccard of the top-k sets over the routed layers; input noise with "
              "common random numbers; resample: two independent draws on the same input)", ""] + stab
    stability_curves(curves, out / f"stability_{layers.replace(':', '')}.png", title=f"routers in {layers}")
    lines += ["", f"![stability](stability_{layers.replace(':', '')}.png)", "", "### Cost", ""]
    lines += cost_table(runs, layers) + [""]
  if against is not None:
    other = json.loads((Path(against) / "results.json").read_text())["runs"]
    lines += [f"## Layer sets compared (against `{against}`)", ""] + layer_sets_table(runs, other, ind) + [""]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  return out / "results.md"


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("out", type=Path, help="an experiments/routing_carved.py --out directory")
  ap.add_argument("--against", type=Path, default=None, help="another --out directory to compare layer sets with")
  a = ap.parse_args()
  print(write_report(a.out, a.against).read_text())
