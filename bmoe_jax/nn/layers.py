"""Dense building blocks: RMSNorm, grouped-query and multi-head latent attention, gated MLP (RoPE: ``rope``).

Shapes in names: b batch, s query positions, t key positions, d model width, h query heads,
k kv heads, g heads per kv head, c head dim, f MLP width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmoe_jax.nn import rope

_ACTS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


MLA_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm (their RMSNorm default, not rms_norm_eps)


def activation(name: str):
  return _ACTS[name]


class ClampedSwiGLU(NamedTuple):
  """GPT-OSS's expert activation (hashable: a static argument): ``(clip(up, -limit, limit) + 1) * g *
  sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""
  alpha: float
  limit: float


def expert_act(cfg) -> "str | ClampedSwiGLU":
  """The routed experts' gated activation of a config: ``ClampedSwiGLU`` when ``swiglu_limit`` > 0, else the
  name ``hidden_act`` (``act(gate) * up``)."""
  return ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.swiglu_limit > 0 else cfg.hidden_act


def glu(act, a: jax.Array, b: jax.Array) -> jax.Array:
  """The gated hidden of gate pre-activations ``a`` and up projections ``b``: ``act(a) * b`` for an activation
  name, GPT-OSS's clamped form for a ``ClampedSwiGLU``."""
  if isinstance(act, ClampedSwiGLU):
    g = jnp.minimum(a, act.limit)
    return g * jax.nn.sigmoid(act.alpha * g) * (jnp.clip(b, -act.limit, act.limit) + 1)
  return activation(act)(a) * b


def mm(spec: str, *operands) -> jax.Array:
  """``jnp.einsum`` that accumulates in float32. Operands narrower than float32 (bfloat16) are multiplied with
  ``preferred_element_type=float32`` and the product is rounded once to their dtype: what an accelerator's bf16
  GEMM does, and on XLA:CPU the fast path (measured here: a bf16 x bf16 -> f32 dot is ~1.25x faster than
  float32, a bf16-output dot ~1.4x slower). float32 and float64 operands go through ``jnp.einsum`` unchanged."""
  dtype = jnp.result_type(*operands)
  if jnp.finfo(dtype).bits >= 32:
    return jnp.einsum(spec, *operands)
  return jnp.einsum(spec, *operands, preferred_element_type=jnp.float32).astype(dtype)


def dot(x: jax.Array, w_io: jax.Array) -> jax.Array:
  """``x @ w`` over the last axis of ``x``, accumulated in float32 (``mm``)."""
  return mm("...i,io->...o", x, w_io)


def rms_norm(x_bsd: jax.Array, scale_d: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
  """RMSNorm computed in float32, cast back, then scaled (the HF Llama/Qwen order); ``unit_offset``: scaled by
  ``1 + scale`` in float32, then cast (Qwen3-Next's zero-centred norms)."""
  x32 = x_bsd.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if unit_offset:
    return (y * (1.0 + jnp.asarray(scale_d, jnp.float32))).astype(x_bsd.dtype)
  return scale_d * y.astype(x_bsd.dtype)


def block_norm(p: dict, x_bsd: jax.Array, cfg) -> jax.Array:
  """A decoder block's (or the final) norm: LayerNorm with bias when ``p`` has one (``cfg.layer_norm``, Phi-3.5-MoE),
  else RMSNorm (by 1 + scale with ``cfg.norm_unit_offset``); epsilon ``cfg.rms_norm_eps``."""
  if "bias" in p:
    return layer_norm(x_bsd, p["scale"], p["bias"], cfg.rms_norm_eps)
  return rms_norm(x_bsd, p["scale"], cfg.rms_norm_eps, cfg.norm_unit_offset)


def attention_mask(mask_bt: jax.Array | None, seq_len: int, window: int = 0,
                   segments_bt: jax.Array | None = None, positions_bt: jax.Array | None = None,
                   chunk: int = 0) -> jax.Array:
  """Boolean [b, 1, 1, s, t]: causal (by index), padding from ``mask_bt``, optional sliding window, chunks and
  packed segments.

  A key t is visible from query s when t <= s, the key is not padding, and (with a window w > 0)
  s - t < w, the convention of transformers' sliding-window masks; with a chunk size C > 0 (Llama-4) both lie
  in the same chunk of C positions, counted from the row's first real token (transformers' chunked mask).
  Causality is by index, as in transformers; positions only feed RoPE.

  ``segments_bt`` packs several continuations of one shared context into a row (``bmoe_jax.task``):
  segment 0 is the shared context, segment c > 0 one continuation; a query sees the keys of segment 0
  and of its own segment only. Each continuation then computes exactly as if it followed the context
  alone, provided its RoPE positions (``positions_bt``) continue the context's; the window and the chunks are
  then measured in those positions.
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
  if chunk > 0:
    if segments_bt is None:
      lead_b = 0 if mask_bt is None else jnp.sum(jnp.cumsum(mask_bt, -1) == 0, -1)
      at_bt = jnp.arange(seq_len)[None] - jnp.reshape(lead_b, (-1, 1))
    else:
      at_bt = positions_bt
    id_bt = jnp.floor_divide(at_bt, chunk)
    allowed = allowed & (id_bt[:, None, None, :, None] == id_bt[:, None, None, None, :])
  if mask_bt is not None:
    allowed = allowed & mask_bt.astype(bool)[:, None, None, None, :]
  return allowed


def mask_key(cfg, i: int):
  """What layer ``i``'s mask depends on: "linear" (a linear-attention layer reads the [b, s] padding mask), else
  its (sliding window, chunk)."""
  return "linear" if cfg.linear_on(i) else (cfg.window(i), cfg.chunk(i))


def layer_mask(mask_bs, seq_len: int, segments_bs, positions_bs, key):
  """The mask of ``mask_key``: the padding mask itself for "linear", else ``nn.layers.attention_mask``."""
  if key == "linear":
    return mask_bs
  return attention_mask(mask_bs, seq_len, key[0], segments_bt=segments_bs, positions_bt=positions_bs, chunk=key[1])


def head_norm(x_bshc: jax.Array, scale: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
  """RMSNorm of q or k: over the head dim when ``scale`` is [c] (Qwen3-MoE), over heads and head dim together
  when it is [h, c] (OLMoE's full-width norm of the projection); ``unit_offset`` as ``rms_norm``."""
  if scale.ndim == 1:
    return rms_norm(x_bshc, scale, eps, unit_offset)
  b, s, h, c = x_bshc.shape
  return rms_norm(x_bshc.reshape(b, s, h * c), scale.reshape(h * c), eps).reshape(b, s, h, c)


def attention(p: dict, x_bsd: jax.Array, cos_bsc: jax.Array | None, sin_bsc: jax.Array | None,
              allowed_b11st: jax.Array, eps: float = 1e-6, clip: float = 0.0, scale: float = 0.0,
              interleave: bool = False, l2_norm: bool = False, q_scale_bs: jax.Array | None = None,
              norm_offset: bool = False) -> jax.Array:
  """Grouped-query attention with RoPE; softmax in float32.

  p: wq [d, h, c], wk [d, k, c], wv [d, k, c], wo [h, c, d], optional bq [h, c], bk/bv [k, c], bo [d],
  q_norm / k_norm (``head_norm`` scales, RMSNorm with ``eps`` before RoPE; by 1 + scale with ``norm_offset``),
  sinks [h] (``attend``), an output gate wg [d, h, c] (bg [h, c]): sigmoid(x wg + bg) multiplies each head's
  output before wo (Qwen3-Next).
  ``clip`` > 0 clamps q, k, v after the norms (OLMoE's clip_qkv). ``scale`` > 0 replaces the score scale
  head_dim ** -0.5 (Granite's attention_multiplier). ``interleave``: RoPE rotates interleaved pairs (ERNIE-4.5)
  instead of halves; tables narrower than the heads rotate only their first dimensions (partial RoPE,
  ``rope.apply``); ``cos_bsc`` None: no RoPE (a NoPE layer). ``l2_norm``: a weightless RMSNorm (``eps``) of each q
  and k head after RoPE (Llama-4). ``q_scale_bs`` [b, s]: multiplies the queries last (Llama-4's NoPE temperature).
  """
  q_bshc = mm("bsd,dhc->bshc", x_bsd, p["wq"])
  k_bskc = mm("bsd,dkc->bskc", x_bsd, p["wk"])
  v_bskc = mm("bsd,dkc->bskc", x_bsd, p["wv"])
  if "bq" in p:
    q_bshc = q_bshc + p["bq"]
    k_bskc = k_bskc + p["bk"]
    v_bskc = v_bskc + p["bv"]
  if "q_norm" in p:
    q_bshc = head_norm(q_bshc, p["q_norm"], eps, norm_offset)
    k_bskc = head_norm(k_bskc, p["k_norm"], eps, norm_offset)
  if clip > 0:
    q_bshc, k_bskc, v_bskc = (jnp.clip(a, -clip, clip) for a in (q_bshc, k_bskc, v_bskc))
  if cos_bsc is not None:
    q_bshc = rope.apply(q_bshc, cos_bsc, sin_bsc, interleave)
    k_bskc = rope.apply(k_bskc, cos_bsc, sin_bsc, interleave)
  if l2_norm:
    q_bshc, k_bskc = rms_norm(q_bshc, 1.0, eps), rms_norm(k_bskc, 1.0, eps)
  if q_scale_bs is not None:
    q_bshc = (q_bshc * q_scale_bs[:, :, None, None]).astype(q_bshc.dtype)
  out_bshc = attend(q_bshc, k_bskc, v_bskc, allowed_b11st, scale or q_bshc.shape[-1] ** -0.5, p.get("sinks"))
  if "wg" in p:
    gate_bshc = mm("bsd,dhc->bshc", x_bsd, p["wg"])
    out_bshc = out_bshc * jax.nn.sigmoid(gate_bshc + p["bg"] if "bg" in p else gate_bshc)
  return output_projection(p, out_bshc)


def attend(q_bshc: jax.Array, k_bskc: jax.Array, v_bskv: jax.Array, allowed_b11st: jax.Array,
           scale: float, sinks_h: jax.Array | None = None) -> jax.Array:
  """softmax(scale q k^T) v per head, heads grouped over the kv heads; scores and softmax in float32.
  v's width (v) may differ from q/k's (c): multi-head latent attention. ``sinks_h`` [h]: each head's learned sink
  logit joins every query's softmax as one more key with no value (GPT-OSS), so the weights may sum to less
  than one. Returns [b, s, h, v]."""
  b, s, h, c = q_bshc.shape
  kv = k_bskc.shape[2]
  q_bskgc = q_bshc.reshape(b, s, kv, h // kv, c)
  scores_bkgst = mm("bskgc,btkc->bkgst", q_bskgc, k_bskc).astype(jnp.float32) * scale
  scores_bkgst = jnp.where(allowed_b11st, scores_bkgst, jnp.finfo(jnp.float32).min)
  if sinks_h is None:
    probs_bkgst = jax.nn.softmax(scores_bkgst, axis=-1).astype(v_bskv.dtype)
  else:
    sink_bkgs1 = jnp.broadcast_to(sinks_h.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1),
                                  scores_bkgst.shape[:-1] + (1,))
    probs_bkgst = jax.nn.softmax(jnp.concatenate([scores_bkgst, sink_bkgs1], -1), axis=-1)[..., :-1]
    probs_bkgst = probs_bkgst.astype(v_bskv.dtype)
  out_bskgv = mm("bkgst,btkv->bskgv", probs_bkgst, v_bskv)
  return out_bskgv.reshape(b, s, h, -1)


def output_projection(p: dict, out_bshv: jax.Array) -> jax.Array:
  """The heads' outputs through wo [h, v, d] (plus bo [d])."""
  out_bsd = mm("bshv,hvd->bsd", out_bshv, p["wo"])
  return out_bsd + p["bo"] if "bo" in p else out_bsd


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis (mean and variance in float32), then ``* scale + bias``, in ``x``'s dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def index_selection(p: dict, x_bsd: jax.Array, q_bsq: jax.Array, cos_bsc: jax.Array, sin_bsc: jax.Array,
                    allowed_b11st: jax.Array, topk: int) -> jax.Array:
  """DeepSeek-V3.2's lightning indexer: which keys each query attends to (DeepSeek Sparse Attention).

  Scores ``sum_i w_i(x_s) relu(q_i(s) . k(t) / sqrt(c))`` over the index heads i, where q_i comes from the query
  latent ``q_bsq`` and the one key k from the input, each rotated (rotate-half) on its first ``head_dim`` dims, k
  LayerNorm'd (eps 1e-6); the weights ``w = x W / sqrt(heads)``. Of the keys ``allowed_b11st`` lets a query see, it
  keeps the ``topk`` best (ties: the earlier key, as ``lax.top_k``); with fewer, all of them. The selection is
  piecewise constant: no derivative flows through it (transformers computes it under no_grad).

  Args:
    p: the indexer's wq [q, i, c], wk [d, c], k_norm / k_norm_bias [c], w_weights [d, i].
    x_bsd: [b, s, d] the attention's input.
    q_bsq: [b, s, q] the normed query latent (MLA's ``q_a_norm(x wq_a)``).
    cos_bsc: [b, s, r] RoPE cosines (r <= c).
    sin_bsc: [b, s, r] RoPE sines.
    allowed_b11st: bool [b, 1, 1, s, t] causality and padding.
    topk: the number of keys kept per query.

  Returns:
    bool [b, 1, 1, s, t]: ``allowed_b11st`` restricted to each query's selected keys.
  """
  q_bsic = rope.apply(mm("bsq,qic->bsic", q_bsq, p["wq"]), cos_bsc, sin_bsc)
  k_bsc = layer_norm(dot(x_bsd, p["wk"]), p["k_norm"], p["k_norm_bias"], 1e-6)
  k_bsc = rope.apply(k_bsc[:, :, None], cos_bsc, sin_bsc)[:, :, 0]
  heads, width = q_bsic.shape[2], q_bsic.shape[3]
  scores_bsit = jax.nn.relu(jnp.einsum("bsic,btc->bsit", q_bsic.astype(jnp.float32), k_bsc.astype(jnp.float32))
                            * width ** -0.5)
  weights_bsi = dot(x_bsd, p["w_weights"]).astype(jnp.float32) * heads ** -0.5
  index_bst = jnp.einsum("bsi,bsit->bst", weights_bsi, scores_bsit)
  index_bst = jax.lax.stop_gradient(jnp.where(allowed_b11st[:, 0, 0], index_bst, -jnp.inf))
  b, s, t = index_bst.shape
  _, keep_bsk = jax.lax.top_k(index_bst, min(topk, t))
  chosen_bst = jnp.zeros((b, s, t), bool).at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None],
                                             keep_bsk].set(True)
  return allowed_b11st & chosen_bst[:, None, None]


def mla_attention(p: dict, x_bsd: jax.Array, cos_bsc: jax.Array, sin_bsc: jax.Array, allowed_b11st: jax.Array,
                  nope: int, scale: float, interleave: bool = False, index_topk: int = 0) -> jax.Array:
  """Multi-head latent attention (DeepSeek-V2/V3), RoPE on the last ``head_dim`` of each q/k head.

  p: q either wq [d, h, n + r] or wq_a [d, q], (bq_a [q]), q_a_norm [q], wq_b [q, h, n + r]; wkv_a [d, l + r],
  (bkv_a [l + r]), kv_a_norm [l], wkv_b [l, h, n + v]; wo [h, v, d], (bo [d]); DeepSeek-V3.2's ``indexer``
  (``index_selection``, with ``index_topk`` > 0) restricts each query to its selected keys. n = ``nope`` (no-RoPE
  width), r the RoPE width (one RoPE key shared by every head), l the kv latent rank. Latent norms: RMSNorm eps
  1e-6.
  """
  if "wq" in p:
    q_bshc = mm("bsd,dhc->bshc", x_bsd, p["wq"])
  else:
    q_bsq = dot(x_bsd, p["wq_a"])
    q_bsq = rms_norm(q_bsq + p["bq_a"] if "bq_a" in p else q_bsq, p["q_a_norm"], MLA_NORM_EPS)
    q_bshc = mm("bsq,qhc->bshc", q_bsq, p["wq_b"])
    if index_topk:
      allowed_b11st = index_selection(p["indexer"], x_bsd, q_bsq, cos_bsc, sin_bsc, allowed_b11st, index_topk)
  kv_bsm = dot(x_bsd, p["wkv_a"])
  kv_bsm = kv_bsm + p["bkv_a"] if "bkv_a" in p else kv_bsm
  rank = p["kv_a_norm"].shape[0]
  latent_bsl = rms_norm(kv_bsm[..., :rank], p["kv_a_norm"], MLA_NORM_EPS)
  kv_bshc = mm("bsl,lhc->bshc", latent_bsl, p["wkv_b"])
  q_rope = rope.apply(q_bshc[..., nope:], cos_bsc, sin_bsc, interleave)
  k_rope_bs1r = rope.apply(kv_bsm[:, :, None, rank:], cos_bsc, sin_bsc, interleave)
  b, s, h, _ = q_bshc.shape
  k_rope_bshr = jnp.broadcast_to(k_rope_bs1r, (b, s, h, k_rope_bs1r.shape[-1]))
  q_bshc = jnp.concatenate([q_bshc[..., :nope], q_rope], axis=-1)
  k_bshc = jnp.concatenate([kv_bshc[..., :nope], k_rope_bshr], axis=-1)
  out_bshv = attend(q_bshc, k_bshc, kv_bshc[..., nope:], allowed_b11st, scale)
  return output_projection(p, out_bshv)


def gated_mlp(p: dict, x_nd: jax.Array, act: str) -> jax.Array:
  """down(act(x W_gate) * (x W_up)); p: w_gate [d, f], w_up [d, f], w_down [f, d]."""
  h_nf = gated_hidden(p, x_nd, act)
  return dot(h_nf, p["w_down"])


def gated_hidden(p: dict, x_nd: jax.Array, act: str) -> jax.Array:
  """The down_proj input act(x W_gate) * (x W_up) (``glu``)."""
  return glu(act, dot(x_nd, p["w_gate"]), dot(x_nd, p["w_up"]))
