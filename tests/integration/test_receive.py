"""Receiving from real peers (dcmtk storescu/dcmsend, pynetdicom) into a running node."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from tests.peers import (
    PYDICOM_DATA,
    PYDICOM_FILES,
    NodeProcess,
    dcmsend,
    free_port,
    node_config,
    start_node,
    storescu,
    wait_for,
)

UNCOMPRESSED = [PYDICOM_FILES / "CT_small.dcm", PYDICOM_FILES / "MR_small.dcm",
                PYDICOM_DATA / "RG1_UNCI.dcm", PYDICOM_DATA / "JPEG2000_UNC.dcm",
                PYDICOM_DATA / "emri_small.dcm", PYDICOM_DATA / "OBXXXX1A_expb.dcm"]
COMPRESSED = [PYDICOM_FILES / "JPEG-lossy.dcm", PYDICOM_DATA / "RG1_J2KR.dcm",
              PYDICOM_DATA / "emri_small_RLE.dcm", PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm",
              PYDICOM_DATA / "JPGLosslessP14SV1_1s_1f_8b.dcm", PYDICOM_DATA / "RG3_J2KI.dcm",
              PYDICOM_FILES / "JPEG2000.dcm"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("recv")
    config = node_config(work / "var", free_port(), routes=[
        {"name": "ct-only", "match": {"Modality": "CT"}, "pipeline": "dat_spect",
         "send_to": []}])
    proc = start_node(work, config)
    yield proc
    proc.stop()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta information: what travels on the wire."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    offset = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return path.read_bytes()[offset:]


def stored_file(node: NodeProcess, sop_uid: str) -> Path:
    with sqlite3.connect(node.storage / "ledger.sqlite3") as c:
        row = c.execute("SELECT path FROM instances WHERE sop_instance_uid=?",
                        (sop_uid,)).fetchone()
    assert row is not None, "instance not in the ledger"
    return node.storage / str(row[0])


def test_echo(node: NodeProcess) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize("compressed", [False, True])
def test_files_from_dcmtk_are_stored_and_decode_like_the_source(node: NodeProcess,
                                                                compressed: bool) -> None:
    # some files share a SOP Instance UID across variants: check each batch right away
    files = COMPRESSED if compressed else UNCOMPRESSED
    if compressed:
        dcmsend(node.port, files)
    else:
        storescu(node.port, files)
    for src in files:
        ds = pydicom.dcmread(src)
        got = pydicom.dcmread(stored_file(node, str(ds.SOPInstanceUID)))
        if src in COMPRESSED:
            assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        if got.PixelData != ds.PixelData:  # dcmtk may re-encode; then the pixels must agree
            assert (got.pixel_array == ds.pixel_array).all(), src.name


@pytest.mark.parametrize("src", UNCOMPRESSED + COMPRESSED, ids=lambda p: p.name)
def test_received_bytes_are_stored_exactly_as_sent(node: NodeProcess, src: Path) -> None:
    assert _send_raw(node, src) == 0
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    stored = stored_file(node, str(ds.SOPInstanceUID))
    assert dataset_bytes(stored) == dataset_bytes(src)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == stored.stem


def test_files_are_private_and_named_by_hash(node: NodeProcess) -> None:
    objects = list((node.storage / "objects").rglob("*.dcm"))
    assert objects
    for f in objects:
        assert f.stat().st_mode & 0o077 == 0
        assert f.stem == hashlib.sha256(f.read_bytes()).hexdigest()
        assert f.read_bytes()[:128] == b"\0" * 128  # zeroed preamble (CVE-2019-11687)


def test_resending_is_idempotent(node: NodeProcess) -> None:
    src = PYDICOM_FILES / "CT_small.dcm"
    storescu(node.port, [src])
    before = sorted((node.storage / "objects").rglob("*.dcm"))
    storescu(node.port, [src, src])
    assert sorted((node.storage / "objects").rglob("*.dcm")) == before


def test_routing_follows_the_rules(node: NodeProcess) -> None:
    wait_for(lambda: node.status()["counts"]["series"].get("open", 0) == 0, 30,
             "all series to close")
    with sqlite3.connect(node.storage / "ledger.sqlite3") as c:
        routed = {r[0] for r in c.execute("SELECT s.modality FROM jobs j JOIN series s "
                                          "ON s.series_uid=j.subject_uid")}
    assert routed == {"CT"}
    assert node.status()["unmatched_series"] >= 5


@pytest.mark.parametrize(("aet", "aec", "reason"), [
    ("INTRUDER", "DICOMNODE", "Calling AE Title Not Recognized"),
    ("STORESCU", "NOTTHENODE", "Called AE Title Not Recognized"),
])
def test_rejections_carry_the_proper_reason(node: NodeProcess, aet: str, aec: str,
                                             reason: str) -> None:
    out = storescu(node.port, [PYDICOM_FILES / "CT_small.dcm"], aet=aet, aec=aec, check=False)
    assert out.returncode != 0
    assert "Rejected Permanent" in out.stderr and reason in out.stderr


def _send_raw(node: NodeProcess, path: Path) -> int | None:
    """Send a file's bytes as they are (pynetdicom chunked mode): no re-encoding."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID,
                             [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    return int(rsp.Status) if "Status" in rsp else None


def _ct(tmp_path: Path, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in changes.items():
        setattr(ds, k, v)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bad_input_gets_a_clear_status_and_harms_nothing(node: NodeProcess,
                                                         tmp_path: Path) -> None:
    before = node.status()["counts"]["instances"]["stored"]
    good = _ct(tmp_path, "good.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-700])
    mismatch = _ct(tmp_path, "mismatch.dcm")
    ds = pydicom.dcmread(mismatch)
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()  # the command's UID
    ds.save_as(mismatch, enforce_file_format=False)
    assert pydicom.dcmread(mismatch).file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    cases = {
        truncated: 0xC001,
        mismatch: 0xC003,
        _ct(tmp_path, "trav1.dcm", SeriesInstanceUID="../../../../tmp/evil"): 0xC002,
        _ct(tmp_path, "trav2.dcm", StudyInstanceUID=".."): 0xC002,
    }
    for path, status in cases.items():
        assert _send_raw(node, path) == status, path.name
    assert _send_raw(node, good) == 0
    assert node.status()["counts"]["instances"]["stored"] == before + 1
    assert list((node.storage / "tmp").iterdir()) == []
    # nothing was written outside the spool, and no name came from a peer string
    names = [p.name for p in node.storage.rglob("*")]
    assert not any("evil" in n or ".." in n for n in names)
    assert not Path("/tmp/evil").exists()


def test_path_traversal_in_ae_titles_is_harmless(node: NodeProcess) -> None:
    for aet in ("../../etc", "..", "/tmp/x"):
        out = storescu(node.port, [PYDICOM_FILES / "CT_small.dcm"], aet=aet, check=False)
        assert "Calling AE Title Not Recognized" in out.stderr
    assert not any(".." in p.name for p in node.storage.rglob("*"))


def test_the_node_still_serves_after_all_that(node: NodeProcess) -> None:
    assert node.proc.poll() is None
    storescu(node.port, [PYDICOM_FILES / "MR_small.dcm"])


def test_no_patient_identifiers_in_the_log(node: NodeProcess) -> None:
    text = node.log_text()
    for path in UNCOMPRESSED + COMPRESSED:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in ("PatientName", "PatientID"):
            value = str(ds.get(kw, "") or "")
            if len(value) >= 4:
                assert value not in text, f"{kw} of {path.name} leaked into the log"


def test_unlisted_caller_host_is_rejected(tmp_path: Path) -> None:
    config = node_config(tmp_path / "var", free_port(),
                         callers=[{"ae_title": "STORESCU", "host": "10.9.9.9"}])
    proc = start_node(tmp_path, config)
    try:
        out = storescu(proc.port, [PYDICOM_FILES / "CT_small.dcm"], check=False)
        assert "Calling AE Title Not Recognized" in out.stderr
    finally:
        proc.stop()
    assert not list((tmp_path / "var" / "objects").rglob("*.dcm"))


def test_deflated_transfer_syntax_is_never_negotiated(node: NodeProcess) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1.99"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()


def test_dicomnode_send_is_a_working_store_client(node: NodeProcess) -> None:
    import subprocess
    import sys

    from tests.peers import REPO

    before = node.status()["counts"]["instances"]["stored"]
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "send",
                          str(PYDICOM_DATA / "US1_J2KR.dcm"), str(PYDICOM_FILES / "rtplan.dcm"),
                          "--host", "127.0.0.1", "--port", str(node.port),
                          "--called-aet", "DICOMNODE", "--calling-aet", "TESTSCU"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "sent 2/2" in out.stdout
    assert node.status()["counts"]["instances"]["stored"] == before + 2
    bad = subprocess.run([sys.executable, "-m", "dicomnode.cli", "send",
                          str(PYDICOM_FILES / "CT_small.dcm"), "--host", "127.0.0.1",
                          "--port", str(node.port), "--called-aet", "WRONG"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "rejected the association" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.fixture
def slow_requestor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold the requesting thread for a moment after it sends the A-ASSOCIATE-RQ: the
    interleaving a loaded machine produces by chance (the DUL thread reads the node's
    prompt A-ASSOCIATE-RJ and closes the connection before the requesting thread looks
    at it), made certain."""
    import time

    from pynetdicom.acse import ACSE

    send_request = ACSE.send_request

    def late(self: ACSE) -> None:
        send_request(self)
        time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_request", late)


@pytest.mark.parametrize("client", ["store", "query"])
def test_a_prompt_rejection_is_reported_as_a_rejection_with_its_reason(
        node: NodeProcess, slow_requestor: None, client: str) -> None:
    from dicomnode.net.qr import QueryClient, QueryError
    from dicomnode.net.scu import AssociationFailed, StoreClient

    error: Exception
    if client == "store":
        with pytest.raises(AssociationFailed) as store_error:
            StoreClient(host="127.0.0.1", port=node.port, called_aet="WRONG",
                        calling_aet="TESTSCU").send([PYDICOM_FILES / "CT_small.dcm"])
        error = store_error.value
    else:
        with pytest.raises(QueryError) as query_error:
            QueryClient(host="127.0.0.1", port=node.port, called_aet="WRONG",
                        calling_aet="TESTSCU").find_studies("ANY")
        error = query_error.value
    assert "rejected the association (rejected (permanent): called ae title not " \
           "recognised" in str(error)
