"""Mean absolute pixel values inside circular footprints, for many footprints at once.

The footprints are stacked into ``(n, s, s)`` index arrays (``s`` the side of the square
that holds the largest disk) and reduced along the last two axes: no loop over pixels, and a
loop over sources only in chunks that bound the memory.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

#: Footprints gathered per chunk (bounds the ``(chunk, s, s)`` temporaries).
_CHUNK = 2048


@attrs.frozen
class DiskSums:
    """Per-footprint results of :func:`disk_mean_abs`.

    Attributes
    ----------
    mean_abs : ndarray of shape (n_images, n)
        Mean of :math:`|I|` over each footprint's valid pixels, for every image (NaN when a
        footprint has no valid pixel).
    n_valid : ndarray of shape (n,), int64
        Valid pixels in each footprint.
    n_total : ndarray of shape (n,), int64
        Pixels of each disk inside the image (valid or not).
    n_disk : ndarray of shape (n,), int64
        Pixels of each whole disk (also those off the image).
    """

    mean_abs: np.ndarray
    n_valid: np.ndarray
    n_total: np.ndarray
    n_disk: np.ndarray


def disk_mean_abs(images: tuple[np.ndarray, ...], valid: np.ndarray, x: np.ndarray,
                  y: np.ndarray, radius: np.ndarray | float) -> DiskSums:
    r"""Mean absolute value of each image over the valid pixels of disks around ``(x, y)``.

    A pixel ``[row, col]`` belongs to the disk of source :math:`i` when
    :math:`(\mathrm{col} - x_i)^2 + (\mathrm{row} - y_i)^2 \le r_i^2`; it is used when it
    also lies inside the image and ``valid[row, col]`` is True.

    Parameters
    ----------
    images : tuple of ndarray of shape (H, W)
        The images (all of one shape).
    valid : ndarray of shape (H, W), bool
        Pixels that may be used.
    x, y : ndarray of shape (n,)
        Footprint centres, 0-based column and row.
    radius : float or ndarray of shape (n,)
        Disk radii in pixels (> 0).

    Returns
    -------
    DiskSums
    """
    n = x.size
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,))
    height, width = valid.shape
    mean_abs = np.full((len(images), n), np.nan)
    n_valid = np.zeros(n, dtype=np.int64)
    n_total = np.zeros(n, dtype=np.int64)
    n_disk = np.zeros(n, dtype=np.int64)
    if n == 0:
        return DiskSums(mean_abs, n_valid, n_total, n_disk)
    half = math.ceil(float(np.max(radii))) + 1
    offsets = np.arange(-half, half + 1)
    for start in range(0, n, _CHUNK):  # loop over chunks of sources, not pixels
        part = slice(start, min(start + _CHUNK, n))
        xs, ys, rs = x[part], y[part], radii[part]
        rows = np.rint(ys).astype(np.intp)[:, None] + offsets  # (m, s)
        cols = np.rint(xs).astype(np.intp)[:, None] + offsets
        disk = (((cols - xs[:, None]) ** 2)[:, None, :] + ((rows - ys[:, None]) ** 2)[:, :, None]
                <= (rs**2)[:, None, None])
        inside = (((rows >= 0) & (rows < height))[:, :, None]
                  & ((cols >= 0) & (cols < width))[:, None, :])
        r_idx = np.clip(rows, 0, height - 1)[:, :, None]
        c_idx = np.clip(cols, 0, width - 1)[:, None, :]
        in_image = disk & inside
        use = in_image & valid[r_idx, c_idx]
        count = use.sum(axis=(1, 2))
        n_disk[part] = disk.sum(axis=(1, 2))
        n_total[part] = in_image.sum(axis=(1, 2))
        n_valid[part] = count
        safe = np.where(count > 0, count, 1)
        for k, image in enumerate(images):
            total = np.where(use, np.abs(image[r_idx, c_idx]), 0.0).sum(axis=(1, 2))
            mean_abs[k, part] = np.where(count > 0, total / safe, np.nan)
    return DiskSums(mean_abs, n_valid, n_total, n_disk)
