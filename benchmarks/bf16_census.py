"""Where a bfloat16 forward's time goes on XLA:CPU: op census of the compiled program, float32 vs bfloat16.

One MoE layer of the forward benchmark's model (d=512, 16 experts top-2, width 1024, 8 heads x 64, vocab 8192;
batch 8 x 128) is compiled with every weight in float32 and in bfloat16. For each it prints the median time of
the jitted forward and how many HLO instructions of each kind the optimised program holds (``convert`` counts
the dtype casts XLA:CPU inserts around bf16 elementwise work, which it computes in float32).

  .venv/bin/python benchmarks/bf16_census.py        # ~30 s on 2 cores
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bmoe_jax as B  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402

KINDS = ("convert", "dot", "fusion", "copy", "gather", "scatter")


def census(hlo_text: str) -> dict[str, int]:
  ops = collections.Counter(re.findall(r"= [\w\[\]{},:\d ]*?\s(\w[\w-]*)\(", hlo_text))
  return {k: ops.get(k, 0) for k in KINDS}


def main():
  cfg = B.tiny_config(vocab_size=8192, hidden_size=512, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=64,
                      moe_intermediate_size=1024, num_experts=16, moe_layers=(True,), shared_expert_size=0,
                      shared_expert_gate=False, qkv_bias=False, norm_topk_prob=True)
  params = B.init_params(cfg, jax.random.key(0), std=0.02)
  tokens = jax.random.randint(jax.random.key(1), (8, 128), 0, cfg.vocab_size)
  fwd = jax.jit(lambda p, t: B.forward(p, cfg, t).logits)
  print("| weights | ms (median of 7) | " + " | ".join(KINDS) + " |")
  print("|---|---:|" + "---:|" * len(KINDS))
  for dtype in (jnp.float32, jnp.bfloat16):
    p = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    ops = census(fwd.lower(p, tokens).compile().as_text())
    seconds = median_time(lambda: fwd(p, tokens), 7)
    print(f"| {jnp.dtype(dtype).name} | {1e3 * seconds:.1f} | "
          + " | ".join(str(ops[k]) for k in KINDS) + " |")


if __name__ == "__main__":
  main()
