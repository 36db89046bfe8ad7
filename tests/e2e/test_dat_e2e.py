"""End to end: DaT phantoms in with storescu, SR and SC out in Orthanc, checked by dcmtk
and dicom3tools; plus durability under SIGKILL and a PACS that goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from dicomnode.phantoms.dat_spect import write_dat_study
from tests.peers import (
    NodeProcess,
    Orthanc,
    ai_results,
    free_port,
    node_config,
    orthanc_running,
    require_tool,
    start_node,
    storescu,
    wait_for,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
DAT_ROUTE = {"name": "dat-spect", "match": {"Modality": "NM",
                                            "ImageType": {"contains": ["RECON TOMO"]}},
             "pipeline": "dat_spect", "send_to": ["pacs"]}


def _truth_calls(folder: Path) -> dict[str, str]:
    """Study UID -> the phantom's true call, from each phantom's truth.json."""
    calls = {}
    for truth in folder.rglob("truth.json"):
        data = json.loads(truth.read_text())
        first = next(truth.parent.glob("*.dcm"))
        study = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
        calls[study] = str(data["call"])
    return calls


def _study_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}


def _has_running_job(node: NodeProcess) -> bool:
    return bool(node.status()["counts"]["jobs"].get("running", 0) > 0)


def _outbox_drained(node: NodeProcess, expected: int) -> bool:
    counts = node.status()["counts"]
    return bool(counts["outbox"].get("sent", 0) >= expected and
                not counts["outbox"].get("pending") and not counts["outbox"].get("sending"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc_running(tmp_path / "orthanc") as orthanc:
        yield orthanc


def _node(tmp_path: Path, orthanc_port: int, **extra: Any) -> NodeProcess:
    config = node_config(tmp_path / "var", free_port(), routes=[DAT_ROUTE],
                         destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                                "port": orthanc_port}}, extra=extra)
    return start_node(tmp_path / "node", config)


def test_dat_study_in_results_out_in_the_same_study(tmp_path: Path, pacs: Orthanc) -> None:
    dciodvfy, dsr2html, dcmj2pnm = (require_tool(t) for t in ("dciodvfy", "dsr2html",
                                                               "dcmj2pnm"))
    phantoms = tmp_path / "phantoms"
    files = write_dat_study(phantoms / "mf", n=2, seed=101)
    files += write_dat_study(phantoms / "sl", n=1, seed=202, layout="slices")
    node = _node(tmp_path, pacs.dicom_port)
    try:
        storescu(node.port, files)
        studies = _study_uids(files)
        wait_for(lambda: _outbox_drained(node, 2 * len(studies)), 240, "results confirmed")
        assert node.status()["failed_jobs"] == []
    finally:
        node.stop()
    truth = _truth_calls(phantoms)
    assert set(truth) == studies
    for study in studies:
        results = ai_results(pacs, study)
        classes = sorted(r["SOPClassUID"] for r in results)
        assert classes == [SC_CLASS, SR_CLASS], f"study {study}: {classes}"
        for r in results:
            path = tmp_path / f"{r['id']}.dcm"
            path.write_bytes(pacs.instance_file(r["id"]))
            verify = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            errors = [line for line in (verify.stdout + verify.stderr).splitlines()
                      if line.startswith("Error")]
            assert errors == [], errors
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study
            assert ds.SeriesDescription.startswith("AI ")
            if ds.SOPClassUID == SR_CLASS:
                html = subprocess.run([dsr2html, str(path)], capture_output=True, text=True,
                                      check=True).stdout
                assert "Specific binding ratio" in html and "not for diagnostic use" in html
                expected_call = truth[study]
                assert ("Abnormal" in html) == (expected_call == "reduced"), study
            else:
                png = tmp_path / f"{r['id']}.png"
                subprocess.run([dcmj2pnm, "+on", str(path), str(png)], check=True)
                assert png.stat().st_size > 1000


class _Sender:
    """Sends files one association at a time, recording which got a success status."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[Path] = set()

    def send_all(self, files: list[Path], deadline: float) -> None:
        pending = list(files)
        while pending and time.monotonic() < deadline:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.20")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE")
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            try:
                while pending and assoc.is_established:
                    rsp = assoc.send_c_store(pending[0])
                    if "Status" in rsp and rsp.Status == 0:
                        self.acked.add(pending.pop(0))
                    else:
                        break
            except (RuntimeError, OSError, ValueError):
                pass
            finally:
                if assoc.is_established:
                    assoc.release()


@pytest.mark.parametrize(("n_studies", "max_kills", "interval"), [
    (5, 6, 1.5),
    # long tier: kill every 2 s; DICOMNODE_SIGKILL_STUDIES=150 makes it ~10,000 instances
    pytest.param(int(os.environ.get("DICOMNODE_SIGKILL_STUDIES", "30")), 100000, 2.0,
                 marks=pytest.mark.slow),
])
def test_sigkill_during_ingest_and_analysis_loses_nothing_and_sends_once(
        tmp_path: Path, pacs: Orthanc, n_studies: int, max_kills: int,
        interval: float) -> None:
    phantoms = tmp_path / "phantoms"
    files = write_dat_study(phantoms, n=n_studies, seed=303, layout="slices")
    assert len(files) >= 60 * n_studies
    config = node_config(tmp_path / "var", free_port(), routes=[DAT_ROUTE],
                         destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                                "port": pacs.dicom_port}},
                         extra={"completion": {"series_quiet_s": 5.0, "study_quiet_s": 6.0}})
    node = start_node(tmp_path / "node", config)
    sender = _Sender(node.port)
    import threading

    done = threading.Event()

    def send() -> None:
        sender.send_all(files, time.monotonic() + 1800)
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    kills = 0
    try:
        while kills < max_kills and not done.is_set():  # during ingest
            time.sleep(interval + 0.5 * (kills % 3))
            node.stop(signal.SIGKILL)
            kills += 1
            node = start_node(tmp_path / "node", config)
        thread.join(1800)
        assert done.is_set() and len(sender.acked) == len(files)
        for _ in range(2):  # during analysis: kill while a job runs
            wait_for(partial(_has_running_job, node), 120, "a running job")
            node.stop(signal.SIGKILL)
            kills += 1
            node = start_node(tmp_path / "node", config)
        studies = _study_uids(files)
        wait_for(lambda: _outbox_drained(node, 2 * len(studies)), 900 + 20 * len(studies),
                 "results confirmed")
        status = node.status()
    finally:
        node.stop()
    assert kills >= 3
    storage = tmp_path / "var"
    import sqlite3

    with sqlite3.connect(storage / "ledger.sqlite3") as c:
        stored = {r[0]: r[1] for r in c.execute("SELECT sop_instance_uid, path FROM instances")}
        jobs = c.execute("SELECT subject_uid, count(*) FROM jobs GROUP BY subject_uid, route"
                         ).fetchall()
    for f in sender.acked:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert uid in stored, "an acknowledged instance is missing from the ledger"
        assert (storage / stored[uid]).is_file()
    assert list((storage / "tmp").iterdir()) == []
    import hashlib

    for f in (storage / "objects").rglob("*.dcm"):
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.stem, "partial file in spool"
    assert all(n == 1 for _, n in jobs), "a series was analysed more than once"
    assert status["failed_jobs"] == [] and status["dead_letters"] == []
    for study in studies:
        classes = sorted(r["SOPClassUID"] for r in ai_results(pacs, study))
        assert classes == [SC_CLASS, SR_CLASS], "results not delivered exactly once"


def test_pacs_down_then_back_gets_every_result_once(tmp_path: Path) -> None:
    phantoms = tmp_path / "phantoms"
    files = write_dat_study(phantoms, n=2, seed=404)
    orthanc_dir = tmp_path / "orthanc"
    with orthanc_running(orthanc_dir) as first:
        port, http = first.dicom_port, first.http_port
    node = _node(tmp_path, port)
    try:
        storescu(node.port, files)
        wait_for(lambda: node.log_text().count("retry in") >= 6, 180,
                 "several failed sends while the PACS is down")
        with orthanc_running(orthanc_dir, extra={"DicomPort": port, "HttpPort": http}
                             ) as again:
            assert again.dicom_port == port
            wait_for(lambda: _outbox_drained(node, 4), 120, "results delivered after recovery")
            for study in _study_uids(files):
                classes = sorted(r["SOPClassUID"] for r in ai_results(again, study))
                assert classes == [SC_CLASS, SR_CLASS]
    finally:
        node.stop()
