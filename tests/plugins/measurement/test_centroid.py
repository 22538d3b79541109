"""``centroid``: sign-aware Gaussian-windowed centroids with errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from astropy.table import Table

from skydiff_plugins.measurement import CentroidMeasurement


@pytest.mark.parametrize("psf", ["constant", "varying"])
def test_noiseless_centroids_are_exact(psf: str, scene_factory: Callable[..., Any],
                                       gaussian_renderer: Callable[..., np.ndarray]) -> None:
    # Without noise the windowed centroid of a (sampled) Gaussian is its centre up to the
    # sampling error of a first moment, ~exp(-2 pi^2 sigma^2) (negligible), and the float32
    # image (~1e-7 relative): 1e-3 px is generous. The start is up to 1 px off.
    scene = scene_factory(seed=5, psf=psf, shape=(200, 200))
    truth = scene.truth
    image = gaussian_renderer(scene.exposure.shape, np.asarray(truth["x"]),
                              np.asarray(truth["y"]), np.asarray(truth["flux"]),
                              np.asarray(truth["sigma"]) ** 2, np.asarray(truth["sigma"]) ** 2)
    exposure = scene.exposure.evolve(image=image.astype(np.float32),
                                     variance=np.ones(image.shape, np.float32))
    columns = CentroidMeasurement().run(scene.inputs(difference=exposure)).columns
    assert not columns["centroid_flag"].any()
    np.testing.assert_allclose(columns["centroid_x"], truth["x"], atol=1e-3)
    np.testing.assert_allclose(columns["centroid_y"], truth["y"], atol=1e-3)


def test_errors_match_scatter_and_negative_sources(scene_factory: Callable[..., Any]) -> None:
    # Pulls (c - true)/err over 361 sources and two axes (722 values, nearly independent):
    # sample std standard error 1/sqrt(2 * 721) = 0.026 -> bound 0.11 (4 sigma); mean 0.037
    # -> bound 0.15. Measured: std 0.97-1.03.
    scene = scene_factory(seed=21)
    truth = scene.truth
    columns = CentroidMeasurement().run(scene.inputs()).columns
    assert columns.colnames == ["centroid_x", "centroid_y", "centroid_x_err", "centroid_y_err",
                                "centroid_flag"]
    assert not columns["centroid_flag"].any()
    pulls = np.concatenate([
        (columns["centroid_x"] - truth["x"]) / columns["centroid_x_err"],
        (columns["centroid_y"] - truth["y"]) / columns["centroid_y_err"]])
    assert abs(np.std(pulls, ddof=1) - 1.0) < 0.11
    assert abs(np.mean(pulls)) < 0.15
    # Negative sources are centroided as well as positive ones (same error distribution).
    negative = np.asarray(truth["flux"]) < 0
    error = np.hypot(columns["centroid_x"] - truth["x"], columns["centroid_y"] - truth["y"])
    assert negative.sum() > 150
    assert np.percentile(error[negative], 90) < 0.3
    ratio = np.median(error[negative]) / np.median(error[~negative])
    assert 0.7 < ratio < 1.4  # medians of ~180 Rayleigh draws each agree within ~10 %


def test_large_shift_is_flagged_and_reset(scene_factory: Callable[..., Any]) -> None:
    # With max_shift = 0.05 px nearly every source (started up to 1 px off) moves too far:
    # flagged, reset to the input position, NaN errors.
    scene = scene_factory(seed=2, shape=(100, 100), spacing=25)
    config = CentroidMeasurement.ConfigClass(max_shift=0.05)
    columns = CentroidMeasurement(config).run(scene.inputs()).columns
    start = np.hypot(scene.catalog["x"] - scene.truth["x"], scene.catalog["y"] - scene.truth["y"])
    moved = start > 0.2
    assert moved.sum() >= 5
    assert columns["centroid_flag"][moved].all()
    np.testing.assert_array_equal(columns["centroid_x"][moved], scene.catalog["x"][moved])
    np.testing.assert_array_equal(columns["centroid_y"][moved], scene.catalog["y"][moved])
    assert np.isnan(columns["centroid_x_err"][moved]).all()


def test_failures_are_flagged_not_raised(scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=2, shape=(100, 100), spacing=25)
    catalog = Table({"x": [50.0, -20.0, np.nan, 10.0], "y": [50.0, 10.0, 5.0, 10.0]})
    empty = scene.exposure.evolve(image=np.zeros(scene.exposure.shape, np.float32))
    columns = CentroidMeasurement().run(scene.inputs(catalog, difference=empty,
                                                     footprints=None)).columns
    # zero image (no windowed flux), off image, non-finite, zero image
    assert columns["centroid_flag"].all()
    np.testing.assert_array_equal(columns["centroid_x"][[0, 1, 3]], [50.0, -20.0, 10.0])
    assert np.isnan(columns["centroid_x"][2])


def test_window_without_psf(scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=4, shape=(100, 100), spacing=25)
    no_psf = scene.exposure.evolve(psf=None)
    flagged = CentroidMeasurement().run(scene.inputs(difference=no_psf)).columns
    assert flagged["centroid_flag"].all()
    config = CentroidMeasurement.ConfigClass(window_fwhm=3.5)
    columns = CentroidMeasurement(config).run(scene.inputs(difference=no_psf)).columns
    assert not columns["centroid_flag"].any()
    error = np.hypot(columns["centroid_x"] - scene.truth["x"],
                     columns["centroid_y"] - scene.truth["y"])
    assert np.median(error) < 0.3


def test_empty_catalog(scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=4, shape=(100, 100), spacing=25)
    columns = CentroidMeasurement().run(scene.inputs(scene.catalog[:0])).columns
    assert len(columns) == 0 and "centroid_flag" in columns.colnames
