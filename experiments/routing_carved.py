"""Bayesian routers on the carved SmolLM2 testbed (issue 16, arXiv 2509.23830), alone and combined with
Bayesian-MoE's expert posterior.

Reloads ``bmoe demo`` runs (``--runs``: carving redone from the seed, the MAP fine-tuning, factors and posteriors
resumed from the run's checkpoints) or makes new ones from demo flags (``--seeds S,... -- DEMO FLAGS``: only the
demo's ``config.json`` is written, then carving, fine-tuning and the factor pass run here, without the demo's own
evaluation), then per run and per layer set (``--layers``: ``last:1`` = the top carved layer, as the thesis' single-layer runs;
``last:4`` = every carved layer, trained top-down):

1. trains every router kind on the run's training set (``bmoe route-train``'s stage, resumable under ``--work``);
   the carved router (least squares on the experts' output norms, then frozen while the experts were
   fine-tuned) is the deterministic MAP router underneath;
2. evaluates MAP, temperature scaling, Bayesian-MoE and every router (``rt_*``) and the combinations
   ``bmoe+rt_*`` on the in-distribution test set and the shift sets (``bmoe evaluate``'s stage: ACC, NLL,
   ECE 15 / 10 bins, MCE, Brier, OOD AUROC/AUPRC by predictive entropy);
3. with the evaluation (``--stability``): routing stability (Jaccard of top-k sets under input noise, thesis
   gamma grid) on the first ``--stability-batches`` in-distribution batches and the analytic FLOPs per token;
   then the time of one batch relative to MAP's (compiled, median of ``--time-reps``).

  JAX_COMPILATION_CACHE_DIR=runs/xla_cache .venv/bin/python experiments/routing_carved.py \\
      --seeds 0,1,2 --runs-dir runs/seeds_arce --work runs/routing_arce --out experiments/results/routing_arce \\
      --eval-stride 3 -- --data-dir ../shared/data --train arc_easy:train --val arc_easy:dev \\
      --test arc_easy:test --max-eval 400 --shift obqa:test,arc_challenge:test,\\
mmlu:test:high_school_geography+high_school_biology+conceptual_physics+astronomy

A finished run's numbers are kept in WORK/RUN/result_LAYERS.json and reused by a rerun with the same settings.
Each method's evaluation is saved as it finishes (WORK/RUN/eval_LAYERS/methods/), so a stopped evaluation resumes
at the first unfinished method. Writes OUT/results.json (per run, and the aggregate) and OUT/results.md
(``routing_report.py``), OUT/*.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmoe_jax.pipeline import stages as ST  # noqa: E402
from bmoe_jax.pipeline.configs import EvalConfig  # noqa: E402
from bmoe_jax.pipeline.methods import ROUTER_METHODS, Context, build_methods  # noqa: E402
from bmoe_jax.routing import RouterConfig  # noqa: E402
from bmoe_jax.routing.io import load_routers  # noqa: E402
from bmoe_jax.routing.train import RouteTrainConfig  # noqa: E402
from experiments.link_compare import restore  # noqa: E402

KIND_OF = {m[3:]: kind for m, kind in ROUTER_METHODS.items()}  # temp -> temperature, der -> ensemble, ...


def trained_routers(ft, task, data, kinds, layers: str, args, work: Path, seed: int) -> dict:
  """{kind: (plan, router params)} for every trainable kind in ``kinds`` (resumed / reloaded from ``work``),
  trained on the training batches re-cached at the lowest router layer (nothing below it trains)."""
  from bmoe_jax.routing.train import parse_layers
  out = {}
  task, data = ST.cache_prefix(ft, task, {"train": data["train"]}, min(parse_layers(task.cfg, layers)), False)
  for short in kinds:
    kind = KIND_OF[short]
    if kind == "temperature":
      continue
    d = work / f"{short}_{layers.replace(':', '')}"
    if not (d / "routers" / "routing.json").exists():
      rc = RouterConfig(kind=kind, router_members=args.members)
      rtc = RouteTrainConfig(route_layers=layers, route_epochs=args.epochs, route_lr=args.lr, seed=seed)
      t0 = time.perf_counter()
      ST.route_train(ft, task, data, rc, rtc, d, model="restored demo run", progress=False)
      print(f"  trained {short} ({layers}) in {time.perf_counter() - t0:.0f} s", flush=True)
    plan, rparams, meta = load_routers(d / "routers", task.cfg)
    out[kind] = (plan, rparams)
  return out


def time_methods(methods: dict, batch, reps: int) -> dict:
  """Median seconds of one (compiled) call per method on ``batch``. Every call gets a fresh copy of the batch:
  methods that memoise per batch (MAP's logits, Bayesian-MoE's Jacobian statistics) then compute, as the routers
  do, instead of answering from the evaluation's cache."""
  import jax
  import jax.numpy as jnp
  out = {}
  for name, method in methods.items():
    np.asarray(method(jax.tree.map(jnp.array, batch)))
    ts = []
    for _ in range(reps):
      fresh = jax.block_until_ready(jax.tree.map(jnp.array, batch))
      t = time.perf_counter()
      np.asarray(method(fresh))
      ts.append(time.perf_counter() - t)
    out[name] = float(np.median(ts))
  return out


def laplace_posteriors(ft, task, data, layers: str, work: Path, seed: int, pretrained) -> dict:
  """The Laplace router (router weights of ``layers``) and the joint posterior (every expert and router of
  the carved layers), each with the evidence's prior precision per block (``bmoe fit``'s stage, resumable)."""
  from bmoe_jax.pipeline.configs import FitConfig
  from bmoe_jax.routing.train import parse_layers
  ids = ",".join(str(l) for l in sorted(parse_layers(task.cfg, layers)))
  only = FitConfig(bayes_layers=ids, laplace_router="only", prior="layer", prior_mean="zero")
  joint = FitConfig(bayes_layers="all", laplace_router="with", prior="layer", rank=10, prior_mean="pretrained")
  out = {}
  for name, fc in (("rt_laplace", only), ("bmoe+rt_laplace", joint)):
    d = work / f"{name.replace('+', '_')}_{layers.replace(':', '')}"
    shutil.rmtree(d / "posterior", ignore_errors=True)  # rewritten from the (resumed) factor pass
    posts, _ = ST.fit(ft, task, data, fc, d, pretrained=pretrained, seed=seed, progress=False)
    out[name] = posts["bmoe"]
  return out


def _resume_key(run: Path, layers: str, args, first: bool) -> dict:
  """What a method's evaluation depends on beyond its name: the fine-tuned run (its checkpoint fingerprint), the
  layer set and the settings (evaluation resumes per method under this key)."""
  saved = json.loads((run / "checkpoints" / "finetune.json").read_text())  # the fine-tuning's identity
  fingerprint = json.dumps({k: saved[k] for k in ("model", "data", "train_config")}, sort_keys=True)
  return {"run": str(run.resolve()), "finetune": hashlib.sha256(fingerprint.encode()).hexdigest()[:16],
          "layer_set": layers, "first": first, **{k: getattr(args, k) for k in RESULT_ARGS if k != "layers"}}


def one_layer_set(run: Path, ft, pretrained, task, data, keys, posts, layers: str, args, seed: int,
                  first: bool) -> dict:
  work = Path(args.work) / run.name
  kinds = args.routers.split(",")
  routers = trained_routers(ft, task, data, kinds, layers, args, work, seed)
  names = [f"rt_{k}" for k in kinds]
  combined = [f"bmoe+rt_{k}" for k in args.combined.split(",") if k]
  laplace = [] if args.no_laplace else ["rt_laplace", "bmoe+rt_laplace"]
  if laplace:
    posts = {**posts, **laplace_posteriors(ft, task, data, layers, work, seed, pretrained)}
  methods = (["map", "ts", "bmoe", "bmoe_ml"] if first else []) + names + laplace + combined
  ec = EvalConfig(methods=tuple(methods), route_samples=args.samples, temp_layers=layers,
                  sample_temperature=args.temperature, stability=True, stability_batches=args.stability_batches)
  ctx = Context(ft, task, val=data["val"], posteriors=posts, routers=routers, seed=seed)
  t0 = time.perf_counter()
  sets = {k: data[k][::args.eval_stride] for k in keys}  # batches are sorted by length: a stride keeps the mix
  results, info = ST.evaluate(ctx, sets, ec, work / f"eval_{layers.replace(':', '')}", in_distribution=keys[0],
                              progress=False, resume_key=_resume_key(run, layers, args, first))
  print(f"  evaluated {len(methods)} methods ({layers}) in {time.perf_counter() - t0:.0f} s", flush=True)
  built, _ = build_methods(["map", "bmoe"] + names + laplace + combined, ctx, ec)
  times = time_methods(built, data[keys[0]][0], args.time_reps)
  routing = info.pop("routing")
  return {"results": results["methods"], "info": info, "seconds_per_batch": times, "routing": routing}


def one_run(run: Path, args) -> dict:
  t0 = time.perf_counter()
  cfg, ft, task, data, _, posts, pretrained = restore(run, grid=True)  # grid and evidence lambda
  seed = cfg.run.seed
  keys = ST.eval_keys(cfg.data)
  out = {"run": str(run), "seed": seed, "in_distribution": keys[0], "layers": {}}
  for i, layers in enumerate(args.layers):
    out["layers"][layers] = one_layer_set(run, ft, pretrained, task, data, keys, posts, layers, args, seed,
                                          first=i == 0)
  out["seconds"] = time.perf_counter() - t0
  return out


RESULT_ARGS = ("layers", "routers", "combined", "samples", "temperature", "epochs", "lr", "members",
               "stability_batches", "no_laplace", "eval_stride")  # what a finished run's numbers depend on


def published_runs(args) -> dict:
  """{run path: entry} of an existing OUT/results.json made with the same RESULT_ARGS (read once, before the sweep
  rewrites it): a sweep continued on another machine (WORK is not committed) keeps the runs already reported."""
  path = Path(args.out) / "results.json"
  if not path.exists():
    return {}
  saved = json.loads(path.read_text())
  if any(saved["args"].get(k) != getattr(args, k) for k in RESULT_ARGS):
    return {}
  return {r["run"]: r for r in saved["runs"]}


def cached_run(run: Path, args, published: dict) -> dict:
  """``one_run``, or its saved result (WORK/RUN/result_LAYERS.json, else OUT/results.json) when that was made with
  the same RESULT_ARGS: a stopped sweep restarts at the first unfinished run."""
  path = Path(args.work) / run.name / f"result_{'_'.join(args.layers).replace(':', '')}.json"
  same = {k: getattr(args, k) for k in RESULT_ARGS}
  if path.exists():
    saved = json.loads(path.read_text())
    if saved["args"] == same:
      print(f"  reused {path}", flush=True)
      return saved["result"]
    print(f"  {path} was made with other arguments; rerunning", flush=True)
  if str(run) in published:
    print(f"  reused {run}'s entry in {Path(args.out) / 'results.json'}", flush=True)
    return published[str(run)]
  result = one_run(run, args)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"args": same, "result": result}, indent=2, default=float))
  return result


def new_runs(seeds: str, runs_dir: str, demo_flags: list[str]) -> list[str]:
  """Run directories holding only the ``config.json`` of ``bmoe demo DEMO_FLAGS --seed S`` (an existing one is
  kept): ``restore`` carves, fine-tunes and fits them (resumably) without the demo's own evaluation."""
  import dataclasses

  from bmoe_jax.cli import build_parser
  from bmoe_jax.demo import DemoConfig
  from bmoe_jax.pipeline import flags
  out = []
  for seed in seeds.split(","):
    run = Path(runs_dir) / f"s{seed}"
    if not (run / "config.json").exists():
      cfg = flags.resolve(DemoConfig(), build_parser().parse_args(["demo", *demo_flags, "--seed", seed]))
      run.mkdir(parents=True, exist_ok=True)
      cfg = dataclasses.replace(cfg, data=cfg.data.resolved())
      (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    out.append(str(run))
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", default=None, help="comma-separated bmoe demo output directories")
  ap.add_argument("--seeds", default=None, help="instead of --runs: new runs RUNS_DIR/sSEED from the demo flags "
                                               "after --")
  ap.add_argument("--runs-dir", default="runs/seeds_arce")
  ap.add_argument("--work", required=True, help="router checkpoints and per-run evaluations (not committed)")
  ap.add_argument("--out", required=True)
  ap.add_argument("--layers", nargs="+", default=["last:1"], help="layer sets (last:N or comma-separated ids)")
  ap.add_argument("--routers", default="temp,mcdr,swag,der,mfvr,fcvr,vtsr")
  ap.add_argument("--combined", default="temp,mfvr,vtsr", help="routers also combined with bmoe's posterior")
  ap.add_argument("--samples", type=int, default=4, help="forward draws of a stochastic router's predictive")
  ap.add_argument("--temperature", type=float, default=0.3, help="rt_temp's T (thesis default)")
  ap.add_argument("--epochs", type=int, default=3)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--members", type=int, default=4, help="DER routers")
  ap.add_argument("--stability-batches", type=int, default=10)
  ap.add_argument("--time-reps", type=int, default=5)
  ap.add_argument("--no-laplace", action="store_true", help="skip the Laplace router and the joint posterior")
  ap.add_argument("--eval-stride", type=int, default=1, help="evaluate every N-th batch of each set (1: all)")
  argv = sys.argv[1:] if argv is None else argv
  demo_flags = argv[argv.index("--") + 1:] if "--" in argv else []
  args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  if (args.runs is None) == (args.seeds is None):
    ap.error("give one of --runs and --seeds")
  if args.seeds is not None:
    args.runs = ",".join(new_runs(args.seeds, args.runs_dir, demo_flags))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs, published = [], published_runs(args)
  for run in args.runs.split(","):
    print(f"run {run}", flush=True)
    runs.append(cached_run(Path(run), args, published))
    (out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args), "runs": runs},
                                                 separators=(",", ":"), default=float))  # per-run scalars, compact
  from experiments.routing_report import write_report
  write_report(out)


if __name__ == "__main__":
  main()
