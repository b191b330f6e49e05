"""The cases of ``experiments/bad_inputs.py``: tiny fixtures, file edits (safetensors headers and bytes, JSON
configs, data rows, orbax saves), CLI commands, and one ``Case`` per bad input or interruption (its setup, the
pattern a clear message matches, and for inputs with a right answer the check of that answer)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--shift", "", "--max-train", "16", "--max-eval", "16", "--batch-size", "8", "--max-length", "96", "--quiet"]
FIXTURES = """
import sys, shutil, json, jax, numpy as np
from pathlib import Path
import bmoe_jax as B
from bmoe_jax.checkpoint import save_params
from tests.fixtures import tiny_model_dir
from convert.reference import make_checkpoint
work, shared = Path(sys.argv[1]), sys.argv[2]
model = tiny_model_dir(work / "model", shared)
cfg = B.tiny_config(vocab_size=512, num_experts=4, moe_layers=(False, True))
for name, seed, bad in (("model_b", 1, False), ("model_nan", 0, True)):
  params = B.init_params(cfg, jax.random.key(seed), std=0.3)
  if bad:
    w = np.array(params["layers"][1]["mlp"]["experts"]["w_down"]); w[2, 0, 0] = np.nan
    params["layers"][1]["mlp"]["experts"]["w_down"] = w
  save_params(work / name, cfg, params)
  for f in model.iterdir():
    if f.is_file() and f.name != "bmoe_config.json":
      shutil.copy(f, work / name / f.name)
make_checkpoint("mixtral", work / "hf", seed=0)
"""


class Ctx(NamedTuple):
  repo: Path  # the source tree under test
  work: Path  # its fixtures and case directories
  shared: str  # the real data directory

  @property
  def data(self) -> Path:
    return self.work / "data"


class Case(NamedTuple):
  name: str
  group: str
  setup: Callable[[Ctx, Path], list[str]]  # -> CLI argv (the case directory is empty and exists)
  expect: str  # regex a clear message matches (searched in stderr + stdout)
  ok: Callable[[Ctx, Path, str], bool] | None = None  # exit 0 is correct when this holds (None: never)


def cli(ctx: Ctx, argv: list[str], timeout: int = 900) -> tuple[int, str]:
  env = {**os.environ, "PYTHONPATH": str(ctx.repo), "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_ENABLE_X64", None)
  try:
    p = subprocess.run([sys.executable, "-m", "bmoe_jax.cli", *argv], cwd=ctx.repo, env=env, capture_output=True,
                       text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -9, "timed out (a hang)"
  return p.returncode, p.stderr + p.stdout


def make_fixtures(ctx: Ctx) -> None:
  if (ctx.work / "hf").exists():
    return
  env = {**os.environ, "PYTHONPATH": str(ctx.repo), "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", FIXTURES, str(ctx.work), ctx.shared], cwd=ctx.repo, env=env, check=True)
  (ctx.data / "obqa").mkdir(parents=True)
  for split in ("train", "dev", "test"):
    rows = Path(ctx.shared, "obqa", f"{split}.jsonl").read_text().splitlines()[:40]
    (ctx.data / "obqa" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


# --- file edits -------------------------------------------------------------------------------------------------

def read_st(path: Path) -> tuple[list[tuple[str, dict]], bytes]:
  raw = path.read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  return list(json.loads(raw[8:8 + n]).items()), raw[8 + n:]


def write_st(path: Path, items: list[tuple[str, dict]], data: bytes) -> None:
  """A safetensors file from (key, entry) pairs written as given: a key may repeat."""
  text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"
  text += " " * (-len(text) % 8)
  path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)


def hf_copy(ctx: Ctx, d: Path, edit: Callable[[Path], None] | None = None) -> Path:
  shutil.copytree(ctx.work / "hf", d / "hf")
  if edit is not None:
    edit(d / "hf")
  return d / "hf"


def st_file(hf: Path) -> Path:
  return sorted(hf.glob("*.safetensors"))[0]


def expert_keys(items) -> list[str]:
  return [k for k, v in items if ".experts." in k and v.get("dtype") == "F32"]


def duplicate_key(hf: Path) -> None:
  items, data = read_st(st_file(hf))
  a, b = expert_keys(items)[:2]
  entry = dict(items)
  write_st(st_file(hf), items + [(b, entry[a])], data)  # b listed twice, the second time over a's bytes


def nan_expert(hf: Path) -> None:
  items, data = read_st(st_file(hf))
  start = dict(items)[expert_keys(items)[0]]["data_offsets"][0]
  data = bytearray(data)
  data[start:start + 4] = struct.pack("<f", float("nan"))
  write_st(st_file(hf), items, bytes(data))


def int_tensor(hf: Path) -> None:
  items, data = read_st(st_file(hf))
  k = expert_keys(items)[0]
  write_st(st_file(hf), [(n, {**v, "dtype": "I32"} if n == k else v) for n, v in items], data)


def truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def hf_config(hf: Path, **change) -> None:
  cfg = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**cfg, **change}))


def flip_bytes(directory: Path) -> None:
  """Overwrite the middle of every stored array file (what a bad disk or a partial copy leaves)."""
  for f in directory.rglob("*"):
    if f.is_file() and f.stat().st_size > 64 and "json" not in f.name and "METADATA" not in f.name.upper():
      raw = bytearray(f.read_bytes())
      raw[len(raw) // 2: len(raw) // 2 + 32] = bytes(range(200, 232))
      f.write_bytes(bytes(raw))


def model_copy(ctx: Ctx, d: Path, name: str = "model") -> Path:
  shutil.copytree(ctx.work / name, d / "model")
  return d / "model"


def edit_json(path: Path, fn) -> None:
  path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def data_copy(ctx: Ctx, d: Path, edit: Callable[[Path], None] | None = None) -> Path:
  shutil.copytree(ctx.data, d / "data")
  if edit is not None:
    edit(d / "data" / "obqa" / "test.jsonl")
  return d / "data"


def results_n(d: Path, name: str = "obqa_test") -> int | None:
  f = d / "out" / "results.json"
  return json.loads(f.read_text())["methods"]["map"][name]["n"] if f.exists() else None


# --- commands ---------------------------------------------------------------------------------------------------

def ev(ctx: Ctx, d: Path, model: Path | None = None, data: Path | None = None, extra=()) -> list[str]:
  return ["evaluate", "--model", str(model or ctx.work / "model"), "--methods", "map", "--data-dir",
          str(data or ctx.data), "--test", "obqa:test", *COMMON, "--max-eval", "100", *extra, "--out", str(d / "out")]


def ft(ctx: Ctx, d: Path, extra=(), train: str = "obqa:train") -> list[str]:
  return ["finetune", "--model", str(ctx.work / "model"), "--data-dir", str(ctx.data), "--train", train,
          "--test", "obqa:test", "--epochs", "1", "--lr", "1e-3", *COMMON, *extra, "--out", str(d / "out")]


def fit(ctx: Ctx, out: Path, model: Path | None = None, train: str = "obqa:train", extra=()) -> list[str]:
  return ["fit", "--model", str(model or ctx.work / "model"), "--data-dir", str(ctx.data), "--train", train,
          "--prior-mean", "zero", "--rank", "4", *COMMON, *extra, "--out", str(out)]


def rt(ctx: Ctx, d: Path, train: str) -> list[str]:
  return ["route-train", "--model", str(ctx.work / "model"), "--kind", "mfvr", "--route-layers", "last:1",
          "--route-epochs", "1", "--data-dir", str(ctx.data), "--train", train, *COMMON, "--out", str(d / "rt")]


def first(ctx: Ctx, argv: list[str]) -> None:
  """Run a case's first command (a finished run the case then reruns or reuses); it must succeed."""
  rc, out = cli(ctx, argv)
  if rc != 0:
    raise RuntimeError(f"setup command failed ({' '.join(argv)}):\n{out[-2000:]}")


def latest_save(directory: Path) -> Path:
  return max((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def fitted_twice(ctx: Ctx, d: Path) -> Path:
  """Two posteriors on other data, the first one's arrays copied under the second one's record."""
  first(ctx, fit(ctx, d / "a"))
  first(ctx, fit(ctx, d / "b", train="obqa:dev"))
  shutil.rmtree(d / "b" / "posterior" / "state")
  shutil.copytree(d / "a" / "posterior" / "state", d / "b" / "posterior" / "state")
  return d / "b" / "posterior"


def damaged_checkpoint_rerun(ctx: Ctx, d: Path) -> list[str]:
  argv = ft(ctx, d, ["--checkpoint-every", "1", "--keep-checkpoints", "3"])
  first(ctx, argv)
  shutil.rmtree(d / "out" / "model", ignore_errors=True)
  flip_bytes(latest_save(d / "out" / "checkpoints"))
  return argv


def damaged_factors_rerun(ctx: Ctx, d: Path) -> list[str]:
  argv = fit(ctx, d / "out")
  first(ctx, argv)
  shutil.rmtree(d / "out" / "posterior")
  flip_bytes(latest_save(d / "out" / "factors"))
  return argv


# --- the cases --------------------------------------------------------------------------------------------------

def conv(edit=None, extra=()):
  return lambda ctx, d: ["convert", str(hf_copy(ctx, d, edit)), str(d / "out"), "--quiet", *extra]


def model_edit(edit, command: str = "evaluate"):
  def setup(ctx: Ctx, d: Path) -> list[str]:
    m = model_copy(ctx, d)
    edit(m)
    return ["info", str(m)] if command == "info" else ev(ctx, d, model=m)
  return setup


def set_experts(value):
  return lambda m: edit_json(m / "bmoe_config.json", lambda j: {**j, "config": {**j["config"], "num_experts": value}})


def data_edit(edit):
  return lambda ctx, d: ev(ctx, d, data=data_copy(ctx, d, edit))


def rows_edit(fn):
  def edit(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in fn(rows)))
  return edit


def non_utf8(path: Path) -> None:
  lines = path.read_bytes().split(b"\n")
  lines[5] = lines[5].replace(b"question", b"qu\xffestion", 1)
  path.write_bytes(b"\n".join(lines))


def n_is(n: int, also: str = ""):
  return lambda ctx, d, out: results_n(d) == n and re.search(also, out, re.I) is not None


def made(path: str, also: str = ""):
  return lambda ctx, d, out: (d / path).exists() and re.search(also, out, re.I) is not None


def flag(cmd: Callable, *extra: str):
  return lambda ctx, d: cmd(ctx, d, extra=list(extra))


def rerun(make_first: Callable, make_second: Callable):
  def setup(ctx: Ctx, d: Path) -> list[str]:
    first(ctx, make_first(ctx, d))
    return make_second(ctx, d)
  return setup


def with_config(text: str):
  def setup(ctx: Ctx, d: Path) -> list[str]:
    (d / "cfg.json").write_text(text)
    return ev(ctx, d, extra=["--config", str(d / "cfg.json")])
  return setup


def posterior_eval(ctx: Ctx, d: Path, post: Path, model: Path | None = None) -> list[str]:
  return [*ev(ctx, d, model=model)[:-2], "--methods", "bmoe", "--posterior", str(post), "--out", str(d / "out")]


def other_model_posterior(ctx: Ctx, d: Path) -> list[str]:
  first(ctx, fit(ctx, d / "fit"))
  return posterior_eval(ctx, d, d / "fit" / "posterior", model=ctx.work / "model_b")


def damaged_posterior(ctx: Ctx, d: Path) -> list[str]:
  first(ctx, fit(ctx, d / "fit"))
  flip_bytes(d / "fit" / "posterior" / "state")
  return posterior_eval(ctx, d, d / "fit" / "posterior")


NAMES_TENSOR = r"(non-finite|nan).*experts|experts.*(non-finite|nan)"
CASES = [
    Case("duplicate key in one safetensors header", "convert", conv(duplicate_key), r"duplicate|twice"),
    Case("NaN in an expert tensor", "convert", conv(nan_expert), NAMES_TENSOR),
    Case("int32 tensor where a float weight belongs", "convert", conv(int_tensor), r"int32|integer|floating"),
    Case("--dtype int8", "convert", conv(extra=["--dtype", "int8"]), r"dtype.*int8|int8.*dtype"),
    Case("--dtype float64 without x64", "convert", conv(extra=["--dtype", "float64"]), r"x64"),
    Case("truncated safetensors file", "convert", conv(lambda hf: truncate(st_file(hf))), r"\.safetensors"),
    Case("config.json not JSON", "convert", conv(lambda hf: (hf / "config.json").write_text("{oops")),
         r"config\.json"),
    Case("config num_experts_per_tok: \"two\"", "convert", conv(lambda hf: hf_config(hf, num_experts_per_tok="two")),
         r"num_experts_per_tok"),
    Case("config num_local_experts: true", "convert", conv(lambda hf: hf_config(hf, num_local_experts=True)),
         r"num_local_experts"),
    Case("config with an attribute no converter handles", "convert",
         conv(lambda hf: hf_config(hf, sliding_window_pattern=4)), r"sliding_window_pattern"),
    Case("config hidden_size disagrees with the tensors", "convert", conv(lambda hf: hf_config(hf, hidden_size=48)),
         r"shape"),
    Case("model dir: flipped bytes in the stored weights", "model", model_edit(lambda m: flip_bytes(m / "params")),
         r"params"),
    Case("model dir: config says 2 experts over 4 (evaluate)", "model", model_edit(set_experts(2)),
         r"bmoe_config\.json.*shape"),
    Case("model dir: config says 2 experts over 4 (info)", "model", model_edit(set_experts(2), "info"),
         r"bmoe_config\.json.*shape"),
    Case("model dir: num_experts \"eight\"", "model", model_edit(set_experts("eight")), r"num_experts"),
    Case("model dir: num_experts true", "model", model_edit(set_experts(True)), r"num_experts"),
    Case("model dir: bmoe_config.json not JSON", "model",
         model_edit(lambda m: (m / "bmoe_config.json").write_text("{")), r"bmoe_config\.json"),
    Case("model dir: params/ missing", "model", model_edit(lambda m: shutil.rmtree(m / "params")), r"params"),
    Case("model dir: NaN weights (evaluate)", "model", lambda ctx, d: ev(ctx, d, model=ctx.work / "model_nan"),
         NAMES_TENSOR.replace("experts", "w_down")),
    Case("--model does not exist", "model", lambda ctx, d: ev(ctx, d, model=d / "nowhere"), r"nowhere"),
    Case("data: UTF-8 BOM (all 40 rows scored)", "data", data_edit(lambda p: p.write_text("\ufeff" + p.read_text())),
         r"test\.jsonl", n_is(40)),
    Case("data: a non-UTF-8 line (39 scored, line named)", "data", data_edit(non_utf8), r"test\.jsonl:6",
         n_is(39, r"test\.jsonl:6: ")),
    Case("data: empty file", "data", data_edit(lambda p: p.write_text("")), r"test\.jsonl"),
    Case("data: every label out of range", "data", data_edit(rows_edit(lambda rs: [{**r, "label": 9} for r in rs])),
         r"test\.jsonl.*label|label.*test\.jsonl"),
    Case("data: every row twice (duplicates reported)", "data", data_edit(rows_edit(lambda rs: rs + rs)),
         r"more than once", n_is(80, r"more than once")),
    Case("data: one row without a question (39 scored, reason shown)", "data",
         data_edit(rows_edit(lambda rs: [{k: v for k, v in r.items() if k != "question" or i} for i, r in
                                         enumerate(rs)])), r"test\.jsonl:1: ", n_is(39, r"test\.jsonl:1: ")),
    Case("--data-dir does not exist", "flags", lambda ctx, d: ev(ctx, d, data=d / "nodata"), r"nodata"),
    Case("--test nonsense:test", "flags", flag(ev, "--test", "nonsense:test"), r"nonsense"),
    Case("--methods nonsense", "flags", flag(ev, "--methods", "nonsense"), r"nonsense"),
    Case("--max-length 0", "flags", flag(ev, "--max-length", "0"), r"max.length"),
    Case("--batch-size 0", "flags", flag(ev, "--batch-size", "0"), r"batch.size"),
    Case("--max-eval -1", "flags", flag(ev, "--max-eval", "-1"), r"max.eval"),
    Case("--route-samples 0", "flags", flag(ev, "--route-samples", "0"), r"route.samples"),
    Case("--config file not JSON", "flags", with_config("{not json"), r"cfg\.json"),
    Case("--config with an unknown key", "flags", with_config('{"nonsense_key": 1}'), r"nonsense_key"),
    Case("--out under a regular file", "flags",
         lambda ctx, d: (d / "afile").write_text("") or [*ev(ctx, d)[:-1], str(d / "afile" / "out")], r"afile"),
    Case("finetune --lr 1e8 (finite, useless weights; val NLL shown)", "finetune", flag(ft, "--lr", "1e8"),
         r"non-finite|nan|diverg", made("out/model", r"val NLL \d")),
    Case("finetune --lr 1e30 (overflows)", "finetune", flag(ft, "--lr", "1e30"), r"non-finite|nan|diverg"),
    Case("finetune --prior-precision -5", "finetune", flag(ft, "--prior-precision", "-5"), r"prior.precision"),
    Case("finetune --epochs 0", "finetune", flag(ft, "--epochs", "0"), r"epochs"),
    Case("finetune --lr -1", "finetune", flag(ft, "--lr", "-1"), r"\blr\b"),
    Case("finetune rerun into the same --out with another --train", "finetune",
         rerun(ft, lambda ctx, d: ft(ctx, d, train="obqa:dev")), r"differ|different run"),
    Case("finetune rerun into the same --out with another --max-train", "finetune",
         rerun(ft, lambda ctx, d: ft(ctx, d, ["--max-train", "8"])), r"differ|different run"),
    Case("finetune rerun after its latest checkpoint was damaged", "finetune", damaged_checkpoint_rerun, r"checkpoint",
         made("out/model", r"damaged")),
    Case("fit rerun into the same --out with another --train", "fit",
         rerun(lambda ctx, d: fit(ctx, d / "out"), lambda ctx, d: fit(ctx, d / "out", train="obqa:dev")),
         r"differ|other data|different run"),
    Case("fit rerun after its latest factor save was damaged", "fit", damaged_factors_rerun, r"factors",
         made("out/posterior", r"damaged")),
    Case("fit a model with a NaN weight", "fit", lambda ctx, d: fit(ctx, d / "out", model=ctx.work / "model_nan"),
         NAMES_TENSOR.replace("experts", "w_down")),
    Case("evaluate with a posterior fitted on another model", "fit", other_model_posterior, r"another model"),
    Case("evaluate with a damaged posterior", "fit", damaged_posterior, r"posterior"),
    Case("evaluate with another posterior's arrays under its record", "fit",
         lambda ctx, d: posterior_eval(ctx, d, fitted_twice(ctx, d)), r"digest|changed or damaged"),
    Case("route-train rerun into the same --out with another --train", "routing",
         rerun(lambda ctx, d: rt(ctx, d, "obqa:train"), lambda ctx, d: rt(ctx, d, "obqa:dev")),
         r"differ|different run"),
]
