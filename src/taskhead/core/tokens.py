"""Token ids for millions of rows: a fast tokenizer's Rust ``encode_batch_fast``, truncated the tokenizer's own way.

``tokenizer(texts)`` (transformers) runs the Rust ``encode_batch``, which also computes the character offsets of every
token, then converts each encoding into Python lists of every input it can return. Tokenising short rows that is a
quarter of a cold start's work more than the ids themselves (issue 18's profile: 90k IMDB windows, one process:
``encode_batch`` 5.6 s, conversion and writing another 1.5 s). ``encode_batch_fast`` is the same encoding without
offsets; only the ids (and a pair's type ids) are read back. What no library call gives in one pass is both the
untruncated length (the data report) and the truncated ids: every row is encoded once untruncated, and only the rows
over ``max_length`` again through the transformers call, so the cut is exactly the tokenizer's own (its strategy for
pairs, its special tokens kept).
"""

from __future__ import annotations


def encode_ids(tokenizer, texts: list[str], pairs: list[str] | None = None, max_length: int | None = None) -> dict[str, list]:
    """``input_ids`` (cut at ``max_length``), a pair's ``token_type_ids`` (for models that take them), ``length`` and
    ``full_length`` (tokens before the cut) per text, with the tokenizer's special tokens; the same ids as
    ``tokenizer(texts, pairs, truncation=True, max_length=max_length)``. A tokenizer without a Rust backend goes
    through that call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    types = pairs is not None and "token_type_ids" in tokenizer.model_input_names  # as the transformers call decides
    wanted = {"return_attention_mask": False, "return_token_type_ids": types, "verbose": False}
    if backend is None:
        enc = dict(tokenizer(texts, pairs, truncation=False, **wanted))
    else:
        if backend.truncation is not None:  # left set by an earlier transformers call with truncation
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        split = bool(getattr(tokenizer, "split_special_tokens", False))
        if backend.encode_special_tokens != split:  # as the transformers call sets it
            backend.encode_special_tokens = split
        encodings = backend.encode_batch_fast(list(zip(texts, pairs)) if pairs is not None else texts, add_special_tokens=True)
        enc = {"input_ids": [e.ids for e in encodings]}
        if types:
            enc["token_type_ids"] = [e.type_ids for e in encodings]
    full = [len(ids) for ids in enc["input_ids"]]
    long = [i for i, n in enumerate(full) if max_length is not None and n > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs is not None else None,
                        truncation=True, max_length=max_length, **wanted)
        for key, column in enc.items():
            for j, i in enumerate(long):
                column[i] = cut[key][j]
    enc["length"] = [len(ids) for ids in enc["input_ids"]]
    enc["full_length"] = full
    return enc
