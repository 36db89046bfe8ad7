"""Metrics against hand-made scores whose answers are known exactly (numpy only)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dicomnode.training.metrics import (
    BinaryCounts,
    auc,
    average_precision,
    binary_counts,
    bootstrap_ci,
    calibration,
    confusion_matrix,
    ece_noise_floor,
    f1_optimal_threshold,
    macro_auc,
    one_vs_rest_auc,
    pr_curve,
    roc_curve,
    threshold_for_sensitivity,
    top_label_calibration,
    wilson_interval,
)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return float(wins / (pos.size * neg.size))


def test_auc_of_separated_reversed_and_tied_scores() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    assert auc(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]) == 1.0
    assert auc(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]) == 0.0
    assert auc(y, [0.5] * 6) == 0.5
    assert auc([0, 0, 1, 1], [0.1, 0.8, 0.2, 0.9]) == 0.75
    assert auc([0, 1], [0.4, 0.4]) == 0.5


def test_auc_is_the_mann_whitney_probability_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        y[:2] = (0, 1)
        s = rng.integers(0, 6, 40) / 5.0  # many ties
        assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_is_undefined_for_one_class_and_refuses_bad_input() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        auc([0, 1], [0.1, 0.2, 0.3])


def test_bootstrap_interval_is_seeded_contains_the_value_and_narrows_with_data() -> None:
    rng = np.random.default_rng(0)

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat([0, 1], n)
        return y, rng.normal(y * 1.0, 1.0)

    y, s = data(30)
    first = bootstrap_ci(auc, y, s, n_boot=300, seed=5)
    assert first == bootstrap_ci(auc, y, s, n_boot=300, seed=5)
    assert first != bootstrap_ci(auc, y, s, n_boot=300, seed=6)
    assert first.lower <= first.value <= first.upper
    y_big, s_big = data(600)
    assert bootstrap_ci(auc, y_big, s_big, n_boot=300, seed=5).width < first.width / 2
    perfect = bootstrap_ci(auc, [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=50)
    assert (perfect.value, perfect.lower, perfect.upper) == (1.0, 1.0, 1.0)
    assert not bootstrap_ci(auc, [1, 1], [0.2, 0.3], n_boot=10).defined


def test_wilson_interval_known_values() -> None:
    none = wilson_interval(0, 10)
    assert none.value == 0.0 and none.lower == 0.0
    assert none.upper == pytest.approx(0.2775, abs=1e-4)
    eight = wilson_interval(8, 10)
    assert (eight.lower, eight.upper) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert math.isnan(wilson_interval(0, 0).value)


def test_binary_counts_and_ratios() -> None:
    y = [0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.6, 0.2, 0.9, 0.4, 0.8, 0.7]
    c = binary_counts(y, s, 0.5)
    assert c == BinaryCounts(tp=3, fp=1, tn=2, fn=1)
    assert (c.sensitivity, c.specificity, c.precision) == (0.75, 2 / 3, 0.75)
    assert c.f1 == pytest.approx(0.75)
    assert c.matrix().tolist() == [[2, 1], [1, 3]]
    assert math.isnan(binary_counts(y, s, 2.0).precision)  # nothing called positive


def test_confusion_matrix_rows_are_truth() -> None:
    m = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    assert m.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match=r"within 0\.\.2"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_roc_and_pr_curves() -> None:
    y = [0, 0, 1, 1]
    roc = roc_curve(y, [0.1, 0.4, 0.35, 0.8])
    assert roc.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert roc.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(auc(y, [0.1, 0.4, 0.35, 0.8]))
    pr = pr_curve(y, [0.1, 0.4, 0.35, 0.8])
    assert pr.recall[0] == 0.0 and pr.precision[0] == 1.0
    assert average_precision(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert average_precision(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx((1 + 2 / 3) / 2)


def test_operating_points() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.65, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95])
    sens = threshold_for_sensitivity(y, s, 0.9)
    assert sens.counts.sensitivity >= 0.9
    assert sens.counts.sensitivity == 1.0 and sens.counts.specificity == 0.75
    assert 0.3 < sens.threshold < 0.4  # between the lowest positive and the next score down
    strict = threshold_for_sensitivity(y, s, 0.5)
    assert strict.counts.sensitivity == 0.5 and strict.counts.specificity == 1.0
    f1 = f1_optimal_threshold(y, s)
    assert f1.counts.f1 == max(binary_counts(y, s, t).f1 for t in np.r_[s, 1.0])
    assert binary_counts(y, s, f1.threshold) == f1.counts


def test_ece_of_calibrated_predictions_is_near_zero_and_of_overconfident_is_the_gap() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(50_000)
    y = (rng.random(50_000) < p).astype(np.int64)
    assert calibration(y, p).ece < 0.01
    overconfident = calibration(np.repeat([0, 1], 50), np.full(100, 0.9))
    assert overconfident.ece == pytest.approx(0.4)
    assert sum(b.count for b in overconfident.bins) == 100
    with pytest.raises(ValueError, match="probabilities"):
        calibration([0, 1], [0.5, 1.5])


def test_multiclass_one_vs_rest_auc_and_top_label_calibration() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert one_vs_rest_auc(y, probs) == (1.0, 1.0, 1.0)
    assert macro_auc(y, probs) == 1.0
    reversed_probs = probs[:, ::-1]
    assert one_vs_rest_auc(y, reversed_probs)[1] == 1.0  # class 1 keeps its column
    assert top_label_calibration(y, probs).ece == pytest.approx(1 - (0.8 + 0.2 / 3))


def test_ece_noise_floor_shrinks_with_the_test_set_and_matches_a_calibrated_model() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (500, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    small, small_high = ece_noise_floor(probs, 100, draws=200)
    large, _ = ece_noise_floor(probs, 1000, draws=200)
    assert 0.0 < large < small <= small_high
    # a model whose probabilities are right by construction lands near the floor
    y = np.array([rng.choice(3, p=row) for row in probs[:100]])
    measured = top_label_calibration(y, probs[:100]).ece
    assert measured < 2.5 * small_high
    binary, _ = ece_noise_floor(rng.random(400), 150, draws=100)
    assert 0.0 < binary < 0.2
    with pytest.raises(ValueError):
        ece_noise_floor(probs, 0)
