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
