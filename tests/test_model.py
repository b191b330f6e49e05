"""Config validation, parameter layout metadata, and the NNX holder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmoe_jax as B
from bmoe_jax.params import ParamSpec


def test_config_validation_messages():
  with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
    B.tiny_config(num_kv_heads=3)
  with pytest.raises(ValueError, match="moe_layers has 1 entries"):
    B.tiny_config(moe_layers=(True,))
  with pytest.raises(ValueError, match="num_experts_per_tok=5"):
    B.tiny_config(num_experts_per_tok=5)
  with pytest.raises(ValueError, match="rope_type='ntk'"):
    B.tiny_config(rope_type="ntk")
  with pytest.raises(ValueError, match="yarn RoPE needs .* yarn_original_max_position > 0"):
    B.tiny_config(rope_type="yarn", rope_factor=4.0)
  with pytest.raises(ValueError, match="head_dim=7 must be even"):
    B.tiny_config(head_dim=7)
  with pytest.raises(ValueError, match=r"latent attention .* \(num_kv_heads = num_heads\)"):
    B.tiny_config(kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=6)
  with pytest.raises(ValueError, match="needs qk_nope_head_dim > 0"):
    B.tiny_config(kv_lora_rank=8, num_kv_heads=4)


def test_config_json_roundtrip():
  cfg = B.tiny_config(attn_windows=(0, 4))
  assert B.MoEConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
  with pytest.raises(ValueError, match="unknown fields"):
    B.MoEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_every_param_has_logical_axes_matching_rank():
  cfg = B.tiny_config(moe_layers=(False, True), attn_out_bias=True)
  specs = jax.tree.leaves(B.param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
  for s in specs:
    assert len(s.axes) == len(s.shape)
  params = B.init_params(cfg, jax.random.key(0))
  axes = B.logical_axes(cfg)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert B.logical_axes(cfg)["layers"][1]["mlp"]["experts"]["w_down"] == ("expert", "mlp", "embed")


def test_nnx_module_holds_params_with_axes():
  cfg = B.tiny_config()
  m = B.MoEModel(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(m, nnx.Param)
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  axes = [v.get_metadata()["logical_axes"] for v in leaves]
  assert ("expert", "embed", "mlp") in axes
  p = m.pure_params()
  assert isinstance(p["layers"], list) and len(p["layers"]) == cfg.num_layers
  toks = jnp.zeros((1, 3), jnp.int32)
  np.testing.assert_array_equal(m(toks).logits, B.forward(p, cfg, toks).logits)
  with pytest.raises(ValueError, match="needs rngs"):
    B.MoEModel(cfg)


def test_count_params():
  cfg = B.tiny_config(shared_expert_size=0, shared_expert_gate=False, tie_word_embeddings=True)
  c = B.count_params(cfg)
  d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
  assert c["routed_experts"] == cfg.num_layers * e * 3 * d * f
  assert c["total"] == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(B.init_params(cfg, jax.random.key(0))))
  assert c["active_per_token"] == c["total"] - c["routed_experts"] // 2


def test_logit_positions_match_full_logits():
  cfg = B.tiny_config()
  params = B.init_params(cfg, jax.random.key(0), std=0.2)
  toks = jax.random.randint(jax.random.key(1), (3, 7), 0, cfg.vocab_size)
  pos = jnp.array([6, 2, 4])
  full = B.forward(params, cfg, toks).logits
  np.testing.assert_allclose(B.forward(params, cfg, toks, logit_positions_b=pos).logits,
                             full[jnp.arange(3), pos], atol=1e-6)
