"""Export to ONNX: agreement with torch, in-graph Grad-CAM vs autograd Grad-CAM, packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from torch import nn  # noqa: E402

from dicomnode.inference import (  # noqa: E402
    Metric,
    ModelCard,
    OperatingPoint,
    TrainingData,
    load_package,
)
from dicomnode.inference.package import sha256_file  # noqa: E402
from dicomnode.training import export as export_module  # noqa: E402
from dicomnode.training.architectures import (  # noqa: E402
    CnnBiLstm,
    CnnBiLstmConfig,
    DualEncoderFusion,
    FusionConfig,
    GapClassifier,
    small_slice_classifier,
)
from dicomnode.training.export import (  # noqa: E402
    AgreementReport,
    ExportMismatchError,
    OutputAgreement,
    OutputDescription,
    compare_with_torch,
    estimate_activation_bytes,
    export_onnx,
    write_model_package,
)
from dicomnode.training.gradcam import FusionWithCam, WithCam, grad_cam  # noqa: E402

CAM_TOLERANCE = 1e-4


def _like_trained(model: nn.Module, seed: int) -> nn.Module:
    """Give batch-norm layers non-trivial running statistics, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape  # type: ignore[union-attr]
            module.running_mean = 0.2 * torch.randn(shape, generator=generator)
            module.running_var = 0.5 + torch.rand(shape, generator=generator)
            module.weight.data = 0.5 + torch.rand(shape, generator=generator)
            module.bias.data = 0.2 * torch.randn(shape, generator=generator)
    return model.eval()


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


def test_cnn_bilstm_export_agrees_with_torch_at_other_batch_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _like_trained(CnnBiLstm(CnnBiLstmConfig.small()), 0)
    example = {"slices": torch.randn(2, 16, 32, 32)}
    path = export_onnx(model, example, tmp_path / "dat.onnx", output_names=["logits"])
    report = compare_with_torch(model, path, example, batch_sizes=(1, 3))
    assert report.passed, report
    assert report.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [("slices", [16, 32, 32])]
    assert isinstance(session.get_inputs()[0].shape[0], str)
    assert estimate_activation_bytes(path) > 16 * 32 * 32 * 4


def _classifier_with_visible_cams(classes: int, head: str) -> GapClassifier:
    """A small classifier whose CAMs are not all zero, so comparisons are not vacuous.

    At random initialisation a score may have no positive evidence anywhere (Grad-CAM's
    ReLU then gives an empty map); seeds are tried in order until most maps have a peak.
    """
    images = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(99))
    for seed in range(50):
        torch.manual_seed(seed)
        model = _like_trained(small_slice_classifier(classes, head=head), seed)  # type: ignore[arg-type]
        assert isinstance(model, GapClassifier)
        with torch.no_grad():
            _, cam = WithCam(model)(images)
        if (cam.amax(dim=(2, 3)) > 0.999).float().mean() >= 0.75:
            return model
    raise AssertionError("no seed gave visible CAMs")


@pytest.mark.parametrize(("head", "classes"), [("mlp", 1), ("linear", 3)])
def test_onnx_cam_equals_autograd_grad_cam(tmp_path: Path, head: str, classes: int) -> None:
    model = _classifier_with_visible_cams(classes, head)
    wrapper = WithCam(model, "all", include_raw=True)
    images = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(99))
    path = export_onnx(
        wrapper, {"image": images[:2]}, tmp_path / "cam.onnx", output_names=wrapper.output_names
    )
    logits, cam, raw = _run(path, {"image": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=1e-4, atol=1e-5)
    assert cam.shape == (4, classes, 64, 64) and raw.shape == (4, classes, 2, 2)
    for k in range(classes):
        reference = grad_cam(model, [images], model.backbone.layer4, class_index=k)
        assert np.abs(cam[:, k] - reference.cam.numpy()).max() < CAM_TOLERANCE
        np.testing.assert_allclose(raw[:, k], reference.raw.numpy(), rtol=1e-3, atol=1e-8)
    assert ((cam >= 0) & (cam <= 1)).all()


@pytest.mark.parametrize("target", ["all", "predicted", 2])
def test_in_graph_cam_matches_reference_for_every_target(target: str | int) -> None:
    model = _classifier_with_visible_cams(3, "mlp")
    images = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        logits, cam = WithCam(model, target)(images)  # type: ignore[arg-type]
    if target == "all":
        for k in range(3):
            reference = grad_cam(model, [images], model.backbone.layer4, class_index=k)
            assert (cam[:, k] - reference.cam).abs().max() < CAM_TOLERANCE
        return
    index = None if target == "predicted" else int(target)
    reference = grad_cam(model, [images], model.backbone.layer4, class_index=index)
    assert cam.shape == (4, 1, 64, 64)
    assert (cam[:, 0] - reference.cam).abs().max() < CAM_TOLERANCE
    if target == "predicted":
        assert torch.equal(reference.class_index, logits.argmax(dim=1))


def test_fusion_export_and_cams_equal_torch_per_modality(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = _like_trained(DualEncoderFusion(FusionConfig.small()), 3)
    assert isinstance(model, DualEncoderFusion)
    wrapper = FusionWithCam(model)
    ct, mr = torch.randn(3, 1, 64, 64), torch.randn(3, 1, 64, 64)
    presence = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    example = {"ct": ct, "mr": mr, "presence": presence}
    path = export_onnx(
        wrapper, example, tmp_path / "fusion.onnx", output_names=wrapper.output_names
    )
    report = compare_with_torch(wrapper, path, example, batch_sizes=(1, 3))
    assert report.passed, report
    out = _run(path, {k: v.numpy() for k, v in example.items()})
    with torch.no_grad():
        heads = model(ct, mr, presence)
    for got, want in zip(out[:3], heads, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    ct_cam, mr_cam = out[3], out[4]
    for k in range(model.config.num_classes):
        for layer, cam in ((model.ct_encoder, ct_cam), (model.mr_encoder, mr_cam)):
            reference = grad_cam(
                model, [ct, mr, presence], layer, class_index=k, score=lambda o: o.class_logits
            )
            assert np.abs(cam[:, k] - reference.cam.numpy()).max() < CAM_TOLERANCE
    assert not ct_cam[2].any() and not mr_cam[1].any()  # an absent modality has no map
    assert ct_cam[0].max() > 0.999 or mr_cam[0].max() > 0.999


def test_with_cam_refuses_a_head_it_cannot_differentiate() -> None:
    model = GapClassifier(
        small_slice_classifier().backbone, nn.Sequential(nn.Linear(64, 1), nn.Sigmoid())
    ).eval()
    with pytest.raises(TypeError, match="Sigmoid"):
        WithCam(model)(torch.randn(1, 1, 32, 32))


def _describe(tmp_models: Path, model: nn.Module) -> dict[str, object]:
    return {
        "name": "toy-mets",
        "version": "0.1.0",
        "task": "slice-classification",
        "modality": "CT",
        "outputs": [
            OutputDescription(
                "logits",
                "logits",
                "metastasis logit per slice",
                classes=("metastasis",),
                activation="sigmoid",
            ),
            OutputDescription(
                "cam",
                "cam",
                "Grad-CAM, per-image max normalised",
                classes=("metastasis",),
                explains="logits",
                cam_target="all",
            ),
        ],
        "preprocessing": [
            {"op": "hu_window", "center": 40, "width": 80},
            {"op": "resize", "size": [64, 64]},
        ],
        "operating_points": [
            OperatingPoint(
                "screening", "logits", 0.2, 0.95, 0.61, class_name="metastasis", dataset="test n=40"
            )
        ],
        "training_data": TrainingData(
            "synthetic phantoms", {"train": 200, "test": 40}, synthetic=True
        ),
        "metrics": [Metric("auc", 0.81, 0.72, 0.89, method="bootstrap 2000")],
        "intended_use": "Research only; not for diagnostic use.",
    }


def test_write_model_package_writes_a_verified_package(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _like_trained(small_slice_classifier(1), 0)
    assert isinstance(model, GapClassifier)
    written = write_model_package(
        WithCam(model), {"image": torch.randn(2, 1, 64, 64)}, tmp_path, **_describe(tmp_path, model)
    )  # type: ignore[arg-type]
    directory = tmp_path / "toy-mets"
    assert sorted(p.name for p in directory.iterdir()) == ["model.onnx", "model.yaml"]
    card = written.package.card
    assert card.sha256 == sha256_file(directory / "model.onnx")
    assert card.inputs[0].shape == ("batch", 1, 64, 64)
    assert card.output("cam").shape == ("batch", 1, 64, 64)
    assert card.cam_outputs[0].explains == "logits"
    assert card.preprocessing[1] == {"op": "resize", "size": [64, 64]}
    assert card.resources is not None and card.resources.activation_bytes_per_sample > 0
    assert written.agreement.passed
    assert card.provenance["agreement"]["batch_sizes"] == [2, 3]
    assert ModelCard.from_mapping(card.to_mapping()) == card
    assert load_package(directory) == written.package


def test_disagreeing_export_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = AgreementReport(
        (OutputAgreement("logits", 2, (2, 1), 0.5, 0.5, passed=False),), 1e-3, 1e-4
    )
    monkeypatch.setattr(export_module, "compare_with_torch", lambda *a, **k: failing)
    monkeypatch.setattr(
        export_module,
        "export_onnx",
        lambda model, inputs, path, **k: path.write_bytes(b"onnx") and path,
    )
    model = small_slice_classifier(1).eval()
    with pytest.raises(ExportMismatchError, match="logits"):
        write_model_package(
            WithCam(model),
            {"image": torch.randn(2, 1, 32, 32)},
            tmp_path,
            **_describe(tmp_path, model),
        )  # type: ignore[arg-type]
    assert list((tmp_path / "toy-mets").iterdir()) == []
