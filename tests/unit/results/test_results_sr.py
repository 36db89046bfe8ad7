"""TID 1500 reports built on pydicom's real files, checked with dciodvfy, dsr2html and
highdicom's own parser after a round trip through bytes."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

import dicomnode
from dicomnode.results import codes
from dicomnode.results.common import RESEARCH_USE_STATEMENT, AlgorithmInfo
from dicomnode.results.sr import (
    Analysed,
    Evaluation,
    FindingGroup,
    MeasurementValue,
    NotAnalysed,
    OperatingPoint,
    Outcome,
    Predecessor,
    TextNote,
    build_measurement_report,
    probability,
    read_measurement_report,
)
from dicomnode.results.uids import derive_uid
from dicomnode.results.validate import dciodvfy_report, render_sr_html
from tests.peers import PYDICOM_DATA, PYDICOM_FILES, require_tool

SOURCES = {
    "CT": PYDICOM_FILES / "CT_small.dcm",
    "MR": PYDICOM_FILES / "MR_small.dcm",
    "NM": PYDICOM_DATA / "JPEG2000_UNC.dcm",
    "CR": PYDICOM_DATA / "RG1_UNCI.dcm",
}
SHA256 = "3f" * 32
ALGORITHM = AlgorithmInfo("dat-net", "1.2.0", SHA256, ("preprocessing: dat-v1",))
SBR = codes.local_code("DN-SBR", "Specific binding ratio")
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientAge",
)


def read_source(modality: str) -> Dataset:
    path: Path = SOURCES[modality]
    return pydicom.dcmread(path, stop_before_pixels=True)


def findings(source: Dataset) -> Analysed:
    uid = str(source.SOPInstanceUID)
    return Analysed(
        (
            FindingGroup(
                "left putamen",
                codes.ABNORMAL,
                codes.PUTAMEN,
                codes.LEFT,
                measurements=(
                    MeasurementValue(SBR, 1.4, codes.UCUM_RATIO, derivation=codes.MEAN),
                    probability(0.87),
                    MeasurementValue(
                        codes.VOLUME, 4.25, codes.UCUM_CUBIC_CENTIMETER, codes.PUTAMEN, codes.LEFT
                    ),
                ),
                evaluations=(Evaluation(codes.NORMALITY, codes.ABNORMAL),),
                source_sop_instance_uids=(uid,),
                operating_point=OperatingPoint("default", 0.5, 0.92, 0.88),
            ),
            FindingGroup(
                "right putamen",
                codes.NORMAL,
                codes.PUTAMEN,
                codes.RIGHT,
                measurements=(MeasurementValue(SBR, 2.75, codes.UCUM_RATIO),),
                evaluations=(Evaluation(codes.NORMALITY, codes.NORMAL),),
            ),
        )
    )


def build(
    source: Dataset,
    outcome: Outcome,
    algorithm: AlgorithmInfo = ALGORITHM,
    **kwargs: object,
) -> Dataset:
    """As a pipeline does it: UIDs from the inputs and the algorithm version."""
    series = derive_uid(
        str(source.StudyInstanceUID),
        [str(source.SOPInstanceUID)],
        algorithm.name,
        algorithm.version,
        "sr",
    )
    return build_measurement_report(
        [source],
        outcome,
        algorithm,
        series_instance_uid=series,
        sop_instance_uid=derive_uid(series, 1),
        series_description="AI DaT quantification",
        procedure_reported=codes.SPECT_BRAIN,
        **kwargs,  # type: ignore[arg-type]
    )


def through_bytes(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def html_text(ds: Dataset) -> str:
    """What a reader of the dsr2html page sees, tags removed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", render_sr_html(ds))).replace("&quot;", '"')


@pytest.mark.parametrize("modality", sorted(SOURCES))
def test_report_has_no_dciodvfy_errors(modality: str) -> None:
    require_tool("dciodvfy")
    source = read_source(modality)
    report = dciodvfy_report(build(source, findings(source)))
    assert report.errors == []
    for warning in report.warnings:
        # Only warnings inherited from the source or about the declared private scheme.
        assert re.search(r"Value is zero|Retired Person Name|<99DICOMNODE>", warning), warning


def test_not_analysed_report_validates_and_says_why() -> None:
    require_tool("dciodvfy")
    require_tool("dsr2html")
    source = read_source("NM")
    reason = "Only 12 slices; at least 40 are needed."
    report = build(source, NotAnalysed(reason))
    assert dciodvfy_report(report).errors == []
    contents = read_measurement_report(through_bytes(report))
    assert contents.outcome == NotAnalysed(reason)
    assert contents.algorithm == ALGORITHM
    text = html_text(report)
    assert f"Reason not analysed: {reason}" in text
    assert "No algorithms succeeded; without findings" in text
    assert RESEARCH_USE_STATEMENT in text
    assert 'Algorithm Name = "dat-net"' in text


def test_rendered_report_shows_values_units_algorithm_and_warning() -> None:
    require_tool("dsr2html")
    source = read_source("NM")
    text = html_text(build(source, findings(source), notes=[TextNote("Patient moved.")]))
    for shown in (
        "Specific binding ratio: 1.4 {ratio}",
        "Probability: 87.0 %",
        "Volume: 4.25 cm3",
        "Threshold Value: 50.0 %",
        "Case Sensitivity: 92.0 %",
        "Case Specificity: 88.0 %",
        "Normality: Abnormal",
        "Putamen",
        "Laterality = Left",
        'Algorithm Name = "dat-net"',
        'Algorithm Version = "1.2.0"',
        f"model sha256: {SHA256}",
        "operating point default: threshold 0.5, sensitivity 0.92, specificity 0.88",
        RESEARCH_USE_STATEMENT,
        "Comment: Patient moved.",
        "AI DaT quantification",
    ):
        assert shown in text, shown


@pytest.mark.parametrize("modality", sorted(SOURCES))
def test_report_sits_in_the_source_study_as_a_new_ai_series(modality: str) -> None:
    source = read_source(modality)
    report = build(source, findings(source))
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            assert report.get(keyword) == source.get(keyword), keyword
    assert report.SeriesInstanceUID != source.SeriesInstanceUID
    assert report.SeriesDescription.startswith("AI ")
    assert report.Modality == "SR"
    assert report.Manufacturer == "dicomnode"
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.ContentQualification == "RESEARCH"
    assert report.VerificationFlag == "UNVERIFIED"
    assert report.PreliminaryFlag == "PRELIMINARY"
    assert list(report.SoftwareVersions) == [f"dicomnode {dicomnode.__version__}", "dat-net 1.2.0"]


def test_round_trip_through_bytes_gives_back_the_findings() -> None:
    source = read_source("MR")
    outcome = findings(source)
    notes = (TextNote("Patient moved."),)
    ds = through_bytes(build(source, outcome, notes=notes))

    contents = read_measurement_report(ds)
    assert contents.algorithm == ALGORITHM
    assert contents.outcome == outcome
    assert contents.notes == notes
    assert contents.research_use_statement == RESEARCH_USE_STATEMENT
    assert contents.source_sop_instance_uids == (str(source.SOPInstanceUID),)

    # highdicom's own reader agrees, independently of ours.
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    sr = hd.sr.srread(buffer)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["left putamen", "right putamen"]
    values = {(m.name.meaning, m.unit.value): m.value for m in groups[0].get_measurements()}
    assert values == {
        ("Specific binding ratio", "{ratio}"): 1.4,
        ("Probability", "%"): 87.0,
        ("Volume", "cm3"): 4.25,
        ("Threshold Value", "%"): 50.0,
        ("Case Sensitivity", "%"): 92.0,
        ("Case Specificity", "%"): 88.0,
    }
    assert groups[0].finding_type == codes.ABNORMAL
    assert groups[0].finding_sites[0].laterality == codes.LEFT
    assert [str(i.referenced_sop_instance_uid) for i in groups[0].source_images] == [
        str(source.SOPInstanceUID)
    ]


def test_every_group_names_the_algorithm() -> None:
    source = read_source("CT")
    content = hd.sr.Comprehensive3DSR.from_dataset(build(source, findings(source))).content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = content.get_image_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        texts = {
            (item.name.meaning, item.value)
            for item in group[0].ContentSequence
            if item.value_type == hd.sr.ValueTypeValues.TEXT
        }
        assert ("Algorithm Name", "dat-net") in texts
        assert ("Algorithm Version", "1.2.0") in texts
        assert ("Algorithm Parameters", f"model sha256: {SHA256}") in texts


def test_evidence_lists_every_source() -> None:
    first = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    second = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    second.SOPInstanceUID = derive_uid("second slice")
    report = build_measurement_report(
        [first, second],
        findings(first),
        ALGORITHM,
        series_instance_uid=derive_uid("s"),
        sop_instance_uid=derive_uid("i"),
        series_description="AI test",
    )
    evidence = report.CurrentRequestedProcedureEvidenceSequence
    listed = {
        str(item.ReferencedSOPInstanceUID)
        for study in evidence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert listed == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}


def test_image_library_lists_the_sources_before_the_measurements() -> None:
    """TID 1600, as OHIF reads it: Image Library > Image Library Group > IMAGE items."""
    first = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    second = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    second.SOPInstanceUID = derive_uid("second slice")
    report = through_bytes(build_measurement_report(
        [first, second], findings(first), ALGORITHM, series_instance_uid=derive_uid("s"),
        sop_instance_uid=derive_uid("i"), series_description="AI test"))
    names = [str(item.ConceptNameCodeSequence[0].CodeValue) for item in report.ContentSequence]
    assert names.index("111028") < names.index("126010")
    library = report.ContentSequence[names.index("111028")]
    (group,) = library.ContentSequence
    assert group.ConceptNameCodeSequence[0].CodeValue == "126200"
    assert [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in group.ContentSequence] == [str(first.SOPInstanceUID),
                                                    str(second.SOPInstanceUID)]


def test_uids_are_deterministic_and_change_with_the_version() -> None:
    source = read_source("NM")
    outcome = findings(source)
    first, again = build(source, outcome), build(source, outcome)
    newer = build(source, outcome, dataclasses.replace(ALGORITHM, version="1.3.0"))

    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert all(re.fullmatch(r"2\.25\.\d+", str(uid)) for uid in uid_items(first).values())
    assert uid_items(first) == uid_items(again)
    # Tracking UIDs follow the finding across versions; the device observer is the build.
    tracking = [u for k, u in uid_items(first).items() if k.startswith("Tracking")]
    assert tracking == [u for k, u in uid_items(newer).items() if k.startswith("Tracking")]
    assert uid_items(first)["Device Observer UID"] != uid_items(newer)["Device Observer UID"]


def uid_items(ds: Dataset) -> dict[str, str]:
    found: dict[str, str] = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "UIDREF":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                found[f"{name} {len(found)}" if name in found else name] = item.UID
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_analysed_without_findings_reads_back_as_such() -> None:
    require_tool("dciodvfy")
    source = read_source("CT")
    report = build(source, Analysed(()))
    assert dciodvfy_report(report).errors == []
    assert read_measurement_report(through_bytes(report)).outcome == Analysed(())
    assert "CodingSchemeIdentificationSequence" not in report


def test_private_scheme_is_declared_only_when_used() -> None:
    source = read_source("CT")
    with_local = build(source, findings(source))
    schemes = [
        item.CodingSchemeDesignator for item in with_local.CodingSchemeIdentificationSequence
    ]
    assert schemes == [codes.LOCAL_SCHEME]
    standard_only = Analysed(
        (FindingGroup("lungs", codes.NORMAL, codes.LUNG, measurements=(probability(0.1),)),)
    )
    assert "CodingSchemeIdentificationSequence" not in build(source, standard_only)


def test_predecessor_is_named() -> None:
    source = read_source("CT")
    old = Predecessor(derive_uid("old series"), derive_uid("old report"))
    report = build(source, findings(source), predecessors=[old])
    item = report.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == source.StudyInstanceUID
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == old.series_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.sop_instance_uid


def test_explicit_tracking_uid_survives_the_round_trip() -> None:
    source = read_source("CT")
    group = FindingGroup("nodule 1", codes.ABNORMAL, tracking_uid=derive_uid("nodule track"))
    contents = read_measurement_report(through_bytes(build(source, Analysed((group,)))))
    assert contents.outcome == Analysed((group,))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: probability(1.2), "between 0 and 1"),
        (lambda: OperatingPoint("default", 0.5, sensitivity=92.0), "between 0 and 1"),
        (lambda: MeasurementValue(SBR, float("nan"), codes.UCUM_RATIO), "finite"),
        (lambda: MeasurementValue(SBR, 1.0, Code("x", "DCM", "x")), "UCUM"),
        (lambda: MeasurementValue(SBR, 1.0, codes.UCUM_RATIO, laterality=codes.LEFT), "site"),
        (lambda: FindingGroup(" "), "tracking_id"),
        (lambda: NotAnalysed(""), "reason"),
        (lambda: AlgorithmInfo("x", "1", sha256="not-a-hash"), "sha256"),
        (lambda: codes.local_code("A-CODE-VALUE-TOO-LONG", "x"), "16"),
    ],
)
def test_domain_values_reject_nonsense(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_builder_rejects_what_would_misfile_the_report() -> None:
    source = read_source("CT")
    other_study = read_source("MR")

    def attempt(sources: list[Dataset], outcome: Outcome, description: str) -> None:
        build_measurement_report(
            sources,
            outcome,
            ALGORITHM,
            series_instance_uid=derive_uid("s"),
            sop_instance_uid=derive_uid("i"),
            series_description=description,
        )

    with pytest.raises(ValueError, match="AI "):
        attempt([source], Analysed(()), "DaT")
    with pytest.raises(ValueError, match="same study"):
        attempt([source, other_study], Analysed(()), "AI x")
    stray = Analysed((FindingGroup("x", source_sop_instance_uids=(derive_uid("elsewhere"),)),))
    with pytest.raises(ValueError, match="not among the sources"):
        attempt([source], stray, "AI x")
