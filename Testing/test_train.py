"""Training harness: configs, a few real steps, checkpoints, bit-exact resume, the fdn train/export CLI."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fdn_core.errors import ConfigError, DataError
from fdn_core.losses import FDNLoss
from fdn_training.trainconfig import CONFIG_DIR, TrainConfig, load_train_config, shipped_configs


def _tiny(**changes: dict[str, Any]) -> TrainConfig:
    """The tiny test config with some sections' keys changed (fast: no TensorBoard, few val slices)."""
    d = load_train_config("tiny_test").to_dict()
    d["run"].update(tensorboard=False)
    d["dataset"].update(val_max_slices=16)
    for section, values in changes.items():
        d[section].update(values)
    return load_train_config(d)


@pytest.fixture(scope="module")
def cache_dir(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort's slice cache, built once and shared by every run of this module."""
    from fdn_core.data.cache import SliceCache

    path = tmp_path_factory.mktemp("train") / "cache"
    SliceCache.build_or_open(tiny_cohort, path, load_train_config("tiny_test").preprocess)
    return path


# ------------------------------------------------------------------------------------------- configs
def test_shipped_configs_load_and_paper_config_matches_the_paper() -> None:
    names = set(shipped_configs())
    assert {"fdn8x8_256", "demo_cpu", "tiny_test"} <= names
    for name in names:
        cfg = load_train_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.model.image_size == cfg.preprocess.image_size
    paper = load_train_config("fdn8x8_256")
    assert (paper.model.image_size, paper.model.latent_size) == (256, 8)
    assert (paper.model.num_codes, paper.model.code_dim) == (512, 64)
    assert paper.model.resolved_decoder_channels == (128, 128, 128, 128, 64, 32)
    assert (paper.dataset.batch_size, paper.run.epochs) == (112, 400)
    assert (paper.optimizer.lr, paper.optimizer.weight_decay, paper.optimizer.critic_steps) == (1e-4, 1e-5, 5)
    assert (paper.loss.w_lat, paper.loss.w_seg, paper.loss.w_rec) == (0.25, 5.0, 5.0)
    resolved = FDNLoss(paper.loss, latent_size=paper.model.latent_size)
    assert (resolved.w_dm, resolved.w_critic) == (1e-4, 1e-4)  # lambda_4, lambda_5 of the paper at 8x8
    assert paper.loss.dm_enabled and paper.loss.lambda_gp == 10.0
    assert load_train_config("demo_cpu").model.latent_size == 8


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    base = load_train_config("tiny_test").to_dict()

    unknown = copy.deepcopy(base)
    unknown["optimizer"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"optimizer: unknown key\(s\) \['learning_rate'\]"):
        load_train_config(_write(tmp_path, unknown))

    missing = copy.deepcopy(base)
    del missing["run"]["seed"]
    with pytest.raises(ConfigError, match=r"run\.seed: missing key"):
        load_train_config(_write(tmp_path, missing))

    impossible = copy.deepcopy(base)
    impossible["model"]["latent_size"] = 32  # 64 / 32 = 2 stages: below the minimum ratio of 4
    with pytest.raises(ConfigError, match="latent_size=32"):
        load_train_config(impossible)

    mismatch = copy.deepcopy(base)
    mismatch["preprocess"]["image_size"] = 128
    with pytest.raises(ConfigError, match=r"preprocess\.image_size=128 differs from model\.image_size=64"):
        load_train_config(mismatch)

    for section, key, value, message in [
        ("dataset", "batch_size", 1, "batch_size=1"),
        ("dataset", "val_fraction", 1.0, "val_fraction"),
        ("save", "best_metric", "accuracy", "not one of"),
        ("optimizer", "lr", 0.0, "optimizer.lr"),
        ("run", "epochs", "many", "expected an integer"),
    ]:
        bad = copy.deepcopy(base)
        bad[section][key] = value
        with pytest.raises(ConfigError, match=message):
            load_train_config(bad)

    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ training
def test_a_few_steps_reduce_the_loss(cache_dir: Path) -> None:
    from torch.utils.data import default_collate

    from fdn_core.data.cache import SliceCache
    from fdn_core.data.dataset import SliceDataset
    from fdn_core.losses import FDNLoss
    from fdn_training.train import build_model, make_optimizers, train_step

    cfg = _tiny()
    cache = SliceCache.open(cache_dir)
    ds = SliceDataset(cache, cache.case_ids, augment=False)
    abnormal = ds.abnormal.nonzero()[0]
    healthy = (~ds.abnormal).nonzero()[0]
    picks = list(abnormal[:: max(len(abnormal) // 4, 1)][:4]) + list(healthy[len(healthy) // 3 :][:4])
    batch = default_collate([ds[int(i)] for i in picks])
    device = torch.device("cpu")
    model = build_model(cfg, device)
    loss_fn = FDNLoss(cfg.loss, latent_size=cfg.model.latent_size)
    opt_g, opt_c = make_optimizers(cfg, model)
    totals = [train_step(cfg, model, model, loss_fn, opt_g, opt_c, batch, device)["total"] for _ in range(6)]
    assert totals[-1] < 0.9 * totals[0], totals


def test_non_finite_gradients_skip_the_step_and_nan_losses_stop(cache_dir: Path) -> None:
    from torch.utils.data import default_collate

    from fdn_core.data.cache import SliceCache
    from fdn_core.data.dataset import SliceDataset
    from fdn_core.errors import FDNError
    from fdn_core.losses import FDNLoss
    from fdn_training.train import build_model, make_optimizers, train_step

    cfg = _tiny()
    ds = SliceDataset(SliceCache.open(cache_dir), SliceCache.open(cache_dir).case_ids, augment=False)
    batch = default_collate([ds[i] for i in range(15, 19)])
    device = torch.device("cpu")
    model = build_model(cfg, device)
    loss_fn = FDNLoss(cfg.loss, latent_size=cfg.model.latent_size)
    opt_g, opt_c = make_optimizers(cfg, model)
    # Trainable generator weights (the EMA codebooks move in the forward pass by design).
    before = {
        k: v.clone() for k, v in model.named_parameters() if v.requires_grad and not k.startswith("critic.")
    }
    handle = model.stem[0].weight.register_hook(lambda g: g * float("inf"))
    logs = train_step(cfg, model, model, loss_fn, opt_g, opt_c, batch, device)
    handle.remove()
    assert logs["skipped"] == 1.0 and not math.isfinite(logs["grad_norm"])
    for k, v in model.named_parameters():
        if k in before:
            assert torch.equal(v, before[k]), k  # nothing applied
    assert train_step(cfg, model, model, loss_fn, opt_g, opt_c, batch, device)["skipped"] == 0.0
    batch["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FDNError, match="non-finite loss"):
        train_step(cfg, model, model, loss_fn, opt_g, opt_c, batch, device)


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_is_bit_identical(tiny_cohort: Path, cache_dir: Path, tmp_path: Path) -> None:
    from fdn_training.train import train

    cfg = _tiny(run={"val_every": 2}, save={"checkpoint_every": 2})
    kw = dict(device="cpu", cache_dir=cache_dir, export_bundle=False, show_progress_bar=False)
    straight = train(cfg, tiny_cohort, tmp_path / "straight", max_steps=4, **kw)
    train(cfg, tiny_cohort, tmp_path / "resumed", max_steps=2, **kw)
    resumed = train(None, tiny_cohort, tmp_path / "resumed", resume=True, max_steps=4, **kw)
    assert straight.steps == resumed.steps == 4
    a = _state(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = _state(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for opt in ("optimizer", "critic_optimizer"):
        for pid, st in a[opt]["state"].items():
            for name, value in st.items():
                assert torch.equal(value, b[opt]["state"][pid][name]), (opt, pid, name)
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])
    # The codebook usage counts and restart counters continue too (tiny_test has restarts on).
    for key in ("interval", "epoch_counts"):
        assert torch.equal(a["code_usage"][key], b["code_usage"][key]), key
    assert a["code_usage"]["restarts"] == b["code_usage"]["restarts"]
    assert a["code_usage"]["epoch_counts"].sum(1).tolist() == [4 * 4 * 64] * 2  # steps x batch x 8x8
    # The resumed run's log continues where the first half stopped: one row per logged step.
    with open(tmp_path / "resumed" / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]
    # Resuming with a different config is refused, naming the difference.
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        train(_tiny(optimizer={"lr": 0.5}), tiny_cohort, tmp_path / "resumed", resume=True, **kw)
    # Starting a new run over an existing one is refused.
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, tiny_cohort, tmp_path / "resumed", **kw)


def test_wall_clock_budget_stops_cleanly_and_exports(
    tiny_cohort: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from fdn_core.model.bundle import load_bundle
    from fdn_training.train import load_checkpoint, train

    cfg = _tiny(run={"log_every": 10, "val_every": 10})
    kw = dict(device="cpu", cache_dir=cache_dir, show_progress_bar=False)
    result = train(cfg, tiny_cohort, tmp_path / "run", max_steps=20, max_minutes=1e-4, **kw)
    assert result.stopped_by_time and result.steps == 1  # the budget passed during the first step
    assert load_checkpoint(result.last_checkpoint)["step"] == 1
    assert load_bundle(result.bundle_dir, device="cpu").metadata["code_usage"]["window"]["steps"] == 1
    with open(tmp_path / "run" / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1]  # the last step is logged
    with open(tmp_path / "run" / "val_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1]  # and validated
    with pytest.raises(ConfigError, match="max_minutes"):
        train(cfg, tiny_cohort, tmp_path / "other", max_minutes=0, **kw)


def test_a_budgeted_run_plans_its_steps_so_the_schedule_ends_with_the_budget(
    tiny_cohort: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fdn_training.train as train_module
    import fdn_training.trainer as trainer_module
    from fdn_training.schedule import lr_factor
    from fdn_training.train import load_checkpoint, train

    class Clock:  # the trainer's clock: every reading is one second later (a machine of steady speed)
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.now += 1.0
            return cls.now

    monkeypatch.setattr(trainer_module, "time", Clock)
    monkeypatch.setattr(train_module, "time", Clock)
    monkeypatch.setattr(trainer_module, "BUDGET_SKIP", 1)
    monkeypatch.setattr(trainer_module, "BUDGET_MEASURE", 3)
    cfg = _tiny(run={"epochs": 50, "log_every": 5, "val_every": 1000}, save={"checkpoint_every": 1000})
    kw = dict(device="cpu", cache_dir=cache_dir, export_bundle=False, show_progress_bar=False)
    result = train(cfg, tiny_cohort, tmp_path / "run", max_minutes=0.5, **kw)  # 30 readings
    planned = load_checkpoint(result.last_checkpoint)["planned_steps"]
    assert planned is not None and 6 < planned < 30  # timed over steps 2-4, far below 50 epochs
    assert result.steps == planned and not result.stopped_by_time  # ended as planned, inside the budget
    with open(tmp_path / "run" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    last_lr = cfg.optimizer.lr * lr_factor(planned - 1, planned, cfg.schedule)
    assert last_lr == pytest.approx(cfg.optimizer.lr * cfg.schedule.min_lr_ratio)  # the cosine's floor
    assert int(rows[-1]["step"]) == planned and float(rows[-1]["lr"]) == pytest.approx(last_lr, rel=1e-4)


def test_checkpoints_from_before_the_recipe_still_load_and_export(
    tiny_cohort: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from fdn_core.model.bundle import load_bundle
    from fdn_training.train import export_checkpoint, load_checkpoint, train

    run = train(_tiny(), tiny_cohort, tmp_path / "run", max_steps=1, device="cpu", cache_dir=cache_dir,
                export_bundle=False, show_progress_bar=False)  # fmt: skip
    payload = _state(run.last_checkpoint)
    for key in ("code_usage", "provenance"):
        del payload[key]
    for section in ("sampling", "codebook", "schedule"):
        del payload["config"][section]
    torch.save(payload, tmp_path / "old.pt")
    cfg = load_train_config(load_checkpoint(tmp_path / "old.pt")["config"])
    assert cfg.codebook.restart_threshold == 0.0 and cfg.schedule.kind == "constant"
    meta = load_bundle(export_checkpoint(tmp_path / "old.pt", tmp_path / "bundle"), device="cpu").metadata
    assert "code_usage" not in meta and "train_case_fingerprints" not in meta and meta["step"] == 1


def test_too_few_cases_is_a_clear_error(tiny_cohort: Path, tmp_path: Path) -> None:
    import shutil

    from fdn_training.train import train

    one = tmp_path / "one"
    one.mkdir()
    first = sorted(p for p in tiny_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(first, one / first.name)
    with pytest.raises(DataError, match="at least 2"):
        train(_tiny(), one, tmp_path / "run", device="cpu", show_progress_bar=False)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_fdn_train_cli_end_to_end(tiny_cohort: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    from fdn_core.cli import main
    from fdn_core.data.cache import SliceCache
    from fdn_core.model.bundle import load_bundle
    from fdn_training.train import build_model, load_checkpoint

    run = tmp_path / "run"
    args = ["train", "--config", "tiny_test", "--data", str(tiny_cohort), "--out", str(run)]
    args += ["--max-steps", "4", "--device", "cpu", "--cache", str(cache_dir), "--no-progress"]
    assert main(args) == 0
    assert "inference bundle" in capsys.readouterr().out
    for name in ("last.pt", "last.yaml", "best.pt", "best.yaml"):
        assert (run / "checkpoints" / name).is_file(), name
    saved = load_train_config(run / "checkpoints" / "last.yaml")
    assert saved == load_train_config(run / "config.yaml")
    assert saved.run.max_steps == 4
    with open(run / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4] and float(rows[-1]["total"]) > 0
    with open(run / "val_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # The checkpoint (weights_only) and the exported bundle hold the same model: identical outputs.
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    model = build_model(load_train_config(ckpt["config"]), torch.device("cpu"))
    model.load_state_dict(ckpt["model"])
    model.eval()
    bundle = load_bundle(run / "bundle", device="cpu")
    images = SliceCache.open(cache_dir).stack(SliceCache.open(cache_dir).case_ids[0]).images[10:14]
    with torch.no_grad():
        seg_logits, full, normal = model.decode_indices(*model.encode(torch.from_numpy(images)))
    recon_full, recon_normal, seg = bundle.reconstruct(images)
    assert torch.equal(torch.from_numpy(recon_full), full)
    assert torch.equal(torch.from_numpy(recon_normal), normal)
    assert torch.equal(torch.from_numpy(seg).long(), seg_logits.argmax(1))
    assert bundle.metadata["step"] == 4 and bundle.metadata["val_cases"]

    # Codebook usage: logged per interval, kept in the checkpoint, recorded in the bundle.
    assert {"usage_normal", "usage_abnormal", "perplexity_normal", "restarts_abnormal", "lr"} <= set(rows[0])
    assert all(0 < float(r["usage_normal"]) <= 1 and float(r["lr"]) > 0 for r in rows)
    assert 0 <= float(rows[0]["empty_share"]) <= 1
    usage = bundle.metadata["code_usage"]
    assert usage["window"] == {"epoch": None, "complete_epoch": False, "steps": 4}  # no full epoch yet
    assert sum(usage["normal"]) == sum(usage["abnormal"]) == 4 * 4 * 64
    counts = bundle.code_usage()
    assert counts is not None and counts[0].tolist() == usage["normal"] and len(counts[1]) == 16
    assert "restarts" in usage and ckpt["code_usage"]["epoch_steps"] == 4
    # Provenance: the training cases' image fingerprints and the phantom cohort's seed.
    from fdn_core.data.provenance import case_fingerprint
    from fdn_core.data.readers import find_cases

    by_id = {c.case_id: c for c in find_cases(tiny_cohort)}
    fingerprints = bundle.metadata["train_case_fingerprints"]
    assert list(fingerprints) == ckpt["train_cases"]
    assert all(fingerprints[c] == case_fingerprint(by_id[c]) for c in fingerprints)
    assert bundle.metadata["cohort"]["seed"] == 1234 and bundle.metadata["cohort"]["n_cases"] == 6

    # fdn export, and its refusal to overwrite silently.
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--checkpoint", "last", "--out", str(out)]) == 0
    assert load_bundle(out, device="cpu").fingerprint == bundle.fingerprint
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    # fdn eval-model on the run's held-out (validation) cases, as recorded in the bundle.
    ev = tmp_path / "eval"
    ev_args = ["eval-model", "--model", str(run / "bundle"), "--data", str(tiny_cohort), "--held-out"]
    assert main([*ev_args, "--out", str(ev), "--leak-epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    evaluated = json.loads((ev / "model_eval.json").read_text())["data"]["cases"]
    assert evaluated == bundle.metadata["val_cases"] == ckpt["val_cases"]
    assert not set(evaluated) & set(ckpt["train_cases"])

    # fdn train into a used run folder without --resume: exit code 2 and a message saying what to do.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_warm_start_from_another_run(tiny_cohort: Path, cache_dir: Path, tmp_path: Path) -> None:
    from fdn_training.train import load_checkpoint, train

    common = {"device": "cpu", "cache_dir": cache_dir, "export_bundle": False, "show_progress_bar": False}
    # Without dead-code restarts: they would reseed the same unused codes from the same first batch in
    # every run, warm or cold, which is not what this test is about.
    cfg = _tiny(codebook={"restart_threshold": 0.0})
    first = train(cfg, tiny_cohort, tmp_path / "a", max_steps=2, **common)
    warm = train(cfg, tiny_cohort, tmp_path / "b", max_steps=1, init_from=first.last_checkpoint, **common)
    cold = train(cfg, tiny_cohort, tmp_path / "c", max_steps=1, **common)
    key = next(k for k in load_checkpoint(first.last_checkpoint)["model"] if k.endswith("embedding.weight"))
    book = {name: load_checkpoint(r.last_checkpoint)["model"][key] for name, r in
            (("first", first), ("warm", warm), ("cold", cold))}  # fmt: skip
    # One EMA step (decay 0.99) moves the warm-started codebook a little from where the first run left it;
    # a cold start is elsewhere entirely.
    assert (book["warm"] - book["first"]).norm() < (book["cold"] - book["first"]).norm()
    assert load_checkpoint(warm.last_checkpoint)["step"] == 1  # a new run: fresh schedule

    with pytest.raises(ConfigError, match="cannot be combined with --resume"):
        train(None, tiny_cohort, tmp_path / "a", resume=True, init_from=first.last_checkpoint, **common)
    other = cfg.to_dict()
    other["model"]["code_dim"] = other["model"]["code_dim"] * 2
    with pytest.raises(ConfigError, match="same architecture"):
        train(
            load_train_config(other), tiny_cohort, tmp_path / "d", init_from=first.last_checkpoint, **common
        )
