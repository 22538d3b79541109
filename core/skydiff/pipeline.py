r"""The top-level pipeline configuration and its entry points :func:`subtract` and
:func:`run_pipeline`.

A pipeline file is TOML; each step is a :class:`~skydiff.config.RegistryField` (or a nested
config holding some), so switching an algorithm is one line (``name = "..."``) and every
alternative keeps its own settings::

    [subtract]
    name = "al"

    [subtract.al]
    spatial_kernel_order = 1

    [detect]
    n_sky_sources = 200

    [detect.detection.threshold]
    threshold = 5.0

    [metrics]
    names = ["source_count", "dia_fraction"]

    [executor]
    name = "processes"

:func:`run_pipeline` runs one science/template pair through every step: ``subtract`` →
``detect`` (:func:`~skydiff.detect_and_measure`) → science sources
(:func:`~skydiff.sources.find_stars`) → ``metrics``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import attrs

from skydiff.config import (
    Config,
    ConfigField,
    Field,
    RegistryField,
    RegistrySelection,
    configclass,
)
from skydiff.detect import DetectAndMeasureConfig, DetectAndMeasureResult
from skydiff.errors import AlgorithmError, BadSubtractionError, InputError
from skydiff.roles import SubtractionResult

if TYPE_CHECKING:
    from astropy.table import Table

    from skydiff.exposure import Exposure

__all__ = ["DEFAULT_METRICS", "PipelineConfig", "PipelineResult", "run_pipeline", "subtract"]

log = logging.getLogger("skydiff.pipeline")

#: The metrics computed by default.
DEFAULT_METRICS: tuple[str, ...] = ("source_count", "dia_fraction", "residual_footprint_ratio",
                                    "spatial")


@configclass
class PipelineConfig(Config):
    """Configuration of a skydiff pipeline run."""

    subtract: RegistrySelection = RegistryField(
        "subtraction", default="al",
        doc="The subtraction algorithm (PSF matching, subtraction and, through its own "
            "'decorrelation' setting, noise decorrelation).")
    detect: DetectAndMeasureConfig = ConfigField(
        DetectAndMeasureConfig,
        doc="Detection, sky sources, measurement and dipole classification on the difference.")
    metrics: RegistrySelection = RegistryField(
        "metric", default=DEFAULT_METRICS, optional=True,
        doc="The quality metrics computed from the outputs of a run.")
    fail_on_bad_subtraction: bool = Field(
        True, doc="Raise the BadSubtractionError a metric reports (after every metric ran, "
                  "with the full result attached as error.result), as upstream does; false "
                  "records it in the result's metadata only.")
    executor: RegistrySelection = RegistryField(
        "executor", default="serial",
        doc="How many science/template pairs are processed: in turn (serial) or in local "
            "worker processes (processes).")


def subtract(science: Exposure, template: Exposure, config: PipelineConfig | None = None, *,
             sources: Table | None = None) -> SubtractionResult:
    """PSF-match, subtract and decorrelate one science/template pair.

    The Python twin of ``skydiff subtract``: the subtraction algorithm named by
    ``config.subtract`` (``"al"`` by default) runs with its settings.

    Parameters
    ----------
    science, template : Exposure
        The two exposures, on the same pixel grid.
    config : PipelineConfig, optional
        The pipeline configuration; defaults to ``PipelineConfig()``.
    sources : astropy.table.Table, optional
        Stars to fit the kernel on (columns ``x``, ``y``: 0-based column and row); found in
        the images when omitted.

    Returns
    -------
    SubtractionResult
        The decorrelated ``difference`` (science flux units, with variance and PSF), the
        ``matched_image``, the ``kernel``, the fitted ``background``, the ``score`` (for
        methods that make one), the ``kernel_sources`` and ``metadata``.

    Raises
    ------
    InputError
        If the inputs are not exposures or are inconsistent (shape, origin, WCS).
    AlgorithmError
        If the data do not support the fit (e.g. too few kernel stars).
    NoWorkFound
        If the template covers too little of the science image.

    Examples
    --------
    >>> import skydiff
    >>> from skydiff.sim import simulate_pair
    >>> pair = simulate_pair(shape=(256, 256), n_stars=150, seed=1)
    >>> result = skydiff.subtract(pair.science, pair.template)
    >>> result.difference.shape
    (256, 256)
    """
    from skydiff.exposure import Exposure

    for name, value in (("science", science), ("template", template)):
        if not isinstance(value, Exposure):
            msg = (f"{name} must be a skydiff.Exposure, got {type(value).__name__}; "
                   "read files with skydiff.Exposure.read(path)")
            raise InputError(msg)
    config = PipelineConfig() if config is None else config
    task = config.subtract.apply(name="subtract")
    return task.run(science, template, sources=sources)


# --------------------------------------------------------------------------------------------
# the full pipeline


def _dict(value: Any) -> dict[str, Any]:
    return dict(value or {})


@attrs.frozen
class PipelineResult:
    """Result of :func:`run_pipeline`.

    Attributes
    ----------
    subtraction : SubtractionResult
        The subtraction (difference, matched image, kernel, score, kernel sources, ...).
    detection : DetectAndMeasureResult
        The catalog, footprints and processed difference of the ``detect`` step.
    metrics : dict of str to dict of str to float
        ``{metric name: {value name: value}}``; empty for a metric that failed.
    metric_tables : dict of str to astropy.table.Table
        The per-position or per-source tables of the metrics that return one.
    science_sources : astropy.table.Table or None
        The sources found on the science image (:func:`skydiff.find_stars`), None when that
        failed.
    metadata : dict
        ``metric_errors`` (``{name: message}``), ``bad_subtraction`` (bool),
        ``n_science_sources`` and wall-clock ``timing`` of each step (seconds).
    """

    subtraction: SubtractionResult
    detection: DetectAndMeasureResult
    metrics: dict[str, dict[str, float]] = attrs.field(factory=dict, converter=_dict)
    metric_tables: dict[str, Table] = attrs.field(factory=dict, converter=_dict, eq=False)
    science_sources: Table | None = attrs.field(default=None, eq=False)
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_dict)


def detection_inputs(science: Exposure, template: Exposure, subtraction: SubtractionResult
                     ) -> tuple[Exposure, Exposure]:
    """The science and template images whose difference the subtraction made.

    With the template convolved (AL's usual case) these are the science and the matched
    template; with the science convolved, the matched (convolved) science and the template;
    for methods that filter both (``convolved = "none"``, e.g. ZOGY), the two inputs.
    """
    matched = subtraction.matched_image
    if matched is None or subtraction.convolved == "none":
        return science, template
    if subtraction.convolved == "science":
        return matched, template
    return science, matched


def run_pipeline(science: Exposure, template: Exposure, config: PipelineConfig | None = None,
                 *, sources: Table | None = None) -> PipelineResult:
    """Subtract, detect and measure, and compute the quality metrics of one pair.

    The Python twin of ``skydiff run``. Steps:

    1. :func:`subtract` with ``config.subtract``;
    2. :func:`~skydiff.detect_and_measure` with ``config.detect`` on the difference,
       with the science and matched template (see ``detection_inputs``) and the
       subtraction's score image;
    3. the science sources, :func:`skydiff.find_stars` on the science image;
    4. every metric of ``config.metrics`` in order, on a :class:`~skydiff.roles.MetricInputs`
       holding all of the above, the kernel and its stars. A metric that raises is logged
       and recorded in ``metadata["metric_errors"]`` and the others run on; a
       :class:`~skydiff.errors.BadSubtractionError` is re-raised once every metric ran
       (``config.fail_on_bad_subtraction``, upstream's behaviour), with the complete
       :class:`PipelineResult` attached as its ``result`` attribute.

    Parameters
    ----------
    science, template : Exposure
        The two exposures, on the same pixel grid.
    config : PipelineConfig, optional
        The pipeline configuration; defaults to ``PipelineConfig()``.
    sources : astropy.table.Table, optional
        Stars to fit the kernel on (``x``, ``y``); found in the images when omitted.

    Returns
    -------
    PipelineResult
        ``subtraction``, ``detection``, ``metrics``, ``metric_tables``,
        ``science_sources`` and ``metadata``.

    Raises
    ------
    InputError
        If the inputs are not exposures or are inconsistent, or a plugin reports bad input.
    AlgorithmError
        If the subtraction or the detection fails on these data.
    BadSubtractionError
        If a metric finds the difference unusable and ``config.fail_on_bad_subtraction``.
    NoWorkFound
        If the template covers too little of the science image.

    Examples
    --------
    >>> from skydiff.pipeline import run_pipeline
    >>> from skydiff.sim import simulate_pair
    >>> pair = simulate_pair(shape=(256, 256), n_stars=150, n_transients=3, seed=3)
    >>> result = run_pipeline(pair.science, pair.template)
    >>> sorted(result.metrics)
    ['dia_fraction', 'residual_footprint_ratio', 'source_count', 'spatial']
    >>> result.metadata["bad_subtraction"]
    False
    """
    from skydiff.detect import DetectAndMeasureTask
    from skydiff.roles import MetricInputs
    from skydiff.sources import find_stars

    config = PipelineConfig() if config is None else config
    if not isinstance(config, PipelineConfig):
        msg = f"config must be a PipelineConfig, got {type(config).__name__}"
        raise InputError(msg)
    timing: dict[str, float] = {}
    # Build every task first: a configuration error surfaces before any pixel is touched.
    detect_task = DetectAndMeasureTask(config.detect)
    metric_names = config.metrics.names
    metric_tasks = [target(config=config.metrics[name], name=f"metrics.{name}")
                    for name, target in zip(metric_names, config.metrics.targets, strict=True)]

    start = time.perf_counter()
    subtraction = subtract(science, template, config, sources=sources)
    timing["subtract"] = time.perf_counter() - start

    start = time.perf_counter()
    det_science, det_template = detection_inputs(science, template, subtraction)
    detection = detect_task.run(subtraction.difference, science=det_science,
                                template=det_template, score=subtraction.score)
    timing["detect"] = time.perf_counter() - start

    start = time.perf_counter()
    science_sources: Table | None
    try:
        science_sources = find_stars(science)
    except AlgorithmError as exc:
        log.warning("no science sources for the metrics: %s", exc)
        science_sources = None
    timing["science_sources"] = time.perf_counter() - start

    inputs = MetricInputs(science=det_science, template=det_template,
                          difference=detection.difference, catalog=detection.catalog,
                          science_sources=science_sources,
                          kernel_sources=subtraction.kernel_sources, kernel=subtraction.kernel)
    metrics: dict[str, dict[str, float]] = {}
    tables: dict[str, Table] = {}
    errors: dict[str, str] = {}
    bad: list[BadSubtractionError] = []
    start = time.perf_counter()
    for name, task in zip(metric_names, metric_tasks, strict=True):
        try:
            result = task.run(inputs)
            values = {str(key): float(value) for key, value in result.values.items()}
        except (InputError, MemoryError):
            raise
        except BadSubtractionError as exc:
            # Raised after the loop (the error message says it), or a warning if not raised.
            log.log(logging.INFO if config.fail_on_bad_subtraction else logging.WARNING,
                    "metric %r reports a bad subtraction: %s", name, exc)
            bad.append(exc)
            errors[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            metrics[name] = {key: float(value) for key, value in exc.metadata.items()
                             if isinstance(value, int | float) and not isinstance(value, bool)}
            continue
        except Exception as exc:
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            log.warning("metric %r failed (its values are missing): %s", name, message)
            errors[name] = message
            metrics[name] = {}
            continue
        metrics[name] = values
        if result.table is not None:
            tables[name] = result.table
    timing["metrics"] = time.perf_counter() - start

    pipeline_result = PipelineResult(
        subtraction=subtraction, detection=detection, metrics=metrics, metric_tables=tables,
        science_sources=science_sources,
        metadata={"metric_errors": errors, "bad_subtraction": bool(bad),
                  "n_science_sources": -1 if science_sources is None else len(science_sources),
                  "timing": timing})
    if bad and config.fail_on_bad_subtraction:
        error = bad[0]
        error.result = pipeline_result  # type: ignore[attr-defined]
        raise error
    return pipeline_result
