"""Metrics shared between tasks, computed the official way, plus the guards that say when generated text is degenerate.

- ROUGE (rouge-score, Porter stemmer; rougeLsum on newline-joined sentences) for summarization.
- Corpus sacreBLEU and chrF (sacrebleu, signatures kept) for translation.
- Degenerate-output guards for every generation task: the share of distinct outputs, the share of repeated word
  4-grams within an output (seq-rep-4 of Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"),
  and the share of outputs cut off at ``max_new_tokens``; ``degenerate_warnings`` turns them into warning lines.

Everything here is a pure function of strings (and flags): testable with hand-written inputs.
"""

from __future__ import annotations

import re

# ---- ROUGE ------------------------------------------------------------------------------------------------------------

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


# ---- BLEU / chrF ------------------------------------------------------------------------------------------------------


def bleu_scores(predictions: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus sacreBLEU and chrF over the whole split (one reference each) with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(predictions, [references]), chrf.corpus_score(predictions, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


# ---- degenerate-output guards -----------------------------------------------------------------------------------------

REPEAT_N = 4  # seq-rep-4 (Welleck et al. 2019): 4-grams, long enough that "of the" / "in the" repeats do not count

COLLAPSE_MIN_OUTPUTS = 20  # below this, a few equal outputs are chance, not collapse
COLLAPSE_DISTINCT = 0.5  # warn when fewer than half of the outputs are distinct
CAP_HIT_SHARE = 0.5  # warn when more than half of the outputs were cut off at max_new_tokens


def normalize_output(text: str) -> str:
    """Whitespace collapsed, case kept: two outputs are the same when a reader would see the same text."""
    return " ".join(text.split())


def distinct_share(outputs: list[str]) -> float:
    """Share of unique outputs (after ``normalize_output``): 1.0 all different, 1/n all the same; 0.0 for none."""
    return len({normalize_output(t) for t in outputs}) / len(outputs) if outputs else 0.0


def repeated_ngram_share(text: str, n: int = REPEAT_N) -> float | None:
    """Within one output: 1 - unique word n-grams / all word n-grams (lower-cased, whitespace words).

    "a b c d a b c d" has five 4-grams of which four are distinct → 0.2. None when the output has fewer than n words.
    """
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


def repetition_rate(outputs: list[str], n: int = REPEAT_N) -> float:
    """Mean of ``repeated_ngram_share`` over the outputs that have at least one n-gram (0.0 when none has)."""
    shares = [s for s in (repeated_ngram_share(t, n) for t in outputs) if s is not None]
    return sum(shares) / len(shares) if shares else 0.0


def guard_scores(outputs: list[str], hit_limit: list[bool]) -> dict[str, float]:
    """The three guard metrics, logged as ``<stage>/distinct_outputs``, ``<stage>/repeated_4grams`` and
    ``<stage>/hit_max_new_tokens``."""
    return {
        "distinct_outputs": distinct_share(outputs),
        f"repeated_{REPEAT_N}grams": repetition_rate(outputs),
        "hit_max_new_tokens": sum(hit_limit) / len(hit_limit) if hit_limit else 0.0,
    }


def degenerate_warnings(scores: dict[str, float], n_outputs: int, max_new_tokens: int, stage: str) -> list[str]:
    """Warning lines for outputs a user would not keep: collapsed (< 50 % distinct on >= 20 outputs) or mostly cut off
    (> 50 % hit ``max_new_tokens``). Empty when the outputs look sane."""
    lines = []
    distinct = scores["distinct_outputs"]
    if n_outputs >= COLLAPSE_MIN_OUTPUTS and distinct < COLLAPSE_DISTINCT:
        lines.append(f"[generate] {stage}: outputs collapsed: only {distinct:.0%} of {n_outputs:,} outputs are distinct "
                     f"(< {COLLAPSE_DISTINCT:.0%}); the model writes the same text whatever the input, so ROUGE/BLEU "
                     "mean little: check the prompt, train longer or on more data, or lower the learning rate")
    hit = scores["hit_max_new_tokens"]
    if hit > CAP_HIT_SHARE:
        lines.append(f"[generate] {stage}: {hit:.0%} of {n_outputs:,} outputs hit max_new_tokens={max_new_tokens} (cut "
                     "off, no end-of-sequence): the model does not stop; raise model.generation.max_new_tokens or train "
                     f"longer (repeated {REPEAT_N}-grams within outputs: {scores[f'repeated_{REPEAT_N}grams']:.0%})")
    return lines


# ---- choosing one of N: classification and multiple choice --------------------------------------------------------------


def multiclass_metrics(num_classes: int, per_class: tuple[str, ...] = ("precision", "recall", "f1")):
    """Accuracy and macro-F1 (torchmetrics), plus the ``per_class`` vectors among precision / recall / f1; states sum
    over batches and ranks before compute. Per-class recall of multiple choice is its accuracy by gold position."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

    vectors = {"precision": MulticlassPrecision, "recall": MulticlassRecall, "f1": MulticlassF1Score}
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        **{name: vectors[name](num_classes, average=None) for name in per_class},
    })


def flatten_metrics(stage: str, values: dict, names: list[str]) -> dict[str, float]:
    """Scalars as ``stage/name``; per-class vectors as ``stage/name/<class name>``."""
    flat = {}
    for name, v in values.items():
        if v.ndim == 0:
            flat[f"{stage}/{name}"] = float(v)
        else:
            flat.update({f"{stage}/{name}/{label}": float(x) for label, x in zip(names, v.tolist(), strict=True)})
    return flat


class MostConfident:
    """The ``k`` most confident mistakes of a pass, kept in a bounded heap (memory O(k), whatever the split's size).
    ``add(confidence, *fields)``; ``take(gather)`` merges every rank's heap (``TaskModule.gather``), returns the top
    ``k`` as ``(confidence, *fields)`` tuples, most confident first, and empties the heap."""

    def __init__(self, k: int) -> None:
        self.k, self.items, self._seen = k, [], 0

    def add(self, confidence: float, *fields) -> None:
        import heapq

        # the sequence number breaks ties between equal confidences without comparing the fields
        self._seen += 1
        heapq.heappush(self.items, (confidence, self._seen, fields))
        if len(self.items) > self.k:
            heapq.heappop(self.items)

    def add_wrong(self, probs, labels, fields, names: list[str] | None = None):
        """(batch, N) probabilities and (batch,) gold ids: every row whose argmax is wrong is added as
        ``(confidence, *fields(row), gold, pred)``, gold and pred as ids or, given ``names``, as their names.
        Returns the argmax ids (for a confusion matrix)."""
        conf, pred = probs.max(-1)
        for i in (pred != labels).nonzero().flatten().tolist():
            gold, guess = int(labels[i]), int(pred[i])
            self.add(float(conf[i]), *fields(i), *((names[gold], names[guess]) if names else (gold, guess)))
        return pred

    def take(self, gather=list) -> list[tuple]:
        import heapq

        items, self.items = gather([(c, f) for c, _, f in self.items]), []
        return [(c, *f) for c, f in heapq.nlargest(self.k, items, key=lambda item: item[0])]


# ---- multi-label and regression classification -------------------------------------------------------------------------


def multilabel_metrics(num_labels: int):
    """Micro- and macro-F1 plus per-label precision / recall / F1 (torchmetrics ``Multilabel*``). Update them with
    0/1 predictions (probabilities already thresholded), so the decision threshold can change between passes."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MultilabelF1Score, MultilabelPrecision, MultilabelRecall

    return MetricCollection({
        "f1_micro": MultilabelF1Score(num_labels, average="micro"),
        "f1_macro": MultilabelF1Score(num_labels, average="macro"),
        "precision": MultilabelPrecision(num_labels, average=None),
        "recall": MultilabelRecall(num_labels, average=None),
        "f1": MultilabelF1Score(num_labels, average=None),
    })


THRESHOLD_GRID = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 ... 0.95


def threshold_curve():
    """Micro-averaged precision/recall of every (row, label) decision at each threshold of ``THRESHOLD_GRID``
    (torchmetrics' binned curve: memory O(thresholds) whatever the split's size); ``best_threshold`` reads it."""
    from torchmetrics.classification import BinaryPrecisionRecallCurve

    return BinaryPrecisionRecallCurve(thresholds=THRESHOLD_GRID)


def best_threshold(curve) -> tuple[float, float]:
    """``(threshold, micro-F1 at it)``: the grid threshold with the highest micro-F1. Ties (a plateau, common on a
    small validation split) go to the middle of the plateau: the threshold furthest from where F1 starts to drop."""
    precision, recall, thresholds = curve.compute()  # precision/recall: one more entry than thresholds (the end point)
    p, r = precision[:-1], recall[:-1]
    f1 = (2 * p * r / (p + r)).nan_to_num(0.0)
    tied = (f1 == f1.max()).nonzero().flatten()
    best = int(tied[len(tied) // 2])
    return float(thresholds[best]), float(f1[best])


def regression_metrics():
    """Pearson and Spearman correlation and RMSE between predicted and gold scores (torchmetrics)."""
    import warnings

    from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef

    with warnings.catch_warnings():
        # "will save all targets and predictions": ranks need the whole split, and two floats per example is the
        # least that can hold it (a million examples: 8 MB); said here once instead of on every run
        warnings.filterwarnings("ignore", message=".*SpearmanCorrcoef.*will save all targets", category=UserWarning)
        spearman = SpearmanCorrCoef()
    return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": spearman, "rmse": MeanSquaredError(squared=False)})
