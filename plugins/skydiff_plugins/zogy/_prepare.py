r"""Input preparation for the ``zogy`` subtraction: checks, masks, sky, filled planes.

Everything here returns new arrays or exposures; the caller's exposures are never modified.

* :func:`validate_pair` -- same shape and origin, WCSs within a tolerance;
* :func:`template_coverage` -- the fraction of pixels with data in both images;
* :func:`variance_factor` -- ``ScaleVarianceTask`` on a tile sample of large images;
* :func:`mask_hygiene` -- the template planes kept for the difference (``SAT`` copied to
  ``SAT_TEMPLATE``), the science's detection planes cleared;
* :func:`fill_mask` -- the pixels replaced before the FFTs (masked planes, non-finite values);
* :func:`sky_background` -- a smooth two-pass sky mesh with the sources masked;
* :func:`filled_planes` -- the sky-subtracted image and the variance with the fill pixels
  replaced by the local sky (0) and the local variance (optionally with noise);
* :func:`dilate_mask` -- every bit plane OR-dilated by a box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

import skydiff

__all__ = [
    "dilate_mask",
    "fill_mask",
    "filled_planes",
    "mask_hygiene",
    "plane_bits",
    "sampled_median",
    "sky_background",
    "template_coverage",
    "validate_pair",
    "variance_factor",
]


def plane_bits(planes: skydiff.MaskPlanes, names: Sequence[str]) -> int:
    """The bits of the named planes that ``planes`` defines (0 if none)."""
    present = [name for name in names if name in planes.names]
    return planes.value(*present) if present else 0


def validate_pair(science: object, template: object, *, max_wcs_offset: float) -> None:
    """Check that two exposures can be subtracted pixel by pixel.

    Parameters
    ----------
    science, template : skydiff.Exposure
        The inputs.
    max_wcs_offset : float
        Largest distance (science pixels) between a science pixel and the template pixel the
        template WCS puts at the same sky position, checked at the corners and the centre
        when both exposures have a WCS.

    Raises
    ------
    skydiff.InputError
        If an input is not an Exposure, or shapes, origins or WCSs disagree.
    """
    for name, value in (("science", science), ("template", template)):
        if not isinstance(value, skydiff.Exposure):
            msg = f"{name} must be a skydiff.Exposure, got {type(value).__name__}"
            raise skydiff.InputError(msg)
    assert isinstance(science, skydiff.Exposure) and isinstance(template, skydiff.Exposure)
    if science.shape != template.shape or science.origin != template.origin:
        msg = (f"template {template.shape} at origin {template.origin} is not on the science "
               f"grid {science.shape} at origin {science.origin}; resample the template onto "
               "the science pixel grid first (e.g. with a template_getter)")
        raise skydiff.InputError(msg)
    if science.wcs is None or template.wcs is None:
        return
    height, width = science.shape
    xs = np.array([0.0, width - 1.0, 0.0, width - 1.0, 0.5 * (width - 1)])
    ys = np.array([0.0, 0.0, height - 1.0, height - 1.0, 0.5 * (height - 1)])
    try:
        world = science.wcs.pixel_to_world_values(xs, ys)
        tx, ty = template.wcs.world_to_pixel_values(*world)
    except Exception as exc:  # astropy raises several types for singular/odd WCSs
        msg = f"cannot compare the science and template WCS: {exc}; resample the template first"
        raise skydiff.InputError(msg) from exc
    offset = float(np.nanmax(np.hypot(np.asarray(tx) - xs, np.asarray(ty) - ys)))
    if not offset <= max_wcs_offset:
        msg = (f"the template WCS is offset by {offset:.3g} pixels from the science WCS (limit "
               f"{max_wcs_offset:g}); resample the template onto the science pixel grid first")
        raise skydiff.InputError(msg)


def template_coverage(science: skydiff.Exposure, template: skydiff.Exposure) -> float:
    """Fraction of pixels where neither image is ``NO_DATA`` nor non-finite."""
    missing = np.zeros(science.shape, dtype=bool)
    for exposure in (science, template):
        bits = plane_bits(exposure.mask_planes, ("NO_DATA",))
        if bits:
            missing |= (exposure.mask & np.uint32(bits)) != 0
        missing |= ~np.isfinite(exposure.image)
    return float(1.0 - np.count_nonzero(missing) / missing.size)


def variance_factor(exposure: skydiff.Exposure, *, max_pixels: int = 1 << 19,
                    tile: int = 512) -> float:
    r"""The variance-plane correction factor (``ScaleVarianceTask``) of an exposure.

    :func:`skydiff.variance_scale_factor` -- the squared ratio of the measured pixel noise to
    the noise the variance plane predicts -- on the whole image when it has at most
    ``max_pixels`` pixels, else the mean over ``max_pixels / tile²`` tiles spread evenly over
    it: half a million pixels give the factor to about 0.3 % (the IQR noise estimate of
    :math:`N` Gaussian values has a relative error :math:`1.1/\sqrt N`, the factor twice
    that).

    Returns
    -------
    float
        The factor :math:`f` (multiply the variance plane by it).
    """
    height, width = exposure.shape
    if height * width <= max_pixels or min(height, width) < 2 * tile:
        return float(skydiff.variance_scale_factor(exposure))
    n_tiles = max(1, max_pixels // (tile * tile))
    n_rows = max(1, min(height // tile, round(math.sqrt(n_tiles * height / width))))
    n_cols = max(1, min(width // tile, n_tiles // n_rows))
    factors = []
    for r0 in np.linspace(0, height - tile, n_rows).astype(int):
        for c0 in np.linspace(0, width - tile, n_cols).astype(int):
            cut = exposure.cutout(slice(r0, r0 + tile), slice(c0, c0 + tile))
            try:
                factors.append(float(skydiff.variance_scale_factor(cut)))
            except skydiff.InputError:  # a fully masked tile
                continue
    if not factors:
        return float(skydiff.variance_scale_factor(exposure))
    return float(np.mean(factors))


def mask_hygiene(science: skydiff.Exposure, template: skydiff.Exposure, *,
                 preserve_template_planes: Sequence[str],
                 clear_science_planes: Sequence[str] = ("DETECTED", "DETECTED_NEGATIVE"),
                 template_copies: Sequence[tuple[str, str]] = (
                     ("SAT", "SAT_TEMPLATE"), ("INJECTED", "INJECTED_TEMPLATE")),
                 ) -> tuple[np.ndarray, skydiff.MaskPlanes, np.ndarray, skydiff.MaskPlanes]:
    """The masks that describe the difference (``updateMasks`` of ``lsst.ip.diffim``).

    * template: ``SAT`` is copied to ``SAT_TEMPLATE`` and ``INJECTED`` to
      ``INJECTED_TEMPLATE``, then every plane except ``preserve_template_planes`` and the
      copies is cleared;
    * science: the detection planes are cleared.

    Returns
    -------
    science_mask : ndarray of uint32
    science_planes : skydiff.MaskPlanes
    template_mask : ndarray of uint32
    template_planes : skydiff.MaskPlanes
        New arrays (the inputs' masks are not modified).
    """
    s_planes = science.mask_planes
    s_clear = plane_bits(s_planes, clear_science_planes)
    s_mask = np.bitwise_and(science.mask, np.uint32(~s_clear & 0xFFFFFFFF))

    t_planes = template.mask_planes
    source = template.mask
    t_mask = np.zeros_like(source)
    copies = []
    for name, target in template_copies:
        if name in t_planes.names:
            t_planes = t_planes.with_plane(target)
            copies.append(target)
            flags = (source & np.uint32(t_planes.value(name))) != 0
            t_mask |= flags.astype(np.uint32) << np.uint32(t_planes.bit(target))
    keep = plane_bits(t_planes, (*preserve_template_planes, *copies))
    t_mask |= source & np.uint32(keep)
    return s_mask, s_planes, t_mask, t_planes


def fill_mask(exposure: skydiff.Exposure, planes: Sequence[str]) -> np.ndarray:
    """Pixels replaced before the FFTs: any of ``planes``, or a non-finite or negative value.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    bad = ~np.isfinite(exposure.image) | ~(exposure.variance >= 0) \
        | ~np.isfinite(exposure.variance)
    bits = plane_bits(exposure.mask_planes, planes)
    if bits:
        bad |= (exposure.mask & np.uint32(bits)) != 0
    return bad


def sky_background(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                   bin_size: int, grow: int) -> np.ndarray:
    r"""A smooth sky map with the sources masked (two passes of :func:`skydiff.background_mesh`).

    The first mesh ignores only ``bad`` pixels (non-finite ones always); pixels more than 3σ
    above it (σ from the variance plane), grown by ``grow`` pixels (the stars' wings), are
    masked as well for the second. Noise pixels above 3σ (0.13 %) grown by a few pixels bias
    the sky by far less than its own noise.

    Parameters
    ----------
    image, variance : ndarray of shape (H, W)
        The image and its variance.
    bad : ndarray of bool
        Pixels never used.
    bin_size : int
        Mesh bin size in pixels.
    grow : int
        Source-mask growth in pixels.

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    height, width = image.shape
    size = max(4, min(bin_size, height, width))
    if bad.all():
        return np.zeros(image.shape, dtype=np.float32)
    first = skydiff.background_mesh(image, mask=bad, bin_size=size)
    with np.errstate(invalid="ignore"):
        residual = np.subtract(image, first, dtype=np.float32)
        sources = (residual > 0) & (np.square(residual) > np.float32(9.0) * variance)
    sources &= ~bad
    if grow > 0 and sources.any():
        sources = ndimage.maximum_filter(sources.view(np.uint8), size=2 * grow + 1) > 0
    mask = bad | sources
    if np.count_nonzero(~mask) < 0.1 * mask.size:
        return np.asarray(first, dtype=np.float32)
    return np.asarray(skydiff.background_mesh(image, mask=mask, bin_size=size),
                      dtype=np.float32)


def filled_planes(exposure: skydiff.Exposure, bad: np.ndarray, sky: np.ndarray, *,
                  noise_seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    r"""The sky-subtracted image and the variance, with the ``bad`` pixels filled.

    Filled image pixels get the local sky, i.e. 0 after the subtraction (plus Gaussian noise
    of their variance when ``noise_seed`` is not None); filled variance pixels get the median
    variance of the good pixels (every third row and column). Elsewhere the image is
    :math:`I - B` and the variance is unchanged.

    Returns
    -------
    image, variance : ndarray of float32, shape (H, W)
        New, writable arrays.
    """
    image = np.subtract(exposure.image, sky, dtype=np.float32)
    variance = np.array(exposure.variance, dtype=np.float32)
    if not bad.any():
        return image, variance
    if bad.all():
        image.fill(0.0)
        variance.fill(0.0)
        return image, variance
    level = sampled_median(variance, ~bad)
    image[bad] = 0.0
    variance[bad] = level
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        image[bad] = (rng.standard_normal(int(np.count_nonzero(bad)))
                      * math.sqrt(level)).astype(np.float32)
    return image, variance


def sampled_median(values: np.ndarray, good: np.ndarray, *, stride: int = 3) -> float:
    """Median of ``values[good]`` over every ``stride``-th row and column (0 if none)."""
    sample = values[::stride, ::stride][good[::stride, ::stride]]
    if sample.size == 0:
        sample = values[good]
    return float(np.median(sample)) if sample.size else 0.0


def dilate_mask(mask: np.ndarray, radius: tuple[int, int]) -> np.ndarray:
    """Every bit plane of ``mask`` OR-dilated by a ``(2 r_y + 1) × (2 r_x + 1)`` box.

    Each bit in use is dilated on its own with a separable maximum filter (:math:`O(N)` per
    plane whatever the box size).

    Parameters
    ----------
    mask : ndarray of uint32
        The mask (not modified).
    radius : tuple of int
        ``(r_y, r_x)`` in pixels.

    Returns
    -------
    ndarray of uint32
        A new array.
    """
    ry, rx = (max(0, int(r)) for r in radius)
    used = int(np.bitwise_or.reduce(mask, axis=None)) if mask.size else 0
    if not used or (ry == 0 and rx == 0):
        return mask.copy()
    out = np.zeros_like(mask)
    for bit in range(32):
        if not used >> bit & 1:
            continue
        plane = ((mask >> np.uint32(bit)) & np.uint32(1)).astype(np.uint8)
        grown = ndimage.maximum_filter(plane, size=(2 * ry + 1, 2 * rx + 1), mode="constant")
        out |= grown.astype(np.uint32) << np.uint32(bit)
    return out
