r"""Convolution kernels: fixed images and spatially varying linear combinations of a basis.

A PSF-matching kernel maps one image onto another of different seeing. Two kinds exist:

* :class:`FixedKernel` — one image, the same everywhere;
* :class:`BasisKernel` — the spatially varying kernel of Alard & Lupton (1998) and Alard
  (2000): a linear combination of basis images whose coefficients are 2-D polynomials of
  position,

  .. math::

      K(x, y) = \sum_{j=0}^{n_b-1} p_j(x, y)\, B_j, \qquad
      p_j(x, y) = \sum_{t=0}^{n_t-1} a_{jt}\, f_t(x, y),

  where the spatial functions :math:`f_t` are products of Chebyshev polynomials of the first
  kind (or plain monomials) of the position normalised to :math:`[-1, 1]^2` over a bounding
  box. There are :math:`n_t = (n+1)(n+2)/2` of them for total degree :math:`n`.

Positions are *parent-pixel coordinates*: for an exposure with origin :math:`(x_0, y_0)`, the
pixel at array index ``[row, col]`` sits at :math:`x = \mathrm{col} + x_0`,
:math:`y = \mathrm{row} + y_0`. A kernel's bounding box is given in the same frame.

Kernel images are indexed ``[row, col]``, have odd sizes along both axes and are centred on
their central pixel ``[K_r // 2, K_c // 2]``.

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325, "A method for optimal image subtraction".
.. [2] Alard, C. 2000, A&AS 144, 363, "Image subtraction using a space-varying kernel".
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs
import numpy as np
from numpy.typing import ArrayLike

from skydiff.errors import InputError

__all__ = [
    "SPATIAL_KINDS",
    "BasisKernel",
    "FixedKernel",
    "Kernel",
    "chebyshev_terms",
    "evaluate_on_grid",
    "n_spatial_terms",
    "normalize_positions",
    "separable_spatial_functions",
    "spatial_functions",
]

#: The kinds of spatial functions: Chebyshev polynomials of the first kind, or monomials.
SPATIAL_KINDS: tuple[str, ...] = ("chebyshev", "polynomial")

SpatialKind = Literal["chebyshev", "polynomial"]
BBox = tuple[float, float, float, float]


# ------------------------------------------------------------------------------------------
# spatial functions


def n_spatial_terms(order: int) -> int:
    """The number of 2-D terms of total degree ≤ ``order``: :math:`(n+1)(n+2)/2`."""
    order = _check_order(order)
    return (order + 1) * (order + 2) // 2


def chebyshev_terms(order: int) -> list[tuple[int, int]]:
    r"""The 2-D spatial terms up to total degree ``order``, in skydiff's canonical order.

    Term ``(i, j)`` stands for :math:`T_i(u)\,T_j(v)` (or :math:`u^i v^j` for monomials),
    with :math:`u` the normalised column coordinate and :math:`v` the normalised row
    coordinate. Terms are sorted by total degree, then by decreasing power of :math:`u`:
    ``(0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ...``.

    Parameters
    ----------
    order : int
        Maximum total degree :math:`n \ge 0`.

    Returns
    -------
    list of tuple of int
        The :math:`(n+1)(n+2)/2` exponent pairs ``(i, j)``.

    Raises
    ------
    InputError
        If ``order`` is negative or not an integer.

    Examples
    --------
    >>> chebyshev_terms(2)
    [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    """
    order = _check_order(order)
    return [(degree - j, j) for degree in range(order + 1) for j in range(degree + 1)]


def normalize_positions(x: ArrayLike, y: ArrayLike, bbox: BBox
                        ) -> tuple[np.ndarray, np.ndarray]:
    r"""Map positions linearly from ``bbox`` onto :math:`[-1, 1]^2`.

    .. math::

        u = \frac{2x - (x_\min + x_\max)}{x_\max - x_\min}, \qquad
        v = \frac{2y - (y_\min + y_\max)}{y_\max - y_\min}.

    Parameters
    ----------
    x, y : array_like
        Positions (parent-pixel coordinates), broadcastable against each other.
    bbox : tuple of 4 floats
        ``(x_min, y_min, x_max, y_max)``; the continuous interval ``[x_min, x_max]`` maps onto
        ``[-1, 1]``. An exposure's half-open ``bbox`` is a valid choice.

    Returns
    -------
    u, v : ndarray of float64
        Broadcast normalised coordinates.
    """
    x_min, y_min, x_max, y_max = _check_bbox(bbox)
    xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    u = (2.0 * xa - (x_min + x_max)) / (x_max - x_min)
    v = (2.0 * ya - (y_min + y_max)) / (y_max - y_min)
    return u, v


def _powers_1d(values: np.ndarray, order: int, kind: str) -> list[np.ndarray]:
    """``[f_0(values), ..., f_order(values)]`` with :math:`f_k = T_k` or the monomial."""
    out = [np.ones_like(values)]
    if order >= 1:
        out.append(values.copy())
    for k in range(2, order + 1):
        if kind == "chebyshev":
            out.append(2.0 * values * out[k - 1] - out[k - 2])
        else:
            out.append(values * out[k - 1])
    return out


def spatial_functions(x: ArrayLike, y: ArrayLike, *, order: int, bbox: BBox,
                      kind: SpatialKind = "chebyshev") -> np.ndarray:
    r"""Evaluate every spatial term at an array of positions.

    Term :math:`t = (i, j)` of :func:`chebyshev_terms` is

    .. math::

        f_t(x, y) = T_i(u)\,T_j(v) \quad (\text{kind} = \text{"chebyshev"}), \qquad
        f_t(x, y) = u^i v^j \quad (\text{kind} = \text{"polynomial"}),

    with :math:`(u, v)` from :func:`normalize_positions` and :math:`T_k` the Chebyshev
    polynomials of the first kind, :math:`T_0 = 1, T_1(u) = u,
    T_{k+1}(u) = 2u\,T_k(u) - T_{k-1}(u)`.

    Parameters
    ----------
    x, y : array_like
        Positions (parent-pixel coordinates, ``x`` = column, ``y`` = row), broadcastable.
    order : int
        Maximum total degree :math:`n \ge 0`.
    bbox : tuple of 4 floats
        ``(x_min, y_min, x_max, y_max)`` mapped onto :math:`[-1, 1]^2`.
    kind : {"chebyshev", "polynomial"}, optional
        The family of 1-D functions.

    Returns
    -------
    ndarray of shape (n_terms, \*shape)
        ``float64`` values; ``shape`` is the broadcast shape of ``x`` and ``y``.

    Raises
    ------
    InputError
        If ``order`` is negative, ``bbox`` is degenerate or ``kind`` unknown.

    Examples
    --------
    >>> spatial_functions([0.0, 10.0], [0.0, 0.0], order=1, bbox=(0, 0, 10, 10))
    array([[ 1.,  1.],
           [-1.,  1.],
           [-1., -1.]])
    """
    kind = _check_kind(kind)
    order = _check_order(order)
    u, v = normalize_positions(x, y, bbox)
    fu = _powers_1d(u, order, kind)
    fv = _powers_1d(v, order, kind)
    terms = chebyshev_terms(order)
    out = np.empty((len(terms), *u.shape), dtype=np.float64)
    for t, (i, j) in enumerate(terms):
        np.multiply(fu[i], fv[j], out=out[t, ...])
    return out


def separable_spatial_functions(columns: ArrayLike, rows: ArrayLike, *, order: int, bbox: BBox,
                                kind: SpatialKind = "chebyshev"
                                ) -> tuple[list[tuple[int, int]], list[np.ndarray],
                                           list[np.ndarray]]:
    """The 1-D factors of the spatial terms along a row of columns and a column of rows.

    On a pixel grid, term ``(i, j)`` equals ``fy[j][:, None] * fx[i][None, :]``, which lets
    callers evaluate the terms over a whole image without storing ``n_terms`` full planes.

    Parameters
    ----------
    columns, rows : array_like, 1-D
        Parent-pixel ``x`` coordinates of the columns and ``y`` coordinates of the rows.
    order, bbox, kind
        As in :func:`spatial_functions`.

    Returns
    -------
    terms : list of tuple of int
        :func:`chebyshev_terms` of ``order``.
    fx : list of ndarray
        ``fx[i]`` is the degree-``i`` function of the normalised columns.
    fy : list of ndarray
        ``fy[j]`` is the degree-``j`` function of the normalised rows.
    """
    kind = _check_kind(kind)
    order = _check_order(order)
    x_min, y_min, x_max, y_max = _check_bbox(bbox)
    xs = np.asarray(columns, dtype=np.float64)
    ys = np.asarray(rows, dtype=np.float64)
    u = (2.0 * xs - (x_min + x_max)) / (x_max - x_min)
    v = (2.0 * ys - (y_min + y_max)) / (y_max - y_min)
    return chebyshev_terms(order), _powers_1d(u, order, kind), _powers_1d(v, order, kind)


# ------------------------------------------------------------------------------------------
# converters and validators


def _check_order(order: Any) -> int:
    if isinstance(order, bool) or not isinstance(order, int | np.integer) or order < 0:
        msg = f"spatial order must be a non-negative integer, got {order!r}"
        raise InputError(msg)
    return int(order)


def _check_kind(kind: Any) -> SpatialKind:
    if kind not in SPATIAL_KINDS:
        msg = f"unknown spatial function kind {kind!r}; use one of {', '.join(SPATIAL_KINDS)}"
        raise InputError(msg)
    return kind


def _check_bbox(bbox: Any) -> BBox:
    try:
        values = tuple(float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        msg = f"bbox must be four numbers (x_min, y_min, x_max, y_max), got {bbox!r}"
        raise InputError(msg) from exc
    if len(values) != 4 or not all(np.isfinite(values)):
        msg = f"bbox must be four finite numbers (x_min, y_min, x_max, y_max), got {bbox!r}"
        raise InputError(msg)
    x_min, y_min, x_max, y_max = values
    if not (x_max > x_min and y_max > y_min):
        msg = f"bbox {values} is empty; it needs x_max > x_min and y_max > y_min"
        raise InputError(msg)
    return values


class _FrozenArrays:
    """Mixin: pickling and copying keep array fields read-only and skip the converters.

    attrs' own ``__setstate__`` would restore writeable arrays (NumPy does not pickle the
    flag) and re-running converters could change values (e.g. re-normalisation), so the
    instance is rebuilt field by field and its arrays are frozen again.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        cls: Any = type(self)
        return (_restore_frozen, (cls, tuple(getattr(self, f.name) for f in attrs.fields(cls))))


def _restore_frozen(cls: Any, values: tuple[Any, ...]) -> Any:
    obj: Any = object.__new__(cls)
    for field, value in zip(attrs.fields(cls), values, strict=True):
        if isinstance(value, np.ndarray) and value.flags.writeable:
            value.setflags(write=False)
        object.__setattr__(obj, field.name, value)
    return obj


def _readonly_float64(value: ArrayLike) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    array.setflags(write=False)
    return array


def _kernel_image(value: ArrayLike) -> np.ndarray:
    array = _readonly_float64(value)
    if array.ndim != 2:
        msg = f"a kernel image must be 2-D, got shape {array.shape}"
        raise InputError(msg)
    if array.shape[0] % 2 == 0 or array.shape[1] % 2 == 0:
        msg = (f"kernel image shape {array.shape} must be odd along both axes so that the "
               "kernel has a central pixel; pad it with a row/column of zeros")
        raise InputError(msg)
    if not np.all(np.isfinite(array)):
        msg = "kernel image contains NaN or inf; kernels must be finite"
        raise InputError(msg)
    return array


def _kernel_basis(value: ArrayLike) -> np.ndarray:
    array = _readonly_float64(value)
    if array.ndim != 3 or array.shape[0] == 0:
        msg = (f"kernel basis must have shape (n_basis, K_r, K_c) with n_basis ≥ 1, "
               f"got {array.shape}")
        raise InputError(msg)
    if array.shape[1] % 2 == 0 or array.shape[2] % 2 == 0:
        msg = (f"kernel basis images of shape {array.shape[1:]} must be odd along both axes; "
               "pad them with a row/column of zeros")
        raise InputError(msg)
    if not np.all(np.isfinite(array)):
        msg = "kernel basis contains NaN or inf; basis images must be finite"
        raise InputError(msg)
    return array


def _coefficients(value: ArrayLike) -> np.ndarray:
    array = _readonly_float64(value)
    if array.ndim != 2:
        msg = (f"coefficients must have shape (n_basis, n_terms), got {array.shape}; for a "
               "spatially constant kernel pass coefficients[:, None] with order=0")
        raise InputError(msg)
    if not np.all(np.isfinite(array)):
        msg = "coefficients contain NaN or inf; they must be finite"
        raise InputError(msg)
    return array


def _array_eq() -> Any:
    return attrs.cmp_using(eq=np.array_equal)


# ------------------------------------------------------------------------------------------
# kernels


@attrs.frozen
class FixedKernel(_FrozenArrays):
    """A spatially constant convolution kernel.

    Parameters
    ----------
    image : array_like of shape (K_r, K_c)
        The kernel image, ``K_r`` and ``K_c`` odd, centred on ``[K_r // 2, K_c // 2]``. It is
        copied to a read-only ``float64`` array and not normalised.

    Raises
    ------
    InputError
        If the image is not 2-D, has an even size, or is not finite.

    Examples
    --------
    >>> k = FixedKernel([[0, 1, 0], [1, 4, 1], [0, 1, 0]])
    >>> k.shape, k.sum
    ((3, 3), 8.0)
    """

    image: np.ndarray = attrs.field(converter=_kernel_image, eq=_array_eq(), hash=False)

    #: A fixed kernel is the same at every position.
    is_spatially_varying: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(K_r, K_c)``."""
        return self.image.shape

    @property
    def sum(self) -> float:
        """The sum of the kernel image (the photometric scale factor)."""
        return float(self.image.sum())

    def image_at(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The kernel image (read-only; the same at every position)."""
        return self.image

    def images_at(self, xs: ArrayLike, ys: ArrayLike) -> np.ndarray:
        """The kernel image repeated for every position: shape ``(n, K_r, K_c)``."""
        n = np.broadcast(np.asarray(xs), np.asarray(ys)).size
        return np.broadcast_to(self.image, (n, *self.image.shape)).copy()

    def sum_at(self, x: ArrayLike, y: ArrayLike) -> np.ndarray | float:
        """The kernel sum, broadcast to the shape of the positions."""
        shape = np.broadcast(np.asarray(x), np.asarray(y)).shape
        if shape == ():
            return self.sum
        return np.full(shape, self.sum)

    def spatial_images(self) -> np.ndarray:
        """The single spatial image, shape ``(1, K_r, K_c)`` (for uniform treatment)."""
        return self.image[np.newaxis].copy()


@attrs.frozen
class BasisKernel(_FrozenArrays):
    r"""A spatially varying kernel: basis images with polynomial coefficients of position.

    .. math::

        K(x, y) = \sum_{j} p_j(x, y)\,B_j = \sum_t f_t(x, y)\,A_t, \qquad
        A_t = \sum_j a_{jt}\,B_j,

    where :math:`p_j(x, y) = \sum_t a_{jt} f_t(x, y)` and :math:`f_t` are the spatial
    functions of :func:`spatial_functions` over ``bbox``. The images :math:`A_t`
    (:meth:`spatial_images`) are what :func:`skydiff.convolve.convolve` uses: one
    convolution per spatial term, not one per pixel.

    Parameters
    ----------
    basis : array_like of shape (n_basis, K_r, K_c)
        Basis images :math:`B_j` (odd sizes), copied read-only.
    coefficients : array_like of shape (n_basis, n_terms)
        :math:`a_{jt}`; ``n_terms = (order + 1)(order + 2) / 2``.
    order : int
        Total degree of the spatial polynomials.
    bbox : tuple of 4 floats
        ``(x_min, y_min, x_max, y_max)`` in parent-pixel coordinates, mapped onto
        :math:`[-1, 1]^2`.
    kind : {"chebyshev", "polynomial"}, optional
        Spatial function family (default Chebyshev, as ``lsst.ip.diffim``'s ``chebyshev1``).

    Raises
    ------
    InputError
        On inconsistent shapes, even kernel sizes, non-finite values, a negative order, an
        empty bbox or an unknown kind.

    References
    ----------
    .. [1] Alard, C. 2000, A&AS 144, 363.

    Examples
    --------
    >>> basis = np.zeros((2, 3, 3)); basis[0, 1, 1] = 1; basis[1, 1, 2] = 1
    >>> k = BasisKernel(basis, [[1, 0, 0], [0, 0.5, 0]], order=1, bbox=(0, 0, 100, 100))
    >>> k.is_spatially_varying
    True
    >>> k.image_at(100, 50)[1]
    array([0. , 1. , 0.5])
    """

    basis: np.ndarray = attrs.field(converter=_kernel_basis, eq=_array_eq(), hash=False)
    coefficients: np.ndarray = attrs.field(converter=_coefficients, eq=_array_eq(), hash=False)
    order: int = attrs.field(kw_only=True, converter=_check_order)
    bbox: BBox = attrs.field(kw_only=True, converter=_check_bbox)
    kind: SpatialKind = attrs.field(default="chebyshev", kw_only=True, converter=_check_kind)

    def __attrs_post_init__(self) -> None:
        n_basis = self.basis.shape[0]
        n_terms = n_spatial_terms(self.order)
        if self.coefficients.shape != (n_basis, n_terms):
            msg = (f"coefficients have shape {self.coefficients.shape}, expected "
                   f"(n_basis={n_basis}, n_terms={n_terms}) for order {self.order}")
            raise InputError(msg)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K_r, K_c)``."""
        return self.basis.shape[1:]

    @property
    def n_terms(self) -> int:
        """The number of spatial terms, :math:`(n+1)(n+2)/2`."""
        return self.coefficients.shape[1]

    @property
    def is_spatially_varying(self) -> bool:
        """True if any non-constant spatial coefficient is non-zero."""
        return bool(np.any(self.coefficients[:, 1:] != 0.0))

    @property
    def center(self) -> tuple[float, float]:
        """The centre ``(x, y)`` of ``bbox`` (the default evaluation position)."""
        x_min, y_min, x_max, y_max = self.bbox
        return 0.5 * (x_min + x_max), 0.5 * (y_min + y_max)

    def spatial_images(self) -> np.ndarray:
        r"""The images :math:`A_t = \sum_j a_{jt} B_j`, shape ``(n_terms, K_r, K_c)``."""
        return np.einsum("jt,jrc->trc", self.coefficients, self.basis)

    def spatial_values(self, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        """The spatial functions :math:`f_t` at the positions, shape ``(n_terms, *shape)``."""
        return spatial_functions(x, y, order=self.order, bbox=self.bbox, kind=self.kind)

    def images_at(self, xs: ArrayLike, ys: ArrayLike) -> np.ndarray:
        """The kernel images at many positions (vectorised).

        Parameters
        ----------
        xs, ys : array_like
            Positions (parent-pixel coordinates), broadcastable; flattened.

        Returns
        -------
        ndarray of shape (n, K_r, K_c)
        """
        values = self.spatial_values(xs, ys).reshape(self.n_terms, -1)
        return np.einsum("tn,trc->nrc", values, self.spatial_images())

    def image_at(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """The kernel image at ``(x, y)`` (default: the centre of ``bbox``)."""
        cx, cy = self.center
        x = cx if x is None else x
        y = cy if y is None else y
        return self.images_at(np.float64(x), np.float64(y))[0]

    def sum_at(self, x: ArrayLike, y: ArrayLike) -> np.ndarray | float:
        r"""The kernel sum :math:`\sum_t f_t(x, y) \sum A_t` at the positions."""
        sums = self.spatial_images().sum(axis=(1, 2))
        result = np.tensordot(sums, self.spatial_values(x, y), axes=(0, 0))
        if np.ndim(result) == 0:
            return float(result)
        return result

    @property
    def sum(self) -> float:
        """The kernel sum at the centre of ``bbox``."""
        return float(self.sum_at(*self.center))


#: Any convolution kernel.
Kernel = FixedKernel | BasisKernel


def evaluate_on_grid(kernel: Kernel, shape: tuple[int, int], *, n: tuple[int, int] = (5, 5),
                     origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Kernel images on a regular grid of positions covering an image (for diagnostics).

    Parameters
    ----------
    kernel : FixedKernel or BasisKernel
        The kernel.
    shape : tuple of int
        ``(H, W)`` of the image.
    n : tuple of int, optional
        ``(n_rows, n_cols)`` of the grid; positions are evenly spaced from the first to the
        last pixel centre along each axis.
    origin : tuple of int, optional
        ``(x0, y0)`` of the image in parent pixels.

    Returns
    -------
    ndarray of shape (n_rows, n_cols, K_r, K_c)

    Raises
    ------
    InputError
        If ``shape`` or ``n`` are not positive.
    """
    height, width = (int(v) for v in shape)
    n_rows, n_cols = (int(v) for v in n)
    if min(height, width, n_rows, n_cols) < 1:
        msg = f"shape {shape} and grid size {n} must be positive"
        raise InputError(msg)
    ys = origin[1] + np.linspace(0.0, height - 1.0, n_rows)
    xs = origin[0] + np.linspace(0.0, width - 1.0, n_cols)
    grid_x, grid_y = np.meshgrid(xs, ys)
    images = kernel.images_at(grid_x.ravel(), grid_y.ravel())
    return images.reshape(n_rows, n_cols, *kernel.shape)
