"""What healing trains on, computed once from the dense model and cached (``convert.heal``).

Text: the non-overlapping ``seq``-token windows of a plain text, split at random (seeded) into training and
held-out validation windows drawn from the whole text; validation windows avoid the text's head that carving
calibrated on, so validation text is new to both.

For every window the dense model gives, once: the input states of the lowest carved layer (the frozen
layers below it are the same in the carved model, so healing starts there) and, at every position, the
teacher's top-``topk`` next-token log-probabilities with their token ids (the full distribution would
take vocabulary x 4 bytes per token). Stored as ``.npy`` files in a cache directory keyed by a digest
of everything they depend on (the dense weights, the text, the sizes), written to a temporary directory
and renamed, so an interrupted build leaves nothing that a later run would read; read memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FIELDS = ("tokens_ns", "states_nsd", "t_idx_nsk", "t_logp_nsk", "t_next_ns")


class HealData(NamedTuple):
  tokens_ns: np.ndarray  # [n, s] int32 token windows
  states_nsd: np.ndarray  # [n, s, d] float32 input of the lowest carved layer (dense model)
  t_idx_nsk: np.ndarray  # [n, s, k] int32 the teacher's top-k next tokens at each position
  t_logp_nsk: np.ndarray  # [n, s, k] float32 their log-probabilities under the teacher
  t_next_ns: np.ndarray  # [n, s] float32 the teacher's log-probability of the true next token (0 at the end)

  def take(self, rows) -> "HealData":
    return HealData(*(np.asarray(a[rows]) for a in self))


def text_windows(tok, text: str, train_tokens: int, valid_tokens: int, seq: int, *, seed: int,
                 calib_chars: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train [a, seq], valid [b, seq]): disjoint seeded samples of the non-overlapping ``seq``-token windows of
  ``text``, spread over the whole text (a corpus of several sources is represented in both). Validation
  windows never come from the first ``calib_chars`` characters (carving's calibration text)."""
  def windows(part: str) -> np.ndarray:
    ids = np.asarray(tok.encode(part, add_special_tokens=False), np.int32) if part else np.zeros(0, np.int32)
    n = len(ids) // seq
    return ids[:n * seq].reshape(n, seq)

  head, rest = windows(text[:calib_chars]), windows(text[calib_chars:])
  n_train, n_valid = -(-train_tokens // seq), -(-valid_tokens // seq)
  if n_valid > len(rest) or n_train + n_valid > len(head) + len(rest):
    raise ValueError(f"heal: the text gives {len(head) + len(rest)} windows of {seq} tokens ({len(rest)} past the "
                     f"calibration text); heal_tokens={train_tokens} and heal_valid_tokens={valid_tokens} need "
                     f"{n_train} + {n_valid}")
  rng = np.random.default_rng([seed, 1])
  order = rng.permutation(len(rest))
  valid = rest[np.sort(order[:n_valid])]
  pool = np.concatenate([head, rest[np.sort(order[n_valid:])]])
  return pool[np.sort(rng.permutation(len(pool))[:n_train])], valid


def teacher_fn(cfg, start_layer: int, topk: int):
  """jit: (dense params, tokens [b, s]) -> (states [b, s, d] at ``start_layer``, top-k ids, top-k log-probs,
  log-probs of the true next tokens)."""
  from bmoe_jax.model import forward, prefix_states

  @jax.jit
  def fn(params, tokens_bs):
    states_bsd = prefix_states(params, cfg, tokens_bs, stop_layer=start_layer)
    logits = forward(params, cfg, tokens_bs, start_layer=start_layer, states_bsd=states_bsd).logits
    logp_bsv = jax.nn.log_softmax(logits, -1)
    logp, idx = jax.lax.top_k(logp_bsv, topk)
    nxt = jnp.take_along_axis(logp_bsv[:, :-1], tokens_bs[:, 1:, None], -1)[..., 0]
    return states_bsd, idx.astype(jnp.int32), logp, jnp.pad(nxt, ((0, 0), (0, 1)))
  return fn


def compute(params, cfg, windows_ns: np.ndarray, start_layer: int, topk: int, batch: int = 8,
            progress: bool = True, desc: str = "teacher") -> HealData:
  from tqdm.auto import tqdm

  fn = teacher_fn(cfg, start_layer, topk)
  n, s = windows_ns.shape
  out = HealData(windows_ns.astype(np.int32), np.zeros((n, s, cfg.hidden_size), np.float32),
                 np.zeros((n, s, topk), np.int32), np.zeros((n, s, topk), np.float32), np.zeros((n, s), np.float32))
  for lo in tqdm(range(0, n, batch), desc=desc, disable=not progress, leave=False):
    got = fn(params, jnp.asarray(windows_ns[lo:lo + batch]))
    for dst, src in zip(out[1:], got):
      dst[lo:lo + batch] = np.asarray(src)
  return out


def cache_key(**parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(root: Path, key: str, build) -> dict[str, HealData]:
  """{"train", "valid"}: the cached data of ``key`` under ``root``, built by ``build()`` (same dict) when
  absent; arrays are memory-mapped."""
  final = Path(root) / key
  if not (final / "done.json").exists():
    got = build()
    tmp = Path(root) / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, data in got.items():
      for name, arr in zip(FIELDS, data):
        np.save(tmp / f"{split}_{name}.npy", arr)
    (tmp / "done.json").write_text(json.dumps({s: int(len(d.tokens_ns)) for s, d in got.items()}))
    if final.exists():  # a damaged or partial directory of another run
      shutil.rmtree(final)
    os.replace(tmp, final)
  return {split: HealData(*(np.load(final / f"{split}_{name}.npy", mmap_mode="r") for name in FIELDS))
          for split in ("train", "valid")}
