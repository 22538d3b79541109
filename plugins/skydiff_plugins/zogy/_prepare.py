r"""Input preparation for the ``zogy`` subtraction: checks, masks, sky, filled planes.

Everything here returns new arrays or exposures; the caller's exposures are never modified.

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
]


def plane_bits(planes: skydiff.MaskPlanes, names: Sequence[str]) -> int:
    """The bits of the named planes that ``planes`` defines (0 if none)."""
    present = [name for name in names if name in planes.names]
    return planes.value(*present) if present else 0


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
