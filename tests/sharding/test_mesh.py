"""Sharding: the rules table and mesh parsing here; the sharded pipeline on 8 virtual CPU devices in its
own process (``mesh_checks``: XLA_FLAGS must be set before JAX starts)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bmoe_jax as B
from bmoe_jax import sharding as S

pytestmark = pytest.mark.heavy  # a mesh_checks process and a meshed bmoe fit: scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
EIGHT_DEVICES = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()


@pytest.fixture(scope="module")
def mesh_results():
  """One ``mesh_checks`` process (8 virtual devices) for both models: the JSON line of each (model, mesh)."""
  from tests.sharding.mesh_checks import MESHES
  env = dict(os.environ, XLA_FLAGS=EIGHT_DEVICES, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "tests.sharding.mesh_checks", *MESHES, "--mla", "data=2,expert=2,model=2",
         "--gpt-oss", "data=2,expert=2,model=2", "--llama4", "data=2,expert=2,model=2",
         "--qwen3-next", "data=2,expert=2,model=2", "--phimoe", "data=2,expert=2,model=2"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  return {model: [r for r in results if r["model"] == model]
          for model in ("qk_full", "mla_sigmoid", "gpt_oss", "llama4", "qwen3_next", "phimoe")}


def test_sharded_pipeline_equals_one_device_on_three_meshes(mesh_results):
  results = mesh_results["qk_full"]
  assert len(results) == 3 and "factors_lowrank" in results[-1]["max_rel_diff"]
  assert any(r["mesh"]["expert"] > 1 and r["expert_axis_of_factors"] == "expert" for r in results)
  assert all(r["expert_parallel"] == (r["mesh"]["expert"] > 1) for r in results)  # shard_map expert dispatch
  assert any(r["mesh"]["model"] > 1 for r in results) and any(r["mesh"]["data"] == 8 for r in results)
  for r in results:
    assert set(r["max_rel_diff"]) >= {"logits", "task_logits", "train_step", "factors_full", "evidence", "predictive"}
    assert max(r["max_rel_diff"].values()) <= 1e-5, r


def test_sharded_mla_sigmoid_model_equals_one_device(mesh_results):
  """DeepSeek-V3's architecture (MLA latents replicated, heads on the model axis; sigmoid noaux_tc routing with
  its selection bias; ungated shared experts) with V3.2's lightning indexer (replicated; 3 keys per query) on the mesh
  that uses all three axes."""
  (result,) = mesh_results["mla_sigmoid"]
  assert result["mesh"] == {"data": 2, "expert": 2, "model": 2}
  assert result["expert_parallel"] and max(result["max_rel_diff"].values()) <= 1e-5, result


def test_sharded_gpt_oss_model_equals_one_device(mesh_results):
  """GPT-OSS's mechanisms (sinks split with their heads over the model axis, an affine router, experts with biases
  folded into their weights under the expert-parallel dispatch, the clamped SwiGLU) on all three axes."""
  (result,) = mesh_results["gpt_oss"]
  assert result["mesh"] == {"data": 2, "expert": 2, "model": 2}
  diffs = dict(result["max_rel_diff"])
  assert result["expert_parallel"] and diffs.pop("train_step") <= 1e-3, result  # AdamW near eps (mesh_checks.TOLS)
  assert max(diffs.values()) <= 1e-5, result


def test_sharded_llama4_model_equals_one_device(mesh_results):
  """Llama-4's mechanisms (chunked and NoPE layers, the weightless q/k norm on heads split over the model axis, the
  top-1 score scaling the expert's input under the expert-parallel dispatch) on all three axes."""
  (result,) = mesh_results["llama4"]
  assert result["mesh"] == {"data": 2, "expert": 2, "model": 2}
  assert result["expert_parallel"] and max(result["max_rel_diff"].values()) <= 1e-5, result


def test_sharded_qwen3_next_model_equals_one_device(mesh_results):
  """Qwen3-Next's mechanisms (Gated DeltaNet with its key and value heads split over the model axis, the attention's
  output gate, norms by 1 + w) on all three axes."""
  (result,) = mesh_results["qwen3_next"]
  assert result["mesh"] == {"data": 2, "expert": 2, "model": 2}
  assert result["expert_parallel"] and max(result["max_rel_diff"].values()) <= 1e-5, result


def test_sharded_phimoe_model_equals_one_device(mesh_results):
  """Phi-3.5-MoE's mechanisms (LayerNorms with biases, the head's bias split over the vocabulary, longrope past its
  original context, the sparsemixer under the expert-parallel dispatch) on all three axes."""
  (result,) = mesh_results["phimoe"]
  assert result["mesh"] == {"data": 2, "expert": 2, "model": 2}
  assert result["expert_parallel"] and max(result["max_rel_diff"].values()) <= 1e-5, result


def _mesh(**sizes):
  return types.SimpleNamespace(shape={a: sizes.get(a, 1) for a in S.MESH_AXES})


def test_rules_map_logical_axes_to_mesh_axes():
  mesh = _mesh(data=2, expert=4, model=2)
  assert S.spec_for(("expert", "mlp", "embed"), (8, 16, 32), mesh) == P("expert", "model", None)
  assert S.spec_for(("expert", "embed", "mlp"), (6, 32, 16), mesh) == P(None, None, "model")  # 6 % 4 != 0
  assert S.spec_for(("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh) == P(None, None, None)
  assert S.spec_for(("vocab", "embed"), (128, 32), mesh, S.FSDP_RULES) == P("model", "data")
  assert S.spec_for(("mlp", "mlp"), (16, 16), mesh) == P("model", None)  # a mesh axis is used once
  assert S.spec_for(("batch", None), (8, 5), _mesh(expert=8)) == P(None, None)  # size-1 axis: replicated
  with pytest.raises(ValueError, match="logical axis 'rows' has no sharding rule"):
    S.spec_for(("rows",), (4,), mesh)
  with pytest.raises(ValueError, match="do not match shape"):
    S.spec_for(("embed",), (4, 4), mesh)


def test_mesh_parsing_and_errors():
  assert S.parse_mesh("data=2,expert=4") == {"data": 2, "expert": 4, "model": 1}
  assert S.parse_mesh(None) == S.parse_mesh("") == S.parse_mesh({}) == {}  # all: data-parallel over every device
  assert S.parse_mesh({"expert": 2}) == {"data": 1, "expert": 2, "model": 1}
  for bad, msg in (("data=2,pipe=2", "unknown axes \\['pipe'\\]"), ("data:2", "expected comma-separated"),
                   ("data=0", "sizes >= 1"), ({"data": 0}, "integer axis sizes >= 1"),
                   ({"data": 2.0}, "integer axis sizes >= 1")):
    with pytest.raises(ValueError, match=msg):
      S.parse_mesh(bad)
  with pytest.raises(ValueError, match="has 8 devices but 1 are available.*xla_force_host_platform_device_count"):
    S.make_mesh("data=2,expert=4", devices=jax.devices()[:1])
  mesh = S.make_mesh(devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "expert": 1, "model": 1}


def test_sharded_restore_and_memory_accounting(tmp_path):
  """A converted directory restores straight into its shardings (here a one-device mesh); per-device
  bytes follow the shard shapes."""
  from bmoe_jax.checkpoint import save_params

  cfg = B.tiny_config(num_experts=4)
  params = B.init_params(cfg, jax.random.key(0))
  save_params(tmp_path / "m", cfg, params)
  mesh = S.make_mesh(devices=jax.devices()[:1])
  got_cfg, got = S.load_params(tmp_path / "m", mesh)
  assert got_cfg == cfg
  for a, b, sh in zip(jax.tree.leaves(got), jax.tree.leaves(params), jax.tree.leaves(S.param_shardings(cfg, mesh))):
    assert a.sharding == sh and (a == b).all()
  full = S.per_device_bytes(S.abstract_params(cfg, mesh))
  assert full == 4 * B.count_params(cfg)["total"]
  # a checkpoint of mixed dtypes restores each leaf in its own stored dtype (not all in the embedding's)
  mixed = {**params, "embed": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["embed"])}
  save_params(tmp_path / "mixed", cfg, mixed)
  _, got = S.load_params(tmp_path / "mixed", mesh)
  assert [a.dtype for a in jax.tree.leaves(got)] == [a.dtype for a in jax.tree.leaves(mixed)]
  assert {str(a.dtype) for a in jax.tree.leaves(got)} == {"bfloat16", "float32"}
  assert {str(a.dtype) for a in jax.tree.leaves(S.load_params(tmp_path / "mixed", mesh, dtype=jnp.float32)[1])} == {
      "float32"}


def test_bmoe_fit_on_a_mesh_gives_the_same_posterior(tmp_path, shared_data):
  """``bmoe fit --mesh data=2,expert=4`` (8 virtual devices, its own process) against the same fit on one
  device: same prior precision and log evidence."""
  from tests.fixtures import tiny_model_dir

  model = tiny_model_dir(tmp_path / "model", shared_data, num_experts=8, rows=200)
  env = dict(os.environ, XLA_FLAGS=EIGHT_DEVICES, JAX_PLATFORMS="cpu")
  runs = {}
  for mesh in ("", "data=2,expert=4"):  # one device here, in this process; the mesh in its own (8 devices)
    out = tmp_path / f"fit{len(mesh)}"
    args = ["fit", "--model", str(model), "--data-dir", shared_data, "--train", "obqa:train", "--max-train", "32",
            "--batch-size", "8", "--max-length", "96", "--prior", "layer", "--prior-mean", "zero", "--quiet",
            "--out", str(out)] + (["--mesh", mesh] if mesh else [])
    if mesh:
      proc = subprocess.run([sys.executable, "-m", "bmoe_jax.cli", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
      assert proc.returncode == 0, proc.stderr[-4000:]
    else:
      from bmoe_jax.cli import main
      assert main(args) == 0
    runs[mesh] = json.loads((out / "run.json").read_text())
  one, meshed = runs[""], runs["data=2,expert=4"]
  assert meshed["config"]["mesh"] == "data=2,expert=4"
  # float32 end to end: the evidence is flat at its optimum, so rounding of the factors moves lambda by
  # ~1e-4 relative; at one lambda the two posteriors' evidences agree to float32 rounding
  assert meshed["prior_precision"] == pytest.approx(one["prior_precision"], rel=2e-3)
  from bmoe_jax.laplace import load_posterior, posterior as PO
  post_one, post_mesh = (load_posterior(tmp_path / f"fit{n}" / "posterior") for n in (0, len("data=2,expert=4")))
  at = post_one.log_prior_prec_e
  assert float(PO.log_marginal_likelihood(post_mesh, at)) == pytest.approx(
      float(PO.log_marginal_likelihood(post_one, at)), rel=1e-5)
  for blk, fac in post_one.factors.items():
    for a, b in zip(fac, post_mesh.factors[blk]):
      if a.ndim < 3:  # eigenvalues and row counts (eigenvectors are unique only up to sign)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
