r"""Cosmic rays: pixels sharper than the PSF allows (the SDSS/LSST ``findCosmicRays`` tests).

For a pixel of value :math:`v` and variance :math:`\sigma^2` (background subtracted), and for
each of the four directions :math:`d` (vertical, horizontal and the two diagonals) with
:math:`m_d` the mean of the two opposite neighbours and :math:`s_d` its standard deviation,
the pixel is a cosmic ray when (Lupton et al. 2001; ``meas_algorithms`` ``CR.cc``)

1. :math:`v \ge 0` and it is not on a skipped plane (``BAD``, ``SAT``, ``INTRP``);
2. :math:`v \ge m_d + k_\mathrm{min}\,\sigma` for at least one direction (``cr_min_sigma``);
3. for at least one direction,

   .. math::

       f\,\frac{P(d)}{P(0)}\,(v - c\,\sigma) > m_d + c\,s_d,

   i.e. even the lower bound of the pixel, scaled by the PSF's neighbour-to-centre ratio
   :math:`P(d)/P(0)` (the mean of the two PSF pixels at :math:`\pm d`), exceeds the upper
   bound of its neighbours by the slack :math:`f < 1` (``cr_cond3_fac2``; :math:`c` is
   ``cr_cond3_fac``);
4. the 8-connected group of such pixels carries a summed excess over the replacement values
   of at least ``cr_min_snr`` times :math:`\sqrt{\sum V}` (the unit-free form of
   ``min_DN``: a noise pixel passes 2 and 3 with a probability of about :math:`10^{-7}`);
5. (difference images; not in ``CR.cc``) the detection image does not hold significant
   signal of the other sign nearby: :math:`\nu_q \ge -k_\mathrm{opp}` for every pixel
   :math:`q` of the :math:`(2R+1) \times (2R+1)` box around it, with :math:`\nu` the
   matched-filter significance of the detector (``cr_opposite_sigma`` :math:`k_\mathrm{opp}`
   = 5, ``cr_opposite_radius`` :math:`R` = 4);
6. (difference images; not in ``CR.cc``) the *pixels* of that box are not balanced by pixels
   of the other sign: with :math:`z = D/\sqrt V`,
   :math:`\min_q z_q \ge -\max(k_\mathrm{opp},\ f_\mathrm{opp} \max_q z_q)`, the
   maximum over the box and the pixel itself (``cr_opposite_fraction``
   :math:`f_\mathrm{opp}` = 0.2).

A point source has :math:`m_d \approx v\,P(d)/P(0)` (more when it is off-centre: for a
Gaussian the geometric mean of the two neighbours is exactly :math:`v\,P(d)/P(0)`), so with
:math:`f < 1` it can only pass condition 3 through a noise fluctuation larger than :math:`c`
sigma of both the pixel and the mean of its neighbours. This holds for any sum of
*positive* PSFs, but a difference image also holds negative ones: next to the negative lobe
of a dipole (a star whose template is misaligned by a pixel or two) the neighbours of the
positive lobe are lowered by the negative light, and near the zero line between the lobes
the image is steeper than any PSF, so the lobe's pixels pass conditions 2 and 3 at high S/N
(19 of 48 dipoles with lobes 1–3 px apart at S/N 60 per lobe, FWHM 3, lost their positive
lobe to the rejection). No test on the 3 × 3 neighbourhood separates this from a cosmic ray
(using the brighter instead of the mean of the two neighbours, or skipping the directions
with a negative neighbour, still flags 16–78 % of random bright dipoles), but the negative
light is visible: the other lobe is a significant negative detection within a few pixels
(at most 3.6 px from any flagged pixel in the tests), which condition 5 looks for. It looks
in :math:`\nu`, not in the pixels, because a decorrelated difference (``dmtn021``) puts a
negative ring around every sharp feature: next to a 345-sigma track the pixels reach -18
sigma, but :math:`\nu` (filtered with the difference's own PSF) stays above -4 within 4 px.
The cost: a cosmic ray within :math:`R` pixels of a negative detection (a fading star, a
dipole, a cosmic ray of the other sign) is not flagged; on blank sky
:math:`P(\nu < -5) \approx 3 \times 10^{-7}` per pixel makes it negligible.

Condition 6 catches what :math:`\nu` cannot see: a sharp residual *balanced* by pixels of
the other sign, whose matched filter is near zero. On the TOROS null pair (both frames
resampled by their authors, hot pixels in both) the al difference of every hot pixel is a
+10 to +40 sigma spike in a ring of -5 to -25 sigma pixels, :math:`|\nu| < 5`; conditions
1–5 flag the spike, the growing passes then take every positive pixel next to the ring
(3300 pixels in 150 groups), and their replacement by the negative neighbours left 85
negative detections on a pair without changes. The ring/spike ratio separates the cases:
0.22–17 for those residuals (5 % quantile 0.45), 0.025–0.083 for the cosmic rays of
decorrelated differences (the benchmark pair and 12 simulated pairs, science FWHM 4 and
template FWHM 3), at most 0.15 for a DMTN-021 filter of any plausible kernel and noise
ratio (template variance up to 10 times the science's); :math:`f_\mathrm{opp}` = 0.2 sits
between. A relative test in :math:`\nu` instead would unprotect dipoles: when the lobes are
close, the weaker one is largely cancelled in :math:`\nu` (at FWHM 3 and S/N 1000 per lobe,
17 of 200 random dipoles were flagged with :math:`-\max(5, 0.2 \max \nu)`, none with
condition 5).

Negative pixels (``polarity="both"``) are tested by the same six conditions applied to
:math:`-D` and :math:`-\nu` (so condition 5 then refuses a negative candidate next to a
significant *positive* detection): a sharp negative pixel is, e.g., a cosmic ray or hot
pixel of the template. With ``polarity="positive"`` (the default, as ``CR.cc``) negative
pixels are never cosmic rays.

Then, ``cr_n_iter`` times, the cosmic-ray pixels are replaced by the neighbour mean that
triggered them and their 8-neighbours are tested again with :math:`k_\mathrm{min}/2` and
:math:`c = 0`, which adds the fainter pixels of tracks. Condition 6 still applies to them,
condition 5 does not: it decides whether a sharp feature is a cosmic ray at all, and the
signal of the other sign next to the pixels connected to an accepted one is its own ring
(on a decorrelated difference the ring of a long, bright track reaches -5.1 in :math:`\nu`
4 px away, which refused half of a track in a simulated pair). Only pixels
above :math:`(k_\mathrm{min} - 2.5)\,\sigma` are tested in the first pass (all others fail
condition 2 unless the mean of their neighbours is a 3.5-sigma negative fluctuation), so the
cost is a few whole-image comparisons plus work on the candidates.

**Removal** (:func:`remove_cosmic_rays`). Each cosmic ray is replaced by the mean of its
neighbours in the detection image. In a decorrelated difference those neighbours are its
ring: the replacement leaves the ring, whose :math:`\nu` reaches -10 to -50 (every track
of a simulated decorrelated pair was a negative detection after its removal). A group whose
replacement leaves :math:`s\nu' < -\min(k_\mathrm{opp}, \mathrm{threshold})` in the box
around one of its pixels (where condition 5 held before) is *masked* instead: its pixels
and those within ``cr_mask_radius`` (default: the footprint growth radius) get zero weight,
so the ring goes with it (:func:`mask_in_significance`).

References
----------
.. [1] Lupton, R. et al. 2001, ASP Conf. Ser. 238, 269, "The SDSS Imaging Pipelines".
.. [2] ``lsst.meas.algorithms`` ``findCosmicRays`` (``src/CR.cc``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

import skydiff

from ._footprints import disk_offsets, neighbour_indices
from ._significance import _MIN_NOISE_FRACTION, matched_filter

__all__ = ["CosmicRays", "cosmic_ray_groups", "find_cosmic_rays", "mask_in_significance",
           "remove_cosmic_rays", "remove_from_significance"]

#: Opposite-neighbour pairs in the order of ``CR.cc``'s condition 3: N-S, W-E, SW-NE, NW-SE.
_DIRECTIONS = (((-1, 0), (1, 0)), ((0, -1), (0, 1)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1)))
#: First-pass candidates exceed (cr_min_sigma - this) sigma.
_PREFILTER_MARGIN = 2.5


class CosmicRays:
    """Cosmic-ray pixels with the excess over their replacement value.

    Attributes
    ----------
    pixels : ndarray of int
        Flat indices of the cosmic-ray pixels (sorted).
    excess : ndarray of float64
        Pixel value minus the mean of its finite, non-cosmic-ray 8-neighbours.
    """

    def __init__(self, pixels: NDArray[np.intp], excess: NDArray[np.float64]) -> None:
        self.pixels = pixels
        self.excess = excess


def _psf_ratios(kernel: NDArray[np.float64]) -> NDArray[np.float64]:
    """:math:`P(d)/P(0)` for the four directions (mean of the two PSF pixels at ±d)."""
    half_r, half_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    centre = kernel[half_r, half_c]
    return np.array([(kernel[half_r + a[0], half_c + a[1]]
                      + kernel[half_r + b[0], half_c + b[1]]) / (2.0 * centre)
                     for a, b in _DIRECTIONS])


def _test(work: NDArray[np.float32], variance: NDArray[np.float32],
          candidates: NDArray[np.intp], thresholds: NDArray[np.float64], *, min_sigma: float,
          noise_factor: float, opposite: _Opposite | None, seeds: bool = True
          ) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Conditions 1–3, 5 (``seeds``) and 6 on interior ``candidates``; (is_cr, replacement)."""
    shape = work.shape
    flat = work.reshape(-1)
    flat_var = variance.reshape(-1)
    value = flat[candidates].astype(np.float64)
    sigma = np.sqrt(flat_var[candidates].astype(np.float64))
    offsets = tuple(o for pair in _DIRECTIONS for o in pair)
    index, _ = neighbour_indices(candidates, shape, offsets)  # candidates are interior
    neighbours = flat[index].astype(np.float64).reshape(4, 2, -1)
    neighbour_var = flat_var[index].astype(np.float64).reshape(4, 2, -1)
    means = neighbours.mean(axis=1)
    mean_sigma = np.sqrt(neighbour_var.sum(axis=1)) / 2.0
    sharp = np.any(value >= means + min_sigma * sigma, axis=0)
    contrast = (thresholds[:, None] * (value - noise_factor * sigma)
                > means + noise_factor * mean_sigma)
    is_cr = (value >= 0) & sharp & np.any(contrast, axis=0)
    if opposite is not None and is_cr.any():
        passed = np.flatnonzero(is_cr)
        is_cr[passed] = ~_near_opposite(shape, candidates[passed], opposite, seeds=seeds)
    first = np.argmax(contrast, axis=0)
    replacement = means[first, np.arange(candidates.size)]
    return is_cr, replacement


class _Opposite:
    """Conditions 5 and 6 for one sign: box offsets, levels, signed significance and pixels."""

    def __init__(self, significance: NDArray[np.float32], data: NDArray[np.float32],
                 variance: NDArray[np.float32], sign: float, level: float, fraction: float,
                 radius: int) -> None:
        self.flat = significance.reshape(-1)
        self.data = data.reshape(-1)  # already signed: the image the candidates come from
        self.variance = variance.reshape(-1)
        self.sign = sign
        self.level = level
        self.fraction = fraction
        steps = range(-radius, radius + 1)
        self.offsets = tuple((a, b) for a in steps for b in steps if (a, b) != (0, 0))


def _near_opposite(shape: tuple[int, int], pixels: NDArray[np.intp], opposite: _Opposite,
                   *, seeds: bool) -> NDArray[np.bool_]:
    r"""Whether the box around each of ``pixels`` fails condition 5 or 6.

    Condition 5 (first-pass candidates only, ``seeds``): :math:`s\nu_q < -k_\mathrm{opp}`
    for a pixel :math:`q` of the box. Condition 6 (with :math:`f > 0`):
    :math:`\min_q z_q < -\max(k_\mathrm{opp}, f \max_q z_q)` with :math:`z = sD/\sqrt V`
    over the box, the pixel itself included. Pixels outside the image or without data never
    count.
    """
    index, inside = neighbour_indices(pixels, shape, opposite.offsets)
    refused = np.zeros(pixels.size, dtype=bool)
    if seeds:
        values = opposite.sign * opposite.flat[index]
        refused |= np.any(inside & (values < -opposite.level), axis=0)
    if opposite.fraction > 0:
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (opposite.data[index].astype(np.float64)
                 / np.sqrt(opposite.variance[index].astype(np.float64)))
            centre = (opposite.data[pixels].astype(np.float64)
                      / np.sqrt(opposite.variance[pixels].astype(np.float64)))
        usable = inside & np.isfinite(z)
        lowest = np.min(np.where(usable, z, np.inf), axis=0)
        highest = np.maximum(np.max(np.where(usable, z, -np.inf), axis=0), centre)
        refused |= lowest < -np.maximum(opposite.level, opposite.fraction * highest)
    return refused


def _interior(flat: NDArray[np.intp], shape: tuple[int, int]) -> NDArray[np.bool_]:
    rows, cols = np.divmod(flat, shape[1])
    return (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)


def _groups(pixels: NDArray[np.intp], width: int) -> NDArray[np.intp]:
    """Label of the 8-connected group of every pixel of the sorted flat indices ``pixels``.

    The pixels are few: their adjacency is found with :func:`numpy.searchsorted` over the
    four forward neighbours and the groups with
    :func:`scipy.sparse.csgraph.connected_components`, without a whole-image labelling.
    """
    n = pixels.size
    cols = pixels % width
    first: list[NDArray[np.intp]] = []
    second: list[NDArray[np.intp]] = []
    for step, d_col in ((1, 1), (width - 1, -1), (width, 0), (width + 1, 1)):
        target = pixels + step
        position = np.minimum(np.searchsorted(pixels, target), n - 1)
        linked = (pixels[position] == target) & (cols + d_col >= 0) & (cols + d_col < width)
        first.append(np.flatnonzero(linked))
        second.append(position[linked])
    rows_index, cols_index = np.concatenate(first), np.concatenate(second)
    graph = coo_array((np.ones(rows_index.size), (rows_index, cols_index)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.intp)


def find_cosmic_rays(data: NDArray[np.float32], variance: NDArray[np.float32],
                     skip: NDArray[np.bool_] | None, kernel: NDArray[np.float64], *,
                     min_sigma: float, cond3_fac: float, cond3_fac2: float,
                     n_iter: int, min_snr: float, opposite_sigma: float = 5.0,
                     opposite_radius: int = 4, opposite_fraction: float = 0.0,
                     polarity: str = "positive",
                     significance: NDArray[np.float32] | None = None) -> CosmicRays:
    """Find the cosmic-ray pixels of a background-subtracted image.

    Parameters
    ----------
    data : ndarray of float32, shape (H, W)
        Background-subtracted image, NaN where there is no data. Not modified.
    variance : ndarray of float32, shape (H, W)
        Its variance.
    skip : ndarray of bool or None
        Pixels that are never cosmic rays (no data, skipped planes).
    kernel : ndarray of shape (K, K)
        The PSF image (odd sizes ≥ 3).
    min_sigma, cond3_fac, cond3_fac2 : float
        :math:`k_\\mathrm{min}`, :math:`c` and :math:`f` of the module docstring.
    n_iter : int
        Growing passes.
    min_snr : float
        Smallest S/N of a cosmic ray (an 8-connected group of first-pass pixels): its summed
        excess over the replacement values divided by :math:`\\sqrt{\\sum V}`.
    opposite_sigma : float
        :math:`k_\\mathrm{opp}` of condition 5.
    opposite_radius : int
        :math:`R` of conditions 5 and 6 (pixels); 0 disables both, leaving the plain
        ``CR.cc`` criteria.
    opposite_fraction : float
        :math:`f_\\mathrm{opp}` of condition 6; 0 disables it.
    polarity : {"positive", "both"}
        "both" also finds negative cosmic rays (the same tests on the negated image).
    significance : ndarray of float32, shape (H, W), optional
        :math:`\\nu`, the matched-filter significance of ``data`` (the detector's detection
        image, before any cosmic ray is removed from it); computed when omitted and
        condition 5 is on.

    Returns
    -------
    CosmicRays
        With ``excess`` of the sign of the pixels (negative for negative cosmic rays).
    """
    if polarity not in ("positive", "both"):
        msg = f"cosmic-ray polarity must be 'positive' or 'both', got {polarity!r}"
        raise skydiff.ConfigError(msg)
    if opposite_radius > 0 and significance is None:
        valid = np.isfinite(data)
        filled = np.where(valid, data, np.float32(0.0)).astype(np.float32)
        significance, _, _ = matched_filter(filled, variance, valid, kernel)
    signs = (1.0, -1.0) if polarity == "both" else (1.0,)
    found = []
    for sign in signs:
        signed = data if sign > 0 else np.negative(data)
        opposite = (None if significance is None or opposite_radius <= 0
                    else _Opposite(significance, signed, variance, sign, opposite_sigma,
                                   opposite_fraction, opposite_radius))
        found.append(_find_positive(signed, variance, skip, kernel, min_sigma=min_sigma,
                                    cond3_fac=cond3_fac, cond3_fac2=cond3_fac2,
                                    n_iter=n_iter, min_snr=min_snr, opposite=opposite))
    pixels = found[0] if len(found) == 1 else np.union1d(found[0], found[1])
    if pixels.size == 0:
        return CosmicRays(np.zeros(0, dtype=np.intp), np.zeros(0))
    return CosmicRays(pixels, _excess(data, pixels))


def _find_positive(data: NDArray[np.float32], variance: NDArray[np.float32],
                   skip: NDArray[np.bool_] | None, kernel: NDArray[np.float64], *,
                   min_sigma: float, cond3_fac: float, cond3_fac2: float, n_iter: int,
                   min_snr: float, opposite: _Opposite | None) -> NDArray[np.intp]:
    """Sorted flat indices of the positive cosmic-ray pixels of ``data`` (all conditions)."""
    shape = data.shape
    thresholds = cond3_fac2 * _psf_ratios(kernel)
    level = np.float32(max(min_sigma - _PREFILTER_MARGIN, 1.0) ** 2)
    positive = data > 0  # NaN compares False
    positive &= data * data > level * variance
    candidates = np.flatnonzero(positive)
    del positive
    candidates = candidates[_interior(candidates, shape)]
    if skip is not None:
        candidates = candidates[~skip.reshape(-1)[candidates]]
    empty = np.zeros(0, dtype=np.intp)
    if candidates.size == 0:
        return empty
    is_cr, replacement = _test(data, variance, candidates, thresholds, min_sigma=min_sigma,
                               noise_factor=cond3_fac, opposite=opposite)
    pixels = candidates[is_cr]
    if pixels.size == 0:
        return empty
    pixels, replacement = _bright_groups(data, variance, pixels, replacement[is_cr], min_snr)
    if pixels.size == 0:
        return empty
    work = data.copy()
    flat = work.reshape(-1)
    flat[pixels] = replacement
    for _ in range(n_iter):  # grow: test the neighbours of the cosmic rays found so far
        index, _ = neighbour_indices(pixels, shape)
        around = np.unique(index)
        around = around[~np.isin(around, pixels, assume_unique=True)]
        around = around[_interior(around, shape)]
        if skip is not None:
            around = around[~skip.reshape(-1)[around]]
        if around.size == 0:
            break
        added, values = _test(work, variance, around, thresholds, min_sigma=min_sigma / 2.0,
                              noise_factor=0.0, opposite=opposite, seeds=False)
        if not added.any():
            break
        flat[around[added]] = values[added]
        pixels = np.union1d(pixels, around[added])
    return pixels


def _bright_groups(data: NDArray[np.float32], variance: NDArray[np.float32],
                   pixels: NDArray[np.intp], replacement: NDArray[np.float64], min_snr: float
                   ) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """The pixels (and replacements) of the groups whose summed excess reaches ``min_snr``.

    This is condition 1 of ``CR.cc`` (``min_DN``), expressed as a signal-to-noise ratio so
    that it does not depend on the image's units: a single noise pixel passes conditions 2
    and 3 with a probability of about 1e-7 (an excess of 6 sigma over the mean of two
    neighbours), but never carries 8 sigma of excess.
    """
    groups = _groups(pixels, data.shape[1])
    excess = data.reshape(-1)[pixels].astype(np.float64) - replacement
    signal = np.bincount(groups, weights=excess)
    noise = np.sqrt(np.bincount(groups, weights=variance.reshape(-1)[pixels].astype(np.float64)))
    keep = (signal >= min_snr * noise)[groups]
    return pixels[keep], replacement[keep]


def _excess(data: NDArray[np.float32], pixels: NDArray[np.intp]) -> NDArray[np.float64]:
    """Value minus the mean of the finite, non-cosmic-ray 8-neighbours (0 if none)."""
    flat = data.reshape(-1)
    index, inside = neighbour_indices(pixels, data.shape)
    values = flat[index].astype(np.float64)
    usable = inside & np.isfinite(values) & ~np.isin(index, pixels)
    count = usable.sum(axis=0)
    total = np.where(usable, values, 0.0).sum(axis=0)
    estimate = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return flat[pixels].astype(np.float64) - estimate


def _scatter(pixels: NDArray[np.intp], values: NDArray[np.float64],
             kernel: NDArray[np.float64], shape: tuple[int, int]
             ) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    r"""Sparse correlation: :math:`\Delta(p) = \sum_q K[q - p]\, v_q` over ``pixels`` q.

    Returns the flat indices of the target pixels (sorted, unique) and :math:`\Delta` there;
    each pixel is scattered onto the :math:`K_r K_c` targets of its kernel footprint.
    """
    height, width = shape
    half_r, half_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    rows, cols = np.divmod(pixels, width)
    d_row, d_col = np.meshgrid(np.arange(-half_r, half_r + 1), np.arange(-half_c, half_c + 1),
                               indexing="ij")
    target_r = rows[:, None] - d_row.reshape(1, -1)
    target_c = cols[:, None] - d_col.reshape(1, -1)
    weight = values[:, None] * kernel.reshape(1, -1)
    inside = (target_r >= 0) & (target_r < height) & (target_c >= 0) & (target_c < width)
    targets, inverse = np.unique(target_r[inside] * width + target_c[inside],
                                 return_inverse=True)
    delta = np.bincount(inverse, weights=weight[inside], minlength=targets.size)
    return targets.astype(np.intp), np.asarray(delta, dtype=np.float64)


def remove_from_significance(rays: CosmicRays, significance: NDArray[np.float32],
                             noise: NDArray[np.float32], kernel: NDArray[np.float64]) -> None:
    r"""Subtract the cosmic rays' contribution from a matched-filter significance, in place.

    A cosmic-ray pixel :math:`q` of excess :math:`e_q` adds :math:`P[q - p]\,e_q` to the
    filtered image at every pixel :math:`p` of its PSF footprint, so the significance of the
    image with every cosmic-ray pixel replaced by the mean of its neighbours is

    .. math:: \nu'(p) = \nu(p) - \frac{1}{N(p)} \sum_{q \in \mathrm{CR}} P[q - p]\, e_q .

    The sum is scattered from the (few) cosmic-ray pixels, :math:`K_r K_c` targets each.

    Parameters
    ----------
    rays : CosmicRays
    significance : ndarray of float32, shape (H, W)
        Modified in place.
    noise : ndarray of float32, shape (H, W)
        :math:`N`, the standard deviation of the filtered image.
    kernel : ndarray of shape (K_r, K_c)
        The PSF image of the matched filter (odd sizes).
    """
    if rays.pixels.size == 0:
        return
    targets, delta = _scatter(rays.pixels, rays.excess, kernel, significance.shape)
    flat = significance.reshape(-1)
    sigma = noise.reshape(-1)[targets].astype(np.float64)
    covered = sigma > 0
    flat[targets[covered]] -= (delta[covered] / sigma[covered]).astype(np.float32)


def mask_in_significance(pixels: NDArray[np.intp], data: NDArray[np.float32],
                         variance: NDArray[np.float32], significance: NDArray[np.float32],
                         noise: NDArray[np.float32], kernel: NDArray[np.float64], *,
                         variance_scale: float = 1.0) -> None:
    r"""Give ``pixels`` zero weight in a matched-filter significance, in place.

    With :math:`M` the masked pixels, the filtered image and its variance lose their terms,

    .. math::

        \nu'(p) = \frac{\nu(p)\,N(p) - \sum_{q \in M} P[q - p]\, D_q}
                       {\sqrt{N(p)^2 - \sum_{q \in M} P[q - p]^2\, V_q}},

    exactly the significance of :func:`._significance.matched_filter` with those pixels
    invalid; ``noise`` becomes :math:`N'`. On the masked pixels themselves, and where less
    than ``_MIN_NOISE_FRACTION`` of the variance is left, :math:`\nu' = 0`: they hold no
    data, so no detection peaks there (deep inside a masked disk :math:`\nu'` would rest on
    the few distant pixels its filter still reaches).

    Parameters
    ----------
    pixels : ndarray of int
        Flat indices of the pixels to mask (unique).
    data, variance : ndarray of float32, shape (H, W)
        The filtered image (NaN where there is no data: those pixels have no weight already)
        and its variance.
    significance, noise : ndarray of float32, shape (H, W)
        :math:`\nu` and :math:`N`, modified in place.
    kernel : ndarray of shape (K_r, K_c)
        The PSF image of the matched filter (odd sizes).
    variance_scale : float
        :math:`s^2` when :math:`N` is the measured noise :math:`s\sqrt{V \star P^2}`
        (``noise_calibration``): the masked pixels' variance is scaled alike.
    """
    values = data.reshape(-1)[pixels].astype(np.float64)
    usable = np.isfinite(values)
    pixels, values = pixels[usable], values[usable]
    if pixels.size == 0:
        return
    shape = significance.shape
    targets, delta = _scatter(pixels, values, kernel, shape)
    weights = variance_scale * variance.reshape(-1)[pixels].astype(np.float64)
    _, delta2 = _scatter(pixels, weights, kernel * kernel, shape)
    flat, sigma = significance.reshape(-1), noise.reshape(-1)
    old = sigma[targets].astype(np.float64)
    new2 = old * old - delta2
    kept = new2 > _MIN_NOISE_FRACTION * np.maximum(old * old, np.finfo(np.float64).tiny)
    new = np.sqrt(np.where(kept, new2, 0.0))
    value = flat[targets].astype(np.float64) * old - delta
    flat[targets] = np.where(kept, value / np.where(kept, new, 1.0), 0.0).astype(np.float32)
    sigma[targets] = new.astype(np.float32)
    flat[pixels] = 0.0  # no data there any more: no detection can peak on them


def remove_cosmic_rays(rays: CosmicRays, data: NDArray[np.float32],
                       variance: NDArray[np.float32], significance: NDArray[np.float32],
                       noise: NDArray[np.float32], kernel: NDArray[np.float64], *,
                       level: float, radius: int, mask_radius: float,
                       variance_scale: float = 1.0) -> int:
    r"""Take the cosmic rays out of the significance, in place; the number of masked groups.

    Every cosmic ray (8-connected group of pixels) is first *replaced*
    (:func:`remove_from_significance`). A group whose replacement leaves
    :math:`s\nu' < -k` (``level``; :math:`s` the sign of the pixel) within the
    :math:`(2R+1)^2` box of one of its pixels, where condition 5 held before, did not sit on
    sky: the mean of its neighbours is itself part of the structure — the ring a
    decorrelation filter puts around a sharp feature, or the other half of a balanced
    residual. Such a group is *masked* instead: its pixels and those within ``mask_radius``
    get zero weight (:func:`mask_in_significance`), which takes the ring out with it.

    Parameters
    ----------
    rays : CosmicRays
    data, variance : ndarray of float32, shape (H, W)
        The image the significance was computed from (background subtracted, NaN where
        there is no data) and its variance.
    significance, noise : ndarray of float32, shape (H, W)
        :math:`\nu` and :math:`N`, modified in place.
    kernel : ndarray of shape (K_r, K_c)
        The PSF image of the matched filter.
    level : float
        :math:`k`.
    radius : int
        :math:`R` (0: never mask).
    mask_radius : float
        Radius (pixels) of the disk masked around each pixel of a masked group.
    variance_scale : float
        See :func:`mask_in_significance`.

    Returns
    -------
    int
        The number of masked groups.
    """
    if rays.pixels.size == 0:
        return 0
    shape = significance.shape
    if radius <= 0:
        remove_from_significance(rays, significance, noise, kernel)
        return 0
    trial = significance.copy()
    remove_from_significance(rays, trial, noise, kernel)
    steps = range(-radius, radius + 1)
    offsets = tuple((a, b) for a in steps for b in steps)
    index, inside = neighbour_indices(rays.pixels, shape, offsets)
    sign = np.sign(rays.excess)
    after = np.where(inside, sign * trial.reshape(-1)[index], np.inf).min(axis=0)
    groups = _groups(rays.pixels, shape[1])
    bad = np.zeros(int(groups.max()) + 1, dtype=bool)
    bad[groups[after < -level]] = True
    masked = bad[groups]
    if not masked.any():
        significance[...] = trial
        return 0
    del trial
    kept = ~masked
    if kept.any():
        remove_from_significance(CosmicRays(rays.pixels[kept], rays.excess[kept]),
                                 significance, noise, kernel)
    d_row, d_col = disk_offsets(mask_radius)
    around, inside = neighbour_indices(rays.pixels[masked], shape,
                                       tuple(zip(d_row.tolist(), d_col.tolist(), strict=True)))
    mask_in_significance(np.unique(around[inside]), data, variance, significance, noise,
                         kernel, variance_scale=variance_scale)
    return int(np.count_nonzero(bad))


def cosmic_ray_groups(rays: CosmicRays, width: int) -> NDArray[np.intp]:
    """The 8-connected group (0..n-1) of every cosmic-ray pixel."""
    if rays.pixels.size == 0:
        return np.zeros(0, dtype=np.intp)
    return _groups(rays.pixels, width)
