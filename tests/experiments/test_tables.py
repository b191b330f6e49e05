"""The papers' tables package (experiments/tables) end to end on a tiny model and a few real OBQA / ARC rows:
every cell runs, a rerun skips what is done, the saved probabilities are the methods', and the report's paired
differences and Holm adjustment are the metrics' own."""

import dataclasses
import json

import numpy as np
import pytest

from bmoe_jax import metrics as M
from experiments.tables import cells as C
from experiments.tables import protocol as P
from experiments.tables import report as R
from tests.fixtures import tiny_model_dir

pytestmark = pytest.mark.heavy


def test_cells_and_report(tmp_path_factory, shared_data):
  model = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", shared_data)
  work = tmp_path_factory.mktemp("work")
  ds = P.Dataset("obqa:train", "obqa:dev", "obqa:test", max_train=24, shift=("arc_challenge:test",))
  s = C.Setup(str(model), shared_data, work, data=dataclasses.replace(P.DATA, max_eval=16, batch_size=8,
                                                                       max_length=128),
              train=dataclasses.replace(P.TRAIN, epochs=2, keep_checkpoints=2, lr=1e-3), datasets={"obqa": ds},
              link_choice=("obqa", 0, "long"), progress=False)
  seeds = (0, 1)
  for seed in seeds:
    record = C.finetune_cell(s, "obqa", seed)
    assert len(record["history"]) == 2 and record["steps_per_epoch"] == 3
  link = C.link_cell(s)
  chosen = json.loads((work / "link.json").read_text())
  assert link == min(chosen["dev_nll"], key=chosen["dev_nll"].get) and set(chosen["dev_nll"]) == {"probit_pairwise",
                                                                                                  "probit", "mc"}
  C.evaluate_cell(s, "obqa", 0, "early", link)  # one seed only: the report leaves a regime without every seed out
  for seed in seeds:
    cell = C.evaluate_cell(s, "obqa", seed, "long", link)
  assert cell["fitted"]["bmoe_ts"]["temperature"] == pytest.approx(cell["fitted"]["ts"]["temperature"], rel=1e-5)
  assert set(cell["seconds"]) == set(P.REGISTRY_METHODS) | set(P.BMOE)
  mtime = (work / "obqa" / "seed1" / "long" / "methods" / "map.npz").stat().st_mtime
  assert C.evaluate_cell(s, "obqa", 1, "long", link) == cell  # done: nothing recomputed
  assert (work / "obqa" / "seed1" / "long" / "methods" / "map.npz").stat().st_mtime == mtime
  C.ensemble_cell(s, "obqa", "long", seeds)
  saved = np.load(work / "obqa" / "seed0" / "long" / "methods" / "bmoe_ev_layer.npz")
  assert saved["obqa_test/probs"].shape == (16, 4) and saved["obqa_test/mi"].shape == (16,)
  results = R.build(work, datasets={"obqa": ds}, seeds=seeds, num_samples=50)
  assert set(results) == {("obqa", "long")}
  t = results[("obqa", "long")]
  assert P.ENSEMBLE in t["in"]["rows"] and t["in"]["seeds"] == 2 and t["in"]["n"] == 16
  # a paired difference is the metric's own: seed-mean NLL of bmoe_ts minus seed-mean NLL of TS
  runs = {m: [np.load(work / "obqa" / f"seed{k}" / "long" / "methods" / f"{m}.npz") for k in seeds]
          for m in ("bmoe_ts", "ts")}
  want = np.mean([M.nll(a["obqa_test/probs"], a["obqa_test/labels"]) - M.nll(b["obqa_test/probs"], b["obqa_test/labels"])
                  for a, b in zip(runs["bmoe_ts"], runs["ts"])])
  assert t["in"]["paired"]["bmoe_ts - ts"]["nll"]["diff"] == pytest.approx(want)
  assert "auroc_mi" in t["arc_challenge_test"]["ood"]["mc_dropout"] and "auroc_mi" not in t["arc_challenge_test"]["ood"]["ts"]
  primary = R.holm_primary(results)
  assert len(primary) == 2 * len(P.PRIMARY_METRICS)  # (MAP, TS) x metrics
  np.testing.assert_allclose([r["p_holm"] for r in primary], M.holm([r["p"] for r in primary]))
  flat = R.write(work, work / "report", datasets={"obqa": ds}, seeds=seeds, num_samples=50)
  md = (work / "report" / "results.md").read_text()
  assert f"protocol v{P.VERSION}" in md and "| bmoe_ev_layer |" in md and "Holm" in md and len(flat) == 1
