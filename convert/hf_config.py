"""The strict HF config gate: every ``config.json`` attribute is handled by the family table or
explicitly ignored (no effect on inference logits); anything else is an error that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from bmoe_jax.config import SUPPORTED_ACTIVATIONS, MoEConfig
from convert.errors import ConversionError

# PretrainedConfig bookkeeping and training-only knobs: they do not change the logits.
GENERIC_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path", "auto_map",
    "torch_dtype", "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
    "return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder",
    "tokenizer_class", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "torchscript", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "prefix", "finetuning_task", "max_length",
})
COMMON_HANDLED = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "quantization_config",
})
_ROPE_KEYS = {"rope_theta", "rope_type", "type", "factor", "partial_rotary_factor"}
_LLAMA3_KEYS = {"original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}
_LONGROPE_KEYS = {"original_max_position_embeddings", "short_factor", "long_factor", "short_mscale", "long_mscale",
                  "attention_factor"}
_YARN_KEYS = {"original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate"}


class CheckpointInfo(NamedTuple):
  family: str
  cfg: MoEConfig
  checkpoint_dtype: str | None  # as recorded in config.json (torch_dtype / dtype)
  fp8_block: tuple[int, int] | None  # block size of fp8 weight_scale_inv dequantisation


# the kind of the common attributes that have no family default (an example value of the kind)
COMMON_KINDS = {"vocab_size": 0, "hidden_size": 0, "num_hidden_layers": 0, "num_attention_heads": 0,
                "num_key_value_heads": 0, "head_dim": 0, "rms_norm_eps": 0.0, "tie_word_embeddings": False,
                "max_position_embeddings": 0, "rope_theta": 0.0, "hidden_act": ""}


def kind_error(value, like) -> str | None:
  """What is wrong with ``value`` for an attribute whose default (or kind) is ``like``; None when it fits.
  null is left to the family (some attributes mean "unset" by it)."""
  if value is None or like is None:
    return None
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(like, bool):
    return None if isinstance(value, bool) else "expected true or false"
  if isinstance(like, int):
    return None if number and float(value).is_integer() else "expected an integer"
  if isinstance(like, float):
    return None if number else "expected a number"
  if isinstance(like, str):
    return None if isinstance(value, str) else "expected a string"
  if isinstance(like, (list, tuple)):
    return None if isinstance(value, (list, tuple)) else "expected a list"
  return None


class Getter:
  """Reads config attributes with the family's HF defaults; only declared attributes may be read, and a value
  of another kind than its default's (a string for an integer, 1 for true) is refused naming it."""

  def __init__(self, raw: dict[str, Any], defaults: dict[str, Any], handled: frozenset, where: str):
    self.raw, self.defaults, self.handled, self.where = raw, defaults, handled, where
    self.last = None  # the attribute read last (named when converting its value fails)

  def __call__(self, name: str):
    assert name in self.handled, f"family table reads undeclared attribute {name}"
    self.last = name
    if name in self.raw:
      value = self.raw[name]
      wrong = kind_error(value, self.defaults.get(name, COMMON_KINDS.get(name)))
      if wrong:
        raise ConversionError(f"{self.where}: attribute {name!r} = {value!r}: {wrong}")
      return value
    if name in self.defaults:
      return self.defaults[name]
    raise ConversionError(f"{self.where}: required attribute {name!r} is missing")

  def fail(self, msg: str):
    raise ConversionError(f"{self.where}: {msg}")


def common_fields(g: Getter) -> dict[str, Any]:
  """Llama-style attention, norms, embeddings and RoPE, shared by every family."""
  heads = int(g("num_attention_heads"))
  kv = g("num_key_value_heads")
  head_dim = g("head_dim")
  act = g("hidden_act")
  if act not in SUPPORTED_ACTIVATIONS:
    g.fail(f"hidden_act={act!r} is not supported (expected one of {SUPPORTED_ACTIVATIONS})")
  out = dict(vocab_size=int(g("vocab_size")), hidden_size=int(g("hidden_size")),
             num_layers=int(g("num_hidden_layers")), num_heads=heads,
             num_kv_heads=int(kv if kv is not None else heads),
             head_dim=int(head_dim if head_dim else g("hidden_size") // heads),
             rms_norm_eps=float(g("rms_norm_eps")), hidden_act=act,
             tie_word_embeddings=bool(g("tie_word_embeddings")),
             max_position_embeddings=int(g("max_position_embeddings")))
  out.update(_rope(g))
  out["rotary_dim"] = _rotary_dim(g, out["head_dim"])
  return out


def _rope(g: Getter) -> dict[str, Any]:
  params = g("rope_parameters")
  if params is None:
    theta, scaling = g("rope_theta"), g("rope_scaling")
  else:
    if not isinstance(params, dict) or "rope_theta" not in params:
      g.fail(f"rope_parameters={params!r}: expected an object with 'rope_theta'")
    theta, scaling = params["rope_theta"], params
  scaling = scaling or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  types = ("default", "linear", "yarn", "llama3") + (("longrope",) if "short_mscale" in g.handled else ())
  if rope_type not in types:
    g.fail(f"rope type {rope_type!r} is not supported by this family (supported: {', '.join(types)})")
  known = _ROPE_KEYS | {"yarn": _YARN_KEYS, "llama3": _LLAMA3_KEYS, "longrope": _LONGROPE_KEYS}.get(rope_type, set())
  if "mrope_section" in g.handled:  # multimodal RoPE sections: plain RoPE on text (its position ids coincide)
    known = known | {"mrope_section", "mrope_interleaved"}
  unknown = sorted(set(scaling) - known)
  if unknown:
    g.fail(f"rope parameters {unknown} are not supported with rope type {rope_type!r} (handled: {sorted(known)})")
  if rope_type in ("linear", "yarn", "llama3") and scaling.get("factor") is None:
    g.fail(f"{rope_type} rope scaling needs a 'factor'")
  out = dict(rope_theta=float(theta), rope_type=rope_type,
             rope_factor=float(scaling["factor"]) if rope_type == "linear" else 1.0)
  if rope_type == "yarn":
    out.update(_yarn(g, scaling))
  if rope_type == "longrope":
    out.update(_longrope(g, scaling))
  if rope_type == "llama3":
    missing = sorted(_LLAMA3_KEYS - set(scaling))
    if missing:
      g.fail(f"llama3 rope scaling needs {missing}")
    out.update(rope_factor=float(scaling["factor"]), llama3_low_freq_factor=float(scaling["low_freq_factor"]),
               llama3_high_freq_factor=float(scaling["high_freq_factor"]),
               llama3_original_max_position=int(scaling["original_max_position_embeddings"]))
  return out


def _rotary_dim(g: Getter, head_dim: int) -> int:
  """Partial RoPE: ``int(head_dim * factor)`` rotated dimensions (0: all). The factor is stated by rope_parameters'
  ``partial_rotary_factor`` or, in a family that handles them, by the ``partial_rotary_factor`` attribute or the
  legacy ``rotary_dim`` (MiniMax-M2: rotary_dim / head_dim); every statement must agree, and with none the family's
  default holds (GLM: 0.5). A family that handles neither refuses any factor but 1 (it rotates every dimension)."""
  params = g("rope_parameters") or g("rope_scaling") or {}
  stated = {"rope_parameters' partial_rotary_factor": params.get("partial_rotary_factor")
            if isinstance(params, dict) else None}
  if "partial_rotary_factor" in g.handled and "partial_rotary_factor" in g.raw:
    stated["partial_rotary_factor"] = g("partial_rotary_factor")
  if "rotary_dim" in g.handled and g.raw.get("rotary_dim") is not None:
    stated["rotary_dim / head_dim"] = int(g("rotary_dim")) / head_dim
  stated = {k: float(v) for k, v in stated.items() if v is not None}
  if len(set(stated.values())) > 1:
    g.fail("the partial RoPE factors disagree: " + ", ".join(f"{k} = {v:g}" for k, v in stated.items()))
  factor = next(iter(stated.values()), None)
  if factor is None and "partial_rotary_factor" in g.handled:
    factor = g("partial_rotary_factor")
  if factor is not None and factor != 1.0 and "partial_rotary_factor" not in g.handled:
    g.fail(f"rope parameter partial_rotary_factor={factor:g} is not supported by this family (it rotates all of "
           "each head)")
  if factor is None or float(factor) == 1.0:
    return 0
  dim = int(head_dim * float(factor))
  if not 0 < float(factor) < 1 or dim % 2:
    g.fail(f"partial_rotary_factor={factor:g}: expected a factor in (0, 1] giving an even number of rotated "
           f"dimensions of head_dim={head_dim} (got {dim})")
  return dim


def _longrope(g: Getter, scaling: dict) -> dict[str, Any]:
  """Phi-3.5-MoE's longrope as transformers' PhimoeRotaryEmbedding runs it: the short factors at every length (its
  forward recomputes the frequencies without the sequence length), the mscales switched by the batch's length;
  long_factor (kept for export) and attention_factor have no effect there."""
  missing = sorted({"short_factor", "long_factor", "short_mscale", "long_mscale",
                    "original_max_position_embeddings"} - set(scaling))
  if missing:
    g.fail(f"longrope rope scaling needs {missing}")
  for name in ("short_factor", "long_factor"):
    if not isinstance(scaling[name], list) or not all(isinstance(v, (int, float)) for v in scaling[name]):
      g.fail(f"rope parameter {name}={scaling[name]!r}: expected a list of numbers")
  if len(scaling["short_factor"]) != len(scaling["long_factor"]):
    g.fail(f"short_factor and long_factor have {len(scaling['short_factor'])} and {len(scaling['long_factor'])} "
           "entries: expected one per rotated pair each")
  return dict(longrope_short_factor=tuple(float(v) for v in scaling["short_factor"]),
              longrope_long_factor=tuple(float(v) for v in scaling["long_factor"]),
              longrope_short_mscale=float(scaling["short_mscale"]), longrope_long_mscale=float(scaling["long_mscale"]),
              longrope_original_max_position=int(scaling["original_max_position_embeddings"]))


def _yarn(g: Getter, scaling: dict) -> dict[str, Any]:
  """transformers' yarn parameters, with its defaults."""
  original = scaling.get("original_max_position_embeddings") or g("max_position_embeddings")
  factor = scaling["factor"]
  attention = scaling.get("attention_factor")
  if attention is not None and not float(attention) > 0:
    g.fail(f"rope parameter attention_factor={attention!r} must be positive (it multiplies cos and sin)")
  # transformers: beta_fast / beta_slow fall back to 32 / 1 when absent or 0; mscale / mscale_all_dim count only
  # when non-zero; truncate defaults to true.
  return dict(rope_factor=float(factor), yarn_original_max_position=int(original),
              yarn_beta_fast=float(scaling.get("beta_fast") or 32), yarn_beta_slow=float(scaling.get("beta_slow") or 1),
              yarn_mscale=float(scaling.get("mscale") or 0),
              yarn_mscale_all_dim=float(scaling.get("mscale_all_dim") or 0),
              yarn_attention_factor=float(attention or 0), yarn_truncate=bool(scaling.get("truncate", True)))


def _fp8_block(raw: dict, where: str) -> tuple[int, int] | None:
  q = raw.get("quantization_config")
  if q is None or q.get("quant_method") == "mxfp4":  # MXFP4: *_blocks + *_scales tensors (convert.mxfp4)
    return None
  if q.get("quant_method") != "fp8" or "weight_block_size" not in q:
    raise ConversionError(f"{where}: quantization_config {q!r} is not supported (only fp8 with "
                          "weight_block_size and weight_scale_inv tensors, or mxfp4 with *_blocks and *_scales)")
  bs = q["weight_block_size"]
  return int(bs[0]), int(bs[1])


def parse_hf_config(path: str | Path) -> CheckpointInfo:
  """Parse a checkpoint's config.json (the file or its directory) into our ``MoEConfig``."""
  path = Path(path)
  file = path / "config.json" if path.is_dir() else path
  if not file.exists():
    raise ConversionError(f"{file}: not found (an HF checkpoint directory holds config.json)")
  try:
    raw = json.loads(file.read_text())
  except json.JSONDecodeError as err:
    raise ConversionError(f"{file}: malformed JSON ({err})") from None
  return parse_hf_config_dict(raw, str(file))


def _canonical_names(raw: dict, aliases, where: str) -> dict:
  """``raw`` with each alias renamed to the name the family table reads (transformers' attribute_map)."""
  raw = dict(raw)
  for alias, name in aliases:
    if alias in raw:
      value = raw.pop(alias)
      if name in raw and raw[name] != value:
        raise ConversionError(f"{where}: {alias}={value!r} and {name}={raw[name]!r} name the same attribute "
                              "with different values")
      raw[name] = value
  return raw


def parse_hf_config_dict(raw: dict[str, Any], where: str) -> CheckpointInfo:
  """``parse_hf_config`` on an already-read config (``where`` names its source in errors)."""
  from convert.families import family_for

  fam = family_for(raw, where)
  raw = _canonical_names(raw, fam.aliases, where)
  handled = COMMON_HANDLED | fam.handled
  unknown = sorted(set(raw) - handled - fam.ignored - GENERIC_IGNORED)
  if unknown:
    raise ConversionError(
        f"{where}: attributes {unknown} are not handled by the {fam.name} converter; refusing to guess "
        "their effect (if one has no effect on inference, add it to the family's ignored list)")
  g = Getter(raw, fam.defaults, handled, where)
  try:
    fields = common_fields(g)
    fields.update(fam.build(g, fields))
  except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as err:
    if isinstance(err, ConversionError):
      raise
    raise ConversionError(f"{where}: attribute {g.last!r} = {raw.get(g.last, '(default)')!r} cannot be used "
                          f"({type(err).__name__}: {err})") from None
  try:
    cfg = MoEConfig(family=fam.name, **fields)
  except ValueError as err:
    raise ConversionError(f"{where}: {err}") from None
  dtype = raw.get("torch_dtype", raw.get("dtype"))
  return CheckpointInfo(fam.name, cfg, dtype, _fp8_block(raw, where))
