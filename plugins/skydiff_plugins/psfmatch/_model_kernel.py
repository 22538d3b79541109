r"""PSF-matching kernels from two PSF *models* rather than from stars (``ModelPsfMatchTask``).

The kernel source of ``model_psf`` (and of ``al_preconvolve`` with ``kernel_source =
"model_psf"``). Instead of cutting stamps around stars, the two PSF models are evaluated on a
grid of positions covering the image, and each pair of PSF images becomes one kernel
candidate of the usual solver (:func:`._solve.fit_psf_matching_kernel`):

.. math::

    P_r(\mathbf p;\,x_c, y_c) \simeq \sum_j a_j(x_c, y_c)\,(B_j \otimes P_c)(\mathbf p),

with :math:`P_c` the PSF of the image that is convolved and :math:`P_r` the PSF it is matched
to, the :math:`a_j` Chebyshev polynomials of position as for stars. As upstream the PSF images
carry a constant variance and no mask, and every clipping step and condition test is off: no
candidate can be an outlier, and the noise-free normal matrices are nearly singular in the
directions in which :math:`P_c` has no power, which do not change :math:`\kappa\otimes P_c`.
The variance is :math:`(10^{-3}\max P_r)^2` rather than upstream's 1
(:data:`PSF_MODEL_PRECISION`): the Alard–Lupton solution does not depend on it, but the
regularization of the delta-function basis does.

Stamps
------
Both PSF images are zero-padded to a common odd side

.. math::

    S = \max\bigl(\lceil f_\mathrm{pad} K\rceil,\ s_c + 2(K - 1),\ s_r\bigr),

``pad_factor`` :math:`f_\mathrm{pad}` = 1.4 being upstream's ``padPsfFactor`` and
:math:`s_c, s_r` the largest PSF image sides over the grid. The solver fits only the inner
:math:`S - K + 1` box of a stamp, where :math:`B_j\otimes P_c` is computable from the stamp;
the second term makes that box hold the whole support :math:`s_c + K - 1` of
:math:`\kappa\otimes P_c`, so no pixel of the match is lost at the stamp border (the problem
upstream's documentation warns about for kernels larger than half the PSF image). Padding with
zeros is exact: the PSF is zero there.

The grid
--------
The candidates sit on the nodes of a regular grid spanning the image from edge to edge,
spaced by at most ``cell_size`` pixels (upstream's ``sizeCellX/Y`` = 128, whose candidates
sit at the cell centres) and at least ``spatial_kernel_order + 2`` per axis, so that the
spatial polynomials are constrained and interpolate rather than extrapolate to the corners
(:func:`candidate_grid`).

Photometric scale
-----------------
Two unit-sum PSF models say nothing about the photometric scale :math:`k = \sum\kappa` between
the images. It is taken from (``kernel_sum_source``)

* ``calibration``: the exposures' photometric calibrations,
  :math:`k = s_c / s_r` (nJy per count of the convolved image over that of the other);
* ``stars``: the flux ratio of matched stars (:func:`stellar_flux_ratio`): around each star
  the convolved image is convolved with the unit-sum model kernel, after which both images
  have the same PSF, and the same linear PSF photometry is applied to both; the per-star
  ratios are 3σ clipped and averaged with inverse-variance weights. The same linear
  estimator applied to two images of the same PSF measures their ratio without aperture or
  PSF-model bias;
* ``fixed``: ``fixed_kernel_sum`` (upstream's ``kernelSum`` argument);
* ``auto`` (default): calibrations when both exposures have one, else stars, else 1 with a
  note in the metadata.

The fitted kernel is then multiplied by :math:`k/\sum\kappa_\mathrm{fit}`, which keeps its
shape (upstream overwrites the constant coefficient :math:`a_0` of the unit-sum basis image
with the requested sum, which changes the shape by :math:`(k - a_0) B_0`, and then normalises
the convolution, which discards the scale again).

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
.. [2] lsst/ip_diffim ``modelPsfMatch.py`` (``ModelPsfMatchTask``, ``_buildCellSet``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
import numpy as np
import scipy.ndimage
import scipy.signal
from astropy.table import Table

import skydiff

from . import _solve
from ._stats import clipped_stats

__all__ = [
    "KERNEL_SUM_SOURCES",
    "PSF_MODEL_PRECISION",
    "FluxRatio",
    "PsfImage",
    "PsfModelsConfig",
    "calibration_ratio",
    "candidate_grid",
    "describe",
    "fit_model_kernel",
    "grid_table",
    "match_residuals",
    "psf_stamps",
    "scale_kernel",
    "stamp_side",
    "stellar_flux_ratio",
]

#: Where the photometric scale of a model-PSF kernel comes from.
KERNEL_SUM_SOURCES = {
    "auto": "the photometric calibrations when both exposures have one, else the flux ratio "
            "of matched stars, else 1 (with a note in the metadata)",
    "calibration": "the ratio of the photometric calibrations (InputError if one is missing)",
    "stars": "the clipped, inverse-variance weighted flux ratio of matched stars",
    "fixed": "fixed_kernel_sum (upstream's kernelSum argument)",
}

#: Assumed precision of a PSF model, relative to its peak: the candidates' constant
#: "variance" is ``(PSF_MODEL_PRECISION * peak)**2``. The Alard–Lupton fit (constant weights,
#: no regularization) does not depend on it; it sets the regularization strength of the
#: delta-function basis, whose risk-based lambda would treat the PSF images as pure noise
#: with upstream's variance of 1 (a peak of ~0.03) and smooth the kernel flat.
PSF_MODEL_PRECISION = 1e-3

#: A PSF image at a parent position ``(x, y)``: odd, square, float64.
PsfImage = Callable[[float, float], np.ndarray]


@skydiff.configclass
class PsfModelsConfig(skydiff.Config):
    """How a PSF-matching kernel is derived from the two PSF models."""

    cell_size: int = skydiff.RangeField(
        128, min=8, doc="Largest spacing in pixels of the grid of positions where the PSF "
                        "models are evaluated (sizeCellX/Y); the grid spans the image from "
                        "edge to edge with at least spatial_kernel_order + 2 nodes per axis.")
    pad_factor: float = skydiff.RangeField(
        1.4, min=1.0, doc="The PSF images are zero-padded to at least pad_factor × K pixels "
                          "(padPsfFactor) and to the PSF size + 2(K - 1), so that the whole "
                          "support of κ⊗P enters the fit.")
    kernel_sum_source: str = skydiff.ChoiceField(
        "auto", allowed=KERNEL_SUM_SOURCES,
        doc="Where the photometric scale (the kernel sum) comes from.")
    fixed_kernel_sum: float = skydiff.RangeField(
        1.0, min=0.0, inclusive_min=False,
        doc="The kernel sum with kernel_sum_source = 'fixed'.")
    min_photometry_stars: int = skydiff.RangeField(
        3, min=1, doc="Fewest matched stars for the 'stars' scale (kernel_sources."
                      "min_sources overrides it when set).")


def candidate_grid(shape: tuple[int, int], *, cell_size: int, min_per_axis: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    r"""Nodes of a regular grid spanning an image from edge to edge, in array coordinates.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the image.
    cell_size : int
        Largest spacing of the nodes in pixels.
    min_per_axis : int
        Fewest nodes along each axis (>= 2).

    Returns
    -------
    x, y : ndarray of float64, shape (n,)
        Column and row of the nodes, row by row: along the columns
        :math:`x_i = i\,(W - 1)/(n_x - 1)`, :math:`i = 0 \ldots n_x - 1`, with
        :math:`n_x = \max(\lceil (W - 1)/\mathrm{cell}\rceil + 1, n_\min)`; likewise
        along the rows.

    Notes
    -----
    Upstream puts one candidate at the centre of each cell, which leaves the outer half cell
    to polynomial *extrapolation*; nodes on the edges make the spatial model an
    interpolation. For PSFs whose FWHM varies by ±20 % across the field and a kernel of
    spatial order 3 this halves the largest :math:`|\kappa\otimes P_c - P_r|` over the field
    (1.3e-2 instead of 3.9e-2 of the peak when both PSFs vary, 1.7e-3 instead of 3.1e-3
    when one does).
    """
    height, width = shape
    n_min = max(2, int(min_per_axis))
    n_x = max(math.ceil((width - 1) / cell_size) + 1, n_min)
    n_y = max(math.ceil((height - 1) / cell_size) + 1, n_min)
    xs = np.linspace(0.0, width - 1.0, n_x)
    ys = np.linspace(0.0, height - 1.0, n_y)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel(), gy.ravel()


def stamp_side(convolved_size: int, reference_size: int, kernel_size: int, pad_factor: float
               ) -> int:
    """The common odd stamp side :math:`S` of the module notes."""
    side = max(math.ceil(pad_factor * kernel_size), convolved_size + 2 * (kernel_size - 1),
               reference_size)
    return side + 1 - side % 2


def _psf_stack(psf: PsfImage, x: np.ndarray, y: np.ndarray, label: str) -> list[np.ndarray]:
    images = []
    for xc, yc in zip(x, y, strict=True):  # one small image per candidate
        image = np.asarray(psf(float(xc), float(yc)), dtype=np.float64)
        if (image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] % 2 == 0
                or not np.all(np.isfinite(image)) or not image.sum() > 0):
            msg = (f"the {label} PSF model gives a {image.shape} image at ({xc:.1f}, {yc:.1f}) "
                   f"that is not odd, square, finite with a positive sum; fix the PSF model")
            raise skydiff.InputError(msg)
        images.append(image / image.sum())
    return images


def _pad(images: Sequence[np.ndarray], side: int) -> np.ndarray:
    out = np.zeros((len(images), side, side))
    for i, image in enumerate(images):  # centred: pixel [s//2, s//2] -> [S//2, S//2]
        start = (side - image.shape[0]) // 2
        out[i, start:start + image.shape[0], start:start + image.shape[1]] = image
    return out


def psf_stamps(convolved_psf: PsfImage, reference_psf: PsfImage, x: np.ndarray, y: np.ndarray,
               *, kernel_size: int, pad_factor: float) -> _solve.StampSet:
    r"""Kernel candidates made of the two PSF models at the given positions.

    Parameters
    ----------
    convolved_psf, reference_psf : callable
        ``(x, y) -> image``: the PSF of the image that is convolved and of the one it is
        matched to, at a parent position (odd square images; normalised here to unit sum).
    x, y : ndarray of shape (n,)
        Candidate positions in parent coordinates.
    kernel_size : int
        Odd kernel side :math:`K`.
    pad_factor : float
        Upstream's ``padPsfFactor`` (see the module notes).

    Returns
    -------
    _solve.StampSet
        ``template`` = padded :math:`P_c`, ``science`` = padded :math:`P_r`, science variance
        :math:`(\epsilon \max P_r)^2` (:data:`PSF_MODEL_PRECISION` :math:`\epsilon`),
        template variance 0, no masks, ``x``/``y`` the positions.

    Raises
    ------
    skydiff.InputError
        If a PSF model gives an image that is not odd, square, finite with a positive sum.
    """
    conv = _psf_stack(convolved_psf, x, y, "convolved image's")
    ref = _psf_stack(reference_psf, x, y, "reference image's")
    side = stamp_side(max(im.shape[0] for im in conv), max(im.shape[0] for im in ref),
                      kernel_size, pad_factor)
    template = _pad(conv, side)
    science = _pad(ref, side)
    variance = (PSF_MODEL_PRECISION * float(science.max())) ** 2
    return _solve.StampSet(template=template, science=science,
                           science_variance=np.full_like(science, variance),
                           template_variance=np.zeros_like(template), x=x, y=y)


def fit_model_kernel(stamps: _solve.StampSet, basis: np.ndarray, *, bbox: Sequence[float],
                     spatial_kernel_order: int, spatial_kind: str, constant_first: bool,
                     regularization: _solve.Regularization | None = None,
                     use_pca: bool = False, n_pca_components: int = 5,
                     subtract_mean_for_pca: bool = True) -> _solve.KernelFitResult:
    """The spatial kernel matching the PSF candidates (the solver of ``al``, clipping off).

    No background (the PSF images have none), constant weights, no residual,
    kernel-sum or spatial clipping and no condition-number checks, as upstream's
    ``ModelPsfMatchConfig``; the convolutions of the design in double precision (the stamps
    are few and noise-free, and single-precision round-off would leak into the poorly
    constrained directions).

    Raises
    ------
    _solve.NoKernelCandidatesError
        If there are fewer candidates than spatial terms or every solve failed.
    """
    n_terms = (spatial_kernel_order + 1) * (spatial_kernel_order + 2) // 2
    return _solve.fit_psf_matching_kernel(
        stamps, basis, bbox=bbox, spatial_kernel_order=spatial_kernel_order,
        spatial_bg_order=0, spatial_kind=cast(_solve.SpatialKind, spatial_kind),
        fit_background=False, constant_first=constant_first, weighting="constant",
        regularization=regularization, use_pca=use_pca, n_pca_components=n_pca_components,
        subtract_mean_for_pca=subtract_mean_for_pca, max_iterations=1,
        single_kernel_clipping=False, spatial_kernel_clipping=False, kernel_sum_clipping=False,
        stamp_condition_max=None, condition_max=None, min_candidates=n_terms,
        single_precision=False)


def match_residuals(stamps: _solve.StampSet, kernels: np.ndarray) -> np.ndarray:
    r"""Largest :math:`|\kappa\otimes P_c - P_r|` of each candidate over the peak of :math:`P_r`.

    Parameters
    ----------
    stamps : _solve.StampSet
        The candidates of :func:`psf_stamps`.
    kernels : ndarray of shape (n, K, K)
        The kernel (unit sum) at each candidate.

    Returns
    -------
    ndarray of shape (n,)
    """
    model = scipy.signal.fftconvolve(stamps.template.astype(np.float64), kernels, mode="same",
                                     axes=(1, 2))
    reference = stamps.science.astype(np.float64)
    peak = reference.max(axis=(1, 2))
    return np.abs(model - reference).max(axis=(1, 2)) / peak


def scale_kernel(kernel: skydiff.BasisKernel, kernel_sum: float) -> skydiff.BasisKernel:
    r"""``kernel`` multiplied by :math:`k/\sum\kappa` (its sum at the bbox centre).

    Raises
    ------
    skydiff.NoKernelCandidatesError
        If the fitted kernel sum is not positive.
    """
    current = kernel.sum
    if not (math.isfinite(current) and current > 0):
        msg = f"the model-PSF kernel has sum {current}; the PSF models cannot be matched"
        raise skydiff.NoKernelCandidatesError(msg)
    return skydiff.BasisKernel(kernel.basis, kernel.coefficients * (kernel_sum / current),
                               order=kernel.order, bbox=kernel.bbox, kind=kernel.kind)


@attrs.frozen
class FluxRatio:
    """Outcome of :func:`stellar_flux_ratio`.

    Attributes
    ----------
    ratio : float
        Clipped inverse-variance weighted mean of the per-star ratios (NaN if none).
    error : float
        Its uncertainty: the formal error of the weighted mean, multiplied by
        :math:`\\sqrt{\\chi^2_\\nu}` of the kept ratios when that exceeds 1 (Birge ratio).
    n_used : int
        Stars kept by the clipping.
    table : astropy.table.Table
        Per star: ``x``, ``y`` (array coordinates), ``ratio``, ``ratio_err``, ``used``.
    """

    ratio: float
    error: float
    n_used: int
    table: Table = attrs.field(eq=False)


def _centred(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` cropped or zero-padded symmetrically to ``shape`` (odd sides)."""
    out = np.zeros(shape)
    rows = min(shape[0], image.shape[0])
    cols = min(shape[1], image.shape[1])
    r_in, c_in = (image.shape[0] - rows) // 2, (image.shape[1] - cols) // 2
    r_out, c_out = (shape[0] - rows) // 2, (shape[1] - cols) // 2
    out[r_out:r_out + rows, c_out:c_out + cols] = image[r_in:r_in + rows, c_in:c_in + cols]
    return out


def stellar_flux_ratio(convolved: skydiff.Exposure, matched_to: skydiff.Exposure,
                       kernel: skydiff.BasisKernel, reference_psf: PsfImage, x: np.ndarray,
                       y: np.ndarray, *, bad_bits: tuple[int, int] = (0, 0),
                       n_sigma: float = 3.0) -> FluxRatio:
    r"""Photometric ratio of two images from stars, after matching their PSFs.

    For each star a stamp of side :math:`2K + 1` is cut from both images; the convolved
    image's stamp :math:`R` is convolved with the unit-sum kernel at the star,
    :math:`M = \kappa_1\otimes R`, after which :math:`M` and :math:`I` have the same PSF
    :math:`P_r`. On the valid inner box, pixels good in both images, the same linear PSF
    photometry is applied to both: the flux :math:`F` of the least-squares fit
    :math:`F P_r + b` (uniform weights, :math:`P_r` the reference PSF model at the star),

    .. math::

        F_X = \sum_p c_p X_p,\qquad k_i = F_I / F_M,\qquad
        \sigma_{k_i}^2 = k_i^2\left(\frac{\sum_p c_p^2 V_{I,p}}{F_I^2}
        + \frac{\sum_q c'^2_q V_{R,q}}{F_M^2}\right),

    with :math:`c' = c\star\kappa_1` (the pixels of :math:`M` are correlated by the kernel:
    :math:`F_M = \sum_q c'_q R_q`). The regressors are noise-free, so neither flux
    is attenuated by the noise of the other image (a regression of :math:`I` on the noisy
    :math:`M` underestimates :math:`k` by 10-30 % for S/N 10-20 stars); identical
    coefficients make the ratio insensitive to any mismatch between :math:`P_r` and the
    stars (sub-pixel offsets, model errors). The :math:`k_i` are 3σ clipped
    (:func:`._stats.clipped_stats`) and averaged with weights :math:`1/\sigma_{k_i}^2`.

    Parameters
    ----------
    convolved, matched_to : skydiff.Exposure
        :math:`R` and :math:`I`, on the same pixel grid.
    kernel : skydiff.BasisKernel
        The matching kernel (its sum is irrelevant: it is normalised per star).
    reference_psf : callable
        ``(x, y) -> image``: the PSF of ``matched_to`` at a parent position.
    x, y : ndarray of shape (n,)
        Star positions (array coordinates), at least :math:`K` pixels from the edges.
    bad_bits : tuple of int, optional
        Mask bits of ``matched_to`` and ``convolved`` that exclude a pixel.
    n_sigma : float, optional
        Clipping threshold.

    Returns
    -------
    FluxRatio
    """
    size = int(kernel.shape[0])
    x0, y0 = matched_to.origin
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size == 0:
        empty = Table({"x": np.zeros(0), "y": np.zeros(0), "ratio": np.zeros(0),
                       "ratio_err": np.zeros(0), "used": np.zeros(0, dtype=bool)})
        return FluxRatio(ratio=float("nan"), error=float("nan"), n_used=0, table=empty)
    stamps = _solve.StampSet.from_images(
        convolved.image, matched_to.image, science_variance=matched_to.variance,
        template_variance=convolved.variance, x=x + x0, y=y + y0, size=2 * size + 1,
        mask=matched_to.mask, mask_bits=bad_bits[0], template_mask=convolved.mask,
        template_mask_bits=bad_bits[1], origin=(x0, y0))
    kernels = kernel.images_at(stamps.x, stamps.y)
    kernels = kernels / kernels.sum(axis=(1, 2))[:, None, None]
    tmask = stamps.template_mask | ~np.isfinite(stamps.template)
    template = np.where(tmask, 0.0, stamps.template.astype(np.float64))
    tvar = np.where(tmask, 0.0, stamps.template_variance.astype(np.float64))
    model = scipy.signal.fftconvolve(template, kernels, mode="valid", axes=(1, 2))
    half = size // 2
    box = (slice(None), slice(half, half + model.shape[1]), slice(half, half + model.shape[2]))
    science = stamps.science[box].astype(np.float64)
    science_var = stamps.science_variance[box].astype(np.float64)
    dilated = scipy.ndimage.maximum_filter(tmask.astype(np.uint8), size=(1, size, size),
                                           mode="constant", cval=0).astype(bool)[box]
    good = (~stamps.mask[box] & ~dilated & np.isfinite(science) & np.isfinite(science_var)
            & np.isfinite(model))
    psf = np.stack([_centred(np.asarray(reference_psf(float(xc), float(yc)), dtype=np.float64),
                             model.shape[1:])
                    for xc, yc in zip(stamps.x, stamps.y, strict=True)])  # one per star
    weight = good.astype(np.float64)
    # least squares F P + b with uniform weights: F = sum(c X), c = (n P - sum P) / det
    n_good = weight.sum(axis=(1, 2))
    s_p = (weight * psf).sum(axis=(1, 2))
    s_pp = (weight * psf**2).sum(axis=(1, 2))
    det = n_good * s_pp - s_p**2
    with np.errstate(divide="ignore", invalid="ignore"):
        coeff = weight * (n_good[:, None, None] * psf - s_p[:, None, None]) / det[:, None, None]
        coeff = np.where(np.isfinite(coeff), coeff, 0.0)
        flux_i = (coeff * np.where(good, science, 0.0)).sum(axis=(1, 2))
        flux_m = (coeff * np.where(good, model, 0.0)).sum(axis=(1, 2))
        var_i = (coeff**2 * np.where(good, science_var, 0.0)).sum(axis=(1, 2))
        # M is correlated by the kernel: F_M = sum_q c'_q R_q with c' = c correlated with κ
        spread = scipy.signal.fftconvolve(coeff, kernels[:, ::-1, ::-1], mode="full",
                                          axes=(1, 2))
        var_m = (spread**2 * tvar).sum(axis=(1, 2))
        ratio = flux_i / flux_m
        ratio_err = np.abs(ratio) * np.sqrt(var_i / flux_i**2 + var_m / flux_m**2)
    ok = (np.isfinite(ratio) & np.isfinite(ratio_err) & (ratio_err > 0) & (det > 0)
          & (flux_m > 3.0 * np.sqrt(var_m)))
    used = np.zeros(ratio.size, dtype=bool)
    if ok.any():
        used[np.flatnonzero(ok)] = clipped_stats(ratio[ok], n_sigma=n_sigma).used
    table = Table({"x": x, "y": y, "ratio": ratio, "ratio_err": ratio_err, "used": used})
    n_used = int(used.sum())
    if n_used == 0:
        return FluxRatio(ratio=float("nan"), error=float("nan"), n_used=0, table=table)
    w = 1.0 / ratio_err[used] ** 2
    mean = float(np.sum(w * ratio[used]) / np.sum(w))
    formal = float(1.0 / np.sqrt(np.sum(w)))
    # Birge ratio: inflate the formal error when the ratios scatter more than their errors
    chi2 = float(np.sum(w * (ratio[used] - mean) ** 2) / (n_used - 1)) if n_used > 1 else 1.0
    error = formal * math.sqrt(max(1.0, chi2))
    return FluxRatio(ratio=mean, error=error, n_used=n_used, table=table)


def calibration_ratio(convolved: skydiff.Exposure, matched_to: skydiff.Exposure
                      ) -> tuple[float, float] | None:
    r""":math:`k = s_c/s_r` from the photometric calibrations and its error (None if missing).

    One count of the convolved image is :math:`s_c` nJy, i.e. :math:`s_c/s_r` counts of the
    image it is matched to.
    """
    calib_c, calib_r = convolved.photo_calib, matched_to.photo_calib
    if calib_c is None or calib_r is None:
        return None
    ratio = calib_c.scale / calib_r.scale
    error = ratio * math.hypot(calib_c.scale_err / calib_c.scale,
                               calib_r.scale_err / calib_r.scale)
    return float(ratio), float(error)


def grid_table(x: np.ndarray, y: np.ndarray, fit: _solve.KernelFitResult,
               residuals: np.ndarray) -> Table:
    """The PSF candidates as a kernel-source table (array coordinates).

    Columns ``x``, ``y``, ``kernel_sum`` (of the candidate's own solution), ``psf_residual``
    (:func:`match_residuals` of the spatial kernel), ``selected`` and ``reason``.
    """
    n = len(x)
    return Table({
        "x": np.asarray(x, dtype=np.float64), "y": np.asarray(y, dtype=np.float64),
        "kernel_sum": np.asarray(fit.stamp_kernel_sums, dtype=np.float64),
        "psf_residual": np.asarray(residuals, dtype=np.float64),
        "selected": np.ones(n, dtype=bool), "reason": np.full(n, "", dtype="<U16"),
    })


def describe(fit: _solve.KernelFitResult, residuals: np.ndarray, stamp_size: int
             ) -> dict[str, Any]:
    """Scalars describing a model-PSF kernel fit (for the result metadata)."""
    return {
        "n_psf_candidates": int(fit.used.size),
        "psf_stamp_size": int(stamp_size),
        "psf_match_residual_max": float(np.max(residuals)) if residuals.size else float("nan"),
        "psf_match_residual_median": (float(np.median(residuals)) if residuals.size
                                      else float("nan")),
        "model_kernel_sum": float(fit.kernel_sum_center),
    }
