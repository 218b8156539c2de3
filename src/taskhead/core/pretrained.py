"""Where pretrained models come from: the Hub, a local directory, a directory inside an installed package, or a GGUF
file (converted once by core/gguf.py).

``pkg:NAME/sub/dir`` names a directory inside the installed Python package ``NAME`` without importing it, so a config
that uses a packaged model resolves on any machine where the package is installed (never an absolute path).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from taskhead.core.gguf import resolve_gguf
from taskhead.errors import TaskheadError


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``pkg:...`` into a directory path; check that something that looks like a local path exists."""
    if not name_or_path:
        raise TaskheadError("model_name_or_path is empty: set --model.model_name_or_path to a Hub id or a directory")
    if name_or_path in STORED:  # a checkpoint's own copy of the config and tokenizer (stored_source)
        return STORED[name_or_path]
    if name_or_path.startswith("pkg:"):
        package, _, sub = name_or_path[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TaskheadError(f"model '{name_or_path}': Python package '{package}' is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if not path.exists():
            raise TaskheadError(f"model '{name_or_path}': {path} does not exist inside package '{package}'")
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists() or name_or_path.count("/") > 1
    if looks_local:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise TaskheadError(f"model directory '{name_or_path}' does not exist")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():  # adapter: --merge false  # e.g. a run directory: its export (taskhead export) is the model
            raise TaskheadError(f"model directory '{name_or_path}' has no config.json: give a directory written by "
                                "save_pretrained or taskhead export")
        return str(path)
    return name_or_path  # a Hub id: transformers downloads (or reads its cache)


def trust_remote_code() -> bool:
    """Python files shipped with a model (``auto_map`` in its config) run only when the user opts in with
    ``TASKHEAD_TRUST_REMOTE_CODE=1``: one switch for every load (model, tokenizer, data, export, ``taskhead.load``)."""
    return os.environ.get("TASKHEAD_TRUST_REMOTE_CODE", "").lower() in ("1", "true", "yes")


OFFLINE_HINT = ("offline, use the configs in configs/offline/ (e.g. --config configs/imdb.yaml --config "
                "configs/offline/imdb.yaml), a local model directory, or local --data.*_file files")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    return any(os.environ.get(k, "").lower() in ("1", "on", "yes", "true") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (None when it can): one TCP connection, 3 s at most. Asked before
    any download so that a machine without network fails at once with a clear message instead of after the Hub
    client's retries and back-off."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"cannot connect to {url.hostname} ({e.strerror or type(e).__name__})"
    return None


def require_hub(what: str) -> None:
    """Stop at once with one line when ``what`` (a Hub model or dataset not in the local cache) needs the network."""
    why = hub_unreachable()
    if why:
        raise TaskheadError(f"{what} is not a local path and not in the local cache, and the Hub is out of reach "
                            f"({why}); {OFFLINE_HINT}")


def load_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained(resolved path, **kwargs)`` with a one-line error when the model cannot be loaded.

    A Hub id is looked up in the local cache first; only when it is not there is the network asked for, once."""
    name_or_path = resolve_gguf(name_or_path)  # a GGUF file (decoder-only LLMs): its converted safetensors directory
    path = resolve_model_path(name_or_path)
    is_hub_id = path == name_or_path and not Path(path).exists()
    try:
        if is_hub_id:
            try:
                return loader.from_pretrained(path, trust_remote_code=trust_remote_code(), local_files_only=True, **kwargs)
            except OSError:
                require_hub(f"'{name_or_path}'")
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code(), **kwargs)
    except (OSError, ValueError) as e:  # missing files, or files transformers cannot read (unknown model type, ...)
        if "trust_remote_code" in str(e):
            raise TaskheadError(f"'{name_or_path}' ships its own Python code (auto_map in its config); it runs only with "
                                "TASKHEAD_TRUST_REMOTE_CODE=1 set: read that code first") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskheadError(f"could not load '{name_or_path}' with {loader.__name__}: {first}") from None


def load_model(auto_class, name_or_path: str, **kwargs):
    """A pretrained model in training mode, like any fresh ``nn.Module`` (``from_pretrained`` returns eval mode,
    which would silently switch dropout off for the whole fit).

    transformers prints a table (its LOAD REPORT) for weights the checkpoint lacks, e.g. a new classification head;
    here that is one line naming the modules trained from scratch."""
    if name_or_path in STORED:
        return model_from_config(auto_class, STORED[name_or_path], **kwargs)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = load_pretrained(auto_class, name_or_path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    new = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
    if new:
        from lightning.pytorch.utilities import rank_zero_info

        shown = ", ".join(new[:6]) + (f" (+{len(new) - 6} more)" if len(new) > 6 else "")
        rank_zero_info(f"[model] {type(model).__name__} from '{name_or_path}': newly initialised (trained from scratch): {shown}")
    return model.train()


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token (see ``ensure_pad_token``)."""
    from transformers import AutoTokenizer

    tokenizer = ensure_pad_token(load_pretrained(AutoTokenizer, name_or_path))
    if name_or_path in STORED:
        tokenizer.name_or_path = name_or_path  # the model's name, not a temporary directory (cache keys, messages)
    return tokenizer


# ---- a checkpoint's own copy of its model's config and tokenizer (TaskModule.on_save_checkpoint stores it) ----------

STORED: dict[str, str] = {}  # model_name_or_path → a directory holding a checkpoint's config and tokenizer files


@contextlib.contextmanager
def stored_source(names: Iterable[str], files: dict[str, bytes]) -> Iterator[None]:
    """While open, the models named ``names`` load from ``files`` (``config.json``, the tokenizer's files) instead of
    the Hub, a directory or a package: the config and tokenizer are read from them, and ``load_model`` builds the model
    from the config alone (no pretrained weights read, no "newly initialised" report), for a checkpoint's weights
    to be loaded into. test/predict/export of a full fine-tune thus need only the checkpoint."""
    with tempfile.TemporaryDirectory(prefix="taskhead-source-") as d:
        for name, data in files.items():
            if Path(name).name != name or name in (".", ".."):  # file names only: nothing written outside
                raise TaskheadError(f"checkpoint: stored model file name {name!r} is not a plain file name")
            (Path(d) / name).write_bytes(data)
        before = dict(STORED)
        STORED.update(dict.fromkeys(names, d))
        try:
            yield
        finally:
            STORED.clear()
            STORED.update(before)


def model_from_config(model_class, directory: str, **config_kwargs):
    """``model_class`` (an ``AutoModelFor...`` or a model class) built from ``directory``'s config, in training mode;
    its weights are random until a checkpoint's are loaded."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(directory, **config_kwargs)
    build = getattr(model_class, "from_config", None) or model_class._from_config
    model = build(config)
    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.train()


def ensure_pad_token(tokenizer):
    """Decoder-only tokenizers (Llama, GPT-2, Qwen, ...) often have no pad token, and batching needs one: use EOS
    (then UNK). No token is added, so the embedding table keeps its size; padded positions are masked anyway."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    return tokenizer


def is_decoder_only(config) -> bool:
    """A causal LM family (Llama, Qwen, GPT-2, SmolLM, ...), not an encoder (BERT) nor an encoder-decoder (T5).
    BERT also has a causal-LM class, so "has a masked-LM class" is what marks an encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    kind = getattr(config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def set_pad_token_id(model, tokenizer) -> None:
    """The tokenizer's pad id into the model config (and generation config). ``*ForSequenceClassification`` of a
    decoder-only model finds each row's last real token from ``config.pad_token_id`` and fails on batches of more
    than one without it; a pad set on the tokenizer alone is lost on export (transformers #34055)."""
    if tokenizer.pad_token_id is None:
        raise TaskheadError(f"tokenizer '{tokenizer.name_or_path}' has no pad, eos or unk token to pad batches with")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
