"""The six benchmarks: where their files are, how their rows parse, their splits, and the hub names.

``load(name, split, data_dir=...)`` reads the local layout of ``../shared/data``; ``load(name, split,
hub=...)`` reads through Hugging Face ``datasets`` (a hub name, or a local directory in the hub's
schema). Documented deviations (the local data lacks these splits, so they are carved out of what
exists, deterministically from ``seed``, and the split's ``note`` says so in every result file):

* BoolQ: the train questions come without passages, so ``train`` / ``dev`` / ``test`` are a seeded 70/10/20
  split of the SuperGLUE validation set (``validation`` is all of it).
* WinoGrande: only the dev sentences exist, so ``train_s`` / ``test_s`` are a seeded 50/50 split of dev
  and ``train_m`` / ``dev_m`` / ``test_m`` a 65/15/20 one (the official S/M train sets are 640 / 2558 rows;
  ours are smaller and drawn from dev).

Through the hub nothing is carved: ``train_s`` / ``train_m`` are the official WinoGrande S / M training
sets (configs ``winogrande_s`` / ``winogrande_m``), BoolQ ``train`` is the official training split, and
the ``test`` splits are the whole validation sets; the carved dev splits (BoolQ ``dev``, WinoGrande ``dev_m``)
exist only locally.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable

import numpy as np

from bmoe_jax.data import local, synthetic
from bmoe_jax.data.records import ON_ERROR, DataError, LoadReport, MCExample, RowError

DATA_DIR_ENV = "BMOE_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Source:
  files: tuple[str, ...]  # relative to the data dir; a "*" globs (MMLU subjects)
  parser: Callable
  carve: tuple[float, float] | None = None  # [lo, hi): this fraction of a seeded permutation of the files' rows


@dataclasses.dataclass(frozen=True)
class Benchmark:
  num_choices: int | tuple[int, int]
  splits: dict[str, Source]
  hub: tuple[str, str | None]  # (hub path, config)
  hub_splits: dict[str, str | tuple[str, str]]  # our split -> hub split, or (hub config, hub split)
  note: str = ""


def _carved(files, parser, lo, hi):
  return Source(files, parser, (lo, hi))


_WG = ("winogrande/dev_from_llm_adapters.jsonl",)
_BQ = ("boolq/superglue_val.jsonl",)
BENCHMARKS: dict[str, Benchmark] = {
    "obqa": Benchmark(4, {s: Source((f"obqa/{s}.jsonl",), local.parse_simple_mc) for s in ("train", "dev", "test")},
                      ("allenai/openbookqa", "main"), {"train": "train", "dev": "validation", "test": "test"}),
    "arc_easy": Benchmark((3, 5), {"train": Source(("arc_easy/train_from_llm_adapters.jsonl",), local.parse_simple_mc),
                                   "dev": Source(("arc_easy/ARC-Easy-Dev.jsonl",), local.parse_ai2_arc),
                                   "test": Source(("arc_easy/ARC-Easy-Test.jsonl",), local.parse_ai2_arc)},
                          ("allenai/ai2_arc", "ARC-Easy"), {"train": "train", "dev": "validation", "test": "test"}),
    "arc_challenge": Benchmark((3, 5), {
        "train": Source(("arc_challenge/train_from_llm_adapters.jsonl",), local.parse_simple_mc),
        "dev": Source(("arc_challenge/ARC-Challenge-Dev.jsonl",), local.parse_ai2_arc),
        "test": Source(("arc_challenge/ARC-Challenge-Test.jsonl",), local.parse_ai2_arc)},
        ("allenai/ai2_arc", "ARC-Challenge"), {"train": "train", "dev": "validation", "test": "test"}),
    "boolq": Benchmark(2, {"validation": Source(_BQ, local.parse_boolq),
                           "train": _carved(_BQ, local.parse_boolq, 0.0, 0.7),
                           "dev": _carved(_BQ, local.parse_boolq, 0.7, 0.8),
                           "test": _carved(_BQ, local.parse_boolq, 0.8, 1.0)},
                       ("google/boolq", None), {"train": "train", "validation": "validation", "test": "validation"},
                       note="BoolQ train/dev/test: seeded 70/10/20 split of the SuperGLUE validation set (train "
                            "passages unavailable)"),
    "winogrande": Benchmark(2, {"dev": Source(_WG, local.parse_winogrande),
                                "train_s": _carved(_WG, local.parse_winogrande, 0.0, 0.5),
                                "test_s": _carved(_WG, local.parse_winogrande, 0.5, 1.0),
                                "train_m": _carved(_WG, local.parse_winogrande, 0.0, 0.65),
                                "dev_m": _carved(_WG, local.parse_winogrande, 0.65, 0.8),
                                "test_m": _carved(_WG, local.parse_winogrande, 0.8, 1.0)},
                            ("allenai/winogrande", "winogrande_xl"),
                            {"dev": "validation", "train_s": ("winogrande_s", "train"),
                             "train_m": ("winogrande_m", "train"), "test_s": "validation", "test_m": "validation"},
                            note="WinoGrande S/M: seeded 50/50 and 65/15/20 splits of the dev set (official "
                                 "train_s/train_m sentences unavailable)"),
    "mmlu": Benchmark(4, {"dev": Source(("mmlu/dev/*_dev.csv",), local.parse_mmlu),
                          "test": Source(("mmlu/test/*_test.csv",), local.parse_mmlu)},
                      ("cais/mmlu", "all"), {"dev": "dev", "test": "test"}),
}


@dataclasses.dataclass
class MCDataset:
  name: str
  split: str
  examples: list[MCExample]
  report: LoadReport
  note: str = ""

  def __len__(self):
    return len(self.examples)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
  """``data_dir``, else ``$BMOE_DATA_DIR``, else None (then the hub is used)."""
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  return None if data_dir is None else Path(data_dir)


def _spec(name: str, split: str) -> tuple[Benchmark, Source]:
  if name not in BENCHMARKS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BENCHMARKS)}")
  bench = BENCHMARKS[name]
  if split not in bench.splits:
    raise ValueError(f"dataset {name!r} has no split {split!r}; expected one of {sorted(bench.splits)}")
  return bench, bench.splits[split]


def carve(examples: list, lo: float, hi: float, seed: int) -> list:
  """A deterministic part of a seeded permutation: its fraction [lo, hi) (the parts of one seed are disjoint
  and, over [0, 1), cover every example)."""
  order = np.random.RandomState(seed).permutation(len(examples))
  a, b = (int(round(f * len(examples))) for f in (lo, hi))
  return [examples[i] for i in sorted(order[a:b])]


def _collect(rows, parse, report: LoadReport, on_error: str, where: Callable[[int], tuple[str, int]]):
  out = []
  for i, row in rows:
    report.rows += 1
    try:
      if isinstance(row, RowError):
        raise row
      out.append(parse(row, i))
    except RowError as err:
      file, line = where(i)
      if on_error == "raise":
        raise DataError(f"{file}:{line}: {err}") from None
      report.skipped.append((file, line, str(err)))
  report.kept += len(out)
  return out


def load(name: str, split: str, *, data_dir: str | Path | None = None, hub: str | None = None,
         subjects: list[str] | None = None, on_error: str = "skip", seed: int = 0) -> MCDataset:
  """Load one split as ``MCExample``s (see the module docstring for the sources and deviations).

  Args:
    data_dir: a directory in the layout of ``../shared/data`` (default ``$BMOE_DATA_DIR``).
    hub: read through ``datasets.load_dataset`` instead: True/"" for the benchmark's hub name, or a
      hub name / local directory in the hub's schema.
    subjects: MMLU subjects (file stems like ``"astronomy"``); None: all.
    on_error: ``"skip"`` malformed rows (counted, listed in ``report``) or ``"raise"`` a ``DataError``.
    seed: for the carved splits (BoolQ, WinoGrande).
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}: expected one of {ON_ERROR}")
  if name in synthetic.TASKS:  # generated here: no files, no hub
    examples = synthetic.generate(name, split, seed=seed)
    report = LoadReport(f"generated:{name}", rows=len(examples), kept=len(examples))
    return MCDataset(name, split, examples, report, synthetic.NOTE)
  bench, source = _spec(name, split)
  root = resolve_data_dir(data_dir)
  if hub is not None or root is None:
    from bmoe_jax.data import hub as H
    examples, report = H.load_hub(name, split, bench, hub or None, subjects, on_error)
  else:
    examples, report = _load_local(name, root, source, bench, subjects, on_error)
  counts = collections.Counter(e.uid for e in examples)
  report.duplicates = sorted(uid for uid, n in counts.items() if n > 1)
  from_hub = hub is not None or root is None
  if source.carve is not None and not from_hub:  # the hub has the real training sets: nothing to carve
    examples = carve(examples, *source.carve, seed)
  return MCDataset(name, split, examples, report, bench.note if source.carve and not from_hub else "")


def _load_local(name, root: Path, source: Source, bench: Benchmark, subjects, on_error):
  if not root.is_dir():
    raise DataError(f"data directory {root} does not exist (pass data_dir= or set ${DATA_DIR_ENV})")
  paths = []
  for pattern in source.files:
    found = sorted(root.glob(pattern)) if "*" in pattern else [root / pattern]
    if "*" in pattern and subjects is not None:
      stems = {p.name.rsplit("_", 1)[0]: p for p in found}
      missing = [s for s in subjects if s not in stems]
      if missing:
        raise DataError(f"{root / pattern}: no file for subjects {missing} (have {len(stems)} subjects)")
      found = [stems[s] for s in subjects]
    if not found or not all(p.is_file() for p in found):
      raise DataError(f"{root / pattern}: file not found (expected the layout of ../shared/data/README.md)")
    paths += found
  report = LoadReport(f"{name} ({', '.join(p.name for p in paths[:3])}{' ...' if len(paths) > 3 else ''})")
  examples = []
  for path in paths:
    rel = str(path)
    subject = path.name.rsplit("_", 1)[0] if path.suffix == ".csv" else None
    parse = functools.partial(_parse_row, source.parser, bench.num_choices, path.name, subject)
    examples += _collect(local.read_rows(path), parse, report, on_error, lambda i, r=rel: (r, i))
  return examples, report


def _parse_row(parser, num_choices, file_name, subject, row, line):
  uid = f"{file_name}:{line}"
  if subject is not None:
    return parser(row, uid, num_choices, subject=subject)
  return parser(row, uid, num_choices)
