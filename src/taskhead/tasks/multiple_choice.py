"""Multiple choice (SWAG, HellaSwag, any N-choice set): score each (context, choice) pair, softmax over the choices.

In order: preprocessing (MultipleChoiceDataModule: SWAG columns or a generic context + list-of-choices form, pairs
encoded with the context truncated first, padded per batch to ``(batch, num_choices, seq)``), post-processing
(probabilities → chosen index and text), the metric (accuracy, also split by gold position) and the LightningModule.
"""

from __future__ import annotations


import numpy as np
import torch
from transformers import AutoModelForMultipleChoice
from torchmetrics.classification import MulticlassConfusionMatrix

from taskhead.core.arrow import numpy_column
from taskhead.core.data import TaskDataModule
from taskhead.core.heads import HeadConfig, pool
from taskhead.core.losses import LossConfig
from taskhead.core.metrics import MostConfident, flatten_metrics, multiclass_metrics
from taskhead.core.module import TaskModule, as_config
from taskhead.core.readers import get_field, get_text
from taskhead.errors import TaskheadError

# ---- preprocessing --------------------------------------------------------------------------------------------------

SWAG_START, SWAG_ENDING = "sent2", "ending"  # SWAG columns: choice i = sent2 + " " + ending<i>; context = sent1


def parse_label(value: object, num_choices: int, field: str, where: str) -> int:
    """An integer (or digit string, as in CSV and the Hub's ClassLabel names) in ``[0, num_choices)``."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskheadError(f"{where}: field '{field}' must be an integer choice index, got {value!r}")
    if not 0 <= value < num_choices:
        raise TaskheadError(f"{where}: label {value} is outside [0, {num_choices}) for {num_choices} choices")
    return value


def swag_choices(rec: dict, where: str) -> list[str]:
    """``sent2 + " " + ending<i>`` for i = 0, 1, ... while the column exists (SWAG has 4)."""
    start = get_field(rec, SWAG_START, where)
    if not isinstance(start, str):
        raise TaskheadError(f"{where}: field '{SWAG_START}' must be a string, got {type(start).__name__}")
    n = 0
    while f"{SWAG_ENDING}{n}" in rec:
        n += 1
    if n < 2:
        get_field(rec, f"{SWAG_ENDING}{n}", where)  # names the first missing ending column
    endings = [get_text(rec, f"{SWAG_ENDING}{i}", where) for i in range(n)]
    return [f"{start.strip()} {e.strip()}".strip() for e in endings]


def generic_choices(rec: dict, field: str, where: str) -> list[str]:
    """A JSON list of at least two non-empty strings."""
    choices = get_field(rec, field, where)
    if not isinstance(choices, list):
        raise TaskheadError(f"{where}: field '{field}' must be a list of choice strings, got {type(choices).__name__}")
    if len(choices) < 2:
        raise TaskheadError(f"{where}: field '{field}' has {len(choices)} choice(s); multiple choice needs at least 2")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise TaskheadError(f"{where}: field '{field}' choice {i} is empty or not a string ({c!r})")
    return choices


def encode_choices(tokenizer, contexts: list[str], choices: list[list[str]], max_length: int) -> dict[str, list]:
    """Encode every (context, choice) pair; per example, each model input is a list of ``num_choices`` token lists.

    The context is truncated first (``only_first``), so every choice stays whole. A pair whose choice alone leaves no
    room for the context falls back to ``longest_first`` (``only_first`` would raise). ``length`` and
    ``full_length`` are the longest pair of the example, after and before truncation.
    """
    flat_ctx = [ctx for ctx, chs in zip(contexts, choices) for _ in chs]
    flat_ch = [c for chs in choices for c in chs]
    special = tokenizer.num_special_tokens_to_add(pair=True)
    ctx_len = [len(ids) for ids in tokenizer(contexts, add_special_tokens=False, verbose=False)["input_ids"]]
    ch_len = [len(ids) for ids in tokenizer(flat_ch, add_special_tokens=False, verbose=False)["input_ids"]]
    flat_ctx_len = [n for n, chs in zip(ctx_len, choices) for _ in chs]
    enc: dict[str, list] = {}
    fits = [n + special < max_length for n in ch_len]
    for strategy, wanted in (("only_first", True), ("longest_first", False)):
        sel = [i for i, f in enumerate(fits) if f == wanted]
        if not sel:
            continue
        part = tokenizer([flat_ctx[i] for i in sel], [flat_ch[i] for i in sel], truncation=strategy, max_length=max_length)
        for name, values in part.items():
            column = enc.setdefault(name, [None] * len(flat_ch))
            for i, v in zip(sel, values):
                column[i] = v
    out: dict[str, list] = {name: [] for name in enc}
    out["length"], out["full_length"] = [], []
    start = 0
    for chs in choices:
        end = start + len(chs)
        for name in enc:
            out[name].append(enc[name][start:end])  # (num_choices, seq_i)
        out["length"].append(max(len(ids) for ids in enc["input_ids"][start:end]))
        out["full_length"].append(max(flat_ctx_len[i] + ch_len[i] + special for i in range(start, end)))
        start = end
    return out


def pad_choices(tokenizer, features: list[dict]) -> dict[str, torch.Tensor]:
    """Pad all choices of all examples to the longest pair in the batch → tensors of (batch, num_choices, seq)."""
    names = [n for n in tokenizer.model_input_names if n in features[0]]
    n = len(features[0]["input_ids"])
    flat = [{k: f[k][j] for k in names} for f in features for j in range(n)]
    padded = tokenizer.pad(flat, return_tensors="pt")  # (batch * num_choices, seq)
    return {k: v.view(len(features), n, -1) for k, v in padded.items()}


class MultipleChoiceDataModule(TaskDataModule):
    def __init__(
        self,
        context_field: str = "sent1",
        choices_field: str | None = None,
        label_field: str = "label",
        **kwargs,
    ) -> None:
        """Plus every option of ``TaskDataModule`` (files, batch size, max_length, ...).

        Args:
            context_field: Field holding the context (SWAG: ``sent1``; HellaSwag: ``ctx``).
            choices_field: Field holding the list of choice strings (HellaSwag: ``endings``). ``null`` reads SWAG's
                columns instead: choice i is ``sent2 + " " + ending<i>`` for ``ending0``, ``ending1``, ...
            label_field: Field holding the index of the correct choice (integer or digit string).
        """
        super().__init__(**kwargs)
        self.context_field, self.choices_field, self.label_field = context_field, choices_field, label_field
        self.save_hyperparameters()
        self.num_choices: int | None = None  # fixed by the first example read
        self._first_where: str | None = None

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        context = get_text(rec, self.context_field, where)
        if self.choices_field is None:
            choices = swag_choices(rec, where)
        else:
            choices = generic_choices(rec, self.choices_field, where)
        out = {"context": context, "choices": choices, "where": where}
        if split != "predict":
            out["label"] = parse_label(get_field(rec, self.label_field, where), len(choices), self.label_field, where)
        return out

    def check_stream(self, split: str, records):
        """Every example of every split read has as many choices as the first one read."""
        for r in records:
            if self.num_choices is None:
                self.num_choices, self._first_where = len(r["choices"]), r["where"]
            elif len(r["choices"]) != self.num_choices:
                raise TaskheadError(
                    f"{r['where']}: {len(r['choices'])} choices, but {self._first_where} has {self.num_choices}; "
                    "every example of a dataset needs the same number of choices"
                )
            yield r

    def facts(self) -> dict:
        return {"num_choices": self.num_choices, "_first_where": self._first_where}

    def restore_facts(self, facts: dict) -> None:
        self.__dict__.update(facts)

    def model_args(self) -> dict:
        """Choices per example, from the data (every split read has as many)."""
        facts = self.data_facts
        if facts["num_choices"] is None:
            raise TaskheadError("no examples in any split")
        return {"num_choices": facts["num_choices"]}

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        return encode_choices(self.tokenizer, batch["context"], batch["choices"], self.hparams.max_length)

    def collate(self, features: list[dict]) -> dict:
        inputs = pad_choices(self.tokenizer, features)
        mask = inputs["attention_mask"]
        batch = {
            "inputs": inputs,
            "stats": {"samples": len(features), "tokens": int(mask.sum()), "padded": mask.numel()},
            "idx": torch.tensor([f["idx"] for f in features]),
            "context": [f["context"] for f in features],
            "choices": [f["choices"] for f in features],
        }
        if "label" in features[0]:
            batch["labels"] = torch.tensor([f["label"] for f in features])
        return batch

    def report_extra(self, split: str, ds) -> list[str]:
        lines = [f"{self.num_choices} choices per example"]
        if "label" in ds.column_names:
            counts = np.bincount(numpy_column(ds, "label"), minlength=self.num_choices)  # one Arrow read
            parts = [f"{i} {c / len(ds):.1%}" for i, c in enumerate(counts.tolist())]
            lines.append("gold position: " + " / ".join(parts))
        return lines


# ---- post-processing ------------------------------------------------------------------------------------------------


def to_predictions(probs: torch.Tensor, choices: list[list[str]]) -> list[dict]:
    """(batch, num_choices) probabilities → ``[{"index", "choice", "probabilities"}]``."""
    out = []
    for row, chs in zip(probs.float().cpu().tolist(), choices):
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"index": best, "choice": chs[best], "probabilities": row})
    return out


def raw_items(items, context, choices) -> tuple[list[tuple[str, list[str]]], bool]:
    """Normalise ``predict_raw``'s inputs to ``[(context, choices)]``; also say whether one item was given."""
    if items is None:
        if context is None or choices is None:
            raise TaskheadError("give context=... and choices=[...], or a list of {'context', 'choices'} items")
        items, single = [(context, choices)], True
    elif isinstance(items, dict):
        items, single = [items], True
    else:
        single = False
    out = []
    for i, item in enumerate(items):
        ctx, chs = (item.get("context"), item.get("choices")) if isinstance(item, dict) else item
        if not isinstance(ctx, str) or not ctx.strip():
            raise TaskheadError(f"item {i}: 'context' must be a non-empty string")
        out.append((ctx, generic_choices({"choices": chs}, "choices", f"item {i}")))
    return out, single


# ---- metric: accuracy and per-gold-position accuracy (core/metrics.py's multiclass_metrics) ---------------------------


def position_report(confusion: list[list[int]]) -> list[dict]:
    """Per choice position: gold count, predicted count (position bias) and accuracy when the gold is there."""
    rows = []
    for i, row in enumerate(confusion):
        gold = sum(row)
        rows.append({"position": i, "gold": gold, "predicted": sum(r[i] for r in confusion),
                     "accuracy": row[i] / gold if gold else None})
    return rows


# ---- model ----------------------------------------------------------------------------------------------------------


class MultipleChoiceModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        num_choices: int | None = None,
        head: HeadConfig | None = None,
        loss: LossConfig | None = None,
        num_mistakes: int = 20,
        **kwargs,
    ) -> None:
        """The task's own options; the shared ones (optimizer, scheduler, peft, gradient_checkpointing,
        max_length) are ``TaskModule``'s.

        Args:
            model_name_or_path: The pretrained backbone: Hub id, local directory, ``pkg:PACKAGE/dir``.
            num_choices: Choices per example; the CLI sets it from the data (every example has as many). Sizes the
                accuracy metrics and is checked against every batch; prediction on raw input accepts any number.
            head: A custom per-choice scoring head; ``null`` keeps the backbone's own (``AutoModelForMultipleChoice``).
            loss: Loss over the choices of each example (cross-entropy, label smoothing allowed).
            num_mistakes: How many of the most confident test mistakes ``test`` writes out.
        """
        super().__init__(model_name_or_path, **kwargs)
        if num_choices is None:
            raise TaskheadError("model.num_choices is not set: give the number of choices per example (the CLI sets it "
                                "from the data)")
        if num_choices < 2:
            raise TaskheadError(f"model.num_choices must be at least 2, got {num_choices}")
        self.num_choices = num_choices
        self.head_cfg = as_config(HeadConfig, head)
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        self.num_mistakes = num_mistakes
        self.save_task_hparams(num_choices=num_choices, head=self.head_cfg, loss=self.loss_cfg, num_mistakes=num_mistakes)
        # head: null → the backbone's own head, e.g. BERT's pooler + dropout + Linear(hidden, 1); else ours per choice
        self.build_model(AutoModelForMultipleChoice, self.head_cfg, 1)
        self.set_loss(self.loss_cfg, None, num_choices)
        # per-class recall over gold positions = accuracy when the gold is at that position (logged as acc_by_gold)
        self.metrics = torch.nn.ModuleDict({s: multiclass_metrics(num_choices, per_class=("recall",)) for s in ("val", "test")})
        self.confusion = MulticlassConfusionMatrix(num_choices)
        self.mistakes = MostConfident(num_mistakes)
        self.test_artifacts: dict = {}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inputs of (batch, num_choices, seq) → one score per choice, (batch, num_choices)."""
        if self.head is None:
            return self.model(**inputs).logits  # the HF model flattens the choices itself
        b, n = inputs["input_ids"].shape[:2]
        flat = {k: v.reshape(b * n, -1) for k, v in inputs.items()}  # (batch * choices, seq)
        hidden = self.model(**flat).last_hidden_state  # (batch * choices, seq, hidden)
        scores = self.head(pool(hidden, flat["attention_mask"], self.pooling))  # (batch * choices, 1)
        return scores.view(b, n)

    def _scores(self, batch: dict) -> torch.Tensor:
        logits = self(batch["inputs"])
        if logits.size(1) != self.num_choices:
            raise TaskheadError(
                f"the data has {logits.size(1)} choices per example but model.num_choices is {self.num_choices}: "
                f"set --model.init_args.num_choices {logits.size(1)}"
            )
        return logits

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self._scores(batch), batch["labels"], self.class_weight)

    def eval_step(self, batch: dict, stage: str) -> None:
        logits = self._scores(batch).float()
        labels = batch["labels"]
        self.log_eval_loss(stage, self.loss_fn(logits, labels, self.class_weight), batch["stats"]["samples"])
        self.metrics[stage].update(logits, labels)
        if stage == "test":
            pred = self.mistakes.add_wrong(logits.softmax(-1), labels,
                                           lambda i: (int(batch["idx"][i]), batch["context"][i], batch["choices"][i]))
            self.confusion.update(pred, labels)

    def eval_epoch_end(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        values["acc_by_gold"] = values.pop("recall")
        self.log_dict(flatten_metrics(stage, values, [str(i) for i in range(self.num_choices)]))
        self.metrics[stage].reset()
        if stage != "test":
            return
        confusion = self.confusion.compute().tolist()
        self.test_artifacts = {
            "choice_positions.json": {"positions": position_report(confusion), "rows_gold_cols_pred": confusion},
            "test_mistakes.json": [
                {"index": idx, "context": ctx, "choices": chs, "gold": g, "pred": p, "confidence": c}
                for c, idx, ctx, chs, g, p in self.mistakes.take(self.gather)
            ],
        }
        self.confusion.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        preds = to_predictions(self(batch["inputs"]).float().softmax(-1), batch["choices"])
        return [{"idx": int(i), **p} for i, p in zip(batch["idx"], preds)]

    def predict_raw(self, tokenizer, items=None, *, context: str | None = None, choices: list[str] | None = None,
                    batch_size: int = 32) -> dict | list[dict]:
        """``context=..., choices=[...]`` → ``{"index", "choice", "probabilities"}``; a list of
        ``{"context", "choices"}`` items (or ``(context, choices)`` pairs) → a list of those, in input order.
        Items may have different numbers of choices (batched with their own kind)."""
        pairs, single = raw_items(items, context, choices)
        enc = encode_choices(tokenizer, [c for c, _ in pairs], [chs for _, chs in pairs], self.max_length)
        names = [k for k in enc if k not in ("length", "full_length")]
        features = [{k: enc[k][i] for k in names} for i in range(len(pairs))]
        # longest first, and only items with the same number of choices share a batch
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][1]), -enc["length"][i]))
        results: list = [None] * len(pairs)
        start = 0
        while start < len(order):
            n = len(pairs[order[start]][1])
            idx = [i for i in order[start : start + batch_size] if len(pairs[i][1]) == n]
            inputs = {k: v.to(self.device) for k, v in pad_choices(tokenizer, [features[i] for i in idx]).items()}
            preds = to_predictions(self(inputs).float().softmax(-1), [pairs[i][1] for i in idx])
            for i, p in zip(idx, preds):
                results[i] = p
            start += len(idx)
        return results[0] if single else results
