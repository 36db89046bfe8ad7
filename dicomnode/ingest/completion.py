"""Decides when a series or study is complete, and records why.

DICOM has no end-of-series message, so completeness is inferred: a quiet period with no
new instance (what Orthanc's StableAge and mercure do), or earlier, evidence in the data
of how many instances to expect and all of them present. Closing and routing happen in
one ledger transaction, so a series is never complete-but-unrouted after a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomnode.config import CompletionSettings
from dicomnode.ingest.ledger import Ledger, SeriesRow
from dicomnode.routing.router import Router

log = logging.getLogger(__name__)

_WHOLE_SERIES_MULTIFRAME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.20",   # NM (a reconstructed tomogram is one object)
}


def _int(ds: Mapping[str, Any], keyword: str) -> int | None:
    try:
        value = int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def expected_instances(ds: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """How many instances this series should hold, when the data says so.

    * a multi-frame object of a class that carries a whole acquisition in one object
      (NM tomogram, enhanced CT/MR/PET) whose frames cover all slices: 1 instance;
    * single-frame NM slices: NumberOfSlices;
    * ImagesInAcquisition, when the series is one acquisition.
    """
    frames = _int(ds, "NumberOfFrames")
    sop_class = str(ds.get("SOPClassUID") or "")
    if frames and frames > 1 and sop_class in _WHOLE_SERIES_MULTIFRAME_CLASSES:
        slices = _int(ds, "NumberOfSlices")
        if sop_class != "1.2.840.10008.5.1.4.1.1.20" or (slices and frames >= slices):
            return 1, f"one multi-frame object (NumberOfFrames {frames})"
    # A count of 1 in a single-frame object describes the object, not the series.
    if sop_class == "1.2.840.10008.5.1.4.1.1.20" and (frames or 1) == 1:
        slices = _int(ds, "NumberOfSlices")
        if slices and slices > 1:
            return slices, f"NumberOfSlices {slices}"
    images = _int(ds, "ImagesInAcquisition")
    if images and images > 1:
        return images, f"ImagesInAcquisition {images}"
    return None, None


@dataclass(frozen=True)
class Closed:
    level: str
    uid: str
    reason: str
    jobs: int


class CompletionTracker:
    def __init__(self, ledger: Ledger, router: Router, settings: CompletionSettings) -> None:
        self.ledger = ledger
        self.router = router
        self.settings = settings

    def _series_reason(self, s: SeriesRow, now: float) -> str | None:
        if s.expected_count is not None and s.instance_count >= s.expected_count:
            return f"all {s.expected_count} instances expected by {s.expected_by} arrived"
        quiet = now - s.last_received
        if quiet >= self.settings.series_quiet_s:
            reason = f"no new instance for {self.settings.series_quiet_s:g} s"
            if s.expected_count is not None:
                reason += (f" ({s.instance_count} of {s.expected_count} instances expected by "
                           f"{s.expected_by})")
            return reason
        return None

    def sweep(self) -> list[Closed]:
        now = self.ledger.clock()
        closed: list[Closed] = []
        for s in self.ledger.open_series():
            reason = self._series_reason(s, now)
            if reason is None:
                continue
            decisions, jobs = self.router.route_series(s)
            if self.ledger.close_series(s, reason, decisions, jobs):
                closed.append(Closed("series", s.series_uid, reason, len(jobs)))
                log.info("series closed (%s): %d instances, %s; %d job(s)",
                         s.modality or "?", s.instance_count, reason, len(jobs))
        for st in self.ledger.open_studies():
            if now - st.last_received < self.settings.study_quiet_s:
                continue
            series = self.ledger.series_of_study(st.study_uid)
            if any(s.state == "open" for s in series):
                continue
            reason = (f"no new instance for {self.settings.study_quiet_s:g} s and all "
                      f"{len(series)} series complete")
            decisions, jobs = self.router.route_study(st.study_uid, series)
            if self.ledger.close_study(st, reason, decisions, jobs):
                closed.append(Closed("study", st.study_uid, reason, len(jobs)))
                log.info("study closed: %d series, %d job(s)", len(series), len(jobs))
        return closed
