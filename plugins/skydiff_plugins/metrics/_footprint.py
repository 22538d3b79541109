r"""The ``residual_footprint_ratio`` metric: how much of the stars is left in the difference.

A port of ``lsst.ip.diffim``'s ``computeDifferenceImageMetrics`` (used by its subtraction and
detection tasks). For every star :math:`i` the kernel was fitted on -- stars that must
subtract well -- the mean absolute difference-image value inside the star's footprint
:math:`F_i`, less the same quantity expected from pure sky, is compared with the mean
absolute science-image value there:

.. math::

    r_i = \frac{\left|\,\overline{|D|}_{F_i} - s\,\right|}{\overline{|S|}_{F_i}},
    \qquad \overline{|I|}_{F} = \frac{1}{N_F}\sum_{p \in F} |I_p|,

and the metric is the mean and the (population) standard deviation of :math:`r_i` over the
stars. The sky term :math:`s` is the mean over the sky sources :math:`k` of
:math:`\overline{|D|}_{F_k}`; without sky sources it is estimated from the whole difference
image (``sky_fallback``): by default as :math:`\sqrt{2/\pi}\,\hat\sigma_D`, the expectation of
:math:`|D|` for Gaussian noise of robust standard deviation :math:`\hat\sigma_D` (1.4826 times
the median absolute deviation). ``lsst.ip.diffim``'s notes give the median :math:`|D|`
(``"median_abs"``), which estimates :math:`0.674\,\sigma_D` instead of the
:math:`0.798\,\sigma_D` that an empty footprint holds on average, and so adds
:math:`0.124\,\sigma_D / \overline{|S|}_{F_i}` to every ratio; its current code uses 0
(``"zero"``). The sky sources' own ratios
:math:`\overline{|D|}_{F_k} / \overline{|S|}_{F_k}` are reported as well.

Footprints are disks: of radius ``footprint_radius`` times the science PSF FWHM (or in
pixels) around the stars, of radius ``sky_radius`` pixels (the pipeline's sky-source radius)
around the sky sources. Pixels with a ``bad_planes`` bit in the science or the difference
mask, or a non-finite value in either, are left out, and a footprint with fewer than
``min_valid_fraction`` of its pixels left is skipped.

``lsst.ip.diffim`` raises ``BadSubtractionError`` when the mean exceeds 0.2 or the standard
deviation 0.4; so does this metric (:class:`skydiff.BadSubtractionError`, carrying the values
as metadata), unless ``raise_on_failure`` is off, in which case the values are only reported.

References
----------
.. [1] lsst/ip_diffim, ``python/lsst/ip/diffim/utils.py``:
   ``computeDifferenceImageMetrics``; ``detectAndMeasure.py`` (``BadSubtractionError``).
"""

from __future__ import annotations

import math
from typing import Any

import astropy.units as u
import numpy as np
from astropy.table import Table

import skydiff

from ._common import NAN, bool_column, check_inputs, plane_mask, positions, psf_fwhm, sky_flags
from ._stamps import disk_mean_abs

#: :math:`E|z| = \sqrt{2/\pi}` for a standard normal :math:`z`.
_MEAN_ABS_PER_SIGMA = math.sqrt(2.0 / math.pi)

_SKY_FALLBACKS = {
    "noise": "sqrt(2/pi) x the robust standard deviation of the unmasked difference pixels: "
             "the mean |D| of an empty footprint for Gaussian noise",
    "median_abs": "the median |D| of the unmasked difference pixels (lsst.ip.diffim notes; "
                  "biased low by 0.124 sigma_D)",
    "zero": "no sky term (lsst.ip.diffim's code when there are no sky sources)",
}


@skydiff.configclass
class ResidualFootprintRatioConfig(skydiff.Config):
    """Options of the ``residual_footprint_ratio`` metric."""

    footprint_radius: float = skydiff.RangeField(
        0.5, min=0.0, inclusive_min=False,
        doc="Radius of the star footprints, in units of radius_units. Half a FWHM keeps the "
            "core, where a PSF mismatch leaves most of its residual, and is close to the "
            "radius of best signal-to-noise of a Gaussian star (0.67 FWHM).")
    radius_units: str = skydiff.ChoiceField(
        "fwhm", allowed={"fwhm": "multiples of the science PSF FWHM (of the difference PSF, "
                                 "or of the sources' fwhm column, when the science has no PSF)",
                         "pixels": "pixels"},
        doc="Units of footprint_radius.")
    min_radius: float = skydiff.RangeField(
        2.0, min=0.5, doc="Smallest footprint radius in pixels (for very sharp PSFs).")
    sky_radius: float = skydiff.RangeField(
        8.0, min=0.5, doc="Radius in pixels of the sky-source footprints (the pipeline's "
                          "sky sources are disks of 8 pixels).")
    sky_fallback: str = skydiff.ChoiceField(
        "noise", allowed=_SKY_FALLBACKS,
        doc="Sky term when the catalog has no usable sky sources.")
    use_only_used: bool = skydiff.Field(
        True, doc="When the kernel-source table has a 'used' column (the subtraction's "
                  "candidates with their fit status), take only the stars the kernel was "
                  "fitted on.")
    min_valid_fraction: float = skydiff.RangeField(
        0.5, min=0.0, max=1.0, inclusive_min=False,
        doc="Skip a footprint when fewer than this fraction of its disk's pixels are on the "
            "image, unmasked and finite.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(skydiff.DEFAULT_BAD_PLANES), dtype=str,
        doc="Mask planes (of the science or the difference) whose pixels are excluded.")
    max_mean: float = skydiff.RangeField(
        0.2, min=0.0, doc="Largest acceptable mean ratio (lsst.ip.diffim: 0.2).")
    max_std: float = skydiff.RangeField(
        0.4, min=0.0, doc="Largest acceptable standard deviation of the ratios "
                          "(lsst.ip.diffim: 0.4).")
    raise_on_failure: bool = skydiff.Field(
        True, doc="Raise skydiff.BadSubtractionError when a limit is exceeded; False only "
                  "reports (metadata 'passed').")


def _nan_values() -> dict[str, float]:
    return {"residual_footprint_ratio_mean": NAN, "residual_footprint_ratio_std": NAN,
            "n_footprints": 0, "sky_mean_abs_difference": NAN, "sky_ratio_mean": NAN,
            "sky_ratio_std": NAN, "n_sky_footprints": 0, "footprint_radius": NAN}


class ResidualFootprintRatioMetric(skydiff.Metric):
    r"""Mean and spread of the residual footprint ratio over the kernel stars.

    The ratio is :math:`|\overline{|D|} - s| / \overline{|S|}` per star.

    See the module documentation for the definition. Stars: ``inputs.kernel_sources``
    (only the ``used`` rows when that column exists and ``use_only_used``), else
    ``inputs.science_sources``; sky-source rows of either are ignored. Sky sources: the
    ``sky_source`` rows of ``inputs.catalog``.

    Values: ``residual_footprint_ratio_mean``, ``residual_footprint_ratio_std``,
    ``n_footprints``, ``sky_mean_abs_difference`` (the sky term :math:`s`),
    ``sky_ratio_mean``, ``sky_ratio_std``, ``n_sky_footprints`` and ``footprint_radius``
    (pixels). The table has one row per star: ``x``, ``y``, ``n_pixels``,
    ``science_mean_abs``, ``difference_mean_abs``, ``ratio`` (NaN for a skipped footprint).
    Without a science or difference image, or without stars, the values are NaN and
    ``metadata["notes"]`` says why.

    Raises
    ------
    skydiff.InputError
        For inputs of the wrong type, or star tables without ``x``/``y``.
    skydiff.BadSubtractionError
        When ``raise_on_failure`` and the mean exceeds ``max_mean`` or the standard deviation
        ``max_std``; its metadata holds every value above plus ``max_mean`` and ``max_std``.

    References
    ----------
    .. [1] lsst/ip_diffim ``computeDifferenceImageMetrics``.

    Examples
    --------
    >>> from skydiff.sim import simulate_pair
    >>> pair = simulate_pair(shape=(256, 256), n_stars=150, seed=1)
    >>> result = skydiff.subtract(pair.science, pair.template)
    >>> inputs = skydiff.MetricInputs(science=pair.science, difference=result.difference,
    ...                               kernel_sources=result.kernel_sources)
    >>> values = ResidualFootprintRatioMetric().run(inputs).values
    >>> values["residual_footprint_ratio_mean"] < 0.2
    True
    """

    name = "residual_footprint_ratio"
    ConfigClass = ResidualFootprintRatioConfig
    order = 2.0

    def run(self, inputs: skydiff.MetricInputs) -> skydiff.MetricResult:
        inputs = check_inputs(inputs, type(self).name)
        with self.timer("run"):
            values, table, metadata = self._compute(inputs)
        self.metadata.update(metadata)
        mean = values["residual_footprint_ratio_mean"]
        std = values["residual_footprint_ratio_std"]
        if self.config.raise_on_failure and not metadata["passed"]:
            config = self.config
            msg = (f"bad subtraction: residual footprint ratio mean {mean:.3g} (limit "
                   f"{config.max_mean:g}), std {std:.3g} (limit {config.max_std:g}) over "
                   f"{int(values['n_footprints'])} kernel stars; check the template and the "
                   f"PSF-matching kernel, or set raise_on_failure = false to only report")
            raise skydiff.BadSubtractionError(msg, **values, max_mean=float(config.max_mean),
                                              max_std=float(config.max_std))
        return skydiff.MetricResult(values=values, table=table, metadata=metadata)

    # -- steps ---------------------------------------------------------------------------

    def _stars(self, inputs: skydiff.MetricInputs, notes: list[str]
               ) -> tuple[np.ndarray, np.ndarray, Table | None, str]:
        """The star positions, the table they came from and its name."""
        name = type(self).name
        for what in ("kernel_sources", "science_sources"):
            table = getattr(inputs, what)
            if table is None:
                continue
            x, y = positions(table, what, name)
            keep = ~sky_flags(table)
            used = bool_column(table, "used")
            if what == "kernel_sources" and used is not None and self.config.use_only_used:
                keep &= used
            keep &= np.isfinite(x) & np.isfinite(y)
            return x[keep], y[keep], table[keep], what
        notes.append("no kernel_sources or science_sources given")
        return np.empty(0), np.empty(0), None, "none"

    def _radius(self, inputs: skydiff.MetricInputs, stars: Table | None,
                notes: list[str]) -> float:
        config = self.config
        if config.radius_units == "pixels":
            return max(float(config.footprint_radius), float(config.min_radius))
        fwhm = psf_fwhm(inputs.science) or psf_fwhm(inputs.difference)
        if fwhm is None and stars is not None and "fwhm" in stars.colnames:
            column = np.asarray(stars["fwhm"], dtype=np.float64)
            column = column[np.isfinite(column) & (column > 0)]
            fwhm = float(np.median(column)) if column.size else None
        if fwhm is None:
            notes.append("footprint radius: no PSF on the science or difference image and no "
                         "fwhm column; set radius_units = 'pixels'")
            return NAN
        return max(float(config.footprint_radius) * fwhm, float(config.min_radius))

    def _sky(self, difference: np.ndarray, science: np.ndarray, valid: np.ndarray,
             catalog: Table | None, notes: list[str]) -> tuple[float, float, float, int, str]:
        """The sky term, the sky ratios' mean and std, their number and the method used."""
        name = type(self).name
        config = self.config
        if catalog is not None:
            sky = sky_flags(catalog)
            if np.any(sky):
                x, y = positions(catalog, "catalog", name)
                x, y = x[sky], y[sky]
                finite = np.isfinite(x) & np.isfinite(y)
                sums = disk_mean_abs((difference, science), valid, x[finite], y[finite],
                                     float(config.sky_radius))
                keep = ((sums.n_valid > 0)
                        & (sums.n_valid >= config.min_valid_fraction * sums.n_disk))
                if np.any(keep):
                    sky_d = sums.mean_abs[0, keep]
                    sky_s = sums.mean_abs[1, keep]
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratio = sky_d / sky_s
                    ratio = ratio[np.isfinite(ratio)]
                    ratio_mean = float(np.mean(ratio)) if ratio.size else NAN
                    ratio_std = float(np.std(ratio)) if ratio.size else NAN
                    return (float(np.mean(sky_d)), ratio_mean, ratio_std, int(keep.sum()),
                            "sky_sources")
                notes.append("sky: no sky-source footprint has enough valid pixels")
        if config.sky_fallback == "zero":
            return 0.0, NAN, NAN, 0, "zero"
        pixels = difference[valid]
        if pixels.size == 0:
            notes.append("sky: no valid difference pixel")
            return NAN, NAN, NAN, 0, config.sky_fallback
        if config.sky_fallback == "median_abs":
            return float(np.median(np.abs(pixels))), NAN, NAN, 0, "median_abs"
        return _MEAN_ABS_PER_SIGMA * skydiff.robust_std(pixels), NAN, NAN, 0, "noise"

    def _compute(self, inputs: skydiff.MetricInputs
                 ) -> tuple[dict[str, float], Table | None, dict[str, Any]]:
        config = self.config
        notes: list[str] = []
        values = _nan_values()
        metadata: dict[str, Any] = {"passed": True, "sky_from": "none", "stars_from": "none",
                                    "notes": notes}
        if inputs.science is None or inputs.difference is None:
            notes.append("needs both the science and the difference image")
            return values, None, metadata
        x, y, stars, stars_from = self._stars(inputs, notes)
        metadata["stars_from"] = stars_from
        radius = self._radius(inputs, stars, notes)
        values["footprint_radius"] = radius
        science_exp, difference_exp = inputs.science, inputs.difference
        science = np.asarray(science_exp.image)
        difference = np.asarray(difference_exp.image)
        valid = (np.isfinite(science) & np.isfinite(difference)
                 & ~plane_mask(science_exp, config.bad_planes)
                 & ~plane_mask(difference_exp, config.bad_planes))
        sky, sky_ratio_mean, sky_ratio_std, n_sky, sky_from = self._sky(
            difference, science, valid, inputs.catalog, notes)
        values.update(sky_mean_abs_difference=sky, sky_ratio_mean=sky_ratio_mean,
                      sky_ratio_std=sky_ratio_std, n_sky_footprints=n_sky)
        metadata["sky_from"] = sky_from
        if x.size == 0 or not math.isfinite(radius):
            if x.size == 0 and stars is not None:
                notes.append(f"no usable stars in {stars_from}")
            return values, None, metadata
        sums = disk_mean_abs((difference, science), valid, x, y, radius)
        diff_abs, sci_abs = sums.mean_abs
        usable = ((sums.n_valid > 0) & (sums.n_valid >= config.min_valid_fraction * sums.n_disk)
                  & (sci_abs > 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(usable, np.abs(diff_abs - sky) / sci_abs, np.nan)
        good = ratio[np.isfinite(ratio)]
        n_good = int(good.size)
        if n_good:
            mean, std = float(np.mean(good)), float(np.std(good))
        else:
            mean = std = NAN
            notes.append("no star footprint has enough valid pixels (or the sky term is NaN)")
        values.update(residual_footprint_ratio_mean=mean, residual_footprint_ratio_std=std,
                      n_footprints=n_good)
        metadata["passed"] = not (n_good and (mean > config.max_mean or std > config.max_std))
        table = Table({"x": x, "y": y, "n_pixels": sums.n_valid,
                       "science_mean_abs": sci_abs, "difference_mean_abs": diff_abs,
                       "ratio": ratio})
        table["x"].unit = u.pix
        table["y"].unit = u.pix
        table.meta.update(footprint_radius=radius, sky_mean_abs_difference=sky)
        return values, table, metadata
