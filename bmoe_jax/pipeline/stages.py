"""The pipeline's stages, shared by ``bmoe finetune / fit / evaluate``, ``bmoe demo`` and the experiments:

  params, cfg, tok = load_model(run, mesh)
  batches, task, infos = load_data(data, tok, cfg, ("train", "val", "eval"), seed, mesh)
  task, batches = cache_prefix(params, task, batches, start)     # optional: frozen layers < start, once
  result = finetune(params, task, batches, train_cfg, out)
  posteriors, info = fit(params, task, batches, fit_cfg, out, pretrained=...)
  routers_dir, history = route_train(params, task, batches, router_cfg, route_cfg, out)   # Bayesian routers
  results, info = evaluate(Context(params, task, ...), eval_sets, eval_cfg, out, in_distribution=...)

``batches`` is a dict: ``train``, ``val`` and one key per evaluation set (``data.eval_key(spec)``); every
set is padded to one set of C answer letters (the most choices of any example), so a method fitted on one
scores all.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from bmoe_jax import laplace as LA
from bmoe_jax import train as T
from bmoe_jax.identity import tree_digest
from bmoe_jax.params import read_blocks
from bmoe_jax.pipeline import data as PD
from bmoe_jax.pipeline.configs import DataConfig, EvalConfig, FitConfig, RunConfig
from bmoe_jax.pipeline.methods import BAYESIAN_MOE, Context, build_methods
from bmoe_jax.pipeline.validation import validation_stats  # noqa: F401  (a stage)
from bmoe_jax.task import Task, with_prefix


def load_model(run: RunConfig, mesh=None):
  """(params, cfg, tokenizer) of ``run.model``; ``mesh``: the parameters in their shardings."""
  if not run.model:
    raise ValueError("no model: pass --model DIR (a converted directory or an HF checkpoint)")
  return PD.load_model_and_tokenizer(run.model, run.tokenizer, mesh=mesh)


def load_data(data: DataConfig, tok, cfg, splits: Sequence[str], seed: int = 0, mesh=None, log=None):
  """(batches {train, val, <eval keys>}, task, infos) of the wanted ``splits`` (train | val | eval: the
  test set and every shift set), scored as ``data.scoring`` with one number of classes C for all of them
  (and one set of answer letters when lettered). ``log``: called with each set's load report (rows kept and
  skipped, the first reasons, duplicate ids)."""
  data = data.resolved()
  specs = {}
  if "train" in splits:
    specs["train"] = (data.train, data.max_train)
  if "val" in splits:
    specs["val"] = (data.val, data.max_eval)
  if "eval" in splits:
    specs.update({PD.eval_key(s): (s, data.max_eval) for s in (data.test,) + tuple(data.shift)})
  loaded = {k: PD.load_examples(spec, data.data_dir, n, seed) for k, (spec, n) in specs.items()}
  for k, (_, _, info) in loaded.items():
    if log is not None:
      log(f"data {k}: {info['report']}" + (f" ({info['used']} used)" if info["used"] != info["kept"] else ""))
  num_classes = max(len(e.choices) for _, examples, _ in loaded.values() for e in examples)
  batches, infos, class_ids = {}, {}, None
  for k, ld in loaded.items():
    bl, class_ids, infos[k] = PD.batches_of(ld, tok, batch_size=data.batch_size, max_length=data.max_length,
                                            seed=seed, chat=data.chat, num_classes=num_classes,
                                            scoring=data.scoring, norm=data.norm)
    batches[k] = PD.place_batches(bl, mesh)
  return batches, Task(cfg, class_ids), infos


def eval_keys(data: DataConfig) -> list[str]:
  """The evaluation sets' keys: the in-distribution test set first."""
  data = data.resolved()
  return [PD.eval_key(s) for s in (data.test,) + tuple(data.shift)]


def cache_prefix(params, task: Task, batches: dict, start: int, progress: bool = True):
  """(task, batches) with every batch's layer-``start`` inputs computed once (``task.with_prefix``)."""
  keys = list(batches)
  task, lists = with_prefix(params, task, [batches[k] for k in keys], start, progress)
  return task, dict(zip(keys, lists))


def finetune(params, task: Task, batches: dict, tc: T.TrainConfig, out: str | Path, *, pretrained=None,
             progress: bool = True, cache_prefix: bool = False) -> T.TrainResult:
  """MAP fine-tuning on ``batches["train"]`` (early stopping on ``batches["val"]``), resumable from
  ``out/checkpoints``."""
  return T.finetune(params, task, batches["train"], tc, val_batches=batches.get("val", ()), pretrained=pretrained,
                    checkpoint_dir=Path(out) / "checkpoints", progress=progress, cache_prefix=cache_prefix)


def mean_prior_precision(post) -> float:
  """The geometric mean of the prior precision over every Bayesian expert (as ``optimize_prior_precision``'s
  curve reports it)."""
  return float(np.exp(np.mean(np.concatenate([np.ravel(np.asarray(v)) for v in post.log_prior_prec_e.values()]))))


def fit(params, task: Task, batches: dict, fc: FitConfig, out: str | Path, *, pretrained=None, seed: int = 0,
        wanted: Sequence[str] = ("bmoe",), mesh=None, progress: bool = True) -> tuple[dict, dict]:
  """Factors -> posterior -> prior precision. Returns ({method: posterior} for the ``wanted`` Bayesian-MoE
  methods, info) and saves ``bmoe``'s posterior in ``out/posterior``: ``bmoe`` uses ``fc.prior`` (evidence
  or grid), ``bmoe_ml`` the evidence, ``bmoe_fixed`` ``fc.fixed_prior``, ``bmoe_ts`` the grid after the MAP's
  temperature (``temper``; its T in info, ``temperatures(info)`` for ``Context``); all share one factor pass."""
  if fc.prior_mean == "pretrained" and pretrained is None:  # before the factor pass, not after it
    raise ValueError("the prior mean is the pretrained weights (prior_mean='pretrained'), but none were given: "
                     "pass --pretrained DIR (the model before fine-tuning), or choose --prior-mean zero, or "
                     "--prior-mean map with --prior grid")
  spec, factors, state = factor_pass(params, task, batches["train"], fc, out, seed=seed, mesh=mesh,
                                     progress=progress)
  posts, info = posteriors(params, task, batches.get("val"), fc, factors, state, pretrained=pretrained, wanted=wanted,
                           progress=progress, resume_dir=None if out is None else Path(out) / "validation")
  info["spec"] = str(spec)
  if "bmoe" in wanted:
    LA.save_posterior(Path(out) / "posterior", posts["bmoe"], overwrite=True,  # a rerun of this factor pass
                      metadata={"spec": str(spec), "model": tree_digest(params), **info["bmoe"]})
  return {m: posts[m] for m in wanted if m in BAYESIAN_MOE}, info


def load_posterior(path: str | Path, params) -> LA.Posterior:
  """A saved posterior (``fit``'s ``out/posterior``), checked against the model ``params`` it was fitted to."""
  return LA.load_posterior(path, params)


def factor_spec(cfg, fc: FitConfig) -> LA.FactorSpec:
  """The K-FAC blocks and modes of ``fc`` on a model of config ``cfg`` (``fc.layers()`` resolved)."""
  return LA.FactorSpec(layers=LA.kfac.select_layers(cfg, fc.layers()), labels=fc.labels, tokens=fc.tokens,
                       rank=fc.rank, shared=fc.shared, router=fc.laplace_router != "off",
                       experts=fc.laplace_router != "only")


def factor_pass(params, task: Task, train_batches, fc: FitConfig, out: str | Path | None, *, seed: int = 0,
                mesh=None, progress: bool = True) -> tuple:
  """(spec, {Block: Factors}, FactorState): one K-FAC pass of ``fc``'s blocks over ``train_batches``, resumable
  from ``out/factors`` (``out`` None: not saved)."""
  spec = factor_spec(task.cfg, fc)
  state = LA.fit_factors(params, task, train_batches, spec, key=jax.random.key(seed),
                         checkpoint_dir=None if out is None else Path(out) / "factors", total=len(train_batches),
                         progress=progress, mesh=mesh)
  return spec, LA.kfac.finalize(state), state


def posteriors(params, task: Task, val_batches, fc: FitConfig, factors: dict, state, *, pretrained=None,
               wanted: Sequence[str] = ("bmoe",), remainder: bool = True, progress: bool = False,
               resume_dir: str | Path | None = None) -> tuple[dict, dict]:
  """({method: posterior}, info) of the Bayesian-MoE methods ``fit`` describes, from the ``factors`` of one
  pass (any subset of its blocks: block-diagonal, so a subset is the pass of those blocks alone) and its
  ``state``; ``remainder``: keep low-rank factors' isotropic remainders (``posterior.build``); ``progress``: a bar
  over the validation batches; ``resume_dir``: where the validation statistics are saved and resumed from
  (``validation_stats``)."""
  base = LA.build(factors, read_blocks(params, factors), prior_mean=_prior_mean(fc, pretrained, factors),
                  num_sequences=int(state.num_sequences), prior_precision=fc.fixed_prior, log_lik=state.log_lik,
                  remainder=remainder)
  posts, info = {"bmoe_fixed": base}, {"bmoe_fixed": {"prior_precision": fc.fixed_prior}}
  if "bmoe_ml" in wanted or ("bmoe" in wanted and fc.prior != "grid"):
    mode = fc.prior if fc.prior != "grid" else "layer"
    posts["bmoe_ml"], curve = LA.optimize_prior_precision(base, mode)
    info["bmoe_ml"] = {"mode": mode, "prior_precision": mean_prior_precision(posts["bmoe_ml"]),
                       "log_marglik": curve["log_marglik"][-1]}
  needs_val = "bmoe_ts" in wanted or ("bmoe" in wanted and fc.prior == "grid")
  val = validation_stats(params, task, val_batches, base, fc.grid_values, progress, resume_dir) if needs_val else None
  if "bmoe" in wanted:
    posts["bmoe"], info["bmoe"] = grid(base, val, fc) if fc.prior == "grid" else (posts["bmoe_ml"], info["bmoe_ml"])
    info["bmoe"]["log_marglik_final"] = float(LA.posterior.log_marginal_likelihood(posts["bmoe"]))
  if "bmoe_ts" in wanted:
    posts["bmoe_ts"], info["bmoe_ts"] = temper(base, val, fc)
  return posts, info


def grid(base, val: LA.predictive.GridStats, fc: FitConfig, temperature: float = 1.0) -> tuple:
  """(posterior, info): the global prior precision of ``base`` by validation NLL over ``fc.grid_values``
  (``val``: ``validation_stats`` on that grid), of the predictive tempered by ``temperature``."""
  post, curve = LA.predictive.grid_search_prior_precision(base, val, grid=fc.grid_values, link=fc.link,
                                                          temperature=temperature)
  info = {"mode": f"grid (validation NLL, {fc.link})", "link": fc.link, "prior_precision": mean_prior_precision(post),
          "val_nll": min(curve["nll"]), "grid": curve, "grid_edge": grid_edge(curve["nll"])}
  if info["grid_edge"]:
    warnings.warn(f"prior-precision grid: the lowest validation NLL is at the grid's {info['grid_edge']} end "
                  f"(lambda={info['prior_precision']:.3g}); the optimum may lie beyond it: widen --grid")
  return post, info


def temper(base, val: LA.predictive.GridStats, fc: FitConfig) -> tuple:
  """Bayesian-MoE + temperature (``bmoe_ts``), sequentially: first the MAP's temperature T on the validation
  set (temperature scaling's: the MAP logits are the linearisation point's), then the global prior precision
  by validation NLL of the tempered predictive N(f* / T, Sigma_f / T^2). Returns (posterior, info with
  ``temperature``)."""
  from bmoe_jax.baselines.methods import fit_temperature
  t = fit_temperature(val.f_nc, val.labels_n)
  post, info = grid(base, val, fc, t)
  return post, {**info, "mode": f"temperature T = {t:.3f} (validation NLL), then {info['mode']}", "temperature": t}


def temperatures(info: dict) -> dict:
  """{method: logit temperature} of the tempered Bayesian-MoE methods in ``fit``'s info (for ``Context``)."""
  return {m: i["temperature"] for m, i in info.items() if isinstance(i, dict) and "temperature" in i}


def grid_edge(nll) -> str | None:
  """'lower' / 'upper' when a grid's minimum is its first / last point (the optimum may lie outside)."""
  i = int(np.argmin(nll))
  return "lower" if i == 0 else "upper" if i == len(nll) - 1 else None


def _prior_mean(fc: FitConfig, pretrained, factors):
  """The prior mean of every block: ``fc.prior_mean``, except that router blocks (the Laplace router) are
  centred at zero when the experts are centred at the pretrained weights: routers are usually frozen in
  fine-tuning, so the pretrained router is the MAP one and an evidence centred there grows without bound."""
  if fc.prior_mean != "pretrained":
    return fc.prior_mean
  mean = read_blocks(pretrained, factors)
  return {b: jax.numpy.zeros_like(w) if b.kind == "router" else w for b, w in mean.items()}


def route_train(params, task: Task, batches: dict, rc, rtc, out: str | Path, *, model: str | None = None,
                progress: bool = True) -> tuple[Path, list]:
  """Bayesian routers ``rc`` trained on ``batches["train"]`` (``routing.train``, resumable from ``out/stages``),
  saved in ``out/routers`` (``routing.io``). Returns (that directory, the training history)."""
  from bmoe_jax.routing.io import save_routers
  from bmoe_jax.routing.train import train_routers

  plan, rparams, history = train_routers(params, task, batches["train"], rc, rtc, out=Path(out) / "stages",
                                         progress=progress)
  meta = {"model": model, "route_train": dataclasses.asdict(rtc), "history": history}
  return save_routers(Path(out) / "routers", plan, rparams, task.cfg, meta, overwrite=True), history  # a rerun


def evaluate(ctx: Context, eval_sets: dict, ec: EvalConfig, out: str | Path, *, in_distribution: str,
             record: dict | None = None, progress: bool = True, resume_key: dict | None = None) -> tuple[dict, dict]:
  """Every method of ``ec.methods`` on every evaluation set: (results, what each method fitted);
  ``out``: results.json, results.md, reliability diagrams. ``resume_key``: see ``bmoe_jax.evaluate.evaluate``."""
  from bmoe_jax.evaluate import evaluate as run_eval
  methods, info = build_methods(ec.methods, dataclasses.replace(ctx, link=ec.link), ec)
  results = run_eval(methods, eval_sets, in_distribution=in_distribution, out_dir=out, ci=ec.ci, record=record,
                     progress=progress, resume_key=resume_key)
  if ec.stability:
    from bmoe_jax.pipeline.routing import routing_report
    info["routing"] = routing_report(dataclasses.replace(ctx, link=ec.link), ec, ec.methods,
                                     eval_sets[in_distribution][:ec.stability_batches], out)
  return results, info
