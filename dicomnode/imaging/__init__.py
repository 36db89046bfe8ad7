"""One preprocessing library for training and serving.

Pixels come out of DICOM as modality values (`pixels`), become display intensities in
[0, 1] with MONOCHROME1 inverted (`windowing`), are equalised, resized and normalised
(`transforms`), and series become volumes (`geometry`). A `PreprocessSpec` names these
steps as data; `apply_spec` is the single function both a training loader and a serving
pipeline call, so a model sees the same numbers in both. No torch here: serving must not
need it.
"""

from .errors import (
    ImagingError,
    PixelDataError,
    SeriesGeometryError,
    SliceOrderWarning,
    SpecError,
)
from .geometry import (
    FramePlane,
    Plane,
    SliceOrder,
    SpacingReport,
    assemble_volume,
    check_spacing,
    frame_planes,
    plane_of,
    require_plane,
    resample,
    resample_isotropic,
    series_plane,
    slice_normal,
    sort_datasets,
    sort_slices,
)
from .pixels import (
    CT_HU_RANGE,
    frame_count,
    hounsfield_frames,
    is_monochrome1,
    modality_frames,
    stored_frames,
)
from .spec import (
    SPEC_SCHEMA_VERSION,
    STEP_TYPES,
    PreprocessSpec,
    SourceStep,
    Step,
    WorkingImage,
    apply_spec,
    register_step,
    step_from_dict,
    step_names,
)
from .transforms import clahe, crop, normalise, pad_or_crop, resize, zscore
from .windowing import (
    WINDOW_PRESETS,
    Window,
    dataset_window,
    invert_unit,
    minmax_unit,
    robust_minmax_unit,
    voi_lut_sequence_unit,
    window_preset,
)

__all__ = [
    "CT_HU_RANGE",
    "SPEC_SCHEMA_VERSION",
    "STEP_TYPES",
    "WINDOW_PRESETS",
    "FramePlane",
    "ImagingError",
    "PixelDataError",
    "Plane",
    "PreprocessSpec",
    "SeriesGeometryError",
    "SliceOrder",
    "SliceOrderWarning",
    "SourceStep",
    "SpacingReport",
    "SpecError",
    "Step",
    "Window",
    "WorkingImage",
    "apply_spec",
    "assemble_volume",
    "check_spacing",
    "clahe",
    "crop",
    "dataset_window",
    "frame_count",
    "frame_planes",
    "hounsfield_frames",
    "invert_unit",
    "is_monochrome1",
    "minmax_unit",
    "modality_frames",
    "normalise",
    "pad_or_crop",
    "plane_of",
    "register_step",
    "require_plane",
    "resample",
    "resample_isotropic",
    "resize",
    "robust_minmax_unit",
    "series_plane",
    "slice_normal",
    "sort_datasets",
    "sort_slices",
    "step_from_dict",
    "step_names",
    "stored_frames",
    "voi_lut_sequence_unit",
    "window_preset",
    "zscore",
]
