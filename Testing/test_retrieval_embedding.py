"""The learned distance D_L: ``fdn train-embedding`` adds a retrieval embedding to a bundle, the search ranks
by the cosine of the embedded code grids, and the evaluation includes it only when the bundle has one."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fdn_core.cli import main
from fdn_core.errors import DataError, IntegrityError
from fdn_core.model.bundle import EMBEDDING_NAME, load_bundle


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_cohort: Path) -> Path:
    """A copy of the tiny bundle with a retrieval embedding learned on the tiny cohort (few steps)."""
    return train_embedding(tiny_bundle, tmp_path_factory.mktemp("emb") / "bundle", tiny_cohort)


def train_embedding(bundle: Path, out: Path, cohort: Path) -> Path:
    """``fdn train-embedding`` on a copy ``out`` of ``bundle``: 4-vectors, 40 steps of small batches (the
    tiny cohort has 6 cases of 40 slices)."""
    shutil.copytree(bundle, out)
    argv = ["train-embedding", "--model", str(out), "--data", str(cohort), "--dim", "4", "--steps", "40"]
    argv += ["--queries", "16", "--references", "64", "--threads", "1", "--workers", "1"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    return out


def test_train_embedding_adds_a_verified_embedding_and_keeps_the_fingerprint(
    embedded: Path, tiny_bundle: Path
) -> None:
    plain, bundle = load_bundle(tiny_bundle, device="cpu"), load_bundle(embedded, device="cpu")
    assert plain.retrieval_embedding is None
    assert bundle.fingerprint == plain.fingerprint  # databases built with the bundle stay valid
    assert bundle.retrieval_embedding is not None
    k = bundle.config.num_codes
    assert [e.shape for e in bundle.retrieval_embedding] == [(k, 4), (k, 4)]
    info = bundle.metadata["retrieval_embedding"]
    for t in ("normal", "abnormal"):  # the phantoms have anatomy labels: both terms learned
        assert info[t]["source"] == "learned" and info[t]["steps"] == 40
        assert set(info[t]["holdout_ratio"]) == {"learned", "codebook_cosine"}
    # seeded: the same command gives the same embedding
    again = train_embedding(tiny_bundle, embedded.parent / "again", Path(info["train_data"]))
    second = load_bundle(again, device="cpu").retrieval_embedding
    assert second is not None
    for a, b in zip(bundle.retrieval_embedding, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_embedding_is_refused(embedded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(embedded, copy)
    data = bytearray((copy / EMBEDDING_NAME).read_bytes())
    data[-1] ^= 0xFF
    (copy / EMBEDDING_NAME).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=EMBEDDING_NAME):
        load_bundle(copy, device="cpu")


def test_a_reader_during_a_replacement_reads_the_manifest_again(
    embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader that reads bundle.json just before a writer replaces the embedding meets the new file under
    the old hash: it reads bundle.json again instead of calling the bundle damaged. Under an unchanged
    bundle.json a mismatch is still an error; a second writer waits for the lock, then says so."""
    from filelock import FileLock

    import fdn_core.model.bundle as mb

    copy = tmp_path / "b"
    shutil.copytree(embedded, copy)
    real = mb._read_manifest
    _, old = real(copy)
    bundle = load_bundle(copy, device="cpu")
    assert bundle.retrieval_embedding is not None
    new = [2.0 * e for e in bundle.retrieval_embedding]
    mb.save_retrieval_embedding(copy, new[0], new[1], {"note": "replaced"})
    reads = []

    def stale_first(path: Path) -> tuple[Path, dict]:
        reads.append(path)
        folder, manifest = real(path)
        return (folder, old) if len(reads) == 1 else (folder, manifest)

    monkeypatch.setattr(mb, "_MANIFEST_PAUSE_S", 0.0)
    monkeypatch.setattr(mb, "_read_manifest", stale_first)
    loaded = load_bundle(copy, device="cpu")  # first read: the old manifest over the new file
    assert len(reads) == 2 and loaded.metadata["retrieval_embedding"] == {"note": "replaced"}
    assert loaded.retrieval_embedding is not None
    np.testing.assert_array_equal(loaded.retrieval_embedding[0], new[0].astype(np.float32))
    monkeypatch.setattr(mb, "_read_manifest", lambda path: (copy, old))  # bundle.json never catches up
    with pytest.raises(IntegrityError, match=EMBEDDING_NAME):
        load_bundle(copy, device="cpu")
    monkeypatch.setattr(mb, "_read_manifest", real)
    monkeypatch.setattr(mb, "_LOCK_TIMEOUT_S", 0.1)
    with FileLock(str(copy / mb.BUNDLE_LOCK)), pytest.raises(DataError, match="another process"):
        mb.save_retrieval_embedding(copy, new[0], new[1], {})


def test_learned_search_is_the_cosine_of_the_embedded_grids(
    embedded: Path, tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval
    from fdn_core.retrieval import Retriever, index_cohort

    bundle = load_bundle(embedded, device="cpu")
    db = index_cohort(bundle, tiny_cohort, tmp_path / "db")
    retriever = Retriever(db, bundle)
    assert retriever.distances[-1] == "learned"
    case = db.cases[0]
    query = retriever.slice_from_database(case, 20)
    hits = retriever.search(query, mode="abnormal", distance="learned", top=50, slice_wise=True)
    assert hits and all(h.case_id != case for h in hits)
    assert bundle.retrieval_embedding is not None
    emb = bundle.retrieval_embedding[1]
    codes = np.asarray(db.abnormal_codes).astype(np.int64)

    def unit(grid: np.ndarray) -> np.ndarray:
        v = emb[grid].reshape(-1)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    q = unit(query.abnormal.reshape(-1))
    want = np.array([1.0 - unit(codes[h.row]) @ q for h in hits])
    np.testing.assert_allclose([h.distance for h in hits], want, rtol=1e-9, atol=1e-9)
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise([h.distance for h in hits]))

    # The evaluation includes D_L when the bundle has it, and refuses it when the bundle has none.
    result = evaluate_retrieval(bundle, db, leave_one_out=True, top=2, baselines=[], workers=1)
    assert "learned" in result.summary()
    plain = load_bundle(tiny_bundle, device="cpu")
    without = evaluate_retrieval(plain, db, leave_one_out=True, top=2, baselines=[], workers=1)
    assert "learned" not in without.summary()
    with pytest.raises(DataError, match="train-embedding"):
        evaluate_retrieval(plain, db, leave_one_out=True, top=2, distances=["learned"], workers=1)
    manifest = json.loads((embedded / "bundle.json").read_text())
    assert EMBEDDING_NAME in manifest["files"]


def test_without_anatomy_labels_the_normal_embedding_is_the_codebook(
    tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """A BraTS-like cohort (tumour labels, no anatomy): D_L's normal term is D_A's."""
    cohort = tmp_path / "brats"
    shutil.copytree(tiny_cohort, cohort)
    for anat in cohort.rglob("*_anat.nii.gz"):
        anat.unlink()
    out = train_embedding(tiny_bundle, tmp_path / "bundle", cohort)
    bundle = load_bundle(out, device="cpu")
    assert bundle.retrieval_embedding is not None
    normal_book = bundle.codebooks()[0]
    np.testing.assert_array_equal(bundle.retrieval_embedding[0], normal_book.astype(np.float64))
    info = bundle.metadata["retrieval_embedding"]
    assert info["normal"]["source"].startswith("codebook") and info["abnormal"]["source"] == "learned"


def test_a_read_only_bundle_is_refused_before_encoding(
    tiny_bundle: Path, tiny_cohort: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle folder the user may not write to (an installed package) is refused before any encoding."""
    import fdn_training.embedding as embedding

    def collect(*_: object, **__: object) -> None:
        raise AssertionError("encoded before checking the bundle folder")

    monkeypatch.setattr(embedding.os, "access", lambda path, mode: False)
    monkeypatch.setattr(embedding, "collect_cells", collect)
    argv = ["train-embedding", "--model", str(tiny_bundle), "--data", str(tiny_cohort), "--no-progress"]
    assert main(argv) == 2
    assert "not writable; copy it" in capsys.readouterr().err


def test_map_dice_is_the_evaluation_dice_and_the_target_bench_runs(
    tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """``map_dice`` on one-hot label maps equals ``metrics.multiclass_dice`` (and ``pooled_dice`` on them);
    ``bench/dl_targets.py`` pools maps as ``class_fractions`` does and learns and evaluates D_L per grid."""
    import importlib.util

    import torch

    from fdn_core.data.preprocess import class_fractions
    from fdn_core.evaluation.metrics import multiclass_dice
    from fdn_core.labels import ANATOMY_CLASSES
    from fdn_core.retrieval import index_cohort
    from fdn_training.embedding import map_dice, pooled_dice

    rng = np.random.default_rng(0)
    maps = rng.integers(0, 7, size=(7, 16, 16)).astype(np.uint8)
    maps[3] = 0  # no class at all: Dice 1 against another empty map, 0 against the others
    maps[5] = 0
    onehot = np.stack([(maps == c) for c in ANATOMY_CLASSES], 1).reshape(7, len(ANATOMY_CLASSES), -1)
    t = torch.from_numpy(onehot.astype(np.float32))
    got = map_dice(t, t).numpy()
    want = [[multiclass_dice(a, b, ANATOMY_CLASSES) for b in maps] for a in maps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(pooled_dice(t, t).numpy(), got, rtol=1e-6)

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("dl_targets", root / "bench" / "dl_targets.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pooled = bench.pool_fractions(onehot.astype(np.float32), 16, 4)
    want_cells = class_fractions(maps, ANATOMY_CLASSES, (4, 4))
    np.testing.assert_allclose(pooled.reshape(7, -1), want_cells, atol=1e-6)

    bundle = load_bundle(tiny_bundle, device="cpu")
    size, grid = bundle.preprocess.image_size, bundle.grid_shape[0]
    db = index_cohort(bundle, tiny_cohort, tmp_path / "db")
    argv = ["--model", str(tiny_bundle), "--train-data", str(tiny_cohort), "--db", str(db.path)]
    argv += ["--grids", str(grid), str(size), "--out", str(tmp_path / "out"), "--steps", "20"]
    assert bench.main([*argv, "--queries", "16", "--references", "64", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "out" / "dl_targets.json").read_text())
    assert [r["grid"] for r in rows] == [grid, size]
    for row in rows:
        assert all(0 < row["D_L"][s] <= 1.0 + 1e-9 for s in ("S_normal", "S_abnormal", "S_sum"))
        copy = load_bundle(tmp_path / "out" / f"grid_{row['grid']}" / "bundle", device="cpu")
        assert copy.retrieval_embedding is not None
    assert load_bundle(tiny_bundle, device="cpu").retrieval_embedding is None  # the bundle itself untouched


def test_context_rows_stay_within_their_case_and_one_offset_is_the_plain_cosine() -> None:
    """The axial-context similarity the learner can fit (``learn_embedding(context=True)``) reads the
    slices at ``AXIAL_CONTEXT``'s offsets clamped within each case; without context it is the plain cosine."""
    import torch

    from fdn_core.labels import AXIAL_CONTEXT
    from fdn_training.embedding import _context_rows, _cosine, _similarity

    case = np.array([0] * 8 + [1] * 4)
    rows, weights = _context_rows(case, True)
    assert rows.shape == (12, len(AXIAL_CONTEXT)) and weights.tolist() == [w for _, w in AXIAL_CONTEXT]
    assert rows[0].tolist() == [0, 0, 0, 3, 6] and rows[7].tolist() == [1, 4, 7, 7, 7]
    assert rows[8].tolist() == [8, 8, 8, 11, 11] and rows[11].tolist() == [8, 8, 11, 11, 11]
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(5, 3, generator=gen)
    codes = torch.randint(0, 5, (12, 4), generator=gen)
    plain_rows, one = _context_rows(case, False)
    q, r = torch.tensor([0, 9]), torch.arange(12)
    plain = _similarity(vectors, codes, plain_rows[q], plain_rows[r], one)
    torch.testing.assert_close(plain, _cosine(vectors, codes[q]) @ _cosine(vectors, codes[r]).T)
    ctx = _similarity(vectors, codes, rows[q], rows[r], weights)
    want = (
        sum(
            w * (_cosine(vectors, codes[rows[q, i]]) @ _cosine(vectors, codes[rows[r, i]]).T)
            for i, (_, w) in enumerate(AXIAL_CONTEXT)
        )
        / weights.sum()
    )
    torch.testing.assert_close(ctx, want)
