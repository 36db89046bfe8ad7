"""CVE-2019-11687: files the node writes have a zeroed preamble, and ``dicomnode send``
flags an input file whose preamble is an executable."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.peers import PYDICOM_FILES, REPO, NodeProcess

PREAMBLES = {"pe.dcm": b"MZ\x90\x00" + b"\x01" * 124, "elf.dcm": b"\x7fELF" + b"\x02" * 124,
             "clean.dcm": b"\0" * 128, "tiff.dcm": b"II*\x00" + b"\0" * 124}


def _variant(tmp_path: Path, name: str, preamble: bytes) -> tuple[Path, str]:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.preamble = preamble
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    assert path.read_bytes()[:128] == preamble
    return path, str(ds.SOPInstanceUID)


@pytest.mark.peers
def test_executable_preambles_are_flagged_and_never_stored(shared_node: NodeProcess,
                                                           tmp_path: Path) -> None:
    files = {name: _variant(tmp_path, name, pre) for name, pre in PREAMBLES.items()}
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "send",
                          *[str(p) for p, _ in files.values()], "--host", "127.0.0.1",
                          "--port", str(shared_node.port), "--called-aet", "DICOMNODE",
                          "--calling-aet", "TESTSCU"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, out.stderr
    assert any("pe.dcm" in w and "Windows executable" in w for w in warnings)
    assert any("elf.dcm" in w and "ELF executable" in w for w in warnings)
    assert "CVE-2019-11687" in warnings[0]
    with sqlite3.connect(shared_node.storage / "ledger.sqlite3") as db:
        for path, uid in files.values():
            row = db.execute("SELECT path FROM instances WHERE sop_instance_uid=?",
                             (uid,)).fetchone()
            assert row is not None, path.name
            stored = (shared_node.storage / row[0]).read_bytes()
            assert stored[:128] == b"\0" * 128 and stored[128:132] == b"DICM", path.name
