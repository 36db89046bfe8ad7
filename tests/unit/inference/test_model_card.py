"""model.yaml parsing and validation (serving dependencies only: no torch, no ONNX file)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.inference import (
    IncompleteCardError,
    InvalidCardError,
    ModelCard,
    ModelPackageError,
    PackageNotFoundError,
    load_card,
)


def _card_data() -> dict[str, Any]:
    return {
        "card_version": 1,
        "name": "brain-mets-ct",
        "version": "1.2.0",
        "task": "patient-classification",
        "modality": ["CT"],
        "intended_use": "Research only: flags CT head studies for metastasis review.",
        "inputs": [
            {
                "name": "image",
                "shape": ["batch", 1, 256, 256],
                "dtype": "float32",
                "description": "one axial slice, brain window, z-scored",
            }
        ],
        "preprocessing": [
            {"op": "hu_window", "center": 40, "width": 80},
            {"op": "zscore"},
            {"op": "resize", "size": [256, 256]},
        ],
        "outputs": [
            {
                "name": "logits",
                "shape": ["batch", 1],
                "dtype": "float32",
                "kind": "logits",
                "meaning": "slice logit; patient logit = max over slices",
                "classes": ["metastasis"],
                "activation": "sigmoid",
            },
            {
                "name": "cam",
                "shape": ["batch", 1, 256, 256],
                "dtype": "float32",
                "kind": "cam",
                "meaning": "Grad-CAM of the logit, each map divided by its maximum",
                "classes": ["metastasis"],
                "explains": "logits",
                "cam_target": "all",
            },
        ],
        "operating_points": [
            {
                "name": "screening",
                "output": "logits",
                "class": "metastasis",
                "threshold": 0.2,
                "scale": "probability",
                "sensitivity": 0.93,
                "specificity": 0.58,
                "dataset": "held-out test, 61 patients",
            },
        ],
        "training_data": {
            "description": "synthetic CT phantoms with spheres",
            "cases": {"train": 400, "validation": 60, "test": 61},
            "sources": ["dicomnode.phantoms"],
            "synthetic": True,
        },
        "metrics": [
            {
                "name": "auc",
                "value": 0.84,
                "ci": [0.75, 0.92],
                "ci_level": 0.95,
                "method": "bootstrap, 2000 resamples",
                "dataset": "test",
            }
        ],
        "limitations": ["not validated on real patients"],
        "resources": {"activation_bytes_per_sample": 12_582_912, "method": "shape inference"},
        "provenance": {"torch": "2.13.0", "opset": 18},
        "sha256": "ab" * 32,
    }


def test_card_parses_into_frozen_values() -> None:
    card = ModelCard.from_mapping(_card_data())
    assert card.modality == ("CT",)
    assert card.inputs[0].shape == ("batch", 1, 256, 256)
    assert card.inputs[0].bytes_per_sample() == 256 * 256 * 4
    assert card.output("cam").explains == "logits"
    assert [o.name for o in card.cam_outputs] == ["cam"]
    assert card.operating_point("screening").class_name == "metastasis"
    assert card.metrics[0].ci_lower == 0.75
    with pytest.raises(AttributeError):
        card.name = "other"  # type: ignore[misc]


def test_card_round_trips_through_yaml() -> None:
    card = ModelCard.from_mapping(_card_data())
    again = ModelCard.from_mapping(yaml.safe_load(card.to_yaml()))
    assert again == card


def test_incomplete_card_names_every_missing_key() -> None:
    data = _card_data()
    del data["intended_use"], data["metrics"]
    del data["inputs"][0]["dtype"]
    del data["operating_points"][0]["specificity"]
    data["training_data"] = {"cases": {"train": 1}}
    with pytest.raises(IncompleteCardError) as caught:
        ModelCard.from_mapping(data, source="models/x/model.yaml")
    assert set(caught.value.missing) == {
        "intended_use",
        "metrics",
        "inputs[0].dtype",
        "operating_points[0].specificity",
        "training_data.description",
    }
    message = str(caught.value)
    assert message.startswith("model card models/x/model.yaml is missing required keys:")
    assert "inputs[0].dtype" in message
    assert isinstance(caught.value, ModelPackageError)


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(_card_data())
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    target[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        ("operating_points.0.sensitivity", 1.5, "sensitivity 1.5 outside"),
        ("operating_points.0.output", "cam", "not a score output"),
        ("operating_points.0.class", "glioma", "names class 'glioma'"),
        ("operating_points.0.threshold", 3.0, "outside [0, 1]"),
        ("metrics.0.value", 0.99, "outside its confidence interval"),
        ("metrics.0.ci", [0.7], "ci must be"),
        ("sha256", "not-a-digest", "64 lower-case hexadecimal"),
        ("name", "Brain Mets/../x", "lower-case letters"),
        ("inputs.0.dtype", "float128", "dtype 'float128'"),
        ("inputs.0.shape", ["batch", 0, 4], "non-positive dimension"),
        ("outputs.1.explains", "stage", "not a score output"),
        ("outputs.0.classes", ["a", "b"], "1 scores per sample but 2 classes"),
        ("outputs.1.cam_target", "everything", "cam_target 'everything'"),
        ("outputs.0.kind", "banana", "kind 'banana'"),
        ("outputs.1.name", "logits", "not unique"),
        ("inputs", {"name": "image"}, "inputs must be a list"),
        ("training_data.synthetic", "yes", "true or false"),
        ("card_version", 2, "card_version 2 is not supported"),
    ],
)
def test_invalid_values_are_refused_with_the_key(path: str, value: Any, complaint: str) -> None:
    with pytest.raises(InvalidCardError, match="model card <model card>") as caught:
        ModelCard.from_mapping(_with(path, value))
    assert complaint in str(caught.value)


def test_card_must_be_a_mapping() -> None:
    with pytest.raises(InvalidCardError, match="not a mapping"):
        ModelCard.from_mapping(["name", "version"])


def test_load_card_reports_yaml_errors_and_absence(tmp_path: Path) -> None:
    with pytest.raises(PackageNotFoundError):
        load_card(tmp_path / "model.yaml")
    broken = tmp_path / "model.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(InvalidCardError, match="not valid YAML"):
        load_card(broken)


def test_serving_side_never_imports_torch() -> None:
    code = (
        "import sys, dicomnode.inference, dicomnode.inference.aggregate\n"
        "assert 'torch' not in sys.modules, 'dicomnode.inference imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
