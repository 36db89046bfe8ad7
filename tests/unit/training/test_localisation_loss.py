"""The auxiliary localisation loss: it acts on the exported Grad-CAM's own evidence, has a
gradient everywhere, pulls the map's peak into the lesion, follows the augmentation, and
is recorded on the card when ``--loc-weight`` trains a package."""

from __future__ import annotations

import json
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dicomnode.training.architectures import small_slice_classifier  # noqa: E402
from dicomnode.training.augment import (  # noqa: E402
    Augmentation,
    augment_batch,
    augment_batch_with_masks,
)
from dicomnode.training.commands import TaskOptions, slice_classifier  # noqa: E402
from dicomnode.training.gradcam import (  # noqa: E402
    WithCam,
    class_evidence,
    localisation_loss,
    mask_to_grid,
)
from dicomnode.training.loop import TrainConfig, fit  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _blob_masks(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for k in range(n):
        r, c = rng.integers(6, size - 6, 2)
        masks[k, r - 3:r + 3, c - 3:c + 3] = 1
    return masks


def test_mask_to_grid_puts_a_pixel_in_the_cell_centred_on_it() -> None:
    mask = torch.zeros(1, 64, 64)
    mask[0, 24, 40] = 1.0  # cell centres at 8*i: row 24 -> 3, column 40 -> 5
    grid = mask_to_grid(mask, (8, 8), 8)
    assert grid.shape == (1, 8, 8)
    assert torch.nonzero(grid[0]).tolist() == [[3, 5]]
    mask[0, 27, 43] = 1.0  # still within ±4 px of the same centre
    mask[0, 28, 44] = 1.0  # the next cell's footprint starts here
    grid = mask_to_grid(mask, (8, 8), 8)
    assert float(grid[0, 3, 5]) == pytest.approx(2 / 64)
    assert float(grid[0, 4, 6]) == pytest.approx(1 / 64)


def test_the_loss_has_a_gradient_everywhere_and_moves_the_peak_into_the_lesion() -> None:
    torch.manual_seed(0)
    evidence = (torch.randn(2, 8, 8) - 3.0).requires_grad_(True)  # all negative: ReLU'd = 0
    target = torch.zeros(2, 8, 8)
    target[0, 2, 5] = 1.0
    target[1, 6:8, 1:3] = 0.25
    loss = localisation_loss(evidence, target)
    (grad,) = torch.autograd.grad(loss, evidence)
    assert bool((grad != 0).all())  # no dead cells, even with no positive evidence
    optimizer = torch.optim.SGD([evidence], lr=1.0)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        value = localisation_loss(evidence, target)
        value.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(value.detach()))
    assert losses[-1] < 0.5 * losses[0]
    peaks = evidence.detach().flatten(1).argmax(dim=1)
    assert bool((target.flatten(1).gather(1, peaks[:, None]) > 0).all())


def test_samples_without_a_lesion_do_not_count() -> None:
    evidence = torch.randn(3, 4, 4, requires_grad=True)
    target = torch.zeros(3, 4, 4)
    none = localisation_loss(evidence, target)
    assert float(none.detach()) == 0.0 and none.requires_grad
    target[1, 0, 0] = 1.0
    one = localisation_loss(evidence, target)
    alone = localisation_loss(evidence[1:2], target[1:2])
    assert float(one.detach()) == pytest.approx(float(alone.detach()))


def test_class_evidence_is_the_exported_map_before_its_relu() -> None:
    torch.manual_seed(1)
    model = small_slice_classifier(1, depth=10, width=4, hidden=16).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        _, _, raw = WithCam(model, "all", include_raw=True)(x)
        evidence = class_evidence(model, model.features(x))
    assert torch.allclose(torch.relu(evidence), raw[:, 0], atol=1e-6)
    # In training mode the head's dropout does not change the map (the eval Jacobian),
    # and gradients reach the head's weights.
    model.head.train()
    evidence_train = class_evidence(model, model.features(x))
    assert torch.allclose(evidence_train.detach(), evidence, atol=1e-6)
    evidence_train.sum().backward()
    assert model.head[0].weight.grad is not None and model.head[3].weight.grad is not None


def test_class_evidence_picks_each_samples_own_class() -> None:
    torch.manual_seed(2)
    model = small_slice_classifier(3, depth=10, width=4, hidden=16).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        own = class_evidence(model, features, torch.tensor([0, 2, 1]))
        each = [class_evidence(model, features, k) for k in range(3)]
    for sample, k in enumerate((0, 2, 1)):
        assert torch.allclose(own[sample], each[k][sample])
    with pytest.raises(ValueError, match="class index"):
        class_evidence(model, features, 3)


def test_masks_follow_the_images_augmentation_and_draws_are_unchanged() -> None:
    x = torch.randn(4, 1, 32, 32)
    masks = torch.from_numpy(_blob_masks(4, 32, 0)).to(torch.float32)
    flip = Augmentation(hflip=1.0, brightness=0.2)
    alone = augment_batch(x, flip, torch.Generator().manual_seed(3))
    images, moved = augment_batch_with_masks(x, masks, flip, torch.Generator().manual_seed(3))
    assert torch.equal(alone, images)
    assert torch.allclose(moved, masks.flip(-1), atol=1e-6)
    shifted = Augmentation(rotation_deg=10, translate=0.1, zoom=0.1)
    alone = augment_batch(x, shifted, torch.Generator().manual_seed(4))
    images, moved = augment_batch_with_masks(x, masks, shifted, torch.Generator().manual_seed(4))
    assert torch.equal(alone, images)
    assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0
    assert not torch.allclose(moved, masks)


def _lesion_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(n, size, seed)
    labels = np.arange(n, dtype=np.int64) % 2
    masks[labels == 0] = 0
    x = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    x[:, 0] += 2.0 * masks
    return x, labels, masks


def test_fit_trains_the_localisation_loss_down_and_weight_zero_ignores_masks() -> None:
    x, y, masks = _lesion_data(48, 32, 0)
    xv, yv, _ = _lesion_data(16, 32, 1)

    def train(weight: float, with_masks: bool) -> tuple[torch.nn.Module, list[float]]:
        torch.manual_seed(0)
        model = slice_classifier(TaskOptions(width=4, output_stride=8))  # 4x4 grid
        config = TrainConfig(epochs=6, batch_size=16, learning_rate=3e-3, patience=None,
                             progress=False, localisation_weight=weight,
                             augmentation=Augmentation(hflip=0.5))
        result = fit(model, (x, y), (xv, yv), config, loss_kind="bce", n_classes=2,
                     stream=None, masks=masks if with_masks else None)
        return result.model, [r.train_localisation_loss for r in result.history]

    plain, plain_loc = train(0.0, False)
    ignored, ignored_loc = train(0.0, True)
    assert all(np.isnan(plain_loc)) and all(np.isnan(ignored_loc))
    for a, b in zip(plain.state_dict().values(), ignored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    _, loc = train(1.0, True)
    assert all(np.isfinite(loc)) and loc[-1] < loc[0]


def test_fit_refuses_masks_that_do_not_match_the_images() -> None:
    x, y, masks = _lesion_data(8, 32, 0)
    model = small_slice_classifier(1, depth=10, width=4, hidden=16)
    config = TrainConfig(epochs=1, batch_size=4, progress=False, localisation_weight=1.0)
    with pytest.raises(ValueError, match="one \\(H, W\\) mask per training sample"):
        fit(model, (x, y), (x, y), config, loss_kind="bce", n_classes=2, stream=None,
            masks=masks[:, :16])


def test_loc_weight_is_recorded_in_the_cards_training_section(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from dicomnode.cli import main
    from dicomnode.inference import load_package

    argv = ["train", "pneumonia", "--data", "phantom", "--n-train", "48", "--n-val", "16",
            "--n-test", "16", "--size", "64", "--epochs", "1", "--output-stride", "8",
            "--loc-weight", "0.5", "--out", str(tmp_path), "--n-boot", "100", "--threads",
            "1", "--no-progress"]
    with redirect_stdout(StringIO()):
        assert main(argv) == 0
    package = load_package(tmp_path / "pneumonia-cxr")
    training = package.card.provenance["training"]
    assert training["options"]["loc_weight"] == 0.5
    assert training["config"]["localisation_weight"] == 0.5
    record = training["localisation"]
    assert record["applied"] is True and record["weight"] == 0.5
    assert 0 < record["positive_samples_with_masks"] <= 24
    history = json.loads((tmp_path / "pneumonia-cxr" / "training" / "history.json").read_text())
    assert history["history"][0]["train_localisation_loss"] > 0


def test_phantom_readers_give_the_lesion_masks_at_the_model_input() -> None:
    from dicomnode.training.commands import pneumonia_spec
    from dicomnode.training.datasets import chest_xray_phantoms
    from dicomnode.training.tasks_metastasis import head_ct_phantoms, metastasis_spec

    spec = metastasis_spec(TaskOptions(size=32))
    # Half with metastases: the patients this check was written for (at matrix 64 a lesion
    # cap of one pixel passes the 12 mm2 filter and can vanish when the mask is halved).
    splits = head_ct_phantoms(spec, n_train=2, n_val=2, n_test=0, seed=3, val_seed=4,
                              matrix=64, train_metastasis_fraction=0.5)
    masks = splits.train.masks()
    assert masks is not None and masks.dtype == np.uint8
    x, y = splits.train.arrays()
    assert masks.shape == (x.shape[0], 32, 32)
    assert not masks[y == 0].any()
    assert masks[y == 1].reshape(int((y == 1).sum()), -1).any(axis=1).all()

    chest = chest_xray_phantoms(pneumonia_spec(TaskOptions(size=32)), n_train=6, n_val=2,
                                n_test=0, size=64)
    masks = chest.train.masks()
    assert masks is not None
    _, y = chest.train.arrays()
    assert not masks[y == 0].any() and masks[y == 1].any(axis=(1, 2)).all()
