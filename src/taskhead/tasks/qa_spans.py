"""QA's pure functions on windows and spans: reading SQuAD JSON, cutting contexts into overlapping windows with
span labels, batching whole questions for prediction, choosing n-best spans across windows, and the official SQuAD
v1.1 exact match / F1.

The algorithms follow HF's ``prepare_train_features`` / ``prepare_validation_features`` (``run_qa.py``) and
``postprocess_qa_predictions`` (``utils_qa.py``), written once as importable functions; ``qa.py`` wires them into the
DataModule and the LightningModule.
"""

from __future__ import annotations

import heapq
import itertools
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from taskhead.core.readers import JsonLines, json_items, open_text, read_records
from taskhead.errors import TaskheadError

Offsets = Sequence[Sequence[int] | None]  # per token: (char start, char end) in the context, None outside it

# ---- preprocessing: windows and span labels -----------------------------------------------------------------------------------------------


def read_squad_json(path: str) -> Iterator[tuple[str, dict]]:
    """Yield ``("path: question ID", {id, question, context, answers: {text, answer_start}})`` from a SQuAD JSON file
    (``data > paragraphs > qas > answers``). Other JSON layouts (a plain list of records) go to the generic reader."""
    with open_text(Path(path)) as f:
        articles = json_items(f, Path(path))  # one article at a time
        try:
            first = next(articles, None)
        except JsonLines:
            first = None
        if first is None or not (isinstance(first[1], dict) and "paragraphs" in first[1]):
            yield from read_records(path)
            return
        yield from squad_questions(path, itertools.chain([first], articles))


def squad_questions(path: str, articles) -> Iterator[tuple[str, dict]]:
    for a, article in articles:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TaskheadError(f"{path}: article {a}: 'paragraphs' must be a list")
        for p, para in enumerate(paragraphs):
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                raise TaskheadError(f"{path}: article {a} paragraph {p}: 'qas' must be a list")
            for q, qa in enumerate(qas):
                if not isinstance(qa, dict) or not qa.get("id"):
                    raise TaskheadError(f"{path}: article {a} paragraph {p} question {q}: 'id' is missing")
                answers = qa.get("answers", [])
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise TaskheadError(f"{path}: question {qa['id']}: 'answers' must be a list of {{text, answer_start}}")
                yield f"{path}: question {qa['id']}", {
                    "id": str(qa["id"]), "question": qa.get("question"), "context": para.get("context"),
                    "answers": {"text": [x.get("text") for x in answers], "answer_start": [x.get("answer_start") for x in answers]},
                }


def nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """Character position of the occurrence of ``text`` in ``context`` closest to ``start`` (None if absent)."""
    found, pos = [], context.find(text)
    while pos != -1:
        found.append(pos)
        pos = context.find(text, pos + 1)
    return min(found, key=lambda p: (abs(p - start), p)) if found else None


def span_labels(offsets: Offsets, start_char: int, end_char: int, cls_index: int) -> tuple[int, int]:
    """Token positions of the answer ``[start_char, end_char)`` in one window; ``(cls, cls)`` when it is not all inside."""
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or not (offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char):
        return cls_index, cls_index
    s, e = ctx[0], ctx[-1]
    while s <= ctx[-1] and offsets[s][0] <= start_char:
        s += 1
    while e >= ctx[0] and offsets[e][1] >= end_char:
        e -= 1
    return s - 1, e + 1


def prepare_features(tokenizer, questions: list[str], contexts: list[str], max_length: int, doc_stride: int,
                     answers: list[dict] | None = None) -> dict[str, list]:
    """Examples → overlapping windows: model inputs, ``example`` (input row of each window), ``offsets`` (context-only
    character offsets), and with ``answers`` the ``start_positions``/``end_positions`` of the first answer (CLS if
    outside the window). Tokenizers that pad on the left get the context first (HF ``run_qa.py``)."""
    if not tokenizer.is_fast:
        raise TaskheadError(f"QA needs a fast tokenizer (offset mappings); {type(tokenizer).__name__} is not")
    right = tokenizer.padding_side == "right"
    try:
        enc = tokenizer(questions if right else contexts, contexts if right else questions,
                        truncation="only_second" if right else "only_first", max_length=max_length, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
    except Exception as e:  # the Rust tokenizer's error when the question leaves no room for context + stride
        longest = max(range(len(questions)), key=lambda i: len(questions[i]))
        raise TaskheadError(f"cannot cut windows of {max_length} tokens with doc_stride {doc_stride} (longest question here: "
                            f"{questions[longest][:80]!r}): raise --data.max_length or lower --data.doc_stride ({e})") from None
    ctx_seq = 1 if right else 0
    out = {k: enc[k] for k in enc if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    out["example"] = list(enc["overflow_to_sample_mapping"])
    out["offsets"] = [[o if s == ctx_seq else None for o, s in zip(offs, enc.sequence_ids(w))]
                      for w, offs in enumerate(enc["offset_mapping"])]
    if answers is not None:
        out["start_positions"], out["end_positions"] = [], []
        for w, ex in enumerate(out["example"]):
            ids = out["input_ids"][w]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            start = answers[ex]["answer_start"][0]
            s, e = span_labels(out["offsets"][w], start, start + len(answers[ex]["text"][0]), cls)
            out["start_positions"].append(s)
            out["end_positions"].append(e)
    return out


class ExampleBatchSampler:
    """Prediction batches of at most ``batch_size`` windows that keep the windows of an example together (longest
    first), so ``predict_step`` finishes the examples it sees. An example with more windows than a batch holds fills
    consecutive batches of its own, whose candidates ``predict_step`` carries over. Ranks take every n-th group of
    batches: all windows of an example stay on one rank. A rank with fewer batches than another splits its largest
    ones (``equal_batch_count``): under a sharded strategy every forward is a collective, and a rank that stopped
    early would leave the others waiting."""

    def __init__(self, examples: Sequence[int], lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0):
        groups: dict[int, list[int]] = {}
        for row, ex in enumerate(examples):
            groups.setdefault(ex, []).append(row)
        units: list[list[list[int]]] = []  # consecutive batches that end with whole examples: one rank's share each
        cur: list[int] = []
        for ex in sorted(groups, key=lambda ex: -max(lengths[r] for r in groups[ex])):
            rows = groups[ex]
            if len(rows) > batch_size:  # a long context: its windows alone, over several batches
                units.append([rows[i : i + batch_size] for i in range(0, len(rows), batch_size)])
                continue
            if cur and len(cur) + len(rows) > batch_size:
                units.append([cur])
                cur = []
            cur += rows
        units += [[cur]] if cur else []
        shares = [[batch for unit in units[r::num_replicas] for batch in unit] for r in range(num_replicas)]
        self.batches = equal_batch_count(shares[rank], max(len(share) for share in shares))

    def __iter__(self):
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


def equal_batch_count(batches: list[list[int]], target: int) -> list[list[int]]:
    """``batches`` grown to ``target`` batches by halving the largest one, in place in the order (an example's windows
    stay in sequence and ``predict_step`` answers an example once it has seen all of them). Stops early only when
    every batch holds a single window: fewer windows on this rank than ``target``."""
    batches = list(batches)
    while len(batches) < target:
        i = max(range(len(batches)), key=lambda j: len(batches[j]), default=None)
        if i is None or len(batches[i]) < 2:
            break
        half = len(batches[i]) // 2
        batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


# ---- post-processing ------------------------------------------------------------------------------------------------

Candidate = tuple[float, int, int]  # (start logit + end logit, char start, char end)


def window_candidates(start_logits: Sequence[float], end_logits: Sequence[float], offsets: Offsets,
                      n_best: int = 20, max_answer_length: int = 30) -> list[Candidate]:
    """One window's best spans, best first: pairs of the ``n_best`` highest start and end logits, skipping tokens outside
    the context, reversed spans and spans longer than ``max_answer_length`` tokens. Logits may be longer than
    ``offsets`` (padding); only the first ``len(offsets)`` positions count."""
    start_logits = np.asarray(start_logits, dtype=np.float64)[: len(offsets)]
    end_logits = np.asarray(end_logits, dtype=np.float64)[: len(offsets)]
    starts = np.argsort(-start_logits, kind="stable")[:n_best]
    ends = np.argsort(-end_logits, kind="stable")[:n_best]
    out = []
    for s in starts:
        if offsets[s] is None:
            continue
        for e in ends:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            out.append((float(start_logits[s] + end_logits[e]), int(offsets[s][0]), int(offsets[e][1])))
    return heapq.nlargest(n_best, out)


def merge_candidates(candidates: Sequence[Candidate], n_best: int = 20) -> list[Candidate]:
    """Keep the ``n_best`` best distinct spans (a span seen in two overlapping windows keeps its higher score)."""
    best: dict[tuple[int, int], float] = {}
    for score, s, e in candidates:
        if score > best.get((s, e), -np.inf):
            best[(s, e)] = score
    return heapq.nlargest(n_best, ((sc, s, e) for (s, e), sc in best.items()))


def best_answer(candidates: Sequence[Candidate], context: str, n_best: int = 20) -> dict:
    """All windows' candidates of one example → ``{"answer", "start", "end", "score"}``: the top span's text by
    character offsets, its score a softmax over the n-best scores (as HF ``utils_qa``). No candidate → empty answer."""
    top = merge_candidates(candidates, n_best)
    if not top:
        return {"answer": "", "start": 0, "end": 0, "score": 0.0}
    scores = np.array([c[0] for c in top])
    probs = np.exp(scores - scores.max())
    _, s, e = top[0]
    return {"answer": context[s:e], "start": s, "end": e, "score": float(probs[0] / probs.sum())}


# ---- metric ---------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lower-case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:  # the official script returns 0 here, also when both sides normalise to nothing
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Official SQuAD v1.1 ``exact_match`` and ``f1`` in percent: per question the max over its gold answers, averaged
    over every question in ``references`` (a question without a prediction scores 0, as in the official script)."""
    if not references:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1_sum = 0.0
    for qid, golds in references.items():
        if qid in predictions:
            em += max(exact_match(predictions[qid], g) for g in golds)
            f1_sum += max(f1(predictions[qid], g) for g in golds)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1_sum / len(references)}
