"""Warm sessions, provider choice and reporting, batching, budgets and input errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicomnode.inference import (
    ChecksumMismatchError,
    InputValidationError,
    ModelPackage,
    ProviderUnavailableError,
    ResourceBudgetError,
    RuntimeSettings,
    SessionCache,
    load_package,
    open_model,
    open_session,
)
from dicomnode.inference import runtime as runtime_module
from dicomnode.inference.aggregate import max_pool_slices, sigmoid, softmax
from dicomnode.inference.runtime import CPU, CUDA, plan_batch_size, resolve_providers


@pytest.fixture(scope="module")
def classifier(classifier_package_dir: Path) -> ModelPackage:
    return load_package(classifier_package_dir)


@pytest.fixture(scope="module")
def gated(two_input_package_dir: Path) -> ModelPackage:
    return load_package(two_input_package_dir)


def _slices(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 32, 32)).astype(np.float32)


def test_batched_run_equals_one_big_batch(classifier: ModelPackage) -> None:
    cache = SessionCache()
    images = _slices(11)
    whole = cache.get(classifier, RuntimeSettings(max_batch=64)).run(images)
    split = cache.get(classifier, RuntimeSettings(max_batch=4)).run(images)
    assert (whole.batches, split.batches) == (1, 3)
    assert split.batch_size == 4
    for name in ("logits", "cam"):
        assert split[name].shape == whole[name].shape
        np.testing.assert_allclose(split[name], whole[name], rtol=1e-5, atol=1e-6)


def test_multi_input_batches_stay_aligned(gated: ModelPackage) -> None:
    rng = np.random.default_rng(1)
    feed = {
        "image": rng.standard_normal((7, 1, 16, 16)).astype(np.float32),
        "presence": rng.integers(0, 2, (7, 2)).astype(np.float32),
    }
    cache = SessionCache()
    whole = cache.get(gated, RuntimeSettings(max_batch=16)).run(feed)["logits"]
    split = cache.get(gated, RuntimeSettings(max_batch=2)).run(feed)["logits"]
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)


def test_provider_that_ran_is_reported(classifier: ModelPackage) -> None:
    session = SessionCache().get(
        classifier, RuntimeSettings(intra_op_threads=1, inter_op_threads=1)
    )
    result = session.run(_slices(2))
    assert result.provider == session.provider == session.providers[0]
    if CUDA not in runtime_module.available_providers():
        assert result.provider == CPU
    assert CPU in result.providers


def test_auto_providers_prefer_cuda_when_built_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "available_providers", lambda: (CUDA, CPU))
    resolved = resolve_providers(RuntimeSettings(device_id=1))
    assert resolved[0] == (CUDA, {"device_id": "1", "arena_extend_strategy": "kSameAsRequested"})
    assert resolved[1] == CPU
    monkeypatch.setattr(runtime_module, "available_providers", lambda: (CPU,))
    assert resolve_providers(RuntimeSettings()) == [CPU]
    assert resolve_providers(RuntimeSettings(providers=("cpu",))) == [CPU]


def test_unavailable_providers_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "available_providers", lambda: (CPU,))
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-gpu"):
        resolve_providers(RuntimeSettings(providers=("cuda",)))
    with pytest.raises(ProviderUnavailableError, match="GPU is required"):
        resolve_providers(RuntimeSettings(require_gpu=True))


def test_sessions_are_cached_per_package_and_settings(classifier: ModelPackage) -> None:
    cache = SessionCache()
    first = open_session(classifier, RuntimeSettings(max_batch=8), cache=cache)
    assert open_session(classifier, RuntimeSettings(max_batch=8), cache=cache) is first
    assert open_session(classifier, RuntimeSettings(max_batch=2), cache=cache) is not first
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_memory_budget_sets_the_batch_size(classifier: ModelPackage) -> None:
    card = classifier.card
    assert card.resources is not None
    per_sample = card.resources.activation_bytes_per_sample + sum(
        t.bytes_per_sample() or 0 for t in (*card.inputs, *card.outputs)
    )
    assert plan_batch_size(classifier, RuntimeSettings(memory_budget_bytes=None)) == 16
    budget = int(2.5 * per_sample)
    assert plan_batch_size(classifier, RuntimeSettings(memory_budget_bytes=budget)) == 2
    big = RuntimeSettings(memory_budget_bytes=1000 * per_sample, max_batch=8)
    assert plan_batch_size(classifier, big) == 8
    with pytest.raises(ResourceBudgetError, match="cannot hold one"):
        plan_batch_size(classifier, RuntimeSettings(memory_budget_bytes=per_sample // 2))
    session = SessionCache().get(classifier, RuntimeSettings(memory_budget_bytes=budget))
    assert session.run(_slices(5)).batches == 3


def test_budget_without_an_estimate_falls_back_to_max_batch(
    classifier: ModelPackage, caplog: pytest.LogCaptureFixture
) -> None:
    from dataclasses import replace

    bare = replace(classifier, card=replace(classifier.card, resources=None))
    with caplog.at_level(logging.WARNING, logger="dicomnode.inference.runtime"):
        assert plan_batch_size(bare, RuntimeSettings(memory_budget_bytes=1, max_batch=3)) == 3
    assert "memory budget is not applied" in caplog.text


@pytest.mark.parametrize(
    ("feed", "complaint"),
    [
        (
            np.zeros((2, 1, 64, 64), np.float32),
            "input 'image' has shape (2, 1, 64, 64); "
            "model toy-classifier expects (batch, 1, 32, 32)",
        ),
        (np.zeros((1, 32, 32), np.float32), "has shape (1, 32, 32)"),
        (
            np.zeros((2, 1, 32, 32), np.float64),
            "has dtype float64; model toy-classifier expects float32",
        ),
        ({"img": np.zeros((2, 1, 32, 32), np.float32)}, "missing ['image'], unexpected ['img']"),
        ({"image": [[0.0]]}, "is a list, not a numpy array"),
        (np.full((2, 1, 32, 32), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((0, 1, 32, 32), np.float32), "empty batch"),
    ],
)
def test_bad_inputs_are_clear_errors(
    classifier: ModelPackage, feed: object, complaint: str
) -> None:
    session = SessionCache().get(classifier)
    with pytest.raises(InputValidationError) as caught:
        session.run(feed)  # type: ignore[arg-type]
    assert complaint in str(caught.value)


def test_mismatched_batch_sizes_between_inputs(gated: ModelPackage) -> None:
    session = SessionCache().get(gated)
    with pytest.raises(InputValidationError, match="3 samples, another input has 2"):
        session.run(
            {
                "image": np.zeros((2, 1, 16, 16), np.float32),
                "presence": np.zeros((3, 2), np.float32),
            }
        )
    with pytest.raises(InputValidationError, match="pass a mapping"):
        session.run(np.zeros((2, 1, 16, 16), np.float32))


def test_warm_up_runs_a_zero_batch(classifier: ModelPackage) -> None:
    SessionCache().get(classifier, RuntimeSettings(max_batch=2, allow_spinning=False)).warm_up()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        RuntimeSettings(max_batch=0)
    with pytest.raises(ValueError, match="thread"):
        RuntimeSettings(intra_op_threads=-1)
    with pytest.raises(ValueError, match="at least one provider"):
        RuntimeSettings(providers=())


def test_patient_score_is_max_over_slices_with_its_slice() -> None:
    score = max_pool_slices(np.array([[0.1], [2.5], [-1.0]], np.float32))
    assert score.logits.tolist() == [2.5] and score.slice_index == (1,)
    multi = max_pool_slices(np.array([[0.0, 3.0], [1.0, -2.0]]))
    assert multi.slice_index == (1, 0)
    with pytest.raises(ValueError):
        max_pool_slices(np.zeros((0, 1)))


def test_sigmoid_and_softmax_are_stable() -> None:
    np.testing.assert_allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])
    probabilities = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(probabilities, [[0.5, 0.5, 0.0]])


def test_open_model_verifies_once_and_again_after_a_change(
    classifier_package_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = Path(shutil.copytree(classifier_package_dir, tmp_path / "toy"))
    loads: list[Path] = []
    real_load = runtime_module.load_package

    def counting_load(root: Path, **kwargs: bool) -> ModelPackage:
        loads.append(root)
        return real_load(root, **kwargs)

    monkeypatch.setattr(runtime_module, "load_package", counting_load)
    cache = SessionCache()
    first = open_model(directory, cache=cache)
    assert open_model(directory, cache=cache) is first
    assert len(loads) == 1
    with (directory / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ChecksumMismatchError):
        open_model(directory, cache=cache)
    assert len(loads) == 2
