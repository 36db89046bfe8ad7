"""Hostile data sets written byte by byte (explicit VR little endian).

pydicom itself cannot build some of these (it recurses per nesting level) and should
not have to: the node must cope with bytes nobody's library would produce.
"""

from __future__ import annotations

import struct
import zlib

import pydicom

from tests.hardening.rawdicom import CT_IMAGE

_LONG = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"}


def element(tag: int, vr: bytes, value: bytes, *, undefined: bool = False) -> bytes:
    if vr not in (b"OB", b"OW", b"UN", b"SQ") and len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG:
        length = 0xFFFFFFFF if undefined else len(value)
        return struct.pack("<HH2sHL", group, elem, vr, 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def identity(sop_instance: str, *, patient_name: str = "ANON^HOSTILE",
             patient_id: str = "HOSTILE") -> bytes:
    return b"".join([
        element(0x00080016, b"UI", CT_IMAGE.encode()),
        element(0x00080018, b"UI", sop_instance.encode()),
        element(0x00080060, b"CS", b"CT"),
        element(0x00100010, b"PN", patient_name.encode()),
        element(0x00100020, b"LO", patient_id.encode()),
        element(0x0020000D, b"UI", pydicom.uid.generate_uid().encode()),
        element(0x0020000E, b"UI", pydicom.uid.generate_uid().encode()),
    ])


def nested_sequences(sop_instance: str, depth: int, **names: str) -> bytes:
    """``depth`` sequences, each an undefined-length item holding the next."""
    item_start = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    seq_head = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    inner = element(0x0040A160, b"UT", names.get("patient_name", "deep").encode())
    return (identity(sop_instance, **names) + (seq_head + item_start) * depth + inner
            + (item_end + seq_end) * depth)


def absurd_image(sop_instance: str) -> bytes:
    """Rows x Columns x Frames x Bits declaring ~800 TB over 16 bytes of pixel data."""
    return identity(sop_instance) + b"".join([
        element(0x00280002, b"US", struct.pack("<H", 1)),
        element(0x00280008, b"IS", b"99999"),
        element(0x00280010, b"US", struct.pack("<H", 65535)),
        element(0x00280011, b"US", struct.pack("<H", 65535)),
        element(0x00280100, b"US", struct.pack("<H", 16)),
        element(0x7FE00010, b"OW", b"\0" * 16),
    ])


def deflate_bomb(sop_instance: str, inflated_bytes: int = 1 << 30) -> bytes:
    """A deflated data set (raw deflate, PS3.5 A.5) that inflates to ``inflated_bytes``.

    One MiB of zeros is compressed once after a full flush (which makes the segment
    independent of what came before) and repeated, so building it costs milliseconds.
    """
    head = identity(sop_instance) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0,
                                                inflated_bytes)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = packer.compress(head) + packer.flush(zlib.Z_FULL_FLUSH)
    segment = packer.compress(b"\0" * (1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    bomb = start + segment * (inflated_bytes >> 20) + packer.flush()
    assert len(zlib.decompressobj(-15).decompress(bomb, 1 << 16)) == 1 << 16
    return bomb
