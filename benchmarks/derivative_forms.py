"""The sorted expert path's derivatives, old form against new: one layer's routed experts in one process.

Old: commit 8b55504's ``bmoe_jax/nn/moe.py`` (read with ``git show``), whose derivatives went through a
fixed-shape form (capacity block of n k / e rows per expert, then a ``lax.scan`` over every worst-case overflow
tile). New: the current ``nn.moe.experts_sorted``, whose tangent map and transpose are load-following chunk loops
(``nn.expert_rows``). Same layer, same routing (layer 0 of the model's own forward), same weights. Programs: the
forward, forward + one vjp w.r.t. the input, forward + 4 vmapped vjps (the predictive's and K-FAC's pullbacks),
and the gradient of a squared output w.r.t. the expert weights (the MAP step). Every program is timed ``--repeats``
times, both forms interleaved in random order (median reported).

  .venv/bin/python benchmarks/derivative_forms.py          # benchmarks/laplace.py's model, ~1 minute
  .venv/bin/python benchmarks/derivative_forms.py --big    # benchmarks/forward.py's sizes, ~3 minutes
Writes benchmarks/results/derivative_forms[_big].{json,md}. Needs git and the repository's history.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.laplace import moe_setup  # noqa: E402
from benchmarks.predictive_parts import layer0_routing  # noqa: E402
from benchmarks.timing import cpu_description, write_results  # noqa: E402
from bmoe_jax.nn import moe  # noqa: E402

OLD_COMMIT = "8b55504"


def old_moe():
  """The module ``bmoe_jax/nn/moe.py`` as it was at ``OLD_COMMIT``."""
  text = subprocess.run(["git", "show", f"{OLD_COMMIT}:bmoe_jax/nn/moe.py"], cwd=ROOT, check=True,
                        capture_output=True, text=True).stdout
  path = Path(tempfile.mkdtemp()) / "moe_8b55504.py"
  path.write_text(text)
  spec = importlib.util.spec_from_file_location("moe_8b55504", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def programs(fn, w) -> dict:
  """{name: jitted fn of x}: the four programs of one expert path ``fn(x, w)``."""
  def vjps(x, c):
    y, pull = jax.vjp(lambda x: fn(x, w), x)
    return jax.vmap(lambda ct: pull(ct)[0])(jnp.stack([jnp.ones_like(y) * (i + 1) for i in range(c)]))

  return {"forward": jax.jit(lambda x: fn(x, w)), "forward + vjp w.r.t. the input": jax.jit(lambda x: vjps(x, 1)),
          "forward + 4 vmapped vjps": jax.jit(lambda x: vjps(x, 4)),
          "gradient w.r.t. the expert weights": jax.jit(lambda x: jax.grad(lambda w: jnp.sum(fn(x, w) ** 2))(w))}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--big", action="store_true", help="d=512, 16 experts, f=1024, batch 8x128")
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()
  sizes = dict(d_model=256, layers=4, experts=8, top_k=2, expert_width=512, vocab=4096, batch=8, seq=64)
  if args.big:
    sizes.update(d_model=512, experts=16, expert_width=1024, seq=128)
  cfg, params, batch, _ = moe_setup(argparse.Namespace(**sizes))
  x, ek, gk, w = layer0_routing(cfg, params, batch)
  k = cfg.num_experts_per_tok
  forms = {"old": old_moe().experts_sorted, "new": moe.experts_sorted}
  progs = {f: programs(lambda x, w, f=f: forms[f](x, ek, gk, w, cfg.hidden_act)[0], w) for f in forms}
  times = {(f, p): [] for f in progs for p in progs[f]}
  for f, p in times:
    jax.block_until_ready(progs[f][p](x))  # compile
  rng = np.random.default_rng(0)
  for _ in range(args.repeats):
    for i in rng.permutation(len(times)):
      f, p = list(times)[i]
      t0 = time.perf_counter()
      jax.block_until_ready(progs[f][p](x))
      times[f, p].append(time.perf_counter() - t0)
  rows = [{"program": p, "old_ms": 1e3 * float(np.median(times["old", p])),
           "new_ms": 1e3 * float(np.median(times["new", p]))} for p in progs["new"]]
  loads = jnp.bincount(ek.reshape(-1), length=cfg.num_experts)
  lines = ["# The sorted path's derivatives: old form against new", "",
           f"{cpu_description()}; jax {jax.__version__}; layer 0's routed experts, d={sizes['d_model']}, "
           f"{sizes['experts']} experts top-{k}, f={sizes['expert_width']}, {x.shape[0]} tokens (loads "
           f"{int(loads.min())}-{int(loads.max())}); old = {OLD_COMMIT}'s nn/moe.py; median of {args.repeats}, "
           "interleaved.", "", "| program | old ms | new ms | new / old |", "|---|---:|---:|---:|"]
  lines += [f"| {r['program']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['new_ms'] / r['old_ms']:.2f} |"
            for r in rows]
  out = f"benchmarks/results/derivative_forms{'_big' if args.big else ''}.json"
  write_results(out, {"cpu": cpu_description(), "sizes": sizes, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
