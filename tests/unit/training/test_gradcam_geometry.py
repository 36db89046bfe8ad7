"""The served heat map lies where the evidence is, in rows and in columns.

A ResNet cell ``j`` of total stride ``S`` is centred on input pixel ``S·j``; upsampling
with ``align_corners=False`` put it at ``S·j + (S − 1)/2`` and so moved every map 3.5 px
(stride 8) to 15.5 px (stride 32) down and to the right, which the comparison of the
in-graph CAM with the autograd reference could not see (both used that convention).
A trunk with constant positive kernels responds symmetrically around a bright spot, so
its map must peak on the spot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomnode.training.architectures import GapClassifier, resnet
from dicomnode.training.commands import TrainingRunError, _reduce_output_stride
from dicomnode.training.gradcam import WithCam, grad_cam, upsample_cam
from dicomnode.training.heatmap_eval import map_peak


def _symmetric_model(output_stride: int) -> GapClassifier:
    """ResNet-10 whose every kernel is constant and positive, BN the identity, a linear
    head of ones: its Grad-CAM is the channel mean of a mirror-symmetric response."""
    trunk = resnet(10, width=4)
    if output_stride != 32:
        _reduce_output_stride(trunk, output_stride)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0 / module.weight[0].numel())
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()  # type: ignore[union-attr, operator]
            module.running_var.fill_(1.0)  # type: ignore[union-attr, operator]
    head = nn.Linear(trunk.out_channels, 1)
    nn.init.ones_(head.weight)
    nn.init.zeros_(head.bias)
    return GapClassifier(trunk, head).eval()


def _spot(size: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row - 1 : row + 2, col - 1 : col + 2] = 10.0
    return image


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_resnet_output_stride_follows_the_strides(output_stride: int) -> None:
    model = _symmetric_model(output_stride)
    features = model.features(torch.zeros(1, 1, 128, 128))
    assert model.backbone.output_stride == (output_stride, output_stride)
    assert features.shape[-1] == 128 // output_stride


def test_reduce_output_stride_rejects_other_values() -> None:
    with pytest.raises(TrainingRunError):
        _reduce_output_stride(resnet(10, width=4), 4)


@pytest.mark.parametrize(("output_stride", "row", "col"),
                         [(8, 40, 72), (8, 72, 40), (8, 64, 24), (32, 64, 32), (32, 32, 64)])
def test_in_graph_cam_peaks_on_the_spot(output_stride: int, row: int, col: int) -> None:
    model = _symmetric_model(output_stride)
    image = _spot(128, row, col)
    with torch.no_grad():
        _, cam = WithCam(model)(image)
    assert map_peak(cam[0, 0].numpy()) == (row, col)
    reference = grad_cam(model, [image], model.backbone.layer4, class_index=0)
    assert map_peak(reference.cam[0].numpy()) == (row, col)
    torch.testing.assert_close(reference.cam[0], cam[0, 0], rtol=1e-4, atol=1e-5)


def test_upsample_places_cell_j_at_stride_times_j() -> None:
    raw = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    raw[0, 0, 1, 2] = 1.0
    up = upsample_cam(raw, (32, 32), 8)[0, 0].numpy()
    assert np.unravel_index(int(np.argmax(up)), up.shape) == (8, 16)
    assert up[8, 16] == 1.0 and up[12, 16] == 0.5 and up[8, 20] == 0.5
    # the last cell holds its value out to the border, as bilinear upsampling clamps
    edge = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    edge[0, 0, 3, 3] = 1.0
    assert (upsample_cam(edge, (32, 32), 8)[0, 0, 24:, 24:] == 1.0).all()
    # without a stride the nearest power of two to pixels / cells is used
    torch.testing.assert_close(upsample_cam(raw, (32, 32)), upsample_cam(raw, (32, 32), 8))


def test_exported_cam_peaks_on_the_spot(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from dicomnode.training.export import export_onnx

    model = _symmetric_model(8)
    path = tmp_path / "cam.onnx"
    example = torch.cat([_spot(128, 40, 72), _spot(128, 72, 40)])
    export_onnx(WithCam(model), {"image": example}, path, output_names=("logits", "cam"))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for row, col in ((40, 72), (72, 40)):
        (cam,) = session.run(["cam"], {"image": _spot(128, row, col).numpy()})
        assert map_peak(np.asarray(cam)[0, 0]) == (row, col)
