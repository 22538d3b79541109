"""``aperture_flux``: exact pixel/circle overlaps, Gaussian enclosed fluxes, errors, flags."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff_plugins.measurement import ApertureFluxMeasurement
from skydiff_plugins.measurement._aperture import aperture_weights


@pytest.mark.parametrize("radius", [0.3, 0.7, 1.0, 3.0, 6.0, 12.0, 40.0])
def test_overlap_weights_are_exact(radius: float) -> None:
    rng = np.random.default_rng(1)
    dx = rng.uniform(-0.5, 0.5, 300)
    dy = rng.uniform(-0.5, 0.5, 300)
    size = 2 * math.ceil(radius + 1.0) + 1
    weights = aperture_weights(dx, dy, radius, size=size)
    assert weights.min() >= 0.0 and weights.max() <= 1.0
    # The summed overlap is the disk area to rounding.
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), math.pi * radius**2, rtol=1e-12)


def test_overlap_weights_match_brute_force() -> None:
    # 400 x 400 sub-samples per pixel: the sampled fraction of a pixel crossed by the circle
    # errs by at most about (arc length in the pixel, <= 1.5) / 400 ~ 4e-3.
    weights = aperture_weights(np.array([0.23]), np.array([-0.41]), 2.7, size=9)[0]
    u = (np.arange(400) + 0.5) / 400 - 0.5
    rows, cols = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    x = (cols - 4 - 0.23)[:, :, None, None] + u[None, None, None, :]
    y = (rows - 4 + 0.41)[:, :, None, None] + u[None, None, :, None]
    sampled = np.mean(x**2 + y**2 <= 2.7**2, axis=(2, 3))
    np.testing.assert_allclose(weights, sampled, atol=4e-3)


@pytest.mark.parametrize("sigma", [1.5, 2.5])
def test_gaussian_enclosed_flux(sigma: float, gaussian_renderer: Callable[..., np.ndarray]
                                ) -> None:
    # A noiseless Gaussian of flux F sampled at pixel centres: the aperture sum approximates
    # F (1 - exp(-r^2 / 2 sigma^2)). The overlap is exact, so what remains is the pixelisation
    # of the profile: a boundary pixel assumes uniform intensity, off by the gradient times
    # the offset of the in-circle part from the pixel centre, whose variance is 1/12 px^2.
    # Summed over the circumference that is about 2 pi r |g'(r)| / 12 relative to the
    # enclosed flux F_enc (g the profile): the tolerance used (measured errors are 40-60 % of
    # it: 1.4 % / 1.2 % at r = 3, 1e-4 / 3e-3 at r = 6, < 2e-6 at r = 12).
    rng = np.random.default_rng(8)
    n = 40
    x = 30.0 + 40.0 * (np.arange(n) % 8) + rng.uniform(-0.5, 0.5, n)
    y = 30.0 + 40.0 * (np.arange(n) // 8) + rng.uniform(-0.5, 0.5, n)
    flux = rng.uniform(500.0, 5000.0, n) * np.where(np.arange(n) % 2, -1.0, 1.0)
    shape = (240, 340)
    image = gaussian_renderer(shape, x, y, flux, np.full(n, sigma**2), np.full(n, sigma**2))
    exposure = skydiff.Exposure.from_arrays(image.astype(np.float32),
                                            variance=np.ones(shape, np.float32))
    inputs = skydiff.MeasurementInputs(catalog=Table({"x": x, "y": y}), difference=exposure)
    columns = ApertureFluxMeasurement().run(inputs).columns
    assert columns.colnames == ["aperture_flux_3_0", "aperture_flux_3_0_err",
                                "aperture_flux_6_0", "aperture_flux_6_0_err",
                                "aperture_flux_12_0", "aperture_flux_12_0_err",
                                "aperture_flux_flag"]
    assert not columns["aperture_flux_flag"].any()
    for r in (3.0, 6.0, 12.0):
        enclosed = 1.0 - math.exp(-(r**2) / (2.0 * sigma**2))
        slope = (r / sigma**2) * math.exp(-(r**2) / (2.0 * sigma**2)) / (2 * math.pi * sigma**2)
        tolerance = 2.0 * math.pi * r * slope / 12.0 / enclosed + 1e-6
        ratio = columns[f"aperture_flux_{r:.1f}".replace(".", "_")] / (flux * enclosed)
        np.testing.assert_allclose(ratio, 1.0, atol=tolerance)
        # error: sqrt(sum f^2 V) with V = 1 is the square root of the sum of the squared
        # overlaps, between sqrt(inner area) and sqrt(pi r^2)
        err = np.asarray(columns[f"aperture_flux_{r:.1f}".replace(".", "_") + "_err"])
        assert np.all(err <= math.sqrt(math.pi) * r + 1e-9)
        assert np.all(err >= math.sqrt(math.pi) * (r - 0.71))


def test_errors_match_scatter(scene_factory: Callable[..., Any],
                              gaussian_renderer: Callable[..., np.ndarray]) -> None:
    # Pulls against the noiseless aperture fluxes (which removes the pixelisation term): for
    # n = 361 sources the std has standard error 0.037 -> 4-sigma bound 0.15, the mean
    # 0.053 -> bound 0.21.
    scene = scene_factory(seed=31)
    truth = scene.truth
    catalog = scene.catalog.copy()
    catalog["x"], catalog["y"] = truth["x"], truth["y"]
    noisy = ApertureFluxMeasurement().run(scene.inputs(catalog)).columns
    image = gaussian_renderer(scene.exposure.shape, np.asarray(truth["x"]),
                              np.asarray(truth["y"]), np.asarray(truth["flux"]),
                              np.asarray(truth["sigma"]) ** 2, np.asarray(truth["sigma"]) ** 2)
    clean = scene.exposure.evolve(image=image.astype(np.float32))
    noiseless = ApertureFluxMeasurement().run(scene.inputs(catalog, difference=clean)).columns
    for key in ("3_0", "6_0"):  # 12-px apertures overlap the 20-px-spaced neighbours' wings
        pulls = ((noisy[f"aperture_flux_{key}"] - noiseless[f"aperture_flux_{key}"])
                 / noisy[f"aperture_flux_{key}_err"])
        assert abs(np.std(pulls, ddof=1) - 1.0) < 0.15
        assert abs(np.mean(pulls)) < 0.21


def test_masked_and_truncated_apertures(scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=3, shape=(100, 100), spacing=25)
    catalog = Table({"x": [50.0, 50.0, 4.0, np.nan, 75.0], "y": [50.0, 25.0, 50.0, 1.0, 75.0]})
    mask = np.zeros(scene.exposure.shape, dtype=bool)
    mask[50, 55] = True  # 5 px from source 0: inside its 6 and 12 px apertures only
    mask[75, 75] = True  # in the centre of source 4
    exposure = scene.exposure.with_mask("BAD", mask)
    config = ApertureFluxMeasurement.ConfigClass(radii=[3.0, 6.0, 12.0])
    columns = ApertureFluxMeasurement(config).run(
        scene.inputs(catalog, difference=exposure, footprints=None)).columns
    flux3, flux6, flux12 = (np.asarray(columns[f"aperture_flux_{k}"])
                            for k in ("3_0", "6_0", "12_0"))
    assert np.isfinite(flux3[0]) and np.isnan(flux6[0]) and np.isnan(flux12[0])
    assert np.isfinite([flux3[1], flux6[1], flux12[1]]).all()
    # source 2 is 4 px from the edge: its 6 and 12 px apertures are truncated
    assert np.isfinite(flux3[2]) and np.isnan(flux6[2]) and np.isnan(flux12[2])
    assert np.isnan([flux3[3], flux3[4]]).all()
    np.testing.assert_array_equal(columns["aperture_flux_flag"], [True, False, True, True, True])


def test_radius_suffixes_and_config() -> None:
    config = ApertureFluxMeasurement.ConfigClass(radii=[4.5, 2.25])
    exposure = skydiff.Exposure.from_arrays(np.ones((30, 30), np.float32),
                                            variance=np.ones((30, 30), np.float32))
    inputs = skydiff.MeasurementInputs(catalog=Table({"x": [15.0], "y": [15.0]}),
                                       difference=exposure)
    columns = ApertureFluxMeasurement(config).run(inputs).columns
    assert columns.colnames[:4] == ["aperture_flux_4_5", "aperture_flux_4_5_err",
                                    "aperture_flux_2_25", "aperture_flux_2_25_err"]
    # a flat unit image: the flux is the exact area
    assert columns["aperture_flux_4_5"][0] == pytest.approx(math.pi * 4.5**2, rel=1e-12)
    with pytest.raises(skydiff.ConfigError):
        ApertureFluxMeasurement.ConfigClass(radii=[-1.0])
    with pytest.raises(skydiff.ConfigError):
        ApertureFluxMeasurement(ApertureFluxMeasurement.ConfigClass(radii=[3.0, 3.0]))
