"""Prediction, generation, memory and matmul measurements, plus the models they load (prepared once per run).

- ``predict-*``: ``taskhead.load(export)`` on raw text vs ``transformers.pipeline`` on the same export directory.
- ``generate-*``: taskhead's seq2seq predictor (length-sorted batches) vs plain ``model.generate`` on batches in input
  order, one GenerationConfig (the export's).
- ``memory-*``: peak RSS of ``taskhead fit`` (1 epoch) and ``taskhead test`` with a tiny BERT, small vs large data.
- ``matmul-*``: torch.matmul FLOP/s at the model's shapes: the denominator of MFU.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from throughput_lib import MINILM, Stopwatch, current_rss_mb, work_files

NER_TYPES = {"LOC", "MISC", "ORG", "PER"}


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- models every run prepares once ------------------------------------------------------------------------------------


def prepare_models(s: dict, work: Path, names: list[str]) -> dict:
    """Untrained exports (random heads, seeded) for prediction/generation and a tiny BERT for the memory runs."""
    from taskhead.core.pretrained import load_tokenizer

    f, made = work_files(work), {}
    if any(n.startswith("predict-imdb") for n in names):
        from taskhead.tasks.classification import ClassificationModule

        torch.manual_seed(0)
        m = ClassificationModule(MINILM, label_names=["neg", "pos"], max_length=s["predict"]["imdb"]["max_length"])
        made["export_imdb"] = str(m.export(f["export_imdb"], load_tokenizer(MINILM)))
    if any(n.startswith("predict-conll") for n in names):
        from taskhead.tasks.ner import NerModule
        from taskhead.tasks.ner_tags import iob2_label_names

        torch.manual_seed(0)
        m = NerModule(MINILM, label_names=iob2_label_names(NER_TYPES), max_length=s["predict"]["conll"]["max_length"])
        made["export_conll"] = str(m.export(f["export_conll"], load_tokenizer(MINILM)))
    if any(n.startswith("generate") for n in names):
        from taskhead.tasks.seq2seq import Seq2SeqModule

        g = s["generate"]
        torch.manual_seed(0)
        m = Seq2SeqModule(MINILM, architecture="encoder_decoder", source_prefix="", max_length=g["max_length"],
                          generation={"num_beams": 1, "max_new_tokens": g["max_new_tokens"], "no_repeat_ngram_size": 0,
                                      "early_stopping": False})
        made["export_s2s"] = str(m.export(f["export_s2s"], m.tokenizer))
    if any(n.startswith("memory") for n in names):  # tests/conftest.py's tiny_bert
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        tok = load_tokenizer(MINILM)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)
        BertModel(cfg).save_pretrained(f["tiny_bert"])
        tok.save_pretrained(f["tiny_bert"])
        made["tiny_bert"] = str(f["tiny_bert"])
    return made


# ---- prediction on raw text ------------------------------------------------------------------------------------------


def count_tokens(tok, texts: list[str], max_length: int) -> int:
    return sum(len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"])


def predict(task: str, precision: str, variant: str, s: dict, work: Path) -> dict:
    c, f = s["predict"][task], work_files(work)
    texts = json.loads(f[f"{task}_predict"].read_text())
    export = f[f"export_{task}"]
    B = c["batch_size"]
    if variant == "taskhead":
        import taskhead

        predictor = taskhead.load(export)
        tok = predictor.tokenizer

        def call(items):
            return predictor(items, batch_size=B)

        how = f"taskhead.load(export)(texts, batch_size={B}): length-sorted batches, truncation at the module's max_length"
    else:
        from transformers import AutoTokenizer, pipeline

        tok = AutoTokenizer.from_pretrained(export)
        if task == "imdb":
            pipe = pipeline("text-classification", model=str(export), tokenizer=tok)

            def call(items):
                return pipe(items, batch_size=B, truncation=True, max_length=c["max_length"])

            how = f"pipeline('text-classification')(texts, batch_size={B}, truncation=True, max_length={c['max_length']})"
        else:
            tok.model_max_length = c["max_length"]  # the token-classification pipeline truncates at model_max_length
            pipe = pipeline("token-classification", model=str(export), tokenizer=tok, aggregation_strategy="simple")

            def call(items):
                return pipe(items, batch_size=B)

            how = (f"pipeline('token-classification', aggregation_strategy='simple')(texts, batch_size={B}); "
                   f"tokenizer.model_max_length={c['max_length']}")
    tokens = count_tokens(tok, texts, c["max_length"])
    with autocast(precision):
        call(texts[:B])  # warm-up: one batch, not timed
        with Stopwatch() as sw:
            out = call(texts)
    if task == "imdb":
        labels = [o["label"] for o in out]
    else:  # entity spans (type, start, end) per text
        labels = [[(e.get("type") or e.get("entity_group"), e["start"], e["end"]) for e in ents] for ents in out]
    (work / f"pred-{task}-{precision}-{variant}.json").write_text(json.dumps(labels))
    return {"items": len(texts), "batch_size": B, "seconds": sw.seconds, "items_per_s": len(texts) / sw.seconds,
            "real_tokens": tokens, "tokens_per_s": tokens / sw.seconds, "how": how, "torch_threads": torch.get_num_threads()}


# ---- generation --------------------------------------------------------------------------------------------------------


def generate(variant: str, s: dict, work: Path) -> dict:
    g, f = s["generate"], work_files(work)
    docs = json.loads(f["xsum_docs"].read_text())
    B = g["batch_size"]
    if variant == "taskhead":
        import taskhead

        predictor = taskhead.load(f["export_s2s"])
        gen_config = predictor.module.gen_config

        def call(items):
            return predictor(items, batch_size=B)

        how = f"taskhead.load(export)(documents, batch_size={B}): length-sorted batches"
    else:
        from transformers import AutoTokenizer, EncoderDecoderModel, GenerationConfig

        tok = AutoTokenizer.from_pretrained(f["export_s2s"])
        model = EncoderDecoderModel.from_pretrained(f["export_s2s"]).eval()
        gen_config = GenerationConfig.from_pretrained(f["export_s2s"])

        def call(items):
            texts = []
            for i in range(0, len(items), B):  # batches in input order
                enc = tok(items[i : i + B], truncation=True, max_length=g["max_length"], padding=True, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**enc, generation_config=gen_config)
                texts += [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)]
            return texts

        how = f"model.generate on batches of {B} in input order, padding=True, truncation at {g['max_length']}"
    call(docs[:B])  # warm-up: one batch, not timed
    with Stopwatch() as sw:
        texts = call(docs)
    (work / f"gen-{variant}.json").write_text(json.dumps(texts))
    return {"items": len(docs), "batch_size": B, "seconds": sw.seconds, "items_per_s": len(docs) / sw.seconds,
            "generation_config": gen_config.to_diff_dict(), "how": how, "torch_threads": torch.get_num_threads()}


# ---- memory: taskhead fit / test on small vs large data --------------------------------------------------------------------


def memory(size: str, stage: str, s: dict, work: Path) -> dict:
    from taskhead.cli import run_cli

    f, m = work_files(work), s["memory"]
    args = [
        stage, "--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml",
        "--model.model_name_or_path", str(f["tiny_bert"]),
        "--data.train_file", str(work / f"mem_{size}_train.jsonl"),
        "--data.test_file", str(work / f"mem_{size}_test.jsonl"),
        "--data.max_length", str(m["max_length"]),
        "--data.cache_dir", str(work / f"cache-mem-{size}-{stage}"),  # tokenised fresh in every run
        "--trainer.default_root_dir", str(work / "runs-mem"),
    ]
    if stage == "fit":
        args += ["--trainer.max_epochs", "1"]
    error = None
    with Stopwatch() as sw:
        try:
            run_cli(args)
        except Exception as e:  # keep the peak RSS so far, and say the run did not finish
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    out = {"examples": m[size], "stage": stage, "seconds": sw.seconds, "rss_at_end_mb": current_rss_mb(),
           "command": "taskhead " + " ".join(args), "torch_threads": torch.get_num_threads()}
    if error:
        out["error_during_run"] = error
    return out


# ---- matmul FLOP/s at the model's shapes -----------------------------------------------------------------------------------


def matmul(precision: str, s: dict, work: Path) -> dict:
    from transformers import AutoConfig

    from taskhead.core.pretrained import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(MINILM))
    h, ff, n = cfg.hidden_size, cfg.intermediate_size, s["matmul"]["rows"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rates = {}
    # Per layer and token the forward does 4 h*h (Q, K, V, output), h*ff and ff*h multiply-adds: equal thirds of FLOPs.
    for k, m in ((h, h), (h, ff), (ff, h)):
        a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < s["matmul"]["seconds"]:
            a @ b
            reps += 1
        rates[f"({n},{k})x({k},{m})"] = 2.0 * n * k * m * reps / (time.perf_counter() - t0)
    combined = len(rates) / sum(1.0 / r for r in rates.values())  # equal FLOP shares: harmonic mean
    return {"dtype": str(dtype), "rates_flops_per_s": rates, "combined_flops_per_s": combined,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def run(name: str, s: dict, work: Path) -> dict:
    kind, *rest = name.split("-")
    if kind == "predict":
        return predict(rest[0], rest[1], rest[2], s, work)
    if kind == "generate":
        return generate(rest[0], s, work)
    if kind == "memory":
        return memory(rest[0], rest[1], s, work)
    if kind == "matmul":
        return matmul(rest[0], s, work)
    raise ValueError(name)
