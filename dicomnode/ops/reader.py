"""Read-only questions to the ledger for operations: timelines, queues, timings.

On the embedded SQLite ledger a connection of its own, opened read-only (``mode=ro``);
on a shared ledger (``ledger.url``, PostgreSQL) a small SQLAlchemy pool of its own. The
SQL is the portable subset both run. Nothing here can change the ledger or take its
write lock; one lock serialises the HTTP threads' use of it.

Queries go through the ledger's indexes where it has them (a study's instances through
its series); per-study jobs and outbox rows and the searches by patient or accession key
scan their tables, which indexes on those columns would spare at hospital scale.

Every value from a request reaches SQLite as a bound parameter, never as SQL or a path.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class LedgerReader:
    def __init__(self, path: Path, url: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._engine: Any = None
        if url is not None and url.startswith("sqlite"):  # ledger.url naming a SQLite file
            from sqlalchemy.engine import make_url

            path = self.path = Path(make_url(url).database or path)
            url = None
        if url is None:
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                       timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
        else:
            from sqlalchemy import create_engine

            self._engine = create_engine(url, pool_size=1, max_overflow=1,
                                         pool_pre_ping=True)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
            if self._engine is not None:
                self._engine.dispose()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._db is not None:
                return [tuple(r) for r in self._db.execute(sql, args).fetchall()]
            with self._engine.connect() as conn:
                rows = conn.exec_driver_sql(sql.replace("%", "%%").replace("?", "%s"),
                                            tuple(args)).fetchall()
                conn.rollback()
            return [tuple(r) for r in rows]

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def readable(self) -> bool:
        try:
            self._one("SELECT count(*) FROM meta")
            return True
        except sqlite3.Error:
            return False

    # -- timings for metrics -------------------------------------------------------------

    def closed_times(self, level: str, uid: str) -> tuple[float, float] | None:
        """(last instance received, closed at) of a completed series or study."""
        table, key = ("series", "series_uid") if level == "series" else ("studies", "study_uid")
        row = self._one(f"SELECT last_received, closed_at FROM {table} WHERE {key}=?", (uid,))
        if row is None or row[1] is None:
            return None
        return float(row[0]), float(row[1])

    def job_confirmed_latency(self, job_id: int, destination: str) -> float | None:
        """Seconds from the last instance of a job's series to the destination confirming
        the last of its results; None while any of them is unconfirmed."""
        row = self._one("SELECT count(*), sum(CASE WHEN state = 'sent' THEN 0 ELSE 1 END), "
                        "max(sent_at) FROM outbox WHERE job_id=? AND destination=?",
                        (job_id, destination))
        if row is None or not row[0] or row[1] or row[2] is None:
            return None
        job = self._one("SELECT series_uids FROM jobs WHERE id=?", (job_id,))
        if job is None:
            return None
        uids = json.loads(job[0])
        if not uids:
            return None
        marks = ",".join("?" * len(uids))
        last = self._one(f"SELECT max(last_received) FROM series WHERE series_uid IN ({marks})",
                         uids)
        if last is None or last[0] is None:
            return None
        return max(0.0, float(row[2]) - float(last[0]))

    # -- studies -----------------------------------------------------------------------

    _STUDY = ("SELECT s.study_uid, s.patient_key, s.state, s.first_received, s.last_received, "
              "s.closed_at, s.close_reason, "
              "(SELECT coalesce(sum(r.instance_count), 0) FROM series r "
              " WHERE r.study_uid = s.study_uid), "
              "(SELECT count(*) FROM series r WHERE r.study_uid = s.study_uid) "
              "FROM studies s")

    @staticmethod
    def _study_row(r: Sequence[Any]) -> dict[str, Any]:
        return {"study_uid": r[0], "patient_key": r[1], "state": r[2], "first_received": r[3],
                "last_received": r[4], "closed_at": r[5], "close_reason": r[6],
                "instances": int(r[7]), "series": int(r[8]), "modalities": []}

    def studies(self, *, limit: int = 50, patient_key: str | None = None,
                accession_key: str | None = None, study_uid: str | None = None
                ) -> list[dict[str, Any]]:
        """Newest first. The page of study UIDs is chosen before anything is counted, so
        the per-study figures are computed for that page only."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("patient_key", patient_key), ("accession_key", accession_key),
                              ("study_uid", study_uid)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        sql = "SELECT study_uid FROM studies" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY last_received DESC LIMIT ?"
        args.append(max(1, min(limit, 500)))
        uids = [str(r[0]) for r in self._all(sql, args)]
        if not uids:
            return []
        marks = ",".join("?" * len(uids))
        studies = sorted((self._study_row(r) for r in self._all(
            self._STUDY + f" WHERE s.study_uid IN ({marks})", uids)),
            key=lambda st: -float(st["last_received"]))
        modalities: dict[str, set[str]] = {uid: set() for uid in uids}
        for uid, modality in self._all("SELECT DISTINCT study_uid, modality FROM series "
                                       f"WHERE study_uid IN ({marks})", uids):
            if modality:
                modalities[str(uid)].add(str(modality))
        for study in studies:
            study["modalities"] = sorted(modalities[study["study_uid"]])
        outcomes: dict[str, dict[str, int]] = {uid: {} for uid in uids}
        for table, prefix in (("jobs", "jobs"), ("outbox", "results")):
            for uid, state, n in self._all(f"SELECT study_uid, state, count(*) FROM {table} "
                                           f"WHERE study_uid IN ({marks}) "
                                           "GROUP BY study_uid, state", uids):
                outcomes[str(uid)][f"{prefix}_{state}"] = int(n)
        for study in studies:
            study["outcome"] = outcomes[study["study_uid"]]
        return studies

    def first_instance_path(self, study_uid: str) -> str | None:
        row = self._one("SELECT i.path FROM instances i WHERE i.series_uid IN "
                        "(SELECT series_uid FROM series WHERE study_uid=?) LIMIT 1",
                        (study_uid,))
        return None if row is None else str(row[0])

    def timeline(self, study_uid: str) -> dict[str, Any] | None:
        """Everything the ledger knows of one study, in the order it happened."""
        found = self._all(self._STUDY + " WHERE s.study_uid=?", (study_uid,))
        if not found:
            return None
        study = self._study_row(found[0])
        study["modalities"] = sorted({str(m) for (m,) in self._all(
            "SELECT DISTINCT modality FROM series WHERE study_uid=?", (study_uid,)) if m})
        series = []
        for r in self._all("SELECT series_uid, modality, calling_ae, attrs, instance_count, "
                           "expected_count, expected_by, first_received, last_received, "
                           "state, generation, closed_at, close_reason FROM series "
                           "WHERE study_uid=? ORDER BY first_received", (study_uid,)):
            attrs = json.loads(r[3])
            series.append({
                "series_uid": r[0], "modality": r[1], "calling_ae": r[2],
                "description": attrs.get("SeriesDescription"), "attrs": attrs,
                "instances": r[4], "expected": r[5], "expected_by": r[6],
                "first_received": r[7], "last_received": r[8], "state": r[9],
                "generation": r[10], "closed_at": r[11], "close_reason": r[12]})
        sources = sorted({str(a) for (a,) in self._all(
            "SELECT DISTINCT i.calling_ae FROM instances i WHERE i.series_uid IN "
            "(SELECT series_uid FROM series WHERE study_uid=?)", (study_uid,)) if a})
        subjects = [study_uid] + [s["series_uid"] for s in series]
        marks = ",".join("?" * len(subjects))
        decisions = [{"subject_uid": r[0], "level": r[1], "generation": r[2], "route": r[3],
                      "matched": bool(r[4]), "reasons": json.loads(r[5]), "decided_at": r[6]}
                     for r in self._all(
                         "SELECT subject_uid, level, generation, route, matched, reasons, "
                         f"decided_at FROM route_decisions WHERE subject_uid IN ({marks}) "
                         "ORDER BY id", subjects)]
        jobs = []
        for r in self._all("SELECT id, route, pipeline, level, subject_uid, series_uids, "
                           "generation, state, attempts, created_at, started_at, finished_at, "
                           "error, summary FROM jobs WHERE study_uid=? ORDER BY id",
                           (study_uid,)):
            summary = json.loads(r[13]) if r[13] else {}
            duration = (r[11] - r[10]) if r[10] is not None and r[11] is not None else None
            jobs.append({"id": r[0], "route": r[1], "pipeline": r[2], "level": r[3],
                         "subject_uid": r[4], "series_uids": json.loads(r[5]),
                         "generation": r[6], "state": r[7], "attempts": r[8],
                         "created_at": r[9], "started_at": r[10], "finished_at": r[11],
                         "duration_s": duration, "error": r[12], "summary": summary})
        sends = [{"id": r[0], "job_id": r[1], "destination": r[2], "sop_instance_uid": r[3],
                  "sop_class_uid": r[4], "state": r[5], "attempts": r[6],
                  "last_status": r[7], "last_error": r[8], "created_at": r[9],
                  "sent_at": r[10]}
                 for r in self._all("SELECT id, job_id, destination, sop_instance_uid, "
                                    "sop_class_uid, state, attempts, last_status, last_error, "
                                    "created_at, sent_at FROM outbox WHERE study_uid=? "
                                    "ORDER BY id", (study_uid,))]
        return {"study": study, "sources": sources, "series": series,
                "route_decisions": decisions, "jobs": jobs, "sends": sends}

    def study_patient_key(self, study_uid: str) -> str | None:
        row = self._one("SELECT patient_key FROM studies WHERE study_uid=?", (study_uid,))
        return None if row is None else str(row[0])

    def queue_counts(self) -> dict[str, dict[str, int]]:
        return {table: {str(s): int(n) for s, n in self._all(
            f"SELECT state, count(*) FROM {table} GROUP BY state")}
            for table in ("jobs", "outbox")}

    # -- series and queues --------------------------------------------------------------

    def recent_series(self, limit: int = 100) -> list[dict[str, Any]]:
        return [{"series_uid": r[0], "study_uid": r[1], "modality": r[2], "calling_ae": r[3],
                 "description": json.loads(r[4]).get("SeriesDescription"), "instances": r[5],
                 "state": r[6], "last_received": r[7]}
                for r in self._all("SELECT series_uid, study_uid, modality, calling_ae, attrs, "
                                   "instance_count, state, last_received FROM series "
                                   "ORDER BY last_received DESC LIMIT ?",
                                   (max(1, min(limit, 1000)),))]

    def series_attrs(self, series_uid: str) -> tuple[dict[str, Any], str] | None:
        row = self._one("SELECT attrs, calling_ae FROM series WHERE series_uid=?",
                        (series_uid,))
        return None if row is None else (json.loads(row[0]), str(row[1] or ""))

    def queues(self, limit: int = 200) -> dict[str, list[dict[str, Any]]]:
        def jobs(state: str) -> list[dict[str, Any]]:
            return [{"id": r[0], "route": r[1], "pipeline": r[2], "study_uid": r[3],
                     "attempts": r[4], "created_at": r[5], "started_at": r[6],
                     "finished_at": r[7], "error": r[8]}
                    for r in self._all("SELECT id, route, pipeline, study_uid, attempts, "
                                       "created_at, started_at, finished_at, error FROM jobs "
                                       "WHERE state=? ORDER BY id DESC LIMIT ?",
                                       (state, limit))]

        def outbox(states: Sequence[str]) -> list[dict[str, Any]]:
            marks = ",".join("?" * len(states))
            return [{"id": r[0], "job_id": r[1], "destination": r[2], "study_uid": r[3],
                     "sop_class_uid": r[4], "state": r[5], "attempts": r[6],
                     "next_attempt_at": r[7], "last_status": r[8], "last_error": r[9]}
                    for r in self._all("SELECT id, job_id, destination, study_uid, "
                                       "sop_class_uid, state, attempts, next_attempt_at, "
                                       f"last_status, last_error FROM outbox WHERE state IN "
                                       f"({marks}) ORDER BY id DESC LIMIT ?",
                                       (*states, limit))]

        return {"pending_jobs": jobs("pending"), "running_jobs": jobs("running"),
                "failed_jobs": jobs("failed"), "outbox": outbox(("pending", "sending")),
                "dead_letters": outbox(("dead",))}
