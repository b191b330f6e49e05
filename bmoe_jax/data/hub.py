"""The same benchmarks through Hugging Face ``datasets`` (hub names, or local directories in the hub's
schema). Each hub schema maps to our row parsers, so validation and error reports are the same."""

from __future__ import annotations

from pathlib import Path

from bmoe_jax.data import local
from bmoe_jax.data.records import LETTERS, DataError, LoadReport, RowError, make_example


def _obqa(row, uid, n):
  return _ai2_like(row, uid, n, stem="question_stem")


def _ai2_like(row, uid, n, stem="question"):
  ch = row.get("choices") or {}
  if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
    raise RowError("field 'choices' must have 'text' and 'label' lists")
  labels = [str(x) for x in ch["label"]]
  key = str(row.get("answerKey", "")).strip()
  if key not in labels:
    raise RowError(f"answer key {key!r} is not one of the choice labels {labels}")
  return make_example(str(row.get("id", uid)), row.get(stem), ch["text"], labels.index(key), n)


def _boolq(row, uid, n):
  answer = row.get("answer")
  if not isinstance(answer, bool):
    raise RowError(f"answer {answer!r} must be true or false")
  return make_example(uid, row.get("question"), ("yes", "no"), 0 if answer else 1, n, context=row.get("passage"))


def _winogrande(row, uid, n):
  return local.parse_winogrande(row, uid, n)


def _mmlu(row, uid, n):
  answer = row.get("answer")
  if isinstance(answer, str) and answer in LETTERS[:4]:
    answer = LETTERS.index(answer)
  return make_example(uid, row.get("question"), row.get("choices") or (), answer, n, subject=row.get("subject"))


HUB_PARSERS = {"obqa": _obqa, "arc_easy": _ai2_like, "arc_challenge": _ai2_like, "boolq": _boolq,
               "winogrande": _winogrande, "mmlu": _mmlu}


def load_hub(name, split, bench, path: str | None, subjects, on_error):
  """Rows of ``datasets.load_dataset(path or the benchmark's hub name, config, split=...)``."""
  import datasets

  hub_path, config = bench.hub
  if split not in bench.hub_splits:
    raise DataError(f"{name} split {split!r} is carved from the local files only (data_dir=); through the hub, "
                    f"use one of {sorted(bench.hub_splits)} and hold out part of a training split yourself")
  hub_split = bench.hub_splits[split]
  if isinstance(hub_split, tuple):  # a split of another config (WinoGrande S/M training sets)
    config, hub_split = hub_split
  path = path or hub_path
  if Path(path).is_dir():  # a local directory in the hub schema: no config, splits from file names
    config = None
  try:
    ds = datasets.load_dataset(path, config, split=hub_split)
  except Exception as err:  # offline, unknown name, missing split: one actionable message
    raise DataError(f"could not load {path!r} (config {config!r}, split {hub_split!r}) through datasets: "
                    f"{type(err).__name__}: {err}. Offline? Pass data_dir= (the layout of ../shared/data) "
                    "instead.") from err
  if subjects is not None and name == "mmlu":
    keep = set(subjects)
    ds = ds.filter(lambda r: r.get("subject") in keep)
  report = LoadReport(f"{name} (hub {path}:{hub_split})")
  parse = HUB_PARSERS[name]
  examples = []
  for i, row in enumerate(ds):
    report.rows += 1
    try:
      examples.append(parse(row, f"{path}:{hub_split}:{i}", bench.num_choices))
    except RowError as err:
      if on_error == "raise":
        raise DataError(f"{path} split {hub_split} row {i}: {err}") from None
      report.skipped.append((f"{path}:{hub_split}", i, str(err)))
  report.kept = len(examples)
  return examples, report
