"""The status API's read side on a ledger filled through the ledger's own transitions,
on the embedded SQLite file and on PostgreSQL (``ledger_url``, tests/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import CompletionSettings, parse_settings
from dicomnode.ingest.completion import CompletionTracker
from dicomnode.ingest.ledger import InstanceRecord, Ledger
from dicomnode.ops.reader import LedgerReader
from dicomnode.routing.router import Router
from dicomnode.web.api import _steps

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def rec(sop: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
        series_uid="1.2.3.1", patient_key="pkey", accession_key="akey", modality="CT",
        path=f"objects/{sop}.dcm", sha256=sop, size=1000,
        transfer_syntax="1.2.840.10008.1.2.1", calling_ae="CT1",
        attrs={"Modality": "CT", "SeriesDescription": "head"})


@pytest.fixture
def filled(tmp_path: Path, ledger_url: str | None) -> Iterator[tuple[Ledger, Clock, int]]:
    clock = Clock()
    ledger = Ledger(tmp_path / "ledger.sqlite3", clock=clock, url=ledger_url)
    settings = parse_settings({"routes": [{"name": "ct", "match": {"Modality": "CT"},
                                           "pipeline": "dat_spect"}]})
    tracker = CompletionTracker(ledger, Router(settings.routes),
                                CompletionSettings(series_quiet_s=10, study_quiet_s=30))
    ledger.record_instance(rec("1.1"))
    clock.now += 2
    ledger.record_instance(rec("1.2"))
    clock.now += 40
    tracker.sweep()
    clock.now += 31
    tracker.sweep()
    job = ledger.claim_job()
    assert job is not None
    clock.now += 5
    ledger.finish_job(job.id, {"version": "7"}, [("9.1", SC_CLASS, "1.2.3", "results/x")],
                      ["pacs"])
    (row,) = ledger.due_outbox()
    ledger.mark_sending(row.id)
    clock.now += 1
    ledger.mark_sent(row.id, 0)
    yield ledger, clock, job.id
    ledger.dispose()


def test_reader_sees_a_study_through_to_confirmed(tmp_path: Path, ledger_url: str | None,
                                                  filled: tuple[Ledger, Clock, int]) -> None:
    _, _, job_id = filled
    reader = LedgerReader(tmp_path / "ledger.sqlite3", ledger_url)
    try:
        assert reader.readable()
        (study,) = reader.studies()
        assert (study["instances"], study["series"], study["modalities"]) == (2, 1, ["CT"])
        assert study["outcome"] == {"jobs_done": 1, "results_sent": 1}
        assert reader.studies(patient_key="pkey") == [study]
        assert reader.studies(accession_key="akey") == [study]
        assert reader.studies(patient_key="someone-else") == []
        timeline = reader.timeline("1.2.3")
        assert timeline is not None and timeline["sources"] == ["CT1"]
        assert [j["duration_s"] for j in timeline["jobs"]] == [5.0]
        assert [s["state"] for s in timeline["sends"]] == ["sent"]
        assert [s["status"] for s in _steps(timeline)] == ["done"] * 6
        assert reader.timeline("9.9.9") is None
        last, closed = reader.closed_times("series", "1.2.3.1") or (0.0, 0.0)
        assert closed - last == 40
        # last instance at t0+2, confirmed at t0+2+40+31+5+1
        assert reader.job_confirmed_latency(job_id, "pacs") == 77
        assert reader.queue_counts() == {"jobs": {"done": 1}, "outbox": {"sent": 1}}
        queues = reader.queues()
        assert queues["dead_letters"] == [] and queues["pending_jobs"] == []
        assert reader.series_attrs("1.2.3.1") == ({"Modality": "CT",
                                                   "SeriesDescription": "head"}, "CT1")
        assert reader.study_patient_key("1.2.3") == "pkey"
        assert reader.first_instance_path("1.2.3") in ("objects/1.1.dcm", "objects/1.2.dcm")
    finally:
        reader.close()
