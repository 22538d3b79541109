"""Tests of the ``empirical`` PSF estimator against simulated pairs with known PSFs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff.sim import SimulatedPair, simulate_pair
from skydiff_plugins.psf_estimation import EmpiricalPsfConfig, EmpiricalPsfEstimator

SHAPE = (1024, 1024)
ORIGIN = (50, -30)
#: Fractional positions (x, y) across the field where the models are compared.
POSITIONS = [(0.05, 0.05), (0.5, 0.5), (0.95, 0.5), (0.05, 0.95), (0.95, 0.95), (0.3, 0.7)]


@functools.cache
def _pair(psf_model: str, varying: bool) -> SimulatedPair:
    """Bright star field; a varying PSF changes its FWHM by ±20 % between field corners."""
    gradient = (0.12, -0.08) if varying else (0.0, 0.0)
    return simulate_pair(shape=SHAPE, origin=ORIGIN, n_stars=500, seed=1, flux_min=5000.0,
                         flux_max=5e5, flux_slope=1.5,
                         science={"fwhm": 4.0, "psf_model": psf_model, "fwhm_gradient": gradient,
                                  "n_cosmic_rays": 20, "n_bad_columns": 1})


@functools.cache
def _estimate(psf_model: str, varying: bool) -> skydiff.PsfEstimationResult:
    return EmpiricalPsfEstimator().run(_pair(psf_model, varying).science.evolve(psf=None))


def _parent(fx: float, fy: float) -> tuple[float, float]:
    return ORIGIN[0] + fx * (SHAPE[1] - 1), ORIGIN[1] + fy * (SHAPE[0] - 1)


def _common_crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both images to the smaller size and normalise each to unit sum."""
    size = min(a.shape[0], b.shape[0])
    def crop(image: np.ndarray) -> np.ndarray:
        start = (image.shape[0] - size) // 2
        part = image[start:start + size, start:start + size]
        return part / part.sum()
    return crop(a), crop(b)


@pytest.mark.parametrize("psf_model", ["gaussian", "moffat"])
@pytest.mark.parametrize("varying", [False, True])
def test_fwhm_matches_the_truth_across_the_field(psf_model: str, varying: bool) -> None:
    truth = _pair(psf_model, varying).science.psf
    assert truth is not None
    result = _estimate(psf_model, varying)
    for fx, fy in POSITIONS:
        x, y = _parent(fx, fy)
        assert result.psf.fwhm(x, y) == pytest.approx(truth.fwhm(x, y), rel=0.03)
    if varying:  # the model really varies: ±20 % between corners
        assert result.psf.fwhm(*_parent(0.95, 0.05)) / result.psf.fwhm(*_parent(0.05, 0.95)) \
            == pytest.approx(truth.fwhm(*_parent(0.95, 0.05)) / truth.fwhm(*_parent(0.05, 0.95)),
                             rel=0.03)


@pytest.mark.parametrize("psf_model", ["gaussian", "moffat"])
def test_constant_psf_image_matches_the_truth(psf_model: str) -> None:
    truth = _pair(psf_model, False).science.psf
    assert truth is not None
    result = _estimate(psf_model, False)
    for fx, fy in POSITIONS:
        x, y = _parent(fx, fy)
        image = result.psf.kernel_image(x, y)
        assert image.shape[0] % 2 == 1 and image.sum() == pytest.approx(1.0)
        estimated, expected = _common_crop(image, truth.kernel_image(x, y))
        assert np.max(np.abs(estimated - expected)) < 0.02 * expected.max()


def test_varying_psf_image_and_model_type() -> None:
    pair = _pair("gaussian", True)
    result = _estimate("gaussian", True)
    assert isinstance(result.psf, skydiff.PolynomialPsf)
    assert result.psf.bbox == pair.science.bbox
    assert result.metadata["spatial_order"] >= 1
    truth = pair.science.psf
    assert truth is not None
    for fx, fy in POSITIONS:
        x, y = _parent(fx, fy)
        estimated, expected = _common_crop(result.psf.kernel_image(x, y), truth.kernel_image(x, y))
        assert np.max(np.abs(estimated - expected)) < 0.04 * expected.max()


def test_metadata_sources_and_purity() -> None:
    science = _pair("gaussian", False).science
    result = _estimate("gaussian", False)
    metadata = result.metadata
    assert metadata["n_stars"] == len(result.sources) >= 50
    assert metadata["n_candidates"] >= metadata["n_stars"]
    assert metadata["fwhm"] == pytest.approx(4.0, rel=0.03)
    assert 0.0 < metadata["residual_rms"] < 0.1
    assert isinstance(result.psf, skydiff.ImagePsf)  # a constant PSF selects order 0
    assert metadata["spatial_order"] == 0
    sources = result.sources
    assert {"x", "y", "psf_flux", "psf_chi2"} <= set(sources.colnames)
    assert not np.any(sources["masked"]) and not np.any(sources["saturated"])
    assert science.psf is not None  # the input is untouched


def test_spatial_order_is_lowered_for_few_stars() -> None:
    pair = simulate_pair(shape=(256, 256), n_stars=12, seed=3, flux_min=2e4, flux_max=2e5,
                         science={"fwhm": 3.0})
    config = EmpiricalPsfConfig(spatial_order=2, select_order=False)
    result = EmpiricalPsfEstimator(config).run(pair.science.evolve(psf=None))
    n_stars = result.metadata["n_stars"]
    assert n_stars < 18
    assert result.metadata["spatial_order"] == (1 if n_stars >= 9 else 0)
    assert result.psf.fwhm() == pytest.approx(3.0, rel=0.05)


def test_given_sources_are_honoured() -> None:
    pair = _pair("gaussian", False)
    truth = pair.truth
    chosen = truth[(truth["flux_science"] > 3e4) & ~truth["saturated"]][:25]
    sources = Table({"x": chosen["x"], "y": chosen["y"]})
    before = sources.copy()
    result = EmpiricalPsfEstimator().run(pair.science.evolve(psf=None), sources=sources)
    used = result.sources
    assert 3 <= len(used) <= 25
    distance = np.hypot(np.asarray(used["x"])[:, None] - np.asarray(chosen["x"])[None, :],
                        np.asarray(used["y"])[:, None] - np.asarray(chosen["y"])[None, :])
    assert np.all(distance.min(axis=1) < 0.5)  # every star used is one of those given
    assert result.psf.fwhm() == pytest.approx(4.0, rel=0.03)
    assert np.array_equal(sources["x"], before["x"])  # the caller's table is untouched


def test_too_few_stars_raise_with_counts() -> None:
    pair = simulate_pair(shape=(128, 128), n_stars=2, seed=5, flux_min=2e4, flux_max=5e4)
    with pytest.raises(skydiff.PsfEstimationError) as info:
        EmpiricalPsfEstimator().run(pair.science.evolve(psf=None))
    assert info.value.metadata["n_needed"] == 3
    assert info.value.metadata["n_found"] < 3
    empty = skydiff.Exposure(np.zeros((64, 64)), variance=np.ones((64, 64)))
    with pytest.raises(skydiff.PsfEstimationError):
        EmpiricalPsfEstimator().run(empty)


def test_bad_inputs_raise_input_errors() -> None:
    science = _pair("gaussian", False).science
    with pytest.raises(skydiff.InputError):
        EmpiricalPsfEstimator().run(np.zeros((10, 10)))  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError):
        EmpiricalPsfEstimator().run(science, sources=Table({"ra": [1.0]}))


def test_registered_as_a_builtin() -> None:
    registry = skydiff.get_registries().psf_estimator
    assert registry["empirical"].target is EmpiricalPsfEstimator
