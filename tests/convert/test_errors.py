"""Bad checkpoints get one clear message naming the file, the key and what was expected."""

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from convert import ConversionError, load_hf_checkpoint, parse_hf_config
from convert.reference import make_checkpoint
from tests.fixtures import hf_checkpoint
from convert.safetensors_io import read_header, save_file


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  return hf_checkpoint(tmp_path_factory, "qwen2_moe", seed=1)


def _copy(good, tmp_path):
  d = tmp_path / "ckpt"
  shutil.copytree(good, d)
  return d


def _tensors(d):
  return {k: r.numpy().copy() for k, r in read_header(d / "model.safetensors").items()}


def _edit_config(d, **changes):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(changes)
  (d / "config.json").write_text(json.dumps(cfg))


def _raises(d, *fragments, **kw):
  with pytest.raises(ConversionError) as info:
    load_hf_checkpoint(d, progress=False, **kw)
  msg = str(info.value)
  for f in fragments:
    assert f in msg, msg
  return msg


def test_unknown_model_type(good, tmp_path):
  d = _copy(good, tmp_path)
  _edit_config(d, model_type="mamba2", architectures=["Mamba2ForCausalLM"])
  _raises(d, "config.json", "model_type='mamba2'", "supported")
  _edit_config(d, model_type="gpt_oss")  # a family, but the architectures are another's
  _raises(d, "architectures=['Mamba2ForCausalLM'] is not a causal LM of family gpt_oss")


def test_renamed_families_are_recognised_or_refused_naming_the_family():
  """A re-badged model (Kimi-K2 is DeepSeek-V3) converts as its family, with a warning naming it, by its
  architectures or by a known alias; an alias contradicted by its architectures is refused naming both."""
  from convert.hf_config import parse_hf_config_dict
  raw = {"model_type": "kimi_k2", "num_hidden_layers": 2, "n_routed_experts": 8}
  for archs in (["DeepseekV3ForCausalLM"], None):
    with pytest.warns(UserWarning, match="model_type='kimi_k2' is converted as deepseek_v3"):
      assert parse_hf_config_dict(dict(raw, architectures=archs), "k.json").family == "deepseek_v3"
  with pytest.warns(UserWarning, match="converted as mixtral \\(architectures=\\['MixtralForCausalLM'\\]\\)"):
    parse_hf_config_dict({"model_type": "my_mixtral", "architectures": ["MixtralForCausalLM"]}, "m.json")
  with pytest.raises(ConversionError, match="'kimi_k2' is deepseek_v3's architecture, but architectures"):
    parse_hf_config_dict(dict(raw, architectures=["MixtralForCausalLM"]), "k.json")


def test_attribute_aliases_are_read_and_must_agree(tmp_path):
  """transformers 5 saves Qwen3-MoE's num_experts as num_local_experts (its attribute_map): both names are read;
  both present with different values is refused."""
  from convert.hf_config import parse_hf_config_dict
  raw = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_local_experts": 16}
  assert parse_hf_config_dict(raw, "c.json").cfg.num_experts == 16
  with pytest.raises(ConversionError, match="c.json: num_local_experts=16 and num_experts=8 name the same"):
    parse_hf_config_dict(dict(raw, num_experts=8), "c.json")


def test_unhandled_config_attribute(good, tmp_path):
  d = _copy(good, tmp_path)
  _edit_config(d, moe_router_temperature=0.5)
  _raises(d, "config.json", "moe_router_temperature", "qwen2_moe")


def test_unsupported_rope_and_activation(good, tmp_path):
  d = _copy(good, tmp_path)
  _edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0})
  _raises(d, "rope type 'longrope' is not supported", "yarn", "llama3")
  _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="swish2")
  _raises(d, "hidden_act='swish2'")


def test_partial_rope_is_read_where_the_family_has_it_and_refused_elsewhere():
  """GLM's partial_rotary_factor: from rope_parameters or the attribute (default 0.5), which must agree; a family
  whose attention rotates every dimension refuses it; a factor leaving an odd number of dimensions is refused."""
  from convert.hf_config import parse_hf_config_dict
  glm = {"model_type": "glm4_moe", "num_hidden_layers": 2, "head_dim": 128}
  assert parse_hf_config_dict(glm, "c.json").cfg.rotary_dim == 64  # transformers' default factor 0.5
  rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}
  assert parse_hf_config_dict(dict(glm, rope_parameters=rope), "c.json").cfg.rotary_dim == 32
  assert parse_hf_config_dict(dict(glm, partial_rotary_factor=1.0), "c.json").cfg.rotary_dim == 0
  with pytest.raises(ConversionError, match="partial RoPE factors disagree: rope_parameters' partial_rotary_factor "
                                            "= 0.25, partial_rotary_factor = 0.5"):
    parse_hf_config_dict(dict(glm, rope_parameters=rope, partial_rotary_factor=0.5), "c.json")
  with pytest.raises(ConversionError, match="c.json: partial_rotary_factor=0.3.*even number"):
    parse_hf_config_dict(dict(glm, partial_rotary_factor=0.3, head_dim=10), "c.json")
  with pytest.raises(ConversionError, match="partial_rotary_factor=0.5 is not supported by this family"):
    parse_hf_config_dict({"model_type": "qwen3_moe", "num_hidden_layers": 2, "rope_parameters": dict(
        rope, partial_rotary_factor=0.5)}, "c.json")


def test_minimax_release_keys_must_state_what_transformers_assumes():
  """MiniMax-M2's release keys that transformers never reads are checked: linear-attention layers (MiniMax-01's
  attn_type 0), no routing bias, a shared expert, or rotary_dim against partial_rotary_factor are refused."""
  import json
  from convert.hf_config import parse_hf_config_dict
  raw = json.loads((Path(__file__).parent / "hub_configs" / "minimax-m2.json").read_text())
  assert parse_hf_config_dict(raw, "c.json").cfg.rotary_dim == 64
  for change, msg in ((dict(attn_type_list=[0] + [1] * 61), "attn_type_list=.*linear attention"),
                      (dict(use_routing_bias=False), "use_routing_bias=False is not supported"),
                      (dict(shared_intermediate_size=512), "shared_intermediate_size=512"),
                      (dict(partial_rotary_factor=0.25), "partial_rotary_factor = 0.25, rotary_dim / head_dim = 0.5")):
    with pytest.raises(ConversionError, match=msg):
      parse_hf_config_dict(dict(raw, **change), "c.json")


def _drop(key):
  return lambda t: t.pop(key)


def _put(key, value_fn):
  return lambda t: t.__setitem__(key, value_fn(t))


TENSOR_EDITS = {
    "missing_tensor": (_drop("model.layers.1.mlp.experts.3.down_proj.weight"),
                       ["missing", "layers/1/mlp/experts/w_down experts [3]"]),
    "extra_tensor": (_put("model.layers.0.mlp.mystery.weight", lambda t: np.zeros((2, 2), np.float32)),
                     ["model.safetensors", "unexpected tensor 'model.layers.0.mlp.mystery.weight'"]),
    "expert_index_out_of_range": (_put("model.layers.0.mlp.experts.9.up_proj.weight",
                                       lambda t: t["model.layers.0.mlp.experts.0.up_proj.weight"]),
                                  ["expert 9", "num_experts=6"]),
    "wrong_shape": (_put("model.layers.2.self_attn.q_proj.weight", lambda t: np.zeros((33, 32), np.float32)),
                    ["model.layers.2.self_attn.q_proj.weight", "[33, 32]", "expected [32, 32]"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_bad_tensor_set(case, good, tmp_path):
  edit, fragments = TENSOR_EDITS[case]
  d = _copy(good, tmp_path)
  t = _tensors(d)
  edit(t)
  save_file(t, d / "model.safetensors")
  _raises(d, *fragments)


def test_truncated_file(good, tmp_path):
  d = _copy(good, tmp_path)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  _raises(d, "model.safetensors", "truncated")
  f.write_bytes(b"\x01\x02")
  _raises(d, "not a safetensors file")


def test_no_weights_and_bad_index(good, tmp_path):
  d = _copy(good, tmp_path)
  (d / "model.safetensors").unlink()
  _raises(d, "no *.safetensors")
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
  _raises(d, "shard-1.safetensors", "do not exist")


def test_duplicate_key_across_shards(good, tmp_path):
  d = _copy(good, tmp_path)
  t = _tensors(d)
  save_file({"model.norm.weight": t["model.norm.weight"]}, d / "model-extra.safetensors")
  _raises(d, "model.norm.weight", "also appears")


def test_fp8_without_scales_is_rejected(good, tmp_path):
  d = _copy(good, tmp_path)
  t = _tensors(d)
  key = "model.layers.0.mlp.experts.0.gate_proj.weight"
  t[key] = t[key].astype(ml_dtypes.float8_e4m3fn)
  save_file(t, d / "model.safetensors")
  _raises(d, key, "F8_E4M3", "without dequantisation scales")


def test_fp8_with_block_scales_is_dequantised(good, tmp_path):
  d = _copy(good, tmp_path)
  t = _tensors(d)
  key = "model.layers.0.self_attn.q_proj.weight"  # [32, 32] -> 2 x 2 blocks of 16
  w = t[key]
  scale = np.array([[0.5, 2.0], [1.0, 4.0]], np.float32)
  q = (w / np.repeat(np.repeat(scale, 16, 0), 16, 1)).astype(ml_dtypes.float8_e4m3fn)
  t[key], t[key + "_scale_inv"] = q, scale
  save_file(t, d / "model.safetensors")
  _edit_config(d, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16],
                                       "fmt": "e4m3", "activation_scheme": "dynamic"})
  with pytest.raises(ConversionError, match="quantization_config"):
    _edit_config(d, quantization_config={"quant_method": "gptq"})
    load_hf_checkpoint(d, progress=False)
  _edit_config(d, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]})
  info, params = load_hf_checkpoint(d, progress=False)
  want = q.astype(np.float32) * np.repeat(np.repeat(scale, 16, 0), 16, 1)
  np.testing.assert_array_equal(params["layers"][0]["attn"]["wq"].reshape(32, 32), want.T)


def test_tied_head_must_equal_embedding(good, tmp_path):
  d = _copy(good, tmp_path)
  _edit_config(d, tie_word_embeddings=True)
  _raises(d, "lm_head.weight", "differs")
  t = _tensors(d)
  t["lm_head.weight"] = t["model.embed_tokens.weight"]
  save_file(t, d / "model.safetensors")
  info, params = load_hf_checkpoint(d, progress=False)
  assert "lm_head" not in params


def test_deepseek_dense_or_sigmoid_rejected(tmp_path):
  make_checkpoint("deepseek_v1", tmp_path)
  _edit_config(tmp_path, scoring_func="sigmoid")
  with pytest.raises(ConversionError, match="scoring_func='sigmoid'"):
    parse_hf_config(tmp_path)
  _edit_config(tmp_path, scoring_func="softmax", n_routed_experts=None)
  with pytest.raises(ConversionError, match="dense model"):
    parse_hf_config(tmp_path)


def test_missing_config(tmp_path):
  with pytest.raises(ConversionError, match="config.json: not found"):
    parse_hf_config(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConversionError, match="malformed JSON"):
    parse_hf_config(tmp_path)


def test_config_values_that_would_divide_by_zero(good, tmp_path):
  d = _copy(good, tmp_path)
  _edit_config(d, decoder_sparse_step=0)
  _raises(d, "decoder_sparse_step=0")
  _edit_config(d, decoder_sparse_step=1, rope_parameters={"rope_type": "linear", "rope_theta": 1e4})
  _raises(d, "linear rope scaling needs a 'factor'")


def test_malformed_header_entry(good, tmp_path):
  import struct
  d = _copy(good, tmp_path)
  blob = json.dumps({"x": {"dtype": "F32"}}).encode()
  (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
  _raises(d, "header entry 'x' needs dtype, shape and data_offsets")


def test_tied_head_with_dtype_cast(good, tmp_path):
  d = _copy(good, tmp_path)
  _edit_config(d, tie_word_embeddings=True)
  t = _tensors(d)
  t["lm_head.weight"] = t["model.embed_tokens.weight"]
  save_file(t, d / "model.safetensors")
  info, params = load_hf_checkpoint(d, dtype=ml_dtypes.bfloat16, progress=False)
  assert params["embed"]["embedding"].dtype == ml_dtypes.bfloat16


def test_fp8_dequantised_to_checkpoint_dtype(good, tmp_path):
  """Without --dtype, dequantised fp8 weights take the checkpoint's torch_dtype (one dtype throughout)."""
  d = _copy(good, tmp_path)
  t = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(d).items()}
  key = "model.layers.0.self_attn.q_proj.weight"
  t[key] = t[key].astype(ml_dtypes.float8_e4m3fn)
  t[key + "_scale_inv"] = np.ones((2, 2), np.float32)
  save_file(t, d / "model.safetensors")
  _edit_config(d, torch_dtype="bfloat16", dtype="bfloat16",
               quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]})
  info, params = load_hf_checkpoint(d, progress=False)
  assert params["layers"][0]["attn"]["wq"].dtype == ml_dtypes.bfloat16


def test_deepseek_top1_is_not_renormalised(tmp_path):
  """V1 renormalises top-k only when top_k > 1 (a top-1 gate keeps its softmax probability)."""
  make_checkpoint("deepseek_v1", tmp_path, num_experts_per_tok=1, norm_topk_prob=True)
  assert parse_hf_config(tmp_path).cfg.norm_topk_prob is False
  _edit_config(tmp_path, num_experts_per_tok=None)
  with pytest.raises(ConversionError, match="num_experts_per_tok is missing"):
    parse_hf_config(tmp_path)


def _write_header(f, header: dict, duplicate: str):
  """Rewrite ``f``'s header (same data) listing ``duplicate`` a second time, pointing at the next key's bytes (the
  case where json's last-one-wins silently swaps two experts)."""
  import struct
  raw = f.read_bytes()
  (hlen,) = struct.unpack("<Q", raw[:8])
  keys = list(header)
  other = header[keys[keys.index(duplicate) + 1]]
  blob = json.dumps(header)[:-1] + ", " + json.dumps(duplicate) + ": " + json.dumps(other) + "}"
  f.write_bytes(struct.pack("<Q", len(blob.encode())) + blob.encode() + raw[8 + hlen:])


def _header(f):
  import struct
  raw = f.read_bytes()
  (hlen,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + hlen])


def test_a_key_listed_twice_in_one_header_is_refused(good, tmp_path):
  d = _copy(good, tmp_path)
  f = d / "model.safetensors"
  header = _header(f)
  key = "model.layers.0.mlp.experts.2.down_proj.weight"
  header.pop("__metadata__", None)
  compact = {k: header[k] for k in sorted(header)}
  _write_header(f, compact, duplicate=key)
  _raises(d, "model.safetensors", f"key '{key}' is listed twice")


@pytest.mark.parametrize("field,value", [("shape", ["a", 2]), ("shape", [-1, 4]), ("data_offsets", [8, 4]),
                                         ("data_offsets", [0]), ("shape", [True, 2])])
def test_header_entries_with_bad_numbers_are_refused(good, tmp_path, field, value):
  import struct
  d = _copy(good, tmp_path)
  blob = json.dumps({"x": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8], field: value}}).encode()
  (d / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
  _raises(d, "header entry 'x' needs a shape of non-negative integers")


def test_non_finite_and_integer_weights_are_refused(good, tmp_path):
  d = _copy(good, tmp_path)
  t = _tensors(d)
  key = "model.layers.1.mlp.experts.4.up_proj.weight"
  t[key][3, 5] = np.nan
  t["model.norm.weight"][0] = np.inf
  save_file(t, d / "model.safetensors")
  msg = _raises(d, str(d), f"'{key}' (1 NaN, 0 inf)", "'model.norm.weight' (0 NaN, 1 inf)", "--allow-nonfinite")
  assert "diverged" in msg
  info, params = load_hf_checkpoint(d, progress=False, allow_nonfinite=True)  # explicitly allowed
  assert np.isnan(params["layers"][1]["mlp"]["experts"]["w_up"][4]).sum() == 1
  t = _tensors(good)
  t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
  save_file(t, d / "model.safetensors")
  _raises(d, "'model.norm.weight' has dtype int32; weights must be floating point")


def test_unsupported_or_silently_lost_dtypes_are_refused(good, tmp_path):
  from bmoe_jax.checkpoint import convert_checkpoint, load_model
  import jax

  with pytest.raises(ValueError, match="--dtype int8: parameters must be one of float32, bfloat16"):
    convert_checkpoint(good, tmp_path / "a", dtype="int8", progress=False)
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError, match="--dtype float64 needs JAX's 64-bit mode"):
      convert_checkpoint(good, tmp_path / "b", dtype="float64", progress=False)
  with pytest.raises(ValueError, match="dtype int32: parameters must be one of"):
    load_model(good, dtype="int32")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
