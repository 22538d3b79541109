r"""The ``kernel_basis`` plugins ``al`` (Alard–Lupton) and ``df`` (delta functions).

Both turn the widths of the two PSFs into the basis images of a PSF-matching kernel
:math:`\kappa = \sum_j a_j B_j`:

``al``
    Gaussians times 2-D monomials (Alard & Lupton 1998), with widths and size from the two
    FWHMs by the continuous rule of ``lsst.ip.diffim`` (:func:`._basis.alard_lupton_sigmas`),
    renormalised so that the photometric scale :math:`\sum\kappa` is the first coefficient.
``df``
    one basis image per kernel pixel with a Tikhonov smoothness penalty
    :math:`\lambda\,a^T H a` (Becker et al. 2012); the result carries :math:`H` and, in its
    metadata, how :math:`\lambda` is to be chosen.

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
.. [2] Alard, C. 2000, A&AS 144, 363.
.. [3] Becker, A. C. et al. 2012, MNRAS 425, 1341.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import skydiff

from ._basis import (
    alard_lupton_basis,
    alard_lupton_kernel_size,
    alard_lupton_sigmas,
    central_difference_matrix,
    delta_function_basis,
    forward_difference_matrix,
)

__all__ = ["AlBasisConfig", "AlKernelBasis", "DfBasisConfig", "DfKernelBasis"]


def _odd(value: int) -> bool:
    return value >= 1 and value % 2 == 1


def _check_fwhm(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        msg = f"{name} must be a number of pixels or None, got {value!r}"
        raise skydiff.InputError(msg) from exc
    if not (math.isfinite(number) and number > 0):
        msg = f"{name} must be a positive, finite FWHM in pixels, got {value!r}"
        raise skydiff.InputError(msg)
    return number


@skydiff.configclass
class AlBasisConfig(skydiff.Config):
    """Settings of the Alard–Lupton basis (``PsfMatchConfigAL`` of ``lsst.ip.diffim``)."""

    kernel_size: int = skydiff.Field(
        21, check=_odd,
        doc="Kernel size K (odd) when the basis is not scaled by the FWHMs (kernelSize).")
    scale_by_fwhm: bool = skydiff.Field(
        True, doc="Derive the Gaussian widths and the kernel size from the two PSF FWHMs "
                  "(scaleByFwhm); otherwise use `sigmas` and `kernel_size`.")
    kernel_size_fwhm_scaling: float = skydiff.RangeField(
        6.0, min=1.0, doc="Kernel size in units of the largest Gaussian width "
                          "(kernelSizeFwhmScaling).")
    kernel_size_min: int = skydiff.Field(
        21, check=_odd, doc="Smallest kernel size (odd) when scaling by FWHM (kernelSizeMin).")
    kernel_size_max: int = skydiff.Field(
        35, check=_odd, doc="Largest kernel size (odd) when scaling by FWHM (kernelSizeMax).")
    n_gauss: int = skydiff.RangeField(3, min=1,
                                      doc="Number of Gaussians (alardNGauss).")
    degrees: tuple[int, ...] = skydiff.ListField(
        (4, 2, 2), min_length=1, item_check=lambda d: d >= 0,
        doc="Polynomial degree of each Gaussian (alardDegGauss); length n_gauss.")
    sigmas: tuple[float, ...] = skydiff.ListField(
        (0.7, 1.5, 3.0), min_length=1, item_check=lambda s: s > 0,
        doc="Gaussian widths in pixels when the FWHMs are unknown, equal, or scaling is off "
            "(alardSigGauss); length n_gauss.")
    beta: float = skydiff.RangeField(
        2.0, min=1.0, inclusive_min=False,
        doc="Ratio between successive Gaussian widths (alardGaussBeta).")
    min_sigma: float = skydiff.RangeField(
        0.7, min=0.0, inclusive_min=False,
        doc="Floor of the smallest width when the template is convolved to a broader PSF "
            "(alardMinSig).")
    min_sigma_deconv: float = skydiff.RangeField(
        0.4, min=0.0, inclusive_min=False,
        doc="Floor of the smallest width when the convolved image has the broader PSF "
            "(alardMinSigDeconv).")
    max_basis_condition: float = skydiff.RangeField(
        1e8, min=0.0,
        doc="Largest allowed condition number of the Gram matrix of the zero-sum basis "
            "functions; above it they are replaced by their orthonormal principal directions "
            "and the numerically degenerate ones dropped (narrow Gaussians times high-degree "
            "polynomials are nearly linearly dependent). 0 keeps the basis as built.")

    def _validate(self) -> None:
        if len(self.degrees) != self.n_gauss or len(self.sigmas) != self.n_gauss:
            msg = (f"kernel_basis.al: degrees ({len(self.degrees)}) and sigmas "
                   f"({len(self.sigmas)}) must both have n_gauss = {self.n_gauss} entries")
            raise skydiff.ConfigError(msg)
        if self.kernel_size_min > self.kernel_size_max:
            msg = (f"kernel_basis.al: kernel_size_min ({self.kernel_size_min}) exceeds "
                   f"kernel_size_max ({self.kernel_size_max})")
            raise skydiff.ConfigError(msg)


class AlKernelBasis(skydiff.KernelBasisGenerator):
    r"""Alard–Lupton basis: Gaussians times monomials, sized from the two PSF FWHMs.

    With :math:`\sigma_t, \sigma_r` the Gaussian widths of the convolved ("target") and the
    matched-to ("reference") image, the matching kernel of two Gaussian PSFs has width
    :math:`\sigma_k = \sqrt{|\sigma_r^2 - \sigma_t^2|}` (floored at ``min_sigma``, or
    ``min_sigma_deconv`` when :math:`\sigma_t > \sigma_r`), and the basis widths are

    .. math::

        \sigma_0 = \max(\sigma_{\min}, \sigma_k/\beta),\qquad \sigma_i = \beta\,\sigma_{i-1},

    a continuous function of the two FWHMs (the 2026 ``_calculateBasisSigmas`` of
    ``lsst.ip.diffim``; the older rule jumped and destabilised near-equal seeing). The kernel
    size is :math:`K = \operatorname{clip}(\mathrm{odd}(\lfloor s\,\sigma_{\max}\rfloor),
    K_{\min}, K_{\max})`. Basis images are :math:`B_{i,a,b} = u^a v^b G_{\sigma_i}` with
    :math:`u, v \in [-1, 1]` across the kernel, renormalised (``renormalizeKernelList``) so
    that :math:`\sum B_0 = 1` and :math:`\sum B_j = 0,\ \lVert B_j\rVert_2 = 1` for
    :math:`j > 0`: the kernel sum is the first coefficient, held spatially constant.

    The result's ``metadata`` holds ``mode`` ("config", "equal", "convolution",
    "deconvolution"), ``sigmas``, ``kernel_size``, ``n_basis`` and ``kind = "al"``.

    References
    ----------
    .. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
    .. [2] lsst/ip_diffim ``makeKernelBasisList.py`` (``generateAlardLuptonBasisList``).
    """

    name = "al"
    ConfigClass = AlBasisConfig

    def run(self, *, target_fwhm: float | None, reference_fwhm: float | None
            ) -> skydiff.KernelBasisResult:
        """Build the basis for convolving an image of ``target_fwhm`` to ``reference_fwhm``.

        Parameters
        ----------
        target_fwhm : float or None
            FWHM (pixels) of the image that is convolved.
        reference_fwhm : float or None
            FWHM (pixels) of the image it is matched to.

        Returns
        -------
        skydiff.KernelBasisResult
            ``basis`` of shape ``(n, K, K)``, ``constant_first=True``, no regularization.

        Raises
        ------
        skydiff.InputError
            If a FWHM is not positive and finite.
        """
        config = self.config
        target = _check_fwhm("target_fwhm", target_fwhm)
        reference = _check_fwhm("reference_fwhm", reference_fwhm)
        if not config.scale_by_fwhm:
            target = reference = None
        sigmas, mode = alard_lupton_sigmas(
            target, reference, n_gauss=config.n_gauss, beta=config.beta,
            min_sigma=config.min_sigma, min_sigma_deconv=config.min_sigma_deconv,
            default_sigmas=config.sigmas)
        if mode == "config":
            size = config.kernel_size
        else:
            size = alard_lupton_kernel_size(sigmas, scaling=config.kernel_size_fwhm_scaling,
                                            size_min=config.kernel_size_min,
                                            size_max=config.kernel_size_max)
        basis = alard_lupton_basis(size, sigmas, config.degrees)
        n_built = int(basis.shape[0])
        if config.max_basis_condition > 0:
            basis = drop_degenerate_directions(basis, max_condition=config.max_basis_condition)
        metadata: dict[str, Any] = {
            "kind": "al", "mode": mode, "sigmas": list(sigmas), "kernel_size": size,
            "n_basis": int(basis.shape[0]), "n_basis_dropped": n_built - int(basis.shape[0]),
            "degrees": list(config.degrees),
            "target_fwhm": float("nan") if target_fwhm is None else float(target_fwhm),
            "reference_fwhm": float("nan") if reference_fwhm is None else float(reference_fwhm),
        }
        return skydiff.KernelBasisResult(basis=basis, constant_first=True, regularization=None,
                                         metadata=metadata)


def drop_degenerate_directions(basis: np.ndarray, *, max_condition: float) -> np.ndarray:
    r"""Replace a nearly degenerate set of zero-sum basis images by its principal directions.

    The first image (unit sum, carrying the photometric scale) is kept. The others
    :math:`B_1 \dots B_n` are zero-sum; when the condition number of their Gram matrix
    :math:`G_{ij} = \langle B_i, B_j \rangle` exceeds ``max_condition``, they are replaced by
    the right singular vectors :math:`v_k` of the matrix whose rows are the flattened
    :math:`B_i`, keeping those with :math:`s_k^2 \ge s_1^2 / \mathrm{max\_condition}`. Linear
    combinations of zero-sum images are zero-sum, so the kernel sum is still the first
    coefficient; the span loses only directions that the data cannot constrain.

    Parameters
    ----------
    basis : ndarray of shape (n, K, K)
        A renormalized Alard–Lupton basis.
    max_condition : float
        Largest allowed Gram condition number (> 1).

    Returns
    -------
    ndarray of shape (m, K, K)
        The basis, unchanged when it is well conditioned, else with ``m <= n`` images.
    """
    if basis.shape[0] < 3:
        return basis
    rows = basis[1:].reshape(basis.shape[0] - 1, -1)
    singular = np.linalg.svd(rows, compute_uv=False)
    if singular[-1] ** 2 * max_condition >= singular[0] ** 2:
        return basis
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    keep = singular**2 * max_condition >= singular[0] ** 2
    directions = vt[keep].reshape(-1, *basis.shape[1:])
    return np.concatenate([basis[:1], directions], axis=0)


_LAMBDA_TYPES = {
    "absolute": "lambda = lambda_value (in the units of the normal matrix: template flux² per "
                "variance, so only meaningful for one data scale)",
    "relative": "lambda = lambda_scaling × tr(M)/tr(H) per stamp (Numerical Recipes 18.5.8)",
    "minimize_biased_risk": "scan the grid and minimise the predictive risk estimated against "
                            "the truncated pseudo-inverse solution (lower variance)",
    "minimize_unbiased_risk": "scan the grid and minimise the unbiased (Stein / Mallows C_L) "
                              "predictive risk estimate",
}


@skydiff.configclass
class DfBasisConfig(skydiff.Config):
    """Settings of the delta-function basis and its regularization (``PsfMatchConfigDF``)."""

    kernel_size: int = skydiff.Field(
        21, check=_odd, doc="Kernel size K (odd); the basis has K² single-pixel kernels.")
    scale_by_fwhm: bool = skydiff.Field(
        False, doc="Size the kernel from the FWHMs with the Alard–Lupton rule (6 × the "
                   "largest width the AL basis would use, clipped to [kernel_size_min, "
                   "kernel_size_max]) instead of `kernel_size`.")
    kernel_size_min: int = skydiff.Field(
        15, check=_odd, doc="Smallest kernel size (odd) when scale_by_fwhm.")
    kernel_size_max: int = skydiff.Field(
        35, check=_odd, doc="Largest kernel size (odd) when scale_by_fwhm.")
    use_regularization: bool = skydiff.Field(
        True, doc="Penalise rough kernels with lambda a^T H a (useRegularization).")
    regularization_type: str = skydiff.ChoiceField(
        "central", allowed={"central": "Laplacian (second central difference) stencil",
                            "forward": "sum of forward differences of the given orders"},
        doc="Finite-difference operator B of H = BᵀB (regularizationType).")
    stencil: int = skydiff.ChoiceField(
        9, allowed={5: "5-point Laplacian", 9: "9-point Laplacian"},
        doc="Stencil of the central-difference operator (centralRegularizationStencil).")
    orders: tuple[int, ...] = skydiff.ListField(
        (1, 2), min_length=1, item_check=lambda o: 1 <= o <= 3,
        doc="Orders (1..3) of the forward-difference operator (forwardRegularizationOrders).")
    border_penalty: float = skydiff.RangeField(
        3.0, min=0.0, doc="Penalty on the kernel's outer border pixels "
                          "(regularizationBorderPenalty).")
    lambda_type: str = skydiff.ChoiceField(
        "minimize_unbiased_risk", allowed=_LAMBDA_TYPES,
        doc="How the regularization strength lambda is chosen per stamp (lambdaType).")
    lambda_value: float = skydiff.RangeField(
        0.2, min=0.0, inclusive_min=False, doc="lambda for lambda_type = 'absolute'.")
    lambda_scaling: float = skydiff.RangeField(
        1e-4, min=0.0, inclusive_min=False, doc="Scale for lambda_type = 'relative'.")
    lambda_min: float = skydiff.Field(
        -4.0, doc="Start of the risk-scan grid (log10 units for a log grid).")
    lambda_max: float = skydiff.Field(
        4.0, doc="End of the risk-scan grid (log10 units for a log grid).")
    lambda_step: float = skydiff.RangeField(
        0.1, min=0.0, inclusive_min=False, doc="Step of the risk-scan grid.")
    lambda_step_type: str = skydiff.ChoiceField(
        "log", allowed={"log": "grid in log10(lambda)", "linear": "grid in lambda"},
        doc="Spacing of the risk-scan grid (lambdaStepType).")
    lambda_grid_scale: str = skydiff.ChoiceField(
        "relative", allowed={"relative": "grid values multiply tr(M)/tr(H) of each stamp",
                             "absolute": "grid values are lambdas"},
        doc="Whether the risk-scan grid is relative to the data scale (recommended: lambda "
            "carries the units of the normal matrix).")
    max_condition: float = skydiff.RangeField(
        1e4, min=1.0, inclusive_min=False,
        doc="Truncation (eigenvalue ratio) of the reference solution of the biased risk.")

    def _validate(self) -> None:
        if self.kernel_size_min > self.kernel_size_max:
            msg = (f"kernel_basis.df: kernel_size_min ({self.kernel_size_min}) exceeds "
                   f"kernel_size_max ({self.kernel_size_max})")
            raise skydiff.ConfigError(msg)
        if self.lambda_max < self.lambda_min:
            msg = (f"kernel_basis.df: lambda_max ({self.lambda_max}) < lambda_min "
                   f"({self.lambda_min})")
            raise skydiff.ConfigError(msg)
        if self.lambda_step_type == "linear" and self.lambda_min <= 0:
            msg = "kernel_basis.df: a linear lambda grid needs lambda_min > 0"
            raise skydiff.ConfigError(msg)


class DfKernelBasis(skydiff.KernelBasisGenerator):
    r"""Delta-function basis with a finite-difference smoothness regularization.

    The basis has one kernel per pixel, :math:`B_{(r,c)} = \delta_{(r,c)}`, so the kernel
    image *is* the coefficient vector. It can represent any kernel (sub-pixel shifts,
    asymmetric PSFs) at the price of :math:`K^2` free parameters per stamp, which is why it is
    solved with the Tikhonov penalty :math:`(M + \lambda H)\,a = b` of Becker et al. (2012),
    :math:`H = B^T B` with :math:`B` a Laplacian (``central``) or a sum of forward differences
    (``forward``), and the border pixels penalised by ``border_penalty``.

    The result carries :math:`H` (with a zero background row and column) in
    ``regularization`` (``None`` when ``use_regularization`` is off) and the settings of the
    :math:`\lambda` choice in ``metadata["regularization"]``; ``constant_first`` is False (the
    kernel sum varies with every coefficient), so subtraction plugins solve the spatial model
    on a PCA basis of the per-stamp kernels (``ip_diffim``'s ``usePcaForSpatialKernel``).

    Unlike ``lsst.ip.diffim``, whose risk-minimising modes read configuration keys that do not
    exist, every ``lambda_type`` works; the risk modes minimise the predictive risk of the
    fitted science stamp with a grid relative to :math:`\operatorname{tr} M/\operatorname{tr}
    H` by default (see ``_solve.Regularization``).

    References
    ----------
    .. [1] Becker, A. C. et al. 2012, MNRAS 425, 1341.
    .. [2] Stein, C. M. 1981, Ann. Statist. 9, 1135.
    """

    name = "df"
    ConfigClass = DfBasisConfig

    def run(self, *, target_fwhm: float | None, reference_fwhm: float | None
            ) -> skydiff.KernelBasisResult:
        """Build the delta-function basis and its regularization matrix.

        Parameters
        ----------
        target_fwhm, reference_fwhm : float or None
            FWHMs (pixels) of the convolved and the matched-to image; used only with
            ``scale_by_fwhm``.

        Returns
        -------
        skydiff.KernelBasisResult
            ``basis`` of shape ``(K², K, K)``, ``constant_first=False`` and the
            ``(K² + 1)²`` matrix :math:`H`.

        Raises
        ------
        skydiff.InputError
            If a FWHM is not positive and finite.
        """
        config = self.config
        target = _check_fwhm("target_fwhm", target_fwhm)
        reference = _check_fwhm("reference_fwhm", reference_fwhm)
        size = config.kernel_size
        if config.scale_by_fwhm and target is not None and reference is not None:
            sigmas, _ = alard_lupton_sigmas(target, reference)
            size = alard_lupton_kernel_size(sigmas, size_min=config.kernel_size_min,
                                            size_max=config.kernel_size_max)
        basis = delta_function_basis(size)
        matrix = None
        if config.use_regularization:
            if config.regularization_type == "central":
                matrix = central_difference_matrix(size, stencil=config.stencil,
                                                   border_penalty=config.border_penalty,
                                                   fit_background=True)
            else:
                matrix = forward_difference_matrix(size, orders=config.orders,
                                                   border_penalty=config.border_penalty,
                                                   fit_background=True)
        metadata: dict[str, Any] = {
            "kind": "df", "kernel_size": size, "n_basis": int(basis.shape[0]),
            "regularization": {
                "enabled": bool(config.use_regularization),
                "type": config.regularization_type,
                "lambda_type": config.lambda_type,
                "lambda_value": config.lambda_value,
                "lambda_scaling": config.lambda_scaling,
                "lambda_min": config.lambda_min,
                "lambda_max": config.lambda_max,
                "lambda_step": config.lambda_step,
                "lambda_step_type": config.lambda_step_type,
                "lambda_grid_scale": config.lambda_grid_scale,
                "max_condition": config.max_condition,
            },
        }
        return skydiff.KernelBasisResult(basis=basis, constant_first=False,
                                         regularization=matrix, metadata=metadata)
