"""The bundled DaT-SPECT classifier as the node serves it (DICOM -> load_volume -> slab ->
spec -> ONNX Runtime) on phantoms no training step saw, and the slab that feeds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.inference import load_package
from dicomnode.inference.runtime import RuntimeSettings, open_session
from dicomnode.phantoms.dat_spect import build_dat_study
from dicomnode.pipelines.dat_quant import load_volume
from dicomnode.training.tasks_dat import (
    SLAB_PIXEL_MM,
    SLAB_SIZE,
    SLAB_SLICE_MM,
    SLAB_SLICES,
    dat_slab,
    striatal_centre,
)

MODELS = Path(__file__).resolve().parents[3] / "models"
FRESH_SEED = 424242


def _blob(shape: tuple[int, int, int], spacing: float, centre_mm: tuple[float, float, float]
          ) -> np.ndarray:
    """A uniform "head" with one hot Gaussian blob at ``centre_mm`` (array axes, mm)."""
    grid = np.indices(shape, dtype=np.float64) * spacing
    distance2 = np.sum([(g - c) ** 2 for g, c in zip(grid, centre_mm, strict=True)], axis=0)
    blob: np.ndarray = (10.0 + 100.0 * np.exp(-distance2 / (2 * 8.0**2))).astype(np.float32)
    return blob


def test_slab_is_a_fixed_physical_box_centred_on_the_striatal_uptake() -> None:
    centre = (90.0, 110.0, 130.0)
    fine = _blob((60, 70, 80), 3.0, centre)
    coarse = _blob((45, 52, 60), 4.0, centre)
    assert np.allclose(striatal_centre(fine, (3.0, 3.0, 3.0)), centre, atol=1.0)
    slabs = [dat_slab(fine, (3.0, 3.0, 3.0)), dat_slab(coarse, (4.0, 4.0, 4.0))]
    for slab in slabs:
        assert slab.shape == (SLAB_SLICES, SLAB_SIZE, SLAB_SIZE) and slab.dtype == np.float32
        peak = np.unravel_index(int(np.argmax(slab)), slab.shape)
        assert abs(peak[0] - (SLAB_SLICES - 1) / 2) <= 1
        assert all(abs(p - (SLAB_SIZE - 1) / 2) <= 1 for p in peak[1:])
    # the same anatomy sampled from two voxel grids gives the same input
    assert np.corrcoef(slabs[0].ravel(), slabs[1].ravel())[0, 1] > 0.99
    assert SLAB_SLICE_MM * SLAB_SLICES == 64 and SLAB_PIXEL_MM * SLAB_SIZE == 192


def test_slab_is_zero_outside_the_scanned_volume() -> None:
    volume = _blob((20, 30, 30), 4.0, (40.0, 60.0, 60.0))
    slab = dat_slab(volume, (4.0, 4.0, 4.0))
    assert slab[:, 0, 0].max() == 0.0 and slab.max() > 50.0


def test_dat_package_served_from_dicom_separates_fresh_phantoms() -> None:
    package = load_package(MODELS / "dat-classifier")  # sha256 and graph signature
    card = package.card
    assert card.inputs[0].shape == ("batch", SLAB_SLICES, SLAB_SIZE, SLAB_SIZE)
    assert card.training_data.synthetic
    assert "synthetic phantoms" in card.intended_use.lower()
    assert "not for clinical use" in card.intended_use.lower()
    assert "synthetic phantoms, not for clinical use" in card.training_data.description
    metrics = {m.name: m for m in card.metrics}
    for name in ("auc", "ece"):
        assert metrics[name].ci_lower <= metrics[name].value <= metrics[name].ci_upper
        assert "held-out test phantoms" in metrics[name].dataset
    assert {p.name for p in card.operating_points} == {"f1-optimal", "sensitivity-0.9"}
    for point in card.operating_points:
        assert point.class_name == "reduced" and "chosen on validation" in point.dataset
    training = card.provenance["training"]
    assert training["parameters"] < 20_000  # seed 000 had 1.8 M for 25 scans
    seeds = training["data_provenance"]["seeds"]
    assert FRESH_SEED not in seeds.values() and seeds["test"] not in (seeds["train"],
                                                                      seeds["val"])
    spec = PreprocessSpec.from_dict(list(card.preprocessing))
    spec.require_fingerprint(card.provenance["preprocessing_fingerprint"])
    slabs, labels = [], []
    for index, condition in enumerate(("healthy", "pd", "pd", "healthy")):
        datasets, truth = build_dat_study(FRESH_SEED, index, condition=condition)
        volume, spacing = load_volume(datasets)
        slabs.append(apply_spec(spec, dat_slab(volume, spacing)[np.newaxis])[0])
        labels.append(truth.call)
    session = open_session(package, RuntimeSettings(providers=("cpu",), intra_op_threads=1))
    logits = session.run({"slices": np.stack(slabs)}).outputs["logits"][:, 0]
    probability = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    reduced = [p for p, c in zip(probability, labels, strict=True) if c == "reduced"]
    normal = [p for p, c in zip(probability, labels, strict=True) if c == "normal"]
    assert min(reduced) > max(normal)
    threshold = card.operating_point("f1-optimal").threshold
    assert {bool(p >= threshold) for p in probability} == {True, False}  # not collapsed
