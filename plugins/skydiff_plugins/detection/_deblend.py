r"""Peak-based deblending of merged footprints into children (one catalog row each).

A grown footprint can hold several sources: a transient next to a star, a fading star next
to a new one, or the two lobes of a dipole. Inside every footprint the peaks of the
significance image :math:`\nu` are turned into *children* in three steps:

1. **Significant peaks.** A peak :math:`p` of sign :math:`s` (``+1`` for a maximum of
   :math:`\nu`, ``-1`` for a minimum) is kept when it is the strongest peak of its sign in
   the footprint, or when every path inside the footprint from :math:`p` to a stronger peak
   of the same sign dips to a *saddle* at least :math:`c` (``min_contrast``) below it:

   .. math::

       \mathrm{prominence}(p) = s\nu_p - \max_{q:\, s\nu_q > s\nu_p}\;
       \max_{\gamma: p \to q}\; \min_{r \in \gamma} s\nu_r \;\ge\; c,

   paths :math:`\gamma` running over 8-connected pixels of the footprint (the topographic
   prominence of :math:`p`). Equivalently, :math:`p` is dropped when, among the footprint
   pixels with :math:`s\nu > s\nu_p - c`, the 8-connected component of :math:`p` contains a
   stronger peak: one :func:`scipy.ndimage.label` of the footprint's bounding box per peak
   to test, and only peaks that share their footprint with another peak of their sign are
   tested (few). Ties are broken by raster order, so of two equal adjacent peaks one stays.
   Peaks are thresholded pixels, so every kept peak is also above the threshold.
2. **Children.** A positive and a negative kept peak of the same footprint closer than
   ``max_separation`` pixels are the two lobes of one *dipole child*; candidate pairs are
   taken greedily by decreasing :math:`|\nu_+| + |\nu_-|` (then increasing distance), each
   peak in at most one pair. Every other kept peak is a child of its own.
3. **Pixels.** Every pixel of a footprint with several children goes to the child of its
   nearest kept peak (Euclidean distance, one :class:`scipy.spatial.cKDTree` query for all
   such pixels; the footprint label is a third coordinate scaled beyond the image
   diagonal, so that the nearest peak is always one of the pixel's own footprint).

Pixels of dropped peaks go to the nearest kept peak like any other pixel.

References
----------
.. [1] Lupton, R. H. et al. 2001, ASP Conf. Ser. 238, 269 (the SDSS deblender: children
   from the peaks of a parent footprint).
.. [2] Bosch, J. et al. 2018, PASJ 70, S5 (peaks and parent/child footprints in the LSST/HSC
   pipeline).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from ._footprints import Peaks

__all__ = ["Children", "deblend", "group_children", "no_deblending", "significant_peaks"]

#: 8-connectivity of the saddle paths (as the footprints and the peaks).
_STRUCTURE = np.ones((3, 3), dtype=bool)
#: Half-side (pixels) of the first window in which the component of a peak is labelled.
_WINDOW = 8


class Children(NamedTuple):
    """The children of the footprints: their peaks, parents and pixels.

    Attributes
    ----------
    peaks : ndarray of int
        Index (into the :class:`Peaks` of the run) of every kept peak.
    peak_child : ndarray of int32
        Child (``1..n``) of each kept peak.
    parent : ndarray of int32, shape (n + 1,)
        Footprint label of every child (entry 0 unused).
    pixel_child : ndarray of int32
        Child of every footprint pixel (aligned with the footprint pixels; 0 for the pixels
        of a footprint without peak).
    n : int
        Number of children.
    """

    peaks: NDArray[np.intp]
    peak_child: NDArray[np.int32]
    parent: NDArray[np.int32]
    pixel_child: NDArray[np.int32]
    n: int


def no_deblending(peaks: Peaks, n_labels: int, pixel_labels: NDArray[np.int32]) -> Children:
    """Children equal to the footprints: every peak kept, one child per footprint."""
    return Children(np.arange(peaks.flat.size), peaks.labels.astype(np.int32),
                    np.arange(n_labels + 1, dtype=np.int32), pixel_labels, n_labels)


def significant_peaks(peaks: Peaks, significance: NDArray[np.float32],
                      labels: NDArray[np.int32], *, min_contrast: float
                      ) -> NDArray[np.bool_]:
    r"""Which peaks are significant: strongest of their sign, or prominent by ``min_contrast``.

    Parameters
    ----------
    peaks : Peaks
        All peaks, with their footprint labels.
    significance : ndarray of float32, shape (H, W)
        The detection image :math:`\nu`.
    labels : ndarray of int32, shape (H, W)
        The footprint label image (0 outside).
    min_contrast : float
        Smallest prominence (in units of :math:`\nu`, i.e. sigma) of a peak that is not the
        strongest of its sign in its footprint; 0 keeps every peak.

    Returns
    -------
    ndarray of bool
        True for the kept peaks, in the order of ``peaks``.
    """
    n = peaks.flat.size
    keep = np.ones(n, dtype=bool)
    if n < 2 or min_contrast <= 0.0:
        return keep
    negative = peaks.significance < 0
    key = peaks.labels.astype(np.int64) * 2 + negative
    shared = np.bincount(key)[key] >= 2
    if not shared.any():
        return keep
    strength = np.abs(peaks.significance)
    tested = np.flatnonzero(shared)
    # grouped by (footprint, sign), strongest first, ties in raster order
    tested = tested[np.lexsort((peaks.flat[tested], -strength[tested], key[tested]))]
    starts = np.flatnonzero(np.diff(key[tested], prepend=-1))
    boxes = ndimage.find_objects(labels)
    width = labels.shape[1]
    for group in np.split(tested, starts[1:]):  # loop over footprints with shared peaks
        label = int(peaks.labels[group[0]])
        box = boxes[label - 1]
        assert box is not None
        sign = -1.0 if negative[group[0]] else 1.0
        rows, cols = np.divmod(peaks.flat[group], width)
        rows = rows - box[0].start
        cols = cols - box[1].start
        values = significance[box]
        inside = labels[box] == label
        for k in range(1, group.size):  # loop over the peaks of one footprint
            keep[group[k]] = not _joins_stronger(
                values, inside, sign, rows, cols, k,
                level=strength[group[k]] - min_contrast)
    return keep


def _joins_stronger(values: NDArray[np.float32], inside: NDArray[np.bool_], sign: float,
                    rows: NDArray[np.intp], cols: NDArray[np.intp], k: int, *,
                    level: float) -> bool:
    """Whether peak ``k`` is connected to one of the peaks ``0..k-1`` above ``level``.

    The 8-connected component of peak ``k`` among the pixels of ``inside`` with
    ``sign * values > level`` is labelled in a window around the peak that doubles until
    the component either reaches a stronger peak or lies wholly inside the window (the
    component of a prominent peak is small, so big crowded footprints cost little).
    """
    height, width = values.shape
    row, col = int(rows[k]), int(cols[k])
    half = _WINDOW
    while True:
        r0, r1 = max(row - half, 0), min(row + half + 1, height)
        c0, c1 = max(col - half, 0), min(col + half + 1, width)
        region = inside[r0:r1, c0:c1] & (sign * values[r0:r1, c0:c1] > level)
        components, _ = ndimage.label(region, structure=_STRUCTURE)
        own = components[row - r0, col - c0]
        if own == 0:  # only when min_contrast <= 0
            return False
        others_r, others_c = rows[:k], cols[:k]
        seen = (others_r >= r0) & (others_r < r1) & (others_c >= c0) & (others_c < c1)
        if np.any(components[others_r[seen] - r0, others_c[seen] - c0] == own):
            return True
        mine = components == own
        touches = ((r0 > 0 and bool(mine[0].any())) or (r1 < height and bool(mine[-1].any()))
                   or (c0 > 0 and bool(mine[:, 0].any()))
                   or (c1 < width and bool(mine[:, -1].any())))
        if not touches:
            return False
        half *= 2


def _dipole_pairs(rows: NDArray[np.intp], cols: NDArray[np.intp],
                  significance: NDArray[np.float64], labels: NDArray[np.int32],
                  max_separation: float, scale: float) -> NDArray[np.intp]:
    """Partner (index into the given peaks) of every peak in a dipole pair, -1 if none."""
    partner = np.full(rows.size, -1, dtype=np.intp)
    positive = np.flatnonzero(significance > 0)
    negative = np.flatnonzero(significance < 0)
    if positive.size == 0 or negative.size == 0 or max_separation <= 0.0:
        return partner
    points = np.column_stack([rows, cols, labels * scale]).astype(np.float64)
    near = cKDTree(points[positive]).sparse_distance_matrix(
        cKDTree(points[negative]), max_separation, output_type="ndarray")
    near = near[near["v"] < max_separation]  # strictly closer than the separation
    if near.size == 0:
        return partner
    pos, neg = positive[near["i"]], negative[near["j"]]
    strength = np.abs(significance[pos]) + np.abs(significance[neg])
    order = np.lexsort((near["v"], -strength))
    for p, q in zip(pos[order], neg[order], strict=True):  # greedy, over candidate pairs
        if partner[p] < 0 and partner[q] < 0:
            partner[p], partner[q] = q, p
    return partner


def group_children(peaks: Peaks, kept: NDArray[np.intp], width: int, *,
                   max_separation: float, scale: float
                   ) -> tuple[NDArray[np.int32], NDArray[np.int32], int]:
    """Group the kept peaks into children: dipole pairs and single peaks.

    Parameters
    ----------
    peaks : Peaks
        All peaks.
    kept : ndarray of int
        Indices of the kept peaks.
    width : int
        Image width (to turn flat indices into rows and columns).
    max_separation : float
        Largest distance (pixels, exclusive) between the two lobes of a dipole child.
    scale : float
        Distance between consecutive footprint labels in the third KD-tree coordinate
        (larger than the image diagonal).

    Returns
    -------
    peak_child : ndarray of int32
        Child ``1..n`` of each kept peak.
    parent : ndarray of int32, shape (n + 1,)
        Footprint label of each child (entry 0 unused).
    n : int
        The number of children.
    """
    rows, cols = np.divmod(peaks.flat[kept], width)
    labels = peaks.labels[kept]
    partner = _dipole_pairs(rows, cols, peaks.significance[kept], labels, max_separation,
                            scale)
    index = np.arange(kept.size)
    # a pair is one child, named after its member of lower index
    leader = np.where(partner >= 0, np.minimum(index, partner), index)
    unique, peak_child = np.unique(leader, return_inverse=True)
    parent = np.zeros(unique.size + 1, dtype=np.int32)
    parent[1:] = labels[unique]
    return (peak_child + 1).astype(np.int32), parent, int(unique.size)


def deblend(peaks: Peaks, significance: NDArray[np.float32], labels: NDArray[np.int32],
            n_labels: int, pixels: NDArray[np.intp], pixel_labels: NDArray[np.int32], *,
            min_contrast: float, max_separation: float) -> Children:
    r"""Split every footprint into children at its significant peaks.

    Parameters
    ----------
    peaks : Peaks
        All peaks of the image, with their footprint labels.
    significance : ndarray of float32, shape (H, W)
        The detection image :math:`\nu`.
    labels : ndarray of int32, shape (H, W)
        Footprint labels ``1..n_labels`` (0 outside).
    n_labels : int
        Number of footprints.
    pixels : ndarray of int
        Flat indices of the footprint pixels (increasing).
    pixel_labels : ndarray of int32
        Their footprint labels.
    min_contrast : float
        Smallest prominence (sigma) of a kept peak that is not the strongest of its sign.
    max_separation : float
        Largest distance (pixels, exclusive) between the two lobes of a dipole child.

    Returns
    -------
    Children
    """
    height, width = labels.shape
    kept = np.flatnonzero(significant_peaks(peaks, significance, labels,
                                            min_contrast=min_contrast))
    scale = float(height + width + 1)  # beyond any distance inside the image
    peak_child, parent, n = group_children(peaks, kept, width,
                                           max_separation=max_separation, scale=scale)
    # footprints with one child: all their pixels go to it
    child_parent = parent[1:]
    n_children = np.bincount(child_parent, minlength=n_labels + 1)
    alone = n_children[child_parent] == 1
    only_child = np.zeros(n_labels + 1, dtype=np.int32)
    only_child[child_parent[alone]] = np.flatnonzero(alone).astype(np.int32) + 1
    pixel_child = only_child[pixel_labels]
    several = n_children[pixel_labels] > 1
    if several.any():
        in_split = n_children[peaks.labels[kept]] > 1
        seeds = kept[in_split]
        seed_rows, seed_cols = np.divmod(peaks.flat[seeds], width)
        tree = cKDTree(np.column_stack([seed_rows, seed_cols,
                                        peaks.labels[seeds] * scale]).astype(np.float64))
        rows, cols = np.divmod(pixels[several], width)
        _, nearest = tree.query(np.column_stack(
            [rows, cols, pixel_labels[several] * scale]).astype(np.float64))
        pixel_child[several] = peak_child[in_split][nearest]
    return Children(kept, peak_child, parent, pixel_child, n)
