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


SEEDS = (0, 1)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, shared_data):
  """A tiny model's fine-tuning cells on a few OBQA rows (ARC-C test as the shift set), both seeds."""
  model = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", shared_data)
  work = tmp_path_factory.mktemp("work")
  ds = P.Dataset("obqa:train", "obqa:dev", "obqa:test", max_train=24, shift=("arc_challenge:test",))
  s = C.Setup(str(model), shared_data, work, data=dataclasses.replace(P.DATA, max_eval=16, batch_size=8,
                                                                       max_length=128),
              train=dataclasses.replace(P.TRAIN, epochs=2, keep_checkpoints=2, lr=1e-3), datasets={"obqa": ds},
              link_choice=("obqa", 0, "long"), progress=False)
  records = [C.finetune_cell(s, "obqa", seed) for seed in SEEDS]
  return s, ds, records


def test_cells_and_report(tables):
  s, ds, records = tables
  work, seeds = s.work, SEEDS
  for record in records:
    assert len(record["history"]) == 2 and record["steps_per_epoch"] == 3
  link = C.link_cell(s)
  chosen = json.loads((work / "link.json").read_text())
  assert link == min(chosen["dev_nll"], key=chosen["dev_nll"].get) and set(chosen["dev_nll"]) == {"probit_pairwise",
                                                                                                  "probit", "mc"}
  C.evaluate_cell(s, "obqa", 0, "early", link)  # one seed only: the report leaves a regime without every seed out
  for seed in seeds:
    cell = C.evaluate_cell(s, "obqa", seed, "long", link)
  assert cell["fitted"]["bmoe_ts"]["temperature"] == pytest.approx(cell["fitted"]["ts"]["temperature"], rel=1e-5)
  assert set(cell["seconds"]) == set(P.REGISTRY_METHODS) | set(P.BMOE) and all(cell["seconds"].values())
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
  assert t["in"]["protocol"] == [P.VERSION]
  # a paired difference is the metric's own: seed-mean NLL of bmoe_ts minus seed-mean NLL of TS
  runs = {m: [np.load(work / "obqa" / f"seed{k}" / "long" / "methods" / f"{m}.npz") for k in seeds]
          for m in ("bmoe_ts", "ts")}
  nll = lambda z: M.nll(z["obqa_test/probs"], z["obqa_test/labels"])
  want = np.mean([nll(a) - nll(b) for a, b in zip(runs["bmoe_ts"], runs["ts"])])
  assert t["in"]["paired"]["bmoe_ts - ts"]["nll"]["diff"] == pytest.approx(want)
  shift_ood = t["arc_challenge_test"]["ood"]
  assert "auroc_mi" in shift_ood["mc_dropout"] and "auroc_mi" not in shift_ood["ts"]
  assert "d_auroc_mi" in shift_ood["mc_dropout"] and "d_auroc_entropy" not in shift_ood["ts"]
  want = shift_ood["map"]["auroc"] - shift_ood["ts"]["auroc"]  # seed means: the paired estimate's
  assert shift_ood["map"]["d_auroc_entropy"]["diff"] == pytest.approx(want)
  primary = R.holm_primary(results)
  assert len(primary) == 2 * len(P.PRIMARY_METRICS)  # (MAP, TS) x metrics
  np.testing.assert_allclose([r["p_holm"] for r in primary], M.holm([r["p"] for r in primary]))
  flat = R.write(work, work / "report", datasets={"obqa": ds}, seeds=seeds, num_samples=50)
  md = (work / "report" / "results.md").read_text()
  assert f"protocol v{P.VERSION}" in md and f"Cells made under protocol v{P.VERSION}." in md
  assert "| bmoe_ev_layer |" in md and "Holm" in md and len(flat) == 1
  assert (work / "report" / "plots" / "paired_obqa_long.png").stat().st_size > 0
  times = json.loads((work / "report" / "results.json").read_text())["seconds"]["obqa"]
  assert len(times["finetune"]) == 2 and times["long/map"] > 0 and "## Wall times" in md


ROUTING = ("rt_temp", "rt_mfvr", "rt_laplace", "bmoe+rt_mfvr", "bmoe+rt_laplace")  # each router kind's own
# cell mechanics are the same; the kinds themselves are tested in tests/routing


def test_routing_cell(tables):
  """The routing cell: each router method saved for every set, only the routers they need trained, the
  combinations read the primary posterior, a temperature router's two draws disagree where MAP's cannot, and
  the report pairs the routers with MAP."""
  from bmoe_jax import baselines as BL
  from bmoe_jax.evaluate import collect_scored
  from experiments.tables import routing as RT
  s, ds, _ = tables
  link = C.link_cell(s)
  C.evaluate_cell(s, "obqa", 0, "long", link)
  assert RT.router_kinds(RT.METHODS) == ["mcdr", "swag", "ensemble", "mfvr", "fcvr", "vtsr"]
  cell = RT.routing_cell(s, "obqa", 0, "long", link, ROUTING)
  out = s.run_dir("obqa", 0) / "long" / "routing"
  assert sorted(p.stem for p in (out / "methods").glob("*.npz")) == sorted(ROUTING)
  for m in ROUTING:
    z = np.load(out / "methods" / f"{m}.npz")
    for key in ("obqa_test", "arc_challenge_test"):
      assert z[f"{key}/probs"].shape == (16, 4) and np.allclose(z[f"{key}/probs"].sum(-1), 1, atol=1e-5), m
  assert set(cell["train_seconds"]) == {"mfvr"}
  stab = cell["routing"]["stability"]
  two = {m: np.mean([v["resample"] for v in per.values()]) for m, per in stab.items()}
  assert two["map"] == 1.0 and two["rt_temp"] < 1.0
  # the combinations' posterior is the primary row's: its predictive is the evaluation cell's bmoe_ev_layer
  healed, cfg, batches, task = C._prepare(s, "obqa", ("train", "val", "eval"))
  _, params, _ = C.regime_params(s, "obqa", 0, "long", healed, cfg)
  posts = RT.posteriors(params, healed, task, batches, link, 0, out.parent / "fit", s.work / "scratch")
  primary = BL.bayesian_moe_variants({"p": posts["bmoe"]}, params, task, link=link)["p"]
  probs = collect_scored(primary, batches["obqa_test"])[0]
  saved = np.load(s.run_dir("obqa", 0) / "long" / "methods" / f"{P.PRIMARY}.npz")["obqa_test/probs"]
  np.testing.assert_allclose(probs, saved, rtol=1e-5, atol=1e-7)
  assert RT.routing_cell(s, "obqa", 0, "long", link, ROUTING) == cell  # done: nothing recomputed
  results = R.build(s.work, datasets={"obqa": ds}, seeds=(0,), num_samples=50)
  t = results[("obqa", "long")]
  assert "rt_mfvr - map" in t["in"]["paired"] and "bmoe+rt_laplace" in t["arc_challenge_test"]["ood"]
  stab_table = RT.stability_table(s.work, "obqa", "long", seeds=(0,))
  assert stab_table["rt_temp"]["resample"] == pytest.approx(two["rt_temp"])
  assert "Routing stability" in R.markdown(results, [], stab_table)
