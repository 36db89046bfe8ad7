"""Checks on every PDU the node receives, before pynetdicom sees it.

pynetdicom reads a PDU by trusting its length field: it allocates and waits for
whatever the peer announces (a single 256 MiB P-DATA-TF is read into memory even when
16 KiB was advertised, and a peer that announces a length and then stops holds the
reading thread forever). It also assembles DIMSE messages without bounds: data
fragments sent before any command, or an endless command set, pile up in memory.

The functions here are pure (bytes in, a verdict out) so they can be tested
exhaustively with generated input; ``dicomnode.net.scp`` calls them from the socket
the association reads through, and aborts the association on the first violation.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass

from dicomnode.net.status import (
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
)

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_HEADER = 6

# An A-ASSOCIATE-RQ is not bound by the negotiated maximum (that applies to P-DATA-TF
# only). dcmtk's storescu proposing every storage class with three transfer syntaxes
# sends ~20 KiB; 128 KiB leaves room for large user identity tokens and still bounds
# what a pending connection can make the node hold.
MAX_ASSOCIATE_PDU = 128 * 1024
MIN_ASSOCIATE_PDU = 68  # protocol version .. reserved: the fixed part of -RQ/-AC
MAX_COMMAND_SET = 64 * 1024  # a C-STORE-RQ command set is ~200 bytes
# Data sets of messages other than C-STORE-RQ are kept in memory by pynetdicom.
MAX_OTHER_DATASET = 1024 * 1024

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
NO_DATASET = 0x0101
SERVED_COMMANDS = frozenset({C_STORE_RQ, C_ECHO_RQ})

_FIXED_LENGTH = {A_ASSOCIATE_RJ: 4, A_RELEASE_RQ: 4, A_RELEASE_RP: 4, A_ABORT: 4}
_U32 = struct.Struct(">L")
_HEADER = struct.Struct(">BBL")
_ELEMENT = struct.Struct("<HHL")


class PduViolation(Exception):
    """The peer broke the upper-layer protocol; the association must be aborted.

    ``reason`` is safe to log (it never quotes received values other than lengths and
    codes); ``abort_reason`` is the A-ABORT reason/diag to send (PS3.8 9.3.8).
    """

    def __init__(self, reason: str, abort_reason: int = ABORT_INVALID_PARAMETER) -> None:
        self.reason = reason
        self.abort_reason = abort_reason
        super().__init__(reason)


@dataclass(frozen=True)
class PduHeader:
    pdu_type: int
    length: int


def check_header(header: bytes | bytearray, *, max_pdu_size: int,
                 first: bool = False) -> PduHeader:
    """Validate a PDU header before a single byte of its body is read.

    ``first`` is the first PDU of a connection, which must be an A-ASSOCIATE-RQ.
    """
    if len(header) != PDU_HEADER:
        raise PduViolation(f"PDU header of {len(header)} bytes")
    pdu_type, _, length = _HEADER.unpack(header)
    if pdu_type not in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF,
                        A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
        raise PduViolation(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
    if first and pdu_type != A_ASSOCIATE_RQ:
        raise PduViolation(f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                           ABORT_UNEXPECTED_PDU)
    if pdu_type == P_DATA_TF:
        if length > max_pdu_size:
            raise PduViolation(f"P-DATA-TF of {length} bytes exceeds the advertised maximum "
                               f"of {max_pdu_size}")
        if length < 6:
            raise PduViolation(f"P-DATA-TF of {length} bytes cannot hold a PDV")
    elif pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        if not MIN_ASSOCIATE_PDU <= length <= MAX_ASSOCIATE_PDU:
            raise PduViolation(f"association PDU of {length} bytes (allowed "
                               f"{MIN_ASSOCIATE_PDU}..{MAX_ASSOCIATE_PDU})")
    elif length != _FIXED_LENGTH[pdu_type]:
        raise PduViolation(f"PDU type 0x{pdu_type:02X} with length {length}, not "
                           f"{_FIXED_LENGTH[pdu_type]}")
    return PduHeader(pdu_type, length)


def associate_rq_titles(pdu: bytes | bytearray) -> tuple[str, str]:
    """Called and calling AE titles of an A-ASSOCIATE-RQ (fixed offsets, PS3.8 9.3.2).

    Read without decoding the whole request, so an unwanted caller is turned away for
    the cost of two slices. Non-ASCII bytes become U+FFFD, never an exception.
    """
    called = bytes(pdu[10:26]).decode("ascii", "replace").strip(" \0")
    calling = bytes(pdu[26:42]).decode("ascii", "replace").strip(" \0")
    return called, calling


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    """A-ABORT (PS3.8 9.3.8); source 2 is the DICOM UL service-provider."""
    return bytes([A_ABORT, 0]) + _U32.pack(4) + bytes([0, 0, source, reason])


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return bytes([A_ASSOCIATE_RJ, 0]) + _U32.pack(4) + bytes([0, result, source, reason])


def command_fields(command: bytes | bytearray) -> tuple[int, int]:
    """CommandField and CommandDataSetType of an encoded command set (implicit VR LE).

    A walk over element headers with every length checked, so a malformed command set
    is a violation here rather than an exception deep inside pynetdicom.
    """
    pos, end = 0, len(command)
    field: int | None = None
    dataset_type: int | None = None
    while pos < end:
        if pos + 8 > end:
            raise PduViolation("command set truncated inside an element header")
        group, elem, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0x0000:
            raise PduViolation("command set holds an element outside group 0000")
        if length > end - pos:
            raise PduViolation("command set element runs past its end")
        if elem in (0x0100, 0x0800):
            if length != 2:
                raise PduViolation(f"command set element (0000,{elem:04X}) is not a US")
            (value,) = struct.unpack_from("<H", command, pos)
            if elem == 0x0100:
                field = value
            else:
                dataset_type = value
        pos += length
    if field is None or dataset_type is None:
        raise PduViolation("command set lacks CommandField or CommandDataSetType")
    return field, dataset_type


class MessageTracker:
    """Follows DIMSE message assembly across P-DATA-TF PDUs (PS3.8 Annex E, PS3.7 6.3.1).

    One per association, fed every received P-DATA-TF body in order. It enforces what
    pynetdicom assumes: each PDV fits its PDU, fragments use an accepted presentation
    context, a message's command comes before its data set and uses one context, the
    command set is bounded, only served commands are accepted, and data sets other
    than a C-STORE's (which stream to disk) are bounded.
    """

    def __init__(self, *, served: Container[int] = SERVED_COMMANDS,
                 max_command: int = MAX_COMMAND_SET,
                 max_other_dataset: int = MAX_OTHER_DATASET) -> None:
        self.served = served
        self.max_command = max_command
        self.max_other_dataset = max_other_dataset
        self._reset()

    def _reset(self) -> None:
        self.context_id: int | None = None
        self.command = bytearray()
        self.in_dataset = False
        self.is_store = False
        self.dataset_bytes = 0

    def feed(self, body: bytes | bytearray | memoryview,
             accepted_contexts: Container[int] | None = None) -> None:
        """Check one P-DATA-TF body (the bytes after its 6-byte header)."""
        view = memoryview(body)
        pos, end = 0, len(view)
        if end == 0:
            raise PduViolation("P-DATA-TF without any PDV")
        while pos < end:
            if end - pos < 6:
                raise PduViolation(f"{end - pos} trailing bytes cannot hold a PDV")
            (length,) = _U32.unpack_from(view, pos)
            if length < 2:
                raise PduViolation(f"PDV item of length {length}")
            if length > end - pos - 4:
                raise PduViolation(f"PDV item of {length} bytes is longer than the "
                                   f"{end - pos - 4} left in its PDU")
            context_id, control = view[pos + 4], view[pos + 5]
            self._fragment(context_id, control, view[pos + 6:pos + 4 + length],
                           accepted_contexts)
            pos += 4 + length

    def _fragment(self, context_id: int, control: int, data: memoryview,
                  accepted: Container[int] | None) -> None:
        if accepted is not None and context_id not in accepted:
            raise PduViolation(f"PDV on presentation context {context_id}, which was not "
                               "accepted")
        if self.context_id is not None and context_id != self.context_id:
            raise PduViolation("PDV on another presentation context in the middle of a "
                               "message")
        self.context_id = context_id
        last = bool(control & 0x02)
        if control & 0x01:
            if self.in_dataset:
                raise PduViolation("command fragment where a data set fragment was due")
            if len(self.command) + len(data) > self.max_command:
                raise PduViolation(f"command set longer than {self.max_command} bytes")
            self.command += data
            if last:
                field, dataset_type = command_fields(self.command)
                if field not in self.served:
                    raise PduViolation(f"command 0x{field:04X} is not a service this node "
                                       "offers", ABORT_UNEXPECTED_PDU)
                if dataset_type == NO_DATASET:
                    self._reset()
                else:
                    self.command = bytearray()
                    self.in_dataset = True
                    self.is_store = field == C_STORE_RQ
            return
        if not self.in_dataset:
            raise PduViolation("data set fragment without a preceding command")
        self.dataset_bytes += len(data)
        if not self.is_store and self.dataset_bytes > self.max_other_dataset:
            raise PduViolation(f"data set longer than {self.max_other_dataset} bytes for a "
                               "message other than C-STORE")
        if last:
            self._reset()
