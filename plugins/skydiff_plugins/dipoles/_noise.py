r"""The noise correlations of the fitted planes, estimated once per image from blank sky.

Why
---
The variance planes give each pixel's noise variance, not the correlations between pixels.
The matched template is the template convolved with the PSF-matching kernel :math:`K`, so
its noise is correlated over the size of :math:`K`; a plain (not decorrelated) difference
inherits part of that correlation, and a decorrelated difference is nearly white but then
correlated with the science and template planes over the size of the decorrelation
kernel. A fit that weights such pixels as independent gives the plane too much weight and
underestimates the errors of whatever that plane measures: on a 1-px misaligned star the
template position of the negative lobe came out with errors about 4 times too small.

Model
-----
With the normalised noise :math:`z_a = n_a / \sqrt{V_a}` of plane :math:`a` (difference,
science, template), the correlations are taken as stationary within the image:

.. math::

    \rho_{ab}(\boldsymbol\Delta) = E[z_a(\mathbf i)\, z_b(\mathbf i + \boldsymbol\Delta)],
    \qquad |\Delta_x|, |\Delta_y| \le R,

so the noise covariance of pixel :math:`\mathbf i` of plane :math:`a` and pixel
:math:`\mathbf j` of plane :math:`b` is

.. math::

    C_{ab}(\mathbf i, \mathbf j) = \sqrt{V_a(\mathbf i)\, V_b(\mathbf j)}\;
    \rho_{ab}(\mathbf j - \mathbf i).

Independent pixels with correct variance planes have :math:`\rho_{aa} = \delta`; a variance
plane that is off by a factor :math:`c` gives :math:`\rho_{aa}(0) = c`.

Estimator
---------
On the image's central region (at most ``_REGION_SIDE`` pixels a side):

1. the pixels valid in every plane (unmasked, finite, positive variance; a plane with fewer
   than ``_MIN_PIXELS`` valid pixels there, e.g. a science image of NaNs, is left out and
   taken as white and uncorrelated with the others);
2. :math:`z_a = (x_a - B_a)/\sqrt{V_a}` with :math:`B_a` the plane's background mesh
   (:func:`skydiff.background_mesh`, bins of ``_BACKGROUND_BIN`` pixels);
3. sources are masked: pixels where the PSF-filtered :math:`P_a \star z_a` of any plane
   exceeds ``_SOURCE_THRESHOLD`` times its robust standard deviation (which already includes
   the correlations), grown by one PSF FWHM, and pixels with :math:`|z_a| >` ``_CLIP``;
4. with :math:`m` the remaining pixels and :math:`\tilde z_a` = :math:`z_a` minus its mean
   over them, by FFTs,

   .. math::

       \hat\rho_{ab}(\boldsymbol\Delta) = \frac{\sum_\mathbf i m_\mathbf i
       m_{\mathbf i + \boldsymbol\Delta}\, \tilde z_a(\mathbf i)\,
       \tilde z_b(\mathbf i + \boldsymbol\Delta)}{\sum_\mathbf i m_\mathbf i
       m_{\mathbf i + \boldsymbol\Delta}}.

Each lag has a statistical error of about :math:`1/\sqrt{N}` for :math:`N` sky pixels.
The radius :math:`R` is 2.5 PSF FWHMs: the correlation of a matched template has the width
:math:`\sqrt2\,\sigma_K` of :math:`K \star K`, below :math:`\sqrt2\,\sigma_P` because the
kernel is narrower than the PSF it produces, so :math:`R` is at least 4.2 of its sigmas.
Fewer than ``_MIN_PIXELS`` sky pixels give no estimate (the caller then takes the pixels
as independent).

Noise factor
------------
The noise factor of plane :math:`a` is the ratio of the true variance of a PSF-weighted sum
of its pixels (a PSF flux) to the variance its variance plane predicts for independent
pixels,

.. math::

    \eta_a = \frac{\operatorname{Var}\big(\sum_\mathbf i P(\mathbf i)\, z_a(\mathbf i)\big)}
    {\sum_\mathbf i P(\mathbf i)^2}
    = \frac{\sum_{\boldsymbol\Delta} \rho_{aa}(\boldsymbol\Delta)\,
    (P \star P)(\boldsymbol\Delta)}{\sum_\mathbf i P(\mathbf i)^2},

with :math:`P` the plane's PSF at the region centre: 1 for white noise, and for white noise
convolved with a kernel :math:`K`, :math:`\|K \star P\|^2 / (\|K\|^2 \|P\|^2)`, close to the
number of pixels :math:`(\sum K)^2 / \sum K^2` that :math:`K` averages when it is much
narrower than :math:`P` (e.g. 11 for a Gaussian :math:`K` of FWHM 2.6 px matching FWHM 3 to
FWHM 4). It is in effect the sample variance of the PSF-filtered sky, so its relative
error is :math:`\sqrt{2\sum_\Delta r(\Delta)^2 / N}` with :math:`r` the correlation of the
filtered noise (2 % for :math:`N = 10^5` and a PSF of FWHM 3.5 px); the background
subtraction biases it by about :math:`-1.5 \cdot 4\pi\sigma_P^2 / 64^2` (-1 %).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

import skydiff

__all__ = ["NoiseCorrelation", "correlation_radius", "estimate_correlation",
           "region_slices"]

#: Largest side of the region the correlations are estimated on (pixels): 1e6 sky pixels
#: give each lag an error of about 1e-3.
_REGION_SIDE = 1024
#: Bin size of the background removed before estimating (pixels): the background of a bin
#: of N pixels is off by ~1.25 sigma / sqrt(N), which biases every lag by ~ -1.5 / N
#: (-4e-4 here), i.e. a PSF-weighted sum by -1.5 (4 pi sigma_P^2) / N (-1 % for a PSF of
#: FWHM 4).
_BACKGROUND_BIN = 64
#: Sources: pixels of the PSF-filtered normalised noise above this many robust sigmas.
_SOURCE_THRESHOLD = 4.0
#: Single pixels above this many sigmas are left out too (cosmic rays, defects).
_CLIP = 5.0
#: Fewest sky pixels for an estimate; below, the planes are taken as independent (a lag's
#: error is then ~2 %, and a noise factor's ~6 % for a PSF of FWHM 3.5).
_MIN_PIXELS = 2000
#: The radius of the correlation window, in PSF FWHMs (and its limits, pixels).
_RADIUS_PER_FWHM = 2.5
_MIN_RADIUS, _MAX_RADIUS = 2, 30


class NoiseCorrelation(NamedTuple):
    """The normalised noise correlations of the planes and their PSF-flux noise factors.

    Attributes
    ----------
    correlation : ndarray of shape (p, p, 2R + 1, 2R + 1)
        :math:`\\rho_{ab}(\\Delta)`; lag :math:`(\\Delta_y, \\Delta_x)` at
        ``[a, b, R + dy, R + dx]``. ``correlation[b, a]`` is ``correlation[a, b]``
        reversed in both lags.
    factors : ndarray of shape (p,)
        The noise factors :math:`\\eta_a`.
    n_pixels : int
        The number of sky pixels used.
    """

    correlation: np.ndarray
    factors: np.ndarray
    n_pixels: int

    @property
    def radius(self) -> int:
        """The largest lag :math:`R` per axis."""
        return int(self.correlation.shape[-1] // 2)


def correlation_radius(fwhm: float) -> int:
    """The radius of the correlation window for a largest PSF FWHM of ``fwhm`` pixels."""
    if not math.isfinite(fwhm) or fwhm <= 0:
        return _MIN_RADIUS
    return int(min(max(math.ceil(_RADIUS_PER_FWHM * fwhm), _MIN_RADIUS), _MAX_RADIUS))


def region_slices(shape: tuple[int, int]) -> tuple[slice, slice]:
    """The central region (at most ``_REGION_SIDE`` a side) of an image of ``shape``."""
    def axis(size: int) -> slice:
        side = min(size, _REGION_SIDE)
        start = (size - side) // 2
        return slice(start, start + side)

    return axis(shape[0]), axis(shape[1])


def _noise_factor(rho: np.ndarray, kernel: np.ndarray) -> float:
    r""":math:`\eta = \sum_\Delta \rho(\Delta) (P\star P)(\Delta) / \sum P^2` over the window."""
    radius = rho.shape[-1] // 2
    auto = scipy.signal.fftconvolve(kernel, kernel[::-1, ::-1], mode="full")
    centre = kernel.shape[0] - 1
    pad = max(radius - centre, 0)
    auto = np.pad(auto, pad)
    centre += pad
    window = auto[centre - radius:centre + radius + 1, centre - radius:centre + radius + 1]
    return float(np.sum(rho * window) / np.sum(kernel**2))


def _lags(spectrum: np.ndarray, shape: tuple[int, int], radius: int) -> np.ndarray:
    """The lags -R..R (both axes) of the inverse real FFT of ``spectrum`` on ``shape``."""
    full = scipy.fft.irfft2(spectrum, s=shape)
    rows = np.arange(-radius, radius + 1) % shape[0]
    cols = np.arange(-radius, radius + 1) % shape[1]
    return np.asarray(full[np.ix_(rows, cols)])


def _normalised_noise(data: np.ndarray, variance: np.ndarray, valid: np.ndarray,
                      usable: np.ndarray) -> np.ndarray | None:
    """:math:`(x_a - B_a)/\\sqrt{V_a}` on ``valid`` pixels of the ``usable`` planes, else 0.

    None when a background cannot be estimated.
    """
    z = np.zeros(data.shape, dtype=np.float64)
    invalid = ~valid
    for a in range(data.shape[0]):  # loop over the (at most 3) planes
        if not usable[a]:
            continue
        plane = np.where(valid, data[a], 0.0)
        try:
            background = skydiff.background_mesh(plane, mask=invalid,
                                                 bin_size=_BACKGROUND_BIN)
        except skydiff.InputError:
            return None
        scale = np.sqrt(np.where(valid, variance[a], 1.0))
        z[a] = np.where(valid, (plane - background) / scale, 0.0)
    return z


def estimate_correlation(data: np.ndarray, variance: np.ndarray, valid: np.ndarray,
                         kernels: list[np.ndarray], *, radius: int, grow: int
                         ) -> NoiseCorrelation | None:
    """Estimate the noise correlations of stacked planes (see the module documentation).

    Parameters
    ----------
    data, variance : ndarray of shape (p, H, W)
        The planes of the region and their variances.
    valid : ndarray of bool, shape (p, H, W)
        Usable pixels of each plane.
    kernels : list of ndarray
        Each plane's PSF image (odd side, unit sum) at the region centre.
    radius : int
        The largest lag :math:`R` per axis.
    grow : int
        Pixels by which the source mask is grown (about one PSF FWHM).

    Returns
    -------
    NoiseCorrelation or None
        None when fewer than ``_MIN_PIXELS`` sky pixels are left or the estimate is not
        usable (a noise factor not positive and finite).
    """
    n_planes = data.shape[0]
    # a plane without enough valid pixels in the region (e.g. a science image of NaNs)
    # cannot be estimated; it is taken as white and uncorrelated with the others
    usable = np.count_nonzero(valid.reshape(n_planes, -1), axis=1) >= _MIN_PIXELS
    if not usable.any():
        return None
    common = np.all(valid[usable], axis=0)
    if np.count_nonzero(common) < _MIN_PIXELS:
        return None
    z = _normalised_noise(data, variance, common, usable)
    if z is None:
        return None
    sky = common.copy()
    for a, kernel in enumerate(kernels):  # loop over the (at most 3) planes
        if not usable[a]:
            continue
        filtered = scipy.signal.fftconvolve(z[a], kernel[::-1, ::-1], mode="same")
        sigma = skydiff.robust_std(filtered, mask=~common)
        sources = np.abs(filtered) > _SOURCE_THRESHOLD * sigma
        if grow > 0:
            sources = scipy.ndimage.maximum_filter(sources, size=2 * grow + 1)
        sky &= ~sources & (np.abs(z[a]) <= _CLIP)
    n_pixels = int(np.count_nonzero(sky))
    if n_pixels < _MIN_PIXELS:
        return None
    means = np.array([z[a][sky].mean() for a in range(n_planes)])
    z = np.where(sky & usable[:, None, None], z - means[:, None, None], 0.0)
    height, width = sky.shape
    shape = (scipy.fft.next_fast_len(max(height + radius, 2 * radius + 1), real=True),
             scipy.fft.next_fast_len(max(width + radius, 2 * radius + 1), real=True))
    spectra = scipy.fft.rfft2(z, s=shape)
    weight_spectrum = scipy.fft.rfft2(sky.astype(np.float64), s=shape)
    counts = np.maximum(_lags(np.abs(weight_spectrum) ** 2, shape, radius), 1.0)
    side = 2 * radius + 1
    rho = np.empty((n_planes, n_planes, side, side))
    for a in range(n_planes):  # loop over the (at most 6) pairs of planes
        for b in range(a, n_planes):
            lags = _lags(np.conj(spectra[a]) * spectra[b], shape, radius) / counts
            if a == b:
                lags = 0.5 * (lags + lags[::-1, ::-1])
                if not usable[a]:
                    lags[radius, radius] = 1.0
            rho[a, b] = lags
            rho[b, a] = lags[::-1, ::-1]
    factors = np.array([_noise_factor(rho[a, a], kernels[a]) for a in range(n_planes)])
    if not np.all(np.isfinite(factors) & (factors > 0)):
        return None
    return NoiseCorrelation(correlation=rho, factors=factors, n_pixels=n_pixels)
