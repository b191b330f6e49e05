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
                                         ("deepseek_v1", {"moe_layer_freq": 2, "first_k_dense_replace": 0}),
                                         ("qwen3_moe", {"mlp_only_layers": [0], "attention_bias": True}),
                                         ("olmoe", {"clip_qkv": 2.0}), ("granitemoe", {}),
                                         ("granitemoeshared", {"attention_bias": True}),
                                         ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 3,
                                                          "topk_group": 2, "q_lora_rank": 10}),
                                         ("deepseek_v3", {"attention_bias": True, "rope_interleave": False}),
                                         ("glm4_moe", {"use_qk_norm": True, "n_group": 3, "topk_group": 2}),
                                         ("minimax_m2", {}), ("ernie4_5_moe", {"moe_layer_interval": 2}),
                                         ("gpt_oss", {"layer_types": ["full_attention", "sliding_attention",
                                                                      "full_attention"]}),
                                         ("llama4_text", {"interleave_moe_layer_step": 2, "attention_bias": True}),
                                         ("llama4_text", {"rope_parameters": {
                                             "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}}),
                                         ("deepseek_v32", {"first_k_dense_replace": 0}), ("phimoe", {}),
                                         ("qwen3_next", {"mlp_only_layers": [2], "attention_bias": True}),
                                         ("qwen3_5_moe_text", {})])
def test_hf_export_roundtrip(family, over, tmp_path):
  make_checkpoint(family, tmp_path / "a", seed=5, **over)
  info, params = load_hf_checkpoint(tmp_path / "a", progress=False)
  export_hf(info.cfg, params, tmp_path / "b")
  info_b, params_b = load_hf_checkpoint(tmp_path / "b", progress=False)
  assert info_b.cfg == info.cfg
  assert jax.tree.structure(params) == jax.tree.structure(params_b)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(x, y)


NO_SHARED = dict(shared_expert_size=0, shared_expert_gate=False)
# MLA: 4 heads of nope 6 + RoPE 4 (head_dim), v 5, kv latent 12
MLA = dict(shared_expert_gate=False, qkv_bias=False, num_kv_heads=4, head_dim=4, kv_lora_rank=12, qk_nope_head_dim=6,
           v_head_dim=5)


@pytest.mark.parametrize("family,over", [
    ("qwen2_moe", {}),
    ("mixtral", dict(NO_SHARED, norm_topk_prob=True, qkv_bias=False, intermediate_size=0)),
    ("qwen3_moe", dict(NO_SHARED, qk_norm="head", qkv_bias=True, attn_out_bias=True, moe_layers=(False, True))),
    ("olmoe", dict(NO_SHARED, qk_norm="full", qkv_bias=False, num_heads=4, head_dim=8, qkv_clip=0.5,
                   intermediate_size=0)),
    ("granitemoeshared", dict(shared_expert_gate=False, norm_topk_prob=True, qkv_bias=False, intermediate_size=0,
                              embedding_multiplier=4.0, attention_multiplier=0.3, residual_multiplier=0.5,
                              logits_scaling=3.0)),
    ("deepseek_v2", dict(MLA, shared_expert_size=32, routed_scaling_factor=1.7, rope_interleave=True,
                         moe_layers=(False, True))),
    ("deepseek_v3", dict(MLA, shared_expert_size=16, q_lora_rank=6, routed_scaling_factor=2.5, norm_topk_prob=True,
                         norm_topk_eps=1e-20, router_scoring="sigmoid", topk_method="noaux_tc", n_group=2,
                         topk_group=1, router_bias=True, qkv_bias=True, attn_out_bias=True, rope_type="yarn",
                         rope_factor=4.0, yarn_original_max_position=8, yarn_mscale=1.0, yarn_mscale_all_dim=0.8)),
    # GLM-4.5: partial RoPE (4 of 8 dims), q/k norm, q/k/v biases, dense first layer, grouped sigmoid routing
    ("glm4_moe", dict(shared_expert_size=16, shared_expert_gate=False, rotary_dim=4, qk_norm="head",
                      moe_layers=(False, True), routed_scaling_factor=2.5, norm_topk_prob=True, norm_topk_eps=1e-20,
                      router_scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, router_bias=True)),
    ("glm4_moe", dict(shared_expert_size=0, shared_expert_gate=False, router_scoring="sigmoid",
                      topk_method="noaux_tc", router_bias=True)),  # full RoPE: the factor 1.0 stated
    ("minimax_m2", dict(NO_SHARED, rotary_dim=4, qk_norm="full", qkv_bias=False, intermediate_size=0,
                        norm_topk_prob=True, router_scoring="sigmoid", router_bias=True)),
    ("ernie4_5_moe", dict(shared_expert_size=32, shared_expert_gate=False, qkv_bias=False, rope_interleave=True,
                          norm_topk_prob=True, router_bias=True, moe_layers=(False, True))),
    # GPT-OSS: sinks, a window on layer 1, biased clamped-SwiGLU experts, an affine router (random biases)
    ("gpt_oss", dict(NO_SHARED, attn_sinks=True, attn_windows=(0, 3), router_logit_bias=True, expert_bias=True,
                     swiglu_limit=0.6, norm_topk_prob=True, attn_out_bias=True, intermediate_size=0)),
    # Llama-4: a dense first layer, chunks on layer 1, NoPE with the temperature on layer 0, the weightless q/k norm
    ("llama4_text", dict(shared_expert_size=16, shared_expert_gate=False, num_experts_per_tok=1,
                         router_scoring="sigmoid", router_on_input=True, qk_norm="l2", qkv_bias=False,
                         rope_interleave=True, rope_layers=(False, True), attn_chunks=(0, 3), nope_attn_scale=0.5,
                         nope_floor_scale=2.0, moe_layers=(False, True))),
    # DeepSeek-V3.2: V3's architecture with the lightning indexer keeping 3 keys per query
    ("deepseek_v32", dict(MLA, shared_expert_size=16, q_lora_rank=6, norm_topk_prob=True, norm_topk_eps=1e-20,
                          router_scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, router_bias=True,
                          rope_interleave=True, index_topk=3, index_heads=16, index_head_dim=6)),
    # Phi-3.5-MoE: LayerNorms, biases, longrope past its original context, the sparsemixer
    ("phimoe", dict(NO_SHARED, layer_norm=True, lm_head_bias=True, router_scoring="sparsemixer", router_jitter_eps=0.3,
                    qkv_bias=True, attn_out_bias=True, intermediate_size=0, rope_type="longrope",
                    longrope_short_factor=(1.0, 1.5, 2.0, 3.0), longrope_long_factor=(2.0,) * 4,
                    longrope_short_mscale=1.1, longrope_long_mscale=1.3, longrope_original_max_position=8)),
    # Qwen3-Next / Qwen3.5: Gated DeltaNet on layer 0 (2 key heads serving 4 value heads), gated attention with the
    # per-head q/k norm and partial RoPE on layer 1, norms by 1 + w, a gated shared expert
    *((family, dict(shared_expert_size=24, linear_layers=(True, False), linear_k_heads=2, linear_v_heads=4,
                    linear_k_dim=4, linear_v_dim=6, linear_conv_width=3, attn_output_gate=True, norm_unit_offset=True,
                    qk_norm="head", rotary_dim=4, norm_topk_prob=True, qkv_bias=False))
      for family in ("qwen3_next", "qwen3_5_moe_text")),
])
def test_random_bmoe_model_runs_in_transformers(family, over, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM
  over = dict(over, family=family)
  cfg = B.tiny_config(**over)
  params = B.init_params(cfg, jax.random.key(3), std=0.2, bias_std=0.2 if cfg.expert_bias else 0.0)
  params = jax.tree_util.tree_map_with_path(  # q/k norm scales away from 1, so a misplaced one shows
      lambda path, a: a + 0.3 * jnp.sin(jnp.arange(a.size).reshape(a.shape)) if "_norm" in jax.tree_util.keystr(
          path) and "attn'" in jax.tree_util.keystr(path) else a, params)
  if cfg.router_bias:  # a selection bias that changes the choice
    params["layers"][1]["mlp"]["router"]["bias"] = 0.3 * jnp.cos(jnp.arange(cfg.num_experts, dtype=jnp.float32))
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
  cfg = B.tiny_config(**NO_SHARED, family="qwen3_moe")
  with pytest.raises(ConversionError, match="qk_norm='none', the family has head"):
    export_hf(cfg, B.init_params(cfg, jax.random.key(0)), "/nonexistent")
  cfg = B.tiny_config(rotary_dim=4, family="qwen2_moe")
  with pytest.raises(ConversionError, match="partial RoPE \\(rotary_dim; GLM-4.5, MiniMax-M2 only\\)"):
    export_hf(cfg, B.init_params(cfg, jax.random.key(0)), "/nonexistent")
  cfg = B.tiny_config(**NO_SHARED, norm_topk_prob=True, qkv_bias=False, attn_sinks=True, family="mixtral")
  with pytest.raises(ConversionError, match="attention sinks, expert biases.*\\(GPT-OSS only\\)"):
    export_hf(cfg, B.init_params(cfg, jax.random.key(0)), "/nonexistent")
  # the 2025-26 families' mechanisms exist in no other family
  cfg = B.tiny_config(linear_layers=(True, False), linear_k_heads=1, linear_v_heads=2, linear_k_dim=4,
                      linear_v_dim=4, family="qwen2_moe")
  with pytest.raises(ConversionError, match=r"linear attention.*\(Qwen3-Next / Qwen3.5 only\)"):
    export_hf(cfg, B.init_params(cfg, jax.random.key(0)), "/nonexistent")
  cfg = B.tiny_config(**NO_SHARED, norm_topk_prob=True, qkv_bias=False, layer_norm=True, family="mixtral")
  with pytest.raises(ConversionError, match=r"LayerNorms, an LM head bias or longrope RoPE \(Phi-3.5-MoE only\)"):
    export_hf(cfg, B.init_params(cfg, jax.random.key(0)), "/nonexistent")


def test_granite_in_memory_key_layout_loads_the_same(tmp_path):
  """transformers 5's in-memory names (router.weight, experts.gate_up_proj / down_proj) load as the on-disk ones."""
  from convert.safetensors_io import read_header
  from tests.fixtures import assert_same_conversion
  make_checkpoint("granitemoe", tmp_path / "a", seed=2)
  tensors = {k.replace("router.layer.weight", "router.weight").replace("input_linear.weight", "experts.gate_up_proj")
             .replace("output_linear.weight", "experts.down_proj"): r.numpy()
             for k, r in read_header(tmp_path / "a" / "model.safetensors").items()}
  assert any(k.endswith("experts.gate_up_proj") for k in tensors)
  assert_same_conversion(tmp_path / "a", tensors, tmp_path / "b")
