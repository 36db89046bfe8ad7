"""DaT-SPECT normal vs reduced striatal uptake: seed 000's CNN + bidirectional LSTM, done so
that it cannot quietly collapse.

Seed 000 trained a 1.8 M-parameter CNN + BiLSTM on 25 scans; it learned "always
Parkinson's" and reported a test AUC of 0.25 on four cases. Here the same architecture
family is kept at CPU size (:data:`DAT_CONV_CHANNELS`, about 12.4 k parameters) and
trained on hundreds of phantoms (:mod:`dicomnode.phantoms.dat_spect`) with exactly
balanced classes and a class-weighted loss; a run whose model predicts one class on
validation or test data fails instead of writing a package.

Why a resampled slab. The reconstructions come with 64 or 128 pixel matrices, 3.3-4.4 mm
voxels and 48-96 slices, and the head lies anywhere within +-15 mm. :func:`dat_slab` turns any
of them into the same physical box: 16 transaxial slices 4 mm apart x 64 x 64 pixels of
3 mm (64 x 192 x 192 mm), centred on the striatal uptake (:func:`striatal_centre`). The model
then sees the striata at one scale and place, and the LSTM runs over the 16 slices from
inferior to superior. The card's spec (a z-score over the whole slab) makes the scan's
count level irrelevant. Serving builds the input exactly so: ``dat_quant.load_volume``
(canonical z, y, x volume and spacing) -> :func:`dat_slab` -> the card's spec -> a
(1, 16, 64, 64) tensor. Both functions are numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from dicomnode.imaging import PreprocessSpec
from dicomnode.pipelines.dat_slab import (
    SLAB_PIXEL_MM,
    SLAB_SIZE,
    SLAB_SLICE_MM,
    SLAB_SLICES,
    dat_slab,
    striatal_centre,
)
from dicomnode.training.commands import (
    CHECKPOINT_FORMAT,
    NOT_CLINICAL,
    TRAINING_DIR,
    CardText,
    Task,
    TaskOptions,
    TrainingOutcome,
    TrainingRunError,
    register_task,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from torch import nn

    from dicomnode.training.datasets import DatasetSplits, Sample
    from dicomnode.training.loop import TrainConfig

__all__ = [
    "CLASSES",
    "DAT_CONV_CHANNELS",
    "SLAB_PIXEL_MM",
    "SLAB_SIZE",
    "SLAB_SLICES",
    "SLAB_SLICE_MM",
    "DatSlabReader",
    "dat_model",
    "dat_slab",
    "dat_spec",
    "striatal_centre",
]

CLASSES = ("normal", "reduced")
LABEL_STREAM = "dicomnode-dat-classifier-task-v1"
PHANTOM_SOURCE = "dicomnode.phantoms.dat_spect (123I-ioflupane SPECT reconstructions)"
FloatArray = NDArray[np.float64]


# --- the input slab ---------------------------------------------------------------------


def dat_spec(options: TaskOptions) -> PreprocessSpec:
    """One z-score over the whole slab (its 16 slices are one image's channels), so the
    scan's count level drops out while the slices keep their relative uptake."""
    del options
    return PreprocessSpec.from_dict([{"name": "zscore"}])


# --- phantom data -----------------------------------------------------------------------


def dat_labels(seed: int, n: int) -> list[str]:
    """Exactly balanced ``healthy`` / ``pd`` phantom conditions of the set (seed, n)."""
    from dicomnode.phantoms.common import balanced_labels, item_rng

    return balanced_labels(item_rng(LABEL_STREAM, seed, 0, "labels", n), n, ("healthy", "pd"))


class DatSlabReader:
    """Phantom slabs made on demand from their key ``dat:<seed>:<n>:<index>``.

    ``via_dicom`` builds the study as DICOM (``build_dat_study``) and reads it back with
    the node's loader (``dat_quant.load_volume``), as served; otherwise the volume comes
    straight from ``make_dat_volume`` with the same random stream (the same numbers).
    """

    assemble: Literal["image"] = "image"

    def __init__(self, *, via_dicom: bool = False) -> None:
        self.via_dicom = via_dicom
        self._slabs: dict[str, NDArray[np.float32]] = {}

    def samples(self, seed: int, n: int) -> list[Sample]:
        from dicomnode.training.datasets import Sample

        return [Sample(f"dat:{seed}:{n}:{i}", f"PH-DAT-{seed}-{i:04d}",
                       0 if condition == "healthy" else 1, (), i)
                for i, condition in enumerate(dat_labels(seed, n))]

    def volume(self, seed: int, n: int, index: int
               ) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
        from dicomnode.phantoms.dat_spect import build_dat_study, make_dat_volume, phantom_rng

        condition = dat_labels(seed, n)[index]
        if not self.via_dicom:
            volume, spacing, _ = make_dat_volume(phantom_rng(seed, index), condition=condition)
            return volume, (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        from dicomnode.pipelines.dat_quant import load_volume

        datasets: list[Dataset]
        datasets, _ = build_dat_study(seed, index, condition=condition)
        return load_volume(datasets)

    def read(self, sample: Sample) -> NDArray[np.float32]:
        if sample.key not in self._slabs:
            _, seed, n, index = sample.key.split(":")
            self._slabs[sample.key] = dat_slab(*self.volume(int(seed), int(n), int(index)))
        slab: NDArray[np.float32] = self._slabs[sample.key][np.newaxis]
        return slab


def dat_phantoms(options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
    """Train / validation / test phantom sets, each its own seed; the test set is read
    through DICOM as the node reads it."""
    from dicomnode.training.datasets import DatasetSplits, SampleSet

    o = options.resolved()
    assert o.n_val is not None and o.n_test is not None
    assert o.val_seed is not None and o.test_seed is not None
    seeds = {"train": o.seed, "val": o.val_seed, "test": o.test_seed}
    if len(set(seeds.values())) != 3:
        raise TrainingRunError("train, validation and test phantoms need three different seeds")
    sizes = {"train": o.n_train, "val": o.n_val, "test": o.n_test}
    description = (f"{NOT_CLINICAL}: DaT-SPECT phantoms from {PHANTOM_SOURCE}, exactly "
                   f"balanced normal / reduced; train seed {o.seed} (n={o.n_train}), "
                   f"validation seed {o.val_seed} (n={o.n_val}), test seed {o.test_seed} "
                   f"(n={o.n_test}, read back from DICOM)")
    parts: dict[str, SampleSet] = {}
    for part in ("train", "val", "test"):
        reader = DatSlabReader(via_dicom=part == "test")
        if sizes[part]:
            parts[part] = SampleSet(part, reader.samples(seeds[part], sizes[part]), spec,
                                    CLASSES, reader, description=description)
    return DatasetSplits(parts["train"], parts["val"], parts.get("test"), description, True,
                         (PHANTOM_SOURCE,), {"layout": "phantom", "kind": "dat-spect",
                                             "seeds": seeds, "unit": "study"})


# --- model and training -----------------------------------------------------------------


#: Three conv blocks of 8, 16 and 32 channels (about 12.4 k parameters, not seed 000's
#: 1.8 M). ``CnnBiLstmConfig.small()`` has two blocks: a receptive field of about 10
#: pixels (30 mm), so after the per-slice mean it could only tell how bright the striata
#: are, not their shape; it missed reduced scans whose caudate binding was high and whose
#: worse putamen alone had lost uptake, and flagged normal scans with low overall binding.
#: The third block sees about 22 pixels (66 mm): caudate and putamen of one side together.
DAT_CONV_CHANNELS = (8, 16, 32)


def dat_model(options: TaskOptions) -> nn.Module:
    """``CnnBiLstm`` with :data:`DAT_CONV_CHANNELS`, a 16-unit BiLSTM and dropout 0.5."""
    from dicomnode.training.architectures import CnnBiLstm, CnnBiLstmConfig

    del options
    return CnnBiLstm(CnnBiLstmConfig(conv_channels=DAT_CONV_CHANNELS, lstm_hidden=16,
                                     lstm_layers=1, dropout=0.5))


def dat_train_config(options: TaskOptions) -> TrainConfig:
    """Balanced BCE (the seed's 10:15 imbalance taught "always PD"), seed 000's own
    augmentation recipe, clipping, and a fixed number of epochs keeping the last weights.

    No early stopping (``--patience`` is ignored): validation AUC reaches ~1.0 within a few
    epochs, while the logits are still nearly flat, so it cannot choose an epoch; the
    validation set calibrates and sets the thresholds instead. The last fifth and the
    fifth before it run at 1/3 and 1/10 of the rate (a step schedule as the loop's stages):
    at a constant 0.003 the training loss kept jumping between 0.22 and 0.52, so "the last
    weights" were those of a random point on that swing.
    """
    from dicomnode.training.augment import PRESETS
    from dicomnode.training.loop import REST, Stage, TrainConfig

    if options.augment not in PRESETS:
        raise TrainingRunError(f"--augment must be one of {sorted(PRESETS)}")
    lr = options.learning_rate
    short = max(1, options.epochs // 5)
    main = max(1, options.epochs - 2 * short)
    stages = (Stage("lr", main, ((REST, lr),)), Stage("lr/3", short, ((REST, lr / 3),)),
              Stage("lr/10", short, ((REST, lr / 10),)))
    return TrainConfig(epochs=options.epochs, batch_size=options.batch_size,
                       learning_rate=lr, stages=stages,
                       augmentation=PRESETS[options.augment], patience=None,
                       restore_best=False, seed=options.seed, progress=options.progress,
                       device=options.device)


def _refuse_collapse(predicted: dict[str, int], where: str) -> None:
    if min(predicted.values()) == 0:
        raise TrainingRunError(
            f"the model predicts one class only on {where} ({predicted}): it collapsed "
            "like seed 000's; no package is written. Try more phantoms or epochs.")


def train_dat_task(task: Task, options: TaskOptions, models_dir: Path, name: str | None,
                   version: str) -> TrainingOutcome:
    """Train, calibrate (Platt, folded into ``fc``), export, and measure served."""
    import sys

    import torch

    from dicomnode.inference.package import sha256_file
    from dicomnode.training.architectures import count_parameters
    from dicomnode.training.commands import export_checkpoint
    from dicomnode.training.evaluate import evaluate, score_package, write_plots
    from dicomnode.training.loop import fit
    from dicomnode.training.tasks_brain import (
        _last_linear,
        _quiet_evaluate,
        _rewrite_card,
        _update_checkpoint,
        _write_json,
        binary_results,
        fit_series_calibration,
        fold_calibration,
    )

    assert task.spec is not None and task.model is not None and task.train_config is not None
    started = time.perf_counter()
    if options.data != "phantom":
        raise TrainingRunError(f"task {task.name} trains from --data phantom only")
    if options.threads:
        torch.set_num_threads(options.threads)
    stream = sys.stderr if options.progress else None
    spec = task.spec(options)
    splits = dat_phantoms(options, spec)
    assert splits.test is not None
    x_train, y_train = splits.train.arrays(stream)
    x_val, y_val = splits.val.arrays(stream)
    config = task.train_config(options)
    torch.manual_seed(options.seed)
    result = fit(task.model(options), (x_train, y_train), (x_val, y_val), config,
                 loss_kind="bce", n_classes=2, stream=stream)
    model = result.model.cpu().eval()
    fc = getattr(model, "fc", None)
    if not isinstance(fc, torch.nn.Module):
        raise TrainingRunError("the DaT model has no fc layer")

    def logits(x: NDArray[np.float32]) -> FloatArray:
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(x[i:i + 64])).double().numpy()
                                   for i in range(0, x.shape[0], 64)])

    raw = logits(x_val)
    calibration = fit_series_calibration([row[None] for row in raw], y_val)
    fold_calibration(_last_linear(fc), calibration)
    if not np.allclose(logits(x_val[:4]), calibration.apply(raw[:4]), rtol=1e-4, atol=1e-3):
        raise TrainingRunError("folding the calibration did not scale the logits as fitted")
    val_probs = 0.5 * (1.0 + np.tanh(0.5 * calibration.apply(raw)[:, 0]))
    val_name = f"validation phantoms, seed {options.val_seed} (n={len(y_val)})"
    val_report = _quiet_evaluate(evaluate, y_val, val_probs, class_names=CLASSES,
                                 dataset=val_name, n_boot=min(500, options.n_boot),
                                 seed=options.seed,
                                 sensitivity_target=options.sensitivity_target)
    _refuse_collapse(dict(val_report.predicted_counts), "validation phantoms")

    package_name = name or task.default_package_name
    directory = models_dir / package_name
    checkpoint = directory / TRAINING_DIR / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    parameters = count_parameters(model)
    training_data = {"description": splits.description, "cases": splits.cases(),
                     "sources": list(splits.sources), "synthetic": True}
    provenance: dict[str, Any] = {
        "task": task.name,
        "preprocessing_fingerprint": spec.fingerprint,
        "training": {
            "options": options.to_dict(), "config": config.to_dict(),
            "data": splits.describe(), "data_provenance": dict(splits.provenance),
            "result": {k: v for k, v in result.to_dict().items() if k != "history"},
            "parameters": parameters,
            "parameters_per_training_study": round(parameters / len(y_train), 1),
            "calibration": calibration.to_dict(),
            "thresholds_from": "validation phantoms",
        },
        "serving": {
            "input": ("one DaT-SPECT reconstruction (NM Image Storage, multi-frame or one "
                      "object per slice)"),
            "volume": "dicomnode.pipelines.dat_quant.load_volume -> (z, y, x) counts, spacing",
            "slab": (f"dicomnode.training.tasks_dat.dat_slab: {SLAB_SLICES} slices "
                     f"{SLAB_SLICE_MM:g} mm apart x {SLAB_SIZE} x {SLAB_SIZE} pixels of "
                     f"{SLAB_PIXEL_MM:g} mm, centred on the striatal uptake centroid "
                     "(tasks_dat.striatal_centre), trilinear, zero outside the scan, slice 0 "
                     "inferior"),
            "tensor": ("apply_spec(card preprocessing, slab[np.newaxis]) -> (1, 16, 64, 64) "
                       "float32; one study per batch row"),
        },
    }
    card_fields: dict[str, Any] = {"version": version, "metrics": [], "operating_points": [],
                                   "training_data": training_data,
                                   "limitations": list(task.card.limitations)}
    torch.save({"format": CHECKPOINT_FORMAT, "task": task.name,
                "options": json.dumps(options.to_dict()), "card": json.dumps(card_fields),
                "provenance": json.dumps(provenance, default=str),
                "spec": json.dumps(spec.to_dict()), "state_dict": model.state_dict(),
                "example": torch.from_numpy(np.ascontiguousarray(x_val[:2]))}, checkpoint)
    _write_json(directory / TRAINING_DIR / "history.json", result.to_dict())
    _write_json(directory / TRAINING_DIR / "validation_report.json", val_report.to_dict())
    package = export_checkpoint(checkpoint, models_dir, name=package_name,
                                version=version).package

    scored = score_package(package, splits.test)
    test_name = (f"held-out test phantoms, seed {options.test_seed} (n={len(splits.test)}), "
                 "DICOM read by dat_quant.load_volume, served package (card spec + ONNX "
                 "Runtime)")
    report, metrics, points = binary_results(
        (y_val, val_probs), (scored.labels, scored.scores), class_names=CLASSES,
        output="logits", options=options, test_name=test_name, val_name=val_name)
    try:
        _refuse_collapse(dict(report.predicted_counts), "test phantoms")
    except TrainingRunError:
        package.onnx_path.unlink(missing_ok=True)
        package.card_path.unlink(missing_ok=True)
        raise
    limitations = [f"Trained and tested on {NOT_CLINICAL}.", *task.card.limitations]
    limitations.extend(f"Evaluation warning: {w}" for w in report.warnings)
    provenance["evaluation"] = {"dataset": test_name, "served": True, "sha256": package.sha256,
                                "provider": scored.provider}
    card_fields.update(metrics=[dataclasses.asdict(m) for m in metrics],
                       operating_points=[dataclasses.asdict(p) for p in points],
                       limitations=limitations)
    checkpoint_sha = _update_checkpoint(checkpoint, card=json.dumps(card_fields),
                                        provenance=json.dumps(provenance, default=str))
    package = _rewrite_card(package, metrics=tuple(metrics), operating_points=tuple(points),
                            limitations=tuple(limitations),
                            provenance={**package.card.provenance, **provenance,
                                        "checkpoint_sha256": checkpoint_sha})
    if package.sha256 != sha256_file(package.onnx_path):
        raise TrainingRunError("the package's ONNX file changed during evaluation")
    evaluation = directory / "evaluation"
    _write_json(evaluation / "report.json", report.to_dict())
    write_plots(report, evaluation)
    return TrainingOutcome(package, checkpoint, report, val_report, report,
                           time.perf_counter() - started)


DAT_CARD = CardText(
    intended_use=("Calls a DaT-SPECT (123I-ioflupane) reconstruction normal or reduced "
                  "striatal uptake. Demonstration and integration testing only. Trained on "
                  "synthetic phantoms; not a medical device and not for clinical use."),
    output_meaning=("logit of reduced striatal uptake, calibrated on validation phantoms; "
                    "its sigmoid is P(reduced)"),
    cam_meaning="",
    input_description=(
        f"{SLAB_SLICES} transaxial slices {SLAB_SLICE_MM:g} mm apart x {SLAB_SIZE} x "
        f"{SLAB_SIZE} pixels of {SLAB_PIXEL_MM:g} mm centred on the striatal uptake "
        "(tasks_dat.dat_slab of "
        "dat_quant.load_volume's volume), inferior to superior, then the card's spec"),
    limitations=(
        "The phantoms' normal and reduced populations are separated by construction (the "
        "least affected PD-like putamen keeps at most ~70 % of normal binding); borderline "
        "and early disease, atypical parkinsonism, vascular lesions and motion are absent.",
        "Resolution 8-10.5 mm FWHM, 64/128 matrices and 3.3-4.4 mm voxels only; other "
        "cameras, collimators and reconstructions are untested.",
        "Calibration (folded into the logit) and operating points were fitted on validation "
        "phantoms; re-check both on local data before any use.",
        "No heat map and no heat-map metric: a DaT scan has no lesion to localise (the "
        "finding is a loss of putaminal uptake relative to the caudate), so the "
        "peak-in-lesion target of the lesion models does not apply and no substitute "
        "localisation metric is reported.",
    ),
)

register_task(Task(
    name="dat-classifier",
    summary="DaT SPECT normal vs reduced striatal uptake (CNN + BiLSTM over slices)",
    modality=("NM",),
    class_names=CLASSES,
    card=DAT_CARD,
    loss="bce",
    spec=dat_spec,
    datasets={"phantom": dat_phantoms},
    model=dat_model,
    train_config=dat_train_config,
    trainer=train_dat_task,
    input_name="slices",
    package_name="dat-classifier",
))
