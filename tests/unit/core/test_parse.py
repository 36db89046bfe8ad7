from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.ingest.parse import MAX_SEQUENCE_DEPTH, DatasetRejected, read_instance
from tests.peers import PYDICOM_DATA, PYDICOM_FILES

GOOD = [PYDICOM_FILES / n for n in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm",
                                     "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
                                     "MR_small_implicit.dcm", "JPEG-lossy.dcm")] + [
    PYDICOM_DATA / n for n in ("RG1_UNCI.dcm", "JPEG2000_UNC.dcm", "emri_small_RLE.dcm",
                                     "emri_small_jpeg_ls_lossless.dcm")]


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_real_files_are_accepted(path: Path) -> None:
    header = read_instance(path)
    assert header.sop_instance_uid == str(pydicom.dcmread(path).SOPInstanceUID)


def test_truncated_pixel_data_is_rejected(tmp_path: Path) -> None:
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    for cut in (len(data) - 1, len(data) - 3000, 1500):
        bad = tmp_path / f"cut{cut}.dcm"
        bad.write_bytes(data[:cut])
        with pytest.raises(DatasetRejected):
            read_instance(bad)


def test_pydicoms_truncated_examples_are_rejected() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(DatasetRejected):
            read_instance(PYDICOM_FILES / name)


def _minimal(tmp_path: Path, name: str, **attrs: object) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_identity_must_match_the_command(tmp_path: Path) -> None:
    path = _minimal(tmp_path, "a.dcm")
    ds = pydicom.dcmread(path)
    with pytest.raises(DatasetRejected) as info:
        read_instance(path, affected_sop_instance="1.2.3", affected_sop_class=ds.SOPClassUID)
    assert info.value.kind == "uid_mismatch"
    with pytest.raises(DatasetRejected) as info:
        read_instance(path, affected_sop_instance=ds.SOPInstanceUID, affected_sop_class="1.2.3")
    assert info.value.kind == "class_mismatch"


@pytest.mark.parametrize("uid", ["../../etc/passwd", "..", ".", "1.2.3/..", "1..2", "",
                                 "1.2." + "3" * 70])
def test_path_like_or_invalid_uids_are_rejected(tmp_path: Path, uid: str) -> None:
    path = _minimal(tmp_path, "b.dcm", SeriesInstanceUID=uid)
    with pytest.raises(DatasetRejected) as info:
        read_instance(path)
    assert info.value.kind == "invalid_uid"


def test_deep_nesting_is_rejected_without_recursion_error(tmp_path: Path) -> None:
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(MAX_SEQUENCE_DEPTH + 5):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    path = _minimal(tmp_path, "deep.dcm", ContentSequence=inner.ContentSequence)
    with pytest.raises(DatasetRejected, match="nested"):
        read_instance(path)


def test_declared_size_beyond_the_data_is_rejected(tmp_path: Path) -> None:
    path = _minimal(tmp_path, "px.dcm", Rows=4096, Columns=4096, BitsAllocated=16,
                    BitsStored=16, HighBit=15, PixelRepresentation=0, SamplesPerPixel=1,
                    PhotometricInterpretation="MONOCHROME2", NumberOfFrames=1000)
    ds = pydicom.dcmread(path)
    ds.PixelData = b"\0" * 64
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DatasetRejected, match="declare"):
        read_instance(path)


def test_length_running_past_the_end_is_rejected(tmp_path: Path) -> None:
    path = _minimal(tmp_path, "len.dcm")
    data = path.read_bytes()
    # append an OB element that claims 1 GB but carries 4 bytes
    data += struct.pack("<HH2sHL", 0x0009, 0x0010, b"OB", 0, 1 << 30) + b"abcd"
    path.write_bytes(data)
    with pytest.raises(DatasetRejected, match="past the end"):
        read_instance(path)
