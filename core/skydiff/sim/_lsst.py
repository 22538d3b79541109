r"""A numpy port of lsst.ip.diffim's ``makeTestImage`` test-image generator.

``makeTestImage`` (``ip_diffim/tests/utils.py``) is the generator behind lsst's subtraction
acceptance tests. :func:`make_test_image` reproduces its semantics so those scenarios can be
ported:

* star positions and fluxes come from ``numpy.random.RandomState(seed)`` with the same call
  order (all x, then all y, then all fluxes), so the science (``template_border=0``) and the
  template (``template_border=20``) made with the same ``seed`` contain *the same stars*;
  positions keep ``kernel_size/2 + template_border + 1`` pixels from the edges of the grown
  box, which is what makes them coincide;
* stars are circular Gaussians of standard deviation ``psf_sigma`` sampled at pixel centres
  on a ``kernel_size`` stamp (normalised to unit sum), no Poisson noise, no sky;
* noise is ``RandomState(noise_seed).randn(rows, cols) * noise_level`` with its mean removed;
* the variance plane is :math:`\sqrt{|m|} + \sigma_n^2` with :math:`m` the noiseless model
  (sic, as in lsst; ``variance="exact"`` gives the true :math:`\sigma_n^2`);
* source detection is emulated: ``DETECTED`` marks pixels whose PSF-smoothed value exceeds
  5 times its noise, grown by :math:`\lfloor 2.4\sigma + 0.5 \rfloor` pixels, and ``EDGE``
  marks the border the smoothing kernel (half-width :math:`\lfloor 7\sigma + 0.5\rfloor`)
  cannot cover, like lsst's ``SourceDetectionTask`` defaults;
* an optional Chebyshev background (afw ``Chebyshev1Function2D`` over the image's
  floating-point box) is added after the variance is computed; image and variance are then
  divided by ``calibration`` (and multiplied back for ``apply_calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import astropy.units as u
import attrs
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from skydiff.errors import ConfigError
from skydiff.exposure import Exposure, PhotoCalib
from skydiff.kernel import n_spatial_terms, separable_spatial_functions
from skydiff.mask import MaskPlanes
from skydiff.psf import FWHM_PER_SIGMA, GaussianPsf
from skydiff.sim._pair import _ARRAY_EQ, _TABLE_EQ, _readonly_float32
from skydiff.sim._render import PsfProfile, add_sources

__all__ = ["SyntheticImage", "make_test_image"]

#: lsst ``SourceDetectionTask`` defaults emulated by :func:`make_test_image`.
DETECTION_THRESHOLD = 5.0
N_SIGMA_FOR_KERNEL = 7.0
N_SIGMA_TO_GROW = 2.4
#: The approximate flux error lsst's truth catalogue assigns to every source.
TRUTH_FLUX_ERR = 20.0


@attrs.frozen(kw_only=True)
class SyntheticImage:
    """Result of :func:`make_test_image`.

    Attributes
    ----------
    exposure : Exposure
        The test image with mask (``DETECTED``, ``EDGE``), variance, Gaussian PSF, WCS,
        photometric calibration and filter.
    truth : astropy.table.Table
        Columns ``id``, ``x``, ``y`` (0-based column/row in the image) [pix], ``x_parent``,
        ``y_parent`` (parent coordinates, lsst's ``truth_x``/``truth_y``) [pix], ``flux``
        (lsst ``truth_instFlux``, planted counts) [adu], ``flux_err`` (20, as lsst) [adu],
        ``sigma`` (PSF sigma) [pix].
    model : ndarray, float32, read-only
        Noiseless source image (before background and calibration).
    """

    __test__ = False  # not a pytest test class despite the name of its factory

    exposure: Exposure
    truth: Table = attrs.field(eq=_TABLE_EQ, hash=False, repr=False)
    model: NDArray[np.float32] = attrs.field(
        converter=_readonly_float32, eq=_ARRAY_EQ, hash=False, repr=False
    )


def _check_positive(name: str, value: Any, *, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        msg = f"{name} must be a number, got {value!r}"
        raise ConfigError(msg)
    value = float(value)
    if not math.isfinite(value) or (value <= 0.0 if strict else value < 0.0):
        msg = f"{name} must be {'> 0' if strict else '>= 0'} and finite, got {value!r}"
        raise ConfigError(msg)
    return value


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ConfigError(msg)
    return int(value)


def _explicit(name: str, values: ArrayLike | None, n_src: int) -> NDArray[np.float64] | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size != n_src:
        msg = f"{name} must have length n_src = {n_src}, got {array.size}"
        raise ConfigError(msg)
    return array


def _fake_wcs(origin: tuple[int, int]) -> WCS:
    """lsst's ``makeFakeWcs`` (affine TAN, CRPIX in parent pixels) for local array pixels."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = [0.1, 0.1]
    wcs.wcs.crpix = [123.45 - origin[0] + 1.0, 678.9 - origin[1] + 1.0]
    wcs.wcs.cd = [[5.19513851e-05, -2.81124812e-07], [-3.25186974e-07, -5.19112119e-05]]
    wcs.wcs.set()
    return wcs


def _chebyshev_background(
    coefficients: Sequence[float], shape: tuple[int, int], origin: tuple[int, int]
) -> NDArray[np.float32]:
    """afw ``Chebyshev1Function2D`` over ``Box2D(bbox)`` evaluated at every pixel centre."""
    coeffs = np.asarray(coefficients, dtype=np.float64).ravel()
    order = 0
    while n_spatial_terms(order) < coeffs.size:
        order += 1
    if n_spatial_terms(order) != coeffs.size:
        msg = (
            f"background needs (n+1)(n+2)/2 Chebyshev coefficients (1, 3, 6, 10, ...), got "
            f"{coeffs.size}"
        )
        raise ConfigError(msg)
    rows, cols = shape
    x0, y0 = origin
    bbox = (x0 - 0.5, y0 - 0.5, x0 + cols - 0.5, y0 + rows - 0.5)
    terms, fx, fy = separable_spatial_functions(
        np.arange(cols) + x0, np.arange(rows) + y0, order=order, bbox=bbox
    )
    out = np.zeros(shape, dtype=np.float64)
    for c, (i, j) in zip(coeffs, terms, strict=True):
        out += c * fy[j][:, None] * fx[i][None, :]
    return out.astype(np.float32)


def _detect(
    image: NDArray[np.float32], variance: NDArray[np.float32], sigma: float
) -> tuple[NDArray[np.bool_], int]:
    """Emulated lsst detection: (DETECTED mask, EDGE border width)."""
    half = int(N_SIGMA_FOR_KERNEL * sigma + 0.5)
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    smoothed = ndimage.correlate1d(image.astype(np.float64), kernel, axis=0, mode="constant")
    smoothed = ndimage.correlate1d(smoothed, kernel, axis=1, mode="constant")
    # Exact variance of the smoothed image: V correlated with the squared kernel.
    smooth_var = ndimage.correlate1d(
        variance.astype(np.float64), kernel**2, axis=0, mode="constant"
    )
    smooth_var = ndimage.correlate1d(smooth_var, kernel**2, axis=1, mode="constant")
    detected = smoothed >= DETECTION_THRESHOLD * np.sqrt(np.maximum(smooth_var, 1e-300))
    grow = int(N_SIGMA_TO_GROW * sigma + 0.5)
    if grow > 0 and detected.any():
        yy, xx = np.mgrid[-grow : grow + 1, -grow : grow + 1]
        disk = xx * xx + yy * yy <= grow * grow
        detected = ndimage.binary_dilation(detected, structure=disk)
    return detected, half


def make_test_image(
    *,
    seed: int = 5,
    n_src: int = 20,
    psf_sigma: float = 2.0,
    noise_level: float = 5.0,
    noise_seed: int = 6,
    flux_level: float = 500.0,
    flux_range: float = 2.0,
    kernel_size: int = 32,
    template_border: int = 0,
    background: Sequence[float] | None = None,
    shape: tuple[int, int] = (256, 256),
    origin: tuple[int, int] = (12345, 67890),
    calibration: float = 1.0,
    apply_calibration: bool = False,
    x: ArrayLike | None = None,
    y: ArrayLike | None = None,
    flux: ArrayLike | None = None,
    detect: bool = True,
    clear_edge_mask: bool = False,
    add_mask_planes: Sequence[str] = ("INJECTED", "INJECTED_TEMPLATE"),
    variance: Literal["lsst", "exact"] = "lsst",
    filter: str = "g",
) -> SyntheticImage:
    r"""Make a reproducible PSF-convolved test exposure with lsst ``makeTestImage`` semantics.

    Parameters
    ----------
    seed : int, optional
        Seed of the ``RandomState`` drawing source positions and fluxes (same seed = same
        stars, whatever the noise).
    n_src : int, optional
        Number of sources.
    psf_sigma : float, optional
        Gaussian PSF standard deviation in pixels (lsst's ``psfSize``; *not* a FWHM).
    noise_level : float, optional
        Standard deviation of the white Gaussian noise (>= 0).
    noise_seed : int, optional
        Seed of the noise ``RandomState`` (lsst uses 6 for science, 7 for template).
    flux_level : float, optional
        Minimum source flux; fluxes are uniform in ``[1, flux_range] * flux_level``.
    flux_range : float, optional
        Ratio of the maximum to the minimum flux (>= 1).
    kernel_size : int, optional
        PSF stamp size; stamps are ``2 * (kernel_size // 2) + 1`` pixels, the attached
        :class:`~skydiff.psf.GaussianPsf` has the same size.
    template_border : int, optional
        Grow the image by this many pixels on every side (lsst's ``templateBorderSize``; its
        tests use 20 for templates).
    background : sequence of float, optional
        Chebyshev coefficients (``(n+1)(n+2)/2`` of them, in the order of
        :func:`skydiff.kernel.chebyshev_terms`) of a background added to the image only.
    shape : (int, int), optional
        (rows, cols) before growing by ``template_border``.
    origin : (int, int), optional
        Parent (x0, y0) of pixel [0, 0] before growing.
    calibration : float, optional
        nJy per count; image and variance are divided by it (and by its square).
    apply_calibration : bool, optional
        Return the image calibrated to nJy (photometric calibration then 1 nJy per unit).
    x, y, flux : array_like, optional
        Explicit parent positions and fluxes (each of length ``n_src``) instead of random ones.
    detect : bool, optional
        Emulate lsst source detection to set ``DETECTED`` and ``EDGE`` (see module notes).
    clear_edge_mask : bool, optional
        Do not set ``EDGE`` (lsst's ``clearEdgeMask``).
    add_mask_planes : sequence of str, optional
        Extra mask planes to declare (empty), lsst's ``addMaskPlanes``.
    variance : {"lsst", "exact"}, optional
        ``"lsst"``: :math:`\sqrt{|m|} + \sigma_n^2` as lsst does; ``"exact"``: :math:`\sigma_n^2`.
    filter : str, optional
        Filter name.

    Returns
    -------
    SyntheticImage
        ``exposure``, ``truth`` table and noiseless ``model``.

    Raises
    ------
    ConfigError
        For invalid values or explicit positions/fluxes of the wrong length.

    Notes
    -----
    The image is

    .. math::

        I = \frac{1}{c}\left[\sum_k F_k\,P_\sigma(\mathbf{x} - \mathbf{x}_k)
        + \sigma_n (z - \bar z) + B\right],
        \qquad z \sim \mathcal{N}(0, 1)\ \text{i.i.d.},

    with :math:`P_\sigma` the unit-sum pixel-sampled Gaussian, :math:`B` the background and
    :math:`c` the calibration. Positions reproduce lsst's for the same seed bit for bit
    (legacy ``RandomState`` streams are stable across numpy versions).

    References
    ----------
    .. [1] lsst/ip_diffim, ``tests/utils.py``: ``makeTestImage``.

    Examples
    --------
    >>> sci = make_test_image(psf_sigma=2.4, noise_level=1.0, noise_seed=6)
    >>> tmp = make_test_image(psf_sigma=2.0, noise_level=1.0, noise_seed=7, template_border=20)
    >>> import numpy as np
    >>> bool(np.allclose(sci.truth["x_parent"], tmp.truth["x_parent"]))
    True
    """
    seed = _check_int("seed", seed, 0)
    noise_seed = _check_int("noise_seed", noise_seed, 0)
    n_src = _check_int("n_src", n_src, 0)
    sigma = _check_positive("psf_sigma", psf_sigma)
    noise_level = _check_positive("noise_level", noise_level, strict=False)
    flux_level = _check_positive("flux_level", flux_level)
    flux_range = _check_positive("flux_range", flux_range)
    if flux_range < 1.0:
        msg = f"flux_range must be >= 1, got {flux_range}"
        raise ConfigError(msg)
    kernel_size = _check_int("kernel_size", kernel_size, 3)
    border = _check_int("template_border", template_border, 0)
    calibration = _check_positive("calibration", calibration)
    if variance not in ("lsst", "exact"):
        msg = f"variance must be 'lsst' or 'exact', got {variance!r}"
        raise ConfigError(msg)
    try:
        rows, cols = (int(v) for v in shape)
        x0, y0 = (int(v) for v in origin)
    except (TypeError, ValueError) as exc:
        msg = f"shape and origin must be pairs of integers, got {shape!r} and {origin!r}"
        raise ConfigError(msg) from exc
    rows, cols, x0, y0 = rows + 2 * border, cols + 2 * border, x0 - border, y0 - border
    buffer = kernel_size / 2 + border + 1
    if min(rows, cols) <= 2 * buffer:
        msg = f"shape {shape!r} is too small for kernel_size {kernel_size}; enlarge it"
        raise ConfigError(msg)

    rng = np.random.RandomState(seed)
    xs = _explicit("x", x, n_src)
    ys = _explicit("y", y, n_src)
    fs = _explicit("flux", flux, n_src)
    if xs is None:
        xs = rng.rand(n_src) * (cols - 2 * buffer) + buffer + x0
    if ys is None:
        ys = rng.rand(n_src) * (rows - 2 * buffer) + buffer + y0
    if fs is None:
        fs = (rng.rand(n_src) * (flux_range - 1.0) + 1.0) * flux_level

    half = kernel_size // 2
    model = np.zeros((rows, cols), dtype=np.float32)
    add_sources(
        model,
        xs - x0,
        ys - y0,
        fs,
        np.full(n_src, FWHM_PER_SIGMA * sigma),
        PsfProfile("gaussian"),
        half=half,
        oversample=1,
        integrate=False,
    )

    noise = np.random.RandomState(noise_seed).randn(rows, cols) * noise_level
    noise -= noise.mean()
    if variance == "lsst":
        var = (np.sqrt(np.abs(model.astype(np.float64))) + noise_level**2).astype(np.float32)
    else:
        var = np.full((rows, cols), noise_level**2, dtype=np.float32)
    image = (model + noise).astype(np.float32)

    planes = MaskPlanes.default()
    for name in add_mask_planes:
        planes = planes.with_plane(name)
    mask = np.zeros((rows, cols), dtype=np.uint32)
    if detect:
        detected, edge_width = _detect(image, var, sigma)
        mask[detected] |= np.uint32(planes.value("DETECTED"))
        if not clear_edge_mask and edge_width > 0:
            edge = np.ones((rows, cols), dtype=bool)
            edge[edge_width : rows - edge_width, edge_width : cols - edge_width] = False
            mask[edge] |= np.uint32(planes.value("EDGE"))

    if background is not None:
        image += _chebyshev_background(background, (rows, cols), (x0, y0))
    image /= np.float32(calibration)
    var /= np.float32(calibration**2)
    scale = calibration
    if apply_calibration:
        image *= np.float32(calibration)
        var *= np.float32(calibration**2)
        scale = 1.0

    header = fits.Header()
    header["SIMSEED"] = (int(seed), "makeTestImage source seed")
    header["NOISESED"] = (int(noise_seed), "makeTestImage noise seed")
    header["NOISESD"] = (noise_level, "white noise standard deviation (counts)")
    header["PSFSIGMA"] = (sigma, "[pix] Gaussian PSF sigma")
    exposure = Exposure(
        image=image,
        mask=mask,
        variance=var,
        mask_planes=planes,
        psf=GaussianPsf(sigma, size=2 * half + 1),
        wcs=_fake_wcs((x0, y0)),
        photo_calib=PhotoCalib(scale=scale),
        filter=filter,
        origin=(x0, y0),
        metadata=header,
    )
    truth = Table()
    truth["id"] = np.arange(n_src, dtype=np.int64)
    truth["x"] = (xs - x0) * u.pix
    truth["y"] = (ys - y0) * u.pix
    truth["x_parent"] = xs * u.pix
    truth["y_parent"] = ys * u.pix
    truth["flux"] = fs * u.adu
    truth["flux_err"] = np.full(n_src, TRUTH_FLUX_ERR) * u.adu
    truth["sigma"] = np.full(n_src, sigma) * u.pix
    return SyntheticImage(exposure=exposure, truth=truth, model=model)
