"""A GGUF file's layout checked before the ``gguf`` package parses it: every count, length and tensor extent
is bounded by the bytes actually there, so a truncated or corrupt file is refused with the field and its byte
offset (``ConversionError``), never an ``IndexError`` from deep inside a parser or an allocation sized by a
corrupt count. The file is read through ``mmap``; nothing larger than one key or tensor name is copied.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, key-value count u64; the
key-value pairs (key string, value type u32, value); the tensor infos (name string, n_dims u32, dims u64 each,
type u32, offset u64); padding to ``general.alignment`` (default 32); the tensor data. A string is a u64 length
and that many bytes; an array is an item type u32, a count u64 and the items.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from convert.errors import ConversionError

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
  def __init__(self, path: Path, buf):
    self.path, self.buf, self.pos = path, buf, 0

  def fail(self, field: str, what: str, at: int | None = None):
    raise ConversionError(f"{self.path}: not a readable GGUF file: {field} at byte {self.pos if at is None else at}: "
                          f"{what} (the file has {len(self.buf)} bytes)")

  def need(self, n: int, field: str):
    if n > len(self.buf) - self.pos:
      self.fail(field, f"needs {n} bytes, only {len(self.buf) - self.pos} remain (truncated or corrupt)")

  def scalar(self, fmt: str, field: str):
    size = struct.calcsize(fmt)
    self.need(size, field)
    value = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += size
    return value

  def string(self, field: str) -> str:
    start = self.pos
    n = self.scalar("<Q", f"{field} length")
    self.need(n, f"{field} ({n} bytes)")
    raw = bytes(self.buf[self.pos:self.pos + min(n, 256)])
    self.pos += n
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      self.fail(field, "not UTF-8", at=start)


def _value(cur: _Cursor, vtype: int, field: str):
  if vtype in _SCALAR:
    return cur.scalar(_SCALAR[vtype], field)
  if vtype == STRING:
    return cur.string(field)
  if vtype != ARRAY:
    cur.fail(field, f"unknown value type {vtype}", at=cur.pos - 4)
  itype = cur.scalar("<I", f"{field} item type")
  count = cur.scalar("<Q", f"{field} item count")
  smallest = 8 if itype == STRING else struct.calcsize(_SCALAR[itype]) if itype in _SCALAR else 12
  if count * smallest > len(cur.buf) - cur.pos:
    cur.fail(f"{field} item count", f"{count} items cannot fit in the {len(cur.buf) - cur.pos} bytes left",
             at=cur.pos - 8)
  if itype in _SCALAR:  # fixed size: skip without reading
    cur.pos += count * struct.calcsize(_SCALAR[itype])
    return None
  for i in range(count):
    _value(cur, itype, f"{field}[{i}]")
  return None


def check_gguf_layout(path: str | Path) -> None:
  """Raise ``ConversionError`` naming the field and byte offset where ``path`` stops being valid GGUF."""
  path = Path(path)
  with open(path, "rb") as f:
    size = f.seek(0, 2)
    if size == 0:
      raise ConversionError(f"{path}: not a readable GGUF file: it is empty")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      _check(_Cursor(path, buf))


def _check(cur: _Cursor) -> None:
  cur.need(4, "magic")
  if bytes(cur.buf[:4]) != b"GGUF":
    cur.fail("magic", f"{bytes(cur.buf[:4])!r}, expected b'GGUF'")
  cur.pos = 4
  version = cur.scalar("<I", "version")
  if version not in (2, 3):
    cur.fail("version", f"{version}, expected 2 or 3", at=4)
  n_tensors = cur.scalar("<Q", "tensor count")
  n_kv = cur.scalar("<Q", "key-value count")
  for count, field, smallest in ((n_tensors, "tensor count", 8 + 4 + 4 + 8), (n_kv, "key-value count", 8 + 4 + 1)):
    if count * smallest > len(cur.buf) - cur.pos:
      cur.fail(field, f"{count} entries cannot fit in the {len(cur.buf) - cur.pos} bytes left",
               at=8 if field == "tensor count" else 16)
  alignment = 32
  for i in range(n_kv):
    key = cur.string(f"key-value {i} key")
    vtype = cur.scalar("<I", f"key {key!r} value type")
    value = _value(cur, vtype, f"key {key!r} value")
    if key == "general.alignment":
      if not isinstance(value, int) or value <= 0 or value & (value - 1):
        cur.fail(f"key {key!r} value", f"{value!r}, expected a power of two")
      alignment = value
  infos = [_tensor_info(cur, i) for i in range(n_tensors)]
  data_start = -(-cur.pos // alignment) * alignment
  for name, nbytes, offset, at in infos:
    if data_start + offset + nbytes > len(cur.buf):
      cur.fail(f"tensor {name!r} data", f"{nbytes} bytes at data offset {offset} end past the file's end "
               "(truncated)", at=at)


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, int, int, int]:
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

  at = cur.pos
  name = cur.string(f"tensor {i} name")
  n_dims = cur.scalar("<I", f"tensor {name!r} dimension count")
  if not 1 <= n_dims <= MAX_DIMS:
    cur.fail(f"tensor {name!r} dimension count", f"{n_dims}, expected 1 to {MAX_DIMS}", at=cur.pos - 4)
  dims = [cur.scalar("<Q", f"tensor {name!r} dimension {d}") for d in range(n_dims)]
  ttype = cur.scalar("<I", f"tensor {name!r} type")
  try:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
  except (ValueError, KeyError):
    cur.fail(f"tensor {name!r} type", f"unknown tensor type {ttype}", at=cur.pos - 4)
  n = 1
  for d in dims:
    n *= d
  if dims[0] % block:
    cur.fail(f"tensor {name!r} dimension 0", f"{dims[0]} is not a multiple of its type's block of {block}")
  offset = cur.scalar("<Q", f"tensor {name!r} data offset")
  return name, n // block * type_size, offset, at
