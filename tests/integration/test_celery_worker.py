"""A ``dicomnode worker`` (Celery, with real Redis and real RabbitMQ as the broker)
beside a receiver: what a job finished on the worker leaves behind besides its results.

The receiver runs in this process (``jobs.engine: celery``: it only dispatches); the
worker is the real command in its own process, sharing the SQLite ledger and the spool
with the receiver and keeping its own storage folder. Two studies of one patient go
through a volume route: the worker records each volume and files a history request in
the ledger, the receiver takes the requests and runs the patient's growth job (its
results queued); the worker's own ``/metrics`` shows the job durations and its own
audit trail the analyses.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicomnode.config import parse_settings
from dicomnode.ops.audit import AuditTrail
from dicomnode.phantoms.brain_mr import write_brain_mr_growth_study
from dicomnode.service import Node
from tests.peers import free_port, node_config, storescu, wait_for
from tests.servers import RabbitMQ, Redis, start_worker

TOKEN = "worker-metrics-token-0123456789"


def _scrape(port: int, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


def test_a_job_finished_on_a_worker_updates_the_timeline_metrics_and_audit(
        tmp_path: Path, celery_broker: Redis | RabbitMQ) -> None:
    files = write_brain_mr_growth_study(tmp_path / "phantoms", seed=41, volumes_cm3=[3.0, 4.5],
                                        matrix=64, n_slices=8)
    dates = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).StudyDate)
                    for f in files if f.suffix == ".dcm"})
    shared = tmp_path / "receiver"
    worker_port = free_port()

    def config(storage: Path, port: int) -> dict[str, object]:
        return node_config(
            storage, port,
            routes=[{"name": "tumour-volume", "match": {"Modality": "MR"},
                     "pipeline": "volume_standin", "send_to": [],
                     "options": {"volumes": {dates[0]: 3.0, dates[1]: 4.5}}}],
            # growth results go to a PACS that is down: they wait in the outbox
            destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                   "port": free_port()}},
            extra={"pipelines": {"volume_standin":
                                 "tests.support.volume_pipeline:VolumeStandIn"},
                   "node": {"spool": str(shared)},
                   "ledger": {"url": f"sqlite:///{shared / 'ledger.sqlite3'}"},
                   "jobs": {"engine": "celery", "broker": celery_broker.url},
                   "query": {"send_to": ["pacs"]},
                   "web": {"port": free_port(), "worker_port": worker_port,
                           "tokens": [{"name": "prometheus", "token": TOKEN}]}})

    port = free_port()
    node = Node(parse_settings(config(shared, port)))
    node.start()
    worker = None
    try:
        worker = start_worker(tmp_path / "worker", config(tmp_path / "worker", free_port()))
        storescu(port, [f for f in files if f.suffix == ".dcm"])

        def growth_queued() -> bool:
            return len([r for r in node.ledger.outbox() if r.job_id is None]) == 2

        wait_for(growth_queued, 120, "the growth SR and plot queued by the receiver")
        jobs = node.ledger.jobs()
        assert sorted(j.state for j in jobs) == ["done", "done"]
        patient = node.ledger.study_patient_key(jobs[0].study_uid)
        assert patient is not None
        assert [p.volume_cm3 for p in node.ledger.timeline_points(patient)] == [3.0, 4.5]
        requests = node.ledger.history_requests()
        assert sorted(r[0] for r in requests) == sorted(j.id for j in jobs)
        assert {r[3] for r in requests} == {node.history.holder}, "taken by the receiver"
        assert sorted(r.sop_class_uid for r in node.ledger.outbox() if r.job_id is None) == \
            sorted([Comprehensive3DSRStorage, SecondaryCaptureImageStorage])
        assert "history requested from the receivers" in worker.log_text()

        # the worker's own /metrics: its jobs, not the ledger's queues (the receivers')
        assert _scrape(worker_port, None)[0] == 401
        status, text = _scrape(worker_port, TOKEN)
        assert status == 200
        assert ('dicomnode_job_duration_seconds_count{outcome="done",pipeline="volume_standin"}'
                ' 2.0') in text
        assert "dicomnode_queue_depth" not in text
        assert "dicomnode_job_duration_seconds_count" not in \
            node.ops.metrics.exposition().decode()

        # its own audit trail, in its own storage folder, chained
        worker.kill(signal.SIGTERM)
        trail = AuditTrail(tmp_path / "worker" / "audit.sqlite3")
        try:
            analyses = trail.records(kind="analysis")
            assert sorted(r.detail["job"] for r in analyses) == sorted(j.id for j in jobs)
            assert {(r.detail["role"], r.detail["patient_key"], r.detail["state"])
                    for r in analyses} == {("worker", patient, "done")}
            assert [(r.detail["action"], r.detail["role"])
                    for r in trail.records(kind="application")] == [("start", "worker"),
                                                                    ("stop", "worker")]
            assert trail.verify() is None
        finally:
            trail.close()
    finally:
        if worker is not None:
            worker.kill()
        node.stop()
