"""Files a user hands us or we write: JSON read with one message naming the file, output directories checked
writable before a long run starts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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
