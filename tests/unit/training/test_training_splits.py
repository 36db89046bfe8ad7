"""Patient-level splits: seeded, stratified, order-independent, and leak-refusing."""

from __future__ import annotations

import pytest

from dicomnode.training.splits import (
    PatientLeakError,
    PatientSplit,
    SplitError,
    check_no_leak,
    patient_strata,
    stratified_k_fold,
    stratified_patient_split,
)


def _patients(n_neg: int, n_pos: int) -> dict[str, int]:
    labels = {f"N{i:03d}": 0 for i in range(n_neg)}
    labels.update({f"P{i:03d}": 1 for i in range(n_pos)})
    return labels


def test_split_is_seeded_stratified_disjoint_and_order_independent() -> None:
    labels = _patients(60, 40)
    split = stratified_patient_split(labels, fractions=(0.6, 0.2, 0.2), seed=3)
    assert split == stratified_patient_split(dict(reversed(labels.items())),
                                             fractions=(0.6, 0.2, 0.2), seed=3)
    assert split != stratified_patient_split(labels, fractions=(0.6, 0.2, 0.2), seed=4)
    parts = split.parts()
    assert sorted(p for members in parts.values() for p in members) == sorted(labels)
    assert {name: sum(labels[p] for p in members) for name, members in parts.items()} == {
        "train": 24, "val": 8, "test": 8}
    assert {name: len(members) for name, members in parts.items()} == {
        "train": 60, "val": 20, "test": 20}


def test_small_classes_still_reach_every_part() -> None:
    split = stratified_patient_split(_patients(20, 3), fractions=(0.8, 0.1, 0.1), seed=0)
    for members in split.parts().values():
        assert any(p.startswith("P") for p in members)


def test_split_refuses_bad_fractions_and_empty_input() -> None:
    with pytest.raises(SplitError, match="fractions"):
        stratified_patient_split(_patients(5, 5), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(SplitError, match="no patients"):
        stratified_patient_split({})


def test_k_fold_puts_every_patient_in_exactly_one_validation_fold() -> None:
    labels = _patients(13, 7)
    folds = stratified_k_fold(labels, 5, seed=1)
    assert len(folds) == 5
    held = [p for fold in folds for p in fold.val]
    assert sorted(held) == sorted(labels)
    for fold in folds:
        assert not set(fold.train) & set(fold.val)
        assert 1 <= sum(labels[p] for p in fold.val) <= 2  # positives dealt round-robin
    assert folds == stratified_k_fold(labels, 5, seed=1)
    with pytest.raises(SplitError, match="cannot fill"):
        stratified_k_fold(_patients(2, 1), 5)


def test_check_no_leak_refuses_a_patient_in_two_parts() -> None:
    items = {"train": ["a/1.dcm", "b/1.dcm"], "test": ["c/1.dcm", "a/2.dcm"]}
    with pytest.raises(PatientLeakError, match=r"1 patient\(s\).*a \(train \+ test\)") as info:
        check_no_leak(items, lambda name: name.split("/")[0])
    assert info.value.leaks == {"a": ("train", "test")}
    check_no_leak({"train": ["a/1.dcm", "a/2.dcm"], "test": ["c/1.dcm"]},
                  {"a/1.dcm": "a", "a/2.dcm": "a", "c/1.dcm": "c"})
    with pytest.raises(PatientLeakError):
        PatientSplit(train=("x", "y"), val=("y",))


def test_patient_strata_take_the_largest_label() -> None:
    items = [("p1", 0), ("p1", 1), ("p2", 0)]
    assert patient_strata(items, lambda i: i[0], lambda i: i[1]) == {"p1": 1, "p2": 0}
