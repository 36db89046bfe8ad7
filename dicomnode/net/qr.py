"""Query/retrieve against the PACS: C-FIND, C-MOVE (to the node itself), C-GET fallback.

What sites report about real PACSs shapes this client: pending responses that never end
(every operation has a total deadline, after which it is cancelled and the association
aborted), a PACS that does not know the node's AE (its C-MOVE failure is turned into an
error that says so), and retrieves that stop early (the sub-operation counts are
returned so the caller can check them against what C-FIND promised).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.net.scp import _assoc_socket, configure_pynetdicom, set_nodelay
from dicomnode.net.status import category

log = logging.getLogger(__name__)

MOVE_DESTINATION_UNKNOWN = 0xA801


class QueryError(Exception):
    """A query or retrieve failed; the message says why in words an administrator acts on."""


@dataclass(frozen=True)
class MoveResult:
    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return category(self.status) in ("success", "warning") and self.failed == 0


class QueryClient:
    def __init__(self, *, host: str, port: int, called_aet: str, calling_aet: str,
                 timeout_s: float = 30.0, total_timeout_s: float = 300.0) -> None:
        configure_pynetdicom()
        self.host = host
        self.port = port
        self.called_aet = called_aet
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.total_timeout_s = total_timeout_s

    @contextmanager
    def _association(self, context: str) -> Iterator[Any]:
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(context)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        opened: list[bool] = []

        def on_open(event: evt.Event) -> None:
            opened.append(True)
            set_nodelay(_assoc_socket(event.assoc))

        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
        if not assoc.is_established:
            where = f"{self.called_aet}@{self.host}:{self.port}"
            if not opened:
                raise QueryError(f"{where} could not be reached")
            if assoc.is_rejected:
                raise QueryError(f"{where} rejected the association (is {self.calling_aet} "
                                 "known to it?)")
            raise QueryError(f"{where} refused the query/retrieve service")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _responses(self, assoc: Any, gen: Any, what: str) -> Iterator[tuple[Dataset, Any]]:
        """Responses until the final one, or the total deadline: then C-CANCEL and abort."""
        deadline = time.monotonic() + self.total_timeout_s
        for status, identifier in gen:
            if time.monotonic() > deadline:
                assoc.abort()
                raise QueryError(f"{what}: no final response within "
                                 f"{self.total_timeout_s:g} s; cancelled")
            if not status:  # pynetdicom yields an empty status on DIMSE timeout/abort
                raise QueryError(f"{what}: the PACS stopped answering (no response within "
                                 f"{self.timeout_s:g} s)")
            yield status, identifier

    def find(self, query: Dataset, level: str = "STUDY") -> list[Dataset]:
        query = query.copy()
        query.QueryRetrieveLevel = level
        found: list[Dataset] = []
        with self._association(StudyRootQueryRetrieveInformationModelFind) as assoc:
            gen = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            for status, identifier in self._responses(assoc, gen, "C-FIND"):
                cat = category(int(status.Status))
                if cat == "pending" and identifier is not None:
                    found.append(identifier)
                elif cat == "failure":
                    raise QueryError(f"C-FIND failed with status 0x{int(status.Status):04X}")
        return found

    def find_studies(self, patient_id: str, *, issuer: str | None = None,
                     extra: Sequence[str] = ()) -> list[Dataset]:
        """Every study of one patient, with the counts a retrieve is checked against."""
        q = Dataset()
        q.PatientID = patient_id
        if issuer:
            q.IssuerOfPatientID = issuer
        for keyword in ("StudyInstanceUID", "StudyDate", "StudyDescription", "ModalitiesInStudy",
                        "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
                        "AccessionNumber", *extra):
            setattr(q, keyword, "")
        return self.find(q, "STUDY")

    def find_series(self, study_uid: str) -> list[Dataset]:
        q = Dataset()
        q.StudyInstanceUID = study_uid
        for keyword in ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                        "BodyPartExamined", "NumberOfSeriesRelatedInstances"):
            setattr(q, keyword, "")
        return self.find(q, "SERIES")

    def move(self, destination_aet: str, *, study_uid: str,
             series_uids: Sequence[str] = ()) -> MoveResult:
        """C-MOVE a study (or some of its series) to ``destination_aet``."""
        q = Dataset()
        q.StudyInstanceUID = study_uid
        level = "STUDY"
        if series_uids:
            q.SeriesInstanceUID = list(series_uids) if len(series_uids) > 1 else series_uids[0]
            level = "SERIES"
        q.QueryRetrieveLevel = level
        last: MoveResult | None = None
        pending_seen = False
        with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
            gen = assoc.send_c_move(q, destination_aet, StudyRootQueryRetrieveInformationModelMove)
            for status, _ in self._responses(assoc, gen, "C-MOVE"):
                code = int(status.Status)
                last = MoveResult(code, int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                                  int(status.get("NumberOfFailedSuboperations", 0) or 0),
                                  int(status.get("NumberOfWarningSuboperations", 0) or 0))
                if code == MOVE_DESTINATION_UNKNOWN:
                    raise QueryError(f"the PACS does not know the move destination "
                                     f"{destination_aet!r}: add the node to its DICOM "
                                     "modalities (AE title, host, port)")
                if category(code) == "failure":
                    comment = str(status.get("ErrorComment", "") or "").strip()
                    detail = f": {comment}" if comment else ""
                    if not pending_seen and last.completed + last.failed + last.warning == 0:
                        # Orthanc answers 0xC000, not the standard 0xA801, for an unknown
                        # destination; no sub-operation started, so that is the likely cause.
                        raise QueryError(
                            f"C-MOVE failed with status 0x{code:04X} before any sub-operation "
                            f"started{detail}; the PACS most likely does not know the move "
                            f"destination {destination_aet!r}: add the node to its DICOM "
                            "modalities (AE title, host, port)")
                    raise QueryError(f"C-MOVE failed with status 0x{code:04X} "
                                     f"({last.completed} completed, {last.failed} failed)"
                                     f"{detail}")
                if category(code) == "pending":
                    pending_seen = True
        if last is None:
            raise QueryError("C-MOVE ended without a final response")
        return last
