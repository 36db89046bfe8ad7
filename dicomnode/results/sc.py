"""Secondary Capture images that explain a result: heatmaps, outlined regions, captions.

Every PACS viewer shows a plain RGB Secondary Capture, whatever it knows about AI, so
the explanation and the "not for diagnostic use" warning are burned into the pixels:
they survive export, screenshots and viewers that hide DICOM attributes. The images
carry no rescale, window or VOI attributes, so a viewer shows the RGB values as they
are instead of re-windowing a rendered picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.results.common import (
    MANUFACTURER,
    SC_CAPTION,
    AlgorithmInfo,
    check_series_description,
    no_person_name_warnings,
    reference_dataset,
    software_versions,
)
from dicomnode.results.uids import derive_uid

__all__ = [
    "CaptionedImage",
    "build_secondary_capture",
    "build_secondary_captures",
    "burn_caption",
    "draw_regions",
    "overlay_heatmap",
    "window_to_uint8",
]

RGBImage = npt.NDArray[np.uint8]
Colour = tuple[int, int, int]

# Attributes that would make a viewer re-map the rendered RGB values.
_DISPLAY_TRANSFORM_KEYWORDS: Final = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
)
# Body Part Examined terms dciodvfy knows as unpaired (no Laterality needed).
_UNPAIRED_BODY_PARTS: Final = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "BRAIN",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CSPINE",
        "HEAD",
        "HEADNECK",
        "HEART",
        "LIVER",
        "LSPINE",
        "NECK",
        "PELVIS",
        "SKULL",
        "TSPINE",
        "WHOLEBODY",
    }
)
_FONT: Final = cv2.FONT_HERSHEY_SIMPLEX
_PALETTE: Final[tuple[Colour, ...]] = (
    (255, 64, 64),
    (64, 255, 64),
    (64, 160, 255),
    (255, 220, 0),
    (255, 0, 255),
    (0, 255, 255),
)
_COLORMAPS: Final = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO}


@dataclass(frozen=True)
class CaptionedImage:
    """One picture of a multi-image SC series, with the caption lines it needs."""

    pixels: RGBImage
    caption_lines: tuple[str, ...] = ()


def window_to_uint8(image: npt.NDArray[Any], window: tuple[float, float] | None = None) -> RGBImage:
    """Map values to 0..255 with a (center, width) window, or by the 1st and 99th
    percentiles when none is given, so outliers do not wash out the anatomy."""
    values = np.asarray(image, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError("expected a 2-D grayscale image")
    if window is None:
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, (1.0, 99.0)) if finite.size else (0.0, 1.0)
    else:
        center, width = window
        if width <= 0:
            raise ValueError("window width must be positive")
        low, high = center - width / 2.0, center + width / 2.0
    span = float(high - low) or 1.0
    scaled = np.clip((np.nan_to_num(values, nan=float(low)) - low) / span, 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def overlay_heatmap(
    gray: npt.NDArray[Any],
    heat: npt.NDArray[Any],
    alpha: float = 0.5,
    *,
    window: tuple[float, float] | None = None,
    colormap: Literal["jet", "turbo"] = "jet",
) -> RGBImage:
    """Colour ``heat`` (0..1, resized to ``gray``) over the windowed grayscale image.

    Opacity grows with the heat value (up to ``alpha``), so regions the model ignored
    stay plain grayscale anatomy rather than being tinted blue.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must lie between 0 and 1")
    base = window_to_uint8(gray, window)
    heat_values = np.asarray(heat, dtype=np.float32)
    if heat_values.ndim != 2:
        raise ValueError("expected a 2-D heat map")
    if heat_values.shape != base.shape:
        resized = cv2.resize(
            heat_values, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_LINEAR
        )
        heat_values = np.asarray(resized, dtype=np.float32)
    heat_values = np.clip(np.nan_to_num(heat_values, nan=0.0), 0.0, 1.0)
    coloured = cv2.applyColorMap(
        np.round(heat_values * 255.0).astype(np.uint8), _COLORMAPS[colormap]
    )
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB).astype(np.float32)
    weight = (alpha * heat_values)[..., np.newaxis]
    grey_rgb = np.repeat(base[..., np.newaxis], 3, axis=2).astype(np.float32)
    blended = grey_rgb * (1.0 - weight) + coloured * weight
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def draw_regions(
    rgb: RGBImage,
    masks: Mapping[str, npt.NDArray[np.bool_]],
    colours: Mapping[str, Colour] | None = None,
    labels: Mapping[str, str] | None = None,
) -> RGBImage:
    """Outline each mask and write its label beside it; returns a new image.

    Outlines rather than filled masks, so the underlying image stays readable; labels
    default to the mask names.
    """
    out = _as_rgb(rgb).copy()
    height, width = out.shape[:2]
    thickness = max(1, round(min(height, width) / 256))
    scale = max(0.4, min(height, width) / 700)
    for index, (name, mask) in enumerate(masks.items()):
        region = np.asarray(mask, dtype=bool)
        if region.shape != (height, width):
            raise ValueError(f"mask {name!r} does not match the image size")
        if not region.any():
            continue
        colour = (colours or {}).get(name, _PALETTE[index % len(_PALETTE)])
        contours, _ = cv2.findContours(
            region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, colour, thickness, cv2.LINE_8)
        text = _ascii((labels or {}).get(name, name))
        rows, cols = np.nonzero(region)
        (_, text_height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        y = int(rows.min()) - baseline - 2
        if y - text_height < 0:
            y = min(height - baseline, int(rows.max()) + text_height + baseline + 2)
        origin = (int(cols.min()), y)
        cv2.putText(out, text, origin, _FONT, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, text, origin, _FONT, scale, colour, thickness, cv2.LINE_AA)
    return out


def burn_caption(rgb: RGBImage, lines: Sequence[str]) -> RGBImage:
    """Add a black band below the image with ``lines`` in white; returns a new image.

    The band is added below instead of drawn over the picture so no anatomy is hidden;
    the font is sized to the image width, and long lines wrap at word boundaries.
    Hershey fonts only have ASCII, so other characters are shown as '?'.
    """
    image = _as_rgb(rgb)
    width = image.shape[1]
    texts = [_ascii(line) for line in lines if line.strip()]
    if not texts:
        return image.copy()
    margin = max(4, width // 64)
    thickness = max(1, width // 600)
    reference_width = cv2.getTextSize(SC_CAPTION, _FONT, 1.0, thickness)[0][0]
    scale = min(1.6, 0.95 * (width - 2 * margin) / reference_width)
    wrapped = [part for text in texts for part in _wrap(text, scale, thickness, width - 2 * margin)]
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_height = text_height + baseline + max(2, text_height // 2)
    band = np.zeros((line_height * len(wrapped) + margin, width, 3), dtype=np.uint8)
    for number, text in enumerate(wrapped):
        y = margin // 2 + line_height * number + text_height + max(1, text_height // 4)
        cv2.putText(band, text, (margin, y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return np.concatenate([image, band], axis=0)


def build_secondary_capture(
    sources: Sequence[Dataset],
    pixels: npt.NDArray[np.uint8],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_description: str,
    series_number: int = 901,
    instance_number: int = 1,
    caption_lines: Sequence[str] = (),
    patient_orientation: tuple[str, str] | None = None,
    laterality: str | None = None,
    min_width: int = 512,
) -> Dataset:
    """Build one RGB Secondary Capture in the sources' study, caption burned in.

    ``pixels`` is the picture to show (RGB or grayscale uint8), e.g. from
    ``overlay_heatmap`` and ``draw_regions``; images narrower than ``min_width`` are
    enlarged (nearest neighbour) so the caption stays legible. The first caption line is
    always the AI / not-for-diagnostic-use warning. ``patient_orientation`` is left
    empty unless given, since a rendered picture may be cropped or rotated.
    ``laterality`` (Image Laterality: R, L, B or U) is needed for a paired body part
    when the source does not say it.

    Example::

        rgb = draw_regions(overlay_heatmap(slice_hu, cam, window=(40, 400)), {"lesion": m})
        sc = build_secondary_capture(
            [source_slice], rgb, AlgorithmInfo("nodule-net", "2.0.1", sha256),
            series_instance_uid=uids.series_instance_uid,
            sop_instance_uid=uids.sop_instance_uid,
            series_description="AI nodule heatmap",
            caption_lines=["nodule-net 2.0.1: probability 87 %"],
        )
    """
    reference = reference_dataset(sources)
    check_series_description(series_description)
    image = _enlarge(_as_rgb(pixels), min_width)
    image = burn_caption(image, [SC_CAPTION, *caption_lines])
    if max(image.shape[:2]) > 65535:
        raise ValueError("image is too large for a Secondary Capture")

    with no_person_name_warnings():
        sc = hd.sc.SCImage(
            pixel_array=image,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(reference.StudyInstanceUID),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            patient_id=reference.get("PatientID"),
            patient_name=reference.get("PatientName"),
            patient_birth_date=reference.get("PatientBirthDate"),
            patient_sex=reference.get("PatientSex"),
            accession_number=reference.get("AccessionNumber"),
            study_id=reference.get("StudyID"),
            study_date=reference.get("StudyDate"),
            study_time=reference.get("StudyTime"),
            referring_physician_name=reference.get("ReferringPhysicianName"),
            patient_orientation=patient_orientation or ("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description,
            manufacturer_model_name=algorithm.name,
            content_qualification="RESEARCH",
            specific_character_set=reference.get("SpecificCharacterSet"),
        )
        sc.copy_patient_and_study_information(reference)
    if patient_orientation is None:
        sc["PatientOrientation"].value = None
    sc.add_new("SoftwareVersions", "LO", list(software_versions(algorithm)))
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "00"
    sc.DerivationDescription = f"{SC_CAPTION}. Rendered by {algorithm.label}."[:1024]
    sc.ImageComments = f"{SC_CAPTION} ({algorithm.label})"
    sc.SourceImageSequence = [_reference(ds) for ds in sources]
    _set_laterality(sc, reference, laterality)
    for keyword in _DISPLAY_TRANSFORM_KEYWORDS:
        if keyword in sc:
            delattr(sc, keyword)
    return sc


def build_secondary_captures(
    sources: Sequence[Dataset],
    images: Sequence[CaptionedImage],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    series_description: str,
    series_number: int = 901,
    min_width: int = 512,
) -> list[Dataset]:
    """One SC series of several pictures, numbered 1..n in the given order.

    Each SOP Instance UID is derived from the series UID and the position, so a re-run
    with the same series UID replaces each picture instead of adding copies.
    """
    if not images:
        raise ValueError("an SC series needs at least one image")
    return [
        build_secondary_capture(
            sources,
            image.pixels,
            algorithm,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=derive_uid("instance", series_instance_uid, number),
            series_description=series_description,
            series_number=series_number,
            instance_number=number,
            caption_lines=image.caption_lines,
            min_width=min_width,
        )
        for number, image in enumerate(images, start=1)
    ]


def _as_rgb(pixels: npt.NDArray[Any]) -> RGBImage:
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError("expected 8-bit pixels (uint8); window the image first")
    if array.ndim == 2:
        array = np.repeat(array[..., np.newaxis], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError("expected an RGB (rows, columns, 3) or grayscale (rows, columns) image")
    return np.ascontiguousarray(array)


def _enlarge(image: RGBImage, min_width: int) -> RGBImage:
    width = image.shape[1]
    if width >= min_width:
        return image
    factor = math.ceil(min_width / width)
    resized = cv2.resize(
        image, (width * factor, image.shape[0] * factor), interpolation=cv2.INTER_NEAREST
    )
    return np.asarray(resized, dtype=np.uint8)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _wrap(text: str, scale: float, thickness: int, max_width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and cv2.getTextSize(candidate, _FONT, scale, thickness)[0][0] > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _set_laterality(sc: Dataset, reference: Dataset, laterality: str | None) -> None:
    """Carry over the body part and its side, as the General Series rules need them.

    Laterality must be present for a paired (or unrecognised) body part unless Image
    Laterality says the side; when nothing tells the side it is left empty, which DICOM
    reserves for "unknown" (dciodvfy warns about it; guessing a side would be worse).
    """
    if laterality is not None:
        if laterality not in ("R", "L", "B", "U"):
            raise ValueError("laterality must be one of R, L, B, U")
        sc.ImageLaterality = laterality
    elif reference.get("ImageLaterality"):
        sc.ImageLaterality = reference.ImageLaterality
    body_part = str(reference.get("BodyPartExamined") or "")
    if body_part:
        sc.BodyPartExamined = body_part
    if reference.get("Laterality") in ("R", "L"):
        sc.Laterality = reference.Laterality
    elif "ImageLaterality" not in sc and body_part.upper() not in _UNPAIRED_BODY_PARTS:
        sc.Laterality = None


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item
