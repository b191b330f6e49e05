"""``bmoe demo``'s pipeline end to end on a tiny dense llama (upcycle -> prefix cache -> fine-tune ->
Bayesian-MoE -> evaluation report), on the synthetic suite and on ../shared/data; and the cached-prefix
batches give the same numbers as full forwards."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bmoe_jax import baselines as BL
from bmoe_jax.task import Task, with_prefix
from tests.fixtures import posterior_of
from bmoe_jax import laplace as LA
from bmoe_jax.cli import main
from bmoe_jax.data import synthetic
from bmoe_jax.data.prompts import format_prompt
from bmoe_jax.data.toy_tokenizer import train_bpe
from bmoe_jax.demo import DemoConfig, run_demo
from convert.reference import make_checkpoint

pytestmark = pytest.mark.heavy  # the demo pipeline twice, once in a subprocess: scheduled first (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  out = tmp_path_factory.mktemp("llama") / "dense"
  text = [format_prompt(e) + " A B C D E" for t in synthetic.TASKS for e in synthetic.generate(t, "test", n=60)]
  tok = train_bpe(text, 480)
  make_checkpoint("llama", out, seed=0, vocab_size=512, num_hidden_layers=3, tie_word_embeddings=True)
  tok.save_pretrained(str(out))
  return out


def _cfg(src):
  d = DemoConfig()
  return dataclasses.replace(
      d, source=str(src), upcycle=dataclasses.replace(d.upcycle, num_experts=4, top_k=2, moe_layers="top:2",
                                                      shared_neurons=8, calib_tokens=512, heal_tokens=1024,
                                                      heal_valid_tokens=256, heal_seq=32, heal_batch=8),
      data=dataclasses.replace(d.data, max_train=32, max_eval=16, batch_size=8),
      train=dataclasses.replace(d.train, epochs=1, eval_every=2), fit=dataclasses.replace(d.fit, rank=4))


def test_demo_synthetic(tiny_llama, tmp_path, monkeypatch):
  monkeypatch.delenv("BMOE_DATA_DIR", raising=False)
  cfg = _cfg(tiny_llama)
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, methods=cfg.eval.methods + ("bmoe_ts",)))
  s = run_demo(cfg, tmp_path, progress=False)
  assert s["model"]["all_experts_vs_dense_max_abs_logit_diff"] is None and s["model"]["moe_layers"] == [1, 2]
  assert s["model"]["source"]["carve"]["calib_text"] == "synthetic training questions"
  heal = s["model"]["heal"]  # healed by default: 4 steps a pass, two passes
  assert heal["tokens"] == 2 * 1024 and heal["valid_kl"][1] < heal["valid_kl"][0] and "repeated" in heal["text"]
  assert s["model"]["family"] == "qwen2_moe" and not (tmp_path / "heal_run").exists()
  train = s["data"]["sets"]["train"]
  assert s["data"]["suite"].startswith("SYNTHETIC") and train["style"] == "continuation"
  assert s["finetune"]["steps"] == -(-(train["used"] - train["unscorable"]) // 8) > 0
  res = json.loads((tmp_path / "results.json").read_text())
  assert sorted(res["methods"]) == ["bmoe", "bmoe_ml", "bmoe_ts", "map", "pretrained", "ts"]
  assert s["posterior"]["bmoe_ts"]["temperature"] == pytest.approx(s["temperature"], rel=1e-5)  # TS's T, then λ
  assert "auroc_mi" in res["methods"]["bmoe_ts"]["synthetic_capitals_test"]["ood"]
  sets = ["synthetic_test", "synthetic_capitals_test", "synthetic_opposites_test", "synthetic_languages_test"]
  assert sorted(res["methods"]["bmoe"]) == sorted(sets)
  assert 0 < res["methods"]["map"]["synthetic_capitals_test"]["n"] <= 16
  assert "auroc" in res["methods"]["bmoe"]["synthetic_capitals_test"]["ood"]
  md = (tmp_path / "results.md").read_text()
  assert "**SYNTHETIC**" in md and "| bmoe |" in md
  assert json.loads((tmp_path / "config.json").read_text())["data"]["train"] == "synthetic:train"
  assert list((tmp_path / "plots").glob("*.png")) and (tmp_path / "posterior").is_dir()
  assert set(s["seconds"]) >= {"MAP fine-tuning", "Bayesian-MoE fit + prior", "evaluation"}


def test_demo_real_data_cli(tiny_llama, tmp_path, shared_data):
  cfg = tmp_path / "demo.json"
  cfg.write_text(json.dumps({"max_train": 16, "max_eval": 8, "epochs": 1, "batch_size": 8, "rank": 4,
                             "num_experts": 4, "moe_layers": "top:1", "eval_every": 0, "shared_neurons": 8,
                             "calib_tokens": 512, "heal_tokens": 0}))
  argv = ["demo", "--config", str(cfg), "--source", str(tiny_llama), "--data-dir", str(shared_data),
          "--shift", "arc_challenge:test,mmlu:test:astronomy", "--out-dir", str(tmp_path / "out"),
          "--mesh", "data=1", "--quiet"]  # the mesh code path (multi-device: tests/sharding)
  # the main job runs without torch (the README installs no test extras): any import of torch fails here
  code = f"import sys; sys.modules['torch'] = None\nfrom bmoe_jax.cli import main\nsys.exit(main({argv!r}))"
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
  assert res.returncode == 0, res.stderr[-3000:]
  s = json.loads((tmp_path / "out" / "demo.json").read_text())
  assert s["data"]["suite"] == "real benchmarks" and s["model"]["moe_layers"] == [2]
  assert s["model"]["all_experts_vs_dense_max_abs_logit_diff"] <= 1e-4 and s["model"]["heal"] is None  # the raw carve
  assert json.loads((tmp_path / "out" / "config.json").read_text())["run"]["mesh"] == "data=1"
  assert sorted(s["summary"]["bmoe"]) == ["arc_challenge_test", "mmlu_test_astronomy", "obqa_test"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"epochz": 1}))
  assert main(["demo", "--config", str(bad), "--out-dir", str(tmp_path / "x")]) == 2


def test_prefix_batches_match_full_forward(tiny_llama):
  """Cached prefix states (Batch.states_bsd + Task.start_layer) change nothing: factors, predictive."""
  from bmoe_jax.pipeline.data import batches_for
  from convert.upcycle import load_dense, upcycle

  dcfg, dparams, tok, _ = load_dense(tiny_llama)
  cfg, params = upcycle(dcfg, dparams, num_experts=4, top_k=2, moe_layers="top:2", noise=0.1)
  params = jax.tree.map(jax.numpy.asarray, params)
  batches, class_ids, _ = batches_for("synthetic:dev", tok, batch_size=8, max_examples=16)
  task = Task(cfg, class_ids)
  fast, (cached,) = with_prefix(params, task, [batches], 1, progress=False)
  spec = LA.FactorSpec(layers=cfg.moe_layer_ids, labels="exact", tokens="expand", rank=None)
  full = LA.fit_factors(params, task, batches, spec, progress=False)
  part = LA.fit_factors(params, fast, cached, spec, progress=False)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)
  post = posterior_of(LA.kfac.finalize(full), params, num_sequences=16)
  for m_full, m_fast in [(BL.map_method(params, task), BL.map_method(params, fast)),
                         (BL.bayesian_moe(post, params, task), BL.bayesian_moe(post, params, fast))]:
    np.testing.assert_allclose(np.asarray(m_full(batches[0])), np.asarray(m_fast(cached[0])), atol=1e-5)
