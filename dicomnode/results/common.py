"""What every result object shares: who made it, where it goes, and how it is labelled.

Results go into the study they were computed from, so PACS viewers show them beside the
source images; their UIDs depend only on the inputs and the algorithm version, so that
re-sending a re-run replaces the earlier object instead of duplicating it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicomnode import __version__
from dicomnode.results.uids import derive_uid

MANUFACTURER = "dicomnode"
"""General Equipment Manufacturer of every object the node creates."""

RESEARCH_USE_STATEMENT = "Research use only - not for diagnostic use. AI-generated."
"""The statement every SR carries as text a viewer shows."""

SC_CAPTION = "AI-generated - not for diagnostic use"
"""The first caption line burned into every Secondary Capture image."""

SERIES_DESCRIPTION_PREFIX = "AI "

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm (and the model file) a result came from.

    ``sha256`` is the hex digest of the model file, so a result can be traced to the
    exact weights; it is ``None`` for rule-based algorithms without a model file.
    ``parameters`` are short free-text settings worth recording (e.g. a preprocessing
    spec name); they are written as TID 4019 "Algorithm Parameters".
    """

    name: str
    version: str
    sha256: str | None = None
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.strip() or len(self.name) > 64:
            raise ValueError("algorithm name must have 1 to 64 characters")
        if not self.version.strip() or len(self.version) > 64:
            raise ValueError("algorithm version must have 1 to 64 characters")
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lower-case hexadecimal characters")

    @property
    def label(self) -> str:
        """Name and version, as shown to people (SoftwareVersions, device model name)."""
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ResultUids:
    """The UIDs of one result object."""

    series_instance_uid: str
    sop_instance_uid: str


def derive_result_uids(
    study_instance_uid: str,
    source_sop_instance_uids: Iterable[str],
    algorithm: AlgorithmInfo,
    kind: str,
    index: int = 1,
) -> ResultUids:
    """UIDs for the ``index``-th object of ``kind`` (e.g. "sr", "sc") of one run.

    The algorithm version is part of the key, so a new version's results sit beside the
    old ones instead of silently replacing them; the model sha256 is not, so re-packing
    the same version does not create duplicates. SR and SC objects need different
    ``kind`` values: they belong in different series because their Modality differs.
    """
    sources = sorted(set(source_sop_instance_uids))
    if not sources:
        raise ValueError("a result needs at least one source instance")
    series = derive_uid(
        "series", study_instance_uid, sources, algorithm.name, algorithm.version, kind
    )
    return ResultUids(
        series_instance_uid=series,
        sop_instance_uid=derive_uid("instance", series, index),
    )


def check_series_description(description: str) -> str:
    """Reject descriptions that would not mark the series as AI output in a PACS list."""
    if not description.startswith(SERIES_DESCRIPTION_PREFIX) or not description[3:].strip():
        raise ValueError(f"SeriesDescription must start with {SERIES_DESCRIPTION_PREFIX!r}")
    if len(description) > 64:
        raise ValueError("SeriesDescription must have at most 64 characters")
    return description


def reference_dataset(sources: Sequence[Dataset]) -> Dataset:
    """The source whose Patient and Study modules the result copies.

    All sources must belong to one patient and one study: a result mixing studies would
    be filed under only one of them and misattribute the other's images.
    """
    if not sources:
        raise ValueError("a result needs at least one source dataset")
    first = sources[0]
    for ds in sources[1:]:
        if ds.get("StudyInstanceUID") != first.get("StudyInstanceUID"):
            raise ValueError("all source datasets must belong to the same study")
        if ds.get("PatientID") != first.get("PatientID"):
            raise ValueError("all source datasets must belong to the same patient")
    return first


def software_versions(algorithm: AlgorithmInfo) -> tuple[str, str]:
    """SoftwareVersions values: the node and the algorithm, each within LO's 64 characters."""
    return (f"dicomnode {__version__}", algorithm.label[:64])
