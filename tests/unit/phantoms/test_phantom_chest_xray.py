from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from dicomnode.phantoms.chest_xray import (
    CR_IMAGE_STORAGE,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    chest_xray_rng,
    make_chest_xray,
    make_chest_xray_batch,
    write_chest_xray_study,
)
from dicomnode.phantoms.common import PHANTOM_KINDS, load_mask
from tests.unit.phantoms.conftest import dciodvfy_errors, tree_bytes


def test_normal_and_pneumonia_images_and_truth() -> None:
    for seed in range(4):
        img, geom, truth = make_chest_xray(np.random.default_rng(seed), label="normal", size=128)
        assert img.shape == (128, 128) and img.dtype == np.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        assert truth.label == "normal" and not truth.consolidations and not truth.lesion_mask.any()
        assert truth.lung_mask.mean() > 0.1
        assert geom.view_position in ("PA", "AP")
    brighter = 0
    for seed in range(6):
        img, _, truth = make_chest_xray(
            np.random.default_rng(seed), label="pneumonia", size=(160, 128)
        )
        assert img.shape == (160, 128)
        assert truth.consolidations
        for c in truth.consolidations:
            r0, c0, r1, c1 = c.bbox_rc
            inside = truth.lesion_mask == c.lesion_id
            assert inside[r0:r1, c0:c1].sum() == inside.sum() == c.area_px
            assert 0 <= r0 < r1 <= 160 and 0 <= c0 < c1 <= 128
        lesion = truth.lesion_mask > 0
        lung = truth.lung_mask & ~lesion
        brighter += float(img[lesion].mean()) > float(img[lung].mean())
    assert brighter >= 5  # consolidation replaces air, so it is denser than aerated lung


def test_generator_is_deterministic() -> None:
    a = make_chest_xray(np.random.default_rng(3), size=96)
    b = make_chest_xray(np.random.default_rng(3), size=96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2].lesion_mask, b[2].lesion_mask)


def test_batch_is_balanced() -> None:
    images, labels, masks = make_chest_xray_batch(1, 8, size=64, pneumonia_fraction=0.25)
    assert images.shape == (8, 64, 64) and masks.shape == (8, 64, 64)
    assert int(labels.sum()) == 2
    assert all(masks[i].any() == bool(labels[i]) for i in range(8))


def test_writer_is_reproducible_balanced_and_keyed(tmp_path: Path) -> None:
    a = write_chest_xray_study(tmp_path / "a", n=4, seed=9, size=96, pneumonia_fraction=0.5)
    PHANTOM_KINDS["chest-xray"](tmp_path / "b", n=4, seed=9, size=96, pneumonia_fraction=0.5)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert truth["kind"] == "chest-xray" and len(truth["studies"]) == 4
    assert (
        sorted(s["label"] for s in truth["studies"].values()) == ["normal"] * 2 + ["pneumonia"] * 2
    )
    for path in a:
        ds = pydicom.dcmread(path)
        study = truth["studies"][ds.StudyInstanceUID]
        inst = study["series"][ds.SeriesInstanceUID]["instances"][ds.SOPInstanceUID]
        assert (tmp_path / "a" / inst["file"]) == path
        mask = load_mask(tmp_path / "a" / inst["lesion_mask_file"])
        assert mask.shape == (ds.Rows, ds.Columns)
        assert bool(mask.any()) == (inst["label"] == "pneumonia")
        assert ds.PatientName.family_name == "PHANTOM" and ds.BodyPartExamined == "CHEST"
        assert (
            ds.ViewPosition in ("PA", "AP") and "WindowCenter" in ds and "ImagerPixelSpacing" in ds
        )


@pytest.mark.parametrize("bits", [10, 12, 14, 15])
def test_monochrome1_inverts_to_monochrome2(tmp_path: Path, bits: int) -> None:
    opts = {"n": 1, "seed": 4, "size": 80, "sop_class": "CR", "bits_stored": bits, "rescale": True}
    (m1,) = write_chest_xray_study(tmp_path / "m1", photometric="MONOCHROME1", **opts)
    (m2,) = write_chest_xray_study(tmp_path / "m2", photometric="MONOCHROME2", **opts)
    d1, d2 = pydicom.dcmread(m1), pydicom.dcmread(m2)
    assert (d1.BitsStored, d1.HighBit, d1.PhotometricInterpretation) == (
        bits,
        bits - 1,
        "MONOCHROME1",
    )
    top = (1 << bits) - 1
    p1, p2 = d1.pixel_array.astype(np.int64), d2.pixel_array.astype(np.int64)
    assert p2.max() <= top and np.array_equal(top - p1, p2)
    # In output units the inversion runs over the rescaled range of possible values.
    r1, r2 = apply_rescale(p1, d1), apply_rescale(p2, d2)
    lo, hi = apply_rescale(np.array([0, top]), d1)
    assert np.allclose(lo + hi - r1, r2)
    image, _, _ = make_chest_xray(chest_xray_rng(4, 0), label="normal", size=80)
    truth = json.loads((tmp_path / "m2" / "truth.json").read_text())
    storage = next(
        iter(
            next(iter(next(iter(truth["studies"].values()))["series"].values()))[
                "instances"
            ].values()
        )
    )["storage"]
    expected = storage["stored_low"] + image * (storage["stored_high"] - storage["stored_low"])
    assert np.abs(p2 - expected).max() <= 0.5 + 1e-6


def test_storage_variants(tmp_path: Path) -> None:
    (dx,) = write_chest_xray_study(tmp_path / "dx", n=1, seed=1, size=64, sop_class="DX")
    (cr,) = write_chest_xray_study(
        tmp_path / "cr", n=1, seed=1, size=64, sop_class="CR", rescale=False
    )
    ddx, dcr = pydicom.dcmread(dx), pydicom.dcmread(cr)
    assert (
        ddx.SOPClassUID == DX_IMAGE_STORAGE_FOR_PRESENTATION
        and ddx.PresentationIntentType == "FOR PRESENTATION"
    )
    assert (float(ddx.RescaleSlope), float(ddx.RescaleIntercept)) == (1.0, 0.0)
    assert dcr.SOPClassUID == CR_IMAGE_STORAGE and "RescaleSlope" not in dcr
    with pytest.raises(ValueError):
        write_chest_xray_study(
            tmp_path / "bad", n=1, seed=1, size=64, sop_class="DX", rescale=False
        )


def test_realistic_default_size_and_dciodvfy(tmp_path: Path) -> None:
    (dx,) = write_chest_xray_study(
        tmp_path / "dx", n=1, seed=2, sop_class="DX", photometric="MONOCHROME2"
    )
    ds = pydicom.dcmread(dx, stop_before_pixels=True)
    assert 1024 <= ds.Rows <= 2500 and 800 <= ds.Columns <= 2500
    (cr,) = write_chest_xray_study(
        tmp_path / "cr",
        n=1,
        seed=3,
        size=128,
        sop_class="CR",
        photometric="MONOCHROME1",
        rescale=True,
    )
    assert dciodvfy_errors(dx) == []
    assert dciodvfy_errors(cr) == []
