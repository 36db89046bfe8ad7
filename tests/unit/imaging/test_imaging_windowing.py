"""Windows, VOI from the dataset, and MONOCHROME1 polarity."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.imaging import (
    WINDOW_PRESETS,
    PixelDataError,
    PreprocessSpec,
    Window,
    apply_spec,
    dataset_window,
    modality_frames,
    robust_minmax_unit,
    voi_lut_sequence_unit,
    window_preset,
)

Reader = Callable[[str], Dataset]


def test_presets_have_the_documented_values() -> None:
    expected = {
        "brain": (40, 80),
        "subdural": (80, 200),
        "bone": (600, 2800),
        "lung": (-600, 1500),
        "soft_tissue": (40, 400),
    }
    assert {k: (w.center, w.width) for k, w in WINDOW_PRESETS.items()} == expected
    with pytest.raises(PixelDataError, match="known: bone, brain"):
        window_preset("liver")


def test_linear_exact_maps_the_window_edges_to_0_and_1() -> None:
    brain = Window(40, 80)
    out = brain.apply(np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_dicom_linear_uses_half_unit_offsets() -> None:
    # PS3.3 C.11.2.1.2.1 with c=2048, w=4096: x <= 0 -> min, x > 4095 -> max.
    window = Window(2048, 4096, "LINEAR")
    out = window.apply(np.array([0.0, 4095.0, 2047.5]))
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5])


def test_sigmoid_is_half_at_the_center() -> None:
    out = Window(100, 50, "SIGMOID").apply(np.array([100.0, -1e4, 1e4]))
    np.testing.assert_allclose(out, [0.5, 0.0, 1.0], atol=1e-12)


def test_invalid_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="width"):
        Window(40, 0)
    with pytest.raises(ValueError, match=">= 1"):
        Window(40, 0.5, "LINEAR")


def test_dataset_window_from_top_level_and_frame_groups(
    pydicom_file: Reader, data_store_file: Reader
) -> None:
    assert dataset_window(pydicom_file("MR_small.dcm")) == Window(600, 1600, "LINEAR")
    assert dataset_window(pydicom_file("CT_small.dcm")) is None
    # Multiple values: pick by index.
    ds = pydicom_file("J2K_pixelrep_mismatch.dcm")
    assert dataset_window(ds, index=2) == Window(40, 200, "LINEAR")
    with pytest.raises(PixelDataError, match="index 3"):
        dataset_window(ds, index=3)
    # Enhanced CT: Frame VOI LUT functional group.
    assert dataset_window(data_store_file("eCT_Supplemental.dcm"), frame=1) == Window(
        49, 102, "LINEAR"
    )


def test_voi_lut_sequence(data_store_file: Reader) -> None:
    ds = data_store_file("vlut_04.dcm")
    unit = voi_lut_sequence_unit(modality_frames(ds), ds)
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    lut = np.asarray(ds.VOILUTSequence[0].LUTData)
    # Monotone LUT: brighter stored values stay brighter.
    assert (np.diff(lut.astype(np.int64)) >= 0).all()
    stored = modality_frames(ds)[0]
    assert unit[0][stored == stored.max()].min() >= unit[0][stored == stored.min()].max()
    spec = PreprocessSpec.from_dict([{"name": "modality_lut"}, {"name": "voi"}])
    np.testing.assert_allclose(apply_spec(spec, ds)[0], unit.astype(np.float32))


def test_robust_minmax_ignores_outliers() -> None:
    values = np.linspace(0, 100, 10_000)
    values[:3] = -1e6
    out = robust_minmax_unit(values, 1.0, 99.0)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.median(out) == pytest.approx(0.5, abs=0.01)


def _regions(image: np.ndarray) -> tuple[float, float]:
    """Mean of the central (mediastinal) column and of both lateral lung fields."""
    rows, columns = image.shape
    band = image[rows // 4 : rows * 5 // 8]
    centre = band[:, columns * 9 // 20 : columns * 11 // 20].mean()
    lungs = np.concatenate(
        [
            band[:, columns * 3 // 20 : columns * 6 // 20],
            band[:, columns * 14 // 20 : columns * 17 // 20],
        ],
        axis=1,
    ).mean()
    return float(centre), float(lungs)


@pytest.mark.parametrize("display", ["voi", "robust_minmax", "minmax"])
def test_monochrome1_chest_radiograph_ends_up_lungs_dark(rg1: Dataset, display: str) -> None:
    spec = PreprocessSpec.from_dict(
        [
            {"name": "modality_lut"},
            {"name": display},
            {"name": "resize", "size": [256, 256], "interpolation": "area"},
        ]
    )
    image = apply_spec(spec, rg1)[0, 0]
    centre, lungs = _regions(image)
    assert centre > lungs + 0.15, (centre, lungs)


def test_raw_monochrome1_values_have_the_opposite_polarity(rg1: Dataset) -> None:
    # The stored values themselves are bright lungs: the inversion above is real work.
    raw = modality_frames(rg1)[0]
    centre, lungs = _regions(raw)
    assert centre < lungs
