"""mkdocs hook: replaces ``<!-- cli-reference -->`` in cli.md by every ``bmoe`` command's ``--help``, generated
from the argument parser (itself generated from the config dataclasses), so the reference cannot drift."""

from __future__ import annotations

import argparse

MARK = "<!-- cli-reference -->"


def _sections() -> list[str]:
  from bmoe_jax.cli import build_parser
  parser = build_parser()
  subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  out = [f"## bmoe\n\n```text\n{parser.format_help()}```\n"]
  for name, sub in subs.choices.items():
    out.append(f"## bmoe {name}\n\n```text\n{sub.format_help()}```\n")
  return out


def on_page_markdown(markdown: str, page, config, files) -> str:
  if MARK not in markdown:
    return markdown
  return markdown.replace(MARK, "\n".join(_sections()))
