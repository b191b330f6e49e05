"""Flax -> HF export round-trips: our converter reads back identical parameters, and transformers
runs an exported random bmoe_jax model with our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from convert import ConversionError, load_hf_checkpoint
from convert.export import export_hf
from convert.reference import make_checkpoint
from tests.conftest import padded_batch


@pytest.mark.parametrize("family,over", [("qwen2_moe", {"mlp_only_layers": [1]}), ("mixtral", {}),
                                         ("deepseek_v1", {"moe_layer_freq": 2, "first_k_dense_replace": 0})])
def test_hf_export_roundtrip(family, over, tmp_path):
  make_checkpoint(family, tmp_path / "a", seed=5, **over)
  info, params = load_hf_checkpoint(tmp_path / "a", progress=False)
  export_hf(info.cfg, params, tmp_path / "b")
  info_b, params_b = load_hf_checkpoint(tmp_path / "b", progress=False)
  assert info_b.cfg == info.cfg
  assert jax.tree.structure(params) == jax.tree.structure(params_b)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_random_bmoe_model_runs_in_transformers(family, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM
  over = dict(family=family)
  if family == "mixtral":
    over.update(shared_expert_size=0, shared_expert_gate=False, norm_topk_prob=True, qkv_bias=False,
                intermediate_size=0)
  cfg = B.tiny_config(**over)
  params = B.init_params(cfg, jax.random.key(3), std=0.2)
  export_hf(cfg, params, tmp_path)
  hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  tokens, mask = padded_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = B.forward(params, cfg, tokens, mask).logits
  assert np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max() <= 1e-4


def test_unrepresentable_config_is_refused():
  cfg = B.tiny_config(moe_layers=(False, True), family="mixtral")
  with pytest.raises(ConversionError, match="every Mixtral layer is MoE"):
    export_hf(cfg, B.init_params(cfg, jax.random.key(0)), "/nonexistent")
