"""The GGUF reader on small llama files the tests write with the ``gguf`` package: tensors equal the
source model's (q/k permutation undone), quantised tensors dequantise as llama.cpp's, our forward on the
result matches transformers, and bad files get errors that name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bmoe_jax as B
from convert import ConversionError
from convert.builder import params_from_tensors
from convert.gguf import gguf_config, permute_rotary, read_gguf, unpermute_rotary
from convert.hf_config import parse_hf_config_dict
from convert.reference import make_checkpoint, reference_outputs
from tests.conftest import padded_batch
from tests.convert.upcycle.gguf_files import write_llama_gguf


def test_rotary_permutation_roundtrip():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(48, 3)
  assert not np.array_equal(permute_rotary(w, 6), w)
  np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 6), 6), w)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_matches_transformers(tmp_path, tied):
  model = make_checkpoint("llama", tmp_path / "hf", seed=2, tie_word_embeddings=tied, num_key_value_heads=2)
  quant = {"model.layers.1.mlp.up_proj.weight": "Q8_0", "model.layers.0.self_attn.q_proj.weight": "Q8_0"}
  expect = write_llama_gguf(model, tmp_path / "m.gguf", quantize=quant)
  raw, tensors = read_gguf(tmp_path / "m.gguf")
  assert raw["tie_word_embeddings"] is tied and raw["num_key_value_heads"] == 2
  assert sorted(tensors) == sorted(expect)
  for k, a in expect.items():
    np.testing.assert_array_equal(tensors[k], a, err_msg=k)
  sd = model.state_dict()
  for k in quant:  # Q8_0 is lossy but close, and was really quantised
    err = np.abs(tensors[k] - sd[k].numpy()).max()
    assert 0 < err < 0.02 * np.abs(sd[k].numpy()).max(), k
  with torch.no_grad():  # the reference runs on the dequantised weights too
    for k in quant:
      sd[k].copy_(torch.from_numpy(tensors[k]))
  info = parse_hf_config_dict(raw, "m.gguf")
  params = jax.tree.map(jnp.asarray, params_from_tensors(info, tensors, "m.gguf"))
  tokens, mask = padded_batch(info.cfg.vocab_size)
  ref = reference_outputs(model, tokens, mask)
  out = B.forward(params, info.cfg, tokens, mask)
  assert np.abs(np.asarray(out.logits) - ref["logits"])[mask.astype(bool)].max() <= 1e-4


def test_gguf_errors(tmp_path):
  model = make_checkpoint("llama", tmp_path / "hf", seed=0)
  write_llama_gguf(model, tmp_path / "arch.gguf", arch="gpt2")
  with pytest.raises(ConversionError, match="general.architecture='gpt2'"):
    read_gguf(tmp_path / "arch.gguf")
  write_llama_gguf(model, tmp_path / "rope.gguf", extra_kv={"llama.rope.scaling.type": "yarn"})
  with pytest.raises(ConversionError, match="llama.rope.scaling.type"):
    gguf_config(tmp_path / "rope.gguf")
  write_llama_gguf(model, tmp_path / "extra.gguf", extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
  with pytest.raises(ConversionError, match="unexpected tensor 'rope_freqs.weight'"):
    read_gguf(tmp_path / "extra.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 13)
  with pytest.raises(ConversionError, match="junk.gguf: not a readable GGUF"):
    read_gguf(tmp_path / "junk.gguf")
  with pytest.raises(ConversionError, match="not found"):
    read_gguf(tmp_path / "missing.gguf")


def test_a_corrupt_gguf_is_refused_naming_the_field_and_offset(tmp_path):
  """Truncated anywhere, or with an absurd count or length, the file is refused by ``check_gguf_layout`` with
  the field and its byte offset, before the ``gguf`` parser indexes into it or allocates by a corrupt count."""
  import struct

  from convert.gguf_check import check_gguf_layout

  model = make_checkpoint("llama", tmp_path / "hf", seed=0)
  write_llama_gguf(model, tmp_path / "m.gguf", quantize={"model.layers.0.mlp.up_proj.weight": "Q8_0"})
  good = (tmp_path / "m.gguf").read_bytes()
  check_gguf_layout(tmp_path / "m.gguf")
  bad = tmp_path / "bad.gguf"
  for cut in [*range(0, 2048, 7), len(good) - 1]:  # the header, key-values and tensor infos; the last data byte
    bad.write_bytes(good[:cut])
    with pytest.raises(ConversionError, match=r"bad.gguf: not a readable GGUF file: .*(at byte \d+|empty)"):
      check_gguf_layout(bad)
  cases = {8: (2**60, r"tensor count at byte 8: 1152921504606846976 entries cannot fit"),
           16: (2**40, r"key-value count at byte 16: 1099511627776 entries cannot fit"),
           24: (2**62, r"key-value 0 key \(4611686018427387904 bytes\) at byte 32: needs 4611686018427387904 bytes")}
  for offset, (value, message) in cases.items():
    bad.write_bytes(good[:offset] + struct.pack("<Q", value) + good[offset + 8:])
    with pytest.raises(ConversionError, match=message):
      read_gguf(bad)
