"""Brain tumour tasks (seed 003): CT tumour / no tumour, MR healthy / benign / malignant, and
CT + MR fusion with stage and survival-risk heads, trained on synthetic phantoms.

Seed 003 reported 97-99 % accuracy for a ResNet-50 CT detector, an MR classifier and a
dual-encoder fusion network, never reproduced, with heat maps "85 % IoU" and stage and
survival heads trained on nothing in particular. Here the same three analyses are built so
that every number on their cards is measured, on phantoms made with a seed no training
step saw, through the package as the node serves it (card spec + ONNX Runtime).

Why slice models with a *key slice*. A series arrives with 20-150 slices of any thickness;
a 2-D network sized for two CPU cores sees one slice. The node therefore runs the model on
every slice of the series (each through the card's spec) and reports the **key slice**: the
slice with the highest tumour score (the tumour logit for CT; for MR
``logsumexp(benign, malignant) - healthy``). The series-level probabilities are the key
slice's, and its Grad-CAM is the heat map. For two classes this is max-pooling of slice
logits (seed 002's multiple-instance rule, :func:`dicomnode.inference.aggregate.max_pool_slices`).
The rule lives here as numpy (:func:`series_result`) so a pipeline can import it without
torch.

Why calibration is fitted on patients, not slices. Max-pooling over 50 slices shifts a
healthy series' score upwards, so slice-level probabilities are not series-level ones.
The scaling (Platt ``a * logit + b`` for CT; a temperature plus a no-tumour offset for MR
and fusion) is fitted on the validation *patients* through the key-slice rule and folded
into the last linear layer of the class head: the exported graph gives calibrated logits,
and because the scale is positive the key slice and the normalised CAM do not change.

Why the feature maps are 32 x 32. A ResNet's last map is 1/32 of the input (4 x 4 at
128 px, about 60 mm per cell): its CAM cannot point at a 1 cm lesion, and a bilinearly
upsampled map always peaks at a cell centre. The first blocks of ``layer2``, ``layer3``
and ``layer4`` keep stride 1 (:func:`keep_resolution`), so the map is 1/4 of the input
(cells of 4 px, 7 mm) and the in-graph Grad-CAM
(:class:`~dicomnode.training.gradcam.WithCam`) can land on a small lesion.

Why the MR model may be trained with tumour masks (``--loc-weight``). Trained on labels
alone, the three-class MR model of 0.1.0 barely learnt the meningiomas although they are
plain at 128 px (bright, round, well circumscribed): on its own training slices the
benign logit barely separated tumour from normal anatomy (scalp fat and the superior
sagittal sinus are about as bright on T1C), and of 50 held-out benign series 2 were
called benign. The phantoms know where every tumour is, so each tumour slice's own-class
Grad-CAM evidence is also trained towards its mask (the localisation loss of
:mod:`dicomnode.training.loop`); the served heat map is that same map.

Fusion (``brain-tumour``, package ``brain-tumour-fusion``). Serving: run the model over
every slice of each available series with only that modality present (the other image
zeros, ``presence`` one-hot), take each modality's key slice, then, when both exist, run
once on the pair with ``presence = (1, 1)``. CT and MR are separate examinations in
different positions, so "the same slice" does not exist without registration; the key
slices are what each modality shows most strongly. The stage and risk heads are trained on
SYNTHETIC PROXIES (:func:`stage_proxy`, :func:`risk_proxy`): the phantoms have no stage and
no survival. They are research outputs on synthetic proxies and are not validated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np
from numpy.typing import NDArray

from dicomnode.imaging import PreprocessSpec, apply_spec
from dicomnode.pipelines.brain_rules import (
    FusionResult,
    SeriesResult,
    fusion_series_result,
    series_result,
    tumour_score,
)
from dicomnode.pipelines.brain_rules import sigmoid as _sigmoid
from dicomnode.pipelines.brain_rules import softmax as _softmax
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
    import torch
    from pydicom.dataset import Dataset
    from torch import Tensor, nn

    from dicomnode.inference.package import Metric, ModelPackage, OperatingPoint
    from dicomnode.training.datasets import DatasetSplits, Sample
    from dicomnode.training.evaluate import EvaluationReport
    from dicomnode.training.loop import TrainConfig

__all__ = [
    "CAM_TOLERANCE_PX",
    "CLASSES",
    "CT_CLASSES",
    "HEATMAP_METRIC",
    "MIN_LESION_PIXELS",
    "SLICE_SAMPLING",
    "STAGES",
    "BrainCase",
    "BrainSliceReader",
    "FusionResult",
    "SeriesCalibration",
    "SeriesResult",
    "SeriesTensors",
    "SliceSampling",
    "cam_peak_hit",
    "case_labels",
    "concordance_index",
    "ct_model",
    "ct_spec",
    "export_fusion_checkpoint",
    "fit_multiclass_calibration",
    "fit_series_calibration",
    "fold_calibration",
    "fusion_model",
    "fusion_series_result",
    "keep_resolution",
    "make_brain_case",
    "mr_model",
    "mr_spec",
    "prepare_series",
    "risk_proxy",
    "series_result",
    "slice_masks",
    "stage_proxy",
    "tumour_score",
]

CLASSES = ("healthy", "benign", "malignant")
CT_CLASSES = ("no-tumour", "tumour")
STAGES = ("I-proxy", "II-proxy", "III-proxy", "IV-proxy")
#: Tumour equivalent diameter (cm) bounds of the stage proxy bins.
STAGE_DIAMETER_CM = (2.0, 3.0, 4.0)
#: A slice is a tumour slice for training when the lesion covers this many model pixels;
#: slivers smaller than that are left out of training (neither label is right for them).
MIN_LESION_PIXELS = 10
#: A CAM peak counts as a hit within this many model pixels of the tumour mask
#: (3 px = 5-6 mm at 128 px over a 200-250 mm field of view).
CAM_TOLERANCE_PX = 3
SERIES_STREAM = "dicomnode-brain-tumour-task-v1"
FUSION_CHECKPOINT_FORMAT = "dicomnode-fusion-checkpoint/1"
PHANTOM_SOURCE = "dicomnode.phantoms.brain_mr (T1 post-contrast MR, contrast head CT)"
Modality = Literal["CT", "MR"]
FloatArray = NDArray[np.float64]


# --- preprocessing specs ----------------------------------------------------------------


def ct_spec(options: TaskOptions) -> PreprocessSpec:
    """HU, a soft-tissue window, area resize, per-image z-score.

    The window is 80 / 200 HU (the "subdural" preset) rather than 40 / 80: enhancing
    tumour sits 25-55 HU above brain and would saturate with bone in the narrow brain
    window, hiding a meningioma against the inner table of the skull.
    """
    size = options.size
    return PreprocessSpec.from_dict([
        {"name": "hounsfield"},
        {"name": "window", "center": 80.0, "width": 200.0},
        {"name": "resize", "size": [size, size], "interpolation": "area"},
        {"name": "zscore"},
    ])


def mr_spec(options: TaskOptions) -> PreprocessSpec:
    """Modality values, a per-image 1-99 % stretch, area resize, per-image z-score.

    MR intensities have no unit (scanner gain differs ten-fold between the phantoms'
    scans, as between real ones), so each image is stretched by its own percentiles.
    """
    size = options.size
    return PreprocessSpec.from_dict([
        {"name": "modality_lut"},
        {"name": "robust_minmax", "low_percentile": 1.0, "high_percentile": 99.0},
        {"name": "resize", "size": [size, size], "interpolation": "area"},
        {"name": "zscore"},
    ])


# --- synthetic proxies for the fusion heads ----------------------------------------------


def stage_proxy(volume_cm3: float) -> int:
    """Stage index 0..3 from the tumour's equivalent diameter: < 2, 2-3, 3-4, >= 4 cm.

    A SYNTHETIC proxy: brain tumours are graded (WHO), not staged, and the phantoms carry
    no stage; size bins are the only staging-like quantity they define.
    """
    diameter = (6.0 * max(volume_cm3, 0.0) / math.pi) ** (1.0 / 3.0)
    return int(sum(diameter >= bound for bound in STAGE_DIAMETER_CM))


def risk_proxy(label: str, volume_cm3: float) -> float:
    """A SYNTHETIC log relative hazard: 0 healthy; benign 0.5 + 0.25 ln(1 + V);
    malignant 2 + 0.5 ln(1 + V) (V in cm^3). Not fitted to any survival data."""
    if label == "healthy":
        return 0.0
    if label == "benign":
        return 0.5 + 0.25 * math.log1p(volume_cm3)
    return 2.0 + 0.5 * math.log1p(volume_cm3)


# --- phantom cases ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BrainCase:
    """One synthetic patient: sorted DICOM series and tumour masks in the same slice order.

    Masks are True on tumour voxels (necrosis + enhancing or solid tumour, not oedema).
    """

    patient_id: str
    label: str
    volume_cm3: float
    ct: tuple[Dataset, ...] | None
    ct_mask: NDArray[np.bool_] | None
    mr: tuple[Dataset, ...] | None
    mr_mask: NDArray[np.bool_] | None

    def series(self, modality: Modality) -> tuple[tuple[Dataset, ...], NDArray[np.bool_]]:
        datasets, mask = (self.ct, self.ct_mask) if modality == "CT" else (self.mr, self.mr_mask)
        if datasets is None or mask is None:
            raise TrainingRunError(f"case {self.patient_id} has no {modality} series")
        return datasets, mask


def case_labels(seed: int, n: int) -> list[str]:
    """Balanced healthy / benign / malignant labels of the set (seed, n), shuffled."""
    from dicomnode.phantoms.common import balanced_labels, item_rng

    return balanced_labels(item_rng(SERIES_STREAM, seed, 0, "labels", n), n, CLASSES)


def _sorted_series(
    built: Sequence[tuple[str, Dataset]], mask: NDArray[np.uint8]
) -> tuple[tuple[Dataset, ...], NDArray[np.bool_]]:
    """Datasets in the order serving sorts them, with the mask rows in the same order."""
    from dicomnode.imaging import sort_datasets
    from dicomnode.phantoms.brain_mr import MASK_NECROSIS, MASK_TUMOUR

    datasets = sort_datasets([ds for _, ds in built])
    order = [int(ds.InstanceNumber) - 1 for ds in datasets]
    tumour = (mask == MASK_TUMOUR) | (mask == MASK_NECROSIS)
    return tuple(datasets), np.ascontiguousarray(tumour[order])


def make_brain_case(
    seed: int,
    index: int,
    label: str,
    *,
    matrix: int = 128,
    modalities: Sequence[Modality] = ("CT", "MR"),
) -> BrainCase:
    """Phantom ``index`` of set ``seed``: a contrast head CT and a T1 post-contrast MR of
    the same synthetic patient (same tumour), built as DICOM in memory.

    Every draw comes from streams keyed by (seed, index, role), so a case is the same
    whatever else is generated; a placement the generator cannot realise is redrawn
    from the next stream, deterministically.
    """
    from dicomnode.phantoms import brain_mr as bmr
    from dicomnode.phantoms.common import (
        SeriesContext,
        StudyContext,
        item_rng,
        make_identity,
        phantom_uid,
        study_datetime,
    )
    from dicomnode.phantoms.head_ct import CtStorage, build_ct_slices

    meta = item_rng(SERIES_STREAM, seed, index, "meta")
    identity = make_identity(bmr.CODE, seed, index, meta)
    date, clock = study_datetime(meta)
    field_strength = float(meta.choice([1.5, 3.0]))
    storage = CtStorage(int(meta.integers(0, 2)))
    last: Exception | None = None
    for attempt in range(5):
        try:
            patient = bmr.make_brain_patient(
                rng=item_rng(SERIES_STREAM, seed, index, "patient", attempt), tumour_kind=label)
            ct = ct_mask = mr = mr_mask = None
            for modality in modalities:
                uid_parts = (SERIES_STREAM, seed, index, modality)
                study = StudyContext(identity, phantom_uid(*uid_parts, "study"), date, clock,
                                     f"PHBT{seed % 1000:03d}{index:05d}{modality[0]}",
                                     str(index + 1), f"{modality} HEAD WITH CONTRAST")
                series = SeriesContext(phantom_uid(*uid_parts, "series"), modality, 1,
                                       "T1 post contrast" if modality == "MR" else "Head CT",
                                       "BRAIN" if modality == "MR" else "HEAD",
                                       f"phantom-brain-{modality.lower()}",
                                       phantom_uid(*uid_parts, "frame"))
                rng = item_rng(SERIES_STREAM, seed, index, modality, attempt)
                if modality == "MR":
                    volume, geometry, truth = bmr.make_mr_volume(
                        rng, patient=patient, matrix=matrix, sequence="T1C")
                    mr, mr_mask = _sorted_series(bmr.build_mr_slices(
                        volume, geometry, bmr.SEQUENCES["T1C"], study, series,
                        uid_parts=uid_parts, field_strength=field_strength), truth.tumour_mask)
                else:
                    hu, geometry, truth = bmr.make_ct_volume_for_patient(
                        rng, patient=patient, matrix=matrix)
                    ct, ct_mask = _sorted_series(build_ct_slices(
                        hu, geometry, study, series, storage, uid_parts=uid_parts,
                        contrast=True, kvp=120.0), truth.tumour_mask)
            return BrainCase(identity.patient_id, label, patient.default_volume_cm3, ct, ct_mask,
                             mr, mr_mask)
        except (ValueError, RuntimeError) as exc:  # tumour could not be placed in the scan
            last = exc
    raise TrainingRunError(f"phantom {seed}:{index} could not be generated: {last}")


# --- tensors of a series ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SeriesTensors:
    """Every slice of a series through the spec (S, 1, H, W) and the tumour mask (S, H, W)
    moved through the spec's geometry (nearest neighbour)."""

    images: NDArray[np.float32]
    tumour: NDArray[np.bool_]

    @property
    def area(self) -> NDArray[np.int64]:
        """Tumour pixels per slice at model resolution."""
        area: NDArray[np.int64] = self.tumour.sum(axis=(1, 2)).astype(np.int64)
        return area

    def take(self, indices: Sequence[int] | NDArray[np.int64]) -> SeriesTensors:
        index = np.asarray(indices, dtype=np.int64)
        return SeriesTensors(self.images[index], self.tumour[index])


def prepare_series(
    datasets: Sequence[Dataset], mask: NDArray[np.bool_], spec: PreprocessSpec
) -> SeriesTensors:
    """The serving input of a sorted series, and its mask on the same pixel grid."""
    from dicomnode.training.datasets import geometric_spec

    images = apply_spec(spec, list(datasets))
    moved = apply_spec(geometric_spec(spec), mask.astype(np.float32))
    return SeriesTensors(images, moved[:, 0] > 0.5)


# --- the serving rule -------------------------------------------------------------------


def cam_peak_hit(cam: NDArray[Any], tumour: NDArray[np.bool_],
                 tolerance_px: int = CAM_TOLERANCE_PX) -> bool:
    """Whether the CAM's maximum lies in the tumour mask dilated by ``tolerance_px``.

    An all-zero map (no positive evidence) has no peak and is a miss.
    """
    import cv2

    values = np.asarray(cam, dtype=np.float64)
    if not values.size or float(values.max()) <= 0.0:
        return False
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    size = 2 * tolerance_px + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    grown = cv2.dilate(tumour.astype(np.uint8), kernel) if tolerance_px > 0 else tumour
    return bool(grown[row, col])


# --- phantom data sets ------------------------------------------------------------------


@dataclass(eq=False)
class PatientData:
    """One phantom patient's tensors: every slice (validation) or the training sample.

    ``sampled[modality]`` indexes the slices the training rule picks
    (:func:`sample_slices`); in a training set the series holds only those.
    """

    patient_id: str
    label: int
    volume_cm3: float
    series: dict[str, SeriesTensors]
    sampled: dict[str, NDArray[np.int64]]

    @property
    def label_name(self) -> str:
        return CLASSES[self.label]


@dataclass(frozen=True)
class SliceSampling:
    """How many slices a patient contributes to training, and how negatives are drawn.

    ``spread`` draws one negative from each of ``count`` equal runs of the series'
    tumour-free slices (stratified over z) instead of ``count`` anywhere: the key-slice
    rule looks at *every* slice, so the vertex (falx and superior sagittal sinus enhance
    on T1C) and the skull base must be among the negatives the model learns from, not
    left to chance.
    """

    max_positive: int = 6
    n_negative: int = 4
    spread: bool = False

    def describe(self) -> dict[str, Any]:
        return {"min_lesion_pixels": MIN_LESION_PIXELS, "max_positive": self.max_positive,
                "negatives": (f"{self.n_negative} (tumour patients) or "
                              f"{self.n_negative + self.max_positive // 2} (healthy)"),
                "negatives_drawn": ("one per equal run of tumour-free slices (z-stratified)"
                                    if self.spread else "uniformly at random")}


#: The CT recipe is the one the bundled brain-tumour-ct was built with; MR spreads more
#: negatives over z because its healthy series' false key slices were vertex slices.
SLICE_SAMPLING: dict[str, SliceSampling] = {
    "CT": SliceSampling(),
    "MR": SliceSampling(n_negative=6, spread=True),
}


def sample_slices(area: NDArray[np.int64], rng: np.random.Generator, *, tumour_patient: bool,
                  max_positive: int = 6, n_negative: int = 4, spread: bool = False
                  ) -> NDArray[np.int64]:
    """The slices one patient contributes to training, sorted.

    Up to ``max_positive`` slices whose tumour covers at least :data:`MIN_LESION_PIXELS`
    and ``n_negative`` slices with no tumour at all (more for a healthy patient, so the
    classes stay roughly balanced); slices with a tumour sliver are left out because
    neither label describes them. ``spread``: see :class:`SliceSampling`.
    """
    positive = np.flatnonzero(area >= MIN_LESION_PIXELS)
    negative = np.flatnonzero(area == 0)
    count = n_negative if tumour_patient else n_negative + max_positive // 2
    chosen_positive = rng.choice(positive, min(max_positive, positive.size), replace=False)
    if spread and negative.size > count:
        runs = np.array_split(negative, count)
        chosen_negative = np.array([run[int(rng.integers(run.size))] for run in runs])
    else:
        chosen_negative = rng.choice(negative, min(count, negative.size), replace=False)
    chosen = [chosen_positive, chosen_negative]
    return np.sort(np.concatenate(chosen).astype(np.int64))


def _sample(area: NDArray[np.int64], rng: np.random.Generator, modality: str, *,
            tumour_patient: bool) -> NDArray[np.int64]:
    recipe = SLICE_SAMPLING[modality]
    return sample_slices(area, rng, tumour_patient=tumour_patient,
                         max_positive=recipe.max_positive, n_negative=recipe.n_negative,
                         spread=recipe.spread)


def build_patients(
    seed: int,
    n: int,
    specs: Mapping[Modality, PreprocessSpec],
    *,
    matrix: int,
    keep: Literal["sample", "all"],
    stream: TextIO | None = None,
    what: str = "",
) -> list[PatientData]:
    """Phantom set (seed, n) through the specs: the training sample of each series
    (``keep="sample"``) or every slice, stored as float16 (``keep="all"``)."""
    from dicomnode.phantoms.common import item_rng

    labels = case_labels(seed, n)
    patients: list[PatientData] = []
    started = time.perf_counter()
    for index, label in enumerate(labels):
        case = make_brain_case(seed, index, label, matrix=matrix, modalities=tuple(specs))
        series: dict[str, SeriesTensors] = {}
        sampled: dict[str, NDArray[np.int64]] = {}
        for modality, spec in specs.items():
            datasets, mask = case.series(modality)
            tensors = prepare_series(datasets, mask, spec)
            rng = item_rng(SERIES_STREAM, seed, index, "slices", modality)
            chosen = _sample(tensors.area, rng, modality, tumour_patient=label != "healthy")
            if keep == "sample":
                series[modality] = tensors.take(chosen)
                sampled[modality] = np.arange(chosen.size, dtype=np.int64)
            else:
                series[modality] = SeriesTensors(tensors.images.astype(np.float16),
                                                 tensors.tumour)
                sampled[modality] = chosen
        patients.append(PatientData(case.patient_id, CLASSES.index(label), case.volume_cm3,
                                    series, sampled))
        if stream is not None and ((index + 1) % 25 == 0 or index + 1 == n):
            stream.write(f"phantoms {what} seed {seed}: {index + 1}/{n} "
                         f"({time.perf_counter() - started:.0f} s)\n")
            stream.flush()
    return patients


def slice_arrays(
    patients: Sequence[PatientData], modality: Modality, *, binary: bool
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """The sampled slices of ``modality`` stacked (N, 1, H, W), their labels, and the
    index of the patient each came from.

    A slice's label is its patient's class where it shows tumour, else healthy (0);
    ``binary`` gives tumour (1) / no tumour (0) instead.
    """
    images: list[NDArray[Any]] = []
    labels: list[NDArray[np.int64]] = []
    owners: list[NDArray[np.int64]] = []
    for number, patient in enumerate(patients):
        tensors = patient.series[modality].take(patient.sampled[modality])
        tumour = tensors.area >= MIN_LESION_PIXELS
        value = 1 if binary else patient.label
        labels.append(np.where(tumour, value, 0).astype(np.int64))
        images.append(tensors.images)
        owners.append(np.full(tumour.size, number, dtype=np.int64))
    return (np.concatenate(images).astype(np.float32), np.concatenate(labels),
            np.concatenate(owners))


def slice_masks(patients: Sequence[PatientData], modality: Modality) -> NDArray[np.uint8]:
    """Tumour masks (N, H, W) of the slices :func:`slice_arrays` stacks, in its order:
    the mask where the slice is a tumour slice for training (at least
    :data:`MIN_LESION_PIXELS`), zeros elsewhere (healthy-labelled slices, which the
    localisation loss leaves out)."""
    masks: list[NDArray[np.uint8]] = []
    for patient in patients:
        tensors = patient.series[modality].take(patient.sampled[modality])
        tumour = (tensors.area >= MIN_LESION_PIXELS)[:, None, None]
        masks.append((tensors.tumour & tumour).astype(np.uint8))
    return np.concatenate(masks)


# --- models -----------------------------------------------------------------------------


def keep_resolution(backbone: nn.Module) -> None:
    """Give the first blocks of ``layer2``, ``layer3`` and ``layer4`` stride 1: feature
    maps at 1/4 of the input instead of 1/32, so the Grad-CAM can point at a
    centimetre-sized lesion.

    The weights keep their shapes (a strided 3x3 or 1x1 convolution has the same kernel
    as an unstrided one), so the network is still a torchvision-layout ResNet.
    """
    from torch import nn as tnn

    from dicomnode.training.architectures import BasicBlock, Bottleneck

    for name in ("layer2", "layer3", "layer4"):
        stage = getattr(backbone, name)
        block = stage[0]
        if isinstance(block, BasicBlock):
            block.conv1.stride = (1, 1)
        elif isinstance(block, Bottleneck):
            block.conv2.stride = (1, 1)
        else:
            raise TrainingRunError(f"{name} does not start with a ResNet block")
        if block.downsample is not None:
            first = block.downsample[0]
            assert isinstance(first, tnn.Conv2d)
            first.stride = (1, 1)


def _resnet_depth(options: TaskOptions) -> Literal[10, 18, 34, 50, 101]:
    depths: dict[int, Literal[10, 18, 34, 50, 101]] = {10: 10, 18: 18, 34: 34, 50: 50, 101: 101}
    if options.depth not in depths:
        raise TrainingRunError(f"--depth must be one of {sorted(depths)}; got {options.depth}")
    return depths[options.depth]


def _slice_model(outputs: int, options: TaskOptions) -> nn.Module:
    from dicomnode.training.architectures import small_slice_classifier

    model = small_slice_classifier(outputs, depth=_resnet_depth(options), width=options.width,
                                   head="mlp", hidden=max(16, 4 * options.width))
    keep_resolution(model.backbone)
    return model


def ct_model(options: TaskOptions) -> nn.Module:
    """One tumour logit per slice; ResNet-10 (width 8: ~80 k parameters) at 1/4 stride."""
    return _slice_model(1, options)


def mr_model(options: TaskOptions) -> nn.Module:
    """Healthy / benign / malignant logits per slice, same trunk as :func:`ct_model`."""
    return _slice_model(3, options)


def fusion_model(options: TaskOptions) -> nn.Module:
    """Seed 003's dual encoder at CPU size (``FusionConfig.small()``), 1/4-stride encoders.

    Modality dropout is off: training shows each modality alone explicitly, with labels
    that describe that slice, instead of hiding a present modality behind a label that
    may have come from it.
    """
    from dicomnode.training.architectures import DualEncoderFusion, FusionConfig

    config = dataclasses.replace(FusionConfig.small(), depth=_resnet_depth(options),
                                 width=options.width, modality_dropout=0.0)
    model = DualEncoderFusion(config)
    keep_resolution(model.ct_encoder)
    keep_resolution(model.mr_encoder)
    return model


def slice_train_config(options: TaskOptions) -> TrainConfig:
    """Balanced class weights, a named augmentation preset, clipping, early stopping on
    validation (slice-level) AUC; the same recipe as the other slice tasks."""
    from dicomnode.training.augment import PRESETS
    from dicomnode.training.loop import TrainConfig

    if options.augment not in PRESETS:
        raise TrainingRunError(f"--augment must be one of {sorted(PRESETS)}")
    return TrainConfig(epochs=options.epochs, batch_size=options.batch_size,
                       learning_rate=options.learning_rate,
                       augmentation=PRESETS[options.augment], patience=options.patience,
                       seed=options.seed, progress=options.progress, device=options.device,
                       localisation_weight=options.loc_weight)


def decaying_train_config(options: TaskOptions) -> TrainConfig:
    """:func:`slice_train_config` followed by two shorter stages at 1/3 and 1/10 of the
    learning rate, each starting from the best weights so far.

    The three-class MR model's validation loss swings by a factor of three between epochs
    at a constant rate while its training loss is still falling: the best epoch is then
    luck. Lower rates settle it (a step schedule expressed as the loop's stages).
    """
    from dicomnode.training.loop import decay_stages

    base = slice_train_config(options)
    return dataclasses.replace(base, stages=decay_stages(options.learning_rate,
                                                          options.epochs))


def _with_cam(model: nn.Module) -> nn.Module:
    from dicomnode.training.architectures import GapClassifier
    from dicomnode.training.gradcam import WithCam

    if not isinstance(model, GapClassifier):
        raise TrainingRunError("the CAM export needs a GapClassifier")
    return WithCam(model, "all")


def _last_linear(head: nn.Module) -> nn.Linear:
    from torch import nn as tnn

    layers = list(head) if isinstance(head, tnn.Sequential) else [head]
    while layers and isinstance(layers[-1], tnn.Dropout | tnn.Identity):
        layers.pop()
    last = layers[-1] if layers else None
    if not isinstance(last, tnn.Linear):
        raise TrainingRunError("the class head does not end in a Linear layer")
    return last


# --- calibration on patients ------------------------------------------------------------


@dataclass(frozen=True)
class SeriesCalibration:
    """``logits' = scale * logits + shift`` (shift per class), fitted on validation series
    through the key-slice rule and folded into the class head's last Linear layer."""

    method: str
    scale: float
    shift: tuple[float, ...]
    n: int
    nll_before: float
    nll_after: float
    #: Vector scaling: one more positive factor per class (``scale`` is then 1).
    class_scales: tuple[float, ...] | None = None
    #: How the family was chosen (multi-class: cross-validated on the same patients).
    selection: Mapping[str, Any] | None = None

    @property
    def factors(self) -> FloatArray:
        """The per-class multipliers of the logits: ``scale`` times ``class_scales``."""
        k = len(self.shift)
        extra = np.ones(k) if self.class_scales is None else np.asarray(self.class_scales)
        out: FloatArray = self.scale * extra.astype(np.float64)
        return out

    def apply(self, logits: NDArray[Any]) -> FloatArray:
        out: FloatArray = (np.asarray(logits, dtype=np.float64) * self.factors
                           + np.asarray(self.shift, dtype=np.float64))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale": self.scale, "temperature": 1.0 / self.scale,
                "shift": list(self.shift), "fitted_on_patients": self.n,
                **({"class_scales": list(self.class_scales)} if self.class_scales else {}),
                **({"selection": dict(self.selection)} if self.selection else {}),
                "nll_before": self.nll_before, "nll_after": self.nll_after,
                "folded_into": "the class head's last Linear layer (exported logits are "
                               "calibrated)"}


def _smoothed(y: NDArray[np.int64], k: int) -> FloatArray:
    """Platt's smoothed targets, per class: (N_c + 1) / (N_c + 2) on the true class, so a
    perfectly separated validation set gives a confident but finite scale."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    high = (counts[y] + 1.0) / (counts[y] + 2.0)
    out = np.repeat(((1.0 - high) / (k - 1))[:, None], k, axis=1)
    out[np.arange(y.size), y] = high
    return out


def _nll(logits: FloatArray, targets: FloatArray) -> float:
    """Cross-entropy of (N, K) logits (K = 1: a sigmoid logit) against soft targets."""
    if logits.shape[1] == 1:
        z = logits[:, 0]
        t = targets[:, 1]
        return float(np.mean(t * np.logaddexp(0.0, -z) + (1.0 - t) * np.logaddexp(0.0, z)))
    log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return float(-np.mean((targets * log_p).sum(axis=1)))


def _golden(f: Callable[[float], float], low: float, high: float, steps: int = 40) -> float:
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2.0


#: Multi-class calibration families, both affine in the logits and foldable into the head:
#: one temperature with K - 1 offsets, or a factor and an offset per class (vector scaling,
#: Guo et al. 2017; the last class's offset is 0 as softmax ignores a common shift).
MULTICLASS_FAMILIES = ("temperature + offsets", "vector scaling")
CALIBRATION_FOLDS = 5

RowsAt = Callable[[FloatArray, FloatArray], FloatArray]
#: Factors stay within 1e-3 ... 1e3 (as the one-logit calibration's scale does).
_LOG_FACTOR_BOUND = (math.log(1e-3), math.log(1e3))


def _row_nll(rows: FloatArray, y: NDArray[np.int64]) -> FloatArray:
    log_p = rows - np.logaddexp.reduce(rows, axis=1, keepdims=True)
    out: FloatArray = -log_p[np.arange(y.size), y]
    return out


def _hard_nll(rows: FloatArray, y: NDArray[np.int64]) -> float:
    return float(np.mean(_row_nll(rows, y)))


def _row_brier(rows: FloatArray, y: NDArray[np.int64]) -> FloatArray:
    """Multi-class Brier score of each row: squared distance of the softmax from one-hot."""
    p = _softmax(rows)
    p[np.arange(y.size), y] -= 1.0
    out: FloatArray = (p * p).sum(axis=1)
    return out


def _fit_family(rows_at: RowsAt, y: NDArray[np.int64], k: int, family: str,
                index: NDArray[np.int64], *, sweeps: int = 12) -> tuple[FloatArray, FloatArray,
                                                                         float]:
    """Coordinate descent (golden-section per parameter, from the identity map) on the
    mean Brier score of the series ``index``; never raises it. Returns factors, shift and
    that score."""
    n_scale = k if family == "vector scaling" else 1

    def unpack(params: FloatArray) -> tuple[FloatArray, FloatArray]:
        factors: FloatArray = np.exp(params[:n_scale]) * np.ones(k)
        return factors, np.append(params[n_scale:], 0.0)

    def loss(params: FloatArray) -> float:
        return float(np.mean(_row_brier(rows_at(*unpack(params))[index], y[index])))

    params = np.zeros(n_scale + k - 1)
    current = loss(params)
    for _ in range(sweeps):
        start = current
        for i in range(params.size):
            low, high = ((max(params[i] - 2.0, _LOG_FACTOR_BOUND[0]),
                          min(params[i] + 2.0, _LOG_FACTOR_BOUND[1])) if i < n_scale else
                         (params[i] - 10.0, params[i] + 10.0))

            def along(value: float, i: int = i) -> float:
                trial = params.copy()
                trial[i] = value
                return loss(trial)

            value = _golden(along, low, high, steps=30)
            if (found := along(value)) < current:
                params[i], current = value, found
        if start - current < 1e-7:
            break
    factors, shift = unpack(params)
    return factors, shift, current


def fit_multiclass_calibration(rows_at: RowsAt, labels: NDArray[np.int64], k: int, *,
                               folds: int = CALIBRATION_FOLDS, seed: int = 0,
                               groups: NDArray[np.int64] | None = None) -> SeriesCalibration:
    """Calibrate K-class series logits through the serving rule, choosing the family by
    cross-validation on the same patients.

    ``rows_at(factors, shift)`` gives every calibration series' output row after each
    slice's logits became ``factors * z + shift`` and the serving rule chose its key
    slice (offsets move tumour scores, so the key slice can change). Each family in
    :data:`MULTICLASS_FAMILIES` is fitted by the Brier score, the one with the lower
    ``folds``-fold cross-validated Brier score wins (vector scaling only where it gains
    more than the standard error of the per-patient difference: with little data the
    simpler map) and is refitted on all patients. The choice and both families'
    cross-validated numbers go into the card. ``groups`` (one per row) keeps rows of one
    patient in one fold.

    Why the Brier score: both are proper, but cross-entropy lets a few confidently wrong
    series (benign MR tumours called healthy) hold the scale down for everyone. On the MR
    model's 300 calibration patients, fitted by cross-entropy, the maps' cross-validated
    top-label ECE was 0.038 (temperature + offsets) and 0.040 (vector scaling), by the
    Brier score 0.027 and 0.027 (means over three fold splits), and the cross-entropy map
    left the held-out test patients under-confident (0.87 predicted, 0.98 right). With
    Platt's smoothed targets (the one-logit models' fit) it was 0.052 in-sample.
    """
    y = np.asarray(labels, dtype=np.int64)
    if np.unique(y).size < k:
        raise TrainingRunError("calibration needs patients of every class")
    group = np.arange(y.size) if groups is None else np.asarray(groups, dtype=np.int64)
    names, member = np.unique(group, return_inverse=True)
    fold_of = (np.random.default_rng(seed).permutation(names.size) % folds)[member]
    everyone = np.arange(y.size)
    losses: dict[str, FloatArray] = {}
    for family in MULTICLASS_FAMILIES:
        held_out = np.zeros(y.size)
        for fold in range(folds):
            fit_on, check = everyone[fold_of != fold], everyone[fold_of == fold]
            factors, shift, _ = _fit_family(rows_at, y, k, family, fit_on)
            held_out[check] = _row_brier(rows_at(factors, shift)[check], y[check])
        losses[family] = held_out
    simple, rich = MULTICLASS_FAMILIES
    gain = losses[simple] - losses[rich]
    standard_error = float(gain.std(ddof=1) / math.sqrt(gain.size)) if gain.size > 1 else 0.0
    # The richer family must beat the simpler one by more than its standard error.
    chosen = rich if float(gain.mean()) > standard_error else simple
    scores = {family: float(v.mean()) for family, v in losses.items()}
    factors, shift, _ = _fit_family(rows_at, y, k, chosen, everyone)
    before = _hard_nll(rows_at(np.ones(k), np.zeros(k)), y)
    after = _hard_nll(rows_at(factors, shift), y)
    if chosen == "vector scaling":
        scale, class_scales = 1.0, tuple(float(v) for v in factors)
    else:
        scale, class_scales = float(factors[0]), None
    return SeriesCalibration(
        chosen, scale, tuple(float(v) for v in shift), int(y.size), before, after,
        class_scales=class_scales,
        selection={"families": list(MULTICLASS_FAMILIES), "folds": folds,
                   "cross_validated_brier": scores,
                   "standard_error_of_the_difference": standard_error, "chosen": chosen,
                   "rule": (f"{rich} only where its cross-validated Brier score is lower "
                            f"than {simple}'s by more than the standard error of the "
                            "per-patient difference"),
                   "objective": "multi-class Brier score (nll_before / nll_after: the "
                                "cross-entropy, for the record)"})


def series_rows_at(series_logits: Sequence[NDArray[Any]]) -> RowsAt:
    """``rows_at`` for single-series models: the key-slice rule on each series' slice
    logits (S, K) after the affine map (vectorised: the fit calls it thousands of times).
    Ties go to the lowest slice index, as :func:`series_result`'s argmax does."""
    logits = [np.asarray(s, dtype=np.float64) for s in series_logits]
    stacked = np.concatenate(logits)
    owner = np.repeat(np.arange(len(logits)), [s.shape[0] for s in logits])
    position = np.arange(stacked.shape[0])
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(owner)) + 1])

    def rows_at(factors: FloatArray, shift: FloatArray) -> FloatArray:
        mapped = stacked * factors + shift
        order = np.lexsort((position, -tumour_score(mapped), owner))
        rows: FloatArray = mapped[order[firsts]]
        return rows

    return rows_at


def fit_series_calibration(series_logits: Sequence[NDArray[Any]], labels: NDArray[np.int64]
                           ) -> SeriesCalibration:
    """Platt scaling of one-logit series models through the key-slice rule: the scale and
    offset minimising the NLL (against Platt's smoothed targets) of each validation
    series' key-slice logit, the key slice re-chosen at every scale. Three-class models
    use :func:`fit_multiclass_calibration`."""
    logits = [np.asarray(s, dtype=np.float64) for s in series_logits]
    if logits[0].shape[1] != 1:
        raise TrainingRunError("fit_series_calibration is for one-logit models; three-class "
                               "models use fit_multiclass_calibration")
    y = np.asarray(labels, dtype=np.int64)
    if np.unique(y).size < 2:
        raise TrainingRunError("calibration needs validation patients of every class")
    targets = _smoothed(y, 2)
    series_rows = series_rows_at(logits)

    def rows_at(scale: float) -> FloatArray:
        return series_rows(np.array([scale]), np.zeros(1))

    def best_offset(scale: float) -> tuple[float, float]:
        rows = rows_at(scale)

        def loss(offset: float) -> float:
            return _nll(rows + offset, targets)

        offset = _golden(loss, -30.0, 30.0)
        return offset, loss(offset)

    log_scale = _golden(lambda v: best_offset(math.exp(v))[1], math.log(1e-3), math.log(1e3),
                        steps=60)
    scale = math.exp(log_scale)
    offset, after = best_offset(scale)
    before = _nll(rows_at(1.0), targets)
    return SeriesCalibration("platt", scale, (offset,), int(y.size), before, after)


def fold_calibration(linear: nn.Linear, calibration: SeriesCalibration) -> None:
    """``W <- scale * W``, ``b <- scale * b + shift``: the exported logits are calibrated;
    the normalised CAM (divided by its own maximum) is unchanged by a positive scale."""
    import torch

    factors = calibration.factors
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise TrainingRunError(f"cannot fold calibration scale {factors.tolist()}")
    if linear.bias is None or linear.out_features != len(calibration.shift):
        raise TrainingRunError("the class head's last Linear layer does not fit the calibration")
    with torch.no_grad():
        by = torch.tensor(factors, dtype=linear.weight.dtype)
        linear.weight.mul_(by[:, None])
        linear.bias.mul_(by).add_(torch.tensor(calibration.shift, dtype=linear.bias.dtype))


# --- torch helpers ----------------------------------------------------------------------


def _logits(model: nn.Module, images: NDArray[Any], batch_size: int = 64) -> FloatArray:
    """Raw class logits (N, K) of a slice model in eval mode."""
    import torch

    model.eval()
    chunks: list[FloatArray] = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(
                images[start:start + batch_size], dtype=np.float32))
            chunks.append(model(batch).double().numpy())
    return np.concatenate(chunks)


def _stream(options: TaskOptions) -> TextIO | None:
    return sys.stderr if options.progress else None


def _note(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        stream.write(text + "\n")
        stream.flush()


def _set_threads(options: TaskOptions) -> None:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(temporary, path)


def _sizes(options: TaskOptions) -> tuple[int, int, int, int]:
    """(n_train, n_val, n_test, phantom matrix) with this task family's defaults."""
    assert options.n_val is not None and options.n_test is not None
    matrix = options.phantom_size if options.phantom_size is not None else 128
    return options.n_train, options.n_val, options.n_test, matrix


def _calibration_seed(options: TaskOptions) -> int:
    """The calibration patients' phantom seed (default seed + 2), unlike every other part's."""
    seed = options.calibration_seed if options.calibration_seed is not None else options.seed + 2
    if seed in _seeds(options):
        raise TrainingRunError("calibration phantoms need a seed of their own")
    return seed


def _seeds(options: TaskOptions) -> tuple[int, int, int]:
    assert options.val_seed is not None and options.test_seed is not None
    seeds = (options.seed, options.val_seed, options.test_seed)
    if len(set(seeds)) != 3:
        raise TrainingRunError("train, validation and test phantoms need three different seeds")
    return seeds


# --- served evaluation ------------------------------------------------------------------


@dataclass(frozen=True)
class ServedCase:
    """One test patient as the served package saw it."""

    patient_id: str
    label: int
    volume_cm3: float
    logits: tuple[float, ...]
    key_slice: int
    key_has_tumour: bool
    cam_hit: bool | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"patient_id": self.patient_id, "label": CLASSES[self.label],
                "volume_cm3": round(self.volume_cm3, 3), "logits": list(self.logits),
                "key_slice": self.key_slice, "key_slice_has_tumour": self.key_has_tumour,
                "cam_peak_in_lesion": self.cam_hit, **dict(self.extra)}


def _package_spec(package: ModelPackage, steps: Sequence[Mapping[str, Any]] | None = None,
                  fingerprint: object = None) -> PreprocessSpec:
    card = package.card
    spec = PreprocessSpec.from_dict(list(steps if steps is not None else card.preprocessing))
    recorded = fingerprint if steps is not None else card.provenance.get(
        "preprocessing_fingerprint")
    if isinstance(recorded, str):
        spec.require_fingerprint(recorded)
    return spec


def _session(package: ModelPackage, options: TaskOptions) -> Any:
    from dicomnode.inference.runtime import RuntimeSettings, open_session

    return open_session(package, RuntimeSettings(
        providers=("cpu",), max_batch=32, intra_op_threads=options.threads or 0))


def served_slice_cases(package: ModelPackage, options: TaskOptions, modality: Modality,
                       stream: TextIO | None = None) -> list[ServedCase]:
    """The test phantoms through the package as served: DICOM -> card spec -> ONNX
    Runtime on every slice -> key slice -> its probabilities and CAM."""
    _, _, n_test, matrix = _sizes(options)
    _, _, test_seed = _seeds(options)
    spec = _package_spec(package)
    session = _session(package, options)
    cases: list[ServedCase] = []
    started = time.perf_counter()
    for index, label in enumerate(case_labels(test_seed, n_test)):
        case = make_brain_case(test_seed, index, label, matrix=matrix, modalities=(modality,))
        datasets, mask = case.series(modality)
        tensors = prepare_series(datasets, mask, spec)
        out = session.run({"image": tensors.images}).outputs
        result = series_result(out["logits"], out["cam"])
        tumour = tensors.tumour[result.key_slice]
        hit = None if label == "healthy" or result.cam is None else cam_peak_hit(result.cam,
                                                                                tumour)
        cases.append(ServedCase(case.patient_id, CLASSES.index(label), case.volume_cm3,
                                tuple(float(v) for v in result.logits), result.key_slice,
                                bool(tumour.any()), hit))
        if stream is not None and ((index + 1) % 25 == 0 or index + 1 == n_test):
            _note(stream, f"served evaluation seed {test_seed}: {index + 1}/{n_test} "
                          f"({time.perf_counter() - started:.0f} s)")
    return cases


# --- card numbers -----------------------------------------------------------------------

HEATMAP_METRIC = "heatmap_peak_in_lesion"


def heatmap_metric(hits: Sequence[bool], dataset: str, *, where: str = "the key slice",
                   size: int = 128) -> Metric:
    """Share of positive patients whose served CAM peaks on the (dilated) tumour."""
    from dicomnode.inference.package import Metric
    from dicomnode.training.metrics import wilson_interval

    rate = wilson_interval(int(sum(hits)), len(hits))
    if not rate.defined:
        raise TrainingRunError("no positive test patients: the heat-map hit rate is undefined")
    method = (f"peak of the served in-graph Grad-CAM (ONNX Runtime) on {where} inside the "
              f"true tumour mask (necrosis + enhancing/solid tumour) dilated by "
              f"{CAM_TOLERANCE_PX} px at the {size}x{size} model input (~5-6 mm), over "
              f"{len(hits)} positive patients; {rate.method}")
    return Metric(HEATMAP_METRIC, rate.value, rate.lower, rate.upper, rate.level, method,
                  dataset)


def _quiet_evaluate(function: Callable[..., EvaluationReport], *args: Any,
                    **kwargs: Any) -> EvaluationReport:
    import warnings

    from dicomnode.training.evaluate import EvaluationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        return function(*args, **kwargs)


def binary_results(
    val: tuple[NDArray[np.int64], FloatArray],
    test: tuple[NDArray[np.int64], FloatArray],
    *,
    class_names: tuple[str, str],
    output: str,
    options: TaskOptions,
    test_name: str,
    val_name: str,
) -> tuple[EvaluationReport, list[Metric], list[OperatingPoint]]:
    """Thresholds chosen on validation patients, measured with CIs on test patients."""
    from dicomnode.training.evaluate import choose_thresholds, evaluate_binary

    chosen = choose_thresholds(val[0], val[1], sensitivity_target=options.sensitivity_target)
    report = _quiet_evaluate(
        evaluate_binary, test[0], test[1], class_names=class_names, dataset=test_name,
        thresholds={k: c.threshold for k, c in chosen.items()}, thresholds_from=val_name,
        sensitivity_target=options.sensitivity_target, n_boot=options.n_boot,
        seed=options.seed)
    return (report, report.card_metrics(),
            report.card_operating_points(output, class_name=class_names[1]))


def multiclass_results(
    val: tuple[NDArray[np.int64], FloatArray],
    test: tuple[NDArray[np.int64], FloatArray],
    *,
    output: str,
    options: TaskOptions,
    test_name: str,
    val_name: str,
    prefix: str = "",
) -> tuple[EvaluationReport, list[Metric], list[OperatingPoint]]:
    """Macro one-vs-rest AUC, per-class AUC, top-label ECE and accuracy on test patients;
    one-vs-rest operating points for benign and malignant chosen on validation."""
    from dicomnode.inference.package import Metric, OperatingPoint
    from dicomnode.training.evaluate import (
        choose_thresholds,
        evaluate_binary,
        evaluate_multiclass,
    )
    from dicomnode.training.metrics import wilson_interval

    report = _quiet_evaluate(evaluate_multiclass, test[0], test[1], class_names=CLASSES,
                             dataset=test_name, n_boot=options.n_boot, seed=options.seed)
    metrics = [dataclasses.replace(m, name=prefix + m.name) for m in report.card_metrics()]
    correct = int(np.trace(report.confusion))
    accuracy = wilson_interval(correct, report.n)
    metrics.append(Metric(f"{prefix}accuracy", accuracy.value, accuracy.lower, accuracy.upper,
                          accuracy.level, f"arg-max class; {accuracy.method}", test_name))
    points: list[OperatingPoint] = []
    if prefix:
        return report, metrics, points
    for index in (1, 2):
        name = CLASSES[index]
        chosen = choose_thresholds((val[0] == index).astype(np.int64), val[1][:, index],
                                   sensitivity_target=options.sensitivity_target)
        one = _quiet_evaluate(
            evaluate_binary, (test[0] == index).astype(np.int64), test[1][:, index],
            class_names=(f"not-{name}", name), dataset=test_name,
            thresholds={k: c.threshold for k, c in chosen.items()}, thresholds_from=val_name,
            sensitivity_target=options.sensitivity_target, n_boot=options.n_boot,
            seed=options.seed)
        for point in one.operating_points:
            if point.selected_on == "this data":
                continue
            label = f"{name}:{point.name}"
            points.append(OperatingPoint(label, output, point.threshold,
                                         point.counts.sensitivity, point.counts.specificity,
                                         name, "probability",
                                         f"{test_name} (threshold chosen on {val_name})"))
            for what, interval in (("sensitivity", point.sensitivity),
                                   ("specificity", point.specificity)):
                metrics.append(Metric(f"{what}@{label}", interval.value, interval.lower,
                                      interval.upper, interval.level, interval.method,
                                      test_name))
    return report, metrics, points


def _rewrite_card(package: ModelPackage, **changes: Any) -> ModelPackage:
    """Replace card fields (the ONNX file and its sha256 are untouched)."""
    from dicomnode.inference.package import load_package

    card = dataclasses.replace(package.card, **changes)
    temporary = package.card_path.with_name(f".{package.card_path.name}.tmp")
    temporary.write_text(card.to_yaml(), encoding="utf-8")
    os.replace(temporary, package.card_path)
    return load_package(package.directory)


def _update_checkpoint(path: Path, **entries: str) -> str:
    """Store the final card fields in the checkpoint (a re-export then reproduces the
    card) and return its new sha256."""
    import torch

    from dicomnode.inference.package import sha256_file

    data = torch.load(path, map_location="cpu", weights_only=True)
    data.update(entries)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(data, temporary)
    os.replace(temporary, path)
    return sha256_file(path)


def _training_data(what: str, options: TaskOptions, train_slices: int) -> dict[str, Any]:
    n_train, n_val, n_test, matrix = _sizes(options)
    seed, val_seed, test_seed = _seeds(options)
    calibration = (f"calibration seed {_calibration_seed(options)} ({options.n_calibration} "
                   f"patients, every slice), " if options.n_calibration > 0 else "")
    return {
        "description": (f"{NOT_CLINICAL}: {what} from {PHANTOM_SOURCE}, phantom matrix "
                        f"{matrix}; train seed {seed} ({n_train} patients, {train_slices} "
                        f"sampled slices), validation seed {val_seed} ({n_val} patients, "
                        f"every slice), {calibration}test seed {test_seed} ({n_test} "
                        f"patients, every slice); classes balanced healthy / benign / "
                        f"malignant"),
        "cases": {"train": n_train, "val": n_val, "test": n_test,
                  "train_slices": train_slices,
                  **({"calibration": options.n_calibration}
                     if options.n_calibration > 0 else {})},
        "sources": [PHANTOM_SOURCE],
        "synthetic": True,
    }


def _data_provenance(options: TaskOptions) -> dict[str, Any]:
    seed, val_seed, test_seed = _seeds(options)
    return {"layout": "phantom", "kind": "brain-tumour", "size": _sizes(options)[3],
            "seeds": {"train": seed, "val": val_seed, "test": test_seed},
            "unit": "patient (series)"}


SERIES_RULE = (
    "run the model on every slice of the sorted series (dicomnode.imaging.sort_datasets), "
    "each through the card's preprocessing; the key slice is the slice with the highest "
    "tumour score (one-logit models: the logit; three-class models: "
    "logsumexp(benign, malignant) - healthy); the series' logits, probabilities and CAM are "
    "the key slice's (dicomnode.training.tasks_brain.series_result)")


# --- CT and MR slice tasks --------------------------------------------------------------


def _patient_targets(patients: Sequence[PatientData], binary: bool) -> NDArray[np.int64]:
    labels = np.array([p.label for p in patients], dtype=np.int64)
    return (labels > 0).astype(np.int64) if binary else labels


def _probabilities(rows: FloatArray) -> FloatArray:
    """Series-level probabilities from key-slice logits: P(positive) (N,) or (N, 3)."""
    if rows.shape[1] == 1:
        return _sigmoid(rows[:, 0])
    return _softmax(rows)


def _finish_package(package: ModelPackage, directory: Path, checkpoint: Path,
                    card_fields: dict[str, Any], provenance: dict[str, Any], *,
                    metrics: Sequence[Metric], points: Sequence[OperatingPoint],
                    limitations: Sequence[str], report: EvaluationReport,
                    val_report: EvaluationReport, served: Sequence[ServedCase],
                    started: float) -> TrainingOutcome:
    """Write the served evaluation into the card and the checkpoint, check the ONNX file
    did not change, and leave the evaluation files beside the package."""
    from dicomnode.inference.package import sha256_file
    from dicomnode.training.evaluate import write_plots

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
    _write_json(evaluation / "cases.json", [c.to_dict() for c in served])
    write_plots(report, evaluation)
    return TrainingOutcome(package, checkpoint, report, val_report, report,
                           time.perf_counter() - started)


def train_slice_task(task: Task, options: TaskOptions, models_dir: Path, name: str | None,
                     version: str) -> TrainingOutcome:
    """Train the CT or MR slice model, calibrate it on validation (or calibration)
    patients, export it with its in-graph CAM, and measure it served on the test patients."""
    import torch

    from dicomnode.training.loop import fit

    assert task.spec is not None and task.model is not None and task.train_config is not None
    modality: Modality = "CT" if task.modality == ("CT",) else "MR"
    binary = task.loss == "bce"
    started = time.perf_counter()
    if options.data != "phantom":
        raise TrainingRunError(f"task {task.name} trains from --data phantom only")
    _set_threads(options)
    stream = _stream(options)
    n_train, n_val, _, matrix = _sizes(options)
    seed, val_seed, _ = _seeds(options)
    if options.n_calibration > 0:
        _calibration_seed(options)  # refuse a clashing seed before training, not after
    spec = task.spec(options)
    train = build_patients(seed, n_train, {modality: spec}, matrix=matrix, keep="sample",
                           stream=stream, what="train")
    val = build_patients(val_seed, n_val, {modality: spec}, matrix=matrix, keep="all",
                         stream=stream, what="validation")
    x_train, y_train, _ = slice_arrays(train, modality, binary=binary)
    x_val, y_val, _ = slice_arrays(val, modality, binary=binary)
    _note(stream, f"{task.name}: {x_train.shape[0]} training slices "
                  f"{np.bincount(y_train).tolist()}, {x_val.shape[0]} validation slices")
    config = task.train_config(options)
    masks = slice_masks(train, modality) if config.localisation_weight > 0 else None
    torch.manual_seed(options.seed)
    result = fit(task.model(options), (x_train, y_train), (x_val, y_val), config,
                 loss_kind=task.loss, n_classes=len(task.class_names), stream=stream,
                 masks=masks)
    model = result.model.cpu().eval()
    training_record = {
        "options": options.to_dict(), "config": config.to_dict(),
        "data_provenance": _data_provenance(options),
        "result": {k: v for k, v in result.to_dict().items() if k != "history"},
        "slice_sampling": SLICE_SAMPLING[modality].describe(),
        "localisation": _localisation_record(config.localisation_weight, masks),
    }
    return _calibrate_and_package(
        task, options, model, val, training_record, models_dir=models_dir, name=name,
        version=version, train_slices=int(x_train.shape[0]), history=result.to_dict(),
        stream=stream, started=started)


def _calibrate_and_package(task: Task, options: TaskOptions, model: nn.Module,
                           val: Sequence[PatientData], training_record: dict[str, Any], *,
                           models_dir: Path, name: str | None, version: str, train_slices: int,
                           history: Mapping[str, Any] | None, stream: TextIO | None,
                           started: float) -> TrainingOutcome:
    """A trained CT or MR slice model to its package: calibrate it on patients at series
    level (the validation patients, or with ``--n-calibration`` patients of their own seed),
    choose the operating points there, save the checkpoint, export, and measure the
    served package on the test patients."""
    import torch

    from dicomnode.training.commands import export_checkpoint
    from dicomnode.training.evaluate import evaluate

    modality: Modality = "CT" if task.modality == ("CT",) else "MR"
    binary = task.loss == "bce"
    assert task.spec is not None
    spec = task.spec(options)
    _, n_val, n_test, matrix = _sizes(options)
    _, val_seed, test_seed = _seeds(options)
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        raise TrainingRunError("the slice model has no head")
    if options.n_calibration > 0:
        calibration_seed = _calibration_seed(options)
        patients = build_patients(calibration_seed, options.n_calibration, {modality: spec},
                                  matrix=matrix, keep="all", stream=stream, what="calibration")
        val_name = (f"calibration patients, seed {calibration_seed} "
                    f"(n={options.n_calibration})")
    else:
        patients = list(val)
        val_name = f"validation patients, seed {val_seed} (n={n_val})"

    raw_val = [_logits(model, p.series[modality].images) for p in patients]
    y_val_patients = _patient_targets(patients, binary)
    calibration = (fit_series_calibration(raw_val, y_val_patients) if binary else
                   fit_multiclass_calibration(series_rows_at(raw_val), y_val_patients,
                                              len(task.class_names), seed=options.seed))
    fold_calibration(_last_linear(head), calibration)
    check = _logits(model, patients[0].series[modality].images)
    if not np.allclose(check, calibration.apply(raw_val[0]), rtol=1e-4, atol=1e-3):
        raise TrainingRunError("folding the calibration did not scale the logits as fitted")
    val_rows = np.stack([series_result(calibration.apply(s)).logits for s in raw_val])
    val_probs = _probabilities(val_rows)
    val_report = _quiet_evaluate(evaluate, y_val_patients, val_probs,
                                 class_names=task.class_names, dataset=val_name,
                                 n_boot=min(500, options.n_boot), seed=options.seed,
                                 sensitivity_target=options.sensitivity_target)
    _note(stream, f"calibration ({calibration.method}): factors "
                  f"{np.round(calibration.factors, 3).tolist()}, shift "
                  f"{np.round(calibration.shift, 3).tolist()}; {val_name}: "
                  f"AUC {val_report.auc}, ECE {val_report.ece}")

    package_name = name or task.default_package_name
    directory = models_dir / package_name
    checkpoint = directory / TRAINING_DIR / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    training_data = _training_data(f"{modality} series", options, train_slices)
    provenance: dict[str, Any] = {
        "task": task.name,
        "preprocessing_fingerprint": spec.fingerprint,
        "training": {
            **training_record,
            "calibration": {**calibration.to_dict(), "fitted_on": val_name},
            "thresholds_from": f"{val_name} (series level)",
        },
        "serving": {"input": task.card.input_description, "series_rule": SERIES_RULE,
                    "slices_used": "all slices of the series"},
    }
    card_fields: dict[str, Any] = {"version": version, "metrics": [], "operating_points": [],
                                   "training_data": training_data,
                                   "limitations": list(task.card.limitations)}
    example = torch.from_numpy(np.ascontiguousarray(
        patients[0].series[modality].images[:2].astype(np.float32)))
    torch.save({"format": CHECKPOINT_FORMAT, "task": task.name,
                "options": json.dumps(options.to_dict()), "card": json.dumps(card_fields),
                "provenance": json.dumps(provenance, default=str),
                "spec": json.dumps(spec.to_dict()), "state_dict": model.state_dict(),
                "example": example}, checkpoint)
    if history is not None:
        _write_json(directory / TRAINING_DIR / "history.json", history)
    _write_json(directory / TRAINING_DIR / "validation_report.json", val_report.to_dict())
    package = export_checkpoint(checkpoint, models_dir, name=package_name,
                                version=version).package

    served = served_slice_cases(package, options, modality, stream)
    y_test = np.array([c.label for c in served], dtype=np.int64)
    y_test = (y_test > 0).astype(np.int64) if binary else y_test
    test_probs = _probabilities(np.array([c.logits for c in served], dtype=np.float64))
    test_name = (f"held-out test patients, seed {test_seed} (n={n_test}), served package "
                 f"(card spec + ONNX Runtime), series level")
    output = "logits"
    if binary:
        report, metrics, points = binary_results(
            (y_val_patients, val_probs), (y_test, test_probs), class_names=CT_CLASSES,
            output=output, options=options, test_name=test_name, val_name=val_name)
    else:
        report, metrics, points = multiclass_results(
            (y_val_patients, val_probs), (y_test, test_probs), output=output,
            options=options, test_name=test_name, val_name=val_name)
    hits = [bool(c.cam_hit) for c in served if c.cam_hit is not None]
    metrics.append(heatmap_metric(hits, test_name, size=options.size))
    limitations = [f"Trained and tested on {NOT_CLINICAL}.", *task.card.limitations]
    limitations.extend(f"Evaluation warning: {w}" for w in report.warnings)
    provenance["evaluation"] = {
        "dataset": test_name, "served": True, "sha256": package.sha256,
        "key_slice_has_tumour": _share([c.key_has_tumour for c in served if c.label > 0]),
        "cam_hits": f"{sum(hits)}/{len(hits)}",
    }
    return _finish_package(package, directory, checkpoint, card_fields, provenance,
                           metrics=metrics, points=points, limitations=limitations,
                           report=report, val_report=val_report, served=served,
                           started=started)


def recalibrate_slice_package(directory: Path, *, n_calibration: int,
                              calibration_seed: int | None = None, n_test: int | None = None,
                              version: str | None = None, stream: TextIO | None = None
                              ) -> TrainingOutcome:
    """Redo a CT or MR slice package's post-training steps from its checkpoint with
    ``n_calibration`` calibration patients (and optionally another test-set size).

    What ``train ... --n-calibration N`` does after training, on the weights the
    checkpoint holds. Those already carry the earlier calibration folded in; both
    families are closed under composition (``a2 (a1 z + b1) + b2``), so the fitted map
    and every number after it are what a fresh training run with the same options gives,
    to the optimiser's tolerance. The earlier calibration stays in the card's provenance.
    """

    from dicomnode.training.commands import recalibration_start

    started = time.perf_counter()
    data, task, options, replaced = recalibration_start(Path(directory), n_calibration,
                                                        calibration_seed, n_test)
    if task.name not in ("brain-tumour-ct", "brain-tumour-mr") or task.model is None:
        raise TrainingRunError(f"{task.name}: recalibrate is for the CT and MR slice tasks")
    _set_threads(options)
    model = task.model(options)
    model.load_state_dict(data["state_dict"])
    model.eval()
    provenance = json.loads(data["provenance"])
    record = {k: v for k, v in provenance["training"].items()
              if k not in ("calibration", "thresholds_from", "options")}
    record["options"] = options.to_dict()
    record["recalibrated"] = replaced
    card = json.loads(data["card"])
    train_slices = int(card["training_data"]["cases"].get("train_slices", 0))
    return _calibrate_and_package(
        task, options, model, [], record, models_dir=Path(directory).parent,
        name=Path(directory).name, version=version or str(card["version"]),
        train_slices=train_slices, history=None, stream=stream or _stream(options),
        started=started)


def _localisation_record(weight: float, masks: NDArray[np.uint8] | None,
                         maps: str = "the slice's own class") -> dict[str, Any]:
    if masks is None:
        return {"weight": 0.0, "applied": False}
    with_lesion = int((masks.reshape(masks.shape[0], -1).max(axis=1) > 0).sum())
    return {"weight": weight, "applied": with_lesion > 0,
            "tumour_slices_with_masks": with_lesion,
            "loss": ("cross-entropy between the softmax over feature-grid cells of the "
                     f"standardised Grad-CAM evidence of {maps} (the exported map before "
                     "ReLU) and each cell's share of the tumour mask (necrosis + "
                     "enhancing/solid tumour; same geometric augmentation as the image); "
                     "tumour slices only; added to the training loss times the weight"),
            "masks": "training phantoms only; validation and test masks are not used"}


def _share(flags: Sequence[bool]) -> str:
    return f"{sum(flags)}/{len(flags)}"


# --- slice samples for the shared `dicomnode evaluate` ----------------------------------


class BrainSliceReader:
    """Phantom slices made on demand from their key ``brain:<modality>:<seed>:<n>:<i>``.

    Slices of one patient are consecutive in a set, so the last case is kept and each
    patient is generated once per pass.
    """

    assemble: Literal["image"] = "image"

    def __init__(self, modality: Modality, matrix: int) -> None:
        self.modality: Modality = modality
        self.matrix = matrix
        self._case: tuple[str, BrainCase] | None = None

    def case(self, seed: int, n: int, index: int) -> BrainCase:
        key = f"{seed}:{n}:{index}"
        if self._case is None or self._case[0] != key:
            label = case_labels(seed, n)[index]
            self._case = (key, make_brain_case(seed, index, label, matrix=self.matrix,
                                               modalities=(self.modality,)))
        return self._case[1]

    def samples(self, seed: int, n: int, spec: PreprocessSpec, *, binary: bool
                ) -> list[Sample]:
        """The training rule's slices of every patient of the set (seed, n)."""
        from dicomnode.phantoms.common import item_rng
        from dicomnode.training.datasets import Sample, geometric_spec

        geometry = geometric_spec(spec)
        samples: list[Sample] = []
        for index, label in enumerate(case_labels(seed, n)):
            case = self.case(seed, n, index)
            _, mask = case.series(self.modality)
            moved = apply_spec(geometry, mask.astype(np.float32))[:, 0] > 0.5
            area = moved.sum(axis=(1, 2)).astype(np.int64)
            rng = item_rng(SERIES_STREAM, seed, index, "slices", self.modality)
            for k in _sample(area, rng, self.modality,
                             tumour_patient=label != "healthy").tolist():
                tumour = area[k] >= MIN_LESION_PIXELS
                value = (1 if binary else CLASSES.index(label)) if tumour else 0
                samples.append(Sample(f"brain:{self.modality}:{seed}:{n}:{index}:{k}",
                                      case.patient_id, value, (), k))
        return samples

    def read(self, sample: Sample) -> list[Dataset]:
        _, _, seed, n, index, _ = sample.key.split(":")
        if sample.index is None:
            raise TrainingRunError(f"{sample.key}: not a sample of this reader")
        datasets, _ = self.case(int(seed), int(n), int(index)).series(self.modality)
        return [datasets[sample.index]]


def _slice_phantoms(modality: Modality) -> Callable[[TaskOptions, PreprocessSpec],
                                                    DatasetSplits]:
    def build(options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
        from dicomnode.training.datasets import DatasetSplits, SampleSet

        o = options.resolved()
        n_train, n_val, n_test, matrix = _sizes(o)
        seed, val_seed, test_seed = _seeds(o)
        binary = modality == "CT"
        names = CT_CLASSES if binary else CLASSES
        reader = BrainSliceReader(modality, matrix)
        description = (f"{NOT_CLINICAL}: sampled {modality} slices of brain phantoms "
                       f"({PHANTOM_SOURCE}); slice level, not the card's series level")
        parts = {part: SampleSet(part, reader.samples(s, n, spec, binary=binary), spec, names,
                                 reader, description=description)
                 for part, s, n in (("train", seed, n_train), ("val", val_seed, n_val),
                                    ("test", test_seed, n_test))}
        return DatasetSplits(parts["train"], parts["val"], parts["test"], description, True,
                             (PHANTOM_SOURCE,), _data_provenance(o))

    return build


# --- registration -----------------------------------------------------------------------

_NOT_CLINICAL_USE = ("Demonstration and integration testing only. Trained on synthetic "
                     "phantoms; not a medical device and not for clinical use.")
_SHARED_LIMITATIONS = (
    "Phantom tumours are idealised (one lesion, sharp enhancement, no motion, no "
    "post-operative change, no other pathology); nothing here says how the model behaves "
    "on patients.",
    "Series-level numbers use the key-slice rule over every slice; a series with far more "
    "or thinner slices than the phantoms (20-150 slices) gives the healthy class more "
    "chances of a false key slice.",
    "Calibration (folded into the logits) and operating points were fitted on phantoms "
    "that did not train the model (provenance.training.calibration.fitted_on); re-check "
    "both on local data before any use.",
)

CT_CARD = CardText(
    intended_use=("Flags contrast-enhanced head CT series that contain a brain tumour. "
                  + _NOT_CLINICAL_USE),
    output_meaning=("tumour logit of one axial slice, calibrated at series level: the "
                    "series' P(tumour) is the sigmoid of the key slice's logit (its "
                    "maximum over slices)"),
    cam_meaning=("Grad-CAM of the slice's tumour logit on a 1/4-resolution grid, scaled to "
                 "[0, 1] per slice; the series' heat map is the key slice's"),
    input_description=(
        "one axial slice of a head CT series (CT Image Storage, HU via the rescale), 128 x "
        "128 after the card's spec; serving runs every slice of the series sorted by "
        "dicomnode.imaging.sort_datasets, batch axis = slices"),
    limitations=("CT only: benign (meningioma-like) and malignant (glioblastoma-like) "
                 "tumours are one positive class here.",),
)
MR_CARD = CardText(
    intended_use=("Sorts T1 post-contrast brain MR series into healthy, benign "
                  "(meningioma-like) or malignant (glioblastoma-like) tumour. "
                  + _NOT_CLINICAL_USE),
    output_meaning=("healthy / benign / malignant logits of one axial slice, calibrated at "
                    "series level: the series' probabilities are the softmax of the key "
                    "slice's logits"),
    cam_meaning=("Grad-CAM of each class logit (channels in class order) on a 1/4-resolution "
                 "grid, scaled to [0, 1] per slice; the series' heat map is the key slice's "
                 "channel of the tumour class it favours"),
    input_description=(
        "one axial slice of a T1 post-contrast MR series (MR Image Storage), 128 x 128 "
        "after the card's spec; serving runs every slice of the series sorted by "
        "dicomnode.imaging.sort_datasets, batch axis = slices"),
    limitations=("Trained on T1 post-contrast only; other sequences (T2, FLAIR, "
                 "non-contrast T1) are outside its training.",),
)

register_task(Task(
    name="brain-tumour-ct",
    summary="brain tumour vs none on contrast head CT series (slice model, key slice)",
    modality=("CT",),
    class_names=CT_CLASSES,
    card=dataclasses.replace(CT_CARD, limitations=CT_CARD.limitations + _SHARED_LIMITATIONS),
    loss="bce",
    spec=ct_spec,
    datasets={"phantom": _slice_phantoms("CT")},
    model=ct_model,
    train_config=slice_train_config,
    export_wrapper=_with_cam,
    trainer=train_slice_task,
    package_name="brain-tumour-ct",
))
register_task(Task(
    name="brain-tumour-mr",
    summary="healthy / benign / malignant on T1 post-contrast brain MR series",
    modality=("MR",),
    class_names=CLASSES,
    card=dataclasses.replace(MR_CARD, limitations=MR_CARD.limitations + _SHARED_LIMITATIONS),
    loss="ce",
    spec=mr_spec,
    datasets={"phantom": _slice_phantoms("MR")},
    model=mr_model,
    train_config=decaying_train_config,
    export_wrapper=_with_cam,
    trainer=train_slice_task,
    package_name="brain-tumour-mr",
))


# --- fusion -----------------------------------------------------------------------------

FusionMode = Literal["both", "ct", "mr"]
STAGE_LOSS_WEIGHT = 0.5
RISK_LOSS_WEIGHT = 0.25
#: Validation samples scored per epoch for early stopping (a fixed random subset).
VAL_SAMPLES = 1200


@dataclass(frozen=True, eq=False)
class FusionData:
    """Sampled CT and MR slices of a set of patients, and per-sample targets."""

    ct: NDArray[np.float32]
    mr: NDArray[np.float32]
    ct_tumour: NDArray[np.bool_]
    mr_tumour: NDArray[np.bool_]
    ct_owner: NDArray[np.int64]
    mr_owner: NDArray[np.int64]
    labels: NDArray[np.int64]
    volumes: FloatArray
    ct_masks: NDArray[np.uint8] | None = None
    mr_masks: NDArray[np.uint8] | None = None

    @classmethod
    def of(cls, patients: Sequence[PatientData], *, masks: bool = False) -> FusionData:
        """The sampled slices; ``masks``: with their tumour masks (:func:`slice_masks`)."""
        ct, _, ct_owner = slice_arrays(patients, "CT", binary=True)
        mr, _, mr_owner = slice_arrays(patients, "MR", binary=True)
        ct_area = np.concatenate([p.series["CT"].take(p.sampled["CT"]).area for p in patients])
        mr_area = np.concatenate([p.series["MR"].take(p.sampled["MR"]).area for p in patients])
        return cls(ct, mr, ct_area >= MIN_LESION_PIXELS, mr_area >= MIN_LESION_PIXELS,
                   ct_owner, mr_owner, np.array([p.label for p in patients], dtype=np.int64),
                   np.array([p.volume_cm3 for p in patients], dtype=np.float64),
                   slice_masks(patients, "CT") if masks else None,
                   slice_masks(patients, "MR") if masks else None)

    def samples(self, rng: np.random.Generator) -> list[tuple[FusionMode, int, int]]:
        """Every CT slice paired with a random MR slice of its patient, and every CT and
        MR slice alone: (mode, CT index or -1, MR index or -1)."""
        by_patient: dict[int, NDArray[np.int64]] = {}
        for owner in np.unique(self.mr_owner):
            by_patient[int(owner)] = np.flatnonzero(self.mr_owner == owner)
        out: list[tuple[FusionMode, int, int]] = []
        for i, owner in enumerate(self.ct_owner.tolist()):
            partners = by_patient.get(owner)
            if partners is not None and partners.size:
                out.append(("both", i, int(rng.choice(partners))))
            out.append(("ct", i, -1))
        out.extend(("mr", -1, j) for j in range(self.mr.shape[0]))
        return out

    def targets(self, mode: FusionMode, i: int, j: int) -> tuple[int, int, float]:
        """(class, stage or -100, risk) of a sample: its patient's class where either
        slice shows tumour, else healthy; the proxies follow the class."""
        owner = int(self.ct_owner[i] if i >= 0 else self.mr_owner[j])
        tumour = (i >= 0 and bool(self.ct_tumour[i])) or (j >= 0 and bool(self.mr_tumour[j]))
        label = int(self.labels[owner]) if tumour else 0
        if label == 0:
            return 0, -100, 0.0
        volume = float(self.volumes[owner])
        return label, stage_proxy(volume), risk_proxy(CLASSES[label], volume)


def _fusion_heads(model: nn.Module, ct: Tensor | None, mr: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The three heads with only the present encoders run (the absent map is zero; the
    presence mask removes it exactly as in the full forward, which runs both)."""
    return _fusion_forward(model, ct, mr)[:3]


def _fusion_forward(model: nn.Module, ct: Tensor | None, mr: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_fusion_heads` and the CT map, MR map (zeros where absent) and presence."""
    import torch

    from dicomnode.training.architectures import DualEncoderFusion

    assert isinstance(model, DualEncoderFusion)
    ct_map = model.ct_encoder(ct) if ct is not None else None
    mr_map = model.mr_encoder(mr) if mr is not None else None
    reference = ct_map if ct_map is not None else mr_map
    assert reference is not None
    batch = reference.shape[0]
    presence = torch.tensor([[float(ct is not None), float(mr is not None)]],
                            dtype=reference.dtype).expand(batch, 2)
    ct_map = ct_map if ct_map is not None else torch.zeros_like(reference)
    mr_map = mr_map if mr_map is not None else torch.zeros_like(reference)
    normed, _, _ = model.embed(ct_map, mr_map, presence)
    return (model.class_head(normed), model.stage_head(normed), model.risk_head(normed),
            ct_map, mr_map, presence)


def _fusion_localisation(model: nn.Module, maps: tuple[Tensor, Tensor, Tensor],
                         masks: tuple[Tensor | None, Tensor | None], labels: Tensor) -> Tensor:
    """Mean over the modalities with tumour masks of the localisation loss of that
    modality's served map (``ct_cam`` / ``mr_cam`` before ReLU) of the sample's class."""
    from dicomnode.training.architectures import DualEncoderFusion
    from dicomnode.training.gradcam import (
        fusion_class_evidence,
        localisation_loss,
        mask_to_grid,
    )

    assert isinstance(model, DualEncoderFusion)
    ct_map, mr_map, presence = maps
    evidence = fusion_class_evidence(model, ct_map, mr_map, presence, labels)
    losses = []
    for grid, mask, encoder in zip(evidence, masks, (model.ct_encoder, model.mr_encoder),
                                   strict=True):
        if mask is not None and bool((mask > 0).any()):
            target = mask_to_grid(mask, grid.shape[-2:], encoder.output_stride)
            losses.append(localisation_loss(grid, target))
    if not losses:
        return ct_map.sum() * 0.0
    return sum(losses[1:], losses[0]) / len(losses)


def _fusion_batches(samples: Sequence[tuple[FusionMode, int, int]], order: NDArray[np.int64],
                    batch_size: int, *, smallest: int = 2
                    ) -> list[tuple[FusionMode, NDArray[np.int64]]]:
    """Batches of one mode each (so an absent encoder is never run), in ``order``; in
    training a last batch of one is dropped (batch norm needs two samples)."""
    batches: list[tuple[FusionMode, NDArray[np.int64]]] = []
    for mode in ("both", "ct", "mr"):
        chosen = np.array([k for k in order.tolist() if samples[k][0] == mode], dtype=np.int64)
        for start in range(0, chosen.size, batch_size):
            part = chosen[start:start + batch_size]
            if part.size >= smallest:
                batches.append((mode, part))
    return batches


def _fusion_inputs(data: FusionData, samples: Sequence[tuple[FusionMode, int, int]],
                   index: NDArray[np.int64]) -> tuple[Tensor | None, Tensor | None]:
    import torch

    ct_rows = [samples[k][1] for k in index.tolist()]
    mr_rows = [samples[k][2] for k in index.tolist()]
    ct = torch.from_numpy(data.ct[ct_rows]) if ct_rows[0] >= 0 else None
    mr = torch.from_numpy(data.mr[mr_rows]) if mr_rows[0] >= 0 else None
    return ct, mr


def _fusion_masks(data: FusionData, samples: Sequence[tuple[FusionMode, int, int]],
                  index: NDArray[np.int64]) -> tuple[Tensor | None, Tensor | None]:
    import torch

    assert data.ct_masks is not None and data.mr_masks is not None
    ct_rows = [samples[k][1] for k in index.tolist()]
    mr_rows = [samples[k][2] for k in index.tolist()]
    ct = torch.from_numpy(data.ct_masks[ct_rows]) if ct_rows[0] >= 0 else None
    mr = torch.from_numpy(data.mr_masks[mr_rows]) if mr_rows[0] >= 0 else None
    return ct, mr


def _augment_pair(images: Tensor | None, masks: Tensor | None, config: TrainConfig,
                  generator: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
    """Images and masks through the same augmentation (the draws :func:`augment_batch`
    would make for the images alone)."""
    import torch

    from dicomnode.training.augment import augment_batch_with_masks

    if images is None or masks is None:
        return images, masks
    return augment_batch_with_masks(images, masks.to(torch.float32), config.augmentation,
                                    generator)


def _fusion_val_scores(model: nn.Module, data: FusionData,
                       samples: Sequence[tuple[FusionMode, int, int]]) -> FloatArray:
    import torch

    model.eval()
    scores = np.zeros((len(samples), len(CLASSES)), dtype=np.float64)
    with torch.no_grad():
        for _, index in _fusion_batches(samples, np.arange(len(samples)), 64, smallest=1):
            ct, mr = _fusion_inputs(data, samples, index)
            logits, _, _ = _fusion_heads(model, ct, mr)
            scores[index] = torch.softmax(logits, dim=1).double().numpy()
    return scores


def fit_fusion(model: nn.Module, train: FusionData, val: FusionData, config: TrainConfig,
               stream: TextIO | None, *, freeze_encoders: bool = False) -> dict[str, Any]:
    """Multi-task training: class-weighted cross-entropy on the class, cross-entropy on
    the stage proxy (tumour samples only) and squared error on the risk proxy; early
    stopping on the validation samples' macro one-vs-rest AUC, best weights restored.

    ``freeze_encoders``: both encoders keep their weights and batch-norm statistics (eval
    mode throughout) and only the projections, missing embeddings and heads learn. The
    encoders then stay the CT and MR slice models' trunks, whose feature maps put the
    tumour where it is, so the fusion's Grad-CAM inherits their localisation (fine-tuned
    end to end on the fewer fusion patients, 0.2.0's maps peaked in the tumour in 0.57
    (MR) and 0.18 (CT) of held-out patients)."""
    import copy

    import torch
    import torch.nn.functional as F

    from dicomnode.training.augment import augment_batch
    from dicomnode.training.loop import class_weights, reproducible
    from dicomnode.training.metrics import macro_auc

    localise = config.localisation_weight > 0
    if localise and (train.ct_masks is None or train.mr_masks is None):
        raise TrainingRunError("the localisation loss needs the training slices' masks")
    rng = np.random.default_rng(config.seed)
    val_rng = np.random.default_rng(config.seed + 7)
    val_samples = val.samples(val_rng)
    if len(val_samples) > VAL_SAMPLES:
        chosen = np.sort(val_rng.choice(len(val_samples), VAL_SAMPLES, replace=False))
        val_samples = [val_samples[k] for k in chosen.tolist()]
    val_labels = np.array([val.targets(*s)[0] for s in val_samples], dtype=np.int64)
    history: list[dict[str, Any]] = []
    best_auc, best_epoch, since = -math.inf, 0, 0
    encoders: list[nn.Module] = []
    if freeze_encoders:
        for encoder in (model.ct_encoder, model.mr_encoder):
            assert isinstance(encoder, torch.nn.Module)
            encoder.requires_grad_(False)
            encoders.append(encoder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with reproducible(config.seed):
        best_state = copy.deepcopy(model.state_dict())
        augment = torch.Generator().manual_seed(config.seed + 1)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            samples = train.samples(rng)
            targets = [train.targets(*s) for s in samples]
            labels = torch.tensor([t[0] for t in targets])
            stages = torch.tensor([t[1] for t in targets])
            risks = torch.tensor([t[2] for t in targets], dtype=torch.float32)
            weight = torch.tensor(class_weights(labels.numpy(), len(CLASSES)),
                                  dtype=torch.float32)
            batches = _fusion_batches(samples, rng.permutation(len(samples)),
                                      config.batch_size)
            batches = [batches[k] for k in rng.permutation(len(batches)).tolist()]
            model.train()
            for encoder in encoders:
                encoder.eval()  # frozen: batch-norm statistics stay the slice models'
            total, seen = 0.0, 0
            loc_total, loc_batches = 0.0, 0
            for _, index in batches:
                ct, mr = _fusion_inputs(train, samples, index)
                rows = torch.from_numpy(index)
                if localise:
                    ct_masks, mr_masks = _fusion_masks(train, samples, index)
                    ct, ct_masks = _augment_pair(ct, ct_masks, config, augment)
                    mr, mr_masks = _augment_pair(mr, mr_masks, config, augment)
                    (class_logits, stage_logits, risk, ct_map, mr_map,
                     presence) = _fusion_forward(model, ct, mr)
                    loc = _fusion_localisation(model, (ct_map, mr_map, presence),
                                               (ct_masks, mr_masks), labels[rows])
                else:
                    ct = (augment_batch(ct, config.augmentation, augment) if ct is not None
                          else None)
                    mr = (augment_batch(mr, config.augmentation, augment) if mr is not None
                          else None)
                    class_logits, stage_logits, risk = _fusion_heads(model, ct, mr)
                loss = F.cross_entropy(class_logits, labels[rows], weight=weight)
                if bool((stages[rows] >= 0).any()):
                    loss = loss + STAGE_LOSS_WEIGHT * F.cross_entropy(
                        stage_logits, stages[rows], ignore_index=-100)
                loss = loss + RISK_LOSS_WEIGHT * F.mse_loss(risk[:, 0], risks[rows])
                if localise:
                    loss = loss + config.localisation_weight * loc
                    if float(loc.detach()) != 0.0:
                        loc_total += float(loc.detach())
                        loc_batches += 1
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                if config.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                optimizer.step()
                total += float(loss.detach()) * index.size
                seen += index.size
            auc = macro_auc(val_labels, _fusion_val_scores(model, val, val_samples))
            improved = math.isfinite(auc) and auc > best_auc
            if improved:
                best_auc, best_epoch, since = auc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
            record: dict[str, Any] = {
                "epoch": epoch, "train_loss": total / max(seen, 1), "val_macro_auc": auc,
                "seconds": round(time.perf_counter() - epoch_start, 2), "best": improved}
            if localise:
                record["train_localisation_loss"] = (loc_total / loc_batches if loc_batches
                                                     else None)
            history.append(record)
            _note(stream, f"fusion epoch {epoch}/{config.epochs}: train loss "
                          f"{record['train_loss']:.4f} | val macro AUC {auc:.3f}"
                          f"{' *best' if improved else ''} ({record['seconds']:.1f}s)")
            if config.patience is not None and since >= config.patience:
                _note(stream, f"early stop: no improvement for {config.patience} epochs")
                break
        model.load_state_dict(best_state)
    for encoder in encoders:
        encoder.requires_grad_(True)
    model.eval()
    return {"best_epoch": best_epoch, "best_val_macro_auc": best_auc, "history": history,
            "monitor": "validation samples' macro one-vs-rest AUC (slice pairs and singles)",
            "encoders": "frozen (heads trained alone)" if freeze_encoders else "trained"}


def _fusion_wrapper(model: nn.Module) -> nn.Module:
    from dicomnode.training.architectures import DualEncoderFusion
    from dicomnode.training.gradcam import FusionWithCam

    if not isinstance(model, DualEncoderFusion):
        raise TrainingRunError("the fusion export needs a DualEncoderFusion")
    return FusionWithCam(model, "all")


def _fusion_outputs() -> list[Any]:
    from dicomnode.training.export import OutputDescription

    return [
        OutputDescription("class_logits", "logits", FUSION_CARD.output_meaning,
                          classes=CLASSES, activation="softmax"),
        OutputDescription("stage_logits", "logits", (
            "SYNTHETIC PROXY, research output, not validated: logits over four size bins "
            "of the tumour's equivalent diameter (< 2, 2-3, 3-4, >= 4 cm) named I-IV; brain "
            "tumours are graded, not staged, and no stage data were used; meaningless for "
            "a healthy answer"), classes=STAGES, activation="softmax"),
        OutputDescription("risk", "risk", (
            "SYNTHETIC PROXY, research output, not validated: a log relative hazard "
            "defined from class and tumour volume (0 healthy; benign 0.5 + 0.25 ln(1 + V); "
            "malignant 2 + 0.5 ln(1 + V), V in cm^3); no survival data were used")),
        OutputDescription("ct_cam", "cam", FUSION_CARD.cam_meaning + " (CT input)",
                          classes=CLASSES, explains="class_logits", cam_target="all"),
        OutputDescription("mr_cam", "cam", FUSION_CARD.cam_meaning + " (MR input)",
                          classes=CLASSES, explains="class_logits", cam_target="all"),
    ]


def export_fusion_checkpoint(checkpoint: Path, models_dir: Path, *, name: str | None = None,
                             version: str | None = None) -> ModelPackage:
    """Rebuild the fusion model from its checkpoint and write the verified package.

    The card's top-level ``preprocessing`` is the MR input's spec; the CT input's is in
    ``provenance.input_preprocessing.ct`` (the card format names one spec per model).
    """
    import torch

    from dicomnode.inference.package import (
        Metric,
        OperatingPoint,
        TrainingData,
        sha256_file,
    )
    from dicomnode.training.export import write_model_package

    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FUSION_CHECKPOINT_FORMAT:
        raise TrainingRunError(f"{checkpoint} is not a {FUSION_CHECKPOINT_FORMAT} checkpoint")
    options = TaskOptions.from_dict(json.loads(data["options"]))
    card = json.loads(data["card"])
    provenance = json.loads(data["provenance"])
    specs = json.loads(data["specs"])
    mr = PreprocessSpec.from_dict(specs["mr"])
    ct = PreprocessSpec.from_dict(specs["ct"])
    if (ct.fingerprint, mr.fingerprint) != (ct_spec(options).fingerprint,
                                            mr_spec(options).fingerprint):
        raise TrainingRunError("the checkpoint's specs differ from what the task builds now")
    model = fusion_model(options)
    model.load_state_dict(data["state_dict"])
    model.eval()
    training = card["training_data"]
    written = write_model_package(
        _fusion_wrapper(model),
        {"ct": data["example_ct"], "mr": data["example_mr"],
         "presence": data["example_presence"]},
        models_dir,
        name=name or "brain-tumour-fusion",
        version=version or str(card.get("version", "0.1.0")),
        task="brain-tumour",
        modality=("CT", "MR"),
        outputs=_fusion_outputs(),
        preprocessing=[step.to_dict() for step in mr.steps],
        operating_points=[OperatingPoint(**p) for p in card["operating_points"]],
        training_data=TrainingData(training["description"], training["cases"],
                                   tuple(training["sources"]), bool(training["synthetic"])),
        metrics=[Metric(**m) for m in card["metrics"]],
        intended_use=FUSION_CARD.intended_use,
        input_descriptions={
            "ct": ("one axial slice of a contrast head CT series, 128 x 128 after the CT spec "
                   "in provenance.input_preprocessing.ct (NOT the card's top-level "
                   "preprocessing, which is the MR input's); zeros when absent"),
            "mr": ("one axial slice of a T1 post-contrast MR series, 128 x 128 after the "
                   "card's preprocessing; zeros when absent"),
            "presence": "(CT present, MR present) as 0/1 floats",
        },
        limitations=tuple(card["limitations"]),
    )
    extra = {**provenance, "input_preprocessing": {
        "ct": {"steps": [s.to_dict() for s in ct.steps], "fingerprint": ct.fingerprint},
        "mr": {"steps": [s.to_dict() for s in mr.steps], "fingerprint": mr.fingerprint}},
        "preprocessing_fingerprint": mr.fingerprint,
        "checkpoint_sha256": sha256_file(checkpoint)}
    return _rewrite_card(written.package,
                         provenance={**written.package.card.provenance, **extra})


def concordance_index(predicted: NDArray[Any], truth: NDArray[Any]) -> float:
    """Harrell's C between two scores: among pairs whose ``truth`` differs, the share
    ordered the same way by ``predicted`` (ties in ``predicted`` count one half)."""
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    dt = t[:, None] - t[None, :]
    dp = p[:, None] - p[None, :]
    pairs = dt > 0
    if not pairs.any():
        return float("nan")
    return float(((dp[pairs] > 0).sum() + 0.5 * (dp[pairs] == 0).sum()) / pairs.sum())


def _bootstrap(statistic: Callable[[NDArray[np.int64]], float], n: int, *, n_boot: int,
               seed: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    value = statistic(np.arange(n))
    replicates = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    replicates = replicates[np.isfinite(replicates)]
    low, high = (float(q) for q in np.quantile(replicates, [0.025, 0.975]))
    return value, min(low, value), max(high, value)


def _init_encoders(model: nn.Module, models_dir: Path, options: TaskOptions,
                   stream: TextIO | None) -> dict[str, str]:
    """Start each encoder from the bundled CT / MR slice model's trunk when one trained
    with the same trunk and without this run's test patients is in ``models_dir``."""
    import torch

    from dicomnode.inference.package import sha256_file

    _, val_seed, test_seed = _seeds(options)
    used: dict[str, str] = {}
    for package, attribute in (("brain-tumour-ct", "ct_encoder"),
                               ("brain-tumour-mr", "mr_encoder")):
        path = models_dir / package / TRAINING_DIR / "checkpoint.pt"
        if not path.is_file():
            used[attribute] = "random initialisation (no checkpoint found)"
            continue
        data = torch.load(path, map_location="cpu", weights_only=True)
        other = TaskOptions.from_dict(json.loads(data["options"]))
        if (other.depth, other.width, other.size) != (options.depth, options.width,
                                                      options.size):
            used[attribute] = f"random initialisation ({package} has another trunk)"
            continue
        if test_seed in (other.seed, other.val_seed):
            used[attribute] = f"random initialisation ({package} saw this run's test seed)"
            continue
        state = {k.removeprefix("backbone."): v for k, v in data["state_dict"].items()
                 if k.startswith("backbone.")}
        getattr(model, attribute).load_state_dict(state)
        used[attribute] = (f"{package} trunk (checkpoint sha256 {sha256_file(path)}, train "
                           f"seed {other.seed}, validation seed {other.val_seed})")
        _note(stream, f"{attribute}: initialised from {package}")
    del val_seed
    return used


def _fusion_val_logits(model: nn.Module, patients: Sequence[PatientData]
                       ) -> tuple[list[FloatArray], list[FloatArray], Callable[[int, int, int],
                                                                           FloatArray]]:
    """Single-modality class logits of every validation slice, and a cached function
    giving the fused logits of one patient's (CT slice, MR slice) pair."""
    import torch

    model.eval()

    def heads(ct: NDArray[Any] | None, mr: NDArray[Any] | None) -> FloatArray:
        chunks: list[FloatArray] = []
        rows = (ct if ct is not None else mr)
        assert rows is not None
        with torch.no_grad():
            for start in range(0, rows.shape[0], 64):
                c = (torch.from_numpy(ct[start:start + 64].astype(np.float32))
                     if ct is not None else None)
                m = (torch.from_numpy(mr[start:start + 64].astype(np.float32))
                     if mr is not None else None)
                chunks.append(_fusion_heads(model, c, m)[0].double().numpy())
        return np.concatenate(chunks)

    ct_logits = [heads(p.series["CT"].images, None) for p in patients]
    mr_logits = [heads(None, p.series["MR"].images) for p in patients]
    cache: dict[tuple[int, int, int], FloatArray] = {}

    def fused(patient: int, ct_key: int, mr_key: int) -> FloatArray:
        key = (patient, ct_key, mr_key)
        if key not in cache:
            p = patients[patient]
            cache[key] = heads(p.series["CT"].images[ct_key:ct_key + 1],
                               p.series["MR"].images[mr_key:mr_key + 1])[0]
        return cache[key]

    return ct_logits, mr_logits, fused


def train_fusion_task(task: Task, options: TaskOptions, models_dir: Path, name: str | None,
                      version: str) -> TrainingOutcome:
    """Train the CT + MR fusion network with its proxy heads, calibrate its class logits
    on validation patients in all three modes, export with both CAMs, measure served."""
    import torch

    from dicomnode.inference.package import Metric
    from dicomnode.training.evaluate import evaluate_multiclass
    from dicomnode.training.metrics import wilson_interval

    assert task.model is not None and task.train_config is not None
    started = time.perf_counter()
    if options.data != "phantom":
        raise TrainingRunError(f"task {task.name} trains from --data phantom only")
    _set_threads(options)
    stream = _stream(options)
    n_train, n_val, n_test, matrix = _sizes(options)
    seed, val_seed, test_seed = _seeds(options)
    specs: dict[Modality, PreprocessSpec] = {"CT": ct_spec(options), "MR": mr_spec(options)}
    train = build_patients(seed, n_train, specs, matrix=matrix, keep="sample", stream=stream,
                           what="train")
    val = build_patients(val_seed, n_val, specs, matrix=matrix, keep="all", stream=stream,
                         what="validation")
    config = task.train_config(options)
    train_data = FusionData.of(train, masks=config.localisation_weight > 0)
    val_data = FusionData.of(val)
    torch.manual_seed(options.seed)
    model = task.model(options)
    initialised = _init_encoders(model, models_dir, options, stream)
    if options.freeze_encoders and any(v.startswith("random") for v in initialised.values()):
        raise TrainingRunError("--freeze-encoders needs both encoders initialised from the "
                               f"CT and MR slice models in {models_dir}: {initialised}")
    fitted = fit_fusion(model, train_data, val_data, config, stream,
                        freeze_encoders=options.freeze_encoders)
    class_head = model.class_head
    assert isinstance(class_head, torch.nn.Module)
    class_linear = _last_linear(class_head)

    ct_logits, mr_logits, fused = _fusion_val_logits(model, val)
    y_val = np.array([p.label for p in val], dtype=np.int64)

    def rows_at(factors: FloatArray, shift: FloatArray) -> FloatArray:
        rows: list[FloatArray] = []
        for mode in ("both", "mr", "ct"):
            for i in range(len(val)):
                ct_key = int(np.argmax(tumour_score(ct_logits[i] * factors + shift)))
                mr_key = int(np.argmax(tumour_score(mr_logits[i] * factors + shift)))
                row = (fused(i, ct_key, mr_key) if mode == "both" else
                       mr_logits[i][mr_key] if mode == "mr" else ct_logits[i][ct_key])
                rows.append(row * factors + shift)
        return np.stack(rows)

    calibration = fit_multiclass_calibration(rows_at, np.tile(y_val, 3), len(CLASSES),
                                             seed=options.seed,
                                             groups=np.tile(np.arange(len(val)), 3))
    keys = [(int(np.argmax(tumour_score(calibration.apply(ct_logits[i])))),
             int(np.argmax(tumour_score(calibration.apply(mr_logits[i])))))
            for i in range(len(val))]
    raw_rows = np.stack([fused(i, *keys[i]) for i in range(len(val))])
    fold_calibration(class_linear, calibration)
    with torch.no_grad():
        check = _fusion_heads(
            model, torch.from_numpy(val[0].series["CT"].images[keys[0][0]:keys[0][0] + 1]
                                    .astype(np.float32)),
            torch.from_numpy(val[0].series["MR"].images[keys[0][1]:keys[0][1] + 1]
                             .astype(np.float32)))[0].double().numpy()
    if not np.allclose(check, calibration.apply(raw_rows[:1]), rtol=1e-4, atol=1e-3):
        raise TrainingRunError("folding the calibration did not scale the logits as fitted")
    val_probs = _softmax(calibration.apply(raw_rows))
    val_name = f"validation patients, seed {val_seed} (n={n_val}), CT + MR"
    val_report = _quiet_evaluate(evaluate_multiclass, y_val, val_probs, class_names=CLASSES,
                                 dataset=val_name, n_boot=min(500, options.n_boot),
                                 seed=options.seed)
    _note(stream, f"calibration ({calibration.method}): factors "
                  f"{np.round(calibration.factors, 3).tolist()}, shift "
                  f"{np.round(calibration.shift, 3).tolist()}; validation patients macro AUC "
                  f"{val_report.auc}, ECE {val_report.ece}")

    package_name = name or task.default_package_name
    directory = models_dir / package_name
    checkpoint = directory / TRAINING_DIR / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    training_data = _training_data("CT and MR series of the same patients", options,
                                   int(train_data.ct.shape[0] + train_data.mr.shape[0]))
    provenance: dict[str, Any] = {
        "task": task.name,
        "training": {
            "options": options.to_dict(), "config": config.to_dict(),
            "data_provenance": _data_provenance(options),
            "result": {k: v for k, v in fitted.items() if k != "history"},
            "encoders": initialised,
            "losses": {"class": "class-weighted cross-entropy",
                       "stage": f"cross-entropy on the stage proxy, weight {STAGE_LOSS_WEIGHT}",
                       "risk": f"squared error on the risk proxy, weight {RISK_LOSS_WEIGHT}",
                       "localisation": _localisation_record(
                           config.localisation_weight,
                           (np.concatenate([train_data.ct_masks, train_data.mr_masks])
                            if train_data.ct_masks is not None
                            and train_data.mr_masks is not None else None),
                           "ct_cam / mr_cam of the sample's class (each modality present "
                           "with a tumour mask; their mean)")},
            "samples": "every sampled CT slice paired with a random sampled MR slice of the "
                       "same patient, and every sampled CT and MR slice alone",
            "proxies": {"stage": "equivalent-diameter bins < 2, 2-3, 3-4, >= 4 cm "
                                 "(SYNTHETIC, not a clinical stage)",
                        "risk": "0 healthy; benign 0.5 + 0.25 ln(1 + V); malignant "
                                "2 + 0.5 ln(1 + V) (SYNTHETIC, no survival data)"},
            "calibration": {**calibration.to_dict(),
                            "fitted_on": "validation patients in three modes (CT + MR, "
                                         "MR only, CT only) through the serving rule"},
            "thresholds_from": "validation patients, CT + MR",
        },
        "serving": {
            "input": "a contrast head CT series and/or a T1 post-contrast MR series of one "
                     "patient",
            "series_rule": (
                "for each available series: every slice sorted by sort_datasets, through "
                "its spec (CT: provenance.input_preprocessing.ct; MR: the card's "
                "preprocessing), run with that modality alone (other input zeros, presence "
                "one-hot); its key slice is the slice with the highest logsumexp(benign, "
                "malignant) - healthy. With both series, one more run on the two key slices "
                "with presence (1, 1) gives every output; with one series, its key slice's "
                "outputs are the answer (dicomnode.training.tasks_brain."
                "fusion_series_result). Heat maps: ct_cam / mr_cam channel of the tumour "
                "class the answer favours."),
        },
    }
    card_fields: dict[str, Any] = {"version": version, "metrics": [], "operating_points": [],
                                   "training_data": training_data,
                                   "limitations": list(task.card.limitations)}
    example_ct = torch.from_numpy(val[0].series["CT"].images[:2].astype(np.float32))
    example_mr = torch.from_numpy(val[0].series["MR"].images[:2].astype(np.float32))
    checkpoint_data = {
        "format": FUSION_CHECKPOINT_FORMAT, "task": task.name,
        "options": json.dumps(options.to_dict()), "card": json.dumps(card_fields),
        "provenance": json.dumps(provenance, default=str),
        "specs": json.dumps({"ct": specs["CT"].to_dict(), "mr": specs["MR"].to_dict()}),
        "state_dict": model.state_dict(), "example_ct": example_ct, "example_mr": example_mr,
        "example_presence": torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
    }
    torch.save(checkpoint_data, checkpoint)
    _write_json(directory / TRAINING_DIR / "history.json", fitted)
    _write_json(directory / TRAINING_DIR / "validation_report.json", val_report.to_dict())
    package = export_fusion_checkpoint(checkpoint, models_dir, name=package_name,
                                       version=version)

    served = served_fusion_cases(package, options, stream)
    y_test = np.array([c.label for c in served], dtype=np.int64)
    test_name = (f"held-out test patients, seed {test_seed} (n={n_test}), served package "
                 f"(card specs + ONNX Runtime)")
    rows = {mode: np.array([c.extra[mode] for c in served], dtype=np.float64)
            for mode in ("both", "mr_only", "ct_only")}
    report, metrics, points = multiclass_results(
        (y_val, val_probs), (y_test, _softmax(rows["both"])), output="class_logits",
        options=options, test_name=f"{test_name}, CT + MR", val_name=val_name)
    for mode, prefix in (("mr_only", "mr_only:"), ("ct_only", "ct_only:")):
        _, extra, _ = multiclass_results(
            (y_val, val_probs), (y_test, _softmax(rows[mode])), output="class_logits",
            options=options, test_name=f"{test_name}, {mode.replace('_', ' ')}",
            val_name=val_name, prefix=prefix)
        metrics.extend(extra)
    positives = [c for c in served if c.label > 0]
    metrics.append(heatmap_metric([bool(c.extra["mr_hit"]) for c in positives],
                                  f"{test_name}, CT + MR", where="the MR key slice (mr_cam)",
                                  size=options.size))
    ct_metric = heatmap_metric([bool(c.extra["ct_hit"]) for c in positives],
                               f"{test_name}, CT + MR", where="the CT key slice (ct_cam)",
                               size=options.size)
    metrics.append(dataclasses.replace(ct_metric, name=f"{HEATMAP_METRIC}_ct"))
    stage_true = np.array([stage_proxy(c.volume_cm3) for c in positives])
    stage_pred = np.array([int(c.extra["stage"]) for c in positives])
    for metric_name, hits in (("stage_proxy_accuracy", stage_pred == stage_true),
                              ("stage_proxy_within_one", np.abs(stage_pred - stage_true) <= 1)):
        rate = wilson_interval(int(hits.sum()), int(hits.size))
        metrics.append(Metric(metric_name, rate.value, rate.lower, rate.upper, rate.level,
                              f"SYNTHETIC proxy, not validated; tumour patients; {rate.method}",
                              f"{test_name}, CT + MR"))
    risk_pred = np.array([float(c.extra["risk"]) for c in served])
    risk_true = np.array([risk_proxy(CLASSES[c.label], c.volume_cm3) for c in served])
    value, low, high = _bootstrap(
        lambda i: concordance_index(risk_pred[i], risk_true[i]), len(served),
        n_boot=min(1000, options.n_boot), seed=options.seed)
    metrics.append(Metric("risk_proxy_concordance", value, low, high, 0.95,
                          "SYNTHETIC proxy, not validated; Harrell's C of the risk output "
                          "against the risk proxy over all test patients; percentile "
                          f"bootstrap over patients, seed {options.seed}",
                          f"{test_name}, CT + MR"))
    limitations = [f"Trained and tested on {NOT_CLINICAL}.", *task.card.limitations]
    limitations.extend(f"Evaluation warning: {w}" for w in report.warnings)
    provenance["evaluation"] = {
        "dataset": test_name, "served": True, "sha256": package.sha256,
        "key_slices_with_tumour": {
            "ct": _share([bool(c.extra["ct_key_has_tumour"]) for c in positives]),
            "mr": _share([bool(c.extra["mr_key_has_tumour"]) for c in positives])},
    }
    return _finish_package(package, directory, checkpoint, card_fields, provenance,
                           metrics=metrics, points=points, limitations=limitations,
                           report=report, val_report=val_report, served=served,
                           started=started)


def served_fusion_cases(package: ModelPackage, options: TaskOptions,
                        stream: TextIO | None = None) -> list[ServedCase]:
    """Test patients through the served fusion package (both series of each patient)."""
    _, _, n_test, matrix = _sizes(options)
    _, _, test_seed = _seeds(options)
    provenance = package.card.provenance.get("input_preprocessing", {})
    if not isinstance(provenance, Mapping) or "ct" not in provenance:
        raise TrainingRunError(f"model {package.card.name} names no CT input spec")
    ct_steps = provenance["ct"]
    specs = {"CT": _package_spec(package, ct_steps["steps"], ct_steps["fingerprint"]),
             "MR": _package_spec(package)}
    session = _session(package, options)

    def run(ct: NDArray[np.float32], mr: NDArray[np.float32], presence: NDArray[np.float32]
            ) -> Mapping[str, NDArray[Any]]:
        outputs: Mapping[str, NDArray[Any]] = session.run(
            {"ct": ct, "mr": mr, "presence": presence}).outputs
        return outputs

    cases: list[ServedCase] = []
    started = time.perf_counter()
    for index, label in enumerate(case_labels(test_seed, n_test)):
        case = make_brain_case(test_seed, index, label, matrix=matrix)
        tensors = {m: prepare_series(*case.series(m), specs[m]) for m in ("CT", "MR")}
        result = fusion_series_result(run, tensors["CT"].images, tensors["MR"].images)
        assert result.ct_key is not None and result.mr_key is not None
        assert result.ct_cam is not None and result.mr_cam is not None
        assert result.ct_only is not None and result.mr_only is not None
        ct_mask = tensors["CT"].tumour[result.ct_key]
        mr_mask = tensors["MR"].tumour[result.mr_key]
        tumour = label != "healthy"
        extra = {"both": result.class_logits.tolist(), "mr_only": result.mr_only.tolist(),
                 "ct_only": result.ct_only.tolist(), "ct_key": result.ct_key,
                 "stage": int(np.argmax(result.stage_logits)), "risk": result.risk,
                 "ct_key_has_tumour": bool(ct_mask.any()),
                 "mr_key_has_tumour": bool(mr_mask.any()),
                 "ct_hit": cam_peak_hit(result.ct_cam, ct_mask) if tumour else None,
                 "mr_hit": cam_peak_hit(result.mr_cam, mr_mask) if tumour else None}
        cases.append(ServedCase(case.patient_id, CLASSES.index(label), case.volume_cm3,
                                tuple(result.class_logits.tolist()), result.mr_key,
                                bool(mr_mask.any()), extra["mr_hit"], extra))
        if stream is not None and ((index + 1) % 25 == 0 or index + 1 == n_test):
            _note(stream, f"served evaluation seed {test_seed}: {index + 1}/{n_test} "
                          f"({time.perf_counter() - started:.0f} s)")
    return cases


FUSION_CARD = CardText(
    intended_use=("Sorts a patient's contrast head CT and/or T1 post-contrast brain MR into "
                  "healthy, benign (meningioma-like) or malignant (glioblastoma-like) tumour; "
                  "also emits stage and risk outputs that are SYNTHETIC-PROXY research "
                  "outputs, not validated. " + _NOT_CLINICAL_USE),
    output_meaning=("healthy / benign / malignant logits, calibrated at patient level: the "
                    "softmax is the patient's class probabilities under the card's serving "
                    "rule (provenance.serving)"),
    cam_meaning=("Grad-CAM of each class logit (channels in class order) through the fusion "
                 "head into that modality's encoder, 1/4-resolution grid, scaled to [0, 1] "
                 "per image; zero for an absent modality"),
    input_description="see inputs[].description and provenance.serving",
    limitations=(
        "The stage output is a SYNTHETIC PROXY (tumour size bins named I-IV) and the risk "
        "output a SYNTHETIC PROXY (a formula of class and volume): research outputs on "
        "synthetic proxies, not validated, and not to be shown as a stage or a prognosis.",
        "CT and MR are fused by their key slices, not by registration: the two slices may "
        "show different levels of the head.",
        *_SHARED_LIMITATIONS,
    ),
)

register_task(Task(
    name="brain-tumour",
    summary="healthy / benign / malignant brain tumour from CT, MR or both (fusion, "
            "with proxy stage and risk heads)",
    modality=("CT", "MR"),
    class_names=CLASSES,
    card=FUSION_CARD,
    loss="ce",
    spec=mr_spec,
    datasets={"phantom": _slice_phantoms("MR")},
    model=fusion_model,
    train_config=slice_train_config,
    export_wrapper=_fusion_wrapper,
    trainer=train_fusion_task,
    input_name="mr",
    package_name="brain-tumour-fusion",
))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dicomnode.training.tasks_brain recalibrate DIR --n-calibration N``."""
    import argparse

    parser = argparse.ArgumentParser(prog="tasks_brain")
    sub = parser.add_subparsers(dest="command", required=True)
    recalibrate = sub.add_parser(
        "recalibrate", help="refit a CT / MR slice package's calibration and operating points "
                            "on calibration patients of their own seed, re-measure it served")
    recalibrate.add_argument("package", type=Path)
    recalibrate.add_argument("--n-calibration", type=int, required=True)
    recalibrate.add_argument("--calibration-seed", type=int)
    recalibrate.add_argument("--n-test", type=int, help="test patients (default: as trained)")
    recalibrate.add_argument("--version", help="the package's new version")
    args = parser.parse_args(argv)
    try:
        outcome = recalibrate_slice_package(
            args.package, n_calibration=args.n_calibration,
            calibration_seed=args.calibration_seed, n_test=args.n_test, version=args.version,
            stream=sys.stderr)
    except TrainingRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(outcome.test_report.format_text())
    print(f"wrote {outcome.package.directory} (sha256 {outcome.package.sha256[:12]}...) in "
          f"{outcome.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
