"""Scheduling of history jobs: persistence across restarts, throttling, off-peak window."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.history.jobstore import SqliteJobStore
from dicomnode.history.priors import MoveThrottle, OffPeakWindow
from dicomnode.ingest.ledger import Ledger, TimelineRow
from tests.peers import free_port

RAN: list[str] = []
RAN_EVENT = threading.Event()


def record_run(value: str) -> None:
    RAN.append(value)
    RAN_EVENT.set()


def scheduler_on(path: Path) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.add_jobstore(SqliteJobStore(path), "history")
    return scheduler


def test_a_job_survives_a_restart_of_the_scheduler_on_the_same_store(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)  # the store lives in the ledger database, beside its tables
    first = scheduler_on(path)
    first.start(paused=True)
    later = datetime.now(UTC) + timedelta(hours=1)
    first.add_job(f"{__name__}:record_run", "date", run_date=later, args=["after restart"],
                  id="volume-pk-1", jobstore="history", misfire_grace_time=None)
    first.shutdown(wait=True)

    RAN.clear()
    RAN_EVENT.clear()
    second = scheduler_on(path)
    second.start()
    try:
        job = second.get_job("volume-pk-1", jobstore="history")
        assert job is not None and job.args == ("after restart",)
        assert abs(job.next_run_time.timestamp() - later.timestamp()) < 1
        job.modify(next_run_time=datetime.now(UTC))
        assert RAN_EVENT.wait(10)
        assert RAN == ["after restart"]
        # a one-off job is gone once it ran, also from the database
        assert second.get_job("volume-pk-1", jobstore="history") is None
    finally:
        second.shutdown(wait=True)
    assert ledger.timeline_points("none") == []  # the ledger is still readable


def test_a_job_missed_while_the_node_was_down_runs_on_start(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    first = scheduler_on(path)
    first.start(paused=True)
    first.add_job(f"{__name__}:record_run", "date",
                  run_date=datetime.now(UTC) + timedelta(seconds=0.5), args=["missed"],
                  id="volume-pk-2", jobstore="history", misfire_grace_time=None)
    first.shutdown(wait=True)
    RAN.clear()
    RAN_EVENT.clear()
    second = scheduler_on(path)
    second.start()
    try:
        assert RAN_EVENT.wait(10)
        assert RAN == ["missed"]
        # APScheduler removes a one-off job just after handing it to the executor; a
        # shutdown inside that moment makes its scheduler thread raise JobLookupError (the
        # job stays stored and runs again at the next start: history jobs are idempotent)
        deadline = time.monotonic() + 10
        while second.get_job("volume-pk-2", jobstore="history") is not None:
            assert time.monotonic() < deadline, "the one-off job was never removed"
            time.sleep(0.01)
    finally:
        second.shutdown(wait=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_throttle_allows_n_moves_in_any_minute() -> None:
    clock = FakeClock()
    throttle = MoveThrottle(3, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(7):
        assert throttle.acquire()
        starts.append(clock.now)
        clock.now += 1.0  # each move takes a second
    assert starts == [100.0, 101.0, 102.0, 160.0, 161.0, 162.0, 220.0]
    assert all(b - a >= 60.0 for a, b in zip(starts, starts[3:], strict=False))


def test_the_throttle_gives_up_at_a_deadline_instead_of_waiting_past_it() -> None:
    clock = FakeClock()
    throttle = MoveThrottle(1, clock=clock, sleep=clock.sleep)
    assert throttle.acquire()
    assert not throttle.acquire(deadline=clock.now + 30)
    assert clock.slept == []
    assert throttle.acquire(deadline=clock.now + 90)
    with pytest.raises(ValueError):
        MoveThrottle(0)


def test_the_off_peak_window_wraps_midnight() -> None:
    window = OffPeakWindow.parse("22:00-06:00")
    day = datetime(2026, 3, 1)
    assert window.contains(day.replace(hour=23, minute=30))
    assert window.contains(day.replace(hour=5, minute=59))
    assert not window.contains(day.replace(hour=6))
    assert not window.contains(day.replace(hour=12))
    assert window.closes_at(day.replace(hour=23)) == datetime(2026, 3, 2, 6, 0)
    assert window.closes_at(day.replace(hour=2)) == datetime(2026, 3, 1, 6, 0)
    assert window.closes_at(day.replace(hour=12)) is None
    daytime = OffPeakWindow.parse("12:00-13:30")
    assert daytime.contains(day.replace(hour=13, minute=29))
    assert not daytime.contains(day.replace(hour=13, minute=30))
    for bad in ("22:00", "10:00-10:00", "ab-cd"):
        with pytest.raises(ValueError):
            OffPeakWindow.parse(bad)


def _history(tmp_path: Path, off_peak: str | None, now: datetime) -> tuple[Any, Ledger]:
    from dicomnode.config import parse_settings
    from dicomnode.history.jobs import HistoryService
    from dicomnode.ingest.spool import Spool

    settings = parse_settings({
        "node": {"storage": str(tmp_path / "var")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                  "port": free_port()}},
        "query": {"source": "pacs", "nightly": "02:00", "off_peak": off_peak,
                  "timeout_s": 2}})
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.add_timeline_point(TimelineRow("pk", "2.25.1", "1.2.3", "20250101", 4.0, "1.2.3.9",
                                          "node"))
    return HistoryService(settings, ledger, Spool(tmp_path / "var"), now=lambda: now), ledger


def test_the_nightly_job_moves_nothing_outside_its_off_peak_window(tmp_path: Path) -> None:
    noon = datetime(2026, 3, 1, 12, 0)
    history, ledger = _history(tmp_path, "22:00-06:00", noon)
    history.run_nightly()
    assert ledger.retrieve_events() == []
    # inside the window every patient with a timeline is tried (here: nothing names it)
    history.now = lambda: datetime(2026, 3, 1, 23, 0)
    history.run_nightly()
    (event,) = ledger.retrieve_events()
    assert event.patient_key == "pk" and event.outcome == "error"


def test_a_nightly_time_outside_the_off_peak_window_is_a_config_error() -> None:
    from dicomnode.config import ConfigError, parse_settings

    with pytest.raises(ConfigError, match=r"query.nightly: 12:00 lies outside query.off_peak"):
        parse_settings({"query": {"nightly": "12:00", "off_peak": "22:00-06:00"}})
    assert parse_settings({"query": {"nightly": "23:30", "off_peak": "22:00-06:00"}})


def test_the_nightly_run_is_claimed_once_per_date_by_one_of_several_receivers(
        tmp_path: Path) -> None:
    """Receivers sharing a ledger, each with ``query.source`` and its own scheduler: only
    the first to reach the nightly run of a date runs it."""
    night = datetime(2026, 3, 1, 23, 0)
    first, ledger = _history(tmp_path, "22:00-06:00", night)
    second, _ = _history(tmp_path, "22:00-06:00", night)
    first.holder, second.holder = "r1", "r2"
    first.run_nightly()
    second.run_nightly()
    (event,) = ledger.retrieve_events()  # one receiver tried the one patient
    assert event.patient_key == "pk"
    assert not ledger.claim_once("history-nightly:2026-03-01", "r3")
    second.now = lambda: datetime(2026, 3, 2, 23, 0)  # the next night is its own claim
    second.run_nightly()
    assert len(ledger.retrieve_events()) == 2


def test_a_volume_finished_anywhere_is_scheduled_by_exactly_one_receiver(
        tmp_path: Path, ledger_url: str | None) -> None:
    """A worker (any process sharing the ledger) files the finished job's volume; two
    receivers take requests at the same moment; one schedules the patient's history."""
    from apscheduler.jobstores.memory import MemoryJobStore
    from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, MRImageStorage

    from dicomnode.config import parse_settings
    from dicomnode.history.jobs import JOBSTORE, HistoryService, volume_follow_up, volume_job_id
    from dicomnode.ingest.ledger import InstanceRecord, JobRow
    from dicomnode.ingest.spool import Spool

    def ledger_of(name: str) -> Ledger:  # every process opens the shared ledger itself
        return Ledger(tmp_path / "ledger.sqlite3" if ledger_url is None
                      else tmp_path / f"{name}.sqlite3", url=ledger_url)

    worker = ledger_of("worker")
    worker.record_instance(InstanceRecord(
        "1.2.3.4", MRImageStorage, "1.2.3", "1.2.3.1", "pk", None, "MR", "objects/a.dcm", "ab",
        10, ExplicitVRLittleEndian, "PACS", {"Modality": "MR"}))
    job = JobRow(7, "tumour-volume", "tumour_volume", "series", "1.2.3.1", "1.2.3",
                 ("1.2.3.1",), 0, "done", 1, None)
    summary = {"analysed": True, "volume_cm3": 4.0, "study_date": "20250101",
               "tracking_uid": "2.25.1"}
    outputs = [("1.2.3.9", Comprehensive3DSRStorage, "1.2.3", "results/sr.dcm")]
    assert volume_follow_up(worker, job, summary, outputs)
    assert not volume_follow_up(worker, job, summary, outputs), "a job finished twice files once"
    assert [p.volume_cm3 for p in worker.timeline_points("pk")] == [4.0]
    not_a_volume = JobRow(8, "dat", "dat_spect", "series", "1.2.3.1", "1.2.3", (), 0, "done",
                          1, None)
    assert not volume_follow_up(worker, not_a_volume, {"analysed": True}, outputs)

    settings = parse_settings({"node": {"storage": str(tmp_path / "var")}})
    receivers: list[tuple[HistoryService, BackgroundScheduler]] = []
    for name in ("r1", "r2"):
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_jobstore(MemoryJobStore(), JOBSTORE)
        scheduler.start(paused=True)
        history = HistoryService(settings, ledger_of(name), Spool(tmp_path / "var"),
                                 holder=name)
        history.scheduler = scheduler
        receivers.append((history, scheduler))
    taken: list[int] = []
    gate = threading.Barrier(2)

    def take(history: HistoryService) -> None:
        gate.wait()
        taken.append(history.take_requests())

    threads = [threading.Thread(target=take, args=(h,)) for h, _ in receivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(taken) == [0, 1]
        scheduled = [s.get_job(volume_job_id("pk", "1.2.3"), jobstore=JOBSTORE) is not None
                     for _, s in receivers]
        assert sorted(scheduled) == [False, True]
        ((job_id, patient, study, holder),) = worker.history_requests()
        assert (job_id, patient, study) == (7, "pk", "1.2.3")
        assert holder == ("r1", "r2")[scheduled.index(True)]
        assert [h.take_requests() for h, _ in receivers] == [0, 0]
    finally:
        for history, scheduler in receivers:
            scheduler.shutdown(wait=False)
            history.ledger.dispose()
        worker.dispose()
