"""The project's one vocabulary: sequences, abnormal classes and their file codes, anatomy labels, label
colours, code types, distances, search modes (with the aliases users type) and the lesion filter of a search.
Everything else imports it.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "ABNORMAL_CLASSES",
    "ABNORMAL_COLORS",
    "ABNORMAL_DICE_GROUPS",
    "ABNORMAL_NAMES",
    "ABNORMAL_SEGMENT_IDS",
    "ANATOMY_CLASSES",
    "ANATOMY_COLORS",
    "ANATOMY_NAMES",
    "AXIAL_CONTEXT",
    "BRATS_FILE_TO_CLASS",
    "CLASS_TO_BRATS_FILE",
    "CLASS_TO_MSD_FILE",
    "CODE_TYPES",
    "DISTANCES",
    "DISTANCE_LABELS",
    "LESION_FILTERS",
    "LESION_FILTER_LABELS",
    "MIN_LESION_ML",
    "MODALITIES",
    "MODES",
    "MODE_CHOICES",
    "MSD_CHANNELS",
    "MSD_DATASET_LABELS",
    "MSD_DATASET_MODALITY",
    "MSD_FILE_TO_CLASS",
    "MSD_MODALITY_NAMES",
    "NUM_ABNORMAL_CLASSES",
    "PAPER_DISTANCES",
    "CodeType",
    "Distance",
    "LesionFilter",
    "Mode",
    "available_distances",
    "check_lesion_filter",
    "context_slices",
    "normalize_mode",
]

# ------------------------------------------------------------------------------------------- sequences
#: Channel order everywhere (model input, caches, readers): T1, T1 with gadolinium, T2, FLAIR.
MODALITIES: Final[tuple[str, ...]] = ("t1", "t1ce", "t2", "flair")
#: Channel order of the Decathlon's 4D images (dataset.json "modality": FLAIR, T1w, t1gd, T2w).
MSD_CHANNELS: Final[tuple[str, ...]] = ("flair", "t1", "t1ce", "t2")
#: Channel names the Decathlon's dataset.json uses, mapped to ours.
MSD_MODALITY_NAMES: Final[dict[str, str]] = {
    "flair": "flair",
    "t2flair": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}

#: The "modality" entry of a Decathlon Task01 dataset.json (channel index -> name, in MSD_CHANNELS order).
MSD_DATASET_MODALITY: Final[dict[str, str]] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
#: The "labels" entry of a Decathlon Task01 dataset.json (file label -> name; see MSD_FILE_TO_CLASS).
MSD_DATASET_LABELS: Final[dict[str, str]] = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}

# -------------------------------------------------------------------------------------- abnormal classes
#: Our abnormal classes, index = class value: 0 background, 1 NCR/NET, 2 ED (oedema), 3 ET (enhancing).
ABNORMAL_NAMES: Final[tuple[str, ...]] = ("background", "NCR/NET", "ED", "ET")
#: The foreground abnormal class values.
ABNORMAL_CLASSES: Final[tuple[int, ...]] = (1, 2, 3)
#: Number of abnormal classes the segmentation head predicts, background included.
NUM_ABNORMAL_CLASSES: Final[int] = len(ABNORMAL_NAMES)
#: Segment ids and display names of the foreground classes (Slicer segments, browser legends).
ABNORMAL_SEGMENT_IDS: Final[dict[int, tuple[str, str]]] = {
    1: ("NCR_NET", "NCR/NET"),
    2: ("Oedema", "Oedema"),
    3: ("Enhancing", "Enhancing"),
}
#: Name -> class values of each region scored by Dice; "whole_tumour" is every foreground class.
ABNORMAL_DICE_GROUPS: Final[dict[str, tuple[int, ...]]] = {
    "ncr_net": (1,),
    "ed": (2,),
    "et": (3,),
    "whole_tumour": ABNORMAL_CLASSES,
}
#: BraTS file label -> our class (BraTS: 1 NCR/NET, 2 ED, 4 ET).
BRATS_FILE_TO_CLASS: Final[dict[int, int]] = {0: 0, 1: 1, 2: 2, 4: 3}
CLASS_TO_BRATS_FILE: Final[dict[int, int]] = {c: f for f, c in BRATS_FILE_TO_CLASS.items()}
#: Decathlon Task01 file label -> our class (MSD: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour).
MSD_FILE_TO_CLASS: Final[dict[int, int]] = {0: 0, 1: 2, 2: 1, 3: 3}
CLASS_TO_MSD_FILE: Final[dict[int, int]] = {c: f for f, c in MSD_FILE_TO_CLASS.items()}
#: RGB of the abnormal classes in the colours BraTS figures and ITK-SNAP use: red, green, yellow.
ABNORMAL_COLORS: Final[dict[int, tuple[float, float, float]]] = {
    1: (1.0, 0.0, 0.0),
    2: (0.0, 1.0, 0.0),
    3: (1.0, 1.0, 0.0),
}

# ------------------------------------------------------------------------------------- normal anatomy
#: Normal-anatomy labels, index = label value (used to score S_normal).
ANATOMY_NAMES: Final[tuple[str, ...]] = (
    "background",
    "L cerebrum",
    "R cerebrum",
    "L cerebellum",
    "R cerebellum",
    "L lateral ventricle",
    "R lateral ventricle",
)
#: The foreground anatomy label values.
ANATOMY_CLASSES: Final[tuple[int, ...]] = tuple(range(1, len(ANATOMY_NAMES)))
#: RGB of the anatomy labels: left/right pairs in related hues.
ANATOMY_COLORS: Final[dict[int, tuple[float, float, float]]] = {
    1: (0.30, 0.55, 1.00),
    2: (0.00, 0.85, 0.85),
    3: (0.85, 0.45, 1.00),
    4: (1.00, 0.50, 0.80),
    5: (1.00, 0.65, 0.00),
    6: (0.75, 0.25, 0.00),
}

# ------------------------------------------------------------------------------------- codes and search
CodeType = Literal["normal", "abnormal"]
Distance = Literal["euclidean", "angular", "hamming", "learned"]
Mode = Literal["normal", "abnormal", "sum", "sum_normalized"]
LesionFilter = Literal["any", "without", "with"]

#: The two code types of a slice.
CODE_TYPES: Final[tuple[CodeType, ...]] = ("normal", "abnormal")
#: The paper's distances between code grids (section 3.2): D_E, D_A, D_H.
PAPER_DISTANCES: Final[tuple[Distance, ...]] = ("euclidean", "angular", "hamming")
#: Every distance the search offers: the paper's and D_L, the cosine of a retrieval embedding of the codes
#: learned for Dice (needs a model bundle that has one; ``fdn_core.codes.search``).
DISTANCES: Final[tuple[Distance, ...]] = (*PAPER_DISTANCES, "learned")


def available_distances(learned: bool) -> tuple[Distance, ...]:
    """The distances a search offers: the paper's, and the learned one when its embedding is there."""
    return DISTANCES if learned else PAPER_DISTANCES


#: Axial context of a search's normal term (``context=True``): (slice offset, weight) pairs. The normal
#: distance becomes the weighted sum of the distances between the query's slice at each offset and the
#: reference's slice at the same offset, both clamped to their volumes: anatomy around the slice pins down
#: its level and shape, which one 8x8 grid of normal codes leaves ambiguous. Not in the paper. Chosen on
#: the validation cohort 9201 among twelve slabs (+0.03 S_normal with D_L), then measured on the
#: evaluation cohorts and a fresh one (README, "Measured figures"); the abnormal term stays one slice (a
#: slab there cost S_sum on 9201).
AXIAL_CONTEXT: Final[tuple[tuple[int, float], ...]] = ((-6, 0.25), (-3, 0.5), (0, 1.0), (3, 0.5), (6, 0.25))

#: Smallest lesion the model's segmentation shows, in mL: predicted tumour components (3D, 26-connected,
#: all classes together) below it are removed before the segmentation is displayed, used to flag an
#: unlabelled slice as abnormal, or scored. The shipped model marks scattered false tumour in every healthy
#: phantom (1.3-6 mL on 9101 / 9102; 9201: mean 2.6, max 3.9); 2 mL is the smallest size tried that
#: clears all ten healthy
#: cases of the validation cohort 9201 (tumour-case Dice 0.765 -> 0.773 there). The smallest phantom
#: lesion in the cohorts 9101, 9102, 9201 and 9301 is 3.6 mL (a satellite), so the rule is untested on
#: lesions smaller than that, in phantoms or in patients: set 0 to see everything the model predicts.
MIN_LESION_ML: Final[float] = 2.0


def context_slices(index: int, depth: int) -> list[int]:
    """The slices of a ``depth``-slice volume at ``AXIAL_CONTEXT``'s offsets from ``index``, clamped."""
    return [min(max(int(index) + o, 0), int(depth) - 1) for o, _ in AXIAL_CONTEXT]


#: Short names of the distances in tables and reports.
DISTANCE_LABELS: Final[dict[str, str]] = {
    "euclidean": "D_E",
    "angular": "D_A",
    "hamming": "D_H",
    "learned": "D_L",
}
#: The search engine's modes: S_normal, S_abnormal, S_sum, and S_sum with each distance normalised.
MODES: Final[tuple[Mode, ...]] = ("normal", "abnormal", "sum", "sum_normalized")
#: Mode names as users write them (CLI choices); ``normalize_mode`` maps every alias to a ``MODES`` entry.
MODE_CHOICES: Final[tuple[str, ...]] = ("normal", "abnormal", "sum", "sum-normalized", "both")
_MODE_ALIASES: Final[dict[str, Mode]] = {
    "normal": "normal",
    "abnormal": "abnormal",
    "sum": "sum",
    "sum-normalized": "sum_normalized",
    "sum-normalised": "sum_normalized",
    "sum_normalized": "sum_normalized",
    "sum_normalised": "sum_normalized",
    # The panel's and the browser's "both": both codes, each distance divided by its typical size.
    "both": "sum_normalized",
}


def normalize_mode(mode: str) -> Mode:
    """A mode as a user wrote it (``both``, ``sum-normalised``, ...) -> the engine's name (``MODES``)."""
    from fdn_core.errors import ConfigError

    try:
        return _MODE_ALIASES[mode.strip().lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown search mode {mode!r}; choose one of {list(MODE_CHOICES)}") from None


#: Which references a search may return, by each slice's ``has_abnormal`` flag (``fdn_core.codes.database``;
#: from the case's tumour labels when it has them, else from the model's segmentation after the
#: ``MIN_LESION_ML`` rule): "any" (the default) every slice; "without" only slices whose flag is False (the
#: same anatomy without a lesion); "with" only flagged slices (a similar lesion).
LESION_FILTERS: Final[tuple[LesionFilter, ...]] = ("any", "without", "with")
#: How the panel and the browser name the filters ("References: ...").
LESION_FILTER_LABELS: Final[dict[str, str]] = {
    "any": "any slice",
    "without": "without lesion",
    "with": "with lesion",
}


def check_lesion_filter(lesion: str) -> LesionFilter:
    """A lesion filter as a user wrote it (any case, spaces around) -> its ``LESION_FILTERS`` name."""
    from fdn_core.errors import ConfigError

    name = lesion.strip().lower() if isinstance(lesion, str) else None
    for known in LESION_FILTERS:
        if name == known:
            return known
    raise ConfigError(
        f"unknown lesion filter {lesion!r}; choose one of {list(LESION_FILTERS)} (any: every slice; without: "
        "only slices without a lesion; with: only slices with one)"
    )
