"""Start-up reconciliation of spool files the ledger lost (ingest/reconcile.py)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset

from dicomnode.ingest.ledger import Ledger
from dicomnode.ingest.reconcile import (
    MARKER,
    mark_running,
    mark_stopped,
    reconcile,
    unclean_since,
)
from dicomnode.ingest.spool import Spool
from tests.peers import PYDICOM_FILES


def _instance(sop: str, description: str, sender: str | None = "MODALITY") -> bytes:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = sop
    ds.SeriesDescription = description
    meta = FileMetaDataset(ds.file_meta)
    meta.MediaStorageSOPInstanceUID = sop
    if sender is not None:
        meta.SendingApplicationEntityTitle = sender
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# the previous run's start: a minute ago (spool directories were just written)
SINCE = time.time() - 60


def _store(spool: Spool, data: bytes, mtime: float) -> Path:
    stored = spool.write_bytes(data, area="objects")
    path = spool.root / stored.relpath
    os.utime(path, (mtime, mtime))
    return path


def test_unknown_files_are_indexed_oldest_first_with_their_sender(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    old = _store(spool, _instance("1.2.826.0.1.1", "first version"), SINCE)
    new = _store(spool, _instance("1.2.826.0.1.1", "second version"), SINCE + 5)
    other = _store(spool, _instance("1.2.826.0.1.2", "x", sender=None), SINCE + 1)
    report = reconcile(spool, ledger, SINCE, ["SeriesDescription"])
    assert (report.scanned, report.indexed, report.mismatched) == (3, 3, 0)
    conn = ledger._conn()
    current = conn.execute("SELECT sha256, calling_ae FROM instances "
                           "WHERE sop_instance_uid='1.2.826.0.1.1'").fetchone()
    assert current == (new.stem, "MODALITY"), "the newer re-send is the current version"
    assert conn.execute("SELECT sha256 FROM instance_versions").fetchone() == (old.stem,)
    assert conn.execute("SELECT calling_ae FROM instances WHERE sha256=?",
                        (other.stem,)).fetchone() == ("",)
    # a second pass finds nothing new
    assert reconcile(spool, ledger, SINCE, ["SeriesDescription"]).indexed == 0


def test_old_files_are_not_scanned_and_damaged_files_are_kept_not_indexed(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _store(spool, _instance("1.2.826.0.1.3", "long ago"), SINCE - 30 * 86400)
    damaged = _store(spool, _instance("1.2.826.0.1.4", "recent"), SINCE)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    os.utime(damaged, (SINCE, SINCE))
    report = reconcile(spool, ledger, SINCE, [])
    assert (report.scanned, report.indexed, report.mismatched) == (1, 0, 1)
    assert damaged.exists(), "damaged bytes are kept for a person to look at"
    assert not ledger.has_instance("1.2.826.0.1.4")
    assert not ledger.has_instance("1.2.826.0.1.3")


def test_run_marker_tells_a_crash_from_a_clean_stop(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assert unclean_since(tmp_path) is None
    mark_running(tmp_path, now=1234.5)
    assert unclean_since(tmp_path) == 1234.5  # as a crashed run leaves it
    mark_stopped(tmp_path, ledger)
    assert unclean_since(tmp_path) is None
    (tmp_path / MARKER).write_text("garbage")
    assert unclean_since(tmp_path) == 0.0, "an unreadable marker reconciles everything"
