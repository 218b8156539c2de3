"""Token classification: named-entity recognition (CoNLL-2003 and any corpus of word-level BIO tags).

In order: preprocessing (CoNLL column reader, tag schemes, sub-token alignment, NerDataModule), post-processing
(word scores, argmax / constrained Viterbi decoding, tags → entities with character offsets), the metric (seqeval
entity-level P/R/F1 on words, conlleval rules) and the LightningModule.

Inside the model every tag sequence is IOB2 (``O``, ``B-TYPE``, ``I-TYPE``): IOB1 and BIOES files are converted on load.
The model sees sub-tokens, the metric sees words: each word is scored by its first sub-token, and a word that has no
sub-token (cut by ``max_length``) is predicted ``O``, so its gold entity counts as missed rather than vanishing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache, partial
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForTokenClassification

from taskhead.core.data import TaskDataModule
from taskhead.core.export import batched_inference
from taskhead.core.heads import HeadConfig
from taskhead.core.losses import IGNORE_INDEX, LossConfig
from taskhead.core.module import TaskModule, as_config, label_maps
from taskhead.core.optim import OptimizerConfig, SchedulerConfig
from taskhead.core.peft import PeftConfig
from taskhead.core.readers import open_text, get_field, get_text, read_records
from taskhead.errors import TaskheadError

# ---- preprocessing --------------------------------------------------------------------------------------------------

SCHEME_PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIES"}
WORD_RE = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks, as BERT's pre-tokenizer splits them


def read_conll(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("path:line", {"rows", "lines", "width", "width_line"})`` per sentence of a CoNLL column file.

    Blank lines end sentences; ``-DOCSTART-`` lines end documents and are skipped. ``rows`` are the whitespace-split
    columns of each token line, ``lines`` their line numbers; ``width`` is the column count of the file's first token
    line (``width_line``), which every line must match (checked by the DataModule's ``parse_record``).
    """
    f = open_text(Path(path))
    rows: list[list[str]] = []
    lines: list[int] = []
    width = width_line = None
    for n, line in enumerate(f, start=1):
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            cols = []
        if not cols:
            if rows:
                yield f"{path}:{lines[0]}", {"rows": rows, "lines": lines, "width": width, "width_line": width_line}
                rows, lines = [], []
            continue
        if width is None:
            width, width_line = len(cols), n
        rows.append(cols)
        lines.append(n)
    if rows:
        yield f"{path}:{lines[0]}", {"rows": rows, "lines": lines, "width": width, "width_line": width_line}


def read_raw_text(path: str | Path) -> Iterator[tuple[str, dict]]:
    """One raw text per non-blank line (``.txt`` prediction input)."""
    for n, line in enumerate(open_text(Path(path)), start=1):
        if line.strip():
            yield f"{path}:{n}", {"text": line.rstrip("\r\n")}


def split_words(text: str) -> tuple[list[str], list[list[int]]]:
    """Raw text → words and their ``[start, end)`` character offsets."""
    spans = [m.span() for m in WORD_RE.finditer(text)]
    return [text[s:e] for s, e in spans], [[s, e] for s, e in spans]


def join_words(tokens: list[str]) -> tuple[str, list[list[int]]]:
    """Pre-split words → the text they make joined by spaces, and their offsets in it (prediction on CoNLL files)."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append([pos, pos + len(t)])
        pos += len(t) + 1
    return " ".join(tokens), offsets


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 / IOB2 / BIOES → IOB2. ``I-X`` (or ``E-X``) that does not continue an ``X`` entity becomes ``B-X``;
    ``S-X`` becomes ``B-X`` and ``E-X`` inside an entity becomes ``I-X``. Valid IOB2 comes back unchanged."""
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag == "O":
            new = "O"
        else:
            prefix, typ = tag[0], tag[2:]
            continues = prefix in "IE" and prev != "O" and prev[2:] == typ
            new = f"I-{typ}" if continues else f"B-{typ}"
        out.append(new)
        prev = new
    return out


def iob2_label_names(types: set[str]) -> list[str]:
    """``O`` then ``B-T, I-T`` for each entity type, types sorted: the same set whichever split it is read from."""
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in "BI"]


def inside_map(label_names: list[str]) -> list[int]:
    """id → id of its ``I-`` form (``B-X`` → ``I-X``; others unchanged): labels for continuation sub-tokens."""
    index = {n: i for i, n in enumerate(label_names)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(label_names)]


def align_labels(word_ids: list[int | None], word_tags: list[int], label_all_tokens: bool = False,
                 inside: list[int] | None = None) -> list[int]:
    """Word tags → one label per sub-token: the word's tag on its first sub-token, -100 on special tokens and on
    the other sub-tokens (or, with ``label_all_tokens``, the word's ``I-`` tag there)."""
    labels, prev = [], None
    for w in word_ids:
        if w is None or w < 0:
            labels.append(IGNORE_INDEX)
        elif w != prev:
            labels.append(word_tags[w])
        else:
            tag = word_tags[w]
            labels.append((inside[tag] if inside else tag) if label_all_tokens else IGNORE_INDEX)
        prev = w
    return labels


def first_subtokens(word_ids: list[int | None], n_words: int) -> list[int]:
    """Position of each word's first sub-token; -1 for words that have none (truncated, or nothing to tokenise)."""
    starts = [-1] * n_words
    for pos, w in enumerate(word_ids):
        if w is not None and w >= 0 and starts[w] < 0:
            starts[w] = pos
    return starts


class NerDataModule(TaskDataModule):
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
        self.hub_tag_names: list[str] | None = None
        self.converted: Counter = Counter()  # split → tags rewritten by the IOB2 conversion
        self.save_hyperparameters(ignore=["label_names"])

    # -- reading ----------------------------------------------------------------------------------------------------
    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        suffix = Path(path[:-3] if path.endswith(".gz") else path).suffix
        if suffix in (".json", ".jsonl"):
            return read_records(path)
        return read_raw_text(path) if suffix == ".txt" else read_conll(path)

    def _load_hub(self) -> dict[str, list[dict]]:
        """Like the base loader, but the tag column is a *sequence* of ClassLabel ids (eriktks/conll2003's
        ``ner_tags``), which the base converts only for top-level ClassLabel columns."""
        import datasets

        name, config = self.hparams.dataset_name, self.hparams.dataset_config
        try:
            try:
                dd = datasets.load_dataset(name, config)
            except RuntimeError as e:  # datasets >= 4 runs no loading scripts (eriktks/conll2003 has one) ...
                if "scripts are no longer supported" not in str(e):
                    raise
                # ... but the Hub keeps a Parquet export of such datasets
                dd = datasets.load_dataset(name, config, revision="refs/convert/parquet")
        except Exception as e:  # the Hub client raises many types; the user needs the first line only
            raise TaskheadError(f"could not load dataset '{name}' ({config}): {str(e).splitlines()[0]}") from None
        out = {}
        for split in ("train", "validation", "test"):
            if split not in dd:
                continue
            inner = getattr(dd[split].features.get(self.tags_field), "feature", None)
            names = inner.names if isinstance(inner, datasets.ClassLabel) else None
            self.hub_tag_names = names or self.hub_tag_names
            recs = []
            for i, rec in enumerate(dd[split]):
                if names and self.tags_field in rec:
                    rec[self.tags_field] = [names[t] for t in rec[self.tags_field]]
                recs.append(self.parse_record(rec, f"{name}[{split}] row {i}", split))
            out[split] = recs
        return out

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        """Validate one sentence → ``{"tokens", "tags" (IOB2 names), "where"}`` (+ text and word offsets to predict)."""
        lines = rec.get("lines")
        at = (lambda i: f"{where.rsplit(':', 1)[0]}:{lines[i]}") if lines else (lambda i: f"{where}, word {i + 1}")
        if "rows" in rec:  # CoNLL columns
            for i, cols in enumerate(rec["rows"]):
                if len(cols) != rec["width"]:
                    raise TaskheadError(f"{at(i)}: {len(cols)} columns, but the file's first line (line "
                                        f"{rec['width_line']}) has {rec['width']}; columns are separated by whitespace")
            tokens = [cols[0] for cols in rec["rows"]]
            tags = None
            if split != "predict":
                if not -rec["width"] <= self.tag_column < rec["width"] or rec["width"] < 2:
                    raise TaskheadError(f"{at(0)}: --data.tag_column {self.tag_column} does not exist in a line of "
                                        f"{rec['width']} columns (column 0 is the word)")
                tags = [cols[self.tag_column] for cols in rec["rows"]]
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
                if any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
                    names = self.given_label_names
                    if not names:
                        raise TaskheadError(f"{where}: integer tags need --data.label_names to name them (ids 0..n-1)")
                    bad = next((t for t in tags if not (isinstance(t, int) and 0 <= t < len(names))), None)
                    if bad is not None:
                        raise TaskheadError(f"{where}: field '{self.tags_field}': tag id {bad!r} is outside the {len(names)} "
                                            f"label_names {names}")
                    tags = [names[t] for t in tags]
        if split == "predict":
            text, offsets = join_words(tokens)
            return {"tokens": tokens, "text": text, "offsets": offsets, "where": where}
        prefixes = SCHEME_PREFIXES[self.tag_scheme]
        for i, tag in enumerate(tags):
            if not isinstance(tag, str) or not (tag == "O" or (len(tag) > 2 and tag[0] in prefixes and tag[1] == "-")):
                allowed = ", ".join(["O"] + [f"{p}-TYPE" for p in prefixes])
                raise TaskheadError(f"{at(i)}: tag {tag!r} is not in the {self.tag_scheme.upper()} scheme ({allowed}); "
                                    "set --data.tag_scheme or --data.tag_column")
        iob2 = to_iob2(tags)
        converted = sum(a != b for a, b in zip(tags, iob2))
        self.converted[split] += converted
        # the file's own tags, kept (until check_splits) only to name them in an error
        return {"tokens": tokens, "tags": iob2, "where": where, "lines": lines, "file_tags": tags if converted else None}

    # -- label set --------------------------------------------------------------------------------------------------
    def check_splits(self, raw: dict[str, list[dict]]) -> None:
        """Fix the IOB2 label set (given, Hub ClassLabel, or from the training types) and map tags to ids."""
        hub = self.hub_tag_names if self.hub_tag_names and all(n == "O" or n[:2] in ("B-", "I-") for n in self.hub_tag_names) else None
        if self.given_label_names or hub:
            names = list(self.given_label_names or hub)
            bad = [n for n in names if n != "O" and n[:2] not in ("B-", "I-")]
            if bad or "O" not in names:
                raise TaskheadError(f"label_names must be IOB2 (O, B-TYPE, I-TYPE) and include O; got {names}")
            # Complete the scheme: the IOB2 conversion can produce a B-X for a type whose B-X a corpus never used.
            names += [n for n in iob2_label_names({n[2:] for n in names if n != "O"}) if n not in names]
        else:
            source = raw.get("train") or next((r for r in raw.values() if r and "tags" in r[0]), None)
            if source is None:
                raise TaskheadError("no tagged split to take the label set from: give a train/validation/test file "
                                    "or --data.label_names (the model's id order, e.g. from the checkpoint's hparams.yaml)")
            names = iob2_label_names({t[2:] for r in source for t in r["tags"] if t != "O"})
        index = {n: i for i, n in enumerate(names)}
        for records in raw.values():
            for r in records:
                lines, file_tags = r.pop("lines", None), r.pop("file_tags", None)
                if "tags" not in r:
                    continue
                for i, tag in enumerate(r["tags"]):
                    if tag not in index:
                        at = f"{r['where'].rsplit(':', 1)[0]}:{lines[i]}" if lines else f"{r['where']}, word {i + 1}"
                        known = "label_names" if self.given_label_names or hub else "the training types"
                        was = file_tags[i] if file_tags else tag
                        read_as = f" (the file's {was!r}, read as {self.tag_scheme.upper()})" if was != tag else ""
                        raise TaskheadError(f"{at}: tag {tag!r} is not in {known} {names}{read_as}")
                r["tags"] = [index[t] for t in r["tags"]]
        self._label_names = names

    @property
    def label_names(self) -> list[str]:
        """IOB2 label names in id order (linked to ``model.label_names`` by the CLI)."""
        _ = self.raw  # parsing the splits fixes the label set
        return self._label_names

    @property
    def label_counts(self) -> list[int] | None:
        """Training words per label id (linked to ``model.label_counts``, for ``class_weights: balanced``)."""
        if "train" not in self.raw:
            return None
        counts = Counter(t for r in self.raw["train"] for t in r["tags"])
        return [counts.get(i, 0) for i in range(len(self.label_names))]

    # -- tokenisation and batches -----------------------------------------------------------------------------------
    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        if not tok.is_fast:
            raise TaskheadError(f"{tok.name_or_path}: NER needs a fast tokenizer (word_ids) to align labels with words")
        enc = tok(batch["tokens"], is_split_into_words=True, truncation=True, max_length=self.hparams.max_length)
        full = tok(batch["tokens"], is_split_into_words=True, truncation=False, return_attention_mask=False, verbose=False)
        word_ids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(batch["tokens"]))]
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
        shift = [T - len(f["word_ids"]) if left else 0 for f in features]
        starts = [[s + sh if s >= 0 else -1 for s in first_subtokens(f["word_ids"], len(f["tokens"]))]
                  for f, sh in zip(features, shift)]
        W = max(len(s) for s in starts)
        batch["word_starts"] = torch.tensor([s + [-1] * (W - len(s)) for s in starts])  # (batch, words)
        batch["n_words"] = torch.tensor([len(f["tokens"]) for f in features])
        batch["idx"] = torch.tensor([f["idx"] for f in features])
        batch["tokens"] = [f["tokens"] for f in features]
        if "tags" in features[0]:
            inside = inside_map(self.label_names) if label_all_tokens else None
            labels = [align_labels(f["word_ids"], f["tags"], label_all_tokens, inside) for f in features]
            pad = [[IGNORE_INDEX] * (T - len(x)) for x in labels]
            batch["labels"] = torch.tensor([p + x if left else x + p for x, p in zip(labels, pad)])  # (batch, seq)
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
            entities = Counter(self.label_names[t][2:] for tags in ds["tags"] for t in tags if self.label_names[t][:2] == "B-")
            lines.append("entities: " + " / ".join(f"{k} {v:,}" for k, v in sorted(entities.items())))
        cut, empty = ds["words_cut"], ds["words_empty"]
        lines.append(f"words past max_length {self.hparams.max_length}: {sum(cut):,} in {sum(c > 0 for c in cut):,} "
                     f"sentences (kept, predicted O: their entities count as missed); words with no sub-token: {sum(empty):,}")
        return lines


# ---- post-processing ------------------------------------------------------------------------------------------------

NEG = -1e4  # "impossible" score: finite, so Viterbi sums never turn into NaN


def word_scores(logits: torch.Tensor, word_starts: torch.Tensor, o_id: int) -> torch.Tensor:
    """(batch, seq, C) logits → (batch, words, C) log-probabilities at each word's first sub-token; a word with no
    sub-token (-1) gets a certain ``O``."""
    logp = logits.float().log_softmax(-1)
    idx = word_starts.clamp(min=0).unsqueeze(-1).expand(-1, -1, logp.size(-1))  # (batch, words, C)
    scores = logp.gather(1, idx)
    fill = torch.full_like(scores[0, 0], NEG)
    fill[o_id] = 0.0
    return torch.where((word_starts < 0).unsqueeze(-1), fill, scores)


@lru_cache(maxsize=8)
def _transitions(label_names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return allowed_transitions(list(label_names))


def allowed_transitions(label_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """IOB2 constraints: ``start[j]`` — tag j may open a sentence; ``trans[i, j]`` — tag j may follow tag i.
    ``I-X`` may only follow ``B-X`` or ``I-X``; everything else may follow anything."""
    C = len(label_names)
    start = torch.ones(C, dtype=torch.bool)
    trans = torch.ones(C, C, dtype=torch.bool)
    for j, lj in enumerate(label_names):
        if lj.startswith("I-"):
            start[j] = False
            trans[:, j] = torch.tensor([li in (f"B-{lj[2:]}", lj) for li in label_names])
    return start, trans


def viterbi_decode(scores: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Best tag path under hard transition constraints. scores (batch, words, C) log-probs; mask (batch, words) true
    on a prefix of each row; start (C,), trans (C, C) booleans. Returns (batch, words) tag ids (past the mask: junk)."""
    B, W, C = scores.shape
    start_pen = torch.where(start, 0.0, NEG).to(scores)
    trans_pen = torch.where(trans, 0.0, NEG).to(scores)
    score = scores[:, 0] + start_pen  # (batch, C)
    stay = torch.arange(C, device=scores.device).expand(B, C)
    backpointers = []
    for w in range(1, W):
        best, arg = (score.unsqueeze(2) + trans_pen).max(1)  # over the previous tag: (batch, C)
        on = mask[:, w].unsqueeze(1)
        score = torch.where(on, best + scores[:, w], score)
        backpointers.append(torch.where(on, arg, stay))  # past the end: keep the last real tag
    last = score.argmax(-1)  # (batch,)
    path = [last]
    for bp in reversed(backpointers):
        last = bp.gather(1, last.unsqueeze(1)).squeeze(1)
        path.append(last)
    return torch.stack(path[::-1], 1)


def decode(scores: torch.Tensor, n_words: torch.Tensor, how: str, label_names: list[str]) -> tuple[list[list[int]], list[list[float]]]:
    """Word scores → per sentence the tag ids and the probability of each chosen tag (lists cut to each length)."""
    if how == "viterbi":
        mask = torch.arange(scores.size(1), device=scores.device) < n_words.unsqueeze(1)
        ids = viterbi_decode(scores, mask, *(t.to(scores.device) for t in _transitions(tuple(label_names))))
    else:
        ids = scores.argmax(-1)
    probs = scores.gather(-1, ids.unsqueeze(-1)).squeeze(-1).exp()
    n = n_words.tolist()
    return [row[:k] for row, k in zip(ids.tolist(), n)], [row[:k] for row, k in zip(probs.tolist(), n)]


def chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """IOB tags → ``(type, first word, last word)`` with conlleval's rules (an ``I-X`` that does not continue an X
    entity opens one), which are seqeval's default mode and the pipeline's grouping too."""
    out: list[tuple[str, int, int]] = []
    prev = "O"
    for i, tag in enumerate(tags):
        if tag != "O" and (tag[0] == "B" or prev == "O" or prev[2:] != tag[2:]):
            out.append((tag[2:], i, i))
        elif tag != "O":
            out[-1] = (out[-1][0], out[-1][1], i)
        prev = tag
    return out


def to_entities(text: str, offsets: list[list[int]], tags: list[str], probs: list[float]) -> list[dict]:
    """Word tags → ``[{"type", "text", "start", "end", "score"}]``; offsets index ``text``; score = mean word probability."""
    out = []
    for typ, a, b in chunks(tags):
        start, end = offsets[a][0], offsets[b][1]
        out.append({"type": typ, "text": text[start:end], "start": start, "end": end, "score": sum(probs[a : b + 1]) / (b - a + 1)})
    return out


# ---- metric ---------------------------------------------------------------------------------------------------------


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision/recall/F1, per-type P/R/F1 and word accuracy — seqeval's default (conlleval) mode."""
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    out = {"precision": micro["precision"], "recall": micro["recall"], "f1": micro["f1-score"], "accuracy": accuracy_score(gold, pred)}
    for typ, row in report.items():
        if not typ.endswith(" avg"):
            out.update({f"f1/{typ}": row["f1-score"], f"precision/{typ}": row["precision"], f"recall/{typ}": row["recall"]})
    return {k: float(v) for k, v in out.items()}


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
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        max_length: int = 512,
        decoding: Literal["argmax", "viterbi"] = "argmax",
        num_errors: int = 50,
        peft: PeftConfig | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: Hub id, local directory, or ``pkg:PACKAGE/dir`` of the pretrained backbone.
            label_names: IOB2 label names in id order (linked from the data by the CLI).
            label_counts: Training words per label (linked from the data; for ``class_weights: balanced``).
            head: A custom per-token head (``pooling`` is unused); ``null`` keeps the backbone's token-classification
                head (``AutoModelForTokenClassification``: pipeline-compatible export).
            loss: Loss function and its options (on first sub-tokens; -100 is ignored).
            optimizer: AdamW, learning rates, layer-wise decay, freezing.
            scheduler: Per-step LR schedule with warmup.
            peft: LoRA (``configs/peft/lora.yaml``); null trains every weight. The task layers always train in full.
            gradient_checkpointing: Recompute activations in backward (non-reentrant): less memory, more compute.
            max_length: Truncation length for raw-text prediction (linked from ``data.max_length``).
            decoding: Word tags by per-word argmax, or by Viterbi under IOB2 constraints (no ``I-X`` after ``O`` or
                after another type). Metrics without a prefix use this one; ``<stage>/argmax/*`` and
                ``<stage>/viterbi/*`` report both.
            num_errors: How many test sentences with a wrong tag ``test`` writes to ``test_errors.json``.
        """
        super().__init__(model_name_or_path, optimizer, scheduler, peft, gradient_checkpointing)
        if not label_names:
            raise TaskheadError("model.label_names is empty: give tagged data or --data.label_names (the CLI links it to the model)")
        if decoding not in DECODINGS:
            raise TaskheadError(f"model.decoding must be one of {DECODINGS}, got {decoding!r}")
        self.label_names = list(label_names)
        if "O" not in self.label_names:
            raise TaskheadError(f"model.label_names must include 'O': {self.label_names}")
        self.o_id = self.label_names.index("O")
        self.head_cfg = as_config(HeadConfig, head)
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        self.max_length, self.decoding, self.num_errors = max_length, decoding, num_errors
        self.save_task_hparams(label_names=self.label_names, label_counts=label_counts, head=self.head_cfg, loss=self.loss_cfg,
                               max_length=max_length, decoding=decoding, num_errors=num_errors)
        n = len(self.label_names)
        # head: null → the backbone's own token head (dropout + linear); else our head on every token
        self.build_model(AutoModelForTokenClassification, self.head_cfg, n, **label_maps(self.label_names))
        self.set_loss(self.loss_cfg, label_counts, n)
        self.records: list[tuple] = []  # per evaluated sentence: (idx, gold ids, {decoding: ids}, tokens)
        self.test_artifacts: dict = {}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
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
    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["inputs"])
        self.log_eval_loss(stage, self._loss(logits, batch["labels"]), batch["stats"]["samples"])
        scores = word_scores(logits, batch["word_starts"], self.o_id)
        preds = {how: decode(scores, batch["n_words"], how, self.label_names)[0] for how in DECODINGS}
        keep_tokens = stage == "test"
        for i, idx in enumerate(batch["idx"].tolist()):
            self.records.append((idx, batch["tags"][i], {h: p[i] for h, p in preds.items()}, batch["tokens"][i] if keep_tokens else None))

    def _epoch_end(self, stage: str) -> None:
        records, self.records = self.records, []
        if self.trainer.world_size > 1:  # each rank saw different sentences (none twice): gather them all
            parts: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # -- prediction --------------------------------------------------------------------------------------------------
    def _entities(self, logits, word_starts, n_words, texts, offsets) -> list[dict]:
        scores = word_scores(logits, word_starts, self.o_id)
        ids, probs = decode(scores, n_words, self.decoding, self.label_names)
        out = []
        for t, o, row, p in zip(texts, offsets, ids, probs):
            tags = [self.label_names[i] for i in row]
            out.append({"tags": tags, "entities": to_entities(t, o, tags, p)})
        return out

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        res = self._entities(self(batch["inputs"]), batch["word_starts"], batch["n_words"], batch["text"], batch["offsets"])
        return [{"idx": int(i), "tokens": toks, **r} for i, toks, r in zip(batch["idx"], batch["tokens"], res)]

    def predict_raw(self, tokenizer, texts: str | list[str], batch_size: int = 32) -> list[dict] | list[list[dict]]:
        """Raw text(s) → entities ``[{"type", "text", "start", "end", "score"}]`` per text, with character offsets into
        it (a single list for a single string). Words are split off by ``WORD_RE``."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        split = [split_words(t) for t in texts]
        encodings, word_ids = [], []
        for words, _ in split:
            enc = tokenizer(words or [""], is_split_into_words=True, truncation=True, max_length=self.max_length)
            word_ids.append([-1 if w is None else w for w in enc.word_ids()])
            encodings.append(dict(enc))
        left = tokenizer.padding_side == "left"

        def run(inputs, idx):
            T = inputs["input_ids"].shape[1]
            starts = [[s + (T - len(word_ids[i]) if left else 0) if s >= 0 else -1
                       for s in first_subtokens(word_ids[i], len(split[i][0]))] for i in idx]
            W = max(1, max(len(s) for s in starts))
            word_starts = torch.tensor([s + [-1] * (W - len(s)) for s in starts], device=self.device)
            n_words = torch.tensor([len(split[i][0]) for i in idx], device=self.device)
            res = self._entities(self(inputs), word_starts, n_words, [texts[i] for i in idx], [split[i][1] for i in idx])
            return [r["entities"] for r in res]

        out = batched_inference(encodings, tokenizer, batch_size, run, self.device)
        return out[0] if single else out
