"""An APScheduler 3.x job store in the ledger database (stdlib sqlite3, no SQLAlchemy).

History jobs (the nightly priors run, one run per new volume) must survive a restart,
so they live in the ledger file, in their own table, next to the timelines they serve.
It is the same layout and pickling as APScheduler's SQLAlchemyJobStore, written with
sqlite3 so the node needs no SQLAlchemy, and with the ledger's own connection settings
(WAL, a 30 s busy timeout, ``BEGIN IMMEDIATE``): every store operation is one short
transaction, so it waits its turn behind an ingest transaction instead of failing.
"""

from __future__ import annotations

import logging
import pickle
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.util import datetime_to_utc_timestamp, utc_timestamp_to_datetime

__all__ = ["SqliteJobStore"]

log = logging.getLogger(__name__)

_TABLE = """
CREATE TABLE IF NOT EXISTS apscheduler_jobs (
    id TEXT PRIMARY KEY,
    next_run_time REAL,
    job_state BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS apscheduler_next ON apscheduler_jobs(next_run_time);
"""


class SqliteJobStore(BaseJobStore):  # type: ignore[misc]
    """Jobs pickled into ``apscheduler_jobs`` of an SQLite database (the ledger)."""

    def __init__(self, path: Path, *, pickle_protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        super().__init__()
        self.path = path
        self.pickle_protocol = pickle_protocol
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(_TABLE)

    def shutdown(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def lookup_job(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT job_state FROM apscheduler_jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return self._reconstitute(row[0]) if row else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return self._jobs("WHERE next_run_time <= ?", (datetime_to_utc_timestamp(now),))

    def get_next_run_time(self) -> datetime | None:
        row = self._conn().execute(
            "SELECT next_run_time FROM apscheduler_jobs WHERE next_run_time IS NOT NULL "
            "ORDER BY next_run_time LIMIT 1").fetchone()
        return utc_timestamp_to_datetime(row[0]) if row else None  # type: ignore[no-any-return]

    def get_all_jobs(self) -> list[Job]:
        jobs = self._jobs("", ())
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def add_job(self, job: Job) -> None:
        try:
            with self._tx() as c:
                c.execute("INSERT INTO apscheduler_jobs VALUES (?,?,?)",
                          (job.id, datetime_to_utc_timestamp(job.next_run_time),
                           pickle.dumps(job.__getstate__(), self.pickle_protocol)))
        except sqlite3.IntegrityError as exc:
            raise ConflictingIdError(job.id) from exc

    def update_job(self, job: Job) -> None:
        with self._tx() as c:
            cur = c.execute("UPDATE apscheduler_jobs SET next_run_time=?, job_state=? "
                            "WHERE id=?",
                            (datetime_to_utc_timestamp(job.next_run_time),
                             pickle.dumps(job.__getstate__(), self.pickle_protocol), job.id))
            if cur.rowcount == 0:
                raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        with self._tx() as c:
            if c.execute("DELETE FROM apscheduler_jobs WHERE id=?", (job_id,)).rowcount == 0:
                raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM apscheduler_jobs")

    def _reconstitute(self, state: bytes) -> Job:
        job_state = pickle.loads(state)
        job_state["jobstore"] = self
        job = Job.__new__(Job)
        job.__setstate__(job_state)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    def _jobs(self, where: str, args: tuple[Any, ...]) -> list[Job]:
        jobs: list[Job] = []
        failed: list[str] = []
        rows = self._conn().execute(
            f"SELECT id, job_state FROM apscheduler_jobs {where} ORDER BY next_run_time",
            args).fetchall()
        for job_id, state in rows:
            try:
                jobs.append(self._reconstitute(state))
            except Exception:
                log.exception("cannot restore scheduled job %r; removing it", job_id)
                failed.append(job_id)
        if failed:
            with self._tx() as c:
                c.executemany("DELETE FROM apscheduler_jobs WHERE id=?", [(f,) for f in failed])
        return jobs

    def __repr__(self) -> str:
        return f"<SqliteJobStore {self.path.name}>"
