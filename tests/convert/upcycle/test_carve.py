"""Carving a dense FFN into a shared expert and routed experts (``convert.carve``): exact with every
expert selected, a real MoE below that, each step checked on cases with a known answer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.data.toy_tokenizer import train_bpe
from convert import carve as CV
from convert.upcycle import UpcycleConfig, load_dense, upcycle_checkpoint

TEXT = " ".join(f"the {a} {b} sat on the {c} and looked at {d} ." for a, b, c, d in
                zip(["cat", "dog", "bird", "fox"] * 60, ["quietly", "slowly", "happily"] * 80,
                    ["mat", "wall", "tree", "box", "roof"] * 48, ["stars", "rain", "ducks"] * 80))


@pytest.fixture(scope="module")
def dense():
  cfg = B.tiny_config(vocab_size=320, num_layers=3, moe_layers=(False,) * 3, intermediate_size=48,
                      shared_expert_size=0, qkv_bias=False)
  params = jax.tree.map(np.asarray, B.init_params(cfg, jax.random.key(0), std=0.3))
  return cfg, params, train_bpe([TEXT], 300)


def _carve(dense, top_k, **kw):
  cfg, params, tok = dense
  opts = dict(layers=(1, 2), num_experts=4, top_k=top_k, shared_neurons=8, active_frac=0.25, calib_tokens=256,
              router_steps=0, seed=0, calib_seq=32, progress=False)
  return CV.carve(cfg, params, tok, TEXT, **{**opts, **kw})


def test_all_experts_selected_is_the_dense_model_and_top_k_is_not(dense):
  cfg, params, tok = dense
  tokens = jnp.asarray(tok([TEXT[:200], TEXT[300:500]], return_tensors="np", truncation=True, max_length=40,
                           padding="max_length")["input_ids"])
  want = np.asarray(B.forward(params, cfg, tokens).logits)
  c_cfg, c_params, report = _carve(dense, top_k=4)
  assert c_cfg.moe_layer_ids == (1, 2) and c_cfg.router_scoring == "select"
  assert (c_cfg.moe_intermediate_size, c_cfg.shared_expert_size) == (10, 8)
  got = np.asarray(B.forward(c_params, c_cfg, tokens).logits)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # every neuron is in exactly one expert
  for i in (1, 2):
    w = c_params["layers"][i]["mlp"]
    rows = np.concatenate([w["shared"]["w_down"], w["experts"]["w_down"].reshape(-1, cfg.hidden_size)])
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(params["layers"][i]["mlp"]["w_down"], axis=0))
  k_cfg, k_params, report = _carve(dense, top_k=1)
  assert not np.allclose(np.asarray(B.forward(k_params, k_cfg, tokens).logits), want, atol=1e-3)
  assert set(report["layers"]) == {1, 2}
  assert all(0 < r["shared_energy"] < 1 and 0 <= r["oracle_agreement"] <= 1 and 0 <= r["load_entropy"] <= 1
             for r in report["layers"].values())


def test_select_gates_are_one_with_a_gradient_to_the_router():
  from bmoe_jax.nn.moe import route

  x = jax.random.normal(jax.random.key(0), (5, 6))
  w = jax.random.normal(jax.random.key(1), (6, 4))
  r = route(x, w, 2, norm_topk_prob=False, scoring="select")
  np.testing.assert_array_equal(np.asarray(r.gate_nk), 1.0)
  np.testing.assert_array_equal(np.asarray(r.expert_nk), np.argsort(-np.asarray(x @ w), axis=1)[:, :2])
  g = jax.grad(lambda w: jnp.sum(route(x, w, 2, norm_topk_prob=False, scoring="select").gate_nk * x[:, :1]))(w)
  assert np.abs(np.asarray(g)).sum() > 0


def test_balanced_kmeans_recovers_separated_groups_in_equal_sizes():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 20)) * 10
  truth = rng.permutation(np.repeat(np.arange(3), 7))
  x = centers[truth] + rng.normal(size=(21, 20))
  groups = CV.balanced_kmeans(x, 3, seed=1)
  assert groups.shape == (3, 7) and sorted(groups.ravel().tolist()) == list(range(21))
  assert all(len(set(truth[g])) == 1 for g in groups)
  with pytest.raises(ValueError, match="equal experts"):
    CV.balanced_kmeans(x, 4)


def test_active_pattern_router_fit_and_training():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(50, 12))
  act = CV.active_pattern(h, np.ones((12, 3)), 0.25)
  assert np.all(act.sum(1) == 3)
  np.testing.assert_array_equal(act, np.abs(h) >= np.sort(np.abs(h), 1)[:, -3:-2])
  x = rng.normal(size=(400, 6)).astype(np.float32)
  w_true = rng.normal(size=(6, 4))
  norms = x @ w_true  # linear in x: the least-squares router finds the oracle's top-k exactly
  router = CV.fit_router(x, norms, ridge=1e-8)
  assert CV.agreement(router, x, norms, 2) == 1.0
  noisy = norms + 2.0 * rng.normal(size=norms.shape)
  before = CV.agreement(CV.fit_router(x, noisy), x, noisy, 2)
  trained = CV.train_router(CV.fit_router(x, noisy), x, noisy, 2, steps=300, lr=1e-2)
  assert CV.agreement(trained, x, noisy, 2) >= before - 0.02
  # load entropy: a router that prefers the same two experts for every token is static (0); one whose
  # top-2 cycles evenly through the four experts is balanced (1)
  static = np.zeros((6, 4), np.float32)
  static[0] = [3.0, 2.0, 1.0, 0.0]
  assert CV.load_entropy(static, np.abs(x) + 1.0, 2) == 0.0
  eye = np.eye(4, dtype=np.float32)[np.arange(400) % 4]
  cyc = np.concatenate([eye + np.roll(eye, 1, axis=1) * 0.5, np.zeros((400, 2), np.float32)], 1)
  assert abs(CV.load_entropy(np.eye(6, 4, dtype=np.float32), cyc, 2) - 1.0) < 1e-6


def test_carve_checkpoint_round_trip_and_errors(dense, tmp_path):
  from bmoe_jax.checkpoint import load_model
  from convert.reference import make_checkpoint

  make_checkpoint("llama", tmp_path / "dense", seed=0, vocab_size=320)
  text = tmp_path / "calib.txt"
  text.write_text(TEXT)
  with pytest.raises(ValueError, match="tokenizer"):
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "c0", method="carve", calib_text=str(text), progress=False)
  tok = train_bpe([TEXT], 300)
  tok.save_pretrained(str(tmp_path / "dense"))
  with pytest.raises(ValueError, match="calibration text"):
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "c1", method="carve", progress=False)
  with pytest.raises(ValueError, match="equal experts"):
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "c2", method="carve", calib_text=str(text), num_experts=5,
                       moe_layers="top:2", shared_neurons=4, progress=False)
  out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "c", method="carve", calib_text=str(text),
                           num_experts=4, top_k=4, shared_neurons=8, calib_tokens=512, moe_layers="top:2",
                           progress=False)
  record = json.loads((out / "upcycle.json").read_text())
  assert record["family"] == "carved" and record["moe_layer_ids"] == [1, 2] and "calib_text" in record["carve"]
  model = load_model(out)
  assert model.cfg.router_scoring == "select" and model.cfg.num_experts == 4
  d_cfg, d_params, _, _ = load_dense(tmp_path / "dense")
  tokens = jnp.asarray(tok([TEXT[:120]], return_tensors="np")["input_ids"])
  np.testing.assert_allclose(np.asarray(model(tokens).logits), np.asarray(B.forward(d_params, d_cfg, tokens).logits),
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="method="):
    UpcycleConfig(method="clone")
  # each method's default layers, also when the method is chosen by a flag after the defaults
  import argparse

  from bmoe_jax.pipeline import flags
  parser = argparse.ArgumentParser()
  flags.add_flags(parser, UpcycleConfig())
  chosen = flags.resolve(UpcycleConfig(), parser.parse_args(["--method", "carve"]))
  assert (chosen.layers, UpcycleConfig().layers) == ("top:8", "all")
