r"""Point-spread-function models.

Every PSF satisfies the :class:`Psf` protocol: :meth:`~Psf.kernel_image` returns the PSF at a
position as an odd-sized square ``float64`` image with unit sum, centred on its central pixel
(the pixel-convolved, "effective" PSF that a point source leaves in the image);
:meth:`~Psf.fwhm` its full width at half maximum in pixels; and
:attr:`~Psf.average_position` the position used when none is given.

Positions are *parent-pixel coordinates* ``(x, y)`` = (column, row) of the exposure's parent
frame, the frame of :attr:`skydiff.exposure.Exposure.origin`; a cut-out keeps its PSF.

Built-in models:

* :class:`GaussianPsf` — a circular Gaussian, the same everywhere;
* :class:`ImagePsf` — a fixed image;
* :class:`PolynomialPsf` — a spatially varying pixel basis with polynomial coefficients, the
  PSFEx model (Bertin 2011); :meth:`PolynomialPsf.from_psfex` reads PSFEx files.

References
----------
.. [1] Bertin, E. 2011, ASP Conf. Ser. 442, 435, "Automated Morphometry with SExtractor and
   PSFEx".
.. [2] Bernstein, G. M. & Jarvis, M. 2002, AJ 123, 583 (adaptive moments).
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np
from numpy.typing import ArrayLike

from skydiff.errors import InputError
from skydiff.kernel import (
    SpatialKind,
    _check_bbox,
    _check_kind,
    _check_order,
    _FrozenArrays,
    chebyshev_terms,
    n_spatial_terms,
    spatial_functions,
)

__all__ = [
    "FWHM_PER_SIGMA",
    "GaussianPsf",
    "ImagePsf",
    "PolynomialPsf",
    "Psf",
    "psf_fwhm_from_image",
    "psf_moments",
]

#: :math:`2\sqrt{2\ln 2}`, the FWHM of a Gaussian in units of its standard deviation.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@runtime_checkable
class Psf(Protocol):
    """The interface of every PSF model.

    Implementations must be immutable, picklable and safe to share between threads.
    """

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The PSF image at ``(x, y)`` (parent pixels; default :attr:`average_position`).

        Returns
        -------
        ndarray of shape (S, S)
            ``float64``, ``S`` odd, unit sum, centred on pixel ``[S // 2, S // 2]``.
        """
        ...

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """The full width at half maximum at ``(x, y)``, in pixels."""
        ...

    @property
    def average_position(self) -> tuple[float, float]:
        """The default position ``(x, y)`` of :meth:`kernel_image` and :meth:`fwhm`."""
        ...


# ------------------------------------------------------------------------------------------
# moments


def psf_moments(image: ArrayLike, *, max_iter: int = 200, tol: float = 1e-10
                ) -> tuple[float, float, float]:
    r"""Adaptive (Gaussian-weighted) centroid and size of a PSF image.

    Iterates a circular Gaussian weight
    :math:`w(\mathbf r) = \exp(-|\mathbf r - \mathbf c|^2 / 2\sigma_w^2)` to the fixed point

    .. math::

        \mathbf c = \frac{\sum w I\,\mathbf r}{\sum w I}, \qquad
        \sigma_w^2 = I_{xx} + I_{yy}, \qquad
        I_{xx} = \frac{\sum w I\,(x - c_x)^2}{\sum w I}, \;
        I_{yy} = \frac{\sum w I\,(y - c_y)^2}{\sum w I}.

    For a circular Gaussian of width :math:`\sigma` the weighted moments are
    :math:`I_{xx} = I_{yy} = \sigma^2\sigma_w^2/(\sigma^2 + \sigma_w^2)`, so the fixed point is
    :math:`\sigma_w = \sigma` exactly; for other profiles it is the width of the best-matching
    Gaussian (Bernstein & Jarvis 2002), which, unlike unweighted moments, ignores noisy or
    negative wings. The iteration contracts by a factor of about two per step.

    Parameters
    ----------
    image : array_like of shape (H, W)
        The PSF image (need not be normalised; must have a positive core).
    max_iter : int, optional
        Maximum number of iterations.
    tol : float, optional
        Relative convergence tolerance on :math:`\sigma_w^2`.

    Returns
    -------
    x, y : float
        Centroid (column, row) in array coordinates.
    sigma : float
        :math:`\sigma_w` in pixels.

    Raises
    ------
    InputError
        If the image is not 2-D, not finite, or has no positive weighted flux.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or img.size == 0:
        msg = f"PSF image must be a non-empty 2-D array, got shape {img.shape}"
        raise InputError(msg)
    if not np.all(np.isfinite(img)):
        msg = "PSF image contains NaN or inf"
        raise InputError(msg)
    rows = np.arange(img.shape[0], dtype=np.float64)
    cols = np.arange(img.shape[1], dtype=np.float64)
    cy = (img.shape[0] - 1) / 2.0
    cx = (img.shape[1] - 1) / 2.0
    max_var = float(max(img.shape)) ** 2
    var = 2.0  # initial weight variance (pixels²); the iteration forgets it geometrically
    for _ in range(max_iter):
        wy = np.exp(-0.5 * (rows - cy) ** 2 / var)
        wx = np.exp(-0.5 * (cols - cx) ** 2 / var)
        weighted = img * wy[:, None] * wx[None, :]
        total = weighted.sum()
        if not total > 0.0:
            msg = "PSF image has no positive flux under its Gaussian-weighted core"
            raise InputError(msg)
        row_profile = weighted.sum(axis=1)
        col_profile = weighted.sum(axis=0)
        cy = float(row_profile @ rows / total)
        cx = float(col_profile @ cols / total)
        iyy = float(row_profile @ (rows - cy) ** 2 / total)
        ixx = float(col_profile @ (cols - cx) ** 2 / total)
        new_var = min(max(ixx + iyy, 1e-6), max_var)
        converged = abs(new_var - var) <= tol * var
        var = new_var
        if converged:
            break
    return cx, cy, math.sqrt(var)


def psf_fwhm_from_image(image: ArrayLike) -> float:
    r"""The FWHM (pixels) of a PSF image from its adaptive second moments.

    .. math::

        \mathrm{FWHM} = 2\sqrt{2\ln 2}\;\sigma_w,

    with :math:`\sigma_w` from :func:`psf_moments`. At the fixed point :math:`\sigma_w^2` is the
    mean intrinsic second moment :math:`(I_{xx} + I_{yy})/2` of the matched Gaussian, so this
    is :math:`2.3548\sqrt{(I_{xx}+I_{yy})/2}` measured robustly. Exact for a circular Gaussian
    sampled at pixel centres with :math:`\sigma \gtrsim 0.8` px.

    Parameters
    ----------
    image : array_like of shape (H, W)
        The PSF image.

    Returns
    -------
    float
        FWHM in pixels.

    Raises
    ------
    InputError
        See :func:`psf_moments`.

    Examples
    --------
    >>> round(psf_fwhm_from_image(GaussianPsf(2.0, size=25).kernel_image()), 5)
    4.70964
    """
    return FWHM_PER_SIGMA * psf_moments(image)[2]


# ------------------------------------------------------------------------------------------
# converters and validators


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _positive_sigma(value: Any) -> float:
    sigma = _to_float(value)
    if not (math.isfinite(sigma) and sigma > 0.0):
        msg = f"sigma must be a positive finite number of pixels, got {value!r}"
        raise InputError(msg)
    return sigma


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        msg = f"expected a number, got {value!r}"
        raise InputError(msg) from exc


def _position(value: Any) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        msg = f"position must be two numbers (x, y), got {value!r}"
        raise InputError(msg) from exc
    if not (math.isfinite(x) and math.isfinite(y)):
        msg = f"position must be finite, got {value!r}"
        raise InputError(msg)
    return x, y


def _gaussian_size(value: Any, instance: Any) -> int:
    if value is None:
        return max(3, 2 * math.ceil(4.0 * instance.sigma) + 1)
    if isinstance(value, bool) or not float(value).is_integer():
        msg = f"GaussianPsf size must be an odd integer ≥ 3, got {value!r}"
        raise InputError(msg)
    size = int(value)
    if size < 3 or size % 2 == 0:
        msg = f"GaussianPsf size must be an odd integer ≥ 3, got {size}; use size={size + 1}"
        raise InputError(msg)
    return size


def _psf_image(value: ArrayLike) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] % 2 == 0:
        msg = (f"a PSF image must be square with an odd size, got shape {array.shape}; pad or "
               "trim it to an odd square centred on the peak")
        raise InputError(msg)
    if not np.all(np.isfinite(array)):
        msg = "PSF image contains NaN or inf; replace them (e.g. with 0) first"
        raise InputError(msg)
    total = array.sum()
    if not total > 0.0:
        msg = f"PSF image must have a positive sum to be normalised, got {total}"
        raise InputError(msg)
    return _readonly(array / total)


def _psf_basis(value: ArrayLike) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    if (array.ndim != 3 or array.shape[0] == 0 or array.shape[1] != array.shape[2]
            or array.shape[1] % 2 == 0):
        msg = (f"PSF basis must have shape (n_basis, S, S) with S odd, got {array.shape}")
        raise InputError(msg)
    if not np.all(np.isfinite(array)):
        msg = "PSF basis contains NaN or inf"
        raise InputError(msg)
    return _readonly(array)


def _psf_coefficients(value: ArrayLike) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    if array.ndim != 2 or not np.all(np.isfinite(array)):
        msg = f"PSF coefficients must be a finite array (n_basis, n_terms), got {array.shape}"
        raise InputError(msg)
    return _readonly(array)


_ARRAY_EQ = attrs.cmp_using(eq=np.array_equal)


# ------------------------------------------------------------------------------------------
# models


@attrs.frozen
class GaussianPsf:
    r"""A circular Gaussian PSF, the same at every position.

    The image is the Gaussian sampled at pixel centres and normalised to unit sum,

    .. math::

        P[r, c] \propto \exp\!\left(-\frac{(r - r_0)^2 + (c - c_0)^2}{2\sigma^2}\right),
        \qquad r_0 = c_0 = \lfloor S/2 \rfloor,

    so that convolving two such PSFs gives (to sampling accuracy) the Gaussian of summed
    variances, the property PSF matching relies on.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels (> 0).
    size : int, optional
        Odd side of the image, at least 3; default :math:`2\lceil 4\sigma\rceil + 1`.

    Raises
    ------
    InputError
        If ``sigma`` is not positive and finite or ``size`` is even or < 3.

    Examples
    --------
    >>> psf = GaussianPsf.from_fwhm(3.0)
    >>> psf.kernel_image().shape, round(psf.fwhm(), 12)
    ((13, 13), 3.0)
    """

    sigma: float = attrs.field(converter=_positive_sigma)
    size: int = attrs.field(default=None, kw_only=True,
                            converter=attrs.Converter(_gaussian_size,  # type: ignore[misc]
                                                      takes_self=True))

    @classmethod
    def from_fwhm(cls, fwhm: float, *, size: int | None = None) -> GaussianPsf:
        r"""The Gaussian PSF of the given FWHM (pixels): :math:`\sigma = \mathrm{FWHM}/2.3548`."""
        return cls(_to_float(fwhm) / FWHM_PER_SIGMA, size=size)

    @property
    def average_position(self) -> tuple[float, float]:
        """``(0.0, 0.0)``: the PSF does not depend on position."""
        return (0.0, 0.0)

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The PSF image (independent of position); a new ``(size, size)`` array."""
        offsets = np.arange(self.size, dtype=np.float64) - self.size // 2
        profile = np.exp(-0.5 * (offsets / self.sigma) ** 2)
        image = np.outer(profile, profile)
        return image / image.sum()

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        r"""The analytic FWHM :math:`2\sqrt{2\ln 2}\,\sigma`."""
        return FWHM_PER_SIGMA * self.sigma


@attrs.frozen
class ImagePsf(_FrozenArrays):
    """A PSF given by one image, the same at every position.

    Parameters
    ----------
    image : array_like of shape (S, S)
        Odd-sized square image, copied and normalised to unit sum (read-only).
    position : tuple of float, optional
        ``(x, y)`` where the image was measured; returned as :attr:`average_position`.

    Raises
    ------
    InputError
        If the image is not an odd square, not finite, or its sum is not positive.

    Examples
    --------
    >>> psf = ImagePsf(GaussianPsf(1.5).kernel_image() * 7.0)
    >>> float(psf.image.sum())
    1.0
    """

    image: np.ndarray = attrs.field(converter=_psf_image, eq=_ARRAY_EQ, hash=False)
    position: tuple[float, float] = attrs.field(default=(0.0, 0.0), kw_only=True,
                                                converter=_position)

    @property
    def average_position(self) -> tuple[float, float]:
        """The ``position`` the image belongs to."""
        return self.position

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """A copy of the (unit-sum) image, whatever the position."""
        return self.image.copy()

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """FWHM from adaptive second moments (:func:`psf_fwhm_from_image`)."""
        return psf_fwhm_from_image(self.image)


@attrs.frozen
class PolynomialPsf(_FrozenArrays):
    r"""A spatially varying PSF: pixel basis images with polynomial coefficients (PSFEx-like).

    .. math::

        P(x, y) = \frac{\sum_i c_i(x, y)\,\beta_i}{\sum_{r,c} \sum_i c_i(x, y)\,\beta_i[r, c]},
        \qquad c_i(x, y) = \sum_t a_{it}\, f_t(x, y),

    where :math:`\beta_i` are the basis images and :math:`f_t` the spatial functions of
    :func:`skydiff.kernel.spatial_functions` over ``bbox`` (terms in the order of
    :func:`skydiff.kernel.chebyshev_terms`).

    Parameters
    ----------
    basis : array_like of shape (n_basis, S, S)
        Basis images, ``S`` odd.
    coefficients : array_like of shape (n_basis, n_terms)
        :math:`a_{it}`, ``n_terms = (order + 1)(order + 2) / 2``.
    order : int
        Total degree of the spatial polynomials.
    bbox : tuple of 4 floats
        ``(x_min, y_min, x_max, y_max)`` in parent pixels, mapped onto :math:`[-1, 1]^2`.
    kind : {"chebyshev", "polynomial"}, optional
        Spatial function family. PSFEx models use ``"polynomial"``.

    Raises
    ------
    InputError
        On inconsistent shapes, non-finite values, even sizes or an empty bbox.

    Examples
    --------
    >>> g1, g2 = GaussianPsf(1.5, size=15), GaussianPsf(2.5, size=15)
    >>> basis = np.stack([g1.kernel_image(), g2.kernel_image() - g1.kernel_image()])
    >>> psf = PolynomialPsf(basis, [[1, 0, 0], [0.5, 0.5, 0]], order=1,
    ...                     bbox=(0, 0, 100, 100))
    >>> psf.fwhm(0, 50) < psf.fwhm(100, 50)
    True
    """

    basis: np.ndarray = attrs.field(converter=_psf_basis, eq=_ARRAY_EQ, hash=False)
    coefficients: np.ndarray = attrs.field(converter=_psf_coefficients, eq=_ARRAY_EQ,
                                           hash=False)
    order: int = attrs.field(kw_only=True, converter=_check_order)
    bbox: tuple[float, float, float, float] = attrs.field(kw_only=True, converter=_check_bbox)
    kind: SpatialKind = attrs.field(default="chebyshev", kw_only=True, converter=_check_kind)

    def __attrs_post_init__(self) -> None:
        expected = (self.basis.shape[0], n_spatial_terms(self.order))
        if self.coefficients.shape != expected:
            msg = (f"PSF coefficients have shape {self.coefficients.shape}, expected "
                   f"(n_basis, n_terms) = {expected} for order {self.order}")
            raise InputError(msg)

    @property
    def average_position(self) -> tuple[float, float]:
        """The centre of ``bbox``."""
        x_min, y_min, x_max, y_max = self.bbox
        return 0.5 * (x_min + x_max), 0.5 * (y_min + y_max)

    @property
    def size(self) -> int:
        """Side ``S`` of the PSF images."""
        return int(self.basis.shape[1])

    def kernel_images(self, xs: ArrayLike, ys: ArrayLike) -> np.ndarray:
        """Unit-sum PSF images at many positions (vectorised).

        Parameters
        ----------
        xs, ys : array_like
            Positions (parent pixels), broadcastable; flattened.

        Returns
        -------
        ndarray of shape (n, S, S)

        Raises
        ------
        InputError
            If the model has a non-positive sum at one of the positions (typically far
            outside ``bbox``).
        """
        values = spatial_functions(xs, ys, order=self.order, bbox=self.bbox, kind=self.kind)
        weights = self.coefficients @ values.reshape(values.shape[0], -1)  # (n_basis, n)
        images = np.einsum("in,irc->nrc", weights, self.basis)
        sums = images.sum(axis=(1, 2))
        if not np.all(sums > 0.0):
            bad = int(np.argmin(sums > 0.0))
            x_bad = np.broadcast_to(np.asarray(xs, dtype=float), values.shape[1:]).ravel()[bad]
            y_bad = np.broadcast_to(np.asarray(ys, dtype=float), values.shape[1:]).ravel()[bad]
            msg = (f"PSF model has a non-positive sum at (x, y) = ({x_bad}, {y_bad}); evaluate "
                   f"it inside its bbox {self.bbox}")
            raise InputError(msg)
        return images / sums[:, None, None]

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The unit-sum PSF image at ``(x, y)`` (default: :attr:`average_position`)."""
        cx, cy = self.average_position
        x = cx if x is None else x
        y = cy if y is None else y
        return self.kernel_images(np.float64(x), np.float64(y))[0]

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """FWHM at ``(x, y)`` from adaptive second moments (:func:`psf_fwhm_from_image`)."""
        return psf_fwhm_from_image(self.kernel_image(x, y))

    @classmethod
    def from_psfex(cls, path: str | os.PathLike[str], *, ccdname: str | None = None
                   ) -> PolynomialPsf:
        r"""Read a PSFEx model (``.psf`` file or legacypipe merged ``-psfex.fits`` table).

        PSFEx (Bertin 2011) stores :math:`n_t = (d+1)(d+2)/2` basis images (``PSF_MASK``)
        and evaluates the PSF at image position :math:`(X, Y)` (1-based FITS pixels, the
        ``X_IMAGE``/``Y_IMAGE`` context) as

        .. math::

            P = \sum_{j=0}^{d}\sum_{i=0}^{d-j} u^i v^j\,\beta_{k(i,j)}, \qquad
            u = \frac{X - \mathrm{POLZERO1}}{\mathrm{POLSCAL1}},\;
            v = \frac{Y - \mathrm{POLZERO2}}{\mathrm{POLSCAL2}},

        with the basis index :math:`k` running over :math:`j` (outer) and :math:`i` (inner)
        loops. The model returned uses ``kind="polynomial"`` with
        ``bbox = (POLZERO1 - 1 ∓ POLSCAL1, POLZERO2 - 1 ∓ POLSCAL2)`` — which reproduces
        :math:`u, v` exactly for 0-based positions :math:`x = X - 1, y = Y - 1` — and
        coefficients that permute the basis into skydiff's term order. Positions are those of
        the image PSFEx ran on (for a cut-out, the parent CCD frame).

        When ``PSF_SAMP`` ≠ 1 (one PSFEx pixel is ``PSF_SAMP`` image pixels) the basis is
        resampled onto the image pixel grid about its centre with cubic splines
        (:func:`scipy.ndimage.map_coordinates`). An even-sized basis (centre at pixel
        ``S/2``) is padded by one row and column of zeros to become odd.

        The keywords ``POLNAXIS``, ``POLNGRP``, ``POLGRPn``, ``POLNAMEn``, ``POLZEROn``,
        ``POLSCALn``, ``POLDEG1``, ``PSF_SAMP`` and ``PSFAXISn`` are read from the header of
        the table holding ``PSF_MASK`` (PSFEx) or, for legacypipe's merged files, from the
        (lower-case) columns of the selected row.

        Parameters
        ----------
        path : str or path-like
            The FITS file.
        ccdname : str, optional
            Row selection for merged files with several CCDs (the ``ccdname`` column).

        Returns
        -------
        PolynomialPsf

        Raises
        ------
        InputError
            If the file cannot be read, has no ``PSF_MASK``, uses context parameters other
            than the image position or several polynomial groups, or the row is ambiguous.

        References
        ----------
        .. [1] Bertin, E., PSFEx documentation, https://psfex.readthedocs.io.
        """
        from astropy.io import fits

        try:
            hdul = fits.open(path, memmap=False)
        except (OSError, ValueError) as exc:
            msg = f"cannot read PSFEx file {os.fspath(path)!r}: {exc}"
            raise InputError(msg) from exc
        with hdul:
            table = next((hdu for hdu in hdul
                          if isinstance(hdu, fits.BinTableHDU) and hdu.columns is not None
                          and "psf_mask" in [n.lower() for n in hdu.columns.names]), None)
            if table is None:
                msg = f"{os.fspath(path)!r} has no binary table with a PSF_MASK column"
                raise InputError(msg)
            return _psfex_from_table(cls, table, ccdname=ccdname, path=os.fspath(path))


def _psfex_from_table(cls: type[PolynomialPsf], table: Any, *, ccdname: str | None,
                      path: str) -> PolynomialPsf:
    """Build a :class:`PolynomialPsf` from the PSFEx binary table ``table``."""
    from scipy import ndimage

    data = table.data
    columns = {name.lower(): name for name in table.columns.names}
    row = 0
    if len(data) != 1:
        if ccdname is None or "ccdname" not in columns:
            msg = (f"{path!r} holds {len(data)} PSF models; choose one with ccdname=... "
                   "(the 'ccdname' column)")
            raise InputError(msg)
        names = [str(v).strip() for v in data[columns["ccdname"]]]
        if ccdname not in names:
            msg = f"ccdname {ccdname!r} not in {path!r}; available: {', '.join(names)}"
            raise InputError(msg)
        row = names.index(ccdname)
    elif ccdname is not None and "ccdname" in columns:
        found = str(data[columns["ccdname"]][0]).strip()
        if found != ccdname:
            msg = f"{path!r} holds the PSF of ccdname {found!r}, not {ccdname!r}"
            raise InputError(msg)

    def get(key: str, default: Any = None) -> Any:
        if key in table.header:
            return table.header[key]
        if key.lower() in columns:
            value = data[columns[key.lower()]][row]
            return value.strip() if isinstance(value, str) else value.item()
        if default is not None:
            return default
        msg = f"PSFEx file {path!r} lacks the {key} keyword"
        raise InputError(msg)

    mask = np.asarray(data[columns["psf_mask"]][row], dtype=np.float64)
    n_context = int(get("POLNAXIS", 0))
    if n_context == 0:
        degree = 0
        zero = (0.0, 0.0)
        scale = (1.0, 1.0)
    else:
        if n_context != 2 or int(get("POLNGRP", 1)) != 1:
            msg = (f"PSFEx file {path!r} uses {n_context} context parameters in "
                   f"{get('POLNGRP', 1)} groups; only (X_IMAGE, Y_IMAGE) in one group is "
                   "supported")
            raise InputError(msg)
        name1 = str(get("POLNAME1")).upper()
        name2 = str(get("POLNAME2")).upper()
        if not (name1.startswith("X") and name1.endswith("IMAGE")
                and name2.startswith("Y") and name2.endswith("IMAGE")):
            msg = (f"PSFEx file {path!r} has context ({name1}, {name2}); only image "
                   "positions (X*_IMAGE, Y*_IMAGE) are supported")
            raise InputError(msg)
        if int(get("POLGRP1", 1)) != 1 or int(get("POLGRP2", 1)) != 1:
            msg = f"PSFEx file {path!r}: both context parameters must be in group 1"
            raise InputError(msg)
        degree = int(get("POLDEG1"))
        zero = (float(get("POLZERO1")), float(get("POLZERO2")))
        scale = (float(get("POLSCAL1")), float(get("POLSCAL2")))
        if not (scale[0] > 0 and scale[1] > 0):
            msg = f"PSFEx file {path!r} has non-positive POLSCAL {scale}"
            raise InputError(msg)
    n_terms = n_spatial_terms(degree)
    if mask.ndim == 2:
        mask = mask[np.newaxis]
    size1 = int(get("PSFAXIS1", mask.shape[-1]))
    size2 = int(get("PSFAXIS2", mask.shape[-2]))
    if mask.size != n_terms * size1 * size2:
        msg = (f"PSFEx file {path!r}: PSF_MASK has {mask.size} values, expected "
               f"{n_terms} x {size2} x {size1} for degree {degree}")
        raise InputError(msg)
    basis = mask.reshape(n_terms, size2, size1)
    if size1 != size2:
        msg = f"PSFEx file {path!r}: non-square PSF images {size1} x {size2} are not supported"
        raise InputError(msg)
    if size1 % 2 == 0:  # PSFEx centres even images on pixel S/2: pad to odd S+1
        basis = np.pad(basis, ((0, 0), (0, 1), (0, 1)))
    sampling = float(get("PSF_SAMP", 1.0))
    if not sampling > 0:
        msg = f"PSFEx file {path!r} has non-positive PSF_SAMP {sampling}"
        raise InputError(msg)
    if abs(sampling - 1.0) > 1e-9:
        center = basis.shape[1] // 2
        half = math.floor(center * sampling + 1e-9)
        offsets = center + np.arange(-half, half + 1, dtype=np.float64) / sampling
        grid_r, grid_c = np.meshgrid(offsets, offsets, indexing="ij")
        basis = np.stack([ndimage.map_coordinates(b, [grid_r, grid_c], order=3,
                                                  mode="constant", cval=0.0)
                          for b in basis])
    # PSFEx basis k belongs to the monomial u^i v^j with j the outer loop, i the inner one.
    psfex_order = [(i, j) for j in range(degree + 1) for i in range(degree + 1 - j)]
    term_index = {term: t for t, term in enumerate(chebyshev_terms(degree))}
    coefficients = np.zeros((n_terms, n_terms))
    for k, term in enumerate(psfex_order):
        coefficients[k, term_index[term]] = 1.0
    bbox = (zero[0] - 1.0 - scale[0], zero[1] - 1.0 - scale[1],
            zero[0] - 1.0 + scale[0], zero[1] - 1.0 + scale[1])
    return cls(basis, coefficients, order=degree, bbox=bbox, kind="polynomial")
