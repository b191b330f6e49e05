"""The three expert paths agree, and every path is safe under jit, vmap, jvp and vjp (checked against
central finite differences in float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bmoe_jax as B
from bmoe_jax.nn import expert_rows as R
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


def _run(impl, x, w, router, k=2, perturb=None, chunk_rows=None):
  r = M.route(x, router, k, norm_topk_prob=True)
  return M.routed_experts(impl, x, r.expert_nk, r.gate_nk.astype(x.dtype), w, "silu", perturb, chunk_rows)


@given(n=st.integers(1, 40), e=st.integers(1, 9), k=st.integers(1, 4), tile=st.sampled_from([None, 1, 2, 3, 8]),
       seed=st.integers(0, 2**16))
@settings(max_examples=12, deadline=None)  # every example compiles new shapes (~1.5 s each on 2 cores)
def test_paths_agree_property(n, e, k, tile, seed):
  k = min(k, e)
  x, w, router = _problem(jax.random.key(seed), n=n, e=e, k=k)
  run = jax.jit(_run, static_argnums=(0, 4), static_argnames="chunk_rows")
  ref_out, ref_h = run("dense", x, w, router, k)
  for impl in ("sorted", "ragged"):
    out, h = run(impl, x, w, router, k, chunk_rows=tile)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(h, ref_h, atol=2e-5, rtol=1e-5)


def test_all_tokens_to_one_expert_is_dropless():
  """Worst-case load: every slot on one expert; nothing dropped in any path."""
  x, w, router = _problem(jax.random.key(0), n=32, e=8, k=1)
  expert = jnp.zeros((32, 1), jnp.int32)
  gate = jnp.ones((32, 1))
  ref = M.experts_dense(x, expert, gate, w, "silu")[0]
  for tile in (None, 1, 4, 32):
    np.testing.assert_allclose(M.experts_sorted(x, expert, gate, w, "silu", chunk_rows=tile)[0], ref,
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

  ref_v, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "dense")
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
  loss = lambda x, w: jnp.sum(M.experts_sorted(x, r.expert_nk, r.gate_nk, w, "silu", chunk_rows=4)[0] ** 2)
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


LOADS = ((1, 2, 3, 34), (10, 10, 10, 10), (0, 0, 17, 23), (40, 0, 0, 0))


def test_layout_is_a_permutation_of_slots():
  """Each expert's rows start where the previous expert's load (rounded up to r rows) ends; slots not to compute
  (group e) get distinct rows past the buffer; ``slot_p`` inverts ``row_s`` (padding rows: distinct, out of range)."""
  rng = np.random.default_rng(0)
  for loads in LOADS:
    ek = jnp.asarray(rng.permutation(np.repeat(np.arange(4), loads)).reshape(20, 2))
    skip = jnp.where(jnp.asarray(rng.random((20, 2)) < 0.7), ek, 4)
    for experts, r in ((ek, 3), (ek, 1), (skip, 4)):
      lay = R.layout(experts, 4, r)
      row, slot = np.asarray(lay.row_s), np.asarray(lay.slot_p)
      p = R.padded_rows(40, 4, r)
      assert slot.shape == (p,) and len(set(row.tolist())) == 40 and len(set(slot.tolist())) == p
      flat = np.asarray(experts).reshape(-1)
      sizes = np.bincount(flat, minlength=5)[:4]
      np.testing.assert_array_equal(lay.units_e, -(-sizes // r))
      valid = flat < 4
      np.testing.assert_array_equal(slot[row[valid]], np.arange(40)[valid])
      assert (row[~valid] >= p).all()
      first = np.asarray(lay.first_e) * r
      for j in range(4):  # expert j's slots fill its rows in order
        np.testing.assert_array_equal(np.sort(row[flat == j]), first[j] + np.arange(sizes[j]))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunk_loops_follow_the_loads_in_every_derivative(chunk):
  """Forward, jvp and vjp (w.r.t. inputs and every expert weight) equal the dense path for skewed loads, slots
  left out (``valid_nk``) and chunk sizes that do not divide the loads; all three run as loops over chunks
  (``while``; no ``cond`` skipping worst-case tiles), the derivatives as one ``linear_call``."""
  x, w, _ = _problem(jax.random.key(16), n=20, e=4)
  rng = np.random.default_rng(1)
  gate = jax.random.uniform(jax.random.key(17), (20, 2))
  tx = jax.random.normal(jax.random.key(19), x.shape)
  tw = jax.tree.map(lambda a: 0.3 * a + 0.1, w)
  ct = jax.random.normal(jax.random.key(20), x.shape)

  @jax.jit  # one program for every load pattern (the loads are data: trip counts follow them)
  def both(ek, valid):
    sorted_ = lambda x, w: M.experts_sorted(x, ek, gate, w, "silu", chunk_rows=chunk, valid_nk=valid)
    dense = lambda x, w: M.experts_dense(x, ek, jnp.where(valid, gate, 0), w, "silu")
    return [(f(x, w), jax.jvp(f, (x, w), (tx, tw))[1][0], jax.vjp(lambda x, w: f(x, w)[0], x, w)[1](ct))
            for f in (sorted_, dense)]

  for loads in LOADS:
    ek = jnp.asarray(rng.permutation(np.repeat(np.arange(4), loads)).reshape(20, 2))
    valid = jnp.asarray(rng.random((20, 2)) < 0.6)
    (out, jvp_s, vjp_s), (ref, jvp_d, vjp_d) = both(ek, valid)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], jnp.where(valid[..., None], ref[1], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jvp_s, jvp_d, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(vjp_s), jax.tree.leaves(vjp_d)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  sorted_ = lambda x, w: M.experts_sorted(x, ek, gate, w, "silu", chunk_rows=chunk, valid_nk=valid)
  grad = jax.grad(lambda x, w: jnp.sum(sorted_(x, w)[0] ** 2), argnums=(0, 1))
  jvp = lambda x: jax.jvp(lambda x: sorted_(x, w), (x,), (tx,))
  for fn, args in ((sorted_, (x, w)), (grad, (x, w)), (jvp, (x,))):
    prims = {e.primitive.name for e in _all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)}
    assert "while" in prims and "cond" not in prims, prims  # chunk loops; no tile skipped by a cond
  assert "linear_call" in {e.primitive.name for e in _all_eqns(jax.make_jaxpr(grad)(x, w).jaxpr)}


def test_vmapped_pullbacks_and_linearisations_of_the_sorted_path():
  """``vmap`` over cotangents (one pullback per class), over tangents of a linearisation (posterior samples) and
  over routings with their gradients (batched trip counts) equals the dense path: the batching rule of
  ``linear_call`` (``nn.linear_batching``)."""
  x, w, router = _problem(jax.random.key(21), n=30)
  r = M.route(x, router, 2, norm_topk_prob=True)
  paths = {impl: (lambda x, w, ek=r.expert_nk, impl=impl: M.routed_experts(impl, x, ek, r.gate_nk, w, "silu"))
           for impl in ("sorted", "dense")}
  cts = jax.tree.map(lambda a: jnp.stack([a, -2 * a, a + 1]), paths["dense"](x, w))
  txs = jax.random.normal(jax.random.key(22), (3,) + x.shape)
  tws = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), w)
  eks = jnp.stack([r.expert_nk, jnp.zeros_like(r.expert_nk) + jnp.arange(2), (r.expert_nk + 1) % 4])

  def run(f):
    pull, lin = jax.vjp(f, x, w)[1], jax.linearize(f, x, w)[1]
    per_routing = jax.vmap(lambda ek: jax.grad(lambda x, w: jnp.sum(f(x, w, ek)[0] ** 2), argnums=(0, 1))(x, w))
    return jax.vmap(pull)(cts), jax.vmap(lin)(txs, tws), per_routing(eks)

  got = jax.jit(lambda: {impl: run(f) for impl, f in paths.items()})()
  for a, b in zip(jax.tree.leaves(got["sorted"]), jax.tree.leaves(got["dense"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
