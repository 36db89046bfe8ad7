"""The committed model packages: verified, honestly described, rebuilt by the script that
claims to build them, and sensible on phantoms they have never seen.

Nothing here trains: the packages under ``models/`` are checked as the node would serve
them (``load_package`` verifies the ONNX sha256 and the graph signature against the card;
ONNX Runtime runs them). Fresh phantoms use seeds that differ from every seed the card
says made its training, validation or test data.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.imaging import PreprocessSpec
from dicomnode.inference import ModelPackage, load_package
from dicomnode.inference.aggregate import max_pool_slices, sigmoid
from dicomnode.inference.runtime import ModelSession, RuntimeSettings
from dicomnode.training.datasets import assemble_tensor, chest_xray_phantom_instance

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "models"
BUILD_SCRIPT = ROOT / "scripts" / "build_models.sh"
BUNDLED = ("pneumonia-cxr", "metastasis-ct")
MAX_BYTES = 20 * 2**20
FRESH_SEED = 424242
WORDING = ("synthetic phantoms", "demonstration", "integration testing",
           "not for clinical use")
REQUIRED_POINTS = {"pneumonia-cxr": {"screening", "balanced"},
                   "metastasis-ct": {"f1-optimal"}}


def _package(name: str) -> ModelPackage:
    directory = MODELS / name
    if not (directory / "model.onnx").is_file():
        pytest.fail(f"bundled package {name} is missing; run scripts/build_models.sh {name}")
    return load_package(directory)


def _session(package: ModelPackage) -> ModelSession:
    return ModelSession(package, RuntimeSettings(providers=("cpu",), intra_op_threads=1,
                                                 max_batch=32))


def _seeds(package: ModelPackage) -> dict[str, int]:
    training = package.card.provenance["training"]
    seeds: dict[str, int] = training["data_provenance"]["seeds"]
    return seeds


def _phantom_size(package: ModelPackage) -> int:
    return int(package.card.provenance["training"]["data_provenance"]["size"])


@pytest.mark.parametrize("name", BUNDLED)
def test_package_loads_verified_and_is_small(name: str) -> None:
    package = _package(name)  # verifies the sha256 and the graph signature
    assert package.card.name == name
    total = sum(p.stat().st_size for p in package.directory.rglob("*") if p.is_file())
    assert total < MAX_BYTES, f"{name} is {total / 2**20:.1f} MB"
    kinds = {o.name: o.kind for o in package.card.outputs}
    assert kinds == {"logits": "logits", "cam": "cam"}


@pytest.mark.parametrize("name", BUNDLED)
def test_card_states_what_it_is_and_how_well_it_did(name: str) -> None:
    card = _package(name).card
    text = " ".join([card.intended_use, card.training_data.description,
                     *card.limitations]).lower()
    for words in WORDING:
        assert words in text, f"{name}: the card does not say {words!r}"
    assert card.training_data.synthetic
    metrics = {m.name: m for m in card.metrics}
    for required in ("auc", "ece", "heatmap_peak_in_lesion"):
        assert required in metrics, f"{name}: no {required} metric"
        metric = metrics[required]
        assert metric.ci_lower <= metric.value <= metric.ci_upper
        assert metric.ci_lower < metric.ci_upper and metric.method and metric.dataset
    assert "held-out" in metrics["auc"].dataset
    assert "dilated" in metrics["heatmap_peak_in_lesion"].method
    points = {p.name: p for p in card.operating_points}
    assert REQUIRED_POINTS[name] <= set(points)
    for point in points.values():  # on patients that neither trained nor test it
        assert ("chosen on validation" in point.dataset
                or "chosen on calibration" in point.dataset)
        assert 0.0 <= point.threshold <= 1.0
        for label in ("sensitivity", "specificity"):
            assert f"{label}@{point.name}" in metrics
    seeds = _seeds(_package(name))
    assert len(set(seeds.values())) == len(seeds) and {"train", "val", "test"} <= set(seeds)


def test_screening_point_keeps_its_sensitivity_on_held_out_data() -> None:
    card = _package("pneumonia-cxr").card
    assert card.operating_point("screening").sensitivity >= 0.9
    assert card.operating_point("balanced").specificity > 0.5


def _build_commands() -> dict[str, list[str]]:
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--dry-run"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    commands: dict[str, list[str]] = {}
    for line in out.splitlines():
        if not line.startswith("+ "):
            continue
        words = shlex.split(line[2:])
        if "dicomnode.cli" not in words:
            continue  # helper steps (cp, rm, rescoring) of other models' recipes
        argv = words[words.index("dicomnode.cli") + 1:]
        commands[argv[1]] = argv
    return commands


#: Every package scripts/build_models.sh trains with `dicomnode train`.
SCRIPTED = (*BUNDLED, "brain-tumour-ct", "brain-tumour-mr", "brain-tumour-fusion",
            "dat-classifier", "tumour-seg")
#: Options that change what is printed while training, not what is trained.
DISPLAY_ONLY = ("progress",)


@pytest.mark.parametrize("name", SCRIPTED)
def test_committed_package_is_what_the_build_script_builds(name: str) -> None:
    from dicomnode.cli import build_parser
    from dicomnode.training.commands import TaskOptions, _options

    package = _package(name)
    task = package.card.task
    argv = _build_commands()[task]
    args = build_parser().parse_args(argv)
    scripted = _options(args).resolved().to_dict()
    recorded: dict[str, Any] = dict(package.card.provenance["training"]["options"])
    # An option added after the package was built was at its default (the old behaviour).
    expected = TaskOptions.from_dict(recorded).to_dict()
    for option in DISPLAY_ONLY:
        scripted.pop(option)
        expected.pop(option)
    assert scripted == expected
    assert set(recorded) - set(DISPLAY_ONLY) <= set(scripted)
    assert args.name is None and args.version == package.card.version


def _run_images(package: ModelPackage, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    spec = PreprocessSpec.from_dict(list(package.card.preprocessing))
    spec.require_fingerprint(package.card.provenance["preprocessing_fingerprint"])
    x = np.stack([assemble_tensor(spec, raw, "image") for raw in images]).astype(np.float32)
    result = _session(package).run(x)
    return np.asarray(result["logits"])[:, 0], np.asarray(result["cam"])


def test_pneumonia_scores_fresh_phantoms_sensibly() -> None:
    package = _package("pneumonia-cxr")
    assert FRESH_SEED not in _seeds(package).values()
    n = 12
    size = _phantom_size(package)
    pairs = [chest_xray_phantom_instance(FRESH_SEED, i, n, size=size) for i in range(n)]
    logits, cams = _run_images(package, [[ds] for ds, _ in pairs])
    labels = np.array([label == "pneumonia" for _, label in pairs])
    probabilities = sigmoid(logits)
    assert labels.sum() == n // 2
    assert probabilities[labels].mean() > probabilities[~labels].mean() + 0.2
    side = package.card.inputs[0].shape[-1]
    assert cams.shape == (n, 1, side, side)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 + 1e-5


def test_metastasis_scores_fresh_patients_sensibly() -> None:
    from dicomnode.training.heatmap_eval import evaluate_heatmaps
    from dicomnode.training.tasks_metastasis import head_ct_labels, head_ct_phantom_series

    package = _package("metastasis-ct")
    assert FRESH_SEED not in _seeds(package).values()
    n = 12  # six patients were too few to tell a 0.2 margin from noise
    matrix = _phantom_size(package)
    labels = head_ct_labels(FRESH_SEED, n)
    scores: list[float] = []
    truth: list[bool] = []
    for index in range(n):
        series = head_ct_phantom_series(FRESH_SEED, index, n, matrix=matrix, labels=labels)
        logits, cams = _run_images(package, [[ds] for ds in series.datasets])
        pooled = max_pool_slices(logits)
        assert cams.shape[0] == len(series.datasets)
        scores.append(float(sigmoid(pooled.logits)[0]))
        truth.append(any(series.slice_labels))
    patient = np.array(scores)
    positive = np.array(truth)
    assert 0 < positive.sum() < n
    assert patient[positive].mean() > patient[~positive].mean() + 0.2
    from dicomnode.training.tasks_metastasis import head_ct_heatmap_cases

    report = evaluate_heatmaps(package, head_ct_heatmap_cases(FRESH_SEED, n, matrix=matrix))
    assert len(report.cases) == positive.sum()
    assert report.input_size == tuple(package.card.inputs[0].shape[-2:])
