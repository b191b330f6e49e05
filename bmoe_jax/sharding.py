"""Meshes and shardings: one logical-axis rules table mapped onto a ``(data, expert, model)`` mesh.

Every parameter carries logical axis names (``params.param_specs``); ``RULES`` maps them to mesh axes:
batch -> data, expert -> expert, mlp / heads / kv_heads / vocab -> model, embed -> None (``FSDP_RULES``:
embed -> data, the weights then also split over the data-parallel devices). A dimension stays replicated
where its mesh axis has size 1, does not divide it, or is already used by another dimension of the array.

Expert-stacked arrays (routed-expert weights, K-FAC factors ``[e, f, f]``, the posterior) are split on
the expert axis, so the ``vmap`` over experts stays local to each device; batches are split on data, and
the factor sums over the batch become XLA all-reduces. The jitted functions below declare their input and
output shardings (``jax.jit(f, in_shardings=, out_shardings=)``); the compiler partitions the rest (GSPMD).
Multi-host: call ``jax.distributed.initialize()`` first; ``load_params`` then reads on each host only
the shards its devices hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bmoe_jax.config import MoEConfig
from bmoe_jax.params import ParamSpec, param_specs

MESH_AXES = ("data", "expert", "model")
RULES: dict[str, str | None] = {"batch": "data", "expert": "expert", "mlp": "model", "heads": "model",
                                "kv_heads": "model", "vocab": "model", "embed": None, "head_dim": None,
                                "lora": None}
FSDP_RULES = dict(RULES, embed="data")


def parse_mesh(text: str | dict | None) -> dict[str, int]:
  """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4, "model": 1}`` (missing axes have size 1)."""
  if text is None or text == "":
    return {}
  if isinstance(text, dict):
    items = dict(text)
  else:
    items = {}
    for part in str(text).split(","):
      name, eq, size = part.strip().partition("=")
      if not eq or not size.strip().isdigit() or int(size) < 1:
        raise ValueError(f"mesh {text!r}: expected comma-separated axis=size with sizes >= 1, e.g. data=2,expert=4")
      items[name.strip()] = int(size)
  bad = sorted(set(items) - set(MESH_AXES))
  if bad:
    raise ValueError(f"mesh {text!r}: unknown axes {bad}; the axes are {list(MESH_AXES)}")
  return {a: int(items.get(a, 1)) for a in MESH_AXES}


def make_mesh(shape: str | dict | None = None, devices=None) -> jax.sharding.Mesh:
  """A ``(data, expert, model)`` mesh over ``devices`` (default all); ``shape`` None: data-parallel over all.
  Auto axes: the compiler propagates shardings (GSPMD) from the declared inputs and outputs."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(shape) or {"data": len(devices), "expert": 1, "model": 1}
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(f"mesh {sizes} has {total} devices but {len(devices)} are available "
                     f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                     "before JAX starts")
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def spec_for(axes: tuple, shape: tuple, mesh, rules=RULES) -> P:
  """The PartitionSpec of an array with logical ``axes`` and ``shape`` (see the module docstring)."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {shape}")
  used, out = set(), []
  for name, size in zip(axes, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    axis = rules.get(name) if name is not None else None
    n = mesh.shape[axis] if axis is not None else 1
    if axis is None or n == 1 or size % n or axis in used:
      out.append(None)
    else:
      used.add(axis)
      out.append(axis)
  return P(*out)


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_shardings(cfg: MoEConfig, mesh, rules=RULES) -> dict[str, Any]:
  """NamedShardings of every parameter, in the params' tree structure."""
  return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.axes, s.shape, mesh, rules)), param_specs(cfg),
                      is_leaf=_is_spec)


def abstract_params(cfg: MoEConfig, mesh, dtype=jnp.float32, rules=RULES) -> dict[str, Any]:
  """ShapeDtypeStructs with their shardings: the target of a sharded restore, and of memory accounting."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=NamedSharding(
      mesh, spec_for(s.axes, s.shape, mesh, rules))), param_specs(cfg), is_leaf=_is_spec)


def shard_params(params, cfg: MoEConfig, mesh, rules=RULES):
  """Place a parameter tree (host or device arrays) onto the mesh."""
  return jax.device_put(params, param_shardings(cfg, mesh, rules))


def load_params(model_dir: str | Path, mesh, rules=RULES, dtype=None):
  """A converted model directory (``bmoe convert``) restored straight into its shardings: each device
  (each host) reads only its shards. Returns (cfg, params)."""
  import orbax.checkpoint as ocp

  from bmoe_jax.checkpoint import CONFIG_FILE
  from bmoe_jax.files import read_json

  model_dir = Path(model_dir).absolute()
  meta = read_json(model_dir / CONFIG_FILE)
  cfg = MoEConfig.from_dict(meta["config"])
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(model_dir / "params")
    stored = getattr(stored, "item_metadata", stored)
    leaves = jax.tree.leaves(stored, is_leaf=lambda x: hasattr(x, "dtype") and hasattr(x, "shape"))
    target = abstract_params(cfg, mesh, dtype or leaves[0].dtype, rules)
    params = ckptr.restore(model_dir / "params", target)
  return cfg, params


def leading_sharding(mesh, axis: str, size: int, ndim: int) -> NamedSharding:
  """An array of rank ``ndim`` split on its leading dimension (of ``size``) over ``axis`` where it divides."""
  lead = axis if ndim >= 1 and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None
  return NamedSharding(mesh, P(lead, *([None] * max(ndim - 1, 0))) if ndim else P())


def batch_shardings(batch, mesh):
  """The batch's arrays split on their leading (example) dimension over ``data`` (replicated where the
  batch size does not divide); None fields stay None."""
  return jax.tree.map(lambda x: leading_sharding(mesh, "data", x.shape[0], x.ndim), batch)


def shard_batch(batch, mesh):
  return jax.device_put(batch, batch_shardings(batch, mesh))


def expert_shardings(tree, mesh, num_experts: int):
  """Arrays whose leading dimension is ``num_experts`` (factors, statistics, posterior blocks) split on
  ``expert``, and their second dimension (f of ``a_eff`` / ``w_map``, d of ``g_edd``) on ``model`` where
  it divides: a device then holds its experts' rows; everything else replicated."""
  def one(x):
    if not (x.ndim and x.shape[0] == num_experts):
      return NamedSharding(mesh, P())
    lead = leading_sharding(mesh, "expert", num_experts, x.ndim).spec[0]
    m = mesh.shape["model"]
    second = "model" if x.ndim >= 3 and m > 1 and x.shape[1] % m == 0 else None
    return NamedSharding(mesh, P(lead, *([second] if x.ndim >= 2 else []), *([None] * max(x.ndim - 2, 0))))
  return jax.tree.map(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays): the largest shard."""
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total
