"""The baselines' losses against hand-computed values: SimSiam's negative cosine with stop-gradient, the
circle loss, Y-Net's segmentation / classification / quantisation terms and the coupled total."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fdn_core.baselines.losses import (
    CircleLoss,
    SimSiamLoss,
    YNetLoss,
    YNetLossConfig,
    class_set_codes,
    negative_cosine,
    pair_labels,
    presence_from_seg,
)
from fdn_core.errors import ConfigError, DataError


def test_negative_cosine_values() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    z = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    # cosines: 1, 1/sqrt(2), -1
    per_row = negative_cosine(p, z, reduction="none")
    assert per_row.tolist() == pytest.approx([-1.0, -1.0 / math.sqrt(2.0), 1.0])
    assert float(negative_cosine(p, z)) == pytest.approx((-1.0 - 1.0 / math.sqrt(2.0) + 1.0) / 3.0)
    with pytest.raises(DataError):
        negative_cosine(p, z[:2])


def test_simsiam_loss_symmetric_value_and_stop_gradient() -> None:
    p1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    z1 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = SimSiamLoss()(p1, p2, z1, z2)
    # 0.5 * D(p1, z2) + 0.5 * D(p2, z1) = 0.5 * (-1) + 0.5 * (-1/sqrt 2)
    assert float(loss.detach()) == pytest.approx(-0.5 - 0.5 / math.sqrt(2.0))
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stopgrad: no gradient into the target branch
    assert p1.grad is not None and p2.grad is not None
    # d/dp2 of -0.5 cos(p2, z1) at p2 = (0, 1), z1 = (1, 1)/sqrt2: -0.5 * (z1_hat - cos * p2_hat)
    expected = -0.5 * (
        torch.tensor([1.0, 1.0]) / math.sqrt(2.0) - (1.0 / math.sqrt(2.0)) * torch.tensor([0.0, 1.0])
    )
    assert p2.grad[0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_without_stop_gradient_the_target_gets_gradient() -> None:
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[1.0, 1.0]], requires_grad=True)
    negative_cosine(p, z, stop_gradient=False).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def _circle_by_hand(
    sim: list[list[float]], pos: list[list[bool]], neg: list[list[bool]], gamma: float, m: float
):
    losses = []
    for i in range(len(sim)):
        sp = [sim[i][j] for j in range(len(sim)) if pos[i][j]]
        sn = [sim[i][j] for j in range(len(sim)) if neg[i][j]]
        if not sp or not sn:
            continue
        a = sum(math.exp(gamma * max(s + m, 0.0) * (s - m)) for s in sn)
        b = sum(math.exp(-gamma * max(1 + m - s, 0.0) * (s - (1 - m))) for s in sp)
        losses.append(math.log(1.0 + a * b))
    return sum(losses) / len(losses)


def test_circle_loss_matches_the_formula() -> None:
    # three unit vectors at known angles: cos(0,1) = 0.8, cos(0,2) = 0, cos(1,2) = 0.6
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    sim = (F.normalize(x, dim=1) @ F.normalize(x, dim=1).T).tolist()
    pos = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    neg = torch.tensor([[False, False, True], [False, False, True], [True, True, False]])
    for gamma, m in ((32.0, 0.25), (1.0, 0.1)):
        got = float(CircleLoss(scale=gamma, margin=m)(x, pos, neg))
        want = _circle_by_hand(sim, pos.tolist(), neg.tolist(), gamma, m)
        assert got == pytest.approx(want, rel=1e-5)
    # anchor 0 alone, gamma 1, m 0.1: log(1 + e^{0.1*(-0.1)} * e^{-0.3*(0.8-0.9)}) by hand
    hand = math.log(1.0 + math.exp(1.0 * 0.1 * (0.0 - 0.1)) * math.exp(-1.0 * 0.3 * (0.8 - 0.9)))
    per = CircleLoss(scale=1.0, margin=0.1, reduction="none")(x, pos, neg)
    assert float(per[0]) == pytest.approx(hand, rel=1e-6)
    assert float(per[2]) == 0.0  # no positive: no term


def test_circle_loss_prefers_separated_pairs_and_checks_arguments() -> None:
    pos = torch.tensor([[False, True], [True, False]])
    neg = ~pos & ~torch.eye(2, dtype=torch.bool)
    close = torch.tensor([[1.0, 0.0], [0.99, 0.1]])
    assert float(CircleLoss()(close, pos, neg)) == 0.0  # no negatives at all
    three = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]])
    p3 = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    n3 = torch.tensor([[False, False, True], [False, False, True], [True, True, False]])
    good = float(CircleLoss()(three, p3, n3))
    bad = float(CircleLoss()(torch.tensor([[1.0, 0.0], [-0.99, 0.1], [0.99, 0.0]]), p3, n3))
    assert good < bad
    with pytest.raises(ConfigError):
        CircleLoss(scale=0.0)
    with pytest.raises(DataError):
        CircleLoss()(close, pos[:1], neg)


def test_pair_labels_same_class_set_and_level() -> None:
    classes = torch.tensor([0, 0, 3, 3])
    levels = torch.tensor([0.50, 0.53, 0.50, 0.70])
    pos, neg = pair_labels(classes, levels, 0.05)
    assert pos.tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]
    assert not (pos & neg).any() and not neg.diagonal().any()
    assert neg[2, 3] and neg[0, 2]


def test_presence_and_class_set_codes() -> None:
    seg = torch.zeros((3, 4, 4), dtype=torch.long)
    seg[1, 0, 0] = 2
    seg[2, 0, 0], seg[2, 1, 1] = 1, 3
    presence = presence_from_seg(seg)
    assert presence.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert class_set_codes(presence).tolist() == [0, 2, 5]


def test_ynet_loss_terms_by_hand() -> None:
    torch.manual_seed(0)
    b, k, s = 4, 4, 4
    seg_logits = torch.randn(b, k, s, s)
    class_logits = torch.randn(b, 3)
    hash_relaxed = torch.tanh(torch.randn(b, 8))
    seg = torch.zeros((b, s, s), dtype=torch.long)
    seg[0, 1, 1] = 2
    seg[1, 2, 2] = 2
    seg[3, 0, 0] = 3
    levels = torch.tensor([0.5, 0.51, 0.5, 0.9])
    cfg = YNetLossConfig(omega=0.5, w_cls=0.5, w_quant=0.1, scale=32.0, margin=0.25, level_tolerance=0.05)
    total, terms = YNetLoss(cfg)(seg_logits, class_logits, hash_relaxed, seg, levels)
    # segmentation: mean pixel-wise CE, by hand via log-softmax
    logp = torch.log_softmax(seg_logits, dim=1)
    ce = -logp.gather(1, seg[:, None]).mean()
    assert terms["seg_ce"] == pytest.approx(float(ce), rel=1e-5)
    # classification: BCE of the presence of NCR/NET, ED, ET
    presence = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.float32)
    sig = torch.sigmoid(class_logits)
    bce = -(presence * torch.log(sig) + (1 - presence) * torch.log(1 - sig)).mean()
    assert terms["cls_bce"] == pytest.approx(float(bce), rel=1e-5)
    quant = ((hash_relaxed.abs() - 1) ** 2).mean()
    assert terms["quant"] == pytest.approx(float(quant), rel=1e-5)
    pos, neg = pair_labels(torch.tensor([2, 2, 0, 4]), levels, 0.05)
    circle = CircleLoss(32.0, 0.25)(hash_relaxed, pos, neg)
    assert terms["circle"] == pytest.approx(float(circle), rel=1e-5)
    want = 0.5 * circle + 0.5 * ce + 0.5 * bce + 0.1 * quant
    assert float(total) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ConfigError):
        YNetLossConfig(omega=1.5)
