"""Evaluation reports: loud warnings (collapse, tiny sets, flipped labels), card fields,
plots, multi-class and patient-level cross-validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from dicomnode.training.evaluate import (
    EvaluationWarning,
    cross_validate,
    evaluate,
    evaluate_binary,
    evaluate_multiclass,
    write_plots,
)


def _separable(n_per_class: int, seed: int = 0, shift: float = 2.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    logits = rng.normal(y * shift - shift / 2, 1.0)
    return y, 1 / (1 + np.exp(-logits))


def test_a_collapsed_model_is_reported_loudly() -> None:
    y = np.repeat([0, 1], 40)
    with pytest.warns(EvaluationWarning, match="predicts one class only"):
        report = evaluate_binary(y, np.full(80, 0.7), class_names=("healthy", "pd"),
                                 n_boot=50)
    assert any("one class only ('pd' for all 80" in w for w in report.warnings)
    assert report.auc.value == 0.5
    assert report.confusion.tolist() == [[0, 40], [0, 40]]


def test_a_small_set_is_reported_with_its_interval_width() -> None:
    y, s = _separable(8)
    with pytest.warns(EvaluationWarning, match="too small to trust"):
        report = evaluate_binary(y, s, dataset="test", n_boot=200)
    message = next(w for w in report.warnings if "too small" in w)
    assert "8 negative, 8 positive (< 30 per class)" in message
    assert f"AUC CI width {report.auc.width:.3f}" in message
    assert report.auc.width > 0.1
    assert report.to_dict()["auc_ci_width"] == pytest.approx(report.auc.width)


def test_an_auc_below_one_half_suggests_flipped_labels() -> None:
    y, s = _separable(40)
    with pytest.warns(EvaluationWarning, match="below 0.5"):
        report = evaluate_binary(y, 1 - s, n_boot=100)
    assert report.auc.value < 0.5


def test_a_sound_set_has_no_warnings_and_card_fields(recwarn: pytest.WarningsRecorder) -> None:
    y, s = _separable(60, seed=1)
    thresholds = {"screening": 0.3}
    report = evaluate_binary(y, s, class_names=("normal", "pneumonia"), dataset="test",
                             thresholds=thresholds, n_boot=300)
    assert not report.warnings and report.trustworthy
    assert not [w for w in recwarn if issubclass(w.category, EvaluationWarning)]
    assert 0.8 < report.auc.value <= 1.0
    point = report.operating_point("screening")
    assert point.threshold == 0.3 and point.selected_on == "validation"
    assert point.counts.sensitivity == np.mean(s[y == 1] >= 0.3)
    names = {p.name for p in report.operating_points}
    assert {"f1-optimal (this data)", "sensitivity-0.9 (this data)"} <= names
    metrics = {m.name: m for m in report.card_metrics()}
    assert set(metrics) == {"auc", "sensitivity@screening", "specificity@screening", "ece"}
    for metric in metrics.values():
        assert metric.ci_lower <= metric.value <= metric.ci_upper
    points = report.card_operating_points("logits", class_name="pneumonia")
    assert [p.name for p in points] == ["screening"]  # "this data" points never reach a card
    assert points[0].sensitivity == point.counts.sensitivity
    data = json.loads(report.to_json())
    assert data["class_counts"] == {"normal": 60, "pneumonia": 60}
    assert "NaN" not in report.to_json()
    assert "AUC" in report.format_text() and "WARNING" not in report.format_text()


def test_one_class_only_makes_the_auc_undefined() -> None:
    with pytest.warns(EvaluationWarning, match="only one class"):
        report = evaluate_binary(np.ones(40, dtype=int), np.linspace(0.1, 0.9, 40), n_boot=20)
    assert not report.auc.defined
    assert report.to_dict()["auc"]["value"] is None


def test_multiclass_report() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    logits = np.eye(3)[y] * 3 + rng.normal(0, 1, (120, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = evaluate_multiclass(y, probs, class_names=("healthy", "benign", "malignant"),
                                 n_boot=100)
    assert report.kind == "multiclass" and not report.warnings
    assert len(report.per_class_auc) == 3
    assert report.auc.value == pytest.approx(np.mean([i.value for i in report.per_class_auc]))
    assert report.confusion.sum() == 120 and np.trace(report.confusion) > 90
    assert {m.name for m in report.card_metrics()} >= {"macro_auc", "auc_benign"}
    with pytest.warns(EvaluationWarning, match="one class only"):
        collapsed = evaluate(y, np.tile([0.2, 0.5, 0.3], (120, 1)),
                             class_names=("healthy", "benign", "malignant"), n_boot=20)
    assert collapsed.predicted_counts == {"healthy": 0, "benign": 120, "malignant": 0}


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    y, s = _separable(40)
    report = evaluate_binary(y, s, thresholds={"t": 0.5}, n_boot=50)
    paths = write_plots(report, tmp_path)
    assert [p.name for p in paths] == ["roc.png", "pr.png", "reliability.png"]
    for path in paths:
        image = cv2.imread(str(path))
        assert image is not None and image.shape == (520, 520, 3)
        assert (image < 250).any()  # something was drawn


def test_cross_validation_splits_by_patient() -> None:
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3:02d}" for i in range(60)]  # 3 images per patient
    y = np.array([int(p[1:]) % 2 for p in patients])
    feature = y + rng.normal(0, 0.6, 60)
    seen: list[tuple[set[str], set[str]]] = []

    def fit_predict(train: np.ndarray, val: np.ndarray) -> np.ndarray:
        seen.append(({patients[i] for i in train}, {patients[i] for i in val}))
        scores: np.ndarray = 1 / (1 + np.exp(-(feature[val] - 0.5) * 3))
        return scores

    report = cross_validate(fit_predict, y, patients, class_names=("a", "b"), k=4, seed=0,
                            n_boot=50, min_per_class=5)
    assert len(report.folds) == 4 and sum(f.n_val for f in report.folds) == 60
    for train, val in seen:
        assert not train & val
    assert report.pooled.n == 60
    assert 0.7 < report.mean_auc <= 1.0 and math.isfinite(report.sd_auc)
    assert "4-fold" in report.format_text()
