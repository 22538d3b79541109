r"""The detection image: matched-filter significance of a difference image, or of a score.

For a difference image :math:`D` with independent pixel noise of variance :math:`V` and PSF
:math:`P` (unit sum), the matched filter is the correlation with the PSF,

.. math::

    S = D \star P, \qquad S[p] = \sum_q P[q - p]\, D[q],

whose noise has variance :math:`N^2 = V \star P^2`. The significance :math:`\nu = S / N` of a
point source of flux :math:`F` centred on a pixel is its optimal signal-to-noise ratio
:math:`F \sqrt{\sum P^2}/\sigma = F / (\sigma \sqrt{\mathrm{NEA}})` (constant :math:`V =
\sigma^2`, noise-equivalent area :math:`\mathrm{NEA} = 1/\sum P^2`). Pixels without data
(non-finite, ignored planes) enter both sums with zero weight, so :math:`\nu` stays a
unit-variance statistic next to them. Both correlations are one FFT convolution each
(:func:`skydiff.convolve` with the reflected PSF, ``variance="exact"``, ``float32``).

A score image is already the matched-filter output: :math:`\nu = \mathrm{score} /
\sqrt{V}`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

import skydiff

__all__ = ["matched_filter", "psf_kernel", "score_significance"]

#: Pixels whose filtered noise variance is below this fraction of the median get zero
#: significance: their PSF footprint holds (almost) no valid pixel, so the ratio is round-off.
_MIN_NOISE_FRACTION = 1e-4


def psf_kernel(exposure: skydiff.Exposure) -> NDArray[np.float64]:
    """The exposure's PSF image at its centre (parent coordinates), normalised to unit sum.

    Raises
    ------
    InputError
        If the exposure has no PSF, or its image is not odd-sized, finite and of positive
        sum.
    """
    if exposure.psf is None:
        msg = ("the difference image has no PSF for the matched filter; attach one "
               "(exposure.evolve(psf=...)) or estimate one with a psf_estimator plugin")
        raise skydiff.InputError(msg)
    x0, y0 = exposure.origin
    height, width = exposure.shape
    image = np.asarray(exposure.psf.kernel_image(x0 + (width - 1) / 2.0,
                                                 y0 + (height - 1) / 2.0), dtype=np.float64)
    total = float(image.sum()) if image.size else 0.0
    if (image.ndim != 2 or image.shape[0] % 2 == 0 or image.shape[1] % 2 == 0
            or not np.all(np.isfinite(image)) or not total > 0.0):
        msg = (f"the PSF image must be 2-D, odd-sized, finite and of positive sum, got shape "
               f"{image.shape} and sum {total}; fix the exposure's PSF model")
        raise skydiff.InputError(msg)
    return image / total


def _typical(values: NDArray[np.float32], valid: NDArray[np.bool_] | None) -> float:
    """Median of the valid values on a 4 x 4 sub-grid (enough for a scale)."""
    grid = (slice(None, None, 4), slice(None, None, 4))
    sample = values[grid] if valid is None else values[grid][valid[grid]]
    if sample.size == 0:
        sample = values[valid] if valid is not None else values
    return float(np.median(sample)) if sample.size else 0.0


def matched_filter(data: NDArray[np.float32], variance: NDArray[np.float32],
                   valid: NDArray[np.bool_] | None, kernel: NDArray[np.float64]
                   ) -> tuple[NDArray[np.float32], NDArray[np.float32], float]:
    """Significance of a difference image filtered with its own PSF.

    Parameters
    ----------
    data : ndarray of float32, shape (H, W)
        Background-subtracted image, NaN at the pixels without data. A C-contiguous array
        owning its memory is made read-only and shared, not copied.
    variance : ndarray of float32, shape (H, W)
        Its variance.
    valid : ndarray of bool or None
        The pixels with data (None: all).
    kernel : ndarray of shape (K, K)
        The PSF image (odd, unit sum).

    Returns
    -------
    significance : ndarray of float32, shape (H, W)
        :math:`(D \\star P) / \\sqrt{V \\star P^2}`; 0 where the filter covers no data.
    noise : ndarray of float32, shape (H, W)
        :math:`\\sqrt{V \\star P^2}`, the standard deviation of the filtered image.
    typical_noise : float
        Median of ``noise`` over the valid pixels.
    """
    if data.flags.owndata and data.flags.c_contiguous and data.dtype == np.float32:
        data.setflags(write=False)  # lets the Exposure share it
    clean = skydiff.Exposure(data, variance=variance)
    reflected = np.ascontiguousarray(kernel[::-1, ::-1])
    filtered = skydiff.convolve(clean, reflected, mask_dilate=False, variance="exact")
    noise2 = filtered.variance
    floor = _MIN_NOISE_FRACTION * _typical(noise2, valid)
    covered = noise2 > floor
    noise = np.sqrt(noise2)
    significance = np.zeros(data.shape, dtype=np.float32)
    np.divide(filtered.image, noise, out=significance, where=covered)
    typical = _typical(noise2, valid)
    return significance, noise, float(np.sqrt(typical)) if typical > 0 else 0.0


def score_significance(data: NDArray[np.float32], variance: NDArray[np.float32],
                       valid: NDArray[np.bool_] | None
                       ) -> tuple[NDArray[np.float32], NDArray[np.float32], float]:
    """Significance of a score image: ``score / sqrt(variance)`` (0 where invalid).

    Returns the same triple as :func:`matched_filter`.
    """
    noise = np.sqrt(np.maximum(variance, np.float32(0.0)))
    significance = np.zeros(data.shape, dtype=np.float32)
    usable = noise > 0
    if valid is not None:
        usable &= valid
    np.divide(data, noise, out=significance, where=usable)
    significance[~np.isfinite(significance)] = 0.0
    return significance, noise, float(_typical(noise, valid))
