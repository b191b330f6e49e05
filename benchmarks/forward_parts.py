"""Where the forward's time goes: each part of the forward benchmark's model timed alone, against its matmul work.

Same model as ``benchmarks/forward.py`` (random Mixtral-like config, d=512, 8 layers, 16 experts top-2, width
1024, 8 heads x 64, vocab 8192; batch 8 x 128), built directly in bmoe_jax (no transformers needed). Each part is
jitted alone on the inputs it sees in the model and timed (median after warm-up); a layer's part is multiplied by
the layer count. Next to each part, the useful GFLOP/s it reaches (the matmul work a top-k model must do) and
two references measured in the same run:
  * "balanced experts": the routed experts' matmuls as one batched einsum over experts with exactly n k / e rows
    each (no routing, no gathers: what a perfectly balanced load would cost);
  * "plain matmul": one [n, d] x [d, 2f] float32 dot, the CPU's matmul rate at these sizes.
The sum of the parts is printed against the whole jitted forward (XLA overlaps little across parts on CPU).

  .venv/bin/python benchmarks/forward_parts.py            # ~1 minute on 2 cores
  .venv/bin/python benchmarks/forward_parts.py --dtype bfloat16
Writes --out JSON (default benchmarks/results/forward_parts.json) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bmoe_jax as B  # noqa: E402
from benchmarks.timing import cpu_description, median_time, write_results  # noqa: E402
from bmoe_jax import model as M  # noqa: E402
from bmoe_jax.nn import expert_rows as R, layers as L, moe, rope  # noqa: E402


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default=None, help="default benchmarks/results/forward_parts[_DTYPE].json")
  return ap.parse_args()


def build(dtype, layers: int = 8):
  """(config, parameters cast to ``dtype``, one token batch) of the forward benchmark's model, random init."""
  cfg = B.tiny_config(vocab_size=8192, hidden_size=512, num_layers=layers, num_heads=8, num_kv_heads=8, head_dim=64,
                      moe_intermediate_size=1024, num_experts=16, moe_layers=(True,) * layers, shared_expert_size=0,
                      shared_expert_gate=False, qkv_bias=False, norm_topk_prob=True)
  params = B.init_params(cfg, jax.random.key(0), std=0.02)
  params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
  tokens = jax.random.randint(jax.random.key(1), (8, 128), 0, cfg.vocab_size)
  return cfg, params, tokens


def balanced_rows(x_nd, k: int, e: int):
  """[e, n k / e, d]: every token's k slot rows, dealt to the experts in equal shares (a perfectly balanced load)."""
  n, d = x_nd.shape
  return jnp.broadcast_to(x_nd[:, None], (n, k, d)).reshape(e, n * k // e, d)


def balanced_experts(w: dict, x_ecd, act):
  """The routed experts' matmuls on a balanced load as one batched einsum over experts (no routing, no gathers)."""
  return L.mm("ecf,efd->ecd", act(L.mm("ecd,edf->ecf", x_ecd, w["w_gate"])) * L.mm("ecd,edf->ecf", x_ecd, w["w_up"]),
              w["w_down"])


def parts(cfg, params, tokens):
  """{name: (jitted fn, args, layers it stands for, useful FLOPs per call)} on the model's real intermediate
  inputs (the first layer's)."""
  b, s = tokens.shape
  n, d, f, e, k = b * s, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
  lp, nl = params["layers"][0], cfg.num_layers
  x_bsd = params["embed"]["embedding"][tokens]
  cos, sin = rope.tables(jnp.broadcast_to(jnp.arange(s), (b, s)), *rope.frequencies(cfg))
  mask = L.attention_mask(None, s)
  _, h_bsd = M._attention_half(lp, cfg, x_bsd, cos, sin, mask)
  h_nd = h_bsd.reshape(n, d)
  mp = lp["mlp"]
  r = moe.route(h_nd, mp["router"]["kernel"], k, norm_topk_prob=cfg.norm_topk_prob)
  hd = cfg.num_heads * cfg.head_dim
  attn_flops = 2 * n * d * (hd + 2 * cfg.num_kv_heads * cfg.head_dim) + 2 * n * hd * d + 4 * n * s * hd
  expert_flops = 6 * n * k * d * f
  x_ecd = balanced_rows(h_nd, k, e)
  w = mp["experts"]
  return {
      "attention half (norms, attention, residual)": (
          jax.jit(lambda lp, x: M._attention_half(lp, cfg, x, cos, sin, mask)), (lp, x_bsd), nl, attn_flops),
      "router (logits, top-k, gates)": (
          jax.jit(lambda w, x: moe.route(x, w, k, norm_topk_prob=cfg.norm_topk_prob)),
          (mp["router"]["kernel"], h_nd), nl, 2 * n * d * e),
      "routed experts (sorted path)": (
          jax.jit(lambda w, x, ek, gk: moe.experts_sorted(x, ek, gk, w, cfg.hidden_act)[0]),
          (w, h_nd, r.expert_nk, r.gate_nk.astype(h_nd.dtype)), nl, expert_flops),
      "final norm + LM head": (
          jax.jit(lambda p, x: M._head(p, cfg, L.rms_norm(x, p["final_norm"]["scale"], cfg.rms_norm_eps), None)),
          (params, h_bsd), 1, 2 * n * d * cfg.vocab_size),
      "reference: balanced experts (einsum, n k / e rows each)": (
          jax.jit(lambda w, x: balanced_experts(w, x, L.activation(cfg.hidden_act))), (w, x_ecd), nl, expert_flops),
      "reference: plain matmul [n, d] x [d, 2f]": (
          jax.jit(L.dot), (h_nd, jnp.concatenate([w["w_gate"][0], w["w_up"][0]], axis=1)), 0, 4 * n * d * f),
  }


def load_stats(cfg, params, tokens) -> list[str]:
  """Per MoE layer: the smallest and largest expert load against the mean, and the rows the sorted path computes
  (each load rounded up to chunk rows; ``nn.expert_rows``) in how many chunks: its forward and its derivatives
  alike (the model's own routing of this batch)."""
  taps = B.forward(params, cfg, tokens, return_taps=True).taps
  lines = []
  for i, tap in sorted(taps.items()):
    ek = tap.expert_bsk.reshape(-1, cfg.num_experts_per_tok)
    loads = jnp.bincount(ek.reshape(-1), length=cfg.num_experts)
    cap, r = ek.size // cfg.num_experts, R.default_chunk_rows(ek.size, cfg.num_experts)
    units = -(-loads // r)
    top = 1 << (R.CHUNK_CLASSES - 1)
    chunks = int(sum(jnp.sum(R.chunk_counts(units, c)) for c in range(R.CHUNK_CLASSES)))
    lines.append(f"layer {i}: loads {int(loads.min())}-{int(loads.max())} (mean {cap}); "
                 f"{int(jnp.sum(units)) * r} rows for {ek.size} slots in {chunks} chunks of {r}-{top * r} rows")
  return lines


def main():
  args = parse_args()
  cfg, params, tokens = build(args.dtype)
  fwd = jax.jit(lambda p, t: B.forward(p, cfg, t).logits)
  total_s = median_time(lambda: fwd(params, tokens), args.repeats)
  rows, summed = [], 0.0
  for name, (fn, fargs, times, flops) in parts(cfg, params, tokens).items():
    sec = median_time(lambda: fn(*fargs), args.repeats)
    per_fwd = sec * times
    summed += 0.0 if name.startswith("reference") else per_fwd
    rows.append(dict(part=name, ms_per_call=1e3 * sec, calls_per_forward=times, ms_per_forward=1e3 * per_fwd,
                     useful_gflop_per_s=flops / sec / 1e9))
  lines = [f"# Forward by parts ({args.dtype}, bmoe_jax.xla_cpu: {B.xla_cpu.STATUS}, {B.xla_cpu.FLAG})", "",
           f"Whole jitted forward: {1e3 * total_s:.1f} ms; sum of the parts: {1e3 * summed:.1f} ms "
           f"(median of {args.repeats}; {cpu_description()}).", "",
           "| part | ms / call | calls / forward | ms / forward | share | useful GFLOP/s |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    share = "" if r["part"].startswith("reference") else f"{r['ms_per_forward'] / (1e3 * summed):.0%}"
    lines.append(f"| {r['part']} | {r['ms_per_call']:.2f} | {r['calls_per_forward']} | {r['ms_per_forward']:.1f} "
                 f"| {share} | {r['useful_gflop_per_s']:.0f} |")
  lines += ["", "Expert loads of this batch and the rows the sorted path computes:", ""]
  lines += [f"- {x}" for x in load_stats(cfg, params, tokens)]
  out = args.out or f"benchmarks/results/forward_parts{'' if args.dtype == 'float32' else '_' + args.dtype}.json"
  write_results(out, dict(dtype=args.dtype, forward_ms=1e3 * total_s, parts_ms=1e3 * summed, rows=rows,
                          xla_cpu=B.xla_cpu.STATUS), "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
