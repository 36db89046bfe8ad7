"""The audit trail: an append-only record of who sent what, what was analysed and sent,
and how the node was configured, with patient identifiers only as salted hashes.

It lives in its own SQLite file (``audit.sqlite3`` beside the ledger), not in the
ledger: its writes never contend with the ledger's write lock on the ingest path, and it
can be kept, copied or shipped on a schedule of its own. Append-only is enforced by the
database (triggers refuse UPDATE and DELETE) and made checkable by a hash chain: each
record carries the SHA-256 of its predecessor's hash and its own content, so an edit
made behind the database's back shows in ``verify()``.

Recording is cheap on purpose: ``append`` puts the record in memory; a writer thread
stores what has accumulated once per ``flush_interval_s`` in one transaction (one fsync
per batch, none per instance), then wakes the ``forwarder`` if one is configured
(:mod:`dicomnode.ops.syslog`, which reads the records after its cursor from this file on
a thread of its own: a slow or absent Audit Record Repository delays neither the
associations nor the local trail). Stores
are recorded once per association and study, when the association ends, as DICOM's own
"Instances Transferred" audit message does. A crash loses at most the last interval's
records; the ledger still holds every instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomnode.ops.syslog import SyslogForwarder

log = logging.getLogger(__name__)

AUDIT_NAME = "audit.sqlite3"

KINDS = ("application", "configuration", "association", "association-rejected", "store",
         "analysis", "send", "web-action", "web-auth")

# RFC 3881 / DICOM EventOutcomeIndicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

# Keys that would carry a patient identifier in clear; refused in any record.
_IDENTIFYING = frozenset({"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                          "OtherPatientNames", "IssuerOfPatientID", "AccessionNumber",
                          "patient_id", "patient_name", "accession", "accession_number"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    detail TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_kind ON audit(kind, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""

# Forwarding state (dicomnode.ops.syslog), not part of the trail nor of its hash chain:
# per repository, the id of the last record handed to it and which process sends.
FORWARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_forward (
    target TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL
);
"""

_GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: float
    kind: str
    outcome: int
    detail: Mapping[str, Any]
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "kind": self.kind, "outcome": self.outcome,
                "detail": dict(self.detail), "hash": self.hash}


def _chain(prev: str, at: float, kind: str, outcome: int, detail: str) -> str:
    body = json.dumps([prev, repr(at), kind, outcome, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _record(row: Any) -> AuditRecord:
    return AuditRecord(int(row[0]), float(row[1]), str(row[2]), int(row[3]),
                       json.loads(row[4]), str(row[5]))


def records_after(db: sqlite3.Connection, after: int, limit: int) -> list[AuditRecord]:
    """The records with an id above ``after``, in id order, at most ``limit`` (for a
    connection of the reader's own, such as the forwarder's)."""
    rows = db.execute("SELECT id, at, kind, outcome, detail, hash FROM audit WHERE id > ? "
                      "ORDER BY id LIMIT ?", (after, limit)).fetchall()
    return [_record(r) for r in rows]


def _check_detail(detail: Mapping[str, Any]) -> None:
    for key, value in detail.items():
        if key in _IDENTIFYING:
            raise ValueError(f"audit detail must not carry {key!r} in clear; hash it")
        if isinstance(value, Mapping):
            _check_detail(value)


class AuditTrail:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 flush_interval_s: float = 1.0,
                 forwarder: SyslogForwarder | None = None) -> None:
        self.path = path
        self.clock = clock
        self.flush_interval_s = flush_interval_s
        self.forwarder = forwarder
        self._buffer: deque[tuple[float, str, int, str]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_written: Callable[[int], None] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA + FORWARD_SCHEMA)

    # -- recording ---------------------------------------------------------------------

    def append(self, kind: str, outcome: int = SUCCESS, **detail: Any) -> None:
        """Queue one record; cheap enough for an association thread."""
        if kind not in KINDS:
            raise ValueError(f"unknown audit record kind {kind!r}")
        _check_detail(detail)
        self._buffer.append((self.clock(), kind, int(outcome),
                             json.dumps(detail, sort_keys=True, default=str)))

    def flush(self) -> int:
        """Store everything queued, in one transaction; returns how many records."""
        with self._lock:
            batch: list[tuple[float, str, int, str]] = []
            while self._buffer:
                batch.append(self._buffer.popleft())
            if not batch:
                return 0
            last_id = 0
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                prev = str(row[0]) if row is not None else _GENESIS
                for at, kind, outcome, detail in batch:
                    digest = _chain(prev, at, kind, outcome, detail)
                    cur = db.execute("INSERT INTO audit (at, kind, outcome, detail, prev, hash) "
                                     "VALUES (?,?,?,?,?,?)",
                                     (at, kind, outcome, detail, prev, digest))
                    last_id = int(cur.lastrowid or 0)
                    prev = digest
            except BaseException:
                db.execute("ROLLBACK")
                self._buffer.extendleft(reversed(batch))
                raise
            db.execute("COMMIT")
        if self.on_written is not None:
            self.on_written(len(batch))
        if self.forwarder is not None:
            self.forwarder.notify(last_id)
        return len(batch)

    def start(self) -> None:
        if self.forwarder is not None:
            self.forwarder.start(self.path)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except sqlite3.Error:
                log.exception("audit trail: write failed; records kept in memory for the "
                              "next attempt")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()
        if self.forwarder is not None:  # after the last flush: the stop record goes too
            self.forwarder.stop()

    def close(self) -> None:
        self.stop()
        with self._lock:
            self._db.close()

    # -- reading -----------------------------------------------------------------------

    def records(self, *, after: int = 0, limit: int = 200,
                kind: str | None = None) -> list[AuditRecord]:
        sql = "SELECT id, at, kind, outcome, detail, hash FROM audit WHERE id > ?"
        args: list[Any] = [after]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY id LIMIT ?"
        args.append(max(1, min(limit, 10_000)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_record(r) for r in rows]

    def last(self, kind: str) -> AuditRecord | None:
        with self._lock:
            row = self._db.execute("SELECT id, at, kind, outcome, detail, hash FROM audit "
                                   "WHERE kind=? ORDER BY id DESC LIMIT 1", (kind,)).fetchone()
        if row is None:
            return None
        return AuditRecord(int(row[0]), float(row[1]), str(row[2]), int(row[3]),
                           json.loads(row[4]), str(row[5]))

    def verify(self) -> int | None:
        """The id of the first record whose chain does not hold, or None if all do."""
        prev = _GENESIS
        with self._lock:
            rows = self._db.execute("SELECT id, at, kind, outcome, detail, prev, hash "
                                    "FROM audit ORDER BY id").fetchall()
        for rid, at, kind, outcome, detail, stored_prev, digest in rows:
            if stored_prev != prev or _chain(prev, at, kind, outcome, detail) != digest:
                return int(rid)
            prev = digest
        return None
