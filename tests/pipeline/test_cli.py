"""bmoe finetune -> fit -> evaluate end to end on a tiny model, a tokenizer trained here and a few
real OBQA / MMLU rows from ../shared/data (config file + flags). Layer 0 is dense, so --cache-prefix
(layer 1's inputs computed once) changes what runs and must not change a number. Lettered scoring here:
last-layer Laplace needs one set of class tokens; the demo tests run the default continuation scoring."""

import json

import numpy as np
import pytest

from bmoe_jax.cli import main
from tests.fixtures import tiny_model_dir

pytestmark = pytest.mark.heavy  # finetune, fit and evaluate end to end: scheduled first (tests/conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data):
  return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", shared_data)


def test_finetune_fit_evaluate(model_dir, shared_data, tmp_path):
  common = ["--data-dir", shared_data, "--max-train", "24", "--max-eval", "24", "--batch-size", "8", "--max-length", "128",
            "--scoring", "letters", "--quiet"]
  ft = tmp_path / "ft"
  assert main(["finetune", "--model", str(model_dir), "--train", "obqa:train", "--val", "obqa:dev", "--lr", "1e-3",
               "--epochs", "2", "--eval-every", "3", "--layers", "1", "--cache-prefix", "--checkpoint-every", "2",
               "--keep-checkpoints", "2", "--out", str(ft)] + common) == 0
  run = json.loads((ft / "run.json").read_text())
  assert run["data"]["train"]["used"] == 24 and len(run["history"]) == 2 and run["config"]["lr"] == 1e-3
  assert (ft / "model" / "bmoe_config.json").exists() and (ft / "model" / "tokenizer.json").exists()
  nlls = [h["val_nll"] for h in run["history"]]
  assert (ft / "model_final").exists() == (int(np.argmin(nlls)) != len(nlls) - 1)  # trained past its best: both kept
  assert [h["epoch"] for h in run["history"]] == [1.0, 2.0] and all(h["train_loss"] > 0 for h in run["history"])
  model_record = json.loads((ft / "model" / "bmoe_config.json").read_text())
  _interrupt_before_records(ft, "model/bmoe_config.json")
  assert main(["finetune", "--model", str(model_dir), "--train", "obqa:train", "--val", "obqa:dev", "--lr", "1e-3",
               "--epochs", "2", "--eval-every", "3", "--layers", "1", "--cache-prefix", "--checkpoint-every", "2",
               "--keep-checkpoints", "2", "--out", str(ft)] + common) == 0  # the rerun finishes it
  again = json.loads((ft / "model" / "bmoe_config.json").read_text())
  assert again["params_digest"] == model_record["params_digest"] and json.loads((ft / "run.json").read_text())
  fit = tmp_path / "fit"
  fit_argv = ["fit", "--model", str(ft / "model"), "--pretrained", str(model_dir), "--train", "obqa:train",
              "--rank", "4", "--shared", "--out", str(fit)] + common
  assert main(fit_argv) == 0
  meta = json.loads((fit / "posterior" / "posterior.json").read_text())
  _interrupt_before_records(fit, "posterior/posterior.json")
  assert main(fit_argv) == 0  # the factor pass resumes from its saves; the posterior is written again
  assert json.loads((fit / "posterior" / "posterior.json").read_text())["digest"] == meta["digest"]
  assert meta["blocks"] == ["1.routed", "1.shared"]
  grids = {}
  for cached in ([], ["--cache-prefix"]):
    grid = tmp_path / f"fit_grid{len(cached)}"
    assert main(["fit", "--model", str(ft / "model"), "--train", "obqa:train", "--rank", "4", "--prior", "grid",
                 "--prior-mean", "map",
                 "--val", "obqa:dev", "--out", str(grid)] + cached + common) == 0
    grids[len(cached)] = g = json.loads((grid / "run.json").read_text())
    assert g["val_nll"] == min(g["grid"]["nll"]) and len(g["grid"]["prior_precision"]) == 41
    assert g["grid_edge"] == {0: "lower", 40: "upper"}.get(int(np.argmin(g["grid"]["nll"])))
  assert grids[1]["grid"]["nll"] == pytest.approx(grids[0]["grid"]["nll"], rel=1e-5)
  assert json.loads((tmp_path / "fit_grid0" / "posterior" / "posterior.json").read_text())["metadata"]["link"] == \
      "probit_pairwise"
  with pytest.warns(UserWarning, match="chosen with link 'probit_pairwise' and is evaluated with --link 'probit'"):
    main(["evaluate", "--model", str(ft / "model"), "--posterior", str(tmp_path / "fit_grid0" / "posterior"),
          "--methods", "bmoe", "--link", "probit", "--test", "obqa:test", "--out", str(tmp_path / "ev_link")] + common)
  config = tmp_path / "eval.json"
  config.write_text(json.dumps({"methods": "map,ts,mc_dropout,llla,bmoe,bmoe_ts,ckpt_ensemble",
                                "shift": "mmlu:test:astronomy,arc_challenge:test", "dropout": 0.2, "batch-size": 4,
                                "ci": True, "cache-prefix": True}))
  ev = tmp_path / "eval"
  assert main(["evaluate", "--config", str(config), "--model", str(ft / "model"), "--posterior",
               str(fit / "posterior"), "--checkpoints", str(ft), "--test", "obqa:test", "--batch-size", "8",
               "--out", str(ev)] + common) == 0
  res = json.loads((ev / "results.json").read_text())
  assert sorted(res["methods"]) == ["bmoe", "bmoe_ts", "ckpt_ensemble", "llla", "map", "mc_dropout", "ts"]
  fitted = json.loads((ev / "run.json").read_text())["methods"]
  assert fitted["ckpt_ensemble"]["members"] == 2  # steps 4 and 6
  assert fitted["bmoe_ts"]["temperature"] == pytest.approx(fitted["ts"]["temperature"], rel=1e-5)  # T of TS, then λ
  assert len(fitted["bmoe_ts"]["grid"]["nll"]) == 41 and "mi_in" in res["methods"]["bmoe_ts"]["mmlu_test_astronomy"]["ood"]
  for m in res["methods"].values():
    assert m["obqa_test"]["n"] == 24 and 0 <= m["mmlu_test_astronomy"]["ood"]["auroc"] <= 1
    assert m["arc_challenge_test"]["n"] == 24
  assert res["record"]["config"]["batch_size"] == 8 and res["record"]["config"]["dropout"] == 0.2  # flag > file
  assert len(list((ev / "plots").glob("*.png"))) == 21
  assert "| bmoe |" in (ev / "results.md").read_text() and "ci95" in res["methods"]["map"]["obqa_test"]
  assert " [" in (ev / "results.md").read_text()  # intervals in the table
  full = tmp_path / "eval_full"  # the same methods without the cached prefix
  assert main(["evaluate", "--model", str(ft / "model"), "--posterior", str(fit / "posterior"), "--methods", "map,bmoe",
               "--shift", "arc_challenge:test", "--test", "obqa:test", "--out", str(full)] + common) == 0
  again = json.loads((full / "results.json").read_text())["methods"]
  for m in ("map", "bmoe"):
    for key in ("nll", "ece", "brier"):
      assert again[m]["arc_challenge_test"][key] == pytest.approx(res["methods"][m]["arc_challenge_test"][key],
                                                                  rel=1e-4, abs=1e-6)


def _interrupt_before_records(out, record: str):
  """``out`` as a kill leaves it after the artefact's arrays and before its record and ``run.json``."""
  (out / record).unlink()
  (out / "run.json").unlink()


def test_cli_errors(model_dir, shared_data, tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"learning_rate": 1.0}))
  assert main(["finetune", "--config", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 2
  assert "unknown keys ['learning_rate']" in capsys.readouterr().err
  assert main(["evaluate", "--model", str(model_dir), "--data-dir", shared_data, "--test", "piqa:test",
               "--out", str(tmp_path / "y")]) == 2
  assert "unknown dataset 'piqa'" in capsys.readouterr().err
  # the prior mean is an explicit choice: no pretrained weights and no --prior-mean is refused before any work
  assert main(["fit", "--model", str(model_dir), "--data-dir", shared_data, "--out", str(tmp_path / "z")]) == 2
  err = capsys.readouterr().err
  assert "pass --pretrained DIR" in err and "--prior-mean zero" in err
  assert main(["fit", "--model", str(model_dir), "--prior-mean", "map", "--out", str(tmp_path / "w")]) == 2
  assert "use prior='grid'" in capsys.readouterr().err


def test_quiet_still_reports_skipped_rows(model_dir, shared_data, tmp_path, capsys):
  """--quiet drops progress and plain reports, never the reasons rows were skipped."""
  rows = (tmp_path / "data" / "obqa")
  rows.mkdir(parents=True)
  lines = open(f"{shared_data}/obqa/test.jsonl").read().splitlines()[:12]
  lines[3] = lines[3].replace('"question"', '"stem"')
  (rows / "test.jsonl").write_text("\n".join(lines) + "\n")
  assert main(["evaluate", "--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--test", "obqa:test",
               "--shift", "", "--methods", "map", "--max-length", "96", "--quiet", "--out", str(tmp_path / "ev")]) == 0
  err = capsys.readouterr().err
  assert "data obqa_test: obqa (test.jsonl): 11 of 12 rows kept, 1 skipped: " in err and "test.jsonl:4: " in err
  assert json.loads((tmp_path / "ev" / "results.json").read_text())["methods"]["map"]["obqa_test"]["n"] == 11
