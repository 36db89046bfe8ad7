from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import CompletionSettings, parse_settings
from dicomnode.ingest.completion import CompletionTracker, expected_instances
from dicomnode.ingest.ledger import InstanceRecord, Ledger
from dicomnode.routing.router import Router
from tests.servers import Postgres


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def rec(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", sha: str | None = None,
        modality: str = "NM", expected: int | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.20", study_uid=study,
        series_uid=series, patient_key="p", accession_key=None, modality=modality,
        path=f"objects/xx/{sha or sop}.dcm", sha256=sha or sop, size=10,
        transfer_syntax="1.2.840.10008.1.2.1", calling_ae="PACS",
        attrs={"Modality": modality, "SeriesDescription": "DaTSCAN"},
        expected_count=expected, expected_by="NumberOfSlices" if expected else None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock, ledger_url: str | None) -> Iterator[Ledger]:
    """The same ledger tests on the embedded SQLite file and on PostgreSQL."""
    led = Ledger(tmp_path / "ledger.sqlite3", clock=clock, url=ledger_url)
    yield led
    led.dispose()


def tracker(ledger: Ledger, routes: list[dict[str, object]] | None = None) -> CompletionTracker:
    settings = parse_settings({"routes": routes or [
        {"name": "dat", "match": {"Modality": "NM"}, "pipeline": "dat_spect"},
        {"name": "study-nm", "level": "study", "match": {"Modality": "NM"},
         "pipeline": "dat_spect"}]})
    return CompletionTracker(ledger, Router(settings.routes),
                             CompletionSettings(series_quiet_s=10, study_quiet_s=30))


def test_duplicate_and_replacement_policy(ledger: Ledger) -> None:
    assert ledger.record_instance(rec("1.1")).kind == "new"
    assert ledger.record_instance(rec("1.1")).kind == "duplicate"
    replaced = ledger.record_instance(rec("1.1", sha="other"))
    assert replaced.kind == "replaced" and replaced.previous_path == "objects/xx/1.1.dcm"
    assert ledger.counts()["instances"]["stored"] == 1
    assert ledger.instance_paths(["1.2.3.1"]) == [("1.1", "objects/xx/other.dcm")]
    assert ledger.get_series("1.2.3.1").instance_count == 1  # type: ignore[union-attr]


def test_quiet_period_closes_series_then_study_and_creates_jobs(ledger: Ledger,
                                                                 clock: Clock) -> None:
    t = tracker(ledger)
    ledger.record_instance(rec("1.1"))
    clock.now += 9.9
    assert t.sweep() == []
    clock.now += 0.2
    closed = t.sweep()
    assert [(c.level, c.jobs) for c in closed] == [("series", 1)]
    assert "no new instance for 10 s" in closed[0].reason
    clock.now += 20
    closed = t.sweep()
    assert [(c.level, c.jobs) for c in closed] == [("study", 1)]
    jobs = ledger.jobs()
    assert [(j.route, j.level, j.series_uids) for j in jobs] == [
        ("dat", "series", ("1.2.3.1",)), ("study-nm", "study", ("1.2.3.1",))]


def test_evidence_closes_before_the_quiet_period(ledger: Ledger, clock: Clock) -> None:
    t = tracker(ledger)
    for i in range(3):
        ledger.record_instance(rec(f"1.{i}", expected=3))
        if i < 2:
            assert t.sweep() == []
    closed = t.sweep()
    assert closed and "all 3 instances expected by NumberOfSlices arrived" in closed[0].reason


def test_late_instance_reopens_with_a_new_generation(ledger: Ledger, clock: Clock) -> None:
    t = tracker(ledger)
    ledger.record_instance(rec("1.1"))
    clock.now += 11
    t.sweep()
    assert ledger.get_series("1.2.3.1").state == "complete"  # type: ignore[union-attr]
    outcome = ledger.record_instance(rec("1.2"))
    assert outcome.reopened
    series = ledger.get_series("1.2.3.1")
    assert series is not None and series.state == "open" and series.generation == 1
    clock.now += 11
    t.sweep()
    gens = sorted(j.generation for j in ledger.jobs() if j.route == "dat")
    assert gens == [0, 1]


def test_unmatched_series_are_recorded_and_left_alone(ledger: Ledger, clock: Clock) -> None:
    t = tracker(ledger)
    ledger.record_instance(rec("2.1", series="9.9.1", study="9.9", modality="CT"))
    clock.now += 40
    t.sweep()
    t.sweep()
    assert ledger.jobs() == []
    assert ledger.unmatched_series() == ["9.9.1"]
    reasons = ledger.route_decisions("9.9.1")
    assert any("Modality == 'NM'" in r for d in reasons for r in d["reasons"])


def test_job_lifecycle_and_crash_recovery(ledger: Ledger, clock: Clock) -> None:
    t = tracker(ledger, [{"name": "dat", "match": {"Modality": "NM"}, "pipeline": "dat_spect"}])
    ledger.record_instance(rec("1.1"))
    clock.now += 11
    t.sweep()
    job = ledger.claim_job()
    assert job is not None and job.attempts == 1 and ledger.claim_job() is None
    assert ledger.recover() == (1, 0)  # the process died while the job ran
    job = ledger.claim_job()
    assert job is not None and job.attempts == 2
    assert ledger.fail_job(job.id, "boom", max_attempts=3) == "pending"
    job = ledger.claim_job()
    assert job is not None
    assert ledger.fail_job(job.id, "boom", max_attempts=3) == "failed"
    assert ledger.failures()["failed_jobs"][0]["error"] == "boom"
    assert ledger.retry_job(job.id)
    job = ledger.claim_job()
    assert job is not None
    ledger.finish_job(job.id, {"ok": True}, [("9.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3",
                                              "results/aa/x.dcm")], ["pacs", "archive"])
    ledger.finish_job(job.id, {"ok": True}, [("9.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3",
                                              "results/aa/x.dcm")], ["pacs"])
    assert len(ledger.outbox()) == 2  # one per destination, never twice


def test_outbox_states(ledger: Ledger, clock: Clock) -> None:
    t = tracker(ledger, [{"name": "dat", "match": {"Modality": "NM"}, "pipeline": "dat_spect"}])
    ledger.record_instance(rec("1.1"))
    clock.now += 11
    t.sweep()
    job = ledger.claim_job()
    assert job is not None
    ledger.finish_job(job.id, {}, [("9.1", "c", "s", "results/aa/x.dcm")], ["pacs"])
    (row,) = ledger.due_outbox()
    ledger.mark_sending(row.id)
    assert ledger.due_outbox() == []
    assert ledger.recover() == (0, 1)
    (row,) = ledger.due_outbox()
    ledger.mark_send_failed(row.id, 0xA700, "full", clock.now + 5)
    assert ledger.due_outbox() == []
    clock.now += 6
    (row,) = ledger.due_outbox()
    ledger.mark_send_failed(row.id, None, "down", None)
    assert ledger.failures()["dead_letters"][0]["error"] == "down"
    assert ledger.retry_dead() == 1
    (row,) = ledger.due_outbox()
    ledger.mark_sent(row.id, 0)
    assert ledger.outbox("sent")[0].id == row.id


def test_expected_instances_evidence() -> None:
    from pydicom.dataset import Dataset

    nm = Dataset()
    nm.SOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    nm.NumberOfFrames = 64
    nm.NumberOfSlices = 64
    assert expected_instances(nm)[0] == 1
    nm.NumberOfFrames = 1
    assert expected_instances(nm) == (64, "NumberOfSlices 64")
    nm.NumberOfSlices = 1  # describes the object, not the series: no evidence
    assert expected_instances(nm) == (None, None)
    ct = Dataset()
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    assert expected_instances(ct) == (None, None)
    ct.ImagesInAcquisition = 40
    assert expected_instances(ct) == (40, "ImagesInAcquisition 40")


def test_patient_identifiers_are_hashed_with_a_salt(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "a.sqlite3")
    b = Ledger(tmp_path / "b.sqlite3")
    assert a.hash_identifier("PAT1") == a.hash_identifier("PAT1")
    assert a.hash_identifier("PAT1") != b.hash_identifier("PAT1")
    assert "PAT1" not in a.hash_identifier("PAT1")


def test_downtime_does_not_count_as_quiet(ledger: Ledger, clock: Clock) -> None:
    t = tracker(ledger)
    ledger.record_instance(rec("1.1"))
    clock.now += 60  # the node was down for a minute
    ledger.recover()
    assert t.sweep() == []
    clock.now += 10.1
    assert [c.level for c in t.sweep()] == ["series"]


def test_reopening_supersedes_queued_work_on_the_old_generation(ledger: Ledger,
                                                                 clock: Clock) -> None:
    t = tracker(ledger, [{"name": "dat", "match": {"Modality": "NM"}, "pipeline": "dat_spect"}])
    ledger.record_instance(rec("1.1"))
    clock.now += 11
    t.sweep()
    ledger.record_instance(rec("1.2"))
    assert [j.state for j in ledger.jobs()] == ["superseded"]
    clock.now += 11
    t.sweep()
    assert [(j.generation, j.state) for j in ledger.jobs()] == [(0, "superseded"), (1, "pending")]


def test_related_series_of_the_same_patient_within_the_window(ledger: Ledger,
                                                              clock: Clock) -> None:
    from dataclasses import replace

    from dicomnode.jobs.runner import JobRunner

    def study(sop: str, series: str, study_uid: str, modality: str, date: str,
              patient: str = "p") -> None:
        r = rec(sop, series=series, study=study_uid, modality=modality)
        ledger.record_instance(replace(r, patient_key=patient,
                                       attrs={"Modality": modality, "StudyDate": date}))

    study("1.1", "1.1.1", "1.1", "MR", "20260110")            # the study being analysed
    study("2.1", "2.1.1", "2.1", "CT", "20260101")            # 9 days earlier: related
    study("3.1", "3.1.1", "3.1", "CT", "20250101")            # a year earlier: too old
    study("4.1", "4.1.1", "4.1", "CT", "20260109", "other")   # another patient
    t = tracker(ledger, [{"name": "mr", "match": {"Modality": "MR"}, "pipeline": "dat_spect"}])
    clock.now += 40
    t.sweep()
    t.sweep()
    settings = parse_settings({"routes": [{"name": "mr", "match": {"Modality": "MR"},
                                           "pipeline": "dat_spect"}]})
    runner = JobRunner(settings, ledger)
    (job,) = ledger.jobs()
    related = runner._related(job, {"modalities": ["CT"], "window_days": 30})
    assert related == ("objects/xx/2.1.dcm",)
    assert runner._related(job, {"modalities": ["PT"], "window_days": 30}) == ()
    assert runner._related(job, None) == ()


def test_concurrent_claims_take_each_job_once(tmp_path: Path, ledger_url: str | None) -> None:
    """Two ledgers on one database (two processes, or two machines on PostgreSQL), two
    threads each: every job is claimed exactly once."""
    from dicomnode.ingest.ledger import NewJob, SeriesRow

    first = Ledger(tmp_path / "ledger.sqlite3", url=ledger_url)
    second = Ledger(tmp_path / "ledger.sqlite3", url=ledger_url)
    for i in range(40):
        first.record_instance(rec(f"1.{i}", series=f"1.2.3.{i}"))
        row = first.get_series(f"1.2.3.{i}")
        assert isinstance(row, SeriesRow)
        assert first.close_series(row, "test", [], [NewJob("dat", "dat_spect", "series",
                                                           row.series_uid, "1.2.3",
                                                           (row.series_uid,))])
    claimed: list[int] = []
    lock = threading.Lock()

    def work(led: Ledger) -> None:
        try:
            while (job := led.claim_job()) is not None:
                with lock:
                    claimed.append(job.id)
                led.finish_job(job.id, {}, [(f"9.{job.id}", "c", "1.2.3", "results/x.dcm")],
                               ["pacs"])
        finally:
            led.close()

    threads = [threading.Thread(target=work, args=(led,))
               for led in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(j.id for j in first.jobs()) and len(claimed) == 40
    assert {j.state for j in second.jobs()} == {"done"}
    assert len(second.outbox()) == 40
    first.dispose()
    second.dispose()


def test_readonly_ledger_reads_but_never_writes(tmp_path: Path,
                                                ledger_url: str | None) -> None:
    writer = Ledger(tmp_path / "ledger.sqlite3", url=ledger_url)
    writer.record_instance(rec("1.1"))
    reader = Ledger(tmp_path / "ledger.sqlite3", url=ledger_url, readonly=True)
    assert reader.counts()["instances"] == {"stored": 1}
    assert reader.hash_identifier("PAT") == writer.hash_identifier("PAT")
    with pytest.raises(Exception, match=r"(?i)read.?only"):
        reader.record_instance(rec("1.2"))
    assert writer.counts()["instances"] == {"stored": 1}
    reader.dispose()
    writer.dispose()


def test_jobs_handed_to_workers_are_claimed_once_and_come_back_when_lost(
        ledger: Ledger, clock: Clock) -> None:
    """The Celery engine's states: dispatched once, claimed once per message however
    often it is delivered, and a job whose worker was lost re-queued after its lease."""
    t = tracker(ledger, [{"name": "dat", "match": {"Modality": "NM"}, "pipeline": "dat_spect"}])
    for i in range(2):
        ledger.record_instance(rec(f"1.{i}", series=f"1.2.3.{i}"))
    clock.now += 11
    t.sweep()
    first, second = (j.id for j in ledger.jobs())
    assert ledger.dispatch_jobs() == [first, second]
    assert ledger.dispatch_jobs() == []  # published once
    assert ledger.claim_job() is None  # the in-process engine takes only pending jobs
    job = ledger.claim_job_id(first)
    assert job is not None and job.state == "running" and job.attempts == 1
    assert ledger.claim_job_id(first) is None  # the same message delivered again
    clock.now += 29
    assert ledger.expire_jobs(30, max_attempts=3) == (0, 0)
    clock.now += 2  # the worker running `first` is gone; `second` was never claimed
    assert ledger.expire_jobs(30, max_attempts=3) == (1, 1)
    assert {j.id: (j.state, j.attempts) for j in ledger.jobs()} == {
        first: ("pending", 1), second: ("pending", 0)}
    assert ledger.dispatch_jobs() == [first, second]
    job = ledger.claim_job_id(first)
    assert job is not None and job.attempts == 2
    ledger.finish_job(first, {}, [("9.1", "c", "1.2.3", "results/x.dcm")], ["pacs"])
    ledger.finish_job(first, {}, [("9.1", "c", "1.2.3", "results/x.dcm")], ["pacs"])
    assert ledger.claim_job_id(first) is None
    assert len(ledger.outbox()) == 1  # a repeated result is queued once
    # a re-opened series supersedes its queued job: the message then runs nothing
    ledger.record_instance(rec("1.9", series="1.2.3.1"))
    assert ledger.get_job(second).state == "superseded"  # type: ignore[union-attr]
    assert ledger.claim_job_id(second) is None
    # two senders sharing the ledger: only one claims a due result
    (row,) = ledger.due_outbox()
    assert ledger.mark_sending(row.id) and not ledger.mark_sending(row.id)


def test_postgres_serialises_writers_and_commits_ingest_without_waiting_for_the_wal(
        tmp_path: Path, pg_server: Postgres) -> None:
    """The SQLite bargain on PostgreSQL: record_instance's transaction commits with
    synchronous_commit off, every other transition with it on; each holds the advisory
    write lock."""
    ledger = Ledger(tmp_path / "unused.sqlite3", url=pg_server.create_database())
    seen = {}
    for sync in ("NORMAL", "FULL"):
        with ledger._write(sync) as c:
            seen[sync] = (c.execute("SHOW synchronous_commit").fetchone()[0],
                          c.execute("SELECT count(*) FROM pg_locks WHERE locktype='advisory' "
                                    "AND pid=pg_backend_pid()").fetchone()[0])
    assert seen == {"NORMAL": ("off", 1), "FULL": ("on", 1)}
    assert ledger._execute("SHOW synchronous_commit").fetchone()[0] == "on"
    ledger.dispose()
