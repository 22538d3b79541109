r"""FFT convolution of exposures with fixed and spatially varying kernels.

The engine works in ``float32`` with :mod:`scipy.fft` (all cores, ``complex64`` spectra).
Outputs have the shape of the input ("same" mode) with the kernel's central pixel
``[K_r // 2, K_c // 2]`` as origin:

.. math::

    (I \otimes K)[r, c] = \sum_{i, j} K[i, j]\; I[r - i + K_r//2,\; c - j + K_c//2],

with :math:`I = 0` outside the image (zero padding; the circular FFT convolution equals this
linear one because every axis is padded by at least :math:`K // 2`).

* :func:`convolve` — convolve an :class:`~skydiff.exposure.Exposure`: image, variance
  (:math:`V \otimes K^2`, exactly or by a documented fast approximation for spatially varying
  kernels), mask (bit planes dilated by the kernel footprint), EDGE flags, non-finite pixels,
  and an exactly evaluated spatially varying :class:`~skydiff.kernel.BasisKernel` (one
  convolution per spatial term).
* :class:`FourierImage` — keep the forward transform of an image and convolve it with many
  kernels (one inverse FFT each).
* :func:`fft_convolve` — the low-level same-shape FFT convolution of two arrays.
* :func:`direct_convolve` — the direct-sum reference implementation (``float64``), for tests.

Performance notes (see ``docs/`` and ``skydiff bench``): the image is transformed once and
shared by all spatial terms; kernel spectra come from a row FFT and a small matrix product
instead of a full-frame FFT; inverse transforms run in place; mask dilation by a rectangular
footprint is separable and costs :math:`O(N \log K)` for all bit planes together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import scipy.fft
import scipy.signal
from numpy.typing import ArrayLike

from skydiff._fft import FFTConvolver, TermWeights
from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel, chebyshev_terms, separable_spatial_functions
from skydiff.parallel import cpu_count, parallel_rows
from skydiff.psf import ImagePsf

__all__ = [
    "VARIANCE_MODES",
    "FourierImage",
    "VarianceMode",
    "convolve",
    "direct_convolve",
    "fft_convolve",
    "padded_shape",
]

#: How :func:`convolve` propagates the variance plane.
VarianceMode = Literal["fast", "exact", "none"]

#: The accepted values of ``convolve(..., variance=...)``.
VARIANCE_MODES: tuple[str, ...] = ("fast", "exact", "none")

#: Bytes per row block of the separable mask dilation (a block, its halo and the scratch
#: copies stay in the L2 cache).
_DILATE_BLOCK_BYTES = 1 << 20

#: Rows per block when a spatial polynomial is evaluated over the image by a matrix product.
_POLY_BLOCK_ROWS = 512


def padded_shape(image_shape: tuple[int, int], kernel_shape: tuple[int, int]
                 ) -> tuple[int, int]:
    """The FFT size for a full linear convolution: ``next_fast_len(n + k - 1, real=True)``.

    This is the size :class:`FourierImage` pads to. :func:`convolve` pads less (``n + k // 2``
    per axis, enough for a same-shape output).

    Parameters
    ----------
    image_shape, kernel_shape : tuple of int
        ``(rows, cols)`` of the image and of the (largest) kernel.

    Returns
    -------
    tuple of int
    """
    rows, cols = (scipy.fft.next_fast_len(int(n) + int(k) - 1, real=True)
                  for n, k in zip(image_shape, kernel_shape, strict=True))
    return rows, cols


def _check_image(image: ArrayLike, name: str = "image") -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 2 or array.size == 0:
        msg = f"{name} must be a non-empty 2-D array, got shape {array.shape}"
        raise InputError(msg)
    return array


def _check_kernel_image(kernel_image: ArrayLike) -> np.ndarray:
    array = np.asarray(kernel_image)
    if array.ndim != 2 or array.shape[0] % 2 == 0 or array.shape[1] % 2 == 0:
        msg = (f"kernel image must be 2-D with odd sizes along both axes, got shape "
               f"{array.shape}; pad it with a row/column of zeros")
        raise InputError(msg)
    if not np.all(np.isfinite(array)):
        msg = "kernel image contains NaN or inf; kernels must be finite"
        raise InputError(msg)
    return array


class FourierImage:
    r"""The zero-padded forward FFT of an image, reusable for convolutions with many kernels.

    The forward transform is computed once on construction; each :meth:`convolve` costs one
    cheap kernel transform (a row FFT and a small matrix product) and one inverse transform.

    Parameters
    ----------
    image : array_like of shape (H, W)
        The image, converted to ``float32``. It must be finite (replace NaN first).
    kernel_shape : tuple of int
        ``(K_r, K_c)``, the largest kernel shape to be used (odd sizes); it sets the padding.

    Attributes
    ----------
    shape : tuple of int
        ``(H, W)`` of the image.
    kernel_shape : tuple of int
        The largest kernel shape accepted.
    padded_shape : tuple of int
        The FFT size (:func:`padded_shape`).
    spectrum : ndarray of complex64, read-only
        ``rfft2`` of the zero-padded image. The image itself is not kept.

    Raises
    ------
    InputError
        If the image is not 2-D or not finite, or ``kernel_shape`` is not two odd positive
        sizes.

    Notes
    -----
    :meth:`convolve` may be called from several threads at once: it only reads the shared
    spectrum.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> k = np.zeros((5, 5)); k[2, 2] = 1.0
    >>> image = rng.normal(size=(32, 32))
    >>> fi = FourierImage(image, (5, 5))
    >>> np.allclose(fi.convolve(k), image, atol=1e-6)
    True
    """

    __slots__ = ("kernel_shape", "padded_shape", "shape", "spectrum")

    def __init__(self, image: ArrayLike, kernel_shape: tuple[int, int]) -> None:
        array = _check_image(image)
        if not np.all(np.isfinite(array)):
            msg = ("image contains NaN or inf; replace them (skydiff.convolve.convolve zeroes "
                   "them and flags NO_DATA) before an FFT convolution")
            raise InputError(msg)
        k_r, k_c = (int(v) for v in kernel_shape)
        if k_r < 1 or k_c < 1 or k_r % 2 == 0 or k_c % 2 == 0:
            msg = f"kernel_shape must be two odd positive sizes, got {kernel_shape}"
            raise InputError(msg)
        self.shape: tuple[int, int] = (int(array.shape[0]), int(array.shape[1]))
        self.kernel_shape: tuple[int, int] = (k_r, k_c)
        self.padded_shape: tuple[int, int] = padded_shape(array.shape, (k_r, k_c))
        spectrum = self._engine().forward(array)
        spectrum.setflags(write=False)
        self.spectrum: np.ndarray = spectrum

    def _engine(self) -> FFTConvolver:
        return FFTConvolver(self.shape, self.kernel_shape, padded=self.padded_shape)

    def convolve(self, kernel_image: ArrayLike) -> np.ndarray:
        """Convolve the image with one kernel ("same" shape, zero padding).

        Parameters
        ----------
        kernel_image : array_like of shape (k_r, k_c)
            Odd sizes, no larger than ``kernel_shape``.

        Returns
        -------
        ndarray of shape (H, W), float32
            A new array.

        Raises
        ------
        InputError
            If the kernel has even sizes, is larger than ``kernel_shape`` or not finite.
        """
        kernel = _check_kernel_image(kernel_image)
        if kernel.shape[0] > self.kernel_shape[0] or kernel.shape[1] > self.kernel_shape[1]:
            msg = (f"kernel of shape {kernel.shape} is larger than the kernel_shape "
                   f"{self.kernel_shape} this FourierImage was padded for")
            raise InputError(msg)
        return self._engine().convolve_terms(self.spectrum, kernel[np.newaxis],
                                             [(None, None)])


def fft_convolve(image: ArrayLike, kernel_image: ArrayLike) -> np.ndarray:
    """Same-shape, zero-padded FFT convolution of an image with a kernel, in ``float32``.

    Parameters
    ----------
    image : array_like of shape (H, W)
        Finite image.
    kernel_image : array_like of shape (K_r, K_c)
        Kernel with odd sizes, centred on ``[K_r // 2, K_c // 2]``.

    Returns
    -------
    ndarray of shape (H, W), float32

    Raises
    ------
    InputError
        On non-2-D or non-finite input or an even-sized kernel.

    See Also
    --------
    direct_convolve : the reference implementation it must agree with.
    """
    kernel = _check_kernel_image(kernel_image)
    return FourierImage(image, kernel.shape).convolve(kernel)


def direct_convolve(image: ArrayLike, kernel_image: ArrayLike) -> np.ndarray:
    """Reference same-shape convolution by direct summation, in ``float64``.

    Uses :func:`scipy.signal.convolve2d` with ``mode="same"`` and zero fill, the same
    convention as :func:`fft_convolve`. Cost :math:`O(H W K_r K_c)`: for tests.

    Parameters
    ----------
    image : array_like of shape (H, W)
    kernel_image : array_like of shape (K_r, K_c)
        Odd sizes.

    Returns
    -------
    ndarray of shape (H, W), float64

    Raises
    ------
    InputError
        If the image is not 2-D or the kernel is not odd-sized and finite.
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        msg = f"image must be a non-empty 2-D array, got shape {array.shape}"
        raise InputError(msg)
    kernel = _check_kernel_image(kernel_image).astype(np.float64)
    return scipy.signal.convolve2d(array, kernel, mode="same", boundary="fill", fillvalue=0.0)


# ------------------------------------------------------------------------------------------
# mask dilation


def _rectangle_offsets(footprint: np.ndarray) -> tuple[int, int, int, int] | None:
    r"""Row and column offset ranges if ``footprint`` is a full rectangle, else None.

    An output pixel ``[r, c]`` receives the input pixels ``[r + d_r, c + d_c]`` for
    :math:`d_r \in [r_{lo}, r_{hi}]` and :math:`d_c \in [c_{lo}, c_{hi}]` when the footprint
    is set exactly on rows :math:`[i_0, i_1]` × columns :math:`[j_0, j_1]` of the kernel
    (:math:`d_r = K_r//2 - i`). An empty footprint returns None (handled by the caller).
    """
    rows = np.flatnonzero(footprint.any(axis=1))
    cols = np.flatnonzero(footprint.any(axis=0))
    if rows.size == 0:
        return None
    i0, i1, j0, j1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if not footprint[i0:i1 + 1, j0:j1 + 1].all():
        return None
    h_r, h_c = footprint.shape[0] // 2, footprint.shape[1] // 2
    return h_r - i1, h_r - i0, h_c - j1, h_c - j0


def _dilate_block_rows(bits: np.ndarray) -> int:
    """Rows per block so that a block of ``bits`` holds about :data:`_DILATE_BLOCK_BYTES`."""
    row_bytes = max(1, bits.shape[1] * bits.itemsize)
    return max(16, _DILATE_BLOCK_BYTES // row_bytes)


def _window_or(source: np.ndarray, scratch: np.ndarray, length: int, axis: int
               ) -> tuple[np.ndarray, int]:
    """OR of ``q`` consecutive entries along ``axis`` (``q`` = largest power of 2 ≤ length).

    Doubling (a sparse table): ``T_2q[k] = T_q[k] | T_q[k + q]``, entries past the end taken as
    zero. Returns the array holding ``T_q`` (``source`` or ``scratch``, both overwritten) and
    ``q``; a window of any ``length`` is then ``T_q[k] | T_q[k + length - q]``.
    """
    a, b = source, scratch
    q = 1
    while 2 * q <= length:
        if axis == 1:
            np.bitwise_or(a[:, :-q], a[:, q:], out=b[:, :-q])
            b[:, -q:] = a[:, -q:]
        else:
            np.bitwise_or(a[:-q], a[q:], out=b[:-q])
            b[-q:] = a[-q:]
        a, b = b, a
        q *= 2
    return a, q


def _dilate_row_range(bits: np.ndarray, out: np.ndarray, start: int, stop: int,
                      offsets: tuple[int, int, int, int]) -> None:
    """Separable OR-dilation of output rows ``[start, stop)`` (see :func:`_dilate_rectangle`)."""
    r_lo, r_hi, c_lo, c_hi = offsets
    height, width = bits.shape
    len_r, len_c = r_hi - r_lo + 1, c_hi - c_lo + 1
    block = _dilate_block_rows(bits)
    rows_max = block + len_r - 1
    padded = np.zeros((rows_max, width + len_c - 1), dtype=bits.dtype)
    scratch = np.empty_like(padded)
    horizontal = np.empty((rows_max, width), dtype=bits.dtype)
    scratch_h = np.empty_like(horizontal)
    # Input column c sits at padded column c - c_lo; only columns some output uses are copied.
    col0, col1 = max(c_lo, 0), min(width, width + c_hi)
    for r0 in range(start, stop, block):
        r1 = min(r0 + block, stop)
        a0, a1 = r0 + r_lo, r1 + r_hi  # input rows [a0, a1) feed output rows [r0, r1)
        s0, s1 = max(a0, 0), min(a1, height)
        if s1 <= s0 or col1 <= col0:
            continue
        chunk = bits[s0:s1, col0:col1]
        if not chunk.any():
            continue
        n = a1 - a0
        block_in = padded[:n]
        block_in.fill(0)
        block_in[s0 - a0:s1 - a0, col0 - c_lo:col1 - c_lo] = chunk
        table, q = _window_or(block_in, scratch[:n], len_c, axis=1)
        np.bitwise_or(table[:, :width], table[:, len_c - q:len_c - q + width],
                      out=horizontal[:n])
        table, q = _window_or(horizontal[:n], scratch_h[:n], len_r, axis=0)
        m = r1 - r0
        np.bitwise_or(table[:m], table[len_r - q:len_r - q + m], out=out[r0:r1])


def _dilate_rectangle(bits: np.ndarray, offsets: tuple[int, int, int, int]) -> np.ndarray:
    r"""OR-dilate every bit plane of ``bits`` at once by a rectangular footprint.

    .. math::

        O[r, c] = \bigvee_{d_r = r_{lo}}^{r_{hi}} \bigvee_{d_c = c_{lo}}^{c_{hi}}
        B[r + d_r, c + d_c]

    with :math:`B = 0` outside the image: a sliding OR along rows, then along columns, each by
    doubling (:math:`\lceil\log_2 K\rceil` vectorised passes), on row blocks that stay in
    cache, split over the available cores (NumPy releases the GIL). Exact for all 32 planes.
    """
    height = bits.shape[0]
    out = np.zeros_like(bits)
    block = _dilate_block_rows(bits)
    n_jobs = max(1, min(cpu_count(), height // (4 * block)))
    parallel_rows(lambda start, stop: _dilate_row_range(bits, out, start, stop, offsets), height,
                  threads=n_jobs)
    return out


def _dilate_fft(bits: np.ndarray, present: int, footprint: np.ndarray) -> np.ndarray:
    """OR-dilation by an arbitrary footprint: one FFT convolution per present bit plane."""
    engine = FFTConvolver(bits.shape, footprint.shape)
    footprint_spectrum = engine.kernel_spectrum(footprint.astype(np.float32))
    out = np.zeros_like(bits)
    kind = bits.dtype.type
    for bit in range(8 * bits.itemsize):
        if not present >> bit & 1:
            continue
        plane = (bits >> kind(bit)) & kind(1)
        spectrum = engine.forward(plane, reuse=True)
        spectrum *= footprint_spectrum
        grown = engine.crop(engine.inverse(spectrum), footprint.shape) > 0.5
        out |= grown.astype(bits.dtype) << kind(bit)
    engine.release()
    return out


def _dilate(bits: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """OR-dilate the bit planes in ``bits`` by ``footprint`` (separable when rectangular)."""
    present = int(np.bitwise_or.reduce(bits, axis=None))
    if not present or not footprint.any():
        return np.zeros_like(bits)
    offsets = _rectangle_offsets(footprint)
    if offsets is None:
        return _dilate_fft(bits, present, footprint)
    if offsets == (0, 0, 0, 0):
        return bits.copy()
    return _dilate_rectangle(bits, offsets)


def _dilate_planes(mask: np.ndarray, planes: int, footprint: np.ndarray) -> np.ndarray:
    """The bit planes ``planes`` of ``mask`` OR-dilated by ``footprint``.

    The sliding ORs run on, and the result comes back in, the narrowest unsigned type
    holding every plane to dilate (bits 0-7, the usual CR, SAT, EDGE, INTRP, DETECTED..., in
    ``uint8``: a quarter of the memory traffic of ``uint32``); OR it into the ``uint32`` mask.
    """
    narrow = next(np.dtype(kind) for kind in (np.uint8, np.uint16, np.uint32)
                  if planes.bit_length() <= 8 * np.dtype(kind).itemsize)
    bits = mask.astype(narrow)  # keeps the low bits, which hold every plane to dilate
    np.bitwise_and(bits, np.asarray(planes, dtype=narrow), out=bits)
    return _dilate(bits, footprint)


# ------------------------------------------------------------------------------------------
# spatial terms


def _as_kernel(kernel: FixedKernel | BasisKernel | ArrayLike) -> FixedKernel | BasisKernel:
    if isinstance(kernel, FixedKernel | BasisKernel):
        return kernel
    if isinstance(kernel, np.ndarray | list | tuple):
        return FixedKernel(kernel)
    msg = (f"kernel must be a FixedKernel, BasisKernel or 2-D array, got "
           f"{type(kernel).__name__}")
    raise InputError(msg)


def _variance_mode(variance: str, propagate_variance: bool | None) -> VarianceMode:
    if variance not in VARIANCE_MODES:
        msg = f"variance must be one of {', '.join(map(repr, VARIANCE_MODES))}, got {variance!r}"
        raise InputError(msg)
    if propagate_variance is not None and not propagate_variance:
        return "none"
    mode: VarianceMode = variance  # type: ignore[assignment]
    return mode


class _Spatial:
    """The separable spatial functions of a BasisKernel on an exposure's pixel grid."""

    def __init__(self, kernel: BasisKernel, shape: tuple[int, int], origin: tuple[int, int],
                 order: int) -> None:
        height, width = shape
        x0, y0 = origin
        self.terms, self.fx, self.fy = separable_spatial_functions(
            np.arange(width) + x0, np.arange(height) + y0, order=order, bbox=kernel.bbox,
            kind=kernel.kind)

    def weights(self) -> list[TermWeights]:
        """Per term ``(fy[j] as (H, 1), fx[i] as (1, W))`` in float32; degree 0 is None.

        Terms of the same column degree share one column-factor object (the FFT engine groups
        them by it).
        """
        fy = [None if j == 0 else f.astype(np.float32)[:, np.newaxis]
              for j, f in enumerate(self.fy)]
        fx = [None if i == 0 else f.astype(np.float32)[np.newaxis, :]
              for i, f in enumerate(self.fx)]
        return [(fy[j], fx[i]) for i, j in self.terms]

    def blocks(self, coefficients: np.ndarray, *, dtype: type[np.floating] = np.float64,
               block_rows: int = _POLY_BLOCK_ROWS) -> Iterator[tuple[slice, np.ndarray]]:
        r"""Evaluate :math:`\sum_t c_t f_t` over the grid, block of rows by block.

        Terms are grouped by their row function, :math:`\sum_j f^y_j(y)\,X_j(x)` with
        :math:`X_j = \sum_{i} c_{ij} f^x_i`, so a block costs ``order + 1`` broadcast
        multiply-adds; no full-frame plane is ever held.
        """
        degrees = sorted({j for _, j in self.terms})
        columns = np.zeros((len(degrees), self.fx[0].size))
        for c, (i, j) in zip(coefficients, self.terms, strict=True):
            columns[degrees.index(j)] += c * self.fx[i]
        columns_t = columns.astype(dtype)
        rows_t = [self.fy[j].astype(dtype)[:, np.newaxis] for j in degrees]
        height = rows_t[0].shape[0]
        for r0 in range(0, height, block_rows):
            block = slice(r0, min(r0 + block_rows, height))
            value = rows_t[0][block] * columns_t[0]
            for row, column in zip(rows_t[1:], columns_t[1:], strict=True):
                value += row[block] * column
            yield block, value


def _squared_kernel_expansion(kernel: BasisKernel) -> tuple[np.ndarray, list[tuple[int, int]]]:
    r"""Expand :math:`K(x, y)^2` in the spatial functions of degree ≤ 2n.

    With :math:`K = \sum_t f_t A_t`, :math:`K^2 = \sum_{s,t} f_s f_t\, A_s A_t`. Products of
    spatial functions are re-expanded exactly in the degree-:math:`2n` functions
    :math:`g_q`: :math:`u^a u^b = u^{a+b}` for monomials and
    :math:`T_a T_b = \tfrac12 (T_{a+b} + T_{|a-b|})` for Chebyshev polynomials, so that

    .. math::

        K(x, y)^2 = \sum_q g_q(x, y)\, E_q, \qquad
        E_q = \sum_{s, t} M_{st}^{q}\, A_s A_t .

    There are :math:`(2n+1)(2n+2)/2` functions :math:`g_q` against :math:`n_t(n_t+1)/2` pairs
    (15 instead of 21 convolutions at order 2).

    Returns
    -------
    images : ndarray of shape (n_q, K_r, K_c), float64
    terms : list of tuple of int
        ``chebyshev_terms(2 n)``.
    """
    spatial = kernel.spatial_images()
    terms = chebyshev_terms(kernel.order)
    square_terms = chebyshev_terms(2 * kernel.order)
    index = {term: q for q, term in enumerate(square_terms)}
    images = np.zeros((len(square_terms), *kernel.shape))
    for s, (i_s, j_s) in enumerate(terms):
        for t in range(s, len(terms)):
            i_t, j_t = terms[t]
            product = spatial[s] * spatial[t]
            if not product.any():
                continue
            weight = 1.0 if s == t else 2.0
            if kernel.kind == "chebyshev":
                for a in (i_s + i_t, abs(i_s - i_t)):
                    for b in (j_s + j_t, abs(j_s - j_t)):
                        images[index[(a, b)]] += 0.25 * weight * product
            else:
                images[index[(i_s + i_t, j_s + j_t)]] += weight * product
    return images, square_terms


def _convolved_psf(exposure: Exposure, kernel: FixedKernel | BasisKernel
                   ) -> ImagePsf | None:
    """The PSF of the convolved exposure at its centre: ``psf ⊗ K`` (None if undefined)."""
    if exposure.psf is None:
        return None
    x0, y0 = exposure.origin
    height, width = exposure.shape
    cx, cy = x0 + (width - 1) / 2.0, y0 + (height - 1) / 2.0
    psf_image = np.asarray(exposure.psf.kernel_image(cx, cy), dtype=np.float64)
    kernel_image = np.asarray(kernel.image_at(cx, cy), dtype=np.float64)
    product = scipy.signal.fftconvolve(psf_image, kernel_image, mode="full")
    if not product.sum() > 0.0:
        return None
    size = max(product.shape)
    pad_r = (size - product.shape[0]) // 2
    pad_c = (size - product.shape[1]) // 2
    product = np.pad(product, ((pad_r, pad_r), (pad_c, pad_c)))
    return ImagePsf(product, position=(cx, cy))


def _propagate_variance(engine: FFTConvolver, variance: np.ndarray, bad: np.ndarray | None,
                        kernel: FixedKernel | BasisKernel, spatial: np.ndarray,
                        grid: _Spatial | None, mode: VarianceMode,
                        exposure: Exposure) -> np.ndarray:
    """The output variance plane for ``mode`` "fast" or "exact" (see :func:`convolve`)."""
    spectrum = engine.forward(variance, zero=bad, reuse=True)
    if grid is None or not isinstance(kernel, BasisKernel):
        squared = (spatial[0] * spatial[0])[np.newaxis]
        out = engine.convolve_terms(spectrum, squared, [(None, None)])
    else:
        images, _ = _squared_kernel_expansion(kernel)
        x0, y0 = exposure.origin
        height, width = exposure.shape
        centre = kernel.image_at(x0 + (width - 1) / 2.0, y0 + (height - 1) / 2.0)
        centre_norm = float((centre * centre).sum())
        square_grid = _Spatial(kernel, exposure.shape, exposure.origin, 2 * kernel.order)
        if mode == "exact" or not centre_norm > 0.0:
            out = engine.convolve_terms(spectrum, images, square_grid.weights())
        else:
            out = engine.convolve_terms(spectrum, (centre * centre)[np.newaxis], [(None, None)])
            # ratio(x, y) = ||K(x, y)||^2 / ||K_centre||^2 = sum_q g_q sum(E_q) / ||K_c||^2
            coefficients = images.sum(axis=(1, 2)) / centre_norm
            for rows, ratio in square_grid.blocks(coefficients, dtype=np.float32,
                                                  block_rows=64):
                np.multiply(out[rows], ratio, out=out[rows])
    np.maximum(out, 0.0, out=out)
    return out


def convolve(exposure: Exposure, kernel: FixedKernel | BasisKernel | ArrayLike, *,
             mask_dilate: bool = True, preserve_planes: Sequence[str] = ("NO_DATA", "BAD"),
             variance: VarianceMode = "fast", normalize: bool = False,
             edge_plane: str = "EDGE", propagate_variance: bool | None = None) -> Exposure:
    r"""Convolve an exposure with a fixed or spatially varying kernel.

    **Image.** For a fixed kernel :math:`K` the output is :math:`I \otimes K` (module
    docstring convention, zero padding). For a :class:`~skydiff.kernel.BasisKernel` the
    kernel used at an output pixel is *the kernel evaluated at that output pixel*,

    .. math::

        O[r, c] = \sum_{i,j} K(x, y)[i, j]\; I[r - i + K_r//2,\; c - j + K_c//2],
        \qquad x = c + x_0,\; y = r + y_0,

    with :math:`(x_0, y_0)` the exposure's ``origin`` (the kernel's ``bbox`` is in the same
    parent-pixel frame). Since :math:`K(x, y) = \sum_t f_t(x, y) A_t`
    (:meth:`~skydiff.kernel.BasisKernel.spatial_images`), this is computed *exactly* as

    .. math::

        O = \sum_t f_t \cdot (I \otimes A_t),

    one forward FFT of the image and one inverse FFT per spatial term — not by interpolating
    kernels over a grid (the ``afw`` approach). The spatial functions are separable,
    :math:`f_t(x, y) = T_i(u)\,T_j(v)`, and are applied as a row and a column factor, never as
    full planes. This is the definition of spatially varying convolution skydiff adopts; it
    coincides with "each input pixel spread by the kernel at its own position" wherever the
    kernel is constant over a footprint's neighbourhood, the same assumption the spatial
    kernel fit makes (Alard 2000; ``lsst.ip.diffim``).

    **Variance.** Pixels are assumed independent, so the exact output variance is

    .. math::

        V_O[r, c] = \sum_{i,j} K(x, y)[i, j]^2\; V[r - i + K_r//2,\; c - j + K_c//2]
        = \Big(V \otimes K(x, y)^2\Big)[r, c].

    ``variance="exact"`` evaluates it for a basis kernel from
    :math:`K^2 = \sum_{s \le t} (2 - \delta_{st}) f_s f_t\, A_s A_t`, the products
    :math:`f_s f_t` re-expanded exactly in the spatial functions :math:`g_q` of degree
    :math:`\le 2n`: :math:`V_O = \sum_q g_q \cdot (V \otimes E_q)`, i.e.
    :math:`(2n+1)(2n+2)/2` convolutions reusing one forward FFT of :math:`V` (6 at order 1,
    15 at order 2).

    ``variance="fast"`` (default) is identical for a spatially constant kernel. For a varying
    one it convolves once with the square of the kernel :math:`\bar K` at the centre of the
    exposure and rescales by the local squared norm:

    .. math::

        \tilde V_O(x) = \big(V \otimes \bar K^2\big)(x)\,
        \frac{\lVert K(x) \rVert_2^2}{\lVert \bar K \rVert_2^2},
        \qquad \lVert K(x) \rVert_2^2 = \sum_{i,j} K(x)[i,j]^2 = \sum_q g_q(x) \sum E_q .

    Its error is :math:`\varepsilon(x) = \big(V \otimes D_x\big)(x)` with
    :math:`D_x = K(x)^2 - r(x)\,\bar K^2`, :math:`r = \lVert K(x)\rVert^2/\lVert\bar K\rVert^2`.
    Because :math:`\sum D_x = 0`, only the variation of :math:`V` across the footprint
    :math:`N(x)` matters:

    .. math::

        \frac{|\varepsilon(x)|}{V_O(x)} \le \eta(x)\,
        \frac{\max_{N(x)} V - \min_{N(x)} V}{\min_{N(x)} V}, \qquad
        \eta(x) = \frac{\lVert D_x \rVert_1}{2 \lVert K(x) \rVert_2^2} \in [0, 1].

    It vanishes where :math:`V` is constant over the footprint or where the kernel shape does
    not change (:math:`K(x) \propto \bar K`); for :math:`V` locally linear it reduces to the
    gradient of :math:`V` times the shift of the centroid of :math:`K^2` relative to
    :math:`\bar K^2`. On a simulated frame (sky-dominated variance, science FWHM varying
    ±10 % across the field) it stays far below 1 % away from stars (tested) and reaches a few
    per cent only in the cores of bright stars, where the variance itself changes on the PSF
    scale. Use ``variance="exact"`` where that matters. Cost: two FFTs instead of
    :math:`1 + (2n+1)(2n+2)/2`.

    ``variance="none"`` keeps the input variance unchanged. Round-off negatives are clipped to
    zero. The covariance the convolution introduces between neighbouring pixels is not
    represented (decorrelation handles it).

    **Mask.** Every bit plane present, except those in ``preserve_planes``, is OR-dilated by
    the kernel footprint (the pixels where any :math:`A_t` is non-zero): an output pixel gets
    the bit if any input pixel that contributes to it has it. A footprint that fills a
    rectangle (every Alard–Lupton kernel) is dilated separably, rows then columns, all planes
    at once; other footprints by one FFT convolution per present plane. Planes in
    ``preserve_planes`` are copied undilated. Pixels within half a kernel of the border (rows
    :math:`< K_r//2` or :math:`\ge H - K_r//2`, likewise columns) get ``edge_plane``; they are
    still computed, with zero padding.

    **Non-finite pixels.** Input pixels whose image or variance is NaN or infinite are
    replaced by zero (image and variance) before the FFT, so they do not spread NaN over the
    kernel footprint; they get the ``NO_DATA`` bit unless already ``BAD`` or ``NO_DATA``,
    before the dilation (``NO_DATA`` is preserved, i.e. not dilated, by default). Their
    neighbours within the footprint are computed as if the pixel were zero.

    **Normalisation.** With ``normalize=True`` the image is divided by the kernel sum at each
    output pixel, :math:`\sum_t f_t(x, y) \sum A_t`, and the variance by its square.

    **Metadata.** The PSF becomes the :class:`~skydiff.psf.ImagePsf` :math:`P \otimes K`
    evaluated at the exposure's centre (``None`` if the exposure had no PSF or the product
    has a non-positive sum); WCS, calibration, origin and header are unchanged.

    Parameters
    ----------
    exposure : Exposure
        The input; never modified.
    kernel : FixedKernel, BasisKernel or array_like of shape (K_r, K_c)
        The kernel; an array becomes a :class:`~skydiff.kernel.FixedKernel` (odd sizes).
    mask_dilate : bool, optional
        Dilate the mask planes by the footprint (default). If False the mask is copied,
        plus the EDGE and NO_DATA flags.
    preserve_planes : sequence of str, optional
        Planes copied without dilation (names absent from the exposure's planes are ignored).
    variance : {"fast", "exact", "none"}, optional
        Variance propagation (see above); default "fast", exact for spatially constant
        kernels.
    normalize : bool, optional
        Divide by the local kernel sum.
    edge_plane : str, optional
        Plane flagging the border pixels, added to the planes if missing.
    propagate_variance : bool, optional
        Deprecated spelling: False means ``variance="none"``; True or None defer to
        ``variance``.

    Returns
    -------
    Exposure
        A new exposure of the same shape.

    Raises
    ------
    InputError
        If ``kernel`` is not a kernel or odd-sized array, ``variance`` is not one of the
        modes, or ``normalize=True`` and the kernel sum is zero at some pixel.

    Notes
    -----
    Cost on an :math:`H \times W` frame, in units of one full-frame ``rfft2``: about
    :math:`1 + n_t` for the image (:math:`n_t` spatial terms), 2 for the fast variance,
    :math:`1 + (2n+1)(2n+2)/2` for the exact one, and about one for the mask; kernel spectra
    add roughly 0.1 each. Peak memory is about four full-frame ``complex64`` buffers plus the
    output planes. ``skydiff bench`` measures it.

    References
    ----------
    .. [1] Alard, C. 2000, A&AS 144, 363 (spatially varying kernels).
    .. [2] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.

    Examples
    --------
    >>> from skydiff.exposure import Exposure
    >>> image = np.zeros((21, 21), np.float32); image[10, 10] = 1.0
    >>> exp = Exposure(image, variance=np.ones((21, 21), np.float32))
    >>> out = convolve(exp, np.full((3, 3), 1 / 9))
    >>> round(float(out.image.sum()), 6), round(float(out.variance[10, 10]), 6)
    (1.0, 0.111111)
    """
    if not isinstance(exposure, Exposure):
        msg = f"convolve needs an Exposure, got {type(exposure).__name__}"
        raise InputError(msg)
    kernel = _as_kernel(kernel)
    mode = _variance_mode(variance, propagate_variance)
    height, width = exposure.shape
    k_r, k_c = kernel.shape
    planes = exposure.mask_planes.with_plane(edge_plane).with_plane("NO_DATA")

    # Non-finite pixels: zeroed on the way into the FFT, flagged NO_DATA (unless BAD/NO_DATA).
    # A float64 sum is finite exactly when every pixel is (no overflow from float32 values),
    # so the per-pixel test only runs on frames that have some.
    mask = exposure.mask  # read-only; copied before any change
    bad: np.ndarray | None = None
    if not (np.isfinite(exposure.image.sum(dtype=np.float64))
            and np.isfinite(exposure.variance.sum(dtype=np.float64))):
        bad = ~np.isfinite(exposure.image)
        bad |= ~np.isfinite(exposure.variance)
        mask = mask.copy()
        already = (mask & np.uint32(planes.value(*[p for p in ("BAD", "NO_DATA")
                                                     if p in planes.planes]))) != 0
        mask[bad & ~already] |= np.uint32(planes.value("NO_DATA"))

    varying = isinstance(kernel, BasisKernel) and kernel.is_spatially_varying
    if isinstance(kernel, BasisKernel):
        spatial = kernel.spatial_images()
        if not varying:
            spatial = spatial[:1]
    else:
        spatial = kernel.image[np.newaxis]
    grid: _Spatial | None = None
    if varying:
        assert isinstance(kernel, BasisKernel)
        grid = _Spatial(kernel, (height, width), exposure.origin, kernel.order)
        weights = grid.weights()
    else:
        weights = [(None, None)]

    engine = FFTConvolver((height, width), (k_r, k_c))
    spectrum = engine.forward(exposure.image, zero=bad, reuse=True)
    out_image = engine.convolve_terms(spectrum, spatial.astype(np.float32), weights)
    del spectrum

    if mode == "none":
        out_var = exposure.variance
    else:
        out_var = _propagate_variance(engine, exposure.variance, bad, kernel, spatial, grid,
                                      mode, exposure)
    engine.release()

    if normalize:
        sums = spatial.sum(axis=(1, 2))

        def sum_blocks() -> Iterator[tuple[slice, np.ndarray]]:
            if grid is None:
                return iter([(slice(None), np.full((1, 1), sums[0]))])
            return grid.blocks(sums)

        if any(np.any(kernel_sum == 0.0) for _, kernel_sum in sum_blocks()):
            msg = "the kernel sum is zero at some pixels; cannot normalize=True by it"
            raise InputError(msg)
        if mode == "none":
            out_var = np.array(out_var, copy=True)
        for rows, kernel_sum in sum_blocks():
            np.divide(out_image[rows], kernel_sum, out=out_image[rows], casting="same_kind")
            np.divide(out_var[rows], kernel_sum * kernel_sum, out=out_var[rows],
                      casting="same_kind")

    # Mask: dilate every present plane except the preserved ones; flag the border.
    if mask_dilate:
        preserve = np.uint32(planes.value(*[p for p in preserve_planes if p in planes.planes]))
        present = int(np.bitwise_or.reduce(mask, axis=None))
        to_dilate = present & ~int(preserve)
        if to_dilate:
            footprint = np.any(spatial != 0.0, axis=0)
            dilated = _dilate_planes(mask, to_dilate, footprint)
            out_mask = mask & preserve
            out_mask |= dilated
            del dilated
        else:
            out_mask = mask.copy() if mask is exposure.mask else mask
    else:
        out_mask = mask.copy() if mask is exposure.mask else mask
    edge = np.uint32(planes.value(edge_plane))
    h_r, h_c = k_r // 2, k_c // 2
    if h_r:
        out_mask[:h_r, :] |= edge
        out_mask[max(height - h_r, 0):, :] |= edge
    if h_c:
        out_mask[:, :h_c] |= edge
        out_mask[:, max(width - h_c, 0):] |= edge

    # Freshly allocated, owned planes are frozen so the Exposure adopts them without a copy.
    for plane in (out_image, out_mask, out_var):
        if plane.flags.owndata and plane.flags.writeable:
            plane.setflags(write=False)
    return exposure.evolve(image=out_image, mask=out_mask, variance=out_var, mask_planes=planes,
                           psf=_convolved_psf(exposure, kernel))
