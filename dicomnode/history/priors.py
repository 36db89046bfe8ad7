"""Priors from the query source: find a patient's earlier studies, fetch the node's reports.

For one patient the node C-FINDs the query source (``query.source``), keeps the studies
that are relevant (modality, body part, within ``query.lookback_days`` of the newest
measurement), and C-MOVEs to itself only what it needs: its own earlier SRs (series
``AI ...`` of modality SR), which are a few kilobytes where the images are hundreds of
megabytes. Each retrieve is checked against what C-FIND announced
(NumberOfSeriesRelatedInstances) using both the C-MOVE completed count and the instances
that actually arrived in the ledger, so a retrieve that stops early is recorded as
``incomplete`` instead of silently shortening the history. Every step's outcome is a
``retrieve_events`` row in the ledger; nothing here raises for a PACS that misbehaves.

How a series comes is ``query.retrieve``: ``move`` (C-MOVE to the node, which the PACS
must know as a modality), ``get`` (C-GET: the PACS sends on the node's own association,
no route back needed) or ``move-then-get`` (the default: C-MOVE, and C-GET for the rest
of the run once the PACS refuses the move because it does not know or allow the node).
C-GET sub-operations are answered by the node's own C-STORE handler
(:meth:`dicomnode.net.scp.StoreSCP.handle_store`): spool, fsync, ledger, then success,
exactly as for an instance stored by a modality.

Retrieves (C-MOVE or C-GET) are throttled per PACS (``query.max_moves_per_minute``) and
the nightly run stops moving when its off-peak window (``query.off_peak``) closes.

A relevant prior without a node report has its images moved instead
(``query.reanalyse_images``, on by default): they arrive like any study, the node's routes
analyse them (the tumour_volume route), and the finished job adds the prior's point
through the same entry point as a new study. With it off, such priors are recorded as
``skipped`` with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.config import Settings
from dicomnode.history.timeline import (
    measurements_from_report,
    parse_study_date,
    record_measurement,
)
from dicomnode.ingest.ledger import Ledger, RetrieveEvent
from dicomnode.ingest.spool import Spool
from dicomnode.net.qr import MoveResult, QueryClient, QueryError, StoreHandler
from dicomnode.net.scp import StoreSCP
from dicomnode.ops.events import NO_EVENTS, NodeEvents
from dicomnode.results.common import SERIES_DESCRIPTION_PREFIX

__all__ = [
    "MoveThrottle",
    "ObservedRetrieve",
    "OffPeakWindow",
    "PatientIdentity",
    "PriorsFetcher",
    "PriorsReport",
    "is_node_report_series",
    "throttle_for",
]

log = logging.getLogger(__name__)


class MoveThrottle:
    """At most ``per_minute`` C-MOVEs in any 60 s (a sliding window), shared by threads.

    ``clock`` and ``sleep`` are injectable so tests need not wait in real time.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.clock = clock
        self.sleep = sleep
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()

    def delay(self) -> float:
        """Seconds until the next move may start (0 when it may start now)."""
        with self._lock:
            now = self.clock()
            while self._starts and now - self._starts[0] >= 60.0:
                self._starts.popleft()
            if len(self._starts) < self.per_minute:
                return 0.0
            return 60.0 - (now - self._starts[0])

    def acquire(self, deadline: float | None = None) -> bool:
        """Wait for a slot and take it; False (nothing taken) if ``deadline`` comes first."""
        while True:
            wait = self.delay()
            if wait <= 0:
                with self._lock:
                    if len(self._starts) < self.per_minute:
                        self._starts.append(self.clock())
                        return True
                continue
            if deadline is not None and self.clock() + wait > deadline:
                return False
            self.sleep(wait)


_FATAL_CAUSES = ("does not know the move destination", "could not be reached",
                 "rejected the association", "refused the query/retrieve service",
                 "most likely does not allow", "does not offer C-GET",
                 "accepted no storage class")
"""QueryError texts (dicomnode.net.qr) whose cause fails every other retrieve as well."""

_MOVE_REFUSED = ("does not know the move destination", "does not allow C-MOVE")
"""C-MOVE failures that C-GET gets around (``query.retrieve: move-then-get``)."""


def _named(operation: str, exc: QueryError) -> str:
    text = str(exc)
    return text if text.startswith(operation) else f"{operation}: {text}"

_throttles: dict[str, MoveThrottle] = {}
_throttles_lock = threading.Lock()


def throttle_for(pacs: str, per_minute: int) -> MoveThrottle:
    """The one throttle of a PACS in this process, whichever job moves from it."""
    with _throttles_lock:
        current = _throttles.get(pacs)
        if current is None or current.per_minute != per_minute:
            current = _throttles[pacs] = MoveThrottle(per_minute)
        return current


@dataclass(frozen=True)
class OffPeakWindow:
    """A daily window ("22:00-06:00" wraps midnight) in the node's local time."""

    start: clock_time
    end: clock_time

    @classmethod
    def parse(cls, text: str) -> OffPeakWindow:
        try:
            first, second = (part.strip() for part in text.split("-"))
            start = datetime.strptime(first, "%H:%M").time()
            end = datetime.strptime(second, "%H:%M").time()
        except ValueError as exc:
            raise ValueError(f"off-peak window must be 'HH:MM-HH:MM', got {text!r}") from exc
        if start == end:
            raise ValueError("off-peak window start and end must differ")
        return cls(start, end)

    def contains(self, moment: datetime) -> bool:
        now = moment.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def closes_at(self, moment: datetime) -> datetime | None:
        """When the window that holds ``moment`` ends; None if ``moment`` is outside it."""
        if not self.contains(moment):
            return None
        end = moment.replace(hour=self.end.hour, minute=self.end.minute, second=0,
                             microsecond=0)
        if end <= moment:
            end += timedelta(days=1)
        return end


@dataclass(frozen=True)
class PatientIdentity:
    patient_id: str
    issuer: str | None = None


@dataclass
class PriorsReport:
    """What one run found and did for one patient (counts, for logs and tests)."""

    studies_found: int = 0
    relevant: list[str] = field(default_factory=list)
    retrieved_series: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    moved_for_analysis: list[str] = field(default_factory=list)
    points_added: int = 0
    stopped_early: str | None = None


def is_node_report_series(series: Dataset) -> bool:
    return (str(series.get("Modality", "") or "") == "SR"
            and str(series.get("SeriesDescription", "") or "").startswith(
                SERIES_DESCRIPTION_PREFIX))


def _count(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _multi(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    if isinstance(value, Sequence):
        return [str(v) for v in value]
    return [str(value)]


class ObservedRetrieve:
    """Answers the C-STORE sub-operations of one retrieve on the node's own association
    (C-GET) with the node's store, and tells operations as the listener does for a
    caller's association: metrics per instance, and, once the retrieve ends, one audit
    ``association`` record and a ``store`` record per study (``retrieve: C-GET``)."""

    def __init__(self, handle_store: StoreHandler, events: NodeEvents, peer_ae: str,
                 address: str, operation: str) -> None:
        self.handle_store = handle_store
        self.events = events
        self.peer_ae = peer_ae
        self.address = address
        self.operation = operation
        self._assoc: Any = None

    def __call__(self, event: Any) -> Any:
        if self._assoc is None:
            self._assoc = event.assoc
            peer = event.assoc.acceptor  # the node requested; the PACS sends
            self.events.retrieve_started(event.assoc,
                                         str(peer.ae_title).strip() or self.peer_ae,
                                         str(peer.address or self.address), self.operation)
        started = time.monotonic()
        status = self.handle_store(event)
        self.events.store_answered(event.assoc, int(status) if isinstance(status, int)
                                   else int(status.Status), time.monotonic() - started)
        return status

    def closed(self) -> None:
        if self._assoc is not None:
            self.events.association_closed(self._assoc)
            self._assoc = None


class PriorsFetcher:
    """Finds and retrieves one patient's priors from the configured query source."""

    def __init__(self, settings: Settings, ledger: Ledger, spool: Spool, *,
                 throttle: MoveThrottle | None = None,
                 now: Callable[[], datetime] = datetime.now,
                 handle_store: StoreHandler | None = None,
                 events: NodeEvents = NO_EVENTS) -> None:
        self.settings = settings
        self.events = events
        self.ledger = ledger
        self.spool = spool
        self.query = settings.query
        self.source = self.query.source
        self.now = now
        self.throttle = throttle or throttle_for(self.source or "",
                                                 self.query.max_moves_per_minute)
        self._handle_store = handle_store
        self._move_refused = False  # this run: the PACS refused a C-MOVE, C-GET the rest

    def handle_store(self) -> StoreHandler:
        """What answers C-GET sub-operations: the node's own durable C-STORE handler."""
        if self._handle_store is None:
            self._handle_store = StoreSCP(self.settings, self.spool, self.ledger,
                                          events=self.events).handle_store
        return self._handle_store

    def client(self) -> QueryClient:
        if self.source is None:
            raise QueryError("no query source configured (query.source)")
        dest = self.settings.destinations[self.source]
        return QueryClient(host=dest.host, port=dest.port, called_aet=dest.ae_title,
                           calling_aet=self.settings.node.ae_title,
                           timeout_s=self.query.timeout_s,
                           total_timeout_s=self.query.total_timeout_s)

    def identity(self, patient_key: str) -> PatientIdentity | None:
        """The patient's ID, read from a stored object: the ledger keeps only a hash."""
        paths = self.ledger.patient_instance_paths(patient_key, limit=1)
        paths += [r.source_path for r in self.ledger.timeline_points(patient_key)
                  if r.source_path]
        for rel in paths:
            try:
                ds = dcmread(self.spool.path(rel), stop_before_pixels=True)
            except (OSError, InvalidDicomError):
                continue
            patient_id = str(ds.get("PatientID", "") or "")
            if patient_id:
                issuer = str(ds.get("IssuerOfPatientID", "") or "") or None
                return PatientIdentity(patient_id, issuer)
        return None

    def _event(self, patient_key: str, outcome: str, *, study: str | None = None,
               series: str | None = None, expected: int | None = None,
               completed: int | None = None, failed: int | None = None,
               arrived: int | None = None, detail: str | None = None) -> None:
        self.ledger.record_retrieve(RetrieveEvent(
            patient_key, self.source or "", study, series, outcome, expected, completed,
            failed, arrived, detail))

    def _relevant(self, study: Dataset, anchor: datetime) -> str | None:
        """None when the study is a relevant prior, else why it is not."""
        when = parse_study_date(study.get("StudyDate"))
        if when is None:
            return "no study date"
        if abs((anchor.date() - when).days) > self.query.lookback_days:
            return f"outside the {self.query.lookback_days}-day look-back window"
        modalities = {m.upper() for m in _multi(study.get("ModalitiesInStudy"))}
        if modalities and not modalities & set(self.query.modalities):
            return f"no {'/'.join(self.query.modalities)} series"
        return None

    def _body_part_ok(self, series: Sequence[Dataset]) -> bool:
        images = [s for s in series if str(s.get("Modality", "")) in self.query.modalities]
        if not images:
            return True  # reports only (images purged or elsewhere): the SR decides
        parts = {str(s.get("BodyPartExamined", "") or "").upper() for s in images}
        return "" in parts or bool(parts & set(self.query.body_parts))

    def _arrived(self, series_uid: str) -> int:
        return len(self.ledger.instance_paths([series_uid]))

    def fetch(self, patient_key: str, *, until: datetime | None = None,
              anchor: datetime | None = None) -> PriorsReport:
        """Find, retrieve and read one patient's priors; every outcome goes to the ledger.

        ``until`` (the end of an off-peak window) stops further moves once passed;
        ``anchor`` is the date the look-back window is measured from (default: the
        newest point of the patient's timeline, else today).
        """
        report = PriorsReport()
        self._move_refused = False
        if self.source is None:
            return report
        identity = self.identity(patient_key)
        if identity is None:
            self._event(patient_key, "error", detail="no stored object names the patient")
            report.errors.append("patient unknown")
            return report
        rows = self.ledger.timeline_points(patient_key)
        known = {r.study_uid for r in rows}
        if anchor is None:
            dates = [d for d in (parse_study_date(r.study_date) for r in rows) if d]
            anchor = (datetime.combine(max(dates), clock_time()) if dates else self.now())
        client = self.client()
        try:
            studies = client.find_studies(identity.patient_id, issuer=identity.issuer)
        except QueryError as exc:
            self._event(patient_key, "error", detail=f"C-FIND studies: {exc}")
            report.errors.append(str(exc))
            log.error("priors: C-FIND to %s failed: %s", self.source, exc)
            return report
        report.studies_found = len(studies)
        deadline = until.timestamp() if until is not None else None
        for study in sorted(studies, key=lambda s: str(s.get("StudyDate", "")), reverse=True):
            study_uid = str(study.get("StudyInstanceUID", "") or "")
            if not study_uid or study_uid in known:
                continue
            why = self._relevant(study, anchor)
            if why is not None:
                continue
            report.relevant.append(study_uid)
            try:
                series = client.find_series(study_uid)
            except QueryError as exc:
                self._event(patient_key, "error", study=study_uid,
                            detail=f"C-FIND series: {exc}")
                report.errors.append(str(exc))
                continue
            if not self._body_part_ok(series):
                self._event(patient_key, "skipped", study=study_uid,
                            detail=f"no {'/'.join(self.query.body_parts)} series")
                report.skipped.append(study_uid)
                continue
            reports = [s for s in series if is_node_report_series(s)]
            images = False
            if not reports and self.query.reanalyse_images:
                # no report: the images come instead, and the node's routes analyse them
                # like any arriving study; the volume joins the timeline when that job ends
                reports = [s for s in series
                           if str(s.get("Modality", "")) in self.query.modalities]
                images = True
            if not reports:
                self._event(patient_key, "skipped", study=study_uid,
                            detail="no node report in the study, and re-analysing its "
                                   "images is off (query.reanalyse_images)")
                report.skipped.append(study_uid)
                continue
            for item in reports:
                if deadline is not None and time.time() >= deadline:
                    report.stopped_early = "off-peak window closed"
                    self._event(patient_key, "skipped", study=study_uid,
                                detail="off-peak window closed; continues next night")
                    return report
                outcome = self._retrieve(client, patient_key, study_uid, item, deadline,
                                         report, images=images)
                if outcome == "stop":
                    return report
        return report

    def _retrieve(self, client: QueryClient, patient_key: str, study_uid: str,
                  series: Dataset, deadline: float | None, report: PriorsReport, *,
                  images: bool = False) -> str:
        """Retrieve one series to the node unless it is already there; check the count.

        ``images``: an image series moved for re-analysis (nothing to read here).
        """
        series_uid = str(series.SeriesInstanceUID)
        expected = _count(series.get("NumberOfSeriesRelatedInstances"))
        arrived = self._arrived(series_uid)
        completed: int | None = None
        failed: int | None = None
        via: str | None = None  # None: everything was here already
        what = "images for re-analysis: " if images else ""
        if images and expected is not None and arrived >= expected:
            return "next"  # moved before; its analysis adds the point
        if expected is None or arrived < expected:
            if not self.throttle.acquire(self._monotonic_deadline(deadline)):
                report.stopped_early = "off-peak window closed while throttled"
                self._event(patient_key, "skipped", study=study_uid, series=series_uid,
                            detail="off-peak window closed while throttled")
                return "stop"
            try:
                result, via = self._pull(client, study_uid, series_uid)
            except QueryError as exc:
                arrived = self._arrived(series_uid)
                fatal = any(cause in str(exc) for cause in _FATAL_CAUSES)
                if fatal or expected is None or arrived >= expected:
                    self._event(patient_key, "error", study=study_uid, series=series_uid,
                                expected=expected, arrived=arrived, detail=str(exc))
                    report.errors.append(str(exc))
                    log.error("priors: retrieve from %s failed: %s", self.source, exc)
                    # the same cause (node unknown, PACS down) fails every other retrieve
                    return "stop" if fatal else "next"
                # a failure after some sub-operations: the retrieve stopped early
                self._event(patient_key, "incomplete", study=study_uid, series=series_uid,
                            expected=expected, arrived=arrived,
                            detail=f"{what}retrieve stopped early: {arrived} of {expected} "
                                   f"instance(s) arrived; {exc}")
                report.incomplete.append(series_uid)
                log.warning("priors: retrieve of a prior series stopped early (%s of %s)",
                            arrived, expected)
                if not images:
                    report.points_added += self._read_reports(patient_key, series_uid)
                return "next"
            completed, failed = result.completed, result.failed
            arrived = self._arrived(series_uid)
        short = expected is not None and (arrived < expected
                                          or (completed is not None and completed < expected))
        if short or (failed or 0) > 0:
            self._event(patient_key, "incomplete", study=study_uid, series=series_uid,
                        expected=expected, completed=completed, failed=failed, arrived=arrived,
                        detail=f"{what}retrieve stopped early: {arrived} of {expected} "
                               f"instance(s) arrived ({via}: {completed} completed, "
                               f"{failed} failed)")
            report.incomplete.append(series_uid)
            log.warning("priors: retrieve of a prior series stopped early (%s of %s)",
                        arrived, expected)
        else:
            notes = [what.rstrip(": ")] if what else []
            if via == "C-GET":
                notes.append("by C-GET")
            self._event(patient_key, "ok", study=study_uid, series=series_uid,
                        expected=expected, completed=completed, failed=failed, arrived=arrived,
                        detail=", ".join(notes) or None)
            report.retrieved_series.append(series_uid)
        if images:
            report.moved_for_analysis.append(series_uid)
        else:
            report.points_added += self._read_reports(patient_key, series_uid)
        return "next"

    def _pull(self, client: QueryClient, study_uid: str, series_uid: str
              ) -> tuple[MoveResult, str]:
        """Retrieve one series the way ``query.retrieve`` says; the result and how it came
        ("C-MOVE" or "C-GET"). A QueryError's text names the operation(s) that failed."""
        mode = self.query.retrieve
        if mode == "get" or self._move_refused:
            return self._get(client, study_uid, series_uid), "C-GET"
        try:
            return client.move(self.settings.node.ae_title, study_uid=study_uid,
                               series_uids=[series_uid]), "C-MOVE"
        except QueryError as exc:
            if mode != "move-then-get" or not any(c in str(exc) for c in _MOVE_REFUSED):
                raise QueryError(_named("C-MOVE", exc)) from exc
            refused = exc
        self._move_refused = True
        log.warning("priors: %s refused the C-MOVE to the node (%s); retrieving with "
                    "C-GET instead", self.source, refused)
        try:
            return self._get(client, study_uid, series_uid), "C-GET"
        except QueryError as exc:
            raise QueryError(f"{_named('C-MOVE', refused)}; C-GET instead: "
                             f"{_named('C-GET', exc)}") from exc

    def _get(self, client: QueryClient, study_uid: str, series_uid: str) -> MoveResult:
        observed = ObservedRetrieve(self.handle_store(), self.events, client.called_aet,
                                    client.host, "C-GET")
        try:
            return client.get(study_uid=study_uid, series_uids=[series_uid],
                              handle_store=observed, spool=self.spool)
        except QueryError as exc:
            raise QueryError(_named("C-GET", exc)) from exc
        finally:
            observed.closed()

    def _monotonic_deadline(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return self.throttle.clock() + max(0.0, deadline - time.time())

    def _read_reports(self, patient_key: str, series_uid: str) -> int:
        added = 0
        for _, rel in self.ledger.instance_paths([series_uid]):
            path: Path = self.spool.path(rel)
            try:
                ds = dcmread(path)
            except (OSError, InvalidDicomError):
                continue
            if str(ds.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
                continue
            for m in measurements_from_report(ds, source_path=rel):
                added += int(record_measurement(self.ledger, patient_key, m))
        return added
