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

FORMAT = "bmoe_jax/params-v1"
CONFIG_FILE = "bmoe_config.json"


def save_params(out_dir: str | Path, cfg: MoEConfig, params: dict[str, Any],
                source: dict[str, Any] | None = None) -> Path:
  import orbax.checkpoint as ocp

  out_dir = Path(out_dir).absolute()
  if (out_dir / "params").exists():
    raise FileExistsError(f"{out_dir / 'params'} already exists; choose an empty output directory")
  out_dir.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir / "params", jax.tree.map(jnp.asarray, params))
    ckptr.wait_until_finished()
  meta = {"format": FORMAT, "config": cfg.to_dict(), "source": source or {},
          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
  (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
  return out_dir


def restore_local(path: str | Path):
  """An orbax tree restored onto this process's default device, whatever device topology saved it
  (a run on an 8-device mesh writes sharded arrays; orbax refuses to restore them as saved elsewhere)."""
  import orbax.checkpoint as ocp

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta,
                          is_leaf=is_meta)
    return ckptr.restore(path, target)


def load_params(path: str | Path) -> tuple[MoEConfig, dict[str, Any]]:
  path = Path(path).absolute()
  meta_file = path / CONFIG_FILE
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
  cfg = MoEConfig.from_dict(meta["config"])
  return cfg, restore_local(path / "params")


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                       progress: bool = True) -> Path:
  """HF checkpoint directory -> converted directory (``bmoe convert``)."""
  from convert import load_hf_checkpoint

  info, params = load_hf_checkpoint(hf_dir, dtype=None if dtype is None else np.dtype(dtype),
                                    progress=progress)
  source = {"hf_dir": str(Path(hf_dir).absolute()), "family": info.family,
            "checkpoint_dtype": info.checkpoint_dtype, "dtype": dtype or "as stored"}
  return save_params(out_dir, info.cfg, params, source)


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
                            "directory (config.json + *.safetensors)")
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
  return MoEModel(cfg, params=params)


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
      self.fingerprint = json.loads(self.fingerprint_path.read_text())
    else:
      self.directory.mkdir(parents=True, exist_ok=True)
      self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
      old = json.loads(self.fingerprint_path.read_text()) if self.fingerprint_path.exists() else self.fingerprint
      if old != self.fingerprint:
        from bmoe_jax.identity import differences
        diff = differences(old, self.fingerprint)
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise ValueError(f"{self.fingerprint_path}: the saves there are of a different run (it differs in "
                         f"{', '.join(diff[:6])}{more}); use a new directory, or delete it to start over")
      self.fingerprint_path.write_text(json.dumps(self.fingerprint, indent=2))
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
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta or {})))
    self._mngr.wait_until_finished()

  def restore(self, like, step: int | None = None):
    """(state shaped like ``like``, meta) of ``step`` (default: the latest save)."""
    import orbax.checkpoint as ocp

    step = self._mngr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    got = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
    return got["state"], dict(got["meta"] or {})

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
