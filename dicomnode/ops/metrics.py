"""Prometheus metrics of one node, in a registry of its own.

A registry per node (not prometheus_client's global one) so that several nodes in one
process, as in tests, do not share counters. Queue depths are read from the ledger at
scrape time rather than kept in memory, so they are right after a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only double what a scraper sees

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; the ingest path is milliseconds, completion and delivery seconds to hours
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class _QueueDepth(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("dicomnode_queue_depth",
                                   "Rows in the ledger's queues by state",
                                   labels=["queue", "state"])
        counts = self._counts()
        for queue, states in (("jobs", ("pending", "running", "failed")),
                              ("outbox", ("pending", "sending", "dead"))):
            by_state = counts.get(queue, {})
            for state in states:
                family.add_metric([queue, state], float(by_state.get(state, 0)))
        yield family


class NodeMetrics:
    def __init__(self, queue_counts: Callable[[], Mapping[str, Mapping[str, int]]] | None = None
                 ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Counter("dicomnode_instances_received",
                                 "Instances stored, by ledger outcome (new, duplicate, replaced)",
                                 ["outcome"], registry=r)
        self.bytes = Counter("dicomnode_bytes_received", "Bytes of instances stored",
                             registry=r)
        self.associations = Counter("dicomnode_associations_accepted",
                                    "Associations accepted", registry=r)
        self.rejections = Counter("dicomnode_associations_rejected",
                                  "Associations refused, by reason", ["reason"], registry=r)
        self.store_failures = Counter("dicomnode_stores_failed",
                                      "C-STORE requests answered with a failure status",
                                      ["status"], registry=r)
        self.ingest = Histogram("dicomnode_ingest_seconds",
                                "C-STORE handler time once the data set has arrived (check, "
                                "fsync, rename, record, answer)", buckets=_FAST, registry=r)
        self.completion_wait = Histogram(
            "dicomnode_completion_wait_seconds",
            "From the last instance of a series or study to its completion",
            ["level", "by"], buckets=_SLOW, registry=r)
        self.job_duration = Histogram("dicomnode_job_duration_seconds",
                                      "Analysis job run time, by pipeline and outcome",
                                      ["pipeline", "outcome"], buckets=_SLOW, registry=r)
        self.send_attempts = Counter("dicomnode_send_attempts",
                                     "Result objects sent (each attempt), by destination",
                                     ["destination"], registry=r)
        self.send_failures = Counter("dicomnode_send_failures",
                                     "Result sends that failed, by destination",
                                     ["destination"], registry=r)
        self.result_latency = Histogram(
            "dicomnode_last_instance_to_confirmed_seconds",
            "From the last instance a job analysed to the destination confirming all its "
            "results", ["destination"], buckets=_SLOW, registry=r)
        self.audit_records = Counter("dicomnode_audit_records",
                                     "Records appended to the audit trail", registry=r)
        self.audit_forwarded = Counter(
            "dicomnode_audit_forwarded",
            "Audit records sent to the Audit Record Repository (audit.syslog)", registry=r)
        self.audit_forward_failures = Counter(
            "dicomnode_audit_forward_failures",
            "Failed attempts to send an audit record to the Audit Record Repository (the "
            "record is tried again)", registry=r)
        self.audit_forward_dropped = Counter(
            "dicomnode_audit_forward_dropped",
            "Audit records never sent to the Audit Record Repository (too large for a UDP "
            "datagram, or not renderable); the local trail keeps them", registry=r)
        self.audit_forward_backlog = Gauge(
            "dicomnode_audit_forward_backlog",
            "Records of the audit file not yet sent to the Audit Record Repository (after "
            "its cursor; sent when the repository can be reached)", registry=r)
        if queue_counts is not None:
            r.register(_QueueDepth(queue_counts))

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
