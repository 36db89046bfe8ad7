"""TID 1500 Measurement Reports: what an analysis found, as an SR a PACS can show.

Pipelines describe their result in the project's own terms (frozen dataclasses below);
this module turns that into a Comprehensive 3D SR with highdicom, whose constructors
check the template rules, and reads such a report back for tests, e2e checks and the
history jobs that compare a study with its priors.

Where things go in the content tree (TID 1500 → TID 1501 → TID 300 / TID 4019):

* algorithm name and version: TID 4019 "Algorithm Name"/"Algorithm Version" in every
  measurement group; the model sha256 and the operating point as TID 4019 "Algorithm
  Parameters" text (TID 4019 has no dedicated hash concept). The TID 1001 device
  observer names the node and the algorithm, with a UID derived from name, version and
  sha256, so the observer identifies exactly one model build.
* probability, threshold, sensitivity, specificity: TID 300 NUM items (DCM
  "Probability", "Threshold Value", "Case Sensitivity", "Case Specificity") in percent.
* whether the study was analysed: a CODE "CAD Processing and Findings Summary" (CID
  6047) in the TID 1500 "Qualitative Evaluations" container, with the reason as TEXT;
  the research-use statement and free notes are TEXT items in the same container.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as _dicom_codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.results import codes
from dicomnode.results.common import (
    MANUFACTURER,
    RESEARCH_USE_STATEMENT,
    AlgorithmInfo,
    check_series_description,
    no_person_name_warnings,
    reference_dataset,
    software_versions,
)
from dicomnode.results.uids import derive_uid

__all__ = [
    "AlgorithmInfo",
    "Analysed",
    "Evaluation",
    "FindingGroup",
    "MeasurementValue",
    "NotAnalysed",
    "OperatingPoint",
    "Outcome",
    "Predecessor",
    "ReportContents",
    "TextNote",
    "build_measurement_report",
    "probability",
    "read_measurement_report",
]

_SHA256_PARAMETER = "model sha256: "
_OPERATING_POINT_PARAMETER = re.compile(r"operating point (?P<name>.+?): threshold ")
_NOT_ANALYSED_TRACKING_ID = "not analysed"


@dataclass(frozen=True)
class MeasurementValue:
    """One numeric result with UCUM units, optionally tied to an anatomic site.

    ``derivation`` says how a value summarises a region (CID 7464, e.g. Mean, Maximum).
    """

    concept: Code
    value: float
    unit: Code
    finding_site: Code | None = None
    laterality: Code | None = None
    derivation: Code | None = None

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not math.isfinite(self.value):
            raise ValueError(f"{self.concept.meaning}: value must be a finite number")
        if self.unit.scheme_designator != "UCUM":
            raise ValueError(f"{self.concept.meaning}: unit must be a UCUM code")
        if self.laterality is not None and self.finding_site is None:
            raise ValueError(f"{self.concept.meaning}: laterality needs a finding site")


def probability(
    value: float,
    *,
    concept: Code = codes.PROBABILITY,
    finding_site: Code | None = None,
    laterality: Code | None = None,
) -> MeasurementValue:
    """A model probability (a fraction, as models output it) written in percent.

    Percent reads plainly in a viewer ("Probability: 87 %"), where the UCUM unit "1"
    would show as "0.87 1".
    """
    if not 0.0 <= value <= 1.0:
        raise ValueError("a probability must lie between 0 and 1")
    return MeasurementValue(concept, _percent(value), codes.UCUM_PERCENT, finding_site, laterality)


@dataclass(frozen=True)
class Evaluation:
    """A coded qualitative result, e.g. Normality = Abnormal."""

    concept: Code
    value: Code


@dataclass(frozen=True)
class OperatingPoint:
    """The decision threshold a probability was compared with, and what the model card
    reports for it on held-out data (fractions, as on the card; written in percent)."""

    name: str
    threshold: float
    sensitivity: float | None = None
    specificity: float | None = None

    def __post_init__(self) -> None:
        if not self.name.strip() or ":" in self.name:
            raise ValueError("operating point name must be non-empty and without ':'")
        for label, value in (
            ("threshold", self.threshold),
            ("sensitivity", self.sensitivity),
            ("specificity", self.specificity),
        ):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"operating point {label} must lie between 0 and 1")

    def describe(self) -> str:
        """The TID 4019 parameter text, so a reader sees the operating point in words."""
        parts = [f"operating point {self.name}: threshold {self.threshold:g}"]
        if self.sensitivity is not None:
            parts.append(f"sensitivity {self.sensitivity:g}")
        if self.specificity is not None:
            parts.append(f"specificity {self.specificity:g}")
        return ", ".join(parts) + " (model card, held-out data)"

    def measurements(self) -> tuple[MeasurementValue, ...]:
        values = [
            MeasurementValue(codes.THRESHOLD_VALUE, _percent(self.threshold), codes.UCUM_PERCENT)
        ]
        if self.sensitivity is not None:
            values.append(
                MeasurementValue(
                    codes.CASE_SENSITIVITY, _percent(self.sensitivity), codes.UCUM_PERCENT
                )
            )
        if self.specificity is not None:
            values.append(
                MeasurementValue(
                    codes.CASE_SPECIFICITY, _percent(self.specificity), codes.UCUM_PERCENT
                )
            )
        return tuple(values)


@dataclass(frozen=True)
class FindingGroup:
    """One TID 1501 measurement group: what was found where, with its numbers.

    ``tracking_id`` names the finding for people (e.g. "left putamen"); its Tracking
    UID is derived from the study, the algorithm name and ``tracking_id``, so the same
    finding keeps its UID across re-runs and versions unless ``tracking_uid`` is given.
    ``source_sop_instance_uids`` are the source images this group was measured on; each
    must be among the report's sources.
    """

    tracking_id: str
    finding_type: Code | None = None
    finding_site: Code | None = None
    laterality: Code | None = None
    measurements: tuple[MeasurementValue, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()
    source_sop_instance_uids: tuple[str, ...] = ()
    operating_point: OperatingPoint | None = None
    tracking_uid: str | None = None

    def __post_init__(self) -> None:
        if not self.tracking_id.strip():
            raise ValueError("tracking_id must not be empty")
        if self.laterality is not None and self.finding_site is None:
            raise ValueError(f"{self.tracking_id}: laterality needs a finding site")
        object.__setattr__(self, "measurements", tuple(self.measurements))
        object.__setattr__(self, "evaluations", tuple(self.evaluations))
        object.__setattr__(self, "source_sop_instance_uids", tuple(self.source_sop_instance_uids))


@dataclass(frozen=True)
class TextNote:
    """Free text a viewer shows in the report, e.g. a caveat about input quality."""

    text: str
    concept: Code = codes.COMMENT

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("a text note must not be empty")


@dataclass(frozen=True)
class Analysed:
    """The algorithm ran; ``findings`` may be empty (nothing to report)."""

    findings: tuple[FindingGroup, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", tuple(self.findings))


@dataclass(frozen=True)
class NotAnalysed:
    """The algorithm declined the study, e.g. too few slices; ``reason`` says why in
    words a reader of the report understands (and never contains patient data)."""

    reason: str

    def __post_init__(self) -> None:
        if not self.reason.strip():
            raise ValueError("a not-analysed report needs a reason")


Outcome = Analysed | NotAnalysed


@dataclass(frozen=True)
class Predecessor:
    """An earlier report in the same study that this one supersedes (e.g. the report
    on a series before it was re-opened), listed in the Predecessor Documents Sequence."""

    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = Comprehensive3DSRStorage


@dataclass(frozen=True)
class ReportContents:
    """A report read back: what ``build_measurement_report`` was given."""

    algorithm: AlgorithmInfo
    outcome: Outcome
    notes: tuple[TextNote, ...] = ()
    research_use_statement: str | None = None
    source_sop_instance_uids: tuple[str, ...] = ()


def build_measurement_report(
    sources: Sequence[Dataset],
    outcome: Outcome,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_description: str,
    series_number: int = 900,
    instance_number: int = 1,
    procedure_reported: Code = codes.IMAGING_PROCEDURE,
    notes: Sequence[TextNote] = (),
    predecessors: Sequence[Predecessor] = (),
    content_datetime: datetime.datetime | None = None,
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for one run, in the sources' study.

    ``sources`` are the instances the algorithm used (header-only datasets suffice);
    all are listed as evidence and the first gives the Patient and Study modules.
    ``predecessors`` name reports this one supersedes (a re-opened series' older report).

    Example::

        series_uid = work.result_uid(algorithm.name, algorithm.version, "sr-series")
        report = build_measurement_report(
            work.datasets,
            Analysed((FindingGroup(
                "left putamen", codes.ABNORMAL, codes.PUTAMEN, codes.LEFT,
                measurements=(MeasurementValue(SBR, 1.4, codes.UCUM_RATIO),
                              probability(0.87)),
                evaluations=(Evaluation(codes.NORMALITY, codes.ABNORMAL),),
                operating_point=OperatingPoint("default", 0.5, 0.92, 0.88)),)),
            AlgorithmInfo("dat-net", "1.2.0", sha256),
            series_instance_uid=series_uid,
            sop_instance_uid=derive_uid(series_uid, 1),
            series_description="AI DaT quantification",
            procedure_reported=codes.SPECT_BRAIN,
        )
        # or, instead of Analysed(...): NotAnalysed("only 12 slices; at least 40 needed")
    """
    reference = reference_dataset(sources)
    check_series_description(series_description)
    study_instance_uid = str(reference.StudyInstanceUID)
    sop_classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sources}

    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    if isinstance(outcome, Analysed):
        groups = [
            _measurement_group(group, algorithm, study_instance_uid, sop_classes)
            for group in outcome.findings
        ]
        summary = (
            codes.ANALYSED_WITH_FINDINGS if outcome.findings else codes.ANALYSED_WITHOUT_FINDINGS
        )
    else:
        summary = codes.NOT_ANALYSED
    if not groups:
        # TID 1500 needs a measurement group; this one carries the algorithm identity.
        groups = [_status_group(summary, algorithm, study_instance_uid)]

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=procedure_reported,
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
    )
    root = report[0]
    library = _image_library(sources)
    if library is not None:
        items = list(root.ContentSequence)
        at = next(i for i, item in enumerate(items)
                  if item.ConceptNameCodeSequence[0].CodeValue == "126010")
        root.ContentSequence = hd.sr.ContentSequence([*items[:at], library, *items[at:]])
    root.ContentSequence.append(_qualitative_evaluations(summary, outcome, notes))
    _mark_containers_separate(root)

    kwargs: dict[str, Any] = {}
    if predecessors:
        kwargs["previous_versions"] = [
            _predecessor_dataset(study_instance_uid, predecessor) for predecessor in predecessors
        ]
    if content_datetime is not None:
        kwargs["content_date"] = content_datetime.date()
        kwargs["content_time"] = content_datetime.time()
    if _uses_local_scheme(root):
        kwargs["coding_schemes"] = [
            CodingSchemeIdentificationItem(
                designator=codes.LOCAL_SCHEME,
                name=codes.LOCAL_SCHEME_NAME,
                responsible_organization=codes.LOCAL_SCHEME_ORGANIZATION,
            )
        ]
    with no_person_name_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=list(sources),
            content=root,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=series_description,
            manufacturer_model_name=algorithm.name,
            content_qualification="RESEARCH",
            **kwargs,
        )
    sr.add_new("SoftwareVersions", "LO", list(software_versions(algorithm)))
    return sr


def read_measurement_report(ds: Dataset) -> ReportContents:
    """Read back a report this module built (or any TID 1500 with the same layout).

    Values come back as stored: probabilities in percent, codes as ``pydicom`` Codes.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("dataset is not a TID 1500 Measurement Report")
    groups = report.get_image_measurement_groups()
    if not groups:
        raise ValueError("report has no measurement group")
    algorithm, _ = _read_algorithm(groups[0][0])

    summary: Code | None = None
    reason: str | None = None
    statement: str | None = None
    notes: list[TextNote] = []
    for container in hd.sr.utils.find_content_items(
        report[0], name=codes.QUALITATIVE_EVALUATIONS, value_type="CONTAINER"
    ):
        for item in container.ContentSequence:
            name = _code(item.ConceptNameCodeSequence[0])
            if item.ValueType == "CODE" and name == codes.ANALYSIS_SUMMARY:
                summary = _code(item.ConceptCodeSequence[0])
            elif item.ValueType == "TEXT" and name == codes.REASON_NOT_ANALYSED:
                reason = str(item.TextValue)
            elif (
                item.ValueType == "TEXT"
                and name == codes.COMMENT
                and (str(item.TextValue) == RESEARCH_USE_STATEMENT)
            ):
                statement = str(item.TextValue)
            elif item.ValueType == "TEXT":
                notes.append(TextNote(str(item.TextValue), name))

    outcome: Outcome
    if summary == codes.NOT_ANALYSED:
        outcome = NotAnalysed(reason or "no reason recorded")
    elif summary == codes.ANALYSED_WITHOUT_FINDINGS:
        outcome = Analysed(())
    else:
        study_instance_uid = str(ds.StudyInstanceUID)
        outcome = Analysed(
            tuple(_read_group(group, algorithm, study_instance_uid) for group in groups)
        )
    return ReportContents(
        algorithm=algorithm,
        outcome=outcome,
        notes=tuple(notes),
        research_use_statement=statement,
        source_sop_instance_uids=tuple(uid for _, _, uid, _ in sr.get_evidence()),
    )


# --- building ---------------------------------------------------------------------------


def _percent(fraction: float) -> float:
    return round(fraction * 100.0, 6)


def _finding_sites(site: Code | None, laterality: Code | None) -> list[hd.sr.FindingSite] | None:
    if site is None:
        return None
    return [hd.sr.FindingSite(anatomic_location=site, laterality=laterality)]


def _algorithm_identification(
    algorithm: AlgorithmInfo, operating_point: OperatingPoint | None
) -> hd.sr.AlgorithmIdentification:
    parameters = list(algorithm.parameters)
    if algorithm.sha256 is not None:
        parameters.append(_SHA256_PARAMETER + algorithm.sha256)
    if operating_point is not None:
        parameters.append(operating_point.describe())
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=parameters or None,
    )


def _tracking_uid(study_instance_uid: str, algorithm: AlgorithmInfo, tracking_id: str) -> str:
    return derive_uid("tracking", study_instance_uid, algorithm.name, tracking_id)


def _measurement_group(
    group: FindingGroup,
    algorithm: AlgorithmInfo,
    study_instance_uid: str,
    sop_classes: dict[str, str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    values = list(group.measurements)
    if group.operating_point is not None:
        values.extend(group.operating_point.measurements())
    source_images = []
    for uid in group.source_sop_instance_uids:
        if uid not in sop_classes:
            raise ValueError(f"{group.tracking_id}: source instance is not among the sources")
        source_images.append(hd.sr.SourceImageForMeasurementGroup(sop_classes[uid], uid))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=group.tracking_uid
            or _tracking_uid(study_instance_uid, algorithm, group.tracking_id),
            identifier=group.tracking_id,
        ),
        finding_type=group.finding_type,
        algorithm_id=_algorithm_identification(algorithm, group.operating_point),
        finding_sites=_finding_sites(group.finding_site, group.laterality),
        measurements=[
            hd.sr.Measurement(
                name=value.concept,
                value=value.value,
                unit=value.unit,
                derivation=value.derivation,
                finding_sites=_finding_sites(value.finding_site, value.laterality),
            )
            for value in values
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=evaluation.concept, value=evaluation.value)
            for evaluation in group.evaluations
        ],
        source_images=source_images or None,
    )


def _status_group(
    summary: Code, algorithm: AlgorithmInfo, study_instance_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tracking_id = _NOT_ANALYSED_TRACKING_ID if summary == codes.NOT_ANALYSED else "no findings"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(study_instance_uid, algorithm, tracking_id),
            identifier=tracking_id,
        ),
        algorithm_id=_algorithm_identification(algorithm, None),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.ANALYSIS_SUMMARY, value=summary)
        ],
    )


def _predecessor_dataset(study_instance_uid: str, predecessor: Predecessor) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = predecessor.series_instance_uid
    ds.SOPInstanceUID = predecessor.sop_instance_uid
    ds.SOPClassUID = predecessor.sop_class_uid
    return ds


def _observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(
            "device-observer", algorithm.name, algorithm.version, algorithm.sha256 or ""
        ),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=algorithm.label[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=_dicom_codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _qualitative_evaluations(
    summary: Code, outcome: Outcome, notes: Iterable[TextNote]
) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: document-level evaluations, where viewers show free text."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.ANALYSIS_SUMMARY, value=summary, relationship_type=contains
        )
    ]
    if isinstance(outcome, NotAnalysed):
        items.append(
            hd.sr.TextContentItem(
                name=codes.REASON_NOT_ANALYSED, value=outcome.reason, relationship_type=contains
            )
        )
    items.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT, value=RESEARCH_USE_STATEMENT, relationship_type=contains
        )
    )
    items.extend(
        hd.sr.TextContentItem(name=note.concept, value=note.text, relationship_type=contains)
        for note in notes
    )
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=contains
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _image_library(sources: Sequence[Dataset]) -> hd.sr.ContainerContentItem | None:
    """TID 1600 Image Library: one Image Library Group listing the source images.

    Viewers look the report's images up here (OHIF's SR handler reads the referenced
    images from Image Library > Image Library Group). The entries carry no TID 1602
    descriptors, which are optional and whose required attributes differ by modality
    (a radiograph without Imager Pixel Spacing could not be described).
    """
    images = [ds for ds in sources if "Rows" in ds and "SOPClassUID" in ds]
    if not images:
        return None
    entries = [hd.sr.ImageContentItem(
        name=_SOURCE, referenced_sop_class_uid=str(ds.SOPClassUID),
        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for ds in images]
    group = hd.sr.ContainerContentItem(name=_dicom_codes.DCM.ImageLibraryGroup,
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence(entries)
    library = hd.sr.ContainerContentItem(name=_dicom_codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


_SOURCE = Code("260753009", "SCT", "Source")


def _mark_containers_separate(item: Dataset) -> None:
    """Measurements are separate statements, not a narrative; DCMTK and most viewers
    only print the concept names ("Probability: 87 %") of SEPARATE containers."""
    if item.ValueType == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _mark_containers_separate(child)


def _uses_local_scheme(item: Dataset) -> bool:
    for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
        for code in item.get(keyword, []):
            if code.CodingSchemeDesignator == codes.LOCAL_SCHEME:
                return True
    for measured in item.get("MeasuredValueSequence", []):
        for unit in measured.MeasurementUnitsCodeSequence:
            if unit.CodingSchemeDesignator == codes.LOCAL_SCHEME:
                return True
    return any(_uses_local_scheme(child) for child in item.get("ContentSequence", []))


# --- reading ----------------------------------------------------------------------------


def _code(concept: Dataset) -> Code:
    return Code(
        str(concept.CodeValue), str(concept.CodingSchemeDesignator), str(concept.CodeMeaning)
    )


def _optional_code(concept: Dataset | None) -> Code | None:
    return None if concept is None else _code(concept)


def _site(sites: Sequence[hd.sr.FindingSite]) -> tuple[Code | None, Code | None]:
    if not sites:
        return None, None
    return _code(sites[0].value), _optional_code(sites[0].laterality)


def _read_algorithm(group_item: Dataset) -> tuple[AlgorithmInfo, OperatingPoint | None]:
    texts: dict[str, list[str]] = {}
    for item in group_item.ContentSequence:
        if item.ValueType == "TEXT":
            texts.setdefault(str(item.ConceptNameCodeSequence[0].CodeValue), []).append(
                str(item.TextValue)
            )
    sha256: str | None = None
    operating_point: tuple[str, str] | None = None
    parameters: list[str] = []
    for text in texts.get("111002", []):
        match = _OPERATING_POINT_PARAMETER.match(text)
        if text.startswith(_SHA256_PARAMETER):
            sha256 = text[len(_SHA256_PARAMETER) :]
        elif match:
            operating_point = (match["name"], text)
        else:
            parameters.append(text)
    names, versions = texts.get("111001"), texts.get("111003")
    if not names or not versions:
        raise ValueError("measurement group has no algorithm identification")
    algorithm = AlgorithmInfo(names[0], versions[0], sha256, tuple(parameters))
    if operating_point is None:
        return algorithm, None
    # The numbers come from the NUM items; the name only lives in the parameter text.
    return algorithm, OperatingPoint(operating_point[0], 0.0)


def _read_group(
    group: hd.sr.MeasurementsAndQualitativeEvaluations,
    algorithm: AlgorithmInfo,
    study_instance_uid: str,
) -> FindingGroup:
    _, operating_point = _read_algorithm(group[0])
    measurements: list[MeasurementValue] = []
    op_values: dict[Code, float] = {}
    for measurement in group.get_measurements():
        name = _code(measurement.name)
        unit = _code(measurement.unit)
        if operating_point is not None and name in (
            codes.THRESHOLD_VALUE,
            codes.CASE_SENSITIVITY,
            codes.CASE_SPECIFICITY,
        ):
            op_values[name] = float(measurement.value) / 100.0
            continue
        site, laterality = _site(measurement.finding_sites)
        measurements.append(
            MeasurementValue(
                name,
                float(measurement.value),
                unit,
                site,
                laterality,
                _optional_code(measurement.derivation),
            )
        )
    if operating_point is not None:
        operating_point = OperatingPoint(
            operating_point.name,
            op_values.get(codes.THRESHOLD_VALUE, 0.0),
            op_values.get(codes.CASE_SENSITIVITY),
            op_values.get(codes.CASE_SPECIFICITY),
        )
    site, laterality = _site(group.finding_sites)
    tracking_id = str(group.tracking_identifier)
    tracking_uid = str(group.tracking_uid)
    if tracking_uid == _tracking_uid(study_instance_uid, algorithm, tracking_id):
        tracking_uid_or_none: str | None = None
    else:
        tracking_uid_or_none = tracking_uid
    return FindingGroup(
        tracking_id=tracking_id,
        finding_type=_optional_code(group.finding_type),
        finding_site=site,
        laterality=laterality,
        measurements=tuple(measurements),
        evaluations=tuple(
            Evaluation(_code(evaluation.name), _code(cast(Dataset, evaluation.value)))
            for evaluation in group.get_qualitative_evaluations()
        ),
        source_sop_instance_uids=tuple(
            str(image.referenced_sop_instance_uid) for image in group.source_images
        ),
        operating_point=operating_point,
        tracking_uid=tracking_uid_or_none,
    )
