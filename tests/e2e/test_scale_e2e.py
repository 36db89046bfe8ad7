"""Scale-out end to end: PostgreSQL and a broker (Redis, then RabbitMQ) on loopback, two
receivers and two Celery workers sharing the ledger, the broker and a spool folder; a
burst of DaT studies, one worker killed (SIGKILL, with its analysis child) in the middle
of a job. Every study is analysed, the killed job re-run once on the other worker, every
result delivered once.

The brokers give the killed worker's message back differently: RabbitMQ at once (the
connection closed with the message unacknowledged), Redis after its visibility timeout.
Either way the ledger decides: the job stays ``running`` until its lease runs out, so the
early redelivery finds nothing to claim, and the dispatcher's re-queue runs it once."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicomnode.ingest.ledger import Ledger
from dicomnode.phantoms.dat_spect import write_dat_study
from tests.peers import Orthanc, ai_results, free_port, orthanc_running, start_node, storescu
from tests.peers import wait_for as _wait_for
from tests.servers import (
    Postgres,
    RabbitMQ,
    Redis,
    WorkerProcess,
    postgres_running,
    scale_config,
    start_worker,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
_STARTED = re.compile(r"job (\d+) \(dat-spect, dat_spect\) attempt (\d+)")
_FINISHED = re.compile(r"job (\d+)(?: done| failed| timed out|: )")


@pytest.fixture
def servers(tmp_path: Path, celery_broker: Redis | RabbitMQ
            ) -> Iterator[tuple[Postgres, Redis | RabbitMQ, Orthanc]]:
    with postgres_running() as pg, orthanc_running(tmp_path / "orthanc") as pacs:
        yield pg, celery_broker, pacs


def _settled(ledger: Ledger, studies: int, per_job: int) -> bool:
    counts = ledger.counts()
    return bool(counts["jobs"].get("done", 0) == studies
                and counts["outbox"].get("sent", 0) == studies * per_job
                and not counts["outbox"].get("pending") and not counts["outbox"].get("sending"))


def test_two_receivers_two_workers_one_killed_mid_job(
        tmp_path: Path, servers: tuple[Postgres, Redis | RabbitMQ, Orthanc]) -> None:
    pg, broker, pacs = servers
    url = pg.create_database()
    shared = tmp_path / "shared-spool"
    files = write_dat_study(tmp_path / "phantoms", n=6, seed=707)
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID): f
               for f in files}

    def config(name: str, port: int) -> dict[str, object]:
        # a 20 s job timeout: the lost job's lease runs out 30 s after its claim
        return scale_config(tmp_path / name, port, ledger_url=url, broker=broker.url,
                            spool=shared, pacs_port=pacs.dicom_port, timeout_s=20)

    receivers = [start_node(tmp_path / f"r{i}", config(f"r{i}", free_port()))
                 for i in (1, 2)]
    workers: list[WorkerProcess] = []
    ledger = Ledger(tmp_path / "unused.sqlite3", url=url, readonly=True)
    try:
        workers = [start_worker(tmp_path / f"w{i}", config(f"w{i}", free_port()))
                   for i in (1, 2)]
        paths = sorted(studies.values())
        # the burst, split between the two receivers (each study whole on one)
        storescu(receivers[0].port, paths[0::2])
        storescu(receivers[1].port, paths[1::2])

        def unfinished(w: WorkerProcess) -> set[int]:
            """Jobs this worker started and has not logged an outcome for."""
            text = w.log_text()
            return {int(m[1]) for m in _STARTED.finditer(text)} - {
                int(m[1]) for m in _FINISHED.finditer(text)}

        def a_worker_mid_job() -> WorkerProcess | None:
            return next((w for w in workers if unfinished(w)), None)

        victim = _wait_for(a_worker_mid_job, 120, "a worker to start a job", interval=0.05)
        victim.kill()  # SIGKILL to the worker and its analysis child
        (killed_job,) = unfinished(victim)
        survivor = next(w for w in workers if w is not victim)
        _wait_for(lambda: _settled(ledger, len(studies), 2), 300,
                  "every study analysed and its results confirmed")
        jobs = ledger.jobs()
        assert ledger.failures() == {"failed_jobs": [], "dead_letters": []}
        assert sorted(j.study_uid for j in jobs) == sorted(studies), "one job per study"
        attempts = {j.id: j.attempts for j in jobs}
        assert attempts.pop(killed_job) == 2, "the killed job ran again, once"
        assert set(attempts.values()) == {1}, "every other job ran once"
        again = [int(m[1]) for m in _STARTED.finditer(survivor.log_text())
                 if int(m[1]) == killed_job]
        assert again, "the surviving worker re-ran the killed job"
        rows = ledger.outbox()
        assert {r.state for r in rows} == {"sent"} and {r.attempts for r in rows} == {1}
        assert len({r.sop_instance_uid for r in rows}) == len(rows) == 2 * len(studies)
        for study in studies:
            results = ai_results(pacs, study)
            assert sorted(r["SOPClassUID"] for r in results) == [SC_CLASS, SR_CLASS], study
        if isinstance(broker, RabbitMQ):
            # RabbitMQ gave the killed worker's unacknowledged message back when its
            # connection closed; whichever of it and the re-published one came second
            # found the job claimed or done, and was dropped
            _wait_for(lambda: f"job {killed_job}: not pending" in survivor.log_text(), 60,
                      "the second message of the killed job to be dropped")
        started = [len(_STARTED.findall(w.log_text())) for w in (victim, survivor)]
        assert started[0] >= 1 and started[0] + started[1] == len(studies) + 1, started
        assert survivor.kill(signal.SIGTERM) == 0, "a worker stops cleanly on SIGTERM"
    finally:
        for w in workers:
            w.kill()
        for r in receivers:
            r.stop()
        ledger.dispose()
