"""A dense decoder becomes an MoE, by one of two methods (``UpcycleConfig.method``):

* ``carve`` (``convert.carve``): each chosen FFN's neurons are split into a shared expert and E routed
  experts, with a router fitted to activation statistics; the experts differ, so routing matters, and
  with every expert selected the model is the dense one exactly. Written in bmoe_jax's own layout.
* ``copy``, sparse upcycling (Komatsuzaki et al., 2023), described below.

Sparse upcycling copies each chosen layer's FFN into E experts and adds a freshly initialised router.

The experts are exact copies (plus optional symmetry-breaking noise) and the top-k gate weights are
renormalised to sum to one, so with zero noise the MoE computes exactly the dense function, whatever the
router does. The result is written as a **Qwen2-MoE** checkpoint directory: of our families it is the one
transformers loads natively that can mix dense and MoE layers (``mlp_only_layers``) and has llama
attention (``qkv_bias: false``); the shared expert is written zero-width (it contributes exactly 0).
Mixtral cannot keep dense layers; DeepSeek-MoE V1 is remote code on the hub.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bmoe_jax.config import MoEConfig
from bmoe_jax.files import begin_artefact, read_json, write_json
from convert.errors import ConversionError
from convert.sources import sha256_file

LAYER_SPEC_HELP = ("'all', 'top:K' (the last K layers), 'every:N' (layers N-1, 2N-1, ...), "
                   "'range:A-B' (A..B inclusive) or a comma list '3,7,11'")


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
  """Which layers become MoE; see ``LAYER_SPEC_HELP``."""
  spec = str(spec).strip()

  def bad(why: str):
    raise ValueError(f"layers={spec!r}: {why} (expected {LAYER_SPEC_HELP}; the model has {num_layers} layers)")

  out: list[int] = []
  if spec == "all":
    out = list(range(num_layers))
  elif m := re.fullmatch(r"top:(\d+)", spec):
    k = int(m[1])
    if not 0 < k <= num_layers:
      bad(f"K={k} out of range")
    out = list(range(num_layers - k, num_layers))
  elif m := re.fullmatch(r"every:(\d+)", spec):
    n = int(m[1])
    if n < 1:
      bad("N must be >= 1")
    out = [i for i in range(num_layers) if (i + 1) % n == 0]
  elif m := re.fullmatch(r"range:(\d+)-(\d+)", spec):
    out = list(range(int(m[1]), int(m[2]) + 1))
  elif re.fullmatch(r"\d+(,\d+)*", spec):
    out = sorted({int(x) for x in spec.split(",")})
  else:
    bad("unrecognised form")
  if not out:
    bad("selects no layer")
  if out[0] < 0 or out[-1] >= num_layers:
    bad(f"layer {out[-1]} is out of range")
  return tuple(out)


METHODS = ("copy", "carve")
DEFAULT_LAYERS = {"copy": "all", "carve": "top:8"}  # carving: two MoE layers per quarter of the carved block
CALIB_CHARS_PER_TOKEN = 12  # carving calibrates on the text's first calib_tokens x this characters
HEAL_DIR = "heal_run"  # inside the output directory: healing's resumable saves, removed once it is written
DEFAULT_CALIB_TEXT = "corpora/nltk_english_plain.txt"  # inside the data directory


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
  method: str = "copy"  # copy (every expert = the FFN) | carve (the FFN's neurons split into experts)
  num_experts: int = 8  # routed experts per MoE layer
  top_k: int = 2  # experts per token (copy: top-k gates renormalised; carve: gates 1)
  moe_layers: str | None = None  # MoE layers: all, top:K, every:N, range:A-B or 3,7,11 (None: copy all, carve top:8)
  noise: float = 0.0  # copy: symmetry-breaking noise per expert weight, relative to the weight's std
  router_std: float = 0.02  # copy: std of the new routers' normal init (irrelevant while experts are equal)
  shared_neurons: int = 256  # carve: the most often active neurons, kept as an always-on shared expert
  active_frac: float = 0.1  # carve: a neuron is active on a token when in its top fraction of contributions
  calib_tokens: int = 16384  # carve: calibration tokens (seeded windows of the calibration text)
  calib_text: str | None = None  # carve: a plain-text file (default: <data dir>/corpora/nltk_english_plain.txt)
  router_steps: int = 0  # carve: Adam steps training the router to the oracle top-k after its fit
  heal_tokens: int = 0  # carve: tokens of text healing the carved layers by distillation (0: no healing)
  heal_layerwise_epochs: int = 0  # heal: passes of the layer-wise phase (each layer's output to the dense FFN's)
  heal_epochs: int = 1  # heal: passes of the end-to-end phase (KL to the dense model's next-token distribution)
  heal_lr: float = 3e-4  # heal: peak learning rate (Adam, warm-up then cosine to a tenth, per phase)
  heal_batch: int = 8  # heal: windows per step
  heal_seq: int = 256  # heal: tokens per window
  heal_aux_coef: float = 0.01  # heal: weight of the load-balancing loss (Switch / Mixtral form)
  heal_topk: int = 64  # heal: the teacher's top tokens kept per position (the rest: one bucket)
  heal_valid_tokens: int = 16384  # heal: held-out validation tokens (windows outside the calibration text)
  heal_router_std: float = 0.5  # heal: the routers' logit spread at the start (gates near 1/top_k)
  heal_eval_every: int = 50  # heal: steps between validations
  heal_checkpoint_every: int = 50  # heal: steps between resumable saves
  heal_text: str | None = None  # heal: a plain-text file (default: the calibration text's file)
  heal_cache: str | None = None  # heal: where the teacher's cached targets go (default: <cache>/heal)
  seed: int = 0

  @property
  def layers(self) -> str:
    """``moe_layers``, or the method's default when it is None."""
    return self.moe_layers if self.moe_layers is not None else DEFAULT_LAYERS[self.method]

  def __post_init__(self):
    from bmoe_jax.config import check_bounds

    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
    check_bounds(self, {"heal_tokens": (0, None), "heal_layerwise_epochs": (0, None), "heal_epochs": (0, None),
                        "heal_lr": (0, None, True), "heal_batch": (1, None), "heal_seq": (2, None),
                        "heal_aux_coef": (0, None), "heal_topk": (1, None), "heal_valid_tokens": (1, None),
                        "heal_router_std": (0, None, True), "heal_eval_every": (1, None),
                        "heal_checkpoint_every": (1, None)})
    if self.heal_tokens and self.method != "carve":
      raise ValueError(f"heal_tokens={self.heal_tokens}: healing is for carved MoEs (method='carve'), "
                       f"not method={self.method!r}")


def upcycle(cfg: MoEConfig, params: dict[str, Any], **options) -> tuple[MoEConfig, dict[str, Any]]:
  """Dense ``(cfg, params)`` -> an upcycled MoE ``(cfg, params)`` (numpy arrays, float32); ``options``:
  the fields of ``UpcycleConfig`` (``moe_layers``: ``parse_layers``)."""
  uc = UpcycleConfig(**options)
  if uc.method != "copy":
    raise ValueError(f"upcycle() copies experts; method={uc.method!r} is convert.carve.carve (upcycle_checkpoint)")
  num_experts, top_k, noise, router_std = uc.num_experts, uc.top_k, uc.noise, uc.router_std
  if any(cfg.moe_layers):
    raise ValueError(f"upcycle: the source already has MoE layers {list(cfg.moe_layer_ids)}; pass a dense model")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"upcycle: top_k={top_k} must be in [1, num_experts={num_experts}]")
  if noise < 0 or router_std < 0:
    raise ValueError(f"upcycle: noise={noise} and router_std={router_std} must be >= 0")
  chosen = parse_layers(uc.layers, cfg.num_layers)
  rng = np.random.default_rng(uc.seed)
  new_cfg = cfg.replace(
      moe_layers=tuple(i in chosen for i in range(cfg.num_layers)), num_experts=num_experts,
      num_experts_per_tok=top_k, moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True,
      shared_expert_size=0, shared_expert_gate=True, family="qwen2_moe")
  out = {k: v for k, v in params.items() if k != "layers"}
  out["layers"] = []
  for i, layer in enumerate(params["layers"]):
    layer = dict(layer)
    if i in chosen:
      dense = {k: np.asarray(v, np.float32) for k, v in layer["mlp"].items()}
      experts = {}
      for name, w in dense.items():
        stacked = np.repeat(w[None], num_experts, axis=0)
        if noise > 0:
          stacked = stacked + (noise * w.std()) * rng.standard_normal(stacked.shape).astype(np.float32)
        experts[name] = stacked
      router = (router_std * rng.standard_normal((cfg.hidden_size, num_experts))).astype(np.float32)
      layer["mlp"] = {"router": {"kernel": router}, "experts": experts}
    out["layers"].append(layer)
  return new_cfg, out


def load_dense(source: str | Path, progress: bool = False):
  """(cfg, params, tokenizer or None, provenance) of a dense llama: a ``.gguf`` file or an HF directory."""
  from convert.builder import load_hf_checkpoint, params_from_tensors
  from convert.hf_config import parse_hf_config_dict

  source = Path(source)
  if source.suffix == ".gguf":
    from convert.gguf import read_gguf
    from convert.gguf_tokenizer import gguf_tokenizer
    raw, tensors = read_gguf(source, progress=progress)
    info = parse_hf_config_dict(raw, str(source))
    params = params_from_tensors(info, tensors, str(source))
    return info.cfg, params, gguf_tokenizer(source), {"gguf": str(source), "sha256": sha256_file(source)}
  info, params = load_hf_checkpoint(source, dtype=np.float32, progress=progress)
  tok = None
  try:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(source))
  except Exception:  # a weights-only directory: the caller may pass a tokenizer separately
    tok = None
  return info.cfg, params, tok, {"hf_dir": str(source)}


UPCYCLED_PARTS = ("config.json", "model.safetensors", "bmoe_config.json", "params")  # the weights and their record


def upcycle_checkpoint(source: str | Path, out_dir: str | Path, *, progress: bool = True, data_dir=None,
                       **options) -> Path:
  """Dense llama (``.gguf`` or HF dir) -> an MoE directory with its tokenizer files and ``upcycle.json``
  (the source and every option). ``copy``: a Qwen2-MoE HF directory; ``carve``: bmoe_jax's own layout,
  calibrated on ``calib_text`` (default: ``DEFAULT_CALIB_TEXT`` in ``data_dir`` or ``$BMOE_DATA_DIR``).
  ``options``: the fields of ``UpcycleConfig``."""
  from convert.export import export_hf

  uc = UpcycleConfig(**options)
  if family := dense_family(source):
    raise ConversionError(f"{source}: model_type {family!r} is not a dense llama; upcycling needs one")
  # upcycle.json, written last, makes the directory complete; a model an interruption left without it is redone
  # (the healing's resumable saves in HEAL_DIR are kept). The tokenizer is written before the weights' record.
  options = {"source_arg": str(source), **dataclasses.asdict(uc), "moe_layers": uc.layers}
  if _finished_before(Path(out_dir), options):
    return Path(out_dir)
  out_dir = begin_artefact(out_dir, "upcycle.json", UPCYCLED_PARTS)
  cfg, params, tok, prov = load_dense(source, progress=progress)
  record = {"source": prov, **options,
            "note": ("weights dequantised to float32 from the GGUF file's quantised tensors"
                     if "gguf" in prov else "weights as stored in the source checkpoint")}
  heal_dir = out_dir / HEAL_DIR
  new_cfg, new_params, report = build_moe(cfg, params, tok, uc, data_dir=data_dir, progress=progress,
                                          heal_dir=heal_dir)
  if tok is not None:
    tok.save_pretrained(str(out_dir))
  if uc.method == "copy" or uc.heal_tokens:
    export_hf(new_cfg, new_params, out_dir, "qwen2_moe")
    record["family"] = "qwen2_moe"
    if uc.heal_tokens:
      record["carve"] = report
      shutil.rmtree(heal_dir, ignore_errors=True)  # the resumable saves: the healed model is written
  else:
    from bmoe_jax.checkpoint import save_params
    save_params(out_dir, new_cfg, new_params, source={"family": "carved", **prov})
    record.update(family="carved", carve=report)
  record["moe_layer_ids"] = list(new_cfg.moe_layer_ids)
  write_json(out_dir / "upcycle.json", record, default=str)
  return out_dir


def build_moe(cfg: MoEConfig, params, tok, uc: UpcycleConfig, *, data_dir=None, text: str | None = None,
              progress: bool = True, heal_dir: str | Path | None = None) -> tuple[MoEConfig, dict, dict]:
  """The MoE ``(cfg, params, report)`` of a dense model by ``uc.method``. Carving reads its calibration
  ``text`` if given, else ``uc.calib_text``, else ``DEFAULT_CALIB_TEXT`` in ``data_dir`` or
  ``$BMOE_DATA_DIR``; with ``uc.heal_tokens`` the carve is then healed (``convert.heal``) on ``uc.heal_text``
  or the same text, its resumable saves in ``heal_dir`` (None: none)."""
  if uc.method == "copy":
    return (*upcycle(cfg, params, **dataclasses.asdict(uc)), {})
  from convert.carve import carve

  if tok is None:
    raise ValueError("carve: the source has no tokenizer, needed to tokenise the calibration text")
  text, source = _calibration_text(uc, data_dir, text)
  new_cfg, new_params, report = carve(
      cfg, params, tok, text[: uc.calib_tokens * CALIB_CHARS_PER_TOKEN],
      layers=parse_layers(uc.layers, cfg.num_layers), num_experts=uc.num_experts, top_k=uc.top_k,
      shared_neurons=uc.shared_neurons, active_frac=uc.active_frac, calib_tokens=uc.calib_tokens,
      router_steps=uc.router_steps, seed=uc.seed, progress=progress)
  report = {**report, "calib_text": source}
  if uc.heal_tokens:
    heal_text = _read_text(uc.heal_text, "heal_text") if uc.heal_text else text
    new_cfg, new_params, report["heal"] = heal_carved((cfg, params), tok, (new_cfg, new_params), uc, heal_text,
                                                      work_dir=heal_dir, progress=progress)
    report["heal"]["text"] = uc.heal_text or source
  return new_cfg, new_params, report


def _read_text(path, what: str) -> str:
  if not Path(path).is_file():
    raise FileNotFoundError(f"carve: {what} {path} not found")
  return Path(path).read_text(encoding="utf-8", errors="replace")


def _calibration_text(uc: UpcycleConfig, data_dir, text: str | None) -> tuple[str, str]:
  """(the calibration text, where it came from)."""
  import os

  if text is not None:
    return text, "given text"
  path = uc.calib_text
  if path is None:
    root = data_dir or os.environ.get("BMOE_DATA_DIR")
    if not root:
      raise ValueError("carve needs calibration text: pass calib_text (--calib-text FILE) or a data directory "
                       f"holding {DEFAULT_CALIB_TEXT} (--data-dir or $BMOE_DATA_DIR)")
    path = Path(root) / DEFAULT_CALIB_TEXT
  return _read_text(path, "calibration text"), str(path)


HEAL_RUN_FIELDS = ("heal_tokens", "heal_layerwise_epochs", "heal_epochs", "heal_lr", "heal_batch", "heal_seq",
                   "heal_aux_coef", "heal_topk", "heal_valid_tokens", "heal_router_std", "heal_eval_every", "seed")


def heal_carved(dense, tok, carved, uc: UpcycleConfig, text: str, *, work_dir=None, progress: bool = True):
  """``convert.heal.heal`` of a carved ``(cfg, params)``, its data from ``text`` computed by the ``dense``
  (cfg, params) once and cached under ``uc.heal_cache`` (default ``<cache>/heal``)."""
  import jax
  import jax.numpy as jnp

  from bmoe_jax.identity import tree_digest
  from convert import heal as H
  from convert import heal_data as HD
  from convert.sources import cache_dir

  (dcfg, dparams), (mcfg, mparams) = dense, carved
  start = min(mcfg.moe_layer_ids)
  train_w, valid_w = HD.text_windows(tok, text, uc.heal_tokens, uc.heal_valid_tokens, uc.heal_seq, seed=uc.seed,
                                     calib_chars=uc.calib_tokens * CALIB_CHARS_PER_TOKEN)
  djax = jax.tree.map(jnp.asarray, dparams)
  key = HD.cache_key(dense=tree_digest(dparams), train=tree_digest(train_w), valid=tree_digest(valid_w),
                     start=start, topk=uc.heal_topk)
  root = Path(uc.heal_cache) if uc.heal_cache else cache_dir() / "heal"
  data = HD.cached(root, key, lambda: {
      split: HD.compute(djax, dcfg, w, start, uc.heal_topk, progress=progress, desc=f"teacher ({split})")
      for split, w in (("train", train_w), ("valid", valid_w))})
  fingerprint = {"heal": {f: getattr(uc, f) for f in HEAL_RUN_FIELDS}, "data": key, "carved": tree_digest(mparams)}
  new_cfg, new_params, report = H.heal(mcfg, mparams, (dcfg, djax), data, uc, work_dir=work_dir,
                                       fingerprint=fingerprint, progress=progress)
  return new_cfg, new_params, {**report, "cache": str(root / key)}


def _finished_before(out_dir: Path, options: dict) -> bool:
  """True when ``out_dir`` holds a finished upcycle of the same source and options (a rerun has nothing to do);
  a finished one of other options is refused, naming them."""
  done = out_dir / "upcycle.json"
  if not done.exists():
    return False
  old, new = read_json(done), json.loads(json.dumps(options, default=str))
  diff = [k for k, v in new.items() if old.get(k) != v]
  if diff:
    raise FileExistsError(f"{done}: this directory holds a finished upcycle of another source or options (differs "
                          f"in {', '.join(diff[:6])}); choose another output directory, or delete it to start over")
  return True


def dense_family(source: str | Path) -> str | None:
  """None when ``source`` is a GGUF file or a dense llama HF dir, else its model_type (for the error)."""
  source = Path(source)
  if source.suffix == ".gguf":
    return None
  cfg_file = source / "config.json"
  if not cfg_file.exists():
    raise ConversionError(f"{source}: neither a .gguf file nor an HF checkpoint directory with config.json")
  mt = json.loads(cfg_file.read_text()).get("model_type")
  return None if mt == "llama" else str(mt)
