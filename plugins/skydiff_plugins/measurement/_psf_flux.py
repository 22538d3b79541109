r"""The ``psf_flux`` and ``forced_psf`` measurements: linear PSF fits on stacked stamps."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

import skydiff
from skydiff.photometry import NoiseScale, fit_psf_flux, psf_noise_scale

from ._common import (
    DEFAULT_EXCLUDED_PLANES,
    check_inputs,
    model_stamps,
    origin_of,
    positions,
    psf_size,
    result,
    usable_pixels,
)

#: Allowed values of ``error_calibration`` (shared by ``psf_flux`` and ``forced_psf``).
ERROR_CALIBRATIONS = {
    "measured": "multiply the flux errors by the measured noise scale of PSF-weighted sums "
                "on the image's sky (skydiff.photometry.psf_noise_scale): corrects for pixel "
                "noise correlated by resampling, stacking or PSF pre-filtering, and for a "
                "mis-scaled variance plane",
    "variance": "trust the variance plane: errors for independent pixels as computed"}

#: Bins of the background mesh removed from the significance of science and template images
#: (which still hold their sky) before their noise scale is measured.
_FORCED_BACKGROUND_BIN = 64


def noise_scale(exposure: skydiff.Exposure, *, exclude: np.ndarray | None,
                bad_planes: tuple[str, ...], background_bin_size: int | None = None
                ) -> NoiseScale:
    """:func:`skydiff.photometry.psf_noise_scale` of ``exposure``, or ``(1, 0, nan)`` when it
    has no usable PSF."""
    if exposure.psf is None:
        return NoiseScale(1.0, 0, float("nan"))
    try:
        return psf_noise_scale(exposure, exclude=exclude, bad_planes=bad_planes,
                               background_bin_size=background_bin_size)
    except (skydiff.SkydiffError, ArithmeticError, ValueError):
        return NoiseScale(1.0, 0, float("nan"))


class PsfPhotometry(NamedTuple):
    """Fluxes, errors, reduced chi-squares and flags of a PSF fit to many sources."""

    flux: np.ndarray
    flux_err: np.ndarray
    chi2dof: np.ndarray
    flag: np.ndarray


def _fit_with_background(data: np.ndarray, variance: np.ndarray, model: np.ndarray,
                         usable: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Weighted linear fit of :math:`F m + B` per stamp; returns flux, its error, chi2/dof.

    With :math:`w = 1/V` the normal equations are

    .. math::

        \begin{pmatrix} \sum w m^2 & \sum w m \\ \sum w m & \sum w \end{pmatrix}
        \begin{pmatrix} F \\ B \end{pmatrix} =
        \begin{pmatrix} \sum w m d \\ \sum w d \end{pmatrix},
        \qquad \sigma_F^2 = \frac{\sum w}{\det},

    and :math:`\chi^2_\nu = \sum w (d - Fm - B)^2 / (N - 2)`.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(usable, 1.0 / np.where(usable, variance, 1.0), 0.0)
        m = np.where(usable, model, 0.0)
        d = np.where(usable, data, 0.0)
        axes = (1, 2)
        a00 = np.sum(w * m * m, axis=axes)
        a01 = np.sum(w * m, axis=axes)
        a11 = np.sum(w, axis=axes)
        b0 = np.sum(w * m * d, axis=axes)
        b1 = np.sum(w * d, axis=axes)
        det = a00 * a11 - a01 * a01
        good = det > 1e-12 * a00 * a11
        safe = np.where(good, det, 1.0)
        flux = np.where(good, (a11 * b0 - a01 * b1) / safe, np.nan)
        back = np.where(good, (a00 * b1 - a01 * b0) / safe, np.nan)
        flux_err = np.where(good, np.sqrt(a11 / safe), np.nan)
        resid = d - np.nan_to_num(flux)[:, None, None] * m - np.nan_to_num(back)[:, None, None]
        chi2 = np.sum(w * resid * resid, axis=axes)
        n_pix = np.sum(usable, axis=axes)
        chi2dof = np.where(good & (n_pix > 2), chi2 / np.maximum(n_pix - 2, 1), np.nan)
    return flux, flux_err, chi2dof


def psf_photometry(exposure: skydiff.Exposure, psf: skydiff.Psf | None, x: np.ndarray,
                   y: np.ndarray, *, stamp_size: int, bad_planes: tuple[str, ...],
                   max_masked_fraction: float, fit_background: bool) -> PsfPhotometry:
    """PSF fluxes of sources at ``(x, y)`` (the exposure's own pixel grid) on one exposure.

    A source is flagged when its position is not finite or the PSF is missing or fails
    there, when the pixel nearest to it is unusable (off the image, masked or not finite),
    when more than ``max_masked_fraction`` of the PSF's :math:`\\sum m^2` falls on unusable
    pixels, or when the fit fails; its flux is NaN when nothing could be fitted.
    """
    n = x.size
    nan = np.full(n, np.nan)
    if psf is None or n == 0:
        return PsfPhotometry(nan, nan.copy(), nan.copy(), np.ones(n, dtype=bool))
    try:
        size = psf_size(psf, stamp_size)
    except (skydiff.SkydiffError, ArithmeticError, ValueError):
        return PsfPhotometry(nan, nan.copy(), nan.copy(), np.ones(n, dtype=bool))
    models, model_bad = model_stamps(psf, x, y, size=size, origin=origin_of(exposure))
    data, variance, usable = usable_pixels(exposure, x, y, size=size, planes=bad_planes)
    usable &= np.isfinite(models)
    m2 = np.nan_to_num(models) ** 2
    total = m2.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        lost = 1.0 - np.sum(np.where(usable, m2, 0.0), axis=(1, 2)) / total
    center = usable[:, size // 2, size // 2]
    if fit_background:
        flux, flux_err, chi2dof = _fit_with_background(data, variance, models, usable)
    else:
        flux, flux_err, chi2dof = fit_psf_flux(data, variance, models, valid=usable)
    flag = (model_bad | ~center | ~(lost <= max_masked_fraction) | ~np.isfinite(flux)
            | ~np.isfinite(flux_err))
    return PsfPhotometry(flux, flux_err, chi2dof, flag)


@skydiff.configclass
class PsfFluxConfig(skydiff.Config):
    """Options of the ``psf_flux`` measurement."""

    stamp_size: int = skydiff.RangeField(
        0, min=0, doc="Side (pixels) of the fitted stamp, made odd by adding one if even; 0 "
                      "uses the side of the difference PSF's image.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(DEFAULT_EXCLUDED_PLANES), dtype=str,
        doc="Mask planes whose pixels are left out of the fit.")
    max_masked_fraction: float = skydiff.RangeField(
        0.2, min=0.0, max=1.0,
        doc="Flag a source when more than this fraction of the PSF's sum of squares "
            "(its weight in the fit) falls on excluded or off-image pixels.")
    error_calibration: str = skydiff.ChoiceField(
        "measured", allowed=ERROR_CALIBRATIONS,
        doc="How psf_flux_err is calibrated: by the noise measured on the difference's sky "
            "(outside the footprints), or from the variance plane alone.")


class PsfFluxMeasurement(skydiff.Measurement):
    r"""Flux of a point source at each position: a weighted linear fit of the difference PSF.

    For each source the difference image's PSF model :math:`m` at :math:`(x, y)` (evaluated
    at the source and shifted to its sub-pixel position, :func:`skydiff.photometry.psf_stamps`)
    is fitted to the stamp :math:`d` with weights :math:`1/V` from the variance plane:

    .. math::

        F = \frac{\sum_i m_i d_i / V_i}{\sum_i m_i^2 / V_i}, \qquad
        \sigma_F = \Big(\sum_i m_i^2 / V_i\Big)^{-1/2}, \qquad
        \chi^2_\nu = \frac{1}{N - 1}\sum_i \frac{(d_i - F m_i)^2}{V_i}

    (:func:`skydiff.photometry.fit_psf_flux`). The model has unit sum over the plane, so
    :math:`F` is the total flux (no aperture correction), negative for negative sources.
    Pixels of ``bad_planes``, off the image or not finite are left out. The stamp is the size
    of the PSF image unless ``stamp_size`` is set.

    :math:`\sigma_F` is exact for independent pixel noise described by the variance plane; on
    a difference whose noise is correlated (drizzled or stacked inputs, the PSF pre-filtered
    ``al_preconvolve`` difference, no decorrelation) it is too small, by the factor

    .. math:: \kappa = \Big(\sum_{ij} m_i m_j \rho_{i-j} \Big/ \sum_i m_i^2\Big)^{1/2}

    for a pixel autocorrelation :math:`\rho`. With ``error_calibration = "measured"`` (the
    default) :math:`\sigma_F` is multiplied by :math:`\hat s`, the robust standard deviation
    over the sky pixels (outside ``inputs.footprints``, masks and grown 5-sigma sources) of
    the matched-filtered significance :math:`\nu_0 = (D \star P)/\sqrt{V \star P^2}` of the
    difference (:func:`skydiff.photometry.psf_noise_scale`; 1 when the image has too few sky
    pixels): :math:`\hat s` estimates :math:`\kappa` for a constant PSF, and also corrects a
    variance plane off by a constant factor. On white noise :math:`\hat s = 1` within about
    1 % on a 256² image. The flux itself does not change. The scale is in the result
    metadata (``noise_scale``, ``noise_pixels``: the sky pixels it was measured on, 0 when
    not measured); ``"variance"`` keeps the variance-plane error.

    Columns: ``psf_flux``, ``psf_flux_err``, ``psf_chi2dof``, ``psf_flux_flag`` (position not
    finite, no PSF, masked or off-image centre pixel, more than ``max_masked_fraction`` of the
    PSF weight lost, or a failed fit). Flagged sources keep the fitted value when there was
    one.

    References
    ----------
    .. [1] Bosch, J. et al. 2018, PASJ 70, S5 (``base_PsfFlux`` of the LSST pipelines).
    """

    name = "psf_flux"
    ConfigClass = PsfFluxConfig
    order = 2.0
    tags = frozenset({"needs_psf"})

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        catalog, difference = check_inputs(inputs, "psf_flux")
        config = self.config
        x, y = positions(catalog)
        bad_planes = tuple(config.bad_planes)
        phot = psf_photometry(difference, difference.psf, x, y,
                              stamp_size=int(config.stamp_size), bad_planes=bad_planes,
                              max_masked_fraction=float(config.max_masked_fraction),
                              fit_background=False)
        scale = NoiseScale(1.0, 0, float("nan"))
        if config.error_calibration == "measured" and x.size:
            scale = noise_scale(difference, exclude=inputs.footprints, bad_planes=bad_planes)
        columns: dict[str, Any] = {
            "psf_flux": phot.flux, "psf_flux_err": phot.flux_err * scale.scale,
            "psf_chi2dof": phot.chi2dof, "psf_flux_flag": phot.flag,
        }
        return result(columns, "psf_flux_flag", has_psf=difference.psf is not None,
                      error_calibration=str(config.error_calibration),
                      noise_scale=float(scale.scale), noise_pixels=int(scale.n_pixels))


@skydiff.configclass
class ForcedPsfConfig(skydiff.Config):
    """Options of the ``forced_psf`` measurement."""

    stamp_size: int = skydiff.RangeField(
        0, min=0, doc="Side (pixels) of the fitted stamps, made odd by adding one if even; "
                      "0 uses the side of each image's PSF image.")
    fit_background: bool = skydiff.Field(
        True, doc="Fit a constant local background together with the flux (the science and "
                  "template images usually still hold their sky); False fits the flux only.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(DEFAULT_EXCLUDED_PLANES), dtype=str,
        doc="Mask planes whose pixels are left out of the fits.")
    max_masked_fraction: float = skydiff.RangeField(
        0.2, min=0.0, max=1.0,
        doc="Flag a source when more than this fraction of the PSF's sum of squares falls on "
            "excluded or off-image pixels of either image.")
    error_calibration: str = skydiff.ChoiceField(
        "measured", allowed=ERROR_CALIBRATIONS,
        doc="How the flux errors are calibrated: by the noise measured on each image's sky "
            "(outside the footprints and that image's own sources), or from the variance "
            "plane alone.")


class ForcedPsfMeasurement(skydiff.Measurement):
    r"""Forced PSF photometry at the catalog positions on the science and matched template.

    The same linear PSF fit as ``psf_flux``, at the (centroided) catalog position, on
    ``inputs.science`` with the science PSF and on ``inputs.template`` (the template after
    PSF matching) with its PSF. Positions are carried from the difference image's grid to
    each image's grid through the exposures' parent origins. With ``fit_background`` (the
    default) the model is :math:`F m + B` with a constant local background :math:`B`,

    .. math::

        \begin{pmatrix} \sum w m^2 & \sum w m \\ \sum w m & \sum w \end{pmatrix}
        \begin{pmatrix} F \\ B \end{pmatrix} =
        \begin{pmatrix} \sum w m d \\ \sum w d \end{pmatrix}, \qquad w = 1/V,

    with :math:`\sigma_F^2 = \sum w / \det`; this costs a few per cent in
    :math:`\sigma_F` for a PSF-sized stamp and removes the bias from the sky level.

    With ``error_calibration = "measured"`` (the default) each image's errors are multiplied
    by the noise scale measured on that image, as in ``psf_flux``
    (:func:`skydiff.photometry.psf_noise_scale` with its own PSF; ``inputs.footprints`` and
    the image's own 5-sigma sources, grown, are not sky; with ``fit_background`` the spread
    is taken about a 64-pixel background mesh of the significance, since these images still
    hold their sky). Resampled or stacked templates have correlated noise, so their
    variance-plane errors are too small. The scales are in the result metadata
    (``noise_scale_science``, ``noise_pixels_science``, ``noise_scale_template``,
    ``noise_pixels_template``); fluxes do not change.

    Columns: ``forced_science_flux``, ``forced_science_flux_err``, ``forced_template_flux``,
    ``forced_template_flux_err``, ``forced_psf_flag``. The flux of an image that is missing,
    has no PSF, or where the fit failed is NaN; the flag is set when either measurement is
    flagged (for the reasons of ``psf_flux``).

    References
    ----------
    .. [1] ``lsst.ip.diffim`` ``DetectAndMeasureTask`` forced ``PsfFlux`` on the science image
       and the matched template (``ip_diffim_forced_PsfFlux``,
       ``ip_diffim_forced_template_PsfFlux``).
    """

    name = "forced_psf"
    ConfigClass = ForcedPsfConfig
    order = 4.0
    tags = frozenset({"needs_psf"})

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        catalog, difference = check_inputs(inputs, "forced_psf")
        config = self.config
        x, y = positions(catalog)
        dx0, dy0 = origin_of(difference)
        columns: dict[str, Any] = {}
        flag = np.zeros(x.size, dtype=bool)
        available: dict[str, Any] = {"error_calibration": str(config.error_calibration)}
        bad_planes = tuple(config.bad_planes)
        for label in ("science", "template"):
            exposure: skydiff.Exposure | None = getattr(inputs, label)
            available[f"has_{label}"] = exposure is not None
            scale = NoiseScale(1.0, 0, float("nan"))
            if exposure is None:
                flux = np.full(x.size, np.nan)
                err = flux.copy()
                flag[:] = True
            else:
                x0, y0 = origin_of(exposure)
                phot = psf_photometry(exposure, exposure.psf, x + (dx0 - x0), y + (dy0 - y0),
                                      stamp_size=int(config.stamp_size), bad_planes=bad_planes,
                                      max_masked_fraction=float(config.max_masked_fraction),
                                      fit_background=bool(config.fit_background))
                if config.error_calibration == "measured" and x.size:
                    scale = noise_scale(
                        exposure, exclude=_footprints_on(inputs.footprints, difference,
                                                         exposure),
                        bad_planes=bad_planes,
                        background_bin_size=(_FORCED_BACKGROUND_BIN if config.fit_background
                                             else None))
                flux = np.where(np.isfinite(phot.flux) & np.isfinite(phot.flux_err),
                                phot.flux, np.nan)
                err = np.where(np.isfinite(flux), phot.flux_err * scale.scale, np.nan)
                flag |= phot.flag
            available[f"noise_scale_{label}"] = float(scale.scale)
            available[f"noise_pixels_{label}"] = int(scale.n_pixels)
            columns[f"forced_{label}_flux"] = flux
            columns[f"forced_{label}_flux_err"] = err
        columns["forced_psf_flag"] = flag
        return result(columns, "forced_psf_flag", **available)


def _footprints_on(footprints: np.ndarray | None, difference: skydiff.Exposure,
                   exposure: skydiff.Exposure) -> np.ndarray | None:
    """The difference's footprint pixels on ``exposure``'s grid (through the parent origins;
    pixels outside the difference are not excluded), or None."""
    if footprints is None:
        return None
    dx0, dy0 = (int(v) for v in difference.origin)
    ex0, ey0 = (int(v) for v in exposure.origin)
    if (dx0, dy0) == (ex0, ey0) and footprints.shape == exposure.shape:
        return footprints
    out = np.zeros(exposure.shape, dtype=bool)
    height, width = exposure.shape
    r0, c0 = dy0 - ey0, dx0 - ex0  # the difference's first pixel on the exposure's grid
    rs, cs = max(r0, 0), max(c0, 0)
    re = min(r0 + footprints.shape[0], height)
    ce = min(c0 + footprints.shape[1], width)
    if re > rs and ce > cs:
        out[rs:re, cs:ce] = footprints[rs - r0:re - r0, cs - c0:ce - c0] != 0
    return out
