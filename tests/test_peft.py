"""LLM backbones and LoRA: last-token pooling, pad tokens, what LoRA wraps and trains, checkpoints that hold only the
trained weights, merged and adapter exports, gradient checkpointing, and QLoRA's clear refusal without CUDA.

Each pitfall named in issue 15 has a test here: the head lost on save (peft #310/#577), ``all-linear`` wrapping the
head (peft #2027), ``pad_token_id`` only on the tokenizer (transformers #34055), reentrant checkpointing leaving LoRA
without gradients, a quantised head under QLoRA (peft #1720; config and refusal only: no CUDA here).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from lightning.pytorch.plugins.precision import Precision  # noqa: E402

from taskhead.core.heads import pool, resolve_pooling  # noqa: E402
from taskhead.core.peft import PeftConfig, apply_peft, enable_gradient_checkpointing, head_module_names, unwrap  # noqa: E402
from taskhead.core.pretrained import is_decoder_only, load_tokenizer  # noqa: E402
from taskhead.errors import TaskheadError  # noqa: E402
from taskhead.tasks.classification import ClassificationModule  # noqa: E402

from conftest import ROOT, cli_args, run_taskhead  # noqa: E402

LORA = str(ROOT / "configs" / "peft" / "lora.yaml")
QLORA = str(ROOT / "configs" / "peft" / "qlora.yaml")


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_qlora_gpu_check_stops_at_its_first_check_without_cuda():
    """benchmarks/qlora_gpu_check.py is the one command for a GPU machine; here it must say why it cannot run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora_gpu_check.py")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and proc.stdout.strip() == "FAIL a CUDA device is present", proc.stdout + proc.stderr


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
