"""The audit trail forwarded to an Audit Record Repository (IHE ATNA, ITI-20 Record Audit
Event): each record, once committed to the local trail, as one DICOM audit message
(PS3.15 A.5, :mod:`dicomnode.ops.atna`) in one RFC 5424 syslog message.

Header as ITI-20 asks: facility 10 (security/authorization), severity 5 (notice) for a
success and 4 (warning) otherwise, APP-NAME ``dicomnode``, PROCID the recording
process's id, MSGID
``IHE+RFC-3881``, no structured data; MSG is the XML, UTF-8 with the BOM RFC 5424 asks
for. Transports: UDP (RFC 5426, one message per datagram), TCP with RFC 6587 octet
counting, TLS (RFC 5425: the same framing; TLS 1.2+ with the node's DICOM TLS suites,
the repository's certificate checked, the node's own presented when configured).

The local trail is the record, and the forwarder catches up with it: the audit file
keeps, per repository, a cursor (the id of the last record written to a TCP/TLS socket
or sent as a UDP datagram, in a table of its own beside the append-only records), and
the forwarding thread reads the records after it from the file, in id order and in
bounded batches. The audit writer only wakes that thread after its commit, so neither
the association threads nor the local trail ever wait for the network, and records
made while the repository is unreachable, or while the node was stopped or had
crashed, are sent when it can be reached again. A failed send is counted, logged once
(with the repository's address and the error, never a record's content) and retried
with a backoff. Over TCP and TLS delivery is at least once as far as the socket goes
(a record can repeat after a reconnect or a crash, none after a clean stop; syslog has
no acknowledgement); UDP catches up the same way but a datagram can be lost.

Several processes on one machine may append to one audit file; one of them sends for
all (a lease in the same table, renewed as it sends, taken over when it lapses or is
given up at a clean stop), so each record is sent by one process, not one per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree as ET

from dicomnode.config import Settings, SyslogSettings
from dicomnode.ops.atna import audit_message
from dicomnode.ops.audit import FORWARD_SCHEMA, SUCCESS, AuditRecord, records_after

log = logging.getLogger(__name__)

FACILITY = 10  # security/authorization messages (ITI-20)
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
APP_NAME = "dicomnode"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
UDP_MAX = 65507  # the largest UDP payload over IPv4
_BACKOFF_MAX_S = 60.0


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII, no space, at most ``limit``."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "-" for c in value)[:limit]
    return cleaned or "-"


def syslog_message(record: AuditRecord, *, node_ae: str, source_id: str, hostname: str,
                   procid: int | None = None) -> bytes | None:
    """One record as an RFC 5424 message (unframed), or None for a kind that has no
    DICOM audit message (``association``: its stores are sent as their own records).
    PROCID: ``procid``, else the process that made the record (its ``pid``), else this
    one (the process sending may not be the one recording: several share one file)."""
    msg = audit_message(record, node_ae=node_ae, source_id=source_id)
    if msg is None:
        return None
    if procid is None:
        pid = record.detail.get("pid")
        procid = pid if isinstance(pid, int) else os.getpid()
    severity = SEVERITY_NOTICE if record.outcome == SUCCESS else SEVERITY_WARNING
    stamp = datetime.fromtimestamp(record.at, UTC).isoformat(timespec="milliseconds")
    header = (f"<{FACILITY * 8 + severity}>1 {stamp.replace('+00:00', 'Z')} "
              f"{_header_field(hostname, 255)} {APP_NAME} "
              f"{_header_field(str(procid), 128)} "
              f"{MSGID} -")
    body: bytes = ET.tostring(msg, encoding="utf-8", xml_declaration=False)
    # one line per message: the serialisation has no newline of its own, so any is in
    # text content, where a character reference means the same
    body = body.replace(b"\r", b"&#13;").replace(b"\n", b"&#10;")
    return (header.encode("ascii") + b" " + BOM
            + b'<?xml version="1.0" encoding="UTF-8"?>' + body)


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def client_context(settings: SyslogSettings) -> ssl.SSLContext:
    """TLS to the repository: the node's DICOM TLS rules (TLS 1.2+, AEAD suites)."""
    from dicomnode.net.tls import BCP195_CIPHERS

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if settings.ca is not None:
        ctx.load_verify_locations(cafile=settings.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.cert is not None and settings.key is not None:
        ctx.load_cert_chain(settings.cert, settings.key)
    ctx.check_hostname = settings.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class SyslogForwarder:
    """Sends the records of one audit file to one repository, on a thread of its own.

    The file holds a cursor per repository (``audit_forward``: the id of the last record
    written to the socket) and a lease naming the one process that sends; the thread
    reads the records after the cursor in id order, ``max_queued`` at a time, sends them
    and moves the cursor (committed at most every ``save_interval_s`` while sending, after
    each batch and at stop). ``notify`` only wakes it; the holder also looks every
    ``poll_s`` for records other processes appended, and a process without the lease
    looks every ``poll_s`` whether it has expired (``lease_s`` after its holder's last
    renewal; a clean stop gives it up at once).

    ``on_sent``, ``on_failed`` and ``on_dropped`` receive counts (the node's metrics)."""

    def __init__(self, settings: SyslogSettings, *, node_ae: str, source_id: str,
                 hostname: str | None = None, lease_s: float = 15.0, poll_s: float = 1.0,
                 save_interval_s: float = 0.5) -> None:
        self.settings = settings
        self.node_ae = node_ae
        self.source_id = source_id
        self.hostname = hostname or socket.gethostname()
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.save_interval_s = save_interval_s
        self.on_sent: Callable[[int], None] | None = None
        self.on_failed: Callable[[int], None] | None = None
        self.on_dropped: Callable[[int], None] | None = None
        self._cond = threading.Condition()
        self._woken = False  # this process's writer committed records since the last read
        self._stopping = False
        self._grace_s = 2.0
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._owner = f"{self.hostname}:{os.getpid()}:{secrets.token_hex(4)}"
        self._leader = False
        self._lease_until = 0.0
        self._cursor = 0  # the last record handed to the repository
        self._saved = -1  # the cursor as last committed
        self._last_id = 0  # the trail's highest id, as last read
        self._sock: socket.socket | None = None
        self._ctx = client_context(settings) if settings.scheme == "tls" else None
        self._failures = 0  # consecutive, for logging and the backoff
        self._dropped_logged = 0.0
        self._path_name = "the audit trail"
        self._left = 0  # behind the cursor when this process stopped sending

    @property
    def target(self) -> str:
        return f"{self.settings.scheme}://{self.settings.host}:{self.settings.port}"

    # -- the writer's side: never blocks ----------------------------------------------

    def notify(self, last_id: int) -> None:
        """Records up to ``last_id`` are committed: wake the sending thread."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def backlog(self) -> int:
        """Records of the trail after the repository's cursor (as last read)."""
        return max(0, self._last_id - self._cursor)

    def sending(self) -> bool:
        """Whether this process holds the lease (sends for every process of the file)."""
        return self._leader

    def _dropped(self, n: int, why: str) -> None:
        if self.on_dropped is not None:
            self.on_dropped(n)
        now = time.monotonic()
        if now - self._dropped_logged > 60.0:  # at most one line a minute
            self._dropped_logged = now
            log.warning("audit syslog: %d record(s) not forwarded to %s (%s); the local "
                        "trail keeps them", n, self.target, why)

    # -- the cursor and the lease, in the audit file ----------------------------------

    def _lead(self) -> bool:
        """Take or renew the lease when it is due; reads the cursor when taking it."""
        db = self._db
        assert db is not None
        now = time.time()
        if self._leader and now < self._lease_until - self.lease_s / 2:
            return True
        row = db.execute("SELECT last_id, owner, lease_until FROM audit_forward "
                         "WHERE target=?", (self.target,)).fetchone()
        if (row is not None and row[1] != self._owner and float(row[2]) > now
                and not self._holder_gone(str(row[1]))):
            self._leader = False
            self._cursor = int(row[0])  # the holder's progress, for the backlog gauge
            self._read_last_id()
            return False
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT last_id, owner, lease_until FROM audit_forward "
                             "WHERE target=?", (self.target,)).fetchone()
            until = now + self.lease_s
            if row is None:  # a repository new to this file gets the whole trail
                db.execute("INSERT INTO audit_forward (target, last_id, owner, lease_until) "
                           "VALUES (?,0,?,?)", (self.target, self._owner, until))
                stored = 0
            elif (row[1] == self._owner or float(row[2]) <= now
                  or self._holder_gone(str(row[1]))):
                db.execute("UPDATE audit_forward SET owner=?, lease_until=? WHERE target=?",
                           (self._owner, until, self.target))
                stored = int(row[0])
            else:
                db.execute("ROLLBACK")
                self._leader = False
                self._cursor = int(row[0])
                return False
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if not self._leader or row is None or row[1] != self._owner:
            self._cursor = stored  # taken over: carry on from the last holder's cursor
            self._saved = stored
            log.info("audit syslog: this process forwards %s's records to %s from id %d",
                     self._path_name, self.target, stored)
        self._leader = True
        self._lease_until = until
        return True

    def _holder_gone(self, owner: str) -> bool:
        """Whether the lease's holder is a process of this machine that no longer runs
        (killed: its lease need not be waited out)."""
        parts = owner.rsplit(":", 2)  # hostname:pid:token
        if len(parts) != 3 or parts[0] != self.hostname or not parts[1].isdigit():
            return False
        pid = parts[1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _save(self) -> None:
        """Commit the cursor (and renew the lease) if it moved; a process that lost the
        lease stops sending."""
        db = self._db
        if db is None or not self._leader or self._cursor == self._saved:
            return
        until = time.time() + self.lease_s
        cur = db.execute("UPDATE audit_forward SET last_id=MAX(last_id, ?), lease_until=? "
                         "WHERE target=? AND owner=?",
                         (self._cursor, until, self.target, self._owner))
        if cur.rowcount == 1:
            self._saved = self._cursor
            self._lease_until = until
        else:
            self._leader = False
            log.warning("audit syslog: another process took over forwarding to %s",
                        self.target)

    def _release(self) -> None:
        db = self._db
        if db is None or not self._leader:
            return
        with contextlib.suppress(sqlite3.Error):
            db.execute("UPDATE audit_forward SET last_id=MAX(last_id, ?), lease_until=0 "
                       "WHERE target=? AND owner=?", (self._cursor, self.target, self._owner))
        self._leader = False

    def _read_last_id(self) -> None:
        assert self._db is not None
        row = self._db.execute("SELECT MAX(id) FROM audit").fetchone()
        self._last_id = int(row[0] or 0)

    # -- the forwarding thread ----------------------------------------------------------

    def start(self, path: Path) -> None:
        """Forward the records of the audit file at ``path`` (its :class:`AuditTrail`
        calls this)."""
        self._path_name = path.name
        db = sqlite3.connect(path, timeout=self.settings.timeout_s, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # the cursor need not survive a power cut (records would repeat, none be lost):
        # no fsync of its own per commit; the trail's next commit syncs it
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(FORWARD_SCHEMA)
        self._db = db
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 2.0) -> None:
        """Send what is behind the cursor for up to ``grace_s`` more (no retries), commit
        the cursor, give up the lease and close."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._grace_s = grace_s
            self._cond.notify()
        thread.join(grace_s + 2 * self.settings.timeout_s)
        self._close()
        if not thread.is_alive():
            db, self._db = self._db, None
            if db is not None:
                db.close()
        left = self._left
        if left:
            log.warning("audit syslog: %d record(s) not yet forwarded to %s at stop; the "
                        "local trail keeps them and the next start sends them", left,
                        self.target)

    def _wait(self, timeout: float) -> None:
        """Until this process's writer commits records, or ``timeout`` (records other
        processes append), or stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or self._woken, timeout=timeout)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._save()
            self._left = self.backlog() if self._leader else 0
            self._release()

    def _loop(self) -> None:
        deadline: float | None = None
        while True:
            with self._cond:
                if self._stopping:
                    deadline = deadline or time.monotonic() + self._grace_s
                self._woken = False
            if deadline is not None and time.monotonic() > deadline:
                return
            try:
                if not self._lead():
                    if deadline is not None:
                        return
                    self._wait_stopping(self.poll_s)
                    continue
                ok = self._send_batch(deadline)
            except sqlite3.Error as exc:  # the file busy past the timeout, or unreadable
                log.warning("audit syslog: cannot use %s (%s); trying again",
                            self._path_name, exc)
                if deadline is not None:
                    return
                self._wait_stopping(self.poll_s)
                continue
            if ok is None:  # nothing after the cursor
                if deadline is not None:
                    return
                self._wait(self.poll_s)
            elif not ok:
                if deadline is not None:
                    return
                self._wait_stopping(min(_BACKOFF_MAX_S, 0.5 * 2 ** min(self._failures, 8)))

    def _send_batch(self, deadline: float | None) -> bool | None:
        """Send the records after the cursor, ``max_queued`` at most, moving the cursor:
        None when there were none, False when a send failed."""
        assert self._db is not None
        self._read_last_id()
        batch = records_after(self._db, self._cursor, self.settings.max_queued)
        if not batch:
            self._save()
            return None
        ok = True
        saved_at = time.monotonic()
        for record in batch:
            ok = self._forward(record)
            if not ok:
                break
            self._cursor = record.id
            if time.monotonic() - saved_at > self.save_interval_s:
                self._save()
                saved_at = time.monotonic()
                if not self._leader:
                    break
            if deadline is not None and time.monotonic() > deadline:
                break
        self._save()
        return ok

    def _wait_stopping(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, timeout=timeout)

    def _forward(self, record: AuditRecord) -> bool:
        """True when sent, or when the record can never be sent (dropped and counted)."""
        try:
            message = syslog_message(record, node_ae=self.node_ae, source_id=self.source_id,
                                     hostname=self.hostname)
        except Exception as exc:  # a record the exporter cannot render: not the network's
            self._dropped(1, f"cannot render a {record.kind} record: {type(exc).__name__}")
            return True
        if message is None:
            return True
        if self.settings.scheme == "udp" and len(message) > UDP_MAX:
            self._dropped(1, f"a {len(message)}-byte message does not fit a UDP datagram")
            return True
        try:
            self._send(message)
        except (OSError, ssl.SSLError) as exc:
            self._close()
            self._failures += 1
            if self.on_failed is not None:
                self.on_failed(1)
            if self._failures == 1:
                log.warning("audit syslog: cannot send to %s (%s: %s); retrying, the local "
                            "trail keeps every record", self.target, type(exc).__name__,
                            exc.strerror or exc)
            return False
        if self._failures:
            log.info("audit syslog: sending to %s again after %d failed attempt(s)",
                     self.target, self._failures)
            self._failures = 0
        if self.on_sent is not None:
            self.on_sent(1)
        return True

    def _send(self, message: bytes) -> None:
        if self._sock is not None and self.settings.scheme != "udp" and self._peer_closed():
            self._close()
        if self._sock is None:
            self._sock = self._connect()
        if self.settings.scheme == "udp":
            self._sock.send(message)
        else:
            self._sock.sendall(octet_counted(message))

    def _connect(self) -> socket.socket:
        s = self.settings
        if s.scheme == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(
                s.host, s.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(s.timeout_s)
            sock.connect(address)  # connected: a refusal shows on the next send
            return sock
        sock = socket.create_connection((s.host, s.port), timeout=s.timeout_s)
        if self._ctx is None:
            return sock
        try:
            return self._ctx.wrap_socket(sock, server_hostname=s.host)
        except BaseException:
            sock.close()
            raise

    def _peer_closed(self) -> bool:
        """Whether the repository closed the connection (it never sends data), so that a
        record is not written into a connection already gone."""
        sock = self._sock
        assert sock is not None
        try:
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            if not poll.poll(0) and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return False
            sock.setblocking(False)
            try:
                return sock.recv(4096) == b""
            finally:
                sock.settimeout(self.settings.timeout_s)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # a TLS record that was not data (a session ticket)
        except (OSError, ssl.SSLError):
            return True

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def syslog_forwarder(settings: Settings) -> SyslogForwarder | None:
    """The forwarder ``audit.syslog`` asks for, or None."""
    if settings.audit.syslog is None:
        return None
    return SyslogForwarder(settings.audit.syslog, node_ae=settings.node.ae_title,
                           source_id=f"dicomnode/{settings.node.ae_title}")
