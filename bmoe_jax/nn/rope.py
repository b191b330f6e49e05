"""Rotary position embeddings: frequencies (default, linear, yarn, llama3, longrope), cos/sin tables, and the rotation
in the rotate-half or the interleaved-pairs layout.

The frequencies follow transformers' ``modeling_rope_utils`` (``_compute_default_rope_parameters``,
``_compute_linear_scaling_rope_parameters``, ``_compute_yarn_parameters``), in float32 (yarn's in numpy, a
constant of the compiled forward). Shapes in names: b batch, s positions, h heads, c rotary width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg, pos_freqs: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
  factor, base = cfg.rope_factor, cfg.rope_theta
  if cfg.yarn_attention_factor:
    attention = cfg.yarn_attention_factor
  elif cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
    attention = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(factor, cfg.yarn_mscale_all_dim)
  else:
    attention = yarn_mscale(factor)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(cfg.yarn_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.yarn_beta_fast), correction_dim(cfg.yarn_beta_slow)
  if cfg.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extrapolation = (np.float32(1) - ramp).astype(np.float32)
  inv_freq_extra = (np.float32(1) / pos_freqs).astype(np.float32)
  inv_freq_inter = (np.float32(1) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  inv_freq = inv_freq_inter * (np.float32(1) - extrapolation) + inv_freq_extra * extrapolation
  return inv_freq.astype(np.float32), float(attention)


def frequencies(cfg) -> tuple[jax.Array | np.ndarray, float]:
  """(inverse frequencies [c/2] float32, the factor multiplying cos and sin) of a ``MoEConfig``'s RoPE over its
  rotary width: ``rotary_dim`` (partial RoPE), else ``head_dim`` (MLA: the RoPE part of each head). Default and
  linear: computed by XLA inside the forward, the operations the forward always used; yarn: float32 numpy."""
  dim = cfg.rotary_dim or cfg.head_dim
  if cfg.rope_type == "yarn":
    pos_freqs = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    return _yarn(cfg, pos_freqs, dim)
  powers_c = cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  if cfg.rope_type == "longrope":  # the short factors at every length, as transformers' Phi-3.5-MoE computes them
    return 1.0 / (jnp.asarray(cfg.longrope_short_factor, jnp.float32) * powers_c), 1.0
  inv_freq = 1.0 / powers_c
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / cfg.rope_factor
  if cfg.rope_type == "llama3":
    inv_freq = _llama3(cfg, inv_freq)
  return inv_freq, 1.0


def _llama3(cfg, inv_freq):
  """Llama 3's banded scaling: wavelengths above the pre-training context / low_freq_factor are divided by the
  factor, below it / high_freq_factor kept, and interpolated between (transformers' order of operations)."""
  factor, low, high = cfg.rope_factor, cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
  old = cfg.llama3_original_max_position
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return jnp.where(medium, smoothed, scaled)


def tables(positions_bs: jax.Array, inv_freq_c, factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [b, s, c] (each half repeats the c/2 angles), times ``factor`` (yarn's attention factor)."""
  freqs_bsc = positions_bs.astype(jnp.float32)[..., None] * inv_freq_c
  emb = jnp.concatenate([freqs_bsc, freqs_bsc], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  return cos, sin


def position_tables(cfg, positions_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The cos/sin tables [b, s, c] of a ``MoEConfig``'s RoPE at ``positions_bs``: ``tables`` of ``frequencies``; for
  longrope (Phi-3.5-MoE) times ``longrope_long_mscale`` when the batch's largest position + 1 exceeds
  ``longrope_original_max_position``, else ``longrope_short_mscale`` (transformers' PhimoeRotaryEmbedding).

  Args:
    cfg (MoEConfig): the model's config.
    positions_bs: [b, s] integer positions.

  Returns:
    (cos, sin), each float32 [b, s, c].
  """
  cos_bsc, sin_bsc = tables(positions_bs, *frequencies(cfg))
  if cfg.rope_type == "longrope":
    beyond = jnp.max(positions_bs) + 1 > cfg.longrope_original_max_position
    mscale = jnp.where(beyond, cfg.longrope_long_mscale, cfg.longrope_short_mscale).astype(cos_bsc.dtype)
    cos_bsc, sin_bsc = cos_bsc * mscale, sin_bsc * mscale
  return cos_bsc, sin_bsc


def apply(x_bshc: jax.Array, cos_bsc: jax.Array, sin_bsc: jax.Array, interleave: bool = False) -> jax.Array:
  """Rotate ``x`` by the tables. Rotate-half pairs x[i] with x[i + c/2]; ``interleave`` pairs x[2i] with
  x[2i + 1] (DeepSeek's layout) and returns the rotated pairs as [evens, odds], as transformers' DeepSeek-V3 does:
  q and k get the same permutation, so their dot products are those of the interleaved rotation. Tables
  narrower than ``x`` (partial RoPE) rotate its first c dimensions and pass the rest unchanged."""
  c = cos_bsc.shape[-1]
  if c < x_bshc.shape[-1]:
    return jnp.concatenate([apply(x_bshc[..., :c], cos_bsc, sin_bsc, interleave), x_bshc[..., c:]], axis=-1)
  if interleave:
    x_bshc = jnp.concatenate([x_bshc[..., 0::2], x_bshc[..., 1::2]], axis=-1)
  half = x_bshc.shape[-1] // 2
  rotated = jnp.concatenate([-x_bshc[..., half:], x_bshc[..., :half]], axis=-1)
  cos = cos_bsc[:, :, None, :].astype(x_bshc.dtype)
  sin = sin_bsc[:, :, None, :].astype(x_bshc.dtype)
  return x_bshc * cos + rotated * sin


def mla_scale(cfg) -> float:
  """DeepSeek's score scale: (qk_nope_head_dim + head_dim) ** -0.5, times yarn's mscale(factor, mscale_all_dim)
  squared when the RoPE is scaled and mscale_all_dim is set (transformers' yarn_apply_mscale).

  Args:
    cfg: the model's config (``qk_nope_head_dim``, ``head_dim`` = the RoPE part of a query/key head,
      ``rope_type``, ``rope_factor``, ``yarn_mscale_all_dim``).

  Returns:
    The multiplier of MLA's query-key dot products (a Python float); "scaled" means ``rope_type`` is not
      "default".
  """
  scale = (cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
  if cfg.rope_type != "default" and cfg.yarn_mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2
  return scale
