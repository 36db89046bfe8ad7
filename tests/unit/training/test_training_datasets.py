"""Datasets from the layouts users have: every tensor through apply_spec, splits by patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.phantoms.chest_xray import make_chest_xray_batch, write_chest_xray_study
from dicomnode.training.datasets import (
    DatasetError,
    chest_xray_phantom_instance,
    chest_xray_phantoms,
    class_folder_dataset,
    dicom_csv_dataset,
    nifti_dataset,
    nifti_mask,
    raster_as_dataset,
    read_raster,
)
from dicomnode.training.splits import PatientLeakError

CXR_SPEC = PreprocessSpec.from_dict([
    {"name": "modality_lut"},
    {"name": "robust_minmax"},
    {"name": "resize", "size": [32, 32], "interpolation": "area"},
    {"name": "clahe"},
    {"name": "zscore"},
])


def _kaggle_layout(root: Path, parts: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """root/<part>/{NORMAL,PNEUMONIA}/ with PNG names as in the Kaggle chest_xray set."""
    patient = 0
    for part, (n_normal, n_pneumonia) in parts.items():
        images, labels, _ = make_chest_xray_batch(seed, n_normal + n_pneumonia, size=48,
                                                  pneumonia_fraction=0.5)
        normal = [im for im, lab in zip(images, labels, strict=True) if lab == 0][:n_normal]
        sick = [im for im, lab in zip(images, labels, strict=True) if lab == 1][:n_pneumonia]
        for folder, batch in (("NORMAL", normal), ("PNEUMONIA", sick)):
            (root / part / folder).mkdir(parents=True, exist_ok=True)
            for image in batch:
                patient += 1
                name = (f"IM-{patient:04d}-0001.png" if folder == "NORMAL"
                        else f"person{patient}_bacteria_{patient * 3}.png")
                cv2.imwrite(str(root / part / folder / name),
                            np.round(image * 255).astype(np.uint8))
        seed += 1
    return root


def test_in_memory_phantoms_equal_the_files_the_writer_stores(tmp_path: Path) -> None:
    written = write_chest_xray_study(tmp_path, n=4, seed=9, size=48)
    for index, path in enumerate(written):
        on_disk = pydicom.dcmread(path)
        in_memory, label = chest_xray_phantom_instance(9, index, 4, size=48)
        assert in_memory.PatientID == on_disk.PatientID
        assert in_memory.PhotometricInterpretation == on_disk.PhotometricInterpretation
        assert np.array_equal(in_memory.pixel_array, on_disk.pixel_array)
        assert label in ("normal", "pneumonia")


def test_phantom_splits_use_separate_seeds_and_pass_the_spec(tmp_path: Path) -> None:
    splits = chest_xray_phantoms(CXR_SPEC, n_train=8, n_val=4, n_test=6, seed=3, size=48)
    assert splits.cases() == {"train": 8, "val": 4, "test": 6}
    assert splits.synthetic and "synthetic phantoms, not for clinical use" in splits.description
    assert splits.train.class_counts() == {"normal": 4, "pneumonia": 4}
    assert all(p.startswith("PH-CXR-3-") for p in splits.train.patients)
    assert all(p.startswith("PH-CXR-1003-") for p in splits.test.patients)  # type: ignore[union-attr]
    x, y = splits.train.arrays()
    assert x.shape == (8, 1, 32, 32) and x.dtype == np.float32 and y.tolist().count(1) == 4
    assert np.array_equal(x[2], apply_spec(CXR_SPEC, splits.train.raw(2))[0])
    with pytest.raises(DatasetError, match="three different seeds"):
        chest_xray_phantoms(CXR_SPEC, n_train=4, n_val=4, n_test=4, seed=1, val_seed=1)


def test_kaggle_folders_with_png_take_patients_from_file_names(tmp_path: Path) -> None:
    root = _kaggle_layout(tmp_path / "chest_xray", {"train": (6, 6), "val": (2, 2),
                                                    "test": (3, 3)})
    splits = class_folder_dataset(root, CXR_SPEC, classes=("normal", "pneumonia"))
    assert splits.cases() == {"train": 12, "val": 4, "test": 6}
    assert splits.class_names == ("normal", "pneumonia")
    assert "person7" in splits.train.patients and "IM-0001" in splits.train.patients
    x, y = splits.test.arrays()  # type: ignore[union-attr]
    assert x.shape == (6, 1, 32, 32) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    raw = splits.train.raw(0)
    assert isinstance(raw, list) and raw[0].PhotometricInterpretation == "MONOCHROME2"


def test_a_patient_in_train_and_test_is_refused(tmp_path: Path) -> None:
    root = _kaggle_layout(tmp_path / "chest_xray", {"train": (2, 2), "val": (1, 1),
                                                    "test": (1, 1)})
    source = next((root / "train" / "PNEUMONIA").iterdir())
    shutil.copy(source, root / "test" / "PNEUMONIA" / source.name.replace(".png", "_2.png"))
    with pytest.raises(PatientLeakError, match=r"train \+ test"):
        class_folder_dataset(root, CXR_SPEC, classes=("normal", "pneumonia"))


def test_resplit_pools_folders_and_splits_by_patient(tmp_path: Path) -> None:
    root = _kaggle_layout(tmp_path / "chest_xray", {"train": (10, 10), "val": (1, 1)})
    splits = class_folder_dataset(root, CXR_SPEC, classes=("normal", "pneumonia"),
                                  resplit=True, fractions=(0.6, 0.2, 0.2), seed=1)
    assert sum(splits.cases().values()) == 22
    assert splits.test is not None and len(splits.val) >= 4
    assert "re-split by patient" in splits.description


def test_folders_of_dicom_use_patient_id(tmp_path: Path) -> None:
    root = tmp_path / "cxr"
    for part, seed in (("train", 1), ("val", 2)):
        out = tmp_path / f"written{seed}"
        write_chest_xray_study(out, n=4, seed=seed, size=48)
        for index, path in enumerate(sorted(out.rglob("*.dcm"))):
            folder = root / part / ("NORMAL" if index % 2 else "PNEUMONIA")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name)
    splits = class_folder_dataset(root, CXR_SPEC, classes=("normal", "pneumonia"))
    assert all(p.startswith("PH-CXR-1-") for p in splits.train.patients)
    assert splits.train.tensor(0).shape == (1, 32, 32)


def test_dicom_patient_folders_with_a_labels_csv(tmp_path: Path) -> None:
    root = tmp_path / "patients"
    written = write_chest_xray_study(root, n=6, seed=5, size=48)
    patients = sorted({p.parent.name for p in written})
    parts = ("train", "train", "val", "val", "test", "test")
    rows = ["patient_id,label,split"] + [
        f"{p},{'pneumonia' if i % 2 else 'normal'},{parts[i]}" for i, p in enumerate(patients)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    splits = dicom_csv_dataset(root, tmp_path / "labels.csv", CXR_SPEC,
                               classes=("normal", "pneumonia"))
    assert splits.cases() == {"train": 2, "val": 2, "test": 2}
    assert splits.train.patients == tuple(patients[:2])
    (tmp_path / "bad.csv").write_text("patient_id,label\n../escape,normal\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="missing"):
        dicom_csv_dataset(root, tmp_path / "bad.csv", CXR_SPEC, classes=("normal", "pneumonia"))


def test_raster_files_keep_sixteen_bits(tmp_path: Path) -> None:
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    cv2.imwrite(str(tmp_path / "x.png"), pixels)
    read = read_raster(tmp_path / "x.png")
    assert read.dtype == np.uint16 and np.array_equal(read, pixels)
    ds = raster_as_dataset(read)
    assert ds.BitsStored == 16 and np.array_equal(ds.pixel_array, pixels)


def _write_nifti(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_nifti_cases_with_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for index in range(6):
        case = f"BraTS-{index:03d}"
        folder = tmp_path / case
        folder.mkdir()
        for sequence in ("t1ce", "flair"):
            _write_nifti(folder / f"{case}_{sequence}.nii.gz",
                         rng.normal(100, 20, (5, 20, 20)).astype(np.float32))
        seg = np.zeros((5, 20, 20), dtype=np.uint8)
        if index % 2:
            seg[2:4, 5:10, 6:12] = 1
        _write_nifti(folder / f"{case}_seg.nii.gz", seg)
    spec = PreprocessSpec.from_dict([{"name": "resize", "size": [10, 10]}, {"name": "zscore"}])
    splits = nifti_dataset(tmp_path, spec, sequences=("t1ce", "flair"),
                           fractions=(0.5, 0.25, 0.25), seed=0)
    assert sum(splits.cases().values()) == 30
    assert {p for part in splits.parts().values() for p in part.patients} == {
        f"BraTS-{i:03d}" for i in range(6)}
    x, y = splits.train.arrays()
    assert x.shape[1:] == (2, 10, 10) and set(y.tolist()) <= {0, 1}
    positive = next(i for i, s in enumerate(splits.train.samples) if s.label == 1)
    mask = nifti_mask(splits.train.samples[positive], spec)
    assert mask.shape == (10, 10) and set(np.unique(mask).tolist()) == {0, 1}
    with pytest.raises(DatasetError, match="arrays"):
        nifti_dataset(tmp_path, CXR_SPEC)
