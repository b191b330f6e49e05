"""The papers' tables on the healed testbed (issue 38), under PROTOCOL.md: every cell, or any single one.

  python -m experiments.tables.run all --model runs/healed --data-dir ../shared/data            # everything
  python -m experiments.tables.run finetune arc_easy --seed 0 --model runs/healed --data-dir ../shared/data
  python -m experiments.tables.run evaluate arc_easy --seed 0 --regime long --model ... --data-dir ...
  python -m experiments.tables.run ablation --model runs/healed --data-dir ../shared/data   # §7
  python -m experiments.tables.run routing obqa --seed 0 --model runs/healed --data-dir ../shared/data   # §8
  python -m experiments.tables.run report

Cells write under --work (default runs/tables) and are skipped when done; the report reads only those files and
writes experiments/results/tables/results.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.tables import ablation as A  # noqa: E402
from experiments.tables import cells as C  # noqa: E402
from experiments.tables import protocol as P  # noqa: E402
from experiments.tables import report as R  # noqa: E402
from experiments.tables import routing as RT  # noqa: E402


def run_all(s: C.Setup, datasets, seeds):
  """Every cell in the protocol's order: fine-tuning, the link (once), evaluation, the deep ensembles."""
  for name in datasets:
    for seed in seeds:
      C.finetune_cell(s, name, seed)
    link = C.link_cell(s)
    for seed in seeds:
      for regime in P.REGIMES:
        C.evaluate_cell(s, name, seed, regime, link)
    for regime in P.REGIMES:
      C.ensemble_cell(s, name, regime, seeds)
    if name == A.WHERE[0]:  # the ablations after their dataset's cells (PROTOCOL.md v1.3)
      A.ablation_cell(s, link)
    if name == RT.WHERE[0]:  # the routing cells after their dataset's cells (v1.4)
      for seed in seeds:
        RT.routing_cell(s, name, seed, RT.WHERE[1], link)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("cell", choices=("all", "finetune", "link", "evaluate", "ensemble", "ablation", "routing",
                                       "report"))
  ap.add_argument("dataset", nargs="?", choices=P.ORDER)
  ap.add_argument("--seed", type=int, choices=P.SEEDS, default=0)
  ap.add_argument("--regime", choices=P.REGIMES, default="long")
  ap.add_argument("--model", default="runs/healed")
  ap.add_argument("--data-dir", default="../shared/data")
  ap.add_argument("--work", default="runs/tables")
  ap.add_argument("--out", default="experiments/results/tables")
  ap.add_argument("--quiet", action="store_true")
  args = ap.parse_args(argv)
  s = C.Setup(args.model, args.data_dir, Path(args.work), progress=not args.quiet)
  if args.cell in ("finetune", "evaluate", "ensemble", "routing") and args.dataset is None:
    ap.error(f"{args.cell} needs a dataset ({', '.join(P.ORDER)})")
  if args.cell == "all":
    run_all(s, [args.dataset] if args.dataset else P.ORDER, P.SEEDS)
  elif args.cell == "finetune":
    C.finetune_cell(s, args.dataset, args.seed)
  elif args.cell == "link":
    print(C.link_cell(s))
  elif args.cell == "evaluate":
    C.evaluate_cell(s, args.dataset, args.seed, args.regime, C.link_cell(s))
  elif args.cell == "ensemble":
    C.ensemble_cell(s, args.dataset, args.regime)
  elif args.cell == "ablation":
    A.ablation_cell(s, C.link_cell(s))
  elif args.cell == "routing":
    RT.routing_cell(s, args.dataset, args.seed, args.regime, C.link_cell(s))
  if args.cell in ("all", "ablation", "report"):
    R.write(Path(args.work), Path(args.out))
    A.report(Path(args.work), Path(args.out))
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
  main()
