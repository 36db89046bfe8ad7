"""The tumour_volume pipeline on fresh phantoms: SEG and SR, dciodvfy clean, read back.

The phantom patient (seed 5150) is neither in the training nor in the test set of the
bundled tumour-seg package; two timepoints of it check that the lesion keeps its
Tracking UID across studies while the volume follows the truth.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset

from dicomnode.phantoms.brain_mr import write_brain_mr_growth_study
from dicomnode.pipelines import registry
from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.pipelines.tumour_volume import TRACKING_ID, largest_component, tracking_uid
from dicomnode.results import codes
from dicomnode.results.sr import Analysed, NotAnalysed, read_measurement_report
from dicomnode.results.validate import validate_result
from tests.peers import REPO

MODELS = REPO / "models"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SEED = 5150
VOLUMES = (8.0, 18.0)


@pytest.fixture(scope="module")
def growth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("growth")
    write_brain_mr_growth_study(root, seed=SEED, volumes_cm3=VOLUMES, interval_days=120,
                                tumour_kind="malignant", matrix=128,
                                sequences=("T1C", "T2"))
    truth = json.loads((root / "truth.json").read_text())
    return {"root": root, "truth": truth}


def _series(growth: dict[str, Any], timepoint: int, sequence: str
            ) -> tuple[list[Dataset], dict[str, Any]]:
    study_uid = growth["truth"]["timeline"][timepoint]["study_instance_uid"]
    for entry in growth["truth"]["studies"][study_uid]["series"].values():
        if entry["sequence"] == sequence:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets = [pydicom.dcmread(growth["root"] / item["file"])
                            for item in entry["instances"].values()]
            return datasets, entry
    raise AssertionError(f"no {sequence} series at timepoint {timepoint}")


def _run(datasets: Sequence[Dataset]) -> PipelineResult:
    first = datasets[0]
    work = PipelineInput(list(datasets), [], "series", str(first.StudyInstanceUID),
                         [str(first.SeriesInstanceUID)], route="test-tumour-volume",
                         models_dir=MODELS)
    result = registry.create("tumour_volume").run(work)
    for ds in result.objects:
        validate_result(ds)  # dciodvfy clean, or it raises
    return result


def _by_class(result: PipelineResult, sop_class: str) -> list[Dataset]:
    return [ds for ds in result.objects if ds.SOPClassUID == sop_class]


@pytest.fixture(scope="module")
def results(growth: dict[str, Any]) -> list[tuple[PipelineResult, list[Dataset], dict[str, Any]]]:
    out = []
    for timepoint in range(len(VOLUMES)):
        datasets, entry = _series(growth, timepoint, "T1C")
        out.append((_run(datasets), datasets, entry))
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def test_seg_round_trips_and_matches_the_phantom_mask(
        growth: dict[str, Any],
        results: list[tuple[PipelineResult, list[Dataset], dict[str, Any]]]) -> None:
    for result, datasets, entry in results:
        (seg_ds,) = _by_class(result, SEG_CLASS)
        buffer = io.BytesIO()
        seg_ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        seg = hd.seg.segread(buffer)
        assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert str(seg.SeriesDescription).startswith("AI ")
        assert seg.SegmentationType == "BINARY"
        (segment,) = seg.SegmentSequence
        assert segment.SegmentLabel == "Tumour"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
        assert segment.SegmentAlgorithmName == "tumour-seg"
        assert segment.TrackingUID == tracking_uid(datasets)
        referenced = {str(ref.SeriesInstanceUID)
                      for ref in seg.ReferencedSeriesSequence}
        assert referenced == {str(datasets[0].SeriesInstanceUID)}
        order = sorted(entry["instances"].items(), key=lambda kv: kv[1]["slice_index"])
        uids = [uid for uid, _ in order]
        pixels = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
        predicted = pixels[..., 0] > 0
        labels = sitk.GetArrayFromImage(sitk.ReadImage(
            str(growth["root"] / entry["tumour_mask_file"])))
        truth = np.isin(labels, (1, 3))
        assert predicted.shape == truth.shape
        assert _dice(predicted, truth) >= 0.8


def test_sr_volume_and_tracking_uid_follow_the_patient(
        growth: dict[str, Any],
        results: list[tuple[PipelineResult, list[Dataset], dict[str, Any]]]) -> None:
    uids = set()
    for (result, datasets, _), point in zip(results, growth["truth"]["timeline"], strict=True):
        (sr,) = _by_class(result, SR_CLASS)
        report = read_measurement_report(sr)
        assert isinstance(report.outcome, Analysed)
        (group,) = report.outcome.findings
        assert group.tracking_id == TRACKING_ID
        assert group.tracking_uid is not None
        (volume,) = [m for m in group.measurements if m.concept == codes.VOLUME]
        assert volume.unit == codes.UCUM_CUBIC_CENTIMETER
        true_cm3 = float(point["volume_cm3"])
        assert volume.value == pytest.approx(true_cm3, rel=0.15)
        summary = result.summary
        assert summary["analysed"] is True
        assert summary["volume_cm3"] == pytest.approx(volume.value, abs=1e-3)
        assert summary["study_date"] == point["study_date"] == datasets[0].StudyDate
        assert summary["tracking_uid"] == group.tracking_uid
        patient_id = str(datasets[0].PatientID)
        assert patient_id not in json.dumps(summary)
        assert patient_id not in group.tracking_uid
        uids.add(group.tracking_uid)
    assert len(uids) == 1
    assert results[0][1][0].StudyInstanceUID != results[1][1][0].StudyInstanceUID


def test_tracking_uid_differs_between_patients(
        results: list[tuple[PipelineResult, list[Dataset], dict[str, Any]]]) -> None:
    datasets = results[0][1]
    same, other, issuer = Dataset(), Dataset(), Dataset()
    same.PatientID = other.PatientID = issuer.PatientID = str(datasets[0].PatientID)
    other.PatientID = f"{datasets[0].PatientID}X"
    issuer.IssuerOfPatientID = "ELSEWHERE"
    assert tracking_uid([same]) == tracking_uid(datasets)
    assert tracking_uid([other]) != tracking_uid(datasets)
    assert tracking_uid([issuer]) != tracking_uid(datasets)


def test_a_t2_series_is_not_analysed_and_says_why(growth: dict[str, Any]) -> None:
    datasets, _ = _series(growth, 0, "T2")
    result = _run(datasets)
    assert result.analysed is False
    assert result.summary["analysed"] is False
    (sr,) = result.objects
    report = read_measurement_report(sr)
    assert isinstance(report.outcome, NotAnalysed)
    assert "T1 post-contrast" in report.outcome.reason


def test_largest_component_keeps_one_lesion_across_slices() -> None:
    mask = np.zeros((4, 20, 20), dtype=bool)
    mask[0:3, 2:6, 2:6] = True  # the lesion, over three slices
    mask[3, 15:17, 15:17] = True  # a stray blob
    mask[1, 10, 10] = True  # a stray voxel
    kept = largest_component(mask)
    assert int(kept.sum()) == 48
    assert not kept[3].any() and not kept[1, 10, 10]
    stairs = np.zeros((3, 10, 10), dtype=bool)
    stairs[0, 1:3, 1:3] = True
    stairs[1, 2:5, 2:5] = True
    stairs[2, 4:9, 4:9] = True
    assert int(largest_component(stairs).sum()) == 4 + 9 + 25
    assert not largest_component(np.zeros((2, 5, 5), dtype=bool)).any()
