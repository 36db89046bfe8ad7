"""Long-tier load checks of issue 6, against a node process on loopback.

    .venv/bin/python scripts/soak.py                      # full size (tens of minutes)
    .venv/bin/python scripts/soak.py --instances 2000 --one-shot 500   # a quick look

1. ``--instances`` instances over ``--associations`` parallel associations: how many were
   acknowledged, how many of those are in the ledger and on disk (lost = acknowledged
   but missing), RSS growth, threads and file descriptors before and after.
2. ``--one-shot`` associations in a row with one instance each: the same figures, to
   show that nothing leaks per association.
3. The association limit under load: ``max_associations`` associations busy storing,
   then extra ones: each must get A-ASSOCIATE-RJ "local limit exceeded" within 1 s,
   and once the load ends, an allowed caller gets in at once.

Instances are CT_small from pydicom's test files with a fresh SOP Instance UID of the
same length patched into the encoded bytes, sent by a hand-written raw peer (the same
one the hardening tests use), so the client costs little CPU beside the node.
Prints one line per figure; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from tests.hardening.nodes import dataset_bytes, store_raw  # noqa: E402
from tests.hardening.rawdicom import (  # noqa: E402
    CT_IMAGE,
    RELEASE_RQ,
    ProcessFigures,
    RawPeer,
    back_to_baseline,
    process_figures,
)
from tests.peers import PYDICOM_FILES, NodeProcess, free_port, node_config, start_node  # noqa: E402

CT = PYDICOM_FILES / "CT_small.dcm"


class Instances:
    """CT_small's encoded data set with its SOP Instance UID replaced, cheaply."""

    def __init__(self) -> None:
        ds = pydicom.dcmread(CT, stop_before_pixels=True)
        self.syntax = str(ds.file_meta.TransferSyntaxUID)
        self.data = dataset_bytes(CT)
        uid = str(ds.SOPInstanceUID).encode()
        value = uid + b"\0" * (len(uid) % 2)
        self.at = self.data.index(value)
        self.width = len(value)
        self.prefix = "1.2.826.0.1.3680043.10.543."
        self.run = str(int(time.time()))
        self._lock = threading.Lock()
        self._next = 0

    def next(self) -> tuple[str, bytes]:
        with self._lock:
            self._next += 1
            n = self._next
        uid = f"{self.prefix}{self.run}.{n}"
        padded = uid.encode().ljust(self.width, b"\0")
        assert len(padded) == self.width, "SOP Instance UID of CT_small is too short to patch"
        return uid, self.data[:self.at] + padded + self.data[self.at + self.width:]


def figure(name: str, value: float | str, unit: str = "") -> None:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"FIGURE {name}: {text} {unit}".rstrip(), flush=True)


def in_ledger(node: NodeProcess, uids: list[str]) -> int:
    found = 0
    with sqlite3.connect(f"file:{node.storage / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        for i in range(0, len(uids), 500):
            chunk = uids[i:i + 500]
            rows = db.execute("SELECT path FROM instances WHERE sop_instance_uid IN "
                              f"({','.join('?' * len(chunk))})", chunk).fetchall()
            found += sum(1 for (path,) in rows if (node.storage / path).is_file())
    return found


def store_many(port: int, instances: Instances, count: int, acked: list[str],
               errors: list[str]) -> None:
    try:
        with RawPeer(port, timeout=60) as peer:
            ac = peer.associate([(1, CT_IMAGE, [instances.syntax])], max_pdu=262144)
            assert ac.accepted_contexts() == {1: 0}
            for _ in range(count):
                uid, data = instances.next()
                if store_raw(peer, 1, uid, data, fragment=262138) == 0:
                    acked.append(uid)
            peer.send(RELEASE_RQ)
            peer.read_pdu()
    except Exception as exc:  # reported, and counted as lost work by the caller
        errors.append(repr(exc))


def report(label: str, before: ProcessFigures, after: ProcessFigures) -> float:
    growth = (after.rss_kib - before.rss_kib) / before.rss_kib * 100
    figure(f"{label}: RSS before/after", f"{before.rss_kib // 1024}/{after.rss_kib // 1024}",
           "MiB")
    figure(f"{label}: RSS growth", growth, "%")
    figure(f"{label}: threads before/after", f"{before.threads}/{after.threads}")
    figure(f"{label}: fds before/after (ledger fds apart)", f"{before.fds}/{after.fds}")
    return growth


def parallel_load(node: NodeProcess, instances: Instances, total: int,
                  associations: int) -> bool:
    before = process_figures(node.proc.pid)
    acked: list[str] = []
    errors: list[str] = []
    per = total // associations
    threads = [threading.Thread(target=store_many, args=(node.port, instances, per, acked,
                                                         errors))
               for _ in range(associations)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    after = back_to_baseline(node.proc.pid, before, timeout=60)
    stored = in_ledger(node, acked)
    label = f"{per * associations} instances over {associations} associations"
    figure(f"{label}: acknowledged", f"{len(acked)}/{per * associations}")
    figure(f"{label}: lost (acknowledged, not in ledger and spool)", str(len(acked) - stored))
    figure(f"{label}: rate", len(acked) / elapsed, "instances/s")
    growth = report(label, before, after)
    if errors:
        print(f"client errors: {errors[:3]}")
    return stored == len(acked) == per * associations and growth < 10 and not errors


def one_shot_load(node: NodeProcess, instances: Instances, count: int) -> bool:
    before = process_figures(node.proc.pid)
    acked: list[str] = []
    errors: list[str] = []
    start = time.monotonic()
    for i in range(count):
        store_many(node.port, instances, 1, acked, errors)
        if i and i % 1000 == 0:
            now = process_figures(node.proc.pid)
            print(f"  {i} associations: RSS {now.rss_kib // 1024} MiB, "
                  f"threads {now.threads}, fds {now.fds}", flush=True)
    elapsed = time.monotonic() - start
    after = back_to_baseline(node.proc.pid, before, timeout=60)
    stored = in_ledger(node, acked)
    label = f"{count} one-instance associations"
    figure(f"{label}: acknowledged", f"{len(acked)}/{count}")
    figure(f"{label}: lost", str(len(acked) - stored))
    figure(f"{label}: rate", count / elapsed, "associations/s")
    growth = report(label, before, after)
    return stored == len(acked) == count and growth < 10 and not errors


def limit_under_load(node: NodeProcess, instances: Instances, max_associations: int) -> bool:
    stop = threading.Event()
    ready = threading.Barrier(max_associations + 1)
    errors: list[str] = []

    def busy() -> None:
        try:
            with RawPeer(node.port, timeout=60) as peer:
                ac = peer.associate([(1, CT_IMAGE, [instances.syntax])], max_pdu=262144)
                assert ac.accepted_contexts() == {1: 0}
                ready.wait()
                while not stop.is_set():
                    uid, data = instances.next()
                    store_raw(peer, 1, uid, data, fragment=262138)
                peer.send(RELEASE_RQ)
                peer.read_pdu()
        except Exception as exc:
            errors.append(repr(exc))
            ready.abort()

    workers = [threading.Thread(target=busy) for _ in range(max_associations)]
    for w in workers:
        w.start()
    ready.wait(timeout=60)
    times: list[float] = []
    refused = 0
    for _ in range(20):
        with RawPeer(node.port, timeout=10) as peer:
            start = time.monotonic()
            answer = peer.associate([(1, CT_IMAGE, [instances.syntax])])
            times.append(time.monotonic() - start)
            refused += answer.pdu_type == 0x03 and answer.reject == (2, 3, 2)
    stop.set()
    for w in workers:
        w.join()
    deadline = time.monotonic() + 10
    while True:
        with RawPeer(node.port, timeout=10) as peer:
            start = time.monotonic()
            if peer.associate().pdu_type == 0x02:
                got_in = time.monotonic() - start
                break
        if time.monotonic() > deadline:
            got_in = float("inf")
            break
        time.sleep(0.05)
    figure(f"limit under load ({max_associations} busy): refused with local limit",
           f"{refused}/20")
    figure("limit under load: slowest refusal", max(times), "s")
    figure("limit under load: allowed caller in after the load", got_in, "s")
    return refused == 20 and max(times) < 1.0 and got_in < 2.0 and not errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=20000)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--one-shot", type=int, default=10000)
    ap.add_argument("--max-associations", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the node's spool here (default: a temporary directory)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnode-soak-"))
    config = node_config(work / "var", free_port(),
                         extra={"node": {"max_associations": args.max_associations},
                                "logging": {"level": "WARNING"}})
    node = start_node(work, config)
    instances = Instances()
    ok = True
    try:
        store_many(node.port, instances, 20, [], [])  # warm up before the baselines
        time.sleep(2)
        if args.instances:
            ok &= parallel_load(node, instances, args.instances, args.associations)
        if args.one_shot:
            ok &= one_shot_load(node, instances, args.one_shot)
        ok &= limit_under_load(node, instances, args.max_associations)
        ok &= node.proc.poll() is None
    finally:
        node.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
