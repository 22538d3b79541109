"""``forced_psf``: PSF fluxes at the catalog positions on the science and matched template."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff_plugins.measurement import ForcedPsfMeasurement


def _pair(render: Callable[..., np.ndarray], varying_psf: Any, *, seed: int
          ) -> tuple[skydiff.MeasurementInputs, Table]:
    """Science (sky 100, PSF sigma 1.4-2.0 px varying with x) and a template on a frame 6 px
    larger on every side with its own PSF (sigma 1.4) and sky 60; independent star fluxes."""
    rng = np.random.default_rng(seed)
    shape = (300, 300)
    origin = (1000, 2000)
    gx, gy = np.meshgrid(np.arange(15.0, 290.0, 18.0), np.arange(15.0, 290.0, 18.0))
    n = gx.size
    x = gx.ravel() + rng.uniform(-1.0, 1.0, n)
    y = gy.ravel() + rng.uniform(-1.0, 1.0, n)
    # sigma from 1.4 px (left) to 2.0 px (right), in parent coordinates
    science_psf = varying_psf(1.4 - 0.002 * origin[0], (0.002, 0.0),
                              position=(origin[0] + 150.0, origin[1] + 150.0))
    science_sigma = science_psf.sigma(x + origin[0], y + origin[1])
    f_sci = rng.uniform(2e3, 2e4, n)
    f_tmp = f_sci * rng.uniform(0.5, 1.5, n)
    f_tmp[::7] = 0.0  # transients: nothing in the template
    model_s = 100.0 + render(shape, x, y, f_sci, science_sigma**2, science_sigma**2)
    var_s = model_s  # Poisson-like, gain 1
    science = skydiff.Exposure.from_arrays(
        (model_s + rng.normal(size=shape) * np.sqrt(var_s)).astype(np.float32),
        variance=var_s.astype(np.float32), psf=science_psf, origin=origin)
    border = 6
    t_shape = (shape[0] + 2 * border, shape[1] + 2 * border)
    model_t = 60.0 + render(t_shape, x + border, y + border, f_tmp, np.full(n, 1.96),
                            np.full(n, 1.96))
    var_t = 0.25 * model_t
    template = skydiff.Exposure.from_arrays(
        (model_t + rng.normal(size=t_shape) * np.sqrt(var_t)).astype(np.float32),
        variance=var_t.astype(np.float32), psf=skydiff.GaussianPsf(1.4),
        origin=(origin[0] - border, origin[1] - border))
    difference = science.evolve(image=np.zeros(shape, np.float32))
    catalog = Table({"id": np.arange(1, n + 1), "x": x, "y": y})
    truth = Table({"science": f_sci, "template": f_tmp})
    return skydiff.MeasurementInputs(catalog=catalog, difference=difference, science=science,
                                     template=template), truth


def test_recovers_science_and_template_fluxes(gaussian_renderer: Callable[..., np.ndarray],
                                              varying_psf: Any) -> None:
    # 256 sources; pulls (F - F_true)/err are N(0, 1) for the linear fit with a free constant
    # background (the sky): std standard error 1/sqrt(2*255) = 0.044 -> bound 0.18 (4 sigma);
    # mean 1/sqrt(256) = 0.0625 -> bound 0.25. Neighbours 18 px apart put < 1 % of their
    # peak on the border of the 25-px science stamps, below the pixel noise (measured over
    # seeds 5-7: std 0.96-1.07, mean within 0.15).
    inputs, truth = _pair(gaussian_renderer, varying_psf, seed=5)
    result = ForcedPsfMeasurement().run(inputs)
    columns = result.columns
    assert columns.colnames == ["forced_science_flux", "forced_science_flux_err",
                                "forced_template_flux", "forced_template_flux_err",
                                "forced_psf_flag"]
    assert not columns["forced_psf_flag"].any()
    for label in ("science", "template"):
        pulls = ((columns[f"forced_{label}_flux"] - truth[label])
                 / columns[f"forced_{label}_flux_err"])
        assert abs(np.std(pulls, ddof=1) - 1.0) < 0.18, label
        assert abs(np.mean(pulls)) < 0.25, label
    # the transients are consistent with zero in the template
    zero = np.asarray(truth["template"]) == 0
    assert np.all(np.abs(columns["forced_template_flux"][zero])
                  < 5 * columns["forced_template_flux_err"][zero])
    assert result.metadata["has_science"] and result.metadata["has_template"]
    # "measured" error calibration: both images' scales measured; on these uncorrelated
    # images they are ~1 (the crowded science image's bright-star wings inflate it by a
    # few per cent: measured 1.09 and 1.03).
    for label in ("science", "template"):
        assert 0.95 < result.metadata[f"noise_scale_{label}"] < 1.15, label
        assert result.metadata[f"noise_pixels_{label}"] > 10_000, label


def test_without_background_fit_the_sky_biases_the_flux(
        gaussian_renderer: Callable[..., np.ndarray], varying_psf: Any) -> None:
    # The sky of 100 adds 100 * sum(m) / sum(m^2) ~ 100 * 4 pi sigma^2 ~ 2500 to a flux-only
    # fit: with fit_background=False the science fluxes are biased by > 1000 (a check that
    # the default background term matters).
    inputs, truth = _pair(gaussian_renderer, varying_psf, seed=6)
    config = ForcedPsfMeasurement.ConfigClass(fit_background=False)
    columns = ForcedPsfMeasurement(config).run(inputs).columns
    bias = np.median(columns["forced_science_flux"] - truth["science"])
    assert bias > 1000.0
    expected = 100.0 * 4.0 * math.pi * 1.4**2
    assert bias > 0.8 * expected


def test_missing_images_and_psfs_give_nan_and_flags(
        gaussian_renderer: Callable[..., np.ndarray], varying_psf: Any) -> None:
    inputs, _ = _pair(gaussian_renderer, varying_psf, seed=7)
    no_template = skydiff.MeasurementInputs(catalog=inputs.catalog,
                                            difference=inputs.difference,
                                            science=inputs.science)
    result = ForcedPsfMeasurement().run(no_template)
    columns = result.columns
    assert columns["forced_psf_flag"].all()
    assert np.isnan(columns["forced_template_flux"]).all()
    assert np.isnan(columns["forced_template_flux_err"]).all()
    assert np.isfinite(columns["forced_science_flux"]).all()
    assert not result.metadata["has_template"]
    assert inputs.science is not None
    no_psf = skydiff.MeasurementInputs(catalog=inputs.catalog, difference=inputs.difference,
                                       science=inputs.science.evolve(psf=None),
                                       template=inputs.template)
    columns = ForcedPsfMeasurement().run(no_psf).columns
    assert columns["forced_psf_flag"].all()
    assert np.isnan(columns["forced_science_flux"]).all()
    assert np.isfinite(columns["forced_template_flux"]).all()


def test_wrong_image_type_raises(gaussian_renderer: Callable[..., np.ndarray],
                                 varying_psf: Any) -> None:
    inputs, _ = _pair(gaussian_renderer, varying_psf, seed=8)
    bad = skydiff.MeasurementInputs(catalog=inputs.catalog, difference=inputs.difference,
                                    science=np.zeros((3, 3)))  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError):
        ForcedPsfMeasurement().run(bad)
