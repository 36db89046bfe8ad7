"""The growth result: a TID 1500 SR and a Secondary Capture plot in the newest study.

The SR says what a reader needs to check the forecast later: the history it used (each
point with its date, volume and source; sources in the same study are SR evidence,
sources in other studies are named by their UIDs in text notes, since a TID 1500 SR
references evidence of its own study), the predicted volume at +3/+6/+12 months with the
80 % interval, the volume doubling time of the growth seen so far, and the RANO-style
progression call. The plot draws the same numbers with OpenCV (no plotting library):
measured volumes against date, the forecast median and its band.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.history.growth import Forecast
from dicomnode.results import codes
from dicomnode.results.sc import build_secondary_capture
from dicomnode.results.sr import (
    AlgorithmInfo,
    Analysed,
    Evaluation,
    FindingGroup,
    MeasurementValue,
    TextNote,
    build_measurement_report,
)
from dicomnode.results.uids import derive_uid

__all__ = [
    "DOUBLING_TIME",
    "HistoryPoint",
    "build_growth_plot",
    "build_growth_report",
    "predicted_volume_code",
    "render_growth_plot",
]

DOUBLING_TIME: Final = codes.local_code("DN-G001", "Volume doubling time")
LAST_VOLUME: Final = codes.local_code("DN-G002", "Last measured volume")
PROGRESSION: Final = codes.local_code("DN-G003", "Volumetric progression (RANO-style)")
TREND: Final = codes.local_code("DN-G004", "Growth trend")
YES: Final = Code("373066001", "SCT", "Yes")
NO: Final = Code("373067005", "SCT", "No")
UCUM_DAY: Final = Code("d", "UCUM", "day")
SERIES_DESCRIPTION_SR: Final = "AI tumour growth forecast"
SERIES_DESCRIPTION_SC: Final = "AI tumour growth plot"


def _months(horizon_days: float) -> int:
    return round(horizon_days / 30.44)


def predicted_volume_code(horizon_days: float, which: str = "median") -> Code:
    """Local concepts: predicted volume at +N months, and the interval bounds."""
    months = _months(horizon_days)
    if which == "median":
        return codes.local_code(f"DN-GP{months:02d}", f"Predicted volume at +{months} months")
    bound = {"lower": "L", "upper": "U"}[which]
    meaning = f"{which.capitalize()} 80% bound, volume at +{months} months"
    return codes.local_code(f"DN-GP{months:02d}{bound}", meaning)


@dataclass(frozen=True)
class HistoryPoint:
    """One point of the history used: when, how much, and the SR it came from."""

    study_date: date
    volume_cm3: float
    study_uid: str
    source_sop_uid: str
    source_kind: str


def _history_notes(history: Sequence[HistoryPoint], study_uid: str) -> list[TextNote]:
    notes = []
    for p in history:
        where = ("this study" if p.study_uid == study_uid
                 else f"prior study {p.study_uid}")
        notes.append(TextNote(
            f"History: {p.study_date.isoformat()} {p.volume_cm3:.2f} cm3 "
            f"({p.source_kind}; {where}; report {p.source_sop_uid})"))
    return notes


def build_growth_report(
    sources: Sequence[Dataset],
    history: Sequence[HistoryPoint],
    result: Forecast,
    algorithm: AlgorithmInfo,
    *,
    tracking_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """The growth SR in the sources' (the newest) study.

    ``sources`` are the objects of the newest study the history rests on (its volume SR,
    an image): they become the SR's evidence; priors elsewhere are text notes.
    """
    if len(history) < 2:
        raise ValueError("a growth report needs at least two timepoints")
    study_uid = str(sources[0].StudyInstanceUID)
    values = [MeasurementValue(LAST_VOLUME, round(result.last_volume_cm3, 4),
                               codes.UCUM_CUBIC_CENTIMETER)]
    for horizon, lo, mid, hi in zip(result.horizons, result.lower, result.median, result.upper,
                                    strict=True):
        for which, value in (("median", mid), ("lower", lo), ("upper", hi)):
            values.append(MeasurementValue(predicted_volume_code(horizon, which),
                                           round(value, 4), codes.UCUM_CUBIC_CENTIMETER))
    if result.doubling_time_days is not None and math.isfinite(result.doubling_time_days):
        values.append(MeasurementValue(DOUBLING_TIME, round(result.doubling_time_days, 1),
                                       UCUM_DAY))
    progression = any(result.progression_call)
    group = FindingGroup(
        "brain tumour",
        finding_type=codes.FINDING,
        finding_site=codes.BRAIN,
        measurements=tuple(values),
        evaluations=(Evaluation(PROGRESSION, YES if progression else NO),),
        tracking_uid=tracking_uid,
    )
    calls = ", ".join(f"+{_months(h)} months: {'progression' if c else 'no progression'}"
                      for h, c in zip(result.horizons, result.progression_call, strict=True))
    doubling = (f"{result.doubling_time_days:.0f} days"
                if result.doubling_time_days is not None else f"none ({result.trend})")
    notes = [
        TextNote(f"Forecast method: {result.method}; {len(history)} timepoints; "
                 f"80% prediction intervals."),
        TextNote(f"Volume doubling time: {doubling}. Progression call (volume >= 140% of "
                 f"the last measurement): {calls}."),
        *_history_notes(history, study_uid),
    ]
    return build_measurement_report(
        sources,
        Analysed((group,)),
        algorithm,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid or derive_uid(series_instance_uid, 1),
        instance_number=instance_number,
        series_description=SERIES_DESCRIPTION_SR,
        series_number=950,
        notes=notes,
    )


# --- the plot ------------------------------------------------------------------------------

_W, _H = 900, 560
_LEFT, _RIGHT, _TOP, _BOTTOM = 90, 30, 40, 70
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_GREY = (110, 110, 110)
_POINT = (80, 200, 255)
_FORECAST = (255, 170, 40)


def _nice_step(span: float) -> float:
    raw = span / 5.0
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def render_growth_plot(history: Sequence[HistoryPoint],
                       result: Forecast) -> npt.NDArray[np.uint8]:
    """Volume (cm3) against date: measured points, forecast median and 80 % band (RGB)."""
    if not history:
        raise ValueError("nothing to plot")
    img = np.zeros((_H, _W, 3), dtype=np.uint8)
    origin = history[0].study_date
    last = history[-1].study_date
    days_hist = [float((p.study_date - origin).days) for p in history]
    last_day = float((last - origin).days)
    horizon_days = [last_day + h for h in result.horizons]
    t_max = max(horizon_days[-1], 1.0)
    v_max = max([p.volume_cm3 for p in history] + list(result.upper)) * 1.1 or 1.0
    step = _nice_step(v_max)
    v_max = math.ceil(v_max / step) * step
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP

    def xy(day: float, volume: float) -> tuple[int, int]:
        return (round(x0 + (x1 - x0) * day / t_max),
                round(y0 - (y0 - y1) * volume / v_max))

    # forecast band, from the last measurement out to +12 months
    band_days = [last_day, *horizon_days]
    lower = [history[-1].volume_cm3, *result.lower]
    upper = [history[-1].volume_cm3, *result.upper]
    polygon = [xy(d, v) for d, v in zip(band_days, upper, strict=True)]
    polygon += [xy(d, v) for d, v in zip(reversed(band_days), reversed(lower), strict=True)]
    overlay = img.copy()
    cv2.fillPoly(overlay, [np.array(polygon, dtype=np.int32)], (120, 80, 20))
    img = np.asarray(cv2.addWeighted(overlay, 0.6, img, 0.4, 0), dtype=np.uint8)
    # axes and grid
    cv2.line(img, (x0, y0), (x1, y0), _WHITE, 1)
    cv2.line(img, (x0, y0), (x0, y1), _WHITE, 1)
    value = 0.0
    while value <= v_max + 1e-9:
        _, y = xy(0, value)
        cv2.line(img, (x0 - 5, y), (x1, y), _GREY if value else _WHITE, 1)
        cv2.putText(img, f"{value:g}", (8, y + 5), _FONT, 0.45, _WHITE, 1, cv2.LINE_AA)
        value += step
    months = 0
    while months * 30.44 <= t_max:
        x, _ = xy(months * 30.44, 0)
        cv2.line(img, (x, y0), (x, y0 + 5), _WHITE, 1)
        label = (origin + timedelta(days=round(months * 30.44))).strftime("%Y-%m")
        cv2.putText(img, label, (x - 26, y0 + 22), _FONT, 0.4, _WHITE, 1, cv2.LINE_AA)
        months += max(1, int(t_max / 30.44 / 8) + 1)
    cv2.putText(img, "volume (cm3)", (8, 24), _FONT, 0.5, _WHITE, 1, cv2.LINE_AA)
    cv2.putText(img, "study date", (x1 - 90, _H - 18), _FONT, 0.5, _WHITE, 1, cv2.LINE_AA)
    # forecast median
    median_pts = [xy(d, v) for d, v in zip([last_day, *horizon_days],
                                           [history[-1].volume_cm3, *result.median],
                                           strict=True)]
    for a, b in itertools.pairwise(median_pts):
        cv2.line(img, a, b, _FORECAST, 2, cv2.LINE_AA)
    for (x, y), h in zip(median_pts[1:], result.horizons, strict=True):
        cv2.circle(img, (x, y), 4, _FORECAST, -1, cv2.LINE_AA)
        cv2.putText(img, f"+{_months(h)}m", (x - 14, y - 10), _FONT, 0.4, _FORECAST, 1,
                    cv2.LINE_AA)
    # measured history
    hist_pts = [xy(d, p.volume_cm3) for d, p in zip(days_hist, history, strict=True)]
    for a, b in itertools.pairwise(hist_pts):
        cv2.line(img, a, b, _POINT, 2, cv2.LINE_AA)
    for x, y in hist_pts:
        cv2.circle(img, (x, y), 6, _POINT, -1, cv2.LINE_AA)
    cv2.putText(img, "measured", (x0 + 12, y1 + 4), _FONT, 0.5, _POINT, 1, cv2.LINE_AA)
    cv2.putText(img, "forecast median, 80% band", (x0 + 120, y1 + 4), _FONT, 0.5, _FORECAST, 1,
                cv2.LINE_AA)
    return img


def build_growth_plot(
    sources: Sequence[Dataset],
    history: Sequence[HistoryPoint],
    result: Forecast,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """The plot as an RGB Secondary Capture in the newest study, with a caption."""
    doubling = (f"doubling time {result.doubling_time_days:.0f} d"
                if result.doubling_time_days is not None else f"trend: {result.trend}")
    mid = ", ".join(f"+{_months(h)}m {m:.1f} cm3 [{lo:.1f}-{hi:.1f}]"
                    for h, lo, m, hi in zip(result.horizons, result.lower, result.median,
                                            result.upper, strict=True))
    progression = "progression" if any(result.progression_call) else "no progression"
    return build_secondary_capture(
        sources,
        render_growth_plot(history, result),
        algorithm,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid or derive_uid(series_instance_uid, 1),
        instance_number=instance_number,
        series_description=SERIES_DESCRIPTION_SC,
        series_number=951,
        caption_lines=[f"Tumour volume: last {result.last_volume_cm3:.2f} cm3; {doubling}; "
                       f"{progression} (RANO-style, >= 40%)",
                       f"Forecast ({result.method}, 80% interval): {mid}"],
    )
