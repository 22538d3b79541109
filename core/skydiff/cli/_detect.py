"""``skydiff detect``: detect and measure the sources of a difference image."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skydiff.cli._config import add_config_options, load_config

log = logging.getLogger("skydiff.cli.detect")

#: ``--format`` choices.
FORMATS = ("ecsv", "fits", "parquet")


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "detect", help="detect, measure and classify the sources of a difference image",
        description="Detect positive and negative sources on a difference image (or on a "
                    "score image), add sky sources, measure them with the measurement "
                    "plugins, classify dipoles and write the catalog. The configuration is "
                    "a pipeline file: only its [detect] section is used, and -c keys carry "
                    "the 'detect.' prefix (e.g. -c detect.n_sky_sources=50).")
    parser.add_argument("difference", type=Path, metavar="DIFF",
                        help="difference exposure (FITS, e.g. from skydiff subtract)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="CATALOG",
                        help="output catalog (.ecsv by default; .fits or .parquet by suffix "
                             "or --format)")
    parser.add_argument("--science", type=Path, metavar="SCIENCE",
                        help="science exposure (forced photometry, dipole fits)")
    parser.add_argument("--template", type=Path, metavar="MATCHED_TEMPLATE",
                        help="PSF-matched template (forced photometry, dipole fits)")
    parser.add_argument("--score", type=Path, metavar="SCORE",
                        help="score image: detection runs on it (detect.use_score=auto)")
    parser.add_argument("--psf", type=Path, metavar="FILE",
                        help="PSF image or PSFEx file of the difference (for a plain image "
                             "without a PSF extension)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="catalog format (default: from the suffix of CATALOG, else ecsv)")
    parser.add_argument("--regions", type=Path, metavar="REG",
                        help="also write a DS9 region file of the sources")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_config_options(parser, example="detect.n_sky_sources=50")
    add_common(parser)
    parser.set_defaults(func=run)


def check_outputs(outputs: list[Path], inputs: list[Path], *, overwrite: bool) -> None:
    """Refuse outputs that are inputs, or that exist without ``--overwrite``."""
    from skydiff.errors import InputError

    for path in outputs:
        if any(path.resolve() == src.resolve() for src in inputs):
            msg = f"output {path} is an input; choose another output name"
            raise InputError(msg)
        if path.exists() and not overwrite:
            msg = f"{path} already exists; pass --overwrite to replace it"
            raise InputError(msg)


def summary(catalog: Any) -> str:
    """``"N sources (P positive, M negative, D dipoles) + S sky sources"``."""
    import numpy as np

    sky = np.asarray(catalog["sky_source"], dtype=bool)
    dipole = np.asarray(catalog["is_dipole"], dtype=bool) & ~sky
    negative = np.asarray(catalog["is_negative"], dtype=bool) & ~sky & ~dipole
    positive = ~sky & ~dipole & ~negative
    return (f"{int(np.count_nonzero(~sky))} sources ({int(positive.sum())} positive, "
            f"{int(negative.sum())} negative, {int(dipole.sum())} dipoles) + "
            f"{int(sky.sum())} sky sources")


def run(args: argparse.Namespace) -> int:
    from skydiff.detect import detect_and_measure
    from skydiff.io import read_exposure, write_catalog, write_regions
    from skydiff.pipeline import PipelineConfig

    inputs = [p for p in (args.difference, args.psf, args.science, args.template, args.score)
              if p is not None]
    outputs = [p for p in (args.output, args.regions) if p is not None]
    check_outputs(outputs, inputs, overwrite=args.overwrite)
    config = load_config(PipelineConfig, args.config, args.overrides)
    assert isinstance(config, PipelineConfig)
    difference = (read_exposure(args.difference, psf=args.psf) if args.psf is not None
                  else read_exposure(args.difference))
    science = read_exposure(args.science) if args.science is not None else None
    template = read_exposure(args.template) if args.template is not None else None
    score = read_exposure(args.score) if args.score is not None else None
    result = detect_and_measure(difference, science=science, template=template, score=score,
                                config=config.detect)
    catalog = result.catalog
    catalog.meta["image"] = str(args.difference)
    write_catalog(catalog, args.output, format=args.format, overwrite=args.overwrite)
    written = [args.output]
    if args.regions is not None:
        write_regions(catalog, args.regions, overwrite=args.overwrite)
        written.append(args.regions)
    print(f"wrote {', '.join(str(p) for p in written)}; {summary(catalog)}")
    return 0
