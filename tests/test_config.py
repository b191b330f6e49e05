"""Options a user gets wrong: every config field out of range or of the wrong type, a bad --config file and an
unwritable output directory give one message naming the field, flag or file (exit 2), before any work."""

import json

import pytest

import bmoe_jax as B
from bmoe_jax.cli import main

BAD_FLAGS = [
    ("finetune", ["--batch-size", "0"], "DataConfig.batch_size (--batch-size) = 0: expected a number >= 1"),
    ("finetune", ["--max-length", "0"], "DataConfig.max_length (--max-length) = 0: expected a number >= 1"),
    ("finetune", ["--max-train", "-3"], "DataConfig.max_train (--max-train) = -3"),
    ("finetune", ["--prior-precision", "-5"], "TrainConfig.prior_precision (--prior-precision) = -5.0: expected a "
                                              "number >= 0"),
    ("finetune", ["--lr", "0"], "TrainConfig.lr (--lr) = 0.0: expected a number > 0"),
    ("finetune", ["--warmup-ratio", "2"], "TrainConfig.warmup_ratio (--warmup-ratio) = 2.0: expected a number >= 0 "
                                          "and <= 1"),
    ("finetune", ["--epochs", "0"], "TrainConfig.epochs (--epochs) = 0"),
    ("fit", ["--rank", "-2"], "FitConfig.rank (--rank) = -2: expected a number >= 1"),
    ("fit", ["--fixed-prior", "0"], "FitConfig.fixed_prior (--fixed-prior) = 0.0: expected a number > 0"),
    ("fit", ["--grid", "1,0.1,5"], "FitConfig.grid (--grid)"),
    ("evaluate", ["--route-samples", "0"], "EvalConfig.route_samples (--route-samples) = 0"),
    ("evaluate", ["--dropout", "1.5"], "EvalConfig.dropout (--dropout) = 1.5: expected a number >= 0 and <= 1"),
    ("route-train", ["--route-lr", "-1"], "RouteTrainConfig.route_lr (--route-lr) = -1.0: expected a number > 0"),
]


@pytest.mark.parametrize("command,flags,message", BAD_FLAGS, ids=[" ".join(f) for _, f, _ in BAD_FLAGS])
def test_out_of_range_flags_name_the_field(command, flags, message, tmp_path, capsys):
  assert main([command, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *flags]) == 2
  err = capsys.readouterr().err
  assert f"bmoe {command}: error: " in err and message in err and "Traceback" not in err, err


def test_bad_config_files_and_output_directories(tmp_path, capsys):
  base = ["finetune", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
  bad = tmp_path / "c.json"
  for text, message in [("{\"lr\": ", "--config " + str(bad) + ": not valid JSON"),
                        ("[1, 2]", "expected a JSON object, got list"),
                        (json.dumps({"lr": "fast"}), "c.json: lr='fast' is not a valid float"),
                        (json.dumps({"learning_rate": 1}), "unknown keys ['learning_rate']")]:
    bad.write_text(text)
    assert main(base + ["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, (text, err)
  bad.write_bytes(b"\xef\xbb\xbf" + json.dumps({"lr": 0.5}).encode())  # a BOM is fine
  from bmoe_jax.pipeline import flags
  from bmoe_jax.cli_tasks import COMMANDS
  import argparse
  args = argparse.Namespace(config=str(bad))
  assert flags.resolve(COMMANDS["finetune"][0](), args).train.lr == 0.5
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert main(["finetune", "--model", str(tmp_path / "none"), "--out", str(blocker / "out")]) == 2
  err = capsys.readouterr().err
  assert f"--out {blocker / 'out'}: cannot write there" in err, err


@pytest.mark.parametrize("field,value,message", [
    ("num_experts", "eight", "num_experts must be an integer, got 'eight'"),
    ("num_experts", True, "num_experts must be an integer, got True"),
    ("hidden_size", 32.0, "hidden_size must be an integer"),
    ("qkv_bias", 1, "qkv_bias must be true or false, got 1"),
    ("rope_theta", "1e4", "rope_theta must be a number"),
    ("hidden_act", None, "hidden_act must be a string")])
def test_model_config_fields_of_the_wrong_type(field, value, message):
  with pytest.raises(ValueError, match=message):
    B.tiny_config(**{field: value})
