"""Which closed form turns the Bayesian-MoE's Gaussian continuation scores into class probabilities (issue 15).

Continuation scores are log-likelihoods far below 0, and part of their variance is common to the choices
(they share the context). ``E softmax(f)`` ignores anything common to all classes, laplace-torch's ``probit``
(``softmax(f / sqrt(1 + pi/8 diag Sigma))``) does not; ``probit_pairwise`` acts on the contrasts ``f_c - f_k``.
This reloads a finished ``bmoe demo`` run (its carving is redone from the seed; fine-tuning and the factor pass
resume from the run's checkpoints, nothing is retrained), computes the lambda-independent Jacobian statistics
of the validation set and every evaluation set once, and for each link (mc with many draws as the reference)
picks lambda on the validation NLL over the run's grid and scores every set at that lambda and at the
evidence's. It also reports how much of Var f is common to the choices.

  .venv/bin/python experiments/link_compare.py --runs runs/seeds_arce/s0,runs/seeds_arce/s1,runs/seeds_arce/s2 \\
      --out experiments/results/link_arce

Writes OUT/results.json and OUT/results.md (per seed, and the mean over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax import laplace as LA
from bmoe_jax import metrics as M
from bmoe_jax import train as T
from bmoe_jax.demo import DemoConfig, _upcycled
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.configs import DataConfig, EvalConfig, FitConfig, RunConfig
from bmoe_jax.task import CHOICE_MASK_VALUE, LINKS, class_probs
from convert.upcycle import UpcycleConfig

MC_SAMPLES = 4000


def load_config(run: Path) -> DemoConfig:
  d = json.loads((run / "config.json").read_text())
  tup = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
  return DemoConfig(source=d["source"], upcycle=UpcycleConfig(**tup(d["upcycle"])),
                    ensemble_members=d["ensemble_members"], run=RunConfig(**tup(d["run"])),
                    data=DataConfig(**tup(d["data"])), train=T.TrainConfig(**tup(d["train"])),
                    fit=FitConfig(**tup(d["fit"])), eval=EvalConfig(**tup(d["eval"])))


def upcycled_once(cfg: DemoConfig, run: Path):
  """(MoE config, params, tokenizer) of a run: carved at its first use and saved in RUN/upcycled, then read from
  there. A resumed run then does not depend on the carving being bit-identical across code versions: XLA may sum
  floats in another order when the forward's code changes, and the carved routers' Adam fit amplifies a 1e-7
  difference in the calibration inputs to 1e-4, which makes every saved pass of the run a "different run"."""
  from bmoe_jax.checkpoint import CONFIG_FILE, load_params, save_params
  from bmoe_jax.demo import _source_path
  from convert.upcycle import load_dense

  saved = run / "upcycled"
  if (saved / CONFIG_FILE).exists():
    tok = load_dense(_source_path(cfg.source), progress=False)[2]
    mcfg, mparams = load_params(saved)
    return mcfg, jax.tree.map(jnp.asarray, mparams), tok
  _, (mcfg, mparams), tok, provenance = _upcycled(cfg, True, None)
  save_params(saved, mcfg, mparams, source={"upcycled_from": provenance, "seed": cfg.run.seed})
  return mcfg, mparams, tok


def restore(run: Path, grid: bool = False):
  """(cfg, fine-tuned params, task, data, base posterior, evidence posterior, pretrained params) of a demo run
  (a run holding only ``config.json`` is fine-tuned and fitted here, resumably). With ``grid`` the evidence slot
  is ``{"bmoe": grid posterior, "bmoe_ml": evidence posterior}``."""
  cfg = load_config(run)
  mcfg, mparams, tok = upcycled_once(cfg, run)
  data, task, _ = ST.load_data(cfg.data, tok, mcfg, ("train", "val", "eval"), cfg.run.seed)
  start = T.first_trainable_layer(T.trainable_mask(mparams, mcfg, cfg.train.trainable, cfg.train.layers))
  task, data = ST.cache_prefix(mparams, task, data, start)
  ft = ST.finetune(mparams, task, data, dataclasses.replace(cfg.train, seed=cfg.run.seed), run,
                   pretrained=mparams).params
  fc = cfg.fit if grid else dataclasses.replace(cfg.fit, prior="layer")
  if grid:  # the grid posterior is written again from the (resumed) factor pass
    shutil.rmtree(run / "posterior", ignore_errors=True)
  posts, _ = ST.fit(ft, task, data, fc, run, pretrained=mparams, seed=cfg.run.seed,
                    wanted=("bmoe_fixed", "bmoe_ml", *(("bmoe",) if grid else ())))
  evid = {"bmoe": posts["bmoe"], "bmoe_ml": posts["bmoe_ml"]} if grid else posts["bmoe_ml"]
  return cfg, ft, task, data, posts["bmoe_fixed"], evid, mparams


def set_stats(ft, task, batches, post):
  """[(JacobianStats, labels)] of a set (lambda-independent)."""
  return [(LA.predictive.jacobian_stats_jit(ft, task=task, batch=b, post=post), b.labels_b) for b in batches]


def probs_at(stats, post, log_prec, link: str):
  """(probs [n, C], labels [n], common share) at one prior precision."""
  probs, labels, common = [], [], []
  for st, y in stats:
    cov = LA.predictive.logit_covariance(st, post, log_prec)
    probs.append(np.asarray(class_probs(st.f_bc, cov, link, jax.random.key(0), MC_SAMPLES), np.float64))
    labels.append(np.asarray(y))
    valid = np.asarray(st.f_bc) > CHOICE_MASK_VALUE / 2
    w = valid / valid.sum(-1, keepdims=True)
    c = np.asarray(cov, np.float64)
    mean_var = np.einsum("bcc,bc->b", c, w)  # mean over the valid choices of Var f_c
    common.append(np.einsum("bc,bck,bk->b", w, c, w) / np.maximum(mean_var, 1e-30))  # Var(mean f) / mean Var f
  return np.concatenate(probs), np.concatenate(labels), np.concatenate(common)


def one_run(run: Path) -> dict:
  t0 = time.perf_counter()
  cfg, ft, task, data, base, evid, _ = restore(run)
  keys = ST.eval_keys(cfg.data)
  stats = {"val": set_stats(ft, task, data["val"], base), **{k: set_stats(ft, task, data[k], base) for k in keys}}
  num_e = {l: w.shape[0] for l, w in base.w_map.items()}
  grid = cfg.fit.grid_values
  out = {"run": str(run), "grid": grid.tolist(), "links": {}}
  for link in LINKS:
    curve = []
    for lam in grid:
      p, y, _ = probs_at(stats["val"], base, LA.posterior.expand_prior_precision(float(lam), num_e), link)
      curve.append(M.nll(p, y))
    lam = float(grid[int(np.argmin(curve))])
    row = {"val_nll": curve, "grid_lambda": lam, "grid_edge": ST.grid_edge(curve)}
    chosen = {"grid": LA.posterior.expand_prior_precision(lam, num_e), "evidence": evid.log_prior_prec_e}
    for name, log_prec in chosen.items():
      for k in keys:
        p, y, common = probs_at(stats[k], base, log_prec, link)
        row[f"{name}/{k}"] = {**M.summary(p, y), "common_share": float(np.mean(common))}
    out["links"][link] = row
    print(f"{run} {link}: grid lambda {lam:.3g} ({row['grid_edge'] or 'inside'}) "
          + " ".join(f"{k.split('_test')[0]} {row[f'grid/{k}']['acc']:.3f}/{row[f'grid/{k}']['nll']:.3f}"
                     for k in keys), flush=True)
  map_rows = {}
  for k in keys:
    f = np.concatenate([np.asarray(st.f_bc, np.float64) for st, _ in stats[k]])
    y = np.concatenate([np.asarray(lb) for _, lb in stats[k]])
    map_rows[k] = M.summary(np.asarray(jax.nn.softmax(jnp.asarray(f), -1)), y)
  out["map"] = map_rows
  out["evidence_lambda"] = ST.mean_prior_precision(evid)
  out["seconds"] = time.perf_counter() - t0
  return out


def table(results: list[dict]) -> str:
  keys = list(results[0]["map"])
  short = [k.split("_test")[0].split(":")[0] for k in keys]
  lines = ["| link | lambda | " + " | ".join(f"{s} ACC / NLL / ECE" for s in short) + " |",
           "|---|---|" + "---:|" * len(keys)]
  mean = lambda get: np.mean([get(r) for r in results])
  cell = lambda get: f"{mean(lambda r: get(r)['acc']):.3f} / {mean(lambda r: get(r)['nll']):.3f} / " \
                     f"{mean(lambda r: get(r)['ece']):.3f}"
  lines.append("| MAP | - | " + " | ".join(cell(lambda r, k=k: r["map"][k]) for k in keys) + " |")
  for link in results[0]["links"]:
    for name in ("grid", "evidence"):
      lam = ", ".join(f"{r['links'][link]['grid_lambda'] if name == 'grid' else r['evidence_lambda']:.3g}"
                      for r in results)
      lines.append(f"| {link} | {name} ({lam}) | "
                   + " | ".join(cell(lambda r, k=k: r["links"][link][f"{name}/{k}"]) for k in keys) + " |")
  common = [np.mean([r["links"]["mc"][f"grid/{k}"]["common_share"] for r in results]) for k in keys]
  lines += ["", "Share of Var f common to the choices at the mc grid lambda, Var(mean_c f_c) / mean_c Var f_c: "
            + ", ".join(f"{s} {c:.3f}" for s, c in zip(short, common))]
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", required=True, help="comma-separated finished bmoe demo output directories")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = []
  for run in args.runs.split(","):
    results.append(one_run(Path(run)))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
  md = (f"# Links of the Bayesian-MoE predictive on continuation scores\n\n`{' '.join(__import__('sys').argv)}`\n\n"
        f"Mean over {len(results)} run(s); mc: {MC_SAMPLES} draws per question.\n\n" + table(results) + "\n")
  (out / "results.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
