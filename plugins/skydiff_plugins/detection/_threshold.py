r"""The ``threshold`` detector: ``lsst.ip.diffim`` ``DetectAndMeasureTask`` steps 2–6."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

import skydiff

from ._background import two_pass_background
from ._calibration import measure_scale
from ._catalog import empty_catalog, make_catalog
from ._config import ThresholdDetectorConfig
from ._cosmic_rays import (
    CosmicRays,
    cosmic_ray_groups,
    find_cosmic_rays,
    remove_cosmic_rays,
)
from ._deblend import Children, deblend, no_deblending
from ._footprints import Peaks, dilate, label_footprints, local_peaks
from ._significance import matched_filter, psf_kernel, score_significance

__all__ = ["ThresholdDetector"]

#: FWHM of a Gaussian in units of its sigma, :math:`2\sqrt{2\ln 2}`.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Growth radius (pixels) of a score image without PSF (``DetectAndMeasure.growFootprint``).
_DEFAULT_GROW = 2.0
#: FWHM (pixels) assumed for the dipole separation of a score image without PSF.
_DEFAULT_FWHM = 3.0


def _plane_bits(exposure: skydiff.Exposure, planes: tuple[str, ...]) -> int:
    """The OR of the bits of the ``planes`` the exposure has (absent ones are ignored)."""
    names = exposure.mask_planes.names
    present = [name for name in planes if name in names]
    return int(exposure.mask_planes.value(*present)) if present else 0


def _flagged(mask: NDArray[np.uint32], bits: int) -> NDArray[np.bool_] | None:
    """Pixels with any of ``bits`` set, or None when there are none."""
    if bits == 0:
        return None
    flagged = (mask & np.uint32(bits)) != 0
    return flagged if flagged.any() else None


def _or(a: NDArray[np.bool_] | None, b: NDArray[np.bool_] | None) -> NDArray[np.bool_] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def _invalid_pixels(exposure: skydiff.Exposure, ignore_bits: int) -> NDArray[np.bool_] | None:
    """Pixels without usable data: non-finite image or variance, variance ≤ 0, ignored planes.

    None when every pixel is usable (checked with whole-image reductions first, so clean
    frames cost no per-pixel pass).
    """
    image, variance = exposure.image, exposure.variance
    invalid = None
    if not np.isfinite(image.sum(dtype=np.float64)):
        invalid = ~np.isfinite(image)
    if not float(variance.min()) > 0.0:  # NaN compares False
        invalid = _or(invalid, ~(variance > 0))
    invalid = _or(invalid, _flagged(exposure.mask, ignore_bits))
    return invalid if invalid is not None and invalid.any() else None


class ThresholdDetector(skydiff.Detector):
    r"""Matched-filter thresholding of a difference or score image, positive and negative.

    The steps of ``lsst.ip.diffim`` ``DetectAndMeasureTask`` up to the catalog:

    1. **Valid pixels.** Non-finite image or variance pixels, non-positive variance and the
       ``ignore_planes`` (``NO_DATA``, ``BAD``) carry no data: zero weight everywhere below.
    2. **Background** (``subtract_background``). Pass 1: a fine mesh
       (``background_fine_bin_size`` = 8 pixels, median) on a copy, a matched-filter
       detection at ``background_mask_threshold`` on the copy minus that mesh, grown like
       the footprints. Pass 2: a coarse mesh (``background_bin_size``) fitted with those
       sources, the invalid pixels and the ``bad_planes`` masked, subtracted from the image
       and returned as ``result.background`` (:func:`skydiff.background_mesh`).
    3. **Detection image.** For a difference image, the correlation with its own PSF
       :math:`P` (at the image centre) and the propagated noise,

       .. math::

           \nu = \frac{D \star P}{\sqrt{V \star P^2}},

       which is the optimal S/N :math:`F/(\sigma\sqrt{\mathrm{NEA}})` of a point source of
       flux :math:`F` (:math:`\mathrm{NEA} = 1/\sum P^2`); for a score image,
       :math:`\nu = \mathrm{score}/\sqrt{V}` (no second smoothing). With
       ``noise_calibration = "measured"`` (the default) :math:`\nu` is divided by
       :math:`s = \max(1, \hat s - 2\delta)`, :math:`\hat s` its robust standard deviation
       over the sky pixels (outside grown detections, unmasked) and :math:`\delta` the error
       of :math:`\hat s`: pixel noise correlated by drizzling or stacking, which the
       variance plane cannot describe, makes :math:`\hat s` 1.5–1.9 (see
       ``_calibration``; ``metadata["significance_scale"]``).
    4. **Cosmic rays** (``find_cosmic_rays``; difference images only): pixels sharper than
       the PSF allows (the ``findCosmicRays`` criteria: a pixel exceeds the mean of two
       opposite neighbours by ``cr_min_sigma`` sigma, and those neighbours are fainter than
       ``cr_cond3_fac2`` times the PSF's neighbour-to-centre ratio allows, with a
       ``cr_cond3_fac``-sigma noise allowance; groups below ``cr_min_snr`` are dropped;
       the detection image does not fall below ``-cr_opposite_sigma`` within
       ``cr_opposite_radius`` pixels, which keeps the lobes of bright close dipoles; and
       the pixels there are not below ``-max(cr_opposite_sigma, cr_opposite_fraction`` x
       the largest of them) sigma, which leaves out sharp residuals balanced by pixels of
       the other sign; ``cr_polarity = "both"`` also finds negative ones), returned as
       ``result.cosmic_rays``. With ``reject_cosmic_rays`` their contribution is
       removed from the detection image, :math:`\nu \to \nu - N^{-1} \sum_{q \in
       \mathrm{CR}} P[q - p]\,(v_q - \bar v_q)` (:math:`\bar v_q`: mean of the other
       neighbours), so detections made by cosmic rays alone disappear
       (``metadata["n_rejected_cosmic_rays"]``) and sources under a cosmic ray stay. A
       cosmic ray whose replacement leaves signal of the other sign beyond
       ``min(cr_opposite_sigma, threshold)`` next to it (the ring a decorrelated difference
       puts around it) is masked instead: its pixels and those within ``cr_mask_radius``
       get zero weight (``metadata["n_masked_cosmic_rays"]``).
    5. **Footprints.** Pixels with :math:`\nu >` ``threshold`` and/or :math:`\nu <
       -`\ ``threshold`` (``polarity``), grown isotropically by ``grow_radius`` (default
       ``n_sigma_to_grow`` = 2.4 PSF sigmas); positive and negative footprints that touch
       after growing are merged (8-connected components of the union). ``is_negative`` means
       the footprint holds no positive peak.
    6. **Peaks**: the thresholded pixels that are local extrema of :math:`\nu` over their
       eight neighbours.
    7. **Deblending** (``deblend``, on by default; see ``_deblend``): in each footprint
       a peak is *significant* when it is the strongest of its sign or its prominence (the
       drop of :math:`|\nu|` to the highest saddle towards a stronger peak of its sign) is
       at least ``deblend_min_contrast`` sigma; a positive and a negative significant peak
       closer than ``dipole_max_separation`` PSF FWHMs form one dipole child (strongest
       pairs first, each peak in one pair at most), every other significant peak is a
       child of its own, and every footprint pixel goes to the child of its nearest
       significant peak. Each child is a catalog row and a label
       (``metadata["n_deblended_parents"]``, ``["n_children"]``, ``["n_culled_peaks"]``).
    8. **Rejection**: footprints whose most significant peak lies on a ``bad_planes`` pixel
       (``NO_DATA``, ``BAD``, ``SAT``, ``EDGE``) or on an invalid pixel are removed with
       all their children, and so are children whose own strongest peak does
       (``metadata["n_rejected_masked"]``).
    9. **Catalog**: one row per child (per footprint without deblending), sorted by
       decreasing :math:`|\nu|` of its most significant peak, ``id`` = 1..n, and the
       ``int32`` label image of the children.

    The catalog columns are ``id``, ``x``, ``y`` (the most significant peak: column, row of
    this exposure's array), ``peak_value`` (background-subtracted image value there),
    ``significance`` (signed :math:`\nu` there), ``is_negative`` (no positive significant
    peak), ``footprint_area`` (pixels of the row's label), ``n_peaks`` (local peaks of
    either sign in those pixels, significant or not), ``pos_peak_x``, ``pos_peak_y``,
    ``neg_peak_x``, ``neg_peak_y`` (strongest positive/negative significant peak of the
    row, NaN if none: both are set only for a dipole child).

    Raises
    ------
    InputError
        If ``image`` is not an Exposure, a difference image (``is_score=False``) has no PSF
        (attach one, or estimate one with a ``psf_estimator`` plugin), or the variance plane
        has no positive finite value.

    Notes
    -----
    The matched filter uses the PSF at the centre of the image; a spatially varying PSF is
    not followed (as in ``SourceDetectionTask``, which smooths with one Gaussian). The cost is
    dominated by two FFT convolutions (image and variance) and the two background meshes.

    References
    ----------
    .. [1] Bosch, J. et al. 2018, PASJ 70, S5, "The Hyper Suprime-Cam software pipeline"
       (thresholding of the PSF-smoothed image, footprints, peaks).
    .. [2] Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27 (score images).
    .. [3] Bertin, E. & Arnouts, S. 1996, A&AS 117, 393 (background meshes).
    .. [4] Lupton, R. et al. 2001, ASP Conf. Ser. 238, 269 (cosmic-ray criteria; the SDSS
       deblender's children from the peaks of a parent).

    Examples
    --------
    >>> import numpy as np
    >>> import skydiff
    >>> from skydiff.sim import render_stars
    >>> rng = np.random.default_rng(1)
    >>> image = rng.normal(size=(96, 96)).astype(np.float32)
    >>> image += render_stars((96, 96), [30.0, 70.0], [40.0, 50.0], [120.0, -120.0], fwhm=3.0)
    >>> difference = skydiff.Exposure(image, variance=np.ones((96, 96), np.float32),
    ...                               psf=skydiff.GaussianPsf.from_fwhm(3.0))
    >>> result = ThresholdDetector().run(difference)
    >>> [(int(r["x"]), int(r["y"]), bool(r["is_negative"])) for r in result.catalog]
    [(70, 50, True), (30, 40, False)]
    >>> [round(float(s)) for s in result.catalog["significance"]]  # 120 / sqrt(NEA = 20.4)
    [-27, 26]
    >>> result.footprints[50, 70], result.footprints[40, 30]
    (np.int32(1), np.int32(2))
    """

    name = "threshold"
    ConfigClass = ThresholdDetectorConfig
    tags = frozenset({"needs_psf"})

    def run(self, image: skydiff.Exposure, *, is_score: bool = False
            ) -> skydiff.DetectionResult:
        if not isinstance(image, skydiff.Exposure):
            msg = (f"the threshold detector needs a skydiff.Exposure, got "
                   f"{type(image).__name__}; wrap arrays with skydiff.Exposure.from_arrays")
            raise skydiff.InputError(msg)
        with self.timer("run"):
            config = self.config
            assert isinstance(config, ThresholdDetectorConfig)
            result = _Run(config, image, bool(is_score)).detect()
        self.metadata.update(result.metadata)
        return result


class _Run:
    """One detection run: the state shared by its steps."""

    def __init__(self, config: ThresholdDetectorConfig, exposure: skydiff.Exposure,
                 is_score: bool) -> None:
        self.config = config
        self.exposure = exposure
        self.is_score = is_score
        self.shape: tuple[int, int] = exposure.shape
        psf = exposure.psf
        self.kernel: NDArray[np.float64] | None = None
        self.psf_sigma: float | None = None
        if not is_score or psf is not None:
            self.kernel = psf_kernel(exposure)  # raises without PSF on a difference image
            assert psf is not None
            x0, y0 = exposure.origin
            height, width = self.shape
            fwhm = float(psf.fwhm(x0 + (width - 1) / 2.0, y0 + (height - 1) / 2.0))
            if math.isfinite(fwhm) and fwhm > 0:
                self.psf_sigma = fwhm / _FWHM_PER_SIGMA
        if config.grow_radius is not None:
            self.grow = float(config.grow_radius)
        elif self.psf_sigma is not None:
            self.grow = config.n_sigma_to_grow * self.psf_sigma
        else:
            self.grow = _DEFAULT_GROW
        fwhm_pixels = (self.psf_sigma * _FWHM_PER_SIGMA if self.psf_sigma is not None
                       else _DEFAULT_FWHM)
        self.dipole_separation = float(config.dipole_max_separation) * fwhm_pixels
        self.bad_bits = _plane_bits(exposure, config.bad_planes)
        self.invalid = _invalid_pixels(exposure, _plane_bits(exposure, config.ignore_planes))
        self.metadata: dict[str, Any] = {
            "threshold": float(config.threshold), "polarity": config.polarity,
            "is_score": is_score, "n_sources": 0, "n_positive": 0, "n_negative": 0,
            "n_merged": 0, "n_peaks": 0, "n_rejected_masked": 0, "n_rejected_cosmic_rays": 0,
            "n_cosmic_rays": 0, "n_masked_cosmic_rays": 0, "noise": 0.0, "grow_radius": self.grow,
            "psf_sigma": self.psf_sigma if self.psf_sigma is not None else math.nan,
            "background": "two_pass" if config.subtract_background else "none",
            "background_masked_fraction": 0.0, "deblend": bool(config.deblend),
            "n_deblended_parents": 0, "n_children": 0, "n_culled_peaks": 0,
            "dipole_max_separation": self.dipole_separation if config.deblend else math.nan,
        }

    # -- steps ---------------------------------------------------------------------------

    def background(self) -> NDArray[np.float32] | None:
        """The two-pass background (None when disabled or nothing to fit)."""
        config = self.config
        if not config.subtract_background:
            return None
        exposure = self.exposure
        excluded = _or(self.invalid, _flagged(exposure.mask, self.bad_bits))
        data = exposure.image
        if excluded is not None:
            data = np.where(excluded, np.float32(np.nan), data)
        background, fraction = two_pass_background(
            data, exposure.variance, psf_sigma=self.psf_sigma, is_score=self.is_score,
            fine_bin_size=config.background_fine_bin_size, bin_size=config.background_bin_size,
            statistic=config.background_statistic,
            mask_threshold=config.background_mask_threshold, grow_radius=self.grow)
        self.metadata["background_masked_fraction"] = fraction
        return background

    def residual(self, background: NDArray[np.float32] | None) -> NDArray[np.float32]:
        """Image minus background, NaN at the invalid pixels (a new array)."""
        image = self.exposure.image
        residual = image - background if background is not None else image.copy()
        if self.invalid is not None:
            residual[self.invalid] = np.nan
        return residual.astype(np.float32, copy=False)

    def cosmic_rays(self, residual: NDArray[np.float32], significance: NDArray[np.float32]
                    ) -> CosmicRays | None:
        config = self.config
        kernel = self.kernel
        if (self.is_score or not config.find_cosmic_rays or kernel is None
                or min(kernel.shape) < 3 or min(self.shape) < 3):
            return None
        skip = _or(self.invalid, _flagged(self.exposure.mask,
                                          _plane_bits(self.exposure, config.cr_skip_planes)))
        return find_cosmic_rays(residual, self.exposure.variance, skip, kernel,
                                min_sigma=config.cr_min_sigma, cond3_fac=config.cr_cond3_fac,
                                cond3_fac2=config.cr_cond3_fac2, n_iter=config.cr_n_iter,
                                min_snr=config.cr_min_snr,
                                opposite_sigma=config.cr_opposite_sigma,
                                opposite_radius=config.cr_opposite_radius,
                                opposite_fraction=config.cr_opposite_fraction,
                                polarity=config.cr_polarity, significance=significance)

    def detect(self) -> skydiff.DetectionResult:
        config = self.config
        if self.invalid is not None and self.invalid.all():
            variance = self.exposure.variance
            if not np.any(np.isfinite(variance) & (variance > 0)):
                msg = ("the variance plane has no positive finite value, so no pixel has a "
                       "noise; give the exposure a variance (skydiff.estimate_variance)")
                raise skydiff.InputError(msg)
            return self._result(empty_catalog(), None, None, None)
        background = self.background()
        residual = self.residual(background)
        valid = None if self.invalid is None else ~self.invalid
        variance = self.exposure.variance
        if self.is_score:
            significance, noise, typical = score_significance(residual, variance, valid)
        else:
            assert self.kernel is not None
            significance, noise, typical = matched_filter(residual, variance, valid,
                                                          self.kernel)
        scale = self.calibrate(significance)
        if scale != 1.0:
            significance /= np.float32(scale)
            noise *= np.float32(scale)
        self.metadata["noise"] = typical * scale
        rays = self.cosmic_rays(residual, significance)  # before any removal
        if rays is not None:
            self.metadata["n_cosmic_rays"] = int(rays.pixels.size)
            self._remove_cosmic_rays(rays, residual, significance, noise, scale)
        threshold = np.float32(config.threshold)
        no_seeds = np.zeros(0, dtype=np.intp)
        positive = (np.flatnonzero(significance > threshold)
                    if config.polarity in ("both", "positive") else no_seeds)
        negative = (np.flatnonzero(significance < -threshold)
                    if config.polarity in ("both", "negative") else no_seeds)
        if positive.size + negative.size == 0:
            return self._result(empty_catalog(), background, rays, None)
        seeds = np.concatenate([positive, negative])
        grown = np.zeros(self.shape, dtype=bool)
        grown.reshape(-1)[seeds] = True
        dilate(grown, seeds, self.grow)
        labels, n_labels, pixels, pixel_labels = label_footprints(grown)
        del grown
        peak_flat = np.concatenate([local_peaks(significance, positive, negative=False),
                                    local_peaks(significance, negative, negative=True)])
        peaks = Peaks(peak_flat, significance.reshape(-1)[peak_flat].astype(np.float64),
                      labels.reshape(-1)[peak_flat])
        if config.deblend:
            children = deblend(peaks, significance, labels, n_labels, pixels, pixel_labels,
                               min_contrast=config.deblend_min_contrast,
                               max_separation=self.dipole_separation)
        else:
            children = no_deblending(peaks, n_labels, pixel_labels)
        del labels
        catalog, lut = self._catalog(peaks, children, n_labels, pixels, residual)
        footprints = np.zeros(self.shape[0] * self.shape[1], dtype=np.int32)
        footprints[pixels] = lut[children.pixel_child]
        return self._result(catalog, background, rays, footprints.reshape(self.shape))

    def calibrate(self, significance: NDArray[np.float32]) -> float:
        """The factor the significance is divided by (``noise_calibration``; metadata)."""
        config = self.config
        self.metadata.update({"noise_calibration": config.noise_calibration,
                              "significance_scale": 1.0, "significance_scale_measured": math.nan,
                              "significance_scale_error": math.nan,
                              "significance_scale_pixels": 0})
        if config.noise_calibration == "variance":
            return 1.0
        usable = np.ones(self.shape, dtype=bool) if self.invalid is None else ~self.invalid
        bad = _flagged(self.exposure.mask, self.bad_bits)
        if bad is not None:
            usable &= ~bad
        kernel = self.kernel
        if kernel is None:  # a score image without PSF
            kernel = np.asarray(skydiff.GaussianPsf.from_fwhm(_DEFAULT_FWHM).kernel_image(),
                                dtype=np.float64)
        calibration = measure_scale(
            significance, usable, kernel, grow=self.grow,
            flatten_bin_size=None if config.subtract_background else config.background_bin_size)
        self.metadata.update({"significance_scale": calibration.scale,
                              "significance_scale_measured": calibration.measured,
                              "significance_scale_error": calibration.error,
                              "significance_scale_pixels": calibration.n_pixels})
        return calibration.scale

    def _remove_cosmic_rays(self, rays: CosmicRays | None, residual: NDArray[np.float32],
                            significance: NDArray[np.float32], noise: NDArray[np.float32],
                            scale: float) -> None:
        """Take the cosmic rays out of the significance; count the detections they made."""
        if rays is None or not self.config.reject_cosmic_rays or rays.pixels.size == 0:
            return
        assert self.kernel is not None
        config = self.config
        before = significance.reshape(-1)[rays.pixels].copy()
        self.metadata["n_masked_cosmic_rays"] = remove_cosmic_rays(
            rays, residual, self.exposure.variance, significance, noise, self.kernel,
            level=min(config.cr_opposite_sigma, config.threshold),
            radius=config.cr_opposite_radius, variance_scale=scale * scale,
            mask_radius=(self.grow if config.cr_mask_radius is None
                         else float(config.cr_mask_radius)))
        after = significance.reshape(-1)[rays.pixels]
        groups = cosmic_ray_groups(rays, self.shape[1])
        threshold = config.threshold
        n_groups = int(groups.max()) + 1
        was = np.zeros(n_groups, dtype=bool)
        was[groups[np.abs(before) > threshold]] = True  # negative cosmic rays: cr_polarity
        still = np.zeros(n_groups, dtype=bool)
        still[groups[np.abs(after) > threshold]] = True
        self.metadata["n_rejected_cosmic_rays"] = int(np.count_nonzero(was & ~still))

    def _masked(self, flat: NDArray[np.intp]) -> NDArray[np.bool_]:
        """Whether each pixel is on a ``bad_planes`` plane or without data."""
        masked = np.zeros(flat.size, dtype=bool)
        if self.bad_bits:
            masked |= (self.exposure.mask.reshape(-1)[flat] & np.uint32(self.bad_bits)) != 0
        if self.invalid is not None:
            masked |= self.invalid.reshape(-1)[flat]
        return masked

    def _catalog(self, peaks: Peaks, children: Children, n_labels: int,
                 pixels: NDArray[np.intp], residual: NDArray[np.float32]
                 ) -> tuple[Any, NDArray[np.int32]]:
        """The sorted catalog (one row per child) and the lookup from children to ids.

        A footprint whose strongest peak (over all its peaks) is masked is removed with all
        its children; a child whose own strongest peak is masked is removed too.
        """
        width = self.shape[1]
        n_children = children.n
        kept = Peaks(peaks.flat[children.peaks], peaks.significance[children.peaks],
                     children.peak_child)
        main = kept.strongest(n_children)
        parent_main = peaks.strongest(n_labels)
        has_peak = np.flatnonzero(parent_main >= 0)
        parent_rejected = np.zeros(n_labels + 1, dtype=bool)
        parent_rejected[has_peak] = self._masked(peaks.flat[parent_main[has_peak]])
        alive = np.flatnonzero(main >= 0)
        alive = alive[alive > 0]
        main_flat = kept.flat[main[alive]]
        with_parent = parent_rejected[children.parent[alive]]
        masked = self._masked(main_flat)
        self.metadata["n_rejected_masked"] = int(np.count_nonzero(parent_rejected)
                                                 + np.count_nonzero(masked & ~with_parent))
        rejected = masked | with_parent
        labels = alive[~rejected]
        main_flat = main_flat[~rejected]
        value = kept.significance[main[labels]]
        order = np.argsort(-np.abs(value), kind="stable")
        labels, main_flat, value = labels[order], main_flat[order], value[order]
        n = labels.size
        lut = np.zeros(n_children + 1, dtype=np.int32)
        lut[labels] = np.arange(1, n + 1, dtype=np.int32)
        # every peak (kept or not) counts for the child whose pixels hold it
        peak_child = children.pixel_child[np.searchsorted(pixels, peaks.flat)]
        n_peaks = np.bincount(peak_child, minlength=n_children + 1).astype(np.int64)[labels]
        rows, cols = np.divmod(main_flat, width)
        columns: dict[str, np.ndarray] = {
            "id": np.arange(1, n + 1), "x": cols, "y": rows,
            "peak_value": residual.reshape(-1)[main_flat], "significance": value,
            "footprint_area": np.bincount(children.pixel_child,
                                          minlength=n_children + 1)[labels],
            "n_peaks": n_peaks,
        }
        for sign, prefix in ((1, "pos"), (-1, "neg")):
            best = kept.strongest(n_children, sign=sign)[labels]
            found = best >= 0
            r, c = np.divmod(kept.flat[np.where(found, best, 0)], width)
            columns[f"{prefix}_peak_x"] = np.where(found, c, np.nan)
            columns[f"{prefix}_peak_y"] = np.where(found, r, np.nan)
            columns[f"has_{prefix}"] = found
        has_pos, has_neg = columns.pop("has_pos"), columns.pop("has_neg")
        columns["is_negative"] = ~has_pos
        rows_per_parent = np.bincount(children.parent[labels], minlength=n_labels + 1)
        split = rows_per_parent > 1
        self.metadata.update({
            "n_sources": int(n), "n_positive": int(np.count_nonzero(has_pos & ~has_neg)),
            "n_negative": int(np.count_nonzero(~has_pos)),
            "n_merged": int(np.count_nonzero(has_pos & has_neg)),
            "n_peaks": int(n_peaks.sum()),
            "n_deblended_parents": int(np.count_nonzero(split)),
            "n_children": int(rows_per_parent[split].sum()),
            "n_culled_peaks": int(peaks.flat.size - children.peaks.size),
        })
        return make_catalog(columns), lut

    def _result(self, catalog: Any, background: NDArray[np.float32] | None,
                rays: CosmicRays | None, footprints: NDArray[np.int32] | None
                ) -> skydiff.DetectionResult:
        if footprints is None:
            footprints = np.zeros(self.shape, dtype=np.int32)
        cosmic_rays = None
        if rays is not None:
            cosmic_rays = np.zeros(self.shape, dtype=bool)
            cosmic_rays.reshape(-1)[rays.pixels] = True
        return skydiff.DetectionResult(catalog=catalog, footprints=footprints,
                                       background=background, cosmic_rays=cosmic_rays,
                                       metadata=self.metadata)
