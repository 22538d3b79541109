r"""Fourier-space decorrelation filters, Parseval variance weights and robust statistics.

Notation (see :mod:`skydiff_plugins.decorrelation`): :math:`\kappa` is the PSF-matching kernel
with sum :math:`k_\Sigma`, :math:`u` the image the kernel did not convolve and :math:`c` the one
it convolved, :math:`\sigma^2_u, \sigma^2_c` their clipped-mean variances, :math:`H` the
pre-filter of the score path. Transforms of small images (kernels, PSFs) are *centred*: the
central pixel is the origin, so real even images have real spectra and no shift is introduced.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

import skydiff

__all__ = [
    "PREFILTER_FLOOR",
    "Correction",
    "centered_spectrum",
    "decorrelate_block",
    "hermitian_sum",
    "variance_level",
]

#: Grids with more points than this use all cores for FFTs and the DFT matrix products;
#: smaller ones run faster single-threaded.
_PARALLEL_SIZE = 2**19
#: Floor of :math:`|\hat H|^2` in the score correction: 1000 × the smallest normal float64
#: (as ``lsst.ip.diffim``; the ratio is evaluated in float64).
PREFILTER_FLOOR = 1000.0 * float(np.finfo(np.float64).tiny)
#: Rows of the FFT grid per chunk of the float64 evaluation of the pre-filtered score filter.
_CHUNK_ROWS = 256
#: Denominators of the filters are floored at this fraction of the numerator (bounds the
#: gain of the filter at 1e6 when the unconvolved image is noiseless).
_MIN_DENOMINATOR = 1e-12
#: Statistics use at most this many pixels, taken on a regular stride (the clipped mean of
#: 2**16 samples of a variance plane is precise to ≈0.4 % of its pixel-to-pixel scatter).
_MAX_STAT_PIXELS = 2**16

Kind = Literal["diffim", "score_prefiltered", "score_matched"]


# ------------------------------------------------------------------------------------------
# statistics


def variance_level(variance: NDArray[np.float32], mask: NDArray[np.uint32], bad_bits: int, *,
                   n_sigma: float, n_iter: int) -> float:
    """Clipped mean (:func:`skydiff.clipped_stats`) of a variance plane over unflagged pixels.

    Pixels with any of ``bad_bits`` are left out, unless no finite pixel would remain (then
    all finite pixels count). At most :data:`_MAX_STAT_PIXELS` pixels are used, on a regular
    stride over the image.

    Returns
    -------
    float
        The clipped mean; NaN if the plane has no finite value.
    """
    step = max(1, math.ceil(variance.size / _MAX_STAT_PIXELS))
    values = variance.ravel()[::step]
    flagged = (mask.ravel()[::step] & np.uint32(bad_bits)) != 0
    if not np.any(np.isfinite(values) & ~flagged):
        flagged = np.zeros(values.shape, dtype=bool)
    try:
        return skydiff.clipped_stats(values, n_sigma=n_sigma, n_iter=n_iter, mask=flagged).mean
    except skydiff.InputError:
        return math.nan


# ------------------------------------------------------------------------------------------
# spectra


def centered_spectrum(image: ArrayLike, shape: tuple[int, int], *,
                      dtype: type[np.complexfloating] = np.complex64,
                      rows: slice = slice(None)) -> NDArray[np.complexfloating]:
    r"""The DFT of a small odd-sized image on the ``rfft2`` grid of ``shape``, centre at origin.

    .. math::

        \hat\kappa(k_r, k_c) = \sum_{i,j} \kappa[i, j]\,
        e^{-2\pi i\,(k_r (i - K_r//2) / N_r + k_c (j - K_c//2) / N_c)},

    for :math:`k_c = 0 \ldots N_c//2`: the ``rfft2`` of the image zero-padded to ``shape``
    with its central pixel rolled to ``[0, 0]``. On large grids it is computed as two matrix
    products with the DFT matrices, :math:`E_r\,\kappa\,E_c`, at a cost of
    :math:`N_r (N_c/2) K` complex multiply-adds — a third of one full-frame FFT for a
    21-pixel kernel; small grids use that FFT.

    Parameters
    ----------
    image : array_like of shape (K_r, K_c)
        Odd sizes, no larger than ``shape``.
    shape : tuple of int
        ``(N_r, N_c)`` of the FFT grid.
    dtype : complex dtype, optional
        ``complex64`` (full frames) or ``complex128`` (small grids).
    rows : slice, optional
        Only these rows of the grid (for evaluation in chunks).

    Returns
    -------
    ndarray of shape (N_r, N_c // 2 + 1)
        (fewer rows with ``rows``).
    """
    array = np.asarray(image, dtype=np.float64)
    n_r, n_c = shape
    k_r, k_c = array.shape
    if n_r * n_c <= _PARALLEL_SIZE:
        real = np.float32 if dtype == np.complex64 else np.float64
        padded = np.zeros(shape, dtype=real)
        padded[:k_r, :k_c] = array
        padded = np.roll(padded, (-(k_r // 2), -(k_c // 2)), axis=(0, 1))
        return scipy.fft.rfft2(padded)[rows].astype(dtype, copy=False)
    phase_r = np.fft.fftfreq(n_r)[rows, None] * (np.arange(k_r) - k_r // 2)[None, :]
    phase_c = (np.arange(k_c) - k_c // 2)[:, None] * np.fft.rfftfreq(n_c)[None, :]
    e_r = np.exp(-2j * np.pi * phase_r).astype(dtype)
    e_c = np.exp(-2j * np.pi * phase_c).astype(dtype)
    return (e_r @ array.astype(dtype)) @ e_c


def power(spectrum: NDArray[np.complexfloating]) -> NDArray[np.floating]:
    """:math:`|\\hat x|^2` without a complex temporary."""
    result = np.square(spectrum.real)
    result += np.square(spectrum.imag)
    return result


def hermitian_sum(half: NDArray[np.floating], n_cols: int) -> float:
    """Sum over the full DFT grid of a Hermitian-symmetric array given on the rfft grid.

    Columns ``1 .. n_cols//2`` (excluding the Nyquist column when ``n_cols`` is even) stand
    for two columns of the full grid.
    """
    column_sums = half.sum(axis=0, dtype=np.float64)
    multiplicity = np.full(column_sums.shape, 2.0)
    multiplicity[0] = 1.0
    if n_cols % 2 == 0:
        multiplicity[-1] = 1.0
    return float(column_sums @ multiplicity)


def _centered_crop(spectrum: NDArray[np.complexfloating], shape: tuple[int, int],
                   size: tuple[int, int]) -> NDArray[np.float64]:
    """Inverse rfft2 with the origin moved to the centre, cropped to the odd ``size``."""
    full = np.fft.fftshift(scipy.fft.irfft2(spectrum, s=shape))
    c_r, c_c = shape[0] // 2, shape[1] // 2
    h_r, h_c = size[0] // 2, size[1] // 2
    return np.ascontiguousarray(full[c_r - h_r:c_r + h_r + 1, c_c - h_c:c_c + h_c + 1])


def _fast_shape(size: int) -> tuple[int, int]:
    n = scipy.fft.next_fast_len(int(size), real=True)
    return n, n


@attrs.frozen
class Correction:
    r"""One decorrelation filter: its definition and its evaluation on any FFT grid.

    ``kind`` selects the filter applied to the FFT of the input image:

    ``"diffim"`` (DMTN-021 with a flux-preserving numerator)
        .. math:: \hat\phi = \sqrt{\frac{\sigma_u^2 + \sigma_c^2 k_\Sigma^2}
                                          {\sigma_u^2 + \sigma_c^2 |\hat\kappa|^2}},
                  \qquad \hat c_u = \hat\phi, \quad \hat c_c = \hat\kappa\hat\phi;

    ``"score_prefiltered"`` (DMTN-179, input :math:`H\otimes S - \kappa\otimes T`)
        .. math:: \hat c = \frac{\sigma_u^2 + \sigma_c^2 k_\Sigma^2 / h_\Sigma^2}
                                {\sigma_u^2 + \sigma_c^2 |\hat\kappa|^2 /
                                 \max(|\hat H|^2, f)},
                  \qquad \hat c_u = \hat H\hat c, \quad \hat c_c = \hat\kappa\hat c;

    ``"score_matched"`` (input :math:`D = u - \kappa\otimes c`, filtered by :math:`\hat H\hat c`)
        .. math:: \hat c = \frac{\sigma_u^2 + \sigma_c^2 k_\Sigma^2}
                                {\sigma_u^2 + \sigma_c^2 |\hat\kappa|^2},
                  \qquad \hat c_u = \hat H\hat c, \quad \hat c_c = \hat H\hat\kappa\hat c,

    with :math:`h_\Sigma = \sum H` and :math:`f` = :data:`PREFILTER_FLOOR`. :math:`\hat c_u`
    and :math:`\hat c_c` are the overall filters applied to the unconvolved and convolved
    input images, which set the variance (DMTN-179 §5).

    Attributes
    ----------
    kind : {"diffim", "score_prefiltered", "score_matched"}
    kernel : ndarray of shape (K_r, K_c)
        :math:`\kappa` (odd sizes, not normalised).
    prefilter : ndarray of shape (P, P) or None
        :math:`H` (score kinds only).
    sigma2_u, sigma2_c : float
        The variances of the unconvolved and convolved images.
    """

    kind: Kind
    kernel: NDArray[np.float64] = attrs.field(eq=False)
    prefilter: NDArray[np.float64] | None = attrs.field(eq=False)
    sigma2_u: float
    sigma2_c: float

    @property
    def kernel_sum(self) -> float:
        """:math:`k_\\Sigma`."""
        return float(self.kernel.sum())

    @property
    def numerator(self) -> float:
        """The flux-preserving numerator (the filter is 1 at zero frequency)."""
        ksum2 = self.kernel_sum**2
        if self.kind == "score_prefiltered":
            assert self.prefilter is not None
            ksum2 /= float(self.prefilter.sum()) ** 2
        return self.sigma2_u + self.sigma2_c * ksum2

    @property
    def support(self) -> int:
        """A generous image-space extent of the overall filter, used as padding."""
        k = max(self.kernel.shape)
        h = 0 if self.prefilter is None else max(self.prefilter.shape)
        return 2 * k + h

    def _c_hat(self, kpow: NDArray[np.floating], hpow: NDArray[np.floating] | None
               ) -> NDArray[np.floating]:
        """:math:`\\hat\\phi^2` (diffim) or :math:`\\hat c` (scores), in ``kpow``'s dtype."""
        dtype = kpow.dtype.type
        num = self.numerator
        if self.kind == "score_prefiltered":
            assert hpow is not None
            floor = max(PREFILTER_FLOOR, 1000.0 * float(np.finfo(dtype).tiny))
            den = np.maximum(hpow, dtype(floor))
            np.divide(kpow, den, out=den)
            den *= dtype(self.sigma2_c)
        else:
            den = np.multiply(kpow, dtype(self.sigma2_c))
        den += dtype(self.sigma2_u)
        if self.sigma2_u < num * _MIN_DENOMINATOR:  # else the floor cannot bind
            np.maximum(den, dtype(num * _MIN_DENOMINATOR), out=den)
        np.divide(dtype(num), den, out=den)
        return den

    def full_grid(self, shape: tuple[int, int]
                  ) -> tuple[NDArray[np.floating] | NDArray[np.complexfloating], float, float]:
        r"""The image filter on the rfft grid of ``shape`` and the Parseval variance weights.

        Returns
        -------
        filter : ndarray of shape (N_r, N_c // 2 + 1)
            ``float32`` (:math:`\hat\phi` or :math:`\hat c`) or ``complex64``
            (:math:`\hat H\hat c`).
        w_u, w_c : float
            :math:`w = \sum_k |\hat c(k)|^2 / N` for the unconvolved and convolved images.
        """
        n = shape[0] * shape[1]
        if self.kind == "score_prefiltered":
            return self._prefiltered_full_grid(shape)
        kspec = centered_spectrum(self.kernel, shape)
        kpow = power(kspec)
        del kspec
        hspec = hpow = None
        if self.kind != "diffim":
            assert self.prefilter is not None
            hspec = centered_spectrum(self.prefilter, shape)
            hpow = power(hspec)
        c_hat = self._c_hat(kpow, hpow)
        if self.kind == "diffim":  # c_hat is phi^2
            w_u = hermitian_sum(c_hat, shape[1]) / n
            kpow *= c_hat
            w_c = hermitian_sum(kpow, shape[1]) / n
            del kpow
            return np.sqrt(c_hat, out=c_hat), w_u, w_c
        assert hpow is not None and hspec is not None
        c2 = np.square(c_hat)
        kpow *= hpow
        kpow *= c2
        w_c = hermitian_sum(kpow, shape[1]) / n
        del kpow
        c2 *= hpow
        w_u = hermitian_sum(c2, shape[1]) / n
        del c2, hpow
        hspec *= c_hat
        return hspec, w_u, w_c

    def _prefiltered_full_grid(self, shape: tuple[int, int]
                               ) -> tuple[NDArray[np.float32], float, float]:
        r""":meth:`full_grid` of ``"score_prefiltered"``, evaluated in float64 by row chunks.

        The ratio :math:`|\hat\kappa|^2/|\hat H|^2` involves two spectra that both fall to
        tiny values at high frequency; in ``complex64`` their rounding noise (≈1e-7 of the
        peak) makes the ratio, hence :math:`\hat c`, random wherever :math:`|\hat H|^2
        \lesssim 10^{-13}`, and the filter then spreads the broadband leakage of the image
        edges over the whole image (≈1 % of the noise). The float64 evaluation is exact to
        :math:`|\hat H|^2 \approx 10^{-30}`; it runs in chunks of rows so that no
        full-frame float64 array is made.
        """
        n = shape[0] * shape[1]
        assert self.prefilter is not None
        out = np.empty((shape[0], shape[1] // 2 + 1), dtype=np.float32)
        w_u = w_c = 0.0
        for start in range(0, shape[0], _CHUNK_ROWS):
            rows = slice(start, min(start + _CHUNK_ROWS, shape[0]))
            kpow = power(centered_spectrum(self.kernel, shape, dtype=np.complex128, rows=rows))
            hpow = power(centered_spectrum(self.prefilter, shape, dtype=np.complex128,
                                           rows=rows))
            c_hat = self._c_hat(kpow, hpow)
            c2 = np.square(c_hat)
            w_u += hermitian_sum(c2 * hpow, shape[1])
            w_c += hermitian_sum(c2 * kpow, shape[1])
            out[rows] = c_hat
        return out, w_u / n, w_c / n

    def small_transfers(self, shape: tuple[int, int]
                        ) -> dict[str, NDArray[np.complexfloating]]:
        """``complex128`` spectra on a small grid: ``"u"``, ``"c"`` (the overall filters of
        the two inputs) and ``"image"`` (the filter applied to the input image)."""
        kspec = centered_spectrum(self.kernel, shape, dtype=np.complex128)
        kpow = power(kspec)
        if self.kind == "diffim":
            phi = np.sqrt(self._c_hat(kpow, None)).astype(np.complex128)
            return {"u": phi, "c": kspec * phi, "image": phi}
        assert self.prefilter is not None
        hspec = centered_spectrum(self.prefilter, shape, dtype=np.complex128)
        c_hat = self._c_hat(kpow, power(hspec)).astype(np.complex128)
        if self.kind == "score_prefiltered":
            return {"u": hspec * c_hat, "c": kspec * c_hat, "image": c_hat}
        return {"u": hspec * c_hat, "c": hspec * kspec * c_hat, "image": hspec * c_hat}

    def filtered_psf(self, psf_image: NDArray[np.float64] | None) -> NDArray[np.float64]:
        r"""The PSF of the corrected image (odd square stamp, not normalised).

        ``"diffim"``: :math:`\phi \otimes P` with :math:`P` = ``psf_image``. Scores: the
        response to a point source of the unconvolved image,
        :math:`\mathcal F^{-1}[\hat c\,|\hat H|^2]` for ``"score_prefiltered"`` (:math:`H` is
        the reflected PSF, so :math:`\hat H \hat P = |\hat H|^2`) and
        :math:`\mathcal F^{-1}[\hat H\hat c\,\hat P]` for ``"score_matched"``.
        """
        k = max(self.kernel.shape)
        if self.kind == "score_prefiltered":
            assert self.prefilter is not None
            base = max(self.prefilter.shape)
            size = 2 * base - 1 + k - 1
        else:
            assert psf_image is not None
            base = max(psf_image.shape)
            size = base + k - 1 + (0 if self.kind == "diffim" else base - 1)
        shape = _fast_shape(size + 2 * k)
        transfers = self.small_transfers(shape)
        if self.kind == "score_prefiltered":
            assert self.prefilter is not None
            hspec = centered_spectrum(self.prefilter, shape, dtype=np.complex128)
            spectrum = transfers["image"] * power(hspec)
        else:
            assert psf_image is not None
            spectrum = transfers["image"] * centered_spectrum(psf_image, shape,
                                                              dtype=np.complex128)
        return _centered_crop(spectrum, shape, (size, size))

    def variance_kernels(self, w_u: float, w_c: float
                         ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        r"""The squared image-space filters :math:`c_u^2, c_c^2` (odd stamps).

        They are truncated to a stamp of twice the kernel size (plus the pre-filter) and
        rescaled so that their sums equal the Parseval weights ``w_u``, ``w_c`` of the full
        grid; both variance modes then agree exactly for a constant variance plane.
        """
        k = max(self.kernel.shape)
        h = 0 if self.prefilter is None else max(self.prefilter.shape) - 1
        size = 2 * k - 1 + h
        shape = _fast_shape(2 * size)
        transfers = self.small_transfers(shape)
        result = []
        for key, weight in (("u", w_u), ("c", w_c)):
            square = np.square(_centered_crop(transfers[key], shape, (size, size)))
            total = square.sum()
            if total > 0.0:
                square *= weight / total
            result.append(square)
        return result[0], result[1]


# ------------------------------------------------------------------------------------------
# applying a correction to one image block


def _workers(shape: tuple[int, ...]) -> int:
    return -1 if math.prod(shape) > _PARALLEL_SIZE else 1


def _padded(shape: tuple[int, int], support: int) -> tuple[int, int]:
    return (scipy.fft.next_fast_len(shape[0] + support, real=True),
            scipy.fft.next_fast_len(shape[1] + support, real=True))


def _convolve_same(image: NDArray[np.float32], stamp: NDArray[np.float64]
                   ) -> NDArray[np.float32]:
    """Zero-padded same-shape FFT convolution with an odd centred stamp (float32)."""
    shape = _padded(image.shape, max(stamp.shape))
    spectrum = scipy.fft.rfft2(image, s=shape, workers=_workers(shape))
    spectrum *= centered_spectrum(stamp, shape)
    full = scipy.fft.irfft2(spectrum, s=shape, workers=_workers(shape))
    return np.array(full[:image.shape[0], :image.shape[1]], dtype=np.float32)


def _filled(array: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """The array with non-finite values replaced by the mean of the finite ones."""
    bad = ~np.isfinite(array)
    if not bad.any():
        return array, bad
    fill = float(np.mean(array[~bad], dtype=np.float64)) if (~bad).any() else 0.0
    return np.where(bad, np.float32(fill), array), bad


def decorrelate_block(image: NDArray[np.float32], bad: NDArray[np.bool_],
                      variance_u: NDArray[np.float32], variance_c: NDArray[np.float32],
                      correction: Correction, *, complete_variance: bool,
                      variance_scale: float = 1.0
                      ) -> tuple[NDArray[np.float32], NDArray[np.float32], float, float]:
    r"""Filter one image block and propagate its variance.

    1. The mean :math:`m` of the good pixels is subtracted and bad pixels (``bad``) are set
       to it; the block is zero-padded by :attr:`Correction.support` (so the image continues
       as its mean: no wrap-around, constants preserved) to a fast FFT size.
    2. One forward ``rfft2``, multiplication by the filter, one inverse ``irfft2``
       (``float32``/``complex64``, all cores); :math:`m` is added back and bad pixels get
       their original values.
    3. Variance: :math:`V = (V_u w_u + V_c w_c)\,s` (Parseval weights) or, with
       ``complete_variance``, :math:`V = (V_u \otimes c_u^2 + V_c \otimes c_c^2)\,s` (two FFT
       convolutions; non-finite variances are replaced by the mean meanwhile and restored),
       with :math:`s` = ``variance_scale``.

    Returns
    -------
    image, variance : ndarray of shape (H, W), float32
    w_u, w_c : float
        The Parseval weights.
    """
    height, width = image.shape
    any_bad = bool(bad.any())
    if any_bad:
        good = ~bad
        n_good = int(np.count_nonzero(good))
        mean = float(np.sum(image, where=good, dtype=np.float64)) / n_good if n_good else 0.0
    else:
        mean = float(np.mean(image, dtype=np.float64))
    shape = _padded(image.shape, correction.support)
    work = np.zeros(shape, dtype=np.float32)  # the padding continues the image as its mean
    block = work[:height, :width]
    np.subtract(image, np.float32(mean), out=block)
    if any_bad:
        block[bad] = 0.0
    spectrum = scipy.fft.rfft2(work, workers=_workers(shape), overwrite_x=True)
    del work, block
    filt, w_u, w_c = correction.full_grid(shape)
    spectrum *= filt
    del filt
    full = scipy.fft.irfft2(spectrum, s=shape, workers=_workers(shape), overwrite_x=True)
    del spectrum
    out = np.add(full[:height, :width], np.float32(mean), dtype=np.float32)
    del full
    if any_bad:
        out[bad] = image[bad]

    if complete_variance:
        cu2, cc2 = correction.variance_kernels(w_u, w_c)
        filled_u, bad_u = _filled(variance_u)
        filled_c, bad_c = _filled(variance_c)
        variance = _convolve_same(filled_u, cu2)
        variance += _convolve_same(filled_c, cc2)
        np.maximum(variance, 0.0, out=variance)
        variance[bad_u | bad_c] = np.nan
    else:
        variance = np.multiply(variance_u, np.float32(w_u), dtype=np.float32)
        variance += np.multiply(variance_c, np.float32(w_c), dtype=np.float32)
    if variance_scale != 1.0:
        variance *= np.float32(variance_scale)
    return out, variance, w_u, w_c


def psf_from_stamp(stamp: NDArray[np.float64], position: tuple[float, float]
                   ) -> skydiff.ImagePsf | None:
    """An :class:`~skydiff.ImagePsf` of the stamp, or None when its sum is not positive."""
    if not (np.all(np.isfinite(stamp)) and stamp.sum() > 0.0):
        return None
    return skydiff.ImagePsf(stamp, position=position)
