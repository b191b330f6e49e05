"""Llama-4 text beyond the parity cases: the cases see each new mechanism, and the config gate refuses what it
cannot honour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from convert import load_hf_checkpoint
from convert.errors import ConversionError
from convert.hf_config import parse_hf_config_dict
from convert.reference import make_checkpoint
from tests.conftest import padded_batch

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("over,changes", [
    ({}, {"chunks": dict(attn_chunks=None), "nope": dict(rope_layers=None), "temperature": dict(nope_attn_scale=0.0),
          "q/k norm": dict(qk_norm="none"), "score on the output": dict(router_on_input=False),
          "pairs": dict(rope_interleave=False)}),
    ({"rope_parameters": LLAMA3}, {"llama3": dict(rope_type="default", rope_factor=1.0)}),
])
def test_the_parity_cases_see_every_mechanism(tmp_path, over, changes):
  """Dropping the chunks, the NoPE layer, its temperature, the weightless q/k norm, the input-side router score,
  the interleaved pairs or the llama3 frequencies each moves the logits far past the parity tolerance."""
  make_checkpoint("llama4_text", tmp_path, seed=len(over), **over)
  info, params = load_hf_checkpoint(tmp_path, progress=False)
  cfg, params = info.cfg, jax.tree.map(jnp.asarray, params)
  assert cfg.attn_chunks == (3, 3, 0) and cfg.rope_layers == (True, True, False)
  tokens, mask = padded_batch(cfg.vocab_size)
  real = mask.astype(bool)
  base = np.asarray(B.forward(params, cfg, tokens, mask).logits)
  for name, change in changes.items():
    moved = np.asarray(B.forward(params, cfg.replace(**change), tokens, mask).logits)
    assert np.abs(moved - base)[real].max() > 100 * TOL, name


BASE = {"model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"], "num_hidden_layers": 4, "hidden_size": 32,
        "intermediate_size": 16, "intermediate_size_mlp": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "num_local_experts": 4, "vocab_size": 64}


def test_the_layer_patterns_follow_transformers():
  cfg = parse_hf_config_dict(dict(BASE, interleave_moe_layer_step=2), "c.json").cfg
  assert cfg.moe_layers == (False, True, False, True) and cfg.rope_layers == (True, True, True, False)
  assert cfg.attn_chunks == (8192, 8192, 8192, 0) and cfg.nope_attn_scale == 0.1 and cfg.qk_norm == "l2"
  cfg = parse_hf_config_dict(dict(BASE, moe_layers=[0], attention_chunk_size=None, use_qk_norm=False), "c.json").cfg
  assert cfg.moe_layers == (True, False, False, False) and cfg.attn_chunks == (0, 0, 0, 0) and cfg.qk_norm == "none"


@pytest.mark.parametrize("change,match", [
    ({"num_experts_per_tok": 2}, "supported for top-1"),
    ({"no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries"),
    ({"moe_layers": [7]}, "past num_hidden_layers"),
    ({"layer_types": ["sliding_attention"] * 4}, "expected full_attention or chunked_attention"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3 rope scaling needs"),
])
def test_config_gate(change, match):
  with pytest.raises(ConversionError, match=match):
    parse_hf_config_dict({**BASE, **change}, "config.json")
