"""The shell examples of the README and the docs: every ``bmoe`` command in them parses with the real parser
(so no flag in the docs is stale), and the cheap ones run: ``bmoe --help`` and ``bmoe info`` on a tiny
checkpoint, as a user would type them."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bmoe_jax.cli import build_parser
from tests.fixtures import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def bmoe_commands(rel: str) -> list[list[str]]:
  """The argument lists of every ``bmoe`` command in a page's shell blocks (continuations joined, comments,
  optional ``[...]`` parts and ``...`` placeholders dropped, ``.venv/bin/bmoe`` and env prefixes allowed)."""
  out = []
  for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / rel).read_text(), re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])
      for part in re.split(r"&&|;", line):
        words = [w for w in shlex.split(part) if w != "..."]
        while words and "=" in words[0] and not words[0].startswith("-"):
          words = words[1:]  # VAR=value prefixes
        if words and words[0].endswith("bmoe"):
          out.append(words[1:])
  return out


def test_every_documented_command_parses():
  commands = {rel: bmoe_commands(rel) for rel in PAGES}
  assert sum(map(len, commands.values())) >= 10, commands
  parser = build_parser()
  for rel, argvs in commands.items():
    for argv in argvs:
      try:
        parser.parse_args(argv)
      except SystemExit as err:
        pytest.fail(f"{rel}: `bmoe {' '.join(argv)}` does not parse (exit {err.code})")


def test_cheap_commands_run(tmp_path, shared_data):
  model = tiny_model_dir(tmp_path / "m", shared_data, rows=50)
  bmoe = [sys.executable, "-m", "bmoe_jax.cli"]
  help_out = subprocess.run([*bmoe, "--help"], capture_output=True, text=True, timeout=300)
  assert help_out.returncode == 0 and "finetune" in help_out.stdout and "evaluate" in help_out.stdout
  info = subprocess.run([*bmoe, "info", str(model), "--json"], capture_output=True, text=True, timeout=300)
  assert info.returncode == 0, info.stderr[-2000:]
  assert '"num_experts"' in info.stdout
