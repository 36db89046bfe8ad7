"""The status API, /metrics and the audit trail of a running node (a separate process),
with dcmtk's storescu sending and dcmtk's storescp as the destination that confirms."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.atna_schema import check_audit_message
from tests.peers import (
    PYDICOM_FILES,
    REPO,
    NodeProcess,
    free_port,
    node_config,
    peer_env,
    port_open,
    require_tool,
    start_node,
    storescu,
    wait_for,
)
from tests.web_client import WebClient

TOKENS = {"viewer": "v" * 24, "operator": "o" * 24, "clinical": "c" * 24}
ACCESSION = "ACC-7781"
PLUGINS = {"note": "tests.support.pipelines:NoteOnly"}


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    exe = require_tool("storescp")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([exe, "-aet", "PACS", "-od", str(out), str(port)],
                            env=peer_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 20, "storescp to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _ct_with_accession(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.AccessionNumber = ACCESSION
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _start(tmp_path: Path, pacs_port: int) -> tuple[NodeProcess, WebClient]:
    web_port = free_port()
    config = node_config(
        tmp_path / "var", free_port(),
        routes=[{"name": "ct-note", "match": {"Modality": "CT"}, "pipeline": "note",
                 "send_to": ["pacs"]},
                {"name": "mr-note", "match": {"Modality": "MR"}, "pipeline": "note",
                 "send_to": ["nowhere"]}],
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
                      "nowhere": {"ae_title": "GONE", "host": "127.0.0.1",
                                  "port": free_port()}},
        extra={"pipelines": PLUGINS,
               "outbox": {"max_attempts": 1},
               "web": {"host": "127.0.0.1", "port": web_port,
                       "tokens": [{"name": f"{role}-user", "token": token, "role": role}
                                  for role, token in TOKENS.items()]}})
    node = start_node(tmp_path / "node", config)
    try:
        wait_for(lambda: port_open(web_port), 30, "the web server")
    except BaseException:
        node.stop()
        raise
    return node, WebClient(web_port, TOKENS["operator"])


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    found = [sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples
             if sample.name == name and labels.items() <= sample.labels.items()]
    assert found, f"{name} {labels} not in /metrics"
    return float(sum(found))


def _steps(web: WebClient, study_uid: str) -> dict[str, str]:
    timeline = web.get(f"/api/studies/{study_uid}")
    return {s["step"]: s["status"] for s in timeline["steps"]}


def test_status_api_metrics_and_audit(tmp_path: Path, storescp: int) -> None:
    ct = _ct_with_accession(tmp_path)
    mr = PYDICOM_FILES / "MR_small.dcm"
    ct_study = str(pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    mr_study = str(pydicom.dcmread(mr, stop_before_pixels=True).StudyInstanceUID)
    node, web = _start(tmp_path, storescp)
    try:
        # open: probes and the API description; everything else needs a token
        assert web.request("GET", "/healthz", token="")[0] == 200
        assert web.request("GET", "/api/studies", token="")[0] == 401
        assert web.request("GET", "/metrics", token="x" * 24)[0] == 401
        spec = web.get("/api/openapi.json", token="")
        assert spec["openapi"].startswith("3.") and "/api/studies/{uid}" in spec["paths"]

        storescu(node.port, [ct, mr])
        refused = storescu(node.port, [mr], aet="INTRUDER", check=False)
        assert refused.returncode != 0

        wait_for(lambda: _steps(web, ct_study).get("confirmed") == "done", 90,
                 "the CT study's result to be confirmed")
        wait_for(lambda: web.get("/api/queues")["dead_letters"], 60,
                 "the MR result to be dead-lettered")
        assert web.get("/readyz", token="")["ready"] is True

        # the timeline, as a viewer sees it: hashed patient, no identifiers
        viewer = web.get(f"/api/studies/{ct_study}", token=TOKENS["viewer"])
        steps = {s["step"]: s for s in viewer["steps"]}
        assert list(steps) == ["received", "complete", "routed", "analysed", "sent",
                               "confirmed"]
        assert all(s["status"] == "done" for s in steps.values()), steps
        assert "STORESCU" in steps["received"]["summary"]
        assert "ct-note" in steps["routed"]["summary"]
        assert "note" in steps["analysed"]["summary"]
        assert "pacs: 1/1 sent" in steps["sent"]["summary"]
        assert viewer["jobs"][0]["duration_s"] is not None
        assert "patient" not in viewer
        assert "1CT1" not in str(viewer) and "CompressedSamples" not in str(viewer)
        # the clinical role sees who it is (and that look is audited)
        clinical = web.get(f"/api/studies/{ct_study}", token=TOKENS["clinical"])
        assert clinical["patient"]["PatientID"] == "1CT1"

        # search: accession number and Patient ID are hashed by the node, as at ingest
        by_accession = web.post("/api/studies/search", {"accession": ACCESSION})
        assert [s["study_uid"] for s in by_accession["studies"]] == [ct_study]
        by_patient = web.post("/api/studies/search", {"patient_id": "4MR1"})
        assert [s["study_uid"] for s in by_patient["studies"]] == [mr_study]
        key = by_patient["studies"][0]["patient_key"]
        by_key = web.post("/api/studies/search", {"patient_key": key})
        assert [s["study_uid"] for s in by_key["studies"]] == [mr_study]
        assert web.request("POST", "/api/studies/search", {})[0] == 400

        # queues and the dead-letter retry (operators only)
        (dead,) = web.get("/api/queues")["dead_letters"]
        assert dead["destination"] == "nowhere"
        assert web.request("POST", f"/api/outbox/{dead['id']}/retry", {},
                           token=TOKENS["viewer"])[0] == 403
        assert web.post(f"/api/outbox/{dead['id']}/retry", {}) == {"requeued": 1}
        assert web.request("POST", "/api/outbox/999999/retry", {})[0] == 409
        assert _steps(web, mr_study)["sent"] in ("pending", "failed")

        # the rule tester: a received series, and pasted tags
        series = {s["modality"]: s["series_uid"] for s in web.get("/api/series")["series"]}
        verdict = web.post("/api/routes/test", {"series_uid": series["CT"]})
        assert verdict["matched"] == ["ct-note"]
        why = next(r for r in verdict["routes"] if r["route"] == "mr-note")["reasons"]
        assert why and "Modality" in " ".join(why)
        pasted = web.post("/api/routes/test", {"tags": "Modality: MR\nNotAKeyword: 1"})
        assert pasted["matched"] == ["mr-note"]
        assert any("NotAKeyword" in w for w in pasted["warnings"])

        # models with their cards
        models = {p["package"]: p for p in web.get("/api/models")["packages"]}
        card = models["pneumonia-cxr"]["card"]
        assert card["metrics"] and card["operating_points"] and card["intended_use"]

        metrics = web.text("/metrics")
        assert _metric(metrics, "dicomnode_instances_received_total", outcome="new") == 2
        assert _metric(metrics, "dicomnode_bytes_received_total") > 10_000
        assert _metric(metrics, "dicomnode_associations_accepted_total") >= 1
        assert _metric(metrics, "dicomnode_associations_rejected_total",
                       reason="calling-ae") == 1
        assert _metric(metrics, "dicomnode_ingest_seconds_count") == 2
        assert _metric(metrics, "dicomnode_completion_wait_seconds_count",
                       level="series") == 2
        assert _metric(metrics, "dicomnode_job_duration_seconds_count", pipeline="note",
                       outcome="done") == 2
        assert _metric(metrics, "dicomnode_send_attempts_total", destination="pacs") == 1
        assert _metric(metrics, "dicomnode_send_failures_total", destination="nowhere") >= 1
        assert _metric(metrics, "dicomnode_last_instance_to_confirmed_seconds_count",
                       destination="pacs") == 1
        assert 'dicomnode_queue_depth{queue="outbox",state="dead"}' in metrics

        wait_for(lambda: any(r["kind"] == "send" for r in web.get("/api/audit")["records"]),
                 10, "the send records to be written")
        status, headers, atna = web.request("GET", "/api/audit?format=atna")
        assert status == 200 and headers["Content-Type"].startswith("application/xml")
    finally:
        assert node.stop() == 0
    _check_audit(node, web, tmp_path)
    _check_atna(atna)


def _check_audit(node: NodeProcess, web: WebClient, tmp_path: Path) -> None:
    path = node.storage / "audit.sqlite3"
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT kind, detail FROM audit ORDER BY id").fetchall()
        kinds = [k for k, _ in rows]
        for kind in ("configuration", "application", "association", "association-rejected",
                     "store", "analysis", "send", "web-action", "web-auth"):
            assert kind in kinds, kind
        assert kinds[-1] == "application" and '"stop"' in rows[-1][1]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET kind='x' WHERE id=1")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
    # no patient identifier in clear in the trail or the log
    blob = path.read_bytes() + node.log_text().encode()
    for identifier in (b"1CT1", b"4MR1", b"CompressedSamples", ACCESSION.encode()):
        assert identifier not in blob, identifier
    stores = [d for k, d in rows if k == "store"]
    assert len(stores) == 2 and all('"patient_key"' in d for d in stores)
    # the CLI reads the trail of a stopped node: its chain, and the ATNA form
    cli = [sys.executable, "-m", "dicomnode.cli", "audit", "--config", str(node.config_path)]
    verified = subprocess.run([*cli, "--verify"], capture_output=True, text=True, cwd=REPO)
    assert verified.returncode == 0 and "intact" in verified.stdout, verified
    atna = subprocess.run([*cli, "--format", "atna"], capture_output=True, text=True,
                          cwd=REPO, check=True).stdout
    assert len(ET.fromstring(atna).findall("AuditMessage")) >= len(stores)


def _check_atna(body: bytes) -> None:
    root = ET.fromstring(body)
    messages = root.findall("AuditMessage")
    assert messages
    order = ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
             "ParticipantObjectIdentification"]
    for msg in messages:
        assert check_audit_message(msg) == []
        tags = [child.tag for child in msg]
        assert tags == sorted(tags, key=order.index), tags  # the schema's sequence
        assert tags.count("EventIdentification") == 1 and "ActiveParticipant" in tags
        event = msg.find("EventIdentification")
        assert event is not None
        assert event.get("EventActionCode") in ("C", "R", "U", "D", "E")
        assert event.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
        code = event.find("EventID")
        assert code is not None and code.get("codeSystemName") == "DCM"
    by_event: dict[str, list[ET.Element]] = {}
    for m in messages:
        by_event.setdefault(_event_id(m), []).append(m)
    assert {"110100", "110103", "110104", "110113", "110114"} <= set(by_event)
    stored = [m for m in by_event["110104"]
              if m.find("EventIdentification").get("EventActionCode") == "C"]  # type: ignore[union-attr]
    assert len(stored) == 2
    for store in stored:
        patient = [p for p in store.findall("ParticipantObjectIdentification")
                   if p.get("ParticipantObjectTypeCodeRole") == "1"]
        assert len(patient) == 1 and patient[0].get("ParticipantObjectID") not in ("1CT1",
                                                                                  "4MR1")
        sop = store.find(
            "ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
        assert sop is not None and sop.get("NumberOfInstances") == "1"
    for identifier in (b"1CT1", b"4MR1", b"CompressedSamples", ACCESSION.encode()):
        assert identifier not in body


def _event_id(msg: ET.Element) -> str:
    code: Any = msg.find("EventIdentification/EventID")
    return str(code.get("csd-code"))
