"""The ablations of PROTOCOL.md §7 (v1.3) on one fine-tuning run (``WHERE``: ARC-E, long regime, seed 0):
layer quarters and all-but-one, blocks (+ shared expert), rank (with and without the low-rank remainder),
token and label modes, each scored with the four prior-precision choices (dev grid; evidence global / layer /
expert), each with the cost of its factor pass and of its predictive relative to a MAP forward.

  python -m experiments.tables.run ablation --model runs/healed --data-dir ../shared/data

Factor passes are resumable (``WORK/ablation/<pass>/factors``) and every finished row is saved
(``WORK/ablation/rows/<row>.{npz,json}``), so a stopped run restarts at the first unfinished row. The rows of
the layer and block groups read the sub-blocks of one pass over routed + shared experts (block-diagonal:
a block's factors do not depend on which other blocks are Bayesian; ``tests/experiments`` checks it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import numpy as np

from bmoe_jax import baselines as BL
from bmoe_jax import laplace as LA
from bmoe_jax import metrics as M
from bmoe_jax import plots
from bmoe_jax.evaluate import collect_scored
from bmoe_jax.files import read_json, write_json, write_text
from bmoe_jax.laplace.fit import factor_dtype
from bmoe_jax.laplace.posterior import PRIOR_MODES
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.data import eval_key
from experiments.tables import cells as C
from experiments.tables import protocol as P

WHERE = ("arc_easy", 0, "long")  # dataset, seed, regime
RANKS = (1, 5, 10, 20, 50)
MODES = tuple((t, l) for t in ("last", "reduce", "expand") for l in ("exact", "mc"))
COST_BATCHES = 8  # a factor pass's per-batch cost: the mean over batches 2 .. 1 + COST_BATCHES
LAMBDAS = ("grid",) + tuple(f"ev_{m}" for m in PRIOR_MODES)
METRICS = ("acc", "nll", "ece", "brier", "aurc", "err_auroc")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  group: str
  pass_name: str  # the factor pass (``passes()``) whose blocks it reads
  own: tuple = ()  # (FitConfig field, value) of the row's own spec: its factor cost is timed on it
  layers: tuple[int, ...] | None = None  # MoE layer ids (None: all)
  shared: bool = False  # also the shared experts
  remainder: bool = True  # low-rank factors' isotropic remainders

  def keeps(self, blk) -> bool:
    return (self.layers is None or blk.layer in self.layers) and (blk.kind == "routed" or
                                                                   (self.shared and blk.kind == "shared"))


def passes() -> dict[str, dict]:
  """{pass name: FitConfig overrides}: the factor passes the rows read."""
  out = {"routed_shared": {"shared": True}}
  out.update({f"rank{r}": {"rank": r} for r in RANKS})
  out.update({f"{t}_{lab}": {"tokens": t, "labels": lab} for t, lab in MODES if (t, lab) != ("last", "exact")})
  return out


def rows(cfg) -> list[Row]:
  """Every row of the ablation, in the report's order."""
  moe = tuple(cfg.moe_layer_ids)
  out = [Row("base", "base", "routed_shared")]
  for q in ("Q1", "Q2", "Q3", "Q4"):
    layers = LA.kfac.select_layers(cfg, q)
    out.append(Row(q, "layers", "routed_shared", (("bayes_layers", q),), layers))
    rest = tuple(l for l in moe if l not in layers)
    out.append(Row(f"all_but_{q}", "layers", "routed_shared", (("bayes_layers", ",".join(map(str, rest))),), rest))
  out.append(Row("shared", "blocks", "routed_shared", (("shared", True),), shared=True))
  out += [Row(f"rank{r}", "rank", f"rank{r}", (("rank", r),)) for r in RANKS]
  out.append(Row("rank10_no_remainder", "rank", "rank10", (("rank", 10),), remainder=False))
  out += [Row(f"{t}_{lab}", "modes", f"{t}_{lab}", (("tokens", t), ("labels", lab)))
          for t, lab in MODES if (t, lab) != ("last", "exact")]
  return out


def median_seconds(method, batches) -> float:
  """A method's median wall time per batch over ``batches`` (the first, compiling, batch left out)."""
  seconds: list = []
  collect_scored(method, batches, seconds=seconds)
  return float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def factor_seconds(params, task, train, fc, seed: int) -> float:
  """A factor pass's wall time per batch of ``fc``'s spec: the pass's jitted update over the first
  1 + COST_BATCHES training batches, the first (compiling) left out."""
  spec = ST.factor_spec(task.cfg, fc)
  state = LA.kfac.init(task.cfg, spec, factor_dtype(params, spec))
  step = jax.jit(functools.partial(LA.kfac.update, task=task, spec=spec))
  seconds, key = [], jax.random.key(seed)
  for i, batch in enumerate(train[:1 + COST_BATCHES]):
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state, params, batch=batch, key=jax.random.fold_in(key, i)))
    seconds.append(time.perf_counter() - t0)
  return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


def row_posteriors(row: Row, fc, params, healed, task, val, factors, state) -> tuple[dict, dict]:
  """({lambda choice: posterior}, {choice: prior precision (geometric mean), ...}) of a row's blocks."""
  sub = {b: f for b, f in factors.items() if row.keeps(b)}
  posts, info = ST.posteriors(params, task, val, fc, sub, state, pretrained=healed, wanted=("bmoe",),
                              remainder=row.remainder)
  named = {"grid": posts["bmoe"]}
  fitted = {"grid": {"prior_precision": info["bmoe"]["prior_precision"], "val_nll": info["bmoe"]["val_nll"],
                     "grid_edge": info["bmoe"]["grid_edge"]}}
  for mode in PRIOR_MODES:
    named[f"ev_{mode}"], curve = LA.optimize_prior_precision(posts["bmoe_fixed"], mode)
    fitted[f"ev_{mode}"] = {"prior_precision": ST.mean_prior_precision(named[f"ev_{mode}"]),
                            "log_marglik": float(curve["log_marglik"][-1])}
  return named, {"lambda": fitted, "blocks": [str(b) for b in sub]}


def row_cell(out: Path, row: Row, ctx: dict, factors, state) -> dict:
  """One row: its posteriors, its test probabilities per lambda choice (``rows/<row>.npz``), its costs."""
  fc = dataclasses.replace(ctx["fit"], **passes()[row.pass_name])
  named, record = row_posteriors(row, fc, ctx["params"], ctx["healed"], ctx["task"], ctx["val"], factors, state)
  methods = BL.bayesian_moe_variants(named, ctx["params"], ctx["task"], link=fc.link, key=None)
  arrays, seconds = {}, []
  for i, (choice, method) in enumerate(methods.items()):  # the first pays the Jacobian statistics, timed
    probs, labels, scores = collect_scored(method, ctx["test"], seconds=seconds if i == 0 else None)
    arrays.update({f"{choice}/probs": probs, "labels": labels, **{f"{choice}/{k}": v for k, v in scores.items()}})
  if row.own not in ctx["factor_s"]:  # rows of one spec (rank10 with and without remainder) share its timing
    own = dataclasses.replace(ctx["fit"], **dict(row.own))
    ctx["factor_s"][row.own] = factor_seconds(ctx["params"], ctx["task"], ctx["train"], own, ctx["seed"])
  per_batch = ctx["factor_s"][row.own]
  record.update({"row": dataclasses.asdict(row), "protocol": P.VERSION, "cost": {
      "factor_s_per_batch": per_batch, "factor_pass_s": per_batch * len(ctx["train"]),
      "factor_vs_map_forward": per_batch / ctx["map_s"]["train"],
      "predictive_s_per_batch": float(np.median(seconds[1:])),
      "predictive_vs_map_forward": float(np.median(seconds[1:])) / ctx["map_s"]["test"]}})
  (out / "rows").mkdir(parents=True, exist_ok=True)
  np.savez(out / "rows" / f"{row.name}.npz", **arrays)
  write_json(out / "rows" / f"{row.name}.json", record, default=float)
  return record


def ablation_cell(s: C.Setup, link: str, where=WHERE, only: set | None = None) -> Path:
  """Every row (of ``only``, when given) not yet saved under ``WORK/ablation``, pass by pass. Returns that
  directory."""
  name, seed, regime = where
  out = s.work / "ablation"
  healed, cfg, batches, task = C._prepare(s, name, ("train", "val", "eval"))
  _, params, _ = C.regime_params(s, name, seed, regime, healed, cfg)
  test = batches[eval_key(s.datasets[name].test)]
  fmap = BL.map_method(params, task)
  ctx = {"params": params, "healed": healed, "task": task, "val": batches["val"], "train": batches["train"],
         "test": test, "seed": seed, "fit": dataclasses.replace(P.FIT, link=link), "factor_s": {},
         "map_s": {"train": median_seconds(fmap, batches["train"][:1 + COST_BATCHES]),
                   "test": median_seconds(fmap, test)}}
  all_rows = [r for r in rows(cfg) if only is None or r.name in only]
  for pass_name, over in passes().items():
    todo = [r for r in all_rows if r.pass_name == pass_name and not (out / "rows" / f"{r.name}.json").exists()]
    if todo:
      fc = dataclasses.replace(ctx["fit"], **over)
      _, factors, state = ST.factor_pass(params, task, batches["train"], fc, out / pass_name, seed=seed,
                                         progress=s.progress)
      for r in todo:
        row_cell(out, r, ctx, factors, state)
  write_json(out / "map.json", {"map_s_per_batch": ctx["map_s"], "where": list(where), "link": link,
                                "rows": [r.name for r in rows(cfg)]})
  return out


def report(work: Path, out: Path) -> dict:
  """The ablation's table (``out/ablation.{json,md}``) from the saved rows: metrics per row and lambda choice,
  the difference from base (description: one seed), lambda, and the costs. Empty when nothing was run."""
  src = work / "ablation"
  if not (src / "map.json").exists():
    return {}
  meta, table = read_json(src / "map.json"), {}
  names = meta["rows"]
  base = np.load(src / "rows" / "base.npz") if (src / "rows" / "base.npz").exists() else None
  for name in names:
    if not (src / "rows" / f"{name}.json").exists():
      continue
    record, z = read_json(src / "rows" / f"{name}.json"), np.load(src / "rows" / f"{name}.npz")
    table[name] = {"group": record["row"]["group"], "cost": record["cost"], "choices": {}}
    for choice in LAMBDAS:
      summ = M.summary(z[f"{choice}/probs"], z["labels"])
      entry = {k: summ[k] for k in METRICS} | {"lambda": record["lambda"][choice]["prior_precision"]}
      if base is not None and name != "base":
        entry["nll_vs_base"] = M.paired_difference(M.nll, z[f"{choice}/probs"][None], base[f"{choice}/probs"][None],
                                                   z["labels"], num_samples=1000)
      table[name]["choices"][choice] = entry
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "ablation.json", {**meta, "protocol": P.VERSION, "table": table}, default=float)
  write_text(out / "ablation.md", markdown(table, meta["where"]))
  plots.grouped_bars({n: {c: e["nll"] for c, e in t["choices"].items()} for n, t in table.items()},
                     out / "ablation_nll.png", ylabel="test NLL", title="Ablations: NLL per row and λ choice")
  plots.grouped_bars({n: {"factor pass": t["cost"]["factor_vs_map_forward"],
                          "predictive": t["cost"]["predictive_vs_map_forward"]} for n, t in table.items()},
                     out / "ablation_cost.png", ylabel="× a MAP forward (per batch)", log=True,
                     title="Ablations: cost relative to a MAP forward")
  return table


def markdown(table: dict, where) -> str:
  lines = [f"# Ablations (protocol v{P.VERSION}, §7): {where[0]}, {where[2]} regime, seed {where[1]}", "",
           "One seed: descriptive. ΔNLL vs base: per-question paired bootstrap on this seed's test questions.", "",
           "| row | group | λ choice | λ | acc | nll | ece | aurc | err_auroc | ΔNLL vs base | factor pass (s) | "
           "factor / MAP fwd | predictive / MAP fwd |", "|---|---|---|---:|" + "---:|" * 9]
  for name, t in table.items():
    c = t["cost"]
    for choice, e in t["choices"].items():
      d = e.get("nll_vs_base")
      diff = f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d else ""
      fmt = lambda v: "—" if v is None else f"{v:.4f}"
      lines.append(f"| {name} | {t['group']} | {choice} | {e['lambda']:.3g} | " +
                   " | ".join(fmt(e[k]) for k in ("acc", "nll", "ece", "aurc", "err_auroc")) +
                   f" | {diff} | {c['factor_pass_s']:.0f} | {c['factor_vs_map_forward']:.1f} | "
                   f"{c['predictive_vs_map_forward']:.1f} |")
  return "\n".join(lines) + "\n"
