"""Metrics against hand-computed values and brute-force references (no sklearn)."""

import itertools

import numpy as np
import pytest

from bmoe_jax import metrics as M
from bmoe_jax.plots import reliability_diagram

P = np.array([[0.93, 0.07], [0.62, 0.38], [0.29, 0.71], [0.56, 0.44], [0.58, 0.42]])
Y = np.array([0, 1, 1, 0, 0])


def test_hand_computed_values():
  assert M.accuracy(P, Y) == pytest.approx(4 / 5)
  assert M.nll(P, Y) == pytest.approx(-np.log([0.93, 0.38, 0.71, 0.56, 0.58]).mean())
  assert M.brier(P, Y) == pytest.approx((2 * 0.07**2 + 2 * 0.62**2 + 2 * 0.29**2 + 2 * 0.44**2 + 2 * 0.42**2) / 5)
  # bins: .93 right, .62 wrong, .71 right, {.56, .58} right (one bin at 10 and at 15 bins)
  want = (0.07 + 0.62 + 0.29 + 2 * abs(1 - 0.57)) / 5
  assert M.ece(P, Y, 10) == pytest.approx(want) and M.ece(P, Y, 15) == pytest.approx(want)
  assert M.mce(P, Y) == pytest.approx(0.62)
  s = M.summary(P, Y)
  assert set(s) == {"acc", "nll", "ece", "ece10", "mce", "brier", "aurc", "acc_at_80", "err_auroc"}
  assert s["ece10"] == pytest.approx(want)
  b = M.calibration_bins(P, Y, 10)
  assert b["count"].tolist() == [0, 0, 0, 0, 0, 2, 1, 1, 0, 1]
  # a perfectly calibrated predictor: confidence 0.75 and right 3 times out of 4
  assert M.ece(np.tile([0.75, 0.25], (4, 1)), np.array([0, 0, 0, 1])) == pytest.approx(0.0)
  assert M.entropy(np.array([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx([np.log(2), 0.0])


def _brute_auroc(s_in, s_out):
  return np.mean([1.0 if o > i else 0.5 if o == i else 0.0 for o, i in itertools.product(s_out, s_in)])


def _brute_ap(s_in, s_out):
  """Average precision over distinct thresholds: sum over thresholds of (recall gain) x precision."""
  scores = np.r_[s_in, s_out]
  pos = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
  ap, prev_recall = 0.0, 0.0
  for t in sorted(set(scores), reverse=True):
    sel = scores >= t
    recall = pos[sel].sum() / pos.sum()
    ap += (recall - prev_recall) * pos[sel].sum() / sel.sum()
    prev_recall = recall
  return ap


def test_ood_scores():
  s_in, s_out = [0.1, 0.4, 0.35, 0.8], [0.9, 0.4, 0.6]
  assert M.auroc(s_in, s_out) == pytest.approx(9.5 / 12)
  assert M.auprc(s_in, s_out) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
  rng = np.random.RandomState(0)
  for _ in range(20):
    a, b = rng.randint(0, 6, rng.randint(1, 15)) / 5, rng.randint(0, 6, rng.randint(1, 15)) / 5  # many ties
    assert M.auroc(a, b) == pytest.approx(_brute_auroc(a, b))
    assert M.auprc(a, b) == pytest.approx(_brute_ap(a, b))
  p_in = np.tile([0.9, 0.1], (5, 1))
  p_out = np.tile([0.5, 0.5], (5, 1))
  assert M.ood_summary(p_in, p_out)["auroc"] == 1.0


def _brute_risks(probs, labels):
  """The risk-coverage curve averaged over every order of equally confident examples."""
  conf, wrong = probs.max(1), (probs.argmax(1) != labels).astype(float)
  blocks = [np.flatnonzero(conf == c) for c in sorted(set(conf), reverse=True)]
  curves = [np.cumsum(wrong[np.concatenate(perm)]) / np.arange(1, len(conf) + 1)
            for perm in itertools.product(*(itertools.permutations(b) for b in blocks))]
  return np.mean(curves, axis=0)


def test_selective_prediction_against_brute_force():
  # by confidence: .93 right, .71 right, .62 wrong, .58 right, .56 right: the wrong one comes third
  assert M.aurc(P, Y) == pytest.approx(np.mean([0, 0, 1 / 3, 1 / 4, 1 / 5]))
  assert M.selective_accuracy(P, Y, 0.4) == 1.0 and M.selective_accuracy(P, Y, 0.6) == pytest.approx(2 / 3)
  assert M.selective_accuracy(P, Y, 1.0) == pytest.approx(0.8)
  assert M.error_auroc(P, Y) == pytest.approx(2 / 4)  # two right answers above the wrong one, two below
  rng = np.random.RandomState(3)
  for _ in range(15):
    n = rng.randint(2, 8)
    top = rng.randint(5, 9, n) / 10  # few distinct confidences: many ties
    probs = np.stack([top, 1 - top], 1)
    labels = rng.randint(0, 2, n)
    cov, risk = M.risk_coverage(probs, labels)
    np.testing.assert_allclose(risk, _brute_risks(probs, labels), atol=1e-12)
    np.testing.assert_allclose(cov, np.arange(1, n + 1) / n)
    right = probs.argmax(1) == labels
    if right.any() and not right.all():
      assert M.error_auroc(probs, labels) == pytest.approx(_brute_auroc(top[~right], top[right]))
  assert np.isnan(M.error_auroc(np.eye(2), np.array([0, 1])))  # nothing wrong: nothing to detect
  s = M.summary(np.eye(2), np.array([0, 1]), ci=True, num_samples=20)
  assert s["err_auroc"] is None and "err_auroc" not in s["ci95"] and s["ci95"]["aurc"] == (0.0, 0.0)
  with pytest.raises(ValueError, match="coverage=0"):
    M.selective_accuracy(P, Y, 0.0)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
  rng = np.random.RandomState(1)
  p = rng.dirichlet([1, 1, 1], 400)
  y = rng.randint(0, 3, 400)
  lo, hi = M.bootstrap_ci(M.accuracy, p, y, num_samples=300, seed=5)
  assert (lo, hi) == M.bootstrap_ci(M.accuracy, p, y, num_samples=300, seed=5)
  assert lo < M.accuracy(p, y) < hi and hi - lo < 0.15
  assert "ci95" in M.summary(p, y, ci=True, num_samples=50)


def test_paired_difference_pools_seeds_on_shared_resamples():
  rng = np.random.RandomState(4)
  y = rng.randint(0, 3, 60)
  a, b = rng.dirichlet([1, 1, 1], (2, 60)), rng.dirichlet([1, 1, 1], (2, 60))
  r = M.paired_difference(M.nll, a, b, y, num_samples=200, seed=1)
  assert r["diff"] == pytest.approx(np.mean([M.nll(a[s], y) - M.nll(b[s], y) for s in range(2)]))
  # by hand: the same index draws for both seeds
  gen = np.random.default_rng(1)
  boot = []
  for _ in range(200):
    idx = gen.integers(0, 60, 60)
    boot.append(np.mean([M.nll(a[s, idx], y[idx]) - M.nll(b[s, idx], y[idx]) for s in range(2)]))
  assert r["ci"] == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
  assert r["p"] == pytest.approx(min(1, 2 * min(np.mean(np.array(boot) <= 0), np.mean(np.array(boot) >= 0))))
  same = M.paired_difference(M.nll, a, a, y, num_samples=20)
  assert same["diff"] == 0 and same["ci"] == (0.0, 0.0) and same["p"] == 1.0
  sharp = (np.eye(3)[y] * 0.97 + 0.01)[None]  # right and confident vs uniform: NLL far lower, p = 0
  far = M.paired_difference(M.nll, sharp, np.full((1, 60, 3), 1 / 3), y, num_samples=200)
  assert far["ci"][1] < 0 and far["p"] == 0.0
  with pytest.raises(ValueError, match="expected \\[seeds, n, C\\] twice"):
    M.paired_difference(M.nll, a, b[:1], y)


def test_paired_difference_leaves_undefined_resamples_out_of_the_interval_and_the_p_value():
  """A metric undefined (NaN) on some resamples, as error_auroc is where every answer is right: those resamples
  count in neither tail. Here it is defined only when questions 0 and 1 are both drawn (~42% of resamples)."""
  y = np.zeros(6, int)
  a = np.tile([[0.9, 0.1]], (6, 1))
  a[0], a[1] = [0.3, 0.7], [0.4, 0.6]
  def metric(p, labels):
    wrong = p[:, 1]
    return 0.0 if (wrong == 0.7).any() and (wrong == 0.6).any() else np.nan
  r = M.paired_difference(metric, a[None], a[None], y, num_samples=300, seed=3)
  assert r["p"] == 1.0 and r["ci"] == (0.0, 0.0)  # counting NaN resamples in the total gave p < 1
  assert M.error_auroc(a[2:], y[2:]) != M.error_auroc(a[2:], y[2:])  # NaN: every answer right
  none = M.paired_difference(metric, a[None, 2:], a[None, 2:], y[2:], num_samples=20)
  assert np.isnan(none["p"]) and np.isnan(none["ci"][0])


def test_paired_auroc_difference_resamples_in_and_out_sets_apart():
  rng = np.random.RandomState(5)
  a_in, a_out = rng.normal(0, 1, (2, 40)), rng.normal(1, 1, (2, 30))  # a separates; b is noise
  b_in, b_out = rng.normal(0, 1, (2, 40)), rng.normal(0, 1, (2, 30))
  r = M.paired_auroc_difference(a_in, a_out, b_in, b_out, num_samples=150, seed=2)
  want = np.mean([M.auroc(a_in[s], a_out[s]) - M.auroc(b_in[s], b_out[s]) for s in range(2)])
  assert r["diff"] == pytest.approx(want) and (r["n"], r["m"], r["seeds"]) == (40, 30, 2)
  gen, boot = np.random.default_rng(2), []
  for _ in range(150):  # by hand: in-indices, then out-indices, the same for both seeds and both scores
    i, o = gen.integers(0, 40, 40), gen.integers(0, 30, 30)
    boot.append(np.mean([M.auroc(a_in[s, i], a_out[s, o]) - M.auroc(b_in[s, i], b_out[s, o]) for s in range(2)]))
  assert r["ci"] == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
  assert r["ci"][0] > 0 and r["p"] == 0.0
  same = M.paired_auroc_difference(a_in, a_out, a_in, a_out, num_samples=20)
  assert same["diff"] == 0 and same["p"] == 1.0
  with pytest.raises(ValueError, match="the same for a and b"):
    M.paired_auroc_difference(a_in, a_out, b_in[:, :5], b_out)


def test_holm_against_its_definition():
  p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
  # sorted: .005 .01 .03 .04 .5 -> x5 x4 x3 x2 x1 = .025 .04 .09 .08 .5 -> running max .025 .04 .09 .09 .5
  np.testing.assert_allclose(M.holm(p), [0.04, 0.09, 0.09, 0.025, 0.5])
  assert M.holm([0.3, 0.9]).tolist() == [0.6, 0.9] and M.holm([0.6, 0.7]).tolist() == [1.0, 1.0]


def test_bad_inputs():
  with pytest.raises(ValueError, match="sum to one"):
    M.accuracy(np.array([[0.5, 0.6]]), np.array([0]))
  with pytest.raises(ValueError, match="labels outside"):
    M.nll(P, np.array([0, 1, 2, 0, 0]))
  with pytest.raises(ValueError, match="expected int"):
    M.brier(P, Y.astype(float))
  with pytest.raises(ValueError, match="expected \\[n > 0"):
    M.ece(np.zeros((0, 2)), np.zeros(0, int))
  with pytest.raises(ValueError, match="needs in- and out"):
    M.auroc([], [0.1])


def test_reliability_diagram_png(tmp_path):
  path = reliability_diagram(P, Y, tmp_path / "plots" / "rel.png", title="toy")
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
