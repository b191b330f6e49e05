"""``bmoe finetune``, ``bmoe fit``, ``bmoe route-train`` and ``bmoe evaluate``: flags generated from the
stages' configs (plus ``--config FILE.json``, flags win), one stage each (``bmoe_jax.pipeline.stages``), and
``run.json`` (its config, versions, seed, data used and wall time) beside the outputs."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from bmoe_jax.pipeline import flags
from bmoe_jax.pipeline.configs import DataConfig, EvalConfig, FitConfig, RunConfig, TrainConfig
from bmoe_jax.routing.routers import RouterConfig
from bmoe_jax.routing.train import RouteTrainConfig


@dataclasses.dataclass(frozen=True)
class FinetuneCommand:
  run: RunConfig = RunConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()


@dataclasses.dataclass(frozen=True)
class FitCommand:
  run: RunConfig = RunConfig()
  data: DataConfig = DataConfig()
  fit: FitConfig = FitConfig()


@dataclasses.dataclass(frozen=True)
class RouteTrainCommand:
  run: RunConfig = RunConfig()
  data: DataConfig = DataConfig()
  router: RouterConfig = RouterConfig(kind="mfvr")
  route: RouteTrainConfig = RouteTrainConfig()


@dataclasses.dataclass(frozen=True)
class EvaluateCommand:
  run: RunConfig = RunConfig()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()


COMMANDS = {"finetune": (FinetuneCommand, "MAP fine-tuning on a benchmark (optax AdamW)"),
            "fit": (FitCommand, "fit the Bayesian-MoE posterior (K-FAC factors, prior precision)"),
            "route-train": (RouteTrainCommand, "train Bayesian routers (MCDR, SWAG, DER, MFVR, FCVR, VTSR) on top of "
                                               "the model's MAP routers, from the last MoE layer down"),
            "evaluate": (EvaluateCommand, "evaluate methods in-distribution and under shift")}


def register(sub) -> dict:
  parsers = {}
  for name, (root, text) in COMMANDS.items():
    p = parsers[name] = sub.add_parser(name, help=text)
    flags.add_flags(p, root())
    p.set_defaults(fn=_command(name, root))
  return parsers


def _log(c):
  """Reports for the user (stderr); under --quiet only those that warn (rows skipped, ids repeated)."""
  say = lambda text: print(text, file=sys.stderr, flush=True)
  return (lambda text: say(text) if " skipped: " in text or " more than once " in text else None) if c.run.quiet \
      else say


def _command(name, root):
  def run(args) -> int:
    command = flags.resolve(root(), args)
    if not command.run.model or not command.run.out:
      raise ValueError(f"bmoe {name}: missing --model and --out (flags or --config keys)")
    from bmoe_jax.files import output_lock
    with output_lock(command.run.out):  # before the model loads, not after an hour of work
      _run(name, command)
    return 0
  return run


def _run(name, command):
  t0 = time.perf_counter()
  mesh = None
  if command.run.mesh:
    from bmoe_jax.sharding import make_mesh
    mesh = make_mesh(command.run.mesh)
  import contextlib

  import jax
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    record = _RUNNERS[name](command, mesh)
  from bmoe_jax.pipeline.data import write_run
  write_run(command.run.out, _record(command), **record, seconds=time.perf_counter() - t0)


def _record(command) -> dict:
  from bmoe_jax.evaluate import run_record
  return run_record({k: v for sub in dataclasses.asdict(command).values() for k, v in sub.items()}, command.run.seed)


def _finetune(c: FinetuneCommand, mesh) -> dict:
  from bmoe_jax.checkpoint import save_params
  from bmoe_jax.pipeline import stages as ST

  params, cfg, tok = ST.load_model(c.run, mesh)
  batches, task, infos = ST.load_data(c.data, tok, cfg, ("train", "val"), c.run.seed, mesh, _log(c))
  tc = dataclasses.replace(c.train, seed=c.run.seed)
  res = ST.finetune(params, task, batches, tc, c.run.out, pretrained=params, progress=not c.run.quiet,
                    cache_prefix=c.run.cache_prefix)
  from bmoe_jax.identity import tree_digest
  from bmoe_jax.train import evaluate_nll, merge
  source = {"finetuned_from": str(c.run.model), "train": c.data.resolved().train}
  out = Path(c.run.out) / "model"
  # the tokenizer first: a model is complete once save_params writes its record. A rerun of this run (its
  # saves' fingerprint checked by ST.finetune) rewrites the models an interruption may have left behind.
  tok.save_pretrained(str(out))
  save_params(out, cfg, res.params, {**source, "state": "best validation NLL (early stopping)"}, overwrite=True)
  final = merge(res.state.train, res.params)
  if tree_digest(final) != tree_digest(res.params):  # trained past its best: the last state is kept as well
    tok.save_pretrained(str(out.with_name("model_final")))
    save_params(out.with_name("model_final"), cfg, final, {**source, "state": f"last (step {res.state.step})"},
                overwrite=True)
  val_nll = evaluate_nll(res.params, task, batches["val"])[0] if batches["val"] else None
  print(f"wrote {out} (val NLL {val_nll})")
  return {"data": infos, "history": res.history, "val_nll": val_nll}


def _fit(c: FitCommand, mesh) -> dict:
  from bmoe_jax.pipeline import stages as ST
  from bmoe_jax.pipeline.data import load_model_params

  params, cfg, tok = ST.load_model(c.run, mesh)
  splits = ("train", "val") if c.fit.prior == "grid" else ("train",)
  batches, task, infos = ST.load_data(c.data, tok, cfg, splits, c.run.seed, mesh, _log(c))
  if c.run.cache_prefix:
    start = min(ST.factor_spec(cfg, c.fit).layers)
    task, batches = ST.cache_prefix(params, task, batches, start, not c.run.quiet)
  pretrained = load_model_params(c.fit.pretrained, mesh)[1] if c.fit.pretrained else None
  _, info = ST.fit(params, task, batches, c.fit, c.run.out, pretrained=pretrained, seed=c.run.seed, mesh=mesh,
                   progress=not c.run.quiet)
  bmoe = info["bmoe"]
  print(f"wrote {Path(c.run.out) / 'posterior'} (prior precision {bmoe['prior_precision']:.4g}, log evidence "
        f"{bmoe['log_marglik_final']:.2f})")
  return {"data": infos, **bmoe}


def _route_train(c: RouteTrainCommand, mesh) -> dict:
  from bmoe_jax.pipeline import stages as ST
  from bmoe_jax.routing.train import parse_layers

  params, cfg, tok = ST.load_model(c.run, mesh)
  batches, task, infos = ST.load_data(c.data, tok, cfg, ("train",), c.run.seed, mesh, _log(c))
  if c.run.cache_prefix:
    task, batches = ST.cache_prefix(params, task, batches, min(parse_layers(cfg, c.route.route_layers)),
                                    not c.run.quiet)
  rtc = dataclasses.replace(c.route, seed=c.run.seed)
  out, history = ST.route_train(params, task, batches, c.router, rtc, c.run.out, model=str(c.run.model),
                                progress=not c.run.quiet)
  print(f"wrote {out} ({c.router.kind} routers in layers {parse_layers(cfg, rtc.route_layers)})")
  return {"data": infos, "history": history}


def _evaluate(c: EvaluateCommand, mesh) -> dict:
  from bmoe_jax.pipeline import stages as ST
  from bmoe_jax.pipeline.methods import Context

  params, cfg, tok = ST.load_model(c.run, mesh)
  names = c.eval.methods
  splits = (("eval",) + (("val",) if {"ts", "bmoe_ts"} & set(names) else ())
            + (("train",) if "llla" in names else ()))
  batches, task, infos = ST.load_data(c.data, tok, cfg, splits, c.run.seed, mesh, _log(c))
  if c.run.cache_prefix:
    task, batches = ST.cache_prefix(params, task, batches, min(cfg.moe_layer_ids, default=0), not c.run.quiet)
  posteriors, tempered = _posteriors(c.eval, names, params), {}
  if "bmoe_ts" in names:  # the --posterior's factors, the MAP's validation temperature, then the default grid
    fc = FitConfig(link=c.eval.link)
    val = ST.validation_stats(params, task, batches["val"], posteriors["bmoe"], fc.grid_values)
    posteriors["bmoe_ts"], tempered["bmoe_ts"] = ST.temper(posteriors["bmoe"], val, fc)
  ctx = Context(params, task, train=batches.get("train", []), val=batches.get("val", []), seed=c.run.seed,
                posteriors=posteriors, members=_members(c.eval, names, params, cfg, mesh),
                routers=_routers(c.eval, cfg), temperatures=ST.temperatures(tempered))
  keys = ST.eval_keys(c.data)
  _, info = ST.evaluate(ctx, {k: batches[k] for k in keys}, c.eval, c.run.out, in_distribution=keys[0],
                        record=_record(c), progress=not c.run.quiet)
  info.update(tempered)
  print((Path(c.run.out) / "results.md").read_text())
  return {"data": infos, "methods": info}


def _routers(ec: EvalConfig, cfg) -> dict:
  """{router kind: (plan, router parameters)} of every --routers directory."""
  from bmoe_jax.routing.io import load_routers
  out = {}
  for d in ec.routers:
    plan, rparams, _ = load_routers(d, cfg)
    kinds = {rc.kind for _, rc in plan.layers}
    if len(kinds) != 1 or next(iter(kinds)) in out:
      raise ValueError(f"--routers {d}: expected one router kind per directory, not already given (kinds {kinds})")
    out[next(iter(kinds))] = (plan, rparams)
  return out


def _posteriors(ec: EvalConfig, names, params) -> dict:
  from bmoe_jax.pipeline.stages import load_posterior
  out = {}
  for name in ("rt_laplace", "bmoe+rt_laplace"):
    if name in names:
      if not ec.router_posterior:
        raise ValueError(f"method {name} needs --router-posterior DIR (bmoe fit --laplace-router "
                         f"{'only' if name == 'rt_laplace' else 'with'}: RUN/posterior)")
      out[name] = load_posterior(ec.router_posterior, params)
  if not any(n in ("bmoe", "bmoe_ts") or (n.startswith("bmoe+") and n != "bmoe+rt_laplace") for n in names):
    return out
  if not ec.posterior:
    raise ValueError(f"methods {[n for n in names if n.startswith('bmoe')]} need --posterior DIR (the output of "
                     "bmoe fit: RUN/posterior)")
  import warnings

  from bmoe_jax.files import read_json
  meta = read_json(Path(ec.posterior) / "posterior.json").get("metadata", {})
  if meta.get("link", ec.link) != ec.link:
    warnings.warn(f"{ec.posterior}: its prior precision was chosen with link {meta['link']!r} and is evaluated with "
                  f"--link {ec.link!r}; pass the same --link to bmoe fit and bmoe evaluate")
  return {**out, "bmoe": load_posterior(ec.posterior, params)}


def _members(ec: EvalConfig, names, params, cfg, mesh) -> dict:
  """ensemble: the --members directories (deep ensemble: other seeds); ckpt_ensemble: every kept save of
  the fine-tuning run in --checkpoints."""
  from bmoe_jax.pipeline.data import load_model_params
  out = {}
  if "ensemble" in names:
    out["ensemble"] = [load_model_params(d, mesh)[1] for d in ec.members]
  if "ckpt_ensemble" in names:
    if not ec.checkpoints:
      raise ValueError("method ckpt_ensemble needs --checkpoints RUN (a bmoe finetune output directory)")
    from bmoe_jax.train import load_checkpoints
    path = Path(ec.checkpoints)
    path = path / "checkpoints" if (path / "checkpoints" / "finetune.json").exists() else path
    members = [p for _, p in load_checkpoints(path, params, cfg)]
    if mesh is not None:
      from bmoe_jax.sharding import shard_params
      members = [shard_params(p, cfg, mesh) for p in members]
    out["ckpt_ensemble"] = members
  return out


_RUNNERS = {"finetune": _finetune, "fit": _fit, "route-train": _route_train, "evaluate": _evaluate}
