"""The DICOM Audit Message Schema (PS3.15 A.5.1, Relax NG compact) as a checker.

No Relax NG validator for the compact syntax is packaged for Python, so this walks an
``AuditMessage`` and checks what the schema says: the order and number of elements,
which attributes each may carry, the required ones, and the enumerated values. It is a
transcription of the schema, kept as close to its text as possible.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from datetime import datetime
from xml.etree import ElementTree as ET

_CODED = {"csd-code", "codeSystemName", "displayName", "originalText"}
_EVENT_ATTRS = {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"}
_PARTICIPANT_ATTRS = {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor",
                      "NetworkAccessPointID", "NetworkAccessPointTypeCode"}
_OBJECT_ATTRS = {"ParticipantObjectID", "ParticipantObjectTypeCode",
                 "ParticipantObjectTypeCodeRole", "ParticipantObjectDataLifeCycle",
                 "ParticipantObjectSensitivity"}


def _sequence(parent: ET.Element, pattern: str, where: str) -> list[str]:
    """Child element names must match ``pattern``, a regex over 'Name;' tokens."""
    names = "".join(f"{child.tag};" for child in parent)
    if re.fullmatch(pattern, names) is None:
        return [f"{where}: children {names!r} do not follow the schema ({pattern})"]
    return []


def _attributes(el: ET.Element, allowed: set[str], required: Sequence[str],
                where: str) -> list[str]:
    problems = [f"{where}: attribute {a!r} not in the schema" for a in el.attrib
                if a not in allowed]
    problems += [f"{where}: required attribute {a!r} missing" for a in required
                 if a not in el.attrib]
    return problems


def _coded(el: ET.Element, where: str) -> list[str]:
    problems = _attributes(el, _CODED, ("csd-code", "codeSystemName", "originalText"), where)
    return problems + _sequence(el, "", where)


def _enum(el: ET.Element, name: str, values: set[str], where: str) -> list[str]:
    value = el.get(name)
    if value is not None and value not in values:
        return [f"{where}: {name}={value!r} not one of {sorted(values)}"]
    return []


def check_audit_message(msg: ET.Element) -> list[str]:
    """Every way ``msg`` departs from the DICOM audit message schema; empty if none."""
    if msg.tag != "AuditMessage":
        return [f"root is {msg.tag!r}, not AuditMessage"]
    problems = _sequence(msg, "EventIdentification;(ActiveParticipant;)+"
                              "AuditSourceIdentification;(ParticipantObjectIdentification;)*",
                         "AuditMessage")
    for child in msg:
        where = child.tag
        if child.tag == "EventIdentification":
            problems += _attributes(child, _EVENT_ATTRS,
                                    ("EventDateTime", "EventOutcomeIndicator"), where)
            problems += _enum(child, "EventActionCode", {"C", "R", "U", "D", "E"}, where)
            problems += _enum(child, "EventOutcomeIndicator", {"0", "4", "8", "12"}, where)
            try:
                datetime.fromisoformat(child.get("EventDateTime", ""))
            except ValueError:
                problems.append(f"{where}: EventDateTime is not an xsd:dateTime")
            problems += _sequence(child, "EventID;(EventTypeCode;)*(EventOutcomeDescription;)?",
                                  where)
            for code in child:
                if code.tag in ("EventID", "EventTypeCode"):
                    problems += _coded(code, f"{where}/{code.tag}")
        elif child.tag == "ActiveParticipant":
            problems += _attributes(child, _PARTICIPANT_ATTRS, ("UserID", "UserIsRequestor"),
                                    where)
            problems += _enum(child, "UserIsRequestor", {"true", "false", "1", "0"}, where)
            problems += _enum(child, "NetworkAccessPointTypeCode", {"1", "2", "3", "4", "5"},
                              where)
            problems += _sequence(child, "(RoleIDCode;)*(MediaIdentifier;)?", where)
            for code in child.findall("RoleIDCode"):
                problems += _coded(code, f"{where}/RoleIDCode")
        elif child.tag == "AuditSourceIdentification":
            problems += _attributes(child, {"AuditEnterpriseSiteID", "AuditSourceID"},
                                    ("AuditSourceID",), where)
            problems += _sequence(child, "(AuditSourceTypeCode;)*", where)
            for code in child:
                problems += _attributes(code, _CODED, ("csd-code",), f"{where}/{code.tag}")
                if code.get("csd-code") not in {str(i) for i in range(1, 10)} and \
                        "codeSystemName" not in code.attrib:
                    problems.append(f"{where}: a code other than 1-9 needs codeSystemName")
        else:
            problems += _object(child)
    return problems


def _object(po: ET.Element) -> list[str]:
    where = "ParticipantObjectIdentification"
    problems = _attributes(po, _OBJECT_ATTRS, ("ParticipantObjectID",), where)
    problems += _enum(po, "ParticipantObjectTypeCode", {"1", "2", "3", "4"}, where)
    problems += _enum(po, "ParticipantObjectTypeCodeRole", {str(i) for i in range(1, 27)},
                      where)
    problems += _enum(po, "ParticipantObjectDataLifeCycle", {str(i) for i in range(1, 16)},
                      where)
    problems += _sequence(po, "ParticipantObjectIDTypeCode;"
                              "(ParticipantObjectName;|ParticipantObjectQuery;)?"
                              "(ParticipantObjectDetail;)*(ParticipantObjectDescription;)*",
                          where)
    for child in po:
        if child.tag == "ParticipantObjectIDTypeCode":
            problems += _coded(child, f"{where}/{child.tag}")
        elif child.tag == "ParticipantObjectDetail":
            problems += _attributes(child, {"type", "value"}, ("type", "value"), child.tag)
            try:
                base64.b64decode(child.get("value", ""), validate=True)
            except binascii.Error:
                problems.append(f"{child.tag}: value is not base64")
        elif child.tag == "ParticipantObjectDescription":
            problems += _sequence(child, "(MPPS;)*(Accession;)*(SOPClass;)*"
                                         "(ParticipantObjectContainsStudy;)?(Encrypted;)?"
                                         "(Anonymized;)?", child.tag)
            for sop in child.findall("SOPClass"):
                problems += _attributes(sop, {"UID", "NumberOfInstances"},
                                        ("NumberOfInstances",), "SOPClass")
                if not sop.get("NumberOfInstances", "").isdigit():
                    problems.append("SOPClass: NumberOfInstances is not an integer")
    return problems
