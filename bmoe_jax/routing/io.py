"""Trained routers on disk: ``DIR/routing.json`` (the plan, the model config they were trained for, what the
training recorded) and ``DIR/routers`` (orbax: the router parameters by layer)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from bmoe_jax.files import read_json, write_json
from bmoe_jax.identity import tree_digest, upgrade
from bmoe_jax.routing.plan import RoutingPlan

PLAN_FILE = "routing.json"


def save_routers(out_dir: str | Path, plan: RoutingPlan, router_params: dict, cfg, meta: dict | None = None) -> Path:
  """Write ``plan`` and ``router_params`` ({layer: dict of arrays}) to ``out_dir`` (refuses to overwrite)."""
  import orbax.checkpoint as ocp

  out = Path(out_dir).absolute()
  if (out / PLAN_FILE).exists():
    raise FileExistsError(f"{out / PLAN_FILE} already exists; choose an empty output directory")
  out.mkdir(parents=True, exist_ok=True)
  tree = {str(int(l)): jax.tree.map(jnp.asarray, p) for l, p in router_params.items()}
  if jax.tree.leaves(tree):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(out / "routers", tree)
      ckptr.wait_until_finished()
  record = {"plan": plan.to_dict(), "config": cfg.to_dict(), "digest": tree_digest(tree), "meta": meta or {}}
  write_json(out / PLAN_FILE, record, default=str)
  return out


def load_routers(path: str | Path, cfg=None) -> tuple[RoutingPlan, dict[int, dict], dict]:
  """(plan, {layer: router parameters}, meta) saved by ``save_routers``; ``cfg``: refuse routers trained
  for another model config."""
  from bmoe_jax.checkpoint import restore_local, verify_digest

  path = Path(path).absolute()
  if not (path / PLAN_FILE).exists():
    raise FileNotFoundError(f"{path / PLAN_FILE} not found: expected the output of bmoe route-train")
  saved = upgrade(read_json(path / PLAN_FILE))  # config fields added since, at their defaults, change nothing
  saved_cfg = json.loads(json.dumps(saved["config"]))
  if cfg is not None and saved_cfg != json.loads(json.dumps(cfg.to_dict())):
    diff = sorted(k for k, v in cfg.to_dict().items() if json.loads(json.dumps(v)) != saved_cfg.get(k))
    raise ValueError(f"{path / PLAN_FILE}: the routers were trained for another model config (differs in {diff})")
  plan = RoutingPlan.from_dict(saved["plan"])
  tree = restore_local(path / "routers") if (path / "routers").exists() else {}
  verify_digest(tree, saved.get("digest"), path / "routers", f"{PLAN_FILE}: digest")
  params = {l: dict(tree.get(str(l), {})) for l in plan.layer_ids}
  return plan, params, saved.get("meta", {})
