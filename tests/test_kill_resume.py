"""Kill-and-resume harness: a fine-tuning run and a factor pass are SIGKILLed in a subprocess at random points
(between saves and in the middle of one), then rerun: the result equals an uninterrupted run's (run in this
process); a rerun on other data into the same directory is refused, naming the data."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import kill_worker

pytestmark = pytest.mark.heavy  # six worker processes, four of them SIGKILLed: scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def _start(kind, out, data_seed=0):
  return subprocess.Popen([sys.executable, "-m", "tests.kill_worker", kind, str(out), str(data_seed)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def _steps(run_dir):
  return sorted(int(p.name) for p in run_dir.glob("[0-9]*") if p.name.isdigit()) if run_dir.is_dir() else []


def _kill_after(proc, run_dir, saves: int, extra_s: float):
  """SIGKILL once ``saves`` saves exist, ``extra_s`` later (0 < extra_s < the worker's slowed save: mid-save)."""
  seen = set()
  deadline = time.time() + 240
  while len(seen) < saves and proc.poll() is None and time.time() < deadline:
    seen.update(_steps(run_dir))
    time.sleep(0.02)
  time.sleep(extra_s)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _result(out):
  """(the result's arrays, the steps the finishing process saved)."""
  with np.load(out / "result.npz") as z:
    arrays = [z[k] for k in sorted((k for k in z.files if k != "saves"), key=lambda k: int(k.split("_")[1]))]
    return arrays, z["saves"]


@pytest.mark.parametrize("kind", ["finetune", "factors"])
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(kind, tmp_path):
  rng = np.random.RandomState({"finetune": 0, "factors": 1}[kind])
  killed = tmp_path / "killed"
  for _ in range(2):  # killed twice: between saves, then in the middle of one
    proc = _start(kind, killed)
    _kill_after(proc, killed / "run", saves=len(_steps(killed / "run")) + int(rng.randint(2, 5)),
                extra_s=float(rng.uniform(0.0, 0.25)))
    assert proc.returncode == -signal.SIGKILL and not (killed / "result.npz").exists()
  rc, err = _finish(_start(kind, killed))
  assert rc == 0, err[-3000:]
  (tmp_path / "whole").mkdir()
  kill_worker.main(kind, str(tmp_path / "whole"), 0)
  (got, resumed_saves), (want, all_saves) = _result(killed), _result(tmp_path / "whole")
  assert 0 < len(resumed_saves) < len(all_saves) and resumed_saves[0] > all_saves[0]  # it resumed, not restarted
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # the same directory with other data: refused, naming what differs
  with pytest.raises(ValueError, match="differs in data|batches of other data"):
    kill_worker.main(kind, str(killed), 1)
