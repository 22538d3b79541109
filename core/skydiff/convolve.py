r"""FFT convolution of exposures with fixed and spatially varying kernels.

The engine works in ``float32`` with :mod:`scipy.fft` (``rfft2``/``irfft2``, all cores), zero
padding each axis to :func:`scipy.fft.next_fast_len` of ``n + k - 1`` so that the circular
convolution equals the linear one. Outputs have the shape of the input ("same" mode) with the
kernel's central pixel ``[K_r // 2, K_c // 2]`` as origin:

.. math::

    (I \otimes K)[r, c] = \sum_{i, j} K[i, j]\; I[r - i + K_r//2,\; c - j + K_c//2],

with :math:`I = 0` outside the image.

* :func:`convolve` — convolve an :class:`~skydiff.exposure.Exposure`: image, variance
  (:math:`V \otimes K^2`), mask (bit planes dilated by the kernel footprint), EDGE flags,
  non-finite pixels, and an exactly evaluated spatially varying
  :class:`~skydiff.kernel.BasisKernel` (one convolution per spatial term).
* :class:`FourierImage` — keep the forward transform of an image and convolve it with many
  kernels (one inverse FFT each).
* :func:`fft_convolve` — the low-level same-shape FFT convolution of two arrays.
* :func:`direct_convolve` — the direct-sum reference implementation (``float64``), for tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.signal
from numpy.typing import ArrayLike

from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel, separable_spatial_functions
from skydiff.psf import ImagePsf

__all__ = [
    "FourierImage",
    "convolve",
    "direct_convolve",
    "fft_convolve",
    "padded_shape",
]

_WORKERS = -1


def padded_shape(image_shape: tuple[int, int], kernel_shape: tuple[int, int]
                 ) -> tuple[int, int]:
    """The FFT size for a linear convolution: ``next_fast_len(n + k - 1, real=True)`` per axis.

    Parameters
    ----------
    image_shape, kernel_shape : tuple of int
        ``(rows, cols)`` of the image and of the (largest) kernel.

    Returns
    -------
    tuple of int
    """
    return tuple(scipy.fft.next_fast_len(int(n) + int(k) - 1, real=True)
                 for n, k in zip(image_shape, kernel_shape, strict=True))


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
    kernel transform and one inverse transform. This is how the spatially varying convolution
    and the variance propagation of :func:`convolve` evaluate many terms.

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
        spectrum = scipy.fft.rfft2(array, s=self.padded_shape, workers=_WORKERS)
        spectrum.setflags(write=False)
        self.spectrum: np.ndarray = spectrum

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
        kernel_spectrum = scipy.fft.rfft2(kernel.astype(np.float32, copy=False),
                                          s=self.padded_shape, workers=_WORKERS)
        kernel_spectrum *= self.spectrum
        full = scipy.fft.irfft2(kernel_spectrum, s=self.padded_shape, workers=_WORKERS)
        r0, c0 = kernel.shape[0] // 2, kernel.shape[1] // 2
        height, width = self.shape
        return np.array(full[r0:r0 + height, c0:c0 + width], dtype=np.float32, copy=True)


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


class _Dilator:
    """Binary dilation of bit planes by a kernel footprint, via one FFT per plane."""

    def __init__(self, shape: tuple[int, int], footprint: np.ndarray) -> None:
        self.footprint = footprint.astype(np.float32)
        self.shape = shape
        self.padded = padded_shape(shape, footprint.shape)
        self.spectrum = scipy.fft.rfft2(self.footprint, s=self.padded, workers=_WORKERS)
        self.is_identity = bool(footprint.sum() == 1 and footprint[footprint.shape[0] // 2,
                                                                   footprint.shape[1] // 2])

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        """The pixels whose footprint neighbourhood holds a set pixel of ``plane``."""
        if self.is_identity or not plane.any():
            return plane.copy()
        spectrum = scipy.fft.rfft2(plane.astype(np.float32), s=self.padded, workers=_WORKERS)
        spectrum *= self.spectrum
        full = scipy.fft.irfft2(spectrum, s=self.padded, workers=_WORKERS)
        r0, c0 = self.footprint.shape[0] // 2, self.footprint.shape[1] // 2
        return full[r0:r0 + self.shape[0], c0:c0 + self.shape[1]] > 0.5


def _as_kernel(kernel: FixedKernel | BasisKernel | ArrayLike) -> FixedKernel | BasisKernel:
    if isinstance(kernel, FixedKernel | BasisKernel):
        return kernel
    if isinstance(kernel, np.ndarray | list | tuple):
        return FixedKernel(kernel)
    msg = (f"kernel must be a FixedKernel, BasisKernel or 2-D array, got "
           f"{type(kernel).__name__}")
    raise InputError(msg)


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


def convolve(exposure: Exposure, kernel: FixedKernel | BasisKernel | ArrayLike, *,
             mask_dilate: bool = True, preserve_planes: Sequence[str] = ("NO_DATA", "BAD"),
             propagate_variance: bool = True, normalize: bool = False,
             edge_plane: str = "EDGE") -> Exposure:
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
    kernels over a grid (the ``afw`` approach). This is the definition of spatially varying
    convolution skydiff adopts; it coincides with "each input pixel spread by the kernel at
    its own position" wherever the kernel is constant over a footprint's neighbourhood, the
    same assumption the spatial kernel fit makes (Alard 2000; ``lsst.ip.diffim``).

    **Variance.** Pixels are assumed independent, so

    .. math::

        V_O[r, c] = \sum_{i,j} K(x, y)[i, j]^2\; V[r - i + K_r//2,\; c - j + K_c//2]
        = \Big(V \otimes K^2\Big)[r, c]

    for a fixed kernel and, for a basis kernel, from
    :math:`K(x,y)^2 = \sum_{s,t} f_s f_t\, A_s A_t`,

    .. math::

        V_O = \sum_{s \le t} (2 - \delta_{st})\; f_s f_t \cdot \big(V \otimes (A_s A_t)\big),

    :math:`n_t(n_t + 1)/2` convolutions reusing one forward FFT of :math:`V`. Round-off
    negatives are clipped to zero. The covariance the convolution introduces between
    neighbouring pixels is not represented (decorrelation handles it).

    **Mask.** Every bit plane present, except those in ``preserve_planes``, is OR-dilated by
    the kernel footprint (the pixels where any :math:`A_t` is non-zero): an output pixel gets
    the bit if any input pixel that contributes to it has it. Planes in ``preserve_planes``
    are copied undilated. Pixels within half a kernel of the border (rows
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
    propagate_variance : bool, optional
        Compute the output variance (default); if False the input variance is copied.
    normalize : bool, optional
        Divide by the local kernel sum.
    edge_plane : str, optional
        Plane flagging the border pixels, added to the planes if missing.

    Returns
    -------
    Exposure
        A new exposure of the same shape.

    Raises
    ------
    InputError
        If ``kernel`` is not a kernel or odd-sized array, or ``normalize=True`` and the kernel
        sum is zero at some pixel.

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
    height, width = exposure.shape
    k_r, k_c = kernel.shape
    x0, y0 = exposure.origin
    planes = exposure.mask_planes.with_plane(edge_plane).with_plane("NO_DATA")

    # Non-finite pixels: zero them, flag NO_DATA (unless BAD or NO_DATA already).
    bad = ~np.isfinite(exposure.image) | ~np.isfinite(exposure.variance)
    image = np.where(bad, np.float32(0.0), exposure.image)
    variance = np.where(bad, np.float32(0.0), exposure.variance)
    mask = exposure.mask.copy()
    if bad.any():
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
    spatial32 = spatial.astype(np.float32)

    if varying:
        assert isinstance(kernel, BasisKernel)
        terms, fx, fy = separable_spatial_functions(
            np.arange(width) + x0, np.arange(height) + y0,
            order=kernel.order, bbox=kernel.bbox, kind=kernel.kind)
        fx32 = [f.astype(np.float32) for f in fx]
        fy32 = [f.astype(np.float32) for f in fy]
        weights = [(fy32[j][:, None], fx32[i][None, :]) for i, j in terms]
    else:
        weights = [(np.ones((height, 1), np.float32), np.ones((1, width), np.float32))]

    fourier = FourierImage(image, (k_r, k_c))
    out_image = np.zeros((height, width), dtype=np.float32)
    for t, (wy, wx) in enumerate(weights):
        term = fourier.convolve(spatial32[t])
        term *= wy
        term *= wx
        out_image += term
    del fourier

    if propagate_variance:
        fourier_var = FourierImage(variance, (k_r, k_c))
        out_var = np.zeros((height, width), dtype=np.float32)
        n_terms = len(weights)
        for s in range(n_terms):
            for t in range(s, n_terms):
                product = spatial[s] * spatial[t]
                if not product.any():
                    continue
                term = fourier_var.convolve(product)
                term *= (2.0 if s < t else 1.0) * weights[s][0] * weights[t][0]
                term *= weights[s][1] * weights[t][1]
                out_var += term
        del fourier_var
        np.maximum(out_var, 0.0, out=out_var)
    else:
        out_var = np.array(exposure.variance, copy=True)

    if normalize:
        sums = spatial.sum(axis=(1, 2))
        kernel_sum = np.zeros((height, width), dtype=np.float64)
        for t, (wy, wx) in enumerate(weights):
            kernel_sum += sums[t] * (wy.astype(np.float64) * wx.astype(np.float64))
        if np.any(kernel_sum == 0.0):
            msg = "the kernel sum is zero at some pixels; cannot normalize=True by it"
            raise InputError(msg)
        out_image = (out_image / kernel_sum).astype(np.float32)
        out_var = (out_var / kernel_sum**2).astype(np.float32)

    # Mask: dilate every present plane except the preserved ones; flag the border.
    if mask_dilate:
        preserve = np.uint32(planes.value(*[p for p in preserve_planes if p in planes.planes]))
        present = int(np.bitwise_or.reduce(mask, axis=None))
        to_dilate = present & ~int(preserve)
        out_mask = mask & preserve
        if to_dilate:
            dilate = _Dilator((height, width), np.any(spatial != 0.0, axis=0))
            for bit in range(32):
                if to_dilate >> bit & 1:
                    grown = dilate((mask >> np.uint32(bit)) & np.uint32(1) != 0)
                    out_mask |= grown.astype(np.uint32) << np.uint32(bit)
    else:
        out_mask = mask
    edge = np.uint32(planes.value(edge_plane))
    h_r, h_c = k_r // 2, k_c // 2
    if h_r:
        out_mask[:h_r, :] |= edge
        out_mask[max(height - h_r, 0):, :] |= edge
    if h_c:
        out_mask[:, :h_c] |= edge
        out_mask[:, max(width - h_c, 0):] |= edge

    return exposure.evolve(image=out_image, mask=out_mask, variance=out_var, mask_planes=planes,
                           psf=_convolved_psf(exposure, kernel))
