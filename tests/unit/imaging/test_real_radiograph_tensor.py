"""pydicom-data's real chest radiograph (CR, stored MONOCHROME1, 15 bits in 16) through
the bundled pneumonia model's own preprocessing spec, read from its card: the tensor is
checked, not the verdict (a real image says nothing about a phantom-trained model)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.inference import load_package
from tests.peers import PYDICOM_DATA, REPO

PACKAGE = REPO / "models" / "pneumonia-cxr"


@pytest.fixture(scope="module")
def spec() -> PreprocessSpec:
    if not (PACKAGE / "model.yaml").is_file():
        pytest.fail("models/pneumonia-cxr is missing; run scripts/build_models.sh pneumonia-cxr")
    card = load_package(PACKAGE).card
    spec = PreprocessSpec.from_dict(list(card.preprocessing))
    spec.require_fingerprint(str(card.provenance["preprocessing_fingerprint"]))
    return spec


def _regions(t: np.ndarray) -> tuple[float, float]:
    """Mean of both lung fields and of the mediastinum of a PA chest."""
    h, w = t.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    lungs = np.r_[t[rows, int(0.2 * w):int(0.38 * w)].ravel(),
                  t[rows, int(0.62 * w):int(0.8 * w)].ravel()]
    return float(lungs.mean()), float(t[rows, int(0.45 * w):int(0.55 * w)].mean())


def test_inverted_15_bit_radiograph_becomes_the_tensor_the_model_expects(
        spec: PreprocessSpec) -> None:
    ds = pydicom.dcmread(PYDICOM_DATA / "RG1_UNCI.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    card_input = load_package(PACKAGE).card.inputs[0]
    tensor = apply_spec(spec, [ds])
    assert tuple(tensor.shape[1:]) == tuple(card_input.shape[1:])
    assert tensor.dtype == np.float32 and np.isfinite(tensor).all()
    image = tensor[0, 0]
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1.0) < 1e-2
    # MONOCHROME1 undone: air-filled lungs dark, the mediastinum bright, as on phantoms
    lungs, mediastinum = _regions(image)
    assert lungs < -0.3 and mediastinum > 0.5, (lungs, mediastinum)


def test_the_same_radiograph_stored_three_ways_gives_the_same_tensor(
        spec: PreprocessSpec) -> None:
    # RG1_UNCR and RG1_J2KR hold the same pixels (J2KR is lossless; UNCI pairs with the
    # irreversible J2KI instead)
    first = pydicom.dcmread(PYDICOM_DATA / "RG1_UNCR.dcm")
    reference = apply_spec(spec, [first])
    lossless = apply_spec(spec, [pydicom.dcmread(PYDICOM_DATA / "RG1_J2KR.dcm")])
    assert np.abs(lossless - reference).max() < 1e-4
    # the same pixels stored MONOCHROME2 (inverted values) must not change the tensor
    flipped = pydicom.dcmread(PYDICOM_DATA / "RG1_UNCR.dcm")
    values = flipped.pixel_array.astype(np.uint16)
    top = (1 << int(flipped.BitsStored)) - 1
    flipped.PixelData = (top - values).astype(np.uint16).tobytes()
    flipped.PhotometricInterpretation = "MONOCHROME2"
    inverted = apply_spec(spec, [flipped])
    assert np.abs(inverted - reference).max() < 1e-4
