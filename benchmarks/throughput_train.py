"""Training throughput: one optimiser-step loop, four ways, on the same subset, model, hyper-parameters and steps.

1. ``taskhead``: the real CLI (shipped config + offline config), in-process via ``taskhead.cli.run_cli``, with a
   :class:`StepTimer` callback added through ``--trainer.callbacks+=``.
2. ``hf-default``: ``transformers.Trainer`` set up the way the HF example scripts set it up by default (run_glue.py:
   ``pad_to_max_length=True`` + ``default_data_collator``; run_ner.py: ``pad_to_max_length=False`` +
   ``DataCollatorForTokenClassification``), random sampler.
3. ``hf-tuned``: the same Trainer with dynamic padding and ``train_sampling_strategy="group_by_length"``.
4. ``plain``: a bare PyTorch loop over the very batches taskhead's DataModule yields, with the AdamW that taskhead's
   ``build_optimizer`` makes: the framework-overhead floor.

Every variant times each step's end with ``perf_counter`` and counts the batch's real tokens (attention_mask == 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from transformers import TrainerCallback

from throughput_lib import MINILM, ROOT, current_rss_mb, model_dims, summarize_steps, watch_matmul_dtype, work_files

CONFIGS = {
    "imdb": ["--config", "configs/imdb.yaml", "--config", "configs/offline/imdb.yaml"],
    "conll": ["--config", "configs/conll2003.yaml", "--config", "configs/offline/conll2003.yaml"],
}


def batch_record(mask: torch.Tensor) -> dict:
    return {"samples": int(mask.shape[0]), "tokens": int(mask.sum()), "padded": int(mask.numel()), "seq_len": int(mask.shape[1])}


def warmup_steps_for(total: int, ratio: float) -> int:
    return int(ratio * total)  # taskhead's build_scheduler: int(warmup_ratio * total_steps)


# ---- 1. taskhead ------------------------------------------------------------------------------------------------------


class StepTimer(L.Callback):
    """perf_counter at the end of every training batch (after the optimiser step) and the batch's token counts.

    Keeps what the summary needs (model dims, optimiser, callbacks) itself, so that a failure after the measured window
    (e.g. while saving the end-of-epoch checkpoint) does not lose the measurement."""

    instances: list[StepTimer] = []

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.info: dict = {}
        self.stats_mismatches = 0  # batches whose collate count (batch["stats"]["tokens"]) differs from the mask's
        self.matmul_dtype: dict = {}
        StepTimer.instances.append(self)

    def on_train_start(self, trainer, pl_module) -> None:
        self.matmul_dtype = watch_matmul_dtype(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = batch_record(batch["inputs"]["attention_mask"])
        self.steps.append({"t": time.perf_counter(), **rec, "rss_mb": current_rss_mb()})
        self.stats_mismatches += batch.get("stats", {}).get("tokens", rec["tokens"]) != rec["tokens"]
        if not self.info:
            opt = trainer.optimizers[0]
            self.info = {
                "dims": model_dims(pl_module.model),
                "optimizer": f"{type(opt).__name__} ({len(opt.param_groups)} param groups), "
                             f"foreach={opt.defaults.get('foreach')}, fused={opt.defaults.get('fused')}",
                "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
                "precision": str(trainer.precision),
            }


def taskhead_args(task: str, precision: str, s: dict, work: Path) -> list[str]:
    c, f = s["train"][task], work_files(work)
    return [
        "fit", *CONFIGS[task],
        "--trainer.max_steps", str(c["warmup_steps"] + c["measured_steps"]),
        "--trainer.precision", "bf16-mixed" if precision == "bf16" else "32-true",
        "--trainer.limit_val_batches", "0",           # no validation (and so no sanity check)
        "--trainer.default_root_dir", str(work / "runs"),  # the default TensorBoard logger, in the work dir
        "--trainer.callbacks+=throughput_train.StepTimer",
        "--checkpoint.save_top_k", "0",               # no checkpoint files (enable_checkpointing false conflicts
        "--checkpoint.save_last", "false",            # with the ModelCheckpoint the CLI always adds)
        "--data.train_file", str(f[f"{task}_train"]),
        "--data.validation_file", str(f[f"{task}_val"]),  # tiny: only so that no 10% of the subset is held out
        "--data.max_length", str(c["max_length"]),
        "--data.batch_size", str(c["batch_size"]),
        "--data.cache_dir", str(f["cache"]),
    ]


def train_taskhead(task: str, precision: str, s: dict, work: Path) -> dict:
    from taskhead.cli import run_cli

    c = s["train"][task]
    args = taskhead_args(task, precision, s, work)
    error = None
    try:
        run_cli(args)
    except Exception as e:  # after the window (teardown, checkpoint): keep the measurement, report the error
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    timer = StepTimer.instances[-1] if StepTimer.instances else None
    if timer is None or len(timer.steps) < c["warmup_steps"] + c["measured_steps"]:
        raise RuntimeError(f"taskhead fit stopped before the measured window ended: {error}")
    out = summarize_steps(timer.steps, c["warmup_steps"], c["measured_steps"], timer.info["dims"])
    out["setup"] = {
        "command": "taskhead " + " ".join(args),
        "optimizer": timer.info["optimizer"],
        "precision": timer.info["precision"],
        "matmul_dtype": timer.matmul_dtype.get("dtype"),
        "batches": "taskhead LengthGroupedBatchSampler (mega-batches of 50 batches sorted by length, batch order shuffled), dynamic padding",
        "callbacks": timer.info["callbacks"],
        "stats_tokens_mismatches": timer.stats_mismatches,
        "torch_threads": torch.get_num_threads(),
    }
    if error:
        out["error_after_window"] = error
    return out


# ---- 2./3. Hugging Face Trainer --------------------------------------------------------------------------------------


class HFStepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[tuple[float, float | None]] = []  # (perf_counter, RSS MB) at each optimiser step's end

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((time.perf_counter(), current_rss_mb()))


def conll_examples(path: Path) -> tuple[list[list[str]], list[list[int]], list[str]]:
    """Words, IOB2 tag ids and the label set, with taskhead's own conversions (IOB1 → IOB2, label order)."""
    from taskhead.tasks.ner_tags import iob2_label_names, read_conll, to_iob2

    sents = [rec["rows"] for _, rec in read_conll(path)]
    words = [[c[0] for c in rows] for rows in sents]
    tags = [to_iob2([c[-1] for c in rows]) for rows in sents]
    names = iob2_label_names({t[2:] for ts in tags for t in ts if t != "O"})
    index = {n: i for i, n in enumerate(names)}
    return words, [[index[t] for t in ts] for ts in tags], names


def hf_dataset(task: str, tuned: bool, tok, c: dict, work: Path):
    """(dataset, collator, label names, note) built the way the HF example scripts build them."""
    import datasets
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, default_data_collator

    from throughput_lib import read_jsonl

    f = work_files(work)
    if task == "imdb":  # run_glue.py: preprocess_function
        rows = read_jsonl(f["imdb_train"])
        padding = False if tuned else "max_length"  # run_glue's pad_to_max_length defaults to True
        enc = tok([r["text"] for r in rows], padding=padding, max_length=c["max_length"], truncation=True)
        ds = datasets.Dataset.from_dict({**enc, "label": [r["label"] for r in rows]})
        collator = DataCollatorWithPadding(tok) if tuned else default_data_collator
        note = "dynamic padding (DataCollatorWithPadding)" if tuned else "run_glue default: padding='max_length' + default_data_collator"
        return ds, collator, ["neg", "pos"], note
    words, tag_ids, names = conll_examples(f["conll_train"])  # run_ner.py: tokenize_and_align_labels
    enc = tok(words, padding=False, truncation=True, max_length=c["max_length"], is_split_into_words=True)
    labels = []
    for i, tags in enumerate(tag_ids):
        prev, row = None, []
        for w in enc.word_ids(batch_index=i):
            row.append(-100 if w is None or w == prev else tags[w])
            prev = w
        labels.append(row)
    ds = datasets.Dataset.from_dict({**enc, "labels": labels})
    note = "run_ner default: pad_to_max_length=False, DataCollatorForTokenClassification (dynamic padding)"
    return ds, DataCollatorForTokenClassification(tok), names, note


def train_hf(task: str, precision: str, tuned: bool, s: dict, work: Path) -> dict:
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              Trainer, TrainingArguments)

    from taskhead.core.module import label_maps
    from taskhead.core.pretrained import resolve_model_path

    c, o = s["train"][task], s["optim"]
    path = resolve_model_path(MINILM)
    tok = AutoTokenizer.from_pretrained(path)
    ds, collator, names, note = hf_dataset(task, tuned, tok, c, work)
    auto = AutoModelForSequenceClassification if task == "imdb" else AutoModelForTokenClassification
    torch.manual_seed(o["seed"])
    model = auto.from_pretrained(path, **label_maps(names))
    records: list[dict] = []

    def counting_collator(features):  # called once per batch, in step order (num_workers=0)
        batch = collator(features)
        records.append(batch_record(batch["attention_mask"]))
        return batch

    total = c["warmup_steps"] + c["measured_steps"]
    args = TrainingArguments(
        output_dir=str(work / "hf-out"),
        max_steps=total,
        per_device_train_batch_size=c["batch_size"],
        learning_rate=o["lr"],
        weight_decay=o["weight_decay"],
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps_for(total, o["warmup_ratio"]),  # an int >= 1 is a step count, 0 is none
        max_grad_norm=o["max_grad_norm"],
        bf16=precision == "bf16",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        seed=o["seed"],
        train_sampling_strategy="group_by_length" if tuned else "random",
    )
    timer = HFStepTimer()
    matmul_dtype = watch_matmul_dtype(model)  # accelerate adds the autocast when train() prepares the model
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting_collator,
                      processing_class=tok, callbacks=[timer])
    trainer.train()
    if len(timer.times) != total or len(records) < total:
        raise RuntimeError(f"{len(timer.times)} steps timed, {len(records)} batches collated; expected {total}")
    steps = [{"t": t, **r, "rss_mb": rss} for (t, rss), r in zip(timer.times, records)]
    out = summarize_steps(steps, c["warmup_steps"], c["measured_steps"], model_dims(model))
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    out["setup"] = {
        "data": note,
        "sampler": args.train_sampling_strategy,
        "matmul_dtype": matmul_dtype.get("dtype"),
        "optimizer": f"{type(opt).__name__} (optim={getattr(args.optim, 'value', args.optim)}), "
                     f"foreach={opt.defaults.get('foreach')}, fused={opt.defaults.get('fused')}",
        "torch_threads": torch.get_num_threads(),
    }
    return out


# ---- 4. plain PyTorch loop over taskhead's batches -------------------------------------------------------------------


def taskhead_datamodule(task: str, s: dict, work: Path):
    """taskhead's DataModule with the options the CLI run gets (shipped config + offline config + the overrides)."""
    c, f = s["train"][task], work_files(work)
    common = dict(model_name_or_path=MINILM, dataset_name=None, train_file=str(f[f"{task}_train"]),
                  validation_file=str(f[f"{task}_val"]), max_length=c["max_length"], batch_size=c["batch_size"],
                  cache_dir=str(f["cache"]))
    if task == "imdb":
        from taskhead.tasks.classification import ClassificationDataModule

        return ClassificationDataModule(text_field="text", label_field="label", label_names=["neg", "pos"],
                                        test_file=str(ROOT.parent / "shared/data/imdb/test.jsonl"), **common)
    from taskhead.tasks.ner import NerDataModule

    return NerDataModule(tag_scheme="iob1", tag_column=-1, label_names=None,
                         test_file=str(ROOT.parent / "shared/data/conll2003/eng.testb"), **common)


def train_plain(task: str, precision: str, s: dict, work: Path) -> dict:
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, get_linear_schedule_with_warmup

    from taskhead.core.module import label_maps
    from taskhead.core.optim import OptimizerConfig, build_optimizer
    from taskhead.core.pretrained import resolve_model_path

    c, o = s["train"][task], s["optim"]
    torch.manual_seed(o["seed"])
    dm = taskhead_datamodule(task, s, work)
    dm.setup("fit")
    loader = dm.train_dataloader()
    auto = AutoModelForSequenceClassification if task == "imdb" else AutoModelForTokenClassification
    model = auto.from_pretrained(resolve_model_path(MINILM), **label_maps(dm.label_names)).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    # taskhead's own builder: the same AdamW implementation (fused or per-tensor loop) as the taskhead run, so that
    # the difference between the two is the framework, not the optimiser kernel
    opt = build_optimizer(groups, OptimizerConfig(lr=o["lr"], weight_decay=o["weight_decay"]))
    total = c["warmup_steps"] + c["measured_steps"]
    sched = get_linear_schedule_with_warmup(opt, warmup_steps_for(total, o["warmup_ratio"]), total)
    bf16 = precision == "bf16"
    matmul_dtype = watch_matmul_dtype(model)
    steps, phases = [], []
    t_end = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == total:
            break
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch["inputs"]).logits  # (batch, num_labels) or (batch, seq, num_labels)
            loss = F.cross_entropy(logits.flatten(0, -2), batch["labels"].flatten())  # -100 ignored
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["max_grad_norm"])
        t3 = time.perf_counter()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        steps.append({"t": t4, **batch_record(batch["inputs"]["attention_mask"]), "rss_mb": current_rss_mb()})
        phases.append({"data": t0 - t_end, "forward": t1 - t0, "backward": t2 - t1, "clip": t3 - t2, "optimizer": t4 - t3})
        t_end = t4
    out = summarize_steps(steps, c["warmup_steps"], c["measured_steps"], model_dims(model))
    window = phases[c["warmup_steps"] :]
    out["phases_s"] = {k: sum(p[k] for p in window) for k in window[0]}  # where the measured time went
    out["setup"] = {
        "optimizer": f"AdamW (2 param groups), foreach={opt.defaults.get('foreach')}, fused={opt.defaults.get('fused')}",
        "batches": "taskhead's train_dataloader() (same seed: the very batches the taskhead run trains on)",
        "matmul_dtype": matmul_dtype.get("dtype"),
        "torch_threads": torch.get_num_threads(),
    }
    return out


def run(name: str, s: dict, work: Path) -> dict:
    _, task, precision, variant = name.split("-", 3)
    if variant == "taskhead":
        return train_taskhead(task, precision, s, work)
    if variant == "plain":
        return train_plain(task, precision, s, work)
    return train_hf(task, precision, variant == "hf-tuned", s, work)
