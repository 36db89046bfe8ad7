"""The growth SR and plot: built from a history and a forecast, dciodvfy clean, readable."""

from __future__ import annotations

import io
from datetime import date

import numpy as np
import pydicom
import pytest

from dicomnode.history.growth import Timeline, baseline, forecast
from dicomnode.history.timeline import measurements_from_report
from dicomnode.results import codes
from dicomnode.results.growth import (
    DOUBLING_TIME,
    PROGRESSION,
    YES,
    HistoryPoint,
    build_growth_plot,
    build_growth_report,
    predicted_volume_code,
    render_growth_plot,
)
from dicomnode.results.sr import AlgorithmInfo, Analysed, read_measurement_report
from dicomnode.results.uids import derive_uid
from tests.peers import require_tool
from tests.unit.history.test_history_timeline import TRACKING_UID, mr_header, volume_sr

DATES = [date(2025, 1, 6), date(2025, 4, 7), date(2025, 7, 7)]
VOLUMES = [4.0, 6.0, 9.0]


@pytest.fixture(scope="module")
def built() -> tuple[pydicom.Dataset, pydicom.Dataset, list[HistoryPoint]]:
    image = mr_header("1.2.826.0.1.3680043.10.77", "20250707")
    newest = volume_sr(image, VOLUMES[-1])
    history = [HistoryPoint(d, v, f"1.2.826.0.1.3680043.10.{70 + i}", f"2.25.{i}",
                            "prior-sr" if i < 2 else "node")
               for i, (d, v) in enumerate(zip(DATES, VOLUMES, strict=True))]
    history[-1] = HistoryPoint(DATES[-1], VOLUMES[-1], image.StudyInstanceUID,
                               str(newest.SOPInstanceUID), "node")
    result = forecast(Timeline.from_dates(DATES, VOLUMES), baseline("log-linear"))
    algorithm = AlgorithmInfo("tumour-growth", "1.0.0", parameters=("forecaster: x",))
    sr = build_growth_report([newest, image], history, result, algorithm,
                             tracking_uid=TRACKING_UID,
                             series_instance_uid=derive_uid("growth-sr-test"))
    sc = build_growth_plot([image], history, result, algorithm,
                           series_instance_uid=derive_uid("growth-sc-test"))
    return sr, sc, history


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_the_growth_report_says_predictions_doubling_time_and_progression(
        built: tuple[pydicom.Dataset, pydicom.Dataset, list[HistoryPoint]]) -> None:
    sr, _, history = built
    back = read_measurement_report(_roundtrip(sr))
    assert isinstance(back.outcome, Analysed)
    (group,) = back.outcome.findings
    assert group.tracking_uid == TRACKING_UID
    values = {m.concept: m.value for m in group.measurements}
    for horizon in (91.0, 183.0, 365.0):
        lo = values[predicted_volume_code(horizon, "lower")]
        mid = values[predicted_volume_code(horizon)]
        hi = values[predicted_volume_code(horizon, "upper")]
        assert lo <= mid <= hi
    assert values[predicted_volume_code(365.0)] > VOLUMES[-1]
    assert 100 < values[DOUBLING_TIME] < 200  # 4 -> 9 cm3 in 182 days: ~155 days
    assert (PROGRESSION, YES) in {(e.concept, e.value) for e in group.evaluations}
    texts = [n.text for n in back.notes]
    assert sum(t.startswith("History: ") for t in texts) == 3
    assert any("prior study 1.2.826.0.1.3680043.10.70" in t for t in texts)
    assert any("this study" in t for t in texts)
    # same-study evidence: the newest volume report and the image
    assert history[-1].source_sop_uid in back.source_sop_instance_uids
    # a growth report is never mistaken for a volume measurement
    assert measurements_from_report(_roundtrip(sr)) == []
    assert codes.VOLUME not in values


def test_the_plot_draws_points_and_band() -> None:
    history = [HistoryPoint(d, v, "1", "2", "node") for d, v in zip(DATES, VOLUMES,
                                                                    strict=True)]
    result = forecast(Timeline.from_dates(DATES, VOLUMES), baseline("log-linear"))
    img = render_growth_plot(history, result)
    assert img.dtype == np.uint8 and img.shape == (560, 900, 3)
    measured = np.all(img == (80, 200, 255), axis=-1).sum()
    forecast_px = np.all(img == (255, 170, 40), axis=-1).sum()
    assert measured > 100 and forecast_px > 100


def test_growth_objects_are_dciodvfy_clean(
        built: tuple[pydicom.Dataset, pydicom.Dataset, list[HistoryPoint]]) -> None:
    require_tool("dciodvfy")
    from dicomnode.results.validate import validate_result

    sr, sc, _ = built
    validate_result(sr)
    validate_result(sc)
    assert sc.SeriesDescription.startswith("AI ") and sr.SeriesDescription.startswith("AI ")
    assert sc.StudyInstanceUID == sr.StudyInstanceUID
