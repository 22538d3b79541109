"""The top-level pipeline configuration and the :func:`subtract` entry point.

A pipeline file is TOML; each step is a :class:`~skydiff.config.RegistryField`, so switching an
algorithm is one line (``name = "..."``) and every alternative keeps its own settings::

    [subtract]
    name = "al"

    [subtract.al]
    spatial_kernel_order = 1

    [executor]
    name = "processes"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skydiff.config import Config, RegistryField, RegistrySelection, configclass
from skydiff.errors import InputError

if TYPE_CHECKING:
    from astropy.table import Table

    from skydiff.exposure import Exposure
    from skydiff.roles import SubtractionResult

__all__ = ["PipelineConfig", "subtract"]


@configclass
class PipelineConfig(Config):
    """Configuration of a skydiff pipeline run."""

    subtract: RegistrySelection = RegistryField(
        "subtraction", default="al",
        doc="The subtraction algorithm (PSF matching, subtraction and, through its own "
            "'decorrelation' setting, noise decorrelation).")
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
