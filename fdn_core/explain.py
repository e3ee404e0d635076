"""RELAX explanations of retrieval representations (Wickstrøm et al. 2021, as used by seed 003), for every
method: the FDN's two codes, SimSiam's features and Y-Net's hash layer.

RELAX asks which pixels a representation depends on. ``N`` smooth random masks ``M_n`` (a coarse grid of
Bernoulli(p) cells, upsampled bilinearly to the slice and shifted by a random sub-cell offset as in RISE, so
the cell borders do not print into the map) occlude the slice (``x * M_n``: masked pixels become 0, the
z-scored background and brain mean). With ``h`` the representation of the unmasked slice (or of a retrieved
slice, to explain a query-result pair) and ``s_n = cos(h, f(x * M_n))``::

    importance   R_ij = sum_n s_n M_ij(n) / sum_n M_ij(n)
    uncertainty  U_ij = sum_n (s_n - R_ij)^2 M_ij(n) / sum_n M_ij(n)

This is RELAX's importance and uncertainty (the paper's 1/N sums, here divided by each pixel's total mask
weight, so a pixel's score is the expected similarity when it is kept; the paper's sum is this times about
p, the same map up to scale). Informative pixels keep the similarity high when they are visible. RELAX's
uncertainty-filtered importance keeps R where U is at most a threshold (here: the mean of U over the brain)
and sets the other pixels to the lowest importance.

Maps are reported centred: ``R - mean_n s_n`` (the change of the expected similarity when the pixel is kept
rather than not considered); their positive part is the "mass" of an explanation:

- ``mass_share(map, region, within)``: share of the positive mass inside ``region`` among pixels ``within``
  (the brain): for the FDN's abnormal code it should sit on the tumour, for the normal code outside it;
  chance level = the region's share of the brain area;
- ``relevance_rank_accuracy(map, mask, within)``: seed 003's relevance rank (Arras et al. 2022): of the |S|
  most important pixels, the share inside the mask S.

What the FDN's maps explain (``fdn_representation``): by default the encoder's continuous latents z_e^- and
z_e^+ (each flattened over its D x h x w grid, cosine similarity: the quantity D_A compares after
quantisation). The quantised codes are a step function of the input: most masks leave every code index
unchanged, so the similarity of the de-quantised grid moves only when a cell flips code and thousands of masks
leave most pixels without signal; z_e is what the codes are the nearest codebook vectors of, so its changes
announce the code changes. ``representation="codes"`` explains the de-quantised grids z_q instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fdn_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fdn_core.baselines.bundle import BaselineBundle
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.progress import Progress

__all__ = [
    "RelaxConfig",
    "RelaxMap",
    "Representation",
    "baseline_representation",
    "brain_mask",
    "explanation_shares",
    "fdn_representation",
    "mass_share",
    "relax",
    "relevance_rank_accuracy",
    "smooth_masks",
]

#: A representation: (B, C, S, S) slices -> name -> (B, F) vectors (one name per explained code).
Representation = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RelaxConfig:
    """``num_masks`` (seed 003: 3000), ``grid`` cells per side of the coarse mask, ``keep_prob`` p of a cell
    being kept, ``batch_size`` masked slices per forward pass, ``seed`` of the masks."""

    __config_allow_defaults__ = True

    num_masks: int = 2000
    grid: int = 8
    keep_prob: float = 0.5
    batch_size: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_masks < 2 or self.grid < 1 or self.batch_size < 1:
            raise ConfigError("relax: num_masks must be >= 2, grid and batch_size >= 1")
        if not 0.0 < self.keep_prob < 1.0:
            raise ConfigError(f"relax: keep_prob {self.keep_prob} must be within (0, 1)")


@dataclass
class RelaxMap:
    """One explanation on the model grid (S, S): RELAX importance and uncertainty, the mean similarity over
    masks, and the seconds it took (shared by the maps of one call)."""

    importance: np.ndarray
    uncertainty: np.ndarray
    mean_similarity: float
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def centred(self) -> np.ndarray:
        """importance - mean similarity: > 0 where keeping the pixel raises the expected similarity."""
        return self.importance - self.mean_similarity

    def filtered(self, within: np.ndarray | None = None) -> np.ndarray:
        """Uncertainty-filtered centred importance: pixels whose uncertainty exceeds the mean uncertainty
        (over ``within``, default everywhere) are set to the lowest centred importance."""
        c = self.centred
        region = np.ones(c.shape, dtype=bool) if within is None else np.asarray(within, dtype=bool)
        if not region.any():
            return c.copy()
        threshold = float(self.uncertainty[region].mean())
        return np.where(self.uncertainty <= threshold, c, float(c.min()))


def brain_mask(image: np.ndarray) -> np.ndarray:
    """(S, S) bool: pixels where any sequence of a z-scored slice (C, S, S) is non-zero."""
    return np.asarray(np.any(np.asarray(image) != 0, axis=0))


def smooth_masks(n: int, size: int, config: RelaxConfig, generator: torch.Generator) -> torch.Tensor:
    """``n`` smooth masks (n, 1, size, size) in [0, 1]: a (grid+1)^2 Bernoulli(p) grid upsampled bilinearly to
    (grid+1) cells of ``ceil(size / grid)`` pixels, then cropped at a random offset within one cell."""
    g = config.grid
    cell = math.ceil(size / g)
    big = (g + 1) * cell
    coarse = (torch.rand((n, 1, g + 1, g + 1), generator=generator) < config.keep_prob).float()
    up = F.interpolate(coarse, size=(big, big), mode="bilinear", align_corners=False)
    dx = torch.randint(0, cell, (n,), generator=generator)
    dy = torch.randint(0, cell, (n,), generator=generator)
    rows = (dx[:, None] + torch.arange(size)[None, :]).clamp(max=big - 1)
    cols = (dy[:, None] + torch.arange(size)[None, :]).clamp(max=big - 1)
    return up[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def relax(
    represent: Representation,
    image: np.ndarray | torch.Tensor,
    config: RelaxConfig | None = None,
    reference: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> dict[str, RelaxMap]:
    """RELAX maps of ``image`` (C, S, S) for every representation ``represent`` returns (module docstring).

    ``reference``: the vectors to compare masked representations with (name -> (F,)), e.g. a retrieved
    slice's; default the unmasked image's own representation. ``progress`` is told after every batch of
    masks (and may cancel)."""
    cfg = config or RelaxConfig()
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image)
    if x.ndim != 3:
        raise DataError(f"relax: expected one slice (C, S, S), got shape {tuple(x.shape)}")
    dev = device or torch.device("cpu")
    x = x.to(dev, torch.float32)
    size = int(x.shape[-1])
    if x.shape[-2] != size:
        raise DataError(f"relax: slices must be square, got {tuple(x.shape)}")
    t0 = time.perf_counter()
    with torch.inference_mode():
        if reference is None:
            target = {k: v[0].double() for k, v in represent(x[None]).items()}
        else:
            target = {
                k: torch.as_tensor(np.asarray(v)).to(dev).double().reshape(-1) for k, v in reference.items()
            }
        gen = torch.Generator().manual_seed(cfg.seed)
        weight = torch.zeros((size, size), dtype=torch.float64)
        sums = {k: torch.zeros((size, size), dtype=torch.float64) for k in target}
        squares = {k: torch.zeros((size, size), dtype=torch.float64) for k in target}
        sim_total = dict.fromkeys(target, 0.0)
        done = 0
        while done < cfg.num_masks:
            b = min(cfg.batch_size, cfg.num_masks - done)
            masks = smooth_masks(b, size, cfg, gen)
            reps = represent(x[None] * masks.to(dev))
            m = masks[:, 0].double()
            weight += m.sum(0)
            for k, tgt in target.items():
                s = F.cosine_similarity(reps[k].double(), tgt[None].expand_as(reps[k]), dim=1).cpu()
                sums[k] += torch.einsum("n,nij->ij", s, m)
                squares[k] += torch.einsum("n,nij->ij", s * s, m)
                sim_total[k] += float(s.sum())
            done += b
            if progress is not None:
                progress.update(done, cfg.num_masks, "Explaining (RELAX)")
    seconds = time.perf_counter() - t0
    w = weight.clamp_min(1e-12)
    out = {}
    for k in target:
        r = sums[k] / w
        # sum (s - R)^2 M / sum M = E_M[s^2] - R^2 (per pixel, R the same weighted mean)
        u = (squares[k] / w - r * r).clamp_min(0.0)
        out[k] = RelaxMap(
            r.numpy(), u.numpy(), sim_total[k] / cfg.num_masks, seconds, {"num_masks": cfg.num_masks}
        )
    return out


def mass_share(importance: np.ndarray, region: np.ndarray, within: np.ndarray | None = None) -> float:
    """Share of the positive part of ``importance`` (a centred map) lying in ``region``, counting pixels
    ``within`` only (default all); NaN when there is no positive mass."""
    imp = np.asarray(importance, dtype=np.float64)
    keep = np.ones(imp.shape, dtype=bool) if within is None else np.asarray(within, dtype=bool)
    pos = np.where(keep, np.clip(imp, 0.0, None), 0.0)
    total = float(pos.sum())
    if total <= 0:
        return math.nan
    return float(pos[np.asarray(region, dtype=bool)].sum() / total)


def relevance_rank_accuracy(
    importance: np.ndarray, mask: np.ndarray, within: np.ndarray | None = None
) -> float:
    """Seed 003's relevance rank accuracy (Arras et al. 2022): with K = |S| pixels in ``mask`` S, the share of
    the K most important pixels (among ``within``; ties broken by pixel order) that lie in S. NaN for an empty
    mask."""
    imp = np.asarray(importance, dtype=np.float64).ravel()
    s = np.asarray(mask, dtype=bool).ravel()
    keep = np.ones(imp.shape, dtype=bool) if within is None else np.asarray(within, dtype=bool).ravel()
    s = s & keep
    k = int(s.sum())
    if k == 0:
        return math.nan
    candidates = np.nonzero(keep)[0]
    order = candidates[np.lexsort((candidates, -imp[candidates]))]
    return float(s[order[:k]].sum() / k)


# ------------------------------------------------------------------------------------- representations


def fdn_representation(
    bundle: InferenceBundle, representation: Literal["latent", "codes"] = "latent"
) -> Representation:
    """The FDN's two codes as a ``Representation``: "normal" and "abnormal", each the flattened continuous
    latent z_e (default) or the de-quantised code grid z_q (module docstring for the choice)."""
    if representation not in ("latent", "codes"):
        raise ConfigError(f"representation {representation!r}: use 'latent' or 'codes'")
    model = bundle.model
    dev = bundle.device

    def represent(x: torch.Tensor) -> dict[str, torch.Tensor]:
        z_n, z_a = model.encode_latents(x.to(dev))
        if representation == "codes":
            z_n = model.vq_normal.lookup(model.vq_normal.indices(z_n))
            z_a = model.vq_abnormal.lookup(model.vq_abnormal.indices(z_a))
        return {"normal": z_n.flatten(1).float(), "abnormal": z_a.flatten(1).float()}

    return represent


def baseline_representation(bundle: BaselineBundle) -> Representation:
    """A baseline's continuous retrieval representation (SimSiam features, Y-Net tanh code) as "embedding"."""
    fn = bundle.representation_fn()
    dev = bundle.device
    size = bundle.config.image_size

    def represent(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(dev)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return {"embedding": fn(x).float()}

    return represent


def explanation_shares(
    methods: Mapping[str, Representation],
    slices: Sequence[tuple[np.ndarray, np.ndarray]],
    config: RelaxConfig | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Mass shares and relevance rank of RELAX maps over query slices ``(image (C,S,S), tumour labels
    (S,S))``.

    For every method and map: per query the share of the positive mass inside the tumour and outside it
    (within the brain), the same for the uncertainty-filtered map, the relevance rank accuracy of the tumour
    mask, and the chance level (the tumour's share of the brain area). Returns per-query lists, means and
    standard deviations, and the seconds per explanation."""
    cfg = config or RelaxConfig()
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    chance: list[float] = []
    seconds: dict[str, list[float]] = {}
    for image, seg in slices:
        brain = brain_mask(image)
        tumour = (np.asarray(seg) > 0) & brain
        if not tumour.any():
            continue
        chance.append(float(tumour.sum() / brain.sum()))
        for name, represent in methods.items():
            maps = relax(represent, image, cfg, device=device)
            seconds.setdefault(name, []).append(next(iter(maps.values())).seconds)
            for code, rmap in maps.items():
                rec = per.setdefault(name, {}).setdefault(code, {})
                centred, filtered = rmap.centred, rmap.filtered(brain)
                inside = mass_share(centred, tumour, brain)
                inside_f = mass_share(filtered, tumour, brain)
                rec.setdefault("share_in_tumour", []).append(inside)
                rec.setdefault("share_outside_tumour", []).append(1.0 - inside)
                rec.setdefault("share_in_tumour_filtered", []).append(inside_f)
                rec.setdefault("share_outside_tumour_filtered", []).append(1.0 - inside_f)
                rec.setdefault("relevance_rank_tumour", []).append(
                    relevance_rank_accuracy(centred, tumour, brain)
                )

    def stats(values: list[float]) -> dict[str, float | None]:
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        return {"mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None}

    summary = {
        name: {code: {k: stats(v) for k, v in rec.items()} for code, rec in codes.items()}
        for name, codes in per.items()
    }
    return {
        "num_queries": len(chance),
        "relax": {
            "num_masks": cfg.num_masks,
            "grid": cfg.grid,
            "keep_prob": cfg.keep_prob,
            "seed": cfg.seed,
        },
        "chance_tumour_share_of_brain": stats(chance),
        "summary": summary,
        "seconds_per_explanation": {k: float(np.mean(v)) for k, v in seconds.items()},
        "per_query": {
            "chance": chance,
            **{f"{name}/{code}": rec for name, codes in per.items() for code, rec in codes.items()},
        },
    }
