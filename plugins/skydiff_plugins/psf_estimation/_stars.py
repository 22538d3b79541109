"""Star catalogues for PSF estimation: detection, or measurement of the caller's positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table

import skydiff


def check_exposure(exposure: Any) -> skydiff.Exposure:
    """Return ``exposure`` if it is an Exposure, else raise InputError."""
    if not isinstance(exposure, skydiff.Exposure):
        msg = f"a PSF estimator needs an Exposure, got {type(exposure).__name__}"
        raise skydiff.InputError(msg)
    return exposure


def star_catalog(exposure: skydiff.Exposure, sources: Table | None, *, threshold: float,
                 fwhm: float | None, bad_planes: Sequence[str]) -> Table:
    """Measured stars: :func:`skydiff.find_stars`, or :func:`skydiff.measure_stars` of ``sources``.

    ``sources`` must be an astropy Table with ``x`` and ``y`` (0-based column and row of the
    exposure array); positions outside the image are dropped.
    """
    planes = tuple(bad_planes)
    if sources is None:
        return skydiff.find_stars(exposure.evolve(psf=None), threshold=threshold, fwhm=fwhm,
                                  bad_planes=planes)
    if not isinstance(sources, Table):
        msg = f"sources must be an astropy Table with x and y columns, got {type(sources).__name__}"
        raise skydiff.InputError(msg)
    missing = [name for name in ("x", "y") if name not in sources.colnames]
    if missing:
        msg = f"sources lacks the columns {missing}; give 0-based array positions x and y"
        raise skydiff.InputError(msg)
    x = np.asarray(sources["x"], dtype=np.float64)
    y = np.asarray(sources["y"], dtype=np.float64)
    height, width = exposure.shape
    inside = (np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < width - 0.5) & (y > -0.5)
              & (y < height - 0.5))
    return skydiff.measure_stars(exposure.evolve(psf=None), x[inside], y[inside], fwhm=fwhm,
                                 bad_planes=planes)


def good_stars(table: Table, *, min_snr: float, require_isolated: bool,
               edge: float = 0.0) -> np.ndarray:
    """Boolean selection of unmasked, unsaturated stars with converged moments and enough S/N."""
    good = (~np.asarray(table["masked"], dtype=bool) & ~np.asarray(table["saturated"], dtype=bool)
            & np.isfinite(np.asarray(table["fwhm"], dtype=np.float64))
            & (np.asarray(table["snr"], dtype=np.float64) >= min_snr)
            & (np.asarray(table["edge_distance"], dtype=np.float64) >= edge))
    if require_isolated:
        good &= np.asarray(table["isolated"], dtype=bool)
    return good
