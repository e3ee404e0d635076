"""Inference bundle: round trip, integrity checks, encoding API and its input checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.errors import ConfigError, DataError, IntegrityError
from fdn_core.model import FDN, FDNConfig
from fdn_core.model.bundle import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    compute_fingerprint,
    load_bundle,
    model_fingerprint,
    save_bundle,
)
from fdn_core.progress import Progress

CFG = FDNConfig(
    image_size=64,
    latent_size=8,
    stem_channels=8,
    encoder_channels=(8, 16),
    code_dim=8,
    num_codes=16,
    spade_hidden_channels=8,
    critic_channels=8,
)


@pytest.fixture(scope="module")
def trained_model() -> FDN:
    """A tiny FDN whose EMA codebooks and BatchNorm statistics have moved away from initialisation."""
    torch.manual_seed(3)
    model = FDN(CFG).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 4, 64, 64))
    return model.eval()


@pytest.fixture()
def bundle_dir(trained_model: FDN, tmp_path: Path) -> Path:
    return save_bundle(
        trained_model, PreprocessConfig(image_size=64), tmp_path / "bundle", {"seed": 7, "note": "t"}
    )


def _images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 64, 64)).astype(np.float32)


def test_round_trip_gives_identical_outputs(trained_model: FDN, bundle_dir: Path) -> None:
    assert sorted(p.name for p in bundle_dir.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    bundle = load_bundle(bundle_dir, device="cpu")
    assert bundle.config == CFG and bundle.preprocess == PreprocessConfig(image_size=64)
    assert bundle.fingerprint == model_fingerprint(trained_model)
    assert bundle.metadata == {"seed": 7, "note": "t"}
    assert not bundle.model.training and bundle.device == torch.device("cpu")
    ref = {k: v for k, v in trained_model.state_dict().items() if not k.startswith("critic.")}
    got = bundle.model.state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    x = _images()
    with torch.no_grad():
        expected = trained_model(torch.from_numpy(x))
        ref_seg, ref_full, ref_normal = trained_model.decode_indices(
            expected.idx_normal, expected.idx_abnormal
        )
    full, normal, seg = bundle.reconstruct(x, batch_size=5)  # same batch as the reference: bit-identical
    np.testing.assert_array_equal(full, ref_full.numpy())
    np.testing.assert_array_equal(normal, ref_normal.numpy())
    np.testing.assert_array_equal(seg, ref_seg.argmax(1).numpy().astype(np.uint8))
    # forward() decodes z_e + (z_q - z_e) (straight-through), equal to the code vectors up to rounding.
    np.testing.assert_allclose(full, expected.recon_full.numpy(), rtol=1e-4, atol=1e-4)
    enc = bundle.encode_slices(x, batch_size=5)
    assert enc.normal.dtype == enc.abnormal.dtype == np.uint16 and enc.seg.dtype == np.uint8
    assert enc.normal.shape == enc.abnormal.shape == (5, 8, 8) and enc.seg.shape == (5, 64, 64)
    np.testing.assert_array_equal(enc.normal, expected.idx_normal.numpy())
    np.testing.assert_array_equal(enc.abnormal, expected.idx_abnormal.numpy())
    np.testing.assert_array_equal(enc.seg, seg)
    # Other batch sizes agree up to float rounding of the convolutions.
    full2, _, _ = bundle.reconstruct(x, batch_size=2)
    np.testing.assert_allclose(full2, full, rtol=1e-4, atol=1e-4)
    enc2 = bundle.encode_slices(x, batch_size=3)
    assert (enc2.normal == enc.normal).mean() > 0.98 and (enc2.abnormal == enc.abnormal).mean() > 0.98
    cb_n, cb_a = bundle.codebooks()
    assert cb_n.dtype == np.float32 and cb_n.shape == (16, 8)
    np.testing.assert_array_equal(cb_a, trained_model.codebook("abnormal").detach().numpy())
    assert compute_fingerprint(cb_n, cb_a, CFG) == bundle.fingerprint
    # Loading by the manifest path works as well.
    again = load_bundle(bundle_dir / MANIFEST_NAME, device="cpu").encode_slices(x, batch_size=5)
    np.testing.assert_array_equal(again.normal, enc.normal)


def test_manifest_records_hashes_configs_and_versions(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and manifest["includes_critic"] is False
    assert manifest["model"]["latent_size"] == 8 and manifest["preprocess"] == {"image_size": 64}
    assert len(manifest["files"][WEIGHTS_NAME]["sha256"]) == 64
    assert {"torch", "monai", "fdn_core", "python"} <= set(manifest["versions"])


def test_fingerprint_depends_on_codebooks_and_config(trained_model: FDN) -> None:
    cb_n = trained_model.codebook("normal").detach().clone()
    cb_a = trained_model.codebook("abnormal").detach().clone()
    base = compute_fingerprint(cb_n, cb_a, CFG)
    assert compute_fingerprint(cb_n.numpy(), cb_a.numpy(), CFG) == base
    assert compute_fingerprint(cb_a, cb_n, CFG) != base
    cb_n[3, 2] += 1e-6
    assert compute_fingerprint(cb_n, cb_a, CFG) != base
    other = FDNConfig(**{**CFG.__dict__, "ema_decay": 0.98})
    assert compute_fingerprint(cb_n, cb_a, other) != compute_fingerprint(cb_n, cb_a, CFG)


def test_edited_weights_are_detected(bundle_dir: Path) -> None:
    weights = bundle_dir / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors.*sha256.*re-export"):
        load_bundle(bundle_dir, device="cpu")


def test_missing_weights_are_detected(bundle_dir: Path) -> None:
    (bundle_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_bundle(bundle_dir, device="cpu")


def test_edited_manifest_is_detected(bundle_dir: Path) -> None:
    path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["metadata"]["seed"] = 8
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"bundle\.json.*edited"):
        load_bundle(bundle_dir, device="cpu")
    path.write_text("{ not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        load_bundle(bundle_dir, device="cpu")


def test_config_edit_with_recomputed_manifest_hash_is_caught_by_the_fingerprint(bundle_dir: Path) -> None:
    import hashlib

    path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.pop("manifest_sha256")
    manifest["model"]["commitment_cost"] = 0.5
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    manifest["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="fingerprint"):
        load_bundle(bundle_dir, device="cpu")


def test_unknown_format_version_and_non_bundles_are_rejected(bundle_dir: Path, tmp_path: Path) -> None:
    path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format version 99"):
        load_bundle(bundle_dir, device="cpu")
    with pytest.raises(DataError, match="not an FDN inference bundle"):
        load_bundle(tmp_path, device="cpu")


def test_save_refuses_to_overwrite_unless_asked(trained_model: FDN, bundle_dir: Path) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        save_bundle(trained_model, PreprocessConfig(image_size=64), bundle_dir, {})
    save_bundle(trained_model, PreprocessConfig(image_size=64), bundle_dir, {"v": 2}, overwrite=True)
    assert load_bundle(bundle_dir, device="cpu").metadata == {"v": 2}


def test_save_checks_preprocess_and_metadata(trained_model: FDN, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        save_bundle(trained_model, PreprocessConfig(image_size=128), tmp_path / "a", {})
    with pytest.raises(ConfigError, match="plain JSON"):
        save_bundle(trained_model, PreprocessConfig(image_size=64), tmp_path / "b", {"x": object()})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_encode_slices_checks_its_input(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, device="cpu")
    with pytest.raises(DataError, match=r"expects \(N, 4, 64, 64\)"):
        bundle.encode_slices(np.zeros((2, 4, 32, 32), np.float32))
    with pytest.raises(DataError, match="float32"):
        bundle.encode_slices(np.zeros((2, 4, 64, 64), np.float64))
    with pytest.raises(DataError, match="numpy array"):
        bundle.encode_slices(torch.zeros(2, 4, 64, 64))  # type: ignore[arg-type]
    bad = _images(4)
    bad[3, 1, 5, 5] = np.nan
    with pytest.raises(DataError, match="slice 3"):
        bundle.encode_slices(bad, batch_size=2)
    empty = bundle.encode_slices(np.zeros((0, 4, 64, 64), np.float32))
    assert (
        empty.normal.shape == (0, 8, 8) and empty.normal.dtype == np.uint16 and empty.seg.shape == (0, 64, 64)
    )
    full, normal, seg = bundle.reconstruct(np.zeros((0, 4, 64, 64), np.float32))
    assert full.shape == normal.shape == (0, 4, 64, 64) and seg.shape == (0, 64, 64)


def test_encode_slices_reports_progress(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, device="cpu")
    calls: list[tuple[int, int]] = []
    bundle.encode_slices(_images(5), batch_size=2, progress=Progress(lambda d, t, m: calls.append((d, t))))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert bundle.default_batch_size() == 32
