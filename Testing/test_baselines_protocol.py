"""The baselines end to end on the tiny cohort: ``fdn train-baseline`` (registration, tiny configs, logs,
bundles with provenance), one protocol for every method (``evaluate_retrieval`` and ``fdn eval-retrieval
--embeddings``: FDN distances, SimSiam, Y-Net, trivial baselines and the oracle, scored three ways, with the
relevance metrics), ``fdn query --explain``, and the Slicer "Explain" overlay on real MRML."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fdn_core.errors import ConfigError

pytestmark = pytest.mark.slow  # trains both baselines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both baselines trained for 3 steps with the tiny configs through the command's own function."""
    from fdn_training.baselines.command import register

    parser = argparse.ArgumentParser(prog="fdn")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("baselines")
    runs = {}
    for method in ("simsiam", "ynet"):
        args = parser.parse_args(
            ["train-baseline", method, "--config", "tiny", "--data", str(tiny_cohort), "--out",
             str(out / method), "--cache", str(out / "cache"), "--threads", "1", "--device", "cpu",
             "--no-progress"]
        )  # fmt: skip
        assert args.func(args) == 0
        runs[method] = out / method
    return runs


@pytest.fixture(scope="module")
def database(tiny_cohort: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fdn_core.model.bundle import load_bundle
    from fdn_core.retrieval import index_cohort

    db = tmp_path_factory.mktemp("bl_db") / "db"
    index_cohort(load_bundle(tiny_bundle, "cpu"), tiny_cohort, db, workers=1)
    return db


def test_train_baseline_is_registered_in_the_training_distribution() -> None:
    text = (ROOT / "training" / "pyproject.toml").read_text()
    assert 'train-baseline = "fdn_training.baselines.command:register"' in text
    from fdn_training.baselines.config import load_train_config

    for method in ("simsiam", "ynet"):
        for name in ("cpu", "tiny"):
            cfg = load_train_config(method, name)
            assert cfg.data.image_size == cfg.model.image_size == 64
    with pytest.raises(ConfigError, match="known"):
        load_train_config("simsiam", "huge")


def test_training_runs_write_logs_and_bundles(trained: dict[str, Path], tiny_cohort: Path) -> None:
    from fdn_core.baselines.bundle import load_baseline

    for method, run in trained.items():
        rows = list(csv.DictReader((run / "train_log.csv").open()))
        assert [int(r["step"]) for r in rows] == [1, 2, 3]
        assert {"elapsed_s", "slices_seen", "lr", "loss"} <= set(rows[0])
        val = list(csv.DictReader((run / "val_log.csv").open()))
        assert [int(r["step"]) for r in val] == [2, 3] and "val_mAP@10" in val[0]
        bundle = load_baseline(run / "bundle", "cpu")
        meta = bundle.metadata
        assert bundle.kind == method
        assert meta["train_command"].startswith(f"fdn train-baseline {method} --config tiny")
        assert meta["budget"]["steps"] == 3 and meta["budget"]["slices_seen"] == 24
        cohort_seed = json.loads((tiny_cohort / "cohort.json").read_text())["seed"]
        assert meta["train_cohort_seed"] == cohort_seed
        assert len(meta["train_case_fingerprints"]) == len(meta["train_cases"]) == 5
        assert (run / "config.yaml").is_file() and (run / "last" / "baseline.json").is_file()
    rows = list(csv.DictReader((trained["ynet"] / "train_log.csv").open()))
    assert {"circle", "seg_ce", "cls_bce", "quant"} <= set(rows[0])


def test_one_protocol_for_every_method(trained: dict[str, Path], database: Path, tiny_bundle: Path) -> None:
    from fdn_core.baselines.methods import load_embedding_methods
    from fdn_core.evaluation.retrieval_eval import RELEVANCES, evaluate_retrieval, markdown_report
    from fdn_core.model.bundle import load_bundle

    bundle = load_bundle(tiny_bundle, "cpu")
    methods = load_embedding_methods(
        [str(trained["simsiam"] / "bundle"), str(trained["ynet"] / "bundle")], "cpu"
    )
    result = evaluate_retrieval(
        bundle, database, leave_one_out=True, top=3, draws=2, methods=methods, workers=1
    )
    keys = list(result.scores)
    assert keys == ["euclidean", "angular", "hamming", "euclidean+context", "angular+context",
                    "hamming+context", "random", "level_prior", "pooled_pixels", "simsiam", "ynet",
                    "oracle"]  # fmt: skip
    for key in ("simsiam", "ynet"):
        assert result.info(key).kind == "embedding"
        cols = result.retrieved[key]
        assert cols["S_normal"] == cols["S_abnormal"] == cols["S_sum"]  # one ranking, scored three ways
        for col in ("S_normal", "S_abnormal", "S_sum"):
            assert len(result.scores[key][col]) == len(result.queries)
    summary = result.summary()
    k = result.top
    for rel in RELEVANCES:
        for m in keys:
            cell = summary[m]["S_sum"]
            assert f"mAP@{k}[{rel}]" in cell and f"P@{k}[{rel}]" in cell and f"mP@1..{k}[{rel}]" in cell
    # the oracle's level relevance: mP / P in [0, 1]
    assert 0 <= summary["oracle"]["S_normal"][f"P@{k}[level]"] <= 1
    text = markdown_report(result)
    assert "| SimSiam (cosine" in text and "| Y-Net hash (Hamming" in text
    assert "### Relevance `lesion_classes`" in text and "mP@1..3" in text


def test_eval_retrieval_command_with_embeddings(
    trained: dict[str, Path], database: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    from fdn_core.cli import main

    out = tmp_path / "eval"
    rc = main(
        ["eval-retrieval", "--db", str(database), "--model", str(tiny_bundle), "--leave-one-out",
         "--top", "2", "--out", str(out), "--device", "cpu", "--no-progress", "--baselines", "random",
         "--draws", "2",
         "--embeddings", str(trained["simsiam"] / "bundle"), f"hash={trained['ynet'] / 'bundle'}"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((out / "retrieval_eval.json").read_text())
    paper = {"euclidean", "angular", "hamming"}
    context = {f"{d}+context" for d in paper}
    assert set(data["summary"]) == paper | context | {"random", "simsiam", "hash", "oracle"}
    assert data["settings"]["other_methods"] == ["simsiam", "hash"]
    assert data["settings"]["level_tolerance"] == 0.05
    first = data["queries"][0]["results"]["hash"]["S_abnormal"]
    assert set(first["relevance"]) == {"lesion", "lesion_classes", "level", "classes_and_level"}


def test_query_explain_writes_a_figure(
    trained: dict[str, Path], database: Path, tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    from fdn_core.cli import main
    from fdn_core.codes.database import CodeDatabase

    db = CodeDatabase.open(database)
    case = db.cases[0]
    png = tmp_path / "explain.png"
    rc = main(
        ["query", "--db", str(database), "--model", str(tiny_bundle), "--case", case, "--slice", "20",
         "--mode", "sum", "--top", "2", "--device", "cpu", "--explain", str(png), "--explain-masks", "16",
         "--explain-with", str(trained["ynet"] / "bundle")]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert png.is_file() and png.stat().st_size > 1000
    assert (
        "explained FDN/normal" in text
        and "explained FDN/abnormal" in text
        and "explained Y-Net/embedding" in text
    )


def test_slicer_explain_overlay_on_real_mrml(database: Path, tiny_bundle: Path, tiny_cohort: Path) -> None:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import CaseFiles, find_cases
    from fdn_core.model.bundle import load_bundle
    from FDNRetrievalLib import explain, scenario
    from FDNRetrievalLib import scene as sc

    ctx = scenario.make_scene_context()
    files = find_cases(tiny_cohort)[0]
    study = sc.read_study(scenario.load_case_nodes(ctx, files))
    bundle = load_bundle(tiny_bundle, "cpu")
    db = CodeDatabase.open(database)
    other = next(c for c in db.cases if c != files.case_id)
    image = explain.reference_slice(bundle, CaseFiles.from_database(db, other), 18)
    expl = explain.compute_explanation(bundle, study, 20, "both", (other, 18, image), num_masks=16)
    assert set(expl.maps) == {"normal", "abnormal"}
    assert expl.maps["normal"].shape == study.shape[:2] and expl.against == (other, 18)
    assert explain.codes_for_mode("abnormal") == ("abnormal",)
    nodes = explain.add_explanation_overlay(ctx.scene, study, expl, "study", [sc.QUERY_VIEW])
    assert len(nodes) == 2
    for node in nodes:
        assert node.GetAttribute(sc.ROLE_ATTRIBUTE) == explain.EXPLAIN_ROLE
        voxels = sc.node_voxels(node)  # (I, J, K) on the T1ce node's grid
        assert voxels.shape == tuple(study.reference_shape)
        canonical = np.zeros(study.shape, np.float32)
        canonical[..., 20] = np.clip(expl.maps[node.GetAttribute("FDNRetrieval.ExplainCode")], 0, None)
        assert np.allclose(voxels, study.to_reference_grid(canonical))
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == explain.EXPLAIN_COLOR_NODE and display.GetApplyThreshold()
    composite = sc.composite_node(ctx.scene, sc.QUERY_VIEW)
    assert composite.GetForegroundVolumeID() == nodes[-1].GetID()
