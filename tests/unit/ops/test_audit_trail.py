"""The audit trail: append-only, hash-chained, batched, and free of identifiers in clear;
its DICOM audit message form; and the web settings that guard the status page."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from dicomnode.config import ConfigError, parse_settings
from dicomnode.ops.atna import audit_message, export_xml
from dicomnode.ops.audit import MINOR_FAILURE, AuditRecord, AuditTrail
from dicomnode.ops.observer import Operations
from dicomnode.web.api import ApiError, Caller, parse_tags
from tests.atna_schema import check_audit_message

SCHEMA_ORDER = ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
                "ParticipantObjectIdentification"]


def test_records_are_batched_chained_and_cannot_be_changed(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.sqlite3", flush_interval_s=3600)
    trail.append("store", calling_ae="CT1", study_uid="1.2.3", patient_key="ab12",
                 sop_classes={"1.2.840.10008.5.1.4.1.1.2": 3})
    trail.append("send", MINOR_FAILURE, destination="pacs", why="0xA700")
    assert trail.records() == []  # in memory until the writer's next batch
    assert trail.flush() == 2
    records = trail.records()
    assert [r.kind for r in records] == ["store", "send"]
    assert records[1].outcome == MINOR_FAILURE and trail.verify() is None
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        for statement in ("UPDATE audit SET outcome=0", "DELETE FROM audit WHERE id=1"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)
        # an edit behind the database's back breaks the chain at that record
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET detail=? WHERE id=1",
                   (json.dumps({"calling_ae": "SOMEONE-ELSE"}),))
    assert trail.verify() == 1
    trail.close()


def test_identifiers_in_clear_are_refused(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.sqlite3")
    for key in ("PatientID", "PatientName", "AccessionNumber"):
        with pytest.raises(ValueError, match="hash it"):
            trail.append("store", **{key: "X"})
    with pytest.raises(ValueError, match="hash it"):
        trail.append("analysis", nested={"PatientBirthDate": "19700101"})
    with pytest.raises(ValueError, match="unknown audit record kind"):
        trail.append("coffee")
    trail.close()


def test_the_writer_thread_stores_within_its_interval(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.sqlite3", flush_interval_s=0.05)
    trail.start()
    trail.append("application", action="start")
    deadline = time.monotonic() + 5
    while not trail.records() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r.kind for r in trail.records()] == ["application"]
    trail.append("application", action="stop")
    trail.close()  # stop flushes what is left
    reopened = AuditTrail(tmp_path / "audit.sqlite3")
    assert [r.detail["action"] for r in reopened.records()] == ["start", "stop"]
    reopened.close()


_WRITER = """
import sys
from pathlib import Path
from dicomnode.ops.audit import AuditTrail
trail = AuditTrail(Path(sys.argv[1]), flush_interval_s=3600)
for batch in range(40):
    for i in range(5):
        trail.append("analysis", job=batch * 5 + i, pid="child")
    trail.flush()
trail.close()
"""


def test_two_processes_appending_to_one_trail_keep_one_chain(tmp_path: Path) -> None:
    """A receiver and a worker sharing one ``node.storage`` on one machine write the same
    audit file: each batch reads its predecessor's hash inside its own BEGIN IMMEDIATE
    transaction, so the chain stays one line through both processes' batches."""
    path = tmp_path / "audit.sqlite3"
    trail = AuditTrail(path, flush_interval_s=3600)
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)],
                             cwd=Path(__file__).resolve().parents[3])
    try:
        for batch in range(40):
            for i in range(5):
                trail.append("send", outbox=batch * 5 + i, pid="parent")
            trail.flush()
    finally:
        assert child.wait(60) == 0
    records = trail.records(limit=1000)
    assert len(records) == 400 and trail.verify() is None
    by = [r.detail["pid"] for r in records]
    assert by.count("child") == by.count("parent") == 200
    trail.close()


def test_a_c_get_store_names_the_node_as_requestor() -> None:
    """On a C-GET the node asked and the PACS sent: the PACS is still the source."""
    record = _record("store", calling_ae="PACS", address="10.0.0.5", study_uid="1.2.3",
                     patient_key="ab12", sop_classes={"1.2.840.10008.5.1.4.1.1.4": 3},
                     retrieve="C-GET")
    msg = audit_message(record, node_ae="DICOMNODE", source_id="dicomnode/DICOMNODE")
    assert msg is not None and check_audit_message(msg) == []
    roles = {p.get("UserID"): (p.get("UserIsRequestor"),
                               [c.get("csd-code") for c in p.findall("RoleIDCode")])
             for p in msg.findall("ActiveParticipant")}
    assert roles == {"PACS": ("false", ["110153"]), "DICOMNODE": ("true", ["110152"])}


def _record(kind: str, outcome: int = 0, **detail: object) -> AuditRecord:
    return AuditRecord(7, 1_760_000_000.0, kind, outcome, detail, "0" * 64)


@pytest.mark.parametrize("kind, event, action, types", [
    ("store", "110104", "C", []),
    ("send", "110104", "R", []),
    ("analysis", "110103", "R", []),
    ("association-rejected", "110113", "E", ["110126"]),
    ("application", "110100", "E", ["110120"]),
    ("configuration", "110113", "E", ["110131"]),
    ("web-action", "110113", "E", ["110132"]),
    ("web-auth", "110114", "E", ["110122"]),
])
def test_each_kind_is_a_dicom_audit_message(kind: str, event: str, action: str,
                                            types: list[str]) -> None:
    record = _record(kind, 0, calling_ae="CT1", address="127.0.0.1", study_uid="1.2.3",
                     patient_key="ab12cd34", sop_classes={"1.2.840.10008.5.1.4.1.1.7": 2},
                     destination_ae="PACS", pipeline="pneumonia", config_sha256="f" * 64,
                     target="outbox/3", user="ops")
    msg = audit_message(record, node_ae="DICOMNODE", source_id="dicomnode/DICOMNODE")
    assert msg is not None
    assert check_audit_message(msg) == []
    tags = [c.tag for c in msg]
    assert tags == sorted(tags, key=SCHEMA_ORDER.index)
    ev = msg.find("EventIdentification")
    assert ev is not None and ev.get("EventActionCode") == action
    assert ev.get("EventDateTime", "").startswith("2025-10-09T")
    code = ev.find("EventID")
    assert code is not None and code.get("csd-code") == event
    assert code.get("codeSystemName") == "DCM" and code.get("originalText")
    assert [t.get("csd-code") for t in ev.findall("EventTypeCode")] == types
    requestors = [p for p in msg.findall("ActiveParticipant")
                  if p.get("UserIsRequestor") == "true"]
    assert len(requestors) == 1
    source = msg.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "dicomnode/DICOMNODE"
    if kind in ("store", "send", "analysis"):
        objects = {p.get("ParticipantObjectTypeCodeRole"): p
                   for p in msg.findall("ParticipantObjectIdentification")}
        assert objects["1"].get("ParticipantObjectID") == "ab12cd34"  # the hash
        assert objects["3"].get("ParticipantObjectID") == "1.2.3"


def test_the_schema_check_catches_what_the_schema_forbids() -> None:
    msg = audit_message(_record("store", study_uid="1.2", patient_key="k"), node_ae="N",
                        source_id="s")
    assert msg is not None
    participant = msg.find("ActiveParticipant")
    assert participant is not None
    ET.SubElement(participant, "UserIDTypeCode", {"csd-code": "110119"})
    participant.set("UserIsRequestor", "maybe")
    event = msg.find("EventIdentification")
    assert event is not None
    event.set("EventOutcomeIndicator", "3")
    msg.insert(0, ET.Element("AuditSourceIdentification", {"AuditSourceID": "x"}))
    problems = " ".join(check_audit_message(msg))
    for fragment in ("AuditMessage: children", "UserIsRequestor='maybe'",
                     "EventOutcomeIndicator='3'", "ActiveParticipant: children"):
        assert fragment in problems, problems


def test_association_records_are_kept_but_not_exported() -> None:
    assert audit_message(_record("association"), node_ae="N", source_id="s") is None
    xml = export_xml([_record("association"), _record("web-auth", 4, why="bad token")],
                     node_ae="N", source_id="s")
    root = ET.fromstring(xml)
    (msg,) = root.findall("AuditMessage")
    outcome = msg.find("EventIdentification/EventOutcomeDescription")
    assert outcome is not None and outcome.text == "bad token"


def _settings(tmp_path: Path, **web: object) -> object:
    return parse_settings({"node": {"storage": str(tmp_path)}, "web": web},
                          source=tmp_path / "node.yaml")


def test_web_settings_guard_the_network_and_the_tokens(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, port=9000)
    assert settings.web.enabled and settings.web.host == "127.0.0.1"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, host="0.0.0.0", tokens=[{"token": "short", "role": "root"},
                                                    {"token_env": "NOT_SET_ANYWHERE"}])
    text = str(info.value)
    for fragment in ("web.host: '0.0.0.0' is not a loopback address",
                     "web.tokens[0].role: must be one of viewer, operator, clinical",
                     "web.tokens[0].token: expected a string of at least 16 characters",
                     "web.tokens[1].token_env: environment variable 'NOT_SET_ANYWHERE'"):
        assert fragment in text, text
    monkeypatch.setenv("DICOMNODE_TEST_WEB_TOKEN", "t" * 20)
    remote = _settings(tmp_path, host="0.0.0.0", allow_remote=True,
                       tokens=[{"name": "ops", "token_env": "DICOMNODE_TEST_WEB_TOKEN",
                                "role": "operator"}])
    (token,) = remote.web.tokens  # type: ignore[attr-defined]
    assert token.role == "operator" and "t" * 20 not in repr(token)
    # a worker's own /metrics: the port after web.port unless said
    assert settings.web.worker_listen_port == 9001  # type: ignore[attr-defined]
    assert _settings(tmp_path, worker_port=0).web.worker_listen_port == 0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"web\.worker_port: not a TCP port"):
        _settings(tmp_path, worker_port=70000)


def test_a_changed_configuration_is_audited_once(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node: {}\n")
    settings = replace(parse_settings({"node": {"storage": str(tmp_path)}}), source=config)
    trail = AuditTrail(tmp_path / "audit.sqlite3")

    def start() -> list[str]:
        ops = Operations(settings, None, trail)  # type: ignore[arg-type]
        ops.started()
        ops.stopped()
        trail.flush()
        return [r.kind for r in trail.records(kind="configuration")]

    assert start() == ["configuration"]
    assert start() == ["configuration"]  # same file: no new record
    config.write_text("node: {port: 11113}\n")
    assert start() == ["configuration", "configuration"]
    last = trail.records(kind="configuration")[-1].detail
    assert last["previous_sha256"] == trail.records(kind="configuration")[0].detail[
        "config_sha256"]
    trail.close()


def test_pasted_tags_for_the_rule_tester() -> None:
    attrs, warnings = parse_tags("Modality: CT\nImageType = ORIGINAL\\PRIMARY\\AXIAL\n"
                                 "# a comment\nNotAKeyword: 3\nno colon here")
    assert attrs == {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    assert any("NotAKeyword" in w for w in warnings)
    assert any("line 5" in w for w in warnings)
    attrs, _ = parse_tags('{"Modality": "MR", "calling_ae_title": "CT1"}')
    assert attrs == {"Modality": "MR", "calling_ae_title": "CT1"}
    with pytest.raises(ApiError):
        parse_tags("{not json")
    assert not Caller("v", "viewer", "127.0.0.1").may("operate")
    assert Caller("c", "clinical", "127.0.0.1").may("identify")
