"""Compare the growth forecasters on held-out synthetic patients and print the table.

Generates ``--n`` patients from ``--seed`` with ``dicomnode.history.cohort`` (777 is the
agreed held-out seed; 1001 and 1002 made the calibration/training and validation cohorts
and are refused), measures the baselines' interval calibration on the calibration cohort
(seed 1001, n=3000), and scores, per horizon (+3, +6, +12 months): MAE in cm³, median
relative error, coverage of the 80 % interval, and agreement on the progression call
(≥ 40 % volume increase over the last measurement), each with a patient-bootstrap 95 % CI.
The installed LSTM package (``models/growth-forecaster``), if any, runs through the same
ONNX path as serving. The "truth (noise floor)" row forecasts the noise-free volume: the
error that segmentation noise alone makes, a floor no method can beat.

    .venv/bin/python scripts/eval_growth.py --n 500 --seed 777

``--calibrate`` also prints the baseline calibration constants for
``dicomnode/history/growth.py``; ``--treatments unknown`` hides resection/therapy flags.
Exit status 1 when the calibration stored in growth.py no longer matches the cohort.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from dicomnode.history.cohort import (
    CALIBRATION_N,
    CALIBRATION_SEED,
    Cohort,
    baseline_calibrations,
    compare,
    generate_cohort,
)
from dicomnode.history.growth import (
    BASELINE_CALIBRATION,
    DEFAULT_MODELS_DIR,
    MODEL_NAME,
    ForecastArrays,
    IntervalCalibration,
    LstmForecaster,
    growth_trend,
)

VALIDATION_SEED = 1002
CALIBRATION_TOLERANCE = 1e-3


def _doubling_time_report(cohort: Cohort) -> str:
    """How the reported trend and doubling time agree with the simulator's true rate."""
    calls: list[str] = []
    errors: list[float] = []
    agree = known = 0
    for patient in cohort.patients:
        trend, doubling = growth_trend(patient.timeline())
        calls.append(trend)
        if trend == "unknown":
            continue
        known += 1
        truly_growing = patient.true_rate_at_last_per_day > math.log(2.0) / (20 * 365.25)
        agree += int((trend == "growing") == truly_growing)
        if trend == "growing" and truly_growing and doubling is not None:
            true_doubling = math.log(2.0) / patient.true_rate_at_last_per_day
            errors.append(abs(math.log(doubling / true_doubling)))
    counts = {t: calls.count(t) for t in ("growing", "not growing", "unknown")}
    median_factor = math.exp(float(np.median(errors))) if errors else float("nan")
    return (
        f"trend at last visit: {counts}; growing/not-growing agrees with the simulator's "
        f"true rate (growing = doubling faster than 20 years) in {agree}/{known} "
        f"({100 * agree / max(known, 1):.1f} %); where both grow, the doubling time is "
        f"within a median factor of {median_factor:.2f} of the truth (n={len(errors)})"
    )


def _calibration_source(calibrations: dict[str, IntervalCalibration]) -> str:
    lines = ["BASELINE_CALIBRATION: Mapping[str, IntervalCalibration] = {"]
    for method, c in calibrations.items():
        lines += [
            f'    "{method}": IntervalCalibration(',
            f'        "{method}",',
            f"        lower={c.lower},",
            f"        median={c.median},",
            f"        upper={c.upper},",
            f"        patients={c.patients},",
            "        source=_CALIBRATION_SOURCE,",
            "    ),",
        ]
    lines.append("}")
    return "\n".join(lines)


def _stale(calibrations: dict[str, IntervalCalibration]) -> list[str]:
    stale = []
    for method, fresh in calibrations.items():
        stored = BASELINE_CALIBRATION.get(method)
        if stored is None or not all(
            np.allclose(getattr(stored, q), getattr(fresh, q), atol=CALIBRATION_TOLERANCE)
            for q in ("lower", "median", "upper")
        ):
            stale.append(method)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--treatments", choices=("known", "unknown"), default="known")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.seed in (CALIBRATION_SEED, VALIDATION_SEED):
        print(f"seed {args.seed} made a training cohort; evaluate on another", file=sys.stderr)
        return 2
    started = time.perf_counter()
    calibrations = baseline_calibrations(generate_cohort(CALIBRATION_N, CALIBRATION_SEED))
    test = generate_cohort(args.n, args.seed)
    known = args.treatments == "known"
    candidates: dict[str, ForecastArrays] = {}
    package = args.models_dir / MODEL_NAME
    if (package / "model.onnx").is_file():
        lstm = LstmForecaster.from_package(package)
        candidates[lstm.name] = lstm.predict(test.timelines(treatments_known=known))
    else:
        print(f"no LSTM package at {package}: baselines only")
    comparison = compare(
        test, calibrations, candidates, treatments_known=known, resamples=args.resamples
    )
    print(comparison.table())
    if candidates:
        verdict = "beats" if comparison.candidate_beats_baselines() else "does NOT beat"
        print(f"\nthe LSTM {verdict} the best baseline at every horizon (paired 95 % CI < 0)")
    print("\n" + _doubling_time_report(test))
    stale = _stale(calibrations)
    if args.calibrate:
        print("\n" + _calibration_source(calibrations))
    print(f"\n({time.perf_counter() - started:.1f} s)")
    if stale:
        print(f"stored calibration in growth.py is stale for {stale}; rerun with --calibrate",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
