"""Token classification: named-entity recognition (CoNLL-2003 and any corpus of word-level BIO tags).

In order: preprocessing (NerDataModule) and the LightningModule. The pure functions they use (CoNLL reader, tag
schemes, sub-token alignment, argmax / Viterbi decoding, entities with offsets, the metric) are in ``ner_tags.py``.

Inside the model every tag sequence is IOB2 (``O``, ``B-TYPE``, ``I-TYPE``): IOB1 and BIOES files are converted on load.
The model sees sub-tokens, the metric sees words: each word is scored by its first sub-token, and a word that has no
sub-token (cut by ``max_length``) is predicted ``O``, so its gold entity counts as missed rather than vanishing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch
from transformers import AutoModelForTokenClassification

from taskhead.core.arrow import arrow_column, column_to_ids, numpy_column
from taskhead.core.data import TaskDataModule
from taskhead.core.export import batched_inference
from taskhead.core.heads import HeadConfig
from taskhead.core.losses import IGNORE_INDEX, LossConfig
from taskhead.core.module import TaskModule, as_config, label_maps
from taskhead.core.readers import get_field, get_text
from taskhead.errors import TaskheadError
from taskhead.tasks.ner_tags import (
    SCHEME_PREFIXES,
    align_labels,
    check_scheme,
    complete_label_names,
    conll_columns,
    decode,
    inside_map,
    iob2_label_names,
    join_words,
    ner_metrics,
    is_iob2,
    name_tag_ids,
    pad_labels,
    read_ner_file,
    split_words,
    to_entities,
    to_iob2,
    tokenize_words,
    word_scores,
    word_starts,
)

# ---- preprocessing --------------------------------------------------------------------------------------------------


class NerDataModule(TaskDataModule):
    encoded_columns = ("word_ids", "words_cut", "words_empty")

    def __init__(
        self,
        tag_scheme: Literal["iob1", "iob2", "bioes"] = "iob2",
        tag_column: int = -1,
        tokens_field: str = "tokens",
        tags_field: str = "ner_tags",
        label_names: list[str] | None = None,
        label_all_tokens: bool = False,
        **kwargs,
    ) -> None:
        """Plus every option of ``TaskDataModule`` (files, batch size, max_length, ...).

        Args:
            tag_scheme: Scheme of the tags in the data; converted to IOB2 on load (the local CoNLL-2003 files are IOB1).
            tag_column: Column holding the tag in CoNLL column files (0-based; negative counts from the end). Column 0
                is the word. Files whose extension is ``.json``/``.jsonl`` use ``tokens_field``/``tags_field``; ``.txt``
                files hold one raw text per line (prediction only).
            tokens_field: Field with the list of words (Hub datasets, JSON/JSONL).
            tags_field: Field with the list of tags: names, or ids into the Hub's ClassLabel names / ``label_names``.
            label_names: The IOB2 label set in id order. Default: the Hub's ClassLabel names, else ``O`` + ``B-``/``I-``
                of every entity type in the training split (types sorted).
            label_all_tokens: Training only: label every sub-token of a word (``B-X`` becomes ``I-X`` after the first)
                instead of the first alone. Evaluation always scores the first sub-token of each word.
        """
        super().__init__(**kwargs)
        if tag_scheme not in SCHEME_PREFIXES:
            raise TaskheadError(f"--data.tag_scheme must be one of {', '.join(SCHEME_PREFIXES)}, got {tag_scheme!r}")
        self.tag_scheme, self.tag_column = tag_scheme, tag_column
        self.tokens_field, self.tags_field = tokens_field, tags_field
        self.given_label_names = list(label_names) if label_names else None
        self.converted: Counter = Counter()  # split → tags rewritten by the IOB2 conversion
        self.save_hyperparameters(ignore=["label_names"])

    # -- reading ----------------------------------------------------------------------------------------------------
    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        return read_ner_file(path)

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        """Validate one sentence → ``{"tokens", "tags" (IOB2 names), "where"}`` (+ text and word offsets to predict)."""
        lines = rec.get("lines")
        at = (lambda i: f"{where.rsplit(':', 1)[0]}:{lines[i]}") if lines else (lambda i: f"{where}, word {i + 1}")
        if "rows" in rec:  # CoNLL columns
            tokens, tags = conll_columns(rec, None if split == "predict" else self.tag_column, at)
        elif "text" in rec and self.tokens_field not in rec:  # raw text (prediction input)
            if split != "predict":
                raise TaskheadError(f"{where}: raw text has no tags; the {split} split needs a CoNLL file or '{self.tokens_field}'/'{self.tags_field}' fields")
            text = get_text(rec, "text", where)
            tokens, offsets = split_words(text)
            return {"tokens": tokens, "text": text, "offsets": offsets, "where": where}
        else:  # Hub row or JSON object
            tokens = get_field(rec, self.tokens_field, where)
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                raise TaskheadError(f"{where}: field '{self.tokens_field}' must be a non-empty list of non-empty strings")
            tags = get_field(rec, self.tags_field, where) if split != "predict" else None
            if tags is not None:
                if not isinstance(tags, list) or len(tags) != len(tokens):
                    got = len(tags) if isinstance(tags, list) else type(tags).__name__
                    raise TaskheadError(f"{where}: field '{self.tags_field}' must be a list of {len(tokens)} tags "
                                        f"(one per word), got {got}")
                tags = name_tag_ids(tags, self.given_label_names, f"{where}: field '{self.tags_field}'")
        if split == "predict":
            text, offsets = join_words(tokens)
            return {"tokens": tokens, "text": text, "offsets": offsets, "where": where}
        check_scheme(tags, self.tag_scheme, at)
        iob2 = to_iob2(tags)
        converted = sum(a != b for a, b in zip(tags, iob2))
        self.converted[split] += converted
        # the file's own tags, kept (until check_stream) only to name them in an error
        return {"tokens": tokens, "tags": iob2, "where": where, "lines": lines, "file_tags": tags if converted else None}

    # -- label set: fixed before a split is read (given, Hub ClassLabel, the checkpoint's) or by train's types -------------
    def _known_names(self) -> tuple[list[str] | None, str]:
        """The IOB2 label set before a split is read, and what to call it in an error."""
        hub = getattr(self, "hub_class_names", {}).get(self.tags_field)
        hub = hub if hub and is_iob2(hub) else None
        if self.given_label_names or hub:
            return complete_label_names(self.given_label_names or hub), "label_names"
        names = getattr(self, "_label_names", None)
        return names, ("the checkpoint's label_names" if self.model_facts.get("label_names") else "the training types")

    def check_stream(self, split: str, records):
        """Map every tag to its id as it streams past, naming the word of a tag outside the label set. The split that
        fixes the set (train, or the first tagged split read) keeps tag names until ``finish_split``."""
        names, known = self._known_names()
        index = {n: i for i, n in enumerate(names)} if names else None
        for r in records:
            lines, file_tags = r.pop("lines", None), r.pop("file_tags", None)
            if "tags" in r and index is not None:
                for i, tag in enumerate(r["tags"]):
                    if tag not in index:
                        at = f"{r['where'].rsplit(':', 1)[0]}:{lines[i]}" if lines else f"{r['where']}, word {i + 1}"
                        was = file_tags[i] if file_tags else tag
                        read_as = f" (the file's {was!r}, read as {self.tag_scheme.upper()})" if was != tag else ""
                        raise TaskheadError(f"{at}: tag {tag!r} is not in {known} {names}{read_as}")
                r["tags"] = [index[t] for t in r["tags"]]
            yield r

    def finish_split(self, split: str, ds):
        """Fix the label set from the first tagged split read (``O`` + ``B-``/``I-`` of its types, sorted) and turn its
        tag names into ids column-wise; count training tags."""
        if "tags" not in ds.column_names:
            return ds
        names, _ = self._known_names()
        if names is None:
            names = iob2_label_names({t[2:] for t in pc.unique(pc.list_flatten(arrow_column(ds, "tags"))).to_pylist() if t != "O"})
            ds = column_to_ids(ds, "tags", names)
        self._label_names = names
        if split == "train":
            self._label_counts = np.bincount(pc.list_flatten(arrow_column(ds, "tags")).to_numpy(), minlength=len(names)).tolist()
        return ds

    def facts(self) -> dict:
        return {"label_names": self._known_names()[0], "label_counts": getattr(self, "_label_counts", None),
                "converted": dict(self.converted)}

    def restore_facts(self, facts: dict) -> None:
        self._label_names, self._label_counts = facts["label_names"], facts.get("label_counts")
        self.converted.update(facts.get("converted", {}))

    def model_args(self) -> dict:
        return {"label_names": self.label_names, "label_counts": self.label_counts}

    @property
    def label_names(self) -> list[str]:
        """IOB2 label names in id order (passed to the model by ``model_args``)."""
        names = self.data_facts["label_names"]
        if names is None:
            raise TaskheadError("no tagged split to take the label set from: give a train/validation/test file "
                                "or --data.label_names (the model's id order, e.g. from the checkpoint's hparams.yaml)")
        return names

    @property
    def label_counts(self) -> list[int] | None:
        """Training words per label id (passed to the model by ``model_args``, for ``class_weights: balanced``)."""
        return self.data_facts["label_counts"]

    # -- tokenisation and batches -----------------------------------------------------------------------------------
    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        enc, word_ids = tokenize_words(tok, batch["tokens"], self.hparams.max_length)
        full = tok(batch["tokens"], is_split_into_words=True, truncation=False, return_attention_mask=False, verbose=False)
        enc["word_ids"] = word_ids
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        enc["full_length"] = [len(ids) for ids in full["input_ids"]]
        # words without a first sub-token: cut by max_length (after the last kept word) or tokenised to nothing
        enc["words_cut"] = [len(t) - (max(w) + 1) for t, w in zip(batch["tokens"], word_ids)]
        enc["words_empty"] = [max(w) + 1 - len({x for x in w if x >= 0}) for w in word_ids]
        return enc

    def collate(self, features: list[dict], label_all_tokens: bool = False) -> dict:
        batch = self.pad_inputs(features)
        T = batch["inputs"]["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        batch["word_starts"] = word_starts([f["word_ids"] for f in features], [len(f["tokens"]) for f in features], T, left)
        batch["n_words"] = torch.tensor([len(f["tokens"]) for f in features])
        batch["idx"] = torch.tensor([f["idx"] for f in features])
        batch["tokens"] = [f["tokens"] for f in features]
        if "tags" in features[0]:
            inside = inside_map(self.label_names) if label_all_tokens else None
            labels = [align_labels(f["word_ids"], f["tags"], label_all_tokens, inside) for f in features]
            batch["labels"] = pad_labels(labels, T, left)  # (batch, seq)
            batch["tags"] = [f["tags"] for f in features]
        if "text" in features[0]:
            batch["text"] = [f["text"] for f in features]
            batch["offsets"] = [f["offsets"] for f in features]
        return batch

    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.collate_fn = partial(self.collate, label_all_tokens=self.hparams.label_all_tokens)
        return loader

    def report_extra(self, split: str, ds) -> list[str]:
        lines = []
        if "tags" in ds.column_names:
            lines.append(f"tags read as {self.tag_scheme.upper()}, converted to IOB2 on load: "
                         f"{self.converted[split]:,} tags rewritten (I-X starting an entity → B-X, S/E → B/I)")
            ids = np.bincount(pc.list_flatten(arrow_column(ds, "tags")).to_numpy(), minlength=len(self.label_names))
            entities = {n[2:]: int(c) for n, c in zip(self.label_names, ids) if n[:2] == "B-" and c}
            lines.append("entities: " + " / ".join(f"{k} {v:,}" for k, v in sorted(entities.items())))
        cut, empty = numpy_column(ds, "words_cut"), numpy_column(ds, "words_empty")
        lines.append(f"words past max_length {self.hparams.max_length}: {int(cut.sum()):,} in {int((cut > 0).sum()):,} "
                     f"sentences (kept, predicted O: their entities count as missed); words with no sub-token: {int(empty.sum()):,}")
        return lines


# ---- model ----------------------------------------------------------------------------------------------------------

DECODINGS = ("argmax", "viterbi")


class NerModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        label_names: list[str] | None = None,
        label_counts: list[int] | None = None,
        head: HeadConfig | None = None,
        loss: LossConfig | None = None,
        decoding: Literal["argmax", "viterbi"] = "argmax",
        num_errors: int = 50,
        **kwargs,
    ) -> None:
        """The task's own options; the shared ones (optimizer, scheduler, peft, gradient_checkpointing,
        max_length) are ``TaskModule``'s.

        Args:
            model_name_or_path: The pretrained backbone: Hub id, local directory, ``pkg:PACKAGE/dir``.
            label_names: IOB2 label names in id order (the CLI sets it from the data).
            label_counts: Training words per label (the CLI sets it from the data; for ``class_weights: balanced``).
            head: A custom per-token head (``pooling`` is unused); ``null`` keeps the backbone's token-classification
                head (``AutoModelForTokenClassification``: pipeline-compatible export).
            loss: Loss function and its options (on first sub-tokens; -100 is ignored).
            decoding: Word tags by per-word argmax, or by Viterbi under IOB2 constraints (no ``I-X`` after ``O`` or
                after another type). Metrics without a prefix use this one; ``<stage>/argmax/*`` and
                ``<stage>/viterbi/*`` report both.
            num_errors: How many test sentences with a wrong tag ``test`` writes to ``test_errors.json``.
        """
        super().__init__(model_name_or_path, **kwargs)
        if not label_names:
            raise TaskheadError("model.label_names is empty: give tagged data or --data.label_names (the CLI passes it to the model)")
        if decoding not in DECODINGS:
            raise TaskheadError(f"model.decoding must be one of {DECODINGS}, got {decoding!r}")
        self.label_names = list(label_names)
        if "O" not in self.label_names:
            raise TaskheadError(f"model.label_names must include 'O': {self.label_names}")
        self.o_id = self.label_names.index("O")
        self.head_cfg = as_config(HeadConfig, head)
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        self.decoding, self.num_errors = decoding, num_errors
        self.save_task_hparams(label_names=self.label_names, label_counts=label_counts, head=self.head_cfg, loss=self.loss_cfg,
                               decoding=decoding, num_errors=num_errors)
        n = len(self.label_names)
        # head: null → the backbone's own token head (dropout + linear); else our head on every token
        self.build_model(AutoModelForTokenClassification, self.head_cfg, n, **label_maps(self.label_names))
        self.set_loss(self.loss_cfg, label_counts, n)
        self.records: list[tuple] = []  # per evaluated sentence: (idx, gold ids, {decoding: ids}, tokens)
        self.test_artifacts: dict = {}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # RNG states and skipped batches: an exact mid-epoch resume
        # Tag ids index label_names: a data label order other than the trained one would score garbage, silently.
        saved = checkpoint.get("hyper_parameters", {}).get("label_names")
        if saved and list(saved) != self.label_names:
            raise TaskheadError(f"the checkpoint was trained with label_names {list(saved)}, but the data gives "
                                f"{self.label_names}: set --data.label_names to the checkpoint's order")

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            return self.model(**inputs).logits  # (batch, seq, num_labels)
        return self.head(self.model(**inputs).last_hidden_state)  # (batch, seq, num_labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits.flatten(0, 1), labels.flatten(), self.class_weight)  # (batch * seq, C), (batch * seq,)

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self._loss(self(batch["inputs"]), batch["labels"])

    # -- evaluation: accumulate word-level tags, score at epoch end ---------------------------------------------------
    def eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["inputs"])
        labels = batch["labels"]
        # the loss is a mean over counted sub-tokens (weighted by class weight, as the losses normalise): weigh the
        # batch by that denominator, so val/loss is the mean over every counted token of the split
        counted = labels != IGNORE_INDEX
        weight = self.class_weight[labels[counted]].sum() if self.class_weight is not None else counted.sum()
        self.log_eval_loss(stage, self._loss(logits, labels), weight)
        scores = word_scores(logits, batch["word_starts"], self.o_id)
        preds = {how: decode(scores, batch["n_words"], how, self.label_names)[0] for how in DECODINGS}
        keep_tokens = stage == "test"
        for i, idx in enumerate(batch["idx"].tolist()):
            self.records.append((idx, batch["tags"][i], {h: p[i] for h, p in preds.items()}, batch["tokens"][i] if keep_tokens else None))

    def eval_epoch_end(self, stage: str) -> None:
        records, self.records = self.gather(self.records), []  # each rank saw different sentences (none twice)
        records.sort(key=lambda r: r[0])
        names = self.label_names
        gold = [[names[t] for t in r[1]] for r in records]
        results = {how: ner_metrics(gold, [[names[t] for t in r[2][how]] for r in records]) for how in DECODINGS}
        flat = {f"{stage}/{k}": v for k, v in results[self.decoding].items()}
        for how in DECODINGS:
            flat.update({f"{stage}/{how}/{k}": results[how][k] for k in ("precision", "recall", "f1")})
        self.log_dict(flat)
        if stage == "test":
            errors = [
                {"index": idx, "tokens": toks, "gold": [names[t] for t in g], "pred": [names[t] for t in p[self.decoding]]}
                for idx, g, p, toks in records if g != p[self.decoding]
            ]
            self.test_artifacts = {
                "ner_report.json": {"decoding": self.decoding, "sentences": len(records), **results},
                "test_errors.json": errors[: self.num_errors],
            }

    # -- prediction --------------------------------------------------------------------------------------------------
    def _entities(self, logits, word_starts, n_words, texts, offsets) -> list[dict]:
        scores = word_scores(logits, word_starts, self.o_id)
        ids, probs = decode(scores, n_words, self.decoding, self.label_names)
        tags = [[self.label_names[i] for i in row] for row in ids]
        return [{"tags": t, "entities": to_entities(text, o, t, p)} for text, o, t, p in zip(texts, offsets, tags, probs)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        res = self._entities(self(batch["inputs"]), batch["word_starts"], batch["n_words"], batch["text"], batch["offsets"])
        return [{"idx": int(i), "tokens": toks, **r} for i, toks, r in zip(batch["idx"], batch["tokens"], res)]

    def predict_raw(self, tokenizer, texts: str | list[str], batch_size: int = 32) -> list[dict] | list[list[dict]]:
        """Raw text(s) → entities ``[{"type", "text", "start", "end", "score"}]`` per text, with character offsets into
        it (a single list for a single string). Words are split off by ``WORD_RE``."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        split = [split_words(t) for t in texts]
        enc, word_ids = tokenize_words(tokenizer, [words or [""] for words, _ in split], self.max_length)
        encodings = [{k: v[i] for k, v in enc.items()} for i in range(len(texts))]
        left = tokenizer.padding_side == "left"

        def run(inputs, idx):
            n = [len(split[i][0]) for i in idx]
            starts = word_starts([word_ids[i] for i in idx], n, inputs["input_ids"].shape[1], left).to(self.device)
            n_words = torch.tensor(n, device=self.device)
            res = self._entities(self(inputs), starts, n_words, [texts[i] for i in idx], [split[i][1] for i in idx])
            return [r["entities"] for r in res]

        out = batched_inference(encodings, tokenizer, batch_size, run, self.device)
        return out[0] if single else out
