"""Classification preprocessing: the label field checked per problem type as records stream past, label names fixed
from the training split and turned into ids column-wise, training-label counts, dynamic-padding collate.

- ``single_label``: a label per text (an integer id or a string name).
- ``multi_label``: a list of label names or ids per text (``[]`` for none); stored as Arrow ``list<int64>`` of ids,
  collated into a multi-hot float tensor ``(batch, num_labels)``.
- ``regression``: a number per text (a float target; CSV strings such as ``"3.8"`` are read as numbers); no label names.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from taskhead.core.arrow import numpy_column
from taskhead.core.data import TaskDataModule
from taskhead.core.losses import ProblemType
from taskhead.core.readers import get_field, get_text
from taskhead.core.tokens import encode_ids
from taskhead.errors import TaskheadError


def label_names_from(values: list) -> list[str]:
    """Sorted label set: integers (or digit strings) numerically, other strings alphabetically."""
    names = {str(v) for v in values}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_label(value, problem_type: ProblemType, field: str, where: str):
    """One record's label, checked for its problem type: an id or name; a list of them; or a finite number."""
    if problem_type == "regression":
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise TaskheadError(f"{where}: field '{field}' must be a number (problem_type regression), got {value!r}")
        return float(number)
    if problem_type == "multi_label":
        if not isinstance(value, list):
            raise TaskheadError(f"{where}: field '{field}' must be a list of label names or ids (problem_type "
                                f"multi_label; [] for none), got {value!r}")
        return list(dict.fromkeys(check_label(v, "single_label", field, where) for v in value))  # duplicates once
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise TaskheadError(f"{where}: field '{field}' must be an integer or a non-empty string, got {value!r}")
    return value


def label_ids(column, names: list[str]):
    """Label text → ids, column-wise: a flat ``string`` column, or a ``list<string>`` column list by list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = pa.array(names)
    if not pa.types.is_list(column.type):
        return pc.index_in(column, value_set=value_set).cast(pa.int64())
    return pa.chunked_array([pa.ListArray.from_arrays(c.offsets, pc.index_in(c.values, value_set=value_set).cast(pa.int64()))
                             for c in column.chunks], type=pa.list_(pa.int64()))


class ClassificationDataModule(TaskDataModule):
    stratify_column = "label"

    def __init__(
        self,
        text_field: str = "text",
        text_pair_field: str | None = None,
        label_field: str = "label",
        label_names: list[str] | None = None,
        problem_type: ProblemType = "single_label",
        **kwargs,
    ) -> None:
        """Plus every option of ``TaskDataModule`` (files, batch size, max_length, ...).

        Args:
            text_field: Field (JSON key / CSV column) holding the text.
            text_pair_field: Optional second text (sentence-pair tasks such as NLI).
            label_field: Field holding the label: an integer id or a string name; a list of them (``multi_label``);
                a number (``regression``).
            label_names: The label set in id order. Default: from the Hub's ClassLabel, else sorted training labels.
                When given, integer labels are indices into it. Not used by ``regression``.
            problem_type: ``single_label`` (one label per text, softmax), ``multi_label`` (any number of labels per
                text, a sigmoid per label) or ``regression`` (a float score). Linked to ``model.problem_type``.
        """
        super().__init__(**kwargs)
        if problem_type == "regression" and label_names:
            raise TaskheadError("--data.label_names: problem_type regression has no label names (the label is a number)")
        self.text_field, self.text_pair_field, self.label_field = text_field, text_pair_field, label_field
        self.given_label_names = label_names
        self.problem_type = problem_type
        # a seeded hold-out is stratified by single labels only (not by label lists or float scores)
        self.stratify_column = "label" if problem_type == "single_label" else None
        # label ids are part of the cached rows already; the model logs the final label_names
        self.save_hyperparameters(ignore=["label_names"])

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        out = {"text": get_text(rec, self.text_field, where), "where": where}
        if self.text_pair_field:
            out["text_pair"] = get_text(rec, self.text_pair_field, where)
        if split != "predict":
            out["label"] = check_label(get_field(rec, self.label_field, where), self.problem_type, self.label_field, where)
        return out

    def model_args(self) -> dict:
        return {"label_names": self.label_names, "label_counts": self.label_counts}

    @property
    def label_names(self) -> list[str] | None:
        """Label names in id order (passed to the model by ``model_args``; None for regression); loading the
        splits fixes them."""
        return self.data_facts["label_names"]

    @property
    def label_counts(self) -> list[int] | list[list[int]] | None:
        """Per label, among the training rows a fit uses (after the validation hold-out and ``max_train_samples``):
        its examples (single_label) or ``[negatives, positives]`` (multi_label); None for regression. Linked to
        ``model.label_counts`` for ``class_weights: balanced``."""
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
        if self.problem_type == "regression":
            yield from records
            return
        names = self._known_names()
        multi = self.problem_type == "multi_label"
        if names is None:
            for r in records:
                if "label" in r:
                    r["label"] = [str(v) for v in r["label"]] if multi else str(r["label"])
                yield r
            return
        index = {n: i for i, n in enumerate(names)}
        use_position = bool(self.given_label_names)
        known = "label_names" if self.given_label_names else "the training labels"

        def to_id(value, where: str) -> int:
            if use_position and isinstance(value, int):
                if not 0 <= value < len(names):
                    raise TaskheadError(f"{where}: label id {value} is outside the {len(names)} label_names {names}")
                return value
            if str(value) in index:
                return index[str(value)]
            raise TaskheadError(f"{where}: label {value!r} is not one of {known} {names}")

        for r in records:
            if "label" in r:
                r["label"] = [to_id(v, r["where"]) for v in r["label"]] if multi else to_id(r["label"], r["where"])
            yield r

    def finish_split(self, split: str, ds):
        """Fix the label set from the first split read (sorted labels, ``label_names_from``) and turn its label text
        into ids column-wise."""
        import pyarrow.compute as pc

        from taskhead.core.arrow import arrow_column, write_arrow_table

        if "label" not in ds.column_names or self.problem_type == "regression":
            if split == "test" and "label" in ds.column_names and pc.all(pc.equal(arrow_column(ds, "label"), -1)).as_py():
                rank_zero_warn("[data] test: every score is -1, i.e. no gold scores (as in GLUE's stsb test split): "
                               "test metrics on it mean nothing; evaluate the validation split or give --data.test_file")
            self.__dict__.setdefault("_label_names", self._known_names())
            return ds
        self._label_names = self._known_names()
        if self._label_names is None:
            text = arrow_column(ds, "label")
            flat = pc.list_flatten(text) if self.problem_type == "multi_label" else text
            self._label_names = label_names_from([v for v in pc.unique(flat).to_pylist() if v is not None])
            if not self._label_names:
                raise TaskheadError(f"the {split} split has no labels at all (every '{self.label_field}' list is empty)")
            ids = label_ids(text, self._label_names)
            ds = write_arrow_table(ds.data.table.set_column(ds.column_names.index("label"), "label", ids),
                                   Path(ds.cache_files[0]["filename"]).with_suffix(".ids.arrow"))
        return ds

    def _count_labels(self, ds) -> list[int] | list[list[int]]:
        n = len(self._label_names)
        if self.problem_type == "multi_label":
            import pyarrow.compute as pc

            from taskhead.core.arrow import arrow_column

            positives = np.bincount(pc.list_flatten(arrow_column(ds, "label")).to_numpy(), minlength=n)
            return [[len(ds) - int(p), int(p)] for p in positives]
        return [int(c) for c in np.bincount(numpy_column(ds, "label"), minlength=n)]

    def facts(self) -> dict:
        counts = None
        if self.problem_type != "regression" and "train" in self.parsed and "label" in self.parsed["train"].column_names:
            # the rows a fit trains on: the same seeded hold-out (when there is no validation split) and subset
            held_out = "validation" not in self._sources()
            try:
                rows = self._subset("train", held_out)
            except ValueError:  # too few rows to hold any out: only a fit needs that, and it stops on this same error
                rows = self.parsed["train"]
            counts = self._count_labels(rows)
        return {"label_names": self._known_names(), "label_counts": counts}

    def restore_facts(self, facts: dict) -> None:
        self._label_names = facts["label_names"]

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        # Only what collate cannot derive is stored: the attention mask is all ones before padding (``pad_inputs``
        # builds it), and one text's token type ids are all zeros (the model's default); a pair keeps its type ids.
        return encode_ids(self.tokenizer, batch["text"], batch.get("text_pair"), self.hparams.max_length)

    def collate(self, features: list[dict]) -> dict:
        batch = self.pad_inputs(features)
        batch["idx"] = torch.tensor([f["idx"] for f in features])
        batch["text"] = [f["text"] for f in features]
        if "label" in features[0]:
            labels = [f["label"] for f in features]
            if self.problem_type == "multi_label":
                hot = torch.zeros(len(labels), len(self.label_names))  # (batch, num_labels)
                rows = torch.repeat_interleave(torch.arange(len(labels)), torch.tensor([len(ids) for ids in labels]))
                hot[rows, torch.tensor([i for ids in labels for i in ids], dtype=torch.long)] = 1.0
                batch["labels"] = hot
            else:
                batch["labels"] = torch.tensor(labels, dtype=torch.float if self.problem_type == "regression" else None)
        return batch

    def report_extra(self, split: str, ds) -> list[str]:
        if "label" not in ds.column_names:
            return []
        if self.problem_type == "regression":
            y = numpy_column(ds, "label")
            return [f"scores: mean {y.mean():.3g}, std {y.std():.3g}, min {y.min():.3g}, max {y.max():.3g}"]
        counts = self._count_labels(ds)
        if self.problem_type == "multi_label":
            counts = [pos for _, pos in counts]
        parts = [f"{name} {c / len(ds):.1%} ({c:,})" for name, c in zip(self.label_names, counts)]
        return ["labels: " + " / ".join(parts)]
