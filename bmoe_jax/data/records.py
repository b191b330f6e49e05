"""Multiple-choice examples, row validation and the load report.

Every loader turns a raw row into an ``MCExample`` through ``make_example``, which checks the fields a
task needs and raises ``RowError`` naming what is wrong. The loaders then either skip the row (counted
and listed in ``LoadReport`` with its file and line) or re-raise it as ``DataError`` with file:line —
a malformed row is never silently mislabelled.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

LETTERS = "ABCDEFGHIJ"
ON_ERROR = ("skip", "raise")


class DataError(ValueError):
  """A malformed dataset file or row (the message names the file, the line and the field)."""


class RowError(ValueError):
  """Raised by row parsers; the loader adds the file and line."""


@dataclasses.dataclass(frozen=True)
class MCExample:
  uid: str  # dataset-unique id (the file's id, or "<file>:<line>")
  question: str
  choices: tuple[str, ...]
  label: int  # index into choices
  context: str | None = None  # a passage (BoolQ) shown before the question
  subject: str | None = None  # MMLU subject

  @property
  def answer_letter(self) -> str:
    return LETTERS[self.label]


@dataclasses.dataclass
class LoadReport:
  source: str
  rows: int = 0
  kept: int = 0
  skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)  # (file, line, reason)
  duplicates: list[str] = dataclasses.field(default_factory=list)  # example ids kept more than once

  def summary(self) -> str:
    head = f"{self.source}: {self.kept} of {self.rows} rows kept"
    if self.skipped:
      shown = "; ".join(f"{f}:{line}: {why}" for f, line, why in self.skipped[:3])
      more = f" (+{len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
      head = f"{head}, {len(self.skipped)} skipped: {shown}{more}"
    if self.duplicates:
      head += f"; {len(self.duplicates)} ids occur more than once (e.g. {', '.join(self.duplicates[:3])})"
    return head


def field(row: dict, name: str, kind=str):
  if not isinstance(row, dict):
    raise RowError(f"expected a JSON object, got {type(row).__name__}")
  if name not in row or row[name] is None:
    raise RowError(f"missing field {name!r}")
  value = row[name]
  if kind is str and not isinstance(value, str):
    raise RowError(f"field {name!r} must be a string, got {value!r}")
  if kind is list and not isinstance(value, list):
    raise RowError(f"field {name!r} must be a list, got {type(value).__name__}")
  return value


def make_example(uid: str, question, choices: Sequence, label, num_choices: int | tuple[int, int],
                 context: str | None = None, subject: str | None = None) -> MCExample:
  """Validate and build an example. ``num_choices``: the exact count, or an inclusive (min, max)."""
  lo, hi = (num_choices, num_choices) if isinstance(num_choices, int) else num_choices
  if not isinstance(question, str) or not question.strip():
    raise RowError("empty question")
  choices = tuple(choices)
  if not lo <= len(choices) <= hi:
    want = str(lo) if lo == hi else f"{lo}-{hi}"
    raise RowError(f"{len(choices)} choices, expected {want}")
  if any(not isinstance(c, str) or not c.strip() for c in choices):
    raise RowError("an empty or non-text choice")
  if isinstance(label, bool) or not isinstance(label, int):
    raise RowError(f"label {label!r} is not an integer index")
  if not 0 <= label < len(choices):
    raise RowError(f"label {label} out of range for {len(choices)} choices")
  return MCExample(uid, question.strip(), tuple(c.strip() for c in choices), label, context, subject)
