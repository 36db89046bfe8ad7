"""dciodvfy's verdicts, its output format, and clear errors when a tool is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicomnode.results.common import AlgorithmInfo
from dicomnode.results.sr import Analysed, build_measurement_report
from dicomnode.results.uids import derive_uid
from dicomnode.results.validate import (
    ResultToolMissingError,
    ResultValidationError,
    dciodvfy_errors,
    parse_dciodvfy_output,
    tool_path,
    validate_result,
)
from tests.peers import PYDICOM_FILES, require_tool

SAMPLE = "\n".join(
    [
        "Comprehensive3DSR",
        "Warning - </PatientWeight(0010,1030)[1]> - Value is zero",
        "Error - </StudyInstanceUID(0020,000d)> - Missing attribute for Type 1 Required"
        " - Module=<GeneralStudy>",
        "Warning - </PatientName(0010,0010)> - Value dubious for this VR [PN] - <DOE>"
        " - Retired Person Name form",
        "(0x6167,0x6272)  ?  - Warning - Private tag without owner",
        "(0x6167,0x6272)  ?  - Error - Bad Value Length - not a multiple of 2",
        "Error - Missing attribute Type 1 Required",
        "          Element=<InstanceNumber> Module=<SRDocumentGeneral>",
        "Abort - File open for read failed",
    ]
)


def report() -> pydicom.Dataset:
    source = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    return build_measurement_report(
        [source],
        Analysed(()),
        AlgorithmInfo("rule", "1"),
        series_instance_uid=derive_uid("s"),
        sop_instance_uid=derive_uid("i"),
        series_description="AI test",
    )


def test_output_is_split_into_errors_and_warnings() -> None:
    errors, warnings = parse_dciodvfy_output(SAMPLE)
    assert errors == [
        "Error - </StudyInstanceUID(0020,000d)> - Missing attribute for Type 1 Required"
        " - Module=<GeneralStudy>",
        "(0x6167,0x6272)  ?  - Error - Bad Value Length - not a multiple of 2",
        "Error - Missing attribute Type 1 Required Element=<InstanceNumber>"
        " Module=<SRDocumentGeneral>",
        "Abort - File open for read failed",
    ]
    assert len(warnings) == 3
    assert all("Error" not in w for w in warnings)


def test_identifying_values_never_reach_the_messages() -> None:
    _, warnings = parse_dciodvfy_output(SAMPLE)
    assert not any("DOE" in w for w in warnings)
    assert "</PatientName(0010,0010)>" in warnings[1]


def test_valid_object_passes() -> None:
    require_tool("dciodvfy")
    ds = report()
    assert dciodvfy_errors(ds) == []
    validate_result(ds)


def test_broken_object_fails_with_the_errors_listed() -> None:
    require_tool("dciodvfy")
    ds = report()
    del ds.StudyInstanceUID
    ds.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning = None
    errors = dciodvfy_errors(ds)
    assert any("StudyInstanceUID" in e for e in errors)
    assert any("CodeMeaning" in e for e in errors)
    with pytest.raises(ResultValidationError) as caught:
        validate_result(ds)
    assert caught.value.errors == errors
    assert "Comprehensive 3D SR" in str(caught.value)


def test_missing_tool_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ResultToolMissingError, match="no-such-tool is not installed"):
        tool_path("no-such-tool")
    monkeypatch.setattr("dicomnode.results.validate.shutil.which", lambda name: None)
    monkeypatch.setattr("dicomnode.results.validate.Path", lambda *_: Path("/nonexistent"))
    with pytest.raises(ResultToolMissingError, match="dicom3tools"):
        dciodvfy_errors(report())


def test_importing_needs_none_of_the_tools() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    completed = subprocess.run(
        [sys.executable, "-c", "import dicomnode.results.validate, dicomnode.results.sr"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode()
