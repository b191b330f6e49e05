"""Command-line flags generated from config dataclasses, and configs from flags + a JSON file.

Every field of the command's configs is a flag ``--field-name`` (booleans: a switch; tuples: comma-
separated; ``int | None`` fields also take ``none``); its help is the comment beside the field in the
dataclass and its default. A field name shared by two configs (``seed``: the run's and the trainer's) is
one flag that sets both. ``--config FILE.json`` supplies values by the same names (``-`` or ``_``);
flags given on the command line win; an unknown key is an error naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
from pathlib import Path
from typing import Any

from bmoe_jax.files import read_json


@functools.lru_cache(maxsize=None)
def _comments(cls) -> dict[str, str]:
  """{field: the comment beside it} in the class body, read from the source file line by line (no
  ``inspect.getsource``: on a class it parses the whole module with ``ast``, which CPython 3.11.7 can fail
  with "AST constructor recursion depth mismatch" while other threads run)."""
  try:
    lines = Path(inspect.getsourcefile(cls) or "").read_text(encoding="utf-8").splitlines()
  except (OSError, TypeError, UnicodeDecodeError):
    return {}
  head = re.compile(rf"^(\s*)class {re.escape(cls.__name__)}\b")
  start = next((i for i, line in enumerate(lines) if head.match(line)), None)
  if start is None:
    return {}
  indent = len(head.match(lines[start]).group(1))
  body = []
  for line in lines[start + 1:]:
    if line.strip() and len(line) - len(line.lstrip()) <= indent:
      break
    body.append(line)
  return dict(re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", "\n".join(body), flags=re.M))


def _kind(field) -> str:
  """bool | int | float | str, or tuple_int | tuple_float | tuple_str (by the first element type)."""
  t = str(field.type)
  if t.startswith("tuple"):
    inner = t[len("tuple["):]
    return "tuple_" + next((k for k in ("int", "float") if inner.startswith(k)), "str")
  return next((k for k in ("bool", "int", "float") if t.startswith(k)), "str")


def leaf_fields(root) -> dict[str, list[tuple[str | None, dataclasses.Field]]]:
  """{flag name: [(sub-config field or None, the field)]} of a config dataclass whose fields may be
  config dataclasses themselves (one level)."""
  out: dict[str, list] = {}
  for f in dataclasses.fields(root):
    default = getattr(root, f.name)
    if dataclasses.is_dataclass(default):
      for g in dataclasses.fields(default):
        out.setdefault(g.name, []).append((f.name, g))
    else:
      out.setdefault(f.name, []).append((None, f))
  return out


def add_flags(parser: argparse.ArgumentParser, root) -> None:
  """One flag per leaf field of ``root`` (a config instance: its values are the shown defaults)."""
  parser.add_argument("--config", help="JSON file of option values (keys as the flags, - or _); flags win")
  for name, places in leaf_fields(root).items():
    sub, field = places[0]
    owner = getattr(root, sub) if sub else root
    comment = _comments(type(owner)).get(name, "")
    default = getattr(owner, name)
    flag = "--" + name.replace("_", "-")
    kind = _kind(field)
    text = (f"{comment} (default: {default})" if comment else f"default: {default}").replace("%", "%%")
    if kind == "bool":
      parser.add_argument(flag, action="store_true", default=None, help=text)
    else:
      parser.add_argument(flag, default=None, help=text, metavar=name.upper())


def _parse(value, field, where: str):
  if value is None or (isinstance(value, str) and value.lower() == "none" and "None" in str(field.type)):
    return None
  kind = _kind(field)
  try:
    if kind == "bool":
      return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if kind.startswith("tuple_"):
      items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
      return tuple({"int": int, "float": float, "str": str}[kind[6:]](x) for x in items)
    return {"int": int, "float": float, "str": str}[kind](value)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{where}: {field.name}={value!r} is not a valid {field.type}") from err


def resolve(root, args: argparse.Namespace):
  """``root`` with the values of ``--config`` and then of the flags given on the command line."""
  fields = leaf_fields(root)
  values: dict[str, Any] = {}
  if getattr(args, "config", None):
    path = Path(args.config)
    given = {k.replace("-", "_"): v for k, v in read_json(path, "--config").items()}
    unknown = sorted(set(given) - set(fields))
    if unknown:
      raise ValueError(f"{path}: unknown keys {unknown}; expected some of {sorted(fields)}")
    values.update({k: (v, str(path)) for k, v in given.items()})
  values.update({k: (v, "--" + k.replace("_", "-")) for k, v in vars(args).items() if k in fields and v is not None})
  subs: dict[str | None, dict] = {}
  for name, (value, where) in values.items():
    for sub, field in fields[name]:
      subs.setdefault(sub, {})[name] = _parse(value, field, where)
  top = subs.pop(None, {})
  for sub, changes in subs.items():
    top[sub] = dataclasses.replace(getattr(root, sub), **changes)
  return dataclasses.replace(root, **top)
