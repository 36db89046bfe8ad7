"""The synthetic cohort: seeded, shaped as issue 5 asks, and faithful to its growth laws."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dicomnode.history.cohort import (
    CALIBRATION_SEED,
    DEFAULT_PARAMETERS,
    ORACLE,
    CohortParameters,
    TypeParameters,
    baseline_calibrations,
    compare,
    generate_cohort,
)
from dicomnode.history.growth import HORIZONS_DAYS, MIN_VOLUME_CM3


def _only(tumour_type: str, **changes: object) -> CohortParameters:
    """Parameters with a single tumour type, optionally changed (e.g. no treatment)."""
    base = DEFAULT_PARAMETERS.types[tumour_type]  # type: ignore[index]
    single = dataclasses.replace(base, share=1.0, **changes)  # type: ignore[arg-type]
    return CohortParameters(types={tumour_type: single})  # type: ignore[dict-item]


UNTREATED = {"resection_probability": 0.0, "therapy_probability": 0.0}


def test_same_seed_same_patients_and_patient_independent_of_n() -> None:
    small = generate_cohort(5, 42)
    large = generate_cohort(20, 42)
    assert small.patients == large.patients[:5]
    assert generate_cohort(5, 43).patients != small.patients


def test_patients_are_shaped_as_the_issue_asks() -> None:
    cohort = generate_cohort(300, 7)
    types = set(cohort.tumour_types())
    assert types == {"hgg", "lgg", "meningioma", "metastasis"}
    for p in cohort.patients:
        assert 3 <= len(p.visit_days) <= 15
        assert all(b > a for a, b in zip(p.visit_days, p.visit_days[1:], strict=False))
        assert min(p.volumes_cm3) >= MIN_VOLUME_CM3
        assert 0.05 <= p.noise_cv <= 0.10
        assert len(p.resection_flags) == len(p.therapy_flags) == len(p.visit_days)
        assert len(p.target_cm3) == len(HORIZONS_DAYS)
        # A forecast is for current management: nothing starts after the last visit.
        assert all(event.day < p.visit_days[-1] for event in p.events)
        assert p.timeline().treatments_known
        assert not p.timeline(treatments_known=False).treatments_known
    gaps = np.concatenate([np.diff(p.visit_days) for p in cohort.patients])
    assert len(np.unique(gaps)) > 100  # irregular intervals


def test_measurement_noise_is_five_to_ten_percent() -> None:
    cohort = generate_cohort(400, 11)
    ratios = [
        math.log(m / t)
        for p in cohort.patients
        for m, t in zip(p.volumes_cm3, p.true_volumes_cm3, strict=True)
        if t > 1.0
    ]
    assert 0.06 < float(np.std(ratios)) < 0.09
    assert abs(float(np.mean(ratios))) < 0.01


def test_untreated_glioblastoma_follows_its_gompertz_curve() -> None:
    cohort = generate_cohort(40, 3, _only("hgg", **UNTREATED))
    doubling = []
    for p in cohort.patients:
        v0, k = p.drawn["initial_volume_cm3"], p.drawn["capacity_cm3"]
        alpha = math.log(2) / p.drawn["doubling_time_days"] / math.log(k / v0)
        days = np.array(p.visit_days, dtype=float)
        expected = np.exp(math.log(k) - math.log(k / v0) * np.exp(-alpha * days))
        np.testing.assert_allclose(p.true_volumes_cm3, expected, rtol=0.03)
        doubling.append(p.drawn["doubling_time_days"])
    # Issue 5: untreated high-grade glioma doubles in roughly 3-7 weeks.
    assert 21 <= float(np.median(doubling)) <= 49


def test_low_grade_glioma_diameter_grows_linearly_by_a_few_mm_a_year() -> None:
    cohort = generate_cohort(40, 5, _only("lgg", **UNTREATED))
    velocities = []
    for p in cohort.patients:
        diameters = np.cbrt(6000.0 * np.array(p.true_volumes_cm3) / math.pi)
        days = np.array(p.visit_days, dtype=float)
        if diameters[-1] > 0.95 * math.cbrt(6000.0 * 250.0 / math.pi):
            continue  # reached the capacity
        slope = np.polyfit(days, diameters, 1)[0] * 365.25
        np.testing.assert_allclose(slope, p.drawn["velocity_mm_per_year"], rtol=0.02)
        velocities.append(slope)
    assert 2.5 <= float(np.median(velocities)) <= 6.0


def test_resection_drops_volume_to_its_residual_fraction() -> None:
    params = _only("hgg", resection_probability=1.0, therapy_probability=0.0)
    cohort = generate_cohort(30, 9, params)
    for p in cohort.patients:
        (resection,) = p.events
        assert resection.kind == "resection"
        assert p.resection_flags[1] and not any(p.resection_flags[2:])
        before, after = p.true_volumes_cm3[0], p.true_volumes_cm3[1]
        growth = after / (before * resection.residual_fraction)
        assert 1.0 <= growth < 2.5  # regrowth over ~1-4 weeks only


def test_therapy_shrinks_then_flags_are_set() -> None:
    params = _only("metastasis", resection_probability=0.0, therapy_probability=1.0,
                   pseudoprogression_probability=0.0)
    cohort = generate_cohort(60, 13, params)
    treated = [p for p in cohort.patients if p.events]
    assert len(treated) > 40
    shrinking = sum(p.true_volumes_cm3[2] < p.true_volumes_cm3[1] for p in treated)
    assert shrinking > 0.8 * len(treated)
    assert all(any(p.therapy_flags) for p in treated)


def test_parameters_validate_themselves() -> None:
    hgg = DEFAULT_PARAMETERS.types["hgg"]
    with pytest.raises(ValueError, match="shares"):
        CohortParameters(types={"hgg": dataclasses.replace(hgg, share=0.5)})
    with pytest.raises(ValueError, match="probabilit"):
        dataclasses.replace(hgg, growth_laws={"gompertz": 0.5})
    with pytest.raises(ValueError, match="probability"):
        dataclasses.replace(hgg, resection_probability=1.5)
    assert isinstance(hgg, TypeParameters)
    with pytest.raises(ValueError):
        generate_cohort(0, 1)


def test_comparison_scores_every_baseline_and_refuses_the_calibration_seed() -> None:
    calibrations = baseline_calibrations(generate_cohort(200, 21))
    test = generate_cohort(120, 22)
    comparison = compare(test, calibrations, resamples=200)
    names = [s.method for s in comparison.scores]
    assert names == [ORACLE, "last-value", "log-linear", "gompertz"]
    noise_floor = comparison.method(ORACLE)
    for h in noise_floor.horizons:
        assert h.mae_cm3[1] <= h.mae_cm3[0] <= h.mae_cm3[2]
    assert "MAE cm³" in comparison.table()
    with pytest.raises(ValueError, match="calibration"):
        compare(generate_cohort(5, CALIBRATION_SEED), calibrations)
