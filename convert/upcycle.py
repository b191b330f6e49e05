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
from pathlib import Path
from typing import Any

import numpy as np

from bmoe_jax.config import MoEConfig
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
DEFAULT_CALIB_TEXT = "corpora/nltk_english_plain.txt"  # inside the data directory


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
  method: str = "copy"  # copy (every expert = the FFN) | carve (the FFN's neurons split into experts)
  num_experts: int = 8  # routed experts per MoE layer
  top_k: int = 2  # experts per token (copy: top-k gates renormalised; carve: gates 1)
  moe_layers: str = "all"  # which layers become MoE: 'all', 'top:K', 'every:N', 'range:A-B' or '3,7,11'
  noise: float = 0.0  # copy: symmetry-breaking noise per expert weight, relative to the weight's std
  router_std: float = 0.02  # copy: std of the new routers' normal init (irrelevant while experts are equal)
  shared_neurons: int = 256  # carve: the most often active neurons, kept as an always-on shared expert
  active_frac: float = 0.1  # carve: a neuron is active on a token when in its top fraction of contributions
  calib_tokens: int = 16384  # carve: calibration tokens (seeded windows of the calibration text)
  calib_text: str | None = None  # carve: a plain-text file (default: <data dir>/corpora/nltk_english_plain.txt)
  router_steps: int = 0  # carve: Adam steps training the router to the oracle top-k after its fit
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}: expected one of {METHODS}")


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
  chosen = parse_layers(uc.moe_layers, cfg.num_layers)
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


def upcycle_checkpoint(source: str | Path, out_dir: str | Path, *, progress: bool = True, data_dir=None,
                       **options) -> Path:
  """Dense llama (``.gguf`` or HF dir) -> an MoE directory with its tokenizer files and ``upcycle.json``
  (the source and every option). ``copy``: a Qwen2-MoE HF directory; ``carve``: bmoe_jax's own layout,
  calibrated on ``calib_text`` (default: ``DEFAULT_CALIB_TEXT`` in ``data_dir`` or ``$BMOE_DATA_DIR``).
  ``options``: the fields of ``UpcycleConfig``."""
  from convert.export import export_hf

  uc = UpcycleConfig(**options)
  out_dir = Path(out_dir)
  if (out_dir / "config.json").exists() or (out_dir / "bmoe_config.json").exists():
    raise FileExistsError(f"{out_dir} already holds a model; choose an empty output directory")
  if family := dense_family(source):
    raise ConversionError(f"{source}: model_type {family!r} is not a dense llama; upcycling needs one")
  cfg, params, tok, prov = load_dense(source, progress=progress)
  record = {"source": prov, **dataclasses.asdict(uc),
            "note": ("weights dequantised to float32 from the GGUF file's quantised tensors"
                     if "gguf" in prov else "weights as stored in the source checkpoint")}
  new_cfg, new_params, report = build_moe(cfg, params, tok, uc, data_dir=data_dir, progress=progress)
  if uc.method == "copy":
    export_hf(new_cfg, new_params, out_dir, "qwen2_moe")
    record["family"] = "qwen2_moe"
  else:
    from bmoe_jax.checkpoint import save_params
    save_params(out_dir, new_cfg, new_params, source={"family": "carved", **prov})
    record.update(family="carved", carve=report)
  record["moe_layer_ids"] = list(new_cfg.moe_layer_ids)
  if tok is not None:
    tok.save_pretrained(str(out_dir))
  (out_dir / "upcycle.json").write_text(json.dumps(record, indent=2, default=str))
  return out_dir


def build_moe(cfg: MoEConfig, params, tok, uc: UpcycleConfig, *, data_dir=None, text: str | None = None,
              progress: bool = True) -> tuple[MoEConfig, dict, dict]:
  """The MoE ``(cfg, params, report)`` of a dense model by ``uc.method``. Carving reads its calibration
  ``text`` if given, else ``uc.calib_text``, else ``DEFAULT_CALIB_TEXT`` in ``data_dir`` or
  ``$BMOE_DATA_DIR``."""
  if uc.method == "copy":
    return (*upcycle(cfg, params, **dataclasses.asdict(uc)), {})
  import os

  from convert.carve import carve

  if tok is None:
    raise ValueError("carve: the source has no tokenizer, needed to tokenise the calibration text")
  source = "given text"
  if text is None:
    path = uc.calib_text
    if path is None:
      root = data_dir or os.environ.get("BMOE_DATA_DIR")
      if not root:
        raise ValueError("carve needs calibration text: pass calib_text (--calib-text FILE) or a data directory "
                         f"holding {DEFAULT_CALIB_TEXT} (--data-dir or $BMOE_DATA_DIR)")
      path = Path(root) / DEFAULT_CALIB_TEXT
    if not Path(path).is_file():
      raise FileNotFoundError(f"carve: calibration text {path} not found")
    text, source = Path(path).read_text(encoding="utf-8", errors="replace")[: uc.calib_tokens * 12], str(path)
  new_cfg, new_params, report = carve(
      cfg, params, tok, text, layers=parse_layers(uc.moe_layers, cfg.num_layers), num_experts=uc.num_experts,
      top_k=uc.top_k, shared_neurons=uc.shared_neurons, active_frac=uc.active_frac, calib_tokens=uc.calib_tokens,
      router_steps=uc.router_steps, seed=uc.seed, progress=progress)
  return new_cfg, new_params, {**report, "calib_text": source}


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
