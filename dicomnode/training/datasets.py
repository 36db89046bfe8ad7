"""Training data from the layouts people already have, always through ``apply_spec``.

Four sources, one shape of result (:class:`DatasetSplits`: train / val / test
:class:`SampleSet` s that share a preprocessing spec and class names):

* :func:`class_folder_dataset` — folder per class under train/val/test (the Kaggle
  chest_xray layout of seed 004), DICOM or PNG/JPEG;
* :func:`dicom_csv_dataset` — patient folders of DICOM series plus a labels CSV
  (``patient_id,label[,split]``);
* :func:`nifti_dataset` — BraTS-like NIfTI volumes with segmentation masks;
* :func:`chest_xray_phantoms` — synthetic chest radiographs built in memory as the same
  DICOM instances the phantom writer stores (what the bundled models train on).

Every sample's tensor is ``apply_spec(spec, inputs)``: a PNG is wrapped into a minimal
MONOCHROME2 dataset rather than given its own code path, so a spec that starts at
``modality_lut`` serves DICOM and trains on PNG alike and the card records one spec
(seed 004's model was trained on CLAHE images and served without CLAHE). A sample's raw
input (:meth:`SampleSet.raw`) is available too, so an evaluation can run the *serving*
preprocessing from a model card on exactly the same input.

Every constructor ends by building :class:`DatasetSplits`, whose constructor calls
:func:`~dicomnode.training.splits.check_no_leak`: a patient in two parts is refused.
No torch here: evaluation of an exported model needs none.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO, runtime_checkable

import cv2
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.imaging import PreprocessSpec, apply_spec, sort_datasets
from dicomnode.imaging.spec import SpecInput
from dicomnode.training.splits import (
    PatientSplit,
    SplitError,
    check_no_leak,
    patient_strata,
    stratified_patient_split,
)

if TYPE_CHECKING:
    from dicomnode.phantoms.chest_xray import ChestXrayTruth

__all__ = [
    "DICOM_SUFFIXES",
    "KAGGLE_PATIENT_PATTERN",
    "RASTER_SUFFIXES",
    "Assemble",
    "ChestXrayPhantomReader",
    "DatasetError",
    "DatasetSplits",
    "FileReader",
    "MaskReader",
    "NiftiSliceReader",
    "Sample",
    "SampleReader",
    "SampleSet",
    "assemble_tensor",
    "chest_xray_phantom_instance",
    "chest_xray_phantoms",
    "class_folder_dataset",
    "dicom_csv_dataset",
    "geometric_spec",
    "nifti_dataset",
    "raster_as_dataset",
    "read_raster",
]

Assemble = Literal["image", "stack", "channels"]
"""How a sample's spec output (N, C, H, W) becomes its tensor: ``image`` one image
(C, H, W); ``stack`` all of them (N, C, H, W) (a series); ``channels`` N single-channel
images as the channels (N, H, W) (MR sequences of one slice)."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima", ""})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: Kaggle chest_xray file names: ``person1_bacteria_1.jpeg``, ``IM-0115-0001.jpeg``,
#: ``NORMAL2-IM-1427-0001.jpeg``; everything before the image number is the patient.
KAGGLE_PATIENT_PATTERN = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


class DatasetError(ValueError):
    """The data on disk do not form the dataset asked for; the message says where."""


@dataclass(frozen=True)
class Sample:
    """One training item: whose it is, what it is, and where its pixels come from.

    ``key`` is unique within a dataset and stable across runs (a relative path, or
    ``phantom:<seed>:<index>``); ``index`` is a slice or phantom index where the source
    needs one.
    """

    key: str
    patient_id: str
    label: int
    files: tuple[Path, ...] = ()
    index: int | None = None
    mask_file: Path | None = None


class SampleReader(Protocol):
    """Turns a sample into the input ``apply_spec`` takes (datasets or arrays)."""

    @property
    def assemble(self) -> Assemble: ...

    def read(self, sample: Sample) -> SpecInput: ...


@runtime_checkable
class MaskReader(Protocol):
    """A reader whose samples carry lesion masks (phantoms): the localisation loss's data.

    ``read_mask`` gives a sample's mask (H, W), true on lesion pixels, in the pixel grid
    of the image ``read`` gives (before the spec), or None where there is no lesion.
    Called right after ``read`` of the same sample it should cost nothing.
    """

    def read_mask(self, sample: Sample) -> NDArray[np.bool_] | None: ...


def assemble_tensor(spec: PreprocessSpec, raw: SpecInput, assemble: Assemble) -> np.ndarray:
    """``apply_spec`` and the reshaping ``assemble`` names; the one path to a tensor."""
    out = apply_spec(spec, raw)
    if assemble == "image":
        if out.shape[0] != 1:
            raise DatasetError(
                f"expected one image per sample, the spec produced {out.shape[0]} "
                "(a multi-frame object? use a stack dataset)"
            )
        image: np.ndarray = out[0]
        return image
    if assemble == "channels":
        if out.shape[1] != 1:
            raise DatasetError(f"channels assembly needs 1-channel images; got {out.shape[1]}")
        channels: np.ndarray = out[:, 0]
        return channels
    return out


class SampleSet:
    """One part of a split: samples, the spec, and a cache of their tensors.

    Preprocessing is deterministic, so each sample runs through the spec once and the
    float32 result is kept (augmentation, which is random, is applied later on copies).
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[Sample],
        spec: PreprocessSpec,
        class_names: Sequence[str],
        reader: SampleReader,
        *,
        description: str = "",
        cache: bool = True,
    ) -> None:
        self.name = name
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.spec = spec
        self.class_names = tuple(class_names)
        self.reader = reader
        self.description = description
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        keys = [s.key for s in self.samples]
        if len(set(keys)) != len(keys):
            duplicates = sorted(k for k, c in Counter(keys).items() if c > 1)
            raise DatasetError(f"{name}: duplicate sample keys {duplicates[:3]}")
        for sample in self.samples:
            if not 0 <= sample.label < len(self.class_names):
                raise DatasetError(f"{name}: sample {sample.key} has label {sample.label} "
                                   f"outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.tensor(index), self.samples[index].label

    @property
    def assemble(self) -> Assemble:
        return self.reader.assemble

    @property
    def labels(self) -> NDArray[np.int64]:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def patients(self) -> tuple[str, ...]:
        """Distinct patients, sorted."""
        return tuple(sorted({s.patient_id for s in self.samples}))

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}

    def raw(self, index: int) -> SpecInput:
        """What ``apply_spec`` takes for sample ``index``: the serving path's input."""
        return self.reader.read(self.samples[index])

    def tensor(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        try:
            tensor = assemble_tensor(self.spec, self.reader.read(sample), self.assemble)
        except DatasetError:
            raise
        except Exception as exc:  # name the sample; the imaging error says what
            raise DatasetError(f"{self.name}: sample {sample.key}: {exc}") from exc
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    @property
    def has_masks(self) -> bool:
        return isinstance(self.reader, MaskReader)

    def masks(self, progress: TextIO | None = None) -> NDArray[np.uint8] | None:
        """Every sample's lesion mask at the model input (N, H, W), 0/1, moved by the
        spec's geometric steps (:func:`geometric_spec`, as the heat-map check moves its
        masks); zeros where a sample has none; None when the reader has no masks.

        Reads (and caches) each sample's tensor in the same pass, so called before
        :meth:`arrays` a phantom is generated once for both.
        """
        if not isinstance(self.reader, MaskReader):
            return None
        geometry = geometric_spec(self.spec)
        out: list[NDArray[np.uint8]] = []
        tty = progress is not None and hasattr(progress, "isatty") and progress.isatty()
        for index, sample in enumerate(self.samples):
            shape = self.tensor(index).shape[-2:]
            mask = self.reader.read_mask(sample)
            if mask is None or not mask.any():
                out.append(np.zeros(shape, dtype=np.uint8))
            else:
                moved = apply_spec(geometry, [mask.astype(np.float32)])[0, 0]
                if moved.shape != shape:
                    raise DatasetError(f"{self.name}: sample {sample.key}: mask {moved.shape} "
                                       f"at the input, image {shape}")
                out.append((moved > 0.5).astype(np.uint8))
            done = index + 1 == len(self)
            if progress is not None and (done or (tty and (index + 1) % 64 == 0)):
                start, end = ("\r" if tty else ""), ("\n" if done else "")
                progress.write(f"{start}lesion masks {self.name}: {index + 1}/{len(self)}{end}")
                progress.flush()
        if not out:
            raise DatasetError(f"{self.name}: no samples")
        return np.stack(out)

    def arrays(self, progress: TextIO | None = None) -> tuple[np.ndarray, NDArray[np.int64]]:
        """All tensors stacked (N, ...) as float32, and the labels (N,)."""
        if not self.samples:
            raise DatasetError(f"{self.name}: no samples")
        tensors = []
        tty = progress is not None and hasattr(progress, "isatty") and progress.isatty()
        for index in range(len(self)):
            tensors.append(self.tensor(index))
            done = index + 1 == len(self)
            if progress is not None and (done or (tty and (index + 1) % 64 == 0)):
                start, end = ("\r" if tty else ""), ("\n" if done else "")
                progress.write(f"{start}preprocessing {self.name}: {index + 1}/{len(self)}{end}")
                progress.flush()
        shapes = {t.shape for t in tensors}
        if len(shapes) != 1:
            raise DatasetError(f"{self.name}: samples have different shapes {sorted(shapes)[:3]}"
                               "; a stack dataset needs a fixed number of slices")
        return np.stack(tensors).astype(np.float32, copy=False), self.labels

    def subset(self, indices: Sequence[int], name: str) -> SampleSet:
        """The samples at ``indices`` (cached tensors shared), e.g. one fold."""
        chosen = SampleSet(name, [self.samples[i] for i in indices], self.spec,
                           self.class_names, self.reader, description=self.description,
                           cache=self._cache is not None)
        if self._cache is not None and chosen._cache is not None:
            for new, old in enumerate(indices):
                if old in self._cache:
                    chosen._cache[new] = self._cache[old]
        return chosen

    def describe(self) -> dict[str, Any]:
        return {"samples": len(self), "patients": len(self.patients),
                "classes": self.class_counts()}


@dataclass(frozen=True)
class DatasetSplits:
    """Train / val / (test) parts over disjoint patients, one spec, one class list.

    ``calibration``, where the data have one, is a fourth set of patients on which the
    calibration map and the operating points are fitted instead of on ``val`` (which also
    picks the best epoch).
    """

    train: SampleSet
    val: SampleSet
    test: SampleSet | None
    description: str
    synthetic: bool = False
    sources: tuple[str, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    calibration: SampleSet | None = None

    def __post_init__(self) -> None:
        parts = self.parts()
        check_no_leak({name: part.samples for name, part in parts.items()},
                      lambda sample: sample.patient_id)
        names = {part.class_names for part in parts.values()}
        if len(names) != 1:
            raise DatasetError(f"the parts disagree on class names: {sorted(names)}")
        fingerprints = {part.spec.fingerprint for part in parts.values()}
        if len(fingerprints) != 1:
            raise DatasetError("the parts were built with different preprocessing specs")
        if len(self.train) == 0:
            raise DatasetError("the training part is empty")

    def parts(self) -> dict[str, SampleSet]:
        found = {"train": self.train, "val": self.val}
        if self.test is not None:
            found["test"] = self.test
        if self.calibration is not None:
            found["calibration"] = self.calibration
        return found

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def spec(self) -> PreprocessSpec:
        return self.train.spec

    def cases(self) -> dict[str, int]:
        """Samples per part, for the model card."""
        return {name: len(part) for name, part in self.parts().items()}

    def describe(self) -> dict[str, Any]:
        return {"description": self.description, "synthetic": self.synthetic,
                "sources": list(self.sources),
                "parts": {name: part.describe() for name, part in self.parts().items()}}


# --- reading files ------------------------------------------------------------------------


def read_raster(path: Path) -> np.ndarray:
    """A PNG/JPEG/... as one grey channel, keeping 16-bit depth where the file has it."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise DatasetError(f"{path}: not a readable image")
    if image.ndim != 2:
        raise DatasetError(f"{path}: expected a grey image; got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{path}: unsupported pixel type {image.dtype}")
    return np.ascontiguousarray(image)


def raster_as_dataset(pixels: np.ndarray, *, patient_id: str = "") -> Dataset:
    """Wrap grey 8/16-bit pixels as a minimal MONOCHROME2 dataset for a DICOM spec.

    Stored values are the file's values with no rescale, so ``modality_lut`` returns them
    unchanged and the rest of the spec treats the image as it would a CR without a
    Modality LUT.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"expected 2-D uint8/uint16 pixels; got {pixels.dtype} {pixels.shape}")
    bits = 8 * pixels.dtype.itemsize
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(d) for d in pixels.shape)
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(f"<u{pixels.dtype.itemsize}").tobytes()
    return ds


def _is_dicom_name(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def _header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["PatientID", "SeriesInstanceUID", "Modality"])
    except (InvalidDicomError, OSError, EOFError):
        return None


@dataclass(frozen=True)
class FileReader:
    """DICOM files (sorted into slice order for a stack) or raster images."""

    assemble: Assemble = "image"

    def read(self, sample: Sample) -> list[Dataset]:
        datasets: list[Dataset] = []
        for path in sample.files:
            if path.suffix.lower() in RASTER_SUFFIXES:
                datasets.append(raster_as_dataset(read_raster(path),
                                                  patient_id=sample.patient_id))
            else:
                datasets.append(pydicom.dcmread(path))
        if self.assemble == "stack" and len(datasets) > 1:
            datasets = sort_datasets(datasets)
        return datasets


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in
                                             p.relative_to(folder).parts))


# --- folder per class -------------------------------------------------------------------


def _match_classes(found: Sequence[str], classes: Sequence[str] | None, where: Path
                   ) -> dict[str, int]:
    """Folder name -> label index, case-insensitively against ``classes`` when given."""
    if classes is None:
        ordered = sorted(found, key=str.lower)
        return {name: i for i, name in enumerate(ordered)}
    wanted = {c.lower(): i for i, c in enumerate(classes)}
    mapping: dict[str, int] = {}
    for name in found:
        if name.lower() not in wanted:
            raise DatasetError(f"{where / name}: folder is not one of the classes {list(classes)}")
        mapping[name] = wanted[name.lower()]
    return mapping


def _patient_from_name(stem: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is not None:
        match = pattern.search(stem)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return stem


def class_folder_dataset(
    root: Path | str,
    spec: PreprocessSpec,
    *,
    classes: Sequence[str] | None = None,
    patient_pattern: str | None = KAGGLE_PATIENT_PATTERN,
    resplit: bool = False,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    require_test: bool = False,
) -> DatasetSplits:
    """``root/{train,val,test}/<class>/<files>`` (seed 004's Kaggle chest_xray layout).

    DICOM files take their patient from PatientID; raster files from ``patient_pattern``
    (a regular expression on the file stem, group 1 if it has one) or, failing a match,
    the stem itself. A missing ``val`` folder is cut from train by patient;
    ``resplit`` pools every folder and makes a fresh stratified patient-level split —
    the Kaggle set's 16-image val folder is too small to pick thresholds or stop on.
    A patient found in two of the given folders is refused (:class:`PatientLeakError`).
    """
    base = Path(root)
    if not (base / "train").is_dir():
        raise DatasetError(f"{base}: no train/ folder (expected train/val/test/<class>/)")
    compiled = re.compile(patient_pattern) if patient_pattern else None
    part_dirs = {name: base / name for name in ("train", "val", "test")
                 if (base / name).is_dir()}
    class_folders = sorted({p.name for d in part_dirs.values() for p in d.iterdir()
                            if p.is_dir() and not p.name.startswith(".")})
    if len(class_folders) < 2:
        raise DatasetError(f"{base}: need at least two class folders; found {class_folders}")
    label_of = _match_classes(class_folders, classes, base)
    class_names = tuple(classes) if classes is not None else tuple(
        sorted(class_folders, key=str.lower))
    skipped = 0
    by_part: dict[str, list[Sample]] = {}
    for part, directory in part_dirs.items():
        samples: list[Sample] = []
        for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()
                                and not p.name.startswith(".")):
            label = label_of[class_dir.name]
            for path in _visible_files(class_dir):
                suffix = path.suffix.lower()
                if suffix in RASTER_SUFFIXES:
                    patient = _patient_from_name(path.stem, compiled)
                elif _is_dicom_name(path):
                    header = _header(path)
                    if header is None:
                        skipped += 1
                        continue
                    patient = str(header.get("PatientID", "") or "") or _patient_from_name(
                        path.stem, compiled)
                else:
                    skipped += 1
                    continue
                samples.append(Sample(path.relative_to(base).as_posix(), patient, label,
                                      (path,)))
        by_part[part] = samples
    if not by_part.get("train"):
        raise DatasetError(f"{base / 'train'}: no images found")
    if require_test and not by_part.get("test"):
        raise DatasetError(f"{base}: no test/ images")
    reader = FileReader("image")
    description = f"class folders under {base.name}/ ({', '.join(class_names)})"
    if skipped:
        description += f"; {skipped} unreadable or non-image file(s) skipped"
    if resplit or not by_part.get("val"):
        pooled = [s for samples in by_part.values() for s in samples]
        if not resplit:  # only val is missing: keep the given test set
            pooled = list(by_part["train"])
        strata = patient_strata(pooled, lambda s: s.patient_id, lambda s: s.label)
        has_test = resplit or not by_part.get("test")
        wanted = tuple(fractions) if has_test else (fractions[0] / (fractions[0] + fractions[1]),
                                                    fractions[1] / (fractions[0] + fractions[1]),
                                                    0.0)
        split = _split_or_explain(strata, wanted, seed)
        part_of = split.part_of()
        regrouped: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for sample in pooled:
            regrouped[part_of[sample.patient_id]].append(sample)
        if not has_test:
            regrouped["test"] = by_part.get("test", [])
        by_part = regrouped
        description += (f"; re-split by patient (seed {seed}, fractions "
                        f"{[round(f, 3) for f in wanted]})")
    return _splits(by_part, spec, class_names, reader, description,
                   sources=(str(base),), provenance={"layout": "class-folders",
                                                     "resplit": resplit, "seed": seed})


def _split_or_explain(strata: Mapping[str, int], fractions: Sequence[float], seed: int
                      ) -> PatientSplit:
    try:
        return stratified_patient_split(strata, fractions=fractions, seed=seed)
    except SplitError as exc:
        raise DatasetError(str(exc)) from exc


def _splits(
    by_part: Mapping[str, Sequence[Sample]],
    spec: PreprocessSpec,
    class_names: Sequence[str],
    reader: SampleReader,
    description: str,
    *,
    synthetic: bool = False,
    sources: tuple[str, ...] = (),
    provenance: Mapping[str, Any] | None = None,
) -> DatasetSplits:
    def part(name: str) -> SampleSet:
        return SampleSet(name, by_part.get(name, ()), spec, class_names, reader,
                         description=description)

    test = part("test") if by_part.get("test") else None
    return DatasetSplits(part("train"), part("val"), test, description, synthetic, sources,
                         dict(provenance or {}))


# --- DICOM patient folders + labels CSV ---------------------------------------------------


def _read_label_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "patient_id" not in fields or "label" not in fields:
                raise DatasetError(f"{path}: needs columns patient_id,label[,split]; "
                                   f"has {reader.fieldnames}")
            rows = []
            for line, row in enumerate(reader, start=2):
                clean = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                if not clean.get("patient_id"):
                    raise DatasetError(f"{path}:{line}: empty patient_id")
                rows.append(clean)
            return rows
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read labels ({exc})") from exc


_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


def dicom_csv_dataset(
    root: Path | str,
    labels_csv: Path | str,
    spec: PreprocessSpec,
    *,
    classes: Sequence[str] | None = None,
    assemble: Assemble = "image",
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> DatasetSplits:
    """``root/<patient_id>/**`` DICOM files with labels per patient in a CSV.

    With ``assemble="image"`` every single-frame instance is a sample; with ``"stack"``
    every series (grouped by SeriesInstanceUID, sorted into slice order) is one. The
    CSV's optional ``split`` column (train/val/test) is used as given; without it the
    patients are split here, stratified and seeded. The patient is the folder, which
    must lie inside ``root``.
    """
    base = Path(root).resolve()
    rows = _read_label_rows(Path(labels_csv))
    if not rows:
        raise DatasetError(f"{labels_csv}: no patients")
    raw_labels = sorted({r["label"] for r in rows})
    names = tuple(classes) if classes is not None else tuple(raw_labels)
    index_of = {c.lower(): i for i, c in enumerate(names)}
    labels: dict[str, int] = {}
    given_split: dict[str, str] = {}
    for row in rows:
        patient = row["patient_id"]
        value = row["label"]
        if value.lower() in index_of:
            label = index_of[value.lower()]
        elif value.isdigit() and int(value) < len(names) and classes is not None:
            label = int(value)
        else:
            raise DatasetError(f"{labels_csv}: patient {patient} has label {value!r}, "
                               f"not one of {list(names)}")
        if patient in labels and labels[patient] != label:
            raise DatasetError(f"{labels_csv}: patient {patient} has conflicting labels")
        labels[patient] = label
        if row.get("split"):
            part = _SPLIT_ALIASES.get(row["split"].lower())
            if part is None:
                raise DatasetError(f"{labels_csv}: patient {patient} has split "
                                   f"{row['split']!r}; use train, val or test")
            given_split[patient] = part
    if given_split and len(given_split) != len(labels):
        raise DatasetError(f"{labels_csv}: the split column is filled for some patients only")
    missing = []
    samples_of: dict[str, list[Sample]] = {}
    for patient, label in sorted(labels.items()):
        folder = (base / patient).resolve()
        if not folder.is_relative_to(base) or not folder.is_dir():
            missing.append(patient)
            continue
        samples_of[patient] = _patient_samples(base, folder, patient, label, assemble)
    if missing:
        raise DatasetError(f"{len(missing)} patient folder(s) from the CSV are missing under "
                           f"{base}, e.g. {missing[:3]}")
    part_of = given_split or _split_or_explain(labels, fractions, seed).part_of()
    by_part: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for patient, samples in samples_of.items():
        by_part[part_of[patient]].extend(samples)
    unit = "instances" if assemble == "image" else "series"
    description = (f"DICOM {unit} in patient folders under {base.name}/, labels from "
                   f"{Path(labels_csv).name}")
    return _splits(by_part, spec, names, FileReader(assemble), description,
                   sources=(str(base), str(labels_csv)),
                   provenance={"layout": "dicom-csv", "split": "csv" if given_split else
                               f"stratified by patient, seed {seed}"})


def _patient_samples(base: Path, folder: Path, patient: str, label: int, assemble: Assemble
                     ) -> list[Sample]:
    series: dict[str, list[Path]] = {}
    for path in _visible_files(folder):
        header = _header(path)
        if header is None:
            continue
        series.setdefault(str(header.get("SeriesInstanceUID", path.parent)), []).append(path)
    if not series:
        raise DatasetError(f"{folder}: no DICOM files for patient {patient}")
    samples: list[Sample] = []
    for _, paths in sorted(series.items(), key=lambda item: item[1][0]):
        if assemble == "stack":
            key = paths[0].parent.relative_to(base).as_posix() + f"#{len(samples)}"
            samples.append(Sample(key, patient, label, tuple(paths)))
        else:
            samples.extend(Sample(p.relative_to(base).as_posix(), patient, label, (p,))
                           for p in paths)
    return samples


# --- NIfTI volumes with masks (BraTS-like) ------------------------------------------------


class NiftiSliceReader:
    """Axial slices of one or more co-registered NIfTI volumes per case (SimpleITK).

    A slice sample reads the same slice of every sequence and returns them as arrays,
    assembled as channels. Volumes are cached per case (samples of one case are
    consecutive), so a pass over a dataset decompresses each file once.
    """

    assemble: Assemble = "channels"

    def __init__(self, cache_cases: int = 2) -> None:
        self._cache: dict[tuple[Path, ...], list[np.ndarray]] = {}
        self._order: list[tuple[Path, ...]] = []
        self._limit = max(1, cache_cases)

    def volumes(self, files: tuple[Path, ...]) -> list[np.ndarray]:
        if files not in self._cache:
            self._cache[files] = [read_nifti(f) for f in files]
            self._order.append(files)
            while len(self._order) > self._limit:
                self._cache.pop(self._order.pop(0), None)
        return self._cache[files]

    def read(self, sample: Sample) -> list[np.ndarray]:
        if sample.index is None:
            raise DatasetError(f"{sample.key}: a NIfTI slice sample needs a slice index")
        return [np.ascontiguousarray(v[sample.index]) for v in self.volumes(sample.files)]


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI volume as (slices, rows, columns) float64 via SimpleITK."""
    import SimpleITK as sitk  # noqa: N813

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DatasetError(f"{path}: cannot read NIfTI ({exc})") from exc
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D volume; got shape {array.shape}")
    return np.asarray(array, dtype=np.float64)


def _nifti_file(case_dir: Path, case: str, suffix: str) -> Path | None:
    for extension in (".nii.gz", ".nii"):
        candidate = case_dir / f"{case}_{suffix}{extension}"
        if candidate.is_file():
            return candidate
    return None


def geometric_spec(spec: PreprocessSpec) -> PreprocessSpec:
    """The spec's geometric steps only, nearest-neighbour: how a mask follows its image.

    Only resize, crop and pad_or_crop move pixels; intensity steps must not touch label
    values, and interpolation must not invent labels between two classes.
    """
    steps: list[dict[str, Any]] = []
    for step in spec.steps:
        data = step.to_dict()
        if data["name"] == "resize":
            steps.append({**data, "interpolation": "nearest", "pad_value": 0.0})
        elif data["name"] in ("crop", "pad_or_crop"):
            steps.append({**data, "pad_value": 0.0} if "pad_value" in data else data)
    if not steps:
        raise DatasetError("the spec has no geometric step; masks need a resize or crop")
    return PreprocessSpec.from_dict(steps)


def nifti_dataset(
    root: Path | str,
    spec: PreprocessSpec,
    *,
    sequences: Sequence[str] = ("t1ce",),
    mask_suffix: str = "seg",
    case_labels: Mapping[str, int] | None = None,
    class_names: Sequence[str] = ("no-tumour", "tumour"),
    min_mask_pixels: int = 1,
    slice_stride: int = 1,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> DatasetSplits:
    """Axial slices of ``root/<case>/<case>_<sequence>.nii.gz`` with ``<case>_seg.nii.gz``.

    Each kept slice is a sample whose channels are ``sequences``; its label is
    ``case_labels[case]`` when given, else 1 when the mask has at least
    ``min_mask_pixels`` labelled pixels in the slice. Cases (patients) are split,
    stratified by whether any of their slices is positive. ``spec`` must take arrays
    (no source step): NIfTI has no DICOM header to read. The spec runs on each
    sequence's slice separately, so per-image steps (z-score) normalise each sequence
    on its own.
    """
    if spec.input_kind != "arrays":
        raise DatasetError("NIfTI slices are arrays: use a spec without modality_lut/hounsfield")
    if slice_stride < 1:
        raise DatasetError("slice_stride must be >= 1")
    base = Path(root)
    cases = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise DatasetError(f"{base}: no case folders")
    samples: list[Sample] = []
    for case_dir in cases:
        case = case_dir.name
        files = []
        for sequence in sequences:
            found = _nifti_file(case_dir, case, sequence)
            if found is None:
                raise DatasetError(f"{case_dir}: no {case}_{sequence}.nii.gz")
            files.append(found)
        mask_file = _nifti_file(case_dir, case, mask_suffix)
        if mask_file is None and case_labels is None:
            raise DatasetError(f"{case_dir}: no {case}_{mask_suffix}.nii.gz to derive labels")
        mask = read_nifti(mask_file) if mask_file is not None else None
        n_slices = mask.shape[0] if mask is not None else read_nifti(files[0]).shape[0]
        for z in range(0, n_slices, slice_stride):
            if case_labels is not None:
                if case not in case_labels:
                    raise DatasetError(f"case {case} has no label")
                label = int(case_labels[case])
            else:
                assert mask is not None
                label = int(np.count_nonzero(mask[z]) >= min_mask_pixels)
            samples.append(Sample(f"{case}#{z:04d}", case, label, tuple(files), z, mask_file))
    strata = patient_strata(samples, lambda s: s.patient_id, lambda s: s.label)
    part_of = _split_or_explain(strata, fractions, seed).part_of()
    by_part: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for sample in samples:
        by_part[part_of[sample.patient_id]].append(sample)
    description = (f"NIfTI volumes ({', '.join(sequences)}) with masks under {base.name}/, "
                   f"axial slices every {slice_stride}")
    return _splits(by_part, spec, class_names, NiftiSliceReader(), description,
                   sources=(str(base),), provenance={"layout": "nifti", "seed": seed})


def nifti_mask(sample: Sample, spec: PreprocessSpec) -> NDArray[np.uint8]:
    """The sample's mask slice through the spec's geometry (:func:`geometric_spec`)."""
    if sample.mask_file is None or sample.index is None:
        raise DatasetError(f"{sample.key}: no mask")
    mask = read_nifti(sample.mask_file)[sample.index]
    out = apply_spec(geometric_spec(spec), [mask])
    labels: NDArray[np.uint8] = np.rint(out[0, 0]).astype(np.uint8)
    return labels


# --- phantoms -------------------------------------------------------------------------------


def chest_xray_phantom_instance(
    seed: int, index: int, n: int, *, size: int, labels: Sequence[str] | None = None,
    pneumonia_fraction: float = 0.5,
) -> tuple[FileDataset, str]:
    """Instance ``index`` of the set ``write_chest_xray_study(n=n, seed=seed, size=size)``
    writes, built in memory, and its label.

    The same random streams as the writer, so the pixels, storage (MONOCHROME1/2, bit
    depth, rescale) and PatientID equal the file's; training sees every encoding the
    node will be sent.
    """
    ds, truth = _chest_xray_phantom(seed, index, n, size=size, labels=labels,
                                    pneumonia_fraction=pneumonia_fraction)
    return ds, truth.label


def _chest_xray_phantom(
    seed: int, index: int, n: int, *, size: int, labels: Sequence[str] | None,
    pneumonia_fraction: float,
) -> tuple[FileDataset, ChestXrayTruth]:
    from dicomnode.phantoms import chest_xray as cxr
    from dicomnode.phantoms.common import (
        SeriesContext,
        StudyContext,
        balanced_labels,
        item_rng,
        make_identity,
        phantom_uid,
        study_datetime,
    )

    if labels is None:
        labels = balanced_labels(item_rng(cxr.KIND, seed, 0, "labels", n), n, cxr.LABELS,
                                 (1 - pneumonia_fraction, pneumonia_fraction))
    meta_rng = item_rng(cxr.KIND, seed, index, "meta")
    identity = make_identity(cxr.CODE, seed, index, meta_rng)
    date, time = study_datetime(meta_rng)
    image, geometry, truth = cxr.make_chest_xray(
        cxr.chest_xray_rng(seed, index), label=labels[index], size=size
    )
    storage = cxr._draw_storage(item_rng(cxr.KIND, seed, index, "storage"), None, None, None,
                                None)
    study = StudyContext(
        identity=identity,
        study_instance_uid=phantom_uid(cxr.KIND, seed, index, "study"),
        study_date=date,
        study_time=time,
        accession_number=f"PHCXR{seed % 100000:05d}{index:05d}",
        study_id=f"{index + 1}",
        study_description="XR CHEST " + geometry.view_position,
    )
    series = SeriesContext(
        series_instance_uid=phantom_uid(cxr.KIND, seed, index, "series"),
        modality=storage.sop_class,
        series_number=1,
        series_description=f"Chest {geometry.view_position}",
        body_part_examined="CHEST",
        model_name="phantom-chest-xray",
    )
    ds = cxr.build_chest_xray_dataset(image, geometry, storage, study, series,
                                      phantom_uid(cxr.KIND, seed, index, "image"), meta_rng)
    return ds, truth


class ChestXrayPhantomReader:
    """Phantom chest radiographs made on demand from (seed, index); nothing on disk.

    A set is (seed, n): the writer balances labels over the whole set, so the reader
    remembers each seed's set size.
    """

    assemble: Assemble = "image"

    def __init__(self, size: int, pneumonia_fraction: float = 0.5) -> None:
        self.size = size
        self.pneumonia_fraction = pneumonia_fraction
        self._sets: dict[int, list[str]] = {}
        self._last_mask: tuple[str, NDArray[np.bool_]] | None = None

    def samples(self, seed: int, n: int) -> list[Sample]:
        """Register the set (seed, n) and list its samples."""
        from dicomnode.phantoms.chest_xray import CODE, KIND, LABELS
        from dicomnode.phantoms.common import balanced_labels, item_rng

        labels = balanced_labels(item_rng(KIND, seed, 0, "labels", n), n, LABELS,
                                 (1 - self.pneumonia_fraction, self.pneumonia_fraction))
        if self._sets.setdefault(seed, labels) != labels:
            raise DatasetError(f"phantom seed {seed} is already used with another set size")
        return [Sample(f"phantom:{seed}:{i}", f"PH-{CODE}-{seed}-{i:04d}", LABELS.index(label),
                       (), i) for i, label in enumerate(labels)]

    def read(self, sample: Sample) -> list[Dataset]:
        seed = int(sample.key.split(":")[1])
        labels = self._sets.get(seed)
        if labels is None or sample.index is None:
            raise DatasetError(f"{sample.key}: not a sample of this reader")
        ds, truth = _chest_xray_phantom(seed, sample.index, len(labels), size=self.size,
                                        labels=labels,
                                        pneumonia_fraction=self.pneumonia_fraction)
        self._last_mask = (sample.key, np.asarray(truth.lesion_mask > 0))
        return [ds]

    def read_mask(self, sample: Sample) -> NDArray[np.bool_] | None:
        """The union of the consolidations (the heat-map check's truth); None if none."""
        if self._last_mask is None or self._last_mask[0] != sample.key:
            self.read(sample)
        assert self._last_mask is not None
        mask = self._last_mask[1]
        return mask if mask.any() else None


def chest_xray_phantoms(
    spec: PreprocessSpec,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    val_seed: int | None = None,
    test_seed: int | None = None,
    size: int = 128,
    pneumonia_fraction: float = 0.5,
) -> DatasetSplits:
    """Train, val and test phantom sets, each its own seed (so its own patients).

    The test set uses a different seed from training (default ``seed + 1000``); the
    phantom PatientIDs carry the seed, so the leak check proves the sets disjoint.
    """
    from dicomnode.phantoms.chest_xray import LABELS

    val_seed = seed + 1 if val_seed is None else val_seed
    test_seed = seed + 1000 if test_seed is None else test_seed
    if len({seed, val_seed, test_seed}) != 3:
        raise DatasetError("train, val and test phantoms need three different seeds")
    if min(n_train, n_val) < 2 or n_test < 0:
        raise DatasetError("need at least 2 training and 2 validation phantoms")
    reader = ChestXrayPhantomReader(size, pneumonia_fraction)
    by_part = {"train": reader.samples(seed, n_train), "val": reader.samples(val_seed, n_val),
               "test": reader.samples(test_seed, n_test) if n_test else []}
    description = (f"synthetic phantoms, not for clinical use: chest radiographs from "
                   f"dicomnode.phantoms.chest_xray ({size}x{size} px, CR/DX encodings); train "
                   f"seed {seed} (n={n_train}), val seed {val_seed} (n={n_val}), test seed "
                   f"{test_seed} (n={n_test})")
    return _splits(by_part, spec, tuple(LABELS), reader, description, synthetic=True,
                   sources=("dicomnode.phantoms.chest_xray",),
                   provenance={"layout": "phantom", "kind": "chest-xray", "size": size,
                               "seeds": {"train": seed, "val": val_seed, "test": test_seed}})

