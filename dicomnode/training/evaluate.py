"""Evaluation reports that say how far to trust them, and say it loudly.

The seeds failed quietly: a DaT model predicted one class for every scan and reported a
test AUC of 0.25 from four cases (seed 000); thresholds were chosen on a 16-image
validation folder; headline accuracies came without intervals (seed 003). A report here
therefore carries intervals for every headline number and a ``warnings`` list, and each
warning is also raised as an :class:`EvaluationWarning`, for:

* a model that predicts one class only (collapse),
* a set too small to trust (fewer than ``min_per_class`` cases of a class; the AUC
  interval width is quoted),
* an AUC below 0.5 (labels or the positive class probably flipped),
* a set with one class only (AUC undefined).

Thresholds chosen on one set (validation) are *measured* on another (test) via
``thresholds=``; thresholds optimised on the evaluated data itself are reported too,
marked as optimistic. :func:`evaluate_package` scores a model package the way the node
serves it: the card's spec through ``apply_spec``, then ONNX Runtime. Plots are drawn
with OpenCV (no matplotlib). numpy, OpenCV and onnxruntime only; no torch.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicomnode.inference.package import Metric, ModelPackage, OperatingPoint, load_package
from dicomnode.training.metrics import (
    BinaryCounts,
    Calibration,
    Interval,
    PrCurve,
    RocCurve,
    ThresholdChoice,
    auc,
    average_precision,
    binary_counts,
    bootstrap_ci,
    calibration,
    check_binary,
    confusion_matrix,
    f1_optimal_threshold,
    macro_auc,
    one_vs_rest_auc,
    pr_curve,
    roc_curve,
    threshold_for_sensitivity,
    top_label_calibration,
)
from dicomnode.training.splits import stratified_k_fold

__all__ = [
    "MIN_PER_CLASS",
    "CrossValidationReport",
    "EvaluationReport",
    "EvaluationWarning",
    "FoldResult",
    "OperatingPointResult",
    "PackageScores",
    "choose_thresholds",
    "cross_validate",
    "evaluate",
    "evaluate_binary",
    "evaluate_multiclass",
    "evaluate_package",
    "score_package",
    "write_plots",
]

#: Fewer cases of a class than this and a report says its numbers cannot be trusted.
MIN_PER_CLASS = 30


class EvaluationWarning(UserWarning):
    """Something about the data or the predictions makes the metrics misleading."""


@dataclass(frozen=True)
class OperatingPointResult:
    """A threshold, where it was chosen, and what it gives on the evaluated data."""

    name: str
    threshold: float
    selected_on: str
    counts: BinaryCounts
    sensitivity: Interval
    specificity: Interval

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "selected_on": self.selected_on,
                "sensitivity": self.sensitivity.to_dict(),
                "specificity": self.specificity.to_dict(), "counts": self.counts.to_dict()}


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    """Everything an evaluation found; see the module docstring for the warnings."""

    dataset: str
    kind: Literal["binary", "multiclass"]
    class_names: tuple[str, ...]
    class_counts: Mapping[str, int]
    predicted_counts: Mapping[str, int]
    auc: Interval
    per_class_auc: tuple[Interval, ...]
    average_precision: float
    accuracy: float
    confusion: NDArray[np.int64]
    threshold: float | None
    per_class: tuple[BinaryCounts, ...]
    operating_points: tuple[OperatingPointResult, ...]
    calibration: Calibration
    ece: Interval
    roc: tuple[RocCurve, ...]
    pr: tuple[PrCurve, ...]
    warnings: tuple[str, ...]
    min_per_class: int = MIN_PER_CLASS
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(sum(self.class_counts.values()))

    @property
    def trustworthy(self) -> bool:
        return not self.warnings

    def operating_point(self, name: str) -> OperatingPointResult:
        for point in self.operating_points:
            if point.name == name:
                return point
        raise KeyError(f"no operating point {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "kind": self.kind,
            "n": self.n,
            "class_names": list(self.class_names),
            "class_counts": dict(self.class_counts),
            "predicted_counts": dict(self.predicted_counts),
            "auc": self.auc.to_dict(),
            "auc_ci_width": _finite_or_none(self.auc.width),
            "per_class_auc": {c: i.to_dict() for c, i in
                              zip(self.class_names, self.per_class_auc, strict=False)},
            "average_precision": _finite_or_none(self.average_precision),
            "accuracy": _finite_or_none(self.accuracy),
            "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                                 "matrix": self.confusion.tolist()},
            "threshold": self.threshold,
            "per_class": {c: counts.to_dict() for c, counts in
                          zip(self._per_class_names(), self.per_class, strict=True)},
            "operating_points": [p.to_dict() for p in self.operating_points],
            "calibration": self.calibration.to_dict(),
            "ece": self.ece.to_dict(),
            "roc": [r.to_dict() for r in self.roc],
            "pr": [p.to_dict() for p in self.pr],
            "warnings": list(self.warnings),
            "min_per_class": self.min_per_class,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _per_class_names(self) -> tuple[str, ...]:
        return (self.class_names[-1],) if self.kind == "binary" else self.class_names

    def format_text(self) -> str:
        """A report for a terminal: the numbers, the intervals, then the warnings."""
        counts = ", ".join(f"{c} {n}" for c, n in self.class_counts.items())
        lines = [f"evaluation on {self.dataset or 'data'}: {self.n} cases ({counts})"]
        if self.kind == "binary":
            lines.append(f"  AUC {self.auc} ({self.auc.level:.0%} CI width "
                         f"{_fmt(self.auc.width)}), average precision "
                         f"{_fmt(self.average_precision)}")
            if self.per_class and self.threshold is not None:
                c = self.per_class[0]
                lines.append(
                    f"  at threshold {self.threshold:g}: sensitivity {_fmt(c.sensitivity)}, "
                    f"specificity {_fmt(c.specificity)}, precision {_fmt(c.precision)}, "
                    f"F1 {_fmt(c.f1)}, accuracy {_fmt(c.accuracy)}")
        else:
            lines.append(f"  macro one-vs-rest AUC {self.auc}, accuracy {_fmt(self.accuracy)}")
            for name, interval, c in zip(self.class_names, self.per_class_auc, self.per_class,
                                         strict=True):
                lines.append(f"    {name}: AUC {interval}, sensitivity {_fmt(c.sensitivity)}, "
                             f"specificity {_fmt(c.specificity)}, F1 {_fmt(c.f1)}")
        lines.append(f"  confusion matrix (rows true, columns predicted: "
                     f"{', '.join(self.class_names)}):")
        lines.extend("    " + " ".join(f"{v:6d}" for v in row) for row in self.confusion)
        lines.append(f"  calibration: ECE {self.ece} over {len(self.calibration.bins)} bins "
                     f"({self.calibration.what})")
        for p in self.operating_points:
            lines.append(f"  operating point {p.name}: threshold {p.threshold:.4f} "
                         f"(chosen on {p.selected_on}): sensitivity {p.sensitivity}, "
                         f"specificity {p.specificity}")
        for message in self.warnings:
            lines.append(f"  WARNING: {message}")
        return "\n".join(lines)

    def card_metrics(self, *, dataset: str | None = None) -> list[Metric]:
        """The held-out metrics for a model card (only those with an interval)."""
        where = dataset if dataset is not None else self.dataset
        metrics: list[Metric] = []

        def add(name: str, interval: Interval) -> None:
            if interval.defined and math.isfinite(interval.lower):
                metrics.append(Metric(name, interval.value, interval.lower, interval.upper,
                                      interval.level, interval.method, where))

        add("auc" if self.kind == "binary" else "macro_auc", self.auc)
        if self.kind == "multiclass":
            for name, interval in zip(self.class_names, self.per_class_auc, strict=True):
                add(f"auc_{name}", interval)
        for point in self.operating_points:
            if point.selected_on != "this data":
                add(f"sensitivity@{point.name}", point.sensitivity)
                add(f"specificity@{point.name}", point.specificity)
        add("ece", self.ece)
        return metrics

    def card_operating_points(
        self, output: str, *, class_name: str | None = None, dataset: str | None = None
    ) -> list[OperatingPoint]:
        """Operating points chosen elsewhere, with the sens/spec measured here."""
        where = dataset if dataset is not None else self.dataset
        return [
            OperatingPoint(p.name, output, p.threshold, p.counts.sensitivity,
                           p.counts.specificity, class_name, "probability",
                           f"{where} (threshold chosen on {p.selected_on})")
            for p in self.operating_points
            if p.selected_on != "this data" and math.isfinite(p.counts.sensitivity)
            and math.isfinite(p.counts.specificity)
        ]


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _warn(messages: list[str], message: str, *, stacklevel: int = 3) -> None:
    messages.append(message)
    warnings.warn(message, EvaluationWarning, stacklevel=stacklevel)


def _size_warnings(messages: list[str], class_counts: Mapping[str, int], width: float,
                   min_per_class: int, dataset: str) -> None:
    small = {c: n for c, n in class_counts.items() if 0 < n < min_per_class}
    if small:
        shown = ", ".join(f"{n} {c}" for c, n in small.items())
        _warn(messages, f"{dataset or 'the set'} is too small to trust: {shown} "
                        f"(< {min_per_class} per class); AUC CI width "
                        f"{_fmt(width)}", stacklevel=4)


def choose_thresholds(
    y_true: ArrayLike, scores: ArrayLike, *, sensitivity_target: float = 0.9
) -> dict[str, ThresholdChoice]:
    """F1-optimal and sensitivity-target thresholds on this data (typically validation)."""
    y, s = check_binary(y_true, scores)
    if y.sum() == 0 or y.sum() == y.size:
        return {}
    f1 = f1_optimal_threshold(y, s)
    sens = threshold_for_sensitivity(y, s, sensitivity_target)
    return {"f1-optimal": f1, f"sensitivity-{sensitivity_target:g}": sens}


def evaluate_binary(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    class_names: Sequence[str] = ("negative", "positive"),
    dataset: str = "",
    threshold: float = 0.5,
    thresholds: Mapping[str, float] | None = None,
    thresholds_from: str = "validation",
    sensitivity_target: float = 0.9,
    n_boot: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
    min_per_class: int = MIN_PER_CLASS,
    n_bins: int = 10,
) -> EvaluationReport:
    """Evaluate P(positive) ``scores`` against 0/1 labels.

    ``thresholds`` (name -> threshold) were chosen on other data (``thresholds_from``)
    and are measured here; the F1-optimal and sensitivity-target thresholds of *this*
    data are added as "this data" points (optimistic: chosen and measured on one set).
    """
    y, s = check_binary(y_true, scores)
    if len(class_names) != 2:
        raise ValueError("binary evaluation needs two class names (negative, positive)")
    if (s < 0).any() or (s > 1).any():
        raise ValueError("scores must be probabilities in [0, 1] (apply the sigmoid first)")
    names = tuple(class_names)
    counts = {names[0]: int((y == 0).sum()), names[1]: int((y == 1).sum())}
    messages: list[str] = []
    auc_ci = bootstrap_ci(lambda yy, ss: auc(yy, ss), y, s, n_boot=n_boot, level=ci_level,
                          seed=seed)
    at = binary_counts(y, s, threshold)
    predicted = {names[0]: at.tn + at.fn, names[1]: at.tp + at.fp}
    if counts[names[0]] == 0 or counts[names[1]] == 0:
        _warn(messages, f"{dataset or 'the set'} has only one class "
                        f"({', '.join(f'{c} {n}' for c, n in counts.items())}); AUC undefined")
    if y.size and (float(np.ptp(s)) < 1e-6 or min(predicted.values()) == 0):
        only = max(predicted, key=lambda c: predicted[c])
        spread = f"scores span only {float(np.ptp(s)):.2g}" if float(np.ptp(s)) < 1e-6 else (
            f"at threshold {threshold:g}")
        _warn(messages, f"the model predicts one class only ({only!r} for all {y.size} "
                        f"cases, {spread}): collapsed to a trivial solution")
    if auc_ci.defined and auc_ci.value < 0.5:
        _warn(messages, f"AUC {auc_ci.value:.3f} is below 0.5: the model ranks "
                        f"{names[0]!r} above {names[1]!r}; are the labels or the positive "
                        "class flipped?")
    _size_warnings(messages, counts, auc_ci.width, min_per_class, dataset)
    points: list[OperatingPointResult] = []
    for name, value in (thresholds or {}).items():
        c = binary_counts(y, s, value)
        points.append(OperatingPointResult(name, float(value), thresholds_from, c,
                                           c.sensitivity_ci(ci_level),
                                           c.specificity_ci(ci_level)))
    for name, choice in choose_thresholds(y, s, sensitivity_target=sensitivity_target).items():
        c = choice.counts
        points.append(OperatingPointResult(f"{name} (this data)", choice.threshold,
                                           "this data", c, c.sensitivity_ci(ci_level),
                                           c.specificity_ci(ci_level)))
    cal = calibration(y, s, n_bins=n_bins)
    ece_ci = bootstrap_ci(lambda yy, ss: calibration(yy, ss, n_bins=n_bins).ece, y, s,
                          n_boot=max(200, n_boot // 4), level=ci_level, seed=seed)
    both = counts[names[0]] > 0 and counts[names[1]] > 0
    return EvaluationReport(
        dataset=dataset,
        kind="binary",
        class_names=names,
        class_counts=counts,
        predicted_counts=predicted,
        auc=auc_ci,
        per_class_auc=(),
        average_precision=average_precision(y, s) if counts[names[1]] else float("nan"),
        accuracy=at.accuracy,
        confusion=at.matrix(),
        threshold=threshold,
        per_class=(at,),
        operating_points=tuple(points),
        calibration=cal,
        ece=ece_ci,
        roc=(roc_curve(y, s),) if both else (),
        pr=(pr_curve(y, s),) if counts[names[1]] else (),
        warnings=tuple(messages),
        min_per_class=min_per_class,
    )


def _class_auc(index: int) -> Callable[[NDArray[np.int64], NDArray[np.float64]], float]:
    def statistic(y: NDArray[np.int64], probs: NDArray[np.float64]) -> float:
        return auc((y == index).astype(np.int64), probs[:, index])

    return statistic


def evaluate_multiclass(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    class_names: Sequence[str],
    dataset: str = "",
    n_boot: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    min_per_class: int = MIN_PER_CLASS,
    n_bins: int = 10,
) -> EvaluationReport:
    """One-vs-rest AUC per class and macro-averaged, arg-max confusion matrix, top-label ECE."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape != (y.shape[0], k):
        raise ValueError(f"probabilities must be (N, {k}); got {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1] (apply the softmax)")
    names = tuple(class_names)
    messages: list[str] = []
    counts = {c: int((y == i).sum()) for i, c in enumerate(names)}
    predicted_index = probs.argmax(axis=1)
    predicted = {c: int((predicted_index == i).sum()) for i, c in enumerate(names)}
    matrix = confusion_matrix(y, predicted_index, k)
    macro = bootstrap_ci(lambda yy, pp: macro_auc(yy, pp), y, probs, n_boot=n_boot,
                         level=ci_level, seed=seed)
    per_class_auc = tuple(bootstrap_ci(_class_auc(i), y, probs, n_boot=n_boot, level=ci_level,
                                       seed=seed) for i in range(k))
    per_class = tuple(
        BinaryCounts(tp=int(matrix[i, i]), fp=int(matrix[:, i].sum() - matrix[i, i]),
                     fn=int(matrix[i, :].sum() - matrix[i, i]),
                     tn=int(matrix.sum() - matrix[i, :].sum() - matrix[:, i].sum()
                            + matrix[i, i]))
        for i in range(k)
    )
    absent = [c for c, n in counts.items() if n == 0]
    if absent:
        _warn(messages, f"{dataset or 'the set'} has no cases of {absent}; their AUC is undefined")
    if y.size and sum(1 for n in predicted.values() if n) == 1:
        only = max(predicted, key=lambda c: predicted[c])
        _warn(messages, f"the model predicts one class only ({only!r} for all {y.size} cases): "
                        "collapsed to a trivial solution")
    for name, interval in zip(names, per_class_auc, strict=True):
        if interval.defined and interval.value < 0.5:
            _warn(messages, f"one-vs-rest AUC of {name!r} is {interval.value:.3f} (< 0.5): "
                            "are the class indices in the right order?")
    _size_warnings(messages, counts, macro.width, min_per_class, dataset)
    cal = top_label_calibration(y, probs, n_bins=n_bins)
    ece_ci = bootstrap_ci(lambda yy, pp: top_label_calibration(yy, pp, n_bins=n_bins).ece,
                          y, probs, n_boot=max(200, n_boot // 4), level=ci_level, seed=seed)
    rocs = tuple(roc_curve((y == i).astype(np.int64), probs[:, i]) for i in range(k)
                 if 0 < counts[names[i]] < y.size)
    prs = tuple(pr_curve((y == i).astype(np.int64), probs[:, i]) for i in range(k)
                if counts[names[i]])
    ap_values = [average_precision((y == i).astype(np.int64), probs[:, i]) for i in range(k)
                 if counts[names[i]]]
    return EvaluationReport(
        dataset=dataset,
        kind="multiclass",
        class_names=names,
        class_counts=counts,
        predicted_counts=predicted,
        auc=macro,
        per_class_auc=per_class_auc,
        average_precision=float(np.mean(ap_values)) if ap_values else float("nan"),
        accuracy=float(np.trace(matrix) / max(1, y.size)),
        confusion=matrix,
        threshold=None,
        per_class=per_class,
        operating_points=(),
        calibration=cal,
        ece=ece_ci,
        roc=rocs,
        pr=prs,
        warnings=tuple(messages),
        min_per_class=min_per_class,
        extra={"one_vs_rest_auc": [_finite_or_none(v) for v in one_vs_rest_auc(y, probs)]},
    )


def evaluate(
    y_true: ArrayLike, scores: ArrayLike, *, class_names: Sequence[str], **options: Any
) -> EvaluationReport:
    """Binary for (N,) scores or two classes given as (N, 2); multi-class otherwise."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2 and len(class_names) == 2:
        s = s[:, 1]
    if s.ndim == 1:
        return evaluate_binary(y_true, s, class_names=class_names, **options)
    allowed = {"dataset", "n_boot", "ci_level", "seed", "min_per_class", "n_bins"}
    return evaluate_multiclass(y_true, s, class_names=class_names,
                               **{k: v for k, v in options.items() if k in allowed})


# --- k-fold cross-validation ------------------------------------------------------------


@dataclass(frozen=True)
class FoldResult:
    index: int
    n_train: int
    n_val: int
    auc: float


@dataclass(frozen=True, eq=False)
class CrossValidationReport:
    """Per-fold AUCs and one report over all out-of-fold predictions."""

    folds: tuple[FoldResult, ...]
    pooled: EvaluationReport
    k: int
    seed: int

    @property
    def fold_aucs(self) -> NDArray[np.float64]:
        return np.array([f.auc for f in self.folds], dtype=np.float64)

    @property
    def mean_auc(self) -> float:
        return float(np.nanmean(self.fold_aucs))

    @property
    def sd_auc(self) -> float:
        return float(np.nanstd(self.fold_aucs, ddof=1)) if len(self.folds) > 1 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "seed": self.seed,
                "folds": [f.__dict__ for f in self.folds],
                "mean_auc": _finite_or_none(self.mean_auc), "sd_auc": _finite_or_none(self.sd_auc),
                "pooled_out_of_fold": self.pooled.to_dict()}

    def format_text(self) -> str:
        folds = ", ".join(_fmt(f.auc) for f in self.folds)
        return (f"{self.k}-fold cross-validation by patient (seed {self.seed}): fold AUCs "
                f"{folds}; mean {_fmt(self.mean_auc)} ± {_fmt(self.sd_auc)} (sd)\n"
                + self.pooled.format_text())


def cross_validate(
    fit_predict: Callable[[NDArray[np.int64], NDArray[np.int64]], ArrayLike],
    labels: ArrayLike,
    patients: Sequence[str],
    *,
    class_names: Sequence[str],
    k: int = 5,
    seed: int = 0,
    **evaluate_options: Any,
) -> CrossValidationReport:
    """k-fold cross-validation over *patients* for sets too small for a held-out split.

    ``fit_predict(train_indices, val_indices)`` trains a fresh model on the samples at
    ``train_indices`` and returns scores for those at ``val_indices``. Folds are
    stratified by each patient's largest label. The pooled report mixes k models, so its
    interval is optimistic about any single one; the fold AUC spread shows that.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1 or y.shape[0] != len(patients):
        raise ValueError("need one patient per label")
    strata: dict[str, int] = {}
    for patient, label in zip(patients, y.tolist(), strict=True):
        strata[patient] = max(label, strata.get(patient, label))
    folds = stratified_k_fold(strata, k, seed=seed)
    out_of_fold: NDArray[np.float64] | None = None
    results: list[FoldResult] = []
    patient_array = np.asarray(patients)
    for fold in folds:
        val_index = np.flatnonzero(np.isin(patient_array, fold.val)).astype(np.int64)
        train_index = np.flatnonzero(np.isin(patient_array, fold.train)).astype(np.int64)
        scores = np.asarray(fit_predict(train_index, val_index), dtype=np.float64)
        if scores.shape[0] != val_index.size:
            raise ValueError(f"fold {fold.index}: fit_predict returned {scores.shape[0]} scores "
                             f"for {val_index.size} samples")
        if out_of_fold is None:
            out_of_fold = np.full((y.size, *scores.shape[1:]), np.nan)
        out_of_fold[val_index] = scores
        value = (auc(y[val_index], scores) if scores.ndim == 1
                 else macro_auc(y[val_index], scores))
        results.append(FoldResult(fold.index, int(train_index.size), int(val_index.size), value))
    assert out_of_fold is not None
    pooled = evaluate(y, out_of_fold, class_names=class_names,
                      **{"dataset": f"out-of-fold predictions ({k} folds)", **evaluate_options})
    return CrossValidationReport(tuple(results), pooled, k, seed)


# --- scoring a model package the way the node serves it -----------------------------------


@dataclass(frozen=True, eq=False)
class PackageScores:
    """Probabilities from a package, the labels, and how they were computed."""

    scores: NDArray[np.float64]
    labels: NDArray[np.int64]
    output: str
    provider: str
    spec_fingerprint: str


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def _softmax(x: NDArray[np.float64]) -> NDArray[np.float64]:
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    out: NDArray[np.float64] = shifted / shifted.sum(axis=1, keepdims=True)
    return out


def score_package(
    package: ModelPackage | Path | str,
    samples: Any,
    *,
    batch_size: int = 16,
) -> PackageScores:
    """Run ``samples`` (a :class:`~dicomnode.training.datasets.SampleSet`) through a package.

    The serving path: the spec is rebuilt from the card (and checked against the
    fingerprint the card records), applied with ``apply_spec`` to each sample's raw
    input, and the tensors go through an ONNX Runtime session. Only the dataset's raw
    inputs are used, never its own tensors.
    """
    from dicomnode.imaging import PreprocessSpec
    from dicomnode.inference.runtime import RuntimeSettings, open_session
    from dicomnode.training.datasets import DatasetError, assemble_tensor

    pkg = package if isinstance(package, ModelPackage) else load_package(Path(package))
    card = pkg.card
    spec = PreprocessSpec.from_dict(list(card.preprocessing))
    recorded = card.provenance.get("preprocessing_fingerprint")
    if isinstance(recorded, str):
        spec.require_fingerprint(recorded)
    if len(card.inputs) != 1:
        raise DatasetError(f"model {card.name} has {len(card.inputs)} inputs; evaluation "
                           "handles single-input models")
    output = next((o for o in card.outputs if o.kind in ("logits", "probabilities")), None)
    if output is None:
        raise DatasetError(f"model {card.name} has no logits or probabilities output")
    names = tuple(c.lower() for c in samples.class_names)
    model_classes = tuple(c.lower() for c in output.classes)
    binary_single = len(model_classes) == 1
    if binary_single and (len(names) != 2 or names[1] != model_classes[0]):
        raise DatasetError(f"model {card.name} scores class {output.classes[0]!r}; the data's "
                           f"positive class is {samples.class_names[-1]!r}")
    if not binary_single and model_classes != names:
        raise DatasetError(f"model {card.name} has classes {list(output.classes)}; the data "
                           f"has {list(samples.class_names)}")
    session = open_session(pkg, RuntimeSettings(max_batch=batch_size))
    input_name = card.inputs[0].name
    chunks: list[NDArray[np.float64]] = []
    for start in range(0, len(samples), batch_size):
        indices = range(start, min(start + batch_size, len(samples)))
        x = np.stack([assemble_tensor(spec, samples.raw(i), samples.assemble) for i in indices])
        result = session.run({input_name: x.astype(np.float32, copy=False)})
        chunks.append(np.asarray(result[output.name], dtype=np.float64))
    raw = np.concatenate(chunks, axis=0)
    if output.kind == "logits":
        probs = _sigmoid(raw) if output.activation == "sigmoid" or binary_single else (
            _softmax(raw))
    else:
        probs = raw
    scores = probs[:, 0] if binary_single else probs
    return PackageScores(scores, np.asarray(samples.labels, dtype=np.int64), output.name,
                         session.provider, spec.fingerprint)


def evaluate_package(
    package: ModelPackage | Path | str,
    samples: Any,
    *,
    dataset: str = "",
    sensitivity_target: float = 0.9,
    n_boot: int = 2000,
    seed: int = 0,
    min_per_class: int = MIN_PER_CLASS,
    batch_size: int = 16,
) -> EvaluationReport:
    """Score ``samples`` with the package and evaluate; the card's thresholds are measured."""
    pkg = package if isinstance(package, ModelPackage) else load_package(Path(package))
    scored = score_package(pkg, samples, batch_size=batch_size)
    card_points = {p.name: p.threshold for p in pkg.card.operating_points
                   if p.output == scored.output and p.scale == "probability"}
    report = evaluate(scored.labels, scored.scores, class_names=samples.class_names,
                      dataset=dataset or samples.name, thresholds=card_points,
                      thresholds_from=f"model card {pkg.card.name} {pkg.card.version}",
                      sensitivity_target=sensitivity_target, n_boot=n_boot, seed=seed,
                      min_per_class=min_per_class)
    extra = {**report.extra, "model": pkg.card.name, "version": pkg.card.version,
             "sha256": pkg.card.sha256, "provider": scored.provider,
             "preprocessing_fingerprint": scored.spec_fingerprint}
    return _with_extra(report, extra)


def _with_extra(report: EvaluationReport, extra: Mapping[str, Any]) -> EvaluationReport:
    return replace(report, extra=dict(extra))


# --- plots with OpenCV -------------------------------------------------------------------

_COLOURS = ((180, 90, 30), (40, 130, 230), (60, 160, 60), (50, 50, 200), (160, 80, 160),
            (30, 170, 190))
_SIZE = 520
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 50, 60
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class _Axes:
    """A unit square plot on a white canvas, with ticks every 0.2."""

    def __init__(self, title: str, xlabel: str, ylabel: str) -> None:
        self.image = np.full((_SIZE, _SIZE, 3), 255, dtype=np.uint8)
        self.width = _SIZE - _LEFT - _RIGHT
        self.height = _SIZE - _TOP - _BOTTOM
        for i in range(6):
            value = i / 5
            x, y = self.px(value, 0.0)
            cv2.line(self.image, (x, _TOP), (x, _TOP + self.height), (230, 230, 230), 1)
            cv2.putText(self.image, f"{value:.1f}", (x - 12, _TOP + self.height + 18), _FONT,
                        0.4, (0, 0, 0), 1, cv2.LINE_AA)
            x, y = self.px(0.0, value)
            cv2.line(self.image, (_LEFT, y), (_LEFT + self.width, y), (230, 230, 230), 1)
            cv2.putText(self.image, f"{value:.1f}", (_LEFT - 32, y + 4), _FONT, 0.4,
                        (0, 0, 0), 1, cv2.LINE_AA)
        cv2.rectangle(self.image, (_LEFT, _TOP), (_LEFT + self.width, _TOP + self.height),
                      (0, 0, 0), 1)
        cv2.putText(self.image, title, (_LEFT, 22), _FONT, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(self.image, ylabel, (8, 42), _FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(self.image, xlabel, (_LEFT + self.width // 2 - 40, _SIZE - 16), _FONT,
                    0.45, (0, 0, 0), 1, cv2.LINE_AA)
        self.legend_row = 0

    def px(self, x: float, y: float) -> tuple[int, int]:
        return (round(_LEFT + x * self.width), round(_TOP + (1 - y) * self.height))

    def line(self, xs: ArrayLike, ys: ArrayLike, colour: tuple[int, int, int],
             thickness: int = 2) -> None:
        points = np.array([self.px(float(x), float(y)) for x, y in
                           zip(np.asarray(xs), np.asarray(ys), strict=True)], dtype=np.int32)
        if len(points) > 1:
            cv2.polylines(self.image, [points], False, colour, thickness, cv2.LINE_AA)

    def dashed_diagonal(self) -> None:
        for i in range(0, 20, 2):
            a, b = i / 20, (i + 1) / 20
            cv2.line(self.image, self.px(a, a), self.px(b, b), (150, 150, 150), 1, cv2.LINE_AA)

    def legend(self, text: str, colour: tuple[int, int, int], *, top_left: bool = False
               ) -> None:
        if top_left:
            x, y = _LEFT + 10, _TOP + 18 + 18 * self.legend_row
        else:
            x, y = _LEFT + self.width - 250, _TOP + self.height - 12 - 18 * self.legend_row
        cv2.line(self.image, (x, y - 4), (x + 18, y - 4), colour, 2)
        cv2.putText(self.image, text, (x + 24, y), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        self.legend_row += 1

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.image):
            raise OSError(f"cannot write {path}")
        return path


def _curve_names(report: EvaluationReport) -> list[str]:
    if report.kind == "binary":
        return [report.class_names[-1]]
    return [c for c in report.class_names if 0 < report.class_counts[c] < report.n]


def write_plots(report: EvaluationReport, out_dir: Path, *, prefix: str = "") -> list[Path]:
    """roc.png, pr.png and reliability.png under ``out_dir``; returns the paths written."""
    written: list[Path] = []
    if report.roc:
        axes = _Axes(f"ROC: {report.dataset}"[:60], "1 - specificity", "sensitivity")
        axes.dashed_diagonal()
        aucs = [report.auc] if report.kind == "binary" else [
            i for c, i in zip(report.class_names, report.per_class_auc, strict=True)
            if 0 < report.class_counts[c] < report.n]
        for index, (curve, name, interval) in enumerate(
                zip(report.roc, _curve_names(report), aucs, strict=True)):
            colour = _COLOURS[index % len(_COLOURS)]
            axes.line(curve.fpr, curve.tpr, colour)
            axes.legend(f"{name}: AUC {interval}", colour)
        for point in report.operating_points:
            if point.selected_on == "this data":
                continue
            c = point.counts
            if math.isfinite(c.sensitivity) and math.isfinite(c.specificity):
                cv2.circle(axes.image, axes.px(1 - c.specificity, c.sensitivity), 5,
                           (0, 0, 0), 2, cv2.LINE_AA)
        written.append(axes.save(out_dir / f"{prefix}roc.png"))
    if report.pr:
        axes = _Axes(f"Precision-recall: {report.dataset}"[:60], "recall", "precision")
        names = ([report.class_names[-1]] if report.kind == "binary" else
                 [c for c in report.class_names if report.class_counts[c]])
        for index, (pr, name) in enumerate(zip(report.pr, names, strict=True)):
            colour = _COLOURS[index % len(_COLOURS)]
            axes.line(pr.recall, pr.precision, colour)
            axes.legend(name, colour)
        written.append(axes.save(out_dir / f"{prefix}pr.png"))
    predicted, observed = (("mean predicted P(positive)", "fraction positive")
                           if report.kind == "binary" else ("top-label confidence", "accuracy"))
    axes = _Axes(f"Reliability: ECE {report.ece}"[:60], predicted, observed)
    axes.dashed_diagonal()
    total = max(1, sum(b.count for b in report.calibration.bins))
    for b in report.calibration.bins:
        x0, _ = axes.px(b.lower, 0)
        x1, y_base = axes.px(b.upper, 0)
        share = b.count / total
        cv2.rectangle(axes.image, (x0 + 2, y_base - int(share * axes.height * 0.25)),
                      (x1 - 2, y_base), (210, 210, 210), -1)
        if b.count and math.isfinite(b.observed):
            _, y_top = axes.px(0, b.observed)
            cv2.rectangle(axes.image, (x0 + 4, y_top), (x1 - 4, y_base), _COLOURS[0], 2)
            cv2.circle(axes.image, axes.px(b.mean_predicted, b.observed), 3, (0, 0, 0), -1)
    axes.legend("observed per bin (box)", _COLOURS[0], top_left=True)
    axes.legend("share of cases (grey)", (210, 210, 210), top_left=True)
    written.append(axes.save(out_dir / f"{prefix}reliability.png"))
    return written
