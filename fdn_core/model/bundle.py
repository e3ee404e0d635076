"""The inference bundle: a trained FDN as a folder that can be verified, loaded and used without training.

Layout of a bundle folder::

    model.safetensors   every weight and buffer of the FDN (EMA codebooks, EMA statistics, BatchNorm running
                        statistics) except the critic, which inference never uses
    bundle.json         format/version, FDNConfig, PreprocessConfig, fingerprint (and its version), sha256
                        and size of model.safetensors, versions, free-form metadata (training config, seed,
                        ...), and manifest_sha256 over the canonical JSON of everything else in the file

The fingerprint names the code space: databases store it and refuse codes of another model. Version 2
(``FINGERPRINT_VERSION``) is the sha256 of the canonical FDNConfig JSON and of every weight and buffer that
decides the codes: the stem, both encoder towers and both codebooks (name, dtype, shape and bytes of each
tensor), so changed encoder weights make another fingerprint even when every file hash was recomputed.
Version 1 (bundles exported before; ``bundle.json`` without ``fingerprint_version``) covered only the
codebooks and the config: such bundles still load, their ``fingerprint_version`` is 1 and a warning says to
re-export them. Every file ``bundle.json`` names must resolve inside the bundle folder (links resolved).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fdn_core.config import config_from_dict, config_to_dict
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.device import autocast_for, select_device
from fdn_core.errors import ConfigError, DataError, IntegrityError
from fdn_core.fileio import atomic_dir, atomic_write_bytes, recover_dir, resolve_inside, sha256_file
from fdn_core.model.fdn import FDN, FDNConfig
from fdn_core.progress import Progress

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "EMBEDDING_NAME",
    "FINGERPRINT_VERSION",
    "MANIFEST_NAME",
    "TINY_MODEL",
    "WEIGHTS_NAME",
    "EncodedSlices",
    "InferenceBundle",
    "compute_fingerprint",
    "load_bundle",
    "model_fingerprint",
    "save_bundle",
    "save_retrieval_embedding",
    "save_untrained_bundle",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fdn-inference-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
WEIGHTS_NAME = "model.safetensors"
#: Optional: the retrieval embedding of the codes (tensors "normal" and "abnormal", (K, M) float32) behind
#: the learned distance D_L (``fdn_core.codes.search``), written by ``fdn train-embedding``.
EMBEDDING_NAME = "retrieval_embedding.safetensors"
#: Lock file of a bundle's writers (one at a time; readers never take it: a bundle may be read-only).
BUNDLE_LOCK = ".bundle.lock"
_EXCLUDED_PREFIX = "critic."
#: Version of the fingerprint ``save_bundle`` records (see the module docstring).
FINGERPRINT_VERSION = 2
#: State-dict entries that decide the codes: the encoder (stem, both towers) and both codebooks.
_CODE_PREFIXES = ("stem.", "tower_normal.", "tower_abnormal.")
_CODEBOOK_KEYS = ("vq_normal.embedding.weight", "vq_abnormal.embedding.weight")
#: A tiny FDN (64x64 input, 8x8 codes, 32 codes per codebook): fast on a CPU, real in every respect. The
#: tests, the Slicer module's self-test and the browser viewer's tests build untrained bundles of it.
TINY_MODEL: dict[str, Any] = {
    "image_size": 64,
    "latent_size": 8,
    "stem_channels": 8,
    "encoder_channels": (16, 16),
    "code_dim": 8,
    "num_codes": 32,
    "spade_hidden_channels": 8,
    "critic_channels": 8,
}
_FIX = "re-export the bundle from its training checkpoint (fdn export) or download it again"


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def compute_fingerprint(
    codebook_normal: np.ndarray | torch.Tensor,
    codebook_abnormal: np.ndarray | torch.Tensor,
    config: FDNConfig,
) -> str:
    """Version-1 fingerprint (bundles exported before version 2): hex sha256 of both (K, D) codebooks
    (float32 little-endian, row-major) + canonical config JSON. It does not cover the encoder weights."""
    h = hashlib.sha256(b"fdn-fingerprint-v1\0")
    for cb in (codebook_normal, codebook_abnormal):
        if isinstance(cb, torch.Tensor):
            cb = cb.detach().to("cpu", torch.float32).numpy()
        h.update(np.ascontiguousarray(cb, dtype="<f4").tobytes())
    h.update(_canonical_json(config_to_dict(config)))
    return h.hexdigest()


def weights_fingerprint(state: Mapping[str, torch.Tensor], config: FDNConfig) -> str:
    """Version-2 fingerprint: hex sha256 of the canonical config JSON and of every state-dict tensor that
    decides the codes (stem, both towers, both codebooks), each as name, dtype, shape and raw bytes."""
    keys = sorted(k for k in state if k.startswith(_CODE_PREFIXES) or k in _CODEBOOK_KEYS)
    missing = [k for k in _CODEBOOK_KEYS if k not in state]
    if missing or not any(k.startswith("stem.") for k in keys):
        raise IntegrityError(f"weights lack {missing or 'the stem'}; not an FDN state dict")
    h = hashlib.sha256(b"fdn-fingerprint-v2\0")
    h.update(_canonical_json(config_to_dict(config)))
    for key in keys:
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: FDN) -> str:
    """Fingerprint (version 2) of a live model's encoder, codebooks and config."""
    return weights_fingerprint(model.state_dict(), model.config)


def _versions() -> dict[str, str]:
    import monai
    import safetensors

    from fdn_core import __version__ as fdn_version

    return {
        "fdn_core": str(fdn_version),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def save_bundle(
    model: FDN,
    preprocess: PreprocessConfig,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the inference bundle of ``model`` to the folder ``out_dir`` atomically; returns the folder.

    ``metadata`` (JSON-serialisable: training config, seed, step, ...) is stored as is. With ``overwrite``
    an existing folder is replaced whole, otherwise an existing ``out_dir`` is an error.
    """
    from safetensors.torch import save

    if not isinstance(model, FDN):
        inner = getattr(model, "module", None)  # a DistributedDataParallel wrapper
        if not isinstance(inner, FDN):
            raise TypeError(f"save_bundle needs an FDN model, got {type(model).__name__}")
        model = inner
    cfg = model.config
    if preprocess.image_size != cfg.image_size:
        raise ConfigError(
            f"preprocess.image_size={preprocess.image_size} differs from model.image_size={cfg.image_size}; "
            "the bundle's preprocessing must produce the model's input size"
        )
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"bundle metadata is not plain JSON ({exc}); pass only str/number/bool/list/dict"
        ) from exc
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True")
    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(_EXCLUDED_PREFIX)
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        weights = tmp / WEIGHTS_NAME
        # Written by Python, not by safetensors' own file writer: a full disk or a file-size limit is then an
        # OSError saying so (safetensors reports it as a SafetensorError); the file gets the umask's mode.
        meta = {"format": BUNDLE_FORMAT, "format_version": str(BUNDLE_FORMAT_VERSION)}
        try:
            weights.write_bytes(save(state, metadata=meta))
        except OSError as exc:
            if exc.filename is None:  # a failed write() names no file
                exc.filename = str(out_dir / WEIGHTS_NAME)
            raise
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": config_to_dict(cfg),
            "preprocess": config_to_dict(preprocess),
            "fingerprint": model_fingerprint(model),
            "fingerprint_version": FINGERPRINT_VERSION,
            "files": {WEIGHTS_NAME: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
            "includes_critic": False,
            "versions": _versions(),
            "metadata": metadata,
        }
        manifest["manifest_sha256"] = hashlib.sha256(_canonical_json(manifest)).hexdigest()
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir


@dataclass
class EncodedSlices:
    """Codes of N slices: ``normal`` and ``abnormal`` uint16 (N, h, w) index grids in image (row, col) order,
    ``seg`` uint8 (N, S, S) the predicted abnormal classes (argmax of the segmentation decoder)."""

    normal: np.ndarray
    abnormal: np.ndarray
    seg: np.ndarray


class InferenceBundle:
    """A loaded, verified bundle. ``model`` is in eval mode on ``device``; nothing here trains."""

    def __init__(
        self,
        model: FDN,
        config: FDNConfig,
        preprocess: PreprocessConfig,
        fingerprint: str,
        device: torch.device,
        path: Path,
        manifest: dict[str, Any],
        fingerprint_version: int = FINGERPRINT_VERSION,
        retrieval_embedding: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.model = model
        self.fingerprint_version = fingerprint_version
        self.config = config
        self.preprocess = preprocess
        self.fingerprint = fingerprint
        self.device = device
        self.path = path
        self.manifest = manifest
        #: (normal, abnormal) float64 (K, M) retrieval embedding (the learned distance), or None
        self.retrieval_embedding = retrieval_embedding

    @property
    def metadata(self) -> dict[str, Any]:
        """The free-form metadata stored at export (training config, step, ...)."""
        return dict(self.manifest.get("metadata", {}))

    def code_usage(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(normal, abnormal) int64 (K,) selection counts recorded by training (``metadata["code_usage"]``:
        the last full epoch), or None for a bundle that records none (exported before usage tracking)."""
        usage = self.metadata.get("code_usage")
        if not isinstance(usage, dict):
            return None
        k = self.config.num_codes
        out = []
        for which in ("normal", "abnormal"):
            counts = np.asarray(usage.get(which, []), dtype=np.int64)
            if counts.shape != (k,) or (counts < 0).any():
                raise IntegrityError(
                    f"{self.path / MANIFEST_NAME}: metadata code_usage[{which!r}] is not {k} counts; {_FIX}"
                )
            out.append(counts)
        return out[0], out[1]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the code grids."""
        return self.config.latent_shape

    def codebooks(self) -> tuple[np.ndarray, np.ndarray]:
        """(normal, abnormal) codebooks as float32 (K, D) numpy arrays (copies)."""
        return tuple(  # type: ignore[return-value]
            self.model.codebook(w).detach().to("cpu", torch.float32).numpy().copy()
            for w in ("normal", "abnormal")
        )

    def default_batch_size(self) -> int:
        """Slices per forward pass by device: 256 on CUDA, 64 on MPS, 32 on CPU."""
        return {"cuda": 256, "mps": 64}.get(self.device.type, 32)

    def _check_images(self, images: Any) -> np.ndarray:
        c = self.config
        expected = f"(N, {c.in_channels}, {c.image_size}, {c.image_size})"
        if not isinstance(images, np.ndarray):
            raise DataError(f"images must be a numpy array {expected} float32, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise DataError(
                f"images have shape {images.shape}; this bundle expects {expected} "
                f"(slices preprocessed with image_size={self.preprocess.image_size})"
            )
        if images.dtype != np.float32:
            raise DataError(
                f"images have dtype {images.dtype}; expected float32 (use images.astype(np.float32))"
            )
        return images

    def _batches(
        self,
        images: np.ndarray,
        batch_size: int | None,
        progress: Progress | None,
        message: str,
        fn: Callable[[torch.Tensor], list[np.ndarray]],
    ) -> list[np.ndarray]:
        images = self._check_images(images)
        n = images.shape[0]
        bs = self.default_batch_size() if batch_size is None else int(batch_size)
        if bs < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        chunks: list[list[np.ndarray]] = []
        if progress is not None:
            progress.update(0, n, message)
        channels_last = self.device.type == "cuda"
        with torch.inference_mode():
            for start in range(0, n, bs):
                batch = np.ascontiguousarray(images[start : start + bs])
                if not np.isfinite(batch).all():
                    bad = start + int(
                        np.nonzero(~np.isfinite(batch).reshape(batch.shape[0], -1).all(1))[0][0]
                    )
                    raise DataError(f"slice {bad} contains NaN or infinite values; check the input volume")
                x = torch.from_numpy(batch).to(self.device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_for(self.device):
                    chunks.append(fn(x))
                if progress is not None:
                    progress.update(min(start + bs, n), n, message)
        return [np.concatenate(parts, axis=0) for parts in zip(*chunks, strict=True)] if chunks else []

    def encode_slices(
        self, images: np.ndarray, batch_size: int | None = None, progress: Progress | None = None
    ) -> EncodedSlices:
        """Code grids and predicted labels of preprocessed slices ``images`` float32 (N, C, S, S)."""
        model = self.model

        def run(x: torch.Tensor) -> list[np.ndarray]:
            idx_n, idx_a = model.encode(x)
            seg = model.seg_decoder(model.vq_abnormal.lookup(idx_a)).argmax(1)
            return [
                t.to("cpu").numpy().astype(d)
                for t, d in ((idx_n, np.uint16), (idx_a, np.uint16), (seg, np.uint8))
            ]

        out = self._batches(images, batch_size, progress, "Encoding slices", run)
        if not out:
            h, w = self.grid_shape
            s = self.config.image_size
            return EncodedSlices(
                np.zeros((0, h, w), np.uint16), np.zeros((0, h, w), np.uint16), np.zeros((0, s, s), np.uint8)
            )
        return EncodedSlices(normal=out[0], abnormal=out[1], seg=out[2])

    def reconstruct(
        self, images: np.ndarray, batch_size: int | None = None, progress: Progress | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(recon_full float32 (N,C,S,S), recon_normal float32 (N,C,S,S), seg uint8 (N,S,S)) of ``images``."""
        model = self.model

        def run(x: torch.Tensor) -> list[np.ndarray]:
            seg_logits, full, normal = model.decode_indices(*model.encode(x))
            return [
                full.float().to("cpu").numpy(),
                normal.float().to("cpu").numpy(),
                seg_logits.argmax(1).to("cpu").numpy().astype(np.uint8),
            ]

        out = self._batches(images, batch_size, progress, "Reconstructing slices", run)
        if not out:
            c, s = self.config.in_channels, self.config.image_size
            empty = np.zeros((0, c, s, s), np.float32)
            return empty, empty.copy(), np.zeros((0, s, s), np.uint8)
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class _BundleFile:
    """One file entry of ``bundle.json``."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class _BundleManifest:
    """The typed fields of ``bundle.json`` (checked with ``config_from_dict``)."""

    __config_allow_defaults__ = True
    format: str
    format_version: int
    model: dict[str, Any]
    preprocess: dict[str, Any]
    fingerprint: str
    files: dict[str, Any]
    created_utc: str = ""
    includes_critic: bool = False
    versions: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint_version: int = 1


def _read_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    folder = path.parent if path.is_file() and path.name == MANIFEST_NAME else path
    if not folder.exists():
        done = recover_dir(folder)  # a replacement (fdn export --overwrite) died between its renames
        if done:
            log.warning("%s", done)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(
            f"{folder}: not an FDN inference bundle (no {MANIFEST_NAME}); give the bundle folder written by "
            "`fdn train` / `fdn export`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{manifest_path}: not valid JSON ({exc}); the file is damaged; {_FIX}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise DataError(
            f"{manifest_path}: not an FDN inference bundle manifest (format is not {BUNDLE_FORMAT!r}); give "
            "the bundle folder written by `fdn train` / `fdn export`"
        )
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: bundle format version {version!r} is not supported by this version of "
            f"fdn_core (it reads version {BUNDLE_FORMAT_VERSION}); update SlicerFDNRetrieval/fdn_core or "
            "re-export the bundle with this version"
        )
    stored = manifest.pop("manifest_sha256", None)
    if stored != hashlib.sha256(_canonical_json(manifest)).hexdigest():
        raise IntegrityError(
            f"{manifest_path}: the file was edited or damaged (manifest hash mismatch); {_FIX}"
        )
    return folder, manifest


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> tuple[_BundleManifest, dict[str, Path]]:
    """Typed fields of ``bundle.json`` and the files it names (each inside ``folder``, of the recorded
    size and sha256)."""
    where = f"{folder / MANIFEST_NAME}"
    try:
        doc = config_from_dict(_BundleManifest, manifest, where=where)
        entries = {}
        for name, info in doc.files.items():
            if not isinstance(info, dict):
                raise ConfigError(f"{where}: files[{name!r}]: expected a mapping, got {type(info).__name__}")
            entries[name] = config_from_dict(_BundleFile, info, where=f"{where}: files[{name!r}]")
    except ConfigError as exc:
        raise IntegrityError(f"{exc}; {_FIX}") from None
    if doc.fingerprint_version not in (1, FINGERPRINT_VERSION):
        raise DataError(
            f"{where}: fingerprint version {doc.fingerprint_version} is not known to this version of "
            f"fdn_core (it knows 1 and {FINGERPRINT_VERSION}); update fdn_core or re-export the bundle"
        )
    if WEIGHTS_NAME not in entries:
        raise IntegrityError(f"{where}: lists no {WEIGHTS_NAME}; {_FIX}")
    paths: dict[str, Path] = {}
    for name, info in entries.items():
        file = resolve_inside(folder, name, where)
        if not file.is_file():
            raise IntegrityError(f"{file}: missing from the bundle; {_FIX}")
        if file.stat().st_size != info.bytes or sha256_file(file) != info.sha256:
            raise IntegrityError(
                f"{file}: contents do not match the sha256 recorded in {MANIFEST_NAME} "
                f"(edited, truncated or corrupted); {_FIX}"
            )
        paths[name] = file
    return doc, paths


#: Reads of bundle.json when a file's hash does not match it while the manifest itself changes (a writer is
#: replacing a file: ``save_retrieval_embedding`` renames the file, then the manifest), and the pause between.
_MANIFEST_READS, _MANIFEST_PAUSE_S = 4, 0.25
#: How long a bundle writer waits for another one.
_LOCK_TIMEOUT_S = 60.0


def _verified_manifest(path: Path) -> tuple[Path, dict[str, Any], Any, dict[str, Path]]:
    """(folder, manifest, checked document, file paths), every listed file's size and hash checked. A hash
    that does not match while bundle.json is being replaced (its content changes between two reads) is a
    writer's work in progress, not damage: read again. A mismatch under an unchanged manifest is raised."""
    import time

    folder, manifest = _read_manifest(path)
    for attempt in range(_MANIFEST_READS):
        try:
            doc, paths = _check_manifest(folder, manifest)
            return folder, manifest, doc, paths
        except IntegrityError:
            if attempt == _MANIFEST_READS - 1:
                raise
            time.sleep(_MANIFEST_PAUSE_S)
            folder, again = _read_manifest(path)
            if again == manifest:
                raise
            log.info("%s changed while it was checked (a file being replaced); checking it again", folder)
            manifest = again
    raise AssertionError("unreachable")


def load_bundle(path: str | Path, device: str | torch.device | None = "auto") -> InferenceBundle:
    """Load and verify the bundle folder ``path`` (or its bundle.json) onto ``device`` ("auto", "cpu", ..)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, manifest, doc, paths = _verified_manifest(Path(path))
    where = f"{folder / MANIFEST_NAME}"
    config = config_from_dict(FDNConfig, doc.model, where=f"{where}: model")
    preprocess = config_from_dict(PreprocessConfig, doc.preprocess, where=f"{where}: preprocess")
    weights = paths[WEIGHTS_NAME]
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{weights}: cannot be read as safetensors ({exc}); {_FIX}") from exc
    model = FDN(config)
    expected = {k for k in model.state_dict() if not k.startswith(_EXCLUDED_PREFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise IntegrityError(
            f"{weights}: weights do not match the model config in {MANIFEST_NAME} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); {_FIX}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise IntegrityError(
            f"{weights}: weight shapes do not match the model config in {MANIFEST_NAME} ({exc}); {_FIX}"
        ) from exc
    if doc.fingerprint_version == 1:
        fingerprint = compute_fingerprint(model.codebook("normal"), model.codebook("abnormal"), config)
        covers = "the codebooks and config"
    else:
        fingerprint = model_fingerprint(model)
        covers = "the encoder weights, codebooks and config"
    if fingerprint != doc.fingerprint:
        raise IntegrityError(
            f"{folder}: {covers} do not give the recorded fingerprint "
            f"({fingerprint[:12]}... vs {doc.fingerprint[:12]}...); {_FIX}"
        )
    if doc.fingerprint_version == 1:
        log.warning(
            "%s has a version-1 fingerprint, which covers the codebooks and config but not the encoder "
            "weights; re-export the bundle (fdn export) so that changed weights are detected",
            folder,
        )
    embedding = _load_embedding(paths[EMBEDDING_NAME], config.num_codes) if EMBEDDING_NAME in paths else None
    dev = device if isinstance(device, torch.device) else select_device(device)
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.eval()
    _freeze(model)
    return InferenceBundle(
        model, config, preprocess, fingerprint, dev, folder, manifest, doc.fingerprint_version, embedding
    )


def _load_embedding(path: Path, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(normal, abnormal) float64 (K, M) retrieval embedding from ``path``, checked against K codes."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{path}: cannot be read as safetensors ({exc}); {_FIX}") from exc
    if set(arrays) != {"normal", "abnormal"}:
        raise IntegrityError(
            f"{path}: expected tensors 'normal' and 'abnormal', got {sorted(arrays)}; {_FIX}"
        )
    out = []
    for which in ("normal", "abnormal"):
        a = arrays[which]
        if a.ndim != 2 or a.shape[0] != num_codes or a.shape[1] < 1 or not np.isfinite(a).all():
            raise IntegrityError(
                f"{path}: {which} embedding has shape {a.shape}, expected finite ({num_codes}, M); {_FIX}"
            )
        out.append(a.astype(np.float64))
    return out[0], out[1]


def save_retrieval_embedding(
    bundle_dir: str | Path, normal: np.ndarray, abnormal: np.ndarray, info: dict[str, Any]
) -> Path:
    """Add (or replace) the retrieval embedding of the bundle in ``bundle_dir``: the file, then its entry
    and ``info`` (``metadata["retrieval_embedding"]``) in ``bundle.json``, each written to a temporary file
    and renamed (a crash leaves the previous bundle; an unlisted file is ignored), one writer at a time
    under ``BUNDLE_LOCK`` (readers that meet the file before its entry read bundle.json again: see
    ``_verified_manifest``). The fingerprint is
    unchanged: the embedding ranks codes, it does not make them. Returns the file's path."""
    from filelock import FileLock, Timeout
    from safetensors.numpy import save

    folder = Path(bundle_dir)
    folder = folder.parent if folder.is_file() and folder.name == MANIFEST_NAME else folder
    try:
        with FileLock(str(folder / BUNDLE_LOCK), timeout=_LOCK_TIMEOUT_S):
            return _save_retrieval_embedding(folder, normal, abnormal, info, save)
    except Timeout:
        raise DataError(
            f"{folder}: another process has been writing this bundle for {_LOCK_TIMEOUT_S:g} s "
            f"({BUNDLE_LOCK}); wait for it to finish, or remove the lock file if no such process runs"
        ) from None


def _save_retrieval_embedding(
    bundle_dir: Path, normal: np.ndarray, abnormal: np.ndarray, info: dict[str, Any], save: Any
) -> Path:
    folder, manifest = _read_manifest(bundle_dir)
    _check_manifest(folder, manifest)
    k = int(manifest["model"]["num_codes"])
    arrays = {
        w: np.ascontiguousarray(a, dtype=np.float32) for w, a in (("normal", normal), ("abnormal", abnormal))
    }
    for w, a in arrays.items():
        if a.ndim != 2 or a.shape[0] != k or not np.isfinite(a).all():
            raise DataError(f"{w} retrieval embedding has shape {a.shape}; expected finite ({k}, M)")
    path = folder / EMBEDDING_NAME
    data = save(arrays, metadata={"format": BUNDLE_FORMAT})
    atomic_write_bytes(path, data)
    manifest["files"][EMBEDDING_NAME] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest.setdefault("metadata", {})["retrieval_embedding"] = info
    manifest["manifest_sha256"] = hashlib.sha256(_canonical_json(manifest)).hexdigest()
    atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return path


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def save_untrained_bundle(
    out_dir: str | Path, seed: int = 0, config: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """A freshly initialised, seeded FDN (default ``TINY_MODEL``) saved as a real inference bundle.

    Untrained: the whole pipeline runs on it, but its codes and scores mean nothing (tests, self-tests).
    """
    arch = dict(TINY_MODEL if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FDN(FDNConfig(**arch))
    meta = {"seed": seed, "trained": False}
    return save_bundle(
        model, PreprocessConfig(image_size=arch["image_size"]), out_dir, meta, overwrite=overwrite
    )
