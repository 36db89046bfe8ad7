"""Grad-CAM two ways: in the exported graph (no backward pass) and by autograd (reference).

Serving runs ONNX Runtime, which has no backward pass, yet the node must explain its
scores with heat maps. For the networks here the part after the last feature map is
global average pooling followed by a small head, and for such a head Grad-CAM needs no
autograd at all:

Let ``A`` (C, h, w) be the last feature map, ``p_k = (1/Z) Σ_ij A_kij`` its global average
(``Z = h·w``) and ``y_c = f(p)`` the score of class ``c``. Grad-CAM weights each channel by
the spatial mean of the score's gradient::

    α_k = (1/Z) Σ_ij ∂y_c/∂A_kij = (1/Z) Σ_ij (∂y_c/∂p_k)(1/Z) = g_k / Z,  g = ∂y_c/∂p

and the map is ``L = ReLU(Σ_k α_k A_k)``. The gradient ``g`` of the head with respect to
the pooled vector is ordinary matrix algebra: for a linear head ``g = W_c`` (so Grad-CAM is
the original CAM divided by ``Z``); for Linear -> ReLU -> Dropout -> Linear in eval mode
``g = W1ᵀ (W2_cᵀ ⊙ 1[W1 p + b1 > 0])``. :func:`head_jacobian` walks any head made of
Linear / ReLU / LeakyReLU / Dropout / Identity / BatchNorm1d in reverse to get ``g`` for
every class at once, so the map is computed in the same forward pass and exports to
ONNX as plain MatMul / Mul / Greater nodes.

Maps are upsampled bilinearly to the input size with each cell at the input pixel its
receptive field is centred on, and divided by their per-image, per-class maximum, so
each lies in [0, 1] with 0 still meaning "no positive evidence" (a min-max stretch would
turn a uniformly weak map into a full-scale one). A map whose peak is below ``CAM_EPS``
(or float16's smallest normal number) stays (near) zero. Cell ``j`` of a trunk of total
stride ``S`` whose strided convs and pools are padded symmetrically (``k // 2``) is
centred on input pixel ``S·j``, not on ``S·j + (S − 1)/2`` where
``F.interpolate(align_corners=False)`` would put it: that half-pixel convention moved
every map 3.5 px (stride 8) to 15.5 px (stride 32) down and to the right
(:func:`upsample_cam`). The un-normalised map at feature resolution can be exported too;
it keeps the absolute scale for comparisons between images.

:func:`grad_cam` is the textbook hook-and-backward implementation, kept as the reference
the exported maps are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dicomnode.training.architectures import DualEncoderFusion, GapClassifier

__all__ = [
    "CAM_EPS",
    "CamTarget",
    "FusionWithCam",
    "GradCamResult",
    "UnsupportedHeadError",
    "WithCam",
    "cam_maps",
    "class_evidence",
    "fusion_class_evidence",
    "grad_cam",
    "head_jacobian",
    "localisation_loss",
    "mask_to_grid",
    "upsample_cam",
]

CAM_EPS = 1e-12

CamTarget = Literal["all", "predicted"] | int
"""Which class a CAM explains: every class as a channel, the arg-max class, or one index."""


class UnsupportedHeadError(TypeError):
    """The head contains a layer whose gradient :func:`head_jacobian` cannot write down."""


def _flatten_head(head: nn.Module) -> list[nn.Module]:
    if isinstance(head, nn.Sequential):
        layers: list[nn.Module] = []
        for child in head:
            layers.extend(_flatten_head(child))
        return layers
    return [head]


def head_jacobian(head: nn.Module, pooled: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``head`` on (B, F) and return its output (B, K) and Jacobian (B, K, F).

    Reverse-mode differentiation by hand, valid in eval mode only (dropout is the
    identity, batch norm uses running statistics): that is the mode an exported model
    runs in, and the only one in which the Jacobian is a fixed function of the input.
    """
    if head.training:
        raise UnsupportedHeadError("head_jacobian needs the head in eval mode (call .eval())")
    return _eval_jacobian(head, pooled)


def _eval_jacobian(head: nn.Module, pooled: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`head_jacobian`'s eval-mode algebra whatever mode the head is in (dropout as
    the identity, batch norm with its running statistics): the Jacobian the exported map
    uses, differentiable with respect to the head's weights."""
    steps: list[tuple[str, Tensor]] = []
    x = pooled
    for layer in _flatten_head(head):
        if isinstance(layer, nn.Linear):
            steps.append(("matmul", layer.weight))
            x = F.linear(x, layer.weight, layer.bias)
        elif isinstance(layer, nn.ReLU):
            steps.append(("mul", (x > 0).to(x.dtype)))
            x = torch.relu(x)
        elif isinstance(layer, nn.LeakyReLU):
            positive = x > 0
            steps.append(("mul", torch.where(positive, 1.0, layer.negative_slope).to(x.dtype)))
            x = F.leaky_relu(x, layer.negative_slope)
        elif isinstance(layer, nn.BatchNorm1d):
            if layer.running_var is None or layer.running_mean is None:
                raise UnsupportedHeadError("BatchNorm1d without running statistics")
            scale = torch.rsqrt(layer.running_var + layer.eps)
            if layer.weight is not None:
                scale = scale * layer.weight
            steps.append(("mul", scale))
            x = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                             layer.bias, training=False, eps=layer.eps)
        elif isinstance(layer, nn.Dropout | nn.Identity):
            continue
        else:
            raise UnsupportedHeadError(
                f"cannot differentiate a {type(layer).__name__} layer in the head; supported "
                "layers are Linear, ReLU, LeakyReLU, BatchNorm1d, Dropout and Identity"
            )
    batch, classes = x.shape[0], x.shape[1]
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    jac = eye.unsqueeze(0).expand(batch, classes, classes)
    for kind, value in reversed(steps):
        jac = torch.matmul(jac, value) if kind == "matmul" else jac * value.unsqueeze(-2)
    return x, jac


def _check_target(target: object) -> None:
    if target in ("all", "predicted"):
        return
    if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
        return
    raise ValueError(f"CAM target must be 'all', 'predicted' or a class index, got {target!r}")


def _select(jac: Tensor, logits: Tensor, target: CamTarget) -> Tensor:
    if target == "all":
        return jac
    if target == "predicted":
        index = logits.argmax(dim=1).reshape(-1, 1, 1).expand(-1, 1, jac.shape[2])
        return torch.gather(jac, 1, index)
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < jac.shape[1]:
            raise ValueError(f"CAM target class {target} is outside 0..{jac.shape[1] - 1}")
        return jac[:, target : target + 1, :]
    raise ValueError(f"CAM target must be 'all', 'predicted' or a class index, got {target!r}")


def _peak_floor(dtype: torch.dtype) -> float:
    # 1e-12 is zero in float16; there the smallest normal number is the floor instead.
    return max(CAM_EPS, float(torch.finfo(dtype).tiny))


def _infer_stride(pixels: int, cells: int) -> int:
    # A ResNet halves each side with ceil (k // 2 padding), so cells = ceil(pixels / S) for
    # a power-of-two S; the nearest power of two to pixels / cells is S for any input of at
    # least S pixels.
    return int(2 ** max(0, round(math.log2(pixels / cells))))


def _interpolation_matrix(pixels: int, cells: int, stride: int, like: Tensor) -> Tensor:
    """(pixels, cells): pixel ``x`` samples cell coordinate ``x / stride``, linearly,
    clamped to the first and last cell (as bilinear upsampling clamps at the borders)."""
    # Plain Python, one tensor at the end: the exporter then sees a single constant.
    weights = [[0.0] * cells for _ in range(pixels)]
    for x, row in enumerate(weights):
        u = min(x / stride, float(cells - 1))
        low = min(math.floor(u), cells - 1)
        row[low] += 1.0 - (u - low)
        row[min(low + 1, cells - 1)] += u - low
    return torch.tensor(weights, dtype=like.dtype, device=like.device)


def upsample_cam(raw: Tensor, size: Sequence[int], stride: int | Sequence[int] | None = None
                 ) -> Tensor:
    """(B, K, h, w) maps to (B, K, *size), cell ``(i, j)`` at input pixel ``(S·i, S·j)``.

    ``stride`` is the trunk's total stride ``S`` (per axis, or one for both); None infers
    it from the shapes. Two constant matrix products (MatMul in the exported graph):
    torch's bilinear ``interpolate`` has no mode that samples at ``x / S``.
    """
    rows, cols = int(size[0]), int(size[1])
    h, w = int(raw.shape[-2]), int(raw.shape[-1])
    if stride is None:
        strides = (_infer_stride(rows, h), _infer_stride(cols, w))
    elif isinstance(stride, int):
        strides = (stride, stride)
    else:
        strides = (int(stride[0]), int(stride[1]))
    along_rows = _interpolation_matrix(rows, h, strides[0], raw)
    along_cols = _interpolation_matrix(cols, w, strides[1], raw)
    return torch.matmul(torch.matmul(along_rows, raw), along_cols.transpose(0, 1))


def _evidence(feature_map: Tensor, grads: Tensor) -> Tensor:
    """(B, K, h, w) ``Σ_k α_k A_k`` with ``α = g / (h·w)``: the map before its ReLU."""
    height, width = feature_map.shape[2], feature_map.shape[3]
    alpha = grads / float(height * width)
    raw = torch.matmul(alpha, feature_map.flatten(2))
    return raw.reshape(raw.shape[0], raw.shape[1], height, width)


def cam_maps(feature_map: Tensor, grads: Tensor, size: Sequence[int],
             stride: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Grad-CAM from a feature map (B, C, h, w) and pooled-feature gradients (B, K, C).

    Returns the normalised maps (B, K, *size) in [0, 1] and the raw ReLU maps (B, K, h, w)
    with ``α = g / (h·w)`` (see the module docstring); ``stride`` as in
    :func:`upsample_cam`.
    """
    raw = torch.relu(_evidence(feature_map, grads))
    up = upsample_cam(raw, size, stride)
    peak = up.amax(dim=(2, 3), keepdim=True)
    return up / peak.clamp_min(_peak_floor(up.dtype)), raw


class WithCam(nn.Module):
    """Wraps a :class:`GapClassifier` so one forward pass returns logits and Grad-CAM.

    ``forward(image)`` returns ``(logits (B, K), cam (B, K', H, W))`` and, with
    ``include_raw``, ``cam_raw (B, K', h, w)`` as well; ``K'`` is ``K`` for target "all"
    and 1 otherwise. :attr:`output_names` names them for export.
    """

    def __init__(
        self, model: GapClassifier, target: CamTarget = "all", *, include_raw: bool = False
    ) -> None:
        super().__init__()
        _check_target(target)
        self.model = model
        self.target: CamTarget = target
        self.include_raw = include_raw
        self.train(model.training)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits", "cam", "cam_raw") if self.include_raw else ("logits", "cam")

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        feature_map = self.model.features(image)
        logits, jac = head_jacobian(self.model.head, feature_map.mean(dim=(2, 3)))
        cam, raw = cam_maps(feature_map, _select(jac, logits, self.target), image.shape[-2:],
                            self.model.backbone.output_stride)
        return (logits, cam, raw) if self.include_raw else (logits, cam)


class FusionWithCam(nn.Module):
    """Wraps :class:`DualEncoderFusion`: heads plus one CAM per modality, one pass.

    The gradient of the class score reaches each encoder's pooled features through the
    class head, the L2 normalisation (``∂n/∂z = (I − n nᵀ)/‖z‖``), the concatenation and
    the presence-weighted projection, so an absent modality's map is exactly zero.
    Outputs: ``class_logits, stage_logits, risk, ct_cam, mr_cam``.
    """

    output_names = ("class_logits", "stage_logits", "risk", "ct_cam", "mr_cam")

    def __init__(self, model: DualEncoderFusion, target: CamTarget = "all") -> None:
        super().__init__()
        _check_target(target)
        self.model = model
        self.target: CamTarget = target
        self.train(model.training)

    def forward(self, ct: Tensor, mr: Tensor, presence: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        if model.training:
            raise UnsupportedHeadError("FusionWithCam needs the model in eval mode")
        ct_map, mr_map = model.ct_encoder(ct), model.mr_encoder(mr)
        presence = presence.to(ct_map.dtype)
        normed, fused, _ = model.embed(ct_map, mr_map, presence)
        logits, jac_n = head_jacobian(model.class_head, normed)
        grad_ct, grad_mr = _encoder_grads(model, normed, fused, presence,
                                          _select(jac_n, logits, self.target))
        ct_cam, _ = cam_maps(ct_map, grad_ct, ct.shape[-2:], model.ct_encoder.output_stride)
        mr_cam, _ = cam_maps(mr_map, grad_mr, mr.shape[-2:], model.mr_encoder.output_stride)
        return logits, model.stage_head(normed), model.risk_head(normed), ct_cam, mr_cam


def _encoder_grads(model: DualEncoderFusion, normed: Tensor, fused: Tensor, presence: Tensor,
                   jac_n: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K, C) gradients of class scores with respect to the CT and MR pooled features,
    from their gradients ``jac_n`` with respect to the normalised embedding."""
    norm = fused.norm(dim=1, keepdim=True).clamp_min(CAM_EPS).unsqueeze(1)
    along = torch.matmul(jac_n, normed.unsqueeze(2))
    jac_z = (jac_n - along * normed.unsqueeze(1)) / norm
    embed_dim = model.config.embed_dim
    grad_ct = torch.matmul(jac_z[:, :, :embed_dim], model.ct_proj.weight)
    grad_mr = torch.matmul(jac_z[:, :, embed_dim:], model.mr_proj.weight)
    return (grad_ct * presence[:, 0].reshape(-1, 1, 1),
            grad_mr * presence[:, 1].reshape(-1, 1, 1))


# --- training: a localisation loss on the exported map -------------------------------------


def class_evidence(model: GapClassifier, feature_map: Tensor,
                   class_index: int | Tensor = 0) -> Tensor:
    """(B, h, w) evidence map of one class on the feature grid: the exported CAM before
    its ReLU, upsampling and scaling (:class:`WithCam` computes the same numbers).

    ``class_index`` is one class for every sample, or a (B,) tensor of one per sample.
    Works in training mode too: the head's Jacobian is the eval-mode one the served map
    uses, and gradients reach the trunk and the head's weights. The ReLU is left out so
    a cell with negative evidence still gets a gradient.
    """
    _, jac = _eval_jacobian(model.head, feature_map.mean(dim=(2, 3)))
    return _evidence(feature_map, _one_class(jac, class_index))[:, 0]


def fusion_class_evidence(model: DualEncoderFusion, ct_map: Tensor, mr_map: Tensor,
                          presence: Tensor, class_index: int | Tensor = 0
                          ) -> tuple[Tensor, Tensor]:
    """:func:`class_evidence` for the fusion network: (B, h, w) evidence maps on the CT and
    MR feature grids, as :class:`FusionWithCam` computes them before the ReLU (zero for
    an absent modality). Works in training mode (eval-mode head Jacobian)."""
    normed, fused, _ = model.embed(ct_map, mr_map, presence.to(ct_map.dtype))
    _, jac_n = _eval_jacobian(model.class_head, normed)
    grad_ct, grad_mr = _encoder_grads(model, normed, fused, presence.to(ct_map.dtype),
                                      _one_class(jac_n, class_index))
    return _evidence(ct_map, grad_ct)[:, 0], _evidence(mr_map, grad_mr)[:, 0]


def _one_class(jac: Tensor, class_index: int | Tensor) -> Tensor:
    """(B, 1, C) rows of a (B, K, C) Jacobian: one class, or one per sample."""
    classes = jac.shape[1]
    index = torch.as_tensor(class_index, dtype=torch.int64, device=jac.device)
    if bool(((index < 0) | (index >= classes)).any()):
        raise ValueError(f"class index outside 0..{classes - 1}")
    index = index.reshape(-1, 1, 1).expand(jac.shape[0], 1, jac.shape[2])
    return torch.gather(jac, 1, index)


def mask_to_grid(mask: Tensor, cells: Sequence[int], stride: int | Sequence[int]) -> Tensor:
    """(B, H, W) lesion masks in [0, 1] to (B, h, w): the lesion's share of each cell's
    ``S`` x ``S`` footprint centred on the cell's input pixel ``S·i`` (where
    :func:`upsample_cam` puts the cell); ``stride`` per axis or one for both."""
    h, w = int(cells[0]), int(cells[1])
    rows, cols = (stride, stride) if isinstance(stride, int) else (int(stride[0]),
                                                                    int(stride[1]))
    padded = F.pad(mask.unsqueeze(1), (cols // 2, cols, rows // 2, rows))
    return F.avg_pool2d(padded, (rows, cols), (rows, cols))[:, 0, :h, :w]


def localisation_loss(evidence: Tensor, target: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Cross-entropy between where the map puts its mass and where the lesion is.

    ``evidence`` (B, h, w) is :func:`class_evidence`, ``target`` (B, h, w) the lesion's
    share of each cell (:func:`mask_to_grid`). Per sample with a lesion, the evidence is
    standardised over the cells (so the loss cannot be lowered by scaling the map, which
    would fight the classification loss) and turned into a distribution by a softmax;
    the loss is its cross-entropy with the lesion's cell shares, normalised to sum 1.
    It pulls the map's maximum into the lesion and, unlike a loss on the ReLU'd map,
    has a gradient everywhere. Samples without a lesion do not count; with none in the
    batch the loss is a zero that keeps the graph.
    """
    flat = evidence.flatten(1)
    shares = target.flatten(1).to(flat.dtype)
    mass = shares.sum(dim=1)
    keep = mass > eps
    if not bool(keep.any()):
        return flat.sum() * 0.0
    z = flat[keep]
    z = (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, correction=0, keepdim=True) + eps)
    p = shares[keep] / mass[keep].unsqueeze(1)
    return -(p * F.log_softmax(z, dim=1)).sum(dim=1).mean()


# --- reference: hook-based Grad-CAM with autograd ---------------------------------------


@dataclass(frozen=True)
class GradCamResult:
    """Normalised maps (B, H, W), raw maps (B, h, w), and the class each one explains."""

    cam: Tensor
    raw: Tensor
    class_index: Tensor


def _identity_scores(outputs: Any) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError("model returns several outputs; pass score= to pick the class scores")
    return outputs


def grad_cam(
    model: nn.Module,
    inputs: Sequence[Tensor],
    target_layer: nn.Module,
    *,
    class_index: int | Sequence[int] | None = None,
    score: Callable[[Any], Tensor] = _identity_scores,
    size: Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> GradCamResult:
    """Standard Grad-CAM (Selvaraju et al.) by forward/backward hooks on ``target_layer``.

    ``class_index`` None explains each sample's arg-max class. The per-sample scores are
    summed before one backward pass, which is exact because in eval mode no sample's score
    depends on another sample's activations. Upsampling (``stride``: the total stride of
    ``target_layer``, None infers it) and normalisation are the same as :func:`cam_maps`,
    so the two can be compared number for number.
    """
    captured: dict[str, Tensor] = {}

    def keep_gradient(grad: Tensor) -> None:
        captured["grad"] = grad

    def on_forward(_module: nn.Module, _args: Any, output: Tensor) -> None:
        captured["activation"] = output
        output.register_hook(keep_gradient)  # type: ignore[no-untyped-call]

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    handle = target_layer.register_forward_hook(on_forward)
    try:
        with torch.enable_grad():
            leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            scores = score(model(*leaves))
            if class_index is None:
                index = scores.argmax(dim=1)
            elif isinstance(class_index, int):
                index = torch.full((scores.shape[0],), class_index, dtype=torch.long)
            else:
                index = torch.as_tensor(list(class_index), dtype=torch.long)
            model.zero_grad(set_to_none=True)
            scores.gather(1, index.reshape(-1, 1)).sum().backward()  # type: ignore[no-untyped-call]
    finally:
        handle.remove()
        for module, training in modes:
            module.training = training
    activation = captured["activation"].detach()
    alpha = captured["grad"].detach().mean(dim=(2, 3), keepdim=True)
    raw = torch.relu((alpha * activation).sum(dim=1, keepdim=True))
    out_size = tuple(size) if size is not None else tuple(inputs[0].shape[-2:])
    up = upsample_cam(raw, out_size, stride)
    cam = up / up.amax(dim=(2, 3), keepdim=True).clamp_min(_peak_floor(up.dtype))
    return GradCamResult(cam=cam[:, 0], raw=raw[:, 0], class_index=index)
