"""load_package: a package is served only if its card, checksum and graph agree."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.inference import (
    ChecksumMismatchError,
    IncompleteCardError,
    InferenceError,
    ModelPackageError,
    PackageNotFoundError,
    SignatureMismatchError,
    load_package,
)


@pytest.fixture
def package_copy(classifier_package_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(classifier_package_dir, tmp_path / "toy-classifier"))


def _edit_card(directory: Path, edit: Any) -> None:
    path = directory / "model.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_valid_package_loads(classifier_package_dir: Path) -> None:
    package = load_package(classifier_package_dir)
    assert package.card.name == "toy-classifier"
    assert package.onnx_path == classifier_package_dir / "model.onnx"
    assert package.sha256 == package.card.sha256
    assert package.card.inputs[0].shape == ("batch", 1, 32, 32)


def test_modified_onnx_file_is_refused(package_copy: Path) -> None:
    with (package_copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ChecksumMismatchError, match="re-export") as caught:
        load_package(package_copy)
    assert caught.value.expected != caught.value.actual


def test_card_with_another_checksum_is_refused(package_copy: Path) -> None:
    _edit_card(package_copy, lambda d: d.update(sha256="0" * 64))
    with pytest.raises(ChecksumMismatchError):
        load_package(package_copy)


def test_incomplete_card_is_refused_naming_the_keys(package_copy: Path) -> None:
    def drop(data: dict[str, Any]) -> None:
        del data["operating_points"], data["training_data"]

    _edit_card(package_copy, drop)
    with pytest.raises(IncompleteCardError, match="operating_points, training_data") as caught:
        load_package(package_copy)
    assert str(package_copy / "model.yaml") in str(caught.value)


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (
            lambda d: d["inputs"][0].update(shape=["batch", 1, 64, 64]),
            "input 'image' has shape ['batch', 1, 32, 32] in the graph, ['batch', 1, 64, 64]",
        ),
        (
            lambda d: d["inputs"][0].update(dtype="float16"),
            "input 'image' is tensor(float) in the graph, float16 in the card",
        ),
        (lambda d: d["inputs"][0].update(shape=["batch", 1, 32]), "input 'image' has shape"),
        (lambda d: d["outputs"][1].update(name="heatmap"), "graph has no output named 'heatmap'"),
        (lambda d: d["inputs"][0].update(shape=[4, 1, 32, 32]), None),  # stricter card: fine
    ],
)
def test_signature_must_match_the_graph(
    package_copy: Path, edit: Any, complaint: str | None
) -> None:
    _edit_card(package_copy, edit)
    if complaint is None:
        load_package(package_copy)
        return
    with pytest.raises(SignatureMismatchError) as caught:
        load_package(package_copy)
    assert complaint in str(caught.value)


def test_missing_pieces_are_reported(package_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(PackageNotFoundError, match="not a directory"):
        load_package(tmp_path / "absent")
    (package_copy / "model.yaml").unlink()
    with pytest.raises(PackageNotFoundError, match=r"model\.yaml"):
        load_package(package_copy)
    (package_copy / "model.onnx").unlink()
    with pytest.raises(PackageNotFoundError, match=r"model\.onnx"):
        load_package(package_copy)


def test_every_package_error_is_an_inference_error() -> None:
    for error in (
        ChecksumMismatchError,
        IncompleteCardError,
        SignatureMismatchError,
        PackageNotFoundError,
    ):
        assert issubclass(error, ModelPackageError)
        assert issubclass(error, InferenceError)
