"""Ctrl-C and SIGTERM on a real ``bmoe`` process (``bmoe_jax.interrupt``): inside the fine-tuning loop the run
saves at its next step and says so in one line, exit 130; outside the loops it leaves at once, one line, exit
143 for SIGTERM; never a traceback; a full disk is one line too; the rerun of the same command finishes the run."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bmoe_jax import files
from bmoe_jax.cli import main
from tests.fixtures import tiny_model_dir

pytestmark = pytest.mark.heavy  # two bmoe processes and a rerun: scheduled first (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data):
  return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", shared_data)


def _argv(model_dir, shared_data, out):
  return ["finetune", "--model", str(model_dir), "--data-dir", shared_data, "--train", "obqa:train", "--val",
          "obqa:dev", "--max-train", "24", "--max-eval", "8", "--batch-size", "8", "--max-length", "64",
          "--scoring", "letters", "--epochs", "40", "--eval-every", "30", "--checkpoint-every", "3", "--lr", "1e-3",
          "--layers", "1", "--quiet", "--out", str(out)]


def _as_in_a_terminal():
  """The child as a terminal's foreground job: SIGINT at its default even when this process runs in the
  background (where shells ignore it, and bmoe keeps an ignored signal ignored)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_when(argv, signum, ready, timeout=240):
  proc = subprocess.Popen([sys.executable, "-m", "bmoe_jax.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=_as_in_a_terminal)
  deadline = time.time() + timeout
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, [line for line in err.splitlines() if line.strip()]


def test_sigint_in_the_loop_saves_says_one_line_and_the_rerun_finishes(model_dir, shared_data, tmp_path, monkeypatch,
                                                                       capsys):
  out = tmp_path / "ft"
  argv = _argv(model_dir, shared_data, out)
  rc, err = _signal_when(argv, signal.SIGINT, lambda: any((out / "checkpoints").glob("[0-9]*")))
  assert rc == 130 and not any("Traceback" in line for line in err), err
  said = [line for line in err if "interrupted" in line]
  assert len(said) == 1 and said[0].startswith("bmoe finetune: interrupted at fine-tuning step ") and \
      said[0].endswith(" of 120 (saved); rerun the same command to resume"), err
  step = int(said[0].split("step ")[1].split()[0])
  assert 3 <= step < 120 and (out / "checkpoints" / str(step)).is_dir()  # saved where it stopped
  assert not (out / "run.json").exists() and not (out / files.LOCK_FILE).exists()

  def full_disk(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full_disk)  # the disk fills up before the rerun's records are written
  assert main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and re.fullmatch(r"bmoe finetune: error: /\S+: no space left on the device \(errno ENOSPC\); "
                                        r"what was saved so far is kept: make room and rerun the same command to "
                                        r"resume", err[0]), err
  monkeypatch.undo()
  assert main(argv) == 0
  assert [h["step"] for h in json.loads((out / "run.json").read_text())["history"]] == [30, 60, 90, 120]


def test_sigterm_outside_the_loops_leaves_at_once(model_dir, shared_data, tmp_path):
  out = tmp_path / "ft"
  rc, err = _signal_when(_argv(model_dir, shared_data, out), signal.SIGTERM, (out / files.LOCK_FILE).exists)
  assert rc == 143 and err == ["bmoe finetune: SIGTERM: stopped; nothing is left half-written; rerun the same "
                               "command to resume"], err


def test_a_signal_ignored_at_start_stays_ignored():
  """A shell starts background jobs with SIGINT ignored (Ctrl-C is for the foreground job): bmoe keeps it so."""
  code = ("import signal; from bmoe_jax import interrupt as I\n"
          "with I.handled():\n"
          "  print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is I._handler)")
  got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
  assert got.stdout.split() == ["True", "True"]
