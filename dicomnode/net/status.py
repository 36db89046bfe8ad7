"""DIMSE status codes the node sends or interprets, in one table (PS3.4 Annex B, PS3.7 C)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    # Storage failures (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700          # disk full, instance too large for this node
    DATASET_MISMATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000         # 0xC000-0xCFFF: the dataset cannot be understood
    CANNOT_UNDERSTAND_TRUNCATED = 0xC001
    CANNOT_UNDERSTAND_BAD_UID = 0xC002
    CANNOT_UNDERSTAND_UID_MISMATCH = 0xC003
    PROCESSING_FAILURE = 0x0110        # unexpected local failure (PS3.7 C.4.1)
    # Storage warnings
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # Query/Retrieve (PS3.4 C.4.2.1.5): the C-MOVE destination is not a known AE.
    # Orthanc answers 0xC000 instead, before any sub-operation (dicomnode.net.qr).
    MOVE_DESTINATION_UNKNOWN = 0xA801


REJECTION_STATUS = {
    "cannot_understand": Status.CANNOT_UNDERSTAND_TRUNCATED,
    "invalid_uid": Status.CANNOT_UNDERSTAND_BAD_UID,
    "uid_mismatch": Status.CANNOT_UNDERSTAND_UID_MISMATCH,
    "class_mismatch": Status.DATASET_MISMATCH_SOP_CLASS,
}


def category(status: int) -> str:
    """success, warning, pending, cancel or failure, as PS3.7 C defines the ranges."""
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    return "failure"


# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)   # permanent, service user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)    # permanent, service user, called AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation, local limit exceeded
# A-ASSOCIATE-RJ for a User Identity that is missing or does not verify: PS3.7 D.3.3.7
# asks for rejected-permanent with the ACSE-related service-provider as source.
REJECT_USER_IDENTITY = (0x01, 0x02, 0x01)

# A-ABORT reason/diag with source 2, the DICOM UL service-provider (PS3.8 9.3.8)
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PARAMETER = 0x04
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06
