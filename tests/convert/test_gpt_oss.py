"""GPT-OSS beyond the parity cases: the cases see each new mechanism, the MXFP4 release format dequantises exactly
(against transformers' own dequantiser) and a checkpoint stored in it converts to transformers' logits, and the
config gate refuses what it cannot honour."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from convert import load_hf_checkpoint
from convert import mxfp4 as MX
from convert.errors import ConversionError
from convert.hf_config import parse_hf_config_dict
from convert.reference import make_checkpoint, reference_outputs
from convert.safetensors_io import iter_tensors, save_file
from tests.conftest import padded_batch

TOL = 1e-4


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
  path = tmp_path_factory.mktemp("gpt_oss")
  model = make_checkpoint("gpt_oss", path, seed=0)
  info, params = load_hf_checkpoint(path, progress=False)
  return path, model, info, jax.tree.map(jnp.asarray, params)


def _without(params, cfg, leaf: str, zero: bool = False):
  """params with every layer's ``leaf`` (a/b path inside the layer) zeroed or removed."""
  out = jax.tree.map(lambda a: a, params)
  for i in range(cfg.num_layers):
    *path, name = leaf.split("/")
    node = out["layers"][i]
    for p in path:
      node = node[p]
    if zero:
      node[name] = jnp.zeros_like(node[name])
    else:
      del node[name]
  return out


def test_the_parity_case_sees_sinks_clamp_biases_and_windows(gpt_oss):
  """Dropping the sinks, the clamp, the expert or router biases or the sliding window each moves the logits
  far past the parity tolerance: the parity case tests every mechanism."""
  _, _, info, params = gpt_oss
  cfg = info.cfg
  tokens, mask = padded_batch(cfg.vocab_size)
  real = mask.astype(bool)
  base = np.asarray(B.forward(params, cfg, tokens, mask).logits)
  changes = {
      "sinks": (_without(params, cfg, "attn/sinks"), cfg.replace(attn_sinks=False)),
      "clamp": (params, cfg.replace(swiglu_limit=1e6)),
      "expert biases": (_without(params, cfg, "mlp/experts/b_down", zero=True), cfg),
      "gate/up biases": (_without(params, cfg, "mlp/experts/b_up", zero=True), cfg),
      "router bias": (_without(params, cfg, "mlp/router/logit_bias", zero=True), cfg),
      "window": (params, cfg.replace(attn_windows=None)),
  }
  for name, (p, c) in changes.items():
    moved = np.asarray(B.forward(p, c, tokens, mask).logits)
    assert np.abs(moved - base)[real].max() > 100 * TOL, name


def test_dequantize_equals_transformers():
  import torch
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  rng = np.random.RandomState(0)
  blocks = rng.randint(0, 256, (3, 10, 2, 16)).astype(np.uint8)
  scales = rng.randint(110, 140, (3, 10, 2)).astype(np.uint8)
  want = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
  np.testing.assert_array_equal(MX.dequantize(blocks, scales), want)
  w = rng.randn(2, 64, 6).astype(np.float32)
  grid = MX.dequantize(*MX.quantize(w))
  assert np.abs(grid - w).max() <= np.abs(w).max() / 6 * 0.5 * 2  # half a step of the coarsest scale
  np.testing.assert_array_equal(MX.dequantize(*MX.quantize(grid)), grid)  # on-grid values round-trip exactly
  with pytest.raises(ValueError, match="uint8"):
    MX.dequantize(blocks.astype(np.int32), scales)
  with pytest.raises(ValueError, match="expected blocks"):
    MX.dequantize(blocks[..., :8], scales)


def test_mxfp4_checkpoint_converts_to_transformers_logits(tmp_path):
  """The experts quantised in the release format (blocks + scales on disk, quantization_config mxfp4): the
  conversion equals transformers' model holding the dequantised weights."""
  import torch
  model = make_checkpoint("gpt_oss", tmp_path / "ref", seed=1, intermediate_size=32)  # rows of 32 for the groups
  tensors = {k: r.numpy() for k, r in iter_tensors(tmp_path / "ref").items()}
  state = dict(model.named_parameters())
  for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
    blocks, scales = MX.quantize(tensors.pop(key))
    tensors[key + MX.BLOCKS], tensors[key + MX.SCALES] = blocks, scales
    with torch.no_grad():  # the reference holds exactly what the blocks encode
      state[key].copy_(torch.tensor(MX.dequantize(blocks, scales)))
  (tmp_path / "q").mkdir()
  save_file(tensors, tmp_path / "q" / "model.safetensors")
  config = json.loads((tmp_path / "ref" / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
  (tmp_path / "q" / "config.json").write_text(json.dumps(config))
  info, params = load_hf_checkpoint(tmp_path / "q", dtype=np.float32, progress=False)
  tokens, mask = padded_batch(info.cfg.vocab_size)
  ref = reference_outputs(model, tokens, mask)["logits"]
  out = np.asarray(B.forward(jax.tree.map(jnp.asarray, params), info.cfg, tokens, mask).logits)
  assert np.abs(out - ref)[mask.astype(bool)].max() <= TOL
  key = next(k for k in tensors if k.endswith(MX.SCALES))
  del tensors[key]
  save_file(tensors, tmp_path / "q" / "model.safetensors")
  with pytest.raises(ConversionError, match="has no scales"):
    load_hf_checkpoint(tmp_path / "q", progress=False)


BASE = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 2, "hidden_size": 32,
        "intermediate_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "num_local_experts": 4, "vocab_size": 64}


@pytest.mark.parametrize("change,match", [
    ({"experts_per_token": 2, "num_experts_per_tok": 4}, "experts_per_token=2 disagrees"),
    ({"swiglu_limit": 0.0}, "swiglu_limit"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries"),
    ({"quantization_config": {"quant_method": "awq"}}, "not supported"),
])
def test_config_gate(change, match):
  with pytest.raises(ConversionError, match=match):
    parse_hf_config_dict({**BASE, **change}, "config.json")


def test_bayesian_routers_refuse_an_affine_router(gpt_oss):
  _, _, info, params = gpt_oss
  tokens, mask = padded_batch(info.cfg.vocab_size)
  from bmoe_jax.model import moe_block
  x = jnp.ones((1, 3, info.cfg.hidden_size))
  with pytest.raises(ValueError, match="affine"):
    moe_block(params["layers"][0]["mlp"], info.cfg, x, router=lambda *a: None)
