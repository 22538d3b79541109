"""The measured noise of the detection image (``noise_calibration``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import scipy.signal

import skydiff
from skydiff_plugins.detection import ThresholdDetector, ThresholdDetectorConfig
from skydiff_plugins.detection._calibration import _mad_correlation, measure_scale
from skydiff_plugins.detection._significance import matched_filter

FWHM = 3.0


def _psf(fwhm: float = FWHM) -> np.ndarray:
    return np.asarray(skydiff.GaussianPsf.from_fwhm(fwhm).kernel_image(), dtype=np.float64)


def _run(exposure: skydiff.Exposure, *, is_score: bool = False, **options: Any
         ) -> skydiff.DetectionResult:
    return ThresholdDetector(ThresholdDetectorConfig(**options)).run(exposure,
                                                                     is_score=is_score)


def _correlated_noise(shape: tuple[int, int], sigma: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Unit white noise convolved with a Gaussian of ``sigma`` px (as drizzling or stacking
    correlates neighbouring pixels), and the Gaussian's image."""
    g = np.asarray(skydiff.GaussianPsf(sigma).kernel_image(), dtype=np.float64)
    pad = g.shape[0]
    noise = np.random.default_rng(seed).standard_normal((shape[0] + 2 * pad,
                                                         shape[1] + 2 * pad))
    image = scipy.signal.fftconvolve(noise, g, mode="same")[pad:-pad, pad:-pad]
    return image.astype(np.float32), g


def _inflation(psf: np.ndarray, g: np.ndarray) -> float:
    r"""The true noise of the matched filter over the variance plane's prediction,
    :math:`\kappa = (\sum_d (P \star P)(d)\,\rho(d) / \sum P^2)^{1/2}` with
    :math:`\rho = (g \star g)/\sum g^2` the pixel autocorrelation."""
    rho = scipy.signal.fftconvolve(g, g[::-1, ::-1]) / float((g * g).sum())
    auto = scipy.signal.fftconvolve(psf, psf[::-1, ::-1])
    total = scipy.signal.fftconvolve(auto, rho[::-1, ::-1])
    centre = np.array(total.shape) // 2
    return math.sqrt(float(total[centre[0], centre[1]]) / float((psf * psf).sum()))


def test_mad_correlation_series() -> None:
    # g(rho): correlation of sign(|X| - 0.6745) and sign(|Y| - 0.6745) for unit Gaussians of
    # correlation rho. Monte Carlo with 2e6 pairs (standard error 7e-4): 0.1064 at 0.5 and
    # 0.5452 at 0.9; 0 and 1 at the ends; 0.3676 rho^2 for small rho (the series' first term).
    values = _mad_correlation(np.array([0.0, 0.01, 0.5, 0.9, -0.5, 1.0]))
    assert values[0] == 0.0 and values[-1] == 1.0
    assert values[1] == pytest.approx(0.3676e-4, rel=0.01)
    assert values[2] == pytest.approx(0.1064, abs=0.0021) and values[4] == values[2]
    assert values[3] == pytest.approx(0.5452, abs=0.0021)


def test_error_of_the_scale_is_its_spread() -> None:
    # 60 images of unit white noise (128 x 128, FWHM 3): the measured scales scatter about 1
    # with the standard deviation the metadata's error predicts (for white noise the error
    # formula is exact: 0.0209 measured over 150 images, 0.0216 predicted). The sample
    # standard deviation of 60 values is known to 1/sqrt(2 * 59) = 9 %: 3 sigma = 28 %.
    kernel = _psf()
    shape = (128, 128)
    scales, errors = [], []
    for seed in range(60):
        image = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        significance, _, _ = matched_filter(image, np.ones(shape, np.float32), None, kernel)
        calibration = measure_scale(significance, np.ones(shape, bool), kernel, grow=3.0)
        scales.append(calibration.measured)
        errors.append(calibration.error)
        assert calibration.scale == max(1.0, calibration.measured - 2.0 * calibration.error)
    spread, error = float(np.std(scales, ddof=1)), float(np.mean(errors))
    assert spread == pytest.approx(error, rel=0.28)
    assert abs(float(np.mean(scales)) - 1.0) < 3.0 * error / math.sqrt(60) + 0.002


@pytest.mark.parametrize(("shape", "fwhm", "seed"), [
    ((256, 256), 3.0, 1), ((256, 512), 1.5, 2), ((384, 384), 8.0, 3)])
def test_white_noise_with_sources_is_left_alone(helpers: Any, shape: tuple[int, int],
                                                fwhm: float, seed: int) -> None:
    # Independent pixels with a correct variance plane and point sources of S/N 10-1000:
    # the measured scale is 1 within its error (|deviation| < 4 errors: probability 6e-5
    # of a false failure), the sources excluded from the sky do not bias it, and the scale
    # applied is the measurement less 2 errors, at least 1 (here 1: the detections are those
    # of noise_calibration = "variance").
    x, y = helpers.grid_positions(shape, 4 * fwhm + 24.0, seed=seed)
    flux = helpers.optimal_flux(1.0, fwhm=fwhm) * 10 ** np.random.default_rng(seed).uniform(
        1.0, 3.0, x.size)
    exposure = helpers.make_difference(shape, seed=seed, x=x, y=y, flux=flux, fwhm=fwhm)
    result = _run(exposure)
    metadata = result.metadata
    assert metadata["noise_calibration"] == "measured"
    measured, error = metadata["significance_scale_measured"], metadata["significance_scale_error"]
    assert 0 < error < 0.05 and abs(measured - 1.0) < 4.0 * error
    assert metadata["significance_scale"] == max(1.0, measured - 2.0 * error) == 1.0
    assert metadata["significance_scale_pixels"] > 0.5 * shape[0] * shape[1]
    plain = _run(exposure, noise_calibration="variance")
    assert plain.metadata["significance_scale"] == 1.0
    assert math.isnan(plain.metadata["significance_scale_measured"])
    assert plain.metadata["significance_scale_pixels"] == 0
    assert np.array_equal(result.catalog["significance"], plain.catalog["significance"])
    assert len(result.catalog) == x.size


@pytest.mark.parametrize("sigma", [0.5, 0.8])
def test_correlated_noise_is_measured(sigma: float) -> None:
    # Pure noise whose pixels are correlated (white noise smoothed by a Gaussian of 0.5 or
    # 0.8 px: neighbour correlation 0.37 and 0.68, as the drizzled JWST and stacked DECam
    # pairs' 0.31-0.40), with the per-pixel variance exact: the matched filter's noise is
    # larger than the variance plane predicts by kappa = 1.47 and 2.39. The measured scale is
    # kappa within 3 % (0-1.6 % low over three seeds: the background mesh takes a little of
    # the correlated noise), so at threshold 5 the noise gives ~0 detections
    # (0.2 expected from the Euler characteristic of white noise, fewer for this smoother
    # field) instead of 70-86 and 1125-1151 (an effective threshold of 5 / kappa = 3.4 and
    # 2.1) with the variance plane alone.
    shape = (512, 512)
    image, g = _correlated_noise(shape, sigma, seed=11)
    exposure = skydiff.Exposure(image, variance=np.full(shape, float((g * g).sum()),
                                                        np.float32),
                                psf=skydiff.GaussianPsf.from_fwhm(FWHM))
    kappa = _inflation(_psf(), g)
    result = _run(exposure)
    assert result.metadata["significance_scale_measured"] == pytest.approx(kappa, rel=0.03)
    assert result.metadata["significance_scale"] == pytest.approx(kappa, rel=0.04)
    assert result.metadata["noise"] == pytest.approx(
        kappa * math.sqrt(float((g * g).sum() * (_psf() ** 2).sum())), rel=0.04)
    assert len(result.catalog) <= 3
    assert len(_run(exposure, noise_calibration="variance").catalog) >= 50


def test_smooth_background_is_not_noise(helpers: Any) -> None:
    # Without background subtraction a gradient of ~22 sigma peak to peak in the significance
    # dominates its spread (robust std 5.2 of the raw significance); the scale is measured
    # about a 64-px mesh of the significance instead. The mesh follows this quadratic to a
    # few tenths of a sigma, which leaves the scale 1.01-1.04 over four seeds (1.00-1.02
    # with the background subtracted: the same mesh residual), against an error of 0.011.
    rows, cols = np.mgrid[0:256, 0:256] / 256.0
    gradient = (3.0 * rows + 2.0 * cols * cols).astype(np.float32)
    exposure = helpers.make_difference((256, 256), seed=31, background=gradient)
    metadata = _run(exposure, subtract_background=False).metadata
    assert abs(metadata["significance_scale_measured"] - 1.0) < 0.05
    assert metadata["significance_scale"] < 1.03


def test_pixels_without_data_are_not_sky(helpers: Any) -> None:
    # A NO_DATA block and a BAD column filled with garbage (ignored planes: no weight in the
    # filter, not sky) leave the scale at 1.
    exposure = helpers.make_difference((256, 256), seed=32)
    image = exposure.image.copy()
    image[40:120, 30:100] = 1e4 * np.random.default_rng(3).standard_normal((80, 70))
    image[:, 200] = 500.0
    garbage = exposure.evolve(image=image)
    no_data = np.zeros((256, 256), bool)
    no_data[40:120, 30:100] = True
    bad = np.zeros((256, 256), bool)
    bad[:, 200] = True
    garbage = garbage.with_mask("NO_DATA", no_data).with_mask("BAD", bad)
    metadata = _run(garbage).metadata
    error = metadata["significance_scale_error"]
    assert abs(metadata["significance_scale_measured"] - 1.0) < 4.0 * error
    assert metadata["significance_scale"] == 1.0


def test_small_image_is_not_measured(helpers: Any) -> None:
    # 20 x 20 pixels of FWHM 3 hold ~70 independent values for the MAD (n / 5.65), fewer
    # than MIN_INDEPENDENT = 100 (a 12 % error): the scale is not measured nor applied.
    exposure = helpers.make_difference((20, 20), seed=33)
    metadata = _run(exposure).metadata
    assert metadata["significance_scale"] == 1.0
    assert math.isnan(metadata["significance_scale_measured"])
    assert metadata["significance_scale_pixels"] == 0


@pytest.mark.parametrize("factor", [1.0, 1.7])
def test_score_image(helpers: Any, factor: float) -> None:
    # A score image made by hand (the difference correlated with its PSF), with its exact
    # variance sigma^2 sum P^2, or that variance underestimated by 1.7^2 (a score whose
    # variance ignores correlated input noise): the calibration leaves the first alone and
    # measures 1.7 on the second, whose detections are then those of the first.
    x = np.array([40.0, 100.5, 160.0, 200.0])
    y = np.array([50.0, 60.0, 180.3, 120.0])
    flux = helpers.optimal_flux(1.0) * np.array([12.0, -20.0, 9.0, 40.0])
    difference = helpers.make_difference((256, 256), seed=34, x=x, y=y, flux=flux)
    kernel = _psf()
    score = scipy.signal.correlate(difference.image.astype(np.float64), kernel, mode="same")
    variance = float((kernel**2).sum())
    exact = skydiff.Exposure(score.astype(np.float32),
                             variance=np.full((256, 256), variance, np.float32))
    scaled = exact.evolve(variance=np.full((256, 256), variance / factor**2, np.float32))
    reference = _run(exact, is_score=True)
    result = _run(scaled, is_score=True)
    metadata = result.metadata
    error = metadata["significance_scale_error"]
    assert abs(metadata["significance_scale_measured"] - factor) < 4.0 * error * factor
    assert reference.metadata["significance_scale"] == 1.0
    assert len(result.catalog) == len(reference.catalog) == 4
    assert np.allclose(result.catalog["significance"], reference.catalog["significance"],
                       rtol=4.0 * error + 1e-6)
