r"""The spatial grid of the ``zogy`` subtraction: cells, their blending weights, FFT sizes.

A PSF that varies across the field is handled cell by cell: the inner cells of
:func:`skydiff.make_grid` (near-equal, at most ``cell_size`` pixels) define the cell centres
:math:`c_j` along each axis, each cell is filtered with the PSFs at its centre, and the
outputs are blended with *tent* weights

.. math::

    w_j(x) = \operatorname{interp}\big(x;\ (c_0, \dots, c_{n-1}),\ \mathbf e_j\big),

the linear interpolation of the unit vector :math:`\mathbf e_j` between the centres
(constant beyond the first and last). They sum to 1 everywhere (no seams) and reproduce
linear functions of position between the centres: blending outputs computed with the PSF at
each centre is, to first order in the PSF variation, the output for the PSF at the pixel
itself -- piecewise-constant PSFs or a partial overlap (cos² ramps) would leave a first-order
error of half a cell's PSF change. The weights are separable, :math:`w_{ij}(r, c) =
w_i(r)\,w_j(c)`.

A cell's *support* (where its weight is positive) spans from the previous centre to the next;
its *outer* region, the cut-out that is filtered, is the support grown by the kernels'
half-size ``border`` (clipped to the image). The FFT grid of a cell is at least the outer size
plus ``border``: the circular convolution then never wraps data into the support (zero
padding beyond the image edges, and beyond a cut only the points outside the support are
affected).
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import scipy.fft

import skydiff

__all__ = ["CellGeometry", "Layout", "make_layout"]


@attrs.frozen
class CellGeometry:
    """One cell of a :class:`Layout`.

    Attributes
    ----------
    index : tuple of int
        ``(i_row, i_col)``.
    centre : tuple of float
        ``(row, col)`` of the centre, in image array coordinates.
    support : tuple of slice
        ``(rows, cols)`` where the cell's weight is positive.
    outer : tuple of slice
        The support grown by the border, clipped to the image: the filtered cut-out.
    weight_rows, weight_cols : ndarray of float32
        The tent weights over the support's rows and columns.
    fft_shape : tuple of int
        The FFT grid of the cell.
    """

    index: tuple[int, int]
    centre: tuple[float, float]
    support: tuple[slice, slice]
    outer: tuple[slice, slice]
    weight_rows: np.ndarray = attrs.field(eq=False, repr=False)
    weight_cols: np.ndarray = attrs.field(eq=False, repr=False)
    fft_shape: tuple[int, int]

    @property
    def support_in_outer(self) -> tuple[slice, slice]:
        """The support relative to the outer cut-out."""
        (rows, cols), (outer_rows, outer_cols) = self.support, self.outer
        return (slice(rows.start - outer_rows.start, rows.stop - outer_rows.start),
                slice(cols.start - outer_cols.start, cols.stop - outer_cols.start))


@attrs.frozen
class Layout:
    """Cells covering an image with tent-weight blending (module notes).

    Attributes
    ----------
    shape : tuple of int
        ``(H, W)``.
    n_cells : tuple of int
        ``(n_rows, n_cols)``.
    border : int
        Kernel half-size by which the supports grow.
    cells : tuple of CellGeometry
        Row-major.
    """

    shape: tuple[int, int]
    n_cells: tuple[int, int]
    border: int
    cells: tuple[CellGeometry, ...] = attrs.field(repr=False)


def _axis(n: int, edges: tuple[int, ...], border: int
          ) -> list[tuple[float, slice, slice, np.ndarray]]:
    """Per cell along one axis: centre, support, outer region and the tent weights."""
    centres = np.array([0.5 * (edges[j] + edges[j + 1] - 1) for j in range(len(edges) - 1)])
    positions = np.arange(n, dtype=np.float64)
    out = []
    for j in range(centres.size):
        unit = np.zeros(centres.size)
        unit[j] = 1.0
        weight = np.interp(positions, centres, unit) if centres.size > 1 \
            else np.ones(n)
        nonzero = np.flatnonzero(weight > 0)
        start, stop = int(nonzero[0]), int(nonzero[-1]) + 1
        support = slice(start, stop)
        outer = slice(max(0, start - border), min(n, stop + border))
        out.append((float(centres[j]), support, outer,
                    weight[start:stop].astype(np.float32)))
    return out


def _fft_size(outer: int, border: int) -> int:
    return int(scipy.fft.next_fast_len(max(outer + border, 2 * border + 1), real=True))


def make_layout(shape: tuple[int, int], *, cell_size: int | None, border: int) -> Layout:
    """The cells of an image of ``shape`` (one cell when ``cell_size`` is None).

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)``.
    cell_size : int or None
        Largest spacing of the cell centres (the inner cells of :func:`skydiff.make_grid`);
        None or a size at least the image gives a single cell.
    border : int
        Half-size of the filters (pixels).

    Returns
    -------
    Layout
    """
    height, width = shape
    if cell_size is None or cell_size >= max(height, width):
        row_edges: tuple[int, ...] = (0, height)
        col_edges: tuple[int, ...] = (0, width)
    else:
        grid = skydiff.make_grid(shape, cell_size=int(cell_size), border=0)
        row_edges, col_edges = grid.row_edges, grid.col_edges
    rows = _axis(height, row_edges, border)
    cols = _axis(width, col_edges, border)
    cells = []
    for i, (centre_r, support_r, outer_r, weight_r) in enumerate(rows):
        for j, (centre_c, support_c, outer_c, weight_c) in enumerate(cols):
            fft_shape = (_fft_size(outer_r.stop - outer_r.start, border),
                         _fft_size(outer_c.stop - outer_c.start, border))
            cells.append(CellGeometry(index=(i, j), centre=(centre_r, centre_c),
                                      support=(support_r, support_c),
                                      outer=(outer_r, outer_c), weight_rows=weight_r,
                                      weight_cols=weight_c, fft_shape=fft_shape))
    return Layout(shape=(height, width), n_cells=(len(rows), len(cols)), border=border,
                  cells=tuple(cells))


def choose_cell_size(rate: float, *, max_change: float, minimum: int,
                     shape: tuple[int, int]) -> int:
    """The cell spacing for which the PSF changes by ``max_change`` between centres.

    ``rate`` is the relative change of the PSF per pixel; the result is clipped to
    ``[minimum, max(shape)]``.
    """
    largest = max(shape)
    if not rate > 0:
        return largest
    return int(min(largest, max(minimum, math.floor(max_change / rate))))
