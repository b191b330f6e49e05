"""``bmoe finetune``, ``bmoe fit`` and ``bmoe evaluate``: small JSON config files plus flags (flags win).
Every run writes ``run.json`` (its config, versions, seed, data used and wall time) beside its outputs."""

from __future__ import annotations

import time
from pathlib import Path

METHODS = ("map", "ts", "mc_dropout", "llla", "bmoe", "ensemble", "ckpt_ensemble")


def _common(p):
  p.add_argument("--config", help="JSON file of option values (keys as the flags, - or _)")
  p.add_argument("--model", required=False, help="converted model directory (bmoe convert) or HF checkpoint")
  p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
  p.add_argument("--data-dir", help="benchmark files in the layout of ../shared/data (default: $BMOE_DATA_DIR)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-length", type=int, default=256)
  p.add_argument("--max-examples", type=int, help="seeded subset of each dataset (CPU-sized runs)")
  p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=False, help="output directory")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--mesh", help="run on a device mesh, e.g. data=2,expert=4 (axes data, expert, model; their "
                 "product = the device count): parameters in their shardings, batches split on data")


def register(sub) -> dict:
  ps = {}
  f = ps["finetune"] = sub.add_parser("finetune", help="MAP fine-tuning on a benchmark (optax AdamW)")
  _common(f)
  f.add_argument("--train", default="obqa:train", help="dataset spec name:split")
  f.add_argument("--val", default="obqa:dev")
  f.add_argument("--trainable", default="experts", help="experts | experts_router | attention | all")
  f.add_argument("--layers", help="comma-separated layer ids to train (default all)")
  f.add_argument("--lr", type=float, default=1e-4)
  f.add_argument("--epochs", type=int, default=1)
  f.add_argument("--max-steps", type=int)
  f.add_argument("--warmup-steps", type=int, default=0)
  f.add_argument("--grad-accum", type=int, default=1)
  f.add_argument("--prior-precision", type=float, default=0.0)
  f.add_argument("--eval-every", type=int, default=0)
  f.add_argument("--patience", type=int, default=0)
  f.add_argument("--checkpoint-every", type=int, default=50, help="micro-steps between orbax saves")
  f.add_argument("--keep-checkpoints", type=int, default=2,
                 help="saves kept (the members of a checkpoint ensemble: bmoe evaluate --methods ckpt_ensemble)")
  _cache_flag(f, "the lowest trainable one")
  f.set_defaults(fn=_meshed(cmd_finetune))
  fi = ps["fit"] = sub.add_parser("fit", help="fit the Bayesian-MoE posterior (K-FAC factors, LPO prior)")
  _common(fi)
  fi.add_argument("--data", default="obqa:train", help="dataset spec of the fit data")
  fi.add_argument("--pretrained", help="model directory of the pretrained weights (the prior mean)")
  fi.add_argument("--bayes-layers", default="all", help="all | Q1..Q4 | comma-separated MoE layer ids")
  fi.add_argument("--shared", action="store_true", help="also the shared experts")
  fi.add_argument("--labels", default="exact")
  fi.add_argument("--tokens", default="last")
  fi.add_argument("--rank", type=int, help="low-rank factors (default: full)")
  fi.add_argument("--prior", default="layer",
                  help="global | layer | expert (evidence maximisation, LPO) or grid (validation NLL, --val)")
  fi.add_argument("--val", default="obqa:dev", help="validation spec for --prior grid")
  _cache_flag(fi, "the lowest Bayesian layer")
  fi.set_defaults(fn=_meshed(cmd_fit))
  e = ps["evaluate"] = sub.add_parser("evaluate", help="evaluate methods on in-distribution and shifted data")
  _common(e)
  e.add_argument("--id", default="obqa:test", help="in-distribution dataset spec")
  e.add_argument("--shift", default="", help="comma-separated dataset specs under shift")
  e.add_argument("--val", default="obqa:dev", help="validation spec (temperature scaling, last-layer fit)")
  e.add_argument("--methods", default="map,ts", help=f"comma-separated, from {', '.join(METHODS)}")
  e.add_argument("--posterior", help="posterior directory (bmoe fit) for method bmoe")
  e.add_argument("--members", default="", help="comma-separated model directories for method ensemble")
  e.add_argument("--checkpoints", help="a fine-tuning run's checkpoints directory (RUN/checkpoints) for method "
                 "ckpt_ensemble: every kept save is a member")
  _cache_flag(e, "the lowest MoE layer (every method then runs only the top layers; ensemble members must "
                 "agree below it)")
  e.add_argument("--dropout", type=float, default=0.1)
  e.add_argument("--ci", action="store_true", help="bootstrap 95%% intervals")
  e.set_defaults(fn=_meshed(cmd_evaluate))
  return ps


def _cache_flag(p, where):
  p.add_argument("--cache-prefix", action="store_true",
                 help=f"run the frozen layers below {where} once per batch and reuse their output")


def _prefixed(args, params, cfg, start, *batch_lists):
  """The batch lists with their layer-``start`` inputs cached (``--cache-prefix``) and the forward keywords
  that use them; unchanged lists and no keywords without the flag."""
  from bmoe_jax.train import with_prefix_states
  if not args.cache_prefix or not start:
    return {}, batch_lists
  return {"start_layer": start}, tuple(with_prefix_states(params, cfg, bl, start, progress=not args.quiet)
                                       for bl in batch_lists)


def _need(args, *names):
  missing = [n for n in names if not getattr(args, n.replace("-", "_"), None)]
  if missing:
    raise SystemExit(f"bmoe {args.command}: missing --{', --'.join(missing)} (flag or --config key)")


def _meshed(cmd):
  """Run ``cmd`` under ``--mesh`` (``jax.set_mesh``); ``args.mesh_`` is the Mesh or None."""
  def run(args):
    if not getattr(args, "mesh", None):
      args.mesh_ = None
      return cmd(args)
    import jax

    from bmoe_jax.sharding import make_mesh
    args.mesh_ = make_mesh(args.mesh)
    with jax.set_mesh(args.mesh_):
      return cmd(args)
  run.__name__ = cmd.__name__
  return run


def _batches(args, spec, tok, shuffle=False, num_classes=None):
  from bmoe_jax.pipeline import batches_for, place_batches
  batches, class_ids, info = batches_for(spec, tok, data_dir=args.data_dir, batch_size=args.batch_size,
                                         max_length=args.max_length, max_examples=args.max_examples, seed=args.seed,
                                         shuffle=shuffle, chat=args.chat, num_classes=num_classes)
  return place_batches(batches, args.mesh_), class_ids, info


def _load(args, model_dir):
  from bmoe_jax.pipeline import load_model_and_tokenizer
  return load_model_and_tokenizer(model_dir, args.tokenizer, mesh=args.mesh_)


def _params(args, model_dir):
  from bmoe_jax.pipeline import load_model_params
  return load_model_params(model_dir, mesh=args.mesh_)[1]


def _record(args):
  from bmoe_jax.evaluate import run_record
  cfg = {k: v for k, v in vars(args).items() if k not in ("fn",) and not k.endswith("_") and not callable(v)}
  return run_record(cfg, args.seed)


def cmd_finetune(args) -> int:
  from bmoe_jax import train as T
  from bmoe_jax.checkpoint import save_params
  from bmoe_jax.pipeline import write_run

  _need(args, "model", "out")
  t0 = time.perf_counter()
  params, cfg, tok = _load(args, args.model)
  train, class_ids, tinfo = _batches(args, args.train, tok)
  val, _, vinfo = _batches(args, args.val, tok) if args.val else ([], None, {})
  tc = T.TrainConfig(trainable=args.trainable, layers=None if not args.layers else tuple(
      int(x) for x in args.layers.split(",")), learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps,
      warmup_steps=args.warmup_steps, grad_accum=args.grad_accum, prior_precision=args.prior_precision,
      eval_every=args.eval_every, patience=args.patience, checkpoint_every=args.checkpoint_every,
      keep_checkpoints=args.keep_checkpoints, seed=args.seed)
  res = T.finetune(params, cfg, train, class_ids, tc, val_batches=val, pretrained=params,
                   checkpoint_dir=Path(args.out) / "checkpoints", progress=not args.quiet,
                   cache_prefix=args.cache_prefix)
  out = Path(args.out) / "model"
  save_params(out, cfg, res.params, {"finetuned_from": str(args.model), "train": args.train})
  tok.save_pretrained(str(out))
  val_nll = T.evaluate_nll(res.params, cfg, val, class_ids)[0] if val else None
  write_run(args.out, _record(args), data={"train": tinfo, "val": vinfo}, history=res.history,
            val_nll=val_nll, seconds=time.perf_counter() - t0)
  print(f"wrote {out} (val NLL {val_nll}) in {time.perf_counter() - t0:.1f} s")
  return 0


def cmd_fit(args) -> int:
  import jax
  import numpy as np

  from bmoe_jax import laplace as LA
  from bmoe_jax.pipeline import write_run

  _need(args, "model", "out")
  t0 = time.perf_counter()
  params, cfg, tok = _load(args, args.model)
  batches, class_ids, info = _batches(args, args.data, tok)
  num_classes = info["num_classes"]
  which = args.bayes_layers if args.bayes_layers in ("all", "Q1", "Q2", "Q3", "Q4") else [
      int(x) for x in args.bayes_layers.split(",")]
  spec = LA.FactorSpec(layers=LA.kfac.select_layers(cfg, which), labels=args.labels, tokens=args.tokens,
                       rank=args.rank, shared=args.shared)
  fkw, (batches,) = _prefixed(args, params, cfg, min(spec.layers), batches)
  state = LA.fit_factors(params, cfg, batches, class_ids, spec, key=jax.random.key(args.seed),
                         checkpoint_dir=Path(args.out) / "factors", total=len(batches), progress=not args.quiet,
                         mesh=args.mesh_, **fkw)
  pretrained = _params(args, args.pretrained) if args.pretrained else None  # converted or HF dir
  post = LA.build(LA.kfac.finalize(state), params, num_sequences=int(state.num_sequences), pretrained=pretrained,
                  log_lik=state.log_lik)
  if args.prior == "grid":
    val, _, vinfo = _batches(args, args.val, tok, num_classes=num_classes)
    val = _prefixed(args, params, cfg, min(spec.layers), val)[1][0]
    stats = jax.jit(lambda p, po, b: LA.predictive.jacobian_stats(p, cfg, b, class_ids, po, **fkw))
    post, curve = LA.predictive.grid_search_prior_precision(post, [(stats(params, post, b), b.labels_b)
                                                                   for b in val])
    best = float(np.exp(np.mean([np.mean(np.asarray(v)) for v in post.log_prior_prec_e.values()])))
    summary = {"prior_precision": best, "val_nll": min(curve["nll"]), "grid": curve, "val": vinfo}
  else:
    post, curve = LA.optimize_prior_precision(post, args.prior)
    summary = {"prior_precision": curve["prior_precision"][-1], "log_marglik": curve["log_marglik"][-1]}
  summary["log_marglik_final"] = float(LA.posterior.log_marginal_likelihood(post))
  LA.save_posterior(Path(args.out) / "posterior", post, metadata={"data": info, "spec": str(spec)})
  write_run(args.out, _record(args), data=info, **summary, seconds=time.perf_counter() - t0)
  print(f"wrote {Path(args.out) / 'posterior'} (prior precision {summary['prior_precision']:.4g}, log evidence "
        f"{summary['log_marglik_final']:.2f}) in {time.perf_counter() - t0:.1f} s")
  return 0


def cmd_evaluate(args) -> int:
  import jax

  from bmoe_jax import baselines as BL
  from bmoe_jax.evaluate import evaluate
  from bmoe_jax.pipeline import batches_of, load_examples, place_batches, write_run
  from bmoe_jax.train import same_prefix

  _need(args, "model", "out")
  t0 = time.perf_counter()
  params, cfg, tok = _load(args, args.model)
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  bad = [m for m in names if m not in METHODS]
  if bad:
    raise SystemExit(f"bmoe evaluate: unknown methods {bad}; expected some of {METHODS}")
  specs = [args.id] + [s for s in args.shift.split(",") if s]
  loaded = {spec: load_examples(spec, args.data_dir, args.max_examples, args.seed) for spec in specs}
  # one set of answer letters for all datasets: C = the most choices of any example (ARC has up to 5)
  num_classes = max(len(e.choices) for _, examples, _ in loaded.values() for e in examples)
  data, infos = {}, {}
  for spec in specs:
    key = spec.replace(":", "_").replace("+", "-")
    batches, class_ids, infos[key] = batches_of(loaded[spec], tok, batch_size=args.batch_size,
                                                max_length=args.max_length, seed=args.seed, chat=args.chat,
                                                num_classes=num_classes)
    data[key] = place_batches(batches, args.mesh_)
  val = _batches(args, args.val, tok, num_classes=num_classes)[0] if any(m in names for m in ("ts", "llla")) else []
  start = min(cfg.moe_layer_ids, default=0)
  keys = list(data)
  fkw, (val, *lists) = _prefixed(args, params, cfg, start, val, *data.values())
  data = dict(zip(keys, lists))
  methods = {}
  for m in names:
    if m == "map":
      methods[m] = BL.map_method(params, cfg, class_ids, **fkw)
    elif m == "ts":
      methods[m], temp = BL.temperature_scaling(params, cfg, class_ids, val, **fkw)
      infos["temperature"] = temp
    elif m == "mc_dropout":
      methods[m] = BL.mc_dropout(params, cfg, class_ids, rate=args.dropout, key=jax.random.key(args.seed), **fkw)
    elif m == "llla":
      methods[m] = BL.last_layer_laplace(params, cfg, class_ids, val, **fkw)[0]
    elif m in ("ensemble", "ckpt_ensemble"):
      members = _members(args, m, params, cfg)
      if fkw and not all(same_prefix(params, p, start) for p in members):
        raise SystemExit(f"bmoe evaluate --cache-prefix: the {m} members differ from --model below layer {start}; "
                         "evaluate without --cache-prefix")
      infos[f"{m}_members"] = len(members)
      methods[m] = BL.ensemble(members, cfg, class_ids, **fkw)
    else:
      _need(args, "posterior")
      from bmoe_jax.laplace import load_posterior
      methods[m] = BL.bayesian_moe(load_posterior(args.posterior), params, cfg, class_ids, **fkw)
  res = evaluate(methods, data, in_distribution=next(iter(data)), out_dir=args.out, ci=args.ci,
                 record=_record(args), progress=not args.quiet)
  write_run(args.out, _record(args), data=infos, seconds=time.perf_counter() - t0)
  print((Path(args.out) / "results.md").read_text())
  return 0 if res else 1


def _members(args, method, params, cfg) -> list:
  """ensemble: --model plus the --members directories (deep ensemble: other seeds); ckpt_ensemble: every
  kept save of the fine-tuning run in --checkpoints."""
  if method == "ensemble":
    return [params] + [_params(args, d) for d in args.members.split(",") if d]
  _need(args, "checkpoints")
  from bmoe_jax.train import load_checkpoints
  path = Path(args.checkpoints)
  path = path / "checkpoints" if (path / "checkpoints" / "finetune.json").exists() else path
  members = [p for _, p in load_checkpoints(path, params, cfg)]
  if args.mesh_ is not None:
    from bmoe_jax.sharding import shard_params
    members = [shard_params(p, cfg, args.mesh_) for p in members]
  return members
