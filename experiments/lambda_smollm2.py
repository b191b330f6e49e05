"""Prior precision on the carved SmolLM2 (issue 15): lambda from the evidence with full-rank factors, with
rank-r factors without and with the remainder, and lambda from the validation grid, with the test
metrics each gives.

  .venv/bin/python experiments/lambda_smollm2.py --data-dir ../shared/data

SmolLM2-135M-Instruct carved in its top 8 layers (``convert.carve`` defaults, top-2), continuation
scoring, MAP fine-tuning of the experts and routers on seeded OBQA training questions (early stopping on
OBQA dev), then one factor pass per rank (labels exact, tokens expand) and a posterior per variant, its
global lambda by LPO (Adam on log lambda, 300 steps) or, at rank r with the remainder, by the validation
grid (the grid holds every validation batch's Jacobian statistics: at full rank tens of GB). Test metrics: OBQA test
(in-distribution) and ARC-Easy test (shift), closed-form predictive (``--link``, also the grid's). Writes
experiments/results/lambda_smollm2/{results.json, results.md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bmoe_jax import baselines as BL
from bmoe_jax import laplace as LA
from bmoe_jax import metrics as M
from bmoe_jax.evaluate import collect
from bmoe_jax.params import read_blocks
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.configs import DataConfig, FitConfig
from bmoe_jax.task import DEFAULT_LINK, LINKS
from bmoe_jax.train import TrainConfig
from convert.sources import fetch_gguf
from convert.upcycle import UpcycleConfig, build_moe, load_dense


def scores(method, batches: dict) -> dict:
  out = {}
  for key, bl in batches.items():
    p, y = collect(method, bl)
    out[key] = {k: v for k, v in M.summary(p, y).items() if k in ("acc", "nll", "ece", "brier")}
  return out


def variants(ft, pretrained, task, batches, rank, grid, seed, link):
  """{name: (posterior, how lambda was chosen)} of one factor pass at ``rank``."""
  spec = LA.FactorSpec(layers=task.cfg.moe_layer_ids, labels="exact", tokens="expand", rank=rank)
  state = LA.fit_factors(ft, task, batches["train"], spec, key=jax.random.key(seed), total=len(batches["train"]))
  factors = LA.kfac.finalize(state)
  tag = "full" if rank is None else f"rank {rank}"
  out = {}
  for remainder in ((True,) if rank is None else (False, True)):
    post = LA.build(factors, read_blocks(ft, factors), prior_mean=read_blocks(pretrained, factors),
                    num_sequences=int(state.num_sequences), log_lik=state.log_lik, remainder=remainder)
    name = tag + ("" if rank is None else (" + remainder" if remainder else " bare"))
    out[f"{name}, evidence"] = LA.optimize_prior_precision(post, "global", steps=300)[0]
    if remainder and rank is not None:  # a generator: one batch's Jacobian statistics at a time (grid_stats)
      val = ((LA.predictive.jacobian_stats_jit(ft, task=task, batch=b, post=post), b.labels_b)
             for b in batches["val"])
      out[f"{name}, grid"] = LA.predictive.grid_search_prior_precision(post, val, grid=grid, link=link)[0]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--out", default="experiments/results/lambda_smollm2")
  ap.add_argument("--runs", default="runs/lambda_smollm2", help="fine-tuning checkpoints (not committed)")
  ap.add_argument("--max-train", type=int, default=400)
  ap.add_argument("--max-eval", type=int, default=300)
  ap.add_argument("--rank", type=int, default=10)
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--link", default=DEFAULT_LINK, choices=LINKS)
  args = ap.parse_args(argv)
  t0 = time.time()
  cfg, params, tok, _ = load_dense(fetch_gguf("smollm2"))
  uc = UpcycleConfig(method="carve", moe_layers="top:8", calib_tokens=8192, seed=args.seed)
  mcfg, mparams, report = build_moe(cfg, params, tok, uc, data_dir=args.data_dir)
  mparams = jax.tree.map(jnp.asarray, mparams)
  data = DataConfig(data_dir=args.data_dir, train="obqa:train", val="obqa:dev", test="obqa:test",
                    shift=("arc_easy:test",), max_train=args.max_train, max_eval=args.max_eval, batch_size=16,
                    max_length=192)
  batches, task, _ = ST.load_data(data, tok, mcfg, ("train", "val", "eval"), args.seed)
  task, batches = ST.cache_prefix(mparams, task, batches, min(mcfg.moe_layer_ids))
  tc = TrainConfig(trainable="experts_router", lr=1e-3, epochs=args.epochs, warmup_ratio=0.05, eval_every=20,
                   patience=3, seed=args.seed)
  ft = ST.finetune(mparams, task, batches, tc, Path(args.runs), pretrained=mparams).params
  tests = {k: batches[k] for k in ST.eval_keys(data)}
  rows = {"MAP": {"lambda": None, **scores(BL.map_method(ft, task), tests)}}
  grid = FitConfig(grid=(1e-2, 1e6, 33)).grid_values
  for rank in (None, args.rank):
    for name, post in variants(ft, mparams, task, batches, rank, grid, args.seed, args.link).items():
      lam = ST.mean_prior_precision(post)
      rows[name] = {"lambda": lam, **scores(BL.bayesian_moe(post, ft, task, link=args.link), tests)}
      print(name, json.dumps(rows[name]), flush=True)
  write(Path(args.out), rows, vars(args), report, time.time() - t0)


def write(out: Path, rows: dict, args: dict, report: dict, seconds: float):
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps({"rows": rows, "args": args, "carve": report, "seconds": seconds},
                                               indent=2, default=str))
  sets = [k for k in next(iter(rows.values())) if k != "lambda"]
  lines = ["| posterior, lambda from | lambda | " + " | ".join(f"{s} NLL | {s} ACC | {s} ECE" for s in sets) + " |",
           "|---|---:|" + "---:|" * (3 * len(sets))]
  for name, r in rows.items():
    lam = "" if r["lambda"] is None else f"{r['lambda']:.3g}"
    lines.append(f"| {name} | {lam} | " + " | ".join(f"{r[s]['nll']:.4f} | {r[s]['acc']:.3f} | {r[s]['ece']:.3f}"
                                                       for s in sets) + " |")
  cmd = "python experiments/lambda_smollm2.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items())
  (out / "results.md").write_text("\n".join(lines) + f"\n\nMade by `{cmd}` in {seconds / 60:.0f} min.\n")


if __name__ == "__main__":
  main()
