"""The tables from the cells' saved probabilities (PROTOCOL.md §6): per dataset and regime, every method's metrics
(means over seeds), its differences from MAP and from temperature scaling (per-question paired bootstrap pooled
over seeds), the primary comparisons Holm-corrected, the at-chance flag, and OOD detection for the shift sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmoe_jax import metrics as M
from bmoe_jax import plots
from bmoe_jax.files import read_json, write_json, write_text
from bmoe_jax.pipeline.data import eval_key
from experiments.carve_smollm2 import wilson
from experiments.tables import protocol as P
from experiments.tables import routing as RT

METRICS = ("acc", "nll", "ece", "brier", "aurc", "acc_at_80", "err_auroc")
PAIRED = {"nll": M.nll, "ece": M.ece, "brier": M.brier, "aurc": M.aurc, "err_auroc": M.error_auroc,
          "acc": M.accuracy}


def _load(path: Path) -> dict:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def load_cells(work: Path, name: str, regime: str, seeds=P.SEEDS) -> dict:
  """{method: [per-seed arrays dict]} of one dataset and regime, the routing cells' methods too (the deep
  ensemble repeated per seed)."""
  methods: dict = {}
  for seed in seeds:
    cell = work / name / f"seed{seed}" / regime
    for path in sorted([*(cell / "methods").glob("*.npz"), *(cell / "routing" / "methods").glob("*.npz")]):
      if path.name.endswith(".tmp.npz"):  # a save that was interrupted
        continue
      methods.setdefault(path.stem, []).append(_load(path))
  ens = work / name / f"{P.ENSEMBLE}_{regime}.npz"
  if ens.exists():
    methods[P.ENSEMBLE] = [_load(ens)] * len(seeds)
  return {m: runs for m, runs in methods.items() if len(runs) == len(seeds)}


def chance(labels: np.ndarray, probs: np.ndarray, name: str) -> float:
  """Chance accuracy: the majority-class rate for BoolQ, else the mean of 1 / (the question's choices)."""
  if name == "boolq":
    return float(max(np.mean(labels == 0), np.mean(labels == 1)))
  return float(np.mean(1.0 / np.sum(probs > 1e-12, axis=1)))


def table(cells: dict, key: str, name: str, num_samples: int = 2000) -> dict:
  """Metrics (seed means), paired differences vs MAP and TS, and the at-chance flag of one evaluation set."""
  labels = cells["map"][0][f"{key}/labels"]
  probs = {m: np.stack([r[f"{key}/probs"] for r in runs]) for m, runs in cells.items()}
  rows = {m: {k: float(np.nanmean([_defined(M.summary(p, labels)[k]) for p in ps])) for k in METRICS}
          for m, ps in probs.items()}
  right = int(round(rows["map"]["acc"] * len(labels) * len(probs["map"]))), len(labels) * len(probs["map"])
  acc_ci, base = wilson(*right), chance(labels, probs["map"][0], name)
  out = {"n": int(len(labels)), "seeds": len(probs["map"]), "rows": rows, "chance": base, "map_acc_ci": acc_ci,
         "at_chance": bool(acc_ci[0] <= base <= acc_ci[1]), "paired": {}}
  for m in probs:
    for b in P.BASELINES:
      if m != b and b in probs:
        out["paired"][f"{m} - {b}"] = {k: M.paired_difference(fn, probs[m], probs[b], labels,
                                                              num_samples=num_samples)
                                       for k, fn in PAIRED.items()}
  return out


def _defined(v):
  return np.nan if v is None else v


SCORES = ("entropy", "mi", "var_f")  # OOD scores: predictive entropy, and the epistemic ones where a method has them


def _scores(r: dict, key: str) -> dict:
  return {"entropy": M.entropy(r[f"{key}/probs"]), **{s: r[f"{key}/{s}"] for s in SCORES[1:] if f"{key}/{s}" in r}}


def ood(cells: dict, in_key: str, out_key: str, num_samples: int = 1000) -> dict:
  """Per method: OOD AUROC / AUPRC by entropy and by its epistemic scores (means over seeds), and each score's
  AUROC minus temperature scaling's entropy AUROC (``d_auroc_<score>``: paired bootstrap pooled over seeds)."""
  res = {}
  for m, runs in cells.items():
    per = [M.ood_summary(r[f"{in_key}/probs"], r[f"{out_key}/probs"],
                         {k: v for k, v in _scores(r, in_key).items() if k != "entropy"} or None,
                         {k: v for k, v in _scores(r, out_key).items() if k != "entropy"} or None) for r in runs]
    res[m] = {k: float(np.mean([p[k] for p in per])) for k in per[0] if k.startswith("au")}
    if "ts" not in cells or m == "ts":
      continue
    ref = lambda key: np.stack([M.entropy(r[f"{key}/probs"]) for r in cells["ts"]])
    for name in _scores(runs[0], in_key):
      own = lambda key: np.stack([_scores(r, key)[name] for r in runs])
      res[m][f"d_auroc_{name}"] = M.paired_auroc_difference(own(in_key), own(out_key), ref(in_key), ref(out_key),
                                                            num_samples=num_samples)
  return res


def holm_primary(results: dict) -> list[dict]:
  """The primary comparisons (protocol.PRIMARY vs MAP and TS on PRIMARY_METRICS, every dataset and regime),
  Holm-adjusted together."""
  rows = []
  for (name, regime), t in results.items():
    for b in P.BASELINES:
      for metric in P.PRIMARY_METRICS:
        d = t["in"]["paired"].get(f"{P.PRIMARY} - {b}", {}).get(metric)
        if d is not None:
          rows.append({"dataset": name, "regime": regime, "vs": b, "metric": metric, **d})
  for row, adj in zip(rows, M.holm([r["p"] for r in rows]) if rows else []):
    row["p_holm"] = float(adj)
  return rows


def build(work: Path, datasets: dict = P.DATASETS, seeds=P.SEEDS, num_samples: int = 2000) -> dict:
  """{(dataset, regime): {"in": table, <shift key>: table with "ood"}} of every cell found under ``work``."""
  results = {}
  for name, spec in datasets.items():
    for regime in P.REGIMES:
      cells = load_cells(work, name, regime, seeds)
      if "map" not in cells:
        continue
      in_key = eval_key(spec.test)
      t = {"in": {**table(cells, in_key, name, num_samples), "protocol": versions(work, name, regime, seeds)}}
      for shift in spec.shift:
        key = eval_key(shift)
        t[key] = {**table(cells, key, name, num_samples), "ood": ood(cells, in_key, key, num_samples // 2)}
      results[(name, regime)] = t
  return results


def versions(work: Path, name: str, regime: str, seeds) -> list[str]:
  """The protocol versions that made a dataset and regime's cells (fine-tuning, evaluation, routing)."""
  cell = lambda k: work / name / f"seed{k}"
  paths = [p for k in seeds for p in (cell(k) / "finetune.json", cell(k) / regime / "cell.json",
                                      cell(k) / regime / "routing" / "cell.json") if p.exists()]
  return sorted({read_json(p)["protocol"] for p in paths})


def wall_times(work: Path, datasets, seeds) -> dict:
  """{dataset: {"finetune": [s per seed], "<regime>/<method>": mean s over seeds}} from the cells' records
  (the methods' times include their fitting; the Bayesian-MoE rows share one factor pass, not included)."""
  out = {}
  for name in datasets:
    runs = [work / name / f"seed{k}" for k in seeds]
    ft = [read_json(r / "finetune.json")["seconds"] for r in runs if (r / "finetune.json").exists()]
    if not ft:
      continue
    times: dict = {"finetune": ft}
    for regime in P.REGIMES:
      for cell in ("cell.json", "routing/cell.json"):
        recs = [read_json(r / regime / cell)["seconds"] for r in runs if (r / regime / cell).exists()]
        for m in dict.fromkeys(k for rec in recs for k in rec):
          vals = [rec[m] for rec in recs if rec.get(m) is not None]
          if vals:
            times[f"{regime}/{m}"] = float(np.mean(vals))
    out[name] = times
  return out


def times_markdown(times: dict) -> list[str]:
  lines = ["## Wall times (2 CPU cores, seconds; methods: mean over seeds, including their fitting)", ""]
  for name, t in times.items():
    ft = ", ".join(f"{x:.0f}" for x in t["finetune"])
    rest = "; ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "finetune")
    lines += [f"- **{name}**: fine-tuning per seed {ft}" + (f"; {rest}" if rest else ""), ""]
  return lines


def _fmt(d: dict) -> str:
  return f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def plot_paired(t: dict, path: Path, title: str) -> Path:
  """Every method's paired difference from TS (seed mean, per-question bootstrap 95%) on the primary metrics;
  blue where the interval excludes zero."""
  panels = {f"Δ{k} vs TS" + (" (higher is better)" if k == "err_auroc" else ""):
            {m.split(" - ")[0]: (d[k]["diff"], *d[k]["ci"]) for m, d in t["paired"].items() if m.endswith(" - ts")}
            for k in P.PRIMARY_METRICS}
  return plots.forest(panels, path, title=title)


def ood_markdown(table: dict) -> list[str]:
  """OOD detection (the in-distribution test set against one shift set) by each score, with each score's AUROC
  minus TS's entropy AUROC; the number of those differences is stated (no correction)."""
  n = sum(k.startswith("d_auroc_") for o in table.values() for k in o)
  get = lambda o, k: f"{o[k]:.3f}" if k in o else "—"
  diff = lambda o, k: _fmt(o[k]) if k in o else "—"
  lines = ["", f"OOD detection; Δ: AUROC minus TS's entropy AUROC, paired bootstrap 95% ({n} differences in this "
           "table, not corrected).", "",
           "| method | AUROC entropy | AUPRC entropy | AUROC MI | AUPRC MI | AUROC var f | Δ entropy | Δ MI "
           "| Δ var f |", "|---|" + "---:|" * 8]
  for m, o in table.items():
    lines.append(f"| {m} | {get(o, 'auroc')} | {get(o, 'auprc')} | {get(o, 'auroc_mi')} | {get(o, 'auprc_mi')} | "
                 f"{get(o, 'auroc_var_f')} | {diff(o, 'd_auroc_entropy')} | {diff(o, 'd_auroc_mi')} | "
                 f"{diff(o, 'd_auroc_var_f')} |")
  return lines


def stability_markdown(stab: dict, where) -> list[str]:
  """The routing cells' stability table (mean Jaccard of the top-k sets under input noise, two-draw agreement)."""
  if not stab:
    return []
  gammas = next(iter(stab.values()))["gamma"]
  lines = [f"## Routing stability: {where[0]}, {where[1]} MAP ({next(iter(stab.values()))['seeds']} seeds)", "",
           "Mean Jaccard of the top-k sets under input noise γ × the router inputs' mean norm (common random "
           "numbers), over the routers' layers; two draws: Jaccard of two independent draws on the same input.", "",
           "| method | " + " | ".join(f"γ={g:g}" for g in gammas) + " | two draws |",
           "|---|" + "---:|" * (len(gammas) + 1)]
  lines += [f"| {m} | " + " | ".join(f"{j:.3f}" for j in v["jaccard"]) + f" | {v['resample']:.3f} |"
            for m, v in stab.items()]
  return lines + [""]


def markdown(results: dict, primary: list[dict], stab: dict | None = None, times: dict | None = None) -> str:
  lines = [f"# The papers' tables (protocol v{P.VERSION})", ""]
  for (name, regime), t in results.items():
    for key, s in t.items():
      head = f"## {name}, {regime} MAP: {'in-distribution' if key == 'in' else 'shift to ' + key}"
      flag = " **At chance: calibration columns are not results.**" if s["at_chance"] else ""
      made = f" Cells made under protocol v{', v'.join(t['in']['protocol'])}." if t["in"].get("protocol") else ""
      lines += [head, "", f"n = {s['n']} questions x {s['seeds']} seeds; MAP accuracy 95% Wilson "
                f"[{s['map_acc_ci'][0]:.3f}, {s['map_acc_ci'][1]:.3f}], chance {s['chance']:.3f}.{flag}{made}", "",
                "| method | " + " | ".join(METRICS) + " | ΔNLL vs MAP | ΔNLL vs TS | ΔECE vs TS | ΔAURC vs TS |",
                "|---|" + "---:|" * (len(METRICS) + 4)]
      for m, row in s["rows"].items():
        pair = lambda b, k: _fmt(s["paired"][f"{m} - {b}"][k]) if f"{m} - {b}" in s["paired"] else ""
        lines.append(f"| {m} | " + " | ".join(f"{row[k]:.4f}" for k in METRICS)
                     + f" | {pair('map', 'nll')} | {pair('ts', 'nll')} | {pair('ts', 'ece')} | {pair('ts', 'aurc')} |")
      if "ood" in s:
        lines += ood_markdown(s["ood"])
      lines.append("")
  lines += stability_markdown(stab or {}, RT.WHERE) + (times_markdown(times) if times else [])
  lines += [f"## Primary comparisons ({P.PRIMARY}; {len(primary)} comparisons, Holm-adjusted p)", "",
            "| dataset | regime | vs | metric | difference [95%] | p | Holm p |", "|---|---|---|---|---:|---:|---:|"]
  lines += [f"| {r['dataset']} | {r['regime']} | {r['vs']} | {r['metric']} | {_fmt(r)} | {r['p']:.3f} | "
            f"{r['p_holm']:.3f} |" for r in primary]
  return "\n".join(lines) + "\n"


def _link_text(link: dict | None) -> str:
  """The link choice of PROTOCOL.md §4 (dev NLL of BMoE grid per link), as a closing paragraph."""
  if link is None:
    return ""
  dev = ", ".join(f"`{k}` {v:.4f}" for k, v in sorted(link["dev_nll"].items(), key=lambda kv: kv[1]))
  name, seed, regime = link["where"]
  return (f"\n\n**Link** (chosen on dev, {name} seed {seed} {regime} regime, BMoE grid; protocol {link['protocol']}): "
          f"`{link['link']}`. Dev NLL per link: {dev}.\n")


def write(work: Path, out: Path, datasets: dict = P.DATASETS, seeds=P.SEEDS, num_samples: int = 2000) -> dict:
  results = build(work, datasets, seeds, num_samples)
  primary = holm_primary(results)
  flat = {f"{n}/{r}": t for (n, r), t in results.items()}
  stab = RT.stability_table(work, *RT.WHERE, seeds) if RT.WHERE[0] in datasets else {}
  out.mkdir(parents=True, exist_ok=True)
  times = wall_times(work, datasets, seeds)
  link = read_json(work / "link.json") if (work / "link.json").exists() else None  # the dev choice (§4)
  write_json(out / "results.json", {"protocol": P.VERSION, "link": link, "tables": flat, "primary": primary,
                                    "routing_stability": stab, "seconds": times}, default=float)
  write_text(out / "results.md", markdown(results, primary, stab, times) + _link_text(link))
  for (name, regime), t in results.items():
    plot_paired(t["in"], out / "plots" / f"paired_{name}_{regime}.png", f"{name}, {regime} MAP")
  return flat
