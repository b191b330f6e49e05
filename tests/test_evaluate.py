"""evaluate(): every method x dataset, OOD against the in-distribution set, JSON/Markdown/PNG outputs."""

import json

import jax
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.task import Task
from bmoe_jax import baselines as BL
from bmoe_jax import metrics as M
from bmoe_jax.evaluate import collect, evaluate
from tests.fixtures import CLASSES, synthetic_task


def test_evaluate_writes_consistent_reports(tmp_path):
  cfg = B.tiny_config(num_experts=4)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  data = {"id": synthetic_task(cfg, 2), "shift": synthetic_task(cfg, 1, seed=3, s=9)}
  ts, _ = BL.temperature_scaling(params, Task(cfg, CLASSES), data["id"])
  methods = {"map": BL.map_method(params, Task(cfg, CLASSES)), "ts": ts}
  res = evaluate(methods, data, in_distribution="id", out_dir=tmp_path, progress=False,
                 record={"config": {"what": "test"}, "seed": 0})
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["methods"]["map"]["id"]["acc"] == res["methods"]["map"]["id"]["acc"]
  p, y = collect(methods["map"], data["id"])
  assert res["methods"]["map"]["id"]["nll"] == pytest.approx(M.nll(p, y)) and res["methods"]["map"]["id"]["n"] == 16
  assert "ood" in res["methods"]["ts"]["shift"] and "ood" not in res["methods"]["ts"]["id"]
  md = (tmp_path / "results.md").read_text()
  assert "| map |" in md and "shift OOD AUROC" in md
  for name in methods:
    for ds in data:
      assert (tmp_path / "plots" / f"reliability_{name}_{ds}.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="in_distribution='obqa'"):
    evaluate(methods, data, in_distribution="obqa", progress=False)


def test_non_finite_predictions_and_empty_rows_are_named():
  from bmoe_jax.finite import NonFiniteError

  cfg = B.tiny_config(num_experts=4)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  data = synthetic_task(cfg, 2)
  bad = jax.tree.map(lambda a: a, params)
  bad["final_norm"] = jax.tree.map(lambda a: a * np.nan, bad["final_norm"])
  with pytest.raises(NonFiniteError, match=r"map/id: non-finite probabilities in batch 0 \(rows \[0, 1,"):
    evaluate({"map": BL.map_method(bad, Task(cfg, CLASSES))}, {"id": data}, progress=False)
  empty = data[1]._replace(mask_bs=data[1].mask_bs.at[3].set(0))
  with pytest.raises(ValueError, match=r"map/id: batch 1 rows \[3\] are all padding"):
    evaluate({"map": BL.map_method(params, Task(cfg, CLASSES))}, {"id": [data[0], empty]}, progress=False)
