"""RoPE frequencies against transformers' own (default, linear, yarn with every option, llama3), and the interleaved
rotation against the pairwise definition."""

import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.nn import rope
from convert.errors import ConversionError
from convert.hf_config import parse_hf_config_dict

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096}
ROPES = [
    {"rope_type": "default", "rope_theta": 500.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    YARN,
    dict(YARN, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),  # DeepSeek-V2-Lite
    dict(YARN, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    dict(YARN, factor=6.0, attention_factor=0.8, beta_fast=16, beta_slow=2, original_max_position_embeddings=64),
    # llama3 (Llama-3.1 and Llama-4 Scout): every band (scaled, interpolated, kept) at head width 16
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("params", ROPES, ids=[str(i) for i in range(len(ROPES))])
def test_frequencies_equal_transformers(params):
  from transformers import DeepseekV3Config
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  kw = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, qk_rope_head_dim=16,
            n_group=1, topk_group=1, max_position_embeddings=163840)
  hf = DeepseekV3Config(rope_parameters={k: v for k, v in params.items() if v is not None}, **kw)
  raw = {k: v for k, v in hf.to_dict().items() if k not in ("_attn_implementation_autoset",)}
  cfg = parse_hf_config_dict(raw, "config.json").cfg
  kind = params["rope_type"]
  if kind == "default":
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    inv_ref, factor_ref = DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf)
  else:
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS[kind](hf)
  inv, factor = rope.frequencies(cfg)
  np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=2e-7)
  assert factor == pytest.approx(factor_ref, rel=1e-12)


def test_interleaved_rotation_is_the_pairwise_rotation():
  """interleave=True rotates (x[2i], x[2i+1]) by angle_i and returns [evens, odds]; dot products between two
  rotated vectors equal those of the pairwise (complex) rotation."""
  rng = np.random.RandomState(0)
  x = rng.randn(1, 5, 2, 8).astype(np.float32)
  pos = jnp.arange(5)[None]
  inv = 1.0 / 100.0 ** (np.arange(0, 8, 2, dtype=np.float32) / 8)
  cos, sin = rope.tables(pos, inv)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * np.arange(5)[None, :, None, None] * inv)
  ours = np.asarray(rope.apply(jnp.asarray(x), cos, sin, interleave=True))
  np.testing.assert_allclose(ours, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def test_yarn_config_is_validated():
  with pytest.raises(ValueError, match="yarn_original_max_position > 0"):
    B.tiny_config(rope_type="yarn", rope_factor=2.0)
  raw = {"model_type": "deepseek_v3", "num_hidden_layers": 1, "num_key_value_heads": 128,
         "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}
  with pytest.raises(ConversionError, match="config.json: yarn rope scaling needs a 'factor'"):
    parse_hf_config_dict(raw, "config.json")
  raw["rope_scaling"] = dict(raw["rope_scaling"], factor=4.0, mscale_all_dim=1.0, low_freq_factor=1.0)
  with pytest.raises(ConversionError, match=r"rope parameters \['low_freq_factor'\] are not supported"):
    parse_hf_config_dict(raw, "config.json")
