"""Model packages: ``models/<name>/model.onnx`` described by ``models/<name>/model.yaml``.

The card is the contract between training and serving (ARCHITECTURE §3): it says what
the model expects (input signature and the ``imaging`` preprocessing spec), what each
output means, where to threshold it and how well it did on held-out data. A card is
parsed into frozen dataclasses that validate themselves on construction, so a
:class:`ModelCard` in hand is always complete and consistent. :func:`load_package`
refuses a package whose ONNX file is not the one the card was written for (sha256) or
whose graph signature disagrees with the card, because either would mean serving a
model under someone else's description.

This module needs only numpy, PyYAML and onnxruntime: the node serves without torch.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import yaml

from dicomnode.inference.errors import (
    ChecksumMismatchError,
    IncompleteCardError,
    InvalidCardError,
    PackageNotFoundError,
    SignatureMismatchError,
)

__all__ = [
    "CARD_FILE",
    "CARD_VERSION",
    "MODEL_FILE",
    "Activation",
    "Dim",
    "GraphSignature",
    "Metric",
    "ModelCard",
    "ModelPackage",
    "OperatingPoint",
    "OutputKind",
    "OutputSpec",
    "ResourceEstimate",
    "ScoreScale",
    "TensorSpec",
    "TrainingData",
    "check_signature",
    "load_card",
    "load_package",
    "read_onnx_signature",
    "sha256_file",
    "signature_differences",
    "signature_of",
]

CARD_FILE = "model.yaml"
MODEL_FILE = "model.onnx"
CARD_VERSION = 1

Dim = int | str
"""A tensor dimension: a fixed size, or a name for a dimension chosen at run time."""

OutputKind = Literal["logits", "probabilities", "regression", "risk", "cam", "cam_raw", "embedding"]
Activation = Literal["sigmoid", "softmax", "none"]
ScoreScale = Literal["probability", "logit"]

# ONNX Runtime's type strings for the dtypes a card may name.
_ORT_TYPES: dict[str, str] = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCORE_KINDS = ("logits", "probabilities", "regression", "risk")
_CAM_KINDS = ("cam", "cam_raw")


def _fail(message: str) -> InvalidCardError:
    return InvalidCardError(message)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the ONNX signature; a string dimension is dynamic."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise _fail("a tensor name is empty")
        if self.dtype not in _ORT_TYPES:
            raise _fail(
                f"tensor {self.name!r} has dtype {self.dtype!r}; use one of {sorted(_ORT_TYPES)}"
            )
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, int | str):
                raise _fail(f"tensor {self.name!r} has a dimension {dim!r} that is not int or str")
            if isinstance(dim, int) and dim < 1:
                raise _fail(f"tensor {self.name!r} has a non-positive dimension {dim}")

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @property
    def batched(self) -> bool:
        """True when axis 0 is dynamic: the runtime may split and concatenate along it."""
        return bool(self.shape) and isinstance(self.shape[0], str)

    def bytes_per_sample(self) -> int | None:
        """Bytes of one item along axis 0, or None if another axis is dynamic too."""
        size = self.numpy_dtype.itemsize
        for dim in self.shape[1:]:
            if not isinstance(dim, int):
                return None
            size *= dim
        return size

    def describe_shape(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


@dataclass(frozen=True, kw_only=True)
class OutputSpec(TensorSpec):
    """An output and what it means.

    ``classes`` names the class axis (axis 1) of scores; for a single sigmoid logit it
    holds the positive class. A CAM output (``kind`` cam/cam_raw) ``explains`` a score
    output; ``cam_target`` says whether its channels are every class of that output
    ("all", in ``classes`` order), the arg-max class ("predicted") or one class index.
    """

    kind: OutputKind
    meaning: str
    classes: tuple[str, ...] = ()
    activation: Activation = "none"
    explains: str | None = None
    cam_target: str | int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in get_args(OutputKind):
            raise _fail(
                f"output {self.name!r} has kind {self.kind!r}; "
                f"use one of {list(get_args(OutputKind))}"
            )
        if self.activation not in get_args(Activation):
            raise _fail(f"output {self.name!r} has activation {self.activation!r}")
        if not self.meaning.strip():
            raise _fail(f"output {self.name!r} has an empty meaning")
        if self.kind in ("logits", "probabilities"):
            if not self.classes:
                raise _fail(f"output {self.name!r} ({self.kind}) must name its classes")
            axis = self.shape[1] if len(self.shape) > 1 else None
            if isinstance(axis, int) and axis != len(self.classes):
                raise _fail(
                    f"output {self.name!r} has {axis} scores per sample but "
                    f"{len(self.classes)} classes"
                )
        if self.kind in _CAM_KINDS:
            if self.explains is None:
                raise _fail(f"CAM output {self.name!r} must say which output it explains")
            if self.cam_target is None:
                raise _fail(f"CAM output {self.name!r} must give cam_target")
            if isinstance(self.cam_target, str) and self.cam_target not in ("all", "predicted"):
                raise _fail(
                    f"CAM output {self.name!r} has cam_target {self.cam_target!r}; "
                    "use 'all', 'predicted' or a class index"
                )


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and what it gave on held-out data."""

    name: str
    output: str
    threshold: float
    sensitivity: float
    specificity: float
    class_name: str | None = None
    scale: ScoreScale = "probability"
    dataset: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise _fail(f"operating point {self.name!r} has a non-finite threshold")
        for label, value in (("sensitivity", self.sensitivity), ("specificity", self.specificity)):
            if not 0.0 <= value <= 1.0:
                raise _fail(f"operating point {self.name!r} has {label} {value} outside [0, 1]")
        if self.scale == "probability" and not 0.0 <= self.threshold <= 1.0:
            raise _fail(
                f"operating point {self.name!r} has probability threshold "
                f"{self.threshold} outside [0, 1]"
            )


@dataclass(frozen=True)
class Metric:
    """A held-out metric with its confidence interval (a point estimate alone misleads)."""

    name: str
    value: float
    ci_lower: float
    ci_upper: float
    ci_level: float = 0.95
    method: str = ""
    dataset: str = ""

    def __post_init__(self) -> None:
        if not self.ci_lower <= self.value <= self.ci_upper:
            raise _fail(
                f"metric {self.name!r}: value {self.value} is outside its confidence "
                f"interval [{self.ci_lower}, {self.ci_upper}]"
            )
        if not 0.0 < self.ci_level < 1.0:
            raise _fail(f"metric {self.name!r}: ci_level {self.ci_level} is not in (0, 1)")


@dataclass(frozen=True)
class TrainingData:
    """Where the training data came from and how much there was of it."""

    description: str
    cases: Mapping[str, int] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    synthetic: bool = False

    def __post_init__(self) -> None:
        if not self.description.strip():
            raise _fail("training_data.description is empty")


@dataclass(frozen=True)
class ResourceEstimate:
    """Memory one sample needs, measured at export, for the runtime's batch budget."""

    activation_bytes_per_sample: int
    method: str = ""


@dataclass(frozen=True)
class ModelCard:
    """The parsed, validated model.yaml."""

    name: str
    version: str
    task: str
    modality: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    preprocessing: tuple[Mapping[str, Any], ...]
    outputs: tuple[OutputSpec, ...]
    operating_points: tuple[OperatingPoint, ...]
    training_data: TrainingData
    metrics: tuple[Metric, ...]
    intended_use: str
    sha256: str
    card_version: int = CARD_VERSION
    resources: ResourceEstimate | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    limitations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise _fail(
                f"name {self.name!r} must be lower-case letters, digits, '.', '_' or "
                "'-' (it is also the package directory's name)"
            )
        if self.card_version != CARD_VERSION:
            raise _fail(
                f"card_version {self.card_version} is not supported "
                f"(this node reads version {CARD_VERSION})"
            )
        if not _SHA256.match(self.sha256):
            raise _fail("sha256 must be 64 lower-case hexadecimal digits")
        for label, value in (
            ("version", self.version),
            ("task", self.task),
            ("intended_use", self.intended_use),
        ):
            if not value.strip():
                raise _fail(f"{label} is empty")
        if not self.modality:
            raise _fail("modality names no DICOM Modality")
        if not self.inputs or not self.outputs:
            raise _fail("a model needs at least one input and one output")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _fail(f"tensor names are not unique: {duplicates}")
        outputs = {o.name: o for o in self.outputs}
        for out in self.outputs:
            if out.explains is not None:
                explained = outputs.get(out.explains)
                if explained is None or explained.kind not in _SCORE_KINDS:
                    raise _fail(
                        f"output {out.name!r} explains {out.explains!r}, "
                        "which is not a score output of this model"
                    )
        for point in self.operating_points:
            target = outputs.get(point.output)
            if target is None or target.kind not in ("logits", "probabilities", "risk"):
                raise _fail(
                    f"operating point {point.name!r} refers to output "
                    f"{point.output!r}, which is not a score output"
                )
            if point.class_name is not None and point.class_name not in target.classes:
                raise _fail(
                    f"operating point {point.name!r} names class {point.class_name!r},"
                    f" not one of {list(target.classes)}"
                )

    # -- lookups ---------------------------------------------------------------------------

    def output(self, name: str) -> OutputSpec:
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"model {self.name} has no output {name!r}")

    @property
    def cam_outputs(self) -> tuple[OutputSpec, ...]:
        return tuple(o for o in self.outputs if o.kind in _CAM_KINDS)

    def operating_point(self, name: str) -> OperatingPoint:
        for point in self.operating_points:
            if point.name == name:
                return point
        raise KeyError(f"model {self.name} has no operating point {name!r}")

    # -- YAML round trip -------------------------------------------------------------------

    def to_mapping(self) -> dict[str, Any]:
        """Plain data for ``yaml.safe_dump``; ``from_mapping`` inverts it exactly."""
        data: dict[str, Any] = {
            "card_version": self.card_version,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "modality": list(self.modality),
            "intended_use": self.intended_use,
            "inputs": [_tensor_mapping(t) for t in self.inputs],
            "preprocessing": [_plain(step) for step in self.preprocessing],
            "outputs": [_output_mapping(o) for o in self.outputs],
            "operating_points": [_operating_point_mapping(p) for p in self.operating_points],
            "training_data": {
                "description": self.training_data.description,
                "cases": dict(self.training_data.cases),
                "sources": list(self.training_data.sources),
                "synthetic": self.training_data.synthetic,
            },
            "metrics": [
                {
                    "name": m.name,
                    "value": m.value,
                    "ci": [m.ci_lower, m.ci_upper],
                    "ci_level": m.ci_level,
                    "method": m.method,
                    "dataset": m.dataset,
                }
                for m in self.metrics
            ],
            "limitations": list(self.limitations),
        }
        if self.resources is not None:
            data["resources"] = {
                "activation_bytes_per_sample": self.resources.activation_bytes_per_sample,
                "method": self.resources.method,
            }
        data["provenance"] = _plain(self.provenance)
        data["sha256"] = self.sha256
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            self.to_mapping(),
            sort_keys=False,
            allow_unicode=True,
            width=96,
            default_flow_style=None,
        )

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "<model card>") -> ModelCard:
        """Parse and validate; every missing key is reported at once, with its path."""
        if not isinstance(data, Mapping):
            raise InvalidCardError(f"model card {source} is not a mapping of keys to values")
        missing = _missing_keys(data)
        if missing:
            raise IncompleteCardError(source, missing)
        try:
            return _parse_card(data)
        except InvalidCardError as exc:
            raise InvalidCardError(f"model card {source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidCardError(f"model card {source}: {exc}") from None


# --- parsing helpers ---------------------------------------------------------------------

_REQUIRED: tuple[str, ...] = (
    "name",
    "version",
    "task",
    "modality",
    "inputs",
    "preprocessing",
    "outputs",
    "operating_points",
    "training_data",
    "metrics",
    "intended_use",
    "sha256",
)
_REQUIRED_ITEM: dict[str, tuple[str, ...]] = {
    "inputs": ("name", "shape", "dtype"),
    "outputs": ("name", "shape", "dtype", "kind", "meaning"),
    "operating_points": ("name", "output", "threshold", "sensitivity", "specificity"),
    "metrics": ("name", "value", "ci"),
}


def _missing_keys(data: Mapping[str, Any]) -> list[str]:
    missing = [key for key in _REQUIRED if key not in data or data[key] is None]
    for section, keys in _REQUIRED_ITEM.items():
        items = data.get(section)
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if isinstance(item, Mapping):
                missing += [
                    f"{section}[{index}].{k}" for k in keys if k not in item or item[k] is None
                ]
    training = data.get("training_data")
    if isinstance(training, Mapping) and training.get("description") is None:
        missing.append("training_data.description")
    return missing


def _as_str(value: object, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail(f"{key} must be text, got {type(value).__name__}")
    return str(value)


def _as_float(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{key} must be a number, got {value!r}")
    return float(value)


def _as_list(value: object, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(f"{key} must be a list, got {type(value).__name__}")
    return value


def _as_mapping(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(f"{key} must be a mapping, got {type(value).__name__}")
    return value


def _str_tuple(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(_as_str(v, f"{key}[{i}]") for i, v in enumerate(_as_list(value, key)))


def _shape(value: object, key: str) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for index, dim in enumerate(_as_list(value, key)):
        if isinstance(dim, bool) or not isinstance(dim, int | str):
            raise _fail(f"{key}[{index}] must be a size or a dimension name, got {dim!r}")
        dims.append(dim)
    return tuple(dims)


def _parse_tensor(item: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {
        "name": _as_str(item["name"], f"{key}.name"),
        "shape": _shape(item["shape"], f"{key}.shape"),
        "dtype": _as_str(item["dtype"], f"{key}.dtype"),
        "description": _as_str(item.get("description", ""), f"{key}.description"),
    }


def _parse_card(data: Mapping[str, Any]) -> ModelCard:
    inputs = tuple(
        TensorSpec(**_parse_tensor(_as_mapping(item, f"inputs[{i}]"), f"inputs[{i}]"))
        for i, item in enumerate(_as_list(data["inputs"], "inputs"))
    )
    outputs: list[OutputSpec] = []
    for i, raw in enumerate(_as_list(data["outputs"], "outputs")):
        key = f"outputs[{i}]"
        item = _as_mapping(raw, key)
        cam_target = item.get("cam_target")
        if cam_target is not None and (
            isinstance(cam_target, bool) or not isinstance(cam_target, str | int)
        ):
            raise _fail(f"{key}.cam_target must be 'all', 'predicted' or a class index")
        explains = item.get("explains")
        outputs.append(
            OutputSpec(
                **_parse_tensor(item, key),
                kind=cast(OutputKind, _as_str(item["kind"], f"{key}.kind")),
                meaning=_as_str(item["meaning"], f"{key}.meaning"),
                classes=_str_tuple(item.get("classes", []), f"{key}.classes"),
                activation=cast(
                    Activation, _as_str(item.get("activation", "none"), f"{key}.activation")
                ),
                explains=None if explains is None else _as_str(explains, f"{key}.explains"),
                cam_target=cam_target,
            )
        )
    points: list[OperatingPoint] = []
    for i, raw in enumerate(_as_list(data["operating_points"], "operating_points")):
        key = f"operating_points[{i}]"
        item = _as_mapping(raw, key)
        scale = _as_str(item.get("scale", "probability"), f"{key}.scale")
        if scale not in get_args(ScoreScale):
            raise _fail(f"{key}.scale must be one of {list(get_args(ScoreScale))}")
        class_name = item.get("class")
        points.append(
            OperatingPoint(
                name=_as_str(item["name"], f"{key}.name"),
                output=_as_str(item["output"], f"{key}.output"),
                threshold=_as_float(item["threshold"], f"{key}.threshold"),
                sensitivity=_as_float(item["sensitivity"], f"{key}.sensitivity"),
                specificity=_as_float(item["specificity"], f"{key}.specificity"),
                class_name=None if class_name is None else _as_str(class_name, f"{key}.class"),
                scale=cast(ScoreScale, scale),
                dataset=_as_str(item.get("dataset", ""), f"{key}.dataset"),
            )
        )
    metrics: list[Metric] = []
    for i, raw in enumerate(_as_list(data["metrics"], "metrics")):
        key = f"metrics[{i}]"
        item = _as_mapping(raw, key)
        ci = _as_list(item["ci"], f"{key}.ci")
        if len(ci) != 2:
            raise _fail(f"{key}.ci must be [lower, upper]")
        metrics.append(
            Metric(
                name=_as_str(item["name"], f"{key}.name"),
                value=_as_float(item["value"], f"{key}.value"),
                ci_lower=_as_float(ci[0], f"{key}.ci[0]"),
                ci_upper=_as_float(ci[1], f"{key}.ci[1]"),
                ci_level=_as_float(item.get("ci_level", 0.95), f"{key}.ci_level"),
                method=_as_str(item.get("method", ""), f"{key}.method"),
                dataset=_as_str(item.get("dataset", ""), f"{key}.dataset"),
            )
        )
    training = _as_mapping(data["training_data"], "training_data")
    cases_raw = _as_mapping(training.get("cases", {}), "training_data.cases")
    cases: dict[str, int] = {}
    for split, count in cases_raw.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _fail(f"training_data.cases.{split} must be a non-negative integer")
        cases[str(split)] = count
    synthetic = training.get("synthetic", False)
    if not isinstance(synthetic, bool):
        raise _fail("training_data.synthetic must be true or false")
    resources = None
    if data.get("resources") is not None:
        res = _as_mapping(data["resources"], "resources")
        per_sample = res.get("activation_bytes_per_sample")
        if isinstance(per_sample, bool) or not isinstance(per_sample, int) or per_sample < 0:
            raise _fail("resources.activation_bytes_per_sample must be a non-negative integer")
        resources = ResourceEstimate(per_sample, _as_str(res.get("method", ""), "resources.method"))
    card_version = data.get("card_version", CARD_VERSION)
    if isinstance(card_version, bool) or not isinstance(card_version, int):
        raise _fail("card_version must be an integer")
    preprocessing = tuple(
        dict(_as_mapping(step, f"preprocessing[{i}]"))
        for i, step in enumerate(_as_list(data["preprocessing"], "preprocessing"))
    )
    return ModelCard(
        name=_as_str(data["name"], "name"),
        version=_as_str(data["version"], "version"),
        task=_as_str(data["task"], "task"),
        modality=_str_tuple(data["modality"], "modality"),
        inputs=inputs,
        preprocessing=preprocessing,
        outputs=tuple(outputs),
        operating_points=tuple(points),
        training_data=TrainingData(
            description=_as_str(training["description"], "training_data.description"),
            cases=cases,
            sources=_str_tuple(training.get("sources", []), "training_data.sources"),
            synthetic=synthetic,
        ),
        metrics=tuple(metrics),
        intended_use=_as_str(data["intended_use"], "intended_use"),
        sha256=_as_str(data["sha256"], "sha256").lower(),
        card_version=card_version,
        resources=resources,
        provenance=dict(_as_mapping(data.get("provenance", {}), "provenance")),
        limitations=_str_tuple(data.get("limitations", []), "limitations"),
    )


def _plain(value: Any) -> Any:
    """Deep-copy into YAML-safe builtins (tuples become lists, numpy scalars numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    for plain in (bool, str, int, float):  # bool before int: bool is an int subclass
        if isinstance(value, plain):
            return plain(value)
    if value is None:
        return None
    raise InvalidCardError(f"{type(value).__name__} value {value!r} cannot be stored in a card")


def _tensor_mapping(tensor: TensorSpec) -> dict[str, Any]:
    data: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "dtype": tensor.dtype}
    if tensor.description:
        data["description"] = tensor.description
    return data


def _output_mapping(out: OutputSpec) -> dict[str, Any]:
    data = _tensor_mapping(out)
    data.update(
        {
            "kind": out.kind,
            "meaning": out.meaning,
            "classes": list(out.classes),
            "activation": out.activation,
        }
    )
    if out.explains is not None:
        data["explains"] = out.explains
    if out.cam_target is not None:
        data["cam_target"] = out.cam_target
    return data


def _operating_point_mapping(point: OperatingPoint) -> dict[str, Any]:
    data: dict[str, Any] = {"name": point.name, "output": point.output}
    if point.class_name is not None:
        data["class"] = point.class_name
    data.update(
        {
            "threshold": point.threshold,
            "scale": point.scale,
            "sensitivity": point.sensitivity,
            "specificity": point.specificity,
            "dataset": point.dataset,
        }
    )
    return data


# --- packages ------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a ResNet-50 is ~100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(path: Path) -> ModelCard:
    """Read and validate one model.yaml."""
    if not path.is_file():
        raise PackageNotFoundError(f"model card {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidCardError(f"model card {path} is not valid YAML: {exc}") from None
    return ModelCard.from_mapping(data, source=str(path))


@dataclass(frozen=True)
class ModelPackage:
    """A verified package: the card, and an ONNX file whose sha256 matches it."""

    directory: Path
    card: ModelCard

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def card_path(self) -> Path:
        return self.directory / CARD_FILE

    @property
    def sha256(self) -> str:
        return self.card.sha256


@dataclass(frozen=True)
class GraphSignature:
    """(name, shape, ONNX Runtime type string) of each graph input and output."""

    inputs: tuple[tuple[str, tuple[int | str | None, ...], str], ...]
    outputs: tuple[tuple[str, tuple[int | str | None, ...], str], ...]


def read_onnx_signature(path: Path) -> GraphSignature:
    """The graph's inputs and outputs as ONNX Runtime sees them, without optimising it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise SignatureMismatchError(str(path), [f"ONNX Runtime cannot load it ({exc})"]) from None
    return signature_of(session.get_inputs(), session.get_outputs())


def signature_of(inputs: Iterable[Any], outputs: Iterable[Any]) -> GraphSignature:
    """Convert ONNX Runtime ``NodeArg`` lists to plain tuples."""

    def convert(args: Iterable[Any]) -> tuple[tuple[str, tuple[int | str | None, ...], str], ...]:
        return tuple((str(a.name), tuple(a.shape), str(a.type)) for a in args)

    return GraphSignature(convert(inputs), convert(outputs))


def _dim_ok(declared: Dim, actual: int | str | None) -> bool:
    if isinstance(declared, int):
        # A fixed size in the card is fine for a dynamic graph axis: the card is stricter.
        return not isinstance(actual, int) or actual == declared
    return not isinstance(actual, int)


def signature_differences(
    declared: Sequence[TensorSpec],
    actual: Sequence[tuple[str, Sequence[int | str | None], str]],
    role: str,
) -> list[str]:
    """Human-readable differences between a card's tensors and the graph's."""
    differences: list[str] = []
    found = {name: (tuple(shape), dtype) for name, shape, dtype in actual}
    wanted = {spec.name for spec in declared}
    extra = [name for name in found if name not in wanted]
    if extra:
        differences.append(f"graph has {role}s {extra} that the card does not declare")
    for spec in declared:
        if spec.name not in found:
            differences.append(f"graph has no {role} named {spec.name!r}")
            continue
        shape, dtype = found[spec.name]
        if dtype != _ORT_TYPES[spec.dtype]:
            differences.append(
                f"{role} {spec.name!r} is {dtype} in the graph, {spec.dtype} in the card"
            )
        if len(shape) != len(spec.shape) or not all(
            _dim_ok(d, a) for d, a in zip(spec.shape, shape, strict=False)
        ):
            differences.append(
                f"{role} {spec.name!r} has shape {list(shape)} in the graph, "
                f"{list(spec.shape)} in the card"
            )
    return differences


def check_signature(card: ModelCard, signature: GraphSignature, source: str) -> None:
    """Raise :class:`SignatureMismatchError` naming every difference, not just the first."""
    differences = signature_differences(card.inputs, signature.inputs, "input")
    differences += signature_differences(card.outputs, signature.outputs, "output")
    if differences:
        raise SignatureMismatchError(source, differences)


def load_package(directory: Path | str, *, verify_signature: bool = True) -> ModelPackage:
    """Load ``directory`` (holding model.yaml and model.onnx) and prove they belong together.

    Checks, in order: both files exist; the card is complete and valid; the sha256 of
    model.onnx equals the card's; the graph's input and output names, dtypes and shapes
    match the card (skipped with ``verify_signature=False``, which the runtime then
    repeats on the session it opens anyway).
    """
    root = Path(directory)
    if not root.is_dir():
        raise PackageNotFoundError(f"model package {root} is not a directory")
    onnx_path = root / MODEL_FILE
    if not onnx_path.is_file():
        raise PackageNotFoundError(f"model package {root} has no {MODEL_FILE}")
    card = load_card(root / CARD_FILE)
    actual = sha256_file(onnx_path)
    if actual != card.sha256:
        raise ChecksumMismatchError(str(onnx_path), card.sha256, actual)
    if verify_signature:
        check_signature(card, read_onnx_signature(onnx_path), str(onnx_path))
    return ModelPackage(directory=root, card=card)
