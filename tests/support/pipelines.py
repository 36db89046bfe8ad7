"""Site pipelines used by the tests, loaded through the config's ``pipelines`` section.

They misbehave on purpose (hang, crash the worker, raise) or do the least a pipeline can
do (one valid SR), so the job runner's timeout, crash recovery and failure reporting are
tested with the same plugin mechanism a site would use.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.results import codes
from dicomnode.results.common import AlgorithmInfo
from dicomnode.results.sr import NotAnalysed, build_measurement_report
from dicomnode.results.uids import derive_uid


class NoteOnly:
    """Always answers with a 'not analysed' SR: the smallest valid result."""

    name = "test note"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        series = work.result_uid(self.name, self.version, "sr")
        sr = build_measurement_report(
            work.datasets, NotAnalysed("test pipeline: nothing to analyse"),
            AlgorithmInfo(self.name, self.version), series_instance_uid=series,
            sop_instance_uid=derive_uid(series, 1), series_description="AI test note",
            procedure_reported=codes.IMAGING_PROCEDURE)
        return PipelineResult([sr], {"note": True}, analysed=False)


class Hang:
    """Sleeps far past any sensible job timeout."""

    name = "test hang"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        time.sleep(3600)
        raise AssertionError("unreachable")


class Slow:
    """Takes the route's ``options.seconds`` (a job that outlasts a broker's patience),
    then answers like :class:`NoteOnly`."""

    name = "test slow"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        time.sleep(float(work.options.get("seconds", 5)))
        return NoteOnly().run(work)


class CrashOnce:
    """Kills its worker process the first time it sees a series, then succeeds."""

    name = "test crash once"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        marker = Path(os.environ["DICOMNODE_TEST_MARKERS"]) / work.series_instance_uids[0]
        if not marker.exists():
            marker.touch()
            os._exit(9)
        return NoteOnly().run(work)


class Broken:
    """Raises, as a pipeline with a bug would."""

    name = "test broken"
    version = "1"

    def run(self, work: PipelineInput) -> PipelineResult:
        raise ValueError("the model file is corrupt (test)")
