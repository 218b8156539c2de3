"""Text classification (IMDB sentiment and any single- or pair-text label set).

In order: preprocessing (ClassificationDataModule), post-processing (probabilities → labels), the metric
(torchmetrics, accumulated over the split), and the LightningModule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification
from torchmetrics.classification import MulticlassConfusionMatrix

from taskhead.core.arrow import numpy_column
from taskhead.core.data import TaskDataModule
from taskhead.core.export import batched_inference
from taskhead.core.heads import HeadConfig, pool
from taskhead.core.losses import LossConfig
from taskhead.core.metrics import MostConfident, flatten_metrics, multiclass_metrics
from taskhead.core.module import TaskModule, as_config, label_maps
from taskhead.core.optim import OptimizerConfig, SchedulerConfig
from taskhead.core.peft import PeftConfig
from taskhead.core.readers import get_field, get_text
from taskhead.errors import TaskheadError

# ---- preprocessing --------------------------------------------------------------------------------------------------


def label_names_from(values: list) -> list[str]:
    """Sorted label set: integers (or digit strings) numerically, other strings alphabetically."""
    names = {str(v) for v in values}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


class ClassificationDataModule(TaskDataModule):
    stratify_column = "label"
    arrow_native = True  # splits streamed into Arrow; labels checked in the stream (check_stream / finish_split)

    def __init__(
        self,
        text_field: str = "text",
        text_pair_field: str | None = None,
        label_field: str = "label",
        label_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Plus every option of ``TaskDataModule`` (files, batch size, max_length, ...).

        Args:
            text_field: Field (JSON key / CSV column) holding the text.
            text_pair_field: Optional second text (sentence-pair tasks such as NLI).
            label_field: Field holding the label: an integer id or a string name.
            label_names: The label set in id order. Default: from the Hub's ClassLabel, else sorted training labels.
                When given, integer labels are indices into it.
        """
        super().__init__(**kwargs)
        self.text_field, self.text_pair_field, self.label_field = text_field, text_pair_field, label_field
        self.given_label_names = label_names
        # label ids are part of the cached rows already; the model logs the final label_names
        self.save_hyperparameters(ignore=["label_names"])

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        out = {"text": get_text(rec, self.text_field, where), "where": where}
        if self.text_pair_field:
            out["text_pair"] = get_text(rec, self.text_pair_field, where)
        if split != "predict":
            label = get_field(rec, self.label_field, where)
            if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, str) and not label.strip()):
                raise TaskheadError(f"{where}: field '{self.label_field}' must be an integer or a non-empty string, got {label!r}")
            out["label"] = label
        return out

    @property
    def label_names(self) -> list[str]:
        """Label names in id order (linked to ``model.label_names`` by the CLI); loading the splits fixes them."""
        return self.data_facts["label_names"]

    @property
    def label_counts(self) -> list[int] | None:
        """Training examples per label id (linked to ``model.label_counts``, used by ``class_weights: balanced``)."""
        return self.data_facts["label_counts"]

    def _known_names(self) -> list[str] | None:
        """The label set before a split is read: given, the Hub's ClassLabel, or fixed by an earlier split."""
        hub = getattr(self, "hub_class_names", {}).get(self.label_field)
        if self.given_label_names or hub:
            return list(self.given_label_names or hub)
        return getattr(self, "_label_names", None)

    def check_stream(self, split: str, records):
        """Map every label to its id as it streams past, naming the record of a label outside the set. The split that
        fixes the set (train, or the first split read) keeps label text until ``finish_split`` sorts the set."""
        names = self._known_names()
        if names is None:
            for r in records:
                if "label" in r:
                    r["label"] = str(r["label"])
                yield r
            return
        index = {n: i for i, n in enumerate(names)}
        use_position = bool(self.given_label_names)
        for r in records:
            if "label" in r:
                value = r["label"]
                if use_position and isinstance(value, int):
                    if not 0 <= value < len(names):
                        raise TaskheadError(f"{r['where']}: label id {value} is outside the {len(names)} label_names {names}")
                elif str(value) in index:
                    r["label"] = index[str(value)]
                else:
                    known = "label_names" if self.given_label_names else "the training labels"
                    raise TaskheadError(f"{r['where']}: label {value!r} is not one of {known} {names}")
            yield r

    def finish_split(self, split: str, ds):
        """Fix the label set from the first split read (sorted labels, ``label_names_from``) and turn its label text
        into ids column-wise; count training labels."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from taskhead.core.arrow import arrow_column, write_arrow_table

        if "label" not in ds.column_names:
            self.__dict__.setdefault("_label_names", self._known_names())
            return ds
        self._label_names = self._known_names()
        if self._label_names is None:
            text = arrow_column(ds, "label")
            self._label_names = label_names_from(pc.unique(text).to_pylist())
            ids = pc.index_in(text, value_set=pa.array(self._label_names)).cast(pa.int64())
            ds = write_arrow_table(ds.data.table.set_column(ds.column_names.index("label"), "label", ids),
                                   Path(ds.cache_files[0]["filename"]).with_suffix(".ids.arrow"))
        if split == "train":
            counts = np.bincount(numpy_column(ds, "label"), minlength=len(self._label_names))
            self._label_counts = [int(c) for c in counts]
        return ds

    def facts(self) -> dict:
        return {"label_names": self._known_names(), "label_counts": getattr(self, "_label_counts", None)}

    def restore_facts(self, facts: dict) -> None:
        self._label_names, self._label_counts = facts["label_names"], facts["label_counts"]

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        # One pass without truncation gives the full lengths (data report) and, for every row that fits, the inputs;
        # only rows over max_length are tokenised again, truncated the tokenizer's own way (half the work of two passes).
        pair = batch.get("text_pair")
        enc = self.tokenizer(batch["text"], pair, truncation=False, verbose=False)
        full = [len(ids) for ids in enc["input_ids"]]
        long = [i for i, n in enumerate(full) if n > self.hparams.max_length]
        if long:
            cut = self.tokenizer([batch["text"][i] for i in long], [pair[i] for i in long] if pair else None,
                                 truncation=True, max_length=self.hparams.max_length)
            for key in enc:
                for j, i in enumerate(long):
                    enc[key][i] = cut[key][j]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        enc["full_length"] = full
        return enc

    def collate(self, features: list[dict]) -> dict:
        batch = self.pad_inputs(features)
        batch["idx"] = torch.tensor([f["idx"] for f in features])
        batch["text"] = [f["text"] for f in features]
        if "label" in features[0]:
            batch["labels"] = torch.tensor([f["label"] for f in features])
        return batch

    def report_extra(self, split: str, ds) -> list[str]:
        if "label" not in ds.column_names:
            return []
        counts = np.bincount(numpy_column(ds, "label"), minlength=len(self.label_names))  # one Arrow read
        parts = [f"{name} {c / len(ds):.1%} ({c:,})" for name, c in zip(self.label_names, counts.tolist())]
        return ["labels: " + " / ".join(parts)]


# ---- post-processing ------------------------------------------------------------------------------------------------


def to_predictions(probs: torch.Tensor, label_names: list[str]) -> list[dict]:
    """(batch, num_labels) probabilities → ``[{"label", "score", "probabilities": {name: p}}]``."""
    out = []
    for row in probs.float().cpu().tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": label_names[best], "score": row[best], "probabilities": dict(zip(label_names, row))})
    return out


# ---- model ----------------------------------------------------------------------------------------------------------


class ClassificationModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        label_names: list[str] | None = None,
        label_counts: list[int] | None = None,
        head: HeadConfig | None = None,
        loss: LossConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        max_length: int = 512,
        num_mistakes: int = 20,
        peft: PeftConfig | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: Hub id, local directory, or ``pkg:PACKAGE/dir`` of the pretrained backbone.
            label_names: Label names in id order (linked from the data by the CLI).
            label_counts: Training examples per label (linked from the data; for ``class_weights: balanced``).
            head: A custom head; ``null`` keeps the backbone's own classification head (pipeline-compatible export).
            loss: Loss function and its options.
            optimizer: AdamW, learning rates, layer-wise decay, freezing.
            scheduler: Per-step LR schedule with warmup.
            peft: LoRA (``configs/peft/lora.yaml``); null trains every weight. The task layers always train in full.
            gradient_checkpointing: Recompute activations in backward (non-reentrant): less memory, more compute.
            max_length: Truncation length for raw-text prediction (linked from ``data.max_length``).
            num_mistakes: How many of the most confident test mistakes ``test`` writes out.
        """
        super().__init__(model_name_or_path, optimizer, scheduler, peft, gradient_checkpointing)
        if not label_names:
            raise TaskheadError("model.label_names is empty: give labels in the data or --model.label_names")
        self.label_names = list(label_names)
        self.head_cfg = as_config(HeadConfig, head)
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        self.max_length, self.num_mistakes = max_length, num_mistakes
        self.save_task_hparams(label_names=self.label_names, label_counts=label_counts, head=self.head_cfg,
                               loss=self.loss_cfg, max_length=max_length, num_mistakes=num_mistakes)
        n = len(self.label_names)
        # head: null → the backbone's own head, e.g. BERT's pooler + classifier
        self.build_model(AutoModelForSequenceClassification, self.head_cfg, n, **label_maps(self.label_names))
        self.set_loss(self.loss_cfg, label_counts, n)
        self.metrics = torch.nn.ModuleDict({"val": multiclass_metrics(n), "test": multiclass_metrics(n)})
        self.confusion = MulticlassConfusionMatrix(n)
        self.mistakes = MostConfident(num_mistakes)
        self.test_artifacts: dict = {}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            return self.model(**inputs).logits  # (batch, num_labels)
        hidden = self.model(**inputs).last_hidden_state  # (batch, seq, hidden)
        return self.head(pool(hidden, inputs["attention_mask"], self.pooling))  # (batch, num_labels)

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self(batch["inputs"]), batch["labels"], self.class_weight)

    def eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["inputs"]).float()
        labels = batch["labels"]
        self.log_eval_loss(stage, self.loss_fn(logits, labels, self.class_weight), batch["stats"]["samples"])
        self.metrics[stage].update(logits, labels)
        if stage == "test":
            conf, pred = logits.softmax(-1).max(-1)
            self.confusion.update(pred, labels)
            for i in (pred != labels).nonzero().flatten().tolist():
                self.mistakes.add(float(conf[i]), int(batch["idx"][i]), batch["text"][i], int(labels[i]), int(pred[i]))

    def eval_epoch_end(self, stage: str) -> None:
        self.log_dict(flatten_metrics(stage, self.metrics[stage].compute(), self.label_names))
        self.metrics[stage].reset()
        if stage != "test":
            return
        self.test_artifacts = {
            "confusion_matrix.json": {"labels": self.label_names, "rows_gold_cols_pred": self.confusion.compute().tolist()},
            "test_mistakes.json": [
                {"index": idx, "text": text, "gold": self.label_names[g], "pred": self.label_names[p], "confidence": c}
                for c, idx, text, g, p in self.mistakes.take(self.gather)
            ],
        }
        self.confusion.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        preds = to_predictions(self(batch["inputs"]).float().softmax(-1), self.label_names)
        return [{"idx": int(i), **p} for i, p in zip(batch["idx"], preds)]

    def predict_raw(self, tokenizer, texts: str | list[str], batch_size: int = 64,
                    text_pairs: str | list[str] | None = None) -> dict | list[dict]:
        """Raw text(s) → ``{"label", "score", "probabilities"}`` per text (a single dict for a single string).
        ``text_pairs``: the second text of each (sentence-pair models, e.g. NLI: premise, hypothesis), encoded as
        the DataModule's ``text_pair_field`` is."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        pairs = [None] * len(texts) if text_pairs is None else [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
        if len(pairs) != len(texts):
            raise TaskheadError(f"{len(texts)} texts but {len(pairs)} text_pairs")
        enc = [tokenizer(t, p, truncation=True, max_length=self.max_length) for t, p in zip(texts, pairs)]

        def run(inputs, _idx):
            return to_predictions(self(inputs).float().softmax(-1), self.label_names)

        out = batched_inference(enc, tokenizer, batch_size, run, self.device)
        return out[0] if single else out
