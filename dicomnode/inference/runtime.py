"""ONNX Runtime sessions: opened once, kept warm, fed in bounded batches.

A session costs from tens of milliseconds (small CNN) to a second or more (ResNet-50 on
a GPU, with cuDNN autotuning) to create, so workers take sessions from a
:class:`SessionCache` keyed by the package's path and sha256 and the settings, instead
of opening one per study. The execution provider is chosen at run time — CUDA when the
installed onnxruntime has it and a GPU answers, else CPU — and what ONNX Runtime really
enabled is reported with every result, because a silent fall-back to CPU is the usual
reason a GPU node is slow.

A series arrives as (N, C, H, W) with N anywhere from 1 to several hundred; running it in
one call would size ONNX Runtime's arena for the largest series ever seen. The session
splits axis 0 into batches no larger than ``max_batch`` and no larger than the memory
budget allows (see :func:`plan_batch_size`), and concatenates the outputs, which is
exact: every model here is evaluated per sample (batch norm in eval mode).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from dicomnode.inference.errors import (
    InferenceRunError,
    InputValidationError,
    ProviderUnavailableError,
    ResourceBudgetError,
)
from dicomnode.inference.package import (
    CARD_FILE,
    MODEL_FILE,
    ModelPackage,
    TensorSpec,
    check_signature,
    load_package,
    signature_of,
)

__all__ = [
    "CPU",
    "CUDA",
    "InferenceResult",
    "ModelSession",
    "RuntimeSettings",
    "SessionCache",
    "available_providers",
    "default_cache",
    "open_model",
    "open_session",
    "plan_batch_size",
    "resolve_providers",
]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "gpu": CUDA,
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}
_OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeSettings:
    """How sessions are opened and fed; one value per node, from its config.

    ``providers`` None means "CUDA if this onnxruntime build has it, then CPU"; a tuple
    lists providers by ORT name or alias (cpu, cuda, tensorrt, rocm) in priority order.
    ``intra_op_threads``/``inter_op_threads`` 0 leave ONNX Runtime's defaults (one
    thread per physical core); on a node shared with a PACS, set them. With
    ``memory_budget_bytes`` the batch size is derived from the bytes one sample needs
    (inputs + outputs + the activation estimate in the card) and capped by
    ``max_batch``; on CUDA the budget plus the weights also caps the GPU arena.
    """

    providers: tuple[str, ...] | None = None
    require_gpu: bool = False
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    max_batch: int = 16
    memory_budget_bytes: int | None = None
    cpu_mem_arena: bool = True
    allow_spinning: bool = True
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    reject_non_finite: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = ONNX Runtime's default)")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ValueError("memory_budget_bytes must be positive or None")
        if self.graph_optimization not in _OPTIMIZATION:
            raise ValueError(f"graph_optimization must be one of {sorted(_OPTIMIZATION)}")
        if self.providers is not None and not self.providers:
            raise ValueError("providers must name at least one provider, or be None for auto")


@dataclass(frozen=True)
class InferenceResult:
    """Outputs by name (in card order) and how they were computed."""

    outputs: Mapping[str, np.ndarray]
    provider: str
    providers: tuple[str, ...]
    batch_size: int
    batches: int
    seconds: float

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def available_providers() -> tuple[str, ...]:
    """Providers compiled into the installed onnxruntime (not proof that a GPU exists)."""
    return tuple(ort.get_available_providers())


def resolve_providers(settings: RuntimeSettings) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list to request, CPU always last as the fall-back for any node."""
    available = available_providers()
    if settings.providers is None:
        names = [CUDA, CPU] if CUDA in available else [CPU]
    else:
        names = [_ALIASES.get(p.lower(), p) for p in settings.providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise ProviderUnavailableError(
                f"execution providers {missing} are not in this onnxruntime build "
                f"(it has {list(available)}); install onnxruntime-gpu for CUDA"
            )
        if CPU not in names:
            names.append(CPU)
    if settings.require_gpu and CUDA not in names:
        raise ProviderUnavailableError(
            f"a GPU is required but CUDA is not available (providers: {list(available)})"
        )
    resolved: list[str | tuple[str, dict[str, str]]] = []
    for name in names:
        if name == CUDA:
            options = {
                "device_id": str(settings.device_id),
                "arena_extend_strategy": "kSameAsRequested",
            }
            resolved.append((name, options))
        else:
            resolved.append(name)
    return resolved


def plan_batch_size(package: ModelPackage, settings: RuntimeSettings) -> int:
    """Largest batch that fits ``settings.memory_budget_bytes``, capped by ``max_batch``.

    Per-sample bytes = input bytes + output bytes + the card's activation estimate
    (peak live intermediate tensors for one sample, computed at export). Without a
    budget, or without the numbers to apply one, ``max_batch`` is used as given.
    """
    card = package.card
    budget = settings.memory_budget_bytes
    if budget is None:
        return settings.max_batch
    io_sizes = [t.bytes_per_sample() for t in (*card.inputs, *card.outputs)]
    if card.resources is None or any(size is None for size in io_sizes):
        log.warning(
            "model %s: the card has no per-sample memory estimate (or a dynamic non-batch "
            "axis); the memory budget is not applied, batches are max_batch=%d",
            card.name,
            settings.max_batch,
        )
        return settings.max_batch
    per_sample = card.resources.activation_bytes_per_sample + sum(s or 0 for s in io_sizes)
    fits = budget // max(per_sample, 1)
    if fits < 1:
        raise ResourceBudgetError(
            f"model {card.name} needs about {per_sample / 2**20:.1f} MiB per sample; the "
            f"memory budget of {budget / 2**20:.1f} MiB cannot hold one"
        )
    return int(min(settings.max_batch, fits))


class ModelSession:
    """One warm ONNX Runtime session for one package; safe to share between threads."""

    def __init__(self, package: ModelPackage, settings: RuntimeSettings | None = None) -> None:
        self.package = package
        self.settings = settings or RuntimeSettings()
        card = package.card
        self.batch_size = plan_batch_size(package, self.settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = self.settings.inter_op_threads
        options.enable_cpu_mem_arena = self.settings.cpu_mem_arena
        options.graph_optimization_level = _OPTIMIZATION[self.settings.graph_optimization]
        options.log_severity_level = 3
        if not self.settings.allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        requested = resolve_providers(self.settings)
        if self.settings.memory_budget_bytes is not None:
            weights = package.onnx_path.stat().st_size
            for entry in requested:
                if isinstance(entry, tuple) and entry[0] == CUDA:
                    entry[1]["gpu_mem_limit"] = str(self.settings.memory_budget_bytes + weights)
        started = time.perf_counter()
        try:
            self._session = ort.InferenceSession(
                str(package.onnx_path), options, providers=requested
            )
        except Exception as exc:  # ORT raises pybind Fail/RuntimeException types
            raise InferenceRunError(
                f"ONNX Runtime cannot open model {card.name} {card.version}: {exc}"
            ) from exc
        self.open_seconds = time.perf_counter() - started
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        wanted_cuda = any((e[0] if isinstance(e, tuple) else e) == CUDA for e in requested)
        if wanted_cuda and CUDA not in self.providers:
            if self.settings.require_gpu:
                raise ProviderUnavailableError(
                    f"model {card.name}: CUDA was requested but ONNX Runtime enabled only "
                    f"{list(self.providers)} (no usable GPU or CUDA/cuDNN libraries)"
                )
            log.warning("model %s: CUDA unavailable, running on %s", card.name, self.providers)
        check_signature(
            card,
            signature_of(self._session.get_inputs(), self._session.get_outputs()),
            str(package.onnx_path),
        )
        self._output_names = [o.name for o in card.outputs]
        self._splittable = all(t.batched for t in (*card.inputs, *card.outputs))
        log.info(
            "model %s %s opened on %s in %.2f s (batch size %d)",
            card.name,
            card.version,
            self.provider,
            self.open_seconds,
            self.batch_size,
        )

    @property
    def provider(self) -> str:
        """The highest-priority provider ONNX Runtime actually enabled."""
        return self.providers[0]

    @property
    def card_inputs(self) -> tuple[TensorSpec, ...]:
        return self.package.card.inputs

    def validate(self, inputs: Mapping[str, Any] | np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Check names, dtypes and shapes against the card; returns the arrays and N.

        Mistakes are reported in the card's terms (``input 'image' has shape (3, 256,
        256); the model expects (batch, 1, 256, 256)``) instead of as an ONNX Runtime
        stack trace, and a float64 array is refused rather than silently cast, because a
        wrong dtype usually means the wrong preprocessing ran.
        """
        card = self.package.card
        specs = {t.name: t for t in card.inputs}
        if isinstance(inputs, np.ndarray):
            if len(specs) != 1:
                raise InputValidationError(
                    f"model {card.name} has inputs {list(specs)}; pass a mapping of name to array"
                )
            inputs = {card.inputs[0].name: inputs}
        unknown = sorted(set(inputs) - set(specs))
        missing = [name for name in specs if name not in inputs]
        if unknown or missing:
            raise InputValidationError(
                f"model {card.name} expects inputs {list(specs)}; "
                f"missing {missing}, unexpected {unknown}"
            )
        arrays: dict[str, np.ndarray] = {}
        batch: int | None = None
        for name, spec in specs.items():
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise InputValidationError(
                    f"input {name!r} is a {type(value).__name__}, not a numpy array"
                )
            if value.dtype != spec.numpy_dtype:
                raise InputValidationError(
                    f"input {name!r} has dtype {value.dtype}; model {card.name} expects "
                    f"{spec.dtype}"
                )
            if value.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, value.shape, strict=True)
            ):
                raise InputValidationError(
                    f"input {name!r} has shape {tuple(value.shape)}; model {card.name} "
                    f"expects {spec.describe_shape()}"
                )
            if spec.batched:
                if batch is None:
                    batch = int(value.shape[0])
                elif value.shape[0] != batch:
                    raise InputValidationError(
                        f"input {name!r} has {value.shape[0]} samples, another input has {batch}"
                    )
            if (
                self.settings.reject_non_finite
                and value.dtype.kind == "f"
                and not np.isfinite(value).all()
            ):
                raise InputValidationError(f"input {name!r} contains NaN or infinite values")
            arrays[name] = np.ascontiguousarray(value)
        if batch == 0:
            raise InputValidationError(f"model {card.name} was given an empty batch")
        return arrays, batch if batch is not None else 1

    def run(self, inputs: Mapping[str, Any] | np.ndarray) -> InferenceResult:
        """Validate, run in batches of :attr:`batch_size`, and concatenate along axis 0."""
        arrays, total = self.validate(inputs)
        step = self.batch_size if self._splittable else total
        started = time.perf_counter()
        chunks: list[list[np.ndarray]] = []
        batches = 0
        for start in range(0, total, step):
            stop = min(start + step, total)
            feed = {
                name: (array[start:stop] if spec.batched else array)
                for (name, array), spec in zip(arrays.items(), self.card_inputs, strict=True)
            }
            try:
                chunks.append(self._session.run(self._output_names, feed))
            except Exception as exc:  # ORT's pybind error types are not importable stably
                raise InferenceRunError(
                    f"model {self.package.card.name} failed on samples {start}..{stop - 1} "
                    f"({self.provider}): {exc}"
                ) from exc
            batches += 1
        if len(chunks) == 1:
            merged = chunks[0]
        else:
            merged = [
                np.concatenate([c[i] for c in chunks], axis=0)
                for i in range(len(self._output_names))
            ]
        return InferenceResult(
            outputs=dict(zip(self._output_names, merged, strict=True)),
            provider=self.provider,
            providers=self.providers,
            batch_size=step,
            batches=batches,
            seconds=time.perf_counter() - started,
        )

    def warm_up(self) -> None:
        """Run one zero batch so the first study does not pay for arena growth/autotune."""
        feed: dict[str, np.ndarray] = {}
        for spec in self.card_inputs:
            dims = [
                self.batch_size if (i == 0 and spec.batched) else d
                for i, d in enumerate(spec.shape)
            ]
            if not all(isinstance(d, int) for d in dims):
                log.info("model %s: dynamic input shape, skipping warm-up", self.package.card.name)
                return
            feed[spec.name] = np.zeros([int(d) for d in dims], dtype=spec.numpy_dtype)
        self.run(feed)


def _file_identity(directory: Path) -> tuple[tuple[int, int, int], ...]:
    identity = []
    for name in (MODEL_FILE, CARD_FILE):
        stat = (directory / name).stat()
        identity.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(identity)


class SessionCache:
    """Sessions by (ONNX path, sha256, settings): one per model and configuration.

    Keying on the sha256 means a package re-exported in place gets a fresh session on
    the next :meth:`get` with the re-loaded package, never the stale one. :meth:`open`
    also remembers verified packages by the two files' inode, size and mtime, so a
    worker can ask for a model directory per job without re-hashing 100 MB each time,
    while a replaced file is verified again before it is served.
    """

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str, RuntimeSettings], ModelSession] = {}
        self._packages: dict[str, tuple[tuple[tuple[int, int, int], ...], ModelPackage]] = {}
        self._lock = threading.Lock()

    def open(self, directory: Path | str, settings: RuntimeSettings | None = None) -> ModelSession:
        """The warm session for the package in ``directory``, verifying it when it changed."""
        root = Path(directory).resolve()
        try:
            identity = _file_identity(root)
        except OSError:
            identity = ()
        with self._lock:
            known = self._packages.get(str(root))
        if known is not None and identity and known[0] == identity:
            package = known[1]
        else:
            # The session re-checks the signature on the graph it opens.
            package = load_package(root, verify_signature=False)
            with self._lock:
                self._packages[str(root)] = (identity, package)
        return self.get(package, settings)

    def get(self, package: ModelPackage, settings: RuntimeSettings | None = None) -> ModelSession:
        settings = settings or RuntimeSettings()
        key = (str(Path(package.onnx_path).resolve()), package.sha256, settings)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = ModelSession(package, settings)
                self._sessions[key] = session
            return session

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._packages.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


default_cache = SessionCache()


def open_session(
    package: ModelPackage,
    settings: RuntimeSettings | None = None,
    *,
    cache: SessionCache | None = None,
) -> ModelSession:
    """The warm session for ``package`` from ``cache`` (the process-wide one by default)."""
    return (cache if cache is not None else default_cache).get(package, settings)


def open_model(
    directory: Path | str,
    settings: RuntimeSettings | None = None,
    *,
    cache: SessionCache | None = None,
) -> ModelSession:
    """Load (or reuse) the package in ``directory`` and return its warm session."""
    return (cache if cache is not None else default_cache).open(directory, settings)
