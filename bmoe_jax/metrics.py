"""Calibration and OOD metrics of class-probability predictions (host-side numpy, float64).

Shapes: ``probs_nc`` [n examples, C classes] (rows sum to one), ``labels_n`` int [n].
ECE/MCE use equal-width confidence bins on the top-class probability (bins ``(lo, hi]``, the first also
holds 0): ECE = sum_b |B_b|/n |acc(B_b) - conf(B_b)|, MCE = max over non-empty bins. Brier is the
multi-class sum of squares, sum_c (p_c - y_c)^2, averaged over examples. OOD scores: predictive entropy
(higher = more likely out of distribution); AUROC counts ties as half (Mann-Whitney), AUPRC is the
average precision with OOD as the positive class.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ECE_BINS = (15, 10)


def _check(probs_nc, labels_n=None):
  probs = np.asarray(probs_nc, np.float64)
  if probs.ndim != 2 or probs.shape[0] == 0:
    raise ValueError(f"probs of shape {probs.shape}: expected [n > 0, classes]")
  if not np.all(np.isfinite(probs)) or np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-4):
    raise ValueError("probs must be finite, non-negative and sum to one per row")
  if labels_n is None:
    return probs, None
  labels = np.asarray(labels_n)
  if labels.shape != (probs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels of shape {labels.shape} / dtype {labels.dtype}: expected int [{probs.shape[0]}]")
  if labels.min() < 0 or labels.max() >= probs.shape[1]:
    raise ValueError(f"labels outside [0, {probs.shape[1]})")
  return probs, labels


def accuracy(probs_nc, labels_n) -> float:
  probs, labels = _check(probs_nc, labels_n)
  return float(np.mean(probs.argmax(1) == labels))


def nll(probs_nc, labels_n, eps: float = 1e-12) -> float:
  probs, labels = _check(probs_nc, labels_n)
  return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], eps))))


def brier(probs_nc, labels_n) -> float:
  probs, labels = _check(probs_nc, labels_n)
  onehot = np.eye(probs.shape[1])[labels]
  return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def calibration_bins(probs_nc, labels_n, num_bins: int = 15) -> dict:
  """Per equal-width bin: count, mean confidence, accuracy (NaN where empty) and the bin edges."""
  probs, labels = _check(probs_nc, labels_n)
  conf = probs.max(1)
  correct = (probs.argmax(1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
  count = np.bincount(idx, minlength=num_bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_conf = np.bincount(idx, conf, num_bins) / count
    acc = np.bincount(idx, correct, num_bins) / count
  return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def ece(probs_nc, labels_n, num_bins: int = 15) -> float:
  b = calibration_bins(probs_nc, labels_n, num_bins)
  keep = b["count"] > 0
  return float(np.sum(b["count"][keep] / b["count"].sum() * np.abs(b["accuracy"][keep] - b["confidence"][keep])))


def mce(probs_nc, labels_n, num_bins: int = 15) -> float:
  b = calibration_bins(probs_nc, labels_n, num_bins)
  keep = b["count"] > 0
  return float(np.max(np.abs(b["accuracy"][keep] - b["confidence"][keep])))


def entropy(probs_nc) -> np.ndarray:
  probs, _ = _check(probs_nc)
  return -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=1)


def auroc(scores_in, scores_out) -> float:
  """P(score_out > score_in) + P(tie)/2: OOD examples should score higher."""
  s_in, s_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
  if s_in.size == 0 or s_out.size == 0:
    raise ValueError("AUROC needs in- and out-of-distribution scores")
  allv = np.concatenate([s_in, s_out])
  order = np.argsort(allv, kind="mergesort")
  ranks = np.empty_like(allv)
  sorted_v = allv[order]
  # average ranks over ties (1-based)
  _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
  avg = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  r_out = ranks[s_in.size:].sum()
  return float((r_out - s_out.size * (s_out.size + 1) / 2.0) / (s_in.size * s_out.size))


def auprc(scores_in, scores_out) -> float:
  """Average precision with OOD as positive: sum over positives of the precision at their threshold
  (all examples scoring at least as high count, so ties are treated pessimistically as one block)."""
  s_in, s_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
  if s_in.size == 0 or s_out.size == 0:
    raise ValueError("AUPRC needs in- and out-of-distribution scores")
  scores = np.concatenate([s_in, s_out])
  pos = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
  order = np.argsort(-scores, kind="mergesort")
  scores, pos = scores[order], pos[order]
  # group ties: precision evaluated at the end of each tie block
  ends = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
  tp = np.cumsum(pos)[ends]
  seen = ends + 1
  new_pos = np.diff(np.r_[0.0, tp])
  return float(np.sum(new_pos * tp / seen) / s_out.size)


def bootstrap_ci(metric: Callable, *arrays, num_samples: int = 1000, level: float = 0.95, seed: int = 0):
  """(low, high) percentile interval of ``metric(*arrays)`` over example resamples (seeded)."""
  n = len(arrays[0])
  rng = np.random.RandomState(seed)
  vals = []
  for _ in range(num_samples):
    idx = rng.randint(0, n, n)
    vals.append(metric(*(np.asarray(a)[idx] for a in arrays)))
  lo, hi = np.percentile(vals, [50 * (1 - level), 100 - 50 * (1 - level)])
  return float(lo), float(hi)


def summary(probs_nc, labels_n, *, ci: bool = False, num_samples: int = 1000, seed: int = 0) -> dict:
  """ACC, NLL, ECE (15 and 10 bins), MCE, Brier; with ``ci``, bootstrap 95% intervals of each."""
  fns = {"acc": accuracy, "nll": nll, "ece": ece, "ece10": lambda p, y: ece(p, y, 10), "mce": mce, "brier": brier}
  out = {k: fn(probs_nc, labels_n) for k, fn in fns.items()}
  if ci:
    out["ci95"] = {k: bootstrap_ci(fn, probs_nc, labels_n, num_samples=num_samples, seed=seed)
                   for k, fn in fns.items()}
  return out


def ood_summary(probs_in_nc, probs_out_nc) -> dict:
  """OOD detection by predictive entropy: AUROC and AUPRC (OOD positive)."""
  h_in, h_out = entropy(probs_in_nc), entropy(probs_out_nc)
  return {"auroc": auroc(h_in, h_out), "auprc": auprc(h_in, h_out),
          "entropy_in": float(h_in.mean()), "entropy_out": float(h_out.mean())}
