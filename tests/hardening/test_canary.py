"""Canary scan: patient names and IDs planted in studies never appear in the node's log.

The node runs at DEBUG, and the canaries travel in accepted instances and in every kind
of rejected or aborted one, since error paths are where values tend to leak.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.hardening.datasets import identity, nested_sequences
from tests.hardening.nodes import associate_for_storage, hardened_node, store_raw
from tests.hardening.rawdicom import CT_IMAGE, Closed, p_data, pdv, raw_peer, store_rq
from tests.peers import PYDICOM_FILES, REPO, NodeProcess, storescu

NAME = "CANARYFAMILY^CANARYGIVEN"
PATIENT_ID = "CANARYID4711"
ACCESSION = "CANARYACC0815"
CANARIES = ("CANARYFAMILY", "CANARYGIVEN", PATIENT_ID, ACCESSION)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with hardened_node(tmp_path_factory.mktemp("canary"),
                       extra={"logging": {"level": "DEBUG"}}) as proc:
        yield proc


def _planted(tmp_path: Path, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset(path: Path) -> tuple[str, bytes]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    offset = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return str(ds.SOPInstanceUID), path.read_bytes()[offset:]


def test_canaries_never_reach_the_log(node: NodeProcess, tmp_path: Path) -> None:
    good = _planted(tmp_path, "good.dcm")
    storescu(node.port, [good])  # accepted
    statuses: dict[str, int | str] = {}
    with raw_peer(node.port) as peer:
        cx = associate_for_storage(peer)
        uid, data = _dataset(_planted(tmp_path, "mismatch.dcm"))
        statuses["uid mismatch"] = store_raw(peer, cx, pydicom.uid.generate_uid(), data)
        statuses["truncated"] = store_raw(peer, cx, uid, data[:-700])
        bad_uid = _planted(tmp_path, "baduid.dcm", SeriesInstanceUID="../" + PATIENT_ID)
        statuses["invalid uid"] = store_raw(peer, cx, *_dataset(bad_uid))
        deep_uid = pydicom.uid.generate_uid()
        statuses["nested"] = store_raw(peer, cx, deep_uid, nested_sequences(
            deep_uid, 40, patient_name=NAME, patient_id=PATIENT_ID))
        odd = identity(deep_uid, **{"patient_name": NAME, "patient_id": PATIENT_ID})
        statuses["class mismatch"] = store_raw(peer, cx, deep_uid, odd,
                                               sop_class="1.2.840.10008.5.1.4.1.1.4")
    with raw_peer(node.port) as peer:  # aborted in the middle of a planted data set
        cx = associate_for_storage(peer)
        peer.send(p_data(pdv(cx, 0x03, store_rq(CT_IMAGE, uid))))
        peer.send(p_data(pdv(cx, 0x00, data[:8000])))
        peer.send(struct.pack(">BBL", 0x04, 0, 1 << 30))
        try:
            statuses["aborted"] = hex(peer.read_pdu().pdu_type)
        except Closed:
            statuses["aborted"] = "closed"
    with raw_peer(node.port) as peer:  # a caller that is not allowed
        statuses["unknown caller"] = str(peer.associate(calling="INTRUDER").reject)
    cli = subprocess.run([sys.executable, "-m", "dicomnode.cli", "send", str(good),
                          "--host", "127.0.0.1", "--port", str(node.port),
                          "--called-aet", "WRONG"], capture_output=True, text=True, cwd=REPO)
    print(statuses)
    assert statuses["uid mismatch"] == 0xC003 and statuses["truncated"] == 0xC001
    assert statuses["invalid uid"] == 0xC002 and statuses["nested"] == 0xC001
    assert statuses["class mismatch"] == 0xA900 and statuses["aborted"] == "0x7"
    assert cli.returncode == 1
    text = node.log_text()
    assert "DEBUG" in text  # the scan is only worth something at the most verbose level
    for canary in CANARIES:
        assert canary not in text, f"{canary} leaked into the log"
        assert canary not in cli.stdout + cli.stderr
        assert not any(canary in p.name for p in node.storage.rglob("*"))
