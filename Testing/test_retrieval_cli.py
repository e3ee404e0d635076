"""End to end on the tiny phantom cohort: ``fdn index``, ``fdn query``, ``fdn eval-retrieval`` and the library
behind them, with tiny untrained bundles (a freshly initialised, seeded FDN saved as a real bundle: retrieval
runs mechanically on it; scores mean nothing)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fdn_core.cli import main
from fdn_core.errors import ConfigError, DataError, ModelMismatchError


@pytest.fixture(scope="module")
def setup(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> dict:
    """Two bundles (different seeds), the cohort's tumour/healthy split, a database of all but two cases."""
    from fdn_core.data.readers import find_cases, load_case

    work = tmp_path_factory.mktemp("retrieval")
    tumour, healthy = [], []
    for files in find_cases(tiny_cohort):
        case = load_case(files)
        (tumour if case.seg is not None and case.seg.any() else healthy).append(case.case_id)
    assert len(tumour) >= 3 and healthy, "the tiny cohort should have tumour and healthy cases"
    held_out = [tumour[-1], healthy[-1]]
    refs = [c for c in tumour + healthy if c not in held_out]
    bundle = bundle_factory(work / "bundle", 0)
    other = bundle_factory(work / "other_bundle", 1)
    db = work / "db"
    rc = main(["index", "build", "--model", str(bundle), "--data", str(tiny_cohort), "--db", str(db),
               "--cases", *refs, "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 0
    return {
        "work": work,
        "cohort": tiny_cohort,
        "bundle": bundle,
        "other": other,
        "db": db,
        "refs": sorted(refs),
        "held_out": held_out,
        "tumour": tumour,
        "healthy": healthy,
    }


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _largest_tumour_slice(cohort: Path, case_id: str) -> int:
    from fdn_core.data.readers import case_files_from_paths, load_case

    seg = load_case(case_files_from_paths([cohort / case_id])).seg
    return int(np.argmax(seg.reshape(-1, seg.shape[-1]).astype(bool).sum(0)))


# ------------------------------------------------------------------------------------------- fdn index


def test_index_build_info_add_remove(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "index", "info", str(setup["db"]), "--cases")
    assert rc == 0, out
    assert f"cases         {len(setup['refs'])}" in out
    assert f"lesion flags  from tumour labels in {len(setup['refs'])} case(s), from the model's" in out
    assert "integrity     OK" in out
    assert "hamming normal" in out and "hamming abnormal" in out
    for case in setup["refs"]:
        assert f"  {case}: 40 slices" in out

    db = setup["work"] / "db_edit"
    shutil.copytree(setup["db"], db)
    common = [
        "--model",
        str(setup["bundle"]),
        "--data",
        str(setup["cohort"]),
        "--device",
        "cpu",
        "--no-progress",
    ]
    rc, out, _ = _run(capsys, "index", "add", "--db", str(db), *common)
    assert rc == 0 and "added 2 case(s)" in out
    rc, out, _ = _run(capsys, "index", "add", "--db", str(db), *common)
    assert rc == 0 and "nothing to add" in out
    # Naming a case that is indexed already (same image files) skips it: the same command run again
    # after an interruption continues where it stopped.
    rc, out, _ = _run(capsys, "index", "add", "--db", str(db), *common, "--cases", setup["refs"][0])
    assert rc == 0 and "already indexed (skipped): 1 case(s)" in out and "nothing to add" in out

    removed = setup["held_out"][0]
    rc, out, _ = _run(capsys, "index", "remove", "--db", str(db), "--case", removed)
    assert rc == 0 and f"removed {removed}" in out
    from fdn_core.codes.database import CodeDatabase

    opened = CodeDatabase.open(db)
    assert removed not in opened and len(opened.cases) == len(setup["refs"]) + 1
    assert len(opened) == 40 * (len(setup["refs"]) + 1)
    rc, _, err = _run(capsys, "index", "remove", "--db", str(db), "--case", removed)
    assert rc == 2 and f"no case(s) ['{removed}']" in err

    # A build never silently replaces an existing database, nor a folder that is not one.
    rc, _, err = _run(capsys, "index", "build", "--db", str(db), *common)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    stranger = setup["work"] / "not_a_db"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    rc, _, err = _run(capsys, "index", "build", "--db", str(stranger), *common, "--overwrite")
    assert rc == 2 and "not a code database" in err
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_index_info_reports_corruption(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    db = setup["work"] / "db_corrupt"
    shutil.copytree(setup["db"], db)
    target = next(db.glob("segments/*/normal_codes.npy"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    rc, _, err = _run(capsys, "index", "info", str(db))
    assert rc == 1
    assert "INTEGRITY CHECK FAILED" in err and "normal_codes.npy" in err

    db2 = setup["work"] / "db_corrupt_hamming"
    shutil.copytree(setup["db"], db2)
    bits = db2 / "hamming" / "abnormal.bits.npy"
    data = bytearray(bits.read_bytes())
    data[-1] ^= 0x01
    bits.write_bytes(bytes(data))
    rc, _, err = _run(capsys, "index", "info", str(db2))
    assert rc == 1 and "abnormal.bits.npy" in err

    rc, _, err = _run(capsys, "index", "info", str(setup["work"] / "nowhere"))
    assert rc == 2 and "not a code database" in err


# ------------------------------------------------------------------------------------------- fdn query


def _table_rows(out: str) -> list[tuple[int, str, int, float]]:
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            rows.append((int(parts[0]), parts[1], int(parts[2]), float(parts[3])))
    return rows


def test_query_database_case_excludes_its_volume_and_writes_a_montage(
    setup: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image as mpimg

    case = setup["tumour"][0]
    k = _largest_tumour_slice(setup["cohort"], case)
    png, js = setup["work"] / "q.png", setup["work"] / "q.json"
    rc, out, err = _run(
        capsys, "query", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--case", case,
        "--slice", str(k), "--mode", "sum", "--distance", "euclidean", "--top", "10",
        "--montage", str(png), "--json", str(js), "--device", "cpu",
    )  # fmt: skip
    assert rc == 0, err
    assert "in the database, excluded from results" in out
    rows = _table_rows(out)
    assert [r[0] for r in rows] == list(range(1, len(setup["refs"])))
    assert {r[1] for r in rows} == set(setup["refs"]) - {case}  # volume-wise: every other volume once
    assert all(a[3] <= b[3] for a, b in itertools.pairwise(rows))
    hits = json.loads(js.read_text())["hits"]
    assert [(h["case_id"], h["slice_index"]) for h in hits] == [(r[1], r[2]) for r in rows]
    for h in hits:  # S_sum = D_normal + D_abnormal
        assert h["distance"] == pytest.approx(h["distance_normal"] + h["distance_abnormal"])
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100

    # Slice-wise: slices may repeat volumes, never the query's own.
    rc, out, _ = _run(
        capsys, "query", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--case", case,
        "--slice", str(k), "--mode", "normal", "--distance", "hamming", "--top", "25", "--slice-wise",
        "--device", "cpu",
    )  # fmt: skip
    assert rc == 0
    rows = _table_rows(out)
    assert len(rows) == 25 and case not in {r[1] for r in rows}
    assert len({r[1] for r in rows}) < 25

    # Axial context: the search the library makes with the query's neighbouring slices.
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever

    rc, out, err = _run(
        capsys, "query", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--case", case,
        "--slice", str(k), "--mode", "sum", "--distance", "angular", "--context", "--json", str(js),
        "--device", "cpu",
    )  # fmt: skip
    assert rc == 0, err
    assert "volume-wise, axial context top 10" in out and json.loads(js.read_text())["axial_context"] is True
    retriever = Retriever.open(setup["db"], load_bundle(setup["bundle"], "cpu"))
    want = retriever.search(
        retriever.slice_from_database(case, k), mode="sum", distance="angular", context=True
    )
    assert [(r[1], r[2]) for r in _table_rows(out)] == [(h.case_id, h.slice_index) for h in want]


def test_query_lesion_filter(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """``--lesion without`` returns only slices whose lesion flag is False (every healthy case then
    appears), ``--lesion with`` only flagged ones (no healthy case); the JSON records the choice."""
    from fdn_core.codes.database import CodeDatabase

    db = CodeDatabase.open(setup["db"])
    flag = {
        (c, int(k)): bool(f)
        for c in db.cases
        for k, f in zip(db.slice_indices[db.case_rows(c)], db.has_abnormal[db.case_rows(c)], strict=True)
    }
    case = setup["tumour"][0]
    k = _largest_tumour_slice(setup["cohort"], case)
    js = setup["work"] / "lesion.json"
    common = ["query", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--case", case,
              "--slice", str(k), "--mode", "normal", "--top", "10", "--json", str(js),
              "--device", "cpu"]  # fmt: skip
    rc, out, err = _run(capsys, *common)
    assert rc == 0, err
    assert json.loads(js.read_text())["lesion"] == "any" and "references" not in out
    healthy = set(setup["healthy"]) & set(setup["refs"])
    assert healthy and not any(flag[key] for key in flag if key[0] in healthy)
    for lesion, keep in (("without", False), ("with", True)):
        rc, out, err = _run(capsys, *common, "--lesion", lesion)
        assert rc == 0, err
        assert f"volume-wise, references {lesion} lesion top 10" in out
        assert json.loads(js.read_text())["lesion"] == lesion
        rows = _table_rows(out)
        assert rows and all(flag[(r[1], r[2])] is keep for r in rows), rows
        cases = {r[1] for r in rows}
        assert case not in cases
        assert (healthy <= cases) if lesion == "without" else not (healthy & cases)
    with pytest.raises(SystemExit):
        main([*common, "--lesion", "healthy"])
    assert "invalid choice: 'healthy'" in capsys.readouterr().err


def test_query_new_case_as_folder_or_files(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    case = setup["held_out"][0]
    folder = setup["cohort"] / case
    k = _largest_tumour_slice(setup["cohort"], case)
    common = ["--db", str(setup["db"]), "--model", str(setup["bundle"]), "--slice", str(k), "--mode",
              "sum-normalized", "--distance", "angular", "--device", "cpu"]  # fmt: skip
    rc, out_folder, err = _run(
        capsys, "query", "--case", str(folder), *common, "--montage", str(folder.parent.parent / "n.png")
    )
    assert rc == 0, err
    assert "not in the database" in out_folder
    files = sorted(str(p) for p in folder.glob("*.nii.gz"))
    rc, out_files, err = _run(capsys, "query", "--case", *files, *common)
    assert rc == 0, err
    assert _table_rows(out_files) == _table_rows(out_folder)
    assert len(_table_rows(out_files)) == len(setup["refs"])

    rc, _, err = _run(capsys, "query", "--case", *files[:3], *common)
    assert rc == 2 and "missing modality" in err

    # the study as a hospital may send it: files named freely (KIND=PATH), T1ce as NRRD, T2 as MetaImage on a
    # grid of half the in-plane resolution: T2 is resampled onto the T1ce grid and the command says so
    import SimpleITK as sitk

    mixed = folder.parent.parent / "mixed_query"
    mixed.mkdir()
    by_kind = {m: next(p for p in files if p.endswith(f"_{m}.nii.gz")) for m in ("t1", "t1ce", "t2", "flair")}
    sitk.WriteImage(sitk.ReadImage(by_kind["t1ce"]), str(mixed / "T1C.nrrd"))
    sitk.WriteImage(sitk.ReadImage(by_kind["t2"])[::2, ::2, :], str(mixed / "T2.mha"))
    specs = [f"t1={by_kind['t1']}", f"t1ce={mixed / 'T1C.nrrd'}", f"t2={mixed / 'T2.mha'}"]
    rc, out_mixed, err = _run(capsys, "query", "--case", *specs, f"flair={by_kind['flair']}", *common)
    assert rc == 0, err
    assert "resampled onto the T1ce grid: t2\n" in out_mixed
    assert len(_table_rows(out_mixed)) == len(setup["refs"])


def test_composite_query_takes_abnormal_codes_from_another_slice(setup: dict) -> None:
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever

    retriever = Retriever.open(setup["db"], load_bundle(setup["bundle"], "cpu"))
    a, b = setup["refs"][0], setup["refs"][1]
    qa = retriever.slice_from_database(a, 20)
    qb = retriever.slice_from_database(b, 22)
    both = {a, b}
    for mode, source in (("normal", qa), ("abnormal", qb)):
        composite = retriever.search(
            qa, mode=mode, distance="euclidean", top=20, slice_wise=True, abnormal_from=qb
        )
        direct = retriever.search(
            source, mode=mode, distance="euclidean", top=20, slice_wise=True, exclude_cases=[a, b]
        )
        assert [(h.case_id, h.slice_index, h.distance) for h in composite] == [
            (h.case_id, h.slice_index, h.distance) for h in direct
        ]
        assert not both & {h.case_id for h in composite}


def test_composite_query_cli(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = setup["refs"][0], setup["refs"][1]
    png = setup["work"] / "composite.png"
    rc, out, err = _run(
        capsys, "query", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--case", a,
        "--slice", "20", "--abnormal-from", f"{b}:22", "--mode", "sum", "--montage", str(png),
        "--device", "cpu",
    )  # fmt: skip
    assert rc == 0, err
    assert f"abnormal codes from {b}:22" in out
    rows = _table_rows(out)
    assert rows and not {a, b} & {r[1] for r in rows}
    assert png.stat().st_size > 1000


def test_hamming_codes_are_fitted_on_first_use_when_build_skipped_them(
    setup: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever

    db = setup["work"] / "db_lazy"
    rc, _, err = _run(
        capsys, "index", "build", "--model", str(setup["bundle"]), "--data", str(setup["cohort"]),
        "--db", str(db), "--cases", *setup["refs"][:2], "--no-hamming", "--workers", "1", "--device", "cpu",
        "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    rc, out, _ = _run(capsys, "index", "info", str(db))
    assert rc == 0 and "none stored" in out
    from fdn_core.codes.database import CodeDatabase

    # Loading without prefetch threads gives exactly the codes of the prefetching build.
    small, full = CodeDatabase.open(db), CodeDatabase.open(setup["db"])
    for case in setup["refs"][:2]:
        for name in ("normal_codes", "abnormal_codes", "has_abnormal", "slice_indices"):
            np.testing.assert_array_equal(
                getattr(small, name)[small.case_rows(case)], getattr(full, name)[full.case_rows(case)]
            )
    retriever = Retriever.open(db, load_bundle(setup["bundle"], "cpu"))
    assert retriever.hamming is None
    hits = retriever.search(retriever.slice_from_database(setup["refs"][0], 20), distance="hamming", top=5)
    assert len(hits) == 1 and hits[0].case_id == setup["refs"][1]
    rc, out, _ = _run(capsys, "index", "info", str(db))
    assert rc == 0 and "hamming normal" in out


def test_query_refuses_a_database_of_another_model(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(
        capsys, "query", "--db", str(setup["db"]), "--model", str(setup["other"]), "--case", setup["refs"][0],
        "--slice", "20", "--device", "cpu",
    )  # fmt: skip
    assert rc == 2
    assert "was built with model" in err and "rebuild the database" in err
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import Retriever

    with pytest.raises(ModelMismatchError):
        Retriever.open(setup["db"], load_bundle(setup["other"], "cpu"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--case", "no_such_case", "--slice", "3"], "neither a case"),
        (["--case", "{ref}", "--slice", "400"], "has no slice 400"),
        (["--case", "{ref}", "--slice", "3", "--abnormal-from", "nocolon"], "is not CASE:SLICE"),
        (["--case", "{ref}", "--slice", "3", "--abnormal-from", "ghost:3"], "not in"),
        (["--case", "{ref}", "--slice", "3", "--top", "0"], "--top 0"),
    ],
)
def test_query_bad_input(
    setup: dict, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    extra = [e.replace("{ref}", setup["refs"][0]) for e in extra]
    rc, _, err = _run(
        capsys, "query", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--device", "cpu", *extra
    )
    assert rc == 2 and message in err, err


def test_case_input_helpers_reject_bad_input(tmp_path: Path) -> None:
    from fdn_core.data.readers import case_files_from_paths
    from fdn_core.labels import normalize_mode
    from fdn_core.retrieval import parse_case_slice

    assert parse_case_slice("BraTS19_2013_0_1:72") == ("BraTS19_2013_0_1", 72)
    assert parse_case_slice("a:b:3") == ("a:b", 3)
    for bad in ("72", ":3", "case:", "case:x", "case:-1"):
        with pytest.raises(DataError):
            parse_case_slice(bad)
    assert normalize_mode("sum-normalised") == "sum_normalized"
    assert normalize_mode("both") == "sum_normalized"  # the panel's name
    with pytest.raises(ConfigError, match="unknown search mode"):
        normalize_mode("similar")
    with pytest.raises(DataError, match="no such file"):
        case_files_from_paths([tmp_path / "missing"])
    odd = tmp_path / "scan.nii.gz"
    odd.write_bytes(b"")
    with pytest.raises(DataError, match="not a file named"):
        case_files_from_paths([odd, odd])


# ------------------------------------------------------------------------------------------ evaluation


def _labels_at_model_size(cohort: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    from fdn_core.data.preprocess import PreprocessConfig, volume_to_slices
    from fdn_core.data.readers import case_files_from_paths, load_case

    stack = volume_to_slices(load_case(case_files_from_paths([cohort / case_id])), PreprocessConfig(64))
    return stack.seg, stack.anat


def test_eval_retrieval_cli_table2_protocol(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from fdn_core.evaluation.metrics import multiclass_dice
    from fdn_core.labels import ABNORMAL_CLASSES, ANATOMY_CLASSES

    out_dir = setup["work"] / "eval"
    rc, out, err = _run(
        capsys, "eval-retrieval", "--db", str(setup["db"]), "--data", str(setup["cohort"]), "--model",
        str(setup["bundle"]), "--out", str(out_dir), "--top", "10", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    assert "| Method | S_normal | S_abnormal | S_sum | S_sum_normalized |" in out
    result = json.loads((out_dir / "retrieval_eval.json").read_text())
    assert (out_dir / "retrieval_eval.md").read_text().startswith("# Retrieval evaluation")
    # Queries: held-out cases with a tumour (the healthy held-out case is skipped and said so).
    assert [q["case_id"] for q in result["queries"]] == [setup["held_out"][0]]
    assert any(setup["held_out"][1] in n and "skipped" in n for n in result["notes"])
    summary = result["summary"]
    baselines = {"random", "level_prior", "pooled_pixels"}
    paper = {"euclidean", "angular", "hamming"}
    context = {f"{d}+context" for d in paper}  # each distance also with the query's axial context
    assert set(summary) == paper | context | {"oracle"} | baselines
    assert {result["methods"][m]["kind"] for m in context} == {"fdn"}
    assert result["methods"]["euclidean+context"]["label"] == "D_E + axial context"
    assert result["settings"]["axial_context"] == [[-6, 0.25], [-3, 0.5], [0, 1.0], [3, 0.5], [6, 0.25]]
    assert {m: result["methods"][m]["kind"] for m in baselines} == dict.fromkeys(baselines, "baseline")
    assert set(result["margins"]) == {"S_normal", "S_abnormal", "S_sum", "S_sum_normalized"}
    assert "FDN against the best trivial baseline" in out
    for method in summary.values():
        assert set(method) == {"S_normal", "S_abnormal", "S_sum", "S_sum_normalized"}
        for cell in method.values():
            assert 0.0 <= cell["mean_dice"] <= 1.0 and cell["ratio_to_oracle"] <= 1.0 + 1e-12
    assert all(summary["oracle"][c]["ratio_to_oracle"] == pytest.approx(1.0) for c in summary["oracle"])

    query = result["queries"][0]
    assert query["slice_index"] == _largest_tumour_slice(setup["cohort"], query["case_id"])
    assert query["k_effective"] == len(setup["refs"])
    q_seg, q_anat = _labels_at_model_size(setup["cohort"], query["case_id"])
    labels = {c: _labels_at_model_size(setup["cohort"], c) for c in setup["refs"]}
    k = query["slice_index"]
    for method, cols in query["results"].items():
        for col, res in cols.items():
            # Random baselines: every seeded draw is checked, and the reported Dice is their mean.
            draws = res.get("draws", [res])
            assert len(draws) == (10 if method in ("random", "level_prior") else 1), method
            assert draws[0]["retrieved"] == res["retrieved"]
            for draw in draws:
                got = draw["retrieved"]
                assert len(got) == len(setup["refs"]) and len({c for c, _ in got}) == len(got)  # volume-wise
                assert query["case_id"] not in {c for c, _ in got}
                # Recompute the reported score from the labels: anatomy Dice, tumour Dice, or their average.
                tum = [multiclass_dice(q_seg[k], labels[c][0][s], ABNORMAL_CLASSES) for c, s in got]
                ana = [multiclass_dice(q_anat[k], labels[c][1][s], ANATOMY_CLASSES) for c, s in got]
                expected = {
                    "S_normal": np.mean(ana),
                    "S_abnormal": np.mean(tum),
                    "S_sum": np.mean([(a + t) / 2 for a, t in zip(ana, tum)]),
                    "S_sum_normalized": np.mean([(a + t) / 2 for a, t in zip(ana, tum)]),
                }[col]
                assert draw["dice"] == pytest.approx(expected, abs=1e-12), (method, col)
            assert res["dice"] == pytest.approx(np.mean([d["dice"] for d in draws]), abs=1e-12)
            # The oracle is an upper bound for the same number of results.
            assert res["dice"] <= query["results"]["oracle"][col]["dice"] + 1e-12


def test_eval_retrieval_with_a_database_query_excludes_its_own_volume(setup: dict) -> None:
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval, markdown_report
    from fdn_core.model.bundle import load_bundle

    bundle = load_bundle(setup["bundle"], "cpu")
    query = setup["tumour"][0]
    assert query in setup["refs"]
    result = evaluate_retrieval(
        bundle, setup["db"], setup["cohort"], queries=[query], top=3, distances=["angular"]
    )
    assert result.queries[0].in_database
    assert result.k_effective == [3]
    for cols in result.retrieved.values():
        for col, per_query in cols.items():
            assert len(per_query[0]) == 3 and query not in {c for c, _ in per_query[0]}, col
    assert set(result.scores) == {
        "angular",
        "angular+context",
        "oracle",
        "random",
        "level_prior",
        "pooled_pixels",
    }
    assert "mAP@3" in markdown_report(result)
    only_fdn = evaluate_retrieval(
        bundle, setup["db"], setup["cohort"], queries=[query], top=3, distances=["angular"], baselines=[]
    )
    assert set(only_fdn.scores) == {"angular", "angular+context", "oracle"} and only_fdn.margins() == {}

    other = load_bundle(setup["other"], "cpu")
    with pytest.raises(ModelMismatchError):
        evaluate_retrieval(other, setup["db"], setup["cohort"], queries=[query])
    with pytest.raises(DataError, match="not found"):
        evaluate_retrieval(bundle, setup["db"], setup["cohort"], queries=["ghost"])
    with pytest.raises(DataError, match="no tumour"):
        evaluate_retrieval(bundle, setup["db"], setup["cohort"], queries=[setup["healthy"][0]])


def test_eval_retrieval_needs_held_out_cases(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    only_refs = setup["work"] / "refs_only"
    only_refs.mkdir()
    for case in setup["refs"]:
        (only_refs / case).symlink_to(setup["cohort"] / case, target_is_directory=True)
    rc, _, err = _run(
        capsys, "eval-retrieval", "--db", str(setup["db"]), "--data", str(only_refs), "--model",
        str(setup["bundle"]), "--out", str(setup["work"] / "eval2"), "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert rc == 2 and "no held-out query case" in err and "--queries" in err


def test_eval_retrieval_leave_one_out(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Every tumour volume of the database queries all the others; healthy ones are skipped and said so."""
    out_dir = setup["work"] / "eval_loo"
    rc, out, err = _run(
        capsys, "eval-retrieval", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--out",
        str(out_dir), "--leave-one-out", "--top", "2", "--draws", "3", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    result = json.loads((out_dir / "retrieval_eval.json").read_text())
    refs_with_tumour = [c for c in setup["refs"] if c in setup["tumour"]]
    assert sorted(q["case_id"] for q in result["queries"]) == sorted(refs_with_tumour)
    assert all(q["in_database"] and q["k_effective"] == 2 for q in result["queries"])
    assert result["settings"]["leave_one_out"] and result["settings"]["data"] is None
    healthy = [c for c in setup["refs"] if c in setup["healthy"]]
    assert any("skipped" in n and all(h in n for h in healthy) for n in result["notes"])
    for query in result["queries"]:
        for method, cols in query["results"].items():
            for col, res in cols.items():
                for draw in res.get("draws", [res]):
                    cases = [c for c, _ in draw["retrieved"]]
                    assert len(cases) == 2 and len(set(cases)) == 2, (method, col)
                    assert query["case_id"] not in cases, (method, col)
    assert result["summary"]["random"]["S_normal"]["draws"] == 3
    assert "leave-one-out" in out
    # --leave-one-out and --queries exclude each other; without --leave-one-out --data is needed.
    with pytest.raises(SystemExit):
        main(["eval-retrieval", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--out",
              str(out_dir), "--leave-one-out", "--queries", setup["refs"][0]])  # fmt: skip
    assert "not allowed with" in capsys.readouterr().err
    rc, _, err = _run(
        capsys, "eval-retrieval", "--db", str(setup["db"]), "--model", str(setup["bundle"]), "--out",
        str(out_dir), "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert rc == 2 and "--data is required" in err


def test_eval_retrieval_warns_when_cases_overlap_training(
    setup: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle (same weights as the database's) recording training cases: eval-retrieval names them."""
    from test_provenance import bundle_with_metadata

    trained_on = setup["refs"][:2]
    bundle = bundle_with_metadata(setup["work"] / "bundle_trained", {"train_cases": trained_on}, seed=0)
    out_dir = setup["work"] / "eval_overlap"
    rc, _, err = _run(
        capsys, "eval-retrieval", "--db", str(setup["db"]), "--model", str(bundle), "--out", str(out_dir),
        "--leave-one-out", "--top", "2", "--draws", "2", "--baselines", "--no-context", "--device", "cpu",
        "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    assert "WARNING: fdn eval-retrieval: 2 of" in err and "BY NAME ONLY" in err
    assert all(c in err for c in trained_on) and not any(c in err for c in setup["refs"][2:])
    notes = json.loads((out_dir / "retrieval_eval.json").read_text())["notes"]
    assert any("TRAINING cases" in n for n in notes)
    summary = json.loads((out_dir / "retrieval_eval.json").read_text())["summary"]
    assert set(summary) == {"euclidean", "angular", "hamming", "oracle"}  # --baselines with none: skipped


def test_other_embedding_methods_plug_into_the_same_table(setup: dict) -> None:
    """A new slice-embedding method (here: mean intensity per channel, cosine) is ranked, scored and reported
    like the FDN and the baselines, and a method breaking the protocol is refused."""
    from fdn_core.evaluation.ranking import RankingMethod, SliceEmbeddingMethod
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval, markdown_report
    from fdn_core.model.bundle import load_bundle

    class MeanIntensity(SliceEmbeddingMethod):
        key, label, metric = "mean_intensity", "Mean intensity (cosine)", "cosine"

        def embed(self, images: np.ndarray) -> np.ndarray:
            return images.mean(axis=(2, 3)) + 10.0

    bundle = load_bundle(setup["bundle"], "cpu")
    result = evaluate_retrieval(
        bundle, setup["db"], leave_one_out=True, top=2, distances=["euclidean"], baselines=["pooled_pixels"],
        methods=[MeanIntensity()], context=False,
    )  # fmt: skip
    assert list(result.scores) == ["euclidean", "pooled_pixels", "mean_intensity", "oracle"]
    assert result.info("mean_intensity").kind == "embedding"
    table = markdown_report(result).split("## Mean Dice")[1]
    assert (
        table.index("| D_E")
        < table.index("| Mean intensity")
        < table.index("| Pooled")
        < table.index("| Oracle")
    )
    assert set(result.margins()) and all(
        m["best_baseline"] == "pooled_pixels" for m in result.margins().values()
    )
    cols = result.retrieved["mean_intensity"]
    assert cols["S_normal"] == cols["S_abnormal"] == cols["S_sum"]  # one ranking, scored three ways

    class Cheater(RankingMethod):
        key = "cheater"

        def rank(self, ctx, similarity, draw):  # returns the query's own volume first
            return [np.asarray([ctx.volume_starts[o]]) for o in ctx.own_volume]

    with pytest.raises(DataError, match="never the query's own volume"):
        evaluate_retrieval(bundle, setup["db"], leave_one_out=True, top=2, baselines=[], methods=[Cheater()])
