"""A 1 GB instance streams to disk: the node's memory does not grow with it."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.peers import PYDICOM_FILES, NodeProcess, free_port, node_config, start_node, storescu

GIB = 1024**3


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def write_big_instance(path: Path, frames: int) -> str:
    """A multi-frame secondary capture of ``frames`` 512x512 16-bit frames, written in
    chunks so the test itself never holds the pixel data in memory."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "LARGE^INSTANCE"
    ds.PatientID = "LARGE-1"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (512 * 512 * 2 // 256)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(frame) * frames))
        for _ in range(frames):
            f.write(frame)
    return str(ds.SOPInstanceUID)


def test_one_gigabyte_instance_raises_rss_by_less_than_100_mb(tmp_path: Path) -> None:
    big = tmp_path / "big.dcm"
    sop_uid = write_big_instance(big, frames=GIB // (512 * 512 * 2))
    assert big.stat().st_size > GIB
    node: NodeProcess = start_node(tmp_path / "node", node_config(tmp_path / "var", free_port()))
    try:
        storescu(node.port, [PYDICOM_FILES / "CT_small.dcm"])  # warm up every code path
        baseline = _peak_rss_kib(node.proc.pid)
        storescu(node.port, [big], extra=["--max-pdu", "131072"])
        peak = _peak_rss_kib(node.proc.pid)
        stored = node.status()["counts"]["instances"]["stored"]
    finally:
        node.stop()
    growth_mib = (peak - baseline) / 1024
    print(f"peak RSS {baseline / 1024:.0f} MiB -> {peak / 1024:.0f} MiB "
          f"(+{growth_mib:.1f} MiB) for a {big.stat().st_size / GIB:.2f} GiB instance")
    assert growth_mib < 100
    assert stored == 2
    stored_files = [p for p in (tmp_path / "var" / "objects").rglob("*.dcm")
                    if p.stat().st_size > GIB]
    assert len(stored_files) == 1
    digest = hashlib.sha256()
    with stored_files[0].open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert digest.hexdigest() == stored_files[0].stem
    header = pydicom.dcmread(stored_files[0], stop_before_pixels=True)
    assert header.SOPInstanceUID == sop_uid
