"""Files a user hands us or we write: JSON read with one message naming the file, output directories checked
writable before a long run starts and held by one writer at a time, records written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

LOCK_FILE = ".bmoe.lock"
_HELD: dict[str, int] = {}  # this process's output locks: resolved directory -> nesting depth


class BadFileError(ValueError):
  """A file that cannot be read as what it should be (not UTF-8, not JSON, the wrong kind of value)."""


def first_line(err: BaseException, limit: int = 200) -> str:
  """``Type: first line of the message`` (library errors can span pages)."""
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:limit] if text else ''}"


def read_json(file: str | Path, what: str = "") -> dict:
  """A JSON object from ``file``, or one error naming the file (and ``what`` it is, e.g. a flag): missing, not
  UTF-8, not JSON, not an object."""
  file = Path(file)
  name = f"{what} {file}" if what else str(file)
  if not file.is_file():
    raise FileNotFoundError(f"{name}: no such file")
  try:
    value = json.loads(file.read_text(encoding="utf-8-sig"))  # a BOM is not part of the JSON
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise BadFileError(f"{name}: not valid JSON ({first_line(err)})") from None
  if not isinstance(value, dict):
    raise BadFileError(f"{name}: expected a JSON object, got {type(value).__name__}")
  return value


def writable_dir(path: str | Path, what: str = "--out") -> Path:
  """``path`` created if needed and proven writable (a file written and removed), else one message naming it."""
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".bmoe-write-test-")
    os.close(fd)
    os.unlink(probe)
  except OSError as err:
    raise PermissionError(f"{what} {path}: cannot write there ({err.strerror or first_line(err)})") from None
  return path


class BusyError(FileExistsError):
  """An output directory another live process is writing to."""


@contextlib.contextmanager
def output_lock(path: str | Path, what: str = "--out"):
  """Hold ``path``'s one-writer lock (``fcntl.flock`` on ``path/.bmoe.lock``) for the block; ``path`` is
  created and checked writable first. Another live holder raises ``BusyError`` at once, naming its pid and
  command. The kernel drops a dead holder's lock, so a stale lock file is simply taken over; the file is
  removed on release. Re-entrant within a process (a command that runs another into the same directory)."""
  import fcntl

  path = writable_dir(path, what)
  key = str(path.resolve())
  if key in _HELD:
    _HELD[key] += 1
    try:
      yield path
    finally:
      _HELD[key] -= 1
    return
  fd = _acquire(path / LOCK_FILE, fcntl, what)
  _HELD[key] = 1
  try:
    yield path
  finally:
    del _HELD[key]
    with contextlib.suppress(OSError):
      os.unlink(path / LOCK_FILE)  # still holding it: a process that opens the file now fails the inode check
    os.close(fd)


def _acquire(lock: Path, fcntl, what: str) -> int:
  """An open descriptor of ``lock`` holding its exclusive flock, on the file the path names now."""
  while True:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise BusyError(f"{what} {lock.parent}: another bmoe process is writing there ({_holder(lock)}); wait for it "
                      "to finish, or choose another directory") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:  # released and removed by its holder between our open and flock
      same = False
    if same:
      break
    os.close(fd)
  record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps(record).encode())
  return fd


def _holder(lock: Path) -> str:
  try:
    rec = json.loads(lock.read_text())
    return f"pid {rec['pid']} on {rec['host']} since {rec['since']}: {rec['command'][:160]}"
  except (OSError, ValueError, KeyError, TypeError):
    return "its pid not yet recorded"


def write_text(path: str | Path, text: str) -> Path:
  """``path`` holding ``text``, whole or not at all: written to a temporary sibling, flushed to disk, then
  renamed over ``path`` (a reader, or a crash at any point, never sees a partial or empty file)."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared run's records from its group
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as err:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(err, OSError) and err.filename is None:  # e.g. fsync's: name the record it was writing
      raise OSError(err.errno, err.strerror, str(path)) from err
    raise
  return path


def write_json(path: str | Path, value, **dumps) -> Path:
  """``write_text`` of ``json.dumps(value, **dumps)`` (indent 2 unless given)."""
  return write_text(path, json.dumps(value, **{"indent": 2, **dumps}))


def begin_artefact(directory: str | Path, record: str, parts: tuple[str, ...], *, overwrite: bool = False) -> Path:
  """``directory`` made ready for writing an artefact whose last step is writing its ``record`` file: the record
  is what makes it complete (readers refuse ``parts`` without it, ``incomplete``). Parts an interrupted write
  left (no record) are removed, with orbax's temporaries of a killed save. A complete artefact raises
  ``FileExistsError`` naming its record, or with ``overwrite`` has its record removed first (from then on it
  reads as incomplete) and then its parts. The caller holds the directory's ``output_lock`` or is its only
  writer."""
  directory = Path(directory).absolute()
  done = directory / record
  if done.exists():
    if not overwrite:
      raise FileExistsError(f"{done} already exists; choose an empty output directory")
    done.unlink()
  for name in parts:
    for p in [directory / name, *directory.glob(f"{name}.orbax-checkpoint-tmp*")]:
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
      elif p.exists() or p.is_symlink():
        p.unlink()
  directory.mkdir(parents=True, exist_ok=True)
  return directory


def incomplete(directory: str | Path, record: str, parts: tuple[str, ...]) -> str:
  """For a reader's error when ``record`` is missing: why, if ``parts`` of an interrupted write are there."""
  left = [name for name in parts if (Path(directory) / name).exists()]
  return (f" ({', '.join(left)} without {record}: its write was interrupted; rerun the command that wrote it)"
          if left else "")


RESOURCE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EIO: "input/output error", errno.EROFS: "read-only file system",
                   errno.EMFILE: "too many open files", errno.ENOMEM: "out of memory"}
_RESOURCE_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                  "Read-only file system": errno.EROFS, "Input/output error": errno.EIO}


def resource_error(err: BaseException) -> str | None:
  """One line for an error caused by the machine's resources (a full disk, a quota, an I/O error), found
  anywhere in ``err``'s chain (orbax and TensorStore wrap the ``OSError`` in their own types), else None."""
  seen, e = set(), err
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    code = e.errno if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS else \
        next((c for text, c in _RESOURCE_TEXT.items() if text in str(e)), None)
    if code is not None:
      where = getattr(e, "filename", None) or _path_in(str(e))
      return (f"{where + ': ' if where else ''}{RESOURCE_ERRNOS[code]} (errno {errno.errorcode[code]}); what was "
              "saved so far is kept: make room and rerun the same command to resume")
    e = e.__cause__ or e.__context__
  return None


def _path_in(text: str) -> str | None:
  """The first absolute path quoted in an error message (TensorStore's say which file failed)."""
  import re

  m = re.search(r"""["'](/[^"']+)["']""", text)
  return m.group(1) if m else None
