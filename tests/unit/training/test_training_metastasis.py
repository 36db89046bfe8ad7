"""The metastasis task's parts: phantom series equal to the writer's files, per-slice
samples split by patient, MIL pooling, the stride-8 slice model and its CAM, calibration
folded into the head, and the heat-map hit test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

torch = pytest.importorskip("torch")

from dicomnode.imaging import PreprocessSpec, apply_spec  # noqa: E402
from dicomnode.phantoms.head_ct import write_head_ct_study  # noqa: E402
from dicomnode.training.calibration import (  # noqa: E402
    CalibrationError,
    calibrate_model,
    fit_calibration,
    fold_into_head,
)
from dicomnode.training.commands import (  # noqa: E402
    TASKS,
    TaskOptions,
    TrainingRunError,
    _named_points,
    load_task_modules,
    slice_classifier,
)
from dicomnode.training.datasets import SampleSet  # noqa: E402
from dicomnode.training.gradcam import WithCam  # noqa: E402
from dicomnode.training.heatmap_eval import (  # noqa: E402
    HeatmapCase,
    HeatmapError,
    dilate,
    mask_at_input,
    peak_hit,
)
from dicomnode.training.tasks_metastasis import (  # noqa: E402
    CLASS_NAMES,
    MIMIC_REPEAT,
    MIN_LESION_AREA_MM2,
    TRAIN_METASTASIS_FRACTION,
    HeadCtPhantomReader,
    head_ct_heatmap_cases,
    head_ct_labels,
    head_ct_phantom_series,
    head_ct_phantoms,
    metastasis_spec,
    pool_by_patient,
)

MATRIX = 48


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_the_task_is_registered_with_patient_pooling_and_heatmaps() -> None:
    load_task_modules()
    task = TASKS["metastasis"]
    assert task.implemented and task.aggregate is pool_by_patient
    assert task.package_metrics is not None and task.default_package_name == "metastasis-ct"
    assert task.class_names == CLASS_NAMES == ("normal", "metastasis")
    assert "not for clinical use" in task.card.intended_use


def test_spec_is_hounsfield_brain_window_resize_zscore() -> None:
    spec = metastasis_spec(TaskOptions(size=96))
    assert [s.name for s in spec.steps] == ["hounsfield", "window", "resize", "zscore"]
    window = spec.steps[1].to_dict()
    assert (window["center"], window["width"]) == (40.0, 80.0)
    assert spec.steps[2].to_dict()["size"] == [96, 96]


def test_phantom_series_pixels_match_write_head_ct_study(tmp_path: Path) -> None:
    files = write_head_ct_study(tmp_path, n=2, seed=9, matrix=MATRIX)
    by_patient: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        by_patient.setdefault(ds.PatientID, []).append(ds)
    for index in range(2):
        series = head_ct_phantom_series(9, index, 2, matrix=MATRIX)
        stored = sorted(by_patient[series.patient_id], key=lambda d: int(d.InstanceNumber))
        assert len(stored) == len(series.datasets) == len(series.truth.slice_labels)
        assert stored[0].StudyInstanceUID == series.datasets[0].StudyInstanceUID
        for ours, theirs in zip(series.datasets, stored, strict=True):
            assert ours.SOPInstanceUID == theirs.SOPInstanceUID
            assert np.array_equal(ours.pixel_array, theirs.pixel_array)


def test_slice_samples_are_labelled_from_masks_and_split_by_patient() -> None:
    spec = metastasis_spec(TaskOptions(size=32))
    splits = head_ct_phantoms(spec, n_train=2, n_val=2, n_test=2, seed=3, val_seed=4,
                              matrix=MATRIX)
    assert splits.synthetic and "not for clinical use" in splits.description
    reader = splits.train.reader
    assert isinstance(reader, HeadCtPhantomReader)
    patients = [set(part.patients) for part in splits.parts().values()]
    assert all(len(p) == 2 for p in patients)
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2])
    for index in range(2):
        series = reader.series(4, index)  # validation: every slice once, in order
        labels = [s.label for s in splits.val.samples if s.patient_id == series.patient_id]
        assert labels == list(series.slice_labels)
    for index in range(2):
        series = reader.series(3, index)  # training: visible positives once, mimics repeated
        used = [s.index for s in splits.train.samples if s.patient_id == series.patient_id]
        areas = series.lesion_areas_mm2
        for k, (label, mimic) in enumerate(zip(series.slice_labels, series.mimic_slices,
                                               strict=True)):
            assert (areas[k] > 0) == bool(label)
            if label:
                assert used.count(k) == int(areas[k] >= MIN_LESION_AREA_MM2)
            elif mimic:
                assert used.count(k) == MIMIC_REPEAT
            else:
                assert used.count(k) <= 1
    x, y = splits.train.arrays()
    assert x.shape[1:] == (1, 32, 32) and x.dtype == np.float32
    assert set(np.unique(y)) <= {0, 1} and y.max() == 1  # one patient of two is positive
    raw = splits.train.raw(0)
    assert np.array_equal(apply_spec(spec, raw)[0], x[0])


def test_patient_pooling_takes_the_maximum_slice() -> None:
    spec = PreprocessSpec.from_dict([{"name": "zscore"}])
    from dicomnode.training.datasets import Sample

    samples = [Sample(f"k{i}", pid, label) for i, (pid, label) in
               enumerate([("B", 0), ("A", 0), ("B", 1), ("A", 0), ("B", 0)])]
    part = SampleSet("test", samples, spec, CLASS_NAMES, HeadCtPhantomReader(MATRIX))
    labels, scores = pool_by_patient(part, np.array([0.1, 0.4, 0.9, 0.2, 0.3]))
    assert labels.tolist() == [0, 1] and scores.tolist() == [0.4, 0.9]  # A, B sorted
    with pytest.raises(Exception, match="one score per slice"):
        pool_by_patient(part, np.zeros(3))


def test_output_stride_keeps_parameter_shapes_and_refines_the_grid() -> None:
    shapes = {k: v.shape for k, v in slice_classifier(TaskOptions(width=4)).state_dict().items()}
    x = torch.randn(1, 1, 64, 64)
    for stride in (32, 16, 8):
        model = slice_classifier(TaskOptions(width=4, output_stride=stride)).eval()
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        with torch.no_grad():
            assert model.features(x).shape[-1] == 64 // stride  # type: ignore[operator]
    with pytest.raises(TrainingRunError, match="output-stride"):
        slice_classifier(TaskOptions(output_stride=4))


def test_slice_model_has_output_stride_8_and_a_full_size_cam() -> None:
    model = slice_classifier(TaskOptions(width=4, output_stride=8)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert model.features(x).shape[-2:] == (8, 8)  # type: ignore[operator]
        logits, cam = WithCam(model, "all")(x)  # type: ignore[arg-type]
    assert logits.shape == (2, 1) and cam.shape == (2, 1, 64, 64)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0 + 1e-6


def test_temperature_is_recovered_from_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    # labels drawn from p(y | z) = sigmoid(z); the model reports 4 z (temperature 4)
    z = rng.normal(size=4000) * 3
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(np.int64)
    fit = fit_calibration(4.0 * z, y, "temperature")
    assert fit.temperature == pytest.approx(4.0, rel=0.1)
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    platt = fit_calibration(4.0 * z + 2.0, y, "platt")
    assert platt.scale == pytest.approx(0.25, rel=0.1)
    assert platt.shift == pytest.approx(-0.5, abs=0.15)


def test_calibration_refuses_one_class_and_reversed_models() -> None:
    with pytest.raises(CalibrationError, match="both classes"):
        fit_calibration([1.0, 2.0], [1, 1])
    with pytest.raises(CalibrationError, match="reversed"):
        fit_calibration([3.0, 2.0, -1.0, -2.0], [0, 0, 1, 1])
    separable = fit_calibration([-5.0, -4.0, 4.0, 5.0], [0, 0, 1, 1])
    assert np.isfinite(separable.scale)  # smoothed targets keep the scale finite


def test_folding_scales_logits_and_leaves_the_cam_unchanged() -> None:
    torch.manual_seed(0)
    model = slice_classifier(TaskOptions(width=4, output_stride=8)).eval()
    x = torch.randn(6, 1, 32, 32)
    with torch.no_grad():
        before_logits, before_cam = WithCam(model, "all")(x)  # type: ignore[arg-type]
    fit = fit_calibration(np.array([-1.0, 1.0, -2.0, 2.0]), np.array([0, 1, 0, 1]), "platt")
    fold_into_head(model, fit)
    with torch.no_grad():
        after_logits, after_cam = WithCam(model, "all")(x)  # type: ignore[arg-type]
    expected = before_logits.double() * fit.scale + fit.shift
    assert torch.allclose(after_logits.double(), expected, atol=1e-4)
    assert torch.allclose(after_cam, before_cam, atol=1e-5)


def test_calibrate_model_fits_on_pooled_logits() -> None:
    torch.manual_seed(1)
    model = slice_classifier(TaskOptions(width=4, output_stride=8)).eval()
    x = torch.randn(8, 1, 32, 32).numpy()
    with torch.no_grad():
        raw = model(torch.from_numpy(x))[:, 0].double().numpy()
    order = np.argsort(raw)
    labels = np.zeros(8, dtype=np.int64)
    labels[order[4:]] = 1  # label the higher-scoring half positive

    def pool(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return labels, z

    fit = calibrate_model(model, x, pool, method="temperature")
    assert fit.n == 8 and fit.scale > 0


def test_point_names_rename_the_two_validation_points() -> None:
    points = {"f1-optimal": 0.4, "sensitivity-0.95": 0.2}
    assert _named_points(points, "") == points
    assert _named_points(points, "balanced,screening") == {"balanced": 0.4, "screening": 0.2}
    with pytest.raises(Exception, match="two different names"):
        _named_points(points, "same,same")


def test_peak_hit_with_tolerance() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[10:12, 10:12] = True
    cam = np.zeros((20, 20))
    cam[10, 14] = 1.0
    assert peak_hit(cam, mask, 0)[0] is False
    hit, peak, distance = peak_hit(cam, mask, 3)
    assert hit and peak == (10, 14) and distance == pytest.approx(3.0)
    assert dilate(mask, 0).sum() == 4 and dilate(mask, 2).sum() > 4
    assert peak_hit(cam, np.zeros_like(mask), 5)[0] is False
    with pytest.raises(HeatmapError):
        peak_hit(cam, mask[:10], 1)
    with pytest.raises(HeatmapError):
        HeatmapCase("x", (), ())


def test_masks_follow_the_spec_geometry() -> None:
    spec = metastasis_spec(TaskOptions(size=16))
    mask = np.zeros((48, 48), dtype=bool)
    mask[0:12, 0:12] = True
    moved = mask_at_input(spec, mask)
    assert moved.shape == (16, 16) and moved[:4, :4].all() and not moved[5:, 5:].any()


def test_heatmap_cases_are_the_positive_patients_with_slice_masks() -> None:
    cases = head_ct_heatmap_cases(11, 2, matrix=MATRIX)
    assert len(cases) == 1
    case = cases[0]
    assert len(case.images) == len(case.masks)
    assert any(m.any() for m in case.masks)
    assert all(m.shape == (MATRIX, MATRIX) for m in case.masks)


def test_training_leaves_out_positive_slices_that_cut_only_a_lesion_cap() -> None:
    reader = HeadCtPhantomReader(MATRIX)
    every = reader.samples(3, 2, negative_fraction=0.5)
    assert any(s.label for s in every)
    areas = {s.key: reader.series(3, int(s.key.split(":")[2])).lesion_areas_mm2[s.index or 0]
             for s in every if s.label}
    cut = min(areas.values()) + 1e-6
    kept = reader.samples(3, 2, negative_fraction=0.5, min_lesion_area_mm2=cut)
    assert {s.key for s in kept if s.label} == {k for k, a in areas.items() if a >= cut}
    assert [s.key for s in kept if not s.label] == [s.key for s in every if not s.label]


def test_training_patients_are_drawn_mostly_with_metastases() -> None:
    assert head_ct_labels(5, 10, TRAIN_METASTASIS_FRACTION).count("metastasis") == 8
    assert head_ct_labels(5, 10).count("metastasis") == 5  # validation and test: balanced
    reader = HeadCtPhantomReader(MATRIX)
    samples = reader.samples(5, 4, negative_fraction=0.2, metastasis_fraction=0.75)
    assert len({s.patient_id for s in samples if s.label}) == 3
    with pytest.raises(TrainingRunError, match="another set size"):
        reader.samples(5, 4, metastasis_fraction=0.5)  # the seed's patients are drawn
    with pytest.raises(TrainingRunError, match="metastasis_fraction"):
        HeadCtPhantomReader(MATRIX).samples(5, 4, metastasis_fraction=1.0)


def test_calibration_patients_are_a_fourth_part_of_their_own_seed() -> None:
    spec = metastasis_spec(TaskOptions(size=16))
    splits = head_ct_phantoms(spec, n_train=2, n_val=2, n_test=2, matrix=MATRIX,
                              n_calibration=3, calibration_seed=7)
    assert splits.calibration is not None
    assert set(splits.parts()) == {"train", "val", "test", "calibration"}
    assert len({s.patient_id for s in splits.calibration.samples}) == 3
    assert splits.provenance["seeds"]["calibration"] == 7
    assert "calibration seed 7 (n=3)" in splits.description
    with pytest.raises(Exception, match="different seeds"):
        head_ct_phantoms(spec, n_train=2, n_val=2, n_test=2, matrix=MATRIX, n_calibration=2,
                         calibration_seed=1000)


# Small enough for a test, large enough that the slice model learns (at 32 px from 48-64 px
# phantoms most lesions are under a pixel and the pooled logits rank at random, which
# calibration rightly refuses).
TINY = ["--data", "phantom", "--seed", "0", "--n-train", "16", "--n-val", "8", "--n-test", "6",
        "--size", "64", "--phantom-size", "128", "--depth", "10", "--width", "4",
        "--output-stride", "8", "--epochs", "4", "--lr", "0.003", "--batch-size", "16",
        "--n-boot", "50", "--threads", "1", "--no-progress", "--calibration", "platt"]


def test_train_with_calibration_patients_then_recalibrate(tmp_path: Path) -> None:
    import json

    from dicomnode.cli import main
    from dicomnode.inference.package import load_package

    assert main(["train", "metastasis", "--out", str(tmp_path), *TINY,
                 "--n-calibration", "8"]) == 0
    directory = tmp_path / "metastasis-ct"
    card = load_package(directory).card
    training = card.provenance["training"]
    assert training["thresholds_from"] == "calibration"
    assert training["calibration"]["fitted_on_cases"] == 8  # patients: fitted on pooled logits
    assert card.training_data.cases["calibration"] > 8  # slices
    for point in card.operating_points:
        assert "threshold chosen on calibration set (n=8 patients" in point.dataset
    first = card.provenance["checkpoint_sha256"]

    def auc(metrics: Any) -> Any:
        return next(m for m in metrics if m.name == "auc")

    # The same calibration patients again: the weights already carry their Platt map, and
    # Platt maps compose, so the refit is the identity and nothing measured moves.
    assert main(["recalibrate", str(directory), "--n-calibration", "8",
                 "--version", "0.0.2"]) == 0
    again = load_package(directory).card  # sha256, signature and complete card verified
    assert again.version == "0.0.2"
    record = again.provenance["training"]
    assert record["calibration"]["fitted_on_cases"] == 8
    assert record["calibration"]["scale"] == pytest.approx(1.0, abs=1e-4)
    assert record["calibration"]["shift"] == pytest.approx(0.0, abs=1e-4)
    assert record["data_provenance"]["seeds"]["calibration"] == 2
    assert record["recalibrated"]["from_checkpoint_sha256"] == first
    assert record["recalibrated"]["earlier_calibration"]["scale"] == (
        training["calibration"]["scale"])
    assert record["result"] == training["result"]  # the training itself is unchanged
    assert auc(again.metrics).value == auc(card.metrics).value
    assert [p.threshold for p in again.operating_points] == pytest.approx(
        [p.threshold for p in card.operating_points], abs=1e-4)
    assert again.provenance["checkpoint_sha256"] != first

    assert main(["recalibrate", str(directory), "--n-calibration", "8", "--n-test", "8"]) == 0
    assert "n=8 patients" in auc(load_package(directory).card.metrics).dataset
    served = json.loads((directory / "evaluation" / "report.json").read_text())
    assert served["n"] == 8 and served["extra"]["version"] == "0.0.2"

    assert main(["recalibrate", str(directory), "--n-calibration", "4",
                 "--calibration-seed", "1000"]) == 1  # the test patients' seed


def test_calibration_patients_need_a_task_whose_data_have_them(tmp_path: Path) -> None:
    from dicomnode.cli import main

    argv = ["train", "pneumonia", "--data", "phantom", "--n-train", "8", "--size", "32",
            "--epochs", "1", "--calibration", "temperature", "--n-calibration", "8",
            "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert not (tmp_path / "pneumonia-cxr").exists()
