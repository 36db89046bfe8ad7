from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.phantoms.common import (
    PHANTOM_KINDS,
    balanced_labels,
    item_rng,
    load_mask,
    make_identity,
    phantom_uid,
    sample_value_noise,
    save_mask,
)


def test_uids_are_deterministic_valid_and_separated() -> None:
    a = phantom_uid("chest-xray", 1, 2)
    assert a == phantom_uid("chest-xray", 1, 2)
    assert len(a) <= 64 and all(part.isdigit() for part in a.split("."))
    assert phantom_uid("ab", "c") != phantom_uid("a", "bc")
    assert a != phantom_uid("chest-xray", 1, 3)


def test_balanced_labels_are_exact_and_reproducible() -> None:
    labels = balanced_labels(np.random.default_rng(0), 10, ("a", "b", "c"), (0.5, 0.3, 0.2))
    assert (labels.count("a"), labels.count("b"), labels.count("c")) == (5, 3, 2)
    assert labels == balanced_labels(np.random.default_rng(0), 10, ("a", "b", "c"), (0.5, 0.3, 0.2))
    assert balanced_labels(np.random.default_rng(0), 7, ("x", "y")).count("x") in (3, 4)
    with pytest.raises(ValueError):
        balanced_labels(np.random.default_rng(0), 3, ("x",), (0.0,))


def test_item_streams_do_not_depend_on_set_size() -> None:
    assert item_rng("k", 5, 3).random() == item_rng("k", 5, 3).random()
    assert item_rng("k", 5, 3).random() != item_rng("k", 5, 4).random()
    assert item_rng("k", 5, 3, "a").random() != item_rng("k", 5, 3, "b").random()


def test_identity_is_obviously_synthetic() -> None:
    ident = make_identity("CXR", 7, 3, np.random.default_rng(0))
    assert ident.patient_name == "PHANTOM^CXR^0003"
    assert ident.patient_id == "PH-CXR-7-0003"


def test_value_noise_interpolates_the_lattice() -> None:
    grid = np.random.default_rng(0).standard_normal((6, 7)).astype(np.float32)
    at = sample_value_noise(grid, (np.array([2.0], np.float32), np.array([3.0], np.float32)))
    assert at[0] == pytest.approx(grid[2, 3])
    mid = sample_value_noise(grid, (np.array([2.5], np.float32), np.array([3.0], np.float32)))
    assert mid[0] == pytest.approx((grid[2, 3] + grid[3, 3]) / 2, abs=1e-6)


def test_masks_round_trip_with_reproducible_bytes(tmp_path: Path) -> None:
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2, 3:5] = 2
    a = save_mask(mask, tmp_path / "a.nii.gz", spacing_xyz=(0.5, 0.5, 3.0), origin_xyz=(1, 2, 3))
    b = save_mask(mask, tmp_path / "b.nii.gz", spacing_xyz=(0.5, 0.5, 3.0), origin_xyz=(1, 2, 3))
    assert a.read_bytes() == b.read_bytes()
    assert np.array_equal(load_mask(a), mask)


def test_registry_names_every_kind() -> None:
    assert {"chest-xray", "head-ct", "brain-mr"} <= set(PHANTOM_KINDS)
    assert all(callable(w) for w in PHANTOM_KINDS.values())
