"""Patient-level, seeded, stratified splits, and the check that refuses a leaking one.

Slices or images of one patient are far more alike than images of two patients; a split
by image puts near-copies on both sides and the test set measures memory, not skill.
Everything here therefore splits *patient identifiers*, and `check_no_leak` is called by
every dataset constructor so a split with a patient in two parts cannot be trained on.
Randomness comes from a seed only, and patients are sorted before shuffling, so the same
labels and seed give the same split whatever order the files were listed in.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

__all__ = [
    "PART_NAMES",
    "Fold",
    "PatientLeakError",
    "PatientSplit",
    "SplitError",
    "check_no_leak",
    "patient_strata",
    "stratified_k_fold",
    "stratified_patient_split",
]

T = TypeVar("T")
PART_NAMES = ("train", "val", "test")


class SplitError(ValueError):
    """A split cannot be made as asked (too few patients, bad fractions, bad labels)."""


class PatientLeakError(SplitError):
    """A patient appears in more than one part of a split."""

    def __init__(self, leaks: Mapping[str, tuple[str, ...]]) -> None:
        self.leaks = dict(leaks)
        shown = ", ".join(f"{p} ({' + '.join(parts)})" for p, parts in list(leaks.items())[:3])
        more = f" and {len(leaks) - 3} more" if len(leaks) > 3 else ""
        super().__init__(
            f"{len(leaks)} patient(s) appear in more than one part of the split: {shown}{more}. "
            "Split by patient, never by image or slice: images of one patient on both sides "
            "make the held-out metrics measure memory"
        )


@dataclass(frozen=True)
class PatientSplit:
    """Patient identifiers per part; a part may be empty (no test set)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_no_leak(self.parts(), lambda patient: patient)

    def parts(self) -> dict[str, tuple[str, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def part_of(self) -> dict[str, str]:
        """Patient -> part name."""
        return {p: name for name, members in self.parts().items() for p in members}


@dataclass(frozen=True)
class Fold:
    """One fold of a k-fold split: train on ``train``, evaluate on ``val``."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]

    def __post_init__(self) -> None:
        check_no_leak({"train": self.train, "val": self.val}, lambda patient: patient)


def check_no_leak(
    splits: Mapping[str, Iterable[T]],
    patient_of: Callable[[T], str] | Mapping[T, str],
) -> None:
    """Raise :class:`PatientLeakError` if any patient's items sit in two parts.

    ``splits`` maps a part name to its items (samples, file names, patient IDs);
    ``patient_of`` gives an item's patient, as a function or a mapping.
    """
    lookup: Callable[[T], str]
    if isinstance(patient_of, Mapping):
        table = patient_of

        def lookup(item: T) -> str:
            return table[item]
    else:
        lookup = patient_of
    where: dict[str, list[str]] = {}
    for part, items in splits.items():
        for item in items:
            parts = where.setdefault(str(lookup(item)), [])
            if part not in parts:
                parts.append(part)
    leaks = {p: tuple(parts) for p, parts in sorted(where.items()) if len(parts) > 1}
    if leaks:
        raise PatientLeakError(leaks)


def patient_strata(
    items: Iterable[T], patient_of: Callable[[T], str], label_of: Callable[[T], int]
) -> dict[str, int]:
    """One stratum per patient: the largest label among the patient's items.

    For "finding present" labels the largest is "any image positive", which is the
    patient's label; an image-level multi-class set is stratified by its highest class.
    """
    strata: dict[str, int] = {}
    for item in items:
        patient = patient_of(item)
        label = int(label_of(item))
        strata[patient] = max(label, strata.get(patient, label))
    return strata


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0) or f[0] <= 0:
        raise SplitError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1 "
            f"with train > 0; got {list(fractions)}"
        )
    return f


def _allocate(n: int, fractions: np.ndarray) -> np.ndarray:
    """Largest-remainder counts; every part with a positive fraction gets one if n allows."""
    exact = fractions * n
    counts: np.ndarray = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    wanted = np.flatnonzero(fractions > 0)
    if n >= wanted.size:
        for i in wanted:
            if counts[i] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _grouped(patient_labels: Mapping[str, Hashable]) -> list[list[str]]:
    by_label: dict[Hashable, list[str]] = {}
    for patient in sorted(patient_labels):
        by_label.setdefault(patient_labels[patient], []).append(patient)
    return [by_label[key] for key in sorted(by_label, key=repr)]


def stratified_patient_split(
    patient_labels: Mapping[str, Hashable],
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> PatientSplit:
    """Split patients into train/val/test keeping each label's share in every part."""
    f = _check_fractions(fractions)
    if not patient_labels:
        raise SplitError("no patients to split")
    rng = np.random.default_rng(seed)
    parts: list[list[str]] = [[], [], []]
    for group in _grouped(patient_labels):
        shuffled = [group[i] for i in rng.permutation(len(group))]
        counts = _allocate(len(shuffled), f)
        start = 0
        for part, count in zip(parts, counts, strict=True):
            part.extend(shuffled[start : start + int(count)])
            start += int(count)
    if not parts[0]:
        raise SplitError("the training part would be empty")
    return PatientSplit(*(tuple(sorted(p)) for p in parts))


def stratified_k_fold(
    patient_labels: Mapping[str, Hashable], k: int, *, seed: int = 0
) -> tuple[Fold, ...]:
    """k folds over patients, each label dealt round-robin so folds stay balanced."""
    if k < 2:
        raise SplitError(f"k must be at least 2; got {k}")
    if len(patient_labels) < k:
        raise SplitError(f"{len(patient_labels)} patient(s) cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    members: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for group in _grouped(patient_labels):
        for position, index in enumerate(rng.permutation(len(group))):
            members[(offset + position) % k].append(group[index])
        offset += len(group)
    everyone = sorted(patient_labels)
    folds = []
    for index, val in enumerate(members):
        held = set(val)
        folds.append(Fold(index, tuple(p for p in everyone if p not in held), tuple(sorted(val))))
    return tuple(folds)
