"""Path traversal through every peer-supplied string: nothing is written outside the spool.

UIDs made of "..", "." and slashes, AE titles with "../", patient, study and series
fields that read as paths: the node names every file after a hash of its bytes, so none
of these strings can choose where a file goes. Invalid UIDs are refused (0xC002); the
others are stored under hashed names, and nothing appears anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from tests.hardening.nodes import associate_for_storage, dataset_bytes, hardened_node, store_raw
from tests.hardening.rawdicom import raw_peer
from tests.peers import PYDICOM_FILES

EVIL_AE = "../../EVILAE"
PATHS = ("../../../../tmp/dicomnode-evil", "/etc/passwd", "..", ".", "..\\..\\evil",
         "%2e%2e%2fevil")
EVIL_UIDS = ("..", ".", "../1.2.3", "1.2.3/../../4", "/1.2.3", "1.2.3/..")


def _snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _planted(tmp: Path, name: str, **changes: object) -> bytes:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp / name
    ds.save_as(path, enforce_file_format=True)
    return dataset_bytes(path)


@pytest.mark.parametrize("ae", [EVIL_AE])
def test_no_peer_string_chooses_a_path(tmp_path: Path, ae: str) -> None:
    work = tmp_path / "node"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    callers = [{"ae_title": ae, "host": "127.0.0.1"}]
    with hardened_node(work, callers=callers) as node:
        storage = node.storage.resolve()
        outside_before = _snapshot(tmp_path) - _snapshot(storage)
        statuses: dict[str, int] = {}
        with raw_peer(node.port) as peer:
            cx = associate_for_storage(peer, calling=ae)
            for i, value in enumerate(PATHS):  # path-like patient, study and series fields
                data = _planted(scratch, f"fields{i}.dcm", PatientID=value, PatientName=value,
                                StudyDescription=value, SeriesDescription=value,
                                AccessionNumber=value[:16], InstitutionName=value)
                uid = str(pydicom.dcmread(scratch / f"fields{i}.dcm",
                                          stop_before_pixels=True).SOPInstanceUID)
                statuses[f"fields {value}"] = store_raw(peer, cx, uid, data)
            for i, value in enumerate(EVIL_UIDS):
                for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                    data = _planted(scratch, f"uid{i}{keyword}.dcm", **{keyword: value})
                    sop = value if keyword == "SOPInstanceUID" else str(pydicom.dcmread(
                        scratch / f"uid{i}{keyword}.dcm", stop_before_pixels=True
                    ).SOPInstanceUID)
                    statuses[f"{keyword} {value}"] = store_raw(peer, cx, sop, data)
        node_status = node.status()
        log = node.log_text()
    print(statuses)
    # path-like free-text fields are only data: stored, under hashed names
    assert all(statuses[f"fields {v}"] == 0 for v in PATHS)
    # UIDs that are not UIDs are refused as such
    assert all(s == 0xC002 for k, s in statuses.items() if not k.startswith("fields")), statuses
    assert node_status["counts"]["instances"] == {"stored": len(PATHS)}
    # nothing new outside the node's own working folder ...
    outside_after = _snapshot(tmp_path) - _snapshot(storage)
    new_outside = {p for p in outside_after - outside_before
                   if work.resolve() not in p.resolve().parents and p.resolve() != work.resolve()
                   and scratch not in p.parents}
    assert new_outside == set()
    assert not Path("/tmp/dicomnode-evil").exists()
    # ... and inside the spool, only hash-named objects and the node's own files
    for p in storage.rglob("*"):
        assert ".." not in p.relative_to(storage).parts
        assert not p.is_symlink()
        for bad in ("evil", "EVIL", "passwd", "%2e"):
            assert bad not in str(p.relative_to(storage)), p
    objects = [p for p in (storage / "objects").rglob("*") if p.is_file()]
    assert len(objects) == len(PATHS)
    for p in objects:
        assert len(p.stem) == 64 and all(c in "0123456789abcdef" for c in p.stem), p.name
        assert p.parent.name == p.stem[:2]
        assert oct(os.stat(p).st_mode & 0o777) in ("0o600", "0o640", "0o400", "0o440"), \
            oct(os.stat(p).st_mode)
    assert "passwd" not in log
