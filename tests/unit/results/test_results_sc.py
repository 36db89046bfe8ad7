"""Secondary Capture images built on pydicom's real files, checked with dciodvfy and
rendered with dcmj2pnm as a viewer would."""

from __future__ import annotations

import io

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.results.common import SC_CAPTION, AlgorithmInfo
from dicomnode.results.sc import (
    CaptionedImage,
    build_secondary_capture,
    build_secondary_captures,
    burn_caption,
    draw_regions,
    overlay_heatmap,
    window_to_uint8,
)
from dicomnode.results.uids import derive_uid
from dicomnode.results.validate import dciodvfy_report, render_sc_png
from tests.peers import PYDICOM_DATA, PYDICOM_FILES, require_tool

ALGORITHM = AlgorithmInfo("nodule-net", "2.0.1", "ab" * 32)
DISPLAY_TRANSFORMS = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
)
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


@pytest.fixture(scope="module")
def ct() -> Dataset:
    return pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")


def heatmap_picture(ct: Dataset) -> npt.NDArray[np.uint8]:
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    heat = np.exp(-((yy - 60.0) ** 2 + (xx - 70.0) ** 2) / 300.0)
    rgb = overlay_heatmap(hu, heat, 0.6, window=(40.0, 400.0))
    return draw_regions(rgb, {"lesion": heat > 0.5}, labels={"lesion": "Lesion 87 %"})


def build(source: Dataset, picture: npt.NDArray[np.uint8], **kwargs: object) -> Dataset:
    series = derive_uid(
        str(source.StudyInstanceUID),
        [str(source.SOPInstanceUID)],
        ALGORITHM.name,
        ALGORITHM.version,
        "sc",
    )
    return build_secondary_capture(
        [source],
        picture,
        ALGORITHM,
        series_instance_uid=series,
        sop_instance_uid=derive_uid(series, 1),
        series_description="AI nodule heatmap",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "path",
    [
        PYDICOM_FILES / "CT_small.dcm",
        PYDICOM_FILES / "MR_small.dcm",
        PYDICOM_DATA / "JPEG2000_UNC.dcm",
        PYDICOM_DATA / "RG1_UNCI.dcm",
    ],
    ids=lambda p: p.name,
)
def test_sc_has_no_dciodvfy_errors(path: object, ct: Dataset) -> None:
    require_tool("dciodvfy")
    source = pydicom.dcmread(path, stop_before_pixels=True)  # type: ignore[arg-type]
    report = dciodvfy_report(build(source, heatmap_picture(ct), caption_lines=["p = 0.87"]))
    assert report.errors == []


def test_sc_renders_to_a_png_of_its_size(ct: Dataset) -> None:
    require_tool("dcmj2pnm")
    sc = build(ct, heatmap_picture(ct))
    png = cv2.imdecode(np.frombuffer(render_sc_png(sc), np.uint8), cv2.IMREAD_UNCHANGED)
    assert png is not None
    assert png.shape == (sc.Rows, sc.Columns, 3)
    # The rendered caption band matches the stored pixels: nothing re-windowed them.
    stored = sc.pixel_array
    assert np.array_equal(cv2.cvtColor(png, cv2.COLOR_BGR2RGB), stored)


def test_sc_is_plain_rgb_with_burned_in_annotation(ct: Dataset) -> None:
    sc = build(ct, heatmap_picture(ct))
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription.startswith("AI ")
    assert sc.Manufacturer == "dicomnode"
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    for keyword in DISPLAY_TRANSFORMS:
        assert keyword not in sc, keyword
    for keyword in PATIENT_AND_STUDY:
        if keyword in ct:
            assert sc.get(keyword) == ct.get(keyword), keyword
    assert sc.SeriesInstanceUID != ct.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert "not for diagnostic use" in sc.ImageComments


def test_caption_is_burned_below_the_picture(ct: Dataset) -> None:
    picture = heatmap_picture(ct)
    sc = build(ct, picture, caption_lines=["nodule-net 2.0.1: probability 87 %"])
    pixels = sc.pixel_array
    factor = sc.Columns // picture.shape[1]
    enlarged = np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)
    assert sc.Columns >= 512
    assert np.array_equal(pixels[: enlarged.shape[0]], enlarged)
    band = pixels[enlarged.shape[0] :]
    assert band.shape[0] > 0
    assert (band == 255).all(axis=2).sum() > 200  # white text on black


def test_burn_caption_wraps_long_lines_and_keeps_the_image() -> None:
    image = np.full((100, 300, 3), 80, np.uint8)
    short = burn_caption(image, [SC_CAPTION])
    long = burn_caption(image, [SC_CAPTION, "word " * 40, "ünïcode"])
    assert np.array_equal(short[:100], image)
    assert long.shape[0] > short.shape[0] + 2 * (short.shape[0] - 100)
    assert long.shape[1] == 300
    assert burn_caption(image, []).shape == image.shape


def test_multi_image_series_is_numbered_and_deterministic(ct: Dataset) -> None:
    picture = heatmap_picture(ct)
    images = [CaptionedImage(picture, (f"slice {n}",)) for n in (1, 2, 3)]

    def series() -> list[Dataset]:
        return build_secondary_captures(
            [ct],
            images,
            ALGORITHM,
            series_instance_uid=derive_uid("sc series"),
            series_description="AI nodule heatmaps",
        )

    first, again = series(), series()
    assert [ds.InstanceNumber for ds in first] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in first}) == 1
    assert len({ds.SOPInstanceUID for ds in first}) == 3
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]


def test_overlay_keeps_anatomy_where_there_is_no_heat() -> None:
    gray = np.tile(np.linspace(0.0, 1000.0, 64), (64, 1))
    heat = np.zeros((32, 32))
    heat[8:16, 8:16] = 1.0  # resized to the image: hot square near the top left
    out = overlay_heatmap(gray, heat, alpha=1.0, window=(500.0, 1000.0))
    assert out.shape == (64, 64, 3)
    assert out.dtype == np.uint8
    cold = out[48:, 48:]
    assert np.array_equal(cold[..., 0], cold[..., 1])
    assert np.array_equal(cold[..., 0], window_to_uint8(gray, (500.0, 1000.0))[48:, 48:])
    hot = out[20:28, 20:28].reshape(-1, 3).astype(int)
    assert (hot[:, 0] > hot[:, 2] + 60).all()  # jet's top is red


def test_window_to_uint8_uses_the_window_or_robust_percentiles() -> None:
    values = np.array([[-1000.0, 40.0, 240.0, 3000.0]])
    assert window_to_uint8(values, (40.0, 400.0)).tolist() == [[0, 128, 255, 255]]
    auto = window_to_uint8(np.arange(10000.0).reshape(100, 100))
    assert auto.min() == 0 and auto.max() == 255


def test_draw_regions_outlines_in_the_given_colour() -> None:
    rgb = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[40:60, 40:60] = True
    out = draw_regions(rgb, {"striatum": mask}, colours={"striatum": (0, 255, 0)})
    assert not rgb.any()  # input untouched
    assert tuple(out[40, 50]) == (0, 255, 0)
    assert tuple(out[50, 50]) == (0, 0, 0)  # outline, not fill
    with pytest.raises(ValueError, match="does not match"):
        draw_regions(rgb, {"x": np.zeros((10, 10), bool)})


def test_builder_rejects_unsuitable_pixels(ct: Dataset) -> None:
    with pytest.raises(ValueError, match="8-bit"):
        build(ct, np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        build(ct, np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="AI "):
        build_secondary_capture(
            [ct],
            np.zeros((8, 8, 3), np.uint8),
            ALGORITHM,
            series_instance_uid=derive_uid("s"),
            sop_instance_uid=derive_uid("i"),
            series_description="heatmap",
        )


def test_side_and_body_part_follow_the_source() -> None:
    chest = pydicom.dcmread(PYDICOM_DATA / "RG1_UNCI.dcm", stop_before_pixels=True)
    sc = build(chest, np.zeros((64, 64, 3), np.uint8))
    assert sc.BodyPartExamined == "CHEST"
    assert "Laterality" not in sc
    mr = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm", stop_before_pixels=True)
    unknown = build(mr, np.zeros((64, 64, 3), np.uint8))
    assert unknown.Laterality is None or unknown.Laterality == ""
    stated = build(mr, np.zeros((64, 64, 3), np.uint8), laterality="L")
    assert stated.ImageLaterality == "L"
    assert "Laterality" not in stated


def test_round_trip_through_bytes_keeps_the_pixels(ct: Dataset) -> None:
    sc = build(ct, heatmap_picture(ct))
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    back = pydicom.dcmread(buffer)
    assert np.array_equal(back.pixel_array, sc.pixel_array)
    assert back.SOPInstanceUID == sc.SOPInstanceUID
