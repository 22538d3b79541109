"""Cosmic-ray masking and rejection in the ``threshold`` detector."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

import skydiff
from skydiff.sim import render_stars, simulate_pair
from skydiff_plugins.detection import ThresholdDetector, ThresholdDetectorConfig
from skydiff_plugins.detection._cosmic_rays import (
    find_cosmic_rays,
    mask_in_significance,
    remove_from_significance,
)
from skydiff_plugins.detection._significance import matched_filter

SHAPE = (512, 512)


def _stars_and_hits(fwhm: float) -> tuple[skydiff.Exposure, dict[str, np.ndarray]]:
    """PSF stars over three decades of flux plus single-pixel hits between them.

    Unit sky noise plus the stars' own photon noise (gain 1): variance = 1 + model. The
    stars' peak S/N runs from ~15 to ~3000; the hits have 15 to 100 sigma.
    """
    rng = np.random.default_rng(31)
    yy, xx = np.mgrid[24:SHAPE[0] - 24:48, 24:SHAPE[1] - 24:48]
    x = xx.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    y = yy.ravel() + rng.uniform(-0.5, 0.5, yy.size)
    flux = 10 ** rng.uniform(2.5, 5.5, x.size)
    model = render_stars(SHAPE, x, y, flux, fwhm=fwhm)
    variance = (1.0 + model).astype(np.float32)
    image = (model + rng.standard_normal(SHAPE) * np.sqrt(variance)).astype(np.float32)
    hit_x = rng.integers(5, SHAPE[1] - 5, 200)
    hit_y = rng.integers(5, SHAPE[0] - 5, 200)
    far = np.min(np.hypot(hit_x[:, None] - x, hit_y[:, None] - y), axis=1) > 12
    hit_x, hit_y = hit_x[far], hit_y[far]
    amplitude = rng.uniform(15.0, 100.0, hit_x.size)
    np.add.at(image, (hit_y, hit_x), amplitude.astype(np.float32))
    exposure = skydiff.Exposure(image, variance=variance,
                                psf=skydiff.GaussianPsf.from_fwhm(fwhm))
    return exposure, {"x": x, "y": y, "hit_x": hit_x, "hit_y": hit_y}


@pytest.mark.parametrize("fwhm", [1.5, 2.0, 3.0, 5.0])
def test_single_pixel_hits_are_found_and_stars_are_not(helpers: Any, fwhm: float) -> None:
    # Condition 3 of findCosmicRays flags a pixel only when its neighbours are below
    # f = 0.6 times the PSF's neighbour-to-centre ratio (with a 2.5-sigma allowance), so a
    # star needs a > 2.5-sigma fluctuation of both its peak and its neighbours' mean to be
    # flagged, and the S/N cut (8 sigma of excess per cosmic ray) removes single noise
    # pixels: no flagged pixel is expected near a star or in the sky. A hit of >= 15 sigma
    # exceeds its neighbours by far more than a PSF (of FWHM >= 1.5) allows: all are found.
    exposure, truth = _stars_and_hits(fwhm)
    result = ThresholdDetector().run(exposure)
    rays = result.cosmic_rays
    assert rays is not None and rays.dtype == bool and rays.shape == SHAPE
    hit_x, hit_y = truth["hit_x"], truth["hit_y"]
    assert hit_x.size > 150
    assert rays[hit_y, hit_x].all()
    hits = np.zeros(SHAPE, bool)
    hits[hit_y, hit_x] = True
    # growing (3 passes) may add neighbouring pixels of a hit, nothing farther
    assert not np.any(rays & ~ndimage.binary_dilation(hits, iterations=3))
    rows, cols = np.nonzero(rays)
    star_distance = np.min(np.hypot(cols[:, None] - truth["x"], rows[:, None] - truth["y"]),
                           axis=1)
    assert star_distance.min() > 8.0  # no star pixel flagged
    assert result.metadata["n_cosmic_rays"] == int(rays.sum())
    # every star is detected, once, and no hit is
    assert len(result.catalog) == truth["x"].size
    assert np.all(helpers.match(result.catalog, truth["x"], truth["y"]) >= 0)
    assert np.all(helpers.match(result.catalog, hit_x, hit_y, radius=1.5) < 0)
    # without the cosmic-ray search the isolated hits are detections (the others merge with
    # the footprints of bright stars)
    plain = ThresholdDetector(ThresholdDetectorConfig(find_cosmic_rays=False)).run(exposure)
    assert plain.cosmic_rays is None
    hit_detections = int(np.sum(helpers.match(plain.catalog, hit_x, hit_y, radius=1.5) >= 0))
    assert hit_detections > 20
    # every hit above the threshold was taken out of the detection image
    assert hit_detections <= result.metadata["n_rejected_cosmic_rays"] <= hit_x.size
    # masking without rejecting keeps those detections
    kept = ThresholdDetector(ThresholdDetectorConfig(reject_cosmic_rays=False)).run(exposure)
    assert kept.cosmic_rays is not None and np.array_equal(kept.cosmic_rays, rays)
    assert kept.metadata["n_rejected_cosmic_rays"] == 0
    assert len(kept.catalog) == len(plain.catalog)


def test_real_source_under_a_cosmic_ray_is_kept(helpers: Any) -> None:
    # a transient of S/N 30 with a 60-sigma hit on a pixel of its wing: the hit is masked,
    # the source stays, at its own position, with about its own significance
    flux = helpers.optimal_flux(30.0)
    exposure = helpers.make_difference((128, 128), seed=41, x=[64.0], y=[64.0], flux=[flux])
    image = exposure.image.copy()
    image[66, 67] += 60.0
    result = ThresholdDetector().run(exposure.evolve(image=image))
    assert result.cosmic_rays is not None and result.cosmic_rays[66, 67]
    assert len(result.catalog) == 1
    row = result.catalog[0]
    assert abs(row["x"] - 64) <= 1 and abs(row["y"] - 64) <= 1
    clean = ThresholdDetector().run(exposure).catalog[0]
    # the replacement value (mean of the neighbours) differs from the true wing value by
    # ~1 sigma of one pixel: ~0.1 in significance
    assert row["significance"] == pytest.approx(clean["significance"], abs=1.0)


@pytest.mark.parametrize("seed", [5, 6])
def test_cosmic_rays_of_a_simulated_difference(seed: int) -> None:
    # A simulated pair (80 stars, 3 transients, 15 cosmic-ray tracks of 1-8 pixels of
    # 300-3000 ADU on the science image); the template (FWHM 2) is matched to the science
    # (FWHM 3) with the exact Gaussian kernel. The science image's CR mask plane is the
    # truth: the tracks are found, the star residuals are not, and no track is a detection.
    pair = simulate_pair(shape=(256, 256), n_stars=80, n_transients=3, flux_min=2e3,
                         flux_max=2e5, seed=seed,
                         science={"fwhm": 3.0, "n_cosmic_rays": 15}, template={"fwhm": 2.0})
    science, template = pair.science, pair.template
    assert science.psf is not None and template.psf is not None
    fwhm_per_sigma = 2.0 * math.sqrt(2.0 * math.log(2.0))
    sigma = math.sqrt(science.psf.fwhm() ** 2 - template.psf.fwhm() ** 2) / fwhm_per_sigma
    matched = skydiff.convolve(template, skydiff.GaussianPsf(sigma).kernel_image())
    difference = science.evolve(image=science.image - matched.image,
                                variance=science.variance + matched.variance,
                                mask=science.mask | matched.mask)
    truth = science.masked("CR")
    result = ThresholdDetector().run(difference)
    rays = result.cosmic_rays
    assert rays is not None
    recall = np.count_nonzero(rays & truth) / np.count_nonzero(truth)
    assert recall >= 0.95, recall  # measured 0.97-1.0
    assert not np.any(rays & ~ndimage.binary_dilation(truth, np.ones((3, 3), bool)))
    catalog = result.catalog
    rows, cols = np.nonzero(truth)
    if len(catalog):
        distance = np.hypot(np.asarray(catalog["x"])[:, None] - cols,
                            np.asarray(catalog["y"])[:, None] - rows)
        assert distance.min() > 2.0
    transients = pair.truth[pair.truth["kind"] == "transient"]
    matches = np.hypot(np.asarray(catalog["x"])[:, None] - np.asarray(transients["x"]),
                       np.asarray(catalog["y"])[:, None] - np.asarray(transients["y"]))
    assert np.all(matches.min(axis=0) <= 2.0)  # every transient is detected
    assert result.metadata["n_rejected_cosmic_rays"] >= 10


def test_removal_equals_filtering_the_cleaned_image(helpers: Any) -> None:
    # Differential test of the sparse correction: removing the cosmic rays from the
    # significance must equal the matched filter of the image whose cosmic-ray pixels were
    # replaced by the mean of their other neighbours (float32 round-off only).
    exposure = helpers.make_difference((96, 96), seed=51, x=[40.0], y=[50.0],
                                       flux=[helpers.optimal_flux(20.0)])
    image = exposure.image.copy()
    image[10, 10] += 40.0
    image[60:63, 70] += 30.0  # a short vertical track
    image[52, 42] += 50.0  # on the source's wing
    kernel = exposure.psf.kernel_image() if exposure.psf is not None else None
    assert kernel is not None
    rays = find_cosmic_rays(image, exposure.variance, None, kernel, min_sigma=6.0,
                            cond3_fac=2.5, cond3_fac2=0.6, n_iter=3, min_snr=8.0)
    assert {(10, 10), (60, 70), (61, 70), (62, 70), (52, 42)} <= {
        tuple(int(v) for v in divmod(p, 96)) for p in rays.pixels}
    significance, noise, _ = matched_filter(image.copy(), exposure.variance, None, kernel)
    remove_from_significance(rays, significance, noise, kernel)
    cleaned = image.copy()
    cleaned.reshape(-1)[rays.pixels] -= rays.excess.astype(np.float32)
    expected, _, _ = matched_filter(cleaned, exposure.variance, None, kernel)
    assert np.allclose(significance, expected, atol=2e-4)


def _negated(exposure: skydiff.Exposure) -> skydiff.Exposure:
    return exposure.evolve(image=-exposure.image)


@pytest.mark.parametrize("fwhm", [1.5, 3.0, 5.0])
def test_negative_hits_with_both_polarities(helpers: Any, fwhm: float) -> None:
    # The stars-and-hits image negated: fading stars (|S/N| up to ~3000) and negative
    # single-pixel hits (-15 to -100 sigma), e.g. the cosmic rays of an unconvolved template.
    # cr_polarity = "both" applies the same criteria to the negated image, so the expected
    # result is the mirror of the positive test: every hit found, no star pixel, no noise
    # pixel. With the default ("positive", as findCosmicRays) nothing is flagged and the
    # hits stay negative detections.
    exposure, truth = _stars_and_hits(fwhm)
    negative = _negated(exposure)
    hit_x, hit_y = truth["hit_x"], truth["hit_y"]
    result = ThresholdDetector(ThresholdDetectorConfig(cr_polarity="both")).run(negative)
    rays = result.cosmic_rays
    assert rays is not None
    assert rays[hit_y, hit_x].all()
    hits = np.zeros(SHAPE, bool)
    hits[hit_y, hit_x] = True
    assert not np.any(rays & ~ndimage.binary_dilation(hits, iterations=3))
    # the same pixels as the positive search on the positive image
    positive = ThresholdDetector().run(exposure).cosmic_rays
    assert positive is not None and np.array_equal(rays, positive)
    assert len(result.catalog) == truth["x"].size
    assert np.all(result.catalog["is_negative"])
    assert np.all(helpers.match(result.catalog, hit_x, hit_y, radius=1.5) < 0)
    assert result.metadata["n_rejected_cosmic_rays"] > 20
    plain = ThresholdDetector().run(negative)
    assert plain.metadata["n_cosmic_rays"] == 0
    assert int(np.sum(helpers.match(plain.catalog, hit_x, hit_y, radius=1.5) >= 0)) > 20


@pytest.mark.parametrize("seed", [3, 7])
def test_cosmic_rays_of_an_unconvolved_template(seed: int) -> None:
    # Science and template with the same PSF (FWHM 3), 15 cosmic-ray tracks each: the
    # difference science - template holds positive tracks (science) and negative ones
    # (template). cr_polarity = "both" finds both sets, and nothing farther than 2 px from
    # a track (the growing passes can reach 2 px, with or without condition 5); the default
    # finds only the science's. Tracks of opposite signs closer than the box of condition 5
    # refuse each other (one such pair per seed here: 14 and 8 pixels); the other track
    # pixels are found with the recall of the positive test (measured 0.97-1.0 over seeds
    # 3-8, 0.89-1.0 with the refused pairs).
    pair = simulate_pair(shape=(256, 256), n_stars=80, flux_min=2e3, flux_max=2e5, seed=seed,
                         science={"fwhm": 3.0, "n_cosmic_rays": 15},
                         template={"fwhm": 3.0, "n_cosmic_rays": 15})
    science, template = pair.science, pair.template
    difference = science.evolve(image=science.image - template.image,
                                variance=science.variance + template.variance,
                                mask=science.mask | template.mask)
    science_cr, template_cr = science.masked("CR"), template.masked("CR")
    near = ndimage.binary_dilation(science_cr | template_cr, np.ones((5, 5), bool))
    both = ThresholdDetector(ThresholdDetectorConfig(cr_polarity="both")).run(difference)
    rays = both.cosmic_rays
    assert rays is not None
    box = np.ones((13, 13), bool)  # the 9 x 9 box of condition 5 plus the PSF's reach
    for truth, other in ((science_cr, template_cr), (template_cr, science_cr)):
        alone = truth & ~ndimage.binary_dilation(other, box)
        assert np.count_nonzero(alone) > 0.8 * np.count_nonzero(truth)
        recall = np.count_nonzero(rays & alone) / np.count_nonzero(alone)
        assert recall >= 0.95, recall
    assert not np.any(rays & ~near)
    assert np.all(difference.image[rays & template_cr] < 0)
    positive = ThresholdDetector().run(difference).cosmic_rays
    assert positive is not None
    assert not np.any(positive & template_cr)
    alone = science_cr & ~ndimage.binary_dilation(template_cr, box)
    assert np.count_nonzero(positive & alone) >= 0.95 * np.count_nonzero(alone)


@pytest.mark.parametrize(("where", "radius", "refused"), [
    ((20.0, 23.0), 4, True),  # negative source 3 px away, inside the 9 x 9 box: refused
    ((24.0, 24.0), 4, True),  # at the box corner
    ((20.0, 28.0), 4, False),  # 8 px away: its significance in the box is above -5
    ((20.0, 23.0), 0, False),  # condition 5 disabled: findCosmicRays as is
])
def test_negative_signal_nearby_refuses_a_candidate(helpers: Any, where: tuple[float, float],
                                                    radius: int, refused: bool) -> None:
    # Condition 5 on a noiseless image (unit variance): a 40-sigma hit at (20, 20) and a
    # negative point source of optimal S/N 20 (significance -20 at its centre, falling as
    # exp(-r^2 / (4 sigma_psf^2)): -1.7 at 4 px). The hit is refused when the detection
    # image drops below -cr_opposite_sigma (5) in the box of half-size cr_opposite_radius.
    image = render_stars((48, 48), [where[1]], [where[0]], [-helpers.optimal_flux(20.0)],
                         fwhm=3.0).astype(np.float32)
    image[20, 20] += 40.0
    variance = np.ones_like(image)
    kernel = skydiff.GaussianPsf.from_fwhm(3.0).kernel_image()
    rays = find_cosmic_rays(image, variance, None, kernel, min_sigma=6.0, cond3_fac=2.5,
                            cond3_fac2=0.6, n_iter=3, min_snr=8.0, opposite_sigma=5.0,
                            opposite_radius=radius)
    found = {(int(r), int(c)) for r, c in zip(*np.divmod(rays.pixels, 48), strict=True)}
    assert ((20, 20) not in found) == refused
    if not refused and radius > 0:
        assert found == {(20, 20)}


@pytest.mark.parametrize(("column", "expected"), [
    (28, {(20, 20), (20, 28)}),  # two cosmic rays of opposite signs, 8 px apart
    (22, set()),  # ... which refuse each other when closer (the documented cost)
])
def test_cosmic_rays_of_both_signs(column: int, expected: set[tuple[int, int]]) -> None:
    # cr_polarity = "both" on a noiseless image: +40 sigma at (20, 20), -40 sigma at
    # (20, column). The significance of each is -/+17.8 at its pixel (40 P(0) / sqrt(sum
    # P^2)); 2 px away it still reaches -/+9.6, beyond 5, in the other's box.
    image = np.zeros((48, 48), np.float32)
    image[20, 20], image[20, column] = 40.0, -40.0
    kernel = skydiff.GaussianPsf.from_fwhm(3.0).kernel_image()
    rays = find_cosmic_rays(image, np.ones_like(image), None, kernel, min_sigma=6.0,
                            cond3_fac=2.5, cond3_fac2=0.6, n_iter=3, min_snr=8.0,
                            polarity="both")
    found = {(int(r), int(c)) for r, c in zip(*np.divmod(rays.pixels, 48), strict=True)}
    assert found == expected
    # the excess keeps the sign of the pixel
    assert np.array_equal(np.sign(rays.excess), np.sign(image.reshape(-1)[rays.pixels]))


def test_unknown_polarity_is_a_config_error() -> None:
    image = np.zeros((8, 8), np.float32)
    kernel = skydiff.GaussianPsf.from_fwhm(3.0).kernel_image()
    with pytest.raises(skydiff.ConfigError, match="polarity"):
        find_cosmic_rays(image, np.ones_like(image), None, kernel, min_sigma=6.0,
                         cond3_fac=2.5, cond3_fac2=0.6, n_iter=3, min_snr=8.0,
                         polarity="negative")
    with pytest.raises(skydiff.ConfigError):
        ThresholdDetectorConfig(cr_polarity="negative")


def test_no_noise_pixel_is_a_cosmic_ray_on_a_full_frame() -> None:
    # A 2048 x 4096 frame of unit white noise (FWHM 3): a noise pixel passes conditions 2
    # and 3 with a probability of ~1e-7 but never carries the 8 sigma of excess of
    # condition 4, so the expected number of flagged pixels is 0, for either polarity
    # (measured 0, also at FWHM 1.5). The detections are the 5-sigma noise peaks: about 6
    # expected from the Euler characteristic (see test_statistics), so 20 has a Poisson
    # probability of ~1e-5.
    rng = np.random.default_rng(71)
    shape = (2048, 4096)
    exposure = skydiff.Exposure(rng.standard_normal(shape, dtype=np.float32),
                                variance=np.ones(shape, np.float32),
                                psf=skydiff.GaussianPsf.from_fwhm(3.0))
    result = ThresholdDetector(ThresholdDetectorConfig(cr_polarity="both",
                                                       deblend=False)).run(exposure)
    assert result.metadata["n_cosmic_rays"] == 0
    assert len(result.catalog) < 20


def _spike(amplitude: float, ring: float, neighbours: str) -> np.ndarray:
    """A noiseless 48 x 48 image: a spike at (24, 24) and its 4 or 8 neighbours at
    ``-ring * amplitude``."""
    image = np.zeros((48, 48), np.float32)
    image[24, 24] = amplitude
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbours == "all":
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    for d_row, d_col in offsets:
        image[24 + d_row, 24 + d_col] = -ring * amplitude
    return image


@pytest.mark.parametrize(("amplitude", "ring", "neighbours", "found"), [
    # a balanced residual (the spike's excess cancelled by its four edge neighbours, as a
    # hot pixel of both images that the matching kernel spread: on the TOROS null pair the
    # ring/spike ratio of such residuals is 0.22-17, 5 % quantile 0.45): refused
    (40.0, 0.25, "edge", False),
    (60.0, 0.25, "edge", False),
    # a spike with a shallow ring, as decorrelation makes of a cosmic ray (ratios 0.025-0.083
    # on the simulated decorrelated differences, <= 0.15 for any plausible DMTN-021 filter):
    # found
    (200.0, 0.05, "all", True),
    (200.0, 0.10, "all", True),
])
def test_balanced_sharp_residual_is_not_a_cosmic_ray(amplitude: float, ring: float,
                                                     neighbours: str, found: bool) -> None:
    # Condition 6: the pixels of the box fall below -max(5, 0.2 x the box's largest pixel).
    # The detection image does not see the balanced residual (|nu| < 8 everywhere), so
    # condition 5 alone (cr_opposite_fraction = 0) flags it and the growing passes spread
    # into the pixels next to the negative ring (17 and 33 pixels).
    image = _spike(amplitude, ring, neighbours)
    variance = np.ones_like(image)
    kernel = skydiff.GaussianPsf.from_fwhm(3.0).kernel_image()
    significance, _, _ = matched_filter(image.copy(), variance, None, kernel)
    options = dict(min_sigma=6.0, cond3_fac=2.5, cond3_fac2=0.6, n_iter=3, min_snr=8.0,
                   significance=significance)
    rays = find_cosmic_rays(image, variance, None, kernel, opposite_fraction=0.2, **options)
    plain = find_cosmic_rays(image, variance, None, kernel, opposite_fraction=0.0, **options)
    assert (rays.pixels.size > 0) == found
    if found:  # the spike alone, as with condition 5 only
        assert rays.pixels.tolist() == [24 * 48 + 24] == plain.pixels.tolist()
    else:
        assert plain.pixels.size > 10


@pytest.mark.parametrize(("amplitude", "ring", "neighbours"), [
    (60.0, 0.25, "edge"), (200.0, 0.05, "all"), (200.0, 0.10, "all")])
def test_removal_leaves_no_detection_of_the_other_sign(amplitude: float, ring: float,
                                                       neighbours: str) -> None:
    # Replacing a spike by the mean of its (negative) neighbours leaves the ring, whose
    # significance is then -28 to -56 (cr_opposite_radius = 0: the plain replacement), a
    # negative detection made by the cosmic-ray removal. Such a group is masked instead (its
    # pixels and those within the growth radius get no weight): no detection of the other
    # sign, with condition 6 on (the balanced residual is then not flagged at all; at 60 its
    # own significance, +5.8, stays a positive detection) or off.
    rng = np.random.default_rng(8)
    image = _spike(amplitude, ring, neighbours) + rng.standard_normal((48, 48)).astype(
        np.float32)
    exposure = skydiff.Exposure(image, variance=np.ones((48, 48), np.float32),
                                psf=skydiff.GaussianPsf.from_fwhm(3.0))
    for fraction in (0.2, 0.0):
        result = ThresholdDetector(ThresholdDetectorConfig(
            cr_opposite_fraction=fraction)).run(exposure)
        assert not np.any(result.catalog["is_negative"]), result.catalog
        if result.metadata["n_cosmic_rays"]:
            assert result.metadata["n_masked_cosmic_rays"] == 1
    # masking only the cosmic-ray pixels (cr_mask_radius = 0) leaves the ring: -22 to -42
    for options in ({"cr_mask_radius": 0.0}, {"cr_opposite_radius": 0}):
        ring_only = ThresholdDetector(ThresholdDetectorConfig(
            cr_opposite_fraction=0.0, **options)).run(exposure)
        assert np.any(ring_only.catalog["significance"] < -20)


def test_masking_equals_filtering_without_the_pixels(helpers: Any) -> None:
    # Differential test of the sparse masking: the significance and noise after
    # mask_in_significance must equal the matched filter of the image with those pixels
    # invalid (float32 round-off), except on the masked pixels, which are set to 0.
    exposure = helpers.make_difference((96, 96), seed=52, x=[40.0, 60.0], y=[50.0, 30.0],
                                       flux=[helpers.optimal_flux(20.0),
                                             -helpers.optimal_flux(8.0)])
    variance = (exposure.variance * np.linspace(0.5, 2.0, 96)[None, :]).astype(np.float32)
    image = exposure.image
    kernel = exposure.psf.kernel_image() if exposure.psf is not None else None
    assert kernel is not None
    masked = np.zeros((96, 96), bool)
    masked[44:49, 38:45] = True  # on the source
    masked[0:3, 90:96] = True  # in a corner
    masked[70, 20] = True
    pixels = np.flatnonzero(masked)
    significance, noise, _ = matched_filter(image.copy(), variance, None, kernel)
    mask_in_significance(pixels, image, variance, significance, noise, kernel)
    cleaned = np.where(masked, np.float32(np.nan), image).astype(np.float32)
    expected, expected_noise, _ = matched_filter(cleaned, variance, ~masked, kernel)
    assert np.allclose(significance[~masked], expected[~masked], atol=2e-4)
    assert np.allclose(noise, expected_noise, rtol=1e-4, atol=1e-6)
    assert np.all(significance[masked] == 0)


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_cosmic_rays_of_a_decorrelated_difference(seed: int) -> None:
    # A simulated pair (science FWHM 4 with 15 cosmic-ray tracks, template FWHM 3) through
    # skydiff.subtract: al with the DMTN-021 decorrelation, which rings around every sharp
    # feature (ring/spike 0.05-0.08 in the pixels). The tracks must be found (recall >= 0.95,
    # measured 0.97-1.0 on seeds 1-6; nothing farther than 2 px from a track) and leave no
    # detection of either sign within 3 px: a track whose replacement leaves its ring
    # significant (all 13-15 here) is masked. Without the search the tracks are 13-15
    # positive detections; with the masking reduced to the track pixels (cr_mask_radius 0)
    # the rings are 14-18 negative ones (as the plain replacement made them before: the
    # cosmic-ray rejection turned every decorrelated track into a negative detection).
    pair = simulate_pair(shape=(512, 512), n_stars=80, n_transients=5, seed=seed,
                         science={"fwhm": 4.0, "n_cosmic_rays": 15}, template={"fwhm": 3.0})
    difference = skydiff.subtract(pair.science, pair.template).difference
    truth = pair.science.masked("CR")
    near = ndimage.binary_dilation(truth, np.ones((7, 7), bool))

    def rows_near(result: skydiff.DetectionResult, negative: bool) -> int:
        catalog = result.catalog
        at = near[np.asarray(catalog["y"], int), np.asarray(catalog["x"], int)]
        return int(np.count_nonzero(at & (np.asarray(catalog["is_negative"]) == negative)))

    result = ThresholdDetector().run(difference)
    rays = result.cosmic_rays
    assert rays is not None
    assert np.count_nonzero(rays & truth) >= 0.95 * np.count_nonzero(truth)
    assert not np.any(rays & ~ndimage.binary_dilation(truth, np.ones((5, 5), bool)))
    assert rows_near(result, True) == rows_near(result, False) == 0
    assert result.metadata["n_masked_cosmic_rays"] >= 10
    plain = ThresholdDetector(ThresholdDetectorConfig(find_cosmic_rays=False)).run(difference)
    assert rows_near(plain, False) >= 10
    ring = ThresholdDetector(ThresholdDetectorConfig(cr_mask_radius=0.0)).run(difference)
    assert rows_near(ring, True) >= 10
    transients = pair.truth[pair.truth["kind"] == "transient"]
    catalog = result.catalog
    distance = np.hypot(np.asarray(catalog["x"])[:, None] - np.asarray(transients["x"]),
                        np.asarray(catalog["y"])[:, None] - np.asarray(transients["y"]))
    assert np.all(distance.min(axis=0) <= 2.0)
