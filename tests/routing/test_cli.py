"""bmoe finetune --trainable router -> route-train -> evaluate with every kind of router method, on a tiny model
with a tokenizer trained on real OBQA rows (../shared/data)."""

import json

import numpy as np
import pytest

from bmoe_jax.cli import main
from tests.fixtures import tiny_model_dir

pytestmark = pytest.mark.heavy  # route-train and every router method end to end: scheduled first (tests/conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data):
  return tiny_model_dir(tmp_path_factory.mktemp("tiny_rt") / "model", shared_data)


def test_route_train_and_evaluate_router_methods(model_dir, shared_data, tmp_path, capsys):
  common = ["--data-dir", shared_data, "--max-train", "16", "--max-eval", "16", "--batch-size", "8",
            "--max-length", "96", "--quiet", "--train", "obqa:train", "--test", "obqa:test"]
  ft = tmp_path / "ft"  # the MAP router first (thesis stage 2a)
  assert main(["finetune", "--model", str(model_dir), "--trainable", "router", "--lr", "1e-3", "--epochs", "1",
               "--out", str(ft), "--cache-prefix"] + common) == 0
  model = str(ft / "model")
  for kind, extra in (("mfvr", []), ("ensemble", ["--router-members", "2"])):
    assert main(["route-train", "--model", model, "--kind", kind, "--route-layers", "last:1", "--route-epochs", "1",
                 "--cache-prefix", "--out", str(tmp_path / kind)] + extra + common) == 0
    saved = json.loads((tmp_path / kind / "routers" / "routing.json").read_text())
    assert saved["plan"]["layers"]["1"]["kind"] == kind and saved["meta"]["history"]
  assert main(["fit", "--model", model, "--prior-mean", "zero", "--rank", "4", "--out", str(tmp_path / "fit")]
              + common) == 0
  assert main(["fit", "--model", model, "--prior-mean", "zero", "--laplace-router", "only", "--out",
               str(tmp_path / "fit_router")] + common) == 0
  assert json.loads((tmp_path / "fit_router" / "posterior" / "posterior.json").read_text())["blocks"] == ["1.router"]
  ev = tmp_path / "eval"
  methods = "map,rt_temp,rt_mfvr,rt_der,rt_laplace,bmoe,bmoe+rt_mfvr"
  assert main(["evaluate", "--model", model, "--methods", methods, "--routers",
               f"{tmp_path / 'mfvr' / 'routers'},{tmp_path / 'ensemble' / 'routers'}", "--posterior",
               str(tmp_path / "fit" / "posterior"), "--router-posterior", str(tmp_path / "fit_router" / "posterior"),
               "--route-samples", "3", "--shift", "arc_easy:test", "--cache-prefix", "--stability", "--stability-batches",
               "1", "--out", str(ev)] + common) == 0
  res = json.loads((ev / "results.json").read_text())["methods"]
  assert sorted(res) == sorted(methods.split(","))
  for m in res.values():
    assert m["obqa_test"]["n"] == 16 and np.isfinite(m["obqa_test"]["nll"])
  info = json.loads((ev / "run.json").read_text())["methods"]
  routing = json.loads((ev / "routing.json").read_text())
  assert sorted(routing["stability"]) == ["map", "rt_der", "rt_mfvr", "rt_temp"]
  assert routing["stability"]["map"]["1"]["resample"] == 1.0 and len(routing["stability"]["map"]["1"]["gamma"]) == 7
  assert routing["router_flops_per_token"]["rt_mfvr"] > 0 and (ev / "plots" / "stability.png").exists()
  assert "| rt_mfvr |" in (ev / "routing.md").read_text()
  assert info["rt_der"]["draws"] == 2 and info["rt_mfvr"]["draws"] == 3 and info["rt_temp"]["plan"]["layers"]["1"]
  capsys.readouterr()
  assert main(["evaluate", "--model", model, "--methods", "rt_fcvr", "--out", str(tmp_path / "e2")] + common) == 2
  assert "needs trained fcvr routers: pass --routers DIR" in capsys.readouterr().err
  assert main(["evaluate", "--model", model, "--methods", "bmoe+rt_laplace", "--router-posterior",
               str(tmp_path / "fit_router" / "posterior"), "--out", str(tmp_path / "e3")] + common) == 2
  assert "fit it with --laplace-router with" in capsys.readouterr().err
  assert main(["route-train", "--model", model, "--kind", "nonsense", "--out", str(tmp_path / "x")] + common) == 2
  assert "router kind='nonsense'" in capsys.readouterr().err
