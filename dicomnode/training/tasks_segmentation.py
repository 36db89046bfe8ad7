"""The ``tumour-seg`` task: a compact 2D U-Net for brain tumour masks on T1 post-contrast MR.

The network scores every pixel of one axial slice (one logit per pixel: tumour = the
necrotic core plus the enhancing or solid tumour, i.e. what the phantoms call the tumour
volume; oedema is background). A series is segmented slice by slice through the card's
spec and the slice masks are resized back to the source grid, so the tumour volume is
counted on the scanner's own voxels.

Two data sources feed the same code: the project's brain MR phantoms (``--data
phantom``: T1 post-contrast series built in memory as DICOM exactly as
``write_brain_mr_study`` writes them, with their tumour masks) and NIfTI volumes in the
BraTS layout (``--data brats --root DIR``: ``<case>/<case>_t1ce.nii.gz`` with
``<case>_seg.nii.gz``; labels 1, 3 and 4 are the tumour core, 2 is oedema). NIfTI has no
DICOM header, so those volumes run through the same spec without its source step.

Held-out numbers are per volume: Dice of the 3-D mask and the absolute volume error in
cm3, on phantoms of a different seed (different patients), measured through the served
package (card spec + ONNX Runtime).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from numpy.typing import NDArray

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.training.commands import (
    NOT_CLINICAL,
    SYNTHETIC_USE,
    CardText,
    Task,
    TaskOptions,
    TrainingOutcome,
    TrainingRunError,
    register_task,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

    from dicomnode.inference.package import ModelPackage
    from dicomnode.training.loop import TrainConfig

__all__ = [
    "BRATS_TUMOUR_LABELS",
    "PHANTOM_TUMOUR_LABELS",
    "SegCase",
    "UNet2d",
    "array_spec",
    "brats_cases",
    "dice",
    "phantom_cases",
    "read_brats_case",
    "rescore_package",
    "seg_spec",
    "segment_volume",
    "train_segmentation_task",
]

TASK_NAME = "tumour-seg"
#: BraTS labels of the tumour core: necrotic (1), enhancing (4; 3 in BraTS 2023).
BRATS_TUMOUR_LABELS = (1, 3, 4)
#: Phantom labels of the tumour volume: necrosis (1) and enhancing/solid tumour (3).
PHANTOM_TUMOUR_LABELS = (1, 3)
#: Phantom classes drawn for training and testing (healthy heads teach "no tumour").
CLASS_WEIGHTS = (0.2, 0.4, 0.4)
#: Training only: share of tumour-free slices kept (seeded per case); 0.1 left the skull
#: base and vertex slices too rare, where the held-out false positives were.
NEGATIVE_FRACTION = 0.15
#: The learning rate of the last epoch, as a share of ``--lr`` (cosine decay).
FINAL_LR_FRACTION = 0.05
#: BCE weight of tumour pixels (about one pixel in 400 of a training slice is tumour).
POS_WEIGHT = 4.0
THRESHOLD = 0.5
INTENDED_USE = (f"{SYNTHETIC_USE} Segments the brain tumour (necrotic core + enhancing or "
                "solid tumour) on T1 post-contrast MR slice by slice, for the tumour volume "
                "in cm3. Not a medical device.")
LIMITATIONS = (
    f"Trained and tested on {NOT_CLINICAL}.",
    "T1 post-contrast only; oedema is not segmented (it is background).",
    "Phantom tumours are idealised (one lesion, sharp enhancement, no motion, no "
    "post-operative change); nothing here says how the model behaves on patients.",
    "Served masks keep only the largest 3-D connected part (the phantoms hold one tumour); "
    "a second lesion would be dropped from the mask and the volume.",
    "Small tumours (< 1 cm3) span few pixels on the 96 x 96 model grid; their Dice and "
    "relative volume error are the worst.",
)
NIFTI_USE = ("Segments the brain tumour core on T1 post-contrast MR slice by slice, for "
             "the tumour volume in cm3; trained on the NIfTI cases named in training_data. "
             "Research and integration testing only; not a medical device and not for "
             "clinical use.")
#: The phantoms hold one tumour each: the served mask is its largest 3-D connected part
#: (the card's provenance says so, and the pipeline reads it from there).
POSTPROCESSING = "largest-3d-component"


# --- preprocessing ---------------------------------------------------------------------------


def seg_spec(options: TaskOptions) -> PreprocessSpec:
    """Modality values, a per-image 1-99 % stretch, area resize to ``--size``, z-score."""
    return PreprocessSpec.from_dict([
        {"name": "modality_lut"},
        *_intensity_steps(options.size),
    ])


def array_spec(options: TaskOptions) -> PreprocessSpec:
    """:func:`seg_spec` without its source step, for NIfTI arrays (no DICOM header)."""
    return PreprocessSpec.from_dict(_intensity_steps(options.size))


def _intensity_steps(size: int) -> list[dict[str, Any]]:
    return [
        {"name": "robust_minmax", "low_percentile": 1.0, "high_percentile": 99.0},
        {"name": "resize", "size": [size, size], "interpolation": "area"},
        {"name": "zscore"},
    ]


def mask_to_input(mask: NDArray[Any], size: int) -> NDArray[np.bool_]:
    """(S, H, W) masks resized to the model grid as the image is (area), then > 0.5."""
    import cv2

    out = np.empty((mask.shape[0], size, size), dtype=np.bool_)
    for k in range(mask.shape[0]):
        out[k] = cv2.resize(mask[k].astype(np.float32), (size, size),
                            interpolation=cv2.INTER_AREA) > 0.5
    return out


def probabilities_to_source(probabilities: NDArray[Any], rows: int, columns: int
                            ) -> NDArray[np.float32]:
    """(S, h, w) model-grid probabilities stretched back to (S, rows, columns), bilinear."""
    import cv2

    out = np.empty((probabilities.shape[0], rows, columns), dtype=np.float32)
    for k in range(probabilities.shape[0]):
        out[k] = cv2.resize(np.asarray(probabilities[k], dtype=np.float32), (columns, rows),
                            interpolation=cv2.INTER_LINEAR)
    return out


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SegCase:
    """One volume: model-grid images, the source-grid truth mask and the voxel volume."""

    case_id: str
    label: str
    images: NDArray[np.float32]  # (S, 1, size, size), after the spec
    mask: NDArray[np.bool_]  # (S, rows, columns), source grid
    voxel_mm3: float

    @property
    def volume_cm3(self) -> float:
        return float(self.mask.sum()) * self.voxel_mm3 / 1000.0


def phantom_series(seed: int, index: int, label: str, *, matrix: int
                   ) -> tuple[list[Any], NDArray[np.bool_], float]:
    """Study ``index`` of ``write_brain_mr_study(seed=seed, sequences="T1C")``, in memory:
    the sorted T1C datasets, the tumour mask (labels 1 and 3) and the voxel volume in mm3."""
    from dicomnode.phantoms import brain_mr as bmr
    from dicomnode.phantoms.common import (
        SeriesContext,
        item_rng,
        make_identity,
        phantom_uid,
        study_datetime,
    )
    from dicomnode.phantoms.head_ct import random_pose

    kind = bmr.KIND
    patient = bmr.make_brain_patient(rng=item_rng(kind, seed, index, "patient"),
                                     tumour_kind=label)
    meta = item_rng(kind, seed, index, "meta")
    identity = make_identity(bmr.CODE, seed, index, meta)
    date, clock = study_datetime(meta)
    field_strength = float(meta.choice([1.5, 3.0]))
    scan_rng = item_rng(kind, seed, index, "scan", 0)
    pose = random_pose(scan_rng)
    geometry_seed = int(scan_rng.integers(0, 2**31))
    volume, geometry, truth = bmr.make_mr_volume(
        np.random.default_rng([geometry_seed, 1]), patient=patient, sequence="T1C",
        matrix=matrix, pose=pose)
    study = bmr._study_context(identity, seed, index, 0, date, clock,
                               "MR BRAIN W/WO CONTRAST", "mr")
    seq = bmr.SEQUENCES["T1C"]
    series = SeriesContext(
        series_instance_uid=phantom_uid(kind, seed, index, 0, seq.name, "series"),
        modality="MR", series_number=1, series_description=seq.description,
        body_part_examined="BRAIN", model_name="phantom-brain-mr",
        frame_of_reference_uid=phantom_uid(kind, seed, index, 0, "frame"))
    slices = bmr.build_mr_slices(volume, geometry, seq, study, series,
                                 uid_parts=(kind, seed, index, 0, seq.name),
                                 field_strength=field_strength)
    mask = np.isin(truth.tumour_mask, PHANTOM_TUMOUR_LABELS)
    voxel = (geometry.pixel_spacing_mm[0] * geometry.pixel_spacing_mm[1]
             * geometry.slice_spacing_mm)
    return [ds for _, ds in slices], mask, float(voxel)


def phantom_labels(seed: int, n: int) -> list[str]:
    from dicomnode.phantoms import brain_mr as bmr
    from dicomnode.phantoms.common import balanced_labels, item_rng

    return balanced_labels(item_rng(bmr.KIND, seed, 0, "labels", n), n, bmr.LABELS,
                           CLASS_WEIGHTS)


def phantom_cases(seed: int, n: int, spec: PreprocessSpec, *, matrix: int
                  ) -> Iterator[SegCase]:
    """``n`` phantom T1C series of set ``seed`` through ``spec`` (slices inferior first)."""
    for index, label in enumerate(phantom_labels(seed, n)):
        datasets, mask, voxel = phantom_series(seed, index, label, matrix=matrix)
        images = apply_spec(spec, datasets)
        yield SegCase(f"phantom-{seed}-{index:04d}", label, images, mask, voxel)


def read_brats_case(case_dir: Path) -> tuple[NDArray[np.float32], NDArray[np.bool_], float]:
    """``<case>_t1ce.nii.gz`` and ``<case>_seg.nii.gz`` of one BraTS case folder:
    (S, H, W) intensities, the tumour-core mask (labels 1, 3, 4) and the voxel mm3."""
    import SimpleITK as sitk  # noqa: N813

    case = case_dir.name
    paths = {}
    for suffix in ("t1ce", "seg"):
        found = [case_dir / f"{case}_{suffix}{ext}" for ext in (".nii.gz", ".nii")]
        existing = [p for p in found if p.is_file()]
        if not existing:
            raise TrainingRunError(f"{case_dir}: no {case}_{suffix}.nii.gz")
        paths[suffix] = existing[0]
    try:
        image = sitk.ReadImage(str(paths["t1ce"]))
        seg = sitk.ReadImage(str(paths["seg"]))
    except RuntimeError as exc:
        raise TrainingRunError(f"{case_dir}: cannot read NIfTI ({exc})") from exc
    volume = np.asarray(sitk.GetArrayFromImage(image), dtype=np.float32)
    labels = np.asarray(sitk.GetArrayFromImage(seg))
    if volume.ndim != 3 or volume.shape != labels.shape:
        raise TrainingRunError(f"{case_dir}: image {volume.shape} and mask {labels.shape} "
                               "are not the same 3-D grid")
    sx, sy, sz = (float(v) for v in image.GetSpacing())
    return volume, np.isin(labels, BRATS_TUMOUR_LABELS), sx * sy * sz


def brats_cases(root: Path, spec: PreprocessSpec) -> list[SegCase]:
    """Every case folder under ``root`` (BraTS layout) through an array ``spec``."""
    if spec.input_kind != "arrays":
        raise TrainingRunError("NIfTI volumes are arrays: use a spec without a source step")
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TrainingRunError(f"{root}: no case folders")
    cases = []
    for folder in folders:
        volume, mask, voxel = read_brats_case(folder)
        images = apply_spec(spec, [volume[k] for k in range(volume.shape[0])])
        cases.append(SegCase(folder.name, "tumour" if mask.any() else "healthy", images, mask,
                             voxel))
    return cases


def training_slices(cases: Sequence[SegCase], size: int, seed: int
                    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Every tumour slice and a seeded :data:`NEGATIVE_FRACTION` of the others."""
    images: list[NDArray[np.float32]] = []
    targets: list[NDArray[np.bool_]] = []
    for number, case in enumerate(cases):
        grid = mask_to_input(case.mask, size)
        rng = np.random.default_rng([seed, number])
        keep = grid.reshape(grid.shape[0], -1).any(axis=1) | (
            rng.random(grid.shape[0]) < NEGATIVE_FRACTION)
        images.append(case.images[keep])
        targets.append(grid[keep])
    if not images:
        raise TrainingRunError("no training slices")
    return (np.concatenate(images).astype(np.float32),
            np.concatenate(targets)[:, None].astype(np.float32))


# --- the network -----------------------------------------------------------------------------


def _unet_class() -> type[nn.Module]:
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True))

    class _UNet2d(nn.Module):
        """Encoder-decoder with skip connections; ``levels`` poolings of 2; one logit."""

        def __init__(self, in_channels: int = 1, width: int = 8, levels: int = 3) -> None:
            super().__init__()
            widths = [width * 2**i for i in range(levels + 1)]
            self.levels = levels
            self.down = nn.ModuleList(
                [block(in_channels, widths[0])]
                + [block(widths[i], widths[i + 1]) for i in range(levels)])
            self.pool = nn.MaxPool2d(2)
            self.up = nn.ModuleList(
                [nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                 for i in reversed(range(levels))])
            self.merge = nn.ModuleList(
                [block(2 * widths[i], widths[i]) for i in reversed(range(levels))])
            self.head = nn.Conv2d(widths[0], 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            skips = []
            for i, down in enumerate(self.down):
                x = down(x)
                if i < self.levels:
                    skips.append(x)
                    x = self.pool(x)
            for up, merge in zip(self.up, self.merge, strict=True):
                x = merge(torch.cat([up(x), skips.pop()], dim=1))
            out: Tensor = self.head(x)
            return out

    return _UNet2d


def UNet2d(in_channels: int = 1, width: int = 8, levels: int = 3) -> nn.Module:  # noqa: N802
    """A compact 2D U-Net (torch imported on call); input sides divisible by 2**levels."""
    return _unet_class()(in_channels, width, levels)


def unet(options: TaskOptions) -> nn.Module:
    if options.size % 8:
        raise TrainingRunError(f"--size must be a multiple of 8 for the U-Net; got {options.size}")
    model = UNet2d(1, options.width, 3)
    if options.weights:
        import torch

        data = torch.load(options.weights, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("task") != TASK_NAME:
            raise TrainingRunError(f"--weights {options.weights} is not a {TASK_NAME} checkpoint")
        model.load_state_dict(data["state_dict"])
    return model


def seg_config(options: TaskOptions) -> TrainConfig:
    from dicomnode.training.loop import TrainConfig

    return TrainConfig(epochs=options.epochs, batch_size=options.batch_size,
                       learning_rate=options.learning_rate, patience=options.patience,
                       seed=options.seed, progress=options.progress, device="cpu")


# --- metrics ---------------------------------------------------------------------------------


def dice(prediction: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    """Dice of two masks; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(prediction, truth).sum()) / total


def segment_volume(probabilities: NDArray[Any], rows: int, columns: int,
                   threshold: float = THRESHOLD) -> NDArray[np.bool_]:
    """(S, 1, h, w) or (S, h, w) probabilities to a source-grid mask (S, rows, columns)."""
    values = np.asarray(probabilities, dtype=np.float32)
    if values.ndim == 4:
        values = values[:, 0]
    mask: NDArray[np.bool_] = probabilities_to_source(values, rows, columns) >= threshold
    return mask


def _sigmoid(logits: NDArray[Any]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = (1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
                                ).astype(np.float32)
    return out


def _bootstrap_mean(values: Sequence[float], n_boot: int, seed: int) -> tuple[float, float,
                                                                               float]:
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if data.size < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (n_boot, data.size))].mean(axis=1)
    lo, hi = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return mean, min(lo, mean), max(hi, mean)


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    label: str
    dice: float
    true_cm3: float
    predicted_cm3: float
    max_probability: float


def score_cases(cases: Sequence[SegCase], predict: Any,
                postprocessing: str | None = POSTPROCESSING) -> list[CaseResult]:
    """``predict(images) -> logits`` over each case; per-volume Dice and volumes, with the
    serving pipeline's postprocessing (:data:`POSTPROCESSING`, recorded in the card)."""
    from dicomnode.pipelines.tumour_volume import postprocess

    results = []
    for case in cases:
        probabilities = _sigmoid(predict(case.images))
        rows, columns = case.mask.shape[1:]
        mask = postprocess(segment_volume(probabilities, rows, columns), postprocessing)
        results.append(CaseResult(case.case_id, case.label, dice(mask, case.mask),
                                  case.volume_cm3, float(mask.sum()) * case.voxel_mm3 / 1000.0,
                                  float(probabilities.max())))
    return results


# --- training --------------------------------------------------------------------------------


def _log(stream: TextIO | None, message: str) -> None:
    if stream is not None:
        print(message, file=stream, flush=True)


def _cases(options: TaskOptions, part: str) -> list[SegCase]:
    seeds = {"train": options.seed, "val": options.val_seed, "test": options.test_seed}
    counts = {"train": options.n_train, "val": options.n_val, "test": options.n_test}
    seed, n = seeds[part], counts[part]
    assert seed is not None and n is not None and options.phantom_size is not None
    if options.data == "phantom":
        return list(phantom_cases(seed, n, seg_spec(options), matrix=options.phantom_size))
    if options.data == "brats":
        if not options.root:
            raise TrainingRunError("--data brats needs --root DIR (BraTS layout)")
        cases = brats_cases(Path(options.root), array_spec(options))
        ordered = sorted(cases, key=lambda c: (hash_key(c.case_id, options.seed)))
        n_test = max(1, len(ordered) // 5)
        n_val = max(1, len(ordered) // 5)
        parts = {"test": ordered[:n_test], "val": ordered[n_test:n_test + n_val],
                 "train": ordered[n_test + n_val:]}
        return parts[part]
    raise TrainingRunError(f"task {TASK_NAME} trains from --data phantom | brats; "
                           f"got {options.data!r}")


def hash_key(text: str, seed: int) -> str:
    import hashlib

    return hashlib.sha256(f"{seed}|{text}".encode()).hexdigest()


def cosine_lr(initial: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based): ``initial`` on a half cosine down to
    :data:`FINAL_LR_FRACTION` of it in the last epoch."""
    import math

    floor = initial * FINAL_LR_FRACTION
    if epochs <= 1:
        return initial
    return floor + (initial - floor) * 0.5 * (1 + math.cos(math.pi * epoch / (epochs - 1)))


def fit_unet(model: nn.Module, x: NDArray[np.float32], y: NDArray[np.float32],
             options: TaskOptions, stream: TextIO | None = None) -> nn.Module:
    """Adam on weighted BCE + soft Dice, horizontal flips, the learning rate on a cosine
    from ``--lr`` down to :data:`FINAL_LR_FRACTION` of it (one value per epoch)."""
    import torch
    from torch.nn import functional as f

    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=options.learning_rate,
                                 weight_decay=1e-5)
    images, targets = torch.from_numpy(x), torch.from_numpy(y)
    n = images.shape[0]
    for epoch in range(options.epochs):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(options.learning_rate, epoch, options.epochs)
        model.train()
        order = rng.permutation(n)
        total, started = 0.0, time.perf_counter()
        for start in range(0, n, options.batch_size):
            index = torch.from_numpy(order[start:start + options.batch_size])
            batch, target = images[index], targets[index]
            if rng.random() < 0.5:
                batch, target = batch.flip(-1), target.flip(-1)
            logits = model(batch)
            probability = torch.sigmoid(logits)
            overlap = (probability * target).sum()
            soft_dice = 1 - (2 * overlap + 1) / (probability.sum() + target.sum() + 1)
            loss = f.binary_cross_entropy_with_logits(
                logits, target, pos_weight=torch.tensor(POS_WEIGHT)) + soft_dice
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * batch.shape[0]
        _log(stream, f"epoch {epoch + 1}/{options.epochs}: loss {total / n:.4f} "
                     f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return model


def _torch_predict(model: nn.Module) -> Any:
    import torch

    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.no_grad():
            parts = [model(torch.from_numpy(images[i:i + 32])).numpy()
                     for i in range(0, images.shape[0], 32)]
        out: NDArray[np.float32] = np.concatenate(parts).astype(np.float32)
        return out

    return predict


def _onnx_predict(package: ModelPackage) -> Any:
    from dicomnode.inference.runtime import RuntimeSettings, open_session

    session = open_session(package, RuntimeSettings(providers=("cpu",), max_batch=32,
                                                    intra_op_threads=1))

    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = np.asarray(session.run({"image": images}).outputs["logits"],
                                              dtype=np.float32)
        return out

    return predict


def seg_metrics(results: Sequence[CaseResult], dataset: str, n_boot: int, seed: int
                ) -> list[Any]:
    from dicomnode.inference.package import Metric

    tumour = [r for r in results if r.true_cm3 > 0]
    healthy = [r for r in results if r.true_cm3 == 0]
    metrics = []
    if tumour:
        dices = [r.dice for r in tumour]
        errors = [abs(r.predicted_cm3 - r.true_cm3) for r in tumour]
        relative = [abs(r.predicted_cm3 - r.true_cm3) / r.true_cm3 for r in tumour]
        for name, values, what in (
            ("dice_mean", dices, "mean per-volume Dice of the 3-D tumour mask"),
            ("volume_abs_error_cm3", errors, "mean |predicted - true| tumour volume, cm3"),
            ("volume_rel_error", relative, "mean |predicted - true| / true tumour volume"),
        ):
            mean, lo, hi = _bootstrap_mean(values, n_boot, seed)
            metrics.append(Metric(name, mean, lo, hi, 0.95,
                                  f"{what} over {len(tumour)} tumour volumes at threshold "
                                  f"{THRESHOLD}; percentile bootstrap, {n_boot} resamples, "
                                  f"seed {seed}", dataset))
        median = float(np.median(dices))
        metrics.append(Metric("dice_median", median, float(min(dices)), float(max(dices)), 0.95,
                              "median per-volume Dice; the interval is the range (min, max)",
                              dataset))
    if healthy:
        false = [r.predicted_cm3 for r in healthy]
        mean, lo, hi = _bootstrap_mean(false, n_boot, seed)
        metrics.append(Metric("healthy_false_volume_cm3", mean, lo, hi, 0.95,
                              f"mean predicted tumour volume in {len(healthy)} tumour-free "
                              f"heads; percentile bootstrap, {n_boot} resamples", dataset))
    return metrics


def train_segmentation_task(task: Task, options: TaskOptions, models_dir: Path,
                            name: str | None, version: str) -> TrainingOutcome:
    """Phantoms (or BraTS NIfTI) -> U-Net -> ONNX package -> per-volume Dice, served."""
    import torch

    from dicomnode.inference.package import OperatingPoint, TrainingData, load_package
    from dicomnode.training.evaluate import evaluate_binary
    from dicomnode.training.export import OutputDescription, write_model_package

    started = time.perf_counter()
    stream = sys.stderr if options.progress else None
    if options.threads:
        torch.set_num_threads(options.threads)
    train_cases = _cases(options, "train")
    _log(stream, f"train: {len(train_cases)} volumes ({time.perf_counter() - started:.0f} s)")
    test_cases = _cases(options, "test")
    _log(stream, f"test: {len(test_cases)} volumes ({time.perf_counter() - started:.0f} s)")
    x, y = training_slices(train_cases, options.size, options.seed)
    _log(stream, f"{x.shape[0]} training slices, {float(y.mean()):.4f} tumour pixels")
    torch.manual_seed(options.seed)
    model = fit_unet(unet(options), x, y, options, stream)
    torch_results = score_cases(test_cases, _torch_predict(model))
    spec = seg_spec(options)
    synthetic = options.data == "phantom"
    if synthetic:
        held_out = (f"held-out phantom T1C series, seed {options.test_seed} "
                    f"(n={len(test_cases)}, other patients than training)")
        description = (f"{NOT_CLINICAL}: T1 post-contrast MR series from "
                       f"dicomnode.phantoms.brain_mr, phantom matrix {options.phantom_size}; "
                       f"train seed {options.seed} ({len(train_cases)} patients, "
                       f"{x.shape[0]} slices: every tumour slice and "
                       f"{NEGATIVE_FRACTION:.0%} of the others), test seed "
                       f"{options.test_seed} ({len(test_cases)} patients); classes healthy / "
                       f"benign / malignant in {CLASS_WEIGHTS}")
        sources: tuple[str, ...] = ("dicomnode.phantoms.brain_mr (T1 post-contrast MR)",)
    else:
        held_out = f"held-out BraTS-layout cases under {options.root} (n={len(test_cases)})"
        description = (f"NIfTI volumes in the BraTS layout under {options.root} (t1ce + seg, "
                       f"tumour core = labels {BRATS_TUMOUR_LABELS})")
        sources = (str(options.root),)
    package_name = name or task.default_package_name
    directory = models_dir / package_name
    checkpoint = directory / "training" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "dicomnode-checkpoint/1", "task": task.name,
                "options": options.to_dict(), "spec": [s.to_dict() for s in spec.steps],
                "state_dict": model.state_dict()}, checkpoint)
    dataset = f"{held_out}, served package (card spec + ONNX Runtime), per volume"
    example = torch.from_numpy(x[:2].copy())
    written = write_model_package(
        model, {"image": example}, models_dir, name=package_name, version=version,
        task=task.name, modality=("MR",),
        outputs=[OutputDescription(
            "logits", "logits", "per-pixel tumour logit (necrotic core + enhancing/solid "
            "tumour; oedema is background) of one axial slice on the model grid; sigmoid, "
            f"resize back to the source grid, threshold {THRESHOLD}",
            classes=("tumour",), activation="sigmoid")],
        preprocessing=[s.to_dict() for s in spec.steps],
        operating_points=[],
        training_data=TrainingData(description, {"train": len(train_cases),
                                                 "test": len(test_cases),
                                                 "train_slices": int(x.shape[0])},
                                   sources, synthetic),
        metrics=[], intended_use=task.card.intended_use if synthetic else NIFTI_USE,
        input_descriptions={"image": task.card.input_description},
        limitations=task.card.limitations)
    served = score_cases(test_cases, _onnx_predict(written.package))
    for a, b in zip(torch_results, served, strict=True):
        if abs(a.dice - b.dice) > 0.01:
            raise TrainingRunError(f"{a.case_id}: torch Dice {a.dice:.3f} but served "
                                   f"{b.dice:.3f}")
    metrics = seg_metrics(served, dataset, options.n_boot, options.seed)
    tumour = [r for r in served if r.true_cm3 > 0]
    voxel_tp = sum(r.dice * (r.true_cm3 + r.predicted_cm3) / 2 for r in tumour)
    sensitivity = voxel_tp / max(sum(r.true_cm3 for r in tumour), 1e-9)
    point = OperatingPoint("voxel-0.5", "logits", THRESHOLD, min(1.0, sensitivity), 1.0,
                           "tumour", "probability",
                           f"{dataset}; sensitivity = tumour volume found / true tumour "
                           "volume; specificity rounded (tumour voxels are a tiny share)")
    card = written.package.card
    seconds = time.perf_counter() - started
    provenance = {**card.provenance, "task": task.name,
                  "preprocessing_fingerprint": spec.fingerprint,
                  "postprocessing": POSTPROCESSING,
                  "training": {"options": options.to_dict(), "seconds": round(seconds, 1),
                               "loss": f"BCE (tumour pixels x {POS_WEIGHT:g}) + soft Dice",
                               "optimiser": ("Adam, cosine decay from --lr to "
                                             f"x{FINAL_LR_FRACTION:g} over the epochs"),
                               "augmentation": "horizontal flip",
                               "array_spec_for_nifti": [s.to_dict()
                                                        for s in array_spec(options).steps]},
                  "per_case": [dataclasses.asdict(r) for r in served]}
    if not synthetic:
        card = dataclasses.replace(card, training_data=dataclasses.replace(
            card.training_data, description=description))
    card = dataclasses.replace(card, metrics=tuple(metrics), operating_points=(point,),
                               provenance=provenance)
    (directory / "model.yaml").write_text(card.to_yaml(), encoding="utf-8")
    package = load_package(directory)
    labels = [int(r.true_cm3 > 0) for r in served]
    scores = [r.max_probability for r in served]
    report = evaluate_binary(labels, scores, class_names=("healthy", "tumour"),
                             dataset=f"{dataset} (tumour present: max pixel probability)",
                             n_boot=min(500, options.n_boot), seed=options.seed)
    report = dataclasses.replace(report, extra={**report.extra, **{
        m.name: m.value for m in metrics}})
    for m in metrics:
        _log(stream, f"{m.name}: {m.value:.4f} [{m.ci_lower:.4f}, {m.ci_upper:.4f}]")
    return TrainingOutcome(package, checkpoint, report, report, report,
                           time.perf_counter() - started)


register_task(Task(
    name=TASK_NAME,
    summary="brain tumour segmentation (2D U-Net) on T1 post-contrast MR",
    modality=("MR",),
    class_names=("background", "tumour"),
    card=CardText(
        intended_use=INTENDED_USE,
        output_meaning="per-pixel tumour logit",
        cam_meaning="none",
        input_description=("one axial slice of a T1 post-contrast MR series (MR Image "
                            "Storage) after the card's spec; serving runs every slice of the "
                            "series sorted by dicomnode.imaging.sort_datasets, batch axis = "
                            "slices"),
        limitations=LIMITATIONS),
    spec=seg_spec,
    datasets={"phantom": lambda o, s: _no_splits(), "brats": lambda o, s: _no_splits()},
    model=unet,
    train_config=seg_config,
    trainer=train_segmentation_task,
    package_name=TASK_NAME,
))


def _no_splits() -> Any:
    raise TrainingRunError(f"{TASK_NAME} builds its own data in its trainer")



#: Issue 5's target: mean per-volume Dice on held-out phantoms.
DICE_TARGET = 0.85


def target_note(metrics: Sequence[Any], results: Sequence[CaseResult] = ()
                ) -> tuple[str, ...]:
    """Limitations on :data:`DICE_TARGET`: missed, or met by the mean with a confidence
    interval that reaches below it; and the held-out tumours segmented worst."""
    values = {m.name: m for m in metrics}
    mean, median = values.get("dice_mean"), values.get("dice_median")
    if mean is None:
        return ()
    notes = []
    typical = f", median {median.value:.2f}" if median is not None else ""
    interval = f"95 % CI {mean.ci_lower:.2f}-{mean.ci_upper:.2f}"
    if mean.value < DICE_TARGET:
        notes.append(f"Below the target mean per-volume Dice of {DICE_TARGET} on held-out "
                     f"phantoms: mean {mean.value:.2f} ({interval}){typical}.")
    elif mean.ci_lower < DICE_TARGET:
        notes.append(f"The mean per-volume Dice on held-out phantoms, {mean.value:.2f}"
                     f"{typical}, meets the target of {DICE_TARGET}, but its {interval} "
                     "reaches below it.")
    worst = sorted((r for r in results if r.true_cm3 > 0 and r.dice < 0.5),
                   key=lambda r: r.dice)
    if worst:
        listed = "; ".join(f"{r.label} {r.true_cm3:.1f} cm3: Dice {r.dice:.2f}, "
                           f"{r.predicted_cm3:.1f} cm3 found" for r in worst)
        tumours = sum(r.true_cm3 > 0 for r in results)
        notes.append(f"{len(worst)} of {tumours} held-out tumours are segmented with Dice "
                     f"< 0.5 ({listed}): small and benign (meningioma-like) tumours are "
                     "the most often missed or under-segmented, and their volume is then "
                     "underestimated.")
    false = [r.predicted_cm3 for r in results if r.true_cm3 == 0 and r.predicted_cm3 > 0]
    if false:
        healthy = sum(r.true_cm3 == 0 for r in results)
        notes.append(f"{len(false)} of {healthy} held-out tumour-free heads get a false "
                     f"tumour mask (up to {max(false):.2f} cm3).")
    return tuple(notes)


def rescore_package(directory: Path, *, seed: int, n: int, matrix: int, n_boot: int = 2000,
                    postprocessing: str | None = POSTPROCESSING,
                    stream: TextIO | None = None) -> list[Any]:
    """Re-measure a written package on ``n`` phantoms of set ``seed`` through the served
    path (card spec + ONNX Runtime + ``postprocessing``) and rewrite the card's metrics,
    operating point and per-case results; returns the metrics."""
    from dicomnode.inference.package import OperatingPoint, load_package

    package = load_package(directory)
    spec = PreprocessSpec.from_dict(list(package.card.preprocessing))
    cases = list(phantom_cases(seed, n, spec, matrix=matrix))
    _log(stream, f"rescore: {len(cases)} phantom volumes of seed {seed}")
    served = score_cases(cases, _onnx_predict(package), postprocessing)
    dataset = (f"held-out phantom T1C series, seed {seed} (n={len(cases)}, other patients "
               "than training), served package (card spec + ONNX Runtime"
               f"{', ' + postprocessing if postprocessing else ''}), per volume")
    metrics = seg_metrics(served, dataset, n_boot, 0)
    tumour = [r for r in served if r.true_cm3 > 0]
    found = sum(r.dice * (r.true_cm3 + r.predicted_cm3) / 2 for r in tumour)
    sensitivity = found / max(sum(r.true_cm3 for r in tumour), 1e-9)
    point = OperatingPoint("voxel-0.5", "logits", THRESHOLD, min(1.0, sensitivity), 1.0,
                           "tumour", "probability",
                           f"{dataset}; sensitivity = tumour volume found / true tumour "
                           "volume; specificity rounded (tumour voxels are a tiny share)")
    card = package.card
    provenance = {**card.provenance, "postprocessing": postprocessing,
                  "per_case": [dataclasses.asdict(r) for r in served]}
    if card.training_data.synthetic:
        card = dataclasses.replace(card, intended_use=INTENDED_USE,
                                   limitations=(*LIMITATIONS, *target_note(metrics, served)))
    card = dataclasses.replace(card, metrics=tuple(metrics), operating_points=(point,),
                               provenance=provenance)
    (Path(directory) / "model.yaml").write_text(card.to_yaml(), encoding="utf-8")
    load_package(directory)
    for m in metrics:
        _log(stream, f"{m.name}: {m.value:.4f} [{m.ci_lower:.4f}, {m.ci_upper:.4f}]")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dicomnode.training.tasks_segmentation rescore DIR --seed S --n N``."""
    import argparse

    parser = argparse.ArgumentParser(prog="tasks_segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    rescore = sub.add_parser("rescore", help="re-measure a package on held-out phantoms")
    rescore.add_argument("package", type=Path)
    rescore.add_argument("--seed", type=int, default=1000)
    rescore.add_argument("--n", type=int, default=30)
    rescore.add_argument("--matrix", type=int, default=128)
    rescore.add_argument("--n-boot", type=int, default=2000)
    rescore.add_argument("--postprocessing", choices=(POSTPROCESSING, "none"),
                         default=POSTPROCESSING)
    args = parser.parse_args(argv)
    post = None if args.postprocessing == "none" else args.postprocessing
    rescore_package(args.package, seed=args.seed, n=args.n, matrix=args.matrix,
                    n_boot=args.n_boot, postprocessing=post, stream=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
