r"""Numerical conformance checks of the ``subtraction`` role.

Registered with :func:`skydiff.testing.checks.register_check` (tier ``"numerical"``, role
``"subtraction"``) when :mod:`skydiff.testing.checks` is imported, so
``parametrize_with_checks(["subtraction:<name>"])`` runs them on every subtraction plugin
whose tags select them:

``check_subtraction_null``
    science = template up to noise (same PSF, scale and position) → the difference is noise
    described by its variance plane: the clipped standard deviation of
    :math:`D/\sqrt{V}` is within 10 % of 1 and its mean is consistent with 0 (within five
    standard errors estimated from 8 × 8-pixel block means, which accounts for correlated
    noise);
``check_subtraction_linearity`` (tag ``"linear"``)
    scaling both images by :math:`a = 3` (variances by :math:`a^2`) scales the difference by
    :math:`a`: the rms of :math:`D_a/a - D_1` is below :math:`10^{-3}` of the noise of
    :math:`D_1` (float32 round-off, far below any algorithmic non-linearity);
``check_subtraction_point_source``
    a point source of known flux added to the science image only is recovered in the
    difference: its PSF-weighted flux (with the difference's own PSF) is within 5σ of the
    truth, σ the larger of the variance-plane error and the scatter of the same estimator at
    blank positions;
``check_subtraction_swap`` (tag ``"symmetric"``)
    swapping science and template changes the sign of the difference: on the null pair (equal
    PSFs, so the source looks the same whichever image is called the science) the fluxes of
    an injected source in the two differences agree with opposite signs within 5σ, and the
    sum of the two differences has a mean consistent with 0.

The inputs are small :func:`skydiff.sim.simulate_pair` star fields (128 × 128 pixels, 40
stars, fixed seeds, no detector defects), built once per process and never modified.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from skydiff.exposure import Exposure
from skydiff.roles import SubtractionResult
from skydiff.sim import SimulatedPair, simulate_pair
from skydiff.testing.checks import CheckSkipped, PluginUnderTest, register_check

__all__ = [
    "NULL_SEED",
    "PAIR_SEED",
    "SHAPE",
    "check_subtraction_linearity",
    "check_subtraction_null",
    "check_subtraction_point_source",
    "check_subtraction_swap",
]

#: Shape of the check images.
SHAPE = (128, 128)
#: Seed of the pair with different PSFs (linearity, point source, swap).
PAIR_SEED = 20240611
#: Seed of the null pair (identical observing conditions).
NULL_SEED = 20240612
#: Mask planes whose pixels are left out of every statistic.
BAD_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "SAT_TEMPLATE",
                               "SUSPECT", "INTRP")
#: Scale factor of the linearity check.
LINEARITY_SCALE = 3.0
#: Flux (science units) of the injected point source.
INJECTED_FLUX = 6000.0

_STARS: dict[str, Any] = {"n_stars": 40, "flux_min": 2000.0, "flux_max": 50000.0,
                          "source_margin": 12.0}


@functools.cache
def _null_pair() -> SimulatedPair:
    """Science and template under identical conditions: only the noise differs."""
    return simulate_pair(shape=SHAPE, seed=NULL_SEED, science={"fwhm": 2.5},
                         template={"fwhm": 2.5}, **_STARS)


@functools.cache
def _pair() -> SimulatedPair:
    """A science image of broader PSF (FWHM 3) than its template (FWHM 2)."""
    return simulate_pair(shape=SHAPE, seed=PAIR_SEED, science={"fwhm": 3.0},
                         template={"fwhm": 2.0}, **_STARS)


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _bad(exposure: Exposure, planes: Sequence[str] = BAD_PLANES) -> np.ndarray:
    names = [name for name in planes if name in exposure.mask_planes.names]
    flags = exposure.masked(*names) if names else np.zeros(exposure.shape, dtype=bool)
    return flags | ~np.isfinite(exposure.image) | ~(exposure.variance > 0)


def _clipped(values: np.ndarray, n_sigma: float = 3.0, n_iter: int = 3) -> np.ndarray:
    """The values kept by an iterative median/MAD-centred sigma clip."""
    kept = values[np.isfinite(values)]
    for _ in range(n_iter):
        if kept.size < 10:
            break
        centre = np.median(kept)
        spread = 1.4826 * np.median(np.abs(kept - centre))
        if not spread > 0:
            break
        kept = kept[np.abs(kept - centre) <= n_sigma * spread]
    return kept


def _block_standard_error(values: np.ndarray, good: np.ndarray, block: int = 8) -> float:
    """Standard error of the mean of ``values[good]`` from the scatter of block means."""
    height, width = values.shape
    rows, cols = height // block, width // block
    cut = (slice(0, rows * block), slice(0, cols * block))
    data = np.where(good, values, 0.0)[cut].reshape(rows, block, cols, block)
    count = good[cut].reshape(rows, block, cols, block).sum(axis=(1, 3))
    sums = data.sum(axis=(1, 3))
    usable = count >= block * block // 2
    if np.count_nonzero(usable) < 4:
        return math.inf
    means = sums[usable] / count[usable]
    return float(np.std(means, ddof=1) / math.sqrt(means.size))


def _run(plugin: PluginUnderTest, science: Exposure, template: Exposure) -> SubtractionResult:
    result = plugin.make().run(science, template)
    if not isinstance(result, SubtractionResult):
        _fail(f"{plugin.id}.run returned {type(result).__name__}, not a SubtractionResult")
    if result.difference.shape != science.shape:
        _fail(f"{plugin.id}: the difference has shape {result.difference.shape}, expected "
              f"{science.shape}")
    return result


def _scaled(exposure: Exposure, factor: float) -> Exposure:
    return exposure.evolve(image=exposure.image * np.float32(factor),
                           variance=exposure.variance * np.float32(factor * factor))


def _blank_position(pair: SimulatedPair, *, margin: int, clearance: float) -> tuple[int, int]:
    """A pixel (row, col) at least ``clearance`` from every simulated source."""
    height, width = pair.science.shape
    rows, cols = np.mgrid[margin:height - margin, margin:width - margin]
    x = np.asarray(pair.truth["x"], dtype=np.float64)
    y = np.asarray(pair.truth["y"], dtype=np.float64)
    distance = np.full(rows.shape, np.inf)
    for xs, ys in zip(x, y, strict=True):  # loop over the few sources, not pixels
        distance = np.minimum(distance, np.hypot(cols - xs, rows - ys))
    centre = np.hypot(rows - height / 2, cols - width / 2)
    candidates = np.flatnonzero(distance.ravel() >= clearance)
    if candidates.size == 0:
        msg = "no blank position in the check image"
        raise CheckSkipped(msg)
    best = candidates[np.argmin(centre.ravel()[candidates])]
    return int(rows.ravel()[best]), int(cols.ravel()[best])


def _psf_stamp(exposure: Exposure, row: int, col: int) -> np.ndarray:
    psf = exposure.psf
    if psf is None:
        msg = "the difference has no PSF, so the point-source flux cannot be measured"
        raise CheckSkipped(msg)
    x0, y0 = exposure.origin
    stamp = np.asarray(psf.kernel_image(col + x0, row + y0), dtype=np.float64)
    return stamp / stamp.sum()


def _psf_flux(difference: Exposure, row: int, col: int, stamp: np.ndarray
              ) -> tuple[float, float]:
    r"""PSF-weighted flux :math:`\sum P D / \sum P^2` and its variance-plane error."""
    half = stamp.shape[0] // 2
    rows = slice(row - half, row + half + 1)
    cols = slice(col - half, col + half + 1)
    data = difference.image[rows, cols].astype(np.float64)
    variance = difference.variance[rows, cols].astype(np.float64)
    norm = float(np.sum(stamp**2))
    return float(np.sum(stamp * data) / norm), float(np.sqrt(np.sum(stamp**2 * variance)) / norm)


def _blank_scatter(difference: Exposure, stamp: np.ndarray, pair: SimulatedPair,
                   exclude: tuple[int, int], *, clearance: float = 10.0) -> float:
    """Scatter of the PSF-weighted flux estimator at blank positions of the difference.

    Positions on a 4-pixel grid at least ``clearance`` pixels from every simulated source
    (and from ``exclude``) whose stamp is unmasked; the clipped standard deviation of their
    fluxes includes the noise correlations the variance plane does not describe.
    """
    half = stamp.shape[0] // 2
    height, width = difference.shape
    mesh_r, mesh_c = np.meshgrid(np.arange(half, height - half, 4),
                                 np.arange(half, width - half, 4), indexing="ij")
    grid_r, grid_c = mesh_r.ravel(), mesh_c.ravel()
    x = np.asarray(pair.truth["x"], dtype=np.float64)
    y = np.asarray(pair.truth["y"], dtype=np.float64)
    far = np.ones(grid_r.size, dtype=bool)
    for xs, ys in (*zip(x, y, strict=True), (exclude[1], exclude[0])):
        far &= np.hypot(grid_c - xs, grid_r - ys) > clearance
    bad = _bad(difference)
    fluxes = []
    for r, c in zip(grid_r[far], grid_c[far], strict=True):  # at most a few hundred
        if not bad[r - half:r + half + 1, c - half:c + half + 1].any():
            fluxes.append(_psf_flux(difference, int(r), int(c), stamp)[0])
    if len(fluxes) < 8:
        return 0.0
    kept = _clipped(np.asarray(fluxes))
    return float(np.std(kept, ddof=1)) if kept.size > 2 else 0.0


def _inject(pair: SimulatedPair, flux: float) -> tuple[Exposure, tuple[int, int]]:
    """The science image with a point source of ``flux`` at a blank position."""
    science = pair.science
    row, col = _blank_position(pair, margin=30, clearance=12.0)
    stamp = _psf_stamp(science, row, col)
    half = stamp.shape[0] // 2
    image = np.array(science.image, dtype=np.float32)
    image[row - half:row + half + 1, col - half:col + half + 1] += np.float32(flux) * stamp
    return science.evolve(image=image), (row, col)


def _measured_flux(result: SubtractionResult, pair: SimulatedPair, where: tuple[int, int]
                   ) -> tuple[float, float]:
    difference = result.difference
    stamp = _psf_stamp(difference, *where)
    flux, error = _psf_flux(difference, *where, stamp)
    scatter = _blank_scatter(difference, stamp, pair, where)
    return flux, max(error, scatter)


# ------------------------------------------------------------------------------------------
# checks


@register_check(roles={"subtraction"}, tier="numerical")
def check_subtraction_null(plugin: PluginUnderTest) -> None:
    r"""Science = template up to noise: the difference is noise matching its variance plane.

    The clipped (3σ, 3 passes) standard deviation of :math:`D/\sqrt V` over unmasked pixels
    must be within 10 % of 1, and its clipped mean within five block standard errors of 0.
    """
    pair = _null_pair()
    difference = _run(plugin, pair.science, pair.template).difference
    good = ~_bad(difference)
    normalised = difference.image.astype(np.float64) / np.sqrt(
        np.where(good, difference.variance, 1.0).astype(np.float64))
    values = _clipped(normalised[good])
    if values.size < 100:
        _fail(f"{plugin.id}: only {values.size} usable difference pixels in the null test")
    std = float(np.std(values, ddof=1))
    if not abs(std - 1.0) <= 0.1:
        _fail(f"{plugin.id}: std of difference/sqrt(variance) is {std:.3f} in the null test, "
              f"expected 1 within 10 %")
    mean = float(np.mean(values))
    error = _block_standard_error(normalised, good)
    if not abs(mean) <= 5.0 * error + 1e-3:
        _fail(f"{plugin.id}: mean of difference/sqrt(variance) is {mean:.4f} in the null test, "
              f"more than 5 standard errors ({error:.4f}) from 0")


@register_check(roles={"subtraction"}, tier="numerical", requires_tags={"linear"})
def check_subtraction_linearity(plugin: PluginUnderTest) -> None:
    r"""Scaling science and template by :math:`a` scales the difference by :math:`a`.

    Variances scale by :math:`a^2`. The rms of :math:`D_a/a - D_1` over pixels unmasked in
    both differences must be below :math:`10^{-3}` of the clipped standard deviation of
    :math:`D_1`.
    """
    pair = _pair()
    base = _run(plugin, pair.science, pair.template).difference
    scaled = _run(plugin, _scaled(pair.science, LINEARITY_SCALE),
                  _scaled(pair.template, LINEARITY_SCALE)).difference
    good = ~(_bad(base) | _bad(scaled))
    if np.count_nonzero(good) < 100:
        _fail(f"{plugin.id}: too few unmasked pixels to compare in the linearity check")
    delta = (scaled.image.astype(np.float64) / LINEARITY_SCALE
             - base.image.astype(np.float64))[good]
    rms = float(np.sqrt(np.mean(delta**2)))
    noise = float(np.std(_clipped(base.image.astype(np.float64)[good]), ddof=1))
    if not rms <= 1e-3 * noise:
        _fail(f"{plugin.id}: scaling the inputs by {LINEARITY_SCALE} changed the difference "
              f"by an rms of {rms:.3g} (after rescaling), more than 1e-3 of its noise "
              f"({noise:.3g})")


@register_check(roles={"subtraction"}, tier="numerical")
def check_subtraction_point_source(plugin: PluginUnderTest) -> None:
    """A point source added to the science image only is recovered with its flux.

    The PSF-weighted flux in the difference, with the difference's PSF at the source, must
    be within 5σ of the injected flux (science units).
    """
    pair = _pair()
    science, where = _inject(pair, INJECTED_FLUX)
    result = _run(plugin, science, pair.template)
    flux, sigma = _measured_flux(result, pair, where)
    if not abs(flux - INJECTED_FLUX) <= 5.0 * sigma:
        _fail(f"{plugin.id}: injected point source of flux {INJECTED_FLUX:g} measured "
              f"{flux:.1f} ± {sigma:.1f} in the difference (more than 5σ off)")


@register_check(roles={"subtraction"}, tier="numerical", requires_tags={"symmetric"})
def check_subtraction_swap(plugin: PluginUnderTest) -> None:
    """Swapping science and template changes the sign of the difference, up to noise.

    The flux of a source injected in the science image must come out with opposite signs
    (within 5σ) in ``D(S, T)`` and ``D(T, S)``, and the clipped mean of ``D(S, T) + D(T, S)``
    must be consistent with 0.
    """
    pair = _null_pair()  # equal PSFs: the source has the same shape whichever is "science"
    science, where = _inject(pair, INJECTED_FLUX)
    forward = _run(plugin, science, pair.template)
    backward = _run(plugin, pair.template, science)
    f_forward, s_forward = _measured_flux(forward, pair, where)
    f_backward, s_backward = _measured_flux(backward, pair, where)
    sigma = math.hypot(s_forward, s_backward)
    if not abs(f_forward + f_backward) <= 5.0 * sigma:
        _fail(f"{plugin.id}: the injected source has flux {f_forward:.1f} in D(S, T) but "
              f"{f_backward:.1f} in D(T, S); swapping must change the sign (σ = {sigma:.1f})")
    total = forward.difference.image.astype(np.float64) + backward.difference.image
    good = ~(_bad(forward.difference) | _bad(backward.difference))
    values = _clipped(total[good])
    error = _block_standard_error(total, good)
    if not abs(float(np.mean(values))) <= 5.0 * error + 1e-6 * float(np.std(values)):
        _fail(f"{plugin.id}: D(S, T) + D(T, S) has mean {float(np.mean(values)):.4g}, more "
              f"than 5 standard errors ({error:.3g}) from 0")
