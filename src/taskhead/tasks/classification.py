"""Text classification: single-label (IMDB sentiment, NLI), multi-label (GoEmotions) and regression (STS-B), single
texts or sentence pairs.

In order: preprocessing (ClassificationDataModule, in classification_data.py), post-processing (logits → labels,
label sets or scores), the metric (torchmetrics, accumulated over the split), and the LightningModule.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification
from torchmetrics.classification import MulticlassConfusionMatrix

from taskhead.core.export import batched_inference
from taskhead.core.heads import HeadConfig, pool
from taskhead.core.losses import LossConfig, build_loss
from taskhead.core.metrics import (MostConfident, best_threshold, flatten_metrics, multiclass_metrics, multilabel_metrics,
                                   regression_metrics, threshold_curve)
from taskhead.core.module import TaskModule, as_config, label_maps
from taskhead.errors import TaskheadError
from taskhead.tasks.classification_data import (ClassificationDataModule, ProblemType, check_label,  # noqa: F401
                                                label_names_from)

# ---- preprocessing: tasks/classification_data.py (re-exported: configs name it here) ----------------------------------

# Hugging Face's names (``config.problem_type``): they choose the activation of transformers.pipeline on an export.
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}

# ---- post-processing ------------------------------------------------------------------------------------------------


def to_predictions(logits: torch.Tensor, problem_type: ProblemType, label_names: list[str] | None,
                   threshold: float = 0.5) -> list[dict]:
    """(batch, num_labels) logits → one dict per row. single_label: ``{"label", "score", "probabilities": {name: p}}``
    (softmax); multi_label: ``{"labels": [names with p >= threshold, most probable first], "scores": {name: p}}``
    (a sigmoid per label); regression: ``{"score"}`` (the output itself)."""
    logits = logits.float()
    if problem_type == "regression":
        return [{"score": v} for v in logits.squeeze(-1).cpu().tolist()]
    if problem_type == "multi_label":
        out = []
        for row in torch.sigmoid(logits).cpu().tolist():
            above = sorted((i for i, p in enumerate(row) if p >= threshold), key=lambda i: -row[i])
            out.append({"labels": [label_names[i] for i in above], "scores": dict(zip(label_names, row))})
        return out
    out = []
    for row in logits.softmax(-1).cpu().tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": label_names[best], "score": row[best], "probabilities": dict(zip(label_names, row))})
    return out


# ---- model ----------------------------------------------------------------------------------------------------------


class ClassificationModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        label_names: list[str] | None = None,
        label_counts: list[int] | list[list[int]] | None = None,
        problem_type: ProblemType = "single_label",
        threshold: float | Literal["auto"] = 0.5,
        head: HeadConfig | None = None,
        loss: LossConfig | None = None,
        num_mistakes: int = 20,
        **kwargs,
    ) -> None:
        """The task's own options; the shared ones (optimizer, scheduler, peft, gradient_checkpointing,
        max_length) are ``TaskModule``'s.

        Args:
            model_name_or_path: The pretrained backbone: Hub id, local directory, ``pkg:PACKAGE/dir``.
            label_names: Label names in id order (the CLI sets it from the data); none for regression.
            label_counts: Training examples per label (the CLI sets it from the data; for ``class_weights: balanced``).
            problem_type: ``single_label``, ``multi_label`` or ``regression`` (linked from ``data.problem_type``).
            threshold: multi_label: a label is predicted when its probability is at least this. ``auto``: after each
                validation, the threshold (0.05 steps) with the best validation micro-F1 (logged as ``val/threshold``
                and ``val/f1_micro_tuned``); test, predict and the export use it.
            head: A custom head; ``null`` keeps the backbone's own classification head (pipeline-compatible export).
            loss: Loss function and its options.
            num_mistakes: How many of the worst test mistakes ``test`` writes out (the most confident; regression:
                the largest errors).
        """
        super().__init__(model_name_or_path, **kwargs)
        if problem_type == "regression":
            self.label_names = None
            n, maps = 1, {"num_labels": 1}
        elif not label_names:
            raise TaskheadError("model.label_names is empty: give labels in the data or --model.label_names")
        else:
            self.label_names = list(label_names)
            n, maps = len(self.label_names), label_maps(self.label_names)
        if threshold != "auto" and not 0.0 < threshold < 1.0:
            raise TaskheadError(f"model.threshold must be in (0, 1) or auto, got {threshold}")
        if threshold != 0.5 and problem_type != "multi_label":
            raise TaskheadError(f"model.threshold {threshold}: a decision threshold applies to problem_type multi_label "
                                f"only, not {problem_type}")
        self.problem_type, self.threshold = problem_type, threshold
        self.head_cfg = as_config(HeadConfig, head)
        self.loss_cfg = as_config(LossConfig, loss) or LossConfig()
        self.num_mistakes = num_mistakes
        self.save_task_hparams(label_names=self.label_names, label_counts=label_counts, problem_type=problem_type,
                               threshold=threshold, head=self.head_cfg, loss=self.loss_cfg,
                               num_mistakes=num_mistakes)
        # head: null → the backbone's own head, e.g. BERT's pooler + classifier; problem_type goes into its config, so
        # the export's transformers.pipeline applies the same activation (softmax, sigmoid, none)
        self.build_model(AutoModelForSequenceClassification, self.head_cfg, n,
                         problem_type=HF_PROBLEM_TYPES[problem_type], **maps)
        self.loss_fn, weight = build_loss(self.loss_cfg, label_counts, n, problem_type)
        self.register_buffer("class_weight", weight, persistent=False)
        metrics = {"single_label": lambda: multiclass_metrics(n), "multi_label": lambda: multilabel_metrics(n),
                   "regression": regression_metrics}[problem_type]
        self.metrics = torch.nn.ModuleDict({"val": metrics(), "test": metrics()})
        if problem_type == "single_label":
            self.confusion = MulticlassConfusionMatrix(n)
        if problem_type == "multi_label":
            # the decision threshold in use; tuned on validation (``auto``) it is saved in checkpoints and exports
            self.register_buffer("decision_threshold", torch.tensor(0.5 if threshold == "auto" else float(threshold)),
                                 persistent=threshold == "auto")
            self.threshold_curve = threshold_curve() if threshold == "auto" else None
        self.mistakes = MostConfident(num_mistakes)
        self.test_artifacts: dict = {}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            return self.model(**inputs).logits  # (batch, num_labels)
        hidden = self.model(**inputs).last_hidden_state  # (batch, seq, hidden)
        return self.head(pool(hidden, inputs["attention_mask"], self.pooling))  # (batch, num_labels)

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self(batch["inputs"]), batch["labels"], self.class_weight)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Label ids are positions in ``label_names``: a checkpoint trained with another order (or another problem
        type) would read every prediction wrong, so it is refused."""
        saved = checkpoint.get("hyper_parameters") or {}
        for key, now in (("problem_type", self.problem_type), ("label_names", self.label_names)):
            if key in saved and saved[key] != now:
                order = ", in the same order" if key == "label_names" else ""
                raise TaskheadError(f"this checkpoint was trained with {key} {saved[key]} but the model now has {now} "
                                    f"(from the data or --data.{key}): give the checkpoint's {key}{order}")
        super().on_load_checkpoint(checkpoint)

    def _threshold(self) -> float:
        return float(self.decision_threshold)

    def eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["inputs"]).float()
        labels = batch["labels"]
        self.log_eval_loss(stage, self.loss_fn(logits, labels, self.class_weight), batch["stats"]["samples"])
        if self.problem_type == "regression":
            pred = logits.squeeze(-1)  # (batch,)
            self.metrics[stage].update(pred, labels)
            if stage == "test":  # the largest errors
                for i, (y, p) in enumerate(zip(labels.tolist(), pred.tolist())):
                    self.mistakes.add(abs(p - y), int(batch["idx"][i]), batch["text"][i], y, p)
            return
        if self.problem_type == "multi_label":
            probs = torch.sigmoid(logits)  # (batch, num_labels)
            pred = (probs >= self.decision_threshold).long()
            self.metrics[stage].update(pred, labels.long())
            if stage == "val" and self.threshold_curve is not None:
                self.threshold_curve.update(probs.flatten(), labels.flatten().long())
            if stage == "test":  # a wrong row, by its most confidently wrong label
                wrong = (probs - labels).abs().amax(-1)
                for i in (pred != labels.long()).any(-1).nonzero().flatten().tolist():
                    self.mistakes.add(float(wrong[i]), int(batch["idx"][i]), batch["text"][i],
                                      self._names(labels[i]), self._names(pred[i]))
            return
        self.metrics[stage].update(logits, labels)
        if stage == "test":
            pred = self.mistakes.add_wrong(logits.softmax(-1), labels, lambda i: (int(batch["idx"][i]), batch["text"][i]),
                                           self.label_names)
            self.confusion.update(pred, labels)

    def _names(self, multi_hot: torch.Tensor) -> list[str]:
        return [self.label_names[i] for i in multi_hot.nonzero().flatten().tolist()]

    def eval_epoch_end(self, stage: str) -> None:
        logged = flatten_metrics(stage, self.metrics[stage].compute(), self.label_names or [])
        self.metrics[stage].reset()
        if stage == "val" and getattr(self, "threshold_curve", None) is not None:
            threshold, f1 = best_threshold(self.threshold_curve)
            self.threshold_curve.reset()
            if not self.trainer.sanity_checking:  # two sanity batches choose nothing
                self.decision_threshold.fill_(threshold)
                logged.update({"val/threshold": threshold, "val/f1_micro_tuned": f1})
        self.log_dict(logged)
        if stage != "test":
            return
        key = "error" if self.problem_type == "regression" else "confidence"
        self.test_artifacts = {"test_mistakes.json": [
            {"index": idx, "text": text, "gold": g, "pred": p, key: c}
            for c, idx, text, g, p in self.mistakes.take(self.gather)
        ]}
        if self.problem_type == "single_label":
            self.test_artifacts["confusion_matrix.json"] = {"labels": self.label_names,
                                                            "rows_gold_cols_pred": self.confusion.compute().tolist()}
            self.confusion.reset()
        if self.problem_type == "multi_label":
            self.test_artifacts["threshold.json"] = {"threshold": self._threshold(), "chosen": self.threshold == "auto"}

    def _predictions(self, logits: torch.Tensor) -> list[dict]:
        threshold = self._threshold() if self.problem_type == "multi_label" else 0.5
        return to_predictions(logits, self.problem_type, self.label_names, threshold)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return [{"idx": int(i), **p} for i, p in zip(batch["idx"], self._predictions(self(batch["inputs"])))]

    def predict_raw(self, tokenizer, texts: str | list[str], batch_size: int = 64,
                    text_pairs: str | list[str] | None = None) -> dict | list[dict]:
        """Raw text(s) → one dict per text (a single dict for a single string): ``{"label", "score",
        "probabilities"}``, multi_label ``{"labels", "scores"}``, regression ``{"score"}``. ``text_pairs``: the
        second text of each (sentence-pair models, e.g. NLI: premise, hypothesis), encoded as the DataModule's
        ``text_pair_field`` is."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        pairs = [None] * len(texts) if text_pairs is None else [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
        if len(pairs) != len(texts):
            raise TaskheadError(f"{len(texts)} texts but {len(pairs)} text_pairs")
        enc = [tokenizer(t, p, truncation=True, max_length=self.max_length) for t, p in zip(texts, pairs)]
        out = batched_inference(enc, tokenizer, batch_size, lambda inputs, _idx: self._predictions(self(inputs)),
                                self.device)
        return out[0] if single else out
