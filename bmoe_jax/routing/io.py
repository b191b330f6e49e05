"""Trained routers on disk: ``DIR/routing.json`` (the plan, the model config they were trained for, what the
training recorded) and ``DIR/routers`` (orbax: the router parameters by layer)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from bmoe_jax.files import begin_artefact, incomplete, read_json, write_json
from bmoe_jax.identity import tree_digest, upgrade
from bmoe_jax.routing.plan import RoutingPlan

PLAN_FILE = "routing.json"


def save_routers(out_dir: str | Path, plan: RoutingPlan, router_params: dict, cfg, meta: dict | None = None, *,
                 overwrite: bool = False) -> Path:
  """Write ``router_params`` ({layer: dict of arrays}) and then ``plan`` to ``out_dir``: the plan's record makes
  the routers complete (``files.begin_artefact``: an interrupted save's parts are replaced; complete routers are
  refused unless ``overwrite``)."""
  import orbax.checkpoint as ocp

  out = begin_artefact(out_dir, PLAN_FILE, ("routers",), overwrite=overwrite)
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
    raise FileNotFoundError(f"{path / PLAN_FILE} not found: expected the output of bmoe route-train"
                            f"{incomplete(path, PLAN_FILE, ('routers',))}")
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
