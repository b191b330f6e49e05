"""DeepSeek-MoE V1 has no transformers class: its MoE block is checked against transformers'
DeepSeek-V2 MoE module (greedy softmax top-k, same routing settings) and its attention against Llama's."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bmoe_jax.config import MoEConfig
from bmoe_jax.model import moe_block
from bmoe_jax.nn import layers as L
from bmoe_jax.nn import rope
from convert.reference import randomize_


@pytest.mark.parametrize("shared", [1, 2])
def test_moe_block_matches_deepseek_v2_module(shared):
  from transformers import DeepseekV2Config
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
  d, f, e, k = 16, 8, 5, 2
  hf_cfg = DeepseekV2Config(hidden_size=d, num_attention_heads=2, moe_intermediate_size=f, n_routed_experts=e, n_shared_experts=shared,
                            num_experts_per_tok=k, topk_method="greedy", n_group=1, topk_group=1,
                            routed_scaling_factor=1.0, experts_implementation="eager")
  mod = DeepseekV2Moe(hf_cfg).eval()
  randomize_(mod, seed=shared, std=0.4)
  sd = {n: t.detach().numpy() for n, t in mod.state_dict().items()}
  gu = sd["experts.gate_up_proj"]
  p = {"router": {"kernel": sd["gate.weight"].T},
       "experts": {"w_gate": gu[:, :f].transpose(0, 2, 1), "w_up": gu[:, f:].transpose(0, 2, 1),
                   "w_down": sd["experts.down_proj"].transpose(0, 2, 1)},
       "shared": {n: sd[f"shared_experts.{n[2:]}_proj.weight"].T for n in ("w_gate", "w_up", "w_down")}}
  cfg = MoEConfig(vocab_size=8, hidden_size=d, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                  intermediate_size=0, moe_intermediate_size=f, num_experts=e, num_experts_per_tok=k,
                  moe_layers=(True,), shared_expert_size=f * shared, norm_topk_eps=1e-20)
  x = np.random.RandomState(0).randn(2, 7, d).astype(np.float32)
  with torch.no_grad():
    ref = mod(torch.tensor(x)).numpy()
  for impl in ("dense", "sorted"):
    out, _ = moe_block(p, cfg, jnp.asarray(x), expert_impl=impl)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_matches_llama(bias):
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
  d, h, kv, c, s = 32, 4, 2, 8, 9
  hf_cfg = LlamaConfig(hidden_size=d, num_attention_heads=h, num_key_value_heads=kv, attention_bias=bias,
                       rope_theta=500.0)
  hf_cfg._attn_implementation = "eager"
  attn = LlamaAttention(hf_cfg, layer_idx=0).eval()
  randomize_(attn, seed=1, std=0.3)
  x = np.random.RandomState(1).randn(2, s, d).astype(np.float32)
  pos = np.broadcast_to(np.arange(s), (2, s))
  mask = np.ones((2, s), bool)
  mask[1, 6:] = False
  allowed = np.tril(np.ones((s, s), bool))[None] & mask[:, None, :]
  add_mask = torch.tensor(np.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None], dtype=torch.float32)
  with torch.no_grad():
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(torch.tensor(x), torch.tensor(pos))
    ref, _ = attn(torch.tensor(x), position_embeddings=(cos, sin), attention_mask=add_mask)
  sd = {n: t.detach().numpy() for n, t in attn.state_dict().items()}
  p = {"wq": sd["q_proj.weight"].T.reshape(d, h, c), "wk": sd["k_proj.weight"].T.reshape(d, kv, c),
       "wv": sd["v_proj.weight"].T.reshape(d, kv, c), "wo": sd["o_proj.weight"].T.reshape(h, c, d)}
  if bias:
    p.update(bq=sd["q_proj.bias"].reshape(h, c), bk=sd["k_proj.bias"].reshape(kv, c),
             bv=sd["v_proj.bias"].reshape(kv, c), bo=sd["o_proj.bias"])
  cos_j, sin_j = rope.tables(jnp.asarray(pos), 1.0 / 500.0 ** (np.arange(0, c, 2, dtype=np.float32) / c))
  out = L.attention(p, jnp.asarray(x), cos_j, sin_j, L.attention_mask(jnp.asarray(mask), s))
  np.testing.assert_allclose(np.asarray(out)[mask], ref.numpy()[mask], atol=1e-5)
