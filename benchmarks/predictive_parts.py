"""Where the closed-form predictive's time goes: its stages timed cumulatively, and the experts' backward.

Same model and batch as ``benchmarks/laplace.py`` (random MoE, every layer Bayesian, low-rank factors of rank
``--rank``, C = 4 answer tokens). Each row is one jitted program, timed (median after warm-up) and divided by
the MAP forward of the answer logits measured in the same run:
  * the forward with the taps the predictive records (zero perturbations at every expert output);
  * that forward plus 1 and plus C vector-Jacobian products (``jax.vjp`` w.r.t. the perturbations, C cotangents
    vmapped: the pullbacks ``predictive.jacobian_stats`` runs);
  * ``jacobian_stats`` (adds the per-expert projections of the Jacobian rows, ``predictive.project_rows``);
  * the whole predictive (adds ``logit_covariance`` and the probit).
Then one layer's routed experts alone on the model's own routing, forward against forward + one vjp w.r.t.
their input, for the sorted path (derivatives through the same per-expert chunk loops as its forward,
``nn.expert_rows``) and for the balanced reference (one einsum over experts with n k / e rows each): how much of
the backward is the sorted path's own overhead.

  .venv/bin/python benchmarks/predictive_parts.py            # ~2 minutes on 2 cores
Writes --out JSON (default benchmarks/results/predictive_parts.json) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bmoe_jax as B  # noqa: E402
from benchmarks.forward_parts import balanced_experts, balanced_rows  # noqa: E402
from benchmarks.laplace import moe_setup  # noqa: E402
from benchmarks.timing import cpu_description, median_time, write_results  # noqa: E402
from bmoe_jax.laplace import kfac, posterior as P, predictive as PR  # noqa: E402
from bmoe_jax.model import zero_perturbations  # noqa: E402
from bmoe_jax.nn import layers as L, moe  # noqa: E402
from bmoe_jax.params import read_blocks  # noqa: E402
from bmoe_jax.task import probit  # noqa: E402


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--out", default="benchmarks/results/predictive_parts.json")
  args = ap.parse_args()
  sizes = dict(d_model=256, layers=4, experts=8, top_k=2, expert_width=512, vocab=4096, batch=8, seq=64, rank=10)
  return argparse.Namespace(**vars(args), **sizes)  # laplace.py's MoE defaults, so the two tables agree


def stages(cfg, params, batch, task, post) -> dict:
  """{name: (jitted fn of the parameters)}: the predictive's stages, each including the ones before it."""
  b, s = batch.tokens_bs.shape
  perturb = zero_perturbations(cfg, b, s, blocks=post.factors)

  def vjps(p, n):
    f_bc, pull, taps = jax.vjp(lambda q: task.logits_and_taps(p, batch, q), perturb, has_aux=True)
    cts = jnp.broadcast_to(jnp.eye(f_bc.shape[-1], dtype=f_bc.dtype)[:n, None], (n,) + f_bc.shape)
    return f_bc, jax.vmap(lambda ct: pull(ct)[0])(cts), taps

  def whole(p):
    stats = PR.jacobian_stats(p, task, batch, post)
    return probit(stats.f_bc, PR.logit_covariance(stats, post))

  c = len(task.class_ids)
  return {"MAP forward (answer logits)": jax.jit(lambda p: task.logits(p, batch)),
          "forward with taps": jax.jit(lambda p: task.logits_and_taps(p, batch, perturb)),
          "+ 1 vjp": jax.jit(lambda p: vjps(p, 1)), f"+ {c} vjps (C)": jax.jit(lambda p: vjps(p, c)),
          "+ projections (jacobian_stats)": jax.jit(lambda p: PR.jacobian_stats(p, task, batch, post)),
          "+ covariance and probit (whole predictive)": jax.jit(whole)}


def layer0_routing(cfg, params, batch):
  """(MoE input [n, d], expert ids [n, k], gates [n, k], expert weights) of layer 0 on the model's own routing."""
  tap = B.forward(params, cfg, batch.tokens_bs, return_taps=True).taps[0]
  k = cfg.num_experts_per_tok
  x_nd = tap.router_in_bsd.reshape(-1, cfg.hidden_size)  # the MoE block's normed input
  return (x_nd, tap.expert_bsk.reshape(-1, k), tap.gate_bsk.reshape(-1, k).astype(x_nd.dtype),
          params["layers"][0]["mlp"]["experts"])


def expert_backward(cfg, params, batch) -> dict:
  """{name: (forward fn, forward + vjp fn, args)} for layer 0's routed experts on the model's own routing."""
  x_nd, ek, gk, w = layer0_routing(cfg, params, batch)
  act = L.activation(cfg.hidden_act)
  x_ecd = balanced_rows(x_nd, cfg.num_experts_per_tok, cfg.num_experts)

  def sorted_fn(x):
    return moe.experts_sorted(x, ek, gk, w, cfg.hidden_act)[0]

  def balanced_fn(x):
    return balanced_experts(w, x, act)

  def with_vjp(fn):
    def run(x):
      y, pull = jax.vjp(fn, x)
      return y, pull(jnp.ones_like(y))[0]
    return jax.jit(run)

  return {"sorted path": (jax.jit(sorted_fn), with_vjp(sorted_fn), x_nd),
          "balanced einsum (reference: n k / e rows per expert)": (jax.jit(balanced_fn), with_vjp(balanced_fn), x_ecd)}


def main():
  args = parse_args()
  cfg, params, batch, task = moe_setup(args)
  spec = kfac.FactorSpec(layers=kfac.select_layers(cfg, "all"), labels="exact", tokens="last", rank=args.rank)
  state = kfac.update(kfac.init(cfg, spec), params, batch=batch, key=jax.random.key(1), task=task, spec=spec)
  factors = kfac.finalize(state)
  post = P.build(factors, read_blocks(params, factors), prior_mean="map", num_sequences=args.batch)
  rows = [{"stage": n, "ms": 1e3 * median_time(lambda: fn(params), args.repeats)}
          for n, fn in stages(cfg, params, batch, task, post).items()]
  fwd_ms = rows[0]["ms"]
  experts = [{"path": n, "forward_ms": 1e3 * median_time(lambda: f(x), args.repeats),
              "forward_vjp_ms": 1e3 * median_time(lambda: fv(x), args.repeats)}
             for n, (f, fv, x) in expert_backward(cfg, params, batch).items()]
  lines = ["# Closed-form predictive by stages (float32)", "",
           f"{cpu_description()}; jax {jax.__version__}; model as benchmarks/laplace.py: {args.layers} layers, "
           f"{args.experts} experts top-{args.top_k}, d={args.d_model}, f={args.expert_width}, batch "
           f"{args.batch}x{args.seq}; every layer Bayesian, rank {args.rank}; median of {args.repeats}.", "",
           "| stage (cumulative) | ms | / MAP forward | added ms |", "|---|---:|---:|---:|"]
  prev = 0.0
  for r in rows:
    lines.append(f"| {r['stage']} | {r['ms']:.1f} | {r['ms'] / fwd_ms:.2f} | {r['ms'] - prev:+.1f} |")
    prev = r["ms"] if r is not rows[0] else 0.0
  lines += ["", "Layer 0's routed experts alone (the model's own routing):", "",
            "| path | forward ms | forward + vjp ms | backward / forward |", "|---|---:|---:|---:|"]
  for r in experts:
    bwd = r["forward_vjp_ms"] - r["forward_ms"]
    lines.append(f"| {r['path']} | {r['forward_ms']:.2f} | {r['forward_vjp_ms']:.2f} | {bwd / r['forward_ms']:.2f} |")
  write_results(args.out, {"cpu": cpu_description(), "jax": jax.__version__, "stages": rows, "experts": experts},
                "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
