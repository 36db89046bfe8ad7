"""Checks a received file before it is acknowledged: structure first, then meaning.

pydicom tolerates truncation silently (a file cut in the middle of its pixel data reads
back with shorter pixel data and no warning), so acknowledging on the strength of a
``dcmread`` would acknowledge a broken instance. The walker below follows every element
length to the end of the file without reading values (a 1 GB instance costs a few
seeks), rejects lengths that run past the end, and bounds nesting depth so a crafted
file cannot exhaust the stack of whoever reads it later.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

MAX_SEQUENCE_DEPTH = 32
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_EXPLICIT_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD


class DatasetRejected(Exception):
    """The file cannot be accepted; ``reason`` says why in terms safe to log (no values)."""

    def __init__(self, reason: str, *, kind: str = "cannot_understand") -> None:
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


@dataclass(frozen=True)
class InstanceHeader:
    """What ingest needs to know about an instance, read once at receive time."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    dataset: Dataset  # header only, pixel data not loaded


class _Walker:
    def __init__(self, fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
        self.fp = fp
        self.size = size
        self.implicit = implicit
        self.endian = "<" if little else ">"
        self.pixel_length: int | None = None

    def _read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise DatasetRejected("dataset truncated inside an element header")
        return data

    def _tag(self) -> int:
        group, elem = struct.unpack(self.endian + "HH", self._read(4))
        return int(group << 16 | elem)

    def _skip(self, length: int) -> None:
        pos = self.fp.tell()
        if pos + length > self.size:
            raise DatasetRejected(
                f"element length {length} runs past the end of the data ({self.size - pos} left)")
        self.fp.seek(pos + length)

    def walk_dataset(self, end: int | None, depth: int) -> None:
        """Walk elements until ``end`` (byte offset), an item delimiter (end None), or EOF."""
        while True:
            pos = self.fp.tell()
            if end is not None and pos >= end:
                if pos > end:
                    raise DatasetRejected("an element runs past the end of its item")
                return
            if end is None and depth == 0 and pos == self.size:
                return
            tag = self._tag()
            if tag == _ITEM_END:
                self._read(4)
                if depth == 0 or end is not None:
                    raise DatasetRejected("unexpected item delimiter")
                return
            vr, length = self._vr_length(tag)
            if tag == _SEQ_END or tag == _ITEM:
                raise DatasetRejected("unexpected sequence delimiter or item")
            if length == _UNDEFINED:
                if tag == 0x7FE00010:
                    self._walk_fragments()
                elif vr == b"UN":
                    # PS3.5 6.2.2: an undefined-length UN is a sequence in implicit VR LE
                    saved = (self.implicit, self.endian)
                    self.implicit, self.endian = True, "<"
                    self._walk_sequence(None, depth + 1)
                    self.implicit, self.endian = saved
                else:
                    self._walk_sequence(None, depth + 1)
            elif vr == b"SQ" or (self.implicit and self._is_sequence(tag) and length > 0):
                self._walk_sequence(self.fp.tell() + length, depth + 1)
            else:
                if tag == 0x7FE00010 and depth == 0:
                    self.pixel_length = length
                self._skip(length)

    @staticmethod
    def _is_sequence(tag: int) -> bool:
        from pydicom.datadict import dictionary_VR

        try:
            return bool(dictionary_VR(tag) == "SQ")
        except KeyError:
            return False

    def _vr_length(self, tag: int) -> tuple[bytes, int]:
        if self.implicit or tag >> 16 == 0xFFFE:
            (length,) = struct.unpack(self.endian + "L", self._read(4))
            return b"", int(length)
        vr = self._read(2)
        if vr in _EXPLICIT_LONG_VRS:
            self._read(2)
            (length,) = struct.unpack(self.endian + "L", self._read(4))
        else:
            (length,) = struct.unpack(self.endian + "H", self._read(2))
        return vr, int(length)

    def _walk_sequence(self, end: int | None, depth: int) -> None:
        if depth > MAX_SEQUENCE_DEPTH:
            raise DatasetRejected(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}")
        if end is not None and end > self.size:
            raise DatasetRejected("sequence length runs past the end of the data")
        while True:
            if end is not None and self.fp.tell() >= end:
                return
            tag = self._tag()
            (length,) = struct.unpack(self.endian + "L", self._read(4))
            if tag == _SEQ_END:
                if end is not None:
                    raise DatasetRejected("sequence delimiter in a defined-length sequence")
                return
            if tag != _ITEM:
                raise DatasetRejected("sequence contains something other than items")
            if length == _UNDEFINED:
                self.walk_dataset(None, depth)
            else:
                item_end = self.fp.tell() + int(length)
                if item_end > self.size:
                    raise DatasetRejected("item length runs past the end of the data")
                self.walk_dataset(item_end, depth)

    def _walk_fragments(self) -> None:
        while True:
            tag = self._tag()
            (length,) = struct.unpack(self.endian + "L", self._read(4))
            if tag == _SEQ_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise DatasetRejected("malformed encapsulated pixel data")
            self._skip(int(length))


def _check_uid(value: object, name: str) -> str:
    text = str(value or "").strip()
    if not text or len(text) > 64 or not UID_RE.match(text):
        raise DatasetRejected(f"{name} missing or not a valid UID", kind="invalid_uid")
    return text


def _expected_native_bytes(ds: Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (rows * cols * spp * frames * bits + 7) // 8


def read_instance(path: Path, *, affected_sop_class: str | None = None,
                  affected_sop_instance: str | None = None) -> InstanceHeader:
    """Validate structure and identity of a received file; return its header.

    Raises DatasetRejected with ``kind`` one of cannot_understand, invalid_uid,
    uid_mismatch, class_mismatch.
    """
    size = path.stat().st_size
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, struct.error,
            NotImplementedError, RecursionError) as exc:
        raise DatasetRejected(f"not a readable DICOM dataset ({type(exc).__name__})") from exc
    meta = ds.file_meta
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if not ts:
        raise DatasetRejected("no transfer syntax in the file meta information")
    tsu = UID(ts)
    if tsu.is_deflated:
        raise DatasetRejected("deflated transfer syntax is not accepted")
    with path.open("rb") as fp:
        fp.seek(128 + 4)
        # group 2 is always explicit little endian; skip it using its group length
        meta_walker = _Walker(fp, size, implicit=False, little=True)
        while True:
            pos = fp.tell()
            head = fp.read(2)
            fp.seek(pos)
            if len(head) < 2 or struct.unpack("<H", head)[0] != 0x0002:
                break
            tag = meta_walker._tag()
            _, length = meta_walker._vr_length(tag)
            meta_walker._skip(length)
        walker = _Walker(fp, size, implicit=tsu.is_implicit_VR, little=tsu.is_little_endian)
        walker.walk_dataset(None, 0)
        pixel_len = walker.pixel_length

    sop_class = _check_uid(ds.get("SOPClassUID"), "SOPClassUID")
    sop_instance = _check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    study = _check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series = _check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    if affected_sop_instance is not None and sop_instance != str(affected_sop_instance).strip():
        raise DatasetRejected("SOPInstanceUID differs from the command's Affected SOP Instance UID",
                              kind="uid_mismatch")
    if affected_sop_class is not None and sop_class != str(affected_sop_class).strip():
        raise DatasetRejected("SOPClassUID differs from the command's Affected SOP Class UID",
                              kind="class_mismatch")
    if not tsu.is_compressed and "Rows" in ds:
        expected = _expected_native_bytes(ds)
        if expected is not None and pixel_len is not None and pixel_len < expected:
            raise DatasetRejected(
                f"pixel data holds {pixel_len} bytes but Rows/Columns/Frames/Bits declare "
                f"{expected}")
    return InstanceHeader(sop_class, sop_instance, study, series, ts, ds)
