"""Runs one job to completion inside a worker process.

Reads the job's instances from the spool, runs the pipeline, validates every result
object, and stores it under ``results/`` before anything is queued for sending. What
comes back to the parent is small: paths, UIDs and a JSON summary.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.ingest.spool import Spool
from dicomnode.pipelines import registry
from dicomnode.pipelines.base import PipelineError, PipelineInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    route: str
    pipeline: str
    level: str
    study_uid: str
    series_uids: tuple[str, ...]
    generation: int
    instance_paths: tuple[str, ...]  # spool-relative
    storage_root: str
    models_dir: str
    options: Mapping[str, Any] = field(default_factory=dict)
    plugins: Mapping[str, str] = field(default_factory=dict)
    related_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobOutcome:
    outputs: tuple[tuple[str, str, str, str], ...]  # (sop uid, class uid, study uid, relpath)
    summary: Mapping[str, Any]


class ResultInvalid(PipelineError):
    """A result object failed conformance checks; it is never sent."""


def validate_object(ds: Dataset) -> None:
    """dciodvfy must report no errors; without dciodvfy, highdicom's own checks stand."""
    if shutil.which("dciodvfy") is None:
        return
    from dicomnode.results.validate import dciodvfy_errors

    errors = dciodvfy_errors(ds)
    if errors:
        raise ResultInvalid(f"result {ds.get('SOPClassUID', '?')} failed dciodvfy: "
                            + "; ".join(errors[:5]))


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


_pipelines: dict[str, Any] = {}


def execute(spec: JobSpec) -> JobOutcome:
    """Run a job; pipelines are created once per worker process and kept warm."""
    spool = Spool(Path(spec.storage_root))
    paths = [spool.path(p) for p in spec.instance_paths]
    datasets: Sequence[Dataset] = [dcmread(p) for p in paths]
    key = f"{spec.pipeline}|{sorted(spec.plugins.items())}"
    if key not in _pipelines:
        _pipelines[key] = registry.create(spec.pipeline, spec.plugins)
    pipeline = _pipelines[key]
    work = PipelineInput(
        datasets=datasets, paths=paths, level=spec.level, study_instance_uid=spec.study_uid,
        series_instance_uids=spec.series_uids, route=spec.route, generation=spec.generation,
        options=spec.options, models_dir=Path(spec.models_dir),
        related_datasets=[dcmread(spool.path(p)) for p in spec.related_paths])
    result = pipeline.run(work)
    outputs: list[tuple[str, str, str, str]] = []
    for ds in result.objects:
        validate_object(ds)
        stored = spool.write_bytes(encode(ds), "results")
        outputs.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                        stored.relpath))
    summary = {"pipeline": pipeline.name, "version": pipeline.version,
               "analysed": result.analysed, "objects": len(outputs), **dict(result.summary)}
    return JobOutcome(tuple(outputs), summary)
