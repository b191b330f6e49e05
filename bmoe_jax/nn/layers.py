"""Dense building blocks: RMSNorm, RoPE, grouped-query attention, gated MLP.

Shapes in names: b batch, s query positions, t key positions, d model width, h query heads,
k kv heads, g heads per kv head, c head dim, f MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ACTS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  return _ACTS[name]


def rms_norm(x_bsd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, cast back, then scaled (the HF Llama/Qwen order)."""
  x32 = x_bsd.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale_d * y.astype(x_bsd.dtype)


def rope_tables(positions_bs: jax.Array, head_dim: int, theta: float, rope_type: str = "default",
                factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [b, s, c] for rotate-half RoPE."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if rope_type == "linear":
    inv_freq = inv_freq / factor
  freqs_bsc = positions_bs.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_bsc, freqs_bsc], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bshc: jax.Array, cos_bsc: jax.Array, sin_bsc: jax.Array) -> jax.Array:
  half = x_bshc.shape[-1] // 2
  rotated = jnp.concatenate([-x_bshc[..., half:], x_bshc[..., :half]], axis=-1)
  cos = cos_bsc[:, :, None, :].astype(x_bshc.dtype)
  sin = sin_bsc[:, :, None, :].astype(x_bshc.dtype)
  return x_bshc * cos + rotated * sin


def attention_mask(mask_bt: jax.Array | None, seq_len: int, window: int = 0,
                   segments_bt: jax.Array | None = None, positions_bt: jax.Array | None = None) -> jax.Array:
  """Boolean [b, 1, 1, s, t]: causal (by index), padding from ``mask_bt``, optional sliding window and
  packed segments.

  A key t is visible from query s when t <= s, the key is not padding, and (with a window w > 0)
  s - t < w, the convention of transformers' sliding-window masks. Causality is by index, as in
  transformers; positions only feed RoPE.

  ``segments_bt`` packs several continuations of one shared context into a row (``bmoe_jax.task``):
  segment 0 is the shared context, segment c > 0 one continuation; a query sees the keys of segment 0
  and of its own segment only. Each continuation then computes exactly as if it followed the context
  alone, provided its RoPE positions (``positions_bt``) continue the context's; the window is then
  measured in those positions.
  """
  q = jnp.arange(seq_len)[:, None]
  t = jnp.arange(seq_len)[None, :]
  allowed = (t <= q)[None, None, None]
  if segments_bt is not None:
    seg_q, seg_t = segments_bt[:, None, None, :, None], segments_bt[:, None, None, None, :]
    allowed = allowed & ((seg_t == 0) | (seg_t == seg_q))
  if window > 0:
    if segments_bt is None:
      allowed = allowed & (q - t < window)[None, None, None]
    else:
      allowed = allowed & (positions_bt[:, None, None, :, None] - positions_bt[:, None, None, None, :] < window)
  if mask_bt is not None:
    allowed = allowed & mask_bt.astype(bool)[:, None, None, None, :]
  return allowed


def head_norm(x_bshc: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm of q or k: over the head dim when ``scale`` is [c] (Qwen3-MoE), over heads and head dim together
  when it is [h, c] (OLMoE's full-width norm of the projection)."""
  if scale.ndim == 1:
    return rms_norm(x_bshc, scale, eps)
  b, s, h, c = x_bshc.shape
  return rms_norm(x_bshc.reshape(b, s, h * c), scale.reshape(h * c), eps).reshape(b, s, h, c)


def attention(p: dict, x_bsd: jax.Array, cos_bsc: jax.Array, sin_bsc: jax.Array,
              allowed_b11st: jax.Array, eps: float = 1e-6, clip: float = 0.0, scale: float = 0.0) -> jax.Array:
  """Grouped-query attention with RoPE; softmax in float32.

  p: wq [d, h, c], wk [d, k, c], wv [d, k, c], wo [h, c, d], optional bq [h, c], bk/bv [k, c], bo [d],
  q_norm / k_norm (``head_norm`` scales, RMSNorm with ``eps`` before RoPE). ``clip`` > 0 clamps q, k, v after
  the norms (OLMoE's clip_qkv). ``scale`` > 0 replaces the score scale head_dim ** -0.5 (Granite's
  attention_multiplier).
  """
  q_bshc = jnp.einsum("bsd,dhc->bshc", x_bsd, p["wq"])
  k_bskc = jnp.einsum("bsd,dkc->bskc", x_bsd, p["wk"])
  v_bskc = jnp.einsum("bsd,dkc->bskc", x_bsd, p["wv"])
  if "bq" in p:
    q_bshc = q_bshc + p["bq"]
    k_bskc = k_bskc + p["bk"]
    v_bskc = v_bskc + p["bv"]
  if "q_norm" in p:
    q_bshc = head_norm(q_bshc, p["q_norm"], eps)
    k_bskc = head_norm(k_bskc, p["k_norm"], eps)
  if clip > 0:
    q_bshc, k_bskc, v_bskc = (jnp.clip(a, -clip, clip) for a in (q_bshc, k_bskc, v_bskc))
  q_bshc = apply_rope(q_bshc, cos_bsc, sin_bsc)
  k_bskc = apply_rope(k_bskc, cos_bsc, sin_bsc)
  b, s, h, c = q_bshc.shape
  kv = k_bskc.shape[2]
  q_bskgc = q_bshc.reshape(b, s, kv, h // kv, c)
  scores_bkgst = jnp.einsum("bskgc,btkc->bkgst", q_bskgc, k_bskc).astype(jnp.float32) * (scale or c ** -0.5)
  scores_bkgst = jnp.where(allowed_b11st, scores_bkgst, jnp.finfo(jnp.float32).min)
  probs_bkgst = jax.nn.softmax(scores_bkgst, axis=-1).astype(v_bskc.dtype)
  out_bskgc = jnp.einsum("bkgst,btkc->bskgc", probs_bkgst, v_bskc)
  out_bsd = jnp.einsum("bshc,hcd->bsd", out_bskgc.reshape(b, s, h, c), p["wo"])
  return out_bsd + p["bo"] if "bo" in p else out_bsd


def gated_mlp(p: dict, x_nd: jax.Array, act: str) -> jax.Array:
  """down(act(x W_gate) * (x W_up)); p: w_gate [d, f], w_up [d, f], w_down [f, d]."""
  h_nf = gated_hidden(p, x_nd, act)
  return h_nf @ p["w_down"]


def gated_hidden(p: dict, x_nd: jax.Array, act: str) -> jax.Array:
  """The down_proj input act(x W_gate) * (x W_up)."""
  return activation(act)(x_nd @ p["w_gate"]) * (x_nd @ p["w_up"])
