"""A job longer than RabbitMQ's ``consumer_timeout`` (here 2 s, checked every second
instead of every minute): the broker closes the worker's channel and takes the message
back; Celery calls that unrecoverable, lets the job finish and stops. The job ran once
and its result is queued; the worker exits with status 1, not 0, so a supervisor
restarts it; the message the broker handed on is dropped by the next worker's claim."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import parse_settings
from dicomnode.phantoms.dat_spect import write_dat_study
from dicomnode.service import Node
from tests.peers import free_port, node_config, storescu, wait_for
from tests.servers import RabbitMQ, rabbitmq_running, start_worker


@pytest.fixture
def impatient_rabbitmq() -> Iterator[RabbitMQ]:
    with rabbitmq_running(consumer_timeout_ms=2000, channel_tick_ms=1000) as server:
        yield server


def test_a_job_outlasting_consumer_timeout_runs_once_and_its_worker_exits_1(
        tmp_path: Path, impatient_rabbitmq: RabbitMQ) -> None:
    files = write_dat_study(tmp_path / "phantoms", n=1, seed=11)
    shared = tmp_path / "receiver"

    def config(storage: Path, port: int) -> dict[str, object]:
        return node_config(
            storage, port,
            routes=[{"name": "slow", "match": {"Modality": "NM"}, "pipeline": "slow",
                     "send_to": [], "options": {"seconds": 6}}],
            extra={"pipelines": {"slow": "tests.support.pipelines:Slow"},
                   "node": {"spool": str(shared)},
                   "ledger": {"url": f"sqlite:///{shared / 'ledger.sqlite3'}"},
                   "jobs": {"engine": "celery", "broker": impatient_rabbitmq.url}})

    port = free_port()
    node = Node(parse_settings(config(shared, port)))
    node.start()
    workers = []
    try:
        workers.append(start_worker(tmp_path / "w1", config(tmp_path / "w1", free_port())))
        storescu(port, files)
        wait_for(lambda: workers[0].proc.poll() is not None, 120,
                 "the worker to stop after the broker closed its channel")
        assert workers[0].proc.returncode == 1
        text = workers[0].log_text()
        assert "PRECONDITION_FAILED" in text and "Celery stopped by itself" in text
        (job,) = node.ledger.jobs()
        assert (job.state, job.attempts) == ("done", 1), "finished where it ran, once"
        assert "job 1 done" in text

        # the message the broker took back goes to the next worker, whose claim drops it
        workers.append(start_worker(tmp_path / "w2", config(tmp_path / "w2", free_port())))
        wait_for(lambda: "job 1: not pending" in workers[1].log_text(), 60,
                 "the re-delivered message dropped")
        assert [(j.state, j.attempts) for j in node.ledger.jobs()] == [("done", 1)]
    finally:
        for w in workers:
            w.kill()
        node.stop()
