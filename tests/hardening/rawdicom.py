"""A hand-written DICOM upper-layer peer for hostile tests.

Independent of pynetdicom on purpose: it builds PDUs byte by byte (PS3.8 9.3) so tests
can send exactly what a well-behaved library never would, and it reads the node's
answers without trusting them. Also: the node process's resource figures from /proc.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def _ae(value: str) -> bytes:
    return value.encode("ascii")[:16].ljust(16, b" ")


def user_identity_item(id_type: int, primary: bytes, secondary: bytes = b"",
                       positive_response: bool = False) -> bytes:
    value = (struct.pack(">BBH", id_type, int(positive_response), len(primary)) + primary
             + struct.pack(">H", len(secondary)) + secondary)
    return _item(0x58, value)


def associate_rq(contexts: list[tuple[int, str, list[str]]], *, calling: str = "TESTSCU",
                 called: str = "DICOMNODE", max_pdu: int = 16384,
                 extra_user_items: bytes = b"") -> bytes:
    """A-ASSOCIATE-RQ with (context id, abstract syntax, transfer syntaxes) contexts."""
    body = _item(0x10, _uid(APP_CONTEXT))
    for cx_id, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        body += _item(0x20, bytes([cx_id, 0, 0, 0]) + sub)
    user = (_item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _uid("1.2.3.4"))
            + extra_user_items)
    body += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    payload = fixed + body
    return struct.pack(">BBL", 0x01, 0, len(payload)) + payload


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    payload = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(payload)) + payload


RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", group, elem, len(value)) + value


def command_set(fields: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_element(0, e, v) for e, v in fields)
    return _element(0, 0x0000, struct.pack("<L", len(body))) + body


def echo_rq(message_id: int = 1, dataset_type: int = 0x0101) -> bytes:
    return command_set([(0x0002, _uid(VERIFICATION)), (0x0100, struct.pack("<H", 0x0030)),
                        (0x0110, struct.pack("<H", message_id)),
                        (0x0800, struct.pack("<H", dataset_type))])


def store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set([(0x0002, _uid(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
                        (0x0110, struct.pack("<H", message_id)),
                        (0x0700, struct.pack("<H", 0)), (0x0800, struct.pack("<H", 0)),
                        (0x1000, _uid(sop_instance))])


def find_rq(message_id: int = 1) -> bytes:
    return command_set([(0x0002, _uid("1.2.840.10008.5.1.4.1.2.2.1")),
                        (0x0100, struct.pack("<H", 0x0020)),
                        (0x0110, struct.pack("<H", message_id)),
                        (0x0700, struct.pack("<H", 0)), (0x0800, struct.pack("<H", 0))])


@dataclass
class Pdu:
    pdu_type: int
    body: bytes

    @property
    def reject(self) -> tuple[int, int, int]:
        assert self.pdu_type == 0x03, f"not an A-ASSOCIATE-RJ: 0x{self.pdu_type:02X}"
        return self.body[1], self.body[2], self.body[3]

    @property
    def abort(self) -> tuple[int, int]:
        assert self.pdu_type == 0x07, f"not an A-ABORT: 0x{self.pdu_type:02X}"
        return self.body[2], self.body[3]

    def accepted_contexts(self) -> dict[int, int]:
        """context id -> result (0 accepted) from an A-ASSOCIATE-AC."""
        assert self.pdu_type == 0x02
        pos, out = 68, {}
        while pos + 4 <= len(self.body):
            item_type, _, length = struct.unpack_from(">BBH", self.body, pos)
            if item_type == 0x21:
                out[self.body[pos + 4]] = self.body[pos + 6]
            pos += 4 + length
        return out

    def status(self) -> int:
        """Status (0000,0900) of a DIMSE response carried whole in this P-DATA-TF."""
        assert self.pdu_type == 0x04, f"not a P-DATA-TF: 0x{self.pdu_type:02X}"
        pos = 6  # first PDV's command bytes start after length(4), context(1), control(1)
        data = self.body[pos:]
        i = 0
        while i + 8 <= len(data):
            group, elem, length = struct.unpack_from("<HHL", data, i)
            if (group, elem) == (0, 0x0900):
                return int(struct.unpack_from("<H", data, i + 8)[0])
            i += 8 + length
        raise AssertionError("no Status in the response")


class Closed(Exception):
    """The node closed the connection (EOF or reset) without a PDU."""


class RawPeer:
    """A TCP connection speaking raw PDUs, optionally from a chosen loopback address."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 10.0,
                 sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            if source != "127.0.0.1":
                sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError as exc:
                raise Closed("reset") from exc
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def read_pdu(self) -> Pdu:
        pdu_type, _, length = struct.unpack(">BBL", self._exact(6))
        return Pdu(pdu_type, self._exact(length))

    def associate(self, contexts: list[tuple[int, str, list[str]]] | None = None,
                  **kwargs: object) -> Pdu:
        self.send(associate_rq(contexts or [(1, VERIFICATION, [IMPLICIT_LE])],
                               **kwargs))  # type: ignore[arg-type]
        return self.read_pdu()

    def echo(self, context_id: int = 1) -> int:
        self.send(p_data(pdv(context_id, 0x03, echo_rq())))
        return self.read_pdu().status()

    def wait_closed(self, timeout: float) -> float:
        """Seconds until the node closes the connection (after any PDUs it sends)."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError, OSError):
            while self.sock.recv(65536):
                pass
            return time.monotonic() - start
        raise AssertionError(f"connection still open after {timeout:g} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def raw_peer(port: int, **kwargs: object) -> Iterator[RawPeer]:
    peer = RawPeer(port, **kwargs)  # type: ignore[arg-type]
    try:
        yield peer
    finally:
        peer.close()


# A long-lived thread (the scheduler's pool of up to 10, the job runner, the main
# thread) keeps one ledger connection (database and WAL: 2 descriptors) once it has
# used the ledger; those appear as the node warms up and are bounded.
MAX_LEDGER_FDS = 2 * 14


@dataclass(frozen=True)
class ProcessFigures:
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int  # everything but the ledger's own files
    ledger_fds: int


def process_figures(pid: int) -> ProcessFigures:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    fds = ledger = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if "ledger.sqlite3" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                ledger += 1
            else:
                fds += 1
    return ProcessFigures(rss_kib=int(fields["VmRSS"].split()[0]),
                          hwm_kib=int(fields["VmHWM"].split()[0]),
                          threads=int(fields["Threads"]), fds=fds, ledger_fds=ledger)


def back_to_baseline(pid: int, baseline: ProcessFigures, timeout: float = 20.0,
                     slack_threads: int = 0, slack_fds: int = 0) -> ProcessFigures:
    """Poll until threads and descriptors are back to the baseline (associations wind
    down), and the ledger's descriptors within their bound."""
    deadline = time.monotonic() + timeout
    while True:
        now = process_figures(pid)
        if (now.threads <= baseline.threads + slack_threads
                and now.fds <= baseline.fds + slack_fds and now.ledger_fds <= MAX_LEDGER_FDS):
            return now
        if time.monotonic() > deadline:
            targets = sorted(os.readlink(f"/proc/{pid}/fd/{fd}")
                             for fd in os.listdir(f"/proc/{pid}/fd"))
            raise AssertionError(f"not back to baseline after {timeout:g} s: {baseline} -> "
                                 f"{now}; open: {targets}")
        time.sleep(0.1)
