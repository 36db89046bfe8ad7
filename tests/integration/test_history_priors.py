"""Priors from a real Orthanc, the timeline, and the growth results back in Orthanc.

Orthanc plays the PACS: it holds each patient's earlier phantom MR studies and the
node's earlier volume reports. A new volume arrives through the entry point a finished
tumour_volume job calls (``Node._job_done``); the node then finds and C-MOVEs its own
earlier reports, builds the timeline and sends a growth SR and plot into the newest
study. The PACS also misbehaves: it forgets the node (move refused), purges a report
between the C-FIND that counted it and the C-MOVE (the retrieve stops early), and
answers too slowly (a total timeout). A PACS that never knew the node is served by
C-GET instead (the move refused, then C-GET; or C-GET only), with the same early-stop
check, and each C-GET association audited and counted as the listener's are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import Settings, parse_settings
from dicomnode.history.jobs import HistoryService
from dicomnode.history.priors import MoveThrottle
from dicomnode.history.timeline import TRACKING_ID, measurements_from_report, record_measurement
from dicomnode.ingest.ledger import JobRow
from dicomnode.jobs.execute import encode
from dicomnode.phantoms.brain_mr import write_brain_mr_growth_study
from dicomnode.results import codes
from dicomnode.results.growth import (
    DOUBLING_TIME,
    SERIES_DESCRIPTION_SC,
    SERIES_DESCRIPTION_SR,
    predicted_volume_code,
)
from dicomnode.results.sr import (
    AlgorithmInfo,
    Analysed,
    FindingGroup,
    MeasurementValue,
    build_measurement_report,
    read_measurement_report,
)
from dicomnode.results.uids import derive_uid
from dicomnode.service import Node
from tests.peers import (
    Orthanc,
    free_port,
    node_config,
    orthanc_running,
    require_tool,
    start_node,
    storescu,
    wait_for,
)

VOLUMES_A = [3.0, 4.0, 6.0, 9.0]  # the first prior has images only, no node report


def _by_study(paths: list[Path]) -> list[list[Path]]:
    studies: dict[str, tuple[str, list[Path]]] = {}
    for p in paths:
        if p.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        studies.setdefault(str(ds.StudyInstanceUID), (str(ds.StudyDate), []))[1].append(p)
    return [files for _, files in sorted(studies.values())]


def _volume_report(image: Path, volume: float, out: Path, number: int = 1) -> Path:
    """A volume SR as the tumour_volume pipeline writes it (the node's earlier report)."""
    src = pydicom.dcmread(image, stop_before_pixels=True)
    series = derive_uid("tumour-volume-sr", src.StudyInstanceUID)
    sr = build_measurement_report(
        [src],
        Analysed((FindingGroup(
            TRACKING_ID, finding_type=codes.FINDING, finding_site=codes.BRAIN,
            measurements=(MeasurementValue(codes.VOLUME, volume, codes.UCUM_CUBIC_CENTIMETER),),
            tracking_uid=derive_uid("tumour", str(src.PatientID))),)),
        AlgorithmInfo("tumour-volume", "1.0.0"),
        series_instance_uid=series, sop_instance_uid=derive_uid(series, number),
        instance_number=number, series_description="AI tumour volume")
    path = out / f"sr-{src.StudyInstanceUID}-{number}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


@dataclasses.dataclass
class Patient:
    studies: list[list[Path]]
    reports: list[Path]
    volumes: list[float]
    out: Path

    def header(self, index: int) -> Dataset:
        return pydicom.dcmread(self.studies[index][0], stop_before_pixels=True)


def _patient(out: Path, seed: int, volumes: list[float]) -> Patient:
    paths = write_brain_mr_growth_study(out, seed=seed, volumes_cm3=volumes, matrix=64,
                                        n_slices=8)
    studies = _by_study(paths)
    reports = [_volume_report(files[0], v, out) for files, v in zip(studies, volumes,
                                                                    strict=True)]
    return Patient(studies, reports, volumes, out)


class VanishingPrior(MoveThrottle):
    """Lets the PACS delete one instance after C-FIND counted it, before the C-MOVE."""

    def __init__(self, pacs: Orthanc, sop_instance_uid: str) -> None:
        super().__init__(60)
        self.pacs = pacs
        self.sop_instance_uid = sop_instance_uid

    def acquire(self, deadline: float | None = None) -> bool:
        found = self.pacs.post("/tools/find", {"Level": "Instance", "Query": {
            "SOPInstanceUID": self.sop_instance_uid}})
        for orthanc_id in found:
            self.pacs.delete(f"/instances/{orthanc_id}")
        return super().acquire(deadline)


def _settings(var: Path, port: int, pacs: Orthanc, slow_port: int,
              **query: Any) -> Settings:
    config = node_config(var, port, destinations={
        "pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
        "slowpacs": {"ae_title": "SLOWPACS", "host": "127.0.0.1", "port": slow_port}},
        extra={"query": {"source": "pacs", "lookback_days": 730, "nightly": "02:00",
                         "max_moves_per_minute": 30, "timeout_s": 10,
                         "total_timeout_s": 60, **query}})
    return parse_settings(config)


def _finish_volume_job(node: Node, patient: Patient, index: int) -> None:
    """What a finished tumour_volume job hands on: its summary and its stored SR."""
    sr = pydicom.dcmread(patient.reports[index])
    stored = node.spool.write_bytes(encode(sr), "results")
    study = str(sr.StudyInstanceUID)
    job = JobRow(0, "tumour-volume", "tumour_volume", "series", study, study, (), 0, "done",
                 1, None)
    summary = {"analysed": True, "volume_cm3": patient.volumes[index],
               "study_date": str(sr.StudyDate),
               "tracking_uid": derive_uid("tumour", str(sr.PatientID))}
    node._job_done(job, summary, [(str(sr.SOPInstanceUID), str(sr.SOPClassUID), study,
                                   stored.relpath)])


def _in_orthanc(pacs: Orthanc, study_uid: str, description: str) -> list[dict[str, Any]]:
    found = pacs.post("/tools/find", {"Level": "Instance", "Expand": True,
                                      "Query": {"StudyInstanceUID": study_uid,
                                                "SeriesDescription": description}})
    return list(found)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Patient]:
    out = tmp_path_factory.mktemp("growth-phantoms")
    return {"A": _patient(out / "a", 31, VOLUMES_A), "B": _patient(out / "b", 32, [3.0, 3.5])}


@contextlib.contextmanager
def _node_with_pacs(tmp_path: Path, phantoms: dict[str, Patient], *, knows_node: bool = True,
                    allow_get: bool = False, allow_move: bool = True, **query: Any
                    ) -> Iterator[tuple[Node, Orthanc]]:
    """Orthanc holding A's and B's earlier studies and reports, and a node in-process
    that holds their newest studies."""
    port = free_port()
    modalities = {"dicomnode": ["DICOMNODE", "127.0.0.1", port]} if knows_node else {}
    # queries are answered for any caller, as many sites configure it; the move
    # destination must still be a known modality
    with orthanc_running(tmp_path / "pacs", modalities=modalities, extra={
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": allow_move,
            "DicomAlwaysAllowGet": allow_get}) as pacs:
        a, b = phantoms["A"], phantoms["B"]
        # the PACS holds the earlier studies and the node's earlier reports
        storescu(pacs.dicom_port, [*a.studies[0], *a.studies[1], *a.studies[2], a.reports[1],
                                   a.reports[2], *b.studies[0]], aec=pacs.aet, extra=["-R"])
        # B's earlier report series holds two reports
        second = _volume_report(b.studies[0][0], b.volumes[0], b.out, number=2)
        storescu(pacs.dicom_port, [b.reports[0], second], aec=pacs.aet, extra=["-R"])
        node = Node(_settings(tmp_path / "var", port, pacs, free_port(), **query))
        node.start()
        try:
            # the newest studies arrive at the node as from the modality
            storescu(port, [*a.studies[3], *b.studies[1]])
            yield node, pacs
        finally:
            node.stop()


@pytest.fixture
def node_and_pacs(tmp_path: Path, phantoms: dict[str, Patient]
                  ) -> Iterator[tuple[Node, Orthanc]]:
    with _node_with_pacs(tmp_path, phantoms) as both:
        yield both


def test_priors_timeline_and_growth_results_in_orthanc(
        node_and_pacs: tuple[Node, Orthanc], phantoms: dict[str, Patient],
        tmp_path: Path) -> None:
    node, pacs = node_and_pacs
    a = phantoms["A"]
    newest = a.header(3)
    study = str(newest.StudyInstanceUID)
    _finish_volume_job(node, a, 3)

    # the one-off job retrieves both earlier reports and sends SR + plot into the study
    wait_for(lambda: len(_in_orthanc(pacs, study, SERIES_DESCRIPTION_SR)) == 1
             and len(_in_orthanc(pacs, study, SERIES_DESCRIPTION_SC)) == 1, 120,
             "the growth SR and plot in Orthanc")
    patient_key = node.ledger.study_patient_key(study)
    assert patient_key is not None
    points = node.ledger.timeline_points(patient_key)
    assert [(p.study_date, p.volume_cm3, p.source_kind) for p in points] == [
        (str(a.header(1).StudyDate), 4.0, "prior-sr"),
        (str(a.header(2).StudyDate), 6.0, "prior-sr"),
        (str(newest.StudyDate), 9.0, "node")]
    assert {p.tracking_uid for p in points} == {derive_uid("tumour", str(newest.PatientID))}
    events = node.ledger.retrieve_events(patient_key)
    n_images = len(a.studies[0])
    assert [(e.outcome, e.expected, e.completed, e.arrived, e.detail) for e in events] == [
        ("ok", 1, 1, 1, None), ("ok", 1, 1, 1, None),
        ("ok", n_images, n_images, n_images, "images for re-analysis")]
    # the reports came by C-MOVE into the node, not the images they were measured on;
    # the prior without a report came as images, for the node's routes to analyse
    for prior_report in a.reports[1:3]:
        assert node.ledger.has_instance(str(pydicom.dcmread(prior_report).SOPInstanceUID))
    assert not node.ledger.has_instance(str(a.header(1).SOPInstanceUID))
    assert all(node.ledger.has_instance(str(pydicom.dcmread(f).SOPInstanceUID))
               for f in a.studies[0])

    sr_id = _in_orthanc(pacs, study, SERIES_DESCRIPTION_SR)[0]["ID"]
    sc_id = _in_orthanc(pacs, study, SERIES_DESCRIPTION_SC)[0]["ID"]
    sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(sr_id)))
    sc = pydicom.dcmread(io.BytesIO(pacs.instance_file(sc_id)))
    assert sr.PatientID == sc.PatientID == newest.PatientID
    report = read_measurement_report(sr)
    assert isinstance(report.outcome, Analysed)
    values = {m.concept: m.value for m in report.outcome.findings[0].measurements}
    assert values[predicted_volume_code(365.0)] > 9.0
    assert DOUBLING_TIME in values
    notes = [n.text for n in report.notes]
    assert sum(n.startswith("History: ") for n in notes) == 3
    assert any(str(a.header(1).StudyInstanceUID) in n for n in notes)
    assert sc.SamplesPerPixel == 3 and sc.BurnedInAnnotation == "YES"
    require_tool("dciodvfy")
    from dicomnode.results.validate import validate_result

    validate_result(sr)
    validate_result(sc)

    # running again (the nightly job) adds nothing and re-sends nothing
    queued = len(node.ledger.outbox())
    node.history.run_nightly()
    assert len(node.ledger.timeline_points(patient_key)) == 3
    assert len(node.ledger.outbox()) == queued


def test_a_refused_move_then_a_retrieve_that_stops_early(
        node_and_pacs: tuple[Node, Orthanc], phantoms: dict[str, Patient]) -> None:
    node, pacs = node_and_pacs
    b = phantoms["B"]
    study = str(b.header(1).StudyInstanceUID)
    pacs.delete("/modalities/dicomnode")  # the PACS no longer knows the node
    _finish_volume_job(node, b, 1)
    patient_key = node.ledger.study_patient_key(study)
    assert patient_key is not None
    wait_for(lambda: node.ledger.retrieve_events(patient_key), 60, "the refused move recorded")
    (refused,) = node.ledger.retrieve_events(patient_key)
    assert refused.outcome == "error"
    assert refused.detail is not None and "does not know the move destination 'DICOMNODE'" \
        in refused.detail
    assert node.scheduler.running and node.scp is not None

    pacs._request("PUT", "/modalities/dicomnode",
                  b'["DICOMNODE", "127.0.0.1", %d]' % node.settings.node.port)
    # between the C-FIND that counted two reports and the C-MOVE, one is purged
    second = _volume_report(b.studies[0][0], b.volumes[0], b.out, number=2)
    node.history.fetcher.throttle = VanishingPrior(
        pacs, str(pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID))
    outcome = node.history.run_patient(patient_key)
    assert not outcome.errors and outcome.priors is not None
    assert outcome.priors.incomplete
    last = node.ledger.retrieve_events(patient_key)[-1]
    assert (last.outcome, last.expected, last.completed, last.arrived) == ("incomplete", 2,
                                                                           1, 1)
    assert last.detail is not None and "stopped early" in last.detail
    # what did arrive is used: the earlier volume joins the new one, and growth follows
    points = node.ledger.timeline_points(patient_key)
    assert [(p.volume_cm3, p.source_kind) for p in points] == [(3.0, "prior-sr"),
                                                               (3.5, "node")]
    assert len(outcome.results) == 2


@pytest.mark.parametrize(("allow_move", "refusal"), [
    (True, "does not know the move destination 'DICOMNODE'"),
    (False, "does not allow C-MOVE from 'DICOMNODE'")], ids=["status-0xC000", "abort"])
def test_a_pacs_that_does_not_know_the_node_answers_a_c_get_instead(
        tmp_path: Path, phantoms: dict[str, Patient], caplog: pytest.LogCaptureFixture,
        allow_move: bool, refusal: str) -> None:
    """Orthanc refuses the C-MOVE of a node not in its DicomModalities in one of two ways:
    0xC000 before any sub-operation (moves allowed from anyone, destination unknown), or an
    A-ABORT as the first response (the caller unknown). ``move-then-get`` (the default)
    then fetches by C-GET on the node's own association, through the node's store: spool,
    ledger, sender = the PACS."""
    a = phantoms["A"]
    caplog.set_level(logging.INFO)
    with _node_with_pacs(tmp_path, phantoms, knows_node=False, allow_get=True,
                         allow_move=allow_move) as (node, pacs):
        assert node.settings.query.retrieve == "move-then-get"
        newest = a.header(3)
        study = str(newest.StudyInstanceUID)
        _finish_volume_job(node, a, 3)
        wait_for(lambda: len(_in_orthanc(pacs, study, SERIES_DESCRIPTION_SR)) == 1, 120,
                 "the growth SR in Orthanc")
        patient_key = node.ledger.study_patient_key(study)
        assert patient_key is not None
        n_images = len(a.studies[0])
        events = node.ledger.retrieve_events(patient_key)
        assert [(e.outcome, e.expected, e.completed, e.arrived, e.detail) for e in events] == [
            ("ok", 1, 1, 1, "by C-GET"), ("ok", 1, 1, 1, "by C-GET"),
            ("ok", n_images, n_images, n_images, "images for re-analysis, by C-GET")]
        assert [(p.volume_cm3, p.source_kind) for p in
                node.ledger.timeline_points(patient_key)] == [
            (4.0, "prior-sr"), (6.0, "prior-sr"), (9.0, "node")]
        for files in (a.reports[1:3], a.studies[0]):
            for f in files:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                assert node.ledger.has_instance(str(ds.SOPInstanceUID))
                series = node.ledger.get_series(str(ds.SeriesInstanceUID))
                assert series is not None and series.calling_ae == pacs.aet
        # in the spool under the node's own names, never the peer's UIDs
        for _, rel in node.ledger.instance_paths([str(a.header(0).SeriesInstanceUID)]):
            assert str(a.header(0).SeriesInstanceUID) not in rel
            assert node.spool.path(rel).is_file()
        # each C-GET association is audited as the listener's are, sender the PACS
        node.audit.flush()
        gets = [r.detail for r in node.audit.records(kind="store", limit=1000)
                if r.detail.get("retrieve") == "C-GET"]
        assert sorted(d["instances"] for d in gets) == [1, 1, n_images]
        assert {(d["calling_ae"], d["patient_key"]) for d in gets} == {(pacs.aet, patient_key)}
        assert len([r for r in node.audit.records(kind="association", limit=1000)
                    if r.detail.get("retrieve") == "C-GET"]) == 3
        received = node.ops.metrics.registry.get_sample_value(
            "dicomnode_instances_received_total", {"outcome": "new"})
        assert received == node.ledger.counts()["instances"]["stored"]
        refused = [r.getMessage() for r in caplog.records
                   if "refused the C-MOVE" in r.getMessage()]
        assert len(refused) == 1 and refusal in refused[0]
        assert str(newest.PatientID) not in caplog.text
        assert str(newest.PatientName) not in caplog.text


def test_a_c_get_that_stops_early_is_detected(tmp_path: Path,
                                              phantoms: dict[str, Patient]) -> None:
    """``retrieve: get``: no C-MOVE at all; a report purged between the C-FIND that counted
    it and the C-GET leaves the series short, recorded as incomplete."""
    b = phantoms["B"]
    with _node_with_pacs(tmp_path, phantoms, knows_node=False, allow_get=True,
                         retrieve="get") as (node, pacs):
        second = _volume_report(b.studies[0][0], b.volumes[0], b.out, number=2)
        node.history.fetcher.throttle = VanishingPrior(
            pacs, str(pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID))
        study = str(b.header(1).StudyInstanceUID)
        _finish_volume_job(node, b, 1)
        patient_key = node.ledger.study_patient_key(study)
        assert patient_key is not None
        wait_for(lambda: any(e.outcome == "incomplete"
                             for e in node.ledger.retrieve_events(patient_key)), 60,
                 "the short C-GET recorded")
        short = [e for e in node.ledger.retrieve_events(patient_key)
                 if e.outcome == "incomplete"]
        assert [(e.expected, e.completed, e.arrived) for e in short] == [(2, 1, 1)]
        assert short[0].detail is not None and "stopped early" in short[0].detail
        assert "C-GET" in short[0].detail
        wait_for(lambda: [(p.volume_cm3, p.source_kind)
                          for p in node.ledger.timeline_points(patient_key)] == [
            (3.0, "prior-sr"), (3.5, "node")], 60, "the prior that did arrive in the timeline")
        wait_for(lambda: len(_in_orthanc(pacs, study, SERIES_DESCRIPTION_SR)) == 1, 60,
                 "the growth SR over what did arrive, in Orthanc")


def test_a_pacs_that_allows_neither_says_so(tmp_path: Path,
                                             phantoms: dict[str, Patient]) -> None:
    """The move is refused and so is the C-GET: one error that names both causes."""
    b = phantoms["B"]
    with _node_with_pacs(tmp_path, phantoms, knows_node=False, allow_get=False) as (node, _):
        study = str(b.header(1).StudyInstanceUID)
        _finish_volume_job(node, b, 1)
        patient_key = node.ledger.study_patient_key(study)
        assert patient_key is not None
        wait_for(lambda: node.ledger.retrieve_events(patient_key), 60, "the error recorded")
        (error,) = node.ledger.retrieve_events(patient_key)
        assert error.outcome == "error" and error.detail is not None
        assert "does not know the move destination 'DICOMNODE'" in error.detail
        assert "C-GET instead" in error.detail
        assert "does not allow C-GET from 'DICOMNODE'" in error.detail


def test_a_slow_pacs_hits_the_total_timeout(tmp_path: Path, node_and_pacs: tuple[Node, Orthanc],
                                            phantoms: dict[str, Patient]) -> None:
    node, _ = node_and_pacs
    a = phantoms["A"]
    lua = tmp_path / "slow.lua"
    lua.write_text('function IncomingFindRequestFilter(query, origin)\n'
                   '  os.execute("sleep 8")\n  return query\nend\n')
    with orthanc_running(tmp_path / "slow", aet="SLOWPACS",
                         extra={"LuaScripts": [str(lua)]}) as slow:
        storescu(slow.dicom_port, [*a.studies[1], a.reports[1]], aec="SLOWPACS", extra=["-R"])
        settings = node.settings
        query = dataclasses.replace(settings.query, source="slowpacs", timeout_s=2,
                                    total_timeout_s=3)
        destinations = dict(settings.destinations)
        destinations["slowpacs"] = dataclasses.replace(destinations["slowpacs"],
                                                       port=slow.dicom_port)
        slow_settings = dataclasses.replace(settings, query=query, destinations=destinations)
        history = HistoryService(slow_settings, node.ledger, node.spool)
        patient_key = node.ledger.study_patient_key(str(a.header(3).StudyInstanceUID))
        assert patient_key is not None
        sr = pydicom.dcmread(a.reports[3])
        stored = node.spool.write_bytes(encode(sr), "results")
        (point,) = measurements_from_report(sr, source_path=stored.relpath, kind="node")
        record_measurement(node.ledger, patient_key, point)
        t0 = time.monotonic()
        outcome = history.fetcher.fetch(patient_key)
        assert time.monotonic() - t0 < 8
        assert outcome.errors
        (last,) = [e for e in node.ledger.retrieve_events(patient_key)
                   if e.source == "slowpacs"]
        assert last.outcome == "error"
        assert last.detail is not None and "C-FIND studies" in last.detail


def _timeline_rows(storage: Path) -> list[tuple[str, float, str]]:
    ledger = storage / "ledger.sqlite3"
    with sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True) as c:
        return [(str(d), float(v), str(k)) for d, v, k in c.execute(
            "SELECT study_date, volume_cm3, source_kind FROM timeline_points "
            "ORDER BY study_date")]


def test_a_new_study_at_the_node_runs_the_whole_loop(
        tmp_path: Path, phantoms: dict[str, Patient]) -> None:
    """A study arrives; its (stand-in) volume job finishing starts everything else."""
    a = phantoms["A"]
    dates = [str(a.header(i).StudyDate) for i in range(4)]
    port = free_port()
    with orthanc_running(tmp_path / "pacs", modalities={
            "dicomnode": ["DICOMNODE", "127.0.0.1", port]}) as pacs:
        storescu(pacs.dicom_port, [*a.studies[0], *a.studies[1], *a.studies[2], a.reports[1],
                                   a.reports[2]], aec=pacs.aet, extra=["-R"])
        config = node_config(
            tmp_path / "var", port,
            routes=[{"name": "tumour-volume", "match": {"Modality": "MR"},
                     "pipeline": "volume_standin", "send_to": ["pacs"],
                     "options": {"volumes": {dates[0]: 3.0, dates[3]: 9.0}}}],
            destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1",
                                   "port": pacs.dicom_port}},
            extra={"pipelines": {"volume_standin":
                                 "tests.support.volume_pipeline:VolumeStandIn"},
                   "query": {"source": "pacs", "lookback_days": 730}})
        node = start_node(tmp_path / "node", config)
        try:
            storescu(port, a.studies[3])
            study = str(a.header(3).StudyInstanceUID)

            def full_history() -> bool:
                for found in _in_orthanc(pacs, study, SERIES_DESCRIPTION_SR):
                    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["ID"])))
                    notes = [n.text for n in read_measurement_report(ds).notes]
                    if sum(n.startswith("History: ") for n in notes) == 4:
                        return True
                return False

            # the new study's volume, two retrieved reports, and the prior without a
            # report re-analysed from its moved images: four points in the end
            wait_for(full_history, 240, "a growth SR over all four timepoints in Orthanc")
            assert _timeline_rows(node.storage) == [
                (dates[0], 3.0, "node"), (dates[1], 4.0, "prior-sr"),
                (dates[2], 6.0, "prior-sr"), (dates[3], 9.0, "node")]
            plots = _in_orthanc(pacs, study, SERIES_DESCRIPTION_SC)
            assert plots
            require_tool("dciodvfy")
            from dicomnode.results.validate import validate_result

            for found in plots + _in_orthanc(pacs, study, SERIES_DESCRIPTION_SR):
                validate_result(pydicom.dcmread(io.BytesIO(pacs.instance_file(found["ID"]))))
            # a growth series per study, a newer instance for the longer history
            assert len({p["ParentSeries"] for p in
                        _in_orthanc(pacs, study, SERIES_DESCRIPTION_SR)}) == 1
            assert node.status()["counts"]["history"]["timeline_points"] == 4
        finally:
            node.stop()
