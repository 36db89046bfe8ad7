"""Training-time augmentation on preprocessed tensors, seeded and batched.

Augmentation runs *after* the preprocessing spec, on the tensors a model sees, and only
in training. The spec is what serving runs and what the model card records; keeping
augmentation out of it means a served image is never rotated or brightened, and the
fingerprint of the spec does not change with the augmentation recipe.

All draws come from the ``torch.Generator`` passed in, so a seed fixes every rotation
and flip of every epoch. Geometric steps use one affine ``grid_sample`` (bilinear,
border padding) per batch; intensity steps are expressed in units of each image's own
standard deviation, because after z-scoring "brightness +15 %" of a [0, 1] image has no
fixed meaning, while "shift by 0.15 standard deviations" does. The presets name the
recipes the seeds describe (seed 004: pneumonia; seed 000: DaT).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PRESETS", "Augmentation", "augment_batch", "augment_batch_with_masks"]


@dataclass(frozen=True)
class Augmentation:
    """Ranges of random transforms; zero disables a transform.

    * ``rotation_deg``: uniform in ±degrees.
    * ``translate``: uniform shift in ± this fraction of width and of height.
    * ``zoom``: scale uniform in [1 − zoom, 1 + zoom] (> 1 magnifies).
    * ``hflip`` / ``vflip``: probability of a left-right / up-down flip.
    * ``brightness``: additive shift uniform in ± this many image standard deviations.
    * ``contrast``: multiply deviations from the image mean by 1 ± this.
    * ``noise_std``: Gaussian noise with this many image standard deviations.
    """

    rotation_deg: float = 0.0
    translate: float = 0.0
    zoom: float = 0.0
    hflip: float = 0.0
    vflip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"augmentation {name} must be a finite number >= 0; got {value}")
        for name in ("hflip", "vflip"):
            if getattr(self, name) > 1:
                raise ValueError(f"augmentation {name} is a probability; got {getattr(self, name)}")
        if self.zoom >= 1 or self.contrast >= 1 or self.translate >= 1:
            raise ValueError("zoom, contrast and translate must be < 1")

    @property
    def geometric(self) -> bool:
        return any((self.rotation_deg, self.translate, self.zoom, self.hflip, self.vflip))

    @property
    def enabled(self) -> bool:
        return self.geometric or any((self.brightness, self.contrast, self.noise_std))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Augmentation:
        return cls(**{k: float(v) for k, v in data.items()})


PRESETS: dict[str, Augmentation] = {
    "none": Augmentation(),
    # Seed 004 (pneumonia): rotation ±12°, translation ±15 %, zoom ±15 %, horizontal flip,
    # brightness ±15 %.
    "seed004": Augmentation(rotation_deg=12, translate=0.15, zoom=0.15, hflip=0.5,
                            brightness=0.15),
    # Seed 000 (DaT): rotation ±15°, horizontal flip, zoom ±10 %, brightness ±10 %, noise.
    "seed000": Augmentation(rotation_deg=15, zoom=0.1, hflip=0.5, brightness=0.1,
                            noise_std=0.05),
    # Geometry-preserving laterality (no flips) for findings whose side matters.
    "light": Augmentation(rotation_deg=8, translate=0.08, zoom=0.08, brightness=0.1,
                          contrast=0.1, noise_std=0.02),
    # "light" plus left-right flips, for findings that may lie on either side (head CT).
    "light-flip": Augmentation(rotation_deg=8, translate=0.08, zoom=0.08, hflip=0.5,
                               brightness=0.1, contrast=0.1, noise_std=0.02),
}


def _uniform(generator: torch.Generator, n: int, half_range: float) -> Tensor:
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * half_range


def augment_batch(x: Tensor, augmentation: Augmentation, generator: torch.Generator) -> Tensor:
    """A randomly transformed copy of ``x`` (B, ..., H, W), one draw per sample.

    Every channel and slice of a sample gets the same transform (a volume moves as one).
    A disabled augmentation returns ``x`` itself.
    """
    return _augment(x, augmentation, generator, None)[0]


def augment_batch_with_masks(x: Tensor, masks: Tensor, augmentation: Augmentation,
                             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """:func:`augment_batch` of ``x`` and the same geometric transform of ``masks``
    (B, H, W) in [0, 1] (bilinear, zero outside the image; no intensity steps).

    The draws are those :func:`augment_batch` makes, in the same order, so a seed gives
    the same images with or without masks.
    """
    if masks.shape[0] != x.shape[0] or masks.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(x.shape)}")
    out, moved = _augment(x, augmentation, generator, masks)
    assert moved is not None
    return out, moved


def _augment(x: Tensor, augmentation: Augmentation, generator: torch.Generator,
             masks: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not augmentation.enabled:
        return x, masks
    if x.ndim < 3:
        raise ValueError(f"expected (B, ..., H, W); got shape {tuple(x.shape)}")
    shape = x.shape
    batch = shape[0]
    flat = x.reshape(batch, -1, shape[-2], shape[-1])
    a = augmentation
    if a.geometric:
        angle = _uniform(generator, batch, math.radians(a.rotation_deg))
        scale = 1.0 + _uniform(generator, batch, a.zoom)
        shift_x = _uniform(generator, batch, 2 * a.translate)
        shift_y = _uniform(generator, batch, 2 * a.translate)
        flip_x = torch.where(torch.rand(batch, generator=generator) < a.hflip, -1.0, 1.0)
        flip_y = torch.where(torch.rand(batch, generator=generator) < a.vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([
            torch.stack([cos * flip_x, -sin * flip_y, shift_x], dim=1),
            torch.stack([sin * flip_x, cos * flip_y, shift_y], dim=1),
        ], dim=1).to(flat.dtype)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        flat = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks.unsqueeze(1).to(flat.dtype), grid, mode="bilinear",
                                  padding_mode="zeros", align_corners=False)[:, 0]
    if a.brightness or a.contrast or a.noise_std:
        mean = flat.mean(dim=(1, 2, 3), keepdim=True)
        std = flat.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        view = (batch, 1, 1, 1)
        if a.contrast:
            factor = (1.0 + _uniform(generator, batch, a.contrast)).to(flat.dtype).reshape(view)
            flat = (flat - mean) * factor + mean
        if a.brightness:
            shift = _uniform(generator, batch, a.brightness).to(flat.dtype).reshape(view)
            flat = flat + shift * std
        if a.noise_std:
            noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype)
            flat = flat + noise * (a.noise_std * std)
    return flat.reshape(shape), masks
