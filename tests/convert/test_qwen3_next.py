"""Qwen3-Next and Qwen3.5-MoE beyond the parity cases: the cases see each new mechanism, the config gate and the
fused-tensor splits refuse what they cannot honour, and packed continuations are refused on linear attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from convert import load_hf_checkpoint
from convert.errors import ConversionError
from convert.hf_config import parse_hf_config_dict
from convert.reference import make_checkpoint
from convert.safetensors_io import save_file
from tests.conftest import padded_batch

TOL = 1e-4


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
  out = tmp_path_factory.mktemp("qwen3_next")
  make_checkpoint("qwen3_next", out, seed=5)
  info, params = load_hf_checkpoint(out, progress=False)
  return out, info.cfg, jax.tree.map(jnp.asarray, params)


def _without(params, name):
  """``params`` without every attention layer's ``name`` (e.g. the output gate wg)."""
  layers = [{**lp, "attn": {k: v for k, v in lp["attn"].items() if k != name}} if "attn" in lp else lp
            for lp in params["layers"]]
  return {**params, "layers": layers}


def test_the_parity_cases_see_every_mechanism(qwen3_next):
  """Dropping the output gate, the 1 + w norms or the partial RoPE, or reading the linear layers' gated-norm scale
  as 1, each moves the logits far past the parity tolerance."""
  _, cfg, params = qwen3_next
  assert cfg.linear_layers == (True, False, True) and cfg.rotary_dim == 4 and cfg.attn_output_gate
  tokens, mask = padded_batch(cfg.vocab_size)
  real = mask.astype(bool)
  fwd = jax.jit(B.forward, static_argnums=1)
  base = np.asarray(fwd(params, cfg, tokens, mask).logits)
  flat_norm = {**params, "layers": [
      {**lp, "linear_attn": {**lp["linear_attn"], "norm": jnp.ones_like(lp["linear_attn"]["norm"])}}
      if "linear_attn" in lp else lp for lp in params["layers"]]}
  moved = {"output gate": (_without(params, "wg"), cfg), "1 + w norms": (params, cfg.replace(
      norm_unit_offset=False)), "partial RoPE": (params, cfg.replace(rotary_dim=0)), "gated norm": (flat_norm, cfg)}
  for name, (p, c) in moved.items():
    assert np.abs(np.asarray(fwd(p, c, tokens, mask).logits) - base)[real].max() > 100 * TOL, name


def test_packed_continuations_are_refused_on_linear_attention(qwen3_next):
  _, cfg, params = qwen3_next
  tokens = jnp.zeros((1, 6), jnp.int32)
  with pytest.raises(ValueError, match="linear-attention layer"):
    B.forward(params, cfg, tokens, segments_bs=jnp.array([[0, 0, 1, 1, 2, 2]]),
              positions_bs=jnp.array([[0, 1, 2, 3, 2, 3]]))


def test_a_fused_projection_of_the_wrong_layout_names_its_key(qwen3_next, tmp_path):
  """in_proj_qkvz transposed has the right number of elements but not the layout: refused, naming the tensor and
  what its rows should hold."""
  from convert.safetensors_io import iter_tensors
  src, _, _ = qwen3_next
  tensors = {k: ref.numpy() for k, ref in iter_tensors(src).items()}
  key = "model.layers.0.linear_attn.in_proj_qkvz.weight"
  tensors[key] = np.ascontiguousarray(tensors[key].T)
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((src / "config.json").read_text())
  with pytest.raises(ConversionError, match=r"in_proj_qkvz.*per key head: q, k"):
    load_hf_checkpoint(tmp_path, progress=False)


BASE = {"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "num_hidden_layers": 4,
        "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64,
        "num_experts": 4, "num_experts_per_tok": 2, "linear_num_key_heads": 2, "linear_num_value_heads": 4}


def test_the_layer_pattern_follows_transformers():
  cfg = parse_hf_config_dict(BASE, "c.json").cfg
  assert cfg.linear_layers == (True, True, True, False) and cfg.rotary_dim == 2 and cfg.norm_unit_offset
  cfg = parse_hf_config_dict(dict(BASE, full_attention_interval=2, mlp_only_layers=[0]), "c.json").cfg
  assert cfg.linear_layers == (True, False, True, False) and cfg.moe_layers == (False, True, True, True)
  text = dict(BASE, model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"],
              rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                               "mrope_section": [11, 11, 10], "mrope_interleaved": True})
  cfg = parse_hf_config_dict(text, "c.json").cfg
  assert cfg.family == "qwen3_5_moe_text" and cfg.norm_topk_prob and all(cfg.moe_layers) and cfg.rotary_dim == 2


@pytest.mark.parametrize("change,match", [
    ({"model_type": "qwen3_5_moe", "architectures": None}, "multimodal model.*family qwen3_5_moe_text"),
    ({"attn_output_gate": False}, "always gates its output"),
    ({"layer_types": ["linear_attention"] * 3}, "expected 4 entries"),
    ({"layer_types": ["sliding_attention"] * 4}, "each linear_attention or full_attention"),
    ({"linear_num_value_heads": 3}, "multiple of linear_k_heads"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]}},
     r"rope parameters \['mrope_section'\] are not supported"),
])
def test_config_gate(change, match):
  with pytest.raises(ConversionError, match=match):
    parse_hf_config_dict({**BASE, **change}, "config.json")
