"""The training loop: seeded, staged, clipped, and stopped on validation AUC.

The recipes the seeds describe, as options rather than scripts:

* class weighting — ``pos_weight = n_neg / n_pos`` for a single-logit BCE loss, weights
  ``N / (K · n_k)`` for cross-entropy (seed 004; seed 000's model learned "always PD"
  from a 10:15 imbalance);
* augmentation after preprocessing (:mod:`dicomnode.training.augment`);
* frozen-then-unfrozen stages with a learning rate per parameter group
  (:func:`seed002_stages`: classifier, layer4, layer3 at 10 : 2 : 1); batch-norm layers
  whose parameters are all frozen stay in eval mode so their running statistics are
  kept too;
* gradient-norm clipping;
* an optional localisation loss (``localisation_weight`` > 0, training masks given):
  on positive samples with a lesion mask (label 1 for BCE, any label but 0 for CE, whose
  own class's map is trained), the cross-entropy between the softmax of the exported
  Grad-CAM's evidence on the feature grid and the mask's share of each cell
  (:func:`~dicomnode.training.gradcam.localisation_loss`), so the served heat map's peak
  is trained towards the lesion instead of wherever the kernels happen to put it;
* early stopping on validation AUC, per stage, restoring the best weights (falls back to
  validation loss, and says so, when the validation set has one class); with
  ``restore_best=False`` and ``patience=None`` the validation data only get reported,
  which is what a cross-validation fold needs.

Runs are reproducible: :func:`reproducible` seeds torch and turns on deterministic
algorithms; shuffling and augmentation draw from their own seeded generators, so two
runs with one seed give identical weights. Progress goes to stderr as plain text.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from dicomnode.training.augment import Augmentation, augment_batch, augment_batch_with_masks
from dicomnode.training.metrics import auc, macro_auc

__all__ = [
    "EpochRecord",
    "LossKind",
    "ParamGroup",
    "Progress",
    "Stage",
    "TrainConfig",
    "TrainResult",
    "class_weights",
    "fit",
    "make_loss",
    "predict_scores",
    "reproducible",
    "seed002_stages",
]

LossKind = Literal["bce", "ce"]
Forward = Callable[[nn.Module, Tensor], Tensor]
REST = "rest"


@dataclass(frozen=True)
class ParamGroup:
    """Parameters whose names start with one of ``prefixes``; optional own weight decay."""

    name: str
    prefixes: tuple[str, ...]
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name == REST:
            raise ValueError(f"a parameter group needs a name other than {REST!r}")
        if not self.prefixes:
            raise ValueError(f"parameter group {self.name!r} has no prefixes")


@dataclass(frozen=True)
class Stage:
    """``epochs`` epochs training only the groups named in ``learning_rates``.

    Parameters in no named group belong to the group ``"rest"``; name it to train them.
    """

    name: str
    epochs: int
    learning_rates: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"stage {self.name!r} needs at least one epoch")
        if not self.learning_rates:
            raise ValueError(f"stage {self.name!r} trains nothing")
        for group, lr in self.learning_rates:
            if not lr > 0:
                raise ValueError(f"stage {self.name!r}: learning rate of {group!r} must be > 0")

    @property
    def rates(self) -> dict[str, float]:
        return dict(self.learning_rates)


def decay_stages(learning_rate: float, epochs: int) -> tuple[Stage, ...]:
    """A step schedule as stages: ``epochs`` at the rate, then two shorter stages (a
    quarter of ``epochs``, at least 2) at 1/3 and 1/10 of it; the loop starts each stage
    from the best weights so far."""
    short = max(2, epochs // 4)
    return (Stage("lr", epochs, ((REST, learning_rate),)),
            Stage("lr/3", short, ((REST, learning_rate / 3),)),
            Stage("lr/10", short, ((REST, learning_rate / 10),)))


def seed002_stages(
    *,
    head_lr: float = 5e-5,
    epochs: tuple[int, int, int] = (5, 7, 28),
    head: str = "head",
    deeper: tuple[str, str] = ("backbone.layer4", "backbone.layer3"),
    ratios: tuple[float, float, float] = (10, 2, 1),
) -> tuple[tuple[ParamGroup, ...], tuple[Stage, ...]]:
    """Seed 002's curriculum: head; then layer4 + head; then layer3 + layer4 + head.

    Learning rates in the ratio head : layer4 : layer3 = 10 : 2 : 1 (5e-5, 1e-5, 5e-6 by
    default); everything else (stem, layer1, layer2) stays frozen throughout. The
    head gets weight decay 1e-3, the backbone 1e-4, as in the seed.
    """
    lr = [head_lr * r / ratios[0] for r in ratios]
    groups = (
        ParamGroup("head", (head,), weight_decay=1e-3),
        ParamGroup("layer4", (deeper[0],), weight_decay=1e-4),
        ParamGroup("layer3", (deeper[1],), weight_decay=1e-4),
    )
    stages = (
        Stage("head", epochs[0], (("head", lr[0]),)),
        Stage("layer4+head", epochs[1], (("head", lr[0]), ("layer4", lr[1]))),
        Stage("layer3+layer4+head", epochs[2],
              (("head", lr[0]), ("layer4", lr[1]), ("layer3", lr[2]))),
    )
    return groups, stages


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in the checkpoint and the card."""

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    groups: tuple[ParamGroup, ...] = ()
    stages: tuple[Stage, ...] = ()
    grad_clip_norm: float | None = 1.0
    class_weighting: Literal["balanced", "none"] = "balanced"
    augmentation: Augmentation = field(default_factory=Augmentation)
    patience: int | None = 5
    min_delta: float = 0.0
    restore_best: bool = True
    seed: int = 0
    deterministic: bool = True
    progress: bool = True
    device: str = "cpu"
    localisation_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (batch norm needs two samples)")
        if self.epochs < 1 and not self.stages:
            raise ValueError("epochs must be >= 1")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError("grad_clip_norm must be > 0 or None")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience must be >= 1 or None")
        if not (math.isfinite(self.localisation_weight) and self.localisation_weight >= 0):
            raise ValueError("localisation_weight must be a finite number >= 0")
        known = {g.name for g in self.groups} | {REST}
        for stage in self.stages:
            unknown = sorted(set(stage.rates) - known)
            if unknown:
                raise ValueError(f"stage {stage.name!r} names unknown group(s) {unknown}")

    def plan(self) -> tuple[Stage, ...]:
        """The stages to run; without stages, one stage training everything."""
        if self.stages:
            return self.stages
        return (Stage("all", self.epochs, ((REST, self.learning_rate),)),)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["augmentation"] = self.augmentation.to_dict()
        return data


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's numbers; ``val_auc`` is NaN when validation has one class.

    ``train_loss`` is the classification loss; ``train_localisation_loss`` the mean
    localisation loss over the batches that had a lesion (NaN when none was trained).
    """

    epoch: int
    stage: str
    train_loss: float
    val_loss: float
    val_auc: float
    learning_rates: tuple[tuple[str, float], ...]
    seconds: float
    best: bool
    train_localisation_loss: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["learning_rates"] = dict(self.learning_rates)
        for key in ("train_loss", "val_loss", "val_auc", "train_localisation_loss"):
            if not math.isfinite(data[key]):
                data[key] = None
        return data


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The best model (eval mode, best weights loaded) and how training went."""

    model: nn.Module
    history: tuple[EpochRecord, ...]
    best_epoch: int
    best_score: float
    monitor: str
    stopped_early: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch,
                "best_score": self.best_score if math.isfinite(self.best_score) else None,
                "monitor": self.monitor, "stopped_early_in": list(self.stopped_early),
                "seconds": round(self.seconds, 2),
                "history": [r.to_dict() for r in self.history]}


@contextlib.contextmanager
def reproducible(seed: int, *, deterministic: bool = True) -> Iterator[None]:
    """Seed torch and (optionally) require deterministic kernels; restored on exit.

    The CPU kernels these models use are deterministic for a fixed thread count, so the
    global switch (whose first call imports torch's compiler stack, seconds on a busy
    node) is only thrown where CUDA is present; there ``warn_only`` keeps an op without
    a deterministic kernel from failing a run, and cuBLAS gets the workspace setting
    deterministic matmuls need.
    """
    cuda = torch.cuda.is_available()
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        if deterministic and cuda:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags


def class_weights(labels: NDArray[np.int64], n_classes: int) -> NDArray[np.float64]:
    """``N / (K · n_k)``: each class contributes equally to the loss (1 when balanced)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"the training set has no samples of class(es) {missing}")
    weights: NDArray[np.float64] = labels.size / (n_classes * counts)
    return weights


def make_loss(kind: LossKind, labels: NDArray[np.int64], n_classes: int,
              weighting: Literal["balanced", "none"] = "balanced") -> nn.Module:
    """BCE-with-logits (``pos_weight = n_neg / n_pos``) or weighted cross-entropy."""
    if kind == "bce":
        if n_classes != 2:
            raise ValueError("a single-logit BCE loss is for two classes")
        if weighting == "none":
            return nn.BCEWithLogitsLoss()
        w = class_weights(labels, 2)
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([w[1] / w[0]], dtype=torch.float32))
    weight = None if weighting == "none" else torch.tensor(class_weights(labels, n_classes),
                                                           dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight)


def _targets(kind: LossKind, y: Tensor) -> Tensor:
    return y.to(torch.float32).reshape(-1, 1) if kind == "bce" else y.to(torch.int64)


def _scores(kind: LossKind, logits: Tensor) -> Tensor:
    if kind == "bce":
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)


def _default_forward(model: nn.Module, x: Tensor) -> Tensor:
    out: Tensor = model(x)
    return out


def predict_scores(
    model: nn.Module,
    x: np.ndarray,
    *,
    loss_kind: LossKind,
    batch_size: int = 64,
    forward: Forward | None = None,
) -> NDArray[np.float64]:
    """Probabilities in eval mode: P(positive) (N,) for BCE, softmax (N, K) for CE.

    Runs on the device the model's parameters are on.
    """
    run = forward or _default_forward
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
            chunks.append(_scores(loss_kind, run(model, batch.to(device))).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(chunks, axis=0)


def _group_of(name: str, groups: Sequence[ParamGroup]) -> str:
    for group in groups:
        if any(name == p or name.startswith(p if p.endswith(".") else p + ".")
               for p in group.prefixes):
            return group.name
    return REST


def _configure_stage(
    model: nn.Module, stage: Stage, config: TrainConfig
) -> tuple[torch.optim.Optimizer, dict[str, float]]:
    """Freeze what the stage does not train and build its optimizer (one group per group)."""
    rates = stage.rates
    by_group: dict[str, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        group = _group_of(name, config.groups)
        trainable = group in rates
        parameter.requires_grad_(trainable)
        if trainable:
            by_group.setdefault(group, []).append(parameter)
    if not by_group:
        raise ValueError(f"stage {stage.name!r} matches no parameters of the model")
    decay = {g.name: g.weight_decay for g in config.groups}
    param_groups = [
        {"params": params, "lr": rates[group], "name": group,
         "weight_decay": decay.get(group) if decay.get(group) is not None
         else config.weight_decay}
        for group, params in by_group.items()
    ]
    return torch.optim.AdamW(param_groups), {g: rates[g] for g in by_group}


def _train_mode(model: nn.Module) -> None:
    """Train mode, except batch norms whose parameters are all frozen (seed 002)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


class Progress:
    """A plain-text progress line with running loss; redrawn in place on a terminal."""

    def __init__(self, stream: TextIO | None, total_epochs: int) -> None:
        self.stream = stream
        self.total = total_epochs
        self.tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())

    def batch(self, epoch: int, stage: str, done: int, total: int, loss: float) -> None:
        if self.stream is None or not self.tty:
            return
        width = 24
        filled = int(width * done / max(total, 1))
        self.stream.write(f"\repoch {epoch}/{self.total} [{stage}] "
                          f"{'#' * filled}{'-' * (width - filled)} {done}/{total} "
                          f"loss {loss:.4f}")
        self.stream.flush()

    def epoch(self, record: EpochRecord, monitor: str) -> None:
        if self.stream is None:
            return
        auc_text = f"{record.val_auc:.3f}" if math.isfinite(record.val_auc) else "n/a"
        loc = record.train_localisation_loss
        loc_text = f" loc {loc:.4f}" if math.isfinite(loc) else ""
        self.stream.write(("\r" if self.tty else "") +
                          f"epoch {record.epoch}/{self.total} [{record.stage}] train loss "
                          f"{record.train_loss:.4f}{loc_text} | val loss {record.val_loss:.4f} auc "
                          f"{auc_text}{' *best ' + monitor if record.best else ''} "
                          f"({record.seconds:.1f}s)\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()


def _validation_score(kind: LossKind, y: NDArray[np.int64], scores: NDArray[np.float64]
                      ) -> float:
    if np.unique(y).size < 2:
        return float("nan")
    return auc(y, scores) if kind == "bce" else macro_auc(y, scores)


def _check_localisation(model: nn.Module, x: np.ndarray, masks: np.ndarray, *,
                        loss_kind: LossKind, forward: Forward | None) -> None:
    from dicomnode.training.architectures import GapClassifier

    if not isinstance(model, GapClassifier) or forward is not None:
        raise ValueError("the localisation loss needs a GapClassifier called directly (no "
                         "task forward)")
    if masks.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"need one (H, W) mask per training sample: masks {masks.shape}, "
                         f"images {x.shape}")


def _localised_losses(model: nn.Module, loss_fn: nn.Module, loss_kind: LossKind, x: Tensor,
                      y: Tensor, masks: Tensor, config: TrainConfig,
                      generator: torch.Generator, device: torch.device
                      ) -> tuple[Tensor, Tensor]:
    """The classification loss and the localisation loss of one batch (one forward)."""
    from dicomnode.training.architectures import GapClassifier
    from dicomnode.training.gradcam import class_evidence, localisation_loss, mask_to_grid

    assert isinstance(model, GapClassifier)
    xb, mb = augment_batch_with_masks(x, masks.to(torch.float32), config.augmentation,
                                      generator)
    xb, mb, y = xb.to(device), mb.to(device), y.to(device)
    feature_map = model.features(xb)
    logits = model.head(feature_map.mean(dim=(2, 3)))
    loss = loss_fn(logits, _targets(loss_kind, y))
    positive = (y > 0).to(mb.dtype).reshape(-1, 1, 1)
    target = mask_to_grid(mb * positive, feature_map.shape[-2:], model.backbone.output_stride)
    own = 0 if loss_kind == "bce" else y
    return loss, localisation_loss(class_evidence(model, feature_map, own), target)


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, NDArray[np.int64]],
    val: tuple[np.ndarray, NDArray[np.int64]],
    config: TrainConfig,
    *,
    loss_kind: LossKind,
    n_classes: int,
    forward: Forward | None = None,
    stream: TextIO | None = sys.stderr,
    masks: np.ndarray | None = None,
) -> TrainResult:
    """Train ``model`` in place on arrays (N, ...) and return it with its best weights.

    Training runs on ``config.device``; shuffling and augmentation draw on the CPU, so a
    seed picks the same batches and transforms on any device. The model is left on that
    device, in eval mode.

    ``masks`` (N, H, W), lesion masks of the training samples at the model input (zero
    where a sample has none), turn on the localisation loss when
    ``config.localisation_weight`` > 0; that needs a
    :class:`~dicomnode.training.architectures.GapClassifier` called directly. Without
    masks, or at weight 0, training is exactly what it was without them.
    """
    x_train, y_train = train
    x_val, y_val = val
    if x_train.shape[0] != y_train.shape[0] or x_val.shape[0] != y_val.shape[0]:
        raise ValueError("each set needs one label per sample")
    if x_train.shape[0] < 2:
        raise ValueError("need at least two training samples")
    run = forward or _default_forward
    if masks is not None and config.localisation_weight > 0:
        _check_localisation(model, x_train, masks, loss_kind=loss_kind, forward=forward)
    else:
        masks = None
    progress = Progress(stream if config.progress else None,
                        sum(s.epochs for s in config.plan()))
    started = time.perf_counter()
    with reproducible(config.seed, deterministic=config.deterministic):
        device = torch.device(config.device)
        model.to(device)
        loss_fn = make_loss(loss_kind, y_train, n_classes, config.class_weighting).to(device)
        shuffle = torch.Generator().manual_seed(config.seed)
        augment = torch.Generator().manual_seed(config.seed + 1)
        xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
        yt = torch.from_numpy(y_train.astype(np.int64))
        mt = torch.from_numpy(np.ascontiguousarray(masks)) if masks is not None else None
        xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32)).to(device)
        yv = torch.from_numpy(y_val.astype(np.int64)).to(device)
        monitor = "val_auc" if np.unique(y_val).size > 1 else "val_loss"
        if monitor == "val_loss":
            progress.note("validation set has one class: early stopping monitors val loss")
        history: list[EpochRecord] = []
        best_score = -math.inf
        best_epoch = 0
        best_state = copy.deepcopy(model.state_dict())
        stopped: list[str] = []
        epoch = 0
        for stage in config.plan():
            optimizer, rates = _configure_stage(model, stage, config)
            since_best = 0
            for stage_epoch in range(1, stage.epochs + 1):
                epoch += 1
                epoch_start = time.perf_counter()
                _train_mode(model)
                order = torch.randperm(xt.shape[0], generator=shuffle)
                batches = [order[i:i + config.batch_size]
                           for i in range(0, order.numel(), config.batch_size)]
                if len(batches) > 1 and batches[-1].numel() == 1:
                    batches.pop()  # a batch of one breaks batch norm
                total_loss = 0.0
                seen = 0
                loc_total, loc_batches = 0.0, 0
                for number, index in enumerate(batches, start=1):
                    if mt is None:
                        xb = augment_batch(xt[index], config.augmentation, augment).to(device)
                        loss = loss_fn(run(model, xb),
                                       _targets(loss_kind, yt[index].to(device)))
                        total = loss
                    else:
                        loss, loc = _localised_losses(model, loss_fn, loss_kind, xt[index],
                                                      yt[index], mt[index], config, augment,
                                                      device)
                        total = loss + config.localisation_weight * loc
                        if loc.requires_grad and float(loc.detach()) != 0.0:
                            loc_total += float(loc.detach())
                            loc_batches += 1
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    if config.grad_clip_norm is not None:
                        nn.utils.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad],
                            config.grad_clip_norm)
                    optimizer.step()
                    total_loss += float(loss.detach()) * index.numel()
                    seen += index.numel()
                    progress.batch(epoch, stage.name, number, len(batches), total_loss / seen)
                model.eval()
                with torch.no_grad():
                    logits = torch.cat([run(model, xv[i:i + 64])
                                        for i in range(0, xv.shape[0], 64)])
                    val_loss = float(loss_fn(logits, _targets(loss_kind, yv)))
                    scores = _scores(loss_kind, logits).double().cpu().numpy()
                val_auc = _validation_score(loss_kind, y_val, scores)
                score = val_auc if monitor == "val_auc" else -val_loss
                improved = math.isfinite(score) and score > best_score + config.min_delta
                if improved:
                    best_score, best_epoch, since_best = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    since_best += 1
                record = EpochRecord(epoch, stage.name, total_loss / max(seen, 1), val_loss,
                                     val_auc, tuple(sorted(rates.items())),
                                     time.perf_counter() - epoch_start, improved,
                                     loc_total / loc_batches if loc_batches else math.nan)
                history.append(record)
                progress.epoch(record, monitor)
                if (config.patience is not None and since_best >= config.patience
                        and stage_epoch < stage.epochs):
                    stopped.append(stage.name)
                    progress.note(f"early stop in stage {stage.name!r}: no {monitor} "
                                  f"improvement for {config.patience} epoch(s)")
                    break
            if config.restore_best:
                model.load_state_dict(best_state)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model.eval()
    reported = best_score if monitor == "val_auc" else -best_score
    return TrainResult(model, tuple(history), best_epoch, reported, monitor, tuple(stopped),
                       time.perf_counter() - started)
