"""Model evaluation (paper 4.4.1-4.4.4): metrics on hand-made cases, then a bundle on a tiny cohort."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fdn_core.evaluation.model_eval import (
    LeakinessSettings,
    code_usage,
    codebook_compactness,
    evaluate_model,
    leakiness,
    markdown_report,
    reconstruction_errors,
    write_model_eval,
)
from fdn_core.labels import MIN_LESION_ML


# ------------------------------------------------------------------------------------------- metrics
def test_reconstruction_errors_hand_computed() -> None:
    images = np.zeros((1, 2, 2, 2), np.float32)
    recon_full = np.ones_like(images)
    recon_normal = np.full_like(images, 2.0)
    seg = np.array([[[0, 0], [0, 3]]], np.uint8)  # one abnormal pixel -> 3 normal pixels x 2 channels
    e = reconstruction_errors(images, recon_full, recon_normal, seg)
    assert e["full_sum"][0] == pytest.approx(8.0)
    assert e["full_mean"][0] == pytest.approx(1.0)
    assert e["normal_sum"][0] == pytest.approx(2.0 * 6)
    assert e["normal_mean"][0] == pytest.approx(2.0)
    all_abnormal = reconstruction_errors(images, recon_full, recon_normal, np.ones((1, 2, 2), np.uint8))
    assert all_abnormal["normal_sum"][0] == 0.0 and math.isnan(all_abnormal["normal_mean"][0])
    with pytest.raises(ValueError, match="seg shape"):
        reconstruction_errors(images, recon_full, recon_normal, np.zeros((1, 3, 3), np.uint8))


def test_codebook_compactness_threshold() -> None:
    book = np.array([[0.0, 0.0], [1e-6, 0.0], [1.0, 0.0], [0.0, 2e-5]])
    assert codebook_compactness(book) == pytest.approx(0.5)  # two of four below 1e-5
    assert codebook_compactness(book, threshold=1e-4) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="codebook"):
        codebook_compactness(np.zeros(5))


def test_code_usage_and_perplexity() -> None:
    u = code_usage(np.array([2, 2, 0, 0]))
    assert u == {"used": 2, "used_fraction": 0.5, "perplexity": pytest.approx(2.0)}
    assert code_usage(np.array([5, 0, 0]))["perplexity"] == pytest.approx(1.0)
    assert code_usage(np.ones(8))["perplexity"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="empty"):
        code_usage(np.zeros(3))


def _blob_samples(leaky: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """8 cases x 12 slices of noise (4 x 16 x 16); diseased slices get a bright blob when ``leaky``."""
    rng = np.random.default_rng(seed)
    samples, labels, cases = [], [], []
    for c in range(8):
        for k in range(12):
            x = rng.normal(0, 1, (4, 16, 16)).astype(np.float32)
            sick = c % 4 != 0 and k % 2 == 0  # cases 0 and 4 are healthy
            if sick and leaky:
                r, q = rng.integers(2, 11, size=2)
                x[:, r : r + 4, q : q + 4] += 3.0
            samples.append(x)
            labels.append(sick)
            cases.append(f"case{c}")
    return np.stack(samples), np.array(labels), cases


def test_leakiness_classifier_detects_leaks_and_not_noise() -> None:
    settings = LeakinessSettings(input_size=16, epochs=8, batch_size=8, width=16, lr=3e-3, seed=0)
    leaky = leakiness(*_blob_samples(leaky=True), settings=settings)
    clean = leakiness(*_blob_samples(leaky=False), settings=settings)
    assert leaky["ppv"] > 0.9 and leaky["auc"] > 0.9
    assert 0.2 < clean["auc"] < 0.8  # nothing to learn: near chance
    if math.isnan(clean["ppv"]):
        assert "no slice" in clean["note"]
    # Case-wise and balanced: both splits have equal classes, and no case is on both sides.
    assert leaky["n_train"] % 2 == 0 and leaky["n_test"] % 2 == 0
    assert leaky["train_cases"] + leaky["test_cases"] <= 8
    quick = LeakinessSettings(input_size=16, epochs=1, batch_size=16, width=8, seed=3)
    first, second = (leakiness(*_blob_samples(leaky=True), settings=quick) for _ in range(2))
    assert repr(first) == repr(second)  # deterministic (repr: NaN compares equal to itself)


def test_leakiness_trains_on_one_thread_whatever_the_process_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The classifier's result must not depend on the machine's thread count (float sums in several threads
    change with it): it trains and scores on one torch thread, and the caller's setting is restored."""
    import torch

    import fdn_core.evaluation.model_eval as me

    seen: list[int] = []
    fit = me._fit_classifier

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return fit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(me, "_fit_classifier", recording)
    quick = LeakinessSettings(input_size=16, epochs=2, batch_size=16, width=8, seed=3)
    before = torch.get_num_threads()
    results = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        try:
            results.append(repr(leakiness(*_blob_samples(leaky=True), settings=quick)))
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(before)
    assert seen == [1, 1] and results[0] == results[1]


def test_leakiness_trained_on_training_cases_and_tested_on_held_out_ones() -> None:
    settings = LeakinessSettings(input_size=16, epochs=10, batch_size=8, width=16, lr=3e-3, patience=3)
    train_cases = [f"case{c}" for c in range(6)]  # cases 6 and 7 are held out
    leaky = leakiness(*_blob_samples(leaky=True), settings=settings, train_cases=train_cases)
    clean = leakiness(*_blob_samples(leaky=False), settings=settings, train_cases=train_cases)
    assert leaky["protocol"].startswith("trained on the FDN's training cases")
    assert leaky["test_cases"] == 2 and leaky["train_cases"] + leaky["val_cases"] <= 6
    assert leaky["val_cases"] >= 1 and leaky["early_stopping"]  # early stopping on training cases
    assert 1 <= leaky["best_epoch"] <= leaky["epochs_run"] <= 10
    assert leaky["ppv"] > 0.9 and leaky["auc"] > 0.9  # a planted leak is found
    assert 0.2 < clean["auc"] < 0.8  # noise is not
    # Test slices come from the held-out cases only: 2 cases x 6 diseased (balanced with 6 healthy).
    assert leaky["n_test"] == 24
    again = leakiness(*_blob_samples(leaky=True), settings=settings, train_cases=train_cases)
    assert repr(again) == repr(leaky)


def test_leakiness_without_both_classes_reports_why() -> None:
    x, _, cases = _blob_samples(leaky=False)
    result = leakiness(x, np.zeros(len(x), bool), cases, LeakinessSettings(input_size=16, epochs=1))
    assert math.isnan(result["ppv"]) and "diseased" in result["note"]


def test_report_writes_json_with_nulls_and_markdown(tmp_path: Path) -> None:
    nan = float("nan")
    summary = {"mean": 1.5, "std": 0.5, "n": 3}
    dice = {k: {"mean": nan, "std": nan, "n": 0} for k in ("ncr_net", "ed", "et", "whole_tumour")}
    healthy = {"cases": 2, "with_predicted_tumour": 1, "predicted_ml": summary, "predicted_ml_max": 2.25}
    block = {**dice, "min_lesion_ml": 2.0, "tumour_cases": dice, "healthy_cases": healthy}
    seg = {**block, "unprocessed": {**block, "min_lesion_ml": 0.0}}
    results = {
        "bundle": {"fingerprint": "abc", "image_size": 64, "latent_size": 8},
        "data": {"dir": "x", "cases": ["a", "b"], "slices": 80},
        "reconstruction": {k: summary for k in ("full_sum", "normal_sum", "full_mean", "normal_mean")},
        "segmentation": seg,
        "codebooks": {
            w: {"num_codes": 16, "compactness": 0.25, "used": 4, "used_fraction": 0.25, "perplexity": 3.2}
            for w in ("normal", "abnormal")
        },
        "leakiness": {
            "normal_appearing": {"ppv": 0.55, "auc": 0.6, "accuracy": 0.5, "n_train": 10, "n_test": 8},
            "full_control": {"ppv": nan, "auc": nan, "note": "test split has 0 diseased"},
        },
    }
    json_path, md_path = write_model_eval(results, tmp_path / "eval")
    data = json.loads(json_path.read_text())
    assert data["segmentation"]["et"]["mean"] is None
    md = md_path.read_text()
    assert "| normal | 0.25 | 4 / 16 |" in md and "n/a" in md and "test split has 0 diseased" in md
    assert "| lesions >= 2 mL | tumour cases |" in md and "| unprocessed | all |" in md
    assert "1 of 2 healthy cases, 1.5 mL on average (largest 2.25 mL)" in md
    assert md == markdown_report(results)


# ------------------------------------------------------------------------------- a bundle on a cohort
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) tiny FDN exported as an inference bundle: evaluation must work on any model."""
    import torch

    from fdn_core.model.bundle import save_bundle
    from fdn_training.train import build_model
    from fdn_training.trainconfig import load_train_config

    cfg = load_train_config("tiny_test")
    model = build_model(cfg, torch.device("cpu"))
    return save_bundle(
        model, cfg.preprocess, tmp_path_factory.mktemp("eval") / "bundle", {"note": "untrained"}
    )


def test_evaluate_model_on_a_cohort(tiny_bundle: Path, tiny_cohort: Path) -> None:
    from fdn_core.data.readers import find_cases

    settings = LeakinessSettings(input_size=16, epochs=2, width=8, slices_per_case=8)
    results = evaluate_model(tiny_bundle, tiny_cohort, leak=settings)
    cases = [c.case_id for c in find_cases(tiny_cohort)]
    assert results["data"]["cases"] == cases
    assert results["data"]["slices"] == 40 * len(cases)  # every slice of every 64x64x40 case
    rec = results["reconstruction"]
    assert rec["full_sum"]["n"] == 40 * len(cases) and rec["full_sum"]["mean"] > 0
    assert rec["full_mean"]["mean"] == pytest.approx(rec["full_sum"]["mean"] / (4 * 64 * 64))
    for case in results["segmentation_per_case"]:
        for value in case["dice"].values():
            assert math.isnan(value) or 0.0 <= value <= 1.0
    seg = results["segmentation"]
    assert seg["whole_tumour"]["n"] >= 1 and seg["min_lesion_ml"] == MIN_LESION_ML
    tumour = [c for c in results["segmentation_per_case"] if c["tumour"]]
    assert 1 <= len(tumour) < len(cases)  # the tiny cohort has healthy cases too
    assert seg["tumour_cases"]["whole_tumour"]["n"] == len(tumour)
    assert seg["healthy_cases"]["cases"] == len(cases) - len(tumour)
    for case in results["segmentation_per_case"]:  # the size rule only ever removes predicted tumour
        assert case["predicted_ml"] <= case["predicted_ml_unprocessed"]
        assert (case["lesions_removed"] > 0) == (case["predicted_ml"] < case["predicted_ml_unprocessed"])
    unfiltered = evaluate_model(tiny_bundle, tiny_cohort, leak=settings, binarize=False, min_lesion_ml=0.0)
    for case in unfiltered["segmentation_per_case"]:
        assert case["lesions_removed"] == 0
        assert str(case["dice"]) == str(case["dice_unprocessed"])  # NaN-safe equality
    for which in ("normal", "abnormal"):
        book = results["codebooks"][which]
        assert book["num_codes"] == 16 and 1 <= book["used"] <= 16
        assert 1.0 <= book["perplexity"] <= book["used"] + 1e-9
        assert 0.0 <= book["compactness"] <= 1.0
    for key in ("normal_appearing", "full_control"):
        leak = results["leakiness"][key]
        assert leak["n_train"] > 0 and leak["n_test"] > 0, leak
        assert 0.0 <= leak["auc"] <= 1.0


def test_eval_model_cli(tiny_bundle: Path, tiny_cohort: Path, tmp_path: Path, capsys) -> None:
    from fdn_core.cli import main
    from fdn_core.data.readers import find_cases

    cases = [c.case_id for c in find_cases(tiny_cohort)][:3]
    out = tmp_path / "eval"
    args = ["eval-model", "--model", str(tiny_bundle), "--data", str(tiny_cohort), "--out", str(out)]
    assert main([*args, "--cases", *cases, "--leak-epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    data = json.loads((out / "model_eval.json").read_text())
    assert data["data"]["cases"] == cases
    assert "## Leakiness" in (out / "model_eval.md").read_text()
    assert main([*args, "--cases", "no_such_case"]) == 2
    assert "no_such_case" in capsys.readouterr().err
    assert main([*args, "--held-out"]) == 2  # an untrained bundle records no validation cases
    assert "no validation cases" in capsys.readouterr().err
    assert main([*args, "--train-data", str(tiny_cohort)]) == 2  # nor training cases
    assert "records no training cases" in capsys.readouterr().err


def test_evaluate_with_the_training_cohort(tiny_cohort: Path, tmp_path: Path) -> None:
    """--train-data: the classifier learns from the bundle's training cases (checked by fingerprint), the
    evaluated cases test it (a training case among them is left out); usage in training and binarisation."""
    import dataclasses

    import torch

    from fdn_core.data.preprocess import PreprocessConfig
    from fdn_core.data.provenance import case_fingerprint
    from fdn_core.data.readers import find_cases
    from fdn_core.errors import DataError
    from fdn_core.evaluation.model_eval import _training_cases
    from fdn_core.model.bundle import TINY_MODEL, save_bundle
    from fdn_core.model.fdn import FDN, FDNConfig

    files = list(find_cases(tiny_cohort))
    ids = [c.case_id for c in files]
    k = TINY_MODEL["num_codes"]
    metadata = {
        "train_cases": ids[:3],
        "train_case_fingerprints": {c.case_id: case_fingerprint(c) for c in files[:3]},
        "code_usage": {"normal": [3] * (k - 4) + [0] * 4, "abnormal": [2] * k, "window": {"epoch": 0}},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FDN(FDNConfig(**TINY_MODEL))
    bundle = save_bundle(model, PreprocessConfig(image_size=64), tmp_path / "bundle", metadata)
    settings = LeakinessSettings(input_size=16, epochs=2, width=8, slices_per_case=6)
    results = evaluate_model(bundle, tiny_cohort, ids[2:], train_data=tiny_cohort, leak=settings)
    info = results["leakiness_training"]
    assert info["found"] == 3 and info["fingerprints_checked"]
    assert info["evaluated_training_cases"] == [ids[2]]  # same images as a training case: not a test case
    leak = results["leakiness"]["normal_appearing"]
    assert leak["protocol"].startswith("trained on the FDN's training cases") and ids[2] in leak["note"]
    assert leak["test_cases"] <= len(ids) - 3
    normal = results["codebooks"]["normal"]
    assert normal["training"]["used"] == k - 4 and normal["training"]["unused_fraction"] == pytest.approx(
        4 / k
    )
    assert normal["unused_fraction"] == pytest.approx(1 - normal["used_fraction"])
    b = normal["binarization"]
    assert (
        b["num_used"] == k - 4
        and b["bits_before"] == (k - 4) * (k - 5) // 2
        and "used in training" in b["fitted_on"]
    )
    assert set(b["concordance_paper"]) == set(b["concordance_used"]) == {"1", "5", "10"}
    md = markdown_report(results)
    assert "## Binarisation" in md and "% of K(K-1)/2" in md and "unused in training" in md
    # Overlap is by image content, not by id: a held-out id with a training case's images is a training case.
    renamed = dataclasses.replace(files[4], images=files[1].images)
    assert _training_cases(metadata, tiny_cohort, [renamed])[1]["evaluated_training_cases"] == [ids[4]]
    # A training cohort whose case has other images than the model trained on is refused.
    swapped = {**metadata, "train_case_fingerprints": {ids[0]: case_fingerprint(files[1])}}
    with pytest.raises(DataError, match="other images"):
        _training_cases(swapped, tiny_cohort, files[3:])
