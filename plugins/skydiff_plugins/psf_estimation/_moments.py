"""The ``gaussian_moments`` PSF estimator: a circular Gaussian from the stars' moments."""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

import skydiff

from ._stars import check_exposure, good_stars, star_catalog, stellar_locus


@skydiff.configclass
class GaussianMomentsPsfConfig(skydiff.Config):
    """Options of the ``gaussian_moments`` PSF estimator."""

    detection_threshold: float = skydiff.RangeField(
        10.0, min=1.0, doc="Matched-filter S/N threshold of the star detection "
                           "(skydiff.find_stars) when no sources are given.")
    min_snr: float = skydiff.RangeField(
        10.0, min=0.0, doc="Smallest flux S/N of a star used for the moments.")
    require_isolated: bool = skydiff.Field(
        True, doc="Use only isolated stars, unless none is isolated (then all good stars).")
    select_locus: bool = skydiff.Field(
        True, doc="Keep only sources on the stellar locus: the smallest dense mode of the "
                  "adaptive-moment FWHM among the bright sources, extended while the size "
                  "density stays high (galaxies are larger, cosmic rays smaller).")
    max_size_ratio: float = skydiff.RangeField(
        1.5, min=1.0, inclusive_min=False,
        doc="Largest FWHM ratio between a star and the centre of the stellar locus (either "
            "way).")
    min_fwhm: float = skydiff.RangeField(
        1.0, min=0.0, doc="Sources with an adaptive-moment FWHM below this many pixels "
                          "(cosmic rays, hot pixels) are never stars.")
    fwhm: float | None = skydiff.RangeField(
        None, min=0.1, optional=True,
        doc="Guess of the PSF FWHM in pixels for the detection filter; None estimates it.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(skydiff.DEFAULT_BAD_PLANES), dtype=str,
        doc="Mask planes that disqualify a star when set inside its stamp.")


class GaussianMomentsPsfEstimator(skydiff.PsfEstimator):
    r"""A circular Gaussian PSF with the median adaptive size of the good stars.

    The stars (detected with :func:`skydiff.find_stars`, or the given ``sources`` measured
    with :func:`skydiff.measure_stars`) that are unmasked, unsaturated, isolated, above
    ``min_snr`` and on the stellar locus (the smallest dense mode of the size distribution,
    so galaxies and cosmic rays are rejected; ``select_locus``) give adaptive moments
    :math:`I_{xx}, I_{yy}` (Bernstein & Jarvis 2002); the PSF is the
    :class:`~skydiff.GaussianPsf` of

    .. math:: \sigma = \operatorname{median}_i \sqrt{(I_{xx,i} + I_{yy,i})/2},

    so its FWHM is the median ``fwhm`` of the stars. One star suffices. It ignores
    ellipticity, wings and spatial variation: the ``empirical`` estimator models those.

    Raises
    ------
    InputError
        If the input is not an Exposure or ``sources`` lacks ``x``/``y``.
    PsfEstimationError
        If no good star is found (metadata ``n_found`` = 0, ``n_needed`` = 1).

    References
    ----------
    .. [1] Bernstein, G. M. & Jarvis, M. 2002, AJ 123, 583.

    Examples
    --------
    >>> from skydiff.sim import simulate_pair
    >>> science = simulate_pair(shape=(96, 96), n_stars=15, flux_min=5e3, seed=4).science
    >>> result = GaussianMomentsPsfEstimator().run(science.evolve(psf=None))
    >>> abs(result.psf.fwhm() / science.psf.fwhm() - 1) < 0.05
    True
    """

    name = "gaussian_moments"
    ConfigClass = GaussianMomentsPsfConfig

    def run(self, exposure: skydiff.Exposure, *, sources: Table | None = None
            ) -> skydiff.PsfEstimationResult:
        exposure = check_exposure(exposure)
        config = self.config
        with self.timer("run"):
            table = star_catalog(exposure, sources, threshold=config.detection_threshold,
                                 fwhm=config.fwhm, bad_planes=config.bad_planes)
            eligible = good_stars(table, min_snr=config.min_snr, require_isolated=False)
            if config.select_locus:
                eligible = stellar_locus(table, eligible, max_ratio=config.max_size_ratio,
                                         min_fwhm=config.min_fwhm)
            good = eligible
            if config.require_isolated:
                good = eligible & np.asarray(table["isolated"], dtype=bool)
                if not good.any():
                    good = eligible
            n_good = int(good.sum())
            if n_good == 0:
                msg = (f"no usable star for a Gaussian PSF: {len(table)} sources, 0 unmasked, "
                       f"unsaturated, on the stellar locus with S/N >= {config.min_snr:g}; "
                       "need at least 1")
                raise skydiff.PsfEstimationError(msg, n_found=0, n_needed=1,
                                                 n_sources=len(table))
            stars = table[good]
            size2 = 0.5 * (np.asarray(stars["ixx"], dtype=np.float64)
                           + np.asarray(stars["iyy"], dtype=np.float64))
            sigma = float(np.median(np.sqrt(size2)))
            psf = skydiff.GaussianPsf(sigma)
        metadata = {"n_stars": n_good, "n_sources": len(table), "sigma": sigma,
                    "fwhm": psf.fwhm(), "sigma_scatter": float(np.std(np.sqrt(size2)))
                    if n_good > 1 else 0.0}
        if not math.isfinite(metadata["sigma_scatter"]):
            metadata["sigma_scatter"] = 0.0
        self.metadata.update(metadata)
        return skydiff.PsfEstimationResult(psf=psf, sources=stars, metadata=metadata)
