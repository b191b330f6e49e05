"""``constraints.txt`` pins every direct dependency (runtime and test extras) to one version inside the range
``pyproject.toml`` supports, so both README commands install what the suite last passed with."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tools.refresh_constraints import direct_dependencies

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
  lines = [l.strip() for l in (ROOT / "constraints.txt").read_text().splitlines()]
  reqs = [Requirement(l) for l in lines if l and not l.startswith("#")]
  return {r.name.lower(): str(r.specifier) for r in reqs}


def test_every_direct_dependency_is_pinned_inside_its_supported_range():
  pins = _pins()
  assert sorted(pins) == direct_dependencies(ROOT / "pyproject.toml")
  assert all(spec.startswith("==") for spec in pins.values()), pins
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  for line in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
    req = Requirement(line)
    version = pins[req.name.lower()][2:]
    assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req.specifier}"
