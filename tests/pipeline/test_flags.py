"""Flags generated from the config dataclasses: every field is a flag, --config supplies values, flags win,
shared names set every config that has them, bad values and unknown keys name their source."""

import argparse
import dataclasses
import json

import pytest

from bmoe_jax.cli_tasks import EvaluateCommand, FinetuneCommand, FitCommand
from bmoe_jax.demo import DemoConfig
from bmoe_jax.pipeline import flags
from bmoe_jax.pipeline.configs import FitConfig


def _parse(root, argv):
  p = argparse.ArgumentParser()
  flags.add_flags(p, root)
  return flags.resolve(root, p.parse_args(argv)), p


def test_every_field_is_a_flag_with_its_comment_and_default():
  for root in (FinetuneCommand(), FitCommand(), EvaluateCommand(), DemoConfig()):
    p = argparse.ArgumentParser()
    flags.add_flags(p, root)
    names = {a.dest for a in p._actions}
    assert set(flags.leaf_fields(root)) <= names and "--config" in p.format_help()  # help renders (%% escaped)
  _, p = _parse(FitCommand(), [])
  text = p.format_help()
  assert "low-rank factors (None: full) (default: None)" in text and "--prior-mean" in text


def test_help_comments_are_read_without_ast(monkeypatch):
  """CPython 3.11.7's ast.parse failed on CI ("AST constructor recursion depth mismatch") inside
  inspect.getsource while orbax threads ran: the help comments never go through ast."""
  import ast
  def refuse(*a, **k):
    raise AssertionError("ast.parse called")
  flags._comments.cache_clear()
  with monkeypatch.context() as m:  # undone before pytest formats a failure (which parses with ast)
    m.setattr(ast, "parse", refuse)
    comments = flags._comments(FitConfig)
  assert comments["rank"].startswith("low-rank factors")


def test_values_types_precedence_and_shared_names(tmp_path):
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"lr": 0.5, "epochs": 3, "seed": 4, "layers": [1, 2], "batch-size": 2}))
  c, _ = _parse(FinetuneCommand(), ["--config", str(cfg), "--epochs", "5", "--shift", "a:b,c:d", "--chat"])
  assert c.train.lr == 0.5 and c.train.epochs == 5 and c.train.layers == (1, 2) and c.data.batch_size == 2
  assert c.run.seed == 4 and c.train.seed == 4  # one flag, both configs
  assert c.data.shift == ("a:b", "c:d") and c.data.chat is True and c.run.quiet is False
  f, _ = _parse(FitCommand(), ["--rank", "0", "--grid", "0.1,10,3", "--pretrained", "none"])
  assert f.fit.rank is None and f.fit.grid == (0.1, 10.0, 3.0) and list(f.fit.grid_values) == [0.1, 1.0, 10.0]
  d, _ = _parse(DemoConfig(), ["--num-experts", "4", "--moe-layers", "top:1", "--methods", "map,bmoe"])
  assert d.upcycle.num_experts == 4 and d.upcycle.moe_layers == "top:1" and d.eval.methods == ("map", "bmoe")
  assert d.fit == DemoConfig().fit  # untouched configs keep the demo's values


def test_errors_name_their_source(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"learning_rate": 1.0}))
  with pytest.raises(ValueError, match=r"bad.json: unknown keys \['learning_rate'\]"):
    _parse(FinetuneCommand(), ["--config", str(bad)])
  with pytest.raises(ValueError, match="--epochs: epochs='two' is not a valid int"):
    _parse(FinetuneCommand(), ["--epochs", "two"])
  with pytest.raises(FileNotFoundError, match="no such file"):
    _parse(FinetuneCommand(), ["--config", str(tmp_path / "missing.json")])
  with pytest.raises(ValueError, match="methods \\['bayes'\\] are unknown"):
    _parse(EvaluateCommand(), ["--methods", "map,bayes"])
  with pytest.raises(ValueError, match="tokens='all'"):
    dataclasses.replace(FitConfig(), tokens="all")
