"""``skydiff bench``: time and memory of each AL subtraction stage in rfft2 units."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    from skydiff.bench import STAGES

    parser = subparsers.add_parser(
        "bench", help="measure each stage of an AL subtraction in rfft2 units",
        description="Simulate a science/template pair (2048x4096 by default), measure one "
                    "full-frame float32 scipy.fft.rfft2 as the unit of time, then report the "
                    "wall time and peak memory of each stage (PSF estimation, source "
                    "selection, kernel solve, convolution, decorrelation, I/O) and of the "
                    "whole subtraction, as seconds and rfft2 ratios, MB and ratios to the "
                    "bytes of one input exposure. Progress goes to stderr, the table to "
                    "stdout.")
    parser.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"),
                        default=(2048, 4096), help="image shape (default 2048 4096)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per stage; the median is reported (default 3)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                        default=list(STAGES),
                        help=f"stages to run (default all): {', '.join(STAGES)}")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the full result as JSON (atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file")
    parser.add_argument("--no-memory", dest="trace_memory", action="store_false",
                        help="skip the tracemalloc run per stage (no peak memory reported)")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from skydiff.bench import run_benchmark
    from skydiff.errors import InputError

    if args.json is not None and args.json.exists() and not args.overwrite:
        msg = f"{args.json} already exists; pass --overwrite to replace it"
        raise InputError(msg)
    quiet = getattr(args, "quiet", 0) > 0

    def progress(message: str) -> None:
        if not quiet:
            print(f"bench: {message}", file=sys.stderr, flush=True)

    result = run_benchmark(size=tuple(args.size), seed=args.seed, stages=args.stages,
                           repeat=args.repeat, trace_memory=args.trace_memory,
                           progress=progress)
    if args.json is not None:
        result.write_json(args.json, overwrite=args.overwrite)
        progress(f"wrote {args.json}")
    print(result.format_table())
    return 0
