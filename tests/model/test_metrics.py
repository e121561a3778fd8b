from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from model.metrics import (
    BinaryMetrics,
    binary_metrics,
    delong_auc_variance,
    delong_ci,
    format_table,
    plot_roc,
    roc_curve,
    youden_cutoff,
)

# Hanley & McNeil (1982), Radiology 143:29-36, Table 1: CT ratings 1..5 of
# 58 normal and 51 abnormal cases.
HM_NORMAL_COUNTS = (33, 6, 6, 11, 2)
HM_ABNORMAL_COUNTS = (3, 2, 2, 11, 33)


def hanley_mcneil_data() -> tuple[np.ndarray, np.ndarray]:
    ratings = np.arange(1, 6)
    neg = np.repeat(ratings, HM_NORMAL_COUNTS)
    pos = np.repeat(ratings, HM_ABNORMAL_COUNTS)
    labels = np.concatenate([np.zeros(neg.size, int), np.ones(pos.size, int)])
    return labels, np.concatenate([neg, pos]).astype(float)


def brute_force_delong(labels, scores) -> tuple[float, float]:
    """DeLong et al. (1988) straight from the definition, with explicit loops.

    psi(x, y) = 1 if x > y, 1/2 if x == y, else 0; V10(x_i) is the mean of psi over
    the negatives, V01(y_j) the mean over the positives; var = S10/m + S01/n.
    """
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    m, n = len(pos), len(neg)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [sum(psi(x, y) for y in neg) / n for x in pos]
    v01 = [sum(psi(x, y) for x in pos) / m for y in neg]
    auc = sum(v10) / m
    s10 = sum((v - auc) ** 2 for v in v10) / (m - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (n - 1)
    return auc, s10 / m + s01 / n


def test_delong_hanley_mcneil_published_example():
    """Hanley & McNeil (1982) CT data against two published results.

    - AUC: Hanley & McNeil, Radiology 1982;143:29-36, report the trapezoidal
      area 0.893 for these ratings (= 2642/2958 = 0.8932).
    - DeLong SE and 95% CI: the Stata Base Reference Manual, [R] roctab,
      Example 1 (``webuse hanley``, ``roctab disease rating``), whose default
      standard error is DeLong, DeLong & Clarke-Pearson (1988): ROC area
      0.8932, Std. Err. 0.0307, asymptotic normal 95% CI 0.83295 to 0.95339.
      These are asserted only to the digits Stata prints.
    """
    labels, scores = hanley_mcneil_data()
    auc, var = delong_auc_variance(labels, scores)
    assert auc == pytest.approx(2642 / 2958, abs=1e-12)
    assert round(auc, 3) == 0.893
    assert round(auc, 4) == 0.8932
    assert round(math.sqrt(var), 4) == 0.0307
    auc_ci, low, high = delong_ci(labels, scores)
    assert auc_ci == auc
    assert round(low, 5) == 0.83295
    assert round(high, 5) == 0.95339
    met = binary_metrics(labels, scores)
    assert (met.n, met.positives, met.negatives) == (109, 51, 58)
    assert met.auc_se == pytest.approx(math.sqrt(var), rel=1e-12)


def test_delong_matches_brute_force_with_ties():
    labels, scores = hanley_mcneil_data()
    assert delong_auc_variance(labels, scores) == pytest.approx(brute_force_delong(labels, scores), rel=1e-12)

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    labels[:2] = (0, 1)
    scores = rng.integers(0, 6, 60) / 5.0 + 0.2 * labels  # heavy ties, some signal
    assert delong_auc_variance(labels, scores) == pytest.approx(brute_force_delong(labels, scores), rel=1e-12)


def test_delong_no_ties_equals_placement_value_formula():
    """Without ties the DeLong components are the placement values.

    Each responder's placement is the share of non-responders scored below it, each
    non-responder's is the share of responders scored above it; the AUC is their
    mean (the Mann-Whitney U / mn) and the variance their sample variances over
    m and n.
    """
    rng = np.random.default_rng(11)
    pos, neg = rng.normal(0.8, 1.0, 17), rng.normal(0.0, 1.0, 23)
    labels = np.r_[np.ones(17, int), np.zeros(23, int)]
    scores = np.r_[pos, neg]
    assert np.unique(scores).size == scores.size

    place_pos = (neg[None, :] < pos[:, None]).mean(axis=1)
    place_neg = (pos[None, :] > neg[:, None]).mean(axis=1)
    expected_var = place_pos.var(ddof=1) / 17 + place_neg.var(ddof=1) / 23

    auc, var = delong_auc_variance(labels, scores)
    assert auc == pytest.approx(place_pos.mean(), abs=1e-12)
    assert auc == pytest.approx(mannwhitneyu(pos, neg).statistic / (17 * 23), abs=1e-12)
    assert var == pytest.approx(expected_var, rel=1e-12)


def test_perfect_separation():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    auc, var = delong_auc_variance(labels, scores)
    assert (auc, var) == (1.0, 0.0)
    assert delong_ci(labels, scores) == (1.0, 1.0, 1.0)
    met = binary_metrics(labels, scores)
    assert met.cutoff == 0.6
    assert (met.tp, met.fp, met.tn, met.fn) == (3, 0, 3, 0)
    assert met.accuracy == met.sensitivity == met.specificity == met.f1 == 1.0
    assert met.plr == math.inf
    assert met.nlr == 0.0
    assert met.to_json()["plr"] is None


def test_reversed_scores():
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    assert delong_auc_variance(labels, scores) == (0.0, 0.0)
    assert delong_ci(labels, scores) == (0.0, 0.0, 0.0)


def test_hand_computed_confusion_matrix():
    """23 patients, cutoff 0.5: TP 11, FN 2, TN 7, FP 3.

    Its rounded macro figures (accuracy 0.78, recall 0.77, precision 0.78, F1 0.78)
    have the same values as the paper's Table 2, which support-weighted averages
    could not give (weighted recall is always the accuracy).
    """
    labels = [1] * 13 + [0] * 10
    scores = [0.9] * 11 + [0.2] * 2 + [0.7] * 3 + [0.1] * 7
    met = binary_metrics(labels, scores, cutoff=0.5)
    assert (met.tp, met.fn, met.tn, met.fp) == (11, 2, 7, 3)
    assert met.cutoff == 0.5
    sens, spec, ppv, npv = 11 / 13, 7 / 10, 11 / 14, 7 / 9
    assert met.accuracy == pytest.approx(18 / 23)
    assert met.sensitivity == pytest.approx(sens)
    assert met.specificity == pytest.approx(spec)
    assert met.ppv == pytest.approx(ppv)
    assert met.npv == pytest.approx(npv)
    assert met.recall == pytest.approx((sens + spec) / 2)
    assert met.precision == pytest.approx((ppv + npv) / 2)
    f1_pos, f1_neg = 2 * ppv * sens / (ppv + sens), 2 * npv * spec / (npv + spec)
    assert f1_pos == pytest.approx(22 / 27) and f1_neg == pytest.approx(14 / 19)
    assert met.f1 == pytest.approx((f1_pos + f1_neg) / 2)
    assert met.plr == pytest.approx(sens / (1 - spec)) and met.plr == pytest.approx(110 / 39)
    assert met.nlr == pytest.approx((1 - sens) / spec) and met.nlr == pytest.approx(20 / 91)
    assert met.auc == pytest.approx((11 * 10 + 2 * 7) / 130)
    assert [round(v, 2) for v in (met.accuracy, met.recall, met.precision, met.f1)] == [0.78, 0.77, 0.78, 0.78]

    table = format_table(met, title="Test set")
    assert table.splitlines()[0] == "Test set"
    for needle in ("AUC (95% CI)", "Accuracy", "0.78", "0.77", "PLR", "2.82", "NLR", "0.22",
                   "Cutoff", "0.50", "Sensitivity", "Specificity", "PPV", "NPV", "11 / 3 / 7 / 2"):
        assert needle in table


def test_plr_infinite_when_specificity_is_one():
    met = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.9], cutoff=0.5)
    assert (met.tp, met.fp, met.tn, met.fn) == (1, 0, 2, 1)
    assert met.specificity == 1.0
    assert met.plr == math.inf
    assert met.nlr == pytest.approx(0.5)
    data = met.to_json()
    assert data["plr"] is None and data["nlr"] == 0.5
    json.dumps(data, allow_nan=False)


def test_to_json_has_every_field_and_plain_values():
    met = binary_metrics([0, 1, 0, 1, 1, 0], [0.2, 0.8, 0.4, 0.35, 0.9, 0.1])
    data = met.to_json()
    assert set(data) == {f.name for f in dataclasses.fields(BinaryMetrics)}
    assert all(v is None or type(v) in (int, float) for v in data.values())
    json.dumps(data, allow_nan=False)


def test_undefined_ppv_without_predicted_responders():
    met = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], cutoff=0.9)
    assert (met.tp, met.fp) == (0, 0)
    assert math.isnan(met.ppv) and math.isnan(met.precision)
    assert met.to_json()["ppv"] is None
    assert "n/a" in format_table(met)


def test_single_case_class_gives_nan_variance():
    auc, var = delong_auc_variance([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3])
    assert auc == 1.0 and math.isnan(var)
    met = binary_metrics([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3])
    assert met.to_json()["auc_se"] is None


def test_youden_cutoff_unique_maximum():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8]
    # J by threshold: 0.8 .25, 0.7 .5, 0.6 .25, 0.5 .5, 0.4 .75, 0.3 .5, 0.2 .25, 0.1 0.
    assert youden_cutoff(labels, scores) == 0.4
    assert binary_metrics(labels, scores).cutoff == 0.4


def test_youden_cutoff_ties_take_the_larger_threshold():
    # J is 0.5 both at 0.9 and at 0.3.
    assert youden_cutoff([0, 0, 1, 1], [0.1, 0.5, 0.3, 0.9]) == 0.9


def test_roc_curve_points_and_area():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9]
    fpr, tpr, thr = roc_curve(labels, scores)
    assert thr[0] == math.inf
    np.testing.assert_array_equal(thr[1:], [0.9, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    auc, _ = delong_auc_variance(labels, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc)


def test_lists_and_arrays_agree_and_alpha_widens():
    labels, scores = hanley_mcneil_data()
    assert delong_ci(labels.tolist(), scores.tolist()) == delong_ci(labels, scores)
    assert delong_ci(labels.astype(bool), scores) == delong_ci(labels, scores)
    _, lo90, hi90 = delong_ci(labels, scores, alpha=0.10)
    _, lo95, hi95 = delong_ci(labels, scores)
    assert lo95 < lo90 < hi90 < hi95
    met = binary_metrics(labels, scores, alpha=0.10)
    assert met.ci_level == pytest.approx(0.90) and "AUC (90% CI)" in format_table(met)


BAD_INPUTS = [
    pytest.param([0, 2, 1], [0.1, 0.2, 0.3], "0 .*or 1", id="label-not-binary"),
    pytest.param([0, -1, 1], [0.1, 0.2, 0.3], "0 .*or 1", id="label-negative"),
    pytest.param([0, 0.5, 1], [0.1, 0.2, 0.3], "0 .*or 1", id="label-fraction"),
    pytest.param(["a", "b"], [0.1, 0.2], "0 .*or 1", id="label-string"),
    pytest.param([0, 1, 1], [0.1, 0.2], "length", id="length-mismatch"),
    pytest.param([0, 1, 1], [0.1, float("nan"), 0.3], "finite", id="score-nan"),
    pytest.param([0, 1, 1], [0.1, float("inf"), 0.3], "finite", id="score-inf"),
    pytest.param([0, 1], ["x", "y"], "numeric", id="score-string"),
    pytest.param([1, 1, 1], [0.1, 0.2, 0.3], "both classes", id="only-responders"),
    pytest.param([0, 0], [0.1, 0.2], "both classes", id="only-non-responders"),
    pytest.param([], [], "both classes", id="empty"),
]


@pytest.mark.parametrize("func", [delong_auc_variance, delong_ci, roc_curve, youden_cutoff, binary_metrics])
@pytest.mark.parametrize(("labels", "scores", "match"), BAD_INPUTS)
def test_bad_input_raises_value_error(func, labels, scores, match):
    with pytest.raises(ValueError, match=match):
        func(labels, scores)


def test_bad_alpha_raises():
    with pytest.raises(ValueError, match="alpha"):
        delong_ci([0, 1], [0.1, 0.9], alpha=1.5)


def test_plot_roc_writes_png(tmp_path):
    labels, scores = hanley_mcneil_data()
    out = tmp_path / "roc.png"
    plot_roc(labels, scores, out, title="Hanley & McNeil CT")
    data = out.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"

    fixed = tmp_path / "roc_fixed.png"
    plot_roc(labels.tolist(), scores.tolist(), str(fixed), cutoff=3.0)
    assert fixed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
