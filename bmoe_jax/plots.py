"""Reliability diagrams and confidence histograms as PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmoe_jax import metrics


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(plt, fig, path) -> Path:
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def reliability_diagram(probs_nc, labels_n, path: str | Path, *, title: str = "", num_bins: int = 15) -> Path:
  """Accuracy per confidence bin against the diagonal (gap shaded), with the confidence histogram
  below; the title carries ACC and ECE."""
  plt = _plt()
  b = metrics.calibration_bins(probs_nc, labels_n, num_bins)
  centers = (b["edges"][:-1] + b["edges"][1:]) / 2
  width = 1.0 / num_bins
  acc = np.nan_to_num(b["accuracy"])
  conf = np.where(b["count"] > 0, b["confidence"], centers)
  fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.2, 5.4), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
  ax.bar(centers, acc, width=width, edgecolor="black", color="#4c72b0", label="accuracy")
  ax.bar(centers, conf - acc, bottom=acc, width=width, edgecolor="#c44e52", color="#c44e52", alpha=0.3,
         label="gap")
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.legend(loc="upper left", fontsize=8)
  ax.set_title(f"{title}  ACC {metrics.accuracy(probs_nc, labels_n):.3f}  "
               f"ECE {metrics.ece(probs_nc, labels_n, num_bins):.3f}".strip(), fontsize=9)
  hx.bar(centers, b["count"] / b["count"].sum(), width=width, edgecolor="black", color="#8c8c8c")
  hx.set_xlim(0, 1)
  hx.set_xlabel("confidence")
  hx.set_ylabel("fraction")
  return _save(plt, fig, path)


def stability_curves(curves: dict, path: str | Path, *, title: str = "") -> Path:
  """Routing stability: mean Jaccard of the top-k sets against the input-noise level gamma (log axis), one line
  per method (``curves``: {method: (gammas, jaccards)})."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, (g, j) in curves.items():
    ax.plot(g, j, marker="o", label=name, lw=2.5 if name == "map" else 1.2)
  ax.set_xscale("log")
  ax.set_xlabel("noise γ (σ = γ · mean ‖u‖)")
  ax.set_ylabel("mean Jaccard of top-k sets")
  ax.set_ylim(0, 1.02)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  return _save(plt, fig, path)


def grouped_bars(values: dict, path: str | Path, *, ylabel: str, title: str = "", log: bool = False) -> Path:
  """Bars of ``values`` {group: {series: value}} (a missing value is left blank), one colour per series."""
  plt = _plt()
  groups = list(values)
  series = list(dict.fromkeys(k for v in values.values() for k in v))
  width = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * max(len(series), 1) ** 0.5 + 2), 4))
  for i, name in enumerate(series):
    ys = [values[g].get(name, np.nan) for g in groups]
    ax.bar(np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width, ys, width, label=name)
  ax.set_xticks(np.arange(len(groups)), groups, rotation=45, ha="right")
  ax.set_ylabel(ylabel)
  if log:
    ax.set_yscale("log")
  if title:
    ax.set_title(title)
  if len(series) > 1:
    ax.legend(fontsize="small")
  return _save(plt, fig, path)


def forest(panels: dict, path: str | Path, *, title: str = "") -> Path:
  """Point estimates with intervals, one panel per entry of ``panels`` {panel title: {row: (estimate, low,
  high)}}, rows top to bottom in order, a dashed line at zero (paired differences)."""
  plt = _plt()
  rows = list(dict.fromkeys(r for p in panels.values() for r in p))
  fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1) + 1.5, 0.32 * len(rows) + 1.4),
                           sharey=True, squeeze=False)
  for ax, (name, vals) in zip(axes[0], panels.items()):
    for i, r in enumerate(rows):
      if r in vals:
        est, lo, hi = vals[r]
        ax.errorbar([est], [i], xerr=[[est - lo], [hi - est]], fmt="o", color="C0" if hi < 0 or lo > 0 else "gray",
                    capsize=2, markersize=4)
    ax.axvline(0.0, color="k", linestyle="--", linewidth=0.8)
    ax.set_title(name, fontsize="small")
  axes[0][0].set_yticks(range(len(rows)), rows, fontsize="small")
  axes[0][0].invert_yaxis()
  if title:
    fig.suptitle(title, fontsize="medium")
  return _save(plt, fig, path)
