#!/usr/bin/env python3
"""Analysis throughput of the scaled-out node with 1 and with 2 Celery workers.

PostgreSQL, Redis and Orthanc start on loopback ports; for each worker count a fresh
ledger database and shared spool take the same burst of DaT-SPECT phantom studies through
one receiver. The workers start once every job is queued in the broker, so the clock
measures analysis only: from the workers being ready to the last job done (each worker's
first job includes starting its analysis process and loading the pipeline). Prints
analyses/s per worker count and the ratio.

    .venv/bin/python scripts/bench_scale.py --studies 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.ingest.ledger import Ledger  # noqa: E402
from dicomnode.phantoms.dat_spect import write_dat_study  # noqa: E402
from tests.peers import free_port, orthanc_running, start_node, storescu, wait_for  # noqa: E402
from tests.servers import (  # noqa: E402
    Postgres,
    Redis,
    postgres_running,
    redis_running,
    scale_config,
    start_worker,
)


def run(work: Path, files: list[Path], n_studies: int, n_workers: int, pg: Postgres,
        redis: Redis, pacs_port: int) -> float:
    """Analyses per second with ``n_workers`` workers (one slot each)."""
    url = pg.create_database()
    redis_flush(redis)
    spool = work / "spool"

    def config(name: str) -> dict[str, object]:
        return scale_config(work / name, free_port(), ledger_url=url, broker=redis.url,
                            spool=spool, pacs_port=pacs_port, timeout_s=600)

    receiver = start_node(work / "receiver", config("receiver"))
    ledger = Ledger(work / "unused.sqlite3", url=url, readonly=True)
    workers = []
    try:
        storescu(receiver.port, files)
        wait_for(lambda: ledger.counts()["jobs"].get("queued", 0) == n_studies, 300,
                 "every job queued in the broker")
        workers = [start_worker(work / f"w{i}", config(f"w{i}")) for i in range(n_workers)]
        started = time.monotonic()
        wait_for(lambda: ledger.counts()["jobs"].get("done", 0) == n_studies, 1800,
                 "every job done", interval=0.05)
        elapsed = time.monotonic() - started
        failed = ledger.failures()["failed_jobs"]
        if failed:
            raise SystemExit(f"{len(failed)} job(s) failed: {failed[0]['error']}")
        return n_studies / elapsed
    finally:
        for w in workers:
            w.kill()
        receiver.stop()
        ledger.dispose()


def redis_flush(redis: Redis) -> None:
    import redis as redis_client

    redis_client.Redis.from_url(redis.url).flushdb()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-scale-") as tmp:
        root = Path(tmp)
        files = write_dat_study(root / "phantoms", n=args.studies, seed=args.seed)
        with postgres_running() as pg, redis_running() as redis, \
                orthanc_running(root / "orthanc") as pacs:
            rates = {n: run(root / f"run{n}", files, args.studies, n, pg, redis,
                            pacs.dicom_port) for n in (1, 2)}
    print(f"burst: {args.studies} DaT-SPECT studies")
    for n, rate in rates.items():
        print(f"{n} worker(s): {rate:.3f} analyses/s")
    print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
