"""Benchmark loaders on ../shared/data (row counts against its MANIFEST) and on written fixtures:
malformed rows are reported with file and line, skipped with a count or rejected, never mislabelled."""

import json
import os

import pytest

from bmoe_jax import data as D

EXPECTED_ROWS = {("obqa", "train"): 4957, ("obqa", "dev"): 500, ("obqa", "test"): 500,
                 ("arc_easy", "train"): 2251, ("arc_easy", "dev"): 570, ("arc_easy", "test"): 2376,
                 ("arc_challenge", "train"): 1119, ("arc_challenge", "dev"): 299, ("arc_challenge", "test"): 1172,
                 ("boolq", "validation"): 3270, ("winogrande", "dev"): 1267, ("mmlu", "dev"): 285,
                 ("mmlu", "test"): 10535}


def test_every_split_of_the_shared_data_loads_cleanly(shared_data):
  manifest = json.load(open(os.path.join(shared_data, "MANIFEST.json")))
  for (name, split), rows in EXPECTED_ROWS.items():
    ds = D.load(name, split, data_dir=shared_data, on_error="raise")
    assert len(ds) == rows == ds.report.kept == ds.report.rows, (name, split)
    for ex in ds.examples:
      assert 0 <= ex.label < len(ex.choices)
  assert sum(v["rows"] for k, v in manifest.items() if k.startswith("mmlu/test/")) == EXPECTED_ROWS[("mmlu", "test")]
  # spot checks of the label mapping against the raw files
  arc = D.load("arc_easy", "dev", data_dir=shared_data).examples[0]
  assert arc.uid == "MCAS_2000_4_6" and arc.choices[arc.label] == "cellular telephone"
  obqa = D.load("obqa", "train", data_dir=shared_data).examples[0]
  assert obqa.uid == "7-980" and obqa.answer_letter == "D"
  bq = D.load("boolq", "validation", data_dir=shared_data).examples[0]
  assert bq.choices == ("yes", "no") and bq.label == 1 and bq.context  # "label": "false"
  wg = D.load("winogrande", "dev", data_dir=shared_data).examples[0]
  assert wg.choices == ("Sarah", "Maria") and wg.label == 1


def test_carved_splits_are_deterministic_disjoint_and_documented(shared_data):
  carved = [("winogrande", ("train_s", "test_s"), 1267), ("boolq", ("train", "dev", "test"), 3270),
            ("winogrande", ("train_m", "dev_m", "test_m"), 1267)]
  for name, splits, total in carved:
    parts = [D.load(name, sp, data_dir=shared_data, seed=3) for sp in splits]
    uids = [{e.uid for e in p.examples} for p in parts]
    assert sum(map(len, uids)) == len(set().union(*uids)) == total  # disjoint, and together every row
    assert [e.uid for e in D.load(name, splits[0], data_dir=shared_data, seed=3).examples] == \
        [e.uid for e in parts[0].examples]
    assert {e.uid for e in D.load(name, splits[0], data_dir=shared_data, seed=4).examples} != uids[0]
    assert all("seeded" in p.note for p in parts)
  sizes = [len(D.load("boolq", sp, data_dir=shared_data)) for sp in ("train", "dev", "test")]
  assert sizes == [round(0.7 * 3270), round(0.8 * 3270) - round(0.7 * 3270), 3270 - round(0.8 * 3270)]
  assert len(D.load("winogrande", "test_m", data_dir=shared_data)) == 1267 - round(0.8 * 1267)


def test_mmlu_subjects(shared_data):
  ds = D.load("mmlu", "test", data_dir=shared_data, subjects=["astronomy", "machine_learning"])
  assert {e.subject for e in ds.examples} == {"astronomy", "machine_learning"} and len(ds) == 152 + 112
  with pytest.raises(D.DataError, match="no file for subjects \\['astrology'\\]"):
    D.load("mmlu", "test", data_dir=shared_data, subjects=["astrology"])


def _write(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")
  return path


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
  good = {"id": "q1", "question": "Q?", "choices": ["a", "b", "c", "d"], "label": 2}
  rows = [json.dumps(good),
          json.dumps({"id": "q2", "choices": ["a", "b", "c", "d"], "label": 0}),  # 2: no question
          json.dumps({**good, "id": "q3", "label": 4}),  # 3: label out of range
          json.dumps({**good, "id": "q4", "choices": ["a", "b", "c"]}),  # 4: three choices
          '{"id": "q5", "question": ',  # 5: broken JSON
          json.dumps({**good, "id": "q6", "label": "2"}),  # 6: label not an integer
          json.dumps({**good, "id": "q7", "choices": ["a", "", "c", "d"]})]  # 7: empty choice
  path = _write(tmp_path / "obqa" / "train.jsonl", rows)
  ds = D.load("obqa", "train", data_dir=tmp_path)
  assert [e.uid for e in ds.examples] == ["q1"] and ds.examples[0].label == 2
  assert ds.report.rows == 7 and ds.report.kept == 1
  reasons = {line: why for _, line, why in ds.report.skipped}
  assert reasons[2] == "missing field 'question'"
  assert reasons[3] == "label 4 out of range for 4 choices"
  assert reasons[4] == "3 choices, expected 4"
  assert reasons[5].startswith("invalid JSON")
  assert "not an integer" in reasons[6] and "empty" in reasons[7]
  assert all(f == str(path) for f, _, _ in ds.report.skipped)
  assert "6 skipped" in ds.report.summary() and f"{path}:2: missing field 'question'" in ds.report.summary()
  with pytest.raises(D.DataError, match=f"{path}:2: missing field 'question'"):
    D.load("obqa", "train", data_dir=tmp_path, on_error="raise")


def test_arc_answer_keys_and_bad_inputs(tmp_path):
  def row(key, labels):
    return json.dumps({"id": key + "".join(labels), "question": {"stem": "S?", "choices": [
        {"text": f"t{i}", "label": lab} for i, lab in enumerate(labels)]}, "answerKey": key})
  _write(tmp_path / "arc_easy" / "ARC-Easy-Dev.jsonl",
         [row("3", ["1", "2", "3", "4"]), row("E", list("ABCDE")), row("E", list("ABCD")), row("A", list("AB"))])
  ds = D.load("arc_easy", "dev", data_dir=tmp_path)
  assert [e.label for e in ds.examples] == [2, 4]
  assert [why for _, _, why in ds.report.skipped] == [
      "answer key 'E' is not one of the choice labels ['A', 'B', 'C', 'D']", "2 choices, expected 3-5"]
  with pytest.raises(ValueError, match="unknown dataset 'piqa'"):
    D.load("piqa", "test", data_dir=tmp_path)
  with pytest.raises(ValueError, match="no split 'validation'"):
    D.load("obqa", "validation", data_dir=tmp_path)
  with pytest.raises(D.DataError, match="file not found"):
    D.load("obqa", "test", data_dir=tmp_path)
  with pytest.raises(ValueError, match="on_error='ignore'"):
    D.load("obqa", "test", data_dir=tmp_path, on_error="ignore")


def test_mmlu_csv_rows(tmp_path):
  _write(tmp_path / "mmlu" / "test" / "toy_subject_test.csv",
         ["question,choice0,choice1,choice2,choice3,answer", "What?,a,b,c,d,3", "Why?,a,b,c,d,B",
          "How?,a,b,c,d,7", "Who?,a,b,c"])
  ds = D.load("mmlu", "test", data_dir=tmp_path)
  assert [(e.label, e.subject) for e in ds.examples] == [(3, "toy_subject"), (1, "toy_subject")]
  assert [(line, why) for _, line, why in ds.report.skipped] == [
      (4, "label 7 out of range for 4 choices"), (5, "missing field 'choice3'")]


def test_hub_schema_through_datasets(tmp_path):
  """The hub code path (``datasets.load_dataset``) on a local directory in the hub's schema."""
  hub = tmp_path / "openbookqa"
  rows = [{"id": "h1", "question_stem": "Sun?", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")},
           "answerKey": "C"},
          {"id": "h2", "question_stem": "Moon?", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")},
           "answerKey": "Z"}]
  _write(hub / "test.jsonl", [json.dumps(r) for r in rows])
  ds = D.load("obqa", "test", hub=str(hub))
  assert [(e.uid, e.label) for e in ds.examples] == [("h1", 2)]
  assert ds.report.skipped[0][2] == "answer key 'Z' is not one of the choice labels ['A', 'B', 'C', 'D']"
  bq = tmp_path / "boolq"
  _write(bq / "validation.jsonl", [json.dumps({"question": "is it?", "answer": True, "passage": "P."}),
                                   json.dumps({"question": "is it not?", "answer": False, "passage": "P."})])
  val = D.load("boolq", "validation", hub=str(bq))
  assert [e.label for e in val.examples] == [0, 1] and val.examples[0].context == "P."


def test_hub_schema_winogrande_and_mmlu(tmp_path):
  """WinoGrande (sentence/option1/option2/answer '1'|'2'; the hub's unlabelled rows have answer '') and
  MMLU (question/subject/choices/answer index) through ``datasets``; nothing carved from the hub."""
  wg = tmp_path / "winogrande"
  row = {"sentence": "Sarah helped Maria because _ was kind.", "option1": "Sarah", "option2": "Maria"}
  _write(wg / "train.jsonl", [json.dumps({**row, "answer": "1"}), json.dumps({**row, "answer": "2"})])
  _write(wg / "validation.jsonl", [json.dumps({**row, "answer": a}) for a in ("2", "", "1", "3")])
  tr = D.load("winogrande", "train_s", hub=str(wg))
  assert [e.label for e in tr.examples] == [0, 1] and tr.examples[0].choices == ("Sarah", "Maria")
  assert tr.note == ""  # the official training set: not a carved deviation
  te = D.load("winogrande", "test_s", hub=str(wg))
  assert [e.label for e in te.examples] == [1, 0]  # the whole validation set, minus the bad rows
  assert [(line, why) for _, line, why in te.report.skipped] == [
      (1, "answer '' must be '1' or '2'"), (3, "answer '3' must be '1' or '2'")]
  with pytest.raises(D.DataError, match="split validation row 1: answer '' must be '1' or '2'"):
    D.load("winogrande", "dev", hub=str(wg), on_error="raise")
  mm = tmp_path / "mmlu"
  rows = [{"question": "2+2?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 3},
          {"question": "Sun?", "subject": "astronomy", "choices": ["star", "planet", "moon", "comet"], "answer": 0},
          {"question": "Mars?", "subject": "astronomy", "choices": ["star", "planet", "moon"], "answer": 1},
          {"question": "Moon?", "subject": "astronomy", "choices": ["star", "planet", "moon", "comet"], "answer": 4}]
  _write(mm / "test.jsonl", [json.dumps(r) for r in rows])
  every = D.load("mmlu", "test", hub=str(mm))
  assert [(e.subject, e.label) for e in every.examples] == [("math", 3), ("astronomy", 0)]
  assert [why for _, _, why in every.report.skipped] == ["3 choices, expected 4", "label 4 out of range for 4 choices"]
  astro = D.load("mmlu", "test", hub=str(mm), subjects=["astronomy"])
  assert [e.question for e in astro.examples] == ["Sun?"] and astro.report.rows == 3


def test_hub_errors_name_the_source(tmp_path):
  from bmoe_jax.data import hub as H
  from bmoe_jax.data.registry import BENCHMARKS

  assert BENCHMARKS["winogrande"].hub_splits["train_m"] == ("winogrande_m", "train")
  with pytest.raises(D.DataError, match="boolq split 'dev' is carved from the local files only"):
    H.load_hub("boolq", "dev", BENCHMARKS["boolq"], str(tmp_path), None, "skip")
  with pytest.raises(D.DataError, match="could not load .*no_such_dir.* split 'test'.*Pass data_dir="):
    H.load_hub("obqa", "test", BENCHMARKS["obqa"], str(tmp_path / "no_such_dir"), None, "skip")


def test_synthetic_suite():
  """Generated deterministically, 4 distinct choices with the answer among them, disjoint category
  questions across splits, labelled SYNTHETIC through the registry."""
  from bmoe_jax.data import synthetic as S

  for task in S.TASKS:
    ex = S.generate(task, "test", n=50, seed=3)
    assert ex == S.generate(task, "test", n=50, seed=3) and ex != S.generate(task, "test", n=50, seed=4)
    assert all(len(set(e.choices)) == 4 and 0 <= e.label < 4 for e in ex)
  words = {split: {(e.question, e.choices[e.label]) for e in S.generate("synthetic", split)}
           for split in ("train", "dev", "test")}
  assert not words["train"] & words["test"] and not words["train"] & words["dev"]
  caps = S.generate("synthetic_capitals", "test", n=40)
  assert all(e.choices[e.label] == S.CAPITALS[e.question[len("What is the capital of "):-1]] for e in caps)
  ds = D.load("synthetic", "dev")
  assert len(ds.examples) == S.SIZES["dev"] and ds.note.startswith("SYNTHETIC")
  with pytest.raises(ValueError, match="only its 'test' split"):
    S.generate("synthetic_capitals", "train")


def test_encodings_byte_order_marks_and_duplicate_ids(tmp_path):
  """A BOM keeps the first row; a line that is not UTF-8 is skipped naming its line (JSONL) or refused naming
  it (CSV); ids that occur twice are reported; a file with nothing usable is one DataError with the reasons."""
  from bmoe_jax.pipeline.data import load_examples

  good = {"id": "q1", "question": "Q?", "choices": ["a", "b", "c", "d"], "label": 2}
  path = tmp_path / "obqa" / "train.jsonl"
  path.parent.mkdir(parents=True)
  lines = [b"\xef\xbb\xbf" + json.dumps(good).encode(), json.dumps({**good, "id": "q2"}).encode(),
           b'{"id": "q3", "question": "caf\xe9?", "choices": ["a", "b", "c", "d"], "label": 1}',
           json.dumps(good).encode()]  # 4: q1 again
  path.write_bytes(b"\n".join(lines) + b"\n")
  ds = D.load("obqa", "train", data_dir=tmp_path)
  assert [e.uid for e in ds.examples] == ["q1", "q2", "q1"]
  assert ds.report.skipped == [(str(path), 3, "not UTF-8 text (byte 0xe9 at column 30)")]
  assert ds.report.duplicates == ["q1"] and "1 ids occur more than once (e.g. q1)" in ds.report.summary()
  csv_path = tmp_path / "mmlu" / "test" / "toy_test.csv"
  csv_path.parent.mkdir(parents=True)
  csv_path.write_bytes(b"\xef\xbb\xbfquestion,choice0,choice1,choice2,choice3,answer\nWhat?,a,b,c,d,3\n"
                       b"Wh\xffy?,a,b,c,d,1\n")
  with pytest.raises(D.DataError, match=r"toy_test.csv:3: not UTF-8 text \(byte 0xff\)"):
    D.load("mmlu", "test", data_dir=tmp_path)
  csv_path.write_bytes(b"\xef\xbb\xbfquestion,choice0,choice1,choice2,choice3,answer\nWhat?,a,b,c,d,3\n")
  assert [e.label for e in D.load("mmlu", "test", data_dir=tmp_path).examples] == [3]  # the BOM header parses
  path.write_bytes(json.dumps({"id": "x", "question": "Q?"}).encode() + b"\n")
  with pytest.raises(D.DataError, match=r"obqa:train: no usable examples \(.*0 of 1 rows kept, 1 skipped: "
                                        r".*train.jsonl:1: missing field 'choices'"):
    load_examples("obqa:train", tmp_path)
