"""Pixel values out of pydicom datasets, frame by frame, in the units the modality defines.

Everything downstream (windows, CLAHE, models) is defined on *modality values* (HU for CT),
never on stored values: stored values depend on how a vendor chose to encode the image
(bit depth, signedness, rescale), and a model must not. pydicom already decodes every
supported transfer syntax, masks to Bits Stored and sign-extends by Pixel Representation;
this module adds what it leaves to the caller: one (frames, rows, columns) shape for single
and multi-frame objects, and the modality LUT taken per frame from the functional groups of
enhanced objects.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from .errors import PixelDataError

MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})

#: The HU range a CT can express with the usual 12-bit encoding. Values outside are
#: padding (outside the scan field) or metal streak extremes; clipping them keeps a few
#: sentinel pixels (-2000, -3024) from dominating per-image statistics such as z-scores.
CT_HU_RANGE: tuple[float, float] = (-1024.0, 3071.0)


def frame_count(ds: Dataset) -> int:
    """Number of frames; a missing or empty NumberOfFrames means one."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    count = int(value)
    if count < 1:
        raise PixelDataError(f"NumberOfFrames is {count}")
    return count


def is_monochrome1(ds: Dataset) -> bool:
    """True where the minimum value is meant to be displayed white (PS3.3 C.7.6.3.1.2)."""
    return str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"


def frame_item(ds: Dataset, frame: int, sequence_keyword: str) -> Dataset | None:
    """The functional group macro item that applies to ``frame``, per-frame before shared.

    Enhanced objects (Enhanced CT/MR/XA, Segmentation, ...) move attributes such as the
    rescale or the plane position into these groups, and a per-frame item overrides the
    shared one (PS3.3 C.7.6.16).
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        item = per_frame[frame].get(sequence_keyword)
        if item:
            found: Dataset = item[0]
            return found
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        item = shared[0].get(sequence_keyword)
        if item:
            shared_item: Dataset = item[0]
            return shared_item
    return None


def _require_monochrome(ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME:
        raise PixelDataError(
            f"PhotometricInterpretation {photometric or '(missing)'} is not supported; "
            "only MONOCHROME1 and MONOCHROME2 images can be preprocessed"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PixelDataError(f"SamplesPerPixel is {ds.SamplesPerPixel}; expected 1")


def stored_frames(ds: Dataset) -> np.ndarray:
    """Decoded stored values as (frames, rows, columns), in pydicom's native dtype."""
    _require_monochrome(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PixelDataError("the dataset has no pixel data")
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types for undecodable data
        raise PixelDataError(f"pixel data cannot be decoded: {exc}") from exc
    frames = frame_count(ds)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.shape[0] != frames:
        raise PixelDataError(
            f"decoded pixel data has shape {arr.shape}; expected {frames} frame(s) of "
            f"{ds.get('Rows')}x{ds.get('Columns')}"
        )
    return arr


def _rescale_source(ds: Dataset, frame: int) -> Dataset:
    item = frame_item(ds, frame, "PixelValueTransformationSequence")
    return item if item is not None and "RescaleSlope" in item else ds


def _frame_modality(frame_values: np.ndarray, source: Dataset, ds: Dataset) -> np.ndarray:
    if "RescaleSlope" in source and "RescaleIntercept" in source:
        slope = float(source.RescaleSlope)
        intercept = float(source.RescaleIntercept)
        return frame_values.astype(np.float64) * slope + intercept
    if ds.get("ModalityLUTSequence"):
        if not np.issubdtype(frame_values.dtype, np.integer):
            raise PixelDataError("a Modality LUT Sequence cannot index float pixel data")
        return np.asarray(apply_modality_lut(frame_values, ds), dtype=np.float64)
    return frame_values.astype(np.float64)


def modality_frames(ds: Dataset) -> np.ndarray:
    """Modality values (float64, frames x rows x columns): the rescale or Modality LUT applied.

    The rescale is looked up per frame (Pixel Value Transformation functional group) and
    falls back to the top-level Rescale Slope/Intercept, then the Modality LUT Sequence.
    """
    stored = stored_frames(ds)
    per_frame = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not per_frame:
        return _frame_modality(stored, ds, ds)
    out = np.empty(stored.shape, dtype=np.float64)
    for index in range(stored.shape[0]):
        out[index] = _frame_modality(stored[index], _rescale_source(ds, index), ds)
    return out


def _rescale_types(ds: Dataset) -> list[str | None]:
    types: list[str | None] = []
    for index in range(frame_count(ds)):
        source = _rescale_source(ds, index)
        if "RescaleSlope" in source and "RescaleIntercept" in source:
            value = source.get("RescaleType")
            types.append(str(value).strip().upper() if value else None)
        elif ds.get("ModalityLUTSequence"):
            value = ds.ModalityLUTSequence[0].get("ModalityLUTType")
            types.append(str(value).strip().upper() if value else None)
        else:
            types.append("NONE")
    return types


def hounsfield_frames(ds: Dataset, *, clip: tuple[float, float] | None = CT_HU_RANGE) -> np.ndarray:
    """CT values in Hounsfield units, refusing images whose values are not HU.

    A CT without a rescale (stripped by an anonymiser) or whose rescale is declared as
    something else (RescaleType "US" on derived perfusion maps) would silently feed a model
    numbers on the wrong scale; that is refused here so a pipeline can say why.
    """
    modality = str(ds.get("Modality", "")).strip()
    if modality != "CT":
        raise PixelDataError(f"Hounsfield units need a CT image; Modality is {modality or '?'}")
    for rescale_type in set(_rescale_types(ds)):
        if rescale_type == "NONE":
            raise PixelDataError(
                "CT image has no RescaleSlope/RescaleIntercept; its values are not HU"
            )
        if rescale_type not in (None, "HU"):
            raise PixelDataError(f"CT values are declared as {rescale_type}, not HU")
    values = modality_frames(ds)
    if clip is not None:
        low, high = clip
        if not low < high:
            raise PixelDataError(f"HU clip range {clip} is empty")
        np.clip(values, low, high, out=values)
    return values
