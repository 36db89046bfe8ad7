"""Query/retrieve against Orthanc and against peers that misbehave the way PACSs do."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from dicomnode.net.qr import QueryClient, QueryError
from dicomnode.phantoms.brain_mr import write_brain_mr_growth_study
from tests.peers import (
    NodeProcess,
    Orthanc,
    free_port,
    node_config,
    orthanc_running,
    start_node,
    wait_for,
)


@pytest.fixture(scope="module")
def priors(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("priors")
    return write_brain_mr_growth_study(out, seed=11, volumes_cm3=[4.0, 6.0], matrix=64,
                                       n_slices=12)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("qrnode")
    proc = start_node(work, node_config(work / "var", free_port()))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, node: NodeProcess,
         priors: list[Path]) -> Iterator[Orthanc]:
    work = tmp_path_factory.mktemp("qrpacs")
    with orthanc_running(work, modalities={
            "dicomnode": ["DICOMNODE", "127.0.0.1", node.port]}) as orthanc:
        for f in priors:
            orthanc.upload(f)
        yield orthanc


def _client(pacs: Orthanc, **kwargs: Any) -> QueryClient:
    return QueryClient(host="127.0.0.1", port=pacs.dicom_port, called_aet=pacs.aet,
                       calling_aet="DICOMNODE", **kwargs)


def _stored_in_study(node: NodeProcess, study_uid: str) -> int:
    with sqlite3.connect(node.storage / "ledger.sqlite3") as c:
        return int(c.execute("SELECT count(*) FROM instances WHERE study_uid=?",
                             (study_uid,)).fetchone()[0])


def test_find_the_patients_studies_and_move_them_to_the_node(
        pacs: Orthanc, node: NodeProcess, priors: list[Path]) -> None:
    patient_id = str(pydicom.dcmread(priors[0], stop_before_pixels=True).PatientID)
    studies = _client(pacs).find_studies(patient_id)
    assert len(studies) == 2
    for study in studies:
        expected = int(study.NumberOfStudyRelatedInstances)
        assert expected > 0
        result = _client(pacs).move("DICOMNODE", study_uid=str(study.StudyInstanceUID))
        assert result.ok and result.completed == expected
        wait_for(lambda s=study, e=expected: _stored_in_study(node, str(s.StudyInstanceUID))
                 == e, 30, "the moved instances in the node's ledger")
    series = _client(pacs).find_series(str(studies[0].StudyInstanceUID))
    assert {str(s.Modality) for s in series} == {"MR"}


def test_a_pacs_that_does_not_know_the_node_says_so(pacs: Orthanc,
                                                      priors: list[Path]) -> None:
    study = str(pydicom.dcmread(priors[0], stop_before_pixels=True).StudyInstanceUID)
    with pytest.raises(QueryError, match=r"does not know the move destination 'NOTANODE'"):
        _client(pacs).move("NOTANODE", study_uid=study)


def test_an_unreachable_pacs_is_a_clear_error() -> None:
    client = QueryClient(host="127.0.0.1", port=free_port(), called_aet="PACS",
                         calling_aet="DICOMNODE", timeout_s=2)
    with pytest.raises(QueryError, match="could not be reached"):
        client.find_studies("ANY")


class EndlessPendingPacs:
    """A C-FIND SCP that keeps answering 'pending' and never sends the final response."""

    def __init__(self) -> None:
        self.port = free_port()
        ae = AE(ae_title="SLOWPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.stop = threading.Event()
        self.server: Any = ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_FIND, self.on_find)])

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        while not self.stop.is_set():
            ds = Dataset()
            ds.StudyInstanceUID = pydicom.uid.generate_uid()
            ds.QueryRetrieveLevel = "STUDY"
            yield 0xFF00, ds
            time.sleep(0.2)
        yield 0x0000, None


def test_pending_responses_that_never_end_hit_the_total_timeout() -> None:
    pacs = EndlessPendingPacs()
    try:
        client = QueryClient(host="127.0.0.1", port=pacs.port, called_aet="SLOWPACS",
                             calling_aet="DICOMNODE", timeout_s=5, total_timeout_s=2)
        t0 = time.monotonic()
        with pytest.raises(QueryError, match="no final response within 2 s"):
            client.find_studies("ANY")
        assert time.monotonic() - t0 < 6
    finally:
        pacs.stop.set()
        pacs.server.shutdown()


def test_orthanc_starts_from_a_relative_working_folder(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`dicomnode demo` passes var/demo/orthanc: Orthanc runs with that folder as its cwd,
    so the launcher must hand it absolute paths (it once fell back to the built-in PACS)."""
    monkeypatch.chdir(tmp_path)
    with orthanc_running(Path("var") / "orthanc") as orthanc:
        assert orthanc.get("/system")["DicomAet"] == "ORTHANC"
