"""The preprocessing spec: data that says how to turn DICOM (or arrays) into a model tensor.

A model is trained with one spec and served with the same one, read from its model card,
through the one function `apply_spec`; there is no second implementation to drift (the
failure of a pneumonia model trained on CLAHE images and served without it). The spec is
validated when it is built, so a bad card fails when it is loaded, naming the step, not
halfway through a study. Its `fingerprint` lets a card record exactly which spec a model
was trained with.

Stages: a spec whose first step is a *source* step (``modality_lut``, ``hounsfield``)
takes datasets; any other spec takes arrays, read as modality values. Values then pass
through stages that constrain the order of steps::

    dicom --source--> modality --window/voi/minmax--> display [0, 1] --zscore--> normalised

Geometric steps (resize, crop, pad_or_crop, repeat_channels) keep the stage they find.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import yaml
from pydicom.dataset import Dataset

from .errors import ImagingError, PixelDataError, SpecError
from .pixels import CT_HU_RANGE, hounsfield_frames, is_monochrome1, modality_frames
from .transforms import (
    Interpolation,
    as_chw,
    clahe,
    crop,
    normalise,
    pad_or_crop,
    resize,
    zscore,
)
from .windowing import (
    WINDOW_PRESETS,
    VoiFunction,
    Window,
    dataset_window,
    invert_unit,
    minmax_unit,
    robust_minmax_unit,
    voi_lut_sequence_unit,
)

Stage = Literal["dicom", "modality", "display", "normalised"]
InputKind = Literal["datasets", "arrays"]

#: Version of the spec's dictionary schema; part of every fingerprint.
SPEC_SCHEMA_VERSION = 1

_ANY_VALUES: frozenset[Stage] = frozenset({"modality", "display", "normalised"})
_DISPLAY_HINT = "put window, voi, minmax or robust_minmax before it"


@dataclass(frozen=True)
class WorkingImage:
    """One frame on its way through a spec.

    ``monochrome1`` is true while the values still have MONOCHROME1 polarity (higher =
    darker); the step that maps to display intensities inverts them and clears it.
    """

    pixels: np.ndarray  # (channels, rows, columns), float64
    source: Dataset | None
    frame: int
    monochrome1: bool = False


# ---------------------------------------------------------------------------------------
# Parameter checking


def _coerce(value: Any, annotation: Any, what: str) -> Any:
    """Check ``value`` against a field annotation and return its canonical form.

    Canonical: ints become floats where floats are expected and lists become tuples, so a
    spec read back from YAML/JSON compares (and hashes) equal to the one written.
    """
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors: list[str] = []
        for option in options:
            try:
                return _coerce(value, option, what)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{what}: {value!r} is not valid")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{what} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false; got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{what} must be an integer; got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"{what} must be a number; got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{what} must be finite; got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{what} must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{what}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{what} must have {len(args)} items; got {len(value)}")
        return tuple(
            _coerce(v, a, f"{what}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    raise TypeError(f"{what}: unsupported parameter type {annotation!r}")


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        hints = get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in fields(cls)}
    return _FIELD_TYPES[cls]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# Steps and their registry


@dataclass(frozen=True)
class Step:
    """A named preprocessing operation with typed, validated parameters.

    Subclasses declare their parameters as dataclass fields; the constructor checks and
    canonicalises them, so an instance is always valid.
    """

    name: ClassVar[str] = ""
    accepts: ClassVar[frozenset[Stage]] = _ANY_VALUES
    produces: ClassVar[Stage | None] = None
    needs_dataset: ClassVar[bool] = False

    def __post_init__(self) -> None:
        try:
            for name, annotation in _field_types(type(self)).items():
                object.__setattr__(self, name, _coerce(getattr(self, name), annotation, name))
            self.validate()
        except (ValueError, TypeError) as exc:
            raise SpecError(f"step {self.name!r}: {exc}") from exc

    def validate(self) -> None:
        """Cross-parameter checks; raise ValueError with a message naming the parameter."""

    def apply(self, image: WorkingImage) -> WorkingImage:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The step as plain data: ``{"name": ..., <every parameter>: ...}``."""
        out: dict[str, Any] = {"name": self.name}
        for f in fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Step:
        """Build from the parameters of a step mapping (without "name")."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            expected = ", ".join(sorted(known)) or "none"
            raise SpecError(
                f"step {cls.name!r}: unknown parameter(s) {', '.join(unknown)} "
                f"(parameters: {expected})"
            )
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - set(params))
        if missing:
            raise SpecError(f"step {cls.name!r}: missing parameter(s) {', '.join(missing)}")
        return cls(**params)


class SourceStep(Step):
    """A step that reads datasets: it must come first, and it sets the input kind."""

    accepts: ClassVar[frozenset[Stage]] = frozenset({"dicom"})
    produces: ClassVar[Stage | None] = "modality"

    def load(self, ds: Dataset) -> list[WorkingImage]:
        raise NotImplementedError

    def apply(self, image: WorkingImage) -> WorkingImage:
        raise SpecError(f"step {self.name!r} reads datasets; it cannot transform an image")


STEP_TYPES: dict[str, type[Step]] = {}

S = TypeVar("S", bound=type[Step])


def register_step(cls: S) -> S:
    """Class decorator adding a step type to the registry under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no step name")
    if cls.name in STEP_TYPES and STEP_TYPES[cls.name] is not cls:
        raise ValueError(f"step name {cls.name!r} is already registered")
    STEP_TYPES[cls.name] = cls
    return cls


def step_from_dict(data: Mapping[str, Any], *, position: int | None = None) -> Step:
    """Build a step from ``{"name": ..., **parameters}``; errors name the step."""
    where = f"step {position}" if position is not None else "step"
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping with a 'name', got {data!r}")
    name = data.get("name")
    if not isinstance(name, str):
        raise SpecError(f"{where}: missing 'name'")
    step_type = STEP_TYPES.get(name)
    if step_type is None:
        close = difflib.get_close_matches(name, list(STEP_TYPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"{where}: unknown step {name!r}{hint} (known: {', '.join(sorted(STEP_TYPES))})"
        )
    params = {k: v for k, v in data.items() if k != "name"}
    try:
        return step_type.from_params(params)
    except SpecError as exc:
        message = str(exc)
        if position is not None:  # "step 'x': ..." becomes "step 3 'x': ..."
            message = message.replace("step ", f"step {position} ", 1)
        raise SpecError(message) from exc


def _frames_to_images(ds: Dataset, frames: np.ndarray) -> list[WorkingImage]:
    inverted = is_monochrome1(ds)
    return [WorkingImage(frames[i][np.newaxis], ds, i, inverted) for i in range(frames.shape[0])]


def _to_display(image: WorkingImage, unit: np.ndarray) -> WorkingImage:
    if image.monochrome1:
        unit = invert_unit(unit)
    return replace(image, pixels=unit, monochrome1=False)


def _require_polarity(image: WorkingImage, step: str) -> None:
    if image.monochrome1:
        raise PixelDataError(
            f"{step} on MONOCHROME1 values would keep their inverted polarity; {_DISPLAY_HINT}"
        )


@register_step
@dataclass(frozen=True)
class ModalityLut(SourceStep):
    """Modality values: Rescale Slope/Intercept or the Modality LUT Sequence, per frame."""

    name: ClassVar[str] = "modality_lut"

    def load(self, ds: Dataset) -> list[WorkingImage]:
        return _frames_to_images(ds, modality_frames(ds))


@register_step
@dataclass(frozen=True)
class Hounsfield(SourceStep):
    """CT in HU, refusing non-HU images; ``clip`` (or null) bounds padding sentinels."""

    name: ClassVar[str] = "hounsfield"
    clip: tuple[float, float] | None = CT_HU_RANGE

    def validate(self) -> None:
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError(f"clip must be [low, high] with low < high; got {list(self.clip)}")

    def load(self, ds: Dataset) -> list[WorkingImage]:
        return _frames_to_images(ds, hounsfield_frames(ds, clip=self.clip))


def _preset(name: Any, step: str) -> Window:
    if not isinstance(name, str) or name not in WINDOW_PRESETS:
        known = ", ".join(sorted(WINDOW_PRESETS))
        raise SpecError(f"step {step!r}: unknown window preset {name!r} (known: {known})")
    return WINDOW_PRESETS[name]


@register_step
@dataclass(frozen=True)
class WindowStep(Step):
    """A fixed window to [0, 1]; ``preset`` (brain, subdural, bone, lung, soft_tissue)
    may replace center and width when written, and is stored resolved to numbers so the
    spec does not depend on the preset table."""

    name: ClassVar[str] = "window"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality"})
    produces: ClassVar[Stage | None] = "display"
    center: float
    width: float
    function: VoiFunction = "LINEAR_EXACT"

    def validate(self) -> None:
        Window(self.center, self.width, self.function)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Step:
        if "preset" in params:
            if "center" in params or "width" in params:
                raise SpecError(f"step {cls.name!r}: give either preset or center/width")
            preset = _preset(params["preset"], cls.name)
            rest = {k: v for k, v in params.items() if k != "preset"}
            return super().from_params({"center": preset.center, "width": preset.width, **rest})
        return super().from_params(params)

    def apply(self, image: WorkingImage) -> WorkingImage:
        return _to_display(
            image, Window(self.center, self.width, self.function).apply(image.pixels)
        )


@register_step
@dataclass(frozen=True)
class MultiWindow(Step):
    """One channel per window, e.g. brain/subdural/bone for haemorrhage models.

    ``windows`` is a list of preset names or [center, width] pairs, stored as pairs.
    """

    name: ClassVar[str] = "multi_window"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality"})
    produces: ClassVar[Stage | None] = "display"
    windows: tuple[tuple[float, float], ...]
    function: VoiFunction = "LINEAR_EXACT"

    def validate(self) -> None:
        if not self.windows:
            raise ValueError("windows must not be empty")
        for center, width in self.windows:
            Window(center, width, self.function)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Step:
        windows = params.get("windows")
        if isinstance(windows, list | tuple):
            resolved: list[Any] = []
            for item in windows:
                if isinstance(item, str):
                    preset = _preset(item, cls.name)
                    resolved.append((preset.center, preset.width))
                else:
                    resolved.append(item)
            params = {**params, "windows": resolved}
        return super().from_params(params)

    def apply(self, image: WorkingImage) -> WorkingImage:
        if image.pixels.shape[0] != 1:
            raise PixelDataError("multi_window needs a single-channel image")
        planes = [Window(c, w, self.function).apply(image.pixels[0]) for c, w in self.windows]
        return _to_display(image, np.stack(planes))


@register_step
@dataclass(frozen=True)
class Voi(Step):
    """The dataset's own VOI: window ``index`` (per frame for enhanced objects), else its
    VOI LUT Sequence, else ``fallback``."""

    name: ClassVar[str] = "voi"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality"})
    produces: ClassVar[Stage | None] = "display"
    needs_dataset: ClassVar[bool] = True
    index: int = 0
    fallback: Literal["error", "minmax", "robust_minmax"] = "error"

    def validate(self) -> None:
        if self.index < 0:
            raise ValueError(f"index must be >= 0; got {self.index}")

    def apply(self, image: WorkingImage) -> WorkingImage:
        ds = image.source
        if ds is None:
            raise PixelDataError("voi needs the image's dataset")
        window = dataset_window(ds, image.frame, self.index)
        if window is not None:
            unit = window.apply(image.pixels)
        elif ds.get("VOILUTSequence"):
            unit = voi_lut_sequence_unit(image.pixels, ds, self.index)
        elif self.fallback == "minmax":
            unit = minmax_unit(image.pixels)
        elif self.fallback == "robust_minmax":
            unit = robust_minmax_unit(image.pixels)
        else:
            raise PixelDataError("the dataset has no window and no VOI LUT Sequence")
        return _to_display(image, unit)


@register_step
@dataclass(frozen=True)
class MinMax(Step):
    """Stretch each image's own min..max to [0, 1]."""

    name: ClassVar[str] = "minmax"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality", "display"})
    produces: ClassVar[Stage | None] = "display"

    def apply(self, image: WorkingImage) -> WorkingImage:
        return _to_display(image, minmax_unit(image.pixels))


@register_step
@dataclass(frozen=True)
class RobustMinMax(Step):
    """Stretch each image's percentile range to [0, 1]; independent of stored encoding."""

    name: ClassVar[str] = "robust_minmax"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality", "display"})
    produces: ClassVar[Stage | None] = "display"
    low_percentile: float = 0.5
    high_percentile: float = 99.5

    def validate(self) -> None:
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError(
                "need 0 <= low_percentile < high_percentile <= 100; got "
                f"{self.low_percentile}, {self.high_percentile}"
            )

    def apply(self, image: WorkingImage) -> WorkingImage:
        unit = robust_minmax_unit(image.pixels, self.low_percentile, self.high_percentile)
        return _to_display(image, unit)


@register_step
@dataclass(frozen=True)
class Clahe(Step):
    """CLAHE on 8-bit codes of display intensities (see `transforms.clahe`).

    Put it after an "area" resize to the model size: the result is then the same whether
    the radiograph was stored with 8, 12 or 15 bits.
    """

    name: ClassVar[str] = "clahe"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"display"})
    clip_limit: float = 2.0
    tile_grid: tuple[int, int] = (8, 8)

    def validate(self) -> None:
        if self.clip_limit <= 0:
            raise ValueError(f"clip_limit must be > 0; got {self.clip_limit}")
        if min(self.tile_grid) < 1:
            raise ValueError(f"tile_grid must be positive; got {list(self.tile_grid)}")

    def apply(self, image: WorkingImage) -> WorkingImage:
        pixels = clahe(image.pixels, clip_limit=self.clip_limit, tile_grid=self.tile_grid)
        return replace(image, pixels=pixels)


def _check_size(size: tuple[int, int]) -> None:
    if min(size) < 1:
        raise ValueError(f"size must be [rows, columns] of positive integers; got {list(size)}")


@register_step
@dataclass(frozen=True)
class Resize(Step):
    """Resize to ``size`` = [rows, columns] (OpenCV ``interpolation``; optional letterbox)."""

    name: ClassVar[str] = "resize"
    size: tuple[int, int]
    interpolation: Interpolation = "linear"
    keep_aspect: bool = False
    pad_value: float = 0.0

    def validate(self) -> None:
        _check_size(self.size)

    def apply(self, image: WorkingImage) -> WorkingImage:
        pixels = resize(
            image.pixels,
            self.size,
            interpolation=self.interpolation,
            keep_aspect=self.keep_aspect,
            pad_value=self.pad_value,
        )
        return replace(image, pixels=pixels)


@register_step
@dataclass(frozen=True)
class Crop(Step):
    """A fixed box; images it does not fit are refused rather than silently padded."""

    name: ClassVar[str] = "crop"
    top: int
    left: int
    height: int
    width: int

    def validate(self) -> None:
        if self.top < 0 or self.left < 0 or self.height < 1 or self.width < 1:
            raise ValueError("top/left must be >= 0 and height/width >= 1")

    def apply(self, image: WorkingImage) -> WorkingImage:
        return replace(
            image, pixels=crop(image.pixels, self.top, self.left, self.height, self.width)
        )


@register_step
@dataclass(frozen=True)
class PadOrCrop(Step):
    """Centre on a ``size`` canvas, cropping or padding with ``pad_value``."""

    name: ClassVar[str] = "pad_or_crop"
    size: tuple[int, int]
    pad_value: float = 0.0

    def validate(self) -> None:
        _check_size(self.size)

    def apply(self, image: WorkingImage) -> WorkingImage:
        return replace(image, pixels=pad_or_crop(image.pixels, self.size, pad_value=self.pad_value))


@register_step
@dataclass(frozen=True)
class ZScore(Step):
    """Per-image standardisation (mean 0, std 1), per channel if asked."""

    name: ClassVar[str] = "zscore"
    produces: ClassVar[Stage | None] = "normalised"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality", "display"})
    per_channel: bool = False
    eps: float = 1e-6

    def validate(self) -> None:
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got {self.eps}")

    def apply(self, image: WorkingImage) -> WorkingImage:
        _require_polarity(image, self.name)
        return replace(
            image, pixels=zscore(image.pixels, per_channel=self.per_channel, eps=self.eps)
        )


@register_step
@dataclass(frozen=True)
class Normalise(Step):
    """(x - mean) / std with fixed values, one per channel or one for all."""

    name: ClassVar[str] = "normalise"
    produces: ClassVar[Stage | None] = "normalised"
    accepts: ClassVar[frozenset[Stage]] = frozenset({"modality", "display"})
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def validate(self) -> None:
        if not self.mean or not self.std:
            raise ValueError("mean and std must not be empty")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0; got {list(self.std)}")

    def apply(self, image: WorkingImage) -> WorkingImage:
        _require_polarity(image, self.name)
        return replace(image, pixels=normalise(image.pixels, self.mean, self.std))


@register_step
@dataclass(frozen=True)
class RepeatChannels(Step):
    """Copy a single channel ``count`` times (grey image into an RGB-pretrained network)."""

    name: ClassVar[str] = "repeat_channels"
    count: int = 3

    def validate(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1; got {self.count}")

    def apply(self, image: WorkingImage) -> WorkingImage:
        if image.pixels.shape[0] != 1:
            raise PixelDataError(f"repeat_channels needs 1 channel; got {image.pixels.shape[0]}")
        return replace(image, pixels=np.repeat(image.pixels, self.count, axis=0))


# ---------------------------------------------------------------------------------------
# The spec


def _stage_error(index: int, step: Step, stage: Stage) -> SpecError:
    if stage == "dicom":
        reason = "a spec for DICOM input must start with a source step; it is not one"
    elif isinstance(step, SourceStep):
        reason = "a source step must be the first step"
    elif "display" in step.accepts and "modality" not in step.accepts:
        reason = f"it needs display intensities in [0, 1]; {_DISPLAY_HINT}"
    elif stage == "normalised":
        reason = "it cannot follow a normalisation (zscore/normalise)"
    else:
        reason = f"it cannot take {stage} values (takes: {', '.join(sorted(step.accepts))})"
    return SpecError(f"step {index} {step.name!r}: {reason}")


@dataclass(frozen=True)
class PreprocessSpec:
    """An ordered, validated list of steps; see the module docstring for the stages."""

    steps: tuple[Step, ...]
    version: int = SPEC_SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if self.version != SPEC_SCHEMA_VERSION:
            raise SpecError(
                f"spec version {self.version} is not supported (this library reads "
                f"version {SPEC_SCHEMA_VERSION})"
            )
        if not self.steps:
            raise SpecError("a spec needs at least one step")
        stage: Stage = "dicom" if isinstance(self.steps[0], SourceStep) else "modality"
        for index, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise SpecError(f"step {index}: {step!r} is not a Step")
            if stage not in step.accepts or (isinstance(step, SourceStep) and index > 0):
                raise _stage_error(index, step, stage)
            if step.needs_dataset and self.input_kind != "datasets":
                raise SpecError(
                    f"step {index} {step.name!r}: needs DICOM input; start the spec with "
                    "modality_lut or hounsfield"
                )
            stage = step.produces or stage

    @property
    def input_kind(self) -> InputKind:
        """Datasets when the spec starts with a source step, else arrays."""
        return "datasets" if isinstance(self.steps[0], SourceStep) else "arrays"

    @property
    def output_stage(self) -> Stage:
        stage: Stage = "modality"
        for step in self.steps:
            stage = step.produces or stage
        return stage

    def to_dict(self) -> dict[str, Any]:
        """Plain data with every parameter spelled out (defaults included)."""
        return {"version": self.version, "steps": [step.to_dict() for step in self.steps]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> PreprocessSpec:
        """Read ``{"version": 1, "steps": [...]}``, or a bare list of steps (version 1)."""
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - {"version", "steps"})
            if unknown:
                raise SpecError(f"spec: unknown key(s) {', '.join(unknown)}")
            version = data.get("version", SPEC_SCHEMA_VERSION)
            raw_steps = data.get("steps")
        else:
            version, raw_steps = SPEC_SCHEMA_VERSION, data
        if not isinstance(raw_steps, list | tuple):
            raise SpecError("spec: 'steps' must be a list of steps")
        if isinstance(version, bool) or not isinstance(version, int):
            raise SpecError(f"spec: version must be an integer; got {version!r}")
        steps = tuple(step_from_dict(item, position=i) for i, item in enumerate(raw_steps))
        return cls(steps=steps, version=version)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> PreprocessSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"spec is not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    def require_fingerprint(self, expected: str) -> None:
        """Refuse to serve with a spec other than the one a model card says it was trained with."""
        if self.fingerprint != expected:
            raise SpecError(
                f"preprocessing spec fingerprint {self.fingerprint} does not match the "
                f"recorded {expected}"
            )

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the canonical JSON; equal specs have equal fingerprints."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


SpecInput = Dataset | Sequence[Dataset] | np.ndarray | Sequence[np.ndarray]


def _source_images(spec: PreprocessSpec, inputs: SpecInput) -> Iterator[WorkingImage]:
    """Images as the first transform step sees them, produced lazily (one dataset at a time)."""
    if spec.input_kind == "datasets":
        items: list[object] = [inputs] if isinstance(inputs, Dataset | np.ndarray) else list(inputs)
        datasets = [item for item in items if isinstance(item, Dataset)]
        if not datasets or len(datasets) != len(items):
            raise SpecError("this spec starts with a source step and needs pydicom datasets")
        source = spec.steps[0]
        assert isinstance(source, SourceStep)
        for ds in datasets:
            try:
                loaded = source.load(ds)
            except ImagingError as exc:
                raise type(exc)(f"step 0 {source.name!r}: {exc}") from exc
            yield from loaded
        return
    if isinstance(inputs, Dataset) or (
        isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], Dataset)
    ):
        raise SpecError(
            "this spec takes arrays; to read datasets it must start with modality_lut or hounsfield"
        )
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 2:
            arrays: list[np.ndarray] = [inputs]
        elif inputs.ndim in (3, 4):
            arrays = list(inputs)
        else:
            raise PixelDataError(f"expected (H, W), (N, H, W) or (N, C, H, W); got {inputs.shape}")
    else:
        arrays = [np.asarray(a) for a in inputs]
    if not arrays:
        raise PixelDataError("no images to preprocess")
    for array in arrays:
        yield WorkingImage(as_chw(np.asarray(array, dtype=np.float64)).copy(), None, 0, False)


def _run_steps(spec: PreprocessSpec, image: WorkingImage) -> np.ndarray:
    first = 1 if spec.input_kind == "datasets" else 0
    for index in range(first, len(spec.steps)):
        step = spec.steps[index]
        try:
            image = step.apply(image)
        except ImagingError as exc:
            raise type(exc)(f"step {index} {step.name!r}: {exc}") from exc
    if image.monochrome1:
        raise PixelDataError(
            f"MONOCHROME1 images would leave the spec with inverted polarity; {_DISPLAY_HINT}"
        )
    out = image.pixels.astype(np.float32)
    if not np.isfinite(out).all():
        raise PixelDataError("preprocessing produced non-finite values")
    return out


def apply_spec(spec: PreprocessSpec, inputs: SpecInput) -> np.ndarray:
    """Run ``spec`` and stack the result as a float32 (N, C, H, W) tensor.

    Datasets contribute one image per frame, in the order given (sort a series first with
    `sort_datasets`). Arrays are (H, W), (N, H, W) or (N, C, H, W), or a list of (H, W) /
    (C, H, W). This is the only entry point training and serving use, so both get the same
    numbers. Each image runs through all steps before the next is read, so a long CT series
    never holds more than one full-size float64 intermediate.
    """
    outputs = [_run_steps(spec, image) for image in _source_images(spec, inputs)]
    shapes = {out.shape for out in outputs}
    if len(shapes) > 1:
        raise PixelDataError(
            f"images end with different shapes {sorted(shapes)}; add a resize or pad_or_crop step"
        )
    return np.stack(outputs)


def step_names() -> tuple[str, ...]:
    """Registered step names, sorted."""
    return tuple(sorted(STEP_TYPES))
