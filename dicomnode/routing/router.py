"""Decides which routes a complete series or study takes, and records why.

Series-level routes are decided when a series closes; study-level routes when its study
closes, by testing each series of the study (the job then receives the matching series).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicomnode.config import Route
from dicomnode.ingest.ledger import NewJob, RouteDecision, SeriesRow
from dicomnode.routing.rules import SPECIAL_KEYS, MatchResult, evaluate

# Attributes kept for routing and the rule tester; route keywords are added to these.
DEFAULT_ROUTING_KEYWORDS: tuple[str, ...] = (
    "Modality", "SOPClassUID", "BodyPartExamined", "ImageType", "SeriesDescription",
    "StudyDescription", "ProtocolName", "ViewPosition", "ImageOrientationPatient",
    "NumberOfFrames", "NumberOfSlices", "Rows", "Columns", "PhotometricInterpretation",
    "BitsStored", "Manufacturer", "ManufacturerModelName", "SliceThickness",
    "ContrastBolusAgent", "SeriesNumber", "ScanningSequence", "SequenceName", "StudyDate",
)


def routing_keywords(routes: Sequence[Route]) -> tuple[str, ...]:
    extra = [c.keyword for r in routes for c in r.conditions
             if c.keyword not in DEFAULT_ROUTING_KEYWORDS and c.keyword not in SPECIAL_KEYS]
    return DEFAULT_ROUTING_KEYWORDS + tuple(dict.fromkeys(extra))


@dataclass(frozen=True)
class Explanation:
    route: str
    level: str
    result: MatchResult


class Router:
    def __init__(self, routes: Sequence[Route],
                 header_loader: Callable[[str], Mapping[str, Any]] | None = None) -> None:
        self.routes = tuple(routes)
        self._load = header_loader

    def _attrs(self, series: SeriesRow) -> dict[str, Any]:
        attrs = dict(series.attrs)
        needed = {c.keyword for r in self.routes for c in r.conditions} - SPECIAL_KEYS
        if self._load is not None and not needed <= attrs.keys():
            # routes changed since this series was stored: read its header again
            attrs.update({k: v for k, v in self._load(series.series_uid).items()
                          if k not in attrs})
        attrs["calling_ae_title"] = series.calling_ae or ""
        return attrs

    def explain(self, attrs: Mapping[str, Any]) -> list[Explanation]:
        """The rule tester: every route's verdict on one set of attributes, with reasons."""
        return [Explanation(r.name, r.level, evaluate(r.conditions, attrs)) for r in self.routes]

    def route_series(self, series: SeriesRow) -> tuple[list[RouteDecision], list[NewJob]]:
        attrs = self._attrs(series)
        decisions: list[RouteDecision] = []
        jobs: list[NewJob] = []
        for route in self.routes:
            if route.level != "series":
                continue
            res = evaluate(route.conditions, attrs)
            decisions.append(RouteDecision(route.name, res.matched, res.reasons))
            if res.matched:
                jobs.append(NewJob(route.name, route.pipeline, "series", series.series_uid,
                                   series.study_uid, (series.series_uid,)))
        if not any(d.matched for d in decisions):
            decisions.append(RouteDecision(None, False, ("no series-level route matched",)))
        return decisions, jobs

    def route_study(self, study_uid: str, series: Sequence[SeriesRow]
                    ) -> tuple[list[RouteDecision], list[NewJob]]:
        decisions: list[RouteDecision] = []
        jobs: list[NewJob] = []
        study_routes = [r for r in self.routes if r.level == "study"]
        attrs = {s.series_uid: self._attrs(s) for s in series} if study_routes else {}
        for route in study_routes:
            matching: list[str] = []
            reasons: list[str] = []
            for s in series:
                res = evaluate(route.conditions, attrs[s.series_uid])
                reasons.append(f"series {s.series_uid}: {'match' if res.matched else 'no match'}"
                               f" ({'; '.join(res.reasons)})")
                if res.matched:
                    matching.append(s.series_uid)
            decisions.append(RouteDecision(route.name, bool(matching), tuple(reasons)))
            if matching:
                jobs.append(NewJob(route.name, route.pipeline, "study", study_uid, study_uid,
                                   tuple(matching)))
        return decisions, jobs
