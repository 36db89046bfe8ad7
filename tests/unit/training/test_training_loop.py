"""The training loop: reproducible, staged with frozen groups, weighted, augmented."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from dicomnode.training.architectures import small_slice_classifier  # noqa: E402
from dicomnode.training.augment import PRESETS, Augmentation, augment_batch  # noqa: E402
from dicomnode.training.loop import (  # noqa: E402
    TrainConfig,
    _configure_stage,
    fit,
    make_loss,
    predict_scores,
    seed002_stages,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    # Two cores shared with other jobs: one intra-op thread is many times faster here.
    torch.set_num_threads(1)


def _blobs(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; positives have a brighter centre."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    x[y == 1, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 1.5
    return x, y.astype(np.int64)


def _weights(model: nn.Module) -> Any:
    return torch.cat([t.flatten().double() for t in model.state_dict().values()])


def _train(seed: int, **overrides: object) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = small_slice_classifier(1, width=4, hidden=8)
    config = TrainConfig(**{"epochs": 2, "batch_size": 8, "seed": seed,
                            "augmentation": PRESETS["seed004"], **overrides})  # type: ignore[arg-type]
    result = fit(model, _blobs(32, 0), _blobs(16, 1), config, loss_kind="bce", n_classes=2,
                 stream=None)
    return model, result


def test_two_runs_with_one_seed_give_identical_weights_and_history() -> None:
    first_model, first = _train(7)
    second_model, second = _train(7)
    assert torch.equal(_weights(first_model), _weights(second_model))
    assert [(r.train_loss, r.val_auc) for r in first.history] == [  # type: ignore[attr-defined]
        (r.train_loss, r.val_auc) for r in second.history]  # type: ignore[attr-defined]
    other_model, _ = _train(8)
    assert not torch.equal(_weights(first_model), _weights(other_model))
    x, _ = _blobs(4, 9)
    assert np.array_equal(predict_scores(first_model, x, loss_kind="bce"),
                          predict_scores(second_model, x, loss_kind="bce"))


def test_progress_is_plain_text_with_running_metrics() -> None:
    stream = io.StringIO()
    torch.manual_seed(0)
    fit(small_slice_classifier(1, width=4, hidden=8), _blobs(16, 0), _blobs(8, 1),
        TrainConfig(epochs=1, batch_size=8), loss_kind="bce", n_classes=2, stream=stream)
    text = stream.getvalue()
    assert "epoch 1/1 [all] train loss" in text and "val loss" in text and "auc" in text


def test_seed002_stages_freeze_groups_and_keep_the_learning_rate_ratio() -> None:
    groups, stages = seed002_stages(head_lr=5e-5, epochs=(1, 1, 1))
    model = small_slice_classifier(1, width=4, hidden=8)
    config = TrainConfig(groups=groups, stages=stages, batch_size=8)
    optimizer, rates = _configure_stage(model, stages[2], config)
    assert rates == pytest.approx({"head": 5e-5, "layer4": 1e-5, "layer3": 5e-6})
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "head": 1e-3, "layer4": 1e-4, "layer3": 1e-4}
    torch.manual_seed(0)
    model = small_slice_classifier(1, width=4, hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_only = TrainConfig(groups=groups, stages=stages[:1], batch_size=8, patience=None)
    result = fit(model, _blobs(16, 0), _blobs(8, 1), head_only, loss_kind="bce", n_classes=2,
                 stream=None)
    after = model.state_dict()
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])
    for key in ("backbone.conv1.weight", "backbone.layer4.0.conv1.weight",
                "backbone.bn1.running_mean", "backbone.layer1.0.bn1.running_var"):
        assert torch.equal(before[key], after[key]), key  # frozen, batch-norm stats too
    assert [r.stage for r in result.history] == ["head"]
    assert all(p.requires_grad for p in model.parameters())


def test_early_stopping_restores_the_best_epoch() -> None:
    torch.manual_seed(0)
    model = small_slice_classifier(1, width=4, hidden=8)
    result = fit(model, _blobs(16, 0), _blobs(8, 1),
                 TrainConfig(epochs=30, batch_size=8, learning_rate=0.05, patience=2),
                 loss_kind="bce", n_classes=2, stream=None)
    assert len(result.history) < 30 and result.stopped_early == ("all",)
    assert result.best_epoch == max(result.history, key=lambda r: r.val_auc).epoch
    assert result.monitor == "val_auc"


def test_class_weights_become_pos_weight_and_ce_weights() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    bce = make_loss("bce", labels, 2)
    assert isinstance(bce, nn.BCEWithLogitsLoss)
    assert bce.pos_weight is not None and float(bce.pos_weight) == pytest.approx(3.0)
    ce = make_loss("ce", np.array([0] * 20 + [1] * 10 + [2] * 10), 3)
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.weight is not None
    assert ce.weight.tolist() == pytest.approx([40 / 60, 40 / 30, 40 / 30])
    with pytest.raises(ValueError, match="no samples of class"):
        make_loss("bce", np.zeros(5, dtype=np.int64), 2)


def test_augmentation_is_seeded_and_exact_where_it_should_be() -> None:
    x = torch.randn(4, 1, 12, 12)
    generator = torch.Generator().manual_seed(0)
    assert augment_batch(x, Augmentation(), generator) is x
    flipped = augment_batch(x, Augmentation(hflip=1.0), generator)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    first = augment_batch(x, PRESETS["seed004"], torch.Generator().manual_seed(3))
    again = augment_batch(x, PRESETS["seed004"], torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.shape == x.shape
    assert not torch.equal(first, x)
    volume = torch.randn(2, 5, 1, 12, 12)
    moved = augment_batch(volume, Augmentation(hflip=1.0), generator)
    assert torch.allclose(moved, volume.flip(-1), atol=1e-5)
    with pytest.raises(ValueError, match="probability"):
        Augmentation(hflip=2.0)
