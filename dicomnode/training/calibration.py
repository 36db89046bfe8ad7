"""Post-hoc calibration of a binary logit, folded into the network's last linear layer.

Class-weighted losses and early stopping on AUC give models that rank well but whose
sigmoid is not a probability (the card's ECE says so). A monotone affine map of the
logit, ``z' = a·z + b`` with ``a > 0``, fitted on the validation set, repairs the
probabilities without changing any ranking, so AUC and the choice of operating points
are untouched. Two variants: ``temperature`` (``b = 0``, ``a = 1/T``; Guo et al. 2017)
and ``platt`` (both ``a`` and ``b``; Platt 1999). The targets are Platt's smoothed labels
``(N₊ + 1)/(N₊ + 2)`` and ``1/(N₋ + 2)``, so a validation set the model separates
perfectly yields a finite, merely confident map instead of an infinite scale.

The map is folded into the weights of the head's last ``Linear`` layer
(``W ← a·W``, ``c ← a·c + b``) rather than recorded for serving to apply: the exported
logit is then already calibrated, nobody downstream must remember a temperature, and
the serving path stays "sigmoid of the output". Two properties make folding safe:

* Grad-CAM is unchanged. The head's Jacobian is multiplied by ``a > 0`` and the maps are
  divided by their own maximum, so the normalised CAM output is identical.
* Max pooling commutes with the map (``max a·zᵢ + b = a·max zᵢ + b``), so a map fitted
  on *patient-level* (max-pooled) validation logits folds into the *slice* model and
  calibrates the patient-level probability that the card reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicomnode.training.metrics import calibration as calibration_curve

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationError",
    "CalibrationFit",
    "CalibrationMethod",
    "calibrate_model",
    "fit_calibration",
    "fold_into_head",
    "predict_logits",
]

CalibrationMethod = Literal["temperature", "platt"]
CALIBRATION_METHODS: tuple[str, ...] = ("none", "temperature", "platt")

_MAX_ITERATIONS = 100
_TOLERANCE = 1e-10
_SCALE_BOUNDS = (1e-3, 1e3)

FloatArray = NDArray[np.float64]


class CalibrationError(ValueError):
    """Calibration cannot be fitted or folded (one class only, reversed ranking, odd head)."""


@dataclass(frozen=True)
class CalibrationFit:
    """The fitted map ``z' = scale·z + shift`` and what it did on the fitting data."""

    method: CalibrationMethod
    scale: float
    shift: float
    n: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def apply(self, logits: ArrayLike) -> FloatArray:
        out: FloatArray = np.asarray(logits, dtype=np.float64) * self.scale + self.shift
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale": self.scale, "shift": self.shift,
                "temperature": self.temperature, "fitted_on_cases": self.n,
                "nll_before": self.nll_before, "nll_after": self.nll_after,
                "ece_before": self.ece_before, "ece_after": self.ece_after,
                "folded_into": "the head's last Linear layer (exported logit is calibrated)"}


def _log_sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = -np.logaddexp(0.0, -x)
    return out


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def _nll(z: FloatArray, targets: FloatArray) -> float:
    """Mean binary cross-entropy of logits ``z`` against (soft) targets."""
    return float(-np.mean(targets * _log_sigmoid(z) + (1.0 - targets) * _log_sigmoid(-z)))


def _smoothed_targets(y: NDArray[np.int64]) -> FloatArray:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    high = (n_pos + 1.0) / (n_pos + 2.0)
    low = 1.0 / (n_neg + 2.0)
    out: FloatArray = np.where(y == 1, high, low).astype(np.float64)
    return out


def _newton(z: FloatArray, t: FloatArray, with_shift: bool) -> tuple[float, float]:
    """Minimise the NLL of ``a·z + b`` (convex) by damped Newton steps from (1, 0)."""
    a, b = 1.0, 0.0
    current = _nll(z, t)
    for _ in range(_MAX_ITERATIONS):
        p = _sigmoid(a * z + b)
        r = p - t
        w = p * (1.0 - p)
        if with_shift:
            grad = np.array([np.sum(r * z), np.sum(r)])
            hess = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
            hess += np.eye(2) * 1e-9 * max(1.0, float(np.trace(hess)))
            step = np.linalg.solve(hess, grad)
        else:
            step = np.array([np.sum(r * z) / max(float(np.sum(w * z * z)), 1e-12), 0.0])
        factor, trial = 1.0, math.inf
        a_new, b_new = a, b
        while factor > 1e-6:
            a_new = float(np.clip(a - factor * step[0], *_SCALE_BOUNDS))
            b_new = b - factor * float(step[1])
            trial = _nll(a_new * z + b_new, t)
            if trial <= current + 1e-15:
                break
            factor *= 0.5
        if not trial <= current + 1e-15:
            break
        done = abs(current - trial) < _TOLERANCE
        a, b, current = a_new, b_new, trial
        if done:
            break
    return a, b


def fit_calibration(
    logits: ArrayLike, labels: ArrayLike, method: CalibrationMethod = "temperature",
    *, n_bins: int = 10,
) -> CalibrationFit:
    """Fit ``scale`` (and for ``platt`` ``shift``) minimising the NLL on these cases.

    Raises :class:`CalibrationError` when a class is missing or when the best scale is
    not positive (the model ranks the classes the wrong way round; calibration must not
    hide that by flipping the sign).
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if z.shape != y.shape:
        raise CalibrationError(f"{z.size} logits but {y.size} labels")
    if not np.isfinite(z).all():
        raise CalibrationError("logits contain NaN or infinite values")
    if y.size == 0 or y.min() == y.max():
        raise CalibrationError("calibration needs cases of both classes")
    if method not in ("temperature", "platt"):
        raise CalibrationError(f"unknown calibration method {method!r}")
    if float(np.sum((y - y.mean()) * z)) <= 0:
        raise CalibrationError("the logits rank negatives above positives; refusing to "
                               "calibrate a reversed model")
    t = _smoothed_targets(y)
    a, b = _newton(z, t, with_shift=method == "platt")
    before = calibration_curve(y, _sigmoid(z), n_bins=n_bins).ece
    after = calibration_curve(y, _sigmoid(a * z + b), n_bins=n_bins).ece
    return CalibrationFit(method, a, b, int(y.size), _nll(z, y.astype(np.float64)),
                          _nll(a * z + b, y.astype(np.float64)), float(before), float(after))


# --- torch side ------------------------------------------------------------------------------


def predict_logits(
    model: nn.Module,
    x: np.ndarray,
    *,
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
    batch_size: int = 64,
) -> FloatArray:
    """The single logit per sample (N,) in eval mode, on the model's device.

    Probabilities from float32 saturate near |z| ≈ 17, which would hide exactly the
    confident cases a temperature acts on, so calibration reads logits directly.
    """
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    chunks: list[FloatArray] = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
            batch = batch.to(device)
            out = forward(model, batch) if forward is not None else model(batch)
            if out.ndim != 2 or out.shape[1] != 1:
                raise CalibrationError(f"calibration needs one logit per sample; the model "
                                       f"gives shape {tuple(out.shape)}")
            chunks.append(out[:, 0].double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(chunks)


def _last_linear(model: nn.Module) -> nn.Linear:
    from torch import nn

    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise CalibrationError(f"{type(model).__name__} has no head to fold a calibration into")
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    while layers and isinstance(layers[-1], nn.Dropout | nn.Identity):
        layers.pop()
    last = layers[-1] if layers else None
    if not isinstance(last, nn.Linear) or last.out_features != 1:
        raise CalibrationError("the head does not end in a Linear layer with one output")
    return last


def fold_into_head(model: nn.Module, fit: CalibrationFit) -> None:
    """Make the model's own logit the calibrated one (see the module docstring)."""
    import torch

    if not (math.isfinite(fit.scale) and fit.scale > 0 and math.isfinite(fit.shift)):
        raise CalibrationError(f"cannot fold scale {fit.scale} / shift {fit.shift}")
    linear = _last_linear(model)
    with torch.no_grad():
        linear.weight.mul_(fit.scale)
        if linear.bias is not None:
            linear.bias.mul_(fit.scale).add_(fit.shift)
        elif fit.shift != 0.0:
            raise CalibrationError("the last Linear layer has no bias to carry the shift")


def calibrate_model(
    model: nn.Module,
    x_val: np.ndarray,
    pool: Callable[[FloatArray], tuple[NDArray[np.int64], FloatArray]],
    *,
    method: CalibrationMethod = "temperature",
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> CalibrationFit:
    """Fit on validation logits, pooled to the level the card reports, and fold in.

    ``pool(logits)`` returns the (labels, logits) the metrics are computed on: the
    per-sample ones, or one per patient for a MIL task. After folding, the model's
    validation logits are checked to equal the mapped ones, so a head the folding
    misunderstood cannot pass silently.
    """
    raw = predict_logits(model, x_val, forward=forward)
    labels, pooled = pool(raw)
    fit = fit_calibration(pooled, labels, method)
    fold_into_head(model, fit)
    after = predict_logits(model, x_val, forward=forward)
    expected = fit.apply(raw)
    if not np.allclose(after, expected, rtol=1e-4, atol=1e-4 * max(1.0, fit.scale)):
        raise CalibrationError("folding the calibration into the head did not scale the "
                               "logits as fitted (is there a layer after the last Linear?)")
    return fit
