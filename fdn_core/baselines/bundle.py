"""Baseline bundles: a trained SimSiam or Y-Net as a small verified folder, like the FDN's inference bundle.

Layout::

    model.safetensors   every weight and buffer (BatchNorm running statistics included); no pickle
    baseline.json       format / version, kind ("simsiam" | "ynet"), model config, preprocess config,
                        sha256 and size of model.safetensors, fingerprint (sha256 of the canonical config JSON
                        and of every tensor's name, dtype, shape and bytes), metadata (training command,
                        config, cohort seed, training-case fingerprints, budget), versions

``load_baseline`` verifies the file hash and the fingerprint before use (``IntegrityError`` otherwise).
``BaselineBundle.embed(images)`` gives the retrieval representation of preprocessed slices (the same slices
the FDN encodes: ``fdn_core.data.preprocess.volume_to_slices``): SimSiam's pooled features (float32, cosine
distance) or Y-Net's hash bits (uint8 0/1, Hamming distance); ``representation`` the continuous vector
RELAX explains (SimSiam: the same features; Y-Net: the tanh outputs before the sign).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fdn_core.baselines.simsiam import SimSiam, SimSiamConfig
from fdn_core.baselines.ynet import YNet, YNetConfig
from fdn_core.config import config_from_dict, config_to_dict
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.device import full_precision, select_device
from fdn_core.errors import ConfigError, DataError, IntegrityError
from fdn_core.fileio import atomic_dir, resolve_inside, sha256_file

__all__ = [
    "BASELINE_FORMAT",
    "BASELINE_KINDS",
    "MANIFEST_NAME",
    "BaselineBundle",
    "BaselineKind",
    "build_baseline",
    "load_baseline",
    "save_baseline",
    "weights_fingerprint",
]

BASELINE_FORMAT = "fdn-baseline-bundle"
BASELINE_FORMAT_VERSION = 1
MANIFEST_NAME = "baseline.json"
WEIGHTS_NAME = "model.safetensors"
BaselineKind = Literal["simsiam", "ynet"]
BASELINE_KINDS: tuple[str, ...] = ("simsiam", "ynet")
_FIX = "re-export it from its training run (fdn train-baseline ... writes RUN/bundle)"


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _config_class(kind: str) -> type[SimSiamConfig] | type[YNetConfig]:
    if kind == "simsiam":
        return SimSiamConfig
    if kind == "ynet":
        return YNetConfig
    raise ConfigError(f"unknown baseline kind {kind!r}; choose one of {list(BASELINE_KINDS)}")


def build_baseline(kind: str, config: SimSiamConfig | YNetConfig) -> SimSiam | YNet:
    """A freshly initialised model of ``kind`` with ``config``."""
    if kind == "simsiam" and isinstance(config, SimSiamConfig):
        return SimSiam(config)
    if kind == "ynet" and isinstance(config, YNetConfig):
        return YNet(config)
    raise ConfigError(f"baseline kind {kind!r} does not take a {type(config).__name__}")


def weights_fingerprint(state: Mapping[str, torch.Tensor], kind: str, config: Any) -> str:
    """sha256 of the kind, the canonical config JSON and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"fdn-baseline-v1\0{kind}\0".encode())
    h.update(_canonical_json(config_to_dict(config)))
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import safetensors

    from fdn_core import __version__

    return {
        "fdn_core": str(__version__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def save_baseline(
    model: SimSiam | YNet,
    preprocess: PreprocessConfig,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the bundle of ``model`` to the folder ``out_dir`` atomically; returns the folder."""
    from safetensors.torch import save_file

    kind = "simsiam" if isinstance(model, SimSiam) else "ynet" if isinstance(model, YNet) else None
    if kind is None:
        raise ConfigError(f"save_baseline needs a SimSiam or YNet model, got {type(model).__name__}")
    if preprocess.image_size != model.config.image_size:
        raise ConfigError(
            f"preprocess.image_size={preprocess.image_size} differs from the model's image_size="
            f"{model.config.image_size}"
        )
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"baseline metadata is not plain JSON ({exc})") from exc
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        weights = tmp / WEIGHTS_NAME
        save_file(state, str(weights), metadata={"format": BASELINE_FORMAT, "kind": kind})
        manifest: dict[str, Any] = {
            "format": BASELINE_FORMAT,
            "format_version": BASELINE_FORMAT_VERSION,
            "kind": kind,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": config_to_dict(model.config),
            "preprocess": config_to_dict(preprocess),
            "fingerprint": weights_fingerprint(state, kind, model.config),
            "files": {WEIGHTS_NAME: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
            "versions": _versions(),
            "metadata": metadata,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir


@dataclass
class BaselineBundle:
    """A loaded, verified baseline (module docstring); ``model`` is in eval mode on ``device``."""

    kind: str
    model: SimSiam | YNet
    config: SimSiamConfig | YNetConfig
    preprocess: PreprocessConfig
    fingerprint: str
    device: torch.device
    path: Path
    manifest: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        """Free-form metadata stored at export."""
        return dict(self.manifest.get("metadata", {}))

    @property
    def metric(self) -> str:
        """Distance the retrieval uses: "cosine" (SimSiam) or "hamming" (Y-Net)."""
        return "cosine" if self.kind == "simsiam" else "hamming"

    @property
    def name(self) -> str:
        """Short display name."""
        return "SimSiam" if self.kind == "simsiam" else "Y-Net"

    def _prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = (
            torch.as_tensor(np.asarray(images, dtype=np.float32))
            if isinstance(images, np.ndarray)
            else images
        )
        if x.ndim != 4 or x.shape[1] != 4:
            raise DataError(f"{self.name}: expected slices (N, 4, S, S), got {tuple(x.shape)}")
        size = self.config.image_size
        x = x.to(self.device, torch.float32)
        if x.shape[-1] != size or x.shape[-2] != size:
            # slices preprocessed at another size (another FDN bundle's): resample like volume_to_slices
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _batched(
        self, images: np.ndarray | torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int
    ) -> torch.Tensor:
        n = int(images.shape[0])
        outs = []
        with torch.inference_mode(), full_precision(self.device):
            for start in range(0, n, batch_size):
                outs.append(fn(self._prepare(images[start : start + batch_size])).float().cpu())
        if not outs:
            return torch.zeros((0, self.width), dtype=torch.float32)
        return torch.cat(outs)

    @property
    def width(self) -> int:
        """Length of the retrieval vector (features or bits)."""
        if isinstance(self.config, SimSiamConfig):
            return self.config.embedding_dim
        return self.config.hash_bits

    def representation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The continuous representation as a function of a prepared batch (for RELAX)."""
        model = self.model
        if isinstance(model, SimSiam):
            return model.embed
        return model.relaxed_code

    def representation(self, images: np.ndarray | torch.Tensor, batch_size: int = 128) -> np.ndarray:
        """Continuous representation (N, F) float32: SimSiam's pooled features, Y-Net's tanh outputs."""
        return self._batched(images, self.representation_fn(), batch_size).numpy()

    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 128) -> np.ndarray:
        """Retrieval vectors: SimSiam float32 (N, F); Y-Net bits uint8 (N, bits) in {0, 1}."""
        rep = self.representation(images, batch_size)
        if self.kind == "ynet":
            return (rep >= 0).astype(np.uint8)
        return rep


def _read(path: Path) -> tuple[Path, dict[str, Any]]:
    folder = path.parent if path.name == MANIFEST_NAME else path
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: not a baseline bundle (no {MANIFEST_NAME})") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{manifest_path}: unreadable ({exc}); {_FIX}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BASELINE_FORMAT:
        raise DataError(f"{manifest_path}: not a {BASELINE_FORMAT} (format {manifest.get('format')!r})")
    if manifest.get("format_version") != BASELINE_FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: format version {manifest.get('format_version')} is not "
            f"{BASELINE_FORMAT_VERSION}; update fdn-retrieval"
        )
    return folder, manifest


def load_baseline(path: str | Path, device: str | torch.device | None = "auto") -> BaselineBundle:
    """Load and verify a baseline bundle folder (or its baseline.json) onto ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, manifest = _read(Path(path))
    where = str(folder / MANIFEST_NAME)
    kind = str(manifest.get("kind"))
    try:
        config = config_from_dict(_config_class(kind), manifest["model"], where=f"{where}: model")
        preprocess = config_from_dict(PreprocessConfig, manifest["preprocess"], where=f"{where}: preprocess")
        entry = manifest["files"][WEIGHTS_NAME]
    except KeyError as exc:
        raise IntegrityError(f"{where}: missing entry {exc}; {_FIX}") from exc
    weights = resolve_inside(folder, WEIGHTS_NAME, "baseline weights")
    if not weights.is_file():
        raise IntegrityError(f"{weights}: missing; {_FIX}")
    if sha256_file(weights) != entry.get("sha256"):
        raise IntegrityError(f"{weights}: sha256 differs from {MANIFEST_NAME}; the file changed. {_FIX}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{weights}: cannot be read as safetensors ({exc}); {_FIX}") from exc
    if weights_fingerprint(state, kind, config) != manifest.get("fingerprint"):
        raise IntegrityError(f"{folder}: weights and config do not give the recorded fingerprint; {_FIX}")
    model: nn.Module = build_baseline(kind, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"{weights}: weights do not match the config ({exc}); {_FIX}") from exc
    dev = device if isinstance(device, torch.device) else select_device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert isinstance(model, (SimSiam, YNet))
    return BaselineBundle(
        kind, model, config, preprocess, str(manifest["fingerprint"]), dev, folder, manifest
    )
