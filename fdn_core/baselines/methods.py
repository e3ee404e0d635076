"""The baselines as ranking methods of the shared retrieval protocol (``fdn_core.evaluation.ranking``).

``BaselineEmbedding`` wraps a loaded ``BaselineBundle``: it embeds the very model-input slices the protocol
loop hands every method (the FDN's preprocessing) and ranks volume-wise by its metric (SimSiam: cosine;
Y-Net: Hamming) through ``SliceEmbeddingMethod`` and ``fdn_core.codes.embedding_index``. A single-embedding
method ranks once; that ranking is scored for S_normal, S_abnormal and S_sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fdn_core.baselines.bundle import BaselineBundle, load_baseline
from fdn_core.errors import ConfigError
from fdn_core.evaluation.ranking import MethodKind, SliceEmbeddingMethod
from fdn_core.resources import shipped_model_dir

__all__ = ["SHIPPED_BASELINES", "BaselineEmbedding", "load_embedding_methods", "resolve_baseline_path"]

#: Baseline bundles shipped in ``fdn_core/resources/models/<name>``.
SHIPPED_BASELINES: tuple[str, ...] = ("simsiam", "ynet")


class BaselineEmbedding(SliceEmbeddingMethod):
    """A trained baseline as a ranking method (module docstring)."""

    kind: MethodKind = "embedding"

    def __init__(self, bundle: BaselineBundle, key: str | None = None) -> None:
        super().__init__()
        self.bundle = bundle
        self.key = key or bundle.kind
        self.metric = bundle.metric
        if bundle.kind == "simsiam":
            self.label = f"SimSiam (cosine, {bundle.width} features)"
            self.description = (
                "self-supervised SimSiam encoder (seed 003), MR view augmentation, no labels; cosine "
                "distance "
                "between average-pooled features; each volume's closest slice"
            )
        else:
            self.label = f"Y-Net hash (Hamming, {bundle.width} bits)"
            self.description = (
                "Y-Net (seed 004): segmentation + classification branches, R-MAC hash layer trained with the "
                "circle loss; Hamming distance between the binary codes; each volume's closest slice"
            )

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(n, 4, S, S) model-input slices -> the bundle's retrieval vectors."""
        return self.bundle.embed(images)


def resolve_baseline_path(spec: str | Path) -> Path:
    """A shipped baseline's folder (``simsiam``, ``ynet``) or the given bundle folder."""
    text = str(spec)
    if text in SHIPPED_BASELINES and not Path(text).exists():
        folder = shipped_model_dir(text)
        if not (folder / "baseline.json").is_file():
            raise ConfigError(
                f"the shipped {text} bundle is missing ({folder}); train one with fdn train-baseline {text} "
                "and pass its RUN/bundle folder"
            )
        return folder
    return Path(text)


def load_embedding_methods(specs: Sequence[str | Path], device: str = "auto") -> list[BaselineEmbedding]:
    """Ranking methods of baseline bundles: each spec is a shipped name, a bundle folder, or KEY=FOLDER
    (KEY: the result key, to compare two bundles of one kind)."""
    methods: list[BaselineEmbedding] = []
    for spec in specs:
        text = str(spec)
        key = None
        if "=" in text and not Path(text).exists():
            key, text = text.split("=", 1)
        bundle = load_baseline(resolve_baseline_path(text), device=device)
        methods.append(BaselineEmbedding(bundle, key=key))
    keys = [m.key for m in methods]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"embedding methods need distinct keys, got {keys}; name them KEY=FOLDER")
    return methods
