"""Bayesian-MoE costs on CPU: factor pass, closed-form predictive, laplace-torch comparison, memory.

Ratios are against reference runs in the same process (same model, same batches):
  1. factor pass (``kfac.update``, jitted) / a plain ``jax.value_and_grad`` of the task loss w.r.t. all
     parameters — goal <= 1.15 (issue 19; exact labels, last token, all layers) — for several FactorSpecs;
  2. closed-form predictive (``jacobian_stats`` + ``logit_covariance`` + probit, C = 4) / MAP forward
     (the answer logits) — goal <= 4 (every layer Bayesian, rank 10);
  3. ours vs laplace-torch 0.3 last-layer K-FAC (``hessian_structure="kron"``, GLM predictive) on the same
     dense MLP (features -> C logits; our side is one "expert" through the same pure functions the MoE
     path uses), fit over a dataset and predictive covariance on a test set — goal: ours faster;
  4. posterior memory per expert and for a whole Qwen1.5-MoE-A2.7B-sized model (f = 1408, d = 2048,
     60 experts x 24 layers): dense GGN block, full Kronecker eigenfactors, low-rank r (computed).

Timings: median wall time over repeats after warm-up (JAX: after compilation). Run on an idle machine:
  .venv/bin/python benchmarks/laplace.py            # default sizes, a few minutes on 2 cores
  .venv/bin/python benchmarks/laplace.py --quick    # tiny sizes, smoke test
Writes --out JSON (default benchmarks/results/laplace.json) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

# This file is named like the laplace-torch package: keep its directory off the import path (the repository
# root goes on it instead, for benchmarks.timing).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import bmoe_jax as B
from benchmarks.timing import cpu_description, median_time as timed
from bmoe_jax.laplace import kfac, posterior as P, predictive as PR
from bmoe_jax.params import read_blocks
from bmoe_jax.task import Batch, Task, probit

QUICK = dict(d_model=32, layers=2, experts=4, expert_width=16, vocab=128, batch=2, seq=8, repeats=2,
             mlp_in=8, mlp_hidden=16, mlp_classes=4, mlp_n=64, mlp_batch=16, mlp_test=32)


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top-k", type=int, default=2)
  ap.add_argument("--expert-width", type=int, default=512)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--rank", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--mlp-in", type=int, default=128)
  ap.add_argument("--mlp-hidden", type=int, default=512)
  ap.add_argument("--mlp-classes", type=int, default=10)
  ap.add_argument("--mlp-n", type=int, default=4096)
  ap.add_argument("--mlp-batch", type=int, default=256)
  ap.add_argument("--mlp-test", type=int, default=1024)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="benchmarks/results/laplace.json")
  args = ap.parse_args()
  if args.quick:
    for k, v in QUICK.items():
      setattr(args, k, v)
  return args


def moe_setup(args):
  """(config, random parameters, one batch, C = 4 answer-token task) of the MoE benchmark model."""
  cfg = B.tiny_config(vocab_size=args.vocab, hidden_size=args.d_model, num_layers=args.layers,
                      num_heads=4, num_kv_heads=4, head_dim=args.d_model // 4,
                      intermediate_size=2 * args.expert_width, moe_intermediate_size=args.expert_width,
                      num_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_layers=(True,) * args.layers, shared_expert_size=0, shared_expert_gate=False)
  params = B.init_params(cfg, jax.random.key(0), std=0.05)
  rng = np.random.RandomState(0)
  batch = Batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (args.batch, args.seq))),
                jnp.ones((args.batch, args.seq), jnp.int32), jnp.full((args.batch,), args.seq - 1),
                jnp.asarray(rng.randint(0, 4, args.batch)))
  return cfg, params, batch, Task(cfg, tuple(range(10, 14)))  # C = 4 answer tokens


def moe_part(args):
  cfg, params, batch, task = moe_setup(args)

  def loss(p):
    f = task.logits(p, batch)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(f), batch.labels_b[:, None], 1))

  vg = jax.jit(jax.value_and_grad(loss))
  t_vg = timed(lambda: vg(params), args.repeats)
  fwd = jax.jit(lambda p: task.logits(p, batch))
  t_fwd = timed(lambda: fwd(params), args.repeats)
  out = {"config": {k: getattr(args, k) for k in ("d_model", "layers", "experts", "top_k", "expert_width",
                                                   "vocab", "batch", "seq", "rank")},
         "value_and_grad_s": t_vg, "forward_s": t_fwd, "factor_pass": [], "predictive": []}
  specs = [("exact", "last", None, "all"), ("exact", "last", args.rank, "all"), ("mc", "last", None, "all"),
           ("empirical", "last", None, "all"), ("exact", "expand", None, "all"),
           ("exact", "expand", args.rank, "all"), ("exact", "reduce", None, "all")]
  if len(cfg.moe_layer_ids) >= 4:  # the paper's cheapest Bayesian set: the top quarter of MoE layers
    specs += [("exact", "last", None, "Q4"), ("exact", "last", args.rank, "Q4")]
  for labels, tokens, rank, which in specs:
    spec = kfac.FactorSpec(layers=kfac.select_layers(cfg, which), labels=labels, tokens=tokens, rank=rank)
    state = kfac.init(cfg, spec)
    step = jax.jit(functools.partial(kfac.update, task=task, spec=spec))
    key = jax.random.key(1)
    t = timed(lambda: step(state, params, batch=batch, key=key), args.repeats)
    row = {"layers": which, "labels": labels, "tokens": tokens, "rank": rank or "full", "seconds": t,
           "ratio_vs_value_and_grad": t / t_vg}
    out["factor_pass"].append(row)
    print(f"factor pass {which:3s} {labels:9s} {tokens:6s} rank={row['rank']!s:5s} {t * 1e3:8.1f} ms  "
          f"ratio {t / t_vg:5.2f} (value_and_grad {t_vg * 1e3:.1f} ms)", flush=True)
    if tokens == "last" and labels == "exact":
      state = step(state, params, batch=batch, key=key)
      factors = kfac.finalize(state)
      # prior mean: the MAP itself (a post-hoc posterior; the predictive does not depend on it)
      post = P.build(factors, read_blocks(params, factors), prior_mean="map", num_sequences=args.batch)
      pred = jax.jit(lambda p, post_: probit(*_closed(p, post_, task, batch)))
      t_p = timed(lambda: pred(params, post), args.repeats)
      out["predictive"].append({"layers": which, "rank": rank or "full", "seconds": t_p,
                                "ratio_vs_forward": t_p / t_fwd})
      print(f"closed-form predictive {which:3s} rank={rank or 'full'!s:5s} {t_p * 1e3:8.1f} ms  "
            f"ratio {t_p / t_fwd:5.2f} (MAP forward {t_fwd * 1e3:.1f} ms)", flush=True)
  return out


def _closed(params, post, task, batch):
  stats = PR.jacobian_stats(params, task, batch, post)
  return stats.f_bc, PR.logit_covariance(stats, post)


def mlp_part(args):
  import torch
  from torch.utils.data import DataLoader, TensorDataset

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from laplace import Laplace
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(args.mlp_in, args.mlp_hidden), torch.nn.Tanh(),
                              torch.nn.Linear(args.mlp_hidden, args.mlp_classes, bias=False))
  x = torch.randn(args.mlp_n, args.mlp_in)
  y = torch.randint(0, args.mlp_classes, (args.mlp_n,))
  x_test = torch.randn(args.mlp_test, args.mlp_in)
  loader = DataLoader(TensorDataset(x, y), batch_size=args.mlp_batch)

  def torch_fit():
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                 prior_precision=1.0)
    la.fit(loader, progress_bar=False)
    return la

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    la = torch_fit()
    t_torch_fit = statistics.median([_wall(torch_fit) for _ in range(args.repeats)])
    t_torch_pred = statistics.median([_wall(lambda: la._glm_predictive_distribution(x_test))
                                      for _ in range(args.repeats)])
  w1 = jnp.asarray(model[0].weight.detach().numpy())
  b1 = jnp.asarray(model[0].bias.detach().numpy())
  w_down = jnp.asarray(model[2].weight.detach().numpy().T)[None]
  xb = jnp.asarray(x.numpy()).reshape(-1, args.mlp_batch, args.mlp_in)
  yb = jnp.asarray(y.numpy()).reshape(-1, args.mlp_batch)

  @jax.jit
  def ours_fit(xb, yb):
    def body(acc, xy):
      phi = jnp.tanh(xy[0] @ w1.T + b1)
      f = phi @ w_down[0]
      ct, w = kfac.label_cotangents(f, xy[1], "exact")
      n = phi.shape[0]
      s = kfac.expert_sums(phi, ct, w, jnp.zeros(n, jnp.int32), jnp.ones(n, bool), 1)
      return jax.tree.map(jnp.add, acc, s), None
    zero = kfac.LayerStats(jnp.zeros((1, args.mlp_hidden, args.mlp_hidden)),
                           jnp.zeros((1, args.mlp_classes, args.mlp_classes)), jnp.zeros((1,), jnp.int32))
    stats, _ = jax.lax.scan(body, zero, (xb, yb))
    a = stats.a_eff / stats.rows_e[:, None, None]
    a_eig, a_vec = jax.vmap(jnp.linalg.eigh)(a)
    g_eig, g_vec = jax.vmap(jnp.linalg.eigh)(stats.g_edd)
    return kfac.Factors(a_eig, a_vec, g_eig, g_vec, stats.rows_e)

  fac = ours_fit(xb, yb)
  t_ours_fit = timed(lambda: ours_fit(xb, yb), args.repeats)
  xt = jnp.asarray(x_test.numpy())

  @jax.jit
  def ours_pred(xt, fac):
    phi = jnp.tanh(xt @ w1.T + b1)
    n = phi.shape[0]
    g = jnp.broadcast_to(jnp.eye(args.mlp_classes)[None, :, None, :], (n, args.mlp_classes, 1, args.mlp_classes))
    jac = PR.project_rows(fac, phi[:, None], g, jnp.zeros((n, 1), jnp.int32), jnp.ones((n, 1), bool))
    return phi @ w_down[0], PR.layer_covariance(fac, jac, 1.0, jnp.ones((1,)))

  _, cov = ours_pred(xt, fac)
  t_ours_pred = timed(lambda: ours_pred(xt, fac), args.repeats)
  ref = la._glm_predictive_distribution(x_test)[1].detach().numpy()
  rel = float(np.abs(np.asarray(cov) - ref).max() / np.abs(ref).max())
  out = {"sizes": {"in": args.mlp_in, "hidden": args.mlp_hidden, "classes": args.mlp_classes, "n": args.mlp_n,
                   "batch": args.mlp_batch, "test": args.mlp_test},
         "fit_s": {"ours": t_ours_fit, "laplace_torch": t_torch_fit, "speedup": t_torch_fit / t_ours_fit},
         "predictive_s": {"ours": t_ours_pred, "laplace_torch": t_torch_pred, "speedup": t_torch_pred / t_ours_pred},
         "f_cov_max_rel_diff": rel}
  print(f"MLP fit: ours {t_ours_fit * 1e3:.1f} ms, laplace-torch {t_torch_fit * 1e3:.1f} ms "
        f"(x{t_torch_fit / t_ours_fit:.1f}); predictive: ours {t_ours_pred * 1e3:.1f} ms, laplace-torch "
        f"{t_torch_pred * 1e3:.1f} ms (x{t_torch_pred / t_ours_pred:.1f}); Sigma_f max rel diff {rel:.1e}", flush=True)
  return out


def _wall(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def memory_part(rank, f=1408, d=2048, experts=60, layers=24):
  per = {"dense_ggn_block": (f * d) ** 2, "full_kron_eigen": f * f + d * d + f + d,
         "lowrank": (f + d) * rank + 2 * rank}
  out = {"f": f, "d": d, "experts": experts, "layers": layers, "rank": rank, "bytes_per_float": 4,
         "per_expert_MiB": {k: v * 4 / 2**20 for k, v in per.items()},
         "model_GiB": {k: v * 4 * experts * layers / 2**30 for k, v in per.items()},
         "down_proj_weights_GiB": f * d * 4 * experts * layers / 2**30}
  for k in per:
    print(f"memory {k:16s}: {out['per_expert_MiB'][k]:12.2f} MiB/expert  {out['model_GiB'][k]:12.2f} GiB/model",
          flush=True)
  return out


def write_markdown(res, path):
  m = res["moe"]
  lines = ["# Bayesian-MoE costs (CPU)", "",
           f"Machine: {res['machine']}. MoE config: {m['config']}.", "",
           f"MAP value_and_grad: {m['value_and_grad_s'] * 1e3:.1f} ms; MAP forward (answer logits): "
           f"{m['forward_s'] * 1e3:.1f} ms.", "",
           "| factor pass | layers | labels | tokens | rank | ms | / value_and_grad (goal <= 1.15) |",
           "|---|---|---|---|---|---|---|"]
  for r in m["factor_pass"]:
    lines.append(f"| | {r['layers']} | {r['labels']} | {r['tokens']} | {r['rank']} | {r['seconds'] * 1e3:.1f} | "
                 f"{r['ratio_vs_value_and_grad']:.2f} |")
  lines += ["", "| closed-form predictive (C=4) | layers | rank | ms | / MAP forward (goal <= 4) |",
            "|---|---|---|---|---|"]
  for r in m["predictive"]:
    lines.append(f"| | {r['layers']} | {r['rank']} | {r['seconds'] * 1e3:.1f} | {r['ratio_vs_forward']:.2f} |")
  if "mlp" in res:
    x = res["mlp"]
    lines += ["", f"Dense MLP vs laplace-torch 0.3 (last-layer K-FAC, GLM): sizes {x['sizes']}; "
              f"Sigma_f max rel diff {x['f_cov_max_rel_diff']:.1e}.", "",
              "| | ours (ms) | laplace-torch (ms) | speed-up |", "|---|---|---|---|",
              f"| fit | {x['fit_s']['ours'] * 1e3:.1f} | {x['fit_s']['laplace_torch'] * 1e3:.1f} | "
              f"{x['fit_s']['speedup']:.1f}x |",
              f"| predictive | {x['predictive_s']['ours'] * 1e3:.1f} | {x['predictive_s']['laplace_torch'] * 1e3:.1f} | "
              f"{x['predictive_s']['speedup']:.1f}x |"]
  mem = res["memory"]
  lines += ["", f"Posterior memory, float32, f={mem['f']}, d={mem['d']}, {mem['experts']} experts x "
            f"{mem['layers']} layers (down_proj weights themselves: {mem['down_proj_weights_GiB']:.2f} GiB):", "",
            "| form | MiB per expert | GiB per model |", "|---|---|---|"]
  for k in mem["per_expert_MiB"]:
    lines.append(f"| {k} | {mem['per_expert_MiB'][k]:.2f} | {mem['model_GiB'][k]:.2f} |")
  Path(path).write_text("\n".join(lines) + "\n")


def main():
  args = parse_args()
  res = {"machine": f"{cpu_description()}, jax {jax.__version__} {jax.default_backend()}",
         "moe": moe_part(args)}
  try:
    res["mlp"] = mlp_part(args)
  except ImportError as err:  # the oracle is a test-only dependency
    print(f"laplace-torch comparison skipped: {err}")
  res["memory"] = memory_part(args.rank)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=2))
  write_markdown(res, out.with_suffix(".md"))
  print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  main()
