"""Coded concepts the result objects use, in one place.

Standard concepts (DCM, SCT, UCUM, LN) come first so that PACS viewers and downstream
SR consumers recognise them; the project's own coding scheme (``99DICOMNODE``, a private
scheme as PS3.16 §8.2 allows) is only used where DICOM has no concept for the meaning,
and every SR that uses it declares it in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from typing import Final

from pydicom.sr.coding import Code

# --- Project-local coding scheme -------------------------------------------------------

LOCAL_SCHEME: Final = "99DICOMNODE"
LOCAL_SCHEME_NAME: Final = "dicomnode local concepts"
LOCAL_SCHEME_ORGANIZATION: Final = "dicomnode project"


def local_code(value: str, meaning: str) -> Code:
    """A concept in the project's private scheme, for meanings DICOM does not code.

    Pipelines use this for their own measurement names (e.g. a specific binding ratio)
    instead of misusing a standard code with a different meaning.
    """
    if not value or len(value) > 16:
        raise ValueError("a CodeValue must have 1 to 16 characters")
    if not meaning or len(meaning) > 64:
        raise ValueError("a CodeMeaning must have 1 to 64 characters")
    return Code(value, LOCAL_SCHEME, meaning)


REASON_NOT_ANALYSED: Final = local_code("DN-0001", "Reason not analysed")

# --- Document structure (TID 1500) -------------------------------------------------------

IMAGING_MEASUREMENT_REPORT: Final = Code("126000", "DCM", "Imaging Measurement Report")
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT: Final = Code("121106", "DCM", "Comment")

# CID 6047 "CAD Processing and Findings Summary": the standard way to say whether the
# algorithm ran, so one item answers "was this study analysed" for any consumer.
ANALYSIS_SUMMARY: Final = Code("111017", "DCM", "CAD Processing and Findings Summary")
ANALYSED_WITH_FINDINGS: Final = Code("111242", "DCM", "All algorithms succeeded; with findings")
ANALYSED_WITHOUT_FINDINGS: Final = Code(
    "111241", "DCM", "All algorithms succeeded; without findings"
)
NOT_ANALYSED: Final = Code("111245", "DCM", "No algorithms succeeded; without findings")

# --- Procedures (CID 100) ----------------------------------------------------------------

IMAGING_PROCEDURE: Final = Code("363679005", "SCT", "Imaging procedure")
SPECT_BRAIN: Final = Code("39632-5", "LN", "SPECT brain")
NM_UNSPECIFIED_BODY_REGION: Final = Code("49118-3", "LN", "NM unspecified body region")
CT_UNSPECIFIED_BODY_REGION: Final = Code("25045-6", "LN", "CT unspecified body region")
XR_UNSPECIFIED_BODY_REGION: Final = Code("43468-8", "LN", "XR unspecified body region")

# --- Measurement names -------------------------------------------------------------------

PROBABILITY: Final = Code("122157", "DCM", "Probability")
THRESHOLD_VALUE: Final = Code("122411", "DCM", "Threshold Value")
# CID 6048 "CAD Operating Point Axis Label": the axes a model card's operating points use.
CASE_SENSITIVITY: Final = Code("111088", "DCM", "Case Sensitivity")
CASE_SPECIFICITY: Final = Code("111090", "DCM", "Case Specificity")
VOLUME: Final = Code("118565006", "SCT", "Volume")
RATIO: Final = Code("118586006", "SCT", "Ratio")

# CID 7464 "General Region of Interest Measurement Modifier"
MEAN: Final = Code("373098007", "SCT", "Mean")
MAXIMUM: Final = Code("56851009", "SCT", "Maximum")

# --- UCUM units (CID 7181) ---------------------------------------------------------------

UCUM_NO_UNITS: Final = Code("1", "UCUM", "no units")
UCUM_PERCENT: Final = Code("%", "UCUM", "Percent")
UCUM_RATIO: Final = Code("{ratio}", "UCUM", "ratio")
UCUM_CUBIC_CENTIMETER: Final = Code("cm3", "UCUM", "cubic centimeter")
UCUM_MILLIMETER: Final = Code("mm", "UCUM", "mm")

# --- Qualitative evaluations -------------------------------------------------------------

NORMALITY: Final = Code("121402", "DCM", "Normality")
NORMAL: Final = Code("17621005", "SCT", "Normal")
ABNORMAL: Final = Code("263654008", "SCT", "Abnormal")
INDETERMINATE: Final = Code("82334004", "SCT", "Indeterminate")
FINDING: Final = Code("404684003", "SCT", "Finding")

# --- Laterality (CID 244) ----------------------------------------------------------------

RIGHT: Final = Code("24028007", "SCT", "Right")
LEFT: Final = Code("7771000", "SCT", "Left")
BILATERAL: Final = Code("51440002", "SCT", "Bilateral")

# --- Anatomy -----------------------------------------------------------------------------

BRAIN: Final = Code("12738006", "SCT", "Brain")
CORPUS_STRIATUM: Final = Code("31428008", "SCT", "Corpus striatum")
PUTAMEN: Final = Code("89278009", "SCT", "Putamen")
CAUDATE_NUCLEUS: Final = Code("11000004", "SCT", "Caudate Nucleus")
OCCIPITAL_LOBE: Final = Code("31065004", "SCT", "Occipital lobe")
LUNG: Final = Code("39607008", "SCT", "Lung")
CHEST: Final = Code("816094009", "SCT", "Chest")
