r"""Least-squares PSF-matching kernels: per-stamp, regularised and spatial solutions.

The model fitted to every stamp (a small cut-out around a kernel candidate star) is

.. math::

    I(\mathbf p) \simeq \sum_{j} a_j\,(B_j \otimes T)(\mathbf p) + b_g,

where :math:`T` is the template stamp, :math:`I` the science stamp, :math:`B_j` the basis
kernels and :math:`b_g` an optional constant background (Alard & Lupton 1998). Only the "valid"
inner box, where :math:`B_j \otimes T` is computable from the stamp alone (side
:math:`S - K + 1`), enters the fit. With the design matrix :math:`C` whose columns are the
flattened :math:`B_j \otimes T` (plus a column of ones) and weights :math:`W`, the normal
equations are

.. math::

    M\,a = b,\qquad M = C^T W C,\qquad b = C^T W I.

Everything here is vectorised over stamps: the template stamps are Fourier transformed **once**
(one batched ``rfft2`` of the ``(n_stamps, S, S)`` cube) and that transform is reused for every
basis kernel, for every kernel evaluated later (candidate assessment) and for the variance
propagation; normal matrices ``(n_stamps, m, m)`` are solved with batched LAPACK calls.

On top of the per-stamp solution the module provides Tikhonov regularisation with four ways of
choosing :math:`\lambda` (Becker et al. 2012), the joint spatial least squares of Alard (2000),
kernel-sum clipping and the iterative candidate loop of ip_diffim's ``PsfMatchTask._solve``
(:func:`fit_psf_matching_kernel`).

Conventions: arrays are indexed ``(row, col)``; positions are ``x`` = column and ``y`` = row in
the parent image; convolution is true convolution with the kernel centre at pixel
``(K // 2, K // 2)`` (``scipy.signal.convolve2d`` / ``fftconvolve`` semantics).

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
.. [2] Alard, C. 2000, A&AS 144, 363.
.. [3] Becker, A. C. et al. 2012, MNRAS 425, 1341.
.. [4] Stein, C. M. 1981, Ann. Statist. 9, 1135 (unbiased risk estimation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import numpy as np
import scipy.fft
import scipy.linalg
import scipy.ndimage
from numpy.typing import ArrayLike, NDArray

from skydiff.parallel import parallel_map, serial_matmul

from ._basis import pca_basis
from ._stats import clipped_stats

__all__ = [
    "REJECTION_REASONS",
    "IllConditionedError",
    "KernelFitError",
    "KernelFitResult",
    "NoKernelCandidatesError",
    "NormalEquations",
    "Regularization",
    "ResidualStats",
    "RiskCurve",
    "SpatialSolution",
    "StampSet",
    "StampSolution",
    "assess_stamps",
    "build_normal_equations",
    "clip_kernel_sums",
    "condition_numbers",
    "fit_psf_matching_kernel",
    "kernel_images",
    "regularization_risk",
    "solve_spatial",
    "solve_stamps",
    "spatial_functions",
    "spatial_terms",
]

Weighting = Literal["constant", "pixel"]
LambdaType = Literal["absolute", "relative", "minimize_biased_risk", "minimize_unbiased_risk"]
SpatialKind = Literal["chebyshev", "polynomial"]
BBox = tuple[float, float, float, float]

#: Rejection reasons used in :attr:`KernelFitResult.rejection_reasons` (``""`` = used).
REJECTION_REASONS = (
    "solve_failed",
    "condition",
    "residual",
    "kernel_sum",
    "pca_residual",
    "spatial_residual",
)

_EPS = float(np.finfo(np.float64).eps)
#: Memory budget (bytes) for one chunk of convolved basis images. Small enough that the
#: chunk's temporaries are recycled by the allocator (and stay in cache) instead of being
#: mapped afresh, which costs more than the transforms on a virtual machine.
_CHUNK_BYTES = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class KernelFitError(Exception):
    """Base class of the expected kernel-fit failures; carries scalar ``metadata``.

    Parameters
    ----------
    message : str
        One-line description of what went wrong and how to fix it.
    **metadata : int, float, str or bool
        Scalar facts about the failure (counts, limits, condition numbers).
    """

    def __init__(self, message: str, **metadata: int | float | str | bool) -> None:
        super().__init__(message)
        self.metadata: dict[str, int | float | str | bool] = dict(metadata)


class NoKernelCandidatesError(KernelFitError):
    """Too few kernel candidates survived the solve and the rejection steps."""


class IllConditionedError(KernelFitError):
    """The spatial normal equations are too ill-conditioned to trust."""


# --------------------------------------------------------------------------------------------
# Array helpers and converters
# --------------------------------------------------------------------------------------------


def _readonly(arr: NDArray[Any]) -> NDArray[Any]:
    arr.setflags(write=False)
    return arr


def _adopted(value: ArrayLike, dtype: type) -> NDArray[Any] | None:
    """``value`` itself if it is a read-only, owned, C-contiguous array of ``dtype``."""
    if (isinstance(value, np.ndarray) and value.dtype == dtype and not value.flags.writeable
            and value.flags.owndata and value.flags.c_contiguous):
        return value
    return None


def _stack32(value: ArrayLike) -> NDArray[np.float32]:
    adopted = _adopted(value, np.float32)
    arr = adopted if adopted is not None else np.array(value, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    return _readonly(arr)


def _stack_bool(value: ArrayLike) -> NDArray[np.bool_]:
    adopted = _adopted(value, np.bool_)
    arr = adopted if adopted is not None else np.array(value, dtype=bool)
    if arr.ndim == 2:
        arr = arr[None]
    return _readonly(arr)


def _vector64(value: ArrayLike) -> NDArray[np.float64]:
    return _readonly(np.array(value, dtype=np.float64).reshape(-1))


def _array64(value: ArrayLike) -> NDArray[np.float64]:
    return _readonly(np.array(value, dtype=np.float64))


def _optional_array64(value: ArrayLike | None) -> NDArray[np.float64] | None:
    return None if value is None else _array64(value)


def _array_str(value: ArrayLike) -> NDArray[np.str_]:
    return _readonly(np.array(value, dtype=str))


def _array_bool(value: ArrayLike) -> NDArray[np.bool_]:
    return _readonly(np.array(value, dtype=bool))


def _array_int(value: ArrayLike) -> NDArray[np.int64]:
    return _readonly(np.array(value, dtype=np.int64))


_ARRAY_EQ = attrs.cmp_using(eq=np.array_equal)


def _as_basis(basis: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(basis, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] == 0:
        msg = f"basis must have shape (n_basis, K_r, K_c) with n_basis >= 1, got {arr.shape}"
        raise ValueError(msg)
    if arr.shape[1] % 2 == 0 or arr.shape[2] % 2 == 0:
        msg = f"basis kernels must have odd sizes, got {arr.shape[1:]}"
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        msg = "basis contains non-finite values"
        raise ValueError(msg)
    return arr


def kernel_images(basis: ArrayLike, coefficients: ArrayLike) -> NDArray[np.float64]:
    r"""Kernel images :math:`\kappa = \sum_j a_j B_j` for many coefficient vectors.

    Parameters
    ----------
    basis : array_like of shape (m, K_r, K_c)
        Basis kernels.
    coefficients : array_like of shape (..., m)
        Coefficient vectors (background excluded).

    Returns
    -------
    ndarray of shape (..., K_r, K_c), float64
        One kernel image per coefficient vector.
    """
    b = np.asarray(basis, dtype=np.float64)
    a = np.asarray(coefficients, dtype=np.float64)
    flat = serial_matmul(a.reshape(-1, b.shape[0]), b.reshape(b.shape[0], -1))
    return flat.reshape(*a.shape[:-1], *b.shape[1:])


# --------------------------------------------------------------------------------------------
# Stamps
# --------------------------------------------------------------------------------------------


@attrs.frozen
class StampSet:
    r"""Matched template and science cut-outs around kernel candidates.

    All image arrays have shape ``(n_stamps, S_r, S_c)`` and are stored as read-only float32
    (booleans for masks); the solvers promote them to float64. Arrays that are already
    read-only, own their memory, are C-contiguous and have the stored dtype are kept as they
    are; any other input is copied.

    Parameters
    ----------
    template : array_like of shape (n, S_r, S_c)
        Template stamps :math:`T` (the image that is convolved).
    science : array_like of shape (n, S_r, S_c)
        Science stamps :math:`I` (the image matched to).
    science_variance : array_like of shape (n, S_r, S_c)
        Variance :math:`V_I` of the science pixels.
    template_variance : array_like of shape (n, S_r, S_c)
        Variance :math:`V_T` of the template pixels.
    mask : array_like of bool, optional
        Pixels to exclude from the fit and the statistics (bad science or variance); default
        none.
    template_mask : array_like of bool, optional
        Bad template pixels. Since a bad template pixel spoils :math:`B_j \otimes T` within a
        kernel width, this mask is dilated by the kernel footprint before use; default none.
    x, y : array_like of shape (n,), optional
        Stamp centres (column, row) in the parent image; default 0.

    Raises
    ------
    ValueError
        If shapes disagree, or unmasked pixels are non-finite, have negative variance or a
        total variance :math:`V_I + V_T \le 0` (upstream raises for zero variance as well).

    Notes
    -----
    The weights of the fit use :math:`V = V_I + V_T` (upstream's "variance estimate"); the
    residual statistics use the properly propagated variance of the difference,
    :math:`V_I + \kappa^2 \otimes V_T`.
    """

    template: NDArray[np.float32] = attrs.field(
        converter=_stack32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    science: NDArray[np.float32] = attrs.field(
        converter=_stack32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    science_variance: NDArray[np.float32] = attrs.field(
        converter=_stack32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    template_variance: NDArray[np.float32] = attrs.field(
        converter=_stack32, eq=_ARRAY_EQ, hash=False, repr=False
    )
    mask: NDArray[np.bool_] = attrs.field(
        converter=_stack_bool, eq=_ARRAY_EQ, hash=False, repr=False,
        default=attrs.Factory(lambda self: np.zeros(self.template.shape, bool), takes_self=True),
    )
    template_mask: NDArray[np.bool_] = attrs.field(
        converter=_stack_bool, eq=_ARRAY_EQ, hash=False, repr=False,
        default=attrs.Factory(lambda self: np.zeros(self.template.shape, bool), takes_self=True),
    )
    x: NDArray[np.float64] = attrs.field(
        converter=_vector64, eq=_ARRAY_EQ, hash=False, repr=False,
        default=attrs.Factory(lambda self: np.zeros(self.template.shape[0]), takes_self=True),
    )
    y: NDArray[np.float64] = attrs.field(
        converter=_vector64, eq=_ARRAY_EQ, hash=False, repr=False,
        default=attrs.Factory(lambda self: np.zeros(self.template.shape[0]), takes_self=True),
    )

    def __attrs_post_init__(self) -> None:
        shape = self.template.shape
        if len(shape) != 3 or shape[0] == 0:
            msg = f"stamps must have shape (n_stamps, S_r, S_c) with n >= 1, got {shape}"
            raise ValueError(msg)
        for name in ("science", "science_variance", "template_variance", "mask",
                     "template_mask"):
            if getattr(self, name).shape != shape:
                msg = f"{name} has shape {getattr(self, name).shape}, expected {shape}"
                raise ValueError(msg)
        for name in ("x", "y"):
            if getattr(self, name).shape != (shape[0],):
                msg = f"{name} has shape {getattr(self, name).shape}, expected ({shape[0]},)"
                raise ValueError(msg)
        # Whole-stack tests (no copies of the selected pixels).
        if not np.all(np.isfinite(self.template) | self.template_mask):
            msg = "template has non-finite values outside template_mask; mask them"
            raise ValueError(msg)
        bad = self.mask | self.template_mask
        vi, vt = self.science_variance, self.template_variance
        if not (np.all(np.isfinite(self.science) | self.mask)
                and np.all((np.isfinite(vi) & np.isfinite(vt)) | bad)):
            msg = "science or variance has non-finite values outside the masks; mask them"
            raise ValueError(msg)
        # with both >= 0, V_I + V_T <= 0 exactly when both are 0
        if np.any((((vi < 0) | (vt < 0)) | ((vi == 0) & (vt == 0))) & ~bad):
            msg = "variances must be >= 0 with a positive sum on unmasked pixels"
            raise ValueError(msg)

    @property
    def n_stamps(self) -> int:
        """Number of stamps."""
        return int(self.template.shape[0])

    @property
    def stamp_shape(self) -> tuple[int, int]:
        """``(S_r, S_c)``."""
        return int(self.template.shape[1]), int(self.template.shape[2])

    def subset(self, index: ArrayLike) -> StampSet:
        """Stamps selected by an integer index array or boolean mask (a new object)."""
        idx = np.asarray(index)
        return attrs.evolve(
            self,
            template=self.template[idx],
            science=self.science[idx],
            science_variance=self.science_variance[idx],
            template_variance=self.template_variance[idx],
            mask=self.mask[idx],
            template_mask=self.template_mask[idx],
            x=self.x[idx],
            y=self.y[idx],
        )

    @classmethod
    def from_images(
        cls,
        template: ArrayLike,
        science: ArrayLike,
        *,
        science_variance: ArrayLike,
        template_variance: ArrayLike,
        x: ArrayLike,
        y: ArrayLike,
        size: int,
        mask: ArrayLike | None = None,
        template_mask: ArrayLike | None = None,
        origin: tuple[int, int] = (0, 0),
        mask_bits: int | None = None,
        template_mask_bits: int | None = None,
    ) -> StampSet:
        """Cut square stamps out of full images.

        Parameters
        ----------
        template, science, science_variance, template_variance : array_like of shape (H, W)
            Full images on the same pixel grid.
        x, y : array_like of shape (n,)
            Candidate positions (column, row) in parent coordinates; rounded to the nearest
            pixel, which becomes the stamp centre.
        size : int
            Odd stamp side (ip_diffim uses ``2 K + 1``).
        mask, template_mask : array_like of bool, shape (H, W), optional
            Bad pixels (see the class documentation); or integer bit masks together with
            ``mask_bits`` / ``template_mask_bits``.
        origin : tuple of int, optional
            Parent coordinates ``(x0, y0)`` of pixel ``[0, 0]``.
        mask_bits, template_mask_bits : int, optional
            With an integer ``mask`` (``template_mask``): a pixel is bad when any of these
            bits is set. Only the stamps are tested, never the whole image.

        Returns
        -------
        StampSet
            Stamps whose ``x``, ``y`` are the integer stamp centres in parent coordinates.

        Raises
        ------
        ValueError
            If ``size`` is not odd or a stamp would extend beyond the image.
        """
        if size < 1 or size % 2 == 0:
            msg = f"size must be a positive odd integer, got {size}"
            raise ValueError(msg)
        img_t = np.asarray(template)
        shape = img_t.shape
        cols = np.rint(np.asarray(x, dtype=np.float64).reshape(-1) - origin[0]).astype(int)
        rows = np.rint(np.asarray(y, dtype=np.float64).reshape(-1) - origin[1]).astype(int)
        half = size // 2
        inside = ((rows - half >= 0) & (rows + half < shape[0]) & (cols - half >= 0)
                  & (cols + half < shape[1]))
        if not np.all(inside):
            msg = (f"{int((~inside).sum())} stamp(s) of size {size} extend beyond the "
                   f"{shape} image; drop candidates closer than {half} px to the edge")
            raise ValueError(msg)
        offsets = np.arange(-half, half + 1)
        rr = rows[:, None, None] + offsets[None, :, None]
        cc = cols[:, None, None] + offsets[None, None, :]
        flat = rr * shape[1] + cc  # one index array for every (C-contiguous) plane

        def cut(image: ArrayLike | None, dtype: type, bits: int | None = None) -> NDArray[Any]:
            if image is None:
                return np.zeros((rows.size, size, size), dtype=dtype)
            arr = np.asarray(image)
            if arr.shape != shape:
                msg = f"image of shape {arr.shape} does not match the template shape {shape}"
                raise ValueError(msg)
            stamps = (np.take(arr.reshape(-1), flat) if arr.flags.c_contiguous
                      else arr[rr, cc])
            if bits is not None:
                stamps = (stamps & np.asarray(bits, dtype=arr.dtype)) != 0
            # fresh and frozen: the StampSet adopts it without another copy
            return _readonly(np.ascontiguousarray(stamps.astype(dtype, copy=False)))

        return cls(
            template=cut(img_t, np.float32),
            science=cut(science, np.float32),
            science_variance=cut(science_variance, np.float32),
            template_variance=cut(template_variance, np.float32),
            mask=cut(mask, bool, mask_bits),
            template_mask=cut(template_mask, bool, template_mask_bits),
            x=cols + origin[0],
            y=rows + origin[1],
        )


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@attrs.frozen
class NormalEquations:
    r"""Per-stamp normal equations :math:`M a = b`.

    Attributes
    ----------
    matrix : ndarray of shape (n, m, m)
        :math:`M = C^T W C`; the last row/column belongs to the background when fitted.
    vector : ndarray of shape (n, m)
        :math:`b = C^T W I`.
    noise : ndarray of shape (n, m, m) or None
        :math:`F = \operatorname{Cov}(b) = C^T W V W C` (pixel noise only); equals ``matrix``
        for per-pixel inverse-variance weights. Computed on request (risk estimation).
    n_pixels : ndarray of int, shape (n,)
        Good pixels in the fit.
    n_basis : int
        Number of kernel basis functions :math:`m_k`.
    fit_background : bool
        Whether the last parameter is a constant background.
    """

    matrix: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    vector: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    noise: NDArray[np.float64] | None = attrs.field(
        converter=_optional_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    n_pixels: NDArray[np.int64] = attrs.field(
        converter=_array_int, eq=_ARRAY_EQ, hash=False, repr=False
    )
    n_basis: int
    fit_background: bool

    @property
    def n_parameters(self) -> int:
        """:math:`m = m_k + 1` with a background, else :math:`m_k`."""
        return self.n_basis + int(self.fit_background)

    def subset(self, index: ArrayLike) -> NormalEquations:
        """Normal equations of a subset of the stamps."""
        idx = np.asarray(index)
        return attrs.evolve(
            self,
            matrix=self.matrix[idx],
            vector=self.vector[idx],
            noise=None if self.noise is None else self.noise[idx],
            n_pixels=self.n_pixels[idx],
        )


@attrs.frozen
class ResidualStats:
    r"""Statistics of :math:`r = (I - \kappa \otimes T - b_g) / \sqrt{V_I + \kappa^2 \otimes V_T}`.

    Attributes
    ----------
    mean, std : ndarray of shape (n,)
        Mean and unbiased standard deviation of :math:`r` over the good pixels of each stamp
        (NaN when undefined).
    n_pixels : ndarray of int, shape (n,)
        Number of pixels used.
    """

    mean: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    std: NDArray[np.float64] = attrs.field(converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False)
    n_pixels: NDArray[np.int64] = attrs.field(
        converter=_array_int, eq=_ARRAY_EQ, hash=False, repr=False
    )


@attrs.frozen
class StampSolution:
    """Independent kernel solutions of every stamp (:func:`solve_stamps`).

    Attributes
    ----------
    coefficients : ndarray of shape (n, m_k)
        Kernel coefficients :math:`a_j` (NaN for failed stamps).
    backgrounds : ndarray of shape (n,)
        Background :math:`b_g` (0 when not fitted).
    kernel_sums : ndarray of shape (n,)
        :math:`\\sum_j a_j \\sum B_j`.
    lambdas : ndarray of shape (n,)
        Regularisation strength used (0 without regularisation).
    condition_numbers : ndarray of shape (n,)
        Eigenvalue ratio of the solved matrix (equilibrated unless requested otherwise).
    residuals : ResidualStats
        Normalised residual statistics in the valid box (or the core box).
    solved : ndarray of bool, shape (n,)
        False when the solution is unusable (no or too few good pixels, non-finite result).
    normal_equations : NormalEquations
        The (unregularised) normal equations, reusable by :func:`solve_spatial`.
    """

    coefficients: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    backgrounds: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    kernel_sums: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    lambdas: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    condition_numbers: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    residuals: ResidualStats
    solved: NDArray[np.bool_] = attrs.field(
        converter=_array_bool, eq=_ARRAY_EQ, hash=False, repr=False
    )
    normal_equations: NormalEquations = attrs.field(repr=False)


# --------------------------------------------------------------------------------------------
# The FFT cache: one transform per template stamp, reused for every kernel
# --------------------------------------------------------------------------------------------


class _StampDesign:
    """Fourier transforms and valid-box data of a :class:`StampSet` for one kernel shape.

    ``template_hat`` (and ``tvar_hat``) are computed once; every convolution of the templates
    with a basis kernel or a fitted kernel is a product with a kernel transform followed by a
    batched inverse transform. A circular transform of length ``N >= S`` is exact inside the
    valid box: wrapped contributions of the linear convolution land on indices ``< K - 1``.
    """

    def __init__(self, stamps: StampSet, kernel_shape: tuple[int, int], *,
                 single_precision: bool = False) -> None:
        s_r, s_c = stamps.stamp_shape
        k_r, k_c = kernel_shape
        if k_r > s_r or k_c > s_c:
            msg = f"kernel {kernel_shape} is larger than the stamps {stamps.stamp_shape}"
            raise ValueError(msg)
        self.n = stamps.n_stamps
        self.kernel_shape = (k_r, k_c)
        self.fft_shape = (scipy.fft.next_fast_len(s_r, real=True),
                          scipy.fft.next_fast_len(s_c, real=True))
        self.valid_shape = (s_r - k_r + 1, s_c - k_c + 1)
        self._circ = (slice(None), slice(k_r - 1, s_r), slice(k_c - 1, s_c))
        h_r, h_c = k_r // 2, k_c // 2
        crop = (slice(None), slice(h_r, h_r + self.valid_shape[0]),
                slice(h_c, h_c + self.valid_shape[1]))
        self.stamp_shape = (s_r, s_c)
        self.offset = (h_r, h_c)

        tmask = stamps.template_mask | ~np.isfinite(stamps.template)
        template = np.where(tmask, 0.0, stamps.template.astype(np.float64))
        tvar = np.where(tmask, 0.0, stamps.template_variance.astype(np.float64))
        self.template_hat = scipy.fft.rfft2(template, s=self.fft_shape, workers=-1)
        self.tvar_hat = scipy.fft.rfft2(tvar, s=self.fft_shape, workers=-1)
        self.single_precision = bool(single_precision)
        self._design_hat = (self.template_hat.astype(np.complex64) if self.single_precision
                            else self.template_hat)
        self._tvar_hat32 = (self.tvar_hat.astype(np.complex64) if self.single_precision
                            else self.tvar_hat)

        dilated = scipy.ndimage.maximum_filter(
            tmask.astype(np.uint8), size=(1, k_r, k_c), mode="constant", cval=0
        ).astype(bool)[crop]
        science = stamps.science[crop].astype(np.float64)
        svar = stamps.science_variance[crop].astype(np.float64)
        total_var = svar + stamps.template_variance[crop].astype(np.float64)
        good = (~stamps.mask[crop] & ~dilated & np.isfinite(science) & np.isfinite(total_var)
                & (total_var > 0))
        n_pix = self.valid_shape[0] * self.valid_shape[1]
        self.good = good.reshape(self.n, n_pix)
        self.science = np.where(good, science, 0.0).reshape(self.n, n_pix)
        self.science_variance = np.where(good, svar, 1.0).reshape(self.n, n_pix)
        self.variance = np.where(good, total_var, 1.0).reshape(self.n, n_pix)
        self.n_good = self.good.sum(axis=1)

    # ---- convolution helpers ----------------------------------------------------------------

    def _kernel_hat(self, kernels: NDArray[np.float64]) -> NDArray[np.complex128]:
        return scipy.fft.rfft2(kernels, s=self.fft_shape, workers=-1)

    def _valid(self, hat: NDArray[np.complex128], workers: int = -1) -> NDArray[np.float64]:
        """The valid box of the inverse transform of ``hat`` (pruned: only its rows).

        ``irfft2`` is an inverse FFT along the rows axis followed by a real one along the
        columns; only the valid rows go through the second step. ``hat`` is overwritten
        (every caller passes a temporary product).
        """
        rows, cols = self._circ[1:]
        half = scipy.fft.ifft(hat, n=self.fft_shape[0], axis=-2, workers=workers,
                              overwrite_x=True)[..., rows, :]
        out = scipy.fft.irfft(half, n=self.fft_shape[1], axis=-1, workers=workers)
        return out[..., cols]

    def weights(self, weighting: Weighting) -> NDArray[np.float64]:
        """Per-pixel weights ``(n, P)``; zero on bad pixels."""
        if weighting == "pixel":
            return np.where(self.good, 1.0 / self.variance, 0.0)
        if weighting != "constant":
            msg = f"weighting must be 'constant' or 'pixel', got {weighting!r}"
            raise ValueError(msg)
        med = np.ones(self.n)
        has = self.n_good > 0
        if has.any():
            # median of the good pixels of each stamp: the others sorted to the end
            ordered = np.sort(np.where(self.good[has], self.variance[has], np.inf), axis=1)
            count = self.n_good[has][:, None]
            lo = np.take_along_axis(ordered, (count - 1) // 2, axis=1)[:, 0]
            hi = np.take_along_axis(ordered, count // 2, axis=1)[:, 0]
            med[has] = 0.5 * (lo + hi)
        return np.where(self.good, 1.0 / med[:, None], 0.0)

    def normal_equations(
        self,
        basis: NDArray[np.float64],
        *,
        fit_background: bool,
        weighting: Weighting,
        with_noise: bool,
    ) -> NormalEquations:
        """Batched :math:`M = C^T W C`, :math:`b = C^T W I` (and :math:`F = C^T W V W C`)."""
        if basis.shape[1:] != self.kernel_shape:
            msg = f"basis kernels {basis.shape[1:]} differ from the design {self.kernel_shape}"
            raise ValueError(msg)
        m_k = basis.shape[0]
        m = m_k + int(fit_background)
        n_pix = self.good.shape[1]
        weights = self.weights(weighting)
        basis_hat = self._kernel_hat(basis)
        if self.single_precision:
            basis_hat = basis_hat.astype(np.complex64)
        matrix = np.empty((self.n, m, m))
        vector = np.empty((self.n, m))
        noise = np.empty((self.n, m, m)) if with_noise else None
        per_stamp = 2 * m_k * self.fft_shape[0] * self.fft_shape[1] * 8
        chunk = max(1, _CHUNK_BYTES // per_stamp)

        def assemble(sl: slice) -> None:  # writes rows ``sl`` of the outputs only
            conv = self._valid(self._design_hat[sl, None] * basis_hat[None], workers=1)
            n_sl = conv.shape[0]
            design = np.empty((n_sl, m, n_pix))  # the basis columns, then the background
            np.copyto(design[:, :m_k].reshape(n_sl, m_k, *self.valid_shape), conv)
            if fit_background:
                design[:, m_k] = 1.0
            weighted = design * weights[sl, None, :]
            matrix[sl] = weighted @ design.transpose(0, 2, 1)
            vector[sl] = np.einsum("nmp,np->nm", weighted, self.science[sl])
            if noise is not None:
                w2v = weights[sl] ** 2 * self.variance[sl]
                noise[sl] = (design * w2v[:, None, :]) @ design.transpose(0, 2, 1)

        # chunks of stamps in parallel threads (the FFTs and products release the GIL)
        parallel_map(assemble, [slice(start, min(start + chunk, self.n))
                                for start in range(0, self.n, chunk)])
        return NormalEquations(
            matrix=matrix,
            vector=vector,
            noise=noise,
            n_pixels=self.n_good,
            n_basis=m_k,
            fit_background=fit_background,
        )

    def residual_stats(
        self,
        kernels: NDArray[np.float64],
        backgrounds: NDArray[np.float64],
        *,
        index: NDArray[np.int64] | None = None,
        core_radius: int | None = None,
    ) -> ResidualStats:
        """Normalised residual statistics of given per-stamp kernels and backgrounds."""
        idx = np.arange(self.n) if index is None else np.asarray(index)
        n_sel = idx.size
        if n_sel == 0:
            empty = np.empty(0)
            return ResidualStats(mean=empty, std=empty, n_pixels=np.empty(0, dtype=np.int64))
        finite = np.all(np.isfinite(kernels), axis=(1, 2)) & np.isfinite(backgrounds)
        kern = np.where(finite[:, None, None], kernels, 0.0)
        bg = np.where(finite, backgrounds, 0.0)
        kern_hat = self._kernel_hat(kern)
        kern2_hat = self._kernel_hat(kern**2)
        if self.single_precision:
            model = self._valid(self._design_hat[idx] * kern_hat.astype(np.complex64))
            prop = self._valid(self._tvar_hat32[idx] * kern2_hat.astype(np.complex64))
        else:
            model = self._valid(self.template_hat[idx] * kern_hat)
            prop = self._valid(self.tvar_hat[idx] * kern2_hat)
        model = model.reshape(n_sel, -1).astype(np.float64, copy=False)
        prop = prop.astype(np.float64, copy=False)
        var = self.science_variance[idx] + np.maximum(prop.reshape(n_sel, -1), 0.0)
        use = self.good[idx] & (var > 0)
        if core_radius is not None:
            if core_radius < 0:
                msg = f"core_radius must be >= 0, got {core_radius}"
                raise ValueError(msg)
            rows = np.arange(self.valid_shape[0]) + self.offset[0] - self.stamp_shape[0] // 2
            cols = np.arange(self.valid_shape[1]) + self.offset[1] - self.stamp_shape[1] // 2
            core = (np.abs(rows)[:, None] <= core_radius) & (np.abs(cols)[None, :] <= core_radius)
            use = use & core.reshape(1, -1)
        resid = np.where(use, (self.science[idx] - model - bg[:, None])
                         / np.sqrt(np.where(use, var, 1.0)), 0.0)
        count = use.sum(axis=1)
        mean = np.full(n_sel, np.nan)
        std = np.full(n_sel, np.nan)
        ok1 = (count > 0) & finite
        mean[ok1] = resid[ok1].sum(axis=1) / count[ok1]
        ok2 = (count > 1) & finite
        dev = np.where(use[ok2], resid[ok2] - mean[ok2, None], 0.0)
        std[ok2] = np.sqrt((dev**2).sum(axis=1) / (count[ok2] - 1))
        return ResidualStats(mean=mean, std=std, n_pixels=count)


# --------------------------------------------------------------------------------------------
# Linear algebra
# --------------------------------------------------------------------------------------------


def _eigh(matrices: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Eigen-decomposition of a stack of symmetric matrices (ascending eigenvalues).

    ``numpy.linalg.eigh`` uses the divide-and-conquer driver whose back-transformation calls
    multi-threaded BLAS; for stacks of small matrices on a loaded machine that is 10-30 times
    slower than single-threaded. The relatively robust representation driver called matrix by
    matrix is as fast when idle and does not degrade, hence the loop over the stack.
    """
    n, m = matrices.shape[0], matrices.shape[-1]
    values = np.empty((n, m))
    vectors = np.empty((n, m, m))
    for i in range(n):
        values[i], vectors[i] = scipy.linalg.eigh(matrices[i], driver="evr",
                                                  check_finite=False)
    return values, vectors


#: Matrices larger than this get their extreme eigenvalues from :func:`_extreme_eigenvalues`'s
#: Cholesky + SVD path: LAPACK's symmetric eigensolvers wake OpenBLAS's thread pool from about
#: 65 rows on (the SVD only from about 100), which then spins for ~0.1 s.
_SERIAL_EIGVALSH = 64


def _extreme_eigenvalues(matrices: NDArray[np.float64]
                         ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Smallest and largest eigenvalue of each symmetric matrix of a stack.

    Small matrices use :func:`numpy.linalg.eigvalsh`. A larger positive-definite one (its
    Cholesky factorisation succeeds) uses its singular values, which equal its eigenvalues;
    the others (not positive definite) fall back to ``eigvalsh``.
    """
    if matrices.shape[-1] <= _SERIAL_EIGVALSH:
        ev = np.linalg.eigvalsh(matrices)
        return ev[..., 0], ev[..., -1]
    lo = np.empty(matrices.shape[:-2])
    hi = np.empty(matrices.shape[:-2])
    for index in np.ndindex(*matrices.shape[:-2]):
        matrix = matrices[index]
        try:
            np.linalg.cholesky(matrix)
        except np.linalg.LinAlgError:
            ev = np.linalg.eigvalsh(matrix)
            lo[index], hi[index] = ev[0], ev[-1]
            continue
        sv = np.linalg.svd(matrix, compute_uv=False)
        lo[index], hi[index] = sv[-1], sv[0]
    return lo, hi


def _equilibration(matrices: NDArray[np.float64]) -> NDArray[np.float64]:
    diag = np.diagonal(matrices, axis1=-2, axis2=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)


def condition_numbers(matrices: ArrayLike, *, equilibrate: bool = True) -> NDArray[np.float64]:
    r"""Eigenvalue-ratio condition numbers of symmetric matrices.

    Parameters
    ----------
    matrices : array_like of shape (..., m, m)
        Symmetric positive semi-definite matrices.
    equilibrate : bool, optional
        Compute the ratio for :math:`D^{-1/2} M D^{-1/2}` with :math:`D = \operatorname{diag}
        M` (Jacobi scaling). This makes the number independent of the units of each parameter
        (kernel coefficients scale with the template flux, the background does not), so that a
        fixed limit means the same thing for faint and bright stars. ``False`` gives upstream's
        raw ``EIGENVALUE`` ratio.

    Returns
    -------
    ndarray of shape (...)
        :math:`\lambda_{\max}/\lambda_{\min}`; ``inf`` when :math:`\lambda_{\min} \le 0`, NaN
        for non-finite input.
    """
    arr = np.asarray(matrices, dtype=np.float64)
    out = np.full(arr.shape[:-2], np.nan)
    finite = np.all(np.isfinite(arr), axis=(-2, -1))
    if not finite.any():
        return out
    sub = arr[finite]
    if equilibrate:
        s = _equilibration(sub)
        sub = sub * s[..., :, None] * s[..., None, :]
    lo, hi = _extreme_eigenvalues(sub)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[finite] = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
    return out


def _solve_symmetric(
    matrices: NDArray[np.float64], rhs: NDArray[np.float64], *, equilibrate: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Batched solve of symmetric PSD systems; LU when well conditioned, else eigen-pinv.

    Returns the solutions ``(n, m)`` (NaN for non-finite systems) and the condition numbers.
    """
    n, m = rhs.shape
    x = np.full((n, m), np.nan)
    cond = np.full(n, np.nan)
    finite = np.all(np.isfinite(matrices), axis=(1, 2)) & np.all(np.isfinite(rhs), axis=1)
    if not finite.any():
        return x, cond
    a = matrices[finite]
    b = rhs[finite]
    s = _equilibration(a) if equilibrate else np.ones(b.shape)
    a_s = a * s[:, :, None] * s[:, None, :]
    b_s = b * s
    lo, hi = _extreme_eigenvalues(a_s)
    rcond = m * _EPS
    well = (hi > 0) & (lo > rcond * hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
    y = np.zeros(b.shape)
    if well.any():
        try:
            y[well] = np.linalg.solve(a_s[well], b_s[well][..., None])[..., 0]
        except np.linalg.LinAlgError:
            well = np.zeros_like(well)
    ill = ~well
    if ill.any():
        w, v = _eigh(a_s[ill])
        cut = rcond * np.maximum(w[:, -1:], 0.0)
        inv = np.where(w > cut, 1.0 / np.where(w > cut, w, 1.0), 0.0)
        y[ill] = np.einsum("nij,nj->ni", v, inv * np.einsum("nji,nj->ni", v, b_s[ill]))
    x[finite] = y * s
    cond[finite] = c
    return x, cond


# --------------------------------------------------------------------------------------------
# Regularisation
# --------------------------------------------------------------------------------------------


def _check_h(value: NDArray[np.float64]) -> NDArray[np.float64]:
    if value.ndim != 2 or value.shape[0] != value.shape[1]:
        msg = f"regularization matrix must be square, got {value.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(value)) or not np.allclose(value, value.T, rtol=0, atol=1e-12 *
                                                         max(1.0, float(np.abs(value).max()))):
        msg = "regularization matrix must be finite and symmetric"
        raise ValueError(msg)
    return value


@attrs.frozen
class Regularization:
    r"""Tikhonov regularisation :math:`(M + \lambda H)\,a = b` and the choice of :math:`\lambda`.

    Parameters
    ----------
    matrix : array_like of shape (m_k, m_k) or (m_k + 1, m_k + 1)
        :math:`H = B^T B` (see :func:`~._basis.central_difference_matrix`); a matrix without
        the background row/column is padded with zeros when a background is fitted.
    lambda_type : {"absolute", "relative", "minimize_biased_risk", "minimize_unbiased_risk"}
        ``absolute``: :math:`\lambda` = ``lambda_value``. ``relative``: :math:`\lambda` =
        ``lambda_scaling`` :math:`\operatorname{tr} M / \operatorname{tr} H` (Numerical
        Recipes eq. 18.5.8). The risk modes scan a grid and minimise an unbiased estimate of
        the risk chosen by ``risk_space`` (:func:`regularization_risk`), with the full
        ("unbiased") or truncated ("biased") pseudo-inverse as reference solution.
    lambda_value : float
        Absolute :math:`\lambda` (> 0).
    lambda_scaling : float
        Relative scale (> 0).
    lambda_min, lambda_max, lambda_step : float
        Scan grid; in :math:`\log_{10}` units when ``lambda_step_type == "log"``.
    lambda_step_type : {"log", "linear"}
        Grid spacing.
    lambda_grid_scale : {"relative", "absolute"}
        ``relative`` multiplies every grid value by :math:`\operatorname{tr} M /
        \operatorname{tr} H` of the stamp. :math:`\lambda` carries the units of :math:`M`
        (template flux squared over variance), so an absolute grid only fits one data scale;
        the relative grid adapts to it, hence the default (and the wider default range than
        upstream's absolute :math:`10^{-1}..10^{2}`).
    max_condition : float
        Eigenvalue-ratio limit (of the Jacobi-scaled :math:`M`) of the truncated
        pseudo-inverse used by the *biased* risk. Upstream's 5e6 (``maxConditionNumber``)
        truncates little for typical delta-function stamps (condition numbers 1e7-1e10),
        leaving the estimator almost as noisy as the unbiased one; 1e4 discards the directions
        determined more than 100 times worse than the best one.
    risk_space : {"prediction", "coefficients"}
        ``prediction``: risk of the model of the science stamp,
        :math:`E\lVert C (a_\lambda - a_\star)\rVert_W^2`, i.e. of the difference image
        (Mallows' :math:`C_L`, Vogel's UPRE). ``coefficients``: risk of the kernel pixels,
        :math:`E\lVert a_\lambda - a_\star\rVert^2`, the quantity of ip_diffim's formula.
        The coefficient risk of an ill-conditioned delta-function stamp is dominated by
        directions that hardly affect the fit; its estimate is then so noisy, and its
        minimiser so over-smoothed for bright stars (residuals of tens of sigma), that the
        predictive risk is the default.

    Raises
    ------
    ValueError
        For an invalid matrix, type, grid or non-positive scale.
    """

    matrix: NDArray[np.float64] = attrs.field(
        converter=lambda v: _readonly(_check_h(np.array(v, dtype=np.float64))),
        eq=_ARRAY_EQ, hash=False, repr=False,
    )
    lambda_type: LambdaType = attrs.field(
        default="absolute",
        validator=attrs.validators.in_(
            ("absolute", "relative", "minimize_biased_risk", "minimize_unbiased_risk")
        ),
    )
    lambda_value: float = attrs.field(default=0.2, validator=attrs.validators.gt(0))
    lambda_scaling: float = attrs.field(default=1e-4, validator=attrs.validators.gt(0))
    lambda_min: float = -4.0
    lambda_max: float = 4.0
    lambda_step: float = attrs.field(default=0.1, validator=attrs.validators.gt(0))
    lambda_step_type: Literal["log", "linear"] = attrs.field(
        default="log", validator=attrs.validators.in_(("log", "linear"))
    )
    lambda_grid_scale: Literal["relative", "absolute"] = attrs.field(
        default="relative", validator=attrs.validators.in_(("relative", "absolute"))
    )
    max_condition: float = attrs.field(default=1e4, validator=attrs.validators.gt(1))
    risk_space: Literal["prediction", "coefficients"] = attrs.field(
        default="prediction", validator=attrs.validators.in_(("prediction", "coefficients"))
    )

    def __attrs_post_init__(self) -> None:
        if self.lambda_max < self.lambda_min:
            msg = f"lambda_max ({self.lambda_max}) < lambda_min ({self.lambda_min})"
            raise ValueError(msg)
        if self.lambda_step_type == "linear" and self.lambda_min <= 0:
            msg = "a linear lambda grid needs lambda_min > 0"
            raise ValueError(msg)

    def grid(self) -> NDArray[np.float64]:
        """Grid values (before the per-stamp relative scaling)."""
        n_steps = math.floor((self.lambda_max - self.lambda_min) / self.lambda_step + 1e-9)
        values = self.lambda_min + self.lambda_step * np.arange(n_steps + 1)
        return 10.0**values if self.lambda_step_type == "log" else values

    def matrix_for(self, n_parameters: int, n_basis: int) -> NDArray[np.float64]:
        """:math:`H` padded to ``n_parameters`` (background row/column zero), or without its
        background row/column for a fit without background."""
        h = self.matrix
        if h.shape[0] == n_parameters:
            return h
        if h.shape[0] == n_basis and n_parameters == n_basis + 1:
            out = np.zeros((n_parameters, n_parameters))
            out[:n_basis, :n_basis] = h
            return out
        if h.shape[0] == n_basis + 1 and n_parameters == n_basis:
            return np.ascontiguousarray(h[:n_basis, :n_basis])
        msg = f"regularization matrix {h.shape} does not fit {n_parameters} parameters"
        raise ValueError(msg)


@attrs.frozen
class RiskCurve:
    """Estimated risk as a function of :math:`\\lambda` (:func:`regularization_risk`).

    Attributes
    ----------
    lambdas : ndarray of shape (n, L)
        :math:`\\lambda` values per stamp.
    risk : ndarray of shape (n, L)
        Risk estimate up to a :math:`\\lambda`-independent constant per stamp.
    best_lambda : ndarray of shape (n,)
        Arg-minimum.
    best_coefficients : ndarray of shape (n, m)
        :math:`a_\\lambda` at the arg-minimum.
    """

    lambdas: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    risk: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    best_lambda: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    best_coefficients: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )


def _truncated_pinv(
    matrices: NDArray[np.float64], max_condition: float | None
) -> NDArray[np.float64]:
    """Eigen pseudo-inverse (in equilibrated coordinates) of symmetric matrices."""
    s = _equilibration(matrices)
    a_s = matrices * s[:, :, None] * s[:, None, :]
    w, v = _eigh(a_s)
    top = np.maximum(w[:, -1:], 0.0)
    cut = top / max_condition if max_condition is not None else matrices.shape[-1] * _EPS * top
    inv = np.where(w > cut, 1.0 / np.where(w > cut, w, 1.0), 0.0)
    g_s = (v * inv[:, None, :]) @ v.transpose(0, 2, 1)
    return g_s * s[:, :, None] * s[:, None, :]


def regularization_risk(
    matrix: ArrayLike,
    vector: ArrayLike,
    regularization_matrix: ArrayLike,
    lambdas: ArrayLike,
    *,
    noise: ArrayLike | None = None,
    kind: Literal["unbiased", "biased"] = "unbiased",
    space: Literal["coefficients", "prediction"] = "coefficients",
    max_condition: float = 1e4,
) -> RiskCurve:
    r"""Unbiased (or truncated, "biased") estimate of the Tikhonov risk versus :math:`\lambda`.

    Parameters
    ----------
    matrix : array_like of shape (n, m, m)
        Normal matrices :math:`M = C^T W C`.
    vector : array_like of shape (n, m)
        :math:`b = C^T W I`.
    regularization_matrix : array_like of shape (m, m)
        :math:`H` (symmetric positive semi-definite).
    lambdas : array_like of shape (L,) or (n, L)
        :math:`\lambda` grid, common or per stamp (>= 0).
    noise : array_like of shape (n, m, m), optional
        :math:`F = \operatorname{Cov}(b) = C^T W V W C`. Default :math:`F = M`, exact for
        inverse-variance weights :math:`W = V^{-1}`.
    kind : {"unbiased", "biased"}
        Reference solution :math:`\hat a = G b` with :math:`G = M^{+}` (unbiased) or the
        pseudo-inverse truncated at eigenvalue ratio ``max_condition`` (biased).
    space : {"coefficients", "prediction"}
        Metric of the risk: :math:`Q = I` (kernel coefficients, ip_diffim's formula) or
        :math:`Q = M` (prediction of the science stamp, i.e. the difference image).
    max_condition : float, optional
        Truncation for ``kind="biased"``.

    Returns
    -------
    RiskCurve
        Risk per stamp and :math:`\lambda`, the arg-minimum and its solution.

    Notes
    -----
    Let :math:`I = C a_\star + \epsilon` with :math:`\operatorname{Cov}(\epsilon) = V`, so that
    :math:`E\,b = M a_\star` and :math:`\operatorname{Cov}(b) = F`. The regularised solution is
    :math:`a_\lambda = A_\lambda b` with :math:`A_\lambda = (M + \lambda H)^{-1}` and the
    reference :math:`\hat a = G b` has mean :math:`\bar a = G M a_\star` (:math:`= a_\star`
    when :math:`G = M^{-1}`). For a metric :math:`Q`, expanding
    :math:`\lVert a_\lambda - \bar a\rVert_Q^2 = \lVert a_\lambda - \hat a\rVert_Q^2
    + 2 (a_\lambda - \hat a)^T Q (\hat a - \bar a) + \lVert \hat a - \bar a\rVert_Q^2` and
    using :math:`E[(X b)^T Q G (b - E b)] = \operatorname{tr}(X^T Q G F)` for the cross term
    gives

    .. math::

        E\lVert a_\lambda - \bar a\rVert_Q^2
        = E\left[\lVert a_\lambda - \hat a\rVert_Q^2
          + 2\operatorname{tr}(A_\lambda Q G F)\right] + \text{const},

    so :math:`\hat R(\lambda) = \lVert a_\lambda - \hat a\rVert_Q^2 + 2\operatorname{tr}
    (A_\lambda Q G F)` is an unbiased estimate of the risk up to a :math:`\lambda`-independent
    constant (Stein 1981).

    * :math:`Q = I` (``space="coefficients"``) with :math:`W = V^{-1}` (:math:`F = M`,
      :math:`G = M^{-1}`) reduces to ip_diffim's :math:`a^T a - 2 a^T M^{-1} b +
      2 \operatorname{tr}(M + \lambda H)^{-1}` (their :math:`VV^T`, from the thin SVD of
      :math:`C`, is the identity).
    * :math:`Q = M` (``space="prediction"``) measures :math:`\lVert C(a_\lambda -
      a_\star)\rVert_W^2`; with :math:`G = M^{-1}` it equals :math:`\lVert I - C
      a_\lambda\rVert_W^2 + 2 \operatorname{tr}(A_\lambda F)` up to a constant, the unbiased
      predictive risk estimator.
    * With upstream's default constant weighting :math:`F \ne M`; the sandwich form above
      is then required (``noise``).
    * The truncated ("biased") reference has lower variance but measures the risk against
      the projected :math:`\bar a`.

    All :math:`\lambda` are evaluated from one simultaneous diagonalisation per stamp:
    with :math:`Z` such that :math:`Z^T M Z = I` and :math:`Z^T H Z = \Lambda` (Cholesky of
    the Jacobi-scaled :math:`M`, then an eigen-decomposition),
    :math:`A_\lambda = Z (I + \lambda\Lambda)^{-1} Z^T`, hence
    :math:`a_\lambda = Z\,(Z^T b)/(1 + \lambda\Lambda)` and
    :math:`\operatorname{tr}(A_\lambda Q G F) = \sum_i (Z^T Q G F Z)_{ii}/(1 + \lambda
    \Lambda_i)`; a :math:`\lambda` costs :math:`O(m^2)`. Stamps whose :math:`M` is not
    positive definite fall back to pseudo-inverse solves per :math:`\lambda`.
    """
    m_arr = np.asarray(matrix, dtype=np.float64)
    b_arr = np.asarray(vector, dtype=np.float64)
    h = np.asarray(regularization_matrix, dtype=np.float64)
    n, m = b_arr.shape
    if m_arr.shape != (n, m, m) or h.shape != (m, m):
        msg = f"inconsistent shapes: M {m_arr.shape}, b {b_arr.shape}, H {h.shape}"
        raise ValueError(msg)
    lam = np.asarray(lambdas, dtype=np.float64)
    lam = np.broadcast_to(lam, (n, lam.shape[-1])) if lam.ndim == 1 else lam
    if lam.shape[0] != n or np.any(lam < 0) or not np.all(np.isfinite(lam)):
        msg = "lambdas must be finite, >= 0 and of shape (L,) or (n, L)"
        raise ValueError(msg)
    if kind not in ("unbiased", "biased"):
        msg = f"kind must be 'unbiased' or 'biased', got {kind!r}"
        raise ValueError(msg)
    if space not in ("coefficients", "prediction"):
        msg = f"space must be 'coefficients' or 'prediction', got {space!r}"
        raise ValueError(msg)
    predictive = space == "prediction"
    f_arr = m_arr if noise is None else np.asarray(noise, dtype=np.float64)
    n_lam = lam.shape[1]
    risk = np.full((n, n_lam), np.nan)
    best_coeff = np.full((n, m), np.nan)

    # Fast path: simultaneous diagonalisation in equilibrated coordinates, M = L L^T.
    s = _equilibration(m_arr)
    m_s = m_arr * s[:, :, None] * s[:, None, :]
    h_s = h[None] * s[:, :, None] * s[:, None, :]
    chol = np.zeros_like(m_s)
    pd = np.all(np.isfinite(m_s), axis=(1, 2))
    try:
        chol[pd] = np.linalg.cholesky(m_s[pd])
    except np.linalg.LinAlgError:
        # Retry stamp by stamp so that one indefinite matrix does not sink the batch.
        for i in np.flatnonzero(pd):
            try:
                chol[i] = np.linalg.cholesky(m_s[i])
            except np.linalg.LinAlgError:
                pd[i] = False
    z = np.zeros((0, m, m))
    if pd.any():
        l_inv = np.linalg.inv(chol[pd])
        h_w = l_inv @ h_s[pd] @ l_inv.transpose(0, 2, 1)
        lam_h, u = _eigh(0.5 * (h_w + h_w.transpose(0, 2, 1)))
        lam_h = np.maximum(lam_h, 0.0)
        z = s[pd][:, :, None] * (l_inv.transpose(0, 2, 1) @ u)
    # Reference solution a_hat = G b; for positive definite M, M^{-1} = Z Z^T.
    g = np.zeros((n, m, m))
    if kind == "biased":
        g[:] = _truncated_pinv(m_arr, max_condition)
    else:
        g[pd] = z @ z.transpose(0, 2, 1)
        if (~pd).any():
            g[~pd] = _truncated_pinv(m_arr[~pd], None)
    a_ref = (g @ b_arr[..., None])[..., 0]
    # trace operand Q G F with the metric Q = M (prediction) or I (coefficients)
    q_mat = m_arr @ g @ f_arr if predictive else g @ f_arr

    def distance(diff: NDArray[np.float64], rows: NDArray[Any]) -> NDArray[np.float64]:
        if predictive:
            return np.einsum("ni,ni->n", diff, (m_arr[rows] @ diff[..., None])[..., 0])
        return (diff**2).sum(axis=1)

    if pd.any():
        # In the simultaneously diagonalising coordinates a = Z c (Z^T M Z = I) the solution
        # is c_lambda = beta / (1 + lambda Lambda) and a distance d^T Q d becomes a quadratic
        # form in c: the identity for Q = M, Z^T Z for Q = I. Every lambda then costs O(m)
        # (prediction) or one batched matrix-vector product (coefficients).
        beta = (z.transpose(0, 2, 1) @ b_arr[pd][..., None])[..., 0]
        qz = np.einsum("nji,nji->ni", z, q_mat[pd] @ z)  # diag(Z^T Q G F Z)
        # a_ref = Z gamma exactly when a_ref lies in the range of Z (always: Z is invertible)
        gamma = (z.transpose(0, 2, 1) @ (m_arr[pd] @ a_ref[pd][..., None]))[..., 0]
        gram = None if predictive else z.transpose(0, 2, 1) @ z
        for k in range(n_lam):
            damp = 1.0 / (1.0 + lam[pd, k][:, None] * lam_h)
            diff = beta * damp - gamma
            if gram is None:
                dist = (diff**2).sum(axis=1)
            else:
                dist = np.einsum("ni,ni->n", diff, (gram @ diff[..., None])[..., 0])
            risk[pd, k] = dist + 2.0 * (qz * damp).sum(axis=1)
        rows_pd = np.flatnonzero(pd)
        finite_pd = np.all(np.isfinite(risk[pd]), axis=1)
        best_k = np.zeros(rows_pd.size, dtype=int)
        best_k[finite_pd] = np.argmin(risk[pd][finite_pd], axis=1)
        damp = 1.0 / (1.0 + lam[rows_pd, best_k][:, None] * lam_h)
        best_coeff[pd] = (z @ (beta * damp)[..., None])[..., 0]
    slow = np.flatnonzero(~pd)
    if slow.size:
        best_slow = np.full(slow.size, np.inf)
        for k in range(n_lam):
            a_mat = m_arr[slow] + lam[slow, k][:, None, None] * h[None]
            a_inv = _truncated_pinv(a_mat, None)
            a_lam = (a_inv @ b_arr[slow][..., None])[..., 0]
            trace = np.einsum("nij,nji->n", a_inv, q_mat[slow])
            r_k = distance(a_lam - a_ref[slow], slow) + 2.0 * trace
            risk[slow, k] = r_k
            better = r_k < best_slow
            best_slow[better] = r_k[better]
            best_coeff[slow[better]] = a_lam[better]
    finite_rows = np.all(np.isfinite(risk), axis=1)
    best = np.zeros(n, dtype=int)
    best[finite_rows] = np.argmin(risk[finite_rows], axis=1)
    best_lam = np.where(finite_rows, lam[np.arange(n), best], np.nan)
    best_coeff[~finite_rows] = np.nan
    return RiskCurve(lambdas=lam, risk=risk, best_lambda=best_lam, best_coefficients=best_coeff)


def _regularized_solve(
    ne: NormalEquations, regularization: Regularization, *, equilibrate: bool
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Solve :math:`(M + \\lambda H) a = b` with :math:`\\lambda` chosen per stamp."""
    h = regularization.matrix_for(ne.n_parameters, ne.n_basis)
    n = ne.matrix.shape[0]
    tr_h = float(np.trace(h))
    if regularization.lambda_type in ("relative",) or (
        regularization.lambda_type.startswith("minimize")
        and regularization.lambda_grid_scale == "relative"
    ):
        if tr_h <= 0:
            msg = "relative lambda needs a regularization matrix with positive trace"
            raise ValueError(msg)
        rel = np.trace(ne.matrix, axis1=1, axis2=2) / tr_h
    else:
        rel = np.ones(n)
    if regularization.lambda_type == "absolute":
        lam = np.full(n, regularization.lambda_value)
    elif regularization.lambda_type == "relative":
        lam = regularization.lambda_scaling * rel
    else:
        grid = regularization.grid()[None, :] * rel[:, None]
        ok = np.all(np.isfinite(ne.matrix), axis=(1, 2)) & np.isfinite(rel)
        lam = np.full(n, np.nan)
        if ok.any():
            kind: Literal["unbiased", "biased"] = (
                "biased" if regularization.lambda_type == "minimize_biased_risk" else "unbiased"
            )
            curve = regularization_risk(
                ne.matrix[ok], ne.vector[ok], h, grid[ok],
                noise=None if ne.noise is None else ne.noise[ok],
                kind=kind, space=regularization.risk_space,
                max_condition=regularization.max_condition,
            )
            lam[ok] = curve.best_lambda
    lam_safe = np.where(np.isfinite(lam), lam, 0.0)
    a_mat = ne.matrix + lam_safe[:, None, None] * h[None]
    x, cond = _solve_symmetric(a_mat, ne.vector, equilibrate=equilibrate)
    x[~np.isfinite(lam)] = np.nan
    return x, cond, lam


# --------------------------------------------------------------------------------------------
# Per-stamp solutions
# --------------------------------------------------------------------------------------------


def build_normal_equations(
    stamps: StampSet,
    basis: ArrayLike,
    *,
    fit_background: bool = True,
    weighting: Weighting = "constant",
    with_noise: bool = False,
) -> NormalEquations:
    r"""Per-stamp normal equations for a kernel basis.

    Parameters
    ----------
    stamps : StampSet
        Candidate stamps.
    basis : array_like of shape (m_k, K_r, K_c)
        Basis kernels (odd sizes not larger than the stamps).
    fit_background : bool, optional
        Append a constant-background column.
    weighting : {"constant", "pixel"}, optional
        ``constant`` (upstream default ``constantVarianceWeighting``): :math:`W = I /
        \operatorname{median}(V)` per stamp; ``pixel``: :math:`W = \operatorname{diag}(1/V)`,
        with :math:`V = V_I + V_T`.
    with_noise : bool, optional
        Also compute :math:`F = C^T W V W C` (needed by the risk estimators when weights are
        not inverse variances).

    Returns
    -------
    NormalEquations

    Notes
    -----
    .. math::

        C_{pj} = (B_j \otimes T)(p),\quad C_{p,m_k} = 1,\quad
        M = C^T W C,\quad b = C^T W I,

    over the good pixels :math:`p` of the valid box. One ``rfft2`` per template stamp is
    reused for all :math:`m_k` basis kernels.
    """
    b = _as_basis(basis)
    design = _StampDesign(stamps, (b.shape[1], b.shape[2]))
    return design.normal_equations(
        b, fit_background=fit_background, weighting=weighting, with_noise=with_noise
    )


def _solve_local(
    design: _StampDesign,
    basis: NDArray[np.float64],
    ne: NormalEquations,
    *,
    regularization: Regularization | None,
    core_radius: int | None,
    equilibrate: bool,
) -> StampSolution:
    n = design.n
    if regularization is None:
        x, cond = _solve_symmetric(ne.matrix, ne.vector, equilibrate=equilibrate)
        lam = np.zeros(n)
    else:
        x, cond, lam = _regularized_solve(ne, regularization, equilibrate=equilibrate)
    m_k = ne.n_basis
    solved = np.all(np.isfinite(x), axis=1) & (ne.n_pixels >= ne.n_parameters)
    x[~solved] = np.nan
    coeffs = x[:, :m_k]
    bgs = x[:, m_k] if ne.fit_background else np.where(solved, 0.0, np.nan)
    sums = basis.sum(axis=(1, 2))
    ksum = coeffs @ sums
    stats = design.residual_stats(
        kernel_images(basis, np.where(solved[:, None], coeffs, 0.0)),
        np.where(solved, bgs, 0.0),
        core_radius=core_radius,
    )
    mean = np.where(solved, stats.mean, np.nan)
    std = np.where(solved, stats.std, np.nan)
    return StampSolution(
        coefficients=coeffs,
        backgrounds=bgs,
        kernel_sums=ksum,
        lambdas=lam,
        condition_numbers=cond,
        residuals=ResidualStats(mean=mean, std=std, n_pixels=stats.n_pixels),
        solved=solved,
        normal_equations=ne,
    )


def solve_stamps(
    stamps: StampSet,
    basis: ArrayLike,
    *,
    fit_background: bool = True,
    weighting: Weighting = "constant",
    regularization: Regularization | None = None,
    core_radius: int | None = None,
    equilibrate: bool = True,
) -> StampSolution:
    r"""Solve every stamp independently for its kernel and background.

    Parameters
    ----------
    stamps : StampSet
        Candidate stamps.
    basis : array_like of shape (m_k, K_r, K_c)
        Basis kernels.
    fit_background : bool, optional
        Fit a constant background per stamp.
    weighting : {"constant", "pixel"}, optional
        See :func:`build_normal_equations`.
    regularization : Regularization, optional
        Solve :math:`(M + \lambda H) a = b` instead of :math:`M a = b`.
    core_radius : int, optional
        Compute residual statistics only in the central ``(2 r + 1)²`` box of each stamp
        (``useCoreStats``); default: the whole valid box.
    equilibrate : bool, optional
        Jacobi-scale the systems before solving and for the condition numbers.

    Returns
    -------
    StampSolution

    Notes
    -----
    Systems whose (equilibrated) eigenvalue ratio is below :math:`1/(m\,\epsilon)` are solved
    by LU factorisation (``numpy.linalg.solve``, batched); the others with the eigenvalue
    pseudo-inverse (:math:`1/\mu` for :math:`\mu > m\epsilon\mu_{\max}`), as upstream's
    "full-pivot LU, else eigen pseudo-inverse". The kernel sum is
    :math:`\sum_j a_j \sum B_j` (:math:`= a_0` for a renormalised AL basis).
    """
    b = _as_basis(basis)
    design = _StampDesign(stamps, (b.shape[1], b.shape[2]))
    needs_noise = regularization is not None and regularization.lambda_type.startswith("min")
    ne = design.normal_equations(
        b, fit_background=fit_background, weighting=weighting,
        with_noise=needs_noise and weighting != "pixel",
    )
    return _solve_local(design, b, ne, regularization=regularization,
                        core_radius=core_radius, equilibrate=equilibrate)


def assess_stamps(
    stamps: StampSet,
    basis: ArrayLike,
    coefficients: ArrayLike,
    backgrounds: ArrayLike,
    *,
    core_radius: int | None = None,
) -> ResidualStats:
    r"""Residual statistics of given per-stamp kernels (``AssessSpatialKernelVisitor``).

    Parameters
    ----------
    stamps : StampSet
        Candidate stamps.
    basis : array_like of shape (m_k, K_r, K_c)
        Basis kernels.
    coefficients : array_like of shape (n, m_k)
        Kernel coefficients per stamp (e.g. a spatial model evaluated at the stamp centres).
    backgrounds : array_like of shape (n,)
        Background per stamp.
    core_radius : int, optional
        Restrict the statistics to the central ``(2 r + 1)²`` box.

    Returns
    -------
    ResidualStats
        Mean and standard deviation of
        :math:`(I - \kappa\otimes T - b_g)/\sqrt{V_I + \kappa^2 \otimes V_T}`.
    """
    b = _as_basis(basis)
    design = _StampDesign(stamps, (b.shape[1], b.shape[2]))
    coeff = np.asarray(coefficients, dtype=np.float64)
    bg = np.asarray(backgrounds, dtype=np.float64).reshape(-1)
    if coeff.shape != (stamps.n_stamps, b.shape[0]) or bg.shape != (stamps.n_stamps,):
        msg = f"coefficients {coeff.shape} / backgrounds {bg.shape} do not match the stamps"
        raise ValueError(msg)
    return design.residual_stats(kernel_images(b, coeff), bg, core_radius=core_radius)


# --------------------------------------------------------------------------------------------
# Kernel-sum clipping
# --------------------------------------------------------------------------------------------


def clip_kernel_sums(
    ksums: ArrayLike,
    *,
    n_sigma: float = 3.0,
    n_iter: int = 3,
    clip_sigma: float = 3.0,
) -> NDArray[np.bool_]:
    r"""Keep mask of kernel sums consistent with the clipped distribution (``KernelSumVisitor``).

    Parameters
    ----------
    ksums : array_like of shape (n,)
        Kernel sums of the candidates.
    n_sigma : float, optional
        Rejection threshold ``maxKsumSigma``: reject :math:`|k - \bar k| > n_\sigma s`.
    n_iter : int, optional
        Clipping passes of the statistics (afw ``MEANCLIP``, first pass median-centred).
    clip_sigma : float, optional
        Clipping width of the statistics themselves.

    Returns
    -------
    ndarray of bool, shape (n,)
        True for kept candidates; non-finite sums are rejected. A single finite sum is kept
        (its spread is taken as 0, as upstream).

    Examples
    --------
    >>> clip_kernel_sums([1, 1, 1, 1, 2, 3, 4, 50]).tolist()
    [True, True, True, True, True, True, True, False]
    """
    k = np.asarray(ksums, dtype=np.float64).reshape(-1)
    stats = clipped_stats(k, n_sigma=clip_sigma, n_iter=n_iter)
    finite = np.isfinite(k)
    if stats.n_used == 0:
        return finite & False
    std = stats.std if stats.n_used > 1 and np.isfinite(stats.std) else 0.0
    keep = np.zeros(k.shape, dtype=bool)
    keep[finite] = np.abs(k[finite] - stats.mean) <= n_sigma * std
    return keep


# --------------------------------------------------------------------------------------------
# Spatial model
# --------------------------------------------------------------------------------------------


def spatial_terms(order: int) -> list[tuple[int, int]]:
    """Spatial terms ``(i, j)`` = :math:`T_i(u) T_j(v)` of total degree <= ``order``.

    Ordered by total degree, then by decreasing power of :math:`u` (= x):
    ``(0,0), (1,0), (0,1), (2,0), (1,1), (0,2), …``; ``(order+1)(order+2)/2`` terms.

    Examples
    --------
    >>> spatial_terms(1)
    [(0, 0), (1, 0), (0, 1)]
    """
    if order < 0:
        msg = f"spatial order must be >= 0, got {order}"
        raise ValueError(msg)
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def _check_bbox(bbox: Sequence[float]) -> BBox:
    if len(bbox) != 4:
        msg = f"bbox must be (x_min, y_min, x_max, y_max), got {bbox!r}"
        raise ValueError(msg)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0):
        msg = f"bbox must have x_max > x_min and y_max > y_min, got {bbox!r}"
        raise ValueError(msg)
    return x0, y0, x1, y1


def spatial_functions(
    x: ArrayLike,
    y: ArrayLike,
    *,
    order: int,
    bbox: Sequence[float],
    kind: SpatialKind = "chebyshev",
) -> NDArray[np.float64]:
    r"""Evaluate all spatial terms at positions.

    Parameters
    ----------
    x, y : array_like
        Positions (column, row), broadcastable to a common shape.
    order : int
        Maximum total degree.
    bbox : tuple of float
        ``(x_min, y_min, x_max, y_max)``; mapped linearly onto :math:`[-1, 1]^2`:
        :math:`u = 2 (x - x_{\min})/(x_{\max} - x_{\min}) - 1`, likewise :math:`v`.
    kind : {"chebyshev", "polynomial"}, optional
        :math:`T_i(u) T_j(v)` (Chebyshev polynomials of the first kind) or :math:`u^i v^j`.

    Returns
    -------
    ndarray of shape (n_terms, *shape)
        Terms in :func:`spatial_terms` order.
    """
    x0, y0, x1, y1 = _check_bbox(bbox)
    xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    shape = xa.shape
    u = (2.0 * (xa - x0) / (x1 - x0) - 1.0).reshape(-1)
    v = (2.0 * (ya - y0) / (y1 - y0) - 1.0).reshape(-1)
    if kind == "chebyshev":
        tu = np.polynomial.chebyshev.chebvander(u, order)
        tv = np.polynomial.chebyshev.chebvander(v, order)
    elif kind == "polynomial":
        tu = np.polynomial.polynomial.polyvander(u, order)
        tv = np.polynomial.polynomial.polyvander(v, order)
    else:
        msg = f"kind must be 'chebyshev' or 'polynomial', got {kind!r}"
        raise ValueError(msg)
    terms = np.stack([tu[:, i] * tv[:, j] for i, j in spatial_terms(order)], axis=0)
    return terms.reshape(-1, *shape)


@attrs.frozen
class SpatialSolution:
    r"""Spatially varying kernel coefficients and background (:func:`solve_spatial`).

    :math:`a_j(x, y) = \sum_t c_{jt}\,p_t(x, y)` and :math:`b_g(x, y) = \sum_s g_s q_s(x, y)`
    with :math:`p, q` = :func:`spatial_functions` of orders ``kernel_order`` and
    ``background_order``. This is the layout of ``skydiff.kernel.BasisKernel``.

    Attributes
    ----------
    coefficients : ndarray of shape (m_k, n_kernel_terms)
        :math:`c_{jt}`; with ``constant_first`` row 0 has only its constant term.
    background : ndarray of shape (n_background_terms,)
        :math:`g_s` (zeros when no background was fitted).
    kernel_order, background_order : int
        Spatial orders.
    bbox : tuple of float
        ``(x_min, y_min, x_max, y_max)`` of the coordinate mapping.
    kind : {"chebyshev", "polynomial"}
        Spatial function family.
    constant_first, fit_background : bool
        Model options used.
    condition_number : float
        Eigenvalue ratio of the spatial normal matrix (equilibrated unless disabled).
    n_parameters, n_stamps : int
        Free parameters and stamps used.
    """

    coefficients: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    background: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    kernel_order: int
    background_order: int
    bbox: BBox
    kind: SpatialKind
    constant_first: bool
    fit_background: bool
    condition_number: float
    n_parameters: int
    n_stamps: int

    def coefficients_at(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Kernel coefficients at positions, shape ``(*shape, m_k)``."""
        p = spatial_functions(x, y, order=self.kernel_order, bbox=self.bbox, kind=self.kind)
        return np.moveaxis(np.tensordot(self.coefficients, p, axes=([1], [0])), 0, -1)

    def background_at(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Background at positions."""
        q = spatial_functions(x, y, order=self.background_order, bbox=self.bbox, kind=self.kind)
        return np.tensordot(self.background, q, axes=([0], [0]))


def solve_spatial(
    matrices: ArrayLike,
    vectors: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    spatial_kernel_order: int,
    spatial_bg_order: int,
    bbox: Sequence[float],
    fit_background: bool = True,
    constant_first: bool = True,
    kind: SpatialKind = "chebyshev",
    equilibrate: bool = True,
) -> SpatialSolution:
    r"""Joint spatial least squares from per-stamp normal equations (``SpatialKernelSolution``).

    Parameters
    ----------
    matrices : array_like of shape (n, m, m)
        Per-stamp :math:`M_c` (last row/column = background when ``fit_background``).
    vectors : array_like of shape (n, m)
        Per-stamp :math:`b_c`.
    x, y : array_like of shape (n,)
        Stamp centres.
    spatial_kernel_order, spatial_bg_order : int
        Orders :math:`n_k`, :math:`n_b` of the coefficient and background functions.
    bbox : tuple of float
        ``(x_min, y_min, x_max, y_max)`` for the coordinate mapping.
    fit_background : bool, optional
        Whether the last local parameter is the background.
    constant_first : bool, optional
        Make the first basis coefficient spatially constant (AL and PCA bases, whose other
        kernels have zero sum: the kernel sum is then constant over the image).
    kind : {"chebyshev", "polynomial"}, optional
        Spatial function family.
    equilibrate : bool, optional
        Jacobi scaling for the solve and the condition number.

    Returns
    -------
    SpatialSolution

    Raises
    ------
    ValueError
        For inconsistent shapes or no stamps.

    Notes
    -----
    With :math:`\theta` the spatial parameters and :math:`\Phi_c` the ``(m, P)`` matrix mapping
    them to the local parameters at stamp :math:`c` (row :math:`j` holds :math:`p(x_c, y_c)` in
    the columns of basis :math:`j`, the background row :math:`q(x_c, y_c)`), the global
    weighted least squares :math:`\sum_c \lVert I_c - C_c \Phi_c \theta\rVert^2_{W_c}` (the
    kernel assumed constant across each stamp) has the normal equations

    .. math::

        \Big(\sum_c \Phi_c^T M_c \Phi_c\Big)\theta = \sum_c \Phi_c^T b_c,

    i.e. blocks :math:`\sum_c (M_c)_{jk}\, p_c p_c^T` (kernel-kernel),
    :math:`\sum_c (M_c)_{j,bg}\, p_c q_c^T` and :math:`\sum_c (M_c)_{bg,bg}\, q_c q_c^T`
    (Alard 2000). They are assembled with one matrix product over stamps per block. The
    parameter count is :math:`(m_k - 1) n_{kt} + 1 + n_{bt}` with ``constant_first``.
    """
    m_arr = np.asarray(matrices, dtype=np.float64)
    b_arr = np.asarray(vectors, dtype=np.float64)
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y, dtype=np.float64).reshape(-1)
    if b_arr.ndim != 2 or b_arr.shape[0] == 0:
        msg = f"vectors must have shape (n, m) with n >= 1, got {b_arr.shape}"
        raise ValueError(msg)
    n, m = b_arr.shape
    if m_arr.shape != (n, m, m) or xs.shape != (n,) or ys.shape != (n,):
        msg = f"inconsistent shapes: M {m_arr.shape}, b {b_arr.shape}, x {xs.shape}"
        raise ValueError(msg)
    bbox_t = _check_bbox(bbox)
    m_k = m - int(fit_background)
    if m_k < 1:
        msg = "at least one kernel basis function is required"
        raise ValueError(msg)
    p = spatial_functions(xs, ys, order=spatial_kernel_order, bbox=bbox_t, kind=kind).T
    n_kt = p.shape[1]
    # kernel-kernel block: sum_c M[c,j,k] p[c,t] p[c,s] -> (j, t, k, s)
    pp = (p[:, :, None] * p[:, None, :]).reshape(n, n_kt * n_kt)
    kk = serial_matmul(m_arr[:, :m_k, :m_k].reshape(n, m_k * m_k).T, pp)
    kk = kk.reshape(m_k, m_k, n_kt, n_kt).transpose(0, 2, 1, 3).reshape(m_k * n_kt, m_k * n_kt)
    rhs_k = (b_arr[:, :m_k].T @ p).reshape(m_k * n_kt)
    if fit_background:
        q = spatial_functions(xs, ys, order=spatial_bg_order, bbox=bbox_t, kind=kind).T
        n_bt = q.shape[1]
        pq = (p[:, :, None] * q[:, None, :]).reshape(n, n_kt * n_bt)
        kb = (m_arr[:, :m_k, m_k].T @ pq).reshape(m_k * n_kt, n_bt)
        bb = (q * m_arr[:, m_k, m_k][:, None]).T @ q
        full = np.block([[kk, kb], [kb.T, bb]])
        rhs = np.concatenate([rhs_k, b_arr[:, m_k] @ q])
    else:
        n_bt = len(spatial_terms(spatial_bg_order))
        full = kk
        rhs = rhs_k
    keep = np.ones(full.shape[0], dtype=bool)
    if constant_first:
        keep[1:n_kt] = False
    sub = full[np.ix_(keep, keep)]
    theta_sub, cond = _solve_symmetric(sub[None], rhs[keep][None], equilibrate=equilibrate)
    theta = np.zeros(full.shape[0])
    theta[keep] = theta_sub[0]
    coefficients = theta[: m_k * n_kt].reshape(m_k, n_kt)
    background = theta[m_k * n_kt:] if fit_background else np.zeros(n_bt)
    return SpatialSolution(
        coefficients=coefficients,
        background=background,
        kernel_order=spatial_kernel_order,
        background_order=spatial_bg_order,
        bbox=bbox_t,
        kind=kind,
        constant_first=constant_first,
        fit_background=fit_background,
        condition_number=float(cond[0]),
        n_parameters=int(keep.sum()),
        n_stamps=n,
    )


# --------------------------------------------------------------------------------------------
# The iterative candidate loop
# --------------------------------------------------------------------------------------------


@attrs.frozen
class KernelFitResult:
    """Outcome of :func:`fit_psf_matching_kernel`.

    Attributes
    ----------
    basis : ndarray of shape (m_k, K_r, K_c)
        Basis of the spatial solution (the PCA basis when ``use_pca``).
    spatial : SpatialSolution
        Spatial coefficients, background coefficients and spatial condition number.
    used : ndarray of bool, shape (n_stamps,)
        Candidates that entered the final spatial fit.
    rejection_reasons : ndarray of str, shape (n_stamps,)
        ``""`` for used candidates, else one of :data:`REJECTION_REASONS`.
    n_iterations : int
        Spatial iterations performed.
    stamp_kernel_sums : ndarray of shape (n_stamps,)
        Kernel sums of the single-stamp solutions (original basis).
    kernel_sum_mean, kernel_sum_std : float
        Clipped statistics of the kernel sums of the used candidates.
    kernel_sum_center : float
        Kernel sum of the spatial solution at the centre of ``bbox``.
    stamp_condition_numbers : ndarray of shape (n_stamps,)
        Condition numbers of the single-stamp systems.
    stamp_lambdas : ndarray of shape (n_stamps,)
        Regularisation strength of the single-stamp solutions (0 without).
    stamp_residual_mean, stamp_residual_std : ndarray of shape (n_stamps,)
        Residual statistics of the single-stamp solutions.
    spatial_residual_mean, spatial_residual_std : ndarray of shape (n_stamps,)
        Residual statistics of the spatial solution from the last assessment in which each
        stamp took part (so a ``spatial_residual`` rejection shows why); NaN where never
        assessed.
    """

    basis: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    spatial: SpatialSolution
    used: NDArray[np.bool_] = attrs.field(
        converter=_array_bool, eq=_ARRAY_EQ, hash=False, repr=False
    )
    rejection_reasons: NDArray[np.str_] = attrs.field(
        converter=_array_str, eq=_ARRAY_EQ, hash=False, repr=False
    )
    n_iterations: int
    stamp_kernel_sums: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    kernel_sum_mean: float
    kernel_sum_std: float
    kernel_sum_center: float
    stamp_condition_numbers: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    stamp_lambdas: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    stamp_residual_mean: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    stamp_residual_std: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    spatial_residual_mean: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )
    spatial_residual_std: NDArray[np.float64] = attrs.field(
        converter=_array64, eq=_ARRAY_EQ, hash=False, repr=False
    )

    @property
    def coefficients(self) -> NDArray[np.float64]:
        """Spatial kernel coefficients ``(m_k, n_kernel_terms)``."""
        return self.spatial.coefficients

    @property
    def background_coefficients(self) -> NDArray[np.float64]:
        """Spatial background coefficients ``(n_background_terms,)``."""
        return self.spatial.background

    @property
    def spatial_condition_number(self) -> float:
        """Condition number of the spatial normal matrix."""
        return self.spatial.condition_number

    @property
    def n_used(self) -> int:
        """Number of candidates in the final fit."""
        return int(self.used.sum())

    def kernel_image_at(self, x: float, y: float) -> NDArray[np.float64]:
        """Kernel image of the spatial solution at one position."""
        return kernel_images(self.basis, self.spatial.coefficients_at(x, y))


def _reason_counts(reasons: NDArray[np.str_]) -> dict[str, int]:
    return {f"n_rejected_{r}": int(np.sum(reasons == r)) for r in REJECTION_REASONS}


def _residual_bad(
    stats: ResidualStats, mean_max: float, std_max: float
) -> NDArray[np.bool_]:
    ok = (np.isfinite(stats.mean) & np.isfinite(stats.std) & (np.abs(stats.mean) <= mean_max)
          & (stats.std <= std_max))
    return ~ok


def fit_psf_matching_kernel(
    stamps: StampSet,
    basis: ArrayLike,
    *,
    bbox: Sequence[float],
    spatial_kernel_order: int = 1,
    spatial_bg_order: int = 2,
    spatial_kind: SpatialKind = "chebyshev",
    fit_background: bool = True,
    constant_first: bool | None = None,
    weighting: Weighting = "constant",
    regularization: Regularization | None = None,
    use_pca: bool = False,
    n_pca_components: int = 5,
    subtract_mean_for_pca: bool = True,
    max_iterations: int = 3,
    single_kernel_clipping: bool = True,
    spatial_kernel_clipping: bool = True,
    kernel_sum_clipping: bool = True,
    residual_mean_max: float = 0.25,
    residual_std_max: float = 1.5,
    core_radius: int | None = None,
    max_ksum_sigma: float = 3.0,
    stamp_condition_max: float | None = None,
    condition_max: float | None = None,
    min_candidates: int = 1,
    equilibrate: bool = True,
    single_precision: bool = False,
) -> KernelFitResult:
    r"""Fit a spatially varying PSF-matching kernel with candidate rejection (``_solve``).

    Parameters
    ----------
    stamps : StampSet
        Kernel candidates (brightest first does not matter: all are used).
    basis : array_like of shape (m_k, K_r, K_c)
        Basis kernels (AL, DF, ...).
    bbox : tuple of float
        ``(x_min, y_min, x_max, y_max)`` of the spatial coordinate mapping (the image).
    spatial_kernel_order, spatial_bg_order : int, optional
        Spatial orders (subtraction-task defaults 1 and 2).
    spatial_kind : {"chebyshev", "polynomial"}, optional
        Spatial function family.
    fit_background : bool, optional
        Fit a background (per stamp and spatially).
    constant_first : bool or None, optional
        Spatially constant first coefficient; ``None`` = automatic: True when every basis
        kernel but the first sums to zero (AL, PCA), False otherwise (DF). Always True for the
        PCA basis.
    weighting : {"constant", "pixel"}, optional
        Weights of the per-stamp fits (see :func:`build_normal_equations`).
    regularization : Regularization, optional
        Regularisation of the single-stamp solves (DF). The spatial fit is unregularised, as
        upstream; combine DF with ``use_pca=True`` for a smooth spatial model.
    use_pca : bool, optional
        Replace the basis by the PCA of the single-stamp kernels before the spatial fit.
    n_pca_components : int, optional
        PCA basis size including the mean (``numPrincipalComponents``).
    subtract_mean_for_pca : bool, optional
        ``subtractMeanForPca``.
    max_iterations : int, optional
        Maximum spatial iterations (1..5 upstream).
    single_kernel_clipping, spatial_kernel_clipping, kernel_sum_clipping : bool, optional
        Enable the three rejection steps.
    residual_mean_max, residual_std_max : float, optional
        Rejection limits on the mean and rms of the normalised residuals.
    core_radius : int, optional
        Residual statistics in the central ``(2 r + 1)²`` box only.
    max_ksum_sigma : float, optional
        Kernel-sum rejection threshold in clipped standard deviations.
    stamp_condition_max : float, optional
        Reject candidates whose system is worse conditioned (``checkConditionNumber``).
    condition_max : float, optional
        Raise :class:`IllConditionedError` if the spatial system is worse conditioned.
    min_candidates : int, optional
        Minimum number of candidates for a spatial fit (>= 1).
    equilibrate : bool, optional
        Use Jacobi-scaled condition numbers (see :func:`condition_numbers`).
    single_precision : bool, optional
        Compute the convolved basis images :math:`B_j \otimes T` of the design with
        single-precision FFTs (2-4 times faster); products and solves stay in double
        precision. The design then carries a relative error of about :math:`10^{-7}`, the
        precision of the float32 images and of the full-image convolution the kernel is
        applied with; it changes the fitted model :math:`\kappa\otimes T` by that much, but
        poorly determined directions of the coefficients (condition number :math:`c`) by up
        to :math:`c \cdot 10^{-7}`, so exact-arithmetic tests keep the default.

    Returns
    -------
    KernelFitResult

    Raises
    ------
    NoKernelCandidatesError
        When fewer than ``min_candidates`` candidates remain at any stage.
    IllConditionedError
        When the spatial condition number exceeds ``condition_max``.
    ValueError
        For invalid options or inputs.

    Notes
    -----
    1. Every stamp is solved once on its own (optionally regularised); failed solves, condition
       violations and residual outliers (:math:`|\bar r| >` ``residual_mean_max`` or
       :math:`s_r >` ``residual_std_max``) are rejected.
    2. Kernel sums of the remaining candidates are clipped (:func:`clip_kernel_sums`)
       repeatedly until nothing more is rejected.
    3. With ``use_pca`` a PCA basis is built from the surviving kernels, every candidate is
       refit with it and residual outliers are rejected; any rejection restarts at step 2.
    4. The spatial model is solved (:func:`solve_spatial`) on the survivors, evaluated at each
       candidate centre and assessed with the same residual criteria.
    5. Without rejections the loop ends; otherwise it restarts at step 2 until
       ``max_iterations`` spatial solutions have been made, after which one final spatial fit
       on the survivors is returned.

    Stamp templates are Fourier transformed once for the whole loop.
    """
    if max_iterations < 1:
        msg = f"max_iterations must be >= 1, got {max_iterations}"
        raise ValueError(msg)
    if min_candidates < 1:
        msg = f"min_candidates must be >= 1, got {min_candidates}"
        raise ValueError(msg)
    b0 = _as_basis(basis)
    bbox_t = _check_bbox(bbox)
    n = stamps.n_stamps
    design = _StampDesign(stamps, (b0.shape[1], b0.shape[2]),
                          single_precision=single_precision)
    needs_noise = (regularization is not None and regularization.lambda_type.startswith("min")
                   and weighting != "pixel")
    ne = design.normal_equations(b0, fit_background=fit_background, weighting=weighting,
                                 with_noise=needs_noise)
    single = _solve_local(design, b0, ne, regularization=regularization,
                          core_radius=core_radius, equilibrate=equilibrate)
    reasons = np.full(n, "", dtype="<U16")
    reasons[~single.solved] = "solve_failed"
    if stamp_condition_max is not None:
        bad = (reasons == "") & ~(single.condition_numbers <= stamp_condition_max)
        reasons[bad] = "condition"
    if single_kernel_clipping:
        bad = (reasons == "") & _residual_bad(single.residuals, residual_mean_max,
                                              residual_std_max)
        reasons[bad] = "residual"

    if constant_first is None:
        sums = b0.sum(axis=(1, 2))
        scale = np.abs(b0).sum(axis=(1, 2))
        constant_first = bool(np.all(np.abs(sums[1:]) <= 1e-6 * scale[1:]))

    def require(stage: str, iteration: int) -> None:
        n_used = int(np.sum(reasons == ""))
        if n_used < min_candidates:
            msg = (f"only {n_used} kernel candidate(s) left at stage {stage!r} "
                   f"(need {min_candidates}); provide more isolated, unmasked stars or relax "
                   f"the rejection limits")
            raise NoKernelCandidatesError(
                msg, stage=stage, iteration=iteration, n_stamps=n, n_used=n_used,
                min_candidates=min_candidates, **_reason_counts(reasons),
            )

    def spatial_fit(spatial_ne: NormalEquations, first_const: bool, iteration: int
                    ) -> SpatialSolution:
        idx = np.flatnonzero(reasons == "")
        sol = solve_spatial(
            spatial_ne.matrix[idx], spatial_ne.vector[idx], stamps.x[idx], stamps.y[idx],
            spatial_kernel_order=spatial_kernel_order, spatial_bg_order=spatial_bg_order,
            bbox=bbox_t, fit_background=fit_background, constant_first=first_const,
            kind=spatial_kind, equilibrate=equilibrate,
        )
        if condition_max is not None and not sol.condition_number <= condition_max:
            msg = (f"spatial kernel system has condition number {sol.condition_number:.3g} > "
                   f"{condition_max:.3g}; lower the spatial orders, use a smaller basis or "
                   f"more widely spread candidates")
            raise IllConditionedError(
                msg, condition_number=float(sol.condition_number),
                condition_max=float(condition_max), iteration=iteration,
                n_used=int(idx.size), n_parameters=sol.n_parameters,
            )
        return sol

    spatial_basis = b0
    spatial_ne = ne
    first_const = constant_first
    spatial_mean = np.full(n, np.nan)
    spatial_std = np.full(n, np.nan)
    n_iter = 0
    require("single", 0)
    while True:
        if kernel_sum_clipping:
            while True:
                idx = np.flatnonzero(reasons == "")
                if idx.size == 0:
                    break
                keep = clip_kernel_sums(single.kernel_sums[idx], n_sigma=max_ksum_sigma)
                if keep.all():
                    break
                reasons[idx[~keep]] = "kernel_sum"
        require("kernel_sum", n_iter)
        if use_pca:
            idx = np.flatnonzero(reasons == "")
            kimg = kernel_images(b0, single.coefficients[idx])
            spatial_basis = pca_basis(kimg, n_components=n_pca_components,
                                      subtract_mean=subtract_mean_for_pca)
            spatial_ne = design.normal_equations(spatial_basis, fit_background=fit_background,
                                                 weighting=weighting, with_noise=False)
            pca_sol = _solve_local(design, spatial_basis, spatial_ne, regularization=None,
                                   core_radius=core_radius, equilibrate=equilibrate)
            bad = (reasons == "") & ~pca_sol.solved
            if single_kernel_clipping:
                bad |= (reasons == "") & _residual_bad(pca_sol.residuals, residual_mean_max,
                                                       residual_std_max)
            first_const = True
            if bad.any():
                reasons[bad] = "pca_residual"
                require("pca", n_iter)
                continue
        spatial = spatial_fit(spatial_ne, first_const, n_iter)
        n_iter += 1
        if not spatial_kernel_clipping:
            break
        idx = np.flatnonzero(reasons == "")
        local = spatial.coefficients_at(stamps.x[idx], stamps.y[idx])
        bg = (spatial.background_at(stamps.x[idx], stamps.y[idx]) if fit_background
              else np.zeros(idx.size))
        stats = design.residual_stats(kernel_images(spatial_basis, local), bg, index=idx,
                                      core_radius=core_radius)
        spatial_mean[idx] = stats.mean
        spatial_std[idx] = stats.std
        bad = _residual_bad(stats, residual_mean_max, residual_std_max)
        if not bad.any():
            break
        reasons[idx[bad]] = "spatial_residual"
        require("spatial", n_iter)
        if n_iter >= max_iterations:
            spatial = spatial_fit(spatial_ne, first_const, n_iter)
            break

    used = reasons == ""
    stats_k = clipped_stats(single.kernel_sums[used])
    cx, cy = 0.5 * (bbox_t[0] + bbox_t[2]), 0.5 * (bbox_t[1] + bbox_t[3])
    ksum_center = float(spatial.coefficients_at(cx, cy) @ spatial_basis.sum(axis=(1, 2)))
    return KernelFitResult(
        basis=spatial_basis,
        spatial=spatial,
        used=used,
        rejection_reasons=reasons,
        n_iterations=n_iter,
        stamp_kernel_sums=single.kernel_sums,
        kernel_sum_mean=stats_k.mean,
        kernel_sum_std=stats_k.std,
        kernel_sum_center=ksum_center,
        stamp_condition_numbers=single.condition_numbers,
        stamp_lambdas=single.lambdas,
        stamp_residual_mean=single.residuals.mean,
        stamp_residual_std=single.residuals.std,
        spatial_residual_mean=spatial_mean,
        spatial_residual_std=spatial_std,
    )
