"""Numpy post-processing that belongs to the model's semantics, not to one pipeline.

Serving runs the slice model over every slice (in batches) and pools here, because the
number of slices differs between series and a pooled ONNX graph would fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PatientScore", "max_pool_slices", "sigmoid", "softmax"]


@dataclass(frozen=True)
class PatientScore:
    """Patient-level logits (K,) and, per class, the slice that produced the maximum.

    The slice index says which slice's CAM explains the patient-level call.
    """

    logits: np.ndarray
    slice_index: tuple[int, ...]


def max_pool_slices(slice_logits: np.ndarray) -> PatientScore:
    """Seed-002 multiple-instance pooling: patient logit = max over slices.

    Accepts (S,) or (S, K) slice logits; the same rule as
    ``dicomnode.training.architectures.max_pool_slices`` used in training.
    """
    logits = np.asarray(slice_logits)
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"slice logits must be (S,) or (S, K) with S >= 1, got {logits.shape}")
    index = logits.argmax(axis=0)
    return PatientScore(logits=logits.max(axis=0), slice_index=tuple(int(i) for i in index))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax with the max subtracted first so large logits do not overflow."""
    x = np.asarray(x, dtype=np.float64)
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=axis, keepdims=True)
    return result
