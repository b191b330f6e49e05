"""Orbax save/load, ``load_model`` from both directory kinds, the fused in-memory key layout, and the
``bmoe convert`` / ``bmoe info`` commands."""

import gc
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.checkpoint import convert_checkpoint, load_params
from bmoe_jax.cli import describe, main
from tests.fixtures import assert_same_conversion
from convert import load_hf_checkpoint
from convert.reference import make_checkpoint
from tests.fixtures import hf_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return hf_checkpoint(tmp_path_factory, "deepseek_v1", seed=2)


def test_convert_roundtrip_and_load_model(hf_dir, tmp_path):
  out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
  cfg, params = load_params(out)
  info, ref = load_hf_checkpoint(hf_dir, progress=False)
  assert cfg == info.cfg
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), b)
  tokens = np.arange(12).reshape(2, 6) % cfg.vocab_size
  m1, m2 = B.load_model(out), B.load_model(hf_dir)
  np.testing.assert_array_equal(m1(tokens).logits, m2(tokens).logits)
  with pytest.raises(FileExistsError):
    convert_checkpoint(hf_dir, out, progress=False)


def test_load_model_dtype_cast(hf_dir):
  m = B.load_model(hf_dir, dtype="bfloat16")
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(m.pure_params()))
  out = m(np.zeros((1, 4), np.int32))
  assert np.isfinite(np.asarray(out.logits)).all()


def test_load_model_bad_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a converted model"):
    B.load_model(tmp_path)


def test_fused_in_memory_layout_is_accepted(tmp_path):
  """transformers 5's in-memory names (experts.gate_up_proj [E,2F,D], experts.down_proj [E,D,F],
  Mixtral's mlp.* renames) convert to the same parameters as the on-disk per-expert keys."""
  model = make_checkpoint("mixtral", tmp_path / "disk", seed=4)
  fused = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
  assert_same_conversion(tmp_path / "disk", fused, tmp_path / "fused")


def test_cli_convert_and_info(hf_dir, tmp_path, capsys):
  assert main(["convert", str(hf_dir), str(tmp_path / "c"), "--quiet", "--dtype", "float32"]) == 0
  assert "wrote" in capsys.readouterr().out
  assert load_params(tmp_path / "c")[0].router_dtype == "float32"
  assert main(["convert", str(hf_dir), str(tmp_path / "n"), "--quiet", "--router-dtype", "native"]) == 0
  assert load_params(tmp_path / "n")[0].router_dtype == "native"
  assert main(["info", str(tmp_path / "c")]) == 0
  text = capsys.readouterr().out
  assert "deepseek_v1" in text and "D M M" in text and "params total" in text
  assert main(["info", str(hf_dir), "--json"]) == 0
  d = json.loads(capsys.readouterr().out)
  assert d["params"]["total"] == sum(int(np.prod(a.shape)) for a in
                                     jax.tree.leaves(load_hf_checkpoint(hf_dir, progress=False)[1]))


def test_cli_reports_conversion_errors(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert main(["info", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "bmoe info: error:" in err and "model_type='gpt2'" in err


def test_resumable_run_saves_restores_and_refuses_another_run(tmp_path):
  from bmoe_jax.checkpoint import ResumableRun

  tree = {"w": np.arange(6.0).reshape(2, 3), "n": np.asarray(3)}
  with ResumableRun(tmp_path, {"config": {"a": 1}, "spec": [1, 2]}, keep=2, fingerprint_file="f.json") as run:
    assert run.latest_step() is None
    for step in (1, 2, 3):
      run.save(step, {**tree, "n": np.asarray(step)}, {"history": [step]})
    run.save(3, tree)  # a step is saved once
    assert run.steps() == [2, 3]  # keep=2
    got, meta = run.restore(tree)
    assert int(got["n"]) == 3 and meta == {"history": [3]}
    np.testing.assert_array_equal(got["w"], tree["w"])
  with ResumableRun(tmp_path, None, fingerprint_file="f.json", read_only=True) as run:
    assert run.fingerprint == {"config": {"a": 1}, "spec": [1, 2]}
    assert int(run.restore(tree, step=2)[0]["n"]) == 2
  with pytest.raises(ValueError, match="f.json: the saves there are of a different run .it differs in spec"):
    ResumableRun(tmp_path, {"config": {"a": 1}, "spec": [1]}, fingerprint_file="f.json")
  with pytest.raises(FileNotFoundError, match="nothing.json not found"):
    ResumableRun(tmp_path, None, fingerprint_file="nothing.json", read_only=True)


def test_a_config_field_added_since_at_its_default_resumes(tmp_path):
  """Saves made before MoEConfig gained a field (e.g. qk_norm) are the same run when the field is at its default;
  a non-default value is a different run, named."""
  from bmoe_jax.checkpoint import ResumableRun

  cfg = B.tiny_config()
  old = cfg.to_dict()
  for added in ("qk_norm", "logits_scaling", "router_dtype"):
    old.pop(added)
  (tmp_path / "f.json").write_text(json.dumps({"config": old, "spec": 1}))
  with ResumableRun(tmp_path, {"config": cfg.to_dict(), "spec": 1}, fingerprint_file="f.json"):
    pass
  (tmp_path / "f.json").write_text(json.dumps({"config": old, "spec": 1}))
  with pytest.raises(ValueError, match="differs in config.qk_norm"):
    ResumableRun(tmp_path, {"config": cfg.replace(qk_norm="head").to_dict(), "spec": 1}, fingerprint_file="f.json")


@pytest.fixture(autouse=True)
def _collect_after():
  """Collect the failed orbax / asyncio objects of a damaged-save test at its teardown: left to a later GC pass,
  their finalizers can run inside another test's ``ast.parse`` and trip CPython 3.11's "AST constructor
  recursion depth mismatch"."""
  yield
  gc.collect()


def _damage(directory):
  """Overwrite the middle of every stored array file under ``directory`` (flipped bytes on disk)."""
  files = [f for f in directory.rglob("*") if f.is_file() and f.stat().st_size > 64 and "json" not in f.name
           and "METADATA" not in f.name.upper()]
  assert files
  for f in files:
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 32] = bytes(range(200, 232))
    f.write_bytes(bytes(raw))


def test_a_damaged_save_is_named_and_the_one_before_it_resumes(tmp_path):
  from bmoe_jax.checkpoint import CorruptSaveError, ResumableRun

  tree = {"w": np.random.RandomState(0).randn(64, 64), "n": np.asarray(0)}
  with ResumableRun(tmp_path, {"a": 1}, keep=3) as run:
    for step in (1, 2):
      run.save(step, {**tree, "n": np.asarray(step)}, {"step": step})
  _damage(tmp_path / "2")
  with ResumableRun(tmp_path, {"a": 1}, keep=3) as run:
    with pytest.raises(CorruptSaveError, match=r"/2: save 2 cannot be read"):
      run.restore(tree, 2)
    with pytest.warns(UserWarning, match="save 2 cannot be read.*deleting it and resuming from the save before it"):
      step, got, meta = run.resume(tree)
    assert step == 1 and int(got["n"]) == 1 and meta == {"step": 1} and run.steps() == [1]
    run.save(2, {**tree, "n": np.asarray(2)})  # the step is written again, not skipped
    assert int(run.restore(tree)[0]["n"]) == 2
  for step in (1, 2):
    _damage(tmp_path / str(step))
  with ResumableRun(tmp_path, {"a": 1}, keep=3) as run:
    with pytest.warns(UserWarning), pytest.raises(CorruptSaveError, match="no save there can be read"):
      run.resume(tree)


def test_a_changed_but_readable_save_fails_its_digest_and_the_one_before_it_resumes(tmp_path):
  """Step 1's arrays under step 2's record read back without error; the digest written at save catches it."""
  from bmoe_jax.checkpoint import CorruptSaveError, ResumableRun

  tree = {"w": np.random.RandomState(0).randn(8, 8), "n": np.asarray(0)}
  with ResumableRun(tmp_path, {"a": 1}, keep=3) as run:
    for step in (1, 2):
      run.save(step, {**tree, "n": np.asarray(step)}, {"step": step})
  shutil.rmtree(tmp_path / "2" / "state")
  shutil.copytree(tmp_path / "1" / "state", tmp_path / "2" / "state")
  with ResumableRun(tmp_path, {"a": 1}, keep=3) as run:
    with pytest.raises(CorruptSaveError, match=r"/2: the arrays differ from the digest written at save \(its meta"):
      run.restore(tree, 2)
    with pytest.warns(UserWarning, match="differ from the digest.*resuming from the save before it"):
      step, got, meta = run.resume(tree)
    assert step == 1 and int(got["n"]) == 1 and meta == {"step": 1}


def test_a_damaged_or_mismatched_model_directory_is_refused(hf_dir, tmp_path):
  from bmoe_jax.checkpoint import CorruptSaveError

  out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
  meta = json.loads((out / "bmoe_config.json").read_text())
  wrong = {**meta, "config": {**meta["config"], "num_experts": meta["config"]["num_experts"] // 2}}
  (out / "bmoe_config.json").write_text(json.dumps(wrong))
  with pytest.raises(ValueError, match=r"bmoe_config.json: parameter .* has shape .*, the config says"):
    load_params(out)
  with pytest.raises(ValueError, match=r"bmoe_config.json: parameter .* has shape .*, the config says"):
    describe(out)  # bmoe info: from the save's metadata, no weights read
  (out / "bmoe_config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "num_experts": "eight"}}))
  with pytest.raises(ValueError, match="bmoe_config.json: invalid 'config' .*num_experts must be an integer"):
    load_params(out)
  (out / "bmoe_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="bmoe_config.json: not valid JSON"):
    load_params(out)
  (out / "bmoe_config.json").write_text(json.dumps(meta))
  _damage(out / "params")
  with pytest.raises(CorruptSaveError, match="params"):
    load_params(out)


def test_orphaned_read_callbacks_of_a_failed_restore_are_quiet(monkeypatch):
  """TensorStore callbacks of a failed orbax read hit a closed event loop; only those unraisables are dropped."""
  import sys
  import types

  from bmoe_jax import checkpoint as C

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  C._quiet_orphaned_reads()
  C._quiet_orphaned_reads()  # installed once
  report = lambda err: sys.unraisablehook(types.SimpleNamespace(exc_value=err))
  report(RuntimeError("Event loop is closed"))
  report(RuntimeError("something else"))
  report(ValueError("Event loop is closed"))
  assert seen == ["something else", "Event loop is closed"]
