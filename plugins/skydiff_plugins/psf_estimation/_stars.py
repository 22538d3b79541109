"""Star catalogues for PSF estimation: detection, or measurement of the caller's positions."""

from __future__ import annotations

import math
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


#: Bandwidth of the kernel density of ln(FWHM) used to find the stellar locus (≈ 5 % in size).
_LOCUS_BANDWIDTH = 0.05
#: A density peak is a candidate locus if it reaches this height (about three sources of one
#: size: the kernel peaks at 1 per source) ...
_LOCUS_MIN_PEAK = 3.0
#: ... and this fraction of the highest peak (so a few stragglers below a rich locus are not it).
_LOCUS_PEAK_FRACTION = 0.01
#: The locus ends where the density falls below this fraction of its peak.
_LOCUS_VALLEY_FRACTION = 0.1


def stellar_locus(table: Table, good: np.ndarray, *, max_ratio: float,
                  min_fwhm: float) -> np.ndarray:
    r"""The ``good`` sources on the stellar locus: the smallest dense mode of the size.

    Stars share the PSF's size whatever their flux; galaxies are larger and spread over a
    broad range (in a cluster field they outnumber the stars), and cosmic rays and hot pixels
    are smaller. The locus is therefore the *smallest* significant mode of the size
    distribution, not the densest one:

    1. sources with an adaptive-moment ``fwhm`` below ``min_fwhm`` pixels (narrower than any
       sampled PSF: cosmic rays, hot pixels) are dropped;
    2. the density of :math:`u = \ln \mathrm{FWHM}` is estimated with a Gaussian kernel of
       width 0.05 (5 % in size, unnormalised: one source adds a peak of height 1); its
       smallest local maximum of height at least 3 (about three sources of one size) and 1 %
       of the highest is the locus centre :math:`u_*` -- stars are often a small minority of
       the bright sources of a deep field, so the galaxies' larger mode may well be higher;
    3. the locus extends on both sides of :math:`u_*` while the density stays above 10 % of
       its peak (so a spatially varying PSF keeps its whole, contiguous range), and never
       beyond a factor ``max_ratio`` in FWHM from :math:`u_*`.

    Parameters
    ----------
    table : astropy.table.Table
        Measured sources with a ``fwhm`` column.
    good : ndarray of bool, shape (len(table),)
        The sources eligible as stars (unmasked, unsaturated, enough S/N).
    max_ratio : float
        Largest FWHM ratio (> 1) between a locus member and the locus centre.
    min_fwhm : float
        Smallest FWHM of a star in pixels.

    Returns
    -------
    ndarray of bool, shape (len(table),)
        ``good`` restricted to the locus. With fewer than three eligible sources there is no
        mode to find and only the ``min_fwhm`` cut applies.
    """
    fwhm = np.asarray(table["fwhm"], dtype=np.float64)
    eligible = np.asarray(good, dtype=bool) & np.isfinite(fwhm) & (fwhm >= min_fwhm)
    if int(eligible.sum()) < 3:
        return eligible
    u = np.log(fwhm[eligible])
    step = _LOCUS_BANDWIDTH / 4.0
    grid = np.arange(u.min() - 3.0 * _LOCUS_BANDWIDTH, u.max() + 3.0 * _LOCUS_BANDWIDTH + step,
                     step)
    density = np.zeros(grid.size)
    for start in range(0, u.size, 1024):  # bounded memory for huge catalogues
        chunk = u[start:start + 1024]
        density += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / _LOCUS_BANDWIDTH) ** 2
                          ).sum(axis=1)
    padded = np.concatenate([[-np.inf], density, [-np.inf]])
    peaks = np.flatnonzero((density >= padded[:-2]) & (density > padded[2:])
                           & (density >= max(_LOCUS_MIN_PEAK,
                                             _LOCUS_PEAK_FRACTION * density.max())))
    centre = int(peaks[0]) if peaks.size else int(np.argmax(density))
    floor = _LOCUS_VALLEY_FRACTION * density[centre]
    reach = math.log(max_ratio)
    upper = centre
    while (upper + 1 < grid.size and density[upper + 1] >= floor
           and grid[upper + 1] - grid[centre] <= reach):
        upper += 1
    lower = centre
    while (lower > 0 and density[lower - 1] >= floor
           and grid[centre] - grid[lower - 1] <= reach):
        lower -= 1
    on_locus = eligible.copy()
    on_locus[eligible] = (u >= grid[lower]) & (u <= grid[upper])
    return on_locus
