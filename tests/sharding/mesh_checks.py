"""Sharded steps against single-device ones, on 8 virtual CPU devices; run in its own process:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding.mesh_checks [MESH ...] [--mla MESH ...]
      [--gpt-oss MESH ...] [--llama4 MESH ...] [--qwen3-next MESH ...] [--phimoe MESH ...]

For each mesh (default: three shapes, two of them expert-parallel; meshes after ``--mla``: DeepSeek-V3's
architecture, ``MLA_SIGMOID``, after ``--gpt-oss`` GPT-OSS's, after ``--llama4`` Llama-4's, after ``--qwen3-next``
Qwen3-Next's and after ``--phimoe`` Phi-3.5-MoE's, instead of OLMoE's full-width q/k norm) it compares the forward logits, the
answer logits, one MAP training step, the K-FAC factors of two batches (full; low-rank on the last mesh), the log
evidence and the Bayesian-MoE predictive with the same functions run unsharded, and checks every output
carries its declared sharding. Prints one JSON line per mesh (with its ``model``); exits non-zero on the first
failure. One process checks both models (the test suite starts one)."""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import bmoe_jax as B
from bmoe_jax import laplace as LA
from bmoe_jax import sharded as SH
from bmoe_jax import sharding as S
from bmoe_jax import train as T
from bmoe_jax.task import Batch, Task
from tests.fixtures import posterior_of

MESHES = ("data=8", "data=2,expert=4", "data=2,expert=2,model=2")
CLASSES = jnp.array([3, 7, 11, 19])
TOL = 1e-5
MLA_SIGMOID = dict(num_experts=8, num_experts_per_tok=2, vocab_size=128, shared_expert_size=16,
                   shared_expert_gate=False, num_kv_heads=4, head_dim=4, q_lora_rank=6, kv_lora_rank=8,
                   qk_nope_head_dim=6, v_head_dim=6, rope_interleave=True, rope_type="yarn", rope_factor=4.0,
                   yarn_original_max_position=4, yarn_mscale=1.0, yarn_mscale_all_dim=0.7, router_scoring="sigmoid",
                   topk_method="noaux_tc", n_group=2, topk_group=1, router_bias=True, norm_topk_prob=True,
                   norm_topk_eps=1e-20, routed_scaling_factor=2.5, index_topk=3, index_heads=16, index_head_dim=6)


def _batches(cfg, n=2, b=8, s=7, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    tokens = rng.randint(0, cfg.vocab_size, (b, s))
    lengths = rng.randint(3, s + 1, b)
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    out.append(Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths - 1), jnp.asarray(tokens[:, 0] % 4)))
  return out


def _diff(a, b) -> float:
  """Max |a - b| over a tree, relative to max(1, max |b|)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)) / max(1.0, float(np.max(np.abs(y), initial=0.0))))
  return worst


def _grams(state):
  """Low-rank factors are unique only up to a rotation of their columns: compare a a^T and g g^T."""
  def one(st):
    if isinstance(st, LA.lowrank.LowRankStats):
      return (jnp.einsum("efr,egr->efg", st.a_efr, st.a_efr), jnp.einsum("edr,egr->edg", st.g_edr, st.g_edr),
              st.rows_e)
    return st
  return {blk: one(st) for blk, st in state.stats.items()}, state.num_sequences, state.log_lik


def _check_shardings(name, got_tree, want_tree):
  for g, w in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree)):
    if not g.sharding.is_equivalent_to(w, g.ndim):
      raise AssertionError(f"{name}: output sharding {g.sharding.spec} is not the declared {w.spec}")


def reference(cfg, params, batches, spec, tc):
  """Single-device results of every step."""
  f = jax.jit(lambda p, b: B.forward(p, cfg, b.tokens_bs, b.mask_bs).logits)
  task = Task(cfg, CLASSES)
  tl = jax.jit(task.logits)
  mask = T.trainable_mask(params, cfg, tc.trainable)
  train, frozen = T.split(params, mask)
  opt = T.make_optimizer(tc, 4)
  step = jax.jit(T.make_train_step(task, opt, tc.prior_precision / 16.0))
  new_train, _, loss, _ = step(train, opt.init(train), batches[0], frozen, train)
  out = {"logits": f(params, batches[0]), "task": tl(params, batches[0]), "train": new_train, "loss": loss}
  for name, sp in spec.items():
    upd = jax.jit(lambda st, p, b, k, sp=sp: LA.kfac.update(st, p, task, b, sp, k))
    state = LA.kfac.init(cfg, sp, jnp.float64)
    for i, b in enumerate(batches):
      state = upd(state, params, b, jax.random.key(i))
    out[f"factors_{name}"] = state
  state = out["factors_full"]
  post = posterior_of(LA.kfac.finalize(state), params, num_sequences=int(state.num_sequences), prior_precision=3.0,
                      log_lik=state.log_lik)
  out["post"] = post
  out["evidence"] = jax.jit(LA.posterior.log_marginal_likelihood)(post)
  out["probs"] = jax.jit(lambda p, po, b: LA.predictive.predict(po, p, task, b, link="probit_pairwise").probs_bc)(
      params, post, batches[1])
  return out


def check_mesh(text, cfg, params, batches, spec, tc, ref) -> dict:
  mesh = S.make_mesh(text)
  diffs = {}
  psh = S.param_shardings(cfg, mesh)
  p_sharded = S.shard_params(params, cfg, mesh)
  _check_shardings("params", p_sharded, psh)
  b0, b1 = (S.shard_batch(b, mesh) for b in batches)
  task = Task(cfg, CLASSES)
  fwd = SH.forward(task, mesh, b0)
  logits = fwd(p_sharded, b0)
  lowered = fwd.lower(p_sharded, b0)
  _check_shardings("forward", logits, lowered.compile().output_shardings)
  # with an expert axis the sorted expert path runs in shard_map (manual sharding), else under GSPMD
  expert_parallel = "manual" in lowered.as_text()
  if expert_parallel != (mesh.shape["expert"] > 1):
    raise AssertionError(f"mesh {text}: expert-parallel shard_map path used: {expert_parallel}")
  diffs["logits"] = _diff(logits, ref["logits"])
  f_bc = SH.task_logits(task, mesh, b0)(p_sharded, b0)
  _check_shardings("task logits", f_bc, S.leading_sharding(mesh, "data", 8, 2))
  diffs["task_logits"] = _diff(f_bc, ref["task"])
  step, init, split = SH.train_step(task, mesh, params, b0, tc, total_steps=4, dataset_size=8)
  train, frozen = split(p_sharded)
  new_train, _, loss, _ = step(train, init(train), b0, frozen, train)
  _check_shardings("train step", new_train, T.split(psh, T.trainable_mask(params, cfg, tc.trainable))[0])
  diffs["train_step"] = max(_diff(new_train, ref["train"]), _diff(loss, ref["loss"]))
  for name, sp in spec.items():
    if name == "lowrank" and text != MESHES[-1]:  # low-rank factors on the mesh with all three axes only
      continue
    update, zero = SH.factor_update(task, mesh, b0, sp, dtype=jnp.float64)
    state = zero()
    for i, b in enumerate((b0, b1)):
      state = update(state, p_sharded, b, jax.random.key(i))
    _check_shardings(f"factors {name}", state, SH.factor_shardings(cfg, mesh, sp, jnp.float64))
    diffs[f"factors_{name}"] = _diff(_grams(state), _grams(ref[f"factors_{name}"]))
  post = ref["post"]
  post_sharded = jax.device_put(post, SH.posterior_shardings(post, mesh))
  diffs["evidence"] = _diff(SH.log_evidence(post, mesh)(post_sharded), ref["evidence"])
  probs = SH.predictive(task, mesh, post, b1)(p_sharded, post_sharded, b1)
  _check_shardings("predictive", probs, S.leading_sharding(mesh, "data", 8, 2))
  diffs["predictive"] = _diff(probs, ref["probs"])
  expert_split = post_sharded.factors[LA.Block(0)].a_vec_eff.sharding.spec[0]
  return {"mesh": dict(mesh.shape), "expert_axis_of_factors": expert_split, "expert_parallel": expert_parallel,
          "max_rel_diff": diffs}


MODELS = {
    # OLMoE's full-width q/k norm: a reduction over the heads the model axis shards
    "qk_full": dict(num_experts=8, num_experts_per_tok=2, vocab_size=128, shared_expert_size=16, qk_norm="full",
                    qkv_clip=1.5),
    # DeepSeek-V3's architecture: MLA with yarn, sigmoid noaux_tc routing, shared experts; V3.2's indexer keeping 3 keys
    "mla_sigmoid": MLA_SIGMOID,
    # GPT-OSS: sinks sharded with their heads, a sliding window, an affine router, biased clamped-SwiGLU experts
    "gpt_oss": dict(num_experts=8, num_experts_per_tok=2, vocab_size=128, shared_expert_size=16, attn_sinks=True,
                    attn_windows=(4, 0), router_logit_bias=True, expert_bias=True, swiglu_limit=0.5,
                    norm_topk_prob=True, attn_out_bias=True),
    # Llama-4: chunked RoPE and NoPE layers, the weightless q/k norm, a top-1 score scaling the expert's input
    "llama4": dict(num_experts=8, num_experts_per_tok=1, vocab_size=128, shared_expert_size=16, shared_expert_gate=False,
                   router_scoring="sigmoid", router_on_input=True, qk_norm="l2", rope_interleave=True,
                   rope_layers=(True, False), attn_chunks=(3, 0), nope_attn_scale=0.5, nope_floor_scale=2.0),
    # Qwen3-Next: Gated DeltaNet (key and value heads split over the model axis) below gated attention, 1 + w norms
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, vocab_size=128, shared_expert_size=16,
                       linear_layers=(True, False), linear_k_heads=2, linear_v_heads=4, linear_k_dim=4, linear_v_dim=4,
                       linear_conv_width=3, attn_output_gate=True, norm_unit_offset=True, qk_norm="head", rotary_dim=4),
    # Phi-3.5-MoE: LayerNorms with their biases, the head's bias split over the vocabulary, longrope past its original
    # context, the sparsemixer (and, unlike Phi, an ungated shared expert: the checks' factor pass includes one)
    "phimoe": dict(num_experts=8, num_experts_per_tok=2, vocab_size=128, shared_expert_size=16, shared_expert_gate=False,
                   layer_norm=True, lm_head_bias=True, router_scoring="sparsemixer", router_jitter_eps=0.3,
                   rope_type="longrope", longrope_short_factor=(1.0, 1.5, 2.0, 3.0), longrope_long_factor=(2.0,) * 4,
                   longrope_short_mscale=1.1, longrope_long_mscale=1.3, longrope_original_max_position=4),
}
FLAGS = {"--mla": "mla_sigmoid", "--gpt-oss": "gpt_oss", "--llama4": "llama4",
         "--qwen3-next": "qwen3_next", "--phimoe": "phimoe"}  # later meshes check that model
# GPT-OSS's random biases and sinks leave some gradient entries near AdamW's eps, where its first step
# (about lr * g / (|g| + eps)) turns the float32 rounding of the attention and router softmaxes (logits agree to
# 1.1e-7) into 3e-5 of w_gate; every other quantity is held to TOL. So would a softmax top-k renormalised over the
# selected experts (norm_topk_prob): the float32 router's gradient on the unselected experts' logits is zero only up
# to the rounding of the softmax's normaliser, which that first step scales to ~lr (measured on the Qwen3-Next model
# below with it: 8e-4 to 4e-3 of the router kernel, the only parameter that moved), so that model does not
# renormalise (MLA_SIGMOID's renormalised sigmoids have no normaliser to round).
TOLS = {"gpt_oss": {"train_step": 1e-3}}


def check_model(name: str, meshes) -> int:
  """Every mesh in ``meshes`` against one device for model ``name``; prints a JSON line per mesh."""
  cfg = B.tiny_config(**MODELS[name])
  params = B.init_params(cfg, jax.random.key(0), jnp.float64, std=0.2,
                         bias_std=0.2 if cfg.expert_bias or cfg.layer_norm else 0.0)
  batches = _batches(cfg)
  spec = {"full": LA.FactorSpec(layers=cfg.moe_layer_ids, shared=True),
          "lowrank": LA.FactorSpec(layers=cfg.moe_layer_ids, rank=4, labels="mc")}
  tc = T.TrainConfig(trainable="experts_router", lr=1e-2, prior_precision=1.0)
  ref = reference(cfg, params, batches, spec, tc)
  for text in meshes:
    t0 = time.perf_counter()
    res = {"model": name, **check_mesh(text, cfg, params, batches, spec, tc, ref)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)
    bad = {k: v for k, v in res["max_rel_diff"].items() if not v <= TOLS.get(name, {}).get(k, TOL)}
    if bad:
      print(f"{name} on mesh {text}: differs from one device beyond {TOL}: {bad}", file=sys.stderr)
      return 1
  return 0


def main(argv) -> int:
  # float64: the comparison is of the mathematics, not of float32 summation orders (one AdamW step maps
  # a gradient g to about lr * sign(g), which turns rounding noise on near-zero gradients into lr-sized
  # differences in float32). Set here, not at import: the test suite imports MESHES from this module.
  jax.config.update("jax_enable_x64", True)
  if jax.device_count() < 8:
    print(f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
          "before JAX starts", file=sys.stderr)
    return 2
  groups, name = {"qk_full": []}, "qk_full"
  for arg in argv:
    if arg in FLAGS:
      name = FLAGS[arg]
      groups[name] = []
    else:
      groups[name].append(arg)
  empty = [flag for flag, model in FLAGS.items() if model in groups and not groups[model]]
  if empty:
    print(f"{empty[0]} needs at least one mesh after it", file=sys.stderr)
    return 2
  if len(groups) == 1 and not groups["qk_full"]:
    groups["qk_full"] = list(MESHES)
  for name, meshes in groups.items():
    if meshes and (rc := check_model(name, meshes)):
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
