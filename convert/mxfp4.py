"""MXFP4 (OCP microscaling FP4), the release format of GPT-OSS's expert weights: each group of 32 values along a
row is 16 bytes of E2M1 codes (two per byte, the low nibble first) and one E8M0 scale byte (2^(byte - 127)).

On disk a tensor ``W`` [*lead, R, C] (transformers' in-memory layout, e.g. ``gate_up_proj`` [E, d, 2f]) is stored
as ``W_blocks`` uint8 [*lead, C, R / 32, 16] and ``W_scales`` uint8 [*lead, C, R / 32]: quantised along R after
swapping the last two axes (transformers' ``convert_moe_packed_tensors`` undoes exactly this). Dequantisation is
exact: every E2M1 value times a power of two is representable in float32.
"""

from __future__ import annotations

import numpy as np

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # values per scale
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks, scales) -> np.ndarray:
  """The float32 tensor [*lead, R, C] of ``blocks`` uint8 [*lead, C, G, 16] and ``scales`` uint8 [*lead, C, G]
  (R = 32 G). Raises ``ValueError`` on mismatched shapes or non-uint8 inputs."""
  blocks, scales = np.asarray(blocks), np.asarray(scales)
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
  if blocks.ndim < 3 or blocks.shape[-1] != GROUP // 2 or blocks.shape[:-1] != scales.shape:
    raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)}: expected blocks "
                     f"[..., C, G, {GROUP // 2}] and scales [..., C, G]")
  values = np.empty(blocks.shape[:-1] + (GROUP,), np.float32)
  values[..., 0::2] = E2M1[blocks & 0x0F]
  values[..., 1::2] = E2M1[blocks >> 4]
  values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
  return np.swapaxes(values.reshape(scales.shape[:-1] + (-1,)), -1, -2)


def quantize(w) -> tuple[np.ndarray, np.ndarray]:
  """(blocks, scales) of a float tensor [*lead, R, C] (R a multiple of 32), the inverse layout of ``dequantize``:
  each group's scale is the smallest power of two with |w| / scale <= 6, each value the nearest E2M1 code (ties
  to the lower magnitude). Tensors already on that grid round-trip exactly."""
  w = np.swapaxes(np.asarray(w, np.float32), -1, -2)
  if w.shape[-1] % GROUP:
    raise ValueError(f"MXFP4 quantises groups of {GROUP}: the quantised axis has {w.shape[-1]} values")
  groups = w.reshape(w.shape[:-1] + (-1, GROUP))
  peak = np.abs(groups).max(-1)
  exp = np.where(peak > 0, np.ceil(np.log2(np.maximum(peak, 1e-38) / 6.0)), 0).astype(np.int32)
  exp = np.clip(exp, -127, 127)
  scaled = groups / np.ldexp(1.0, exp)[..., None]
  codes = np.abs(scaled[..., None] - E2M1).argmin(-1).astype(np.uint8)  # first minimum: +0 before -0, lower before
  blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return blocks.astype(np.uint8), (exp + 127).astype(np.uint8)
