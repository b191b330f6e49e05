"""Ctrl-C and SIGTERM answered without a traceback or a crash, and resumably.

``bmoe`` installs ``handled()`` around every command. A signal that arrives inside ``safe_points()`` (the loops
that save resumable state: fine-tuning, the factor pass, router training, healing) is only
recorded; the loop saves at its next step and raises ``Interrupted``, which the CLI reports in one line
("interrupted at step N; rerun the same command to resume") before exiting with 128 + the signal (130 for
SIGINT, 143 for SIGTERM). Outside those loops there is nothing to save (records are written whole, artefacts
are complete once their record is), so the process leaves at once: one line, then ``os._exit`` (no teardown
of XLA's or TensorStore's threads runs from a signal). A second signal always leaves at once. Python runs a
handler when the current call into XLA returns, so a signal during a compilation is answered after it.
"""

from __future__ import annotations

import contextlib
import os
import signal

_STATE = {"signum": None, "depth": 0, "command": "bmoe"}
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """Raised at a safe point after a signal; ``where`` says what was saved."""

  def __init__(self, signum: int, where: str):
    super().__init__(where)
    self.signum, self.where = signum, where

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


def _leave_now(signum: int) -> None:
  name = signal.Signals(signum).name
  os.write(2, f"{_STATE['command']}: {name}: stopped; nothing is left half-written; rerun the same command to "
              "resume\n".encode())
  os._exit(128 + signum)


def _handler(signum, frame) -> None:
  if _STATE["depth"] == 0 or _STATE["signum"] is not None:
    _leave_now(signum)
  _STATE["signum"] = signum


@contextlib.contextmanager
def handled(command: str = "bmoe"):
  """SIGINT and SIGTERM answered as the module docstring says, for the block (main thread only)."""
  import threading

  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
    yield
    return
  # a signal ignored at start stays ignored: a shell starts background jobs with SIGINT ignored, so that Ctrl-C
  # in the terminal stops the foreground job only (nohup does the same for SIGHUP)
  old = {s: h for s in SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN}
  _STATE.update(signum=None, depth=0, command=command)
  for s in old:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    _STATE.update(signum=None, depth=0)


@contextlib.contextmanager
def safe_points():
  """A loop that calls ``check`` after each step (having saved what a rerun resumes from)."""
  _STATE["depth"] += 1
  try:
    yield
  finally:
    _STATE["depth"] -= 1


def requested() -> bool:
  """A signal came and the loop should save now (then ``check``)."""
  return _STATE["signum"] is not None


def save_point(run, due: bool, save, where: str) -> None:
  """The end of a loop's step: ``save()`` when ``run`` (a ``ResumableRun``, or None: no saves) is ``due`` or a
  signal came, then ``check`` (``where``, e.g. 'fine-tuning step 40 of 120', gets " (saved)" when it was)."""
  if run is not None and (due or requested()):
    save()
  check(where + (" (saved)" if run is not None else ""))


def check(where: str) -> None:
  """Raise ``Interrupted`` if a signal came; ``where``: e.g. 'fine-tuning step 40 of 120 (saved)'."""
  if _STATE["signum"] is not None:
    raise Interrupted(_STATE["signum"], where)
