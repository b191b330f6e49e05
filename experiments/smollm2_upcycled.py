"""First results on a real LM (issue 6): SmolLM2-135M-Instruct (GGUF Q4_1, 4-bit weights dequantised to
float32), sparse-upcycled to 8 experts top-2 in its top 4 layers, fine-tuned (MAP) on the in-distribution
training set, then every method evaluated in-distribution and under shift.

  .venv/bin/python experiments/smollm2_upcycled.py --suite real --data-dir ../shared/data   # OBQA -> ARC / MMLU
  .venv/bin/python experiments/smollm2_upcycled.py --suite synthetic                       # the demo's suite

It is ``bmoe demo`` (``bmoe_jax.demo.run_demo``) with every method switched on and the sizes below (scaled
to a 2-core CPU: only the MoE layers train and are Bayesian, the 26 layers below run once per example;
seeded subsets of each set). The run directory (checkpoints, factors, posterior) stays under runs/; the
report (results.json / results.md / demo.json / config.json / plots) is copied to
experiments/results/smollm2_<suite>/. No data and no weights are committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from bmoe_jax.demo import DemoConfig, run_demo
from bmoe_jax.pipeline.configs import SUITES as DATA_SUITES

ALL = ("pretrained", "map", "ts", "mc_dropout", "llla", "ensemble", "bmoe", "bmoe_ml", "bmoe_fixed")
SUITES = {
    # lettered options (last-layer Laplace needs one set of class tokens, so it runs here only)
    "real": dict(methods=ALL, max_train=800, max_eval=400, epochs=2, ensemble_members=2),
    # cloze-scored single-word choices
    "synthetic": dict(methods=tuple(m for m in ALL if m != "llla"), max_train=600, max_eval=300, epochs=2,
                      ensemble_members=3),
}


def make_config(suite: str, data_dir: str | None = None, quick: bool = False) -> DemoConfig:
  """The demo's config with this experiment's methods and sizes (``SUITES``) on ``suite``."""
  over = dict(SUITES[suite])
  if quick:
    over.update(max_train=32, max_eval=32, epochs=1, ensemble_members=2)
  base = DemoConfig()
  # as when its results were made: copy-upcycled top 4 layers; lettered (real) / first-token cloze (synthetic)
  base = dataclasses.replace(base, upcycle=dataclasses.replace(base.upcycle, method="copy", moe_layers="top:4"))
  data = dataclasses.replace(base.data, max_train=over["max_train"], max_eval=over["max_eval"],
                             scoring="letters" if suite == "real" else "cloze")
  if suite == "real":
    data = dataclasses.replace(data, data_dir=data_dir)
  else:  # the specs set explicitly, so a $BMOE_DATA_DIR in the environment does not switch suites
    data = dataclasses.replace(data, **{k: DATA_SUITES["synthetic"][k] for k in ("train", "val", "test", "shift")})
  return dataclasses.replace(base, ensemble_members=over["ensemble_members"], data=data,
                             train=dataclasses.replace(base.train, epochs=over["epochs"]),
                             eval=dataclasses.replace(base.eval, methods=over["methods"]))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--suite", choices=sorted(SUITES), default="real")
  ap.add_argument("--data-dir", default=None, help="required for --suite real")
  ap.add_argument("--runs", default="runs/experiments")
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
  args = ap.parse_args(argv)
  if args.suite == "real" and not args.data_dir:
    ap.error("--suite real needs --data-dir (the layout of ../shared/data)")
  cfg = make_config(args.suite, args.data_dir, args.quick)
  run_dir = Path(args.runs) / f"smollm2_{args.suite}"
  run_demo(cfg, run_dir)
  dest = Path(__file__).parent / "results" / f"smollm2_{args.suite}"
  shutil.rmtree(dest, ignore_errors=True)
  (dest / "plots").mkdir(parents=True)
  for name in ("results.json", "results.md", "demo.json", "config.json"):
    shutil.copy(run_dir / name, dest / name)
  for png in (run_dir / "plots").glob("*.png"):
    shutil.copy(png, dest / "plots" / png.name)
  print(f"report copied to {dest}")


if __name__ == "__main__":
  main()
