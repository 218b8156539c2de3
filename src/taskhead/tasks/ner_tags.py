"""NER's pure functions on words and tags: reading CoNLL column files, tag schemes (IOB1 / BIOES → IOB2), aligning
word tags with sub-tokens, decoding word tags (argmax or IOB2-constrained Viterbi), tags → entities with character
offsets, and the metric (seqeval entity-level P/R/F1, conlleval rules).

They take lists and tensors and return lists and tensors: ``ner.py`` wires them into the DataModule and the
LightningModule, and the tests check them with hand-written inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from seqeval.metrics.sequence_labeling import get_entities

from taskhead.core.losses import IGNORE_INDEX
from taskhead.core.readers import open_text, read_records
from taskhead.errors import TaskheadError

# ---- preprocessing --------------------------------------------------------------------------------------------------

SCHEME_PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIES"}
WORD_RE = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks, as BERT's pre-tokenizer splits them


def read_conll(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("path:line", {"rows", "lines", "width", "width_line"})`` per sentence of a CoNLL column file.

    Blank lines end sentences; ``-DOCSTART-`` lines end documents and are skipped. ``rows`` are the whitespace-split
    columns of each token line, ``lines`` their line numbers; ``width`` is the column count of the file's first token
    line (``width_line``), which every line must match (checked by ``conll_columns``).
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


def read_ner_file(path: str) -> Iterator[tuple[str, dict]]:
    """By extension: ``.json``/``.jsonl`` records, ``.txt`` raw text (one per line), anything else CoNLL columns."""
    suffix = Path(path[:-3] if path.endswith(".gz") else path).suffix
    if suffix in (".json", ".jsonl"):
        return read_records(path)
    return read_raw_text(path) if suffix == ".txt" else read_conll(path)


def conll_columns(rec: dict, tag_column: int | None, at) -> tuple[list[str], list[str] | None]:
    """One ``read_conll`` sentence → its words (column 0) and, unless ``tag_column`` is None, its tags. Every line must
    have the file's column count; ``at(i)`` names the line of word i in errors."""
    width = rec["width"]
    for i, cols in enumerate(rec["rows"]):
        if len(cols) != width:
            raise TaskheadError(f"{at(i)}: {len(cols)} columns, but the file's first line (line {rec['width_line']}) "
                                f"has {width}; columns are separated by whitespace")
    tokens = [cols[0] for cols in rec["rows"]]
    if tag_column is None:
        return tokens, None
    if not -width <= tag_column < width or width < 2:
        raise TaskheadError(f"{at(0)}: --data.tag_column {tag_column} does not exist in a line of {width} columns "
                            "(column 0 is the word)")
    return tokens, [cols[tag_column] for cols in rec["rows"]]


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


def name_tag_ids(tags: list, names: list[str] | None, where: str) -> list:
    """Tags given as integer ids (a JSON file's, or a Hub row's) → their names in ``names`` (``--data.label_names``);
    tags given as names come back unchanged."""
    if not any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        return tags
    if not names:
        raise TaskheadError(f"{where}: integer tags need --data.label_names to name them (ids 0..n-1)")
    bad = next((t for t in tags if not (isinstance(t, int) and 0 <= t < len(names))), None)
    if bad is not None:
        raise TaskheadError(f"{where}: tag id {bad!r} is outside the {len(names)} label_names {names}")
    return [names[t] for t in tags]


def check_scheme(tags: list, scheme: str, at) -> None:
    """Every tag is ``O`` or ``P-TYPE`` with a prefix P of ``scheme``; ``at(i)`` names the place of tag i in errors."""
    prefixes = SCHEME_PREFIXES[scheme]
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not (tag == "O" or (len(tag) > 2 and tag[0] in prefixes and tag[1] == "-")):
            allowed = ", ".join(["O"] + [f"{p}-TYPE" for p in prefixes])
            raise TaskheadError(f"{at(i)}: tag {tag!r} is not in the {scheme.upper()} scheme ({allowed}); "
                                "set --data.tag_scheme or --data.tag_column")


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


def is_iob2(names: list[str]) -> bool:
    return all(n == "O" or n[:2] in ("B-", "I-") for n in names)


def complete_label_names(names: list[str]) -> list[str]:
    """A given IOB2 label set (``--data.label_names`` or the Hub's ClassLabel names) in its own id order, checked, then
    completed: the IOB2 conversion can produce a ``B-X`` for a type whose ``B-X`` a corpus never used."""
    names = list(names)
    if "O" not in names or not is_iob2(names):
        raise TaskheadError(f"label_names must be IOB2 (O, B-TYPE, I-TYPE) and include O; got {names}")
    return names + [n for n in iob2_label_names({n[2:] for n in names if n != "O"}) if n not in names]


def inside_map(label_names: list[str]) -> list[int]:
    """id → id of its ``I-`` form (``B-X`` → ``I-X``; others unchanged): labels for continuation sub-tokens."""
    index = {n: i for i, n in enumerate(label_names)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(label_names)]


def tokenize_words(tokenizer, words: list[list[str]], max_length: int):
    """Sentences of words → the tokenizer's encoding (truncated to ``max_length``) and, per sentence, the word of each
    sub-token (-1 on special tokens): what alignment and word scores index by."""
    if not tokenizer.is_fast:
        raise TaskheadError(f"{tokenizer.name_or_path}: NER needs a fast tokenizer (word_ids) to align labels with words")
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    return enc, [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(words))]


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


def pad_labels(labels: list[list[int]], width: int, left: bool) -> torch.Tensor:
    """Aligned labels → (batch, width), padded with -100 on the tokenizer's padding side."""
    pad = [[IGNORE_INDEX] * (width - len(x)) for x in labels]
    return torch.tensor([p + x if left else x + p for x, p in zip(labels, pad)])


def first_subtokens(word_ids: list[int | None], n_words: int) -> list[int]:
    """Position of each word's first sub-token; -1 for words that have none (truncated, or nothing to tokenise)."""
    starts = [-1] * n_words
    for pos, w in enumerate(word_ids):
        if w is not None and w >= 0 and starts[w] < 0:
            starts[w] = pos
    return starts


# ---- post-processing ------------------------------------------------------------------------------------------------

def word_starts(word_ids: list[list[int]], n_words: list[int], width: int, left: bool) -> torch.Tensor:
    """Per sentence its sub-tokens' word ids (-1: special token) → (batch, words) position of each word's first
    sub-token in the padded batch of ``width`` tokens (left padding shifts them), -1 for words with none or padding."""
    starts = [[s + (width - len(ids) if left else 0) if s >= 0 else -1 for s in first_subtokens(ids, n)]
              for ids, n in zip(word_ids, n_words)]
    W = max(1, max(len(s) for s in starts))
    return torch.tensor([s + [-1] * (W - len(s)) for s in starts])  # (batch, words)


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


def to_entities(text: str, offsets: list[list[int]], tags: list[str], probs: list[float]) -> list[dict]:
    """Word tags → ``[{"type", "text", "start", "end", "score"}]``; offsets index ``text``; score = mean word probability.

    Words group into entities by seqeval's own ``get_entities`` (``(type, first word, last word)``, conlleval rules: an
    ``I-X`` that does not continue an X entity opens one), so predictions and the metric count the same entities."""
    out = []
    for typ, a, b in get_entities(list(tags)):
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
