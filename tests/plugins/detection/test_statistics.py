"""Statistical performance of the ``threshold`` detector: completeness and false detections."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import skydiff
from skydiff_plugins.detection import ThresholdDetector, ThresholdDetectorConfig

SHAPE = (1024, 1024)


@pytest.mark.parametrize(("snr", "minimum"), [(7.0, 0.90), (10.0, 0.99)])
def test_completeness(helpers: Any, snr: float, minimum: float) -> None:
    # 31 x 31 = 961 point sources 32 pixels apart (PSF FWHM 3: no blending), each at a random
    # sub-pixel position, all of optimal S/N nu = flux / (sigma sqrt(NEA)).
    #
    # Expected completeness at threshold 5: the matched filter at the pixel nearest to a
    # source is nu * rho + N(0, 1), rho = exp(-|d|^2 / (4 sigma_psf^2)) the normalised
    # autocorrelation of the Gaussian PSF at the sub-pixel offset d (|d|^2 <= 1/2, sigma_psf
    # = 1.27): rho >= 0.926. At S/N 7 the mean is >= 6.48, so P(detected) >= Phi(1.48) =
    # 0.93 even at the worst offset (the maximum over neighbouring pixels only helps); the
    # binomial standard error of 961 trials at p = 0.95 is 0.007, so >= 0.90 fails only for
    # a real loss. At S/N 10: >= Phi(4.26) = 1 - 1e-5 per source.
    x, y = helpers.grid_positions(SHAPE, 32.0, seed=11)
    flux = np.full(x.size, helpers.optimal_flux(snr))
    exposure = helpers.make_difference(SHAPE, seed=12, x=x, y=y, flux=flux)
    result = ThresholdDetector().run(exposure)
    matched = helpers.match(result.catalog, x, y)
    completeness = float(np.mean(matched >= 0))
    assert completeness >= minimum, completeness
    found = result.catalog[matched[matched >= 0]]
    assert not np.any(found["is_negative"])
    assert len(result.catalog) - len(found) <= 3  # (pure-noise rate: ~0.4 per image)
    if snr >= 10.0:
        # Without selection (all detected), the peak significance is nu * rho at the
        # nearest pixel (mean rho over uniform offsets: exp(-1/(6 * 4 sigma^2)) = 0.975)
        # plus the small upward bias of taking the maximum over neighbouring pixels; the
        # median of 961 values has a standard error of 1.25 / 31 = 0.04.
        median = float(np.median(found["significance"]))
        assert 0.95 * snr <= median <= snr + 0.2, median


@pytest.mark.parametrize("subtract_background", [False, True])
def test_false_detections_match_gaussian_random_field(subtract_background: bool) -> None:
    # Pure white noise (sigma = 1) smoothed by a Gaussian PSF of width s is a Gaussian random
    # field with lambda_2 = 1 / (2 s^2). The expected Euler characteristic of its excursion
    # set above u (per polarity) is, with the Gaussian kinematic formula (Adler & Taylor 2007)
    #   E[chi] = A lambda_2 u exp(-u^2/2) / (2 pi)^(3/2)            (area term)
    #          + (L/2) sqrt(lambda_2) exp(-u^2/2) / (2 pi)          (boundary term)
    #          + Psi(u)                                               (corner term),
    # A the area and L the perimeter; at u = 3.5 it equals the number of excursion
    # components (holes are negligible). Footprints are not grown here (grow_radius = 0)
    # so that every component is one detection.
    #
    # The formula is for a continuous field. On the pixel lattice, components smaller than
    # a pixel are missed: with FWHM 4 the count is 20 % low (measured), with FWHM 8 (used
    # here, s = 3.4 pixels) about 3 % low, and the deficit vanishes for wider PSFs. The
    # tolerance is 3 Poisson standard deviations (the components are nearly independent at
    # this threshold) plus 5 % for that lattice deficit and the noise of the background
    # mesh (with subtract_background, the bin-64 mesh adds ~0.09 sigma of coherent noise to
    # nu, which raises the count by exp(u^2 0.09^2 / 2) - 1 ~ 5 %).
    fwhm, threshold, n_images, side = 8.0, 3.5, 12, 1024
    config = ThresholdDetectorConfig(threshold=threshold, grow_radius=0.0,
                                     subtract_background=subtract_background)
    psf = skydiff.GaussianPsf.from_fwhm(fwhm)
    detector = ThresholdDetector(config)
    count = 0
    for seed in range(n_images):  # loop over independent images
        rng = np.random.default_rng(1000 + seed)
        noise = rng.standard_normal((side, side)).astype(np.float32)
        exposure = skydiff.Exposure(noise, variance=np.ones((side, side), np.float32),
                                    psf=psf)
        result = detector.run(exposure)
        assert result.metadata["n_merged"] == 0
        count += len(result.catalog)
    lam = 1.0 / (2.0 * (fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))) ** 2)
    tail = math.exp(-threshold**2 / 2.0)
    per_polarity = (side * side * lam * threshold * tail / (2.0 * math.pi) ** 1.5
                    + 2.0 * side * math.sqrt(lam) * tail / (2.0 * math.pi)
                    + 0.5 * math.erfc(threshold / math.sqrt(2.0)))
    expected = 2.0 * n_images * per_polarity  # both polarities (~534)
    assert abs(count - expected) < 3.0 * math.sqrt(expected) + 0.05 * expected, (count, expected)
