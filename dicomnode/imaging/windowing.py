"""From modality values to display intensities in [0, 1], where higher is always brighter.

[0, 1] is the one fixed representation the rest of the package builds on (CLAHE, image
statistics, secondary captures): it no longer says anything about bit depth, signedness
or MONOCHROME1, so two encodings of the same image reach it with the same numbers.
MONOCHROME1 is inverted *after* the VOI transform, as in the DICOM display pipeline
(PS3.4 N.2), so a dataset's own window keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_voi

from .errors import PixelDataError
from .pixels import frame_item

VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]
VOI_FUNCTIONS: tuple[str, ...] = get_args(VoiFunction)


@dataclass(frozen=True)
class Window:
    """A VOI window on modality values (HU for CT).

    ``LINEAR_EXACT`` (the default for windows written in a spec) maps
    [center - width/2, center + width/2] linearly onto [0, 1], the formula most training
    code uses (clip, then scale). ``LINEAR`` is the DICOM default with its half-unit
    offsets (PS3.3 C.11.2.1.2.1) and is used for windows read from a dataset that does not
    say otherwise; ``SIGMOID`` follows PS3.3 C.11.2.1.3.1.
    """

    center: float
    width: float
    function: VoiFunction = "LINEAR_EXACT"

    def __post_init__(self) -> None:
        if self.function not in VOI_FUNCTIONS:
            raise ValueError(f"VOI function {self.function!r} is not one of {VOI_FUNCTIONS}")
        if not (np.isfinite(self.center) and np.isfinite(self.width)):
            raise ValueError("window center and width must be finite")
        minimum = 1.0 if self.function == "LINEAR" else 0.0
        if self.width < minimum or (minimum == 0.0 and self.width == 0.0):
            raise ValueError(
                f"window width must be {'>= 1' if minimum else '> 0'} for {self.function}, "
                f"got {self.width}"
            )

    @property
    def lower(self) -> float:
        return self.center - self.width / 2.0

    @property
    def upper(self) -> float:
        return self.center + self.width / 2.0

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Display intensities in [0, 1] (float64) for ``values`` in modality units."""
        x = np.asarray(values, dtype=np.float64)
        if self.function == "LINEAR_EXACT":
            return np.clip((x - self.center) / self.width + 0.5, 0.0, 1.0)
        if self.function == "LINEAR":
            if self.width == 1.0:
                return np.where(x > self.center - 0.5, 1.0, 0.0)
            return np.clip((x - (self.center - 0.5)) / (self.width - 1.0) + 0.5, 0.0, 1.0)
        # 1 / (1 + exp(-4 (x - c) / w)), written with tanh so extreme values cannot overflow.
        return np.asarray(0.5 * (1.0 + np.tanh(2.0 * (x - self.center) / self.width)))


#: Named windows in HU. Values as commonly taught for CT reading.
WINDOW_PRESETS: MappingProxyType[str, Window] = MappingProxyType(
    {
        "brain": Window(40.0, 80.0),
        "subdural": Window(80.0, 200.0),
        "bone": Window(600.0, 2800.0),
        "lung": Window(-600.0, 1500.0),
        "soft_tissue": Window(40.0, 400.0),
    }
)


def window_preset(name: str) -> Window:
    """The named preset; the error lists the known names."""
    try:
        return WINDOW_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(WINDOW_PRESETS))
        raise PixelDataError(f"unknown window preset {name!r}; known: {known}") from None


def _pick(value: object, index: int) -> float:
    items: list[Any] = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if index >= len(items):
        raise PixelDataError(f"window index {index} but only {len(items)} window(s)")
    return float(items[index])


def dataset_window(ds: Dataset, frame: int = 0, index: int = 0) -> Window | None:
    """The dataset's own window for ``frame`` (Frame VOI LUT group first), or None."""
    source: Dataset | None = frame_item(ds, frame, "FrameVOILUTSequence")
    if source is None or "WindowCenter" not in source:
        source = ds
    if "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
        raise PixelDataError(f"VOILUTFunction {function} is not supported")
    try:
        return Window(
            _pick(source.WindowCenter, index),
            _pick(source.WindowWidth, index),
            cast(VoiFunction, function),
        )
    except ValueError as exc:
        raise PixelDataError(f"the dataset's window is invalid: {exc}") from exc


def voi_lut_sequence_unit(values: np.ndarray, ds: Dataset, index: int = 0) -> np.ndarray:
    """Apply the dataset's VOI LUT Sequence item ``index``; output scaled to [0, 1].

    The LUT is indexed by modality values, so these are rounded to integers first. The
    output range is the one the LUT Descriptor declares (2**bits - 1).
    """
    sequence = ds.get("VOILUTSequence")
    if not sequence or index >= len(sequence):
        raise PixelDataError(f"the dataset has no VOI LUT Sequence item {index}")
    bits = int(sequence[index].LUTDescriptor[2])
    integral = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64)
    try:
        mapped = apply_voi(integral, ds, index=index)
    except (NotImplementedError, ValueError, AttributeError) as exc:
        raise PixelDataError(f"VOI LUT Sequence cannot be applied: {exc}") from exc
    return np.asarray(mapped, dtype=np.float64) / float(2**bits - 1)


def minmax_unit(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's own min and max; a constant image becomes all zero."""
    x = np.asarray(values, dtype=np.float64)
    low, high = float(x.min()), float(x.max())
    if high <= low:
        return np.zeros_like(x)
    return (x - low) / (high - low)


def robust_minmax_unit(
    values: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5
) -> np.ndarray:
    """Scale so the given percentiles land on 0 and 1, clipping outside.

    Percentiles commute with any increasing affine map of the stored values, so this is
    the representation-independent choice for images without a meaningful unit (CR, DX,
    MR); they also ignore the few burnt-in labels or collimator edges that would stretch a
    plain min-max.
    """
    x = np.asarray(values, dtype=np.float64)
    low, high = (float(v) for v in np.percentile(x, [low_percentile, high_percentile]))
    if high <= low:
        return minmax_unit(x)
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def invert_unit(unit: np.ndarray) -> np.ndarray:
    """MONOCHROME1 to MONOCHROME2 sense for values already in [0, 1]."""
    return 1.0 - unit
