#!/usr/bin/env python
"""Time from series complete to results queued, per analysis, on realistic studies.

For each analysis a phantom study of realistic size is stored in a scratch spool and
run through ``dicomnode.jobs.execute.execute`` — what a node worker does once the ledger
says the series (or study) is complete: read the instances, preprocess with the model
card's spec, run ONNX Runtime (logits and Grad-CAM in one pass), build the SR and SC
objects, check each with dciodvfy, and write them to the spool for the outbox.

    .venv/bin/python scripts/bench_pipelines.py --repeats 5
    .venv/bin/python scripts/bench_pipelines.py --only pneumonia --no-validate

The first run of each analysis opens its model sessions (cold); the median of the
following runs is the warm figure. ``per image`` divides by the images analysed.
Seed 003's claim, for scale: 131 ms per image end to end including the heatmap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from dicomnode.ingest.spool import Spool  # noqa: E402
from dicomnode.jobs import execute as job_execute  # noqa: E402
from dicomnode.phantoms.brain_mr import write_brain_mr_study  # noqa: E402
from dicomnode.phantoms.chest_xray import write_chest_xray_study  # noqa: E402
from dicomnode.phantoms.dat_spect import write_dat_study  # noqa: E402
from dicomnode.phantoms.head_ct import write_head_ct_study  # noqa: E402

Writer = Callable[[Path], list[Path]]


def two_view_chest(out: Path) -> list[Path]:
    """Two phantom radiographs made one study (one patient, one series, PA + AP)."""
    files = write_chest_xray_study(out, n=2, seed=71, size=2048)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for number, path in enumerate(files, start=1):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
                        "AccessionNumber", "StudyDate", "StudyTime", "StudyID"):
            if keyword in first:
                setattr(ds, keyword, first.get(keyword))
        ds.InstanceNumber = number
        ds.save_as(path, enforce_file_format=True)
    return files

# name -> (pipeline, route options, writer of a realistic study, what it is)
ANALYSES: dict[str, tuple[str, dict[str, Any], Writer, str]] = {
    "pneumonia": ("pneumonia", {"model": "pneumonia-cxr", "operating_point": "screening"},
                  two_view_chest,
                  "2 chest radiographs of 2048 x 2048 (a 2-view study)"),
    "metastasis": ("metastasis", {"model": "metastasis-ct"},
                   lambda d: write_head_ct_study(d, n=1, seed=72, matrix=512, n_slices=40),
                   "40-slice head CT, 512 x 512"),
    "brain-tumour": ("brain_tumour", {"fusion": False},
                     lambda d: write_brain_mr_study(d, n=1, seed=73, matrix=256,
                                                    n_slices=150),
                     "150-slice brain MR (T1 post-contrast), 256 x 256"),
    "dat": ("dat_spect", {"classifier": "dat-classifier"},
            lambda d: write_dat_study(d, n=1, seed=74, layout="slices"),
            "DaT-SPECT, one file per slice, binding ratios + classifier"),
}


def _stage(files: list[Path], spool: Spool) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    rels = []
    series: set[str] = set()
    study = ""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        study = str(ds.StudyInstanceUID)
        series.add(str(ds.SeriesInstanceUID))
        rels.append(spool.write_bytes(f.read_bytes(), "objects").relpath)
    return study, tuple(sorted(series)), tuple(rels)


def bench(name: str, repeats: int, validate: bool, scratch: Path) -> dict[str, Any]:
    pipeline, options, writer, what = ANALYSES[name]
    files = writer(scratch / name / "study")
    files = [f for f in files if f.suffix == ".dcm"]
    spool = Spool(scratch / name / "spool")
    study, series, rels = _stage(files, spool)
    spec = job_execute.JobSpec(
        job_id=1, route=f"bench-{name}", pipeline=pipeline, level="study",
        study_uid=study, series_uids=series, generation=0, instance_paths=rels,
        storage_root=str(spool.root), models_dir=str(ROOT / "models"), options=options)
    original = job_execute.validate_object
    if not validate:
        job_execute.validate_object = lambda ds: None  # type: ignore[assignment]
    try:
        times = []
        summary: dict[str, Any] = {}
        for _ in range(repeats + 1):
            started = time.perf_counter()
            outcome = job_execute.execute(spec)
            times.append(time.perf_counter() - started)
            summary = dict(outcome.summary)
    finally:
        job_execute.validate_object = original
    warm = statistics.median(times[1:]) if repeats else times[0]
    images = len(files)
    return {"analysis": name, "study": what, "instances": images, "cold_s": round(times[0], 3),
            "warm_median_s": round(warm, 3), "per_image_ms": round(1000 * warm / images, 1),
            "objects": summary.get("objects"), "validated": validate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", choices=sorted(ANALYSES))
    parser.add_argument("--no-validate", action="store_true",
                        help="skip dciodvfy on the results (time the analysis alone)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipelines-") as tmp:
        for name in args.only or sorted(ANALYSES):
            row = bench(name, args.repeats, not args.no_validate, Path(tmp))
            rows.append(row)
            print(f"{row['analysis']:13s} {row['study']:58s} cold {row['cold_s']:7.2f} s  "
                  f"warm median {row['warm_median_s']:7.2f} s  "
                  f"{row['per_image_ms']:8.1f} ms/image  ({row['objects']} objects)",
                  flush=True)
    print(f"cpu threads available: {os.cpu_count()}; seed 003's claim: 131 ms/image")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
