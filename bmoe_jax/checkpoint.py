"""Saving and loading converted models (orbax), and ``load_model`` — the one call a user makes.

A converted directory holds ``bmoe_config.json`` (our ``MoEConfig`` plus where it came from) and
``params/`` (an orbax checkpoint of the parameter tree).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bmoe_jax.config import MoEConfig
from bmoe_jax.files import begin_artefact, first_line, incomplete, read_json, write_json
from bmoe_jax.identity import tree_digest

FORMAT = "bmoe_jax/params-v1"
CONFIG_FILE = "bmoe_config.json"


def save_params(out_dir: str | Path, cfg: MoEConfig, params: dict[str, Any],
                source: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
  """``out_dir/params`` (orbax) then ``out_dir/bmoe_config.json``, the record that makes the model complete
  (``files.begin_artefact``: an interrupted save's parts are replaced; a complete model is refused unless
  ``overwrite``)."""
  import orbax.checkpoint as ocp

  check_shapes(cfg, params, str(out_dir))
  out_dir = begin_artefact(out_dir, CONFIG_FILE, ("params",), overwrite=overwrite)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir / "params", jax.tree.map(jnp.asarray, params))
    ckptr.wait_until_finished()
  meta = {"format": FORMAT, "config": cfg.to_dict(), "source": source or {},
          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "params_digest": tree_digest(params)}
  write_json(out_dir / CONFIG_FILE, meta, sort_keys=True)
  return out_dir


def restore_local(path: str | Path):
  """An orbax tree restored onto this process's default device, whatever device topology saved it
  (a run on an 8-device mesh writes sharded arrays; orbax refuses to restore them as saved elsewhere).
  An unreadable (truncated, corrupt) save raises one ``CorruptSaveError`` naming it."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return _read_orbax(path, lambda ckptr, path, meta: ckptr.restore(path, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta, is_leaf=_is_meta)))


def stored_shapes(path: str | Path):
  """The tree of an orbax save's arrays as ``jax.ShapeDtypeStruct``s, read from its metadata (no array read)."""
  return _read_orbax(path, lambda ckptr, path, meta: jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta, is_leaf=_is_meta))


def _is_meta(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _read_orbax(path: str | Path, read):
  """``read(checkpointer, absolute path, item metadata)``; a missing save raises FileNotFoundError, an unreadable
  one ``CorruptSaveError``, each naming it."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()  # orbax refuses relative paths (not a damaged save)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} not found: expected an orbax save (a directory)")
  _quiet_orphaned_reads()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(path)
      return read(ckptr, path, getattr(meta, "item_metadata", meta))
  except Exception as err:  # orbax / TensorStore raise many types for damaged files
    raise CorruptSaveError(f"{path}: cannot be read, the save is damaged or incomplete ({first_line(err)}); "
                           "delete it and write it again") from err


def _quiet_orphaned_reads() -> None:
  """When an orbax read fails, TensorStore still completes the read's other pending futures; their callbacks
  find orbax's event loop closed and each prints a traceback ("Event loop is closed") through
  ``sys.unraisablehook`` around the one message, possibly before the error reaches us. Drop exactly those (the hook
  is installed once, before any read); every other unraisable goes on as before."""
  import sys

  previous = sys.unraisablehook
  if getattr(previous, "_bmoe_quiet", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook._bmoe_quiet = True
  sys.unraisablehook = hook


class CorruptSaveError(ValueError):
  """A save (orbax directory, its JSON record) that cannot be read back."""


def verify_digest(tree, recorded: str | None, where, record: str) -> None:
  """Refuse a restored tree whose ``identity.tree_digest`` differs from ``recorded``, the digest written at save
  into ``record`` (``None``: a save older than digests, not checked)."""
  if recorded is not None and tree_digest(tree) != recorded:
    raise CorruptSaveError(f"{where}: the arrays differ from the digest written at save ({record}): the files were "
                           "changed or damaged; write them again")


def check_shapes(cfg: MoEConfig, params, where: str) -> None:
  """Refuse parameters whose structure, shapes or kinds do not match ``cfg`` (a config saying 4 experts over
  8-expert weights, integer weights)."""
  from bmoe_jax.params import abstract_params
  from bmoe_jax.finite import path_name

  want = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  got = dict((path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(
      {k: v for k, v in params.items() if k != "routing"})[0])
  names = [path_name(p) for p, _ in want]
  if sorted(names) != sorted(got):
    diff = sorted(set(names) ^ set(got))
    raise ValueError(f"{where}: the parameters do not match the config's parameter names (differ at {diff[:5]})")
  for (p, spec), name in zip(want, names):
    a = got[name]
    if tuple(a.shape) != tuple(spec.shape):
      raise ValueError(f"{where}: parameter {name} has shape {list(a.shape)}, the config says {list(spec.shape)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{where}: parameter {name} has dtype {a.dtype}; weights must be floating point")


def read_record(path: Path, check: bool = False) -> tuple[dict, MoEConfig]:
  """(the record, its config) of a converted directory ``path``; ``check``: the stored arrays' shapes and kinds
  against the config, from the save's metadata (no weights read)."""
  meta_file = path / CONFIG_FILE
  meta = read_json(meta_file)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
  try:
    cfg = MoEConfig.from_dict(meta["config"])
  except (KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{meta_file}: invalid 'config' ({first_line(err)})") from None
  if check:
    check_shapes(cfg, stored_shapes(path / "params"), str(meta_file))
  return meta, cfg


def load_params(path: str | Path, verify: bool = True) -> tuple[MoEConfig, dict[str, Any]]:
  """(config, parameters) of a converted directory. ``verify``: refuse parameters that differ from the digest
  written at save, do not match the config's shapes, or hold NaN / inf (one message each, naming the file)."""
  path = Path(path).absolute()
  meta, cfg = read_record(path)
  params = restore_local(path / "params")
  if verify:
    check_shapes(cfg, params, str(path / CONFIG_FILE))
    verify_digest(params, meta.get("params_digest"), path / "params", f"{CONFIG_FILE}: params_digest")
    from bmoe_jax.finite import require_finite
    require_finite(params, f"{path / 'params'}", "the model is damaged or diverged")
  return cfg, params


PARAM_DTYPES = ("float32", "bfloat16", "float16", "float64")


def param_dtype(dtype: str | None, flag: str = "--dtype"):
  """The numpy dtype of a parameter cast named ``dtype`` (None: keep what is stored); refuses what a model cannot
  run in, and float64 unless JAX's x64 mode is on (JAX would silently store float32)."""
  if dtype is None:
    return None
  if str(dtype) not in PARAM_DTYPES:
    raise ValueError(f"{flag} {dtype}: parameters must be one of {', '.join(PARAM_DTYPES)}")
  if str(dtype) == "float64" and not jax.config.jax_enable_x64:
    raise ValueError(f"{flag} float64 needs JAX's 64-bit mode, which is off: set JAX_ENABLE_X64=1 (otherwise JAX "
                     "stores float32)")
  return jnp.dtype(dtype)


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                       progress: bool = True, allow_nonfinite: bool = False, router_dtype: str = "float32") -> Path:
  """HF checkpoint directory -> converted directory (``bmoe convert``). Weights holding NaN or inf are refused
  (naming them) unless ``allow_nonfinite``. ``router_dtype``: ``MoEConfig.router_dtype`` of the result."""
  from convert import load_hf_checkpoint

  info, params = load_hf_checkpoint(hf_dir, dtype=param_dtype(dtype), progress=progress,
                                    allow_nonfinite=allow_nonfinite)
  source = {"hf_dir": str(Path(hf_dir).absolute()), "family": info.family,
            "checkpoint_dtype": info.checkpoint_dtype, "dtype": dtype or "as stored"}
  return save_params(out_dir, info.cfg.replace(router_dtype=router_dtype), params, source)


def load_model(path: str | Path, dtype: str | None = None, progress: bool = False):
  """A ``MoEModel`` from an HF checkpoint directory (converted on the fly) or a converted directory.

  Args:
    dtype: e.g. "float32" or "bfloat16" to cast every parameter; None keeps what is stored.
  """
  from bmoe_jax.model import MoEModel

  path = Path(path)
  if (path / CONFIG_FILE).exists():
    cfg, params = load_params(path)
  elif (path / "config.json").exists():
    from convert import load_hf_checkpoint
    info, params = load_hf_checkpoint(path, progress=progress)
    cfg = info.cfg
  else:
    raise FileNotFoundError(f"{path}: neither a converted model ({CONFIG_FILE}) nor an HF checkpoint "
                            f"directory (config.json + *.safetensors){incomplete(path, CONFIG_FILE, ('params',))}")
  dtype = param_dtype(dtype, "dtype")
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
  return MoEModel(cfg, params=params)


DIGEST_KEY = "state_digest"  # a ResumableRun save's meta: the digest of its arrays


class ResumableRun:
  """The orbax saves of a long pass (fine-tuning, a factor pass) that a rerun resumes.

  ``directory`` holds ``fingerprint_file`` (JSON: what the pass computes, e.g. its config and the model's)
  and numbered saves, each a tree of arrays (``state``) plus a JSON dict (``meta``); the latest ``keep``
  are kept. A rerun with another fingerprint is refused, naming the file, so a resume never mixes two
  runs. ``read_only=True`` opens a finished run's saves (``fingerprint`` is then read, not written).
  """

  def __init__(self, directory: str | Path, fingerprint: dict | None, keep: int = 2, *,
               fingerprint_file: str = "run_fingerprint.json", read_only: bool = False):
    import orbax.checkpoint as ocp

    self.directory = Path(directory).absolute()
    self.fingerprint_path = self.directory / fingerprint_file
    if read_only:
      if not self.fingerprint_path.exists():
        raise FileNotFoundError(f"{self.fingerprint_path} not found: not a directory of saves of this kind")
      self.fingerprint = read_json(self.fingerprint_path)
    else:
      self.directory.mkdir(parents=True, exist_ok=True)
      self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
      from bmoe_jax.identity import differences, upgrade
      old = read_json(self.fingerprint_path) if self.fingerprint_path.exists() else self.fingerprint
      old = json.loads(json.dumps(upgrade(old), default=str))
      if old != self.fingerprint:
        diff = differences(old, self.fingerprint)
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise ValueError(f"{self.fingerprint_path}: the saves there are of a different run (it differs in "
                         f"{', '.join(diff[:6])}{more}); use a new directory, or delete it to start over")
      write_json(self.fingerprint_path, self.fingerprint)
    options = ocp.CheckpointManagerOptions(read_only=True) if read_only else \
        ocp.CheckpointManagerOptions(max_to_keep=keep)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, meta: dict | None = None) -> None:
    """Save ``state`` (a tree of arrays) and ``meta`` (JSON) as ``step`` (once per step)."""
    import orbax.checkpoint as ocp

    if self._mngr.latest_step() == step:
      return
    state = jax.tree.map(jnp.asarray, state)
    meta = {**(meta or {}), DIGEST_KEY: tree_digest(state)}
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._mngr.wait_until_finished()

  def restore(self, like, step: int | None = None):
    """(state shaped like ``like``, meta) of ``step`` (default: the latest save); an unreadable save, or one whose
    arrays differ from the digest written at save, raises ``CorruptSaveError`` naming it."""
    import orbax.checkpoint as ocp

    step = self._mngr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      got = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
    except Exception as err:  # orbax / TensorStore raise many types for damaged files
      raise CorruptSaveError(f"{self.directory / str(step)}: save {step} cannot be read, it is damaged or "
                             f"incomplete ({first_line(err)})") from err
    meta = dict(got["meta"] or {})
    verify_digest(got["state"], meta.pop(DIGEST_KEY, None), self.directory / str(step), f"its meta: {DIGEST_KEY}")
    return got["state"], meta

  def resume(self, like):
    """(step, state, meta) of the newest readable save, or None when there is none. A damaged save is
    reported, deleted and the one before it used; none readable raises ``CorruptSaveError``."""
    import warnings

    steps = self.steps()
    for step in reversed(steps):
      try:
        return (step, *self.restore(like, step))
      except CorruptSaveError as err:
        warnings.warn(f"{err}; deleting it and resuming from the save before it")
        self._mngr.delete(step)
    if steps:
      raise CorruptSaveError(f"{self.directory}: no save there can be read (steps {steps}); delete the directory "
                             "to start over")
    return None

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
