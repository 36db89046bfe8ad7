from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.phantoms.brain_mr import (
    MASK_NECROSIS,
    MASK_OEDEMA,
    MASK_TUMOUR,
    make_ct_volume_for_patient,
    make_mr_volume,
    write_brain_mr_growth_study,
    write_brain_mr_study,
)
from dicomnode.phantoms.common import PHANTOM_KINDS, load_mask
from dicomnode.phantoms.head_ct import Tissue
from tests.unit.phantoms.conftest import dciodvfy_errors, tree_bytes

SMALL = {"matrix": 64, "n_slices": 30, "slice_thickness_mm": 5.0}


def test_classes_and_tumour_appearance_on_t1c() -> None:
    vol, geom, truth = make_mr_volume(np.random.default_rng(0), label="healthy", **SMALL)
    assert vol.dtype == np.float32 and vol.shape == geom.shape == (30, 64, 64)
    assert truth.tumour is None and not truth.tumour_mask.any()

    vol, _, truth = make_mr_volume(
        np.random.default_rng(1),
        label="malignant",
        patient_seed=11,
        tumour_volume_cm3=30.0,
        noise_fraction=0.02,
        **SMALL,
    )
    lab, mask = truth.tissue_labels, truth.tumour_mask
    white = float(vol[lab == Tissue.WHITE].mean())
    assert float(vol[mask == MASK_TUMOUR].mean()) > 1.1 * white  # enhancing rim
    assert float(vol[mask == MASK_NECROSIS].mean()) < 0.6 * white  # necrotic core
    assert (mask == MASK_OEDEMA).any()

    vol, _, truth = make_mr_volume(
        np.random.default_rng(2), label="benign", patient_seed=12, tumour_volume_cm3=8.0, **SMALL
    )
    assert truth.label == "benign" and not (truth.tumour_mask == MASK_NECROSIS).any()
    solid = truth.tumour_mask == MASK_TUMOUR
    assert float(vol[solid].std()) / float(vol[solid].mean()) < 0.25  # homogeneous


@pytest.mark.parametrize("volume", [1.0, 6.0, 25.0])
def test_mask_volume_follows_the_requested_volume(volume: float) -> None:
    for seed, sequence in ((0, "T1C"), (1, "FLAIR")):
        _, geom, truth = make_mr_volume(
            np.random.default_rng(seed),
            label="malignant",
            patient_seed=3,
            tumour_volume_cm3=volume,
            sequence=sequence,
            matrix=80,
        )
        assert truth.tumour is not None
        voxels = int(np.isin(truth.tumour_mask, (MASK_TUMOUR, MASK_NECROSIS)).sum())
        assert truth.volume_cm3 == pytest.approx(voxels * geom.voxel_volume_mm3 / 1000, rel=1e-4)
        assert truth.volume_cm3 == pytest.approx(volume, rel=0.01)
        assert 20 <= geom.shape[0] <= 150


def test_same_patient_seed_same_anatomy_and_centre() -> None:
    a = make_mr_volume(
        np.random.default_rng(5), label="malignant", patient_seed=8, tumour_volume_cm3=2, **SMALL
    )
    b = make_mr_volume(
        np.random.default_rng(5), label="malignant", patient_seed=8, tumour_volume_cm3=9, **SMALL
    )
    ta, tb = a[2], b[2]
    assert ta.tumour is not None and tb.tumour is not None
    assert ta.tumour["centre_head_mm"] == tb.tumour["centre_head_mm"]
    untouched = (ta.tumour_mask == 0) & (tb.tumour_mask == 0)
    assert np.array_equal(ta.tissue_labels[untouched], tb.tissue_labels[untouched])
    assert (ta.tumour_mask > 0).sum() < (tb.tumour_mask > 0).sum()


def test_ct_of_the_same_patient_shows_the_same_tumour() -> None:
    hu, _geom, truth = make_ct_volume_for_patient(
        np.random.default_rng(7),
        label="malignant",
        patient_seed=3,
        tumour_volume_cm3=6.0,
        matrix=80,
        noise_hu=4.0,
    )
    _, _, mr = make_mr_volume(
        np.random.default_rng(8),
        label="malignant",
        patient_seed=3,
        tumour_volume_cm3=6.0,
        matrix=80,
    )
    assert hu.dtype == np.int16 and truth.modality == "CT"
    assert truth.volume_cm3 == pytest.approx(6.0, rel=0.01)
    assert truth.tumour is not None and mr.tumour is not None
    assert truth.tumour["centre_head_mm"] == mr.tumour["centre_head_mm"]
    brain = float(hu[np.isin(truth.tissue_labels, (Tissue.GREY, Tissue.WHITE))].mean())
    assert float(hu[truth.tumour_mask == MASK_TUMOUR].mean()) > brain + 15


def test_writer_classes_geometry_dciodvfy_and_determinism(tmp_path: Path) -> None:
    opts = {"n": 3, "seed": 2, "sequences": ["T1C", "FLAIR"], **SMALL}
    files = write_brain_mr_study(tmp_path / "a", **opts)
    PHANTOM_KINDS["brain-mr"](tmp_path / "b", **opts)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert sorted(s["label"] for s in truth["studies"].values()) == [
        "benign",
        "healthy",
        "malignant",
    ]
    assert len(files) == 3 * 2 * 30
    first = pydicom.dcmread(files[0])
    assert first.Modality == "MR" and first.BodyPartExamined == "BRAIN"
    assert (
        first.MagneticFieldStrength in (1.5, 3.0)
        and "EchoTime" in first
        and "RepetitionTime" in first
    )
    series: dict[str, list[pydicom.Dataset]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    for slices in series.values():
        pos = sorted(float(s.ImagePositionPatient[2]) for s in slices)
        assert np.allclose(np.diff(pos), 5.0)
        assert len({s.FrameOfReferenceUID for s in slices}) == 1
    for study in truth["studies"].values():
        for entry in study["series"].values():
            mask = load_mask(tmp_path / "a" / entry["tumour_mask_file"])
            assert mask.shape == (30, 64, 64)
            assert bool(mask.any()) == (study["label"] != "healthy")
    assert dciodvfy_errors(files[15]) == []
    assert dciodvfy_errors(files[45]) == []


def test_growth_series_writer(tmp_path: Path) -> None:
    files = write_brain_mr_growth_study(
        tmp_path, seed=4, volumes_cm3=[2.0, 3.5, 6.0], interval_days=[60, 90], with_ct=True, **SMALL
    )
    truth = json.loads((tmp_path / "truth.json").read_text())
    timeline = truth["timeline"]
    assert [t["requested_volume_cm3"] for t in timeline] == [2.0, 3.5, 6.0]
    for t in timeline:
        assert t["volume_cm3"] == pytest.approx(t["requested_volume_cm3"], rel=0.01)
    dates = [t["study_date"] for t in timeline]
    assert dates == sorted(dates) and len(set(dates)) == 3
    patients = {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in files}
    assert len(patients) == 1
    ct = [f for f in files if "_CT" in f.parent.name]
    assert ct and dciodvfy_errors(ct[len(ct) // 2]) == []
