"""Gating: the deterministic router is bit-identical to the plain forward for every family's gating; gates_at
reproduces route; Gumbel-top-k has the law of sequential sampling without replacement; Jaccard."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax import routing as RT
from bmoe_jax.nn import gating as G

# the gating rules (and architecture variants) of the families we convert, as tiny configs
FAMILY_GATING = {
    "deepseek_v2": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
                        shared_expert_size=24, shared_expert_gate=False),
    "deepseek_v3": dict(router_scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, router_bias=True,
                        norm_topk_prob=True, norm_topk_eps=1e-20, routed_scaling_factor=2.5, shared_expert_size=24,
                        shared_expert_gate=False),
    "qwen3_moe": dict(norm_topk_prob=True, shared_expert_size=0, shared_expert_gate=False, qk_norm="head"),
    "olmoe": dict(norm_topk_prob=False, shared_expert_size=0, shared_expert_gate=False, qk_norm="full", qkv_clip=1.0),
    "granitemoeshared": dict(norm_topk_prob=True, shared_expert_size=24, shared_expert_gate=False,
                             embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.5,
                             logits_scaling=2.0),
    "qwen2_moe": dict(norm_topk_prob=False, shared_expert_size=24, shared_expert_gate=True),
    "mixtral": dict(norm_topk_prob=True, shared_expert_size=0, shared_expert_gate=False),
    "deepseek_v1": dict(norm_topk_prob=False, routed_scaling_factor=1.5, shared_expert_size=24,
                        shared_expert_gate=False),
    "carved": dict(router_scoring="select", shared_expert_size=24, shared_expert_gate=False),
    "phimoe": dict(router_scoring="sparsemixer", router_jitter_eps=0.3, shared_expert_size=0,
                   shared_expert_gate=False),
}


@pytest.mark.parametrize("family", sorted(FAMILY_GATING))
def test_deterministic_plan_is_bit_identical_to_the_plain_forward(family):
  cfg = B.tiny_config(**FAMILY_GATING[family])
  params = B.init_params(cfg, jax.random.key(1), std=0.3)
  if cfg.router_bias:  # a selection bias that changes the selection
    params["layers"][1]["mlp"]["router"]["bias"] = jnp.array([0.5, -0.5, 0.0, 0.3])
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
  plain = B.forward(params, cfg, tokens, return_taps=True)
  plan = RT.RoutingPlan.of({i: RT.RouterConfig() for i in cfg.moe_layer_ids})
  for p in (params, RT.attach(params, {}, key=5)):
    out = B.forward(p, cfg, tokens, return_taps=True, routing=plan)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain.logits))
    for i in cfg.moe_layer_ids:
      np.testing.assert_array_equal(np.asarray(out.taps[i].gate_bsk), np.asarray(plain.taps[i].gate_bsk))


@pytest.mark.parametrize("family", sorted(FAMILY_GATING))
def test_gates_at_the_topk_equal_route(family):
  cfg = B.tiny_config(**FAMILY_GATING[family])
  x = jax.random.normal(jax.random.key(0), (50, 16))
  w = jax.random.normal(jax.random.key(1), (16, cfg.num_experts))
  gating = G.Gating.of(cfg)
  r = G.route(x, w, 2, norm_topk_prob=gating.norm_topk_prob, scaling=gating.scaling, scoring=gating.scoring,
              jitter_eps=gating.jitter_eps)
  np.testing.assert_array_equal(np.asarray(G.gates_at(r.logits_ne, r.expert_nk, gating)), np.asarray(r.gate_nk))
  np.testing.assert_array_equal(np.asarray(G.topk_ids(r.logits_ne, 2)), np.asarray(r.expert_nk))


def test_gumbel_topk_is_sequential_sampling_without_replacement():
  logits = jnp.array([1.0, 0.3, -0.5, 0.9, -1.2])
  p = np.asarray(jax.nn.softmax(logits))
  n = 200_000
  ids = np.asarray(G.gumbel_topk(jax.random.key(0), jnp.broadcast_to(logits, (n, 5)), 2))
  assert (ids[:, 0] != ids[:, 1]).all()
  for i, j in itertools.permutations(range(5), 2):
    exact = p[i] * p[j] / (1 - p[i])  # first i, then j from the rest
    freq = np.mean((ids[:, 0] == i) & (ids[:, 1] == j))
    assert abs(freq - exact) < 4 * np.sqrt(exact * (1 - exact) / n) + 1e-4, (i, j, freq, exact)


def test_gumbel_topk_at_low_temperature_is_the_topk():
  logits = jax.random.normal(jax.random.key(3), (64, 8))
  ids = G.gumbel_topk(jax.random.key(4), logits / 1e-4, 3)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(G.topk_ids(logits, 3)))


def test_jaccard_hand_built():
  a = jnp.array([[0, 1], [2, 3], [0, 1], [4, 5]])
  b = jnp.array([[1, 0], [2, 4], [2, 3], [4, 5]])
  np.testing.assert_allclose(np.asarray(G.jaccard(a, b, 6)), [1.0, 1 / 3, 0.0, 1.0])


def test_native_router_dtype_reproduces_transformers_bf16_router():
  """MoEConfig.router_dtype="native": the router's matmul in bfloat16 then float32, as transformers' Qwen2-MoE
  router in bf16: the same logits (but for a rare last bit). Top-k sets then differ only where transformers' own
  bf16 scores tie exactly (torch.topk's choice among equal values is implementation-defined), in both modes."""
  import torch
  from transformers import Qwen2MoeConfig
  from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
  torch.manual_seed(0)
  gate = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=512, num_experts=64, num_experts_per_tok=4))
  with torch.no_grad():
    gate.weight.normal_(0, 0.05)
    x = torch.randn(4096, 512).to(torch.bfloat16)
    gate = gate.to(torch.bfloat16)
    logits_ref, _, idx_ref = gate(x)
  ref_ne, idx_ref = logits_ref.float().numpy(), idx_ref.numpy()
  x_nd = jnp.asarray(x.float().numpy(), jnp.bfloat16)
  w_de = jnp.asarray(gate.weight.detach().float().numpy().T, jnp.bfloat16)
  for native in (True, False):
    r = G.route(x_nd, w_de, 4, norm_topk_prob=False, native=native)
    ours_ne, ours_nk = np.asarray(r.logits_ne), np.asarray(r.expert_nk)
    diff = np.abs(ours_ne - ref_ne)
    if native:  # bf16 roundings of the same sums: equal but for rare last bits (summation order)
      ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ours_ne), np.abs(ref_ne)) + 1e-30)) - 7)
      assert (diff <= 2 * ulp + 1e-4).all() and (diff > 0).mean() < 1e-3  # (near 0: cancellation)
    else:  # float32 logits are not rounded to bf16
      assert (diff > 0).mean() > 0.9
    # the experts we select score exactly as transformers' own choice under transformers' scores
    ours_scores = np.sort(np.take_along_axis(ref_ne, ours_nk, -1), -1)
    ref_scores = np.sort(np.take_along_axis(ref_ne, idx_ref, -1), -1)
    np.testing.assert_array_equal(ours_scores, ref_scores)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy", "noaux_tc"])
def test_deepseek_v2_v3_selection_equals_transformers_routers(method):
  """DeepSeek-V2's greedy / group-limited softmax router and V3's sigmoid router with a selection-only bias and
  noaux_tc groups: the same experts and weights as transformers' router modules on 2000 random tokens."""
  import torch
  from transformers import DeepseekV2Config, DeepseekV3Config
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
  torch.manual_seed(0)
  v3 = method == "noaux_tc"
  kw = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
  if v3:
    gate = DeepseekV3TopkRouter(DeepseekV3Config(**kw, routed_scaling_factor=2.5, norm_topk_prob=True))
  else:
    gate = DeepseekV2TopkRouter(DeepseekV2Config(**kw, topk_method=method, routed_scaling_factor=1.5))
  with torch.no_grad():
    gate.weight.normal_(0, 0.5)
    if v3:
      gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(2000, 32)
    _, w_ref, idx_ref = gate(x)
  bias = jnp.asarray(gate.e_score_correction_bias.numpy()) if v3 else None
  x_nd, w_de = jnp.asarray(x.numpy()), jnp.asarray(gate.weight.detach().numpy().T)
  common = dict(norm_topk_prob=v3, norm_eps=1e-20 if v3 else 0.0, scaling=2.5 if v3 else 1.5,
                scoring="sigmoid" if v3 else "softmax")
  r = G.route(x_nd, w_de, 4, topk_method=method, n_group=4, topk_group=2, bias_e=bias, **common)
  ours_ids, order = np.asarray(r.expert_nk), np.argsort(np.asarray(r.expert_nk), -1)
  ref_ids, ref_order = idx_ref.numpy(), np.argsort(idx_ref.numpy(), -1)
  np.testing.assert_array_equal(np.take_along_axis(ours_ids, order, -1), np.take_along_axis(ref_ids, ref_order, -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(r.gate_nk), order, -1),
                             np.take_along_axis(w_ref.numpy(), ref_order, -1), rtol=1e-5, atol=1e-7)
  if method != "greedy":  # the group limit (and bias) change the selection of some tokens
    plain = np.asarray(G.route(x_nd, w_de, 4, **common).expert_nk)
    assert (np.sort(plain, -1) != np.sort(ours_ids, -1)).any(-1).mean() > 0.05


@pytest.mark.parametrize("eps", [0.01, 0.2, 0.6])
def test_sparsemixer_equals_transformers(eps):
  """Phi-3.5-MoE's top-2 gates (transformers' sparsemixer in eval mode) on logits of mixed signs, with windows that
  keep one expert, a few, or most; ``route`` selects as it does and ``gates_at`` gives the same gates."""
  import torch
  from transformers.models.phimoe.modeling_phimoe import sparsemixer
  logits = np.random.RandomState(3).randn(64, 8).astype(np.float32)
  want_gates, want_ids = sparsemixer(torch.tensor(logits), jitter_eps=eps, training=False)
  ids = G.topk_ids(jnp.asarray(logits), 2)
  np.testing.assert_array_equal(ids, want_ids.numpy())
  gates = G.sparsemixer_gates(jnp.asarray(logits), ids, eps)
  np.testing.assert_allclose(gates, want_gates.numpy(), rtol=1e-6, atol=1e-7)
  assert 0.0 < float(jnp.mean(gates[:, 0] < 1.0 - 1e-6)) or eps == 0.01  # wider windows share the softmax
  np.testing.assert_allclose(G.gates_at(jnp.asarray(logits), ids, G.Gating(scoring="sparsemixer", jitter_eps=eps)),
                             gates, rtol=0, atol=0)
