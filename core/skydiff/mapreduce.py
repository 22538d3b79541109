r"""Map a function over the overlapping cells of an image grid and stitch the results.

Spatially varying algorithms that are easiest to write for a constant model — decorrelation
with the local kernel (Reiss & Lupton, DMTN-021), ZOGY with the local PSFs (Zackay, Ofek &
Gal-Yam 2016) — are applied cell by cell: the image is cut into a grid of *inner* cells that
tile it, each grown by a *border* into an *outer* cut-out (clipped to the image); the function
processes every outer cut-out, and the outputs are blended back into one image. This is the
role ``lsst.ip.diffim``'s ``ImageMapReduceTask`` plays, with a smooth blending that leaves no
seams.

* :func:`make_grid` builds the :class:`Grid` of :class:`Cell` objects;
* :func:`map_reduce` cuts, maps and stitches.

Blending
--------
Let :math:`y_i` be the output of cell :math:`i` on its outer region and :math:`w_i \ge 0` a
weight that vanishes outside it. The stitched image is

.. math::

    y(\mathbf r) = \frac{\sum_i w_i(\mathbf r)\, y_i(\mathbf r)}{\sum_i w_i(\mathbf r)},

with, per ``blend``,

``"copy"``
    :math:`w_i` = 1 on the inner cell, 0 elsewhere (each pixel comes from exactly one cell;
    seams appear where neighbouring outputs differ);
``"average"``
    :math:`w_i` = 1 on the whole outer cut-out (overlaps are averaged; seams are softened, not
    removed);
``"taper"``
    separable weights :math:`w_i(r, c) = u_i(r)\,v_i(c)` whose 1-D factors rise and fall as
    :math:`\cos^2` ramps across each boundary between neighbouring inner cells: with a
    boundary at :math:`b` and ramp half-width :math:`h`, the cell on the low side has
    :math:`\cos^2\!\big(\tfrac{\pi}{2}\,t\big)` and the cell on the high side
    :math:`\sin^2\!\big(\tfrac{\pi}{2}\,t\big)`, :math:`t = (x - b + h - \tfrac12) / 2h`
    clipped to [0, 1]. At an image edge the weight stays 1. The factors of each axis form a
    partition of unity, so :math:`\sum_i w_i = 1` everywhere and the output varies smoothly
    from one cell's result to the next: a jump :math:`\Delta` between neighbouring outputs
    becomes a ramp of slope at most :math:`\pi\Delta / 4h` per pixel.

The ramp half-width defaults to half the border (and is never more than half the narrower
neighbouring inner cell), so each cell's weight vanishes at least ``border / 2`` pixels
before the edge of its cut-out, where its output may suffer from edge effects.

Sums are accumulated in ``float64``, so an identity function reproduces the input exactly in
every mode. Integer and boolean outputs (mask planes) are not averaged: they are OR-ed over the
pixels where a cell's weight is positive (``"copy"``: copied from the inner cells).

References
----------
.. [1] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, "Implementation of image difference
   decorrelation" (spatially varying decorrelation with ``ImageMapReduceTask``).
.. [2] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27 (ZOGY).

Examples
--------
>>> import numpy as np
>>> from skydiff.mapreduce import make_grid, map_reduce
>>> grid = make_grid((100, 150), cell_size=64, border=8)
>>> grid.n_cells, len(grid)
((2, 3), 6)
>>> image = np.arange(100 * 150, dtype=np.float32).reshape(100, 150)
>>> out = map_reduce(image, lambda cutout, cell: {"image": cutout * 2}, cell_size=64,
...                  border=8)
>>> bool(np.array_equal(out["image"], 2 * image))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeAlias

import attrs
import numpy as np
from numpy.typing import NDArray

from skydiff.errors import InputError
from skydiff.exposure import Exposure

__all__ = [
    "BLEND_MODES",
    "Cell",
    "Grid",
    "make_grid",
    "map_reduce",
]

#: The blending modes of :func:`map_reduce`.
BLEND_MODES: tuple[str, ...] = ("taper", "average", "copy")

Blend: TypeAlias = Literal["taper", "average", "copy"]
#: What a mapped function may return: named arrays of the cut-out's shape, or an exposure.
CellOutput: TypeAlias = Mapping[str, NDArray[Any]] | Exposure
#: What :func:`map_reduce` may be given: an exposure, named arrays or one array.
MapInput: TypeAlias = Exposure | Mapping[str, NDArray[Any]] | NDArray[Any]


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as two integers ≥ ``minimum`` (one integer applies to both axes)."""
    items = value if isinstance(value, tuple | list) else (value, value)
    if len(items) != 2:
        msg = f"{name} must be an integer or a pair of integers, got {value!r}"
        raise InputError(msg)
    result = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | np.integer) or item < minimum:
            msg = f"{name} must be integers ≥ {minimum}, got {value!r}"
            raise InputError(msg)
        result.append(int(item))
    return result[0], result[1]


@attrs.frozen
class Cell:
    """One cell of a :class:`Grid`.

    Attributes
    ----------
    index : tuple of int
        ``(i_row, i_col)`` of the cell in the grid.
    inner : tuple of slice
        ``(rows, cols)`` of the inner cell in the image (the inner cells tile the image
        without overlap).
    outer : tuple of slice
        ``(rows, cols)`` of the inner cell grown by the border and clipped to the image: the
        cut-out the mapped function receives.
    """

    index: tuple[int, int]
    inner: tuple[slice, slice]
    outer: tuple[slice, slice]

    @property
    def inner_in_outer(self) -> tuple[slice, slice]:
        """The inner cell's slices relative to the outer cut-out."""
        rows, cols = self.inner
        outer_rows, outer_cols = self.outer
        return (slice(rows.start - outer_rows.start, rows.stop - outer_rows.start),
                slice(cols.start - outer_cols.start, cols.stop - outer_cols.start))

    @property
    def outer_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the outer cut-out."""
        rows, cols = self.outer
        return rows.stop - rows.start, cols.stop - cols.start

    @property
    def center(self) -> tuple[float, float]:
        """``(row, col)`` of the centre of the inner cell, in image array coordinates."""
        rows, cols = self.inner
        return 0.5 * (rows.start + rows.stop - 1), 0.5 * (cols.start + cols.stop - 1)


def _edges(n: int, cell: int) -> NDArray[np.int64]:
    """Boundaries of ``ceil(n / cell)`` near-equal intervals tiling ``[0, n)``."""
    count = max(1, math.ceil(n / cell))
    return np.round(np.linspace(0.0, n, count + 1)).astype(np.int64)


@attrs.frozen
class Grid:
    """A grid of overlapping cells covering an image; build it with :func:`make_grid`.

    Attributes
    ----------
    shape : tuple of int
        ``(H, W)`` of the image.
    cell_size : tuple of int
        The largest inner cell size ``(rows, cols)`` requested.
    border : tuple of int
        Border ``(rows, cols)`` by which inner cells grow into outer cut-outs.
    row_edges, col_edges : tuple of int
        Boundaries of the inner cells along each axis (first 0, last ``H`` or ``W``).
    cells : tuple of Cell
        The cells, row-major.
    """

    shape: tuple[int, int]
    cell_size: tuple[int, int]
    border: tuple[int, int]
    row_edges: tuple[int, ...]
    col_edges: tuple[int, ...]
    cells: tuple[Cell, ...] = attrs.field(repr=False)

    @property
    def n_cells(self) -> tuple[int, int]:
        """``(n_rows, n_cols)`` of cells."""
        return len(self.row_edges) - 1, len(self.col_edges) - 1

    def __len__(self) -> int:
        return len(self.cells)

    def __iter__(self) -> Iterator[Cell]:
        return iter(self.cells)

    def _taper_axis(self, axis: int, width: int | None) -> list[NDArray[np.float64]]:
        """The 1-D taper weight of every cell along ``axis``, over its outer extent.

        The ramp half-width at a boundary is ``width`` (default half the border), at most the
        border and half the narrower of the two neighbouring inner cells.
        """
        edges = self.row_edges if axis == 0 else self.col_edges
        n = self.shape[axis]
        border = self.border[axis]
        sizes = np.diff(edges)
        positions = np.arange(n, dtype=np.float64)
        weights = []
        for i in range(len(sizes)):
            start, stop = max(edges[i] - border, 0), min(edges[i + 1] + border, n)
            w = np.ones(stop - start)
            x = positions[start:stop]
            for side, b in ((0, edges[i]), (1, edges[i + 1])):
                if b in (0, n):
                    continue
                neighbour = sizes[i - 1] if side == 0 else sizes[i + 1]
                half = min(border // 2 if width is None else width, border,
                           int(min(sizes[i], neighbour)) // 2)
                if half <= 0:  # no overlap: a hard boundary
                    ramp = (x >= b).astype(np.float64) if side == 0 else (x < b) * 1.0
                else:
                    t = np.clip((x - b + half + 0.5) / (2.0 * half), 0.0, 1.0)
                    ramp = np.sin(0.5 * np.pi * t) ** 2 if side == 0 else np.cos(
                        0.5 * np.pi * t) ** 2
                w *= ramp
            weights.append(w)
        return weights

    def weights(self, blend: Blend = "taper", *, taper_width: int | None = None
                ) -> list[tuple[NDArray[np.float64], NDArray[np.float64]]]:
        """The separable blending weights of every cell over its outer cut-out.

        Parameters
        ----------
        blend : {"taper", "average", "copy"}, optional
            The blending mode (see the module notes).
        taper_width : int, optional
            Ramp half-width of ``"taper"`` (default ``border // 2`` per axis).

        Returns
        -------
        list of (ndarray, ndarray)
            Per cell, the row factor of length ``outer rows`` and the column factor of
            length ``outer cols``; the weight is their outer product.

        Raises
        ------
        InputError
            For an unknown blend mode or a negative ``taper_width``.
        """
        _check_blend(blend)
        if taper_width is not None and (isinstance(taper_width, bool) or taper_width < 0):
            msg = f"taper_width must be a non-negative integer, got {taper_width!r}"
            raise InputError(msg)
        if blend == "taper":
            rows = self._taper_axis(0, taper_width)
            cols = self._taper_axis(1, taper_width)
            return [(rows[cell.index[0]], cols[cell.index[1]]) for cell in self.cells]
        result = []
        for cell in self.cells:
            wr, wc = np.ones(cell.outer_shape[0]), np.ones(cell.outer_shape[1])
            if blend == "copy":
                inner_r, inner_c = cell.inner_in_outer
                wr[:] = 0.0
                wc[:] = 0.0
                wr[inner_r] = 1.0
                wc[inner_c] = 1.0
            result.append((wr, wc))
        return result


def make_grid(shape: tuple[int, int], *, cell_size: int | tuple[int, int],
              border: int | tuple[int, int]) -> Grid:
    """Cut an image of ``shape`` into a grid of near-equal inner cells with borders.

    Along each axis of length :math:`n` there are :math:`\\lceil n / s \\rceil` inner cells
    (:math:`s` = ``cell_size``) with boundaries at the rounded multiples of
    :math:`n / \\lceil n / s \\rceil`, so no cell is larger than :math:`s` and no sliver cell is
    left at the end. Each outer cut-out is its inner cell grown by ``border`` on every side
    and clipped to the image.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the image, both ≥ 1.
    cell_size : int or tuple of int
        Largest inner cell size (pixels, ≥ 1), for both axes or ``(rows, cols)``.
    border : int or tuple of int
        Border (pixels, ≥ 0), for both axes or ``(rows, cols)``.

    Returns
    -------
    Grid

    Raises
    ------
    InputError
        If a size is not a positive integer or the border is negative.

    Examples
    --------
    >>> grid = make_grid((10, 7), cell_size=4, border=1)
    >>> grid.row_edges, grid.col_edges
    ((0, 3, 7, 10), (0, 4, 7))
    >>> grid.cells[0].outer
    (slice(0, 4, None), slice(0, 5, None))
    """
    height, width = _pair(tuple(shape), "shape", 1)
    cell = _pair(cell_size, "cell_size", 1)
    grow = _pair(border, "border", 0)
    row_edges = _edges(height, cell[0])
    col_edges = _edges(width, cell[1])
    cells = []
    for i in range(len(row_edges) - 1):
        r0, r1 = int(row_edges[i]), int(row_edges[i + 1])
        for j in range(len(col_edges) - 1):
            c0, c1 = int(col_edges[j]), int(col_edges[j + 1])
            cells.append(Cell(index=(i, j), inner=(slice(r0, r1), slice(c0, c1)),
                              outer=(slice(max(r0 - grow[0], 0), min(r1 + grow[0], height)),
                                     slice(max(c0 - grow[1], 0), min(c1 + grow[1], width)))))
    return Grid(shape=(height, width), cell_size=cell, border=grow,
                row_edges=tuple(int(e) for e in row_edges),
                col_edges=tuple(int(e) for e in col_edges), cells=tuple(cells))


def _check_blend(blend: Any) -> None:
    if blend not in BLEND_MODES:
        msg = f"unknown blend mode {blend!r}; use one of {', '.join(BLEND_MODES)}"
        raise InputError(msg)


def _readonly_view(array: NDArray[Any], cell: Cell) -> NDArray[Any]:
    view = array[cell.outer]
    view.flags.writeable = False
    return view


def _cutout(data: MapInput, cell: Cell) -> Any:
    if isinstance(data, Exposure):
        return data.cutout(*cell.outer)
    if isinstance(data, np.ndarray):
        return _readonly_view(data, cell)
    return {key: _readonly_view(value, cell) for key, value in data.items()}


def _input_shape(data: Any) -> tuple[int, int]:
    if isinstance(data, Exposure):
        return data.shape
    if isinstance(data, np.ndarray):
        arrays = {"array": data}
    elif isinstance(data, Mapping) and data:
        arrays = dict(data)
    else:
        msg = (f"map_reduce needs an Exposure, a 2-D array or a non-empty mapping of 2-D "
               f"arrays, got {type(data).__name__}")
        raise InputError(msg)
    shapes = set()
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.ndim != 2 or value.size == 0:
            msg = f"map_reduce input {key!r} must be a non-empty 2-D ndarray"
            raise InputError(msg)
        shapes.add(value.shape)
    if len(shapes) != 1:
        msg = f"map_reduce input arrays have different shapes {sorted(shapes)}"
        raise InputError(msg)
    shape = shapes.pop()
    return int(shape[0]), int(shape[1])


class _Accumulator:
    """Weighted sums (floats) or OR-ed flags (integers) of one output, over the full image."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.is_float = bool(np.issubdtype(dtype, np.floating)
                             or np.issubdtype(dtype, np.complexfloating))
        if self.is_float:
            acc_dtype = np.complex128 if np.issubdtype(dtype, np.complexfloating) else np.float64
            self.sum: NDArray[Any] = np.zeros(shape, dtype=acc_dtype)
        else:
            self.sum = np.zeros(shape, dtype=dtype)

    def add(self, cell: Cell, value: NDArray[Any], weight: NDArray[np.float64]) -> None:
        target = self.sum[cell.outer]
        if self.is_float:
            target += value * weight
        else:
            positive = weight > 0.0
            if self.dtype == np.bool_:
                target |= value & positive
            else:
                target |= np.where(positive, value, 0).astype(self.dtype)

    def result(self, norm_r: NDArray[np.float64], norm_c: NDArray[np.float64]
               ) -> NDArray[Any]:
        if not self.is_float:
            return self.sum
        self.sum /= norm_r[:, None]
        self.sum /= norm_c[None, :]
        return self.sum.astype(self.dtype)


def _axis_norm(grid: Grid, weights: list[tuple[NDArray[np.float64], NDArray[np.float64]]],
               axis: int) -> NDArray[np.float64]:
    """The sum over cells of one axis' weight factor (the weight sum is their product)."""
    norm = np.zeros(grid.shape[axis])
    seen = set()
    for cell, factors in zip(grid.cells, weights, strict=True):
        key = cell.index[axis]
        if key in seen:
            continue
        seen.add(key)
        norm[cell.outer[axis]] += factors[axis]
    return norm


def map_reduce(exposure_or_arrays: MapInput, function: Callable[[Any, Cell], CellOutput], *,
               cell_size: int | tuple[int, int], border: int | tuple[int, int],
               blend: Blend = "taper", taper_width: int | None = None
               ) -> dict[str, NDArray[Any]] | Exposure:
    r"""Apply ``function`` to every outer cut-out of a grid and blend the outputs together.

    Parameters
    ----------
    exposure_or_arrays : Exposure or mapping of str to ndarray or ndarray
        The input. ``function`` receives the matching cut-out: an
        :class:`~skydiff.exposure.Exposure` (:meth:`~skydiff.exposure.Exposure.cutout`, with
        its origin, so parent-frame models stay valid), a dict of read-only array views, or
        one read-only array view.
    function : callable
        ``function(cutout, cell) -> dict[str, ndarray] | Exposure``. A dict holds arrays of
        the cut-out's shape (the same keys for every cell); an exposure must have the
        cut-out's shape. It must not keep references to the views it is given.
    cell_size : int or tuple of int
        Largest inner cell size in pixels (see :func:`make_grid`).
    border : int or tuple of int
        Border in pixels by which cells overlap their neighbours.
    blend : {"taper", "average", "copy"}, optional
        How overlapping outputs are combined (see the module notes); ``"taper"`` (default)
        leaves no seams.
    taper_width : int, optional
        Ramp half-width of ``"taper"`` in pixels (default half the border).

    Returns
    -------
    dict of str to ndarray or Exposure
        For dict outputs, the stitched arrays of the full image's shape, with the dtype of the
        first cell's outputs (floating arrays blended, integer/boolean arrays OR-ed). For
        exposure outputs, an exposure with the stitched image and variance (blended) and mask
        (OR-ed): the input exposure evolved (with the mask planes of the cell outputs), or a
        new exposure when the input was arrays.

    Raises
    ------
    InputError
        For an unsupported input, inconsistent array shapes, bad grid sizes, an unknown blend
        mode, or cell outputs of the wrong type, shape or keys.

    Notes
    -----
    Cells are processed one after the other; the per-cell work of skydiff's users (FFTs) is
    multithreaded already. Memory beyond the outputs is one ``float64`` accumulator per
    floating output.

    Examples
    --------
    A per-cell constant blended without seams:

    >>> import numpy as np
    >>> image = np.zeros((64, 64), dtype=np.float32)
    >>> def cell_value(cutout, cell):
    ...     return {"value": np.full(cutout.shape, float(cell.index[1]), np.float32)}
    >>> out = map_reduce(image, cell_value, cell_size=32, border=8)["value"]
    >>> float(out[0, 0]), float(out[0, 63]), float(np.abs(np.diff(out, axis=1)).max()) < 0.2
    (0.0, 1.0, True)
    """
    _check_blend(blend)
    shape = _input_shape(exposure_or_arrays)
    grid = make_grid(shape, cell_size=cell_size, border=border)
    weights = grid.weights(blend, taper_width=taper_width)
    outputs = [function(_cutout(exposure_or_arrays, cell), cell) for cell in grid]

    first = outputs[0]
    as_exposure = isinstance(first, Exposure)
    accumulators: dict[str, _Accumulator] = {}
    mask_planes = None
    for cell, output, (wr, wc) in zip(grid.cells, outputs, weights, strict=True):
        arrays = _output_arrays(output, cell, as_exposure)
        if as_exposure:
            assert isinstance(output, Exposure)
            if mask_planes is None:
                mask_planes = output.mask_planes
            elif output.mask_planes != mask_planes:
                msg = (f"cell {cell.index} returned mask planes {output.mask_planes.names}, "
                       f"others {mask_planes.names}; cells must use the same planes")
                raise InputError(msg)
        if not accumulators:
            accumulators = {key: _Accumulator(shape, value.dtype)
                            for key, value in arrays.items()}
        elif set(arrays) != set(accumulators):
            msg = (f"cell {cell.index} returned keys {sorted(arrays)}, the first cell "
                   f"{sorted(accumulators)}; every cell must return the same keys")
            raise InputError(msg)
        weight = wr[:, None] * wc[None, :]
        for key, value in arrays.items():
            accumulators[key].add(cell, value, weight)
    del outputs

    norm_r = _axis_norm(grid, weights, 0)
    norm_c = _axis_norm(grid, weights, 1)
    stitched = {key: acc.result(norm_r, norm_c) for key, acc in accumulators.items()}
    if not as_exposure:
        return stitched
    assert mask_planes is not None
    if isinstance(exposure_or_arrays, Exposure):
        return exposure_or_arrays.evolve(image=stitched["image"], mask=stitched["mask"],
                                         variance=stitched["variance"],
                                         mask_planes=mask_planes)
    return Exposure(stitched["image"], stitched["mask"], stitched["variance"],
                    mask_planes=mask_planes)


def _output_arrays(output: Any, cell: Cell, as_exposure: bool) -> dict[str, NDArray[Any]]:
    """The named arrays of one cell's output, checked against the cut-out shape."""
    if as_exposure != isinstance(output, Exposure):
        msg = (f"cell {cell.index} returned {type(output).__name__}; every cell must return "
               "the same kind of output (all Exposures or all mappings of arrays)")
        raise InputError(msg)
    if isinstance(output, Exposure):
        arrays = {"image": output.image, "mask": output.mask, "variance": output.variance}
    elif isinstance(output, Mapping) and output:
        arrays = {str(key): np.asarray(value) for key, value in output.items()}
    else:
        msg = (f"the mapped function must return a non-empty mapping of arrays or an "
               f"Exposure, got {type(output).__name__} for cell {cell.index}")
        raise InputError(msg)
    for key, value in arrays.items():
        if value.shape != cell.outer_shape:
            msg = (f"cell {cell.index} output {key!r} has shape {value.shape}, expected the "
                   f"cut-out shape {cell.outer_shape}")
            raise InputError(msg)
    return arrays
