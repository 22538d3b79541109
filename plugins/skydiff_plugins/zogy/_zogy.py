r"""The ``subtraction`` plugin ``zogy``: proper image subtraction (Zackay, Ofek & Gal-Yam 2016).

Steps of :meth:`ZogySubtraction.run`:

1. *inputs* -- same pixel grid, template coverage (:class:`skydiff.NoWorkFound` below
   ``required_template_fraction``), variance planes rescaled to the measured noise, PSFs
   estimated where missing (``psf_estimator``, falling back to ``psf_fallback``), and the
   sources' shot noise added to a variance plane that lacks it (``source_noise``);
2. *planes* -- each image minus a smooth sky (two-pass mesh with the sources masked); pixels
   of ``fill_planes`` and non-finite pixels are replaced by the local sky (optionally plus
   noise) and their variance by the median variance, so nothing rings through the FFTs;
3. *stars* -- isolated stars matched between the images give the flux ratio (fitted on
   PSF-cross-convolved stamps when the calibrations do not give it), the registration
   offset of the template and the astrometric scatter;
4. *PSFs and grid* -- both PSF models are cut to a common odd size holding all but
   ``psf_trim`` of their flux, tapered and recentred on their adaptive centroids (the
   centroid mismatch is recorded); when a PSF varies across the field (``grid``), the image
   is cut into cells whose spacing keeps the PSF change between neighbouring centres below
   ``max_psf_change``, each cell filtered with the PSFs at its centre and the outputs blended
   with tent weights (:mod:`._grid`);
5. *filters* -- the regularised ZOGY filters (:mod:`._filters`), applied by FFTs to each
   cell: the difference :math:`D` (science flux units), the matched template, the score
   :math:`S`, and their exactly propagated variances; the score variance includes the
   source-noise and astrometric terms, so that :math:`S/\sqrt{V_S} = S_\mathrm{corr}`;
6. *correlated noise* -- the noise power spectrum of the difference on blank tiles gives the
   factor by which correlated input noise raises the score's variance (:mod:`._noise`);
7. *masks* -- every plane of the science (template) mask is dilated by the footprint of its
   filter, ``EDGE`` is set within the core of the difference PSF from the border, and the
   pixels filled in the template whose planes the template hygiene drops are flagged
   ``INTRP``.

References
----------
.. [1] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27, "Proper image subtraction --
   optimal transient detection, photometry and hypothesis testing".
.. [2] Reiss, D. J. et al. 2021, DMTN-179, "Image differencing and decorrelation: numerical
   details", https://dmtn-179.lsst.io.
.. [3] Reiss, D. J. 2017, DMTN-061, "Image differencing: ZOGY and AL".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
import scipy.fft
from astropy.table import Table

import skydiff
from skydiff.parallel import cpu_count, parallel_map
from skydiff.psf import psf_moments

from ._filters import (
    CellFilters,
    PreparedPsf,
    apply_filters,
    cell_filters,
    kernel_images,
    prepare_psfs,
    psf_noise,
    support_radius,
)
from ._grid import Layout, choose_cell_size, make_layout
from ._noise import noise_power
from ._noise import variance_factor as correlation_factor
from ._prepare import (
    dilate_mask,
    fill_mask,
    filled_planes,
    mask_hygiene,
    sampled_median,
    sky_background,
)
from ._stars import (
    FluxRatio,
    Registration,
    empty_stars,
    fit_flux_ratio,
    fit_registration,
    match_stars,
    psf_images,
    psf_matched_fluxes,
)

__all__ = ["FluxScalingError", "ZogyConfig", "ZogySubtraction"]

_FLUX_SCALINGS = {
    "auto": "the photometric calibrations when both exposures have one, else fitted on "
            "matched stars (a ratio of 1 with a warning when too few stars)",
    "calibration": "the ratio of the two photo_calib scales (both required)",
    "fit": "fitted on matched stars (raises FluxScalingError with too few)",
    "given": "the configured flux_ratio",
}
_REGISTRATIONS = {
    "none": "use the images as registered",
    "shift": "move the template by the median offset of the matched stars (Fourier shift)",
    "affine": "move each cell of the template by an affine model of the matched stars' "
              "offsets (a constant shift with few stars or without a grid)",
}
_SOURCE_NOISE = {
    "auto": "'poisson' when a variance plane is constant (estimated from the sky noise) and "
            "the image still holds its sky, else 'variance_plane'",
    "variance_plane": "the variance planes already include the sources' shot noise",
    "poisson": "add (image - sky)/gain to the variance planes, the gain from the GAIN header "
               "card or else sky / variance",
}
_NOISE_CORRELATION = {
    "auto": "measure the noise power spectrum of the difference on blank pixels and scale "
            "the score's propagated variance by the factor the correlation implies when it "
            "differs from 1 by more than 3 standard errors (resampled, drizzled or stacked "
            "inputs)",
    "always": "always scale by the measured factors",
    "none": "assume independent pixels",
}
_GRIDS = {
    "auto": "a grid of cells when a PSF changes across the field by more than "
            "psf_variation_threshold",
    "always": "always a grid",
    "never": "one cell (the PSFs at the image centre)",
}

#: Fraction of a kernel's absolute sum allowed outside the cell border.
_SUPPORT_TOLERANCE = 1e-5
#: ``EDGE`` marks pixels closer to the border than the box holding all but this fraction of
#: the difference (score) PSF.
_EDGE_FRACTION = 0.01
#: Smallest PSF image side.
_MIN_PSF_SIZE = 7
#: Cell spacing used by ``grid = "always"`` when the PSFs do not vary.
_DEFAULT_CELL = 256
#: The spectra of :class:`CellFilters` (dropped once a cell is filtered).
_SPECTRA = ("c_n", "c_r", "k_n", "k_r", "c_n2", "c_r2", "k_n2", "k_r2")
_DROPPED: dict[str, Any] = dict.fromkeys(_SPECTRA, np.zeros((0, 0), dtype=np.complex64))


class FluxScalingError(skydiff.AlgorithmError):
    """The flux ratio of the two images could not be determined (too few matched stars)."""


@skydiff.configclass
class ZogyConfig(skydiff.Config):
    """Settings of the ``zogy`` subtraction."""

    psf_estimator: Any = skydiff.RegistryField(
        "psf_estimator", default="empirical",
        doc="Estimates the PSF of an input that has none.")
    psf_fallback: Any = skydiff.RegistryField(
        "psf_estimator", default="gaussian_moments",
        doc="Used when psf_estimator raises PsfEstimationError (too few or poor stars).")
    use_psf_fallback: bool = skydiff.Field(
        True, doc="Fall back to psf_fallback when psf_estimator fails; False lets the "
                  "PsfEstimationError propagate.")
    flux_scaling: str = skydiff.ChoiceField(
        "auto", allowed=_FLUX_SCALINGS,
        doc="Where the photometric ratio of the two images comes from.")
    flux_ratio: float | None = skydiff.RangeField(
        None, min=0.0, inclusive_min=False, optional=True,
        doc="Science flux / template flux of the same source, for flux_scaling = 'given' "
            "(the Alard-Lupton kernel sum).")
    registration: str = skydiff.ChoiceField(
        "shift", allowed=_REGISTRATIONS,
        doc="Correction of a residual offset between the images, measured on matched stars.")
    astrometric_sigma: tuple[float, ...] | None = skydiff.ListField(
        None, dtype=float, length=2, optional=True, item_check=lambda v: v >= 0,
        doc="Relative registration noise (sigma_x, sigma_y) in pixels for the astrometric "
            "term of the corrected score; None measures it on the matched stars (0 with too "
            "few).")
    source_noise: str = skydiff.ChoiceField(
        "auto", allowed=_SOURCE_NOISE, doc="How the sources' shot noise enters the variances.")
    noise_correlation: str = skydiff.ChoiceField(
        "auto", allowed=_NOISE_CORRELATION,
        doc="Correction of the score's propagated variance for noise correlated between the "
            "pixels of the inputs.")
    grid: str = skydiff.ChoiceField("auto", allowed=_GRIDS, doc="Spatial grid of PSF cells.")
    cell_size: int | None = skydiff.RangeField(
        None, min=16, optional=True,
        doc="Spacing (pixels) of the cell centres; None chooses it from the PSF variation.")
    max_psf_change: float = skydiff.RangeField(
        0.03, min=0.0, inclusive_min=False,
        doc="Largest relative (L2) change of a PSF between neighbouring cell centres when "
            "the spacing is chosen automatically; the tent blending interpolates linearly, "
            "leaving an error of about an eighth of its square.")
    min_cell_size: int = skydiff.RangeField(
        32, min=16, doc="Smallest automatic cell spacing (pixels).")
    psf_variation_threshold: float = skydiff.RangeField(
        0.005, min=0.0,
        doc="Relative (L2) PSF change across the field above which grid = 'auto' uses cells.")
    psf_trim: float = skydiff.RangeField(
        1e-4, min=0.0, max=0.1,
        doc="The PSF images are cut to the smallest odd box holding all but this fraction of "
            "their absolute flux.")
    max_psf_size: int = skydiff.RangeField(
        61, min=_MIN_PSF_SIZE, doc="Largest PSF image side (pixels) after cutting.")
    psf_floor: float = skydiff.RangeField(
        1e-4, min=0.0,
        doc="Regularisation delta of the PSF spectra (their relative accuracy): frequencies "
            "where both PSFs fall below it keep a white, bounded difference.")
    recentre_psfs: bool = skydiff.Field(
        True, doc="Move both PSF models to their adaptive centroids (Fourier shift) so that "
                  "a centroid mismatch between the models leaves no dipoles and P_D is "
                  "centred.")
    background_bin_size: int = skydiff.RangeField(
        128, min=8, doc="Bin size (pixels) of the sky meshes subtracted before the FFTs.")
    subtract_background: bool = skydiff.Field(
        True, doc="Return the difference without the differential sky (the result's "
                  "background holds it either way).")
    fill_planes: tuple[str, ...] = skydiff.ListField(
        ("BAD", "SAT", "CR", "NO_DATA", "SUSPECT"), dtype=str,
        doc="Pixels with these planes (and non-finite pixels) are replaced by the local sky "
            "before the FFTs; the planes are dilated by the filter footprints afterwards.")
    fill_noise: bool = skydiff.Field(
        False, doc="Add Gaussian noise of the local variance to the filled pixels (fixed "
                   "seed).")
    mask_threshold: float = skydiff.RangeField(
        1e-2, min=0.0, max=1.0, inclusive_min=False,
        doc="The masks are dilated by the box of the filter pixels above this fraction of "
            "the filter's peak: beyond it a filled pixel contributes less than this fraction "
            "of its error.")
    preserve_template_planes: tuple[str, ...] = skydiff.ListField(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"), dtype=str,
        doc="Template mask planes kept for the difference (preserveTemplateMask); SAT and "
            "INJECTED become SAT_TEMPLATE and INJECTED_TEMPLATE, other filled template "
            "pixels INTRP.")
    do_scale_variance: bool = skydiff.Field(
        True, doc="Rescale both variance planes to the measured pixel noise.")
    required_template_fraction: float = skydiff.RangeField(
        0.1, min=0.0, max=1.0,
        doc="Raise NoWorkFound when the template covers less of the science image.")
    max_wcs_offset: float = skydiff.RangeField(
        1.0, min=0.0, doc="Largest offset (science pixels) between the two WCSs.")
    star_threshold: float = skydiff.RangeField(
        10.0, min=1.0, doc="Detection threshold of the matched stars (find_stars).")
    min_star_snr: float = skydiff.RangeField(
        30.0, min=0.0, doc="Smallest S/N, in both images, of a star used for the flux ratio "
                           "and the registration.")
    max_stars: int = skydiff.RangeField(
        500, min=1, doc="Largest number of matched stars (the brightest).")
    match_radius: float = skydiff.RangeField(
        2.0, min=0.0, inclusive_min=False,
        doc="Largest distance (pixels) between the positions of a star in the two images.")
    min_stars: int = skydiff.RangeField(
        5, min=2, doc="Fewest matched stars for a fitted flux ratio or a measured "
                      "registration.")
    star_clip: float = skydiff.RangeField(
        4.0, min=1.0, doc="Outlier rejection (robust sigmas) of the flux-ratio and offset "
                          "fits (variables, blends).")
    keep_matched_image: bool = skydiff.Field(
        True, doc="Return the filtered template c_R * R (science flux units, PSF P_D) as "
                  "matched_image; False saves two FFTs per cell.")
    psf_model_order: int = skydiff.RangeField(
        3, min=0, max=6, doc="Degree of the PolynomialPsf that describes P_D and P_S across "
                             "the cells of a grid.")

    def _validate(self) -> None:
        if self.flux_scaling == "given" and self.flux_ratio is None:
            msg = "flux_scaling = 'given' needs flux_ratio (science flux / template flux)"
            raise skydiff.ConfigError(msg)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@attrs.frozen
class _Side:
    """One input after preparation: planes for the FFTs and bookkeeping."""

    exposure: skydiff.Exposure
    image: np.ndarray = attrs.field(eq=False)
    variance: np.ndarray = attrs.field(eq=False)
    sky: np.ndarray = attrs.field(eq=False)
    sigma2: float
    filled: np.ndarray = attrs.field(eq=False)
    variance_factor: float
    psf_source: str
    source_noise: str
    gain: float


@attrs.frozen
class _Scaling:
    flux_n: float
    flux_r: float
    ratio: float
    error: float
    method: str
    fit: FluxRatio | None


class ZogySubtraction(skydiff.Subtraction):
    r"""Proper image subtraction (ZOGY) with a spatial PSF grid and a corrected score.

    Computes ZOGY's proper difference, its PSF, the score and the corrected score (Zackay,
    Ofek & Gal-Yam 2016) with regularised filters, exact variance propagation, a grid of
    PSF cells for PSFs that vary across the field, filled bad pixels, recentred PSFs, and a
    flux ratio and registration measured on matched stars when needed.

    **Normalisation.** With :math:`F_N = 1` and :math:`F_R = 1/r` (:math:`r` = science flux /
    template flux of a source, from the calibrations or fitted), the returned difference is
    ZOGY's :math:`D` divided by :math:`F_D`: a source of science flux :math:`f` has flux
    :math:`f` in it, with the PSF :math:`P_D` (``difference.psf``, unit sum) -- the same
    convention as ``al``. Its noise is white with variance :math:`\sigma_N^2 + r^2\sigma_R^2`
    away from sources; the variance plane is the exact propagation
    :math:`V_N\otimes c_N^2 + V_R\otimes c_R^2`.

    **Score.** ``score.image`` is ZOGY's :math:`S = F_D^2\,\overline{P_D}\star D` (for a
    point source of flux :math:`f`, :math:`S = f F_D^2\sum P_D^2` at its position;
    ``metadata["score_flux_factor"]`` is :math:`F_D^2\sum P_D^2` at the centre), and
    ``score.variance`` is :math:`V_S + V_\mathrm{ast}`: the exact propagation of both
    variance planes (ZOGY's source-noise terms when the planes hold the sources' shot noise)
    plus the astrometric term. **Detect on** ``score.image / sqrt(score.variance)``: it is
    ZOGY's corrected score :math:`S_\mathrm{corr}`, unit normal where nothing changed.
    ``score.psf`` is :math:`P_S \propto |\hat P_D|^2`.

    **Matched image.** :math:`c_R\otimes R` in science flux units with the PSF :math:`P_D`
    (``keep_matched_image``), so that ``difference = c_N * N - matched_image``: forced
    photometry on it measures the template flux in science units.

    Parameters
    ----------
    config : ZogyConfig, optional
        The settings (default ``ZogyConfig()``).
    name, parent
        As for :class:`skydiff.Task`.

    Notes
    -----
    What differs from upstream's ZOGY (``lsst.ip.diffim`` until 2023, DMTN-179), and why:

    * the PSF spectra are cleaned of model noise (a Wiener window) and given a floor shaped by
      the ratio of their Gaussian envelopes (``psf_floor``), which keeps the difference white,
      bounded and its filters compact where both PSFs vanish, instead of dividing noise by
      noise;
    * correlated input noise (resampled, drizzled, stacked images) is measured on the
      difference and the score's variance corrected for it;
    * the PSF images are trimmed, tapered and recentred on their adaptive centroids (upstream
      raised an error beyond 0.2 px of centroid mismatch);
    * the flux ratio is fitted on PSF-cross-convolved stars when the calibrations do not give
      it, and the registration offset of the template is measured and removed;
    * the corrected score's source-noise and astrometric terms are implemented (upstream
      returned :math:`S/\sqrt{V_S}` only);
    * grid cells are blended with tent weights (first-order exact in the PSF variation)
      instead of being pasted, and the cell outputs use zero padding with exactly propagated
      variances instead of white-noise padding;
    * bad pixels are replaced by the local sky (not the image mean), and every mask plane is
      dilated by the footprint of the filter that spreads it.

    References
    ----------
    .. [1] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27.
    .. [2] Reiss, D. J. et al. 2021, DMTN-179.
    """

    name = "zogy"
    ConfigClass = ZogyConfig
    tags = frozenset({"linear", "spatially_varying", "symmetric"})
    config: ZogyConfig
    psf_estimator: skydiff.PsfEstimator
    psf_fallback: skydiff.PsfEstimator

    def __init__(self, config: skydiff.Config | None = None, *, name: str | None = None,
                 parent: skydiff.Task | None = None) -> None:
        super().__init__(config, name=name, parent=parent)
        self.make_subtask("psf_estimator")
        self.make_subtask("psf_fallback")

    # -- run ---------------------------------------------------------------------------

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure, *,
            sources: Table | None = None) -> skydiff.SubtractionResult:
        """Subtract ``template`` from ``science`` with ZOGY.

        Parameters
        ----------
        science : skydiff.Exposure
            The science exposure.
        template : skydiff.Exposure
            The template, on the science pixel grid (same shape and origin).
        sources : astropy.table.Table, optional
            Star positions (``x``, ``y``: 0-based science column and row) for the flux
            ratio and the registration; default: stars found in both images.

        Returns
        -------
        skydiff.SubtractionResult
            ``difference`` (science flux units, exact variance, PSF :math:`P_D`), ``score``
            (:math:`S` with variance such that image / sqrt(variance) is
            :math:`S_\\mathrm{corr}`, PSF :math:`P_S`), ``matched_image`` (:math:`c_R\\otimes
            R` or None), ``background`` (the differential sky, in difference units),
            ``kernel_sources`` (the matched stars), ``convolved = "none"``, ``kernel =
            None`` and ``metadata``.

        Raises
        ------
        skydiff.InputError
            If the inputs are not exposures on the same pixel grid, or ``sources`` lacks
            ``x``/``y``, or ``flux_scaling = "calibration"`` without both calibrations.
        skydiff.NoWorkFound
            If the template covers too little of the science image.
        FluxScalingError
            With ``flux_scaling = "fit"`` and too few matched stars.
        """
        config = self.config
        timings: dict[str, dict[str, float]] = {}
        skydiff.validate_pair(science, template, max_wcs_offset=config.max_wcs_offset)
        coverage = skydiff.template_coverage(science, template)
        if coverage < config.required_template_fraction:
            msg = (f"the template covers {coverage:.1%} of the science image, less than the "
                   f"required {config.required_template_fraction:.1%}")
            raise skydiff.NoWorkFound(msg)
        with self.timer("prepare") as timings["prepare"]:
            side_n, side_r = self._prepare(science, template)
        with self.timer("stars") as timings["stars"]:
            stars = self._stars(side_n, side_r, sources)
            scaling = self._scaling(side_n, side_r, stars)
            registration = self._registration(stars, side_n.exposure.shape)
        with self.timer("filters") as timings["filters"]:
            plan = self._plan(side_n, side_r, scaling, registration)
        with self.timer("subtract") as timings["subtract"]:
            planes = self._filter(plan, side_n, side_r, registration)
        with self.timer("assemble") as timings["assemble"]:
            result = self._assemble(plan, planes, side_n, side_r, scaling, registration,
                                    stars, coverage)
        result.metadata["timing"] = timings
        return result

    # -- inputs ------------------------------------------------------------------------

    def _estimate_psf(self, exposure: skydiff.Exposure, label: str
                      ) -> tuple[skydiff.Exposure, str]:
        if exposure.psf is not None:
            return exposure, "given"
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
        return exposure.evolve(psf=result.psf), f"estimated:{used}"

    def _prepare(self, science: skydiff.Exposure, template: skydiff.Exposure
                 ) -> tuple[_Side, _Side]:
        config = self.config

        def one(item: tuple[skydiff.Exposure, str]) -> _Side:
            exposure, label = item
            factor = 1.0
            if config.do_scale_variance:
                factor = skydiff.variance_scale_factor(exposure, max_pixels=1 << 19)
                exposure = exposure.evolve(
                    variance=_frozen(exposure.variance * np.float32(factor)))
            exposure, psf_source = self._estimate_psf(exposure, label)
            fwhm = _fwhm(exposure)
            filled = fill_mask(exposure, config.fill_planes)
            variance = np.where(filled, np.float32(0.0), exposure.variance)
            sky = sky_background(exposure.image, variance, filled,
                                 bin_size=config.background_bin_size,
                                 grow=max(2, math.ceil(fwhm)))
            image, variance = filled_planes(
                exposure, filled, sky,
                noise_seed=(1 if label == "science" else 2) if config.fill_noise else None)
            sigma2 = sampled_median(variance, ~filled)
            mode, gain = self._source_noise(exposure, sky, sigma2, filled)
            if mode == "poisson":
                variance += np.maximum(image, 0.0) / np.float32(gain)
            return _Side(exposure=exposure, image=image, variance=variance, sky=sky,
                         sigma2=sigma2, filled=filled, variance_factor=factor,
                         psf_source=psf_source, source_noise=mode, gain=gain)

        side_n, side_r = parallel_map(one, ((science, "science"), (template, "template")))
        return side_n, side_r

    def _source_noise(self, exposure: skydiff.Exposure, sky: np.ndarray, sigma2: float,
                      filled: np.ndarray) -> tuple[str, float]:
        """The source-noise mode of one input and the gain (image units) it uses."""
        mode = self.config.source_noise
        if mode == "variance_plane":
            return mode, math.nan
        good = ~filled
        if not good.any():
            return "variance_plane", math.nan
        values = exposure.variance[good]
        if mode == "auto" and float(values.max()) > float(values.min()) * (1.0 + 1e-5):
            return "variance_plane", math.nan
        header_gain = exposure.metadata.get("GAIN")
        sky_level = sampled_median(sky, good)
        noise = sigma2
        gain = math.nan
        if header_gain is not None:
            with contextlib.suppress(TypeError, ValueError):
                gain = float(header_gain)
        if not (math.isfinite(gain) and gain > 0) and noise > 0 \
                and sky_level > 10.0 * math.sqrt(noise):
            gain = sky_level / noise
        if not (math.isfinite(gain) and gain > 0):
            if mode == "poisson":
                self.log.warning("no gain for the source noise (no GAIN card and a "
                                 "sky-subtracted image); the variance plane is used as is")
            return "none", math.nan
        return "poisson", gain

    # -- stars, flux ratio, registration -----------------------------------------------

    def _needs_stars(self) -> bool:
        config = self.config
        return (config.flux_scaling in ("auto", "fit") or config.registration != "none"
                or config.astrometric_sigma is None)

    def _stars(self, side_n: _Side, side_r: _Side, sources: Table | None) -> Table:
        config = self.config
        if sources is not None and not isinstance(sources, Table):
            msg = f"sources must be an astropy Table with x and y, got {type(sources).__name__}"
            raise skydiff.InputError(msg)
        if not self._needs_stars():
            return empty_stars()
        return match_stars(side_n.exposure, side_r.exposure, sources=sources,
                           threshold=config.star_threshold, min_snr=config.min_star_snr,
                           max_stars=config.max_stars, match_radius=config.match_radius,
                           bad_planes=skydiff.DEFAULT_BAD_PLANES)

    def _scaling(self, side_n: _Side, side_r: _Side, stars: Table) -> _Scaling:
        config = self.config
        mode = config.flux_scaling
        calib_n, calib_r = side_n.exposure.photo_calib, side_r.exposure.photo_calib
        if mode == "given":
            assert config.flux_ratio is not None  # the config's validation requires it
            ratio = float(config.flux_ratio)
            return _Scaling(flux_n=1.0, flux_r=1.0 / ratio, ratio=ratio, error=0.0,
                            method="given", fit=None)
        if mode == "calibration" or (mode == "auto" and calib_n is not None
                                     and calib_r is not None):
            if calib_n is None or calib_r is None:
                msg = ("flux_scaling = 'calibration' needs a photo_calib on both exposures; "
                       "use flux_scaling = 'fit' or 'given'")
                raise skydiff.InputError(msg)
            # a source of true flux f has f / scale counts: r = scale_r / scale_n
            ratio = calib_r.scale / calib_n.scale
            error = ratio * math.hypot(calib_n.scale_err / calib_n.scale,
                                       calib_r.scale_err / calib_r.scale)
            return _Scaling(flux_n=1.0, flux_r=1.0 / ratio, ratio=ratio, error=error,
                            method="calibration", fit=None)
        fit = self._fit_ratio(side_n, side_r, stars)
        if fit is None:
            if mode == "fit":
                msg = (f"only {len(stars)} matched stars for the flux ratio, need "
                       f"{config.min_stars}; give flux_ratio (flux_scaling = 'given') or "
                       "photometric calibrations")
                raise FluxScalingError(msg, n_found=len(stars), n_needed=config.min_stars)
            self.log.warning("too few matched stars (%d) to fit the flux ratio and no "
                             "calibrations; assuming 1", len(stars))
            return _Scaling(flux_n=1.0, flux_r=1.0, ratio=1.0, error=math.nan,
                            method="unit", fit=None)
        return _Scaling(flux_n=1.0, flux_r=1.0 / fit.value, ratio=fit.value, error=fit.error,
                        method="fit", fit=fit)

    def _fit_ratio(self, side_n: _Side, side_r: _Side, stars: Table) -> FluxRatio | None:
        config = self.config
        if len(stars) < config.min_stars:
            return None
        size = _psf_size(side_n.exposure, side_r.exposure, config)
        f_n, v_n, f_r, v_r, ok = psf_matched_fluxes(
            side_n.image, side_n.variance, side_r.image, side_r.variance,
            side_n.filled | side_r.filled, stars, psf_science=side_n.exposure.psf,
            psf_template=side_r.exposure.psf, origin=side_n.exposure.origin, size=size)
        return fit_flux_ratio(f_n, v_n, f_r, v_r, ok, clip=config.star_clip,
                              min_stars=config.min_stars)

    def _registration(self, stars: Table, shape: tuple[int, int]) -> Registration:
        config = self.config
        measured = fit_registration(stars, mode=config.registration
                                    if config.registration != "none" else "shift",
                                    shape=shape, min_stars=config.min_stars,
                                    clip=config.star_clip)
        coefficients = measured.coefficients if config.registration != "none" \
            else np.zeros((2, 3))
        sigma_x, sigma_y = measured.sigma_x, measured.sigma_y
        if config.astrometric_sigma is not None:
            sigma_x, sigma_y = (float(v) for v in config.astrometric_sigma)
        mode = "none" if config.registration == "none" or not measured.n_used \
            else measured.mode
        return attrs.evolve(measured, coefficients=coefficients, sigma_x=sigma_x,
                            sigma_y=sigma_y, mode=mode)

    # -- PSFs, grid and filters --------------------------------------------------------

    def _plan(self, side_n: _Side, side_r: _Side, scaling: _Scaling,
              registration: Registration) -> _Plan:
        config = self.config
        exposure = side_n.exposure
        shape = exposure.shape
        x0, y0 = exposure.origin
        size = _psf_size(side_n.exposure, side_r.exposure, config)
        rate, change = _psf_variation((side_n.exposure.psf, side_r.exposure.psf), shape,
                                      exposure.origin, size)
        use_grid = config.grid == "always" or (config.grid == "auto"
                                               and change > config.psf_variation_threshold)
        cell_size: int | None = None
        if use_grid:
            cell_size = config.cell_size or (
                choose_cell_size(rate, max_change=config.max_psf_change,
                                 minimum=config.min_cell_size, shape=shape)
                if rate > 0 else _DEFAULT_CELL)
        centres = make_layout(shape, cell_size=cell_size, border=0)
        rows = np.array([cell.centre[0] for cell in centres.cells])
        cols = np.array([cell.centre[1] for cell in centres.cells])
        recentre = config.recentre_psfs
        psfs_n = prepare_psfs(psf_images(side_n.exposure.psf, cols + x0, rows + y0),
                              size=size, recentre=recentre)
        psfs_r = prepare_psfs(psf_images(side_r.exposure.psf, cols + x0, rows + y0),
                              size=size, recentre=recentre)
        single = len(centres.cells) == 1
        sigmas = []
        for cell in centres.cells:
            if single:
                s2n, s2r = side_n.sigma2, side_r.sigma2
            else:  # the median variance over the cell's support (sampled)
                s2n = sampled_median(side_n.variance[cell.support],
                                     ~side_n.filled[cell.support])
                s2r = sampled_median(side_r.variance[cell.support],
                                     ~side_r.filled[cell.support])
            sigmas.append((_positive(s2n), _positive(s2r)))
        shifts = [registration.offset(float(col), float(row)) if registration.mode == "affine"
                  else registration.offset(0.5 * (shape[1] - 1), 0.5 * (shape[0] - 1))
                  for row, col in zip(rows, cols, strict=True)]
        grid = int(scipy.fft.next_fast_len(4 * size + 1))
        centre = (len(centres.cells) - 1) // 2
        noise = max(psf_noise(psfs_n[centre]), psf_noise(psfs_r[centre]))
        floor = max(config.psf_floor, 3.0 * noise)
        common = {"flux_n": scaling.flux_n, "flux_r": scaling.flux_r, "floor": floor}

        def kernels(index: int) -> tuple[dict[str, np.ndarray], float]:
            s2n, s2r = sigmas[index]
            return kernel_images(psfs_n[index], psfs_r[index], grid=grid, sigma2_n=s2n,
                                 sigma2_r=s2r, shift=shifts[index], **common)

        images = parallel_map(kernels, range(len(centres.cells)))
        support = max(max(support_radius(item[0][name], fraction=_SUPPORT_TOLERANCE)
                          for name in ("c_n", "c_r", "k_n", "k_r")) for item in images)
        border = int(min((grid - 1) // 2, max(support + 1, size // 2 + 1)))
        psf_half = max(support_radius(item[0]["psf_d"], fraction=config.psf_trim)
                       for item in images)
        score_half = max(support_radius(item[0]["psf_s"], fraction=config.psf_trim)
                         for item in images)
        psf_half = int(min(max(psf_half, size // 2), (grid - 1) // 2))
        score_half = int(min(max(score_half, psf_half), (grid - 1) // 2))
        layout = make_layout(shape, cell_size=cell_size, border=border)
        return _Plan(layout=layout, psfs_n=psfs_n, psfs_r=psfs_r, sigmas=sigmas, shifts=shifts,
                     kernel_grid=grid, psf_size=size, psf_d_size=2 * psf_half + 1,
                     psf_s_size=2 * score_half + 1, kernel_images=images,
                     rate=rate, change=change, cell_size=cell_size, flux_r=scaling.flux_r,
                     floor=floor, psf_noise=noise)

    def _filter(self, plan: _Plan, side_n: _Side, side_r: _Side,
                registration: Registration) -> _Planes:
        config = self.config
        layout = plan.layout
        shape = layout.shape
        keep = config.keep_matched_image
        astrometric = (registration.sigma_x**2, registration.sigma_y**2)
        names = ["difference", "difference_variance", "score", "score_variance"]
        if keep:
            names += ["matched", "matched_variance"]
        if astrometric[0] > 0 or astrometric[1] > 0:
            names += ["score_astrometric"]
        single = len(layout.cells) == 1
        # one cell: the FFTs use every CPU; several: one cell per CPU
        workers = cpu_count() if single else 1
        outputs = {name: np.zeros(shape, dtype=np.float32) for name in names}
        filters_out: list[CellFilters | None] = [None] * len(layout.cells)

        def work(index: int) -> tuple[int, dict[str, np.ndarray]]:
            cell = layout.cells[index]
            s2n, s2r = plan.sigmas[index]
            filters = cell_filters(
                plan.psfs_n[index], plan.psfs_r[index], fft_shape=cell.fft_shape,
                grid=plan.kernel_grid, border=layout.border, flux_n=1.0,
                flux_r=plan.flux_r, sigma2_n=s2n, sigma2_r=s2r,
                floor=plan.floor, shift=plan.shifts[index],
                mask_threshold=config.mask_threshold, support_tolerance=_SUPPORT_TOLERANCE,
                psf_size=plan.psf_d_size, score_psf_size=plan.psf_s_size,
                images=plan.kernel_images[index], workers=workers)
            # keep only the small per-cell products (PSFs, footprints), not the spectra
            filters_out[index] = attrs.evolve(filters, **_DROPPED)
            outer = cell.outer
            planes = [side_n.image[outer], side_n.variance[outer],
                      side_r.image[outer], side_r.variance[outer]]
            rows, cols = cell.support_in_outer
            result = apply_filters(filters, planes, fft_shape=cell.fft_shape,
                                   region=(rows, cols), astrometric=astrometric, matched=keep,
                                   workers=workers)
            if not single:  # tent weights, applied in the worker thread
                for value in result.values():
                    value *= cell.weight_rows[:, None]
                    value *= cell.weight_cols[None, :]
            return index, result

        for index, result in _ordered(work, range(len(layout.cells))):
            support = layout.cells[index].support
            for name in names:
                if single:
                    outputs[name][support] = result[name]
                else:
                    outputs[name][support] += result[name]
        filters = [item for item in filters_out if item is not None]
        return _Planes(arrays=outputs, filters=filters)

    # -- outputs -----------------------------------------------------------------------

    def _correlation(self, arrays: dict[str, np.ndarray], mask: np.ndarray,
                     planes: skydiff.MaskPlanes, filters: list[CellFilters],
                     exposure: skydiff.Exposure) -> dict[str, Any]:
        """The score's variance factor for noise correlated between pixels (:mod:`._noise`).

        :math:`f_S / f_D` measured on the blank pixels of the difference (the correlation
        alone, not the level of the variance planes); applied (``auto``) when it differs
        from 1 by more than three standard errors.
        """
        mode = self.config.noise_correlation
        out: dict[str, Any] = {"noise_factor_score": 1.0, "noise_factor_score_err": math.nan,
                               "noise_level_blank": math.nan, "noise_correlation": "none"}
        if mode == "none":
            return out
        height, width = exposure.shape
        tile = 128 if (height // 128) * (width // 128) >= 8 else 64
        tile = int(min(height, width, tile))
        psf_d = filters[len(filters) // 2].psf_d
        _, _, sigma = psf_moments(psf_d)
        excluded = mask != 0
        power = noise_power(arrays["difference"], arrays["difference_variance"], excluded,
                            tile=tile, sigma=max(1.0, sigma))
        level, level_error = correlation_factor(power, np.ones((1, 1)))
        score, score_error = correlation_factor(power, psf_d)
        # the correlation alone: the score's factor relative to the pixel variance's (the
        # level of the variance planes is the inputs' business: do_scale_variance)
        factor = score / level if level > 0 else 1.0
        error = factor * math.hypot(score_error / score if score > 0 else math.inf,
                                    level_error / level if level > 0 else math.inf)
        applied = math.isfinite(factor) and (mode == "always"
                                             or abs(factor - 1.0) > 3.0 * error)
        out["noise_factor_score"] = factor if applied else 1.0
        out["noise_factor_score_err"] = error
        out["noise_level_blank"] = level
        out["noise_correlation"] = "corrected" if applied else "negligible"
        return out

    def _assemble(self, plan: _Plan, planes: _Planes, side_n: _Side, side_r: _Side,
                  scaling: _Scaling, registration: Registration, stars: Table,
                  coverage: float) -> skydiff.SubtractionResult:
        config = self.config
        science, template = side_n.exposure, side_r.exposure
        arrays = planes.arrays
        filters = planes.filters
        s_mask, s_planes, t_mask, t_planes = mask_hygiene(
            science, template, preserve_template_planes=config.preserve_template_planes)
        s_planes = s_planes.with_plane("NO_DATA")
        t_planes = t_planes.with_plane("NO_DATA").with_plane("INTRP")
        s_mask = s_mask | _missing(science).astype(np.uint32) \
            << np.uint32(s_planes.bit("NO_DATA"))
        t_mask = t_mask | _missing(template).astype(np.uint32) \
            << np.uint32(t_planes.bit("NO_DATA"))
        # filled template pixels whose planes the hygiene dropped (CR, SUSPECT, ...)
        unflagged = side_r.filled & (t_mask == 0)
        t_mask = t_mask | unflagged.astype(np.uint32) << np.uint32(t_planes.bit("INTRP"))

        def radius(key: str) -> tuple[int, int]:
            values = [f.footprint[key] for f in filters]
            return (max(v[0] for v in values), max(v[1] for v in values))

        diff_mask, diff_planes = _merge(dilate_mask(s_mask, radius("difference_science")),
                                        s_planes,
                                        dilate_mask(t_mask, radius("difference_template")),
                                        t_planes)
        score_mask, score_planes = _merge(dilate_mask(s_mask, radius("score_science")),
                                          s_planes, dilate_mask(t_mask, radius("score_template")),
                                          t_planes)
        diff_planes = diff_planes.with_plane("EDGE")
        score_planes = score_planes.with_plane("EDGE")
        edge_d = max(support_radius(f.psf_d, fraction=_EDGE_FRACTION) for f in filters)
        edge_s = max(support_radius(f.psf_s, fraction=_EDGE_FRACTION) for f in filters)
        if 2 * edge_d >= min(science.shape):
            msg = (f"the difference PSF reaches {edge_d} px, so its EDGE margin covers the whole "
                   f"{science.shape[0]}x{science.shape[1]} image; use a larger image or smaller "
                   "PSF models (e.g. trim the PSF images)")
            raise skydiff.NoWorkFound(msg)
        diff_mask |= _edge(science.shape, edge_d) \
            << np.uint32(diff_planes.bit("EDGE"))
        score_mask |= _edge(science.shape, edge_s) \
            << np.uint32(score_planes.bit("EDGE"))

        correlation = self._correlation(arrays, diff_mask, diff_planes, filters, science)
        variance_d = arrays["difference_variance"]
        variance_s = arrays["score_variance"]
        if correlation["noise_factor_score"] != 1.0:
            variance_s *= np.float32(correlation["noise_factor_score"])
        if "score_astrometric" in arrays:
            variance_s += arrays["score_astrometric"]
        background = (side_n.sky - np.float32(scaling.ratio) * side_r.sky).astype(np.float32)
        difference_image = arrays["difference"]
        if not config.subtract_background:
            difference_image = difference_image + background
        psf_d = _psf_model([f.psf_d for f in filters], plan, science, config.psf_model_order)
        psf_s = _psf_model([f.psf_s for f in filters], plan, science, config.psf_model_order)
        difference = science.evolve(image=_frozen(difference_image),
                                    variance=_frozen(variance_d),
                                    mask=_frozen(diff_mask), mask_planes=diff_planes, psf=psf_d)
        score = science.evolve(image=_frozen(arrays["score"]),
                               variance=_frozen(variance_s),
                               mask=_frozen(score_mask), mask_planes=score_planes, psf=psf_s)
        matched = None
        if "matched" in arrays:
            matched_image = arrays["matched"]
            if not config.subtract_background:
                matched_image = matched_image + np.float32(scaling.ratio) * side_r.sky
            t_dilated = dilate_mask(t_mask, radius("difference_template"))
            matched = science.evolve(image=_frozen(matched_image),
                                     variance=_frozen(arrays["matched_variance"]),
                                     mask=_frozen(t_dilated), mask_planes=t_planes, psf=psf_d)
        centre = _centre_index(plan)
        central = filters[centre]
        psf_n, psf_r = plan.psfs_n[centre], plan.psfs_r[centre]
        f_d = central.f_d
        metadata: dict[str, Any] = {
            "template_coverage": coverage,
            "variance_scale_science": side_n.variance_factor,
            "variance_scale_template": side_r.variance_factor,
            "science_psf": side_n.psf_source,
            "template_psf": side_r.psf_source,
            "fwhm_science": _fwhm(science),
            "fwhm_template": _fwhm(template),
            "source_noise_science": side_n.source_noise,
            "source_noise_template": side_r.source_noise,
            "flux_scaling": scaling.method,
            "flux_ratio": scaling.ratio,
            "flux_ratio_err": scaling.error,
            "flux_science": scaling.flux_n,
            "flux_template": scaling.flux_r,
            "n_flux_stars": scaling.fit.n_used if scaling.fit is not None else 0,
            "n_flux_stars_rejected": scaling.fit.n_rejected if scaling.fit is not None else 0,
            "flux_ratio_chi2dof": scaling.fit.chi2dof if scaling.fit is not None else math.nan,
            "f_d": f_d,
            "sigma_science": math.sqrt(central.sigma2_n),
            "sigma_template": math.sqrt(central.sigma2_r),
            "score_flux_factor": f_d**2 * float(np.sum(central.psf_d**2)),
            "n_matched_stars": len(stars),
            "registration": registration.mode,
            "registration_offset_x": plan.shifts[centre][0],
            "registration_offset_y": plan.shifts[centre][1],
            "registration_offset_error_x": registration.error_x,
            "registration_offset_error_y": registration.error_y,
            "n_registration_stars": registration.n_used,
            "astrometric_sigma_x": registration.sigma_x,
            "astrometric_sigma_y": registration.sigma_y,
            "astrometric_sigma_source": ("config" if config.astrometric_sigma is not None
                                         else "measured" if registration.n_used
                                         else "none"),
            "psf_centroid_science_x": psf_n.centroid[0],
            "psf_centroid_science_y": psf_n.centroid[1],
            "psf_centroid_template_x": psf_r.centroid[0],
            "psf_centroid_template_y": psf_r.centroid[1],
            "psf_centroid_offset_x": psf_r.centroid[0] - psf_n.centroid[0],
            "psf_centroid_offset_y": psf_r.centroid[1] - psf_n.centroid[1],
            "psf_size": plan.psf_size,
            "psf_floor": plan.floor,
            "psf_model_noise": plan.psf_noise,
            "psf_variation": plan.change,
            "n_cells": len(plan.layout.cells),
            "grid_shape": list(plan.layout.n_cells),
            "cell_size": plan.cell_size if plan.cell_size is not None else 0,
            "border": plan.layout.border,
            "fft_shape": list(plan.layout.cells[centre].fft_shape),
            "kernel_tail": max(f.tail for f in filters),
            "n_filled_science": int(np.count_nonzero(side_n.filled)),
            "n_filled_template": int(np.count_nonzero(side_r.filled)),
            "mask_radius_difference": list(np.maximum(radius("difference_science"),
                                                      radius("difference_template"))),
            "mask_radius_score": list(np.maximum(radius("score_science"),
                                                 radius("score_template"))),
            "mask_radii": {key: [int(v) for v in radius(key)] for key in (
                "difference_science", "difference_template", "score_science",
                "score_template")},
            "edge_width_difference": edge_d,
            "edge_width_score": edge_s,
            **correlation,
        }
        metadata["mask_radius_difference"] = [int(v) for v in metadata["mask_radius_difference"]]
        metadata["mask_radius_score"] = [int(v) for v in metadata["mask_radius_score"]]
        return skydiff.SubtractionResult(
            difference=difference, matched_image=matched, kernel=None, background=background,
            score=score, kernel_sources=_star_table(stars, scaling), convolved="none",
            metadata=metadata)


# ------------------------------------------------------------------------------------------
# helpers


@attrs.frozen
class _Plan:
    layout: Layout
    psfs_n: list[PreparedPsf] = attrs.field(eq=False)
    psfs_r: list[PreparedPsf] = attrs.field(eq=False)
    sigmas: list[tuple[float, float]]
    shifts: list[tuple[float, float]]
    kernel_grid: int
    psf_size: int
    psf_d_size: int
    psf_s_size: int
    kernel_images: list[tuple[dict[str, np.ndarray], float]] = attrs.field(eq=False)
    rate: float
    change: float
    cell_size: int | None
    flux_r: float
    floor: float
    psf_noise: float


@attrs.frozen
class _Planes:
    arrays: dict[str, np.ndarray] = attrs.field(eq=False)
    filters: list[CellFilters] = attrs.field(eq=False)


def _positive(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 1e-30


def _fwhm(exposure: skydiff.Exposure) -> float:
    psf = exposure.psf
    if psf is None:
        return math.nan
    x0, y0 = exposure.origin
    height, width = exposure.shape
    try:
        return float(psf.fwhm(x0 + 0.5 * (width - 1), y0 + 0.5 * (height - 1)))
    except skydiff.InputError:
        return math.nan


def _psf_size(science: skydiff.Exposure, template: skydiff.Exposure, config: ZogyConfig
              ) -> int:
    """Common odd side of the PSF images: all but ``psf_trim`` of the flux of both."""
    half = _MIN_PSF_SIZE // 2
    for exposure in (science, template):
        assert exposure.psf is not None  # estimated first when missing
        x0, y0 = exposure.origin
        height, width = exposure.shape
        image = np.asarray(exposure.psf.kernel_image(x0 + 0.5 * (width - 1),
                                                     y0 + 0.5 * (height - 1)),
                           dtype=np.float64)
        half = max(half, support_radius(image / image.sum(), fraction=config.psf_trim) + 1)
    return int(min(2 * half + 1, config.max_psf_size if config.max_psf_size % 2
                   else config.max_psf_size - 1))


def _psf_variation(psfs: tuple[Any, ...], shape: tuple[int, int], origin: tuple[int, int],
                   size: int) -> tuple[float, float]:
    """``(rate, change)``: the largest relative L2 change of a PSF per pixel between
    neighbours of a 3 × 3 grid of positions (5 %, 50 %, 95 % of each axis), and the largest
    relative change between any two of them."""
    height, width = shape
    x0, y0 = origin
    fx = np.array([0.05, 0.5, 0.95]) * (width - 1)
    fy = np.array([0.05, 0.5, 0.95]) * (height - 1)
    gx, gy = np.meshgrid(fx, fy)
    rate, change = 0.0, 0.0
    for psf in psfs:
        if isinstance(psf, skydiff.GaussianPsf | skydiff.ImagePsf):
            continue
        images = psf_images(psf, gx.ravel() + x0, gy.ravel() + y0)
        half = size // 2
        centre = images.shape[-1] // 2
        if images.shape[-1] > size:
            images = images[:, centre - half:centre + half + 1, centre - half:centre + half + 1]
        images = images / images.sum(axis=(1, 2), keepdims=True)
        stack = images.reshape(3, 3, -1)
        norm = float(np.sqrt(np.sum(stack[1, 1] ** 2)))
        flat = stack.reshape(9, -1)
        pairwise = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=-1)) / norm
        change = max(change, float(pairwise.max()))
        dx = max(fx[1] - fx[0], 1.0)
        dy = max(fy[1] - fy[0], 1.0)
        along_x = np.sqrt(((stack[:, 1:] - stack[:, :-1]) ** 2).sum(axis=-1)) / norm / dx
        along_y = np.sqrt(((stack[1:] - stack[:-1]) ** 2).sum(axis=-1)) / norm / dy
        rate = max(rate, float(along_x.max()), float(along_y.max()))
    return rate, change


def _ordered(function: Callable[[int], Any], items: range) -> Iterator[Any]:
    """``function(i)`` for every item, computed in threads, yielded in input order.

    The items go to :func:`~skydiff.parallel.parallel_map` in batches of two per CPU, so
    finished cell outputs never pile up.
    """
    batch = 2 * cpu_count()
    for start in range(0, len(items), batch):
        yield from parallel_map(function, items[start:start + batch])


def _merge(first: np.ndarray, first_planes: skydiff.MaskPlanes, second: np.ndarray,
           second_planes: skydiff.MaskPlanes) -> tuple[np.ndarray, skydiff.MaskPlanes]:
    """OR two masks whose plane dictionaries may assign different bits, by plane name."""
    planes = first_planes
    out = first.copy()
    used = int(np.bitwise_or.reduce(second, axis=None)) if second.size else 0
    for name in second_planes.names:
        bit = second_planes.bit(name)
        if not used >> bit & 1:
            continue
        planes = planes.with_plane(name)
        target = planes.bit(name)
        moved = (second >> np.uint32(bit)) & np.uint32(1)
        out |= moved << np.uint32(target)
    return out, planes


def _missing(exposure: skydiff.Exposure) -> np.ndarray:
    """Pixels without data: a non-finite image value or a non-finite or negative variance."""
    return (~np.isfinite(exposure.image) | ~np.isfinite(exposure.variance)
            | ~(exposure.variance >= 0))


def _edge(shape: tuple[int, int], width: int) -> np.ndarray:
    edge = np.zeros(shape, dtype=np.uint32)
    if width > 0:
        edge[:width] = 1
        edge[-width:] = 1
        edge[:, :width] = 1
        edge[:, -width:] = 1
    return edge


def _centre_index(plan: _Plan) -> int:
    n_rows, n_cols = plan.layout.n_cells
    return (n_rows // 2) * n_cols + n_cols // 2


def _psf_model(stamps: list[np.ndarray], plan: _Plan, exposure: skydiff.Exposure,
               order: int) -> skydiff.Psf:
    """An ImagePsf for one cell; a PolynomialPsf fitted to the cells' stamps otherwise.

    Terms are kept up to total degree ``order`` and, per axis, one less than the number of
    cells along it (a single row of cells cannot constrain a dependence on y).
    """
    x0, y0 = exposure.origin
    layout = plan.layout
    if len(stamps) == 1:
        row, col = layout.cells[0].centre
        return skydiff.ImagePsf(stamps[0], position=(col + x0, row + y0))
    n_rows, n_cols = layout.n_cells
    height, width = exposure.shape
    bbox = (x0 - 0.5, y0 - 0.5, x0 + width - 0.5, y0 + height - 0.5)
    xs = np.array([cell.centre[1] for cell in layout.cells]) + x0
    ys = np.array([cell.centre[0] for cell in layout.cells]) + y0
    terms = skydiff.chebyshev_terms(order)
    keep = [t for t, (i, j) in enumerate(terms) if i <= n_cols - 1 and j <= n_rows - 1]
    design = skydiff.spatial_functions(xs, ys, order=order, bbox=bbox)  # (n_terms, n_cells)
    cube = np.stack(stamps)
    # least squares through the pseudo-inverse of the small (cells × terms) design matrix
    solution = np.linalg.pinv(design[keep].T) @ cube.reshape(cube.shape[0], -1)
    basis = np.zeros((len(terms), *cube.shape[1:]))
    basis[keep] = solution.reshape(len(keep), *cube.shape[1:])
    try:
        return skydiff.PolynomialPsf(basis, np.eye(len(terms)), order=order, bbox=bbox)
    except skydiff.InputError:
        centre = _centre_index(plan)
        row, col = layout.cells[centre].centre
        return skydiff.ImagePsf(stamps[centre], position=(col + x0, row + y0))


def _star_table(stars: Table, scaling: _Scaling) -> Table:
    """The matched stars with ``used`` (in the flux-ratio fit) and ``reason``."""
    table = stars.copy(copy_data=True)
    used = np.zeros(len(table), dtype=bool)
    if scaling.fit is not None and scaling.fit.used.size == len(table):
        used = scaling.fit.used.copy()
    table["used"] = used
    table["reason"] = np.where(used, "", "not_fitted" if scaling.fit is None
                               else "rejected").astype("<U16")
    return table
