"""``bmoe demo`` (for now): build tiny random HF MoE checkpoints of every supported family with
transformers, convert them with ``bmoe convert``, load them back, and report parity with transformers
(logits, hidden states, router top-k) on a padded batch. Writes ``parity.json`` and ``parity.md``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np

from bmoe_jax.files import write_json, write_text


def _batch(vocab: int, seed: int):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (4, 16))
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0  # right padding
  mask[2, :5] = 0  # left padding
  return tokens, mask


def parity_row(family: str, work: Path, seed: int, overrides: dict | None = None) -> dict:
  """One family (with HF config ``overrides``) built in transformers, converted and compared."""
  from bmoe_jax.checkpoint import convert_checkpoint, load_model
  from bmoe_jax.model import forward
  from convert.reference import make_checkpoint, reference_outputs

  hf_dir, out_dir = work / family / "hf", work / family / "converted"
  for d in (hf_dir, out_dir):
    shutil.rmtree(d, ignore_errors=True)
  torch_model = make_checkpoint(family, hf_dir, seed=seed, **(overrides or {}))
  convert_checkpoint(hf_dir, out_dir, progress=False)
  model = load_model(out_dir)
  cfg, params = model.cfg, model.pure_params()
  tokens, mask = _batch(cfg.vocab_size, seed)
  ref = reference_outputs(torch_model, tokens, mask)
  real = mask.astype(bool)
  row = {"family": family, "layers": cfg.num_layers, "moe_layers": len(cfg.moe_layer_ids),
         "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok}
  fwd = jax.jit(forward, static_argnums=1, static_argnames=("expert_impl", "return_taps", "return_hidden"))
  for impl in ("dense", "sorted"):
    out = fwd(params, cfg, tokens, mask, expert_impl=impl, return_taps=True, return_hidden=True)
    row[f"logits_err_{impl}"] = float(np.abs(np.asarray(out.logits) - ref["logits"])[real].max())
    row[f"hidden_err_{impl}"] = max(float(np.abs(np.asarray(a) - b)[real].max())
                                    for a, b in zip(out.hidden_states, ref["hidden"]))
    same = True
    for layer, (_, _, idx_ref) in zip(cfg.moe_layer_ids, ref["routers"]):
      ours = np.sort(np.asarray(out.taps[layer].expert_bsk).reshape(idx_ref.shape), -1)
      same &= bool(np.array_equal(ours[real.reshape(-1)], np.sort(idx_ref, -1)[real.reshape(-1)]))
    row[f"topk_identical_{impl}"] = same
  row["logits_scale"] = float(np.abs(ref["logits"]).max())
  return row


def run_parity_demo(out_dir: Path, seed: int = 0) -> int:
  try:
    import torch  # noqa: F401
  except ImportError:
    print("bmoe demo needs torch (CPU build) for the transformers reference: "
          "pip install -c constraints.txt -e '.[test]'")
    return 2
  from convert.reference import FAMILIES

  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  rows = [parity_row(f, out_dir, seed) for f in FAMILIES]
  header = ["family", "layers", "moe_layers", "experts", "top_k", "logits_scale", "logits_err_dense",
            "logits_err_sorted", "hidden_err_sorted", "topk_identical_dense", "topk_identical_sorted"]
  fmt = lambda v: f"{v:.2e}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(r[h]) for h in header) + " |" for r in rows]
  table = "\n".join(lines)
  ok = all(r["logits_err_dense"] <= 1e-4 and r["logits_err_sorted"] <= 1e-4 and r["topk_identical_dense"]
           and r["topk_identical_sorted"] for r in rows)
  summary = {"rows": rows, "bar": "float32 logits max abs diff <= 1e-4 and identical top-k sets",
             "passed": ok, "seconds": round(time.time() - t0, 1)}
  write_json(out_dir / "parity.json", summary)
  write_text(out_dir / "parity.md", "# Parity with transformers (tiny random models, padded batch)\n\n"
                                     + table + "\n")
  print(table)
  print(f"\nparity {'PASSED' if ok else 'FAILED'} ({summary['bar']}); wrote {out_dir}/parity.json, parity.md "
        f"in {summary['seconds']} s")
  return 0 if ok else 1
