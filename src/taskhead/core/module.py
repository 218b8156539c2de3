"""TaskModule: the training-loop plumbing every task shares.

A task subclass builds ``self.model`` (a Hugging Face model; its ``base_model`` is the backbone) and any head
modules beside it, then implements ``forward``, ``training_loss`` and its own evaluation steps. This class owns:
the optimiser and per-step schedule, freezing the backbone for the first steps, loss/LR logging, the checkpoint
format, and export to a Hugging Face directory.

Under ``model.peft`` (core/peft.py) ``self.model`` is a ``PeftModel``: only the adapters and the task layers train,
the optimiser sees only them, and checkpoints hold only them (plus a fingerprint of the frozen base weights, which
are re-read from ``model_name_or_path`` on load).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from taskhead.core.callbacks import model_checkpoint
from taskhead.core.heads import HeadConfig, build_head, resolve_pooling
from taskhead.core.losses import LossConfig, build_loss
from taskhead.core.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler, param_groups
from taskhead.core.peft import (PeftConfig, apply_peft, base_fingerprint, enable_gradient_checkpointing, head_module_names,
                                is_peft, quantization_kwargs, trainable_summary, unwrap)
from taskhead.core.pretrained import is_decoder_only, load_model, load_tokenizer, set_pad_token_id
from taskhead.errors import TaskheadError

EXPORT_CONFIG = "taskhead.json"
HEAD_WEIGHTS = "head.safetensors"


def as_config(cls, value):
    """Accept a dataclass instance or a plain dict (hyper-parameters saved in checkpoints are plain dicts)."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**value)


def label_maps(names: list[str]) -> dict:
    """``num_labels`` / ``id2label`` / ``label2id`` for ``from_pretrained``: the export then names its labels."""
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {k: i for i, k in enumerate(names)}}


def plain(value):
    """Dataclasses → dicts, recursively, so checkpoints and exports hold only plain Python values."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class TaskModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        peft: PeftConfig | None = None,
        gradient_checkpointing: bool = False,
        max_length: int = 512,
    ) -> None:
        """
        Args:
            model_name_or_path: The pretrained backbone: Hub id, local directory or ``pkg:PACKAGE/dir``.
            optimizer: AdamW, learning rates (head vs backbone), layer-wise decay, freezing the backbone for N steps.
            scheduler: Per-step LR schedule with warmup.
            max_length: Truncation length for raw-text prediction (linked from ``data.max_length``).
            peft: Parameter-efficient fine-tuning (``{method: lora, r, alpha, dropout, target_modules, bias}``);
                null trains every weight. The task layers always train in full (configs/peft/lora.yaml).
            gradient_checkpointing: Recompute the backbone's activations in backward (non-reentrant): less memory,
                about a third more compute.
        """
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.optim_cfg = as_config(OptimizerConfig, optimizer) or OptimizerConfig()
        self.sched_cfg = as_config(SchedulerConfig, scheduler) or SchedulerConfig()
        self.peft_cfg = as_config(PeftConfig, peft)
        self.gradient_checkpointing = gradient_checkpointing
        self.max_length = max_length
        self.pooling: str | None = None  # a custom head's pooling, "auto" resolved for the backbone (build_model)
        self._frozen_base: list[torch.nn.Parameter] | None = None  # weights peft froze (not in checkpoints)
        self._tuned_backbone: list[torch.nn.Parameter] | None = None  # what freeze_backbone_steps toggles
        self._frozen: bool | None = None
        self.skipped_batches = 0  # batches whose loss was NaN/inf (model.optimizer.on_nonfinite_loss: skip)
        self._rng_to_restore: dict | None = None  # set when resuming from a checkpoint
        self._source_files: dict[str, bytes] | None = None  # config + tokenizer files, for checkpoints (source_files)
        # Evaluation loss as a weighted mean over the whole split, synced across ranks once at epoch end: exact under
        # DDP (a per-step mean of per-rank means is not, when ranks see different batch sizes).
        self.eval_loss = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    @classmethod
    def known_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """``hparams`` without the arguments this task no longer takes, so a checkpoint or export of an older taskhead
        still loads (every task once received ``label_names`` and ``label_counts``, and multiple choice kept them)."""
        known = {*inspect.signature(cls.__init__).parameters, *inspect.signature(TaskModule.__init__).parameters}
        return {k: v for k, v in hparams.items() if k in known}

    def save_task_hparams(self, **task_args: Any) -> None:
        """Record every init argument as plain values: checkpoints load with ``weights_only=True`` and export reuses them."""
        self.save_hyperparameters(
            {
                # LightningCLI rebuilds the model from a checkpoint's hparams (test/predict --ckpt_path); export too
                "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "model_name_or_path": self.model_name_or_path,
                "optimizer": plain(self.optim_cfg),
                "scheduler": plain(self.sched_cfg),
                "peft": plain(self.peft_cfg),
                "gradient_checkpointing": self.gradient_checkpointing,
                "max_length": self.max_length,
                **{k: plain(v) for k, v in task_args.items()},
            }
        )

    # ---- building blocks for subclasses ----------------------------------------------------------------------------
    def build_model(self, auto_class, head_cfg: HeadConfig | None, out_features: int, **model_kwargs: Any) -> None:
        """Set ``self.model`` and ``self.head``. ``head_cfg`` None: ``auto_class`` (``AutoModelFor...``) with the
        backbone family's own head, which exports to ``transformers.pipeline``. Otherwise the bare backbone
        (``AutoModel``) and ``build_head(head_cfg, hidden_size, out_features)`` beside it (``self.pooling``: its
        pooling, ``auto`` resolved). Then the pad token id, ``model.peft`` and gradient checkpointing (``adapt_model``)."""
        from transformers import AutoConfig, AutoModel

        from taskhead.core.pretrained import load_pretrained

        config = load_pretrained(AutoConfig, self.model_name_or_path)
        quantized = quantization_kwargs(self.peft_cfg)
        if head_cfg is None:
            try:
                self.model = load_model(auto_class, self.model_name_or_path, **model_kwargs, **quantized)
            except TaskheadError as e:
                if is_decoder_only(config) and "Unrecognized configuration class" in str(e):
                    raise TaskheadError(f"{e}; a decoder-only backbone has no {auto_class.__name__}: set model.head, "
                                        "e.g. {pooling: last}") from None
                raise
            self.head = None
        else:
            self.model = load_model(AutoModel, self.model_name_or_path, **quantized)
            self.head = build_head(head_cfg, self.model.config.hidden_size, out_features)
            self.pooling = resolve_pooling(head_cfg.pooling, config)
        set_pad_token_id(self.model, load_tokenizer(self.model_name_or_path))
        self.adapt_model()

    def adapt_model(self) -> None:
        """Apply ``model.peft`` (LoRA) and ``model.gradient_checkpointing`` to ``self.model`` (``fit`` logs the
        trainable share). Tasks that build ``self.model`` themselves (seq2seq) call this right after."""
        if self.peft_cfg is not None:
            hf = self.model
            before = list(hf.parameters())  # every weight, before adapters exist
            heads = {id(p) for name in head_module_names(hf) for p in getattr(hf, name).parameters()}
            self.model = apply_peft(hf, self.peft_cfg, self.gradient_checkpointing)
            # frozen now: the pretrained weights, and the heads' originals (peft trains a copy in modules_to_save)
            self._frozen_base = [p for p in before if not p.requires_grad]
            self._tuned_backbone = [p for p in self.backbone.parameters() if p.requires_grad]  # the adapters
            # identity of the pretrained weights only: a new head's original is random on every load
            self._base_fingerprint = base_fingerprint([p for p in self._frozen_base if id(p) not in heads])
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)

    def set_loss(self, cfg: LossConfig, label_counts: list[int] | None, num_classes: int) -> None:
        """``self.loss_fn(logits, target, self.class_weight)``; the weights are a buffer, so they follow the device."""
        self.loss_fn, weight = build_loss(cfg, label_counts, num_classes)
        self.register_buffer("class_weight", weight, persistent=False)

    # ---- what subclasses provide --------------------------------------------------------------------------------------
    model: torch.nn.Module  # the Hugging Face model; ``self.model.base_model`` is the backbone

    def training_loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    # ---- training -----------------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> torch.nn.Module:
        return unwrap(self.model).base_model

    def tuned_backbone(self) -> list[torch.nn.Parameter]:
        """Backbone parameters that train: all of them, or only the adapters under ``model.peft``."""
        return self._tuned_backbone if self._tuned_backbone is not None else list(self.backbone.parameters())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            self._restore_rng()
        frozen = self.global_step < self.optim_cfg.freeze_backbone_steps
        if frozen != self._frozen:  # act only when the phase changes
            if not self.freeze_by_dropping_grads():
                for p in self.tuned_backbone():
                    p.requires_grad_(not frozen)
            self._frozen = frozen
            if self.global_step > 0 or frozen:
                self.print(f"[optim] step {self.global_step}: backbone {'frozen' if frozen else 'unfrozen'}")

    def freeze_by_dropping_grads(self) -> bool:
        """How ``freeze_backbone_steps`` freezes. DDP/FSDP hook the parameters that require gradients when they wrap
        the model: flipping ``requires_grad`` later breaks their reduction. So with several processes the backbone's
        gradients are dropped before each frozen step instead: AdamW skips a weight without one (no update, moments,
        decay or step count), the same update. One process flips ``requires_grad`` (saves the backbone's backward)."""
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after backward (and the DDP all-reduce) and before clipping: a dropped gradient counts
        # in neither the clipping norm nor the step, as under requires_grad=False
        if self._frozen and self.freeze_by_dropping_grads():
            for p in self.tuned_backbone():
                p.grad = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self.training_loss(batch)
        if self.optim_cfg.on_nonfinite_loss != "ignore" and not self._all_finite(loss):
            return self._nonfinite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["stats"]["samples"])
        return loss

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """One host sync; under DDP every rank learns whether any rank's loss is bad, so all skip or stop together."""
        finite = torch.isfinite(loss.detach())
        if self.trainer.world_size > 1:
            finite = self.all_gather(finite).all()
        return bool(finite)

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.optim_cfg.on_nonfinite_loss == "stop":
            raise TaskheadError(
                f"{where}: the training loss is {loss.item()}; lower model.optimizer.lr, check the inputs, or set "
                "model.optimizer.on_nonfinite_loss: skip to skip such batches"
            )
        self.skipped_batches += 1
        self.print(f"[optim] {where}: loss {loss.item()}, batch skipped ({self.skipped_batches} so far)")
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return None  # Lightning skips backward and the optimiser step for this batch

    # ---- checkpoint extras: exact mid-epoch resume ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """RNG states (dropout draws continue as if uninterrupted), the skipped-batch count, and the validation
        metrics current when it was saved (a best checkpoint is saved right after its validation: these are its own
        scores, kept even in weights-only checkpoints). Plain tensors, floats, ints and tuples only: the checkpoint
        still loads with ``weights_only=True``."""
        trainer = self._trainer
        metrics = trainer.callback_metrics if trainer is not None else {}
        ckpt_cb = model_checkpoint(trainer)
        checkpoint["taskhead"] = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            "skipped_batches": self.skipped_batches,
            "val_metrics": {k: float(v) for k, v in metrics.items() if k.startswith("val/") and v.numel() == 1},
            "monitor": getattr(ckpt_cb, "monitor", None),
            "monitor_mode": getattr(ckpt_cb, "mode", None),
        }
        if self._frozen_base is None and (files := self.source_files()):  # a full fine-tune rebuilds from these alone
            checkpoint["taskhead"]["source"] = {"model_name_or_path": self.model_name_or_path, "files": files}
        if self._frozen_base is not None:  # LoRA: the frozen base weights are re-read from model_name_or_path on load
            frozen = {id(p) for p in self._frozen_base}
            for name, p in self.named_parameters(remove_duplicate=False):
                if id(p) in frozen:
                    checkpoint["state_dict"].pop(name, None)
            checkpoint["taskhead"]["base_model"] = {"model_name_or_path": self.model_name_or_path,
                                                    "fingerprint": self._base_fingerprint}

    def source_files(self) -> dict[str, bytes] | None:
        """What rebuilding this module needs besides its weights, as bytes (read at the first checkpoint): the model's
        ``config.json`` (and ``generation_config.json``) and the tokenizer's files. None for a model with its own code
        (``auto_map``): its classes are not in transformers, so it is rebuilt from its source."""
        model = unwrap(self.model)
        if self._source_files is None and not getattr(model.config, "auto_map", None):
            files = {"config.json": model.config.to_json_string().encode()}
            if getattr(model, "generation_config", None) is not None:
                files["generation_config.json"] = model.generation_config.to_json_string().encode()
            with tempfile.TemporaryDirectory() as d:
                load_tokenizer(self.model_name_or_path).save_pretrained(d)
                files.update({f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file() and f.name not in files})
            self._source_files = files
        return self._source_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.complete_state_dict(checkpoint)
        state = checkpoint.get("taskhead")
        if state:
            self.skipped_batches = state["skipped_batches"]
            # Applied at the first training batch, not now: creating the loaders' iterators draws from the global RNG
            # (DataLoader's base seed), and the uninterrupted run made those draws before this checkpoint was saved.
            self._rng_to_restore = state

    def complete_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA checkpoint holds only trained weights: fill in the frozen base weights this module loaded, after
        checking that they are the ones it was trained on. A full checkpoint is left as it is."""
        base = (checkpoint.get("taskhead") or {}).get("base_model")
        if base is None:
            return
        if self._frozen_base is None:
            raise TaskheadError(f"this checkpoint holds LoRA adapters of '{base['model_name_or_path']}' but model.peft "
                                "is null: load it with the run's config (its model.peft)")
        if base["fingerprint"] != self._base_fingerprint:
            raise TaskheadError(f"this LoRA checkpoint was trained on other base weights ('{base['model_name_or_path']}', "
                                f"fingerprint {base['fingerprint']}) than '{self.model_name_or_path}' has now "
                                f"({self._base_fingerprint}): use the same base model")
        state = checkpoint["state_dict"]
        frozen = {id(p) for p in self._frozen_base}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in frozen and name not in state:
                state[name] = p.detach()

    def _restore_rng(self) -> None:
        state, self._rng_to_restore = self._rng_to_restore, None
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])

    # ---- evaluation: the Lightning hooks live here; a task implements eval_step and eval_epoch_end ----------------
    def eval_step(self, batch: dict, stage: str) -> None:
        """One validation (``stage`` "val") or test ("test") batch: update the task's metrics and ``log_eval_loss``."""
        raise NotImplementedError

    def eval_epoch_end(self, stage: str) -> None:
        """Compute, log and reset the task's metrics for ``stage``; after "test", set ``self.test_artifacts``
        (file name → JSON-able object, written beside metrics.json by ``RunArtifacts``)."""
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self.eval_epoch_end("test")

    def gather(self, items: list) -> list:
        """Every rank's Python list, concatenated in rank order, on every rank (the list itself on one process).
        A collective: every rank must call it at the same point."""
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world <= 1 or not torch.distributed.is_initialized():
            return list(items)
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def log_eval_loss(self, stage: str, loss: torch.Tensor, weight: int | float) -> None:
        """Accumulate ``loss`` for ``stage/loss``: a mean over the whole split weighted by ``weight`` (the samples
        for a per-sample mean, the counted tokens for a per-token mean: exact either way), synced once at epoch end."""
        metric = self.eval_loss[stage]
        metric.update(loss.detach().float(), weight=weight)
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        strategy = getattr(self.trainer, "strategy", None)
        flat = type(strategy).__name__ == "FSDPStrategy" and not strategy.kwargs.get("use_orig_params", True)
        if self._frozen_base is not None and flat:
            raise TaskheadError("model.peft under FSDP needs trainer.strategy.init_args.use_orig_params: true (the default): "
                                "a flat FSDP unit cannot mix frozen base weights and trainable adapters (litgpt #1392)")
        if self.optim_cfg.freeze_backbone_steps and (flat or type(strategy).__name__ == "DeepSpeedStrategy"):
            raise TaskheadError("model.optimizer.freeze_backbone_steps needs each weight's own gradient (it drops the "
                                "backbone's), which DeepSpeed and FSDP with use_orig_params: false do not expose")
        num_layers = getattr(self.model.config, "num_hidden_layers", None) or 0
        # Every trained parameter starts trainable here, so the groups are fixed for the run even if the backbone
        # starts frozen. Under LoRA the frozen base stays out of the optimiser (no state, no decay, no update).
        for p in self.tuned_backbone():
            p.requires_grad_(True)
        rank_zero_info(f"[model] {trainable_summary(self)[2]}" + (" (LoRA)" if is_peft(self.model) else ""))
        groups = param_groups(self, self.backbone, num_layers, self.optim_cfg)
        optimizer = build_optimizer(groups, self.optim_cfg, fused=self._unscaled_precision())
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.sched_cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, also for the fused AdamW under bf16 autocast: Lightning's mixed-precision plugin
        refuses to clip for any optimizer that can unscale gradients itself, but without a loss scaler (bf16, fp32)
        there is nothing to unscale and clipping the gradients directly is exact."""
        if gradient_clip_val and self._unscaled_precision():
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _unscaled_precision(self) -> bool:
        """fp32 or bf16 autocast on a plain (unsharded) strategy: gradients need no unscaling, so the fused AdamW and
        clipping it directly are safe. fp16 (loss scaler) and the FSDP/DeepSpeed plugins keep Lightning's own path."""
        plugin = self.trainer.precision_plugin
        return type(plugin) in (Precision, MixedPrecision) and getattr(plugin, "scaler", None) is None

    # ---- export -------------------------------------------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights outside ``self.model`` (a custom head); empty when the backbone's own head is used."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("model.")}

    def export(self, out_dir: str | Path, tokenizer, merge: bool = True) -> Path:
        """Write a Hugging Face directory: model + tokenizer (+ ``head.safetensors``) + ``taskhead.json``.

        Under ``model.peft``: ``merge`` folds the adapters into the weights (in place: this module then holds the
        merged model) and writes a plain model; ``merge=False`` writes only the adapter (``adapter_config.json`` +
        ``adapter_model.safetensors``, the head included) to load on top of the base (``source`` in taskhead.json)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hparams = {k: v for k, v in self.hparams.items() if k not in ("model_name_or_path", "_class_path")}
        adapter = is_peft(self.model) and not merge
        if is_peft(self.model) and merge:
            if self.peft_cfg.quantization != "none":
                raise TaskheadError("export: a QLoRA model's base is 4-bit; export it with --merge false (an adapter "
                                    "directory) and merge onto a full-precision base")
            self.model = self.model.merge_and_unload()
            self._frozen_base = self._tuned_backbone = None
            hparams["peft"] = None  # a plain model now: taskhead.load must not add fresh adapters
        hparams["gradient_checkpointing"] = False  # a training setting; the export is for prediction
        self.model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        head = self.head_state_dict()
        if head:
            save_file(head, out / HEAD_WEIGHTS)
        spec = {"task": self.hparams["_class_path"], "hparams": hparams, "source": self.model_name_or_path,
                "adapter": adapter}
        (out / EXPORT_CONFIG).write_text(json.dumps(spec, indent=2, default=str))
        return out
