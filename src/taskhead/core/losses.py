"""Losses chosen by name from YAML: cross-entropy (class weights, label smoothing) and focal loss; for multi-label
classification their per-label binary forms; MSE and Huber for regression.

Single-label losses take logits ``(N, C)`` and integer targets ``(N,)``; targets equal to -100 are ignored, so
token-level tasks flatten and pass their -100 padding straight through. Multi-label losses take logits ``(N, L)`` and
multi-hot float targets ``(N, L)``; regression losses predictions ``(N, 1)`` and float targets ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from taskhead.errors import TaskheadError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossConfig:
    name: Literal["ce", "focal"] = "ce"
    """Classification loss: cross-entropy or focal loss (Lin et al. 2017); for multi_label, their per-label binary
    (sigmoid) forms."""
    class_weights: list[float] | Literal["balanced"] | None = None
    """Per-class weights, or ``balanced`` = n_examples / (n_classes * count_c) from the training labels. multi_label:
    per-label ``pos_weight``; ``balanced`` = negatives / positives of each label in the training rows."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (``ce`` only); multi_label targets become ``y (1 - e) + e / 2``."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss; 0 gives (weighted) cross-entropy."""
    regression: Literal["mse", "huber"] = "mse"
    """Regression loss (``problem_type: regression``): mean squared error, or Huber (quadratic within
    ``huber_delta``, linear beyond: less pulled by outlying targets)."""
    huber_delta: float = 1.0
    """Where the Huber loss turns from quadratic to linear."""

    def __post_init__(self) -> None:
        if self.name == "focal" and self.label_smoothing:
            raise TaskheadError("loss: label_smoothing applies to 'ce' only, not to 'focal'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TaskheadError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, gamma: float = 2.0) -> torch.Tensor:
    """Mean over non-ignored targets of ``-w_y (1 - p_y)^gamma log p_y``, normalised by the weights like F.cross_entropy."""
    keep = target != IGNORE_INDEX
    logits, target = logits[keep].float(), target[keep]
    logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)  # (N,)
    w = weight[target] if weight is not None else torch.ones_like(logp)
    return -(w * (1 - logp.exp()) ** gamma * logp).sum() / w.sum()


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None,
                       gamma: float = 2.0) -> torch.Tensor:
    """Multi-label focal loss (Lin et al. 2017, per label): mean of ``(1 - p_t)^gamma * BCE`` over every (row, label),
    the BCE weighted by ``pos_weight`` on positives; gamma 0 gives ``F.binary_cross_entropy_with_logits``."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")  # (N, L)
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)  # probability given to the right answer, per label
    return ((1 - p_t) ** gamma * bce).mean()


def class_weights(cfg: LossConfig, label_counts: Sequence | None, num_labels: int) -> torch.Tensor | None:
    """Single-label: one weight per class (``label_counts``: examples per class). Multi-label (``label_counts``: per
    label ``[negatives, positives]``): one ``pos_weight`` per label, ``balanced`` = negatives / positives."""
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "balanced":
        if not label_counts:
            raise TaskheadError("loss.class_weights: balanced needs training label counts (no train split was loaded, "
                                "or --data.streaming, which cannot count a stream ahead)")
        counts = torch.tensor(label_counts, dtype=torch.float)
        if counts.ndim == 2:  # (labels, [negatives, positives])
            return counts[:, 0] / counts[:, 1].clamp(min=1)
        return counts.sum() / (len(counts) * counts.clamp(min=1))
    if len(cfg.class_weights) != num_labels:
        raise TaskheadError(f"loss.class_weights has {len(cfg.class_weights)} values for {num_labels} labels")
    return torch.tensor(cfg.class_weights, dtype=torch.float)


ProblemType = Literal["single_label", "multi_label", "regression"]


def build_loss(cfg: LossConfig, label_counts: Sequence | None, num_labels: int,
               problem_type: ProblemType = "single_label") -> tuple[Callable, torch.Tensor | None]:
    """Return ``(loss_fn(logits, target, weight), weight)``; the module keeps ``weight`` as a buffer (moves with it)."""
    if problem_type == "regression":
        return regression_loss(cfg), None
    weight = class_weights(cfg, label_counts, num_labels)
    if problem_type == "multi_label":
        return multi_label_loss(cfg), weight
    if cfg.name == "focal":
        return (lambda logits, target, w: focal_loss(logits, target, w, cfg.focal_gamma)), weight
    return (
        lambda logits, target, w: F.cross_entropy(
            logits.float(), target, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing
        )
    ), weight


def multi_label_loss(cfg: LossConfig) -> Callable:
    """Per-label binary cross-entropy with logits (``pos_weight``: the class weights), or its focal form."""
    def loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
        if cfg.name == "focal":
            return sigmoid_focal_loss(logits, target, pos_weight, cfg.focal_gamma)
        return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight)

    return loss


def regression_loss(cfg: LossConfig) -> Callable:
    """MSE or Huber between the single output ``(N, 1)`` and the float target ``(N,)``; classification options refused."""
    if cfg.name != "ce" or cfg.class_weights is not None or cfg.label_smoothing:
        raise TaskheadError("problem_type regression: loss.name, class_weights and label_smoothing are classification "
                            "options; choose the regression loss with loss.regression: mse | huber")
    if cfg.regression == "huber":
        return lambda pred, target, _: F.huber_loss(pred.float().squeeze(-1), target, delta=cfg.huber_delta)
    return lambda pred, target, _: F.mse_loss(pred.float().squeeze(-1), target)
