"""FDN losses against hand-computed values, and the distribution-matching split and sign convention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fdn_core.config import config_from_dict
from fdn_core.errors import ConfigError, DataError
from fdn_core.losses import (
    CriticLoss,
    FDNLoss,
    GeneralizedDiceLoss,
    LossConfig,
    ReconstructionLoss,
    SegmentationLoss,
    abnormal_flags,
    default_dm_weight,
    masked_l2,
    split_codes,
)
from fdn_core.model.fdn import FDNOutput


def test_generalized_dice_hand_computed() -> None:
    # 4 pixels, labels [0, 0, 0, 1]; p(class 1) = [0.1, 0.2, 0.3, 0.6].
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.6])
    probs = torch.stack([1 - p1, p1]).reshape(1, 2, 2, 2)
    onehot = torch.stack([torch.tensor([1.0, 1, 1, 0]), torch.tensor([0.0, 0, 0, 1])]).reshape(1, 2, 2, 2)
    # w0 = 1/3^2, w1 = 1/1^2; I0 = 2.4, I1 = 0.6; |p0|+|y0| = 5.8, |p1|+|y1| = 2.2
    # dice = 2 (2.4/9 + 0.6) / (5.8/9 + 2.2) = 15.6 / 25.6 = 0.609375
    loss = GeneralizedDiceLoss(eps=0.0)(probs, onehot)
    assert float(loss) == pytest.approx(1 - 15.6 / 25.6, abs=1e-6)
    assert float(GeneralizedDiceLoss()(onehot, onehot)) == pytest.approx(0.0, abs=1e-5)


def test_generalized_dice_absent_class_gets_the_largest_present_weight() -> None:
    # 2 pixels, labels [0, 1], class 2 absent; predictions put 0.5 of pixel 0 on class 2.
    probs = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.5, 0.0]]).reshape(1, 3, 1, 2)
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    # counts (1, 1, 0) -> weights (1, 1, 1); I = (0.5, 1, 0); sizes = (1.5, 2, 0.5)
    expected = 1 - 2 * 1.5 / 4.0
    assert float(GeneralizedDiceLoss(eps=0.0)(probs, onehot)) == pytest.approx(expected, abs=1e-6)


def test_focal_term_sums_classes_and_averages_pixels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.5]]).reshape(1, 2, 1, 2)  # (B, C, H, W)
    target = torch.tensor([[[0, 1]]])
    total, dice, focal = SegmentationLoss(gamma=2.0)(logits, target)
    p = torch.softmax(logits, 1)[0, :, 0]  # (C, W)
    pt = torch.stack([p[0, 0], p[1, 1]])
    expected = float((-((1 - pt) ** 2) * torch.log(pt)).mean())
    assert float(focal) == pytest.approx(expected, rel=1e-5)
    assert float(total) == pytest.approx(float(dice) + expected, rel=1e-5)


def test_segmentation_loss_checks_target_shape() -> None:
    with pytest.raises(DataError, match="segmentation target"):
        SegmentationLoss()(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))


def test_masked_l2_hand_computed() -> None:
    pred, target = torch.full((1, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(masked_l2(pred, target, mask)) == pytest.approx(4.0 / 4)  # one of four elements, (3-1)^2
    assert float(masked_l2(pred, target)) == pytest.approx(4.0)


def test_reconstruction_loss_respects_the_masks() -> None:
    torch.manual_seed(0)
    image = torch.randn(2, 4, 32, 32)
    seg = torch.zeros(2, 32, 32, dtype=torch.long)
    seg[0, 8:16, 8:16] = 3
    rec = ReconstructionLoss(data_range=8.0, win_size=7)
    total, minus, plus = rec(image, image, image, seg)
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    # x_hat- may differ from x inside the lesion: the normal-region loss does not see it.
    inside = image.clone()
    inside[0, :, 8:16, 8:16] += 5.0
    _, minus, plus = rec(image, inside, image, seg)
    assert float(minus) == pytest.approx(0.0, abs=1e-5)
    # x_hat+ must match everywhere: its loss sees the lesion twice (whole image and M+ term).
    _, _, plus = rec(inside, image, image, seg)
    l2_whole = float(((inside - image) ** 2).mean())
    assert float(plus) > 2 * l2_whole
    with pytest.raises(DataError, match="labels"):
        rec(image, image, image, seg[:, :16])


def test_abnormal_flags_and_split() -> None:
    seg = torch.zeros(3, 4, 4, dtype=torch.long)
    seg[1, 0, 0] = 1
    flags = abnormal_flags(seg)
    assert flags.tolist() == [False, True, False]
    z = torch.arange(3.0).reshape(3, 1)
    z_h, z_d = split_codes(z, flags)
    assert z_h.flatten().tolist() == [0.0, 2.0] and z_d.flatten().tolist() == [1.0]
    with pytest.raises(DataError, match="one per slice"):
        split_codes(z, flags[:2])


class LinearCritic(nn.Module):
    """g(z) = w . flatten(z) + b: its input gradient is w everywhere, so the penalty is (|w| - 1)^2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lin(z.flatten(1)).squeeze(1)


def test_critic_loss_hand_computed_with_a_linear_critic() -> None:
    critic = LinearCritic(2)
    with torch.no_grad():
        critic.lin.weight.copy_(torch.tensor([[3.0, 4.0]]))  # |w| = 5
        critic.lin.bias.fill_(0.5)
    z_h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # g = 3.5, 4.5 -> mean 4
    z_d = torch.tensor([[1.0, 1.0]])  # g = 7.5
    loss, d_w, gp = CriticLoss(lambda_gp=10.0)(critic, z_h, z_d)
    assert float(d_w.detach()) == pytest.approx(7.5 - 4.0)
    assert float(gp.detach()) == pytest.approx((5.0 - 1.0) ** 2)
    assert float(loss.detach()) == pytest.approx(3.5 + 10 * 16.0)


def _fake_output(z_q_normal: torch.Tensor, size: int = 16) -> FDNOutput:
    b = z_q_normal.shape[0]
    zero = torch.zeros(())
    img = torch.zeros(b, 4, size, size)
    return FDNOutput(
        seg_logits=torch.zeros(b, 4, size, size),
        recon_full=img,
        recon_normal=img,
        z_e_normal=z_q_normal,
        z_e_abnormal=z_q_normal,
        z_q_normal=z_q_normal,
        z_q_abnormal=z_q_normal,
        idx_normal=torch.zeros(b, 2, 2, dtype=torch.long),
        idx_abnormal=torch.zeros(b, 2, 2, dtype=torch.long),
        commitment_normal=zero,
        commitment_abnormal=zero,
    )


def test_all_healthy_batch_turns_distribution_matching_off() -> None:
    critic = LinearCritic(8)
    loss_fn = FDNLoss(LossConfig(ssim_win_size=7), latent_size=8)
    z = torch.randn(3, 2, 2, 2)
    seg = torch.zeros(3, 16, 16, dtype=torch.long)
    c_loss, c_terms = loss_fn.critic(critic, z, abnormal_flags(seg))
    assert c_terms["dm_active"] == 0.0 and float(c_loss.detach()) == 0.0
    c_loss.backward()  # still connected to the critic: zero gradients, no error
    assert all(float(p.grad.abs().sum()) == 0.0 for p in critic.parameters())
    total, terms = loss_fn.generator(_fake_output(z), torch.zeros(3, 4, 16, 16), seg, critic=critic)
    assert terms["dm_active"] == 0.0 and terms["reg"] == 0.0
    no_dm = FDNLoss(LossConfig(dm_enabled=False, ssim_win_size=7), latent_size=8)
    total_off, _ = no_dm.generator(_fake_output(z), torch.zeros(3, 4, 16, 16), seg)
    assert float(total.detach()) == float(total_off.detach())


def test_generator_total_is_the_weighted_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    cfg = LossConfig(w_dm=0.5, ssim_win_size=7)
    critic = LinearCritic(8)
    z = torch.randn(4, 2, 2, 2)
    seg = torch.zeros(4, 16, 16, dtype=torch.long)
    seg[:2, 3:6, 3:6] = 2
    out = _fake_output(z)
    out.commitment_normal, out.commitment_abnormal = torch.tensor(0.3), torch.tensor(0.1)
    out.seg_logits = torch.randn(4, 4, 16, 16)
    out.recon_full = torch.randn(4, 4, 16, 16)
    image = torch.randn(4, 4, 16, 16)
    total, t = FDNLoss(cfg, latent_size=8).generator(out, image, seg, critic=critic)
    assert t["dm_active"] == 1.0
    assert t["reg"] == pytest.approx(-float(critic(z[:2]).mean().detach()), rel=1e-5)
    expected = 0.25 * t["lat"] + 5 * t["seg"] + 5 * t["rec"] + 0.5 * t["reg"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert t["lat"] == pytest.approx(0.4)
    # Validation: no critic -> no adversarial term.
    _, t_val = FDNLoss(cfg, latent_size=8).generator(out, image, seg, critic=None)
    assert t_val["dm_active"] == 0.0 and t_val["total"] == pytest.approx(
        t["total"] - 0.5 * t["reg"], rel=1e-5
    )


def test_sign_convention_critic_separates_and_generator_moves_diseased_towards_healthy() -> None:
    torch.manual_seed(0)
    code_shape = (4, 2, 2)
    z_h = torch.randn(16, *code_shape) * 0.3 + 1.0
    z_d = torch.randn(16, *code_shape) * 0.3 - 1.0
    z = torch.cat([z_h, z_d])
    flags = torch.tensor([False] * 16 + [True] * 16)
    critic = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1), nn.Flatten(0)
    )
    loss_fn = FDNLoss(LossConfig(), latent_size=8)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    for _ in range(60):
        c_loss, terms = loss_fn.critic(critic, z, flags)
        opt.zero_grad()
        c_loss.backward()
        opt.step()
    assert terms["wasserstein"] < -0.5  # g(z_d) - g(z_h) < 0: healthy codes score higher
    assert float(critic(z_h).mean().detach()) > float(critic(z_d).mean().detach())
    # A gradient step on L_reg = -g(z_d) moves the diseased codes towards the healthy ones.
    z_d_var = z_d.clone().requires_grad_(True)
    (-critic(z_d_var).mean()).backward()
    moved = z_d - 0.5 * z_d_var.grad
    assert (moved - z_h.mean(0)).norm() < (z_d - z_h.mean(0)).norm()


def test_loss_config_validation_and_defaults() -> None:
    cfg = LossConfig()
    weights = (cfg.w_lat, cfg.w_seg, cfg.w_rec, cfg.w_dm, cfg.w_critic, cfg.lambda_gp)
    assert weights == (0.25, 5, 5, None, None, 10)
    # lambda_4 (w_dm) and lambda_5 (w_critic) follow the latent size unless the config sets them
    assert (FDNLoss(cfg, latent_size=8).w_dm, FDNLoss(cfg, latent_size=8).w_critic) == (1e-4, 1e-4)
    assert (FDNLoss(cfg, latent_size=16).w_dm, FDNLoss(cfg, latent_size=32).w_critic) == (5e-4, 5e-4)
    assert FDNLoss(LossConfig(w_dm=0.5), latent_size=16).w_dm == 0.5
    with pytest.raises(ConfigError, match="latent_size"):
        FDNLoss(cfg)
    assert default_dm_weight(8) == 1e-4 and default_dm_weight(4) == 1e-4
    assert default_dm_weight(16) == default_dm_weight(32) == 5e-4
    with pytest.raises(ConfigError, match="w_seg"):
        LossConfig(w_seg=-1.0)
    with pytest.raises(ConfigError, match="ssim_win_size"):
        LossConfig(ssim_win_size=4)
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(LossConfig, {"w_lat": 0.25, "critic_weight": 1.0}, "loss")
    assert not FDNLoss(LossConfig(w_dm=0.0, w_critic=0.0)).distribution_matching
    assert math.isclose(FDNLoss(LossConfig(), latent_size=8).config.ssim_data_range, 8.0)
