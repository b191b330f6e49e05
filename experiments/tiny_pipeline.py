"""The issue-5 pipeline end to end on a tiny random MoE (no pretrained LM here: numbers are near chance
and only show that every step runs and what it costs). Real-model results: issue 6.

  .venv/bin/python experiments/tiny_pipeline.py --data-dir ../shared/data --out runs/tiny_pipeline

Builds a 2-layer MoE (4 experts, d=32) and a byte-level BPE tokenizer trained on OBQA questions, then
runs `bmoe finetune` (OBQA train subset), `bmoe fit` (Bayesian-MoE posterior) and `bmoe evaluate` (MAP,
temperature scaling, MC dropout, last-layer Laplace, Bayesian-MoE on OBQA test vs ARC-C / ARC-E / MMLU)
and copies results.json / results.md to experiments/results/tiny_pipeline.*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax

import bmoe_jax as B
from bmoe_jax import data as D
from bmoe_jax.checkpoint import save_params
from bmoe_jax.data.toy_tokenizer import train_bpe
from bmoe_jax.cli import main


def build_model(out: Path, data_dir: str):
  text = [f"Question: {e.question}\n" + "\n".join(f"{L}. {c}" for L, c in zip("ABCDE", e.choices)) + "\nAnswer: A B C D E"
          for e in D.load("obqa", "train", data_dir=data_dir).examples]
  tok = train_bpe(text, 2000)
  cfg = B.tiny_config(vocab_size=2048, num_experts=4)
  save_params(out, cfg, B.init_params(cfg, jax.random.key(0), std=0.3))
  tok.save_pretrained(str(out))


def main_(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--data-dir", default="../shared/data")
  ap.add_argument("--out", default="runs/tiny_pipeline")
  args = ap.parse_args(argv)
  out = Path(args.out)
  if out.exists():
    shutil.rmtree(out)
  # lettered scoring, as when its results were made (and last-layer Laplace needs it)
  common = ["--data-dir", args.data_dir, "--batch-size", "16", "--max-length", "192", "--scoring", "letters", "--quiet"]
  times = {}
  t = time.perf_counter()
  build_model(out / "base", args.data_dir)
  times["build"] = time.perf_counter() - t
  steps = {
      "finetune": ["finetune", "--model", str(out / "base"), "--train", "obqa:train", "--val", "obqa:dev",
                   "--max-train", "512", "--max-eval", "512", "--lr", "1e-3", "--epochs", "2", "--eval-every", "8",
                   "--patience", "3", "--prior-precision", "1.0", "--out", str(out / "ft")],
      "fit": ["fit", "--model", str(out / "ft" / "model"), "--pretrained", str(out / "base"), "--train", "obqa:train",
              "--max-train", "512", "--rank", "8", "--out", str(out / "fit")],
      "evaluate": ["evaluate", "--model", str(out / "ft" / "model"), "--posterior", str(out / "fit" / "posterior"),
                   "--test", "obqa:test",
                   "--shift", "arc_challenge:test,arc_easy:test,mmlu:test:astronomy+college_physics",
                   "--val", "obqa:dev", "--max-eval", "500", "--methods", "map,ts,mc_dropout,llla,bmoe",
                   # last-layer Laplace is fit on the training split: the fine-tuning subset
                   "--train", "obqa:train", "--max-train", "512",
                   "--out", str(out / "eval")],
  }
  for name, argv_ in steps.items():
    t = time.perf_counter()
    rc = main(argv_ + common)
    times[name] = time.perf_counter() - t
    if rc:
      raise SystemExit(f"{name} failed ({rc})")
  dest = Path("experiments/results")
  dest.mkdir(parents=True, exist_ok=True)
  res = json.loads((out / "eval" / "results.json").read_text())
  res["step_seconds"] = times
  (dest / "tiny_pipeline.json").write_text(json.dumps(res, indent=2))
  md = (out / "eval" / "results.md").read_text()
  md += "\nStep wall times (s, 2-core CPU): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + "\n"
  (dest / "tiny_pipeline.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main_()
