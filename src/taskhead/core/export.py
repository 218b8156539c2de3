"""Load an exported directory back as a predictor on raw inputs, and the batched inference it runs on.

``taskhead.load(DIR)`` reads ``taskhead.json`` (written by ``TaskModule.export``), rebuilds the task's module from
the directory itself (no Hub access), loads a custom head's weights if there is one, and returns a
:class:`Predictor` whose call is the task's ``predict_raw``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from taskhead.core.module import EXPORT_CONFIG, HEAD_WEIGHTS
from taskhead.core.pretrained import load_tokenizer
from taskhead.errors import TaskheadError


def import_object(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class Predictor:
    """Callable wrapper: ``predictor(inputs, **options)`` → plain Python results, in input order."""

    def __init__(self, module, tokenizer, autocast: torch.dtype | None = None) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.autocast = autocast  # bf16/fp16 autocast dtype, or None for plain fp32

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device_type = next(self.module.parameters()).device.type
        with torch.inference_mode(), torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.module.predict_raw(self.tokenizer, *args, **kwargs)


def load(path: str | Path, device: str | torch.device = "cpu", precision: str = "auto") -> Predictor:
    """Load a directory written by ``taskhead export`` for prediction on raw inputs.

    ``precision``: ``auto`` (bf16 autocast where the device computes bf16 natively, as in training), ``32-true``,
    ``bf16-mixed`` or ``16-mixed``."""
    path = Path(path)
    spec_file = path / EXPORT_CONFIG
    if not spec_file.is_file():
        raise TaskheadError(f"{path}: not a taskhead export ({EXPORT_CONFIG} is missing)")
    spec = json.loads(spec_file.read_text())
    cls = import_object(spec["task"])
    module = cls(model_name_or_path=str(path), **spec["hparams"])
    if (path / HEAD_WEIGHTS).is_file():
        from safetensors.torch import load_file

        head = load_file(path / HEAD_WEIGHTS)
        missing, unexpected = module.load_state_dict(head, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise TaskheadError(f"{path / HEAD_WEIGHTS}: head weights do not match (missing {missing}, unexpected {unexpected})")
    from taskhead.core.precision import autocast_dtype

    return Predictor(module.to(device), load_tokenizer(str(path)), autocast_dtype(device, precision))


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint → Hugging Face directory (safetensors) + taskhead.json."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise TaskheadError(f"--ckpt_path {ckpt_path}: file not found")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    task = hparams.pop("_class_path", "")
    if not task.startswith("taskhead."):
        raise TaskheadError(f"{ckpt_path}: not a taskhead checkpoint (its hyper-parameters name no taskhead module)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the pretrained load's "newly initialised head" report is moot: the checkpoint follows
    try:
        module = import_object(task)(**hparams)
    finally:
        hf_logging.set_verbosity(verbosity)
    module.load_state_dict(ckpt["state_dict"])
    return module.export(out_dir, load_tokenizer(module.model_name_or_path))


def batched_inference(
    encodings: Sequence[dict[str, list[int]]],
    tokenizer,
    batch_size: int,
    run: Callable[[dict[str, torch.Tensor], list[int]], list[Any]],
    device: torch.device,
) -> list[Any]:
    """Run ``run(padded_inputs, example_indices)`` on length-sorted batches; return its per-example results in input order."""
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]["input_ids"]))
    results: list[Any] = [None] * len(encodings)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad([encodings[i] for i in idx], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in batch.items()}
        for i, r in zip(idx, run(inputs, idx)):
            results[i] = r
    return results
