"""Tumour-growth forecasting from one patient's volume timeline (serving side).

The node sees, per lesion, a short and irregular series of segmented volumes with 5-10 %
measurement noise, sometimes interrupted by a resection or altered by radio/chemotherapy.
A forecast has to say three things a reader can check later: the volume expected at +3,
+6 and +12 months with an 80 % interval, the volume doubling time of the growth seen so far
(or that it is not growing), and whether the forecast crosses the RANO-style progression
threshold (a volume increase of at least 40 % over the last measurement; Ellingson et al.
2017, the volumetric counterpart of RANO's 25 % bidimensional increase).

Every method, learned or not, answers through the same :func:`forecast` and the same
:class:`Forecast`, so the rest of the node (the growth SR, the plot) never knows which one
ran. The learned LSTM runs from an ONNX model package (``models/growth-forecaster``) when
one is installed; the package is only written when it beat the best baseline on held-out
synthetic patients (``dicomnode.training.growth``). Without it the best baseline serves.
Baselines carry empirical intervals: log-residual quantiles measured on a synthetic
calibration cohort, because a point forecast without its spread would be read as certain.

This module needs only numpy (and onnxruntime for the learned model): no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from dicomnode.inference.runtime import ModelSession

__all__ = [
    "BASELINE_CALIBRATION",
    "BEST_BASELINE",
    "DEFAULT_MODELS_DIR",
    "FEATURE_NAMES",
    "HORIZONS_DAYS",
    "INTERVAL_LEVEL",
    "MAX_VISITS",
    "MODEL_NAME",
    "PROGRESSION_RATIO",
    "QUANTILES",
    "BaselineForecaster",
    "Forecast",
    "ForecastArrays",
    "GrowthFit",
    "GrowthForecaster",
    "HorizonScore",
    "IntervalCalibration",
    "LstmForecaster",
    "MethodScores",
    "PairedDifference",
    "Timeline",
    "TimelineError",
    "TimelinePoint",
    "Trend",
    "baseline",
    "calibrate_intervals",
    "current_segment",
    "default_forecaster",
    "fit_growth",
    "forecast",
    "gompertz_point",
    "growth_trend",
    "last_value_point",
    "log_linear_point",
    "paired_mae_difference",
    "score_method",
    "timeline_features",
]

Array = NDArray[np.float64]

HORIZONS_DAYS: tuple[float, ...] = (91.0, 183.0, 365.0)
"""+3, +6 and +12 months after the last visit, in whole days (visits fall on dates)."""

PROGRESSION_RATIO = 1.4
"""Volume ratio to the last measurement that counts as progression (mRANO, volumetric)."""

QUANTILES: tuple[float, float, float] = (0.1, 0.5, 0.9)
INTERVAL_LEVEL = QUANTILES[2] - QUANTILES[0]

MIN_VOLUME_CM3 = 0.05
"""Volumes below this are taken as this: ~50 voxels of 1 mm³, the detection floor assumed
for a clinical segmentation, and it keeps logarithms finite after a complete resection."""

MIN_SPAN_DAYS = 28.0
"""A trend is fitted only over at least four weeks: over shorter gaps a 5-10 % noise
difference reads as a huge growth rate (Ellingson et al. 2016 found > 28 days between
scans was needed to call progression with high specificity)."""

MAX_RATE_PER_DAY = math.log(2.0) / 14.0
"""Fitted growth and shrink rates are bounded at a two-week doubling/halving time, faster
than the fastest untreated glioblastomas reported (median 21-50 days), so a noisy pair of
points cannot extrapolate to thousands of cm³."""

MAX_VOLUME_CM3 = 500.0
"""No forecast or fitted carrying capacity exceeds this (about a third of a brain)."""

NOISE_SD = 0.075
"""Log-volume noise assumed by the Gompertz model selection (middle of 5-10 %)."""

DROP_RATIO = 0.5
"""A fall to half the previous volume or less starts a new segment even when no resection
was recorded: growth never halves a tumour between two visits, treatment does."""

TREND_POINTS = 6
GROWTH_Z = 1.645
"""One-sided 95 %: the growth must stand out from measurement noise to be reported."""

MAX_VISITS = 15
"""The learned model reads the most recent 15 visits (the cohort has 3-15 per patient)."""

MODEL_NAME = "growth-forecaster"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

Trend = Literal["growing", "not growing", "unknown"]


class TimelineError(ValueError):
    """A timeline that cannot be forecast (unsorted, negative or non-finite values)."""


# --- the timeline --------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelinePoint:
    """One measured volume of one lesion, and what was done to it since the previous one.

    ``resection``/``therapy`` are None when the node does not know: volumes come from
    images, treatments from elsewhere. ``therapy`` means a course of radiotherapy,
    chemotherapy or radiosurgery was given between the previous visit and this one.
    """

    day: float
    volume_cm3: float
    resection: bool | None = None
    therapy: bool | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.day):
            raise TimelineError(f"visit day {self.day} is not finite")
        if not math.isfinite(self.volume_cm3) or self.volume_cm3 < 0:
            raise TimelineError(f"volume {self.volume_cm3} cm³ is not a non-negative number")


@dataclass(frozen=True)
class Timeline:
    """A lesion's measured volumes in time order (days from any fixed origin)."""

    points: tuple[TimelinePoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise TimelineError("a timeline needs at least one measured volume")
        days = [p.day for p in self.points]
        if any(b <= a for a, b in itertools.pairwise(days)):
            raise TimelineError("timeline days must be strictly increasing (one volume per day)")

    @classmethod
    def from_dates(
        cls,
        dates: Sequence[date],
        volumes_cm3: Sequence[float],
        *,
        resection: Sequence[bool | None] | None = None,
        therapy: Sequence[bool | None] | None = None,
    ) -> Timeline:
        """Build from study dates (the first date is day 0); unknown treatments stay None."""
        if len(dates) != len(volumes_cm3):
            raise TimelineError(f"{len(dates)} dates but {len(volumes_cm3)} volumes")
        flags_r = list(resection) if resection is not None else [None] * len(dates)
        flags_t = list(therapy) if therapy is not None else [None] * len(dates)
        if len(flags_r) != len(dates) or len(flags_t) != len(dates):
            raise TimelineError("treatment flags must have one entry per date")
        origin = dates[0] if dates else date(1970, 1, 1)
        return cls(
            tuple(
                TimelinePoint(float((d - origin).days), float(v), r, t)
                for d, v, r, t in zip(dates, volumes_cm3, flags_r, flags_t, strict=True)
            )
        )

    @property
    def days(self) -> Array:
        return np.array([p.day for p in self.points], dtype=np.float64)

    @property
    def volumes_cm3(self) -> Array:
        return np.array([p.volume_cm3 for p in self.points], dtype=np.float64)

    @property
    def log_volumes(self) -> Array:
        return np.log(np.maximum(self.volumes_cm3, MIN_VOLUME_CM3))

    @property
    def last_volume_cm3(self) -> float:
        return max(self.points[-1].volume_cm3, MIN_VOLUME_CM3)

    @property
    def treatments_known(self) -> bool:
        return all(p.resection is not None and p.therapy is not None for p in self.points)


# --- the forecast --------------------------------------------------------------------------


@dataclass(frozen=True)
class Forecast:
    """Predicted volumes at ``horizons`` (days after the last visit), with an interval.

    ``doubling_time_days`` describes the growth already observed (the fit over the
    current segment), not the forecast; it is None when the lesion is not growing or the
    history is too short, and ``trend`` says which. ``progression_call[i]`` is True when
    the median at ``horizons[i]`` is at least ``PROGRESSION_RATIO`` times the last volume.
    """

    horizons: tuple[float, ...]
    median: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    method: str
    doubling_time_days: float | None
    progression_call: tuple[bool, ...]
    trend: Trend
    last_volume_cm3: float
    interval_level: float = INTERVAL_LEVEL

    def __post_init__(self) -> None:
        size = len(self.horizons)
        lengths = {len(self.median), len(self.lower), len(self.upper), len(self.progression_call)}
        if lengths != {size}:
            raise ValueError("median, lower, upper and progression_call need one per horizon")
        for lo, mid, hi in zip(self.lower, self.median, self.upper, strict=True):
            if not (0.0 <= lo <= mid <= hi) or not math.isfinite(hi):
                raise ValueError(f"interval [{lo}, {hi}] does not hold the median {mid}")
        if (self.doubling_time_days is None) != (self.trend != "growing"):
            raise ValueError("a doubling time is given exactly when the trend is growing")

    @property
    def growing(self) -> bool:
        return self.trend == "growing"


@dataclass(frozen=True)
class ForecastArrays:
    """Forecasts for many timelines at once, (n, horizons) in cm³, for evaluation."""

    median: Array
    lower: Array
    upper: Array


class GrowthForecaster(Protocol):
    """Anything that turns timelines into median and interval volumes at HORIZONS_DAYS."""

    @property
    def name(self) -> str: ...

    def predict(self, timelines: Sequence[Timeline]) -> ForecastArrays: ...


# --- segments and growth fits --------------------------------------------------------------


def current_segment(timeline: Timeline) -> int:
    """Index of the first visit after the last resection (recorded, or seen as a drop).

    A resection replaces the tumour by its residue, so points before it say nothing
    about the curve the residue follows; fits use the current segment only.
    """
    volumes = np.maximum(timeline.volumes_cm3, MIN_VOLUME_CM3)
    start = 0
    for index in range(1, len(timeline.points)):
        if timeline.points[index].resection or volumes[index] <= DROP_RATIO * volumes[index - 1]:
            start = index
    return start


@dataclass(frozen=True)
class GrowthFit:
    """A fitted log-volume curve over the current segment, anchored at its first visit.

    ``law`` "exponential": ln V = a + r·(t − t0); "gompertz": ln V = ln K − c·e^(−α(t − t0))
    (growth towards K when c > 0, shrinkage towards K when c < 0).
    """

    law: Literal["exponential", "gompertz"]
    t0: float
    params: tuple[float, ...]
    points: int
    slope_standard_error: float
    """Standard error of the exponential slope under NOISE_SD: below ~1.64 of these a
    positive rate is indistinguishable from measurement noise."""

    def log_volume(self, days: Array) -> Array:
        t = np.asarray(days, dtype=np.float64) - self.t0
        if self.law == "exponential":
            a, r = self.params
            return a + r * t
        log_k, c, alpha = self.params
        return log_k - c * np.exp(-alpha * t)

    def rate_per_day(self, day: float) -> float:
        """d ln V / dt at ``day``: the instantaneous specific growth rate."""
        if self.law == "exponential":
            return float(self.params[1])
        _, c, alpha = self.params
        return float(alpha * c * math.exp(-alpha * (day - self.t0)))


def _exponential_fit(t: Array, y: Array) -> tuple[float, float, float]:
    """Least-squares line through (t, y) with its slope clipped; returns (a, r, SSE)."""
    tc = t - t.mean()
    denominator = float(tc @ tc)
    rate = float(tc @ (y - y.mean()) / denominator) if denominator > 0 else 0.0
    rate = min(max(rate, -MAX_RATE_PER_DAY), MAX_RATE_PER_DAY)
    intercept = float(np.mean(y - rate * t))
    sse = float(np.sum((y - intercept - rate * t) ** 2))
    return intercept, rate, sse


_ALPHAS = np.geomspace(1.0 / 3650.0, 1.0 / 15.0, 28)
_CAPACITY_STEPS = 40


def _gompertz_fit(
    t: Array, y: Array, capacity_multiple: float
) -> tuple[tuple[float, float, float], float]:
    """Grid over (α, K), closed-form least squares for c; returns ((ln K, c, α), SSE).

    For fixed α and K the model is linear in c, so every grid cell is solved exactly and
    the best cell is kept: no optimiser can wander off, and the answer is deterministic.
    K runs from 1/20 of the smallest volume (a shrinking lesion's plateau) to
    ``capacity_multiple`` times the largest, never above MAX_VOLUME_CM3; cells whose rate
    at the last visit exceeds MAX_RATE_PER_DAY are refused.
    """
    top = min(float(y.max()) + math.log(capacity_multiple), math.log(MAX_VOLUME_CM3))
    log_k = np.linspace(float(y.min()) - 3.0, max(top, float(y.max()) + 0.01), _CAPACITY_STEPS)
    e = np.exp(-np.outer(_ALPHAS, t))  # (A, n)
    sum_e = e.sum(axis=1)[:, None]
    sum_e2 = (e * e).sum(axis=1)[:, None]
    sum_ey = (e @ y)[:, None]
    lk = log_k[None, :]
    numerator = lk * sum_e - sum_ey  # Σ e·(ln K − y)
    c = numerator / sum_e2
    sum_d2 = y.size * lk**2 - 2.0 * lk * float(y.sum()) + float(y @ y)  # Σ (ln K − y)²
    sse = sum_d2 - numerator * c
    rate_last = _ALPHAS[:, None] * c * np.exp(-_ALPHAS[:, None] * float(t[-1]))
    sse = np.where(np.abs(rate_last) <= MAX_RATE_PER_DAY, sse, np.inf)
    a_index, k_index = np.unravel_index(int(np.argmin(sse)), sse.shape)
    best = (float(log_k[k_index]), float(c[a_index, k_index]), float(_ALPHAS[a_index]))
    return best, float(max(sse[a_index, k_index], 0.0))


def fit_growth(timeline: Timeline, *, max_points: int | None = None) -> GrowthFit | None:
    """Fit the current segment: exponential, or Gompertz where the data ask for it.

    Gompertz has one parameter more than exponential growth, and with 3-5 noisy points
    it would bend the curve to fit noise; it is chosen only when its residual sum of
    squares, in units of the assumed measurement variance, beats the exponential's by
    more than the BIC penalty of the extra parameter. None when the segment has fewer
    than two visits or spans less than MIN_SPAN_DAYS (no trend can be read from it).
    """
    start = current_segment(timeline)
    days = timeline.days[start:]
    y = timeline.log_volumes[start:]
    if max_points is not None:
        days, y = days[-max_points:], y[-max_points:]
    if days.size < 2 or days[-1] - days[0] < MIN_SPAN_DAYS:
        return None
    t0 = float(days[0])
    t = days - t0
    a, r, sse_exp = _exponential_fit(t, y)
    se = NOISE_SD / math.sqrt(float(np.sum((t - t.mean()) ** 2)))
    fit = GrowthFit("exponential", t0, (a, r), int(days.size), se)
    if days.size >= 4:
        params, sse_gomp = _gompertz_fit(t, y, capacity_multiple=10.0)
        variance = NOISE_SD**2
        penalty = math.log(days.size)
        if sse_gomp / variance + penalty < sse_exp / variance:
            fit = GrowthFit("gompertz", t0, params, int(days.size), se)
    return fit


def growth_trend(timeline: Timeline) -> tuple[Trend, float | None]:
    """The trend at the last visit and its volume doubling time (days) when growing.

    Read from :func:`fit_growth` over the last TREND_POINTS visits of the segment (the
    recent course, not the whole history): "growing" when the instantaneous rate
    d ln V/dt at the last visit is positive and exceeds GROWTH_Z standard errors of the
    slope, so that 5-10 % noise on a stable lesion is not reported as a doubling time of
    decades; the doubling time is then ln 2 / rate. "not growing" means stable or
    shrinking within what the measurements can tell; "unknown" that the segment is too
    short (fewer than two visits, or under MIN_SPAN_DAYS) to fit.
    """
    fit = fit_growth(timeline, max_points=TREND_POINTS)
    if fit is None:
        return "unknown", None
    rate = fit.rate_per_day(timeline.points[-1].day)
    if rate <= 0.0 or rate <= GROWTH_Z * fit.slope_standard_error:
        return "not growing", None
    return "growing", math.log(2.0) / rate


# --- baseline point forecasts (log volume at each horizon) ---------------------------------


def last_value_point(timeline: Timeline) -> Array:
    """The last measured volume, carried forward to every horizon."""
    return np.full(len(HORIZONS_DAYS), math.log(timeline.last_volume_cm3))


def log_linear_point(timeline: Timeline, k: int = 3) -> Array:
    """A straight line through the last ``k`` log volumes of the segment, extrapolated.

    Anchored at the last measured value (the line's slope, not its intercept, carries
    the information; anchoring keeps the forecast continuous with what was just seen).
    """
    start = current_segment(timeline)
    days = timeline.days[start:][-k:]
    y = timeline.log_volumes[start:][-k:]
    if days.size < 2 or days[-1] - days[0] < MIN_SPAN_DAYS:
        return last_value_point(timeline)
    _, rate, _ = _exponential_fit(days - days[0], y)
    return float(y[-1]) + rate * np.asarray(HORIZONS_DAYS, dtype=np.float64)


def gompertz_point(
    timeline: Timeline, max_points: int = 6, capacity_multiple: float = 3.0
) -> Array:
    """A Gompertz curve through the last ``max_points`` of the segment, extrapolated.

    Unlike :func:`fit_growth` (which describes the growth seen, and so prefers the
    simpler exponential), the forecast always uses the bounded Gompertz form when the
    segment has three or more points: an exponential fitted to a fast regrowth and
    carried forward a year predicts volumes no brain holds. The capacity is bounded at
    ``capacity_multiple`` times the largest volume seen; both settings were chosen on the
    calibration cohort. Two points give a line, one point the last value. The curve is
    shifted to pass through the last measurement, as in :func:`log_linear_point`.
    """
    start = current_segment(timeline)
    days = timeline.days[start:][-max_points:]
    y = timeline.log_volumes[start:][-max_points:]
    if days.size < 2 or days[-1] - days[0] < MIN_SPAN_DAYS:
        return last_value_point(timeline)
    t = days - days[0]
    horizons = np.asarray(HORIZONS_DAYS, dtype=np.float64)
    last = float(y[-1])
    if days.size < 3:
        _, rate, _ = _exponential_fit(t, y)
        return last + rate * horizons
    (log_k, c, alpha), _ = _gompertz_fit(t, y, capacity_multiple)
    now = float(t[-1])
    curve: Array = log_k - c * np.exp(-alpha * (now + horizons))
    return last + curve - (log_k - c * math.exp(-alpha * now))


PointModel = Callable[[Timeline], Array]

_POINT_MODELS: dict[str, PointModel] = {
    "last-value": last_value_point,
    "log-linear": log_linear_point,
    "gompertz": gompertz_point,
}


@dataclass(frozen=True)
class IntervalCalibration:
    """Quantiles of ln(actual / point forecast) per horizon, from calibration patients.

    ``median`` is kept for reporting (a non-zero value is the method's bias); the
    baseline's forecast stays the method's own point, and the interval is
    point·exp(lower)..point·exp(upper), widened where needed to contain the point.
    """

    method: str
    lower: tuple[float, ...]
    median: tuple[float, ...]
    upper: tuple[float, ...]
    patients: int
    source: str

    def __post_init__(self) -> None:
        if not len(self.lower) == len(self.median) == len(self.upper) == len(HORIZONS_DAYS):
            raise ValueError("calibration needs one quantile per horizon")
        if any(lo > hi for lo, hi in zip(self.lower, self.upper, strict=True)):
            raise ValueError("calibration lower quantile above the upper one")


def calibrate_intervals(
    method: str,
    points_log: Array,
    actual_cm3: Array,
    *,
    source: str,
) -> IntervalCalibration:
    """Residual quantiles (10 %, 50 %, 90 %) of a point forecaster on calibration data."""
    residuals = np.log(np.maximum(actual_cm3, MIN_VOLUME_CM3)) - points_log
    q = np.quantile(residuals, QUANTILES, axis=0)
    return IntervalCalibration(
        method=method,
        lower=tuple(round(float(v), 4) for v in q[0]),
        median=tuple(round(float(v), 4) for v in q[1]),
        upper=tuple(round(float(v), 4) for v in q[2]),
        patients=int(points_log.shape[0]),
        source=source,
    )


@dataclass(frozen=True)
class BaselineForecaster:
    """A point model plus the empirical interval measured for it."""

    method: str
    calibration: IntervalCalibration
    point: PointModel = field(repr=False)

    @property
    def name(self) -> str:
        return self.method

    def points(self, timelines: Sequence[Timeline]) -> Array:
        return np.stack([self.point(t) for t in timelines]) if timelines else np.empty((0, 3))

    def predict(self, timelines: Sequence[Timeline]) -> ForecastArrays:
        points = np.minimum(self.points(timelines), math.log(MAX_VOLUME_CM3))
        median = np.exp(points)
        lower = np.minimum(median * np.exp(np.asarray(self.calibration.lower)), median)
        upper = np.maximum(median * np.exp(np.asarray(self.calibration.upper)), median)
        return ForecastArrays(median, lower, upper)


# Measured by `scripts/eval_growth.py --calibrate` on the synthetic calibration cohort
# (dicomnode.history.cohort, seed 1001, 3000 patients); the evaluation recomputes them
# from the same cohort, and tests/unit/history checks that these constants still agree.
_CALIBRATION_SOURCE = "synthetic cohort seed 1001, n=3000 (v1)"
BASELINE_CALIBRATION: Mapping[str, IntervalCalibration] = {
    "last-value": IntervalCalibration(
        "last-value",
        lower=(-0.1846, -0.1802, -0.1414),
        median=(0.0175, 0.0445, 0.0781),
        upper=(0.3946, 0.8114, 1.2853),
        patients=3000,
        source=_CALIBRATION_SOURCE,
    ),
    "log-linear": IntervalCalibration(
        "log-linear",
        lower=(-0.3745, -0.6901, -1.184),
        median=(-0.0175, -0.0196, -0.0262),
        upper=(0.2182, 0.3173, 0.5487),
        patients=3000,
        source=_CALIBRATION_SOURCE,
    ),
    "gompertz": IntervalCalibration(
        "gompertz",
        lower=(-0.2142, -0.2762, -0.3571),
        median=(-0.0011, 0.0, 0.0116),
        upper=(0.2477, 0.4746, 0.9495),
        patients=3000,
        source=_CALIBRATION_SOURCE,
    ),
}

BEST_BASELINE = "last-value"
"""The baseline with the lowest held-out MAE at every horizon (scripts/eval_growth.py,
seed 777): extrapolating noisy trends through treatment-driven changes did worse than
assuming no change. Served whenever no learned package is installed."""


def baseline(method: str, calibration: IntervalCalibration | None = None) -> BaselineForecaster:
    """A baseline by name, with its stored calibration unless another is given."""
    if method not in _POINT_MODELS:
        raise KeyError(f"unknown baseline {method!r}; use one of {sorted(_POINT_MODELS)}")
    return BaselineForecaster(
        method, calibration or BASELINE_CALIBRATION[method], _POINT_MODELS[method]
    )


# --- the learned model: features and the ONNX session --------------------------------------

FEATURE_NAMES: tuple[str, ...] = (
    "present",
    "years_to_last",
    "years_since_previous",
    "log_volume_to_last",
    "log_volume_scaled",
    "resection",
    "therapy",
    "treatments_known",
)
_LOG_VOLUME_CENTRE = math.log(10.0)
_LOG_VOLUME_SCALE = 2.0
_YEAR = 365.25


def timeline_features(timeline: Timeline) -> NDArray[np.float32]:
    """(MAX_VISITS, len(FEATURE_NAMES)) float32, left-padded so the last row is the last visit.

    Volumes enter as logs relative to the last visit (forecasts are ratios, which do not
    depend on the lesion's size) plus one absolute, scaled log volume (growth slows as a
    lesion nears its carrying capacity). Times enter as years before the last visit and
    gaps between visits, since visits are irregular. Unknown treatments are zeros with
    ``treatments_known`` = 0, a state the model saw in training.
    """
    points = timeline.points[-MAX_VISITS:]
    days = np.array([p.day for p in points], dtype=np.float64)
    logs = np.log(np.maximum([p.volume_cm3 for p in points], MIN_VOLUME_CM3))
    known = float(all(p.resection is not None and p.therapy is not None for p in points))
    rows = np.zeros((MAX_VISITS, len(FEATURE_NAMES)), dtype=np.float32)
    offset = MAX_VISITS - len(points)
    gaps = np.diff(days, prepend=days[0])
    for index, point in enumerate(points):
        rows[offset + index] = (
            1.0,
            (days[index] - days[-1]) / _YEAR,
            gaps[index] / _YEAR,
            logs[index] - logs[-1],
            (logs[index] - _LOG_VOLUME_CENTRE) / _LOG_VOLUME_SCALE,
            float(bool(point.resection)) * known,
            float(bool(point.therapy)) * known,
            known,
        )
    return rows


class LstmForecaster:
    """The learned forecaster from a model package, run with ONNX Runtime.

    The package's single output holds, per horizon, the 10/50/90 % quantiles of
    ln(V(horizon) / V(last visit)); quantiles commute with exp, so they become volume
    quantiles by scaling the last volume.
    """

    def __init__(self, session: ModelSession) -> None:
        self._session = session
        card = session.package.card
        self._input = card.inputs[0].name
        self._output = card.outputs[0].name
        self._version = card.version

    @classmethod
    def from_package(cls, directory: Path) -> LstmForecaster:
        from dicomnode.inference.runtime import RuntimeSettings, open_model

        settings = RuntimeSettings(providers=("cpu",), intra_op_threads=1, inter_op_threads=1)
        return cls(open_model(directory, settings))

    @property
    def name(self) -> str:
        return f"lstm {self._version}"

    def predict(self, timelines: Sequence[Timeline]) -> ForecastArrays:
        if not timelines:
            empty = np.empty((0, len(HORIZONS_DAYS)))
            return ForecastArrays(empty, empty, empty)
        features = np.stack([timeline_features(t) for t in timelines])
        quantiles = np.asarray(self._session.run({self._input: features})[self._output])
        last = np.array([t.last_volume_cm3 for t in timelines])[:, None]
        volumes = np.minimum(last[..., None] * np.exp(quantiles.astype(np.float64)), MAX_VOLUME_CM3)
        return ForecastArrays(volumes[..., 1], volumes[..., 0], volumes[..., 2])


@lru_cache(maxsize=4)
def _default_for(models_dir: Path) -> GrowthForecaster:
    package = models_dir / MODEL_NAME
    if (package / "model.onnx").is_file():
        return LstmForecaster.from_package(package)
    return baseline(BEST_BASELINE)


def default_forecaster(models_dir: Path | None = None) -> GrowthForecaster:
    """The installed LSTM package if there is one, else the best baseline (cached)."""
    return _default_for((models_dir or DEFAULT_MODELS_DIR).resolve())


def forecast(timeline: Timeline, forecaster: GrowthForecaster | None = None) -> Forecast:
    """Forecast one lesion's volume at HORIZONS_DAYS after its last visit."""
    method = forecaster or default_forecaster()
    arrays = method.predict([timeline])
    trend, doubling = growth_trend(timeline)
    last = timeline.last_volume_cm3
    median = tuple(float(v) for v in arrays.median[0])
    return Forecast(
        horizons=HORIZONS_DAYS,
        median=median,
        lower=tuple(float(min(lo, m)) for lo, m in zip(arrays.lower[0], median, strict=True)),
        upper=tuple(float(max(hi, m)) for hi, m in zip(arrays.upper[0], median, strict=True)),
        method=method.name,
        doubling_time_days=doubling,
        progression_call=tuple(m >= PROGRESSION_RATIO * last for m in median),
        trend=trend,
        last_volume_cm3=last,
    )


# --- held-out scoring ----------------------------------------------------------------------


@dataclass(frozen=True)
class HorizonScore:
    """One method at one horizon, each value with a bootstrap 95 % interval (lo, hi)."""

    horizon_days: float
    mae_cm3: tuple[float, float, float]
    median_relative_error: tuple[float, float, float]
    coverage: tuple[float, float, float]
    progression_agreement: tuple[float, float, float]
    progression_kappa: float


@dataclass(frozen=True)
class MethodScores:
    method: str
    patients: int
    horizons: tuple[HorizonScore, ...]


@dataclass(frozen=True)
class PairedDifference:
    """MAE(candidate) − MAE(reference) per horizon, with a paired bootstrap 95 % CI."""

    candidate: str
    reference: str
    horizon_days: float
    difference_cm3: float
    ci_lower: float
    ci_upper: float


def _bootstrap_indices(n: int, resamples: int, seed: int) -> NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _with_ci(values: Array, statistic: Callable[[Array], Array], idx: NDArray[np.int64]) -> (
    tuple[float, float, float]
):
    point = float(statistic(values[None, :])[0])
    samples = statistic(values[idx])
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return point, float(min(lo, point)), float(max(hi, point))


def _kappa(predicted: NDArray[np.bool_], actual: NDArray[np.bool_]) -> float:
    observed = float(np.mean(predicted == actual))
    p_pred, p_act = float(predicted.mean()), float(actual.mean())
    expected = p_pred * p_act + (1 - p_pred) * (1 - p_act)
    return 0.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)


def score_method(
    method: str,
    arrays: ForecastArrays,
    actual_cm3: Array,
    last_cm3: Array,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> MethodScores:
    """MAE, median relative error, interval coverage and progression agreement per horizon.

    The truth is the *measured* volume at each horizon (what a later study would show),
    and progression is judged on it exactly as on the forecast: ≥ PROGRESSION_RATIO times
    the last measured volume. The same bootstrap resamples serve every method given the
    same seed, so their intervals are comparable.
    """
    n = actual_cm3.shape[0]
    idx = _bootstrap_indices(n, resamples, seed)
    mean: Callable[[Array], Array] = lambda a: a.mean(axis=-1)  # noqa: E731
    median: Callable[[Array], Array] = lambda a: np.median(a, axis=-1)  # noqa: E731
    scores: list[HorizonScore] = []
    for h, horizon in enumerate(HORIZONS_DAYS):
        truth = actual_cm3[:, h]
        predicted = arrays.median[:, h]
        error = np.abs(predicted - truth)
        covered = ((arrays.lower[:, h] <= truth) & (truth <= arrays.upper[:, h])).astype(float)
        call = predicted >= PROGRESSION_RATIO * last_cm3
        progressed = truth >= PROGRESSION_RATIO * last_cm3
        agree = (call == progressed).astype(float)
        scores.append(
            HorizonScore(
                horizon_days=horizon,
                mae_cm3=_with_ci(error, mean, idx),
                median_relative_error=_with_ci(
                    error / np.maximum(truth, MIN_VOLUME_CM3), median, idx
                ),
                coverage=_with_ci(covered, mean, idx),
                progression_agreement=_with_ci(agree, mean, idx),
                progression_kappa=_kappa(call, progressed),
            )
        )
    return MethodScores(method, n, tuple(scores))


def paired_mae_difference(
    candidate: tuple[str, ForecastArrays],
    reference: tuple[str, ForecastArrays],
    actual_cm3: Array,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[PairedDifference, ...]:
    """Per horizon: MAE(candidate) − MAE(reference), resampling patients jointly."""
    idx = _bootstrap_indices(actual_cm3.shape[0], resamples, seed)
    differences: list[PairedDifference] = []
    for h, horizon in enumerate(HORIZONS_DAYS):
        delta = np.abs(candidate[1].median[:, h] - actual_cm3[:, h]) - np.abs(
            reference[1].median[:, h] - actual_cm3[:, h]
        )
        point = float(delta.mean())
        lo, hi = np.quantile(delta[idx].mean(axis=1), [0.025, 0.975])
        differences.append(
            PairedDifference(
                candidate[0], reference[0], horizon, point, float(min(lo, point)),
                float(max(hi, point)),
            )
        )
    return tuple(differences)
