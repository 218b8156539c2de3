"""The model card (``README.md``) every export carries: what was trained, on which files, how well, how to load it.

Two halves. ``core/run_facts.py`` is the only part that reads files: the checkpoint's own state, and, when the
checkpoint sits in a run directory (``<run>/checkpoints/x.ckpt``), the run's ``manifest.json``, ``config.yaml`` and
the test ``metrics.json``; everything it finds goes into one plain dict. This file turns that dict into the card
(:func:`card_data`, :func:`render_card`); it is pure, so a card can be checked from a hand-written dict. Nothing is
guessed: a fact that is not on disk is left out of the metadata and named as unknown in the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# Task module class → (Hub task id, what the card calls the task). The Hub id doubles as ``pipeline_tag`` when the
# export keeps the backbone's own head; multiple choice has no pipeline, so it never gets one.
TASKS: dict[str, tuple[str, str]] = {
    "ClassificationModule": ("text-classification", "Text classification"),
    "NerModule": ("token-classification", "Token classification (named entities, IOB2)"),
    "QAModule": ("question-answering", "Extractive question answering"),
    "MultipleChoiceModule": ("multiple-choice", "Multiple choice"),
    "Seq2SeqModule": ("text2text-generation", "Sequence to sequence generation"),
}
NO_PIPELINE = {"multiple-choice"}
# How the pipeline-compatible exports load with transformers alone. transformers 5 dropped the question-answering,
# summarization and translation pipelines; their Auto class is the way that works on every version.
AUTO_CLASS = {
    "question-answering": "AutoModelForQuestionAnswering",
    "summarization": "AutoModelForSeq2SeqLM",
    "translation": "AutoModelForSeq2SeqLM",
    "text-generation": "AutoModelForCausalLM",
}
METRIC_TYPES = {"acc": "accuracy", "accuracy": "accuracy", "em": "exact_match", "exact_match": "exact_match"}


# ---- facts → card (pure) ---------------------------------------------------------------------------------------------

EXAMPLES = {  # how each task's predictor is called on raw input
    "text-classification": 'predictor(["a wonderful film", "dull and far too long"])  # [{"label", "score", "probabilities"}]',
    ("text-classification", "multi_label"): 'predictor(["a wonderful film"])  # [{"labels": [names above the threshold], "scores": {name: p}}]',
    ("text-classification", "regression"): 'predictor(["a wonderful film"])  # [{"score"}]',
    "token-classification": 'predictor(["Angela Merkel visited Paris."])  # per text: [{"type", "text", "start", "end", "score"}]',
    "question-answering": 'predictor(question="Who visited Paris?", context="Angela Merkel visited Paris.")  # {"answer", "start", "end", "score"}',
    "multiple-choice": 'predictor(context="She opened the fridge and", choices=["took out the milk.", "flew away."])',
}


def task_kind(facts: dict) -> tuple[str, str, str | None]:
    """(Hub task id, task title, pipeline tag or None). The pipeline tag is the Hub task only when the export keeps
    the backbone's own head (a custom head needs taskhead to load); a decoder-only model loads as text generation."""
    hp = facts.get("hparams", {})
    cls = facts.get("task", "").rpartition(".")[2]
    task, title = TASKS.get(cls, ("", cls or "unknown task"))
    if cls == "Seq2SeqModule":
        task, title = {"rouge": ("summarization", "Summarization"), "bleu": ("translation", "Translation")}.get(hp.get("metric"), (task, title))
    pipeline = task if task and task not in NO_PIPELINE and hp.get("head") is None else None
    if cls == "Seq2SeqModule" and hp.get("architecture") == "causal":
        pipeline = "text-generation"
    return task, title, pipeline


def metric_type(key: str) -> str:
    """``val/f1_macro`` → ``f1``, ``test/acc`` → ``accuracy``, ``val/rougeL`` → ``rouge``: the Hub's metric ids."""
    name = key.split("/")[-1]
    if name in METRIC_TYPES:
        return METRIC_TYPES[name]
    return next((p for p in ("rouge", "f1", "precision", "recall", "chrf") if name.startswith(p)), name)


def _dataset(data: dict, split: str) -> dict:
    if data.get("dataset_name"):
        return {"dataset_type": data["dataset_name"], "dataset_name": data["dataset_name"],
                "dataset_config": data.get("dataset_config"), "dataset_split": split}
    file = data.get(f"{split}_file")
    if split == "validation" and not file and data.get("train_file"):
        name = f"{Path(data['train_file']).name} (val_split {data.get('val_split')})"
    else:
        name = Path(file).name if file else "local files"
    return {"dataset_type": "local", "dataset_name": name, "dataset_split": split}


def eval_results(facts: dict) -> list:
    """model-index entries: the monitored validation metric when it is this checkpoint's own, and every top-level
    ``test/<name>`` metric (per-label ones stay in the text). Names are taskhead's keys, values unrounded."""
    from huggingface_hub import EvalResult

    task, title, _ = task_kind(facts)
    val = facts.get("validation")
    scored = [("validation", val["monitor"], val["value"])] if val and val["own"] else []
    scored += [("test", k, v) for k, v in facts.get("test_metrics", {}).items() if k.count("/") == 1 and isinstance(v, (int, float))]
    return [EvalResult(task_type=task or "other", task_name=title, **_dataset(facts.get("data", {}), split),
                       metric_type=metric_type(key), metric_name=key, metric_value=value) for split, key, value in scored]


def card_data(facts: dict, model_name: str):
    """The card's YAML metadata as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    task, _, pipeline = task_kind(facts)
    results = eval_results(facts)
    custom = facts.get("hparams", {}).get("head") is not None
    return ModelCardData(
        base_model=facts.get("base_model"),
        library_name="peft" if facts.get("adapter") else "transformers",
        pipeline_tag=pipeline,
        tags=["taskhead", *([task] if task else []), *(["custom-head"] if custom else [])],
        datasets=[facts["data"]["dataset_name"]] if facts.get("data", {}).get("dataset_name") else None,
        model_name=model_name if results else None,
        eval_results=results or None,
        **facts.get("base", {}),
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _data_section(facts: dict) -> list[str]:
    data, manifest = facts.get("data", {}), facts.get("manifest") or {}
    lines = ["## Training data"]
    if data.get("dataset_name"):
        config = f" (config `{data['dataset_config']}`)" if data.get("dataset_config") else ""
        lines += ["", f"Hub dataset [`{data['dataset_name']}`](https://huggingface.co/datasets/{data['dataset_name']}){config}."]
    files = manifest.get("data_files") or {}
    if files:
        lines += ["", "| split | file | sha256 |", "|---|---|---|"]
        lines += [f"| {split} | `{Path(f['path']).name}` | `{f['sha256']}` |" for split, f in files.items()]
        lines += ["", "Paths on the training machine: " + ", ".join(f"`{f['path']}`" for f in files.values()) + "."]
    elif not manifest:
        known = {s: data[f"{s}_file"] for s in ("train", "validation", "test") if data.get(f"{s}_file")}
        if known:
            lines += ["", *(f"- {s}: `{p}`" for s, p in known.items())]
        lines += ["", "sha256 of the data files: unknown (no `manifest.json` beside the checkpoint's run)."]
    elif not data.get("dataset_name"):
        lines += ["", "The run's manifest lists no data files."]
    held_out = f"`val_split: {data.get('val_split')}` of the training data held out (seed {data.get('seed')})"
    if data.get("dataset_name") and not data.get("validation_file"):  # which one applied is not recorded
        lines += ["", f"Validation: the dataset's validation split, or where it has none, {held_out}."]
    elif data.get("train_file") and not data.get("validation_file") and data.get("val_split"):
        lines += ["", f"Validation: {held_out}."]
    if data.get("max_train_samples"):
        lines += ["", f"Training used only the first {data['max_train_samples']} examples (`max_train_samples`)."]
    return lines + [""]


def _eval_section(facts: dict) -> list[str]:
    ck, val = facts.get("checkpoint", {}), facts.get("validation")
    lines = ["## Evaluation", "", f"Exported checkpoint: `{ck.get('name')}` (epoch {ck.get('epoch')}, step {ck.get('global_step')}).", ""]
    if val and val["own"]:
        lines.append(f"Validation `{val['monitor']}` of this checkpoint: **{_fmt(val['value'])}** (monitored, mode {val['mode']}).")
    elif val:
        lines.append(f"This checkpoint's own validation score was not recorded; the run's best `{val['monitor']}` when it "
                     f"was saved: {_fmt(val['value'])} (`{val['best']}`).")
    else:
        lines.append("No monitored validation metric is recorded in the checkpoint.")
    metrics = facts.get("test_metrics") or {}
    if metrics:
        lines += ["", f"Test metrics (from `{facts.get('test_metrics_file')}`):", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines += ["", "No test metrics were found for this checkpoint (`taskhead test --ckpt_path CKPT` writes them)."]
    return lines + [""]


def _usage_section(facts: dict, location: str, repo_id: str | None) -> list[str]:
    task, _, pipeline = task_kind(facts)
    hp = facts.get("hparams", {})
    example = EXAMPLES.get((task, hp.get("problem_type")), EXAMPLES.get(task, 'predictor(["Some text to process."])  # generated text'))
    lines = ["## How to use", "", "With taskhead:", "", "```python", "import taskhead", ""]
    if repo_id:
        lines += ["from huggingface_hub import snapshot_download", "",
                  f'predictor = taskhead.load(snapshot_download("{repo_id}"))']
    else:
        lines.append(f'predictor = taskhead.load("{location}")')
    lines += [example, "```", ""]
    if pipeline in ("text-classification", "token-classification"):
        extra = ', aggregation_strategy="first"' if pipeline == "token-classification" else ""
        lines += ["With transformers alone:", "", "```python", "from transformers import pipeline", "",
                  f'pipe = pipeline("{pipeline}", model="{repo_id or location}"{extra})', "```", ""]
    elif pipeline in AUTO_CLASS:
        lines += ["With transformers alone (transformers 4.x also has `pipeline(\"" + pipeline + "\")`; 5.x dropped it):", "",
                  "```python", f"from transformers import AutoTokenizer, {AUTO_CLASS[pipeline]}", "",
                  f'model = {AUTO_CLASS[pipeline]}.from_pretrained("{repo_id or location}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id or location}")', "```", ""]
        if hp.get("source_prefix") or hp.get("architecture") == "causal":
            lines += [f"Inputs must be formatted as in training: prefix {hp.get('source_prefix', '')!r}"
                      + (f", separator {hp.get('separator')!r} after the source." if hp.get("architecture") == "causal" else "."), ""]
    elif hp.get("head") is not None:
        lines += ["The head is taskhead's own (`head.safetensors`): transformers alone loads only the backbone.", ""]
    return lines


def _limitations(facts: dict) -> list[str]:
    hp, base = facts.get("hparams", {}), facts.get("base", {})
    out = ["## Limitations", "",
           "- Scores hold for the evaluation data above; other domains, languages or text lengths will differ.",
           f"- Inherits the limitations and biases of the base model (`{facts.get('source')}`) and of the training data."]
    if hp.get("max_length") and task_kind(facts)[0] == "question-answering":
        out.append(f"- Contexts longer than {hp['max_length']} tokens are read in overlapping windows; answers are single spans.")
    elif hp.get("max_length"):
        out.append(f"- Inputs longer than {hp['max_length']} tokens are truncated.")
    if hp.get("label_names"):
        out.append(f"- Predicts only the {len(hp['label_names'])} labels it was trained on.")
    if not facts.get("manifest"):
        out.append("- The training data's provenance is partly unknown: the checkpoint had no run manifest beside it.")
    if not base.get("license"):
        out.append("- The base model's license could not be read: check it before using or sharing this model.")
    return out + [""]


def render_card(facts: dict, model_name: str, location: str, repo_id: str | None = None) -> str:
    """The README.md text: YAML metadata (:func:`card_data`) and the sections a reader needs."""
    task, title, _ = task_kind(facts)
    hp, source = facts.get("hparams", {}), facts.get("source", "")
    link = f"[`{source}`](https://huggingface.co/{source})" if facts.get("base_model") else f"`{source}` (a local or packaged model, not a Hub id)"
    lines = [f"# {model_name}", "", f"{title} model fine-tuned from {link} with taskhead {facts.get('taskhead_version') or ''}.".replace(" .", "."), "",
             "## Task", "", f"- Task: {title} (`{facts.get('task')}`)"]
    if hp.get("head") is None and "head" in hp:
        lines.append("- Head: the backbone family's own (standard transformers model)")
    elif hp.get("head") is not None:
        lines.append(f"- Head: custom, `{json.dumps(hp['head'])}` (weights in `head.safetensors`)")
    if hp.get("peft"):
        lora = f"LoRA (r={hp['peft'].get('r')}, alpha={hp['peft'].get('alpha')}, targets `{hp['peft'].get('target_modules')}`)"
        lines.append(f"- Fine-tuning: {lora}; " + ("this directory is the adapter (`adapter_config.json`), loaded on top of "
                     "the base model by `taskhead.load` or `peft.PeftModel.from_pretrained`" if facts.get("adapter")
                     else "merged into the weights: a plain transformers model"))
    if hp.get("label_names"):
        lines.append(f"- Labels ({len(hp['label_names'])}): " + ", ".join(f"`{n}`" for n in hp["label_names"]))
    if hp.get("num_choices"):
        lines.append(f"- Choices per example: {hp['num_choices']}")
    if hp.get("source_prefix"):
        lines.append(f"- Source prefix: `{hp['source_prefix']}`")
    lines += [""] + _data_section(facts) + _eval_section(facts) + _usage_section(facts, location, repo_id)
    if facts.get("config_yaml"):
        lines += ["## Training configuration", "", "The run's `config.yaml` (`taskhead fit --config config.yaml` reruns it):",
                  "", "```yaml", facts["config_yaml"].rstrip(), "```", ""]
    else:
        lines += ["## Training configuration", "", "No `config.yaml` beside the checkpoint; the model's hyper-parameters "
                  "saved in it:", "", "```yaml", yaml.safe_dump(hp, sort_keys=False).rstrip(), "```", ""]
    manifest = facts.get("manifest") or {}
    if manifest:
        versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("packages") or {}).items() if v)
        commit = (manifest.get("git_commit") or {}).get("taskhead")
        lines += ["## Reproducibility", "", f"- Seed: {manifest.get('seed')}", f"- Packages: {versions}"]
        lines += [f"- taskhead git commit: `{commit}`"] if commit else []
        lines += [""]
    lines += _limitations(facts)
    front = card_data(facts, model_name).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n".join(lines)


def write_card(out_dir: str | Path, facts: dict, model_name: str, location: str, repo_id: str | None = None) -> Path:
    """``out_dir/README.md``, parsed once by ``ModelCard`` before it is written (a card the Hub rejects fails here)."""
    from huggingface_hub import ModelCard

    card = ModelCard(render_card(facts, model_name, location, repo_id))
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path
