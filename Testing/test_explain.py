"""RELAX (fdn_core.explain): the estimator against a brute-force computation, a synthetic case whose answer is
known (a toy embedding that only looks at one region: the map must concentrate there), the mass share and
relevance rank on hand-made maps, and the FDN's two maps on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdn_core.errors import ConfigError, DataError
from fdn_core.explain import (
    RelaxConfig,
    brain_mask,
    explanation_shares,
    fdn_representation,
    mass_share,
    relax,
    relevance_rank_accuracy,
    smooth_masks,
)

REGION = (slice(8, 24), slice(40, 56))


def _toy(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A representation that sees only the 16x16 region rows 8-23, columns 40-55 (fixed random projection)."""
    w = torch.randn(4 * 16 * 16, 32, generator=torch.Generator().manual_seed(0))
    return {"toy": x[:, :, REGION[0], REGION[1]].flatten(1) @ w}


def test_smooth_masks_are_reproducible_smooth_and_bounded() -> None:
    cfg = RelaxConfig(num_masks=10, grid=4, keep_prob=0.5)
    a = smooth_masks(10, 32, cfg, torch.Generator().manual_seed(0))
    b = smooth_masks(10, 32, cfg, torch.Generator().manual_seed(0))
    assert a.shape == (10, 1, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a[..., 1:] - a[..., :-1]).abs().max()) < 0.2  # bilinear: no hard cell edges
    assert 0.3 < float(a.mean()) < 0.7


def test_relax_matches_brute_force_importance_and_uncertainty() -> None:
    cfg = RelaxConfig(num_masks=40, grid=4, batch_size=7, seed=3)
    image = np.random.default_rng(0).normal(size=(4, 64, 64)).astype(np.float32)
    got = relax(_toy, image, cfg)["toy"]
    # the same masks, drawn in the same batches, and the estimator written out
    gen = torch.Generator().manual_seed(cfg.seed)
    masks = torch.cat([smooth_masks(b, 64, cfg, gen) for b in (7, 7, 7, 7, 7, 5)])[:, 0].double()
    x = torch.from_numpy(image)
    h = _toy(x[None])["toy"][0].double()
    s = torch.stack(
        [F.cosine_similarity(_toy((x * m.float())[None])["toy"][0].double(), h, dim=0) for m in masks]
    )
    r = (s[:, None, None] * masks).sum(0) / masks.sum(0)
    u = (((s[:, None, None] - r[None]) ** 2) * masks).sum(0) / masks.sum(0)
    assert np.allclose(got.importance, r.numpy(), atol=1e-9)
    assert np.allclose(got.uncertainty, u.numpy(), atol=1e-9)
    assert got.mean_similarity == pytest.approx(float(s.mean()))
    assert np.allclose(got.centred, r.numpy() - float(s.mean()))


def test_relax_map_concentrates_where_the_toy_embedding_looks() -> None:
    image = np.random.default_rng(1).normal(size=(4, 64, 64)).astype(np.float32)
    rmap = relax(_toy, image, RelaxConfig(num_masks=1500, seed=0))["toy"]
    region = np.zeros((64, 64), dtype=bool)
    region[REGION] = True
    area = region.mean()  # 1/16 of the slice
    share = mass_share(rmap.centred, region)
    assert share > 6 * area  # measured 0.49 against an area of 0.06
    assert relevance_rank_accuracy(rmap.centred, region) > 0.7  # measured 0.83
    assert rmap.centred[region].mean() > 10 * abs(rmap.centred[~region].mean())
    assert mass_share(rmap.filtered(), region) > share * 0.9
    # against a "retrieved" image, only what the toy sees matters as well
    other = image.copy()
    other[:, REGION[0], REGION[1]] += 0.5
    ref = {"toy": _toy(torch.from_numpy(other)[None])["toy"][0]}
    pair = relax(_toy, image, RelaxConfig(num_masks=800), reference=ref)["toy"]
    assert mass_share(pair.centred, region) > 4 * area


def test_mass_share_and_relevance_rank_by_hand() -> None:
    imp = np.array([[3.0, -1.0], [1.0, 0.0]])
    region = np.array([[True, False], [False, False]])
    assert mass_share(imp, region) == pytest.approx(3.0 / 4.0)  # positive part only
    within = np.array([[False, True], [True, True]])
    assert mass_share(imp, region, within) == pytest.approx(0.0)  # the region pixel is outside "within"
    assert math.isnan(mass_share(-np.ones((2, 2)), region))
    # relevance rank: K = |S| = 2 most important pixels {(0,0), (1,0)}; one of them in S
    s = np.array([[True, True], [False, False]])
    assert relevance_rank_accuracy(imp, s) == pytest.approx(0.5)
    assert relevance_rank_accuracy(imp, np.array([[True, False], [True, False]])) == pytest.approx(1.0)
    assert math.isnan(relevance_rank_accuracy(imp, np.zeros((2, 2), bool)))


def test_config_and_input_checks() -> None:
    with pytest.raises(ConfigError):
        RelaxConfig(keep_prob=1.0)
    with pytest.raises(ConfigError):
        RelaxConfig(num_masks=1)
    with pytest.raises(DataError):
        relax(_toy, np.zeros((4, 64, 32), np.float32))
    with pytest.raises(DataError):
        relax(_toy, np.zeros((64, 64), np.float32))


def test_fdn_maps_and_shares_on_the_tiny_model(tiny_bundle: Path) -> None:
    from fdn_core.model.bundle import load_bundle

    bundle = load_bundle(tiny_bundle, "cpu")
    image = np.zeros((4, 64, 64), np.float32)
    image[:, 12:52, 10:54] = np.random.default_rng(2).normal(size=(4, 40, 44))
    seg = np.zeros((64, 64), np.uint8)
    seg[20:30, 20:30] = 2
    for rep in ("latent", "codes"):
        maps = relax(fdn_representation(bundle, rep), image, RelaxConfig(num_masks=20))
        assert set(maps) == {"normal", "abnormal"}
        assert maps["normal"].importance.shape == (64, 64)
    with pytest.raises(ConfigError):
        fdn_representation(bundle, "pixels")  # type: ignore[arg-type]
    shares = explanation_shares(
        {"FDN": fdn_representation(bundle)}, [(image, seg)], RelaxConfig(num_masks=20)
    )
    brain = brain_mask(image)
    assert shares["num_queries"] == 1
    assert shares["chance_tumour_share_of_brain"]["mean"] == pytest.approx(100 / brain.sum())
    fdn = shares["summary"]["FDN"]
    inside = fdn["abnormal"]["share_in_tumour"]["mean"]
    assert fdn["abnormal"]["share_outside_tumour"]["mean"] == pytest.approx(1 - inside)
    assert shares["seconds_per_explanation"]["FDN"] > 0
