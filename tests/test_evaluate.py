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
  other = B.init_params(cfg, jax.random.key(1), std=0.3)
  methods = {"map": BL.map_method(params, Task(cfg, CLASSES)), "ts": ts,
             "ensemble": BL.ensemble([params, other], Task(cfg, CLASSES))}
  res = evaluate(methods, data, in_distribution="id", out_dir=tmp_path, progress=False,
                 record={"config": {"what": "test"}, "seed": 0})
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["methods"]["map"]["id"]["acc"] == res["methods"]["map"]["id"]["acc"]
  p, y = collect(methods["map"], data["id"])
  assert res["methods"]["map"]["id"]["nll"] == pytest.approx(M.nll(p, y)) and res["methods"]["map"]["id"]["n"] == 16
  assert "ood" in res["methods"]["ts"]["shift"] and "ood" not in res["methods"]["ts"]["id"]
  md = (tmp_path / "results.md").read_text()
  assert "| map |" in md and "shift OOD AUROC" in md and "id AURC" in md
  ood = res["methods"]["ensemble"]["shift"]["ood"]  # epistemic scores: by mutual information and logit variance
  assert {"auroc_mi", "auprc_mi", "auroc_var_f", "mi_in", "var_f_out"} <= set(ood)
  assert "auroc_mi" not in res["methods"]["ts"]["shift"]["ood"] and "| ts | " in md and " / — / —" in md
  assert res["methods"]["map"]["id"]["aurc"] == pytest.approx(M.aurc(p, y))
  for name in methods:
    for ds in data:
      assert (tmp_path / "plots" / f"reliability_{name}_{ds}.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="in_distribution='obqa'"):
    evaluate(methods, data, in_distribution="obqa", progress=False)


def test_a_stopped_evaluation_resumes_at_the_first_unfinished_method(tmp_path):
  """With resume_key, finished methods' metrics are reused (not recomputed) by a rerun with the same key; another
  key, or other labels, recompute them."""
  cfg = B.tiny_config(num_experts=4)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  data = {"id": synthetic_task(cfg, 2), "shift": synthetic_task(cfg, 1, seed=3, s=9)}
  calls = {"map": 0, "broken": 0}

  def counted(name, fn):
    def method(batch):
      calls[name] += 1
      return fn(batch)
    return method
  good = BL.map_method(params, Task(cfg, CLASSES))

  def broken(batch):
    calls["broken"] += 1
    raise KeyboardInterrupt  # the session ends during the second method
  key = {"run": "r0", "seed": 0}
  with pytest.raises(KeyboardInterrupt):
    evaluate({"map": counted("map", good), "broken": broken}, data, in_distribution="id", out_dir=tmp_path,
             progress=False, plots=False, resume_key=key)
  assert calls["map"] == 3 and (tmp_path / "methods" / "map.json").exists()
  res = evaluate({"map": counted("map", good), "ts": counted("broken", good)}, data, in_distribution="id",
                 out_dir=tmp_path, progress=False, plots=False, resume_key=key)
  assert calls["map"] == 3 and calls["broken"] == 4  # map reused; the unfinished method computed
  fresh = json.loads(json.dumps(evaluate({"map": good}, data, in_distribution="id", progress=False), default=float))

  def metrics(per):  # all but the wall times
    return {ds: {k: v for k, v in m.items() if k != "seconds"} for ds, m in per.items()}
  assert metrics(res["methods"]["map"]) == metrics(fresh["methods"]["map"])
  evaluate({"map": counted("map", good)}, data, in_distribution="id", out_dir=tmp_path, progress=False, plots=False,
           resume_key=dict(key, seed=1))
  assert calls["map"] == 6  # another key: recomputed
  relabelled = {"id": [b._replace(labels_b=(b.labels_b + 1) % 4) for b in data["id"]], "shift": data["shift"]}
  evaluate({"map": counted("map", good)}, relabelled, in_distribution="id", out_dir=tmp_path, progress=False,
           plots=False, resume_key=dict(key, seed=1))
  assert calls["map"] == 9  # other labels: recomputed


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


def test_a_finished_methods_programs_are_dropped():
  """Each CPU executable holds memory mappings; a long evaluation (many methods x batch shapes) exhausted
  vm.max_map_count. evaluate() drops a method's compiled programs when it is done: the mappings do not pile up."""
  import jax.numpy as jnp
  from bmoe_jax.task import Batch

  def nmaps():
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)

  def method(seed):
    f = jax.jit(lambda t: jax.nn.softmax(jnp.tanh(t.astype(jnp.float32) @ jnp.ones((t.shape[1], 4)) * seed), -1))
    return lambda b: f(b.tokens_bs)

  shapes = [Batch(jnp.ones((2, s), jnp.int32), jnp.ones((2, s), jnp.int32), jnp.zeros(2, jnp.int32),
                  jnp.zeros(2, jnp.int32)) for s in range(3, 23)]
  evaluate({"warm": method(0.5)}, {"set": shapes}, progress=False, plots=False)
  before = nmaps()
  methods = {f"m{i}": method(1.0 + i) for i in range(3)}  # alive throughout, as in the pipeline
  evaluate(methods, {"set": shapes}, progress=False, plots=False)
  assert nmaps() - before < 60  # 60 programs of ~3 mappings each would add ~180
