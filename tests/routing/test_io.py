"""Routers on disk: a roundtrip, a config mismatch, and arrays changed after save (read back, refused by the
digest written at save)."""

import json
import shutil

import numpy as np
import pytest

import bmoe_jax as B
from bmoe_jax.checkpoint import CorruptSaveError, restore_local
from bmoe_jax.routing import RouterConfig
from bmoe_jax.routing.io import load_routers, save_routers
from bmoe_jax.routing.plan import RoutingPlan


def test_routers_roundtrip_and_refuse_changed_arrays_or_another_config(tmp_path, monkeypatch):
  cfg = B.tiny_config(num_experts=4)
  plan = RoutingPlan.of({1: RouterConfig(kind="mfvr")})
  rng = np.random.default_rng(0)
  trees = [{1: {"w": rng.standard_normal((cfg.hidden_size, 4)).astype(np.float32)}} for _ in range(2)]
  for i, tree in enumerate(trees):
    save_routers(tmp_path / f"r{i}", plan, tree, cfg, meta={"history": [i]})
  got_plan, got, meta = load_routers(tmp_path / "r0", cfg)
  monkeypatch.chdir(tmp_path)
  np.testing.assert_array_equal(restore_local("r0/routers")["1"]["w"], trees[0][1]["w"])  # a relative path
  assert got_plan == plan and meta == {"history": [0]}
  np.testing.assert_array_equal(got[1]["w"], trees[0][1]["w"])
  with pytest.raises(ValueError, match=r"routing.json: the routers were trained for another model config .*"
                                       r"num_experts"):
    load_routers(tmp_path / "r0", B.tiny_config(num_experts=8))
  shutil.rmtree(tmp_path / "r1" / "routers")  # r0's arrays under r1's record: readable, but not what was saved
  shutil.copytree(tmp_path / "r0" / "routers", tmp_path / "r1" / "routers")
  with pytest.raises(CorruptSaveError, match=r"r1/routers: the arrays differ from the digest written at save "
                                             r"\(routing.json: digest\)"):
    load_routers(tmp_path / "r1", cfg)
  (tmp_path / "r1" / "routing.json").write_text("{broken")
  with pytest.raises(ValueError, match="r1/routing.json: not valid JSON"):
    load_routers(tmp_path / "r1", cfg)
  assert json.loads((tmp_path / "r0" / "routing.json").read_text())["digest"]


def test_routers_saved_before_a_config_field_existed_load(tmp_path):
  """A routing.json written before MoEConfig gained fields (qk_norm, router_dtype, ...) loads when those fields are
  at their defaults; a non-default value is another config, named."""
  cfg = B.tiny_config()
  save_routers(tmp_path / "r", RoutingPlan.of({1: RouterConfig()}), {1: {}}, cfg)
  record = json.loads((tmp_path / "r" / "routing.json").read_text())
  for added in ("qk_norm", "router_dtype"):
    record["config"].pop(added)
  (tmp_path / "r" / "routing.json").write_text(json.dumps(record))
  assert load_routers(tmp_path / "r", cfg)[0].layer_ids == (1,)
  with pytest.raises(ValueError, match=r"another model config \(differs in \['qk_norm'\]\)"):
    load_routers(tmp_path / "r", cfg.replace(qk_norm="head"))
