"""The brain-tumour serving rules (seed 003), shared by training and serving.

The brain models score one axial slice at a time; a series' answer comes from its key
slice (the slice with the highest tumour score), and the fusion model combines the two
key slices. These rules were chosen and evaluated at training time
(``dicomnode.training.tasks_brain``) and are applied unchanged when the node serves the
models, so they live here, free of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

CLASSES = ("healthy", "benign", "malignant")
CT_CLASSES = ("no-tumour", "tumour")
STAGES = ("I-proxy", "II-proxy", "III-proxy", "IV-proxy")
# presence flags the fusion model takes: (CT present, MR present)
PRESENCE: dict[str, tuple[float, float]] = {"both": (1.0, 1.0), "ct": (1.0, 0.0),
                                            "mr": (0.0, 1.0)}


def softmax(x: FloatArray) -> FloatArray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    out: FloatArray = shifted / shifted.sum(axis=-1, keepdims=True)
    return out


def sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def tumour_score(logits: NDArray[Any]) -> FloatArray:
    """Per-slice tumour score from (S, 1) CT logits or (S, 3) healthy/benign/malignant
    logits: the logit itself, or ``logsumexp(benign, malignant) - healthy``."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] not in (1, 3):
        raise ValueError(f"expected (S, 1) or (S, 3) logits, got {values.shape}")
    if values.shape[1] == 1:
        return values[:, 0]
    score: FloatArray = np.logaddexp(values[:, 1], values[:, 2]) - values[:, 0]
    return score


@dataclass(frozen=True)
class SeriesResult:
    """The series-level answer: the key slice, its logits and probabilities, and its CAM
    for ``cam_class`` (the tumour class the key slice favours)."""

    key_slice: int
    logits: FloatArray
    probabilities: FloatArray
    cam_class: int
    cam: NDArray[np.float32] | None


def series_result(logits: NDArray[Any], cams: NDArray[Any] | None = None) -> SeriesResult:
    """Apply the key-slice rule to a series' slice logits (S, K) and CAMs (S, K, H, W).

    K = 1 (sigmoid, CT) or 3 (softmax over healthy / benign / malignant). Ties go to the
    lowest slice index (numpy's argmax), so the answer is deterministic.
    """
    values = np.asarray(logits, dtype=np.float64)
    key = int(np.argmax(tumour_score(values)))
    row = values[key]
    if row.shape[0] == 1:
        probabilities = sigmoid(row)
        cam_class = 0
    else:
        probabilities = softmax(row)
        cam_class = 1 + int(np.argmax(row[1:]))
    cam = None if cams is None else np.asarray(cams[key, cam_class], dtype=np.float32)
    return SeriesResult(key, row, probabilities, cam_class, cam)


FusionRun = Callable[[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]],
                     Mapping[str, NDArray[Any]]]


@dataclass(frozen=True)
class FusionResult:
    """The fusion serving rule's answer for one patient.

    ``class_logits`` etc. come from the pass on both key slices when both series exist,
    else from the single modality's key slice; ``ct_only`` / ``mr_only`` are the key-slice
    logits of the single-modality passes (what the model says from one series alone).
    """

    class_logits: FloatArray
    probabilities: FloatArray
    stage_logits: FloatArray
    risk: float
    cam_class: int
    ct_key: int | None
    mr_key: int | None
    ct_only: FloatArray | None
    mr_only: FloatArray | None
    ct_cam: NDArray[np.float32] | None
    mr_cam: NDArray[np.float32] | None


def fusion_series_result(run: FusionRun, ct: NDArray[np.float32] | None,
                         mr: NDArray[np.float32] | None) -> FusionResult:
    """Apply the fusion serving rule with ``run(ct, mr, presence)`` (the ONNX session).

    1. Each available series alone: every slice with the other image zero and
       ``presence`` one-hot; its key slice by :func:`tumour_score`.
    2. Both available: one pass on the two key slices with ``presence = (1, 1)``.
    """
    if ct is None and mr is None:
        raise ValueError("the fusion model needs a CT or an MR series")
    keys: dict[str, int] = {}
    rows: dict[str, Mapping[str, NDArray[Any]]] = {}
    for name, images in (("ct", ct), ("mr", mr)):
        if images is None:
            continue
        flags = np.tile(np.asarray(PRESENCE[name], dtype=np.float32), (images.shape[0], 1))
        zeros = np.zeros_like(images)
        out = run(images, zeros, flags) if name == "ct" else run(zeros, images, flags)
        key = int(np.argmax(tumour_score(out["class_logits"])))
        keys[name] = key
        rows[name] = {k: np.asarray(v[key:key + 1]) for k, v in out.items()}
    if ct is not None and mr is not None:
        final = run(ct[keys["ct"]:keys["ct"] + 1], mr[keys["mr"]:keys["mr"] + 1],
                    np.ones((1, 2), dtype=np.float32))
    else:
        final = rows["ct" if ct is not None else "mr"]
    logits = np.asarray(final["class_logits"][0], dtype=np.float64)
    cam_class = 1 + int(np.argmax(logits[1:]))
    return FusionResult(
        class_logits=logits, probabilities=softmax(logits),
        stage_logits=np.asarray(final["stage_logits"][0], dtype=np.float64),
        risk=float(final["risk"][0, 0]), cam_class=cam_class,
        ct_key=keys.get("ct"), mr_key=keys.get("mr"),
        ct_only=(np.asarray(rows["ct"]["class_logits"][0], dtype=np.float64)
                 if "ct" in rows else None),
        mr_only=(np.asarray(rows["mr"]["class_logits"][0], dtype=np.float64)
                 if "mr" in rows else None),
        ct_cam=(np.asarray(final["ct_cam"][0, cam_class], dtype=np.float32)
                if ct is not None else None),
        mr_cam=(np.asarray(final["mr_cam"][0, cam_class], dtype=np.float32)
                if mr is not None else None),
    )
