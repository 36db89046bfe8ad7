"""The DaT classifier's input box, cut from a DaT-SPECT volume (seed 000).

The classifier sees a fixed slab centred on the striatal uptake: 16 transaxial slices
4 mm apart of 64 x 64 pixels of 3 mm, sampled from the volume ``dat_quant.load_volume``
returns. Training (``dicomnode.training.tasks_dat``) and serving (``dat_spect``) cut it
with this one function, so the box cannot differ between them. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

SLAB_SLICES = 16
SLAB_SIZE = 64
SLAB_PIXEL_MM = 3.0
SLAB_SLICE_MM = 4.0


def _blur(volume: FloatArray, sigma: float = 1.0) -> FloatArray:
    """Separable Gaussian blur in voxels (edges padded with zeros)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = volume
    for axis in range(3):
        out = np.apply_along_axis(lambda line: np.convolve(line, taps, mode="same"), axis, out)
    return out


def striatal_centre(volume: NDArray[Any], spacing: Sequence[float] | FloatArray) -> FloatArray:
    """The centre of the striatal uptake in mm along the array axes (z, y, x).

    The striata are the hottest structures of a DaT scan, normal or reduced (a reduced
    putamen still binds more than the background, and the caudate least of all loses
    uptake). The centre is the centroid of the lightly smoothed volume's voxels above
    60 % of its maximum, weighted by how far they exceed it.
    """
    values = np.asarray(volume, dtype=np.float64)
    if values.ndim != 3 or min(values.shape) < 2:
        raise ValueError(f"expected a (z, y, x) volume, got shape {values.shape}")
    smooth = _blur(values)
    peak = float(smooth.max())
    if not peak > 0:
        raise ValueError("the volume has no counts")
    weight = np.clip(smooth - 0.6 * peak, 0.0, None)
    index = np.indices(values.shape, dtype=np.float64)
    centre = (index * weight).reshape(3, -1).sum(axis=1) / weight.sum()
    out: FloatArray = centre * np.asarray(spacing, dtype=np.float64)
    return out


def _trilinear(volume: FloatArray, coords: FloatArray) -> FloatArray:
    """Values at fractional voxel coordinates (3, ...); zero outside the volume."""
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    out = np.zeros(coords.shape[1:], dtype=np.float64)
    shape = np.asarray(volume.shape).reshape(3, *([1] * (coords.ndim - 1)))
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]).reshape(
            3, *([1] * (coords.ndim - 1)))
        index = base + offset
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=0)
        inside = np.all((index >= 0) & (index < shape), axis=0)
        clipped = np.clip(index, 0, shape - 1)
        out += np.where(inside, weight * volume[clipped[0], clipped[1], clipped[2]], 0.0)
    return out


def dat_slab(
    volume: NDArray[Any],
    spacing: Sequence[float],
    *,
    slices: int = SLAB_SLICES,
    size: int = SLAB_SIZE,
    pixel_mm: float = SLAB_PIXEL_MM,
    slice_mm: float = SLAB_SLICE_MM,
) -> NDArray[np.float32]:
    """The model's input box from a canonical DaT volume: (slices, size, size) counts.

    ``volume`` is (z, y, x) with z superior, y posterior, x patient left, and ``spacing``
    its voxel size in mm in the same order (what ``dat_quant.load_volume`` returns).
    The box has ``pixel_mm`` pixels and ``slice_mm`` slices, is centred on
    :func:`striatal_centre`, and is sampled trilinearly; slice 0 is the most inferior.
    """
    values = np.asarray(volume, dtype=np.float64)
    step = np.asarray(spacing, dtype=np.float64)
    if step.shape != (3,) or not (step > 0).all():
        raise ValueError(f"spacing must be three positive numbers, got {list(spacing)}")
    centre = striatal_centre(values, step)
    offsets = [(np.arange(n) - (n - 1) / 2.0) * d
               for n, d in ((slices, slice_mm), (size, pixel_mm), (size, pixel_mm))]
    grid = np.stack(np.meshgrid(*offsets, indexing="ij"))
    coords = (grid + centre.reshape(3, 1, 1, 1)) / step.reshape(3, 1, 1, 1)
    return _trilinear(values, coords).astype(np.float32)
