"""Configurable heads: pooling, then dropout → [dense → (layer norm) → activation] * k → dropout → linear.

``head: null`` in YAML keeps the backbone's own head (``AutoModelFor*``), which is what exports to a standard
``transformers.pipeline``. A ``HeadConfig`` replaces it with the head described here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass(frozen=True)
class HeadConfig:
    pooling: Literal["auto", "cls", "mean", "max", "last"] = "auto"
    """How token states become one vector (sequence-level tasks): first token, masked mean, masked max, or the last
    non-pad token (the only one a causal LM has read the whole text at). ``auto``: ``last`` for decoder-only
    backbones (Llama, Qwen, GPT-2, ...), ``cls`` otherwise."""
    hidden_sizes: list[int] = field(default_factory=list)
    """Sizes of the dense layers between the pooled vector and the output layer; [] means a single linear layer."""
    activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu"
    """Activation after each hidden dense layer."""
    dropout: float = 0.1
    """Dropout before each dense layer and before the output layer."""
    layer_norm: bool = False
    """LayerNorm after each hidden dense layer (before the activation)."""


def build_head(cfg: HeadConfig, in_features: int, out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for size in cfg.hidden_sizes:
        layers += [nn.Dropout(cfg.dropout), nn.Linear(width, size)]
        if cfg.layer_norm:
            layers.append(nn.LayerNorm(size))
        layers.append(ACTIVATIONS[cfg.activation]())
        width = size
    layers += [nn.Dropout(cfg.dropout), nn.Linear(width, out_features)]
    return nn.Sequential(*layers)


def resolve_pooling(how: str, config) -> str:
    """``auto`` → ``last`` for a decoder-only backbone (``config``), ``cls`` otherwise; any other choice as given."""
    if how != "auto":
        return how
    from taskhead.core.pretrained import is_decoder_only

    return "last" if is_decoder_only(config) else "cls"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, seq, hidden) → (batch, hidden), ignoring padding. ``cls`` takes the first non-pad token, ``last`` the
    last one; both hold with left or right padding."""
    if how == "auto":
        raise ValueError("pool: resolve 'auto' with resolve_pooling(how, model_config) first")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if how == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if how == "last":
        positions = torch.arange(hidden.size(1), device=hidden.device)  # (seq,)
        last = (positions * attention_mask.long()).argmax(1)  # highest real position: right or left padding alike
        return hidden[rows, last]
    first = attention_mask.long().argmax(1)  # first real token: 0 with right padding, later with left padding
    return hidden[rows, first]
