"""Serving side of the growth forecaster: timelines, fits, baselines, the forecast API."""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from dicomnode.history.growth import (
    BASELINE_CALIBRATION,
    BEST_BASELINE,
    FEATURE_NAMES,
    HORIZONS_DAYS,
    MAX_VISITS,
    Forecast,
    ForecastArrays,
    Timeline,
    TimelineError,
    TimelinePoint,
    baseline,
    current_segment,
    default_forecaster,
    fit_growth,
    forecast,
    gompertz_point,
    growth_trend,
    last_value_point,
    log_linear_point,
    paired_mae_difference,
    score_method,
    timeline_features,
)


def _timeline(days: list[float], volumes: list[float], **flags: list[bool | None]) -> Timeline:
    resection = flags.get("resection", [None] * len(days))
    therapy = flags.get("therapy", [None] * len(days))
    return Timeline(
        tuple(
            TimelinePoint(d, v, r, t)
            for d, v, r, t in zip(days, volumes, resection, therapy, strict=True)
        )
    )


def _exponential(doubling_days: float, days: list[float], v0: float = 5.0) -> Timeline:
    return _timeline(days, [v0 * 2 ** (d / doubling_days) for d in days])


def _gompertz(days: np.ndarray, v0: float, k: float, alpha: float) -> np.ndarray:
    return np.exp(math.log(k) - math.log(k / v0) * np.exp(-alpha * days))


def test_timeline_validates_order_and_values() -> None:
    with pytest.raises(TimelineError):
        _timeline([0, 30, 30], [1, 2, 3])
    with pytest.raises(TimelineError):
        _timeline([0, 30], [1, -2])
    with pytest.raises(TimelineError):
        Timeline(())
    built = Timeline.from_dates([date(2024, 1, 1), date(2024, 3, 1)], [2.0, 3.0])
    assert list(built.days) == [0.0, 60.0]
    assert not built.treatments_known


def test_segment_starts_after_a_resection_or_a_halving() -> None:
    flagged = _timeline([0, 20, 80, 140], [30, 3, 4, 5], resection=[False, True, False, False])
    assert current_segment(flagged) == 1
    unflagged = _timeline([0, 20, 80, 140], [30, 3, 4, 5])
    assert current_segment(unflagged) == 1
    growing = _timeline([0, 60, 120], [3, 4, 5])
    assert current_segment(growing) == 0


def test_exponential_growth_gives_its_doubling_time() -> None:
    timeline = _exponential(45.0, [0, 60, 120, 180])
    trend, doubling = growth_trend(timeline)
    assert trend == "growing"
    assert doubling == pytest.approx(45.0, rel=1e-6)
    np.testing.assert_allclose(
        log_linear_point(timeline),
        math.log(timeline.last_volume_cm3) + math.log(2) / 45.0 * np.asarray(HORIZONS_DAYS),
    )


def test_shrinking_or_noise_level_change_is_not_growing() -> None:
    assert growth_trend(_exponential(-120.0, [0, 90, 180]))[0] == "not growing"
    stable = _timeline([0, 180, 365, 540], [10.0, 10.3, 9.8, 10.2])
    assert growth_trend(stable) == ("not growing", None)
    assert growth_trend(_timeline([0, 10], [1.0, 2.0])) == ("unknown", None)
    assert growth_trend(_timeline([0], [1.0])) == ("unknown", None)


def test_gompertz_fit_recovers_a_decelerating_curve() -> None:
    days = np.arange(0.0, 600.0, 60.0)
    volumes = _gompertz(days, 5.0, 80.0, 0.006)
    timeline = _timeline(list(days), list(volumes))
    fit = fit_growth(timeline)
    assert fit is not None and fit.law == "gompertz"
    true_rate = 0.006 * math.log(80.0 / 5.0) * math.exp(-0.006 * days[-1])
    assert fit.rate_per_day(days[-1]) == pytest.approx(true_rate, rel=0.15)
    predicted = np.exp(gompertz_point(timeline, capacity_multiple=3.0))
    expected = _gompertz(days[-1] + np.asarray(HORIZONS_DAYS), 5.0, 80.0, 0.006)
    np.testing.assert_allclose(predicted, expected, rtol=0.05)


def test_extrapolation_is_bounded() -> None:
    fast = _exponential(3.0, [0, 30, 60])  # doubling in 3 days: rate clipped to 14 days
    assert np.exp(log_linear_point(fast)[0]) <= fast.last_volume_cm3 * 2 ** (91 / 14) * 1.001
    arrays = baseline("log-linear").predict([fast])
    assert arrays.median.max() <= 500.0


def test_last_value_and_short_histories() -> None:
    single = _timeline([0], [4.0])
    np.testing.assert_allclose(np.exp(last_value_point(single)), [4.0] * 3)
    np.testing.assert_allclose(np.exp(gompertz_point(single)), [4.0] * 3)
    np.testing.assert_allclose(np.exp(log_linear_point(_timeline([0, 7], [4.0, 8.0]))), [8.0] * 3)


def test_forecast_api_and_progression_call(tmp_path: Path) -> None:
    growing = _exponential(60.0, [0, 60, 120, 180], v0=2.0)
    result = forecast(growing, baseline("gompertz"))
    assert isinstance(result, Forecast)
    assert result.horizons == HORIZONS_DAYS
    assert result.method == "gompertz"
    assert result.trend == "growing" and result.growing
    assert result.doubling_time_days == pytest.approx(60.0, rel=0.05)
    for lo, mid, hi in zip(result.lower, result.median, result.upper, strict=True):
        assert lo <= mid <= hi
    assert result.progression_call == tuple(
        m >= 1.4 * result.last_volume_cm3 for m in result.median
    )
    assert result.progression_call[-1]
    stable = forecast(_timeline([0, 90, 180], [5.0, 5.0, 5.0]), baseline("last-value"))
    assert stable.progression_call == (False, False, False)
    assert stable.doubling_time_days is None and stable.trend == "not growing"
    # Without an installed package the best baseline serves, through the same API.
    fallback = default_forecaster(tmp_path)
    assert fallback.name == BEST_BASELINE
    assert forecast(growing, fallback).method == BEST_BASELINE


def test_forecast_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError):
        Forecast((91.0,), (5.0,), (6.0,), (7.0,), "x", None, (False,), "not growing", 5.0)
    with pytest.raises(ValueError):
        Forecast((91.0,), (5.0,), (4.0,), (7.0,), "x", None, (False,), "growing", 5.0)


def test_features_are_left_padded_and_relative_to_the_last_visit() -> None:
    timeline = _timeline([0, 100, 200], [2.0, 4.0, 8.0], resection=[False, True, False],
                         therapy=[False, False, True])
    rows = timeline_features(timeline)
    assert rows.shape == (MAX_VISITS, len(FEATURE_NAMES)) and rows.dtype == np.float32
    assert not rows[: MAX_VISITS - 3].any()
    last = rows[-1]
    assert last[FEATURE_NAMES.index("present")] == 1.0
    assert last[FEATURE_NAMES.index("log_volume_to_last")] == 0.0
    assert rows[-3, FEATURE_NAMES.index("log_volume_to_last")] == pytest.approx(-math.log(4))
    assert rows[-2, FEATURE_NAMES.index("resection")] == 1.0
    assert last[FEATURE_NAMES.index("therapy")] == 1.0
    unknown = timeline_features(_timeline([0, 100], [2.0, 4.0]))
    assert not unknown[:, FEATURE_NAMES.index("treatments_known")].any()
    long = _timeline(list(range(0, 20 * 30, 30)), [1.0 + i for i in range(20)])
    assert timeline_features(long)[0, FEATURE_NAMES.index("present")] == 1.0


def test_scores_of_a_perfect_forecast() -> None:
    actual = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 8.0]])
    last = np.array([1.0, 4.0])
    perfect = ForecastArrays(actual, actual * 0.9, actual * 1.1)
    scores = score_method("perfect", perfect, actual, last, resamples=50)
    for h in scores.horizons:
        assert h.mae_cm3 == (0.0, 0.0, 0.0)
        assert h.coverage[0] == 1.0 and h.progression_agreement[0] == 1.0
    worse = ForecastArrays(actual + 1.0, actual, actual + 2.0)
    (first, *_) = paired_mae_difference(("perfect", perfect), ("worse", worse), actual,
                                        resamples=50)
    assert first.difference_cm3 == pytest.approx(-1.0)
    assert first.ci_upper < 0


def test_stored_baseline_calibration_matches_its_cohort() -> None:
    from dicomnode.history.cohort import (
        CALIBRATION_N,
        CALIBRATION_SEED,
        baseline_calibrations,
        generate_cohort,
    )

    fresh = baseline_calibrations(generate_cohort(CALIBRATION_N, CALIBRATION_SEED))
    for method, stored in BASELINE_CALIBRATION.items():
        for quantile in ("lower", "median", "upper"):
            np.testing.assert_allclose(
                getattr(stored, quantile), getattr(fresh[method], quantile), atol=1e-3
            )
