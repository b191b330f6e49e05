"""The Laplace router: the router weight as one more K-FAC block (``Block(l, "router")``, [1, d, E]): exact
GGN where K-FAC must be exact, the closed-form predictive against a materialised Jacobian, evidence, and
sampled router weights that re-route."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.laplace import kfac
from bmoe_jax.laplace import predictive as PR
from bmoe_jax.laplace.kfac import Block, FactorSpec
from bmoe_jax.params import read_block, write_blocks
from bmoe_jax.task import Batch, Task
from tests.fixtures import CLASSES, exact_ggn_block, factor_stats, kfac_update, posterior_of
from tests.laplace.test_predictive import _dense_cov


def _model():
  cfg = B.tiny_config(num_experts=3, moe_layers=(True, True))
  return cfg, B.init_params(cfg, jax.random.key(0), std=0.3)


def test_router_block_reads_and_writes_the_router_kernel():
  cfg, params = _model()
  w = read_block(params, Block(1, "router"))
  assert w.shape == (1, cfg.hidden_size, cfg.num_experts) == kfac.block_dims(cfg, Block(1, "router"))
  new = write_blocks(params, {Block(1, "router"): w + 1.0})
  kernel = lambda p: p["layers"][1]["mlp"]["router"]["kernel"]
  np.testing.assert_array_equal(kernel(new), kernel(params) + 1)


def test_router_block_last_token_top_layer_equals_exact_ggn():
  cfg, params = _model()
  rng = np.random.RandomState(0)
  batch = Batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 5))), jnp.ones((1, 5), jnp.int32), jnp.array([4]),
                jnp.array([2]))
  spec = FactorSpec(layers=(1,), router=True, experts=False)
  stats = factor_stats(params, Task(cfg, CLASSES), batch, spec)[Block(1, "router")]
  exact = exact_ggn_block(params, Task(cfg, CLASSES), batch, Block(1, "router"))
  np.testing.assert_allclose(np.kron(stats.a_eff[0], stats.g_edd[0]), exact[0], atol=1e-6, rtol=1e-4)
  assert np.abs(exact).max() > 1e-4 and int(stats.rows_e[0]) == 1


def test_closed_form_with_router_and_expert_blocks_equals_dense_jacobian():
  cfg, params = _model()
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (4, 6)))
  batch = Batch(tokens, jnp.ones((4, 6), jnp.int32), jnp.array([5, 3, 5, 4]), jnp.array([0, 2, 1, 3]))
  spec = FactorSpec(layers=(0, 1), tokens="expand", rank=3, router=True)
  assert spec.rank_of(Block(1, "router")) is None and spec.rank_of(Block(1)) == 3
  state = kfac_update(kfac.init(cfg, spec), params, Task(cfg, CLASSES), batch, spec)
  post = posterior_of(kfac.finalize(state), params, num_sequences=4, prior_precision=1.0, log_lik=state.log_lik)
  test = Batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (3, 5))), jnp.ones((3, 5), jnp.int32), jnp.array([4, 2, 4]),
               jnp.array([1, 0, 3]))
  stats = jax.jit(PR.jacobian_stats, static_argnums=1)(params, Task(cfg, CLASSES), test, post)
  got = np.asarray(PR.logit_covariance(stats, post))
  want = _dense_cov(post, params, cfg, test)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
  only_router = {Block(l, "router"): stats.blocks[Block(l, "router")] for l in (0, 1)}
  router_cov = np.asarray(PR.logit_covariance(stats._replace(blocks=only_router), post))
  assert np.abs(router_cov).max() > 1e-4  # the router weight's uncertainty reaches the answer


def test_sampled_router_weights_reroute():
  from bmoe_jax.laplace import posterior as P
  cfg, params = _model()
  rng = np.random.RandomState(1)
  batch = Batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (4, 6))), jnp.ones((4, 6), jnp.int32),
                jnp.full((4,), 5), jnp.array([0, 2, 1, 3]))
  spec = FactorSpec(layers=(1,), router=True, experts=False)
  state = kfac_update(kfac.init(cfg, spec), params, Task(cfg, CLASSES), batch, spec)
  post = posterior_of(kfac.finalize(state), params, num_sequences=4, prior_precision=1e-2)
  fwd = jax.jit(lambda p: B.forward(p, cfg, batch.tokens_bs, return_taps=True).taps[1].expert_bsk)
  base = np.asarray(fwd(params))
  moved = [np.mean(np.asarray(fwd(p)) != base) for p in P.sample_weights(post, params, jax.random.key(0), 4)]
  assert max(moved) > 0.05  # a broad posterior over W_r changes expert choices


def test_fit_centres_router_blocks_at_zero_when_experts_are_centred_at_the_pretrained_weights():
  from bmoe_jax.pipeline.configs import FitConfig
  from bmoe_jax.pipeline.stages import _prior_mean
  cfg, params = _model()
  blocks = {Block(1): None, Block(1, "router"): None}
  mean = _prior_mean(FitConfig(prior_mean="pretrained"), params, blocks)
  np.testing.assert_array_equal(mean[Block(1, "router")], 0.0)
  np.testing.assert_array_equal(mean[Block(1)], read_block(params, Block(1)))
  assert _prior_mean(FitConfig(prior_mean="zero"), params, blocks) == "zero"
  with pytest.raises(ValueError, match="no block chosen"):
    FactorSpec(layers=(1,), experts=False)


def test_factor_pass_fingerprint_of_expert_only_specs_is_unchanged():
  from bmoe_jax.laplace.fit import spec_fingerprint
  old = {"layers": [1], "labels": "exact", "tokens": "last", "rank": None, "shared": False}  # before the router blocks
  assert {k: list(v) if isinstance(v, tuple) else v for k, v in spec_fingerprint(FactorSpec(layers=(1,))).items()} == old
  assert spec_fingerprint(FactorSpec(layers=(1,), router=True))["router"] is True
