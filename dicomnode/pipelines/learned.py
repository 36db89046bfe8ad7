"""What every learned analysis shares when it is served.

A model is loaded from its package (sha256 and signature verified), its session is kept
warm in the worker process, and its input is built with the preprocessing spec read from
its own card through ``dicomnode.imaging`` — the same code that built the training
tensors, so serving cannot drift from training (seed 004's failure). The card's
fingerprint of that spec is checked too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.inference.errors import InferenceError
from dicomnode.inference.package import ModelCard, ModelPackage, OperatingPoint
from dicomnode.inference.runtime import ModelSession, RuntimeSettings, SessionCache
from dicomnode.pipelines.base import PipelineError, PipelineInput
from dicomnode.results import sr as results_sr
from dicomnode.results.common import AlgorithmInfo
from dicomnode.results.sc import overlay_heatmap

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")

_CACHE = SessionCache()
_DISPLAY = PreprocessSpec.from_dict([{"name": "modality_lut"},
                                     {"name": "robust_minmax", "low_percentile": 0.5,
                                      "high_percentile": 99.5}])
BRAIN_WINDOW_DISPLAY = PreprocessSpec.from_dict([{"name": "hounsfield"},
                                                 {"name": "window", "preset": "brain"}])


class ModelUnavailableError(PipelineError):
    """The route names a model package that is missing or invalid on this node."""


@dataclass(frozen=True)
class ServedModel:
    package: ModelPackage
    session: ModelSession
    spec: PreprocessSpec
    algorithm: AlgorithmInfo

    @property
    def card(self) -> ModelCard:
        return self.package.card

    def run(self, tensor: npt.NDArray[np.float32]) -> Mapping[str, npt.NDArray[Any]]:
        """One batched pass; every output (logits and CAM) comes from the same forward."""
        try:
            return self.session.run(tensor).outputs
        except InferenceError as exc:
            raise PipelineError(f"model {self.card.name}: {exc}") from exc

    def preprocess(self, datasets: Sequence[Dataset]) -> npt.NDArray[np.float32]:
        return apply_spec(self.spec, list(datasets))

    def operating_point(self, preferred: str | None,
                        fallbacks: Sequence[str] = ()) -> OperatingPoint:
        """The named operating point, else the first fallback the card has, else its first."""
        points = {p.name: p for p in self.card.operating_points}
        for name in (preferred, *fallbacks):
            if name and name in points:
                return points[name]
        if preferred:
            raise PipelineError(f"model {self.card.name} has no operating point {preferred!r}; "
                                f"it has {', '.join(points)}")
        return self.card.operating_points[0]


def load_model(models_dir: Path, name: str, options: Mapping[str, Any] | None = None
               ) -> ServedModel:
    """Open ``models_dir/name`` once per worker process and keep it warm."""
    directory = models_dir / name
    if not (directory / "model.yaml").is_file():
        raise ModelUnavailableError(f"model package {name!r} not found in {models_dir}")
    opts = options or {}
    settings = RuntimeSettings(max_batch=int(opts.get("max_batch", 16)),
                               intra_op_threads=int(opts.get("threads", 0)))
    try:
        session = _CACHE.open(directory, settings)
    except InferenceError as exc:
        raise ModelUnavailableError(f"model package {name!r}: {exc}") from exc
    package = session.package
    spec = PreprocessSpec.from_dict(list(package.card.preprocessing))
    expected = package.card.provenance.get("preprocessing_fingerprint")
    if expected:
        spec.require_fingerprint(str(expected))
    algorithm = AlgorithmInfo(package.card.name, package.card.version, package.sha256,
                              parameters=(f"preprocessing {spec.fingerprint}",))
    return ServedModel(package, session, spec, algorithm)


def sr_operating_point(point: OperatingPoint) -> results_sr.OperatingPoint:
    return results_sr.OperatingPoint(point.name, point.threshold, point.sensitivity,
                                     point.specificity)


def display_image(ds: Dataset, frame: int = 0,
                  display: PreprocessSpec | None = None) -> npt.NDArray[np.float32]:
    """The image as a reader would see it: modality LUT, robust window (or ``display``),
    MONOCHROME1 inverted; (rows, columns) in [0, 1] at the source resolution."""
    tensor = apply_spec(display or _DISPLAY, [ds])
    return np.asarray(tensor[frame, 0], dtype=np.float32)


def heatmap_overlay(ds: Dataset, cam: npt.NDArray[Any], frame: int = 0,
                    alpha: float = 0.45,
                    display: PreprocessSpec | None = None) -> npt.NDArray[np.uint8]:
    """The CAM, resized to the source image, over the image at its own resolution and
    aspect ratio, so the picture lines up with what the radiologist already has."""
    base = display_image(ds, frame, display)
    rows, cols = base.shape
    heat = cv2.resize(np.asarray(cam, dtype=np.float32), (cols, rows),
                      interpolation=cv2.INTER_LINEAR)
    grey = np.clip(base * 255.0, 0, 255).astype(np.uint8)
    return overlay_heatmap(grey, np.clip(heat, 0.0, 1.0), alpha)


def percent(value: float) -> str:
    return f"{100.0 * value:.0f} %"


def describe_point(point: OperatingPoint) -> str:
    return (f"operating point '{point.name}': threshold {percent(point.threshold)}, "
            f"sensitivity {point.sensitivity:.2f}, specificity {point.specificity:.2f} "
            "on held-out synthetic data (model card)")


def result_uids(work: PipelineInput, algorithm: AlgorithmInfo, kind: str) -> str:
    """Series UID for one kind of result object of this run (``sr``, ``sc``, ...)."""
    return work.result_uid(algorithm.name, algorithm.version, f"{kind}-series")
