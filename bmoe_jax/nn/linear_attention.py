"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): a causal depthwise convolution of q, k and v, then the
gated delta rule, computed as a chunked scan (transformers' ``torch_chunk_gated_delta_rule``); its token-by-token
recurrence ``gated_delta_rule_recurrent`` is the reference the tests hold the chunked form to.

The rule, per value head with state S [c, v] (c the key width, v the value width), at each position t:
``S <- exp(g_t) S``; ``S <- S + k_t (beta_t (v_t - k_t^T S))^T``; output ``q_t^T S``. Within a chunk of l
positions the l updates are one unit-lower-triangular solve (the UT transform); across chunks one ``lax.scan``
carries S. Everything is pure and jit-, vmap-, jvp- and vjp-safe.

Shapes in names: b batch, s positions, d model width, h value heads, k key heads (q and k; each serves h / k
consecutive value heads), c key head width, v value head width, n chunks, l chunk length, w convolution width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bmoe_jax.nn.layers import activation, mm, rms_norm

CHUNK = 64  # transformers' chunk length; the result does not depend on it beyond rounding


def _wide(x: jax.Array) -> jax.Array:
  """``x`` in float32, or float64 when it is (the rule is computed in at least float32, as transformers)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """``x / sqrt(sum(x^2) + eps)`` over the last axis (transformers' / FLA's ``l2norm``).

  Args:
    x: any array; normalised over its last axis.
    eps: added under the square root.

  Returns:
    ``x`` scaled to unit L2 norm along its last axis (zero stays zero).
  """
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(x_bsc: jax.Array, w_wc: jax.Array) -> jax.Array:
  """Depthwise causal convolution: ``out[t, c] = sum_j w[j, c] x[t - (w - 1) + j, c]``, zeros before the start
  (torch's ``conv1d(groups=channels, padding=w - 1)[..., :s]``).

  Args:
    x_bsc: [b, s, channels] the sequence.
    w_wc: [w, channels] each channel's kernel, oldest position first.

  Returns:
    [b, s, channels] the convolution, in at least float32 (before any activation).
  """
  width, s = w_wc.shape[0], x_bsc.shape[1]
  x_pad = jnp.pad(_wide(x_bsc), ((0, 0), (width - 1, 0), (0, 0)))
  w_wc = _wide(w_wc)
  return sum(x_pad[:, j:j + s] * w_wc[j] for j in range(width))


def gated_delta_rule_recurrent(q_bshc, k_bshc, v_bshv, g_bsh, beta_bsh, state_bhcv=None):
  """The gated delta rule token by token: the reference ``gated_delta_rule`` is held to.

  Args:
    q_bshc (jax.Array): [b, s, h, c] queries, L2-normalised and scaled.
    k_bshc (jax.Array): [b, s, h, c] keys, L2-normalised.
    v_bshv (jax.Array): [b, s, h, v] values.
    g_bsh (jax.Array): [b, s, h] log decays (<= 0).
    beta_bsh (jax.Array): [b, s, h] write strengths.
    state_bhcv (jax.Array | None): [b, h, c, v] the state before the first position; None: zeros.

  Returns:
    (outputs [b, s, h, v], the final state [b, h, c, v]), in at least float32.
  """
  b, _, h, c = q_bshc.shape
  state = jnp.zeros((b, h, c, v_bshv.shape[-1]), _wide(v_bshv).dtype) if state_bhcv is None else state_bhcv

  def step(s_bhcv, xs):
    q_bhc, k_bhc, v_bhv, g_bh, beta_bh = xs
    s_bhcv = s_bhcv * jnp.exp(g_bh)[..., None, None]
    delta_bhv = (v_bhv - jnp.einsum("bhc,bhcv->bhv", k_bhc, s_bhcv)) * beta_bh[..., None]
    s_bhcv = s_bhcv + k_bhc[..., None] * delta_bhv[..., None, :]
    return s_bhcv, jnp.einsum("bhc,bhcv->bhv", q_bhc, s_bhcv)

  xs = tuple(jnp.moveaxis(_wide(a), 1, 0) for a in (q_bshc, k_bshc, v_bshv, g_bsh, beta_bsh))
  state, out_sbhv = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(out_sbhv, 0, 1), state


def _chunks(x, n: int, l: int):
  """[b, s, h, ...] -> [n, b, h, l, ...], zero-padded to n * l positions."""
  pad = n * l - x.shape[1]
  x = jnp.pad(_wide(x), ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  x = x.reshape(x.shape[0], n, l, *x.shape[2:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)


def gated_delta_rule(q_bshc, k_bshc, v_bshv, g_bsh, beta_bsh, state_bhcv=None, chunk: int = CHUNK) -> tuple:
  """The gated delta rule over the sequence, chunk by chunk (transformers' ``torch_chunk_gated_delta_rule``).

  Args:
    q_bshc (jax.Array): [b, s, h, c] queries, already L2-normalised and scaled (``gated_deltanet`` does both).
    k_bshc (jax.Array): [b, s, h, c] keys, L2-normalised.
    v_bshv (jax.Array): [b, s, h, v] values.
    g_bsh (jax.Array): [b, s, h] log decays (<= 0): the state is multiplied by ``exp(g)`` before each update.
    beta_bsh (jax.Array): [b, s, h] write strengths in (0, 1).
    state_bhcv (jax.Array | None): [b, h, c, v] the state before the first position; None: zeros.
    chunk: positions per chunk (capped at s).

  Returns:
    (outputs [b, s, h, v], the state after the last position [b, h, c, v]), in float32 (float64 for float64 inputs).
  """
  b, s, h, c = q_bshc.shape
  l = max(1, min(chunk, s))
  n = -(-s // l)
  q, k, v = (_chunks(a, n, l) for a in (q_bshc, k_bshc, v_bshv))  # [n, b, h, l, .]
  g_nbhl, beta_nbhl = _chunks(g_bsh, n, l), _chunks(beta_bsh, n, l)
  cum_nbhl = jnp.cumsum(g_nbhl, axis=-1)
  lower_ll = jnp.tril(jnp.ones((l, l), bool))
  # decay from position j to position i of a chunk (i >= j); -inf above the diagonal before exp, as transformers
  decay_nbhll = jnp.exp(jnp.where(lower_ll, cum_nbhl[..., :, None] - cum_nbhl[..., None, :], -jnp.inf))
  k_beta = k * beta_nbhl[..., None]
  ut_nbhll = jnp.einsum("nbhic,nbhjc->nbhij", k_beta, k) * decay_nbhll
  attn_nbhll = jnp.einsum("nbhic,nbhjc->nbhij", q, k) * decay_nbhll

  def solve(rhs):  # (I + strictly lower part of ut)^-1 rhs
    return jax.lax.linalg.triangular_solve(ut_nbhll, rhs, left_side=True, lower=True, unit_diagonal=True)

  u_nbhlv = solve(v * beta_nbhl[..., None])
  w_nbhlc = solve(k_beta * jnp.exp(cum_nbhl)[..., None])
  q_decayed = q * jnp.exp(cum_nbhl)[..., None]
  k_decayed = k * jnp.exp(cum_nbhl[..., -1:] - cum_nbhl)[..., None]
  chunk_decay_nbh = jnp.exp(cum_nbhl[..., -1])

  def step(s_bhcv, xs):
    u, w, qd, kd, attn, cd = xs
    v_new = u - jnp.einsum("bhlc,bhcv->bhlv", w, s_bhcv)
    out = jnp.einsum("bhlc,bhcv->bhlv", qd, s_bhcv) + jnp.einsum("bhij,bhjv->bhiv", attn, v_new)
    return s_bhcv * cd[..., None, None] + jnp.einsum("bhlc,bhlv->bhcv", kd, v_new), out

  state = jnp.zeros((b, h, c, v.shape[-1]), v.dtype) if state_bhcv is None else state_bhcv.astype(v.dtype)
  state, out_nbhlv = jax.lax.scan(step, state, (u_nbhlv, w_nbhlc, q_decayed, k_decayed, attn_nbhll, chunk_decay_nbh))
  out_bshv = jnp.moveaxis(out_nbhlv, 0, 1).swapaxes(2, 3).reshape(b, n * l, h, -1)[:, :s]
  return out_bshv, state


def gated_deltanet(p: dict, x_bsd: jax.Array, mask_bs: jax.Array | None, eps: float, act: str = "silu",
                   chunk: int = CHUNK) -> jax.Array:
  """One Gated DeltaNet token mixer (transformers' ``Qwen3NextGatedDeltaNet`` without a cache).

  Args:
    p: wq, wk [d, k, c], wv, wz [d, h, v], wb, wa [d, h], conv_q, conv_k [w, k, c], conv_v [w, h, v], dt_bias,
      a_log [h], norm [v] (the gated RMSNorm's scale), wo [h, v, d].
    x_bsd: [b, s, d] the layer's normed input.
    mask_bs: [b, s] 1 for real tokens, 0 for padding (zeroed before the projections, as transformers); None: none.
    eps: the gated RMSNorm's epsilon (``rms_norm_eps``).
    act: the convolution's activation (``hidden_act``).
    chunk: the delta rule's chunk length.

  Returns:
    [b, s, d] the mixer's output, in ``x_bsd``'s dtype.
  """
  dtype = x_bsd.dtype
  if mask_bs is not None:
    x_bsd = x_bsd * mask_bs[:, :, None].astype(dtype)
  b, s, _ = x_bsd.shape

  def conv(w_dhc, conv_whc):
    y_bshc = mm("bsd,dhc->bshc", x_bsd, w_dhc)
    out = causal_conv(y_bshc.reshape(b, s, -1), conv_whc.reshape(conv_whc.shape[0], -1))
    return activation(act)(out).astype(dtype).reshape(y_bshc.shape)

  q_bskc, k_bskc, v_bshv = conv(p["wq"], p["conv_q"]), conv(p["wk"], p["conv_k"]), conv(p["wv"], p["conv_v"])
  h, c = v_bshv.shape[2], q_bskc.shape[-1]
  rep = h // q_bskc.shape[2]  # each key head serves rep consecutive value heads
  q_bshc = jnp.repeat(l2_normalize(_wide(q_bskc)), rep, axis=2) * c ** -0.5
  k_bshc = jnp.repeat(l2_normalize(_wide(k_bskc)), rep, axis=2)
  beta_bsh = jax.nn.sigmoid(_wide(mm("bsd,dh->bsh", x_bsd, p["wb"])))
  a_bsh = _wide(mm("bsd,dh->bsh", x_bsd, p["wa"])) + _wide(p["dt_bias"])
  g_bsh = -jnp.exp(_wide(p["a_log"])) * jax.nn.softplus(a_bsh)
  out_bshv, _ = gated_delta_rule(q_bshc, k_bshc, v_bshv, g_bsh, beta_bsh, chunk=chunk)
  z_bshv = mm("bsd,dhv->bshv", x_bsd, p["wz"])
  y_bshv = _wide(rms_norm(out_bshv.astype(dtype), p["norm"], eps)) * jax.nn.silu(_wide(z_bshv))
  return mm("bshv,hvd->bsd", y_bshv.astype(dtype), p["wo"])
