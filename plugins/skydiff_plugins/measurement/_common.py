"""Helpers shared by the measurement plugins: input checks, positions, masks, PSF models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table

import skydiff
from skydiff.photometry import cutouts, nearest_pixel, psf_stamps

from ._moments import adaptive_moments

#: Mask planes whose pixels are left out of fits and sums by default.
DEFAULT_EXCLUDED_PLANES: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA", "EDGE")

#: Smallest and largest side of a stamp chosen from a PSF (pixels).
MIN_STAMP = 5
MAX_STAMP = 101


def check_inputs(inputs: Any, plugin: str) -> tuple[Table, skydiff.Exposure]:
    """Validate the types of ``inputs``; return its catalog and difference exposure.

    Raises
    ------
    InputError
        If ``inputs`` is not a :class:`skydiff.MeasurementInputs`, an image is not an
        Exposure (or None for ``science``/``template``), the catalog is not a Table with
        ``x`` and ``y``, or ``footprints`` is not a label image of the difference's shape.
    """
    if not isinstance(inputs, skydiff.MeasurementInputs):
        msg = (f"measurement {plugin!r} needs a skydiff.MeasurementInputs, got "
               f"{type(inputs).__name__}")
        raise skydiff.InputError(msg)
    difference = inputs.difference
    if not isinstance(difference, skydiff.Exposure):
        msg = (f"measurement {plugin!r}: inputs.difference must be an Exposure, got "
               f"{type(difference).__name__}")
        raise skydiff.InputError(msg)
    for label in ("science", "template"):
        value = getattr(inputs, label)
        if value is not None and not isinstance(value, skydiff.Exposure):
            msg = (f"measurement {plugin!r}: inputs.{label} must be an Exposure or None, got "
                   f"{type(value).__name__}")
            raise skydiff.InputError(msg)
    catalog = inputs.catalog
    if not isinstance(catalog, Table):
        msg = (f"measurement {plugin!r}: inputs.catalog must be an astropy Table, got "
               f"{type(catalog).__name__}")
        raise skydiff.InputError(msg)
    missing = [name for name in ("x", "y") if name not in catalog.colnames]
    if missing:
        msg = (f"measurement {plugin!r}: the catalog lacks the columns {missing}; give 0-based "
               "pixel positions x (column) and y (row)")
        raise skydiff.InputError(msg)
    footprints = inputs.footprints
    if footprints is not None and (not isinstance(footprints, np.ndarray)
                                   or footprints.shape != difference.shape
                                   or not np.issubdtype(footprints.dtype, np.integer)):
        shape = getattr(footprints, "shape", None)
        msg = (f"measurement {plugin!r}: inputs.footprints must be an integer label image of "
               f"shape {difference.shape}, got {type(footprints).__name__} of shape {shape}")
        raise skydiff.InputError(msg)
    return catalog, difference


def float_column(catalog: Table, name: str) -> np.ndarray:
    """Column ``name`` as a new float64 array (masked entries and units dropped → NaN)."""
    column = catalog[name]
    data = np.ma.getdata(column)
    values = np.array(getattr(data, "value", data), dtype=np.float64)
    mask = np.ma.getmaskarray(column)
    if mask.any():
        values[mask] = np.nan
    return values


def positions(catalog: Table) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and ``y`` columns as float64 arrays (non-finite where masked)."""
    try:
        return float_column(catalog, "x"), float_column(catalog, "y")
    except (TypeError, ValueError) as exc:
        msg = "catalog columns x and y must be numeric"
        raise skydiff.InputError(msg) from exc


def bool_column(catalog: Table, name: str) -> np.ndarray:
    """Column ``name`` as a bool array, all False when the catalog has no such column."""
    if name not in catalog.colnames:
        return np.zeros(len(catalog), dtype=bool)
    return np.asarray(np.ma.filled(catalog[name], False), dtype=bool)


def plane_bits(exposure: skydiff.Exposure, planes: Sequence[str]) -> int:
    """The OR of the bits of ``planes`` that the exposure defines (unknown planes ignored)."""
    known = [name for name in planes if name in exposure.mask_planes.names]
    return int(exposure.mask_planes.value(*known)) if known else 0


def usable_pixels(exposure: skydiff.Exposure, x: np.ndarray, y: np.ndarray, *, size: int,
                  planes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamps of image and variance (float64) and of the usable-pixel mask.

    A pixel is usable when it lies on the image, none of ``planes`` is set, and both its
    value and its variance are finite, with a positive variance.
    """
    bits = np.uint32(plane_bits(exposure, planes))
    data = cutouts(exposure.image, x, y, size=size).astype(np.float64)
    variance = cutouts(exposure.variance, x, y, size=size).astype(np.float64)
    mask = cutouts(exposure.mask, x, y, size=size, fill=np.uint32(0))
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(data) & np.isfinite(variance) & (variance > 0.0) & (mask & bits == 0)
    return data, variance, usable


def on_image(shape: tuple[int, int], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether the pixel nearest to each position is on an image of ``shape``."""
    ix, iy, dx, _ = nearest_pixel(x, y)
    return np.isfinite(dx) & (ix >= 0) & (ix < shape[1]) & (iy >= 0) & (iy < shape[0])


def psf_size(psf: skydiff.Psf, requested: int = 0) -> int:
    """Odd stamp side: ``requested`` if non-zero, else the side of the PSF's image."""
    if requested:
        return int(requested) | 1
    side = int(np.asarray(psf.kernel_image()).shape[0])
    return int(min(max(side, MIN_STAMP), MAX_STAMP)) | 1


def model_stamps(psf: skydiff.Psf, x: np.ndarray, y: np.ndarray, *, size: int,
                 origin: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """PSF models of every source, and a per-source failure flag.

    :func:`skydiff.photometry.psf_stamps` evaluates all sources at once; if the PSF raises
    (e.g. a spatial model evaluated far outside its validity region), the sources are
    evaluated one by one and only those that fail are flagged (their model is NaN).
    """
    try:
        models = psf_stamps(psf, x, y, size=size, origin=origin)
        return models, ~np.isfinite(models[:, size // 2, size // 2])
    except (skydiff.SkydiffError, ArithmeticError, ValueError):
        pass
    models = np.full((x.size, size, size), np.nan)
    for k in range(x.size):  # loop over sources: only after a failure of the batch call
        try:
            models[k] = psf_stamps(psf, x[k:k + 1], y[k:k + 1], size=size, origin=origin)[0]
        except (skydiff.SkydiffError, ArithmeticError, ValueError):
            continue
    return models, ~np.isfinite(models[:, size // 2, size // 2])


def origin_of(exposure: skydiff.Exposure) -> tuple[float, float]:
    """The exposure's parent-pixel origin as floats."""
    x0, y0 = exposure.origin
    return float(x0), float(y0)


def column_suffix(value: float) -> str:
    """``3.0 -> "3_0"``, ``4.25 -> "4_25"``: a number as a column-name suffix."""
    return np.format_float_positional(float(value), trim="0").replace(".", "_").replace("-", "m")


def result(columns: dict[str, np.ndarray], flag_name: str, **metadata: Any
           ) -> skydiff.MeasurementResult:
    """A MeasurementResult with the columns in the given order and summary metadata."""
    table = Table(columns)
    flags = np.asarray(columns[flag_name], dtype=bool)
    meta = {"n_sources": len(flags), "n_flagged": int(flags.sum()), **metadata}
    return skydiff.MeasurementResult(columns=table, metadata=meta)


def psf_sigmas(psf: skydiff.Psf, x: np.ndarray, y: np.ndarray, *,
               origin: tuple[float, float]) -> np.ndarray:
    r"""Gaussian-equivalent width :math:`\sigma = \sqrt{(M_{xx} + M_{yy})/2}` of the PSF at
    each position (adaptive moments of the PSF image; NaN where it cannot be evaluated)."""
    n = x.size
    if isinstance(psf, skydiff.GaussianPsf):
        return np.full(n, float(psf.sigma))
    constant = isinstance(psf, skydiff.ImagePsf)
    finite = np.isfinite(x) & np.isfinite(y)
    sigmas = np.full(n, np.nan)
    if not finite.any():
        return sigmas
    try:
        size = psf_size(psf)
    except (skydiff.SkydiffError, ArithmeticError, ValueError):
        return sigmas
    px = np.floor(x[finite] + 0.5)
    py = np.floor(y[finite] + 0.5)
    if constant:
        px, py = px[:1], py[:1]
    models, bad = model_stamps(psf, px, py, size=size, origin=origin)
    start = np.full(px.size, 1.5)
    moments = adaptive_moments(np.nan_to_num(models), np.isfinite(models), x0=np.zeros(px.size),
                               y0=np.zeros(px.size), sigma=start, max_iter=100, tol=1e-5,
                               max_sigma=size / 2.0)
    values = np.sqrt(0.5 * (moments.xx + moments.yy))
    values[bad] = np.nan
    sigmas[finite] = values[0] if constant else values
    return sigmas
