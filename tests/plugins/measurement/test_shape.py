"""``shape``: adaptive second moments recover a Gaussian's covariance, for either sign."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from astropy.table import Table

import skydiff
from skydiff_plugins.measurement import ShapeMeasurement


def test_noiseless_elliptical_gaussians(gaussian_renderer: Callable[..., np.ndarray]) -> None:
    # For a Gaussian of covariance C the adaptive moments converge to C exactly; sampling at
    # pixel centres changes second moments by ~exp(-2 pi^2 sigma_min^2) (< 1e-8 for
    # sigma_min >= 1 px) and float32 pixels by ~1e-7, so 1e-4 relative is generous.
    rng = np.random.default_rng(12)
    n = 24
    x = 25.0 + 40.0 * (np.arange(n) % 6) + rng.uniform(-0.5, 0.5, n)
    y = 25.0 + 40.0 * (np.arange(n) // 6) + rng.uniform(-0.5, 0.5, n)
    xx = rng.uniform(1.2, 6.0, n)
    yy = rng.uniform(1.2, 6.0, n)
    xy = rng.uniform(-0.5, 0.5, n) * np.sqrt(xx * yy)
    flux = rng.uniform(1e3, 1e4, n) * np.where(np.arange(n) % 2, -1.0, 1.0)
    image = gaussian_renderer((180, 260), x, y, flux, xx, yy, xy)
    exposure = skydiff.Exposure.from_arrays(image.astype(np.float32),
                                            variance=np.ones(image.shape, np.float32),
                                            psf=skydiff.GaussianPsf(1.5))
    # start 0.7 px off the centre (as a detection peak could be)
    catalog = Table({"x": x + 0.7, "y": y - 0.7})
    columns = ShapeMeasurement().run(skydiff.MeasurementInputs(catalog=catalog,
                                                               difference=exposure)).columns
    assert columns.colnames == ["shape_xx", "shape_yy", "shape_xy", "shape_flag"]
    assert not columns["shape_flag"].any()
    scale = np.sqrt(xx * yy)
    np.testing.assert_allclose(columns["shape_xx"], xx, rtol=1e-4)
    np.testing.assert_allclose(columns["shape_yy"], yy, rtol=1e-4)
    assert np.all(np.abs(columns["shape_xy"] - xy) < 1e-4 * scale)


def test_noisy_point_sources_recover_sigma_squared(scene_factory: Callable[..., Any]) -> None:
    # 361 PSF sources at S/N 20-100 on the constant sigma = 1.5 PSF. The adaptive-moment size
    # of one source scatters by about sqrt(2)*2/SNR <= 14 % (Bernstein & Jarvis 2002, eq. A);
    # the median of 361 then has a standard error <= 1.25 * 0.14 / sqrt(361) = 0.9 %, and the
    # noise bias is O(1/SNR^2) < 0.5 %: |median/sigma^2 - 1| < 3 % (measured ~0.5 %).
    # Negative sources are half the sample and must be measured just as well.
    scene = scene_factory(seed=17)
    truth = scene.truth
    columns = ShapeMeasurement().run(scene.inputs()).columns
    assert not columns["shape_flag"].any()
    sigma2 = np.asarray(truth["sigma"]) ** 2
    negative = np.asarray(truth["flux"]) < 0
    for part in (negative, ~negative):
        assert abs(np.median(columns["shape_xx"][part] / sigma2[part]) - 1.0) < 0.03
        assert abs(np.median(columns["shape_yy"][part] / sigma2[part]) - 1.0) < 0.03
        assert abs(np.median(columns["shape_xy"][part] / sigma2[part])) < 0.03


def test_failures_are_flagged(scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=2, shape=(100, 100), spacing=25)
    empty = scene.exposure.evolve(image=np.zeros(scene.exposure.shape, np.float32))
    catalog = Table({"x": [50.0, -40.0, np.nan], "y": [50.0, 10.0, 3.0]})
    columns = ShapeMeasurement().run(scene.inputs(catalog, difference=empty,
                                                  footprints=None)).columns
    assert columns["shape_flag"].all()
    assert np.isnan(columns["shape_xx"]).all()
    # masked core: most of the window weight on BAD pixels
    mask = np.zeros(scene.exposure.shape, dtype=bool)
    x0, y0 = scene.truth["x"][0], scene.truth["y"][0]
    mask[int(y0) - 3:int(y0) + 4, int(x0) - 3:int(x0) + 4] = True
    masked = scene.exposure.with_mask("BAD", mask)
    columns = ShapeMeasurement().run(scene.inputs(difference=masked)).columns
    assert columns["shape_flag"][0] and not columns["shape_flag"][1:].any()
