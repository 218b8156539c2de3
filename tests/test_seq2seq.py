"""Seq2seq generation on tiny config-built models: preprocessing (-100 labels, causal prompt masking, parallel files),
metrics against rouge-score and sacrebleu run directly, the three generator wirings (T5, BART, Marian, BERT2BERT,
decoder-only), and short CLI fit/test/predict runs with export and the taskhead.load round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import taskhead
from taskhead.cli import run_cli
from taskhead.core.export import export_checkpoint
from taskhead.errors import TaskheadError
from taskhead.core.metrics import bleu_scores, rouge_scores, split_sentences
from taskhead.tasks.seq2seq import GeneratedTexts, Seq2SeqModule, synced_gpus
from taskhead.tasks.seq2seq_data import Seq2SeqDataModule, causal_example, chat_frame, parse_file_spec, read_parallel
from taskhead.tasks.seq2seq_models import hit_limit

from conftest import ROOT, run_taskhead, write_jsonl, parsed_rows

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "big", "ran", "home", "and", "small", "bird", "sang"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Copy-ish task: the summary is the first three words of the document (learnable, short)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(5, 12))
        rows.append({"document": " ".join(words), "summary": " ".join(words[:3])})
    return rows


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer Llama with a byte-level BPE tokenizer trained here (vocab 400), both saved to one directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(WORDS)] * 50 + ["Summarize:\nText: Summary: Romanian ă ș ț"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")  # no pad: EOS is used
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=fast.eos_token_id, bos_token_id=None)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pairs")
    return {
        "train": str(write_jsonl(d / "train.jsonl", make_pairs(48, 1))),
        "test": str(write_jsonl(d / "test.jsonl", make_pairs(12, 2))),
        "predict": str(write_jsonl(d / "predict.jsonl", [{"document": r["document"]} for r in make_pairs(6, 3)])),
    }


def dm_for(model, tmp_path, **kw) -> Seq2SeqDataModule:
    return Seq2SeqDataModule(model_name_or_path=model, cache_dir=str(tmp_path / "cache"), **kw)


# ---- preprocessing ----------------------------------------------------------------------------------------------------


def test_file_spec_and_parallel_files(tmp_path):
    assert parse_file_spec("a/b.jsonl[700:800]") == ("a/b.jsonl", slice(700, 800))
    assert parse_file_spec("a/b.jsonl[:5]") == ("a/b.jsonl", slice(None, 5))
    assert parse_file_spec("a/b.jsonl") == ("a/b.jsonl", slice(None))
    (tmp_path / "x.en").write_text("One.\nTwo.\n")
    (tmp_path / "x.ro").write_text("Unu.\nDoi.\n")
    rows = list(read_parallel(tmp_path / "x.en", tmp_path / "x.ro", "en", "ro"))
    assert rows[1] == (f"{tmp_path / 'x.en'}:2", {"translation": {"en": "Two.", "ro": "Doi."}})
    (tmp_path / "y.en").write_text("One.\nTwo.\nThree.\n")
    (tmp_path / "y.ro").write_text("Unu.\nDoi.\n")
    with pytest.raises(TaskheadError, match=r"y.en has 3 lines, .*y.ro has 2"):
        list(read_parallel(tmp_path / "y.en", tmp_path / "y.ro", "en", "ro"))


def test_parallel_errors_name_the_files(tiny_bert, tmp_path):
    (tmp_path / "t.en").write_text("One.\nTwo.\nThree.\n")
    (tmp_path / "t.ro").write_text("Unu.\n\nTrei.\n")
    dm = dm_for(tiny_bert, tmp_path, source_field="translation.en", target_field="translation.ro", source_lang="en",
                target_lang="ro", train_file=str(tmp_path / "t.en"))
    with pytest.raises(TaskheadError, match=r"t.en:2: field 'translation.ro' is empty"):
        dm.data_facts


@pytest.mark.slow
def test_parallel_length_mismatch_exits_2(tiny_bert, tmp_path):
    (tmp_path / "t.en").write_text("One.\nTwo.\nThree.\n")
    (tmp_path / "t.ro").write_text("Unu.\nDoi.\n")
    res = run_taskhead("fit", "--config", str(ROOT / "configs/wmt16_en_ro.yaml"), "--model.model_name_or_path", tiny_bert,
                       "--model.architecture", "encoder_decoder", "--data.architecture", "encoder_decoder",
                       "--data.dataset_name", "null", "--data.source_lang", "en", "--data.target_lang", "ro",
                       "--data.train_file", str(tmp_path / "t.en"), "--data.cache_dir", str(tmp_path / "cache"),
                       "--trainer.logger", "false", "--trainer.accelerator", "cpu")
    assert res.returncode == 2 and "t.en has 3 lines" in res.stderr, res.stderr[-2000:]


def test_encoder_decoder_labels(tiny_bert, tmp_path):
    rows = [{"document": "the cat sat on the mat", "summary": "a cat sat"},
            {"document": "the dog ran home", "summary": "the big red dog ran home and sang and sang"}]
    train = write_jsonl(tmp_path / "t.jsonl", rows * 5)
    dm = dm_for(tiny_bert, tmp_path, train_file=f"{train}[0:6]", extra_train_files=[f"{train}[6:8]"],
                validation_file=f"{train}[8:10]", architecture="encoder_decoder", max_target_length=6)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["validation"]) == 2
    tok = dm.tokenizer
    batch = dm.collate([dm.datasets["train"][i] for i in range(2)])
    labels = batch["labels"]
    assert labels[0].tolist()[:4] == tok("a cat sat", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert labels[0, 4:].eq(-100).all() and not (labels == tok.pad_token_id).any()  # -100 padding, never pad, no CLS
    assert labels[1].tolist()[-1] == tok.sep_token_id and labels.shape[1] == 6  # cut to max_target_length, SEP kept
    assert dm.datasets["train"]["target_full_length"][1] == 11  # 10 words + SEP, counted before truncation (reported)
    assert batch["inputs"]["input_ids"].shape[1] == int(batch["inputs"]["attention_mask"].sum(1).max())
    short = dm_for(tiny_bert, tmp_path, train_file=str(train), max_length=5, architecture="encoder_decoder")
    short.setup("fit")
    row = short.datasets["train"][0]  # "the cat sat on the mat": 6 words + CLS + SEP, cut to 5 with its SEP kept
    assert row["full_length"] == 8 and row["length"] == 5 and row["input_ids"][-1] == tok.sep_token_id


def test_causal_prompt_masking(tiny_llama, tmp_path):
    assert causal_example([5, 6], [7, 8], 1) == ([5, 6, 7, 8, 1], [-100, -100, 7, 8, 1])
    train = write_jsonl(tmp_path / "t.jsonl", make_pairs(4))
    dm = dm_for(tiny_llama, tmp_path, train_file=str(train), validation_file=str(train), architecture="causal",
                source_prefix="Text: ", separator="\nSummary: ")
    dm.setup("fit")
    tok = dm.tokenizer
    ex = dm.datasets["validation"][0]
    prompt = tok("Text: " + ex["source"])["input_ids"] + tok("\nSummary: ", add_special_tokens=False)["input_ids"]
    target = tok(ex["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + target and ex["labels"] == [-100] * len(prompt) + target
    batch = dm.collate([dm.datasets["validation"][i] for i in range(4)])
    gen = batch["gen_inputs"]  # prompts only, left-padded for generation
    assert gen["attention_mask"][:, -1].eq(1).all()
    assert tok.decode(gen["input_ids"][0][gen["attention_mask"][0].bool()]).endswith("\nSummary: ")


@pytest.fixture(scope="session")
def tiny_chat_llama(tiny_llama, tmp_path_factory) -> str:
    """tiny_llama whose tokenizer has a chat template (plain-text markers: no new tokens, the vocab stays 400)."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat-llama") / "m"
    shutil.copytree(tiny_llama, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = ("{% for m in messages %}Text: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Summary:{% endif %}")
    tok.save_pretrained(out)
    return str(out)


def test_chat_template_prompt(tiny_chat_llama, tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_pairs(4))
    kw = dict(train_file=str(train), validation_file=str(train), architecture="causal", source_prefix="Summarize: ",
              separator=" ", chat_template=True)
    dm = dm_for(tiny_chat_llama, tmp_path, **kw)
    dm.setup("fit")
    tok = dm.tokenizer
    assert chat_frame(tok, "P: ", "") == ("Text: P: ", "\nSummary:")
    ex = dm.datasets["validation"][0]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Summarize: " + ex["source"]}], tokenize=False,
                                       add_generation_prompt=True)
    prompt = tok(rendered + " ")["input_ids"]  # the template's own rendering, then the separator (a prefill)
    target = tok(ex["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + target and ex["labels"] == [-100] * len(prompt) + target
    # a long source is cut inside the user turn: the turn's end and the assistant header always survive
    short = dm_for(tiny_chat_llama, tmp_path / "short", **{**kw, "max_length": 12})
    short.setup("fit")
    ids = short.datasets["validation"][0]["input_ids"][: short.datasets["validation"][0]["prompt_length"]]
    assert len(ids) == 12 and tok.decode(ids).startswith("Text: Summarize: ") and tok.decode(ids).endswith("\nSummary: ")
    assert short.datasets["validation"][0]["full_length"] == len(prompt)  # the report counts the chat frame too
    m = Seq2SeqModule(tiny_chat_llama, architecture="causal", source_prefix="Summarize: ", separator=" ", chat_template=True,
                      generation={"num_beams": 1, "max_new_tokens": 3})
    assert m.training_loss(dm.collate([dm.datasets["train"][0]])) > 0  # formats agree (chat_template included)
    with pytest.raises(TaskheadError, match="no chat template"):
        dm_for(tiny_llama, tmp_path / "plain", **kw).setup("fit")
    with pytest.raises(TaskheadError, match="needs architecture: causal"):
        Seq2SeqModule(tiny_chat_llama, architecture="seq2seq", chat_template=True)


def test_unknown_target_tokens_warn(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"document": "the cat", "summary": "🜁 🜂 🜃 cat"}] * 4)
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), validation_file=str(train))
    with pytest.warns(UserWarning, match=r"of target tokens are unknown"):
        dm.setup("fit")


# ---- metrics ----------------------------------------------------------------------------------------------------------

PREDS = ["The cats were sitting on the mat. They slept.", "A man plays guitar", "Stocks fell sharply on Monday."]
REFS = ["The cat sat on the mat. It slept all day!", "A man is playing a guitar.", "Shares dropped on Monday after the report."]


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    got = rouge_scores(PREDS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        assert got[key] == pytest.approx(100 * want)
    nl = [("The cats were sitting on the mat.\nThey slept.", "The cat sat on the mat.\nIt slept all day!"),
          ("A man plays guitar", "A man is playing a guitar."), ("Stocks fell sharply on Monday.", REFS[2])]
    want = sum(scorer.score(r, p)["rougeLsum"].fmeasure for p, r in nl) / 3
    assert got["rougeLsum"] == pytest.approx(100 * want)
    assert split_sentences('He said "Go." Then U.S. troops left. 3 died.') == ['He said "Go."', "Then U.S. troops left.", "3 died."]


def test_corpus_bleu_matches_sacrebleu_and_streams():
    import sacrebleu

    got = bleu_scores(PREDS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    assert "tok:13a" in got["bleu_signature"] and "nrefs:1" in got["bleu_signature"]
    texts = GeneratedTexts("bleu")  # two "batches" in a shuffled order: one corpus score, not a mean of two
    texts.update([2, 0], [PREDS[2], PREDS[0]], [REFS[2], REFS[0]], [5, 9], [False, False])
    texts.update([1], [PREDS[1]], [REFS[1]], [4], [True])
    scores, rows = texts.compute()
    assert [r[0] for r in rows] == [0, 1, 2] and scores["bleu"] == pytest.approx(got["bleu"])
    assert scores["gen_len"] == 6 and scores["hit_max_new_tokens"] == pytest.approx(1 / 3)
    assert hit_limit(torch.tensor([[4, 5, 2], [4, 5, 6]]), [2], 3) == [False, True]


# ---- the three generators ---------------------------------------------------------------------------------------------


def save_seq2seq(kind: str, tokenizer, out: Path) -> str:
    from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    ids = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                                    decoder_start_token_id=tokenizer.pad_token_id, **ids))
    elif kind == "bart":
        model = BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                                        max_position_embeddings=128, decoder_start_token_id=tokenizer.sep_token_id,
                                                        bos_token_id=tokenizer.cls_token_id, **ids))
    else:
        model = MarianMTModel(MarianConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                           max_position_embeddings=128, decoder_start_token_id=tokenizer.pad_token_id, **ids))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("kind", ["t5", "bart", "marian", "bert2bert", "causal"])
def test_generators_loss_and_generate(kind, tiny_bert, tiny_llama, tmp_path):
    from taskhead.core.pretrained import load_tokenizer

    if kind in ("t5", "bart", "marian"):
        path, arch = save_seq2seq(kind, load_tokenizer(tiny_bert), tmp_path / kind), "seq2seq"
    else:
        path, arch = (tiny_bert, "encoder_decoder") if kind == "bert2bert" else (tiny_llama, "causal")
    m = Seq2SeqModule(path, architecture=arch, generation={"num_beams": 2, "max_new_tokens": 5})
    if kind == "bert2bert":
        tok = m.tokenizer
        assert (m.gen_config.decoder_start_token_id, m.gen_config.eos_token_id) == (tok.cls_token_id, tok.sep_token_id)
        assert m.backbone is m.model.encoder
    train = write_jsonl(tmp_path / "t.jsonl", make_pairs(4))
    # max_length within the tiny BART/Marian's 128 positions (checked before any data is read)
    dm = dm_for(path, tmp_path, train_file=str(train), validation_file=str(train), architecture=arch, max_length=128)
    dm.setup("fit")
    batch = dm.collate([dm.datasets["validation"][i] for i in range(4)])
    loss = m.training_loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    m.eval()  # dropout off: generation is deterministic
    texts, lengths, hit = m.generate(batch["gen_inputs"])
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts) and all(0 <= n <= 5 for n in lengths)
    single = m.predict_raw(m.tokenizer, [parsed_rows(dm, "validation")[1]["source"]])
    assert single == [texts[[int(i) for i in batch["idx"]].index(1)]]  # raw text path == batch path (greedy/beam)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # eval_step outside a Trainer: the loss metric is read here
def test_eval_loss_is_unsmoothed_token_cross_entropy(tiny_llama, tmp_path):
    """Training smooths the labels; val/loss is the plain token cross-entropy over every target token of the split
    (one long target and three one-word targets in two batches: a mean by examples would differ)."""
    import torch.nn.functional as F

    rows = [{"document": "the cat sat on the mat", "summary": " ".join(WORDS * 2)}] + \
           [{"document": f"a {w} ran home", "summary": w} for w in ("dog", "bird", "cat")]
    val = write_jsonl(tmp_path / "v.jsonl", rows)
    dm = dm_for(tiny_llama, tmp_path, train_file=str(val), validation_file=str(val), architecture="causal", max_length=128,
                max_target_length=64)
    dm.setup("fit")
    feats = sorted((dm.datasets["validation"][i] for i in range(4)), key=lambda f: -len(f["labels"]))
    batches = [dm.collate(feats[:1]), dm.collate(feats[1:])]
    m = Seq2SeqModule(tiny_llama, architecture="causal", loss={"label_smoothing": 0.1}, val_generate_samples=0).eval()
    real_forward = m.forward

    def confident(inputs, labels):  # mostly right and sure of it: smoothing then moves the loss (an untrained model's
        logits, targets = real_forward(inputs, labels)  # near-uniform logits would hide it)
        return logits.scatter(-1, targets.clamp(min=0).unsqueeze(-1), 5.0), targets

    m.forward = confident
    with torch.no_grad():
        for batch in batches:
            m.eval_step(batch, "val")
        logits, targets = zip(*(m._logits(b) for b in batches))
        smoothed = m.training_loss(batches[0])
    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=-100)
    assert float(m.eval_loss["val"].compute()) == pytest.approx(float(expected), rel=1e-5)
    assert float(smoothed) != pytest.approx(float(F.cross_entropy(logits[0], targets[0], ignore_index=-100)), rel=0.05)


def test_synced_gpus_only_when_weights_are_sharded_over_ranks():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    class MyFSDP(FSDPStrategy):  # a user's subclass (e.g. to run on CPU) shards all the same
        pass

    def deepspeed(stage: int):
        strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # the deepspeed package is not needed to read the stage
        strategy.config = {"zero_optimization": {"stage": stage}}
        return strategy

    for strategy in (FSDPStrategy(), MyFSDP(), ModelParallelStrategy(), deepspeed(3)):
        assert synced_gpus(strategy, 2) and not synced_gpus(strategy, 1), type(strategy).__name__
    for strategy in (DDPStrategy(), deepspeed(2)):
        assert not synced_gpus(strategy, 2), type(strategy).__name__


def test_generate_passes_synced_gpus_under_fsdp(tiny_llama, monkeypatch):
    """Under a sharded strategy every decoding step is a collective: generate must keep finished ranks stepping."""
    from types import SimpleNamespace

    m = Seq2SeqModule(tiny_llama, architecture="causal", generation={"max_new_tokens": 2})
    seen = []
    real = m.model.generate
    monkeypatch.setattr(m.model, "generate", lambda **kw: seen.append(kw["synced_gpus"]) or real(**{**kw, "synced_gpus": False}))
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    m.generate(inputs)  # no Trainer (predict_raw)
    asked = []
    fsdp = type("FSDPStrategy", (), {"reduce_boolean_decision": lambda self, d, all: asked.append(d) or True})()
    m._trainer = SimpleNamespace(strategy=fsdp, world_size=2)
    m.generate(inputs)
    assert seen == [False, True]
    # validation past val_generate_samples: this rank keeps no example, but another rank generates (the "any" is True),
    # so this rank joins with one row and records nothing
    batch = {"format": ("causal", "", "\n", False), "inputs": inputs, "labels": torch.tensor([[-100, -100, 7]]),
             "idx": torch.tensor([9]), "gen_inputs": inputs, "targets": ["x"]}
    m.val_generate_samples = 5
    monkeypatch.setattr(m, "log_eval_loss", lambda *a: None)
    m.eval_step(batch, "val")
    assert asked == [False] and seen == [False, True, True] and m.texts["val"].rows == []


# ---- end to end through the CLI ---------------------------------------------------------------------------------------


def cli(model: str, arch: str, files: dict[str, str], run_root: Path, *extra: str) -> list[str]:
    args = ["--config", str(ROOT / "configs/xsum.yaml"), "--model.model_name_or_path", model,
            "--model.architecture", arch, "--data.architecture", arch, "--data.dataset_name", "null",
            "--model.generation", '{"num_beams": 2, "max_new_tokens": 6, "no_repeat_ngram_size": 0}',
            "--model.val_generate_samples", "4", "--model.optimizer.lr", "1e-3",
            "--data.cache_dir", str(run_root / "cache"), "--data.batch_size", "8", "--data.max_length", "32",
            "--data.max_target_length", "8", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--trainer.default_root_dir", str(run_root / "runs"),
            "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1",
            "--trainer.num_sanity_val_steps", "0"]
    for split, path in files.items():
        args += [f"--data.{split}_file", path]
    return args + list(extra)


@pytest.mark.parametrize("arch", ["encoder_decoder", "causal", "causal_chat"])
def test_cli_fit_test_predict_export(arch, tiny_bert, tiny_llama, tiny_chat_llama, pair_files, tmp_path):
    model = {"encoder_decoder": tiny_bert, "causal": tiny_llama, "causal_chat": tiny_chat_llama}[arch]
    extra = ("--model.source_prefix", "Text: ", "--data.source_prefix", "Text: ")
    if arch == "causal_chat":  # the chat template in fit, test, predict and the export (taskhead.load)
        arch, extra = "causal", (*extra, "--model.chat_template", "true", "--data.chat_template", "true")
    fit = run_cli(["fit", *cli(model, arch, {"train": pair_files["train"]}, tmp_path, *extra)])
    run = Path(fit.trainer.log_dir)
    assert "val/rougeL" in fit.trainer.callback_metrics
    ckpt = run / "checkpoints" / "last.ckpt"
    test = run_cli(["test", *cli(model, arch, {"test": pair_files["test"]}, tmp_path, *extra), "--ckpt_path", str(ckpt)])
    test_dir = Path(test.trainer.log_dir)
    metrics = json.loads((test_dir / "metrics.json").read_text())
    assert {"test/rouge1", "test/rouge2", "test/rougeL", "test/rougeLsum", "test/gen_len"} <= set(metrics)
    gens = json.loads((test_dir / "test_generations.json").read_text())
    assert [g["index"] for g in gens] == list(range(12))
    pred_file = tmp_path / "preds.jsonl"
    run_cli(["predict", *cli(model, arch, {"predict": pair_files["predict"]}, tmp_path, *extra), "--ckpt_path", str(ckpt),
             "--artifacts.predictions_file", str(pred_file)])
    preds = [json.loads(line)["generated_text"] for line in pred_file.read_text().splitlines()]
    assert len(preds) == 6

    out = export_checkpoint(ckpt, tmp_path / "export")
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["num_beams"] == 2 and gen_cfg["max_new_tokens"] == 6
    docs = [json.loads(line)["document"] for line in Path(pair_files["predict"]).read_text().splitlines()]
    assert taskhead.load(out, precision="32-true")(docs) == preds  # same text, same order as `taskhead predict`


@pytest.mark.slow
def test_ddp_test_and_predict_equal_single_process(tiny_llama, pair_files, tmp_path):
    """2 CPU processes (gloo): the generations gathered from both ranks (TaskModule.gather), the token-weighted
    test/loss and the predictions file (RunArtifacts) are those of one process."""
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        root = tmp_path / f"d{devices}"
        extra = ("--trainer.devices", str(devices), "--trainer.strategy", strategy, "--data.eval_batch_size", "4")
        proc = run_taskhead("test", *cli(tiny_llama, "causal", {"test": pair_files["test"]}, root, *extra), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = next((root / "runs").rglob("metrics.json")).parent
        preds = root / "preds.jsonl"
        proc = run_taskhead("predict", *cli(tiny_llama, "causal", {"predict": pair_files["predict"]}, root, *extra,
                                            "--artifacts.predictions_file", str(preds)), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = (json.loads((out / "metrics.json").read_text()),
                            json.loads((out / "test_generations.json").read_text()), preds.read_text())
    (m1, g1, p1), (m2, g2, p2) = results[1], results[2]
    assert [g["index"] for g in g2] == list(range(12)) and g2 == g1 and p2 == p1 and len(p1.splitlines()) == 6
    assert set(m2) == set(m1) and "test/loss" in m1
    for key, value in m1.items():
        assert m2[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
def test_fsdp2_generation_with_ranks_finishing_at_different_steps(tiny_llama, tmp_path):
    """FSDP2 on 2 CPU ranks (gloo), every decoder layer sharded: rank 0 generates 2 tokens a sequence, rank 1 8. Each
    decoding step all-gathers the layers' weights, so rank 1's third step waits for a rank 0 that has stopped: without
    synced_gpus this run hangs (measured: still hung after 10 minutes, deaf to SIGTERM); with it both finish."""
    import os
    import signal
    import subprocess
    import sys

    test = write_jsonl(tmp_path / "test.jsonl", [{"document": f"the {w} sat on a mat", "summary": f"{w} sat"}
                                                 for w in ("cat", "dog", "bird", "red")])
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fsdp_generate.py"), tiny_llama, str(test), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's second rank too
        proc.communicate()
        pytest.fail("FSDP generation hung: the ranks' decoding steps went out of step (synced_gpus?)")
    assert proc.returncode == 0, err[-3000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["test/gen_len"] == 5.0  # (2 + 2 + 8 + 8) / 4: each rank generated its own length


@pytest.mark.parametrize("collapse", ["stub", "zero_lm_head"])
def test_collapsed_outputs_warn(collapse, tiny_llama, tmp_path, monkeypatch):
    """`taskhead test` without --ckpt_path scores the model as configured (zero-shot) and warns when its outputs collapse:
    a stub generate() that returns one text for every input, and a real model whose LM head is all zeros (greedy
    decoding then picks token 0 at every step: the same empty output, never an EOS, for every document)."""
    from transformers import AutoModelForCausalLM

    model, extra = tiny_llama, []
    if collapse == "stub":
        def same_text(self, inputs):
            n = inputs["input_ids"].shape[0]
            return ["a man who died in the world cup has been found in the world cup ."] * n, [14] * n, [False] * n
        monkeypatch.setattr(Seq2SeqModule, "generate", same_text)
    else:
        lm = AutoModelForCausalLM.from_pretrained(tiny_llama)
        torch.nn.init.zeros_(lm.lm_head.weight)
        model = str(tmp_path / "collapsed")
        lm.save_pretrained(model)
        shutil.copy(Path(tiny_llama) / "tokenizer.json", model)
        shutil.copy(Path(tiny_llama) / "tokenizer_config.json", model)
        extra = ["--model.generation", '{"num_beams": 1, "max_new_tokens": 6}']  # greedy: argmax of all-equal logits = 0
    test_file = write_jsonl(tmp_path / "test.jsonl", make_pairs(24, 5))
    with pytest.warns(UserWarning, match=r"outputs collapsed: only 4% of 24 outputs are distinct") as caught:
        run = run_cli(["test", *cli(model, "causal", {"test": str(test_file)}, tmp_path, *extra)])
    scores = json.loads((Path(run.trainer.log_dir) / "test_scores.json").read_text())
    assert scores["distinct_outputs"] == pytest.approx(1 / 24) and scores["weights"] == "pretrained"
    cut = [str(w.message) for w in caught if "hit max_new_tokens" in str(w.message)]
    assert scores["hit_max_new_tokens"] == (1.0 if collapse == "zero_lm_head" else 0.0) and len(cut) == (collapse != "stub")


@pytest.mark.parametrize("task, offline", [("xsum", "xsum"), ("xsum", "xsum_bert2bert"), ("wmt16_en_ro", "wmt16_en_ro")])
def test_shipped_configs_parse(task, offline, capsys):
    for extra in ([], ["--config", str(ROOT / f"configs/offline/{offline}.yaml")]):
        with pytest.raises(SystemExit) as e:
            run_cli(["fit", "--config", str(ROOT / f"configs/{task}.yaml"), *extra, "--print_config"])
        assert e.value.code in (0, None)
        printed = capsys.readouterr().out
        assert "taskhead.tasks.seq2seq.Seq2SeqModule" in printed and "Seq2SeqDataModule" in printed


def test_data_and_model_formats_must_agree(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_pairs(4))
    dm = dm_for(tiny_bert, tmp_path, train_file=str(train), validation_file=str(train), architecture="encoder_decoder",
                source_prefix="summarize: ")
    dm.setup("fit")
    m = Seq2SeqModule(tiny_bert, architecture="encoder_decoder")
    with pytest.raises(TaskheadError, match="source_prefix"):
        m.training_loss(dm.collate([dm.datasets["train"][0]]))
