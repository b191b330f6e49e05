"""Tiny random-weight HF checkpoints and their transformers reference outputs (needs torch).

Used by the parity tests and by ``bmoe demo``. DeepSeek-MoE V1 has no transformers class (it is
remote code on the hub), so its reference is transformers' Llama with each MoE layer's MLP swapped for
transformers' DeepSeek-V2 MoE module (greedy softmax top-k, no group limit, scaling 1.0; V1's optional
top-k renormalisation is added around its router). The checkpoint is written in the hub's V1 layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bmoe_jax.files import write_json

FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared", "mixtral", "deepseek_v1", "deepseek_v2",
            "deepseek_v3", "deepseek_v32", "glm4_moe", "minimax_m2", "ernie4_5_moe", "gpt_oss", "llama4_text",
            "qwen3_next", "qwen3_5_moe_text", "phimoe", "llama")

_SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _torch():
  import torch
  return torch


def _qwen(overrides: dict):
  from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
  kw = dict(_SMALL, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1)
  kw.update(overrides)
  return Qwen2MoeForCausalLM(Qwen2MoeConfig(**kw)), None


def _qwen3(overrides: dict):
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  kw = dict(_SMALL, intermediate_size=48, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
            head_dim=12, norm_topk_prob=True)
  kw.update(overrides)
  return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)), None


def _olmoe(overrides: dict):
  from transformers import OlmoeConfig, OlmoeForCausalLM
  kw = dict(_SMALL, intermediate_size=16, num_experts=6, num_experts_per_tok=2)
  kw.update(overrides)
  return OlmoeForCausalLM(OlmoeConfig(**kw)), None


_GRANITE = dict(_SMALL, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, embedding_multiplier=3.0,
                attention_multiplier=0.2, residual_multiplier=0.6, logits_scaling=2.5)


def _granite(overrides: dict):
  from transformers import GraniteMoeConfig, GraniteMoeForCausalLM
  return GraniteMoeForCausalLM(GraniteMoeConfig(**dict(_GRANITE, **overrides))), None


def _granite_shared(overrides: dict):
  from transformers import GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM
  kw = dict(_GRANITE, shared_intermediate_size=24, **overrides)
  return GraniteMoeSharedForCausalLM(GraniteMoeSharedConfig(**kw)), None


def _mixtral(overrides: dict):
  from transformers import MixtralConfig, MixtralForCausalLM
  kw = dict(_SMALL, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
  kw.update(overrides)
  return MixtralForCausalLM(MixtralConfig(**kw)), None


# MLA with distinct widths (nope 8, RoPE 4, v 6, kv latent 12); layer 0 dense; yarn RoPE with both mscales.
_MLA = dict(_SMALL, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=12,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 32})


def _deepseek_v2(overrides: dict):
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
  kw = dict(_MLA, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.0)
  kw.update(overrides)
  return DeepseekV2ForCausalLM(DeepseekV2Config(**kw)), None


def _deepseek_v3(overrides: dict):
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
  kw = dict(_MLA, q_lora_rank=10, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
  kw.update(overrides)
  return DeepseekV3ForCausalLM(DeepseekV3Config(**kw)), None


def _deepseek_v32(overrides: dict):
  """V3's architecture with the lightning indexer: 16 index heads of width 8 keep the 4 best of the visible keys.
  A key whose every index head scores <= 0 scores exactly 0, and a tie at the cut is where torch.topk's choice is
  unspecified: with 4 heads the test batches have such ties, with 16 none."""
  from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
  kw = dict(_MLA, q_lora_rank=10, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
            index_topk=4, index_n_heads=16, index_head_dim=8)
  kw.update(overrides)
  return DeepseekV32ForCausalLM(DeepseekV32Config(**kw)), None


def _glm4_moe(overrides: dict):
  """Partial RoPE over half of head_dim 12 (3 rotated pairs and 3 pairs passed), q/k/v biases, a dense first
  layer, sigmoid routing with selection bias over 2 groups, renormalised and scaled, one shared expert."""
  from transformers import Glm4MoeConfig, Glm4MoeForCausalLM
  kw = dict(_SMALL, head_dim=12, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
            routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True, use_qk_norm=False,
            partial_rotary_factor=0.5)
  kw.update(overrides)
  return Glm4MoeForCausalLM(Glm4MoeConfig(**kw)), None


def _minimax_m2(overrides: dict):
  """Partial RoPE (half of head_dim 12), full-width q/k norms, sigmoid routing with a selection bias."""
  from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM
  kw = dict(_SMALL, head_dim=12, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, bos_token_id=0,
            eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
  kw.update(overrides)
  return MiniMaxM2ForCausalLM(MiniMaxM2Config(**kw)), None


def _ernie4_5_moe(overrides: dict):
  """RoPE on interleaved pairs, a dense first layer, softmax routing with a selection bias, two shared experts."""
  from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
  kw = dict(_SMALL, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=6, moe_k=2,
            moe_num_shared_experts=2, moe_layer_start_index=1, tie_word_embeddings=False)
  kw.update(overrides)
  return Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**kw)), None


def _gpt_oss(overrides: dict):
  """Attention sinks, q/k/v/o biases, sliding window 4 on layers 0 and 2, yarn (not truncated), an affine router
  and biased experts with the clamped SwiGLU (limit 0.5: the tiny model's projections reach past it)."""
  from transformers import GptOssConfig, GptOssForCausalLM
  kw = dict(_SMALL, head_dim=8, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
            swiglu_limit=0.5)
  kw.update(overrides)
  return GptOssForCausalLM(GptOssConfig(**kw)), None


def _llama4_text(overrides: dict):
  """Interleaved RoPE on layers 0 and 1 with chunks of 3 and the weightless q/k norm, NoPE with the attention
  temperature (floor 2) on layer 2; MoE on every layer: a top-1 sigmoid router scaling the expert's input, a shared
  expert."""
  from transformers import Llama4ForCausalLM, Llama4TextConfig
  kw = dict(_SMALL, head_dim=8, intermediate_size=16, intermediate_size_mlp=48, num_local_experts=6,
            no_rope_layer_interval=3, attention_chunk_size=3, floor_scale=2, attn_scale=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4})
  kw.update(overrides)
  return Llama4ForCausalLM(Llama4TextConfig(**kw)), None


# linear attention on layers 0 and 2 (2 key heads of width 8 serving 4 value heads of width 6), gated attention with
# partial RoPE (4 of head_dim 8) on layer 1; MoE with a gated shared expert
_HYBRID = dict(_SMALL, head_dim=8, full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=3, num_experts=6,
               num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})


def _qwen3_next(overrides: dict):
  from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
  return Qwen3NextForCausalLM(Qwen3NextConfig(**dict(_HYBRID, intermediate_size=48, **overrides))), None


def _qwen3_5_moe_text(overrides: dict):
  from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig
  return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**dict(_HYBRID, **overrides))), None


def _phimoe(overrides: dict):
  """LayerNorms, q/k/v/o and LM-head biases, longrope (factors and mscales drawn away from 1; the 11-token test
  batches pass its original context of 8, so the long mscale applies), the sparsemixer with a wide window (0.4:
  several experts share each softmax)."""
  from transformers import PhimoeConfig, PhimoeForCausalLM
  kw = dict(_SMALL, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, attention_bias=True,
            lm_head_bias=True, router_jitter_noise=0.4,
            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.5, 2.0, 3.0],
                             "long_factor": [1.2, 2.0, 4.0, 8.0], "short_mscale": 1.1, "long_mscale": 1.3,
                             "original_max_position_embeddings": 8})
  kw.update(overrides)
  return PhimoeForCausalLM(PhimoeConfig(**kw)), None


def _llama(overrides: dict):
  from transformers import LlamaConfig, LlamaForCausalLM
  kw = dict(_SMALL, intermediate_size=48)
  kw.update(overrides)
  return LlamaForCausalLM(LlamaConfig(**kw)), None


def _deepseek_v1(overrides: dict):
  """Llama + DeepSeek-V2 MoE modules; returns (model, V1 config.json dict)."""
  torch = _torch()
  from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
  v1 = dict(_SMALL, model_type="deepseek", architectures=["DeepseekForCausalLM"], intermediate_size=48,
            moe_intermediate_size=16, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
            aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu", rms_norm_eps=1e-6,
            rope_theta=10000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
            tie_word_embeddings=False, torch_dtype="float32", pretraining_tp=1, use_cache=True,
            bos_token_id=0, eos_token_id=1, initializer_range=0.02,
            auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                      "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"})
  v1.update(overrides)
  llama = LlamaForCausalLM(LlamaConfig(
      vocab_size=v1["vocab_size"], hidden_size=v1["hidden_size"], intermediate_size=v1["intermediate_size"],
      num_hidden_layers=v1["num_hidden_layers"], num_attention_heads=v1["num_attention_heads"],
      num_key_value_heads=v1["num_key_value_heads"], max_position_embeddings=v1["max_position_embeddings"],
      rms_norm_eps=v1["rms_norm_eps"], rope_theta=v1["rope_theta"], attention_bias=v1["attention_bias"],
      tie_word_embeddings=v1["tie_word_embeddings"], hidden_act=v1["hidden_act"]))
  shared = v1["n_shared_experts"] or 0
  moe_cfg = DeepseekV2Config(
      hidden_size=v1["hidden_size"], moe_intermediate_size=v1["moe_intermediate_size"],
      n_routed_experts=v1["n_routed_experts"], n_shared_experts=max(shared, 1),
      num_experts_per_tok=v1["num_experts_per_tok"], topk_method="greedy", n_group=1, topk_group=1,
      routed_scaling_factor=1.0, hidden_act=v1["hidden_act"], norm_topk_prob=v1["norm_topk_prob"],
      experts_implementation="eager")
  for i, layer in enumerate(llama.model.layers):
    if i >= v1["first_k_dense_replace"] and i % v1["moe_layer_freq"] == 0:
      moe = DeepseekV2Moe(moe_cfg)
      if not shared:
        moe.shared_experts = _zero_module()
      if v1["norm_topk_prob"] and v1["num_experts_per_tok"] > 1:
        moe.gate.forward = _renormalised(moe.gate.forward)
      layer.mlp = moe
  return llama, v1


def _zero_module():
  """Stands in for V1's absent shared experts (n_shared_experts null)."""
  torch = _torch()

  class Zero(torch.nn.Module):
    def forward(self, x):
      return torch.zeros_like(x)
  return Zero()


def _renormalised(gate_forward):
  def forward(hidden_states):
    logits, weights, idx = gate_forward(hidden_states)
    return logits, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), idx
  return forward


def randomize_(model, seed: int, std: float = 0.15) -> None:
  """Re-draw every parameter (norm weights around their init: 1, or 0 for Qwen3-Next's norms that scale by 1 + w)
  so routing and logits are far from degenerate."""
  torch = _torch()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * std
      p.copy_(p + noise if "norm" in name else noise)
    for name, b in model.named_buffers():  # DeepSeek-V3's selection bias is a buffer
      if name.endswith("e_score_correction_bias"):
        b.copy_(torch.randn(b.shape, generator=g) * std)


def _v1_state_dict(model) -> dict[str, np.ndarray]:
  """The hub's DeepSeek-MoE V1 key layout (per-expert keys) from the hybrid torch model."""
  out = {}
  for key, t in model.state_dict().items():
    a = t.detach().cpu().numpy()
    if key.endswith("mlp.experts.gate_up_proj"):
      f = a.shape[1] // 2
      for e in range(a.shape[0]):
        out[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = a[e, :f]
        out[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = a[e, f:]
    elif key.endswith("mlp.experts.down_proj"):
      for e in range(a.shape[0]):
        out[key.replace("down_proj", f"{e}.down_proj.weight")] = a[e]
    else:
      out[key] = a
  return out


def make_checkpoint(family: str, out_dir: str | Path, seed: int = 0, std: float = 0.15,
                    **overrides: Any):
  """Write a tiny random HF checkpoint of ``family`` to ``out_dir``; returns the torch reference model."""
  torch = _torch()
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  torch.manual_seed(seed)
  model, v1_config = {"qwen2_moe": _qwen, "qwen3_moe": _qwen3, "olmoe": _olmoe, "granitemoe": _granite,
                        "granitemoeshared": _granite_shared, "mixtral": _mixtral, "deepseek_v1": _deepseek_v1,
                        "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3, "deepseek_v32": _deepseek_v32,
                        "glm4_moe": _glm4_moe,
                        "minimax_m2": _minimax_m2, "ernie4_5_moe": _ernie4_5_moe, "gpt_oss": _gpt_oss,
                        "llama4_text": _llama4_text, "qwen3_next": _qwen3_next, "qwen3_5_moe_text": _qwen3_5_moe_text,
                        "phimoe": _phimoe, "llama": _llama}[family](overrides)
  randomize_(model, seed, std)
  model.eval()
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if v1_config is None:
    model.save_pretrained(out_dir)
  else:
    from convert.safetensors_io import save_file
    save_file(_v1_state_dict(model), out_dir / "model.safetensors")
    write_json(out_dir / "config.json", v1_config)
  return model


def _router_triple(module, out) -> list[np.ndarray]:
  """(logits [n, E], top-k weights [n, k], top-k ids [n, k]) of a router's forward output; Llama-4's router
  returns (scores [n, E], logits [n, E]) instead, read at its top-k."""
  out = [o.detach().numpy() for o in out]
  if len(out) == 2:
    scores, logits = out
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :module.top_k]
    return [logits, np.take_along_axis(scores, idx, -1), idx]
  return out


def reference_outputs(model, tokens: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
  """Logits, per-layer hidden states and each MoE layer's router (logits, top-k weights, top-k ids)."""
  torch = _torch()
  routers = []
  hooks = [m.register_forward_hook(lambda mod, inp, out: routers.append(_router_triple(mod, out)))
           for name, m in model.named_modules()
           if name.endswith(("mlp.gate", "block_sparse_moe.router", "mlp.router", "feed_forward.router"))]
  try:
    with torch.no_grad():
      out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  output_hidden_states=True)
  finally:
    for h in hooks:
      h.remove()
  return {"logits": out.logits.numpy(), "hidden": [h.numpy() for h in out.hidden_states],
          "routers": routers}
