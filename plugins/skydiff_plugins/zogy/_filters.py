r"""The ZOGY filters of one cell and their application to its images.

Notation (Zackay, Ofek & Gal-Yam 2016; DMTN-179): :math:`N` the science ("new") image,
:math:`R` the template ("reference"), :math:`P_N, P_R` their PSFs (unit sum),
:math:`F_N, F_R` their flux scalings (image counts per unit of true flux; here :math:`F_N = 1`
so that fluxes are in science units), :math:`\sigma_N^2, \sigma_R^2` their background
variances, hats Fourier transforms.

Regularised PSF spectra
-----------------------
Where both PSF spectra vanish the ZOGY filters are ratios of numerical noise or of the PSF
models' errors (upstream's artifacts). Each spectrum is first multiplied by a Wiener window
that removes what is only model noise, then gets a real, positive floor:

.. math::

    \hat U_N = m_N\hat P_N + \delta\,h_N,\qquad \hat U_R = m_R\hat P_R + \delta\,h_R,

.. math::

    m = \frac{E^2}{E^2 + \epsilon^2},\qquad
    h_N = \min\!\big(1, G_N/G_R\big),\quad h_R = \min\!\big(1, G_R/G_N\big).

:math:`\epsilon` is the noise level of a model's spectrum (the median :math:`|\hat P|` where
its Gaussian envelope is below :math:`10^{-8}`; 0 for an analytic PSF), :math:`E` the
azimuthal mean of its spectrum (its smooth decay, in which the noise averages out),
:math:`G = \exp(-2\pi^2 s^2 k^2)` the transform of a Gaussian of the PSF's adaptive width
:math:`s`, and :math:`\delta` the floor (``psf_floor``, at least three times the larger
:math:`\epsilon`). The filters below use :math:`\hat U` in place of :math:`\hat P` and
:math:`|\hat U|` in the denominator, so the difference stays *exactly white* at every
frequency and bounded where the PSFs carry no power; there the mixing of the two images
follows the ratio of the Gaussian envelopes -- the broader image's noise passes, as in ZOGY
for smooth PSFs -- so the filters stay compact instead of ringing. Where both PSFs are well
above :math:`\epsilon` and :math:`\delta` a static source cancels to
:math:`O(\delta/|\hat P|, \epsilon^2/E^2)`. For :math:`\delta, \epsilon \to 0` the filters
are ZOGY's.

Filters
-------

.. math::

    \mathrm{den} = \sqrt{\sigma_N^2 F_R^2 |\hat U_R|^2 + \sigma_R^2 F_N^2 |\hat U_N|^2},\qquad
    F_D = \frac{F_R F_N\,\hat U_R(0)}{\mathrm{den}(0)},

.. math::

    \hat c_N = \frac{F_R \hat U_R}{F_D\,\mathrm{den}},\qquad
    \hat c_R = \frac{F_N \hat U_N}{F_D\,\mathrm{den}}\,e^{2\pi i\,\mathbf k\cdot\mathbf d},
    \qquad D = c_N\otimes N - c_R\otimes R,

:math:`D` being ZOGY's proper difference divided by :math:`F_D` (science flux units) and
:math:`\mathbf d` the template's registration offset (the phase moves :math:`R` by
:math:`-\mathbf d`). The PSF of :math:`D` is its response to a science point source of unit
flux, :math:`\hat P_D = F_N\hat c_N\hat P_N` (ZOGY eq. 14 for :math:`\delta = 0`; unit sum),
and the score (eq. 17) is

.. math::

    \hat S = F_D^2\,\overline{\hat P_D}\,\hat D = \hat k_N\hat N - \hat k_R\hat R, \qquad
    \hat k_N = F_D^2\overline{\hat P_D}\hat c_N,\quad \hat k_R = F_D^2\overline{\hat P_D}\hat c_R

(ZOGY eqs. 26-29 for :math:`\delta = 0`), with the PSF :math:`\hat P_S \propto |\hat P_D|^2`.

Variances
---------
With pixel-independent noise of variance planes :math:`V_N, V_R`, every output is a sum of
convolutions of the inputs, so the variances propagate exactly as

.. math::

    V_D = V_N\otimes c_N^2 + V_R\otimes c_R^2,\qquad
    V_S = V_N\otimes k_N^2 + V_R\otimes k_R^2,

which are ZOGY's source-noise terms :math:`V(S_N) + V(S_R)` (eqs. 26-27) when the variance
planes include the sources' shot noise. The astrometric term (eqs. 30-33) is

.. math::

    V_\mathrm{ast} = \tfrac12\sigma_x^2\big[(\partial_x S_N)^2 + (\partial_x S_R)^2\big]
    + \tfrac12\sigma_y^2\big[(\partial_y S_N)^2 + (\partial_y S_R)^2\big],

:math:`S_N = k_N\otimes N`, :math:`S_R = k_R\otimes R`, with :math:`(\sigma_x, \sigma_y)`
the *relative* registration noise shared equally between the two images.

References
----------
.. [1] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27 ("ZOGY").
.. [2] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation: numerical
   details".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import scipy.fft

__all__ = [
    "CellFilters",
    "PreparedPsf",
    "apply_filters",
    "cell_filters",
    "kernel_images",
    "kernel_spectra",
    "prepare_psf",
    "prepare_psfs",
    "psf_noise",
    "support_radius",
]


def support_radius(image: np.ndarray, *, fraction: float) -> int:
    r"""Smallest half-size :math:`h` of a centred box holding all but ``fraction`` of
    :math:`\sum|I|`.

    Parameters
    ----------
    image : ndarray of shape (S, S)
        Odd, centred.
    fraction : float
        Allowed fraction of the absolute sum outside the box.

    Returns
    -------
    int
        :math:`0 \le h \le S // 2`.
    """
    size = image.shape[0]
    centre = size // 2
    offsets = np.arange(size) - centre
    chebyshev = np.maximum(np.abs(offsets)[:, None], np.abs(offsets)[None, :])
    mass = np.bincount(chebyshev.ravel(), weights=np.abs(image).ravel(),
                       minlength=centre + 1)
    total = float(mass.sum())
    if not total > 0:
        return 0
    outside = total - np.cumsum(mass)
    inside = np.flatnonzero(outside <= fraction * total)
    return int(inside[0]) if inside.size else centre


def threshold_radius(image: np.ndarray, *, threshold: float) -> tuple[int, int]:
    """Half-sizes ``(r_y, r_x)`` of the box around the centre holding every pixel whose
    absolute value exceeds ``threshold`` times the maximum."""
    values = np.abs(image)
    peak = float(values.max())
    if not peak > 0:
        return 0, 0
    rows, cols = np.nonzero(values > threshold * peak)
    centre_r, centre_c = image.shape[0] // 2, image.shape[1] // 2
    return int(np.abs(rows - centre_r).max()), int(np.abs(cols - centre_c).max())


def _centred(image: np.ndarray, size: int) -> np.ndarray:
    """An odd square image cropped or zero-padded about its centre to ``size``."""
    current = image.shape[0]
    if current == size:
        return image
    if current > size:
        cut = (current - size) // 2
        return image[cut:cut + size, cut:cut + size]
    pad = (size - current) // 2
    return np.pad(image, pad)


@attrs.frozen
class PreparedPsf:
    r"""A PSF image ready for the Fourier filters.

    Attributes
    ----------
    image : ndarray of shape (P, P)
        Unit sum, ``P`` odd, the outer ring tapered to zero.
    centroid : tuple of float
        Adaptive centroid ``(x, y)`` relative to the central pixel; the filters move the PSF
        by its negative (recentring), unless it was prepared with ``recentre=False``.
    width : float
        Adaptive Gaussian width :math:`\sigma_w` (pixels).
    noise : float
        Noise level :math:`\epsilon` of the model's spectrum (:func:`psf_noise`).
    envelope : ndarray
        Azimuthal mean of the real part of the recentred spectrum in the annuli
        :math:`|\mathbf k| \approx i / G` (:func:`prepare_psf`): its smooth decay.
    envelope_grid : int
        :math:`G`.
    """

    image: np.ndarray = attrs.field(eq=attrs.cmp_using(eq=np.array_equal))
    centroid: tuple[float, float]
    width: float
    noise: float = 0.0
    envelope: np.ndarray = attrs.field(factory=lambda: np.ones(1), eq=False, repr=False)
    envelope_grid: int = 1


#: Smallest grid (pixels) on which a PSF's spectrum is analysed.
_ANALYSIS_GRID = 128


def prepare_psf(image: np.ndarray, *, size: int, recentre: bool) -> PreparedPsf:
    """One PSF image prepared as by :func:`prepare_psfs`."""
    return prepare_psfs(np.asarray(image, dtype=np.float64)[np.newaxis], size=size,
                        recentre=recentre)[0]


def _stack_moments(stack: np.ndarray, *, iterations: int = 60, tol: float = 1e-10
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`skydiff.psf.psf_moments` on a stack ``(n, S, S)`` at once: ``(x, y, sigma)``.

    The same fixed-point iteration of a circular Gaussian weight (centroid and
    :math:`\\sigma_w^2 = I_{xx} + I_{yy}`), run on all stamps together until every one has
    converged to ``tol``.
    """
    count, size, _ = stack.shape
    axis = np.arange(size, dtype=np.float64)
    cx = np.full(count, (size - 1) / 2.0)
    cy = cx.copy()
    var = np.full(count, 2.0)
    max_var = float(size) ** 2
    for _ in range(iterations):
        wy = np.exp(-0.5 * (axis[None, :] - cy[:, None]) ** 2 / var[:, None])
        wx = np.exp(-0.5 * (axis[None, :] - cx[:, None]) ** 2 / var[:, None])
        weighted = stack * wy[:, :, None] * wx[:, None, :]
        total = weighted.sum(axis=(1, 2))
        total = np.where(total > 0, total, np.nan)
        rows = weighted.sum(axis=2)
        cols = weighted.sum(axis=1)
        cy = rows @ axis / total
        cx = cols @ axis / total
        iyy = np.einsum("ni,ni->n", rows, (axis[None, :] - cy[:, None]) ** 2) / total
        ixx = np.einsum("ni,ni->n", cols, (axis[None, :] - cx[:, None]) ** 2) / total
        new = np.clip(ixx + iyy, 1e-6, max_var)
        converged = np.all(np.abs(new - var) <= tol * var)
        var = new
        if converged:
            break
    bad = ~np.isfinite(cx) | ~np.isfinite(cy) | ~np.isfinite(var)
    centre = (size - 1) / 2.0
    cx = np.where(bad, centre, cx)
    cy = np.where(bad, centre, cy)
    var = np.where(bad, 2.0, var)
    return cx, cy, np.sqrt(var)


def prepare_psfs(images: np.ndarray, *, size: int, recentre: bool) -> list[PreparedPsf]:
    r"""Cut PSF images to ``size``, taper their edges, normalise them, analyse their spectra.

    The taper multiplies the pixels at radius :math:`\rho` from the centre by 1 for
    :math:`\rho \le h - t`, by :math:`\cos^2\!\big(\tfrac\pi2(\rho - h + t)/t\big)` up to
    :math:`h` and by 0 beyond (:math:`h` = ``size // 2``, :math:`t = \max(1, 0.2\,h)`), so
    the PSF's Fourier transform has no ringing from a hard cut; it changes pixels whose
    flux is below the trimming tolerance. Centroids and widths are adaptive moments
    (:func:`skydiff.psf.psf_moments`, computed for the whole stack at once).

    The spectrum of a recentred stamp on a :math:`G \ge 128` grid gives the model's noise
    level :math:`\epsilon` -- the median :math:`|\hat P|` where the Gaussian envelope of the
    adaptive width is below :math:`10^{-8}` (0 when fewer than 16 frequencies are: the
    high frequencies of a sharp PSF carry signal) -- and its *envelope*, the mean of
    :math:`\mathrm{Re}\,\hat P` over annuli :math:`|\mathbf k| \in [i/G, (i+1)/G)`, in which
    the noise averages out.

    Parameters
    ----------
    images : ndarray of shape (n, S, S)
        Odd, centred PSF images.
    size : int
        Odd side of the prepared images.
    recentre : bool
        Record the centroids (the filters then move each PSF onto its centroid); False
        records (0, 0).

    Returns
    -------
    list of PreparedPsf
    """
    stack = np.stack([_centred(np.asarray(image, dtype=np.float64), size)
                      for image in images])
    half = size // 2
    offsets = np.arange(size) - half
    rho = np.hypot(offsets[:, None], offsets[None, :])
    taper_width = max(1.0, 0.2 * half)
    t = np.clip((rho - half + taper_width) / taper_width, 0.0, 1.0)
    taper = np.where(rho > half, 0.0, np.cos(0.5 * np.pi * t) ** 2)
    stack = stack * taper
    stack /= stack.sum(axis=(1, 2), keepdims=True)
    xs, ys, widths = _stack_moments(stack)
    grid = int(scipy.fft.next_fast_len(max(_ANALYSIS_GRID, 2 * size), real=True))
    shape = (grid, grid)
    wrapped = np.stack([_wrapped(stamp, shape, np.float64) for stamp in stack])
    spectra = scipy.fft.rfft2(wrapped, axes=(-2, -1), workers=1)
    ky, kx = _frequencies(shape)
    radius = np.broadcast_to(np.sqrt(ky**2 + kx**2), spectra.shape[1:])
    bins = np.minimum(np.rint(radius * grid).astype(int), grid).ravel()
    counts = np.bincount(bins, minlength=grid + 1)
    prepared = []
    for i in range(stack.shape[0]):  # a loop over the cells' PSFs (small arrays)
        spectrum = spectra[i] * _shift_phase(shape, xs[i] - half, ys[i] - half)
        negligible = 2.0 * np.pi**2 * widths[i] ** 2 * radius**2 > math.log(1e8)
        noise = (float(np.median(np.abs(spectrum[negligible])))
                 if np.count_nonzero(negligible) >= 16 else 0.0)
        sums = np.bincount(bins, weights=spectrum.real.ravel(), minlength=grid + 1)
        envelope = np.maximum(np.where(counts > 0, sums / np.maximum(counts, 1), 0.0), 0.0)
        centroid = (float(xs[i] - half), float(ys[i] - half)) if recentre else (0.0, 0.0)
        prepared.append(PreparedPsf(image=stack[i], centroid=centroid, width=float(widths[i]),
                                    noise=noise, envelope=envelope, envelope_grid=grid))
    return prepared


def psf_noise(psf: PreparedPsf) -> float:
    """The noise level :math:`\\epsilon` of a prepared PSF's spectrum."""
    return psf.noise


def _noise_window(psf: PreparedPsf, shape: tuple[int, int]) -> np.ndarray | float:
    r"""The Wiener window :math:`m = E^2/(E^2 + \epsilon^2)` of a PSF model on a grid,
    :math:`E(|\mathbf k|)` its envelope: 1 where the model is well above its noise, falling
    smoothly to 0 where only noise is left (1 for a noiseless model)."""
    if not psf.noise > 0:
        return 1.0
    ky, kx = _frequencies(shape)
    radius = np.sqrt(ky**2 + kx**2) * psf.envelope_grid
    envelope = np.interp(radius, np.arange(psf.envelope.size), psf.envelope)
    power = envelope**2
    return (power / (power + psf.noise**2)).astype(np.float32)


@attrs.frozen(kw_only=True)
class CellFilters:
    """The Fourier filters of one cell on its FFT grid and their image-space properties.

    Attributes
    ----------
    c_n, c_r, k_n, k_r : ndarray of complex64, shape (Hf, Wf // 2 + 1)
        :math:`\\hat c_N, \\hat c_R, \\hat k_N, \\hat k_R` (``rfft2`` layout).
    c_n2, c_r2, k_n2, k_r2 : ndarray of complex64
        Spectra of the squared image kernels (variance propagation).
    psf_d, psf_s : ndarray of float64
        Images of :math:`P_D` and :math:`P_S` (odd, centred, unit sum).
    f_d : float
        :math:`F_D`.
    sigma2_n, sigma2_r : float
        The background variances used.
    footprint : dict of str to tuple of int
        ``(r_y, r_x)`` of the boxes holding every kernel pixel above the mask threshold:
        ``"difference_science"`` (:math:`c_N`), ``"difference_template"`` (:math:`c_R`),
        ``"score_science"`` (:math:`k_N`), ``"score_template"`` (:math:`k_R`).
    support : int
        Half-size of the box holding all four kernels to the support tolerance.
    tail : float
        Largest fraction of a kernel's squared sum outside the ``border`` box (diagnostic of
        the cell grid's periodic wrap; 0 when the kernels are compact).
    """

    c_n: np.ndarray = attrs.field(eq=False, repr=False)
    c_r: np.ndarray = attrs.field(eq=False, repr=False)
    k_n: np.ndarray = attrs.field(eq=False, repr=False)
    k_r: np.ndarray = attrs.field(eq=False, repr=False)
    c_n2: np.ndarray = attrs.field(eq=False, repr=False)
    c_r2: np.ndarray = attrs.field(eq=False, repr=False)
    k_n2: np.ndarray = attrs.field(eq=False, repr=False)
    k_r2: np.ndarray = attrs.field(eq=False, repr=False)
    psf_d: np.ndarray = attrs.field(eq=False, repr=False)
    psf_s: np.ndarray = attrs.field(eq=False, repr=False)
    f_d: float
    sigma2_n: float
    sigma2_r: float
    footprint: dict[str, tuple[int, int]]
    support: int
    tail: float


def _frequencies(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(k_y, k_x)`` in cycles per pixel of an ``rfft2`` grid (column and row vectors)."""
    return (np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :])


def _shift_phase(shape: tuple[int, int], dx: float, dy: float) -> np.ndarray:
    """``exp(2πi (k_x dx + k_y dy))`` (moves an image by ``(-dx, -dy)``), as an outer product."""
    ky, kx = _frequencies(shape)
    return (np.exp(2j * np.pi * ky * dy).astype(np.complex64)
            * np.exp(2j * np.pi * kx * dx).astype(np.complex64))


def _wrapped(kernel: np.ndarray, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A centred odd kernel on a zero grid of ``shape`` with its centre at pixel ``[0, 0]``
    (the quadrants wrapped around), ready for a circular FFT convolution."""
    size_r, size_c = kernel.shape
    half_r, half_c = size_r // 2, size_c // 2
    grid: np.ndarray = np.zeros(shape, dtype=dtype)
    grid[:half_r + 1, :half_c + 1] = kernel[half_r:, half_c:]
    grid[:half_r + 1, shape[1] - half_c:] = kernel[half_r:, :half_c]
    grid[shape[0] - half_r:, :half_c + 1] = kernel[:half_r, half_c:]
    grid[shape[0] - half_r:, shape[1] - half_c:] = kernel[:half_r, :half_c]
    return grid


def _psf_spectrum(psf: PreparedPsf, shape: tuple[int, int], dtype: type = np.float64
                  ) -> np.ndarray:
    """``rfft2`` of the PSF with its centroid moved to pixel ``[0, 0]``."""
    spectrum = scipy.fft.rfft2(_wrapped(psf.image, shape, dtype), workers=1)
    cx, cy = psf.centroid
    if cx or cy:
        spectrum *= _shift_phase(shape, cx, cy)
    return spectrum


def _envelope_ratio(psf_a: PreparedPsf, psf_b: PreparedPsf, shape: tuple[int, int]
                    ) -> np.ndarray | float:
    r""":math:`\min(1, G_a/G_b)` on an ``rfft2`` grid (Gaussian envelopes of the adaptive
    widths): 1 when ``psf_a`` is the narrower."""
    scale = 2.0 * np.pi**2 * (psf_a.width**2 - psf_b.width**2)
    if scale <= 0:
        return 1.0
    ky, kx = _frequencies(shape)
    return (np.exp(-scale * ky**2).astype(np.float32)
            * np.exp(-scale * kx**2).astype(np.float32))


@attrs.frozen(kw_only=True)
class _Spectra:
    """The four filters and :math:`\\hat P_D` on one grid (complex128)."""

    c_n: np.ndarray
    c_r: np.ndarray
    k_n: np.ndarray
    k_r: np.ndarray
    p_d: np.ndarray
    f_d: float


def _zogy_spectra(psf_n: PreparedPsf, psf_r: PreparedPsf, shape: tuple[int, int], *,
                  flux_n: float, flux_r: float, sigma2_n: float, sigma2_r: float,
                  floor: float, shift: tuple[float, float]) -> _Spectra:
    """The ZOGY filters on a grid of ``shape`` (module notes), in single precision on large
    grids (the floors keep every value far above its round-off)."""
    dtype = np.float32 if shape[0] * shape[1] > 1 << 14 else np.float64
    p_n = _psf_spectrum(psf_n, shape, dtype)
    p_r = _psf_spectrum(psf_r, shape, dtype)
    u_n = p_n * _noise_window(psf_n, shape) + floor * _envelope_ratio(psf_n, psf_r, shape)
    u_r = p_r * _noise_window(psf_r, shape) + floor * _envelope_ratio(psf_r, psf_n, shape)
    den = np.sqrt(sigma2_n * flux_r**2 * (u_r.real**2 + u_r.imag**2)
                  + sigma2_r * flux_n**2 * (u_n.real**2 + u_n.imag**2))
    f_d = flux_r * flux_n * float(u_r[0, 0].real) / float(den[0, 0])
    scale = np.reciprocal(den)
    scale *= 1.0 / f_d
    c_n = u_r * (flux_r * scale)
    c_r = u_n * (flux_n * scale)
    dx, dy = shift
    if dx or dy:
        c_r *= _shift_phase(shape, dx, dy)
    p_d = flux_n * c_n * p_n
    weight = f_d**2 * np.conj(p_d)
    return _Spectra(c_n=c_n, c_r=c_r, k_n=weight * c_n, k_r=weight * c_r, p_d=p_d, f_d=f_d)


def _image(spectrum: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The real image of an ``rfft2`` spectrum with pixel ``[0, 0]`` moved to the centre."""
    image = scipy.fft.irfft2(spectrum, s=shape, workers=1)
    return np.roll(image, (shape[0] // 2, shape[1] // 2), axis=(0, 1))


def _centre_crop(image: np.ndarray, half: int) -> np.ndarray:
    centre_r, centre_c = image.shape[0] // 2, image.shape[1] // 2
    return image[centre_r - half:centre_r + half + 1, centre_c - half:centre_c + half + 1]


def kernel_spectra(kernels: np.ndarray, shape: tuple[int, int], *, workers: int = 1
                   ) -> np.ndarray:
    """``rfft2`` on a grid of ``shape`` of centred odd kernels placed at pixel ``[0, 0]``.

    The kernels ``(m, S, S)`` are transformed along their rows first (only their ``S``
    non-zero rows) and then along the columns of the full grid: about half the work of
    ``m`` full two-dimensional transforms.

    Returns
    -------
    ndarray of complex64, shape (m, H, W // 2 + 1)
    """
    count, size, _ = kernels.shape
    half = size // 2
    height, width = shape
    rows = np.zeros((count, size, width), dtype=np.float32)
    rows[:, :, :half + 1] = kernels[:, :, half:]
    rows[:, :, width - half:] = kernels[:, :, :half]
    spectra = scipy.fft.rfft(rows, axis=-1, workers=workers)
    full = np.zeros((count, height, width // 2 + 1), dtype=np.complex64)
    full[:, :half + 1] = spectra[:, half:]
    full[:, height - half:] = spectra[:, :half]
    return scipy.fft.fft(full, axis=-2, overwrite_x=True, workers=workers)


def kernel_images(psf_n: PreparedPsf, psf_r: PreparedPsf, *, grid: int, flux_n: float,
                  flux_r: float, sigma2_n: float, sigma2_r: float, floor: float,
                  shift: tuple[float, float]) -> tuple[dict[str, np.ndarray], float]:
    """The four kernels, :math:`P_D` and :math:`P_S` as centred images on a ``grid`` square.

    Returns
    -------
    images : dict of str to ndarray of shape (grid, grid)
        ``"c_n"``, ``"c_r"``, ``"k_n"``, ``"k_r"``, ``"psf_d"``, ``"psf_s"``.
    f_d : float
    """
    shape = (grid, grid)
    spectra = _zogy_spectra(psf_n, psf_r, shape, flux_n=flux_n, flux_r=flux_r,
                            sigma2_n=sigma2_n, sigma2_r=sigma2_r, floor=floor, shift=shift)
    images = {name: _image(getattr(spectra, name), shape)
              for name in ("c_n", "c_r", "k_n", "k_r")}
    images["psf_d"] = _image(spectra.p_d, shape)
    images["psf_s"] = _image(np.abs(spectra.p_d) ** 2, shape)
    return images, spectra.f_d


def cell_filters(psf_n: PreparedPsf, psf_r: PreparedPsf, *, fft_shape: tuple[int, int],
                 grid: int, border: int, flux_n: float, flux_r: float, sigma2_n: float,
                 sigma2_r: float, floor: float, shift: tuple[float, float],
                 mask_threshold: float, support_tolerance: float, psf_size: int,
                 score_psf_size: int,
                 images: tuple[dict[str, np.ndarray], float] | None = None,
                 workers: int = 1) -> CellFilters:
    """Build the filters of one cell (module notes).

    The kernels are computed on a ``grid`` × ``grid`` square (larger than their support),
    cut to the ``(2 border + 1)``-pixel box and transformed onto the cell's FFT grid
    ``fft_shape`` together with their squares (:func:`kernel_spectra`): the filters applied
    to the images and to the variances are exactly the same compact kernels, and ``tail``
    reports the squared sum the cut leaves out.

    Parameters
    ----------
    psf_n, psf_r : PreparedPsf
        The science and template PSFs of the cell.
    fft_shape : tuple of int
        The cell's FFT grid (each side at least ``2 border + 1``).
    grid : int
        Side of the square on which the kernel images are computed.
    border : int
        Half-size of the kernels (and of the cell's border).
    flux_n, flux_r, sigma2_n, sigma2_r : float
        :math:`F_N, F_R, \\sigma_N^2, \\sigma_R^2`.
    floor : float
        :math:`\\delta`.
    shift : tuple of float
        Registration offset :math:`(d_x, d_y)` of the template.
    mask_threshold : float
        Kernel pixels above this fraction of their maximum define the mask footprints.
    support_tolerance : float
        Fraction of a kernel's absolute sum allowed outside its support box.
    psf_size, score_psf_size : int
        Odd sides of the stored :math:`P_D` and :math:`P_S` images.
    images : tuple, optional
        The result of :func:`kernel_images` for these arguments, when already computed.
    workers : int, optional
        Threads of the FFTs.
    """
    if images is None:
        images = kernel_images(psf_n, psf_r, grid=grid, flux_n=flux_n, flux_r=flux_r,
                               sigma2_n=sigma2_n, sigma2_r=sigma2_r, floor=floor, shift=shift)
    kernels, f_d = images
    names = ("c_n", "c_r", "k_n", "k_r")
    footprint_keys = {"c_n": "difference_science", "c_r": "difference_template",
                      "k_n": "score_science", "k_r": "score_template"}
    footprint: dict[str, tuple[int, int]] = {}
    tail = 0.0
    support = 0
    cuts = []
    for name in names:
        kernel = kernels[name]
        energy = float(np.sum(kernel**2))
        cut = _centre_crop(kernel, border)
        if energy > 0:
            tail = max(tail, 1.0 - float(np.sum(cut**2)) / energy)
        cuts.append(cut)
        footprint[footprint_keys[name]] = threshold_radius(kernel, threshold=mask_threshold)
        support = max(support, support_radius(kernel, fraction=support_tolerance))
    stack = np.stack(cuts + [cut**2 for cut in cuts]).astype(np.float32)
    spectra = kernel_spectra(stack, fft_shape, workers=workers)
    psf_d = _positive_unit(_centre_crop(kernels["psf_d"], psf_size // 2))
    psf_s = _positive_unit(_centre_crop(kernels["psf_s"], score_psf_size // 2))
    return CellFilters(
        c_n=spectra[0], c_r=spectra[1], k_n=spectra[2], k_r=spectra[3], c_n2=spectra[4],
        c_r2=spectra[5], k_n2=spectra[6], k_r2=spectra[7], psf_d=psf_d, psf_s=psf_s,
        f_d=f_d, sigma2_n=sigma2_n, sigma2_r=sigma2_r, footprint=footprint,
        support=support, tail=tail)


def _positive_unit(image: np.ndarray) -> np.ndarray:
    """The image normalised to unit sum (its sum is positive for a PSF-like response)."""
    total = float(image.sum())
    return image / total if total > 0 else image


def apply_filters(filters: CellFilters, planes: Sequence[np.ndarray], *,
                  fft_shape: tuple[int, int], region: tuple[slice, slice],
                  astrometric: tuple[float, float], matched: bool, workers: int = 1
                  ) -> dict[str, np.ndarray]:
    r"""Filter one cell: the difference, matched template, score and their variances.

    Parameters
    ----------
    filters : CellFilters
        The cell's filters.
    planes : sequence of 4 ndarray
        Science image, science variance, template image, template variance of the cell's
        outer region (sky-subtracted, filled), placed at the top left of a zero grid of
        ``fft_shape`` (zero padding beyond, exactly as no data with no variance).
    fft_shape : tuple of int
        The FFT grid.
    region : tuple of slice
        The part of the grid to return (the cell's support).
    astrometric : tuple of float
        :math:`(\sigma_x^2, \sigma_y^2)` of the relative registration noise (0 skips the term).
    matched : bool
        Also return the matched template :math:`c_R\otimes R` and its variance.
    workers : int, optional
        Threads of each FFT.

    Returns
    -------
    dict of str to ndarray of float32
        ``"difference"``, ``"difference_variance"``, ``"score"``, ``"score_variance"``
        (source noise), with a non-zero ``astrometric`` ``"score_astrometric"`` (the
        astrometric term), and with ``matched`` ``"matched"``, ``"matched_variance"``; each
        cut to ``region``.
    """
    image_n, var_n, image_r, var_r = planes

    def forward(plane: np.ndarray) -> np.ndarray:
        grid = np.zeros(fft_shape, dtype=np.float32)
        grid[:plane.shape[0], :plane.shape[1]] = plane
        return scipy.fft.rfft2(grid, workers=workers)

    def inverse(spectrum: np.ndarray) -> np.ndarray:
        return scipy.fft.irfft2(spectrum, s=fft_shape, workers=workers)[region]

    hat_n, hat_v_n = forward(image_n), forward(var_n)
    hat_r, hat_v_r = forward(image_r), forward(var_r)
    out: dict[str, np.ndarray] = {}
    matched_image = inverse(filters.c_r * hat_r)
    matched_variance = inverse(filters.c_r2 * hat_v_r)
    out["difference"] = inverse(filters.c_n * hat_n) - matched_image
    out["difference_variance"] = np.maximum(inverse(filters.c_n2 * hat_v_n)
                                            + matched_variance, 0.0)
    if matched:
        out["matched"] = matched_image
        out["matched_variance"] = np.maximum(matched_variance, 0.0)
    score_n = filters.k_n * hat_n
    score_r = filters.k_r * hat_r
    out["score"] = inverse(score_n - score_r)
    out["score_variance"] = np.maximum(inverse(filters.k_n2 * hat_v_n
                                               + filters.k_r2 * hat_v_r), 0.0)
    sx2, sy2 = astrometric
    if sx2 > 0 or sy2 > 0:
        ky, kx = _frequencies(fft_shape)
        ky = ky.copy()
        kx = kx.copy()
        if fft_shape[0] % 2 == 0:
            ky[fft_shape[0] // 2] = 0.0  # the Nyquist row has no real derivative
        if fft_shape[1] % 2 == 0:
            kx[:, -1] = 0.0
        astro = np.zeros_like(out["score_variance"])
        for sigma2, freq in ((sx2, kx), (sy2, ky)):
            if sigma2 <= 0:
                continue
            derivative = (2j * np.pi * freq).astype(np.complex64)
            for spectrum in (score_n, score_r):
                gradient = inverse(derivative * spectrum)
                astro += np.float32(0.5 * sigma2) * gradient**2
        out["score_astrometric"] = astro
    return {key: np.asarray(value, dtype=np.float32) for key, value in out.items()}
