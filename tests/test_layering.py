"""The layers of the house (docs/design.md, "Layers"), checked on every module's imports (lazy ones too): the
model's numerics import no method package, the method packages no orchestration, and the command line reaches the
methods only through the pipeline's stages."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bmoe_jax"
CORE = ("config", "params", "nn", "model", "task")  # the model and its numerics
METHODS = ("laplace", "routing", "baselines", "train", "data", "evaluate", "metrics", "intervals", "epistemic",
           "sharded")
ORCHESTRATION = ("pipeline", "cli", "cli_tasks", "demo")
RULES = {  # importer -> what it may not import
    **{c: METHODS + ORCHESTRATION for c in CORE},
    **{m: ORCHESTRATION for m in METHODS},
    "cli": ("laplace", "baselines"), "cli_tasks": ("laplace", "baselines"), "demo": ("laplace", "baselines"),
}


def top(path: Path) -> str:
  rel = path.relative_to(PKG).with_suffix("")
  return rel.parts[0]


def imported(path: Path) -> set[str]:
  """The bmoe_jax subpackages / modules ``path`` imports, anywhere in the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bmoe_jax":
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    out |= {n.split(".")[1] for n in names if n.startswith("bmoe_jax.")}
  return out


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_respect_the_layers(path):
  forbidden = set(RULES.get(top(path), ())) - {top(path)}
  assert not imported(path) & forbidden, f"{path.relative_to(PKG.parent)} imports {sorted(imported(path) & forbidden)}"


def test_the_rules_can_fail():
  assert "routing" in RULES["model"] and "laplace" in RULES["cli_tasks"]
  assert imported(PKG / "pipeline" / "stages.py") >= {"laplace", "train"}  # the checker sees real imports
