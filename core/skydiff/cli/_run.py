"""``skydiff run``: the whole pipeline on one science/template pair, outputs in a directory."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skydiff.cli._config import add_config_options, load_config
from skydiff.cli._subtract import add_input_options, input_files, read_inputs

log = logging.getLogger("skydiff.cli.run")

#: The files ``skydiff run`` writes in OUTDIR (score.fits only when the subtraction makes a
#: score image, qa.png unless --no-qa).
RUN_OUTPUTS: tuple[str, ...] = ("difference.fits", "matched_template.fits", "score.fits",
                                "catalog.ecsv", "sources.reg", "metrics.json", "qa.png",
                                "config.toml")

_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".gz")

USAGE = ("skydiff run [PIPELINE.toml] SCIENCE TEMPLATE -o OUTDIR [-c KEY=VALUE ...] "
         "[--config FILE] [--overwrite] [--no-qa] [companion options] [-v] [-q] [--debug]")


def add_parser(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser(
        "run", help="subtract, detect, measure and compute metrics for one pair",
        usage=USAGE,
        description="Run the whole pipeline on one science/template pair: PSF-match and "
                    "subtract, detect and measure the sources of the difference, compute "
                    "the quality metrics, and write difference.fits, matched_template.fits, "
                    "score.fits (when the subtraction makes one), catalog.ecsv, sources.reg, "
                    "metrics.json, qa.png and config.toml (the effective configuration) to "
                    "OUTDIR. The optional first argument is the pipeline file (TOML), the "
                    "same as --config.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="[PIPELINE.toml] SCIENCE TEMPLATE: an optional pipeline file, "
                             "then the science and template images (FITS), same pixel grid")
    parser.add_argument("-o", "--outdir", type=Path, required=True, metavar="OUTDIR",
                        help="output directory (created if missing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs in OUTDIR")
    parser.add_argument("--no-qa", action="store_true",
                        help="do not write the QA figure qa.png")
    add_config_options(parser, example="detect.use_score=never")
    add_input_options(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def resolve_files(args: argparse.Namespace) -> Path | None:
    """Split ``args.files`` into the pipeline file (returned) and ``args.science/template``.

    Raises
    ------
    InputError
        For other than 2 or 3 files, a pipeline file given twice (positional and
        ``--config``), or a FITS-looking pipeline file / TOML-looking image.
    """
    from skydiff.errors import InputError

    files: list[Path] = list(args.files)
    if len(files) not in (2, 3):
        msg = (f"expected [PIPELINE.toml] SCIENCE TEMPLATE, got {len(files)} file(s); "
               f"usage: {USAGE.split(' -o')[0]} -o OUTDIR")
        raise InputError(msg)
    pipeline: Path | None = None
    if len(files) == 3:
        pipeline = files.pop(0)
        if pipeline.name.lower().endswith(_FITS_SUFFIXES):
            msg = (f"the first of three files, {pipeline}, should be the pipeline file "
                   "(TOML) but looks like a FITS image; give SCIENCE and TEMPLATE only")
            raise InputError(msg)
        if args.config is not None:
            msg = (f"the pipeline file is given twice ({pipeline} and --config "
                   f"{args.config}); give one")
            raise InputError(msg)
    elif files[0].suffix.lower() == ".toml":
        msg = (f"{files[0]} is a pipeline file but only one image follows; give "
               "PIPELINE.toml SCIENCE TEMPLATE")
        raise InputError(msg)
    args.science, args.template = files
    return pipeline if pipeline is not None else args.config


#: At most this many values of a metric are printed (all are in metrics.json).
_MAX_PRINTED = 8


def _format_metrics(metrics: dict[str, dict[str, float]], errors: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(metrics) | set(errors)):
        values = sorted(metrics.get(name, {}).items())
        text = ", ".join(f"{key}={value:.4g}" for key, value in values[:_MAX_PRINTED])
        if len(values) > _MAX_PRINTED:
            text += f", ... ({len(values) - _MAX_PRINTED} more in metrics.json)"
        if name in errors:
            text = f"{text}; FAILED: {errors[name]}" if text else f"FAILED: {errors[name]}"
        lines.append(f"  {name}: {text or '(no values)'}")
    return lines


def write_run_outputs(result: Any, outdir: Path, *, config: Any, science: Any,
                      provenance: Any, overwrite: bool, qa: bool,
                      meta: dict[str, str] | None = None) -> list[str]:
    """Write the products of a :class:`~skydiff.pipeline.PipelineResult` into ``outdir``.

    Writes the files of :data:`RUN_OUTPUTS` (``score.fits`` only when there is a score
    image; with ``overwrite`` a stale one is removed; ``qa.png`` only with ``qa`` and
    matplotlib installed) and returns their names in writing order. ``meta`` is added to the
    catalog's metadata and to metrics.json.
    """
    import importlib.util

    from skydiff.io import atomic_path, write_catalog, write_exposure, write_metrics, write_regions

    written: list[str] = []
    subtraction, detection = result.subtraction, result.detection

    def exposure(name: str, value: Any) -> None:
        if value is None:
            stale = outdir / name
            if overwrite and stale.is_file():
                log.info("removing %s left by an earlier run (this run makes none)", stale)
                stale.unlink()
            return
        write_exposure(value, outdir / name, overwrite=overwrite, provenance=provenance)
        written.append(name)

    exposure("difference.fits", detection.difference)
    exposure("matched_template.fits", subtraction.matched_image)
    exposure("score.fits", subtraction.score)
    catalog = detection.catalog
    catalog.meta.update(meta or {})
    write_catalog(catalog, outdir / "catalog.ecsv", overwrite=overwrite)
    written.append("catalog.ecsv")
    write_regions(catalog, outdir / "sources.reg", overwrite=overwrite)
    written.append("sources.reg")
    errors = dict(result.metadata.get("metric_errors", {}))
    write_metrics(result.metrics, outdir / "metrics.json", errors=errors, overwrite=overwrite,
                  extra=meta)
    written.append("metrics.json")
    if qa:
        if importlib.util.find_spec("matplotlib") is None:
            log.warning("matplotlib is not installed: qa.png not written (pip install "
                        "'skydiff[qa]', or pass --no-qa)")
        else:
            from skydiff.qa import plot_detection_qa

            plot_detection_qa(result, outdir / "qa.png", science=science, overwrite=overwrite)
            written.append("qa.png")
    with atomic_path(outdir / "config.toml", overwrite=overwrite) as tmp:
        tmp.write_text(config.dump_toml(), encoding="utf-8")
    written.append("config.toml")
    return written


def report_lines(result: Any, config: Any) -> list[str]:
    """The summary printed after a run: subtraction, detections, metrics."""
    from skydiff.cli._detect import summary

    meta = result.subtraction.metadata
    detection = result.detection
    sub_line = f"subtraction: {config.subtract.name}"
    if "n_kernel_sources_used" in meta:
        sub_line += f"; kernel stars used: {meta['n_kernel_sources_used']}"
    if "kernel_sum" in meta:
        sub_line += f"; kernel sum: {float(meta['kernel_sum']):.4f}"
    lines = [sub_line,
             f"detections (on the {detection.metadata.get('detected_on', 'difference')}): "
             f"{summary(detection.catalog)}",
             "metrics:"]
    lines.extend(_format_metrics(result.metrics,
                                 dict(result.metadata.get("metric_errors", {}))))
    return lines


def run(args: argparse.Namespace) -> int:
    from skydiff.cli._detect import check_outputs
    from skydiff.errors import BadSubtractionError, InputError
    from skydiff.io import Provenance
    from skydiff.pipeline import PipelineConfig, run_pipeline

    pipeline_file = resolve_files(args)
    outdir: Path = args.outdir
    if outdir.exists() and not outdir.is_dir():
        msg = f"OUTDIR {outdir} exists and is not a directory; choose a directory"
        raise InputError(msg)
    names = [name for name in RUN_OUTPUTS if not (args.no_qa and name == "qa.png")]
    inputs = input_files(args)
    if pipeline_file is not None:
        inputs.append(pipeline_file)
    check_outputs([outdir / name for name in names], inputs, overwrite=args.overwrite)
    config = load_config(PipelineConfig, pipeline_file, args.overrides)
    assert isinstance(config, PipelineConfig)
    science, template = read_inputs(args)

    bad: BadSubtractionError | None = None
    try:
        result = run_pipeline(science, template, config)
    except BadSubtractionError as exc:
        if getattr(exc, "result", None) is None:
            raise
        bad, result = exc, exc.result  # type: ignore[attr-defined]

    outdir.mkdir(parents=True, exist_ok=True)
    provenance = Provenance.collect(config=config, inputs=inputs)
    written = write_run_outputs(
        result, outdir, config=config, science=science, provenance=provenance,
        overwrite=args.overwrite, qa=not args.no_qa,
        meta={"science": str(args.science), "template": str(args.template)})
    print("\n".join([f"wrote {outdir}: {', '.join(written)}", *report_lines(result, config)]))
    if bad is not None:
        raise bad
    return 0
