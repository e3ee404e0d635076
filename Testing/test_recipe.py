"""The training recipe: config sections, learning-rate schedule, weighted slice sampling, usage tracking,
training provenance, the bundle's recorded usage in binarisation, and the GPU script run on a CPU."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdn_core.errors import ConfigError, IntegrityError
from fdn_training.trainconfig import (
    LEGACY_SECTIONS,
    SamplingConfig,
    ScheduleConfig,
    load_train_config,
    shipped_configs,
    upgrade_config_dict,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- configs
def test_new_sections_are_strict_and_every_shipped_config_has_them(tmp_path: Path) -> None:
    for name, path in shipped_configs().items():
        cfg = load_train_config(path)
        assert {"sampling", "codebook", "schedule"} <= set(cfg.to_dict()), name
    demo = load_train_config("demo_cpu")  # reproduces the shipped model: none of the new features
    assert demo.codebook.restart_threshold == 0.0 and demo.sampling.mode == "uniform"
    assert demo.schedule.kind == "constant" and demo.schedule.warmup_steps == 0
    recipe = load_train_config("cpu_recipe")
    assert recipe.codebook.restart_threshold > 0 and recipe.sampling.mode == "weighted"
    assert recipe.schedule.kind == "cosine" and recipe.schedule.warmup_steps > 0
    assert recipe.run.max_steps and recipe.model.image_size == 64
    gpu = load_train_config("gpu_paper")
    assert (gpu.model.image_size, gpu.model.num_codes, gpu.dataset.batch_size) == (256, 512, 112)

    base = load_train_config("tiny_test").to_dict()
    missing = copy.deepcopy(base)
    del missing["codebook"]
    with pytest.raises(ConfigError, match="codebook"):
        load_train_config(missing)  # a config file must name every section
    for section, key, value, message in [
        ("codebook", "restart_threshold", -0.1, "restart_threshold"),
        ("sampling", "mode", "balanced", "not one of"),
        ("sampling", "tumour_share", 0.99, "empty_share \\+ tumour_share"),
        ("schedule", "kind", "linear", "not one of"),
        ("schedule", "min_lr_ratio", 2.0, "min_lr_ratio"),
    ]:
        bad = copy.deepcopy(base)
        bad[section][key] = value
        with pytest.raises(ConfigError, match=message):
            load_train_config(bad)
    # An old checkpoint's config (without the sections) loads with the values those runs trained with.
    old = {k: v for k, v in base.items() if k not in LEGACY_SECTIONS}
    upgraded = load_train_config(upgrade_config_dict(old))
    assert upgraded.codebook.restart_threshold == 0.0 and upgraded.sampling.mode == "uniform"
    assert upgraded.schedule == ScheduleConfig(kind="constant", warmup_steps=0, min_lr_ratio=1.0)


def test_restart_threshold_reaches_both_quantisers_from_the_config() -> None:
    from fdn_training.build import build_model

    d = load_train_config("tiny_test").to_dict()
    d["codebook"]["restart_threshold"] = 0.07
    model = build_model(load_train_config(d), torch.device("cpu"))
    assert model.vq_normal.restart_threshold == model.vq_abnormal.restart_threshold == 0.07
    d["codebook"]["restart_threshold"] = 0.0
    off = build_model(load_train_config(d), torch.device("cpu"))
    assert off.vq_normal.restart_threshold == off.vq_abnormal.restart_threshold == 0.0


# ------------------------------------------------------------------------------------------ schedule
def test_learning_rate_schedule() -> None:
    from fdn_training.schedule import lr_factor

    cosine = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, 110, cosine) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)  # cosine from 1 to min at the end
    assert f[60] == pytest.approx(0.55, abs=0.01)  # half way: the mean of both ends
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert lr_factor(500, 110, cosine) == pytest.approx(0.1)  # past the end (a --max-steps raise): the floor
    constant = ScheduleConfig(kind="constant", warmup_steps=0, min_lr_ratio=1.0)
    assert {lr_factor(s, 50, constant) for s in range(50)} == {1.0}


def test_trainer_sets_the_scheduled_rate() -> None:
    from fdn_core.losses import FDNLoss
    from fdn_training.build import build_model, make_optimizers
    from fdn_training.trainer import Trainer

    cfg = load_train_config("tiny_test")
    model = build_model(cfg, torch.device("cpu"))
    opt_g, opt_c = make_optimizers(cfg, model)
    trainer = Trainer(cfg, model, FDNLoss(cfg.loss, latent_size=8), opt_g, opt_c, torch.device("cpu"))
    lr = trainer.set_learning_rate(0, 10)
    assert lr == pytest.approx(cfg.optimizer.lr / cfg.schedule.warmup_steps)
    assert all(g["lr"] == lr for g in opt_g.param_groups)
    assert all(g["lr"] == cfg.optimizer.critic_lr for g in opt_c.param_groups)  # the critic's stays
    assert trainer.set_learning_rate(9, 10) == pytest.approx(cfg.optimizer.lr * cfg.schedule.min_lr_ratio)


def test_budget_steps() -> None:
    from fdn_training.trainer import BUDGET_MARGIN, budget_steps

    assert budget_steps(25, 10_000, 2.0, 1000.0) == 25 + int(BUDGET_MARGIN * 500)
    assert budget_steps(25, 100, 2.0, 1000.0) == 100  # the run's own end comes first
    assert budget_steps(25, 100, 2.0, -5.0) == 26  # out of time already: one more step


# ------------------------------------------------------------------------------------------- sampling
def _images(empty: int, brain: int) -> np.ndarray:
    x = np.zeros((empty + brain, 4, 16, 16), np.float16)
    x[empty:, :, 2:14, 2:14] = 1.0  # brain slices
    x[:empty, 0, 0, 0] = 1.0  # one stray pixel: still empty (below 5 % brain)
    return x


def test_slice_groups_and_weights_give_the_configured_shares() -> None:
    from fdn_training.data import sampling_weights, slice_groups

    images = _images(empty=60, brain=40)
    abnormal = np.zeros(100, bool)
    abnormal[80:] = True
    empty, tumour = slice_groups(images, abnormal, np.arange(100), 0.05, chunk=7)
    assert empty.sum() == 60 and tumour.sum() == 20 and not (empty & tumour).any()
    cfg = SamplingConfig(mode="weighted", empty_share=0.05, tumour_share=0.4, min_brain_fraction=0.05)
    w = sampling_weights(empty, tumour, cfg)
    assert w.sum() == pytest.approx(1.0)
    assert w[empty].sum() == pytest.approx(0.05) and w[tumour].sum() == pytest.approx(0.4)
    assert w[~empty & ~tumour].sum() == pytest.approx(0.55)
    # No tumour slice in the cohort: its share goes to the other groups, proportionally.
    w = sampling_weights(empty, np.zeros(100, bool), cfg)
    assert w[empty].sum() == pytest.approx(0.05 / 0.6)


def test_weighted_sampler_is_seeded_resumable_and_sharded() -> None:
    from fdn_training.data import ResumableBatchSampler
    from fdn_training.distributed import DistInfo

    n = 200
    w = np.where(np.arange(n) < 150, 0.05 / 150, 0.95 / 50)  # 150 "empty" items get 5 % of the draws
    one = ResumableBatchSampler(n, 8, DistInfo(), seed=3, weights=w)
    one.set_epoch(4)
    order = [i for b in one for i in b]
    again = ResumableBatchSampler(n, 8, DistInfo(), seed=3, weights=w)
    again.set_epoch(4)
    assert order == [i for b in again for i in b]  # seeded by (seed, epoch)
    again.set_epoch(5)
    assert order != [i for b in again for i in b]
    assert len(order) == one.batches_per_epoch * 8 == 200  # as many draws as a uniform epoch
    resumed = ResumableBatchSampler(n, 8, DistInfo(), seed=3, weights=w)
    resumed.set_epoch(4, skip_batches=10)
    assert [i for b in resumed for i in b] == order[80:]
    # The global draw is split rank by rank under DDP (each rank half of the batches).
    ranks = []
    for r in range(2):
        s = ResumableBatchSampler(n, 4, DistInfo(world_size=2, rank=r, local_rank=r), seed=3, weights=w)
        s.set_epoch(4)
        ranks.append([i for b in s for i in b])
    assert len(ranks[0]) == len(ranks[1]) == 100
    # Shares: about 5 % of the draws from the low-weight group over many epochs.
    draws = []
    for e in range(20):
        one.set_epoch(e)
        draws += [i for b in one for i in b]
    assert abs(np.mean(np.asarray(draws) < 150) - 0.05) < 0.02
    # Without weights: the DistributedSampler permutation, every item once.
    plain = ResumableBatchSampler(n, 8, DistInfo(), seed=3)
    plain.set_epoch(0)
    assert sorted(i for b in plain for i in b) == list(range(n))


# ----------------------------------------------------------------------------------------- usage
def test_usage_tracker_counts_flushes_and_records_the_last_epoch() -> None:
    from fdn_training.build import build_model
    from fdn_training.distributed import DistInfo
    from fdn_training.usage import UsageTracker, recorded_usage, usage_stats

    model = build_model(load_train_config("tiny_test"), torch.device("cpu"))
    k = model.config.num_codes
    t = UsageTracker(model, torch.device("cpu"), DistInfo())
    t.count(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[2, 2], [2, 2]]))
    assert recorded_usage(t.state_dict())["normal"] == [0] * k  # nothing flushed yet
    t.flush()
    stats = t.interval_stats()
    assert stats["usage_normal"] == pytest.approx(2 / k) and stats["usage_abnormal"] == pytest.approx(1 / k)
    assert stats["perplexity_abnormal"] == pytest.approx(1.0)
    assert t.interval.sum() == 0  # a new interval
    partial = recorded_usage(t.state_dict())
    assert partial["normal"][:2] == [1, 3] and partial["window"]["complete_epoch"] is False
    t.end_epoch(0)
    t.count(torch.tensor([5]), torch.tensor([5]))
    t.flush()
    window = t.window()
    assert window["normal"][:2] == [1, 3] and window["window"] == {
        "epoch": 0,
        "complete_epoch": True,
        "steps": 1,
    }
    restored = UsageTracker(model, torch.device("cpu"), DistInfo())
    restored.load_state_dict(copy.deepcopy(t.state_dict()))
    assert restored.window() == window
    assert usage_stats(torch.zeros(4, dtype=torch.int64)) == (0.0, 0.0)


# ------------------------------------------------------------------------------------- provenance
# ---------------------------------------------------------------------------- the bundle's usage
def _bundle_with(out: Path, metadata: dict) -> Path:
    from fdn_core.data.preprocess import PreprocessConfig
    from fdn_core.model.bundle import TINY_MODEL, save_bundle
    from fdn_core.model.fdn import FDN, FDNConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FDN(FDNConfig(**TINY_MODEL))
    return save_bundle(model, PreprocessConfig(image_size=64), out, metadata)


def test_bundle_code_usage_and_hamming_codes_fitted_on_used_codes(tmp_path: Path) -> None:
    from fdn_core.codes.binarize import BinaryCodes
    from fdn_core.model.bundle import TINY_MODEL, load_bundle
    from fdn_core.retrieval import save_bundle_hamming_codes

    k = TINY_MODEL["num_codes"]
    assert load_bundle(_bundle_with(tmp_path / "old", {}), device="cpu").code_usage() is None
    normal = [5] * (k // 2) + [0] * (k - k // 2)  # the second half never selected in training
    usage = {"normal": normal, "abnormal": [1] * k, "window": {"epoch": 0}}
    bundle = load_bundle(_bundle_with(tmp_path / "new", {"code_usage": usage}), device="cpu")
    counts = bundle.code_usage()
    assert counts is not None and counts[0].tolist() == normal and counts[1].dtype == np.int64
    folder = save_bundle_hamming_codes(bundle)
    codes = BinaryCodes.load(folder, "normal")
    assert codes.used is not None and codes.used.tolist() == [c > 0 for c in normal]
    assert codes.report.num_used == k // 2 and codes.report.bits_before == (k // 2) * (k // 2 - 1) // 2
    assert BinaryCodes.load(folder, "abnormal").used.all()
    bad = load_bundle(_bundle_with(tmp_path / "bad", {"code_usage": {"normal": [1], "abnormal": []}}), "cpu")
    with pytest.raises(IntegrityError, match="code_usage"):
        bad.code_usage()


# ------------------------------------------------------------------------------- the GPU script
@pytest.mark.slow
def test_gpu_script_runs_on_a_cpu_with_a_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--out", str(out), "--device", "cpu"]
    cmd += ["--config", "tiny_test", "--cases", "4", "--held-out-cases", "2", "--shape", "64", "64", "24"]
    cmd += ["--budget-minutes", "0.2", "--leak-epochs", "2", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loss curve" in proc.stdout and "slices/s" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["training"]["steps"] >= 1
    assert summary["training"]["steps"] >= 1 and math.isfinite(summary["training"]["last_total"])
    assert (out / "bundle" / "bundle.json").is_file() and (out / "eval" / "model_eval.md").is_file()
    from fdn_core.model.bundle import load_bundle

    meta = load_bundle(out / "bundle", device="cpu").metadata
    assert meta["cohort"]["seed"] == 21 and len(meta["train_case_fingerprints"]) == len(meta["train_cases"])
    assert "code_usage" in meta
    evaluation = json.loads((out / "eval" / "model_eval.json").read_text())
    assert evaluation["leakiness_training"]["found"] == len(meta["train_cases"])
