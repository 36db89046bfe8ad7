"""Does the served heat map point at the lesion? Measured on phantoms, whose masks are truth.

A CAM that lights up the film's edge or the patient's shoulder while the score is right
explains nothing, and a reader shown it learns to distrust the tool. Phantoms know where
every lesion is, so the question has an exact answer: for each *positive* case, does the
peak of the heat map fall inside the lesion?

Everything runs through the package as the node serves it: the card's spec via
``apply_spec``, ONNX Runtime, and the model's own in-graph CAM output, so the number on
the card is about the maps a reader will actually see (not about a torch re-computation).
For a series model (MIL over slices) the case's map is that of the slice that produced
the patient-level maximum (:func:`dicomnode.inference.aggregate.max_pool_slices`): the
slice a reader would be sent to.

Tolerance: a map of a ResNet is computed on a grid of stride 8-32 pixels and upsampled
bilinearly, so its peak always lies at a grid cell's centre, and a point of a lesion can
be up to half a cell's diagonal away from the nearest centre even when the right cell
lit up. The mask is therefore dilated by that resolution limit,
:func:`grid_tolerance_px` (``ceil(stride / √2)`` pixels, a disc at the model's input
resolution), before the peak is looked up. The card states the tolerance next to the
number, and carries the strict rate (peak on a lesion pixel) too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from numpy.typing import NDArray

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.imaging.spec import SpecInput
from dicomnode.inference.aggregate import max_pool_slices
from dicomnode.inference.package import Metric, ModelPackage, load_package
from dicomnode.training.datasets import assemble_tensor, geometric_spec
from dicomnode.training.metrics import Interval, wilson_interval

if TYPE_CHECKING:
    from dicomnode.training.commands import TaskOptions

__all__ = [
    "DEFAULT_TOLERANCE_PX",
    "HEATMAP_METRIC",
    "HEATMAP_METRIC_STRICT",
    "CaseResult",
    "HeatmapCase",
    "HeatmapError",
    "HeatmapReport",
    "chest_xray_heatmap_cases",
    "dilate",
    "evaluate_heatmaps",
    "grid_tolerance_px",
    "map_peak",
    "mask_at_input",
    "peak_hit",
    "phantom_heatmap_metrics",
    "pneumonia_heatmap_metrics",
    "write_heatmap_report",
]

#: Card metric names of the hit rate (with the grid tolerance, and with none).
HEATMAP_METRIC = "heatmap_peak_in_lesion"
HEATMAP_METRIC_STRICT = "heatmap_peak_in_lesion_strict"
DEFAULT_TOLERANCE_PX = 3
HEATMAP_REPORT = "heatmaps.json"


class HeatmapError(ValueError):
    """The package has no CAM output, or a case's images and masks do not match."""


@dataclass(frozen=True, eq=False)
class HeatmapCase:
    """One positive case: its raw inputs (one per slice) and a lesion mask per slice.

    ``images[i]`` is what ``apply_spec`` takes for slice ``i`` (a dataset, or an array);
    ``masks[i]`` (H, W) is true on lesion pixels, in the pixel grid of that input.
    """

    key: str
    images: tuple[SpecInput, ...]
    masks: tuple[NDArray[np.bool_], ...]

    def __post_init__(self) -> None:
        if not self.images or len(self.images) != len(self.masks):
            raise HeatmapError(f"case {self.key}: need one mask per image "
                               f"({len(self.images)} images, {len(self.masks)} masks)")


@dataclass(frozen=True)
class CaseResult:
    """Where one case's map peaked and whether that was on the (dilated) lesion."""

    key: str
    slice_index: int
    peak_rc: tuple[int, int]
    hit: bool
    slice_has_lesion: bool
    distance_px: float

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "slice_index": self.slice_index, "peak_rc": list(self.peak_rc),
                "hit": self.hit, "slice_has_lesion": self.slice_has_lesion,
                "distance_px": self.distance_px if math.isfinite(self.distance_px) else None}


@dataclass(frozen=True)
class HeatmapReport:
    """The hit rate with its Wilson interval, the tolerance, and every case."""

    model: str
    cases: tuple[CaseResult, ...]
    tolerance_px: int
    input_size: tuple[int, int]
    dataset: str
    series: bool = False

    @property
    def hits(self) -> int:
        return sum(c.hit for c in self.cases)

    @property
    def strict_hits(self) -> int:
        """Peaks on a lesion pixel itself (no tolerance)."""
        return sum(c.distance_px == 0.0 for c in self.cases)

    @property
    def rate(self) -> Interval:
        return wilson_interval(self.hits, len(self.cases))

    @property
    def strict_rate(self) -> Interval:
        return wilson_interval(self.strict_hits, len(self.cases))

    def method(self, tolerance_px: int | None = None) -> str:
        rows, cols = self.input_size
        tolerance = self.tolerance_px if tolerance_px is None else tolerance_px
        where = (f"the true lesion mask dilated by {tolerance} px" if tolerance else
                 "the true lesion mask (no tolerance)")
        return (f"peak of the served CAM (ONNX Runtime, in-graph Grad-CAM) of each positive "
                f"case{' (its max-scoring slice)' if self.series else ''} inside {where} at "
                f"the {rows}x{cols} model input; {self.rate.method}")

    def metrics(self) -> list[Metric]:
        """The hit rate with the report's tolerance, then the strict one."""
        out: list[Metric] = []
        for name, rate, tolerance in ((HEATMAP_METRIC, self.rate, self.tolerance_px),
                                      (HEATMAP_METRIC_STRICT, self.strict_rate, 0)):
            if not rate.defined:
                raise HeatmapError("no positive cases: the heat-map hit rate is undefined")
            out.append(Metric(name, rate.value, rate.lower, rate.upper, rate.level,
                              self.method(tolerance), self.dataset))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "metric": HEATMAP_METRIC, "hits": self.hits,
                "strict_hits": self.strict_hits,
                "cases": len(self.cases), "rate": self.rate.to_dict(),
                "tolerance_px": self.tolerance_px, "input_size": list(self.input_size),
                "method": self.method(), "dataset": self.dataset, "series": self.series,
                "results": [c.to_dict() for c in self.cases]}


def grid_tolerance_px(output_stride: int) -> int:
    """Half the diagonal of a CAM grid cell of ``output_stride`` pixels, rounded up."""
    if output_stride < 1:
        raise HeatmapError("the output stride must be >= 1")
    return math.ceil(output_stride / math.sqrt(2))


def dilate(mask: NDArray[np.bool_], radius_px: int) -> NDArray[np.bool_]:
    """``mask`` grown by a disc of ``radius_px`` pixels (0: unchanged)."""
    if radius_px < 0:
        raise HeatmapError("the tolerance must be >= 0 pixels")
    if radius_px == 0 or not mask.any():
        return mask.astype(bool)
    size = 2 * radius_px + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    grown: NDArray[np.bool_] = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    return grown


def map_peak(cam: NDArray[np.floating[Any]]) -> tuple[int, int]:
    """The centre of the map's maximum: the centroid of the flat top around the arg-max.

    Bilinear upsampling (:func:`~dicomnode.training.gradcam.upsample_cam`) clamps at the
    borders, so a maximum in an edge cell is a plateau reaching the image edge, and the
    first arg-max would sit in the corner of it, pixels away from where the evidence is.
    """
    values = np.asarray(cam, dtype=np.float64)
    first = np.unravel_index(int(np.argmax(values)), values.shape)
    top = float(values[first])
    plateau = (values >= top - 1e-6 * max(1.0, abs(top))).astype(np.uint8)
    _, components = cv2.connectedComponents(plateau, connectivity=8)
    rows, cols = np.nonzero(components == components[first])
    return round(float(rows.mean())), round(float(cols.mean()))


def peak_hit(cam: NDArray[np.floating[Any]], mask: NDArray[np.bool_], tolerance_px: int
             ) -> tuple[bool, tuple[int, int], float]:
    """Whether the map's peak lies on the dilated mask; the peak and its distance (px)
    to the nearest lesion pixel (inf without a lesion)."""
    if cam.shape != mask.shape:
        raise HeatmapError(f"map {cam.shape} and mask {mask.shape} differ in shape")
    peak = map_peak(cam)
    if not mask.any():
        return False, peak, math.inf
    ys, xs = np.nonzero(mask)
    distance = float(np.sqrt(((ys - peak[0]) ** 2 + (xs - peak[1]) ** 2).min()))
    return bool(dilate(mask, tolerance_px)[peak]), peak, distance


def mask_at_input(spec: PreprocessSpec, mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """A source-resolution mask moved through the spec's geometric steps (nearest)."""
    moved = apply_spec(geometric_spec(spec), [mask.astype(np.float32)])
    out: NDArray[np.bool_] = moved[0, 0] > 0.5
    return out


def _outputs(package: ModelPackage) -> tuple[str, str]:
    card = package.card
    cams = card.cam_outputs
    if not cams:
        raise HeatmapError(f"model {card.name} has no CAM output")
    cam = cams[0]
    if cam.explains is None:
        raise HeatmapError(f"CAM output {cam.name!r} explains no score output")
    if len(card.output(cam.explains).classes) != 1:
        raise HeatmapError("heat-map evaluation handles single-logit (binary) models")
    return cam.explains, cam.name


def evaluate_heatmaps(
    package: ModelPackage | Path | str,
    cases: Iterable[HeatmapCase],
    *,
    tolerance_px: int = DEFAULT_TOLERANCE_PX,
    dataset: str = "",
    batch_size: int = 32,
) -> HeatmapReport:
    """Run every case through the served package and score its map's peak."""
    from dicomnode.inference.runtime import RuntimeSettings, open_session

    pkg = package if isinstance(package, ModelPackage) else load_package(Path(package))
    score_name, cam_name = _outputs(pkg)
    spec = PreprocessSpec.from_dict(list(pkg.card.preprocessing))
    recorded = pkg.card.provenance.get("preprocessing_fingerprint")
    if isinstance(recorded, str):
        spec.require_fingerprint(recorded)
    session = open_session(pkg, RuntimeSettings(max_batch=batch_size))
    input_name = pkg.card.inputs[0].name
    results: list[CaseResult] = []
    size: tuple[int, int] | None = None
    series = False
    for case in cases:
        series = series or len(case.images) > 1
        x = np.stack([assemble_tensor(spec, raw, "image") for raw in case.images])
        out = session.run({input_name: x.astype(np.float32, copy=False)}).outputs
        logits = np.asarray(out[score_name], dtype=np.float64)
        cams = np.asarray(out[cam_name], dtype=np.float64)
        index = max_pool_slices(logits).slice_index[0]
        cam = cams[index, 0]
        size = (int(cam.shape[0]), int(cam.shape[1]))
        mask = mask_at_input(spec, case.masks[index])
        hit, peak, distance = peak_hit(cam, mask, tolerance_px)
        results.append(CaseResult(case.key, index, peak, hit, bool(mask.any()), distance))
    if size is None:
        raise HeatmapError("no cases to evaluate")
    return HeatmapReport(pkg.card.name, tuple(results), tolerance_px, size, dataset, series)


def write_heatmap_report(report: HeatmapReport, package: ModelPackage) -> Path:
    """``<package>/evaluation/heatmaps.json``, next to the served evaluation report."""
    path = package.directory / "evaluation" / HEATMAP_REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    temporary.replace(path)
    return path


# --- phantom cases ---------------------------------------------------------------------------


def chest_xray_heatmap_cases(seed: int, n: int, *, size: int,
                             indices: Sequence[int] | None = None) -> list[HeatmapCase]:
    """The pneumonia cases of the chest phantom set (seed, n), as the reader builds them.

    The DICOM instance is the one training and evaluation read
    (:func:`~dicomnode.training.datasets.chest_xray_phantom_instance`); the mask is the
    union of the consolidations, drawn from the same random stream.
    """
    from dicomnode.phantoms import chest_xray as cxr
    from dicomnode.phantoms.common import balanced_labels, item_rng
    from dicomnode.training.datasets import chest_xray_phantom_instance

    labels = balanced_labels(item_rng(cxr.KIND, seed, 0, "labels", n), n, cxr.LABELS,
                             (0.5, 0.5))
    chosen = range(n) if indices is None else indices
    cases: list[HeatmapCase] = []
    for index in chosen:
        if labels[index] != "pneumonia":
            continue
        ds, _ = chest_xray_phantom_instance(seed, index, n, size=size, labels=labels)
        _, _, truth = cxr.make_chest_xray(cxr.chest_xray_rng(seed, index),
                                          label=labels[index], size=size)
        mask = np.asarray(truth.lesion_mask > 0)
        if mask.shape != (int(ds.Rows), int(ds.Columns)):
            raise HeatmapError(f"chest phantom {seed}:{index}: mask {mask.shape} does not "
                               f"match the image ({ds.Rows}, {ds.Columns})")
        cases.append(HeatmapCase(f"phantom:{seed}:{index}", ([ds],), (mask,)))
    return cases


def phantom_heatmap_metrics(package: ModelPackage, options: TaskOptions,
                            make_cases: Callable[[int, int, int], list[HeatmapCase]],
                            phantoms: str, cases_of: str) -> list[Metric]:
    """The card's heat-map metric, measured on the held-out test phantoms (``test_seed``,
    ``n_test``, made at ``phantom_size`` by ``make_cases``); packages trained on other
    data have no masks to check against and get no such metric."""
    if options.data != "phantom":
        return []
    o = options.resolved()
    assert o.test_seed is not None and o.n_test is not None and o.phantom_size is not None
    cases = make_cases(o.test_seed, o.n_test, o.phantom_size)
    report = evaluate_heatmaps(
        package, cases, tolerance_px=grid_tolerance_px(o.output_stride),
        dataset=(f"held-out {phantoms} phantoms, seed {o.test_seed} ({len(cases)} {cases_of} "
                 f"of {o.n_test}); synthetic phantoms, not for clinical use"))
    write_heatmap_report(report, package)
    return report.metrics()


def pneumonia_heatmap_metrics(package: ModelPackage, options: TaskOptions) -> list[Metric]:
    """The card's heat-map metric for a pneumonia package trained on phantoms."""
    return phantom_heatmap_metrics(
        package, options, lambda seed, n, size: chest_xray_heatmap_cases(seed, n, size=size),
        "chest", "pneumonia cases")
