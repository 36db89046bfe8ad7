"""Time the status API's ledger queries on a synthetic ledger at hospital scale.

Builds a ledger with --studies studies (3 series of 20 instances each, one job and three
result rows per study; every 500th result dead-lettered) by direct inserts, then times
what the status page asks: recent studies, searches by patient and accession key, one
study's timeline, the queues and the queue counts /metrics reads.

    .venv/bin/python scripts/bench_status_api.py --studies 20000
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnode.ingest.ledger import Ledger
from dicomnode.ops.reader import LedgerReader

SERIES_PER_STUDY, INSTANCES_PER_SERIES = 3, 20


def build(path: Path, studies: int) -> None:
    Ledger(path).close()
    db = sqlite3.connect(path)
    now = time.time()
    db.execute("BEGIN")
    for s in range(studies):
        study = f"1.2.3.{s}"
        patient = f"p{s % max(1, studies // 3):08d}"
        db.execute("INSERT INTO studies (study_uid, patient_key, accession_key, first_received, "
                   "last_received, state, closed_at, close_reason) VALUES (?,?,?,?,?,?,?,?)",
                   (study, patient, f"a{s:08d}", now - s, now - s, "complete", now - s + 30,
                    "quiet"))
        for r in range(SERIES_PER_STUDY):
            series = f"{study}.{r}"
            db.execute("INSERT INTO series (series_uid, study_uid, patient_key, modality, "
                       "calling_ae, attrs, instance_count, first_received, last_received, "
                       "state, closed_at, close_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (series, study, patient, "CT", "CT1",
                        json.dumps({"SeriesDescription": "bench"}), INSTANCES_PER_SERIES,
                        now - s, now - s, "complete", now - s + 10, "quiet"))
            db.executemany(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, study_uid, "
                "path, sha256, size, transfer_syntax, calling_ae, received_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", series, study,
                  f"objects/{series}.{i}", "0" * 64, 524_288, "1.2.840.10008.1.2.1", "CT1",
                  now - s) for i in range(INSTANCES_PER_SERIES)])
            db.execute("INSERT INTO route_decisions (subject_uid, level, generation, route, "
                       "matched, reasons, decided_at) VALUES (?,?,?,?,?,?,?)",
                       (series, "series", 0, "bench", 1, "[]", now))
        job = db.execute(
            "INSERT INTO jobs (route, pipeline, level, subject_uid, study_uid, series_uids, "
            "generation, state, attempts, created_at, started_at, finished_at, summary) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ("bench", "bench", "series", f"{study}.0", study, json.dumps([f"{study}.0"]), 0,
             "done", 1, now, now, now + 5, "{}")).lastrowid
        for k in range(3):
            db.execute("INSERT INTO outbox (job_id, destination, sop_instance_uid, "
                       "sop_class_uid, study_uid, path, state, attempts, next_attempt_at, "
                       "last_status, created_at, sent_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (job, "pacs", f"9.{s}.{k}", "1.2.840.10008.5.1.4.1.1.7", study,
                        "results/bench", "dead" if s % 500 == 0 else "sent", 1, now, 0, now,
                        now + 6))
    db.execute("COMMIT")
    db.close()


def timed(label: str, call: Callable[[], Any], repeats: int = 5) -> None:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    print(f"{label:32s} {(time.perf_counter() - start) / repeats * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-status-") as tmp:
        path = Path(tmp) / "ledger.sqlite3"
        t0 = time.perf_counter()
        build(path, args.studies)
        print(f"{args.studies} studies, {args.studies * SERIES_PER_STUDY} series, "
              f"{args.studies * SERIES_PER_STUDY * INSTANCES_PER_SERIES} instances, "
              f"{args.studies} jobs, {3 * args.studies} result rows "
              f"(built in {time.perf_counter() - t0:.0f} s)")
        reader = LedgerReader(path)
        middle = f"1.2.3.{args.studies // 2}"
        timed("recent studies (50)", lambda: reader.studies(limit=50))
        timed("search by patient key", lambda: reader.studies(patient_key="p00000042"))
        timed("search by accession key", lambda: reader.studies(accession_key="a00000042"))
        timed("one study's timeline", lambda: reader.timeline(middle))
        timed("queues", reader.queues)
        timed("queue counts (/metrics)", reader.queue_counts)
        reader.close()


if __name__ == "__main__":
    main()
