"""The ``metastasis`` task (seed 002): brain metastases on contrast head CT.

Seed 002's design, kept: a single-channel ResNet scores each axial slice (HU → brain
window C40/W80 → z-score), and a patient is as suspicious as their most suspicious slice
(multiple-instance max pooling). What changes here, and why:

* **Slice labels come from the lesion masks.** The phantoms know which slices hold
  lesion voxels, so the slice model is trained with ordinary per-slice BCE (class
  weighted: about one slice in ten is positive). Patient-level max pooling is applied
  where it matters, at evaluation: the card's AUC, ECE and operating points are
  *patient-level*, the Platt map and the F1-optimal threshold are fitted on the
  validation *patients* (with ``--n-calibration N``, on N calibration patients of their
  own seed instead, since the validation patients also choose the epoch), and test
  patients come from a different phantom seed.
* **Training slices are sampled, evaluation slices are not.** Nine slices in ten are
  negative, and the negatives that matter are rare: the calcified pineal gland and
  choroid plexus are bright dots beside the ventricles, just like a small enhancing
  metastasis, yet appear on about one slice per series. Max pooling turns one such
  false-positive slice into a false-positive patient. The training part therefore keeps
  every positive slice, repeats every negative slice that shows a calcification
  (the phantom's tissue labels say which) :data:`MIMIC_REPEAT` times, and keeps a seeded
  :data:`NEGATIVE_FRACTION` of the other negatives; validation and test keep every
  slice once, so the patient-level numbers are about whole series.
* **Splits are by patient by construction.** Train, validation and test are phantom
  sets with their own seeds (and therefore PatientIDs); every slice of a patient is in
  one part, and :class:`~dicomnode.training.datasets.DatasetSplits` proves it.
* **A finer heat map.** ResNet's output stride of 32 would put the CAM on a 4x4 grid at
  128 px, cells far larger than most metastases, so the heat map could never point at
  one. The bundled model is built with ``--output-stride 8`` (the last two stages keep
  their resolution): the exported in-graph Grad-CAM lives on a 16x16 grid.
* **Serving gets the map in one pass.** The package is the slice model with the
  in-graph Grad-CAM (:class:`~dicomnode.training.gradcam.WithCam`); the node runs it
  over a series in batches and pools with
  :func:`dicomnode.inference.aggregate.max_pool_slices`, which also names the slice whose
  map explains the call.

The phantom series are built in memory exactly as ``write_head_ct_study`` writes them
(same random streams, storage and headers), so training reads what the node is sent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileDataset

from dicomnode.imaging import PreprocessSpec
from dicomnode.inference.aggregate import max_pool_slices
from dicomnode.training.commands import (
    CardText,
    Task,
    TaskOptions,
    TrainingRunError,
    classifier_config,
    register_task,
    slice_classifier,
    with_cam,
)

if TYPE_CHECKING:
    from dicomnode.inference.package import Metric, ModelPackage
    from dicomnode.phantoms.head_ct import HeadCtTruth
    from dicomnode.training.datasets import Assemble, DatasetSplits, Sample, SampleSet
    from dicomnode.training.heatmap_eval import HeatmapCase
    from dicomnode.training.loop import TrainConfig

__all__ = [
    "BRAIN_WINDOW",
    "CLASS_NAMES",
    "MIMIC_REPEAT",
    "MIN_LESION_AREA_MM2",
    "NEGATIVE_FRACTION",
    "TRAIN_METASTASIS_FRACTION",
    "HeadCtPhantomReader",
    "HeadCtSeries",
    "head_ct_heatmap_cases",
    "head_ct_phantom_series",
    "head_ct_phantoms",
    "metastasis_heatmap_metrics",
    "metastasis_spec",
    "metastasis_train_config",
    "pool_by_patient",
]

CLASS_NAMES = ("normal", "metastasis")
#: Seed 002's brain window (centre, width) in HU.
BRAIN_WINDOW = (40.0, 80.0)
#: Training only: share of ordinary negative slices kept (seeded per series).
NEGATIVE_FRACTION = 0.3
#: Training only: how often a negative slice showing a calcification (a lesion mimic) is used.
MIMIC_REPEAT = 4
#: Training only: a positive slice whose lesion cross-section is smaller than this (mm²) is
#: left out; a lesion's first or last slice often cuts only its cap (a few voxels), which
#: the model cannot see at its input size, so "positive" there is label noise.
MIN_LESION_AREA_MM2 = 12.0
#: Training only: share of training phantom patients drawn with metastases (validation and
#: test stay balanced, 0.5). Positive slices are the scarce ones (one in ten, fewer still
#: of the hard kinds: hypodense and < 6 mm); the class weighting and the Platt map fitted
#: on the balanced validation patients undo the shifted prevalence.
TRAIN_METASTASIS_FRACTION = 0.8


# --- preprocessing ---------------------------------------------------------------------------


def metastasis_spec(options: TaskOptions) -> PreprocessSpec:
    """HU, the brain window, an area resize to ``--size``, then a per-slice z-score.

    The z-score runs after the resize so its statistics are those of the tensor the
    model sees; the window clips bone and air, so the z-score is not dominated by them.
    """
    size = options.size
    return PreprocessSpec.from_dict([
        {"name": "hounsfield"},
        {"name": "window", "center": BRAIN_WINDOW[0], "width": BRAIN_WINDOW[1]},
        {"name": "resize", "size": [size, size], "interpolation": "area"},
        {"name": "zscore"},
    ])


def metastasis_train_config(options: TaskOptions) -> TrainConfig:
    """The shared classifier recipe, then two shorter stages at 1/3 and 1/10 of the rate.

    At a constant rate the validation loss of this model swings by a factor of two from
    epoch to epoch while the training loss still falls, so the best epoch is luck; each
    lower-rate stage starts from the best weights so far (a step schedule as stages).
    """
    import dataclasses

    from dicomnode.training.loop import decay_stages

    base = classifier_config(options)
    if base.stages:
        return base  # --stages seed002 brings its own schedule
    return dataclasses.replace(base, stages=decay_stages(options.learning_rate,
                                                          options.epochs))


# --- phantom series --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadCtSeries:
    """One phantom patient's axial series (inferior to superior) and its ground truth."""

    patient_id: str
    datasets: tuple[FileDataset, ...]
    truth: HeadCtTruth

    @property
    def slice_labels(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.truth.slice_labels)

    @property
    def lesion_areas_mm2(self) -> tuple[float, ...]:
        """Lesion cross-section of each slice in mm² (0 where the slice has none)."""
        mask = self.truth.lesion_mask
        counts = (mask.reshape(mask.shape[0], -1) > 0).sum(axis=1)
        rows, cols = (float(v) for v in self.datasets[0].PixelSpacing)
        return tuple(float(c) * rows * cols for c in counts)

    @property
    def mimic_slices(self) -> tuple[bool, ...]:
        """Slices showing a calcification (pineal gland, choroid plexus): lesion mimics."""
        from dicomnode.phantoms.head_ct import Tissue

        tissue = self.truth.tissue_labels.reshape(self.truth.tissue_labels.shape[0], -1)
        return tuple(bool(v) for v in (tissue == Tissue.CALCIFICATION).any(axis=1))


def head_ct_labels(seed: int, n: int, metastasis_fraction: float = 0.5) -> list[str]:
    """The labels ``write_head_ct_study(n=n, seed=seed)`` draws for its set."""
    from dicomnode.phantoms import head_ct
    from dicomnode.phantoms.common import balanced_labels, item_rng

    return balanced_labels(item_rng(head_ct.KIND, seed, 0, "labels", n), n, head_ct.LABELS,
                           (1 - metastasis_fraction, metastasis_fraction))


def head_ct_phantom_series(
    seed: int, index: int, n: int, *, matrix: int, labels: Sequence[str] | None = None,
) -> HeadCtSeries:
    """Study ``index`` of ``write_head_ct_study(n=n, seed=seed, matrix=matrix)``, in memory.

    The same random streams in the same order as the writer, so pixels, storage
    (signed/unsigned), headers and PatientID equal the files it writes.
    """
    from dicomnode.phantoms import head_ct
    from dicomnode.phantoms.common import (
        SeriesContext,
        StudyContext,
        item_rng,
        make_identity,
        phantom_uid,
        study_datetime,
    )

    if labels is None:
        labels = head_ct_labels(seed, n)
    kind = head_ct.KIND
    meta = item_rng(kind, seed, index, "meta")
    identity = make_identity(head_ct.CODE, seed, index, meta)
    date, time = study_datetime(meta)
    hu, geometry, truth = head_ct.make_head_ct(head_ct.head_ct_rng(seed, index),
                                               label=labels[index], matrix=matrix)
    representation = int(meta.integers(0, 2))
    study = StudyContext(
        identity=identity,
        study_instance_uid=phantom_uid(kind, seed, index, "study"),
        study_date=date,
        study_time=time,
        accession_number=f"PHHCT{seed % 100000:05d}{index:05d}",
        study_id=f"{index + 1}",
        study_description="CT HEAD W CONTRAST",
    )
    series = SeriesContext(
        series_instance_uid=phantom_uid(kind, seed, index, "series"),
        modality="CT",
        series_number=2,
        series_description="Head CT with contrast",
        body_part_examined="HEAD",
        model_name="phantom-head-ct",
        frame_of_reference_uid=phantom_uid(kind, seed, index, "frame"),
    )
    slices = head_ct.build_ct_slices(hu, geometry, study, series,
                                     head_ct.CtStorage(representation),
                                     uid_parts=(kind, seed, index), contrast=True,
                                     kvp=float(meta.choice([100.0, 120.0])))
    return HeadCtSeries(identity.patient_id, tuple(ds for _, ds in slices), truth)


class HeadCtPhantomReader:
    """Per-slice samples of phantom head CT series made on demand; nothing on disk.

    Listing a set generates each series once to learn its slices' labels; reading keeps
    the last few series, so a pass over a part in order generates each series once more.
    """

    assemble: Assemble = "image"

    def __init__(self, matrix: int, *, keep: int = 2) -> None:
        self.matrix = matrix
        self.keep = keep
        self._labels: dict[int, list[str]] = {}
        self._cache: OrderedDict[tuple[int, int], HeadCtSeries] = OrderedDict()

    def series(self, seed: int, index: int) -> HeadCtSeries:
        labels = self._labels.get(seed)
        if labels is None:
            raise TrainingRunError(f"phantom seed {seed} was not listed by this reader")
        key = (seed, index)
        found = self._cache.get(key)
        if found is None:
            found = head_ct_phantom_series(seed, index, len(labels), matrix=self.matrix,
                                           labels=labels)
            self._cache[key] = found
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return found

    def samples(self, seed: int, n: int, *, negative_fraction: float = 1.0,
                mimic_repeat: int = 1, min_lesion_area_mm2: float = 0.0,
                metastasis_fraction: float = 0.5) -> list[Sample]:
        """Register the set (seed, n) and list its slices as samples.

        With the defaults every slice is one sample. For training, ordinary negative
        slices are kept with probability ``negative_fraction`` (seeded per series),
        negative slices showing a lesion mimic appear ``mimic_repeat`` times (keys
        ``...#1``, ``...#2``; the same slice), and positive slices whose lesion
        cross-section is below ``min_lesion_area_mm2`` are left out (neither label fits).
        ``metastasis_fraction`` is the share of the set's patients drawn with metastases.
        """
        from dicomnode.phantoms.common import item_rng
        from dicomnode.training.datasets import Sample

        if (not 0.0 < negative_fraction <= 1.0 or mimic_repeat < 1 or min_lesion_area_mm2 < 0
                or not 0.0 < metastasis_fraction < 1.0):
            raise TrainingRunError("need 0 < negative_fraction <= 1, mimic_repeat >= 1, "
                                   "min_lesion_area_mm2 >= 0 and 0 < metastasis_fraction < 1")
        labels = head_ct_labels(seed, n, metastasis_fraction)
        if self._labels.setdefault(seed, labels) != labels:
            raise TrainingRunError(f"phantom seed {seed} is already used with another set size "
                                   "or metastasis fraction")
        out: list[Sample] = []
        for index in range(n):
            series = self.series(seed, index)
            draws = item_rng("metastasis-slices", seed, index).random(len(series.datasets))
            areas = series.lesion_areas_mm2 if min_lesion_area_mm2 else None
            for k, (label, mimic) in enumerate(zip(series.slice_labels, series.mimic_slices,
                                                   strict=True)):
                key = f"phantom:{seed}:{index}:{k:03d}"
                copies = 1
                if not label:
                    copies = mimic_repeat if mimic else int(draws[k] < negative_fraction)
                elif areas is not None and areas[k] < min_lesion_area_mm2:
                    copies = 0
                out.extend(Sample(key if r == 0 else f"{key}#{r}", series.patient_id, label,
                                  (), k) for r in range(copies))
        return out

    def read(self, sample: Sample) -> list[Dataset]:
        series = self._series_of(sample)
        assert sample.index is not None
        return [series.datasets[sample.index]]

    def read_mask(self, sample: Sample) -> NDArray[np.bool_] | None:
        """The slice's lesion voxels (every lesion of the series); None where it has none."""
        series = self._series_of(sample)
        assert sample.index is not None
        mask = np.asarray(series.truth.lesion_mask[sample.index] > 0)
        return mask if mask.any() else None

    def _series_of(self, sample: Sample) -> HeadCtSeries:
        parts = sample.key.split("#")[0].split(":")
        if len(parts) != 4 or parts[0] != "phantom" or sample.index is None:
            raise TrainingRunError(f"{sample.key}: not a sample of this reader")
        return self.series(int(parts[1]), int(parts[2]))


def head_ct_phantoms(
    spec: PreprocessSpec,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    val_seed: int | None = None,
    test_seed: int | None = None,
    matrix: int = 256,
    negative_fraction: float = NEGATIVE_FRACTION,
    mimic_repeat: int = MIMIC_REPEAT,
    min_lesion_area_mm2: float = MIN_LESION_AREA_MM2,
    train_metastasis_fraction: float = TRAIN_METASTASIS_FRACTION,
    n_calibration: int = 0,
    calibration_seed: int | None = None,
) -> DatasetSplits:
    """Train, val, test (and calibration) phantom patients, each part its own seed (its
    own patients).

    Training slices are sampled (see the module docstring); validation, calibration and
    test slices are every slice of every series, once.
    """
    from dicomnode.training.datasets import DatasetError, DatasetSplits, SampleSet

    val_seed = seed + 1 if val_seed is None else val_seed
    test_seed = seed + 1000 if test_seed is None else test_seed
    calibration_seed = seed + 2 if calibration_seed is None else calibration_seed
    seeds = [seed, val_seed, test_seed] + ([calibration_seed] if n_calibration else [])
    if len(set(seeds)) != len(seeds):
        raise DatasetError("train, val, test (and calibration) phantoms need different seeds")
    if min(n_train, n_val) < 2 or n_test < 0 or n_calibration < 0:
        raise DatasetError("need at least 2 training and 2 validation phantom patients")
    reader = HeadCtPhantomReader(matrix)
    description = (f"synthetic phantoms, not for clinical use: contrast head CT series from "
                   f"dicomnode.phantoms.head_ct ({matrix}x{matrix}, 24-60 axial slices, "
                   f"metastases 3-30 mm: solid, and from 8 mm also ring and hypodense "
                   f"10-20 HU below white matter), slices labelled from the "
                   f"lesion masks; train seed {seed} (n={n_train} patients, "
                   f"{train_metastasis_fraction:g} with metastases; every positive "
                   f"slice with a lesion cross-section of at least {min_lesion_area_mm2:g} "
                   f"mm2, calcification slices x{mimic_repeat}, {negative_fraction:g} of "
                   f"other negative slices), val seed {val_seed} (n={n_val}), test seed "
                   f"{test_seed} (n={n_test})"
                   + (f", calibration seed {calibration_seed} (n={n_calibration})"
                      if n_calibration else "")
                   + ", half with metastases, every slice")

    def part(name: str, part_seed: int, count: int, sampled: bool = False) -> SampleSet:
        if not count:
            samples: list[Sample] = []
        elif sampled:
            samples = reader.samples(part_seed, count, negative_fraction=negative_fraction,
                                     mimic_repeat=mimic_repeat,
                                     min_lesion_area_mm2=min_lesion_area_mm2,
                                     metastasis_fraction=train_metastasis_fraction)
        else:
            samples = reader.samples(part_seed, count)
        return SampleSet(name, samples, spec, CLASS_NAMES, reader, description=description)

    test = part("test", test_seed, n_test) if n_test else None
    calibration = (part("calibration", calibration_seed, n_calibration) if n_calibration
                   else None)
    patients = {"train": n_train, "val": n_val, "test": n_test}
    part_seeds = {"train": seed, "val": val_seed, "test": test_seed}
    if n_calibration:
        patients["calibration"] = n_calibration
        part_seeds["calibration"] = calibration_seed
    return DatasetSplits(
        part("train", seed, n_train, sampled=True), part("val", val_seed, n_val), test,
        description,
        synthetic=True, sources=("dicomnode.phantoms.head_ct",),
        calibration=calibration,
        provenance={"layout": "phantom", "kind": "head-ct", "size": matrix,
                    "unit": "slice", "patients": patients,
                    "training_slices": {"negative_fraction": negative_fraction,
                                        "mimic_repeat": mimic_repeat,
                                        "min_lesion_area_mm2": min_lesion_area_mm2,
                                        "metastasis_fraction": train_metastasis_fraction},
                    "seeds": part_seeds})


def _phantoms(options: TaskOptions, spec: PreprocessSpec) -> DatasetSplits:
    o = options.resolved()
    assert o.n_val is not None and o.n_test is not None and o.phantom_size is not None
    return head_ct_phantoms(spec, n_train=o.n_train, n_val=o.n_val, n_test=o.n_test,
                            seed=o.seed, val_seed=o.val_seed, test_seed=o.test_seed,
                            matrix=o.phantom_size, n_calibration=o.n_calibration,
                            calibration_seed=o.calibration_seed)


# --- patient-level pooling -------------------------------------------------------------------


def pool_by_patient(samples: SampleSet, values: NDArray[np.float64]
                    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Seed 002's MIL rule on per-slice scores: a patient's score and label are the
    maximum over their slices (patients in sorted order).

    Works on logits and on probabilities alike, since the sigmoid is monotone.
    """
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1 or scores.shape[0] != len(samples):
        raise TrainingRunError(f"need one score per slice: {scores.shape} for "
                               f"{len(samples)} slices")
    rows: dict[str, list[int]] = {}
    for index, sample in enumerate(samples.samples):
        rows.setdefault(sample.patient_id, []).append(index)
    labels = samples.labels
    patients = sorted(rows)
    pooled = np.array([max_pool_slices(scores[rows[p]]).logits[0] for p in patients],
                      dtype=np.float64)
    patient_labels = np.array([int(labels[rows[p]].max()) for p in patients], dtype=np.int64)
    return patient_labels, pooled


# --- heat maps -------------------------------------------------------------------------------


def head_ct_heatmap_cases(seed: int, n: int, *, matrix: int) -> list[HeatmapCase]:
    """Every metastasis patient of the phantom set (seed, n): all slices and their masks."""
    from dicomnode.training.heatmap_eval import HeatmapCase

    labels = head_ct_labels(seed, n)
    cases: list[HeatmapCase] = []
    for index, label in enumerate(labels):
        if label != "metastasis":
            continue
        series = head_ct_phantom_series(seed, index, n, matrix=matrix, labels=labels)
        if not any(series.slice_labels):
            continue  # a draw whose lesions could not be placed is a normal study
        masks = tuple(np.asarray(series.truth.lesion_mask[k] > 0)
                      for k in range(len(series.datasets)))
        cases.append(HeatmapCase(series.patient_id, tuple([ds] for ds in series.datasets),
                                 masks))
    return cases


def metastasis_heatmap_metrics(package: ModelPackage, options: TaskOptions) -> list[Metric]:
    """The card's heat-map metric, on the held-out test phantoms (``test_seed``)."""
    from dicomnode.training.heatmap_eval import phantom_heatmap_metrics

    return phantom_heatmap_metrics(
        package, options, lambda seed, n, size: head_ct_heatmap_cases(seed, n, matrix=size),
        "head CT", "metastasis patients")


def _card_text() -> CardText:
    return CardText(
        intended_use=(
            "Flags contrast head CT series that may contain brain metastases, with a heat map "
            "of the most suspicious slice; research and demonstration only. Not a medical "
            "device; not for clinical use."),
        output_meaning=(
            "metastasis logit of one axial slice; the patient-level logit is the maximum "
            "over the series' slices (dicomnode.inference.aggregate.max_pool_slices) and "
            "its sigmoid is P(metastasis) for the patient; the operating points and "
            "metrics are patient-level"),
        cam_meaning=("Grad-CAM of the slice's metastasis logit (on the trunk's feature grid, "
                     "see the output stride in provenance), scaled to [0, 1] per slice; the "
                     "patient's map is that of the max-scoring slice"),
        input_description=("one axial head CT slice (CT Image Storage, HU via the rescale), "
                            "preprocessed by the card's spec (brain window C40/W80)"),
        limitations=(
            "Axial contrast-enhanced head CT only; lesions smaller than about 5 mm and "
            "hypodense lesions are the ones most often missed.",
            "The phantoms' hypodense (non-enhancing) metastases are 8-30 mm and 10-20 HU "
            "below white matter; smaller ones are enhancing nodules (since 0.6.0, "
            "head_ct.NECROTIC_MIN_DIAMETER_MM). The model was neither trained nor tested "
            "on non-enhancing lesions under 8 mm or subtler than 10 HU: real ones exist "
            "and are better found on MRI.",
            "Patient-level score is the maximum over slices: one false-positive slice "
            "makes a false-positive patient, so long series score higher on average.",
            "Operating points were chosen on patients of their own (validation or "
            "calibration patients, each point names them) and measured on test patients; "
            "re-check them on local data before any use.",
        ),
    )


register_task(Task(
    name="metastasis",
    summary="brain metastasis on head CT, slice model max-pooled per patient (MIL)",
    modality=("CT",),
    class_names=CLASS_NAMES,
    card=_card_text(),
    loss="bce",
    spec=metastasis_spec,
    datasets={"phantom": _phantoms},
    model=slice_classifier,
    train_config=metastasis_train_config,
    export_wrapper=with_cam,
    aggregate=pool_by_patient,
    package_metrics=metastasis_heatmap_metrics,
    package_name="metastasis-ct",
))

