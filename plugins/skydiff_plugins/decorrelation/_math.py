r"""Fourier-space decorrelation filters, Parseval variance weights and robust statistics.

Notation (see :mod:`skydiff_plugins.decorrelation`): :math:`\kappa` is the PSF-matching kernel
with sum :math:`k_\Sigma`, :math:`u` the image the kernel did not convolve and :math:`c` the one
it convolved, :math:`\sigma^2_u, \sigma^2_c` their clipped-mean variances, :math:`H` the
pre-filter of the score path. Transforms of small images (kernels, PSFs) are *centred*: the
central pixel is the origin, so real even images have real spectra and no shift is introduced.

Full-frame transforms go through SciPy's pocketfft binding with caller-owned output buffers
(``skydiff._fft.POCKETFFT``, probed once by the core's private FFT engine; this plugin ships in
the same distribution as the core and falls back to the public :mod:`scipy.fft` functions when
the probe failed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import attrs
import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

import skydiff
from skydiff import _fft  # private core module: the probed pocketfft binding (same distribution)
from skydiff.parallel import cpu_count, parallel_rows, serial_matmul

__all__ = [
    "FILTER_TOLERANCE",
    "MAX_FILTER_HALF",
    "PREFILTER_FLOOR",
    "CompactFilter",
    "Correction",
    "centered_spectrum",
    "compact_half_width",
    "decorrelate_block",
    "filtered_polynomial_psf",
    "filtered_psf_image",
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
#: Crop tolerance of the image-space filters. A filter is cut to the smallest centred odd
#: square outside which the sum of its absolute values is at most this fraction of the total
#: (its L1 norm). For an image with :math:`|x| \le M` the cut changes no filtered pixel by
#: more than ``FILTER_TOLERANCE`` :math:`\cdot\|\phi\|_1 M` (at most twice that with the
#: unit sum restored on the central pixel): below the float32 rounding of the FFT filtering
#: itself, :math:`\approx 3\times 10^{-8}\,\|\phi\|_1 M` (measured against float64; the
#: filters met in practice have :math:`\|\phi\|_1` between 1.4 and 25). A PSF made with the
#: cut filter loses at most this fraction of its L1 norm. Each factor of 10 costs a few
#: pixels of half-width (the filters decay exponentially).
FILTER_TOLERANCE = 1e-8
#: Above this L1 norm of the compact filter its spectrum is evaluated in float64 (then
#: rounded to float32): the evaluation's absolute rounding is :math:`\epsilon\|\phi\|_1`
#: while :math:`\hat\phi \ge 1`, so float32 keeps float32 accuracy only for small norms.
_FLOAT32_MAX_L1 = 4.0
#: Largest half-width (pixels) of a compact filter. A broader filter (the correction then
#: approaches a deconvolution, e.g. σ²_c ≫ σ²_u with a broad kernel) is applied through its
#: exact evaluation on the rfft grid instead.
MAX_FILTER_HALF = 128
#: Side of the first small grid on which a compact filter is looked for (doubled until the
#: filter's half-width is at most a quarter of the grid, so that the periodic wrap of the
#: small-grid transform is below the crop tolerance too).
_MIN_FILTER_GRID = 64
#: Rows per block when a full-frame array is processed by blocks (the blocks stay in cache
#: between the steps applied to them).
_BLOCK_ROWS = 64
#: Largest real matrix product (multiply-adds) of one block: OpenBLAS runs products of fewer
#: than twice 2**18 multiply-adds on the calling thread. Larger ones wake its thread pool,
#: whose threads spin for ~0.1 s afterwards and slow down the FFTs that follow on a small
#: machine; complex products do so from about 2**16 multiply-adds, so large complex products
#: are computed as real ones by :func:`skydiff.parallel.serial_matmul`, in blocks of the same
#: size (:data:`skydiff.parallel.SERIAL_COMPLEX_GEMM`).
_SERIAL_GEMM_SIZE = 2**19 - 1

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
    values = np.ascontiguousarray(variance.ravel()[::step])  # one strided gather
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
    with its central pixel rolled to ``[0, 0]``. On large grids it is computed as
    :math:`E_r\,(\kappa\,E_c)`: the centred DFTs of the rows (one small FFT), then the DFT
    along axis 0 as a matrix product of :math:`N_r (N_c/2) K` complex multiply-adds — a third
    of one full-frame FFT for a 21-pixel kernel (:func:`skydiff.parallel.serial_matmul`);
    small grids use that FFT.

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
    # E_r (κ E_c): the rows' centred DFTs (one small float64 rfft), then the DFT along axis 0
    phase_r = np.fft.fftfreq(n_r)[rows, None] * (np.arange(k_r) - k_r // 2)[None, :]
    e_r = np.exp(-2j * np.pi * phase_r).astype(dtype)
    return serial_matmul(e_r, _centered_row_spectra(array, n_c).astype(dtype))


def _centered_row_spectra(image: NDArray[np.float64], n_cols: int
                          ) -> NDArray[np.complex128]:
    r"""The centred DFTs of the rows of an odd-width image on the rfft grid of ``n_cols``.

    :math:`A_i(k_c) = \sum_j x[i, j]\,e^{-2\pi i\,k_c (j - K_c//2) / N_c}` for
    :math:`k_c = 0 \ldots N_c//2`: the ``rfft`` of each row zero-padded to ``n_cols`` with its
    central pixel rolled to index 0 (``complex128``; ``K_c <= n_cols``).
    """
    n_rows, width = image.shape
    half = width // 2
    padded = np.zeros((n_rows, n_cols), dtype=np.float64)
    padded[:, :width - half] = image[:, half:]
    if half:
        padded[:, n_cols - half:] = image[:, :half]
    spectra: NDArray[np.complex128] = scipy.fft.rfft(padded, axis=1)
    return spectra


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


# ------------------------------------------------------------------------------------------
# compact image-space filters


def compact_half_width(image: NDArray[np.floating], tolerance: float) -> int:
    r"""Smallest :math:`h` whose centred :math:`(2h+1)^2` box holds all but ``tolerance`` of
    the L1 norm of ``image`` (centre ``[n_r // 2, n_c // 2]``).

    Returns
    -------
    int
        :math:`h`, with :math:`\sum_{\max(|dr|, |dc|) > h} |x| \le` ``tolerance``
        :math:`\sum |x|`.
    """
    n_r, n_c = image.shape
    rows = np.abs(np.arange(n_r) - n_r // 2)
    cols = np.abs(np.arange(n_c) - n_c // 2)
    ring = np.maximum(rows[:, None], cols[None, :])
    sums = np.bincount(ring.ravel(), weights=np.abs(image).ravel())
    total = float(sums.sum())
    outside = total - np.cumsum(sums)
    return int(np.argmax(outside <= tolerance * total))


def _crop_centre(image: NDArray[np.float64], half: int) -> NDArray[np.float64]:
    c_r, c_c = image.shape[0] // 2, image.shape[1] // 2
    return np.ascontiguousarray(image[c_r - half:c_r + half + 1, c_c - half:c_c + half + 1])


def _compact_kernel(transfer: Callable[[tuple[int, int]], NDArray[np.complexfloating]], *,
                    start: int, tolerance: float, max_half: int
                    ) -> tuple[NDArray[np.float64], bool]:
    """The image-space kernel of a transfer function, cut by :func:`compact_half_width`.

    The transfer is evaluated on square grids of side ``start``, doubled until the kernel's
    half-width is at most a quarter of the grid (its periodic copies then overlap the stamp
    only with their own negligible tails) or the grid reaches ``4 * max_half``.

    Returns
    -------
    kernel : ndarray of shape (2h + 1, 2h + 1)
        Centred, float64, not normalised.
    compact : bool
        False if the kernel is broader than ``max_half`` (it is then cut at ``max_half``).
    """
    size = max(start, _MIN_FILTER_GRID)
    while True:
        shape = (size, size)
        full = np.fft.fftshift(scipy.fft.irfft2(transfer(shape), s=shape))
        half = compact_half_width(full, tolerance)
        if 4 * half <= size:
            return _crop_centre(full, half), half <= max_half
        if size >= 4 * max_half:
            return _crop_centre(full, min(half, max_half, size // 2 - 1)), False
        size *= 2


def _full_convolve(stack: NDArray[np.float64], filters: NDArray[np.float64]
                   ) -> NDArray[np.float64]:
    """Full 2-D convolutions of every image of ``stack`` (n, a, a) with every filter of
    ``filters`` (m, b, b): an array (n, m, a + b - 1, a + b - 1), float64 (small FFTs)."""
    size = stack.shape[-1] + filters.shape[-1] - 1
    shape = (scipy.fft.next_fast_len(size), scipy.fft.next_fast_len(size, real=True))
    a = scipy.fft.rfft2(stack, s=shape)
    b = scipy.fft.rfft2(filters, s=shape)
    out = scipy.fft.irfft2(a[:, None] * b[None, :], s=shape)
    return np.ascontiguousarray(out[..., :size, :size])


def _trim(stack: NDArray[np.float64], tolerance: float) -> NDArray[np.float64]:
    """Cut every image of the stack (n, s, s) to the largest of their compact half-widths.

    The sum each image loses (at most ``tolerance`` of its L1 norm) is put back on its
    central pixel, so the sums — the normalisation of a PSF model — are unchanged.
    """
    half = max(compact_half_width(image, tolerance) for image in stack)
    out = np.stack([_crop_centre(image, half) for image in stack])
    out[:, half, half] += stack.sum(axis=(1, 2)) - out.sum(axis=(1, 2))
    return out


def filtered_psf_image(psf_image: NDArray[np.float64], kernel: NDArray[np.float64], *,
                       tolerance: float = FILTER_TOLERANCE) -> NDArray[np.float64]:
    r"""``kernel`` :math:`\otimes` ``psf_image`` (full), cut by ``tolerance``, unit sum."""
    stamp = _trim(_full_convolve(psf_image[None], kernel[None])[:, 0], tolerance)[0]
    return stamp / stamp.sum()


def filtered_polynomial_psf(model: skydiff.PolynomialPsf, filters: NDArray[np.float64],
                            filter_order: int, *, tolerance: float = FILTER_TOLERANCE
                            ) -> skydiff.PolynomialPsf:
    r"""The PSF :math:`\phi(x, y) \otimes P(x, y)` of a spatially varying PSF filtered by a
    spatially varying (or constant) kernel, as a :class:`~skydiff.PolynomialPsf`.

    With the model :math:`P(x, y) = \sum_i c_i(x, y)\,\beta_i` (unnormalised; the model
    divides by its sum), :math:`c_i = \sum_s a_{is} f_s` of total degree :math:`p`, and the
    filter :math:`\phi(x, y) = \sum_t g_t(x, y)\,\Phi_t` with :math:`g_t` the spatial
    functions of degree :math:`q` = ``filter_order`` of the model's ``bbox`` and ``kind``,

    .. math::

        \phi(x, y) \otimes P(x, y) = \sum_{i, t} c_i(x, y)\, g_t(x, y)\,
        (\Phi_t \otimes \beta_i),

    exactly a polynomial PSF of degree :math:`p + q` with basis images
    :math:`\Phi_t\otimes\beta_i`: :math:`c_i g_t` lies in the span of the degree-:math:`(p+q)`
    functions (products of Chebyshev polynomials, or monomials, of the same normalised
    coordinates), and its coefficients are found by an exact least-squares solve on a grid
    of Chebyshev nodes. For :math:`q = 0` (one global filter) the coefficients are the
    model's own. Each basis image is cut to the smallest centred square holding all but
    ``tolerance`` of its L1 norm (common to all); the sum it loses is put back on its
    central pixel, so every basis image keeps the sum of :math:`\Phi_t\otimes\beta_i`.

    The sum of the filtered model at a position is the model's sum times
    :math:`\sum_t g_t \sum\Phi_t`, which is 1 when every filter has unit sum (so that
    :meth:`~skydiff.PolynomialPsf.kernel_images` normalises exactly as before).

    Parameters
    ----------
    model : skydiff.PolynomialPsf
    filters : ndarray of shape (n_t, b, b)
        :math:`\Phi_t` for the terms of degree ``filter_order`` (a single image for 0).
    filter_order : int
    tolerance : float, optional

    Returns
    -------
    skydiff.PolynomialPsf
    """
    n_i, n_t = model.basis.shape[0], filters.shape[0]
    if filter_order == 0 and n_t != 1:
        msg = "a degree-0 filter field has exactly one image"
        raise ValueError(msg)
    images = _full_convolve(model.basis, filters)  # (n_i, n_t, s, s)
    basis = _trim(images.reshape(n_i * n_t, *images.shape[2:]), tolerance)
    if filter_order == 0:
        order = model.order
        coefficients = model.coefficients.copy()
    else:
        order = model.order + filter_order
        n_nodes = order + 2
        nodes = np.cos(np.pi * (np.arange(n_nodes) + 0.5) / n_nodes)
        x_min, y_min, x_max, y_max = model.bbox
        xs = 0.5 * (x_min + x_max) + 0.5 * (x_max - x_min) * nodes
        ys = 0.5 * (y_min + y_max) + 0.5 * (y_max - y_min) * nodes
        gx, gy = (a.ravel() for a in np.meshgrid(xs, ys))
        c = model.coefficients @ skydiff.spatial_functions(
            gx, gy, order=model.order, bbox=model.bbox, kind=model.kind)  # (n_i, n_pts)
        g = skydiff.spatial_functions(gx, gy, order=filter_order, bbox=model.bbox,
                                      kind=model.kind)  # (n_t, n_pts)
        targets = (c[:, None, :] * g[None, :, :]).reshape(n_i * n_t, -1)
        design = skydiff.spatial_functions(gx, gy, order=order, bbox=model.bbox,
                                           kind=model.kind)  # (n_terms, n_pts)
        solution, *_ = np.linalg.lstsq(design.T, targets.T, rcond=None)
        coefficients = solution.T  # (n_i * n_t, n_terms)
    return skydiff.PolynomialPsf(basis, coefficients, order=order, bbox=model.bbox,
                                 kind=model.kind)


@attrs.frozen
class CompactFilter:
    r"""The ``"diffim"`` decorrelation filter in image space, cut to its compact support.

    Attributes
    ----------
    image : ndarray of shape (2h + 1, 2h + 1)
        :math:`\phi`: the inverse transform of :math:`\hat\phi` cut by
        :data:`FILTER_TOLERANCE`, made exactly point-symmetric (:math:`\hat\phi` is real and
        even), with unit sum (:math:`\hat\phi(0) = 1`; the cut's deficit is restored on
        the central pixel).
    convolved : ndarray
        :math:`\kappa\otimes\phi` (full convolution), the overall filter of the convolved
        input.
    """

    image: NDArray[np.float64] = attrs.field(eq=False)
    convolved: NDArray[np.float64] = attrs.field(eq=False)

    @property
    def half(self) -> int:
        """Half-width :math:`h` of :attr:`image`."""
        return int(self.image.shape[0] // 2)

    @property
    def weight_u(self) -> float:
        r""":math:`w_u = \sum\phi^2` (Parseval: the variance gain of the unconvolved image)."""
        return float(np.square(self.image).sum())

    @property
    def weight_c(self) -> float:
        r""":math:`w_c = \sum(\kappa\otimes\phi)^2`."""
        return float(np.square(self.convolved).sum())


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

    def _grid_start(self) -> int:
        """Side of the first small grid for image-space filters (twice the largest input)."""
        k = max(self.kernel.shape)
        h = 0 if self.prefilter is None else max(self.prefilter.shape)
        return 2 * max(k, h)

    def compact_filter(self, *, tolerance: float = FILTER_TOLERANCE,
                       max_half: int = MAX_FILTER_HALF) -> CompactFilter | None:
        r"""The image filter :math:`\phi` in image space (``"diffim"`` only).

        :math:`\hat\phi` is evaluated on a small grid, transformed back and cut by
        ``tolerance`` (see :data:`FILTER_TOLERANCE`), symmetrised, and its sum restored to
        :math:`\hat\phi(0) = 1` on the central pixel (a correction no larger than the cut;
        rescaling instead would change the output by the cut times :math:`\|\phi\|_1`).

        Returns
        -------
        CompactFilter or None
            None for the score kinds, or when :math:`\phi` is broader than ``max_half``
            pixels (then :meth:`full_grid` is the exact alternative).
        """
        if self.kind != "diffim":
            return None
        image, compact = _compact_kernel(lambda shape: self.small_transfers(shape)["image"],
                                         start=self._grid_start(), tolerance=tolerance,
                                         max_half=max_half)
        if not compact:
            return None
        image = 0.5 * (image + image[::-1, ::-1])
        image[image.shape[0] // 2, image.shape[1] // 2] += 1.0 - image.sum()  # unit sum
        convolved = _full_convolve(self.kernel[None], image[None])[0, 0]
        return CompactFilter(image, convolved)

    def unconvolved_kernel(self, *, tolerance: float = FILTER_TOLERANCE,
                           max_half: int = MAX_FILTER_HALF
                           ) -> tuple[NDArray[np.float64], bool]:
        r"""The overall filter :math:`c_u` of the unconvolved image in image space.

        :math:`\phi` (``"diffim"``) or :math:`H\otimes c` (scores): the corrected image's
        response to a point source of the unconvolved image is :math:`c_u\otimes P_u`. Cut
        by ``tolerance``, its sum restored on the central pixel, and normalised to unit sum.

        Returns
        -------
        kernel : ndarray of shape (2h + 1, 2h + 1)
        compact : bool
            False if :math:`c_u` is broader than ``max_half`` (then cut there).
        """
        kernel, compact = _compact_kernel(lambda shape: self.small_transfers(shape)["u"],
                                          start=self._grid_start(), tolerance=tolerance,
                                          max_half=max_half)
        if self.kind == "diffim":
            kernel = 0.5 * (kernel + kernel[::-1, ::-1])
        total = float(self._unconvolved_sum())
        kernel[kernel.shape[0] // 2, kernel.shape[1] // 2] += total - kernel.sum()
        return kernel / total, compact

    def _unconvolved_sum(self) -> float:
        r""":math:`\hat c_u(0)`: 1 for ``"diffim"``, :math:`\sum H` for the scores."""
        return 1.0 if self.prefilter is None else float(self.prefilter.sum())

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


def _threads(shape: tuple[int, ...]) -> int:
    return cpu_count() if math.prod(shape) > _PARALLEL_SIZE else 1


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


def _forward(real: NDArray[np.float32], n_rows: int, threads: int
             ) -> NDArray[np.complex64]:
    """``rfft2`` of ``real`` (H, P_c) zero-extended to ``n_rows`` ≥ H rows, unnormalised.

    The rows are transformed (real to complex along axis 1) only where there is data; the
    padding rows of the spectrum are zero before the transform along axis 0.
    """
    height, n_cols = real.shape
    shape = (n_rows, n_cols // 2 + 1)
    binding = _fft.POCKETFFT
    if binding is None:
        spectrum = np.zeros(shape, dtype=np.complex64)
        spectrum[:height] = scipy.fft.rfft(real, axis=1, workers=threads)
        result: NDArray[np.complex64] = scipy.fft.fft(spectrum, axis=0, overwrite_x=True,
                                                      workers=threads)
        return result
    spectrum = np.empty(shape, dtype=np.complex64)
    binding.r2c(real, (1,), True, 0, spectrum[:height], threads)
    spectrum[height:] = 0.0
    binding.c2c(spectrum, (0,), True, 0, spectrum, threads)
    return spectrum


def _inverse(spectrum: NDArray[np.complex64], out: NDArray[np.float32], threads: int, *,
             normalise: bool) -> NDArray[np.float32]:
    """The first ``out.shape[0]`` rows of the inverse ``rfft2`` of ``spectrum`` into ``out``.

    ``spectrum`` (P_r, P_c // 2 + 1) is overwritten; ``out`` has shape (H, P_c) with
    H ≤ P_r. ``normalise``: divide by P_r P_c (else the caller folded it into the filter).
    """
    height, n_cols = out.shape
    binding = _fft.POCKETFFT
    inorm = 2 if normalise else 0
    if binding is None:
        norm = "backward" if normalise else "forward"
        rows = scipy.fft.ifft(spectrum, axis=0, overwrite_x=True, workers=threads, norm=norm)
        out[...] = scipy.fft.irfft(rows[:height], n=n_cols, axis=1, workers=threads, norm=norm)
        return out
    binding.c2c(spectrum, (0,), False, inorm, spectrum, threads)
    binding.c2r(spectrum[:height], (1,), n_cols, False, inorm, out, threads)
    return out


def _apply_even_filter(spectrum: NDArray[np.complex64], stamp: NDArray[np.float64],
                       n_cols: int, scale: float) -> None:
    r"""Multiply the rfft-grid ``spectrum`` in place by ``scale`` × the spectrum of ``stamp``.

    ``stamp`` (odd square, half-width :math:`h`) is point-symmetric, so its spectrum on the
    grid of :math:`P_r \times P_c` is real:

    .. math::

        \hat\phi(k_r, k_c) = \sum_{i=0}^{h} w_i \left[\cos(\alpha i)\,\Re A_i(k_c)
        + \sin(\alpha i)\,\Im A_i(k_c)\right], \qquad \alpha = 2\pi k_r / P_r,

    with :math:`A_i(k_c) = \sum_j \phi(i, j)\,e^{-2\pi i k_c j / P_c}` (rows :math:`i \ge 0`
    only, :math:`A_{-i} = \overline{A_i}`), :math:`w_0 = 1` and :math:`w_{i>0} = 2`: one real
    matrix product of inner dimension :math:`2(h+1)` per block of a few rows, evaluated
    (``float32``, or float64 for :math:`\|\phi\|_1 >` ``_FLOAT32_MAX_L1``) and applied
    while the block is in cache, the blocks shared out among threads. The :math:`A_i` are
    the ``rfft`` of the rows (:func:`_centered_row_spectra`).
    """
    n_rows, n_half = spectrum.shape
    half = stamp.shape[0] // 2
    a = _centered_row_spectra(stamp[half:], n_cols)  # rows i = 0..h
    weights = np.full((half + 1, 1), 2.0 * scale)
    weights[0] = scale
    dtype = np.float32 if np.abs(stamp).sum() <= _FLOAT32_MAX_L1 else np.float64
    right = np.ascontiguousarray(np.concatenate([weights * a.real, weights * a.imag]),
                                 dtype=dtype)
    lags = np.arange(half + 1)
    phase = (np.outer(np.arange(n_rows), lags) % n_rows) * (2.0 * np.pi / n_rows)
    left = np.ascontiguousarray(np.concatenate([np.cos(phase), np.sin(phase)], axis=1),
                                dtype=dtype)  # (P_r, 2h + 2): small
    del phase
    # Blocks small enough that BLAS computes each product on one thread: OpenBLAS splits a
    # product across threads only above ~5e5 multiply-adds, and on a shared machine its
    # thread wake-ups for many small products cost more than the products themselves. The
    # blocks are shared out among threads of our own instead.
    rows = max(1, min(_BLOCK_ROWS, _SERIAL_GEMM_SIZE // (right.shape[0] * n_half)))

    def run(first: int, last: int) -> None:
        values = np.empty((rows, n_half), dtype=dtype)
        single = values if dtype == np.float32 else np.empty((rows, n_half), dtype=np.float32)
        for start in range(first, last, rows):
            stop = min(start + rows, last)
            filt = values[:stop - start]
            np.matmul(left[start:stop], right, out=filt)
            if single is not values:
                np.copyto(single[:stop - start], filt, casting="same_kind")
            block = spectrum[start:stop]
            np.multiply(block, single[:stop - start], out=block)

    parallel_rows(run, n_rows, threads=_threads(spectrum.shape))


def _weighted_sum(a: NDArray[np.float32], w_a: float, b: NDArray[np.float32], w_b: float
                  ) -> NDArray[np.float32]:
    """``a * w_a + b * w_b`` in float32, by blocks of rows (no full-frame temporary)."""
    out = np.empty(a.shape, dtype=np.float32)
    rows = max(1, (_BLOCK_ROWS * 4096) // max(1, a.shape[1]))

    def run(first: int, last: int) -> None:
        scratch = np.empty((min(rows, last - first), a.shape[1]), dtype=np.float32)
        for start in range(first, last, rows):
            block = slice(start, min(start + rows, last))
            target = out[block]
            np.multiply(a[block], np.float32(w_a), out=target)
            tmp = scratch[:target.shape[0]]
            np.multiply(b[block], np.float32(w_b), out=tmp)
            np.add(target, tmp, out=target)

    parallel_rows(run, a.shape[0], threads=_threads(a.shape))
    return out


def _by_rows(ufunc: np.ufunc, source: NDArray[np.float32], value: np.float32,
             out: NDArray[np.float32], threads: int) -> None:
    """``out = ufunc(source, value)``, the rows shared out among ``threads`` threads."""

    def run(first: int, last: int) -> None:
        ufunc(source[first:last], value, out=out[first:last])

    parallel_rows(run, source.shape[0], threads=threads)


def _mean_and_bad(image: NDArray[np.float32], bad: NDArray[np.bool_] | None
                  ) -> tuple[float, NDArray[np.bool_] | None]:
    """Mean of the good pixels and the pixels to replace (``bad`` or non-finite; None if none).

    The sum runs in float32 along rows (pairwise) and float64 over rows; a non-finite sum
    reveals non-finite pixels (a float64 sum of finite float32 values cannot overflow).
    """
    if bad is not None and not bad.any():
        bad = None
    if bad is None:
        total = float(image.sum(axis=1).sum(dtype=np.float64))
        if math.isfinite(total):
            return total / image.size, None
        bad = ~np.isfinite(image)
    good = ~bad
    total = float(np.sum(image, where=good, dtype=np.float64))
    if not math.isfinite(total):
        bad = bad | ~np.isfinite(image)
        good = ~bad
        total = float(np.sum(image, where=good, dtype=np.float64))
    n_good = int(np.count_nonzero(good))
    return (total / n_good if n_good else 0.0), bad


def decorrelate_block(image: NDArray[np.float32], bad: NDArray[np.bool_] | None,
                      variance_u: NDArray[np.float32], variance_c: NDArray[np.float32],
                      correction: Correction, *, complete_variance: bool,
                      variance_scale: float = 1.0, compact: CompactFilter | None = None
                      ) -> tuple[NDArray[np.float32], NDArray[np.float32], float, float]:
    r"""Filter one image block and propagate its variance.

    1. The mean :math:`m` of the good pixels is subtracted and bad pixels (``bad``, and
       non-finite ones) are set to it; the block is zero-padded to a fast FFT size (so the
       image continues as its mean: no wrap-around, constants preserved). With a
       ``compact`` filter :math:`\phi` of half-width :math:`h` the padding is :math:`h`
       pixels (the support of :math:`\phi`: the circular convolution then wraps nothing);
       otherwise :attr:`Correction.support`.
    2. One forward transform (``float32``/``complex64``; rows along axis 1 where there is
       data, then axis 0), multiplication by the filter, one inverse transform (axis 0, then
       axis 1 for the rows kept only), all cores for large blocks; :math:`m` is added back
       and bad pixels get their original values. The compact filter's spectrum is the real
       cosine series of the point-symmetric :math:`\phi`, evaluated by blocks of rows
       together with the multiplication (:func:`_apply_even_filter`); without one the
       filter is :meth:`Correction.full_grid`.
    3. Variance: :math:`V = V_u w_u s + V_c w_c s` (Parseval weights; exact sums of squares
       of :math:`\phi` and :math:`\kappa\otimes\phi` for a compact filter) or, with
       ``complete_variance``, :math:`V = (V_u \otimes c_u^2 + V_c \otimes c_c^2)\,s` (two FFT
       convolutions; non-finite variances are replaced by the mean meanwhile and restored),
       with :math:`s` = ``variance_scale``.

    Parameters
    ----------
    image : ndarray of shape (H, W), float32
    bad : ndarray of bool of shape (H, W) or None
        Pixels to replace (non-finite pixels are always replaced).
    variance_u, variance_c : ndarray of shape (H, W), float32
    correction : Correction
    complete_variance : bool
    variance_scale : float, optional
    compact : CompactFilter, optional
        :meth:`Correction.compact_filter` (``"diffim"`` only).

    Returns
    -------
    image, variance : ndarray of shape (H, W), float32
    w_u, w_c : float
        The Parseval weights.
    """
    height, width = image.shape
    mean, bad = _mean_and_bad(image, bad)
    if compact is not None:
        half = compact.half
        shape = (scipy.fft.next_fast_len(height + half),
                 scipy.fft.next_fast_len(width + half, real=True))
    else:
        shape = _padded(image.shape, correction.support)
    threads = _threads(shape)
    real = np.empty((height, shape[1]), dtype=np.float32)
    real[:, width:] = 0.0  # the padding continues the image as its mean
    level = np.float32(mean)
    _by_rows(np.subtract, image, level, real[:, :width], threads)
    if bad is not None:
        block = real[:, :width]
        block[bad] = 0.0
        del block
    spectrum = _forward(real, shape[0], threads)
    if compact is not None:
        w_u, w_c = compact.weight_u, compact.weight_c
        _apply_even_filter(spectrum, compact.image, shape[1], 1.0 / (shape[0] * shape[1]))
        _inverse(spectrum, real, threads, normalise=False)
    else:
        filt, w_u, w_c = correction.full_grid(shape)
        spectrum *= filt
        del filt
        _inverse(spectrum, real, threads, normalise=True)
    del spectrum
    out = np.empty((height, width), dtype=np.float32)
    _by_rows(np.add, real[:, :width], level, out, threads)
    del real
    if bad is not None:
        out[bad] = image[bad]

    if complete_variance:
        if compact is not None:
            cu2, cc2 = np.square(compact.image), np.square(compact.convolved)
        else:
            cu2, cc2 = correction.variance_kernels(w_u, w_c)
        filled_u, bad_u = _filled(variance_u)
        filled_c, bad_c = _filled(variance_c)
        variance = _convolve_same(filled_u, cu2)
        variance += _convolve_same(filled_c, cc2)
        np.maximum(variance, 0.0, out=variance)
        variance[bad_u | bad_c] = np.nan
        if variance_scale != 1.0:
            variance *= np.float32(variance_scale)
    else:
        variance = _weighted_sum(variance_u, w_u * variance_scale,
                                 variance_c, w_c * variance_scale)
    return out, variance, w_u, w_c


def psf_from_stamp(stamp: NDArray[np.float64], position: tuple[float, float]
                   ) -> skydiff.ImagePsf | None:
    """An :class:`~skydiff.ImagePsf` of the stamp, or None when its sum is not positive."""
    if not (np.all(np.isfinite(stamp)) and stamp.sum() > 0.0):
        return None
    return skydiff.ImagePsf(stamp, position=position)
