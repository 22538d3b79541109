"""``skydiff demo``: simulate a pair, run the whole pipeline and compare with the truth."""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("skydiff.cli.demo")

#: Largest distance (pixels) between an injected source and the detection matched to it.
MATCH_RADIUS = 2.0

_INPUT_FILES = ("science.fits", "template.fits", "truth.ecsv")


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "demo", help="simulate a pair, run the pipeline and report what was recovered",
        description="Simulate a realistic science/template pair (spatially varying PSF, "
                    "sub-pixel offset, different flux scale, ten injected transients and "
                    "four variable stars, some fading), run the whole pipeline (subtract, "
                    "detect and measure, metrics), write the inputs, the truth and every "
                    "output of 'skydiff run' to the output directory, and compare what was "
                    "detected with what was injected.")
    parser.add_argument("outdir", type=Path, nargs="?", default=None,
                        help="output directory, created if missing (same as -o)")
    parser.add_argument("-o", "--outdir", dest="outdir_option", type=Path, default=None,
                        metavar="OUTDIR",
                        help="output directory (default: a new temporary directory)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-qa", action="store_true", help="do not write qa.png")
    add_common(parser)
    parser.set_defaults(func=run)


def _nearest(catalog: Any, x: float, y: float) -> tuple[int, float]:
    """Index of the catalog row nearest (x, y) and its distance (-1, inf when empty)."""
    if len(catalog) == 0:
        return -1, float("inf")
    distance = np.hypot(np.asarray(catalog["x"], dtype=float) - x,
                        np.asarray(catalog["y"], dtype=float) - y)
    index = int(np.argmin(distance))
    return index, float(distance[index])


def _value(row: Any, name: str) -> float:
    return float(row[name]) if row is not None and name in row.colnames else float("nan")


def truth_report(catalog: Any, truth: Any, flux_scale: float) -> list[str]:
    """Lines comparing the detections of ``catalog`` with the injected sources of ``truth``.

    A truth source is recovered when a non-sky detection lies within
    :data:`MATCH_RADIUS` pixels of it (each detection matches one source at most).
    """
    sky = np.asarray(catalog["sky_source"], dtype=bool)
    real = catalog[~sky]
    used: set[int] = set()
    lines = ["injected transients (x, y, true flux -> measured flux ± error, S/N):"]
    recovered = 0
    transients = truth[truth["kind"] == "transient"]

    def match(x: float, y: float) -> Any:
        index, distance = _nearest(real, x, y)
        if index < 0 or distance > MATCH_RADIUS or index in used:
            return None
        used.add(index)
        return real[index]

    for source in transients:
        row = match(float(source["x"]), float(source["y"]))
        flux, err, snr = (_value(row, "psf_flux"), _value(row, "psf_flux_err"),
                          _value(row, "snr"))
        recovered += bool(snr > 5)
        lines.append(f"  ({float(source['x']):7.1f}, {float(source['y']):7.1f})  "
                     f"{float(source['flux_science']):9.1f} -> {flux:9.1f} ± {err:6.1f}   "
                     f"S/N {snr:6.1f}")
    lines.append(f"{recovered} of {len(transients)} transients recovered at S/N > 5 "
                 f"(detected within {MATCH_RADIUS:g} px)")
    variables = truth[truth["kind"] == "variable"]
    if len(variables):
        lines.append("variable stars (science flux - scaled template flux = expected "
                     "difference flux):")
        for source in variables:
            expected = (float(source["flux_science"])
                        - flux_scale * float(source["flux_template"]))
            kind = "brightening" if expected > 0 else "fading"
            row = match(float(source["x"]), float(source["y"]))
            if row is None:
                found = "not detected"
            else:
                polarity = ("dipole" if bool(row["is_dipole"]) else
                            "negative" if bool(row["is_negative"]) else "positive")
                found = (f"detected as {polarity}, measured {_value(row, 'psf_flux'):+.1f} "
                         f"± {_value(row, 'psf_flux_err'):.1f}")
            lines.append(f"  {kind} star at x={float(source['x']):.1f}, "
                         f"y={float(source['y']):.1f}: expected {expected:+.1f}; {found}")
    others = len(real) - len(used)
    if others:
        stars = truth[truth["kind"] == "star"]
        on_stars = 0
        for index in set(range(len(real))) - used:
            sx = np.asarray(stars["x"], dtype=float) - float(real[index]["x"])
            sy = np.asarray(stars["y"], dtype=float) - float(real[index]["y"])
            on_stars += bool(len(stars) and np.min(np.hypot(sx, sy)) <= 2 * MATCH_RADIUS)
        lines.append(f"other detections: {others} ({on_stars} on constant stars: subtraction "
                     f"residuals; {others - on_stars} elsewhere: noise or defects)")
    else:
        lines.append("other detections: none")
    if np.any(sky):
        sky_snr = np.asarray(catalog["snr"], dtype=float)[sky]
        finite = sky_snr[np.isfinite(sky_snr)]
        if finite.size:
            lines.append(f"sky sources: {int(sky.sum())}; S/N std {np.std(finite):.2f} "
                         f"(1 for pure noise), {int(np.sum(np.abs(finite) > 5))} above 5σ")
    return lines


def run(args: argparse.Namespace) -> int:
    from skydiff.cli._run import RUN_OUTPUTS, report_lines, write_run_outputs
    from skydiff.errors import BadSubtractionError, InputError
    from skydiff.exposure import robust_sigma
    from skydiff.io import Provenance, write_catalog, write_exposure
    from skydiff.pipeline import PipelineConfig, run_pipeline
    from skydiff.sim import simulate_pair

    if args.outdir is not None and args.outdir_option is not None:
        msg = "give the output directory once: as OUTDIR or as -o, not both"
        raise InputError(msg)
    size = int(args.size)
    if size < 256:
        msg = f"--size must be at least 256 pixels (enough stars for the kernel fit), got {size}"
        raise InputError(msg)
    given = args.outdir if args.outdir is not None else args.outdir_option
    names = [*_INPUT_FILES, *(n for n in RUN_OUTPUTS if not (args.no_qa and n == "qa.png"))]
    if given is not None and not args.overwrite:
        existing = [str(given / n) for n in names if (given / n).exists()]
        if existing:
            msg = f"{', '.join(existing)} already exist; pass --overwrite to replace them"
            raise InputError(msg)
    n_stars = max(200, size * size // 1300)
    flux_scale = 0.9
    pair = simulate_pair(
        shape=(size, size), n_stars=n_stars, n_transients=10, transient_flux=(3000.0, 20000.0),
        n_variables=4, variable_flux=(5000.0, 20000.0), variable_fraction=0.5,
        offset=(0.3, -0.2), flux_scale=flux_scale, seed=args.seed,
        science={"fwhm": 4.0, "fwhm_gradient": (0.2, 0.0)}, template={"fwhm": 3.0})
    config = PipelineConfig()
    log.info("running the pipeline on a %dx%d pair with %d stars", size, size, n_stars)
    bad: BadSubtractionError | None = None
    try:
        result = run_pipeline(pair.science, pair.template, config)
    except BadSubtractionError as exc:
        if getattr(exc, "result", None) is None:
            raise
        bad, result = exc, exc.result  # type: ignore[attr-defined]
    outdir = Path(tempfile.mkdtemp(prefix="skydiff-demo-")) if given is None else given
    outdir.mkdir(parents=True, exist_ok=True)
    write_exposure(pair.science, outdir / "science.fits", overwrite=args.overwrite)
    write_exposure(pair.template, outdir / "template.fits", overwrite=args.overwrite)
    write_catalog(pair.truth, outdir / "truth.ecsv", overwrite=args.overwrite)
    provenance = Provenance.collect(config=config)
    written = write_run_outputs(result, outdir, config=config, science=pair.science,
                                provenance=provenance, overwrite=args.overwrite,
                                qa=not args.no_qa, meta={"simulation_seed": str(args.seed)})

    difference = result.subtraction.difference
    z = np.asarray(difference.image, dtype=np.float64) / np.sqrt(
        np.asarray(difference.variance, dtype=np.float64))
    clean = ~difference.masked(*difference.mask_planes.names) & np.isfinite(z)
    lines = [f"wrote {outdir}/: {', '.join([*_INPUT_FILES, *written])}",
             *report_lines(result, config)]
    kernel = result.subtraction.kernel
    if kernel is not None:
        ksum = float(kernel.sum_at(*np.add(difference.origin, (size / 2, size / 2))))
        lines.append(f"kernel sum at the centre: {ksum:.4f} (true flux ratio science/template: "
                     f"{flux_scale}; the kernel matches the template to the science)")
    lines.append(f"difference / sqrt(variance) over unmasked pixels: robust std "
                 f"{robust_sigma(z[clean]):.3f} (1 for pure noise)")
    lines.extend(truth_report(result.detection.catalog, pair.truth, flux_scale))
    print("\n".join(lines))
    if bad is not None:
        log.warning("the metrics flag this subtraction as bad: %s", bad)
    return 0
