"""Fine-tuning that fine-tunes (issue 37): MAP on the full ARC-Easy training set from the healed testbed, its
learning curves, and the two regimes people use: early-stopped at the best dev NLL, and trained well past it
(the papers' long fine-tuning, where MAP becomes overconfident).

  .venv/bin/python experiments/finetune_arce.py --model runs/healed --data-dir ../shared/data

1. One ``bmoe finetune`` per ``--runs`` entry ``LR:SCHEDULE:EPOCHS`` (each exact command is in results.md): all
   2251 training questions, ARC-E dev for validation after every epoch, no early stop; each run keeps its
   best-dev-NLL state (``model``: the early-stopped regime) and its last one (``model_final``: the long one).
   The default runs are a gentle one (lr 1e-4, cosine) and two aggressive ones (lr 5e-4 and 1e-3, constant):
   on 2 cores the long regime is reached by a larger constant learning rate, not by more epochs (the gentle
   run never passes its best dev NLL in 8).
2. ARC-E test (every question): the healed model zero-shot and every run's two checkpoints; accuracy with 95%
   Wilson intervals, NLL, ECE (15 bins), test NLL minus the run's best dev NLL, and each fine-tuned model's
   accuracy gain over the zero-shot model with a paired bootstrap interval (per question, 2000 resamples).
   Test probabilities are cached in WORK (``*.npz``), so a rerun recomputes the tables without the model.

Continuation scoring, per-token normalised (the CLI's default), the same for every model. Writes
OUT/results.json, OUT/results.md and OUT/learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmoe_jax import metrics as M  # noqa: E402
from bmoe_jax.baselines.methods import map_method  # noqa: E402
from bmoe_jax.cli import main as bmoe  # noqa: E402
from bmoe_jax.evaluate import collect  # noqa: E402
from bmoe_jax.pipeline.data import batches_for, load_examples, load_model_and_tokenizer  # noqa: E402
from bmoe_jax.task import Task  # noqa: E402
from experiments.carve_smollm2 import wilson  # noqa: E402

ZERO_SHOT = "healed zero-shot"


def parse_run(spec: str) -> dict:
  """'1e-4:cosine:8' -> {'lr': 1e-4, 'schedule': 'cosine', 'epochs': 8, 'name': 'lr0.0001_cosine_8ep'}."""
  try:
    lr, schedule, epochs = spec.split(":")
    run = {"lr": float(lr), "schedule": schedule, "epochs": int(epochs)}
  except ValueError:
    raise SystemExit(f"--runs {spec!r}: expected LR:SCHEDULE:EPOCHS, e.g. 1e-4:cosine:8") from None
  return {**run, "name": f"lr{run['lr']:g}_{schedule}_{run['epochs']}ep"}


def finetune_argv(args, run: dict, out: Path) -> list[str]:
  n_train = len(load_examples("arc_easy:train", args.data_dir)[1])
  per_epoch = math.ceil(n_train / args.batch_size)
  schedule = [] if run["schedule"] == "cosine" else ["--schedule", run["schedule"]]
  return ["finetune", "--model", args.model, "--data-dir", args.data_dir, "--train", "arc_easy:train",
          "--val", "arc_easy:dev", "--epochs", str(run["epochs"]), "--eval-every", str(per_epoch), "--patience", "0",
          "--lr", str(run["lr"]), *schedule, "--warmup-ratio", "0.05", "--batch-size", str(args.batch_size),
          "--max-length", "256", "--trainable", args.trainable, "--cache-prefix", "--checkpoint-every",
          str(per_epoch), "--keep-checkpoints", "2", "--seed", str(args.seed), "--out", str(out), "--quiet"]


def test_scores(model_dir: str, cache: Path, args) -> tuple[np.ndarray, np.ndarray]:
  """ARC-E test probabilities and labels of one model, computed once and cached in ``cache``."""
  if cache.exists():
    with np.load(cache) as z:
      return z["probs"], z["labels"]
  params, cfg, tok = load_model_and_tokenizer(model_dir)
  batches, class_ids, _ = batches_for("arc_easy:test", tok, data_dir=args.data_dir, batch_size=args.batch_size,
                                      max_length=256, scoring="continuation", norm="token")
  probs, labels = collect(map_method(params, Task(cfg, class_ids)), batches, progress=True, desc=Path(model_dir).name)
  np.savez(cache, probs=probs, labels=labels)
  return probs, labels


def paired_gain(right_a: np.ndarray, right_b: np.ndarray, seed: int) -> tuple[float, list[float]]:
  """Accuracy gain of b over a and its paired 95% bootstrap interval (questions resampled, 2000 times)."""
  diff = right_b.astype(np.float64) - right_a
  return float(diff.mean()), list(M.bootstrap_ci(np.mean, diff, num_samples=2000, seed=seed))


def row(probs, y, base_right, best_dev: float | None, seed: int) -> dict:
  right = probs.argmax(1) == y
  r = {"n": int(len(y)), "acc": float(right.mean()), "acc_ci": wilson(int(right.sum()), len(y)),
       "nll": M.nll(probs, y), "ece": M.ece(probs, y)}
  if best_dev is not None:
    r["nll_minus_best_dev_nll"] = r["nll"] - best_dev
    r["gain"], r["gain_ci"] = paired_gain(base_right, right, seed)
  return r


def finetune(args, run: dict, work: Path) -> dict:
  argv = finetune_argv(args, run, work)
  t0 = time.time()
  if not (work / "run.json").exists():
    assert bmoe(argv) == 0
  meta = json.loads((work / "run.json").read_text())
  return {**run, "command": "bmoe " + " ".join(argv), "history": meta["history"],
          "finetune_seconds": round(meta.get("seconds", time.time() - t0), 1)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True, help="the healed testbed (bmoe upcycle ... --heal-tokens N)")
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--out", default="experiments/results/finetune_arce")
  ap.add_argument("--work", default="runs/finetune_arce", help="the fine-tuning runs (one folder each)")
  ap.add_argument("--runs", nargs="+", default=["1e-4:cosine:8", "5e-4:constant:6", "1e-3:constant:6"],
                  help="LR:SCHEDULE:EPOCHS")
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--trainable", default="experts_router")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  t0, out, work = time.time(), Path(args.out), Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  runs = [finetune(args, r, work / r["name"]) for r in map(parse_run, args.runs)]
  base_probs, labels = test_scores(args.model, work / "zero_shot_test.npz", args)
  base_right = base_probs.argmax(1) == labels
  test = {ZERO_SHOT: row(base_probs, labels, base_right, None, args.seed)}
  for r in runs:
    best = min(r["history"], key=lambda h: h["val_nll"])
    for ckpt, label in (("model", f"best dev NLL (epoch {best['epoch']:g})"), ("model_final", "last epoch")):
      d = work / r["name"] / ckpt
      if ckpt == "model_final" and not d.exists():  # the best state is the last one: nothing separate saved
        d = work / r["name"] / "model"
      probs, _ = test_scores(str(d), work / r["name"] / f"{ckpt}_test.npz", args)
      name = f"lr {r['lr']:g} {r['schedule']} {r['epochs']} epochs, {label}"
      test[name] = row(probs, labels, base_right, best["val_nll"], args.seed)
  res = {"args": vars(args), "runs": runs, "test": test, "seconds": round(time.time() - t0, 1)}
  write(out, res)


def write(out: Path, res: dict):
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(res, indent=2, default=float))
  lines = ["## ARC-Easy test (every question), continuation scoring per token", "",
           "| model | n | accuracy [95% Wilson] | gain over zero-shot [paired 95%] | NLL | test NLL − best dev NLL "
           "| ECE |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in res["test"].items():
    gain = f"{r['gain']:+.3f} [{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}]" if "gain" in r else ""
    delta = f"{r['nll_minus_best_dev_nll']:+.3f}" if "gain" in r else ""
    lines.append(f"| {name} | {r['n']} | {r['acc']:.3f} [{r['acc_ci'][0]:.3f}, {r['acc_ci'][1]:.3f}] | {gain} | "
                 f"{r['nll']:.3f} | {delta} | {r['ece']:.3f} |")
  for r in res["runs"]:
    lines += ["", f"## Learning curve, lr {r['lr']:g} {r['schedule']}, {r['epochs']} epochs (dev: ARC-Easy dev, 570 "
              "questions)", "",
              "| epoch | step | train NLL (mean over the epoch) | dev NLL | dev accuracy |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {h['epoch']:.2f} | {h['step']} | {h['train_loss']:.4f} | {h['val_nll']:.4f} | {h['val_acc']:.3f} |"
              for h in r["history"]]
    lines += ["", f"Fine-tuned by `{r['command']}` ({r['finetune_seconds'] / 60:.0f} min on 2 cores; a resumed run "
              "counts its last invocation only)."]
  flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                   for k, v in res["args"].items())
  lines += ["", f"Tables by `python experiments/finetune_arce.py {flags}` ({res['seconds'] / 60:.0f} min, "
            "fine-tuning runs and cached test probabilities reused when present)."]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  plot(out / "learning_curve.png", res["runs"])


def plot(path: Path, runs: list[dict]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
  for ax, r in zip(axes[0], runs):
    ep = [h["epoch"] for h in r["history"]]
    ax.plot(ep, [h["train_loss"] for h in r["history"]], "o-", label="train NLL")
    ax.plot(ep, [h["val_nll"] for h in r["history"]], "s-", label="dev NLL")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["val_acc"] for h in r["history"]], "^:", color="gray", label="dev accuracy")
    ax.set(xlabel="epoch", ylabel="NLL", title=f"lr {r['lr']:g}, {r['schedule']}, {r['epochs']} ep")
    ax2.set_ylabel("dev accuracy")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
