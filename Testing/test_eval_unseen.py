"""``bench/eval_unseen.py`` on a tiny cohort with the tiny untrained bundle: tables, targets, reuse, and the
refusal of cohorts the model was trained on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = 77


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_unseen", ROOT / "bench" / "eval_unseen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_unseen"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _script()


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--cases", "5", "--seeds", str(SEED), "--shape", "64", "64", "40",
            "--out", str(out), "--workers", "1", "--top", "3", "--draws", "2", "--device", "cpu",
            "--no-progress", "--explain-queries", "0", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def unseen_run(script: ModuleType, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("unseen")
    import contextlib
    import io

    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = script.main(_argv(tiny_bundle, out))
    return {"rc": rc, "out": out, "stdout": buf_out.getvalue(), "stderr": buf_err.getvalue()}


def test_unseen_cohort_table_and_targets(unseen_run: dict) -> None:
    assert unseen_run["rc"] == 0, unseen_run["stderr"]
    out, text = unseen_run["out"], unseen_run["stdout"]
    assert (out / f"cohort_{SEED}" / "cohort.json").is_file() and (
        out / f"db_{SEED}" / "manifest.json"
    ).is_file()
    result = json.loads((out / f"eval_{SEED}" / "retrieval_eval.json").read_text())
    assert result["settings"]["leave_one_out"]
    assert any(f"phantom seed {SEED}" in n for n in result["notes"])
    assert f"## Cohort seed {SEED}: 5 volumes" in text
    for label in ["D_E", "D_A", "D_H", "Random (random slice", "Level prior", "Pooled pixels", "Oracle"]:
        assert f"| {label}" in text, label
    assert text.count("the best trivial baseline") == 4  # one margin line per similarity
    report = json.loads((out / "eval_unseen.json").read_text())
    targets = report["cohorts"][str(SEED)]["targets"]
    assert [(t["similarity"], t["requirement"]) for t in targets] == [
        ("S_normal", "FDN >= 0.90"),
        ("S_normal", "FDN >= level prior + 0.10"),
        ("S_abnormal", "FDN >= 0.76"),
        ("S_abnormal", "FDN >= 2 x best trivial baseline"),
        ("S_sum", "FDN >= 0.85"),
    ]
    summary = report["cohorts"][str(SEED)]["summary"]
    level = summary["level_prior"]["S_normal"]["ratio_to_oracle"]
    assert targets[1]["threshold"] == pytest.approx(level + 0.10)
    for t in targets:
        assert t["met"] == (t["value"] >= t["threshold"] - 1e-12)
        verdict = "**met**" if t["met"] else "**MISSED**"
        row = f"| {t['similarity']} | {t['requirement']} | {t['value']:.3f} | >= {t['threshold']:.3f} |"
        assert f"{row} {verdict}" in text
    assert (out / "eval_unseen.md").read_text().startswith("# Retrieval on unseen phantom cohorts")
    met = sum(t["met"] for t in targets)
    assert "## Targets of every cohort" in text and f"{met} of 5 targets met." in text
    assert f"| S_sum | FDN >= 0.85 | {targets[4]['value']:.3f} (needs 0.850)" in text
    # The untrained bundle records no training seed: said loudly.
    assert "WARNING: the training cohort's seed is unknown" in unseen_run["stderr"]


def test_rerun_reuses_the_cohort_and_database(
    script: ModuleType, tiny_bundle: Path, unseen_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    out = unseen_run["out"]
    before = (out / f"db_{SEED}" / "manifest.json").stat().st_mtime_ns
    assert script.main(_argv(tiny_bundle, out, "--strict")) in (0, 1)  # untrained: targets may be missed
    text = capsys.readouterr().out
    assert f"reusing {out / f'cohort_{SEED}'}" in text and f"reusing {out / f'db_{SEED}'}" in text
    assert (out / f"db_{SEED}" / "manifest.json").stat().st_mtime_ns == before


def test_refuses_the_training_seed_and_training_cases(
    script: ModuleType,
    tiny_bundle: Path,
    unseen_run: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from test_provenance import bundle_with_metadata

    from fdn_core.data.provenance import case_fingerprint, cases_of

    recorded = bundle_with_metadata(tmp_path / "seeded", {"train_cohort_seed": SEED})
    capsys.readouterr()
    assert script.main(_argv(recorded, tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert f"seed(s) [{SEED}] are the training cohort's seed" in err and "train_cohort_seed" in err
    assert not (tmp_path / "a" / f"cohort_{SEED}").exists()
    assert script.main(_argv(tiny_bundle, tmp_path / "b", "--training-seed", "3", str(SEED))) == 2
    assert "--training-seed" in capsys.readouterr().err
    # A bundle whose training fingerprints include a case of this cohort: refused after generation.
    case = cases_of(unseen_run["out"] / f"cohort_{SEED}")[2]
    fingerprinted = bundle_with_metadata(
        tmp_path / "fp", {"train_case_fingerprints": [case_fingerprint(case)]}
    )
    assert script.main(_argv(fingerprinted, unseen_run["out"])) == 2
    err = capsys.readouterr().err
    assert "same image files as training cases" in err and case.case_id in err


def test_known_training_seed_of_the_shipped_model(script: ModuleType) -> None:
    from fdn_core.demo import DEFAULT_MODEL_DIR
    from fdn_core.model.bundle import load_bundle

    seeds, source = script.training_seeds(load_bundle(DEFAULT_MODEL_DIR, "cpu"), None)
    assert seeds == [11] and "metadata" in source  # fdn phantom --seed 11 (its README)


def test_targets_on_hand_made_figures(script: ModuleType) -> None:
    from test_retrieval_eval import _hand_evaluation

    targets = {(t.similarity, t.requirement): t for t in script.evaluate_targets(_hand_evaluation())}
    normal = targets[("S_normal", "FDN >= 0.90")]
    assert normal.value == pytest.approx(0.8) and not normal.met
    prior = targets[("S_normal", "FDN >= level prior + 0.10")]
    assert prior.threshold == pytest.approx(0.8) and prior.met  # 0.8 >= 0.7 + 0.1
    twice = targets[("S_abnormal", "FDN >= 2 x best trivial baseline")]
    assert twice.value == pytest.approx(0.375) and twice.threshold == pytest.approx(0.75) and not twice.met
    missing = targets[("S_sum", "FDN >= 0.85")]
    assert missing.value is None and not missing.met  # no S_sum column: never "met"


def test_trained_baselines_joint_table_figures_and_explanations(
    script: ModuleType,
    tiny_bundle: Path,
    unseen_run: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With --embeddings the trained baselines join every table; the joint table, one figure per similarity,
    the relevance table, the verdict lines and the RELAX mass shares are written; a baseline trained on the
    evaluated seed is refused."""
    import torch

    from fdn_core.baselines.backbone import BackboneConfig
    from fdn_core.baselines.bundle import save_baseline
    from fdn_core.baselines.simsiam import SimSiam, SimSiamConfig
    from fdn_core.baselines.ynet import YNet, YNetConfig
    from fdn_core.data.preprocess import PreprocessConfig

    torch.manual_seed(0)
    small = BackboneConfig(widths=(8, 8, 16, 16))
    sim = save_baseline(
        SimSiam(SimSiamConfig(backbone=small, projector_dim=16, predictor_hidden=4)),
        PreprocessConfig(64),
        tmp_path / "simsiam",
        {"train_cohort_seed": 11},
    )
    ynet = save_baseline(
        YNet(YNetConfig(backbone=small, fpn_channels=8, rmac_channels=8, hash_bits=16)),
        PreprocessConfig(64),
        tmp_path / "ynet",
        {"train_cohort_seed": 11},
    )
    out = unseen_run["out"]
    argv = _argv(tiny_bundle, out, "--embeddings", str(sim), str(ynet))
    argv[argv.index("--explain-queries") + 1] = "2"
    argv += ["--explain-masks", "8"]
    capsys.readouterr()
    assert script.main(argv) == 0
    text = capsys.readouterr().out
    for label in ("| SimSiam (cosine, 16 features)", "| Y-Net hash (Hamming, 16 bits)"):
        assert label in text
    assert "## Joint table: ratio of mean Dice to the oracle's" in text
    assert "S_normal [level] | S_abnormal [lesion_classes] | S_sum [classes_and_level]" in text
    assert "FDN against the trained baselines" in text and "Where the FDN wins and where it does not" in text
    assert "FDN abnormal-code map: mass inside the tumour" in text
    assert "chance: the tumour's share of the brain area" in text
    for col in ("S_normal", "S_abnormal", "S_sum"):
        assert (out / f"joint_{col}.png").is_file()
    assert (out / "explanation.png").is_file()
    report = json.loads((out / "eval_unseen.json").read_text())
    assert set(report["baselines"]) == {"simsiam", "ynet"}
    shares = report["cohorts"][str(SEED)]["explanations"]
    assert shares["num_queries"] == 2 and set(shares["summary"]) == {"FDN", "SimSiam", "Y-Net"}
    # a baseline trained on the evaluated cohort's seed is refused
    seen = save_baseline(
        SimSiam(SimSiamConfig(backbone=small, projector_dim=16, predictor_hidden=4)),
        PreprocessConfig(64),
        tmp_path / "seen",
        {"train_cohort_seed": SEED},
    )
    assert script.main(_argv(tiny_bundle, out, "--embeddings", str(seen))) == 2
    assert "training cohort of the SimSiam bundle" in capsys.readouterr().err


def test_verdict_ties_go_to_the_method_listed_first() -> None:
    """A distance and its axial-context variant that rank alike (S_abnormal: the context changes only the
    normal term) are reported under the plain distance."""
    from fdn_core.report.comparison import verdict_lines

    def cell(r: float) -> dict:
        return {"ratio_to_oracle": r}

    summary = {
        "learned": {"S_abnormal": cell(0.7), "S_normal": cell(0.9)},
        "learned+context": {"S_abnormal": cell(0.7), "S_normal": cell(0.92)},
        "ynet": {"S_abnormal": cell(0.3), "S_normal": cell(0.6)},
    }
    labels = {"learned": "D_L", "learned+context": "D_L + axial context", "ynet": "Y-Net"}
    lines = verdict_lines({"seed 1": summary}, ["learned", "learned+context"], ["ynet"], labels)
    assert any(line.startswith("S_abnormal: seed 1: FDN wins (D_L 0.70") for line in lines), lines
    assert any(line.startswith("S_normal: seed 1: FDN wins (D_L + axial context 0.92") for line in lines), (
        lines
    )
