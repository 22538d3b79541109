"""``skydiff subtract``: PSF-match, subtract and decorrelate two FITS images."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skydiff.cli._config import add_config_options, load_config

log = logging.getLogger("skydiff.cli.subtract")

_COMPANIONS = (
    ("psf", "PSF image (odd, square) or PSFEx file"),
    ("variance", "variance map"),
    ("weight", "inverse-variance weight map"),
    ("sigma", "1-sigma noise map"),
    ("mask", "bad-pixel map (non-zero = bad)"),
)


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """Companion-file and reading options for the science and template inputs."""
    for which in ("science", "template"):
        group = parser.add_argument_group(f"{which} companions (for plain single-HDU images)")
        for key, help_text in _COMPANIONS:
            group.add_argument(f"--{which}-{key}", type=Path, metavar="FILE",
                               help=f"{which} {help_text}")
        group.add_argument(f"--{which}-hdu", metavar="HDU",
                           help=f"HDU index or EXTNAME of the {which} image")
        group.add_argument(f"--{which}-saturation", type=float, metavar="LEVEL",
                           help=f"saturation level of the {which} image (default: SATURATE "
                                "keyword, or the largest value of an integer image)")
        group.add_argument(f"--{which}-gain", type=float, metavar="E_PER_ADU",
                           help=f"gain of the {which} image for the variance estimate "
                                "(default: GAIN keyword)")
        group.add_argument(f"--{which}-read-noise", type=float, metavar="E",
                           help=f"read noise of the {which} image in electrons for the variance "
                                "estimate (default: RDNOISE keyword)")


def input_files(args: argparse.Namespace) -> list[Path]:
    """Every file the run reads: the two images and their companions (for provenance)."""
    files = []
    for which in ("science", "template"):
        files.append(getattr(args, which))
        files += [getattr(args, f"{which}_{key}") for key, _ in _COMPANIONS
                  if getattr(args, f"{which}_{key}") is not None]
    return files


def read_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Read the science and template exposures with their companions."""
    from skydiff.io import read_exposure

    exposures = []
    for which in ("science", "template"):
        kwargs: dict[str, Any] = {key: getattr(args, f"{which}_{key}")
                                  for key, _ in _COMPANIONS
                                  if getattr(args, f"{which}_{key}") is not None}
        hdu = getattr(args, f"{which}_hdu")
        if hdu is not None:
            kwargs["hdu"] = int(hdu) if hdu.lstrip("-").isdigit() else hdu
        for option, keyword in (("saturation", "saturation"), ("gain", "gain"),
                                ("read_noise", "read_noise")):
            value = getattr(args, f"{which}_{option}")
            if value is not None:
                kwargs[keyword] = value
        exposures.append(read_exposure(getattr(args, which), **kwargs))
    return exposures[0], exposures[1]


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "subtract", help="PSF-match, subtract and decorrelate a science/template pair",
        description="PSF-match TEMPLATE to SCIENCE (or the reverse), subtract, decorrelate the "
                    "noise and write the difference as a multi-extension FITS exposure "
                    "(IMAGE, MASK, VARIANCE, PSF, provenance). Inputs are skydiff/LSST "
                    "multi-extension exposures or plain images with optional companions; a "
                    "missing variance is estimated and a missing PSF is measured from stars.")
    parser.add_argument("science", type=Path, help="science image (FITS)")
    parser.add_argument("template", type=Path, help="template image (FITS), same pixel grid")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIFF",
                        help="output difference exposure (FITS)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--matched-template", type=Path, metavar="FILE",
                        help="also write the PSF-matched image")
    parser.add_argument("--score", type=Path, metavar="FILE",
                        help="also write the score image (methods that produce one)")
    parser.add_argument("--kernel", type=Path, metavar="FILE",
                        help="also write the matching kernel evaluated on a 5x5 grid (FITS cube "
                             "with a POSITIONS table)")
    parser.add_argument("--qa", type=Path, metavar="PNG",
                        help="also write a QA figure: the kernel across the field and residual "
                             "stamps of the kernel stars (needs matplotlib)")
    add_config_options(parser)
    add_input_options(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def write_outputs(result: Any, args: argparse.Namespace, config: Any,
                  inputs: list[Path]) -> list[Path]:
    """Write the difference and every requested optional product; return what was written."""
    from skydiff.errors import InputError
    from skydiff.io import Provenance, write_exposure

    provenance = Provenance.collect(config=config, inputs=inputs)
    written = []
    targets = [(args.output, result.difference)]
    if args.matched_template is not None:
        if result.matched_image is None:
            msg = "this subtraction produced no matched image; drop --matched-template"
            raise InputError(msg)
        targets.append((args.matched_template, result.matched_image))
    if args.score is not None:
        if result.score is None:
            msg = ("this subtraction produced no score image; select one that does, e.g. "
                   "-c subtract.name=al_preconvolve")
            raise InputError(msg)
        targets.append((args.score, result.score))
    for path, exposure in targets:
        write_exposure(exposure, path, overwrite=args.overwrite, provenance=provenance)
        written.append(path)
    if args.kernel is not None:
        write_kernel_grid(result, args.kernel, overwrite=args.overwrite)
        written.append(args.kernel)
    if args.qa is not None:
        from skydiff.qa import plot_subtraction_qa

        plot_subtraction_qa(result, args.qa, overwrite=args.overwrite)
        written.append(args.qa)
    return written


def write_kernel_grid(result: Any, path: Path, *, overwrite: bool, n: int = 5) -> None:
    """Write the kernel evaluated on an ``n`` x ``n`` grid as a FITS cube plus positions."""
    import numpy as np
    from astropy.io import fits
    from astropy.table import Table

    from skydiff.errors import InputError
    from skydiff.io import atomic_path

    if result.kernel is None:
        msg = "this subtraction has no matching kernel; drop --kernel"
        raise InputError(msg)
    height, width = result.difference.shape
    x0, y0 = result.difference.origin
    xs = x0 + np.linspace(0.0, width - 1.0, n)
    ys = y0 + np.linspace(0.0, height - 1.0, n)
    gx, gy = np.meshgrid(xs, ys)
    images = np.asarray(result.kernel.images_at(gx.ravel(), gy.ravel()), dtype=np.float32)
    primary = fits.PrimaryHDU(images)
    primary.header["EXTNAME"] = "KERNEL"
    primary.header["COMMENT"] = "PSF-matching kernel images at the positions of POSITIONS"
    positions = fits.table_to_hdu(Table({"x": gx.ravel(), "y": gy.ravel(),
                                         "sum": images.sum(axis=(1, 2))}))
    positions.name = "POSITIONS"
    with atomic_path(path, overwrite=overwrite) as tmp:
        fits.HDUList([primary, positions]).writeto(tmp)


def run(args: argparse.Namespace) -> int:
    from skydiff.errors import InputError
    from skydiff.pipeline import PipelineConfig, subtract

    outputs = [p for p in (args.output, args.matched_template, args.score, args.kernel, args.qa)
               if p is not None]
    inputs = input_files(args)
    for path in outputs:
        if any(path.resolve() == src.resolve() for src in inputs):
            msg = f"output {path} is an input; choose another output name"
            raise InputError(msg)
        if path.exists() and not args.overwrite:
            msg = f"{path} already exists; pass --overwrite to replace it"
            raise InputError(msg)
    config = load_config(PipelineConfig, args.config, args.overrides)
    assert isinstance(config, PipelineConfig)
    science, template = read_inputs(args)
    result = subtract(science, template, config)
    written = write_outputs(result, args, config, inputs)
    meta = result.metadata
    summary = [f"wrote {', '.join(str(p) for p in written)}"]
    if "n_kernel_sources_used" in meta:
        summary.append(f"kernel stars used: {meta['n_kernel_sources_used']}")
    if "kernel_sum" in meta:
        summary.append(f"kernel sum: {meta['kernel_sum']:.4f}")
    print("; ".join(summary))
    return 0
