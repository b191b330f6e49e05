"""The ablations of the papers' tables (experiments/tables/ablation.py) on a tiny model with four MoE layers
and shared experts: the layer rows' factors are those of their own passes, a row's saved probabilities are
what the pipeline's fit gives for its spec, the remainder matters, a rerun skips finished rows, the report
has every row with its costs."""

import dataclasses

import numpy as np
import pytest

from bmoe_jax import baselines as BL
from bmoe_jax.evaluate import collect_scored
from bmoe_jax.pipeline import stages as ST
from bmoe_jax.pipeline.data import eval_key
from experiments.tables import ablation as A
from experiments.tables import cells as C
from experiments.tables import protocol as P
from tests.fixtures import tiny_model_dir

pytestmark = pytest.mark.heavy

ONLY = {"base", "Q1", "rank10", "rank10_no_remainder"}  # two factor passes: the suite stays short
LINK = "probit_pairwise"


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, shared_data):
  model = tiny_model_dir(tmp_path_factory.mktemp("tiny4") / "model", shared_data, num_layers=5,
                         moe_layers=(False, True, True, True, True))
  work = tmp_path_factory.mktemp("work")
  ds = P.Dataset("obqa:train", "obqa:dev", "obqa:test", max_train=24)
  s = C.Setup(str(model), shared_data, work, data=dataclasses.replace(P.DATA, max_eval=16, batch_size=8,
                                                                       max_length=128),
              train=dataclasses.replace(P.TRAIN, epochs=1, keep_checkpoints=1, lr=1e-3), datasets={"obqa": ds},
              progress=False)
  C.finetune_cell(s, "obqa", 0)
  out = A.ablation_cell(s, LINK, ("obqa", 0, "long"), ONLY)
  healed, cfg, batches, task = C._prepare(s, "obqa", ("train", "val", "eval"))
  _, params, _ = C.regime_params(s, "obqa", 0, "long", healed, cfg)
  return s, out, (healed, params, cfg, batches, task)


def test_layer_row_is_the_pipelines_fit_on_its_own_pass(ablated, tmp_path):
  """Row Q1 reads the Q1 blocks of the cell's routed + shared pass. Those factors equal a Q1-only pass's (the
  pipeline's ``stages.fit`` with ``bayes_layers=Q1``), and the row's grid column equals that fit's posterior
  scored on the test set."""
  s, out, (healed, params, cfg, batches, task) = ablated
  assert A.rows(cfg)[1] == A.Row("Q1", "layers", "routed_shared", (("bayes_layers", "Q1"),), (1,))
  fc = dataclasses.replace(P.FIT, bayes_layers="Q1", link=LINK)
  posts, _ = ST.fit(params, task, batches, fc, tmp_path, pretrained=healed, progress=False)
  restore = lambda f, d: ST.factor_pass(params, task, batches["train"], f, d, progress=False)[2]  # finished: read
  alone = restore(fc, tmp_path)
  both = restore(dataclasses.replace(P.FIT, shared=True), out / "routed_shared")
  assert set(map(str, alone.stats)) == {"1.routed"} and len(both.stats) == 8  # 4 layers x (routed, shared)
  for key, st in alone.stats.items():
    for a, b in zip(st, both.stats[key]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  method = BL.bayesian_moe_variants({"grid": posts["bmoe"]}, params, task, link=LINK)["grid"]
  probs, _, _ = collect_scored(method, batches[eval_key(s.datasets["obqa"].test)])
  saved = np.load(out / "rows" / "Q1.npz")
  np.testing.assert_allclose(saved["grid/probs"], probs, rtol=1e-4, atol=1e-6)
  assert not np.allclose(saved["grid/probs"], np.load(out / "rows" / "base.npz")["grid/probs"], atol=1e-6)


def test_rows_remainder_rerun_and_report(ablated):
  s, out, _ = ablated
  with_rest, without = (np.load(out / "rows" / f"{n}.npz") for n in ("rank10", "rank10_no_remainder"))
  assert not np.allclose(with_rest["ev_global/probs"], without["ev_global/probs"], atol=1e-6)
  mtime = (out / "rows" / "base.npz").stat().st_mtime
  A.ablation_cell(s, LINK, ("obqa", 0, "long"), ONLY)  # done: nothing recomputed
  assert (out / "rows" / "base.npz").stat().st_mtime == mtime
  table = A.report(s.work, s.work / "report")
  assert set(table) == ONLY and "nll_vs_base" not in table["base"]["choices"]["grid"]
  d = table["Q1"]["choices"]["ev_layer"]["nll_vs_base"]
  assert d["ci"][0] <= d["diff"] <= d["ci"][1] and table["Q1"]["group"] == "layers"
  for t in table.values():
    assert t["cost"]["factor_pass_s"] > 0 and t["cost"]["predictive_vs_map_forward"] > 0
  assert table["rank10"]["cost"]["factor_pass_s"] == table["rank10_no_remainder"]["cost"]["factor_pass_s"]
  md = (s.work / "report" / "ablation.md").read_text()
  assert md.count("| Q1 | layers |") == len(A.LAMBDAS) and f"protocol v{P.VERSION}" in md
  assert (s.work / "report" / "ablation_nll.png").stat().st_size > 0
