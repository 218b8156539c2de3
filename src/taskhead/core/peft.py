"""Parameter-efficient fine-tuning: LoRA (and QLoRA on CUDA) through ``peft``, on any task's Hugging Face model.

``model.peft: {method: lora, r, alpha, dropout, target_modules, bias}`` wraps ``self.model`` in a ``PeftModel``:
the pretrained weights are frozen, low-rank adapters are added to linear layers *of the backbone only*, and the
task's own layers (the backbone family's head: ``classifier``, ``score``, ``qa_outputs``, DistilBERT's
``pre_classifier``, ...) stay fully trainable and go into ``modules_to_save`` so that peft's own adapter files carry
them. Pitfalls this file exists to avoid (each has a test in tests/test_peft.py):

- the classification head lost on save unless it is in ``modules_to_save`` (peft #310/#577, transformers #26160);
- ``target_modules: all-linear`` wrapping the head itself (peft #2027): targets are resolved here to a regex that
  only matches inside the backbone;
- reentrant gradient checkpointing leaving LoRA weights without gradients: non-reentrant, plus
  ``enable_input_require_grads()``;
- quantised heads under QLoRA (peft #1720): heads are listed in ``llm_int8_skip_modules`` and stay full precision.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from taskhead.errors import TaskheadError

PEFT_HINT = "pip install 'taskhead[peft]' (or: pip install peft)"


@dataclass(frozen=True)
class PeftConfig:
    method: Literal["lora"] = "lora"
    """Parameter-efficient method; LoRA (Hu et al. 2021) through the ``peft`` package."""
    r: int = 8
    """Rank of each low-rank update."""
    alpha: int = 16
    """LoRA scaling numerator: the update is ``(alpha / r) * B @ A``."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    target_modules: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer of the backbone), a list of module names (``[q_proj, v_proj]``), or a
    regex over full module names. Always restricted to the backbone: the task head is trained in full instead."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all of them, or those of adapted layers."""
    quantization: Literal["none", "nf4"] = "none"
    """``nf4``: QLoRA, the frozen base loaded in 4-bit NF4 (CUDA + bitsandbytes only; the head stays full precision)."""
    exclude_modules: list[str] = field(default_factory=list)
    """Module names never adapted (in addition to the head), e.g. ``[lm_head]``."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise TaskheadError(f"model.peft: r must be >= 1, alpha > 0 and dropout in [0, 1); got r={self.r}, "
                                f"alpha={self.alpha}, dropout={self.dropout}")


def require_peft():
    try:
        import peft
    except ImportError:
        raise TaskheadError(f"model.peft needs the peft package: {PEFT_HINT}") from None
    return peft


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a ``PeftModel`` (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


# ---- what is the head, what is the backbone ---------------------------------------------------------------------------


def head_module_names(model: nn.Module) -> list[str]:
    """Direct children of an ``AutoModelFor*`` model outside its backbone that hold parameters: the task layers
    (``classifier``, ``score``, ``pre_classifier``, ``qa_outputs``). A generator's output embedding (``lm_head``) is
    pretrained and tied to the input embedding: it is not a head here. A bare ``AutoModel`` has none."""
    base = model.base_model
    if base is model:
        return []
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, child in model.named_children()
            if child is not base and child is not output and any(True for _ in child.parameters())]


LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)
try:  # GPT-2 style Conv1D is a linear layer too
    from transformers.pytorch_utils import Conv1D

    LINEAR_TYPES += (Conv1D,)
except ImportError:  # pragma: no cover
    pass


def target_regex(model: nn.Module, target_modules: str | list[str], exclude: list[str] = ()) -> str:
    """``target_modules`` → one regex over full module names that matches only inside the backbone.

    ``all-linear`` means every linear layer's leaf name found in the backbone (``q_proj``, ``down_proj``, ...);
    a list means those leaf names; a string that is not ``all-linear`` is a user regex, anchored to the backbone."""
    base = model.base_model
    prefix = "" if base is model else next(n for n, m in model.named_children() if m is base) + "."
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return rf"{re.escape(prefix)}(?:{target_modules})"
    if target_modules == "all-linear":
        names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, LINEAR_TYPES) and n}
    else:
        names = set(target_modules)
    names -= set(exclude)
    found = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules() if n}
    if not names or not names <= found:
        missing = sorted(names - found) if names else ["(no linear layers)"]
        raise TaskheadError(f"model.peft.target_modules: {missing} not found in the backbone "
                            f"({type(base).__name__}); its linear layers: {sorted(linear_leaf_names(base))}")
    return rf"{re.escape(prefix)}(?:.*\.)?(?:{'|'.join(sorted(map(re.escape, names)))})"


def linear_leaf_names(module: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, LINEAR_TYPES) and n}


# ---- building ---------------------------------------------------------------------------------------------------------


def quantization_kwargs(cfg: PeftConfig | None, model_class_name: str = "") -> dict:
    """``from_pretrained`` kwargs for QLoRA (empty otherwise). Fails with one line where it cannot run: no CUDA, or
    no bitsandbytes. The heads are skipped by name (``llm_int8_skip_modules``), so they stay full precision."""
    if cfg is None or cfg.quantization == "none":
        return {}
    if not torch.cuda.is_available():
        raise TaskheadError("model.peft.quantization nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has "
                            "no CUDA device: use configs/peft/lora.yaml (quantization: none) here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TaskheadError("model.peft.quantization nf4 (QLoRA) needs bitsandbytes: pip install 'taskhead[qlora]'") from None
    import os

    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute,
                             llm_int8_skip_modules=["classifier", "score", "pre_classifier", "qa_outputs", "lm_head"])
    return {"quantization_config": bnb, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def apply_peft(model: nn.Module, cfg: PeftConfig, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap a Hugging Face model in a ``PeftModel`` with LoRA on the backbone and the head in ``modules_to_save``."""
    peft = require_peft()
    heads = head_module_names(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if output is not None and m is output]
    # a generator's lm_head is pretrained and (often) tied to the input embedding: never an adapter target
    regex = target_regex(model, cfg.target_modules, list(cfg.exclude_modules) + heads + lm_head)
    if cfg.quantization != "none":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias,
                           target_modules=regex, modules_to_save=heads or None)
    wrapped = peft.get_peft_model(model, lora)
    for name, p in wrapped.named_parameters():  # a head must never be quantised or frozen (peft #1720, #310)
        if ".modules_to_save." in name and not p.is_floating_point():
            raise TaskheadError(f"model.peft: head parameter {name} is quantised ({p.dtype}); it must stay full precision")
    return wrapped


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing. With reentrant checkpointing and a frozen embedding, the checkpointed
    blocks' inputs do not require grad, so the LoRA weights inside get no gradient at all; non-reentrant has no such
    gap, and ``enable_input_require_grads`` closes it for any path that still goes through a reentrant call."""
    hf = unwrap(model)
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise TaskheadError(f"model.gradient_checkpointing: {type(hf).__name__} does not support gradient checkpointing")
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft(model):
        hf.enable_input_require_grads()
    if hasattr(hf.config, "use_cache"):
        hf.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


# ---- accounting and checkpoints ---------------------------------------------------------------------------------------


def numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values into one byte: count the weights, not the bytes
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def trainable_summary(module: nn.Module) -> tuple[int, int, str]:
    """(trainable, total, "trainable params: N of M (x %)") over the whole LightningModule (heads included)."""
    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    total = sum(numel(p) for p in module.parameters())
    return trainable, total, f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4g} %)"


def base_fingerprint(params: list[torch.Tensor]) -> str:
    """A cheap identity of the frozen base weights (the first 16 values of each tensor, in order): a LoRA checkpoint
    holds only its adapters, so resuming or exporting it on top of different base weights must be refused."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
