"""Scale plan, checked by the compiler: does the whole pipeline fit one 141 GB accelerator at
Qwen1.5-MoE-A2.7B size, and on which mesh if not?

For the hub config of Qwen1.5-MoE-A2.7B (14.3 B parameters, 24 MoE layers x 60 experts) with bfloat16 weights,
each program of the pipeline is compiled ahead of time from abstract inputs (no weights are allocated) on one
device and on ``expert=4`` / ``data=2,expert=4`` meshes of virtual CPU devices, at batch B x S tokens:

* ``forward``: vocabulary logits of the batch;
* ``map_step``: one AdamW step of the routed experts and routers (float32 moments, bf16 weights);
* ``factor_update``: one batch of the K-FAC factor pass over every MoE layer (full and rank-r factors, float32);
* ``predictive``: the closed-form Bayesian-MoE predictive with every MoE layer Bayesian (rank r, C = 4).

XLA's memory analysis per program and device: arguments, outputs, temporaries, and the peak (arguments +
outputs + temporaries - aliased). Memory analysis is the compiler's static buffer assignment for the CPU
backend, a proxy for an accelerator's (the fused kernels differ; the arrays the program must hold do not).
One CPU artefact matters: XLA:CPU computes bfloat16 dots in float32 and materialises float32 copies of the bf16
weights as temporaries (a 2-layer forward: 5.40 GiB of temporaries in bf16, 0.03 GiB in float32). Each program is
therefore compiled with float32 weights as well, and the bf16 accelerator estimate is the bf16 arguments and
outputs plus the float32 compile's temporaries (activations in float32: an upper bound for bf16 activations).

  .venv/bin/python benchmarks/scale_plan.py                 # ~20 minutes on 2 cores
  .venv/bin/python benchmarks/scale_plan.py --quick         # a 2-layer model of the same widths (smoke test)
Writes --out JSON (default benchmarks/results/scale_plan.json) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bmoe_jax as B  # noqa: E402
from benchmarks.sharding import qwen_a27b  # noqa: E402
from benchmarks.timing import write_results  # noqa: E402
from bmoe_jax import sharded as SH  # noqa: E402
from bmoe_jax import sharding as S  # noqa: E402
from bmoe_jax import train as T  # noqa: E402
from bmoe_jax.laplace import kfac  # noqa: E402
from bmoe_jax.laplace import posterior as PO  # noqa: E402
from bmoe_jax.params import read_blocks  # noqa: E402
from bmoe_jax.task import Batch, Task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MESHES = ("data=1", "expert=4", "data=2,expert=4")
GIB = 1024 ** 3
ACCELERATOR_GIB = 141e9 / GIB  # an H200's 141 GB (131.3 GiB)


def _like(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: getattr(m, f"{k}_size_in_bytes") / GIB for k in ("argument", "output", "temp", "alias")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _posterior_like(state_like, params_like):
  """The abstract posterior of a finished factor pass (shapes only)."""
  def build(st, p):
    factors = kfac.finalize(st)
    return PO.build(factors, read_blocks(p, list(factors)), prior_mean="map", num_sequences=1)
  return jax.eval_shape(build, state_like, params_like)


def _programs(cfg, mesh, b: int, s: int, rank: int, dtype):
  """(name, jitted-on-mesh function, abstract arguments) of every program."""
  task = Task(cfg, (3, 7, 11, 19))
  batch = Batch(_like((b, s), jnp.int32), _like((b, s), jnp.int32), _like((b,), jnp.int32), _like((b,), jnp.int32))
  params = B.abstract_params(cfg, dtype)
  out = [("forward", SH.forward(task, mesh, batch), (params, batch))]
  tc = T.TrainConfig(trainable="experts_router", lr=1e-4)
  step, init, _ = SH.train_step(task, mesh, params, batch, tc, total_steps=100, dataset_size=1000)
  mask = T.trainable_mask(params, cfg, tc.trainable, tc.layers)
  train, frozen = T.split(params, mask)
  out.append(("map_step", step, (train, jax.eval_shape(init, train), batch, frozen, train)))
  key = jax.eval_shape(lambda: jax.random.key(0))
  for label, spec in (("factor_update_full", kfac.FactorSpec(layers=cfg.moe_layer_ids)),
                      (f"factor_update_rank{rank}", kfac.FactorSpec(layers=cfg.moe_layer_ids, rank=rank))):
    update, zero = SH.factor_update(task, mesh, batch, spec)
    out.append((label, update, (jax.eval_shape(zero), params, batch, key)))
  low = kfac.FactorSpec(layers=cfg.moe_layer_ids, rank=rank)
  post = _posterior_like(jax.eval_shape(lambda: kfac.init(cfg, low)), params)
  out.append((f"predictive_rank{rank}", SH.predictive(task, mesh, post, batch), (params, post, batch)))
  return out


def plan(cfg, args) -> list[dict]:
  """One row per mesh and program: the bf16 compile, the float32 compile, and the bf16 estimate."""
  rows = []
  for text in MESHES:
    n = int(np.prod(list(S.parse_mesh(text).values())))
    mesh = S.make_mesh(text, devices=jax.devices()[:n])
    per_dtype = {}
    for dtype in (jnp.bfloat16, jnp.float32):
      for name, fn, fn_args in _programs(cfg, mesh, args.batch, args.seq, args.rank, dtype):
        t0 = time.perf_counter()
        compiled = fn.lower(*fn_args).compile()
        per_dtype.setdefault(name, {})[jnp.dtype(dtype).name] = dict(
            _memory(compiled), compile_s=round(time.perf_counter() - t0, 1))
    for name, mem in per_dtype.items():
      bf, f32 = mem["bfloat16"], mem["float32"]
      estimate = bf["argument"] + bf["output"] + f32["temp"] - bf["alias"]
      rows.append({"mesh": text, "devices": n, "program": name, "bf16_cpu": bf, "f32_cpu": f32,
                   "bf16_estimate": estimate, "fits": estimate <= ACCELERATOR_GIB})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def markdown(res) -> str:
  lines = ["# Scale plan (ahead-of-time compiled, no weights)", "",
           f"{res['model']}, batch {res['batch']} x {res['seq']} tokens, rank {res['rank']}; GiB per device from XLA's "
           f"memory analysis ({res['platform']}, jax {res['jax']}). bf16 estimate = the bf16 compile's arguments and "
           "outputs + the float32 compile's temporaries (XLA:CPU upcasts bf16 dots, so its bf16 temporaries hold "
           f"float32 weight copies; see the script's docstring); fits = estimate <= {ACCELERATOR_GIB:.1f} GiB "
           "(141 GB)." + (f" Code: {res['code']}." if "code" in res else ""), "",
           "| mesh | program | bf16 arguments | bf16 outputs | f32 temporaries | bf16 estimate | fits | "
           "bf16 CPU peak | f32 CPU peak |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
  for r in res["rows"]:
    bf, f32 = r["bf16_cpu"], r["f32_cpu"]
    lines.append(f"| {r['mesh']} | {r['program']} | {bf['argument']:.2f} | {bf['output']:.2f} | {f32['temp']:.2f} | "
                 f"{r['bf16_estimate']:.2f} | {'yes' if r['fits'] else 'no'} | {bf['peak']:.2f} | {f32['peak']:.2f} |")
  return "\n".join(lines) + "\n"


def _commit() -> str:
  """The repository's HEAD commit (and "+ local changes" when the library differs from it), or "unknown"."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "bmoe_jax"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + (" + local changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="2 layers of the same widths (smoke test)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--rank", type=int, default=10)
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_plan.json"))
  ap.add_argument("--table-only", action="store_true", help="rewrite the table (and fits) of an existing --out JSON")
  args = ap.parse_args()
  if args.table_only:
    res = json.loads(Path(args.out).read_text())
    for row in res["rows"]:
      row["fits"] = row["bf16_estimate"] <= ACCELERATOR_GIB
    write_results(args.out, res, markdown(res))
    return
  if jax.device_count() < 8:
    sys.exit(f"needs 8 devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}); run in a fresh process")
  cfg = qwen_a27b()
  if args.quick:
    cfg = cfg.replace(num_layers=2, moe_layers=(True, True), attn_windows=None)
  res = {"platform": platform.platform(), "jax": jax.__version__, "code": _commit(), "batch": args.batch,
         "seq": args.seq, "rank": args.rank,
         "model": f"Qwen1.5-MoE-A2.7B{' (2 layers)' if args.quick else ''}: "
                  f"{B.count_params(cfg)['total'] / 1e9:.2f} B parameters, {len(cfg.moe_layer_ids)} MoE layers x "
                  f"{cfg.num_experts} experts", "rows": plan(cfg, args)}
  write_results(args.out, res, markdown(res))


if __name__ == "__main__":
  main()
