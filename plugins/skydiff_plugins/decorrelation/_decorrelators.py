r"""The decorrelation plugins: ``none``, ``dmtn021``, ``dmtn021_spatial`` and ``score``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

import skydiff

from . import _math

__all__ = [
    "DecorrelationConfig",
    "Dmtn021Decorrelator",
    "NoDecorrelation",
    "NoDecorrelationConfig",
    "ScoreDecorrelator",
    "ScoreDecorrelatorConfig",
    "SpatialDecorrelationConfig",
    "SpatialDmtn021Decorrelator",
]

#: Mask planes excluded from the variance statistics (``lsst.ip.diffim`` defaults).
STATISTICS_EXCLUDED_PLANES: tuple[str, ...] = (
    "INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE")


# ------------------------------------------------------------------------------------------
# configs


@skydiff.configclass
class NoDecorrelationConfig(skydiff.Config):
    """Options of the ``none`` decorrelation (it has none)."""


@skydiff.configclass
class DecorrelationConfig(skydiff.Config):
    """Options of the ``dmtn021`` decorrelation (and the base of the others)."""

    complete_variance: bool = skydiff.Field(
        False, doc="Propagate the variance exactly, V = V_u ⊗ c_u² + V_c ⊗ c_c² (two extra "
                   "FFT convolutions), instead of the Parseval-weighted sum "
                   "V = V_u·Σc_u² + V_c·Σc_c² (upstream completeVarPlanePropagation).")
    statistics_excluded_planes: tuple[str, ...] = skydiff.ListField(
        STATISTICS_EXCLUDED_PLANES,
        doc="Mask planes whose pixels are left out of the clipped-mean variances σ²_S, σ²_T "
            "(planes an exposure does not have are ignored).")
    clip_sigma: float = skydiff.RangeField(
        3.0, doc="Clipping threshold (σ) of the clipped-mean variances.", min=0.0,
        inclusive_min=False)
    clip_iterations: int = skydiff.RangeField(
        3, doc="Clipping iterations of the clipped-mean variances.", min=1)
    replace_planes: tuple[str, ...] = skydiff.ListField(
        ("NO_DATA",), doc="Pixels with any of these planes (and non-finite pixels) are set to "
                          "the image mean before filtering and get their values back after.")
    update_psf: bool = skydiff.Field(
        True, doc="Replace the PSF of the output by the decorrelated PSF (φ ⊗ P for the "
                  "difference); upstream leaves the difference PSF unchanged (DM-47461).")
    divergence_ratio: float = skydiff.RangeField(
        1e8, doc="Log a warning when σ²_convolved / σ²_unconvolved exceeds this ratio (the "
                 "filter then approaches a deconvolution).", min=0.0, inclusive_min=False)


@skydiff.configclass
class SpatialDecorrelationConfig(DecorrelationConfig):
    """Options of the ``dmtn021_spatial`` decorrelation."""

    cell_size_fwhm: float = skydiff.RangeField(
        40.0, doc="Inner cell size in units of the PSF FWHM (upstream gridStep = 40).",
        min=0.0, inclusive_min=False)
    border_fwhm: float = skydiff.RangeField(
        8.0, doc="Border by which cells overlap, in units of the PSF FWHM (upstream "
                 "borderSize = 8); never less than the kernel size.", min=0.0)
    min_cell_size: int = skydiff.RangeField(
        64, doc="Smallest inner cell size in pixels.", min=8)
    default_fwhm: float = skydiff.RangeField(
        4.0, doc="FWHM (pixels) used to size the grid when no PSF is available.", min=0.0,
        inclusive_min=False)
    psf_order: int = skydiff.RangeField(
        2, doc="Largest total degree of the polynomial PSF fitted over the cells' decorrelated "
               "PSFs (lowered when there are too few cells).", min=0)


@skydiff.configclass
class ScoreDecorrelatorConfig(DecorrelationConfig):
    """Options of the ``score`` decorrelation."""


# ------------------------------------------------------------------------------------------
# input checks and helpers


def _check_inputs(science: Any, template: Any, subtraction: Any) -> None:
    for label, value in (("science", science), ("template", template)):
        if not isinstance(value, skydiff.Exposure):
            msg = f"{label} must be a skydiff.Exposure, got {type(value).__name__}"
            raise skydiff.InputError(msg)
    if not isinstance(subtraction, skydiff.SubtractionResult):
        msg = f"subtraction must be a skydiff.SubtractionResult, got {type(subtraction).__name__}"
        raise skydiff.InputError(msg)
    if not isinstance(subtraction.difference, skydiff.Exposure):
        msg = ("subtraction.difference must be a skydiff.Exposure, got "
               f"{type(subtraction.difference).__name__}")
        raise skydiff.InputError(msg)
    shapes = {"science": science.shape, "template": template.shape,
              "difference": subtraction.difference.shape}
    if subtraction.score is not None:
        if not isinstance(subtraction.score, skydiff.Exposure):
            msg = f"subtraction.score must be an Exposure or None, got {type(subtraction.score)}"
            raise skydiff.InputError(msg)
        shapes["score"] = subtraction.score.shape
    if len(set(shapes.values())) != 1:
        msg = (f"science, template and subtraction images must share one pixel grid, got "
               f"shapes {shapes}")
        raise skydiff.InputError(msg)


def _check_correctable(subtraction: skydiff.SubtractionResult) -> None:
    if subtraction.kernel is None:
        msg = ("the subtraction has no PSF-matching kernel (subtraction.kernel is None); "
               "decorrelation needs one — use decorrelation 'none' for kernel-free methods")
        raise skydiff.InputError(msg)
    if subtraction.convolved == "none":
        msg = ("the subtraction convolved neither input (e.g. ZOGY), so its outputs are "
               "already decorrelated; use decorrelation 'none'")
        raise skydiff.InputError(msg)


def _center(exposure: skydiff.Exposure) -> tuple[float, float]:
    """Parent-frame ``(x, y)`` of the centre of the exposure."""
    x0, y0 = exposure.origin
    height, width = exposure.shape
    return x0 + 0.5 * (width - 1), y0 + 0.5 * (height - 1)


def _roles(science: skydiff.Exposure, template: skydiff.Exposure,
           subtraction: skydiff.SubtractionResult) -> tuple[skydiff.Exposure, skydiff.Exposure]:
    """(unconvolved, convolved) inputs for the subtraction's convolution mode."""
    if subtraction.convolved == "science":
        return template, science
    return science, template


def _variance_scale(correction: _math.Correction, subtraction: skydiff.SubtractionResult
                    ) -> float:
    """1/kSum² for convolveScience (D = (κ⊗S − T)/kSum), else 1."""
    return 1.0 / correction.kernel_sum**2 if subtraction.convolved == "science" else 1.0


def _kernel_image(kernel: skydiff.FixedKernel | skydiff.BasisKernel, x: float, y: float
                  ) -> NDArray[np.float64]:
    image = np.asarray(kernel.image_at(x, y), dtype=np.float64)
    total = float(image.sum())
    if not (math.isfinite(total) and total > 0.0):
        msg = (f"the PSF-matching kernel has a non-positive sum ({total}) at (x, y) = "
               f"({x:.1f}, {y:.1f}); the decorrelation filter needs a positive photometric "
               f"scale")
        raise skydiff.InputError(msg)
    return image


def _difference_psf(science: skydiff.Exposure, template: skydiff.Exposure,
                    subtraction: skydiff.SubtractionResult) -> skydiff.Psf | None:
    """The PSF of the difference: its own, else the unconvolved input's."""
    if subtraction.difference.psf is not None:
        return subtraction.difference.psf
    return template.psf if subtraction.convolved == "science" else science.psf


def _psf_stamp(psf: skydiff.Psf, x: float, y: float) -> NDArray[np.float64]:
    return np.asarray(psf.kernel_image(x, y), dtype=np.float64)


class _Corrector(skydiff.Decorrelator):
    """Shared machinery of the filtering decorrelators (not registered)."""

    ConfigClass: ClassVar[type[skydiff.Config]] = DecorrelationConfig
    config: DecorrelationConfig

    def _bits(self, exposure: skydiff.Exposure, names: tuple[str, ...]) -> int:
        planes = exposure.mask_planes
        return planes.value(*[name for name in names if name in planes.planes])

    def _sigma2(self, exposure: skydiff.Exposure, rows: slice = slice(None),
                cols: slice = slice(None), *, label: str) -> float:
        """3σ-clipped mean of a variance plane over unflagged pixels."""
        value = _math.variance_level(
            exposure.variance[rows, cols], exposure.mask[rows, cols],
            self._bits(exposure, tuple(self.config.statistics_excluded_planes)),
            n_sigma=self.config.clip_sigma, n_iter=self.config.clip_iterations)
        if not (math.isfinite(value) and value >= 0.0):
            msg = (f"the {label} variance plane has no usable finite, non-negative values "
                   f"(clipped mean {value}); decorrelation needs a variance plane")
            raise skydiff.InputError(msg)
        return value

    def _check_sigmas(self, sigma2_u: float, sigma2_c: float) -> None:
        if sigma2_u + sigma2_c <= 0.0:
            msg = ("both variance planes are zero: there is no noise to decorrelate; use "
                   "decorrelation 'none'")
            raise skydiff.InputError(msg)
        ratio = math.inf if sigma2_u == 0.0 else sigma2_c / sigma2_u
        if ratio > self.config.divergence_ratio:
            self.log.warning(
                "σ²_convolved / σ²_unconvolved = %.3g exceeds %.3g: the decorrelation filter "
                "approaches a deconvolution and may amplify noise", ratio,
                self.config.divergence_ratio)

    def _bad_pixels(self, exposure: skydiff.Exposure) -> NDArray[np.bool_]:
        bad = ~np.isfinite(exposure.image)
        flagged = self._replaced(exposure)
        if flagged is not None:
            bad |= flagged
        return bad

    def _replaced(self, exposure: skydiff.Exposure) -> NDArray[np.bool_] | None:
        """Pixels with a ``replace_planes`` bit, or None when no pixel has one (a cheap
        bitwise-OR reduction decides; non-finite pixels are found by the filtering)."""
        bits = np.uint32(self._bits(exposure, tuple(self.config.replace_planes)))
        if not bits or not int(np.bitwise_or.reduce(exposure.mask, axis=None)) & int(bits):
            return None
        return (exposure.mask & bits) != 0

    def _filtered_psf(self, model: skydiff.Psf, kernel: NDArray[np.float64] | None,
                      position: tuple[float, float],
                      centre: Callable[[NDArray[np.float64]], NDArray[np.float64]]
                      ) -> tuple[skydiff.Psf | None, str]:
        r"""The PSF of an image filtered by ``kernel`` whose input PSF is ``model``.

        Parameters
        ----------
        model : skydiff.Psf
            The PSF of the filtered image's input.
        kernel : ndarray or None
            The compact image-space filter (unit sum), or None when it is not compact.
        position : tuple of float
            ``(x, y)`` of the image centre.
        centre : callable
            Maps the input PSF image at the centre to the filtered one (fallback path).

        Returns
        -------
        psf : skydiff.Psf or None
            :math:`k\otimes P(x, y)`: a :class:`~skydiff.PolynomialPsf` with the model's
            coefficients and filtered basis images for a PolynomialPsf model, else an
            :class:`~skydiff.ImagePsf` at the centre; None if the result is unusable.
        how : {"polynomial", "constant", "centre"}
            ``"centre"`` when a spatially varying model had to be reduced to its centre.
        """
        x, y = position
        if isinstance(model, skydiff.PolynomialPsf):
            if kernel is not None:
                try:
                    return _math.filtered_polynomial_psf(model, kernel[None], 0), "polynomial"
                except skydiff.InputError as exc:
                    self.log.warning("the filtered PolynomialPsf is invalid (%s); using the "
                                     "decorrelated PSF at the image centre only", exc)
            else:
                self.log.warning(
                    "the decorrelation filter is broader than %d pixels, so the spatially "
                    "varying PSF cannot be filtered exactly; using the decorrelated PSF at the "
                    "image centre only", _math.MAX_FILTER_HALF)
            how = "centre"
        elif isinstance(model, skydiff.GaussianPsf | skydiff.ImagePsf):
            how = "constant"
        else:
            self.log.warning(
                "the difference PSF (%s) is not a PolynomialPsf, GaussianPsf or ImagePsf, so "
                "its spatial variation is unknown; the decorrelated PSF is evaluated at the "
                "image centre only", type(model).__name__)
            how = "centre"
        stamp = _psf_stamp(model, x, y)
        filtered = (_math.filtered_psf_image(stamp, kernel) if kernel is not None
                    else centre(stamp))
        return _math.psf_from_stamp(filtered, (x, y)), how


def _frozen(array: NDArray[Any]) -> NDArray[Any]:
    array.setflags(write=False)
    return array


def _metadata(correction: _math.Correction, w_u: float, w_c: float,
              subtraction: skydiff.SubtractionResult) -> dict[str, Any]:
    science_is_u = subtraction.convolved != "science"
    s2u, s2c = correction.sigma2_u, correction.sigma2_c
    return {"sigma2_science": s2u if science_is_u else s2c,
            "sigma2_template": s2c if science_is_u else s2u,
            "kernel_sum": correction.kernel_sum, "convolved": subtraction.convolved,
            "weight_unconvolved": w_u, "weight_convolved": w_c}


# ------------------------------------------------------------------------------------------
# none


class NoDecorrelation(skydiff.Decorrelator):
    """Return the difference (and score) of the subtraction unchanged.

    For subtractions whose outputs are already decorrelated (ZOGY) or when the correlated
    noise is accepted.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(NoDecorrelation())
    >>> result.metadata["decorrelated"]
    False
    """

    name = "none"
    ConfigClass = NoDecorrelationConfig
    tags = frozenset({"linear"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Check the inputs and pass ``subtraction.difference`` and ``.score`` through.

        Raises
        ------
        skydiff.InputError
            If an input is not an Exposure / SubtractionResult or the shapes differ.
        """
        _check_inputs(science, template, subtraction)
        return skydiff.DecorrelationResult(difference=subtraction.difference,
                                           score=subtraction.score,
                                           metadata={"decorrelated": False})


# ------------------------------------------------------------------------------------------
# dmtn021


class Dmtn021Decorrelator(_Corrector):
    r"""Whiten the noise of an Alard–Lupton difference image (DMTN-021), globally.

    A difference :math:`D = u - \kappa \otimes c` of an unconvolved image :math:`u` and a
    convolved one :math:`c` (:math:`u = S, c = T` when the template was convolved; the reverse
    when the science was, ``subtraction.convolved``) has, for white input noise of variances
    :math:`\sigma^2_u, \sigma^2_c`, the noise power spectrum
    :math:`\sigma^2_u + \sigma^2_c |\hat\kappa(k)|^2`. The correction (Reiss & Lupton 2016,
    with the flux-preserving numerator of ``lsst.ip.diffim``)

    .. math::

        \hat\phi(k) = \sqrt{\frac{\sigma^2_u + \sigma^2_c\,k_\Sigma^2}
                                 {\sigma^2_u + \sigma^2_c\,|\hat\kappa(k)|^2}}, \qquad
        D_\mathrm{corr} = \mathcal F^{-1}\big[\hat\phi\cdot\hat D\big],

    makes the spectrum flat, :math:`\sigma^2_u + \sigma^2_c k_\Sigma^2`, and leaves fluxes
    unchanged (:math:`\hat\phi(0) = 1`, since :math:`\hat\kappa(0) = k_\Sigma`).

    * :math:`\kappa` is the kernel evaluated at the centre of the image (parent frame), not
      normalised; :math:`k_\Sigma = \sum\kappa`.
    * :math:`\sigma^2_u, \sigma^2_c` are 3σ-clipped means (3 iterations) of the *original*
      science and template variance planes, without the pixels of
      ``statistics_excluded_planes``.
    * **The filter in image space.** :math:`\hat\phi` is real, even and smooth, so
      :math:`\phi` is point-symmetric and compact: it is computed on a small grid (inverse
      FFT of :math:`\hat\phi`) and cut to the smallest centred square outside which
      :math:`\sum|\phi|` is at most :data:`~._math.FILTER_TOLERANCE` = :math:`10^{-7}` of
      its L1 norm (half-width :math:`h`, typically 10–50 pixels), then renormalised to unit
      sum. That cut :math:`\phi` is exactly the filter applied to the image and to the PSF;
      it differs from the untruncated one by less than the float32 resolution of the data.
      A filter broader than :data:`~._math.MAX_FILTER_HALF` pixels (a near-deconvolution)
      is applied through its exact evaluation on the FFT grid instead.
    * **Padding.** The difference is zero-padded by :math:`h` pixels (the support of
      :math:`\phi`, so the circular convolution wraps nothing) after subtracting the mean of
      its good pixels (added back afterwards): beyond its edges the image continues as its
      mean, the filter leaks no background offset, and, unlike reflection, padding adds no
      mirrored copy of the noise that would correlate the edge pixels. Non-finite and
      ``replace_planes`` pixels are set to the mean while filtering and restored afterwards.
    * **Variance** (DMTN-179 §5). With the overall filters :math:`c_u = \phi` and
      :math:`c_c = \kappa\otimes\phi` of the two inputs, by default

      .. math::

          V_D = V_u\,w_u + V_c\,w_c, \qquad w = \sum_x c(x)^2 = \frac1N\sum_k|\hat c(k)|^2
          \quad\text{(Parseval)},

      or, with ``complete_variance``, :math:`V_D = V_u \otimes c_u^2 + V_c \otimes c_c^2`.
      :math:`V_u, V_c` are the science and template variance planes.
    * **convolveScience.** The AL difference is then
      :math:`D = (\kappa \otimes S - T)/k_\Sigma`, in the science's flux units; the filter is
      the same with :math:`u = T, c = S`, and the variance is divided by :math:`k_\Sigma^2`.
    * **PSF.** A point source of the unconvolved image at :math:`(x, y)` appears in the
      output as :math:`P_D(x, y) = \phi\otimes P(x, y)`, :math:`P` the difference's PSF
      (science PSF when the template was convolved, template PSF otherwise): one global
      filter acts on every position's PSF. For a :class:`~skydiff.PolynomialPsf`
      :math:`P = \sum_i c_i(x, y)\,\beta_i` (the ``empirical`` PSF estimator, PSFEx models,
      the simulator with ``fwhm_gradient``) the output PSF is the PolynomialPsf with the
      same coefficients and the basis images :math:`\phi\otimes\beta_i` — exact at every
      position (:func:`~._math.filtered_polynomial_psf`; the sums of the basis images are
      unchanged, so the model normalises as before). A
      :class:`~skydiff.GaussianPsf` or :class:`~skydiff.ImagePsf` gives an
      :class:`~skydiff.ImagePsf` of :math:`\phi\otimes P`. Any other PSF implementing only
      the :class:`~skydiff.Psf` protocol is filtered at the image centre, with a logged
      warning (its variation is unknown). Metadata ``psf_model`` says which
      (``"polynomial"``, ``"constant"``, ``"centre"``). Upstream leaves the PSF stale
      (DM-47461); ``update_psf = false`` restores that behaviour.
    * **Cost** (2048×4096, measured against one full-frame float32 ``scipy.fft.rfft2``):
      one forward and one inverse ``float32`` FFT of the frame padded by :math:`h` (rows
      transformed only where there is data, caller-owned buffers), the filter's real
      spectrum evaluated by blocks of rows as one small real matrix product each and
      applied while in cache, the normalisation folded into it, the mean taken from
      float32 row sums (a non-finite total reveals non-finite pixels, so no full-frame
      finiteness mask is built unless one exists), the mask-plane test by one bitwise-OR
      reduction, the variance combined by blocks of rows, and no full-frame float64
      temporary.

    The mask is unchanged. A warning is logged when :math:`\sigma^2_c/\sigma^2_u` exceeds
    ``divergence_ratio`` (the filter then approaches a deconvolution).

    References
    ----------
    .. [1] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, "Implementation of image difference
       decorrelation", https://dmtn-021.lsst.io.
    .. [2] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation:
       numerical details", https://dmtn-179.lsst.io.
    .. [3] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(Dmtn021Decorrelator())
    >>> round(result.metadata["kernel_sum"], 6)
    1.0
    """

    name = "dmtn021"
    ConfigClass = DecorrelationConfig
    tags = frozenset({"linear"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Decorrelate ``subtraction.difference``; the score (if any) is passed through.

        Returns
        -------
        skydiff.DecorrelationResult
            ``difference``: the corrected image with its variance and PSF; ``metadata``:
            ``sigma2_science``, ``sigma2_template``, ``kernel_sum``, ``convolved``,
            ``weight_unconvolved``, ``weight_convolved``, ``psf_updated``.

        Raises
        ------
        skydiff.InputError
            If an input has the wrong type, the shapes differ, the subtraction has no kernel
            or convolved neither image, the kernel sum is not positive, or a variance plane
            has no usable value.
        """
        _check_inputs(science, template, subtraction)
        _check_correctable(subtraction)
        assert subtraction.kernel is not None
        difference = subtraction.difference
        with self.timer("run"):
            unconvolved, convolved = _roles(science, template, subtraction)
            cx, cy = _center(difference)
            kernel = _kernel_image(subtraction.kernel, cx, cy)
            correction = _math.Correction(
                "diffim", kernel, None,
                self._sigma2(unconvolved, label="unconvolved"),
                self._sigma2(convolved, label="convolved"))
            self._check_sigmas(correction.sigma2_u, correction.sigma2_c)
            compact = correction.compact_filter()
            image, variance, w_u, w_c = _math.decorrelate_block(
                difference.image, self._replaced(difference), unconvolved.variance,
                convolved.variance, correction, complete_variance=self.config.complete_variance,
                variance_scale=_variance_scale(correction, subtraction), compact=compact)
            psf = difference.psf
            updated = False
            how = "none"
            model = _difference_psf(science, template, subtraction)
            if self.config.update_psf and model is not None:
                new, how = self._filtered_psf(
                    model, None if compact is None else compact.image, (cx, cy),
                    correction.filtered_psf)
                if new is not None:
                    psf, updated = new, True
        metadata = _metadata(correction, w_u, w_c, subtraction)
        metadata.update(psf_updated=updated, psf_model=how if updated else "none",
                        filter_half_width=-1 if compact is None else compact.half)
        corrected = difference.evolve(image=_frozen(image), variance=_frozen(variance),
                                      psf=psf)
        return skydiff.DecorrelationResult(difference=corrected, score=subtraction.score,
                                           metadata=metadata)


# ------------------------------------------------------------------------------------------
# dmtn021_spatial


class SpatialDmtn021Decorrelator(_Corrector):
    r"""DMTN-021 decorrelation with the kernel and variances local to each cell of a grid.

    The difference is cut into a grid of inner cells of ``cell_size_fwhm`` × FWHM pixels
    (at least ``min_cell_size``), each grown by a border of ``border_fwhm`` × FWHM pixels
    (at least the kernel size) — the upstream ``DecorrelateALKernelSpatialTask`` defaults,
    40 and 8 FWHM, with the FWHM of the difference PSF at the image centre (``default_fwhm``
    without a PSF). Every outer cut-out is corrected exactly as :class:`Dmtn021Decorrelator`
    does the whole image, with the kernel evaluated at the cell centre and
    :math:`\sigma^2_u, \sigma^2_c` the clipped means of the cut-out's variance planes; the
    results are blended with :func:`skydiff.map_reduce` (``blend="taper"``: smooth
    :math:`\cos^2` weights over the middle half of each overlap, summing to one, no seams).

    **PSF.** A point source at :math:`(x, y)` appears as :math:`\phi(x, y)\otimes P(x, y)`,
    with :math:`\phi(x, y)` the (blended) filter of the cells around it and :math:`P` the
    difference's PSF. The cells' image-space filters :math:`\phi_c` (compact, unit sum; see
    :class:`Dmtn021Decorrelator`) are fitted by polynomials of total degree ``psf_order``
    (lowered until there are at least as many cells as terms) over the PSF model's bbox —
    exact at the cell centres for as many cells as terms, smooth in between — and the
    output PSF is :math:`\phi(x, y)\otimes P(x, y)` built exactly from that fit: for a
    :class:`~skydiff.PolynomialPsf` :math:`P` of degree :math:`p` a PolynomialPsf of degree
    :math:`p + q` whose basis images are the filter terms convolved with :math:`P`'s basis
    images (so it reduces to ``dmtn021``'s PSF for a constant kernel, and the spatial
    variation of :math:`P` is never refitted); for a GaussianPsf or ImagePsf a
    PolynomialPsf of degree ``psf_order`` over the image (an :class:`~skydiff.ImagePsf` for
    a single cell). For a PSF known only through the protocol (or cells whose filter is not
    compact) the cells' PSFs :math:`\phi_c\otimes P(x_c, y_c)` are fitted instead.
    (Upstream stitches a ``CoaddPsf``.)

    Metadata holds the per-cell values as lists in grid order (row-major).

    References
    ----------
    .. [1] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, https://dmtn-021.lsst.io.
    .. [2] Reiss, D. J. et al. 2021, DMTN-179, https://dmtn-179.lsst.io.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(SpatialDmtn021Decorrelator())
    >>> result.metadata["n_cells"]
    1
    """

    name = "dmtn021_spatial"
    ConfigClass = SpatialDecorrelationConfig
    config: SpatialDecorrelationConfig
    tags = frozenset({"linear", "spatially_varying"})

    def grid_sizes(self, fwhm: float, kernel_shape: tuple[int, int]) -> tuple[int, int]:
        """``(cell_size, border)`` in pixels for a PSF FWHM and a kernel shape."""
        border = max(math.ceil(self.config.border_fwhm * fwhm), *kernel_shape)
        cell = max(round(self.config.cell_size_fwhm * fwhm), self.config.min_cell_size)
        return cell, border

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Decorrelate ``subtraction.difference`` cell by cell; the score is passed through.

        Returns
        -------
        skydiff.DecorrelationResult
            ``metadata``: ``n_cells``, ``cell_size``, ``border``, and per cell (lists)
            ``cell_x``, ``cell_y``, ``sigma2_science``, ``sigma2_template``, ``kernel_sum``,
            ``weight_unconvolved``, ``weight_convolved``; ``psf_updated``.

        Raises
        ------
        skydiff.InputError
            As :meth:`Dmtn021Decorrelator.run`, for any cell.
        """
        _check_inputs(science, template, subtraction)
        _check_correctable(subtraction)
        kernel_model = subtraction.kernel
        assert kernel_model is not None
        difference = subtraction.difference
        unconvolved, convolved = _roles(science, template, subtraction)
        x0, y0 = difference.origin
        cx, cy = _center(difference)
        model = _difference_psf(science, template, subtraction)
        fwhm = float(model.fwhm(cx, cy)) if model is not None else self.config.default_fwhm
        if not (math.isfinite(fwhm) and fwhm > 0.0):
            fwhm = self.config.default_fwhm
        cell_size, border = self.grid_sizes(fwhm, kernel_model.shape)
        arrays = {"image": difference.image, "bad": self._bad_pixels(difference),
                  "variance_u": unconvolved.variance, "variance_c": convolved.variance}
        records: list[dict[str, Any]] = []

        def correct(cut: dict[str, NDArray[Any]], cell: skydiff.Cell
                    ) -> dict[str, NDArray[np.float32]]:
            row, col = cell.center
            x, y = x0 + col, y0 + row
            kernel = _kernel_image(kernel_model, x, y)
            rows, cols = cell.outer
            correction = _math.Correction(
                "diffim", kernel, None,
                self._sigma2(unconvolved, rows, cols, label="unconvolved"),
                self._sigma2(convolved, rows, cols, label="convolved"))
            self._check_sigmas(correction.sigma2_u, correction.sigma2_c)
            compact = correction.compact_filter()
            image, variance, w_u, w_c = _math.decorrelate_block(
                cut["image"], cut["bad"], cut["variance_u"], cut["variance_c"], correction,
                complete_variance=self.config.complete_variance,
                variance_scale=_variance_scale(correction, subtraction), compact=compact)
            record = _metadata(correction, w_u, w_c, subtraction)
            record.update(x=x, y=y, correction=correction, compact=compact)
            records.append(record)
            return {"image": image, "variance": variance}

        with self.timer("run"):
            stitched = skydiff.map_reduce(arrays, correct, cell_size=cell_size, border=border,
                                          blend="taper")
            assert isinstance(stitched, dict)
            psf = difference.psf
            updated = False
            if self.config.update_psf and model is not None:
                new = self._stitched_psf(model, records, difference)
                if new is not None:
                    psf, updated = new, True
        metadata: dict[str, Any] = {
            "n_cells": len(records), "cell_size": cell_size, "border": border,
            "convolved": subtraction.convolved, "psf_updated": updated,
            "cell_x": [r["x"] for r in records], "cell_y": [r["y"] for r in records]}
        for key in ("sigma2_science", "sigma2_template", "kernel_sum", "weight_unconvolved",
                    "weight_convolved"):
            metadata[key] = [r[key] for r in records]
        corrected = difference.evolve(image=_frozen(stitched["image"]),
                                      variance=_frozen(stitched["variance"]), psf=psf)
        return skydiff.DecorrelationResult(difference=corrected, score=subtraction.score,
                                           metadata=metadata)

    def _stitched_psf(self, model: skydiff.Psf, records: list[dict[str, Any]],
                      difference: skydiff.Exposure) -> skydiff.Psf | None:
        r"""The decorrelated PSF over the cells: a PolynomialPsf (or an ImagePsf).

        The filters :math:`\phi_c` of the cells (image space, unit sum) are fitted by
        polynomials of degree ``psf_order`` (lowered until there are as many cells as
        terms; degree 0 takes the cell nearest the centre) over the PSF model's ``bbox``:
        :math:`\phi(x, y) = \sum_t g_t(x, y)\Phi_t`. The output PSF is
        :math:`\phi(x, y)\otimes P(x, y)`, built exactly by
        :func:`~._math.filtered_polynomial_psf`: for a PolynomialPsf :math:`P` of degree
        :math:`p` a PolynomialPsf of degree :math:`p + q` (with :math:`q = 0`: the model's
        coefficients and the basis :math:`\phi\otimes\beta_i`, as ``dmtn021``), for a
        GaussianPsf or ImagePsf one of degree :math:`q` over the difference's bbox (an
        ImagePsf for :math:`q = 0`). A PSF known only through the protocol, or cells whose
        filter is not compact, fall back to fitting the cells' PSFs
        :math:`\phi_c\otimes P(x_c, y_c)` directly.
        """
        xs = np.array([r["x"] for r in records])
        ys = np.array([r["y"] for r in records])
        x_min, y_min, x_max, y_max = difference.bbox
        bbox = (float(x_min), float(y_min), float(x_max - 1), float(y_max - 1))
        order = self.config.psf_order
        while order > 0 and (order + 1) * (order + 2) // 2 > len(records):
            order -= 1
        degenerate = bbox[2] <= bbox[0] or bbox[3] <= bbox[1]
        if degenerate:
            order = 0
        nearest = int(np.argmin((xs - 0.5 * (bbox[0] + bbox[2])) ** 2
                                + (ys - 0.5 * (bbox[1] + bbox[3])) ** 2))
        compacts = [r["compact"] for r in records]
        if all(c is not None for c in compacts):
            filters = _stack_centred([c.image for c in compacts])
            if isinstance(model, skydiff.PolynomialPsf | skydiff.GaussianPsf | skydiff.ImagePsf):
                base = model if isinstance(model, skydiff.PolynomialPsf) else None
                if base is None and degenerate:
                    stamp = _psf_stamp(model, xs[nearest], ys[nearest])
                    return _math.psf_from_stamp(
                        _math.filtered_psf_image(stamp, filters[nearest]),
                        (float(xs[nearest]), float(ys[nearest])))
                if base is None:
                    cx, cy = _center(difference)
                    base = skydiff.PolynomialPsf(_psf_stamp(model, cx, cy)[None], [[1.0]],
                                                 order=0, bbox=bbox)
                if order == 0:
                    field = filters[nearest][None]
                else:
                    terms = skydiff.spatial_functions(xs, ys, order=order, bbox=base.bbox,
                                                      kind=base.kind)
                    solution, *_ = np.linalg.lstsq(
                        terms.T, filters.reshape(len(records), -1), rcond=None)
                    field = solution.reshape(-1, *filters.shape[1:])
                try:
                    psf = _math.filtered_polynomial_psf(base, field, order)
                except skydiff.InputError:
                    return None
                if base is not model and order == 0:
                    return _math.psf_from_stamp(psf.kernel_image(),
                                                (float(xs[nearest]), float(ys[nearest])))
                return psf
            stamps = [_math.filtered_psf_image(_psf_stamp(model, x, y), phi)
                      for x, y, phi in zip(xs, ys, filters, strict=True)]
        else:
            self.log.warning(
                "a cell's decorrelation filter is broader than %d pixels; its PSF is "
                "evaluated at the cell centre", _math.MAX_FILTER_HALF)
            stamps = [r["correction"].filtered_psf(_psf_stamp(model, r["x"], r["y"]))
                      for r in records]
        cube = _stack_centred([stamp / stamp.sum() for stamp in stamps])
        if order == 0:
            return _math.psf_from_stamp(cube[nearest], (float(xs[nearest]), float(ys[nearest])))
        terms = skydiff.spatial_functions(xs, ys, order=order, bbox=bbox)  # (n_terms, n)
        solution, *_ = np.linalg.lstsq(terms.T, cube.reshape(len(records), -1), rcond=None)
        basis = solution.reshape(-1, *cube.shape[1:])
        try:
            return skydiff.PolynomialPsf(basis, np.eye(basis.shape[0]), order=order, bbox=bbox)
        except skydiff.InputError:
            return None


def _stack_centred(stamps: list[NDArray[np.float64]]) -> NDArray[np.float64]:
    """Odd square stamps of different sizes, zero-padded about their centres to one size."""
    size = max(stamp.shape[0] for stamp in stamps)
    cube = np.zeros((len(stamps), size, size))
    for index, stamp in enumerate(stamps):
        pad = (size - stamp.shape[0]) // 2
        cube[index, pad:pad + stamp.shape[0], pad:pad + stamp.shape[0]] = stamp
    return cube


# ------------------------------------------------------------------------------------------
# score


class ScoreDecorrelator(_Corrector):
    r"""The DMTN-179 likelihood correction: a ZOGY-equivalent score image from an AL result.

    **Pre-convolution path** (``subtraction.prefilter`` = :math:`H`, the reflected science PSF
    the science was convolved with): the input :math:`S_0 = H\otimes S - \kappa\otimes T`
    (``subtraction.score`` when present, else ``subtraction.difference``) is corrected by

    .. math::

        \hat c(k) = \frac{\sigma^2_u + \sigma^2_c\,k_\Sigma^2}
                         {\sigma^2_u + \sigma^2_c\,|\hat\kappa(k)|^2 / |\hat H(k)|^2},
        \qquad \mathrm{score} = \mathcal F^{-1}\big[\hat c\cdot\hat S_0\big]

    (no square root; :math:`|\hat H|^2` floored at 1000 × the smallest normal float64, the
    filter being evaluated in float64 by chunks of rows;
    :math:`k_\Sigma^2` divided by :math:`(\sum H)^2` if :math:`H` is not normalised). With
    :math:`\hat\kappa = \hat H\hat P_S/\hat P_T` this is
    :math:`\hat c\hat S_0 = n\,\big(\hat P_S^*|\hat P_T|^2\hat S - \hat P_T^*|\hat P_S|^2
    \hat T\big)/(\sigma^2_S|\hat P_T|^2 + \sigma^2_T|\hat P_S|^2)`, :math:`n` the numerator:
    the ZOGY score (Zackay, Ofek & Gal-Yam 2016, eq. 12) up to a constant, and
    :math:`\hat c(0) = 1`. Only ``convolved = "template"`` is meaningful here.

    **Plain difference** (no pre-filter): the score of :math:`D = u - \kappa\otimes c` is its
    matched filter by :math:`H` = the reflected difference PSF at the image centre, corrected
    the same way with :math:`\kappa \to H\otimes\kappa` (so :math:`|\hat\kappa|^2/|\hat H|^2
    \to |\hat\kappa|^2` and no floor is needed): :math:`\mathrm{score} =
    \mathcal F^{-1}[\hat H\hat c\,\hat D]`, again ZOGY's score up to a constant. For
    ``convolved = "science"`` the roles swap (:math:`u = T`) and the variance is divided by
    :math:`k_\Sigma^2`.

    **Variance** (DMTN-179 §5) as for :class:`Dmtn021Decorrelator`, with the overall filters
    :math:`\hat c_u = \hat H\hat c` and :math:`\hat c_c = \hat\kappa\hat c` (plain
    difference: :math:`\hat H\hat\kappa\hat c`). Upstream writes :math:`\hat c_u =
    \overline{\hat H}\hat c` with :math:`H` the unreflected PSF — the same filter.

    **PSF** of the score: its response to a point source of the unconvolved image,
    :math:`\mathcal F^{-1}[\hat c\,|\hat H|^2]` — the PSF correlated with itself, reweighted by
    :math:`\hat c`; this is ZOGY's :math:`P_S = |\hat P_D|^2` (normalised to unit sum), and
    exactly the PSF's autocorrelation for a noiseless template. In general a point source at
    :math:`(x, y)` responds with :math:`c_u\otimes P_u(x, y)`, :math:`c_u = H\otimes c` the
    overall filter of the unconvolved image and :math:`P_u` its PSF (the science PSF for the
    pre-filtered path, the difference's PSF otherwise); :math:`c_u` is global and compact, so
    for a :class:`~skydiff.PolynomialPsf` :math:`P_u` the score PSF is the PolynomialPsf with
    the same coefficients and the basis images :math:`c_u\otimes\beta_i` (cut at
    :data:`~._math.FILTER_TOLERANCE`, as for ``dmtn021``), exact at every position — it
    costs a few small FFTs. A constant PSF (Gaussian, image) keeps the expression above at
    the centre; a PSF known only through the protocol is evaluated at the centre with a
    warning. (:math:`H` itself is the PSF at one position: the matched filter is not
    re-optimised across the field, only its response is described exactly.)

    The difference is returned unchanged; the corrected score is ``result.score``.

    References
    ----------
    .. [1] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation:
       numerical details", https://dmtn-179.lsst.io.
    .. [2] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27.
    .. [3] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, https://dmtn-021.lsst.io.

    Examples
    --------
    >>> from skydiff.testing._inputs import sample_call
    >>> result = sample_call("decorrelation")(ScoreDecorrelator())
    >>> result.score.shape, result.metadata["prefiltered"]
    ((64, 64), False)
    """

    name = "score"
    ConfigClass = ScoreDecorrelatorConfig
    tags = frozenset({"linear", "needs_psf"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure,
            subtraction: skydiff.SubtractionResult) -> skydiff.DecorrelationResult:
        """Compute the corrected score image.

        Returns
        -------
        skydiff.DecorrelationResult
            ``difference``: ``subtraction.difference`` unchanged; ``score``: the corrected
            score with its variance and PSF; ``metadata`` as for ``dmtn021`` plus
            ``prefiltered``.

        Raises
        ------
        skydiff.InputError
            As :meth:`Dmtn021Decorrelator.run`; also for a pre-filter that is not a finite
            odd 2-D array with a positive sum, a pre-filter with ``convolved = "science"``,
            or a plain difference without any PSF.
        """
        _check_inputs(science, template, subtraction)
        _check_correctable(subtraction)
        assert subtraction.kernel is not None
        source = subtraction.score if subtraction.score is not None else subtraction.difference
        cx, cy = _center(source)
        prefiltered = subtraction.prefilter is not None
        psf_stamp: NDArray[np.float64] | None = None
        # the PSF of the unconvolved input: the science for a pre-filtered subtraction (whose
        # difference carries H ⊗ P_S), the difference's own otherwise
        model = science.psf if prefiltered else _difference_psf(science, template, subtraction)
        if prefiltered:
            if subtraction.convolved != "template":
                msg = ("a pre-filtered (pre-convolution) subtraction must convolve the "
                       f"template, got convolved={subtraction.convolved!r}")
                raise skydiff.InputError(msg)
            prefilter = self._prefilter(subtraction.prefilter)
        else:
            if model is None:
                msg = ("the score of a plain difference needs its PSF (difference, science or "
                       "template PSF) for the matched filter; none is set")
                raise skydiff.InputError(msg)
            psf_stamp = _psf_stamp(model, cx, cy)
            prefilter = np.ascontiguousarray(psf_stamp[::-1, ::-1] / psf_stamp.sum())
        with self.timer("run"):
            unconvolved, convolved = _roles(science, template, subtraction)
            kernel = _kernel_image(subtraction.kernel, cx, cy)
            correction = _math.Correction(
                "score_prefiltered" if prefiltered else "score_matched", kernel, prefilter,
                self._sigma2(unconvolved, label="unconvolved"),
                self._sigma2(convolved, label="convolved"))
            self._check_sigmas(correction.sigma2_u, correction.sigma2_c)
            image, variance, w_u, w_c = _math.decorrelate_block(
                source.image, self._bad_pixels(source), unconvolved.variance,
                convolved.variance, correction, complete_variance=self.config.complete_variance,
                variance_scale=_variance_scale(correction, subtraction))
            psf = source.psf
            updated = False
            how = "none"
            if self.config.update_psf:
                if isinstance(model, skydiff.PolynomialPsf) or (
                        model is not None and not prefiltered):
                    # c_u ⊗ P(x, y) for a PolynomialPsf; the centre otherwise (exact for
                    # GaussianPsf / ImagePsf, with a warning for protocol-only PSFs)
                    kernel_u: NDArray[np.float64] | None = None
                    if isinstance(model, skydiff.PolynomialPsf):
                        kernel_u, compact = correction.unconvolved_kernel()
                        kernel_u = kernel_u if compact else None
                    new, how = self._filtered_psf(
                        model, kernel_u, (cx, cy),
                        lambda stamp: correction.filtered_psf(
                            None if prefiltered else stamp))
                else:
                    new, how = _math.psf_from_stamp(correction.filtered_psf(psf_stamp),
                                                    (cx, cy)), "constant"
                if new is not None:
                    psf, updated = new, True
        metadata = _metadata(correction, w_u, w_c, subtraction)
        metadata.update(prefiltered=prefiltered, psf_updated=updated,
                        psf_model=how if updated else "none")
        score = source.evolve(image=_frozen(image), variance=_frozen(variance), psf=psf)
        return skydiff.DecorrelationResult(difference=subtraction.difference, score=score,
                                           metadata=metadata)

    @staticmethod
    def _prefilter(value: Any) -> NDArray[np.float64]:
        array = np.asarray(value, dtype=np.float64)
        if (array.ndim != 2 or array.shape[0] % 2 == 0 or array.shape[1] % 2 == 0
                or not np.all(np.isfinite(array)) or not array.sum() > 0.0):
            msg = ("subtraction.prefilter must be a finite 2-D array with odd sizes and a "
                   f"positive sum, got shape {array.shape}")
            raise skydiff.InputError(msg)
        return array
