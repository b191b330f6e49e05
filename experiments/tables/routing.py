"""The Bayesian-routing cells of PROTOCOL.md §8 (v1.4): on one dataset's fine-tuned models (``WHERE``: OBQA, long
regime, every seed), the thesis' routers trained by ``bmoe route-train``'s stage with the pipeline's defaults, the
Laplace router, and each combined with Bayesian-MoE (the primary posterior: evidence per layer; the Laplace
router's combination is the joint posterior over experts and router weights). Their test and shift
probabilities are saved like the evaluation cell's methods (``WORK/<dataset>/seed<s>/<regime>/routing/methods``:
the report reads them beside MAP and TS, paired), and their routing stability (Jaccard of top-k sets under input
noise, two-draw agreement) and FLOPs in ``routing/stability``.

  python -m experiments.tables.run routing obqa --seed 0 --model runs/healed --data-dir ../shared/data
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from bmoe_jax.files import read_json, write_json
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.data import eval_key
from bmoe_jax.pipeline.methods import COMBINED, JOINT, LAPLACE_ROUTER, ROUTER_METHODS, Context, build_methods
from bmoe_jax.pipeline.routing import mean_curves, routing_report
from bmoe_jax.routing import RouterConfig
from bmoe_jax.routing.io import load_routers
from bmoe_jax.routing.train import RouteTrainConfig, parse_layers
from experiments.tables import cells as C
from experiments.tables import protocol as P

WHERE = ("obqa", "long")  # dataset, regime (every seed)
ROUTE = RouteTrainConfig()  # the pipeline's defaults (route layers last:1), seeded per fine-tuning seed
EVAL = dataclasses.replace(P.EVAL, stability=True)  # route_samples, temp_layers, stability batches: defaults
METHODS = (*ROUTER_METHODS, LAPLACE_ROUTER, *COMBINED, JOINT)


def router_kinds(methods) -> list[str]:
  """The router kinds ``methods`` need trained (alone or combined with Bayesian-MoE), in ``ROUTER_METHODS``'s
  order; the temperature router samples from the deterministic one and needs none."""
  named = {m.removeprefix("bmoe+") for m in methods}
  return [kind for m, kind in ROUTER_METHODS.items() if m in named and kind != "temperature"]


def trained_routers(params, task, train, seed: int, out: Path, progress: bool, kinds) -> dict:
  """{kind: (plan, router params)} of the router ``kinds``, trained (resumably) under ``out/<kind>``."""
  routers = {}
  for kind in kinds:
    d = out / kind
    if not (d / "routers" / "routing.json").exists():
      t0 = time.perf_counter()
      _, history = ST.route_train(params, task, {"train": train}, RouterConfig(kind=kind),
                                  dataclasses.replace(ROUTE, seed=seed), d, progress=progress)
      write_json(d / "train.json", {"seconds": time.perf_counter() - t0, "history": history}, default=float)
    plan, rparams, _ = load_routers(d / "routers", task.cfg)
    routers[kind] = (plan, rparams)
  return routers


def posteriors(params, healed, task, batches, link: str, seed: int, fit_dir: Path, out: Path) -> dict:
  """The posteriors the router methods combine with: ``bmoe`` (the primary, from the evaluation cell's factor
  pass, resumed), the Laplace router (router weights of the route layers, evidence per layer, centred at zero)
  and the joint posterior (every routed expert and those router weights; experts centred at the healed model)."""
  fc = dataclasses.replace(P.FIT, link=link, prior=P.EVIDENCE[P.PRIMARY])
  _, factors, state = ST.factor_pass(params, task, batches["train"], fc, fit_dir, seed=seed, progress=False)
  posts = {"bmoe": ST.posteriors(params, task, batches["val"], fc, factors, state, pretrained=healed)[0]["bmoe"]}
  ids = ",".join(map(str, parse_layers(task.cfg, ROUTE.route_layers)))
  only = dataclasses.replace(fc, bayes_layers=ids, laplace_router="only", prior_mean="zero")
  joint = dataclasses.replace(fc, laplace_router="with", bayes_layers="all")
  for name, cfg in ((LAPLACE_ROUTER, only), (JOINT, joint)):
    posts[name] = ST.fit(params, task, batches, cfg, out / name.replace("+", "_"), pretrained=healed, seed=seed,
                         progress=False)[0]["bmoe"]
  return posts


def routing_cell(s: C.Setup, name: str, seed: int, regime: str, link: str, methods=METHODS) -> dict:
  """One seed's router ``methods`` (the protocol's: ``METHODS``): their routers trained, their probabilities
  saved per method (resumable), their stability; ``routing/cell.json``."""
  out = s.run_dir(name, seed) / regime / "routing"
  if (out / "cell.json").exists():
    return read_json(out / "cell.json")
  healed, cfg, batches, task = C._prepare(s, name, ("train", "val", "eval"))
  epoch, params, _ = C.regime_params(s, name, seed, regime, healed, cfg)
  ds = s.datasets[name]
  eval_sets = {eval_key(spec): batches[eval_key(spec)] for spec in (ds.test,) + ds.shift}
  ctx = Context(params, task, val=batches["val"], seed=seed, link=link,
                routers=trained_routers(params, task, batches["train"], seed, out, s.progress, router_kinds(methods)),
                posteriors=posteriors(params, healed, task, batches, link, seed, out.parent / "fit", out))
  built, fitted = build_methods(methods, ctx, EVAL)
  for method_name, method in built.items():
    path = out / "methods" / f"{method_name}.npz"
    if not path.exists():
      C.save_method(path, method, eval_sets, s.progress)
  report = routing_report(ctx, EVAL, methods, eval_sets[eval_key(ds.test)][:EVAL.stability_batches],
                          out / "stability")
  side = {m: out / "methods" / f"{m}.json" for m in built}
  record = {"protocol": P.VERSION, "epoch": epoch, "link": link, "fitted": fitted, "routing": report,
            "seconds": {m: read_json(p)["seconds"] for m, p in side.items() if p.exists()},
            "train_seconds": {k: read_json(out / k / "train.json")["seconds"] for k in ctx.routers
                              if (out / k / "train.json").exists()}}
  write_json(out / "cell.json", record, default=float)
  return record


def stability_table(work: Path, name: str, regime: str, seeds=P.SEEDS) -> dict:
  """{method: {"gamma", "jaccard" (mean over seeds and the routers' layers), "resample"}} of the seeds' cells."""
  per_seed = [read_json(p)["routing"] for p in (work / name / f"seed{k}" / regime / "routing" / "cell.json"
                                                for k in seeds) if p.exists()]
  if len(per_seed) != len(seeds):
    return {}
  curves = [mean_curves(r) for r in per_seed]
  return {m: {"gamma": list(curves[0][m][0]), "jaccard": np.mean([c[m][1] for c in curves], 0).tolist(),
              "resample": float(np.mean([c[m][2] for c in curves])), "seeds": len(curves)} for m in curves[0]}
