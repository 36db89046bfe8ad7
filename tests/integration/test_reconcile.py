"""After an unclean stop the node re-indexes spool files its ledger lost.

A C-STORE success needs the spool file fsynced (file and directory) and the ledger row
committed, but the ledger's WAL is fsynced only by the next state transition. A power
loss can therefore drop the last ledger commits, never the files. The test reproduces
that state exactly: a consistent copy of the ledger taken after the first batch stands
in for what survived, the node is SIGKILLed after the second batch (its run marker stays),
and the restarted node must know every acknowledged instance again, with the AE title it
came from (the file meta's Sending AE Title), which routing rules may test.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.peers import (
    PYDICOM_FILES,
    free_port,
    node_config,
    start_node,
    storescu,
    wait_for,
)


def _series(out: Path, n: int, study: str) -> list[Path]:
    template = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    series = generate_uid()
    paths = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _rows(ledger: Path) -> dict[str, str]:
    with sqlite3.connect(f"{ledger.as_uri()}?mode=ro", uri=True) as c:
        return {str(uid): str(ae) for uid, ae in
                c.execute("SELECT sop_instance_uid, calling_ae FROM instances")}


def test_power_loss_after_ack_loses_no_instance(tmp_path: Path) -> None:
    port = free_port()
    config = node_config(tmp_path / "var", port, callers=[
        {"ae_title": "STORESCU", "host": "127.0.0.1"},
        {"ae_title": "TESTSCU", "host": "127.0.0.1"}])
    config["completion"] = {"series_quiet_s": 600, "study_quiet_s": 600}
    storage = tmp_path / "var"
    ledger = storage / "ledger.sqlite3"
    study = generate_uid()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _series(tmp_path / "a", 4, study)
    second = _series(tmp_path / "b", 6, study)

    node = start_node(tmp_path / "n1", config)
    storescu(port, first, aet="STORESCU")
    survived = tmp_path / "survived.sqlite3"
    with sqlite3.connect(ledger) as src, sqlite3.connect(survived) as dst:
        src.backup(dst)  # what a power loss right now would leave of the ledger
    storescu(port, second, aet="TESTSCU")
    assert node.stop(signal.SIGKILL) != 0
    assert (storage / "node.running").exists(), "the run marker must outlive a crash"
    assert len(_rows(ledger)) == 10

    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    survived.replace(ledger)
    lost = _rows(ledger)
    assert len(lost) == 4, "the stand-in for the power loss must have lost batch two"

    node = start_node(tmp_path / "n2", config)
    try:
        wait_for(lambda: "re-indexed" in node.log_text(), 30, "reconciliation at start-up")
        rows = _rows(ledger)
        sent = {p.stem: ae for ps, ae in ((first, "STORESCU"), (second, "TESTSCU"))
                for p in ps}
        assert rows == sent, "every acknowledged instance is known again, with its sender"
        assert "6 re-indexed" in node.log_text()
        counts = node.status()["counts"]
        assert counts["instances"]["stored"] == 10
    finally:
        assert node.stop() == 0
    # a clean stop leaves no marker, so the next start does not reconcile
    assert not (storage / "node.running").exists()
    node = start_node(tmp_path / "n3", config)
    try:
        wait_for(lambda: node.status()["counts"]["instances"]["stored"] == 10, 30, "restart")
        assert "unclean stop" not in node.log_text()
    finally:
        node.stop()
