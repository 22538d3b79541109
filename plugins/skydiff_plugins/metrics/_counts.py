r"""Source counts: the ``source_count`` and ``dia_fraction`` metrics.

Counts follow ``lsst.ip.diffim``'s ``metrics.py`` (number of science sources, ratio of
diaSources to science sources) and the detection task's metadata (positive, negative, sky
and dipole counts):

* the *science sources* are the rows of ``inputs.science_sources`` that are not sky sources;
  when that table is missing they are found on ``inputs.science`` with
  :func:`skydiff.find_stars` at the configured matched-filter threshold;
* the *diaSources* are the rows of ``inputs.catalog`` that are not sky sources
  (``sky_source`` False; a catalog without that column has none);
* a diaSource is *negative* when ``is_negative`` is True, else positive, and a *dipole* when
  ``is_dipole`` is True (the column the dipole classifiers add).

The diaSource fraction is

.. math::

    f_\mathrm{dia} = \frac{N_\mathrm{dia}}{N_\mathrm{science}},

NaN (with a note in the metadata) when there are no science sources or a count is unknown.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np

import skydiff

from ._common import NAN, bool_column, check_inputs, sky_flags

#: What the science-source count was taken from.
_FROM_TABLE = "science_sources"
_FROM_DETECTION = "find_stars"
_FROM_NOTHING = "none"


@attrs.frozen
class SourceCounts:
    """Counts of science sources and diaSources (NaN where unknown).

    Attributes
    ----------
    n_science_sources : int or float
        Science sources (NaN when neither a table nor a science image is given).
    n_dia_sources, n_sky_sources, n_positive, n_negative, n_dipoles : int or float
        Catalog counts (NaN without a catalog, or without ``is_negative`` / ``is_dipole``).
    science_from : str
        ``"science_sources"``, ``"find_stars"`` or ``"none"``.
    notes : list of str
        Why a count is NaN.
    """

    n_science_sources: float
    n_dia_sources: float
    n_sky_sources: float
    n_positive: float
    n_negative: float
    n_dipoles: float
    science_from: str
    notes: list[str] = attrs.field(factory=list)


def count_sources(inputs: skydiff.MetricInputs, *, threshold: float,
                  bad_planes: tuple[str, ...]) -> SourceCounts:
    """Count the science sources and the diaSources of already validated ``inputs``.

    Parameters
    ----------
    inputs : skydiff.MetricInputs
        Validated inputs (:func:`~._common.check_inputs`).
    threshold : float
        Matched-filter S/N threshold of :func:`skydiff.find_stars` when
        ``inputs.science_sources`` is None.
    bad_planes : tuple of str
        Mask planes passed to :func:`skydiff.find_stars`.

    Returns
    -------
    SourceCounts
    """
    notes: list[str] = []
    n_science: float
    if inputs.science_sources is not None:
        n_science = int(np.count_nonzero(~sky_flags(inputs.science_sources)))
        science_from = _FROM_TABLE
    elif inputs.science is not None:
        stars = skydiff.find_stars(inputs.science, threshold=threshold, bad_planes=bad_planes)
        n_science = len(stars)
        science_from = _FROM_DETECTION
    else:
        n_science = NAN
        science_from = _FROM_NOTHING
        notes.append("n_science_sources: neither science_sources nor a science image given")

    catalog = inputs.catalog
    if catalog is None:
        notes.append("diaSource counts: no catalog given")
        return SourceCounts(n_science, NAN, NAN, NAN, NAN, NAN, science_from, notes)
    sky = sky_flags(catalog)
    real = ~sky
    n_positive: float
    n_negative: float
    n_dipoles: float
    negative = bool_column(catalog, "is_negative")
    if negative is None:
        n_positive = n_negative = NAN
        notes.append("n_positive, n_negative: the catalog has no is_negative column")
    else:
        n_negative = int(np.count_nonzero(real & negative))
        n_positive = int(np.count_nonzero(real & ~negative))
    dipole = bool_column(catalog, "is_dipole")
    if dipole is None:
        n_dipoles = NAN
        notes.append("n_dipoles: the catalog has no is_dipole column (no dipole classifier ran)")
    else:
        n_dipoles = int(np.count_nonzero(real & dipole))
    return SourceCounts(n_science, int(np.count_nonzero(real)), int(np.count_nonzero(sky)),
                        n_positive, n_negative, n_dipoles, science_from, notes)


@skydiff.configclass
class ScienceSourcesConfig(skydiff.Config):
    """How science sources are found when no ``science_sources`` table is given."""

    detection_threshold: float = skydiff.RangeField(
        5.0, min=0.0, inclusive_min=False,
        doc="Matched-filter S/N threshold of skydiff.find_stars on the science image, used "
            "only when no science_sources table is given.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(skydiff.DEFAULT_BAD_PLANES), dtype=str,
        doc="Mask planes skydiff.find_stars treats as bad when it detects science sources.")


@skydiff.configclass
class SourceCountConfig(ScienceSourcesConfig):
    """Options of the ``source_count`` metric."""


class SourceCountMetric(skydiff.Metric):
    """Numbers of science sources and diaSources.

    Values: ``n_science_sources``, ``n_dia_sources`` (non-sky catalog rows),
    ``n_sky_sources``, ``n_positive``, ``n_negative`` (``is_negative``) and ``n_dipoles``
    (``is_dipole``); NaN where the input they need is missing, with the reason in
    ``metadata["notes"]``. See the module documentation.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import Table
    >>> catalog = Table({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0],
    ...                  "is_negative": [False, True, False],
    ...                  "sky_source": [False, False, True]})
    >>> sources = Table({"x": np.arange(8.0), "y": np.arange(8.0)})
    >>> result = SourceCountMetric().run(
    ...     skydiff.MetricInputs(catalog=catalog, science_sources=sources))
    >>> result.values["n_dia_sources"], result.values["n_negative"]
    (2, 1)
    """

    name = "source_count"
    ConfigClass = SourceCountConfig
    order = 0.0

    def run(self, inputs: skydiff.MetricInputs) -> skydiff.MetricResult:
        inputs = check_inputs(inputs, type(self).name)
        with self.timer("run"):
            counts = count_sources(inputs, threshold=self.config.detection_threshold,
                                   bad_planes=tuple(self.config.bad_planes))
        values: dict[str, float] = {
            "n_science_sources": counts.n_science_sources,
            "n_dia_sources": counts.n_dia_sources,
            "n_sky_sources": counts.n_sky_sources,
            "n_positive": counts.n_positive,
            "n_negative": counts.n_negative,
            "n_dipoles": counts.n_dipoles,
        }
        metadata: dict[str, Any] = {"science_sources_from": counts.science_from,
                                    "notes": list(counts.notes)}
        self.metadata.update(metadata)
        return skydiff.MetricResult(values=values, metadata=metadata)


@skydiff.configclass
class DiaFractionConfig(ScienceSourcesConfig):
    """Options of the ``dia_fraction`` metric."""


class DiaFractionMetric(skydiff.Metric):
    r"""The ratio of diaSources to science sources.

    :math:`N_\mathrm{dia}/N_\mathrm{science}`.

    Values: ``dia_fraction``, ``n_dia_sources``, ``n_science_sources``. The fraction is NaN,
    with the reason in ``metadata["notes"]``, when there are no science sources or a count is
    unknown (no catalog; neither science sources nor a science image). Sky sources count in
    neither number.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import Table
    >>> catalog = Table({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0],
    ...                  "sky_source": [False, False, True]})
    >>> sources = Table({"x": np.arange(8.0), "y": np.arange(8.0)})
    >>> DiaFractionMetric().run(skydiff.MetricInputs(
    ...     catalog=catalog, science_sources=sources)).values["dia_fraction"]
    0.25
    """

    name = "dia_fraction"
    ConfigClass = DiaFractionConfig
    order = 1.0

    def run(self, inputs: skydiff.MetricInputs) -> skydiff.MetricResult:
        inputs = check_inputs(inputs, type(self).name)
        with self.timer("run"):
            counts = count_sources(inputs, threshold=self.config.detection_threshold,
                                   bad_planes=tuple(self.config.bad_planes))
        # only the notes about the two counts the fraction uses
        notes = [note for note in counts.notes
                 if note.startswith(("n_science_sources", "diaSource counts"))]
        n_dia, n_science = counts.n_dia_sources, counts.n_science_sources
        fraction = NAN
        if math.isnan(n_dia) or math.isnan(n_science):
            notes.append("dia_fraction: a count is unknown")
        elif n_science == 0:
            notes.append("dia_fraction: there are no science sources")
        else:
            fraction = n_dia / n_science
        values: dict[str, float] = {"dia_fraction": fraction, "n_dia_sources": n_dia,
                                    "n_science_sources": n_science}
        metadata: dict[str, Any] = {"science_sources_from": counts.science_from,
                                    "notes": notes}
        self.metadata.update(metadata)
        return skydiff.MetricResult(values=values, metadata=metadata)
