"""The in-process job engine: worker slots, each backed by a child process.

Analysis runs in child processes so that a hung or crashing pipeline can be ended (a
Python thread cannot be killed) without touching ingest; children are long-lived so
models stay loaded between jobs. Each slot's parent thread claims a job from the
ledger, hands it to its child, and records the outcome. Ingest never waits on this.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from multiprocessing.connection import Connection
from typing import Any

from dicomnode.config import Settings
from dicomnode.ingest.ledger import JobRow, Ledger
from dicomnode.jobs.execute import JobOutcome, JobSpec, execute
from dicomnode.ops.events import NO_EVENTS, NodeEvents
from dicomnode.pipelines.base import PipelineError

log = logging.getLogger(__name__)


def _child_main(conn: Connection, log_level: str) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # logs UIDs per copied module
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        try:
            outcome: Any = execute(spec)
            conn.send(("ok", outcome))
        except PipelineError as exc:
            conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # report, keep the worker alive for the next job
            conn.send(("error", f"{type(exc).__name__}: {exc}\n"
                       + "".join(traceback.format_exc(limit=8))))


class _Worker:
    def __init__(self, log_level: str) -> None:
        self.log_level = log_level
        self.proc: Any = None
        self.conn: Connection | None = None

    def ensure(self) -> Connection:
        if self.proc is None or not self.proc.is_alive() or self.conn is None:
            self.kill()
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            self.proc = ctx.Process(target=_child_main, args=(child, self.log_level),
                                    daemon=True, name="dicomnode-worker")
            self.proc.start()
            child.close()
            self.conn = parent
        return self.conn

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = None
        self.conn = None

    def stop(self) -> None:
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        self.kill()


def _date(value: Any) -> date | None:
    try:
        return datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


class JobRunner:
    def __init__(self, settings: Settings, ledger: Ledger,
                 on_finished: Callable[[], None] | None = None,
                 on_done: Callable[[JobRow, Mapping[str, Any],
                                    Sequence[tuple[str, str, str, str]]], None] | None = None,
                 events: NodeEvents = NO_EVENTS) -> None:
        """``on_done`` sees each job that finished with results (e.g. to schedule history
        jobs for a new volume); it runs after the results are durably queued."""
        self.settings = settings
        self.ledger = ledger
        self.on_finished = on_finished
        self.on_done = on_done
        self.events = events
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[_Worker] = []
        self._running: dict[int, int] = {}  # slot -> job id

    def start(self) -> None:
        for slot in range(self.settings.jobs.workers):
            worker = _Worker(self.settings.log_level)
            self._workers.append(worker)
            t = threading.Thread(target=self._loop, args=(slot, worker), daemon=True,
                                 name=f"job-slot-{slot}")
            t.start()
            self._threads.append(t)

    def alive(self) -> bool:
        """Whether every worker slot's thread is running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; let running jobs finish within the grace, then re-queue them."""
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(grace_s)
        for worker in self._workers:
            worker.kill()
        for job_id in list(self._running.values()):
            self.ledger.fail_job(job_id, "node stopped while the job ran; re-queued",
                                 max_attempts=10**6)

    def _spec(self, job: JobRow) -> JobSpec:
        route = next((r for r in self.settings.routes if r.name == job.route), None)
        options = dict(route.options) if route is not None else {}
        paths = tuple(p for _, p in self.ledger.instance_paths(job.series_uids))
        related = self._related(job, options.get("related"))
        return JobSpec(
            job_id=job.id, route=job.route, pipeline=job.pipeline, level=job.level,
            study_uid=job.study_uid, series_uids=job.series_uids, generation=job.generation,
            instance_paths=paths, storage_root=str(self.settings.spool_root.resolve()),
            models_dir=str(self.settings.models_dir.resolve()), options=options,
            plugins=dict(self.settings.pipelines), related_paths=related)

    def _related(self, job: JobRow, wanted: Any) -> tuple[str, ...]:
        """Instances of the same patient's other studies within the route's window.

        ``related: {modalities: [CT, MR], window_days: 30}`` in a route's options; the
        window is measured between StudyDates, so a study without one is not related.
        """
        if not isinstance(wanted, dict):
            return ()
        modalities = [str(m) for m in wanted.get("modalities", [])]
        window = float(wanted.get("window_days", 30))
        mine = self.ledger.series_of_study(job.study_uid)
        dates = [_date(s.attrs.get("StudyDate")) for s in mine]
        anchor = next((d for d in dates if d is not None), None)
        if anchor is None or not modalities:
            return ()
        chosen: list[str] = []
        for series in self.ledger.related_series(job.study_uid, modalities):
            when = _date(series.attrs.get("StudyDate"))
            if when is not None and abs((when - anchor).days) <= window:
                chosen.append(series.series_uid)
        return tuple(p for _, p in self.ledger.instance_paths(chosen))

    def run_claimed(self, job: JobRow, worker: _Worker) -> None:
        """Run a claimed job in ``worker``'s child process and record its outcome: for
        the in-process slots and for a Celery task's ``Ledger.claim_job_id``."""
        try:
            self._run(job, worker)
        except Exception:
            log.exception("job %d: unexpected error in the runner", job.id)
            self.ledger.fail_job(job.id, "runner error",
                                 max_attempts=self.settings.jobs.max_attempts)

    def _loop(self, slot: int, worker: _Worker) -> None:
        while not self._stop.is_set():
            job = self.ledger.claim_job()
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self._running[slot] = job.id
            try:
                self.run_claimed(job, worker)
            finally:
                self._running.pop(slot, None)
            if self.on_finished is not None:
                self.on_finished()

    def _run(self, job: JobRow, worker: _Worker) -> None:
        route = next((r for r in self.settings.routes if r.name == job.route), None)
        if route is None:
            self.ledger.fail_job(job.id, f"route {job.route!r} no longer configured",
                                 max_attempts=0)
            return
        spec = self._spec(job)
        conn = worker.ensure()
        timeout = self.settings.jobs.timeout_s
        log.info("job %d (%s, %s) attempt %d: %d instance(s)", job.id, job.route, job.pipeline,
                 job.attempts, len(spec.instance_paths))
        started = time.monotonic()

        def report(state: str, summary: Mapping[str, Any] | None, error: str | None) -> None:
            self.events.job_finished(job, state, time.monotonic() - started, summary, error)
        try:
            conn.send(spec)
            if not conn.poll(timeout):
                worker.kill()
                state = self.ledger.fail_job(job.id, f"timed out after {timeout:g} s",
                                             max_attempts=self.settings.jobs.max_attempts)
                log.error("job %d timed out after %g s; worker killed; now %s", job.id,
                          timeout, state)
                report(state, None, f"timed out after {timeout:g} s")
                return
            kind, payload = conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = None
            if worker.proc is not None:
                worker.proc.join(5)
                code = worker.proc.exitcode
            worker.kill()
            reason = f"worker process died (exit code {code})"
            state = self.ledger.fail_job(job.id, reason,
                                         max_attempts=self.settings.jobs.max_attempts)
            log.error("job %d: %s; now %s", job.id, reason, state)
            report(state, None, reason)
            return
        if kind == "ok":
            outcome: JobOutcome = payload
            self.ledger.finish_job(job.id, dict(outcome.summary), outcome.outputs,
                                   route.send_to)
            log.info("job %d done: %d result object(s) queued for %s", job.id,
                     len(outcome.outputs), ", ".join(route.send_to) or "no destination")
            report("done", outcome.summary, None)
            if self.on_done is not None:
                try:
                    self.on_done(job, outcome.summary, outcome.outputs)
                except Exception:
                    log.exception("job %d: follow-up after completion failed", job.id)
        else:
            attempts = 0 if kind == "fatal" else self.settings.jobs.max_attempts
            state = self.ledger.fail_job(job.id, str(payload), max_attempts=attempts)
            log.error("job %d failed (%s): %s", job.id, state, str(payload).splitlines()[0])
            report(state, None, str(payload))
