"""Operations' view of the node: turns node events into metrics and audit records.

Calls that arrive on an association thread (``association_*``, ``instance_stored``,
``store_answered``) touch only counters and an in-memory tally hung on the association;
the tally becomes one audit record per study when the association ends. Everything that
needs the ledger (patient keys, timings) runs on the sweep, job and outbox threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dicomnode.config import Settings
from dicomnode.ingest.ledger import InstanceRecord, JobRow, OutboxRow
from dicomnode.ops.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditTrail
from dicomnode.ops.metrics import NodeMetrics
from dicomnode.ops.reader import LedgerReader

log = logging.getLogger(__name__)

_TALLY_ATTR = "_dicomnode_tally"


@dataclass
class _StudyTally:
    patient_key: str
    instances: int = 0
    bytes: int = 0
    sop_classes: dict[str, int] = field(default_factory=dict)


@dataclass
class _AssociationTally:
    calling_ae: str  # the AE that sent the instances
    address: str
    studies: dict[str, _StudyTally] = field(default_factory=dict)
    failed: int = 0
    retrieve: str | None = None  # "C-GET" when the node opened the association


def config_digest(settings: Settings) -> str:
    """SHA-256 of the configuration file as written (or of the settings when built in
    code), the identity of a configuration in the audit trail."""
    if settings.source is not None and settings.source.is_file():
        return hashlib.sha256(settings.source.read_bytes()).hexdigest()
    return hashlib.sha256(repr(settings).encode()).hexdigest()


class Operations:
    """Implements ``dicomnode.ops.events.NodeEvents`` with metrics and the audit trail."""

    def __init__(self, settings: Settings, reader: LedgerReader, audit: AuditTrail, *,
                 role: str = "receiver") -> None:
        """``role``: ``receiver`` (``serve``) or ``worker`` (``dicomnode worker``, which
        runs jobs only: its metrics leave out the ledger's queue depths, which every
        receiver reports)."""
        self.settings = settings
        self.reader = reader
        self.audit = audit
        self.role = role
        self.metrics = NodeMetrics(
            queue_counts=self._queue_counts if role == "receiver" else None)
        self.audit.on_written = self.metrics.audit_records.inc
        forwarder = self.audit.forwarder
        if forwarder is not None:
            forwarder.on_sent = self.metrics.audit_forwarded.inc
            forwarder.on_failed = self.metrics.audit_forward_failures.inc
            forwarder.on_dropped = self.metrics.audit_forward_dropped.inc
            self.metrics.audit_forward_backlog.set_function(forwarder.backlog)
        self._pid = os.getpid()

    def _queue_counts(self) -> Mapping[str, Mapping[str, int]]:
        return self.reader.queue_counts()

    # -- application -------------------------------------------------------------------

    def started(self) -> None:
        digest = config_digest(self.settings)
        previous = self.audit.last("configuration")
        source = str(self.settings.source or "<built in code>")
        if previous is None or previous.detail.get("config_sha256") != digest:
            self.audit.append("configuration", config_sha256=digest, source=source,
                              previous_sha256=(previous.detail.get("config_sha256")
                                               if previous else None),
                              routes=[r.name for r in self.settings.routes],
                              destinations=sorted(self.settings.destinations), pid=self._pid)
        self.audit.append("application", action="start", config_sha256=digest, pid=self._pid,
                          ae_title=self.settings.node.ae_title, role=self.role)

    def stopped(self) -> None:
        self.audit.append("application", action="stop", pid=self._pid,
                          ae_title=self.settings.node.ae_title, role=self.role)

    # -- association thread: cheap ------------------------------------------------------

    def association_accepted(self, assoc: Any, calling_ae: str, address: str) -> None:
        self.metrics.associations.inc()
        setattr(assoc, _TALLY_ATTR, _AssociationTally(calling_ae, address))

    def association_rejected(self, calling_ae: str, address: str, reason: str) -> None:
        self.metrics.rejections.labels(reason).inc()
        self.audit.append("association-rejected", MINOR_FAILURE, calling_ae=calling_ae,
                          address=address, why=reason, pid=self._pid)

    def retrieve_started(self, assoc: Any, peer_ae: str, address: str,
                         operation: str) -> None:
        """The node's own retrieve association (C-GET) began storing: tallied like a
        caller's association, so its stores are audited the same way when it ends."""
        setattr(assoc, _TALLY_ATTR, _AssociationTally(peer_ae, address, retrieve=operation))

    def instance_stored(self, assoc: Any, record: InstanceRecord, outcome: str) -> None:
        self.metrics.instances.labels(outcome).inc()
        self.metrics.bytes.inc(record.size)
        tally: _AssociationTally | None = getattr(assoc, _TALLY_ATTR, None)
        if tally is None:
            return
        study = tally.studies.get(record.study_uid)
        if study is None:
            study = tally.studies[record.study_uid] = _StudyTally(record.patient_key)
        study.instances += 1
        study.bytes += record.size
        study.sop_classes[record.sop_class_uid] = study.sop_classes.get(
            record.sop_class_uid, 0) + 1

    def store_answered(self, assoc: Any, status: int, seconds: float) -> None:
        self.metrics.ingest.observe(seconds)
        if status != 0 and not 0xB000 <= status <= 0xBFFF:  # failure, not success/warning
            self.metrics.store_failures.labels(f"0x{status:04X}").inc()
            tally: _AssociationTally | None = getattr(assoc, _TALLY_ATTR, None)
            if tally is not None:
                tally.failed += 1

    def association_closed(self, assoc: Any) -> None:
        tally: _AssociationTally | None = getattr(assoc, _TALLY_ATTR, None)
        if tally is None:
            return
        setattr(assoc, _TALLY_ATTR, None)
        via: dict[str, Any] = {"retrieve": tally.retrieve} if tally.retrieve else {}
        self.audit.append("association", SUCCESS if not tally.failed else MINOR_FAILURE,
                          calling_ae=tally.calling_ae, address=tally.address,
                          studies=len(tally.studies),
                          instances=sum(s.instances for s in tally.studies.values()),
                          failed_stores=tally.failed, pid=self._pid,
                          why=f"{tally.failed} store(s) refused" if tally.failed else None,
                          **via)
        for study_uid, s in tally.studies.items():
            self.audit.append("store", calling_ae=tally.calling_ae, address=tally.address,
                              study_uid=study_uid, patient_key=s.patient_key,
                              instances=s.instances, bytes=s.bytes,
                              sop_classes=dict(s.sop_classes), pid=self._pid, **via)

    # -- off the association thread --------------------------------------------------

    def closed(self, level: str, uid: str, reason: str) -> None:
        times = self.reader.closed_times(level, uid)
        if times is not None:
            last, closed_at = times
            by = "evidence" if reason.startswith("all ") else "quiet"
            self.metrics.completion_wait.labels(level, by).observe(max(0.0, closed_at - last))

    def job_finished(self, job: JobRow, state: str, seconds: float,
                     summary: Mapping[str, Any] | None, error: str | None) -> None:
        outcome = "done" if state == "done" else ("retry" if state == "pending" else "failed")
        self.metrics.job_duration.labels(job.pipeline, outcome).observe(seconds)
        summary = summary or {}
        indicator = SUCCESS if state == "done" else (
            MINOR_FAILURE if state == "pending" else SERIOUS_FAILURE)
        self.audit.append("analysis", indicator, job=job.id, route=job.route,
                          pipeline=job.pipeline, version=summary.get("version"),
                          study_uid=job.study_uid,
                          patient_key=self.reader.study_patient_key(job.study_uid),
                          series=len(job.series_uids), state=state,
                          seconds=round(seconds, 3), objects=summary.get("objects"),
                          why=(error or "").splitlines()[0][:300] if error else None,
                          pid=self._pid, role=self.role)

    def send_answered(self, row: OutboxRow, ok: bool, status: int | None,
                      error: str | None) -> None:
        dest = self.settings.destinations.get(row.destination)
        self.metrics.send_attempts.labels(row.destination).inc()
        if not ok:
            self.metrics.send_failures.labels(row.destination).inc()
        self.audit.append("send", SUCCESS if ok else MINOR_FAILURE, outbox=row.id,
                          job=row.job_id, destination=row.destination,
                          destination_ae=dest.ae_title if dest else None,
                          destination_host=dest.host if dest else None,
                          study_uid=row.study_uid,
                          patient_key=self.reader.study_patient_key(row.study_uid),
                          sop_classes={row.sop_class_uid: 1}, status=status,
                          attempt=row.attempts + 1, why=error, pid=self._pid)
        if ok and row.job_id is not None:
            latency = self.reader.job_confirmed_latency(row.job_id, row.destination)
            if latency is not None:
                self.metrics.result_latency.labels(row.destination).observe(latency)
