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
  """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4, "model": 1}`` (missing axes have size 1).

  Args:
    text: comma-separated ``axis=size`` pairs over ``data`` / ``expert`` / ``model`` (integer sizes >= 1), or a
      dict of the same; None, "" or {}: no mesh shape given.

  Returns:
    The size of every axis of ``MESH_AXES``, in that order; ``{}`` for None, "" or {} (``make_mesh`` then builds
      a data-parallel mesh over all devices).

  Raises:
    ValueError: a pair is malformed, a size is not an integer >= 1, or an axis name is unknown.
  """
  if text is None or text == "" or text == {}:
    return {}
  if isinstance(text, dict):
    items = dict(text)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items.values()):
      raise ValueError(f"mesh {text!r}: expected integer axis sizes >= 1, e.g. {{'data': 2, 'expert': 4}}")
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
  """A ``(data, expert, model)`` mesh over ``devices``.
  Auto axes: the compiler propagates shardings (GSPMD) from the declared inputs and outputs.

  Args:
    shape: the axis sizes (``parse_mesh``: e.g. ``"data=2,expert=4"``, or a dict), whose product must equal the
      number of devices; None or "": data-parallel over all devices (``data`` = their count, ``expert`` =
      ``model`` = 1).
    devices: the devices to lay out, in order; None: all of them (``jax.devices()``).

  Returns:
    A ``jax.sharding.Mesh`` with axes ``("data", "expert", "model")``, all ``jax.sharding.AxisType.Auto``.

  Raises:
    ValueError: ``shape`` does not parse, or its product differs from the number of devices (on CPU, set
      ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts).
  """
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
  """The PartitionSpec of an array with logical ``axes`` and ``shape`` (see the module docstring).

  Each dimension goes to the mesh axis its logical name maps to in ``rules``, unless that mesh axis has size 1,
  does not divide the dimension, or an earlier dimension of the array already took it: it then stays replicated.

  Args:
    axes: one logical axis name per dimension (keys of ``rules``, e.g. ``("expert", "mlp", "embed")`` for a
      routed ``w_down`` [e, f, d]); None for a dimension that is always replicated.
    shape: the array's shape, as long as ``axes``.
    mesh: the ``jax.sharding.Mesh`` (``make_mesh``) whose axis sizes decide.
    rules: logical axis name -> mesh axis name, or None for replicated: ``RULES`` (default) or ``FSDP_RULES``.

  Returns:
    A ``PartitionSpec`` with one entry per dimension: its mesh axis name, or None (replicated).

  Raises:
    ValueError: ``axes`` and ``shape`` differ in length, or a logical name in ``axes`` has no entry in ``rules``.
  """
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
  """NamedShardings of every parameter, in the params' tree structure.

  Args:
    cfg: the model's config; ``params.param_specs(cfg)`` gives each parameter's shape and logical axes.
    mesh: the mesh to place on (``make_mesh``).
    rules: logical axis -> mesh axis (``RULES`` or ``FSDP_RULES``; see ``spec_for``).

  Returns:
    A tree like ``param_specs(cfg)`` (the model's own parameters: no routing plan's state) with one
      ``NamedSharding`` per leaf.
  """
  return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.axes, s.shape, mesh, rules)), param_specs(cfg),
                      is_leaf=_is_spec)


def abstract_params(cfg: MoEConfig, mesh, dtype=jnp.float32, rules=RULES) -> dict[str, Any]:
  """ShapeDtypeStructs with their shardings: the target of a sharded restore, and of memory accounting.

  Args:
    cfg: the model's config; ``params.param_specs(cfg)`` gives each parameter's shape and logical axes.
    mesh: the mesh to place on (``make_mesh``).
    dtype: the dtype of every leaf (default float32).
    rules: logical axis -> mesh axis (``RULES`` or ``FSDP_RULES``; see ``spec_for``).

  Returns:
    A tree like ``param_specs(cfg)`` of ``jax.ShapeDtypeStruct`` (shape, ``dtype``, and the ``NamedSharding`` of
      ``param_shardings``); nothing is allocated.
  """
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=NamedSharding(
      mesh, spec_for(s.axes, s.shape, mesh, rules))), param_specs(cfg), is_leaf=_is_spec)


def shard_params(params, cfg: MoEConfig, mesh, rules=RULES):
  """Place a parameter tree (host or device arrays) onto the mesh.

  Args:
    params: the parameter tree, in ``params.param_specs(cfg)``'s structure (numpy or jax arrays).
    cfg: the model's config.
    mesh: the mesh to place on (``make_mesh``).
    rules: logical axis -> mesh axis (``RULES`` or ``FSDP_RULES``; see ``spec_for``).

  Returns:
    ``params`` as jax arrays placed by ``jax.device_put`` with ``param_shardings(cfg, mesh, rules)``.
  """
  return jax.device_put(params, param_shardings(cfg, mesh, rules))


def load_params(model_dir: str | Path, mesh, rules=RULES, dtype=None):
  """A converted model directory (``bmoe convert``) restored straight into its shardings: each device
  (each host) reads only its shards.

  Args:
    model_dir: the directory holding ``bmoe_config.json`` (``checkpoint.CONFIG_FILE``) and the Orbax
      checkpoint ``params/``.
    mesh: the mesh to restore onto (``make_mesh``).
    rules: logical axis -> mesh axis (``RULES`` or ``FSDP_RULES``; see ``spec_for``).
    dtype: the dtype every leaf is restored in; None: each leaf's stored dtype.

  Returns:
    ``(cfg, params)``: the ``MoEConfig`` stored in the directory, and the parameter tree as jax arrays placed
      with ``param_shardings(cfg, mesh, rules)``.
  """
  import orbax.checkpoint as ocp

  from bmoe_jax.checkpoint import CONFIG_FILE
  from bmoe_jax.files import read_json

  model_dir = Path(model_dir).absolute()
  meta = read_json(model_dir / CONFIG_FILE)
  cfg = MoEConfig.from_dict(meta["config"])
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(model_dir / "params")
    stored = getattr(stored, "item_metadata", stored)
    target = abstract_params(cfg, mesh, dtype or jnp.float32, rules)
    if dtype is None:
      target = _with_stored_dtypes(target, stored)
    params = ckptr.restore(model_dir / "params", target)
  return cfg, params


def _with_stored_dtypes(target, stored):
  """``target``'s leaves in the dtypes of the same parameters in the checkpoint's metadata ``stored`` (orbax
  keeps lists as dicts keyed "0", "1", ..., so the two trees are matched by path, not by structure)."""
  from jax.tree_util import tree_flatten_with_path

  def path_of(path):
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

  meta = tree_flatten_with_path(stored, is_leaf=lambda x: hasattr(x, "dtype") and hasattr(x, "shape"))[0]
  dtypes = {path_of(p): m.dtype for p, m in meta}
  flat, treedef = tree_flatten_with_path(target)
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(t.shape, dtypes.get(path_of(p), t.dtype),
                                                           sharding=t.sharding) for p, t in flat])


def leading_sharding(mesh, axis: str, size: int, ndim: int) -> NamedSharding:
  """An array of rank ``ndim`` split on its leading dimension (of ``size``) over ``axis`` where it divides.

  Args:
    mesh: the mesh (``make_mesh``).
    axis: the mesh axis to split over: ``"data"``, ``"expert"`` or ``"model"``.
    size: the leading dimension's length; split only when ``axis`` has more than one device and divides it.
    ndim: the array's rank; 0 gives a replicated scalar (``P()``).

  Returns:
    A ``NamedSharding`` with spec ``P(axis, None, ...)``, or ``P(None, None, ...)`` (replicated) where ``axis``
      does not split; ``ndim`` entries.
  """
  lead = axis if ndim >= 1 and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None
  return NamedSharding(mesh, P(lead, *([None] * max(ndim - 1, 0))) if ndim else P())


def batch_shardings(batch, mesh):
  """The batch's arrays split on their leading (example) dimension over ``data`` (replicated where the
  batch size does not divide); None fields stay None.

  Args:
    batch: a ``task.Batch`` (or any pytree) of arrays or ShapeDtypeStructs, each with the example dimension b
      first (``tokens_bs`` [b, s], ``labels_b`` [b], a ``Continuation``'s [b, ...] fields).
    mesh: the mesh (``make_mesh``).

  Returns:
    A tree like ``batch`` of ``NamedSharding`` (``leading_sharding(mesh, "data", b, ndim)`` per array).
  """
  return jax.tree.map(lambda x: leading_sharding(mesh, "data", x.shape[0], x.ndim), batch)


def shard_batch(batch, mesh):
  """Place a batch on the mesh, split on its example dimension over ``data`` (``batch_shardings``).

  Args:
    batch: a ``task.Batch`` (or any pytree) of host or device arrays, each with the example dimension b first.
    mesh: the mesh to place on (``make_mesh``).

  Returns:
    ``batch`` as jax arrays placed by ``jax.device_put`` with ``batch_shardings(batch, mesh)``; None fields stay
      None.
  """
  return jax.device_put(batch, batch_shardings(batch, mesh))


def expert_shardings(tree, mesh, num_experts: int):
  """Arrays whose leading dimension is ``num_experts`` (factors, statistics, posterior blocks) split on
  ``expert``, and their second dimension (f of ``a_eff`` / ``w_map``, d of ``g_edd``) on ``model`` where
  it divides: a device then holds its experts' rows; everything else replicated.

  Args:
    tree: a pytree of arrays or ShapeDtypeStructs, e.g. one block's ``kfac.LayerStats``, ``kfac.Factors`` or
      MAP weights ``w_map`` [e, f, d]; only shapes are read.
    mesh: the mesh (``make_mesh``).
    num_experts: e, the leading length that marks an expert-stacked array (1 for a shared-expert or router
      block: nothing is then split on ``expert``).

  Returns:
    A tree like ``tree`` of ``NamedSharding``: an array with leading dimension e gets ``expert`` on dimension 0
      (where that axis has more than one device and divides e) and, when of rank >= 3, ``model`` on dimension
      1 (likewise; rank-2 arrays such as ``a_eig_ef`` keep it replicated); every other array is replicated.
  """
  def one(x):
    if not (x.ndim and x.shape[0] == num_experts):
      return NamedSharding(mesh, P())
    lead = leading_sharding(mesh, "expert", num_experts, x.ndim).spec[0]
    m = mesh.shape["model"]
    second = "model" if x.ndim >= 3 and m > 1 and x.shape[1] % m == 0 else None
    return NamedSharding(mesh, P(lead, *([second] if x.ndim >= 2 else []), *([None] * max(x.ndim - 2, 0))))
  return jax.tree.map(one, tree)


def replicated(mesh) -> NamedSharding:
  """A fully replicated sharding: every device of ``mesh`` holds the whole array.

  Args:
    mesh: the mesh (``make_mesh``).

  Returns:
    ``NamedSharding(mesh, PartitionSpec())``.
  """
  return NamedSharding(mesh, P())


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays): the largest shard.

  Args:
    abstract_tree: a pytree of ``jax.ShapeDtypeStruct`` (e.g. ``abstract_params``) or arrays; a leaf without a
      sharding (a numpy array, an unsharded struct) counts in full.

  Returns:
    The sum over leaves of one shard's bytes (``sharding.shard_shape`` elements times the dtype's itemsize).
  """
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total
