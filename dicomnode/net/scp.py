"""The node's DICOM listener: C-ECHO and C-STORE for every storage SOP class.

The C-STORE handler does only: check the received bytes, fsync, rename, record, answer.
Bytes are streamed by pynetdicom straight into a spool temp file (its chunked-receive
mode), so a 1 GB instance never sits in memory, and the file on disk holds the dataset
exactly as it came over the wire.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import pynetdicom
import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import Settings
from dicomnode.ingest.completion import expected_instances
from dicomnode.ingest.ledger import InstanceRecord, Ledger
from dicomnode.ingest.parse import DatasetRejected, header_tags, read_instance
from dicomnode.ingest.spool import InstanceTooLarge, Spool, SpoolFull, SpoolTempFile
from dicomnode.net.status import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECTION_STATUS,
    Status,
)
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


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii", "replace")[:64]
    return raw + b"\0" if len(raw) % 2 else raw


def encode_file_meta(meta: _FileMeta) -> bytes:
    """Group 2 for a received instance, encoded directly (explicit VR little endian).

    Building a pydicom FileMetaDataset and running its writer cost more per instance
    than the fsyncs; the seven elements are simple enough to write by hand.
    """
    version = IMPLEMENTATION_VERSION.encode()
    body = b"".join([
        _element(2, 0x0001, b"OB", b"\x00\x01"),
        _element(2, 0x0002, b"UI", _ui(meta.sop_class_uid)),
        _element(2, 0x0003, b"UI", _ui(meta.sop_instance_uid)),
        _element(2, 0x0010, b"UI", _ui(meta.transfer_syntax)),
        _element(2, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _element(2, 0x0013, b"SH", version + b" " * (len(version) % 2)),
    ])
    return _element(2, 0x0000, b"UL", struct.pack("<L", len(body))) + body
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
            if isinstance(getattr(getattr(threading.current_thread(), "assoc", None),
                                  _SPOOL_ATTR, None), Spool):
                return _FileMeta(str(kwargs["sop_class_uid"]), str(kwargs["sop_instance_uid"]),
                                 str(kwargs["transfer_syntax"]))
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


class StoreSCP:
    """Owns the listening AE; each association runs on its own pynetdicom thread."""

    def __init__(self, settings: Settings, spool: Spool, ledger: Ledger,
                 on_stored: Callable[[], None] | None = None) -> None:
        configure_pynetdicom()
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.on_stored = on_stored
        self.keywords = routing_keywords(settings.routes)
        self.header_tags = header_tags(self.keywords)
        node = settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_size
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = 30
        ae.dimse_timeout = node.network_timeout_s
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:3])
        self.ae = ae
        self._server: Any = None

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
            (evt.EVT_C_STORE, self.handle_store),
        ]
        self._server = self.ae.start_server(
            (self.settings.node.host, self.settings.node.port), block=False,
            evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.settings.node.ae_title,
                 self.settings.node.host, self.port)

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
        assoc = event.assoc
        rq: Any = assoc.requestor.primitive
        called = str(rq.called_ae_title).strip()
        calling = str(rq.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if called != self.settings.node.ae_title:
            self._reject(assoc, REJECT_CALLED_AE)
            log.warning("rejected association from %s (%s): called AE %r is not ours",
                        calling, address, called)
        elif not self.settings.security.caller_allowed(calling, address):
            self._reject(assoc, REJECT_CALLING_AE)
            log.warning("rejected association from %s (%s): not on the allow-list",
                        calling, address)

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
        calling = str(event.assoc.requestor.ae_title).strip()
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
        ds = header.attrs
        patient = f"{ds.get('PatientID', '')}|{ds.get('IssuerOfPatientID', '')}"
        accession = str(ds.get("AccessionNumber", "") or "")
        expected, expected_by = expected_instances(ds)
        record = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_uid=header.study_instance_uid,
            series_uid=header.series_instance_uid,
            patient_key=self.ledger.hash_identifier(patient),
            accession_key=self.ledger.hash_identifier(accession) if accession else None,
            modality=str(ds.get("Modality", "") or "") or None,
            path=stored.relpath,
            sha256=stored.sha256,
            size=stored.size,
            transfer_syntax=header.transfer_syntax_uid,
            calling_ae=calling,
            attrs={k: ds[k] for k in self.keywords if k in ds},
            expected_count=expected,
            expected_by=expected_by,
        )
        try:
            outcome = self.ledger.record_instance(record)
        except sqlite3.OperationalError as exc:
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
        if self.on_stored is not None:
            self.on_stored()
        return int(Status.SUCCESS)
