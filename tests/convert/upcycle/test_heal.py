"""Healing a carved MoE (``convert.heal``): the losses against exact values, the softmax-gated rewrite
starting at the carve, healing lowering the distillation loss, resuming to the same weights, and the healed
model as a Qwen2-MoE that transformers loads with the same logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bmoe_jax as B
from bmoe_jax.checkpoint import ResumableRun, load_model
from bmoe_jax.data.toy_tokenizer import train_bpe
from bmoe_jax.model import mlp_inputs
from convert import heal_math as HM
from convert.carve import carve
from convert.reference import make_checkpoint, reference_outputs
from convert.upcycle import HEAL_DIR, UpcycleConfig, build_moe, load_dense, upcycle_checkpoint
from tests.convert.upcycle.test_carve import dense  # noqa: F401  (a tiny dense llama and its tokenizer)

TEXT = " ".join(f"the {a} {b} sat on the {c} and looked at {d} ." for a, b, c, d in
                zip(["cat", "dog", "bird", "fox"] * 90, ["quietly", "slowly", "happily"] * 120,
                    ["mat", "wall", "tree", "box", "roof"] * 72, ["stars", "rain", "ducks"] * 120))
HEAL = dict(method="carve", num_experts=4, top_k=2, shared_neurons=8, calib_tokens=256, moe_layers="top:2",
            heal_tokens=512, heal_valid_tokens=64, heal_seq=16, heal_batch=4, heal_topk=8, heal_epochs=2,
            heal_layerwise_epochs=1, heal_lr=3e-3, heal_eval_every=8, heal_checkpoint_every=3)


def test_topk_kl_is_the_coarsened_kl_and_exact_with_the_whole_vocabulary():
  rng = np.random.default_rng(0)
  t = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 12)) * 2), -1)
  s = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 12)) * 2), -1)
  exact = np.sum(np.exp(t) * (t - s), -1)
  logp, idx = jax.lax.top_k(t, 12)
  np.testing.assert_allclose(HM.topk_kl(logp, idx, s), exact, rtol=1e-5, atol=1e-6)
  logp, idx = jax.lax.top_k(t, 3)
  got = np.asarray(HM.topk_kl(logp, idx, s))
  pt, ps = np.exp(np.asarray(t)), np.exp(np.asarray(s))
  keep = np.asarray(idx)
  for row in range(5):  # KL of (3 kept tokens + one bucket) by hand
    a = np.append(pt[row, keep[row]], 1 - pt[row, keep[row]].sum())
    b = np.append(ps[row, keep[row]], 1 - ps[row, keep[row]].sum())
    np.testing.assert_allclose(got[row], np.sum(a * np.log(a / b)), rtol=1e-4)
  assert np.all(got <= exact + 1e-6) and np.all(np.asarray(HM.topk_kl(logp, idx, t)) < 1e-6)


def test_load_balance_is_one_when_uniform_and_larger_when_collapsed():
  e, k = 4, 2
  flat = jnp.zeros((8, e))
  spread = jnp.asarray([[i % e, (i + 1) % e] for i in range(8)])
  aux, f = HM.load_balance(flat, spread)
  assert abs(float(aux) - 1.0) < 1e-6 and np.allclose(f, 0.25)
  collapsed_logits = jnp.tile(jnp.asarray([[4.0, 4.0, 0.0, 0.0]]), (8, 1))
  aux, f = HM.load_balance(collapsed_logits, jnp.tile(jnp.asarray([[0, 1]]), (8, 1)))
  assert float(aux) > 1.9 and HM.load_evenness(np.asarray(f), k) == 0.0
  assert abs(HM.load_evenness(np.full(e, 0.25), k) - 1.0) < 1e-9


def test_softmax_gated_starts_at_the_carve_with_the_same_experts(dense):
  cfg, params, tok = dense
  c_cfg, c_params, _ = carve(cfg, params, tok, TEXT, layers=(1, 2), num_experts=4, top_k=2, shared_neurons=8,
                             active_frac=0.25, calib_tokens=256, router_steps=0, seed=0, calib_seq=32, progress=False)
  tokens = jnp.asarray(tok([TEXT[:300]], return_tensors="np")["input_ids"])
  xs = mlp_inputs(c_params, c_cfg, tokens, layers=(1, 2))
  xs = {i: np.asarray(x).reshape(-1, cfg.hidden_size) for i, x in xs.items()}
  want = B.forward(c_params, c_cfg, tokens, return_taps=True)
  for std, tol in ((1e-4, 1e-3), (1.0, None)):
    s_cfg, s_params = HM.softmax_gated(c_cfg, c_params, xs, std)
    assert (s_cfg.family, s_cfg.router_scoring, s_cfg.norm_topk_prob, s_cfg.shared_expert_gate) == \
        ("qwen2_moe", "softmax", True, True)
    got = B.forward(s_params, s_cfg, tokens, return_taps=True)
    # the same experts chosen where the input is the same (the lowest MoE layer): a positive scale keeps the order
    np.testing.assert_array_equal(np.sort(got.taps[1].expert_bsk, -1), np.sort(want.taps[1].expert_bsk, -1))
    for i in (1, 2):
      logits = np.asarray(xs[i] @ s_params["layers"][i]["mlp"]["router"]["kernel"])
      assert abs(np.std(logits) - std) < 1e-3 * max(std, 1e-3)
    diff = float(np.max(np.abs(np.asarray(got.logits) - np.asarray(want.logits))))
    assert diff < tol if tol else diff > 1e-3
  with pytest.raises(ValueError, match="select"):
    HM.softmax_gated(s_cfg, s_params, xs, 1.0)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("heal")
  make_checkpoint("llama", root / "dense", seed=0, vocab_size=320)
  train_bpe([TEXT], 300).save_pretrained(str(root / "dense"))
  (root / "text.txt").write_text(TEXT)
  return root


def test_healed_checkpoint_lowers_the_kl_and_is_a_qwen2_moe_transformers_loads(dense_dir, tmp_path):
  opts = dict(HEAL, calib_text=str(dense_dir / "text.txt"), heal_cache=str(dense_dir / "cache"))
  out = upcycle_checkpoint(dense_dir / "dense", tmp_path / "healed", progress=False, **opts)
  record = json.loads((out / "upcycle.json").read_text())
  assert record["family"] == "qwen2_moe" and not (out / HEAL_DIR).exists()
  history = record["carve"]["heal"]["history"]
  assert [h["phase"] for h in history] == ["start", "layerwise", "end_to_end", "end_to_end"]
  assert history[-1]["valid_kl"] < 0.9 * history[0]["valid_kl"]
  assert history[-1]["valid_ppl"] < history[0]["valid_ppl"]
  assert all(len(h["load"]) == 2 and abs(sum(h["load"][0]) - 1) < 1e-3 for h in history)
  from transformers import AutoModelForCausalLM
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
  assert type(hf).__name__ == "Qwen2MoeForCausalLM"
  tok = train_bpe([TEXT], 300)
  tokens = np.asarray(tok([TEXT[:200], TEXT[400:600]], return_tensors="np", truncation=True, max_length=32,
                          padding="max_length")["input_ids"])
  mask = np.ones_like(tokens)
  want = reference_outputs(hf, tokens, mask)["logits"]
  model = load_model(out)
  assert model.cfg.router_scoring == "softmax" and model.cfg.norm_topk_prob
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens)).logits), want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="method='carve'"):
    UpcycleConfig(method="copy", heal_tokens=16)
  with pytest.raises(ValueError, match="heal_tokens=100000"):
    upcycle_checkpoint(dense_dir / "dense", tmp_path / "big", progress=False, **{**opts, "heal_tokens": 100000})


def test_interrupted_healing_resumes_to_the_same_weights(dense_dir, tmp_path, monkeypatch):
  cfg, params, tok, _ = load_dense(dense_dir / "dense")
  uc = UpcycleConfig(**HEAL, calib_text=str(dense_dir / "text.txt"), heal_cache=str(dense_dir / "cache"))
  _, whole, whole_report = build_moe(cfg, params, tok, uc, progress=False, heal_dir=tmp_path / "whole")
  real_save, saves = ResumableRun.save, []

  def failing_save(self, step, state, meta=None):
    real_save(self, step, state, meta)
    saves.append(step)
    if len(saves) == 4:
      raise KeyboardInterrupt("killed after the fourth save")
  monkeypatch.setattr(ResumableRun, "save", failing_save)
  with pytest.raises(KeyboardInterrupt):
    build_moe(cfg, params, tok, uc, progress=False, heal_dir=tmp_path / "cut")
  monkeypatch.setattr(ResumableRun, "save", real_save)
  assert saves == [3, 6, 8, 9]  # every 3 steps and at the end of the layer-wise phase (8 steps); resumed from 9
  _, resumed, report = build_moe(cfg, params, tok, uc, progress=False, heal_dir=tmp_path / "cut")
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["heal"]["history"]]
  assert strip(report) == strip(whole_report)  # the saves fall between validations: the running loss is restored
  with pytest.raises(ValueError, match="heal_fingerprint.json"):
    build_moe(cfg, params, tok, UpcycleConfig(**{**HEAL, "heal_lr": 1e-3}, calib_text=str(dense_dir / "text.txt"),
                                              heal_cache=str(dense_dir / "cache")),
              progress=False, heal_dir=tmp_path / "cut")


def test_text_windows_are_disjoint_and_validation_avoids_the_calibration_text(dense):
  from convert.heal_data import text_windows
  tok = dense[2]
  train, valid = text_windows(tok, TEXT, 320, 96, 16, seed=0, calib_chars=2000)
  assert train.shape == (20, 16) and valid.shape == (6, 16)
  ids = np.asarray(tok.encode(TEXT, add_special_tokens=False))
  head = len(tok.encode(TEXT[:2000], add_special_tokens=False)) // 16
  starts = {tuple(w): i for i, w in enumerate(np.asarray(tok.encode(TEXT[2000:], add_special_tokens=False))[
      :(len(ids) - head * 16) // 16 * 16].reshape(-1, 16))}
  assert all(tuple(w) in starts for w in valid)  # every validation window lies past the calibration text
  again = text_windows(tok, TEXT, 320, 96, 16, seed=0, calib_chars=2000)
  assert all(np.array_equal(a, b) for a, b in zip(again, (train, valid)))
  with pytest.raises(ValueError, match="heal_tokens=100000"):
    text_windows(tok, TEXT, 100000, 96, 16, seed=0)
