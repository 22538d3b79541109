r"""Footprints from thresholded pixels: isotropic growth, local peaks, per-footprint peaks.

Everything works on flat pixel indices of the (few) pixels above threshold, so the cost scales
with the number of detected pixels, not with the image: growing scatters a disk of offsets
around the *boundary* pixels of the thresholded set only (the dilation of a set is the set
plus the dilation of its boundary), and peaks are found by comparing each thresholded pixel
with its eight neighbours. Only the connected-component labelling
(:func:`scipy.ndimage.label`) touches every pixel.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["Peaks", "dilate", "disk_offsets", "label_footprints", "local_peaks",
           "neighbour_indices"]

#: The eight neighbours ``(d_row, d_col)`` of a pixel.
_EIGHT = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
#: The four edge neighbours of a pixel.
_FOUR = ((-1, 0), (1, 0), (0, -1), (0, 1))
#: 8-connectivity for the labelling of grown footprints.
_STRUCTURE = np.ones((3, 3), dtype=bool)


def disk_offsets(radius: float) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Row and column offsets of the pixels of a disk, ``dr² + dc² <= radius²``.

    Parameters
    ----------
    radius : float
        Radius in pixels (≥ 0).

    Returns
    -------
    rows, cols : ndarray of int
        The offsets, the centre included.
    """
    half = math.floor(radius + 1e-9)
    grid = np.arange(-half, half + 1)
    d_row, d_col = np.meshgrid(grid, grid, indexing="ij")
    inside = d_row**2 + d_col**2 <= radius * radius + 1e-9
    return d_row[inside].astype(np.intp), d_col[inside].astype(np.intp)


def neighbour_indices(flat: NDArray[np.intp], shape: tuple[int, int],
                      offsets: tuple[tuple[int, int], ...] = _EIGHT
                      ) -> tuple[NDArray[np.intp], NDArray[np.bool_]]:
    """Flat indices of the neighbours of pixels, and whether each lies inside the image.

    Parameters
    ----------
    flat : ndarray of int, shape (n,)
        Flat (row-major) indices of the pixels.
    shape : tuple of int
        ``(H, W)``.
    offsets : tuple of (int, int)
        Neighbour offsets ``(d_row, d_col)``; default the eight neighbours.

    Returns
    -------
    index : ndarray of int, shape (len(offsets), n)
        Flat indices (clipped into the image where the neighbour is outside).
    inside : ndarray of bool, shape (len(offsets), n)
    """
    height, width = shape
    rows, cols = np.divmod(flat, width)
    d_row = np.array([o[0] for o in offsets])[:, None]
    d_col = np.array([o[1] for o in offsets])[:, None]
    r = rows[None, :] + d_row
    c = cols[None, :] + d_col
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    index = np.clip(r, 0, height - 1) * width + np.clip(c, 0, width - 1)
    return index, inside


def dilate(mask: NDArray[np.bool_], seeds: NDArray[np.intp], radius: float
           ) -> NDArray[np.bool_]:
    r"""Grow the set ``seeds`` (flat indices, all True in ``mask``) by a disk, in place.

    The dilation of a set :math:`S` by a disk :math:`D_r` is :math:`S \cup (\partial S
    \oplus D_r)`, :math:`\partial S` being the pixels of :math:`S` with a 4-neighbour outside
    it: a disk of offsets is scattered around the boundary pixels only (one vectorised
    scatter per offset of the disk).

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
        True exactly at the seeds; modified in place.
    seeds : ndarray of int
        Flat indices of the pixels to grow.
    radius : float
        Disk radius in pixels; below 1 nothing is grown.

    Returns
    -------
    ndarray of bool
        ``mask`` itself.
    """
    if radius < 1.0 or seeds.size == 0:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1)
    index, inside = neighbour_indices(seeds, shape, _FOUR)
    interior = np.all(flat[index] & inside, axis=0)
    boundary = seeds[~interior]
    height, width = shape
    rows, cols = np.divmod(boundary, width)
    for d_row, d_col in zip(*disk_offsets(radius), strict=True):  # loop over the disk
        r = rows + d_row
        c = cols + d_col
        ok = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        flat[r[ok] * width + c[ok]] = True
    return mask


def local_peaks(significance: NDArray[np.float32], seeds: NDArray[np.intp], *,
                negative: bool) -> NDArray[np.intp]:
    """The seeds that are local extrema of ``significance`` over their eight neighbours.

    A positive peak is at least as large as each of its neighbours (a negative one at most
    as large); neighbours outside the image are ignored.

    Parameters
    ----------
    significance : ndarray of float32, shape (H, W)
    seeds : ndarray of int
        Flat indices of the thresholded pixels of one polarity.
    negative : bool
        Look for minima instead of maxima.

    Returns
    -------
    ndarray of int
        Flat indices of the peaks, a subset of ``seeds`` in the same order.
    """
    if seeds.size == 0:
        return seeds
    flat = significance.reshape(-1)
    values = flat[seeds]
    index, inside = neighbour_indices(seeds, significance.shape)
    neighbours = flat[index]
    if negative:
        keep = np.all((values[None, :] <= neighbours) | ~inside, axis=0)
    else:
        keep = np.all((values[None, :] >= neighbours) | ~inside, axis=0)
    return seeds[keep]


def label_footprints(mask: NDArray[np.bool_]
                     ) -> tuple[NDArray[np.int32], int, NDArray[np.intp], NDArray[np.int32]]:
    """Label the 8-connected components of ``mask``.

    Returns
    -------
    labels : ndarray of int32, shape (H, W)
        0 outside, ``1..n`` inside the components (raster order of their first pixel).
    n : int
        The number of components.
    pixels : ndarray of int
        Flat indices of the pixels of ``mask``.
    pixel_labels : ndarray of int32
        Their labels.
    """
    labels = np.empty(mask.shape, dtype=np.int32)
    n = int(ndimage.label(mask, structure=_STRUCTURE, output=labels))
    pixels = np.flatnonzero(mask)
    return labels, n, pixels, labels.reshape(-1)[pixels]


class Peaks:
    """The peaks of all footprints, with their footprint labels.

    Parameters
    ----------
    flat : ndarray of int
        Flat pixel indices.
    significance : ndarray of float
        Signed significance at each peak.
    labels : ndarray of int
        Footprint label of each peak (≥ 1).
    """

    def __init__(self, flat: NDArray[np.intp], significance: NDArray[np.float64],
                 labels: NDArray[np.int32]) -> None:
        self.flat = flat
        self.significance = significance
        self.labels = labels

    def strongest(self, n_labels: int, *, sign: int = 0) -> NDArray[np.intp]:
        """Index (into these peaks) of the strongest peak of every label, -1 where none.

        Parameters
        ----------
        n_labels : int
            Labels run from 1 to ``n_labels``.
        sign : {0, 1, -1}
            0: largest :math:`|\\nu|`; 1: largest positive; -1: most negative (only peaks of
            that sign count).

        Returns
        -------
        ndarray of int, shape (n_labels + 1,)
            Entry 0 is unused (-1).
        """
        out = np.full(n_labels + 1, -1, dtype=np.intp)
        candidates = np.arange(self.labels.size)
        if sign > 0:
            candidates = candidates[self.significance > 0]
        elif sign < 0:
            candidates = candidates[self.significance < 0]
        if candidates.size == 0:
            return out
        strength = self.significance[candidates] * sign if sign else np.abs(
            self.significance[candidates])
        # ordered by label, then by decreasing strength (stable: ties keep raster order)
        order = np.lexsort((-strength, self.labels[candidates]))
        ordered = candidates[order]
        labels = self.labels[ordered]
        first = np.ones(labels.size, dtype=bool)
        first[1:] = labels[1:] != labels[:-1]
        out[labels[first]] = ordered[first]
        return out

    def count(self, n_labels: int) -> NDArray[np.int64]:
        """Number of peaks of every label (entry 0 unused)."""
        return np.bincount(self.labels, minlength=n_labels + 1).astype(np.int64)
