"""Model + tokenizer loading and dataset specs -> batches, for the stages (``bmoe_jax.pipeline.stages``).

A dataset spec is ``name:split`` with an optional MMLU subject list, ``mmlu:test:astronomy+virology``;
``max_examples`` takes a seeded subset (for CPU-sized runs; recorded in the run files).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bmoe_jax import data as D
from bmoe_jax.data import synthetic
from bmoe_jax.data.batches import make_batches


def load_model_params(model_dir: str | Path, mesh=None):
  """(cfg, params) of a converted directory or an HF checkpoint. ``mesh``: the parameters are placed in
  their shardings (a converted directory is restored straight into them, each host reading its shards)."""
  from bmoe_jax import sharding as S
  from bmoe_jax.checkpoint import CONFIG_FILE, load_model

  if mesh is not None and (Path(model_dir) / CONFIG_FILE).exists():
    return S.load_params(model_dir, mesh)
  model = load_model(model_dir)
  params = model.pure_params()
  return model.cfg, (params if mesh is None else S.shard_params(params, model.cfg, mesh))


def load_model_and_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None, mesh=None):
  """(params, cfg, tokenizer); ``mesh`` as in ``load_model_params``."""
  from transformers import AutoTokenizer

  cfg, params = load_model_params(model_dir, mesh)
  tok_dir = Path(tokenizer_dir or model_dir)
  try:
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
  except Exception as err:
    raise ValueError(f"no tokenizer in {tok_dir} ({type(err).__name__}: {err}); pass --tokenizer DIR") from err
  if len(tok) > cfg.vocab_size:
    raise ValueError(f"tokenizer in {tok_dir} has {len(tok)} tokens but the model's vocabulary is "
                     f"{cfg.vocab_size}")
  return params, cfg, tok


def place_batches(batches, mesh):
  """The batches split over the mesh's data axis (unchanged without a mesh)."""
  if mesh is None:
    return batches
  from bmoe_jax import sharding as S
  return [S.shard_batch(b, mesh) for b in batches]


def parse_spec(spec: str) -> tuple[str, str, list[str] | None]:
  parts = spec.split(":")
  if len(parts) not in (2, 3):
    raise ValueError(f"dataset spec {spec!r}: expected name:split or mmlu:split:subject+subject")
  subjects = parts[2].split("+") if len(parts) == 3 else None
  return parts[0], parts[1], subjects


def load_examples(spec: str, data_dir=None, max_examples: int | None = None, seed: int = 0):
  name, split, subjects = parse_spec(spec)
  ds = D.load(name, split, data_dir=data_dir, subjects=subjects, seed=seed)
  examples = ds.examples
  if not examples:
    raise D.DataError(f"{spec}: no usable examples ({ds.report.summary()})")
  if max_examples is not None and len(examples) > max_examples:
    keep = np.sort(np.random.RandomState(seed).permutation(len(examples))[:max_examples])
    examples = [examples[i] for i in keep]
  info = {"spec": spec, "rows": ds.report.rows, "kept": ds.report.kept, "skipped": len(ds.report.skipped),
          "used": len(examples), "note": ds.note, "report": ds.report.summary()}
  return name, examples, info


def batches_for(spec: str, tok, *, data_dir=None, max_examples=None, seed=0, **kw):
  """Batches of a dataset spec (``kw``: ``batches_of``'s)."""
  return batches_of(load_examples(spec, data_dir, max_examples, seed), tok, seed=seed, **kw)


def batches_of(loaded, tok, *, batch_size=8, max_length=256, seed=0, shuffle=False, chat=False,
               padding_side="right", num_classes=None, scoring="continuation", norm="byte"):
  """Batches of ``load_examples``' (name, examples, info), scored as ``scoring`` (letters | cloze |
  continuation, ``bmoe_jax.data.batches``); ``num_classes`` pads every example to C classes (choice
  masks), so datasets with different numbers of choices (OBQA 4, ARC 3-5) share one task."""
  name, examples, info = loaded
  batches, class_ids, binfo = make_batches(examples, tok, batch_size=batch_size, max_length=max_length,
                                           num_classes=num_classes, dataset=name, chat=chat,
                                           padding_side=padding_side, shuffle=shuffle, seed=seed, style=scoring,
                                           norm=norm)
  keep = ("truncated", "num_classes", "style", "unscorable", "norm")
  return batches, class_ids, {**info, **{k: binfo[k] for k in keep if k in binfo}}


def eval_key(spec: str) -> str:
  """A dataset spec as a result key: ``mmlu:test:a+b`` -> ``mmlu_test_a-b``."""
  return spec.replace(":", "_").replace("+", "-")


def write_run(out_dir: str | Path, record: dict, **extra) -> Path:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "run.json"
  from bmoe_jax.files import write_json
  return write_json(path, {**record, **extra, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, default=str)
