"""What every result object shares: who made it, where it goes, and how it is labelled.

Results go into the study they were computed from, so PACS viewers show them beside the
source images. Their UIDs come from the caller (``PipelineInput.result_uid``, built on
``uids.derive_uid``), so re-sending a re-run replaces the earlier object instead of
duplicating it; UIDs made inside a result (tracking, device observer, the instances of
a multi-image series) are derived from those and from the inputs the same way.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicomnode import __version__

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


@contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's person-name check while copying names from the sources.

    Its warning quotes the name (e.g. an anonymised "ANONYMOUS"), which would put a
    patient identifier into the logs; the names are copied as they are either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* person name", category=UserWarning
        )
        yield
