"""Row parsers and file readers for the benchmark files in the layouts of ``../shared/data``.

One parser per row format (each raises ``RowError`` naming the bad field); ``read_rows`` yields
(line, row) from JSONL or CSV with the line numbers a user can look up.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Iterator

from bmoe_jax.data.records import LETTERS, DataError, MCExample, RowError, field, make_example


def read_rows(path: Path) -> Iterator[tuple[int, object]]:
  """(line number, parsed row) for a .jsonl or .csv file (UTF-8, a byte-order mark allowed); a line that is not
  JSON or not UTF-8 yields a RowError; a CSV file that is not UTF-8 raises a DataError naming the line."""
  if path.suffix == ".csv":
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
      line = raw[:err.start].count(b"\n") + 1
      raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); re-save the file as "
                      "UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
      yield reader.line_num, row
    return
  with path.open("rb") as fh:
    for i, raw in enumerate(fh, start=1):
      raw = raw.removeprefix(codecs.BOM_UTF8) if i == 1 else raw
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        yield i, RowError(f"not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})")
        continue
      if not line.strip():
        continue
      try:
        yield i, json.loads(line)
      except json.JSONDecodeError as err:
        yield i, RowError(f"invalid JSON ({err.msg} at column {err.colno})")


def _letter_or_index(key, labels: list[str]) -> int:
  """An answer key ('B', or '2' where choices are numbered) -> index into the choice labels."""
  key = str(key).strip()
  if key in labels:
    return labels.index(key)
  raise RowError(f"answer key {key!r} is not one of the choice labels {labels}")


def parse_simple_mc(row, uid: str, num_choices) -> MCExample:
  """{question, choices[], label (0-based)} (the parsed OBQA files and the LLM-Adapters ARC train files)."""
  return make_example(str(row.get("id", uid)) if isinstance(row, dict) else uid, field(row, "question"),
                      field(row, "choices", list), field(row, "label", int), num_choices)


def parse_ai2_arc(row, uid: str, num_choices) -> MCExample:
  """AI2 ARC jsonl: {id, question: {stem, choices: [{text, label}]}, answerKey}."""
  q = field(row, "question", dict)
  if not isinstance(q, dict):
    raise RowError("field 'question' must be an object with 'stem' and 'choices'")
  choices = field(q, "choices", list)
  if any(not isinstance(c, dict) or "text" not in c or "label" not in c for c in choices):
    raise RowError("every choice needs 'text' and 'label'")
  labels = [str(c["label"]) for c in choices]
  label = _letter_or_index(field(row, "answerKey"), labels)
  return make_example(str(row.get("id", uid)), field(q, "stem"), [c["text"] for c in choices], label,
                      num_choices)


def parse_boolq(row, uid: str, num_choices) -> MCExample:
  """SuperGLUE BoolQ: {question, passage, idx, label (bool)} -> choices (yes, no)."""
  label = field(row, "label", object)
  if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # the SuperGLUE files' form
    label = label.strip().lower() == "true"
  if not isinstance(label, bool):
    raise RowError(f"label {label!r} must be true or false")
  return make_example(str(row.get("idx", uid)), field(row, "question"), ("yes", "no"), 0 if label else 1,
                      num_choices, context=field(row, "passage"))


def parse_winogrande(row, uid: str, num_choices) -> MCExample:
  """{sentence with '_', option1, option2, answer '1'/'2'}."""
  answer = str(field(row, "answer", object)).strip()
  if answer not in ("1", "2"):
    raise RowError(f"answer {answer!r} must be '1' or '2'")
  return make_example(uid, field(row, "sentence"), (field(row, "option1"), field(row, "option2")),
                      int(answer) - 1, num_choices)


def parse_mmlu(row, uid: str, num_choices, subject: str | None = None) -> MCExample:
  """MMLU CSV with header question, choice0..choice3, answer (0-3 or A-D)."""
  choices = [field(row, f"choice{i}") for i in range(4)]
  extra = [k for k in row if k not in ("question", "answer") and not str(k).startswith("choice")]
  if extra or None in row:
    raise RowError("more columns than question, choice0..choice3, answer")
  answer = field(row, "answer").strip()
  label = LETTERS.index(answer) if answer in LETTERS[:4] else (int(answer) if answer.isdigit() else answer)
  return make_example(uid, field(row, "question"), choices, label, num_choices, subject=subject)
