"""Dense SmolLM2-135M vs its carved MoE vs the healed one (issue 37): does healing recover the dense model, and
does routing then matter and carry uncertainty?

  bmoe upcycle smollm2 runs/healed --method carve --moe-layers top:8 --heal-tokens 262144 --heal-epochs 3 \\
      --data-dir ../shared/data
  .venv/bin/python experiments/heal_smollm2.py --healed runs/healed --data-dir ../shared/data

The carved model is rebuilt from the healed directory's ``upcycle.json`` (the same carve options and seed,
no healing). Per model, on seeded 256-token windows of WikiText-2 valid (never seen by carving or healing):

* perplexity and KL(dense || model) per token;
* **does routing matter?** KL(own top-k || random-k) per token: the same model with each router's kernel
  replaced by a Gaussian one of the same Frobenius norm (token-dependent, blind to the experts);
* per MoE layer: **expert load evenness** (entropy of the top-k picks, 1 = even), the **shared expert's
  share** of the MoE output energy ``||y_shared||^2 / (||y_shared||^2 + ||y_routed||^2)`` per token, and
  **routing uncertainty**: the Jaccard index of two draws of the thesis' temperature-sampling router
  (``k`` experts from ``softmax(l / T)``, ``T = RouterConfig().sample_temperature``) and of one draw vs the
  deterministic top-k.

Zero-shot continuation accuracy (summed log-likelihood; per token; per byte) with 95% Wilson intervals on
seeded test questions of OBQA, ARC-E, ARC-C, BoolQ, WinoGrande and an MMLU union. The healing curve (tokens vs
validation perplexity and KL on held-out corpus windows) from ``upcycle.json``. Writes OUT/results.json,
OUT/results.md and OUT/heal_curve.png; results are written after every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bmoe_jax.checkpoint import load_model  # noqa: E402
from bmoe_jax.model import forward, moe_block  # noqa: E402
from bmoe_jax.nn.layers import gated_mlp  # noqa: E402
from bmoe_jax.routing import RouterConfig  # noqa: E402
from bmoe_jax.nn import gating as G  # noqa: E402
from convert.heal_math import load_evenness  # noqa: E402
from convert.sources import fetch_gguf  # noqa: E402
from convert.upcycle import UpcycleConfig, build_moe, load_dense  # noqa: E402
from experiments.carve_smollm2 import ZERO_SHOT, Scored, accuracy_stats, lm_stats, text_windows  # noqa: E402


def random_routers(cfg, params, seed: int) -> dict:
  """``params`` with every MoE layer's router kernel replaced by a Gaussian one of the same Frobenius norm."""
  rng = np.random.default_rng(seed)
  layers = list(params["layers"])
  for i in cfg.moe_layer_ids:
    w = np.asarray(layers[i]["mlp"]["router"]["kernel"])
    r = rng.standard_normal(w.shape).astype(np.float32)
    mlp = {**layers[i]["mlp"], "router": {"kernel": jnp.asarray(r * np.linalg.norm(w) / np.linalg.norm(r))}}
    layers[i] = {**layers[i], "mlp": mlp}
  return {**params, "layers": layers}


def routing_stats(cfg, params, windows: np.ndarray, temperature: float, seed: int, batch: int = 4) -> dict:
  """Per MoE layer: load evenness, the shared expert's energy share, and the Jaccard of two temperature-router
  draws and of a draw vs the top-k (module docstring)."""
  k, e = cfg.num_experts_per_tok, cfg.num_experts

  @jax.jit
  def stats(p, tokens, key):
    taps = forward(p, cfg, tokens, return_taps=True).taps
    out = {}
    for i, tap in taps.items():
      x_bsd, mlp = tap.router_in_bsd, p["layers"][i]["mlp"]
      logits_ne = tap.router_logits_bse.reshape(-1, e)
      y_bsd = moe_block(mlp, cfg, x_bsd)[0]
      shared_bsd = jnp.zeros_like(y_bsd)
      if "shared" in mlp:
        shared_bsd = gated_mlp(mlp["shared"], x_bsd, cfg.hidden_act)
        if "shared_gate" in mlp:
          shared_bsd = jax.nn.sigmoid(x_bsd @ mlp["shared_gate"]["kernel"]) * shared_bsd
      s_n = jnp.sum(jnp.square(shared_bsd), -1).reshape(-1)
      r_n = jnp.sum(jnp.square(y_bsd - shared_bsd), -1).reshape(-1)
      ka, kb = jax.random.split(jax.random.fold_in(key, i))
      draw_a, draw_b = (G.gumbel_topk(kk, logits_ne / temperature, k) for kk in (ka, kb))
      top_nk = tap.expert_bsk.reshape(-1, k)
      out[i] = (jnp.sum(jax.nn.one_hot(top_nk, e), (0, 1)), jnp.sum(s_n / jnp.maximum(s_n + r_n, 1e-30)),
                jnp.sum(G.jaccard(draw_a, draw_b, e)), jnp.sum(G.jaccard(draw_a, top_nk, e)), s_n.shape[0])
    return out

  acc: dict = {}
  for j, lo in enumerate(range(0, len(windows), batch)):
    got = stats(params, jnp.asarray(windows[lo:lo + batch]), jax.random.key(seed * 1000 + j))
    for i, vals in got.items():
      acc[i] = [a + np.asarray(v) for a, v in zip(acc.get(i, [0] * 5), vals)]
  return {int(i): {"load_evenness": load_evenness(c / c.sum(), k), "shared_share": float(s / n),
                   "jaccard_two_draws": float(j2 / n), "jaccard_draw_vs_topk": float(jt / n)}
          for i, (c, s, j2, jt, n) in acc.items()}


def models(healed_dir: Path):
  """(dense (cfg, params), carved (cfg, params), healed (cfg, params), tokenizer, upcycle record)."""
  record = json.loads((healed_dir / "upcycle.json").read_text())
  fields = {f.name for f in dataclasses.fields(UpcycleConfig)}
  uc = UpcycleConfig(**{**{k: v for k, v in record.items() if k in fields}, "heal_tokens": 0,
                        "calib_text": record["carve"]["calib_text"]})
  cfg, params, tok, _ = load_dense(fetch_gguf("smollm2"))
  c_cfg, c_params, _ = build_moe(cfg, params, tok, uc)
  healed = load_model(healed_dir)
  to_jax = lambda t: jax.tree.map(jnp.asarray, t)
  return (cfg, to_jax(params)), (c_cfg, to_jax(c_params)), (healed.cfg, healed.pure_params()), tok, record


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--healed", required=True, help="a directory made by bmoe upcycle ... --heal-tokens N")
  ap.add_argument("--data-dir", required=True)
  ap.add_argument("--out", default="experiments/results/heal_smollm2")
  ap.add_argument("--ppl-tokens", type=int, default=16384)
  ap.add_argument("--zero-shot-n", type=int, default=300, help="questions per benchmark (ARC-E: --arc-easy-n)")
  ap.add_argument("--arc-easy-n", type=int, default=1000)
  ap.add_argument("--benchmarks", default=",".join(ZERO_SHOT))
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  t0, data, out = time.time(), Path(args.data_dir), Path(args.out)
  dense, carved, healed, tok, record = models(Path(args.healed))
  names = {"dense": dense, "carved": carved, "healed": healed}
  windows = text_windows(tok, data / "corpora" / "wikitext2_tokenized" / "valid.txt", args.ppl_tokens, 256, args.seed)
  variants = {"dense": {"cfg": dense[0], "params": dense[1]}}
  for name in ("carved", "healed"):
    cfg, params = names[name]
    variants[name] = {"cfg": cfg, "params": params, "ref": "dense"}
    variants[f"{name} random-k"] = {"cfg": cfg, "params": random_routers(cfg, params, args.seed + 1), "ref": name}
  res = {"args": vars(args), "heal": record["carve"].get("heal"), "carve": record["carve"].get("layers"),
         "lm": lm_stats(variants, windows), "routing": {}, "zero_shot": {}}
  temperature = RouterConfig().sample_temperature
  for name in ("carved", "healed"):
    res["routing"][name] = routing_stats(*names[name], windows, temperature, args.seed)
  write(out, res, time.time() - t0)
  for ds in args.benchmarks.split(","):
    n = args.arc_easy_n if ds.startswith("arc_easy") else args.zero_shot_n
    res["zero_shot"][ds] = accuracy_stats({k: {"cfg": c, "params": p} for k, (c, p) in names.items()},
                                          Scored(ds, tok, str(data), n, args.seed))
    write(out, res, time.time() - t0)


def _ci(r: dict, key: str) -> str:
  return f"{r[key]:.3f} [{r[key + '_ci'][0]:.3f}, {r[key + '_ci'][1]:.3f}]"


def write(out: Path, res: dict, seconds: float):
  out.mkdir(parents=True, exist_ok=True)
  res = {**res, "seconds": round(seconds, 1)}
  (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
  lm = res["lm"]
  lines = ["## Language modelling and routing (WikiText-2 valid)", "",
           "| model | perplexity | KL(dense ‖ model) | KL(own top-k ‖ random-k) |", "|---|---:|---:|---:|"]
  for name in ("dense", "carved", "healed"):
    kl = "" if lm[name]["kl_to_ref"] is None else f"{lm[name]['kl_to_ref']:.3f}"
    rand = f"{lm[name + ' random-k']['kl_to_ref']:.3f}" if name != "dense" else ""
    lines.append(f"| {name} | {lm[name]['ppl']:.2f} | {kl} | {rand} |")
  lines += ["", "Per MoE layer: load evenness / shared-expert energy share / Jaccard of two temperature-router draws "
            f"(T = {RouterConfig().sample_temperature}) / Jaccard of a draw vs the top-k.", "",
            "| model | " + " | ".join(f"L{i}" for i in next(iter(res["routing"].values()))) + " | mean |",
            "|---|" + "---|" * (len(next(iter(res["routing"].values()))) + 1)]
  for name, per in res["routing"].items():
    keys = ("load_evenness", "shared_share", "jaccard_two_draws", "jaccard_draw_vs_topk")
    mean = [np.mean([v[k] for v in per.values()]) for k in keys]
    lines.append(f"| {name} | " + " | ".join(" / ".join(f"{v[k]:.2f}" for k in keys) for v in per.values())
                 + " | " + " / ".join(f"{m:.2f}" for m in mean) + " |")
  if res["zero_shot"]:
    models = list(next(iter(res["zero_shot"].values())))
    lines += ["", "## Zero-shot continuation accuracy (95% Wilson intervals)", "",
              "acc: summed log-likelihood; per token: divided by the choice's tokens; per byte: by its UTF-8 bytes.",
              "", "| benchmark | n | " + " | ".join(f"{m} acc | {m} per token | {m} per byte" for m in models) + " |",
              "|---|---:|" + "---:|" * (3 * len(models))]
    for ds, per in res["zero_shot"].items():
      lines.append(f"| {ds} | {per[models[0]]['n']} | " + " | ".join(
          f"{_ci(per[m], 'acc')} | {_ci(per[m], 'acc_token')} | {_ci(per[m], 'acc_norm')}" for m in models) + " |")
  if res.get("heal"):
    lines += ["", heal_table(res["heal"])]
    heal_plot(res["heal"], out / "heal_curve.png")
  args = res["args"]
  cmd = "python experiments/heal_smollm2.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items())
  (out / "results.md").write_text("\n".join(lines) + f"\n\nMade by `{cmd}` in {seconds / 60:.0f} min.\n")


def heal_table(heal: dict) -> str:
  rows = ["## Healing curve (held-out corpus windows)", "",
          f"Dense model's perplexity there: {heal['dense_valid_ppl']:.2f}; the teacher's top-k keeps "
          f"{heal['teacher_topk_mass']:.3f} of its probability on average.", "",
          "| step | phase | tokens | seconds | train loss | valid KL | valid ppl | mean load evenness |",
          "|---:|---|---:|---:|---:|---:|---:|---:|"]
  for h in heal["history"]:
    loss = "" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
    rows.append(f"| {h['step']} | {h['phase']} | {h['tokens']} | {h['seconds']} | {loss} | {h['valid_kl']:.4f} | "
                f"{h['valid_ppl']:.2f} | {np.mean(h['load_evenness']):.3f} |")
  return "\n".join(rows)


def heal_plot(heal: dict, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  h = heal["history"]
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
  tokens = [x["tokens"] / 1e3 for x in h]
  a.plot(tokens, [x["valid_ppl"] for x in h], "o-", label="healed")
  a.axhline(heal["dense_valid_ppl"], color="k", ls="--", label="dense")
  a.set(xlabel="training tokens processed (k)", ylabel="held-out perplexity")
  a.legend()
  b.plot(tokens, [x["valid_kl"] for x in h], "o-")
  b.set(xlabel="training tokens processed (k)", ylabel="held-out KL(dense || healed), nats/token")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
