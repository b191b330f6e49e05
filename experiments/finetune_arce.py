"""Fine-tuning that fine-tunes (issue 37): MAP on the full ARC-Easy training set from the healed testbed, its
learning curve, and the two regimes people use: early-stopped at the best dev NLL, and trained well past it
(the papers' long fine-tuning, where MAP becomes overconfident).

  .venv/bin/python experiments/finetune_arce.py --model runs/healed --data-dir ../shared/data

1. ``bmoe finetune`` (this exact command is in results.md): all 2251 training questions, ARC-E dev for
   validation after every epoch, no early stop; the run keeps the best-dev-NLL state (``model``) and the
   last one (``model_final``).
2. ARC-E test (every question): the healed model zero-shot, MAP early-stopped and MAP long; accuracy with
   95% Wilson intervals, NLL, ECE (15 bins), and each fine-tuned model's accuracy gain over the zero-shot
   model with a paired bootstrap interval (per question, 2000 resamples).

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


def finetune_argv(args, out: Path) -> list[str]:
  n_train = len(load_examples("arc_easy:train", args.data_dir)[1])
  per_epoch = math.ceil(n_train / args.batch_size)
  return ["finetune", "--model", args.model, "--data-dir", args.data_dir, "--train", "arc_easy:train",
          "--val", "arc_easy:dev", "--epochs", str(args.epochs), "--eval-every", str(per_epoch), "--patience", "0",
          "--lr", str(args.lr), "--warmup-ratio", "0.05", "--batch-size", str(args.batch_size), "--max-length", "256",
          "--trainable", args.trainable, "--cache-prefix", "--checkpoint-every", str(per_epoch),
          "--keep-checkpoints", "2", "--seed", str(args.seed), "--out", str(out), "--quiet"]


def paired_gain(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = 2000, seed: int = 0):
  """(mean of b - a, 95% percentile interval) over questions resampled with replacement."""
  diff = correct_b.astype(np.float64) - correct_a
  rng = np.random.default_rng(seed)
  boots = diff[rng.integers(0, len(diff), (samples, len(diff)))].mean(1)
  return float(diff.mean()), [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]


def test_scores(model_dir: str, args) -> tuple[np.ndarray, np.ndarray]:
  params, cfg, tok = load_model_and_tokenizer(model_dir)
  batches, class_ids, _ = batches_for("arc_easy:test", tok, data_dir=args.data_dir, batch_size=args.batch_size,
                                      max_length=256, scoring="continuation", norm="token")
  return collect(map_method(params, Task(cfg, class_ids)), batches, progress=True, desc=Path(model_dir).name)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True, help="the healed testbed (bmoe upcycle ... --heal-tokens N)")
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--out", default="experiments/results/finetune_arce")
  ap.add_argument("--work", default="runs/finetune_arce", help="the fine-tuning run (checkpoints, models)")
  ap.add_argument("--epochs", type=int, default=8)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--trainable", default="experts_router")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  t0, out, work = time.time(), Path(args.out), Path(args.work)
  argv_ft = finetune_argv(args, work)
  if not (work / "run.json").exists():
    assert bmoe(argv_ft) == 0
  t_ft = time.time() - t0
  run = json.loads((work / "run.json").read_text())
  models = {"healed zero-shot": args.model, "MAP early-stopped": str(work / "model"),
            "MAP long": str(work / "model_final")}
  scores = {name: test_scores(d, args) for name, d in models.items() if Path(d).exists()}
  labels = next(iter(scores.values()))[1]
  res = {"args": vars(args), "finetune_command": "bmoe " + " ".join(argv_ft), "history": run["history"],
         "finetune_seconds": round(t_ft, 1), "test": {}}
  base = scores["healed zero-shot"][0].argmax(1) == labels
  best_dev = min(h["val_nll"] for h in run["history"])
  for name, (probs, y) in scores.items():
    right = probs.argmax(1) == y
    r = {"n": int(len(y)), "acc": float(right.mean()), "acc_ci": wilson(int(right.sum()), len(y)),
         "nll": M.nll(probs, y), "ece": M.ece(probs, y), "nll_minus_best_dev_nll": M.nll(probs, y) - best_dev}
    if name != "healed zero-shot":
      r["gain"], r["gain_ci"] = paired_gain(base, right, seed=args.seed)
    res["test"][name] = r
  res["seconds"] = round(time.time() - t0, 1)
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
    lines.append(f"| {name} | {r['n']} | {r['acc']:.3f} [{r['acc_ci'][0]:.3f}, {r['acc_ci'][1]:.3f}] | {gain} | "
                 f"{r['nll']:.3f} | {r['nll_minus_best_dev_nll']:+.3f} | {r['ece']:.3f} |")
  lines += ["", "## Learning curve (dev: ARC-Easy dev, 570 questions)", "",
            "| epoch | step | train NLL (mean over the epoch) | dev NLL | dev accuracy |", "|---:|---:|---:|---:|---:|"]
  for h in res["history"]:
    lines.append(f"| {h['epoch']:.2f} | {h['step']} | {h['train_loss']:.4f} | {h['val_nll']:.4f} | "
                 f"{h['val_acc']:.3f} |")
  flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in res["args"].items())
  lines += ["", f"Fine-tuned by `{res['finetune_command']}` ({res['finetune_seconds'] / 60:.0f} min); evaluated by "
            f"`python experiments/finetune_arce.py {flags}` ({res['seconds'] / 60:.0f} min in all)."]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  h = res["history"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ep = [x["epoch"] for x in h]
  ax.plot(ep, [x["train_loss"] for x in h], "o-", label="train NLL")
  ax.plot(ep, [x["val_nll"] for x in h], "s-", label="dev NLL")
  ax2 = ax.twinx()
  ax2.plot(ep, [x["val_acc"] for x in h], "^:", color="gray", label="dev accuracy")
  ax.set(xlabel="epoch", ylabel="NLL")
  ax2.set_ylabel("dev accuracy")
  fig.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(out / "learning_curve.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
