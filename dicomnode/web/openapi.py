"""The OpenAPI 3.1 description of the node's HTTP API (served at /api/openapi.json)."""

from __future__ import annotations

from typing import Any

from dicomnode import __version__ as _version


def _ok(description: str, schema: dict[str, Any] | None = None,
        media: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {media: {"schema": schema or {"type": "object"}}}},
            "401": {"$ref": "#/components/responses/Unauthorized"}}


_UID = {"name": "uid", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[0-9.]{1,64}$"}}
_ID = {"in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}


def openapi_document() -> dict[str, Any]:
    op = "operate (role operator or clinical)"
    return {
        "openapi": "3.1.0",
        "info": {"title": "dicomnode status API", "version": _version,
                 "description": "Where each study is, what failed and why, who sent what. "
                                "Patient identifiers appear only for the clinical role; "
                                "otherwise patients are named by the node's salted hash."},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Unauthorized": {"description": "no or unknown bearer token"}},
            "schemas": {
                "Study": {"type": "object", "properties": {
                    "study_uid": {"type": "string"}, "patient_key": {"type": "string"},
                    "state": {"type": "string", "enum": ["open", "complete"]},
                    "instances": {"type": "integer"}, "series": {"type": "integer"},
                    "modalities": {"type": "array", "items": {"type": "string"}},
                    "first_received": {"type": "number"}, "last_received": {"type": "number"},
                    "outcome": {"type": "object"}}},
                "Step": {"type": "object", "properties": {
                    "step": {"type": "string", "enum": ["received", "complete", "routed",
                                                         "analysed", "sent", "confirmed"]},
                    "status": {"type": "string",
                               "enum": ["done", "pending", "failed", "none"]},
                    "at": {"type": ["number", "null"]}, "summary": {"type": "string"}}},
                "Timeline": {"type": "object", "properties": {
                    "study": {"$ref": "#/components/schemas/Study"},
                    "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Step"}},
                    "sources": {"type": "array", "items": {"type": "string"}},
                    "series": {"type": "array", "items": {"type": "object"}},
                    "route_decisions": {"type": "array", "items": {"type": "object"}},
                    "jobs": {"type": "array", "items": {"type": "object"}},
                    "sends": {"type": "array", "items": {"type": "object"}},
                    "patient": {"type": "object",
                                "description": "only for the clinical role"}}},
                "Search": {"type": "object", "properties": {
                    "accession": {"type": "string"}, "patient_id": {"type": "string"},
                    "issuer": {"type": "string"}, "patient_key": {"type": "string"},
                    "study_uid": {"type": "string"}}},
                "RuleTest": {"type": "object", "properties": {
                    "series_uid": {"type": "string"},
                    "tags": {"oneOf": [{"type": "object"}, {"type": "string"}],
                             "description": "keyword: value, as JSON or text lines"}}},
            },
        },
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "security": [],
                                 "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: listener, ledger, workers, scheduler",
                                "security": [],
                                "responses": {"200": {"description": "ready"},
                                              "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": _ok("exposition", {"type": "string"},
                                                  "text/plain")}},
            "/api/openapi.json": {"get": {"summary": "This document", "security": [],
                                          "responses": {"200": {"description": "OpenAPI"}}}},
            "/api/whoami": {"get": {"summary": "The caller's token name and role",
                                    "responses": _ok("caller")}},
            "/api/studies": {"get": {"summary": "Recently received studies",
                                     "parameters": [_LIMIT],
                                     "responses": _ok("studies")}},
            "/api/studies/search": {"post": {
                "summary": "Find studies by accession number, Patient ID (hashed by the node), "
                           "hashed patient key or Study Instance UID (POST keeps them out of "
                           "URLs and logs)",
                "requestBody": {"content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Search"}}}},
                "responses": _ok("studies")}},
            "/api/studies/{uid}": {"get": {
                "summary": "A study's timeline: received, complete, routed, analysed, sent, "
                           "confirmed", "parameters": [_UID],
                "responses": {**_ok("timeline", {"$ref": "#/components/schemas/Timeline"}),
                              "404": {"description": "not in the ledger"}}}},
            "/api/queues": {"get": {"summary": "Pending and running jobs, failed jobs, the "
                                               "outbox and dead letters",
                                    "responses": _ok("queues")}},
            "/api/outbox/{oid}/retry": {"post": {
                "summary": f"Re-queue one dead letter; needs {op}",
                "parameters": [{"name": "oid", **_ID}],
                "responses": {**_ok("re-queued"), "409": {"description": "not a dead letter"}}}},
            "/api/outbox/retry-dead": {"post": {
                "summary": f"Re-queue every dead letter; needs {op}",
                "responses": _ok("re-queued")}},
            "/api/jobs/{jid}/retry": {"post": {
                "summary": f"Re-queue a failed job; needs {op}",
                "parameters": [{"name": "jid", **_ID}],
                "responses": {**_ok("re-queued"), "409": {"description": "not failed"}}}},
            "/api/routes": {"get": {"summary": "Configured routes and their conditions",
                                    "responses": _ok("routes")}},
            "/api/routes/test": {"post": {
                "summary": "Rule tester: which routes match a received series or pasted "
                           "tags, and why",
                "requestBody": {"content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/RuleTest"}}}},
                "responses": _ok("verdicts")}},
            "/api/series": {"get": {"summary": "Recently received series (for the tester)",
                                    "parameters": [_LIMIT], "responses": _ok("series")}},
            "/api/models": {"get": {"summary": "Model packages with their cards",
                                    "responses": _ok("packages")}},
            "/api/audit": {"get": {
                "summary": "The audit trail, as JSON or as DICOM audit messages "
                           "(PS3.15 A.5, IHE ATNA)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    _LIMIT,
                    {"name": "kind", "in": "query", "schema": {"type": "string"}},
                    {"name": "format", "in": "query",
                     "schema": {"type": "string", "enum": ["json", "atna"]}}],
                "responses": _ok("records")}},
        },
    }
