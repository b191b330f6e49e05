"""The three predictive routes against a materialised Jacobian and dense posterior on a tiny MoE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.params import write_blocks
from bmoe_jax.task import Batch, Task, mc_softmax, probit, probit_pairwise
from tests.fixtures import jacobian_stats, kfac_update, posterior_of, predict
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import posterior as P
from bmoe_jax.laplace import predictive as PR

CLASSES = jnp.array([3, 7, 11, 19])
LAYERS = (0, 1)


_FITS = {}


def _fit(rank=None, prior=1.0, layers=LAYERS, shared=False, **kw):
  """The tiny MoE, its posterior (factors from one jitted K-FAC update) and a test batch; built once per
  argument set in this module."""
  key = repr((rank, prior, layers, shared, sorted(kw.items())))
  if key not in _FITS:
    _FITS[key] = _build_fit(rank, prior, layers, shared, **kw)
  return _FITS[key]


def _build_fit(rank, prior, layers, shared, **kw):
  cfg = B.tiny_config(num_experts=3, **kw)
  params = B.init_params(cfg, jax.random.key(0), std=0.3, bias_std=0.3 if cfg.expert_bias else 0.0)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (4, 6)))
  mask = jnp.ones((4, 6), jnp.int32).at[1, 4:].set(0)
  batch = Batch(tokens, mask, jnp.array([5, 3, 5, 4]), jnp.array([0, 2, 1, 3]))
  spec = kfac.FactorSpec(layers=layers, tokens="expand", rank=rank, shared=shared)
  state = kfac_update(kfac.init(cfg, spec), params, Task(cfg, CLASSES), batch, spec)
  post = posterior_of(kfac.finalize(state), params, num_sequences=4, dataset_size=10, prior_precision=prior,
                      log_lik=state.log_lik)
  test = Batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (3, 5))), jnp.ones((3, 5), jnp.int32).at[2, 0].set(0),
                    jnp.array([4, 2, 4]), jnp.array([1, 0, 3]))
  return cfg, params, post, test


def _dense_cov(post, params, cfg, batch):
  """J Sigma J^T with J = jacrev of the answer logits w.r.t. every Bayesian down_proj, Sigma dense."""
  jac, sigmas = jax.jit(_jacobian_and_dense_sigmas, static_argnums=2)(post, params, cfg, batch)
  b, c = batch.tokens_bs.shape[0], len(CLASSES)
  cov = np.zeros((b, c, c))
  for l in post.w_map:
    e, fd, d = post.w_map[l].shape
    for i in range(e):
      sig = np.asarray(sigmas[l][i], np.float64)
      j = np.asarray(jac[l][:, :, i], np.float64).reshape(b, c, fd * d)
      cov += np.einsum("bcp,pq,bkq->bck", j, sig, j)
  return cov


def _jacobian_and_dense_sigmas(post, params, cfg, batch):
  """The Jacobian of the answer logits w.r.t. every Bayesian down_proj and each expert's dense covariance
  [e, f*d, f*d] (covariance_apply on the basis vectors)."""
  def f(w):
    return Task(cfg, CLASSES).logits(write_blocks(params, w), batch)
  sigmas = {}
  for l in post.w_map:
    e, fd, d = post.w_map[l].shape
    basis = jnp.eye(fd * d).reshape(fd * d, fd, d)
    sigmas[l] = [jax.vmap(lambda v: P.covariance_apply(post, l, jnp.zeros((e, fd, d)).at[i].set(v))[i])(
        basis).reshape(fd * d, fd * d) for i in range(e)]
  return jax.jacrev(f)(dict(post.w_map)), sigmas


MLA_SIGMOID = dict(num_kv_heads=4, head_dim=4, q_lora_rank=6, kv_lora_rank=8, qk_nope_head_dim=6, v_head_dim=5,
                   rope_interleave=True, rope_type="yarn", rope_factor=4.0, yarn_original_max_position=4,
                   yarn_mscale_all_dim=0.7, router_scoring="sigmoid", router_bias=True, norm_topk_prob=True,
                   routed_scaling_factor=2.5, shared_expert_gate=False, index_topk=3, index_heads=16,
                   index_head_dim=6)  # with DeepSeek-V3.2's indexer keeping 3 of up to 5 keys


GLM = dict(rotary_dim=4, qk_norm="head", router_scoring="sigmoid", router_bias=True, topk_method="noaux_tc",
           norm_topk_prob=True, norm_topk_eps=1e-20, routed_scaling_factor=2.5,
           shared_expert_gate=False)  # GLM-4.5: partial RoPE, q/k norm, sigmoid routing with bias, ungated shared
GPT_OSS = dict(attn_sinks=True, attn_windows=(3, 0), router_logit_bias=True, expert_bias=True, swiglu_limit=0.4,
               norm_topk_prob=True, attn_out_bias=True, shared_expert_size=0)  # sinks, window, biases, clamp
LLAMA4 = dict(num_experts_per_tok=1, router_scoring="sigmoid", router_on_input=True, qk_norm="l2", rope_interleave=True,
              rope_layers=(True, False), attn_chunks=(2, 0), nope_attn_scale=0.5, nope_floor_scale=2.0,
              shared_expert_gate=False)  # chunks, NoPE temperature, input-side top-1 score, l2 q/k norm, shared


QWEN3_NEXT = dict(linear_layers=(True, False), linear_k_heads=2, linear_v_heads=4, linear_k_dim=4, linear_v_dim=6,
                  linear_conv_width=3, attn_output_gate=True, norm_unit_offset=True, qk_norm="head", rotary_dim=4,
                  norm_topk_prob=True)  # Gated DeltaNet below gated attention, norms by 1 + w


PHIMOE = dict(layer_norm=True, lm_head_bias=True, router_scoring="sparsemixer", router_jitter_eps=0.4, rope_type="longrope",
              longrope_short_factor=(1.0, 1.5, 2.0, 3.0), longrope_long_factor=(2.0,) * 4, longrope_short_mscale=1.1,
              longrope_long_mscale=1.3, longrope_original_max_position=4)  # LayerNorms, longrope, the sparsemixer


@pytest.mark.parametrize("rank,shared,arch", [(None, False, {}), (3, False, {}), (None, True, {}), (3, True, {}),
                                              (3, False, {"qk_norm": "full"}), (None, True, MLA_SIGMOID),
                                              (3, True, GLM), (None, False, GPT_OSS), (None, True, LLAMA4),
                                              (3, True, QWEN3_NEXT), (None, True, PHIMOE)],
                         ids=["full", "lowrank", "full-shared", "lowrank-shared", "qk_full", "mla_sigmoid", "glm",
                              "gpt_oss", "llama4", "qwen3_next", "phimoe"])
def test_closed_form_equals_dense_jacobian(rank, shared, arch):
  """Routed experts of both layers, optionally with both shared experts (gated, width 24) as well; once with
  OLMoE's full-width q/k norm, once with DeepSeek-V3's architecture (MLA, yarn, sigmoid gates, ungated shared)."""
  cfg, params, post, test = _fit(rank, shared=shared, **arch)
  assert len(post.factors) == (4 if shared else 2)
  stats = jacobian_stats(params, Task(cfg, CLASSES), test, post)
  got = PR.logit_covariance(stats, post)
  want = _dense_cov(post, params, cfg, test)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
  assert np.abs(want).max() > 1e-3  # a non-trivial covariance
  np.testing.assert_allclose(stats.f_bc, Task(cfg, CLASSES).logits(params, test), atol=1e-5)
  # the two slot-projection strategies agree
  fac = post.factors[kfac.Block(1)]
  a, g = jax.random.normal(jax.random.key(0), (2, 5, 16)), jax.random.normal(jax.random.key(1), (2, 4, 5, 32))
  expert, valid = jnp.array([[0, 2, 2, 1, 0], [1, 1, 0, 2, 2]]), jnp.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
  for x, y in zip(PR.project_rows(fac, a, g, expert, valid, gather=True),
                  PR.project_rows(fac, a, g, expert, valid, gather=False)):
    if x is not None:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_jvp_mc_is_the_linear_map_and_converges_to_closed_form():
  cfg, params, post, test = _fit()
  closed = predict(post, params, Task(cfg, CLASSES), test, method="closed", link="probit")
  mc = predict(post, params, Task(cfg, CLASSES), test, method="jvp_mc", key=jax.random.key(1), num_samples=4000)
  np.testing.assert_allclose(mc.f_mean_bc, closed.f_mean_bc, atol=4 * np.sqrt(np.abs(closed.f_cov_bcc).max() / 4000))
  scale = np.abs(closed.f_cov_bcc).max()
  assert np.abs(mc.f_cov_bcc - closed.f_cov_bcc).max() < 0.1 * scale
  # same draws twice: seeded
  jvp_samples = jax.jit(PR.jvp_samples, static_argnums=(1, 5))
  again = jvp_samples(params, Task(cfg, CLASSES), test, post, jax.random.key(1), 8)
  np.testing.assert_array_equal(again, jvp_samples(params, Task(cfg, CLASSES), test, post, jax.random.key(1), 8))


def test_nn_mc_matches_linearised_for_a_tight_posterior():
  """Top MoE layer only: perturbing it cannot re-route a later layer, so the network is nearly linear
  in those weights for a tight posterior (with layer 0 Bayesian too, nn_mc re-routes layer 1 and the
  two routes differ by design)."""
  cfg, params, post, test = _fit(prior=400.0, layers=(1,))
  lin = predict(post, params, Task(cfg, CLASSES), test, method="jvp_mc", key=jax.random.key(2), num_samples=300)
  nn = predict(post, params, Task(cfg, CLASSES), test, method="nn_mc", key=jax.random.key(2), num_samples=300)
  scale = np.abs(lin.f_cov_bcc).max()
  assert scale > 1e-6
  np.testing.assert_allclose(nn.f_mean_bc, lin.f_mean_bc, atol=0.05 * np.sqrt(scale) + 1e-4)
  assert np.abs(nn.f_cov_bcc - lin.f_cov_bcc).max() < 0.1 * scale


def test_links():
  f = jnp.array([[1.0, -0.5, 0.2]])
  assert np.allclose(mc_softmax(f, jnp.zeros((1, 3, 3)), jax.random.key(0), 10), jax.nn.softmax(f), atol=1e-6)
  cov = jnp.diag(jnp.array([2.0, 0.5, 1.0]))[None]
  mc = mc_softmax(f, cov, jax.random.key(0), 200000)
  np.testing.assert_allclose(mc, probit(f, cov), atol=0.03)  # probit is an approximation
  # mc with a diagonal covariance: per-sample softmax of independent Gaussians (brute force)
  z = np.random.RandomState(0).randn(200000, 3) * np.sqrt([2.0, 0.5, 1.0]) + np.asarray(f)
  brute = np.exp(z - z.max(1, keepdims=True))
  np.testing.assert_allclose(mc[0], (brute / brute.sum(1, keepdims=True)).mean(0), atol=3e-3)
  # probabilities sum to one; wider posterior => flatter prediction
  assert np.allclose(probit(f, 10 * cov).sum(-1), 1)
  assert probit(f, 10 * cov).max() < probit(f, cov).max()


def test_grid_search_uses_the_lambda_independent_stats():
  cfg, params, post, test = _fit()
  stats = jacobian_stats(params, Task(cfg, CLASSES), test, post)
  best, curve = PR.grid_search_prior_precision(post, [(stats, test.labels_b)], grid=[0.01, 1.0, 100.0])
  for lam, nll in zip(curve["prior_precision"], curve["nll"]):
    p = predict(post._replace(log_prior_prec_e=P.expand_prior_precision(lam, {0: 3, 1: 3})), params, Task(cfg, CLASSES), test).probs_bc
    np.testing.assert_allclose(nll, -np.mean(np.log(np.take_along_axis(np.asarray(p), test.labels_b[:, None], 1))),
                               rtol=1e-5)
  assert float(jnp.exp(best.log_prior_prec_e[kfac.Block(0)][0])) == pytest.approx(
      curve["prior_precision"][int(np.argmin(curve["nll"]))], rel=1e-6)
  # tempered (Bayesian-MoE + T): the predictive of N(f / T, Sigma / T^2); at a huge prior precision, softmax(f / T)
  t = 1.7
  _, hot = PR.grid_search_prior_precision(post, [(stats, test.labels_b)], grid=[1.0, 1e12], temperature=t)
  pred = predict(post._replace(log_prior_prec_e=P.expand_prior_precision(1.0, {0: 3, 1: 3})), params,
                 Task(cfg, CLASSES), test)
  p = probit_pairwise(pred.f_mean_bc / t, pred.f_cov_bcc / t**2)
  np.testing.assert_allclose(hot["nll"][0], -np.mean(np.log(np.take_along_axis(np.asarray(p), test.labels_b[:, None], 1))),
                             rtol=1e-5)
  ts = jax.nn.log_softmax(stats.f_bc / t, -1)
  np.testing.assert_allclose(hot["nll"][1], -np.mean(np.take_along_axis(np.asarray(ts), test.labels_b[:, None], 1)),
                             rtol=1e-5)


def test_grid_stats_streams_batches_and_serves_every_link_and_temperature():
  """grid_stats holds one batch's Jacobian statistics at a time, and a search on its GridStats equals the search on
  the statistics themselves for every link and temperature (split batches: the same examples, the same NLL)."""
  import gc
  import weakref

  cfg, params, post, test = _fit()
  task, grid = Task(cfg, CLASSES), [0.01, 1.0, 100.0]
  parts = [jax.tree.map(lambda x, r=r: x[r], test) for r in (slice(0, 2), slice(2, 3))]
  alive = []

  def stats_of(b):  # the pipeline's pattern (stages.validation_stats): a generator expression over the batches
    gc.collect()
    assert not any(ref() is not None for ref in alive), "the previous batch's statistics are still held"
    stats = jacobian_stats(params, task, b, post)
    alive.append(weakref.ref(stats.blocks[kfac.Block(0)].proj_becrq))
    return stats

  val = PR.grid_stats(post, ((stats_of(b), b.labels_b) for b in parts), grid)
  assert val.cov_gncc.shape == (3, 3, 4, 4) and val.f_nc.shape == (3, 4)
  whole = [(jacobian_stats(params, task, test, post), test.labels_b)]
  for link, t in [("probit_pairwise", 1.0), ("probit", 1.0), ("probit_pairwise", 1.7), ("mc", 1.0)]:
    got = PR.grid_search_prior_precision(post, val, link=link, temperature=t)[1]["nll"]
    want = PR.grid_search_prior_precision(post, whole, grid=grid, link=link, temperature=t)[1]["nll"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="differs from the GridStats"):
    PR.grid_search_prior_precision(post, val, grid=[1.0])
  with pytest.raises(ValueError, match="no validation batches"):
    PR.grid_stats(post, iter(()), grid)


def test_bad_method_and_link():
  cfg, params, post, test = _fit()
  with pytest.raises(ValueError, match="method='laplace'"):
    predict(post, params, Task(cfg, CLASSES), test, method="laplace")
  with pytest.raises(ValueError, match="link='logit'"):
    predict(post, params, Task(cfg, CLASSES), test, link="logit")


def test_jvp_samples_in_float64():
  """With x64 and float64 weights the tangents are in the primals' dtype, so the jvp accepts them (linearised
  at float32 before, it refused the float64 draws), and the samples' covariance is the closed form's."""
  with jax.enable_x64(True):
    cfg = B.tiny_config(num_experts=3)
    params = B.init_params(cfg, jax.random.key(0), dtype=jnp.float64, std=0.3)
    _, _, _, test = _fit()
    spec = kfac.FactorSpec(layers=LAYERS, tokens="expand")
    state = kfac_update(kfac.init(cfg, spec, jnp.float64), params, Task(cfg, CLASSES), test, spec)
    post = posterior_of(kfac.finalize(state), params, num_sequences=3, dataset_size=10, prior_precision=1.0,
                        log_lik=state.log_lik)
    f_nbc = PR.jvp_samples(params, Task(cfg, CLASSES), test, post, jax.random.key(1), 2000)
    closed = predict(post, params, Task(cfg, CLASSES), test, method="closed")
    cov = np.einsum("nbc,nbk->bck", f_nbc - f_nbc.mean(0), f_nbc - f_nbc.mean(0)) / (len(f_nbc) - 1)
    assert np.abs(cov - closed.f_cov_bcc).max() < 0.15 * np.abs(closed.f_cov_bcc).max()
