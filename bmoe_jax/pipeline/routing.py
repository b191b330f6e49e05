"""What ``bmoe evaluate --stability`` adds for routers: routing stability (``routing.stability``) of the
deterministic router and of every router method evaluated, on the first batches of the in-distribution set, and
each router's analytic extra FLOPs per token; written as OUT/routing.json, OUT/routing.md and
OUT/plots/stability.png. Stability is read on the router's own layers (the deterministic router's on the
same layers) and averaged over them; a stochastic router is probed at draw 0 (an ensemble: member 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmoe_jax.files import write_json, write_text
from bmoe_jax.pipeline.methods import ROUTER_METHODS, Context, router_task
from bmoe_jax.routing import stability as STB


def routing_report(ctx: Context, ec, names, batches, out: str | Path | None = None) -> dict:
  """{"stability": {method: {layer: ...}}, "router_flops_per_token": {...}, "forward_flops_per_token": float}."""
  cfg = ctx.task.cfg
  routers = [n for n in names if n in ROUTER_METHODS]
  stab = {"map": STB.routing_stability(ctx.params, ctx.task, batches)}
  flops = {}
  for name in routers:
    task, params = router_task(ctx, ec, name)
    stab[name] = STB.routing_stability(params, task, batches)
    flops[name] = sum(STB.router_flops(rc, cfg.hidden_size, cfg.num_experts) for _, rc in task.routing.layers)
  report = {"stability": {m: {str(l): v for l, v in per.items()} for m, per in stab.items()},
            "router_flops_per_token": flops, "forward_flops_per_token": STB.forward_flops(cfg)}
  if out is not None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "routing.json", report)
    md, curves = markdown(report)
    write_text(out / "routing.md", md)
    from bmoe_jax.plots import stability_curves
    stability_curves(curves, out / "plots" / "stability.png", title="routing stability")
  return report


def mean_curves(report: dict) -> dict:
  """{method: (gammas, mean Jaccard over the routers' layers, mean resample Jaccard)}."""
  stab = report["stability"]
  routed = sorted({l for m, per in stab.items() if m != "map" for l in per}) or sorted(stab["map"])
  out = {}
  for m, per in stab.items():
    layers = [l for l in routed if l in per] or list(per)
    out[m] = (per[layers[0]]["gamma"], np.mean([per[l]["jaccard"] for l in layers], axis=0),
              float(np.mean([per[l]["resample"] for l in layers])))
  return out


def markdown(report: dict) -> tuple[str, dict]:
  curves = mean_curves(report)
  gammas = next(iter(curves.values()))[0]
  fwd = report["forward_flops_per_token"]
  lines = ["# Routing", "",
           "Mean Jaccard of the top-k sets under input noise (common random numbers), over the routers' "
           "layers; resample: two independent draws on the same input.", "",
           "| method | " + " | ".join(f"γ={g:g}" for g in gammas) + " | resample | extra FLOPs / token |",
           "|---|" + "---:|" * (len(gammas) + 2)]
  for m, (_, j, res) in curves.items():
    f = report["router_flops_per_token"].get(m, 0.0)
    lines.append(f"| {m} | " + " | ".join(f"{x:.3f}" for x in j) + f" | {res:.3f} | {f:,.0f} ({100 * f / fwd:.3f}%) |")
  lines += ["", f"Forward FLOPs per token (sequence 128): {fwd:,.0f}."]
  return "\n".join(lines) + "\n", {m: (g, j) for m, (g, j, _) in curves.items()}
