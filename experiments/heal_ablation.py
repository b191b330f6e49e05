"""Healing's design choices measured at equal steps (issue 37): the shared expert's width (256, 128 or 0 of
SmolLM2's 1536 FFN neurons; the rest split over the 8 routed experts) and whether a layer-wise phase should
come before the end-to-end one (that arm is not run by default: ``phases.md`` measured it; ``--arms`` adds it).

  .venv/bin/python experiments/heal_ablation.py --data-dir ../shared/data

Every arm carves SmolLM2-135M's top 8 layers with the defaults of ``UpcycleConfig`` except its overrides,
then heals it on the same 65536 training tokens (the teacher's cache is shared) with the same number of
steps (64 of 2048 tokens), validating every 16 steps on the same held-out corpus windows. Per arm, on
seeded 256-token windows of WikiText-2 valid: perplexity, KL(own top-k || random-k) (does routing matter?),
and per-layer means of load evenness, the shared expert's energy share and the Jaccard of two draws of the
temperature-sampling router (``experiments/heal_smollm2.py`` defines each). Each arm's result is saved as
OUT/arms/<arm>.json and reused on a rerun (``--rerun`` recomputes); writes OUT/ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmoe_jax.routing import RouterConfig  # noqa: E402
from convert.sources import fetch_gguf  # noqa: E402
from convert.upcycle import UpcycleConfig, build_moe, load_dense  # noqa: E402
from experiments.carve_smollm2 import lm_stats, text_windows  # noqa: E402
from experiments.heal_smollm2 import random_routers, routing_stats  # noqa: E402

BASE = {"method": "carve", "heal_tokens": 65536, "heal_epochs": 2, "heal_eval_every": 16}
ARMS = {
    "shared 256, end-to-end": {},
    "shared 128, end-to-end": {"shared_neurons": 128},
    "shared 0, end-to-end": {"shared_neurons": 0},
    "shared 256, layer-wise then end-to-end": {"heal_layerwise_epochs": 1, "heal_epochs": 1},
}
DEFAULT_ARMS = list(ARMS)[:3]  # the layer-wise arm was measured before (phases.md); --arms adds it


def run_arm(dense, tok, overrides: dict, windows: np.ndarray, data_dir: str, seed: int) -> dict:
  cfg, params = dense
  uc = UpcycleConfig(**{**BASE, **overrides, "seed": seed})
  t0 = time.time()
  m_cfg, m_params, report = build_moe(cfg, params, tok, uc, data_dir=data_dir)
  seconds = time.time() - t0
  m_params = jax.tree.map(jnp.asarray, m_params)
  variants = {"dense": {"cfg": cfg, "params": jax.tree.map(jnp.asarray, params)},
              "moe": {"cfg": m_cfg, "params": m_params, "ref": "dense"},
              "random-k": {"cfg": m_cfg, "params": random_routers(m_cfg, m_params, seed + 1), "ref": "moe"}}
  lm = lm_stats(variants, windows)
  layers = routing_stats(m_cfg, m_params, windows, RouterConfig().sample_temperature, seed)
  mean = lambda key: float(np.mean([v[key] for v in layers.values()]))
  heal = report["heal"]
  return {"overrides": overrides, "seconds_carve_and_heal": round(seconds, 1),
          "heal_seconds": heal["history"][-1]["seconds"], "history": heal["history"],
          "dense_valid_ppl": heal["dense_valid_ppl"],
          "routed_share_of_ffn_params": (cfg.intermediate_size - uc.shared_neurons) / cfg.intermediate_size,
          "wikitext_ppl": lm["moe"]["ppl"], "wikitext_ppl_dense": lm["dense"]["ppl"],
          "kl_to_dense": lm["moe"]["kl_to_ref"], "kl_own_vs_random": lm["random-k"]["kl_to_ref"],
          "load_evenness": mean("load_evenness"), "shared_share": mean("shared_share"),
          "jaccard_two_draws": mean("jaccard_two_draws"), "layers": layers}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--out", default="experiments/results/heal_smollm2")
  ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="a subset of: " + "; ".join(ARMS))
  ap.add_argument("--ppl-tokens", type=int, default=8192, help="WikiText-2 valid tokens per arm")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--rerun", action="store_true", help="recompute arms whose result is saved")
  args = ap.parse_args(argv)
  out = Path(args.out)
  (out / "arms").mkdir(parents=True, exist_ok=True)
  cfg, params, tok, _ = load_dense(fetch_gguf("smollm2"))
  windows = text_windows(tok, Path(args.data_dir) / "corpora" / "wikitext2_tokenized" / "valid.txt",
                         args.ppl_tokens, 256, args.seed)
  res = {}
  for name in args.arms:
    path = out / "arms" / (name.replace(" ", "_").replace(",", "") + ".json")
    if args.rerun or not path.exists():
      path.write_text(json.dumps(run_arm((cfg, params), tok, ARMS[name], windows, args.data_dir, args.seed),
                                 indent=1, default=float))
    res[name] = json.loads(path.read_text())
  write(out, res, args)


def write(out: Path, res: dict, args):
  (out / "ablation.json").write_text(json.dumps({"args": vars(args), "base": BASE, "arms": res}, indent=1,
                                                default=float))
  dense = next(iter(res.values()))["wikitext_ppl_dense"]
  lines = [f"## Healing ablation at equal steps ({BASE['heal_tokens']} tokens, {BASE['heal_epochs']} passes of "
           "2048-token steps; shared 256 and end-to-end only are the defaults)", "",
           f"Perplexity on the held-out corpus windows (dense model "
           f"{next(iter(res.values()))['dense_valid_ppl']:.2f}; step 0 is the carve in softmax form) and on "
           f"WikiText-2 valid ({args.ppl_tokens} tokens; dense model {dense:.2f}).", "",
           "| arm | routed share of FFN params | held-out ppl start → end | held-out KL end | WikiText-2 ppl "
           "| KL own vs random-k | shared energy share | load evenness | Jaccard two draws | heal s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in res.items():
    h0, h1 = r["history"][0], r["history"][-1]
    lines.append(f"| {name} | {r['routed_share_of_ffn_params']:.2f} | {h0['valid_ppl']:.1f} → {h1['valid_ppl']:.1f} "
                 f"| {h1['valid_kl']:.3f} | {r['wikitext_ppl']:.2f} | {r['kl_own_vs_random']:.3f} "
                 f"| {r['shared_share']:.2f} | {r['load_evenness']:.2f} | {r['jaccard_two_draws']:.2f} "
                 f"| {r['heal_seconds']:.0f} |")
  argv = " ".join(f'"{a}"' for a in args.arms)
  lines += ["", f"Made by `python experiments/heal_ablation.py --data-dir {args.data_dir} --arms {argv}` on 2 CPU "
            "cores. `heal s` is wall time, and in the committed run other jobs shared the cores (phases.md has "
            "uncontended timings: 272 s for the default arm)."]
  (out / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
