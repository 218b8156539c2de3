import math

import pytest
import torch
import torch.nn.functional as F

from taskhead.core.heads import HeadConfig, build_head, pool
from taskhead.core.losses import LossConfig, build_loss, focal_loss
from taskhead.errors import TaskheadError


def test_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],   # last token is padding
                           [[0.0, 0.0], [5.0, -1.0], [7.0, 1.0]]])    # first token is (left) padding
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0], [6.0, 0.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0], [7.0, 1.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0], [5.0, -1.0]]  # first real token


def test_head_layers_and_shapes():
    cfg = HeadConfig(hidden_sizes=[16, 8], activation="relu", dropout=0.2, layer_norm=True)
    head = build_head(cfg, 32, 3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Dropout", "Linear", "LayerNorm", "ReLU", "Dropout", "Linear", "LayerNorm", "ReLU", "Dropout", "Linear"]
    assert head(torch.randn(4, 32)).shape == (4, 3)
    assert head(torch.randn(4, 7, 32)).shape == (4, 7, 3)  # per-token use
    assert [type(m).__name__ for m in build_head(HeadConfig(), 32, 2)] == ["Dropout", "Linear"]


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
TARGET = torch.tensor([0, 2, 1, -100])


def hand_logp(i: int, c: int) -> float:
    row = LOGITS[i].tolist()
    return row[c] - math.log(sum(math.exp(x) for x in row))


def test_weighted_cross_entropy_by_hand():
    fn, w = build_loss(LossConfig(class_weights=[1.0, 2.0, 0.5]), None, 3)
    weights = [1.0, 2.0, 0.5]
    expected = -sum(weights[c] * hand_logp(i, c) for i, c in enumerate([0, 2, 1])) / (1.0 + 0.5 + 2.0)
    assert fn(LOGITS, TARGET, w).item() == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_by_hand():
    eps = 0.1
    fn, w = build_loss(LossConfig(label_smoothing=eps), None, 3)
    terms = []
    for i, c in enumerate([0, 2, 1]):
        nll = -hand_logp(i, c)
        uniform = -sum(hand_logp(i, k) for k in range(3)) / 3
        terms.append((1 - eps) * nll + eps * uniform)
    assert fn(LOGITS, TARGET, w).item() == pytest.approx(sum(terms) / 3, rel=1e-5)


def test_focal_by_hand():
    gamma, weights = 2.0, [1.0, 2.0, 0.5]
    got = focal_loss(LOGITS, TARGET, torch.tensor(weights), gamma).item()
    num = den = 0.0
    for i, c in enumerate([0, 2, 1]):
        lp = hand_logp(i, c)
        num += -weights[c] * (1 - math.exp(lp)) ** gamma * lp
        den += weights[c]
    assert got == pytest.approx(num / den, rel=1e-5)
    # gamma 0 is plain (weighted) cross-entropy
    assert focal_loss(LOGITS, TARGET, None, 0.0).item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item(), rel=1e-5)


def test_balanced_weights():
    fn, w = build_loss(LossConfig(class_weights="balanced"), [30, 10], 2)
    assert w.tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])


def test_loss_config_errors():
    with pytest.raises(TaskheadError, match="label_smoothing applies to 'ce' only"):
        LossConfig(name="focal", label_smoothing=0.1)
    with pytest.raises(TaskheadError, match="3 values for 2 labels"):
        build_loss(LossConfig(class_weights=[1, 2, 3]), None, 2)


# ---- multi-label and regression --------------------------------------------------------------------------------------

MULTI_LOGITS = torch.tensor([[2.0, -1.0, 0.3], [-0.5, 1.5, -2.0]])
MULTI_TARGET = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])


def hand_bce(pos_weight=(1.0, 1.0, 1.0), gamma: float = 0.0, eps: float = 0.0) -> float:
    total = 0.0
    for row, target in zip(MULTI_LOGITS.tolist(), MULTI_TARGET.tolist()):
        for z, y, w in zip(row, target, pos_weight):
            y = y * (1 - eps) + eps / 2
            p = 1 / (1 + math.exp(-z))
            p_t = p * y + (1 - p) * (1 - y)
            total += (1 - p_t) ** gamma * -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
    return total / MULTI_TARGET.numel()


def test_multi_label_losses_by_hand():
    fn, w = build_loss(LossConfig(), None, 3, "multi_label")
    assert w is None and fn(MULTI_LOGITS, MULTI_TARGET, w).item() == pytest.approx(hand_bce(), rel=1e-5)
    # balanced: pos_weight = negatives / positives per label, from [negatives, positives] counts
    fn, w = build_loss(LossConfig(class_weights="balanced"), [[30, 10], [5, 5], [8, 2]], 3, "multi_label")
    assert w.tolist() == [3.0, 1.0, 4.0]
    assert fn(MULTI_LOGITS, MULTI_TARGET, w).item() == pytest.approx(hand_bce((3.0, 1.0, 4.0)), rel=1e-5)
    fn, w = build_loss(LossConfig(name="focal", focal_gamma=2.0, class_weights=[1.0, 2.0, 0.5]), None, 3, "multi_label")
    assert fn(MULTI_LOGITS, MULTI_TARGET, w).item() == pytest.approx(hand_bce((1.0, 2.0, 0.5), gamma=2.0), rel=1e-5)
    fn, w = build_loss(LossConfig(label_smoothing=0.2), None, 3, "multi_label")
    assert fn(MULTI_LOGITS, MULTI_TARGET, w).item() == pytest.approx(hand_bce(eps=0.2), rel=1e-5)


def test_regression_losses():
    pred, target = torch.tensor([[0.5], [3.0], [-1.0]]), torch.tensor([1.0, 0.5, -1.0])
    fn, w = build_loss(LossConfig(), None, 1, "regression")
    assert w is None and fn(pred, target, w).item() == pytest.approx((0.25 + 6.25 + 0.0) / 3)
    fn, _ = build_loss(LossConfig(regression="huber", huber_delta=1.0), None, 1, "regression")
    assert fn(pred, target, None).item() == pytest.approx((0.5 * 0.25 + (2.5 - 0.5) + 0.0) / 3)  # linear beyond delta
    for bad in (LossConfig(name="focal"), LossConfig(class_weights="balanced"), LossConfig(label_smoothing=0.1)):
        with pytest.raises(TaskheadError, match="classification options; choose the regression loss"):
            build_loss(bad, None, 1, "regression")
