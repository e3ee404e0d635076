"""Losses of the feature decomposing network (paper eq. 3-12; notes/fdn-method.md, "Losses").

How the training loop uses them (one generator step; m = 5 critic steps in the paper)::

    loss_fn = FDNLoss(loss_cfg, latent_size=model.config.latent_size)
    out = model(images)                                   # train mode: EMA codebooks update here
    flags = abnormal_flags(seg)                           # (B,) bool: slice has any abnormal label
    if loss_fn.distribution_matching:
        z = out.z_q_normal.detach()
        for _ in range(critic_steps):                     # m critic steps on detached codes
            c_loss, c_terms = loss_fn.critic(model.critic, z, flags)
            critic_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            if c_terms["dm_active"]:                      # both healthy and diseased slices present
                critic_opt.step()
    total, terms = loss_fn.generator(out, images, seg, critic=model.critic, abnormal=flags)
    gen_opt.zero_grad(set_to_none=True)                   # gen_opt over model.generator_parameters()
    total.backward()                                      # also leaves grads on the critic: the critic
    gen_opt.step()                                        # optimiser's zero_grad clears them first

``terms`` are plain floats for logging. Validation: ``generator(out, images, seg, critic=None)`` gives the
loss without the adversarial term. Under DDP every rank runs the critic backward (an inactive rank
contributes zero gradients); step when any rank was active.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss, SSIMLoss
from torch import nn

from fdn_core.errors import ConfigError, DataError
from fdn_core.model.fdn import FDNOutput

__all__ = [
    "CriticLoss",
    "FDNLoss",
    "GeneralizedDiceLoss",
    "LossConfig",
    "ReconstructionLoss",
    "SegmentationLoss",
    "abnormal_flags",
    "default_dm_weight",
    "masked_l2",
    "split_codes",
]


def default_dm_weight(latent_size: int) -> float:
    """Paper weight of L_reg and of L_critic (lambda_4 = lambda_5): 1e-4 for latent grids up to 8x8, 5e-4
    for 16x16 and 32x32 (paper section 4.3)."""
    return 1e-4 if latent_size <= 8 else 5e-4


@dataclass(frozen=True)
class LossConfig:
    """Weights and settings of the FDN objective. Defaults are the paper's for FDN_8x8.

    Total = w_lat * L_lat + w_seg * L_seg + w_rec * L_rec + w_dm * L_reg (w_dm used only if dm_enabled);
    the critic minimises w_critic * L_critic (the paper's lambda_5). w_dm and w_critic None (YAML null)
    mean the paper's value for the model's latent size (``default_dm_weight``: 1e-4 up to 8x8, 5e-4 for
    16x16 and 32x32); ``FDNLoss`` resolves them from ``latent_size``. With Adam, w_critic barely changes
    the critic's steps (Adam is invariant to a constant loss scale, up to its epsilon); it is kept as the
    paper states it. lambda_gp: gradient-penalty weight of the critic loss (10). focal_gamma: focusing
    parameter of the focal loss (2). (The number of critic steps per generator step, m = 5, is the
    training loop's setting.)
    ssim_data_range: the intensity range SSIM assumes; z-scored brain slices (background 0) span
    roughly -3..+5, hence 8. ssim_win_size: Gaussian window side (11, sigma 1.5).
    """

    w_lat: float = 0.25
    w_seg: float = 5.0
    w_rec: float = 5.0
    w_dm: float | None = None
    w_critic: float | None = None
    dm_enabled: bool = True
    lambda_gp: float = 10.0
    focal_gamma: float = 2.0
    ssim_data_range: float = 8.0
    ssim_win_size: int = 11

    def __post_init__(self) -> None:
        for name in ("w_lat", "w_seg", "w_rec", "w_dm", "w_critic", "lambda_gp", "focal_gamma"):
            value = getattr(self, name)
            if value is None and name in ("w_dm", "w_critic"):
                continue
            if not value >= 0.0:
                raise ConfigError(f"loss.{name}={value}: must be >= 0")
        if not self.ssim_data_range > 0.0:
            raise ConfigError(f"loss.ssim_data_range={self.ssim_data_range}: must be > 0")
        if self.ssim_win_size < 3 or self.ssim_win_size % 2 == 0:
            raise ConfigError(f"loss.ssim_win_size={self.ssim_win_size}: must be an odd number >= 3")


def abnormal_flags(seg: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether each label slice (B, H, W) has any abnormal (non-zero) pixel."""
    return seg.flatten(1).ne(0).any(dim=1)


def split_codes(z: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split codes (B, ...) into (z_h healthy, z_d diseased) by the abnormal ``flags`` (B,)."""
    flags = flags.to(device=z.device, dtype=torch.bool)
    if flags.shape != (z.shape[0],):
        raise DataError(
            f"abnormal flags have shape {tuple(flags.shape)}; expected ({z.shape[0]},), one per slice"
        )
    return z[~flags], z[flags]


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of M*pred vs M*target over all elements (eq. 8-9); mask (B, 1, H, W) broadcasts."""
    if mask is None:
        return F.mse_loss(pred, target)
    return F.mse_loss(pred * mask, target * mask)


class GeneralizedDiceLoss(nn.Module):
    """Generalised Dice loss (eq. 5): 1 - 2 sum_s w_s |p_s y_s| / sum_s w_s (|p_s| + |y_s|), w_s = 1/|y_s|^2.

    Computed per slice on softmax probabilities, then averaged over the batch. A class absent from a
    slice gets the largest weight of the present classes (as monai does). Own implementation because
    monai's GeneralizedDiceLoss adds fixed smoothing terms (1e-5) to numerator and denominator, which
    are not small next to 1/|y|^2-weighted sums at 256x256 (about 3e-5 for an empty slice); here the
    weights are normalised to sum to one per slice, which leaves the ratio unchanged.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, probs: torch.Tensor, target_onehot: torch.Tensor) -> torch.Tensor:
        """Generalised Dice loss of softmax ``probs`` (B, C, H, W) against one-hot targets."""
        dims = tuple(range(2, probs.ndim))
        counts = target_onehot.sum(dims)  # (B, C)
        w = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0) ** 2, torch.zeros_like(counts))
        w = torch.where(counts > 0, w, w.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        intersection = (probs * target_onehot).sum(dims)
        sizes = probs.sum(dims) + counts
        dice = 2.0 * (w * intersection).sum(1) / ((w * sizes).sum(1) + self.eps)
        return (1.0 - dice).mean()


class SegmentationLoss(nn.Module):
    """L_seg = generalised Dice + focal (eq. 5-7); returns (L_seg, L_dice, L_focal).

    The focal term (eq. 6) sums over classes and averages over pixels and slices; monai's FocalLoss
    with reduction "mean" would also average over classes (a factor 1/C), so we reduce it here.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.dice = GeneralizedDiceLoss()
        self.focal = FocalLoss(include_background=True, gamma=gamma, use_softmax=True, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(L_seg, generalised Dice, focal) of ``logits`` (B, C, H, W) against labels (B, H, W)."""
        logits = logits.float()
        num_classes = logits.shape[1]
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise DataError(
                f"segmentation target has shape {tuple(target.shape)}; "
                f"expected {(logits.shape[0], *logits.shape[2:])}"
            )
        onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(logits.dtype)
        dice = self.dice(torch.softmax(logits, dim=1), onehot)
        focal = self.focal(logits, onehot).sum(1).mean()
        return dice + focal, dice, focal


class ReconstructionLoss(nn.Module):
    """L_rec = L_rec^- + L_rec^+ (eq. 8-10); returns (L_rec, L_rec^-, L_rec^+).

    L_rec^- = ||M- x^- - M- x||^2 + (1 - SSIM(M- x^-, M- x)) on the normal region M- (label == 0);
    L_rec^+ = ||x^+ - x||^2 + (1 - SSIM(x^+, x)) + the same on the abnormal region M+ (label > 0).
    Squared norms are means over all elements; SSIM is monai's (Gaussian window) on the masked images.
    """

    def __init__(self, data_range: float = 8.0, win_size: int = 11) -> None:
        super().__init__()
        self.ssim = SSIMLoss(spatial_dims=2, data_range=data_range, win_size=win_size)

    def _term(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            pred, target = pred * mask, target * mask
        return F.mse_loss(pred, target) + self.ssim(pred, target)

    def forward(
        self, recon_full: torch.Tensor, recon_normal: torch.Tensor, image: torch.Tensor, seg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_rec, L_rec^-, L_rec^+) of the two reconstructions against ``image`` with labels ``seg``."""
        recon_full, recon_normal, image = recon_full.float(), recon_normal.float(), image.float()
        if recon_full.shape != image.shape or recon_normal.shape != image.shape:
            raise DataError(
                f"reconstructions {tuple(recon_full.shape)}/{tuple(recon_normal.shape)} and image "
                f"{tuple(image.shape)} differ in shape"
            )
        if seg.shape != (image.shape[0], *image.shape[2:]):
            raise DataError(
                f"labels have shape {tuple(seg.shape)}; expected {(image.shape[0], *image.shape[2:])}"
            )
        m_plus = (seg != 0).unsqueeze(1).to(image.dtype)
        m_minus = 1.0 - m_plus
        rec_minus = self._term(recon_normal, image, m_minus)
        rec_plus = self._term(recon_full, image, None) + self._term(recon_full, image, m_plus)
        return rec_minus + rec_plus, rec_minus, rec_plus


class CriticLoss(nn.Module):
    """WGAN-GP critic loss (eq. 11): mean g(z_d) - mean g(z_h) + lambda_gp * mean (||grad g(z_m)||_2 - 1)^2.

    The critic learns high scores for healthy codes and low for diseased ones; the generator term
    L_reg = -mean g(z_d) (eq. 12) then pushes diseased slices' normal codes towards healthy-looking ones.
    z_m = eps * z_h + (1 - eps) * z_d on random (healthy, diseased) pairs, max(n_h, n_d) of them, drawn
    with replacement, eps ~ U[0, 1] per pair. Returns (loss, d_W, penalty).
    """

    def __init__(self, lambda_gp: float = 10.0) -> None:
        super().__init__()
        self.lambda_gp = lambda_gp

    def forward(
        self, critic: nn.Module, z_h: torch.Tensor, z_d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_critic, d_W, gradient penalty) on detached healthy and diseased normal codes."""
        z_h, z_d = z_h.detach().float(), z_d.detach().float()
        n = max(z_h.shape[0], z_d.shape[0])
        ih = torch.randint(z_h.shape[0], (n,), device=z_h.device)
        id_ = torch.randint(z_d.shape[0], (n,), device=z_d.device)
        eps = torch.rand((n,) + (1,) * (z_h.ndim - 1), device=z_h.device)
        z_m = (eps * z_h[ih] + (1.0 - eps) * z_d[id_]).requires_grad_(True)
        d_w = critic(z_d).float().mean() - critic(z_h).float().mean()
        (grad,) = torch.autograd.grad(critic(z_m).float().sum(), z_m, create_graph=True)
        penalty = ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()
        return d_w + self.lambda_gp * penalty, d_w, penalty


class FDNLoss(nn.Module):
    """The paper's objective; ``generator`` for encoder/decoders, ``critic`` for the critic network.

    See the module docstring for the calling sequence.
    """

    def __init__(self, config: LossConfig, latent_size: int | None = None) -> None:
        super().__init__()
        if config.w_dm is None or config.w_critic is None:
            if latent_size is None:
                raise ConfigError(
                    "loss.w_dm / loss.w_critic are null (the paper's value for the latent size): give "
                    "FDNLoss the model's latent_size, or set them in the config"
                )
            default = default_dm_weight(latent_size)
            config = dataclasses.replace(
                config,
                w_dm=default if config.w_dm is None else config.w_dm,
                w_critic=default if config.w_critic is None else config.w_critic,
            )
        self.config = config
        self.w_dm = float(config.w_dm)  # type: ignore[arg-type]  # resolved above
        self.w_critic = float(config.w_critic)  # type: ignore[arg-type]
        self.seg_loss = SegmentationLoss(config.focal_gamma)
        self.rec_loss = ReconstructionLoss(config.ssim_data_range, config.ssim_win_size)
        self.critic_loss = CriticLoss(config.lambda_gp)

    @property
    def distribution_matching(self) -> bool:
        """Whether the critic / L_reg path is on (``dm_enabled`` with a positive ``w_dm``)."""
        return self.config.dm_enabled and self.w_dm > 0.0

    def generator(
        self,
        out: FDNOutput,
        image: torch.Tensor,
        seg: torch.Tensor,
        critic: nn.Module | None = None,
        abnormal: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator loss and its terms for an ``FDNOutput`` ``out``, images (B,C,H,W), labels (B,H,W).

        L_reg = -mean g(z_d) is added (weight w_dm) when distribution matching is on, ``critic`` is given
        (the model's critic; pass None for validation losses without the adversarial term) and the batch
        has both healthy and diseased slices; then terms["dm_active"] = 1.0. ``abnormal`` (B,) bool flags
        default to ``abnormal_flags(seg)``.
        """
        cfg = self.config
        l_lat = out.commitment_normal + out.commitment_abnormal
        l_seg, dice, focal = self.seg_loss(out.seg_logits, seg)
        l_rec, rec_minus, rec_plus = self.rec_loss(out.recon_full, out.recon_normal, image, seg)
        total = cfg.w_lat * l_lat + cfg.w_seg * l_seg + cfg.w_rec * l_rec
        l_reg = torch.zeros((), device=total.device)
        dm_active = False
        if self.distribution_matching and critic is not None:
            flags = abnormal_flags(seg) if abnormal is None else abnormal
            z_h, z_d = split_codes(out.z_q_normal, flags)
            if z_h.shape[0] > 0 and z_d.shape[0] > 0:
                l_reg = -critic(z_d).float().mean()
                total = total + self.w_dm * l_reg
                dm_active = True
        parts = (total, l_lat, l_seg, dice, focal, l_rec, rec_minus, rec_plus, l_reg)
        values = torch.stack([t.detach().float() for t in parts]).tolist()
        names = ("total", "lat", "seg", "dice", "focal", "rec", "rec_minus", "rec_plus", "reg")
        terms = dict(zip(names, values, strict=True))
        terms["dm_active"] = float(dm_active)
        return total, terms

    def critic(
        self, critic: nn.Module, z_q_normal: torch.Tensor, abnormal: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Critic loss on (detached) normal codes (B, D, h, w) split by ``abnormal`` flags (B,).

        With no healthy or no diseased slice in the batch, terms["dm_active"] = 0.0 and the loss is zero,
        still connected to the critic's parameters so that backward() works (zero gradients, e.g. for
        hand-averaged gradients under DDP); a single process should skip the optimiser step then (Adam
        would still move the weights by its momentum).
        """
        z_h, z_d = split_codes(z_q_normal.detach(), abnormal)
        if z_h.shape[0] == 0 or z_d.shape[0] == 0:
            zero = sum(
                (p.sum() * 0.0 for p in critic.parameters()), torch.zeros((), device=z_q_normal.device)
            )
            return zero, {"critic": 0.0, "wasserstein": 0.0, "gp": 0.0, "dm_active": 0.0}
        loss, d_w, gp = self.critic_loss(critic, z_h, z_d)
        values = torch.stack([loss.detach(), d_w.detach(), gp.detach()]).tolist()
        return self.w_critic * loss, {
            "critic": values[0],
            "wasserstein": values[1],
            "gp": values[2],
            "dm_active": 1.0,
        }
