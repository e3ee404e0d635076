"""Train a paper-size FDN on a GPU for a fixed wall-clock budget, then evaluate and export it.

On a CUDA machine (``--device auto`` finds it)::

    python bench/gpu_train.py --out gpu_run                   # 256 px paper model, 8 minutes of training
    python bench/gpu_train.py --out gpu_run --image-size 128  # the same model at 128 px

Steps, each timed and printed:

1. phantom cohorts with every core: ``--cases`` training cases, ``--held-out-cases`` others (next seed);
2. the slice cache of the training cohort (built before the training's clock starts);
3. ``fdn train --max-minutes BUDGET --no-export`` (at most 8 minutes): the trainer times its first steps
   and plans its step count so that the learning-rate schedule (warm-up + cosine) ends with the budget;
4. slices/s, peak GPU memory and the loss curve (with codebook usage) from ``train_log.csv``;
5. ``fdn export`` (the best checkpoint) and ``fdn eval-model`` on the held-out cohort with ``--train-data``
   (the leakiness classifier learns from the training cases, as in the paper).

It also runs on a CPU with a tiny budget (what the test suite does, about a minute)::

    python bench/gpu_train.py --out /tmp/g --device cpu --config tiny_test --cases 4 --held-out-cases 2 \\
        --shape 64 64 24 --budget-minutes 0.25 --leak-epochs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "training"), str(ROOT / "bench")]

#: The training budget is capped here (the GPU time of a session is short).
MAX_BUDGET_MINUTES = 8.0


def _env() -> dict[str, str]:
    """The environment of the child commands: this checkout first on the path."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "training"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def fdn(*args: str) -> None:
    """Run ``fdn ARGS`` (``python -m fdn_core.cli``) and fail loudly."""
    cmd = [sys.executable, "-m", "fdn_core.cli", *args]
    print("$ fdn " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=_env(), cwd=ROOT)


def timed(label: str, times: dict[str, float]) -> Any:
    """Context manager recording the wall time of a stage under ``label``."""
    from contextlib import contextmanager

    @contextmanager
    def cm() -> Any:
        t0 = time.perf_counter()
        print(f"\n== {label}", flush=True)
        yield
        times[label] = time.perf_counter() - t0
        print(f"== {label}: {times[label]:.1f} s", flush=True)

    return cm()


def sized_config_file(config: str, image_size: int | None, out: Path) -> Path:
    """The training config (shipped name or file), at ``image_size`` when given, written to ``out``."""
    from bench_train import sized_config

    from fdn_training.checkpoint import config_yaml

    cfg = sized_config(config, image_size)
    out.write_bytes(config_yaml(cfg.to_dict()))
    return out


def _planned_steps(run: Path) -> int | None:
    """The step count the trainer planned for the budget (from the last checkpoint)."""
    from fdn_training.checkpoint import load_checkpoint

    planned = load_checkpoint(run / "checkpoints" / "last.pt").get("planned_steps")
    return None if planned is None else int(planned)


def report_log(run: Path) -> dict[str, Any]:
    """Print the loss curve (and codebook usage) of ``run/train_log.csv``; returns the headline figures."""
    with open(run / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print("no training rows logged")
        return {}

    def num(row: dict[str, str], key: str) -> float:
        try:
            return float(row.get(key) or "nan")
        except ValueError:
            return float("nan")

    keep = rows if len(rows) <= 16 else [rows[round(i * (len(rows) - 1) / 15)] for i in range(16)]
    print("\nloss curve (train_log.csv):")
    print("| step | total | rec | seg | lr | usage normal | usage abnormal | restarts n/a | slices/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in keep:
        print(
            f"| {r['step']} | {num(r, 'total'):.4g} | {num(r, 'rec'):.4g} | {num(r, 'seg'):.4g} | "
            f"{num(r, 'lr'):.3g} | {100 * num(r, 'usage_normal'):.0f} % | "
            f"{100 * num(r, 'usage_abnormal'):.0f} % | {num(r, 'restarts_normal'):.0f}/"
            f"{num(r, 'restarts_abnormal'):.0f} | {num(r, 'slices_per_s'):.1f} |"
        )
    rates = [num(r, "slices_per_s") for r in rows[1:]] or [num(rows[0], "slices_per_s")]
    mem = [num(r, "gpu_mem_mib") for r in rows if r.get("gpu_mem_mib")]
    out = {
        "steps": int(float(rows[-1]["step"])),
        "slices_per_s": sum(rates) / len(rates),
        "first_total": num(rows[0], "total"),
        "last_total": num(rows[-1], "total"),
        "peak_gpu_mem_mib": max(mem) if mem else None,
        "usage_normal": num(rows[-1], "usage_normal"),
        "usage_abnormal": num(rows[-1], "usage_abnormal"),
    }
    print(
        f"\nslices/s (mean over log rows after the first): {out['slices_per_s']:.1f}; "
        f"peak GPU memory: {'n/a (CPU)' if mem == [] else f'{max(mem):.0f} MiB'}; "
        f"loss {out['first_total']:.4g} -> {out['last_total']:.4g}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the whole sequence; prints a summary and writes OUT/summary.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="work folder (cohorts, run, bundle, evaluation)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda or cpu")
    p.add_argument("--config", default="gpu_paper", help="training config (default gpu_paper: 256 px)")
    p.add_argument("--image-size", type=int, default=None, help="train at this input size (e.g. 128)")
    p.add_argument("--cases", type=int, default=64, help="training cohort size")
    p.add_argument("--held-out-cases", type=int, default=16, help="held-out cohort size (evaluation)")
    p.add_argument("--seed", type=int, default=21, help="phantom seed of the training cohort (+1 held out)")
    p.add_argument("--shape", nargs=3, type=int, default=None, help="phantom volume shape (default full)")
    p.add_argument("--budget-minutes", type=float, default=MAX_BUDGET_MINUTES, help="training wall budget")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    p.add_argument("--leak-epochs", type=int, default=40, help="most epochs of the leakiness classifier")
    args = p.parse_args(argv)
    if not 0 < args.budget_minutes <= MAX_BUDGET_MINUTES:
        p.error(f"--budget-minutes must be in (0, {MAX_BUDGET_MINUTES}]")

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    cores = os.cpu_count() or 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_dir, held_dir, run = out / "train_cohort", out / "held_out", out / "run"
    times: dict[str, float] = {}
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"device {device} ({gpu}), {cores} CPU cores, torch {torch.__version__}")

    shape = [] if args.shape is None else ["--shape", *map(str, args.shape)]
    with timed("phantom cohorts", times):
        for folder, n, seed in (
            (train_dir, args.cases, args.seed),
            (held_dir, args.held_out_cases, args.seed + 1),
        ):
            if not (folder / "cohort.json").exists():
                fdn("phantom", "--out", str(folder), "--cases", str(n), "--seed", str(seed),
                    "--workers", str(cores), "--overwrite", *shape)  # fmt: skip
    config = sized_config_file(args.config, args.image_size, out / "config.yaml")
    from fdn_training.trainconfig import load_train_config

    cfg = load_train_config(config)
    with timed("slice cache", times):
        from fdn_core.data.cache import SliceCache

        SliceCache.build_or_open(train_dir, run / "cache", cfg.preprocess, workers=min(cores, 16))
    threads = ["--threads", str(args.threads)] if args.threads else []
    with timed("training", times):
        fdn("train", "--config", str(config), "--data", str(train_dir), "--out", str(run), "--device", device,
            "--cache", str(run / "cache"), "--max-minutes", str(args.budget_minutes), "--no-export",
            "--no-progress", *threads)  # fmt: skip
    log_figures = report_log(run)
    bundle = out / "bundle"
    with timed("export", times):
        fdn("export", "--run", str(run), "--checkpoint", "best", "--out", str(bundle), "--overwrite")
    with timed("evaluation", times):
        fdn("eval-model", "--model", str(bundle), "--data", str(held_dir), "--train-data", str(train_dir),
            "--out", str(out / "eval"), "--device", device, "--leak-epochs", str(args.leak_epochs),
            "--no-progress")  # fmt: skip
    evaluation = json.loads((out / "eval" / "model_eval.json").read_text())
    summary = {
        "device": device,
        "gpu": gpu,
        "config": str(config),
        "image_size": cfg.model.image_size,
        "planned_steps": _planned_steps(run),
        "training": log_figures,
        "times_s": times,
        "bundle": str(bundle),
        "segmentation": evaluation["segmentation"],
        "leakiness_ppv": evaluation["leakiness"]["normal_appearing"].get("ppv"),
        "codebooks": {
            w: {k: evaluation["codebooks"][w].get(k) for k in ("used_fraction", "perplexity", "compactness")}
            for w in ("normal", "abnormal")
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nstage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"summary: {out / 'summary.json'}; bundle: {bundle}; evaluation: {out / 'eval' / 'model_eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
