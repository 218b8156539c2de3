"""Losses chosen by name from YAML: cross-entropy (class weights, label smoothing) and focal loss.

All take logits ``(N, C)`` and integer targets ``(N,)``; targets equal to -100 are ignored, so token-level tasks
flatten and pass their -100 padding straight through.
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
    """Cross-entropy or focal loss (Lin et al. 2017)."""
    class_weights: list[float] | Literal["balanced"] | None = None
    """Per-class weights, or ``balanced`` = n_examples / (n_classes * count_c) from the training labels."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (``ce`` only)."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss; 0 gives (weighted) cross-entropy."""

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


def class_weights(cfg: LossConfig, label_counts: Sequence[int] | None, num_labels: int) -> torch.Tensor | None:
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "balanced":
        if not label_counts:
            raise TaskheadError("loss.class_weights: balanced needs training labels (no train split was loaded)")
        counts = torch.tensor(label_counts, dtype=torch.float)
        return counts.sum() / (len(counts) * counts.clamp(min=1))
    if len(cfg.class_weights) != num_labels:
        raise TaskheadError(f"loss.class_weights has {len(cfg.class_weights)} values for {num_labels} labels")
    return torch.tensor(cfg.class_weights, dtype=torch.float)


def build_loss(cfg: LossConfig, label_counts: Sequence[int] | None, num_labels: int) -> tuple[Callable, torch.Tensor | None]:
    """Return ``(loss_fn(logits, target, weight), weight)``; the module keeps ``weight`` as a buffer (moves with it)."""
    weight = class_weights(cfg, label_counts, num_labels)
    if cfg.name == "focal":
        return (lambda logits, target, w: focal_loss(logits, target, w, cfg.focal_gamma)), weight
    return (
        lambda logits, target, w: F.cross_entropy(
            logits.float(), target, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing
        )
    ), weight
