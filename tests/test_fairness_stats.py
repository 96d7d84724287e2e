"""Fairness metrics, SPLIT probe and statistics, against scipy and sklearn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import special, stats
from sklearn import metrics as skm

from ncjax import fairness, split_probe, statistics
from ncjax.errors import DataError

# --- fairness -------------------------------------------------------------


def _toy(seed: int = 0, n: int = 240):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  groups = rng.integers(0, 2, n)
  logits = rng.normal(size=(n, 2)) + np.stack([0 * labels, 1.0 * labels], 1)
  return labels, logits, groups


def test_predictions_from_logits_match_argmax_and_softmax():
  logits = np.array([[0.0, 1.0], [2.0, -1.0], [3.0, 3.0], [-800.0, 800.0]])
  pred, score = fairness.predictions_from_logits(logits)
  np.testing.assert_array_equal(pred, [1, 0, 0, 1])  # the tie goes to class 0
  np.testing.assert_allclose(score, special.softmax(logits, axis=1)[:, 1])
  assert np.isfinite(score).all()


def test_group_metrics_match_sklearn_per_group():
  labels, logits, groups = _toy()
  pred, score = fairness.predictions_from_logits(logits)
  got = fairness.group_metrics(labels, pred, score, groups)
  for suffix, mask in [
      ("", np.ones_like(groups, bool)),
      ("/g0", groups == 0),
      ("/g1", groups == 1),
  ]:
    y, p, s = labels[mask], pred[mask], score[mask]
    tn, fp, fn, tp = skm.confusion_matrix(y, p, labels=[0, 1]).ravel()
    assert got["f1" + suffix] == pytest.approx(skm.f1_score(y, p))
    assert got["auc" + suffix] == pytest.approx(skm.roc_auc_score(y, s))
    assert got["tpr" + suffix] == pytest.approx(skm.recall_score(y, p))
    assert got["fpr" + suffix] == pytest.approx(fp / (fp + tn))
    assert got["accuracy" + suffix] == pytest.approx(skm.accuracy_score(y, p))
    assert got["ppr" + suffix] == pytest.approx((tp + fp) / mask.sum())
    assert got["n" + suffix] == mask.sum()
    assert got["n_pos" + suffix] == y.sum()
    # AUC by an independent route: U / (n_pos * n_neg).
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert got["auc" + suffix] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))
  assert set(got) == {
      f"{m}{sfx}" for m in fairness.METRICS + fairness.COUNTS for sfx in ("", "/g0", "/g1")
  }
  # The groups genuinely differ, so a per-group bug cannot hide.
  assert got["f1/g0"] != got["f1/g1"]


@pytest.mark.parametrize(
    "labels, pred",
    [
        ([0, 0, 0], [0, 0, 0]),  # no positives at all: f1, tpr undefined
        ([0, 0, 0], [1, 0, 0]),  # no positive label, one FP: f1 = 0
        ([1, 1, 0], [0, 0, 0]),  # no positive decision: precision undefined
        ([1, 1, 1], [1, 0, 1]),  # no negative label: fpr undefined
    ],
)
def test_edge_cases_follow_sklearn_zero_division_nan(labels, pred):
  labels, pred = np.array(labels), np.array(pred)
  got = fairness.classification_metrics(labels, pred, np.linspace(0, 1, 3))
  want_f1 = skm.f1_score(labels, pred, zero_division=np.nan)
  want_tpr = skm.recall_score(labels, pred, zero_division=np.nan)
  np.testing.assert_equal(got["f1"], want_f1)
  np.testing.assert_equal(got["tpr"], want_tpr)
  assert math.isnan(got["fpr"]) is bool((labels == 0).sum() == 0)
  # AUC is NaN exactly when the set lacks a label class.
  assert math.isnan(got["auc"]) is bool(np.unique(labels).size < 2)
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))


def test_single_class_group_has_nan_auc_and_empty_group_all_nan():
  labels = np.array([1, 1, 1, 0, 1, 0])
  pred = np.array([1, 0, 1, 0, 1, 1])
  score = np.array([0.9, 0.4, 0.8, 0.1, 0.7, 0.6])
  groups = np.array([0, 0, 0, 1, 1, 1])
  got = fairness.group_metrics(labels, pred, score, groups, group_ids=(0, 1, 2))
  assert math.isnan(got["auc/g0"])  # group 0 has positives only
  assert math.isnan(got["fpr/g0"])
  assert got["tpr/g0"] == pytest.approx(2 / 3)
  assert got["auc/g1"] == pytest.approx(1.0)
  assert not math.isnan(got["auc"])
  for m in fairness.METRICS:
    assert math.isnan(got[f"{m}/g2"]), m
  assert got["n/g2"] == 0 and got["n_pos/g2"] == 0


def test_group_metrics_reject_bad_input():
  labels, pred, score = np.array([0, 1]), np.array([0, 1]), np.array([0.2, 0.8])
  with pytest.raises(ValueError, match="group ids"):
    fairness.group_metrics(labels, pred, score, np.array([0, 3]))
  with pytest.raises(ValueError, match="0/1"):
    fairness.group_metrics(np.array([0, 2]), pred, score, np.array([0, 1]))
  with pytest.raises(ValueError, match="NaN"):
    fairness.group_metrics(labels, pred, np.array([0.2, np.nan]), np.array([0, 1]))


# --- SPLIT probe ----------------------------------------------------------


def _features(seed: int, n: int, d: int = 16, planted: bool = True):
  rng = np.random.default_rng(seed)
  attribute = rng.integers(0, 2, n)
  x = rng.normal(size=(n, d))
  if planted:
    direction = np.linspace(1.0, -0.5, d) / np.sqrt(d)
    x += 6.0 * np.outer(attribute - 0.5, direction)
  x[:, 0] *= 1000.0  # a badly scaled feature: standardisation must cope
  return x, attribute


def test_probe_recovers_planted_attribute_and_not_a_random_one():
  x_tr, a_tr = _features(0, 600)
  x_te, a_te = _features(1, 1000)
  planted = split_probe.split_probe(x_tr, a_tr, x_te, a_te)
  assert planted.auc > 0.95 and planted.accuracy > 0.85 and planted.converged
  x_tr, a_tr = _features(2, 600, planted=False)
  x_te, a_te = _features(3, 1000, planted=False)
  noise = split_probe.split_probe(x_tr, a_tr, x_te, a_te)
  assert 0.42 < noise.auc < 0.58  # 1000 test points: null sd ~ 0.018


def test_probe_is_deterministic_and_equals_the_sklearn_pipeline():
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  x_tr, a_tr = _features(4, 300)
  x_te, a_te = _features(5, 300)
  first = split_probe.split_probe(x_tr, a_tr, x_te, a_te, c=0.1)
  second = split_probe.split_probe(x_tr, a_tr, x_te, a_te, c=0.1)
  assert first == second
  scaler = StandardScaler().fit(x_tr)
  lr = LogisticRegression(C=0.1, max_iter=1000)
  lr.fit(scaler.transform(x_tr), a_tr)
  want = skm.roc_auc_score(a_te, lr.predict_proba(scaler.transform(x_te))[:, 1])
  assert first.auc == pytest.approx(want, abs=1e-12)
  # C matters: a much stronger penalty is a different (weaker-margin) fit.
  other = split_probe.split_probe(x_tr, a_tr, x_te, a_te, c=1e-4)
  assert other.n_iter != first.n_iter or other.auc != first.auc


def test_probe_errors_and_undefined_test_auc():
  x, a = _features(6, 100)
  with pytest.raises(DataError, match="single value"):
    split_probe.split_probe(x, np.zeros(100, int), x, a)
  single = split_probe.split_probe(x, a, x[a == 1], a[a == 1])
  assert math.isnan(single.auc) and 0.0 <= single.accuracy <= 1.0
  with pytest.raises(ValueError, match="dims"):
    split_probe.split_probe(x, a, x[:, :3], a)


def test_probe_reports_non_convergence_without_warning():
  x_tr, a_tr = _features(7, 300)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = split_probe.split_probe(x_tr, a_tr, x_tr, a_tr, max_iter=2)
  assert not result.converged and result.n_iter == 2


# --- statistics -----------------------------------------------------------


def test_delta_mean_and_unpaired_sd_with_ddof_1():
  biased = [0.60, 0.70, 0.65, np.nan]
  clean = [0.80, 0.90, 0.85, 0.75, 0.70]
  d = statistics.delta(biased, clean)
  b, c = np.array([0.60, 0.70, 0.65]), np.array(clean)
  assert d.mean == pytest.approx(b.mean() - c.mean())
  sd_b = math.sqrt(((b - b.mean()) ** 2).sum() / 2)
  sd_c = math.sqrt(((c - c.mean()) ** 2).sum() / 4)
  assert d.biased_sd == pytest.approx(sd_b)
  assert d.clean_sd == pytest.approx(sd_c)
  assert d.sd == pytest.approx(math.hypot(sd_b, sd_c))
  assert (d.n_biased, d.n_clean) == (3, 5)
  one = statistics.delta([0.5], clean)
  assert math.isnan(one.sd) and one.mean == pytest.approx(0.5 - c.mean())


def test_mann_whitney_matches_scipy_and_reports_its_method():
  rng = np.random.default_rng(0)
  b10, c10 = rng.normal(0.6, 0.05, 10), rng.normal(0.7, 0.05, 10)
  r = statistics.mann_whitney(b10, c10)
  want = stats.mannwhitneyu(b10, c10)
  assert (r.statistic, r.pvalue) == (want.statistic, want.pvalue)
  assert r.method == "asymptotic"  # 10 vs 10: scipy's auto is asymptotic
  assert r.pvalue == stats.mannwhitneyu(b10, c10, method="asymptotic").pvalue
  b5, c5 = b10[:5], c10[:5]
  r = statistics.mann_whitney(b5, c5)
  assert r.method == "exact" and r.n == (5, 5)
  assert r.pvalue == stats.mannwhitneyu(b5, c5, method="exact").pvalue
  tied = statistics.mann_whitney([0.5, 0.5, 0.6], [0.5, 0.7, 0.8])
  assert tied.method == "asymptotic"
  assert (
      tied.pvalue
      == stats.mannwhitneyu([0.5, 0.5, 0.6], [0.5, 0.7, 0.8], method="asymptotic").pvalue
  )
  # SS's mannwhitneyu(unbiased, biased, 'greater') is our 'less'.
  less = statistics.mann_whitney(b10, c10, alternative="less")
  assert less.pvalue == pytest.approx(stats.mannwhitneyu(c10, b10, alternative="greater").pvalue)
  assert less.pvalue < 0.05 < statistics.mann_whitney(b10, c10, alternative="greater").pvalue


def test_mann_whitney_drops_nan_and_gives_reason_when_empty():
  r = statistics.mann_whitney([0.1, np.nan, 0.3, 0.2], [0.5, 0.6, 0.7])
  assert r.n == (3, 3)
  assert r.pvalue == stats.mannwhitneyu([0.1, 0.3, 0.2], [0.5, 0.6, 0.7]).pvalue
  empty = statistics.mann_whitney([np.nan, np.nan], [0.5, 0.6])
  assert math.isnan(empty.pvalue) and empty.reason


def _holm_rejections(p: np.ndarray, alpha: float) -> np.ndarray:
  """Holm's step-down procedure as published, at level alpha."""
  order = np.argsort(p)
  reject = np.zeros(p.size, bool)
  for k, i in enumerate(order):
    if p[i] > alpha / (p.size - k):
      break
    reject[i] = True
  return reject


def test_holm_hand_cases_and_nan_exclusion():
  np.testing.assert_allclose(statistics.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(statistics.holm([0.5, 0.6]), [1.0, 1.0])
  np.testing.assert_allclose(statistics.holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])
  assert np.isnan(statistics.holm([np.nan, np.nan])).all()
  assert statistics.holm([]).shape == (0,)


def test_holm_equals_the_step_down_procedure():
  rng = np.random.default_rng(1)
  for _ in range(20):
    p = np.concatenate([rng.uniform(0, 0.05, 4), rng.uniform(0, 1, 7)])
    adjusted = statistics.holm(p)
    assert (adjusted >= p).all() and (adjusted <= 1).all()
    for alpha in (0.01, 0.02, 0.05, 0.1, 0.2):
      np.testing.assert_array_equal(adjusted <= alpha, _holm_rejections(p, alpha))


def test_holm_equals_statsmodels():
  multitest = pytest.importorskip("statsmodels.stats.multitest")
  rng = np.random.default_rng(2)
  p = np.concatenate([rng.uniform(0, 0.02, 3), rng.uniform(0, 1, 8), [0.5]])
  np.testing.assert_allclose(statistics.holm(p), multitest.multipletests(p, method="holm")[1])


def test_kendall_tau_matches_scipy_and_handles_degenerate_input():
  x = np.array([0.62, 0.71, 0.55, 0.93, 0.88, 0.97, 0.66, 0.59, 0.80, np.nan])
  y = np.array([0.60, 0.65, 0.58, 0.90, 0.91, 0.94, 0.61, 0.62, 0.70, 0.5])
  r = statistics.kendall_tau(x, y)
  want = stats.kendalltau(x[:-1], y[:-1])
  assert (r.statistic, r.pvalue, r.n) == (want.statistic, want.pvalue, (9,))
  assert r.method == "exact"
  assert r.pvalue == stats.kendalltau(x[:-1], y[:-1], method="exact").pvalue
  assert r.statistic > 0.6 and r.pvalue < 0.05
  xt = np.repeat(np.arange(20.0), 2)  # ties and n > 33: asymptotic
  yt = xt + np.tile([0.0, 0.5], 20)
  rt = statistics.kendall_tau(xt, yt)
  assert rt.method == "asymptotic"
  assert rt.pvalue == stats.kendalltau(xt, yt, method="asymptotic").pvalue
  xs = np.arange(40.0)  # n > 33, no ties, one discordant pair: exact
  ys = xs.copy()
  ys[[3, 4]] = ys[[4, 3]]
  rs = statistics.kendall_tau(xs, ys)
  assert rs.method == "exact"
  assert rs.pvalue == stats.kendalltau(xs, ys, method="exact").pvalue
  short = statistics.kendall_tau([0.1, 0.2, np.nan], [0.3, 0.4, 0.5])
  assert math.isnan(short.statistic) and "at least 3" in short.reason
  const = statistics.kendall_tau([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
  assert math.isnan(const.pvalue) and const.reason == "constant input"


def test_significance_marker():
  assert statistics.significance_marker(0.049) == "*"
  assert statistics.significance_marker(0.05) == ""
  assert statistics.significance_marker(math.nan) == ""
  assert statistics.markers([0.001, 0.2], alpha=0.01) == ["*", ""]
