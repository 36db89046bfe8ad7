from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from dicomnode.phantoms.common import PHANTOM_KINDS, load_mask
from dicomnode.phantoms.head_ct import Tissue, make_head_ct, write_head_ct_study
from tests.unit.phantoms.conftest import dciodvfy_errors, tree_bytes


def _small(seed: int, **kw: object) -> tuple:  # type: ignore[type-arg]
    opts: dict = {"matrix": 96, "n_slices": 24, "slice_thickness_mm": 5.0, **kw}
    return make_head_ct(np.random.default_rng(seed), **opts)


def test_tissue_values_are_in_the_specified_ranges() -> None:
    hu, geom, truth = _small(1, label="normal", noise_hu=4.0)
    assert hu.dtype == np.int16 and hu.shape == geom.shape == (24, 96, 96)
    lab = truth.tissue_labels

    def mean(t: Tissue) -> float:
        return float(hu[lab == t].mean())

    assert 1000 <= mean(Tissue.CORTICAL_BONE) <= 1900
    assert -1010 <= float(np.median(hu[lab == Tissue.AIR])) <= -990
    assert -2 <= mean(Tissue.VENTRICLE) <= 12
    assert 5 <= mean(Tissue.GREY) - mean(Tissue.WHITE) <= 14
    assert 30 <= mean(Tissue.GREY) <= 46
    assert 2 <= float(hu[lab == Tissue.WHITE].std()) <= 7
    assert truth.label == "normal" and not truth.lesions and not truth.lesion_mask.any()


def test_enhancing_and_hypodense_lesions_match_their_masks() -> None:
    hu, geom, truth = _small(
        2,
        label="metastasis",
        n_lesions=3,
        lesion_kinds=["solid"],
        diameter_range_mm=(10.0, 20.0),
        noise_hu=5.0,
    )
    lab = truth.tissue_labels
    brain = float(hu[np.isin(lab, (Tissue.GREY, Tissue.WHITE))].mean())
    assert len(truth.lesions) == 3
    for les in truth.lesions:
        inside = truth.lesion_mask == les["lesion_id"]
        assert int(inside.sum()) == les["voxel_count"] > 0
        assert les["volume_cm3"] == pytest.approx(
            les["voxel_count"] * geom.voxel_volume_mm3 / 1000, rel=1e-4
        )
        assert float(hu[inside].mean()) - brain > 0.5 * les["enhancement_hu"]
        z0, y0, x0, z1, y1, x1 = les["bbox_voxel_zyx"]
        assert inside[z0:z1, y0:y1, x0:x1].sum() == inside.sum()
    assert truth.slice_labels == tuple(bool(truth.lesion_mask[k].any()) for k in range(24))

    hu, _, truth = _small(
        3,
        label="metastasis",
        n_lesions=2,
        lesion_kinds=["hypodense"],
        diameter_range_mm=(12.0, 24.0),
        noise_hu=4.0,
        contrast=False,
    )
    white = float(hu[truth.tissue_labels == Tissue.WHITE].mean())
    for les in truth.lesions:
        assert float(hu[truth.lesion_mask == les["lesion_id"]].mean()) < white - 4


def test_hypodense_metastases_are_10_to_20_hu_below_white_matter() -> None:
    seen = []
    for seed in range(3):
        hu, _, truth = _small(20 + seed, label="metastasis", n_lesions=2,
                              lesion_kinds=["hypodense"], diameter_range_mm=(14.0, 24.0),
                              noise_hu=3.0)
        white = float(np.median(hu[truth.tissue_labels == Tissue.WHITE]))
        for les in truth.lesions:
            assert 10.0 <= les["hypodensity_hu"] <= 20.0 and les["enhancement_hu"] == 0.0
            core = truth.tissue_labels == Tissue.NONENHANCING
            inside = float(np.median(hu[(truth.lesion_mask == les["lesion_id"]) & core]))
            assert white - inside == pytest.approx(les["hypodensity_hu"], abs=3.0)
            seen.append(les["hypodensity_hu"])
    assert max(seen) - min(seen) > 2.0  # drawn per lesion, not one constant


def test_metastases_under_8_mm_are_enhancing_nodules() -> None:
    """Ring and hypodense lesions have a necrotic or cystic centre: from 8 mm only."""
    small = {"label": "metastasis", "n_lesions": 3, "diameter_range_mm": (3.0, 7.9),
             "matrix": 64, "noise_hu": 4.0}
    for seed in range(4):
        hu, _, truth = _small(40 + seed, lesion_kinds=["ring", "hypodense", "solid"], **small)
        assert truth.lesions and {les["kind"] for les in truth.lesions} == {"solid"}
        assert all(les["enhancement_hu"] >= 50.0 for les in truth.lesions)
        # the kind is turned without a random draw of its own: the same volume whatever
        # kind the draw picked
        again, _, _ = _small(40 + seed, lesion_kinds=["solid", "ring", "hypodense"], **small)
        assert np.array_equal(hu, again)
    # asked for hypodense only, a small lesion stays hypodense (there is no solid to turn to)
    _, _, truth = _small(44, lesion_kinds=["hypodense"], **small)
    assert {les["kind"] for les in truth.lesions} == {"hypodense"}
    kinds = set()
    for seed in range(6):
        _, _, truth = _small(50 + seed, n_lesions=3, diameter_range_mm=(8.0, 20.0),
                             label="metastasis", matrix=64)
        kinds |= {les["kind"] for les in truth.lesions}
    assert kinds == {"ring", "solid", "hypodense"}


def test_lesion_count_kinds_and_sizes_are_respected() -> None:
    for seed in range(3):
        _, geom, truth = _small(10 + seed, label="metastasis", matrix=64)
        assert 1 <= len(truth.lesions) <= 5
        for les in truth.lesions:
            assert les["kind"] in ("ring", "solid", "hypodense")
            assert 3.0 <= les["diameter_mm"] <= 30.0
            assert 0 <= les["centroid_voxel_zyx"][0] < geom.shape[0]


def test_writer_geometry_storage_truth_and_determinism(tmp_path: Path) -> None:
    opts = {"n": 2, "seed": 5, "matrix": 64, "n_slices": 24, "slice_thickness_mm": 5.0}
    files = write_head_ct_study(tmp_path / "a", pixel_representation=1, **opts)
    PHANTOM_KINDS["head-ct"](tmp_path / "b", pixel_representation=1, **opts)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert sorted(s["label"] for s in truth["studies"].values()) == ["metastasis", "normal"]
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for f in files:
        ds = pydicom.dcmread(f)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    for series_uid, slices in by_series.items():
        ds0 = slices[0]
        entry = truth["studies"][ds0.StudyInstanceUID]["series"][series_uid]
        assert len(slices) == 24 and ds0.Modality == "CT" and ds0.BodyPartExamined == "HEAD"
        assert list(ds0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (float(ds0.RescaleIntercept), float(ds0.RescaleSlope)) == (-1024.0, 1.0)
        assert ds0.PixelRepresentation == 1 and ds0.SeriesDescription == "Head CT with contrast"
        normal = np.cross(
            np.array(ds0.ImageOrientationPatient[:3], float),
            np.array(ds0.ImageOrientationPatient[3:], float),
        )
        pos = sorted(float(np.dot(normal, np.array(s.ImagePositionPatient, float))) for s in slices)
        assert np.allclose(np.diff(pos), float(ds0.SliceThickness))
        mask = load_mask(tmp_path / "a" / entry["lesion_mask_file"])
        assert mask.shape == (24, 64, 64)
        for s in slices:
            inst = entry["instances"][s.SOPInstanceUID]
            assert inst["label"] == int(mask[inst["slice_index"]].any())
        hu = apply_rescale(slices[0].pixel_array, slices[0])
        assert float(hu.min()) >= -1024 and float(hu.max()) > 1000


def test_unsigned_storage_and_dciodvfy(tmp_path: Path) -> None:
    files = write_head_ct_study(
        tmp_path,
        n=1,
        seed=6,
        matrix=64,
        n_slices=24,
        slice_thickness_mm=5.0,
        pixel_representation=0,
    )
    ds = pydicom.dcmread(files[12])
    assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
    assert dciodvfy_errors(files[12]) == []
