"""One writer per output directory (``files.output_lock``) and records written whole or not at all
(``files.write_text``): a second process is refused at once naming the holder, a dead holder's lock is taken
over, a write that fails midway leaves the old file and no temporary behind."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bmoe_jax import files
from bmoe_jax.cli import main as bmoe

ROOT = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import sys, time
    from bmoe_jax.files import output_lock
    with output_lock(sys.argv[1]):
      print("held", flush=True)
      time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
  """A live process holding ``tmp_path / 'out'``'s lock (killed with SIGKILL at the end)."""
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  yield out, proc
  proc.kill()
  proc.wait(timeout=30)


def test_a_second_writer_is_refused_at_once_naming_the_holder(holder, capsys):
  out, proc = holder
  with pytest.raises(files.BusyError, match=f"pid {proc.pid} on "):
    with files.output_lock(out):
      pass
  for argv in (["fit", "--model", str(out / "none"), "--out", str(out)], ["convert", str(out / "none"), str(out)]):
    assert bmoe(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}: another bmoe process is writing there (pid {proc.pid}" in err[0], err
  assert proc.poll() is None and (out / files.LOCK_FILE).exists()  # the holder is untouched


def test_a_dead_holders_lock_is_taken_over_and_released(holder):
  out, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert (out / files.LOCK_FILE).exists()  # stale: left by the killed holder
  with files.output_lock(out) as got:
    record = json.loads((out / files.LOCK_FILE).read_text())
    assert got == out and record["pid"] == os.getpid()
    with files.output_lock(out):  # re-entrant within a process
      pass
    assert (out / files.LOCK_FILE).exists()
  assert not (out / files.LOCK_FILE).exists()


def test_write_text_is_whole_or_absent(tmp_path, monkeypatch):
  path = files.write_json(tmp_path / "run.json", {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1} and stat.S_IMODE(path.stat().st_mode) == 0o644

  def full_disk(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space"):
    files.write_json(path, {"a": 2, "long": "x" * 10000})
  assert json.loads(path.read_text()) == {"a": 1}  # the old record, not a partial or empty one
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary left behind


def test_an_interrupted_model_save_is_named_by_readers_and_redone_by_writers(tmp_path):
  import jax

  import bmoe_jax as B
  from bmoe_jax.checkpoint import CONFIG_FILE, load_model, save_params

  cfg = B.tiny_config()
  params = B.init_params(cfg, jax.random.key(0))
  out = save_params(tmp_path / "m", cfg, params)
  with pytest.raises(FileExistsError, match=f"{CONFIG_FILE} already exists"):
    save_params(out, cfg, params)
  (out / CONFIG_FILE).unlink()  # killed between the arrays and their record
  (out / "params.orbax-checkpoint-tmp-123").mkdir()  # and an orbax temporary of a killed save
  with pytest.raises(FileNotFoundError, match=f"params without {CONFIG_FILE}: its write was interrupted; rerun"):
    load_model(out)
  save_params(out, cfg, params)  # the rerun replaces the parts instead of refusing
  assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, "params"]
  twice = jax.tree.map(lambda a: 2 * a, params)
  save_params(out, cfg, twice, overwrite=True)  # a rerun of the same run rewrites a complete one
  back = load_model(out).pure_params()
  assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(twice)))
