"""A synthetic longitudinal brain-tumour cohort with known truth, for the growth forecaster.

No public dataset follows enough patients with enough volumetric scans to train and test
a forecaster (BraTS is one timepoint per patient), so the forecaster is developed on
simulated patients whose growth laws and treatment effects follow published kinetics.
Every number below is one of the documented parameters in ``docs/growth-parameters.md``,
which names its source or says that it is an assumption; change one, change both.

Each patient has one lesion of one type (high-grade glioma, low-grade glioma, meningioma,
brain metastasis) that grows by the law reported for that type (Gompertz, exponential, or
linear growth of the mean diameter), is measured at 3-15 irregular visits with 5-10 %
multiplicative segmentation noise, and may be resected (the volume drops to a residual
fraction) or treated (radio/chemotherapy or radiosurgery shrinks it for a while, after
which it regrows more slowly). Pseudoprogression after radiotherapy is a transient bump.

What is forecast is the *measured* volume at +3, +6 and +12 months after the last visit,
with no new resection or treatment started after the last visit (a forecast is made for
the current management); effects already under way (a response ending, pseudoprogression)
do continue into the forecast window, as they would in clinic.

Patients are drawn from ``numpy.random.default_rng([seed, index])``, so patient ``i`` of
seed ``s`` is the same whatever ``n`` is, and cohorts of different seeds are independent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from dicomnode.history.growth import (
    HORIZONS_DAYS,
    MAX_VOLUME_CM3,
    MIN_VOLUME_CM3,
    ForecastArrays,
    IntervalCalibration,
    MethodScores,
    PairedDifference,
    Timeline,
    TimelinePoint,
    baseline,
    calibrate_intervals,
    paired_mae_difference,
    score_method,
)

__all__ = [
    "BASELINES",
    "CALIBRATION_N",
    "CALIBRATION_SEED",
    "COHORT_VERSION",
    "DEFAULT_PARAMETERS",
    "ORACLE",
    "Cohort",
    "CohortParameters",
    "Comparison",
    "GrowthLaw",
    "LogNormal",
    "LogUniform",
    "SyntheticPatient",
    "TreatmentEvent",
    "TumourType",
    "TypeParameters",
    "Uniform",
    "baseline_calibrations",
    "compare",
    "generate_cohort",
]

COHORT_VERSION = 1
TumourType = Literal["hgg", "lgg", "meningioma", "metastasis"]
GrowthLaw = Literal["exponential", "gompertz", "linear_radial", "stable"]
TreatmentKind = Literal["resection", "therapy"]

BASELINES: tuple[str, ...] = ("last-value", "log-linear", "gompertz")
_Key = TypeVar("_Key", bound=str)
_LAW_CODE: dict[GrowthLaw, int] = {"exponential": 0, "gompertz": 1, "linear_radial": 2, "stable": 0}
_MAX_SIMULATED_CM3 = 1000.0
_MIN_SIMULATED_CM3 = 0.001


# --- distributions -------------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormal:
    """exp(N(ln median, sigma²)): positive, right-skewed, as growth rates and sizes are."""

    median: float
    sigma: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(self.median * math.exp(self.sigma * rng.standard_normal()))


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class LogUniform:
    """Uniform in the logarithm: for ranges spanning an order of magnitude."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


Distribution = LogNormal | Uniform | LogUniform


# --- parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TypeParameters:
    """Everything that differs between tumour types; see docs/growth-parameters.md.

    ``growth_laws`` are probabilities; "stable" is no growth at all. Growth speed is the
    volume doubling time at the first visit (exponential and Gompertz), or the velocity
    of diametric expansion (linear_radial). The Gompertz carrying capacity is drawn as a
    ratio to the first volume. A therapy shrinks the lesion at ``therapy_halving_days``
    from its start for ``therapy_response_days``, after which growth resumes at
    ``post_therapy_rate_factor`` times the untreated rate.
    """

    share: float
    growth_laws: Mapping[GrowthLaw, float]
    initial_volume_cm3: Distribution
    initial_volume_range_cm3: tuple[float, float]
    doubling_time_days: Distribution | None
    shrinking_fraction: float
    shrink_halving_days: Distribution | None
    capacity_ratio: Distribution | None
    max_capacity_cm3: float
    diameter_velocity_mm_per_year: Distribution | None
    visit_interval_days: Distribution
    first_interval_days: Distribution | None
    resection_probability: float
    resection_after_first_visit_days: Distribution
    gross_total_probability: float
    residual_fraction_gross_total: Distribution
    residual_fraction_subtotal: Distribution
    postoperative_scan_days: Distribution
    therapy_probability: float
    therapy_timing: Literal["after_diagnosis", "after_visit"]
    therapy_delay_days: Distribution
    therapy_course_days: Distribution
    therapy_response_days: Distribution
    therapy_halving_days: Distribution
    post_therapy_rate_factor: Distribution
    durable_control_probability: float
    pseudoprogression_probability: float
    pseudoprogression_onset_days: Distribution
    pseudoprogression_ratio: Distribution
    pseudoprogression_duration_days: Distribution

    def __post_init__(self) -> None:
        total = sum(self.growth_laws.values())
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"growth-law probabilities sum to {total}, not 1")
        for name in ("resection_probability", "therapy_probability", "shrinking_fraction",
                     "gross_total_probability", "pseudoprogression_probability",
                     "durable_control_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} is not a probability")


@dataclass(frozen=True)
class CohortParameters:
    """Per-type parameters, the type mix, visit counts and measurement noise."""

    types: Mapping[TumourType, TypeParameters]
    visits: tuple[int, int] = (3, 15)
    noise_cv: Distribution = Uniform(0.05, 0.10)
    min_visit_gap_days: int = 14

    def __post_init__(self) -> None:
        total = sum(t.share for t in self.types.values())
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"type shares sum to {total}, not 1")
        if not 1 <= self.visits[0] <= self.visits[1]:
            raise ValueError(f"visit range {self.visits} is not 1 <= low <= high")


DEFAULT_PARAMETERS = CohortParameters(
    types={
        # Glioblastoma-like: Gompertz (Stensjøen 2015), untreated doubling 3-7 weeks
        # (Ellingson 2016: median 21 d; Stensjøen 2015: median 50 d), Stupp-protocol
        # chemoradiation with median progression-free survival ~7 months (Stupp 2005).
        "hgg": TypeParameters(
            share=0.35,
            growth_laws={"gompertz": 1.0},
            initial_volume_cm3=LogNormal(25.0, 0.8),
            initial_volume_range_cm3=(1.0, 150.0),
            doubling_time_days=LogNormal(33.0, 0.35),
            shrinking_fraction=0.0,
            shrink_halving_days=None,
            capacity_ratio=LogUniform(2.0, 6.0),
            max_capacity_cm3=250.0,
            diameter_velocity_mm_per_year=None,
            visit_interval_days=LogNormal(60.0, 0.25),
            first_interval_days=None,
            resection_probability=0.8,
            resection_after_first_visit_days=Uniform(7.0, 28.0),
            gross_total_probability=0.5,
            residual_fraction_gross_total=Uniform(0.01, 0.05),
            residual_fraction_subtotal=Uniform(0.1, 0.5),
            postoperative_scan_days=Uniform(1.0, 3.0),
            therapy_probability=0.9,
            therapy_timing="after_diagnosis",
            therapy_delay_days=Uniform(21.0, 42.0),
            therapy_course_days=Uniform(200.0, 220.0),
            therapy_response_days=LogNormal(210.0, 0.5),
            therapy_halving_days=LogNormal(180.0, 0.5),
            post_therapy_rate_factor=Uniform(0.5, 1.0),
            durable_control_probability=0.0,
            pseudoprogression_probability=0.2,
            pseudoprogression_onset_days=Uniform(42.0, 126.0),
            pseudoprogression_ratio=Uniform(1.3, 2.0),
            pseudoprogression_duration_days=Uniform(60.0, 150.0),
        ),
        # Diffuse low-grade glioma: mean diameter grows linearly, ~4 mm/yr
        # (Mandonnet 2003: 4.1 mm/yr; Pallud 2013: mean 5.8 ± 6.3 mm/yr).
        "lgg": TypeParameters(
            share=0.20,
            growth_laws={"linear_radial": 1.0},
            initial_volume_cm3=LogNormal(33.5, 0.75),
            initial_volume_range_cm3=(2.0, 150.0),
            doubling_time_days=None,
            shrinking_fraction=0.0,
            shrink_halving_days=None,
            capacity_ratio=None,
            max_capacity_cm3=250.0,
            diameter_velocity_mm_per_year=LogNormal(4.0, 0.6),
            visit_interval_days=LogNormal(150.0, 0.25),
            first_interval_days=LogNormal(90.0, 0.25),
            resection_probability=0.5,
            resection_after_first_visit_days=Uniform(14.0, 90.0),
            gross_total_probability=0.3,
            residual_fraction_gross_total=Uniform(0.01, 0.1),
            residual_fraction_subtotal=Uniform(0.1, 0.6),
            postoperative_scan_days=Uniform(1.0, 3.0),
            therapy_probability=0.25,
            therapy_timing="after_visit",
            therapy_delay_days=Uniform(14.0, 60.0),
            therapy_course_days=Uniform(42.0, 365.0),
            therapy_response_days=LogNormal(900.0, 0.5),
            therapy_halving_days=LogNormal(730.0, 0.5),
            post_therapy_rate_factor=Uniform(0.5, 1.0),
            durable_control_probability=0.3,
            pseudoprogression_probability=0.05,
            pseudoprogression_onset_days=Uniform(42.0, 180.0),
            pseudoprogression_ratio=Uniform(1.2, 1.5),
            pseudoprogression_duration_days=Uniform(90.0, 180.0),
        ),
        # Meningioma: mostly slow, often decelerating (Nakasu 2011; Strand 2023: Gompertz
        # fits best, 27 % stable, 14 % shrinking); doubling times of years (Nakamura 2003).
        "meningioma": TypeParameters(
            share=0.25,
            growth_laws={"gompertz": 0.35, "exponential": 0.25, "stable": 0.4},
            initial_volume_cm3=LogNormal(5.0, 1.0),
            initial_volume_range_cm3=(0.3, 120.0),
            doubling_time_days=LogNormal(2200.0, 0.9),
            shrinking_fraction=0.14,
            shrink_halving_days=LogNormal(3650.0, 0.5),
            capacity_ratio=LogUniform(1.5, 10.0),
            max_capacity_cm3=150.0,
            diameter_velocity_mm_per_year=None,
            visit_interval_days=LogNormal(365.0, 0.2),
            first_interval_days=LogNormal(180.0, 0.2),
            resection_probability=0.1,
            resection_after_first_visit_days=Uniform(30.0, 180.0),
            gross_total_probability=0.7,
            residual_fraction_gross_total=Uniform(0.01, 0.05),
            residual_fraction_subtotal=Uniform(0.1, 0.4),
            postoperative_scan_days=Uniform(60.0, 120.0),
            therapy_probability=0.1,
            therapy_timing="after_visit",
            therapy_delay_days=Uniform(30.0, 90.0),
            therapy_course_days=Uniform(1.0, 42.0),
            therapy_response_days=LogNormal(1800.0, 0.5),
            therapy_halving_days=LogNormal(3650.0, 0.5),
            post_therapy_rate_factor=Uniform(0.1, 0.5),
            durable_control_probability=0.9,
            pseudoprogression_probability=0.0,
            pseudoprogression_onset_days=Uniform(90.0, 180.0),
            pseudoprogression_ratio=Uniform(1.1, 1.3),
            pseudoprogression_duration_days=Uniform(90.0, 180.0),
        ),
        # Brain metastasis: small at detection (Kobets 2020: 2.4-5.1 cm³), doubling in
        # 3-5 months untreated (Kobets 2020: 86 d breast, 139 d lung), mostly radiosurgery.
        "metastasis": TypeParameters(
            share=0.20,
            growth_laws={"exponential": 0.7, "gompertz": 0.3},
            initial_volume_cm3=LogNormal(2.0, 1.0),
            initial_volume_range_cm3=(0.1, 40.0),
            doubling_time_days=LogNormal(100.0, 0.5),
            shrinking_fraction=0.0,
            shrink_halving_days=None,
            capacity_ratio=LogUniform(5.0, 50.0),
            max_capacity_cm3=60.0,
            diameter_velocity_mm_per_year=None,
            visit_interval_days=LogNormal(75.0, 0.25),
            first_interval_days=None,
            resection_probability=0.2,
            resection_after_first_visit_days=Uniform(7.0, 28.0),
            gross_total_probability=0.8,
            residual_fraction_gross_total=Uniform(0.01, 0.05),
            residual_fraction_subtotal=Uniform(0.1, 0.4),
            postoperative_scan_days=Uniform(1.0, 3.0),
            therapy_probability=0.85,
            therapy_timing="after_diagnosis",
            therapy_delay_days=Uniform(7.0, 35.0),
            therapy_course_days=Uniform(1.0, 5.0),
            therapy_response_days=LogNormal(365.0, 0.7),
            therapy_halving_days=LogNormal(90.0, 0.5),
            post_therapy_rate_factor=Uniform(0.3, 1.0),
            durable_control_probability=0.7,
            pseudoprogression_probability=0.15,
            pseudoprogression_onset_days=Uniform(90.0, 270.0),
            pseudoprogression_ratio=Uniform(1.3, 2.0),
            pseudoprogression_duration_days=Uniform(90.0, 180.0),
        ),
    }
)


# --- patients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreatmentEvent:
    """A resection (``residual_fraction`` left) or a therapy course (``end_day`` > day)."""

    kind: TreatmentKind
    day: int
    end_day: int
    residual_fraction: float | None = None


@dataclass(frozen=True)
class SyntheticPatient:
    """One simulated lesion: what the node would measure, and the truth behind it."""

    patient_id: str
    tumour_type: TumourType
    growth_law: GrowthLaw
    visit_days: tuple[int, ...]
    volumes_cm3: tuple[float, ...]
    true_volumes_cm3: tuple[float, ...]
    resection_flags: tuple[bool, ...]
    therapy_flags: tuple[bool, ...]
    events: tuple[TreatmentEvent, ...]
    noise_cv: float
    target_days: tuple[int, ...]
    target_cm3: tuple[float, ...]
    target_true_cm3: tuple[float, ...]
    true_rate_at_last_per_day: float
    drawn: Mapping[str, float] = field(default_factory=dict)

    def timeline(self, *, treatments_known: bool = True) -> Timeline:
        """The timeline the node would assemble; treatments are None when unknown."""
        return Timeline(
            tuple(
                TimelinePoint(
                    float(day),
                    volume,
                    resection if treatments_known else None,
                    therapy if treatments_known else None,
                )
                for day, volume, resection, therapy in zip(
                    self.visit_days,
                    self.volumes_cm3,
                    self.resection_flags,
                    self.therapy_flags,
                    strict=True,
                )
            )
        )


@dataclass(frozen=True)
class Cohort:
    """Patients of one seed, and the parameters that made them."""

    seed: int
    parameters: CohortParameters
    patients: tuple[SyntheticPatient, ...]

    def timelines(self, *, treatments_known: bool = True) -> list[Timeline]:
        return [p.timeline(treatments_known=treatments_known) for p in self.patients]

    def targets_cm3(self) -> NDArray[np.float64]:
        """(n, horizons) measured volumes at the forecast horizons."""
        return np.array([p.target_cm3 for p in self.patients], dtype=np.float64)

    def true_targets_cm3(self) -> NDArray[np.float64]:
        return np.array([p.target_true_cm3 for p in self.patients], dtype=np.float64)

    def last_volumes_cm3(self) -> NDArray[np.float64]:
        return np.array(
            [max(p.volumes_cm3[-1], MIN_VOLUME_CM3) for p in self.patients], dtype=np.float64
        )

    def tumour_types(self) -> list[TumourType]:
        return [p.tumour_type for p in self.patients]


@dataclass
class _Plan:
    """A patient's drawn parameters before simulation (mutable while it is built)."""

    tumour_type: TumourType
    law: GrowthLaw
    visits: list[int]
    log_v0: float
    rate0: float
    alpha: float
    log_k: float
    velocity_mm_per_day: float
    resection_day: int = -1
    log_residual: float = 0.0
    therapy_start: int = -1
    therapy_end: int = -1
    course_end: int = -1
    shrink_rate: float = 0.0
    post_factor: float = 1.0
    psp_start: int = -1
    psp_days: float = 1.0
    psp_log_amplitude: float = 0.0
    noise_cv: float = 0.075
    drawn: dict[str, float] = field(default_factory=dict)


def _pick(rng: np.random.Generator, options: Mapping[_Key, float]) -> _Key:
    names = list(options)
    return names[int(rng.choice(len(names), p=np.array([options[n] for n in names])))]


def _plan_patient(params: CohortParameters, rng: np.random.Generator) -> _Plan:
    tumour_type = _pick(rng, {k: v.share for k, v in params.types.items()})
    tp = params.types[tumour_type]
    law = _pick(rng, tp.growth_laws)
    low, high = tp.initial_volume_range_cm3
    v0 = min(max(tp.initial_volume_cm3.sample(rng), low), high)
    doubling = tp.doubling_time_days.sample(rng) if tp.doubling_time_days else math.inf
    rate0 = math.log(2.0) / doubling
    if law == "stable":
        rate0 = 0.0
        shrinking = tp.shrinking_fraction / max(tp.growth_laws.get("stable", 1.0), 1e-9)
        if tp.shrink_halving_days is not None and rng.random() < shrinking:
            rate0 = -math.log(2.0) / tp.shrink_halving_days.sample(rng)
    ratio = tp.capacity_ratio.sample(rng) if tp.capacity_ratio else math.inf
    capacity = max(min(v0 * ratio, tp.max_capacity_cm3), 1.2 * v0)
    log_k = math.log(capacity)
    alpha = rate0 / max(log_k - math.log(v0), 1e-3)
    velocity = (
        tp.diameter_velocity_mm_per_year.sample(rng) / 365.25
        if tp.diameter_velocity_mm_per_year
        else 0.0
    )

    n_visits = int(rng.integers(params.visits[0], params.visits[1] + 1))
    visits = [0]
    plan = _Plan(tumour_type, law, visits, math.log(v0), rate0, alpha, log_k, velocity)
    plan.noise_cv = params.noise_cv.sample(rng)
    plan.drawn = {"initial_volume_cm3": v0, "doubling_time_days": doubling,
                  "capacity_cm3": math.exp(log_k), "velocity_mm_per_year": velocity * 365.25}
    if n_visits >= 2 and rng.random() < tp.resection_probability:
        plan.resection_day = max(1, round(tp.resection_after_first_visit_days.sample(rng)))
        gross = rng.random() < tp.gross_total_probability
        residual = (tp.residual_fraction_gross_total if gross else tp.residual_fraction_subtotal)
        fraction = residual.sample(rng)
        plan.log_residual = math.log(fraction)
        plan.drawn["residual_fraction"] = fraction
        visits.append(plan.resection_day + max(1, round(tp.postoperative_scan_days.sample(rng))))
    while len(visits) < n_visits:
        first = len(visits) == 1 and tp.first_interval_days is not None
        source = tp.first_interval_days if first and tp.first_interval_days else (
            tp.visit_interval_days
        )
        visits.append(visits[-1] + max(params.min_visit_gap_days, round(source.sample(rng))))

    if rng.random() < tp.therapy_probability:
        if tp.therapy_timing == "after_diagnosis":
            anchor = plan.resection_day if plan.resection_day >= 0 else 0
        else:
            anchor = visits[int(rng.integers(1, len(visits) - 1))] if len(visits) > 2 else -1
        start = anchor + round(tp.therapy_delay_days.sample(rng)) if anchor >= 0 else -1
        # No management decision after the last visit: a forecast is for current care.
        if 0 < start < visits[-1]:
            plan.therapy_start = start
            plan.course_end = start + max(1, round(tp.therapy_course_days.sample(rng)))
            plan.therapy_end = start + max(1, round(tp.therapy_response_days.sample(rng)))
            plan.shrink_rate = math.log(2.0) / tp.therapy_halving_days.sample(rng)
            plan.post_factor = tp.post_therapy_rate_factor.sample(rng)
            if rng.random() < tp.durable_control_probability:
                plan.post_factor = 0.0
            plan.drawn["response_days"] = float(plan.therapy_end - start)
            if rng.random() < tp.pseudoprogression_probability:
                plan.psp_start = start + round(tp.pseudoprogression_onset_days.sample(rng))
                plan.psp_days = tp.pseudoprogression_duration_days.sample(rng)
                plan.psp_log_amplitude = math.log(tp.pseudoprogression_ratio.sample(rng))
    return plan


def _grow(
    law: NDArray[np.int64],
    y: NDArray[np.float64],
    dt: NDArray[np.float64],
    factor: NDArray[np.float64],
    p: Mapping[str, NDArray[np.float64]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Exact untreated growth over ``dt`` days at ``factor`` × the untreated rate.

    Returns the new log volume and the specific growth rate d ln V/dt there. Exponential
    and linear-radial growth stop at the capacity; Gompertz approaches it by itself.
    """
    dt = np.maximum(dt, 0.0)  # pieces not in force are evaluated too, then discarded
    log_k = p["log_k"]
    rate = p["rate0"] * factor
    exp_y = np.where(rate > 0, np.minimum(y + rate * dt, np.maximum(log_k, y)), y + rate * dt)
    exp_rate = np.where((rate > 0) & (exp_y >= log_k), 0.0, rate)
    alpha = p["alpha"] * factor
    gomp_y = log_k - (log_k - y) * np.exp(-alpha * dt)
    gomp_rate = alpha * (log_k - gomp_y)
    diameter = np.cbrt(6000.0 * np.exp(y) / math.pi)
    d_cap = np.cbrt(6000.0 * np.exp(log_k) / math.pi)
    velocity = p["velocity"] * factor
    new_d = np.minimum(diameter + velocity * dt, np.maximum(d_cap, diameter))
    lin_y = np.log(math.pi * new_d**3 / 6000.0)
    lin_rate = np.where(new_d >= d_cap, 0.0, 3.0 * velocity / new_d)
    new_y = np.select([law == 1, law == 2], [gomp_y, lin_y], exp_y)
    new_rate = np.select([law == 1, law == 2], [gomp_rate, lin_rate], exp_rate)
    return new_y, new_rate


def _simulate(plans: Sequence[_Plan]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each lesion's log volume and growth rate at its query days, in closed form.

    Query days are the visits, then the forecast horizons after the last visit. A
    lesion's course is piecewise: growth until the resection (a jump to the residual),
    growth until therapy starts, shrinkage at a constant rate while it works, then growth
    at the post-therapy factor; every piece has an exact solution, so no time stepping
    is needed. Pseudoprogression is added to the measured log volume, not to the state.
    """
    horizons = [int(h) for h in HORIZONS_DAYS]
    rows = [(i, d) for i, p in enumerate(plans) for d in [*p.visits] + [p.visits[-1] + h
                                                                        for h in horizons]]
    who = np.array([r[0] for r in rows])
    t = np.array([r[1] for r in rows], dtype=np.float64)

    def column(name: str) -> NDArray[np.float64]:
        return np.array([float(getattr(plans[i], name)) for i in who])

    law = np.array([_LAW_CODE[plans[i].law] for i in who])
    params = {
        "rate0": column("rate0"),
        "alpha": column("alpha"),
        "log_k": column("log_k"),
        "velocity": column("velocity_mm_per_day"),
    }
    never = 1e9  # days; finite, so masked-out pieces never compute inf − inf
    resection = column("resection_day")
    resected = resection >= 0
    resection = np.where(resected, resection, never)
    start = column("therapy_start")
    treated = start >= 0
    start = np.where(treated, start, never)
    end = np.where(treated, column("therapy_end"), never)
    shrink, post = column("shrink_rate"), column("post_factor")
    one = np.ones_like(t)
    lo_cap, hi_cap = math.log(_MIN_SIMULATED_CM3), math.log(_MAX_SIMULATED_CM3)

    def clip(y: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.clip(y, lo_cap, hi_cap)

    y0 = column("log_v0")
    # State at each boundary (a resection happens at the end of its day, after any visit).
    before_res, _ = _grow(law, y0, np.where(resected, resection, 0.0), one, params)
    after_res = clip(before_res + np.where(resected, column("log_residual"), 0.0))
    origin_growth = np.where(resected, resection, 0.0)
    at_start, _ = _grow(
        law, after_res, np.where(treated, start - origin_growth, 0.0), one, params
    )
    at_end = clip(at_start - shrink * np.where(treated, end - start, 0.0))

    y_pre, r_pre = _grow(law, y0, t, one, params)
    y_mid, r_mid = _grow(law, after_res, t - origin_growth, one, params)
    y_post, r_post = _grow(law, at_end, t - np.where(treated, end, 0.0), post, params)
    y_treat = at_start - shrink * np.where(treated, t - start, 0.0)
    phase = np.select([(t <= resection) & (t < start), t < start, t < end], [0, 1, 2], 3)
    y = clip(np.choose(phase, [y_pre, y_mid, y_treat, y_post]))
    rate = np.choose(phase, [r_pre, r_mid, -shrink, r_post])

    psp_start = column("psp_start")
    phase_psp = (t - psp_start) / column("psp_days")
    bump = np.where(
        (psp_start >= 0) & (phase_psp >= 0) & (phase_psp < 1),
        column("psp_log_amplitude") * np.sin(np.pi * phase_psp),
        0.0,
    )
    width = max(len(p.visits) for p in plans) + len(horizons)
    out_y = np.zeros((len(plans), width))
    out_rate = np.zeros((len(plans), width))
    slot = np.concatenate([np.arange(len(p.visits) + len(horizons)) for p in plans])
    out_y[who, slot] = y + bump
    out_rate[who, slot] = rate
    return out_y, out_rate


def generate_cohort(
    n: int, seed: int, parameters: CohortParameters = DEFAULT_PARAMETERS
) -> Cohort:
    """``n`` synthetic patients of ``seed`` (patient i depends only on seed and i)."""
    if n < 1:
        raise ValueError(f"a cohort needs at least one patient, got n={n}")
    rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    plans = [_plan_patient(parameters, rng) for rng in rngs]
    log_volumes, rates = _simulate(plans)
    patients: list[SyntheticPatient] = []
    for i, (plan, rng) in enumerate(zip(plans, rngs, strict=True)):
        k = len(plan.visits)
        truth = np.exp(log_volumes[i, : k + len(HORIZONS_DAYS)])
        noise = np.exp(plan.noise_cv * rng.standard_normal(truth.size))
        measured = np.maximum(truth * noise, MIN_VOLUME_CM3)
        resection_flags, therapy_flags = [], []
        previous = -1
        for day in plan.visits:
            resection_flags.append(previous < plan.resection_day <= day)
            therapy_flags.append(
                plan.therapy_start >= 0 and plan.therapy_start <= day and plan.course_end > previous
            )
            previous = day
        events: list[TreatmentEvent] = []
        if plan.resection_day >= 0:
            events.append(TreatmentEvent("resection", plan.resection_day, plan.resection_day,
                                         math.exp(plan.log_residual)))
        if plan.therapy_start >= 0:
            events.append(TreatmentEvent("therapy", plan.therapy_start, plan.course_end))
        patients.append(
            SyntheticPatient(
                patient_id=f"SYN{seed}-{i:05d}",
                tumour_type=plan.tumour_type,
                growth_law=plan.law,
                visit_days=tuple(plan.visits),
                volumes_cm3=tuple(round(float(v), 4) for v in measured[:k]),
                true_volumes_cm3=tuple(float(v) for v in truth[:k]),
                resection_flags=tuple(resection_flags),
                therapy_flags=tuple(bool(f) for f in therapy_flags),
                events=tuple(events),
                noise_cv=plan.noise_cv,
                target_days=tuple(int(h) for h in HORIZONS_DAYS),
                target_cm3=tuple(float(v) for v in measured[k:]),
                target_true_cm3=tuple(float(v) for v in truth[k:]),
                true_rate_at_last_per_day=float(rates[i, k - 1]),
                drawn=dict(plan.drawn),
            )
        )
    return Cohort(seed, parameters, tuple(patients))


# --- held-out comparison -------------------------------------------------------------------

CALIBRATION_SEED = 1001
"""Seed of the calibration/training cohort; the held-out evaluation must use another."""
CALIBRATION_N = 3000
ORACLE = "truth (noise floor)"
_TYPES: tuple[TumourType, ...] = ("hgg", "lgg", "meningioma", "metastasis")


def baseline_calibrations(cohort: Cohort) -> dict[str, IntervalCalibration]:
    """Residual quantiles of every baseline on ``cohort`` (which must not be the test set)."""
    timelines = cohort.timelines()
    actual = cohort.targets_cm3()
    source = f"synthetic cohort seed {cohort.seed}, n={len(cohort.patients)} (v{COHORT_VERSION})"
    calibrations: dict[str, IntervalCalibration] = {}
    for method in BASELINES:
        points = np.minimum(baseline(method).points(timelines), math.log(MAX_VOLUME_CM3))
        calibrations[method] = calibrate_intervals(method, points, actual, source=source)
    return calibrations


def _oracle(cohort: Cohort) -> ForecastArrays:
    """The noise-free future volume as the forecast: the error measurement noise alone makes."""
    truth = np.maximum(cohort.true_targets_cm3(), MIN_VOLUME_CM3)
    sd = np.array([p.noise_cv for p in cohort.patients])[:, None]
    z = 1.2815515655446004  # 90 % normal quantile
    return ForecastArrays(truth, truth * np.exp(-z * sd), truth * np.exp(z * sd))


@dataclass(frozen=True)
class Comparison:
    """Every method scored on the same held-out patients, and the candidate's margin."""

    test_seed: int
    patients: int
    treatments_known: bool
    scores: tuple[MethodScores, ...]
    best_baseline: tuple[str, ...]
    differences: tuple[PairedDifference, ...]
    mae_by_type: Mapping[str, Mapping[str, tuple[float, ...]]]
    type_counts: Mapping[str, int]

    def method(self, name: str) -> MethodScores:
        for score in self.scores:
            if score.method == name:
                return score
        raise KeyError(name)

    def candidate_beats_baselines(self) -> bool:
        """True when, at every horizon, the paired 95 % CI of the MAE difference is < 0."""
        return bool(self.differences) and all(d.ci_upper < 0.0 for d in self.differences)

    def table(self) -> str:
        """A fixed-width table of every method and horizon, then the per-type MAE."""
        lines = [
            f"held-out synthetic patients: n={self.patients}, seed={self.test_seed}, "
            f"treatments {'known' if self.treatments_known else 'unknown'}; "
            "95 % bootstrap CIs in brackets",
            f"{'method':22s} {'horizon':>7s}  {'MAE cm³':>22s}  {'median rel. err':>20s}  "
            f"{'80 % PI coverage':>20s}  {'progression agree':>20s}  {'kappa':>5s}",
        ]

        def fmt(triple: tuple[float, float, float], scale: float, digits: int) -> str:
            v, lo, hi = (x * scale for x in triple)
            return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

        for score in self.scores:
            for h in score.horizons:
                lines.append(
                    f"{score.method:22s} {f'+{round(h.horizon_days / 30.44)} mo':>7s}  "
                    f"{fmt(h.mae_cm3, 1, 2):>22s}  "
                    f"{fmt(h.median_relative_error, 100, 1):>19s}%  "
                    f"{fmt(h.coverage, 100, 1):>19s}%  "
                    f"{fmt(h.progression_agreement, 100, 1):>19s}%  "
                    f"{h.progression_kappa:5.2f}"
                )
        lines.append("")
        lines.append("best baseline per horizon (lowest MAE): " + ", ".join(self.best_baseline))
        for d in self.differences:
            lines.append(
                f"MAE {d.candidate} − {d.reference} at +{round(d.horizon_days / 30.44)} mo: "
                f"{d.difference_cm3:+.2f} cm³ [{d.ci_lower:+.2f}, {d.ci_upper:+.2f}]"
            )
        lines.append("")
        header = "MAE cm³ by type (+3/+6/+12 mo)"
        lines.append(f"{header:34s}" + "".join(
            f"{f'{t} (n={self.type_counts.get(t, 0)})':>24s}" for t in _TYPES
        ))
        for method, by_type in self.mae_by_type.items():
            cells = "".join(
                f"{'/'.join(f'{v:.2f}' for v in by_type.get(t, ())) or '-':>24s}"
                for t in _TYPES
            )
            lines.append(f"{method:34s}{cells}")
        return "\n".join(lines)


def compare(
    test: Cohort,
    calibrations: Mapping[str, IntervalCalibration],
    candidates: Mapping[str, ForecastArrays] | None = None,
    *,
    treatments_known: bool = True,
    resamples: int = 2000,
) -> Comparison:
    """Score the baselines (and ``candidates``, e.g. the LSTM) on the ``test`` cohort.

    The first candidate, if any, is compared with the best baseline at each horizon by a
    paired bootstrap of the per-patient absolute-error difference.
    """
    if test.seed == CALIBRATION_SEED:
        raise ValueError(f"seed {test.seed} made the calibration cohort; evaluate on another")
    timelines = test.timelines(treatments_known=treatments_known)
    actual = test.targets_cm3()
    last = test.last_volumes_cm3()
    predictions: dict[str, ForecastArrays] = {ORACLE: _oracle(test)}
    for method in BASELINES:
        predictions[method] = baseline(method, calibrations[method]).predict(timelines)
    predictions.update(candidates or {})
    scores = tuple(
        score_method(name, arrays, actual, last, resamples=resamples)
        for name, arrays in predictions.items()
    )
    by_name = {s.method: s for s in scores}

    def best_at(h: int) -> str:
        return min(BASELINES, key=lambda m: by_name[m].horizons[h].mae_cm3[0])

    best = tuple(best_at(h) for h in range(len(HORIZONS_DAYS)))
    differences: list[PairedDifference] = []
    if candidates:
        name = next(iter(candidates))
        for h, reference in enumerate(best):
            differences.append(
                paired_mae_difference(
                    (name, predictions[name]),
                    (reference, predictions[reference]),
                    actual,
                    resamples=resamples,
                )[h]
            )
    types = np.array(test.tumour_types())
    mae_by_type: dict[str, dict[str, tuple[float, ...]]] = {}
    for name, arrays in predictions.items():
        errors = np.abs(arrays.median - actual)
        mae_by_type[name] = {
            t: tuple(float(v) for v in errors[types == t].mean(axis=0))
            for t in _TYPES
            if np.any(types == t)
        }
    return Comparison(
        test_seed=test.seed,
        patients=len(test.patients),
        treatments_known=treatments_known,
        scores=scores,
        best_baseline=best,
        differences=tuple(differences),
        mae_by_type=mae_by_type,
        type_counts={t: int(np.sum(types == t)) for t in _TYPES},
    )
