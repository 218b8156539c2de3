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
