"""``fdn train-embedding``: learn the retrieval embedding behind the learned distance D_L.

Why: the paper's distances (Euclidean, angular, Hamming) are L2-like, while its evaluation scores retrieved
slices by the Dice of their label maps; ranking even the true label maps at the code grid by L2 loses more
than anything the model does (bench/diagnose_retrieval.py, docs/results/diagnose/). D_L keeps the engine's
table lookup and learns what goes into the tables: one vector per code (K x M per code type) such that the
cosine of two embedded code grids orders slices as the Dice of their label maps does.

Data: every slice of a labelled training cohort, encoded with the bundle as the database does; the targets
are the per-class soft Dice of the label maps pooled to the code grid (tumour classes for the abnormal
codes; anatomy labels for the normal codes when the cohort has them, as the phantoms do; without them the
normal embedding is the normal codebook, so D_L's normal term equals D_A's). Loss: for each query slice of
a batch, the KL divergence from the softmax of the target Dice (temperature ``target_temperature``) to the
softmax of the scaled cosines over the batch's other cases' slices (a listwise ranking loss). A share
``holdout`` of the cases is kept out and the command reports, on them, the volume-wise top-10 ratio of the
learned cosine against the codebook's cosine (D_A) with the pooled Dice as the score.

Registered through the entry-point group ``fdn.commands`` (``training/pyproject.toml``).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdn_core.cli.args import add_data, add_device, add_model, add_no_progress, positive_int
from fdn_core.data.provenance import TRAIN_COHORT_SEED_KEY
from fdn_core.errors import ConfigError, DataError
from fdn_core.labels import ABNORMAL_CLASSES, ANATOMY_CLASSES, AXIAL_CONTEXT, CODE_TYPES

__all__ = [
    "EmbeddingCells",
    "EmbeddingSettings",
    "collect_cells",
    "learn_embedding",
    "map_dice",
    "pooled_dice",
    "register",
    "run",
]


@dataclass(frozen=True)
class EmbeddingSettings:
    """Hyper-parameters of the learner (defaults: the shipped model's, ~2 min per code type on 2 cores)."""

    dim: int = 32
    steps: int = 3000
    queries: int = 128  # query slices (with labels of the term's classes) per step
    references: int = 512  # reference slices per step: 3/4 labelled, 1/4 any
    lr: float = 0.02
    target_temperature: float = 0.05
    holdout: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.steps < 1 or self.queries < 2 or self.references < 4:
            raise ConfigError("dim and steps must be >= 1, queries >= 2 and references >= 4")
        if not 0.0 <= self.holdout < 0.5 or self.lr <= 0 or self.target_temperature <= 0:
            raise ConfigError("holdout must lie in [0, 0.5); lr and target_temperature must be > 0")


@dataclass
class EmbeddingCells:
    """Per slice of a cohort: the code grids (n, P) int64 of each code type, the case number (n,), and the
    label fractions (n, C, P) float32 at the code grid of each code type (None: no labels)."""

    codes: dict[str, np.ndarray]
    fractions: dict[str, np.ndarray | None]
    case: np.ndarray
    case_ids: list[str] = field(default_factory=list)


def collect_cells(
    bundle: Any,
    data_dir: Path,
    workers: int = 1,
    progress: Any = None,
    label_grid: tuple[int, int] | None = None,
) -> EmbeddingCells:
    """Encode every slice of the cohort ``data_dir`` with ``bundle`` (as ``fdn index`` does) and pool its
    tumour and anatomy labels to the code grid (or to ``label_grid``: the model's image size keeps the label
    maps themselves, as one-hot maps)."""
    from fdn_core.data.preprocess import class_fractions, volume_to_slices
    from fdn_core.data.readers import find_cases, load_case, parallel_map

    cases = list(find_cases(data_dir))
    if not cases:
        raise DataError(f"{data_dir}: no cases found (BraTS, Decathlon or phantom layout expected)")
    grid = bundle.grid_shape if label_grid is None else label_grid
    codes: dict[str, list[np.ndarray]] = {t: [] for t in CODE_TYPES}
    fracs: dict[str, list[np.ndarray]] = {t: [] for t in CODE_TYPES}
    case_no: list[np.ndarray] = []
    has_anat = True
    ids = []

    def prepare(f: Any) -> tuple[str, Any]:
        return f.case_id, volume_to_slices(load_case(f), bundle.preprocess)

    for i, (cid, stack) in enumerate(parallel_map(prepare, cases, workers)):
        if stack.seg is None:
            raise DataError(
                f"{data_dir}: case {cid} has no tumour labels; the retrieval embedding learns from labelled "
                "cases only (give the cohort the model was trained on)"
            )
        enc = bundle.encode_slices(stack.images)
        n = enc.normal.shape[0]
        codes["normal"].append(enc.normal.reshape(n, -1).astype(np.int64))
        codes["abnormal"].append(enc.abnormal.reshape(n, -1).astype(np.int64))
        fracs["abnormal"].append(class_fractions(stack.seg, ABNORMAL_CLASSES, grid).astype(np.float32))
        has_anat = has_anat and stack.anat is not None
        if has_anat:
            fracs["normal"].append(class_fractions(stack.anat, ANATOMY_CLASSES, grid).astype(np.float32))
        case_no.append(np.full(n, i, dtype=np.int64))
        ids.append(cid)
        if progress is not None:
            progress.update(i + 1, len(cases), "Encoding the training cohort")
    p = grid[0] * grid[1]
    out_fracs: dict[str, np.ndarray | None] = {}
    for t, classes in (("normal", ANATOMY_CLASSES), ("abnormal", ABNORMAL_CLASSES)):
        ok = t == "abnormal" or has_anat
        out_fracs[t] = np.concatenate(fracs[t]).reshape(-1, len(classes), p) if ok else None
    return EmbeddingCells(
        {t: np.concatenate(codes[t]) for t in CODE_TYPES}, out_fracs, np.concatenate(case_no), ids
    )


def pooled_dice(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(nq, nr) multi-class soft Dice between label fractions q (nq, C, P) and r (nr, C, P): per class
    ``2 sum min / (sum + sum)``, averaged over the classes either has; 1 where neither has any."""
    return _class_mean_dice(torch.minimum(q[:, None], r[None]).sum(-1), q, r)


def map_dice(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``pooled_dice`` for one-hot label maps (fractions 0 or 1, e.g. at the image size), where ``min`` is the
    product: the overlaps are one matrix product per class instead of an (nq, nr, C, P) tensor, and the
    result is exactly the evaluation's multi-class Dice of the label slices (``metrics.multiclass_dice``)."""
    return _class_mean_dice(torch.einsum("qcp,rcp->qrc", q, r), q, r)


def _class_mean_dice(inter: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-class Dice from the overlaps ``inter`` (nq, nr, C), averaged over the classes present."""
    total = q.sum(-1)[:, None] + r.sum(-1)[None]
    present = total > 0
    dice = torch.where(present, 2 * inter / total.clamp_min(1e-9), torch.zeros_like(total))
    count = present.sum(-1)
    return torch.where(count > 0, dice.sum(-1) / count.clamp_min(1), torch.ones_like(dice[..., 0]))


def _cosine(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Unit-normalised flattened embedding of code grids (n, P) under per-code ``vectors`` (K, M)."""
    e = vectors[codes].reshape(codes.shape[0], -1)
    out: torch.Tensor = e / e.norm(dim=1, keepdim=True).clamp_min(1e-9)
    return out


def _context_rows(case: np.ndarray, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the rows at ``AXIAL_CONTEXT``'s offsets clamped within its case (n, O), and the offsets'
    weights (O,); without context the row itself with weight 1."""
    n = case.size
    if not context:
        return torch.arange(n)[:, None], torch.ones(1)
    change = np.flatnonzero(case[1:] != case[:-1]) + 1
    starts, stops = np.concatenate([[0], change]), np.concatenate([change, [n]])
    owner = np.repeat(np.arange(starts.size), stops - starts)
    rows = np.arange(n)[:, None] + np.asarray([o for o, _ in AXIAL_CONTEXT])[None]
    rows = np.clip(rows, starts[owner][:, None], stops[owner][:, None] - 1)
    return torch.from_numpy(rows), torch.tensor([w for _, w in AXIAL_CONTEXT], dtype=torch.float32)


def _similarity(
    vectors: torch.Tensor,
    codes: torch.Tensor,
    q_rows: torch.Tensor,
    r_rows: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """(nq, nr) weighted mean over the context offsets of the cosines of the embedded grids at the rows
    ``q_rows`` (nq, O) and ``r_rows`` (nr, O)."""
    nq, nr, o = q_rows.shape[0], r_rows.shape[0], weights.numel()
    u = _cosine(vectors, codes[q_rows.reshape(-1)]).reshape(nq, o, -1)
    v = _cosine(vectors, codes[r_rows.reshape(-1)]).reshape(nr, o, -1)
    if o == 1:  # one slice: the plain product (the shipped embeddings were learned with it)
        return u[:, 0] @ v[:, 0].T
    return torch.einsum("qod,rod,o->qr", u, v, weights / weights.sum())


def _volume_ratio(
    sim: np.ndarray, score: np.ndarray, q_case: np.ndarray, r_case: np.ndarray, top: int = 10
) -> float:
    """Mean score of each query's volume-wise top-``top`` (best slice per other case, ranked by ``sim``)
    over the oracle's (ranked by ``score``)."""
    cases = np.unique(r_case)
    got, best = 0.0, 0.0
    for i in range(sim.shape[0]):
        s_best, d_at, d_best = [], [], []
        for c in cases:
            if c == q_case[i]:
                continue
            sel = r_case == c
            j = np.argmax(sim[i, sel])
            s_best.append(sim[i, sel][j])
            d_at.append(score[i, sel][j])
            d_best.append(score[i, sel].max())
        order = np.argsort(-np.asarray(s_best), kind="stable")[:top]
        got += float(np.mean(np.asarray(d_at)[order]))
        best += float(np.mean(np.sort(d_best)[-top:]))
    return got / best if best > 0 else 0.0


def learn_embedding(
    codes: np.ndarray,
    fractions: np.ndarray,
    case: np.ndarray,
    codebook: np.ndarray,
    settings: EmbeddingSettings,
    progress: Any = None,
    label: str = "",
    dice: Any = pooled_dice,
    context: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(K, dim) float32 embedding of one code type's codes, and a report (held-out ratios, loss, time).
    ``dice``: the target similarity of two slices' label fractions (``pooled_dice``; ``map_dice`` for
    one-hot maps at the image size). ``context``: the similarity learned is the axial-context one the search
    uses (``labels.AXIAL_CONTEXT``: the weighted mean of the cosines at each offset, slices clamped within
    their case; the rows of a case must be its consecutive slices, as ``collect_cells`` gives them); the
    target stays the slices' own Dice."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    k = codebook.shape[0]
    cases = np.unique(case)
    # at least 2 held-out cases: the held-out ranking retrieves from the other held-out cases
    n_hold = max(2, round(settings.holdout * cases.size)) if settings.holdout > 0 and cases.size >= 6 else 0
    held = rng.choice(cases, n_hold, replace=False) if n_hold else np.zeros(0, np.int64)
    train = ~np.isin(case, held)
    labelled = fractions.sum(axis=(1, 2)) > 0
    pool_q = np.flatnonzero(train & labelled)
    pool_any = np.flatnonzero(train)
    n_lab = settings.references * 3 // 4
    if pool_q.size < max(settings.queries, n_lab) or pool_any.size < settings.references - n_lab:
        raise DataError(
            f"{label}: {pool_q.size} labelled training slices ({pool_any.size} in all) for "
            f"{settings.queries} queries and {settings.references} references per step; give a larger "
            "cohort or fewer --queries / --references"
        )
    codes_t = torch.from_numpy(codes)
    frac_t = torch.from_numpy(fractions)
    case_t = torch.from_numpy(case)
    around, weights = _context_rows(case, context)
    vectors = torch.nn.Parameter(torch.randn(k, settings.dim, generator=gen) * 0.1)
    log_scale = torch.nn.Parameter(torch.tensor(3.0))
    opt = torch.optim.Adam([vectors, log_scale], lr=settings.lr)
    losses = []
    for step in range(settings.steps):
        q = torch.from_numpy(rng.choice(pool_q, settings.queries, replace=False))
        r = torch.from_numpy(
            np.concatenate(
                [
                    rng.choice(pool_q, n_lab, replace=False),
                    rng.choice(pool_any, settings.references - n_lab, replace=False),
                ]
            )
        )
        same = case_t[q][:, None] == case_t[r][None]
        target = (dice(frac_t[q], frac_t[r]) / settings.target_temperature).masked_fill(same, -1e4)
        logits = _similarity(vectors, codes_t, around[q], around[r], weights) * log_scale.exp()
        logits = logits.masked_fill(same, -1e4)
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(logits, 1), torch.log_softmax(target, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None and (step + 1) % 50 == 0:
            progress.update(step + 1, settings.steps, f"Learning the {label} embedding")
    emb = vectors.detach().numpy().astype(np.float32)
    report: dict[str, Any] = {
        "steps": settings.steps,
        "final_loss": float(np.mean(losses[-100:])),
        "seconds": round(time.perf_counter() - t0, 1),
        "holdout_cases": int(n_hold),
    }
    hq = np.flatnonzero(~train & labelled)[::3]
    if n_hold and hq.size:
        hr = np.flatnonzero(~train)
        with torch.no_grad():
            score = dice(frac_t[hq], frac_t[hr]).numpy()
            book = torch.from_numpy(np.asarray(codebook, dtype=np.float32))
            ratios = {}
            for name, vec in (("learned", vectors.detach()), ("codebook_cosine", book)):
                sim = _similarity(vec, codes_t, around[hq], around[hr], weights).numpy()
                ratios[name] = round(_volume_ratio(sim, score, case[hq], case[hr]), 4)
        report["holdout_ratio"] = ratios
    return emb, report


def _phantom_seed(data: Path) -> int | None:
    """The phantom seed recorded in the cohort's ``cohort.json`` (None for other cohorts)."""
    from fdn_core.data.phantom import read_cohort_json

    if not (data / "cohort.json").is_file():
        return None
    seed = read_cohort_json(data).get("seed")
    return int(seed) if isinstance(seed, int) else None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train-embedding`` subcommand."""
    parser = subparsers.add_parser(
        "train-embedding",
        help="learn a model bundle's retrieval embedding (the learned distance D_L)",
        description="Encode a labelled cohort (the model's training cohort) with the bundle, learn one "
        "vector per code so that the cosine of embedded code grids ranks slices as the Dice of their label "
        "maps does, and add it to the bundle (retrieval_embedding.safetensors; the fingerprint is "
        "unchanged, so databases built with the bundle stay valid). Normal codes learn from anatomy labels "
        "when the cohort has them, else keep the codebook.",
    )
    add_model(parser)
    add_data(parser, help="labelled cohort to learn from: the model's training cohort, not an evaluation one")
    parser.add_argument("--dim", type=positive_int, default=EmbeddingSettings.dim, help="vector size M")
    parser.add_argument("--steps", type=positive_int, default=EmbeddingSettings.steps, help="optimiser steps")
    parser.add_argument(
        "--queries", type=positive_int, default=EmbeddingSettings.queries, help="query slices per step"
    )
    parser.add_argument(
        "--references",
        type=positive_int,
        default=EmbeddingSettings.references,
        help="reference slices per step",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and initialisation")
    parser.add_argument("--workers", type=positive_int, default=2, help="volume loading threads")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_device(parser)
    add_no_progress(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn train-embedding``."""
    from fdn_core.model.bundle import load_bundle, save_retrieval_embedding
    from fdn_core.progress import tqdm_progress

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = EmbeddingSettings(
        dim=args.dim, steps=args.steps, queries=args.queries, references=args.references, seed=args.seed
    )
    bundle = load_bundle(args.model, device=args.device)
    data = Path(args.data)
    if not data.is_dir():
        raise ConfigError(f"--data {data}: no such folder")
    if not os.access(bundle.path, os.W_OK):  # checked before minutes of encoding, not after
        raise ConfigError(
            f"--model {bundle.path}: the bundle folder is not writable; copy it (cp -r) and give the copy"
        )
    progress = tqdm_progress(disable=args.no_progress)
    t0 = time.perf_counter()
    cells = collect_cells(bundle, data, args.workers, progress)
    books = dict(zip(CODE_TYPES, bundle.codebooks(), strict=True))
    out: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {
        "train_data": str(data.resolve()),
        "cases": len(cells.case_ids),
        "slices": int(cells.case.size),
        "settings": settings.__dict__,
        "command": f"fdn train-embedding --model {args.model} --data {data} --dim {settings.dim} "
        f"--steps {settings.steps} --queries {settings.queries} --references {settings.references} "
        f"--seed {settings.seed}",
    }
    seed = _phantom_seed(data)
    if seed is not None:
        info[TRAIN_COHORT_SEED_KEY] = seed
    trained = set(bundle.metadata.get("train_cases") or [])
    if trained:
        info["cases_in_model_training"] = sum(c in trained for c in cells.case_ids)
    for t in CODE_TYPES:
        frac = cells.fractions[t]
        if frac is None:
            out[t] = books[t].astype(np.float32)
            info[t] = {"source": "codebook (the cohort has no anatomy labels): D_L's normal term is D_A's"}
            print(f"{t}: no anatomy labels in {data}; the normal embedding is the codebook (D_A)")
            continue
        emb, report = learn_embedding(cells.codes[t], frac, cells.case, books[t], settings, progress, t)
        out[t] = emb
        info[t] = {"source": "learned", **report}
        print(f"{t}: {report}")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    path = save_retrieval_embedding(bundle.path, out["normal"], out["abnormal"], info)
    load_bundle(bundle.path, device="cpu")  # verify what was written
    print(f"wrote {path} ({info['seconds']:.0f} s); search with --distance learned")
    return 0
