"""Calibration and OOD metrics of class-probability predictions (host-side numpy, float64).

Shapes: ``probs_nc`` [n examples, C classes] (rows sum to one), ``labels_n`` int [n].
ECE/MCE use equal-width confidence bins on the top-class probability (bins ``(lo, hi]``, the first also
holds 0): ECE = sum_b |B_b|/n |acc(B_b) - conf(B_b)|, MCE = max over non-empty bins. Brier is the
multi-class sum of squares, sum_c (p_c - y_c)^2, averaged over examples. OOD scores: predictive entropy
(higher = more likely out of distribution); AUROC counts ties as half (Mann-Whitney), AUPRC is the
average precision with OOD as the positive class.

Selective prediction ranks examples by confidence (the top-class probability) and answers the most confident
first: at coverage k/n the risk is the error rate of the k answered. Examples of equal confidence are taken in
every order with equal probability, so the risk is its expectation over those orders (a tie block of m examples
with e errors contributes e/m errors per example answered): the curve never depends on how a sort breaks ties.
AURC is the mean risk over k = 1..n; error detection is the AUROC of confidence separating right from wrong
answers (1: every right answer more confident than every wrong one).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bmoe_jax.intervals import bootstrap_ci, holm, paired_bootstrap  # noqa: F401  (public here too)

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
  """Top-1 accuracy: the fraction of examples whose most probable class (argmax, the first on ties) is the label.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).

  Returns:
    The accuracy in [0, 1].
  """
  probs, labels = _check(probs_nc, labels_n)
  return float(np.mean(probs.argmax(1) == labels))


def nll(probs_nc, labels_n, eps: float = 1e-12) -> float:
  """Mean negative log-likelihood of the labels, ``-mean_n log p_n[y_n]`` (nats).

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).
    eps: floor on the label's probability before the log: a zero probability costs ``-log(eps)`` (27.6 nats at
      the default), not inf.

  Returns:
    The mean NLL in nats (>= 0).
  """
  probs, labels = _check(probs_nc, labels_n)
  return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], eps))))


def brier(probs_nc, labels_n) -> float:
  """Multi-class Brier score ``sum_c (p_c - y_c)^2`` with ``y`` the one-hot label, averaged over examples.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).

  Returns:
    The mean Brier score in [0, 2] (lower is better).
  """
  probs, labels = _check(probs_nc, labels_n)
  onehot = np.eye(probs.shape[1])[labels]
  return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def calibration_bins(probs_nc, labels_n, num_bins: int = 15) -> dict:
  """Per equal-width bin: count, mean confidence, accuracy (NaN where empty) and the bin edges.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).
    num_bins: the number of equal-width bins on [0, 1] of the confidence (top-class probability); bin ``i``
      holds confidences in ``(i / num_bins, (i + 1) / num_bins]``, the first also 0.

  Returns:
    A dict of float64 arrays: ``"edges"`` [num_bins + 1] from 0 to 1; ``"count"`` [num_bins] examples per bin;
    ``"confidence"`` [num_bins] their mean top-class probability; ``"accuracy"`` [num_bins] the fraction of them
    whose argmax is the label (both NaN in empty bins).
  """
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
  """Expected calibration error: ``sum_b |B_b|/n |acc(B_b) - conf(B_b)|`` over equal-width confidence bins.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).
    num_bins: the number of equal-width bins (``calibration_bins``); empty bins contribute nothing.

  Returns:
    The ECE in [0, 1] (lower is better).
  """
  b = calibration_bins(probs_nc, labels_n, num_bins)
  keep = b["count"] > 0
  return float(np.sum(b["count"][keep] / b["count"].sum() * np.abs(b["accuracy"][keep] - b["confidence"][keep])))


def mce(probs_nc, labels_n, num_bins: int = 15) -> float:
  """Maximum calibration error: the largest ``|acc(B_b) - conf(B_b)|`` over the non-empty confidence bins.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).
    num_bins: the number of equal-width bins (``calibration_bins``).

  Returns:
    The MCE in [0, 1] (lower is better).
  """
  b = calibration_bins(probs_nc, labels_n, num_bins)
  keep = b["count"] > 0
  return float(np.max(np.abs(b["accuracy"][keep] - b["confidence"][keep])))


def entropy(probs_nc) -> np.ndarray:
  """Predictive entropy ``-sum_c p_c log p_c`` of each example (nats, with 0 log 0 = 0): the OOD score.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).

  Returns:
    float64 [n] entropies in [0, log C].
  """
  probs, _ = _check(probs_nc)
  return -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=1)


def auroc(scores_in, scores_out) -> float:
  """P(score_out > score_in) + P(tie)/2: OOD examples should score higher.

  Args:
    scores_in: [n] per-example scores of the in-distribution (negative) examples; n > 0.
    scores_out: [m] per-example scores of the out-of-distribution (positive) examples; m > 0.

  Returns:
    The AUROC in [0, 1] (0.5: no separation; 1: every OOD score above every in-distribution one).
  """
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
  (all examples scoring at least as high count, so ties are treated pessimistically as one block).

  Args:
    scores_in: [n] per-example scores of the in-distribution (negative) examples; n > 0.
    scores_out: [m] per-example scores of the out-of-distribution (positive) examples; m > 0.

  Returns:
    The average precision in (0, 1] (chance level: m / (n + m)).
  """
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


def risk_coverage(probs_nc, labels_n) -> tuple[np.ndarray, np.ndarray]:
  """(coverage [n], risk [n]): answering the k most confident examples, k = 1..n (module docstring: ties).

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).

  Returns:
    (coverage, risk), float64 [n] each: ``coverage[k - 1] = k / n`` and ``risk[k - 1]`` the expected error rate
    of the k most confident examples (ties in every order alike).
  """
  probs, labels = _check(probs_nc, labels_n)
  conf = probs.max(1)
  wrong = (probs.argmax(1) != labels).astype(np.float64)
  order = np.argsort(-conf, kind="mergesort")
  conf, wrong = conf[order], wrong[order]
  block = np.r_[0, np.cumsum(conf[1:] != conf[:-1])]  # tie-block id of each sorted example
  size = np.bincount(block).astype(np.float64)
  rate = np.bincount(block, wrong) / size  # errors per example within each block
  errors = np.cumsum(rate[block])  # expected errors among the first k, ties in every order alike
  k = np.arange(1, len(conf) + 1, dtype=np.float64)
  return k / len(conf), errors / k


def aurc(probs_nc, labels_n) -> float:
  """Area under the risk-coverage curve: the mean selective risk over coverages k / n, k = 1..n.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).

  Returns:
    The AURC in [0, 1] (lower is better).
  """
  return float(np.mean(risk_coverage(probs_nc, labels_n)[1]))


def selective_accuracy(probs_nc, labels_n, coverage: float = 0.8) -> float:
  """Accuracy on the ceil(coverage * n) most confident examples.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).
    coverage: the fraction of examples answered, in (0, 1] (ValueError otherwise); 1: plain accuracy.

  Returns:
    ``1 - risk`` at k = ceil(coverage * n), in [0, 1] (ties at the cut in expectation, ``risk_coverage``).
  """
  if not 0 < coverage <= 1:
    raise ValueError(f"coverage={coverage}: expected a fraction in (0, 1]")
  cov, risk = risk_coverage(probs_nc, labels_n)
  return float(1.0 - risk[int(np.ceil(coverage * len(cov) - 1e-9)) - 1])


def error_auroc(probs_nc, labels_n) -> float:
  """P(a right answer's confidence > a wrong one's), ties half; NaN when every answer is right or every one wrong
  (nothing to separate).

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).

  Returns:
    The error-detection AUROC of the top-class probability in [0, 1], or NaN.
  """
  probs, labels = _check(probs_nc, labels_n)
  conf, right = probs.max(1), probs.argmax(1) == labels
  if right.all() or not right.any():
    return float("nan")
  return auroc(conf[~right], conf[right])


def paired_difference(metric: Callable, probs_a_snc, probs_b_snc, labels_n, *, num_samples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict:
  """Paired bootstrap of ``metric(a) - metric(b)`` pooled over seeds: two methods on the same n questions (seed s
  of a paired with seed s of b). Each resample draws question indices once and applies them to every seed; the
  statistic is the seed-mean difference.

  Args:
    metric: ``metric(probs_nc, labels_n) -> float`` (e.g. ``ece``, ``accuracy``).
    probs_a_snc: [seeds, n, C] method a's class probabilities.
    probs_b_snc: [seeds, n, C] method b's, on the same seeds and questions (ValueError on a shape mismatch).
    labels_n: int [n] the questions' true classes, shared by every seed.
    num_samples: the number of bootstrap resamples.
    level: the interval's coverage (0.95: the 2.5th to the 97.5th percentile).
    seed: the seed of the ``np.random.default_rng`` drawing the resamples.

  Returns:
    A dict: ``"diff"`` the seed-mean ``metric(a) - metric(b)`` on all questions; ``"ci"`` (low, high) the
    percentile interval of the resampled differences; ``"p"`` the two-sided bootstrap p-value (twice the
    smaller tail beyond 0, at most 1); ``"seeds"`` and ``"n"`` the sizes.
  """
  a, b = np.asarray(probs_a_snc, np.float64), np.asarray(probs_b_snc, np.float64)
  labels = np.asarray(labels_n)
  if a.ndim != 3 or a.shape != b.shape or a.shape[1] != labels.shape[0]:
    raise ValueError(f"probs of shapes {a.shape} / {b.shape} and labels {labels.shape}: expected [seeds, n, C] "
                     "twice (the same seeds and questions) and labels [n]")
  diff = lambda idx: float(np.mean([metric(a[s, idx], labels[idx]) - metric(b[s, idx], labels[idx])
                                    for s in range(a.shape[0])]))
  return {**paired_bootstrap(diff, (labels.shape[0],), num_samples, level, seed), "seeds": int(a.shape[0]),
          "n": int(labels.shape[0])}


def paired_auroc_difference(a_in_sn, a_out_sm, b_in_sn, b_out_sm, *, num_samples: int = 2000, level: float = 0.95,
                            seed: int = 0) -> dict:
  """Paired bootstrap of the OOD AUROC of scores ``a`` minus that of scores ``b`` (e.g. one method's mutual
  information against temperature scaling's entropy), pooled over seeds: [seeds, n] scores of the same n
  in-distribution and [seeds, m] of the same m shifted examples. Each resample draws in- and out-indices once
  (separately: the two sets are independent samples) and applies them to every seed and both scores.

  Args:
    a_in_sn: [seeds, n] scores a of the in-distribution examples (higher = more likely OOD).
    a_out_sm: [seeds, m] scores a of the shifted examples.
    b_in_sn: [seeds, n] scores b of the same in-distribution examples (ValueError on a shape mismatch).
    b_out_sm: [seeds, m] scores b of the same shifted examples.
    num_samples: the number of bootstrap resamples.
    level: the interval's coverage (0.95: the 2.5th to the 97.5th percentile).
    seed: the seed of the ``np.random.default_rng`` drawing the resamples.

  Returns:
    A dict: ``"diff"`` the seed-mean AUROC of a minus that of b on all examples; ``"ci"`` (low, high) the
    percentile interval of the resampled differences; ``"p"`` the two-sided bootstrap p-value (twice the
    smaller tail beyond 0, at most 1); ``"seeds"``, ``"n"`` and ``"m"`` the sizes.
  """
  a_in, a_out, b_in, b_out = (np.asarray(x, np.float64) for x in (a_in_sn, a_out_sm, b_in_sn, b_out_sm))
  if a_in.ndim != 2 or a_in.shape != b_in.shape or a_out.shape != b_out.shape or a_in.shape[0] != a_out.shape[0]:
    raise ValueError(f"scores of shapes {a_in.shape} / {a_out.shape} and {b_in.shape} / {b_out.shape}: expected "
                     "[seeds, n] in-distribution and [seeds, m] shifted, the same for a and b")
  diff = lambda i, o: float(np.mean([auroc(a_in[s, i], a_out[s, o]) - auroc(b_in[s, i], b_out[s, o])
                                     for s in range(a_in.shape[0])]))
  return {**paired_bootstrap(diff, (a_in.shape[1], a_out.shape[1]), num_samples, level, seed),
          "seeds": int(a_in.shape[0]), "n": int(a_in.shape[1]), "m": int(a_out.shape[1])}


def summary(probs_nc, labels_n, *, ci: bool = False, num_samples: int = 1000, seed: int = 0) -> dict:
  """ACC, NLL, ECE (15 and 10 bins), MCE, Brier, and selective prediction (AURC, accuracy at 80% coverage,
  error-detection AUROC: None when every answer is right or every one wrong); with ``ci``, bootstrap 95%
  intervals of each.

  Args:
    probs_nc: [n, C] class probabilities (rows non-negative, summing to one; checked, ValueError otherwise).
    labels_n: int [n] true class indices in [0, C).
    ci: whether to add bootstrap 95% intervals (``bootstrap_ci``) under ``"ci95"``.
    num_samples: the bootstrap resamples per metric (with ``ci``).
    seed: the bootstrap seed (with ``ci``).

  Returns:
    A dict of floats: ``"acc"``, ``"nll"`` (nats), ``"ece"`` (15 bins), ``"ece10"`` (10 bins), ``"mce"``
    (15 bins), ``"brier"``, ``"aurc"``, ``"acc_at_80"`` (``selective_accuracy`` at 0.8) and ``"err_auroc"``
    (``error_auroc``; None when undefined); with ``ci`` also ``"ci95"``: {metric: (low, high)} for every defined
    metric.
  """
  fns = {"acc": accuracy, "nll": nll, "ece": ece, "ece10": lambda p, y: ece(p, y, 10), "mce": mce, "brier": brier,
         "aurc": aurc, "acc_at_80": selective_accuracy, "err_auroc": error_auroc}
  defined = lambda v: None if isinstance(v, float) and np.isnan(v) else v  # JSON has no NaN: null when undefined
  out = {k: defined(fn(probs_nc, labels_n)) for k, fn in fns.items()}
  if ci:
    out["ci95"] = {k: tuple(map(defined, bootstrap_ci(fn, probs_nc, labels_n, num_samples=num_samples, seed=seed)))
                   for k, fn in fns.items() if out[k] is not None}
  return out


def ood_summary(probs_in_nc, probs_out_nc, scores_in: dict | None = None, scores_out: dict | None = None) -> dict:
  """OOD detection by predictive entropy: AUROC and AUPRC (OOD positive); with per-example epistemic scores of
  both sets, also by each score.

  Args:
    probs_in_nc: [n, C] class probabilities of the in-distribution examples.
    probs_out_nc: [m, C'] class probabilities of the shifted (OOD) examples.
    scores_in: per-example epistemic scores of the in-distribution examples (``bmoe_jax.epistemic``:
      {"mi": [n], "var_f": [n]}, higher = more likely OOD); None: entropy only.
    scores_out: the same scores of the shifted examples ({name: [m]}); only the names in both dicts are used
      (ValueError on a wrong length); None: entropy only.

  Returns:
    A dict of floats: ``"auroc"`` and ``"auprc"`` by predictive entropy, ``"entropy_in"`` / ``"entropy_out"``
    the mean entropies (nats); for each shared score name also ``"auroc_<name>"`` / ``"auprc_<name>"`` by that
    score and its means ``"<name>_in"`` / ``"<name>_out"``.
  """
  h_in, h_out = entropy(probs_in_nc), entropy(probs_out_nc)
  out = {"auroc": auroc(h_in, h_out), "auprc": auprc(h_in, h_out),
         "entropy_in": float(h_in.mean()), "entropy_out": float(h_out.mean())}
  if scores_in is not None and scores_out is not None:
    for name in sorted(set(scores_in) & set(scores_out)):
      s_in, s_out = np.asarray(scores_in[name], np.float64), np.asarray(scores_out[name], np.float64)
      if s_in.shape != (len(h_in),) or s_out.shape != (len(h_out),):
        raise ValueError(f"score {name!r} of shapes {s_in.shape} / {s_out.shape}: expected one per example "
                         f"({len(h_in)} / {len(h_out)})")
      out.update({f"auroc_{name}": auroc(s_in, s_out), f"auprc_{name}": auprc(s_in, s_out),
                  f"{name}_in": float(s_in.mean()), f"{name}_out": float(s_out.mean())})
  return out
