"""torch -> ONNX, proven against torch, written as a model package (ARCHITECTURE §3).

A package is only written once ONNX Runtime has been shown to reproduce the torch
outputs within the stated tolerances at two batch sizes (so the dynamic batch axis is
exercised, not assumed). The card's tensor signature is read back from the exported graph
and from real ONNX Runtime runs rather than typed by hand, so it cannot drift from the
file, and the card carries the sha256 of exactly the bytes written. model.onnx and
model.yaml are each written to a temporary name and renamed, the card last, so a crash
leaves either the old package or a package that fails its checksum, never a plausible
half.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from dicomnode.inference.package import (
    CARD_FILE,
    MODEL_FILE,
    Activation,
    Dim,
    Metric,
    ModelCard,
    ModelPackage,
    OperatingPoint,
    OutputKind,
    OutputSpec,
    ResourceEstimate,
    TensorSpec,
    TrainingData,
    load_package,
    sha256_file,
)

__all__ = [
    "DEFAULT_OPSET",
    "AgreementReport",
    "ExportMismatchError",
    "OutputAgreement",
    "OutputDescription",
    "WrittenPackage",
    "compare_with_torch",
    "estimate_activation_bytes",
    "export_onnx",
    "write_model_package",
]

DEFAULT_OPSET = 18
Exporter = Literal["dynamo", "torchscript"]
_ORT_TO_DTYPE = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class ExportMismatchError(RuntimeError):
    """ONNX Runtime's outputs differ from torch's beyond the tolerances."""

    def __init__(self, report: AgreementReport) -> None:
        self.report = report
        worst = ", ".join(
            f"{o.name} (batch {o.batch_size}): max |Δ| {o.max_abs_diff:.3g}"
            for o in report.outputs
            if not o.passed
        )
        super().__init__(
            f"exported model disagrees with torch beyond rtol={report.rtol}, "
            f"atol={report.atol}: {worst}"
        )


@dataclass(frozen=True)
class OutputAgreement:
    """One output at one batch size: the largest absolute and relative differences."""

    name: str
    batch_size: int
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    passed: bool


@dataclass(frozen=True)
class AgreementReport:
    """ONNX Runtime vs torch on the same inputs, per output and batch size."""

    outputs: tuple[OutputAgreement, ...]
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)


@dataclass(frozen=True)
class OutputDescription:
    """What the caller knows about an output; shape and dtype come from the graph."""

    name: str
    kind: OutputKind
    meaning: str
    classes: tuple[str, ...] = ()
    activation: Activation = "none"
    explains: str | None = None
    cam_target: str | int | None = None


@dataclass(frozen=True)
class WrittenPackage:
    """The package as loaded back from disk, and the agreement that admitted it."""

    package: ModelPackage
    agreement: AgreementReport


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Restore each module's own flag: a wrapper built in train mode around an eval-mode
    # model must not flip the model into train mode on the way out.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The dynamo exporter logs a line per missing torchvision op and warns about
    # deprecated internals; none of it concerns the caller.
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _with_batch(tensor: Tensor, size: int) -> Tensor:
    """``tensor`` with axis 0 cycled or cut to ``size`` (inputs for another batch size)."""
    repeats = -(-size // tensor.shape[0])
    return torch.cat([tensor] * repeats, dim=0)[:size].contiguous()


def export_onnx(
    model: nn.Module,
    example_inputs: Mapping[str, Tensor],
    path: Path,
    *,
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    exporter: Exporter = "dynamo",
) -> Path:
    """Export ``model`` (in eval mode) to one self-contained ONNX file at ``path``.

    Inputs are named by the keys of ``example_inputs`` and passed positionally in that
    order; axis 0 of every input and output is dynamic unless ``dynamic_batch`` is off.
    The torch.export-based exporter is the default (the TorchScript one is deprecated in
    torch and kept only as a fall-back for models torch.export cannot capture). Weights
    are stored inside the file, never as external data, so the sha256 covers them.
    """
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17 or later")
    names = list(example_inputs)
    args = tuple(example_inputs.values())
    if dynamic_batch and exporter == "dynamo":
        # torch.export specialises a size-1 axis to a constant; 2 keeps it symbolic.
        args = tuple(_with_batch(a, 2) if a.shape[0] == 1 else a for a in args)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_mode(model), _quiet_exporter(), torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            dynamic_shapes = tuple({0: batch} for _ in args) if dynamic_batch else None
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=names,
                output_names=list(output_names),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        else:
            axes = {n: {0: "batch"} for n in (*names, *output_names)} if dynamic_batch else None
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=names,
                output_names=list(output_names),
                opset_version=opset,
                dynamo=False,
                dynamic_axes=axes,
            )
    return path


def _torch_outputs(model: nn.Module, args: Sequence[Tensor]) -> list[np.ndarray]:
    with _eval_mode(model), torch.no_grad():
        result = model(*args)
    tensors = list(result) if isinstance(result, tuple | list) else [result]
    return [
        t.detach().cpu().float().numpy() if t.dtype == torch.float16 else t.detach().cpu().numpy()
        for t in tensors
    ]


def compare_with_torch(
    model: nn.Module,
    onnx_path: Path,
    example_inputs: Mapping[str, Tensor],
    *,
    batch_sizes: Sequence[int] | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> AgreementReport:
    """Run torch and ONNX Runtime (CPU) on the same inputs and compare every output.

    An element passes when ``|onnx - torch| <= atol + rtol * |torch|`` (numpy's
    ``allclose``). The relative difference is reported over elements with
    ``|torch| > atol`` only, since near zero it measures noise.
    """
    first = next(iter(example_inputs.values()))
    sizes = (
        list(batch_sizes)
        if batch_sizes is not None
        else [int(first.shape[0]), int(first.shape[0]) + 1]
    )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    results: list[OutputAgreement] = []
    for size in sizes:
        args = [_with_batch(t, size) for t in example_inputs.values()]
        expected = _torch_outputs(model, args)
        feed = {
            name: a.detach().cpu().numpy() for name, a in zip(example_inputs, args, strict=True)
        }
        actual = session.run(output_names, feed)
        if len(actual) != len(expected):
            raise ExportMismatchError(
                AgreementReport(
                    (OutputAgreement("<count>", size, (), float("inf"), float("inf"), False),),
                    rtol,
                    atol,
                )
            )
        for name, got, want in zip(output_names, actual, expected, strict=True):
            got = np.asarray(got, dtype=np.float64)
            want = np.asarray(want, dtype=np.float64)
            if got.shape != want.shape:
                results.append(
                    OutputAgreement(name, size, tuple(got.shape), float("inf"), float("inf"), False)
                )
                continue
            diff = np.abs(got - want)
            significant = np.abs(want) > atol
            rel = (
                float((diff[significant] / np.abs(want[significant])).max())
                if significant.any()
                else 0.0
            )
            results.append(
                OutputAgreement(
                    name=name,
                    batch_size=size,
                    shape=tuple(int(d) for d in got.shape),
                    max_abs_diff=float(diff.max()) if diff.size else 0.0,
                    max_rel_diff=rel,
                    passed=bool(np.allclose(got, want, rtol=rtol, atol=atol)),
                )
            )
    return AgreementReport(tuple(results), rtol, atol)


def estimate_activation_bytes(onnx_path: Path) -> int:
    """Peak bytes of live intermediate tensors for one sample (batch 1), in graph order.

    ONNX shape inference sizes every intermediate tensor with the batch axis set to 1;
    walking the nodes in order, a tensor is live from the node that makes it to the last
    node that reads it. The peak of the live total approximates what ONNX Runtime's
    memory planner needs per sample (it excludes weights and convolution workspace, and
    tensors whose size inference cannot fix are left out).
    """
    import onnx

    model = onnx.load(str(onnx_path))
    graph = model.graph
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    del graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    sizes: dict[str, int] = {}
    for value in (*inferred.value_info, *inferred.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        if any(d < 0 for d in dims):
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    last_use: dict[str, int] = {}
    for index, node in enumerate(inferred.node):
        for name in node.input:
            last_use[name] = index
    keep = {o.name for o in inferred.output}
    live = peak = 0
    for index, node in enumerate(inferred.node):
        for name in node.output:
            live += sizes.get(name, 0)
        peak = max(peak, live)
        for name in set(node.input):
            if last_use.get(name) == index and name in sizes and name not in keep:
                live -= sizes[name]
    return peak


def _signature(
    session: ort.InferenceSession, example_inputs: Mapping[str, Tensor], sizes: Sequence[int]
) -> tuple[list[tuple[str, tuple[Dim, ...], str]], list[tuple[str, tuple[Dim, ...], str]]]:
    """Input and output specs: graph shapes, with output sizes fixed where runs agree."""
    runs = []
    for size in sizes:
        feed = {n: _with_batch(t, size).cpu().numpy() for n, t in example_inputs.items()}
        runs.append(session.run(None, feed))

    def dims_of(arg: Any) -> tuple[Dim, ...]:
        return tuple(d if isinstance(d, int) else str(d or "dynamic") for d in arg.shape)

    inputs = [(a.name, dims_of(a), _ORT_TO_DTYPE[a.type]) for a in session.get_inputs()]
    outputs: list[tuple[str, tuple[Dim, ...], str]] = []
    for index, arg in enumerate(session.get_outputs()):
        graph_dims = dims_of(arg)
        observed = [run[index].shape for run in runs]
        dims: list[Dim] = []
        for axis, graph_dim in enumerate(graph_dims):
            seen = {shape[axis] for shape in observed}
            if axis == 0 and len(seen) > 1:
                dims.append(graph_dim if isinstance(graph_dim, str) else "batch")
            elif len(seen) == 1 and isinstance(graph_dim, str) and axis > 0:
                dims.append(int(seen.pop()))
            else:
                dims.append(graph_dim)
        outputs.append((arg.name, tuple(dims), _ORT_TO_DTYPE[arg.type]))
    return inputs, outputs


def _replace_atomically(source: Path, target: Path) -> None:
    with source.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, target)


def write_model_package(
    model: nn.Module,
    example_inputs: Mapping[str, Tensor],
    models_dir: Path,
    *,
    name: str,
    version: str,
    task: str,
    modality: Sequence[str] | str,
    outputs: Sequence[OutputDescription],
    preprocessing: Sequence[Mapping[str, Any]],
    operating_points: Sequence[OperatingPoint],
    training_data: TrainingData,
    metrics: Sequence[Metric],
    intended_use: str,
    input_descriptions: Mapping[str, str] | None = None,
    limitations: Sequence[str] = (),
    opset: int = DEFAULT_OPSET,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    exporter: Exporter = "dynamo",
) -> WrittenPackage:
    """Export, verify and write ``models_dir/<name>/model.onnx`` + ``model.yaml``.

    ``outputs`` describe the model's outputs in the order ``forward`` returns them;
    ``preprocessing`` is stored as given (it is the ``dicomnode.imaging`` spec that both
    training and serving run). Raises :class:`ExportMismatchError` when ONNX Runtime and
    torch disagree, and the card's own validation errors (e.g. an operating point naming
    an unknown output) before anything is written over an existing package.
    """
    directory = models_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    temp_onnx = directory / f".{MODEL_FILE}.tmp"
    temp_card = directory / f".{CARD_FILE}.tmp"
    try:
        export_onnx(
            model,
            example_inputs,
            temp_onnx,
            output_names=[o.name for o in outputs],
            opset=opset,
            exporter=exporter,
        )
        first = int(next(iter(example_inputs.values())).shape[0])
        sizes = [first, first + 1]
        agreement = compare_with_torch(
            model, temp_onnx, example_inputs, batch_sizes=sizes, rtol=rtol, atol=atol
        )
        if not agreement.passed:
            raise ExportMismatchError(agreement)
        session = ort.InferenceSession(str(temp_onnx), providers=["CPUExecutionProvider"])
        input_sigs, output_sigs = _signature(session, example_inputs, sizes)
        descriptions = input_descriptions or {}
        by_name = {o.name: o for o in outputs}
        card = ModelCard(
            name=name,
            version=version,
            task=task,
            modality=(modality,) if isinstance(modality, str) else tuple(modality),
            inputs=tuple(TensorSpec(n, s, d, descriptions.get(n, "")) for n, s, d in input_sigs),
            preprocessing=tuple(dict(step) for step in preprocessing),
            outputs=tuple(
                OutputSpec(
                    n,
                    s,
                    d,
                    kind=by_name[n].kind,
                    meaning=by_name[n].meaning,
                    classes=tuple(by_name[n].classes),
                    activation=by_name[n].activation,
                    explains=by_name[n].explains,
                    cam_target=by_name[n].cam_target,
                )
                for n, s, d in output_sigs
            ),
            operating_points=tuple(operating_points),
            training_data=training_data,
            metrics=tuple(metrics),
            intended_use=intended_use,
            sha256=sha256_file(temp_onnx),
            resources=ResourceEstimate(
                estimate_activation_bytes(temp_onnx),
                "peak live intermediate tensors at batch 1 (ONNX shape inference)",
            ),
            provenance={
                "exporter": f"torch.onnx ({exporter})",
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "opset": opset,
                "agreement": {
                    "rtol": rtol,
                    "atol": atol,
                    "batch_sizes": sizes,
                    "max_abs_diff": agreement.max_abs_diff,
                    "max_rel_diff": agreement.max_rel_diff,
                },
            },
            limitations=tuple(limitations),
        )
        temp_card.write_text(card.to_yaml(), encoding="utf-8")
        _replace_atomically(temp_onnx, directory / MODEL_FILE)
        _replace_atomically(temp_card, directory / CARD_FILE)
    finally:
        temp_onnx.unlink(missing_ok=True)
        temp_card.unlink(missing_ok=True)
    return WrittenPackage(load_package(directory), agreement)
