"""The feature decomposing network FDN_{h x w} (Kobayashi et al. 2021, section 3.1; notes "Network").

An image (B, 4, S, S) is encoded by a shared stem and two towers of identical shape into a normal and an
abnormal latent (B, D, h, w); each is vector-quantised with its own EMA codebook (K x D). The segmentation
decoder sees only the abnormal codes, the SPADE image decoder only the normal codes, conditioned on the
(detached) segmentation softmax for the full reconstruction and on zeros for the normal-appearing one.
There are no skip connections: the two code grids are the only path from encoder to decoders.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fdn_core.device import full_precision
from fdn_core.errors import ConfigError, DataError
from fdn_core.model.blocks import (
    GROUPS,
    NEGATIVE_SLOPE,
    DownStep,
    FP32EMAQuantizer,
    ResBlock,
    SPADEResBlock,
    UpStep,
    he_init,
)
from fdn_core.model.critic import Critic

__all__ = ["FDN", "FDNConfig", "FDNOutput", "condition_map"]

LATENT_SIZES = (4, 8, 16, 32)


@dataclass(frozen=True)
class FDNConfig:
    """Architecture of an FDN. Defaults are the paper's FDN_8x8 at 256x256 (Tables C.1-C.3).

    image_size: input side S (64..256). latent_size: code grid side h = w (4, 8, 16 or 32); S / h must be
    a power of two >= 4, and the number of down/up stages is log2(S / h).
    in_channels: image channels (4: T1, T1ce, T2, FLAIR). num_classes: segmentation classes incl. background.
    stem_channels: channels of the full-resolution stem conv (paper 32).
    encoder_channels: (channels at S/2, channels at S/4 and in both towers) (paper (64, 128)).
    decoder_channels: channels of the decoders from the latent up to full size, log2(S/h) + 1 values;
      empty () derives them by mirroring the encoder (S/4 and coarser: encoder_channels[1], S/2:
      encoder_channels[0], S: stem_channels), which gives the paper's 128-128-128-128-64-32 at 256/8x8.
    code_dim: D, length of a code vector (paper 64). num_codes: K, codebook size (paper 512).
    spade_hidden_channels: width of the conv net that turns the conditioning map into gamma/beta.
    ema_decay, ema_epsilon: EMA codebook update (paper 0.99, 1e-5). commitment_cost: beta (paper 0.25).
    critic_channels: width of the distribution-matching critic (paper 64).
    Every channel count except critic_channels must be a multiple of 8 (GroupNorm with 8 groups).
    Small CPU models shrink stem_channels / encoder_channels / decoder_channels / spade_hidden_channels.
    """

    image_size: int = 256
    latent_size: int = 8
    in_channels: int = 4
    num_classes: int = 4
    stem_channels: int = 32
    encoder_channels: tuple[int, int] = (64, 128)
    decoder_channels: tuple[int, ...] = ()
    code_dim: int = 64
    num_codes: int = 512
    spade_hidden_channels: int = 64
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    commitment_cost: float = 0.25
    critic_channels: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_channels", tuple(self.encoder_channels))
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if not 64 <= self.image_size <= 256:
            raise ConfigError(f"model.image_size={self.image_size}: must be between 64 and 256")
        if self.latent_size not in LATENT_SIZES:
            raise ConfigError(f"model.latent_size={self.latent_size}: must be one of {list(LATENT_SIZES)}")
        ratio = self.image_size // self.latent_size
        if self.image_size % self.latent_size or ratio < 4 or ratio & (ratio - 1):
            raise ConfigError(
                f"model.image_size={self.image_size} / latent_size={self.latent_size}: the ratio must be a "
                f"power of two >= 4 (e.g. image_size {self.latent_size * 8} or {self.latent_size * 16} "
                f"for latent_size {self.latent_size})"
            )
        if len(self.encoder_channels) != 2:
            raise ConfigError(f"model.encoder_channels={list(self.encoder_channels)}: give exactly 2 values")
        if self.decoder_channels and len(self.decoder_channels) != self.num_stages + 1:
            raise ConfigError(
                f"model.decoder_channels={list(self.decoder_channels)}: needs {self.num_stages + 1} values "
                f"(latent, then one per up stage) for {self.image_size}->{self.latent_size}, "
                "or [] to derive them"
            )
        for name, value in (
            ("stem_channels", self.stem_channels),
            ("encoder_channels", self.encoder_channels),
            ("decoder_channels", self.decoder_channels),
            ("code_dim", self.code_dim),
            ("spade_hidden_channels", self.spade_hidden_channels),
        ):
            for v in value if isinstance(value, tuple) else (value,):
                if v < GROUPS or v % GROUPS:
                    raise ConfigError(
                        f"model.{name}={value}: channel counts must be positive multiples of {GROUPS} "
                        "(GroupNorm with 8 groups)"
                    )
        if self.in_channels < 1:
            raise ConfigError(f"model.in_channels={self.in_channels}: must be >= 1")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes={self.num_classes}: must be >= 2 (background + abnormal)")
        if not 2 <= self.num_codes <= 65535:
            raise ConfigError(
                f"model.num_codes={self.num_codes}: must be in 2..65535 (indices are stored as uint16)"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay={self.ema_decay}: must be in (0, 1)")
        if not self.ema_epsilon > 0.0:
            raise ConfigError(f"model.ema_epsilon={self.ema_epsilon}: must be > 0")
        if not self.commitment_cost >= 0.0:
            raise ConfigError(f"model.commitment_cost={self.commitment_cost}: must be >= 0")
        if self.critic_channels < 1:
            raise ConfigError(f"model.critic_channels={self.critic_channels}: must be >= 1")

    @property
    def num_stages(self) -> int:
        """Number of down steps of the encoder (= up steps of each decoder): log2(image / latent)."""
        return int(math.log2(self.image_size // self.latent_size))

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(h, w) of the code grids."""
        return (self.latent_size, self.latent_size)

    def channels_at(self, factor: int) -> int:
        """Encoder channels at downsampling factor ``factor`` (1, 2, 4, ...); decoders mirror them."""
        if factor == 1:
            return self.stem_channels
        return self.encoder_channels[0] if factor == 2 else self.encoder_channels[1]

    @property
    def resolved_decoder_channels(self) -> tuple[int, ...]:
        """Decoder channels from the latent (index 0) to full size (index num_stages)."""
        if self.decoder_channels:
            return self.decoder_channels
        n = self.num_stages
        return tuple(self.channels_at(2 ** (n - i)) for i in range(n + 1))


@dataclass
class FDNOutput:
    """Everything one forward pass produces (B: batch, S: image side, h x w: code grid, D: code_dim).

    seg_logits (B, num_classes, S, S); recon_full x_hat+ and recon_normal x_hat- (B, in_channels, S, S);
    z_e_* encoder outputs and z_q_* quantised codes (B, D, h, w) float32 (z_q with straight-through
    gradient to z_e); idx_* code indices (B, h, w) int64 in image (row, col) order;
    commitment_* = beta * mean ||z_e - sg(z_q)||^2 per quantiser (0-dim tensors).
    """

    seg_logits: torch.Tensor
    recon_full: torch.Tensor
    recon_normal: torch.Tensor
    z_e_normal: torch.Tensor
    z_e_abnormal: torch.Tensor
    z_q_normal: torch.Tensor
    z_q_abnormal: torch.Tensor
    idx_normal: torch.Tensor
    idx_abnormal: torch.Tensor
    commitment_normal: torch.Tensor
    commitment_abnormal: torch.Tensor

    @property
    def commitment(self) -> torch.Tensor:
        """L_lat: the sum of both quantisers' commitment losses (eq. 3-4 with EMA codebooks)."""
        return self.commitment_normal + self.commitment_abnormal


def condition_map(seg_logits: torch.Tensor) -> torch.Tensor:
    """SPADE conditioning map: softmax of the (detached) logits, zeroed where the argmax is background."""
    probs = torch.softmax(seg_logits.detach().float(), dim=1)
    foreground = probs.argmax(dim=1, keepdim=True) != 0
    return (probs * foreground).to(seg_logits.dtype)


class _Tower(nn.Sequential):
    """One encoder branch: [res block, down] until the latent size, then res blocks ending at D channels."""

    def __init__(self, cfg: FDNConfig) -> None:
        c = cfg.encoder_channels[1]
        layers: list[nn.Module] = []
        for _ in range(cfg.num_stages - 2):
            layers += [ResBlock(c, c), DownStep(c, c)]
        layers += [ResBlock(c, c), ResBlock(c, cfg.code_dim)]
        super().__init__(*layers)


class SegmentationDecoder(nn.Module):
    """s(z_q+): conv to c0, res block, then [up, res block] to full size, 1x1 conv to class logits."""

    def __init__(self, cfg: FDNConfig) -> None:
        super().__init__()
        ch = cfg.resolved_decoder_channels
        self.head = nn.Sequential(nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1), ResBlock(ch[0], ch[0]))
        self.ups = nn.Sequential(
            *[nn.Sequential(UpStep(a, b), ResBlock(b, b)) for a, b in itertools.pairwise(ch)]
        )
        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, ch[-1]), nn.LeakyReLU(NEGATIVE_SLOPE), nn.Conv2d(ch[-1], cfg.num_classes, 1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.ups(self.head(z)))


class ImageDecoder(nn.Module):
    """f(z_q-, c): the segmentation decoder's shape with SPADE residual blocks conditioned on map ``c``."""

    def __init__(self, cfg: FDNConfig) -> None:
        super().__init__()
        ch = cfg.resolved_decoder_channels
        k, hid = cfg.num_classes, cfg.spade_hidden_channels
        self.stem = nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1)
        self.head = SPADEResBlock(ch[0], ch[0], k, hid)
        self.ups = nn.ModuleList(UpStep(a, b) for a, b in itertools.pairwise(ch))
        self.blocks = nn.ModuleList(SPADEResBlock(b, b, k, hid) for b in ch[1:])
        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, ch[-1]), nn.LeakyReLU(NEGATIVE_SLOPE), nn.Conv2d(ch[-1], cfg.in_channels, 1)
        )

    def forward(self, z: torch.Tensor, cond: torch.Tensor, null: int = 0) -> torch.Tensor:
        """Decode ``z`` (B + null, D, h, w); the first B samples use ``cond`` (B, L, S, S), the last ``null``
        samples the all-zero map (normal-appearing reconstructions)."""
        # The map pyramid is built once by 2x2 average pooling (area resize) and shared by every block.
        pyramid = [cond]
        for _ in range(len(self.ups)):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2))
        h = self.head(self.stem(z), pyramid[-1], null)
        for i, (up, block) in enumerate(zip(self.ups, self.blocks, strict=True)):
            h = block(up(h), pyramid[-2 - i], null)
        return self.out(h)


class FDN(nn.Module):
    """Feature decomposing network; see the module docstring. ``critic`` is trained by its own optimiser.

    Train mode: ``forward`` updates both EMA codebooks (and the decoder's BatchNorm statistics).
    ``encode`` and ``decode_indices`` never touch the codebooks.
    """

    def __init__(self, config: FDNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        e0, e1 = c.encoder_channels
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, c.stem_channels, 3, padding=1),
            DownStep(c.stem_channels, e0),
            ResBlock(e0, e0),
            DownStep(e0, e1),
        )
        self.tower_normal = _Tower(c)
        self.tower_abnormal = _Tower(c)
        self.vq_normal = self._quantizer(c)
        self.vq_abnormal = self._quantizer(c)
        self.seg_decoder = SegmentationDecoder(c)
        self.image_decoder = ImageDecoder(c)
        self.critic = Critic(c.code_dim, c.latent_size, c.critic_channels)
        for module in (
            self.stem,
            self.tower_normal,
            self.tower_abnormal,
            self.seg_decoder,
            self.image_decoder,
        ):
            he_init(module)

    # ----------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _quantizer(c: FDNConfig) -> FP32EMAQuantizer:
        return FP32EMAQuantizer(
            spatial_dims=2,
            num_embeddings=c.num_codes,
            embedding_dim=c.code_dim,
            commitment_cost=c.commitment_cost,
            decay=c.ema_decay,
            epsilon=c.ema_epsilon,
            embedding_init="normal",
            ddp_sync=True,
        )

    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config
        if (
            x.ndim != 4
            or x.shape[1] != c.in_channels
            or x.shape[2] != c.image_size
            or x.shape[3] != c.image_size
        ):
            raise DataError(
                f"FDN input has shape {tuple(x.shape)}; this model expects "
                f"(B, {c.in_channels}, {c.image_size}, {c.image_size}) slices "
                "(preprocess them with the bundle's PreprocessConfig)"
            )

    def _check_indices(self, idx: torch.Tensor, name: str) -> None:
        c = self.config
        if idx.ndim != 3 or tuple(idx.shape[1:]) != c.latent_shape:
            raise DataError(
                f"{name} has shape {tuple(idx.shape)}; expected (B, {c.latent_size}, {c.latent_size})"
            )
        if idx.dtype not in (torch.int64, torch.int32):
            raise DataError(f"{name} has dtype {idx.dtype}; expected an integer (long) tensor")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c.num_codes):
            raise DataError(f"{name} has values outside [0, {c.num_codes}); indices from another model?")

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of encoder and decoders (not the critic, not the EMA codebooks)."""
        critic_ids = {id(p) for p in self.critic.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in critic_ids)

    def critic_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the distribution-matching critic (its own optimiser)."""
        return self.critic.parameters()

    def codebook(self, which: Literal["normal", "abnormal"]) -> torch.Tensor:
        """The (K, D) codebook of the normal or abnormal quantiser (the live tensor; clone to keep it)."""
        if which == "normal":
            return self.vq_normal.embedding.weight
        if which == "abnormal":
            return self.vq_abnormal.embedding.weight
        raise ValueError(f"codebook({which!r}): choose 'normal' or 'abnormal'")

    # ----------------------------------------------------------------------------------------- passes
    def encode_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous encoder outputs (z_e-, z_e+), each (B, D, h, w).

        In eval mode the encoder runs in float32 with autocast off on every device, so the codes of a slice
        are the same on a GPU under bf16 autocast and on a CPU (measured before: 0.8 % of normal and 1.3 %
        of abnormal code positions changed under bf16). Training may run it under autocast for speed.
        """
        self._check_images(x)
        if self.training:
            h = self.stem(x)
            return self.tower_normal(h), self.tower_abnormal(h)
        with full_precision(x.device):
            h = self.stem(x.float())
            return self.tower_normal(h), self.tower_abnormal(h)

    def decode(self, z_q_normal: torch.Tensor, z_q_abnormal: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(seg_logits, recon_full, recon_normal) from quantised codes (B, D, h, w)."""
        seg_logits = self.seg_decoder(z_q_abnormal)
        cond = condition_map(seg_logits)
        b = z_q_normal.shape[0]
        # One decoder pass over [map-conditioned; zero-conditioned] so the BatchNorm statistics of training
        # are those of both reconstructions together, as are the running statistics used in eval mode.
        z = torch.cat([z_q_normal, z_q_normal], dim=0).to(cond.dtype)
        recon = self.image_decoder(z, cond, null=b)
        return seg_logits, recon[:b], recon[b:]

    def forward(self, x: torch.Tensor) -> FDNOutput:
        """Full pass; in train mode it also updates both EMA codebooks."""
        z_e_n, z_e_a = self.encode_latents(x)
        z_q_n, commit_n, idx_n = self.vq_normal(z_e_n)
        z_q_a, commit_a, idx_a = self.vq_abnormal(z_e_a)
        seg_logits, recon_full, recon_normal = self.decode(z_q_n.to(z_e_n.dtype), z_q_a.to(z_e_a.dtype))
        return FDNOutput(
            seg_logits=seg_logits,
            recon_full=recon_full,
            recon_normal=recon_normal,
            z_e_normal=z_e_n,
            z_e_abnormal=z_e_a,
            z_q_normal=z_q_n,
            z_q_abnormal=z_q_a,
            idx_normal=idx_n,
            idx_abnormal=idx_a,
            commitment_normal=commit_n,
            commitment_abnormal=commit_a,
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code index grids (idx_normal, idx_abnormal), each (B, h, w) int64 in image (row, col) order."""
        z_e_n, z_e_a = self.encode_latents(x)
        return self.vq_normal.indices(z_e_n), self.vq_abnormal.indices(z_e_a)

    def decode_indices(
        self, idx_normal: torch.Tensor, idx_abnormal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seg_logits, recon_full, recon_normal) from two index grids (B, h, w)."""
        self._check_indices(idx_normal, "idx_normal")
        self._check_indices(idx_abnormal, "idx_abnormal")
        if idx_normal.shape[0] != idx_abnormal.shape[0]:
            raise DataError(
                f"idx_normal has {idx_normal.shape[0]} grids but idx_abnormal {idx_abnormal.shape[0]}; "
                "pass them in pairs"
            )
        z_q_n = self.vq_normal.lookup(idx_normal.long())
        z_q_a = self.vq_abnormal.lookup(idx_abnormal.long())
        seg_logits, recon_full, recon_normal = self.decode(z_q_n, z_q_a)
        return seg_logits, recon_full, recon_normal
