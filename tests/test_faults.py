"""The fault suite (issue 39): for fine-tuning, the factor pass (``fit``), router training and conversion (``upcycle``
carving and healing a tiny dense llama), the command is
stopped at every write boundary (the k-th call of anything that persists: a resumable save, an orbax save, a
record) by a simulated SIGKILL or by a full disk (ENOSPC raised by that write), then rerun: the full disk is
one line and exit 2, and every rerun finishes with exactly the artefacts of an uninterrupted run.

The kill is simulated in-process (``Killed``, a ``BaseException`` raised right after the k-th write): the files
on disk are then what a SIGKILL at that boundary leaves. Real signals, real kills mid-save and the lock's
behaviour under a dead holder are tested with processes in ``test_interrupt``, ``test_kill_resume`` and
``test_files``."""

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from bmoe_jax import files
from bmoe_jax.checkpoint import ResumableRun
from bmoe_jax.cli import main
from tests.convert.upcycle.test_heal import HEAL, dense_dir  # noqa: F401  (a tiny dense llama, its text)
from tests.fixtures import tiny_model_dir

pytestmark = pytest.mark.heavy  # ~60 short CLI runs: scheduled first (tests/conftest.py)


class Killed(BaseException):
  """The process 'dies' here: nothing after the k-th write runs (``finally`` blocks do, writing nothing)."""


def _persisting():
  import orbax.checkpoint as ocp

  from convert import export
  return [(ResumableRun, "save"), (ocp.StandardCheckpointer, "save"), (files, "write_text"), (export, "save_file")]


@contextlib.contextmanager
def fault_at(k: int | None, kind: str = "kill"):
  """Count every persisting call; at the ``k``-th, ``kill`` (after it completes) or ``enospc`` (instead)."""
  count, saved = [0], [(owner, name, getattr(owner, name)) for owner, name in _persisting()]

  def wrap(original):
    def persist(*args, **kwargs):
      count[0] += 1
      if kind == "enospc" and count[0] == k:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/injected/by/the/test")
      got = original(*args, **kwargs)
      if kind == "kill" and count[0] == k:
        raise Killed(k)
      return got
    return persist

  for owner, name, original in saved:
    setattr(owner, name, wrap(original))
  try:
    yield count
  finally:
    for owner, name, original in saved:
      setattr(owner, name, original)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, dense_dir):  # noqa: F811
  root = tmp_path_factory.mktemp("faults")
  model = tiny_model_dir(root / "model", shared_data)
  common = ["--data-dir", shared_data, "--train", "obqa:train", "--max-train", "16", "--max-eval", "8",
            "--batch-size", "8", "--max-length", "64", "--scoring", "letters", "--quiet"]
  ft = ["finetune", "--model", str(model), "--val", "obqa:dev", "--epochs", "2", "--eval-every", "1",
        "--checkpoint-every", "2", "--lr", "1e-2", "--layers", "1"]
  assert main(ft + common + ["--out", str(root / "ft")]) == 0
  tuned = str(root / "ft" / "model")
  return {"finetune": ft + common, "fit": ["fit", "--model", tuned, "--prior-mean", "zero", "--rank", "4"] + common,
          "route-train": ["route-train", "--model", tuned, "--kind", "mfvr", "--route-layers", "last:1",
                          "--route-epochs", "2", "--route-checkpoint-every", "1"] + common,
          "upcycle": ["upcycle", str(dense_dir / "dense"), "--calib-text", str(dense_dir / "text.txt"),
                      "--heal-cache", str(dense_dir / "cache"), "--quiet"] + [
                          f"--{k.replace('_', '-')}={v}" for k, v in {**HEAL, "heal_epochs": 1,
                                                                      "heal_layerwise_epochs": 0,
                                                                      "heal_checkpoint_every": 4}.items()]}


ARTEFACTS = {"finetune": [("model/bmoe_config.json", "params_digest"),
                          ("model_final/bmoe_config.json", "params_digest"),
                          ("run.json", "history")],
             "fit": [("posterior/posterior.json", "digest"), ("run.json", "log_marglik_final")],
             "route-train": [("routers/routing.json", "digest"), ("run.json", "history")]}


def _artefacts(command: str, out: Path) -> dict:
  if command == "upcycle":  # the healed weights and the healing curve
    record = json.loads((out / "upcycle.json").read_text()) if (out / "upcycle.json").exists() else None
    return {"weights": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() if record else None,
            "history": record and [{k: v for k, v in h.items() if k != "seconds"}
                                   for h in record["carve"]["heal"]["history"]]}
  return {f"{path}:{key}": json.loads((out / path).read_text())[key] if (out / path).exists() else None
          for path, key in ARTEFACTS[command]}


def _argv(setup, command: str, out: Path) -> list[str]:
  argv = setup[command]
  return argv[:2] + [str(out)] + argv[2:] if command == "upcycle" else argv + ["--out", str(out)]


@pytest.mark.parametrize("command", ["finetune", "fit", "route-train", "upcycle"])
def test_stopped_at_every_write_then_rerun_equals_an_uninterrupted_run(command, setup, tmp_path, capsys):
  argv = lambda out: _argv(setup, command, out)
  with fault_at(None) as count:
    assert main(argv(tmp_path / "whole")) == 0
  want, writes = _artefacts(command, tmp_path / "whole"), count[0]
  assert writes >= 4 and all(v is not None for k, v in want.items() if "model_final" not in k), want
  for k in range(1, writes + 1):
    out = tmp_path / f"killed{k}"
    with pytest.raises(Killed), fault_at(k):
      main(argv(out))
    assert main(argv(out)) == 0, f"rerun after a kill at write {k} of {writes}"
    assert _artefacts(command, out) == want, f"kill at write {k} of {writes}"
  capsys.readouterr()
  for k in range(1, writes + 1):
    out = tmp_path / f"full{k}"
    with fault_at(k, "enospc"):
      assert main(argv(out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0] == (f"bmoe {command}: error: /injected/by/the/test: no space left on the device "
                                        "(errno ENOSPC); what was saved so far is kept: make room and rerun the "
                                        "same command to resume"), (k, err)
    assert main(argv(out)) == 0 and _artefacts(command, out) == want, f"ENOSPC at write {k}"


def test_a_real_full_disk_is_one_line_and_the_rerun_finishes(setup, tmp_path):
  """``finetune`` into a 450 KiB tmpfs (it needs ~1 MiB): one line naming the file, no traceback (orbax's
  background threads log the error too); after the tmpfs grows, the same command finishes. Needs the right to
  mount a tmpfs (root on Linux); elsewhere the injected ENOSPC above stands in for it."""
  import subprocess
  import sys

  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mnt)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (not root)")
  try:
    argv = [sys.executable, "-m", "bmoe_jax.cli", *setup["finetune"], "--out", str(mnt / "ft")]
    full = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    err = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 2 and len(err) == 1 and "no space left on the device (errno ENOSPC)" in err[0], err
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    assert main(setup["finetune"] + ["--out", str(mnt / "ft")]) == 0
    assert json.loads((mnt / "ft" / "model" / "bmoe_config.json").read_text())["params_digest"]
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)
