"""Classification metrics in numpy, each with the uncertainty that belongs to it.

A point estimate on a few dozen cases says little (seed 000 reported a test AUC from four
scans; seed 003 reported four-digit accuracies nobody could reproduce), so every headline
number here comes with an interval: AUC with a seeded, class-stratified bootstrap,
proportions (sensitivity, specificity) with the Wilson score interval. Nothing here
needs scikit-learn or torch; the definitions are short enough to test against hand-made
cases whose answers are known exactly.

Conventions: binary labels are 0/1 with 1 the positive class; scores are higher for
"more positive"; a sample is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BinaryCounts",
    "Calibration",
    "CalibrationBin",
    "Interval",
    "PrCurve",
    "RocCurve",
    "ThresholdChoice",
    "auc",
    "average_precision",
    "binary_counts",
    "bootstrap_ci",
    "calibration",
    "check_binary",
    "confusion_matrix",
    "ece_noise_floor",
    "f1_optimal_threshold",
    "macro_auc",
    "one_vs_rest_auc",
    "pr_curve",
    "roc_curve",
    "threshold_for_sensitivity",
    "top_label_calibration",
    "wilson_interval",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval; NaN throughout when undefined."""

    value: float
    lower: float
    upper: float
    level: float = 0.95
    method: str = ""

    @property
    def width(self) -> float:
        return self.upper - self.lower

    @property
    def defined(self) -> bool:
        return math.isfinite(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": _json_float(self.value),
            "ci": [_json_float(self.lower), _json_float(self.upper)],
            "ci_level": self.level,
            "method": self.method,
        }

    def __str__(self) -> str:
        if not self.defined:
            return "undefined"
        return f"{self.value:.3f} [{self.lower:.3f}, {self.upper:.3f}]"


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def check_binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[IntArray, FloatArray]:
    """Validated copies: 1-D labels in {0, 1} and finite scores of the same length."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D; got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} scores")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int64), s


def _midranks(values: FloatArray) -> FloatArray:
    """1-based ranks with tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic over n_pos * n_neg.

    It is the probability that a random positive scores above a random negative, ties
    counting one half: perfectly separated scores give 1.0, reversed 0.0, all equal 0.5.
    NaN when only one class is present (there is no pair to compare).
    """
    y, s = check_binary(y_true, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(s)
    u = float(ranks[y == 1].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def bootstrap_ci(
    statistic: Callable[[IntArray, FloatArray], float],
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "",
) -> Interval:
    """Percentile bootstrap interval, resampling within each class (stratified).

    ``y_true`` holds class indices (binary or multi-class) and ``scores`` one row per
    label, (N,) or (N, K); ``statistic(y, scores)`` is computed on each replicate.

    Stratifying keeps every replicate's class counts equal to the data's, so a replicate
    never lacks a class (the AUC would be undefined) and the interval describes the
    uncertainty of this test set's composition rather than of its class balance. The
    generator is seeded, so the same data give the same interval. The interval is
    widened to include the point estimate if a skewed bootstrap distribution would
    leave it outside (a card refuses such a metric).
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")
    y = np.asarray(y_true).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape[:1] != y.shape:
        raise ValueError(f"need one label per score row; got {y.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    value = float(statistic(y, s))
    label = method or f"percentile bootstrap, {n_boot} class-stratified resamples, seed {seed}"
    if not math.isfinite(value):
        return Interval(float("nan"), float("nan"), float("nan"), level, label)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    replicates = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        index = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
        replicates[b] = statistic(y[index], s[index])
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return Interval(value, float("nan"), float("nan"), level, label)
    alpha = (1.0 - level) / 2.0
    lower, upper = (float(q) for q in np.quantile(replicates, [alpha, 1.0 - alpha]))
    return Interval(value, min(lower, value), max(upper, value), level, label)


def wilson_interval(successes: int, total: int, *, level: float = 0.95) -> Interval:
    """Wilson score interval for a proportion; sound at 0/n and n/n, unlike Wald's."""
    if total < 0 or not 0 <= successes <= max(total, 0):
        raise ValueError(f"need 0 <= successes <= total; got {successes}/{total}")
    method = "Wilson score interval"
    if total == 0:
        return Interval(float("nan"), float("nan"), float("nan"), level, method)
    z = NormalDist().inv_cdf(1.0 - (1.0 - level) / 2.0)
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return Interval(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)),
                    level, method)


@dataclass(frozen=True)
class BinaryCounts:
    """The 2x2 table at one threshold; undefined ratios are NaN, not 0."""

    tp: int
    fp: int
    tn: int
    fn: int

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        return num / den if den else float("nan")

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return self._ratio(self.tn, self.tn + self.fn)

    @property
    def accuracy(self) -> float:
        return self._ratio(self.tp + self.tn, self.n)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def sensitivity_ci(self, level: float = 0.95) -> Interval:
        return wilson_interval(self.tp, self.tp + self.fn, level=level)

    def specificity_ci(self, level: float = 0.95) -> Interval:
        return wilson_interval(self.tn, self.tn + self.fp, level=level)

    def matrix(self) -> IntArray:
        """[[tn, fp], [fn, tp]]: rows are the true class, columns the predicted one."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
            "sensitivity": _json_float(self.sensitivity),
            "specificity": _json_float(self.specificity),
            "precision": _json_float(self.precision),
            "npv": _json_float(self.npv),
            "f1": _json_float(self.f1),
            "accuracy": _json_float(self.accuracy),
        }


def binary_counts(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> BinaryCounts:
    """Counts with ``score >= threshold`` called positive."""
    y, s = check_binary(y_true, scores)
    predicted = s >= threshold
    positive = y == 1
    return BinaryCounts(
        tp=int(np.sum(predicted & positive)),
        fp=int(np.sum(predicted & ~positive)),
        tn=int(np.sum(~predicted & ~positive)),
        fn=int(np.sum(~predicted & positive)),
    )


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> IntArray:
    """(K, K) counts, rows the true class and columns the predicted class."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError("y_true and y_pred must be 1-D and of equal length")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError(f"class indices must be within 0..{n_classes - 1}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


@dataclass(frozen=True, eq=False)
class RocCurve:
    """ROC points from (0, 0) to (1, 1); ``thresholds[i]`` gives point i (+inf for the first)."""

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray

    def to_dict(self) -> dict[str, Any]:
        return {
            "fpr": self.fpr.tolist(),
            "tpr": self.tpr.tolist(),
            "thresholds": [_json_float(float(t)) for t in self.thresholds],
        }


@dataclass(frozen=True, eq=False)
class PrCurve:
    """Precision-recall points, starting at recall 0 with precision 1."""

    precision: FloatArray
    recall: FloatArray
    thresholds: FloatArray

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision.tolist(),
            "recall": self.recall.tolist(),
            "thresholds": [_json_float(float(t)) for t in self.thresholds],
        }


def _cumulative_counts(
    y: IntArray, s: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """True and false positives at each distinct score, taken as threshold, descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1).astype(np.float64) - tps
    return tps, fps, s_sorted[last_of_run]


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> RocCurve:
    """One point per distinct score; needs both classes."""
    y, s = check_binary(y_true, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs positives and negatives")
    tps, fps, thresholds = _cumulative_counts(y, s)
    return RocCurve(
        fpr=np.r_[0.0, fps / n_neg],
        tpr=np.r_[0.0, tps / n_pos],
        thresholds=np.r_[np.inf, thresholds],
    )


def pr_curve(y_true: ArrayLike, scores: ArrayLike) -> PrCurve:
    """Precision against recall; needs at least one positive."""
    y, s = check_binary(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("a precision-recall curve needs positives")
    tps, fps, thresholds = _cumulative_counts(y, s)
    return PrCurve(
        precision=np.r_[1.0, tps / (tps + fps)],
        recall=np.r_[0.0, tps / n_pos],
        thresholds=np.r_[np.inf, thresholds],
    )


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Σ (R_k − R_{k−1}) P_k, the step-wise area that does not interpolate optimistically."""
    y, s = check_binary(y_true, scores)
    if y.sum() == 0:
        return float("nan")
    curve = pr_curve(y, s)
    return float(np.sum(np.diff(curve.recall) * curve.precision[1:]))


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold picked on some data, and the table it gives on that same data."""

    name: str
    threshold: float
    counts: BinaryCounts
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "rule": self.rule,
                **self.counts.to_dict()}


def _between(thresholds: FloatArray, index: int) -> float:
    """Halfway from distinct score ``index`` down to the next lower one.

    Any threshold in that gap gives the same table on this data; the middle is the one
    least sensitive to the float noise between torch and ONNX Runtime scores.
    """
    if index + 1 < thresholds.size:
        return float((thresholds[index] + thresholds[index + 1]) / 2.0)
    return float(thresholds[index])


def f1_optimal_threshold(y_true: ArrayLike, scores: ArrayLike) -> ThresholdChoice:
    """The threshold with the highest F1 (the highest such threshold on ties)."""
    y, s = check_binary(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("an F1-optimal threshold needs positives")
    tps, fps, thresholds = _cumulative_counts(y, s)
    f1 = 2 * tps / (2 * tps + fps + (n_pos - tps))
    best = int(np.argmax(f1))
    threshold = _between(thresholds, best)
    return ThresholdChoice("f1-optimal", threshold, binary_counts(y, s, threshold),
                           "maximum F1")


def threshold_for_sensitivity(
    y_true: ArrayLike, scores: ArrayLike, target: float
) -> ThresholdChoice:
    """The highest threshold whose sensitivity reaches ``target`` (so the best specificity)."""
    if not 0.0 < target <= 1.0:
        raise ValueError("the sensitivity target must be in (0, 1]")
    y, s = check_binary(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("a sensitivity target needs positives")
    tps, _, thresholds = _cumulative_counts(y, s)
    reached = np.flatnonzero(tps / n_pos >= target - 1e-12)
    index = int(reached[0])
    threshold = _between(thresholds, index)
    return ThresholdChoice(f"sensitivity>={target:g}", threshold,
                           binary_counts(y, s, threshold), f"sensitivity >= {target:g}")


@dataclass(frozen=True)
class CalibrationBin:
    """One equal-width bin of predicted probability."""

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed: float

    def to_dict(self) -> dict[str, Any]:
        return {"lower": self.lower, "upper": self.upper, "count": self.count,
                "mean_predicted": _json_float(self.mean_predicted),
                "observed": _json_float(self.observed)}


@dataclass(frozen=True)
class Calibration:
    """Expected (count-weighted) and maximum calibration error over equal-width bins."""

    ece: float
    mce: float
    bins: tuple[CalibrationBin, ...]
    what: str

    def to_dict(self) -> dict[str, Any]:
        return {"ece": _json_float(self.ece), "mce": _json_float(self.mce), "what": self.what,
                "bins": [b.to_dict() for b in self.bins]}


def _calibration(confidence: FloatArray, correct: FloatArray, n_bins: int, what: str
                 ) -> Calibration:
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if confidence.size == 0:
        raise ValueError("calibration needs at least one prediction")
    if (confidence < 0).any() or (confidence > 1).any():
        raise ValueError("calibration needs probabilities in [0, 1]")
    index = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    bins: list[CalibrationBin] = []
    ece = 0.0
    mce = 0.0
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        if count:
            mean_p = float(confidence[members].mean())
            observed = float(correct[members].mean())
            gap = abs(mean_p - observed)
            ece += count / confidence.size * gap
            mce = max(mce, gap)
        else:
            mean_p = observed = float("nan")
        bins.append(CalibrationBin(b / n_bins, (b + 1) / n_bins, count, mean_p, observed))
    return Calibration(float(ece), float(mce), tuple(bins), what)


def calibration(y_true: ArrayLike, probabilities: ArrayLike, *, n_bins: int = 10) -> Calibration:
    """Binary calibration: in each bin, mean P(positive) against the fraction positive."""
    y, p = check_binary(y_true, probabilities)
    return _calibration(p, y.astype(np.float64), n_bins, "P(positive) vs fraction positive")


def top_label_calibration(
    y_true: ArrayLike, probabilities: ArrayLike, *, n_bins: int = 10
) -> Calibration:
    """Multi-class calibration of the arg-max class: its probability against accuracy."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError("probabilities must be (N, K) with one row per label")
    predicted = probs.argmax(axis=1)
    return _calibration(probs.max(axis=1), (predicted == y).astype(np.float64), n_bins,
                        "top-label confidence vs accuracy")


def ece_noise_floor(probabilities: ArrayLike, n: int, *, n_bins: int = 10, draws: int = 500,
                    seed: int = 0) -> tuple[float, float]:
    """The ECE a *perfectly calibrated* model shows on ``n`` cases: (median, 90th percentile).

    Each draw resamples ``n`` rows of ``probabilities`` (N,) for P(positive) or (N, K),
    then draws every case's label from its own row, so the probabilities are exactly
    right by construction; what ECE remains is sampling noise. A measured ECE near this
    floor says nothing about miscalibration, and a target below it cannot be shown on a
    test set of that size.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if n < 1 or draws < 1 or probs.shape[0] == 0:
        raise ValueError("need n >= 1, draws >= 1 and at least one row of probabilities")
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for d in range(draws):
        rows = probs[rng.integers(0, probs.shape[0], n)]
        if rows.ndim == 1:
            y = (rng.random(n) < rows).astype(np.int64)
            values[d] = calibration(y, rows, n_bins=n_bins).ece
        else:
            cumulative = np.cumsum(rows / rows.sum(axis=1, keepdims=True), axis=1)
            y = (rng.random((n, 1)) > cumulative).sum(axis=1).clip(0, rows.shape[1] - 1)
            values[d] = top_label_calibration(y, rows, n_bins=n_bins).ece
    return float(np.median(values)), float(np.quantile(values, 0.9))


def one_vs_rest_auc(y_true: ArrayLike, probabilities: ArrayLike) -> tuple[float, ...]:
    """AUC of each class's probability for "this class" against all others (NaN if absent)."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError("probabilities must be (N, K) with one row per label")
    return tuple(auc((y == k).astype(np.int64), probs[:, k]) for k in range(probs.shape[1]))


def macro_auc(y_true: ArrayLike, probabilities: ArrayLike) -> float:
    """Unweighted mean of the defined one-vs-rest AUCs."""
    values = [v for v in one_vs_rest_auc(y_true, probabilities) if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")

