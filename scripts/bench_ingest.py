#!/usr/bin/env python3
"""Ingest throughput: the node against dcmtk storescp and Orthanc, in one run.

One CT study (default 1,000 instances of 512x512 int16; --size 64 for small, latency-bound
instances) is sent with dcmtk storescu (TCP_NODELAY=1 in its environment) to each receiver
in turn, each started fresh on a free loopback port with its own storage: storescp (writes
files, no fsync), Orthanc (SyncStorageArea on: fsync per instance) and the node (fsync,
rename, directory fsync, ledger commit to the WAL per instance; see ingest/reconcile.py).
Prints img/s and MB/s (median of --repeats) and the ratios node/Orthanc and node/storescp.

    .venv/bin/python scripts/bench_ingest.py --n 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def send(port: int, aec: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, env=peer_env())
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed: {out.stderr[-2000:]}")
    return elapsed


def run_storescp(work: Path, files: list[Path]) -> float:
    port = free_port()
    (work / "storescp").mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(work / "storescp"),
                             str(port)], env=peer_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 30, "storescp")
        return send(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait(10)


def run_orthanc(work: Path, files: list[Path]) -> float:
    with orthanc_running(work / "orthanc", extra={"SyncStorageArea": True}) as orthanc:
        elapsed = send(orthanc.dicom_port, orthanc.aet, files)
        assert len(orthanc.instances()) == len(files)
        return elapsed


def run_node(work: Path, files: list[Path]) -> float:
    config = node_config(work / "node" / "var", free_port(), routes=[])
    config["completion"] = {"series_quiet_s": 600, "study_quiet_s": 600}
    node = start_node(work / "node", config)
    try:
        elapsed = send(node.port, "DICOMNODE", files)
        stored = node.status()["counts"]["instances"]["stored"]
        assert stored == len(files), f"node stored {stored} of {len(files)}"
        return elapsed
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512,
                        help="rows and columns of each instance (64: latency-bound, 512: CT)")
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
        runners: dict[str, Callable[[Path, list[Path]], float]] = {
            "storescp": run_storescp, "orthanc": run_orthanc, "node": run_node}
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.repeats):
            for name, fn in runners.items():  # interleaved, so drift hits all alike
                work = root / f"{name}-{r}"
                work.mkdir()
                times[name].append(fn(work, files))
                shutil.rmtree(work, ignore_errors=True)
        print(f"{'receiver':10} {'img/s':>8} {'MB/s':>8}  (median of {args.repeats})")
        rate = {}
        for name, ts in times.items():
            t = statistics.median(ts)
            rate[name] = len(files) / t
            print(f"{name:10} {rate[name]:8.1f} {mb / t:8.1f}")
        print(f"ratio node/orthanc:  {rate['node'] / rate['orthanc']:.2f}")
        print(f"ratio node/storescp: {rate['node'] / rate['storescp']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
