"""Per-layer carving diagnosis (issue 15): the relative error ||FFN(x) - MoE(x)||^2 / ||FFN(x)||^2 of one
carved FFN on held-out calibration tokens, for the fitted router, the oracle top-k (largest expert
output norms), random-k, the shared expert alone, the router after 300 Adam steps, and a random
partition of the same neurons. Compares partitions and routers without full-model forwards.

  .venv/bin/python experiments/carve_layer_error.py --data-dir ../shared/data --layers 14,22,28

Prints one line per variant and layer (SmolLM2-135M-Instruct, 4096 NLTK calibration tokens, top-2 of 8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert import carve as C
from convert.sources import fetch_gguf
from convert.upcycle import load_dense


def errors(h_nf, w_down, shared, expert_idx, router, x_nd, held, k=2) -> dict:
  y = h_nf[held] @ w_down
  ys = h_nf[held][:, shared] @ w_down[shared]
  outs = np.stack([h_nf[held][:, i] @ w_down[i] for i in expert_idx], 1)  # [n, e, d]

  def err(sel):
    approx = ys + np.take_along_axis(outs, sel[:, :, None], 1).sum(1)
    return float(np.mean(np.sum((y - approx) ** 2, 1) / np.sum(y ** 2, 1)))

  rand = np.argsort(np.random.default_rng(0).random(outs.shape[:2]), 1)[:, :k]
  return {"router": err(np.argsort(-(x_nd[held] @ router), 1)[:, :k]),
          "oracle": err(np.argsort(-np.linalg.norm(outs, axis=2), 1)[:, :k]), "random": err(rand),
          "shared only": err(np.zeros((len(held), 0), int))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--layers", default="14,22,28")
  ap.add_argument("--calib-tokens", type=int, default=4096)
  args = ap.parse_args(argv)
  layers = tuple(int(l) for l in args.layers.split(","))
  cfg, params, tok, _ = load_dense(fetch_gguf("smollm2"))
  params = jax.tree.map(jnp.asarray, params)
  text = (Path(args.data_dir) / "corpora" / "nltk_english_plain.txt").read_text()[:args.calib_tokens * 24]
  inputs = C.collect_inputs(params, cfg, C.calibration_tokens(tok, text, args.calib_tokens, 256, 0), layers)
  for l in layers:
    mlp, x = params["layers"][l]["mlp"], inputs[l]
    w_down = np.asarray(mlp["w_down"], np.float32)
    h = C.neuron_activations(mlp, x, cfg.hidden_act)
    fit, held = C._split(len(x), l)
    active = C.active_pattern(h, w_down, 0.1)
    order = np.argsort(-active.mean(0), kind="stable")
    shared, rest = order[:256], order[256:]
    partitions = {"co-activation k-means": rest[C.balanced_kmeans(active[:, rest].T.astype(np.float32), 8, seed=0)],
                  "random partition": np.random.default_rng(0).permutation(rest).reshape(8, -1)}
    for name, idx in partitions.items():
      norms = C.expert_norms(h, w_down, idx)
      router = C.fit_router(x[fit], norms[fit])
      print(l, name, {k: round(v, 3) for k, v in errors(h, w_down, shared, idx, router, x, held).items()})
      if name.startswith("co"):
        trained = C.train_router(router, x[fit], norms[fit], 2, 300)
        print(l, name, "router + 300 steps", round(errors(h, w_down, shared, idx, trained, x, held)["router"], 3))


if __name__ == "__main__":
  main()
