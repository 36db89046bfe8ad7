"""Modality values from real and synthetic datasets: HU, bit depths, LUTs, frames."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.imaging import (
    PixelDataError,
    frame_count,
    hounsfield_frames,
    is_monochrome1,
    modality_frames,
    stored_frames,
)

Reader = Callable[[str], Dataset]


def test_ct_small_hounsfield_units_are_plausible(pydicom_file: Reader) -> None:
    hu = hounsfield_frames(pydicom_file("CT_small.dcm"))
    assert hu.shape == (1, 128, 128)
    assert hu.dtype == np.float64
    assert -1024 <= hu.min() < -500  # air around the patient
    assert -100 < np.median(hu) < 100  # mostly soft tissue
    assert (hu > 300).mean() > 0.02  # a vertebra
    assert hu.max() < 3071


def test_hounsfield_clip_bounds_padding_sentinels(pydicom_file: Reader) -> None:
    ds = pydicom_file("J2K_pixelrep_mismatch.dcm")  # outside-FOV padding at -2000
    assert modality_frames(ds).min() == -2000
    assert hounsfield_frames(ds).min() == -1024
    assert hounsfield_frames(ds, clip=None).min() == -2000


def test_hounsfield_refuses_non_ct(pydicom_file: Reader) -> None:
    with pytest.raises(PixelDataError, match="Modality is MR"):
        hounsfield_frames(pydicom_file("MR_small.dcm"))


def test_hounsfield_refuses_ct_without_rescale(make_dataset: Callable[..., Dataset]) -> None:
    ds = make_dataset(np.zeros((2, 2), np.int16), slope=None, intercept=None)
    with pytest.raises(PixelDataError, match="no RescaleSlope"):
        hounsfield_frames(ds)


def test_hounsfield_refuses_rescale_type_other_than_hu(data_store_file: Reader) -> None:
    # Enhanced CT perfusion map: per-frame rescale declared "US" (unspecified), not HU.
    ds = data_store_file("eCT_Supplemental.dcm")
    with pytest.raises(PixelDataError, match="declared as US"):
        hounsfield_frames(ds)


def test_enhanced_rescale_comes_from_functional_groups(data_store_file: Reader) -> None:
    ds = data_store_file("eCT_Supplemental.dcm")
    assert "RescaleIntercept" not in ds  # only in the Pixel Value Transformation group
    values = modality_frames(ds)
    assert values.shape == (2, 512, 512)
    np.testing.assert_array_equal(values, stored_frames(ds).astype(np.float64) - 1024.0)


def test_per_frame_rescale_overrides_shared(make_dataset: Callable[..., Dataset]) -> None:
    ds = make_dataset(np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int16).reshape(2, 2, 2))
    ds.NumberOfFrames = 2
    del ds.RescaleSlope, ds.RescaleIntercept
    shared, first, second = Dataset(), Dataset(), Dataset()
    for item, slope in ((shared, 1.0), (second, 10.0)):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, 0, "HU"
        item.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [first, second]
    values = hounsfield_frames(ds, clip=None)
    np.testing.assert_array_equal(values[0], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(values[1], [[50, 60], [70, 80]])


def test_modality_lut_sequence_is_applied(data_store_file: Reader) -> None:
    ds = data_store_file("mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    entries, first_mapped, _ = item.LUTDescriptor
    stored = stored_frames(ds)
    values = modality_frames(ds)
    lut = np.asarray(item.LUTData)
    expected = lut[np.clip(stored.astype(np.int64) - first_mapped, 0, entries - 1)]
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize(
    ("name", "bits", "signed"),
    [
        ("RG3_UNCI.dcm", 10, False),
        ("emri_small.dcm", 12, False),
        ("693_UNCI.dcm", 14, True),
        ("RG1_UNCI.dcm", 15, False),
        ("JPEG2000_UNC.dcm", 16, True),
    ],
)
def test_real_bit_depths_decode_within_bits_stored(
    data_store_file: Reader, name: str, bits: int, signed: bool
) -> None:
    ds = data_store_file(name)
    assert (ds.BitsStored, ds.PixelRepresentation) == (bits, int(signed))
    stored = stored_frames(ds)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert low <= stored.min() and stored.max() <= high
    assert np.issubdtype(stored.dtype, np.signedinteger) == signed


def test_signed_12_bit_sign_extends_and_ignores_high_bits(
    make_dataset: Callable[..., Dataset],
) -> None:
    ds = make_dataset(np.zeros((1, 3), np.int16), bits_stored=12, slope=None, intercept=None)
    # -2048, -1, 2047 in 12-bit two's complement, with junk in the 4 unused high bits.
    ds.PixelData = np.array([0x0800 | 0xA000, 0x0FFF, 0x07FF | 0x5000], "<u2").tobytes()
    np.testing.assert_array_equal(stored_frames(ds)[0, 0], [-2048, -1, 2047])


def test_big_endian_matches_little_endian(pydicom_file: Reader) -> None:
    little = modality_frames(pydicom_file("MR_small.dcm"))
    big = modality_frames(pydicom_file("MR_small_bigendian.dcm"))
    np.testing.assert_array_equal(little, big)


def test_multi_frame_shape(data_store_file: Reader) -> None:
    ds = data_store_file("emri_small.dcm")
    assert frame_count(ds) == 10
    assert modality_frames(ds).shape == (10, 64, 64)


def test_single_frame_with_number_of_frames_one(data_store_file: Reader) -> None:
    ds = data_store_file("JPEG2000_UNC.dcm")  # NM with NumberOfFrames = 1
    assert modality_frames(ds).shape == (1, 1024, 256)


def test_color_is_refused(data_store_file: Reader) -> None:
    with pytest.raises(PixelDataError, match="RGB is not supported"):
        stored_frames(data_store_file("US1_UNCI.dcm"))


def test_monochrome1_is_reported(rg1: Dataset, pydicom_file: Reader) -> None:
    assert is_monochrome1(rg1)
    assert not is_monochrome1(pydicom_file("CT_small.dcm"))
