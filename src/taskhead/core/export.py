"""Export a checkpoint (with its model card) and push it to the Hub; load an export back as a predictor on raw inputs.

``taskhead.load(DIR)`` reads ``taskhead.json`` (written by ``TaskModule.export``), rebuilds the task's module from
the directory itself (no Hub access), loads a custom head's weights if there is one, and returns a
:class:`Predictor` whose call is the task's ``predict_raw``. A LoRA adapter export (``--merge false``) is rebuilt on
its base model (``source`` in taskhead.json) and the adapter's weights are loaded on top.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from taskhead.core.card import write_card
from taskhead.core.run_facts import run_facts
from taskhead.core.pretrained import hub_offline
from taskhead.core.module import EXPORT_CONFIG, HEAD_WEIGHTS
from taskhead.core.pretrained import load_tokenizer, stored_source
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
    hparams = cls.known_hparams(spec["hparams"])
    if spec.get("adapter"):
        module = cls(model_name_or_path=spec["source"], **hparams)  # the base, with fresh adapters
        load_adapter(module, path)
    else:
        module = cls(model_name_or_path=str(path), **hparams)
    if (path / HEAD_WEIGHTS).is_file():
        from safetensors.torch import load_file

        head = load_file(path / HEAD_WEIGHTS)
        missing, unexpected = module.load_state_dict(head, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise TaskheadError(f"{path / HEAD_WEIGHTS}: head weights do not match (missing {missing}, unexpected {unexpected})")
    from taskhead.core.precision import autocast_dtype

    return Predictor(module.to(device), load_tokenizer(str(path)), autocast_dtype(device, precision))


def load_adapter(module, path: Path) -> None:
    """The adapter weights (LoRA + the head in ``modules_to_save``) of ``path`` into a module built with the same
    ``model.peft``; every tensor must find its place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise TaskheadError(f"{path}: an adapter export without adapter_model.safetensors")
    result = set_peft_model_state_dict(module.model, load_file(weights))
    missing = [k for k in result.missing_keys if "lora_" in k or ".modules_to_save." in k]
    if result.unexpected_keys or missing:
        raise TaskheadError(f"{weights}: adapter weights do not match the model (unexpected {result.unexpected_keys[:5]}, "
                            f"missing {missing[:5]})")
    module.model.eval()


@contextlib.contextmanager
def checkpoint_source(checkpoint: dict[str, Any]) -> Iterator[None]:
    """Build the module for ``checkpoint`` inside this: a full fine-tune's checkpoint holds its model's config and
    tokenizer (``TaskModule.source_files``), so the module is built from them, without the pretrained weights (nor
    their Hub, directory or package), and the checkpoint's weights are loaded next. A LoRA checkpoint holds only
    adapters, so it needs its base model (by design), as do checkpoints written before the source was stored."""
    state = checkpoint.get("taskhead") or {}
    source = state.get("source")
    if source is None or state.get("base_model") is not None:
        yield
        return
    names = {source["model_name_or_path"], (checkpoint.get("hyper_parameters") or {}).get("model_name_or_path")}
    with stored_source([n for n in names if n], source["files"]):
        yield


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, push_to_hub: str | None = None, private: bool = False,
                      merge: bool = True) -> Path:
    """Checkpoint → Hugging Face directory (safetensors) + taskhead.json + model card (README.md).

    Args:
        ckpt_path: A taskhead checkpoint; its run directory (``<run>/checkpoints/x.ckpt``) feeds the card if present.
        out_dir: Where to write the export.
        push_to_hub: ``OWNER/NAME``: also upload the directory to this Hub model repo (created if missing).
        private: Create the Hub repo private (refuses to upload into an existing public one).
        merge: A LoRA checkpoint: fold the adapters into the weights (a plain model ``transformers.pipeline`` loads),
            or (False) write only the adapter directory, loaded on top of the base model by ``taskhead.load`` or peft.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise TaskheadError(f"--ckpt_path {ckpt_path}: file not found")
    token = hub_preflight(push_to_hub, private) if push_to_hub else None  # offline / no token: fail before any work
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    task = hparams.pop("_class_path", "")
    if not task.startswith("taskhead."):
        raise TaskheadError(f"{ckpt_path}: not a taskhead checkpoint (its hyper-parameters name no taskhead module)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the pretrained load's "newly initialised head" report is moot: the checkpoint follows
    try:
        with checkpoint_source(ckpt):  # a full fine-tune: built from the checkpoint's config and tokenizer alone
            cls = import_object(task)
            module = cls(**cls.known_hparams(hparams))
            tokenizer = load_tokenizer(module.model_name_or_path)
    finally:
        hf_logging.set_verbosity(verbosity)
    module.complete_state_dict(ckpt)  # a LoRA checkpoint holds only the trained weights: the base comes from its source
    module.load_state_dict(ckpt["state_dict"])
    out = module.export(out_dir, tokenizer, merge=merge)
    facts = run_facts(ckpt_path, ckpt)
    facts["adapter"] = json.loads((out / EXPORT_CONFIG).read_text()).get("adapter", False)
    del ckpt  # optimizer states can be twice the model: free them before an upload
    model_name = push_to_hub.split("/")[1] if push_to_hub else out.resolve().name
    write_card(out, facts, model_name, location=str(out_dir), repo_id=push_to_hub)
    if push_to_hub:
        url = _upload(out, push_to_hub, private, token, f"taskhead export of {ckpt_path.name}")
        rank_zero_info(f"[export] pushed to {url}")
    return out


# ---- Hub push ----------------------------------------------------------------------------------------------------------


def hub_preflight(repo_id: str, private: bool = False) -> str:
    """What a push needs, checked before any work: a valid ``OWNER/NAME``, the Hub not switched off, a token, the Hub
    reachable with it, and (``private``) no existing public repo of that name. Returns the token."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    where = f"push to the Hub ({repo_id})"
    try:
        if repo_id.count("/") != 1:
            raise ValueError("expected OWNER/NAME")
        validate_repo_id(repo_id)
    except ValueError as e:
        raise TaskheadError(f"{where}: not a valid model repo id: {str(e).splitlines()[0]}") from None
    if hub_offline() or constants.HF_HUB_OFFLINE:
        raise TaskheadError(f"{where}: the Hub is switched off here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
                            "export without --push_to_hub, or unset it")
    token = get_token()
    if not token:
        raise TaskheadError(f"{where}: no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.whoami()
        info = api.repo_info(repo_id) if private else None
    except RepositoryNotFoundError:
        info = None  # created at upload time
    except Exception as e:  # noqa: BLE001 - any failure here (DNS, proxy, TLS, 401) means no push; say which, in one line
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise TaskheadError(f"{where}: the Hugging Face token was rejected (401): run `hf auth login` again") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if status is not None:
            raise TaskheadError(f"{where}: {constants.ENDPOINT} answered {status} ({first})") from None
        raise TaskheadError(f"{where}: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {first})") from None
    if info is not None and not info.private:
        raise TaskheadError(f"{where}: --private was asked, but the repo exists and is public: nothing was uploaded")
    return token


def _upload(out_dir: Path, repo_id: str, private: bool, token: str, message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message=message)
    return str(url)


def push_to_hub(out_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export directory to the Hub model repo ``OWNER/NAME`` (created if missing); returns its URL."""
    out_dir = Path(out_dir)
    if not (out_dir / EXPORT_CONFIG).is_file():
        raise TaskheadError(f"{out_dir}: not a taskhead export ({EXPORT_CONFIG} is missing)")
    token = hub_preflight(repo_id, private)
    return _upload(out_dir, repo_id, private, token, "taskhead export")


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
