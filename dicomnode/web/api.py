"""What the status page and the REST API answer, as plain functions of the node's state.

Nothing here knows HTTP: each method takes the caller (name, role) and plain values and
returns JSON-ready data or raises ``ApiError``. Patient identifiers never leave unless the
caller's role is ``clinical``; then the access itself is audited.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword

from dicomnode.config import Settings
from dicomnode.inference.package import CARD_FILE, load_card
from dicomnode.ingest.ledger import Ledger
from dicomnode.ingest.spool import Spool
from dicomnode.ops.atna import export_xml
from dicomnode.ops.audit import SUCCESS, AuditTrail
from dicomnode.ops.reader import LedgerReader
from dicomnode.routing.router import Router
from dicomnode.routing.rules import SPECIAL_KEYS

IDENTIFYING_KEYWORDS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "OtherPatientIDs", "OtherPatientNames", "AccessionNumber",
    "ReferringPhysicianName", "InstitutionName", "PatientAddress", "StudyID"})

ROLE_PERMISSIONS = {"viewer": {"read"}, "operator": {"read", "operate"},
                    "clinical": {"read", "operate", "identify"}}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    address: str

    def may(self, permission: str) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, set())


def _redact(attrs: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
    if caller.may("identify"):
        return dict(attrs)
    return {k: v for k, v in attrs.items() if k not in IDENTIFYING_KEYWORDS}


class StatusApi:
    def __init__(self, settings: Settings, ledger: Ledger, reader: LedgerReader, spool: Spool,
                 router: Router, audit: AuditTrail,
                 header_loader: Callable[[str], Mapping[str, Any]] | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.reader = reader
        self.spool = spool
        self.router = router
        self.audit = audit
        self.header_loader = header_loader
        self._cards: dict[Path, tuple[float, dict[str, Any]]] = {}

    # -- studies -----------------------------------------------------------------------

    def recent_studies(self, caller: Caller, limit: int = 50) -> dict[str, Any]:
        return {"studies": self.reader.studies(limit=limit)}

    def search(self, caller: Caller, query: Mapping[str, Any]) -> dict[str, Any]:
        """By accession number, Patient ID (hashed here, as at ingest), the hashed patient
        key itself, or Study Instance UID."""
        accession = str(query.get("accession") or "").strip()
        patient_id = str(query.get("patient_id") or "").strip()
        patient_key = str(query.get("patient_key") or "").strip() or None
        study_uid = str(query.get("study_uid") or "").strip() or None
        if patient_id:
            issuer = str(query.get("issuer") or "").strip()
            patient_key = self.ledger.hash_identifier(f"{patient_id}|{issuer}")
        accession_key = self.ledger.hash_identifier(accession) if accession else None
        if not (accession_key or patient_key or study_uid):
            raise ApiError(400, "give accession, patient_id, patient_key or study_uid")
        return {"studies": self.reader.studies(limit=int(query.get("limit") or 100),
                                               patient_key=patient_key,
                                               accession_key=accession_key,
                                               study_uid=study_uid)}

    def timeline(self, caller: Caller, study_uid: str) -> dict[str, Any]:
        found = self.reader.timeline(study_uid)
        if found is None:
            raise ApiError(404, "no such study in the ledger")
        for series in found["series"]:
            series["attrs"] = _redact(series["attrs"], caller)
        for job in found["jobs"]:
            job["models"] = self._job_models(job["route"])
        found["steps"] = _steps(found)
        if caller.may("identify"):
            found["patient"] = self._identity(study_uid)
            self.audit.append("web-action", SUCCESS, user=caller.name, address=caller.address,
                              action="show-identifiers", target=f"study/{study_uid}")
        return found

    def _identity(self, study_uid: str) -> dict[str, str]:
        relpath = self.reader.first_instance_path(study_uid)
        if relpath is None:
            return {}
        keywords = ["PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "AccessionNumber"]
        ds = dcmread(self.spool.path(relpath), stop_before_pixels=True,
                     specific_tags=keywords)
        return {k: str(ds.get(k, "") or "") for k in keywords}

    def _job_models(self, route_name: str) -> list[dict[str, Any]]:
        route = next((r for r in self.settings.routes if r.name == route_name), None)
        if route is None:
            return []
        names = [str(route.options[k]) for k in ("model", "classifier")
                 if isinstance(route.options.get(k), str)]
        out = []
        for name in names:
            card = self._card(name)
            if card is not None:
                out.append({"name": name, "version": card.get("version"),
                            "sha256": str(card.get("sha256", ""))[:16]})
        return out

    def _card(self, name: str) -> dict[str, Any] | None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            return None
        path = (self.settings.models_dir / name / CARD_FILE).resolve()
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        cached = self._cards.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            mapping = load_card(path).to_mapping()
        except Exception as exc:  # an invalid card is shown as such, not hidden
            mapping = {"name": name, "invalid": str(exc)}
        self._cards[path] = (mtime, mapping)
        return mapping

    # -- queues ------------------------------------------------------------------------

    def queues(self, caller: Caller) -> dict[str, Any]:
        return {"counts": self.reader.queue_counts(), **self.reader.queues()}

    def _audit_action(self, caller: Caller, action: str, target: str, changed: int) -> None:
        self.audit.append("web-action", SUCCESS, user=caller.name, address=caller.address,
                          action=action, target=target, changed=changed)

    def retry_dead_letter(self, caller: Caller, outbox_id: int | None) -> dict[str, Any]:
        try:
            changed = self.ledger.retry_dead(outbox_id)
        finally:
            self.ledger.close()
        if outbox_id is not None and changed == 0:
            raise ApiError(409, "no dead letter with that id")
        self._audit_action(caller, "retry-dead-letter",
                           f"outbox/{outbox_id if outbox_id is not None else 'all'}", changed)
        return {"requeued": changed}

    def retry_job(self, caller: Caller, job_id: int) -> dict[str, Any]:
        try:
            changed = self.ledger.retry_job(job_id)
        finally:
            self.ledger.close()
        if not changed:
            raise ApiError(409, "no failed job with that id")
        self._audit_action(caller, "retry-job", f"jobs/{job_id}", 1)
        return {"requeued": 1}

    # -- routes ------------------------------------------------------------------------

    def routes(self, caller: Caller) -> dict[str, Any]:
        return {"routes": [{"name": r.name, "level": r.level, "pipeline": r.pipeline,
                            "send_to": list(r.send_to),
                            "conditions": [c.describe() for c in r.conditions],
                            "options": dict(r.options)} for r in self.settings.routes]}

    def series(self, caller: Caller, limit: int = 100) -> dict[str, Any]:
        return {"series": self.reader.recent_series(limit)}

    def test_rules(self, caller: Caller, body: Mapping[str, Any]) -> dict[str, Any]:
        """Which routes match a received series (by UID) or pasted tags, and why."""
        warnings: list[str] = []
        series_uid = body.get("series_uid")
        if series_uid:
            found = self.reader.series_attrs(str(series_uid))
            if found is None:
                raise ApiError(404, "no such series in the ledger")
            attrs, calling = found
            needed = {c.keyword for r in self.settings.routes for c in r.conditions}
            if self.header_loader is not None and not (needed - SPECIAL_KEYS) <= attrs.keys():
                try:
                    loaded = self.header_loader(str(series_uid))
                finally:
                    self.ledger.close()  # the loader's connection on this HTTP thread
                attrs.update({k: v for k, v in loaded.items() if k not in attrs})
            attrs.setdefault("calling_ae_title", calling)
            source = "series"
        elif "tags" in body:
            attrs, warnings = parse_tags(body["tags"])
            source = "tags"
        else:
            raise ApiError(400, "give series_uid or tags")
        verdicts = [{"route": e.route, "level": e.level, "matched": e.result.matched,
                     "reasons": list(e.result.reasons)} for e in self.router.explain(attrs)]
        return {"source": source, "attributes": _redact(attrs, caller), "warnings": warnings,
                "routes": verdicts, "matched": [v["route"] for v in verdicts if v["matched"]]}

    # -- models and audit --------------------------------------------------------------

    def models(self, caller: Caller) -> dict[str, Any]:
        root = self.settings.models_dir
        packages = []
        if root.is_dir():
            for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
                card = self._card(card_path.parent.name)
                if card is not None:
                    onnx = card_path.parent / "model.onnx"
                    packages.append({"package": card_path.parent.name,
                                     "onnx_bytes": onnx.stat().st_size if onnx.is_file()
                                     else None, "card": card})
        used = {str(r.options.get(k)) for r in self.settings.routes
                for k in ("model", "classifier") if r.options.get(k)}
        for p in packages:
            p["used_by_routes"] = p["package"] in used
        return {"models_dir": str(root), "packages": packages}

    def audit_records(self, caller: Caller, after: int, limit: int, kind: str | None
                      ) -> dict[str, Any]:
        records = self.audit.records(after=after, limit=limit, kind=kind)
        return {"records": [r.to_json() for r in records],
                "chain_ok_through": None if not records else records[-1].id}

    def audit_atna(self, caller: Caller, after: int, limit: int) -> bytes:
        records = self.audit.records(after=after, limit=limit)
        return export_xml(records, node_ae=self.settings.node.ae_title,
                          source_id=f"dicomnode/{self.settings.node.ae_title}")


def _steps(t: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The study's life as six steps: received, complete, routed, analysed, sent, confirmed."""
    study = t["study"]
    series = t["series"]
    jobs = t["jobs"]
    sends = t["sends"]
    steps: list[dict[str, Any]] = [{
        "step": "received", "status": "done", "at": study["first_received"],
        "summary": f"{study['instances']} instance(s) in {len(series)} series from "
                   f"{', '.join(t['sources']) or 'unknown'}"}]
    closed = [s for s in series if s["state"] == "complete"]
    if study["state"] == "complete":
        steps.append({"step": "complete", "status": "done", "at": study["closed_at"],
                      "summary": f"study: {study['close_reason']}; series: "
                                 + "; ".join(f"{s['modality'] or '?'} {s['close_reason']}"
                                             for s in closed)})
    else:
        steps.append({"step": "complete", "status": "pending", "at": None,
                      "summary": f"{len(closed)} of {len(series)} series complete"})
    matched = sorted({d["route"] for d in t["route_decisions"] if d["matched"] and d["route"]})
    decided = bool(t["route_decisions"])
    steps.append({"step": "routed", "status": "done" if decided else "pending",
                  "at": max((d["decided_at"] for d in t["route_decisions"]), default=None),
                  "summary": ("matched: " + ", ".join(matched)) if matched else
                  ("no route matched" if decided else "not yet routed")})
    if not jobs:
        steps.append({"step": "analysed", "status": "none" if decided else "pending",
                      "at": None, "summary": "no analysis"})
    else:
        states = {j["state"] for j in jobs}
        status = ("failed" if "failed" in states else
                  "pending" if states & {"pending", "running"} else "done")
        parts = []
        for j in jobs:
            models = ", ".join(f"{m['name']} {m['version']}" for m in j.get("models", []))
            took = f"{j['duration_s']:.1f} s" if j["duration_s"] is not None else "-"
            version = j["summary"].get("version")
            parts.append(f"{j['pipeline']} (pipeline v{version or '?'}"
                         f"{', model ' + models if models else ''}): {j['state']}, {took}")
        steps.append({"step": "analysed", "status": status,
                      "at": max((j["finished_at"] or 0 for j in jobs), default=None) or None,
                      "summary": "; ".join(parts)})
    if not sends:
        steps.append({"step": "sent", "status": "none" if jobs else "pending", "at": None,
                      "summary": "nothing to send"})
        steps.append({"step": "confirmed", "status": "none" if jobs else "pending", "at": None,
                      "summary": ""})
    else:
        states = {s["state"] for s in sends}
        by_dest: dict[str, list[Mapping[str, Any]]] = {}
        for s in sends:
            by_dest.setdefault(s["destination"], []).append(s)
        summary = "; ".join(
            f"{d}: {sum(1 for s in rows if s['state'] == 'sent')}/{len(rows)} sent, "
            f"{sum(s['attempts'] for s in rows)} attempt(s)" for d, rows in by_dest.items())
        sent_status = ("failed" if "dead" in states else
                       "done" if states == {"sent"} else "pending")
        steps.append({"step": "sent", "status": sent_status,
                      "at": max((s["sent_at"] or 0 for s in sends), default=None) or None,
                      "summary": summary})
        confirmed = states == {"sent"}
        statuses = sorted({f"0x{s['last_status']:04X}" for s in sends
                           if s["last_status"] is not None})
        steps.append({"step": "confirmed", "status": "done" if confirmed else sent_status,
                      "at": max((s["sent_at"] or 0 for s in sends), default=None)
                      if confirmed else None,
                      "summary": (f"all {len(sends)} result object(s) confirmed "
                                  f"(status {', '.join(statuses)})") if confirmed else
                      f"{sum(1 for s in sends if s['state'] == 'sent')} of {len(sends)} "
                      "confirmed"})
    return steps


_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*[:=]\s*(.*?)\s*$")


def parse_tags(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """Tags for the rule tester: a JSON object, or lines of ``Keyword: value`` (a
    backslash separates the values of a multi-valued attribute)."""
    warnings: list[str] = []
    attrs: dict[str, Any] = {}
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("{"):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"tags: not valid JSON: {exc.msg}") from None
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                m = _LINE.match(line)
                if m is None:
                    warnings.append(f"line {n}: expected 'Keyword: value'")
                    continue
                value = m.group(2)
                attrs[m.group(1)] = value.split("\\") if "\\" in value else value
            raw = attrs
    if not isinstance(raw, dict):
        raise ApiError(400, "tags: expected an object of keyword: value, or text lines")
    clean: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key not in SPECIAL_KEYS and tag_for_keyword(key) is None:
            warnings.append(f"{key}: not a DICOM keyword; ignored")
            continue
        if isinstance(value, str) and "\\" in value:
            value = value.split("\\")
        clean[key] = value
    return clean, warnings
