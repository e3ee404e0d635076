"""Training throughput benchmark: slices per second and peak memory of one FDN training step.

Each measurement runs in a fresh subprocess (so CPU peak memory, the process's max RSS, belongs to that
configuration alone) on a synthetic batch: random z-scored-like images, half the slices with a tumour
blob, so the distribution-matching critic (m steps) runs as in training. A step is the full generator
step of ``fdn_training.trainer.Trainer.train_step`` (forward under autocast, m critic steps, losses, backward,
gradient clipping, Adam). Data loading is measured separately with ``--data COHORT`` (slice cache +
augmentation, in slices per second per loader process).

    python bench/bench_train.py                       # CPU: tiny_test, demo_cpu, and the paper config
    python bench/bench_train.py --device cuda         # also the paper config at batch 112 (256x256)
    python bench/bench_train.py --data COHORT         # add the data-loading rate
    python bench/bench_train.py --configs cpu_recipe --image-sizes 64 128 --threads 2
                                                      # one config at several input sizes, side by side

``--image-sizes`` runs every config at each size (model and preprocessing; the code grid stays, so 128 px
adds one down/up stage); the run ends with a table of slices/s and peak memory per row.

On CPU the paper config runs at a small batch (``--paper-cpu-batch``, default 4): batch 112 at 256x256
needs tens of GB and minutes per step there; throughput per slice is what matters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["bench_data", "bench_step", "main"]


def sized_config(config: str, image_size: int | None) -> Any:
    """A shipped (or file) config, with model and preprocessing at ``image_size`` when given."""
    from fdn_training.trainconfig import load_train_config

    cfg = load_train_config(config)
    if image_size:
        d = cfg.to_dict()
        d["model"]["image_size"] = d["preprocess"]["image_size"] = image_size
        d["model"]["decoder_channels"] = []  # derived for the new number of stages
        cfg = load_train_config(d)
    return cfg


def bench_step(
    config: str,
    device_name: str,
    batch_size: int | None,
    steps: int,
    warmup: int,
    image_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of a shipped config on a synthetic batch."""
    import dataclasses

    import torch

    from fdn_core.device import select_device
    from fdn_core.losses import FDNLoss
    from fdn_training.build import build_model, make_optimizers
    from fdn_training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = sized_config(config, image_size)
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, batch_size=batch_size))
    device = select_device(device_name)
    b, s = cfg.dataset.batch_size, cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, cfg.model.in_channels, s, s, generator=g)
    seg = torch.zeros(b, s, s, dtype=torch.int64)
    for i in range(0, b, 2):  # every other slice has a tumour: ET core, ED rim
        c = s // 2 + (i % 7) * s // 32
        seg[i, c - s // 8 : c + s // 8, c - s // 8 : c + s // 8] = 2
        seg[i, c - s // 16 : c + s // 16, c - s // 16 : c + s // 16] = 3
    batch = {"image": images, "seg": seg}
    model = build_model(cfg, device)
    loss_fn = FDNLoss(cfg.loss, latent_size=cfg.model.latent_size).to(device)
    opt_g, opt_c = make_optimizers(cfg, model)
    trainer = Trainer(cfg, model, loss_fn, opt_g, opt_c, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        trainer.train_step(batch)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    sync()
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "config": config,
        "device": str(device),
        "image_size": s,
        "latent_size": cfg.model.latent_size,
        "batch_size": b,
        "critic_steps": cfg.optimizer.critic_steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "s_per_step": elapsed / steps,
        "slices_per_s": b * steps / elapsed,
        "threads": torch.get_num_threads(),
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / (1024.0 if sys.platform != "darwin" else 1024.0**2),
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def bench_data(config: str, data_dir: str, items: int, image_size: int | None = None) -> dict[str, Any]:
    """Augmented slices per second read from the slice cache of ``data_dir`` by one process."""
    from fdn_core.data.cache import SliceCache
    from fdn_core.data.dataset import SliceDataset

    cfg = sized_config(config, image_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = SliceCache.build_or_open(data_dir, Path(tmp) / "cache", cfg.preprocess)
        build_s = time.perf_counter() - t0
        ds = SliceDataset(cache, cache.case_ids, augment=True)
        n = min(items, len(ds))
        ds[0]
        t0 = time.perf_counter()
        for i in range(n):
            ds[(i * 7919) % len(ds)]
        elapsed = time.perf_counter() - t0
    return {
        "config": config,
        "image_size": cfg.model.image_size,
        "cache_build_s": build_s,
        "slices_in_cache": len(cache),
        "augmented_slices_per_s": n / elapsed,
    }


def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=dict(os.environ), check=False
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"], "args": args}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"  {' '.join(row['args'])}: FAILED {row['error']}")
        return
    if "augmented_slices_per_s" in row:
        print(
            f"  data loading ({row['config']}, {row['image_size']} px): {row['augmented_slices_per_s']:.1f} "
            "augmented slices/s per "
            f"process; cache build {row['cache_build_s']:.1f} s for {row['slices_in_cache']} slices"
        )
        return
    mem = f"peak RSS {row['peak_rss_mib']:.0f} MiB"
    if "peak_cuda_mib" in row:
        mem += f", peak CUDA {row['peak_cuda_mib']:.0f} MiB ({row['gpu']})"
    print(
        f"  {row['config']:<11} {row['device']:<5} {row['image_size']:>3}px {row['latent_size']}x"
        f"{row['latent_size']} batch {row['batch_size']:>3}: {row['slices_per_s']:8.2f} slices/s "
        f"({row['s_per_step']:.3f} s/step, {row['parameters'] / 1e6:.2f} M params, "
        f"{row['threads']} threads), {mem}"
    )


def _table(rows: list[dict[str, Any]]) -> None:
    """The step rows side by side: slices/s and peak memory per config and size."""
    steps = [r for r in rows if "slices_per_s" in r]
    if len(steps) < 2:
        return
    print(
        "\n| config | device | input | batch | threads | slices/s | s/step | peak RSS MiB | peak CUDA MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in steps:
        cuda = f"{r['peak_cuda_mib']:.0f}" if "peak_cuda_mib" in r else "-"
        print(
            f"| {r['config']} | {r['device']} | {r['image_size']} px | {r['batch_size']} | {r['threads']} | "
            f"{r['slices_per_s']:.2f} | {r['s_per_step']:.3f} | {r['peak_rss_mib']:.0f} | {cuda} |"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark matrix (each measurement in its own process) and print one line per row."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (CPU rows always run)")
    p.add_argument("--configs", nargs="+", default=["tiny_test", "demo_cpu", "fdn8x8_256"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--paper-cpu-batch", type=int, default=4, help="batch of the paper config on CPU")
    p.add_argument("--data", default=None, help="a cohort folder: also measure slice loading + augmentation")
    p.add_argument(
        "--image-sizes",
        nargs="+",
        type=int,
        default=None,
        help="run every config at each of these input sizes (default: each config's own)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", nargs=4, metavar=("CONFIG", "DEVICE", "BATCH", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--one-data", nargs=3, metavar=("CONFIG", "DATA", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        config, device, batch, size = args.one
        row = bench_step(
            config, device, int(batch) or None, args.steps, args.warmup, int(size) or None, args.threads
        )
        print(json.dumps(row))
        return 0
    if args.one_data:
        config, data, size = args.one_data
        print(json.dumps(bench_data(config, data, items=64, image_size=int(size) or None)))
        return 0
    import torch

    rows: list[dict[str, Any]] = []
    sizes = args.image_sizes or [0]
    plan: list[tuple[str, str, int, int]] = []
    for config in args.configs:
        for size in sizes:
            plan.append((config, "cpu", args.paper_cpu_batch if config == "fdn8x8_256" else 0, size))
    want_cuda = args.device in ("cuda", "auto") and torch.cuda.is_available()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: CPU rows only", file=sys.stderr)
    if want_cuda:  # the paper row is batch 112 at 256x256
        plan += [(config, "cuda", 0, size) for config in args.configs for size in sizes]
    print(f"FDN training step benchmark (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    for config, device, batch, size in plan:
        row = _child(["--one", config, device, str(batch), str(size), *common])
        rows.append(row)
        _print(row)
    if args.data:
        for config in args.configs:
            if config == "fdn8x8_256" and not want_cuda:
                continue
            for size in sizes:
                row = _child(["--one-data", config, args.data, str(size)])
                rows.append(row)
                _print(row)
    _table(rows)
    if args.json:
        from fdn_core.fileio import atomic_write_json

        atomic_write_json(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
