"""The ledger: every durable fact the node knows, in one database: SQLite (WAL) embedded
by default, PostgreSQL when several machines share the work (``ledger: {url: ...}``).

State machine::

    instance received ─▶ series open ──quiet/evidence──▶ series complete ─▶ routed (jobs)
                                 ▲                               │
                                 └──────── late instance ────────┘ (generation + 1)
    job pending ─▶ running ─▶ done (outbox rows) | pending again | failed
    job pending ─▶ queued (handed to Celery) ─▶ running ─▶ ...  (jobs.engine: celery)
    job pending | queued ─▶ superseded (its series re-opened before it ran)
    outbox pending ─▶ sending ─▶ sent | pending (backoff) | dead

Every transition is one transaction, so a process killed at any instant restarts into
a consistent state: running jobs go back to pending, sending outbox rows back to
pending (their deterministic UIDs make a repeat send replace rather than duplicate).
Patient identifiers are never stored in clear: ``patient_key`` is a salted hash.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable

SCHEMA_VERSION = 3

# The schema, as SQLAlchemy Core tables: one definition that compiles to SQLite's and
# PostgreSQL's DDL (an INTEGER PRIMARY KEY becomes SERIAL there, Float DOUBLE PRECISION).
# Version 2 added timeline_points and retrieve_events, version 3 history_requests and
# claims; an older ledger gains the tables it lacks on open (CREATE ... IF NOT EXISTS),
# its existing rows untouched.
_META = MetaData()
_TEXT, _INT, _REAL = Text(), Integer(), Float()

Table("meta", _META, Column("key", _TEXT, primary_key=True),
      Column("value", _TEXT, nullable=False))
Table("studies", _META,
      Column("study_uid", _TEXT, primary_key=True),
      Column("patient_key", _TEXT, nullable=False),
      Column("accession_key", _TEXT),
      Column("first_received", _REAL, nullable=False),
      Column("last_received", _REAL, nullable=False),
      Column("state", _TEXT, nullable=False, server_default="open"),
      Column("generation", _INT, nullable=False, server_default="0"),
      Column("closed_at", _REAL),
      Column("close_reason", _TEXT))
Table("series", _META,
      Column("series_uid", _TEXT, primary_key=True),
      Column("study_uid", _TEXT, ForeignKey("studies.study_uid"), nullable=False),
      Column("patient_key", _TEXT, nullable=False),
      Column("modality", _TEXT),
      Column("calling_ae", _TEXT),
      Column("attrs", _TEXT, nullable=False),
      Column("instance_count", _INT, nullable=False, server_default="0"),
      Column("expected_count", _INT),
      Column("expected_by", _TEXT),
      Column("first_received", _REAL, nullable=False),
      Column("last_received", _REAL, nullable=False),
      Column("state", _TEXT, nullable=False, server_default="open"),
      Column("generation", _INT, nullable=False, server_default="0"),
      Column("closed_at", _REAL),
      Column("close_reason", _TEXT),
      Index("series_study", "study_uid"),
      Index("series_state", "state", "last_received"))
Table("instances", _META,
      Column("sop_instance_uid", _TEXT, primary_key=True),
      Column("sop_class_uid", _TEXT, nullable=False),
      Column("series_uid", _TEXT, ForeignKey("series.series_uid"), nullable=False),
      Column("study_uid", _TEXT, nullable=False),
      Column("path", _TEXT, nullable=False),
      Column("sha256", _TEXT, nullable=False),
      Column("size", _INT, nullable=False),
      Column("transfer_syntax", _TEXT, nullable=False),
      Column("calling_ae", _TEXT),
      Column("received_at", _REAL, nullable=False),
      Column("version", _INT, nullable=False, server_default="1"),
      Index("instances_series", "series_uid"))
Table("instance_versions", _META,
      Column("id", _INT, primary_key=True),
      Column("sop_instance_uid", _TEXT, nullable=False),
      Column("path", _TEXT, nullable=False),
      Column("sha256", _TEXT, nullable=False),
      Column("superseded_at", _REAL, nullable=False))
Table("route_decisions", _META,
      Column("id", _INT, primary_key=True),
      Column("subject_uid", _TEXT, nullable=False),
      Column("level", _TEXT, nullable=False),
      Column("generation", _INT, nullable=False),
      Column("route", _TEXT),
      Column("matched", _INT, nullable=False),
      Column("reasons", _TEXT, nullable=False),
      Column("decided_at", _REAL, nullable=False),
      Index("route_subject", "subject_uid"))
Table("jobs", _META,
      Column("id", _INT, primary_key=True),
      Column("route", _TEXT, nullable=False),
      Column("pipeline", _TEXT, nullable=False),
      Column("level", _TEXT, nullable=False),
      Column("subject_uid", _TEXT, nullable=False),
      Column("study_uid", _TEXT, nullable=False),
      Column("series_uids", _TEXT, nullable=False),
      Column("generation", _INT, nullable=False),
      Column("state", _TEXT, nullable=False, server_default="pending"),
      Column("attempts", _INT, nullable=False, server_default="0"),
      Column("created_at", _REAL, nullable=False),
      Column("started_at", _REAL),
      Column("finished_at", _REAL),
      Column("error", _TEXT),
      Column("summary", _TEXT),
      UniqueConstraint("route", "subject_uid", "generation"),
      Index("jobs_state", "state", "id"))
Table("outbox", _META,
      Column("id", _INT, primary_key=True),
      Column("job_id", _INT, ForeignKey("jobs.id")),
      Column("destination", _TEXT, nullable=False),
      Column("sop_instance_uid", _TEXT, nullable=False),
      Column("sop_class_uid", _TEXT, nullable=False),
      Column("study_uid", _TEXT, nullable=False),
      Column("path", _TEXT, nullable=False),
      Column("state", _TEXT, nullable=False, server_default="pending"),
      Column("attempts", _INT, nullable=False, server_default="0"),
      Column("next_attempt_at", _REAL, nullable=False),
      Column("last_status", _INT),
      Column("last_error", _TEXT),
      Column("created_at", _REAL, nullable=False),
      Column("sent_at", _REAL),
      UniqueConstraint("destination", "sop_instance_uid"),
      Index("outbox_due", "state", "next_attempt_at"))
Table("timeline_points", _META,
      Column("id", _INT, primary_key=True),
      Column("patient_key", _TEXT, nullable=False),
      Column("tracking_uid", _TEXT, nullable=False),
      Column("study_uid", _TEXT, nullable=False),
      Column("study_date", _TEXT, nullable=False),
      Column("volume_cm3", _REAL, nullable=False),
      Column("source_sop_uid", _TEXT, nullable=False),
      Column("source_kind", _TEXT, nullable=False),
      Column("source_path", _TEXT),
      Column("recorded_at", _REAL, nullable=False),
      UniqueConstraint("patient_key", "tracking_uid", "study_uid"),
      CheckConstraint("source_kind IN ('node', 'prior-sr')"),
      Index("timeline_patient", "patient_key", "study_date"))
Table("retrieve_events", _META,
      Column("id", _INT, primary_key=True),
      Column("patient_key", _TEXT, nullable=False),
      Column("source", _TEXT, nullable=False),
      Column("study_uid", _TEXT),
      Column("series_uid", _TEXT),
      Column("outcome", _TEXT, nullable=False),
      Column("expected", _INT),
      Column("completed", _INT),
      Column("failed", _INT),
      Column("arrived", _INT),
      Column("detail", _TEXT),
      Column("at", _REAL, nullable=False),
      Index("retrieve_patient", "patient_key", "id"))

# A finished job's new volume, for a receiver to schedule the patient's history: filed
# by whichever process finished the job (``serve`` or a worker), taken by one receiver.
Table("history_requests", _META,
      Column("id", _INT, primary_key=True),
      Column("job_id", _INT, nullable=False),
      Column("patient_key", _TEXT, nullable=False),
      Column("study_uid", _TEXT, nullable=False),
      Column("requested_at", _REAL, nullable=False),
      Column("claimed_at", _REAL),
      Column("claimed_by", _TEXT),
      UniqueConstraint("job_id", "patient_key", "study_uid"),
      Index("history_requests_open", "claimed_at", "id"))
# Work that one process of all that share the ledger may do (``claim_once``): the key
# names it, e.g. the nightly history run of a date.
Table("claims", _META,
      Column("key", _TEXT, primary_key=True),
      Column("holder", _TEXT, nullable=False),
      Column("claimed_at", _REAL, nullable=False))

# Statements that change existing tables, by the schema version that needs them, in the
# portable SQL of ``Ledger._sql``; new tables and indexes come from ``_META``.
_MIGRATIONS: dict[int, tuple[str, ...]] = {2: (), 3: ()}

# Every write transaction on PostgreSQL first takes this transaction-scoped advisory lock:
# writers from every process and machine are serialised as SQLite's BEGIN IMMEDIATE
# serialises them, so each transition reads and writes one consistent state.
_PG_WRITE_LOCK = 0x44434D4E  # "DCMN"
_PG_BEGIN = f"BEGIN; SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})"
_PG_BEGIN_NORMAL = f"{_PG_BEGIN}; SET LOCAL synchronous_commit TO off"


def _ddl(dialect: Dialect) -> list[str]:
    out: list[str] = []
    for table in _META.sorted_tables:
        out.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
        out.extend(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect))
                   for index in sorted(table.indexes, key=lambda i: str(i.name)))
    return out


def _operational_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [sqlite3.OperationalError]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        errors.append(psycopg.OperationalError)
    return tuple(errors)


# What a ledger write raises when the database cannot take it (disk full, database gone,
# locked past the timeout): the receiver refuses the instance instead of answering success.
LEDGER_UNAVAILABLE: tuple[type[Exception], ...] = _operational_errors()


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    patient_key: str
    accession_key: str | None
    modality: str | None
    path: str
    sha256: str
    size: int
    transfer_syntax: str
    calling_ae: str
    attrs: dict[str, Any]
    expected_count: int | None = None
    expected_by: str | None = None


@dataclass(frozen=True)
class IngestOutcome:
    """``new``, ``duplicate`` (same bytes again) or ``replaced`` (same UID, new bytes)."""

    kind: str
    reopened: bool
    previous_path: str | None = None


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str | None
    calling_ae: str | None
    attrs: dict[str, Any]
    instance_count: int
    expected_count: int | None
    expected_by: str | None
    last_received: float
    state: str
    generation: int


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    last_received: float
    state: str
    generation: int


@dataclass(frozen=True)
class JobRow:
    id: int
    route: str
    pipeline: str
    level: str
    subject_uid: str
    study_uid: str
    series_uids: tuple[str, ...]
    generation: int
    state: str
    attempts: int
    error: str | None


@dataclass(frozen=True)
class OutboxRow:
    id: int
    job_id: int | None
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    path: str
    state: str
    attempts: int


@dataclass(frozen=True)
class RouteDecision:
    route: str | None
    matched: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class TimelineRow:
    """One measured volume of one tracked lesion, as cached in the ledger.

    ``source_kind`` is ``node`` (measured by this node) or ``prior-sr`` (read from one of
    the node's earlier reports retrieved from the PACS).
    """

    patient_key: str
    tracking_uid: str
    study_uid: str
    study_date: str
    volume_cm3: float
    source_sop_uid: str
    source_kind: str
    source_path: str | None = None


@dataclass(frozen=True)
class RetrieveEvent:
    """What one C-FIND/C-MOVE step for a patient's priors gave: ``ok``, ``incomplete``
    (fewer instances than C-FIND announced), ``error`` or ``skipped``."""

    patient_key: str
    source: str
    study_uid: str | None
    series_uid: str | None
    outcome: str
    expected: int | None = None
    completed: int | None = None
    failed: int | None = None
    arrived: int | None = None
    detail: str | None = None


class _Cursor(Protocol):
    """What the ledger uses of a DB-API cursor (sqlite3's and psycopg's alike)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class _Tx:
    """The statements of one write transaction (see ``Ledger._write``)."""

    __slots__ = ("_conn", "_sql")

    def __init__(self, conn: Any, sql: Callable[[str], str]) -> None:
        self._conn = conn
        self._sql = sql

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Cursor:
        cursor: _Cursor = self._conn.execute(self._sql(sql), args)
        return cursor


@dataclass(frozen=True)
class NewJob:
    route: str
    pipeline: str
    level: str
    subject_uid: str
    study_uid: str
    series_uids: tuple[str, ...]


class Ledger:
    """Thread-safe access to the ledger database; one connection per thread.

    SQLAlchemy Core gives the engine (URL, driver, pool) and the schema, compiled to each
    database's DDL. Statements are written once in the SQL both databases speak (``?``
    parameters, ``ON CONFLICT``, ``CASE``), translated once per dialect, and run on the
    pooled driver connection: ingest commits one short transaction per instance, and
    SQLAlchemy's per-statement execution overhead would cost more than the commit.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 readonly: bool = False, url: str | None = None) -> None:
        """Open (and create) the ledger; ``readonly`` for reporting while a node runs,
        which must work even when the disk is full. ``url`` (a SQLAlchemy URL such as
        ``postgresql+psycopg://node@db/dicomnode``) selects a server database instead
        of the SQLite file at ``path``."""
        self.path = path
        self.clock = clock
        self.readonly = readonly
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._sql_cache: dict[str, str] = {}
        self.url = url
        self._engine = self._make_engine(path, url, readonly)
        self.dialect = self._engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"ledger: unsupported database {self.dialect!r} "
                             "(sqlite or postgresql)")
        if readonly:
            self._salt = self._read_salt()
            return
        if url is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as c:
            for statement in _ddl(self._engine.dialect):
                c.execute(statement)
            row = c.execute("SELECT value FROM meta WHERE key='salt'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
                c.execute("INSERT INTO meta VALUES ('schema', '1')")
        self._migrate()
        self._salt = self._read_salt()

    @staticmethod
    def _make_engine(path: Path, url: str | None, readonly: bool) -> Engine:
        if url is None or make_url(url).get_backend_name() == "sqlite":
            if url is not None:
                path = Path(make_url(url).database or path)
            target = f"{path.resolve().as_uri()}?mode=ro" if readonly else str(path)

            def connect() -> sqlite3.Connection:
                return sqlite3.connect(target, uri=readonly, timeout=30.0,
                                       isolation_level=None, check_same_thread=False)

            # one connection per thread, opened by that thread and closed by ``close``
            return create_engine("sqlite://", creator=connect, poolclass=NullPool)
        engine = create_engine(url, pool_size=4, max_overflow=60, pool_timeout=30,
                               pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def autocommit(dbapi_conn: Any, _record: Any) -> None:
            # transactions are begun and ended explicitly by ``_write``, as on SQLite
            dbapi_conn.autocommit = True
            if readonly:
                dbapi_conn.execute("SET default_transaction_read_only = on")

        return engine

    def _read_salt(self) -> str:
        return str(self._execute("SELECT value FROM meta WHERE key='salt'").fetchone()[0])

    def _migrate(self) -> None:
        with self._write() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            version = int(row[0]) if row is not None else 1
            for target in sorted(v for v in _MIGRATIONS if v > version):
                for statement in _MIGRATIONS[target]:
                    c.execute(statement)
                version = target
            c.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT (key) "
                      "DO UPDATE SET value=excluded.value", (str(version),))

    @property
    def schema_version(self) -> int:
        row = self._execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        return int(row[0]) if row is not None else 1

    def _sql(self, sql: str) -> str:
        """``sql`` in this database's parameter style (``?`` for SQLite, ``%s`` for
        psycopg), translated once."""
        out = self._sql_cache.get(sql)
        if out is None:
            out = sql if self.dialect == "sqlite" else sql.replace("%", "%%").replace("?", "%s")
            self._sql_cache[sql] = out
        return out

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> _Cursor:
        """One statement outside a write transaction (autocommit: reads see every
        committed write)."""
        try:
            cursor: _Cursor = self._conn().execute(self._sql(sql), args)
        except LEDGER_UNAVAILABLE:
            if self.dialect != "sqlite":  # a lost server connection: reconnect next time
                self.close()
            raise
        return cursor

    def _conn(self) -> Any:
        """This thread's driver connection (sqlite3 or psycopg), opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            proxy = self._engine.raw_connection()
            conn = proxy.driver_connection
            assert conn is not None
            if self.dialect == "sqlite" and not self.readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._local.sync = "FULL"
            self._local.proxy = proxy
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (the next use opens a new one)."""
        proxy = getattr(self._local, "proxy", None)
        self._local.conn = None
        self._local.proxy = None
        if proxy is not None:
            proxy.close()

    def dispose(self) -> None:
        """Close this thread's connection and the engine's pool (at shutdown)."""
        self.close()
        self._engine.dispose()

    @contextmanager
    def _write(self, sync: str = "FULL") -> Iterator[_Tx]:
        """One write transaction. ``sync="FULL"`` (every state transition) fsyncs the WAL
        at commit, which also makes every earlier commit durable; ``"NORMAL"`` (only
        ``record_instance``) commits to the WAL without an fsync: see ``record_instance``.
        On PostgreSQL ``NORMAL`` is ``synchronous_commit = off`` for that transaction,
        and every write transaction first takes the ledger's advisory lock."""
        conn = self._conn()
        sqlite = self.dialect == "sqlite"
        if sqlite and getattr(self._local, "sync", "FULL") != sync:
            conn.execute(f"PRAGMA synchronous={'NORMAL' if sync == 'NORMAL' else 'FULL'}")
            self._local.sync = sync
        with self._write_lock:
            try:
                if sqlite:
                    conn.execute("BEGIN IMMEDIATE")
                else:
                    # one round trip (no parameters: the simple query protocol)
                    conn.execute(_PG_BEGIN_NORMAL if sync == "NORMAL" else _PG_BEGIN)
                yield _Tx(conn, self._sql)
            except BaseException:
                self._rollback(conn)
                raise
            conn.execute("COMMIT")

    def _rollback(self, conn: Any) -> None:
        try:
            conn.execute("ROLLBACK")
        except LEDGER_UNAVAILABLE:
            # the connection itself failed: drop it so the next use reconnects
            self.close()

    # -- identifiers -------------------------------------------------------------------

    def hash_identifier(self, value: str) -> str:
        """Salted hash used wherever an identifier must be correlated but not revealed."""
        digest = hashlib.sha256(f"{self._salt}|{value}".encode()).hexdigest()
        return digest[:16]

    # -- ingest ------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every commit so far durable (one fsync of the WAL)."""
        with self._write() as c:
            c.execute("INSERT INTO meta VALUES ('synced_at', ?) ON CONFLICT (key) "
                      "DO UPDATE SET value=excluded.value", (str(self.clock()),))

    def known_sha256(self, since: float) -> set[str]:
        """Content hashes the ledger knows: current instances received at or after
        ``since`` and every superseded version (start-up reconciliation compares the
        spool's recent files with these)."""
        rows = self._execute(
            "SELECT sha256 FROM instances WHERE received_at >= ? "
            "UNION SELECT sha256 FROM instance_versions", (since,)).fetchall()
        return {str(r[0]) for r in rows}

    def record_instance(self, rec: InstanceRecord, *, durable: bool = False) -> IngestOutcome:
        """Record an instance whose bytes are already durable in the spool; re-open its
        series and study if they had closed.

        The commit reaches the WAL before this returns (a killed process keeps it), but
        is not fsynced unless ``durable``: the fsynced spool file is the durable record of
        a received instance, and after an unclean stop the node re-indexes spool files the
        ledger lost (``ingest.reconcile``). The next FULL commit (any job, completion or
        outbox transition) makes these commits durable too, in order.
        """
        now = self.clock()
        with self._write("FULL" if durable else "NORMAL") as c:
            prev = c.execute("SELECT sha256, path FROM instances WHERE sop_instance_uid=?",
                             (rec.sop_instance_uid,)).fetchone()
            if prev is not None and prev[0] == rec.sha256:
                return IngestOutcome("duplicate", reopened=False)
            study = c.execute("SELECT state FROM studies WHERE study_uid=?",
                              (rec.study_uid,)).fetchone()
            reopened = False
            if study is None:
                c.execute("INSERT INTO studies (study_uid, patient_key, accession_key, "
                          "first_received, last_received) VALUES (?,?,?,?,?)",
                          (rec.study_uid, rec.patient_key, rec.accession_key, now, now))
            else:
                if study[0] != "open":
                    reopened = True
                c.execute("UPDATE studies SET last_received=?, state='open', "
                          "generation=generation + CASE WHEN state='open' THEN 0 ELSE 1 END, "
                          "closed_at=NULL, "
                          "close_reason=NULL WHERE study_uid=?", (now, rec.study_uid))
            series = c.execute("SELECT state, study_uid FROM series WHERE series_uid=?",
                               (rec.series_uid,)).fetchone()
            if series is None:
                c.execute("INSERT INTO series (series_uid, study_uid, patient_key, modality, "
                          "calling_ae, attrs, expected_count, expected_by, first_received, "
                          "last_received) VALUES (?,?,?,?,?,?,?,?,?,?)",
                          (rec.series_uid, rec.study_uid, rec.patient_key, rec.modality,
                           rec.calling_ae, json.dumps(rec.attrs), rec.expected_count,
                           rec.expected_by, now, now))
            else:
                if series[0] != "open":
                    reopened = True
                c.execute("UPDATE series SET last_received=?, state='open', "
                          "generation=generation + CASE WHEN state='open' THEN 0 ELSE 1 END, "
                          "closed_at=NULL, "
                          "close_reason=NULL, "
                          "expected_count=COALESCE(expected_count, ?), "
                          "expected_by=COALESCE(expected_by, ?) WHERE series_uid=?",
                          (now, rec.expected_count, rec.expected_by, rec.series_uid))
            if reopened:
                # a newer generation will be analysed: queued work on the older is moot
                c.execute("UPDATE jobs SET state='superseded', finished_at=? "
                          "WHERE state IN ('pending', 'queued') AND subject_uid IN (?, ?)",
                          (now, rec.series_uid, rec.study_uid))
            if prev is None:
                c.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, "
                          "study_uid, path, sha256, size, transfer_syntax, calling_ae, "
                          "received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                          (rec.sop_instance_uid, rec.sop_class_uid, rec.series_uid,
                           rec.study_uid, rec.path, rec.sha256, rec.size, rec.transfer_syntax,
                           rec.calling_ae, now))
                c.execute("UPDATE series SET instance_count=instance_count+1 WHERE series_uid=?",
                          (rec.series_uid,))
                return IngestOutcome("new", reopened)
            c.execute("INSERT INTO instance_versions (sop_instance_uid, path, sha256, "
                      "superseded_at) VALUES (?,?,?,?)",
                      (rec.sop_instance_uid, prev[1], prev[0], now))
            c.execute("UPDATE instances SET path=?, sha256=?, size=?, transfer_syntax=?, "
                      "calling_ae=?, received_at=?, version=version+1 "
                      "WHERE sop_instance_uid=?",
                      (rec.path, rec.sha256, rec.size, rec.transfer_syntax, rec.calling_ae, now,
                       rec.sop_instance_uid))
            return IngestOutcome("replaced", reopened=True, previous_path=str(prev[1]))

    def has_instance(self, sop_instance_uid: str) -> bool:
        row = self._execute("SELECT 1 FROM instances WHERE sop_instance_uid=?",
                                   (sop_instance_uid,)).fetchone()
        return row is not None

    def instance_paths(self, series_uids: Sequence[str]) -> list[tuple[str, str]]:
        """(sop_instance_uid, path) of every current instance of these series."""
        out: list[tuple[str, str]] = []
        for uid in series_uids:
            out.extend((str(a), str(b)) for a, b in self._execute(
                "SELECT sop_instance_uid, path FROM instances WHERE series_uid=? "
                "ORDER BY received_at, sop_instance_uid", (uid,)))
        return out

    # -- completion --------------------------------------------------------------------

    def _series_row(self, row: Sequence[Any]) -> SeriesRow:
        return SeriesRow(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6],
                         row[7], row[8], row[9], row[10])

    _SERIES_COLS = ("series_uid, study_uid, modality, calling_ae, attrs, instance_count, "
                    "expected_count, expected_by, last_received, state, generation")

    def open_series(self) -> list[SeriesRow]:
        rows = self._execute(
            f"SELECT {self._SERIES_COLS} FROM series WHERE state='open'").fetchall()
        return [self._series_row(r) for r in rows]

    def series_of_study(self, study_uid: str) -> list[SeriesRow]:
        rows = self._execute(
            f"SELECT {self._SERIES_COLS} FROM series WHERE study_uid=? ORDER BY first_received",
            (study_uid,)).fetchall()
        return [self._series_row(r) for r in rows]

    def get_series(self, series_uid: str) -> SeriesRow | None:
        row = self._execute(
            f"SELECT {self._SERIES_COLS} FROM series WHERE series_uid=?",
            (series_uid,)).fetchone()
        return None if row is None else self._series_row(row)

    def related_series(self, study_uid: str, modalities: Sequence[str]) -> list[SeriesRow]:
        """Complete series of the same patient in *other* studies, of these modalities."""
        marks = ",".join("?" * len(modalities))
        rows = self._execute(
            f"SELECT {self._SERIES_COLS} FROM series WHERE patient_key = "
            "(SELECT patient_key FROM studies WHERE study_uid=?) AND study_uid != ? "
            f"AND state='complete' AND modality IN ({marks}) ORDER BY first_received",
            (study_uid, study_uid, *modalities)).fetchall()
        return [self._series_row(r) for r in rows]

    def open_studies(self) -> list[StudyRow]:
        rows = self._execute(
            "SELECT study_uid, last_received, state, generation FROM studies "
            "WHERE state='open'").fetchall()
        return [StudyRow(*r) for r in rows]

    def close_series(self, series: SeriesRow, reason: str,
                     decisions: Sequence[RouteDecision], jobs: Sequence[NewJob]) -> bool:
        """Close a series, record its routing and create its jobs, atomically.

        Returns False (and changes nothing) when an instance arrived since ``series`` was
        read: the series is then still open and will be reconsidered.
        """
        now = self.clock()
        with self._write() as c:
            cur = c.execute("UPDATE series SET state='complete', closed_at=?, close_reason=? "
                            "WHERE series_uid=? AND state='open' AND generation=? "
                            "AND instance_count=?",
                            (now, reason, series.series_uid, series.generation,
                             series.instance_count))
            if cur.rowcount != 1:
                return False
            self._record_routing(c, series.series_uid, "series", series.generation, decisions,
                                 jobs, now)
            return True

    def close_study(self, study: StudyRow, reason: str, decisions: Sequence[RouteDecision],
                    jobs: Sequence[NewJob]) -> bool:
        now = self.clock()
        with self._write() as c:
            cur = c.execute("UPDATE studies SET state='complete', closed_at=?, close_reason=? "
                            "WHERE study_uid=? AND state='open' AND generation=? "
                            "AND last_received=?",
                            (now, reason, study.study_uid, study.generation,
                             study.last_received))
            if cur.rowcount != 1:
                return False
            self._record_routing(c, study.study_uid, "study", study.generation, decisions, jobs,
                                 now)
            return True

    def _record_routing(self, c: _Tx, subject: str, level: str, generation: int,
                        decisions: Sequence[RouteDecision], jobs: Sequence[NewJob],
                        now: float) -> None:
        for d in decisions:
            c.execute("INSERT INTO route_decisions (subject_uid, level, generation, route, "
                      "matched, reasons, decided_at) VALUES (?,?,?,?,?,?,?)",
                      (subject, level, generation, d.route, int(d.matched),
                       json.dumps(list(d.reasons)), now))
        for j in jobs:
            c.execute("INSERT INTO jobs (route, pipeline, level, subject_uid, "
                      "study_uid, series_uids, generation, created_at) VALUES (?,?,?,?,?,?,?,?) "
                      "ON CONFLICT DO NOTHING",
                      (j.route, j.pipeline, j.level, j.subject_uid, j.study_uid,
                       json.dumps(list(j.series_uids)), generation, now))

    def route_decisions(self, subject_uid: str) -> list[dict[str, Any]]:
        rows = self._execute(
            "SELECT level, generation, route, matched, reasons, decided_at FROM route_decisions "
            "WHERE subject_uid=? ORDER BY id", (subject_uid,)).fetchall()
        return [{"level": r[0], "generation": r[1], "route": r[2], "matched": bool(r[3]),
                 "reasons": json.loads(r[4]), "decided_at": r[5]} for r in rows]

    # -- jobs --------------------------------------------------------------------------

    def _job(self, r: Sequence[Any]) -> JobRow:
        return JobRow(r[0], r[1], r[2], r[3], r[4], r[5], tuple(json.loads(r[6])), r[7], r[8],
                      r[9], r[10])

    _JOB_COLS = ("id, route, pipeline, level, subject_uid, study_uid, series_uids, generation, "
                 "state, attempts, error")

    def recover(self, *, jobs: bool = True) -> tuple[int, int]:
        """After a restart: re-queue jobs that were running and sends that were in flight.

        Open series and studies restart their quiet period: while the node was down no
        instance could arrive, so downtime is not evidence that a sender has finished.
        ``jobs=False`` where jobs run on Celery workers, not in this process: their
        leases (``expire_jobs``) tell a lost job from one still running elsewhere.
        """
        requeue = jobs
        now = self.clock()
        with self._write() as c:
            c.execute("UPDATE series SET last_received=? WHERE state='open' "
                      "AND last_received < ?", (now, now))
            c.execute("UPDATE studies SET last_received=? WHERE state='open' "
                      "AND last_received < ?", (now, now))
            requeued = c.execute("UPDATE jobs SET state='pending' WHERE state='running'"
                                 ).rowcount if requeue else 0
            sends = c.execute("UPDATE outbox SET state='pending' WHERE state='sending'").rowcount
        return requeued, sends

    def claim_job(self) -> JobRow | None:
        now = self.clock()
        with self._write() as c:
            row = c.execute(f"SELECT {self._JOB_COLS} FROM jobs WHERE state='pending' "
                            "ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state='running', attempts=attempts+1, started_at=? "
                      "WHERE id=?", (now, row[0]))
        job = self._job(row)
        return JobRow(job.id, job.route, job.pipeline, job.level, job.subject_uid, job.study_uid,
                      job.series_uids, job.generation, "running", job.attempts + 1, job.error)

    def claim_job_id(self, job_id: int) -> JobRow | None:
        """Claim one job named by a Celery message: None unless it is pending or queued
        (a repeated message, a job already running elsewhere, done or superseded)."""
        now = self.clock()
        with self._write() as c:
            claimed = c.execute("UPDATE jobs SET state='running', attempts=attempts+1, "
                                "started_at=? WHERE id=? AND state IN ('pending', 'queued')",
                                (now, job_id)).rowcount
            if claimed != 1:
                return None
            row = c.execute(f"SELECT {self._JOB_COLS} FROM jobs WHERE id=?",
                            (job_id,)).fetchone()
        return self._job(row)

    def dispatch_jobs(self, limit: int = 100) -> list[int]:
        """Pending jobs become ``queued`` (``started_at`` is then the dispatch time); the
        caller publishes their ids after this commits. A lost publish is re-dispatched
        once its lease expires (``expire_jobs``); a repeated one is refused at claim."""
        now = self.clock()
        with self._write() as c:
            ids = [int(r[0]) for r in c.execute(
                "SELECT id FROM jobs WHERE state='pending' ORDER BY id LIMIT ?", (limit,))]
            for job_id in ids:
                c.execute("UPDATE jobs SET state='queued', started_at=? WHERE id=?",
                          (now, job_id))
        return ids

    def expire_jobs(self, lease_s: float, *, max_attempts: int) -> tuple[int, int]:
        """Jobs whose lease ran out go back to pending: ``running`` ones whose worker was
        lost (the attempt counts; failed once attempts are used up) and ``queued`` ones
        no worker claimed. Returns (running re-queued or failed, queued re-queued)."""
        now = self.clock()
        cutoff = now - lease_s
        with self._write() as c:
            lost = c.execute("UPDATE jobs SET state=CASE WHEN attempts < ? THEN 'pending' "
                             "ELSE 'failed' END, error=?, finished_at=? "
                             "WHERE state='running' AND started_at < ?",
                             (max_attempts, f"worker lost: no result within {lease_s:g} s",
                              now, cutoff)).rowcount
            unclaimed = c.execute("UPDATE jobs SET state='pending' WHERE state='queued' "
                                  "AND started_at < ?", (cutoff,)).rowcount
        return lost, unclaimed

    def get_job(self, job_id: int) -> JobRow | None:
        row = self._execute(f"SELECT {self._JOB_COLS} FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def jobs(self, state: str | None = None) -> list[JobRow]:
        sql = f"SELECT {self._JOB_COLS} FROM jobs"
        args: tuple[Any, ...] = ()
        if state:
            sql += " WHERE state=?"
            args = (state,)
        return [self._job(r) for r in self._execute(sql + " ORDER BY id", args)]

    def finish_job(self, job_id: int, summary: dict[str, Any],
                   outputs: Sequence[tuple[str, str, str, str]],
                   destinations: Sequence[str]) -> None:
        """Mark a job done and queue each output (sop uid, class uid, study uid, path)."""
        now = self.clock()
        with self._write() as c:
            c.execute("UPDATE jobs SET state='done', finished_at=?, summary=?, error=NULL "
                      "WHERE id=?", (now, json.dumps(summary), job_id))
            for dest in destinations:
                for sop_uid, class_uid, study_uid, path in outputs:
                    c.execute("INSERT INTO outbox (job_id, destination, "
                              "sop_instance_uid, sop_class_uid, study_uid, path, "
                              "next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?) "
                              "ON CONFLICT DO NOTHING",
                              (job_id, dest, sop_uid, class_uid, study_uid, path, now, now))

    def fail_job(self, job_id: int, error: str, *, max_attempts: int) -> str:
        """Record a failure; re-queue while attempts remain. Returns the new state."""
        now = self.clock()
        with self._write() as c:
            row = c.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
            state = "pending" if row is not None and row[0] < max_attempts else "failed"
            c.execute("UPDATE jobs SET state=?, error=?, finished_at=? WHERE id=?",
                      (state, error[:2000], now, job_id))
        return state

    def retry_job(self, job_id: int) -> bool:
        with self._write() as c:
            return c.execute("UPDATE jobs SET state='pending', attempts=0 WHERE id=? AND "
                             "state='failed'", (job_id,)).rowcount == 1

    # -- outbox ------------------------------------------------------------------------

    _OUT_COLS = ("id, job_id, destination, sop_instance_uid, sop_class_uid, study_uid, path, "
                 "state, attempts")

    def due_outbox(self, limit: int = 100) -> list[OutboxRow]:
        rows = self._execute(
            f"SELECT {self._OUT_COLS} FROM outbox WHERE state='pending' AND next_attempt_at<=? "
            "ORDER BY destination, id LIMIT ?", (self.clock(), limit)).fetchall()
        return [OutboxRow(*r) for r in rows]

    def outbox(self, state: str | None = None) -> list[OutboxRow]:
        sql = f"SELECT {self._OUT_COLS} FROM outbox"
        args: tuple[Any, ...] = ()
        if state:
            sql += " WHERE state=?"
            args = (state,)
        return [OutboxRow(*r) for r in self._execute(sql + " ORDER BY id", args)]

    def mark_sending(self, outbox_id: int) -> bool:
        """Claim a due result for sending; False when another sender (a second
        receiver sharing this ledger) took it first."""
        with self._write() as c:
            return c.execute("UPDATE outbox SET state='sending', attempts=attempts+1 "
                             "WHERE id=? AND state='pending'", (outbox_id,)).rowcount == 1

    def mark_sent(self, outbox_id: int, status: int) -> None:
        with self._write() as c:
            c.execute("UPDATE outbox SET state='sent', sent_at=?, last_status=?, last_error=NULL "
                      "WHERE id=?", (self.clock(), status, outbox_id))

    def mark_send_failed(self, outbox_id: int, status: int | None, error: str,
                         next_attempt_at: float | None) -> None:
        """Back to pending at ``next_attempt_at``, or dead-lettered when it is None."""
        state = "dead" if next_attempt_at is None else "pending"
        with self._write() as c:
            c.execute("UPDATE outbox SET state=?, last_status=?, last_error=?, next_attempt_at=? "
                      "WHERE id=?", (state, status, error[:2000],
                                     next_attempt_at or self.clock(), outbox_id))

    def retry_dead(self, outbox_id: int | None = None) -> int:
        with self._write() as c:
            if outbox_id is None:
                return c.execute("UPDATE outbox SET state='pending', attempts=0, "
                                 "next_attempt_at=? WHERE state='dead'",
                                 (self.clock(),)).rowcount
            return c.execute("UPDATE outbox SET state='pending', attempts=0, next_attempt_at=? "
                             "WHERE id=? AND state='dead'", (self.clock(), outbox_id)).rowcount

    # -- reporting ---------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for table in ("studies", "series", "jobs", "outbox"):
            out[table] = {str(s): int(n) for s, n in self._execute(
                f"SELECT state, count(*) FROM {table} GROUP BY state")}
        out["instances"] = {"stored": int(self._execute(
            "SELECT count(*) FROM instances").fetchone()[0])}
        if self.schema_version >= 2:
            history = {"timeline_points": int(self._execute(
                "SELECT count(*) FROM timeline_points").fetchone()[0]),
                "patients": int(self._execute(
                    "SELECT count(DISTINCT patient_key) FROM timeline_points").fetchone()[0])}
            history.update({f"retrieves_{s}": int(n) for s, n in self._execute(
                "SELECT outcome, count(*) FROM retrieve_events GROUP BY outcome")})
            out["history"] = history
        return out

    def failures(self, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        jobs = [{"id": r[0], "route": r[1], "subject_uid": r[2], "attempts": r[3],
                 "error": r[4]} for r in self._execute(
            "SELECT id, route, subject_uid, attempts, error FROM jobs WHERE state='failed' "
            "ORDER BY id DESC LIMIT ?", (limit,))]
        dead = [{"id": r[0], "destination": r[1], "sop_instance_uid": r[2], "attempts": r[3],
                 "last_status": r[4], "error": r[5]} for r in self._execute(
            "SELECT id, destination, sop_instance_uid, attempts, last_status, last_error "
            "FROM outbox WHERE state='dead' ORDER BY id DESC LIMIT ?", (limit,))]
        return {"failed_jobs": jobs, "dead_letters": dead}

    def unmatched_series(self, limit: int = 50) -> list[str]:
        rows = self._execute(
            "SELECT s.series_uid FROM series s WHERE s.state='complete' AND NOT EXISTS "
            "(SELECT 1 FROM route_decisions d WHERE d.subject_uid=s.series_uid AND d.matched=1 "
            "AND d.generation=s.generation) ORDER BY s.closed_at DESC LIMIT ?", (limit,))
        return [str(r[0]) for r in rows]

    # -- history: timelines and retrieves ----------------------------------------------

    _TIMELINE_COLS = ("patient_key, tracking_uid, study_uid, study_date, volume_cm3, "
                      "source_sop_uid, source_kind, source_path")

    def add_timeline_point(self, point: TimelineRow) -> bool:
        """Add a point unless this lesion already has one for the study; True if added.

        Earlier points are never rewritten: a study's volume is measured once, and a
        later measurement of another study only adds its own point.
        """
        if point.source_kind not in ("node", "prior-sr"):
            raise ValueError(f"unknown timeline source kind {point.source_kind!r}")
        with self._write() as c:
            cur = c.execute(
                f"INSERT INTO timeline_points ({self._TIMELINE_COLS}, recorded_at) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (point.patient_key, point.tracking_uid, point.study_uid, point.study_date,
                 float(point.volume_cm3), point.source_sop_uid, point.source_kind,
                 point.source_path, self.clock()))
            return cur.rowcount == 1

    def timeline_points(self, patient_key: str,
                        tracking_uid: str | None = None) -> list[TimelineRow]:
        sql = f"SELECT {self._TIMELINE_COLS} FROM timeline_points WHERE patient_key=?"
        args: tuple[Any, ...] = (patient_key,)
        if tracking_uid is not None:
            sql += " AND tracking_uid=?"
            args = (patient_key, tracking_uid)
        rows = self._execute(sql + " ORDER BY study_date, id", args).fetchall()
        return [TimelineRow(*r) for r in rows]

    def timeline_patients(self) -> list[str]:
        return [str(r[0]) for r in self._execute(
            "SELECT DISTINCT patient_key FROM timeline_points ORDER BY patient_key")]

    def study_patient_key(self, study_uid: str) -> str | None:
        row = self._execute("SELECT patient_key FROM studies WHERE study_uid=?",
                                   (study_uid,)).fetchone()
        return None if row is None else str(row[0])

    def patient_instance_paths(self, patient_key: str, limit: int = 1) -> list[str]:
        """Spool paths of some stored instances of a patient (newest first)."""
        rows = self._execute(
            "SELECT i.path FROM instances i JOIN studies s ON s.study_uid = i.study_uid "
            "WHERE s.patient_key=? ORDER BY i.received_at DESC LIMIT ?",
            (patient_key, limit)).fetchall()
        return [str(r[0]) for r in rows]

    def record_retrieve(self, event: RetrieveEvent) -> None:
        with self._write() as c:
            c.execute("INSERT INTO retrieve_events (patient_key, source, study_uid, series_uid, "
                      "outcome, expected, completed, failed, arrived, detail, at) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                      (event.patient_key, event.source, event.study_uid, event.series_uid,
                       event.outcome, event.expected, event.completed, event.failed,
                       event.arrived, (event.detail or "")[:2000] or None, self.clock()))

    def retrieve_events(self, patient_key: str | None = None) -> list[RetrieveEvent]:
        sql = ("SELECT patient_key, source, study_uid, series_uid, outcome, expected, "
               "completed, failed, arrived, detail FROM retrieve_events")
        args: tuple[Any, ...] = ()
        if patient_key is not None:
            sql += " WHERE patient_key=?"
            args = (patient_key,)
        return [RetrieveEvent(*r) for r in self._execute(sql + " ORDER BY id", args)]

    def request_history(self, job_id: int, patient_key: str, study_uid: str) -> bool:
        """File a new volume's history run for a receiver to take; False if this job
        already filed it (a job finished twice files once)."""
        with self._write() as c:
            return c.execute("INSERT INTO history_requests (job_id, patient_key, study_uid, "
                             "requested_at) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                             (job_id, patient_key, study_uid, self.clock())).rowcount == 1

    def claim_history_requests(self, holder: str, limit: int = 100) -> list[tuple[str, str]]:
        """Take the unclaimed history requests, oldest first: (patient key, study uid)
        each, given to exactly one caller of all that share the ledger."""
        if self._execute("SELECT 1 FROM history_requests WHERE claimed_at IS NULL "
                         "LIMIT 1").fetchone() is None:
            return []  # the common case, without taking the write lock
        with self._write() as c:
            rows = c.execute("SELECT id, patient_key, study_uid FROM history_requests "
                             "WHERE claimed_at IS NULL ORDER BY id LIMIT ?",
                             (limit,)).fetchall()
            now = self.clock()
            for row in rows:
                c.execute("UPDATE history_requests SET claimed_at=?, claimed_by=? WHERE id=?",
                          (now, holder[:200], row[0]))
        return [(str(r[1]), str(r[2])) for r in rows]

    def history_requests(self) -> list[tuple[int, str, str, str | None]]:
        """Every request: (job id, patient key, study uid, claimed by or None)."""
        return [(int(r[0]), str(r[1]), str(r[2]), None if r[3] is None else str(r[3]))
                for r in self._execute("SELECT job_id, patient_key, study_uid, claimed_by "
                                       "FROM history_requests ORDER BY id")]

    def claim_once(self, key: str, holder: str) -> bool:
        """True for the first caller with this key, of all processes sharing the ledger."""
        with self._write() as c:
            return c.execute("INSERT INTO claims (key, holder, claimed_at) VALUES (?,?,?) "
                             "ON CONFLICT DO NOTHING",
                             (key, holder[:200], self.clock())).rowcount == 1

    def queue_results(self, outputs: Sequence[tuple[str, str, str, str]],
                      destinations: Sequence[str]) -> int:
        """Queue result objects made outside a job (e.g. growth reports); returns rows added."""
        now = self.clock()
        added = 0
        with self._write() as c:
            for dest in destinations:
                for sop_uid, class_uid, study_uid, path in outputs:
                    cur = c.execute(
                        "INSERT INTO outbox (job_id, destination, sop_instance_uid, "
                        "sop_class_uid, study_uid, path, next_attempt_at, created_at) "
                        "VALUES (NULL,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                        (dest, sop_uid, class_uid, study_uid, path, now, now))
                    added += cur.rowcount
        return added

    def queued(self, sop_instance_uid: str) -> bool:
        """Whether a result with this UID is already in the outbox (any destination)."""
        return self._execute("SELECT 1 FROM outbox WHERE sop_instance_uid=? LIMIT 1",
                                    (sop_instance_uid,)).fetchone() is not None
