"""Dense SmolLM2-135M vs its carved MoE (issue 15): zero-shot continuation accuracy on six benchmarks,
WikiText-2 perplexity, and whether routing matters (KL between the carved model with its own router and
with a random one).

  .venv/bin/python experiments/carve_smollm2.py --data-dir ../shared/data

Zero-shot table: dense and the main carving (the first of ``--carvings``, top-2, the first router
setting) on OBQA, ARC-E, ARC-C, BoolQ, WinoGrande and an MMLU union (every subject, a seeded subset).

Each carving (``convert.carve``: 256 shared neurons + 8 experts of 160 per carved layer, router fitted by
least squares on NLTK prose, optionally trained to the oracle top-k: ``LAYERS@STEPS``) is evaluated at
several top-k; the
"random" router is a Gaussian linear router (token-dependent, blind to the experts' content) at the same
k. Perplexity: seeded 256-token windows of WikiText-2 valid; accuracy: seeded test questions, ``acc``
(summed log-likelihood) and ``acc_norm`` (per byte of the scored text), 95% Wilson intervals. Writes
experiments/results/carve_smollm2/{results.json, results.md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import bmoe_jax as B
from bmoe_jax.data.batches import make_batches
from bmoe_jax.data.continuation import parts
from bmoe_jax.pipeline.data import load_examples
from bmoe_jax.task import Task
from convert.carve import carve
from convert.sources import fetch_gguf
from convert.upcycle import load_dense, parse_layers


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  p = k / n
  centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return float(centre - half), float(centre + half)


def text_windows(tok, path: Path, num_tokens: int, seq: int, seed: int) -> np.ndarray:
  ids = np.asarray(tok.encode(path.read_text(), add_special_tokens=False), np.int32)
  n = len(ids) // seq
  pick = np.sort(np.random.default_rng(seed).permutation(n)[:num_tokens // seq])
  return ids[:n * seq].reshape(n, seq)[pick]


def lm_stats(variants: dict, windows: np.ndarray, batch: int = 4) -> dict:
  """Per variant: perplexity on the windows and the mean KL(reference || variant) per token, the
  reference being each variant's ``ref`` (or None)."""
  fwd = {name: jax.jit(lambda p, t, c=v["cfg"]: jax.nn.log_softmax(B.forward(p, c, t).logits, -1))
         for name, v in variants.items()}
  nll = {k: 0.0 for k in variants}
  kl = {k: 0.0 for k in variants}
  count = positions = 0
  for lo in tqdm(range(0, len(windows), batch), desc="wikitext", leave=False):
    t = jnp.asarray(windows[lo:lo + batch])
    logp = {k: fwd[k](v["params"], t) for k, v in variants.items()}
    target = t[:, 1:]
    for k, v in variants.items():
      nll[k] += float(-jnp.take_along_axis(logp[k][:, :-1], target[..., None], -1).sum())
      if v.get("ref"):
        r = logp[v["ref"]]
        kl[k] += float(jnp.sum(jnp.exp(r) * (r - logp[k])))
    count, positions = count + int(target.size), positions + int(t.size)
  return {k: {"ppl": float(np.exp(nll[k] / count)),
              "kl_to_ref": kl[k] / positions if variants[k].get("ref") else None} for k in variants}


class Scored:
  """A benchmark's continuation batches (unnormalised sums), its scored texts' bytes and labels."""

  def __init__(self, spec: str, tok, data_dir: str, n: int, seed: int):
    name, exs, _ = load_examples(spec, data_dir, n, seed)
    self.batches, _, info = make_batches(exs, tok, batch_size=8, max_length=384, style="continuation", norm="none",
                                         dataset=name)
    kept = [exs[i] for i in info["order"]] if not info["unscorable"] else None
    if kept is None:
      raise ValueError(f"{spec}: {info['unscorable']} examples did not fit max_length=384")
    c = info["num_classes"]
    self.bytes_nc = np.asarray([[len(t.encode()) for _, t in parts(e, name).choices] + [1] * (c - len(e.choices))
                                for e in kept])
    self.labels_n = np.asarray([e.label for e in kept])
    scored_nc = np.concatenate([np.asarray((b.cont.weight_btc != 0).sum(1)) for b in self.batches])
    self.tokens_nc = np.maximum(scored_nc[:len(kept)], 1)


def accuracy_stats(variants: dict, data: Scored) -> dict:
  out = {}
  for name, v in variants.items():
    fn = jax.jit(Task(v["cfg"]).logits)
    f = np.concatenate([np.asarray(fn(v["params"], b)) for b in tqdm(data.batches, desc=name, leave=False)])
    n = len(data.labels_n)
    acc = int(np.sum(np.argmax(f, 1) == data.labels_n))
    acc_norm = int(np.sum(np.argmax(f / data.bytes_nc, 1) == data.labels_n))
    acc_token = int(np.sum(np.argmax(f / data.tokens_nc, 1) == data.labels_n))
    out[name] = {"acc": acc / n, "acc_ci": wilson(acc, n), "acc_norm": acc_norm / n,
                 "acc_norm_ci": wilson(acc_norm, n), "acc_token": acc_token / n, "acc_token_ci": wilson(acc_token, n),
                 "n": n}
  return out


def variants_of(cfg, params, tok, text, layers, ks, router_steps, seed, calib_tokens):
  """{name: {cfg, params, ref}} for one carving: each k with the fitted router and with a random one. Carved
  at the smallest k (the router's training target and the k of its reported agreement and load)."""
  c_cfg, c_params, report = carve(cfg, params, tok, text, layers=layers, num_experts=8, top_k=min(ks),
                                  shared_neurons=256, active_frac=0.1, calib_tokens=calib_tokens,
                                  router_steps=router_steps, seed=seed)
  rand = jax.tree.map(lambda x: x, c_params)
  rng = np.random.default_rng(seed + 1)
  for l in layers:
    rand["layers"][l]["mlp"]["router"]["kernel"] = rng.standard_normal((cfg.hidden_size, 8)).astype(np.float32)
  tag = f"L{layers[0]}-{layers[-1]}" + (f" router+{router_steps} steps" if router_steps else "")
  out = {}
  for k in ks:
    kc = c_cfg.replace(num_experts_per_tok=k)
    out[f"carved {tag} top-{k}"] = {"cfg": kc, "params": c_params, "ref": "dense"}
    if k < 8:
      out[f"carved {tag} random-{k}"] = {"cfg": kc, "params": rand, "ref": f"carved {tag} top-{k}"}
  return out, report


ZERO_SHOT = ("obqa:test", "arc_easy:test", "arc_challenge:test", "boolq:validation", "winogrande:dev", "mmlu:test")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--out", default="experiments/results/carve_smollm2")
  ap.add_argument("--carvings", default="range:22-29@0,range:22-29@300,range:14-21@0",
                  help="comma list of LAYERS@ROUTER_STEPS (layer spec, router training steps after the fit)")
  ap.add_argument("--ks", default="2,4,8")
  ap.add_argument("--ppl-tokens", type=int, default=8192)
  ap.add_argument("--sweep-n", type=int, default=300, help="ARC-E questions for the k / router sweep")
  ap.add_argument("--zero-shot-n", type=int, default=500, help="questions per benchmark of the zero-shot table")
  ap.add_argument("--calib-tokens", type=int, default=16384)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  t0 = time.time()
  data = Path(args.data_dir)
  cfg, params, tok, prov = load_dense(fetch_gguf("smollm2"))
  params = jax.tree.map(jnp.asarray, params)
  text = (data / "corpora" / "nltk_english_plain.txt").read_text()[:args.calib_tokens * 12]
  windows = text_windows(tok, data / "corpora" / "wikitext2_tokenized" / "valid.txt", args.ppl_tokens, 256, args.seed)
  sweep = Scored("arc_easy:test", tok, str(data), args.sweep_n, args.seed)
  base = {"dense": {"cfg": cfg, "params": params}}
  results, reports, zero_shot, ks = {}, {}, {}, sorted(int(k) for k in args.ks.split(","))
  for i, item in enumerate(args.carvings.split(",")):
    spec, steps = item.split("@")
    variants, report = variants_of(cfg, params, tok, text, parse_layers(spec, cfg.num_layers), ks, int(steps),
                                   args.seed, args.calib_tokens)
    reports[f"{spec} router_steps={steps}"] = report
    lm = lm_stats({**base, **variants}, windows)
    acc = accuracy_stats({**(base if not results else {}), **variants}, sweep)
    results.update({k: {**lm[k], **acc[k]} for k in acc})
    write(Path(args.out), results, reports, zero_shot, vars(args), time.time() - t0)  # after every stage
    if i == 0:
      main_name = next(k for k in variants if k.endswith("top-2"))
      for ds in ZERO_SHOT:
        zero_shot[ds] = accuracy_stats({**base, main_name: variants[main_name]},
                                       Scored(ds, tok, str(data), args.zero_shot_n, args.seed))
        write(Path(args.out), results, reports, zero_shot, vars(args), time.time() - t0)


def _ci(r: dict, key: str) -> str:
  return f"{r[key]:.3f} [{r[key + '_ci'][0]:.3f}, {r[key + '_ci'][1]:.3f}]"


def write(out: Path, results: dict, reports: dict, zero_shot: dict, args: dict, seconds: float):
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps({"results": results, "zero_shot": zero_shot, "carve_reports": reports,
                                                "args": args, "seconds": seconds}, indent=2, default=str))
  names = list(next(iter(zero_shot.values()))) if zero_shot else []
  lines = ["## Zero-shot continuation accuracy (95% Wilson intervals)", "",
           "acc: summed log-likelihood (norm none); per token: divided by the choice's tokens; per byte (lm-eval's "
           "acc_norm up to bytes vs characters): divided by its UTF-8 bytes.", "",
           "| benchmark | n | " + " | ".join(f"{m} acc | {m} per token | {m} per byte" for m in names) + " |",
           "|---|---:|" + "---:|" * (3 * len(names))]
  for ds, per in zero_shot.items():
    lines.append(f"| {ds} | {per[names[0]]['n']} | " + " | ".join(
        f"{_ci(per[m], 'acc')} | {_ci(per[m], 'acc_token')} | {_ci(per[m], 'acc_norm')}" for m in names) + " |")
  lines += ["", "## Carving sweep (WikiText-2 valid perplexity, ARC-Easy test)", "",
            "| model | WikiText-2 ppl | KL to ref (nats/token) | ARC-E acc | ARC-E acc_norm |", "|---|---:|---:|---:|---:|"]
  for name, r in results.items():
    kl = "" if r.get("kl_to_ref") is None else f"{r['kl_to_ref']:.3f}"
    lines.append(f"| {name} | {r['ppl']:.2f} | {kl} | {_ci(r, 'acc')} | {_ci(r, 'acc_norm')} |")
  k = min(int(k) for k in args["ks"].split(","))
  lines += ["", f"| carving | layer: router agreement with the oracle top-{k} / load evenness / "
            "shared-expert energy share |", "|---|---|"]
  for name, rep in reports.items():
    lines.append(f"| {name} | " + ", ".join(f"{l}: {v['oracle_agreement']:.2f} / {v['load_entropy']:.2f} / "
                                              f"{v['shared_energy']:.2f}" for l, v in rep["layers"].items()) + " |")
  cmd = "python experiments/carve_smollm2.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items())
  (out / "results.md").write_text("\n".join(lines) + f"\n\nMade by `{cmd}` in {seconds / 60:.0f} min.\n"
                                  "KL to ref: top-k rows against dense, random-k rows against the same carving's "
                                  "own top-k.\n")


if __name__ == "__main__":
  main()
