"""What the node tells operations about: plain method calls on one observer object.

The DICOM listener, the job runner and the outbox call these at the moments that
matter (an association accepted or refused, an instance stored, a job finished, a send
answered). A retrieve the node asked for (C-GET: the PACS stores on the node's own
association) is told as ``retrieve_started`` at its first store, then the same
``instance_stored``/``store_answered`` and ``association_closed`` as a caller's
association. Calls made on an association thread must stay cheap: counters and an
in-memory append, never a database write or an fsync (see ``dicomnode.ops.observer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from dicomnode.ingest.ledger import InstanceRecord, JobRow, OutboxRow

# Why an association was refused; also the ``reason`` label of the metric.
REJECT_REASONS = ("called-ae", "calling-ae", "local-limit", "user-identity", "pending-limit")


class NodeEvents(Protocol):
    def association_accepted(self, assoc: Any, calling_ae: str, address: str) -> None: ...

    def association_rejected(self, calling_ae: str, address: str, reason: str) -> None: ...

    def association_closed(self, assoc: Any) -> None: ...

    def retrieve_started(self, assoc: Any, peer_ae: str, address: str,
                         operation: str) -> None: ...

    def instance_stored(self, assoc: Any, record: InstanceRecord, outcome: str) -> None: ...

    def store_answered(self, assoc: Any, status: int, seconds: float) -> None: ...

    def closed(self, level: str, uid: str, reason: str) -> None: ...

    def job_finished(self, job: JobRow, state: str, seconds: float,
                     summary: Mapping[str, Any] | None, error: str | None) -> None: ...

    def send_answered(self, row: OutboxRow, ok: bool, status: int | None,
                      error: str | None) -> None: ...


class NoEvents:
    """The observer used when nobody listens (tests of single parts, tools)."""

    def association_accepted(self, assoc: Any, calling_ae: str, address: str) -> None:
        return None

    def association_rejected(self, calling_ae: str, address: str, reason: str) -> None:
        return None

    def association_closed(self, assoc: Any) -> None:
        return None

    def retrieve_started(self, assoc: Any, peer_ae: str, address: str,
                         operation: str) -> None:
        return None

    def instance_stored(self, assoc: Any, record: InstanceRecord, outcome: str) -> None:
        return None

    def store_answered(self, assoc: Any, status: int, seconds: float) -> None:
        return None

    def closed(self, level: str, uid: str, reason: str) -> None:
        return None

    def job_finished(self, job: JobRow, state: str, seconds: float,
                     summary: Mapping[str, Any] | None, error: str | None) -> None:
        return None

    def send_answered(self, row: OutboxRow, ok: bool, status: int | None,
                      error: str | None) -> None:
        return None


NO_EVENTS: NodeEvents = NoEvents()
