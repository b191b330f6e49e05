"""Rewrites ``constraints.txt``: every direct dependency of the project (``pyproject.toml``: runtime and the test
extras) pinned to the version installed in this environment, i.e. the versions the test suite just passed with.

    .venv/bin/python tools/refresh_constraints.py      # after `bash .ci/run` passed in .venv

Both README commands install through ``constraints.txt`` (``pip install -c constraints.txt ...``), so a fresh
install next month gets what was tested; ``pyproject.toml`` keeps the supported ranges. Packages the direct ones
pull in are left to pip within what the pins allow. The test-only oracle (``requirements-oracle.txt``) carries
its own pins.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# The versions the test suite last passed with, one per direct dependency of pyproject.toml (runtime and the test
# extras); rewritten by `python tools/refresh_constraints.py` in the environment the suite passed in. The supported
# ranges are pyproject.toml's. Every install of this project goes through this file: without it, anything that
# depends on torch pulls the registry's newest CUDA build and several GB of nvidia wheels.
"""


def direct_dependencies(pyproject: Path) -> list[str]:
  """The distribution names of ``[project] dependencies`` and every optional extra, sorted."""
  import tomllib
  project = tomllib.loads(pyproject.read_text())["project"]
  reqs = list(project.get("dependencies", []))
  for extra in project.get("optional-dependencies", {}).values():
    reqs += extra
  names = {re.match(r"[A-Za-z0-9._-]+", r.strip()).group(0).lower() for r in reqs}
  return sorted(names)


def pins(names: list[str]) -> list[str]:
  """``name==version`` of each installed distribution; a local version label (``+cpu``) is dropped."""
  lines, missing = [], []
  for name in names:
    try:
      lines.append(f"{name}=={metadata.version(name).split('+')[0]}")
    except metadata.PackageNotFoundError:
      missing.append(name)
  if missing:
    raise SystemExit(f"not installed in {sys.prefix}: {missing}; install the project with its test extras first")
  return lines


def main() -> int:
  text = HEADER + "\n".join(pins(direct_dependencies(ROOT / "pyproject.toml"))) + "\n"
  (ROOT / "constraints.txt").write_text(text)
  print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
