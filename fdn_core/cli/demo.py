"""``fdn demo``: phantom cohort -> shipped model -> code database -> retrieval evaluation -> HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdn_core.cli.args import add_device, add_model, add_no_progress

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    from fdn_core.demo import DEFAULT_MODEL_DIR, DemoSettings

    d = DemoSettings(out=Path("demo_out"))
    p = sub.add_parser(
        "demo",
        help="run the whole product on a phantom cohort with the shipped model and write an HTML report",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--cases", type=int, default=d.cases, help=f"phantom cases (default {d.cases})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"cohort seed (default {d.seed})")
    p.add_argument("--shape", type=int, nargs=3, default=list(d.shape), metavar=("X", "Y", "Z"))
    p.add_argument("--query-fraction", type=float, default=d.query_fraction)
    add_model(
        p,
        required=False,
        default=DEFAULT_MODEL_DIR,
        help="inference bundle folder (default: the shipped model)",
    )
    add_device(p)
    p.add_argument("--workers", type=int, default=None, help="phantom worker processes (default: all cores)")
    p.add_argument("--top", type=int, default=d.top)
    p.add_argument(
        "--embeddings",
        nargs="*",
        default=None,
        metavar="NAME|FOLDER",
        help="trained baselines beside the FDN (default: the shipped simsiam and ynet; none: skip them)",
    )
    p.add_argument(
        "--explain-queries",
        type=int,
        default=d.explain_queries,
        help=f"queries explained with RELAX for the mass shares (default {d.explain_queries}; 0: none)",
    )
    p.add_argument(
        "--explain-masks", type=int, default=d.explain_masks, help=f"RELAX masks (default {d.explain_masks})"
    )
    add_no_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed arguments."""
    from fdn_core.demo import DemoSettings, run_demo
    from fdn_core.progress import tqdm_progress

    settings = DemoSettings(
        out=args.out,
        cases=args.cases,
        seed=args.seed,
        shape=tuple(args.shape),
        query_fraction=args.query_fraction,
        model=args.model,
        device=args.device,
        workers=args.workers,
        top=args.top,
        embeddings=None if args.embeddings is None else tuple(args.embeddings),
        explain_queries=args.explain_queries,
        explain_masks=args.explain_masks,
    )
    run_demo(settings, lambda: tqdm_progress(disable=args.no_progress))
    return 0
