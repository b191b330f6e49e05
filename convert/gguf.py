"""Reading a dense llama GGUF file (llama.cpp's format) as an HF llama checkpoint: config dict + HF-named
float32 tensors in torch layout (the tokenizer: ``convert.gguf_tokenizer``).

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised to float32 with the ``gguf`` package.
llama.cpp's converter permutes the rows of q_proj/k_proj (rotary halves -> interleaved pairs, per head);
we undo it here, so the tensors equal what transformers' own GGUF loader produces.

Every ``llama.*`` metadata key is either mapped, checked, or refused with a message naming it: a key we
do not understand may change the logits (e.g. a rope scaling), so we never drop it silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ConversionError

# llama.* metadata -> HF LlamaConfig attribute.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}
_CHECKED_KEYS = {"rope.dimension_count", "attention.key_length", "attention.value_length"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_BLOCK_RX = re.compile(r"blk\.(?P<layer>\d+)\.(?P<name>[a-z_]+)\.weight")


def _reader(path: Path):
  try:
    import gguf
  except ImportError as err:  # pragma: no cover - gguf is a dependency
    raise ConversionError(f"{path}: reading GGUF needs the 'gguf' package ({err})") from None
  if not path.is_file():
    raise ConversionError(f"{path}: GGUF file not found")
  from convert.gguf_check import check_gguf_layout

  check_gguf_layout(path)  # a bad file named by its field and byte offset, before the parser indexes into it
  try:
    return gguf, gguf.GGUFReader(str(path))
  except Exception as err:  # the gguf package raises ValueError/struct.error/... on a bad file
    raise ConversionError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def _field(reader, key: str):
  f = reader.fields.get(key)
  return None if f is None else f.contents()


def gguf_config(path: str | Path, reader=None) -> dict[str, Any]:
  """The HF ``config.json`` dict of a dense llama GGUF (``model_type: llama``)."""
  path = Path(path)
  if reader is None:
    _, reader = _reader(path)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ConversionError(f"{path}: general.architecture={arch!r}; only dense 'llama' GGUF files are "
                          "supported")
  cfg: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                         "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
  for key in reader.fields:
    if not key.startswith("llama."):
      continue
    name = key[len("llama."):]
    if name in _CONFIG_KEYS:
      cfg[_CONFIG_KEYS[name]] = _field(reader, key)
    elif name not in _CHECKED_KEYS:
      raise ConversionError(f"{path}: metadata key {key!r} is not handled (handled: "
                            f"{sorted('llama.' + k for k in (*_CONFIG_KEYS, *_CHECKED_KEYS))}); refusing to "
                            "guess its effect on the logits")
  for need in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
    if need not in cfg:
      raise ConversionError(f"{path}: metadata key 'llama.{next(k for k, v in _CONFIG_KEYS.items() if v == need)}' "
                            "is missing")
  cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
  cfg.setdefault("rope_theta", 10000.0)
  cfg.setdefault("rms_norm_eps", 1e-5)
  cfg.setdefault("max_position_embeddings", 2048)
  if "vocab_size" not in cfg:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise ConversionError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    cfg["vocab_size"] = len(tokens.data)
  head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
  for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
    got = _field(reader, key)
    if got is not None and int(got) != head_dim:
      raise ConversionError(f"{path}: {key}={got} differs from hidden_size/head_count={head_dim} "
                            "(partial rotary or a custom head size is not supported)")
  names = {t.name for t in reader.tensors}
  cfg["tie_word_embeddings"] = "output.weight" not in names
  cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.pop("rope_theta"))}
  cfg["rms_norm_eps"] = float(cfg["rms_norm_eps"])
  cfg["torch_dtype"] = "float32"
  for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "vocab_size"):
    cfg[k] = int(cfg[k])
  return cfg


def unpermute_rotary(w_oi: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: per head, interleaved (x0, y0, x1, y1, ...) -> halves."""
  half = w_oi.shape[0] // n_head // 2
  return w_oi.reshape(n_head, half, 2, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def permute_rotary(w_oi: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (halves -> interleaved); the inverse of ``unpermute_rotary``."""
  half = w_oi.shape[0] // n_head // 2
  return w_oi.reshape(n_head, 2, half, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def read_gguf(path: str | Path, progress: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(HF llama config dict, HF-named float32 tensors in torch [out, in] layout) of a dense llama GGUF."""
  from tqdm.auto import tqdm

  path = Path(path)
  gguf, reader = _reader(path)
  cfg = gguf_config(path, reader)
  heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
  out: dict[str, np.ndarray] = {}
  for t in tqdm(reader.tensors, desc=f"read {path.name}", disable=not progress, unit="tensor"):
    m = _BLOCK_RX.fullmatch(t.name)
    if t.name in _TOP:
      key = _TOP[t.name]
    elif m and m["name"] in _BLOCK and int(m["layer"]) < cfg["num_hidden_layers"]:
      key = f"model.layers.{m['layer']}.{_BLOCK[m['name']]}.weight"
    else:
      raise ConversionError(f"{path}: unexpected tensor {t.name!r} for a dense llama (expected token_embd, "
                            "output_norm, output and blk.N.{" + ",".join(_BLOCK) + "}.weight)")
    try:
      a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError as err:
      raise ConversionError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                            f"package cannot dequantise ({err})") from None
    want = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
    if a.shape != want:
      a = a.reshape(want)
    if m and m["name"] in heads:
      a = unpermute_rotary(a, int(heads[m["name"]]))
    out[key] = a
  return cfg, out
