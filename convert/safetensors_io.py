"""Reading safetensors directly (header + memory map): bf16/fp8 through ml_dtypes, lazy tensors,
single-file and sharded (``model.safetensors.index.json``) checkpoints, and clear errors for truncated
or malformed files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
import ml_dtypes
import numpy as np

from convert.errors import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FP8 = ("F8_E4M3", "F8_E5M2")
_NAMES = {v: k for k, v in DTYPES.items() if k != "BOOL"}


class TensorRef:
  """A tensor inside a safetensors file, read on demand."""

  def __init__(self, file: Path, key: str, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int):
    self.file, self.key, self.dtype, self.shape = file, key, dtype, shape
    self.offset, self.nbytes = offset, nbytes

  def numpy(self) -> np.ndarray:
    mm = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.nbytes,))
    return np.asarray(mm).view(DTYPES[self.dtype]).reshape(self.shape)


def read_header(file: Path) -> dict[str, TensorRef]:
  file = Path(file)
  size = os.path.getsize(file)
  with open(file, "rb") as fh:
    raw = fh.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{file}: not a safetensors file (only {size} bytes, no header)")
    (hlen,) = struct.unpack("<Q", raw)
    if hlen > size - 8:
      raise ConversionError(f"{file}: truncated or not safetensors (header says {hlen} bytes, "
                            f"file has {size - 8} after the length)")
    try:
      header = json.loads(fh.read(hlen), object_pairs_hook=lambda pairs: _unique(file, pairs))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ConversionError(f"{file}: malformed safetensors header ({err})") from None
  if not isinstance(header, dict):
    raise ConversionError(f"{file}: malformed safetensors header (a JSON object expected, got {type(header).__name__})")
  header.pop("__metadata__", None)
  base = 8 + hlen
  refs = {}
  for key, info in header.items():
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise ConversionError(f"{file}: header entry {key!r} needs dtype, shape and data_offsets; got {info!r}")
    dtype = info.get("dtype")
    if dtype not in DTYPES:
      raise ConversionError(f"{file}: tensor {key!r} has dtype {dtype!r}; supported: {sorted(DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (_ints(shape) and all(x >= 0 for x in shape) and _ints(offsets) and len(offsets) == 2
            and 0 <= offsets[0] <= offsets[1]):
      raise ConversionError(f"{file}: header entry {key!r} needs a shape of non-negative integers and data_offsets "
                            f"[start, end] with 0 <= start <= end; got shape {shape!r}, data_offsets {offsets!r}")
    shape, (start, end) = tuple(shape), offsets
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    if end - start != nbytes:
      raise ConversionError(f"{file}: tensor {key!r} spans {end - start} bytes, expected {nbytes} "
                            f"for {dtype}{list(shape)}")
    if base + end > size:
      raise ConversionError(f"{file}: truncated: tensor {key!r} ends at byte {base + end}, "
                            f"file has {size} bytes")
    refs[key] = TensorRef(file, key, dtype, shape, base + start, nbytes)
  return refs


def _unique(file: Path, pairs: list) -> dict:
  """A JSON object's pairs as a dict, refusing a key listed twice (json keeps the last one silently)."""
  seen = {}
  for k, v in pairs:
    if k in seen:
      raise ConversionError(f"{file}: malformed safetensors header: key {k!r} is listed twice")
    seen[k] = v
  return seen


def _ints(xs) -> bool:
  return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
  ckpt_dir = Path(ckpt_dir)
  index = ckpt_dir / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
      raise ConversionError(f"{index}: malformed index ({err!r}); expected a 'weight_map' object") from None
    files = sorted({ckpt_dir / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise ConversionError(f"{index}: lists shard files that do not exist: {missing}")
    return files
  files = sorted(ckpt_dir.glob("*.safetensors"))
  if not files:
    raise ConversionError(f"{ckpt_dir}: no *.safetensors files and no model.safetensors.index.json "
                          "(only safetensors checkpoints are supported)")
  return files


def iter_tensors(ckpt_dir: Path) -> dict[str, TensorRef]:
  """All tensors of a checkpoint, by key; duplicate keys across shards are an error."""
  refs: dict[str, TensorRef] = {}
  for f in checkpoint_files(ckpt_dir):
    for key, ref in read_header(f).items():
      if key in refs:
        raise ConversionError(f"{f}: tensor {key!r} also appears in {refs[key].file}")
      refs[key] = ref
  return refs


def save_file(tensors: dict[str, np.ndarray], file: Path, metadata: dict[str, str] | None = None) -> None:
  """Write a safetensors file (any dtype in ``DTYPES``, bf16 included)."""
  header: dict = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  arrays = []
  for key in sorted(tensors):
    a = np.ascontiguousarray(tensors[key])
    header[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                   "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(file, "wb") as fh:
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for a in arrays:
      fh.write(a.tobytes())
