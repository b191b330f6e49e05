"""Forward-pass throughput on CPU: bmoe_jax's expert paths against transformers, same weights, float32 and bf16.

A random Mixtral model (every layer MoE, top-k renormalised, no shared expert) is built in
transformers, saved with ``save_pretrained`` and converted with ``convert.load_hf_checkpoint``, so
both sides run exactly the same weights. For one batch of random token ids (no padding) it
measures the median wall time of a full forward (logits included) over several repeats, after
warm-up (for JAX: after compilation), and reports tokens/s and the ratio to transformers' float32. Our side
runs ``jax.jit(bmoe_jax.forward)`` with expert_impl "dense", "sorted" (per-expert chunks of 8 down to 1 times
``chunk_rows``, default ``bmoe_jax.nn.expert_rows.default_chunk_rows``; ``--chunks`` sweeps it) and "ragged" (very
slow on CPU: fewer repeats).
transformers runs under ``torch.inference_mode()`` with its default experts implementation
("grouped_mm") and with "eager"; the faster of the two in float32 is the baseline of the ratio. With
``--dtypes float32,bfloat16`` (the default) both sides also run with every weight cast to bfloat16 (ours:
"sorted" at the auto chunk rows; matmuls accumulate in float32, ``nn.layers.mm``). "useful GFLOP/s" counts only the
work a top-k model must do (k experts per token, full attention scores), so it compares against the CPU's
matmul peak. The max abs difference of the logits (float32 rows: to transformers' float32; bfloat16 rows: to
our float32) is printed as a sanity check. Timings are wall clock: run on an otherwise idle machine.

Run (from the repository root):
  .venv/bin/python benchmarks/forward.py            # default size, about 4 minutes on 2 cores
  .venv/bin/python benchmarks/forward.py --quick    # tiny config, ~10 s (smoke test)
Results also go to --out as JSON (default benchmarks/results/forward.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bmoe_jax as B  # noqa: E402
from benchmarks.timing import cpu_description  # noqa: E402
from bmoe_jax.nn.expert_rows import default_chunk_rows  # noqa: E402
from convert import load_hf_checkpoint  # noqa: E402

QUICK = dict(d_model=64, layers=2, experts=4, top_k=2, expert_width=128, heads=4, kv_heads=4,
             head_dim=16, vocab=256, batch=2, seq=16, repeats=3, ragged_repeats=1, chunks="auto")


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--experts", type=int, default=16)
  ap.add_argument("--top-k", type=int, default=2)
  ap.add_argument("--expert-width", type=int, default=1024, help="moe_intermediate_size")
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--ragged-repeats", type=int, default=1, help="0 skips the ragged path")
  ap.add_argument("--chunks", default="auto", help="chunk_rows sweep for 'sorted' (comma separated)")
  ap.add_argument("--dtypes", default="float32,bfloat16", help="float32 first; bfloat16 adds both sides in bf16")
  ap.add_argument("--torch-threads", type=int, default=0, help="0: leave torch's default")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmarks/results/forward.json")
  ap.add_argument("--quick", action="store_true", help="tiny config (overrides the size flags)")
  args = ap.parse_args()
  if args.quick:
    vars(args).update(QUICK)
  return args


def model_flops(a) -> float:
  """Useful FLOPs of one batch: projections, full (unmasked) attention, router, k experts, lm_head."""
  attn = 2 * a.d_model * (a.heads + 2 * a.kv_heads) * a.head_dim + 2 * a.heads * a.head_dim * a.d_model
  attn += 4 * a.seq * a.heads * a.head_dim
  moe = 2 * a.d_model * a.experts + a.top_k * 6 * a.d_model * a.expert_width
  return a.batch * a.seq * (a.layers * (attn + moe) + 2 * a.d_model * a.vocab)


def time_it(fn, repeats: int, warmup: int = 1) -> tuple[float, float, float, object]:
  """(median s, min s, first-call s, last output) of ``fn()``; fn must block until done."""
  t0 = time.perf_counter()
  out = fn()
  first_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    out = fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), first_s, out


def build_torch(args) -> MixtralForCausalLM:
  torch.manual_seed(args.seed)
  hf_cfg = MixtralConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.expert_width,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      head_dim=args.head_dim, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
      max_position_embeddings=max(4096, args.seq))
  return MixtralForCausalLM(hf_cfg).eval()


def time_torch(model, tokens_bs, dtype: str, repeats: int) -> list[dict]:
  """Rows for transformers' default experts implementation and "eager", in ``dtype``."""
  rows = []
  ids = torch.tensor(tokens_bs)
  model.to(getattr(torch, dtype))
  hf_default = model.config._experts_implementation
  for hf_impl in dict.fromkeys([hf_default, "eager"]):
    model.set_experts_implementation(hf_impl)

    def run_torch():
      with torch.inference_mode():
        return model(input_ids=ids).logits
    med, best_s, first, out = time_it(run_torch, repeats, warmup=2)
    rows.append(dict(name=f"transformers ({hf_impl}, {dtype})", impl=f"hf_{hf_impl}", dtype=dtype, chunk_rows=None,
                     median_s=med, min_s=best_s, first_s=first, repeats=repeats, logits=out.float().numpy()))
    print(f"  {rows[-1]['name']}: {med:.3f} s", flush=True)
  model.set_experts_implementation(hf_default)
  model.to(torch.float32)
  return rows


def time_jax(params, cfg, tokens_bs, runs, auto_r: int) -> list[dict]:
  """Rows for ``jax.jit(B.forward)``, one per (expert_impl, chunk_rows, dtype, repeats) of ``runs``."""
  fwd = jax.jit(B.forward, static_argnums=1, static_argnames=("expert_impl", "chunk_rows"))
  tokens_j = jnp.asarray(tokens_bs, jnp.int32)
  rows = []
  for impl, r, dtype, reps in runs:
    p = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)

    def run_jax():
      return fwd(p, cfg, tokens_j, expert_impl=impl, chunk_rows=r).logits.block_until_ready()
    med, best_s, first, out = time_it(run_jax, reps)
    name = (impl if impl != "sorted" else f"sorted r={r or f'auto({auto_r})'}") + f", {dtype}"
    rows.append(dict(name=name, impl=impl, dtype=dtype, chunk_rows=r if r or impl != "sorted" else auto_r,
                     median_s=med, min_s=best_s, first_s=first, repeats=reps, logits=np.asarray(out, np.float32)))
    print(f"  {name}: {med:.3f} s (first call incl. compile {first:.1f} s)", flush=True)
  return rows


def summarise(rows: list[dict], args, n_tok: int) -> tuple[list[str], dict, dict]:
  """Markdown lines; the float32 transformers baseline; our best float32 row. Logit deviations are against
  transformers' float32 default path (float32 rows) and against our float32 sorted path (bfloat16 rows)."""
  f32 = [r for r in rows if r["dtype"] == "float32"]
  ref = f32[0]["logits"]
  ours_f32 = next(r for r in f32 if r["impl"] == "sorted")["logits"]
  base = min((r for r in f32 if r["impl"].startswith("hf_")), key=lambda r: r["median_s"])
  flops = model_flops(args)
  for row in rows:
    against = ref if row["dtype"] == "float32" else ours_f32
    row["max_abs_diff"] = float(np.abs(row.pop("logits") - against).max())
    row["tokens_per_s"] = n_tok / row["median_s"]
    row["gflops_per_s"] = flops / row["median_s"] / 1e9
    row["ratio_vs_transformers"] = base["median_s"] / row["median_s"]
  best = min((r for r in f32 if not r["impl"].startswith("hf_")), key=lambda r: r["median_s"])
  lines = ["| implementation | ms / batch (median) | min ms | tokens/s | useful GFLOP/s | / transformers float32 "
           "| logits max abs diff |", "|---|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    lines.append(f"| {row['name']} | {1e3 * row['median_s']:.1f} | {1e3 * row['min_s']:.1f} | "
                 f"{row['tokens_per_s']:.0f} | {row['gflops_per_s']:.0f} | {row['ratio_vs_transformers']:.2f}x | "
                 f"{row['max_abs_diff']:.1e} |")
  lines.append(f"\nbaseline: {base['name']} (torch threads {torch.get_num_threads()}); best ours in float32: "
               f"{best['name']} at {best['ratio_vs_transformers']:.2f}x (goal >= 1.2x); {flops / 1e9:.3g} useful GFLOP "
               f"per batch; median of {args.repeats} repeats ({args.ragged_repeats} for ragged) after warm-up. "
               "Logit differences: float32 rows against transformers' float32 default path, bfloat16 rows against "
               "our float32 logits (sorted; within 1e-5 of transformers').")
  bf = [r for r in rows if r["dtype"] == "bfloat16"]
  if bf:
    hf_bf = min((r for r in bf if r["impl"].startswith("hf_")), key=lambda r: r["median_s"])
    ours_bf = min((r for r in bf if not r["impl"].startswith("hf_")), key=lambda r: r["median_s"])
    lines.append(f"bfloat16: ours {ours_bf['ratio_vs_transformers']:.2f}x transformers float32 (goal >= 2x), "
                 f"{hf_bf['median_s'] / ours_bf['median_s']:.2f}x transformers bfloat16 (goal > 1x)")
  return lines, base, best


def main():
  args = parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  n_tok = args.batch * args.seq
  model = build_torch(args)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    info, params = load_hf_checkpoint(tmp, progress=False)
  params = jax.tree.map(jnp.asarray, params)
  tokens_bs = np.random.RandomState(args.seed).randint(0, args.vocab, (args.batch, args.seq))
  auto_r = default_chunk_rows(n_tok * args.top_k, args.experts)
  dtypes = args.dtypes.split(",")
  print(f"config: d={args.d_model} layers={args.layers} experts={args.experts} top{args.top_k} "
        f"f={args.expert_width} heads={args.heads}/{args.kv_heads}x{args.head_dim} vocab={args.vocab}; "
        f"batch {args.batch}x{args.seq} = {n_tok} tokens, {dtypes}, CPU: {cpu_description()}")
  print(f"torch {torch.__version__} threads={torch.get_num_threads()}; jax {jax.__version__} "
        f"{jax.devices()[0].platform}; auto chunk_rows={auto_r}", flush=True)
  load = os.getloadavg()[0]
  if load > 0.75 * os.cpu_count():  # a run that just ended leaves ~1 here for a minute
    print(f"WARNING: load average {load:.1f} before the run: other processes may skew the timings")
  chunks = [None if t == "auto" else int(t) for t in args.chunks.split(",")]
  runs = [("dense", None, "float32", args.repeats)] + [("sorted", t, "float32", args.repeats) for t in chunks]
  if args.ragged_repeats > 0:
    runs.append(("ragged", None, "float32", args.ragged_repeats))
  runs += [("sorted", None, dt, args.repeats) for dt in dtypes if dt != "float32"]
  rows = []
  for dt in dtypes:
    rows += time_torch(model, tokens_bs, dt, args.repeats)
  rows += time_jax(params, info.cfg, tokens_bs, runs, auto_r)
  lines, base, best = summarise(rows, args, n_tok)
  print("\n" + "\n".join(lines))
  meta = dict(config={k: v for k, v in vars(args).items() if k != "out"}, tokens_per_batch=n_tok,
              auto_chunk_rows=auto_r, torch_version=torch.__version__, jax_version=jax.__version__,
              torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
              cpu=cpu_description(), baseline=base["name"],
              best_ours=best["name"], useful_gflop_per_batch=model_flops(args) / 1e9, loadavg_before=load)
  out_path = Path(args.out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
  head = f"# Forward throughput, CPU: {cpu_description()}"
  out_path.with_suffix(".md").write_text(head + "\n\n" + "\n".join(lines) + "\n")
  print(f"wrote {out_path} and {out_path.with_suffix('.md')}")


if __name__ == "__main__":
  main()
