"""The public API's docstrings are complete: every public function of a module the API reference renders
(``::: module`` in ``docs/api/*.md``) documents each parameter under ``Args:`` and what it gives under
``Returns:`` (or ``Yields:``), and every public class has a docstring. Used as a mkdocs hook (the docs build
fails on a gap) and by the test suite (``tests/test_docstrings.py``), so the two cannot disagree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def api_modules(docs_dir: Path = ROOT / "docs") -> list[str]:
  """The dotted module names the API reference renders, in page order."""
  found = []
  for page in sorted((docs_dir / "api").glob("*.md")):
    found += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.M)
  return found


def module_file(name: str) -> Path:
  """The source file of a dotted module name under the repository root."""
  base = ROOT.joinpath(*name.split("."))
  return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _params(fn: ast.FunctionDef) -> list[str]:
  args = fn.args
  names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
  names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
  return [n for n in names if n not in ("self", "cls")]


def _returns_nothing(fn: ast.FunctionDef) -> bool:
  return isinstance(fn.returns, ast.Constant) and fn.returns.value is None


def function_gaps(fn: ast.FunctionDef) -> list[str]:
  """What a function's docstring lacks: ``Args`` entries by parameter name, and ``Returns``."""
  doc = ast.get_docstring(fn) or ""
  if not doc:
    return ["docstring"]
  args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
  gaps = [p for p in _params(fn) if not re.search(rf"^\s+\**{re.escape(p)}( \(.*?\))?:", args, re.M)]
  if not _returns_nothing(fn) and not re.search(r"^(Returns|Yields):", doc, re.M):
    gaps.append("Returns")
  return gaps


def module_gaps(name: str) -> list[str]:
  """Every gap in one module's public functions and classes, as ``module.function: missing, ...``."""
  tree = ast.parse(module_file(name).read_text())
  out = []
  for node in tree.body:
    if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
      continue
    if isinstance(node, ast.FunctionDef):
      gaps = function_gaps(node)
    elif isinstance(node, ast.ClassDef):
      gaps = [] if ast.get_docstring(node) else ["docstring"]
    if gaps:
      out.append(f"{name}.{node.name}: {', '.join(gaps)}")
  return out


def all_gaps() -> list[str]:
  """The gaps of every module the API reference renders."""
  return [gap for name in api_modules() for gap in module_gaps(name)]


def on_pre_build(config) -> None:
  """mkdocs hook: fail the build on any incomplete public docstring."""
  gaps = all_gaps()
  if gaps:
    from mkdocs.exceptions import PluginError
    raise PluginError(f"{len(gaps)} incomplete public docstrings (Args/Returns):\n  " + "\n  ".join(gaps))


if __name__ == "__main__":
  for gap in all_gaps():
    print(gap)
