"""The three expert paths agree, and every path is safe under jit, vmap, jvp and vjp (checked against
central finite differences in float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bmoe_jax as B
from bmoe_jax.nn import moe as M

IMPLS = ("dense", "sorted", "ragged")


def _problem(key, n=13, d=6, f=5, e=4, k=2, dtype=jnp.float32):
  ks = jax.random.split(key, 5)
  x = jax.random.normal(ks[0], (n, d), dtype)
  w = {"w_gate": jax.random.normal(ks[1], (e, d, f), dtype) * 0.5,
       "w_up": jax.random.normal(ks[2], (e, d, f), dtype) * 0.5,
       "w_down": jax.random.normal(ks[3], (e, f, d), dtype) * 0.5}
  router = jax.random.normal(ks[4], (d, e), dtype)
  return x, w, router


def _run(impl, x, w, router, k=2, perturb=None, tile_rows=None):
  r = M.route(x, router, k, norm_topk_prob=True)
  return M.routed_experts(impl, x, r.expert_nk, r.gate_nk.astype(x.dtype), w, "silu", perturb, tile_rows)


@given(n=st.integers(1, 40), e=st.integers(1, 9), k=st.integers(1, 4), tile=st.sampled_from([None, 1, 2, 3, 8]),
       seed=st.integers(0, 2**16))
@settings(max_examples=12, deadline=None)  # every example compiles new shapes (~1.5 s each on 2 cores)
def test_paths_agree_property(n, e, k, tile, seed):
  k = min(k, e)
  x, w, router = _problem(jax.random.key(seed), n=n, e=e, k=k)
  run = jax.jit(_run, static_argnums=(0, 4), static_argnames="tile_rows")
  ref_out, ref_h = run("dense", x, w, router, k)
  for impl in ("sorted", "ragged"):
    out, h = run(impl, x, w, router, k, tile_rows=tile)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(h, ref_h, atol=2e-5, rtol=1e-5)


def test_all_tokens_to_one_expert_is_dropless():
  """Worst-case load: every slot on one expert; nothing dropped in any path."""
  x, w, router = _problem(jax.random.key(0), n=32, e=8, k=1)
  expert = jnp.zeros((32, 1), jnp.int32)
  gate = jnp.ones((32, 1))
  ref = M.experts_dense(x, expert, gate, w, "silu")[0]
  for tile in (None, 1, 4, 32):
    np.testing.assert_allclose(M.experts_sorted(x, expert, gate, w, "silu", tile_rows=tile)[0], ref,
                               atol=1e-5)
  np.testing.assert_allclose(M.experts_ragged(x, expert, gate, w, "silu")[0], ref, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap(impl):
  x, w, router = _problem(jax.random.key(1))
  eager = _run(impl, x, w, router)[0]
  jitted = jax.jit(lambda x: _run(impl, x, w, router)[0])(x)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  xb = jnp.stack([x, 2 * x, -x])
  vm = jax.vmap(lambda x: _run(impl, x, w, router)[0])(xb)
  for i in range(3):
    np.testing.assert_allclose(vm[i], _run(impl, xb[i], w, router)[0], atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_jvp_vjp_match_finite_differences(impl):
  """Derivatives w.r.t. inputs and all expert weights, routing held fixed at the evaluation point
  (top-k is piecewise constant, so finite differences see the same routing for small steps)."""
  with jax.enable_x64(True):
    x, w, router = _problem(jax.random.key(2), dtype=jnp.float64)
    r = M.route(x, router, 2, norm_topk_prob=True)

    def f(x, w):
      return M.routed_experts(impl, x, r.expert_nk, r.gate_nk, w, "silu")[0]

    tx = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
    tw = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape, jnp.float64), w)
    eps = 1e-6
    fd = (f(x + eps * tx, jax.tree.map(lambda a, t: a + eps * t, w, tw))
          - f(x - eps * tx, jax.tree.map(lambda a, t: a - eps * t, w, tw))) / (2 * eps)
    _, jvp = jax.jvp(f, (x, w), (tx, tw))
    np.testing.assert_allclose(jvp, fd, rtol=1e-6, atol=1e-8)
    ct = jax.random.normal(jax.random.key(5), fd.shape, jnp.float64)
    _, pullback = jax.vjp(f, x, w)
    gx, gw = pullback(ct)
    lhs = jnp.vdot(ct, jvp)
    rhs = jnp.vdot(gx, tx) + sum(jnp.vdot(gw[k], tw[k]) for k in w)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_perturbation_gradient_is_expert_output_gradient(impl):
  """d loss / d perturb[n, j] = gate[n, j] * d loss / d out[n] (routing weight included)."""
  x, w, router = _problem(jax.random.key(6))
  r = M.route(x, router, 2, norm_topk_prob=False)
  zero = jnp.zeros((x.shape[0], 2, x.shape[1]))
  ct = jax.random.normal(jax.random.key(7), x.shape)
  g = jax.grad(lambda p: jnp.vdot(ct, M.routed_experts(impl, x, r.expert_nk, r.gate_nk, w, "silu", p)[0]))(zero)
  np.testing.assert_allclose(g, r.gate_nk[:, :, None] * ct[:, None, :], atol=1e-6)


def test_model_perturbation_taps_give_down_proj_gradient():
  """One vjp through the full model: sum over an expert's slots of a^T (d loss/d y) is exactly the
  gradient of the loss w.r.t. that expert's down_proj (what K-FAC's factors are built from)."""
  cfg = B.tiny_config(num_experts=3, shared_expert_size=8)
  params = B.init_params(cfg, jax.random.key(0), std=0.2)
  tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
  zero = B.zero_perturbations(cfg, 2, 5)

  def loss(params, perturb):
    out = B.forward(params, cfg, tokens, perturb=perturb, return_taps=True)
    return jnp.sum(jax.nn.log_softmax(out.logits)[..., 3]), out.taps

  (val, taps), (g_params, g_pert) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params, zero)
  for layer in cfg.moe_layer_ids:
    t = taps[layer]
    a = t.down_in_bskf.reshape(-1, t.down_in_bskf.shape[-1])
    gy = g_pert[layer]["routed"].reshape(-1, cfg.hidden_size)
    e_id = t.expert_bsk.reshape(-1)
    for e in range(cfg.num_experts):
      sel = e_id == e
      manual = a[sel].T @ gy[sel]
      np.testing.assert_allclose(manual, g_params["layers"][layer]["mlp"]["experts"]["w_down"][e], atol=1e-5)
    shared_manual = t.shared_in_bsf.reshape(-1, 8).T @ g_pert[layer]["shared"].reshape(-1, cfg.hidden_size)
    np.testing.assert_allclose(shared_manual, g_params["layers"][layer]["mlp"]["shared"]["w_down"], atol=1e-5)


@pytest.mark.parametrize("impl", ("sorted", "ragged"))
def test_full_model_paths_agree_with_grads(impl):
  cfg = B.tiny_config()
  params = B.init_params(cfg, jax.random.key(0), std=0.2)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
  mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)

  def loss(p, impl):
    return jnp.sum(jax.nn.log_softmax(B.forward(p, cfg, tokens, mask, expert_impl=impl).logits)[..., 0])

  ref_v, ref_g = jax.value_and_grad(loss)(params, "dense")
  v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, impl)
  np.testing.assert_allclose(v, ref_v, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_weights(impl):
  """Vmapping over sampled expert weights (as weight-space Monte Carlo does)."""
  x, w, router = _problem(jax.random.key(8))
  r = M.route(x, router, 2, norm_topk_prob=True)
  ws = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), w)
  out = jax.vmap(lambda w: M.routed_experts(impl, x, r.expert_nk, r.gate_nk, w, "silu")[0])(ws)
  for i in range(3):
    wi = jax.tree.map(lambda a: a[i], ws)
    np.testing.assert_allclose(out[i], M.routed_experts("dense", x, r.expert_nk, r.gate_nk, wi, "silu")[0],
                               atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_mixed_dtypes(impl):
  x, w, router = _problem(jax.random.key(9))
  empty = M.routed_experts(impl, x[:0], jnp.zeros((0, 2), jnp.int32), jnp.zeros((0, 2)), w, "silu")
  assert empty[0].shape == (0, x.shape[1]) and empty[1].shape == (0, 2, w["w_down"].shape[1])
  r = M.route(x, router, 2, norm_topk_prob=True)
  mixed = dict(w, w_down=w["w_down"].astype(jnp.bfloat16))
  out = jax.jit(lambda x: M.routed_experts(impl, x.astype(jnp.bfloat16), r.expert_nk, r.gate_nk, mixed, "silu")[0])(x)
  assert bool(jnp.isfinite(out).all())


def test_take_rows_is_a_gather_both_ways():
  """``take_rows`` equals ``x[idx]`` (zero rows out of range); its jvp and vjp are the gather's, and the pullback
  is itself a gather (no scatter in the reverse-mode program)."""
  x = jax.random.normal(jax.random.key(10), (5, 3))
  idx = jnp.array([4, 7, 0, 2, 8, 1], jnp.int32)  # 7, 8: out of range (padding rows)
  inv = jnp.array([2, 5, 3, 6, 0], jnp.int32)  # row 3 is taken by no b: out of range
  ref = jnp.concatenate([x, jnp.zeros((4, 3))])[idx]
  np.testing.assert_array_equal(M.take_rows(x, idx, inv), ref)
  t = jax.random.normal(jax.random.key(11), x.shape)
  np.testing.assert_array_equal(jax.jvp(lambda x: M.take_rows(x, idx, inv), (x,), (t,))[1],
                                jnp.concatenate([t, jnp.zeros((4, 3))])[idx])
  ct = jax.random.normal(jax.random.key(12), ref.shape)
  pull = jax.vjp(lambda x: M.take_rows(x, idx, inv), x)[1]
  np.testing.assert_array_equal(pull(ct)[0], jax.vjp(lambda x: jnp.concatenate([x, jnp.zeros((4, 3))])[idx], x)[1](
      ct)[0][:5])
  prims = {e.primitive.name for e in jax.make_jaxpr(pull)(ct).jaxpr.eqns}
  assert "gather" in prims and not any("scatter" in p for p in prims), prims


def test_sorted_backward_has_no_float_scatter():
  """The sorted path's reverse mode moves rows with gathers only: the float scatter-adds that transpose gathers
  (the slow part of the backward on CPU) are gone; integer scatters building the layout remain."""
  x, w, router = _problem(jax.random.key(13), n=40, e=4)
  r = M.route(x, router, 2, norm_topk_prob=True)
  loss = lambda x, w: jnp.sum(M.experts_sorted(x, r.expert_nk, r.gate_nk, w, "silu", tile_rows=4)[0] ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr
  float_scatters = [eqn for eqn in _all_eqns(jaxpr) if "scatter" in eqn.primitive.name
                    and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)]
  assert not float_scatters, [e.primitive.name for e in float_scatters]


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for j in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = j if hasattr(j, "eqns") else getattr(j, "jaxpr", None)  # a Jaxpr (remat) or a ClosedJaxpr
        if inner is not None:
          yield from _all_eqns(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("loads", [(10, 10, 10, 10), (40, 0, 0, 0), (13, 7, 12, 8), (1, 2, 3, 34)])
def test_capacity_block_and_overflow_tiles(loads):
  """Balanced loads fill the capacity block exactly; skewed loads overflow into tiles; both equal the dense path,
  for tile sizes that do and do not divide the overflow, and for explicit capacities (0: all tiles)."""
  x, w, _ = _problem(jax.random.key(14), n=20, e=4)
  expert = jnp.asarray(np.random.default_rng(0).permutation(np.repeat(np.arange(4), loads)).reshape(20, 2))
  gate = jax.random.uniform(jax.random.key(15), (20, 2))
  ref_out, ref_h = M.experts_dense(x, expert, gate, w, "silu")
  ws = (w["w_gate"], w["w_up"], w["w_down"])
  for tile, cap in ((2, 10), (1, 10), (3, 10), (4, 0), (2, 25)):  # the form derivatives are taken of
    h, y = M._tiled_slots("silu", 4, (tile, cap), x, expert, *ws)
    np.testing.assert_allclose(M._combine(y, h, gate, None, x.dtype)[0], ref_out, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, atol=1e-5)
  lay = M._layout(expert, 4, 4, 10, 4)
  assert sorted(np.asarray(lay.row_s).tolist()) == sorted(set(np.asarray(lay.row_s).tolist()))  # injective
  np.testing.assert_array_equal(np.asarray(lay.slot_p)[np.asarray(lay.row_s)], np.arange(40))
  assert int(lay.used_tiles) == sum(-(-max(c - 10, 0) // 4) for c in loads)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_forward_chunks_each_expert_and_equals_the_differentiable_form(chunk):
  """Without differentiation each expert's rows run in chunks of 8r..r rows in loops whose trip counts follow the
  loads (no scan over worst-case tiles); jvp and vjp go through the capacity-plus-tiles form. Same values, also
  for slots left out (``valid_nk``) and under vmap with a different load per example (batched trip counts)."""
  x, w, _ = _problem(jax.random.key(16), n=20, e=4)
  rng = np.random.default_rng(1)
  experts = jnp.asarray(np.stack([rng.permutation(np.repeat(np.arange(4), loads)).reshape(20, 2)
                                  for loads in ((1, 2, 3, 34), (10, 10, 10, 10), (0, 0, 17, 23), (40, 0, 0, 0))]))
  gate = jax.random.uniform(jax.random.key(17), (20, 2))
  ws = (w["w_gate"], w["w_up"], w["w_down"])
  for ek in experts:
    for a, b in zip(M._chunked_slots("silu", 4, chunk, x, ek, *ws), M._tiled_slots("silu", 4, (3, 10), x, ek, *ws)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  valid = jnp.asarray(rng.random((20, 2)) < 0.6)
  skip = jnp.where(valid, experts[2], 4)  # the expert-parallel path's trailing group: never computed, zeros
  for a, b in zip(M._chunked_slots("silu", 5, chunk, x, skip, *ws), M._tiled_slots("silu", 5, (3, 10), x, skip, *ws)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.asarray(a)[~np.asarray(valid)].any()
  sorted_ = lambda x, e: M.experts_sorted(x, e, gate, w, "silu", tile_rows=3, chunk_rows=chunk)
  dense = lambda x, e: M.experts_dense(x, e, gate, w, "silu")
  prims = {e.primitive.name for e in _all_eqns(jax.make_jaxpr(sorted_)(x, experts[0]).jaxpr)}
  assert "while" in prims and "cond" not in prims, prims  # loops over chunks; no tile skipped by a cond
  t = jax.random.normal(jax.random.key(19), x.shape)
  jvp = lambda x: jax.jvp(lambda x: sorted_(x, experts[0])[0], (x,), (t,))
  assert "cond" in {e.primitive.name for e in _all_eqns(jax.make_jaxpr(jvp)(x).jaxpr)}  # the tiles' scan
  np.testing.assert_allclose(jvp(x)[1], jax.jvp(lambda x: dense(x, experts[0])[0], (x,), (t,))[1], atol=1e-4)
  for got, want in zip(jax.vmap(sorted_, (None, 0))(x, experts), jax.vmap(dense, (None, 0))(x, experts)):
    np.testing.assert_allclose(got, want, atol=1e-5)
