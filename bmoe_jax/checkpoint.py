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
