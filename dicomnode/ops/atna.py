"""The audit trail as DICOM audit messages (PS3.15 Annex A.5; IHE ATNA, RFC 3881 form).

Each record becomes one ``AuditMessage``: EventIdentification, ActiveParticipant(s),
AuditSourceIdentification, ParticipantObjectIdentification(s), in the schema's order,
coded with DCM codes (CID 400 event IDs, CID 401 event types, CID 402 participant
roles). The patient participant's ParticipantObjectID is the node's salted hash of the
Patient ID (and issuer), never the Patient ID itself: a receiver can correlate records
of one patient without the trail revealing who it is.

Mapping: ``store`` -> 110104 DICOM Instances Transferred (C, the caller is the source
and the requestor; for a ``retrieve: C-GET`` store the PACS is the source and the node,
which asked, the requestor);
``send`` -> 110104 (R, the node is the source); ``analysis`` -> 110103 DICOM Instances
Accessed (R); ``association-rejected`` -> 110113 Security Alert / 110126 Node
Authentication; ``application`` -> 110100 Application Activity / 110120 Start or 110121
Stop; ``configuration`` -> 110113 Security Alert / 110131 Software Configuration;
``web-action`` -> 110113 / 110132 Use of Restricted Function; ``web-auth`` -> 110114 User
Authentication / 110122 Login. ``association`` records (an association that ended) are
kept in the trail for operators; their stores are exported as 110104 messages.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree as ET

from dicomnode.ops.audit import AuditRecord

Code = tuple[str, str, str]  # csd-code, codeSystemName, originalText

INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
LOGIN: Code = ("110122", "DCM", "Login")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
SOFTWARE_CONFIGURATION: Code = ("110131", "DCM", "Software Configuration")
RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
URI: Code = ("12", "RFC-3881", "URI")


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1],
                                       "originalText": code[2]})


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def _participant(msg: ET.Element, user_id: str, *, requestor: bool, role: Code | None,
                 address: str | None = None, alternative: str | None = None) -> None:
    attrs = {"UserID": user_id or "UNKNOWN", "UserIsRequestor": "true" if requestor else "false"}
    if alternative:
        attrs["AlternativeUserID"] = alternative
    if address:
        attrs["NetworkAccessPointID"] = address
        attrs["NetworkAccessPointTypeCode"] = "2" if any(c.isdigit() for c in address[:1]) \
            or ":" in address else "1"
    ap = ET.SubElement(msg, "ActiveParticipant", attrs)
    if role is not None:
        _coded(ap, "RoleIDCode", role)


def _study(msg: ET.Element, study_uid: str, sop_classes: Mapping[str, int] | None,
           details: Mapping[str, str] | None = None) -> None:
    po = ET.SubElement(msg, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study_uid, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    _coded(po, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    for key, value in (details or {}).items():
        ET.SubElement(po, "ParticipantObjectDetail", {
            "type": key, "value": base64.b64encode(str(value).encode()).decode()})
    if sop_classes:
        desc = ET.SubElement(po, "ParticipantObjectDescription")
        for uid, count in sorted(sop_classes.items()):
            ET.SubElement(desc, "SOPClass", {"UID": uid, "NumberOfInstances": str(int(count))})


def _patient(msg: ET.Element, patient_key: str | None) -> None:
    if not patient_key:
        return
    po = ET.SubElement(msg, "ParticipantObjectIdentification", {
        "ParticipantObjectID": patient_key, "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1"})
    _coded(po, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)


def audit_message(record: AuditRecord, *, node_ae: str, source_id: str) -> ET.Element | None:
    """One DICOM AuditMessage for a trail record, or None for kinds not exported."""
    d = record.detail
    kind = record.kind
    types: list[Code]
    if kind == "store":
        event, action, types = INSTANCES_TRANSFERRED, "C", []
    elif kind == "send":
        event, action, types = INSTANCES_TRANSFERRED, "R", []
    elif kind == "analysis":
        event, action, types = INSTANCES_ACCESSED, "R", []
    elif kind == "association-rejected":
        event, action, types = SECURITY_ALERT, "E", [NODE_AUTHENTICATION]
    elif kind == "application":
        event, action = APPLICATION_ACTIVITY, "E"
        types = [APPLICATION_STOP if d.get("action") == "stop" else APPLICATION_START]
    elif kind == "configuration":
        event, action, types = SECURITY_ALERT, "E", [SOFTWARE_CONFIGURATION]
    elif kind == "web-action":
        event, action, types = SECURITY_ALERT, "E", [RESTRICTED_FUNCTION]
    elif kind == "web-auth":
        event, action, types = USER_AUTHENTICATION, "E", [LOGIN]
    else:
        return None
    msg = ET.Element("AuditMessage")
    ev = ET.SubElement(msg, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": _time(record.at),
        "EventOutcomeIndicator": str(record.outcome)})
    _coded(ev, "EventID", event)
    for t in types:
        _coded(ev, "EventTypeCode", t)
    if record.outcome != 0 and d.get("why"):
        ET.SubElement(ev, "EventOutcomeDescription").text = str(d["why"])[:500]
    pid = str(d.get("pid", os.getpid()))
    if kind == "store":
        retrieved = d.get("retrieve") is not None  # C-GET: the node asked, the PACS sent
        _participant(msg, str(d.get("calling_ae", "")), requestor=not retrieved,
                     role=ROLE_SOURCE, address=str(d.get("address") or "") or None)
        _participant(msg, node_ae, requestor=retrieved, role=ROLE_DESTINATION,
                     alternative=pid)
    elif kind == "send":
        _participant(msg, node_ae, requestor=True, role=ROLE_SOURCE, alternative=pid)
        _participant(msg, str(d.get("destination_ae", "")), requestor=False,
                     role=ROLE_DESTINATION, address=str(d.get("destination_host") or "") or None)
    elif kind == "association-rejected":
        _participant(msg, str(d.get("calling_ae", "")), requestor=True, role=None,
                     address=str(d.get("address") or "") or None)
        _participant(msg, node_ae, requestor=False, role=ROLE_APPLICATION, alternative=pid)
    elif kind in ("web-action", "web-auth"):
        _participant(msg, str(d.get("user", "unknown")), requestor=True, role=None,
                     address=str(d.get("address") or "") or None)
        _participant(msg, node_ae, requestor=False, role=ROLE_APPLICATION, alternative=pid)
    else:
        _participant(msg, node_ae, requestor=True, role=ROLE_APPLICATION, alternative=pid)
    src = ET.SubElement(msg, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "DCM",
                                               "originalText": "Application Server Process"})
    if kind in ("store", "send", "analysis"):
        details = {k: str(d[k]) for k in ("pipeline", "version", "model", "route")
                   if d.get(k) is not None}
        _study(msg, str(d.get("study_uid", "")), d.get("sop_classes"), details)
        _patient(msg, d.get("patient_key"))
    elif kind == "configuration":
        source = str(d.get("source") or "")
        po = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": Path(source).resolve().as_uri()
            if source.startswith("/") else f"dicomnode:config/{source}",
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "13"})
        _coded(po, "ParticipantObjectIDTypeCode", URI)
        for key in ("config_sha256", "previous_sha256"):
            if d.get(key):
                ET.SubElement(po, "ParticipantObjectDetail", {
                    "type": key, "value": base64.b64encode(str(d[key]).encode()).decode()})
    elif kind == "web-action" and d.get("target"):
        po = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": f"dicomnode:{d['target']}", "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "20"})
        _coded(po, "ParticipantObjectIDTypeCode", URI)
    return msg


def export_xml(records: Iterable[AuditRecord], *, node_ae: str, source_id: str) -> bytes:
    """The records as DICOM audit messages, one ``AuditMessage`` per exportable record,
    inside an ``AuditMessages`` element (one file for an export; a syslog sender would
    send each AuditMessage on its own)."""
    root = ET.Element("AuditMessages")
    for record in records:
        msg = audit_message(record, node_ae=node_ae, source_id=source_id)
        if msg is not None:
            root.append(msg)
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body
