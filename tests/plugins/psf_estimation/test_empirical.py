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


# -- model validation (a polynomial fitted in one part of the field must hold everywhere) --


def _check_valid_everywhere(psf: skydiff.Psf, bbox: tuple[int, int, int, int],
                            fwhm: float) -> None:
    """Positive-sum, finite, centred, sane-FWHM images on a 7 x 7 grid over the bbox."""
    x0, y0, x1, y1 = bbox
    for x in np.linspace(x0, x1, 7):
        for y in np.linspace(y0, y1, 7):
            image = psf.kernel_image(x, y)  # raises InputError on a non-positive sum
            assert np.all(np.isfinite(image)) and image.sum() == pytest.approx(1.0)
            assert 0.5 * fwhm < psf.fwhm(x, y) < 2.0 * fwhm


def _clustered_sources(pair: SimulatedPair, inside: np.ndarray) -> Table:
    truth = pair.truth
    chosen = truth[inside & ~np.asarray(truth["saturated"], dtype=bool)]
    return Table({"x": chosen["x"], "y": chosen["y"]})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_few_stars_in_one_corner_give_a_valid_model_or_raise(seed: int) -> None:
    # 6-10 stars in a 90 x 90 corner of a 512 x 512 field, order 2 forced: the quadratic
    # extrapolates to nonsense in the rest of the field.
    pair = simulate_pair(shape=(512, 512), n_stars=300, seed=seed, flux_min=2e3, flux_max=1e5,
                         science={"fwhm": 3.0})
    x, y = np.asarray(pair.truth["x"]), np.asarray(pair.truth["y"])
    sources = _clustered_sources(pair, (x < 90) & (y < 90))
    config = EmpiricalPsfConfig(spatial_order=2, select_order=False, stars_per_term=1.0)
    science = pair.science.evolve(psf=None)
    try:
        result = EmpiricalPsfEstimator(config).run(science, sources=sources)
    except skydiff.PsfEstimationError as exc:
        assert exc.metadata["n_orders_rejected"] == 3
        return
    assert result.metadata["spatial_order"] < 2
    assert 2 in result.metadata["rejected_orders"]
    _check_valid_everywhere(result.psf, science.bbox, 3.0)


def test_an_invalid_order_falls_back_to_a_lower_one() -> None:
    # Stars only in the central 120 x 120 px: before the validation the quadratic model was
    # returned with a non-positive sum or a wild FWHM at 14 of 25 grid points (corners).
    pair = simulate_pair(shape=(512, 512), n_stars=300, seed=1, flux_min=2e3, flux_max=1e5,
                         science={"fwhm": 3.0})
    x, y = np.asarray(pair.truth["x"]), np.asarray(pair.truth["y"])
    sources = _clustered_sources(pair, (np.abs(x - 256) < 60) & (np.abs(y - 256) < 60))
    config = EmpiricalPsfConfig(spatial_order=2, select_order=False, stars_per_term=1.0)
    science = pair.science.evolve(psf=None)
    result = EmpiricalPsfEstimator(config).run(science, sources=sources)
    assert result.metadata["rejected_orders"] == [2]
    assert result.metadata["spatial_order"] == 1
    _check_valid_everywhere(result.psf, science.bbox, 3.0)
    assert result.psf.fwhm() == pytest.approx(3.0, rel=0.05)


def test_no_valid_order_raises_psf_estimation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def never_valid(*args: object) -> tuple[None, str]:
        return None, "rejected by the test"

    monkeypatch.setattr(EmpiricalPsfEstimator, "_model", staticmethod(never_valid))
    pair = simulate_pair(shape=(256, 256), n_stars=40, seed=3, flux_min=2e4, flux_max=2e5,
                         science={"fwhm": 3.0})
    config = EmpiricalPsfConfig(spatial_order=1, select_order=False)
    with pytest.raises(skydiff.PsfEstimationError) as info:
        EmpiricalPsfEstimator(config).run(pair.science.evolve(psf=None))
    assert info.value.metadata["n_orders_rejected"] == 2  # orders 1 and 0


# -- star selection on the stellar locus -------------------------------------------------


def _with_galaxies_and_hot_pixels(seed: int) -> tuple[skydiff.Exposure, float]:
    """A star field plus three times as many bright galaxies and some hot pixels.

    Galaxies: elliptical Gaussians with FWHM 2-4 x the PSF's (their sizes spread widely and
    outnumber the stars, as in a cluster field); hot pixels: single bright pixels.
    """
    pair = simulate_pair(shape=(512, 512), n_stars=60, seed=seed, flux_min=2e4, flux_max=2e5,
                         science={"fwhm": 3.0})
    science = pair.science
    rng = np.random.default_rng(seed + 100)
    image = np.array(science.image, dtype=np.float64)
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
    return science.evolve(image=image, psf=None), 3.0


@pytest.mark.parametrize("seed", [7, 8])
def test_galaxies_and_hot_pixels_are_not_stars(seed: int) -> None:
    exposure, fwhm = _with_galaxies_and_hot_pixels(seed)
    result = EmpiricalPsfEstimator().run(exposure)
    assert result.psf.fwhm() == pytest.approx(fwhm, rel=0.05)
    assert np.all(np.asarray(result.sources["fwhm"]) < 1.3 * fwhm)
    assert result.metadata["n_locus"] >= result.metadata["n_stars"] >= 10
    # without the locus the galaxies dominate (the bug on the JWST cluster field)
    blind = EmpiricalPsfEstimator(EmpiricalPsfConfig(select_locus=False)).run(exposure)
    assert blind.psf.fwhm() > 1.3 * fwhm
