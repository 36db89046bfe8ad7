"""Per-patient lesion timelines: volumes from the node's own analyses and from priors.

The ledger caches every measured point (``timeline_points``), so a new study adds one
point and the forecast reads the cached history instead of re-reading or re-analysing
earlier studies. Points come from two places with one contract:

* ``node``: a ``tumour_volume`` job finished; its summary holds ``analysed``,
  ``volume_cm3``, ``study_date`` and ``tracking_uid``, and its SR is among the outputs.
* ``prior-sr``: one of the node's earlier TID 1500 reports, retrieved from the PACS,
  whose measurement group tracked as ``brain tumour`` carries a Volume in cm3.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.history.growth import Timeline
from dicomnode.ingest.ledger import Ledger, TimelineRow
from dicomnode.results import codes
from dicomnode.results.sr import Analysed, read_measurement_report

__all__ = [
    "GROWTH_ALGORITHM_NAME",
    "TRACKING_ID",
    "VolumeMeasurement",
    "growth_timeline",
    "measurement_from_job",
    "measurements_from_report",
    "parse_study_date",
    "record_measurement",
]

TRACKING_ID = "brain tumour"
"""The Tracking Identifier the tumour_volume pipeline gives the lesion it measures."""

GROWTH_ALGORITHM_NAME = "tumour-growth"
"""The growth report's algorithm; its SRs are results about timelines, never points."""


@dataclass(frozen=True)
class VolumeMeasurement:
    """A volume to add to a lesion's timeline, and the SR it came from."""

    tracking_uid: str
    study_uid: str
    study_date: str  # YYYYMMDD
    volume_cm3: float
    source_sop_uid: str
    source_kind: str = "node"
    source_path: str | None = None

    def __post_init__(self) -> None:
        if parse_study_date(self.study_date) is None:
            raise ValueError(f"study date {self.study_date!r} is not YYYYMMDD")
        if isinstance(self.volume_cm3, bool) or not math.isfinite(self.volume_cm3) \
                or self.volume_cm3 < 0:
            raise ValueError("volume must be a non-negative number of cm3")
        if not self.tracking_uid or not self.study_uid or not self.source_sop_uid:
            raise ValueError("tracking, study and source UIDs are required")


def parse_study_date(value: Any) -> date | None:
    try:
        return datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def measurement_from_job(summary: Mapping[str, Any],
                         outputs: Sequence[tuple[str, str, str, str]],
                         study_uid: str) -> VolumeMeasurement | None:
    """The timeline point a finished job yields, or None (not a volume, not analysed).

    ``outputs`` are the job's (sop uid, class uid, study uid, spool path); the point's
    source is the job's Comprehensive 3D SR in the study.
    """
    if not summary.get("analysed") or "volume_cm3" not in summary:
        return None
    tracking_uid = summary.get("tracking_uid")
    study_date = summary.get("study_date")
    volume = summary.get("volume_cm3")
    if not isinstance(tracking_uid, str) or not isinstance(volume, int | float):
        return None
    report = next((o for o in outputs if o[1] == Comprehensive3DSRStorage), None)
    if report is None or parse_study_date(study_date) is None:
        return None
    return VolumeMeasurement(tracking_uid, study_uid, str(study_date), float(volume),
                             report[0], "node", report[3])


def measurements_from_report(ds: Dataset, *, source_path: str | None = None,
                             kind: str = "prior-sr") -> list[VolumeMeasurement]:
    """Tracked tumour volumes in one of the node's TID 1500 reports (none if it has none)."""
    study_date = str(ds.get("StudyDate", "") or "")
    if parse_study_date(study_date) is None:
        return []
    try:
        report = read_measurement_report(ds)
    except (ValueError, AttributeError, KeyError):
        return []
    if report.algorithm.name == GROWTH_ALGORITHM_NAME or not isinstance(report.outcome,
                                                                        Analysed):
        return []
    found: list[VolumeMeasurement] = []
    for group in report.outcome.findings:
        if group.tracking_id != TRACKING_ID or group.tracking_uid is None:
            continue
        for value in group.measurements:
            if value.concept == codes.VOLUME and value.unit == codes.UCUM_CUBIC_CENTIMETER:
                found.append(VolumeMeasurement(group.tracking_uid, str(ds.StudyInstanceUID),
                                               study_date[:8], float(value.value),
                                               str(ds.SOPInstanceUID), kind, source_path))
                break
    return found


def record_measurement(ledger: Ledger, patient_key: str, m: VolumeMeasurement) -> bool:
    """Cache one point; True when it is new (a study is measured once, never again)."""
    return ledger.add_timeline_point(TimelineRow(
        patient_key, m.tracking_uid, m.study_uid, m.study_date, m.volume_cm3,
        m.source_sop_uid, m.source_kind, m.source_path))


def growth_timeline(rows: Sequence[TimelineRow]) -> Timeline:
    """The forecaster's timeline from cached rows (one lesion), one point per date."""
    by_date: dict[date, TimelineRow] = {}
    for row in rows:
        when = parse_study_date(row.study_date)
        if when is None:
            continue
        # two studies on one day: keep the node's own measurement, else the first
        if when not in by_date or (row.source_kind == "node"
                                   and by_date[when].source_kind != "node"):
            by_date[when] = row
    dates = sorted(by_date)
    return Timeline.from_dates(dates, [by_date[d].volume_cm3 for d in dates])
