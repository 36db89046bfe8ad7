"""The audit trail forwarded to an Audit Record Repository (IHE ATNA, ITI-20 Record Audit
Event): each record, once committed to the local trail, as one DICOM audit message
(PS3.15 A.5, :mod:`dicomnode.ops.atna`) in one RFC 5424 syslog message.

Header as ITI-20 asks: facility 10 (security/authorization), severity 5 (notice) for a
success and 4 (warning) otherwise, APP-NAME ``dicomnode``, PROCID the process id, MSGID
``IHE+RFC-3881``, no structured data; MSG is the XML, UTF-8 with the BOM RFC 5424 asks
for. Transports: UDP (RFC 5426, one message per datagram), TCP with RFC 6587 octet
counting, TLS (RFC 5425: the same framing; TLS 1.2+ with the node's DICOM TLS suites,
the repository's certificate checked, the node's own presented when configured).

The local trail is the record; forwarding is a copy on a best-effort basis. The audit
writer hands committed records to :meth:`SyslogForwarder.submit`, which only queues them
(bounded: past ``max_queued`` the oldest are dropped and counted), and one thread of the
forwarder sends them, so neither the association threads nor the local trail ever wait
for the network. A failed send is counted, logged once (with the repository's address
and the error, never a record's content) and retried with a backoff; TCP and TLS give
at-least-once delivery to the socket (a record can repeat after a reconnect), UDP gives
no delivery guarantee at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

from dicomnode.config import Settings, SyslogSettings
from dicomnode.ops.atna import audit_message
from dicomnode.ops.audit import SUCCESS, AuditRecord

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
    DICOM audit message (``association``: its stores are sent as their own records)."""
    msg = audit_message(record, node_ae=node_ae, source_id=source_id)
    if msg is None:
        return None
    severity = SEVERITY_NOTICE if record.outcome == SUCCESS else SEVERITY_WARNING
    stamp = datetime.fromtimestamp(record.at, UTC).isoformat(timespec="milliseconds")
    header = (f"<{FACILITY * 8 + severity}>1 {stamp.replace('+00:00', 'Z')} "
              f"{_header_field(hostname, 255)} {APP_NAME} "
              f"{_header_field(str(procid if procid is not None else os.getpid()), 128)} "
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
    """Sends committed audit records to one repository, on a thread of its own.

    ``on_sent``, ``on_failed`` and ``on_dropped`` receive counts (the node's metrics)."""

    def __init__(self, settings: SyslogSettings, *, node_ae: str, source_id: str,
                 hostname: str | None = None) -> None:
        self.settings = settings
        self.node_ae = node_ae
        self.source_id = source_id
        self.hostname = hostname or socket.gethostname()
        self.on_sent: Callable[[int], None] | None = None
        self.on_failed: Callable[[int], None] | None = None
        self.on_dropped: Callable[[int], None] | None = None
        self._queue: deque[AuditRecord] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._grace_s = 2.0
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._ctx = client_context(settings) if settings.scheme == "tls" else None
        self._failures = 0  # consecutive, for logging and the backoff
        self._dropped_logged = 0.0

    @property
    def target(self) -> str:
        return f"{self.settings.scheme}://{self.settings.host}:{self.settings.port}"

    # -- the writer's side: never blocks ----------------------------------------------

    def submit(self, records: Sequence[AuditRecord]) -> None:
        dropped = 0
        with self._cond:
            for record in records:
                if len(self._queue) >= self.settings.max_queued:
                    self._queue.popleft()
                    dropped += 1
                self._queue.append(record)
            self._cond.notify()
        if dropped:
            self._dropped(dropped, "the forwarding queue is full")

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _dropped(self, n: int, why: str) -> None:
        if self.on_dropped is not None:
            self.on_dropped(n)
        now = time.monotonic()
        if now - self._dropped_logged > 60.0:  # at most one line a minute
            self._dropped_logged = now
            log.warning("audit syslog: %d record(s) not forwarded to %s (%s); the local "
                        "trail keeps them", n, self.target, why)

    # -- the forwarding thread ----------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 2.0) -> None:
        """Send what is queued for up to ``grace_s`` (no retries), then close."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._grace_s = grace_s
            self._cond.notify()
        thread.join(grace_s + self.settings.timeout_s)
        self._close()
        left = self.queued()
        if left:
            log.warning("audit syslog: %d record(s) not forwarded to %s at stop; the local "
                        "trail keeps them", left, self.target)

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    deadline = deadline or time.monotonic() + self._grace_s
                    if not self._queue or time.monotonic() > deadline:
                        return
                record = self._queue[0]
            ok = self._forward(record)
            with self._cond:
                if ok and self._queue and self._queue[0] is record:
                    self._queue.popleft()
                if not ok:
                    if self._stopping:
                        return
                    backoff = min(_BACKOFF_MAX_S, 0.5 * 2 ** min(self._failures, 8))
                    self._cond.wait_for(lambda: self._stopping, timeout=backoff)

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
