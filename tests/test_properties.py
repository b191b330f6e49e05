"""Property / fuzz tests over what users hand us: safetensors headers and bytes, config.json fields, dataset
rows and command-line flags. Each input gives one clear error (our error types, naming the file or field) or
a correct result; never a traceback of another type, never a silent change. Few examples per property: the
inputs are tiny and the suite stays in budget."""

import functools
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert import ConversionError
from convert.safetensors_io import DTYPES, read_header, save_file

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) |
                    st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                                max_size=3),
                    max_leaves=8)


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("st") / "model.safetensors"
  save_file({"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(4, np.float32)}, path)
  return path


@FAST
@given(data=st.data())
def test_damaged_safetensors_bytes_are_refused_or_read_exactly(safetensors_file, tmp_path_factory, data):
  """Flip, cut or extend bytes anywhere: reading either raises ConversionError naming the file, or returns
  tensors whose header entries are valid and whose bytes lie inside the file."""
  raw = bytearray(safetensors_file.read_bytes())
  op = data.draw(st.sampled_from(["flip", "cut", "append"]))
  if op == "flip":
    for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
      raw[i] ^= data.draw(st.integers(1, 255))
  elif op == "cut":
    raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
  else:
    raw += data.draw(st.binary(min_size=1, max_size=16))
  path = tmp_path_factory.mktemp("bad") / "model.safetensors"
  path.write_bytes(bytes(raw))
  try:
    refs = read_header(path)
  except ConversionError as err:
    assert str(path) in str(err)
    return
  for ref in refs.values():
    assert ref.dtype in DTYPES and ref.offset + ref.nbytes <= len(raw)
    assert ref.numpy().shape == ref.shape


@FAST
@given(entries=st.dictionaries(st.text(min_size=1, max_size=5), JSON, max_size=4))
def test_arbitrary_headers_never_raise_anything_else(tmp_path_factory, entries):
  blob = json.dumps(entries).encode()
  path = tmp_path_factory.mktemp("hdr") / "model.safetensors"
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
  try:
    read_header(path)
  except ConversionError as err:
    assert str(path) in str(err)


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory):
  from tests.fixtures import hf_checkpoint
  return json.loads((hf_checkpoint(tmp_path_factory, "qwen2_moe", seed=1) / "config.json").read_text())


@FAST
@given(key=st.sampled_from(["num_experts", "num_experts_per_tok", "hidden_size", "num_attention_heads",
                            "num_key_value_heads", "moe_intermediate_size", "rope_theta", "rms_norm_eps",
                            "norm_topk_prob", "num_hidden_layers", "vocab_size", "tie_word_embeddings",
                            "hidden_act", "decoder_sparse_step", "mlp_only_layers", "rope_scaling"]),
       value=JSON)
def test_config_fields_of_any_value_give_a_config_or_one_error(hf_config, key, value):
  from convert.hf_config import parse_hf_config_dict

  raw = {**hf_config, key: value}
  try:
    info = parse_hf_config_dict(raw, "config.json")
  except (ConversionError, ValueError) as err:
    assert "config.json" in str(err) or key in str(err) or "MoEConfig" in str(err), str(err)
    return
  assert info.cfg.num_layers == info.cfg.num_layers  # a valid, fully type-checked MoEConfig (post_init ran)


@FAST
@given(row=JSON)
def test_dataset_rows_of_any_shape_are_examples_or_reasons(row):
  from bmoe_jax.data.local import parse_ai2_arc, parse_boolq, parse_simple_mc, parse_winogrande
  from bmoe_jax.data.records import MCExample, RowError

  for parse, n in ((parse_simple_mc, 4), (parse_ai2_arc, (3, 5)), (parse_boolq, 2), (parse_winogrande, 2)):
    try:
      ex = parse(row, "uid", n)
    except RowError as err:
      assert str(err)
      continue
    assert isinstance(ex, MCExample) and 0 <= ex.label < len(ex.choices)


@functools.lru_cache(maxsize=1)
def _parser():
  import argparse
  from bmoe_jax.cli_tasks import register

  parser = argparse.ArgumentParser(exit_on_error=False)
  register(parser.add_subparsers(dest="command"))
  return parser


FLAGS = ["--batch-size", "--max-length", "--lr", "--epochs", "--prior-precision", "--grad-accum", "--seed",
         "--max-train", "--warmup-ratio", "--scoring", "--trainable", "--layers", "--schedule"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(flag=st.sampled_from(FLAGS), value=st.one_of(st.text(max_size=6), st.integers(-10, 10).map(str),
                                                     st.floats(allow_nan=True).map(str)))
def test_flag_values_give_a_config_or_one_error(flag, value):
  import argparse
  from bmoe_jax.cli_tasks import COMMANDS
  from bmoe_jax.pipeline import flags

  root = COMMANDS["finetune"][0]
  try:
    args = _parser().parse_args(["finetune", f"{flag}={value}"])
    flags.resolve(root(), args)
  except (ValueError, argparse.ArgumentError) as err:
    assert str(err)
  except SystemExit as err:  # argparse's own refusal of a value (choices, int types): exit code 2
    assert err.code == 2
