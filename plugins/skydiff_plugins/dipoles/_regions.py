"""Which sources get a dipole fit, and the pixel box each fit uses (vectorized over sources)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.ndimage
from astropy.table import Table

__all__ = ["Boxes", "catalog_column", "fit_boxes", "footprint_boxes"]


class Boxes(NamedTuple):
    """Per-source boxes ``[row0, row1) x [col0, col1)`` (may extend beyond the image).

    ``found`` is True where the box came from the source's footprint; ``area`` is the
    footprint area in pixels (0 without a footprint).
    """

    row0: np.ndarray
    row1: np.ndarray
    col0: np.ndarray
    col1: np.ndarray
    found: np.ndarray
    area: np.ndarray


def catalog_column(catalog: Table, name: str, default: float | bool) -> np.ndarray:
    """A column as a plain float64 (or bool) array, ``default`` everywhere when absent.

    Masked entries become ``default`` too.
    """
    dtype = bool if isinstance(default, bool) else np.float64
    if name not in catalog.colnames:
        return np.full(len(catalog), default, dtype=dtype)
    column = catalog[name]
    filled = column.filled(default) if hasattr(column, "filled") else column
    return np.asarray(filled, dtype=dtype)


def footprint_boxes(footprints: np.ndarray | None, ids: np.ndarray | None, n: int) -> Boxes:
    """Bounding boxes and areas of the footprints labelled with ``ids`` in ``footprints``.

    Parameters
    ----------
    footprints : ndarray of shape (H, W) or None
        Label image (0 = none, else the catalog id).
    ids : ndarray of shape (n,) or None
        The catalog ids.
    n : int
        Number of sources.

    Returns
    -------
    Boxes
        Empty boxes and ``found`` False for sources without a footprint.
    """
    empty = np.zeros(n, dtype=np.int64)
    boxes = Boxes(empty.copy(), empty.copy(), empty.copy(), empty.copy(),
                  np.zeros(n, dtype=bool), empty.copy())
    if footprints is None or ids is None or n == 0:
        return boxes
    labels = np.asarray(footprints)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return boxes
    clipped = np.clip(labels, 0, None).astype(np.int64)
    n_labels = int(clipped.max(initial=0))
    if n_labels == 0:
        return boxes
    objects = scipy.ndimage.find_objects(clipped)
    counts = np.bincount(clipped.ravel(), minlength=n_labels + 1)
    for k, ident in enumerate(np.asarray(ids, dtype=np.int64)):  # loop over sources (slices)
        if not 1 <= ident <= len(objects) or objects[ident - 1] is None:
            continue
        rows, cols = objects[ident - 1]
        boxes.row0[k], boxes.row1[k] = rows.start, rows.stop
        boxes.col0[k], boxes.col1[k] = cols.start, cols.stop
        boxes.found[k] = True
        boxes.area[k] = counts[ident]
    return boxes


def fit_boxes(boxes: Boxes, points_x: np.ndarray, points_y: np.ndarray, *, margin: int,
              fallback: int) -> Boxes:
    """Grow footprint boxes by ``margin``; elsewhere box the given points (+ ``fallback``).

    Parameters
    ----------
    boxes : Boxes
        From :func:`footprint_boxes`.
    points_x, points_y : ndarray of shape (n, m)
        Positions that must lie in the box of each source without a footprint (the catalog
        position and the peaks; NaN entries are ignored).
    margin : int
        Pixels added on every side of a footprint box.
    fallback : int
        Pixels added around the points of a source without a footprint.

    Returns
    -------
    Boxes
    """
    ok_x, ok_y = np.isfinite(points_x), np.isfinite(points_y)
    lo_x = np.floor(np.where(ok_x, points_x, np.inf).min(axis=1, initial=np.inf))
    hi_x = np.ceil(np.where(ok_x, points_x, -np.inf).max(axis=1, initial=-np.inf))
    lo_y = np.floor(np.where(ok_y, points_y, np.inf).min(axis=1, initial=np.inf))
    hi_y = np.ceil(np.where(ok_y, points_y, -np.inf).max(axis=1, initial=-np.inf))
    finite = np.isfinite(lo_x) & np.isfinite(lo_y)
    lo_x, hi_x, lo_y, hi_y = (np.where(finite, v, 0.0).astype(np.int64)
                              for v in (lo_x, hi_x, lo_y, hi_y))
    found = boxes.found
    return Boxes(
        row0=np.where(found, boxes.row0 - margin, lo_y - fallback),
        row1=np.where(found, boxes.row1 + margin, hi_y + fallback + 1),
        col0=np.where(found, boxes.col0 - margin, lo_x - fallback),
        col1=np.where(found, boxes.col1 + margin, hi_x + fallback + 1),
        found=found, area=boxes.area)
