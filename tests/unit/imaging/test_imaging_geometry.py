"""Slice order, spacing checks, orientation checks, volumes and resampling."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset

from dicomnode.imaging import (
    SeriesGeometryError,
    SliceOrderWarning,
    assemble_volume,
    check_spacing,
    frame_planes,
    hounsfield_frames,
    plane_of,
    require_plane,
    resample,
    resample_isotropic,
    series_plane,
    sort_datasets,
    sort_slices,
)

SeriesMaker = Callable[..., list[Dataset]]
Reader = Callable[[str], Dataset]

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
AXIAL_FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal points to the feet
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
TILT = math.radians(20)
TILTED = (1.0, 0.0, 0.0, 0.0, math.cos(TILT), math.sin(TILT))


def _shuffled(series: list[Dataset], seed: int = 7) -> list[Dataset]:
    out = list(series)
    random.Random(seed).shuffle(out)
    return out


def _instance_numbers(datasets: list[Dataset]) -> list[int]:
    return [int(ds.InstanceNumber) for ds in datasets]


@pytest.mark.parametrize("orientation", [AXIAL, AXIAL_FLIPPED, CORONAL, SAGITTAL, TILTED])
def test_shuffled_slices_come_back_in_position_order(
    make_series: SeriesMaker, orientation: tuple[float, ...]
) -> None:
    series = make_series(7, orientation=orientation)
    order = sort_slices(_shuffled(series))
    assert order.method == "position"
    assert order.positions is not None
    assert list(order.positions) == sorted(order.positions)
    assert _instance_numbers(sort_datasets(_shuffled(series))) == list(range(1, 8))


def test_position_beats_instance_number(make_series: SeriesMaker) -> None:
    # Instance numbers run against the normal (e.g. acquired feet-first).
    series = make_series(5, spacing=-3.0)
    assert _instance_numbers(sort_datasets(_shuffled(series))) == [5, 4, 3, 2, 1]


def test_missing_positions_fall_back_to_instance_number_with_a_warning(
    make_series: SeriesMaker,
) -> None:
    series = make_series(5, spacing=-3.0)
    del series[2].ImagePositionPatient
    with pytest.warns(SliceOrderWarning, match="1 of 5 slices"):
        order = sort_slices(_shuffled(series))
    assert order.method == "instance_number" and order.positions is None
    assert [p.instance_number for p in order.planes] == [1, 2, 3, 4, 5]
    with pytest.warns(SliceOrderWarning), pytest.raises(SeriesGeometryError, match="needs"):
        assemble_volume(series)


def test_missing_positions_and_instance_numbers_is_an_error(make_series: SeriesMaker) -> None:
    series = make_series(3)
    del series[0].ImagePositionPatient, series[1].InstanceNumber
    with pytest.raises(SeriesGeometryError, match="cannot order"):
        sort_slices(series)


def test_mixed_orientations_are_not_one_stack(make_series: SeriesMaker) -> None:
    series = make_series(3) + make_series(3, orientation=CORONAL)
    with pytest.raises(SeriesGeometryError, match="different ImageOrientationPatient"):
        sort_slices(series)


def test_spacing_detects_a_gap(make_series: SeriesMaker) -> None:
    order = sort_slices(_shuffled(make_series(8, spacing=2.5, skip=(4,))))
    report = check_spacing(order)
    assert report.spacing == pytest.approx(2.5)
    assert report.gaps == (3,)
    assert not report.uniform
    assert report.problems() == (
        "1 gap(s) in the slice positions (widest 5.00 mm, expected 2.50 mm)",
    )


def test_spacing_detects_duplicates_and_irregular_steps() -> None:
    report = check_spacing([0.0, 2.5, 2.5, 5.0, 6.0, 8.5, 11.0, 16.0])
    assert report.spacing == 2.5
    assert report.duplicates == (1,)
    assert report.irregular == (3,)
    assert report.gaps == (6,)
    assert check_spacing([0.0, 2.5001, 4.9999, 7.5]).uniform


def test_spacing_tolerates_float_jitter() -> None:
    positions = [k * 1.25 + (1e-4 if k % 2 else -1e-4) for k in range(20)]
    assert check_spacing(positions).uniform


def _assert_volume_matches_headers(volume: sitk.Image, ordered: list[Dataset]) -> None:
    array = sitk.GetArrayFromImage(volume)
    for k, ds in enumerate(ordered):
        physical = volume.TransformIndexToPhysicalPoint((0, 0, k))
        np.testing.assert_allclose(physical, [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
        np.testing.assert_array_equal(array[k], hounsfield_frames(ds, clip=None)[0])
        # Column 1, row 0 lies one column spacing along the row direction.
        step = np.asarray(volume.TransformIndexToPhysicalPoint((1, 0, k))) - physical
        expected = float(ds.PixelSpacing[1]) * np.asarray(ds.ImageOrientationPatient[:3], float)
        np.testing.assert_allclose(step, expected, atol=1e-6)


@pytest.mark.parametrize("orientation", [AXIAL, AXIAL_FLIPPED, CORONAL, TILTED])
def test_volume_geometry_follows_the_headers(
    make_series: SeriesMaker, orientation: tuple[float, ...]
) -> None:
    series = make_series(6, orientation=orientation, spacing=2.5, pixel_spacing=(0.8, 0.6))
    volume = assemble_volume(_shuffled(series))
    assert volume.GetSize() == (5, 4, 6)
    assert volume.GetSpacing() == pytest.approx((0.6, 0.8, 2.5))
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    assert np.linalg.det(direction) == pytest.approx(1.0)
    _assert_volume_matches_headers(volume, sort_datasets(series))


def test_reversed_orientation_puts_the_origin_at_the_other_end(make_series: SeriesMaker) -> None:
    series = make_series(4, orientation=AXIAL_FLIPPED, origin=(0.0, 0.0, 0.0), spacing=2.0)
    volume = assemble_volume(_shuffled(series))
    np.testing.assert_allclose(np.asarray(volume.GetDirection()).reshape(3, 3)[:, 2], [0, 0, -1])
    assert volume.GetOrigin() == pytest.approx((0.0, 0.0, 0.0))
    assert volume.TransformIndexToPhysicalPoint((0, 0, 3))[2] == pytest.approx(-6.0)


def test_volume_refuses_gaps_unless_allowed(make_series: SeriesMaker) -> None:
    series = make_series(6, skip=(2,))
    with pytest.raises(SeriesGeometryError, match="gap"):
        assemble_volume(series)
    assert assemble_volume(series, allow_irregular=True).GetSize()[2] == 5


def test_volume_refuses_duplicates(make_series: SeriesMaker) -> None:
    series = make_series(4)
    with pytest.raises(SeriesGeometryError, match="duplicate"):
        assemble_volume([*series, series[1]], allow_irregular=True)


def test_volume_refuses_a_sheared_stack(make_series: SeriesMaker) -> None:
    series = make_series(4)
    for k, ds in enumerate(series):  # origins drift sideways, as with gantry tilt
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 1.5 * k, z]
    with pytest.raises(SeriesGeometryError, match="drift"):
        assemble_volume(series)


def test_single_real_slice_volume(pydicom_file: Reader) -> None:
    ds = pydicom_file("CT_small.dcm")
    volume = assemble_volume([ds], values=hounsfield_frames)
    assert volume.GetSize() == (128, 128, 1)
    assert volume.GetSpacing() == pytest.approx((0.661468, 0.661468, 5.0))
    assert volume.GetOrigin() == pytest.approx((-158.135803, -179.035797, -75.699997))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), hounsfield_frames(ds))


def test_enhanced_frames_are_placed_from_functional_groups(data_store_file: Reader) -> None:
    ds = data_store_file("eCT_Supplemental.dcm")
    planes = frame_planes([ds])
    assert [p.frame_index for p in planes] == [0, 1]
    assert all(p.orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0) for p in planes)
    assert all(p.pixel_spacing == (0.388672, 0.388672) for p in planes)
    order = sort_slices([ds])
    assert order.method == "position"
    assert order.positions is not None and order.positions[0] < order.positions[1]


def test_isotropic_resampling_keeps_the_extent(make_series: SeriesMaker) -> None:
    volume = assemble_volume(make_series(6, spacing=2.4, pixel_spacing=(0.8, 0.6), shape=(8, 12)))
    iso = resample_isotropic(volume)
    assert iso.GetSpacing() == pytest.approx((0.6, 0.6, 0.6))
    assert iso.GetSize() == (12, 11, 24)

    def first_edge(image: Any) -> np.ndarray:
        return np.asarray(image.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))

    np.testing.assert_allclose(first_edge(iso), first_edge(volume), atol=1e-6)
    # Slice k (centre at 2.4 k mm) holds 10 k HU; iso slice 9 lies at 0.6 * 9 - 0.9 = 4.5 mm.
    array = sitk.GetArrayFromImage(iso)
    assert array[9, 5, 5] == pytest.approx(10 + (4.5 - 2.4) / 2.4 * 10, abs=1e-3)
    coarse = resample(volume, (1.2, 1.6, 4.8), interpolation="nearest")
    assert coarse.GetSize() == (6, 4, 3)


def test_resample_rejects_bad_spacing(make_series: SeriesMaker) -> None:
    with pytest.raises(SeriesGeometryError, match="positive spacing"):
        resample(assemble_volume(make_series(3)), (1.0, 0.0, 1.0))


@pytest.mark.parametrize(
    ("orientation", "plane"),
    [(AXIAL, "axial"), (AXIAL_FLIPPED, "axial"), (CORONAL, "coronal"), (SAGITTAL, "sagittal")],
)
def test_plane_of(orientation: tuple[float, ...], plane: str) -> None:
    assert plane_of(orientation) == plane


def test_oblique_planes_depend_on_the_tolerance(
    pydicom_file: Reader, data_store_file: Reader
) -> None:
    tilted_head_ct = pydicom_file("J2K_pixelrep_mismatch.dcm")  # ~22 degree gantry tilt
    assert series_plane([tilted_head_ct]) == "axial"
    assert series_plane([tilted_head_ct], tolerance_deg=10) == "oblique"
    oblique_mr = data_store_file("MR2_UNCI.dcm")  # normal ~35 degrees off the x axis
    assert series_plane([oblique_mr]) == "oblique"
    assert series_plane([oblique_mr], tolerance_deg=40) == "sagittal"
    assert plane_of((1, 0, 0, 0, math.sqrt(0.5), math.sqrt(0.5))) == "oblique"


def test_require_plane_says_what_the_series_is(make_series: SeriesMaker) -> None:
    require_plane(make_series(3), "axial")
    with pytest.raises(
        SeriesGeometryError, match="the series is coronal; this analysis needs axial"
    ):
        require_plane(make_series(3, orientation=CORONAL), "axial")


def test_orientation_missing_is_an_error(data_store_file: Reader) -> None:
    with pytest.raises(SeriesGeometryError, match="orientation unknown"):
        series_plane([data_store_file("RG1_UNCI.dcm")])
