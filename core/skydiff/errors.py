"""The skydiff error hierarchy.

Every error skydiff raises on purpose is a :class:`SkydiffError`. Its message is one line that
says what is wrong and how to fix it; the command line prints exactly that line (and the
traceback only with ``--debug``).

The hierarchy follows three tiers:

* *input and configuration errors* (:class:`InputError`, :class:`ConfigError`,
  :class:`PluginLoadError`): the user must change something;
* *expected algorithmic failures* (:class:`AlgorithmError` and subclasses): the data do not
  support the requested computation; they carry scalar ``metadata`` describing why;
* :class:`NoWorkFound`: there is nothing to do (e.g. the template covers too little of the
  science image); a batch run records it and moves on.

Anything else escaping skydiff is a bug.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AlgorithmError",
    "BadSubtractionError",
    "ConfigError",
    "InputError",
    "InsufficientKernelSourcesError",
    "NoKernelCandidatesError",
    "NoWorkFound",
    "PluginLoadError",
    "PsfEstimationError",
    "SkydiffError",
]


class SkydiffError(Exception):
    """Base class of every error skydiff raises deliberately."""


class ConfigError(SkydiffError, ValueError):
    """A configuration value, key, file or plugin name is invalid.

    The message names the dotted path of the offending key and, where the set of valid values is
    closed (keys of a config, names of a role's plugins), lists the valid values.
    """


class PluginLoadError(SkydiffError):
    """A plugin could not be imported or registered.

    Parameters
    ----------
    message : str
        One-line description.
    plugin : str, optional
        Name of the plugin (entry point name or module name).
    distribution : str, optional
        Name of the distribution that provides it.
    """

    def __init__(self, message: str, *, plugin: str | None = None,
                 distribution: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.distribution = distribution


class InputError(SkydiffError, ValueError):
    """An input is missing, malformed or inconsistent (shapes, WCS, files, PSF, variance)."""


class NoWorkFound(SkydiffError):
    """There is nothing to compute for these inputs (not a failure of the algorithm)."""


class AlgorithmError(SkydiffError):
    """An expected failure of an algorithm on these data.

    Parameters
    ----------
    message : str
        One-line description of what failed and what to try.
    **metadata
        Scalars (int, float, str, bool) describing the failure; they are recorded in task
        metadata and in batch reports.
    """

    def __init__(self, message: str, **metadata: Any) -> None:
        super().__init__(message)
        bad = {k: type(v).__name__ for k, v in metadata.items()
               if not isinstance(v, int | float | str | bool)}
        if bad:
            msg = f"AlgorithmError metadata must be scalars, got {bad}"
            raise TypeError(msg)
        self.metadata: Mapping[str, Any] = dict(metadata)


class InsufficientKernelSourcesError(AlgorithmError):
    """Too few usable stars were found to fit a PSF-matching kernel."""


class NoKernelCandidatesError(AlgorithmError):
    """Every kernel candidate was rejected during the kernel fit."""


class BadSubtractionError(AlgorithmError):
    """The difference image fails a quality threshold (e.g. residual footprint ratio)."""


class PsfEstimationError(AlgorithmError):
    """Too few usable stars, or a failed fit, while estimating a PSF model from the image."""
