"""Seq2seq preprocessing: records or parallel text files → token ids with -100 labels, for the three generator kinds.

- ``seq2seq`` / ``encoder_decoder``: source ids (prefix + source, truncated) and target ids as labels.
- ``causal`` (decoder-only LM): one row, prompt + target + EOS, labels -100 over the prompt so the loss sees only the
  target; the prompt is prefix + source + separator, or with ``chat_template`` the tokenizer's chat template with
  prefix + source as the user turn. Generation continues left-padded prompts.

Any ``*_file`` may end in a record slice (``path[700:800]``); ``x.en`` + ``x.ro`` are read as aligned parallel text.
The task's metric and LightningModule are in ``seq2seq.py`` (which re-exports ``Seq2SeqDataModule`` for the YAMLs).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from taskhead.core.arrow import numpy_column
from taskhead.core.data import TaskDataModule
from taskhead.core.splits import SPLITS
from taskhead.core.tokens import encode_ids
from taskhead.core.losses import IGNORE_INDEX
from taskhead.core.readers import get_text, open_text, read_records
from taskhead.errors import TaskheadError
from taskhead.tasks.seq2seq_models import Architecture, load_generator_tokenizer

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
    """Aligned text files, one segment a line → ``{"translation": {source_lang: ..., target_lang: ...}}`` (WMT shape),
    streamed line by line. Without the target file (predict) only the source side is yielded. Different line counts
    are an error."""
    src = open_text(Path(source))
    tgt = open_text(Path(target)) if Path(target).is_file() else None
    try:
        n = 0
        for n, line in enumerate(src, start=1):
            pair = {source_lang: line.rstrip("\n").rstrip("\r")}
            if tgt is not None:
                other = next(tgt, None)
                if other is None:
                    _differ(source, n + sum(1 for _ in src), target, n - 1)
                pair[target_lang] = other.rstrip("\n").rstrip("\r")
            yield f"{source}:{n}", {"translation": pair}
        if tgt is not None and (rest := sum(1 for _ in tgt)):
            _differ(source, n, target, n + rest)
    finally:
        src.close()
        if tgt is not None:
            tgt.close()


def _differ(source, n_source: int, target, n_target: int):
    raise TaskheadError(
        f"parallel files differ in length: {source} has {n_source:,} lines, {target} has {n_target:,}; "
        "line i of one must translate line i of the other"
    )


def chat_frame(tokenizer, prefix: str, separator: str) -> tuple[str, str]:
    """Chat-tuned decoder-only LM: (text before the source, text after it). The user turn is prefix + source, rendered
    by the tokenizer's own chat template (its default system turn included); the separator follows the assistant
    header (a prefill of the answer, usually empty)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskheadError(f"chat_template: true, but tokenizer '{tokenizer.name_or_path}' has no chat template; set it false")
    marker = "\uffffSOURCE\uffff"
    text = tokenizer.apply_chat_template([{"role": "user", "content": prefix + marker}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return head, tail + separator


def encode_sources(tokenizer, sources: list[str], prefix: str, architecture: str, separator: str, max_length: int,
                   chat_template: bool = False) -> tuple[list[list[int]], list[int]]:
    """prefix + source, truncated to ``max_length``; for a decoder-only LM the separator follows (never cut off).
    With ``chat_template`` the same inside the template's user turn: the cut is at the end of the source, so the end of
    the turn and the assistant header are always kept. Also returns each prompt's length before the cut (the data
    report's truncation), from the same pass (``encode_ids``)."""
    texts = [prefix + s for s in sources]
    if architecture != "causal":
        enc = encode_ids(tokenizer, texts, max_length=max_length)
        return enc["input_ids"], enc["full_length"]
    if chat_template:
        prefix, separator = chat_frame(tokenizer, prefix, separator)
        texts = [prefix + s for s in sources]
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if len(sep) >= max_length:
        raise TaskheadError(f"max_length {max_length} leaves no room for the source: the text after it "
                            f"({separator!r}) alone is {len(sep)} tokens")
    enc = encode_ids(tokenizer, texts, max_length=max_length - len(sep))
    return [x + sep for x in enc["input_ids"]], [n + len(sep) for n in enc["full_length"]]


def causal_example(prompt: list[int], target: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """prompt + target + EOS, and labels that are -100 over the prompt: the loss sees only the target (and EOS)."""
    target = list(target) + [eos_id]
    return list(prompt) + target, [IGNORE_INDEX] * len(prompt) + target


def pad_to(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [[value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class Seq2SeqDataModule(TaskDataModule):
    load_tokenizer = staticmethod(load_generator_tokenizer)  # a pad token for decoder-only generators
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
        chat_template: bool = False,
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
            chat_template: Decoder-only models: wrap prefix + source in the tokenizer's chat template (a user turn;
                the target is the assistant's answer); must equal ``model.chat_template``.
        """
        if chat_template and architecture != "causal":
            raise TaskheadError("data.chat_template: true needs architecture: causal (a decoder-only chat model)")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self._slices: dict[str, slice] = {}
        self._specs: dict[str, str] = {}  # split key → the file spec as given (path[start:stop]), for messages

    def data_files(self) -> dict[str, str]:
        """Split → file; extra training files are ``train+1``, ``train+2``, ..., read after ``train`` as one split."""
        files = {}
        for split in SPLITS:
            specs = [self.hparams[f"{split}_file"]] if self.hparams[f"{split}_file"] else []
            if split == "train":
                specs += list(self.hparams.extra_train_files or [])
            for n, spec in enumerate(specs):
                key = split if n == 0 else f"{split}+{n}"
                files[key], self._slices[key] = parse_file_spec(spec)
                self._specs[key] = spec
        return files

    def _sources(self) -> dict:
        """The base's sources with each file's record slice applied, and ``train+N`` read after ``train``."""
        out = super()._sources()
        for key in [k for k in out if k in self._slices]:
            out[key] = partial(self._sliced, key, out[key])
        extra = sorted((k for k in out if "+" in k), key=lambda k: int(k.split("+")[1]))
        if extra:
            parts = [out.pop(k) for k in ["train", *extra] if k in out]
            out["train"] = lambda: (item for part in parts for item in part())
        return out

    def _sliced(self, key: str, source) -> Iterator[tuple[str, dict]]:
        """The records of ``key``'s file in its slice, streamed (a negative bound counts the records first)."""
        cut = self._slices[key]
        if cut == slice(None):
            yield from source()
            return
        start, stop, step = cut.start, cut.stop, cut.step
        n = None
        if (start or 0) < 0 or (stop or 0) < 0:
            n = sum(1 for _ in source())
            start, stop, step = cut.indices(n)
        kept = 0
        for item in islice(source(), start, stop, step):
            kept += 1
            yield item
        if not kept:
            n = n if n is not None else sum(1 for _ in source())
            raise TaskheadError(f"{self._specs.get(key, key)}: the slice selects no records (the file has {n:,})")

    def _parallel_target(self, path: str) -> Path | None:
        """``x.<source_lang>`` → ``x.<target_lang>``; None for files that are not the source side of parallel text."""
        lang, other = self.hparams.source_lang, self.hparams.target_lang
        return Path(path).with_suffix(f".{other}") if lang and other and Path(path).suffix == f".{lang}" else None

    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        lang, other = self.hparams.source_lang, self.hparams.target_lang
        if lang and Path(path).suffix == f".{lang}":
            if not other:
                raise TaskheadError(f"{path}: a parallel source file needs --data.target_lang")
            target = self._parallel_target(path)
            split = next((k.split("+")[0] for k, p in self.data_files().items() if p == path), None)
            if split != "predict" and not target.is_file():
                raise TaskheadError(f"{target}: file not found (the target side of {path} for the {split} split)")
            return read_parallel(path, target, lang, other)
        return read_records(path)

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        out = {"source": get_text(rec, self.hparams.source_field, where), "where": where}
        if split != "predict":
            out["target"] = get_text(rec, self.hparams.target_field, where)
        return out

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok, hp = self.tokenizer, self.hparams
        prompts, full = encode_sources(tok, batch["source"], hp.source_prefix, hp.architecture, hp.separator,
                                       hp.max_length, hp.chat_template)
        enc: dict[str, list] = {"full_length": full}  # the whole prompt before the cut: the data report's truncation
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
            "format": (hp.architecture, hp.source_prefix, hp.separator, hp.chat_template),
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
        full = numpy_column(ds, "target_full_length")  # one Arrow read
        limit = self.hparams.max_target_length
        over = int((full > limit).sum())
        unk = int(numpy_column(ds, "target_unk").sum()) / max(int(full.sum()), 1)
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
