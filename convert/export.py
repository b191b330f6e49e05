"""Flax -> HF: write a parameter tree as an HF checkpoint directory of one of our families (config.json from
``convert.export_config``; safetensors in the family's on-disk key layout), readable by transformers (every family
but DeepSeek-MoE V1, which the hub's remote code reads) and by our own converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bmoe_jax.config import MoEConfig
from bmoe_jax.files import write_json
from convert.builder import flat_specs
from convert import gpt_oss as GO
from convert import llama4 as L4
from convert import qwen3_next as QN
from convert.export_config import hf_config
from convert.safetensors_io import save_file

_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Where each family keeps its MoE pieces on disk.
DISK = {
    "qwen2_moe": dict(block="mlp", proj=_PROJ, shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"),
    "mixtral": dict(block="block_sparse_moe", proj={"gate": "w1", "up": "w3", "down": "w2"}),
    "deepseek_v1": dict(block="mlp", proj=_PROJ, shared="mlp.shared_experts"),
    "qwen3_moe": dict(block="mlp", proj=_PROJ),
    "olmoe": dict(block="mlp", proj=_PROJ),
    # Granite: written per expert here, then fused into input_linear / output_linear (``_granite_layout``)
    "granitemoe": dict(block="block_sparse_moe", proj=_PROJ),
    "granitemoeshared": dict(block="block_sparse_moe", proj=_PROJ, shared="shared_mlp"),
    "deepseek_v2": dict(block="mlp", proj=_PROJ, shared="mlp.shared_experts"),
    "deepseek_v3": dict(block="mlp", proj=_PROJ, shared="mlp.shared_experts"),
    "glm4_moe": dict(block="mlp", proj=_PROJ, shared="mlp.shared_experts"),
    # MiniMax-M2's release layout; its selection bias sits on the MoE block, not on the gate
    "minimax_m2": dict(block="block_sparse_moe", proj={"gate": "w1", "up": "w3", "down": "w2"},
                       bias="block_sparse_moe.e_score_correction_bias"),
    # ERNIE-4.5: the selection bias on the block's statistics module, shaped [1, E]
    "ernie4_5_moe": dict(block="mlp", proj=_PROJ, shared="mlp.shared_experts",
                         bias="mlp.moe_statics.e_score_correction_bias", bias_rows=1),
    # GPT-OSS: an affine router named router; fused, interleaved experts (``convert.gpt_oss.hf_expert_tensors``)
    "gpt_oss": dict(block="mlp", proj=_PROJ, router="mlp.router", logit_bias="mlp.router.bias", fused=GO),
    # Llama-4: everything MLP under feed_forward; fused experts (``convert.llama4.hf_expert_tensors``)
    "llama4_text": dict(block="feed_forward", proj=_PROJ, router="feed_forward.router", shared="feed_forward.shared_expert",
                        dense="feed_forward", fused=L4),
    "deepseek_v32": dict(block="mlp", proj=_PROJ, shared="mlp.shared_experts"),
    "phimoe": dict(block="block_sparse_moe", proj={"gate": "w1", "up": "w3", "down": "w2"}),  # the release's layout
    # Qwen3-Next / Qwen3.5: the gated q_proj and the linear attention written by ``convert.qwen3_next``
    "qwen3_next": dict(block="mlp", proj=_PROJ, shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate",
                       mixer=QN),
    "qwen3_5_moe_text": dict(block="mlp", proj=_PROJ, shared="mlp.shared_expert",
                             shared_gate="mlp.shared_expert_gate", mixer=QN),
}
_MIXER_OWN = {"wq", "wg", "bq", "bg"}  # the attention parameters a family's mixer hook writes itself
# attention parameter -> its HF name under self_attn (MLA's too; norms and biases included)
_ATTN = {"wq": "q_proj.weight", "wk": "k_proj.weight", "wv": "v_proj.weight", "wo": "o_proj.weight",
         "bq": "q_proj.bias", "bk": "k_proj.bias", "bv": "v_proj.bias", "bo": "o_proj.bias",
         "q_norm": "q_norm.weight", "k_norm": "k_norm.weight", "wq_a": "q_a_proj.weight", "bq_a": "q_a_proj.bias",
         "q_a_norm": "q_a_layernorm.weight", "wq_b": "q_b_proj.weight", "wkv_a": "kv_a_proj_with_mqa.weight",
         "bkv_a": "kv_a_proj_with_mqa.bias", "kv_a_norm": "kv_a_layernorm.weight", "wkv_b": "kv_b_proj.weight",
         "sinks": "sinks"}
# DeepSeek-V3.2's indexer parameter -> its HF name under self_attn.indexer
_INDEXER = {"wq": "wq_b.weight", "wk": "wk.weight", "k_norm": "k_norm.weight", "k_norm_bias": "k_norm.bias",
            "w_weights": "weights_proj.weight"}


def _granite_layout(out: dict[str, np.ndarray], cfg: MoEConfig) -> None:
  """Per-expert keys -> Granite's fused on-disk tensors: input_linear [e, 2f, d] (gate rows, then up rows),
  output_linear [e, d, f], router.layer; the shared MLP likewise [2F, d] / [d, F]."""
  def take(key):
    return out.pop(key)
  for i in cfg.moe_layer_ids:
    pre = f"model.layers.{i}.block_sparse_moe."
    out[pre + "router.layer.weight"] = take(pre + "gate.weight")
    per = [{p: take(pre + f"experts.{e}.{p}_proj.weight") for p in ("gate", "up", "down")}
           for e in range(cfg.num_experts)]
    out[pre + "input_linear.weight"] = np.stack([np.concatenate([w["gate"], w["up"]]) for w in per])
    out[pre + "output_linear.weight"] = np.stack([w["down"] for w in per])
    sh = f"model.layers.{i}.shared_mlp."
    if sh + "gate_proj.weight" in out:
      out[sh + "input_linear.weight"] = np.concatenate([take(sh + "gate_proj.weight"), take(sh + "up_proj.weight")])
      out[sh + "output_linear.weight"] = take(sh + "down_proj.weight")


def _linear(a: np.ndarray, in_dims: int = 1) -> np.ndarray:
  """[in..., out...] -> torch [out, in]."""
  return np.ascontiguousarray(a.reshape(int(np.prod(a.shape[:in_dims])), -1).T)


def _layer_tensor(out: dict, disk: dict, parts: list[str], a: np.ndarray) -> None:
  """Write one layer parameter (path ``parts``, value ``a``) under its HF name(s) into ``out``; fused experts are
  written after the loop (``hf_tensors``)."""
  i, group, name = parts[1], parts[2], parts[-1]
  pre = f"model.layers.{i}."
  if group in ("attn_norm", "mlp_norm"):  # the scale, or a LayerNorm's bias (Phi-3.5-MoE)
    norm = "input_layernorm" if group == "attn_norm" else "post_attention_layernorm"
    out[pre + f"{norm}.{'bias' if name == 'bias' else 'weight'}"] = a
  elif group == "linear_attn" or (group == "attn" and "mixer" in disk and name in _MIXER_OWN):
    return  # written by the family's mixer hook (``hf_tensors``)
  elif group == "attn" and parts[3] == "indexer":  # DeepSeek-V3.2
    out[pre + "self_attn.indexer." + _INDEXER[name]] = _linear(a) if name[0] == "w" else a
  elif group == "attn":
    out[pre + "self_attn." + _ATTN[name]] = _linear(a, 2 if name == "wo" else 1) if name[0] == "w" else \
        a.reshape(-1)
  elif len(parts) == 4:  # dense MLP
    out[pre + f"{disk.get('dense', 'mlp')}.{_PROJ[name[2:]]}.weight"] = _linear(a)
  elif parts[3] == "router":
    if name == "kernel":
      out[pre + disk.get("router", f"{disk['block']}.gate") + ".weight"] = _linear(a)
    elif name == "logit_bias":
      out[pre + disk["logit_bias"]] = a
    else:
      out[pre + disk.get("bias", f"{disk['block']}.gate.e_score_correction_bias")] = \
          a.reshape(disk["bias_rows"], -1) if "bias_rows" in disk else a
  elif parts[3] == "experts" and disk.get("fused"):
    return  # written after the loop, all of a layer's experts at once
  elif parts[3] == "experts":
    for e in range(a.shape[0]):
      out[pre + f"{disk['block']}.experts.{e}.{disk['proj'][name[2:]]}.weight"] = _linear(a[e])
  elif parts[3] == "shared":
    out[pre + f"{disk['shared']}.{_PROJ[name[2:]]}.weight"] = _linear(a)
  elif parts[3] == "shared_gate":
    out[pre + f"{disk['shared_gate']}.weight"] = _linear(a)
  else:
    raise AssertionError("/".join(parts))


def hf_tensors(cfg: MoEConfig, params: dict[str, Any], family: str) -> dict[str, np.ndarray]:
  disk = DISK[family]
  flat = {}
  for path in flat_specs(cfg):
    node = params
    for p in path.split("/"):
      node = node[int(p)] if p.isdigit() else node[p]
    flat[path] = np.asarray(node)
  out: dict[str, np.ndarray] = {}
  for path, a in flat.items():
    parts = path.split("/")
    if path == "embed/embedding":
      out["model.embed_tokens.weight"] = a
    elif path in ("final_norm/scale", "final_norm/bias"):
      out["model.norm." + ("bias" if path.endswith("bias") else "weight")] = a
    elif path == "lm_head/kernel":
      out["lm_head.weight"] = _linear(a)
    elif path == "lm_head/bias":  # Phi-3.5-MoE
      out["lm_head.bias"] = a
    else:
      _layer_tensor(out, disk, parts, a)
  if family.startswith("granitemoe"):
    _granite_layout(out, cfg)
  if "mixer" in disk:
    layers = {i: {} for i in range(cfg.num_layers)}
    for path, a in flat.items():
      parts = path.split("/")
      if parts[0] == "layers" and parts[2] in ("attn", "linear_attn"):
        layers[int(parts[1])].setdefault(parts[2], {})[parts[-1]] = a
    for i, layer in layers.items():
      out.update(disk["mixer"].hf_mixer_tensors(cfg, layer, f"model.layers.{i}.", family))
  if disk.get("fused"):
    out.update(disk["fused"].hf_expert_tensors(cfg, lambda i: {n.split("/")[-1]: a for n, a in flat.items()
                                                               if n.startswith(f"layers/{i}/mlp/experts/")}))
  if family == "qwen2_moe" and not cfg.shared_expert_size:
    # transformers always builds a shared expert: write it zero-width (output exactly 0), gate zero.
    d = cfg.hidden_size
    for i in cfg.moe_layer_ids:
      pre = f"model.layers.{i}.{disk['shared']}."
      dtype = out[f"model.layers.{i}.mlp.gate.weight"].dtype
      for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
        out[pre + proj + ".weight"] = np.zeros(shape, dtype)
      out[f"model.layers.{i}.{disk['shared_gate']}.weight"] = np.zeros((1, d), dtype)
  return out


def export_hf(cfg: MoEConfig, params: dict[str, Any], out_dir: str | Path, family: str | None = None) -> Path:
  """Write ``params`` as an HF checkpoint directory of ``family`` (default: the config's own)."""
  family = family or cfg.family
  out_dir = Path(out_dir)
  config = hf_config(cfg, family)
  tensors = hf_tensors(cfg, params, family)
  out_dir.mkdir(parents=True, exist_ok=True)
  save_file(tensors, out_dir / "model.safetensors")
  write_json(out_dir / "config.json", config)
  return out_dir
