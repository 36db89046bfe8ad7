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
elsewhere. The broker's own redelivery may repeat the message too, and the claim turns
that repeat into a no-op: Redis gives an unacknowledged message back after its
visibility timeout (set to the same lease); RabbitMQ at once, when the dead worker's
connection closes (the job is then still ``running`` in the ledger, so the repeat is
dropped and the lease decides, as with Redis). RabbitMQ also takes a message back from a
live consumer that holds it longer than its ``consumer_timeout`` (30 min by default),
and Celery then stops the worker once its job is done (:func:`run_worker` exits 1), so
that must exceed the lease (:func:`consumer_timeout_warning`). Publishes to RabbitMQ are
confirmed by the broker, so a message it did not take is an error in the dispatcher.
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


# RabbitMQ's default consumer_timeout (since 3.8.15): a delivery unacknowledged this long
# closes its consumer's channel and goes back to the queue
RABBITMQ_CONSUMER_TIMEOUT_S = 1800.0


def is_amqp(broker: str | None) -> bool:
    return (broker or "").startswith(("amqp://", "amqps://"))


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis: an unacknowledged message comes back after ``visibility_timeout``, which
    must outlast a job (else a running job's message is handed to a second worker, whose
    claim then drops it): the lease. RabbitMQ: messages come back when their consumer's
    connection or channel closes, whatever their age (no visibility timeout); publisher
    confirms make a message the broker did not take an error for the dispatcher."""
    if is_amqp(settings.jobs.broker):
        return {"confirm_publish": True}
    return {"visibility_timeout": lease_s(settings)}


def consumer_timeout_warning(settings: Settings) -> str | None:
    """A line for the worker's log when a job may outlast RabbitMQ's default
    ``consumer_timeout`` (the ledger still keeps it from running twice, but the broker
    would close the worker's channel mid-job, and Celery would stop the worker)."""
    if not is_amqp(settings.jobs.broker) or lease_s(settings) <= RABBITMQ_CONSUMER_TIMEOUT_S:
        return None
    return (f"jobs.timeout_s {settings.jobs.timeout_s:.0f} s: a job may hold its message "
            f"longer than RabbitMQ's default consumer_timeout "
            f"({RABBITMQ_CONSUMER_TIMEOUT_S:.0f} s), and the worker would stop after such a "
            f"job; set consumer_timeout in rabbitmq.conf to at least "
            f"{int(lease_s(settings) * 1000)} (ms)")


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
        broker_transport_options=transport_options(settings),
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


class WorkerNode:
    """What ``dicomnode worker`` is apart from Celery's consumer loop: the ledger, the job
    runner with the node's real observer, and the follow-up of each finished job.

    * Follow-up: a finished job's measured volume becomes a timeline point and a
      ``history_requests`` row in the ledger (:func:`dicomnode.history.jobs.
      volume_follow_up`), which one receiver takes and schedules, as for a job that
      finished in ``serve``.
    * Metrics: job duration per pipeline and outcome, audit records written; served on
      this process's own ``/metrics`` (``web.worker_port``, with ``web.tokens``) when
      ``web`` is configured: Prometheus scrapes every receiver and worker.
    * Audit: ``analysis`` and ``application`` records in this process's own trail,
      ``<node.storage>/audit.sqlite3``: a worker on another machine cannot append to a
      receiver's SQLite file safely (SQLite's locks do not hold over NFS), so each
      machine keeps its own chained trail; processes sharing one ``node.storage`` on one
      machine may append to the same file (each batch is chained inside one
      ``BEGIN IMMEDIATE`` transaction). With ``audit.syslog`` every process also sends
      its records to the site's Audit Record Repository, where they come together.
    """

    def __init__(self, settings: Settings) -> None:
        from dicomnode.history.jobs import volume_follow_up
        from dicomnode.jobs.runner import JobRunner, _Worker
        from dicomnode.ops.audit import AUDIT_NAME, AuditTrail
        from dicomnode.ops.observer import Operations
        from dicomnode.ops.reader import LedgerReader
        from dicomnode.ops.syslog import syslog_forwarder
        from dicomnode.service import LEDGER_NAME, open_ledger

        self.settings = settings
        self.ledger = open_ledger(settings)
        self.audit = AuditTrail(settings.spool_dir / AUDIT_NAME,
                                forwarder=syslog_forwarder(settings))
        self.reader = LedgerReader(settings.spool_dir / LEDGER_NAME, settings.ledger.url)
        self.ops = Operations(settings, self.reader, self.audit, role="worker")
        self._follow_up = volume_follow_up
        self.runner = JobRunner(settings, self.ledger, on_done=self._job_done,
                                events=self.ops)
        self._new_slot = lambda: _Worker(settings.log_level)
        self._local = threading.local()
        self._slots: list[Any] = []
        self._slots_lock = threading.Lock()
        self.web: Any = None
        if settings.web.enabled:
            from dicomnode.web.server import WebServer, load_or_create_token

            tokens = settings.web.tokens or (load_or_create_token(settings.spool_dir),)
            self.web = WebServer(settings.web, None, self.ops.metrics, self.audit,
                                 self.readiness, tokens, port=settings.web.worker_listen_port)

    def readiness(self) -> dict[str, bool]:
        return {"ledger_readable": self.reader.readable()}

    def _job_done(self, job: Any, summary: Any, outputs: Any) -> None:
        if self._follow_up(self.ledger, job, summary, outputs):
            log.info("job %d: new volume; history requested from the receivers", job.id)

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self.audit.start()
        self.ops.started()
        if self.web is not None:
            try:
                self.web.start()
            except OSError as exc:  # analysis matters more than its metrics
                log.error("worker: cannot serve /metrics on %s:%d (%s); running without "
                          "(set web.worker_port)", self.settings.web.host,
                          self.settings.web.worker_listen_port, exc.strerror or exc)
                self.web = None

    def run_job(self, job_id: int) -> bool:
        """Claim and run one job named by a message; False when it was not claimable (a
        repeated message, a job running elsewhere, done or superseded)."""
        job = self.ledger.claim_job_id(int(job_id))
        if job is None:
            log.info("job %s: not pending (claimed, done or superseded); message dropped",
                     job_id)
            return False
        slot = getattr(self._local, "slot", None)
        if slot is None:  # one analysis child per Celery thread, kept warm
            slot = self._local.slot = self._new_slot()
            with self._slots_lock:
                self._slots.append(slot)
        self.runner.run_claimed(job, slot)
        return True

    def stop(self) -> None:
        for slot in self._slots:
            slot.stop()
        if self.web is not None:
            self.web.stop()
        self.ops.stopped()
        self.audit.close()
        self.reader.close()
        self.ledger.dispose()


def run_worker(settings: Settings) -> int:
    """``dicomnode worker``: analysis only, ``jobs.workers`` jobs at a time, until
    SIGTERM/SIGINT (Celery's warm shutdown lets running jobs finish). Returns the exit
    status: 0 after a signal, 1 when Celery stopped on its own (e.g. RabbitMQ closed the
    channel of a job that outlasted ``consumer_timeout``: Celery calls that unrecoverable,
    lets the running job finish and stops; ``worker_main`` would report 0, and a
    supervisor that restarts on failure would leave the machine idle)."""
    from celery.signals import celeryd_init

    node = WorkerNode(settings)
    app = make_app(settings)
    workers: list[Any] = []

    def keep_worker(sender: Any = None, instance: Any = None, **_: Any) -> None:
        workers.append(instance)

    celeryd_init.connect(keep_worker, weak=False)

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: int) -> None:
        node.run_job(job_id)

    name = f"dicomnode-{os.getpid()}@{socket.gethostname()}"
    warning = consumer_timeout_warning(settings)
    if warning is not None:
        log.warning("worker: %s", warning)
    node.start()
    log.info("worker %s: %d slot(s), queue %s", name, settings.jobs.workers, QUEUE)
    try:
        app.worker_main(["worker", "--pool=threads", f"--concurrency={settings.jobs.workers}",
                         "-Q", QUEUE, "-n", name, "--without-gossip", "--without-mingle",
                         "--without-heartbeat", f"--loglevel={settings.log_level}"])
    finally:
        celeryd_init.disconnect(keep_worker)
        node.stop()
    code = int(getattr(workers[-1], "exitcode", None) or 0) if workers else 1
    if code:
        log.error("worker %s: Celery stopped by itself (exit status %d); its jobs are safe "
                  "in the ledger, restart the worker", name, code)
    return code
