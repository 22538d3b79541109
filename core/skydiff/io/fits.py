r"""Reading and writing :class:`~skydiff.exposure.Exposure` objects as FITS files.

Two layouts are understood.

**skydiff multi-extension FITS** (format ``"skydiff-mef"``, read and written; the LSST
``afw`` layout extended with a PSF and provenance):

===============  ============  =============================================================
HDU              type          content
===============  ============  =============================================================
0 ``PRIMARY``    no data       provenance: ``SKDFMT``, ``SKDVER``, ``NPLUGIN``, ``PLUGn``,
                               ``NINPUT``, ``INPUTn``, ``INSHAn`` (see
                               :mod:`skydiff.io.provenance`)
1 ``IMAGE``      float32 2-D   pixels; header = exposure metadata + WCS + ``FILTER``,
                               ``PHOTSCAL``, ``PHOTSERR``, ``FLUXMAG0``, ``DATE-OBS``,
                               ``TIMESYS``, ``EXPTIME``, ``AIRMASS``, ``PARANGLE``, ``LTV1``,
                               ``LTV2``
2 ``MASK``       uint32 2-D    bit planes (``BITPIX = 32``, ``BZERO = 2147483648``);
                               ``MP_<NAME> = bit`` per plane; WCS, ``LTV1``, ``LTV2``
3 ``VARIANCE``   float32 2-D   variance; WCS, ``LTV1``, ``LTV2``
``PSF``          float64       only with a PSF; ``PSFTYPE`` = ``gaussian`` (2-D image of the
                               PSF; ``PSFSIGMA``, ``PSFSIZE``), ``image`` (2-D unit-sum image;
                               ``PSFX``, ``PSFY``) or ``polynomial`` (3-D basis
                               ``(n_basis, S, S)``; ``PSFORDER``, ``PSFKIND``, ``PSFXMIN``,
                               ``PSFYMIN``, ``PSFXMAX``, ``PSFYMAX``)
``PSFCOEF``      float64 2-D   only for ``polynomial``: coefficients ``(n_basis, n_terms)``
``PROVCONF``     binary table  only with a configuration: the effective TOML, byte-exact
===============  ============  =============================================================

Every HDU carries ``CHECKSUM``/``DATASUM``. Floating-point keywords are written with Python's
shortest round-trip representation, so every value reads back bit-identical. ``LTV1 = -x0``
and ``LTV2 = -y0`` encode :attr:`~skydiff.exposure.Exposure.origin` as ``afw`` does. The WCS
describes the stored pixel grid. Files written by LSST ``afw`` (``IMAGE``/``MASK``/``VARIANCE``
with ``INHERIT = T`` and metadata in the primary header) are read with the same code.

**Plain FITS image** (format ``"fits-image"``, read only): the first HDU with 2-D data (or the
HDU given by ``hdu=``), integers scaled by ``BZERO``/``BSCALE`` and converted to float32, plus
optional *companions* for the planes the file lacks (a variance, inverse-variance weight or
sigma map, a mask, a PSF image) given as file paths or arrays.

In both layouts, keywords that became attributes of the exposure (WCS, filter, photometric
calibration, visit information, origin) and structural keywords are removed from
:attr:`~skydiff.exposure.Exposure.metadata`; a skydiff exposure therefore survives
``write_exposure`` → ``read_exposure`` unchanged. An exposure's WCS never holds observation
times (they live in ``visit_info``): the time keywords of a header are not given to the WCS.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from skydiff.errors import InputError
from skydiff.io._atomic import atomic_path, check_not_input
from skydiff.io._fitsfile import describe_hdus, load_fits, log_warnings, source_name
from skydiff.io.provenance import PROVENANCE_KEYS, Provenance
from skydiff.mask import MaskPlanes
from skydiff.psf import GaussianPsf, ImagePsf, PolynomialPsf, Psf

if TYPE_CHECKING:
    from astropy.io.registry import UnifiedIORegistry

    from skydiff.exposure import Exposure, PhotoCalib, VisitInfo

__all__ = [
    "FITS_SUFFIXES",
    "HduSpec",
    "is_skydiff_mef",
    "read_exposure",
    "register_formats",
    "write_exposure",
]

log = logging.getLogger("skydiff.io")

#: File-name endings recognised as FITS when identifying formats.
FITS_SUFFIXES: tuple[str, ...] = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz",
                                  ".fits.fz", ".fz")

#: How an HDU is chosen: index, EXTNAME, or (EXTNAME, EXTVER).
HduSpec = int | str | tuple[str, int]

#: A companion: a file path or an in-memory array.
Companion = str | os.PathLike[str] | np.ndarray

_STRUCTURAL = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|EXTNAME|EXTVER|EXTLEVEL|EXTTYPE"
    r"|BZERO|BSCALE|BLANK|CHECKSUM|DATASUM|INHERIT|END)$")
_WCS_KEYS = re.compile(
    r"^(WCSAXES|WCSNAME|CNAME\d+|CTYPE\d+|CRPIX\d+|CRVAL\d+|CDELT\d+|CUNIT\d+|CROTA\d+"
    r"|CRDER\d+|CSYER\d+|CD\d+_\d+|PC\d+_\d+|PV\d+_\d+|PS\d+_\d+|RADESYS|RADECSYS|EQUINOX"
    r"|LONPOLE|LATPOLE|RESTFRQ|RESTFREQ|RESTWAV|SPECSYS|SSYSOBS|SSYSSRC|VELOSYS|VELREF|ZSOURCE"
    r"|VELANGL|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_DMAX|B_DMAX|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+"
    r"|BP_\d+_\d+)[A-Z]?$")
#: Keywords represented by exposure attributes (removed from metadata, written by skydiff).
_MANAGED = frozenset({"FILTER", "PHOTSCAL", "PHOTSERR", "FLUXMAG0", "DATE-OBS", "TIME-OBS",
                      "MJD-OBS", "TIMESYS", "EXPTIME", "AIRMASS", "PARANGLE", "LTV1", "LTV2"})
_GAIN_KEYS = ("GAIN",)
_READ_NOISE_KEYS = ("RDNOISE", "READNOIS")


# ------------------------------------------------------------------------------------------
# header helpers


def _float_card(key: str, value: float, comment: str = "") -> fits.Card:
    """A card holding ``value`` in its shortest round-trip form (bit-exact on reading)."""
    number = float(value)
    if not math.isfinite(number):
        msg = f"cannot write {key}={value!r} to a FITS header: the value must be finite"
        raise InputError(msg)
    text = repr(number).upper()
    image = f"{key:<8}= {text:>20}"
    if comment:
        image = f"{image} / {comment}"
    return fits.Card.fromstring(image[:80].ljust(80))


def _set(header: fits.Header, key: str, value: Any, comment: str = "") -> None:
    """Set ``key``, writing floats exactly and long keywords as HIERARCH cards."""
    if key in header:
        header.remove(key, remove_all=True)
    if isinstance(value, float | np.floating) and not isinstance(value, bool):
        header.append(_float_card(key, float(value), comment))
        return
    name = key if len(key) <= 8 and key.replace("-", "").replace("_", "").isalnum() \
        else f"HIERARCH {key}"
    header[name] = (value, comment)


def _header_float(header: Mapping[str, Any], key: str, source: str) -> float | None:
    """A finite numeric keyword value, or None when absent or not a number (logged)."""
    if key not in header:
        return None
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        log.info("%s: ignoring non-numeric %s = %r", source, key, value)
        return None
    number = float(value)
    if not math.isfinite(number):
        log.info("%s: ignoring non-finite %s = %r", source, key, value)
        return None
    return number


def _first_float(header: Mapping[str, Any], keys: tuple[str, ...], source: str) -> float | None:
    for key in keys:
        value = _header_float(header, key, source)
        if value is not None:
            return value
    return None


def _strip(header: fits.Header, predicate: Callable[[str], bool]) -> fits.Header:
    """A copy of ``header`` without the keywords for which ``predicate`` holds."""
    out = header.copy()
    for key in {key for key in out if predicate(key.upper())}:
        out.remove(key, remove_all=True)
    return out


def _is_reserved(key: str) -> bool:
    return bool(_STRUCTURAL.match(key) or _WCS_KEYS.match(key) or key in _MANAGED)


def _metadata_from(header: fits.Header) -> fits.Header:
    """Exposure metadata: ``header`` minus structural, WCS and managed keys.

    Trailing empty cards (padding some writers reserve for later keywords) are dropped too,
    since FITS writers do not preserve them.
    """
    metadata = _strip(header, _is_reserved)
    while len(metadata) and not (metadata.cards[-1].keyword or metadata.cards[-1].value
                                 or metadata.cards[-1].comment):
        del metadata[-1]
    return metadata


def _merge_inherited(primary: fits.Header, extension: fits.Header) -> fits.Header:
    """The extension header preceded by the primary cards it inherits (``INHERIT = T``)."""
    if not extension.get("INHERIT", False):
        return extension.copy()
    own = {key.upper() for key in extension}
    merged = fits.Header()
    for card in primary.cards:
        key = card.keyword.upper()
        if _STRUCTURAL.match(key) or PROVENANCE_KEYS.match(key):
            continue
        if key in own and key not in ("COMMENT", "HISTORY", ""):
            continue
        merged.append(card)
    for card in extension.cards:
        merged.append(card)
    return merged


# ------------------------------------------------------------------------------------------
# WCS, filter, photometric calibration, visit information, origin


def _wcs_from_header(header: fits.Header, source: str) -> WCS | None:
    """The celestial WCS of ``header`` (None when it has none), without time keywords."""
    subset = fits.Header([card for card in header.cards
                          if _WCS_KEYS.match(card.keyword.upper())])
    if not any(key.upper().startswith("CTYPE") for key in subset):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wcs = WCS(subset, naxis=2)
        except Exception as exc:
            msg = (f"{source} has an unreadable WCS ({' '.join(str(exc).split())}); fix or "
                   "remove its WCS keywords")
            raise InputError(msg) from exc
    log_warnings(caught, source)
    if not wcs.has_celestial:
        log.info("%s: ignoring a WCS without celestial axes", source)
        return None
    return wcs


def _wcs_header(wcs: WCS) -> fits.Header:
    """The header cards of ``wcs`` (celestial keywords only; no time or site keywords)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = wcs.to_header(relax=True)
    log_warnings(caught, "WCS")
    return fits.Header([card for card in full.cards if _WCS_KEYS.match(card.keyword.upper())])


def _exposure_module() -> Any:
    from skydiff import exposure

    return exposure


def _photo_calib(header: fits.Header, source: str) -> PhotoCalib | None:
    module = _exposure_module()
    scale = _header_float(header, "PHOTSCAL", source)
    if scale is not None:
        error = _header_float(header, "PHOTSERR", source) or 0.0
        return module.PhotoCalib(scale=scale, scale_err=error)
    flux_mag0 = _header_float(header, "FLUXMAG0", source)
    if flux_mag0 is not None and flux_mag0 > 0:
        return module.PhotoCalib.from_zero_point(2.5 * math.log10(flux_mag0))
    return None


def _parse_time(header: fits.Header, source: str) -> Time | None:
    system = str(header.get("TIMESYS", "UTC")).strip().lower()
    scale = system if system in Time.SCALES else "utc"
    date = header.get("DATE-OBS")
    try:
        if isinstance(date, str) and date.strip():
            text = date.strip()
            clock = header.get("TIME-OBS")
            if "T" not in text and isinstance(clock, str) and clock.strip():
                text = f"{text}T{clock.strip()}"
            return Time(text, format="isot" if "T" in text else "iso", scale=scale)
        mjd = _header_float(header, "MJD-OBS", source)
        if mjd is not None:
            return Time(mjd, format="mjd", scale=scale)
    except ValueError as exc:
        log.info("%s: ignoring unparseable observation date (%s)", source, exc)
    return None


def _visit_info(header: fits.Header, source: str) -> VisitInfo | None:
    module = _exposure_module()
    values = {
        "date": _parse_time(header, source),
        "exposure_time": _header_float(header, "EXPTIME", source),
        "airmass": _header_float(header, "AIRMASS", source),
        "parallactic_angle": _header_float(header, "PARANGLE", source),
    }
    if all(value is None for value in values.values()):
        return None
    return module.VisitInfo(**values)


def _filter_name(header: fits.Header) -> str | None:
    value = header.get("FILTER")
    return None if value is None else str(value).strip()


def _origin(header: fits.Header, source: str) -> tuple[int, int]:
    offsets = []
    for key in ("LTV1", "LTV2"):
        value = _header_float(header, key, source)
        if value is None:
            offsets.append(0)
            continue
        if abs(value - round(value)) > 1e-6:
            msg = (f"{source}: {key}={value} is not a whole number of pixels; fix the header "
                   "(LTV1/LTV2 = -x0/-y0 of the parent frame)")
            raise InputError(msg)
        offsets.append(-round(value))
    return offsets[0], offsets[1]


# ------------------------------------------------------------------------------------------
# PSF


def _psf_hdus(psf: Any) -> list[fits.ImageHDU]:
    """The ``PSF`` (and ``PSFCOEF``) HDUs storing ``psf`` losslessly."""
    header = fits.Header()
    extra: list[fits.ImageHDU] = []
    if isinstance(psf, GaussianPsf):
        data = np.asarray(psf.kernel_image(), dtype=np.float64)
        _set(header, "PSFTYPE", "gaussian", "skydiff PSF model")
        header.append(_float_card("PSFSIGMA", psf.sigma, "Gaussian sigma (pixels)"))
        _set(header, "PSFSIZE", int(psf.size), "side of the PSF image (pixels)")
    elif isinstance(psf, PolynomialPsf):
        data = np.asarray(psf.basis, dtype=np.float64)
        _set(header, "PSFTYPE", "polynomial", "skydiff PSF model")
        _set(header, "PSFORDER", int(psf.order), "order of the spatial polynomials")
        _set(header, "PSFKIND", str(psf.kind), "spatial function family")
        for key, value in zip(("PSFXMIN", "PSFYMIN", "PSFXMAX", "PSFYMAX"), psf.bbox,
                              strict=True):
            header.append(_float_card(key, value, "bbox of the spatial polynomials"))
        extra.append(fits.ImageHDU(np.asarray(psf.coefficients, dtype=np.float64),
                                   name="PSFCOEF"))
    elif isinstance(psf, ImagePsf) or isinstance(psf, Psf):
        if isinstance(psf, ImagePsf):
            data = np.asarray(psf.image, dtype=np.float64)
        else:
            data = np.asarray(psf.kernel_image(), dtype=np.float64)
            log.info("writing a %s as its image at its average position (ImagePsf)",
                     type(psf).__name__)
        x, y = psf.average_position
        _set(header, "PSFTYPE", "image", "skydiff PSF model")
        header.append(_float_card("PSFX", x, "position of the PSF image, x (parent pixels)"))
        header.append(_float_card("PSFY", y, "position of the PSF image, y (parent pixels)"))
    else:
        msg = f"cannot write a PSF of type {type(psf).__name__}; it must implement skydiff.Psf"
        raise InputError(msg)
    return [fits.ImageHDU(data, header=header, name="PSF"), *extra]


def _exact_image_psf(image: np.ndarray, position: tuple[float, float]) -> ImagePsf:
    """An :class:`ImagePsf` holding exactly ``image`` (already unit-sum, as written).

    ``ImagePsf`` normalises its image on construction; dividing a stored unit-sum image by its
    floating-point sum again may change the last bit of some pixels, so the validated stored
    image is put back unchanged.
    """
    psf = ImagePsf(image, position=position)
    stored = np.array(image, dtype=np.float64)
    if not np.array_equal(psf.image, stored):
        stored.setflags(write=False)
        object.__setattr__(psf, "image", stored)
    return psf


def _read_psf(hdul: fits.HDUList, source: str) -> Psf:
    hdu = hdul["PSF"]
    header = hdu.header
    kind = str(header.get("PSFTYPE", "image")).strip().lower()
    data = hdu.data
    try:
        if kind == "gaussian":
            sigma = _header_float(header, "PSFSIGMA", source)
            size = header.get("PSFSIZE")
            if sigma is None:
                msg = f"{source}: the PSF HDU lacks PSFSIGMA; the file is damaged"
                raise InputError(msg)
            return GaussianPsf(sigma, size=size)
        if kind == "polynomial":
            if "PSFCOEF" not in hdul:
                msg = f"{source}: a polynomial PSF needs a PSFCOEF HDU; the file is damaged"
                raise InputError(msg)
            bbox = tuple(_header_float(header, key, source)
                         for key in ("PSFXMIN", "PSFYMIN", "PSFXMAX", "PSFYMAX"))
            return PolynomialPsf(data, hdul["PSFCOEF"].data, order=header.get("PSFORDER"),
                                 bbox=bbox, kind=str(header.get("PSFKIND", "chebyshev")))
        if kind == "image":
            if data is None or data.ndim != 2:
                msg = f"{source}: the PSF HDU must hold a 2-D image; the file is damaged"
                raise InputError(msg)
            position = (_header_float(header, "PSFX", source) or 0.0,
                        _header_float(header, "PSFY", source) or 0.0)
            return _exact_image_psf(data, position)
    except InputError as exc:
        if str(exc).startswith(source):
            raise
        msg = f"{source}: invalid PSF HDU ({exc})"
        raise InputError(msg) from exc
    msg = f"{source}: unknown PSFTYPE {kind!r} (expected gaussian, image or polynomial)"
    raise InputError(msg)


# ------------------------------------------------------------------------------------------
# choosing HDUs and reading companions


def _is_image_2d(hdu: Any) -> bool:
    return bool(hdu.is_image and hdu.data is not None and np.ndim(hdu.data) == 2)


def _select_hdu(hdul: fits.HDUList, hdu: HduSpec | None, source: str, what: str) -> int:
    """Index of the HDU holding the 2-D image (``hdu`` or the first 2-D image HDU)."""
    if hdu is None:
        for index, item in enumerate(hdul):
            if _is_image_2d(item):
                return index
        msg = (f"{what} {source} has no 2-D image HDU ({describe_hdus(hdul)}); pass hdu= "
               "naming a 2-D image")
        raise InputError(msg)
    try:
        index = hdul.index_of(hdu)
        if not 0 <= index < len(hdul):
            raise IndexError(index)
    except (KeyError, IndexError, ValueError, TypeError):
        msg = f"{what} {source} has no HDU {hdu!r}; available: {describe_hdus(hdul)}"
        raise InputError(msg) from None
    if not _is_image_2d(hdul[index]):
        msg = (f"HDU {hdu!r} of {what} {source} does not hold a 2-D image "
               f"({describe_hdus(hdul)}); pass hdu= naming a 2-D image")
        raise InputError(msg)
    return index


def _image_header(hdul: fits.HDUList, index: int) -> fits.Header:
    header = hdul[index].header
    return _merge_inherited(hdul[0].header, header) if index > 0 else header.copy()


def _companion(value: Companion, *, what: str, shape: tuple[int, int], image_source: str,
               extname: str | None) -> tuple[np.ndarray, str]:
    """Load a companion map (path or array), check its shape, return (array, its name)."""
    if isinstance(value, np.ndarray) or (not isinstance(value, str | os.PathLike)
                                         and hasattr(value, "__array__")):
        array = np.array(value, copy=True)
        name = f"{what} array"
    else:
        name = source_name(value)
        hdul = load_fits(value, what=what)
        index = None
        if extname and extname in [item.name for item in hdul]:
            candidate = hdul.index_of(extname)
            if _is_image_2d(hdul[candidate]):
                index = candidate
        if index is None:
            index = _select_hdu(hdul, None, name, what)
        array = np.array(hdul[index].data, copy=True)
        name = f"{what} {name}"
    if array.ndim != 2:
        msg = f"{name} has {array.ndim} dimensions, expected a 2-D map; pass a 2-D image"
        raise InputError(msg)
    if array.shape != shape:
        msg = (f"{name} has shape {array.shape} but the image {image_source} has shape {shape}; "
               f"pass the {what} that belongs to this image")
        raise InputError(msg)
    return array, name


def _numeric(array: np.ndarray, name: str) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        msg = f"{name} holds {array.dtype} values, not numbers; pass a numeric map"
        raise InputError(msg)
    return array.astype(np.float64)


#: Above this fraction of negative values a variance or sigma companion is rejected outright
#: (it is probably not a noise map); below it the negative pixels are flagged as unusable.
_MAX_NEGATIVE_FRACTION = 0.001


def _variance_from_companion(kind: str, array: np.ndarray, name: str
                             ) -> tuple[np.ndarray, np.ndarray]:
    """(variance with NaN where unusable, bool array of unusable pixels) from a companion."""
    values = _numeric(array, name)
    finite = np.isfinite(values)
    if kind == "weight":
        usable = finite & (values > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = np.where(usable, 1.0 / np.where(usable, values, 1.0), np.nan)
        return variance, ~usable
    negative = finite & (values < 0)
    n_negative = int(np.count_nonzero(negative))
    if n_negative > _MAX_NEGATIVE_FRACTION * max(int(np.count_nonzero(finite)), 1):
        msg = (f"{name} has {n_negative} negative values; a {kind} map must be ≥ 0 "
               f"({'pass weight= for inverse variance' if kind == 'variance' else 'pass σ'})")
        raise InputError(msg)
    if n_negative:
        # A handful of negative noise values (real reductions have them) marks bad pixels.
        log.warning("%s: %d negative value(s) treated as unusable pixels", name, n_negative)
    usable = finite & ~negative
    variance = values**2 if kind == "sigma" else values
    return np.where(usable, variance, np.nan), ~usable


def _psf_companion(value: Any, *, image_source: str, extname: str | None) -> Psf:
    if isinstance(value, Psf) and not isinstance(value, np.ndarray):
        return value
    if isinstance(value, str | os.PathLike):
        name = source_name(value)
        hdul = load_fits(value, what="PSF file")
        is_psfex = any(isinstance(item, fits.BinTableHDU) and item.columns is not None
                       and "psf_mask" in [col.lower() for col in item.columns.names]
                       for item in hdul)
        if is_psfex:
            return PolynomialPsf.from_psfex(value)
        index = None
        if extname and extname in [item.name for item in hdul] \
                and _is_image_2d(hdul[hdul.index_of(extname)]):
            index = hdul.index_of(extname)
        if index is None:
            index = _select_hdu(hdul, None, name, "PSF file")
        image = np.array(hdul[index].data, dtype=np.float64)
        label = f"PSF image {name}"
    else:
        image = np.array(value, dtype=np.float64)
        label = "PSF image array"
    try:
        return ImagePsf(image)
    except InputError as exc:
        msg = f"{label} for {image_source} is unusable: {exc}"
        raise InputError(msg) from exc


# ------------------------------------------------------------------------------------------
# reading


def is_skydiff_mef(hdul: fits.HDUList) -> bool:
    """Whether ``hdul`` has the multi-extension layout (``IMAGE`` plus ``MASK``/``VARIANCE``)."""
    names = {item.name.upper() for item in hdul}
    return "IMAGE" in names and bool(names & {"MASK", "VARIANCE"})


def _mask_bits(data: np.ndarray, source: str) -> np.ndarray:
    if not np.issubdtype(data.dtype, np.integer):
        msg = f"{source}: the MASK HDU holds {data.dtype} values, not integer bits; file damaged?"
        raise InputError(msg)
    return (data.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _read_mef_parts(hdul: fits.HDUList, source: str) -> dict[str, Any]:
    image_index = hdul.index_of("IMAGE")
    image_hdu = hdul[image_index]
    if not _is_image_2d(image_hdu):
        msg = f"{source}: the IMAGE HDU holds no 2-D image ({describe_hdus(hdul)}); file damaged?"
        raise InputError(msg)
    image = np.asarray(image_hdu.data)
    header = _image_header(hdul, image_index)
    parts: dict[str, Any] = {"image": image, "header": header, "mask": None, "variance": None,
                             "planes": MaskPlanes.default(), "psf": None,
                             "bitpix": int(image_hdu.header.get("BITPIX", -32))}
    for name in ("MASK", "VARIANCE"):
        if name not in hdul:
            continue
        plane = hdul[name]
        if not _is_image_2d(plane) or plane.data.shape != image.shape:
            shape = getattr(plane.data, "shape", None)
            msg = (f"{source}: the {name} HDU has shape {shape}, the IMAGE {image.shape}; "
                   "the file is damaged")
            raise InputError(msg)
        if name == "MASK":
            parts["mask"] = _mask_bits(np.asarray(plane.data), source)
            parts["planes"] = MaskPlanes.from_header(plane.header)
        else:
            parts["variance"] = np.asarray(plane.data, dtype=np.float64)
    if "PSF" in hdul:
        parts["psf"] = _read_psf(hdul, source)
    parts["origin"] = _origin(header, source)
    return parts


def _read_plain_parts(hdul: fits.HDUList, hdu: HduSpec | None, source: str) -> dict[str, Any]:
    index = _select_hdu(hdul, hdu, source, "image")
    item = hdul[index]
    return {"image": np.asarray(item.data), "header": _image_header(hdul, index),
            "mask": None, "variance": None, "planes": MaskPlanes.default(), "psf": None,
            "bitpix": int(item.header.get("BITPIX", -32)), "origin": (0, 0),
            "extname": item.name if index > 0 else None}


def _digital_limits(header: fits.Header, bitpix: int) -> tuple[float | None, float | None]:
    """(largest representable value, BLANK value) of integer data after BZERO/BSCALE."""
    if bitpix <= 0:
        return None, None
    bzero = float(header.get("BZERO", 0.0))
    bscale = float(header.get("BSCALE", 1.0))
    raw_max = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
    blank = header.get("BLANK")
    blank_value = None if not isinstance(blank, int) else bzero + bscale * blank
    return (bzero + bscale * raw_max if bscale > 0 else None), blank_value


def _read(path: str | os.PathLike[str], *, layout: Literal["auto", "mef", "image"],
          hdu: HduSpec | None = None, variance: Companion | None = None,
          weight: Companion | None = None, sigma: Companion | None = None,
          mask: Companion | None = None, psf: Any = None, saturation: float | None = None,
          saturation_grow: int = 1, gain: float | None = None,
          read_noise: float | None = None) -> Exposure:
    module = _exposure_module()
    source = source_name(path)
    given = [name for name, value in (("variance", variance), ("weight", weight),
                                      ("sigma", sigma)) if value is not None]
    if len(given) > 1:
        msg = f"pass only one of variance=, weight=, sigma= for {source} (got {', '.join(given)})"
        raise InputError(msg)
    hdul = load_fits(path, what="image")
    mef = is_skydiff_mef(hdul)
    if layout == "mef" and hdu is not None:
        msg = (f"hdu={hdu!r} selects an HDU of a plain image; read {source} with "
               "format='fits-image' to use it")
        raise InputError(msg)
    if layout == "mef" and not mef:
        msg = (f"{source} is not a multi-extension exposure (no IMAGE plus MASK/VARIANCE HDUs: "
               f"{describe_hdus(hdul)}); read it with format='fits-image'")
        raise InputError(msg)
    is_mef_read = layout == "mef" or (layout == "auto" and mef and hdu is None)
    if is_mef_read:
        parts = _read_mef_parts(hdul, source)
        extname = None
    else:
        parts = _read_plain_parts(hdul, hdu, source)
        extname = parts["extname"]
    header: fits.Header = parts["header"]
    raw = np.asarray(parts["image"])
    shape = (int(raw.shape[0]), int(raw.shape[1]))
    if not (np.issubdtype(raw.dtype, np.number) and raw.size > 0):
        msg = f"{source} holds no numeric pixels ({raw.dtype}, shape {raw.shape}); check the HDU"
        raise InputError(msg)
    plain = not is_mef_read
    image = raw.astype(np.float64)
    planes: MaskPlanes = parts["planes"]
    mask_bits = (np.zeros(shape, dtype=np.uint32) if parts["mask"] is None
                 else np.array(parts["mask"], dtype=np.uint32))

    def add_plane(name: str, where: np.ndarray) -> None:
        nonlocal planes, mask_bits
        if where.any():
            planes = planes.with_plane(name)
            mask_bits |= np.uint32(planes.value(name)) * where.astype(np.uint32)

    # Pixels without data: non-finite (or BLANK) pixels of a plain image.
    no_data = ~np.isfinite(image) if plain else np.zeros(shape, dtype=bool)
    digital_max, blank_value = _digital_limits(header, parts["bitpix"]) if plain else (None,
                                                                                        None)
    if blank_value is not None:
        no_data |= image == blank_value
    if no_data.all():
        msg = f"{source} has no finite pixel; check the file or the hdu= choice"
        raise InputError(msg)

    # Saturation: explicit option, else (plain images) SATURATE and the digital limit.
    level = saturation
    if level is None and plain:
        level = _header_float(header, "SATURATE", source)
    saturated = np.zeros(shape, dtype=bool)
    comparable = np.where(np.isfinite(image) & ~no_data, image, -np.inf)
    if level is not None:
        saturated |= comparable >= float(level)
    if digital_max is not None:
        saturated |= comparable >= digital_max
    if saturation_grow < 0:
        msg = f"saturation_grow must be >= 0, got {saturation_grow}"
        raise InputError(msg)
    if plain and saturation_grow and saturated.any():
        from scipy import ndimage

        size = 2 * int(saturation_grow) + 1
        saturated = ndimage.maximum_filter(saturated, size=size, mode="constant")
    add_plane("SAT", saturated)

    # Mask companion: non-zero pixels are BAD.
    if mask is not None:
        values, name = _companion(mask, what="mask", shape=shape, image_source=source,
                                  extname=extname)
        add_plane("BAD", _numeric(values, name) != 0)

    # Variance: companion, stored plane, or estimate; unusable pixels get the median.
    clean = np.where(no_data, 0.0, image) if plain else image
    if given:
        kind = given[0]
        value = cast(Companion, {"variance": variance, "weight": weight, "sigma": sigma}[kind])
        array, name = _companion(value, what=f"{kind} map", shape=shape, image_source=source,
                                 extname=extname)
        var, unusable = _variance_from_companion(kind, array, name)
        no_data |= unusable
        var = _fill_unusable(var, no_data)
    elif parts["variance"] is not None:
        var = np.asarray(parts["variance"], dtype=np.float64)
        if np.any(var[np.isfinite(var)] < 0):
            msg = f"{source}: the VARIANCE HDU has negative values; the file is damaged"
            raise InputError(msg)
    else:
        gain = gain if gain is not None else _first_float(header, _GAIN_KEYS, source)
        read_noise = (read_noise if read_noise is not None
                      else _first_float(header, _READ_NOISE_KEYS, source))
        if gain is not None and not gain > 0:
            log.info("%s: ignoring non-positive gain %s", source, gain)
            gain, read_noise = None, None
        excluded = no_data | saturated | ~np.isfinite(clean)
        var = _estimate_variance(np.where(excluded, np.nan, clean), excluded, gain=gain,
                                 read_noise=read_noise)
        var = _fill_unusable(var, no_data)
    add_plane("NO_DATA", no_data)

    psf_model = parts["psf"]
    if psf is not None:
        psf_model = _psf_companion(psf, image_source=source, extname=extname)

    fields = dict(
        image=clean.astype(np.float32),
        mask=mask_bits,
        variance=var.astype(np.float32),
        mask_planes=planes,
        psf=psf_model,
        wcs=_wcs_from_header(header, source),
        photo_calib=_photo_calib(header, source),
        filter=_filter_name(header),
        visit_info=_visit_info(header, source),
        origin=parts["origin"],
        metadata=_metadata_from(header),
    )
    try:
        return module.Exposure(**fields)
    except InputError as exc:
        msg = f"{source} does not make a valid exposure: {exc}"
        raise InputError(msg) from exc


def _source_mask(image: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    r"""Pixels on or near sources, to keep them out of the sky-noise measurement.

    Sources are where the difference of Gaussians :math:`D = G_{1.5} * I - G_{8} * I` (a
    band-pass that removes the sky background) exceeds :math:`3\,\mathrm{robust\_sigma}(D)`
    in absolute value, grown by 3 pixels.
    """
    from scipy import ndimage

    module = _exposure_module()
    filled = np.where(excluded, np.median(image[~excluded]), image)
    band = ndimage.gaussian_filter(filled, 1.5) - ndimage.gaussian_filter(filled, 8.0)
    spread = module.robust_sigma(band[~excluded])
    if not spread > 0:
        return np.zeros(image.shape, dtype=bool)
    return ndimage.binary_dilation(np.abs(band) > 3.0 * spread, iterations=3)


def _estimate_variance(image: np.ndarray, excluded: np.ndarray, *, gain: float | None,
                       read_noise: float | None) -> np.ndarray:
    r"""Variance of an image without one, calibrated on its measured sky noise.

    The sky noise :math:`\hat\sigma^2` is measured by
    :func:`skydiff.exposure.estimate_variance` without gain (robust σ of the
    background-subtracted image) on the pixels away from sources (:func:`_source_mask`); source
    pixels would inflate it (by 10–25 % on the DECam frames of the test data). With a gain
    :math:`g` the Poisson model :math:`V_P = \max(I, 0)/g + (\sigma_\mathrm{read}/g)^2` adds the
    photon noise of sources *above the typical level*:

    .. math::

        V = \max\bigl(\hat\sigma^2, (\sigma_\mathrm{read}/g)^2\bigr)
            + \max\bigl(V_P - \mathrm{median}(V_P), 0\bigr),

    the read noise being a floor no real sky noise can go below. On raw frames the sky level
    of :math:`V_P` equals :math:`\hat\sigma^2` and this is the Poisson model; on
    sky-subtracted frames and stacks (where :math:`V_P` misses the subtracted sky) the sky
    term stays right.
    """
    module = _exposure_module()
    ignore = excluded | ~np.isfinite(image)
    sources = _source_mask(image, ignore)
    if np.count_nonzero(~(ignore | sources)) >= max(0.1 * image.size, 16):
        ignore = ignore | sources
    sky = np.asarray(module.estimate_variance(image, mask=ignore), dtype=np.float64)
    if gain is None:
        return sky
    poisson = np.asarray(module.estimate_variance(image, gain=gain, read_noise=read_noise),
                         dtype=np.float64)
    usable = ~excluded & np.isfinite(image)
    typical = float(np.median(poisson[usable]))
    floor = (float(read_noise or 0.0) / gain) ** 2
    return np.maximum(sky, floor) + np.maximum(poisson - typical, 0.0)


def _fill_unusable(variance: np.ndarray, unusable: np.ndarray) -> np.ndarray:
    """``variance`` with unusable or non-finite pixels set to the median of the others."""
    good = ~unusable & np.isfinite(variance)
    if good.all():
        return variance
    fill = float(np.median(variance[good])) if good.any() else 1.0
    return np.where(good, variance, fill)


def read_exposure(path: str | os.PathLike[str], *, hdu: HduSpec | None = None,
                  variance: Companion | None = None, weight: Companion | None = None,
                  sigma: Companion | None = None, mask: Companion | None = None,
                  psf: Companion | Psf | None = None, saturation: float | None = None,
                  saturation_grow: int = 1, gain: float | None = None,
                  read_noise: float | None = None) -> Exposure:
    r"""Read an exposure from a FITS file (multi-extension or plain image).

    A file with an ``IMAGE`` HDU and a ``MASK`` or ``VARIANCE`` HDU is read as a
    multi-extension exposure (unless ``hdu`` is given); any other file as a plain image: the
    first HDU with 2-D data, or ``hdu``.

    For a plain image the planes the file lacks are built as follows:

    * **mask** — pixels that are NaN/inf (or equal to ``BLANK``) get ``NO_DATA`` and the image
      value 0; pixels ≥ ``saturation`` (default: the ``SATURATE`` keyword) and, for integer
      images, pixels at the largest value the integer type can hold (digital saturation, e.g.
      65535 for ``uint16``) get ``SAT``, grown by ``saturation_grow`` pixels (charge spills into
      the neighbours of a saturated pixel, as LSST's ISR assumes); non-zero pixels of the
      ``mask`` companion get ``BAD``.
    * **variance** — from one companion: ``variance`` (:math:`V`), ``weight`` (inverse
      variance, :math:`V = 1/w`; pixels with :math:`w \le 0` get ``NO_DATA``) or ``sigma``
      (:math:`V = \sigma^2`); otherwise estimated (see Notes) from the sky noise measured away
      from sources plus, with a gain (``gain=`` or the ``GAIN`` keyword), the photon noise of
      the sources and a read-noise floor (``read_noise=`` or ``RDNOISE``/``READNOIS``, in
      electrons). Unusable pixels (``NO_DATA``) get the median variance so downstream
      arithmetic stays finite.
    * **PSF** — from the ``psf`` companion: an image (→ :class:`~skydiff.psf.ImagePsf`), a
      PSFEx file (→ :meth:`~skydiff.psf.PolynomialPsf.from_psfex`) or a Psf object.

    Companions given for a multi-extension file replace its variance or PSF and add to its
    mask. A companion given as a path is read from its HDU with the same ``EXTNAME`` as the
    image when there is one, else from its first 2-D image HDU. The input files are opened
    read-only and never modified.

    Parameters
    ----------
    path : str or os.PathLike
        The FITS file (``.fits``, ``.fits.gz``, tile-compressed ``.fz``, ...).
    hdu : int, str or (str, int), optional
        HDU of a plain image: index, ``EXTNAME`` or ``(EXTNAME, EXTVER)``.
    variance, weight, sigma : path or ndarray of shape (H, W), optional
        At most one variance companion: variance, inverse-variance weight or 1-σ noise map.
    mask : path or ndarray of shape (H, W), optional
        Bad-pixel map; non-zero → ``BAD``.
    psf : path, ndarray of shape (S, S) or Psf, optional
        PSF image (odd square), PSFEx file or model.
    saturation : float, optional
        Saturation level in image units; pixels at or above it get ``SAT``. Overrides the
        ``SATURATE`` keyword (``float("inf")`` disables it).
    saturation_grow : int, optional
        Grow the saturated regions of a plain image by this many pixels (a square
        neighbourhood; default 1, 0 disables).
    gain : float, optional
        Gain (e⁻/ADU) for the variance estimate; overrides ``GAIN``.
    read_noise : float, optional
        Read noise (e⁻) for the variance estimate; overrides ``RDNOISE``.

    Returns
    -------
    skydiff.exposure.Exposure
        The exposure (float32 image and variance, uint32 mask).

    Raises
    ------
    InputError
        If the file or a companion is missing, not FITS, truncated or corrupt; if the chosen
        HDU is not 2-D; if a companion's shape differs from the image's; if more than one of
        ``variance``/``weight``/``sigma`` is given; if a variance or sigma map is negative; or
        if the PSF image is unusable (even-sized, non-finite, zero sum).

    See Also
    --------
    write_exposure, skydiff.exposure.Exposure.read

    Notes
    -----
    The estimated variance is

    .. math::

        V = \max\bigl(\hat\sigma^2, (\sigma_\mathrm{read}/g)^2\bigr)
            + \max\bigl(V_P - \mathrm{median}(V_P), 0\bigr), \qquad
        V_P = \frac{\max(I, 0)}{g} + \left(\frac{\sigma_\mathrm{read}}{g}\right)^2,

    where :math:`\hat\sigma` is the robust sky noise of the image with sources masked and
    :math:`V_P` the Poisson model of :func:`skydiff.exposure.estimate_variance` (the second
    term is absent without a gain). Calibrating the sky term on the data keeps the estimate
    right for sky-subtracted frames and stacks, where the Poisson model alone misses the
    subtracted sky; on raw frames both agree.

    Examples
    --------
    >>> exp = read_exposure("calexp.fits")                                 # doctest: +SKIP
    >>> exp = read_exposure("c4d_ooi.fits", weight="c4d_oow.fits",
    ...                     mask="c4d_ood.fits", psf="c4d-psfex.fits")      # doctest: +SKIP
    >>> exp = read_exposure("toros.fits", saturation=65535)                # doctest: +SKIP
    """
    return _read(path, layout="auto", hdu=hdu, variance=variance, weight=weight, sigma=sigma,
                 mask=mask, psf=psf, saturation=saturation, saturation_grow=saturation_grow,
                 gain=gain, read_noise=read_noise)


# ------------------------------------------------------------------------------------------
# writing


def _visit_cards(header: fits.Header, visit: VisitInfo | None) -> None:
    if visit is None:
        return
    if visit.date is not None:
        date = visit.date.copy()
        date.precision = 9
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # e.g. ERFA's "dubious year" beyond leap seconds
            text = str(date.isot)
        log_warnings(caught, "DATE-OBS")
        _set(header, "DATE-OBS", text, "observation start")
        _set(header, "TIMESYS", str(date.scale).upper(), "time scale of DATE-OBS")
    for key, value, comment in (("EXPTIME", visit.exposure_time, "exposure time (s)"),
                                ("AIRMASS", visit.airmass, "airmass"),
                                ("PARANGLE", visit.parallactic_angle,
                                 "parallactic angle (deg)")):
        if value is not None:
            _set(header, key, float(value), comment)


def _image_hdus(exposure: Exposure) -> list[fits.ImageHDU]:
    metadata = exposure.metadata if exposure.metadata is not None else fits.Header()
    geometry = _wcs_header(exposure.wcs) if exposure.wcs is not None else fits.Header()
    x0, y0 = (int(v) for v in exposure.origin)
    geometry["LTV1"] = (-x0, "-x0: column of pixel [0, 0] in the parent is x0")
    geometry["LTV2"] = (-y0, "-y0: row of pixel [0, 0] in the parent is y0")

    header = _strip(fits.Header(metadata), _is_reserved)
    header.extend(geometry, unique=True)
    if exposure.filter is not None:
        if not str(exposure.filter).isascii():
            msg = f"filter name {exposure.filter!r} is not ASCII; FITS headers hold only ASCII"
            raise InputError(msg)
        _set(header, "FILTER", str(exposure.filter), "filter")
    calib = exposure.photo_calib
    if calib is not None:
        _set(header, "PHOTSCAL", float(calib.scale), "nJy per image unit")
        _set(header, "PHOTSERR", float(calib.scale_err), "uncertainty of PHOTSCAL (nJy)")
        _set(header, "FLUXMAG0", 10.0 ** (0.4 * float(calib.zero_point)),
             "image units of an AB mag 0 source")
    _visit_cards(header, exposure.visit_info)

    mask_header = fits.Header()
    for key, bit in exposure.mask_planes.to_header().items():
        _set(mask_header, key, int(bit), "mask plane bit")
    mask_header.extend(geometry, unique=True)
    variance_header = geometry.copy()

    return [
        fits.ImageHDU(np.asarray(exposure.image, dtype=np.float32), header=header,
                      name="IMAGE"),
        fits.ImageHDU(np.asarray(exposure.mask, dtype=np.uint32), header=mask_header,
                      name="MASK"),
        fits.ImageHDU(np.asarray(exposure.variance, dtype=np.float32), header=variance_header,
                      name="VARIANCE"),
    ]


def write_exposure(exposure: Exposure, path: str | os.PathLike[str], *,
                   overwrite: bool = False, provenance: Provenance | None = None) -> None:
    """Write an exposure as a skydiff multi-extension FITS file, atomically.

    The layout is described in :mod:`skydiff.io.fits`. The file is written to a temporary
    file in the same directory and renamed onto ``path`` only when complete, so an error
    never leaves a partial file and never damages an existing one.

    Parameters
    ----------
    exposure : skydiff.exposure.Exposure
        The exposure to write.
    path : str or os.PathLike
        Destination (conventionally ``.fits``).
    overwrite : bool, optional
        Replace an existing file (never one of the provenance inputs).
    provenance : Provenance, optional
        Provenance to record (see :meth:`Provenance.collect`); default: the skydiff version
        only.

    Raises
    ------
    InputError
        If ``path`` exists and ``overwrite`` is False; if ``path`` is one of the input files
        listed in ``provenance``; if its directory does not exist; or if the exposure cannot
        be represented in FITS (non-ASCII filter, non-finite header value, unwritable
        metadata card).

    See Also
    --------
    read_exposure, skydiff.io.read_provenance

    Examples
    --------
    >>> write_exposure(diffim, "diffim.fits",
    ...                provenance=Provenance.collect(config=config,
    ...                                              inputs=["sci.fits", "ref.fits"]))
    ... # doctest: +SKIP
    """
    record = provenance if provenance is not None else Provenance()
    check_not_input(path, record.input_paths)
    primary = fits.PrimaryHDU(header=record.to_header())
    hdus: list[Any] = [primary, *_image_hdus(exposure)]
    if exposure.psf is not None:
        hdus.extend(_psf_hdus(exposure.psf))
    config_hdu = record.config_hdu()
    if config_hdu is not None:
        hdus.append(config_hdu)
    hdul = fits.HDUList(hdus)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                hdul.writeto(tmp, checksum=True, output_verify="silentfix")
            except fits.VerifyError as exc:
                msg = (f"cannot write {source_name(path)}: the exposure metadata has a card "
                       f"FITS cannot hold ({' '.join(str(exc).split())}); remove it")
                raise InputError(msg) from exc
        log_warnings(caught, source_name(path))


# ------------------------------------------------------------------------------------------
# unified I/O registration


def _has_fits_suffix(path: Any) -> bool:
    return isinstance(path, str | os.PathLike) and \
        str(os.fspath(path)).lower().endswith(FITS_SUFFIXES)


def _peek_names(path: Any) -> list[str] | None:
    """EXTNAMEs of a FITS file read from its headers only (None if it is not FITS)."""
    if not isinstance(path, str | os.PathLike) or not Path(path).is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a failed peek only means "not this format"
        try:
            with fits.open(path, lazy_load_hdus=True, memmap=False) as hdul:
                return [item.name.upper() for item in hdul]
        except Exception:
            return None


def _identify_mef(origin: str, path: Any, fileobj: Any, *args: Any, **kwargs: Any) -> bool:
    """skydiff-mef: writes to a FITS suffix; reads files with IMAGE + MASK/VARIANCE HDUs."""
    if origin == "write":
        return _has_fits_suffix(path)
    names = _peek_names(path)
    return names is not None and "IMAGE" in names and bool({"MASK", "VARIANCE"} & set(names))


def _identify_image(origin: str, path: Any, fileobj: Any, *args: Any, **kwargs: Any) -> bool:
    """fits-image: any other FITS file, or any non-directory path with a FITS suffix.

    A missing or damaged ``.fits`` file is claimed too, so that the reader reports what is
    wrong with it.
    """
    if origin != "read":
        return False
    names = _peek_names(path)
    if names is None:
        return _has_fits_suffix(path) and not Path(os.fspath(path)).is_dir()
    return not ("IMAGE" in names and bool({"MASK", "VARIANCE"} & set(names)))


def _read_mef(path: str | os.PathLike[str], **kwargs: Any) -> Exposure:
    """Read a skydiff / LSST multi-extension exposure (IMAGE, MASK, VARIANCE[, PSF]).

    Keyword arguments are those of :func:`skydiff.io.read_exposure` (companions replace the
    stored variance or PSF and add to the mask).
    """
    return _read(path, layout="mef", **kwargs)


def _read_image(path: str | os.PathLike[str], **kwargs: Any) -> Exposure:
    """Read a plain FITS image with optional companions.

    Keyword arguments are those of :func:`skydiff.io.read_exposure`: ``hdu``, ``variance``,
    ``weight``, ``sigma``, ``mask``, ``psf``, ``saturation``, ``saturation_grow``, ``gain``,
    ``read_noise``.
    """
    return _read(path, layout="image", **kwargs)


def _write_mef(exposure: Exposure, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write a skydiff multi-extension exposure; see :func:`skydiff.io.write_exposure`."""
    write_exposure(exposure, path, **kwargs)


_REGISTER_LOCK = threading.Lock()


def register_formats(registry: UnifiedIORegistry) -> None:
    """Register the ``"skydiff-mef"`` and ``"fits-image"`` formats in ``registry``.

    Idempotent: formats already present are left alone.

    Parameters
    ----------
    registry : astropy.io.registry.UnifiedIORegistry
        The registry behind ``Exposure.read`` / ``Exposure.write``.
    """
    exposure_class = _exposure_module().Exposure
    with _REGISTER_LOCK:
        present = {(row["Format"], row["Read"], row["Write"])
                   for row in registry.get_formats(exposure_class)}
        if any(fmt == "skydiff-mef" for fmt, _, _ in present):
            return
        registry.register_reader("skydiff-mef", exposure_class, _read_mef)
        registry.register_writer("skydiff-mef", exposure_class, _write_mef)
        registry.register_identifier("skydiff-mef", exposure_class, _identify_mef)
        registry.register_reader("fits-image", exposure_class, _read_image)
        registry.register_identifier("fits-image", exposure_class, _identify_image)

