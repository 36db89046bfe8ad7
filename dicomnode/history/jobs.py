"""History jobs: priors for a patient, then the growth results, on a persistent schedule.

Two kinds of APScheduler jobs, both kept in the ledger database (``SqliteJobStore``) so a
restart neither forgets a pending run nor runs the nightly job twice:

* one-off, per new volume (``volume-<patient>-<study>``): scheduled the moment a
  tumour_volume job finishes with a volume; it fetches the patient's priors and writes
  the growth results.
* nightly (``history-nightly``, at ``query.nightly``): the same for every patient with a
  timeline, inside the off-peak window (``query.off_peak``), so priors that were missing
  or could not be fetched in the day are picked up.

A finished job's volume reaches the scheduler through the ledger, so it does not matter
which process finished the job (``serve`` or a ``dicomnode worker`` on another machine):
that process records the timeline point and files a ``history_requests`` row
(:func:`volume_follow_up`); every receiver takes unclaimed requests each second
(:meth:`HistoryService.take_requests`) and exactly one of them schedules the volume
job. The nightly run is claimed per date in the ledger (``claims``), so with several
receivers one of them runs it.

Stored jobs name module-level functions (``run_volume_job``, ``run_nightly_job``) and
string arguments only, which is what survives pickling across restarts; the functions
act on the running node's :class:`HistoryService`, registered by ``Node.start``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.config import Settings
from dicomnode.history.growth import GrowthForecaster, default_forecaster, forecast
from dicomnode.history.jobstore import SqliteJobStore
from dicomnode.history.priors import OffPeakWindow, PriorsFetcher, PriorsReport
from dicomnode.history.timeline import (
    GROWTH_ALGORITHM_NAME,
    growth_timeline,
    measurement_from_job,
    parse_study_date,
    record_measurement,
)
from dicomnode.ingest.ledger import JobRow, Ledger, TimelineRow
from dicomnode.ingest.spool import Spool
from dicomnode.jobs.execute import encode, validate_object
from dicomnode.ops.events import NO_EVENTS, NodeEvents
from dicomnode.results.common import AlgorithmInfo
from dicomnode.results.growth import HistoryPoint, build_growth_plot, build_growth_report
from dicomnode.results.uids import derive_uid

__all__ = [
    "GROWTH_VERSION",
    "JOBSTORE",
    "NIGHTLY_JOB_ID",
    "HistoryOutcome",
    "HistoryService",
    "run_nightly_job",
    "run_volume_job",
    "volume_follow_up",
]

log = logging.getLogger(__name__)

JOBSTORE = "history"
NIGHTLY_JOB_ID = "history-nightly"
GROWTH_VERSION = "1.0.0"

_active: HistoryService | None = None
_active_lock = threading.Lock()


def run_volume_job(patient_key: str) -> None:
    """Scheduled once per new volume: priors, then growth results, for one patient."""
    service = _active
    if service is None:
        log.warning("history job ran with no node running; skipped")
        return
    service.run_patient(patient_key)


def run_nightly_job() -> None:
    service = _active
    if service is None:
        log.warning("nightly history job ran with no node running; skipped")
        return
    service.run_nightly()


def volume_follow_up(ledger: Ledger, job: JobRow, summary: Mapping[str, Any],
                     outputs: Sequence[tuple[str, str, str, str]]) -> bool:
    """What any process that finished a job does with it (the runner's ``on_done``):
    a measured volume becomes a timeline point and a history request in the ledger,
    which a receiver takes (:meth:`HistoryService.take_requests`). True if filed."""
    measurement = measurement_from_job(summary, outputs, job.study_uid)
    if measurement is None:
        return False
    patient_key = ledger.study_patient_key(job.study_uid)
    if patient_key is None:
        return False
    record_measurement(ledger, patient_key, measurement)
    return ledger.request_history(job.id, patient_key, measurement.study_uid)


def default_holder() -> str:
    """Who claims in the ledger: this process on this machine."""
    return f"{socket.gethostname()}:{os.getpid()}"


def volume_job_id(patient_key: str, study_uid: str) -> str:
    return f"volume-{patient_key}-{derive_uid(study_uid)[-12:]}"


@dataclass
class HistoryOutcome:
    priors: PriorsReport | None = None
    results: list[tuple[str, str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class HistoryService:
    """Priors, timelines and growth results for the running node."""

    def __init__(self, settings: Settings, ledger: Ledger, spool: Spool, *,
                 forecaster: GrowthForecaster | None = None,
                 now: Callable[[], datetime] = datetime.now,
                 on_queued: Callable[[], None] | None = None,
                 events: NodeEvents = NO_EVENTS, holder: str | None = None) -> None:
        self.settings = settings
        self.holder = holder or default_holder()
        self.ledger = ledger
        self.spool = spool
        self.forecaster = forecaster
        self.now = now
        self.on_queued = on_queued
        self.fetcher = PriorsFetcher(settings, ledger, spool, now=now, events=events)
        self.scheduler: object | None = None
        self._patient_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # -- scheduling ------------------------------------------------------------------------

    def install(self, scheduler: object) -> None:
        """Add the persistent job store and the nightly job to a not yet started scheduler."""
        from apscheduler.schedulers.base import BaseScheduler
        from apscheduler.triggers.cron import CronTrigger

        global _active
        assert isinstance(scheduler, BaseScheduler)
        self.scheduler = scheduler
        scheduler.add_jobstore(SqliteJobStore(Path(self.ledger.path)), JOBSTORE)
        with _active_lock:
            _active = self
        if self.settings.query.source is None:
            return
        nightly = self.settings.query.nightly
        if nightly is None:
            return
        hour, minute = (int(x) for x in nightly.split(":"))
        local = datetime.now().astimezone().tzinfo
        scheduler.add_job("dicomnode.history.jobs:run_nightly_job",
                          CronTrigger(hour=hour, minute=minute, timezone=local),
                          id=NIGHTLY_JOB_ID, jobstore=JOBSTORE, replace_existing=True,
                          max_instances=1, coalesce=True, misfire_grace_time=3600)

    def uninstall(self) -> None:
        global _active
        with _active_lock:
            if _active is self:
                _active = None

    def schedule_patient(self, patient_key: str, study_uid: str) -> str | None:
        """Schedule the patient's priors and growth run now (one job per patient and
        study: scheduling it again replaces it). Returns the job id, None when no
        scheduler is installed."""
        from apscheduler.schedulers.base import BaseScheduler

        if not isinstance(self.scheduler, BaseScheduler):
            return None
        job_id = volume_job_id(patient_key, study_uid)
        self.scheduler.add_job("dicomnode.history.jobs:run_volume_job", "date",
                               run_date=datetime.now(UTC), args=[patient_key], id=job_id,
                               jobstore=JOBSTORE, replace_existing=True,
                               misfire_grace_time=None, coalesce=True)
        return job_id

    def take_requests(self) -> int:
        """Claim the ledger's unclaimed history requests (filed by whichever process
        finished a volume job) and schedule each; returns how many. Claimed before
        scheduled: a receiver that dies in between leaves the patient to the nightly
        run, never to two receivers at once."""
        requests = self.ledger.claim_history_requests(self.holder)
        for patient_key, study_uid in requests:
            self.schedule_patient(patient_key, study_uid)
        if requests:
            log.info("history: %d new volume(s) scheduled", len(requests))
        return len(requests)

    # -- running ---------------------------------------------------------------------------

    def _lock(self, patient_key: str) -> threading.Lock:
        with self._locks_lock:
            return self._patient_locks.setdefault(patient_key, threading.Lock())

    def run_nightly(self) -> None:
        now = self.now()
        until: datetime | None = None
        if self.settings.query.off_peak is not None:
            window = OffPeakWindow.parse(self.settings.query.off_peak)
            until = window.closes_at(now)
            if until is None:
                log.info("nightly history: outside the off-peak window %s; nothing moved",
                         self.settings.query.off_peak)
                return
        if not self.ledger.claim_once(f"{NIGHTLY_JOB_ID}:{now.date().isoformat()}",
                                      self.holder):
            log.info("nightly history: already run today by another receiver")
            return
        patients = self.ledger.timeline_patients()
        log.info("nightly history: %d patient(s) with a timeline", len(patients))
        for patient_key in patients:
            if until is not None and self.now() >= until:
                log.info("nightly history: off-peak window closed; the rest continue "
                         "tomorrow")
                return
            self.run_patient(patient_key, until=until.astimezone() if until else None)

    def run_patient(self, patient_key: str, *, until: datetime | None = None) -> HistoryOutcome:
        """Fetch priors (when a query source is set), then write growth results."""
        outcome = HistoryOutcome()
        with self._lock(patient_key):
            if self.settings.query.source is not None:
                try:
                    outcome.priors = self.fetcher.fetch(patient_key, until=until)
                except Exception as exc:  # a PACS problem must never end the scheduler
                    log.exception("priors for a patient failed")
                    outcome.errors.append(f"{type(exc).__name__}: {exc}")
            try:
                outcome.results = self.growth_results(patient_key)
            except Exception as exc:
                log.exception("growth results for a patient failed")
                outcome.errors.append(f"{type(exc).__name__}: {exc}")
        if outcome.results and self.on_queued is not None:
            self.on_queued()
        return outcome

    def growth_results(self, patient_key: str) -> list[tuple[str, str, str, str]]:
        """Growth SR + plot for each tracked lesion with >= 2 dated points; queued."""
        rows = self.ledger.timeline_points(patient_key)
        outputs: list[tuple[str, str, str, str]] = []
        for tracking_uid in sorted({r.tracking_uid for r in rows}):
            lesion = [r for r in rows if r.tracking_uid == tracking_uid]
            outputs.extend(self._growth_for(lesion))
        return outputs

    def _dataset(self, rel: str | None, *, header_only: bool = False) -> Dataset | None:
        if not rel:
            return None
        try:
            return dcmread(self.spool.path(rel), stop_before_pixels=header_only)
        except (OSError, InvalidDicomError):
            return None

    def _growth_for(self, lesion: list[TimelineRow]) -> list[tuple[str, str, str, str]]:
        timeline = growth_timeline(lesion)
        if len(timeline.points) < 2:
            return []
        dated = sorted(lesion, key=lambda r: (r.study_date, r.source_kind != "node"))
        newest = dated[-1]
        history = [HistoryPoint(d, r.volume_cm3, r.study_uid, r.source_sop_uid, r.source_kind)
                   for r in dated for d in [parse_study_date(r.study_date)] if d is not None]
        report_ds = self._dataset(newest.source_path)
        if report_ds is None:
            log.warning("growth: the newest report of a lesion is not in the spool; skipped")
            return []
        image = self._newest_image(newest.study_uid)
        destinations = self.settings.query.send_to
        if not destinations:
            log.warning("growth: no destination for growth results (query.send_to)")
        method = (self.forecaster or default_forecaster(self.settings.models_dir))
        result = forecast(timeline, method)
        algorithm = AlgorithmInfo(GROWTH_ALGORITHM_NAME, GROWTH_VERSION,
                                  parameters=(f"forecaster: {result.method}",))
        # One SR series and one plot series per lesion and newest study; a longer history
        # (a prior found later) adds a new instance to them, numbered by its point count.
        basis = [f"{r.study_uid}:{r.study_date}:{r.volume_cm3:.6g}" for r in dated]
        sr_series = derive_uid("growth-sr", newest.tracking_uid, newest.study_uid,
                               GROWTH_VERSION)
        sc_series = derive_uid("growth-sc", newest.tracking_uid, newest.study_uid,
                               GROWTH_VERSION)
        sr_uid = derive_uid(sr_series, result.method, basis)
        if self.ledger.queued(sr_uid):
            return []  # this history was already reported
        sr_sources = [report_ds] + ([image] if image is not None else [])
        sr = build_growth_report(sr_sources, history, result, algorithm,
                                 tracking_uid=newest.tracking_uid,
                                 series_instance_uid=sr_series, sop_instance_uid=sr_uid,
                                 instance_number=len(history))
        sc = build_growth_plot([image if image is not None else report_ds], history, result,
                               algorithm, series_instance_uid=sc_series,
                               sop_instance_uid=derive_uid(sc_series, result.method, basis),
                               instance_number=len(history))
        outputs: list[tuple[str, str, str, str]] = []
        for ds in (sr, sc):
            validate_object(ds)
            stored = self.spool.write_bytes(encode(ds), "results")
            outputs.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                            str(ds.StudyInstanceUID), stored.relpath))
        self.ledger.queue_results(outputs, destinations)
        log.info("growth: %d point(s), %s; results queued for %s", len(history), result.method,
                 ", ".join(destinations) or "no destination")
        return outputs

    def _newest_image(self, study_uid: str) -> Dataset | None:
        """A header of one of the study's images stored at the node, if any."""
        for series in self.ledger.series_of_study(study_uid):
            if (series.modality or "") in self.settings.query.modalities:
                paths = self.ledger.instance_paths([series.series_uid])
                if paths:
                    return self._dataset(paths[0][1], header_only=True)
        return None
