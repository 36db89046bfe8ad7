"""Jobs through Celery (``jobs: {engine: celery, broker: redis://...}``).

The ledger stays the record of every job; Celery only carries job ids to workers on any
machine. ``dicomnode serve`` runs a dispatcher in place of the in-process runner: it
moves pending jobs to ``queued`` in the ledger and, after that commits, publishes one
message per job. ``dicomnode worker`` runs a Celery worker whose task claims the job in
the ledger (``Ledger.claim_job_id``: only a pending or queued job can be claimed, so a
repeated message runs nothing) and runs it exactly as the in-process engine does, in a
long-lived child process with the job timeout; results go to the ledger's outbox, which
the receivers send (their deterministic UIDs make a repeat replace, not duplicate).

Messages are acknowledged late (``task_acks_late``) and rejected back to the queue when
the process running them dies (``task_reject_on_worker_lost``). A worker killed as a
whole is caught by the ledger, not the broker: its job keeps ``running`` with the claim
time, and once the lease (the job timeout plus a margin) has run out the dispatcher puts
it back to pending (the attempt counts) and publishes it again, so it runs once more
elsewhere. Redis's own redelivery (its visibility timeout, set to the same lease) may
repeat the message too; the claim turns that repeat into a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from dicomnode.config import Settings
from dicomnode.ingest.ledger import Ledger

log = logging.getLogger(__name__)

QUEUE = "dicomnode-jobs"
TASK = "dicomnode.run_job"


def lease_s(settings: Settings) -> float:
    """How long a claimed or queued job may go without a result before it is re-queued:
    longer than the job timeout (after which the worker gives up on it itself)."""
    return settings.jobs.timeout_s * 1.25 + 5.0


def make_app(settings: Settings) -> Any:
    from celery import Celery

    app = Celery("dicomnode", broker=settings.jobs.broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds only the message it runs
        task_default_queue=QUEUE,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": lease_s(settings)},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


class CeleryDispatcher:
    """In ``serve``: hands pending jobs to Celery and re-queues jobs whose lease ran out.
    Offers the in-process runner's ``wake``/``start``/``stop``/``alive``."""

    def __init__(self, settings: Settings, ledger: Ledger, app: Any | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.app = app if app is not None else make_app(settings)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-dispatch")
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop dispatching; jobs already handed to workers run on there."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(grace_s)

    def dispatch_once(self) -> int:
        """Re-queue expired jobs, then publish every pending job; returns the number
        published."""
        lost, unclaimed = self.ledger.expire_jobs(lease_s(self.settings),
                                                  max_attempts=self.settings.jobs.max_attempts)
        if lost or unclaimed:
            log.warning("jobs: %d lost with their worker and %d never claimed within the "
                        "%.0f s lease; re-queued", lost, unclaimed, lease_s(self.settings))
        ids = self.ledger.dispatch_jobs()
        for job_id in ids:
            try:
                self.app.send_task(TASK, args=[job_id], queue=QUEUE)
            except Exception as exc:  # broker down: the lease brings the job back
                log.error("job %d: could not publish to the broker (%s); re-queued after "
                          "the lease", job_id, type(exc).__name__)
                break
        if ids:
            log.info("jobs: %d handed to the workers", len(ids))
        return len(ids)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch_once()
            except Exception:
                log.exception("job dispatch failed")
            self.wake.wait(1.0)
            self.wake.clear()


def run_worker(settings: Settings) -> None:
    """``dicomnode worker``: analysis only, ``jobs.workers`` jobs at a time, until
    SIGTERM/SIGINT (Celery's warm shutdown lets running jobs finish)."""
    from dicomnode.jobs.runner import JobRunner, _Worker
    from dicomnode.service import open_ledger

    ledger = open_ledger(settings)
    runner = JobRunner(settings, ledger)
    app = make_app(settings)
    local = threading.local()
    slots: list[_Worker] = []
    slots_lock = threading.Lock()

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: int) -> None:
        job = ledger.claim_job_id(int(job_id))
        if job is None:
            log.info("job %s: not pending (claimed, done or superseded); message dropped",
                     job_id)
            return
        worker: _Worker | None = getattr(local, "worker", None)
        if worker is None:
            worker = local.worker = _Worker(settings.log_level)
            with slots_lock:
                slots.append(worker)
        runner.run_claimed(job, worker)

    name = f"dicomnode-{os.getpid()}@{socket.gethostname()}"
    log.info("worker %s: %d slot(s), queue %s", name, settings.jobs.workers, QUEUE)
    try:
        app.worker_main(["worker", "--pool=threads", f"--concurrency={settings.jobs.workers}",
                         "-Q", QUEUE, "-n", name, "--without-gossip", "--without-mingle",
                         "--without-heartbeat", f"--loglevel={settings.log_level}"])
    finally:
        for worker in slots:
            worker.stop()
        ledger.dispose()
