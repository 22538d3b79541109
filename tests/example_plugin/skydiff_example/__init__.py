r"""skydiff-example: a third-party skydiff plugin providing the ``pixel_stats`` metric.

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

__all__ = ["PixelStats", "PixelStatsConfig", "robust_mean_std", "skydiff_register_algorithms"]

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


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    """Register the ``pixel_stats`` metric."""
    registries.metric.add(PixelStats)
