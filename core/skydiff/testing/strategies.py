r"""Hypothesis strategies for skydiff data: PSFs, kernels, exposures and star fields.

These strategies are public API, meant for the property tests of third-party plugins as much
as for skydiff's own. They compose like :mod:`xarray.testing.strategies`: every strategy takes
*strategy-valued* keyword arguments that narrow what it generates, so a test states only what
matters to it::

    from hypothesis import given, strategies as st
    from skydiff.testing.strategies import exposures, psfs

    @given(exposures(shape=st.just((32, 32)), psf=psfs(kind=st.just("gaussian"))))
    def test_my_detector_runs(exposure): ...

All values are generated *constructively* (valid by construction: odd sizes, positive sums,
positions inside the frame), never by filtering with :func:`hypothesis.assume`, so the
strategies stay fast and shrink well. Pixel noise is drawn from
``numpy.random.default_rng(seed)`` with a hypothesis-drawn ``seed`` (which shrinks to 0):
pixel-by-pixel hypothesis arrays would be slow and would not look like images.

Strategies
----------
:func:`psfs`
    :class:`~skydiff.psf.GaussianPsf`, :class:`~skydiff.psf.ImagePsf` (elliptical) and
    :class:`~skydiff.psf.PolynomialPsf` (spatially varying) models.
:func:`kernels`
    :class:`~skydiff.kernel.FixedKernel` and spatially varying
    :class:`~skydiff.kernel.BasisKernel` convolution kernels with a positive sum.
:func:`exposures`
    :class:`~skydiff.exposure.Exposure` objects with matching image, mask and variance planes,
    optionally a PSF, mask bits and a WCS.
:func:`star_fields`
    Exposures of point sources with their truth (:class:`StarField`).
:func:`stamps`
    Postage stamps of a single star near the centre (:class:`StarField` with one source).

Requires the ``testing`` extra (``pip install skydiff[testing]``), which provides hypothesis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from scipy import ndimage

from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel, n_spatial_terms
from skydiff.mask import MaskPlanes
from skydiff.psf import GaussianPsf, ImagePsf, PolynomialPsf, Psf

__all__ = [
    "PSF_KINDS",
    "StarField",
    "exposures",
    "kernels",
    "psfs",
    "render_point_sources",
    "stamps",
    "star_fields",
]

#: The PSF model kinds :func:`psfs` can generate.
PSF_KINDS: tuple[str, ...] = ("gaussian", "image", "polynomial")

_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)

# Default argument values are module-level strategies (hypothesis strategies are immutable),
# so the signatures document them.
_PSF_KIND = st.sampled_from(["gaussian", "image"])
_PSF_SIGMA = st.floats(0.8, 3.0)
_KERNEL_SIZE = st.sampled_from([3, 5, 7, 9])
_SPATIALLY_VARYING = st.booleans()
_ORDER = st.integers(0, 2)
_N_BASIS = st.integers(1, 3)
_KERNEL_SCALE = st.floats(0.5, 2.0)
_KERNEL_BBOX = st.just((0.0, 0.0, 63.0, 63.0))
_EXPOSURE_SHAPE = st.tuples(st.integers(16, 48), st.integers(16, 48))
_NOISE = st.floats(0.1, 10.0)
_MASKS = st.booleans()
_WCS = st.booleans()
_ORIGIN = st.just((0, 0))
_FIELD_SHAPE = st.tuples(st.integers(24, 64), st.integers(24, 64))
_N_STARS = st.integers(1, 8)
_FLUX = st.floats(500.0, 50_000.0)
_FIELD_NOISE = st.floats(1.0, 10.0)
_STAMP_SIZE = st.sampled_from([15, 17, 21, 25])
_STAMP_OFFSET = st.tuples(st.floats(-0.5, 0.5), st.floats(-0.5, 0.5))
_STAMP_NOISE = st.floats(0.5, 5.0)


def _require_strategy(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise InvalidArgument unless ``value`` is a hypothesis strategy (or None if allowed)."""
    if optional and value is None:
        return
    if not isinstance(value, st.SearchStrategy):
        what = "a hypothesis strategy or None" if optional else "a hypothesis strategy"
        msg = (f"{name} must be {what} (e.g. st.just(...)), got {type(value).__name__} "
               f"{value!r}")
        raise InvalidArgument(msg)


def _odd(size: int, *, minimum: int = 3) -> int:
    """Round ``size`` up to an odd integer of at least ``minimum``."""
    size = max(int(size), minimum)
    return size if size % 2 else size + 1


def _elliptical_gaussian(size: int, sigma_major: float, sigma_minor: float, angle: float
                         ) -> np.ndarray:
    """Sampled elliptical Gaussian on an odd ``size`` grid, centred, unit sum."""
    offsets = np.arange(size, dtype=np.float64) - size // 2
    rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    along = cols * cos + rows * sin
    across = -cols * sin + rows * cos
    image = np.exp(-0.5 * ((along / sigma_major) ** 2 + (across / sigma_minor) ** 2))
    return image / image.sum()


def _gaussian_image(size: int, sigma: float, *, dx: float = 0.0, dy: float = 0.0
                    ) -> np.ndarray:
    """Sampled circular Gaussian centred at (centre + dx, centre + dy), unit sum."""
    offsets = np.arange(size, dtype=np.float64) - size // 2
    gx = np.exp(-0.5 * ((offsets - dx) / sigma) ** 2)
    gy = np.exp(-0.5 * ((offsets - dy) / sigma) ** 2)
    image = np.outer(gy, gx)
    return image / image.sum()


# ------------------------------------------------------------------------------------------
# PSFs


@st.composite
def _draw_psf(draw: st.DrawFn, kind: st.SearchStrategy[str], sigma: st.SearchStrategy[float],
              size: st.SearchStrategy[int] | None) -> Psf:
    name = draw(kind)
    if name not in PSF_KINDS:
        msg = f"psfs(kind=...) drew {name!r}; allowed kinds: {', '.join(PSF_KINDS)}"
        raise InvalidArgument(msg)
    width = float(draw(sigma))
    if not (math.isfinite(width) and width > 0.0):
        msg = f"psfs(sigma=...) drew {width!r}; PSF widths must be positive and finite"
        raise InvalidArgument(msg)
    side = None if size is None else _odd(draw(size))
    if name == "gaussian":
        return GaussianPsf(width, size=side)
    if name == "image":
        ellipticity = draw(st.floats(0.0, 0.3))
        angle = draw(st.floats(0.0, math.pi, exclude_max=True))
        # Axes whose geometric mean is sigma, so the FWHM stays close to 2.3548 sigma.
        major = width / math.sqrt(1.0 - ellipticity)
        minor = width * math.sqrt(1.0 - ellipticity)
        side = side if side is not None else _odd(2 * math.ceil(4.0 * major) + 1)
        return ImagePsf(_elliptical_gaussian(side, major, minor, angle))
    # "polynomial": two Gaussian components whose weights vary linearly across a 64-px frame.
    side = side if side is not None else _odd(2 * math.ceil(4.0 * 1.3 * width) + 1)
    narrow = _gaussian_image(side, width)
    wide = _gaussian_image(side, 1.3 * width)
    gradient_x = draw(st.floats(-0.2, 0.2))
    gradient_y = draw(st.floats(-0.2, 0.2))
    # Weights 1 and 0.5 + gx u + gy v with |gx| + |gy| <= 0.4: positive everywhere in bbox.
    coefficients = [[1.0, 0.0, 0.0], [0.5, gradient_x, gradient_y]]
    return PolynomialPsf(np.stack([narrow, wide]), coefficients, order=1,
                         bbox=(0.0, 0.0, 63.0, 63.0))


def psfs(*, kind: st.SearchStrategy[str] = _PSF_KIND,
         sigma: st.SearchStrategy[float] = _PSF_SIGMA,
         size: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[Psf]:
    r"""Generate PSF models satisfying the :class:`~skydiff.psf.Psf` protocol.

    Every generated PSF has odd, square, unit-sum, centred kernel images.

    Parameters
    ----------
    kind : strategy of str, optional
        Which model to build, each drawn value one of :data:`PSF_KINDS`:

        ``"gaussian"``
            :class:`~skydiff.psf.GaussianPsf` of width ``sigma``;
        ``"image"``
            :class:`~skydiff.psf.ImagePsf` of an elliptical Gaussian with ellipticity
            :math:`e = 1 - b/a \in [0, 0.3]` and a random orientation, whose axes have
            geometric mean ``sigma``;
        ``"polynomial"``
            spatially varying :class:`~skydiff.psf.PolynomialPsf`: a Gaussian of width
            ``sigma`` plus one of width :math:`1.3\sigma` whose weight varies linearly (by at
            most ±40 %) across the box ``(0, 0, 63, 63)``.

        Default: ``"gaussian"`` or ``"image"``.
    sigma : strategy of float, optional
        Gaussian width in pixels (> 0); default uniform in [0.8, 3.0].
    size : strategy of int, optional
        Side of the kernel images; even values are rounded up to the next odd one, values
        below 3 become 3. Default (None): :math:`2\lceil 4\sigma_\mathrm{max}\rceil + 1`.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Psf

    Raises
    ------
    hypothesis.errors.InvalidArgument
        If an argument is not a strategy, or draws an unknown kind or a non-positive width.

    Examples
    --------
    >>> from hypothesis import given, strategies as st
    >>> from skydiff.testing.strategies import psfs
    >>> @given(psfs(kind=st.just("gaussian"), sigma=st.floats(1.0, 2.0)))
    ... def test_unit_sum(psf):
    ...     assert abs(psf.kernel_image().sum() - 1.0) < 1e-12
    >>> test_unit_sum()
    """
    _require_strategy("kind", kind)
    _require_strategy("sigma", sigma)
    _require_strategy("size", size, optional=True)
    return _draw_psf(kind, sigma, size)


_DEFAULT_PSFS = psfs()
_FIELD_PSFS = psfs(sigma=st.floats(0.8, 2.5))
_STAMP_PSFS = psfs(sigma=st.floats(0.8, 2.0))


# ------------------------------------------------------------------------------------------
# kernels


@st.composite
def _draw_kernel(draw: st.DrawFn, size: st.SearchStrategy[int],
                 spatially_varying: st.SearchStrategy[bool], order: st.SearchStrategy[int],
                 n_basis: st.SearchStrategy[int], scale: st.SearchStrategy[float],
                 bbox: st.SearchStrategy[tuple[float, float, float, float]]
                 ) -> FixedKernel | BasisKernel:
    side = _odd(draw(size))
    total = float(draw(scale))
    if not (math.isfinite(total) and total > 0.0):
        msg = f"kernels(scale=...) drew {total!r}; kernel sums must be positive and finite"
        raise InvalidArgument(msg)
    width_max = max(0.5, side / 4.0)
    width = draw(st.floats(0.5, width_max))
    dx = draw(st.floats(-0.5, 0.5))
    dy = draw(st.floats(-0.5, 0.5))
    core = _gaussian_image(side, width, dx=dx, dy=dy)
    if not draw(spatially_varying):
        return FixedKernel(total * core)
    degree = max(1, int(draw(order)))  # order 0 cannot vary: use at least 1
    n_terms = n_spatial_terms(degree)
    n_components = max(1, int(draw(n_basis)))
    # Alard-Lupton-like basis: B_0 has unit sum; the others are zero-sum differences of
    # Gaussians, so the kernel sum depends on the coefficients of B_0 only.
    basis = [core]
    for j in range(1, n_components):
        other = _gaussian_image(side, width * (1.0 + 0.5 * j), dx=dx, dy=dy)
        basis.append(other - core)
    coefficients = np.zeros((n_components, n_terms))
    coefficients[0, 0] = total
    # Non-constant terms of B_0: |c| <= 0.1 total / n_terms each, so the sum stays within
    # (0.9, 1.1) x total over the bbox, where every spatial function lies in [-1, 1].
    limit = 0.1 * total / n_terms
    magnitudes = draw(st.lists(st.floats(0.05 * limit, limit), min_size=n_terms - 1,
                               max_size=n_terms - 1))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n_terms - 1,
                          max_size=n_terms - 1))
    coefficients[0, 1:] = np.asarray(magnitudes) * np.asarray(signs)
    if n_components > 1:
        others = draw(st.lists(st.floats(-0.3, 0.3), min_size=(n_components - 1) * n_terms,
                               max_size=(n_components - 1) * n_terms))
        coefficients[1:] = np.reshape(others, (n_components - 1, n_terms))
    return BasisKernel(np.stack(basis), coefficients, order=degree, bbox=draw(bbox))


def kernels(*, size: st.SearchStrategy[int] = _KERNEL_SIZE,
            spatially_varying: st.SearchStrategy[bool] = _SPATIALLY_VARYING,
            order: st.SearchStrategy[int] = _ORDER,
            n_basis: st.SearchStrategy[int] = _N_BASIS,
            scale: st.SearchStrategy[float] = _KERNEL_SCALE,
            bbox: st.SearchStrategy[tuple[float, float, float, float]] = _KERNEL_BBOX,
            ) -> st.SearchStrategy[FixedKernel | BasisKernel]:
    r"""Generate PSF-matching convolution kernels with odd sizes and a positive sum.

    A spatially constant kernel is a :class:`~skydiff.kernel.FixedKernel`: a sampled Gaussian
    of width in :math:`[0.5, \max(0.5, K/4)]`, centred within half a pixel of the central
    pixel, with sum ``scale``. A spatially varying kernel is an Alard–Lupton-like
    :class:`~skydiff.kernel.BasisKernel`: that Gaussian as the unit-sum first basis image plus
    ``n_basis - 1`` zero-sum differences of wider Gaussians, with Chebyshev coefficients of
    total degree ``order``. The first basis image's non-constant coefficients are non-zero
    but small, so that the kernel sum stays within :math:`(0.9, 1.1)\times` ``scale`` over
    ``bbox``.

    Parameters
    ----------
    size : strategy of int, optional
        Kernel side ``K`` (square kernels); even values are rounded up to the next odd one.
        Default one of 3, 5, 7, 9.
    spatially_varying : strategy of bool, optional
        Whether to build a spatially varying :class:`~skydiff.kernel.BasisKernel` (True) or a
        :class:`~skydiff.kernel.FixedKernel` (False). Default either.
    order : strategy of int, optional
        Total degree of the spatial polynomials of a varying kernel; 0 is raised to 1 (a
        degree-0 kernel cannot vary). Default 0 to 2.
    n_basis : strategy of int, optional
        Number of basis images of a varying kernel (≥ 1). Default 1 to 3.
    scale : strategy of float, optional
        The kernel sum (photometric scale) at the centre, > 0. Default in [0.5, 2].
    bbox : strategy of tuple of 4 floats, optional
        ``(x_min, y_min, x_max, y_max)`` of a varying kernel. Default ``(0, 0, 63, 63)``.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of FixedKernel or BasisKernel

    Raises
    ------
    hypothesis.errors.InvalidArgument
        If an argument is not a strategy or ``scale`` draws a non-positive value.

    Examples
    --------
    >>> from hypothesis import given, strategies as st
    >>> from skydiff.testing.strategies import kernels
    >>> @given(kernels(spatially_varying=st.just(True), order=st.just(1)))
    ... def test_varies(kernel):
    ...     assert kernel.is_spatially_varying and kernel.shape[0] % 2 == 1
    >>> test_varies()
    """
    for name, value in (("size", size), ("spatially_varying", spatially_varying),
                        ("order", order), ("n_basis", n_basis), ("scale", scale),
                        ("bbox", bbox)):
        _require_strategy(name, value)
    return _draw_kernel(size, spatially_varying, order, n_basis, scale, bbox)


# ------------------------------------------------------------------------------------------
# exposures


def _tan_wcs(draw: st.DrawFn, shape: tuple[int, int]) -> WCS:
    """A TAN WCS centred on the frame with a drawn pointing, pixel scale and rotation."""
    ra = draw(st.floats(0.0, 360.0, exclude_max=True))
    dec = draw(st.floats(-80.0, 80.0))
    scale = draw(st.floats(0.1, 1.0)) / 3600.0  # degrees per pixel
    rotation = math.radians(draw(st.floats(0.0, 360.0, exclude_max=True)))
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    cos, sin = math.cos(rotation), math.sin(rotation)
    wcs.wcs.cd = [[-scale * cos, scale * sin], [scale * sin, scale * cos]]
    return wcs


def _defect_mask(rng: np.random.Generator, shape: tuple[int, int], planes: MaskPlanes
                 ) -> np.ndarray:
    """A bad column segment, a small saturated block and a few cosmic-ray pixels."""
    rows, cols = shape
    mask = np.zeros(shape, dtype=np.uint32)
    column = int(rng.integers(0, cols))
    start = int(rng.integers(0, rows // 2))
    mask[start:start + rows // 2, column] |= np.uint32(planes.value("BAD"))
    row0, col0 = int(rng.integers(0, rows - 2)), int(rng.integers(0, cols - 2))
    mask[row0:row0 + 2, col0:col0 + 2] |= np.uint32(planes.value("SAT"))
    n_cr = int(rng.integers(1, 4))
    mask[rng.integers(0, rows, n_cr), rng.integers(0, cols, n_cr)] |= np.uint32(
        planes.value("CR"))
    return mask


def _shape(draw: st.DrawFn, shape: st.SearchStrategy[tuple[int, int]], name: str
           ) -> tuple[int, int]:
    rows, cols = (int(v) for v in draw(shape))
    if rows < 4 or cols < 4:
        msg = f"{name}(shape=...) drew {(rows, cols)}; shapes must be at least (4, 4)"
        raise InvalidArgument(msg)
    return rows, cols


@st.composite
def _draw_exposure(draw: st.DrawFn, shape: st.SearchStrategy[tuple[int, int]],
                   image: Callable[[tuple[int, int]], st.SearchStrategy[Any]] | None,
                   noise: st.SearchStrategy[float], psf: st.SearchStrategy[Psf | None],
                   masks: st.SearchStrategy[bool], wcs: st.SearchStrategy[bool],
                   origin: st.SearchStrategy[tuple[int, int]]) -> Exposure:
    dims = _shape(draw, shape, "exposures")
    sigma = float(draw(noise))
    if not (math.isfinite(sigma) and sigma > 0.0):
        msg = f"exposures(noise=...) drew {sigma!r}; the noise level must be positive"
        raise InvalidArgument(msg)
    rng = np.random.default_rng(draw(_SEEDS))
    if image is None:
        pixels = rng.normal(0.0, sigma, size=dims).astype(np.float32)
    else:
        pixels = np.asarray(draw(image(dims)), dtype=np.float32)
        if pixels.shape != dims:
            msg = (f"exposures(image=...) returned an array of shape {pixels.shape} for shape "
                   f"{dims}; the image strategy must honour the shape it is given")
            raise InvalidArgument(msg)
    planes = MaskPlanes.default()
    mask = (_defect_mask(rng, dims, planes) if draw(masks)
            else np.zeros(dims, dtype=np.uint32))
    return Exposure(pixels, mask=mask, variance=np.full(dims, sigma**2, dtype=np.float32),
                    mask_planes=planes, psf=draw(psf),
                    wcs=_tan_wcs(draw, dims) if draw(wcs) else None, origin=draw(origin))


def exposures(*, shape: st.SearchStrategy[tuple[int, int]] = _EXPOSURE_SHAPE,
              image: Callable[[tuple[int, int]], st.SearchStrategy[Any]] | None = None,
              noise: st.SearchStrategy[float] = _NOISE,
              psf: st.SearchStrategy[Psf | None] = _DEFAULT_PSFS,
              masks: st.SearchStrategy[bool] = _MASKS,
              wcs: st.SearchStrategy[bool] = _WCS,
              origin: st.SearchStrategy[tuple[int, int]] = _ORIGIN,
              ) -> st.SearchStrategy[Exposure]:
    r"""Generate :class:`~skydiff.exposure.Exposure` objects.

    Image, mask and variance always have the same shape; the variance plane is the constant
    :math:`\sigma^2` of the drawn ``noise`` level.

    Parameters
    ----------
    shape : strategy of (int, int), optional
        ``(rows, cols)``, each ≥ 4; default 16 to 48 each.
    image : callable, optional
        ``image(shape)`` returns a strategy of arrays of exactly that shape (as
        ``array_strategy_fn`` in :func:`xarray.testing.strategies.variables`), e.g.
        ``lambda shape: hypothesis.extra.numpy.arrays(np.float32, shape,
        elements=st.floats(-100, 100, width=32))``. Default: Gaussian white noise of standard
        deviation ``noise`` (from a drawn seed).
    noise : strategy of float, optional
        Noise standard deviation :math:`\sigma` (> 0), which sets the variance plane; default
        in [0.1, 10].
    psf : strategy of Psf or None, optional
        The attached PSF; ``st.none()`` for none. Default :func:`psfs`.
    masks : strategy of bool, optional
        Whether to set mask bits: a ``BAD`` column segment, a 2×2 ``SAT`` block and 1–3
        ``CR`` pixels. Default either.
    wcs : strategy of bool, optional
        Whether to attach a TAN WCS (random pointing, 0.1–1″ pixels, random rotation).
        Default either.
    origin : strategy of (int, int), optional
        ``(x0, y0)`` of the exposure in its parent frame; default ``(0, 0)``.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Exposure

    Raises
    ------
    hypothesis.errors.InvalidArgument
        If an argument is not a strategy (``image`` not a callable), or draws an invalid
        value (shape below 4, non-positive noise, image of the wrong shape).

    Examples
    --------
    >>> from hypothesis import given, strategies as st
    >>> from skydiff.testing.strategies import exposures
    >>> @given(exposures(shape=st.just((20, 30)), masks=st.just(True), psf=st.none()))
    ... def test_shapes(exposure):
    ...     assert exposure.image.shape == exposure.variance.shape == (20, 30)
    ...     assert exposure.masked("BAD").any() and exposure.psf is None
    >>> test_shapes()
    """
    for name, value in (("shape", shape), ("noise", noise), ("psf", psf), ("masks", masks),
                        ("wcs", wcs), ("origin", origin)):
        _require_strategy(name, value)
    if image is not None and not callable(image):
        msg = (f"image must be a callable shape -> strategy of arrays, or None; got "
               f"{type(image).__name__}")
        raise InvalidArgument(msg)
    return _draw_exposure(shape, image, noise, psf, masks, wcs, origin)


# ------------------------------------------------------------------------------------------
# star fields


def _readonly_float64(value: Any) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True).reshape(-1)
    array.setflags(write=False)
    return array


_ARRAY_EQ = attrs.cmp_using(eq=np.array_equal)


@attrs.frozen
class StarField:
    """An exposure of point sources together with the truth it was made from.

    Attributes
    ----------
    exposure : Exposure
        The noisy image with its variance plane (background plus source noise) and the PSF
        the stars were rendered with.
    x, y : ndarray of shape (n,)
        True 0-based column and row of each star's centre (read-only).
    flux : ndarray of shape (n,)
        True total flux of each star in image units (read-only); a star near an edge loses
        part of it off the frame.
    """

    exposure: Exposure
    x: np.ndarray = attrs.field(converter=_readonly_float64, eq=_ARRAY_EQ)
    y: np.ndarray = attrs.field(converter=_readonly_float64, eq=_ARRAY_EQ)
    flux: np.ndarray = attrs.field(converter=_readonly_float64, eq=_ARRAY_EQ)

    @property
    def n_stars(self) -> int:
        """Number of stars."""
        return int(self.x.size)

    @property
    def truth(self) -> Table:
        """The truth as a new :class:`~astropy.table.Table` with columns ``x``, ``y``, ``flux``."""
        return Table({"x": self.x, "y": self.y, "flux": self.flux})


def render_point_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray,
                         flux: np.ndarray, psf: Psf) -> np.ndarray:
    r"""Render point sources with a PSF model into a new ``float64`` image.

    A :class:`~skydiff.psf.GaussianPsf` is evaluated analytically at the pixel centres
    (exactly the profile of its kernel image, at any sub-pixel position,
    :math:`f/(2\pi\sigma^2)\,e^{-r^2/2\sigma^2}`). Any other PSF's kernel image at each
    star's position is shifted by the sub-pixel offset with a cubic spline, renormalised to
    unit sum and added at the nearest pixel (clipped at the edges).

    Parameters
    ----------
    shape : (int, int)
        ``(rows, cols)`` of the image.
    x, y : ndarray of shape (n,)
        0-based column and row of each source.
    flux : ndarray of shape (n,)
        Total flux of each source.
    psf : Psf
        The PSF model (positions are passed to :meth:`~skydiff.psf.Psf.kernel_image`).

    Returns
    -------
    ndarray of shape ``shape``
    """
    rows, cols = shape
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    if isinstance(psf, GaussianPsf):
        sigma = psf.sigma
        gx = np.exp(-0.5 * ((np.arange(cols)[None, :] - x[:, None]) / sigma) ** 2)
        gy = np.exp(-0.5 * ((np.arange(rows)[None, :] - y[:, None]) / sigma) ** 2)
        weights = flux / (2.0 * math.pi * sigma**2)
        return np.einsum("n,nr,nc->rc", weights, gy, gx)
    image = np.zeros(shape, dtype=np.float64)
    for xs, ys, fs in zip(x, y, flux, strict=True):  # loop over stars, not pixels
        stamp = np.asarray(psf.kernel_image(float(xs), float(ys)), dtype=np.float64)
        col, row = round(xs), round(ys)
        shifted = ndimage.shift(stamp, (ys - row, xs - col), order=3, mode="constant")
        shifted *= fs / shifted.sum()
        half = stamp.shape[0] // 2
        r0, r1 = max(row - half, 0), min(row + half + 1, rows)
        c0, c1 = max(col - half, 0), min(col + half + 1, cols)
        if r0 < r1 and c0 < c1:
            image[r0:r1, c0:c1] += shifted[r0 - row + half:r1 - row + half,
                                           c0 - col + half:c1 - col + half]
    return image


def _star_field(rng: np.random.Generator, dims: tuple[int, int], x: np.ndarray,
                y: np.ndarray, flux: np.ndarray, psf: Psf, sigma: float) -> StarField:
    model = render_point_sources(dims, x, y, flux, psf)
    # Background noise sigma plus source (Poisson-like, gain 1) noise of variance = model.
    variance = sigma**2 + np.maximum(model, 0.0)
    pixels = model + rng.normal(size=dims) * np.sqrt(variance)
    exposure = Exposure(pixels.astype(np.float32), variance=variance.astype(np.float32),
                        psf=psf)
    return StarField(exposure, x, y, flux)


@st.composite
def _draw_star_field(draw: st.DrawFn, shape: st.SearchStrategy[tuple[int, int]],
                     n_stars: st.SearchStrategy[int], flux: st.SearchStrategy[float],
                     psf: st.SearchStrategy[Psf], noise: st.SearchStrategy[float]) -> StarField:
    dims = _shape(draw, shape, "star_fields")
    model_psf = draw(psf)
    sigma = float(draw(noise))
    if not (math.isfinite(sigma) and sigma > 0.0):
        msg = f"star_fields(noise=...) drew {sigma!r}; the noise level must be positive"
        raise InvalidArgument(msg)
    count = int(draw(n_stars))
    if count < 0:
        msg = f"star_fields(n_stars=...) drew {count}; the number of stars must be >= 0"
        raise InvalidArgument(msg)
    # Keep centres 2 FWHM from the edges (at most a quarter of the frame).
    margin = min(math.ceil(2.0 * model_psf.fwhm()), (min(dims) - 1) // 4)
    xs = draw(st.lists(st.floats(margin, dims[1] - 1 - margin), min_size=count,
                       max_size=count))
    ys = draw(st.lists(st.floats(margin, dims[0] - 1 - margin), min_size=count,
                       max_size=count))
    fluxes = draw(st.lists(flux, min_size=count, max_size=count))
    rng = np.random.default_rng(draw(_SEEDS))
    return _star_field(rng, dims, np.asarray(xs, dtype=np.float64),
                       np.asarray(ys, dtype=np.float64), np.asarray(fluxes, dtype=np.float64),
                       model_psf, sigma)


def star_fields(*, shape: st.SearchStrategy[tuple[int, int]] = _FIELD_SHAPE,
                n_stars: st.SearchStrategy[int] = _N_STARS,
                flux: st.SearchStrategy[float] = _FLUX,
                psf: st.SearchStrategy[Psf] = _FIELD_PSFS,
                noise: st.SearchStrategy[float] = _FIELD_NOISE,
                ) -> st.SearchStrategy[StarField]:
    r"""Generate exposures of point sources with known positions and fluxes.

    Star centres are uniform over the frame minus a margin of
    :math:`\min(\lceil 2\,\mathrm{FWHM}\rceil, \lfloor(\min(H, W) - 1)/4\rfloor)` pixels;
    stars may overlap. Pixel values are the rendered stars (see
    :func:`render_point_sources`) plus Gaussian noise of variance
    :math:`\sigma^2 + \max(m, 0)` (background plus source noise at gain 1), which is also the
    variance plane. The exposure carries the PSF; the mask is empty.

    Parameters
    ----------
    shape : strategy of (int, int), optional
        ``(rows, cols)``, each ≥ 4; default 24 to 64 each.
    n_stars : strategy of int, optional
        Number of stars (≥ 0); default 1 to 8.
    flux : strategy of float, optional
        Total flux of each star (drawn independently); default in [500, 50000].
    psf : strategy of Psf, optional
        The PSF model; default :func:`psfs` with :math:`\sigma \in [0.8, 2.5]`.
    noise : strategy of float, optional
        Background noise standard deviation :math:`\sigma` (> 0); default in [1, 10].

    Returns
    -------
    hypothesis.strategies.SearchStrategy of StarField

    Raises
    ------
    hypothesis.errors.InvalidArgument
        If an argument is not a strategy or draws an invalid value.

    Examples
    --------
    >>> from hypothesis import given, strategies as st
    >>> from skydiff.testing.strategies import star_fields
    >>> @given(star_fields(n_stars=st.just(3), noise=st.just(1.0)))
    ... def test_truth(field):
    ...     assert len(field.truth) == 3 and field.exposure.psf is not None
    >>> test_truth()
    """
    for name, value in (("shape", shape), ("n_stars", n_stars), ("flux", flux), ("psf", psf),
                        ("noise", noise)):
        _require_strategy(name, value)
    return _draw_star_field(shape, n_stars, flux, psf, noise)


@st.composite
def _draw_stamp(draw: st.DrawFn, size: st.SearchStrategy[int], psf: st.SearchStrategy[Psf],
                flux: st.SearchStrategy[float],
                offset: st.SearchStrategy[tuple[float, float]],
                noise: st.SearchStrategy[float]) -> StarField:
    side = _odd(draw(size), minimum=5)
    model_psf = draw(psf)
    dx, dy = (float(v) for v in draw(offset))
    if not (abs(dx) <= side // 2 and abs(dy) <= side // 2):
        msg = f"stamps(offset=...) drew {(dx, dy)}, which leaves a {side}-pixel stamp"
        raise InvalidArgument(msg)
    sigma = float(draw(noise))
    if not (math.isfinite(sigma) and sigma > 0.0):
        msg = f"stamps(noise=...) drew {sigma!r}; the noise level must be positive"
        raise InvalidArgument(msg)
    total = float(draw(flux))
    rng = np.random.default_rng(draw(_SEEDS))
    centre = side // 2
    return _star_field(rng, (side, side), np.array([centre + dx]), np.array([centre + dy]),
                       np.array([total]), model_psf, sigma)


def stamps(*, size: st.SearchStrategy[int] = _STAMP_SIZE,
           psf: st.SearchStrategy[Psf] = _STAMP_PSFS,
           flux: st.SearchStrategy[float] = _FLUX,
           offset: st.SearchStrategy[tuple[float, float]] = _STAMP_OFFSET,
           noise: st.SearchStrategy[float] = _STAMP_NOISE) -> st.SearchStrategy[StarField]:
    """Generate square postage stamps holding one star near the central pixel.

    The kind of cut-out kernel fitting, centroiding and PSF photometry work on. The result is
    a :class:`StarField` with one star at ``(size // 2 + dx, size // 2 + dy)``.

    Parameters
    ----------
    size : strategy of int, optional
        Side of the stamp; even values are rounded up to the next odd one, minimum 5.
        Default one of 15, 17, 21, 25.
    psf : strategy of Psf, optional
        The PSF; default :func:`psfs` with sigma in [0.8, 2].
    flux : strategy of float, optional
        Total flux of the star; default in [500, 50000].
    offset : strategy of (float, float), optional
        ``(dx, dy)`` of the star from the central pixel; default each in [-0.5, 0.5].
    noise : strategy of float, optional
        Background noise standard deviation (> 0); default in [0.5, 5].

    Returns
    -------
    hypothesis.strategies.SearchStrategy of StarField

    Raises
    ------
    hypothesis.errors.InvalidArgument
        If an argument is not a strategy or draws an invalid value.

    Examples
    --------
    >>> from hypothesis import given, strategies as st
    >>> from skydiff.testing.strategies import stamps
    >>> @given(stamps(size=st.just(21)))
    ... def test_centred(stamp):
    ...     assert stamp.exposure.shape == (21, 21)
    ...     assert abs(stamp.x[0] - 10) <= 0.5 and abs(stamp.y[0] - 10) <= 0.5
    >>> test_centred()
    """
    for name, value in (("size", size), ("psf", psf), ("flux", flux), ("offset", offset),
                        ("noise", noise)):
        _require_strategy(name, value)
    return _draw_stamp(size, psf, flux, offset, noise)
