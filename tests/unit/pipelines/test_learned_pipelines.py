"""The learned pipelines in-process, on phantoms and on inputs they were not built for.

Every result object passes dciodvfy; the SRs are read back to check what the radiologist
is told: the coded finding, the probability, the operating point with the sensitivity
and specificity the card reports for it, and the model's name, version and sha256.
Inputs outside what a model was built for get a "not analysed" SR that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.inference import load_package
from dicomnode.phantoms.brain_mr import write_brain_mr_study
from dicomnode.phantoms.chest_xray import write_chest_xray_study
from dicomnode.phantoms.dat_spect import build_dat_study
from dicomnode.phantoms.head_ct import write_head_ct_study
from dicomnode.pipelines import registry
from dicomnode.pipelines.base import PipelineInput, PipelineResult
from dicomnode.results.sr import Analysed, NotAnalysed, read_measurement_report
from dicomnode.results.validate import validate_result
from tests.peers import PYDICOM_DATA, PYDICOM_FILES, REPO

MODELS = REPO / "models"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _read(paths: Sequence[Path]) -> list[Dataset]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [pydicom.dcmread(p) for p in paths]


def _run(pipeline: str, datasets: Sequence[Dataset], options: dict[str, Any] | None = None,
         related: Sequence[Dataset] = ()) -> PipelineResult:
    first = datasets[0]
    work = PipelineInput(list(datasets), [], "study", str(first.StudyInstanceUID),
                         sorted({str(d.SeriesInstanceUID) for d in datasets}),
                         route=f"test-{pipeline}", options=options or {}, models_dir=MODELS,
                         related_datasets=list(related))
    result = registry.create(pipeline).run(work)
    for ds in result.objects:
        validate_result(ds)  # dciodvfy clean, or it raises
    return result


def _reports(result: PipelineResult) -> dict[str, Any]:
    return {str(ds.SeriesDescription): read_measurement_report(ds)
            for ds in result.objects if ds.SOPClassUID == SR_CLASS}


def _check_provenance(report: Any, package: str) -> None:
    card = load_package(MODELS / package)
    assert report.algorithm.name == card.card.name
    assert report.algorithm.version == card.card.version
    assert report.algorithm.sha256 == card.sha256
    points = {p.name.replace(":", " "): p for p in card.card.operating_points}
    assert isinstance(report.outcome, Analysed) and report.outcome.findings
    for group in report.outcome.findings:
        assert group.operating_point is not None
        point = points[group.operating_point.name]
        assert group.operating_point.threshold == pytest.approx(point.threshold, abs=1e-6)
        assert group.operating_point.sensitivity == pytest.approx(point.sensitivity, abs=1e-6)
        assert group.operating_point.specificity == pytest.approx(point.specificity, abs=1e-6)
        assert 0.0 <= group.measurements[0].value <= 100.0  # probability, in percent
        assert group.source_sop_instance_uids


@pytest.fixture(scope="module")
def brain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Dataset]]:
    root = tmp_path_factory.mktemp("brain")
    files = write_brain_mr_study(root, n=1, seed=91, class_weights=(0, 0, 1), matrix=128,
                                 sequences=("T1C", "T2"), with_ct=True)
    out: dict[str, list[Dataset]] = {}
    for ds in _read(files):
        key = "CT" if ds.Modality == "CT" else str(ds.SeriesDescription)
        out.setdefault(key, []).append(ds)
    return out


def test_brain_mr_study_reports_its_t1c_series_and_skips_the_t2(
        brain: dict[str, list[Dataset]]) -> None:
    result = _run("brain_tumour", brain["T1 post contrast"] + brain["T2 TSE axial"],
                  {"fusion": False})
    reports = _reports(result)
    assert set(reports) == {"AI brain tumour report MR"}
    _check_provenance(reports["AI brain tumour report MR"], "brain-tumour-mr")
    assert [s["analysed"] for s in result.summary["series"]].count(True) == 1
    assert any(str(ds.SeriesDescription) == "AI brain tumour heatmap MR"
               for ds in result.objects)


def test_brain_ct_alone_gives_the_ct_report(brain: dict[str, list[Dataset]]) -> None:
    result = _run("brain_tumour", brain["CT"], {"fusion": False})
    reports = _reports(result)
    assert set(reports) == {"AI brain tumour report CT"}
    _check_provenance(reports["AI brain tumour report CT"], "brain-tumour-ct")


def test_fusion_runs_beside_both_single_modality_reports_with_a_related_ct(
        brain: dict[str, list[Dataset]]) -> None:
    result = _run("brain_tumour", brain["T1 post contrast"], related=brain["CT"])
    reports = _reports(result)
    # the MR's own report, and the fusion's beside it; the prior CT gets no report here
    assert set(reports) == {"AI brain tumour report MR", "AI brain tumour report CT+MR fusion"}
    fusion = reports["AI brain tumour report CT+MR fusion"]
    _check_provenance(fusion, "brain-tumour-fusion")
    texts = " ".join(n.text for n in fusion.notes)
    assert "RESEARCH OUTPUT" in texts and "another study" in texts
    assert result.summary["fusion"]["ct_current"] is False


def test_a_t2_only_brain_mr_is_not_analysed_and_says_why(
        brain: dict[str, list[Dataset]]) -> None:
    result = _run("brain_tumour", brain["T2 TSE axial"])
    report = _reports(result)["AI brain tumour report MR"]
    assert isinstance(report.outcome, NotAnalysed)
    assert "T1 post-contrast" in report.outcome.reason
    assert not result.analysed


def test_a_sagittal_or_thin_head_ct_is_not_analysed(brain: dict[str, list[Dataset]]) -> None:
    few = brain["CT"][:5]
    result = _run("brain_tumour", few)
    report = _reports(result)["AI brain tumour report CT"]
    assert isinstance(report.outcome, NotAnalysed) and "slices" in report.outcome.reason


def test_dat_classifier_is_reported_beside_the_ratios_never_blended() -> None:
    datasets, _ = build_dat_study(92, 0, condition="pd")
    result = _run("dat_spect", datasets, {"classifier": "dat-classifier"})
    reports = _reports(result)
    assert set(reports) == {"AI DaT-SPECT binding ratios", "AI DaT-SPECT classifier"}
    classifier = reports["AI DaT-SPECT classifier"]
    _check_provenance(classifier, "dat-classifier")
    agreement = [n.text for n in classifier.notes if "AGREEMENT" in n.text]
    assert len(agreement) == 1
    assert result.summary["classifier"]["agrees"] == ("DISAGREEMENT" not in agreement[0])
    # the binding-ratio report carries no classifier probability: nothing was blended
    ratios = reports["AI DaT-SPECT binding ratios"]
    assert ratios.algorithm.sha256 is None


def test_the_nm_bone_scan_is_not_analysed_by_the_dat_pipeline() -> None:
    datasets = _read([PYDICOM_DATA / "JPEG2000_UNC.dcm"])
    result = _run("dat_spect", datasets, {"classifier": "dat-classifier"})
    report = _reports(result)["AI DaT-SPECT binding ratios"]
    assert isinstance(report.outcome, NotAnalysed) and not result.analysed


def test_pneumonia_on_phantoms_and_a_lateral_view(tmp_path: Path) -> None:
    datasets = _read(write_chest_xray_study(tmp_path, n=1, seed=93, size=512))
    result = _run("pneumonia", datasets, {"model": "pneumonia-cxr",
                                          "operating_point": "screening"})
    report = _reports(result)["AI pneumonia report"]
    _check_provenance(report, "pneumonia-cxr")
    assert {g.operating_point.name for g in report.outcome.findings} == {"screening"}
    heatmaps = [ds for ds in result.objects if ds.SOPClassUID != SR_CLASS]
    assert len(heatmaps) == len(datasets) == 1
    for ds in datasets:
        ds.ViewPosition = "LL"
    report = _reports(_run("pneumonia", datasets))["AI pneumonia report"]
    assert isinstance(report.outcome, NotAnalysed) and "not frontal" in report.outcome.reason


def test_metastasis_names_the_driving_slices_and_refuses_a_non_head_ct(
        tmp_path: Path) -> None:
    datasets = _read(write_head_ct_study(tmp_path, n=1, seed=94, metastasis_fraction=1.0,
                                         matrix=128, n_slices=20))
    result = _run("metastasis", datasets, {"model": "metastasis-ct"})
    report = _reports(result)["AI brain metastasis report"]
    _check_provenance(report, "metastasis-ct")
    assert len(report.outcome.findings[0].source_sop_instance_uids) == 3
    assert len([ds for ds in result.objects if ds.SOPClassUID != SR_CLASS]) == 3
    small = _read([PYDICOM_FILES / "CT_small.dcm"])
    report = _reports(_run("metastasis", small))["AI brain metastasis report"]
    assert isinstance(report.outcome, NotAnalysed) and "slices" in report.outcome.reason


def test_without_the_fusion_package_the_single_modality_reports_still_go_out(
        brain: dict[str, list[Dataset]]) -> None:
    result = _run("brain_tumour", brain["T1 post contrast"],
                  {"fusion_model": "no-such-fusion-package"}, related=brain["CT"])
    assert set(_reports(result)) == {"AI brain tumour report MR"}
    assert "no-such-fusion-package" in result.summary["fusion"]["skipped"]
