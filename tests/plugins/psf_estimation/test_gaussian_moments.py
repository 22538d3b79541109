"""Tests of the ``gaussian_moments`` fallback PSF estimator."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff.sim import simulate_pair
from skydiff_plugins.psf_estimation import (
    GaussianMomentsPsfConfig,
    GaussianMomentsPsfEstimator,
)


@pytest.mark.parametrize("fwhm", [2.5, 4.0, 6.0])
def test_recovers_a_gaussian_psf(fwhm: float) -> None:
    pair = simulate_pair(shape=(384, 384), n_stars=80, seed=2, flux_min=5e3, flux_max=2e5,
                         science={"fwhm": fwhm, "n_cosmic_rays": 5})
    result = GaussianMomentsPsfEstimator().run(pair.science.evolve(psf=None))
    assert isinstance(result.psf, skydiff.GaussianPsf)
    assert result.psf.fwhm() == pytest.approx(fwhm, rel=0.02)
    assert result.metadata["n_stars"] == len(result.sources) > 10
    assert result.metadata["fwhm"] == pytest.approx(result.psf.fwhm())


def test_moffat_gives_its_adaptive_moment_width() -> None:
    pair = simulate_pair(shape=(384, 384), n_stars=80, seed=2, flux_min=5e3, flux_max=2e5,
                         science={"fwhm": 4.0, "psf_model": "moffat"})
    truth = pair.science.psf
    assert truth is not None
    result = GaussianMomentsPsfEstimator().run(pair.science.evolve(psf=None))
    assert result.psf.fwhm() == pytest.approx(truth.fwhm(), rel=0.03)


def test_works_with_a_single_star() -> None:
    pair = simulate_pair(shape=(64, 64), n_stars=1, seed=3, flux_min=3e4, flux_max=3e4,
                         science={"fwhm": 3.5})
    star = pair.truth[0]
    assert 16 < star["x"] < 48 and 16 < star["y"] < 48  # seed chosen for a central star
    result = GaussianMomentsPsfEstimator().run(pair.science.evolve(psf=None))
    assert result.metadata["n_stars"] == 1
    assert result.psf.fwhm() == pytest.approx(3.5, rel=0.03)


def test_given_sources_and_isolation_fallback() -> None:
    pair = simulate_pair(shape=(256, 256), n_stars=40, seed=6, flux_min=1e4, flux_max=1e5,
                         science={"fwhm": 3.0})
    truth = pair.truth
    sources = Table({"x": truth["x"][:3], "y": truth["y"][:3]})
    config = GaussianMomentsPsfConfig(min_snr=5.0)
    result = GaussianMomentsPsfEstimator(config).run(pair.science.evolve(psf=None),
                                                     sources=sources)
    assert 1 <= result.metadata["n_stars"] <= 3
    assert result.psf.fwhm() == pytest.approx(3.0, rel=0.05)


def test_no_star_raises() -> None:
    rng = np.random.default_rng(0)
    noise = skydiff.Exposure(rng.normal(0.0, 1.0, (64, 64)), variance=np.ones((64, 64)))
    with pytest.raises(skydiff.PsfEstimationError) as info:
        GaussianMomentsPsfEstimator().run(noise)
    assert info.value.metadata["n_found"] == 0
    assert info.value.metadata["n_needed"] == 1
    with pytest.raises(skydiff.InputError):
        GaussianMomentsPsfEstimator().run(noise, sources=Table({"x": [1.0]}))


@pytest.mark.parametrize("seed", [7, 8])
def test_galaxies_and_hot_pixels_are_not_stars(seed: int) -> None:
    # 60 stars, 180 brighter-or-equal galaxies of 2-4x the PSF's FWHM and 30 hot pixels
    pair = simulate_pair(shape=(512, 512), n_stars=60, seed=seed, flux_min=2e4, flux_max=2e5,
                         science={"fwhm": 3.0})
    rng = np.random.default_rng(seed + 100)
    image = np.array(pair.science.image, dtype=np.float64)
    rows, cols = np.mgrid[0:512, 0:512]
    for _ in range(180):
        xc, yc = rng.uniform(20, 492, 2)
        sigma = 3.0 / 2.3548 * rng.uniform(2.0, 4.0)
        q = rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, np.pi)
        dx, dy = cols - xc, rows - yc
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        flux = rng.uniform(2e4, 2e5)
        image += flux / (2 * np.pi * sigma**2 * q) * np.exp(-0.5 * (u**2 + (v / q) ** 2)
                                                             / sigma**2)
    hot = rng.integers(10, 502, (30, 2))
    image[hot[:, 0], hot[:, 1]] += rng.uniform(2e3, 2e4, 30)
    exposure = pair.science.evolve(image=image, psf=None)
    result = GaussianMomentsPsfEstimator().run(exposure)
    assert result.psf.fwhm() == pytest.approx(3.0, rel=0.03)
    assert np.all(np.asarray(result.sources["fwhm"]) < 1.3 * 3.0)
    blind = GaussianMomentsPsfEstimator(GaussianMomentsPsfConfig(select_locus=False))
    assert blind.run(exposure).psf.fwhm() > 1.5 * 3.0  # the galaxies' width without the locus
