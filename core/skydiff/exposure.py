r"""The exposure: an image with its mask, variance, PSF, WCS, calibration and visit metadata.

:class:`Exposure` is an immutable value (a frozen :mod:`attrs` class). Its arrays are
read-only copies of what it was built from — ``float32`` image and variance, ``uint32`` mask
bit planes named by a :class:`~skydiff.mask.MaskPlanes` dictionary — so algorithms cannot
modify their inputs; they return new exposures with :meth:`Exposure.evolve`.

Pixel ``[row, col]`` of an exposure sits at parent-pixel position ``(x, y) = (col + x0,
row + y0)``, with ``(x0, y0)`` = :attr:`Exposure.origin`; PSF models and spatially varying
kernels are evaluated in that parent frame, so cut-outs keep them valid.

Also here: :class:`PhotoCalib` (flux scale / AB zero point), :class:`VisitInfo`,
:func:`estimate_variance` and :func:`robust_sigma`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
from astropy.io import fits
from astropy.io.registry import UnifiedReadWriteMethod
from astropy.time import Time
from astropy.wcs import WCS
from numpy.typing import ArrayLike

from skydiff.errors import InputError
from skydiff.io._unified import ExposureRead, ExposureWrite
from skydiff.kernel import _FrozenArrays
from skydiff.mask import MaskPlanes
from skydiff.psf import ImagePsf, Psf

__all__ = [
    "AB_ZERO_POINT_NJY",
    "MAD_TO_SIGMA",
    "Exposure",
    "PhotoCalib",
    "VisitInfo",
    "estimate_variance",
    "robust_sigma",
]

#: AB magnitude of a flux of 1 nJy: :math:`m = -2.5 \log_{10}(f / 3631\,\mathrm{Jy})`.
AB_ZERO_POINT_NJY = 31.4

#: 1 / Φ⁻¹(3/4): converts a median absolute deviation to a Gaussian standard deviation.
MAD_TO_SIGMA = 1.4826

_BACKGROUND_BOX = 32


# ------------------------------------------------------------------------------------------
# statistics


def robust_sigma(values: ArrayLike) -> float:
    r"""Robust standard deviation: :math:`1.4826 \cdot \mathrm{median}(|v - \mathrm{median}(v)|)`.

    Non-finite values (NaN, ±inf) are ignored.

    Parameters
    ----------
    values : array_like
        Any shape.

    Returns
    -------
    float
        The scaled median absolute deviation (exact σ for Gaussian data in the large-sample
        limit; insensitive to up to half the values being outliers).

    Raises
    ------
    InputError
        If there is no finite value.

    Examples
    --------
    >>> robust_sigma([1.0, 2.0, 3.0, np.nan, 1e9])
    1.4826
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    array = array[np.isfinite(array)]
    if array.size == 0:
        msg = "robust_sigma needs at least one finite value"
        raise InputError(msg)
    median = np.median(array)
    return float(MAD_TO_SIGMA * np.median(np.abs(array - median)))


def _block_background(image: np.ndarray, valid: np.ndarray, box: int) -> np.ndarray:
    """Piecewise-constant background: the median of the valid pixels of each box × box block."""
    height, width = image.shape
    n_r, n_c = -(-height // box), -(-width // box)
    padded = np.full((n_r * box, n_c * box), np.nan)
    padded[:height, :width] = np.where(valid, image, np.nan)
    blocks = padded.reshape(n_r, box, n_c, box).transpose(0, 2, 1, 3).reshape(n_r, n_c, -1)
    counts = np.isfinite(blocks).sum(axis=-1)
    empty = counts == 0
    blocks[empty] = 0.0  # avoid all-NaN slices; replaced below
    medians = np.nanmedian(blocks, axis=-1)
    medians[empty] = np.median(image[valid])
    return np.repeat(np.repeat(medians, box, axis=0), box, axis=1)[:height, :width]


def estimate_variance(image: ArrayLike, *, gain: float | None = None,
                      read_noise: float | None = None, mask: ArrayLike | None = None
                      ) -> np.ndarray:
    r"""Estimate a variance plane for an image that has none.

    With a ``gain`` (e⁻/ADU) the image is taken to be in ADU *including the sky* and the
    variance is Poisson plus read noise,

    .. math::

        V = \frac{\max(I, 0)}{g} + \left(\frac{\sigma_\mathrm{read}}{g}\right)^2,

    with :math:`\sigma_\mathrm{read}` in electrons (default 0). Without a gain the variance is
    the constant sky noise :math:`\hat\sigma^2`, with :math:`\hat\sigma` the
    :func:`robust_sigma` of the image minus a piecewise-constant background (medians of
    32 × 32-pixel blocks) over the finite, unmasked pixels; sources then make the true
    variance higher than the estimate near them.

    Non-finite pixels get the median of the other pixels' variance, so downstream arithmetic
    stays finite (callers flag them ``NO_DATA``).

    Parameters
    ----------
    image : array_like of shape (H, W)
        The image (ADU when ``gain`` is given).
    gain : float, optional
        Electrons per ADU, > 0.
    read_noise : float, optional
        Read noise in electrons, ≥ 0 (used only with ``gain``).
    mask : array_like of shape (H, W), optional
        Non-zero (or True) pixels are excluded from the sky-noise estimate.

    Returns
    -------
    ndarray of shape (H, W), float32
        The variance, ≥ 0.

    Raises
    ------
    InputError
        If the image is not 2-D, ``gain`` ≤ 0, ``read_noise`` < 0, ``mask`` has another shape,
        or no finite unmasked pixel is left.

    Examples
    --------
    >>> v = estimate_variance(np.full((4, 4), 400.0), gain=4.0, read_noise=8.0)
    >>> float(v[0, 0])
    104.0
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        msg = f"image must be a non-empty 2-D array, got shape {array.shape}"
        raise InputError(msg)
    finite = np.isfinite(array)
    if not finite.any():
        msg = "cannot estimate a variance: the image has no finite pixel"
        raise InputError(msg)
    if gain is not None:
        gain = float(gain)
        read_noise = 0.0 if read_noise is None else float(read_noise)
        if not (math.isfinite(gain) and gain > 0):
            msg = f"gain must be a positive number of electrons per ADU, got {gain}"
            raise InputError(msg)
        if not (math.isfinite(read_noise) and read_noise >= 0):
            msg = f"read_noise must be a non-negative number of electrons, got {read_noise}"
            raise InputError(msg)
        variance = np.maximum(np.where(finite, array, 0.0), 0.0) / gain + (read_noise / gain) ** 2
        if not finite.all():
            variance[~finite] = np.median(variance[finite])
        return variance.astype(np.float32)
    valid = finite
    if mask is not None:
        mask_array = np.asarray(mask)
        if mask_array.shape != array.shape:
            msg = f"mask shape {mask_array.shape} differs from the image shape {array.shape}"
            raise InputError(msg)
        valid = valid & (mask_array == 0)
    if not valid.any():
        msg = "cannot estimate the sky noise: every pixel is masked or non-finite"
        raise InputError(msg)
    background = _block_background(array, valid, _BACKGROUND_BOX)
    sigma = robust_sigma((array - background)[valid])
    return np.full(array.shape, sigma**2, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# calibration and visit metadata


def _optional_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        result = float(value)
    except (TypeError, ValueError) as exc:
        msg = f"expected a number or None, got {value!r}"
        raise InputError(msg) from exc
    if not math.isfinite(result):
        msg = f"expected a finite number, got {value!r}"
        raise InputError(msg)
    return result


def _to_float(value: Any) -> float:
    result = _optional_float(value)
    if result is None:
        msg = "expected a number, got None"
        raise InputError(msg)
    return result


@attrs.frozen
class PhotoCalib:
    r"""Photometric calibration: one image unit (count) is ``scale`` nJy.

    The AB zero point (magnitude of one count) is
    :math:`m_0 = 31.4 - 2.5 \log_{10}(\mathrm{scale})`.

    Parameters
    ----------
    scale : float, optional
        nJy per image unit, > 0.
    scale_err : float, optional
        Its 1-σ uncertainty, ≥ 0.

    Raises
    ------
    InputError
        If ``scale`` ≤ 0 or ``scale_err`` < 0.

    Examples
    --------
    >>> PhotoCalib.from_zero_point(31.4).scale
    1.0
    >>> round(PhotoCalib(scale=0.5).zero_point, 4)
    32.1526
    """

    scale: float = attrs.field(default=1.0, converter=_to_float)
    scale_err: float = attrs.field(default=0.0, converter=_to_float)

    @scale.validator
    def _check_scale(self, attribute: Any, value: float) -> None:
        if not value > 0:
            msg = f"PhotoCalib scale must be > 0 nJy per count, got {value}"
            raise InputError(msg)

    @scale_err.validator
    def _check_scale_err(self, attribute: Any, value: float) -> None:
        if value < 0:
            msg = f"PhotoCalib scale_err must be ≥ 0, got {value}"
            raise InputError(msg)

    @property
    def zero_point(self) -> float:
        """AB magnitude of one image unit."""
        return AB_ZERO_POINT_NJY - 2.5 * math.log10(self.scale)

    @property
    def zero_point_err(self) -> float:
        r"""Uncertainty of :attr:`zero_point`: :math:`(2.5/\ln 10)\,\sigma_s/s`."""
        return 2.5 / math.log(10.0) * self.scale_err / self.scale

    @classmethod
    def from_zero_point(cls, zp: float, zp_err: float = 0.0) -> PhotoCalib:
        r"""The calibration with AB zero point ``zp``: :math:`s = 10^{(31.4 - zp)/2.5}`."""
        zp = _to_float(zp)
        scale = 10.0 ** ((AB_ZERO_POINT_NJY - zp) / 2.5)
        return cls(scale=scale, scale_err=scale * math.log(10.0) / 2.5 * _to_float(zp_err))

    def to_nanojansky(self, counts: ArrayLike) -> np.ndarray | float:
        """Convert image units to nJy."""
        result = np.asarray(counts, dtype=np.float64) * self.scale
        return float(result) if result.ndim == 0 else result

    def to_magnitude(self, counts: ArrayLike) -> np.ndarray | float:
        """Convert image units to AB magnitudes (NaN for non-positive values)."""
        values = np.asarray(counts, dtype=np.float64)
        positive = values > 0
        mags = np.where(positive, self.zero_point - 2.5 * np.log10(np.where(positive, values, 1.0)),
                        np.nan)
        return float(mags) if mags.ndim == 0 else mags


def _to_time(value: Any) -> Time | None:
    if value is None or isinstance(value, Time):
        if value is not None and not value.isscalar:
            msg = "VisitInfo date must be a scalar Time"
            raise InputError(msg)
        return value
    try:
        return Time(value)
    except (TypeError, ValueError) as exc:
        msg = f"cannot interpret {value!r} as a date; pass an astropy Time"
        raise InputError(msg) from exc


def _time_key(value: Time | None) -> str | None:
    return None if value is None else value.isot


def _non_negative(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None and value < 0:
        msg = f"{attribute.name} must be ≥ 0, got {value}"
        raise InputError(msg)


def _positive(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None and not value > 0:
        msg = f"{attribute.name} must be > 0, got {value}"
        raise InputError(msg)


@attrs.frozen
class VisitInfo:
    """When and how an exposure was taken.

    Parameters
    ----------
    date : astropy.time.Time or str, optional
        Start of the exposure (anything :class:`~astropy.time.Time` accepts). Equality and
        hashing compare its ISO string (``Time.isot``).
    exposure_time : float, optional
        Seconds, ≥ 0.
    airmass : float, optional
        > 0.
    parallactic_angle : float, optional
        Degrees.
    """

    date: Time | None = attrs.field(default=None, converter=_to_time, eq=_time_key)
    exposure_time: float | None = attrs.field(default=None, converter=_optional_float,
                                              validator=_non_negative)
    airmass: float | None = attrs.field(default=None, converter=_optional_float,
                                        validator=_positive)
    parallactic_angle: float | None = attrs.field(default=None, converter=_optional_float)


# ------------------------------------------------------------------------------------------
# exposure converters


def _frozen_array(value: Any, dtype: type[np.generic], name: str) -> np.ndarray:
    """A read-only ``dtype`` array: the input itself if it is already a frozen owned array."""
    if (isinstance(value, np.ndarray) and value.dtype == dtype and not value.flags.writeable
            and value.flags.owndata and value.flags.c_contiguous):
        array = value
    else:
        try:
            array = np.array(value, dtype=dtype, copy=True, order="C")
        except (TypeError, ValueError) as exc:
            msg = f"{name} must be a numeric 2-D array: {exc}"
            raise InputError(msg) from exc
        array.setflags(write=False)
    if array.ndim != 2 or array.size == 0:
        msg = f"{name} must be a non-empty 2-D array, got shape {array.shape}"
        raise InputError(msg)
    return array


def _to_image(value: ArrayLike) -> np.ndarray:
    return _frozen_array(value, np.float32, "image")


def _to_mask(value: ArrayLike | None, instance: Any) -> np.ndarray:
    if value is None:
        array = np.zeros(instance.image.shape, dtype=np.uint32)
        array.setflags(write=False)
        return array
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint32):
        raw = np.asarray(value)
        if raw.dtype == bool:
            msg = ("mask must hold integer bit planes, got a boolean array; use "
                   "Exposure.from_arrays(..., mask=bool_array) to flag those pixels BAD")
            raise InputError(msg)
        if not np.issubdtype(raw.dtype, np.integer):
            msg = f"mask must hold integer bit planes, got dtype {raw.dtype}"
            raise InputError(msg)
        if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.uint32).max):
            msg = "mask values must lie in 0..2**32-1 (uint32 bit planes)"
            raise InputError(msg)
    return _frozen_array(value, np.uint32, "mask")


def _to_variance(value: ArrayLike | None) -> np.ndarray:
    if value is None:
        msg = ("an Exposure needs a variance plane; build it with Exposure.from_arrays(...) to "
               "estimate one (from gain/read_noise or the sky noise)")
        raise InputError(msg)
    return _frozen_array(value, np.float32, "variance")


def _to_origin(value: Any) -> tuple[int, int]:
    try:
        x0, y0 = value
        if float(x0) != int(x0) or float(y0) != int(y0):
            raise ValueError
    except (TypeError, ValueError) as exc:
        msg = f"origin must be two integers (x0, y0), got {value!r}"
        raise InputError(msg) from exc
    return int(x0), int(y0)


def _to_header(value: Any) -> fits.Header:
    if value is None:
        return fits.Header()
    if isinstance(value, fits.Header):
        return value.copy()
    if isinstance(value, Mapping):
        header = fits.Header()
        for key, item in value.items():
            header[key] = item
        return header
    msg = f"metadata must be an astropy.io.fits.Header or a mapping, got {type(value).__name__}"
    raise InputError(msg)


def _to_wcs(value: Any) -> WCS | None:
    if value is None:
        return None
    if not isinstance(value, WCS):
        msg = f"wcs must be an astropy.wcs.WCS or None, got {type(value).__name__}"
        raise InputError(msg)
    return value.deepcopy()


def _wcs_key(value: WCS | None) -> str | None:
    return None if value is None else value.to_header_string(relax=True)


def _header_key(value: fits.Header) -> str:
    return str(value)


def _to_filter(value: Any) -> str | None:
    return None if value is None else str(value)


def _instance_or_none(kind: type | tuple[type, ...], label: str) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and not isinstance(value, kind):
            msg = f"{attribute.name} must be a {label} or None, got {type(value).__name__}"
            raise InputError(msg)
    return check


def _array_repr(value: np.ndarray) -> str:
    return f"<{value.dtype} array {value.shape}>"


_EQ = attrs.cmp_using(eq=np.array_equal)
_EQ_NAN = attrs.cmp_using(eq=lambda a, b: bool(np.array_equal(a, b, equal_nan=True)))


# ------------------------------------------------------------------------------------------
# exposure


@attrs.frozen
class Exposure(_FrozenArrays):
    r"""An image with its mask, variance and metadata; immutable.

    Parameters
    ----------
    image : array_like of shape (H, W)
        Pixel values, stored as a read-only ``float32`` copy.
    mask : array_like of shape (H, W), optional
        Integer bit planes, stored as read-only ``uint32`` (default all zero). Every set bit
        must be named in ``mask_planes``.
    variance : array_like of shape (H, W)
        Per-pixel variance, read-only ``float32``; required, ≥ 0 where finite. Use
        :meth:`from_arrays` to estimate one.
    mask_planes : MaskPlanes, optional
        Names of the mask bits (default :meth:`MaskPlanes.default`).
    psf : Psf, optional
        PSF model, evaluated in parent-pixel coordinates.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of this array (copied). Equality compares the header strings.
    photo_calib : PhotoCalib, optional
    filter : str, optional
    visit_info : VisitInfo, optional
    origin : tuple of int, optional
        ``(x0, y0)``: parent-frame column and row of pixel ``[0, 0]``.
    metadata : astropy.io.fits.Header or mapping, optional
        Other header cards (copied). Equality compares ``str(header)``.

    Raises
    ------
    InputError
        If an array is not 2-D, shapes differ, the variance is negative somewhere, the mask
        is boolean/negative/uses unnamed bits, or a metadata field has the wrong type.

    Notes
    -----
    Arrays are copied on construction, never aliased, so the caller's arrays are never
    modified through an exposure. The one exception avoids needless copies on
    :meth:`evolve`: an array that is already read-only, owns its memory and has the right
    dtype (such as another exposure's plane) is shared as is.

    Examples
    --------
    >>> exp = Exposure(np.zeros((4, 5)), variance=np.ones((4, 5)), origin=(10, 20))
    >>> exp.shape, exp.bbox
    ((4, 5), (10, 20, 15, 24))
    >>> exp.image.flags.writeable
    False
    """

    image: np.ndarray = attrs.field(converter=_to_image, eq=_EQ_NAN, hash=False, repr=_array_repr)
    mask: np.ndarray = attrs.field(default=None, eq=_EQ, hash=False, repr=_array_repr,
                                   converter=attrs.Converter(_to_mask,  # type: ignore[misc]
                                                             takes_self=True))
    variance: np.ndarray = attrs.field(default=None, converter=_to_variance, eq=_EQ_NAN,
                                       hash=False, repr=_array_repr)
    mask_planes: MaskPlanes = attrs.field(factory=MaskPlanes.default, kw_only=True,
                                          validator=attrs.validators.instance_of(MaskPlanes))
    psf: Psf | None = attrs.field(default=None, kw_only=True,
                                  validator=_instance_or_none(Psf, "Psf"))
    wcs: WCS | None = attrs.field(default=None, kw_only=True, converter=_to_wcs, eq=_wcs_key,
                                  hash=False)
    photo_calib: PhotoCalib | None = attrs.field(
        default=None, kw_only=True, validator=_instance_or_none(PhotoCalib, "PhotoCalib"))
    filter: str | None = attrs.field(default=None, kw_only=True, converter=_to_filter)
    visit_info: VisitInfo | None = attrs.field(
        default=None, kw_only=True, validator=_instance_or_none(VisitInfo, "VisitInfo"))
    origin: tuple[int, int] = attrs.field(default=(0, 0), kw_only=True, converter=_to_origin)
    metadata: fits.Header = attrs.field(factory=fits.Header, kw_only=True, converter=_to_header,
                                        eq=_header_key, hash=False, repr=False)

    #: ``Exposure.read(path, format=None, **kwargs)``: read from a file (see :mod:`skydiff.io`).
    read = UnifiedReadWriteMethod(ExposureRead)
    #: ``exposure.write(path, overwrite=False, **kwargs)``: write to a file.
    write = UnifiedReadWriteMethod(ExposureWrite)

    def __attrs_post_init__(self) -> None:
        shape = self.image.shape
        for name in ("mask", "variance"):
            other = getattr(self, name).shape
            if other != shape:
                msg = f"{name} shape {other} differs from the image shape {shape}"
                raise InputError(msg)
        variance = self.variance
        # fmin ignores NaN (one pass, no temporary); an all-NaN plane gives NaN, not < 0
        if np.fmin.reduce(variance, axis=None) < 0:
            msg = (f"variance has {int(np.count_nonzero(variance < 0))} negative pixels; a "
                   "variance must be ≥ 0")
            raise InputError(msg)
        used = int(np.bitwise_or.reduce(self.mask, axis=None))
        named = self.mask_planes.value(*self.mask_planes.names)
        if used & ~named:
            unnamed = [bit for bit in range(32) if (used & ~named) >> bit & 1]
            msg = (f"mask uses bits {unnamed} that mask_planes does not name; add planes for "
                   "them (MaskPlanes.with_plane) or clear them")
            raise InputError(msg)

    # -- properties --------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.image.shape

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x0 + W, y0 + H)`` in parent pixels, half-open."""
        x0, y0 = self.origin
        height, width = self.shape
        return (x0, y0, x0 + width, y0 + height)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The pixel type of the image (``float32``)."""
        return self.image.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the image, mask and variance planes."""
        return int(self.image.nbytes + self.mask.nbytes + self.variance.nbytes)

    # -- derived exposures -------------------------------------------------------------

    def evolve(self, **changes: Any) -> Exposure:
        """A copy with some fields replaced (:func:`attrs.evolve`); validators run again."""
        return attrs.evolve(self, **changes)

    def masked(self, *planes: str) -> np.ndarray:
        """Boolean image of the pixels with any of ``planes`` set (any plane if none given).

        Raises
        ------
        InputError
            If a plane name is unknown.
        """
        names = planes or self.mask_planes.names
        return (self.mask & np.uint32(self.mask_planes.value(*names))) != 0

    def with_mask(self, plane: str, where: ArrayLike) -> Exposure:
        """A copy with the bit of ``plane`` OR-ed into the pixels where ``where`` is True.

        The plane is added to :attr:`mask_planes` if new.

        Raises
        ------
        InputError
            If ``where`` is not a boolean array of the exposure's shape, or no bit is free.
        """
        flags = np.asarray(where)
        if flags.dtype != bool or flags.shape != self.shape:
            msg = (f"where must be a boolean array of shape {self.shape}, got {flags.dtype} "
                   f"{flags.shape}")
            raise InputError(msg)
        planes = self.mask_planes.with_plane(plane)
        mask = self.mask | (flags.astype(np.uint32) << np.uint32(planes.bit(plane)))
        return self.evolve(mask=mask, mask_planes=planes)

    def cutout(self, row_slice: slice, col_slice: slice) -> Exposure:
        """A sub-image (a copy) with its origin and WCS updated.

        Parameters
        ----------
        row_slice, col_slice : slice
            Contiguous slices (step 1) in array coordinates of this exposure; negative and
            out-of-range bounds are clipped as in NumPy.

        Raises
        ------
        InputError
            If a slice has a step other than 1 or selects nothing.
        """
        bounds = []
        for name, item, size in (("row_slice", row_slice, self.shape[0]),
                                 ("col_slice", col_slice, self.shape[1])):
            if not isinstance(item, slice):
                msg = f"{name} must be a slice, got {type(item).__name__}"
                raise InputError(msg)
            start, stop, step = item.indices(size)
            if step != 1 or stop <= start:
                msg = f"{name} {item} must be a non-empty slice with step 1"
                raise InputError(msg)
            bounds.append(slice(start, stop))
        rows, cols = bounds
        wcs = None if self.wcs is None else self.wcs.slice((rows, cols))
        x0, y0 = self.origin
        return self.evolve(image=self.image[rows, cols], mask=self.mask[rows, cols],
                           variance=self.variance[rows, cols], wcs=wcs,
                           origin=(x0 + cols.start, y0 + rows.start))

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, image: ArrayLike, *, variance: ArrayLike | None = None,
                    mask: ArrayLike | None = None, mask_planes: MaskPlanes | None = None,
                    psf: Psf | None = None, wcs: WCS | None = None,
                    photo_calib: PhotoCalib | None = None, filter: str | None = None,
                    visit_info: VisitInfo | None = None, origin: tuple[int, int] = (0, 0),
                    metadata: fits.Header | Mapping[str, Any] | None = None,
                    gain: float | None = None, read_noise: float | None = None) -> Exposure:
        """Build an exposure from plain arrays, cleaning non-finite pixels and estimating variance.

        * Non-finite image pixels become 0.0 and get the ``NO_DATA`` plane.
        * A boolean ``mask`` flags ``BAD``; an integer mask is taken as bit planes (named by
          ``mask_planes``).
        * Without ``variance``, :func:`estimate_variance` provides one (Poisson + read noise
          with ``gain``, else the sky noise), ignoring masked pixels.
        * Non-finite variance pixels get ``NO_DATA``; every ``NO_DATA`` pixel gets the median
          variance of the others, so downstream arithmetic stays finite.

        Parameters
        ----------
        image : array_like of shape (H, W)
        variance, mask : array_like of shape (H, W), optional
        mask_planes, psf, wcs, photo_calib, filter, visit_info, origin, metadata
            As for :class:`Exposure`.
        gain : float, optional
            e⁻/ADU, for the variance estimate.
        read_noise : float, optional
            e⁻, for the variance estimate.

        Returns
        -------
        Exposure

        Raises
        ------
        InputError
            On inconsistent shapes, a negative variance, or when no pixel is usable.
        """
        array = np.asarray(image, dtype=np.float64)
        if array.ndim != 2 or array.size == 0:
            msg = f"image must be a non-empty 2-D array, got shape {array.shape}"
            raise InputError(msg)
        planes = (mask_planes or MaskPlanes.default()).with_plane("NO_DATA").with_plane("BAD")
        if mask is None:
            bits = np.zeros(array.shape, dtype=np.uint32)
        else:
            raw = np.asarray(mask)
            if raw.shape != array.shape:
                msg = f"mask shape {raw.shape} differs from the image shape {array.shape}"
                raise InputError(msg)
            if raw.dtype == bool:
                bits = raw.astype(np.uint32) << np.uint32(planes.bit("BAD"))
            else:
                bits = _to_mask(raw, None).copy()
        no_data = ~np.isfinite(array)
        clean = np.where(no_data, 0.0, array)
        if variance is None:
            var = estimate_variance(np.where(no_data, np.nan, array), gain=gain,
                                    read_noise=read_noise, mask=bits)
        else:
            var = np.array(variance, dtype=np.float32, copy=True)
            if var.shape != array.shape:
                msg = f"variance shape {var.shape} differs from the image shape {array.shape}"
                raise InputError(msg)
            no_data |= ~np.isfinite(var)
        good = ~no_data
        if no_data.any():
            if not good.any():
                msg = "no pixel has a finite image and variance value"
                raise InputError(msg)
            var = np.where(no_data, np.median(var[good]), var).astype(np.float32)
            bits |= no_data.astype(np.uint32) << np.uint32(planes.bit("NO_DATA"))
        return cls(clean.astype(np.float32), bits, var, mask_planes=planes, psf=psf, wcs=wcs,
                   photo_calib=photo_calib, filter=filter, visit_info=visit_info,
                   origin=origin, metadata=metadata)

    # -- astropy.nddata interoperability -----------------------------------------------

    def _meta_extras(self) -> dict[str, Any]:
        return {"mask_planes": self.mask_planes, "psf": self.psf,
                "photo_calib": self.photo_calib, "filter": self.filter,
                "visit_info": self.visit_info, "origin": self.origin}

    def to_nddata(self) -> Any:
        """Convert to :class:`astropy.nddata.NDData` without loss.

        ``data`` is the image, ``uncertainty`` a
        :class:`~astropy.nddata.VarianceUncertainty`, ``mask`` the ``uint32`` bit planes,
        ``wcs`` a copy of the WCS, ``psf`` the PSF image at its average position, and
        ``meta = {"header": metadata, "skydiff": {...}}`` where ``"skydiff"`` holds the mask
        planes, PSF model, calibration, filter, visit info and origin. The arrays are the
        exposure's read-only arrays (not copies).

        Returns
        -------
        astropy.nddata.NDData
        """
        from astropy.nddata import NDData, VarianceUncertainty

        return NDData(self.image, uncertainty=VarianceUncertainty(self.variance),
                      mask=self.mask, wcs=None if self.wcs is None else self.wcs.deepcopy(),
                      meta={"header": self.metadata.copy(), "skydiff": self._meta_extras()},
                      psf=None if self.psf is None else self.psf.kernel_image())

    def to_ccddata(self, unit: str = "adu") -> Any:
        """Convert to :class:`astropy.nddata.CCDData` that ``CCDData.write`` can store.

        The mask becomes boolean (any plane set) as ``CCDData`` expects; the header
        (``meta``) holds the metadata plus ``FILTER``, ``PHOTSCAL``/``PHOTSERR``,
        ``DATE-OBS``, ``EXPTIME``, ``AIRMASS``, ``PARANGLE``, ``LTV1``/``LTV2`` (= −x0, −y0)
        and the ``MP_<NAME>`` plane keywords; ``psf`` is the PSF image at its average position.

        Parameters
        ----------
        unit : str or astropy.units.Unit, optional
            The image unit (``CCDData`` requires one).

        Returns
        -------
        astropy.nddata.CCDData
        """
        from astropy.nddata import CCDData, VarianceUncertainty

        header = self.metadata.copy()
        for key, value in self.mask_planes.to_header().items():
            header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
        if self.filter is not None:
            header["FILTER"] = self.filter
        if self.photo_calib is not None:
            header["PHOTSCAL"] = (self.photo_calib.scale, "nJy per image unit")
            header["PHOTSERR"] = (self.photo_calib.scale_err, "uncertainty of PHOTSCAL (nJy)")
        if self.visit_info is not None:
            info = self.visit_info
            if info.date is not None:
                header["DATE-OBS"] = info.date.isot
                header["TIMESYS"] = info.date.scale.upper()
            for key, number in (("EXPTIME", info.exposure_time), ("AIRMASS", info.airmass),
                                ("PARANGLE", info.parallactic_angle)):
                if number is not None:
                    header[key] = number
        header["LTV1"] = -self.origin[0]
        header["LTV2"] = -self.origin[1]
        return CCDData(np.array(self.image), unit=unit,
                       uncertainty=VarianceUncertainty(np.array(self.variance)),
                       mask=self.mask != 0, meta=header,
                       wcs=None if self.wcs is None else self.wcs.deepcopy(),
                       psf=None if self.psf is None else self.psf.kernel_image())

    @classmethod
    def from_nddata(cls, nd: Any) -> Exposure:
        """Build an exposure from an :class:`astropy.nddata.NDData` (or ``CCDData``).

        * ``uncertainty``: variance from :class:`~astropy.nddata.VarianceUncertainty`,
          :class:`~astropy.nddata.StdDevUncertainty` (σ²) or
          :class:`~astropy.nddata.InverseVariance` (1/w; w ≤ 0 → ``NO_DATA``); when absent it
          is estimated (:func:`estimate_variance`, sky noise).
        * ``mask``: boolean → ``BAD``; integer → bit planes.
        * ``meta``: the ``"skydiff"`` entry written by :meth:`to_nddata` restores every field
          exactly; otherwise the header (``meta`` itself if it is a FITS header, else
          ``meta["header"]``) provides ``FILTER``, ``PHOTSCAL``/``PHOTSERR`` or ``FLUXMAG0``,
          ``DATE-OBS``/``TIMESYS``, ``EXPTIME``, ``AIRMASS``, ``PARANGLE``, ``LTV1``/``LTV2``
          and ``MP_<NAME>`` planes.
        * ``psf``: an image becomes an :class:`~skydiff.psf.ImagePsf` (unless the
          ``"skydiff"`` entry holds the model).
        * ``unit`` is ignored (an exposure has no unit; :attr:`photo_calib` calibrates it).

        Non-finite pixels are cleaned as in :meth:`from_arrays`.

        Raises
        ------
        InputError
            For an unsupported uncertainty or WCS type, or inconsistent arrays.
        """
        from astropy.nddata import (
            InverseVariance,
            NDData,
            StdDevUncertainty,
            VarianceUncertainty,
        )

        if not isinstance(nd, NDData):
            msg = f"from_nddata needs an astropy NDData, got {type(nd).__name__}"
            raise InputError(msg)
        data = np.asarray(nd.data, dtype=np.float64)
        meta = nd.meta if nd.meta is not None else {}
        extras = meta.get("skydiff") if isinstance(meta, Mapping) else None
        if isinstance(meta, fits.Header):
            header = meta.copy()
        elif isinstance(meta.get("header"), fits.Header):
            header = meta["header"].copy()
        else:
            header = fits.Header()
        if not isinstance(extras, Mapping):
            extras = None

        uncertainty = nd.uncertainty
        variance: np.ndarray | None
        if uncertainty is None:
            variance = None
        else:
            values = np.asarray(uncertainty.array, dtype=np.float64)
            if isinstance(uncertainty, VarianceUncertainty):
                variance = values
            elif isinstance(uncertainty, StdDevUncertainty):
                variance = values**2
            elif isinstance(uncertainty, InverseVariance):
                positive = values > 0
                variance = np.where(positive, 1.0 / np.where(positive, values, 1.0), np.nan)
            else:
                msg = (f"unsupported uncertainty type {type(uncertainty).__name__}; use "
                       "VarianceUncertainty, StdDevUncertainty or InverseVariance")
                raise InputError(msg)

        if extras is not None:
            planes = extras.get("mask_planes") or MaskPlanes.default()
        else:
            planes = MaskPlanes.from_header(header)
        mask = nd.mask
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
                msg = f"NDData mask must be boolean or integer, got dtype {mask.dtype}"
                raise InputError(msg)
        wcs = nd.wcs
        if wcs is not None and not isinstance(wcs, WCS):
            low_level = getattr(wcs, "low_level_wcs", None)
            if isinstance(low_level, WCS):
                wcs = low_level
            else:
                msg = f"only astropy.wcs.WCS is supported, got {type(wcs).__name__}"
                raise InputError(msg)

        if extras is not None:
            psf = extras.get("psf")
            fields = {"photo_calib": extras.get("photo_calib"), "filter": extras.get("filter"),
                      "visit_info": extras.get("visit_info"),
                      "origin": extras.get("origin", (0, 0))}
        else:
            psf = None
            fields = _fields_from_header(header)
        if psf is None and nd.psf is not None:
            psf = ImagePsf(np.asarray(nd.psf, dtype=np.float64))

        return cls.from_arrays(data, variance=variance, mask=mask, mask_planes=planes, psf=psf,
                               wcs=wcs, metadata=header, **fields)

    @classmethod
    def from_ccddata(cls, ccd: Any) -> Exposure:
        """Build an exposure from an :class:`astropy.nddata.CCDData` (see :meth:`from_nddata`).

        Raises
        ------
        InputError
            If ``ccd`` is not a ``CCDData`` or its contents are inconsistent.
        """
        from astropy.nddata import CCDData

        if not isinstance(ccd, CCDData):
            msg = f"from_ccddata needs an astropy CCDData, got {type(ccd).__name__}"
            raise InputError(msg)
        return cls.from_nddata(ccd)


_CONSUMED_KEYS = ("FILTER", "PHOTSCAL", "PHOTSERR", "FLUXMAG0", "DATE-OBS", "TIMESYS",
                  "EXPTIME", "AIRMASS", "PARANGLE", "LTV1", "LTV2")


def _header_number(header: fits.Header, key: str) -> float | None:
    raw = header.get(key)
    if isinstance(raw, bool) or not isinstance(raw, int | float | np.number):
        return None
    value = float(raw)
    return value if math.isfinite(value) else None


def _fields_from_header(header: fits.Header) -> dict[str, Any]:
    """Exposure fields described by (and removed from) a FITS header."""
    fields: dict[str, Any] = {}
    scale = _header_number(header, "PHOTSCAL")
    flux_mag0 = _header_number(header, "FLUXMAG0")
    if scale is not None and scale > 0:
        fields["photo_calib"] = PhotoCalib(scale=scale,
                                           scale_err=abs(_header_number(header, "PHOTSERR")
                                                         or 0.0))
    elif flux_mag0 is not None and flux_mag0 > 0:
        fields["photo_calib"] = PhotoCalib.from_zero_point(2.5 * math.log10(flux_mag0))
    filter_name = header.get("FILTER")
    if filter_name is not None:
        fields["filter"] = str(filter_name).strip()
    date = None
    if isinstance(header.get("DATE-OBS"), str):
        system = str(header.get("TIMESYS", "UTC")).strip().lower()
        try:
            date = Time(header["DATE-OBS"].strip(),
                        scale=system if system in Time.SCALES else "utc")
        except ValueError:
            date = None
    visit = {"date": date, "exposure_time": _header_number(header, "EXPTIME"),
             "airmass": _header_number(header, "AIRMASS"),
             "parallactic_angle": _header_number(header, "PARANGLE")}
    if visit["airmass"] is not None and not visit["airmass"] > 0:
        visit["airmass"] = None
    if visit["exposure_time"] is not None and visit["exposure_time"] < 0:
        visit["exposure_time"] = None
    if any(value is not None for value in visit.values()):
        fields["visit_info"] = VisitInfo(**visit)
    ltv = [_header_number(header, "LTV1"), _header_number(header, "LTV2")]
    if all(v is not None and float(v).is_integer() for v in ltv):
        fields["origin"] = (-int(ltv[0]), -int(ltv[1]))  # type: ignore[arg-type]
    for key in (*_CONSUMED_KEYS, *[k for k in header if str(k).upper().startswith("MP_")]):
        header.remove(key, ignore_missing=True, remove_all=True)
    return fields
