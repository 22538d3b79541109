"""Options of the ``threshold`` detector (:class:`ThresholdDetectorConfig`)."""

from __future__ import annotations

import skydiff

__all__ = ["ThresholdDetectorConfig"]


@skydiff.configclass
class ThresholdDetectorConfig(skydiff.Config):
    """Options of the ``threshold`` detector (``lsst.ip.diffim`` ``DetectAndMeasureTask``)."""

    threshold: float = skydiff.RangeField(
        5.0, min=0.0, inclusive_min=False,
        doc="Detection threshold in units of the detection image's noise: the matched-filter "
            "S/N of a difference image, or score / sqrt(variance) of a score image "
            "(thresholdValue, thresholdType='pixel_stdev').")
    polarity: str = skydiff.ChoiceField(
        "both", allowed={"both": "positive and negative footprints, merged where they touch",
                         "positive": "only significance > threshold",
                         "negative": "only significance < -threshold"},
        doc="Which signs of the significance are detected (thresholdPolarity).")
    noise_calibration: str = skydiff.ChoiceField(
        "measured", allowed={
            "measured": "divide the significance by its robust standard deviation over the "
                        "sky pixels (outside grown detections, unmasked) when that exceeds 1: "
                        "corrects for pixel noise correlated by resampling or stacking, "
                        "which the variance plane cannot describe",
            "variance": "trust the variance plane: the significance as computed"},
        doc="How the noise of the detection image is obtained (metadata "
            "significance_scale: the factor applied).")
    subtract_background: bool = skydiff.Field(
        True, doc="Fit and subtract a two-pass background before thresholding: a fine mesh "
                  "(background_fine_bin_size, median) on a copy finds the sources to mask, "
                  "then a coarse mesh (background_bin_size) is fitted around them.")
    background_fine_bin_size: int = skydiff.RangeField(
        8, min=2, doc="Bin size in pixels of the first-pass mesh (median; LSST binSize 8).")
    background_bin_size: int = skydiff.RangeField(
        64, min=4, doc="Bin size in pixels of the second-pass mesh that is subtracted "
                       "(LSST uses 40; larger bins are less noisy).")
    background_statistic: str = skydiff.ChoiceField(
        "median", allowed={"median": "the median of each bin",
                           "clipped_mean": "the 3-sigma clipped mean of each bin (less noisy, "
                                           "slower)"},
        doc="Statistic of the second-pass mesh bins.")
    background_mask_threshold: float = skydiff.RangeField(
        3.0, min=0.0, inclusive_min=False,
        doc="Significance (both signs) above which first-pass detections are masked (grown "
            "like the footprints) when fitting the second-pass background.")
    n_sigma_to_grow: float = skydiff.RangeField(
        2.4, min=0.0, doc="Footprints are grown isotropically by this many PSF sigmas "
                          "(nSigmaToGrow) unless grow_radius is set.")
    grow_radius: float | None = skydiff.RangeField(
        None, min=0.0, optional=True,
        doc="Growth radius of the footprints in pixels; None uses n_sigma_to_grow x PSF "
            "sigma (2 pixels for a score image without PSF); 0 disables growing.")
    deblend: bool = skydiff.Field(
        True, doc="Split every footprint into children at its significant peaks (one catalog "
                  "row and one label each): a positive and a negative peak closer than "
                  "dipole_max_separation make one dipole child, every other significant peak "
                  "its own child, and each footprint pixel goes to the child of its nearest "
                  "peak. False: one row per footprint.")
    deblend_min_contrast: float = skydiff.RangeField(
        3.0, min=0.0,
        doc="A peak that is not the strongest of its sign in its footprint is significant "
            "when every path to a stronger peak of that sign dips at least this many sigma "
            "below it (its prominence in the detection image); 0 keeps every peak.")
    dipole_max_separation: float = skydiff.RangeField(
        2.5, min=0.0,
        doc="A positive and a negative significant peak of one footprint closer than this "
            "many PSF FWHMs are the two lobes of one dipole child (3-pixel FWHM assumed for "
            "a score image without PSF); 0 never pairs peaks.")
    bad_planes: tuple[str, ...] = skydiff.ListField(
        ["NO_DATA", "BAD", "SAT", "EDGE"], dtype=str,
        doc="Detections whose most significant peak lies on one of these planes (or on a "
            "non-finite or ignored pixel) are rejected; planes absent from the exposure are "
            "ignored.")
    ignore_planes: tuple[str, ...] = skydiff.ListField(
        ["NO_DATA", "BAD"], dtype=str,
        doc="Pixels whose values carry no signal: they get zero weight in the matched filter "
            "and the background (like non-finite pixels). SAT and EDGE pixels keep their "
            "values, so that the detections they cause peak on them and are rejected.")
    find_cosmic_rays: bool = skydiff.Field(
        True, doc="Look for cosmic rays on a difference image (never on a score image): "
                  "pixels sharper than the PSF allows (findCosmicRays criteria).")
    reject_cosmic_rays: bool = skydiff.Field(
        True, doc="Reject detections that fall below the threshold once their cosmic-ray "
                  "pixels are replaced by the mean of their neighbours.")
    cr_min_sigma: float = skydiff.RangeField(
        6.0, min=0.0, inclusive_min=False,
        doc="A cosmic-ray pixel exceeds the mean of two opposite neighbours by this many "
            "sigma in at least one direction (minSigma; half of it when growing).")
    cr_cond3_fac: float = skydiff.RangeField(
        2.5, min=0.0, doc="Noise allowance, in sigma, of the PSF-contrast test (cond3_fac).")
    cr_cond3_fac2: float = skydiff.RangeField(
        0.6, min=0.0, max=1.0, inclusive_min=False,
        doc="Fraction of the PSF's neighbour-to-centre ratio below which the neighbours of a "
            "pixel are too faint for a PSF-shaped source (cond3_fac2).")
    cr_min_snr: float = skydiff.RangeField(
        8.0, min=0.0, doc="Smallest S/N of a cosmic ray: summed excess of its 8-connected "
                          "pixels over their replacement values / sqrt(summed variance) (the "
                          "unit-free form of min_DN); removes single noise pixels.")
    cr_n_iter: int = skydiff.RangeField(
        3, min=0, doc="Passes that add the neighbours of cosmic-ray pixels which pass the test "
                      "at half of cr_min_sigma without noise allowance (niteration).")
    cr_polarity: str = skydiff.ChoiceField(
        "positive", allowed={
            "positive": "only positive pixels (findCosmicRays): a sharp negative pixel stays "
                        "a negative detection",
            "both": "also negative pixels, with the same criteria on the negated image "
                    "(cosmic rays or hot pixels of an unconvolved template)"},
        doc="Signs of the cosmic rays searched for in the difference image.")
    cr_opposite_sigma: float = skydiff.RangeField(
        5.0, min=0.0, inclusive_min=False,
        doc="A cosmic-ray candidate is refused when the detection image (matched-filter "
            "significance) falls below -this value (above it for a negative candidate) "
            "within cr_opposite_radius pixels: next to the other lobe of a bright, close "
            "dipole a lobe looks sharper than the PSF.")
    cr_opposite_fraction: float = skydiff.RangeField(
        0.2, min=0.0,
        doc="A cosmic-ray candidate is also refused when a pixel of the box of half-size "
            "cr_opposite_radius is below -max(cr_opposite_sigma, this fraction x the "
            "largest pixel of the box) sigma (the other sign for a negative candidate): "
            "a sharp residual balanced by pixels of the other sign (hot pixels of both "
            "images, the close lobes of a dipole) is not a cosmic ray, while the ring that "
            "decorrelation puts around a cosmic ray is at most 8 % of its peak on the test "
            "pairs (15 % for any plausible decorrelation); 0 disables this test.")
    cr_opposite_radius: int = skydiff.RangeField(
        4, min=0, doc="Half-size in pixels of the box searched by cr_opposite_sigma and "
                      "cr_opposite_fraction ((2r+1) x (2r+1) pixels); 0 disables both tests "
                      "and the masking of cr_mask_radius (the plain findCosmicRays criteria "
                      "and removal).")
    cr_mask_radius: float | None = skydiff.RangeField(
        None, min=0.0, optional=True,
        doc="A cosmic ray whose removal (pixels replaced by the mean of their neighbours) "
            "leaves the detection image below -min(cr_opposite_sigma, threshold) within "
            "cr_opposite_radius pixels (the ring a decorrelation filter puts around it, or "
            "the rest of a balanced residual) is masked instead: its pixels and those within "
            "this radius (pixels) get zero weight in the detection image. None: the "
            "footprint growth radius (n_sigma_to_grow PSF sigmas unless grow_radius is set).")
    cr_skip_planes: tuple[str, ...] = skydiff.ListField(
        ["BAD", "SAT", "INTRP"], dtype=str,
        doc="Pixels on these planes are never cosmic rays (condition 4 of findCosmicRays).")
