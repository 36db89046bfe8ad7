"""Composition root: builds every part of the node from its settings and runs it."""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread

from dicomnode.config import Settings
from dicomnode.history.jobs import HistoryService, volume_follow_up
from dicomnode.ingest.completion import CompletionTracker
from dicomnode.ingest.ledger import JobRow, Ledger
from dicomnode.ingest.reconcile import mark_running, mark_stopped, reconcile, unclean_since
from dicomnode.ingest.spool import Spool
from dicomnode.jobs.celery_engine import CeleryDispatcher
from dicomnode.jobs.outbox import OutboxSender
from dicomnode.jobs.runner import JobRunner
from dicomnode.net.scp import StoreSCP
from dicomnode.ops.audit import AUDIT_NAME, AuditTrail
from dicomnode.ops.observer import Operations
from dicomnode.ops.reader import LedgerReader
from dicomnode.ops.syslog import syslog_forwarder
from dicomnode.routing.router import Router, routing_keywords
from dicomnode.routing.rules import header_values
from dicomnode.web.api import StatusApi
from dicomnode.web.server import TOKEN_FILE, WebServer, load_or_create_token

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.sqlite3"


def open_ledger(settings: Settings, clock: Callable[[], float] = time.time,
                readonly: bool = False) -> Ledger:
    return Ledger(settings.spool_dir / LEDGER_NAME, clock=clock, readonly=readonly,
                  url=settings.ledger.url)


def shared_tmp_name(settings: Settings) -> str | None:
    """A receiver's own folder for partial files in a spool shared with others (named
    from its storage folder, never from peer data); None for a spool of its own."""
    if settings.node.spool is None:
        return None
    digest = hashlib.sha256(str(settings.node.storage.resolve()).encode()).hexdigest()
    return f"node-{digest[:16]}"


class Node:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_root, max_instance_bytes=settings.node.max_instance_bytes,
                           tmp_name=shared_tmp_name(settings))
        self.ledger = open_ledger(settings, clock)
        self.router = Router(settings.routes, header_loader=self._series_header)
        self.completion = CompletionTracker(self.ledger, self.router, settings.completion)
        self.audit = AuditTrail(settings.spool_dir / AUDIT_NAME, clock=clock,
                                forwarder=syslog_forwarder(settings))
        self.reader = LedgerReader(settings.spool_dir / LEDGER_NAME, settings.ledger.url)
        self.ops = Operations(settings, self.reader, self.audit)
        self.outbox = OutboxSender(settings, self.ledger, self.spool, events=self.ops)
        self.runner: JobRunner | CeleryDispatcher = JobRunner(
            settings, self.ledger, on_finished=self._kick_outbox, on_done=self._job_done,
            events=self.ops) if settings.jobs.engine == "in-process" else \
            CeleryDispatcher(settings, self.ledger)
        self.scp = StoreSCP(settings, self.spool, self.ledger, events=self.ops)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.history = HistoryService(settings, self.ledger, self.spool,
                                      on_queued=self._kick_outbox, events=self.ops)
        self._stopped = threading.Event()
        # held by an outbox kick and by stop(): no kick reaches the scheduler once it stops
        # (its shutdown holds the job-store lock until running jobs end: a history job
        # kicking then would wait forever)
        self._kick_lock = threading.Lock()
        self.web = self._build_web() if settings.web.enabled else None

    def _build_web(self) -> WebServer:
        tokens = self.settings.web.tokens
        if not tokens:
            tokens = (load_or_create_token(self.settings.spool_dir),)
            log.info("web: no tokens configured; the local operator token is in %s",
                     self.settings.spool_dir / TOKEN_FILE)
        api = StatusApi(self.settings, self.ledger, self.reader, self.spool, self.router,
                        self.audit, header_loader=self._series_header)
        return WebServer(self.settings.web, api, self.ops.metrics, self.audit, self.readiness,
                         tokens)

    def readiness(self) -> dict[str, bool]:
        """What /readyz checks: the node can take studies in and get results out."""
        return {"dicom_listener": self.scp._server is not None,
                "ledger_readable": self.reader.readable(),
                "scheduler_running": bool(self.scheduler.running),
                "job_workers": self.runner.alive(),
                "running": not self._stopped.is_set()}

    def _series_header(self, series_uid: str) -> Mapping[str, Any]:
        paths = self.ledger.instance_paths([series_uid])
        if not paths:
            return {}
        ds = dcmread(self.spool.path(paths[0][1]), stop_before_pixels=True)
        return header_values(ds, routing_keywords(self.settings.routes))

    def _sweep(self) -> None:
        closed = self.completion.sweep()
        for c in closed:
            self.ops.closed(c.level, c.uid, c.reason)
        if any(c.jobs for c in closed):
            self.runner.wake.set()

    def _pump(self) -> None:
        try:
            self.outbox.pump()
        except Exception:
            log.exception("outbox pump failed")

    def _kick_outbox(self) -> None:
        with self._kick_lock:
            if self._stopped.is_set():
                return
            job = self.scheduler.get_job("outbox")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    def _job_done(self, job: JobRow, summary: Mapping[str, Any],
                  outputs: Sequence[tuple[str, str, str, str]]) -> None:
        """A job finished here (in-process engine): its volume goes through the ledger,
        as one finished on a worker does, and is taken at once."""
        if volume_follow_up(self.ledger, job, summary, outputs):
            self._take_history()

    def _take_history(self) -> None:
        """History requests from the ledger, whichever process filed them; none once
        stopping (they stay in the ledger for the next start)."""
        with self._kick_lock:
            if self._stopped.is_set():
                return
            try:
                self.history.take_requests()
            except Exception:
                log.exception("taking history requests failed")

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        removed = self.spool.clear_partials()
        since = unclean_since(self.settings.spool_dir)  # this node's marker, not the spool's
        if since is not None:
            report = reconcile(self.spool, self.ledger, since, self.scp.keywords,
                               self.scp.header_tags)
            log.info("unclean stop: %d spool file(s) since it checked, %d re-indexed, "
                     "%d damaged, %d unreadable", report.scanned, report.indexed,
                     report.mismatched, report.unreadable)
        mark_running(self.settings.spool_dir)
        jobs, sends = self.ledger.recover(jobs=self.settings.jobs.engine == "in-process")
        if removed or jobs or sends:
            log.info("recovered after restart: %d partial file(s) removed, %d job(s) and "
                     "%d send(s) re-queued", removed, jobs, sends)
        self.audit.start()
        self.ops.started()
        self.scp.start()
        # a sweep or pump still running when the next is due is normal, not a warning
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        now = datetime.now(UTC)
        self.scheduler.add_job(self._sweep, "interval", id="completion",
                               seconds=self.settings.completion.sweep_interval_s,
                               max_instances=1, coalesce=True, next_run_time=now)
        self.scheduler.add_job(self._pump, "interval", id="outbox",
                               seconds=self.settings.outbox.interval_s,
                               max_instances=1, coalesce=True, next_run_time=now)
        self.scheduler.add_job(self._take_history, "interval", id="history-requests",
                               seconds=1.0, max_instances=1, coalesce=True,
                               next_run_time=now)
        self.history.install(self.scheduler)
        self.scheduler.start()
        self.runner.start()
        if self.web is not None:
            self.web.start()

    def stop(self) -> None:
        """Graceful: stop accepting, stop scheduling, let jobs finish or re-queue them."""
        if self._stopped.is_set():
            return
        with self._kick_lock:
            self._stopped.set()
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        self.scheduler.shutdown(wait=True)
        self.history.uninstall()
        self.runner.stop()
        self.ops.stopped()
        self.audit.stop()
        mark_stopped(self.settings.spool_dir, self.ledger)
        log.info("stopped")

    def serve_forever(self) -> None:
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not done.wait(0.5):
                pass
        finally:
            self.stop()
