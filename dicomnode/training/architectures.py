"""Network architectures for the node's analyses, in plain torch (no torchvision).

Every model here exports to ONNX with a dynamic batch axis and no data-dependent Python
control flow in ``forward``, because serving runs the exported graph, never this code.

* :class:`ResNet` — ResNet-10/18/34/50/101 backbones with a single-channel stem. Module
  and parameter names follow torchvision, so a torchvision-format ``state_dict`` (for
  example ImageNet or RadImageNet weights saved to a local file) loads with
  :func:`load_torchvision_resnet_weights`.
* :class:`GapClassifier` — backbone -> global average pool -> linear or MLP head; the
  shape the in-graph Grad-CAM of :mod:`dicomnode.training.gradcam` understands.
* :class:`PatientMIL` — slice logits max-pooled to one patient logit (seed 002).
* :class:`DualEncoderFusion` — CT and MR encoders with classification, stage and
  survival-risk heads, and a presence mask for a missing modality (seed 003).
* :class:`CnnBiLstm` — a per-slice CNN followed by a bidirectional LSTM over the slice
  axis (seed 000), sized by :class:`CnnBiLstmConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CnnBiLstm",
    "CnnBiLstmConfig",
    "DualEncoderFusion",
    "FusionConfig",
    "FusionOutput",
    "GapClassifier",
    "PatientMIL",
    "ResNet",
    "ResNetDepth",
    "WeightLoadError",
    "WeightLoadReport",
    "count_parameters",
    "linear_head",
    "load_torchvision_resnet_weights",
    "max_pool_slices",
    "mlp_head",
    "resnet",
    "resnet50_slice_classifier",
    "small_slice_classifier",
]

ResNetDepth = Literal[10, 18, 34, 50, 101]

_BLOCKS: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                _conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 block; the stride sits on the 3x3 as in torchvision ("v1.5")."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                _conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet(nn.Module):
    """A ResNet trunk that returns the last feature map (B, C, H/32, W/32), not logits.

    The head is kept separate so the same trunk serves the slice classifier, both
    branches of the fusion network and the in-graph Grad-CAM, which needs the map itself.
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        *,
        in_channels: int = 1,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        if width < 1 or in_channels < 1:
            raise ValueError("width and in_channels must be positive")
        block_cls: type[BasicBlock] | type[Bottleneck] = (
            BasicBlock if block == "basic" else Bottleneck
        )
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = width
        stages: list[nn.Sequential] = []
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage: list[nn.Module] = []
            for b in range(blocks):
                stage.append(block_cls(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_planes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def output_stride(self) -> tuple[int, int]:
        """Input pixels per feature-map cell (rows, columns), as the strides now stand
        (``--output-stride`` sets some to 1 after construction)."""
        rows, cols = self.conv1.stride[0], self.conv1.stride[1]
        pool = self.maxpool.stride
        pool_rows, pool_cols = (pool, pool) if isinstance(pool, int) else (pool[0], pool[1])
        rows, cols = rows * pool_rows, cols * pool_cols
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            first = layer[0]
            if not isinstance(first, BasicBlock | Bottleneck):
                raise TypeError(f"a ResNet stage starts with a {type(first).__name__}")
            strided = first.conv2 if isinstance(first, Bottleneck) else first.conv1
            rows, cols = rows * strided.stride[0], cols * strided.stride[1]
        return rows, cols

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        out: Tensor = self.layer4(x)
        return out


def resnet(depth: ResNetDepth, *, in_channels: int = 1, width: int = 64) -> ResNet:
    """Build a ResNet trunk; ``width`` < 64 gives the narrow variants used on CPUs.

    ``resnet(50)`` is the seed-002 backbone (2048 output channels); ``resnet(10, width=8)``
    has about 78 k parameters and trains in minutes on two cores.
    """
    if depth not in _BLOCKS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(_BLOCKS)}")
    block, layers = _BLOCKS[depth]
    return ResNet(block, layers, in_channels=in_channels, width=width)


def linear_head(in_features: int, num_outputs: int = 1) -> nn.Linear:
    """GAP -> linear: the head for which Grad-CAM reduces to the original CAM."""
    return nn.Linear(in_features, num_outputs)


def mlp_head(
    in_features: int, hidden: int = 512, num_outputs: int = 1, dropout: float = 0.4
) -> nn.Sequential:
    """The seed-002 classifier (Linear -> ReLU -> Dropout -> Linear)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_outputs),
    )


class GapClassifier(nn.Module):
    """Backbone -> global average pool -> head, returning logits (B, K).

    Keeping pool and head apart from the trunk is what lets :class:`WithCam` compute the
    Grad-CAM weights from the head's weights in the same forward pass.
    """

    def __init__(self, backbone: ResNet, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        feature_map: Tensor = self.backbone(x)
        return feature_map

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.features(x).mean(dim=(2, 3))
        logits: Tensor = self.head(pooled)
        return logits


def resnet50_slice_classifier(
    num_outputs: int = 1, *, hidden: int = 512, dropout: float = 0.4
) -> GapClassifier:
    """Seed 002: single-channel ResNet-50 with the 2048 -> 512 -> 1 MLP head."""
    backbone = resnet(50)
    return GapClassifier(backbone, mlp_head(backbone.out_channels, hidden, num_outputs, dropout))


def small_slice_classifier(
    num_outputs: int = 1,
    *,
    depth: ResNetDepth = 10,
    width: int = 8,
    head: Literal["mlp", "linear"] = "mlp",
    hidden: int = 32,
    dropout: float = 0.4,
) -> GapClassifier:
    """A CPU-sized slice classifier with the same structure as the seed-002 network."""
    backbone = resnet(depth, width=width)
    head_module: nn.Module = (
        mlp_head(backbone.out_channels, hidden, num_outputs, dropout)
        if head == "mlp"
        else linear_head(backbone.out_channels, num_outputs)
    )
    return GapClassifier(backbone, head_module)


# --- loading torchvision-format weights -------------------------------------------------


class WeightLoadError(ValueError):
    """A weights file does not fit the network (wrong depth, width or a corrupt file)."""


@dataclass(frozen=True)
class WeightLoadReport:
    """What :func:`load_torchvision_resnet_weights` did, for the training log."""

    loaded: int
    ignored: tuple[str, ...]
    stem_reduction: str
    stem_source_channels: int


def _read_state_dict(source: Path | str | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        raw: object = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise WeightLoadError(f"weights file {path} does not exist")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for a bad file
            raise WeightLoadError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise WeightLoadError("weights do not hold a state_dict (a mapping of name -> tensor)")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise WeightLoadError(f"weights entry {key!r} is not a tensor")
        state[str(key).removeprefix("module.")] = value
    return state


def load_torchvision_resnet_weights(
    model: ResNet,
    source: Path | str | Mapping[str, Tensor],
    *,
    stem_reduction: Literal["mean", "sum"] = "mean",
) -> WeightLoadReport:
    """Initialise ``model`` from a torchvision-format ResNet ``state_dict``.

    The RGB stem (64, 3, 7, 7) is collapsed over its input channels to fit the
    single-channel stem. ``mean`` is the seed-002 recipe; ``sum`` instead preserves the
    stem's response to a grey image replicated into three channels (the same image fed
    to the RGB network) — choose it when the input normalisation matches the one the
    weights were trained with. The classifier (``fc.*``) is ignored; every other trunk
    tensor must be present with the right shape, so a ResNet-18 file cannot silently
    half-load into a ResNet-50.
    """
    state = _read_state_dict(source)
    own = model.state_dict()
    ignored = tuple(sorted(k for k in state if k.startswith("fc.")))
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(trunk))
    unexpected = sorted(set(trunk) - set(own))
    if missing or unexpected:
        raise WeightLoadError(
            "weights do not match this ResNet: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    stem = trunk["conv1.weight"]
    source_channels = int(stem.shape[1]) if stem.ndim == 4 else -1
    if stem.ndim != 4:
        raise WeightLoadError(f"conv1.weight has shape {tuple(stem.shape)}, expected 4-D")
    if source_channels != model.in_channels:
        if model.in_channels != 1:
            raise WeightLoadError(
                f"conv1.weight has {source_channels} input channels; the model has "
                f"{model.in_channels} and only a single-channel stem is derived"
            )
        reduced = (
            stem.sum(dim=1, keepdim=True)
            if stem_reduction == "sum"
            else stem.mean(dim=1, keepdim=True)
        )
        trunk["conv1.weight"] = reduced
    for key, value in trunk.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightLoadError(
                f"weights entry {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(trunk, strict=True)
    return WeightLoadReport(
        loaded=len(trunk),
        ignored=ignored,
        stem_reduction=stem_reduction if source_channels != model.in_channels else "none",
        stem_source_channels=source_channels,
    )


# --- patient-level multiple-instance learning (seed 002) --------------------------------


def max_pool_slices(slice_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Patient logit = max over slices of (P, S, K) slice logits, ignoring padded slices.

    Max (not mean) because one positive slice makes a positive patient; a mask keeps the
    zero-padding of short series from ever being the maximum.
    """
    if mask is not None:
        fill = torch.finfo(slice_logits.dtype).min
        slice_logits = slice_logits.masked_fill(~mask.bool().unsqueeze(-1), fill)
    return slice_logits.amax(dim=1)


class PatientMIL(nn.Module):
    """Runs a slice model over (P, S, C, H, W) and max-pools to patient logits (P, K).

    Serving exports only the slice model (with its CAM) and max-pools in numpy, because
    the number of slices differs between series; this wrapper is the training view.
    """

    def __init__(self, slice_model: nn.Module) -> None:
        super().__init__()
        self.slice_model = slice_model

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        patients, slices = x.shape[0], x.shape[1]
        flat = x.reshape(patients * slices, *x.shape[2:])
        slice_logits: Tensor = self.slice_model(flat)
        slice_logits = slice_logits.reshape(patients, slices, -1)
        return max_pool_slices(slice_logits, mask), slice_logits


# --- CT + MR fusion (seed 003) ----------------------------------------------------------


@dataclass(frozen=True)
class FusionConfig:
    """Sizes of the dual-encoder fusion network; defaults follow seed 003."""

    depth: ResNetDepth = 50
    width: int = 64
    embed_dim: int = 512
    num_classes: int = 3
    num_stages: int = 4
    class_hidden: int = 256
    stage_hidden: int = 128
    risk_hidden: int = 128
    dropout: float = 0.3
    modality_dropout: float = 0.3

    @classmethod
    def small(cls) -> FusionConfig:
        return cls(depth=10, width=8, embed_dim=16, class_hidden=16, stage_hidden=8, risk_hidden=8)


class FusionOutput(NamedTuple):
    """Class logits (B, K), stage logits (B, S) and a log-risk score (B, 1)."""

    class_logits: Tensor
    stage_logits: Tensor
    risk: Tensor


class DualEncoderFusion(nn.Module):
    """CT and MR encoders, fused by concatenation and L2 normalisation, with three heads.

    ``presence`` (B, 2) says which of (CT, MR) each sample really has. An absent
    modality's embedding is replaced by a learned "missing" embedding with arithmetic
    (``p * e + (1 - p) * m``) rather than branching, so the exported graph handles CT-only,
    MR-only and both without a second model, and the image supplied for an absent
    modality (zeros, by convention) has no effect on any output. During training,
    ``modality_dropout`` hides one of two present modalities at random so the heads learn
    to work from either alone. The stage head gives logits over stages (I-IV by
    default) instead of a sigmoid "stage"; the risk head gives a Cox-style log-risk.
    """

    def __init__(self, config: FusionConfig | None = None) -> None:
        super().__init__()
        cfg = config or FusionConfig()
        if not 0.0 <= cfg.modality_dropout < 1.0:
            raise ValueError("modality_dropout must be in [0, 1)")
        self.config = cfg
        self.ct_encoder = resnet(cfg.depth, width=cfg.width)
        self.mr_encoder = resnet(cfg.depth, width=cfg.width)
        channels = self.ct_encoder.out_channels
        self.ct_proj = nn.Linear(channels, cfg.embed_dim)
        self.mr_proj = nn.Linear(channels, cfg.embed_dim)
        self.ct_missing = nn.Parameter(torch.zeros(cfg.embed_dim))
        self.mr_missing = nn.Parameter(torch.zeros(cfg.embed_dim))
        fused = 2 * cfg.embed_dim
        self.class_head = mlp_head(fused, cfg.class_hidden, cfg.num_classes, cfg.dropout)
        self.stage_head = nn.Sequential(
            nn.Linear(fused, cfg.stage_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.stage_hidden, cfg.num_stages),
        )
        self.risk_head = nn.Sequential(
            nn.Linear(fused, cfg.risk_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.risk_hidden, 1),
        )

    def effective_presence(self, presence: Tensor) -> Tensor:
        """The presence mask after modality dropout (training only)."""
        presence = presence.to(torch.float32)
        if not self.training or self.config.modality_dropout == 0.0:
            return presence
        both = (presence[:, 0] > 0) & (presence[:, 1] > 0)
        drop = both & (
            torch.rand(presence.shape[0], device=presence.device) < self.config.modality_dropout
        )
        drop_ct = drop & (torch.rand(presence.shape[0], device=presence.device) < 0.5)
        drop_mr = drop & ~drop_ct
        keep = torch.stack([~drop_ct, ~drop_mr], dim=1).to(presence.dtype)
        return presence * keep

    def embed(
        self, ct_map: Tensor, mr_map: Tensor, presence: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused, L2-normalised embedding (B, 2E) from the two feature maps."""
        p_ct = presence[:, 0:1]
        p_mr = presence[:, 1:2]
        e_ct = p_ct * self.ct_proj(ct_map.mean(dim=(2, 3))) + (1 - p_ct) * self.ct_missing
        e_mr = p_mr * self.mr_proj(mr_map.mean(dim=(2, 3))) + (1 - p_mr) * self.mr_missing
        fused = torch.cat([e_ct, e_mr], dim=1)
        return F.normalize(fused, dim=1), fused, presence

    def forward(self, ct: Tensor, mr: Tensor, presence: Tensor) -> FusionOutput:
        eff = self.effective_presence(presence)
        normed, _, _ = self.embed(self.ct_encoder(ct), self.mr_encoder(mr), eff)
        return FusionOutput(
            self.class_head(normed), self.stage_head(normed), self.risk_head(normed)
        )


# --- CNN + bidirectional LSTM over slices (seed 000) ------------------------------------


@dataclass(frozen=True)
class CnnBiLstmConfig:
    """Sizes of :class:`CnnBiLstm`. The defaults are the seed-000 scale (~1.2 M
    parameters), kept for benchmarks; train small data sets with :meth:`small`."""

    conv_channels: tuple[int, ...] = (32, 64, 128, 256)
    lstm_hidden: int = 128
    lstm_layers: int = 2
    dropout: float = 0.3
    num_outputs: int = 1

    @classmethod
    def small(cls) -> CnnBiLstmConfig:
        """About 5.7 k parameters: seed 000 had 1.8 M for 25 scans and learned nothing."""
        return cls(conv_channels=(8, 16), lstm_hidden=16, lstm_layers=1, dropout=0.5)


class CnnBiLstm(nn.Module):
    """Per-slice CNN features, a bidirectional LSTM over the slice axis, mean-pooled.

    Input (B, S, H, W): S slices of one channel each. The sequence is pooled by the mean
    of the LSTM outputs rather than the last state so no slice end is privileged — a
    striatum sits mid-stack, and reversing the stack should not change the answer much.
    """

    def __init__(self, config: CnnBiLstmConfig | None = None) -> None:
        super().__init__()
        cfg = config or CnnBiLstmConfig()
        if not cfg.conv_channels:
            raise ValueError("conv_channels must name at least one block")
        self.config = cfg
        blocks: list[nn.Module] = []
        in_channels = 1
        for channels in cfg.conv_channels:
            blocks += [
                nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = channels
        self.cnn = nn.Sequential(*blocks)
        self.lstm = nn.LSTM(
            in_channels,
            cfg.lstm_hidden,
            num_layers=cfg.lstm_layers,
            batch_first=True,
            bidirectional=True,
            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(2 * cfg.lstm_hidden, cfg.num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        batch, slices, height, width = x.shape
        features = self.cnn(x.reshape(batch * slices, 1, height, width)).mean(dim=(2, 3))
        sequence, _ = self.lstm(features.reshape(batch, slices, -1))
        logits: Tensor = self.fc(self.dropout(sequence.mean(dim=1)))
        return logits


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, the figure to weigh against the number of training cases."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
