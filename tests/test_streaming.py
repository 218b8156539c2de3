"""--data.streaming: the train split of a Hub dataset read as a ``datasets.IterableDataset`` (a local dataset directory
is loaded by the same ``load_dataset(path, streaming=True)`` call a Hub id is), sharded per rank, length-grouped in a
buffer, resumed exactly; and the options it cannot honour, refused in one line."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning.pytorch.callbacks import Callback

from conftest import cli_args, make_reviews, run_taskhead, write_jsonl
from test_faults import last_checkpoint
from taskhead.cli import main, run_cli
from taskhead.core.streaming import StreamBatches, length_grouped
from taskhead.errors import TaskheadError
from taskhead.tasks.classification import ClassificationDataModule

LABELS = ["neg", "pos"]


def reviews(n: int, seed: int) -> list[dict]:
    """Reviews of 5 to ~60 words, each named by a unique first word (``r<i>``) so a batch's rows can be told apart."""
    rng = random.Random(seed)
    rows = make_reviews(n, seed)
    for i, r in enumerate(rows):
        r["text"] = f"r{i} " + " ".join([r["text"]] * rng.randint(1, 4))
    return rows


def hub_dir(root: Path, train: list[dict], validation: list[dict] | None = None) -> str:
    """A dataset directory as a Hub repo holds one (``data/<split>.jsonl``)."""
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "train.jsonl", train)
    if validation is not None:
        write_jsonl(root / "data" / "validation.jsonl", validation)
    return str(root)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> str:
    return hub_dir(tmp_path_factory.mktemp("hub"), reviews(96, 1), reviews(16, 2))


def datamodule(tiny_bert, hub, tmp_path, **kw) -> ClassificationDataModule:
    opts = dict(model_name_or_path=tiny_bert, dataset_name=hub, streaming=True, label_names=LABELS, batch_size=8,
                cache_dir=str(tmp_path / "cache"), max_length=64)
    return ClassificationDataModule(**{**opts, **kw})


def texts(batch: list[dict]) -> list[str]:
    return [e["text"].split()[0] for e in batch]


def test_fit_streams_a_few_steps(tiny_bert, hub, tmp_path):
    args = cli_args(tiny_bert, {}, tmp_path, "--data.dataset_name", hub, "--data.streaming", "true",
                    "--data.label_names", "[neg, pos]", "--data.val_split", "0.5", "--trainer.max_steps", "3",
                    "--trainer.val_check_interval", "2", "--data.batch_size", "8")
    cli = run_cli(["fit", *args])
    assert cli.trainer.global_step == 3
    assert "val/acc" in cli.trainer.callback_metrics
    assert cli.model.label_names == LABELS and cli.model.hparams.label_counts is None  # a stream is not counted
    assert len(cli.datamodule.datasets["validation"]) == 16  # the dataset's own validation split, read as usual


def test_the_label_set_comes_from_the_hubs_class_label(tiny_bert, tmp_path):
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])})
    (tmp_path / "cl" / "data").mkdir(parents=True)
    for split, seed in (("train", 1), ("validation", 2)):
        rows = [{"text": r["text"], "label": ["pos", "neg"].index(r["label"])} for r in reviews(24, seed)]
        datasets.Dataset.from_list(rows, features=feats).to_parquet(tmp_path / "cl" / "data" / f"{split}-00000-of-00001.parquet")
    dm = datamodule(tiny_bert, str(tmp_path / "cl"), tmp_path, label_names=None)
    dm.setup("fit")
    assert dm.label_names == ["pos", "neg"]  # the ClassLabel's order, not sorted
    batch = next(iter(dm.train_dataloader()))
    truth = {r["text"].split()[0]: ["pos", "neg"].index(r["label"]) for r in reviews(24, 1)}
    assert batch["labels"].tolist() == [truth[t.split()[0]] for t in batch["text"]]


def test_batches_are_length_grouped_within_the_buffer(tiny_bert, hub, tmp_path):
    def padding_share(group_by_length: bool) -> float:
        dm = datamodule(tiny_bert, hub, tmp_path, group_by_length=group_by_length)
        dm.setup("fit")
        stats = [b["stats"] for b in itertools.islice(iter(dm.train_dataloader()), 12)]  # one pass: 96 / 8
        return 1 - sum(s["tokens"] for s in stats) / sum(s["padded"] for s in stats)

    grouped, shuffled = padding_share(True), padding_share(False)
    assert grouped < 0.5 * shuffled, (grouped, shuffled)


def test_length_grouped_sorts_each_mega_batch_and_shuffles_its_batches():
    examples = [{"length": n} for n in [3, 9, 1, 7, 5, 2, 8, 4]]
    orders = set()
    for seed in range(8):
        batches = [[e["length"] for e in b] for b in length_grouped(examples, 2, 4, np.random.default_rng(seed))]
        assert sorted(batches[:2]) == [[3, 1], [9, 7]] and sorted(batches[2:]) == [[4, 2], [8, 5]]  # mega-batch by mega-batch
        orders.add(tuple(map(tuple, batches)))
    assert len(orders) > 1  # the batches of a mega-batch come in a shuffled order


def test_two_ranks_see_disjoint_examples(tiny_bert, hub, tmp_path):
    dm = datamodule(tiny_bert, hub, tmp_path)
    dm.setup("fit")
    seen = []
    for rank in (0, 1):
        batches = StreamBatches(dm.datasets["train"], "hub[train]", dm, 8, seed=42, num_replicas=2, rank=rank)
        seen.append([t for b in itertools.islice(iter(batches), 6) for t in texts(b)])  # one pass: 48 rows per rank
    assert len(set(seen[0])) == len(set(seen[1])) == 48
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"r{i}" for i in range(96)}


def test_resume_continues_exactly_where_it_stopped(tiny_bert, hub, tmp_path):
    dm = datamodule(tiny_bert, hub, tmp_path)
    dm.setup("fit")
    straight = [texts(b) for b in itertools.islice(iter(StreamBatches(dm.datasets["train"], "h", dm, 8, 42)), 16)]
    assert straight[12:] != straight[:4]  # the second pass is shuffled anew
    dm.load_state_dict({"train_epoch": 0, "train_batches_done": 5})  # what a checkpoint after 5 batches holds
    loader = dm.train_dataloader()
    resumed = [b["text"] for b in itertools.islice(iter(loader), 11)]
    assert [[t.split()[0] for t in b] for b in resumed] == straight[5:]


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_read_shares_of_their_own_and_resume_exactly(tiny_bert, hub, tmp_path, workers):
    """Each DataLoader worker reads a 1/W share (a one-file dataset: every W-th row), so one pass of the loader holds
    every row once; a resumed loader continues the uninterrupted order (the workers are dealt their streams anew)."""
    dm = datamodule(tiny_bert, hub, tmp_path, num_workers=workers)
    dm.setup("fit")
    straight = [[t.split()[0] for t in b["text"]] for b in itertools.islice(iter(dm.train_dataloader()), 24)]
    first_pass = [t for b in straight[:12] for t in b]  # 96 rows: 12 batches of 8, W streams of 96 / W rows each
    assert sorted(first_pass) == sorted(f"r{i}" for i in range(96))
    for done in (5, 7):
        dm.load_state_dict({"train_epoch": 0, "train_batches_done": done})
        resumed = [[t.split()[0] for t in b["text"]] for b in itertools.islice(iter(dm.train_dataloader()), 24 - done)]
        assert resumed == straight[done:], done


def test_a_share_without_rows_is_an_error_not_an_endless_loop(tiny_bert, tmp_path):
    one_row = hub_dir(tmp_path / "one-row", reviews(1, 3), reviews(2, 4))
    dm = datamodule(tiny_bert, one_row, tmp_path)
    dm.setup("fit")
    with pytest.raises(TaskheadError, match=r"share 1 of 2 \(ranks x --data.num_workers\) has no rows"):
        next(iter(StreamBatches(dm.datasets["train"], "one[train]", dm, 8, seed=42, num_replicas=2, rank=1)))


def test_ddp_two_ranks_with_workers_stream_to_max_steps(tiny_bert, hub, tmp_path):
    """A real 2-process run (gloo) with 2 workers per rank: every rank trains max_steps batches and validates."""
    args = cli_args(tiny_bert, {}, tmp_path, "--data.dataset_name", hub, "--data.streaming", "true",
                    "--data.label_names", "[neg, pos]", "--trainer.max_steps", "4", "--data.batch_size", "4",
                    "--data.num_workers", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = run_taskhead("fit", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/acc" in proc.stderr  # the [val] line: every rank reached validation
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4


class StopAtStep(Callback):
    """Stop the run with an error once ``global_step`` reaches ``step`` (a crash after the last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("stopped")


def test_fit_resumed_from_last_checkpoint_matches_an_uninterrupted_run(tiny_bert, hub, tmp_path):
    def args(root: Path) -> list[str]:
        return cli_args(tiny_bert, {}, root, "--data.dataset_name", hub, "--data.streaming", "true",
                        "--data.label_names", "[neg, pos]", "--data.batch_size", "8", "--trainer.max_steps", "16",
                        "--trainer.val_check_interval", "8", "--last_checkpoint.every_n_steps", "5",
                        "--model.optimizer.lr", "3e-3", "--model.scheduler.warmup_ratio", "0")

    run_cli(["fit", *args(tmp_path / "straight")])
    stop = '{"class_path": "test_streaming.StopAtStep", "init_args": {"step": 7}}'
    with pytest.raises(RuntimeError, match="stopped"):
        run_cli(["fit", *args(tmp_path / "stopped"), f"--trainer.callbacks+={stop}"])
    at_stop = last_checkpoint(tmp_path / "stopped")
    data_state, = (v for k, v in at_stop.items() if k.endswith("DataModule"))
    assert at_stop["global_step"] == 5 and data_state == {"train_epoch": 0, "train_batches_done": 5}
    run_cli(["fit", *args(tmp_path / "stopped"), "--ckpt_path", "last"])  # 12 batches a pass: resumes in the 1st pass
    resumed, reference = last_checkpoint(tmp_path / "stopped"), last_checkpoint(tmp_path / "straight")
    assert resumed["global_step"] == reference["global_step"] == 16  # into the second, reshuffled pass
    for name, value in reference["state_dict"].items():  # the same batches in the same order: the same weights
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_bad_record_names_its_row(tiny_bert, tmp_path):
    rows = reviews(20, 3)
    rows[13] = {"text": "", "label": "pos"}
    dm = datamodule(tiny_bert, hub_dir(tmp_path / "bad", rows, reviews(4, 4)), tmp_path)
    dm.setup("fit")
    with pytest.raises(TaskheadError, match=r"bad\[train\] row 13: field 'text'"):
        next(iter(dm.train_dataloader()))


def test_a_bad_record_read_by_a_worker_is_one_line(tiny_bert, tmp_path, capsys):
    """torch re-raises a worker's error with the worker's traceback in its message: the CLI still prints one line."""
    rows = reviews(20, 3)
    rows[13] = {"text": "", "label": "pos"}
    bad = hub_dir(tmp_path / "bad", rows, reviews(4, 4))
    args = cli_args(tiny_bert, {}, tmp_path, "--data.dataset_name", bad, "--data.streaming", "true",
                    "--data.label_names", "[neg, pos]", "--trainer.max_steps", "4", "--data.batch_size", "4",
                    "--data.num_workers", "2")
    with pytest.raises(SystemExit) as e:
        main(["fit", *args])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("taskhead")]
    assert e.value.code == 2 and len(err) == 1 and "bad[train] row 13: field 'text' is empty" in err[0], err


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line_each(tiny_bert, hub, tmp_path, capsys):
    with pytest.raises(TaskheadError, match="set --data.dataset_name and no --data.train_file") as e:
        ClassificationDataModule(train_file=str(tmp_path / "x.jsonl"), streaming=True)
    one_line(e)
    with pytest.raises(TaskheadError, match="give --data.label_names") as e:
        datamodule(tiny_bert, hub, tmp_path, label_names=None).setup("fit")
    one_line(e)
    only_train = hub_dir(tmp_path / "only-train", reviews(8, 5))
    with pytest.raises(TaskheadError, match="has no validation split and none is held out of a stream") as e:
        datamodule(tiny_bert, only_train, tmp_path).setup("fit")
    one_line(e)
    base = cli_args(tiny_bert, {}, tmp_path, "--data.dataset_name", hub, "--data.streaming", "true",
                    "--data.label_names", "[neg, pos]")
    for extra, message in ([], "--data.streaming needs --trainer.max_steps"), \
            (["--trainer.max_steps", "2", "--model.loss.class_weights", "balanced"],
             "balanced needs training label counts (no train split was loaded, or --data.streaming"):
        with pytest.raises(SystemExit) as e:
            main(["fit", *base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "runs").exists()  # refused before any run directory


def other_tasks(root: Path) -> dict[str, tuple[type, str, dict]]:
    """Per task: its DataModule, a streamed dataset directory (NER: Parquet with ``Sequence(ClassLabel)`` tags) and
    options."""
    import datasets

    from taskhead.tasks.multiple_choice import MultipleChoiceDataModule
    from taskhead.tasks.ner import NerDataModule
    from taskhead.tasks.qa import QADataModule
    from taskhead.tasks.seq2seq_data import Seq2SeqDataModule

    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
    ner = [{"tokens": ["Ann", "lives", "in", "Paris", f"x{i}"], "ner_tags": [1, 0, 0, 3, 0]} for i in range(24)]
    (root / "ner" / "data").mkdir(parents=True)
    for split, rows in (("train", ner), ("validation", ner[:4])):
        datasets.Dataset.from_list(rows, features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                                                     "ner_tags": tags})
                                   ).to_parquet(root / "ner" / "data" / f"{split}-00000-of-00001.parquet")
    qa = [{"id": f"q{i}", "question": "who?", "context": f"Ann met Bob {i} times. " * 6,
           "answers": {"text": ["Bob"], "answer_start": [8]}} for i in range(24)]
    mc = [{"ctx": f"c {i}", "endings": ["a", "b", "c"], "label": i % 3} for i in range(24)]
    s2s = [{"document": f"long text number {i}", "summary": f"text {i}"} for i in range(24)]
    return {
        "ner": (NerDataModule, str(root / "ner"), {}),
        "qa": (QADataModule, hub_dir(root / "qa", qa, qa[:4]), {"max_length": 32, "doc_stride": 8}),  # 3 windows each
        "mc": (MultipleChoiceDataModule, hub_dir(root / "mc", mc, mc[:4]), {"context_field": "ctx", "choices_field": "endings"}),
        "seq2seq": (Seq2SeqDataModule, hub_dir(root / "s2s", s2s, s2s[:4]), {"architecture": "encoder_decoder"}),
    }


@pytest.mark.parametrize("task", ["ner", "qa", "mc", "seq2seq"])
def test_every_task_streams_batches(task, tiny_bert, tmp_path):
    cls, path, kw = other_tasks(tmp_path)[task]
    dm = cls(model_name_or_path=tiny_bert, dataset_name=path, streaming=True, batch_size=4, cache_dir=str(tmp_path / "c"), **kw)
    dm.model_args()
    dm.setup("fit")
    if task == "ner":
        assert dm.label_names == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]  # from the stream's Sequence(ClassLabel)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 6))
    target = "start_positions" if task == "qa" else "labels"
    assert all(b["inputs"]["input_ids"].shape[0] == 4 and b[target].shape[0] == 4 for b in batches)
    if task == "qa":  # every window keeps its own question's fields
        assert all(f"Bob {q[1:]} times" in c for b in batches for q, c in zip(b["id"], b["context"]))
