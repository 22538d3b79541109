r"""skydiff-example: a third-party skydiff plugin: the ``pixel_stats`` metric and the
``box_flux`` measurement.

The metric summarises how well a difference image is explained by its noise model. With
:math:`z = D / \sqrt{V}` the difference normalised by its variance plane over the usable
pixels (no excluded mask plane set, finite, positive variance), it reports

``z_mean``, ``z_std``
    the mean and standard deviation of :math:`z` after iterative :math:`\kappa\sigma`
    clipping (robust against transients, residuals of bright stars and artefacts); about 0
    and 1 for a good subtraction with a correct variance plane;
``z_outlier_fraction``
    the fraction of usable pixels with :math:`|z|` above ``outlier_threshold`` (5 by
    default): real variability, artefacts or bad subtraction;
``n_pixels``
    the number of usable pixels.

The ``box_flux`` measurement adds three columns to the diaSource catalog of the ``detect``
step: ``box_flux``, the sum of the difference over a square box centred on each source,
``box_flux_err`` (the square root of the summed variance) and ``box_flux_flag`` (the box
leaves the image or holds an excluded pixel).

The plugin registers itself through the ``skydiff.plugins`` entry point ``example`` of this
distribution, exactly as any third-party plugin does.

Examples
--------
>>> import numpy as np, skydiff
>>> rng = np.random.default_rng(1)
>>> diff = skydiff.Exposure(rng.normal(0, 2, (64, 64)), variance=np.full((64, 64), 4.0))
>>> values = PixelStats().run(skydiff.MetricInputs(difference=diff)).values
>>> abs(values["z_mean"]) < 0.1, abs(values["z_std"] - 1) < 0.1
(True, True)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import numpy as np

import skydiff
from skydiff import AlgorithmError, InputError

try:
    __version__ = version("skydiff-example")
except PackageNotFoundError:  # imported from the source tree without being installed
    __version__ = "0.0.0+unknown"

__all__ = ["BoxFlux", "BoxFluxConfig", "PixelStats", "PixelStatsConfig", "robust_mean_std",
           "skydiff_register_algorithms"]

#: 1 / Φ⁻¹(3/4): converts a median absolute deviation into a Gaussian standard deviation.
_MAD_TO_SIGMA = 1.4826


@skydiff.configclass
class PixelStatsConfig(skydiff.Config):
    """Options of the ``pixel_stats`` metric."""

    bad_mask_planes: tuple[str, ...] = skydiff.ListField(
        ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT"), dtype=str,
        doc="Mask planes whose pixels are excluded (planes absent from an exposure are "
            "ignored).")
    clip: float = skydiff.RangeField(
        3.0, min=1.0, doc="Clipping threshold kappa, in standard deviations, of the robust "
                          "mean and standard deviation.")
    max_iterations: int = skydiff.RangeField(
        10, min=1, max=100, doc="Maximum number of clipping iterations.")
    outlier_threshold: float = skydiff.RangeField(
        5.0, min=0.0, inclusive_min=False,
        doc="|z| above which a pixel counts as an outlier in z_outlier_fraction.")


def robust_mean_std(values: np.ndarray, *, clip: float = 3.0, max_iterations: int = 10
                    ) -> tuple[float, float, int]:
    r"""Iteratively :math:`\kappa\sigma`-clipped mean and standard deviation.

    Starts from the median and :math:`1.4826\,\mathrm{MAD}`, then repeatedly keeps the values
    within ``clip`` standard deviations of the current mean and recomputes the mean and
    (``ddof=1``) standard deviation of the kept values, until the kept set stops changing or
    ``max_iterations`` is reached.

    Parameters
    ----------
    values : ndarray of shape (n,)
        Finite values, ``n >= 2``.
    clip : float, optional
        Clipping threshold :math:`\kappa` (> 0).
    max_iterations : int, optional
        Maximum number of clipping passes (>= 1).

    Returns
    -------
    mean, std : float
        The clipped statistics.
    n_kept : int
        The number of values kept by the last pass.

    Examples
    --------
    >>> values = np.r_[np.random.default_rng(0).normal(10, 2, 10_000), [1e6] * 50]
    >>> mean, std, kept = robust_mean_std(values)
    >>> round(mean), round(std), kept < 10_050
    (10, 2, True)
    """
    center = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - center)))
    kept = np.ones(values.shape, dtype=bool)
    if sigma == 0.0:  # more than half the values are equal: plain statistics of those
        kept = values == center
    for _ in range(max_iterations):
        if sigma == 0.0:
            break
        new = np.abs(values - center) <= clip * sigma
        if new.sum() < 2:
            break
        converged = bool(np.array_equal(new, kept))
        kept = new
        center = float(values[kept].mean())
        sigma = float(values[kept].std(ddof=1))
        if converged:
            break
    return center, sigma, int(kept.sum())


class PixelStats(skydiff.Metric):
    r"""Robust statistics of the normalised difference z = D / sqrt(V) of a subtraction.

    Values: ``z_mean`` and ``z_std`` (:func:`robust_mean_std` of :math:`z`), the
    ``z_outlier_fraction`` of usable pixels with :math:`|z| >` ``outlier_threshold``, and
    ``n_pixels``, the number of usable pixels (no excluded mask plane, finite image,
    finite positive variance).

    Raises
    ------
    skydiff.errors.InputError
        If ``inputs`` is not a :class:`~skydiff.MetricInputs` or has no difference
        :class:`~skydiff.Exposure`.
    skydiff.errors.AlgorithmError
        If fewer than two pixels are usable (metadata ``n_pixels``).
    """

    name = "pixel_stats"
    ConfigClass = PixelStatsConfig
    order = 100.0

    def run(self, inputs: skydiff.MetricInputs) -> skydiff.MetricResult:
        if not isinstance(inputs, skydiff.MetricInputs):
            msg = f"pixel_stats needs a skydiff.MetricInputs, got {type(inputs).__name__}"
            raise InputError(msg)
        difference = inputs.difference
        if not isinstance(difference, skydiff.Exposure):
            msg = ("pixel_stats needs the difference image as an Exposure in "
                   f"MetricInputs.difference, got {type(difference).__name__}")
            raise InputError(msg)
        planes = [p for p in self.config.bad_mask_planes if p in difference.mask_planes.names]
        excluded = difference.masked(*planes) if planes else np.zeros(difference.shape, bool)
        image = difference.image.astype(np.float64)
        variance = difference.variance.astype(np.float64)
        usable = (~excluded & np.isfinite(image) & np.isfinite(variance)
                  & (variance > 0.0))
        n_pixels = int(usable.sum())
        if n_pixels < 2:
            msg = (f"pixel_stats found {n_pixels} usable pixel(s); check the mask planes "
                   f"excluded ({', '.join(planes) or 'none'}) and the variance plane")
            raise AlgorithmError(msg, n_pixels=n_pixels)
        z = image[usable] / np.sqrt(variance[usable])
        mean, std, n_kept = robust_mean_std(z, clip=self.config.clip,
                                            max_iterations=self.config.max_iterations)
        outliers = float(np.count_nonzero(np.abs(z) > self.config.outlier_threshold))
        return skydiff.MetricResult(
            values={"z_mean": mean, "z_std": std, "z_outlier_fraction": outliers / n_pixels,
                    "n_pixels": float(n_pixels)},
            metadata={"n_clipped": n_pixels - n_kept, "excluded_planes": list(planes)})


@skydiff.configclass
class BoxFluxConfig(skydiff.Config):
    """Options of the ``box_flux`` measurement."""

    half_size: int = skydiff.RangeField(
        3, min=0, max=50, doc="Half side of the box in pixels: the box has 2 * half_size + 1 "
                              "pixels on a side.")
    bad_mask_planes: tuple[str, ...] = skydiff.ListField(
        ("BAD", "SAT", "NO_DATA", "EDGE"), dtype=str,
        doc="Mask planes that flag a source when one of their pixels is inside its box.")


class BoxFlux(skydiff.Measurement):
    r"""Flux in a square box: :math:`F = \sum_{box} D`, :math:`\sigma_F^2 = \sum_{box} V`.

    The box is centred on the pixel nearest to each source's ``(x, y)``. Sources whose box
    leaves the image or holds a pixel of an excluded mask plane get NaN and
    ``box_flux_flag``.

    Raises
    ------
    skydiff.errors.InputError
        If ``inputs`` is not a :class:`~skydiff.MeasurementInputs` with a difference
        :class:`~skydiff.Exposure` and a catalog with ``x`` and ``y``.
    """

    name = "box_flux"
    ConfigClass = BoxFluxConfig
    order = 2.0

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        from astropy.table import Table

        if not isinstance(inputs, skydiff.MeasurementInputs):
            msg = f"box_flux needs a skydiff.MeasurementInputs, got {type(inputs).__name__}"
            raise InputError(msg)
        difference = inputs.difference
        if not isinstance(difference, skydiff.Exposure):
            msg = f"box_flux needs the difference as an Exposure, got {type(difference).__name__}"
            raise InputError(msg)
        catalog = inputs.catalog
        if not isinstance(catalog, Table) or not {"x", "y"} <= set(catalog.colnames):
            msg = "box_flux needs the catalog as an astropy Table with columns x and y"
            raise InputError(msg)
        half = self.config.half_size
        x = np.asarray(catalog["x"], dtype=np.float64)
        y = np.asarray(catalog["y"], dtype=np.float64)
        finite = np.isfinite(x) & np.isfinite(y)
        cols = np.where(finite, np.floor(x + 0.5), -1e9).astype(np.int64)
        rows = np.where(finite, np.floor(y + 0.5), -1e9).astype(np.int64)
        height, width = difference.shape
        inside = ((rows - half >= 0) & (rows + half < height)
                  & (cols - half >= 0) & (cols + half < width))
        offsets = np.arange(-half, half + 1)
        r = np.clip(rows[:, None, None] + offsets[None, :, None], 0, height - 1)
        c = np.clip(cols[:, None, None] + offsets[None, None, :], 0, width - 1)
        planes = [p for p in self.config.bad_mask_planes if p in difference.mask_planes.names]
        bad = difference.masked(*planes)[r, c].any(axis=(1, 2)) if planes else False
        flag = ~inside | bad
        flux = difference.image[r, c].astype(np.float64).sum(axis=(1, 2))
        error = np.sqrt(difference.variance[r, c].astype(np.float64).sum(axis=(1, 2)))
        columns = Table({"box_flux": np.where(flag, np.nan, flux),
                         "box_flux_err": np.where(flag, np.nan, error),
                         "box_flux_flag": np.asarray(flag, dtype=bool)})
        return skydiff.MeasurementResult(columns=columns,
                                         metadata={"n_flagged": int(np.count_nonzero(flag))})


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    """Register the ``pixel_stats`` metric and the ``box_flux`` measurement."""
    registries.metric.add(PixelStats)
    registries.measurement.add(BoxFlux)
