"""Array transforms on (channels, rows, columns) images: CLAHE, resizing, crops, normalisation.

Each is a plain function of the array and its parameters, so a training loader and the
serving pipeline that call them through the same spec compute the same numbers. All of
them take and return float64 arrays; only `apply_spec` casts to float32 at the very end.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Literal, get_args

import cv2
import numpy as np

from .errors import PixelDataError

Interpolation = Literal["nearest", "linear", "cubic", "area", "lanczos"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)

_CV2_INTERPOLATION: MappingProxyType[str, int] = MappingProxyType(
    {
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
        "cubic": cv2.INTER_CUBIC,
        "area": cv2.INTER_AREA,
        "lanczos": cv2.INTER_LANCZOS4,
    }
)

#: CLAHE runs on 8-bit codes: OpenCV's clip limit is relative to the histogram bin count,
#: so the same clipLimit means something else at 16 bits. 8 bits is also what the
#: reference training pipelines (PNG/JPEG chest X-rays) ran it on.
CLAHE_LEVELS = 256


def as_chw(image: np.ndarray) -> np.ndarray:
    """View a (rows, columns) or (channels, rows, columns) array as the latter."""
    if image.ndim == 2:
        return image[np.newaxis]
    if image.ndim == 3:
        return image
    raise PixelDataError(f"expected a 2-D or (C, H, W) image, got shape {image.shape}")


def quantise_unit(unit: np.ndarray, levels: int = CLAHE_LEVELS) -> np.ndarray:
    """[0, 1] to integer codes 0..levels-1 by rounding (uint8 for 256 levels)."""
    codes = np.rint(np.clip(unit, 0.0, 1.0) * (levels - 1))
    return np.asarray(codes.astype(np.uint8 if levels <= 256 else np.uint16))


def clahe(
    unit: np.ndarray, *, clip_limit: float = 2.0, tile_grid: tuple[int, int] = (8, 8)
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image, per channel.

    Defined on the fixed representation (display intensities quantised to 256 levels),
    so the result depends on the image, not on how its pixels were stored.
    ``tile_grid`` is (rows of tiles, columns of tiles).

    One caveat: a source with fewer grey levels than 256 across its display range (an
    8-bit radiograph stretched by min-max) leaves empty bins between occupied ones, and
    CLAHE clips per bin, so it equalises such an image differently (about 5-8 of 255
    levels on average on a chest CR). Running CLAHE after an "area" downsampling fills
    those gaps and brings 15-, 12- and 8-bit encodings within a grey level of each other.
    """
    image = as_chw(np.asarray(unit, dtype=np.float64))
    operator = cv2.createCLAHE(
        clipLimit=float(clip_limit), tileGridSize=(tile_grid[1], tile_grid[0])
    )
    out = np.empty(image.shape, dtype=np.float64)
    for channel in range(image.shape[0]):
        equalised = operator.apply(quantise_unit(image[channel]))
        out[channel] = equalised.astype(np.float64) / (CLAHE_LEVELS - 1)
    return out if unit.ndim == 3 else out[0]


def _resize_plane(
    plane: np.ndarray, rows: int, columns: int, interpolation: Interpolation
) -> np.ndarray:
    flag = _CV2_INTERPOLATION[interpolation]
    return np.asarray(cv2.resize(plane, (columns, rows), interpolation=flag), dtype=np.float64)


def resize(
    image: np.ndarray,
    size: tuple[int, int],
    *,
    interpolation: Interpolation = "linear",
    keep_aspect: bool = False,
    pad_value: float = 0.0,
) -> np.ndarray:
    """Resize to ``size`` = (rows, columns) with OpenCV's ``interpolation``.

    "linear" is OpenCV's bilinear without antialiasing; for strong downscaling (a 2 k
    radiograph to 384) "area" avoids aliasing. With ``keep_aspect`` the image is scaled to
    fit and centred on a ``pad_value`` background (letterbox), so anatomy is not squashed.
    """
    if interpolation not in INTERPOLATIONS:
        raise PixelDataError(f"interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
    rows, columns = size
    chw = as_chw(np.asarray(image, dtype=np.float64))
    height, width = chw.shape[1:]
    if keep_aspect:
        scale = min(rows / height, columns / width)
        inner = (max(1, round(height * scale)), max(1, round(width * scale)))
    else:
        inner = (rows, columns)
    out = np.full((chw.shape[0], rows, columns), pad_value, dtype=np.float64)
    top = (rows - inner[0]) // 2
    left = (columns - inner[1]) // 2
    for channel in range(chw.shape[0]):
        out[channel, top : top + inner[0], left : left + inner[1]] = _resize_plane(
            chw[channel], inner[0], inner[1], interpolation
        )
    return out if image.ndim == 3 else out[0]


def crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The box [top, top+height) x [left, left+width); it must lie inside the image."""
    chw = as_chw(image)
    rows, columns = chw.shape[1:]
    if top < 0 or left < 0 or top + height > rows or left + width > columns:
        raise PixelDataError(
            f"crop box top={top} left={left} {height}x{width} leaves the {rows}x{columns} image"
        )
    out = chw[:, top : top + height, left : left + width].copy()
    return out if image.ndim == 3 else out[0]


def pad_or_crop(image: np.ndarray, size: tuple[int, int], *, pad_value: float = 0.0) -> np.ndarray:
    """Centre the image on a ``size`` canvas: crop what sticks out, pad what is missing."""
    chw = as_chw(image)
    rows, columns = size
    height, width = chw.shape[1:]
    out = np.full((chw.shape[0], rows, columns), pad_value, dtype=np.float64)
    src_top, dst_top = max(0, (height - rows) // 2), max(0, (rows - height) // 2)
    src_left, dst_left = max(0, (width - columns) // 2), max(0, (columns - width) // 2)
    h, w = min(height, rows), min(width, columns)
    out[:, dst_top : dst_top + h, dst_left : dst_left + w] = chw[
        :, src_top : src_top + h, src_left : src_left + w
    ]
    return out if image.ndim == 3 else out[0]


def zscore(image: np.ndarray, *, per_channel: bool = False, eps: float = 1e-6) -> np.ndarray:
    """Subtract the image's mean and divide by its standard deviation (plus ``eps``).

    Statistics are per image (per channel if asked), never per batch: a served study must
    not be normalised differently depending on what else is in the batch.
    """
    chw = as_chw(np.asarray(image, dtype=np.float64))
    axes = (1, 2) if per_channel else (0, 1, 2)
    mean = chw.mean(axis=axes, keepdims=True)
    std = chw.std(axis=axes, keepdims=True)
    out = np.asarray((chw - mean) / (std + eps))
    return out if image.ndim == 3 else out[0]


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std with fixed values, one per channel or one for all (ImageNet style)."""
    chw = as_chw(np.asarray(image, dtype=np.float64))
    channels = chw.shape[0]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise PixelDataError(
            f"{len(mean)} mean(s) and {len(std)} std(s) for an image with {channels} channel(s)"
        )
    m = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    out = np.asarray((chw - m) / s)
    return out if image.ndim == 3 else out[0]
