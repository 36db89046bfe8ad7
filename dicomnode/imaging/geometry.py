"""Slice order, spacing, orientation and volumes, from the patient coordinates in the headers.

File order, InstanceNumber and SliceLocation are all unreliable orderings (PACS re-send in
any order; InstanceNumber restarts or runs feet-first; SliceLocation is optional and
sign-ambiguous). The position of each slice projected on the slice normal is not, so it
is the primary key; InstanceNumber is a fallback that warns, and volumes refuse it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset

from .errors import SeriesGeometryError, SliceOrderWarning
from .pixels import frame_count, frame_item, modality_frames

Vector3 = tuple[float, float, float]
Plane = Literal["axial", "coronal", "sagittal", "oblique"]
_AXIS_PLANES: tuple[Plane, Plane, Plane] = ("sagittal", "coronal", "axial")  # normal along x, y, z
ResampleInterpolation = Literal["nearest", "linear", "bspline"]

#: SimpleITK ships without annotations; calls go through Any so that --strict accepts them.
_SITK: Any = sitk

_SITK_INTERPOLATOR = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
}

#: Direction cosines written with 6 decimals differ by ~1e-6 between slices of one stack.
ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class FramePlane:
    """Where one frame lies in patient space, and which dataset/frame it came from."""

    dataset_index: int
    frame_index: int
    rows: int
    columns: int
    position: tuple[float, ...] | None  # ImagePositionPatient (3 values)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 values)
    pixel_spacing: tuple[float, ...] | None  # (between rows, between columns) as in DICOM
    slice_thickness: float | None
    instance_number: int | None

    @property
    def normal(self) -> Vector3 | None:
        if self.orientation is None:
            return None
        return slice_normal(self.orientation)


@dataclass(frozen=True)
class SliceOrder:
    """Frames in stacking order, with how that order was decided.

    ``positions`` (mm along ``normal``) exist only when ``method`` is "position".
    """

    planes: tuple[FramePlane, ...]
    method: Literal["position", "instance_number"]
    normal: Vector3 | None
    positions: tuple[float, ...] | None

    @property
    def dataset_indices(self) -> tuple[int, ...]:
        """Indices into the input, in order, each once (for single-frame series)."""
        seen: dict[int, None] = {}
        for plane in self.planes:
            seen.setdefault(plane.dataset_index)
        return tuple(seen)


@dataclass(frozen=True)
class SpacingReport:
    """Steps between consecutive sorted positions and what is wrong with them.

    Indices refer to the step between slice ``i`` and slice ``i + 1`` of the sorted order.
    """

    spacing: float | None
    steps: tuple[float, ...]
    tolerance: float
    gaps: tuple[int, ...]
    duplicates: tuple[int, ...]
    irregular: tuple[int, ...]

    @property
    def uniform(self) -> bool:
        return not (self.gaps or self.duplicates or self.irregular)

    def problems(self) -> tuple[str, ...]:
        """One sentence per kind of problem, suitable for a "cannot analyse" report."""
        out: list[str] = []
        if self.duplicates:
            out.append(f"{len(self.duplicates)} duplicate slice position(s)")
        if self.gaps:
            widest = max(self.steps[i] for i in self.gaps)
            out.append(
                f"{len(self.gaps)} gap(s) in the slice positions (widest {widest:.2f} mm, "
                f"expected {self.spacing:.2f} mm)"
            )
        if self.irregular:
            out.append(f"{len(self.irregular)} irregular slice step(s)")
        return tuple(out)


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(items) != count or not all(math.isfinite(v) for v in items):
        return None
    return tuple(items)


def slice_normal(orientation: Sequence[float]) -> Vector3:
    """Unit normal: row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise SeriesGeometryError("ImageOrientationPatient row and column are parallel")
    n = normal / length
    return (float(n[0]), float(n[1]), float(n[2]))


def _attribute(ds: Dataset, frame: int, sequence_keyword: str, keyword: str) -> Any:
    item = frame_item(ds, frame, sequence_keyword)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def frame_planes(datasets: Sequence[Dataset]) -> list[FramePlane]:
    """A FramePlane for every frame, in input order (enhanced objects use functional groups)."""
    planes: list[FramePlane] = []
    for ds_index, ds in enumerate(datasets):
        instance = ds.get("InstanceNumber")
        instance_number = int(instance) if instance not in (None, "") else None
        for frame in range(frame_count(ds)):
            position = _floats(
                _attribute(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3
            )
            orientation = _floats(
                _attribute(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
            )
            spacing = _floats(_attribute(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
            thickness = _attribute(ds, frame, "PixelMeasuresSequence", "SliceThickness")
            planes.append(
                FramePlane(
                    dataset_index=ds_index,
                    frame_index=frame,
                    rows=int(ds.get("Rows", 0)),
                    columns=int(ds.get("Columns", 0)),
                    position=position,
                    orientation=orientation,
                    pixel_spacing=spacing,
                    slice_thickness=float(thickness) if thickness not in (None, "") else None,
                    instance_number=instance_number,
                )
            )
    return planes


def _same_orientation(planes: Sequence[FramePlane]) -> bool:
    first = np.asarray(planes[0].orientation)
    return all(
        np.max(np.abs(np.asarray(p.orientation) - first)) <= ORIENTATION_TOLERANCE for p in planes
    )


def sort_slices(datasets: Sequence[Dataset]) -> SliceOrder:
    """Order frames by ImagePositionPatient projected on the slice normal, ascending.

    Falls back to (InstanceNumber, frame) with a SliceOrderWarning when any frame lacks
    position or orientation. Mixed orientations are an error: they are not one stack.
    """
    planes = frame_planes(datasets)
    if not planes:
        raise SeriesGeometryError("no slices to sort")
    if all(p.position is not None and p.orientation is not None for p in planes):
        if not _same_orientation(planes):
            raise SeriesGeometryError(
                "slices have different ImageOrientationPatient; they are not one stack"
            )
        orientation = planes[0].orientation
        assert orientation is not None
        normal = slice_normal(orientation)
        n = np.asarray(normal)
        keyed = [
            (float(np.dot(np.asarray(p.position), n)), p.instance_number or 0, i, p)
            for i, p in enumerate(planes)
        ]
        keyed.sort(key=lambda item: item[:3])
        return SliceOrder(
            planes=tuple(item[3] for item in keyed),
            method="position",
            normal=normal,
            positions=tuple(item[0] for item in keyed),
        )
    missing = sum(p.position is None or p.orientation is None for p in planes)
    if any(p.instance_number is None for p in planes):
        raise SeriesGeometryError(
            f"{missing} of {len(planes)} slices lack ImagePositionPatient/"
            "ImageOrientationPatient and not all have InstanceNumber; cannot order them"
        )
    warnings.warn(
        f"{missing} of {len(planes)} slices lack ImagePositionPatient/ImageOrientationPatient; "
        "ordered by InstanceNumber",
        SliceOrderWarning,
        stacklevel=2,
    )
    ordered = sorted(planes, key=lambda p: (p.instance_number, p.dataset_index, p.frame_index))
    fallback_normal = planes[0].normal if all(p.orientation is not None for p in planes) else None
    return SliceOrder(
        planes=tuple(ordered), method="instance_number", normal=fallback_normal, positions=None
    )


def sort_datasets(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The datasets of a single-frame series in slice order (see `sort_slices`)."""
    order = sort_slices(datasets)
    return [datasets[i] for i in order.dataset_indices]


def check_spacing(
    positions: Sequence[float] | SliceOrder,
    *,
    relative_tolerance: float = 0.1,
    absolute_tolerance_mm: float = 0.01,
) -> SpacingReport:
    """Classify the steps between sorted positions against their median.

    A step is a duplicate when at most ``absolute_tolerance_mm``, a gap when longer than
    the median by more than the tolerance (max of the absolute one and
    ``relative_tolerance`` x median), irregular when shorter by more than it.
    """
    if isinstance(positions, SliceOrder):
        if positions.positions is None:
            raise SeriesGeometryError("slice spacing needs slices ordered by position")
        values = positions.positions
    else:
        values = tuple(float(p) for p in positions)
    steps = tuple(float(b - a) for a, b in itertools.pairwise(values))
    if any(step < -absolute_tolerance_mm for step in steps):
        raise SeriesGeometryError("positions are not sorted")
    distinct = [s for s in steps if s > absolute_tolerance_mm]
    spacing = float(np.median(distinct)) if distinct else None
    tolerance = max(absolute_tolerance_mm, relative_tolerance * spacing) if spacing else 0.0
    duplicates = tuple(i for i, s in enumerate(steps) if s <= absolute_tolerance_mm)
    gaps: tuple[int, ...] = ()
    irregular: tuple[int, ...] = ()
    if spacing is not None:
        gaps = tuple(i for i, s in enumerate(steps) if s > spacing + tolerance)
        irregular = tuple(
            i for i, s in enumerate(steps) if absolute_tolerance_mm < s < spacing - tolerance
        )
    return SpacingReport(
        spacing=spacing,
        steps=steps,
        tolerance=tolerance,
        gaps=gaps,
        duplicates=duplicates,
        irregular=irregular,
    )


def plane_of(orientation: Sequence[float], *, tolerance_deg: float = 30.0) -> Plane:
    """Which anatomical plane a slice lies in, or "oblique".

    A slice is axial when its normal is within ``tolerance_deg`` of the patient's
    feet-head axis (and so on). The default tolerates the 15-25 degree gantry tilt common
    in head CT; pass a smaller one where a pipeline needs true axials.
    """
    normal = np.abs(np.asarray(slice_normal(orientation)))
    axis = int(np.argmax(normal))
    angle = math.degrees(math.acos(min(1.0, float(normal[axis]))))
    if angle > tolerance_deg:
        return "oblique"
    return _AXIS_PLANES[axis]


def series_plane(datasets: Sequence[Dataset], *, tolerance_deg: float = 30.0) -> Plane:
    """The plane of a whole series; mixed or missing orientations are an error."""
    planes = frame_planes(datasets)
    if not planes or any(p.orientation is None for p in planes):
        raise SeriesGeometryError("ImageOrientationPatient is missing; orientation unknown")
    if not _same_orientation(planes):
        raise SeriesGeometryError("slices have different ImageOrientationPatient")
    orientation = planes[0].orientation
    assert orientation is not None
    return plane_of(orientation, tolerance_deg=tolerance_deg)


def require_plane(
    datasets: Sequence[Dataset], expected: Plane, *, tolerance_deg: float = 30.0
) -> None:
    """Input check for pipelines: raise SeriesGeometryError saying what the series is."""
    found = series_plane(datasets, tolerance_deg=tolerance_deg)
    if found != expected:
        raise SeriesGeometryError(f"the series is {found}; this analysis needs {expected} slices")


def _check_in_plane(order: SliceOrder, tolerance_mm: float) -> None:
    assert order.normal is not None and order.positions is not None
    first = np.asarray(order.planes[0].position)
    n = np.asarray(order.normal)
    for plane, along in zip(order.planes, order.positions, strict=True):
        offset = np.asarray(plane.position) - first
        drift = float(np.linalg.norm(offset - (along - order.positions[0]) * n))
        if drift > tolerance_mm:
            raise SeriesGeometryError(
                f"slice origins drift {drift:.2f} mm within the slice plane (gantry tilt or "
                "sheared stack); the series is not a rectilinear volume"
            )


def assemble_volume(
    datasets: Sequence[Dataset],
    *,
    values: Callable[[Dataset], np.ndarray] = modality_frames,
    allow_irregular: bool = False,
    relative_tolerance: float = 0.1,
    in_plane_tolerance_mm: float = 0.5,
) -> sitk.Image:
    """A float32 SimpleITK volume with origin, spacing and direction from the headers.

    ``values`` gives each dataset's frames (modality values by default; pass
    `hounsfield_frames` for CT). Index (i, j, k) is column i, row j of the k-th slice in
    `sort_slices` order, so the third axis runs along the slice normal. Gaps, duplicates
    and irregular steps are refused unless ``allow_irregular`` (then the median step is
    used, which misplaces slices by up to the irregularity).
    """
    order = sort_slices(datasets)
    if order.method != "position" or order.normal is None or order.positions is None:
        raise SeriesGeometryError("a volume needs ImagePositionPatient on every slice")
    first = order.planes[0]
    for plane in order.planes:
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise SeriesGeometryError("slices differ in Rows/Columns")
        if plane.pixel_spacing is None:
            raise SeriesGeometryError("PixelSpacing is missing")
        if first.pixel_spacing is not None and not np.allclose(
            plane.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4
        ):
            raise SeriesGeometryError("slices differ in PixelSpacing")
    report = check_spacing(order, relative_tolerance=relative_tolerance)
    if report.duplicates or (not report.uniform and not allow_irregular):
        raise SeriesGeometryError("; ".join(report.problems()))
    _check_in_plane(order, in_plane_tolerance_mm)

    cache: dict[int, np.ndarray] = {}
    stack = np.empty((len(order.planes), first.rows, first.columns), dtype=np.float32)
    for k, plane in enumerate(order.planes):
        if plane.dataset_index not in cache:
            cache[plane.dataset_index] = values(datasets[plane.dataset_index])
        stack[k] = cache[plane.dataset_index][plane.frame_index]

    if report.spacing is not None:
        slice_spacing = report.spacing
    else:
        single = datasets[first.dataset_index]
        slice_spacing = float(single.get("SpacingBetweenSlices") or first.slice_thickness or 1.0)
    assert first.pixel_spacing is not None and first.orientation is not None
    row_spacing, column_spacing = first.pixel_spacing
    image = _SITK.GetImageFromArray(stack)
    image.SetSpacing((column_spacing, row_spacing, slice_spacing))
    image.SetOrigin(first.position)
    row_dir, col_dir, normal = first.orientation[:3], first.orientation[3:], order.normal
    image.SetDirection(
        tuple(
            float(component)
            for axis in range(3)
            for component in (row_dir[axis], col_dir[axis], normal[axis])
        )
    )
    volume: sitk.Image = image
    return volume


def resample(
    image: sitk.Image,
    spacing: Sequence[float],
    *,
    interpolation: ResampleInterpolation = "linear",
    default_value: float | None = None,
) -> sitk.Image:
    """Resample a 3-D image to ``spacing`` (x, y, z in mm) over the same physical extent.

    Voxels that fall outside the input get ``default_value``, by default the image
    minimum (air on CT) rather than 0, which would be water.
    """
    source: Any = image
    if source.GetDimension() != 3 or len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise SeriesGeometryError(f"spacing {tuple(spacing)} is not a positive spacing per axis")
    old_spacing = source.GetSpacing()
    size = [
        max(1, round(n * old / new))
        for n, old, new in zip(source.GetSize(), old_spacing, spacing, strict=True)
    ]
    if default_value is None:
        default_value = float(_SITK.GetArrayViewFromImage(image).min())
    # Keep the outer edge of the first voxel where it was, not its centre.
    direction = np.asarray(source.GetDirection(), dtype=np.float64).reshape(3, 3)
    shift = direction @ ((np.asarray(spacing, dtype=np.float64) - np.asarray(old_spacing)) / 2)
    origin = tuple(float(o) for o in np.asarray(source.GetOrigin()) + shift)
    resampled: sitk.Image = _SITK.Resample(
        image,
        size,
        _SITK.Transform(),
        _SITK_INTERPOLATOR[interpolation],
        origin,
        tuple(float(s) for s in spacing),
        source.GetDirection(),
        default_value,
        source.GetPixelID(),
    )
    return resampled


def resample_isotropic(
    image: sitk.Image,
    spacing: float | None = None,
    *,
    interpolation: ResampleInterpolation = "linear",
) -> sitk.Image:
    """Resample to cubic voxels of ``spacing`` mm (default: the finest current spacing)."""
    source: Any = image
    target = float(min(source.GetSpacing())) if spacing is None else float(spacing)
    return resample(image, (target, target, target), interpolation=interpolation)
