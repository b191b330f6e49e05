"""Writing small llama GGUF files with the ``gguf`` package, as llama.cpp's converter does (q/k rows
permuted, dims listed innermost first), from a transformers Llama model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.gguf import permute_rotary, unpermute_rotary

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def gguf_name(hf_key: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if hf_key in top:
    return top[hf_key]
  layer, rest = hf_key[len("model.layers."):].split(".", 1)
  return f"blk.{layer}.{_NAMES[rest[: -len('.weight')]]}.weight"


def write_llama_gguf(model, path: Path, quantize: dict[str, str] | None = None, arch: str = "llama",
                     extra_kv: dict | None = None, extra_tensors: dict | None = None) -> dict[str, np.ndarray]:
  """Write ``model`` (transformers LlamaForCausalLM) as GGUF; returns the tensors as llama.cpp stores
  them after dequantisation (HF names, HF layout) for comparison. ``quantize``: HF key -> 'Q8_0' etc."""
  import gguf

  cfg = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  for k, v in (extra_kv or {}).items():
    w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
  expect = {}
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  if cfg.tie_word_embeddings:
    sd.pop("lm_head.weight", None)
  for key, a in sd.items():
    heads = (cfg.num_attention_heads if key.endswith("q_proj.weight") else
             cfg.num_key_value_heads if key.endswith("k_proj.weight") else None)
    stored = a if heads is None else permute_rotary(a, heads)
    qtype = (quantize or {}).get(key)
    if qtype:
      q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType[qtype])
      w.add_tensor(gguf_name(key), q, raw_dtype=gguf.GGMLQuantizationType[qtype])
      deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype])
      expect[key] = deq if heads is None else unpermute_rotary(deq, heads)
    else:
      w.add_tensor(gguf_name(key), np.ascontiguousarray(stored))
      expect[key] = a
  for name, a in (extra_tensors or {}).items():
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expect
