"""A full disk: 0xA700 for what could not be written, never success; space freed, re-sent
instances succeed. The spool lives on a small tmpfs mounted by the test."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.peers import PYDICOM_FILES, free_port, in_ci, node_config, start_node


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _instances(tmp_path: Path, n: int) -> list[Path]:
    template = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    out = []
    for i in range(n):
        ds = template.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows = ds.Columns = 512
        ds.PixelData = os.urandom(512 * 512 * 2)  # incompressible, ~0.5 MB
        path = tmp_path / f"ct{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _send(port: int, files: list[Path]) -> dict[Path, int]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = {}
    try:
        for f in files:
            statuses[f] = int(assoc.send_c_store(pydicom.dcmread(f)).Status)
    finally:
        assoc.release()
    return statuses


def test_disk_full_answers_a700_and_recovers(tmp_path: Path) -> None:
    files = _instances(tmp_path, 12)
    with tmpfs(tmp_path / "small", "10m") as mnt:
        config = node_config(mnt / "var", free_port())
        config["completion"] = {"series_quiet_s": 600, "study_quiet_s": 600}
        node = start_node(tmp_path / "node", config)
        try:
            filler = mnt / "filler"
            filler.write_bytes(b"\0" * (7 * 1024 * 1024))
            first = _send(node.port, files)
            ok = [f for f, s in first.items() if s == 0]
            full = [f for f, s in first.items() if s == 0xA700]
            assert ok and full, first
            assert len(ok) + len(full) == len(files), "only success or 0xA700 expected"
            stored = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                      for f in ok}
            assert node.status()["counts"]["instances"]["stored"] == len(stored)
            assert list((mnt / "var" / "tmp").iterdir()) == []
            objects = list((mnt / "var" / "objects").rglob("*.dcm"))
            assert len(objects) == len(ok), "a refused instance left a file behind"
            filler.unlink()
            second = _send(node.port, full)
            assert set(second.values()) == {0}
            assert node.status()["counts"]["instances"]["stored"] == len(files)
            assert node.proc.poll() is None
        finally:
            node.stop()
            assert "Traceback" not in node.log_text()
