"""Torch dataset over a ``SliceCache``, training augmentation and the case-wise split.

Each item is one axial slice::

    {"image": float32 (4,S,S), "seg": int64 (S,S), "anat": int64 (S,S), "has_anat": bool,
     "abnormal": bool, "case_id": str, "slice_index": int}

``abnormal`` is whether the returned ``seg`` has any tumour pixel (after augmentation).

Augmentation (notes/fdn-method.md): left-right flip, rotation within +-10 degrees and isotropic scaling in
0.9..1.1, applied with MONAI dictionary transforms (bilinear for the image, nearest for labels, zero fill).
It is deterministic: the random state of item ``i`` is derived from (seed, epoch, cache row), so results do
not depend on the number of DataLoader workers or on the order items are drawn; ``set_epoch`` changes the
draw between epochs and reaches worker processes through shared memory (persistent workers included).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import Affined, Flipd, MapTransform, RandomizableTransform
from torch.utils.data import Dataset

from fdn_core.data.cache import SliceCache
from fdn_core.errors import ConfigError, DataError

__all__ = ["AugmentConfig", "RandSliceAugmentd", "SliceDataset", "split_cases"]

# A left-right flip turns the subject's left structures into right ones: swap the L/R anatomy labels so
# that label 1 still means "the cerebrum on the subject's left side of the image" (see ANATOMY_LABELS).
_ANAT_LR_SWAP = torch.tensor([0, 2, 1, 4, 3, 6, 5], dtype=torch.int64)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of axial slices (defaults: the paper's flip, about +-10 deg, scale 0.9..1.1)."""

    __config_allow_defaults__ = True

    flip_prob: float = 0.5
    max_rotation_deg: float = 10.0
    scale_min: float = 0.9
    scale_max: float = 1.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"augment.flip_prob={self.flip_prob}: must be within 0..1")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ConfigError(f"augment.max_rotation_deg={self.max_rotation_deg}: must be within 0..180")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ConfigError(
                f"augment.scale_min={self.scale_min}, scale_max={self.scale_max}: "
                "need 0 < scale_min <= scale_max"
            )


class RandSliceAugmentd(RandomizableTransform, MapTransform):
    """Random left-right flip, rotation and isotropic scaling of a slice dict with channel-first tensors.

    Written as one transform (over MONAI's ``Flipd`` and ``Affined``) because MONAI's RandAffined scales each
    axis independently (we want isotropic scaling) and knows nothing of left/right anatomy labels.
    Spatial axis 0 of ``(C, X, Y)`` runs left to right (canonical RAS), so the flip is along it. Labels are
    best stacked into one tensor (one resampling call instead of several: MONAI's per-call overhead
    dominates at slice sizes); ``anat_key`` / ``anat_channel`` say where the anatomy labels are.
    """

    def __init__(
        self,
        image_keys: Sequence[str] = ("image",),
        label_keys: Sequence[str] = ("labels",),
        anat_key: str | None = "labels",
        anat_channel: int = 1,
        config: AugmentConfig | None = None,
    ) -> None:
        MapTransform.__init__(self, keys=tuple(image_keys) + tuple(label_keys))
        RandomizableTransform.__init__(self, prob=1.0)
        self.image_keys, self.label_keys = tuple(image_keys), tuple(label_keys)
        self.anat_key, self.anat_channel = anat_key, anat_channel
        self.config = config or AugmentConfig()
        self.flip, self.angle, self.scale = False, 0.0, 1.0

    def randomize(self, data: Any = None) -> None:
        """Draw flip, rotation angle (radians) and scale from this transform's random state."""
        cfg = self.config
        self.flip = bool(self.R.random_sample() < cfg.flip_prob)
        self.angle = math.radians(float(self.R.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)))
        self.scale = float(self.R.uniform(cfg.scale_min, cfg.scale_max))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Apply one random flip / rotation / scaling to the image and its label maps alike."""
        self.randomize()
        d = dict(data)
        keys = self.image_keys + self.label_keys
        if self.flip:
            d = Flipd(keys=keys, spatial_axis=0)(d)
            if self.anat_key is not None and self.anat_key in d:
                labels = torch.as_tensor(d[self.anat_key]).clone()
                anat = labels[self.anat_channel]
                labels[self.anat_channel] = _ANAT_LR_SWAP.to(anat.device)[anat.round().long()].to(
                    labels.dtype
                )
                d[self.anat_key] = labels
        affine = Affined(
            keys=keys,
            rotate_params=self.angle,
            scale_params=(self.scale, self.scale),
            mode=["bilinear"] * len(self.image_keys) + ["nearest"] * len(self.label_keys),
            padding_mode="zeros",
        )
        d = affine(d)
        return {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in d.items()}


class SliceDataset(Dataset[dict[str, Any]]):
    """Axial slices of the cases ``case_ids`` of a ``SliceCache`` (items: see module doc).

    ``require_seg`` (default) refuses cases without segmentation, which would otherwise train as healthy.
    """

    def __init__(
        self,
        cache: SliceCache,
        case_ids: Sequence[str],
        augment: bool,
        *,
        seed: int = 0,
        augment_config: AugmentConfig | None = None,
        require_seg: bool = True,
    ) -> None:
        if not case_ids:
            raise DataError(f"SliceDataset: no case ids given for slice cache {cache.path}")
        if len(set(case_ids)) != len(case_ids):
            raise DataError("SliceDataset: case ids repeat; give each case once")
        entries = [cache.case(c) for c in case_ids]
        if require_seg:
            missing = [e.case_id for e in entries if not e.has_seg]
            if missing:
                raise DataError(
                    f"SliceDataset: case(s) {missing[:5]} have no segmentation (validation/test cases); "
                    "leave them out of training or pass require_seg=False"
                )
        self.cache = cache
        self.case_ids = list(case_ids)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.rows = np.concatenate([np.arange(e.start, e.stop, dtype=np.int64) for e in entries])
        self._has_anat = {e.case_id: e.has_anat for e in entries}
        self._transform = RandSliceAugmentd(config=augment_config) if self.augment else None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of this epoch (seen by worker processes too)."""
        self._epoch.fill_(int(epoch))

    @property
    def abnormal(self) -> np.ndarray:
        """Per-item abnormal flag before augmentation (bool (len,)), e.g. for balanced sampling."""
        return self.cache.abnormal[self.rows]

    def item_seed(self, index: int) -> int:
        """The random seed of item ``index`` in the current epoch."""
        row = int(self.rows[index])
        return int(np.random.SeedSequence([self.seed, int(self._epoch), row]).generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        index = index % len(self)
        row = int(self.rows[index])
        cache = self.cache
        case_id = cache.case_ids[int(cache.slice_case[row])]
        image = torch.from_numpy(np.asarray(cache.images[row], dtype=np.float32))
        seg = torch.from_numpy(cache.seg[row].astype(np.int64))
        anat = torch.from_numpy(cache.anat[row].astype(np.int64))
        if self._transform is not None:
            self._transform.set_random_state(seed=self.item_seed(index))
            out = self._transform({"image": image, "labels": torch.stack((seg, anat)).float()})
            image = out["image"].float().contiguous()
            labels = out["labels"].round().long()
            seg, anat = labels[0].contiguous(), labels[1].contiguous()
        return {
            "image": image,
            "seg": seg,
            "anat": anat,
            "has_anat": self._has_anat[case_id],
            "abnormal": bool((seg > 0).any()),
            "case_id": case_id,
            "slice_index": int(cache.slice_index[row]),
        }


def split_cases(case_ids: Sequence[str], fractions: Sequence[float], seed: int) -> tuple[list[str], ...]:
    """Split cases (never slices) into ``len(fractions)`` disjoint sorted lists, deterministically for a seed.

    Sizes follow the fractions (largest remainder rounding); every positive fraction gets at least one case.
    The result depends only on the set of ids, the fractions and the seed (not on the input order).
    """
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise DataError("split_cases: case ids repeat; give each case once")
    fr = [float(f) for f in fractions]
    if not fr or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ConfigError(f"split fractions {list(fractions)}: need non-negative fractions that sum to 1")
    positive = sum(f > 0 for f in fr)
    if len(ids) < positive:
        raise DataError(f"split_cases: {len(ids)} case(s) cannot fill {positive} non-empty splits; add cases")
    n = len(ids)
    raw = [f * n for f in fr]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(fr)), key=lambda i: (counts[i] - raw[i], i))[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fr):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(fr)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    out, start = [], 0
    for c in counts:
        out.append(sorted(shuffled[start : start + c]))
        start += c
    return tuple(out)
