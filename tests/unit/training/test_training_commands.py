"""`dicomnode train|evaluate|export` end to end on tiny phantoms, and the proof that the
training loader and the serving path give identical tensors for the same DICOM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from dicomnode.cli import main  # noqa: E402
from dicomnode.imaging import PreprocessSpec, apply_spec  # noqa: E402
from dicomnode.inference import load_package  # noqa: E402
from dicomnode.inference.runtime import ModelSession  # noqa: E402
from dicomnode.phantoms.chest_xray import (  # noqa: E402
    make_chest_xray_batch,
    write_chest_xray_study,
)
from dicomnode.training.commands import TASKS, TaskOptions  # noqa: E402
from dicomnode.training.datasets import dicom_csv_dataset  # noqa: E402

FAST = ["--n-boot", "200", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    # Two cores shared with other jobs: one intra-op thread is many times faster here.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    models = tmp_path_factory.mktemp("models")
    argv = ["train", "pneumonia", "--data", "phantom", "--n-train", "64", "--size", "64",
            "--epochs", "1", "--out", str(models), *FAST]
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return models / "pneumonia-cxr", out.getvalue()


def test_train_writes_a_verified_package_with_an_honest_card(trained: tuple[Path, str]) -> None:
    directory, stdout = trained
    assert "wrote" in stdout and "AUC" in stdout
    package = load_package(directory)
    card = package.card
    assert card.task == "pneumonia" and card.inputs[0].shape == ("batch", 1, 64, 64)
    spec = PreprocessSpec.from_dict(list(card.preprocessing))
    assert card.provenance["preprocessing_fingerprint"] == spec.fingerprint
    assert [s["name"] for s in card.preprocessing] == [
        "modality_lut", "robust_minmax", "resize", "clahe", "zscore"]
    assert card.training_data.synthetic
    assert "synthetic phantoms, not for clinical use" in card.training_data.description
    assert card.training_data.cases == {"train": 64, "val": 16, "test": 32}
    seeds = card.provenance["training"]["data_provenance"]["seeds"]
    assert seeds["test"] not in (seeds["train"], seeds["val"])
    metrics = {m.name: m for m in card.metrics}
    assert "auc" in metrics and metrics["auc"].ci_lower <= metrics["auc"].value
    assert metrics["auc"].dataset == "held-out test set (n=32)"
    assert {p.name for p in card.operating_points} == {"f1-optimal", "sensitivity-0.9"}
    for point in card.operating_points:
        assert "chosen on validation" in point.dataset and point.class_name == "pneumonia"
    assert {o.name: o.kind for o in card.outputs} == {"logits": "logits", "cam": "cam"}
    evaluation = directory / "evaluation"
    assert {p.name for p in evaluation.iterdir()} == {
        "report.json", "roc.png", "pr.png", "reliability.png", "heatmaps.json"}
    served = json.loads((evaluation / "report.json").read_text())
    assert served["extra"]["sha256"] == card.sha256
    assert (directory / "training" / "checkpoint.pt").is_file()


def test_training_loader_and_serving_path_give_identical_tensors(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    root = tmp_path / "patients"
    files = write_chest_xray_study(root, n=2, seed=71, size=160, photometric="MONOCHROME1",
                                   bits_stored=12)
    files += write_chest_xray_study(root, n=2, seed=72, size=144, photometric="MONOCHROME2",
                                    bits_stored=15, rescale=True)
    patients = sorted({f.parent.name for f in files})
    (tmp_path / "labels.csv").write_text(
        "patient_id,label,split\n" + "".join(f"{p},normal,train\n" for p in patients),
        encoding="utf-8")
    training_spec = TASKS["pneumonia"].spec(TaskOptions(size=64))  # type: ignore[misc]
    dataset = dicom_csv_dataset(root, tmp_path / "labels.csv", training_spec,
                                classes=("normal", "pneumonia")).train
    card = yaml.safe_load((trained[0] / "model.yaml").read_text(encoding="utf-8"))
    serving_spec = PreprocessSpec.from_dict(card["preprocessing"])
    serving_spec.require_fingerprint(card["provenance"]["preprocessing_fingerprint"])
    assert len(dataset) == 4
    for index, sample in enumerate(dataset.samples):
        ds = pydicom.dcmread(sample.files[0])
        served = apply_spec(serving_spec, [ds])
        assert served.shape == (1, 1, 64, 64) and served.dtype == np.float32
        assert np.array_equal(dataset.tensor(index), served[0])


def test_evaluate_rescores_the_package_through_onnx_runtime(
    trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(trained[0]), "--data", "phantom", "--n", "40",
               "--seed", "555", "--out", str(out), "--n-boot", "100"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "WARNING" in printed  # 20 per class is too few to trust
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 40 and report["class_counts"] == {"normal": 20, "pneumonia": 20}
    assert report["extra"]["provider"] == "CPUExecutionProvider"
    assert any(p["selected_on"].startswith("model card") for p in report["operating_points"])
    assert all((out / name).is_file() for name in ("roc.png", "pr.png", "reliability.png"))
    assert main(["evaluate", "--model", str(trained[0]), "--n", "40", "--seed", "555",
                 "--json", "--n-boot", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["auc"]["value"] == pytest.approx(
        report["auc"]["value"])


def test_evaluate_refuses_phantoms_the_model_was_trained_on(
    trained: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(trained[0]), "--seed", "0"]) == 1
    assert "measures memory" in capsys.readouterr().err


def test_export_rebuilds_the_same_model_from_its_checkpoint(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    checkpoint = trained[0] / "training" / "checkpoint.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path),
                 "--name", "pneumonia-again"]) == 0
    original, again = load_package(trained[0]), load_package(tmp_path / "pneumonia-again")
    assert again.card.metrics == original.card.metrics
    assert again.card.preprocessing == original.card.preprocessing
    assert again.card.operating_points == original.card.operating_points
    x = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    first = ModelSession(original).run(x)["logits"]
    second = ModelSession(again).run(x)["logits"]
    assert np.allclose(first, second, atol=1e-6)


def _kaggle_pngs(root: Path) -> Path:
    for part, (n, seed) in {"train": (16, 1), "val": (8, 2), "test": (8, 3)}.items():
        images, labels, _ = make_chest_xray_batch(seed, n, size=48)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / part / ("PNEUMONIA" if label else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            name = (f"person{seed}{index:02d}_virus_{index}.jpeg" if label
                    else f"IM-{seed}{index:03d}-0001.jpeg")
            cv2.imwrite(str(folder / name), np.round(image * 255).astype(np.uint8))
    return root


def test_train_from_kaggle_class_folders(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = _kaggle_pngs(tmp_path / "chest_xray")
    rc = main(["train", "pneumonia", "--data", "folder", "--root", str(root), "--size", "32",
               "--epochs", "1", "--out", str(tmp_path / "models"), "--name", "cxr-folders",
               "--folds", "2", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert "2-fold cross-validation by patient" in capsys.readouterr().out
    package = tmp_path / "models" / "cxr-folders"
    card = load_package(package).card
    assert not card.training_data.synthetic
    assert card.training_data.cases == {"train": 16, "val": 8, "test": 8}
    assert "class folders" in card.training_data.description
    cv = card.provenance["training"]["cross_validation"]
    assert cv["k"] == 2 and len(cv["fold_auc"]) == 2
    folds = json.loads((package / "training" / "cross_validation.json").read_text())
    assert sum(f["n_val"] for f in folds["folds"]) == 24  # train + val, never test


def test_unknown_or_unfinished_tasks_fail_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "no-such-task", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'no-such-task'" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "pneumonia", "--data", "folder", "--out", str(tmp_path)]) == 1
    assert "--root" in capsys.readouterr().err
    assert main(["train", "nonsense", "--out", str(tmp_path)]) == 1
    assert "unknown task" in capsys.readouterr().err


def test_the_cli_does_not_import_torch() -> None:
    code = ("import sys, dicomnode.cli; dicomnode.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
