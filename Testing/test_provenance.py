"""Case fingerprints and the training-overlap warnings of ``fdn eval-model``, ``fdn index build|add`` (and
``fdn eval-retrieval``, in test_retrieval_cli)."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from fdn_core.cli import main


def bundle_with_metadata(out: Path, metadata: dict[str, Any], seed: int = 0) -> Path:
    """A tiny untrained FDN (the weights of ``save_untrained_bundle(seed)``, so the same fingerprint) saved
    with the given bundle metadata (e.g. ``train_cases`` or ``train_case_fingerprints``)."""
    import torch

    from fdn_core.data.preprocess import PreprocessConfig
    from fdn_core.model.bundle import TINY_MODEL, save_bundle
    from fdn_core.model.fdn import FDN, FDNConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FDN(FDNConfig(**TINY_MODEL))
    return save_bundle(model, PreprocessConfig(image_size=TINY_MODEL["image_size"]), out, metadata)


@pytest.fixture(scope="module")
def cases(tiny_cohort: Path) -> list:
    from fdn_core.data.readers import find_cases

    return list(find_cases(tiny_cohort))


def test_case_fingerprint_is_the_content_of_the_four_images(cases: list, tmp_path: Path) -> None:
    from fdn_core.data.provenance import case_fingerprint
    from fdn_core.errors import DataError

    first = cases[0]
    expected = case_fingerprint(first)
    assert len(expected) == 64 and case_fingerprint(dataclasses.replace(first)) == expected
    assert case_fingerprint(cases[1]) != expected
    # The id and the labels do not matter, the image bytes and their order do.
    renamed = dataclasses.replace(first, case_id="someone_else", seg=None, anat=None)
    assert case_fingerprint(renamed) == expected
    swapped = dict(first.images)
    swapped["t1"], swapped["t2"] = swapped["t2"], swapped["t1"]
    assert case_fingerprint(dataclasses.replace(first, images=swapped)) != expected
    copy = tmp_path / "t1.nii.gz"
    shutil.copy(first.images["t1"], copy)
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert case_fingerprint(dataclasses.replace(first, images={**first.images, "t1": copy})) != expected
    with pytest.raises(DataError, match="cannot read"):
        case_fingerprint(dataclasses.replace(first, images={**first.images, "t1": tmp_path / "gone.nii.gz"}))
    with pytest.raises(DataError, match="four"):
        case_fingerprint(dataclasses.replace(first, images={"t1": first.images["t1"]}))


def test_training_overlap_by_fingerprint_ignores_ids(cases: list) -> None:
    from fdn_core.data.provenance import case_fingerprint, overlap_message, training_overlap

    a, b = cases[0], cases[1]
    meta = {"train_case_fingerprints": [case_fingerprint(a)], "train_cases": [b.case_id]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fingerprints recorded: no by-name warning
        assert training_overlap(meta, cases) == [a.case_id]
        # Same images under another id: still the training case. Same id, other images: not.
        renamed = dataclasses.replace(a, case_id="phantom_9999")
        impostor = dataclasses.replace(b, case_id=a.case_id)
        assert training_overlap(meta, [renamed, impostor]) == ["phantom_9999"]
    # The mapping form names the training case.
    assert training_overlap({"train_case_fingerprints": {"x": case_fingerprint(b)}}, cases) == [b.case_id]
    message = overlap_message(meta, cases, "fdn index build")
    assert message.startswith("WARNING: fdn index build: 1 of") and "by image fingerprint" in message
    assert a.case_id in message and "BY NAME" not in message
    assert overlap_message(meta, cases[1:], "fdn index build") is None


def test_training_overlap_falls_back_to_names_and_says_so(cases: list) -> None:
    from fdn_core.data.provenance import ProvenanceWarning, overlap_message, training_overlap

    meta = {"train_cases": [cases[2].case_id, "phantom_7777"]}
    with pytest.warns(ProvenanceWarning, match="by name only"):
        assert training_overlap(meta, cases) == [cases[2].case_id]
    message = overlap_message(meta, cases, "fdn eval-model")
    assert "WARNING" in message and "BY NAME ONLY" in message and cases[2].case_id in message
    note = overlap_message({"train_cases": ["other"]}, cases, "fdn eval-model")
    assert note.startswith("note:") and "by name only" in note
    # Nothing recorded: said for a trained bundle, silent for an untrained one.
    assert "not checked" in overlap_message({"step": 3}, cases, "x")
    assert overlap_message({"trained": False}, cases, "x") is None
    assert training_overlap({}, cases) == []


def test_index_build_and_add_warn_about_training_cases(
    tiny_cohort: Path, cases: list, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdn_core.data.provenance import case_fingerprint

    trained = cases[0]
    bundle = bundle_with_metadata(
        tmp_path / "bundle", {"train_case_fingerprints": {trained.case_id: case_fingerprint(trained)}}
    )
    ids = [c.case_id for c in cases]
    common = ["--model", str(bundle), "--data", str(tiny_cohort), "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    rc = main(["index", "build", *common, "--db", str(tmp_path / "db"), "--cases", ids[1], "--no-hamming"])
    assert rc == 0 and "WARNING" not in capsys.readouterr().err
    rc = main(["index", "add", *common, "--db", str(tmp_path / "db"), "--cases", ids[0]])
    err = capsys.readouterr().err
    assert rc == 0 and "WARNING: fdn index add: 1 of 1 case(s)" in err and ids[0] in err
    assert "by image fingerprint" in err
    rc = main(["index", "build", *common, "--db", str(tmp_path / "db2"), "--cases", *ids[:2], "--no-hamming"])
    err = capsys.readouterr().err
    assert rc == 0 and "WARNING: fdn index build: 1 of 2 case(s)" in err and ids[0] in err
    assert ids[1] not in err


def test_eval_model_warns_about_training_cases(
    tiny_cohort: Path, cases: list, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import fdn_core.evaluation.model_eval as model_eval

    seen: dict[str, Any] = {}

    def fake_evaluate(bundle: Any, data: Any, cases: Any, **kwargs: Any) -> dict:
        seen["cases"] = cases
        return {}

    monkeypatch.setattr(model_eval, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(model_eval, "markdown_report", lambda results: "")
    monkeypatch.setattr(model_eval, "write_model_eval", lambda results, out: (out / "a", out / "b"))
    ids = [c.case_id for c in cases]
    bundle = bundle_with_metadata(tmp_path / "bundle", {"train_cases": ids[:2], "val_cases": ids[2:3]})
    common = ["eval-model", "--model", str(bundle), "--data", str(tiny_cohort), "--out", str(tmp_path)]
    capsys.readouterr()
    assert main([*common, "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: fdn eval-model: 2 of {len(ids)} case(s)" in err and "BY NAME ONLY" in err
    assert ids[0] in err and ids[1] in err and ids[2] not in err
    # The held-out (validation) cases do not overlap: only the by-name note.
    assert main([*common, "--held-out", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert seen["cases"] == ids[2:3] and "WARNING" not in err and "by name only" in err


def test_training_cohort_seeds_from_either_record() -> None:
    from fdn_core.data.provenance import TRAIN_COHORT_SEED_KEY, training_cohort_seeds

    assert training_cohort_seeds({TRAIN_COHORT_SEED_KEY: 11}) == [11]
    assert training_cohort_seeds({TRAIN_COHORT_SEED_KEY: [3, 4]}) == [3, 4]
    # FDN bundles exported before the key copy cohort.json's fields under "cohort".
    assert training_cohort_seeds({"cohort": {"seed": 11, "n_cases": 120}}) == [11]
    assert training_cohort_seeds({"cohort": {"n_cases": 120}}) == []
    assert training_cohort_seeds({}) == []
