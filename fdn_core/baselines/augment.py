"""Views for self-supervised training: seed 003's augmentation translated from CT to multi-sequence MR.

Seed 003 (Wickstrøm et al.) adds domain knowledge to SimSiam's natural-image augmentation by clipping every
CT slice to two Hounsfield windows (a narrow and a wide one), so the network learns features that survive
the window: the liver. MR intensities carry no physical unit, so the same idea becomes, per sequence (each of
the 4 channels independently: T1, T1ce, T2 and FLAIR contrasts vary independently between scanners):

1. window jitter: clip the z-scored brain intensities to a random window (centre and width drawn; narrow
   windows saturate bright and dark tissue like seed 003's narrow HU clip, wide ones keep almost all of it);
2. contrast jitter: a random gamma on the windowed intensities, then random contrast (scale) and
   brightness (shift), seed 003's colour jitter (strength 0.4) per sequence instead of per RGB channel;
3. bias field: a smooth multiplicative field exp(polynomial of degree 3 in x, y) applied to the raw
   intensity ``I``; on z-scores ``z = (I - mu) / sigma`` this is ``z' = f z + r (f - 1)`` with ``r = mu /
   sigma`` (``bias_mean_over_std``, about 4 for brain tissue);
4. noise: Gaussian noise of a random standard deviation on brain pixels (the Rician noise of magnitude
   images is close to Gaussian at brain signal levels);

and, as in SimSiam and seed 003, a random resized crop (area fraction and aspect ratio drawn) and a
horizontal (left-right) flip with probability 0.5. Background (exactly 0 after ``zscore_volume``) stays 0:
intensity changes apply to brain pixels only. Everything runs batched in torch; ``generator`` makes it
reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fdn_core.errors import ConfigError

__all__ = ["MRAugmentConfig", "MRViewAugment", "brain_mask"]


@dataclass(frozen=True)
class MRAugmentConfig:
    """Ranges of the view augmentation (module docstring); intensities in z-score units."""

    __config_allow_defaults__ = True

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip_prob: float = 0.5
    window_centre: tuple[float, float] = (-0.5, 0.5)
    window_width: tuple[float, float] = (3.0, 8.0)
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    brightness: tuple[float, float] = (-0.4, 0.4)
    bias_prob: float = 0.5
    bias_std: float = 0.3
    bias_mean_over_std: float = 4.0
    noise_std: tuple[float, float] = (0.0, 0.15)

    def __post_init__(self) -> None:
        pairs = {
            "crop_scale": self.crop_scale,
            "crop_ratio": self.crop_ratio,
            "window_width": self.window_width,
            "gamma": self.gamma,
            "contrast": self.contrast,
            "window_centre": self.window_centre,
            "brightness": self.brightness,
            "noise_std": self.noise_std,
        }
        for name, (lo, hi) in pairs.items():
            if lo > hi:
                raise ConfigError(f"augment.{name}={[lo, hi]}: the lower bound exceeds the upper one")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"augment.crop_scale={list(self.crop_scale)}: must lie in (0, 1]")
        positive = (self.crop_ratio[0], self.window_width[0], self.gamma[0], self.contrast[0])
        if min(positive) <= 0:
            raise ConfigError("augment: crop_ratio, window_width, gamma and contrast must be positive")
        if not (0 <= self.flip_prob <= 1 and 0 <= self.bias_prob <= 1):
            raise ConfigError("augment: flip_prob and bias_prob must be within 0..1")
        if self.bias_std < 0 or self.noise_std[0] < 0:
            raise ConfigError("augment: bias_std and noise_std must be >= 0")


def brain_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels where any sequence is non-zero (z-scored slices are 0 outside the brain)."""
    return (images != 0).any(dim=1, keepdim=True)


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)


class MRViewAugment:
    """``view(images (B, 4, S, S), generator) -> (B, 4, S, S)``: one random view per slice (module doc)."""

    def __init__(self, config: MRAugmentConfig | None = None) -> None:
        self.config = config or MRAugmentConfig()

    def intensity(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Window, gamma, contrast / brightness, bias field and noise, per sequence, on brain pixels."""
        c = self.config
        b, ch, h, w = x.shape
        mask = brain_mask(x)
        centre = _uniform(b, c.window_centre, gen, ch, 1, 1)
        width = _uniform(b, c.window_width, gen, ch, 1, 1)
        lo = centre - width / 2
        u = ((x - lo) / width).clamp(0.0, 1.0)
        log_g = _uniform(b, (math.log(c.gamma[0]), math.log(c.gamma[1])), gen, ch, 1, 1)
        u = u.clamp_min(1e-6) ** log_g.exp()
        scale = _uniform(b, c.contrast, gen, ch, 1, 1)
        shift = _uniform(b, c.brightness, gen, ch, 1, 1)
        y = (u - 0.5) * width * scale + centre + shift
        if c.bias_prob > 0 and c.bias_std > 0:
            field = self._bias_field(b, ch, h, w, gen)
            on = (torch.rand((b, 1, 1, 1), generator=gen) < c.bias_prob).float()
            field = 1.0 + on * (field - 1.0)
            y = y * field + c.bias_mean_over_std * (field - 1.0)
        sigma = _uniform(b, c.noise_std, gen, 1, 1, 1)
        y = y + sigma * torch.randn(y.shape, generator=gen)
        return torch.where(mask, y, torch.zeros_like(y))

    def _bias_field(self, b: int, ch: int, h: int, w: int, gen: torch.Generator | None) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        terms = [xx**i * yy**j for i in range(4) for j in range(4 - i) if i + j > 0]
        basis = torch.stack(terms)  # (T, H, W), degree <= 3, no constant
        coef = (
            torch.randn((b, ch, basis.shape[0]), generator=gen) * self.config.bias_std / math.sqrt(len(terms))
        )
        return torch.einsum("bct,thw->bchw", coef, basis).exp()

    def spatial(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Random resized crop (area fraction and aspect ratio drawn) and left-right flip, one affine warp."""
        c = self.config
        b = x.shape[0]
        area = _uniform(b, c.crop_scale, gen)
        log_r = _uniform(b, (math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])), gen)
        ratio = log_r.exp()
        sx = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        sy = (area / ratio).sqrt().clamp(max=1.0)
        tx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sx)
        ty = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sy)
        flip = torch.where(torch.rand(b, generator=gen) < c.flip_prob, -1.0, 1.0)
        theta = torch.zeros((b, 2, 3))
        # grid_sample's x is the last axis (columns); the flip is along axis 0 of (C, X, Y) = rows, which is
        # the subject's left-right axis in our canonical RAS slices.
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = sy * flip
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def view(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """One augmented view of each slice: intensity changes, then crop and flip."""
        if x.ndim != 4:
            raise ConfigError(f"augment: expected (B, C, H, W) slices, got {tuple(x.shape)}")
        return self.spatial(self.intensity(x.float(), gen), gen)
