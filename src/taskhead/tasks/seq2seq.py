"""Sequence-to-sequence generation: summarization (XSum) and translation (WMT16 en→ro), one task for three generators.

In order: preprocessing (Seq2SeqDataModule: fields, prefix, -100 labels, causal prompt masking, parallel text files),
post-processing (generated ids → text), the metric (ROUGE with rouge-score; corpus sacreBLEU + chrF; only strings
are kept until the end of the split), and the LightningModule (loss, one GenerationConfig, predict on raw text).
The generator wirings (seq2seq / encoder_decoder / causal) live in ``seq2seq_models.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from taskhead.core.data import SPLITS, TaskDataModule
from taskhead.core.export import batched_inference
from taskhead.core.losses import IGNORE_INDEX, LossConfig, build_loss
from taskhead.core.module import TaskModule, as_config
from taskhead.core.optim import OptimizerConfig, SchedulerConfig
from taskhead.core.peft import PeftConfig, unwrap
from taskhead.core.readers import open_text, get_text, read_records
from taskhead.errors import TaskheadError
from taskhead.tasks.seq2seq_models import (
    Architecture,
    GenerationOptions,
    build_generator,
    ensure_pad,
    eos_ids,
    generation_config,
    hit_limit,
    load_generator_tokenizer,
    resolve_generator_path,
    strip_generated,
    token_lengths,
)

# ---- preprocessing --------------------------------------------------------------------------------------------------

SLICE_RE = re.compile(r"^(?P<path>.+?)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def parse_file_spec(spec: str) -> tuple[str, slice]:
    """``path`` or ``path[start:stop]`` (a Python slice of the file's records) → (path, slice)."""
    m = SLICE_RE.match(spec)
    if not m:
        return spec, slice(None)
    to_int = lambda s: int(s) if s else None  # noqa: E731
    return m["path"], slice(to_int(m["start"]), to_int(m["stop"]))


def read_parallel(source: str | Path, target: str | Path, source_lang: str, target_lang: str) -> Iterator[tuple[str, dict]]:
    """Aligned text files, one segment a line → ``{"translation": {source_lang: ..., target_lang: ...}}`` (WMT shape).

    Without the target file (predict) only the source side is yielded. Different line counts are an error.
    """
    src_lines = open_text(Path(source)).read().split("\n")
    src_lines = src_lines[:-1] if src_lines and src_lines[-1] == "" else src_lines
    tgt_lines = None
    if Path(target).is_file():
        tgt_lines = open_text(Path(target)).read().split("\n")
        tgt_lines = tgt_lines[:-1] if tgt_lines and tgt_lines[-1] == "" else tgt_lines
        if len(tgt_lines) != len(src_lines):
            raise TaskheadError(
                f"parallel files differ in length: {source} has {len(src_lines):,} lines, {target} has {len(tgt_lines):,}; "
                "line i of one must translate line i of the other"
            )
    for i, line in enumerate(src_lines):
        pair = {source_lang: line.rstrip("\r")}
        if tgt_lines is not None:
            pair[target_lang] = tgt_lines[i].rstrip("\r")
        yield f"{source}:{i + 1}", {"translation": pair}


def encode_sources(tokenizer, sources: list[str], prefix: str, architecture: str, separator: str, max_length: int) -> list[list[int]]:
    """prefix + source, truncated to ``max_length``; for a decoder-only LM the separator follows (never cut off)."""
    texts = [prefix + s for s in sources]
    if architecture != "causal":
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"]
    ids = tokenizer(texts, truncation=True, max_length=max_length - len(sep))["input_ids"]
    return [x + sep for x in ids]


def causal_example(prompt: list[int], target: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """prompt + target + EOS, and labels that are -100 over the prompt: the loss sees only the target (and EOS)."""
    target = list(target) + [eos_id]
    return list(prompt) + target, [IGNORE_INDEX] * len(prompt) + target


def pad_to(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [[value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class Seq2SeqDataModule(TaskDataModule):
    def __init__(
        self,
        source_field: str = "document",
        target_field: str = "summary",
        source_prefix: str = "",
        architecture: Architecture = "seq2seq",
        separator: str = "\n",
        max_target_length: int = 128,
        source_lang: str | None = None,
        target_lang: str | None = None,
        extra_train_files: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Plus every option of ``TaskDataModule``; ``max_length`` is the source length. Any ``*_file`` may end in a
        record slice, ``path[700:800]``.

        Args:
            source_field: Field holding the input text; dots reach into objects (``translation.en``).
            target_field: Field holding the reference output (``summary``, ``translation.ro``).
            source_prefix: Text put before every source (T5: ``"summarize: "``); must equal ``model.source_prefix``.
            architecture: Generator kind; must equal ``model.architecture`` (``causal`` builds prompt+target rows).
            separator: Decoder-only models: text between source and target; must equal ``model.separator``.
            max_target_length: Truncate targets to this many tokens (counted and reported; metrics use full references).
            source_lang: Parallel text files: a file ending ``.<source_lang>`` is paired with ``.<target_lang>``.
            target_lang: See ``source_lang``. Records look like WMT's: ``{"translation": {"en": .., "ro": ..}}``.
            extra_train_files: More training files, appended to ``train_file`` (slices allowed).
        """
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self._slices: dict[str, slice] = {}
        self._specs: dict[str, str] = {}  # split key → the file spec as given (path[start:stop]), for messages

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.hparams.model_name_or_path:
                raise TaskheadError("data.model_name_or_path is not set (the CLI links it from model.model_name_or_path)")
            self._tokenizer = load_generator_tokenizer(self.hparams.model_name_or_path)
        return self._tokenizer

    def data_files(self) -> dict[str, str]:
        """Split → file; extra training files are ``train+1``, ``train+2``, ... until ``check_splits`` merges them."""
        files = {}
        for split in SPLITS:
            specs = [self.hparams[f"{split}_file"]] if self.hparams[f"{split}_file"] else []
            if split == "train":
                specs += list(self.hparams.extra_train_files or [])
            for n, spec in enumerate(specs):
                key = split if n == 0 else f"{split}+{n}"
                files[key], self._slices[key] = parse_file_spec(spec)
                self._specs[key] = spec
                target = self._parallel_target(files[key])
                if split != "predict" and target is not None and not target.is_file():
                    raise TaskheadError(f"{target}: file not found (the target side of {files[key]} for the {split} split)")
        return files

    def _parallel_target(self, path: str) -> Path | None:
        """``x.<source_lang>`` → ``x.<target_lang>``; None for files that are not the source side of parallel text."""
        lang, other = self.hparams.source_lang, self.hparams.target_lang
        return Path(path).with_suffix(f".{other}") if lang and other and Path(path).suffix == f".{lang}" else None

    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        lang, other = self.hparams.source_lang, self.hparams.target_lang
        if lang and Path(path).suffix == f".{lang}":
            if not other:
                raise TaskheadError(f"{path}: a parallel source file needs --data.target_lang")
            return read_parallel(path, self._parallel_target(path), lang, other)
        return read_records(path)

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        out = {"source": get_text(rec, self.hparams.source_field, where), "where": where}
        if split != "predict":
            out["target"] = get_text(rec, self.hparams.target_field, where)
        return out

    def check_splits(self, raw: dict[str, list[dict]]) -> None:
        """Apply record slices, then append ``train+N`` to ``train``."""
        for key in list(raw):
            n = len(raw[key])
            raw[key] = raw[key][self._slices.get(key, slice(None))]
            if not raw[key]:
                raise TaskheadError(f"{self._specs.get(key, key)}: the slice selects no records (the file has {n:,})")
        for key in sorted(k for k in raw if "+" in k):
            raw.setdefault(key.split("+")[0], []).extend(raw.pop(key))

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok, hp = self.tokenizer, self.hparams
        prompts = encode_sources(tok, batch["source"], hp.source_prefix, hp.architecture, hp.separator, hp.max_length)
        full = tok([hp.source_prefix + s for s in batch["source"]], return_attention_mask=False, verbose=False)["input_ids"]
        enc: dict[str, list] = {"full_length": [len(x) for x in full]}
        if "target" not in batch:  # predict: sources only
            enc["input_ids"], enc["length"] = prompts, [len(x) for x in prompts]
            return enc
        causal = hp.architecture == "causal"
        targets = tok(text_target=batch["target"], add_special_tokens=not causal, verbose=False)["input_ids"]
        if hp.architecture == "encoder_decoder" and tok.cls_token_id is not None:
            # the decoder starts from CLS itself: a leading CLS in the labels would teach it to repeat CLS
            targets = [t[1:] if t[:1] == [tok.cls_token_id] else t for t in targets]
        enc["target_full_length"] = [len(t) + causal for t in targets]
        enc["target_unk"] = [sum(i == tok.unk_token_id for i in t) if tok.unk_token_id is not None else 0 for t in targets]
        keep = hp.max_target_length - causal  # room for the EOS a causal example appends
        cut = [t[:keep] if len(t) <= keep or causal else t[: keep - 1] + t[-1:] for t in targets]  # keep the final EOS/SEP
        if causal:
            rows = [causal_example(p, t, tok.eos_token_id) for p, t in zip(prompts, cut)]
            enc["input_ids"], enc["labels"] = [r[0] for r in rows], [r[1] for r in rows]
            enc["prompt_length"] = [len(p) for p in prompts]
        else:
            enc["input_ids"], enc["labels"] = prompts, cut
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    def collate(self, features: list[dict]) -> dict:
        hp, pad = self.hparams, self.tokenizer.pad_token_id
        ids = [f["input_ids"] for f in features]
        input_ids = pad_to(ids, pad)  # (batch, seq), right-padded
        mask = pad_to([[1] * len(x) for x in ids], 0)
        batch = {
            "inputs": {"input_ids": input_ids, "attention_mask": mask},
            "idx": torch.tensor([f["idx"] for f in features]),
            "format": (hp.architecture, hp.source_prefix, hp.separator),
            "stats": {"samples": len(features), "tokens": int(mask.sum()), "padded": mask.numel()},
        }
        if "labels" in features[0]:
            batch["labels"] = pad_to([f["labels"] for f in features], IGNORE_INDEX)  # (batch, tgt_seq); never the pad id
            batch["targets"] = [f["target"] for f in features]
        if hp.architecture == "causal":  # generation continues the prompt: left-padded prompts only
            prompts = [f["input_ids"][: f.get("prompt_length", len(f["input_ids"]))] for f in features]
            batch["gen_inputs"] = {"input_ids": pad_to(prompts, pad, left=True),
                                   "attention_mask": pad_to([[1] * len(p) for p in prompts], 0, left=True)}
        else:
            batch["gen_inputs"] = batch["inputs"]
        return batch

    def report_extra(self, split: str, ds) -> list[str]:
        if "target_full_length" not in ds.column_names:
            return []
        full = np.asarray(ds["target_full_length"])
        limit = self.hparams.max_target_length
        over = int((full > limit).sum())
        unk = int(np.sum(ds["target_unk"])) / max(int(full.sum()), 1)
        p50, p90 = np.percentile(full, [50, 90]).astype(int)
        lines = [f"targets: tokens p50 {p50} / p90 {p90} / max {full.max()}; {over:,} ({over / len(full):.1%}) longer than "
                 f"max_target_length {limit} (cut for the loss; metrics compare against the full reference)",
                 f"targets: {unk:.2%} of target tokens are the tokenizer's unknown token"]
        if over:
            rank_zero_warn(f"[data] {split}: {over:,} of {len(full):,} targets exceed max_target_length {limit} and were truncated")
        if unk > 0.01:
            rank_zero_warn(f"[data] {split}: {unk:.1%} of target tokens are unknown to tokenizer "
                           f"'{self.tokenizer.name_or_path}': it cannot write the target language; choose another model")
        return lines


# ---- post-processing: generate() output → text (``strip_generated``, ``hit_limit``, ``token_lengths`` in
# seq2seq_models.py) happens in ``Seq2SeqModule.generate`` below.


# ---- metric ---------------------------------------------------------------------------------------------------------

# Sentence ends: . ! ? (plus closing quotes/brackets) followed by space and an upper-case letter, digit or quote.
# rougeLsum needs sentences; nltk's punkt model cannot be downloaded here and this is what punkt does on news text.
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text.strip()) if s.strip()]


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F1 × 100 of rouge1/2/L/Lsum (rouge-score, Porter stemmer; rougeLsum on newline-joined sentences)."""
    from rouge_score import rouge_scorer

    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        for k in keys:
            totals[k] += s[k].fmeasure
    return {k: 100 * v / max(len(predictions), 1) for k, v in totals.items()}


def bleu_scores(predictions: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus sacreBLEU and chrF over the whole split (one reference each) with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(predictions, [references]), chrf.corpus_score(predictions, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


class GeneratedTexts:
    """The split's (index, prediction, reference, generated tokens, hit the limit) rows: strings, never logits.

    ``compute`` gathers the rows of every rank, orders them by example index and scores the whole split at once.
    """

    def __init__(self, metric: Literal["rouge", "bleu"]) -> None:
        self.metric = metric
        self.rows: list[tuple] = []

    def update(self, idx: list[int], predictions: list[str], references: list[str], lengths: list[int], hit: list[bool]) -> None:
        self.rows += list(zip(idx, predictions, references, lengths, hit, strict=True))

    def gather(self) -> list[tuple]:
        rows = self.rows
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        return sorted(rows)

    def compute(self) -> tuple[dict[str, float | str], list[tuple]]:
        rows = self.gather()
        self.rows = []
        if not rows:
            return {}, rows
        preds, refs = [r[1] for r in rows], [r[2] for r in rows]
        scores = rouge_scores(preds, refs) if self.metric == "rouge" else bleu_scores(preds, refs)
        scores["gen_len"] = float(np.mean([r[3] for r in rows]))
        scores["hit_max_new_tokens"] = float(np.mean([r[4] for r in rows]))
        return scores, rows


# ---- model ----------------------------------------------------------------------------------------------------------


class Seq2SeqModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        architecture: Architecture = "seq2seq",
        source_prefix: str = "",
        separator: str = "\n",
        generation: GenerationOptions | None = None,
        metric: Literal["rouge", "bleu"] = "rouge",
        val_generate_samples: int | None = None,
        tie_encoder_decoder: bool = False,
        loss: LossConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        max_length: int = 512,
        label_names: list[str] | None = None,
        label_counts: list[int] | None = None,
        peft: PeftConfig | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: Hub id, directory, ``pkg:PACKAGE/dir``, or a ``.gguf`` file (decoder-only; converted once).
            architecture: ``seq2seq`` (AutoModelForSeq2SeqLM), ``encoder_decoder`` (BERT2BERT warm start from an
                encoder checkpoint) or ``causal`` (decoder-only LM: prompt + source + separator → target).
            source_prefix: Text before every source (must equal ``data.source_prefix``; used by raw-text predict).
            separator: Decoder-only: text between source and target (must equal ``data.separator``).
            generation: Decoding options; one GenerationConfig for validation, test, predict and the export.
            metric: ``rouge`` (summarization) or ``bleu`` (corpus sacreBLEU + chrF, translation).
            val_generate_samples: Generate on validation examples with index < this (None = all); loss uses all.
            tie_encoder_decoder: ``encoder_decoder`` only: share encoder and decoder weights (BERTShare).
            loss: Token cross-entropy (``label_smoothing`` allowed); class weights do not apply.
            optimizer: AdamW options; the backbone is the encoder (seq2seq) or the transformer body (causal), and
                ``head_lr`` applies to the decoder / LM head.
            scheduler: Per-step LR schedule with warmup.
            peft: LoRA (``configs/peft/lora.yaml``); null trains every weight. The task layers always train in full.
            gradient_checkpointing: Recompute activations in backward (non-reentrant): less memory, more compute.
            max_length: Source truncation for raw-text predict (linked from ``data.max_length``).
            label_names: Unused (the CLI links it for every task).
            label_counts: Unused (the CLI links it for every task).
        """
        super().__init__(model_name_or_path, optimizer, scheduler, peft, gradient_checkpointing)
        self.architecture, self.source_prefix, self.separator = architecture, source_prefix, separator
        self.gen_options = as_config(GenerationOptions, generation) or GenerationOptions()
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        if self.loss_cfg.name != "ce" or self.loss_cfg.class_weights is not None:
            raise TaskheadError("seq2seq loss: token cross-entropy only (loss.name: ce, class_weights: null)")
        self.metric, self.val_generate_samples, self.max_length = metric, val_generate_samples, max_length
        self.save_task_hparams(architecture=architecture, source_prefix=source_prefix, separator=separator,
                               generation=self.gen_options, metric=metric, val_generate_samples=val_generate_samples,
                               tie_encoder_decoder=tie_encoder_decoder, loss=self.loss_cfg, max_length=max_length)
        self.model_name_or_path = resolve_generator_path(model_name_or_path)  # a .gguf → its converted directory
        self.tokenizer = load_generator_tokenizer(self.model_name_or_path)
        self.model = build_generator(architecture, self.model_name_or_path, self.tokenizer, tie_encoder_decoder)
        self.adapt_model()  # model.peft (LoRA), model.gradient_checkpointing
        self.gen_config = generation_config(self.gen_options, self.model, self.tokenizer, architecture)
        self.loss_fn, _ = build_loss(self.loss_cfg, None, 0)
        self.texts = {"val": GeneratedTexts(metric), "test": GeneratedTexts(metric)}
        self.test_artifacts: dict = {}

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

    def _loss(self, batch: dict) -> torch.Tensor:
        if batch["format"] != (self.architecture, self.source_prefix, self.separator):
            raise TaskheadError(f"data (architecture, source_prefix, separator) = {batch['format']} differ from the model's "
                                f"{(self.architecture, self.source_prefix, self.separator)}: set both to the same values")
        logits, targets = self(batch["inputs"], batch["labels"])
        return self.loss_fn(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), None)

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self._loss(batch)

    # ---- generation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor]) -> tuple[list[str], list[int], list[bool]]:
        """Padded inputs (left-padded prompts for a decoder-only LM) → (texts, generated token counts, hit-limit flags)."""
        out = self.model.generate(**inputs, generation_config=self.gen_config)
        new = strip_generated(out, inputs["input_ids"].shape[1], self.architecture)
        eos = eos_ids(self.gen_config)
        # WordPiece decodes "uk ' s" / "end ." unless cleaned; byte-level BPE decodes exactly and must not be touched
        wordpiece = type(getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)).__name__ == "WordPiece"
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=wordpiece)]
        return texts, token_lengths(new, eos, self.gen_config.pad_token_id), hit_limit(new, eos, self.gen_config.max_new_tokens)

    def _eval_step(self, batch: dict, stage: str) -> None:
        self.log_eval_loss(stage, self._loss(batch), batch["stats"]["samples"])
        keep = list(range(len(batch["idx"])))
        if stage == "val" and self.val_generate_samples is not None:
            keep = [i for i in keep if int(batch["idx"][i]) < self.val_generate_samples]
        if not keep:
            return
        inputs = {k: v[keep] for k, v in batch["gen_inputs"].items()}
        texts, lengths, hit = self.generate(inputs)
        self.texts[stage].update([int(batch["idx"][i]) for i in keep], texts, [batch["targets"][i] for i in keep], lengths, hit)

    def _eval_epoch_end(self, stage: str) -> tuple[dict, list[tuple]]:
        scores, rows = self.texts[stage].compute()
        if not rows:
            if stage == "val" and self.val_generate_samples is not None:  # e.g. trainer.limit_val_batches cut them off
                rank_zero_warn(f"[generate] val: no example with index < val_generate_samples={self.val_generate_samples} "
                               "was seen: no val generation metrics this epoch")
            return scores, rows
        if scores["hit_max_new_tokens"] > 0:
            rank_zero_warn(f"[generate] {stage}: {scores['hit_max_new_tokens']:.1%} of {len(rows):,} outputs hit "
                           f"max_new_tokens={self.gen_config.max_new_tokens} (cut off); raise model.generation.max_new_tokens")
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items() if isinstance(v, float)})
        for k, v in scores.items():
            if isinstance(v, str):
                rank_zero_info(f"[{stage}] sacreBLEU {k}: {v}")
        return scores, rows

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        scores, rows = self._eval_epoch_end("test")
        self.test_artifacts = {
            "test_scores.json": {**scores, "examples": len(rows), "generation": self.gen_config.to_diff_dict()},
            "test_generations.json": [
                {"index": i, "prediction": p, "reference": r, "generated_tokens": n, "hit_max_new_tokens": h}
                for i, p, r, n, h in rows
            ],
        }

    # ---- predict ------------------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        texts, _, _ = self.generate(batch["gen_inputs"])
        return [{"idx": int(i), "generated_text": t} for i, t in zip(batch["idx"], texts)]

    def predict_raw(self, tokenizer, texts: str | list[str], batch_size: int = 16) -> str | list[str]:
        """Raw source text(s) → generated text(s), in input order (a single string for a single string)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ensure_pad(tokenizer)
        ids = encode_sources(tokenizer, texts, self.source_prefix, self.architecture, self.separator, self.max_length)
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
