"""The baselines' building blocks: R-MAC regions and descriptor, the MR view augmentation, the models, the
hash codes, the verified bundles, and the exact embedding index (faiss / numpy / Hamming on packed bits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdn_core.baselines.augment import MRAugmentConfig, MRViewAugment, brain_mask
from fdn_core.baselines.backbone import BackboneConfig
from fdn_core.baselines.bundle import load_baseline, save_baseline
from fdn_core.baselines.methods import BaselineEmbedding, load_embedding_methods
from fdn_core.baselines.rmac import rmac, rmac_regions
from fdn_core.baselines.simsiam import SimSiam, SimSiamConfig
from fdn_core.baselines.ynet import YNet, YNetConfig
from fdn_core.codes.embedding_index import EmbeddingIndex, faiss_available
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.errors import ConfigError, DataError, IntegrityError

TINY_BACKBONE = BackboneConfig(widths=(8, 8, 16, 16))


def test_rmac_regions_on_8x8_are_seed_004s_14() -> None:
    regions = rmac_regions(8, 8, 3)
    assert len(regions) == 14
    assert regions[0] == (0, 8, 0, 8)  # scale 0: the whole map
    assert sorted(set(r[1] - r[0] for r in regions)) == [4, 5, 8]  # sides 2*8/(s+2) = 8, 5.33, 4
    assert {(r0, c0) for r0, r1, c0, c1 in regions if r1 - r0 == 5} == {(0, 0), (0, 3), (3, 0), (3, 3)}
    assert {r0 for r0, r1, _, _ in regions if r1 - r0 == 4} == {0, 2, 4}  # 50 % overlap, closest to 40 %
    assert len(rmac_regions(4, 4, 1)) == 1
    with pytest.raises(ConfigError):
        rmac_regions(0, 8)


def test_rmac_descriptor_by_hand() -> None:
    # one channel pair on a 2x2 map, a single scale: the one region is the whole map
    f = torch.tensor([[[[1.0, 5.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]])
    d = rmac(f, scales=1)
    assert d[0].tolist() == pytest.approx((torch.tensor([5.0, 3.0]) / np.sqrt(34.0)).tolist())
    # two scales on 4x4: sum of L2-normalised region maxima, L2-normalised
    g = torch.zeros((1, 2, 4, 4))
    g[0, 0, 0, 0] = 4.0  # only in the top-left corner
    g[0, 1, 3, 3] = 1.0  # only in the bottom-right corner
    regions = rmac_regions(4, 4, 2)
    total = torch.zeros(2)
    for r0, r1, c0, c1 in regions:
        total += F.normalize(g[0, :, r0:r1, c0:c1].amax(dim=(1, 2)), dim=0, eps=1e-6)
    assert rmac(g, scales=2)[0].tolist() == pytest.approx(F.normalize(total, dim=0).tolist())


def test_augmentation_keeps_background_and_is_reproducible() -> None:
    x = torch.zeros((2, 4, 64, 64))
    x[:, :, 16:48, 16:48] = torch.randn((2, 4, 32, 32))
    aug = MRViewAugment(MRAugmentConfig(crop_scale=(1.0, 1.0), flip_prob=0.0))
    v = aug.intensity(x, torch.Generator().manual_seed(1))
    assert torch.equal(v[:, :, :16], torch.zeros_like(v[:, :, :16]))  # background stays 0
    assert not torch.allclose(v, x)  # brain intensities changed
    a = aug.view(x, torch.Generator().manual_seed(3))
    b = aug.view(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert brain_mask(x).shape == (2, 1, 64, 64)
    # a flip-only view mirrors the left-right axis (axis 0 of the slice = rows)
    flip = MRViewAugment(
        MRAugmentConfig(
            crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0, window_width=(1000.0, 1000.0),
            window_centre=(0.0, 0.0), gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=(0.0, 0.0),
            bias_prob=0.0, noise_std=(0.0, 0.0),
        )
    )  # fmt: skip
    assert torch.allclose(flip.view(x), torch.flip(x, dims=[2]), atol=1e-4)
    with pytest.raises(ConfigError):
        MRAugmentConfig(crop_scale=(0.0, 1.0))


def test_models_shapes_and_hash_bits() -> None:
    x = torch.randn((3, 4, 64, 64))
    sim = SimSiam(SimSiamConfig(backbone=TINY_BACKBONE, projector_dim=16, predictor_hidden=4)).eval()
    out = sim(x)
    assert out.h.shape == (3, 16) and out.z.shape == (3, 16) and out.p.shape == (3, 16)
    y = YNet(YNetConfig(backbone=TINY_BACKBONE, fpn_channels=8, rmac_channels=8, hash_bits=12)).eval()
    with torch.no_grad():
        o = y(x)
    assert o.seg_logits.shape == (3, 4, 64, 64) and o.class_logits.shape == (3, 3)
    assert o.hash_relaxed.shape == (3, 12) and float(o.hash_relaxed.abs().max()) < 1
    bits = y.hash_bits(x)
    assert bits.dtype == torch.uint8 and set(bits.unique().tolist()) <= {0, 1}
    assert torch.equal(bits, (y.relaxed_code(x) >= 0).to(torch.uint8))
    assert torch.allclose(o.descriptor.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ConfigError):
        YNetConfig(image_size=60)


def _bundles(tmp: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    sim = SimSiam(SimSiamConfig(backbone=TINY_BACKBONE, projector_dim=16, predictor_hidden=4))
    y = YNet(YNetConfig(backbone=TINY_BACKBONE, fpn_channels=8, rmac_channels=8, hash_bits=12))
    a = save_baseline(sim, PreprocessConfig(64), tmp / "simsiam", {"train_cohort_seed": 11})
    b = save_baseline(y, PreprocessConfig(64), tmp / "ynet", {"train_cohort_seed": 11})
    return a, b


def test_bundle_round_trip_and_integrity(tmp_path: Path) -> None:
    a, b = _bundles(tmp_path)
    sim, y = load_baseline(a, "cpu"), load_baseline(b, "cpu")
    assert (sim.kind, sim.metric, sim.width) == ("simsiam", "cosine", 16)
    assert (y.kind, y.metric, y.width) == ("ynet", "hamming", 12)
    assert sim.metadata["train_cohort_seed"] == 11
    x = np.random.default_rng(0).normal(size=(5, 4, 64, 64)).astype(np.float32)
    feats, bits = sim.embed(x), y.embed(x)
    assert feats.shape == (5, 16) and feats.dtype == np.float32
    assert bits.shape == (5, 12) and bits.dtype == np.uint8
    # slices of another size (another FDN's preprocessing) are resampled to the baseline's input size
    big = torch.nn.functional.interpolate(torch.from_numpy(x), size=(128, 128), mode="bilinear").numpy()
    assert sim.embed(big).shape == (5, 16)
    # no pickle anywhere: the weights are safetensors, the manifest JSON
    manifest = json.loads((a / "baseline.json").read_text())
    assert manifest["kind"] == "simsiam" and manifest["files"]["model.safetensors"]["sha256"]
    # a changed weight file is refused
    weights = b / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_baseline(b, "cpu")
    with pytest.raises(DataError):
        load_baseline(tmp_path, "cpu")


def test_embedding_methods_by_folder_and_key(tmp_path: Path) -> None:
    a, b = _bundles(tmp_path)
    methods = load_embedding_methods([str(a), f"hash2={b}"], device="cpu")
    assert [m.key for m in methods] == ["simsiam", "hash2"]
    assert [m.metric for m in methods] == ["cosine", "hamming"]
    assert isinstance(methods[0], BaselineEmbedding) and methods[0].kind == "embedding"
    assert "SimSiam" in methods[0].label and "Y-Net" in methods[1].label
    with pytest.raises(ConfigError, match="distinct keys"):
        load_embedding_methods([str(a), str(a)], device="cpu")


def test_embedding_index_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 6)).astype(np.float32)
    q = rng.normal(size=(3, 6)).astype(np.float32)
    l2 = np.sqrt(((ref[None] - q[:, None]) ** 2).sum(-1))
    cos = (
        1
        - (q / np.linalg.norm(q, axis=1, keepdims=True))
        @ (ref / np.linalg.norm(ref, axis=1, keepdims=True)).T
    )
    backends = ["numpy"] + (["faiss"] if faiss_available() else [])
    for backend in backends:
        assert np.allclose(EmbeddingIndex(ref, "l2", backend).distances(q), l2, atol=1e-4)
        assert np.allclose(EmbeddingIndex(ref, "cosine", backend).distances(q), cos, atol=1e-5)
    d, rows = EmbeddingIndex(ref, "l2", "numpy").search(q, 4)
    assert rows.shape == (3, 4) and np.array_equal(rows[:, 0], l2.argmin(axis=1))
    assert np.all(np.diff(d, axis=1) >= 0)


def test_hamming_index_on_packed_bits() -> None:
    ref = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0, 0]])
    q = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0]])
    index = EmbeddingIndex(ref, "hamming")
    assert index.distances(q)[0].tolist() == [1.0, 9.0, 4.0]
    assert index.bytes_per_row == 2  # 9 bits -> 2 bytes
    assert index.search(q, 2)[1][0].tolist() == [0, 2]
    with pytest.raises(DataError):
        EmbeddingIndex(np.array([[0, 2]]), "hamming")
    with pytest.raises(ConfigError):
        EmbeddingIndex(ref, "manhattan")
