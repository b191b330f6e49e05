"""What every family table is made of: key rules and the ``Family`` record (see ``convert.families``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

LAYER = r"model\.layers\.(?P<layer>\d+)\."
GATE_UP_DOWN = r"(?P<proj>gate|up|down)"


class Rule(NamedTuple):
  pattern: str
  target: str | tuple[str, ...] | None
  kind: str
  in_dims: int = 1
  names: dict[str, dict[str, str]] | None = None
  # kind "split": split(array, target shapes, cfg) -> one array per target (a fused tensor's layout, e.g. Qwen3-Next's
  # per-head q|k|v|z projection); raises ValueError naming what it expected
  split: Callable | None = None


BASE_RULES = (
    Rule(r"model\.embed_tokens\.weight", "embed/embedding", "copy"),
    Rule(r"model\.norm\.weight", "final_norm/scale", "copy"),
    Rule(r"lm_head\.weight", "lm_head/kernel", "linear"),
    Rule(LAYER + r"input_layernorm\.weight", "layers/{layer}/attn_norm/scale", "copy"),
    Rule(LAYER + r"post_attention_layernorm\.weight", "layers/{layer}/mlp_norm/scale", "copy"),
    Rule(LAYER + r"self_attn\.(?P<proj>[qkv])_proj\.weight", "layers/{layer}/attn/w{proj}", "linear"),
    Rule(LAYER + r"self_attn\.(?P<proj>[qkvo])_proj\.bias", "layers/{layer}/attn/b{proj}", "copy"),
    Rule(LAYER + r"self_attn\.o_proj\.weight", "layers/{layer}/attn/wo", "linear", in_dims=2),
    Rule(LAYER + r"self_attn\.rotary_emb\.inv_freq", None, "skip"),
    Rule(LAYER + r"self_attn\.(?P<proj>[qk])_norm\.weight", "layers/{layer}/attn/{proj}_norm", "copy"),
)
COMMON_RULES = BASE_RULES + (  # BASE_RULES: embeddings, norms, head and attention; then the dense MLP
    Rule(LAYER + r"mlp\." + GATE_UP_DOWN + r"_proj\.weight", "layers/{layer}/mlp/w_{proj}", "linear"),
)
EXPERTS = "layers/{layer}/mlp/experts/"


def windows(g, n_layers: int, layer_types, size) -> tuple[int, ...] | None:
  """``attn_windows`` of transformers' ``layer_types`` (full_attention: 0, sliding_attention: ``size``); None when
  no layer slides."""
  if layer_types is None:
    return None
  if len(layer_types) != n_layers:
    g.fail(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers={n_layers}")
  out = []
  for i, t in enumerate(layer_types):
    if t == "full_attention":
      out.append(0)
    elif t == "sliding_attention":
      if not size:
        g.fail(f"layer_types[{i}] is sliding_attention but the sliding window is {size!r}")
      out.append(int(size))
    else:
      g.fail(f"layer_types[{i}]={t!r} is not supported (full_attention or sliding_attention)")
  return tuple(out) if any(out) else None


def sparse_layers(g, n: int, n_exp: int) -> tuple[bool, ...]:
  """Qwen's layer pattern: MoE where the layer is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
  step = int(g("decoder_sparse_step"))
  if step < 1:
    g.fail(f"decoder_sparse_step={step} must be >= 1")
  only = set(g("mlp_only_layers") or [])
  return tuple(i not in only and n_exp > 0 and (i + 1) % step == 0 for i in range(n))


def routed_rules(block: str, proj_pattern: str = GATE_UP_DOWN + "_proj",
                  names: dict | None = None) -> tuple[Rule, ...]:
  """Router + per-expert keys (as on disk) + fused keys (transformers 5 in-memory layout)."""
  return (
      Rule(LAYER + block + r"\.gate\.weight", "layers/{layer}/mlp/router/kernel", "linear"),
      Rule(LAYER + block + r"\.experts\.(?P<expert>\d+)\." + proj_pattern + r"\.weight",
           EXPERTS + "w_{proj}", "expert_linear", names=names),
      Rule(LAYER + block + r"\.experts\.gate_up_proj", (EXPERTS + "w_gate", EXPERTS + "w_up"), "fused_gate_up"),
      Rule(LAYER + block + r"\.experts\.down_proj", EXPERTS + "w_down", "fused_down"),
  )


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  architectures: tuple[str, ...]
  handled: frozenset
  ignored: frozenset
  defaults: dict[str, Any]
  build: Callable[[Any, dict], dict]
  rules: tuple[Rule, ...]
  aliases: tuple[tuple[str, str], ...] = ()  # (another name transformers writes, the name the table reads)
  # tensors of layers past num_hidden_layers are not part of the model (DeepSeek-V3's multi-token prediction)
  skip_layers_past_end: bool = False
