r"""The ``empirical`` PSF estimator: a PSFEx-like pixel-basis model with polynomial variation.

Steps (all vectorised over stars; the loops run over a few clipping iterations only):

1. **Stars**: :func:`skydiff.find_stars` (or the caller's ``sources`` measured with
   :func:`skydiff.measure_stars`); keep the unmasked, unsaturated, isolated stars with
   converged moments, S/N ≥ ``min_snr`` and the whole stamp inside the image, on the stellar
   locus (the smallest dense mode of the adaptive-moment size, which rejects galaxies, and
   not narrower than ``min_fwhm``, which rejects cosmic rays and hot pixels; see
   ``select_locus``); at most ``max_stars``, the brightest.
2. **Stamps**: the sky (a :func:`skydiff.background_mesh` that ignores the stars' pixels) is
   subtracted and a stamp of side :math:`S + 2m` is cut around the nearest pixel of each
   centroid; each stamp is shifted by its sub-pixel offset with the Fourier shift theorem
   (exact for a band-limited image) and cropped to :math:`S \times S`, so that every star is
   centred on the central pixel.
3. **Normalisation**: each star's flux :math:`f_i` is the least-squares amplitude of the
   current model (first the median of the sum-normalised stamps): :math:`D_i = d_i / f_i`.
4. **Fit**: every pixel :math:`p` of the PSF image is a polynomial of the position,
   :math:`P_p(x, y) = \sum_t a_{pt}\,T_t(x, y)` (Chebyshev terms of total degree ≤
   ``spatial_order`` over the exposure's parent bbox), fitted by weighted least squares with
   one weight per star, :math:`w_i = f_i^2 / \bar V_i` (:math:`\bar V_i`: mean variance in the
   stamp). The normal matrix :math:`F^\mathsf{T} W F` is shared by all pixels, so one solve
   gives all :math:`S^2 \times n_t` coefficients:
   :math:`A = (F^\mathsf{T} W F)^{-1} F^\mathsf{T} W D`.
5. **Clipping**: stars whose reduced :math:`\chi^2` against the model at their position is
   an outlier (binaries, galaxies, cosmic rays, undetected neighbours) are dropped and the
   fit repeated, up to ``n_clip_iter`` times.
6. **Order**: the spatial order (≤ ``spatial_order``) with the smallest Akaike information
   criterion is kept (``select_order``).
7. **Validation**: the model is evaluated on a 5 × 5 grid over the exposure's bbox (corners,
   edges and centre included); every image must have a positive sum, finite pixels, its
   peak within a pixel of the centre and a FWHM within a factor 2 of the stars' median. A
   model that fails is refitted with the next lower spatial order; if even the constant
   model fails, :class:`skydiff.PsfEstimationError` is raised, so that a caller (the
   subtraction) can fall back to ``gaussian_moments``.

The result is a :class:`skydiff.PolynomialPsf` whose basis images are the coefficient images
:math:`A_t` (the PSFEx ``PSF_MASK`` layout) with identity coefficients, or an
:class:`skydiff.ImagePsf` for order 0.

References
----------
.. [1] Bertin, E. 2011, ASP Conf. Ser. 442, 435, "Automated Morphometry with SExtractor and
   PSFEx".
.. [2] Bernstein, G. M. & Jarvis, M. 2002, AJ 123, 583 (adaptive moments).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.fft
from astropy.table import Table
from scipy.spatial import cKDTree

import skydiff

from ._stars import check_exposure, good_stars, star_catalog, stellar_locus

#: Extra pixels on each side of a stamp before the sub-pixel shift (cropped afterwards).
_MARGIN = 4
#: Smallest stamp side.
_MIN_STAMP = 15
#: Positions per axis of the validation grid over the bbox (odd: includes edges and centre).
_CHECK_GRID = 5
#: Largest ratio between the model's FWHM anywhere in the bbox and the stars' median FWHM.
_MAX_FWHM_RATIO = 2.0


@skydiff.configclass
class EmpiricalPsfConfig(skydiff.Config):
    """Options of the ``empirical`` PSF estimator."""

    detection_threshold: float = skydiff.RangeField(
        5.0, min=1.0, doc="Matched-filter S/N threshold of the star detection "
                          "(skydiff.find_stars) when no sources are given; every detection "
                          "is masked in the other stars' stamps.")
    min_snr: float = skydiff.RangeField(
        20.0, min=0.0, doc="Smallest flux S/N of a star used in the fit.")
    max_stars: int = skydiff.RangeField(
        500, min=1, doc="Largest number of stars used (the highest S/N ones).")
    min_stars: int = skydiff.RangeField(
        3, min=1, doc="Fewest usable stars; fewer raise PsfEstimationError.")
    require_isolated: bool = skydiff.Field(
        True, doc="Use only stars without another detection within 2.5 FWHM.")
    select_locus: bool = skydiff.Field(
        True, doc="Keep only sources on the stellar locus: the smallest dense mode of the "
                  "adaptive-moment FWHM among the bright sources, extended while the size "
                  "density stays high (galaxies are larger, cosmic rays smaller).")
    max_size_ratio: float = skydiff.RangeField(
        1.5, min=1.0, inclusive_min=False,
        doc="Largest FWHM ratio between a star and the centre of the stellar locus (either "
            "way); bounds the locus of a spatially varying PSF.")
    min_fwhm: float = skydiff.RangeField(
        1.0, min=0.0, doc="Sources with an adaptive-moment FWHM below this many pixels "
                          "(cosmic rays, hot pixels) are never stars.")
    stamp_size: int = skydiff.RangeField(
        0, min=0, doc="Odd side of the PSF image in pixels; 0 chooses "
                      "max(15, 2 ceil(2.5 FWHM) + 1) from the stars' median FWHM.")
    spatial_order: int = skydiff.RangeField(
        2, min=0, max=6, doc="Total degree of the Chebyshev polynomials of position of every "
                             "PSF pixel; 0 gives a constant ImagePsf. Lowered automatically "
                             "until there are at least stars_per_term stars per term.")
    select_order: bool = skydiff.Field(
        True, doc="Choose the spatial order between 0 and spatial_order by the Akaike "
                  "information criterion, so that a constant PSF is not fitted with a noisier "
                  "polynomial.")
    stars_per_term: float = skydiff.RangeField(
        3.0, min=1.0, doc="Stars needed per spatial term before the order is lowered.")
    shape_clip: float = skydiff.RangeField(
        3.0, min=1.0, doc="Stars whose size (Ixx + Iyy) or ellipticity deviates from a smooth "
                          "fit across the field by more than this many robust sigmas are "
                          "rejected before the fit (blends, galaxies).")
    psf_accuracy: float = skydiff.RangeField(
        0.01, min=0.0, doc="Relative accuracy floor of the model (PSFEx PSF_ACCURACY): a star's "
                           "weight is at most 1 / (psf_accuracy x PSF peak)^2, so the brightest "
                           "stars do not dominate the fit; the same floor is added to the "
                           "pixel variance of the chi-square that rejects outlier stars.")
    clip_sigma: float = skydiff.RangeField(
        4.0, min=1.0, doc="Stars whose log reduced chi-square exceeds the median by this many "
                          "robust sigmas (and whose reduced chi-square exceeds 2) are rejected.")
    n_clip_iter: int = skydiff.RangeField(
        3, min=0, doc="Maximum number of fit-and-reject iterations after the first fit.")
    background_bin_size: int = skydiff.RangeField(
        64, min=8, doc="Bin size in pixels of the sky mesh subtracted before cutting stamps.")
    fwhm: float | None = skydiff.RangeField(
        None, min=0.1, optional=True,
        doc="Guess of the PSF FWHM in pixels for the detection filter; None estimates it.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        list(skydiff.DEFAULT_BAD_PLANES), dtype=str,
        doc="Mask planes that disqualify a star when set inside its stamp.")


def _odd(value: int) -> int:
    return value if value % 2 == 1 else value + 1


def _shift_stamps(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    r"""Shift every stamp by ``(-dx, -dy)`` pixels with the Fourier shift theorem.

    :math:`\hat s'(k) = \hat s(k)\,e^{2\pi i (k_x d_x + k_y d_y)}` moves the content at
    :math:`(d_x, d_y)` (relative to the centre) onto the centre. Stamps have odd sides, so
    there is no Nyquist frequency to treat specially.
    """
    size = stamps.shape[-1]
    spectrum = scipy.fft.fft2(stamps, axes=(-2, -1))
    k = scipy.fft.fftfreq(size)
    phase = np.exp(2j * np.pi * (dy[:, None, None] * k[None, :, None]
                                 + dx[:, None, None] * k[None, None, :]))
    return np.real(scipy.fft.ifft2(spectrum * phase, axes=(-2, -1)))


def _design(xs: np.ndarray, ys: np.ndarray, order: int,
            bbox: tuple[float, float, float, float]) -> np.ndarray:
    """The (n_stars, n_terms) matrix of the spatial functions at the stars' positions."""
    return skydiff.spatial_functions(xs, ys, order=order, bbox=bbox).T


def _solve(design: np.ndarray, weights: np.ndarray, data: np.ndarray) -> np.ndarray:
    r"""Weighted least squares of every pixel's polynomial, all pixels in one batched solve.

    For pixel :math:`p`: :math:`(F^\mathsf{T} W_p F)\,a_p = F^\mathsf{T} W_p D_p` with
    :math:`F` the (stars, terms) design matrix and :math:`W_p` the stars' weights at that
    pixel (0 where a pixel is masked). Returns the (terms, pixels) coefficients.
    """
    normal = np.einsum("ip,it,iu->ptu", weights, design, design)
    rhs = np.einsum("ip,it,ip->pt", weights, design, data)
    n_terms = design.shape[1]
    scale = np.trace(normal, axis1=1, axis2=2)[:, None, None] / n_terms
    ridge = 1e-10 * np.maximum(scale, 1e-300) * np.eye(n_terms)
    return np.linalg.solve(normal + ridge, rhs[:, :, None])[:, :, 0].T


def _reduced_chi2(stamps: np.ndarray, model: np.ndarray, flux: np.ndarray, valid: np.ndarray,
                  variance: np.ndarray, floor: float) -> np.ndarray:
    r"""Every star's reduced :math:`\chi^2` against ``flux`` × ``model``.

    The variance of a pixel is the image variance plus the model's accuracy floor,
    :math:`V + f^2 (\epsilon\,P_\mathrm{max})^2` (PSFEx ``PSF_ACCURACY``): a bright star that
    the model describes to ``psf_accuracy`` is not an outlier because its photon noise is small.
    """
    residual = np.where(valid, stamps - flux[:, None] * model, 0.0)
    total = np.where(valid, variance + floor * flux[:, None] ** 2, 1.0)
    return (residual**2 / total).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)


def _amplitudes(stamps: np.ndarray, model: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Least-squares amplitude of ``model`` in every stamp over its valid pixels."""
    norm = np.einsum("np,np,np->n", model, model, valid)
    return np.einsum("np,np,np->n", stamps, model, valid) / np.where(norm > 0, norm, 1.0)


class EmpiricalPsfEstimator(skydiff.PsfEstimator):
    r"""A spatially varying pixel-basis PSF fitted to bright isolated stars (PSFEx-like).

    See the module documentation for the algorithm. The PSF image is normalised to unit sum
    over its :math:`S \times S` stamp, so light beyond the stamp (far Moffat wings) is not
    modelled; choose ``stamp_size`` accordingly.

    Raises
    ------
    InputError
        If the input is not an Exposure or ``sources`` lacks ``x``/``y``.
    PsfEstimationError
        If fewer than ``min_stars`` usable stars are found (metadata ``n_found``,
        ``n_needed``), the fit is singular, or no spatial order down to 0 gives a model
        that is valid over the whole exposure (metadata ``n_orders_rejected``).

    References
    ----------
    .. [1] Bertin, E. 2011, ASP Conf. Ser. 442, 435.

    Examples
    --------
    >>> from skydiff.sim import simulate_pair
    >>> science = simulate_pair(shape=(256, 256), n_stars=80, flux_min=5e3, seed=4).science
    >>> result = EmpiricalPsfEstimator().run(science.evolve(psf=None))
    >>> abs(result.psf.fwhm() / science.psf.fwhm() - 1) < 0.03
    True
    """

    name = "empirical"
    ConfigClass = EmpiricalPsfConfig
    tags = frozenset({"spatially_varying"})

    def run(self, exposure: skydiff.Exposure, *, sources: Table | None = None
            ) -> skydiff.PsfEstimationResult:
        exposure = check_exposure(exposure)
        with self.timer("run"):
            psf, stars, metadata = self._estimate(exposure, sources)
        self.metadata.update(metadata)
        return skydiff.PsfEstimationResult(psf=psf, sources=stars, metadata=metadata)

    # -- steps ---------------------------------------------------------------------------

    def _fail(self, n_found: int, n_candidates: int) -> skydiff.PsfEstimationError:
        needed = int(self.config.min_stars)
        msg = (f"too few stars for an empirical PSF: {n_found} usable of {n_candidates} "
               f"sources, need {needed}; lower min_snr, pass sources, or use gaussian_moments")
        return skydiff.PsfEstimationError(msg, n_found=n_found, n_needed=needed,
                                          n_sources=n_candidates)

    def _estimate(self, exposure: skydiff.Exposure, sources: Table | None
                  ) -> tuple[skydiff.Psf, Table, dict[str, Any]]:
        config = self.config
        table = star_catalog(exposure, sources, threshold=config.detection_threshold,
                             fwhm=config.fwhm, bad_planes=config.bad_planes)
        eligible = good_stars(table, min_snr=config.min_snr, require_isolated=False)
        if config.select_locus:
            eligible = stellar_locus(table, eligible, max_ratio=config.max_size_ratio,
                                     min_fwhm=config.min_fwhm)
        n_locus = int(eligible.sum())
        good = eligible
        if config.require_isolated:
            good = eligible & np.asarray(table["isolated"], dtype=bool)
            if int(good.sum()) < config.min_stars:
                # neighbours are masked in the stamps anyway: fall back to crowded stars
                good = eligible
        if int(good.sum()) < config.min_stars:
            raise self._fail(int(good.sum()), len(table))
        fwhm = float(np.median(np.asarray(table["fwhm"], dtype=np.float64)[good]))
        size = config.stamp_size or max(_MIN_STAMP, 2 * math.ceil(2.5 * fwhm) + 1)
        size = _odd(int(size))
        half = size // 2
        big_half = half + _MARGIN
        height, width = exposure.shape
        x = np.asarray(table["x"], dtype=np.float64)
        y = np.asarray(table["y"], dtype=np.float64)
        col = np.rint(x).astype(np.intp)
        row = np.rint(y).astype(np.intp)
        # the PSF stamp must lie inside the image; its Fourier-shift margin may not
        inside = ((row - half >= 0) & (row + half < height) & (col - half >= 0)
                  & (col + half < width))
        candidates = np.flatnonzero(good & inside)
        if candidates.size < config.min_stars:
            raise self._fail(int(candidates.size), len(table))
        snr = np.asarray(table["snr"], dtype=np.float64)
        candidates = candidates[np.argsort(-snr[candidates], kind="stable")][:config.max_stars]

        x0, y0, x1, y1 = exposure.bbox
        bbox = (float(x0), float(y0), float(x1), float(y1))
        candidates = candidates[self._shape_inliers(table, candidates, bbox)]
        if candidates.size < config.min_stars:
            raise self._fail(int(candidates.size), len(table))

        image = self._sky_subtracted(exposure, x, y, fwhm)
        offsets = np.arange(-big_half, big_half + 1)
        rows_big = row[candidates, None] + offsets
        cols_big = col[candidates, None] + offsets
        outside = ~(((rows_big >= 0) & (rows_big < height))[:, :, None]
                    & ((cols_big >= 0) & (cols_big < width))[:, None, :])
        r_idx = np.clip(rows_big, 0, height - 1)[:, :, None]
        c_idx = np.clip(cols_big, 0, width - 1)[:, None, :]
        big = np.where(outside, 0.0, image[r_idx, c_idx])
        shifted = _shift_stamps(big, x[candidates] - col[candidates],
                                y[candidates] - row[candidates])
        crop = slice(_MARGIN, _MARGIN + size)
        n_cand = candidates.size
        stamps = shifted[:, crop, crop].reshape(n_cand, -1)
        variance = np.asarray(exposure.variance, dtype=np.float64)[r_idx, c_idx][:, crop, crop]
        variance = variance.reshape(n_cand, -1)
        bad_names = [name for name in config.bad_planes if name in exposure.mask_planes.names]
        bad = (exposure.masked(*bad_names)[r_idx, c_idx][:, crop, crop].reshape(n_cand, -1)
               if bad_names else np.zeros(stamps.shape, dtype=bool))
        valid = ~(bad | self._neighbour_pixels(x, y, candidates, col, row, half, fwhm))
        valid &= np.isfinite(stamps) & (variance > 0)
        stamps = np.where(valid, stamps, 0.0)
        mean_variance = np.array([v[m].mean() if m.any() else np.inf
                                  for v, m in zip(variance, valid, strict=True)])

        px = x[candidates] + x0
        py = y[candidates] + y0

        # initial model: median of the sum-normalised stamps; then least-squares fluxes
        sums = stamps.sum(axis=1)
        positive = (sums > 0) & (valid.mean(axis=1) > 0.5)
        if int(positive.sum()) < config.min_stars:
            raise self._fail(int(positive.sum()), len(table))
        model0 = np.median(stamps[positive] / sums[positive, None], axis=0)
        flux = _amplitudes(stamps, np.broadcast_to(model0, stamps.shape), valid)

        use = positive & (flux > 0)
        n_stars = int(use.sum())
        order = self._order(n_stars)
        coefficients = np.zeros((1, stamps.shape[1]))
        model = np.broadcast_to(model0, stamps.shape)
        chi2 = np.full(n_cand, np.nan)
        floor = (config.psf_accuracy * float(model0.max())) ** 2
        for iteration in range(int(config.n_clip_iter) + 1):
            n_stars = int(use.sum())
            if n_stars < config.min_stars:
                raise self._fail(n_stars, len(table))
            order = self._order(n_stars)
            design = _design(px, py, order, bbox)
            safe_flux = np.where(flux > 0, flux, 1.0)
            data = stamps / safe_flux[:, None]
            weights = np.where(use, 1.0 / (mean_variance / safe_flux**2 + floor), 0.0)
            coefficients = _solve(design, weights[:, None] * valid, data)
            model = design @ coefficients  # (n, S²) model at every candidate
            # refit each star's flux to the model at its position, then its chi-square
            flux = _amplitudes(stamps, model, valid)
            chi2 = _reduced_chi2(stamps, model, flux, valid, variance, floor)
            if iteration == config.n_clip_iter:
                break
            log_chi2 = np.log(np.maximum(chi2, 1e-300))
            center = float(np.median(log_chi2[use]))
            spread = 1.4826 * float(np.median(np.abs(log_chi2[use] - center)))
            outlier = (log_chi2 > center + config.clip_sigma * max(spread, 1e-3)) & (chi2 > 2.0)
            outlier |= flux <= 0
            new_use = use & ~outlier
            if np.array_equal(new_use, use):
                break
            use = new_use
        n_used = int(use.sum())
        if config.select_order and order > 0:
            order, coefficients = self._select_order(px, py, bbox, order, stamps, flux, valid,
                                                     mean_variance, floor, use)
            model = _design(px, py, order, bbox) @ coefficients
            flux = _amplitudes(stamps, model, valid)
            chi2 = _reduced_chi2(stamps, model, flux, valid, variance, floor)

        star_fwhm = float(np.median(np.asarray(table["fwhm"], dtype=np.float64)[
            candidates[use]]))
        position = (float(np.mean(px[use])), float(np.mean(py[use])))
        problems: list[str] = []
        rejected: list[int] = []
        while True:
            psf, problem = self._model(coefficients, order, size, bbox, position, star_fwhm)
            if psf is not None:
                break
            problems.append(f"order {order}: {problem}")
            rejected.append(order)
            if order == 0:
                msg = ("the empirical PSF model is invalid inside the exposure at every "
                       f"spatial order ({'; '.join(problems)}); {n_used} stars were used. "
                       "Spread the stars over the field, lower spatial_order, or use "
                       "gaussian_moments")
                raise skydiff.PsfEstimationError(msg, n_found=n_used,
                                                 n_needed=int(config.min_stars),
                                                 n_orders_rejected=len(rejected))
            order -= 1
            coefficients = self._fit(px, py, bbox, order, stamps, flux, valid, mean_variance,
                                     floor, use)
        if rejected:
            model = _design(px, py, order, bbox) @ coefficients
            flux = _amplitudes(stamps, model, valid)
            chi2 = _reduced_chi2(stamps, model, flux, valid, variance, floor)
        fwhm_model = float(psf.fwhm())
        peak = float(psf.kernel_image().max())
        normalised = (stamps[use] / flux[use, None] - model[use]) / peak
        residual_rms = float(np.sqrt(np.mean(normalised[valid[use]] ** 2)))

        stars = table[candidates[use]]
        stars["psf_flux"] = flux[use]
        stars["psf_chi2"] = chi2[use]
        metadata = {"n_stars": n_used, "n_candidates": int(candidates.size),
                    "n_rejected": int(candidates.size - n_used), "n_sources": len(table),
                    "n_locus": n_locus, "spatial_order": int(order),
                    "rejected_orders": rejected, "stamp_size": int(size), "fwhm": fwhm_model,
                    "residual_rms": residual_rms}
        return psf, stars, metadata

    @staticmethod
    def _fit(px: np.ndarray, py: np.ndarray, bbox: tuple[float, float, float, float],
             order: int, stamps: np.ndarray, flux: np.ndarray, valid: np.ndarray,
             mean_variance: np.ndarray, floor: float, use: np.ndarray) -> np.ndarray:
        """The (terms, pixels) coefficients of order ``order`` fitted to the ``use`` stars."""
        safe_flux = np.where(flux > 0, flux, 1.0)
        weights = np.where(use, 1.0 / (mean_variance / safe_flux**2 + floor), 0.0)
        return _solve(_design(px, py, order, bbox), weights[:, None] * valid,
                      stamps / safe_flux[:, None])

    @staticmethod
    def _model(coefficients: np.ndarray, order: int, size: int,
               bbox: tuple[float, float, float, float], position: tuple[float, float],
               star_fwhm: float) -> tuple[skydiff.Psf | None, str]:
        """The PSF of these coefficients, or None and the reason it is invalid.

        The model is evaluated on a :data:`_CHECK_GRID` × :data:`_CHECK_GRID` grid spanning
        ``bbox`` (corners, edge midpoints and centre included). Every image must have a
        positive sum (before normalisation), finite pixels, its maximum within one pixel of
        the central pixel, and an adaptive-moment FWHM within a factor
        :data:`_MAX_FWHM_RATIO` of ``star_fwhm``. A polynomial fitted to stars in one part of
        the field can extrapolate to nonsense elsewhere; this catches it here rather than
        deep inside a subtraction.
        """
        basis = coefficients.reshape(-1, size, size)
        if not np.all(np.isfinite(basis)):
            return None, "non-finite coefficients"
        psf: skydiff.Psf
        x_min, y_min, x_max, y_max = bbox
        grid_x, grid_y = np.meshgrid(np.linspace(x_min, x_max, _CHECK_GRID),
                                     np.linspace(y_min, y_max, _CHECK_GRID))
        if order == 0:
            raw = basis[0][None]
        else:
            values = skydiff.spatial_functions(grid_x.ravel(), grid_y.ravel(), order=order,
                                               bbox=bbox)
            raw = np.einsum("tn,trc->nrc", values, basis)
        sums = raw.sum(axis=(1, 2))
        if not np.all(sums > 0):
            bad = int(np.argmin(sums > 0))
            where = ("" if order == 0
                     else f" at (x, y) = ({grid_x.ravel()[bad]:g}, {grid_y.ravel()[bad]:g})")
            return None, f"non-positive sum {sums[bad]:.3g}{where}"
        images = raw / sums[:, None, None]
        centre = size // 2
        for index, image in enumerate(images):
            where = ("" if order == 0
                     else f" at (x, y) = ({grid_x.ravel()[index]:g}, {grid_y.ravel()[index]:g})")
            row, col = np.unravel_index(int(np.argmax(image)), image.shape)
            if max(abs(int(row) - centre), abs(int(col) - centre)) > 1:
                return None, f"peak off centre{where}"
            try:
                fwhm = skydiff.psf_fwhm_from_image(image)
            except skydiff.InputError as exc:
                return None, f"no FWHM{where} ({exc})"
            if not (math.isfinite(fwhm)
                    and 1.0 / _MAX_FWHM_RATIO <= fwhm / star_fwhm <= _MAX_FWHM_RATIO):
                return None, f"FWHM {fwhm:.3g} px{where} vs {star_fwhm:.3g} px of the stars"
        if order == 0:
            psf = skydiff.ImagePsf(basis[0], position=position)
        else:
            psf = skydiff.PolynomialPsf(basis, np.eye(basis.shape[0]), order=order, bbox=bbox)
        return psf, ""

    def _shape_inliers(self, table: Table, candidates: np.ndarray,
                       bbox: tuple[float, float, float, float]) -> np.ndarray:
        """Stars whose size and ellipticity agree with a smooth fit across the field.

        Size :math:`T = I_{xx} + I_{yy}` (relative to its median) and ellipticity
        :math:`e_1 = (I_{xx} - I_{yy})/T`, :math:`e_2 = 2 I_{xy}/T` are each fitted with a
        Chebyshev polynomial of position (the PSF's spatial order, at most 2) with two passes
        of clipping; stars off by more than ``shape_clip`` robust σ (at least 1 % in size and
        0.01 in ellipticity) in any of them are dropped.
        """
        ixx = np.asarray(table["ixx"], dtype=np.float64)[candidates]
        iyy = np.asarray(table["iyy"], dtype=np.float64)[candidates]
        ixy = np.asarray(table["ixy"], dtype=np.float64)[candidates]
        size = ixx + iyy
        quantities = [(size / np.median(size), 0.01), ((ixx - iyy) / size, 0.01),
                      (2.0 * ixy / size, 0.01)]
        x0, y0 = bbox[0], bbox[1]
        order = min(2, self._order(candidates.size))
        design = _design(np.asarray(table["x"], dtype=np.float64)[candidates] + x0,
                         np.asarray(table["y"], dtype=np.float64)[candidates] + y0, order, bbox)
        keep = np.ones(candidates.size, dtype=bool)
        for values, floor in quantities:
            inlier = np.ones(candidates.size, dtype=bool)
            residual = values - np.median(values)
            for _ in range(2):
                if int(inlier.sum()) <= design.shape[1]:
                    break
                fit, *_ = np.linalg.lstsq(design[inlier], values[inlier], rcond=None)
                residual = values - design @ fit
                scatter = max(1.4826 * float(np.median(np.abs(residual[inlier]))), floor)
                inlier = np.abs(residual) <= self.config.shape_clip * scatter
            keep &= inlier
        if int(keep.sum()) < self.config.min_stars:
            return np.ones(candidates.size, dtype=bool)
        return keep

    @staticmethod
    def _neighbour_pixels(x: np.ndarray, y: np.ndarray, candidates: np.ndarray,
                          col: np.ndarray, row: np.ndarray, half: int, fwhm: float
                          ) -> np.ndarray:
        """Per candidate stamp (flattened): pixels within 2 FWHM + 1 of another source."""
        radius = 2.0 * fwhm + 1.0
        size = 2 * half + 1
        tree = cKDTree(np.column_stack([x, y]))
        reach = half * math.sqrt(2.0) + radius
        lists = tree.query_ball_point(np.column_stack([x[candidates], y[candidates]]), reach)
        owner = np.repeat(np.arange(candidates.size), [len(item) for item in lists])
        others = np.fromiter((j for item in lists for j in item), dtype=np.intp,
                             count=owner.size)
        keep = others != candidates[owner]
        owner, others = owner[keep], others[keep]
        masked = np.zeros((candidates.size, size, size), dtype=bool)
        if owner.size:
            offsets = np.arange(-half, half + 1, dtype=np.float64)
            dx = x[others] - col[candidates][owner]
            dy = y[others] - row[candidates][owner]
            near = ((offsets[None, :, None] - dy[:, None, None]) ** 2
                    + (offsets[None, None, :] - dx[:, None, None]) ** 2) <= radius**2
            np.logical_or.at(masked, owner, near)
        return masked.reshape(candidates.size, -1)

    @staticmethod
    def _select_order(px: np.ndarray, py: np.ndarray, bbox: tuple[float, float, float, float],
                      max_order: int, stamps: np.ndarray, flux: np.ndarray, valid: np.ndarray,
                      mean_variance: np.ndarray, floor: float, use: np.ndarray
                      ) -> tuple[int, np.ndarray]:
        r"""The spatial order with the smallest Akaike information criterion.

        .. math:: \mathrm{AIC}(o) = \chi^2(o) / \hat s^2 + 2\,n_t(o)\,S^2,

        with :math:`\chi^2` the residual sum of the fit of order :math:`o` weighted by the
        pixel noise alone (no accuracy floor), :math:`\hat s^2` the reduced :math:`\chi^2`
        of the highest order (so the criterion is in units of the actual scatter) and
        :math:`n_t(o) S^2` the number of coefficients. A PSF that does not vary gets order 0
        instead of a noisier polynomial.
        """
        data = stamps[use] / flux[use, None]
        fit_weights = (1.0 / (mean_variance[use] / flux[use] ** 2 + floor))[:, None] * valid[use]
        noise_weights = (flux[use] ** 2 / mean_variance[use])[:, None] * valid[use]
        fits = []
        for candidate in range(max_order + 1):
            design = _design(px[use], py[use], candidate, bbox)
            coefficients = _solve(design, fit_weights, data)
            chi2 = float((noise_weights * (data - design @ coefficients) ** 2).sum())
            fits.append((candidate, coefficients, chi2))
        # the noise scale from the richest model, so that the criterion is in units of σ²
        n_data = float(valid[use].sum())
        scale = fits[-1][2] / max(n_data - fits[-1][1].size, 1.0)
        scores = [chi2 / scale + 2.0 * coefficients.size for _, coefficients, chi2 in fits]
        best = int(np.argmin(scores))
        return fits[best][0], fits[best][1]

    def _order(self, n_stars: int) -> int:
        order = int(self.config.spatial_order)
        while order > 0 and len(skydiff.chebyshev_terms(order)) * self.config.stars_per_term \
                > n_stars:
            order -= 1
        return order

    def _sky_subtracted(self, exposure: skydiff.Exposure, x: np.ndarray, y: np.ndarray,
                        fwhm: float) -> np.ndarray:
        """The image minus a sky mesh that ignores bad pixels and discs around the sources."""
        height, width = exposure.shape
        ignore = exposure.masked("NO_DATA") if "NO_DATA" in exposure.mask_planes.names \
            else np.zeros(exposure.shape, dtype=bool)
        radius = max(3, math.ceil(2.0 * fwhm))
        offsets = np.arange(-radius, radius + 1)
        disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2
        rows = np.clip(np.rint(y).astype(np.intp)[:, None] + offsets, 0, height - 1)
        cols = np.clip(np.rint(x).astype(np.intp)[:, None] + offsets, 0, width - 1)
        ignore = ignore.copy()
        ignore[np.broadcast_to(rows[:, :, None], (x.size, *disc.shape))[:, disc],
               np.broadcast_to(cols[:, None, :], (x.size, *disc.shape))[:, disc]] = True
        if ignore.all():
            ignore = np.zeros(exposure.shape, dtype=bool)
        sky = skydiff.background_mesh(exposure.image, mask=ignore,
                                      bin_size=int(self.config.background_bin_size))
        return np.asarray(exposure.image, dtype=np.float64) - sky
