r"""The ``subtraction`` plugin ``model_psf``: a matching kernel from the two PSF models.

A port of ``lsst.ip.diffim``'s ``ModelPsfMatchTask`` (ipdiffim §2.13) made into a full
subtraction. It is ``al`` with a different kernel source: everything else -- input checks,
variance rescaling, PSF estimation for inputs without one, the choice of the convolved image,
mask hygiene, the exact spatially varying convolution, the differential background,
the difference in science flux units and the decorrelation -- is the same code
(:meth:`._al.PsfMatchSubtraction._subtract_matched`).

1. *candidates* -- the PSF models of the convolved image (:math:`P_c`) and of the other one
   (:math:`P_r`) evaluated on a grid spanning the image from edge to edge (spacing at most
   ``psf_models.cell_size``, at least ``spatial_kernel_order + 2`` nodes per axis),
   zero-padded to a common size with room for the whole of :math:`\kappa\otimes P_c`
   (``_model_kernel``);
2. *kernel* -- the solver of ``al`` (:func:`._solve.fit_psf_matching_kernel`) on those
   noise-free stamps (constant variance, no masks, no background, no clipping, as
   upstream):

   .. math::

       P_r(\mathbf p;\,x_c, y_c) \simeq \sum_j a_j(x_c, y_c)\,(B_j\otimes P_c)(\mathbf p);

3. *photometric scale* -- the kernel is rescaled to :math:`\sum\kappa = k` from the
   photometric calibrations, else from the flux ratio of matched stars, else 1
   (``psf_models.kernel_sum_source``);
4. *difference* -- as ``al``: :math:`D = S - \kappa\otimes T - b` or
   :math:`(\kappa\otimes S + b - T)/k`, with the background :math:`b` fitted to the sky of
   the raw difference, then decorrelated (``dmtn021``).

When to use it: fields with too few isolated stars for ``al`` (high latitude, short
exposures, small cut-outs, crowded fields where no star is isolated), or when the PSF models
are better determined than a star-by-star fit (coadd templates with a well-modelled PSF).
Its quality is that of the PSF models: a model that is wrong by 1 % of the peak leaves
residuals of that order on every star, and it does not absorb astrometric offsets between
the images (the models are centred; ``al`` absorbs sub-pixel shifts into the kernel).

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
.. [2] Alard, C. 2000, A&AS 144, 363.
.. [3] lsst/ip_diffim ``modelPsfMatch.py`` (``ModelPsfMatchTask``).
.. [4] Reiss, D. J. & Lupton, R. H. 2016, DMTN-021.
"""

from __future__ import annotations

from typing import Any

from astropy.table import Table

import skydiff

from ._al import (
    _MODES,
    MatchingConfig,
    PsfMatchSubtraction,
    _KernelFit,
    _Prepared,
)
from ._model_kernel import PsfModelsConfig

__all__ = ["ModelPsfConfig", "ModelPsfSubtraction"]


@skydiff.configclass
class ModelPsfConfig(MatchingConfig):
    """Settings of the ``model_psf`` subtraction."""

    spatial_kernel_order: int = skydiff.RangeField(
        3, min=0, max=6, doc="Total degree of the polynomials of position of the kernel "
                             "coefficients (upstream ModelPsfMatch: 2). PSF candidates are "
                             "noise-free and as many as needed: for a FWHM varying by ±20 % "
                             "across the field, order 3 matches the PSFs to 2e-3 of the peak "
                             "everywhere, order 2 to 1e-2.")
    psf_models: PsfModelsConfig = skydiff.ConfigField(
        PsfModelsConfig, doc="PSF candidates and photometric scale of the kernel.")
    mode: str = skydiff.ChoiceField(
        "auto", allowed=_MODES,
        doc="Which image the kernel convolves (default auto: the one with the narrower PSF, "
            "so that the kernel never has to deconvolve).")
    decorrelation: Any = skydiff.RegistryField(
        "decorrelation", default="dmtn021",
        doc="Whitens the difference (DMTN-021); 'none' to skip.")


class ModelPsfSubtraction(PsfMatchSubtraction):
    r"""Image subtraction with a kernel that matches the two PSF models (as ModelPsfMatchTask).

    The kernel :math:`\kappa(x, y) = \sum_j a_j(x, y) B_j` is fitted, by the solver of
    ``al``, to pairs of PSF model images on a grid of positions instead of to stars, rescaled to
    the photometric ratio :math:`k` of the images, and applied exactly as in ``al``:

    .. math::

        D = S - \kappa\otimes T - b \quad (\texttt{convolveTemplate}),\qquad
        D = (\kappa\otimes S + b - T)/k \quad (\texttt{convolveScience}).

    Inputs without a PSF model get one from the ``psf_estimator`` subtask (as ``al``).
    ``kernel_sources`` of the result is the grid of PSF candidates (``x``, ``y`` in array
    coordinates, ``kernel_sum`` of each candidate's own solution, ``psf_residual`` = largest
    :math:`|\kappa\otimes P_c - P_r|` over the peak of :math:`P_r` with the spatial kernel,
    ``used``, ``reason``); the metadata holds ``kernel_sum``, ``kernel_sum_source``
    (``calibration``, ``stars``, ``fixed`` or ``unity``), ``kernel_sum_err``,
    ``model_kernel_sum`` (the fitted sum, about 1), ``psf_match_residual_max``,
    ``n_psf_candidates`` and ``psf_stamp_size`` besides everything ``al`` reports.

    Parameters
    ----------
    config : ModelPsfConfig, optional
        The settings (default: ``ModelPsfConfig()``).
    name, parent
        As for :class:`skydiff.Task`.

    Notes
    -----
    Differences from ``ModelPsfMatchTask``, with their reasons:

    * it is a subtraction (the upstream task only convolves an exposure to a reference PSF);
    * the basis is sized from the FWHMs (``kernel_basis.al.scale_by_fwhm`` stays True;
      upstream turns it off and fixes :math:`K` = 11): with fixed widths (0.7, 1.5, 3.0) and
      :math:`K` = 21 the noise-free fit still matches the PSFs (to 2e-5 of the peak for
      FWHM 4.7 → 6.6) but the kernel oscillates by up to twice its peak in the directions
      the template PSF does not constrain, which amplifies the noise; scaled, the kernel is
      within 0.4 % of the analytic Gaussian there;
    * the stamps are padded by :math:`K - 1` beyond the PSF (upstream: to 1.4 K), so that
      no pixel of :math:`\kappa\otimes P_c` is lost at the border: for equal PSFs the
      kernel sum comes out 0.99999 instead of 0.998, for a template broader than the
      science 0.9996 instead of 0.957;
    * the candidates lie on a grid from edge to edge instead of at the cell centres, and the
      default spatial order is 3 instead of 2 (``_model_kernel``): for a FWHM varying
      by ±20 % the PSFs are matched to 2e-3 of the peak over the whole field (order 2:
      1e-2);
    * the constant "variance" of the candidates is :math:`(10^{-3}\max P_r)^2` instead of 1:
      irrelevant for the Alard–Lupton basis, it gives the delta-function basis a sensible
      regularization;
    * the kernel is rescaled as a whole to the photometric ratio (upstream overwrites the
      constant coefficient and then normalises the convolution, so its images are never
      rescaled).

    References
    ----------
    .. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.
    .. [2] lsst/ip_diffim ``modelPsfMatch.py``.
    """

    name = "model_psf"
    ConfigClass = ModelPsfConfig
    tags = frozenset({"linear", "spatially_varying"})

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure, *,
            sources: Table | None = None) -> skydiff.SubtractionResult:
        """Subtract ``template`` from ``science`` with a kernel from their PSF models.

        Parameters
        ----------
        science : skydiff.Exposure
            The science exposure.
        template : skydiff.Exposure
            The template, on the science pixel grid (same shape and origin).
        sources : astropy.table.Table, optional
            Stars (``x``, ``y``: 0-based column and row) for the flux ratio when the
            photometric scale comes from stars; default: found on the science image.

        Returns
        -------
        skydiff.SubtractionResult
            As :meth:`AlSubtraction.run`; ``kernel_sources`` is the grid of PSF candidates.

        Raises
        ------
        skydiff.InputError
            If the inputs are not exposures on the same pixel grid, a PSF model gives an
            unusable image, or ``kernel_sum_source = 'calibration'`` lacks a calibration.
        skydiff.NoWorkFound
            If the template covers too little of the science image.
        skydiff.InsufficientKernelSourcesError
            With ``kernel_sum_source = 'stars'``, if too few stars give a flux ratio.
        skydiff.NoKernelCandidatesError
            If the PSF models cannot be matched (singular solves, a non-positive kernel sum).
        """
        return self._subtract_matched(science, template, sources=sources)

    def _match(self, prepared: _Prepared, *, convolve_template: bool, sources: Table | None,
               timings: dict[str, dict[str, float]]) -> tuple[_KernelFit, dict[str, Any]]:
        """The kernel-source step of ``model_psf``: the two PSF models."""
        science_p, template_p = prepared.science, prepared.template
        convolved, matched_to = ((template_p, science_p) if convolve_template
                                 else (science_p, template_p))
        fwhm_c, fwhm_m = ((prepared.fwhm_template, prepared.fwhm_science) if convolve_template
                          else (prepared.fwhm_science, prepared.fwhm_template))
        basis = self.kernel_basis.run(target_fwhm=fwhm_c, reference_fwhm=fwhm_m)
        return self._fit_model_kernel(
            convolved, matched_to, settings=self.config.psf_models, basis=basis,
            science=science_p, template=template_p, sources=sources,
            fwhm_science=prepared.fwhm_science, fwhm_template=prepared.fwhm_template,
            coverage=prepared.coverage, timings=timings)

    def _background_method(self) -> str:
        """Always ``sky``: the PSF candidates carry no background to fit with the kernel."""
        return "sky"
