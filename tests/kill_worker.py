"""The worker of the kill-and-resume harness (``tests/test_kill_resume.py``): one resumable pass on a tiny model,
run as ``python -m tests.kill_worker {finetune|factors} OUT DATA_SEED`` (or called in-process: ``main``); writes
OUT/result.npz when it finishes (the result's arrays, and ``saves``: the steps this run saved).
Each save is slowed a little (``SLOW_SAVE_S``) so that the harness can kill it between and during saves."""

import sys
import time
from pathlib import Path

import jax
import numpy as np

SLOW_SAVE_S = 0.3


def main(kind: str, out: str, data_seed: int) -> None:
  from bmoe_jax.checkpoint import ResumableRun

  save = ResumableRun.save
  saves = []

  def slow_save(self, *a, **kw):
    time.sleep(SLOW_SAVE_S)
    saves.append(a[0])
    return save(self, *a, **kw)

  ResumableRun.save = slow_save
  try:
    _run(kind, Path(out), data_seed, saves)
  finally:
    ResumableRun.save = save


def _run(kind: str, out: Path, data_seed: int, saves: list) -> None:
  import bmoe_jax as B
  from bmoe_jax import laplace as LA
  from bmoe_jax import train as T
  from bmoe_jax.task import Task
  from tests.fixtures import CLASSES, synthetic_task

  cfg = B.tiny_config(num_experts=4)
  params = B.init_params(cfg, jax.random.key(0), std=0.2)
  data = synthetic_task(cfg, 6, seed=data_seed)
  if kind == "finetune":
    tc = T.TrainConfig(trainable="experts", lr=3e-3, epochs=3, checkpoint_every=1, keep_checkpoints=2)
    res = T.finetune(params, Task(cfg, CLASSES), data, tc, checkpoint_dir=out / "run", progress=False)
    leaves = jax.tree.leaves(res.params)
  else:
    spec = LA.FactorSpec(layers=(0, 1), labels="mc", tokens="expand", rank=3)
    state = LA.fit_factors(params, Task(cfg, CLASSES), data * 3, spec, key=jax.random.key(5),
                           checkpoint_dir=out / "run", checkpoint_every=1, progress=False)
    leaves = jax.tree.leaves(state)
  np.savez(out / "result.npz", *[np.asarray(x) for x in leaves], saves=np.asarray(saves))  # steps this run saved


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
