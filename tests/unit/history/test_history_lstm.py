"""The growth LSTM: shapes, loss, a tiny training run, and an ONNX package served as-is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from dicomnode.history.cohort import (  # noqa: E402
    baseline_calibrations,
    compare,
    generate_cohort,
)
from dicomnode.history.growth import (  # noqa: E402
    DEFAULT_MODELS_DIR,
    FEATURE_NAMES,
    HORIZONS_DAYS,
    MAX_VISITS,
    MODEL_NAME,
    LstmForecaster,
    default_forecaster,
    forecast,
)
from dicomnode.inference.package import load_card, load_package  # noqa: E402
from dicomnode.training.growth import (  # noqa: E402
    GrowthLstm,
    GrowthLstmConfig,
    TrainingConfig,
    lstm_forecasts,
    pinball_loss,
    train_growth_lstm,
    trained_name,
    write_growth_package,
)


def test_quantiles_never_cross_and_shapes_follow_the_card() -> None:
    torch.manual_seed(0)
    model = GrowthLstm(GrowthLstmConfig(hidden_size=8, head_size=8)).eval()
    out = model(torch.randn(5, MAX_VISITS, len(FEATURE_NAMES)))
    assert out.shape == (5, len(HORIZONS_DAYS), 3)
    assert bool((out[..., 0] <= out[..., 1]).all()) and bool((out[..., 1] <= out[..., 2]).all())
    model.interval_adjustment.fill_(-10.0)  # a narrowing can never cross the median
    out = model(torch.randn(5, MAX_VISITS, len(FEATURE_NAMES)))
    assert bool((out[..., 0] <= out[..., 1]).all()) and bool((out[..., 1] <= out[..., 2]).all())


def test_pinball_loss_weights_misses_by_quantile() -> None:
    target = torch.zeros(1, 1)
    below = torch.tensor([[[1.0, 1.0, 1.0]]])  # every quantile 1 above the truth
    # (1 - 0.1) + (1 - 0.5) + (1 - 0.9) = 1.5
    assert float(pinball_loss(below, target)) == pytest.approx(1.5)
    above = torch.tensor([[[-1.0, -1.0, -1.0]]])
    assert float(pinball_loss(above, target)) == pytest.approx(0.1 + 0.5 + 0.9)


def test_tiny_training_run_exports_a_package_that_serving_reproduces(tmp_path: Path) -> None:
    config = TrainingConfig(
        model=GrowthLstmConfig(hidden_size=8, head_size=8),
        train_n=300,
        val_n=100,
        conformal_n=100,
        epochs=2,
        batch_size=64,
    )
    trained = train_growth_lstm(config, log=False)
    assert len(trained.interval_adjustment) == len(HORIZONS_DAYS)
    test = generate_cohort(60, 4242)
    name = trained_name("0.0.1")
    torch_arrays = lstm_forecasts(trained.model, test)
    comparison = compare(
        test, baseline_calibrations(generate_cohort(100, 31)), {name: torch_arrays},
        resamples=100,
    )
    # torchscript: the same graph in ~1 s; the shipped package (dynamo) is checked below.
    directory = write_growth_package(
        trained, comparison, tmp_path, version="0.0.1", exporter="torchscript"
    )
    assert directory == tmp_path / MODEL_NAME
    card = load_card(directory / "model.yaml")
    assert card.training_data.synthetic
    assert "not for clinical use" in card.intended_use
    assert any(m.name.startswith("mae_difference_vs_") for m in card.metrics)
    served = LstmForecaster.from_package(directory)
    assert served.name == name
    onnx_arrays = served.predict(test.timelines())
    np.testing.assert_allclose(onnx_arrays.median, torch_arrays.median, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(onnx_arrays.upper, torch_arrays.upper, rtol=1e-3, atol=1e-4)
    # With the package installed, the default forecaster is the LSTM, same API.
    result = forecast(test.patients[0].timeline(), default_forecaster(tmp_path))
    assert result.method == name and len(result.median) == len(HORIZONS_DAYS)


def test_shipped_package_says_by_how_much_it_beats_the_baseline() -> None:
    directory = DEFAULT_MODELS_DIR / MODEL_NAME
    if not (directory / "model.onnx").is_file():
        pytest.skip("no growth-forecaster package shipped (the LSTM did not beat the baseline)")
    package = load_package(directory)
    card = package.card
    assert card.training_data.synthetic and "not for clinical use" in card.intended_use
    margins = [m for m in card.metrics if m.name.startswith("mae_difference_vs_")]
    assert len(margins) == len(HORIZONS_DAYS)
    assert all(m.ci_upper < 0 for m in margins)  # it only ships when it beats the baseline
    assert any("margin" in line for line in card.limitations)
    served = LstmForecaster.from_package(directory)
    result = forecast(generate_cohort(1, 4243).patients[0].timeline(), served)
    assert result.method == f"lstm {card.version}"
