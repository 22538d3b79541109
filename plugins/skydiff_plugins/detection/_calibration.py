r"""The measured noise of the detection image (``noise_calibration = "measured"``).

The significance :math:`\nu = (D \star P)/\sqrt{V \star P^2}` has unit variance only when the
pixel noise of :math:`D` is independent with the variance :math:`V`. Drizzled images
(resampled onto a finer grid), median or weighted stacks and any other resampling correlate
neighbouring pixels, which a per-pixel variance plane cannot describe: with the pixel
autocorrelation :math:`\rho`, the filtered noise is larger by

.. math:: \kappa = \Big(\sum_{ij} P_i P_j\, \rho_{i-j} \Big/ \sum_i P_i^2\Big)^{1/2},

1.5–1.9 on the drizzled JWST and stacked DECam pairs of the test data, so a threshold of 5
would be an effective 3 sigma. Rather than model :math:`\rho`, the detector measures the
spread of :math:`\nu` itself on the sky,

.. math:: \hat s = 1.4826\, \operatorname{median}\big|\nu_q - \operatorname{median}\,\nu\big|,

over the *sky pixels* :math:`q`: pixels with data, not on a ``bad_planes`` plane and
outside the footprints of :math:`|\nu| > 5 \hat s_0` grown like the detection footprints
(:math:`\hat s_0`: the same statistic over every such pixel, sources included — the median
absolute deviation tolerates them). Excluding only real detections keeps the sample's noise
distribution untruncated; excluding the first-pass background mask (:math:`|\nu_1| > 3`)
instead would remove the noise tails wherever :math:`\nu` is too large, and biases
:math:`\hat s` low by 13–15 % on those pairs (1.35 instead of 1.55 on JWST; 0.986 instead
of 0.999 on the white TOROS pair). When the detector subtracts no background, the spread is
taken about a :func:`skydiff.background_mesh` of :math:`\nu` (``background_bin_size``), so
that a smooth background is not taken for noise.

The detection image is divided by

.. math:: s = \max(1,\ \hat s - 2\,\delta_{\hat s}),

the measured spread less two standard errors: a variance plane is corrected only upwards
and only by what is measured (on white noise :math:`s = 1` with probability 0.977, and a
correct variance plane is never made optimistic by the error of :math:`\hat s` or by
anything that narrows the sky's distribution). The error is
:math:`\delta_{\hat s} = \hat s\,(1.36/n_\mathrm{eff})^{1/2}` (1.36/n: the variance of the
MAD estimate of a unit sigma from n independent Gaussian values), with the number of
independent values among the :math:`n` sky pixels used

.. math:: n_\mathrm{eff} = n \Big/ \sum_{d} g\big(\rho_\nu(d)\big), \qquad
          \rho_\nu = \frac{P \star P}{\sum P^2},

summed over the lags of the sampling grid (every ``stride``-th row and column on large
images, at most :data:`MAX_SAMPLES` pixels), where :math:`g(\rho) \approx 0.37\rho^2` is
the correlation of the MAD's influence function (:func:`_mad_correlation`). This is exact
for white input noise (measured spread of :math:`\hat s` over 150 noise images: 0.0209,
0.0107, 0.0258, 0.0109 for 128² and 256² images with FWHM 3, 256² with FWHM 8 and 128²
with FWHM 1.5, against 0.0216, 0.0108, 0.0284, 0.0112 predicted); correlated input noise
has fewer independent values, so :math:`\delta_{\hat s}` is then a lower bound. With fewer
than :data:`MIN_INDEPENDENT` independent values (12 % error) the image is too small to
measure and :math:`s = 1`.
"""

from __future__ import annotations

import functools
import math

import attrs
import numpy as np
from numpy.typing import NDArray

import skydiff

from ._footprints import dilate

__all__ = ["CONFIDENCE", "MAX_SAMPLES", "MIN_INDEPENDENT", "SKY_LEVEL", "Calibration",
           "measure_scale"]

#: Most sky pixels used (a regular sub-grid of the image above this).
MAX_SAMPLES = 1 << 18
#: Fewest independent sky values (:math:`n_\mathrm{eff}`) for a measured scale.
MIN_INDEPENDENT = 100.0
#: Detections above this many measured sigma (grown) are not sky.
SKY_LEVEL = 5.0
#: The scale applied is the measured one minus this many standard errors (at least 1).
CONFIDENCE = 2.0
#: :math:`\Phi^{-1}(3/4)`, the MAD of a unit Gaussian.
_MAD_QUANTILE = 0.6744897501960817
#: Every this many sky values are used for the level of the detections to exclude.
_FIRST_PASS_STRIDE = 4
#: :math:`n` times the variance of the MAD estimate of a unit sigma from :math:`n` values.
_MAD_VARIANCE = 1.36
#: Terms of the series of :func:`_mad_correlation` and points of its table.
_SERIES_TERMS = 2000
_TABLE_SIZE = 1001


@attrs.frozen
class Calibration:
    """The measured scale of the detection image.

    Attributes
    ----------
    scale : float
        :math:`s`, the factor the significance is divided by (≥ 1; 1 when not measured).
    measured : float
        :math:`\\hat s` (NaN when the image has too few sky pixels).
    error : float
        Its statistical error for white input noise (NaN when not measured).
    n_pixels : int
        Sky pixels used.
    n_independent : float
        :math:`n_\\mathrm{eff}`.
    """

    scale: float
    measured: float
    error: float
    n_pixels: int
    n_independent: float


@functools.cache
def _mad_correlation_table() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    r""":math:`g(\rho)` on a grid of :math:`\rho \in [0, 1]` (see :func:`_mad_correlation`)."""
    a = _MAD_QUANTILE
    coefficient = 16.0 * (math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)) ** 2
    grid = np.linspace(0.0, 1.0, _TABLE_SIZE)
    total = np.zeros(grid.size)
    previous, current = 1.0, a  # h_0(a), h_1(a)
    for k in range(2, _SERIES_TERMS + 1):  # loop over the series' terms
        if k % 2 == 0:
            total += coefficient * current * current * grid**k / k
        previous, current = current, (a * current - math.sqrt(k - 1) * previous) / math.sqrt(k)
    total[-1] = 1.0
    return grid, total


def _mad_correlation(rho: NDArray[np.float64]) -> NDArray[np.float64]:
    r"""Correlation of the MAD's influence function between values of correlation ``rho``.

    The MAD estimator of a unit Gaussian has the influence function
    :math:`\psi(x) \propto \mathrm{sign}(|x| - a)` (:math:`a = \Phi^{-1}(3/4)`); for two
    values of correlation :math:`\rho` its Hermite expansion gives

    .. math::

        g(\rho) = \operatorname{corr}(\psi(X), \psi(Y))
                = 16\,\phi(a)^2 \sum_{k\ \mathrm{even} \ge 2} h_{k-1}(a)^2\, \frac{\rho^k}{k},

    with :math:`h_k = \mathrm{He}_k/\sqrt{k!}` the normalised Hermite polynomials
    (:math:`g \approx 0.37\rho^2` for small :math:`\rho`, :math:`g(1) = 1`; a Monte Carlo
    check gives 0.1064 and 0.5452 at :math:`\rho` = 0.5 and 0.9, the series 0.1064 and
    0.5449). It is interpolated in a table of the series summed to :data:`_SERIES_TERMS`
    terms (:math:`g` is even).
    """
    grid, table = _mad_correlation_table()
    return np.interp(np.abs(np.asarray(rho, dtype=np.float64)), grid, table)


def _correlation_sum(kernel: NDArray[np.float64], stride: int) -> float:
    r""":math:`\sum_d g(\rho_\nu(d))` over the lags :math:`d` that are multiples of ``stride``.

    :math:`\rho_\nu = (P \star P)/\sum P^2` is the correlation of the matched-filtered white
    noise; the number of independent MAD values among :math:`n` is :math:`n` divided by
    this sum (1 for independent values).
    """
    size = 2 * np.array(kernel.shape) - 1
    spectrum = np.fft.rfft2(kernel, s=tuple(size))
    auto = np.fft.fftshift(np.fft.irfft2(spectrum * np.conj(spectrum), s=tuple(size)))
    auto /= float((kernel * kernel).sum())
    rows = np.arange(size[0]) - size[0] // 2
    cols = np.arange(size[1]) - size[1] // 2
    on_grid = (rows[:, None] % stride == 0) & (cols[None, :] % stride == 0)
    return float(np.sum(_mad_correlation(auto[on_grid])))


def measure_scale(significance: NDArray[np.float32], usable: NDArray[np.bool_],
                  kernel: NDArray[np.float64], *, grow: float,
                  flatten_bin_size: int | None = None) -> Calibration:
    r"""Measure the robust standard deviation of ``significance`` on the sky.

    Parameters
    ----------
    significance : ndarray of float32, shape (H, W)
        :math:`\nu` (not modified).
    usable : ndarray of bool, shape (H, W)
        Pixels that may be sky: with data, on no ``bad_planes`` plane.
    kernel : ndarray of shape (K, K)
        The matched filter's PSF (it sets the correlation of :math:`\nu`).
    grow : float
        Growth radius (pixels) of the detections excluded from the sky.
    flatten_bin_size : int, optional
        When the detector subtracted no background: the spread is measured about a
        :func:`skydiff.background_mesh` of :math:`\nu` with bins of this size, so that a
        smooth background is not taken for noise.

    Returns
    -------
    Calibration
    """
    n_usable = int(np.count_nonzero(usable))
    stride = max(1, math.ceil(math.sqrt(n_usable / MAX_SAMPLES)))
    per_value = _correlation_sum(kernel, stride)
    not_measured = Calibration(scale=1.0, measured=math.nan, error=math.nan,
                               n_pixels=0, n_independent=0.0)
    if n_usable / stride**2 / per_value < MIN_INDEPENDENT:
        return not_measured
    values = significance
    if flatten_bin_size is not None:
        try:
            level = skydiff.background_mesh(significance, mask=~usable,
                                            bin_size=flatten_bin_size)
        except skydiff.InputError:  # no bin with enough pixels: keep the values as they are
            level = None
        if level is not None:
            values = significance - level
    grid = (slice(None, None, stride), slice(None, None, stride))
    values = np.ascontiguousarray(values[grid])  # everything below on the sampling grid
    usable = usable[grid] & (values != 0) & np.isfinite(values)
    if not usable.any():
        return not_measured
    first = skydiff.robust_sigma(values[usable][::_FIRST_PASS_STRIDE])  # only a level
    if not first > 0:
        return not_measured
    seeds = np.flatnonzero(np.abs(values) > SKY_LEVEL * first)
    sky = usable
    if seeds.size:
        detected = np.zeros(values.shape, dtype=bool)
        detected.reshape(-1)[seeds] = True
        sky = usable & ~dilate(detected, seeds, grow / stride)
    sample = values[sky]
    n_independent = sample.size / per_value
    if n_independent < MIN_INDEPENDENT:
        return not_measured
    measured = skydiff.robust_sigma(sample)
    error = measured * math.sqrt(_MAD_VARIANCE / n_independent)
    return Calibration(scale=max(1.0, measured - CONFIDENCE * error), measured=measured,
                       error=error, n_pixels=int(sample.size),
                       n_independent=float(n_independent))
