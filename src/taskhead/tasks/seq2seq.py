"""Sequence-to-sequence generation: summarization (XSum) and translation (WMT16 en→ro), one task for three generators.

Preprocessing (``Seq2SeqDataModule``: fields, prefix, -100 labels, causal prompt masking and chat template, parallel
text files) lives in ``seq2seq_data.py`` and the generator wirings (seq2seq / encoder_decoder / causal) in
``seq2seq_models.py``. Here, in order: post-processing (generated ids → text), the metric (ROUGE / BLEU and the
degenerate-output guards of ``core/metrics.py``; only strings are kept until the end of the split), and the
LightningModule (loss, one GenerationConfig for validation/test/predict/export, predict on raw text).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from taskhead.core.export import batched_inference
from taskhead.core.gguf import resolve_gguf
from taskhead.core.losses import IGNORE_INDEX, LossConfig, build_loss
from taskhead.core.metrics import bleu_scores, degenerate_warnings, guard_scores, rouge_scores
from taskhead.core.module import TaskModule, as_config
from taskhead.core.peft import unwrap
from taskhead.errors import TaskheadError
from taskhead.tasks.seq2seq_data import Seq2SeqDataModule, encode_sources  # noqa: F401  (YAML class_path: tasks.seq2seq)
from taskhead.tasks.seq2seq_models import (
    Architecture,
    GenerationOptions,
    build_generator,
    ensure_pad,
    eos_ids,
    generation_config,
    hit_limit,
    load_generator_tokenizer,
    strip_generated,
    token_lengths,
)

# ---- post-processing: generate() output → text (``strip_generated``, ``hit_limit``, ``token_lengths`` in
# seq2seq_models.py) happens in ``Seq2SeqModule.generate`` below.

# Strategies that shard the weights: every forward all-gathers them, a collective every rank must join.
SHARDED_STRATEGIES = {"FSDPStrategy", "ModelParallelStrategy"}


def synced_gpus(strategy, world_size: int) -> bool:
    """``generate(synced_gpus=...)`` under a Lightning strategy: True when it shards the weights (FSDP, FSDP2, or
    DeepSpeed ZeRO stage 3; a subclass counts) over more than one rank. Each decoding step is then a forward of
    collectives: a rank whose sequences have all ended must keep stepping until every rank's have, or the others
    hang. Transformers finds this itself only for its own DeepSpeed config or an FSDP-wrapped model, not for
    Lightning's wrapping (the LightningModule, or its layers)."""
    sharded = {c.__name__ for c in type(strategy).__mro__} & SHARDED_STRATEGIES or getattr(strategy, "zero_stage_3", False)
    return world_size > 1 and bool(sharded)


# ---- metric: ROUGE / BLEU and the degenerate-output guards (core/metrics.py) over the whole split -----------------


class GeneratedTexts:
    """The split's (index, prediction, reference, generated tokens, hit the limit) rows: strings, never logits.

    ``compute`` gathers the rows of every rank, orders them by example index and scores the whole split at once.
    """

    def __init__(self, metric: Literal["rouge", "bleu"]) -> None:
        self.metric = metric
        self.rows: list[tuple] = []

    def update(self, idx: list[int], predictions: list[str], references: list[str], lengths: list[int], hit: list[bool]) -> None:
        self.rows += list(zip(idx, predictions, references, lengths, hit, strict=True))

    def compute(self, gather=list) -> tuple[dict[str, float | str], list[tuple]]:
        """``gather``: ``TaskModule.gather`` (every rank's rows); the rows come back ordered by example index."""
        rows, self.rows = sorted(gather(self.rows)), []
        if not rows:
            return {}, rows
        preds, refs = [r[1] for r in rows], [r[2] for r in rows]
        scores = rouge_scores(preds, refs) if self.metric == "rouge" else bleu_scores(preds, refs)
        scores["gen_len"] = float(np.mean([r[3] for r in rows]))
        scores.update(guard_scores(preds, [r[4] for r in rows]))  # distinct_outputs, repeated_4grams, hit_max_new_tokens
        return scores, rows


# ---- model ----------------------------------------------------------------------------------------------------------


class Seq2SeqModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        architecture: Architecture = "seq2seq",
        source_prefix: str = "",
        separator: str = "\n",
        chat_template: bool = False,
        generation: GenerationOptions | None = None,
        metric: Literal["rouge", "bleu"] = "rouge",
        val_generate_samples: int | None = None,
        tie_encoder_decoder: bool = False,
        loss: LossConfig | None = None,
        **kwargs,
    ) -> None:
        """The task's own options; the shared ones (optimizer, scheduler, peft, gradient_checkpointing,
        max_length) are ``TaskModule``'s.

        Args:
            model_name_or_path: The pretrained backbone: Hub id, local directory, ``pkg:PACKAGE/dir`` or a
                decoder-only ``.gguf`` file (converted once).
            architecture: ``seq2seq`` (AutoModelForSeq2SeqLM), ``encoder_decoder`` (BERT2BERT warm start from an
                encoder checkpoint) or ``causal`` (decoder-only LM: prompt + source + separator → target).
            source_prefix: Text before every source (must equal ``data.source_prefix``; used by raw-text predict).
            separator: Decoder-only: text between source and target (must equal ``data.separator``); with
                ``chat_template``, text after the assistant header (a prefill, usually empty).
            chat_template: Decoder-only: prefix + source is the user turn of the tokenizer's chat template and the
                target the assistant's answer (must equal ``data.chat_template``).
            generation: Decoding options; one GenerationConfig for validation, test, predict and the export.
            metric: ``rouge`` (summarization) or ``bleu`` (corpus sacreBLEU + chrF, translation).
            val_generate_samples: Generate on validation examples with index < this (None = all); loss uses all.
            tie_encoder_decoder: ``encoder_decoder`` only: share encoder and decoder weights (BERTShare).
            loss: Token cross-entropy (``label_smoothing`` allowed); class weights do not apply.
        """
        super().__init__(model_name_or_path, **kwargs)
        if chat_template and architecture != "causal":
            raise TaskheadError("model.chat_template: true needs architecture: causal (a decoder-only chat model)")
        self.architecture, self.source_prefix, self.separator = architecture, source_prefix, separator
        self.chat_template = chat_template
        self.gen_options = as_config(GenerationOptions, generation) or GenerationOptions()
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        if self.loss_cfg.name != "ce" or self.loss_cfg.class_weights is not None:
            raise TaskheadError("seq2seq loss: token cross-entropy only (loss.name: ce, class_weights: null)")
        self.metric, self.val_generate_samples = metric, val_generate_samples
        self.save_task_hparams(architecture=architecture, source_prefix=source_prefix, separator=separator, chat_template=chat_template,
                               generation=self.gen_options, metric=metric, val_generate_samples=val_generate_samples,
                               tie_encoder_decoder=tie_encoder_decoder, loss=self.loss_cfg)
        self.model_name_or_path = resolve_gguf(self.model_name_or_path)  # a .gguf → its converted directory
        self.tokenizer = load_generator_tokenizer(self.model_name_or_path)
        self.model = build_generator(architecture, self.model_name_or_path, self.tokenizer, tie_encoder_decoder)
        self.adapt_model()  # model.peft (LoRA), model.gradient_checkpointing
        self.gen_config = generation_config(self.gen_options, self.model, self.tokenizer, architecture)
        self.loss_fn, _ = build_loss(self.loss_cfg, None, 0)
        self.texts = {"val": GeneratedTexts(metric), "test": GeneratedTexts(metric)}
        self.test_artifacts: dict = {}
        self.weights = "pretrained"  # → "checkpoint" when one is loaded, "trained" once fit starts: said in test_scores.json

    @property
    def backbone(self) -> torch.nn.Module:
        """Encoder of an encoder-decoder (``base_model`` is the whole model there), transformer body of a causal LM."""
        model = unwrap(self.model)  # the Hugging Face model, also under LoRA
        return model.get_encoder() if self.architecture != "causal" else model.base_model

    # ---- loss -------------------------------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (logits (batch, T, vocab), targets (batch, T)), aligned: logits[:, t] predicts targets[:, t]."""
        if self.architecture == "causal":
            logits = self.model(**inputs).logits  # (batch, seq, vocab)
            return logits[:, :-1], labels[:, 1:]
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)  # shift right, -100 → pad
        return self.model(**inputs, decoder_input_ids=decoder_input_ids).logits, labels

    def _logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (logits (batch * T, vocab), targets (batch * T,)), -100 where no token is predicted."""
        fmt = (self.architecture, self.source_prefix, self.separator, self.chat_template)
        if batch["format"] != fmt:
            raise TaskheadError(f"data (architecture, source_prefix, separator, chat_template) = {batch['format']} differ "
                                f"from the model's {fmt}: set both to the same values")
        logits, targets = self(batch["inputs"], batch["labels"])
        return logits.flatten(0, 1), targets.flatten()

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(*self._logits(batch), None)  # with model.loss.label_smoothing

    # ---- generation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor]) -> tuple[list[str], list[int], list[bool]]:
        """Padded inputs (left-padded prompts for a decoder-only LM) → (texts, generated token counts, hit-limit flags)."""
        out = self.model.generate(**inputs, generation_config=self.gen_config, synced_gpus=self._synced_gpus())
        new = strip_generated(out, inputs["input_ids"].shape[1], self.architecture)
        eos = eos_ids(self.gen_config)
        # WordPiece decodes "uk ' s" / "end ." unless cleaned; byte-level BPE decodes exactly and must not be touched
        wordpiece = type(getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)).__name__ == "WordPiece"
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=wordpiece)]
        return texts, token_lengths(new, eos, self.gen_config.pad_token_id), hit_limit(new, eos, self.gen_config.max_new_tokens)

    def _synced_gpus(self) -> bool:
        trainer = self._trainer  # None: predict_raw outside a Trainer
        return trainer is not None and synced_gpus(trainer.strategy, trainer.world_size)

    # ---- evaluation: loss on every token, generation on the (sampled) examples, scores at the end of the split --------
    def eval_step(self, batch: dict, stage: str) -> None:
        logits, targets = self._logits(batch)
        # plain token cross-entropy, without label smoothing (a smoothed loss is no log-likelihood and moves with the
        # smoothing), a mean over the split's target tokens: weigh each batch by its counted tokens
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
        self.log_eval_loss(stage, loss, (targets != IGNORE_INDEX).sum())
        keep = list(range(len(batch["idx"])))
        if stage == "val" and self.val_generate_samples is not None:
            keep = [i for i in keep if int(batch["idx"][i]) < self.val_generate_samples]
        wanted = bool(keep)
        if self._synced_gpus():  # every rank joins a generate call any rank makes: one row, unused, where it keeps none
            wanted = self.trainer.strategy.reduce_boolean_decision(wanted, all=False)
        if not wanted:
            return
        texts, lengths, hit = self.generate({k: v[keep or [0]] for k, v in batch["gen_inputs"].items()})
        if keep:
            self.texts[stage].update([int(batch["idx"][i]) for i in keep], texts, [batch["targets"][i] for i in keep], lengths, hit)

    def eval_epoch_end(self, stage: str) -> None:
        scores, rows = self.texts[stage].compute(self.gather)
        if stage == "test":
            self.test_artifacts = {
                "test_scores.json": {**scores, "examples": len(rows), "weights": self.weights,
                                     "generation": self.gen_config.to_diff_dict()},
                "test_generations.json": [
                    {"index": i, "prediction": p, "reference": r, "generated_tokens": n, "hit_max_new_tokens": h}
                    for i, p, r, n, h in rows
                ],
            }
        if not rows:
            if stage == "val" and self.val_generate_samples is not None:  # e.g. trainer.limit_val_batches cut them off
                rank_zero_warn(f"[generate] val: no example with index < val_generate_samples={self.val_generate_samples} "
                               "was seen: no val generation metrics this epoch")
            return
        rank_zero_info(f"[generate] {stage}: {len(rows):,} outputs, {scores['distinct_outputs']:.1%} distinct, "
                       f"{scores['repeated_4grams']:.1%} repeated 4-grams within outputs, {scores['hit_max_new_tokens']:.1%} "
                       f"hit max_new_tokens={self.gen_config.max_new_tokens} (weights: {self.weights})")
        for line in degenerate_warnings(scores, len(rows), self.gen_config.max_new_tokens, stage):
            rank_zero_warn(line)
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items() if isinstance(v, float)})
        for k, v in scores.items():
            if isinstance(v, str):
                rank_zero_info(f"[{stage}] sacreBLEU {k}: {v}")

    def on_fit_start(self) -> None:
        self.weights = "trained"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.weights = "checkpoint"

    def _say_zero_shot(self, stage: str) -> None:
        if self.weights == "pretrained":  # `taskhead test|validate` without --ckpt_path: a zero-shot baseline
            rank_zero_info(f"[{stage}] no --ckpt_path: scoring {self.hparams['model_name_or_path']} as configured, "
                           "without fine-tuning (zero-shot)")

    def on_test_start(self) -> None:
        self._say_zero_shot("test")

    def on_validation_start(self) -> None:
        self._say_zero_shot("val")  # during fit the weights are "trained" already (on_fit_start runs first)

    # ---- predict ------------------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        texts, _, _ = self.generate(batch["gen_inputs"])
        return [{"idx": int(i), "generated_text": t} for i, t in zip(batch["idx"], texts)]

    def predict_raw(self, tokenizer, texts: str | list[str], batch_size: int = 16) -> str | list[str]:
        """Raw source text(s) → generated text(s), in input order (a single string for a single string)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ensure_pad(tokenizer)
        ids, _ = encode_sources(tokenizer, texts, self.source_prefix, self.architecture, self.separator, self.max_length,
                                self.chat_template)
        side = tokenizer.padding_side
        tokenizer.padding_side = "left" if self.architecture == "causal" else "right"
        try:
            out = batched_inference([{"input_ids": x} for x in ids], tokenizer, batch_size,
                                    lambda inputs, _idx: self.generate(inputs)[0], self.device)
        finally:
            tokenizer.padding_side = side
        return out[0] if single else out

    # ---- export -------------------------------------------------------------------------------------------------------
    def export(self, out_dir, tokenizer, merge: bool = True):
        """The HF directory gets ``generation_config.json``: the decoding settings validation and test used."""
        unwrap(self.model).generation_config = self.gen_config
        return super().export(out_dir, ensure_pad(tokenizer), merge)
