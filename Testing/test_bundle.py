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
    FINGERPRINT_VERSION,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    compute_fingerprint,
    load_bundle,
    model_fingerprint,
    save_bundle,
    weights_fingerprint,
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
    assert bundle.fingerprint_version == FINGERPRINT_VERSION == 2
    assert weights_fingerprint(trained_model.state_dict(), CFG) == bundle.fingerprint
    # Loading by the manifest path works as well.
    again = load_bundle(bundle_dir / MANIFEST_NAME, device="cpu").encode_slices(x, batch_size=5)
    np.testing.assert_array_equal(again.normal, enc.normal)


def test_manifest_records_hashes_configs_and_versions(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and manifest["includes_critic"] is False
    assert manifest["fingerprint_version"] == 2
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


# ------------------------------------------------------------------ fingerprint v2, typed manifest, paths


def _rewrite(bundle_dir: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Edit bundle.json and recompute its manifest_sha256 (what a careless tool or a tamperer does)."""
    import hashlib

    path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.pop("manifest_sha256")
    change(manifest)
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    manifest["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    path.write_text(json.dumps(manifest))


def test_fingerprint_v2_covers_encoder_and_codebooks_not_decoders(trained_model: FDN) -> None:
    state = {k: v.clone() for k, v in trained_model.state_dict().items()}
    base = weights_fingerprint(state, CFG)
    assert base == model_fingerprint(trained_model)
    tower = next(k for k in state if k.startswith("tower_abnormal.") and k.endswith("weight"))
    for key in ("stem.0.weight", tower, "vq_normal.embedding.weight"):
        changed = dict(state)
        changed[key] = state[key].clone()
        changed[key].view(-1)[0] += 1e-6
        assert weights_fingerprint(changed, CFG) != base, key
    decoder = dict(state)
    key = next(k for k in state if k.startswith("image_decoder.") and k.endswith("weight"))
    decoder[key] = state[key] + 1.0
    assert weights_fingerprint(decoder, CFG) == base  # the decoders do not change the codes
    assert weights_fingerprint(state, FDNConfig(**{**CFG.__dict__, "ema_decay": 0.98})) != base


def test_changed_encoder_weights_with_recomputed_hashes_are_caught(
    trained_model: FDN, bundle_dir: Path
) -> None:
    """Weights changed and every hash recomputed: the fingerprint no longer matches; with the fingerprint
    recomputed too, it names another code space (a database refuses it, see test_database)."""
    from safetensors.torch import load_file, save_file

    from fdn_core.fileio import sha256_file

    weights = bundle_dir / WEIGHTS_NAME
    state = load_file(str(weights))
    state["stem.0.weight"] = state["stem.0.weight"] * 1.01
    save_file(state, str(weights), metadata={"format": "fdn-inference-bundle", "format_version": "1"})

    def rehash(m: dict) -> None:
        m["files"][WEIGHTS_NAME] = {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}

    _rewrite(bundle_dir, rehash)
    with pytest.raises(IntegrityError, match="encoder weights, codebooks and config do not give"):
        load_bundle(bundle_dir, device="cpu")
    original = model_fingerprint(trained_model)
    _rewrite(bundle_dir, lambda m: m.update(fingerprint=weights_fingerprint(state, CFG)))
    assert load_bundle(bundle_dir, device="cpu").fingerprint != original


def test_version_1_bundles_still_load_and_say_so(
    trained_model: FDN, bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cb_n, cb_a = trained_model.codebook("normal"), trained_model.codebook("abnormal")
    v1 = compute_fingerprint(cb_n, cb_a, CFG)

    def to_v1(m: dict) -> None:
        m.pop("fingerprint_version")
        m["fingerprint"] = v1

    _rewrite(bundle_dir, to_v1)
    with caplog.at_level("WARNING"):
        bundle = load_bundle(bundle_dir, device="cpu")
    assert bundle.fingerprint == v1 and bundle.fingerprint_version == 1
    assert "version-1 fingerprint" in caplog.text and "re-export" in caplog.text
    _rewrite(bundle_dir, lambda m: m.update(fingerprint_version=7))
    with pytest.raises(DataError, match="fingerprint version 7"):
        load_bundle(bundle_dir, device="cpu")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(files=None), "files"),
        (lambda m: m.update(files=["model.safetensors"]), "files"),
        (lambda m: m["files"].update({WEIGHTS_NAME: "abc"}), "files"),
        (lambda m: m["files"][WEIGHTS_NAME].pop("sha256"), "sha256"),
        (lambda m: m["files"][WEIGHTS_NAME].update(bytes="12"), "bytes"),
        (lambda m: m.update(model=[1, 2]), "model"),
        (lambda m: m["model"].update(latent_size="8x8"), "latent_size"),
        (lambda m: m.update(metadata="none"), "metadata"),
        (lambda m: m.update(fingerprint=None), "fingerprint"),
        (lambda m: m.update(fingerprint_version="2"), "fingerprint_version"),
        (lambda m: m.update(unexpected=1), "unexpected"),
    ],
)
def test_wrongly_typed_manifest_fields_are_clear_errors(bundle_dir: Path, change, match: str) -> None:  # type: ignore[no-untyped-def]
    _rewrite(bundle_dir, change)
    with pytest.raises((IntegrityError, ConfigError), match=match) as err:
        load_bundle(bundle_dir, device="cpu")
    assert "bundle.json" in str(err.value)


def test_files_outside_the_bundle_are_never_read(bundle_dir: Path, tmp_path: Path) -> None:
    from fdn_core.fileio import sha256_file

    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    for name in ("../secret.txt", "../../../etc/hostname", "/etc/hostname", str(outside)):
        entry = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
        _rewrite(bundle_dir, lambda m, n=name, e=entry: m["files"].update({n: e}))
        with pytest.raises(IntegrityError, match=r"outside|absolute"):
            load_bundle(bundle_dir, device="cpu")
        _rewrite(bundle_dir, lambda m, n=name: m["files"].pop(n))
    # A link inside the bundle that points outside it is refused as well.
    weights = bundle_dir / WEIGHTS_NAME
    moved = tmp_path / "elsewhere.safetensors"
    weights.rename(moved)
    weights.symlink_to(moved)
    with pytest.raises(IntegrityError, match="outside"):
        load_bundle(bundle_dir, device="cpu")


def test_a_replacement_that_died_between_its_renames_is_repaired_on_load(bundle_dir: Path) -> None:
    """``save_bundle(overwrite=True)`` of an older version killed between its two renames left the bundle
    in ``.NAME.old``; loading puts it back."""
    old = bundle_dir.with_name(f".{bundle_dir.name}.old")
    bundle_dir.rename(old)
    assert load_bundle(bundle_dir, device="cpu").fingerprint_version == 2
    assert bundle_dir.is_dir() and not old.exists()
