"""Healing curves of several healed models side by side (issue 37): held-out perplexity and KL to the dense model
against the training tokens processed, each run labelled by its distinct tokens and passes — is the curve's
flattening a matter of more passes or of more distinct text?

  python experiments/heal_curves.py --healed runs/healed runs/healed_1m --out experiments/results/heal_smollm2/curves

Reads each directory's ``upcycle.json`` (its healing history; every run validates on the same held-out
windows when the text, seed and ``heal_valid_tokens`` agree, which is checked). With ``--score DIR ...
--data-dir D`` those healed models are also scored as ``heal_smollm2.py`` scores them, on the same seeded
windows and questions: WikiText-2 valid perplexity (16k tokens) and ARC-Easy zero-shot accuracy (1000 test
questions, summed log-likelihood, 95% Wilson). Writes OUT/curves.md, OUT/curves.png (and OUT/scores.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmoe_jax.files import read_json, write_json, write_text  # noqa: E402

SAME_VALIDATION = ("heal_valid_tokens", "heal_seq", "seed", "heal_text", "calib_text", "calib_tokens")


def run_of(path: Path) -> dict:
  record = read_json(path / "upcycle.json")
  heal = record["carve"].get("heal")
  if not heal:
    raise SystemExit(f"{path}/upcycle.json: no healing record (made without --heal-tokens?)")
  label = f"{record['heal_tokens'] / 1e3:.0f}k distinct tokens x {record['heal_epochs']} pass(es)"
  return {"path": str(path), "label": label, "record": record, "heal": heal}


def check_comparable(runs: list[dict]):
  first = runs[0]["record"]
  for r in runs[1:]:
    diff = [k for k in SAME_VALIDATION if r["record"].get(k) != first.get(k)]
    if diff:
      raise SystemExit(f"{r['path']} validates on other windows than {runs[0]['path']} (differs in {diff}): "
                       "its curve is not comparable")


def table(runs: list[dict]) -> str:
  lines = ["| run | tokens processed | seconds | held-out KL | held-out ppl |", "|---|---:|---:|---:|---:|"]
  for r in runs:
    for h in r["heal"]["history"]:
      lines.append(f"| {r['label']} | {h['tokens']} | {h['seconds']:.0f} | {h['valid_kl']:.4f} | {h['valid_ppl']:.2f} |")
  dense = runs[0]["heal"]["dense_valid_ppl"]
  return "\n".join([f"Dense model's held-out perplexity: {dense:.2f}.", ""] + lines)


def plot(runs: list[dict], path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  for r in runs:
    h = r["heal"]["history"]
    tokens = [x["tokens"] / 1e3 for x in h]
    a.plot(tokens, [x["valid_ppl"] for x in h], "o-", ms=3, label=r["label"])
    b.plot(tokens, [x["valid_kl"] for x in h], "o-", ms=3, label=r["label"])
  a.axhline(runs[0]["heal"]["dense_valid_ppl"], color="k", ls="--", label="dense")
  a.set(xlabel="training tokens processed (k)", ylabel="held-out perplexity")
  b.set(xlabel="training tokens processed (k)", ylabel="held-out KL(dense || healed), nats/token")
  a.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def score(path: str, data_dir: str, seed: int = 0) -> dict:
  """WikiText-2 valid perplexity and ARC-Easy zero-shot accuracy of one healed model (heal_smollm2's windows
  and questions)."""
  from bmoe_jax.pipeline.data import load_model_and_tokenizer
  from experiments.carve_smollm2 import Scored, accuracy_stats, lm_stats, text_windows

  params, cfg, tok = load_model_and_tokenizer(path)
  windows = text_windows(tok, Path(data_dir) / "corpora" / "wikitext2_tokenized" / "valid.txt", 16384, 256, seed)
  model = {"cfg": cfg, "params": params}
  ppl = lm_stats({"healed": model}, windows)["healed"]["ppl"]
  arc = accuracy_stats({"healed": model}, Scored("arc_easy:test", tok, data_dir, 1000, seed))["healed"]
  return {"wikitext2_ppl": ppl, "arc_easy_acc": arc["acc"], "arc_easy_acc_ci": arc["acc_ci"], "n": arc["n"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--healed", nargs="+", required=True, help="directories made by bmoe upcycle ... --heal-tokens N")
  ap.add_argument("--out", default="experiments/results/heal_smollm2/curves")
  ap.add_argument("--score", nargs="*", default=[], help="healed directories to score (WikiText-2, ARC-E)")
  ap.add_argument("--data-dir", help="benchmark files (../shared/data), for --score")
  args = ap.parse_args(argv)
  if args.score and not args.data_dir:
    ap.error("--score needs --data-dir")
  runs = [run_of(Path(p)) for p in args.healed]
  check_comparable(runs)
  out = Path(args.out)
  plot(runs, out / "curves.png")
  scores = {p: score(p, args.data_dir) for p in args.score}
  lines = ["", "| healed model | WikiText-2 valid ppl | ARC-E zero-shot acc [95% Wilson] |", "|---|---:|---:|"]
  lines += [f"| {p} | {v['wikitext2_ppl']:.2f} | {v['arc_easy_acc']:.3f} [{v['arc_easy_acc_ci'][0]:.3f}, "
            f"{v['arc_easy_acc_ci'][1]:.3f}] (n={v['n']}) |" for p, v in scores.items()]
  if scores:
    write_json(out / "scores.json", scores)
  cmd = ("python experiments/heal_curves.py --healed " + " ".join(args.healed) + f" --out {args.out}"
         + (f" --score {' '.join(args.score)} --data-dir {args.data_dir}" if args.score else ""))
  write_text(out / "curves.md", "## Healing curves (held-out corpus windows)\n\n" + table(runs)
             + ("\n".join(lines) if scores else "") + f"\n\n![curves](curves.png)\n\nMade by `{cmd}`.\n")
  print(json.dumps({r["label"]: r["heal"]["history"][-1]["valid_ppl"] for r in runs}))


if __name__ == "__main__":
  main()
