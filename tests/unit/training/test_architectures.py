"""Shapes, sizes and behaviour of the training architectures (plain torch, CPU, small)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dicomnode.training.architectures import (  # noqa: E402
    CnnBiLstm,
    CnnBiLstmConfig,
    DualEncoderFusion,
    FusionConfig,
    PatientMIL,
    WeightLoadError,
    count_parameters,
    load_torchvision_resnet_weights,
    max_pool_slices,
    resnet,
    resnet50_slice_classifier,
    small_slice_classifier,
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)


def test_resnet50_is_torchvision_resnet50_with_one_input_channel() -> None:
    model = resnet50_slice_classifier().eval()
    # torchvision's resnet50 trunk has 23,508,032 parameters; the 1-channel stem drops
    # 2 x 64 x 7 x 7 of them. The seed-002 head (2048 -> 512 -> 1) adds 1,049,601.
    assert count_parameters(model.backbone) == 23_508_032 - 2 * 64 * 7 * 7
    assert count_parameters(model.head) == 1_049_601
    with torch.no_grad():
        feature_map = model.features(torch.randn(1, 1, 96, 96))
        logits = model(torch.randn(2, 1, 64, 64))
    assert feature_map.shape == (1, 2048, 3, 3)  # stride 32: 256² gives the seed's 8 x 8
    assert logits.shape == (2, 1)


@pytest.mark.parametrize(("depth", "channels"), [(10, 64), (18, 64), (34, 64), (50, 256)])
def test_small_resnets_have_expected_shapes(depth: int, channels: int) -> None:
    trunk = resnet(depth, width=8)  # type: ignore[arg-type]
    assert trunk.out_channels == channels
    with torch.no_grad():
        assert trunk(torch.randn(2, 1, 64, 64)).shape == (2, channels, 2, 2)


def test_small_slice_classifier_is_small() -> None:
    mlp = small_slice_classifier(3)
    linear = small_slice_classifier(1, head="linear")
    assert count_parameters(mlp) < 100_000
    with torch.no_grad():
        assert mlp.eval()(torch.randn(4, 1, 48, 48)).shape == (4, 3)
        assert linear.eval()(torch.randn(4, 1, 48, 48)).shape == (4, 1)


def _fake_torchvision_state(depth: int, width: int = 64) -> dict[str, torch.Tensor]:
    """A state_dict laid out like torchvision's (RGB stem, fc head), random values."""
    state = dict(resnet(depth, in_channels=3, width=width).state_dict())  # type: ignore[arg-type]
    for key, value in state.items():
        if key.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            state[key] = 1.0 + 0.1 * torch.randn_like(value)
        elif key.endswith(("bias", "running_mean")):
            state[key] = 0.1 * torch.randn_like(value)
        elif key.endswith("running_var"):
            state[key] = 1.0 + 0.1 * torch.rand_like(value)
    channels = resnet(depth, width=width).out_channels  # type: ignore[arg-type]
    state["fc.weight"] = torch.randn(1000, channels)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_stem_from_rgb_weights_is_their_channel_mean(tmp_path: Path) -> None:
    state = _fake_torchvision_state(50)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    model = resnet(50)
    report = load_torchvision_resnet_weights(model, path)
    assert report.ignored == ("fc.bias", "fc.weight")
    assert report.stem_reduction == "mean"
    assert report.stem_source_channels == 3
    loaded = model.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"].mean(dim=1, keepdim=True))
    assert loaded["conv1.weight"].shape == (64, 1, 7, 7)
    for key in (
        "layer1.0.conv1.weight",
        "layer3.5.bn3.running_var",
        "layer4.0.downsample.0.weight",
    ):
        assert torch.equal(loaded[key], state[key])


def test_summed_stem_reproduces_the_rgb_network_on_a_grey_image() -> None:
    state = _fake_torchvision_state(18, width=8)
    rgb = resnet(18, in_channels=3, width=8).eval()
    rgb.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    grey = resnet(18, width=8).eval()
    load_torchvision_resnet_weights(grey, state, stem_reduction="sum")
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(image), rgb(image.repeat(1, 3, 1, 1)))


def test_weights_of_another_depth_are_refused() -> None:
    with pytest.raises(WeightLoadError, match="do not match"):
        load_torchvision_resnet_weights(resnet(50, width=8), _fake_torchvision_state(18, 8))


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_torchvision_resnet_weights(resnet(10, width=8), tmp_path / "absent.pth")


def test_patient_logit_is_max_over_real_slices() -> None:
    mil = PatientMIL(small_slice_classifier(1, head="linear")).eval()
    images = torch.randn(2, 5, 1, 32, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    patient, slices = mil(images, mask)
    assert patient.shape == (2, 1) and slices.shape == (2, 5, 1)
    assert torch.equal(patient[0], slices[0].max(dim=0).values)
    assert torch.equal(patient[1], slices[1, :2].max(dim=0).values)


def test_max_pooling_sends_gradient_to_one_slice_only() -> None:
    logits = torch.tensor([[[0.1], [2.0], [-1.0]]], requires_grad=True)
    max_pool_slices(logits).sum().backward()
    assert logits.grad is not None
    assert logits.grad.flatten().tolist() == [0.0, 1.0, 0.0]


def _fusion() -> DualEncoderFusion:
    return DualEncoderFusion(FusionConfig.small())


def test_fusion_heads_have_expected_shapes() -> None:
    model = _fusion().eval()
    presence = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        out = model(torch.randn(3, 1, 64, 64), torch.randn(3, 1, 64, 64), presence)
    assert out.class_logits.shape == (3, 3)
    assert out.stage_logits.shape == (3, 4)
    assert out.risk.shape == (3, 1)


def test_absent_modality_image_has_no_effect() -> None:
    model = _fusion().eval()
    ct = torch.randn(2, 1, 64, 64)
    presence = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    with torch.no_grad():
        first = model(ct, torch.zeros(2, 1, 64, 64), presence)
        second = model(ct, torch.randn(2, 1, 64, 64), presence)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_modality_dropout_hides_one_modality_never_both() -> None:
    model = DualEncoderFusion(FusionConfig.small()).train()
    presence = torch.ones(4000, 2)
    effective = model.effective_presence(presence)
    assert (effective.sum(dim=1) >= 1).all()
    dropped = (effective.sum(dim=1) == 1).float().mean().item()
    assert 0.25 < dropped < 0.35  # modality_dropout = 0.3
    single = torch.tensor([[1.0, 0.0]] * 100)
    assert torch.equal(model.effective_presence(single), single)
    assert torch.equal(model.eval().effective_presence(presence), presence)


def test_cnn_bilstm_small_variant_fits_small_data() -> None:
    small = CnnBiLstm(CnnBiLstmConfig.small()).eval()
    assert 1_000 <= count_parameters(small) <= 50_000
    assert count_parameters(CnnBiLstm()) > 1_000_000  # the seed-000 scale, for benchmarks
    with torch.no_grad():
        assert small(torch.randn(2, 16, 128, 128)).shape == (2, 1)


def test_invalid_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        resnet(20)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modality_dropout"):
        DualEncoderFusion(FusionConfig(depth=10, width=8, modality_dropout=1.0))
    with pytest.raises(ValueError, match="conv_channels"):
        CnnBiLstm(CnnBiLstmConfig(conv_channels=()))
