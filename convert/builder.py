"""The one shared builder: HF tensors -> our parameter tree, driven by a family's key table.

Every target parameter must be filled exactly once (each expert slot of a stacked parameter too), every
checkpoint tensor must match a rule, and every shape is checked before it is placed. Errors name the
file, the key and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from bmoe_jax.config import MoEConfig
from bmoe_jax.params import ParamSpec, param_specs
from convert import mxfp4 as MX
from convert.errors import ConversionError
from convert.families import FAMILIES, Family
from convert.hf_config import CheckpointInfo, parse_hf_config
from convert.safetensors_io import DTYPES, FP8, TensorRef, iter_tensors

SCALE_SUFFIX = "_scale_inv"
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
DTYPE_NAMES = {"float32": DTYPES["F32"], "bfloat16": DTYPES["BF16"], "float16": DTYPES["F16"]}


def flat_specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
  out = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(
      param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]:
    out["/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)] = spec
  return out


def unflatten(flat: dict[str, Any], cfg: MoEConfig) -> dict[str, Any]:
  tree: dict[str, Any] = {"layers": [dict() for _ in range(cfg.num_layers)]}
  for path, value in flat.items():
    parts = path.split("/")
    node = tree
    if parts[0] == "layers":
      node, parts = tree["layers"][int(parts[1])], parts[2:]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def _dequant_fp8(ref: TensorRef, scale: TensorRef | None, block: tuple[int, int] | None) -> np.ndarray:
  if scale is None or block is None:
    raise ConversionError(f"{ref.file}: tensor {ref.key!r} is {ref.dtype} without dequantisation scales "
                          f"(expected {ref.key + SCALE_SUFFIX!r} and quantization_config.weight_block_size)")
  w = ref.numpy().astype(np.float32)
  s = scale.numpy().astype(np.float32)
  bo, bi = block
  need = (-(-w.shape[0] // bo), -(-w.shape[1] // bi))
  if s.shape != need:
    raise ConversionError(f"{scale.file}: {scale.key!r} has shape {list(s.shape)}, expected {list(need)} "
                          f"for {ref.key} {list(w.shape)} with block {list(block)}")
  full = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)[: w.shape[0], : w.shape[1]]
  return w * full


def _dequant_mxfp4(ref: TensorRef, scale: TensorRef | None) -> np.ndarray:
  stem = ref.key[: -len(MX.BLOCKS)]
  if scale is None:
    raise ConversionError(f"{ref.file}: MXFP4 tensor {ref.key!r} has no scales {stem + MX.SCALES!r}")
  try:
    return MX.dequantize(ref.numpy(), scale.numpy())
  except ValueError as err:
    raise ConversionError(f"{ref.file}: {ref.key!r} / {scale.key!r}: {err}") from None


class MemRef(NamedTuple):
  """An in-memory tensor's name and where it came from (for error messages)."""
  file: str
  key: str


class _Builder:
  def __init__(self, info: CheckpointInfo, fam: Family, dtype, allow_nonfinite: bool = False):
    self.info, self.fam, self.dtype, self.allow_nonfinite = info, fam, dtype, allow_nonfinite
    self.nonfinite: list[str] = []
    self.specs = flat_specs(info.cfg)
    self.out: dict[str, np.ndarray] = {}
    self.filled: dict[str, set] = {}  # stacked expert params: which experts were filled
    self.rules = [(re.compile(r.pattern), r) for r in fam.rules]

  def _spec(self, target: str, ref: TensorRef) -> ParamSpec:
    if target not in self.specs:
      raise ConversionError(f"{ref.file}: tensor {ref.key!r} maps to {target!r}, which this config does not "
                            "have (e.g. expert weights in a dense layer, or a layer index past "
                            f"num_layers={self.info.cfg.num_layers})")
    return self.specs[target]

  def _check(self, ref: TensorRef, got: tuple, want: tuple, note: str = ""):
    if tuple(got) != tuple(want):
      raise ConversionError(f"{ref.file}: tensor {ref.key!r} has shape {list(got)}, expected {list(want)}"
                            f"{note} (config: {self.fam.name})")

  def _dtype(self, a: np.ndarray) -> np.ndarray:
    return a if self.dtype is None else a.astype(self.dtype)

  def _place(self, target: str, value: np.ndarray, ref: TensorRef, expert: int | None = None):
    spec = self._spec(target, ref)
    if expert is None:
      if target in self.out:
        raise ConversionError(f"{ref.file}: tensor {ref.key!r} fills {target!r}, already filled by another key")
      self.out[target] = self._dtype(value)
      self.filled[target] = set(range(spec.shape[0])) if spec.axes[:1] == ("expert",) else {None}
      return
    e = spec.shape[0]
    if expert >= e:
      raise ConversionError(f"{ref.file}: tensor {ref.key!r} is expert {expert}, but the config has "
                            f"num_experts={e}")
    buf = self.out.get(target)
    if buf is None:
      buf = self.out[target] = np.zeros(spec.shape, value.dtype if self.dtype is None else self.dtype)
      self.filled[target] = set()
    if expert in self.filled[target]:
      raise ConversionError(f"{ref.file}: tensor {ref.key!r} fills expert {expert} of {target!r} twice")
    buf[expert] = value
    self.filled[target].add(expert)

  def skipped(self, key: str) -> bool:
    """Whether ``key`` belongs to a layer past num_hidden_layers that the family leaves out (DeepSeek-V3's
    multi-token-prediction modules, as transformers' _keys_to_ignore_on_load_unexpected)."""
    m = self.fam.skip_layers_past_end and _LAYER_INDEX.match(key)
    return bool(m) and int(m.group(1)) >= self.info.cfg.num_layers

  def add(self, ref: TensorRef, array: np.ndarray):
    if self.skipped(ref.key):
      return
    for rx, rule in self.rules:
      m = rx.fullmatch(ref.key)
      if m:
        break
    else:
      raise ConversionError(f"{ref.file}: unexpected tensor {ref.key!r}: no {self.fam.name} parameter "
                            "matches it")
    if rule.kind == "skip":
      return
    if not is_float(array.dtype):
      raise ConversionError(f"{ref.file}: tensor {ref.key!r} has dtype {array.dtype}; weights must be floating "
                            "point (float32, bfloat16, float16, float64 or fp8 with scales)")
    if not self.allow_nonfinite and not np.isfinite(array).all():
      self.nonfinite.append(f"{ref.key!r} ({int(np.isnan(array).sum())} NaN, {int(np.isinf(array).sum())} inf)")
    if "shared" in ref.key and self.info.cfg.shared_expert_size == 0 and (
        array.size == 0 or ref.key.endswith("shared_expert_gate.weight")):
      return  # a zero-width shared expert (transformers saves it so): contributes exactly 0
    groups = {k: (rule.names or {}).get(k, {}).get(v, v) for k, v in m.groupdict().items()}
    targets = (rule.target,) if isinstance(rule.target, str) else rule.target
    self._place_by_kind(rule, [t.format(**groups) for t in targets], groups, array, ref)

  def _place_by_kind(self, rule, targets: list[str], groups: dict, array: np.ndarray, ref: TensorRef):
    """Check ``array`` against its target parameters' shapes and place it there, as the rule's kind lays it out."""
    if rule.kind == "copy":
      spec = self._spec(targets[0], ref)
      self._check(ref, (array.size,), (int(np.prod(spec.shape)),), f" (elements of {list(spec.shape)})")
      self._place(targets[0], array.reshape(spec.shape), ref)
    elif rule.kind == "linear":
      spec = self._spec(targets[0], ref)
      i = rule.in_dims
      self._check(ref, array.shape, (int(np.prod(spec.shape[i:])), int(np.prod(spec.shape[:i]))))
      self._place(targets[0], array.T.reshape(spec.shape), ref)
    elif rule.kind == "expert_linear":
      spec = self._spec(targets[0], ref)
      self._check(ref, array.shape, (spec.shape[2], spec.shape[1]))
      self._place(targets[0], array.T, ref, expert=int(groups["expert"]))
    elif rule.kind == "fused_gate_up":  # [(e,) 2f, d] -> w_gate, w_up [(e,) d, f] (experts, or a dense MLP)
      *lead, d, f = self._spec(targets[0], ref).shape
      self._check(ref, array.shape, (*lead, 2 * f, d))
      self._place(targets[0], np.swapaxes(array[..., :f, :], -1, -2), ref)
      self._place(targets[1], np.swapaxes(array[..., f:, :], -1, -2), ref)
    elif rule.kind in ("interleaved", "halves"):  # [..., 2f]: gate, up alternating (GPT-OSS) or in halves (Llama-4)
      spec = self._spec(targets[0], ref)
      f = spec.shape[-1]
      self._check(ref, array.shape, (*spec.shape[:-1], 2 * f), f" (gate and up {rule.kind})")
      gate, up = (array[..., 0::2], array[..., 1::2]) if rule.kind == "interleaved" else (array[..., :f], array[..., f:])
      self._place(targets[0], gate, ref)
      self._place(targets[1], up, ref)
    elif rule.kind == "split":  # one fused tensor -> several parameters, by the rule's function
      shapes = [self._spec(t, ref).shape for t in targets]
      self._check(ref, (array.size,), (sum(int(np.prod(x)) for x in shapes),), f" elements (for {targets})")
      try:
        parts = rule.split(array, shapes, self.info.cfg)
      except ValueError as err:
        raise ConversionError(f"{ref.file}: tensor {ref.key!r} has shape {list(array.shape)}: {err}") from None
      for target, part in zip(targets, parts):
        self._place(target, part, ref)
    elif rule.kind == "tensor":  # as stored
      self._check(ref, array.shape, self._spec(targets[0], ref).shape)
      self._place(targets[0], array, ref)
    elif rule.kind == "fused_down":  # [(e,) d, f] -> [(e,) f, d]
      *lead, f, d = self._spec(targets[0], ref).shape
      self._check(ref, array.shape, (*lead, d, f))
      self._place(targets[0], np.swapaxes(array, -1, -2), ref)
    else:
      raise AssertionError(rule.kind)

  def finish(self, where: str) -> dict[str, np.ndarray]:
    missing = []
    for target, spec in self.specs.items():
      got = self.filled.get(target)
      if got is None:
        missing.append(target)
      elif spec.axes[:1] == ("expert",) and len(got) != spec.shape[0]:
        missing.append(f"{target} experts {sorted(set(range(spec.shape[0])) - got)}")
    if missing:
      shown = missing[:12] + ([f"... {len(missing) - 12} more"] if len(missing) > 12 else [])
      raise ConversionError(f"{where}: checkpoint is missing tensors for {shown} (family {self.fam.name})")
    if self.nonfinite:
      more = f" and {len(self.nonfinite) - 5} more" if len(self.nonfinite) > 5 else ""
      raise ConversionError(f"{where}: non-finite weights in {', '.join(self.nonfinite[:5])}{more}: the checkpoint "
                            "is corrupt or from a diverged run; pass --allow-nonfinite (allow_nonfinite=True) to "
                            "convert it anyway")
    return self.out


def is_float(dtype) -> bool:
  """Whether a numpy dtype (ml_dtypes' bfloat16 and fp8 included) is floating point."""
  name = np.dtype(dtype).name
  return name.startswith("float") or name == "bfloat16"


def params_from_tensors(info: CheckpointInfo, tensors: dict[str, np.ndarray], where: str, dtype=None,
                        progress: bool = False, allow_nonfinite: bool = False) -> dict[str, Any]:
  """In-memory HF-named tensors (torch layout) -> our params tree, through the family's key table."""
  builder = _Builder(info, FAMILY_BY_NAME[info.family], dtype, allow_nonfinite)
  for key in tqdm(sorted(tensors), desc=f"build {info.family}", disable=not progress, unit="tensor"):
    if key == "lm_head.weight" and info.cfg.tie_word_embeddings:
      continue
    builder.add(MemRef(where, key), np.asarray(tensors[key]))
  return unflatten(builder.finish(where), info.cfg)


def load_hf_checkpoint(ckpt_dir: str | Path, dtype=None, progress: bool = True, allow_nonfinite: bool = False
                       ) -> tuple[CheckpointInfo, dict[str, Any]]:
  """Read an HF MoE checkpoint directory into (info, params tree of numpy arrays).

  Args:
    dtype: None keeps each tensor's stored dtype (bf16 stays bf16; fp8 weights are dequantised to the
      config's torch_dtype); e.g. ``np.float32`` converts everything.
    allow_nonfinite: convert weights holding NaN or inf (refused by default, naming the tensors).
  """
  ckpt_dir = Path(ckpt_dir)
  info = parse_hf_config(ckpt_dir)
  fam = FAMILY_BY_NAME[info.family]
  refs = iter_tensors(ckpt_dir)
  scales = {k[: -len(SCALE_SUFFIX)]: refs.pop(k) for k in [k for k in refs if k.endswith(SCALE_SUFFIX)]}
  mx_scales = {k[: -len(MX.SCALES)]: refs.pop(k) for k in [k for k in refs if k.endswith(MX.SCALES)]
               if k[: -len(MX.SCALES)] + MX.BLOCKS in refs}
  builder = _Builder(info, fam, dtype, allow_nonfinite)
  tied_head = None
  for key, ref in tqdm(sorted(refs.items()), desc=f"convert {fam.name}", disable=not progress,
                       unit="tensor"):
    if builder.skipped(key):
      scales.pop(key, None)
      continue
    if ref.dtype in FP8 or key.endswith(MX.BLOCKS):
      if ref.dtype in FP8:
        array = _dequant_fp8(ref, scales.pop(key, None), info.fp8_block)
      else:
        key = key[: -len(MX.BLOCKS)]
        array, ref = _dequant_mxfp4(ref, mx_scales.pop(key, None)), MemRef(ref.file, key)
      if dtype is None and info.checkpoint_dtype in DTYPE_NAMES:  # one dtype, as transformers loads it
        array = array.astype(DTYPE_NAMES[info.checkpoint_dtype])
    else:
      array = ref.numpy()
    if key == "lm_head.weight" and info.cfg.tie_word_embeddings:
      tied_head = (ref, array)
      continue
    builder.add(ref, array)
  if scales:
    k, ref = next(iter(scales.items()))
    raise ConversionError(f"{ref.file}: scale tensor {ref.key!r} has no fp8 weight {k!r} to dequantise")
  if mx_scales:
    k, ref = next(iter(mx_scales.items()))
    raise ConversionError(f"{ref.file}: MXFP4 scales {ref.key!r} belong to no tensor the model has ({k!r})")
  flat = builder.finish(str(ckpt_dir))
  if tied_head is not None:
    ref, head = tied_head
    if dtype is not None:
      head = head.astype(dtype)  # compare as the embedding was stored
    if not np.array_equal(head, flat["embed/embedding"]):
      raise ConversionError(f"{ref.file}: tie_word_embeddings is true but {ref.key!r} differs from "
                            "model.embed_tokens.weight")
  return info, unflatten(flat, info.cfg)
