"""``layers.mm``: float32 accumulation for narrow operands, float32 and float64 untouched."""

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.nn import layers as L


def _dots(fn, *args):
  return [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "dot_general"]


def test_mm_bf16_accumulates_in_float32_and_rounds_once():
  x = jax.random.normal(jax.random.key(0), (64, 512)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (512, 32)).astype(jnp.bfloat16)
  out = L.dot(x, w)
  assert out.dtype == jnp.bfloat16
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  # one rounding of a float32 sum: within half a bf16 ulp of the exact product (plus float32 summation error)
  ulp = 2.0 ** (np.floor(np.log2(np.abs(exact) + 1e-30)) - 7)
  assert (np.abs(np.asarray(out, np.float64) - exact) <= 0.5 * ulp + 1e-4 * np.abs(exact).max()).all()
  (eqn,) = _dots(L.dot, x, w)
  assert eqn.params["preferred_element_type"] == jnp.float32


def test_mm_float32_and_float64_are_plain_einsum():
  x = jax.random.normal(jax.random.key(2), (3, 5, 8))
  w = jax.random.normal(jax.random.key(3), (8, 4, 2))
  np.testing.assert_array_equal(L.mm("bsd,dhc->bshc", x, w), jnp.einsum("bsd,dhc->bshc", x, w))
  with jax.enable_x64(True):
    x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
    assert L.mm("bsd,dhc->bshc", x64, w64).dtype == jnp.float64
    np.testing.assert_array_equal(L.mm("bsd,dhc->bshc", x64, w64), jnp.einsum("bsd,dhc->bshc", x64, w64))


def test_mm_mixed_dtypes_and_derivatives():
  """Mixed bf16/f32 operands promote to float32 (plain einsum); bf16 derivatives flow through jvp and vjp."""
  x = jax.random.normal(jax.random.key(4), (6, 8))
  w = jax.random.normal(jax.random.key(5), (8, 3)).astype(jnp.bfloat16)
  assert L.dot(x, w).dtype == jnp.float32
  xb = x.astype(jnp.bfloat16)
  y, t = jax.jvp(lambda x: L.dot(x, w), (xb,), (jnp.ones_like(xb),))
  assert y.dtype == t.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(t, np.float32), np.asarray(jnp.ones((6, 8)) @ w.astype(jnp.float32)),
                             rtol=1e-2)
  g = jax.grad(lambda x: L.dot(x, w).astype(jnp.float32).sum())(xb)
  assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all())
