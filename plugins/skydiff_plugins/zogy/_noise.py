r"""Correlated noise: the difference's noise power spectrum and the variance factors.

The exact propagation :math:`V\otimes k^2` assumes that the pixels of each input are
independent. Resampled, drizzled or stacked images violate that: neighbouring pixels are
correlated, and a filter that sums many pixels -- the score's matched filter above all -- has
a larger variance than the variance planes predict. The correction is measured on the
difference itself, where the static sky has cancelled: with its normalised noise power
spectrum

.. math::

    \Phi(\mathbf k) = \frac{\big\langle|\widehat{w}(\mathbf k)|^2\big\rangle}{n},
    \qquad w = \frac{D}{\sqrt{V_D}}\ \text{on blank pixels (0 elsewhere)},

(:math:`n` the number of blank pixels of a tile; :math:`\Phi \equiv 1` for white noise that
the variance plane describes), a kernel :math:`k` applied to :math:`D` multiplies the
variance by

.. math::

    f = \frac{\sum_{\mathbf k} |\hat k(\mathbf k)|^2\,\Phi(\mathbf k)}
             {\sum_{\mathbf k} |\hat k(\mathbf k)|^2}

relative to white noise: :math:`f_D = \langle\Phi\rangle` for the difference itself
(:math:`k = \delta`) and :math:`f_S` with :math:`k = P_D` for the score
:math:`S = F_D^2\,P_D\star D`. :func:`noise_power` measures :math:`\Phi` on tiles and
:func:`variance_factor` gives :math:`f` and its standard error from the scatter between
tiles.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import scipy.fft
from scipy import ndimage

__all__ = ["NoisePower", "noise_power", "variance_factor"]


@attrs.frozen
class NoisePower:
    """The normalised noise power spectrum of an input, per tile.

    Attributes
    ----------
    tiles : ndarray of shape (n_tiles, T, T // 2 + 1)
        :math:`\\Phi` of every tile (``rfft2`` layout).
    tile : int
        The tile side ``T``.
    """

    tiles: np.ndarray = attrs.field(eq=False, repr=False)
    tile: int

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return int(self.tiles.shape[0])


def noise_power(image: np.ndarray, variance: np.ndarray, excluded: np.ndarray, *,
                tile: int, sigma: float, max_tiles: int = 64, min_fraction: float = 0.3
                ) -> NoisePower | None:
    """:math:`\\Phi` on up to ``max_tiles`` tiles of ``tile`` × ``tile`` pixels.

    Sky pixels are those not ``excluded``, with a positive variance, :math:`|w| < 5`, and
    away from sources: pixels where :math:`w` smoothed by a Gaussian of width ``sigma`` (the
    PSF's) deviates from its median by more than 4 of its robust standard deviations are
    masked and grown by :math:`3\\sigma`.
    Tiles with at least ``min_fraction`` sky pixels are used, spread evenly.

    Returns
    -------
    NoisePower or None
        None when no tile qualifies.
    """
    height, width = image.shape
    if tile > min(height, width):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(variance > 0, image / np.sqrt(np.where(variance > 0, variance, 1.0)), 0.0)
    w = np.where(excluded | ~np.isfinite(w), 0.0, w).astype(np.float32)
    smooth = ndimage.gaussian_filter(w, sigma, mode="constant")
    # threshold in units of the smoothed image's own (robust) noise, which correlated noise
    # raises above the white-noise value
    sample = smooth[::3, ::3][~excluded[::3, ::3]]
    if sample.size < 16:
        return None
    centre = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - centre)))
    if not spread > 0:
        return None
    sources = np.abs(smooth - centre) > 4.0 * spread
    grow = max(1, math.ceil(3.0 * sigma))
    if sources.any():
        sources = ndimage.maximum_filter(sources.view(np.uint8), size=2 * grow + 1) > 0
    sky = ~excluded & (variance > 0) & ~sources & (np.abs(w) < 5.0)
    rows = range(0, height - tile + 1, tile)
    cols = range(0, width - tile + 1, tile)
    corners = [(r, c) for r in rows for c in cols]
    counts = np.array([np.count_nonzero(sky[r:r + tile, c:c + tile]) for r, c in corners])
    usable = [corner for corner, count in zip(corners, counts, strict=True)
              if count >= min_fraction * tile * tile]
    if not usable:
        return None
    if len(usable) > max_tiles:
        pick = np.linspace(0, len(usable) - 1, max_tiles).round().astype(int)
        usable = [usable[i] for i in pick]
    stack = np.stack([np.where(sky[r:r + tile, c:c + tile], w[r:r + tile, c:c + tile], 0.0)
                      for r, c in usable]).astype(np.float64)
    n = np.array([np.count_nonzero(sky[r:r + tile, c:c + tile]) for r, c in usable])
    power = np.abs(scipy.fft.rfft2(stack, axes=(-2, -1))) ** 2 / n[:, None, None]
    return NoisePower(tiles=power, tile=tile)


def _wrapped_spectrum(kernel: np.ndarray, tile: int) -> np.ndarray:
    size = kernel.shape[0]
    half = size // 2
    if size > tile:  # a kernel larger than the tile: its centre (its tail is negligible)
        keep = (tile - 1) // 2
        kernel = kernel[half - keep:half + keep + 1, half - keep:half + keep + 1]
        size = kernel.shape[0]
        half = size // 2
    grid = np.zeros((tile, tile))
    grid[:size, :size] = kernel
    grid = np.roll(grid, (-half, -half), axis=(0, 1))
    return np.abs(scipy.fft.rfft2(grid)) ** 2


def variance_factor(power: NoisePower | None, kernel: np.ndarray) -> tuple[float, float]:
    """``(f, error)``: the variance factor of ``kernel`` applied to the input (module notes).

    The ``rfft2`` half plane counts the columns that stand for two frequencies twice. The
    error is the standard error of the per-tile factors (infinite with fewer than 4 tiles,
    and ``(1, inf)`` without a measurement).
    """
    if power is None:
        return 1.0, math.inf
    tile = power.tile
    weight = _wrapped_spectrum(np.asarray(kernel, dtype=np.float64), tile)
    multiplicity = np.full(weight.shape[1], 2.0)
    multiplicity[0] = 1.0
    if tile % 2 == 0:
        multiplicity[-1] = 1.0
    weight = weight * multiplicity[None, :]
    total = float(weight.sum())
    if not total > 0:
        return 1.0, math.inf
    per_tile = np.einsum("tij,ij->t", power.tiles, weight) / total
    factor = float(per_tile.mean())
    if per_tile.size < 4:
        return factor, math.inf
    return factor, float(per_tile.std(ddof=1) / math.sqrt(per_tile.size))
