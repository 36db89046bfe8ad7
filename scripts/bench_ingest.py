#!/usr/bin/env python3
"""Ingest throughput: the node against dcmtk storescp and Orthanc, in one run.

One CT study (default 1,000 instances of 512x512 int16; --size 64 for small, latency-bound
instances) is sent with dcmtk storescu (TCP_NODELAY=1 in its environment) to each receiver
in turn, each started fresh on a free loopback port with its own storage: storescp (writes
files, no fsync), Orthanc (SyncStorageArea on: fsync per instance) and the node (fsync,
rename, directory fsync, ledger commit to the WAL per instance; see ingest/reconcile.py).
Prints img/s, MB/s and each receiver's CPU time per instance (median of --repeats; the CPU
figure is steadier than img/s on a shared machine) and the ratios node/Orthanc and
node/storescp.

    .venv/bin/python scripts/bench_ingest.py --n 1000 --repeats 3
    .venv/bin/python scripts/bench_ingest.py --baseline /tmp/base   # another commit beside it
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.peers import (  # noqa: E402
    PYDICOM_FILES,
    free_port,
    node_config,
    orthanc_running,
    peer_env,
    port_open,
    start_node,
    wait_for,
)


def make_study(out: Path, n: int, seed: int = 0, size: int = 512) -> list[Path]:
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    study, series = generate_uid(), generate_uid()
    base = rng.integers(-1000, 1500, size=(size, size), dtype=np.int16)
    paths = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.Rows, ds.Columns = size, size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Run(NamedTuple):
    elapsed_s: float
    cpu_s: float  # the receiver process's user + system CPU time while it received


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def send(port: int, aec: str, files: list[Path], pid: int) -> Run:
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    out = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, env=peer_env())
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    if out.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed: {out.stderr[-2000:]}")
    return Run(elapsed, cpu)


def run_storescp(work: Path, files: list[Path]) -> Run:
    port = free_port()
    (work / "storescp").mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(work / "storescp"),
                             str(port)], env=peer_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 30, "storescp")
        return send(port, "STORESCP", files, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def run_orthanc(work: Path, files: list[Path]) -> Run:
    with orthanc_running(work / "orthanc", extra={"SyncStorageArea": True}) as orthanc:
        run = send(orthanc.dicom_port, orthanc.aet, files, orthanc.proc.pid)
        assert len(orthanc.instances()) == len(files)
        return run


def run_node(work: Path, files: list[Path], checkout: Path | None = None) -> Run:
    """The node from this checkout, or (``checkout``) from another one, e.g. a baseline
    made with ``git worktree add /tmp/base <commit>``, to compare in the same run."""
    config = node_config(work / "node" / "var", free_port(), routes=[])
    config["completion"] = {"series_quiet_s": 600, "study_quiet_s": 600}
    node = start_node(work / "node", config, checkout=checkout or REPO)
    try:
        run = send(node.port, "DICOMNODE", files, node.proc.pid)
        stored = node.status()["counts"]["instances"]["stored"]
        assert stored == len(files), f"node stored {stored} of {len(files)}"
        return run
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512,
                        help="rows and columns of each instance (64: latency-bound, 512: CT)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="also run the node from this checkout (e.g. a git worktree of an "
                             "earlier commit), interleaved, and print node/baseline")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/test.sh first (installs the peers)")
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        root = Path(tmp)
        (root / "study").mkdir()
        files = make_study(root / "study", args.n, size=args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} instances, {mb:.0f} MB; repeats: {args.repeats}")
        runners: dict[str, Callable[[Path, list[Path]], Run]] = {
            "storescp": run_storescp, "orthanc": run_orthanc, "node": run_node}
        if args.baseline is not None:
            baseline = args.baseline.resolve()
            runners["baseline"] = lambda work, files: run_node(work, files, baseline)
        runs: dict[str, list[Run]] = {k: [] for k in runners}
        for r in range(args.repeats):
            for name, fn in runners.items():  # interleaved, so drift hits all alike
                work = root / f"{name}-{r}"
                work.mkdir()
                runs[name].append(fn(work, files))
                shutil.rmtree(work, ignore_errors=True)
        print(f"{'receiver':10} {'img/s':>8} {'MB/s':>8} {'CPU ms/img':>11}  "
              f"(median of {args.repeats}; CPU: the receiver process, user + system)")
        rate, cpu = {}, {}
        for name, rs in runs.items():
            t = statistics.median(r.elapsed_s for r in rs)
            rate[name] = len(files) / t
            cpu[name] = statistics.median(r.cpu_s for r in rs) * 1000 / len(files)
            print(f"{name:10} {rate[name]:8.1f} {mb / t:8.1f} {cpu[name]:11.2f}")
        print(f"ratio node/orthanc:  {rate['node'] / rate['orthanc']:.2f}"
              f"  (CPU per instance {cpu['node'] / cpu['orthanc']:.2f})")
        print(f"ratio node/storescp: {rate['node'] / rate['storescp']:.2f}")
        if "baseline" in rate:
            print(f"ratio node/baseline: {rate['node'] / rate['baseline']:.2f}"
                  f"  (CPU per instance {cpu['node'] / cpu['baseline']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
