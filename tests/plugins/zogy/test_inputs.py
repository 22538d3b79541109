"""Inputs the ``zogy`` subtraction must handle: missing PSFs, NaN and masked pixels, PSF
models whose centroids disagree, misregistration, missing calibrations, bad settings.

Statistics are over the unmasked pixels of the difference, :math:`z = D/\\sqrt V`; "stars"
means the pixels within 4 px of the simulated stars, whose rms :math:`z` is 1 for a clean
subtraction (a few thousand pixels: relative sd ~1.5 %) and several for dipoles.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff.sim import simulate_pair
from skydiff_plugins.zogy import FluxScalingError, ZogyConfig, ZogySubtraction

SHAPE = (320, 320)


def subtract(science, template, sources=None, **settings):
    config = ZogyConfig()
    config.update(**settings)
    return ZogySubtraction(config).run(science, template, sources=sources)


def normalised(difference):
    good = ~difference.masked() & (difference.variance > 0)
    z = np.zeros(difference.shape)
    z[good] = difference.image[good] / np.sqrt(difference.variance[good])
    return z, good


def star_pixels(pair, radius=4.0):
    rows, cols = np.indices(pair.science.shape)
    near = np.zeros(pair.science.shape, dtype=bool)
    for source in pair.truth[pair.truth["kind"] == "star"]:
        near |= np.hypot(cols - source["x"], rows - source["y"]) < radius
    return near


def star_rms(pair, result):
    z, good = normalised(result.difference)
    use = good & star_pixels(pair)
    return float(np.sqrt(np.mean(z[use] ** 2)))


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(shape=SHAPE, n_stars=120, flux_min=3000, flux_max=1e5, seed=51,
                         science={"fwhm": 3.2}, template={"fwhm": 2.6})


@pytest.fixture(scope="module")
def reference(pair):
    return subtract(pair.science, pair.template)


def test_reference_subtraction_is_clean(pair, reference):
    assert 0.9 < star_rms(pair, reference) < 1.1
    z, good = normalised(reference.difference)
    assert np.std(z[good & ~star_pixels(pair, 8)]) == pytest.approx(1.0, abs=0.03)
    assert reference.convolved == "none" and reference.kernel is None
    assert isinstance(reference.difference.psf, skydiff.ImagePsf)


def test_inputs_without_psf_are_estimated(pair):
    result = subtract(pair.science.evolve(psf=None), pair.template.evolve(psf=None))
    meta = result.metadata
    assert meta["science_psf"] == "estimated:empirical"
    assert meta["template_psf"] == "estimated:empirical"
    # the estimated models match the stars: clean cores, FWHMs within 5 % of the truth
    assert meta["fwhm_science"] == pytest.approx(3.2, rel=0.05)
    assert meta["fwhm_template"] == pytest.approx(2.6, rel=0.05)
    assert 0.9 < star_rms(pair, result) < 1.15


def test_too_few_stars_for_a_psf_fall_back(pair):
    empty = simulate_pair(shape=(128, 128), n_stars=2, flux_min=2e4, flux_max=3e4, seed=52)
    result = subtract(empty.science.evolve(psf=None), empty.template.evolve(psf=None))
    assert result.metadata["science_psf"] == "estimated:gaussian_moments"
    with pytest.raises(skydiff.PsfEstimationError):
        subtract(empty.science.evolve(psf=None), empty.template, use_psf_fallback=False)


# ------------------------------------------------------------------------------------------
# NaN and masked pixels


def corrupted(pair):
    """NaN block and a bad column of garbage in the science; garbage CR pixels in the
    template (all flagged), in a part of the image chosen away from the stars."""
    science, template = pair.science, pair.template
    image = np.array(science.image)
    image[200:216, 40:60] = np.nan
    image[:, 150] = 1e6
    mask = np.array(science.mask)
    mask[:, 150] |= np.uint32(science.mask_planes.value("BAD"))
    t_image = np.array(template.image)
    t_mask = np.array(template.mask)
    t_image[100, 250:254] = 5e5
    t_mask[100, 250:254] |= np.uint32(template.mask_planes.value("CR"))
    return (science.evolve(image=image, mask=mask),
            template.evolve(image=t_image, mask=t_mask))


def test_nan_and_masked_pixels_do_not_ring(pair, reference):
    science, template = corrupted(pair)
    result = subtract(science, template)
    meta = result.metadata
    assert meta["n_filled_science"] == 16 * 20 + 320 and meta["n_filled_template"] == 4
    difference = result.difference
    # the non-finite input is NO_DATA, the bad column BAD, the template CR INTRP (a filled
    # template plane the hygiene drops), each dilated by its filter's footprint
    assert difference.masked("NO_DATA")[200:216, 40:60].all()
    assert difference.masked("BAD")[:, 150].all()
    assert difference.masked("INTRP")[100, 250:254].all()
    _, rx = meta["mask_radii"]["difference_science"]
    assert rx >= 1 and difference.masked("BAD")[:, 150 - rx:150 + rx + 1].all()
    assert not difference.masked("BAD")[:, 150 + rx + 1].all()
    assert np.all(np.isfinite(difference.image)) and np.all(np.isfinite(result.score.image))
    # outside the dilated masks the difference is the clean one: the garbage (1e6, 5e5) is
    # never seen by the FFTs, and what the fill differs from the true pixels (noise, wings)
    # reaches beyond the footprint with less than 1 % of its amplitude
    z_clean, good_clean = normalised(reference.difference)
    z, good = normalised(difference)
    use = good & good_clean
    assert use.mean() > 0.6
    delta = np.abs(z - z_clean)[use]
    assert delta.max() < 0.3
    assert np.sqrt(np.mean(delta**2)) < 0.01
    score, score_clean = result.score, reference.score
    use_s = ~score.masked() & ~score_clean.masked()
    ratio = (score.image / np.sqrt(score.variance) - score_clean.image
             / np.sqrt(score_clean.variance))[use_s]
    assert np.abs(ratio).max() < 0.3


def test_unfilled_garbage_rings(pair, reference):
    # the same bad column not filled (BAD left out of fill_planes): its 1e6 values spread
    # through the filters far beyond any footprint -- what the fill prevents
    science, template = corrupted(pair)
    result = subtract(science, template, fill_planes=("NO_DATA", "CR"))
    z_clean, good_clean = normalised(reference.difference)
    z, good = normalised(result.difference)
    use = good & good_clean
    assert np.abs(z - z_clean)[use].max() > 3.0


def test_fill_noise_option(pair):
    science, template = corrupted(pair)
    a = subtract(science, template, fill_noise=True)
    b = subtract(science, template, fill_noise=True)
    assert a.difference == b.difference  # fixed seed: deterministic
    z, good = normalised(a.difference)
    assert np.std(z[good & ~star_pixels(pair, 8)]) == pytest.approx(1.0, abs=0.03)


def test_low_template_coverage_is_no_work(pair):
    template = pair.template
    mask = np.array(template.mask)
    mask[:, 20:] |= np.uint32(template.mask_planes.value("NO_DATA"))
    with pytest.raises(skydiff.NoWorkFound):
        subtract(pair.science, template.evolve(mask=mask))


# ------------------------------------------------------------------------------------------
# PSF centroids and registration


def shifted_gaussian(fwhm, dx, dy, size=21):
    sigma = fwhm / 2.3548
    offsets = np.arange(size) - size // 2
    image = np.exp(-0.5 * ((offsets[None, :] - dx) ** 2 + (offsets[:, None] - dy) ** 2)
                   / sigma**2)
    return skydiff.ImagePsf(image)


def test_psf_centroid_mismatch_is_measured_and_corrected(pair):
    # the template's PSF model is off-centre by (0.4, 0.3) px although its stars are not:
    # recentring both models removes the mismatch; without it every star is a dipole
    template = pair.template.evolve(psf=shifted_gaussian(2.6, 0.4, 0.3))
    result = subtract(pair.science, template, registration="none")
    meta = result.metadata
    assert meta["psf_centroid_offset_x"] == pytest.approx(0.4, abs=0.01)
    assert meta["psf_centroid_offset_y"] == pytest.approx(0.3, abs=0.01)
    assert 0.9 < star_rms(pair, result) < 1.15
    # the difference PSF is centred
    image = result.difference.psf.kernel_image()
    x, y, _ = skydiff.psf.psf_moments(image)
    assert (x, y) == pytest.approx((image.shape[1] // 2, image.shape[0] // 2), abs=0.01)
    raw = subtract(pair.science, template, registration="none", recentre_psfs=False)
    assert star_rms(pair, raw) > 2.0


def test_registration_offset_is_removed():
    shifted = simulate_pair(shape=SHAPE, n_stars=120, flux_min=3000, flux_max=1e5, seed=53,
                            offset=(0.35, -0.25), science={"fwhm": 3.2},
                            template={"fwhm": 2.6})
    result = subtract(shifted.science, shifted.template)
    meta = result.metadata
    assert meta["registration"] == "shift"
    # the template lies at -offset from the science (4 standard errors, ~0.005 px each)
    assert meta["registration_offset_x"] == pytest.approx(-0.35, abs=0.02)
    assert meta["registration_offset_y"] == pytest.approx(0.25, abs=0.02)
    assert 0.9 < star_rms(shifted, result) < 1.15
    unregistered = subtract(shifted.science, shifted.template, registration="none")
    assert star_rms(shifted, unregistered) > 2.0
    # the measured scatter is small (no registration noise simulated) and reported
    assert meta["astrometric_sigma_source"] == "measured"
    assert meta["astrometric_sigma_x"] < 0.03


def test_astrometric_noise_raises_the_score_variance_near_stars(pair, reference):
    noisy = subtract(pair.science, pair.template, astrometric_sigma=[0.1, 0.1])
    assert noisy.metadata["astrometric_sigma_source"] == "config"
    near = star_pixels(pair, 3)
    far = ~star_pixels(pair, 10)
    ratio = noisy.score.variance / reference.score.variance
    # the astrometric term is (sigma^2/2)|grad S|^2: large on the stars, nil on blank sky
    assert float(np.median(ratio[near])) > 1.5
    assert float(np.median(ratio[far])) == pytest.approx(1.0, abs=0.02)
    # the difference is unchanged (the term only enters the corrected score)
    assert noisy.difference == reference.difference


# ------------------------------------------------------------------------------------------
# flux scaling


def test_flux_scaling_modes():
    scaled = simulate_pair(shape=SHAPE, n_stars=150, flux_min=3000, flux_max=1e5, seed=54,
                           flux_scale=1.2, science={"fwhm": 3.0}, template={"fwhm": 2.6})
    science = scaled.science.evolve(photo_calib=None)
    template = scaled.template.evolve(photo_calib=None)
    fitted = subtract(science, template)
    meta = fitted.metadata
    assert meta["flux_scaling"] == "fit"
    assert abs(meta["flux_ratio"] - 1.2) < 4 * meta["flux_ratio_err"]
    assert 0.9 < star_rms(scaled, fitted) < 1.15
    stars = fitted.kernel_sources
    assert isinstance(stars, Table) and stars["used"].sum() == meta["n_flux_stars"]
    calibrated = subtract(scaled.science, scaled.template)
    assert calibrated.metadata["flux_scaling"] == "calibration"
    assert calibrated.metadata["flux_ratio"] == pytest.approx(1.2)
    given = subtract(science, template, flux_scaling="given", flux_ratio=1.2)
    assert given.metadata["flux_ratio"] == 1.2
    assert 0.9 < star_rms(scaled, given) < 1.15
    with pytest.raises(skydiff.InputError):
        subtract(science, template, flux_scaling="calibration")
    with pytest.raises(skydiff.ConfigError):
        subtract(science, template, flux_scaling="given")
    # sources given: measured at those positions instead of found
    truth = scaled.truth[scaled.truth["flux_template"] > 2e4]
    listed = subtract(science, template, sources=Table({"x": truth["x"], "y": truth["y"]}))
    assert abs(listed.metadata["flux_ratio"] - 1.2) < 4 * listed.metadata["flux_ratio_err"]
    with pytest.raises(skydiff.InputError):
        subtract(science, template, sources=Table({"ra": [1.0]}))


def test_no_stars_and_no_calibration():
    empty = simulate_pair(shape=(128, 128), n_stars=0, seed=55)
    science = empty.science.evolve(photo_calib=None)
    template = empty.template.evolve(photo_calib=None)
    result = subtract(science, template)
    assert result.metadata["flux_scaling"] == "unit" and result.metadata["flux_ratio"] == 1.0
    with pytest.raises(FluxScalingError) as info:
        subtract(science, template, flux_scaling="fit")
    assert info.value.metadata["n_found"] == 0 and info.value.metadata["n_needed"] == 5


# ------------------------------------------------------------------------------------------
# outputs


def test_matched_image_and_background(pair, reference):
    matched = reference.matched_image
    assert matched is not None and matched.psf == reference.difference.psf
    # the template's isolated stars have their science flux in the matched image: a 21-px
    # box sum, within 4 sigma of its noise (the box's variance) plus 0.3 % of the flux (the
    # box misses ~0.1 % of the wings; the sky mesh under a star is uncertain by a few
    # tenths of a per cent of its flux)
    truth = pair.truth
    ratios = []
    for source in truth[(truth["flux_template"] > 1e4) & ~truth["saturated"]]:
        distance = np.hypot(truth["x"] - source["x"], truth["y"] - source["y"])
        row, col = round(float(source["y"])), round(float(source["x"]))
        if np.sum(distance < 20) > 1 or not (10 <= row < SHAPE[0] - 10
                                               and 10 <= col < SHAPE[1] - 10):
            continue
        stamp = (slice(row - 10, row + 11), slice(col - 10, col + 11))
        truth_flux = float(source["flux_science"])
        error = np.hypot(np.sqrt(float(matched.variance[stamp].sum())), 3e-3 * truth_flux)
        ratios.append((float(matched.image[stamp].sum()) - truth_flux) / error)
    assert len(ratios) >= 4
    assert np.all(np.abs(np.array(ratios)) < 4.0)
    # the background: the differential sky, removed from the difference by default
    assert reference.background is not None
    kept = subtract(pair.science, pair.template, subtract_background=False,
                    keep_matched_image=False)
    assert kept.matched_image is None
    np.testing.assert_allclose(kept.difference.image - reference.background,
                               reference.difference.image, atol=1e-3)


def test_run_is_deterministic_and_leaves_inputs(pair, reference):
    science, template = pair.science, pair.template
    before = (science.image.copy(), template.mask.copy())
    again = ZogySubtraction().run(science, template)
    assert again.difference == reference.difference and again.score == reference.score
    np.testing.assert_array_equal(science.image, before[0])
    np.testing.assert_array_equal(template.mask, before[1])


def test_parent_origin_and_varying_psf_grid():
    # a cut-out at parent origin (1000, 2000) with a science PSF varying by ±15 %: the PSFs
    # are evaluated in parent coordinates at the cell centres, and the PSF of the difference
    # is a PolynomialPsf over the parent bbox
    moved = simulate_pair(shape=SHAPE, n_stars=150, flux_min=3000, flux_max=1e5, seed=56,
                          origin=(1000, 2000), science={"fwhm": 3.0, "fwhm_gradient": (0.15, 0)},
                          template={"fwhm": 2.5}, psf_model_order=4)
    result = subtract(moved.science, moved.template)
    assert result.metadata["n_cells"] > 1
    assert result.difference.origin == (1000, 2000)
    psf = result.difference.psf
    assert isinstance(psf, skydiff.PolynomialPsf)
    assert psf.bbox == (999.5, 1999.5, 1319.5, 2319.5)
    # P_D is broader where the science PSF is: FWHM grows from left to right
    assert psf.fwhm(1010, 2160) < psf.fwhm(1310, 2160)
    assert 0.9 < star_rms(moved, result) < 1.15
