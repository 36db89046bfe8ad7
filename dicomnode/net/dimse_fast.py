"""The C-STORE response, encoded directly instead of through a pydicom Dataset.

pynetdicom turns every response primitive into a pydicom ``Dataset`` (one element per
command keyword, each value validated on assignment), computes the group length by
encoding it, and encodes it again to send it: about 0.7 ms of one core per received
instance, as much as the node's own parse of the instance. A C-STORE-RSP is six
implicit-VR little-endian elements of group 0000 (PS3.7 9.3.1.2), so the common case,
a status with no error comment or offending element, is written here by hand; anything
else (and anyone who asks the message for its ``command_set``) goes through pynetdicom's
own encoder. ``tests/unit/core/test_dimse_fast.py`` checks the two give the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from pynetdicom import dimse as _dimse
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_LAST_COMMAND_FRAGMENT = b"\x03"  # message control header: command, last fragment


def _uid(value: Any) -> bytes | None:
    if value is None:
        return None
    raw = str(value).encode("ascii")
    if not raw or len(raw) > 64 or raw.strip(b"0123456789.") != b"":
        return None
    return raw + b"\0" if len(raw) % 2 else raw


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def encode_store_rsp(primitive: C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE-RSP, or None when it needs the general path
    (an error comment, an offending element, or a value this encoder does not check)."""
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    if (not isinstance(message_id, int) or not 0 <= message_id <= 0xFFFF
            or not isinstance(status, int) or not 0 <= status <= 0xFFFF):
        return None
    elements = []
    for elem, uid in ((0x0002, primitive.AffectedSOPClassUID),
                      (0x1000, primitive.AffectedSOPInstanceUID)):
        if uid is not None:
            raw = _uid(uid)
            if raw is None:
                return None
            elements.append((elem, raw))
    elements += [(0x0100, struct.pack("<H", _C_STORE_RSP)),
                 (0x0120, struct.pack("<H", message_id)),
                 (0x0800, struct.pack("<H", _NO_DATA_SET)),
                 (0x0900, struct.pack("<H", status))]
    body = b"".join(_element(elem, value) for elem, value in sorted(elements))
    return _element(0x0000, struct.pack("<L", len(body))) + body


class FastStoreRsp(C_STORE_RSP):
    """pynetdicom's C-STORE-RSP message with the direct encoding when it applies."""

    def __init__(self) -> None:  # no pydicom Dataset until someone asks for one
        self.context_id: int | None = None
        self._primitive: C_STORE | None = None
        self._encoded: bytes | None = None
        self._general: C_STORE_RSP | None = None

    def _general_message(self) -> C_STORE_RSP:
        if self._general is None:
            message = C_STORE_RSP()
            if self._primitive is not None:
                message.primitive_to_message(self._primitive)
            message.context_id = self.context_id
            self._general = message
        return self._general

    def __getattr__(self, name: str) -> Any:
        # command_set, data_set and the rest, for any code that inspects the message
        if name.startswith("__") or name in ("_general", "_primitive", "_encoded"):
            raise AttributeError(name)
        return getattr(self._general_message(), name)

    def primitive_to_message(self, primitive: Any) -> None:
        self._primitive = primitive
        self._general = None
        self._encoded = encode_store_rsp(primitive) if isinstance(primitive, C_STORE) else None

    def encode_msg(self, context_id: int, max_pdu_length: int) -> Iterator[P_DATA]:
        self.context_id = context_id
        encoded = self._encoded
        if encoded is None or (max_pdu_length and len(encoded) > max_pdu_length - 6):
            yield from self._general_message().encode_msg(context_id, max_pdu_length)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append(
            (context_id, _LAST_COMMAND_FRAGMENT + encoded))
        yield pdata


_installed = False


def install() -> None:
    """Idempotent: pynetdicom's DIMSE provider builds C-STORE responses with FastStoreRsp."""
    global _installed
    if _installed:
        return
    table: dict[Any, Any] = _dimse._RSP_TO_MESSAGE
    table[C_STORE] = FastStoreRsp
    _installed = True
