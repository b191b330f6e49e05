"""Stochastic routers' predictives, Bayesian routers combined with the expert posterior, routing stability on
hand-built and model cases, and the FLOPs count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax import epistemic as EP
from bmoe_jax import routing as RT
from bmoe_jax.baselines import bayesian_moe
from bmoe_jax.laplace import kfac
from bmoe_jax.routing import predict as RP
from bmoe_jax.routing import stability as ST
from bmoe_jax.task import Task
from tests.fixtures import CLASSES, fitted_posterior, synthetic_task


@pytest.fixture(scope="module")
def setup():
  cfg = B.tiny_config(num_experts=4, shared_expert_size=0, shared_expert_gate=False)
  params = B.init_params(cfg, jax.random.key(0), std=0.3)
  return cfg, params, synthetic_task(cfg, 2)


def _temp_task(cfg, t):
  rc = RT.RouterConfig(kind="temperature", sample_temperature=t)
  return Task(cfg, CLASSES, routing=RT.RoutingPlan.of({l: rc for l in cfg.moe_layer_ids}))


def test_routed_predictive_is_the_mean_of_sampled_forwards(setup):
  cfg, params, batches = setup
  task = _temp_task(cfg, 1.0)
  p = RT.attach(params, {})
  key = jax.random.key(4)
  probs = RP.routed_method(p, task, num_samples=5, key=key)(batches[0])
  keys = RP.draw_keys(key, 5)
  manual = np.mean([np.asarray(jax.nn.softmax(task.logits(RT.with_draw(p, keys[s], s), batches[0]), -1))
                    for s in range(5)], axis=0)
  np.testing.assert_allclose(np.asarray(probs), manual, rtol=1e-5, atol=1e-6)
  f_sbc = np.stack([np.asarray(task.logits(RT.with_draw(p, keys[s], s), batches[0])) for s in range(5)])
  scores = RP.routed_method(p, task, num_samples=5, key=key).with_scores(batches[0])[1]  # the draws' disagreement
  for name, want in EP.sample_scores(jnp.asarray(f_sbc))[1].items():
    np.testing.assert_allclose(np.asarray(scores[name]), np.asarray(want), rtol=1e-4, atol=1e-7)
  det = jax.nn.softmax(Task(cfg, CLASSES).logits(params, batches[0]), -1)
  assert np.abs(np.asarray(probs) - np.asarray(det)).max() > 1e-3  # sampling at T = 1 re-routes
  cold = RP.routed_method(p, _temp_task(cfg, 1e-5), num_samples=3, key=key)(batches[0])
  np.testing.assert_allclose(np.asarray(cold), np.asarray(det), rtol=1e-5, atol=1e-6)  # T -> 0: the MAP router


def test_combined_predictive_reduces_to_each_method_alone(setup):
  cfg, params, batches = setup
  spec = kfac.FactorSpec(layers=cfg.moe_layer_ids)
  post = fitted_posterior(params, Task(cfg, CLASSES), batches, spec, prior_precision=1.0)
  # the deterministic-in-the-limit router: Bayesian-MoE exactly
  cold = RP.routed_bayesian_moe(post, RT.attach(params, {}), _temp_task(cfg, 1e-5), num_samples=2)(batches[0])
  np.testing.assert_allclose(np.asarray(cold), np.asarray(bayesian_moe(post, params, Task(cfg, CLASSES))(batches[0])),
                             rtol=1e-5, atol=1e-6)
  # a posterior without variance: the router's own predictive
  sharp = fitted_posterior(params, Task(cfg, CLASSES), batches, spec, prior_precision=1e12)
  task = _temp_task(cfg, 1.0)
  both = RP.routed_bayesian_moe(sharp, RT.attach(params, {}), task, num_samples=4, key=jax.random.key(2))(batches[0])
  alone = RP.routed_method(RT.attach(params, {}), task, num_samples=4, key=jax.random.key(2))(batches[0])
  np.testing.assert_allclose(np.asarray(both), np.asarray(alone), rtol=1e-4, atol=1e-5)
  # with both: each draw's covariance uses the experts that draw selected, so the result differs from both
  full = RP.routed_bayesian_moe(post, RT.attach(params, {}), task, num_samples=4, key=jax.random.key(2))(batches[0])
  assert np.abs(np.asarray(full) - np.asarray(alone)).max() > 1e-4
  np.testing.assert_allclose(np.asarray(full).sum(-1), 1.0, rtol=1e-5)


def test_ensemble_plan_draws_every_member_once():
  cfg = B.tiny_config(moe_layers=(False, True))
  task = Task(cfg, CLASSES, routing=RT.RoutingPlan.of({1: RT.RouterConfig(kind="ensemble", router_members=3)}))
  assert RP.num_draws(task, 8) == 3
  assert RP.num_draws(Task(cfg, CLASSES), 8) == 1


def test_stability_of_the_deterministic_router_falls_with_noise(setup):
  cfg, params, batches = setup
  res = ST.routing_stability(params, Task(cfg, CLASSES), batches, gammas=(0.0, 0.01, 100.0))
  for l in cfg.moe_layer_ids:
    j = res[l]["jaccard"]
    assert j[0] == 1.0 and res[l]["resample"] == 1.0  # no noise, deterministic: identical sets
    # small noise keeps most sets; overwhelming noise leaves chance level (random 2 of 4: 7/18 ~ 0.39)
    assert j[0] >= j[1] > j[2] and j[1] > 0.8 and j[2] < 0.6 and res[l]["mean_norm"] > 0
  # a sampling router: common random numbers keep gamma 0 at 1, independent draws differ
  task = _temp_task(cfg, 1.0)
  res = ST.routing_stability(RT.attach(params, {}), task, batches, gammas=(0.0,))
  for l in cfg.moe_layer_ids:
    assert res[l]["jaccard"][0] == 1.0 and res[l]["resample"] < 0.9


def test_stability_hand_built_router():
  """One MoE layer whose router input is fixed: with 2 experts of 4 chosen by clear margins, small noise keeps
  the set; the Jaccard of {0,1} vs {0,2} is 1/3."""
  from bmoe_jax.nn import gating as G
  a = G.route(jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]), 2,
              norm_topk_prob=False).expert_nk
  b = G.route(jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0]]), 2,
              norm_topk_prob=False).expert_nk
  assert float(G.jaccard(a, a, 4)[0]) == 1.0 and float(G.jaccard(a, b, 4)[0]) == pytest.approx(1 / 3)


def test_flops_count():
  cfg = B.tiny_config(num_experts=4, shared_expert_size=0, shared_expert_gate=False, moe_layers=(True, True))
  d, e = cfg.hidden_size, cfg.num_experts
  assert ST.router_flops(RT.RouterConfig(), d, e) == 0.0
  mf = ST.router_flops(RT.RouterConfig(kind="mfvr", inner_samples=35), d, e)
  h = d // 4
  assert mf == 2 * d * e + 2 * d * h + 2 * h * e + 35 * 5 * e + e
  fc = ST.router_flops(RT.RouterConfig(kind="fcvr"), d, e)
  assert fc > mf  # the Cholesky head and the E x E products
  per_layer_mlp = 2 * d * e + 2 * 3 * 2 * d * cfg.moe_intermediate_size
  attn = 2 * d * 8 * (4 + 2 * 2) + 2 * 4 * 8 * d + 4 * 4 * 8 * 129 / 2
  assert ST.forward_flops(cfg, seq=128) == pytest.approx(2 * (attn + per_layer_mlp) + 2 * d * cfg.vocab_size)


def test_flops_count_of_latent_attention():
  """MLA: every projection once per token (q latent, kv latent with the RoPE key, their up-projections, o),
  then scores over q/k width nope + rope and values over v width."""
  cfg = B.tiny_config(num_experts=4, shared_expert_size=0, shared_expert_gate=False, num_kv_heads=4, head_dim=4,
                      q_lora_rank=6, kv_lora_rank=8, qk_nope_head_dim=6, v_head_dim=5)
  d, h = cfg.hidden_size, cfg.num_heads
  proj = d * 6 + 6 * h * 10 + d * (8 + 4) + 8 * h * (6 + 5) + h * 5 * d
  attn = 2 * proj + 2 * h * (10 + 5) * 129 / 2
  per_layer_mlp = 2 * d * 4 + 2 * 3 * 2 * d * cfg.moe_intermediate_size
  assert ST.forward_flops(cfg, seq=128) == pytest.approx(2 * (attn + per_layer_mlp) + 2 * d * cfg.vocab_size)


def test_stability_reroutes_as_the_forward_in_bfloat16_with_native_router_logits():
  """With bf16 weights and ``router_dtype="native"`` the forward's router matmul runs in bf16: the re-routing
  must too (a float32 re-route picks other experts on near ties), so gamma 0 keeps every set."""
  cfg = B.tiny_config(num_experts=32, num_experts_per_tok=2, shared_expert_size=0, shared_expert_gate=False,
                      router_dtype="native")  # 32 experts: bf16 ties occur (a float32 re-route kept 0.993)
  params = B.init_params(cfg, jax.random.key(3), dtype=jnp.bfloat16, std=0.3)
  batches = synthetic_task(cfg, 6)
  res = ST.routing_stability(params, Task(cfg, CLASSES), batches, gammas=(0.0, 0.01))
  for l in cfg.moe_layer_ids:
    assert res[l]["jaccard"][0] == 1.0 and res[l]["resample"] == 1.0 and res[l]["jaccard"][1] < 1.0
