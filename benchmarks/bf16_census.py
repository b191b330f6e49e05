"""Where a bfloat16 forward's time goes on XLA:CPU: op census of the compiled program, float32 vs bfloat16.

One MoE layer of the forward benchmark's model (d=512, 16 experts top-2, width 1024, 8 heads x 64, vocab 8192;
batch 8 x 128) is compiled with every weight in float32 and in bfloat16. For each it prints the median time of
the jitted forward, how many HLO instructions of each kind the optimised program holds, and how many of its dots
multiply bfloat16 operands ("bf16 dots") rather than operands XLA upcast to float32 ("f32 dots"; a ``convert``
of each operand, often of a whole expert weight, precedes them). XLA:CPU (jaxlib 0.10.2) keeps a bf16 dot only
when YNNPACK takes it, which ``bmoe_jax.xla_cpu`` allows only under ``BMOE_XLA_WORKAROUND=dots`` (by default every
bf16 dot is upcast); even then YNNPACK takes no dot whose operand is a slice of another array, such as the chunk
loops' expert weights (XLA then converts whole expert weights to float32 ahead of the loop).

  .venv/bin/python benchmarks/bf16_census.py                              # ~30 s on 2 cores
  BMOE_XLA_WORKAROUND=dots .venv/bin/python benchmarks/bf16_census.py     # with YNNPACK's dots
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
from benchmarks.forward_parts import build  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402

KINDS = ("convert", "dot", "fusion", "copy", "gather", "scatter")


def census(hlo_text: str) -> dict[str, int]:
  ops = collections.Counter(re.findall(r"= [\w\[\]{},:\d ]*?\s(\w[\w-]*)\(", hlo_text))
  return {k: ops.get(k, 0) for k in KINDS}


def dot_operand_dtypes(hlo_text: str) -> collections.Counter:
  """How many dots take operands of each dtype (instruction names are unique in an HLO module)."""
  dtype_of = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo_text))
  dots = re.findall(r"= \w+\[[^\]]*\]\S* dot\(%([\w.-]+), %([\w.-]+)\)", hlo_text)
  return collections.Counter("+".join(sorted({dtype_of.get(a, "?"), dtype_of.get(b, "?")})) for a, b in dots)


def main():
  cfg = build("float32", layers=1)[0]
  fwd = jax.jit(lambda p, t: B.forward(p, cfg, t).logits)
  print(f"bmoe_jax.xla_cpu: {B.xla_cpu.STATUS} ({B.xla_cpu.FLAG})")
  print("| weights | ms (median of 7) | " + " | ".join(KINDS) + " | bf16 dots | f32 dots |")
  print("|---|---:|" + "---:|" * (len(KINDS) + 2))
  for dtype in (jnp.float32, jnp.bfloat16):
    _, p, tokens = build(dtype, layers=1)
    text = fwd.lower(p, tokens).compile().as_text()
    ops, dots = census(text), dot_operand_dtypes(text)
    seconds = median_time(lambda: fwd(p, tokens), 7)
    print(f"| {jnp.dtype(dtype).name} | {1e3 * seconds:.1f} | " + " | ".join(str(ops[k]) for k in KINDS)
          + f" | {dots.get('bf16', 0)} | {dots.get('f32', 0)} |")


if __name__ == "__main__":
  main()
