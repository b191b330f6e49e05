"""Gated DeltaNet: the chunked delta rule against transformers' chunked and recurrent references and against our own
recurrence, the causal convolution against torch's, padding, and jvp / vjp through the whole mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmoe_jax.nn import linear_attention as LA

B_, S, HK, H, C, V = 2, 37, 2, 4, 8, 6


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B_, S, HK, C)).astype(np.float32)
  k = rng.normal(size=(B_, S, HK, C)).astype(np.float32)
  v = rng.normal(size=(B_, S, H, V)).astype(np.float32)
  g = -np.abs(rng.normal(size=(B_, S, H))).astype(np.float32)
  beta = (1 / (1 + np.exp(-rng.normal(size=(B_, S, H))))).astype(np.float32)
  return q, k, v, g, beta


def _normed(q, k):
  """What gated_deltanet feeds the rule: L2-normalised q (scaled by c^-1/2) and k, repeated to the value heads."""
  rep = H // HK
  return jnp.repeat(LA.l2_normalize(q), rep, axis=2) * C ** -0.5, jnp.repeat(LA.l2_normalize(k), rep, axis=2)


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_rule_equals_transformers(chunk):
  """Several chunks (37 positions in chunks of 16) and one padded chunk, grouped value heads, the final state: equal
  to transformers' chunked and recurrent reference implementations."""
  import torch
  from transformers.models.qwen3_next import modeling_qwen3_next as ref

  q, k, v, g, beta = _inputs()
  t = [torch.tensor(x) for x in (q, k, v)]
  kw = dict(g=torch.tensor(g), beta=torch.tensor(beta), output_final_state=True, use_qk_l2norm_in_kernel=True)
  want_out, want_state = ref.torch_chunk_gated_delta_rule(*t, chunk_size=chunk, **kw)
  rec_out, rec_state = ref.torch_recurrent_gated_delta_rule(*t, **kw)
  out, state = jax.jit(LA.gated_delta_rule, static_argnames="chunk")(*_normed(q, k), v, g, beta, chunk=chunk)
  for w_out, w_state in ((want_out, want_state), (rec_out, rec_state)):
    np.testing.assert_allclose(np.asarray(out), w_out.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(state), w_state.numpy(), atol=2e-6)


def test_chunked_rule_equals_recurrence_and_carries_state():
  """Any chunk length gives the token-by-token recurrence; a sequence cut in two, the second half started from the
  first's final state, gives the whole."""
  q, k, v, g, beta = _inputs(1)
  qn, kn = _normed(q, k)
  want, want_state = LA.gated_delta_rule_recurrent(qn, kn, v, g, beta)
  for chunk in (1, 5, 64):
    out, state = jax.jit(LA.gated_delta_rule, static_argnames="chunk")(qn, kn, v, g, beta, chunk=chunk)
    np.testing.assert_allclose(out, want, atol=2e-6)
    np.testing.assert_allclose(state, want_state, atol=2e-6)
  cut = 20
  first, mid = LA.gated_delta_rule(qn[:, :cut], kn[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], chunk=8)
  second, _ = LA.gated_delta_rule(qn[:, cut:], kn[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], mid, chunk=8)
  np.testing.assert_allclose(np.concatenate([first, second], 1), want, atol=2e-6)


def test_causal_conv_equals_torch():
  import torch
  rng = np.random.default_rng(2)
  x, w = rng.normal(size=(2, 9, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
  want = torch.nn.functional.conv1d(torch.tensor(x).transpose(1, 2), torch.tensor(w.T[:, None]), padding=3,
                                    groups=5)[..., :9].transpose(1, 2)
  np.testing.assert_allclose(LA.causal_conv(jnp.asarray(x), jnp.asarray(w)), want.numpy(), atol=1e-6)


def _mixer(seed=3, d=12):
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  shapes = {"wq": (d, HK, C), "wk": (d, HK, C), "wv": (d, H, V), "wz": (d, H, V), "wb": (d, H), "wa": (d, H),
            "conv_q": (3, HK, C), "conv_k": (3, HK, C), "conv_v": (3, H, V), "dt_bias": (H,), "a_log": (H,),
            "norm": (V,), "wo": (H, V, d)}
  p = {n: 0.4 * jax.random.normal(next(keys), s) for n, s in shapes.items()}
  p["norm"] = 1 + p["norm"]
  x = jax.random.normal(next(keys), (2, 10, d))
  return p, x


def test_left_padding_is_invisible():
  """A left-padded row's real positions equal the same tokens unpadded: padding is zeroed before the projections, so
  it leaves the convolution's window and the state at zero."""
  p, x = _mixer()
  mixer = jax.jit(LA.gated_deltanet, static_argnums=3)
  mask = jnp.ones((2, 10), jnp.int32)
  out = mixer(p, x, mask.at[1, :4].set(0), 1e-6)
  alone = mixer(p, x.at[1, :6].set(x[1, 4:]), mask, 1e-6)  # row 1's real tokens first, unpadded
  np.testing.assert_allclose(out[1, 4:], alone[1, :6], atol=1e-5)
  np.testing.assert_allclose(out[0], alone[0], atol=1e-6)


def test_jvp_and_vjp_agree_through_the_mixer():
  """<J t, u> = <t, J^T u> for the mixer's input and every weight: jax.jvp and jax.vjp both run through the conv,
  the triangular solves and the scan (no custom_vjp on the path)."""
  p, x = _mixer(4)
  f = lambda p, x: LA.gated_deltanet(p, x, None, 1e-6, chunk=4)  # noqa: E731  (3 chunks of 4 over 10 positions)
  tangent = jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), a.shape), (p, x))
  u = jax.random.normal(jax.random.key(8), x.shape)
  jt, jtu = jax.jit(lambda t, u: (jax.jvp(f, (p, x), t)[1], jax.vjp(f, p, x)[1](u)))(tangent, u)
  lhs = jnp.vdot(jt, u)
  rhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(tangent), jax.tree.leaves(jtu)))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
  assert abs(float(lhs)) > 1e-3
