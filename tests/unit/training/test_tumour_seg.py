"""The tumour-seg U-Net (shapes, ONNX export) and the BraTS-layout NIfTI reader."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch

from dicomnode.inference import load_package
from dicomnode.inference.package import TrainingData
from dicomnode.inference.runtime import RuntimeSettings, open_session
from dicomnode.training.commands import TASKS, TaskOptions, TrainingRunError, load_task_modules
from dicomnode.training.export import OutputDescription, write_model_package
from dicomnode.training.tasks_segmentation import (
    FINAL_LR_FRACTION,
    UNet2d,
    array_spec,
    brats_cases,
    cosine_lr,
    dice,
    read_brats_case,
    seg_spec,
    segment_volume,
    training_slices,
)


@pytest.mark.parametrize(("batch", "size"), [(1, 64), (3, 96)])
def test_unet_keeps_the_input_grid_and_gives_one_logit(batch: int, size: int) -> None:
    torch.manual_seed(0)
    model = UNet2d(1, 8, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 1, size, size))
    assert out.shape == (batch, 1, size, size)
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_task_is_registered_and_specs_match() -> None:
    load_task_modules()
    task = TASKS["tumour-seg"]
    assert task.implemented and task.trainer is not None
    options = TaskOptions(size=64)
    steps = [s.to_dict()["name"] for s in seg_spec(options).steps]
    assert steps == ["modality_lut", "robust_minmax", "resize", "zscore"]
    assert [s.to_dict()["name"] for s in array_spec(options).steps] == steps[1:]
    assert array_spec(options).input_kind == "arrays"


def test_unet_exports_to_onnx_and_agrees_with_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet2d(1, 8, 3).eval()
    spec = seg_spec(TaskOptions(size=64))
    written = write_model_package(
        model, {"image": torch.randn(2, 1, 64, 64)}, tmp_path, name="tumour-seg-test",
        version="0.0.1", task="tumour-seg", modality=("MR",),
        outputs=[OutputDescription("logits", "logits", "per-pixel tumour logit",
                                   classes=("tumour",), activation="sigmoid")],
        preprocessing=[s.to_dict() for s in spec.steps], operating_points=[],
        training_data=TrainingData("untrained, for the test"), metrics=[],
        intended_use="test only", opset=18)
    package = load_package(tmp_path / "tumour-seg-test")
    assert package.card.outputs[0].shape[1:] == (1, 64, 64)
    assert written.agreement.passed
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64)).astype(np.float32)
    session = open_session(package, RuntimeSettings(providers=("cpu",), intra_op_threads=1))
    served = session.run({"image": x}).outputs["logits"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-4)


def _write_case(root: Path, case: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    folder = root / case
    folder.mkdir(parents=True)
    image = rng.normal(100.0, 10.0, (6, 24, 32)).astype(np.float32)
    labels = np.zeros((6, 24, 32), dtype=np.uint8)
    labels[2:4, 8:16, 10:20] = 2  # oedema
    labels[2:4, 10:14, 12:18] = 4  # enhancing
    labels[3, 11:13, 14:16] = 1  # necrotic
    image[labels > 0] += 80.0
    for array, suffix in ((image, "t1ce"), (labels, "seg")):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.5, 2.0))
        sitk.WriteImage(itk, str(folder / f"{case}_{suffix}.nii.gz"))
    return labels


def test_brats_reader_takes_the_tumour_core_and_the_voxel_size(tmp_path: Path) -> None:
    labels = {case: _write_case(tmp_path, case, seed)
              for seed, case in enumerate(("BraTS_0001", "BraTS_0002"))}
    volume, mask, voxel = read_brats_case(tmp_path / "BraTS_0001")
    assert volume.shape == mask.shape == (6, 24, 32)
    np.testing.assert_array_equal(mask, np.isin(labels["BraTS_0001"], (1, 4)))
    assert voxel == pytest.approx(3.0)
    cases = brats_cases(tmp_path, array_spec(TaskOptions(size=32)))
    assert [c.case_id for c in cases] == ["BraTS_0001", "BraTS_0002"]
    for case in cases:
        assert case.images.shape == (6, 1, 32, 32)
        assert case.images.dtype == np.float32
        assert case.volume_cm3 == pytest.approx(2 * 4 * 6 * 3.0 / 1000.0)
        assert case.label == "tumour"
    x, y = training_slices(cases, 32, seed=0)
    assert x.shape[1:] == (1, 32, 32) and y.shape == (x.shape[0], 1, 32, 32)
    assert x.shape[0] >= 4  # every tumour slice of both cases
    assert y.sum() > 0


def test_brats_reader_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "BraTS_0003").mkdir()
    with pytest.raises(TrainingRunError, match="t1ce"):
        read_brats_case(tmp_path / "BraTS_0003")
    with pytest.raises(TrainingRunError, match="source step"):
        brats_cases(tmp_path, seg_spec(TaskOptions(size=32)))


def test_dice_and_resampling_back_to_the_source_grid() -> None:
    truth = np.zeros((2, 40, 40), dtype=bool)
    truth[:, 10:30, 10:30] = True
    assert dice(truth, truth) == 1.0
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    small = np.zeros((2, 1, 20, 20), dtype=np.float32)
    small[:, 0, 5:15, 5:15] = 1.0
    back = segment_volume(small, 40, 40)
    assert back.shape == (2, 40, 40)
    assert dice(back, truth) > 0.9


def test_the_learning_rate_falls_on_a_cosine_to_its_floor() -> None:
    rates = [cosine_lr(0.002, epoch, 40) for epoch in range(40)]
    assert rates[0] == pytest.approx(0.002)
    assert rates[-1] == pytest.approx(0.002 * FINAL_LR_FRACTION)
    assert rates[20] == pytest.approx(0.002 * (1 + FINAL_LR_FRACTION) / 2, rel=0.05)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert cosine_lr(0.002, 0, 1) == 0.002
