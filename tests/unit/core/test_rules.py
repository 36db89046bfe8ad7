from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import DEFAULT_CONFIG, load_settings
from dicomnode.ingest.ledger import SeriesRow
from dicomnode.routing.router import Router, routing_keywords
from dicomnode.routing.rules import RuleError, evaluate, header_values, parse_conditions
from tests.peers import PYDICOM_DATA, PYDICOM_FILES

ATTRS = {"Modality": "NM", "ImageType": ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"],
         "SeriesDescription": "DaTSCAN SPECT Brain", "NumberOfFrames": 64,
         "SOPClassUID": "1.2.840.10008.5.1.4.1.1.20", "calling_ae_title": "PACS"}


@pytest.mark.parametrize(("match", "expected"), [
    ({"Modality": "NM"}, True),
    ({"Modality": "CT"}, False),
    ({"Modality": ["CT", "NM"]}, True),
    ({"SeriesDescription": {"regex": "(?i)datscan"}}, True),
    ({"SeriesDescription": {"regex": "^Brain"}}, False),
    ({"NumberOfFrames": {"min": 32, "max": 128}}, True),
    ({"NumberOfFrames": {"min": 65}}, False),
    ({"NumberOfFrames": 64}, True),
    ({"PatientAge": {"present": False}}, True),
    ({"Modality": {"present": True}}, True),
    ({"ImageType": {"contains": "RECON TOMO"}}, True),
    ({"ImageType": {"contains": ["WHOLE BODY"]}}, False),
    ({"ImageType": "ORIGINAL\\PRIMARY\\RECON TOMO\\EMISSION"}, True),
    ({"SOPClassUID": "Nuclear Medicine Image Storage"}, True),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.20"}, True),
    ({"SOPClassUID": "CT Image Storage"}, False),
    ({"calling_ae_title": "PACS"}, True),
    ({"calling_ae_title": {"not": ["PACS", "OTHER"]}}, False),
    ({"Modality": "NM", "NumberOfFrames": {"max": 10}}, False),
])
def test_condition_kinds(match: dict[str, object], expected: bool) -> None:
    result = evaluate(parse_conditions(match), ATTRS)
    assert result.matched is expected
    assert len(result.reasons) == len(match)


def test_reasons_say_which_condition_failed() -> None:
    result = evaluate(parse_conditions({"Modality": "NM", "NumberOfFrames": {"max": 10}}), ATTRS)
    assert result.reasons[0].startswith("ok:")
    assert result.reasons[1].startswith("no:") and "NumberOfFrames" in result.reasons[1]


def test_bad_rules_are_refused_with_every_problem() -> None:
    with pytest.raises(RuleError) as info:
        parse_conditions({"Modalty": "NM", "Rows": {"between": [1, 2]},
                          "SeriesDescription": {"regex": "("}})
    assert len(info.value.problems) == 3


def _series_from(path: Path, keywords: tuple[str, ...]) -> SeriesRow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SeriesRow(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), ds.get("Modality"),
                     "ORTHANC", header_values(ds, keywords), 1, None, None, 0.0, "open", 0)


def test_default_routes_take_the_real_studies_they_were_written_for() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    router = Router(settings.routes)
    keywords = routing_keywords(settings.routes)
    expected = {PYDICOM_DATA / "RG1_UNCI.dcm": "pneumonia-cxr",    # CR chest PA, MONOCHROME1
                PYDICOM_DATA / "RG1_J2KR.dcm": "pneumonia-cxr"}     # the same, JPEG 2000
    for path, route in expected.items():
        _, jobs = router.route_series(_series_from(path, keywords))
        assert [j.route for j in jobs] == [route], path.name
    for path in (PYDICOM_DATA / "RG3_UNCI.dcm",):  # CR of an extremity
        _, jobs = router.route_series(_series_from(path, keywords))
        assert jobs == [], path.name


def test_default_dat_route_rejects_real_non_dat_studies() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    router = Router(settings.routes)
    keywords = routing_keywords(settings.routes)
    for path in [PYDICOM_DATA / "JPEG2000_UNC.dcm",  # the NM whole-body bone scan
                 PYDICOM_FILES / "JPEG-lossy.dcm", PYDICOM_FILES / "CT_small.dcm",
                 PYDICOM_FILES / "MR_small.dcm", PYDICOM_DATA / "RG1_UNCI.dcm"]:
        decisions, jobs = router.route_series(_series_from(path, keywords))
        assert "dat-spect" not in [j.route for j in jobs], path.name
        dat = next(d for d in decisions if d.route == "dat-spect")
        assert not dat.matched and any(r.startswith("no:") for r in dat.reasons)
