r"""Robust image statistics: clipped moments, sky background meshes, variance-plane scaling.

* :func:`clipped_stats` — iteratively σ-clipped mean, median and standard deviation with the
  semantics of LSST ``afw`` ``MEANCLIP`` / ``STDEVCLIP``.
* :func:`robust_std` — the scaled median absolute deviation.
* :func:`background_mesh` — a smooth sky map: a robust statistic per bin, empty bins filled
  from their neighbours, a 3 × 3 median filter of the mesh and (bi)cubic interpolation back
  to full resolution, all vectorised (no loop over pixels or bins).
* :func:`variance_scale_factor` — the factor by which an exposure's variance plane must be
  multiplied to describe its measured pixel noise (``lsst.meas.algorithms.ScaleVarianceTask``).

Arrays are indexed ``(row, col)``. Every function is NaN-aware: non-finite values are
ignored like masked ones. No function modifies its inputs.

References
----------
.. [1] Bertin, E. & Arnouts, S. 1996, A&AS 117, 393, "SExtractor: Software for source
   extraction" (background meshes).
.. [2] Jurić, M. et al. 2017, ASP Conf. Ser. 512, 279, "The LSST Data Management System"
   (``afw`` statistics, ``ScaleVarianceTask``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

import attrs
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import interpolate, ndimage

from skydiff.errors import AlgorithmError, InputError
from skydiff.exposure import Exposure, robust_sigma
from skydiff.parallel import cpu_count, parallel_map, serial_matmul

__all__ = [
    "IQR_TO_SIGMA",
    "ClippedStats",
    "background_mesh",
    "clipped_stats",
    "robust_std",
    "variance_scale_factor",
]

#: :math:`1 / (2\,\Phi^{-1}(3/4))`: converts an inter-quartile range to a Gaussian σ
#: (``afw``'s ``IQ_TO_STDEV``).
IQR_TO_SIGMA = 0.741301109

#: Minimum fraction of a bin's in-image pixels that must be valid for its statistic to count.
_MIN_BIN_FRACTION = 0.1

#: Planes ignored by :func:`variance_scale_factor` (``ScaleVarianceConfig.maskPlanes``).
_SCALE_VARIANCE_PLANES = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP")

Statistic = Literal["median", "clipped_mean"]
Interpolation = Literal["cubic", "linear"]


def _split_segments(segments: list[tuple[int, int, int]], parts: int
                    ) -> list[tuple[int, int, int]]:
    """Runs of bins split into about ``parts`` runs (for parallel bin statistics)."""
    out: list[tuple[int, int, int]] = []
    for start, n, width in segments:
        pieces = max(1, min(parts, n))
        bounds = np.linspace(0, n, pieces + 1).round().astype(int)
        out.extend((start + int(a) * width, int(b - a), width)
                   for a, b in itertools.pairwise(bounds) if b > a)
    return out


class ClippedStats(NamedTuple):
    """Result of :func:`clipped_stats`.

    Attributes
    ----------
    mean : float
        The clipped mean (``afw`` ``MEANCLIP``).
    median : float
        The median of the values kept by the last clipping pass.
    std : float
        The clipped sample standard deviation, ``ddof = 1`` (``afw`` ``STDEVCLIP``; 0 for a
        single kept value).
    n : int
        The number of values kept by the last clipping pass.
    """

    mean: float
    median: float
    std: float
    n: int


# ------------------------------------------------------------------------------------------
# scalar statistics


def _valid_values(values: ArrayLike, mask: ArrayLike | None, name: str) -> NDArray[np.float64]:
    """The finite values not flagged by ``mask``, as a flat float64 array (a copy)."""
    array = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(array)
    if mask is not None:
        flags = np.asarray(mask)
        if flags.shape != array.shape:
            msg = f"{name}: mask shape {flags.shape} differs from the values' shape {array.shape}"
            raise InputError(msg)
        valid &= ~flags.astype(bool)
    data = array[valid]
    if data.size == 0:
        msg = f"{name} needs at least one finite, unmasked value"
        raise InputError(msg)
    return data


def clipped_stats(values: ArrayLike, *, n_sigma: float = 3.0, n_iter: int = 3,
                  mask: ArrayLike | None = None) -> ClippedStats:
    r"""Iteratively σ-clipped mean, median and standard deviation (``afw`` semantics).

    The first pass keeps the values within :math:`n_\sigma` robust standard deviations of the
    median, the robust σ coming from the inter-quartile range; every further pass keeps the
    values within :math:`n_\sigma` clipped standard deviations of the clipped mean of the
    previous pass:

    .. math::

        c_0 = \operatorname{median}(v), \quad h_0 = n_\sigma \cdot 0.7413\,\mathrm{IQR}(v);
        \qquad K_k = \{v : |v - c_k| \le h_k\}, \quad
        c_{k+1} = \overline{K_k}, \quad h_{k+1} = n_\sigma\,s(K_k),

    for :math:`k = 0 \ldots n_\mathrm{iter} - 1`, where :math:`s` is the sample standard
    deviation. The result is the mean, median and :math:`s` of the last kept set. This is
    what ``afw.math.makeStatistics(..., MEANCLIP | STDEVCLIP)`` computes; the iteration stops
    early once the kept set no longer changes (which does not change the result).

    Parameters
    ----------
    values : array_like
        Any shape; non-finite values are ignored.
    n_sigma : float, optional
        Clipping half-width in standard deviations (> 0).
    n_iter : int, optional
        Number of clipping passes (≥ 1).
    mask : array_like of bool, optional
        Same shape as ``values``; True excludes a value.

    Returns
    -------
    ClippedStats
        ``(mean, median, std, n)``.

    Raises
    ------
    InputError
        If no finite, unmasked value is left, the mask shape differs, ``n_sigma`` ≤ 0 or
        ``n_iter`` < 1.

    Notes
    -----
    The inclusive bound :math:`|v - c| \le h` (rather than ``<``) keeps a constant sample
    intact (its IQR and σ are zero).

    Examples
    --------
    >>> stats = clipped_stats([1, 1, 1, 1, 2, 3, 4, 50])
    >>> stats.n, round(stats.mean, 4), round(stats.std, 4)
    (7, 1.8571, 1.215)
    """
    if not (math.isfinite(n_sigma) and n_sigma > 0):
        msg = f"n_sigma must be a positive number, got {n_sigma}"
        raise InputError(msg)
    if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 1:
        msg = f"n_iter must be an integer ≥ 1, got {n_iter}"
        raise InputError(msg)
    data = _valid_values(values, mask, "clipped_stats")
    q25, median, q75 = np.percentile(data, [25.0, 50.0, 75.0])
    center = float(median)
    half_width = n_sigma * IQR_TO_SIGMA * float(q75 - q25)
    kept = data
    previous: NDArray[np.bool_] | None = None
    for _ in range(int(n_iter)):
        keep = np.abs(data - center) <= half_width
        if not keep.any():  # cannot happen with exact arithmetic; guards round-off
            break
        if previous is not None and np.array_equal(keep, previous):
            break
        previous = keep
        kept = data[keep]
        center = float(kept.mean())
        half_width = n_sigma * (float(kept.std(ddof=1)) if kept.size > 1 else 0.0)
    std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
    return ClippedStats(float(kept.mean()), float(np.median(kept)), std, int(kept.size))


def robust_std(values: ArrayLike, *, mask: ArrayLike | None = None) -> float:
    r"""Robust standard deviation: the scaled median absolute deviation.

    :math:`\hat\sigma = 1.4826\,\operatorname{median}|v - \operatorname{median}(v)|`: the
    median absolute deviation (:func:`skydiff.exposure.robust_sigma`) of the finite
    values not excluded by ``mask``; exact for Gaussian data in the large-sample limit and
    insensitive to up to half the values being outliers.

    Parameters
    ----------
    values : array_like
        Any shape.
    mask : array_like of bool, optional
        Same shape as ``values``; True excludes a value.

    Returns
    -------
    float

    Raises
    ------
    InputError
        If no finite, unmasked value is left or the mask shape differs.

    Examples
    --------
    >>> robust_std([1.0, 2.0, 3.0, np.nan, 1e9])
    1.4826
    """
    return robust_sigma(_valid_values(values, mask, "robust_std"))


# ------------------------------------------------------------------------------------------
# background mesh


def _axis_segments(size: int, bin_size: int) -> list[tuple[int, int, int]]:
    """Split ``size`` pixels into bins: ``[(start, n_bins, width), ...]`` (one or two runs).

    Regular bins of ``bin_size``; a remainder of at least half a bin becomes its own (narrower)
    bin, a smaller one is merged into the last regular bin.
    """
    n_full, rest = divmod(size, bin_size)
    if n_full == 0:
        return [(0, 1, size)]
    if rest == 0:
        return [(0, n_full, bin_size)]
    if 2 * rest >= bin_size:
        return [(0, n_full, bin_size), (n_full * bin_size, 1, rest)]
    segments = [(0, n_full - 1, bin_size)] if n_full > 1 else []
    return [*segments, ((n_full - 1) * bin_size, 1, bin_size + rest)]


def _row_medians(values: NDArray[np.float32], valid: NDArray[np.bool_] | None, *,
                 overwrite: bool = False) -> NDArray[np.float64]:
    """Median of the valid entries of every row of a 2-D array (NaN where none is valid).

    ``valid=None`` means every entry is valid: one :func:`numpy.partition` at the middle
    serves all rows. Otherwise the invalid entries are replaced by ``+inf`` and every row is
    sorted (NumPy's vectorised sort costs about as much as a partition), which puts the
    ``count`` valid entries of a row first, in order: the median is read at positions
    ``(count - 1) // 2`` and ``count // 2``. ``overwrite`` lets that happen in ``values``.
    """
    n = values.shape[1]
    if valid is None:
        m = n // 2
        part = np.partition(values, m, axis=1)
        hi = part[:, m].astype(np.float64)
        if n % 2 == 1 or m == 0:
            return hi
        lo = part[:, :m].max(axis=1).astype(np.float64)
        return 0.5 * (lo + hi)
    count = valid.sum(axis=1)
    if overwrite:
        ordered = values
        np.copyto(ordered, np.inf, where=~valid)
    else:
        ordered = np.where(valid, values, np.float32(np.inf))
    ordered.sort(axis=1)
    upper = np.minimum(count // 2, n - 1)[:, None]
    lower = np.maximum((count - 1) // 2, 0)[:, None]
    hi = np.take_along_axis(ordered, upper, axis=1)[:, 0].astype(np.float64)
    lo = np.take_along_axis(ordered, lower, axis=1)[:, 0].astype(np.float64)
    median = 0.5 * (lo + hi)
    median[count == 0] = np.nan
    return median


def _row_clipped_means(values: NDArray[np.float32], valid: NDArray[np.bool_] | None, *,
                       n_sigma: float = 3.0, n_iter: int = 3) -> NDArray[np.float64]:
    """Clipped mean of the valid entries of every row (afw MEANCLIP; NaN where none valid).

    The first pass clips about the median with the MAD-based σ (the per-row equivalent of
    the IQR used by :func:`clipped_stats`); later passes about the mean with the clipped σ.
    Sums are accumulated in float64 from float32 data.
    """
    median = _row_medians(values, valid)
    deviation = np.abs(values - median[:, None].astype(np.float32))
    center = median.astype(np.float32)
    half = (n_sigma * 1.4826 * _row_medians(deviation, valid)).astype(np.float32)
    mean = median
    for _ in range(n_iter):
        keep = np.abs(values - center[:, None]) <= half[:, None]
        if valid is not None:
            keep &= valid
        n = keep.sum(axis=1)
        kept = np.where(keep, values, np.float32(0.0))
        total = kept.sum(axis=1, dtype=np.float64)
        squares = np.einsum("ij,ij->i", kept, kept, dtype=np.float64)
        safe_n = np.maximum(n, 1)
        mean = np.where(n > 0, total / safe_n, median)
        variance = np.maximum(squares - safe_n * mean**2, 0.0) / np.maximum(n - 1, 1)
        center = mean.astype(np.float32)
        half = (n_sigma * np.sqrt(variance)).astype(np.float32)
    if valid is not None:
        mean[valid.sum(axis=1) == 0] = np.nan
    return mean


def _block_statistic(image: NDArray[np.float32], valid: NDArray[np.bool_] | None,
                     rows: tuple[int, int, int], cols: tuple[int, int, int],
                     statistic: Statistic, stride: int = 1) -> NDArray[np.float64]:
    """The statistic of every bin of one uniform block of bins, shape (n_rows, n_cols).

    ``stride`` > 1 uses only every ``stride``-th row and column of each bin.
    """
    r0, n_r, height = rows
    c0, n_c, width = cols
    window = (slice(r0, r0 + n_r * height), slice(c0, c0 + n_c * width))
    shape = (n_r, height, n_c, width)

    def binned(array: np.ndarray) -> np.ndarray:
        bins = array[window].reshape(shape)[:, ::stride, :, ::stride]
        return bins.transpose(0, 2, 1, 3).reshape(n_r * n_c, -1)

    values = binned(image)
    good = None if valid is None else binned(valid)
    if statistic == "median":
        # ``binned`` copies (bins are gathered across rows) unless the block is one bin wide
        result = _row_medians(values, good, overwrite=not np.may_share_memory(values, image))
    else:
        result = _row_clipped_means(values, good)
    if good is not None:
        enough = good.sum(axis=1) >= max(1.0, _MIN_BIN_FRACTION * values.shape[1])
        result[~enough] = np.nan
    return result.reshape(n_r, n_c)


def _fill_empty_bins(mesh: NDArray[np.float64], empty: NDArray[np.bool_]
                     ) -> NDArray[np.float64]:
    """Fill empty bins with a least-squares quadratic (or plane) of the filled ones.

    Unlike a nearest-neighbour fill this continues the sky's gradient across masked areas;
    with fewer than three filled bins the nearest filled bin is used.
    """
    grid = np.indices(mesh.shape, dtype=np.float64)
    rows, cols = grid[0], grid[1]
    terms: list[NDArray[np.float64]] = [np.ones_like(rows), cols, rows, cols * cols,
                                        cols * rows, rows * rows]
    n_good = int((~empty).sum())
    n_terms = 6 if n_good >= 12 else 3 if n_good >= 3 else 0
    filled = mesh.copy()
    if n_terms:
        design = np.stack([t[~empty] for t in terms[:n_terms]], axis=1)
        coefficients, *_ = np.linalg.lstsq(design, mesh[~empty], rcond=None)
        filled[empty] = np.stack([t[empty] for t in terms[:n_terms]], axis=1) @ coefficients
    else:
        nearest = ndimage.distance_transform_edt(empty, return_distances=False,
                                                 return_indices=True)
        filled = mesh[tuple(nearest)]
    return filled


def _interpolation_matrix(nodes: NDArray[np.float64], points: NDArray[np.float64],
                          kind: Interpolation) -> NDArray[np.float32]:
    """The (len(points), len(nodes)) matrix that interpolates node values to ``points``.

    A not-a-knot cubic spline (linear with ``kind="linear"``; lower degree when there are
    fewer than four nodes) between the outer nodes, and the straight line through the two
    outermost nodes beyond them: a cubic continued past its last node amplifies the noise
    of the outer bins about threefold, a line only by about 1.6.
    """
    n = nodes.size
    if n == 1:
        return np.ones((points.size, 1), dtype=np.float32)
    degree = min(3 if kind == "cubic" else 1, n - 1)
    spline = interpolate.make_interp_spline(nodes, np.eye(n), k=degree)
    matrix = np.asarray(spline(np.clip(points, nodes[0], nodes[-1])), dtype=np.float64)
    for inner, outer in ((1, 0), (n - 2, n - 1)):
        beyond = (points - nodes[outer]) * (nodes[outer] - nodes[inner]) > 0
        if beyond.any():
            t = (points[beyond] - nodes[outer]) / (nodes[outer] - nodes[inner])
            matrix[beyond] = 0.0
            matrix[beyond, outer] = 1.0 + t
            matrix[beyond, inner] = -t
    return matrix.astype(np.float32)


def background_mesh(image: ArrayLike, *, mask: ArrayLike | None = None, bin_size: int = 64,
                    statistic: Statistic = "median", filter_size: int = 3,
                    interpolation: Interpolation = "cubic") -> NDArray[np.float32]:
    r"""A smooth sky map: a robust statistic per bin, interpolated back to every pixel.

    1. The image is cut into ``bin_size`` × ``bin_size`` bins. When a side is not a multiple
       of ``bin_size`` the remainder becomes its own narrower bin if it is at least half a
       bin wide, and is merged into the last bin otherwise.
    2. Each bin gets the ``statistic`` of its valid pixels (finite, not masked); a bin with
       fewer than 10 % of its pixels valid is *empty*. The bins are reshaped into one
       ``(n_bins, pixels)`` array, so this is a handful of NumPy calls for the whole image.
    3. Empty bins are filled with a least-squares quadratic surface of the other bins (so
       gradients continue across large masked areas).
    4. The mesh is median-filtered with a ``filter_size`` × ``filter_size`` window (as
       SExtractor's ``BACK_FILTERSIZE``), which removes bins biased by bright stars and leaves
       linear gradients unchanged.
    5. The mesh, sampled at the bin centres, is interpolated to every pixel with a separable
       not-a-knot cubic spline (or linearly), i.e. :math:`B = R\,M\,C^\mathsf{T}` with
       interpolation matrices :math:`R` (rows × bin rows) and :math:`C` (columns × bin
       columns); beyond the outer bin centres the map continues linearly (a cubic would
       amplify the noise of the edge bins).

    Parameters
    ----------
    image : array_like of shape (H, W)
        The image.
    mask : array_like of bool of shape (H, W), optional
        True excludes a pixel (sources, bad pixels). Non-finite pixels are always excluded.
    bin_size : int, optional
        Side of a bin in pixels (≥ 1). It should be several times the size of the objects
        and smaller than the scale of the sky variations.
    statistic : {"median", "clipped_mean"}, optional
        ``"median"``: the exact median of the bin's valid pixels. ``"clipped_mean"``: the
        3σ-clipped mean, 3 passes (``afw`` ``MEANCLIP``; first pass about the median with
        the MAD-based σ), which is less noisy for Gaussian sky noise.
    filter_size : int, optional
        Side (odd, ≥ 1) of the median filter applied to the mesh; 1 disables it. Axes with
        fewer bins than ``filter_size`` are not filtered.
    interpolation : {"cubic", "linear"}, optional
        Interpolation between bin centres.

    Returns
    -------
    ndarray of shape (H, W), float32
        The background at every pixel.

    Raises
    ------
    InputError
        If the image is not a non-empty 2-D array, the mask shape differs, an option is
        invalid, or no bin has enough valid pixels.

    Notes
    -----
    The statistical error of a bin's median is :math:`1.2533\,\sigma/\sqrt{N}` for
    :math:`N` valid pixels of noise σ (:math:`\sigma/\sqrt{N}` for the clipped mean); the
    interpolation averages neighbouring bins, so the map is slightly less noisy than that.
    Sources bias the median upward by a fraction of their flux in the bin: mask them (e.g.
    with the ``DETECTED`` plane) for an unbiased sky.

    References
    ----------
    .. [1] Bertin, E. & Arnouts, S. 1996, A&AS 117, 393.

    Examples
    --------
    >>> rows, cols = np.mgrid[0:200, 0:300]
    >>> sky = 100.0 + 0.05 * cols + 0.02 * rows
    >>> bool(np.allclose(background_mesh(sky, bin_size=50), sky, atol=1e-3))
    True
    """
    return _background_mesh(image, mask=mask, bin_size=bin_size, statistic=statistic,
                            filter_size=filter_size, interpolation=interpolation)


@attrs.frozen(eq=False, slots=False)  # not slotted: functools.cached_property below
class _Mesh:
    """A background mesh before interpolation: the sky is ``rows @ values @ columns.T``.

    ``values`` (float32, bins × bins) are the filtered bin statistics; ``rows`` (H × bin
    rows) and ``columns`` (W × bin columns) the interpolation matrices. Meshes of the same
    image geometry share the matrices, so a difference of two skies is interpolated once.
    The sky can also be read on row blocks (:meth:`rows_block`) and stamps (:meth:`stamps`)
    without evaluating it everywhere.
    """

    values: NDArray[np.float32]
    rows: NDArray[np.float32]
    columns: NDArray[np.float32]

    @functools.cached_property
    def _row_factor(self) -> NDArray[np.float32]:
        """``values @ columns.T``, shape (bin rows, W)."""
        return serial_matmul(self.values, np.ascontiguousarray(self.columns.T))

    def rows_block(self, start: int, stop: int) -> NDArray[np.float32]:
        """Rows ``[start, stop)`` of the sky (a new float32 array)."""
        return serial_matmul(self.rows[start:stop], self._row_factor)

    def stamps(self, rows: NDArray[np.intp], cols: NDArray[np.intp]) -> NDArray[np.float32]:
        """The sky on stamps: ``rows``, ``cols`` of shape (n, side) give (n, side, side)."""
        left = np.matmul(self.rows[rows], self.values)  # (n, side, bin columns)
        return np.matmul(left, self.columns[cols].transpose(0, 2, 1))

    def evaluate(self, values: NDArray[np.float32] | None = None, *,
                 out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """The full-resolution map of ``values`` (default: this mesh's), float32 (H, W).

        The product is taken in the order whose full-size factor has the fewer bins (half
        the arithmetic of the other order on a 1:2 frame); ``out`` receives it if given.
        """
        mesh = self.values if values is None else values
        if mesh.shape[0] <= mesh.shape[1]:
            return serial_matmul(self.rows, serial_matmul(mesh, self.columns.T), out=out)
        return serial_matmul(serial_matmul(self.rows, mesh), self.columns.T, out=out)

    def blocks(self, values: NDArray[np.float32], block_rows: int
               ) -> Iterator[tuple[slice, NDArray[np.float32]]]:
        """The map of ``values`` as ``(row slice, block)`` pieces of ``block_rows`` rows.

        For in-place updates of full-size planes without a full-size temporary.
        """
        height = self.rows.shape[0]
        by_rows = values.shape[0] <= values.shape[1]
        factor = (serial_matmul(values, self.columns.T) if by_rows
                  else np.asarray(values, dtype=np.float32))
        for r0 in range(0, height, block_rows):
            rows = slice(r0, min(r0 + block_rows, height))
            block = serial_matmul(self.rows[rows], factor)
            yield rows, block if by_rows else serial_matmul(block, self.columns.T)

    def for_blocks(self, values: NDArray[np.float32], block_rows: int,
                   function: Callable[[slice, NDArray[np.float32]], None]) -> None:
        """``function(rows, block)`` for every piece of :meth:`blocks`, in parallel threads.

        ``function`` must only touch the rows it is given.
        """
        height = self.rows.shape[0]
        by_rows = values.shape[0] <= values.shape[1]
        factor = (serial_matmul(values, self.columns.T) if by_rows
                  else np.asarray(values, dtype=np.float32))
        n_parts = cpu_count()
        bounds = np.linspace(0, height, n_parts + 1).round().astype(int)

        def run(part: tuple[int, int]) -> None:
            for r0 in range(part[0], part[1], block_rows):
                rows = slice(r0, min(r0 + block_rows, part[1]))
                block = serial_matmul(self.rows[rows], factor)
                function(rows, block if by_rows else serial_matmul(block, self.columns.T))

        parallel_map(run, [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a])


def _sample_segments(segments: list[tuple[int, int, int]], stride: int
                     ) -> list[tuple[int, int, int]] | None:
    """The bins of ``segments`` on the grid of every ``stride``-th pixel (None if misaligned).

    A bin ``[start, start + width)`` sampled from its first pixel on holds the grid points
    ``start / stride ... (start + width - 1) / stride`` when ``start`` is a multiple of the
    stride; a run of several bins also needs ``width`` to be one.
    """
    out = []
    for start, n, width in segments:
        if start % stride or (n > 1 and width % stride):
            return None
        out.append((start // stride, n, -(-width // stride)))
    return out


def _background_mesh(image: ArrayLike, *, mask: ArrayLike | None, bin_size: int,
                     statistic: Statistic = "median", filter_size: int = 3,
                     interpolation: Interpolation = "cubic", stride: int = 1
                     ) -> NDArray[np.float32]:
    """:func:`background_mesh`, optionally from every ``stride``-th row and column of a bin."""
    return _mesh_model(image, mask=mask, bin_size=bin_size, statistic=statistic,
                       filter_size=filter_size, interpolation=interpolation,
                       stride=stride).evaluate()


def _mesh_model(image: ArrayLike, *, mask: ArrayLike | None, bin_size: int,
                statistic: Statistic = "median", filter_size: int = 3,
                interpolation: Interpolation = "cubic", stride: int = 1,
                sampled_mask: bool = False, like: _Mesh | None = None) -> _Mesh:
    """The :class:`_Mesh` of :func:`background_mesh` (``stride``: see :func:`_background_mesh`).

    Only the pixels a bin statistic uses (every ``stride``-th row and column of each bin) are
    tested for validity. With ``sampled_mask`` the mask is given on that grid only, i.e. it
    has the shape of ``image[::stride, ::stride]`` (``bin_size`` must then be a multiple of
    ``stride``). ``like``, a mesh of the same image shape, ``bin_size`` and
    ``interpolation``, lends its interpolation matrices.
    """
    array = np.asarray(image)
    if array.ndim != 2 or array.size == 0:
        msg = f"image must be a non-empty 2-D array, got shape {array.shape}"
        raise InputError(msg)
    if isinstance(bin_size, bool) or int(bin_size) != bin_size or bin_size < 1:
        msg = f"bin_size must be a positive integer, got {bin_size!r}"
        raise InputError(msg)
    if statistic not in ("median", "clipped_mean"):
        msg = f"statistic must be 'median' or 'clipped_mean', got {statistic!r}"
        raise InputError(msg)
    if interpolation not in ("cubic", "linear"):
        msg = f"interpolation must be 'cubic' or 'linear', got {interpolation!r}"
        raise InputError(msg)
    if isinstance(filter_size, bool) or int(filter_size) != filter_size or filter_size < 1 \
            or filter_size % 2 == 0:
        msg = f"filter_size must be an odd integer ≥ 1, got {filter_size!r}"
        raise InputError(msg)
    bin_size = int(bin_size)
    data = np.asarray(array, dtype=np.float32)
    height, width = data.shape
    row_segments = _axis_segments(height, bin_size)
    col_segments = _axis_segments(width, bin_size)
    sample = (slice(None, None, stride), slice(None, None, stride))
    sampled_rows = _sample_segments(row_segments, stride)
    sampled_cols = _sample_segments(col_segments, stride)
    flags: NDArray[np.bool_] | None = None
    if mask is not None:
        flags = np.asarray(mask)
        expected = data[sample].shape if sampled_mask else data.shape
        if flags.shape != expected:
            msg = f"mask shape {flags.shape} differs from the image shape {expected}"
            raise InputError(msg)
    if sampled_rows is not None and sampled_cols is not None:
        # Statistics on the sampled grid: validity is only evaluated where it is used.
        values = data[sample]
        valid = np.isfinite(values)
        if flags is not None:
            valid &= ~(flags if sampled_mask else flags[sample]).astype(bool, copy=False)
        row_blocks, col_blocks, step = sampled_rows, sampled_cols, 1
    elif sampled_mask:
        msg = f"a sampled mask needs bin_size ({bin_size}) to be a multiple of {stride}"
        raise InputError(msg)
    else:
        values = data
        valid = np.isfinite(values)
        if flags is not None:
            valid &= ~flags.astype(bool, copy=False)
        row_blocks, col_blocks, step = row_segments, col_segments, stride
    flags_or_none = None if bool(valid.all()) else valid
    # the bin statistics of runs of bin rows, one run per CPU (large meshes only)
    row_runs = _split_segments(row_blocks, cpu_count() if values.size >= 1 << 18 else 1)
    mesh = np.vstack(parallel_map(
        lambda rs: np.hstack([_block_statistic(values, flags_or_none, rs, cs, statistic, step)
                              for cs in col_blocks]), row_runs))
    empty = ~np.isfinite(mesh)
    if empty.all():
        msg = ("background_mesh: no bin has enough valid pixels (every pixel is masked or "
               "non-finite)")
        raise InputError(msg)
    if empty.any():
        mesh = _fill_empty_bins(mesh, empty)
    pads = [filter_size // 2 if n >= filter_size else 0 for n in mesh.shape]
    if max(pads) > 0:
        # Pad by point reflection (2 m[0] - m[k]) so that the median of every window of a
        # linear mesh is its centre, at the edges and corners too.
        padded = np.pad(mesh, [(p, p) for p in pads], mode="reflect", reflect_type="odd")
        filtered = ndimage.median_filter(padded, size=[2 * p + 1 for p in pads])
        mesh = filtered[pads[0]:pads[0] + mesh.shape[0], pads[1]:pads[1] + mesh.shape[1]]

    def centres(segments: list[tuple[int, int, int]]) -> NDArray[np.float64]:
        return np.concatenate([start + width_ * np.arange(n) + 0.5 * (width_ - 1)
                               for start, n, width_ in segments])

    if like is not None and like.rows.shape == (height, mesh.shape[0]) \
            and like.columns.shape == (width, mesh.shape[1]):
        return _Mesh(mesh.astype(np.float32), like.rows, like.columns)
    row_matrix = _interpolation_matrix(centres(row_segments),
                                       np.arange(height, dtype=np.float64), interpolation)
    col_matrix = _interpolation_matrix(centres(col_segments),
                                       np.arange(width, dtype=np.float64), interpolation)
    return _Mesh(mesh.astype(np.float32), row_matrix, col_matrix)


# ------------------------------------------------------------------------------------------
# variance scaling


def _grow(flags: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Dilate a boolean image by a (2r+1)² box (separable maximum of shifted slices)."""
    grown = flags.copy()
    for axis in (0, 1):
        source = grown.copy()
        n = source.shape[axis]
        for shift in range(1, min(radius, n - 1) + 1):
            lead = [slice(None), slice(None)]
            trail = [slice(None), slice(None)]
            lead[axis], trail[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(trail)] |= source[tuple(lead)]
            grown[tuple(lead)] |= source[tuple(trail)]
    return grown


def variance_scale_factor(exposure: Exposure, *, bin_size: int = 32,
                          planes: Sequence[str] = _SCALE_VARIANCE_PLANES,
                          limit: float = 10.0, max_pixels: int | None = None,
                          tile: int = 512) -> float:
    r"""The factor that makes an exposure's variance plane describe its pixel noise.

    A port of ``lsst.meas.algorithms.ScaleVarianceTask``: the background (a
    :func:`background_mesh` of ``bin_size`` with the clipped-mean statistic) is subtracted and
    the factor is the squared ratio of the measured noise to the noise the variance plane
    predicts, both from inter-quartile ranges over the unmasked pixels,

    .. math::

        f = \left(0.74\;\mathrm{IQR}\!\left[\frac{I - B}{\sqrt{V}}\right]\right)^2,

    so that ``variance * f`` is the corrected variance plane. (On images at least four bins
    wide the bin statistics use every other row and column, which changes the background's
    negligible contribution to the quartiles, not the quartiles' own precision.) If :math:`f`
    exceeds ``limit``
    (a variance plane wrong by a large factor, or strongly varying), the image-based estimate

    .. math::

        f = \frac{\left(0.74\;\mathrm{IQR}[I - B]\right)^2}{\operatorname{median}(V)}

    is used instead, as upstream.

    Pixels with any of ``planes`` set (names the exposure does not define are skipped), a
    non-positive variance or a non-finite value are excluded. When the exposure has no
    ``DETECTED`` pixel (no detection has run), sources are masked first: pixels more than
    3 robust σ above a median background, grown by 2 pixels.

    Parameters
    ----------
    exposure : Exposure
        The exposure (not modified).
    bin_size : int, optional
        Background bin size in pixels (upstream: 32).
    planes : sequence of str, optional
        Mask planes to exclude (upstream ``maskPlanes``).
    limit : float, optional
        Largest acceptable factor (upstream: 10).
    max_pixels : int, optional
        On an image with more pixels than this, the factor is the mean of the factors of
        ``max_pixels / tile²`` tiles of ``tile`` × ``tile`` pixels spread evenly over it (half
        a million pixels determine the factor to about 0.3 %: the IQR noise estimate of
        :math:`N` Gaussian values has a relative error of about :math:`1.1/\sqrt N`, the
        factor twice that). Default: every pixel.
    tile : int, optional
        Side of the sampled tiles.

    Returns
    -------
    float
        The factor :math:`f` (1 for a correct variance plane).

    Raises
    ------
    InputError
        If ``exposure`` is not an :class:`~skydiff.exposure.Exposure` or has no usable pixel.
    AlgorithmError
        If both estimates exceed ``limit`` (metadata ``factor`` and ``limit``).

    References
    ----------
    .. [1] ``lsst.meas.algorithms.scaleVariance.ScaleVarianceTask`` (``pixelBased`` and
       ``imageBased``), LSST Science Pipelines.

    Examples
    --------
    >>> rng = np.random.default_rng(3)
    >>> exp = Exposure(rng.normal(0.0, 2.0, (256, 256)), variance=np.full((256, 256), 1.0))
    >>> round(variance_scale_factor(exp), 1)
    4.0
    """
    if not isinstance(exposure, Exposure):
        msg = f"variance_scale_factor needs an Exposure, got {type(exposure).__name__}"
        raise InputError(msg)
    height, width = exposure.shape
    if max_pixels is not None and height * width > max_pixels and min(height, width) >= 2 * tile:
        n_tiles = max(1, max_pixels // (tile * tile))
        n_rows = max(1, min(height // tile, round(math.sqrt(n_tiles * height / width))))
        n_cols = max(1, min(width // tile, n_tiles // n_rows))
        factors = []
        for r0 in np.linspace(0, height - tile, n_rows).astype(int):  # loop over tiles
            for c0 in np.linspace(0, width - tile, n_cols).astype(int):
                cut = exposure.cutout(slice(r0, r0 + tile), slice(c0, c0 + tile))
                try:
                    factors.append(variance_scale_factor(cut, bin_size=bin_size, planes=planes,
                                                         limit=limit))
                except InputError:  # a fully masked tile
                    continue
        if factors:
            return float(np.mean(factors))
    image = exposure.image
    variance = exposure.variance
    names = [name for name in planes if name in exposure.mask_planes.names]
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if names:
        good &= ~exposure.masked(*names)
    if not good.any():
        msg = "variance_scale_factor: no unmasked pixel with a positive variance"
        raise InputError(msg)
    has_detections = ("DETECTED" in exposure.mask_planes.names
                      and bool(exposure.masked("DETECTED").any()))
    stride = 2 if min(image.shape) >= 4 * bin_size else 1
    first: _Mesh | None = None
    if not has_detections:
        first = _mesh_model(image, mask=~good, bin_size=bin_size, stride=stride)
        rough = np.subtract(image, first.evaluate(), dtype=np.float32)
        # an approximate σ is enough for the source threshold: every other row and column
        sigma = robust_std(rough[::2, ::2], mask=~good[::2, ::2])
        sources = _grow(rough > 3.0 * sigma, 2)
        if (good & ~sources).any():
            good &= ~sources
    background = _mesh_model(image, mask=~good, bin_size=bin_size, statistic="clipped_mean",
                             stride=stride, like=first).evaluate()
    residual = np.subtract(image, background, dtype=np.float32)[good]
    ratio = residual / np.sqrt(variance[good], dtype=np.float32)
    q25, q75 = np.percentile(ratio, [25.0, 75.0], overwrite_input=True)  # a temporary
    factor = float((0.74 * (q75 - q25)) ** 2)
    if factor > limit:
        q25, q75 = np.percentile(residual, [25.0, 75.0])
        factor = float((0.74 * (q75 - q25)) ** 2 / np.median(variance[good]))
        if factor > limit:
            msg = (f"variance scale factor {factor:.4g} exceeds the limit {limit:.4g}; the "
                   "variance plane does not describe this image")
            raise AlgorithmError(msg, factor=factor, limit=float(limit))
    return factor
