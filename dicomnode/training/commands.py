"""``dicomnode train|evaluate|export`` and the registry of trainable tasks.

This module must not import torch at import time: the serving CLI imports it too. The
torch-side pieces (architectures, loop, export) are imported inside the functions that
need them, and a task's factories are plain callables that do the same.

A :class:`Task` is everything that differs between analyses: a preprocessing spec, the
datasets it can be trained from, an architecture, a training recipe, a loss and the
card's wording. The machinery around it is shared: :func:`train_task` prepares data
through the spec, trains with :func:`~dicomnode.training.loop.fit`, picks operating
points on validation and measures them on held-out test data, saves a checkpoint,
exports a verified package (:func:`export_checkpoint`) and re-evaluates that package
through the serving path (``apply_spec`` from the card + ONNX Runtime). To add a task,
write its factories and call :func:`register_task` (see the ``pneumonia`` task below)::

    register_task(Task(
        name="metastasis", summary="...", modality=("CT",),
        class_names=("no-metastasis", "metastasis"), card=CardText(...), loss="bce",
        spec=head_ct_spec,                       # options -> PreprocessSpec (hounsfield, ...)
        datasets={"phantom": head_ct_phantoms,   # (options, spec) -> DatasetSplits
                  "dicom-csv": _dicom_csv(("no-metastasis", "metastasis"))},
        model=slice_classifier, train_config=classifier_config, export_wrapper=with_cam,
    ))

Everything else (CLI, checkpoint, export, card, serving check) comes with it. Tasks whose
model is not a single-input slice classifier (MIL over a series, CT+MR fusion,
CNN+BiLSTM) also set ``forward`` (how a batch reaches the model, passed to ``fit``) and
their own ``export_wrapper``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from dicomnode.imaging import PreprocessSpec

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from torch import Tensor, nn

    from dicomnode.inference.package import Metric, ModelPackage
    from dicomnode.training.architectures import ResNet
    from dicomnode.training.calibration import CalibrationFit
    from dicomnode.training.datasets import DatasetSplits, SampleSet
    from dicomnode.training.evaluate import CrossValidationReport, EvaluationReport
    from dicomnode.training.export import WrittenPackage
    from dicomnode.training.loop import TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "TASKS",
    "CardText",
    "Task",
    "TaskOptions",
    "TrainingOutcome",
    "TrainingRunError",
    "evaluate_model",
    "export_checkpoint",
    "recalibrate_package",
    "recalibration_start",
    "register",
    "register_task",
    "train_task",
]

CHECKPOINT_FORMAT = "dicomnode-checkpoint/1"
TRAINING_DIR = "training"
EVALUATION_DIR = "evaluation"
#: ONNX and torch scores of one package may differ by float noise, not by more.
SERVING_AUC_TOLERANCE = 1e-3
NOT_CLINICAL = "synthetic phantoms, not for clinical use"


class TrainingRunError(RuntimeError):
    """A training, export or evaluation run cannot go on; the message says why."""


@dataclass(frozen=True)
class TaskOptions:
    """Everything the command line can set; stored in the checkpoint to rebuild the model.

    ``None`` for ``n_val``, ``n_test`` and ``phantom_size`` means "derive from the
    others" (see :meth:`resolved`).
    """

    data: str = "phantom"
    root: str | None = None
    labels: str | None = None
    n_train: int = 256
    n_val: int | None = None
    n_test: int | None = None
    size: int = 128
    phantom_size: int | None = None
    seed: int = 0
    val_seed: int | None = None
    test_seed: int | None = None
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    augment: str = "seed004"
    stages: Literal["none", "seed002"] = "none"
    weights: str | None = None
    depth: int = 10
    width: int = 8
    patience: int | None = 5
    resplit: bool = False
    sensitivity_target: float = 0.9
    n_boot: int = 2000
    threads: int | None = None
    progress: bool = True
    device: str = "cpu"
    folds: int = 0
    calibration: str = "none"
    point_names: str = ""
    output_stride: int = 32
    loc_weight: float = 0.0
    freeze_encoders: bool = False
    n_calibration: int = 0
    calibration_seed: int | None = None

    def resolved(self) -> TaskOptions:
        n_val = self.n_val if self.n_val is not None else max(16, self.n_train // 4)
        n_test = self.n_test if self.n_test is not None else max(32, self.n_train // 2)
        phantom = self.phantom_size or min(512, max(128, 2 * self.size))
        val_seed = self.val_seed if self.val_seed is not None else self.seed + 1
        test_seed = self.test_seed if self.test_seed is not None else self.seed + 1000
        return dataclasses.replace(self, n_val=n_val, n_test=n_test, phantom_size=phantom,
                                   val_seed=val_seed, test_seed=test_seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class CardText:
    """The model card's words for a task."""

    intended_use: str
    output_meaning: str
    cam_meaning: str
    input_description: str
    limitations: tuple[str, ...] = ()


DatasetFactory = Callable[[TaskOptions, PreprocessSpec], "DatasetSplits"]
Aggregate = Callable[["SampleSet", "NDArray[np.float64]"],
                     "tuple[NDArray[np.int64], NDArray[np.float64]]"]
#: Card wording for packages trained on phantoms (prefixed to the task's intended use).
SYNTHETIC_USE = ("Trained on synthetic phantoms: for demonstration and integration testing "
                 "only, not for clinical use.")


@dataclass(frozen=True)
class Task:
    """One trainable analysis. Factories import torch themselves, when called.

    * ``spec(options)`` — the preprocessing spec (training and serving run it);
    * ``datasets[kind](options, spec)`` — train/val/test splits per ``--data`` kind;
    * ``model(options)`` — a fresh network (a ``GapClassifier`` for the shared export);
    * ``train_config(options)`` — the :class:`~dicomnode.training.loop.TrainConfig`;
    * ``export_wrapper(model)`` — what is exported (default: logits + in-graph Grad-CAM);
    * ``forward(model, batch)`` — how a batch reaches the model (default ``model(batch)``);
    * ``aggregate(samples, scores)`` — per-sample scores (logits or probabilities) to
      per-patient ``(labels, scores)``, e.g. MIL max pooling of a slice model: metrics,
      thresholds and calibration are then patient-level (default: per sample);
    * ``package_metrics(package, options)`` — extra card metrics measured on the served
      package after export (e.g. heat-map localisation on phantoms).
    * ``trainer(task, options, models_dir, name, version)`` — replaces the shared recipe
      for a task it does not fit (several inputs, auxiliary heads, calibration through
      a per-series rule); it returns the same :class:`TrainingOutcome`.

    ``class_names`` are in label order; with ``loss="bce"`` there are two and the
    single logit scores the second.
    """

    name: str
    summary: str
    modality: tuple[str, ...]
    class_names: tuple[str, ...]
    card: CardText
    loss: Literal["bce", "ce"] = "bce"
    spec: Callable[[TaskOptions], PreprocessSpec] | None = None
    datasets: Mapping[str, DatasetFactory] = field(default_factory=dict)
    model: Callable[[TaskOptions], nn.Module] | None = None
    train_config: Callable[[TaskOptions], TrainConfig] | None = None
    export_wrapper: Callable[[nn.Module], nn.Module] | None = None
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None
    aggregate: Aggregate | None = None
    package_metrics: Callable[[ModelPackage, TaskOptions], Sequence[Metric]] | None = None
    trainer: Callable[[Task, TaskOptions, Path, str | None, str], TrainingOutcome] | None = None
    input_name: str = "image"
    package_name: str = ""

    @property
    def implemented(self) -> bool:
        return (self.spec is not None and self.model is not None
                and self.train_config is not None and bool(self.datasets))

    @property
    def default_package_name(self) -> str:
        return self.package_name or self.name


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or replace) a task in :data:`TASKS`; the CLI lists what is registered."""
    TASKS[task.name] = task
    return task


# --- the pneumonia task (chest X-ray, seed 004) --------------------------------------------


def pneumonia_spec(options: TaskOptions) -> PreprocessSpec:
    """Seed 004's preprocessing, made one spec: display range, area resize, CLAHE, z-score.

    ``robust_minmax`` maps MONOCHROME1 and MONOCHROME2, any bit depth and any rescale to
    the same display intensities; CLAHE runs after the resize so the stored resolution
    does not change its result; a per-image z-score replaces ImageNet statistics for a
    single-channel network trained from scratch.
    """
    size = options.size
    return PreprocessSpec.from_dict([
        {"name": "modality_lut"},
        {"name": "robust_minmax", "low_percentile": 0.5, "high_percentile": 99.5},
        {"name": "resize", "size": [size, size], "interpolation": "area"},
        {"name": "clahe", "clip_limit": 2.0, "tile_grid": [8, 8]},
        {"name": "zscore"},
    ])


def _pneumonia_phantoms(options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
    from dicomnode.training.datasets import chest_xray_phantoms

    o = options.resolved()
    assert o.n_val is not None and o.n_test is not None and o.phantom_size is not None
    return chest_xray_phantoms(spec, n_train=o.n_train, n_val=o.n_val, n_test=o.n_test,
                               seed=o.seed, val_seed=o.val_seed, test_seed=o.test_seed,
                               size=o.phantom_size)


def _require_root(options: TaskOptions) -> Path:
    if not options.root:
        raise TrainingRunError(f"--data {options.data} needs --root")
    return Path(options.root)


def _class_folders(task_classes: tuple[str, ...]) -> DatasetFactory:
    def build(options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
        from dicomnode.training.datasets import class_folder_dataset

        return class_folder_dataset(_require_root(options), spec, classes=task_classes,
                                    resplit=options.resplit, seed=options.seed)

    return build


def _dicom_csv(task_classes: tuple[str, ...]) -> DatasetFactory:
    def build(options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
        from dicomnode.training.datasets import dicom_csv_dataset

        if not options.labels:
            raise TrainingRunError("--data dicom-csv needs --labels CSV")
        return dicom_csv_dataset(_require_root(options), options.labels, spec,
                                 classes=task_classes, seed=options.seed)

    return build


def slice_classifier(options: TaskOptions) -> nn.Module:
    """A single-logit ResNet slice classifier sized by ``--depth``/``--width``.

    ``--weights`` initialises the trunk from a torchvision-format file (ImageNet or
    RadImageNet, saved locally; nothing is downloaded), which needs ``--width 64``.
    ``--output-stride`` 16 or 8 keeps the last stage(s) at full resolution, so the CAM
    grid is fine enough to point at a lesion smaller than 32 pixels.
    """
    from dicomnode.training.architectures import (
        ResNetDepth,
        load_torchvision_resnet_weights,
        small_slice_classifier,
    )

    depths: dict[int, ResNetDepth] = {10: 10, 18: 18, 34: 34, 50: 50, 101: 101}
    if options.depth not in depths:
        raise TrainingRunError(f"--depth must be one of {sorted(depths)}; got {options.depth}")
    model = small_slice_classifier(1, depth=depths[options.depth], width=options.width, head="mlp",
                                   hidden=max(16, 4 * options.width))
    _reduce_output_stride(model.backbone, options.output_stride)
    if options.weights:
        load_torchvision_resnet_weights(model.backbone, options.weights)
    return model


def _reduce_output_stride(trunk: ResNet, stride: int) -> None:
    """Give the first block of layer4 (16) or of layer3 and layer4 (8) stride 1.

    Parameter names and shapes do not change, so torchvision weights still load.
    """
    from torch import nn

    from dicomnode.training.architectures import BasicBlock, Bottleneck

    keep = {32: 0, 16: 1, 8: 2}.get(stride)
    if keep is None:
        raise TrainingRunError(f"--output-stride must be 8, 16 or 32; got {stride}")
    layers = [trunk.layer4, trunk.layer3][:keep]
    for layer in layers:
        first = layer[0]
        if not isinstance(first, BasicBlock | Bottleneck):
            raise TrainingRunError("--output-stride needs a ResNet trunk")
        strided = first.conv1 if isinstance(first, BasicBlock) else first.conv2
        strided.stride = (1, 1)
        if isinstance(first.downsample, nn.Sequential):
            shortcut = first.downsample[0]
            if isinstance(shortcut, nn.Conv2d):
                shortcut.stride = (1, 1)


def classifier_config(options: TaskOptions) -> TrainConfig:
    """The shared recipe: balanced class weights, a named augmentation preset, clipping
    at norm 1, early stopping on validation AUC, and optionally seed 002's stages."""
    from dicomnode.training.augment import PRESETS
    from dicomnode.training.loop import TrainConfig, seed002_stages

    if options.augment not in PRESETS:
        raise TrainingRunError(f"--augment must be one of {sorted(PRESETS)}")
    groups: tuple[Any, ...] = ()
    stages: tuple[Any, ...] = ()
    if options.stages == "seed002":
        total = max(3, options.epochs)
        first = max(1, round(total * 5 / 40))
        second = max(1, round(total * 7 / 40))
        groups, stages = seed002_stages(head_lr=options.learning_rate,
                                        epochs=(first, second, max(1, total - first - second)))
    return TrainConfig(epochs=options.epochs, batch_size=options.batch_size,
                       learning_rate=options.learning_rate, groups=groups, stages=stages,
                       augmentation=PRESETS[options.augment], patience=options.patience,
                       seed=options.seed, progress=options.progress, device=options.device,
                       localisation_weight=options.loc_weight)


def with_cam(model: nn.Module) -> nn.Module:
    """Export logits and the in-graph Grad-CAM of every class (one for a single logit)."""
    from dicomnode.training.architectures import GapClassifier
    from dicomnode.training.gradcam import WithCam

    if not isinstance(model, GapClassifier):
        raise TrainingRunError("the CAM export needs a GapClassifier")
    return WithCam(model, "all")


def _pneumonia_heatmaps(package: ModelPackage, options: TaskOptions) -> Sequence[Metric]:
    from dicomnode.training.heatmap_eval import pneumonia_heatmap_metrics

    return pneumonia_heatmap_metrics(package, options)


register_task(Task(
    name="pneumonia",
    summary="pneumonia vs normal on frontal chest radiographs (CR/DX)",
    modality=("CR", "DX"),
    class_names=("normal", "pneumonia"),
    card=CardText(
        intended_use=("Research and demonstration only: scores frontal chest radiographs for "
                      "a pattern of pneumonic consolidation. Not a medical device; not for "
                      "clinical use."),
        output_meaning="pneumonia logit; the sigmoid gives P(pneumonia)",
        cam_meaning="Grad-CAM of the pneumonia logit, scaled to [0, 1] per image",
        input_description="one frontal chest radiograph, preprocessed by the card's spec",
        limitations=(
            "Frontal views only; lateral views, children and portable rotated films were "
            "not represented.",
            "Operating points were chosen on the validation set and measured on the test "
            "set; re-check them on local data before any use.",
        ),
    ),
    loss="bce",
    spec=pneumonia_spec,
    datasets={"phantom": _pneumonia_phantoms,
              "folder": _class_folders(("normal", "pneumonia")),
              "dicom-csv": _dicom_csv(("normal", "pneumonia"))},
    model=slice_classifier,
    train_config=classifier_config,
    export_wrapper=with_cam,
    package_metrics=_pneumonia_heatmaps,
    package_name="pneumonia-cxr",
))

# Planned: registered by name so the CLI can say what exists; each needs its factories.
for _name, _summary, _modality, _classes in (
    ("metastasis", "brain metastasis on head CT, slice model max-pooled per patient (MIL)",
     ("CT",), ("no-metastasis", "metastasis")),
    ("brain-tumour", "healthy / benign / malignant brain tumour from CT, MR or both",
     ("CT", "MR"), ("healthy", "benign", "malignant")),
    ("dat-classifier", "DaT SPECT normal vs reduced striatal uptake (CNN + BiLSTM)",
     ("NM",), ("normal", "abnormal")),
):
    register_task(Task(_name, _summary, _modality, _classes,
                       CardText("not implemented yet", "", "", "")))


# --- training -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainingOutcome:
    """What a training run wrote and measured."""

    package: ModelPackage
    checkpoint: Path
    test_report: EvaluationReport
    val_report: EvaluationReport
    serving_report: EvaluationReport | None
    seconds: float
    cross_validation: CrossValidationReport | None = None


def _stream(options: TaskOptions) -> TextIO | None:
    return sys.stderr if options.progress else None


# Task modules register themselves on import, replacing the placeholders above. They are
# imported when a task is needed, not with the CLI: `dicomnode serve` never pays for them.
_TASK_MODULES = ("tasks_metastasis", "tasks_brain", "tasks_dat", "tasks_segmentation")


def load_task_modules() -> None:
    for module in _TASK_MODULES:
        importlib.import_module(f"dicomnode.training.{module}")


def _task(name: str) -> Task:
    load_task_modules()
    task = TASKS.get(name)
    if task is None:
        raise TrainingRunError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    if not task.implemented:
        raise TrainingRunError(f"task {name!r} ({task.summary}) is not implemented yet")
    return task


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(temporary, path)
    return path


def _training_data(task: Task, splits: DatasetSplits) -> dict[str, Any]:
    description = splits.description
    if splits.synthetic and NOT_CLINICAL not in description:
        description += f" ({NOT_CLINICAL})"
    return {"description": description, "cases": splits.cases(),
            "sources": list(splits.sources), "synthetic": splits.synthetic}


def train_task(
    task_name: str,
    options: TaskOptions,
    models_dir: Path,
    *,
    name: str | None = None,
    version: str = "0.1.0",
) -> TrainingOutcome:
    """Train, evaluate, save a checkpoint, export the package and re-evaluate it served."""
    import torch

    from dicomnode.training.loop import fit

    started = time.perf_counter()
    task = _task(task_name)
    if options.freeze_encoders and task.name != "brain-tumour":
        raise TrainingRunError("--freeze-encoders is for the brain-tumour fusion task only")
    if task.trainer is not None:
        return task.trainer(task, options.resolved(), models_dir, name, version)
    assert task.spec and task.model and task.train_config
    options = options.resolved()
    if options.data not in task.datasets:
        raise TrainingRunError(f"task {task.name} trains from --data "
                               f"{' | '.join(sorted(task.datasets))}; got {options.data!r}")
    if options.n_calibration and (task.loss != "bce" or options.calibration == "none"):
        raise TrainingRunError("--n-calibration needs --calibration temperature or platt")
    if options.threads:
        torch.set_num_threads(options.threads)
    stream = _stream(options)
    spec = task.spec(options)
    splits = _splits(task, options, spec)
    config = task.train_config(options)
    masks = splits.train.masks(stream) if config.localisation_weight > 0 else None
    x_train, y_train = splits.train.arrays(stream)
    x_val, y_val = splits.val.arrays(stream)
    test = splits.test if splits.test is not None and len(splits.test) else None
    held_out = test if test is not None else splits.val
    x_test, y_test = (held_out.arrays(stream) if held_out is not splits.val else (x_val, y_val))
    cross_validation = None
    if options.folds:
        cross_validation = _cross_validate(task, options, config, splits, (x_train, y_train),
                                           (x_val, y_val), stream)
    x_cal, y_cal = (splits.calibration.arrays(stream) if splits.calibration is not None
                    else (x_val, y_val))
    torch.manual_seed(options.seed)
    model = task.model(options)
    result = fit(model, (x_train, y_train), (x_val, y_val), config, loss_kind=task.loss,
                 n_classes=len(task.class_names), forward=task.forward, stream=stream,
                 masks=masks)
    calibration, val_report, test_report = _calibrate_and_measure(
        task, options, result.model, splits, (x_val, y_val), (x_cal, y_cal), (x_test, y_test))
    package_name = name or task.default_package_name
    card_fields = _card_fields(task, splits, test_report, version)
    training: dict[str, Any] = {
        "options": options.to_dict(),
        "config": config.to_dict(),
        **_measured_record(splits, val_report, calibration),
        "result": {k: v for k, v in result.to_dict().items() if k != "history"},
    }
    if config.localisation_weight > 0:
        training["localisation"] = _localisation_record(config.localisation_weight, masks,
                                                        y_train)
    if task.aggregate is not None:
        training["evaluation_unit"] = "patient (per-sample scores pooled by the task)"
    if cross_validation is not None:
        training["cross_validation"] = {
            "k": cross_validation.k, "fold_auc": cross_validation.fold_aucs.tolist(),
            "mean_auc": _json_number(cross_validation.mean_auc),
            "sd_auc": _json_number(cross_validation.sd_auc),
            "method": "patient-level stratified folds over train+val, fixed epochs"}
    provenance = {"task": task.name, "preprocessing_fingerprint": spec.fingerprint,
                  "training": training}
    directory = models_dir / package_name
    _write_json(directory / TRAINING_DIR / "history.json", result.to_dict())
    if cross_validation is not None:
        _write_json(directory / TRAINING_DIR / "cross_validation.json",
                    cross_validation.to_dict())
    checkpoint = _save_checkpoint(directory, task, options, card_fields, provenance, spec,
                                  result.model, x_test, val_report, test_report)
    written = export_checkpoint(checkpoint, models_dir, name=package_name, version=version)
    serving: EvaluationReport | None = None
    if task.loss == "bce" and test_report.auc.defined:
        serving = _serving_check(task, written.package, held_out, test_report, options)
    return TrainingOutcome(written.package, checkpoint, test_report, val_report, serving,
                           time.perf_counter() - started, cross_validation)


def _card_fields(task: Task, splits: DatasetSplits, test_report: EvaluationReport,
                 version: str) -> dict[str, Any]:
    """The card's measured parts (metrics, operating points, data, limitations)."""
    limitations = list(task.card.limitations)
    if splits.synthetic:
        limitations.insert(0, f"Trained and tested on {NOT_CLINICAL}.")
    if splits.test is None or not len(splits.test):
        limitations.append("No separate test set: metrics are on the validation set that "
                           "chose the thresholds and the stopping epoch (optimistic).")
    limitations.extend(f"Evaluation warning: {w}" for w in test_report.warnings)
    return {
        "version": version,
        "metrics": [dataclasses.asdict(m) for m in test_report.card_metrics()],
        "operating_points": [dataclasses.asdict(p) for p in test_report.card_operating_points(
            "logits", class_name=task.class_names[-1])] if task.loss == "bce" else [],
        "training_data": _training_data(task, splits),
        "limitations": limitations,
    }


def _measured_record(splits: DatasetSplits, val_report: EvaluationReport,
                     calibration: CalibrationFit | None) -> dict[str, Any]:
    """Provenance of the data and of what was fitted on them after training."""
    record: dict[str, Any] = {
        "data": splits.describe(),
        "data_provenance": dict(splits.provenance),
        "validation_auc": _json_number(val_report.auc.value),
        "thresholds_from": "calibration" if splits.calibration is not None else "validation",
    }
    if calibration is not None:
        record["calibration"] = calibration.to_dict()
    return record


def _save_checkpoint(directory: Path, task: Task, options: TaskOptions,
                     card_fields: Mapping[str, Any], provenance: Mapping[str, Any],
                     spec: PreprocessSpec, model: nn.Module, x_example: NDArray[np.float32],
                     val_report: EvaluationReport, test_report: EvaluationReport) -> Path:
    """The checkpoint (weights, options, card fields) and the torch reports beside it."""
    import torch

    checkpoint = directory / TRAINING_DIR / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(x_example[: min(2, x_example.shape[0])].copy())
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "task": task.name,
        "options": json.dumps(options.to_dict()),
        "card": json.dumps(card_fields),
        "provenance": json.dumps(provenance, default=str),
        "spec": json.dumps(spec.to_dict()),
        "state_dict": model.state_dict(),
        "example": example,
    }, checkpoint)
    _write_json(directory / TRAINING_DIR / "validation_report.json", val_report.to_dict())
    _write_json(directory / TRAINING_DIR / "test_report_torch.json", test_report.to_dict())
    return checkpoint


def recalibration_start(directory: Path, n_calibration: int, calibration_seed: int | None,
                        n_test: int | None
                        ) -> tuple[dict[str, Any], Task, TaskOptions, dict[str, Any]]:
    """What every recalibration starts from: the package's checkpoint, its task, its
    options with the new calibration (and test) patients, and the provenance entry that
    records what the new map replaces."""
    from dicomnode.inference.package import sha256_file

    if n_calibration < 1:
        raise TrainingRunError("recalibrate needs calibration patients (n_calibration >= 1)")
    checkpoint = directory / TRAINING_DIR / "checkpoint.pt"
    data = _load_checkpoint(checkpoint)
    changes: dict[str, Any] = {"n_calibration": n_calibration}
    if calibration_seed is not None:
        changes["calibration_seed"] = calibration_seed
    if n_test is not None:
        changes["n_test"] = n_test
    options = dataclasses.replace(TaskOptions.from_dict(json.loads(data["options"])),
                                  **changes).resolved()
    earlier = json.loads(data["provenance"])["training"]
    replaced = {
        "from_checkpoint_sha256": sha256_file(checkpoint),
        "earlier_calibration": {**earlier.get("calibration", {}),
                                "note": "folded into the weights before this one"},
        "earlier_thresholds_from": earlier.get("thresholds_from"),
    }
    return data, _task(str(data["task"])), options, replaced


def recalibrate_package(directory: Path | str, *, n_calibration: int,
                        calibration_seed: int | None = None, n_test: int | None = None,
                        version: str | None = None, stream: TextIO | None = None
                        ) -> TrainingOutcome:
    """Redo a package's post-training steps from its checkpoint on ``n_calibration``
    calibration patients (and optionally another test-set size), in place.

    What ``train ... --n-calibration N`` does after training, on the weights the
    checkpoint holds. Those carry the earlier temperature or Platt map folded in; both
    families are closed under composition (``a2 (a1 z + b1) + b2``), so the new map and
    every number after it are what a fresh run with the same options gives, to the
    optimiser's tolerance. The earlier map stays in the card's provenance. For tasks
    trained by the shared recipe (a task with its own trainer has its own recalibration).
    """
    import torch

    started = time.perf_counter()
    directory = Path(directory)
    data, task, options, replaced = recalibration_start(directory, n_calibration,
                                                        calibration_seed, n_test)
    if task.trainer is not None or task.model is None or task.spec is None:
        raise TrainingRunError(f"{task.name} has its own trainer; recalibrate here is for "
                               "tasks trained by the shared recipe")
    if options.calibration == "none" or task.loss != "bce":
        raise TrainingRunError("recalibrate needs a single-logit package trained with "
                               "--calibration temperature or platt")
    if options.threads:
        torch.set_num_threads(options.threads)
    stream = stream or _stream(options)
    spec = PreprocessSpec.from_dict(json.loads(data["spec"]))
    if task.spec(options).fingerprint != spec.fingerprint:
        raise TrainingRunError("the checkpoint's spec differs from what its task builds now")
    splits = _splits(task, options, spec)
    assert splits.calibration is not None
    model = task.model(dataclasses.replace(options, weights=None))
    model.load_state_dict(data["state_dict"])
    model.eval()
    val = splits.val.arrays(stream)
    cal = splits.calibration.arrays(stream)
    test = splits.test if splits.test is not None and len(splits.test) else None
    held_out = test if test is not None else splits.val
    held = held_out.arrays(stream) if held_out is not splits.val else val
    calibration, val_report, test_report = _calibrate_and_measure(
        task, options, model, splits, val, cal, held)
    earlier = json.loads(data["card"])
    card_fields = _card_fields(task, splits, test_report, version or str(earlier["version"]))
    provenance = json.loads(data["provenance"])
    training = {**provenance["training"], "options": options.to_dict(),
                **_measured_record(splits, val_report, calibration)}
    training["recalibrated"] = replaced
    provenance["training"] = training
    checkpoint = _save_checkpoint(directory, task, options, card_fields, provenance, spec,
                                  model, held[0], val_report, test_report)
    written = export_checkpoint(checkpoint, directory.parent, name=directory.name,
                                version=card_fields["version"])
    serving = (_serving_check(task, written.package, held_out, test_report, options)
               if test_report.auc.defined else None)
    return TrainingOutcome(written.package, checkpoint, test_report, val_report, serving,
                           time.perf_counter() - started)


def _splits(task: Task, options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
    """The task's data for these options, checked against the task's classes and, with
    ``--n-calibration``, holding the calibration part it asks for."""
    splits = task.datasets[options.data](options, spec)
    if tuple(c.lower() for c in splits.class_names) != task.class_names:
        raise TrainingRunError(f"the data's classes {list(splits.class_names)} are not the "
                               f"task's {list(task.class_names)}")
    if options.n_calibration and splits.calibration is None:
        raise TrainingRunError(f"--n-calibration: task {task.name} with --data {options.data} "
                               "has no calibration part")
    return splits


def _set_name(part: str, samples: SampleSet, n: int, task: Task) -> str:
    unit = f" patients, {len(samples)} samples" if task.aggregate is not None else ""
    return f"{part} (n={n}{unit})"


def _calibrate_and_measure(
    task: Task,
    options: TaskOptions,
    model: nn.Module,
    splits: DatasetSplits,
    val: tuple[NDArray[np.float32], NDArray[np.int64]],
    cal: tuple[NDArray[np.float32], NDArray[np.int64]],
    held: tuple[NDArray[np.float32], NDArray[np.int64]],
) -> tuple[CalibrationFit | None, EvaluationReport, EvaluationReport]:
    """After training: calibrate (folded into ``model``), choose the operating points,
    and measure the validation and held-out sets with torch (the points travel in the
    held-out report).

    The map and the points are fitted on the calibration part where the data have one,
    else on the validation part (which also chose the epoch).
    """
    from dicomnode.training.evaluate import choose_thresholds, evaluate
    from dicomnode.training.loop import predict_scores

    cal_set = splits.calibration if splits.calibration is not None else splits.val
    cal_part = "calibration set" if splits.calibration is not None else "validation set"
    test = splits.test if splits.test is not None and len(splits.test) else None
    held_out = test if test is not None else splits.val
    calibration = None
    if options.calibration != "none":
        from dicomnode.training.calibration import CalibrationError, calibrate_model

        if options.calibration not in ("temperature", "platt") or task.loss != "bce":
            raise TrainingRunError("--calibration is none, temperature or platt (for "
                                   "single-logit tasks)")
        try:
            calibration = calibrate_model(
                model, cal[0], lambda z: _pooled(task, cal_set, cal[1], z),
                method="platt" if options.calibration == "platt" else "temperature",
                forward=task.forward)
        except CalibrationError as exc:
            raise TrainingRunError(f"calibration on the {cal_part} failed: {exc}") from exc

    def scores(part: SampleSet, data: tuple[NDArray[np.float32], NDArray[np.int64]]
               ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        raw = predict_scores(model, data[0], loss_kind=task.loss, forward=task.forward)
        return _pooled(task, part, data[1], raw)

    y_val, val_scores = scores(splits.val, val)
    y_cal, cal_scores = (scores(cal_set, cal) if cal_set is not splits.val
                         else (y_val, val_scores))
    y_test, test_scores = scores(held_out, held)
    thresholds: dict[str, float] = {}
    if task.loss == "bce":
        chosen = choose_thresholds(y_cal, cal_scores,
                                   sensitivity_target=options.sensitivity_target)
        thresholds = _named_points({k: c.threshold for k, c in chosen.items()},
                                   options.point_names)
    test_name = _set_name("held-out test set" if test is not None
                          else "validation set, no test set", held_out, len(y_test), task)
    val_report = evaluate(y_val, val_scores, class_names=splits.class_names,
                          dataset=_set_name("validation set", splits.val, len(y_val), task),
                          n_boot=min(500, options.n_boot), seed=options.seed,
                          sensitivity_target=options.sensitivity_target)
    test_report = evaluate(y_test, test_scores, class_names=splits.class_names,
                           dataset=test_name, thresholds=thresholds,
                           thresholds_from=_set_name(cal_part, cal_set, len(y_cal), task),
                           n_boot=options.n_boot, seed=options.seed,
                           sensitivity_target=options.sensitivity_target)
    return calibration, val_report, test_report


def _localisation_record(weight: float, masks: NDArray[np.uint8] | None,
                         labels: NDArray[np.int64]) -> dict[str, Any]:
    """What the card says about ``--loc-weight``: the loss, and whether the data allowed it."""
    if masks is None:
        return {"weight": weight, "applied": False,
                "reason": "the training data carry no lesion masks; trained without it"}
    with_lesion = int(((masks.reshape(masks.shape[0], -1).max(axis=1) > 0)
                       & (labels == 1)).sum())
    return {"weight": weight, "applied": with_lesion > 0,
            "positive_samples_with_masks": with_lesion,
            "loss": ("cross-entropy between the softmax over feature-grid cells of the "
                     "standardised Grad-CAM evidence of the positive class (the exported "
                     "map before ReLU) and each cell's share of the training lesion mask "
                     "(same geometric augmentation as the image); positive samples only; "
                     "added to the classification loss times the weight"),
            "masks": "training split only; validation and test masks are not used"}


def _cross_validate(
    task: Task,
    options: TaskOptions,
    config: TrainConfig,
    splits: DatasetSplits,
    train: tuple[Any, Any],
    val: tuple[Any, Any],
    stream: TextIO | None,
) -> CrossValidationReport:
    """k-fold cross-validation by patient over train + val, before the final model.

    Each fold trains a fresh model for the configured epochs with no early stopping and
    no best-epoch selection: the held-out fold must not choose anything, or its AUC would
    flatter the model. The test set is not touched.
    """
    import numpy as np
    import torch

    from dicomnode.training.evaluate import cross_validate
    from dicomnode.training.loop import fit, predict_scores

    assert task.model is not None
    x = np.concatenate([train[0], val[0]])
    y = np.concatenate([train[1], val[1]])
    patients = [s.patient_id for s in (*splits.train.samples, *splits.val.samples)]
    fold_config = dataclasses.replace(config, patience=None, restore_best=False,
                                      progress=False)

    def fit_predict(train_index: Any, val_index: Any) -> Any:
        torch.manual_seed(options.seed)
        model = task.model(options)  # type: ignore[misc]
        fit(model, (x[train_index], y[train_index]), (x[val_index], y[val_index]),
            fold_config, loss_kind=task.loss, n_classes=len(task.class_names),
            forward=task.forward, stream=None)
        if stream is not None:
            stream.write(f"cross-validation fold done ({len(val_index)} held out)\n")
        return predict_scores(model, x[val_index], loss_kind=task.loss, forward=task.forward)

    report = cross_validate(fit_predict, y, patients, class_names=splits.class_names,
                            k=options.folds, seed=options.seed,
                            n_boot=min(500, options.n_boot))
    if stream is not None:
        stream.write(report.format_text() + "\n")
    return report


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _pooled(task: Task, samples: SampleSet, labels: NDArray[np.int64],
            scores: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The (labels, scores) a task's metrics are computed on (per patient for MIL)."""
    if task.aggregate is None:
        return labels, scores
    return task.aggregate(samples, scores)


def _named_points(thresholds: dict[str, float], names: str) -> dict[str, float]:
    """``--point-names balanced,screening`` renames (F1-optimal, sensitivity-target)."""
    if not names:
        return thresholds
    chosen = [n.strip() for n in names.split(",")]
    if len(chosen) != 2 or len(set(chosen)) != 2 or not all(chosen):
        raise TrainingRunError("--point-names needs two different names: F1-optimal first, "
                               "then the sensitivity-target point (e.g. balanced,screening)")
    if len(thresholds) != 2:
        return thresholds
    return dict(zip(chosen, thresholds.values(), strict=True))


def _evaluate_served(task: Task, package: ModelPackage, samples: SampleSet, *, dataset: str,
                     sensitivity_target: float, n_boot: int, seed: int,
                     min_per_class: int | None = None) -> EvaluationReport:
    """``evaluate_package``, pooled per patient first when the task aggregates."""
    from dicomnode.training.evaluate import (
        MIN_PER_CLASS,
        evaluate,
        evaluate_package,
        score_package,
    )

    floor = MIN_PER_CLASS if min_per_class is None else min_per_class
    if task.aggregate is None:
        return evaluate_package(package, samples, dataset=dataset,
                                sensitivity_target=sensitivity_target, n_boot=n_boot,
                                seed=seed, min_per_class=floor)
    scored = score_package(package, samples)
    labels, scores = task.aggregate(samples, scored.scores)
    card = package.card
    points = {p.name: p.threshold for p in card.operating_points
              if p.output == scored.output and p.scale == "probability"}
    report = evaluate(labels, scores, class_names=samples.class_names, dataset=dataset,
                      thresholds=points, thresholds_from=f"model card {card.name} {card.version}",
                      sensitivity_target=sensitivity_target, n_boot=n_boot, seed=seed,
                      min_per_class=floor)
    extra = {**report.extra, "model": card.name, "version": card.version,
             "sha256": card.sha256, "provider": scored.provider,
             "preprocessing_fingerprint": scored.spec_fingerprint,
             "unit": "patient", "samples": len(samples)}
    return dataclasses.replace(report, extra=extra)


def _serving_check(task: Task, package: ModelPackage, held_out: SampleSet,
                   torch_report: EvaluationReport, options: TaskOptions) -> EvaluationReport:
    """Re-score the held-out set through the package as served; refuse a disagreement."""
    from dicomnode.training.evaluate import write_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _evaluate_served(task, package, held_out, dataset=torch_report.dataset,
                                  sensitivity_target=options.sensitivity_target,
                                  n_boot=options.n_boot, seed=options.seed)
    difference = abs(report.auc.value - torch_report.auc.value)
    if not difference <= SERVING_AUC_TOLERANCE:
        raise TrainingRunError(
            f"the exported package scores the held-out set with AUC {report.auc.value:.4f}, "
            f"torch with {torch_report.auc.value:.4f}: serving does not reproduce training")
    out = package.directory / EVALUATION_DIR
    _write_json(out / "report.json", report.to_dict())
    write_plots(report, out)
    return report


# --- export ---------------------------------------------------------------------------------


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise TrainingRunError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for a bad file
        raise TrainingRunError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise TrainingRunError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return data


def export_checkpoint(
    checkpoint: Path, models_dir: Path, *, name: str | None = None, version: str | None = None
) -> WrittenPackage:
    """Rebuild the task's model from a checkpoint and write a verified package.

    The card gets the spec the model was trained with, its fingerprint (in provenance,
    for serving to check), the held-out metrics and operating points saved at training,
    and the sha256 of the checkpoint it came from.
    """
    from dicomnode.inference.package import Metric, OperatingPoint, TrainingData, sha256_file
    from dicomnode.training.export import OutputDescription, write_model_package

    data = _load_checkpoint(checkpoint)
    task = _task(str(data["task"]))
    assert task.model is not None
    options = TaskOptions.from_dict(json.loads(data["options"]))
    card = json.loads(data["card"])
    provenance = json.loads(data["provenance"])
    spec = PreprocessSpec.from_dict(json.loads(data["spec"]))
    if task.spec is not None and task.spec(options).fingerprint != spec.fingerprint:
        raise TrainingRunError("the checkpoint's spec differs from what its task builds now; "
                               "export from the code version that trained it")
    model = task.model(dataclasses.replace(options, weights=None))
    model.load_state_dict(data["state_dict"])
    model.eval()
    wrapper = task.export_wrapper(model) if task.export_wrapper is not None else model
    positive = task.class_names[-1] if task.loss == "bce" else None
    classes = (positive,) if positive is not None else task.class_names
    outputs = [OutputDescription("logits", "logits", task.card.output_meaning, classes=classes,
                                 activation="sigmoid" if task.loss == "bce" else "softmax")]
    if task.export_wrapper is not None:
        outputs.append(OutputDescription("cam", "cam", task.card.cam_meaning, classes=classes,
                                         explains="logits", cam_target="all"))
    training = card["training_data"]
    written = write_model_package(
        wrapper, {task.input_name: data["example"]}, models_dir,
        name=name or task.default_package_name,
        version=version or str(card.get("version", "0.1.0")),
        task=task.name,
        modality=task.modality,
        outputs=outputs,
        preprocessing=[step.to_dict() for step in spec.steps],
        operating_points=[OperatingPoint(**p) for p in card["operating_points"]],
        training_data=TrainingData(training["description"], training["cases"],
                                   tuple(training["sources"]), bool(training["synthetic"])),
        metrics=[Metric(**m) for m in card["metrics"]],
        intended_use=(f"{SYNTHETIC_USE} {task.card.intended_use}" if training["synthetic"]
                      else task.card.intended_use),
        input_descriptions={task.input_name: task.card.input_description},
        limitations=tuple(card["limitations"]),
    )
    extra = {**provenance, "checkpoint_sha256": sha256_file(checkpoint)}
    package = _amend_provenance(written.package, extra)
    if task.package_metrics is not None:
        measured = task.package_metrics(package, options)
        if measured:
            package = _amend_provenance(package, {}, metrics=measured)
    return dataclasses.replace(written, package=package)


def _amend_provenance(package: ModelPackage, extra: Mapping[str, Any],
                      metrics: Sequence[Metric] = ()) -> ModelPackage:
    """Add training provenance (and metrics measured on the written package) to its card
    (the ONNX sha256 is unaffected)."""
    from dicomnode.inference.package import load_package

    card = dataclasses.replace(package.card, provenance={**package.card.provenance, **extra},
                               metrics=(*package.card.metrics, *metrics))
    temporary = package.card_path.with_name(f".{package.card_path.name}.tmp")
    temporary.write_text(card.to_yaml(), encoding="utf-8")
    os.replace(temporary, package.card_path)
    return load_package(package.directory)


# --- evaluation of a package ----------------------------------------------------------------


def evaluate_model(
    package_dir: Path,
    options: TaskOptions,
    *,
    part: str = "test",
    min_per_class: int = 30,
) -> EvaluationReport:
    """Evaluate a package on data named like training data (the card names its task).

    Phantom data use ``options.test_seed`` and ``options.n_test``; a seed the card says
    was used in training is refused, since that measures memory.
    """
    from dicomnode.inference.package import load_package

    package = load_package(package_dir)
    card = package.card
    task = _task(card.task)
    spec = PreprocessSpec.from_dict(list(card.preprocessing))
    training = card.provenance.get("training", {})
    trained = training.get("data_provenance", {}) if isinstance(training, Mapping) else {}
    if options.data not in task.datasets:
        raise TrainingRunError(f"task {task.name} reads --data "
                               f"{' | '.join(sorted(task.datasets))}; got {options.data!r}")
    if options.data == "phantom":
        seeds = trained.get("seeds", {}) if isinstance(trained, Mapping) else {}
        seed = options.test_seed if options.test_seed is not None else 20000
        used = [k for k, v in seeds.items() if k in ("train", "val") and v == seed]
        if used:
            raise TrainingRunError(f"phantom seed {seed} made this model's {used[0]} set; "
                                   "evaluating on it measures memory, pick another --seed")
        size = options.phantom_size or trained.get("size") or 2 * _input_size(card)
        build = dataclasses.replace(options, n_train=2, n_val=2,
                                    n_test=options.n_test or 200, seed=seed + 1,
                                    val_seed=seed + 2, test_seed=seed, phantom_size=int(size))
        samples = task.datasets["phantom"](build, spec).test
        label = f"{NOT_CLINICAL}: {task.name} phantoms, seed {seed}"
    else:
        splits = task.datasets[options.data](options, spec)
        chosen = splits.parts().get(part)
        if chosen is None:
            raise TrainingRunError(f"the data have no {part!r} part "
                                   f"(parts: {', '.join(splits.parts())})")
        samples = chosen
        label = f"{part} part of {samples.description}"
    if samples is None or not len(samples):
        raise TrainingRunError("no samples to evaluate")
    return _evaluate_served(task, package, samples, dataset=f"{label} (n={len(samples)})",
                            sensitivity_target=options.sensitivity_target,
                            n_boot=options.n_boot, seed=options.seed,
                            min_per_class=min_per_class)


def _input_size(card: Any) -> int:
    shape = card.inputs[0].shape
    return int(shape[-1]) if isinstance(shape[-1], int) else 128


# --- command line ---------------------------------------------------------------------------


def _cli_error(message: str) -> Exception:
    from dicomnode.cli import CliError

    return CliError(message)


def _options(args: argparse.Namespace) -> TaskOptions:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TaskOptions)
              if hasattr(args, f.name) and getattr(args, f.name) is not None}
    if getattr(args, "no_progress", False):
        values["progress"] = False
    return TaskOptions.from_dict(values)


def _run(action: Callable[[], int]) -> int:
    """Turn the errors a user can fix into one-line CLI errors.

    Evaluation warnings are printed as WARNING lines of the report, so the Python
    warnings that carry the same text are not shown a second time.
    """
    from dicomnode.imaging import ImagingError
    from dicomnode.inference.errors import ModelPackageError
    from dicomnode.training.datasets import DatasetError
    from dicomnode.training.evaluate import EvaluationWarning
    from dicomnode.training.splits import SplitError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EvaluationWarning)
            return action()
    except (TrainingRunError, DatasetError, SplitError, ImagingError,
            ModelPackageError) as exc:
        raise _cli_error(str(exc)) from exc


def cmd_train(args: argparse.Namespace) -> int:
    def action() -> int:
        options = _options(args)
        outcome = train_task(args.task, options, Path(args.out), name=args.name,
                             version=args.version)
        report = outcome.serving_report or outcome.test_report
        if outcome.cross_validation is not None:
            cv = outcome.cross_validation
            print(f"{cv.k}-fold cross-validation by patient (train+val): fold AUCs "
                  f"{', '.join(f'{a:.3f}' for a in cv.fold_aucs)}; mean {cv.mean_auc:.3f}")
        print(report.format_text())
        for message in outcome.val_report.warnings:
            print(f"  WARNING (validation): {message}")
        print(f"wrote {outcome.package.directory} (model.onnx + model.yaml, sha256 "
              f"{outcome.package.sha256[:12]}...) in {outcome.seconds:.1f} s; checkpoint "
              f"{outcome.checkpoint}")
        return 0

    return _run(action)


def cmd_evaluate(args: argparse.Namespace) -> int:
    def action() -> int:
        from dicomnode.training.evaluate import write_plots

        options = _options(args)
        options = dataclasses.replace(options, test_seed=args.seed, n_test=args.n,
                                      seed=args.bootstrap_seed)
        report = evaluate_model(Path(args.model), options, part=args.part,
                                min_per_class=args.min_per_class)
        if args.json:
            print(report.to_json())
        else:
            print(report.format_text())
        if args.out:
            out = Path(args.out)
            _write_json(out / "report.json", report.to_dict())
            paths = write_plots(report, out)
            print(f"wrote {out / 'report.json'} and {', '.join(p.name for p in paths)}",
                  file=sys.stderr)
        return 1 if args.strict and report.warnings else 0

    return _run(action)


def cmd_export(args: argparse.Namespace) -> int:
    def action() -> int:
        written = export_checkpoint(Path(args.checkpoint), Path(args.out), name=args.name,
                                    version=args.version)
        agreement = written.agreement
        print(f"wrote {written.package.directory} (ONNX agrees with torch: max |Δ| "
              f"{agreement.max_abs_diff:.2g})")
        return 0

    return _run(action)


def cmd_recalibrate(args: argparse.Namespace) -> int:
    def action() -> int:
        directory = Path(args.package)
        task = _task(str(_load_checkpoint(directory / TRAINING_DIR / "checkpoint.pt")["task"]))
        arguments = {"n_calibration": args.n_calibration,
                     "calibration_seed": args.calibration_seed, "n_test": args.n_test,
                     "version": args.version, "stream": sys.stderr}
        if task.trainer is not None:
            from dicomnode.training.tasks_brain import recalibrate_slice_package

            outcome = recalibrate_slice_package(directory, **arguments)
        else:
            outcome = recalibrate_package(directory, **arguments)
        print((outcome.serving_report or outcome.test_report).format_text())
        print(f"wrote {outcome.package.directory} (sha256 {outcome.package.sha256[:12]}...) "
              f"in {outcome.seconds:.0f} s")
        return 0

    return _run(action)


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=("phantom", "folder", "dicom-csv"),
                   help="phantom (synthetic, generated), folder (root/{train,val,test}/"
                        "<class>/), dicom-csv (root/<patient>/ + --labels CSV)")
    p.add_argument("--root", help="data folder for --data folder | dicom-csv")
    p.add_argument("--labels", help="patient_id,label[,split] CSV for --data dicom-csv")
    p.add_argument("--phantom-size", dest="phantom_size", type=int,
                   help="phantom image size before preprocessing")
    p.add_argument("--sensitivity-target", dest="sensitivity_target", type=float,
                   help="operating point sensitivity (default 0.9)")
    p.add_argument("--n-boot", dest="n_boot", type=int,
                   help="bootstrap resamples for confidence intervals (default 2000)")


def register(sub: Any) -> None:
    """Add the training subcommands to the main parser's subparsers."""
    p = sub.add_parser(
        "train", help="train a bundled analysis and write a model package",
        description=f"Tasks: {', '.join(sorted(TASKS))}.")
    p.add_argument("task", help=f"one of {', '.join(sorted(TASKS))}")
    p.add_argument("--out", required=True, help="models folder; the package is OUT/NAME/")
    p.add_argument("--name", help="package name (default: the task's)")
    p.add_argument("--version", default="0.1.0")
    _data_arguments(p)
    p.add_argument("--n-train", dest="n_train", type=int, help="phantom training cases")
    p.add_argument("--n-val", dest="n_val", type=int, help="phantom validation cases")
    p.add_argument("--n-test", dest="n_test", type=int, help="phantom test cases")
    p.add_argument("--size", type=int, help="model input size in pixels (default 128)")
    p.add_argument("--seed", type=int, help="seed of everything random (default 0)")
    p.add_argument("--val-seed", dest="val_seed", type=int)
    p.add_argument("--test-seed", dest="test_seed", type=int,
                   help="phantom test-set seed (default seed + 1000)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", dest="learning_rate", type=float)
    p.add_argument("--augment", help="augmentation preset: none, seed004, seed000, light")
    p.add_argument("--stages", choices=("none", "seed002"),
                   help="seed002: head, then +layer4, then +layer3 at 10:2:1 learning rates")
    p.add_argument("--weights", help="torchvision-format ResNet weights file (--width 64)")
    p.add_argument("--depth", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    p.add_argument("--resplit", action="store_true", default=None,
                   help="pool the folders and re-split by patient (tiny val folders)")
    p.add_argument("--folds", type=int,
                   help="also run K-fold cross-validation by patient over train+val")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--calibration", choices=("none", "temperature", "platt"),
                   help="fit a logit calibration on validation and fold it into the model")
    p.add_argument("--output-stride", dest="output_stride", type=int, choices=(8, 16, 32),
                   help="feature-map stride of the slice classifier (CAM cell size; default 32)")
    p.add_argument("--loc-weight", dest="loc_weight", type=float,
                   help="weight of the auxiliary localisation loss on the Grad-CAM where the "
                        "training data carry lesion masks (phantoms); default 0 (off)")
    p.add_argument("--n-calibration", dest="n_calibration", type=int,
                   help="brain-tumour-ct/-mr, metastasis: fit the calibration and choose "
                        "the operating points on this many phantom patients of their own "
                        "seed (default 0: on the validation patients, which also pick the "
                        "best epoch)")
    p.add_argument("--calibration-seed", dest="calibration_seed", type=int,
                   help="phantom seed of the calibration patients (default seed + 2)")
    p.add_argument("--freeze-encoders", dest="freeze_encoders", action="store_true",
                   default=None,
                   help="brain-tumour (fusion) only: keep both encoders as initialised from "
                        "the CT and MR slice models and train the heads alone")
    p.add_argument("--point-names", dest="point_names",
                   help="names for the F1-optimal and sensitivity-target operating points "
                        "(default f1-optimal,sensitivity-<target>), e.g. balanced,screening")
    p.add_argument("--device", help="torch device for training: cpu (default), cuda, cuda:1")
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model package as served (ONNX Runtime)")
    p.add_argument("--model", required=True, help="package folder (models/<name>)")
    _data_arguments(p)
    p.add_argument("--part", default="test", help="part of folder/CSV data (default test)")
    p.add_argument("--n", type=int, default=200, help="phantom cases (default 200)")
    p.add_argument("--seed", type=int, default=20000,
                   help="phantom seed; must differ from the training seeds (default 20000)")
    p.add_argument("--bootstrap-seed", dest="bootstrap_seed", type=int, default=0)
    p.add_argument("--min-per-class", dest="min_per_class", type=int, default=30)
    p.add_argument("--out", help="write report.json, roc.png, pr.png, reliability.png here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 if the report has warnings")
    p.set_defaults(func=cmd_evaluate, data="phantom")

    p = sub.add_parser("export", help="export a training checkpoint to a model package")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="models folder; the package is OUT/NAME/")
    p.add_argument("--name")
    p.add_argument("--version")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "recalibrate", help="refit a package's calibration and operating points on "
                            "calibration patients of their own seed and re-measure it served "
                            "(in place, from its training checkpoint)")
    p.add_argument("package", help="package folder (models/<name>) holding training/")
    p.add_argument("--n-calibration", dest="n_calibration", type=int, required=True)
    p.add_argument("--calibration-seed", dest="calibration_seed", type=int)
    p.add_argument("--n-test", dest="n_test", type=int,
                   help="test patients (default: as trained)")
    p.add_argument("--version", help="the package's new version")
    p.set_defaults(func=cmd_recalibrate)

