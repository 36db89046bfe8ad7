"""The bundled brain tumour packages (CT, MR, CT + MR fusion) as the node serves them, on
phantoms no training step saw, and the numpy serving rules they depend on."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from dicomnode.imaging import PreprocessSpec
from dicomnode.inference import ModelPackage, load_package
from dicomnode.inference.runtime import RuntimeSettings, open_session
from dicomnode.training.tasks_brain import (
    CLASSES,
    HEATMAP_METRIC,
    STAGES,
    PatientData,
    SeriesTensors,
    cam_peak_hit,
    fit_series_calibration,
    fusion_series_result,
    keep_resolution,
    make_brain_case,
    prepare_series,
    risk_proxy,
    series_result,
    slice_arrays,
    slice_masks,
    stage_proxy,
    tumour_score,
)

MODELS = Path(__file__).resolve().parents[3] / "models"
#: A phantom seed none of the bundled models was trained, validated or tested on.
FRESH_SEED = 424242
MAX_PACKAGE_BYTES = 20 * 1024 * 1024


def _session(package: ModelPackage) -> Any:
    return open_session(package, RuntimeSettings(providers=("cpu",), intra_op_threads=1,
                                                 max_batch=64))


def _spec(steps: Any, fingerprint: object) -> PreprocessSpec:
    spec = PreprocessSpec.from_dict(list(steps))
    assert isinstance(fingerprint, str)
    spec.require_fingerprint(fingerprint)
    return spec


def _check_card(package: ModelPackage, headline: str, *, cams: tuple[str, ...]) -> None:
    card = package.card
    assert card.training_data.synthetic
    assert "synthetic phantoms" in card.intended_use.lower()
    assert "not for clinical use" in card.intended_use.lower()
    assert "synthetic phantoms, not for clinical use" in card.training_data.description
    assert any("synthetic phantoms" in line for line in card.limitations)
    metrics = {m.name: m for m in card.metrics}
    for name in (headline, "ece", *cams):
        metric = metrics[name]
        assert metric.ci_lower <= metric.value <= metric.ci_upper, name
        assert metric.ci_upper > metric.ci_lower or metric.value in (0.0, 1.0), name
        assert "held-out test patients" in metric.dataset and "served" in metric.dataset
    assert card.operating_points
    for point in card.operating_points:
        assert 0.0 <= point.sensitivity <= 1.0 and 0.0 <= point.specificity <= 1.0
        assert ("threshold chosen on validation" in point.dataset
                or "threshold chosen on calibration patients" in point.dataset)
        assert f"sensitivity@{point.name}" in metrics and f"specificity@{point.name}" in metrics
    seeds = card.provenance["training"]["data_provenance"]["seeds"]
    assert seeds["test"] not in (seeds["train"], seeds["val"])
    assert FRESH_SEED not in seeds.values()
    assert package.onnx_path.stat().st_size < MAX_PACKAGE_BYTES


def _series(package: ModelPackage, modality: str, label: str, index: int) -> tuple[
        Mapping[str, np.ndarray], Any]:
    case = make_brain_case(FRESH_SEED, index, label, modalities=(modality,))  # type: ignore[arg-type]
    card = package.card
    tensors = prepare_series(*case.series(modality),  # type: ignore[arg-type]
                             _spec(card.preprocessing,
                                   card.provenance["preprocessing_fingerprint"]))
    return _session(package).run({"image": tensors.images}).outputs, tensors


# --- the serving rules ------------------------------------------------------------------


def test_key_slice_is_the_most_tumour_like_slice_and_explains_the_series() -> None:
    binary = np.array([[-3.0], [2.5], [0.1]])
    assert tumour_score(binary).tolist() == [-3.0, 2.5, 0.1]
    three = np.array([[4.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]])
    cams = np.zeros((3, 3, 8, 8), dtype=np.float32)
    cams[1, 2, 5, 6] = 1.0
    result = series_result(three, cams)
    assert result.key_slice == 1 and result.cam_class == 2
    assert np.isclose(result.probabilities.sum(), 1.0)
    assert result.cam is not None and result.cam[5, 6] == 1.0
    assert series_result(binary).key_slice == 1


def test_cam_peak_hit_dilates_the_mask_by_the_tolerance() -> None:
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:13, 10:13] = True
    cam = np.zeros((32, 32))
    cam[12, 15] = 1.0  # 3 px right of the lesion's edge
    assert cam_peak_hit(cam, mask, 3) and not cam_peak_hit(cam, mask, 2)
    assert not cam_peak_hit(np.zeros((32, 32)), mask)  # no evidence, no peak


def test_training_masks_are_those_of_the_tumour_labelled_slices() -> None:
    tumour = np.zeros((4, 8, 8), dtype=bool)
    tumour[1, :4, :4] = True  # 16 px: a tumour slice
    tumour[2, 0, :3] = True  # a 3 px sliver: labelled healthy, so no mask
    tumour[3, 2:6, 2:6] = True
    images = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 1, 8, 8),
                                                                         np.float32)
    patient = PatientData("p", 1, 1.0, {"MR": SeriesTensors(images, tumour)},
                          {"MR": np.array([3, 0, 1, 2])})
    x, y, _ = slice_arrays([patient], "MR", binary=False)
    masks = slice_masks([patient], "MR")
    assert y.tolist() == [1, 0, 1, 0] and x[:, 0, 0, 0].tolist() == [3, 0, 1, 2]
    assert masks.shape == (4, 8, 8) and masks.dtype == np.uint8
    assert masks.sum(axis=(1, 2)).tolist() == [16, 0, 16, 0]


def test_three_class_localisation_trains_each_tumour_slice_own_class_map() -> None:
    torch = pytest.importorskip("torch")
    from dicomnode.training.architectures import small_slice_classifier
    from dicomnode.training.augment import Augmentation
    from dicomnode.training.gradcam import class_evidence
    from dicomnode.training.loop import TrainConfig, fit

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 4, dtype=np.int64)
    x = rng.normal(size=(12, 1, 32, 32)).astype(np.float32)
    masks = np.zeros((12, 32, 32), dtype=np.uint8)
    masks[y > 0, 8:16, 18:26] = 1
    x[y > 0, :, 8:16, 18:26] += 3.0
    model = small_slice_classifier(3, depth=10, width=4)
    keep_resolution(model.backbone)  # an 8 x 8 grid, as the MR model's 32 x 32
    features = model.features(torch.from_numpy(x))
    own = class_evidence(model, features, torch.from_numpy(y))
    for i, k in enumerate(y.tolist()):
        assert torch.allclose(own[i], class_evidence(model, features, k)[i])
    config = TrainConfig(epochs=2, batch_size=6, augmentation=Augmentation(), progress=False,
                         localisation_weight=1.0)
    result = fit(model, (x, y), (x, y), config, loss_kind="ce", n_classes=3, stream=None,
                 masks=masks)
    assert all(np.isfinite(r.train_localisation_loss) for r in result.history)


def test_fusion_evidence_is_the_served_cam_before_its_relu() -> None:
    torch = pytest.importorskip("torch")
    from dicomnode.training.architectures import DualEncoderFusion, FusionConfig
    from dicomnode.training.gradcam import FusionWithCam, fusion_class_evidence, upsample_cam

    torch.manual_seed(0)
    model = DualEncoderFusion(dataclasses.replace(FusionConfig.small(), width=4,
                                                  modality_dropout=0.0))
    keep_resolution(model.ct_encoder)
    keep_resolution(model.mr_encoder)
    model.eval()
    ct, mr = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    presence = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    classes = torch.tensor([1, 2, 1])
    with torch.no_grad():
        served = FusionWithCam(model, "all")(ct, mr, presence)
        maps = (model.ct_encoder(ct), model.mr_encoder(mr))
        evidence = fusion_class_evidence(model, *maps, presence, classes)
    for grid, cams, encoder in zip(evidence, served[3:], (model.ct_encoder, model.mr_encoder),
                                   strict=True):
        up = upsample_cam(torch.relu(grid)[:, None], (32, 32), encoder.output_stride)[:, 0]
        up = up / up.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        assert torch.allclose(up, cams[torch.arange(3), classes], atol=1e-5)
    assert float(evidence[0][2].abs().max()) == 0.0  # CT absent: no CT evidence
    assert float(evidence[1][1].abs().max()) == 0.0


def test_proxies_are_monotone_in_size_and_malignancy() -> None:
    assert [stage_proxy(v) for v in (0.5, 5.0, 20.0, 60.0)] == [0, 1, 2, 3]
    assert len(STAGES) == 4
    assert risk_proxy("healthy", 10.0) == 0.0
    assert 0 < risk_proxy("benign", 5.0) < risk_proxy("benign", 20.0)
    assert risk_proxy("benign", 60.0) < risk_proxy("malignant", 0.5)


def test_series_calibration_finds_a_known_platt_map() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0.0, 2.0, 400)
    labels = (rng.random(400) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    series = [np.array([[2.0 * z]]) for z in true_logit]  # twice too confident
    fit = fit_series_calibration(series, labels)
    assert fit.method == "platt"
    assert abs(fit.scale - 0.5) < 0.15 and fit.nll_after <= fit.nll_before


def test_fusion_rule_runs_each_series_alone_then_the_key_pair() -> None:
    calls: list[tuple[int, tuple[float, float]]] = []

    def run(ct: np.ndarray, mr: np.ndarray, presence: np.ndarray) -> dict[str, np.ndarray]:
        calls.append((ct.shape[0], tuple(presence[0].tolist())))
        logits = np.zeros((ct.shape[0], 3))
        logits[:, 2] = (ct[:, 0, 0, 0] + mr[:, 0, 0, 0])  # the slice value is its score
        n = ct.shape[0]
        return {"class_logits": logits, "stage_logits": np.zeros((n, 4)),
                "risk": np.ones((n, 1)), "ct_cam": np.zeros((n, 3, 2, 2)),
                "mr_cam": np.zeros((n, 3, 2, 2))}

    ct = np.zeros((4, 1, 2, 2), dtype=np.float32)
    ct[2] = 5.0
    mr = np.zeros((6, 1, 2, 2), dtype=np.float32)
    mr[4] = 3.0
    both = fusion_series_result(run, ct, mr)
    assert (both.ct_key, both.mr_key) == (2, 4)
    assert calls == [(4, (1.0, 0.0)), (6, (0.0, 1.0)), (1, (1.0, 1.0))]
    assert both.class_logits[2] == 8.0 and both.risk == 1.0
    calls.clear()
    alone = fusion_series_result(run, None, mr)
    assert calls == [(6, (0.0, 1.0))] and alone.ct_cam is None and alone.ct_key is None
    assert alone.class_logits[2] == 3.0


# --- the bundled packages, served ---------------------------------------------------------


def test_ct_package_scores_fresh_tumour_phantoms_above_healthy_ones() -> None:
    package = load_package(MODELS / "brain-tumour-ct")  # sha256 and graph signature
    _check_card(package, "auc", cams=(HEATMAP_METRIC,))
    assert [o.name for o in package.card.outputs] == ["logits", "cam"]
    scores: dict[str, list[float]] = {"healthy": [], "tumour": []}
    for index, label in enumerate(("healthy", "malignant", "healthy", "benign")):
        out, tensors = _series(package, "CT", label, index)
        assert out["cam"].shape == (tensors.images.shape[0], 1, 128, 128)
        result = series_result(out["logits"], out["cam"])
        assert result.cam is not None and 0.0 <= result.cam.min() <= result.cam.max() <= 1.0
        scores["healthy" if label == "healthy" else "tumour"].append(
            float(result.probabilities[0]))
    assert np.mean(scores["tumour"]) > np.mean(scores["healthy"]) + 0.3


def test_mr_package_gives_malignant_phantoms_the_higher_malignant_probability() -> None:
    package = load_package(MODELS / "brain-tumour-mr")
    _check_card(package, "macro_auc", cams=(HEATMAP_METRIC,))
    assert package.card.output("logits").classes == CLASSES
    malignant: dict[str, list[float]] = {"healthy": [], "malignant": []}
    for index, label in enumerate(("malignant", "healthy", "malignant", "healthy")):
        out, _ = _series(package, "MR", label, 10 + index)
        result = series_result(out["logits"], out["cam"])
        assert np.isclose(result.probabilities.sum(), 1.0)
        malignant[label].append(float(result.probabilities[2]))
    assert np.mean(malignant["malignant"]) > np.mean(malignant["healthy"]) + 0.3


def test_fusion_package_runs_with_mr_only_and_with_ct_and_mr() -> None:
    package = load_package(MODELS / "brain-tumour-fusion")
    _check_card(package, "macro_auc",
                cams=(HEATMAP_METRIC, f"{HEATMAP_METRIC}_ct"))
    card = package.card
    assert {m.name for m in card.metrics} >= {"mr_only:macro_auc", "ct_only:macro_auc",
                                              "stage_proxy_accuracy", "risk_proxy_concordance"}
    for output in ("stage_logits", "risk"):
        assert "SYNTHETIC PROXY" in card.output(output).meaning
        assert "not validated" in card.output(output).meaning
    ct_steps = card.provenance["input_preprocessing"]["ct"]
    specs = {"CT": _spec(ct_steps["steps"], ct_steps["fingerprint"]),
             "MR": _spec(card.preprocessing, card.provenance["preprocessing_fingerprint"])}
    session = _session(package)

    def run(ct: np.ndarray, mr: np.ndarray, presence: np.ndarray) -> Mapping[str, np.ndarray]:
        outputs: Mapping[str, np.ndarray] = session.run(
            {"ct": ct, "mr": mr, "presence": presence}).outputs
        return outputs

    malignant_probability: dict[str, float] = {}
    mr_only_malignant: dict[str, float] = {}
    for index, label in enumerate(("healthy", "malignant")):
        case = make_brain_case(FRESH_SEED, 20 + index, label)
        tensors = {m: prepare_series(*case.series(m), specs[m])
                   for m in ("CT", "MR")}
        mr_only = fusion_series_result(run, None, tensors["MR"].images)
        assert mr_only.ct_cam is None and mr_only.mr_cam is not None
        assert mr_only.stage_logits.shape == (4,) and np.isfinite(mr_only.risk)
        both = fusion_series_result(run, tensors["CT"].images, tensors["MR"].images)
        assert both.ct_cam is not None and both.mr_cam is not None
        assert np.isclose(both.probabilities.sum(), 1.0)
        malignant_probability[label] = float(both.probabilities[2])
        mr_only_malignant[label] = float(mr_only.probabilities[2])
        if label == "malignant":
            assert both.probabilities.argmax() == 2
    assert malignant_probability["malignant"] > malignant_probability["healthy"] + 0.3
    # From MR alone only the ranking is asked (the malignant patient above the healthy
    # one): two patients say nothing about how the single-modality path is calibrated.
    assert mr_only_malignant["malignant"] > mr_only_malignant["healthy"]
