"""Query/retrieve against the PACS: C-FIND, C-MOVE (to the node itself), C-GET fallback.

What sites report about real PACSs shapes this client: pending responses that never end
(every operation has a total deadline, after which it is cancelled and the association
aborted), a PACS that does not know the node's AE (its C-MOVE failure is turned into an
error that says so: 0xA801, or Orthanc's 0xC000 before any sub-operation), and retrieves
that stop early (the sub-operation counts are returned so the caller can check them
against what C-FIND promised).

C-GET needs no route from the PACS back to the node: the PACS sends the instances as
C-STORE sub-operations on the association the node opened, for the storage classes the
node proposed with itself in the SCP role (SCP/SCU role selection, PS3.4 C.4.3). The
caller's C-STORE handler takes them, so they go through the same durable ingest path as
any instance the node receives (spool file fsynced and recorded before the sub-operation
is answered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.ingest.spool import Spool
from dicomnode.net.scp import (
    _SPOOL_ATTR,
    TRANSFER_SYNTAXES,
    _assoc_socket,
    configure_pynetdicom,
    set_nodelay,
)
from dicomnode.net.scu import RejectionWatch
from dicomnode.net.status import Status, category

log = logging.getLogger(__name__)

#: Storage classes a C-GET proposes with the node as SCP: the images priors are made of
#: and the node's own results. An instance of another class fails its sub-operation (the
#: PACS counts it as failed), which the caller sees as a retrieve that stopped early.
GET_STORAGE_CLASSES: tuple[str, ...] = (
    MRImageStorage, EnhancedMRImageStorage, CTImageStorage, EnhancedCTImageStorage,
    PositronEmissionTomographyImageStorage, EnhancedPETImageStorage,
    NuclearMedicineImageStorage, Comprehensive3DSRStorage, ComprehensiveSRStorage,
    EnhancedSRStorage, BasicTextSRStorage, KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage,
    SegmentationStorage,
)

StoreHandler = Callable[[evt.Event], "int | Dataset"]


class QueryError(Exception):
    """A query or retrieve failed; the message says why in words an administrator acts on."""


@dataclass(frozen=True)
class MoveResult:
    """The final response of a C-MOVE or C-GET: its status and sub-operation counts."""

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
    def _association(self, context: str, *, scp_classes: Sequence[str] = (),
                     handle_store: StoreHandler | None = None,
                     spool: Spool | None = None) -> Iterator[Any]:
        """``scp_classes``: storage classes proposed with the node as SCP (C-GET), whose
        C-STORE requests ``handle_store`` answers, received into ``spool``."""
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(context)
        for sop_class in scp_classes:
            ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        opened: list[bool] = []

        def on_open(event: evt.Event) -> None:
            opened.append(True)
            if spool is not None:  # received C-STOREs stream into the spool's temp files
                setattr(event.assoc, _SPOOL_ATTR, spool)
            set_nodelay(_assoc_socket(event.assoc))

        rejection = RejectionWatch()
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_open), rejection.handler]
        if handle_store is not None:
            handlers.append((evt.EVT_C_STORE, handle_store))
        roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in scp_classes]
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet,
                             ext_neg=roles or None, evt_handlers=handlers)
        rejected = rejection.reason(assoc)
        if not assoc.is_established:
            where = f"{self.called_aet}@{self.host}:{self.port}"
            if not opened:
                raise QueryError(f"{where} could not be reached")
            if rejected is not None:
                raise QueryError(f"{where} rejected the association ({rejected}; is "
                                 f"{self.calling_aet} known to it?)")
            raise QueryError(f"{where} refused the query/retrieve service")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _responses(self, assoc: Any, gen: Any, what: str, *, silent_refusal: str = ""
                   ) -> Iterator[tuple[Dataset, Any]]:
        """Responses until the final one, or the total deadline: then C-CANCEL and abort.

        ``silent_refusal``: what it most likely means when not even a first response
        comes (some PACSs refuse a service by not answering).
        """
        deadline = time.monotonic() + self.total_timeout_s
        first = True
        last = time.monotonic()
        for status, identifier in gen:
            waited, last = time.monotonic() - last, time.monotonic()
            if time.monotonic() > deadline:
                assoc.abort()
                raise QueryError(f"{what}: no final response within "
                                 f"{self.total_timeout_s:g} s; cancelled")
            if not status:  # pynetdicom yields an empty status on DIMSE timeout/abort
                # Orthanc refuses a request from a caller it does not know with an
                # A-ABORT (before the association notes it, and pynetdicom aborts on its
                # own timeout too): an empty status well before the DIMSE timeout is the
                # PACS's abort, not a silent PACS
                if waited < 0.9 * self.timeout_s:
                    raise QueryError(
                        f"{what}: the PACS aborted the association (or sent no valid "
                        "response) instead of answering; it "
                        f"most likely does not allow {what} from {self.calling_aet!r} (the "
                        "node must be a known modality, or the PACS must allow the service "
                        "for any caller)")
                if first and silent_refusal:
                    raise QueryError(f"{what}: no response within {self.timeout_s:g} s; "
                                     f"{silent_refusal}")
                raise QueryError(f"{what}: the PACS stopped answering (no response within "
                                 f"{self.timeout_s:g} s)")
            first = False
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

    @staticmethod
    def _retrieve_identifier(study_uid: str, series_uids: Sequence[str]) -> Dataset:
        q = Dataset()
        q.StudyInstanceUID = study_uid
        level = "STUDY"
        if series_uids:
            q.SeriesInstanceUID = list(series_uids) if len(series_uids) > 1 else series_uids[0]
            level = "SERIES"
        q.QueryRetrieveLevel = level
        return q

    @staticmethod
    def _result(status: Dataset) -> MoveResult:
        return MoveResult(int(status.Status),
                          int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                          int(status.get("NumberOfFailedSuboperations", 0) or 0),
                          int(status.get("NumberOfWarningSuboperations", 0) or 0))

    def move(self, destination_aet: str, *, study_uid: str,
             series_uids: Sequence[str] = ()) -> MoveResult:
        """C-MOVE a study (or some of its series) to ``destination_aet``."""
        q = self._retrieve_identifier(study_uid, series_uids)
        last: MoveResult | None = None
        pending_seen = False
        with self._association(StudyRootQueryRetrieveInformationModelMove) as assoc:
            gen = assoc.send_c_move(q, destination_aet, StudyRootQueryRetrieveInformationModelMove)
            for status, _ in self._responses(assoc, gen, "C-MOVE"):
                last = self._result(status)
                code = last.status
                if code == Status.MOVE_DESTINATION_UNKNOWN:
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

    def get(self, *, study_uid: str, series_uids: Sequence[str] = (),
            handle_store: StoreHandler, spool: Spool | None = None,
            storage_classes: Sequence[str] = GET_STORAGE_CLASSES) -> MoveResult:
        """C-GET a study (or some of its series) on this association.

        ``handle_store`` answers each C-STORE sub-operation (the node's durable store:
        the success it returns is what the PACS counts as completed); with ``spool``
        the instances stream into the spool's temp files as they arrive.
        """
        q = self._retrieve_identifier(study_uid, series_uids)
        model = StudyRootQueryRetrieveInformationModelGet
        last: MoveResult | None = None
        with self._association(model, scp_classes=storage_classes,
                               handle_store=handle_store, spool=spool) as assoc:
            accepted = assoc.accepted_contexts
            if not any(cx.abstract_syntax == model for cx in accepted):
                raise QueryError("the PACS does not offer C-GET (Study Root Query/Retrieve "
                                 "Get was not accepted); use C-MOVE (query.retrieve: move)")
            if not any(cx.abstract_syntax in storage_classes and cx.as_scp for cx in accepted):
                raise QueryError("the PACS accepted no storage class with the node as SCP "
                                 "(SCP/SCU role selection), so a C-GET cannot send anything")
            gen = assoc.send_c_get(q, model)
            # Orthanc aborts a C-GET from a caller it does not know (see _responses);
            # other PACSs refuse by not answering at all
            refusal = (f"the PACS most likely does not allow C-GET from "
                       f"{self.calling_aet!r} (the node must be a known modality, or the PACS "
                       "must allow C-GET for any caller)")
            for status, _ in self._responses(assoc, gen, "C-GET", silent_refusal=refusal):
                last = self._result(status)
                cat = category(last.status)
                if cat in ("failure", "cancel"):
                    comment = str(status.get("ErrorComment", "") or "").strip()
                    detail = f": {comment}" if comment else ""
                    raise QueryError(f"C-GET failed with status 0x{last.status:04X} "
                                     f"({last.completed} completed, {last.failed} failed)"
                                     f"{detail}")
        if last is None:
            raise QueryError("C-GET ended without a final response")
        return last
