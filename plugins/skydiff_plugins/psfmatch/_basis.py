r"""Kernel bases and regularization operators for PSF matching.

Three families of basis kernels are provided, following ``lsst.ip.diffim``:

* the Alard–Lupton (AL) basis: circular Gaussians multiplied by 2-D monomials
  (:func:`alard_lupton_basis`), with widths and kernel size derived from the two PSF widths
  (:func:`alard_lupton_sigmas`, :func:`alard_lupton_kernel_size`);
* the delta-function (DF) basis: one kernel per pixel (:func:`delta_function_basis`), usually
  solved with a Tikhonov smoothness penalty :math:`\lambda\,a^T H a` whose matrix
  :math:`H = B^T B` comes from :func:`central_difference_matrix` or
  :func:`forward_difference_matrix`;
* a principal-component basis built from per-stamp kernel solutions (:func:`pca_basis`).

Every basis is passed through :func:`renormalize_basis`, after which the first kernel has unit
sum and all others zero sum and unit :math:`L_2` norm, so that for AL and PCA bases the kernel
sum (photometric scale) equals the first coefficient.

All arrays are float64 and indexed ``(row, col)``; a kernel of odd size :math:`K` has its centre
at pixel ``(K // 2, K // 2)``.

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325, "A Method for Optimal Image Subtraction".
.. [2] Alard, C. 2000, A&AS 144, 363, "Image subtraction using a space-varying kernel".
.. [3] Becker, A. C. et al. 2012, MNRAS 425, 1341, "Regularization techniques for PSF-matching
   kernels - I. Choice of kernel basis".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "FWHM_PER_SIGMA",
    "alard_lupton_basis",
    "alard_lupton_kernel_size",
    "alard_lupton_sigmas",
    "central_difference_matrix",
    "delta_function_basis",
    "forward_difference_matrix",
    "monomial_exponents",
    "pca_basis",
    "renormalize_basis",
]

#: Ratio of a Gaussian's full width at half maximum to its standard deviation,
#: :math:`2\sqrt{2\ln 2}`.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Relative threshold below which a basis kernel's sum is treated as zero in
#: :func:`renormalize_basis` (single-precision epsilon, as upstream).
_SUM_EPSILON = float(np.finfo(np.float32).eps)

SigmaMode = Literal["config", "equal", "convolution", "deconvolution"]


def _check_odd_size(size: int, name: str = "size") -> int:
    if int(size) != size or size < 1 or size % 2 == 0:
        msg = f"{name} must be a positive odd integer, got {size!r}"
        raise ValueError(msg)
    return int(size)


def alard_lupton_sigmas(
    target_fwhm: float | None,
    reference_fwhm: float | None,
    *,
    n_gauss: int = 3,
    beta: float = 2.0,
    min_sigma: float = 0.7,
    min_sigma_deconv: float = 0.4,
    default_sigmas: Sequence[float] = (0.7, 1.5, 3.0),
) -> tuple[tuple[float, ...], SigmaMode]:
    r"""Widths of the Alard–Lupton Gaussians from the two PSF widths.

    Implements ``generateAlardLuptonBasisList`` / ``_calculateBasisSigmas`` of ip_diffim in
    their 2026 form, whose smallest width is a continuous function of the PSF widths.

    Parameters
    ----------
    target_fwhm : float or None
        FWHM in pixels of the image that is convolved (the template in ``convolveTemplate``
        mode). ``None`` selects ``default_sigmas``.
    reference_fwhm : float or None
        FWHM in pixels of the image matched to (the science image in ``convolveTemplate``).
    n_gauss : int, optional
        Number of Gaussians, >= 1.
    beta : float, optional
        Ratio between successive widths, > 1.
    min_sigma : float, optional
        Floor of the kernel width and of the smallest basis width when convolving.
    min_sigma_deconv : float, optional
        The same floor when the target is the broader image ("deconvolution").
    default_sigmas : sequence of float, optional
        Widths used when a FWHM is missing or both are equal; length ``n_gauss``.

    Returns
    -------
    sigmas : tuple of float
        ``n_gauss`` increasing widths in pixels.
    mode : {"config", "equal", "convolution", "deconvolution"}
        Which branch produced them.

    Raises
    ------
    ValueError
        If a FWHM is not positive and finite, ``len(default_sigmas) != n_gauss``,
        ``n_gauss < 1``, ``beta <= 1`` or a floor is not positive.

    Notes
    -----
    With :math:`\sigma_t = \mathrm{FWHM}_t / 2.3548` and :math:`\sigma_r` likewise, the kernel
    width that turns a Gaussian PSF of width :math:`\sigma_t` into one of width
    :math:`\sigma_r` (or back) is

    .. math::

        \sigma_k = \max\left(\sqrt{|\sigma_r^2 - \sigma_t^2|},\ \sigma_{\min}\right),

    with :math:`\sigma_{\min}` = ``min_sigma`` when :math:`\sigma_r > \sigma_t` (convolution)
    and ``min_sigma_deconv`` otherwise. The basis widths are then

    .. math::

        \sigma_0 = \max(\sigma_{\min}, \sigma_k / \beta)\ (n > 1),\qquad
        \sigma_0 = \sigma_k\ (n = 1),\qquad \sigma_i = \beta\,\sigma_{i-1}.

    Within each branch the widths are continuous (and piecewise smooth) functions of the two
    FWHMs; the pre-2026 rule jumped from :math:`(\sigma_k, \beta\sigma_k, \ldots)` to
    :math:`(\sigma_k/\beta, \sigma_k, \ldots)` as :math:`\sigma_k/\beta` crossed
    :math:`\sigma_{\min}`. Two discontinuities remain by design, as upstream: exactly equal
    FWHMs select ``default_sigmas``, and the floor differs between the convolution and the
    deconvolution branch.

    Examples
    --------
    >>> sig, mode = alard_lupton_sigmas(2.0 * FWHM_PER_SIGMA, 2.8 * FWHM_PER_SIGMA)
    >>> [round(s, 2) for s in sig], mode
    ([0.98, 1.96, 3.92], 'convolution')
    """
    if n_gauss < 1:
        msg = f"n_gauss must be >= 1, got {n_gauss}"
        raise ValueError(msg)
    if not beta > 1.0:
        msg = f"beta must be > 1, got {beta}"
        raise ValueError(msg)
    if not (min_sigma > 0 and min_sigma_deconv > 0):
        msg = f"sigma floors must be positive, got {min_sigma} and {min_sigma_deconv}"
        raise ValueError(msg)
    defaults = tuple(float(s) for s in default_sigmas)
    if len(defaults) != n_gauss:
        msg = f"default_sigmas has {len(defaults)} entries but n_gauss is {n_gauss}"
        raise ValueError(msg)
    if target_fwhm is None or reference_fwhm is None:
        return defaults, "config"
    for name, value in (("target_fwhm", target_fwhm), ("reference_fwhm", reference_fwhm)):
        if not (math.isfinite(value) and value > 0):
            msg = f"{name} must be positive and finite, got {value}"
            raise ValueError(msg)
    sigma_t = target_fwhm / FWHM_PER_SIGMA
    sigma_r = reference_fwhm / FWHM_PER_SIGMA
    if sigma_t == sigma_r:
        return defaults, "equal"
    if sigma_r > sigma_t:
        mode: SigmaMode = "convolution"
        floor = float(min_sigma)
    else:
        mode = "deconvolution"
        floor = float(min_sigma_deconv)
    sigma_k = max(math.sqrt(abs(sigma_r**2 - sigma_t**2)), floor)
    first = max(floor, sigma_k / beta) if n_gauss > 1 else sigma_k
    sigmas = tuple(first * beta**i for i in range(n_gauss))
    return sigmas, mode


def alard_lupton_kernel_size(
    sigmas: Sequence[float],
    *,
    scaling: float = 6.0,
    size_min: int = 21,
    size_max: int = 35,
) -> int:
    r"""Kernel size for an Alard–Lupton basis.

    Parameters
    ----------
    sigmas : sequence of float
        Basis widths in pixels (non-empty, positive).
    scaling : float, optional
        Size in units of the largest width, >= 1.
    size_min, size_max : int, optional
        Odd bounds of the size, ``size_min <= size_max``.

    Returns
    -------
    int
        :math:`K = \operatorname{clip}(\mathrm{odd}(\lfloor s\,\sigma_{\max}\rfloor),
        K_{\min}, K_{\max})`, where :math:`\mathrm{odd}(n)` adds one to an even :math:`n`.

    Raises
    ------
    ValueError
        For empty or non-positive ``sigmas``, ``scaling < 1`` or invalid bounds.

    Examples
    --------
    >>> alard_lupton_kernel_size([0.7, 1.4, 2.8]), alard_lupton_kernel_size([0.98, 1.96, 3.92])
    (21, 23)
    """
    sig = np.asarray(sigmas, dtype=np.float64)
    if sig.size == 0 or not np.all(np.isfinite(sig) & (sig > 0)):
        msg = f"sigmas must be a non-empty sequence of positive numbers, got {sigmas!r}"
        raise ValueError(msg)
    if not scaling >= 1.0:
        msg = f"scaling must be >= 1, got {scaling}"
        raise ValueError(msg)
    _check_odd_size(size_min, "size_min")
    _check_odd_size(size_max, "size_max")
    if size_min > size_max:
        msg = f"size_min ({size_min}) must not exceed size_max ({size_max})"
        raise ValueError(msg)
    size = int(scaling * float(sig.max()))
    if size % 2 == 0:
        size += 1
    return int(min(size_max, max(size, size_min)))


def monomial_exponents(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(a, b)`` of the monomials :math:`x^a y^b` with ``a + b <= degree``.

    The order is afw's ``PolynomialFunction2``: ``1, x, y, x², xy, y², x³, x²y, …``, i.e. by
    total degree, and within a degree by decreasing power of ``x``.

    Parameters
    ----------
    degree : int
        Maximum total degree, >= 0.

    Returns
    -------
    list of tuple of int
        ``(degree + 1)(degree + 2) / 2`` exponent pairs.

    Examples
    --------
    >>> monomial_exponents(2)
    [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    """
    if degree < 0:
        msg = f"degree must be >= 0, got {degree}"
        raise ValueError(msg)
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def renormalize_basis(basis: ArrayLike) -> NDArray[np.float64]:
    r"""Normalise a kernel basis as ``renormalizeKernelList`` does.

    Parameters
    ----------
    basis : array_like of shape (n, K_r, K_c)
        Basis kernels; the first must have a non-zero sum.

    Returns
    -------
    ndarray of shape (n, K_r, K_c), float64
        The renormalised basis (a new array).

    Raises
    ------
    ValueError
        If the basis is not 3-D, is empty, contains non-finite values, if the first kernel sums
        to zero or if a kernel vanishes (is a multiple of the first).

    Notes
    -----
    .. math::

        B_0 \leftarrow B_0 / \textstyle\sum B_0;\qquad
        B_i \leftarrow B_i / \textstyle\sum B_i - B_0 \ \text{ if }
        |\textstyle\sum B_i| > \epsilon_{32} \textstyle\sum |B_i|;\qquad
        B_i \leftarrow B_i / \lVert B_i \rVert_2 \quad (i > 0).

    Hence :math:`\sum B_0 = 1` and, for :math:`i > 0`, :math:`\sum B_i = 0` and
    :math:`\lVert B_i\rVert_2 = 1`, so the sum of :math:`\sum_i a_i B_i` is :math:`a_0`.
    The zero-sum test is relative to :math:`\sum|B_i|` (upstream compares the bare sum with
    ``FLT_EPSILON``), which makes it independent of the kernels' scale.
    """
    arr = np.array(basis, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] == 0:
        msg = f"basis must have shape (n, K_r, K_c) with n >= 1, got {arr.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        msg = "basis contains non-finite values"
        raise ValueError(msg)
    sums = arr.sum(axis=(1, 2))
    abs_sums = np.abs(arr).sum(axis=(1, 2))
    if not abs(sums[0]) > _SUM_EPSILON * abs_sums[0]:
        msg = "the first basis kernel must have a non-zero sum"
        raise ValueError(msg)
    arr[0] /= sums[0]
    rest = arr[1:]
    nonzero_sum = np.abs(sums[1:]) > _SUM_EPSILON * abs_sums[1:]
    safe = np.where(nonzero_sum, sums[1:], 1.0)
    scaled = rest / safe[:, None, None]
    before = np.sqrt(np.einsum("nij,nij->n", scaled, scaled))
    rest[:] = np.where(nonzero_sum[:, None, None], scaled - arr[0], rest)
    norms = np.sqrt(np.einsum("nij,nij->n", rest, rest))
    if np.any(norms <= 1e-10 * before):
        msg = "a basis kernel vanishes after renormalisation (a multiple of B0?)"
        raise ValueError(msg)
    rest /= norms[:, None, None]
    return arr


def alard_lupton_basis(
    size: int, sigmas: Sequence[float], degrees: Sequence[int]
) -> NDArray[np.float64]:
    r"""Alard–Lupton basis: Gaussians times monomials, renormalised.

    Parameters
    ----------
    size : int
        Odd kernel size :math:`K`.
    sigmas : sequence of float
        Gaussian widths in pixels (positive).
    degrees : sequence of int
        Polynomial degree for each Gaussian (>= 0), same length as ``sigmas``.

    Returns
    -------
    ndarray of shape (n, K, K), float64
        :math:`n = \sum_i (d_i + 1)(d_i + 2)/2` kernels (27 for the default degrees
        ``(4, 2, 2)``), ordered by Gaussian and, within a Gaussian, by
        :func:`monomial_exponents`; renormalised with :func:`renormalize_basis`.

    Raises
    ------
    ValueError
        For an even or non-positive size, mismatched lengths, non-positive widths or negative
        degrees.

    Notes
    -----
    With :math:`h = K // 2`, :math:`u = (\mathrm{col} - h)/h` and :math:`v = (\mathrm{row} -
    h)/h` (the polynomial lives on :math:`[-1, 1]^2` independently of :math:`\sigma`), the raw
    kernels are

    .. math::

        B_{i,a,b} = u^a v^b\, G_{\sigma_i},\qquad
        G_\sigma \propto \exp\left(-\frac{(\mathrm{col}-h)^2 + (\mathrm{row}-h)^2}
        {2\sigma^2}\right),\quad \textstyle\sum G_\sigma = 1,

    following Alard & Lupton (1998) and ip_diffim's ``makeAlardLuptonBasisList``.

    Examples
    --------
    >>> alard_lupton_basis(21, (0.7, 1.5, 3.0), (4, 2, 2)).shape
    (27, 21, 21)
    """
    size = _check_odd_size(size)
    sig = [float(s) for s in sigmas]
    deg = [int(d) for d in degrees]
    if len(sig) != len(deg) or not sig:
        msg = f"sigmas ({len(sig)}) and degrees ({len(deg)}) must be non-empty, same length"
        raise ValueError(msg)
    if not all(math.isfinite(s) and s > 0 for s in sig):
        msg = f"sigmas must be positive, got {sig}"
        raise ValueError(msg)
    if any(d < 0 for d in deg):
        msg = f"degrees must be >= 0, got {deg}"
        raise ValueError(msg)
    half = size // 2
    offsets = np.arange(size, dtype=np.float64) - half
    scale = float(half) if half > 0 else 1.0
    u = offsets / scale
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    kernels = []
    for sigma, degree in zip(sig, deg, strict=True):
        gauss = np.exp(-0.5 * r2 / sigma**2)
        gauss /= gauss.sum()
        for a, b in monomial_exponents(degree):
            kernels.append(gauss * (u[None, :] ** a) * (u[:, None] ** b))
    return renormalize_basis(np.stack(kernels))


def delta_function_basis(size: int) -> NDArray[np.float64]:
    """Delta-function basis: one kernel per pixel.

    Parameters
    ----------
    size : int
        Odd kernel size :math:`K`.

    Returns
    -------
    ndarray of shape (K², K, K), float64
        Kernel ``i`` is 1 at ``(row, col) = divmod(i, K)`` and 0 elsewhere (C order, as
        ``makeDeltaFunctionBasisList``), so coefficient vectors reshape directly to kernel
        images.

    Examples
    --------
    >>> basis = delta_function_basis(3)
    >>> basis.shape, basis[5, 1, 2]
    ((9, 3, 3), np.float64(1.0))
    """
    size = _check_odd_size(size)
    return np.eye(size * size, dtype=np.float64).reshape(size * size, size, size)


def _finish_regularization(b_mat: NDArray[np.float64], fit_background: bool) -> NDArray:
    n = b_mat.shape[0]
    if fit_background:
        full = np.zeros((n + 1, n + 1), dtype=np.float64)
        full[:n, :n] = b_mat
        b_mat = full
    return b_mat.T @ b_mat


def central_difference_matrix(
    size: int,
    *,
    stencil: Literal[5, 9] = 9,
    border_penalty: float = 3.0,
    fit_background: bool = True,
) -> NDArray[np.float64]:
    r"""Laplacian (second central difference) regularization matrix :math:`H = B^T B`.

    Parameters
    ----------
    size : int
        Odd kernel size :math:`K` of a delta-function basis.
    stencil : {9, 5}, optional
        9-point ``[[1, 4, 1], [4, -20, 4], [1, 4, 1]] / 6`` or 5-point
        ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` Laplacian.
    border_penalty : float, optional
        Diagonal value of :math:`B` for kernel pixels on the outer border, >= 0.
    fit_background : bool, optional
        Append a zero row and column for the background coefficient.

    Returns
    -------
    ndarray of shape (K² [+ 1], K² [+ 1]), float64
        Symmetric positive semi-definite :math:`H`.

    Raises
    ------
    ValueError
        For an unknown stencil, a negative penalty or an invalid size.

    Notes
    -----
    Row :math:`i = K\,\mathrm{row} + \mathrm{col}` of :math:`B` holds the stencil centred on
    pixel :math:`i` when that pixel is interior and :math:`B_{ii}` = ``border_penalty``
    otherwise (``makeCentralDifferenceMatrix``). The penalty :math:`a^T H a = \lVert B a
    \rVert^2` is the summed squared Laplacian of the kernel image plus the squared border
    values (Becker et al. 2012, §3.2).
    """
    size = _check_odd_size(size)
    if stencil not in (5, 9):
        msg = f"stencil must be 5 or 9, got {stencil!r}"
        raise ValueError(msg)
    if not border_penalty >= 0:
        msg = f"border_penalty must be >= 0, got {border_penalty}"
        raise ValueError(msg)
    if stencil == 5:
        coeffs = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    else:
        coeffs = np.array([[1.0, 4.0, 1.0], [4.0, -20.0, 4.0], [1.0, 4.0, 1.0]]) / 6.0
    n = size * size
    index = np.arange(n)
    row, col = np.divmod(index, size)
    interior = (row > 0) & (col > 0) & (row < size - 1) & (col < size - 1)
    b_mat = np.zeros((n, n), dtype=np.float64)
    rows = index[interior]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if coeffs[dy + 1, dx + 1] != 0.0:
                b_mat[rows, rows + dx + dy * size] += coeffs[dy + 1, dx + 1]
    border = index[~interior]
    b_mat[border, border] = border_penalty
    return _finish_regularization(b_mat, fit_background)


#: Forward-difference coefficients by order; order 0 is the border penalty placeholder.
_FORWARD_COEFFS = np.array(
    [
        [np.nan, 0.0, 0.0, 0.0],
        [-1.0, 1.0, 0.0, 0.0],
        [-1.0, 2.0, -1.0, 0.0],
        [-1.0, 3.0, -3.0, 1.0],
    ]
)


def forward_difference_matrix(
    size: int,
    *,
    orders: Sequence[int] = (1, 2),
    border_penalty: float = 3.0,
    fit_background: bool = True,
) -> NDArray[np.float64]:
    r"""Forward-difference regularization matrix :math:`H = B^T B`.

    Parameters
    ----------
    size : int
        Odd kernel size :math:`K` of a delta-function basis.
    orders : sequence of int, optional
        Difference orders to penalise, each in 1..3 (``[-1, 1]``, ``[-1, 2, -1]``,
        ``[-1, 3, -3, 1]``).
    border_penalty : float, optional
        Value used where no forward difference fits (distance 0 to the far edge), >= 0.
    fit_background : bool, optional
        Append a zero row and column for the background coefficient.

    Returns
    -------
    ndarray of shape (K² [+ 1], K² [+ 1]), float64
        Symmetric positive semi-definite :math:`H`.

    Raises
    ------
    ValueError
        For an order outside 1..3, no orders, a negative penalty or an invalid size.

    Notes
    -----
    :math:`B = \sum_{o} (B^x_o + B^y_o)`. Row :math:`i` of :math:`B^x_o` applies the order
    :math:`o' = \min(o, d_x)` coefficients along :math:`x` starting at pixel :math:`i`, where
    :math:`d_x` is the distance to the far column; :math:`o' = 0` (last column) puts
    ``border_penalty`` on the diagonal. :math:`B^y_o` does the same along :math:`y` with
    stride :math:`K` (``makeForwardDifferenceMatrix``; upstream truncates the penalty to an
    integer, which is not reproduced).
    """
    size = _check_odd_size(size)
    orders = tuple(int(o) for o in orders)
    if not orders or any(o < 1 or o > 3 for o in orders):
        msg = f"orders must be a non-empty sequence of integers in 1..3, got {orders!r}"
        raise ValueError(msg)
    if not border_penalty >= 0:
        msg = f"border_penalty must be >= 0, got {border_penalty}"
        raise ValueError(msg)
    coeffs = _FORWARD_COEFFS.copy()
    coeffs[0, 0] = border_penalty
    n = size * size
    index = np.arange(n)
    row, col = np.divmod(index, size)
    b_mat = np.zeros((n, n), dtype=np.float64)
    for order in orders:
        for distance, stride in ((size - 1 - col, 1), (size - 1 - row, size)):
            use = np.minimum(distance, order)
            for j in range(order + 1):
                sel = j <= use
                b_mat[index[sel], index[sel] + j * stride] += coeffs[use[sel], j]
    return _finish_regularization(b_mat, fit_background)


def pca_basis(
    kernel_images: ArrayLike,
    *,
    n_components: int,
    subtract_mean: bool = True,
) -> NDArray[np.float64]:
    r"""Principal-component basis of a set of kernel images (``_createPcaBasis``).

    Parameters
    ----------
    kernel_images : array_like of shape (n_kernels, K_r, K_c)
        Per-stamp kernel solutions. Images that are non-finite or sum to zero are skipped.
    n_components : int
        Total number of basis kernels returned, including the mean when ``subtract_mean``;
        >= 1. Fewer are returned when the data do not support that many.
    subtract_mean : bool, optional
        Use the mean image as the first basis kernel and decompose the residuals about it.

    Returns
    -------
    ndarray of shape (n_basis, K_r, K_c), float64
        ``[mean, e_1, e_2, …]`` (or ``[e_1, e_2, …]``), renormalised with
        :func:`renormalize_basis`.

    Raises
    ------
    ValueError
        If fewer than one usable image is given, or ``n_components < 1``.

    Notes
    -----
    Each image is normalised to unit sum, :math:`\hat k_i = k_i / \sum k_i`. With
    :math:`\bar k` the mean image, the eigen-images :math:`e_j` are the right singular vectors
    of the matrix whose rows are :math:`\hat k_i - \bar k` (or :math:`\hat k_i`), ordered by
    decreasing singular value, i.e. the eigenvectors of the scatter matrix (afw ``ImagePca``
    with unit weights). Each :math:`e_j` is scaled so that its extreme value is +1, which fixes
    the otherwise arbitrary sign. Components with negligible singular values
    (:math:`s_j \le 10^{-12} s_1`) are dropped.
    """
    if n_components < 1:
        msg = f"n_components must be >= 1, got {n_components}"
        raise ValueError(msg)
    arr = np.asarray(kernel_images, dtype=np.float64)
    if arr.ndim != 3:
        msg = f"kernel_images must have shape (n, K_r, K_c), got {arr.shape}"
        raise ValueError(msg)
    sums = arr.sum(axis=(1, 2))
    usable = np.all(np.isfinite(arr), axis=(1, 2)) & np.isfinite(sums) & (sums != 0)
    arr = arr[usable]
    if arr.shape[0] == 0:
        msg = "pca_basis needs at least one finite kernel image with a non-zero sum"
        raise ValueError(msg)
    shape = arr.shape[1:]
    data = (arr / sums[usable][:, None, None]).reshape(arr.shape[0], -1)
    mean = data.mean(axis=0)
    centred = data - mean if subtract_mean else data
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    keep = singular > 1e-12 * singular[0] if singular.size and singular[0] > 0 else []
    eigen = vt[np.asarray(keep, dtype=bool)]
    if eigen.shape[0]:
        extreme = eigen[np.arange(eigen.shape[0]), np.argmax(np.abs(eigen), axis=1)]
        eigen = eigen / extreme[:, None]
    components = [mean[None, :], eigen] if subtract_mean else [eigen]
    stacked = np.concatenate(components, axis=0)[:n_components]
    if stacked.shape[0] == 0:
        msg = "pca_basis found no usable principal component"
        raise ValueError(msg)
    return renormalize_basis(stacked.reshape(-1, *shape))
