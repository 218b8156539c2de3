"""Extractive question answering (SQuAD v1.1): sliding windows, n-best span selection, the official EM/F1.

In order: preprocessing (QADataModule: SQuAD JSON or JSONL records, windows with offset mappings and span labels)
and the LightningModule (span loss, n-best candidates streamed per question, prediction on raw text). The pure
functions they use (windows, span labels, batches of whole questions, n-best spans, the metric) are in ``qa_spans.py``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from taskhead.core.arrow import numpy_column
from taskhead.core.data import TaskDataModule
from taskhead.core.export import batched_inference
from taskhead.core.heads import HeadConfig
from taskhead.core.module import TaskModule, as_config
from taskhead.core.readers import file_format, get_field, get_text, read_records
from taskhead.errors import TaskheadError
from taskhead.tasks.qa_spans import (
    Candidate,
    ExampleBatchSampler,
    best_answer,
    exact_match,
    f1,
    merge_candidates,
    nearest_occurrence,
    prepare_features,
    read_squad_json,
    squad_scores,
    window_candidates,
)

# ---- preprocessing --------------------------------------------------------------------------------------------------


class QADataModule(TaskDataModule):
    encoded_columns = ("offsets", "start_positions", "end_positions", "answer_in_window")

    def __init__(self, max_length: int = 384, doc_stride: int = 128, fix_answer_offsets: bool = False, **kwargs) -> None:
        """Plus every option of ``TaskDataModule`` (files, batch size, ...). Files: SQuAD v1.1 JSON, or JSONL with
        ``id, question, context, answers`` (``answers`` not needed for prediction).

        Args:
            max_length: Window length in tokens (question + context + special tokens).
            doc_stride: Tokens of overlap between consecutive windows of a long context.
            fix_answer_offsets: When an ``answer_start`` does not point at its text, move it to the nearest occurrence
                (counted in the log) instead of stopping with an error.
        """
        super().__init__(max_length=max_length, **kwargs)
        if not 0 <= doc_stride < max_length // 2:
            raise TaskheadError(f"--data.doc_stride must be in [0, max_length / 2), got {doc_stride} with max_length {max_length}")
        self.save_hyperparameters()
        self.offset_fixes: Counter = Counter()

    def read_file(self, path: str) -> Iterator[tuple[str, dict]]:
        return read_squad_json(path) if file_format(path) == "json" else read_records(path)

    def parse_record(self, rec: dict, where: str, split: str) -> dict:
        qid = str(rec.get("id") or where)
        name = where if where.endswith(f"question {qid}") else f"{where} (question {qid})"
        question = get_text(rec, "question", name).lstrip()  # leading blanks would only eat the window
        context = get_field(rec, "context", name)
        if not isinstance(context, str) or not context.strip():
            raise TaskheadError(f"{name}: empty context")
        out = {"id": qid, "question": question, "context": context, "where": where}
        if split == "predict":
            return out
        ans = get_field(rec, "answers", name)
        if isinstance(ans, list) and all(isinstance(a, dict) for a in ans):  # JSONL in the SQuAD layout: [{text, answer_start}, ...]
            ans = {"text": [a.get("text") for a in ans], "answer_start": [a.get("answer_start") for a in ans]}
        if not isinstance(ans, dict):
            raise TaskheadError(f"{name}: 'answers' must be {{text: [...], answer_start: [...]}} or a list of such objects")
        texts, starts = list(ans.get("text") or []), list(ans.get("answer_start") or [])
        if not texts:
            raise TaskheadError(f"{name}: no answers (every question of a {split} split needs at least one)")
        if len(texts) != len(starts):
            raise TaskheadError(f"{name}: {len(texts)} answer texts but {len(starts)} answer_start values")
        for k, (text, start) in enumerate(zip(texts, starts)):
            if not isinstance(text, str) or not text.strip() or isinstance(start, bool) or not isinstance(start, int):
                raise TaskheadError(f"{name}: answer {k} needs a non-empty 'text' and an integer 'answer_start', got {text!r}, {start!r}")
            if context[start : start + len(text)] == text:
                continue
            found = nearest_occurrence(context, text, start) if self.hparams.fix_answer_offsets else None
            if found is None:
                there = context[start : start + len(text)]
                hint = "it does not occur in the context" if self.hparams.fix_answer_offsets else \
                    "fix the file, or pass --data.fix_answer_offsets true to use the nearest occurrence"
                raise TaskheadError(f"{name}: answer {k} {text!r} is not at answer_start {start} (found {there!r}); {hint}")
            starts[k] = found
            self.offset_fixes[split] += 1
        out["answers"] = {"text": texts, "answer_start": starts}
        return out

    def check_stream(self, split: str, records):
        """Question ids are unique in a split (the metric and the predictions are keyed by them)."""
        seen: set[str] = set()
        for r in records:
            if r["id"] in seen:  # name the first occurrence too: found again by reading the split up to it
                first = next(q["where"] for q in self._parsed_records(split, self._sources()[split]) if q["id"] == r["id"])
                first = "" if first == r["where"] else f" (first at {first})"
                raise TaskheadError(f"{r['where']}: question id {r['id']} repeats{first}; ids must be unique in a split")
            seen.add(r["id"])
            yield r

    def finish_split(self, split: str, ds):
        if self.offset_fixes[split]:
            rank_zero_info(f"[data] {split}: moved answer_start of {self.offset_fixes[split]:,} answers to the "
                           "nearest occurrence of their text (--data.fix_answer_offsets)")
        return ds

    def facts(self) -> dict:
        return {"offset_fixes": dict(self.offset_fixes)}

    def restore_facts(self, facts: dict) -> None:
        self.offset_fixes.update(facts.get("offset_fixes", {}))

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok, h = self.tokenizer, self.hparams
        feats = prepare_features(tok, batch["question"], batch["context"], h.max_length, h.doc_stride, batch.get("answers"))
        pair = (batch["question"], batch["context"]) if tok.padding_side == "right" else (batch["context"], batch["question"])
        full = [len(ids) for ids in tok(*pair, truncation=False, return_attention_mask=False, verbose=False)["input_ids"]]
        rows = feats["example"]
        out = {k: [v[r] for r in rows] for k, v in batch.items()}  # one output row per window: input columns repeat
        out.update({k: v for k, v in feats.items() if k != "example"})
        out["length"] = [len(ids) for ids in feats["input_ids"]]
        out["full_length"] = [full[r] for r in rows]
        if "start_positions" in feats:
            cls = [ids.index(tok.cls_token_id) if tok.cls_token_id in ids else 0 for ids in feats["input_ids"]]
            out["answer_in_window"] = [s != c for s, c in zip(feats["start_positions"], cls)]
        return out

    def collate(self, features: list[dict], windows: Counter | None = None) -> dict:
        batch = self.pad_inputs(features)
        batch.update({k: [f[k] for f in features] for k in ("idx", "id", "question", "context", "offsets")})
        if windows is not None:
            batch["n_windows"] = [windows[f["idx"]] for f in features]
        if "answers" in features[0]:
            batch["answers"] = [f["answers"]["text"] for f in features]
        if "start_positions" in features[0]:
            width = batch["inputs"]["input_ids"].shape[1]  # left padding moves every position by the pad count
            shift = [width - len(f["input_ids"]) if self.tokenizer.padding_side == "left" else 0 for f in features]
            batch["start_positions"] = torch.tensor([f["start_positions"] + s for f, s in zip(features, shift)])
            batch["end_positions"] = torch.tensor([f["end_positions"] + s for f, s in zip(features, shift)])
        return batch

    def report_extra(self, split: str, ds) -> list[str]:
        lines = [f"{len(np.unique(numpy_column(ds, 'idx'))):,} questions → {len(ds):,} windows (max_length "
                 f"{self.hparams.max_length}, doc_stride {self.hparams.doc_stride})"]
        if "answer_in_window" in ds.column_names:
            lines.append(f"{numpy_column(ds, 'answer_in_window').mean():.1%} of windows contain the (first) answer; "
                         "the rest point at CLS")
        return lines

    def predict_dataloader(self) -> DataLoader:
        world, rank = self._world()
        ds = self.datasets["predict"]
        idx = numpy_column(ds, "idx")  # one Arrow read each, not a Python call per row
        sampler = ExampleBatchSampler(idx.tolist(), numpy_column(ds, "length").tolist(),
                                      self.hparams.eval_batch_size or 2 * self.hparams.batch_size, num_replicas=world, rank=rank)
        loader = self._loader("predict", sampler)
        # windows per question: predict_step answers a question once it has seen them all (some span several batches)
        loader.collate_fn = partial(self.collate, windows=Counter(idx.tolist()))
        return loader


# ---- model ----------------------------------------------------------------------------------------------------------


class QAModule(TaskModule):
    def __init__(
        self,
        model_name_or_path: str,
        head: HeadConfig | None = None,
        max_length: int = 384,
        doc_stride: int = 128,
        n_best: int = 20,
        max_answer_length: int = 30,
        num_mistakes: int = 20,
        **kwargs,
    ) -> None:
        """The task's own options; the shared ones (optimizer, scheduler, peft, gradient_checkpointing,
        max_length) are ``TaskModule``'s.

        Args:
            model_name_or_path: The pretrained backbone: Hub id, local directory, ``pkg:PACKAGE/dir``.
            head: A custom per-token head giving start/end logits; ``null`` keeps ``AutoModelForQuestionAnswering``'s.
            max_length: Window length for raw-text prediction (linked from ``data.max_length``).
            doc_stride: Window overlap for raw-text prediction; keep it equal to ``data.doc_stride``.
            n_best: Start and end candidates per window, and spans kept per question.
            max_answer_length: Longest answer in tokens.
            num_mistakes: How many of the most confident wrong test answers ``test`` writes out.
        """
        super().__init__(model_name_or_path, max_length=max_length, **kwargs)
        self.head_cfg = as_config(HeadConfig, head)
        self.doc_stride, self.n_best = doc_stride, n_best
        self.max_answer_length, self.num_mistakes = max_answer_length, num_mistakes
        self.save_task_hparams(head=self.head_cfg, doc_stride=doc_stride, n_best=n_best,
                               max_answer_length=max_answer_length, num_mistakes=num_mistakes)
        from transformers import AutoModelForQuestionAnswering

        # head None: the family's own span head (qa_outputs), a standard HF export; else a custom head on every token
        self.build_model(AutoModelForQuestionAnswering, self.head_cfg, 2)
        self.streams: dict[str, dict[int, dict]] = {"val": {}, "test": {}}
        self.pending: dict[int, dict] = {}  # prediction: questions whose windows are not all seen yet
        self.test_artifacts: dict = {}

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.head is None:
            out = self.model(**inputs)
            return out.start_logits, out.end_logits  # (batch, seq) each
        logits = self.head(self.model(**inputs).last_hidden_state)  # (batch, seq, 2)
        return logits[..., 0], logits[..., 1]

    def span_loss(self, start: torch.Tensor, end: torch.Tensor, batch: dict) -> torch.Tensor:
        return (F.cross_entropy(start.float(), batch["start_positions"]) + F.cross_entropy(end.float(), batch["end_positions"])) / 2

    def training_loss(self, batch: dict) -> torch.Tensor:
        return self.span_loss(*self(batch["inputs"]), batch)

    def _window_candidates(self, start: torch.Tensor, end: torch.Tensor, mask: torch.Tensor, offsets: list) -> list[list[Candidate]]:
        """(batch, seq) logits of padded windows → candidates per window (left padding: real tokens start later)."""
        first = mask.long().argmax(1).tolist()  # 0 with right padding
        start, end = start.float().cpu().numpy(), end.float().cpu().numpy()
        return [window_candidates(start[i, f : f + len(o)], end[i, f : f + len(o)], o, self.n_best, self.max_answer_length)
                for i, (f, o) in enumerate(zip(first, offsets))]

    # ---- evaluation: stream n-best candidates per question, score at epoch end -----------------------------------------
    def eval_step(self, batch: dict, stage: str) -> None:
        start, end = self(batch["inputs"])
        if "start_positions" in batch:
            self.log_eval_loss(stage, self.span_loss(start, end, batch), batch["stats"]["samples"])
        stream = self.streams[stage]
        for w, cands in enumerate(self._window_candidates(start, end, batch["inputs"]["attention_mask"], batch["offsets"])):
            ex = stream.setdefault(batch["idx"][w], {"id": batch["id"][w], "question": batch["question"][w],
                                                    "context": batch["context"][w], "gold": batch["answers"][w], "cands": []})
            ex["cands"] = merge_candidates(ex["cands"] + cands, self.n_best)  # never more than n_best per question

    def eval_epoch_end(self, stage: str) -> None:
        merged: dict[int, dict] = {}
        # windows of one question may sit on different ranks: merge their candidates
        for idx, ex in self.gather(list(self.streams[stage].items())):
            if idx in merged:
                ex = {**ex, "cands": merge_candidates(merged[idx]["cands"] + ex["cands"], self.n_best)}
            merged[idx] = ex
        self.streams[stage] = {}
        rows = [{"id": ex["id"], "question": ex["question"], "gold": ex["gold"], **best_answer(ex["cands"], ex["context"], self.n_best)}
                for _, ex in sorted(merged.items())]
        scores = squad_scores({r["id"]: r["answer"] for r in rows}, {r["id"]: r["gold"] for r in rows})
        self.log_dict({f"{stage}/{k}": v for k, v in scores.items()})
        if stage != "test":
            return
        wrong = [r for r in rows if max(exact_match(r["answer"], g) for g in r["gold"]) == 0]
        wrong = heapq.nlargest(self.num_mistakes, wrong, key=lambda r: r["score"])
        self.test_artifacts = {
            "test_predictions.json": {r["id"]: r["answer"] for r in rows},  # the official evaluate-v1.1.py input
            "test_mistakes.json": [{**r, "f1": max(f1(r["answer"], g) for g in r["gold"])} for r in wrong],
        }

    # ---- prediction ---------------------------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self.pending = {}  # nothing left over from an interrupted run

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Answers of the questions whose last window is in this batch. A question's windows come in one batch or, for
        a context longer than a batch holds, in consecutive batches (ExampleBatchSampler): its n-best waits here."""
        start, end = self(batch["inputs"])
        done = []
        for w, cands in enumerate(self._window_candidates(start, end, batch["inputs"]["attention_mask"], batch["offsets"])):
            ex = self.pending.setdefault(batch["idx"][w], {"id": batch["id"][w], "context": batch["context"][w], "cands": [], "seen": 0})
            ex["cands"] = merge_candidates(ex["cands"] + cands, self.n_best)  # never more than n_best per question
            ex["seen"] += 1
            if ex["seen"] == batch["n_windows"][w]:
                done.append(batch["idx"][w])
        out = []
        for idx in done:
            ex = self.pending.pop(idx)
            out.append({"idx": idx, "id": ex["id"], **best_answer(ex["cands"], ex["context"], self.n_best)})
        return out

    def predict_raw(self, tokenizer, question: str | list[str], context: str | list[str], batch_size: int = 32) -> dict | list[dict]:
        """Question(s) + context(s) → ``{"answer", "start", "end", "score"}`` each (character offsets into the context);
        long contexts are cut into windows. A single question gives a single dict."""
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        contexts = [context] if isinstance(context, str) else list(context)
        if len(questions) != len(contexts):
            raise TaskheadError(f"{len(questions)} questions but {len(contexts)} contexts")
        if any(not c.strip() for c in contexts):
            raise TaskheadError("empty context")
        feats = prepare_features(tokenizer, [q.lstrip() for q in questions], contexts, self.max_length, self.doc_stride)
        names = [n for n in tokenizer.model_input_names if n in feats]
        encodings = [{n: feats[n][w] for n in names} for w in range(len(feats["input_ids"]))]

        def run(inputs, idx):
            start, end = self(inputs)
            return self._window_candidates(start, end, inputs["attention_mask"], [feats["offsets"][w] for w in idx])

        per_window = batched_inference(encodings, tokenizer, batch_size, run, self.device)
        cands: list[list[Candidate]] = [[] for _ in questions]
        for ex, c in zip(feats["example"], per_window):
            cands[ex].extend(c)
        out = [best_answer(c, ctx, self.n_best) for c, ctx in zip(cands, contexts)]
        return out[0] if single else out
