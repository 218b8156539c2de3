import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from taskhead.core.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler, layer_index, param_groups
from taskhead.tasks.classification import ClassificationModule


@pytest.fixture(scope="module")
def module(tiny_bert):
    return ClassificationModule(tiny_bert, label_names=["neg", "pos"])


def test_layer_index():
    assert layer_index("embeddings.word_embeddings.weight", 6) == 0
    assert layer_index("encoder.layer.0.attention.self.query.weight", 6) == 1
    assert layer_index("transformer.layer.5.ffn.lin1.weight", 6) == 6
    assert layer_index("pooler.dense.weight", 6) == 7


def test_layerwise_decay_head_lr_and_no_decay(module):
    cfg = OptimizerConfig(lr=1e-4, head_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(module, module.backbone, 2, cfg)}
    # tiny BERT has 2 layers: layer 2 (top) gets lr, layer 1 lr * 0.5, embeddings lr * 0.25; pooler above → lr
    assert groups["backbone.layer_2"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone.layer_1"]["lr"] == pytest.approx(5e-5)
    assert groups["backbone.layer_0"]["lr"] == pytest.approx(2.5e-5)
    assert groups["backbone.layer_3"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["head.no_decay"]["lr"] == pytest.approx(1e-3)
    for name, g in groups.items():
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.05)
        assert all((p.ndim < 2) == name.endswith("no_decay") for p in g["params"])
    # every trainable parameter is in exactly one group
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.parameters()))
    named = dict(module.named_parameters())
    assert named["model.classifier.weight"] in groups["head"]["params"]
    assert any(p is named["model.bert.encoder.layer.0.output.LayerNorm.weight"] for p in groups["backbone.layer_1.no_decay"]["params"])


def lrs_at(cfg: SchedulerConfig, steps: list[int], total: int = 100, base: float = 1.0) -> list[float]:
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": base}], OptimizerConfig(lr=base))
    sched = build_scheduler(opt, cfg, total)
    out, step = [], 0
    for target in steps:
        while step < target:
            opt.step()
            sched.step()
            step += 1
        out.append(opt.param_groups[0]["lr"])
    return out


def test_schedules_at_chosen_steps():
    assert lrs_at(SchedulerConfig("linear", warmup_steps=10), [0, 5, 10, 55, 100]) == pytest.approx([0, 0.5, 1, 0.5, 0])
    cos = lrs_at(SchedulerConfig("cosine", warmup_ratio=0.2), [10, 20, 60, 100])
    assert cos == pytest.approx([0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0], abs=1e-9)
    assert lrs_at(SchedulerConfig("constant", warmup_steps=4), [2, 4, 90]) == pytest.approx([0.5, 1, 1])
    poly = lrs_at(SchedulerConfig("polynomial", warmup_steps=0, power=2.0, lr_end=0.0), [50])
    assert poly == pytest.approx([0.25])


def test_groups_keep_their_ratio_under_the_schedule(module):
    cfg = OptimizerConfig(lr=1e-4, head_lr=1e-3, layer_decay=0.5)
    groups = param_groups(module, module.backbone, 2, cfg)
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, SchedulerConfig("linear", warmup_steps=10), 100)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == pytest.approx(5e-4) and lrs["backbone.layer_0"] == pytest.approx(1.25e-5)



class GradNorms(Callback):
    """Total gradient norm after each optimiser step (Lightning zeroes gradients only before the next step)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad.float() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_with_gradient_clipping(precision, tiny_bert, review_files, tmp_path):
    """Lightning refuses to clip for a fused optimizer under bf16 autocast; TaskModule clips it itself (no scaler)."""
    from taskhead.cli import run_cli

    from conftest import cli_args

    def fit(clip: str):
        args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path / clip, "--trainer.max_steps", "3",
                        "--trainer.precision", precision, "--trainer.gradient_clip_val", clip,
                        '--trainer.callbacks+={"class_path": "test_optim.GradNorms"}')
        cli = run_cli(["fit", *args])
        assert cli.trainer.optimizers[0].defaults["fused"] is True
        return next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradNorms)).norms

    unclipped, clipped = fit("1000"), fit("0.001")
    assert len(clipped) == 3 and min(unclipped) > 0.01  # clipping at 1e-3 has something to clip
    assert max(clipped) == pytest.approx(1e-3, rel=1e-2)
