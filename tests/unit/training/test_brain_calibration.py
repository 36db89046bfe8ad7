"""Series-level calibration of the three-class brain models: the cross-validated choice of
family, folding it into the head, and `recalibrate` on a trained package (tiny phantoms)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from dicomnode.cli import main as cli_main  # noqa: E402
from dicomnode.inference import load_package  # noqa: E402
from dicomnode.pipelines.brain_rules import softmax as _softmax  # noqa: E402
from dicomnode.training.commands import TrainingRunError  # noqa: E402
from dicomnode.training.tasks_brain import (  # noqa: E402
    MULTICLASS_FAMILIES,
    SeriesCalibration,
    fit_multiclass_calibration,
    fold_calibration,
    main,
    series_rows_at,
)


def _drawn(true_logits: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = _softmax(true_logits)
    return np.array([rng.choice(3, p=row) for row in p], dtype=np.int64)


def test_a_per_class_distortion_is_undone_by_vector_scaling() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 1.5, (600, 3))
    labels = _drawn(true)
    factors = np.array([3.0, 1.0, 0.5])  # healthy far too confident, malignant too timid
    seen = true * factors + np.array([1.0, -0.5, 0.0])
    series = [row[None, :] for row in seen]  # one slice per series: the key slice
    fit = fit_multiclass_calibration(series_rows_at(series), labels, 3)
    assert fit.method == "vector scaling"
    assert fit.selection is not None and fit.selection["chosen"] == fit.method
    scores = fit.selection["cross_validated_brier"]
    assert set(scores) == set(MULTICLASS_FAMILIES)
    assert scores["vector scaling"] < scores["temperature + offsets"]
    assert fit.nll_after < fit.nll_before
    assert fit.class_scales is not None
    np.testing.assert_allclose(fit.factors, 1.0 / factors, rtol=0.3)
    recovered = _softmax(fit.apply(seen))
    assert np.abs(recovered - _softmax(true)).mean() < 0.05


def test_a_shared_temperature_is_not_given_more_parameters_than_it_needs() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(0.0, 1.5, (600, 3))
    labels = _drawn(true, seed=1)
    seen = 2.5 * true  # one temperature explains it all
    fit = fit_multiclass_calibration(series_rows_at([r[None, :] for r in seen]), labels, 3)
    assert fit.method == "temperature + offsets"
    assert fit.class_scales is None and abs(fit.scale - 0.4) < 0.08


def test_offsets_can_move_the_key_slice_and_the_fit_follows_the_serving_rule() -> None:
    # Two slices per series: the key slice is the one with the higher tumour score, and a
    # benign offset changes which one that is; rows_at must apply the rule after the map.
    series = [np.array([[0.0, 2.0, -5.0], [0.0, -5.0, 1.5]])]
    rows_at = series_rows_at(series)
    assert rows_at(np.ones(3), np.zeros(3))[0].tolist() == [0.0, 2.0, -5.0]
    moved = rows_at(np.ones(3), np.array([0.0, -3.0, 0.0]))[0]
    assert moved.tolist() == [0.0, -5.0 - 3.0, 1.5]


def test_groups_keep_one_patients_rows_in_one_fold() -> None:
    rng = np.random.default_rng(2)
    true = rng.normal(0.0, 1.5, (200, 3))
    labels = _drawn(true, seed=2)
    rows = np.concatenate([true, true + rng.normal(0.0, 0.1, true.shape)])
    groups = np.tile(np.arange(200), 2)

    def rows_at(factors: np.ndarray, shift: np.ndarray) -> np.ndarray:
        out: np.ndarray = rows * factors + shift
        return out

    fit = fit_multiclass_calibration(rows_at, np.tile(labels, 2), 3, groups=groups)
    assert fit.n == 400 and fit.nll_after <= fit.nll_before + 1e-9
    with pytest.raises(TrainingRunError, match="every class"):
        fit_multiclass_calibration(rows_at, np.zeros(400, dtype=np.int64), 3)


def test_folding_per_class_factors_gives_the_fitted_logits() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    x = torch.randn(7, 5)
    with torch.no_grad():
        raw = linear(x).double().numpy()
    fit = SeriesCalibration("vector scaling", 1.0, (0.3, -0.2, 0.0), 7, 1.0, 0.9,
                            class_scales=(0.5, 2.0, 1.5))
    fold_calibration(linear, fit)
    with torch.no_grad():
        folded = linear(x).double().numpy()
    np.testing.assert_allclose(folded, fit.apply(raw), rtol=1e-5, atol=1e-5)
    with pytest.raises(TrainingRunError, match="cannot fold"):
        fold_calibration(linear, dataclasses.replace(fit, class_scales=(1.0, -1.0, 1.0)))


TINY = ["--data", "phantom", "--seed", "0", "--n-train", "9", "--n-val", "9", "--n-test", "6",
        "--size", "32", "--phantom-size", "64", "--depth", "10", "--width", "4",
        "--epochs", "1", "--batch-size", "16", "--n-boot", "50", "--threads", "1",
        "--no-progress"]


def test_train_with_calibration_patients_then_recalibrate(tmp_path: Path) -> None:
    assert cli_main(["train", "brain-tumour-mr", "--out", str(tmp_path), *TINY,
                     "--n-calibration", "9"]) == 0
    directory = tmp_path / "brain-tumour-mr"
    card = load_package(directory).card
    training = card.provenance["training"]
    assert training["calibration"]["fitted_on"] == "calibration patients, seed 2 (n=9)"
    assert training["calibration"]["selection"]["chosen"] == training["calibration"]["method"]
    assert card.training_data.cases["calibration"] == 9
    assert "calibration seed 2 (9 patients" in card.training_data.description
    for point in card.operating_points:
        assert "threshold chosen on calibration patients, seed 2 (n=9)" in point.dataset
    first = card.provenance["checkpoint_sha256"]

    assert cli_main(["recalibrate", str(directory), "--n-calibration", "12",  # `dicomnode`
                     "--calibration-seed", "5", "--n-test", "9", "--version", "0.0.2"]) == 0
    again = load_package(directory).card  # sha256, signature and complete card verified
    assert again.version == "0.0.2"
    record = again.provenance["training"]
    assert record["calibration"]["fitted_on"] == "calibration patients, seed 5 (n=12)"
    assert record["recalibrated"]["from_checkpoint_sha256"] == first
    assert record["recalibrated"]["earlier_calibration"]["fitted_on_patients"] == 9
    assert record["result"] == training["result"]  # the training itself is unchanged
    assert again.training_data.cases["test"] == 9
    assert all("(n=9)" in m.dataset for m in again.metrics)
    report = json.loads((directory / "training" / "validation_report.json").read_text())
    assert report["n"] == 12
    saved = yaml.safe_load((directory / "model.yaml").read_text(encoding="utf-8"))
    assert saved["provenance"]["checkpoint_sha256"] != first

    assert main(["recalibrate", str(directory), "--n-calibration", "6",
                 "--calibration-seed", "1000"]) == 2  # the test patients' seed
