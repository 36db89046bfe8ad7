"""Outgoing DICOM: C-STORE of files, with every response status checked.

Files are sent as they are stored (no decode/re-encode): each file's own transfer
syntax is proposed, with explicit and implicit little endian as alternatives for
uncompressed data.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.net.scp import _assoc_socket, configure_pynetdicom, set_nodelay
from dicomnode.net.status import category

log = logging.getLogger(__name__)

_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class AssociationFailed(Exception):
    """The peer could not be reached, rejected us, or aborted."""


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # None: not sent (association lost before a response)
    error: str | None = None

    @property
    def category(self) -> str:
        return "failure" if self.status is None else category(self.status)


def _file_identity(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _nodelay(event: evt.Event) -> None:
    set_nodelay(_assoc_socket(event.assoc))


class RejectionWatch:
    """Whether the peer answered the association request with an A-ASSOCIATE-RJ, read
    from the PDU as it arrives rather than from ``Association.is_rejected``.

    pynetdicom 3.0 can report a prompt rejection as an abort: the requesting thread
    sends the A-ASSOCIATE-RQ, then checks that the transport is still connected before
    it waits for the answer (``ACSE._negotiate_as_requestor``); if the DUL thread has
    meanwhile received the RJ and closed the connection (as PS3.8 says it must), the
    check fails and the association is aborted, with the RJ left unread in its queue.
    A busy machine makes that likely (13 of 60 ``dicomnode send`` runs to a wrong called
    AE, with four spinning processes on 2 cores). The RJ PDU event fires on the DUL
    thread before the close, so it is always seen.
    """

    def __init__(self) -> None:
        self.pdu: A_ASSOCIATE_RJ | None = None

    @property
    def handler(self) -> tuple[Any, Any]:
        return (evt.EVT_PDU_RECV, self._on_pdu)

    def _on_pdu(self, event: evt.Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.pdu = pdu

    def reason(self, assoc: Any) -> str | None:
        """``"<result>: <reason>"`` when the peer rejected the request, else None. Call
        it once the request is answered: it unbinds the handler, which would otherwise
        run for every PDU of an established association."""
        assoc.unbind(*self.handler)
        if self.pdu is None:
            return "no reason received" if assoc.is_rejected else None
        try:
            return f"{self.pdu.result_str.lower()}: {self.pdu.reason_str.lower()}"
        except ValueError:  # a value PS3.8 does not define
            return (f"result {self.pdu.result}, source {self.pdu.source}, "
                    f"reason {self.pdu.reason_diagnostic}")


class StoreClient:
    """One association to one peer, reused for a batch of files."""

    def __init__(self, *, host: str, port: int, called_aet: str, calling_aet: str,
                 timeout_s: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: a context from ``dicomnode.net.tls.client_context`` for DICOM TLS;
        the peer's certificate is checked against ``host`` when the context says so."""
        configure_pynetdicom()
        self.host = host
        self.port = port
        self.called_aet = called_aet
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.tls = tls

    def echo(self) -> int | None:
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(Verification)
        assoc = self._associate(ae)
        try:
            rsp = assoc.send_c_echo()
            return int(rsp.Status) if "Status" in rsp else None
        finally:
            assoc.release()

    def _associate(self, ae: AE) -> Any:
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        connected: list[bool] = []

        def on_open(event: evt.Event) -> None:
            connected.append(True)
            _nodelay(event)

        tls_args = (self.tls, self.host) if self.tls is not None else None
        rejection = RejectionWatch()
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open), rejection.handler],
                             tls_args=tls_args)
        rejected = rejection.reason(assoc)
        if not assoc.is_established:
            if not connected and self.tls is not None:
                why = "could not be reached, or the TLS handshake failed"
            elif not connected:
                why = "could not be reached (no TCP connection)"
            elif rejected is not None:
                why = f"rejected the association ({rejected})"
            elif assoc.is_aborted:
                why = "aborted the association"
            else:
                why = "did not answer the association request"
            raise AssociationFailed(
                f"{self.called_aet}@{self.host}:{self.port} {why}")
        return assoc

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        """Send each file; a failure of one file does not stop the others."""
        identities = [_file_identity(p) for p in paths]
        ae = AE(ae_title=self.calling_aet)
        wanted: dict[str, set[str]] = {}
        for sop_class, ts in identities:
            wanted.setdefault(sop_class, set()).add(ts)
        for sop_class, syntaxes in wanted.items():
            for ts in sorted(syntaxes):
                if UID(ts).is_compressed:
                    ae.add_requested_context(sop_class, [ts])
            if any(not UID(ts).is_compressed for ts in syntaxes):
                ae.add_requested_context(sop_class, [*_UNCOMPRESSED, "1.2.840.10008.1.2.2"])
        if len(ae.requested_contexts) > 128:
            raise ValueError("too many SOP class/transfer syntax combinations for one "
                             "association; send fewer files at a time")
        assoc = self._associate(ae)
        results: list[SendResult] = []
        try:
            for path in paths:
                if not assoc.is_established:
                    results.append(SendResult(path, None, "association lost"))
                    continue
                try:
                    rsp = assoc.send_c_store(dcmread(path))
                except (ValueError, RuntimeError, OSError) as exc:
                    results.append(SendResult(path, None, str(exc)))
                    continue
                status = int(rsp.Status) if "Status" in rsp else None
                comment = str(rsp.get("ErrorComment", "") or "") or None
                results.append(SendResult(path, status, comment if status else None))
        finally:
            if assoc.is_established:
                assoc.release()
        return results


def send_files(paths: Iterable[Path], *, host: str, port: int, called_aet: str,
               calling_aet: str = "DICOMNODE", batch: int = 64,
               tls: ssl.SSLContext | None = None) -> list[SendResult]:
    files = list(paths)
    client = StoreClient(host=host, port=port, called_aet=called_aet, calling_aet=calling_aet,
                         tls=tls)
    results: list[SendResult] = []
    for i in range(0, len(files), batch):
        results.extend(client.send(files[i:i + batch]))
    return results
