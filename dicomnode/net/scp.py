"""The node's DICOM listener: C-ECHO and C-STORE for every storage SOP class.

The C-STORE handler does only: check the received bytes, fsync, rename, record, answer.
Bytes are streamed by pynetdicom straight into a spool temp file (its chunked-receive
mode), so a 1 GB instance never sits in memory, and the file on disk holds the dataset
exactly as it came over the wire.

In front of pynetdicom sits a guarded server (``GuardedServer``): each accepted
connection gets its own short-lived thread that does the TLS handshake and reads the
A-ASSOCIATE-RQ under a deadline, turns away unknown callers and excess associations
itself, and only then builds the pynetdicom Association, whose socket
(``GuardedSocket``) checks every later PDU against the advertised maximum, a per-PDU
deadline and the DIMSE framing rules (``dicomnode.net.pdu_guard``). See README
"Hardening".
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import Any, NamedTuple

import pynetdicom
import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from dicomnode.config import Settings
from dicomnode.ingest.ledger import LEDGER_UNAVAILABLE, Ledger
from dicomnode.ingest.parse import DatasetRejected, header_tags, read_instance
from dicomnode.ingest.reconcile import build_record
from dicomnode.ingest.spool import InstanceTooLarge, Spool, SpoolFull, SpoolTempFile
from dicomnode.net import dimse_fast, reactor
from dicomnode.net.limits import Admission, ConnectionLimits, LogThrottle, PendingTicket
from dicomnode.net.pdu_guard import (
    P_DATA_TF,
    PDU_HEADER,
    MessageTracker,
    PduViolation,
    abort_pdu,
    associate_rq_titles,
    check_header,
    reject_pdu,
)
from dicomnode.net.status import (
    ABORT_REASON_NOT_SPECIFIED,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_USER_IDENTITY,
    REJECTION_STATUS,
    Status,
)
from dicomnode.net.tls import TlsHandshakeFailed, handshake, server_context
from dicomnode.ops.events import NO_EVENTS, NodeEvents
from dicomnode.routing.router import routing_keywords

log = logging.getLogger(__name__)

# Everything the node can store as received and later decode for analysis. Deflated
# (1.2.840.10008.1.2.1.99) is deliberately absent: it is refused at negotiation, so no
# unbounded inflate can ever happen here.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE Lossless
]

_SPOOL_ATTR = "_dicomnode_spool"
IMPLEMENTATION_CLASS_UID = "2.25.104137351963992213869696699188377389769"
IMPLEMENTATION_VERSION = "DICOMNODE_010"


class _FileMeta(NamedTuple):
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    sending_ae: str = ""    # (0002,0017): the calling AE, so the spool alone says who sent it
    receiving_ae: str = ""  # (0002,0018): the node's AE title


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ae(value: str) -> bytes:
    raw = "".join(c for c in value if " " <= c < "\x7f" and c != "\\")[:16].encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _ui(value: str) -> bytes:
    raw = value.encode("ascii", "replace")[:64]
    return raw + b"\0" if len(raw) % 2 else raw


def encode_file_meta(meta: _FileMeta) -> bytes:
    """Group 2 for a received instance, encoded directly (explicit VR little endian).

    Building a pydicom FileMetaDataset and running its writer cost more per instance
    than the fsyncs; the few elements are simple enough to write by hand.
    """
    version = IMPLEMENTATION_VERSION.encode()
    elements = [
        _element(2, 0x0001, b"OB", b"\x00\x01"),
        _element(2, 0x0002, b"UI", _ui(meta.sop_class_uid)),
        _element(2, 0x0003, b"UI", _ui(meta.sop_instance_uid)),
        _element(2, 0x0010, b"UI", _ui(meta.transfer_syntax)),
        _element(2, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _element(2, 0x0013, b"SH", version + b" " * (len(version) % 2)),
    ]
    for elem, title in ((0x0017, _ae(meta.sending_ae)), (0x0018, _ae(meta.receiving_ae))):
        if title:
            elements.append(_element(2, elem, b"AE", title))
    body = b"".join(elements)
    return _element(2, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def _quiet_after_guard_abort(record: logging.LogRecord) -> bool:
    """Drop pynetdicom's "PDU shorter than expected" line for a PDU the guard refused:
    the guard has logged the real reason, and the short read is how it stops the DUL."""
    if not record.getMessage().startswith("The received PDU is shorter"):
        return True
    sock = getattr(threading.current_thread(), "socket", None)
    return getattr(sock, "violation", None) is None


_install_lock = threading.Lock()
_installed = False


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: stream to disk, never log identifiers."""
    global _installed
    with _install_lock:
        if _installed:
            return
        cfg = pynetdicom._config
        cfg.STORE_RECV_CHUNKED_DATASET = True
        cfg.LOG_REQUEST_IDENTIFIERS = False
        cfg.LOG_RESPONSE_IDENTIFIERS = False
        cfg.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom.dul").addFilter(_quiet_after_guard_abort)
        reactor.install()  # wake pynetdicom's polling loops on work, not a 1 ms tick
        dimse_fast.install()  # C-STORE-RSP encoded directly, not through pydicom
        messages: Any = pynetdicom.dimse_messages
        original = messages.NamedTemporaryFile

        def spool_temp_file(*args: Any, **kwargs: Any) -> Any:
            # Runs on the association's DUL thread, whose .assoc is the Association.
            thread = threading.current_thread()
            owner = getattr(thread, "assoc", thread)
            spool = getattr(owner, _SPOOL_ATTR, None)
            if isinstance(spool, Spool):
                return spool.new_temp()
            return original(*args, **kwargs)

        messages.NamedTemporaryFile = spool_temp_file
        original_create = messages.create_file_meta
        original_write = messages.write_file_meta_info

        def create_file_meta(**kwargs: Any) -> Any:
            assoc = getattr(threading.current_thread(), "assoc", None)
            if assoc is not None and isinstance(getattr(assoc, _SPOOL_ATTR, None), Spool):
                # on a C-GET the node requested the association and the peer stores on it
                peer, local = ((assoc.acceptor, assoc.requestor) if assoc.is_requestor
                               else (assoc.requestor, assoc.acceptor))
                return _FileMeta(str(kwargs["sop_class_uid"]), str(kwargs["sop_instance_uid"]),
                                 str(kwargs["transfer_syntax"]), str(peer.ae_title).strip(),
                                 str(local.ae_title).strip())
            return original_create(**kwargs)

        def write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(file_meta, _FileMeta):
                fp.write(encode_file_meta(file_meta))
            else:
                original_write(fp, file_meta, *args, **kwargs)

        messages.create_file_meta = create_file_meta
        messages.write_file_meta_info = write_file_meta_info
        _installed = True


def set_nodelay(sock: socket.socket | None) -> None:
    """Nagle + delayed ACK costs ~40 ms per small DIMSE message; turn it off."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _assoc_socket(assoc: Any) -> socket.socket | None:
    dul_sock = getattr(getattr(assoc, "dul", None), "socket", None)
    return getattr(dul_sock, "socket", None)


_throttle = LogThrottle(10.0)


def _warn_throttled(key: str, message: str, *args: Any) -> None:
    suppressed = _throttle.allow(key)
    if suppressed is None:
        return
    if suppressed:
        message += f" ({suppressed} more like this in the last {_throttle.interval_s:g} s)"
    log.warning(message, *args)


def read_exact(sock: socket.socket, n: int, deadline: float,
               restore_timeout: float | None) -> tuple[bytearray, bool]:
    """Read ``n`` bytes or fewer if the peer closes or ``deadline`` passes.

    Returns the bytes and whether the deadline passed. pynetdicom's own read blocks
    without limit and in 4 KiB steps; this one is bounded in time and reads in large
    steps into one preallocated buffer (``n`` is checked by the caller beforehand).
    """
    buf = bytearray(n)
    got = 0
    timed_out = False
    with memoryview(buf) as view:
        try:
            while got < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                sock.settimeout(remaining)
                k = sock.recv_into(view[got:], min(n - got, 1 << 20))
                if not k:
                    break
                got += k
        except TimeoutError:
            timed_out = True
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(restore_timeout)
    if got < n:
        del buf[got:]
    return buf, timed_out


def _send_and_close(sock: socket.socket, data: bytes, linger_s: float = 1.0) -> None:
    """Send a last PDU (RJ or A-ABORT), let the peer read it and close, then close.

    The upper layer's state 13 (PS3.8 9.2): after an A-ASSOCIATE-RJ or A-ABORT the
    acceptor waits, for at most the ARTIM time, for the *requestor* to close the
    connection. Closing at once could reset the connection and destroy the PDU before
    the peer has read it; half-closing first let a peer see the end of the stream before
    it had decoded the RJ and report an abort instead of the rejection.
    """
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
        deadline = time.monotonic() + linger_s
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(4096):
                break
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()


class GuardedSocket(AssociationSocket):
    """The association's socket: every PDU is checked before pynetdicom decodes it.

    pynetdicom's DUL reads a PDU as ``recv(6)`` then ``recv(length)``; this override
    sees the header first, so an oversized or unknown PDU is refused before its body is
    read, and the body must arrive before a deadline. On a violation it sends A-ABORT,
    shuts the connection and hands pynetdicom a short read, which its state machine
    treats as a closed transport. The A-ASSOCIATE-RQ already read by the server is
    served first from ``prefix``.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, prefix: bytes,
                 limits: ConnectionLimits, address: str) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._prefix = prefix
        self._prefix_pos = 0
        self._limits = limits
        self._address = address
        self._at_boundary = True
        self._pdu_type = 0
        self._deadline = 0.0
        self._tracker = MessageTracker()
        self.violation: str | None = None

    @property
    def ready(self) -> bool:
        if self._prefix_pos < len(self._prefix):
            return True
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        if self._prefix_pos < len(self._prefix):
            start = self._prefix_pos
            self._prefix_pos = min(len(self._prefix), start + nr_bytes)
            return bytearray(self._prefix[start:self._prefix_pos])
        sock = self.socket
        if sock is None or self.violation is not None:
            return bytearray()
        limits = self._limits
        if self._at_boundary:
            self._deadline = time.monotonic() + limits.pdu_timeout_s
        data, timed_out = read_exact(sock, nr_bytes, self._deadline, limits.network_timeout_s)
        if len(data) < nr_bytes:
            if timed_out:
                self._abort(PduViolation(f"PDU not complete within {limits.pdu_timeout_s:g} s",
                                         ABORT_REASON_NOT_SPECIFIED))
            return data
        try:
            if self._at_boundary and nr_bytes == PDU_HEADER:
                header = check_header(data, max_pdu_size=limits.max_pdu_size)
                self._pdu_type = header.pdu_type
                self._at_boundary = False
            else:
                self._at_boundary = True
                if self._pdu_type == P_DATA_TF:
                    self._tracker.feed(data, self.assoc._accepted_cx)
        except PduViolation as violation:
            self._abort(violation)
            return bytearray()
        return data

    def _abort(self, violation: PduViolation) -> None:
        self.violation = violation.reason
        _warn_throttled(f"abort:{self._address}:{violation.abort_reason}",
                        "aborting association from %s: %s",
                        self._address, violation.reason)
        sock = self.socket
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.sendall(abort_pdu(violation.abort_reason))
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError, ValueError):
            sock.shutdown(socket.SHUT_RDWR)


def _discard_unfinished(assoc: Association) -> None:
    """Remove spool temp files of C-STOREs that never reached the handler.

    An aborted association leaves its half-received data set (and any complete one
    still queued) in a temp file whose descriptor nobody would ever close.
    """
    message = assoc.dimse.message
    temp = getattr(message, "_data_set_file", None)
    if isinstance(temp, SpoolTempFile):
        temp.discard()
    while True:
        try:
            _, primitive = assoc.dimse.msg_queue.get_nowait()
        except queue.Empty:
            return
        temp = getattr(primitive, "_dataset_file", None)
        if isinstance(temp, SpoolTempFile):
            temp.discard()


class _Handoff(NamedTuple):
    sock: socket.socket
    prefix: bytes
    release: Callable[[], None]


class GuardedAssociation(Association):
    """An acceptor Association that gives its slot back and cleans up when it ends."""

    on_end: Callable[[], None] | None = None
    thread_cleanup: Callable[[], None] | None = None

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            _discard_unfinished(self)
            if self.thread_cleanup is not None:
                self.thread_cleanup()
            if self.on_end is not None:
                self.on_end()


class GuardedRequestHandler(RequestHandler):
    """Builds the Association around a connection the server has already vetted.

    Mirrors pynetdicom's ``RequestHandler._create_association`` with two changes: the
    socket is a ``GuardedSocket`` primed with the A-ASSOCIATE-RQ, and the Association
    releases its admission slot when its thread ends.
    """

    server: GuardedServer

    def handle(self) -> None:
        handoff: _Handoff = self.request
        try:
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:
            handoff.release()
            raise

    def _create_association(self) -> Association:
        handoff: _Handoff = self.request
        server = self.server
        assoc = GuardedAssociation(self.ae, MODE_ACCEPTOR)
        assoc.on_end = handoff.release
        assoc.thread_cleanup = server.thread_cleanup
        assoc._server = server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        sock = GuardedSocket(assoc, handoff.sock, handoff.prefix, server.limits,
                             str(self.client_address[0]))
        assoc.set_socket(sock)
        # the request is already here; what remains of the ACSE timeout is the ARTIM
        # wait after a rejection or abort
        assoc.acse_timeout = server.limits.associate_timeout_s
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event in server._handlers:
            if event.is_intervention and server._handlers[event]:
                assoc.bind(event, *server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])  # type: ignore[index]
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's server with admission control in front of every Association.

    The accept thread only accepts and counts (``Admission.admit``); the TLS handshake
    and the wait for the A-ASSOCIATE-RQ happen on the connection's own thread, under
    ``associate_timeout_s``. Called and calling AE titles are checked from the raw
    request, and the association limit is enforced with A-ASSOCIATE-RJ "local limit
    exceeded", all before pynetdicom spends two threads on the connection.
    """

    # the kernel's accept queue: when a flood fills it, a legitimate caller's SYN is
    # dropped and retried only after 1 s, then 3 s, before the node can even see it
    # (capped by net.core.somaxconn, 4096 on current kernels)
    request_queue_size = 1024
    daemon_threads = True
    block_on_close = False

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: Any,
                 ssl_context: ssl.SSLContext | None = None,
                 evt_handlers: list[Any] | None = None, *, settings: Settings,
                 tls_context: ssl.SSLContext | None = None,
                 thread_cleanup: Callable[[], None] | None = None,
                 events: NodeEvents = NO_EVENTS) -> None:
        self.settings = settings
        self.events = events
        # run on each association's thread as it ends (closes its ledger connection,
        # which would otherwise stay open until the garbage collector finds it)
        self.thread_cleanup = thread_cleanup
        self.limits = ConnectionLimits.from_settings(settings.node)
        self.admission = Admission(self.limits, settings.security.host_allowed)
        self.tls_context = tls_context
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers,
                         request_handler=GuardedRequestHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        ticket = self.admission.admit(address, request)
        if ticket is None:
            _warn_throttled(f"pending:{address}", "connection from %s refused: too many "
                            "connections from it (or its pool) have not associated yet",
                            address)
            self.events.association_rejected("", address, "pending-limit")
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve_connection,
                                  args=(request, client_address, ticket),
                                  name=f"dicomnode-connection-{address}", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            self.admission.leave(ticket)
            self.shutdown_request(request)

    def shutdown(self) -> None:
        super().shutdown()
        self.admission.close_pending()

    def _serve_connection(self, sock: socket.socket, client_address: Any,
                          ticket: PendingTicket) -> None:
        handed = False
        try:
            handed = self._pre_associate(sock, client_address, ticket)
        except Exception:
            log.exception("connection from %s failed before association", ticket.address)
        finally:
            self.admission.leave(ticket)
            if not handed:
                with contextlib.suppress(OSError):
                    ticket.sock.close()

    def _pre_associate(self, sock: socket.socket, client_address: Any,
                       ticket: PendingTicket) -> bool:
        """Returns True once the connection belongs to a pynetdicom Association."""
        address = ticket.address
        limits = self.limits
        deadline = ticket.accepted_at + limits.associate_timeout_s
        set_nodelay(sock)
        if self.tls_context is not None:
            def adopt(tls: ssl.SSLSocket) -> None:
                ticket.sock = tls

            try:
                sock = handshake(sock, self.tls_context, deadline, adopt)
            except TlsHandshakeFailed as exc:
                _warn_throttled(f"tls:{address}:{exc.reason}", "TLS with %s failed: %s", address,
                                exc.reason)
                return False
        header, timed_out = read_exact(sock, PDU_HEADER, deadline, None)
        if len(header) == PDU_HEADER:
            try:
                parsed = check_header(header, max_pdu_size=limits.max_pdu_size, first=True)
            except PduViolation as violation:
                _warn_throttled(f"abort:{address}", "aborting connection from %s: %s",
                                address, violation.reason)
                _send_and_close(sock, abort_pdu(violation.abort_reason))
                return False
            body, timed_out = read_exact(sock, parsed.length, deadline, None)
        else:
            body = bytearray()
        if len(header) < PDU_HEADER or len(body) < parsed.length:
            if timed_out:
                _warn_throttled(f"silent:{address}", "connection from %s closed: no complete "
                                "A-ASSOCIATE-RQ within %g s", address, limits.associate_timeout_s)
            return False
        pdu = bytes(header + body)
        called, calling = associate_rq_titles(pdu)
        if called != self.settings.node.ae_title:
            _warn_throttled(f"called:{address}", "rejected association from %r (%s): called "
                            "AE %r is not ours", calling, address, called)
            _send_and_close(sock, reject_pdu(*REJECT_CALLED_AE))
            self.events.association_rejected(calling, address, "called-ae")
            return False
        if not self.settings.security.caller_allowed(calling, address):
            _warn_throttled(f"calling:{address}", "rejected association from %r (%s): not "
                            "on the allow-list", calling, address)
            _send_and_close(sock, reject_pdu(*REJECT_CALLING_AE))
            self.events.association_rejected(calling, address, "calling-ae")
            return False
        if not self.admission.reserve_association():
            _warn_throttled("limit", "refused association from %r (%s): %d associations "
                            "already (local limit)", calling, address,
                            limits.max_associations)
            _send_and_close(sock, reject_pdu(*REJECT_LOCAL_LIMIT))
            self.events.association_rejected(calling, address, "local-limit")
            return False
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self.admission.release_association()

        try:
            sock.settimeout(limits.network_timeout_s)
            self.finish_request(_Handoff(sock, pdu, release), client_address)  # type: ignore[arg-type]
        except BaseException:
            release()
            raise
        return True


class StoreSCP:
    """Owns the listening AE; each association runs on its own pynetdicom thread."""

    def __init__(self, settings: Settings, spool: Spool, ledger: Ledger,
                 on_stored: Callable[[], None] | None = None,
                 events: NodeEvents = NO_EVENTS) -> None:
        configure_pynetdicom()
        self.settings = settings
        self.events = events
        self.spool = spool
        self.ledger = ledger
        self.on_stored = on_stored
        self.keywords = routing_keywords(settings.routes)
        self.header_tags = header_tags(self.keywords)
        node = settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_size
        # GuardedServer enforces the limit (with reserved room for allowed callers);
        # pynetdicom's own count includes threads that are still winding down.
        ae.maximum_associations = 2 * node.max_associations
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = node.associate_timeout_s
        ae.dimse_timeout = node.network_timeout_s
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:3])
        self.ae = ae
        tls = settings.security.tls
        self.tls_context = server_context(tls) if tls is not None else None
        self._server: GuardedServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._observed_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        server = self.ae.make_server(
            (self.settings.node.host, self.settings.node.port), evt_handlers=handlers,
            server_class=GuardedServer, settings=self.settings,
            tls_context=self.tls_context, thread_cleanup=self._association_ended,
            events=self.events)
        assert isinstance(server, GuardedServer)
        self.ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="dicomnode-accept", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d%s", self.settings.node.ae_title,
                 self.settings.node.host, self.port, " (TLS)" if self.tls_context else "")

    @property
    def admission(self) -> Admission:
        if self._server is None:
            raise RuntimeError("not started")
        return self._server.admission

    def stop(self) -> None:
        """Stop accepting; associations in progress finish their current message."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- association control -----------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        setattr(event.assoc, _SPOOL_ATTR, self.spool)
        set_nodelay(_assoc_socket(event.assoc))

    def _on_requested(self, event: evt.Event) -> None:
        """AE titles again (GuardedServer checked them on the raw request), then the
        User Identity, which needs the decoded request."""
        assoc = event.assoc
        rq: Any = assoc.requestor.primitive
        called = str(rq.called_ae_title).strip()
        calling = str(rq.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if called != self.settings.node.ae_title:
            self._reject(assoc, REJECT_CALLED_AE)
            log.warning("rejected association from %r (%s): called AE %r is not ours",
                        calling, address, called)
        elif not self.settings.security.caller_allowed(calling, address):
            self._reject(assoc, REJECT_CALLING_AE)
            log.warning("rejected association from %r (%s): not on the allow-list",
                        calling, address)
        elif (why := self._identity_problem(assoc, calling)) is not None:
            self._reject(assoc, REJECT_USER_IDENTITY)
            log.warning("rejected association from %r (%s): %s", calling, address, why)
            self.events.association_rejected(calling, address, "user-identity")

    def _on_accepted(self, event: evt.Event) -> None:
        self.events.association_accepted(event.assoc, str(event.assoc.requestor.ae_title)
                                         .strip(), str(event.assoc.requestor.address))

    def _association_ended(self) -> None:
        """On the association's own thread as it ends."""
        self.ledger.close()
        self.events.association_closed(threading.current_thread())

    def _observed_store(self, event: evt.Event) -> int | Dataset:
        started = time.monotonic()
        status = self.handle_store(event)
        self.events.store_answered(event.assoc, int(status) if isinstance(status, int)
                                   else int(status.Status), time.monotonic() - started)
        return status

    def _identity_problem(self, assoc: Any, calling: str) -> str | None:
        """Why the caller's User Identity is not acceptable (never quoting it), or None."""
        policy = self.settings.security.user_identity
        if policy is None:
            return None
        item = assoc.requestor.user_identity
        if item is None:
            return "no user identity presented" if policy.required else None
        if not policy.verify(calling, item.user_identity_type, item.primary_field or b"",
                             item.secondary_field or b""):
            return f"user identity (type {item.user_identity_type}) did not verify"
        return None

    @staticmethod
    def _reject(assoc: Any, rsd: tuple[int, int, int]) -> None:
        assoc.acse.send_reject(*rsd)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    # -- storage -----------------------------------------------------------------------

    def handle_store(self, event: evt.Event) -> int | Dataset:
        req: Any = event.request
        temp = getattr(req, "_dataset_file", None)
        # the AE that sends: on a C-GET (dicomnode.net.qr) the node requested the
        # association and the PACS stores on it, so the sender is the acceptor
        sender = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
        calling = str(sender.ae_title).strip()
        if not isinstance(temp, SpoolTempFile):
            log.error("C-STORE without a spool temp file; refusing")
            return int(Status.PROCESSING_FAILURE)
        if temp.error is not None:
            err = temp.error
            temp.discard()
            if isinstance(err, SpoolFull | InstanceTooLarge):
                log.error("store refused, out of resources: %s", err)
                return int(Status.OUT_OF_RESOURCES)
            log.error("store failed while writing: %s", err)
            return int(Status.PROCESSING_FAILURE)
        try:
            header = read_instance(temp.path, affected_sop_class=req.AffectedSOPClassUID,
                                   affected_sop_instance=req.AffectedSOPInstanceUID,
                                   keep=self.header_tags)
        except DatasetRejected as rej:
            temp.discard()
            log.warning("store from %s rejected: %s", calling, rej.reason)
            return int(REJECTION_STATUS.get(rej.kind, Status.CANNOT_UNDERSTAND))
        try:
            stored = self.spool.commit(temp)
        except SpoolFull as exc:
            log.error("store refused, disk full: %s", exc)
            return int(Status.OUT_OF_RESOURCES)
        record = build_record(header, stored, self.ledger, calling, self.keywords)
        try:
            outcome = self.ledger.record_instance(record)
        except LEDGER_UNAVAILABLE as exc:
            log.error("ledger write failed, refusing the instance: %s", exc)
            if stored.created:  # unrecorded bytes would be an orphan nobody knows of
                with contextlib.suppress(OSError):
                    self.spool.path(stored.relpath).unlink()
            full = "full" in str(exc).lower()
            return int(Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE)
        log.debug("stored %s (%s, %d bytes, %s) from %s", stored.sha256[:12],
                  record.modality, stored.size, outcome.kind, calling)
        if outcome.kind == "replaced":
            log.warning("instance %s re-sent with different content: new version kept, "
                        "previous kept as %s", stored.sha256[:12], outcome.previous_path)
        self.events.instance_stored(event.assoc, record, outcome.kind)
        if self.on_stored is not None:
            self.on_stored()
        return int(Status.SUCCESS)
