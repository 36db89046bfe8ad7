"""The contract between the node's job runner and an analysis.

A pipeline receives the stored instances of one complete series (or study), already
read from the spool, and returns the DICOM result objects to send. It never touches the
network, the ledger or the spool: the job runner does, so a pipeline stays a pure
function of its inputs that can be tested without a node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from dicomnode.results.uids import derive_uid


class PipelineError(Exception):
    """The pipeline failed in a way that retrying will not fix (bad code, bad model)."""


@dataclass(frozen=True)
class PipelineInput:
    """One unit of work: the instances of a series or study, in ledger order.

    ``datasets`` are fully read (pixel data included); ``paths`` are the spool files
    they came from, in the same order, for pipelines that prefer to stream.
    """

    datasets: Sequence[Dataset]
    paths: Sequence[Path]
    level: str  # "series" or "study"
    study_instance_uid: str
    series_instance_uids: Sequence[str]
    route: str = "adhoc"
    generation: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    models_dir: Path = Path("models")
    # Series of the same patient from other studies, when the route asks for them
    # (``options.related``): e.g. a CT from last week for a CT+MR fusion model.
    related_datasets: Sequence[Dataset] = ()

    def result_uid(self, algorithm: str, version: str, *parts: str | int,
                   generation: int | None = None) -> str:
        """Deterministic UID for a result object of this unit of work.

        The same route, subject, generation and algorithm version give the same UID, so a
        re-run after a crash replaces what the PACS has instead of adding a copy; a
        re-opened series (generation + 1) gets new UIDs and its SR names its predecessor.
        """
        subject = self.study_instance_uid if self.level == "study" else ",".join(
            sorted(self.series_instance_uids))
        gen = self.generation if generation is None else generation
        return derive_uid(self.route, subject, gen, algorithm, version, *parts)


@dataclass(frozen=True)
class PipelineResult:
    """What a run produced: result objects (already validated) and a short summary.

    ``summary`` is small, JSON-serialisable and free of patient identifiers: the
    ledger stores it and ``dicomnode status`` shows it.
    """

    objects: Sequence[Dataset]
    summary: Mapping[str, Any]
    analysed: bool = True


class Pipeline(Protocol):
    """An analysis: select inputs, preprocess, infer, postprocess, build results."""

    name: str
    version: str

    def run(self, work: PipelineInput) -> PipelineResult: ...
