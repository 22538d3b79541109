r"""The ``subtraction`` plugin ``al``: Alard–Lupton PSF matching with decorrelation.

A port of ``lsst.ip.diffim``'s ``AlardLuptonSubtractTask`` (ipdiffim §1.5, §2.1–2.7):

1. *inputs* -- same pixel grid (:func:`skydiff.validate_pair`), template coverage
   (:class:`skydiff.NoWorkFound` below ``required_template_fraction``), variance planes
   rescaled to the measured noise, PSFs estimated where missing;
2. *mode* -- which image is convolved: ``convolveTemplate`` (default), ``convolveScience``,
   or ``auto`` (``_shapeTest``: convolve the template unless it is broader than the science
   along both axes);
3. *basis* -- the ``kernel_basis`` plugin (``al`` by default) from the two FWHMs;
4. *kernel sources* -- :func:`._sources.select_kernel_sources`;
5. *kernel* -- the spatially varying least squares of Alard (2000) over stamps cut from the
   images, with candidate rejection (:func:`._solve.fit_psf_matching_kernel`):

   .. math::

       I(\mathbf p) \simeq \sum_j a_j(x, y)\,(B_j \otimes R)(\mathbf p) + b(x, y),

   with :math:`R` the convolved image, :math:`I` the other one, :math:`a_j` and :math:`b`
   Chebyshev polynomials of orders ``spatial_kernel_order`` and ``spatial_bg_order``;
6. *difference* (science flux units), with :math:`\kappa = \sum_j a_j B_j` and
   :math:`k = \sum\kappa`:

   .. math::

       D = S - \kappa\otimes T - b \quad (\texttt{convolveTemplate}),\qquad
       D = \frac{\kappa\otimes S + b - T}{k} \quad (\texttt{convolveScience}),

   the differential background :math:`b` being removed when ``subtract_background`` (the
   default; the result's ``background`` holds it in the units of :math:`D`);
7. *decorrelation* -- the ``decorrelation`` plugin (``dmtn021`` by default, DMTN-021 /
   DMTN-179), whose corrected difference, variance and PSF are returned.

The differential background
---------------------------
A background term is fitted jointly with the kernel (``fit_background``), as upstream, so
that a real sky difference does not bias the kernel. That stamp-based background is a poor
estimate of the sky of the difference, however: on the :math:`(K+2)^2` fit boxes it trades
off against the broad components of the basis, and with a noisy template the kernel is
biased (errors in the variables: the template noise enters the design matrix). For equal
seeing and equal noise (scenario A1) the per-stamp kernel sums come out 7 % high and the
backgrounds correspondingly negative; subtracting that background offsets the whole
difference by 5 σ/√N_pix, the limit of the A1 test. ``background_method = "sky"`` (the
default) therefore re-determines :math:`b` -- the same Chebyshev model -- by a robust
inverse-variance fit to the unmasked, non-``DETECTED`` pixels of :math:`D` itself
(:func:`._common.fit_sky_background`); it recovers the six parameters of scenario A5 to
better than 1 % (upstream's test allows 30 %). ``"kernel_fit"`` keeps upstream's value.

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
.. [2] Alard, C. 2000, A&AS 144, 363.
.. [3] Becker, A. C. et al. 2012, MNRAS 425, 1341.
.. [4] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021, "Implementation of image difference
   decorrelation".
.. [5] Lupton, R. H. et al., DMTN-179, "Image differencing with ZOGY and AL".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
from astropy.table import Table

import skydiff
from skydiff.parallel import parallel_map, parallel_rows

from . import _solve
from ._common import (
    exposure_bbox,
    fit_sky_background,
    frozen,
    mask_hygiene,
    merge_masks,
    psf_axis_fwhms,
    psf_fwhm,
    scale_variances,
    spatial_image,
)
from ._model_kernel import (
    PsfImage,
    PsfModelsConfig,
    calibration_ratio,
    candidate_grid,
    describe,
    fit_model_kernel,
    grid_table,
    match_residuals,
    psf_stamps,
    scale_kernel,
    stellar_flux_ratio,
)
from ._sources import (
    KernelSourcesConfig,
    KernelSourceSelection,
    default_min_sources,
    select_kernel_sources,
)

__all__ = [
    "AlSubtraction",
    "AlSubtractionConfig",
    "KernelConditionError",
    "MatchingConfig",
    "PsfMatchConfig",
]

_MODES = {
    "convolveTemplate": "convolve the template to the science PSF: D = S - κ⊗T - b",
    "convolveScience": "convolve the science to the template PSF: D = (κ⊗S + b - T)/Σκ",
    "auto": "convolve the template unless it is broader than the science along both axes "
            "(lsst _shapeTest)",
}


class KernelConditionError(skydiff.AlgorithmError):
    """The spatial kernel system is too ill-conditioned to give a trustworthy kernel."""


@skydiff.configclass
class MatchingConfig(skydiff.Config):
    """Settings shared by every PSF-matching subtraction (``al``, ``al_preconvolve``,
    ``model_psf``): inputs, PSFs, kernel basis, spatial model and differential background.

    :class:`PsfMatchConfig` adds the settings of the kernel fit on stars.
    """

    kernel_basis: Any = skydiff.RegistryField(
        "kernel_basis", default="al", doc="Basis of the PSF-matching kernel.")
    psf_estimator: Any = skydiff.RegistryField(
        "psf_estimator", default="empirical",
        doc="Estimates the PSF of an input that has none.")
    psf_fallback: Any = skydiff.RegistryField(
        "psf_estimator", default="gaussian_moments",
        doc="Used when psf_estimator raises PsfEstimationError (too few or poor stars).")
    use_psf_fallback: bool = skydiff.Field(
        True, doc="Fall back to psf_fallback when psf_estimator fails; False lets the "
                  "PsfEstimationError propagate.")
    kernel_sources: KernelSourcesConfig = skydiff.ConfigField(
        KernelSourcesConfig, doc="Selection of the stars the kernel is fitted on (model_psf: "
                                 "the stars its photometric scale is measured on).")
    spatial_kernel_order: int = skydiff.RangeField(
        1, min=0, max=6, doc="Total degree of the polynomials of position of the kernel "
                             "coefficients (spatialKernelOrder; the subtraction task uses 1).")
    spatial_bg_order: int = skydiff.RangeField(
        2, min=0, max=6, doc="Total degree of the differential background (spatialBgOrder).")
    spatial_kind: str = skydiff.ChoiceField(
        "chebyshev", allowed={"chebyshev": "Chebyshev polynomials of the first kind",
                              "polynomial": "monomials"},
        doc="Family of the spatial functions (spatialModelType).")
    fit_background: bool = skydiff.Field(
        True, doc="Fit a differential background (fitForBackground): with the kernel on the "
                  "stamps and on the sky of the difference (background_method); model_psf: "
                  "on the sky of the difference only.")
    subtract_background: bool = skydiff.Field(
        True, doc="Remove the fitted background from the difference (upstream's "
                  "doSubtractBackground, default False there because its detection step "
                  "re-fits the sky). The result's background field holds it either way.")
    use_pca: str = skydiff.ChoiceField(
        "auto", allowed={"auto": "for bases without a photometric first kernel (delta "
                                 "functions), as upstream usePcaForSpatialKernel",
                         "always": "always", "never": "never"},
        doc="Fit the spatial model on a PCA basis of the per-stamp kernels.")
    n_pca_components: int = skydiff.RangeField(
        5, min=1, doc="PCA basis size including the mean kernel (numPrincipalComponents).")
    subtract_mean_for_pca: bool = skydiff.Field(
        True, doc="Decompose the per-stamp kernels about their mean (subtractMeanForPca).")
    required_template_fraction: float = skydiff.RangeField(
        0.1, min=0.0, max=1.0, doc="Raise NoWorkFound when the template covers less of the "
                                   "science image (requiredTemplateFraction).")
    min_template_fraction_for_expected_success: float = skydiff.RangeField(
        0.2, min=0.0, max=1.0,
        doc="Below this coverage a failed kernel fit becomes NoWorkFound "
            "(minTemplateFractionForExpectedSuccess).")
    do_scale_variance: bool = skydiff.Field(
        True, doc="Rescale both variance planes to the measured pixel noise (doScaleVariance).")
    max_wcs_offset: float = skydiff.RangeField(
        1.0, min=0.0, doc="Largest offset (science pixels) between the two WCSs; sub-pixel "
                          "offsets are absorbed by the kernel, larger ones mean the template "
                          "was not resampled onto the science grid.")
    preserve_template_planes: tuple[str, ...] = skydiff.ListField(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"), dtype=str,
        doc="Template mask planes kept for the difference (preserveTemplateMask); the others "
            "are cleared, SAT and INJECTED being copied to *_TEMPLATE first.")

    def _validate(self) -> None:
        if self.min_template_fraction_for_expected_success < self.required_template_fraction:
            msg = ("min_template_fraction_for_expected_success must be >= "
                   "required_template_fraction")
            raise skydiff.ConfigError(msg)


@skydiff.configclass
class PsfMatchConfig(MatchingConfig):
    """Settings of the PSF-matching subtractions whose kernel is fitted on stars (``al``,
    ``al_preconvolve``): :class:`MatchingConfig` plus the candidate fit and rejection."""

    background_method: str = skydiff.ChoiceField(
        "sky", allowed={
            "sky": "robust inverse-variance fit of the spatial polynomial to the sky pixels "
                   "of the raw difference (unbiased; the kernel-fit background trades off "
                   "against the broad kernel terms on the small stamps)",
            "kernel_fit": "the background solved jointly with the kernel on the stamps "
                          "(upstream)"},
        doc="How the differential background removed from the difference is determined.")
    weighting: str = skydiff.ChoiceField(
        "constant", allowed={"constant": "one weight per stamp: 1/median(V_S + V_T) "
                                         "(constantVarianceWeighting, upstream default)",
                             "pixel": "1/(V_S + V_T) per pixel"},
        doc="Weights of the per-stamp least squares.")
    max_iterations: int = skydiff.RangeField(
        3, min=1, max=5, doc="Spatial fit / candidate assessment rounds (maxSpatialIterations).")
    single_kernel_clipping: bool = skydiff.Field(
        True, doc="Reject candidates whose own kernel leaves outlying residuals.")
    kernel_sum_clipping: bool = skydiff.Field(
        True, doc="Reject candidates whose kernel sum is a 3σ outlier (variables, blends).")
    spatial_kernel_clipping: bool = skydiff.Field(
        True, doc="Reject candidates badly fitted by the spatial model and refit.")
    residual_mean_max: float = skydiff.RangeField(
        0.25, min=0.0, inclusive_min=False,
        doc="Largest |mean| of a candidate's residual / sigma (candidateResidualMeanMax).")
    residual_std_max: float = skydiff.RangeField(
        1.5, min=0.0, inclusive_min=False,
        doc="Largest rms of a candidate's residual / sigma (candidateResidualStdMax).")
    core_radius: int | None = skydiff.RangeField(
        None, min=0, optional=True,
        doc="Residual statistics in the central (2r+1)² box only (useCoreStats); None: the "
            "whole fitted box.")
    single_precision_fit: bool = skydiff.Field(
        True, doc="Convolve the stamps with the basis in single precision (2-4x faster "
                  "kernel fit; changes the difference by ~1e-5 of its noise rms).")
    max_ksum_sigma: float = skydiff.RangeField(
        3.0, min=0.0, inclusive_min=False, doc="Kernel-sum clipping threshold (maxKsumSigma).")
    check_condition_number: bool = skydiff.Field(
        True, doc="Reject ill-conditioned candidates and raise KernelConditionError for an "
                  "ill-conditioned spatial system (upstream: off).")
    max_stamp_condition: float = skydiff.RangeField(
        1e10, min=1.0,
        doc="Largest condition number (eigenvalue ratio of the Jacobi-scaled normal matrix) "
            "of a candidate's own system; healthy AL stamps stay below ~2e7.")
    max_spatial_condition: float = skydiff.RangeField(
        1e11, min=1.0,
        doc="Largest condition number of the spatial system; healthy fits stay below ~1e8, "
            "kernel stars crowded into one corner for a quadratic model reach ~1e12.")


@skydiff.configclass
class AlSubtractionConfig(PsfMatchConfig):
    """Settings of the ``al`` subtraction."""

    mode: str = skydiff.ChoiceField(
        "convolveTemplate", allowed=_MODES, doc="Which image the kernel convolves.")
    decorrelation: Any = skydiff.RegistryField(
        "decorrelation", default="dmtn021",
        doc="Whitens the difference (DMTN-021); 'none' to skip.")


@attrs.frozen
class _Prepared:
    """Inputs after validation, variance scaling and PSF estimation (masks untouched)."""

    science: skydiff.Exposure
    template: skydiff.Exposure
    coverage: float
    variance_factors: tuple[float, float]
    fwhm_science: float
    fwhm_template: float
    psf_metadata: dict[str, Any]


@attrs.frozen
class _KernelFit:
    """A fitted spatial kernel with its background and provenance."""

    kernel: skydiff.BasisKernel
    background_coefficients: np.ndarray = attrs.field(eq=False)
    background_order: int
    fit: _solve.KernelFitResult
    selection: KernelSourceSelection
    basis: skydiff.KernelBasisResult


class PsfMatchSubtraction(skydiff.Subtraction):
    """Shared machinery of the PSF-matching subtraction plugins (not registered itself).

    Inputs (:meth:`_prepare`), kernels from stars (:meth:`_fit_kernel`) or from the PSF
    models (:meth:`_fit_model_kernel`), the differential background and the
    convolve-and-subtract path of ``al`` and ``model_psf`` (:meth:`_subtract_matched`),
    which differ only in their kernel-source step (:meth:`_match`).
    """

    ConfigClass = PsfMatchConfig

    def __init__(self, config: skydiff.Config | None = None, *, name: str | None = None,
                 parent: skydiff.Task | None = None) -> None:
        super().__init__(config, name=name, parent=parent)
        self.make_subtask("kernel_basis")
        self.make_subtask("decorrelation")
        self.make_subtask("psf_estimator")
        self.make_subtask("psf_fallback")

    # -- inputs ------------------------------------------------------------------------

    def _estimate_psf(self, exposure: skydiff.Exposure, label: str
                      ) -> tuple[skydiff.Exposure, dict[str, Any]]:
        if exposure.psf is not None:
            return exposure, {f"{label}_psf": "given"}
        try:
            result = self.psf_estimator.run(exposure)
            used = type(self.psf_estimator).name
        except skydiff.PsfEstimationError as exc:
            if not self.config.use_psf_fallback:
                raise
            self.log.warning("%s PSF estimation failed (%s); falling back to %s", label, exc,
                             type(self.psf_fallback).name)
            result = self.psf_fallback.run(exposure)
            used = type(self.psf_fallback).name
        return exposure.evolve(psf=result.psf), {f"{label}_psf": f"estimated:{used}"}

    def _prepare(self, science: Any, template: Any, timings: dict[str, dict[str, float]]
                 ) -> _Prepared:
        config = self.config
        skydiff.validate_pair(science, template, max_wcs_offset=config.max_wcs_offset)
        coverage = skydiff.template_coverage(science, template)
        if coverage < config.required_template_fraction:
            msg = (f"the template covers {coverage:.1%} of the science image, less than the "
                   f"required {config.required_template_fraction:.1%}")
            raise skydiff.NoWorkFound(msg)
        with self.timer("psf") as timings["psf"]:
            factors = (1.0, 1.0)
            if config.do_scale_variance:
                science, template, f_s, f_t = scale_variances(science, template)
                factors = (f_s, f_t)
            science, meta_s = self._estimate_psf(science, "science")
            template, meta_t = self._estimate_psf(template, "template")
            fwhm_s = psf_fwhm(science)
            fwhm_t = psf_fwhm(template)
        return _Prepared(science=science, template=template, coverage=coverage,
                         variance_factors=factors, fwhm_science=fwhm_s, fwhm_template=fwhm_t,
                         psf_metadata={**meta_s, **meta_t})

    # -- kernel ------------------------------------------------------------------------

    def _min_sources(self) -> int:
        config = self.config
        return default_min_sources(kernel_order=config.spatial_kernel_order,
                                   background_order=config.spatial_bg_order,
                                   fit_background=config.fit_background)

    def _regularization(self, basis: skydiff.KernelBasisResult) -> _solve.Regularization | None:
        if basis.regularization is None:
            return None
        settings = dict(basis.metadata.get("regularization") or {})
        if not settings.get("enabled", True):
            return None
        keys = ("lambda_type", "lambda_value", "lambda_scaling", "lambda_min", "lambda_max",
                "lambda_step", "lambda_step_type", "lambda_grid_scale", "max_condition")
        kwargs = {key: settings[key] for key in keys if key in settings}
        kwargs.setdefault("lambda_type", "minimize_unbiased_risk")
        try:
            return _solve.Regularization(matrix=basis.regularization, **kwargs)
        except (TypeError, ValueError) as exc:
            msg = f"invalid regularization from the kernel basis: {exc}"
            raise skydiff.ConfigError(msg) from exc

    @contextlib.contextmanager
    def _expected_success(self, coverage: float) -> Iterator[None]:
        """Turn an :class:`skydiff.AlgorithmError` of the kernel step into
        :class:`skydiff.NoWorkFound` when the template covers less than
        ``min_template_fraction_for_expected_success`` of the science image."""
        try:
            yield
        except skydiff.AlgorithmError as exc:
            if coverage < self.config.min_template_fraction_for_expected_success:
                msg = (f"the kernel fit failed ({exc}) and the template covers only "
                       f"{coverage:.1%} of the science image")
                raise skydiff.NoWorkFound(msg) from exc
            raise

    def _fit_kernel(self, convolved: skydiff.Exposure, matched_to: skydiff.Exposure, *,
                    science: skydiff.Exposure, template: skydiff.Exposure,
                    basis: skydiff.KernelBasisResult, sources: Table | None,
                    fwhm_science: float, fwhm_template: float, coverage: float,
                    timings: dict[str, dict[str, float]], margin: int = 0,
                    mask_exposure: skydiff.Exposure | None = None) -> _KernelFit:
        """Select kernel sources and fit ``matched_to ≈ κ ⊗ convolved + b``."""
        config = self.config
        kernel_size = int(basis.basis.shape[1])
        with self._expected_success(coverage):
            with self.timer("sources") as timings["sources"]:
                selection = select_kernel_sources(
                    science, template, kernel_size=kernel_size, config=config.kernel_sources,
                    min_sources=self._min_sources(), sources=sources, fwhm=fwhm_science,
                    template_fwhm=fwhm_template, margin=margin, mask_exposure=mask_exposure)
            with self.timer("solve") as timings["solve"]:
                fit, bbox = self._solve(convolved, matched_to, basis, selection, kernel_size)
        kernel = skydiff.BasisKernel(fit.basis, fit.coefficients,
                                     order=config.spatial_kernel_order, bbox=bbox,
                                     kind=config.spatial_kind)
        return _KernelFit(kernel=kernel, background_coefficients=fit.background_coefficients,
                          background_order=config.spatial_bg_order, fit=fit,
                          selection=selection, basis=basis)

    def _solve(self, convolved: skydiff.Exposure, matched_to: skydiff.Exposure,
               basis: skydiff.KernelBasisResult, selection: KernelSourceSelection,
               kernel_size: int) -> tuple[_solve.KernelFitResult, tuple[float, ...]]:
        config = self.config
        table = selection.table[selection.index]
        x0, y0 = matched_to.origin
        bad = tuple(config.kernel_sources.bad_planes)
        stamps = _solve.StampSet.from_images(
            convolved.image, matched_to.image,
            science_variance=matched_to.variance, template_variance=convolved.variance,
            x=np.asarray(table["x"], dtype=np.float64) + x0,
            y=np.asarray(table["y"], dtype=np.float64) + y0,
            size=2 * kernel_size + 1,
            mask=matched_to.mask, mask_bits=_bits(matched_to.mask_planes, bad),
            template_mask=convolved.mask, template_mask_bits=_bits(convolved.mask_planes, bad),
            origin=(x0, y0))
        bbox = exposure_bbox(matched_to)
        use_pca = (config.use_pca == "always"
                   or (config.use_pca == "auto" and not basis.constant_first))
        check = config.check_condition_number
        try:
            fit = _solve.fit_psf_matching_kernel(
                stamps, basis.basis, bbox=bbox,
                spatial_kernel_order=config.spatial_kernel_order,
                spatial_bg_order=config.spatial_bg_order, spatial_kind=config.spatial_kind,
                fit_background=config.fit_background,
                constant_first=bool(basis.constant_first or use_pca),
                weighting=config.weighting, regularization=self._regularization(basis),
                use_pca=use_pca, n_pca_components=config.n_pca_components,
                subtract_mean_for_pca=config.subtract_mean_for_pca,
                max_iterations=config.max_iterations,
                single_kernel_clipping=config.single_kernel_clipping,
                spatial_kernel_clipping=config.spatial_kernel_clipping,
                kernel_sum_clipping=config.kernel_sum_clipping,
                residual_mean_max=config.residual_mean_max,
                residual_std_max=config.residual_std_max, core_radius=config.core_radius,
                max_ksum_sigma=config.max_ksum_sigma,
                stamp_condition_max=config.max_stamp_condition if check else None,
                condition_max=config.max_spatial_condition if check else None,
                min_candidates=self._min_sources(),
                single_precision=config.single_precision_fit)
        except _solve.IllConditionedError as exc:
            raise KernelConditionError(str(exc), **exc.metadata) from exc
        except _solve.NoKernelCandidatesError as exc:
            raise skydiff.NoKernelCandidatesError(str(exc), **exc.metadata) from exc
        except ValueError as exc:
            msg = f"the kernel fit failed: {exc}"
            raise skydiff.NoKernelCandidatesError(msg) from exc
        return fit, bbox

    def _fit_model_kernel(self, convolved: skydiff.Exposure, matched_to: skydiff.Exposure, *,
                          settings: PsfModelsConfig, basis: skydiff.KernelBasisResult,
                          science: skydiff.Exposure, template: skydiff.Exposure,
                          sources: Table | None, fwhm_science: float, fwhm_template: float,
                          coverage: float, timings: dict[str, dict[str, float]],
                          reference_psf: PsfImage | None = None, margin: int = 0,
                          mask_exposure: skydiff.Exposure | None = None,
                          ) -> tuple[_KernelFit, dict[str, Any]]:
        r"""The kernel matching the PSF model of ``convolved`` to that of ``matched_to``.

        Candidates are the two PSF models on a grid of positions (:mod:`._model_kernel`); the
        kernel is solved by :func:`._solve.fit_psf_matching_kernel` with clipping off, then
        scaled to the photometric ratio (:meth:`_photometric_scale`). ``reference_psf``
        replaces ``matched_to``'s PSF model (the pre-filtered science's
        :math:`P_S\otimes H`); ``sources``, ``margin`` and ``mask_exposure`` are for the
        stars of the photometric scale, as in :meth:`_fit_kernel`; an expected failure
        becomes :class:`skydiff.NoWorkFound` at low ``coverage`` as there.

        Returns
        -------
        tuple
            The :class:`_KernelFit` (``selection`` = the grid of PSF candidates, background
            coefficients zero) and its metadata.
        """
        config = self.config
        conv_psf, ref_psf = convolved.psf, matched_to.psf
        reference = reference_psf
        if reference is None and ref_psf is not None:
            reference = ref_psf.kernel_image
        if conv_psf is None or reference is None:
            msg = "model-PSF matching needs PSF models on both exposures"
            raise skydiff.InputError(msg)
        kernel_size = int(basis.basis.shape[1])
        x0, y0 = matched_to.origin
        with self.timer("psf_candidates") as timings["psf_candidates"]:
            gx, gy = candidate_grid(matched_to.shape, cell_size=settings.cell_size,
                                    min_per_axis=config.spatial_kernel_order + 2)
            stamps = psf_stamps(conv_psf.kernel_image, reference, gx + x0, gy + y0,
                                kernel_size=kernel_size, pad_factor=settings.pad_factor)
        bbox = exposure_bbox(matched_to)
        use_pca = (config.use_pca == "always"
                   or (config.use_pca == "auto" and not basis.constant_first))
        with self._expected_success(coverage):
            with self.timer("solve") as timings["solve"]:
                try:
                    fit = fit_model_kernel(
                        stamps, basis.basis, bbox=bbox,
                        spatial_kernel_order=config.spatial_kernel_order,
                        spatial_kind=config.spatial_kind,
                        constant_first=bool(basis.constant_first or use_pca),
                        regularization=self._regularization(basis), use_pca=use_pca,
                        n_pca_components=config.n_pca_components,
                        subtract_mean_for_pca=config.subtract_mean_for_pca)
                except _solve.NoKernelCandidatesError as exc:
                    raise skydiff.NoKernelCandidatesError(str(exc), **exc.metadata) from exc
                except ValueError as exc:
                    msg = f"the model-PSF kernel fit failed: {exc}"
                    raise skydiff.NoKernelCandidatesError(msg) from exc
            unit = scale_kernel(skydiff.BasisKernel(fit.basis, fit.coefficients,
                                                    order=config.spatial_kernel_order,
                                                    bbox=bbox, kind=config.spatial_kind), 1.0)
            residuals = match_residuals(stamps, unit.images_at(stamps.x, stamps.y))
            with self.timer("photometric_scale") as timings["photometric_scale"]:
                kernel_sum, scale_meta = self._photometric_scale(
                    settings, convolved, matched_to, unit, reference, science=science,
                    template=template, sources=sources, kernel_size=kernel_size,
                    fwhm_science=fwhm_science, fwhm_template=fwhm_template, margin=margin,
                    mask_exposure=mask_exposure)
            kernel = scale_kernel(unit, kernel_sum)
        n_bg = (config.spatial_bg_order + 1) * (config.spatial_bg_order + 2) // 2
        table = grid_table(gx, gy, fit, residuals)
        selection = KernelSourceSelection(table=table, index=np.arange(len(table)))
        kernel_fit = _KernelFit(kernel=kernel, background_coefficients=np.zeros(n_bg),
                                background_order=config.spatial_bg_order, fit=fit,
                                selection=selection, basis=basis)
        basis_meta = {key: value for key, value in basis.metadata.items()
                      if key != "regularization"}
        metadata: dict[str, Any] = {
            "kernel_source": "model_psf",
            "kernel_sum": float(kernel.sum),
            **scale_meta,
            **describe(fit, residuals, stamps.stamp_shape[0]),
            "spatial_condition_number": _finite(fit.spatial_condition_number),
            "kernel_size": kernel_size,
            "n_basis": int(fit.basis.shape[0]),
            "basis": basis_meta,
        }
        return kernel_fit, metadata

    def _photometric_scale(self, settings: PsfModelsConfig, convolved: skydiff.Exposure,
                           matched_to: skydiff.Exposure, kernel: skydiff.BasisKernel,
                           reference: PsfImage, *,
                           science: skydiff.Exposure, template: skydiff.Exposure,
                           sources: Table | None, kernel_size: int, fwhm_science: float,
                           fwhm_template: float, margin: int,
                           mask_exposure: skydiff.Exposure | None
                           ) -> tuple[float, dict[str, Any]]:
        """The kernel sum of a model-PSF kernel (``settings.kernel_sum_source``).

        Returns the sum and the metadata ``kernel_sum_source`` (``calibration``, ``stars``,
        ``fixed`` or ``unity``), ``kernel_sum_err`` and, for stars, ``n_photometry_stars``
        (selected) and ``n_photometry_stars_used`` (kept by the clipping); ``unity`` comes with
        a ``kernel_sum_note``.

        Raises
        ------
        skydiff.InputError
            ``calibration`` without photometric calibrations on both exposures.
        skydiff.InsufficientKernelSourcesError
            ``stars`` with fewer usable stars than ``min_photometry_stars``.
        """
        source = settings.kernel_sum_source
        if source == "fixed":
            return float(settings.fixed_kernel_sum), {"kernel_sum_source": "fixed",
                                                      "kernel_sum_err": 0.0}
        if source in ("auto", "calibration"):
            calibrated = calibration_ratio(convolved, matched_to)
            if calibrated is not None:
                return calibrated[0], {"kernel_sum_source": "calibration",
                                       "kernel_sum_err": calibrated[1]}
            if source == "calibration":
                msg = ("kernel_sum_source = 'calibration' needs a photometric calibration "
                       "(photo_calib) on both exposures; set them or use 'stars' / 'fixed'")
                raise skydiff.InputError(msg)
        config = self.config
        try:
            selection = select_kernel_sources(
                science, template, kernel_size=kernel_size, config=config.kernel_sources,
                min_sources=settings.min_photometry_stars, sources=sources, fwhm=fwhm_science,
                template_fwhm=fwhm_template, margin=margin, mask_exposure=mask_exposure)
            table = selection.table[selection.index]
            bad = tuple(config.kernel_sources.bad_planes)
            ratio = stellar_flux_ratio(
                convolved, matched_to, kernel, reference,
                np.asarray(table["x"], dtype=np.float64),
                np.asarray(table["y"], dtype=np.float64),
                bad_bits=(_bits(matched_to.mask_planes, bad),
                          _bits(convolved.mask_planes, bad)))
            needed = int(config.kernel_sources.min_sources or settings.min_photometry_stars)
            if ratio.n_used < needed or not (math.isfinite(ratio.ratio) and ratio.ratio > 0):
                msg = (f"only {ratio.n_used} star(s) gave a usable flux ratio (need {needed})"
                       f"; pass a source list or use kernel_sum_source = 'calibration' or "
                       f"'fixed'")
                raise skydiff.InsufficientKernelSourcesError(
                    msg, n_found=ratio.n_used, n_needed=needed)
        except skydiff.InsufficientKernelSourcesError as exc:
            if source == "stars":
                raise
            note = (f"no photometric calibrations and no stellar flux ratio ({exc}); the "
                    f"kernel sum is 1, i.e. both images are assumed on the same photometric "
                    f"scale")
            self.log.warning("%s", note)
            return 1.0, {"kernel_sum_source": "unity", "kernel_sum_err": float("nan"),
                         "kernel_sum_note": note}
        return ratio.ratio, {"kernel_sum_source": "stars", "kernel_sum_err": ratio.error,
                             "n_photometry_stars": selection.n_selected,
                             "n_photometry_stars_used": ratio.n_used}

    def _background_method(self) -> str:
        """How the differential background is determined (``background_method``)."""
        return str(getattr(self.config, "background_method", "sky"))

    def _difference(self, fit: _KernelFit, raw: _RawDifference, *,
                    science: skydiff.Exposure, template: skydiff.Exposure
                    ) -> tuple[skydiff.Exposure, np.ndarray, np.ndarray]:
        """The difference exposure, its differential background and the coefficients.

        The background of the raw difference (:meth:`_difference_background`) is removed
        from ``raw.image`` in place when ``subtract_background``; the planes become the
        difference exposure without a copy (``raw.like`` lends the metadata).
        """
        background, coefficients = self._difference_background(fit, raw, science, template)
        if self.config.subtract_background:

            def subtract(rows: slice) -> None:
                np.subtract(raw.image[rows], background[rows], out=raw.image[rows])

            parallel_rows(lambda start, stop: subtract(slice(start, stop)), raw.image.shape[0])
        changes: dict[str, Any] = {} if raw.psf is _SAME_PSF else {"psf": raw.psf}
        difference = raw.like.evolve(image=frozen(raw.image), variance=frozen(raw.variance),
                                     mask=frozen(raw.mask), mask_planes=raw.planes, **changes)
        return difference, background, coefficients

    def _difference_background(self, fit: _KernelFit, raw: _RawDifference,
                               science: skydiff.Exposure, template: skydiff.Exposure
                               ) -> tuple[np.ndarray, np.ndarray]:
        """The differential background of ``raw`` (in its units) and its coefficients.

        ``background_method = "sky"`` fits the spatial polynomial to the sky pixels of the
        raw difference (:func:`._common.fit_sky_background`); ``"kernel_fit"`` uses the
        background solved with the kernel (divided by :math:`-k` for ``convolveScience``).
        The image is a new float32 array, evaluated separably (:func:`._common.spatial_image`).
        """
        config = self.config
        n_terms = (config.spatial_bg_order + 1) * (config.spatial_bg_order + 2) // 2
        shape, origin = raw.image.shape, raw.like.origin
        if not config.fit_background:
            return np.zeros(shape, dtype=np.float32), np.zeros(n_terms)
        kernel = fit.kernel
        if self._background_method() == "kernel_fit":
            coefficients = np.asarray(fit.background_coefficients, dtype=np.float64)
            image = spatial_image(coefficients, order=fit.background_order, bbox=kernel.bbox,
                                  kind=kernel.kind, shape=shape, origin=origin)
            if raw.inverse_ksum is not None:
                np.multiply(image, raw.inverse_ksum, out=image)
                np.negative(image, out=image)
                coefficients = -coefficients / kernel.sum
            return image, coefficients
        exclude = (*config.kernel_sources.bad_planes, "DETECTED", "DETECTED_NEGATIVE")
        bad_bits = _bits(raw.planes, tuple(config.kernel_sources.bad_planes))
        coefficients = fit_sky_background(
            raw.image, raw.variance,
            lambda rows, cols: ~((raw.mask[rows, cols] & np.uint32(bad_bits)) != 0
                                 | _flags(science, exclude, rows, cols)
                                 | _flags(template, exclude, rows, cols)),
            order=config.spatial_bg_order, bbox=kernel.bbox, kind=kernel.kind,
            origin=origin)
        image = spatial_image(coefficients, order=config.spatial_bg_order, bbox=kernel.bbox,
                              kind=kernel.kind, shape=shape, origin=origin)
        return image, coefficients

    # -- the convolve-and-subtract path (al, model_psf) ------------------------------

    def _convolution_mode(self, prepared: _Prepared) -> str:
        """``config.mode`` with ``auto`` resolved (upstream ``_shapeTest``): convolve the
        template unless it is broader than the science along both axes."""
        mode = str(self.config.mode)
        if mode == "auto":
            tx, ty = psf_axis_fwhms(prepared.template)
            sx, sy = psf_axis_fwhms(prepared.science)
            mode = "convolveTemplate" if (tx <= sx or ty <= sy) else "convolveScience"
        return mode

    def _match(self, prepared: _Prepared, *, convolve_template: bool, sources: Table | None,
               timings: dict[str, dict[str, float]]) -> tuple[_KernelFit, dict[str, Any]]:
        """The kernel-source step: basis and spatial kernel from stars (``al``).

        Returns the fit and its metadata; ``model_psf`` overrides this step only.
        """
        science_p, template_p = prepared.science, prepared.template
        convolved, matched_to = ((template_p, science_p) if convolve_template
                                 else (science_p, template_p))
        fwhm_c, fwhm_m = ((prepared.fwhm_template, prepared.fwhm_science) if convolve_template
                          else (prepared.fwhm_science, prepared.fwhm_template))
        basis = self.kernel_basis.run(target_fwhm=fwhm_c, reference_fwhm=fwhm_m)
        fit = self._fit_kernel(convolved, matched_to, science=science_p, template=template_p,
                               basis=basis, sources=sources,
                               fwhm_science=prepared.fwhm_science,
                               fwhm_template=prepared.fwhm_template,
                               coverage=prepared.coverage, timings=timings)
        return fit, self._fit_metadata(fit)

    def _subtract_matched(self, science: Any, template: Any, *, sources: Table | None
                          ) -> skydiff.SubtractionResult:
        """Prepare, match (:meth:`_match`), convolve, subtract, remove the background and
        decorrelate: everything of ``al`` and ``model_psf`` but the kernel source."""
        config = self.config
        timings: dict[str, dict[str, float]] = {}
        prepared = self._prepare(science, template, timings)
        science_p, template_p = prepared.science, prepared.template
        mode = self._convolution_mode(prepared)
        convolve_template = mode == "convolveTemplate"
        fit, fit_metadata = self._match(prepared, convolve_template=convolve_template,
                                        sources=sources, timings=timings)
        kernel = fit.kernel
        with self.timer("convolve") as timings["convolve"]:
            science_c, template_c = mask_hygiene(
                science_p, template_p,
                preserve_template_planes=config.preserve_template_planes)
            raw = self._raw_difference(science_c, template_c, kernel, convolve_template)
            matched = raw.matched
            difference, background, bg_coefficients = self._difference(
                fit, raw, science=science_p, template=template_p)
            del raw
        metadata: dict[str, Any] = {
            "mode": mode,
            "template_coverage": prepared.coverage,
            "variance_scale_science": prepared.variance_factors[0],
            "variance_scale_template": prepared.variance_factors[1],
            "fwhm_science": prepared.fwhm_science,
            "fwhm_template": prepared.fwhm_template,
            **prepared.psf_metadata,
            **fit_metadata,
            "background_coefficients": [float(c) for c in bg_coefficients],
        }
        result = skydiff.SubtractionResult(
            difference=difference, matched_image=matched, kernel=kernel, background=background,
            kernel_sources=self._kernel_sources_table(fit),
            convolved="template" if convolve_template else "science", metadata=metadata)
        with self.timer("decorrelate") as timings["decorrelate"]:
            decorrelated = self.decorrelation.run(science_c, template_c, result)
        metadata["decorrelation"] = dict(decorrelated.metadata)
        metadata["timing"] = timings
        return attrs.evolve(result, difference=decorrelated.difference,
                            score=decorrelated.score, metadata=metadata)

    def _raw_difference(self, science: skydiff.Exposure, template: skydiff.Exposure,
                        kernel: skydiff.BasisKernel, convolve_template: bool) -> _RawDifference:
        r"""The difference before background removal and the matched image.

        ``convolveTemplate``: :math:`S - \kappa\otimes T`, variance
        :math:`V_S + \kappa^2\otimes V_T`, science PSF. ``convolveScience``:
        :math:`(\kappa\otimes S - T)/k`, variance :math:`(\kappa^2\otimes V_S + V_T)/k^2`,
        template PSF, with :math:`k(x, y) = \sum\kappa(x, y)` (``inverse_ksum`` holds
        :math:`1/k`). Each plane is computed once into a new array.
        """
        if convolve_template:
            matched = skydiff.convolve(template, kernel, preserve_planes=())
            # three independent planes, computed in parallel threads
            image, variance, (mask, planes) = parallel_map(lambda plane: plane(), (
                lambda: np.subtract(science.image, matched.image),
                lambda: np.add(science.variance, matched.variance),
                lambda: merge_masks(science, matched.mask, matched.mask_planes)))
            return _RawDifference(image=image, variance=variance, mask=mask, planes=planes,
                                  like=science, matched=matched)
        convolved = skydiff.convolve(science, kernel, preserve_planes=())
        inverse = spatial_image(kernel.spatial_images().sum(axis=(1, 2)), order=kernel.order,
                                bbox=kernel.bbox, kind=kernel.kind, shape=science.shape,
                                origin=science.origin)
        if not np.all(inverse > 0):
            msg = "the PSF-matching kernel sum is not positive everywhere; cannot normalise"
            raise skydiff.NoKernelCandidatesError(msg)
        np.reciprocal(inverse, out=inverse)
        inverse2 = np.square(inverse)
        matched = convolved.evolve(image=frozen(np.multiply(convolved.image, inverse)),
                                   variance=frozen(np.multiply(convolved.variance, inverse2)),
                                   psf=template.psf)
        mask, planes = merge_masks(matched, template.mask, template.mask_planes)
        image = np.multiply(template.image, inverse)
        np.subtract(matched.image, image, out=image)
        variance = np.multiply(template.variance, inverse2, out=inverse2)
        variance += matched.variance
        return _RawDifference(image=image, variance=variance, mask=mask, planes=planes,
                              like=science, matched=matched, inverse_ksum=inverse,
                              psf=template.psf)

    @staticmethod
    def _kernel_sources_table(fit: _KernelFit) -> Table:
        """Every candidate with ``used`` and ``reason`` (selection or fit rejection)."""
        table = fit.selection.table.copy(copy_data=True)
        used = np.zeros(len(table), dtype=bool)
        reasons = np.asarray(table["reason"]).astype("<U16")
        used[fit.selection.index] = fit.fit.used
        reasons[fit.selection.index] = fit.fit.rejection_reasons
        table["used"] = used
        table["reason"] = reasons
        return table

    def _fit_metadata(self, fit: _KernelFit) -> dict[str, Any]:
        result = fit.fit
        n_selected = fit.selection.n_selected
        basis_meta = {key: value for key, value in fit.basis.metadata.items()
                      if key != "regularization"}
        stamp_cond = result.stamp_condition_numbers[np.isfinite(result.stamp_condition_numbers)]
        return {
            "n_kernel_candidates": len(fit.selection.table),
            "n_kernel_sources_selected": n_selected,
            "n_kernel_sources_used": result.n_used,
            "n_kernel_sources_rejected": n_selected - result.n_used,
            "n_spatial_iterations": result.n_iterations,
            "kernel_sum": float(result.kernel_sum_center),
            "kernel_sum_mean": _finite(result.kernel_sum_mean),
            "kernel_sum_std": _finite(result.kernel_sum_std),
            "spatial_condition_number": _finite(result.spatial_condition_number),
            "max_stamp_condition_number": _finite(stamp_cond.max() if stamp_cond.size
                                                  else float("nan")),
            "kernel_size": int(fit.kernel.shape[0]),
            "n_basis": int(fit.kernel.basis.shape[0]),
            "basis": basis_meta,
            "kernel_fit_background_coefficients": [float(c) for c in
                                                   fit.background_coefficients],
        }


#: Marks a :class:`_RawDifference` that keeps the PSF of the exposure it is modelled on.
_SAME_PSF: Any = object()


@attrs.define(eq=False)
class _RawDifference:
    r"""The planes of a difference before background removal (fresh, writable arrays).

    ``like`` is the exposure whose metadata (origin, WCS, calibration, PSF unless ``psf`` is
    given) the difference takes; ``inverse_ksum`` is :math:`1/\sum\kappa` for
    ``convolveScience`` (None otherwise).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    planes: skydiff.MaskPlanes
    like: skydiff.Exposure
    matched: skydiff.Exposure
    inverse_ksum: np.ndarray | None = None
    psf: Any = _SAME_PSF


def _bits(planes: skydiff.MaskPlanes, names: tuple[str, ...]) -> int:
    present = [name for name in names if name in planes.names]
    return planes.value(*present) if present else 0


def _flags(exposure: skydiff.Exposure, planes: tuple[str, ...], rows: slice = slice(None),
           cols: slice = slice(None)) -> np.ndarray:
    """Pixels (of the ``rows``, ``cols`` sample) with any of ``planes`` set."""
    names = [name for name in planes if name in exposure.mask_planes.names]
    mask = exposure.mask[rows, cols]
    if not names:
        return np.zeros(mask.shape, dtype=bool)
    return (mask & np.uint32(exposure.mask_planes.value(*names))) != 0


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


class AlSubtraction(PsfMatchSubtraction):
    r"""Alard–Lupton image subtraction with a spatially varying kernel and decorrelation.

    Fits a kernel :math:`\kappa(x, y) = \sum_j a_j(x, y) B_j` and a background
    :math:`b(x, y)` so that the convolved image matches the other one on stamps around
    isolated stars, applies it to the whole image exactly (one FFT convolution per spatial
    term, :func:`skydiff.convolve`), subtracts, and decorrelates the noise. Sub-pixel shifts
    between the epochs and different photometric scales are absorbed by the kernel; the
    difference is in the science image's flux units:

    .. math::

        D = S - \kappa\otimes T - b \quad (\texttt{convolveTemplate}),\qquad
        D = (\kappa\otimes S + b - T)/k \quad (\texttt{convolveScience}),

    :math:`k = \sum\kappa` (the photometric ratio template/science). The variance planes
    propagate as :math:`V_S + \kappa^2\otimes V_T` (resp. :math:`(\kappa^2\otimes V_S +
    V_T)/k^2`), masks are OR-ed (the convolved image's dilated by the kernel footprint), and
    the PSF is the science's (resp. the template's) before decorrelation.

    The inputs are never modified; variance rescaling, PSF estimation and mask hygiene
    produce new exposures (:meth:`skydiff.Exposure.evolve`).

    Parameters
    ----------
    config : AlSubtractionConfig, optional
        The settings (default: ``AlSubtractionConfig()``).
    name, parent
        As for :class:`skydiff.Task`.

    Notes
    -----
    Deviations from ``lsst.ip.diffim``, with their reasons:

    * the template must already be on the science grid (same shape and origin; WCS offsets
      up to ``max_wcs_offset`` pixels are absorbed by the kernel) instead of containing it:
      resampling is the template getter's job;
    * the spatially varying kernel is applied exactly (one FFT convolution per spatial
      term), not interpolated between grid points;
    * the condition-number checks are on by default, with Jacobi-scaled (unit-free)
      condition numbers, and an ill-conditioned spatial system raises
      :class:`KernelConditionError` instead of a warning;
    * the differential background is subtracted by default and re-determined from the sky
      of the difference (module notes);
    * ``convolveScience`` divides the *whole* difference by the kernel sum,
      :math:`(\kappa\otimes S + b - T)/k`, so that it is in science flux units even when
      the two images are not on the same photometric scale (upstream divides only
      :math:`\kappa\otimes S`, which assumes calibrated inputs);
    * every mask plane of the convolved image, ``NO_DATA`` and ``BAD`` included, is dilated
      by the kernel footprint (upstream preserves those two): a difference pixel whose kernel
      footprint reaches missing or bad data is flagged rather than left silently wrong;
    * kernel sources have no upper S/N limit by default (``_sources``), and on large images
      their cells grow so that about ``kernel_sources.target_sources`` (250) well-spread
      stars are fitted rather than ``n_per_cell`` per 128-pixel cell (thousands on a
      2048 × 4096 frame, for a spatial model of about 85 parameters);
    * the variance factors are measured on up to 2¹⁹ pixels sampled in tiles;
    * the stamps are convolved with the basis in single precision (``single_precision_fit``);
    * the difference PSF is the decorrelated one (upstream leaves it stale).

    References
    ----------
    .. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
    .. [2] Alard, C. 2000, A&AS 144, 363.
    .. [3] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021.
    .. [4] DMTN-179, "Image differencing with ZOGY and AL".
    """

    name = "al"
    ConfigClass = AlSubtractionConfig
    tags = frozenset({"linear", "spatially_varying"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure, *,
            sources: Table | None = None) -> skydiff.SubtractionResult:
        """Subtract ``template`` from ``science``.

        Parameters
        ----------
        science : skydiff.Exposure
            The science exposure.
        template : skydiff.Exposure
            The template, on the science pixel grid (same shape and origin).
        sources : astropy.table.Table, optional
            Kernel source candidates (``x``, ``y``: 0-based column and row); default: stars
            found on the science image.

        Returns
        -------
        skydiff.SubtractionResult
            ``difference`` (decorrelated), ``matched_image`` (the convolved input after
            matching, in science flux units for ``convolveScience``), ``kernel``
            (:class:`skydiff.BasisKernel` in parent coordinates), ``background`` (removed from
            the difference when ``subtract_background``), ``kernel_sources``, ``convolved``
            and ``metadata``.

        Raises
        ------
        skydiff.InputError
            If the inputs are not exposures on the same pixel grid.
        skydiff.NoWorkFound
            If the template covers too little of the science image.
        skydiff.InsufficientKernelSourcesError
            If too few stars are usable.
        skydiff.NoKernelCandidatesError
            If the fit rejects too many candidates.
        KernelConditionError
            If the spatial system is ill-conditioned (``check_condition_number``).
        """
        return self._subtract_matched(science, template, sources=sources)
