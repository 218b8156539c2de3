"""``encode_ids`` (Rust ``encode_batch_fast``, long rows cut again) gives exactly the ids of the transformers call."""

from __future__ import annotations

import pytest

from taskhead.core.pretrained import load_tokenizer
from taskhead.core.tokens import encode_ids

TEXTS = ["A film that was great .", "Café naïve résumé — ünïcödé", "[SEP] inside [CLS] the text <|endoftext|>",
         "word " * 80, "short", "  spaces   around  ", "one two three four five six seven eight nine ten " * 3]
PAIRS = ["the second text", "x", "loved it " * 40, "a pair", "word " * 5, "b", "c d e"]


def reference(tok, texts, pairs, max_length) -> dict[str, list]:
    ref = tok(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False,
              return_token_type_ids=None if pairs is not None else False)  # a pair's type ids where the model takes them
    full = tok(texts, pairs, truncation=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
    out = dict(ref)
    out["length"] = [len(x) for x in ref["input_ids"]]
    out["full_length"] = [len(x) for x in full["input_ids"]]
    return out


@pytest.fixture(params=["bert", "llama"])
def tokenizer(request, tiny_bert, tiny_llama):
    return load_tokenizer(tiny_bert if request.param == "bert" else tiny_llama)


@pytest.mark.parametrize("with_pairs", [False, True])
@pytest.mark.parametrize("max_length", [16, 64, 512])
def test_same_ids_as_the_transformers_call(tokenizer, with_pairs, max_length):
    pairs = PAIRS if with_pairs else None
    got = encode_ids(tokenizer, TEXTS, pairs, max_length)
    assert got == reference(tokenizer, TEXTS, pairs, max_length)
    assert any(n > max_length for n in got["full_length"]) or max_length == 512  # the cut path ran


def test_a_truncation_left_on_the_backend_does_not_cap_full_lengths(tiny_bert):
    tok = load_tokenizer(tiny_bert)
    tok(TEXTS, truncation=True, max_length=8)  # leaves truncation set on the Rust backend
    assert tok.backend_tokenizer.truncation is not None
    got = encode_ids(tok, TEXTS, None, 16)
    assert got == reference(tok, TEXTS, None, 16)
    assert max(got["full_length"]) > 80


def test_a_tokenizer_without_a_rust_backend_takes_the_transformers_call(tiny_bert):
    class NoBackend:  # what a Python-only tokenizer offers: the call
        def __init__(self, tok):
            self.tok, self.model_input_names = tok, tok.model_input_names

        def __call__(self, *args, **kwargs):
            return self.tok(*args, **kwargs)

    tok = load_tokenizer(tiny_bert)
    assert encode_ids(NoBackend(tok), TEXTS, PAIRS, 16) == reference(tok, TEXTS, PAIRS, 16)
