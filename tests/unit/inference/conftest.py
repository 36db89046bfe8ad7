"""Small real model packages, exported once per test session.

Building them needs torch (the ``train`` extra); tests that use them are skipped where
it is not installed, while the card tests run with the serving dependencies alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _common_card_fields() -> dict[str, Any]:
    from dicomnode.inference import Metric, OperatingPoint, TrainingData

    return {
        "version": "0.1.0",
        "modality": "CT",
        "preprocessing": [{"op": "hu_window", "center": 40, "width": 80}],
        "operating_points": [
            OperatingPoint("screening", "logits", 0.3, 0.9, 0.7, class_name="finding")
        ],
        "training_data": TrainingData("synthetic phantoms", {"train": 10}, synthetic=True),
        "metrics": [Metric("auc", 0.7, 0.6, 0.8)],
        "intended_use": "Tests only.",
    }


@pytest.fixture(scope="session")
def classifier_package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-logit slice classifier with an in-graph CAM, input (batch, 1, 32, 32)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from dicomnode.training.architectures import small_slice_classifier
    from dicomnode.training.export import OutputDescription, write_model_package
    from dicomnode.training.gradcam import WithCam

    torch.manual_seed(0)
    model = small_slice_classifier(1).eval()
    models_dir = tmp_path_factory.mktemp("models")
    write_model_package(
        WithCam(model),
        {"image": torch.randn(2, 1, 32, 32)},
        models_dir,
        name="toy-classifier",
        task="slice-classification",
        outputs=[
            OutputDescription(
                "logits", "logits", "finding logit", classes=("finding",), activation="sigmoid"
            ),
            OutputDescription(
                "cam", "cam", "Grad-CAM", classes=("finding",), explains="logits", cam_target="all"
            ),
        ],
        **_common_card_fields(),
    )
    return models_dir / "toy-classifier"


@pytest.fixture(scope="session")
def two_input_package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two batched inputs (image, presence), as the CT+MR fusion model has."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from torch import nn

    from dicomnode.training.export import OutputDescription, write_model_package

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 1)

        def forward(self, image: Any, presence: Any) -> Any:
            pooled = torch.relu(self.conv(image)).mean(dim=(2, 3)) * presence[:, :1]
            return self.fc(pooled)

    torch.manual_seed(1)
    models_dir = tmp_path_factory.mktemp("models")
    write_model_package(
        Gated().eval(),
        {"image": torch.randn(2, 1, 16, 16), "presence": torch.ones(2, 2)},
        models_dir,
        name="toy-gated",
        task="slice-classification",
        outputs=[
            OutputDescription(
                "logits", "logits", "finding logit", classes=("finding",), activation="sigmoid"
            )
        ],
        **_common_card_fields(),
    )
    return models_dir / "toy-gated"
