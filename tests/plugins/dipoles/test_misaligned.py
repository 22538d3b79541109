"""A star field whose template is misaligned by 1 px at 30 degrees: every star is a dipole.

25 stars of flux 2e4 on a 5 x 5 grid (15 px apart, isolated: the fit boxes do not overlap
other stars), PSF sigma 1.5 px, sky 200 per pixel, science shifted by (cos 30, sin 30) px.
The truth: positive lobe at the science position, negative lobe at the template position,
both fluxes 2e4, separation 1 px, orientation 30 degrees.

Tolerances are 5 sigma per source from the reported errors (25 sources: a false failure has
probability ~25 x 6e-7) and 4 sigma / sqrt(25) for averages over the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff_plugins.dipoles import (
    Chi2Classifier,
    DipoleFitConfig,
    DipoleFitMeasurement,
    SnFluxRatioClassifier,
)

FLUX = 20000.0
ANGLE = 30.0
SHIFT = (math.cos(math.radians(ANGLE)), math.sin(math.radians(ANGLE)))
N_SIDE = 5
N = N_SIDE * N_SIDE


@pytest.fixture(scope="module")
def field(field_factory: Callable[..., Any], grid_positions: Callable[..., Any]) -> Any:
    xs, ys = grid_positions(N_SIDE, start=15.0, step=15.0)
    return field_factory(seed=11, x=xs, y=ys, science_flux=FLUX, template_flux=FLUX,
                         shift=SHIFT, shape=(90, 90))


@pytest.fixture(scope="module")
def tied(field: Any, run_measure: Callable[..., Table]) -> Table:
    return run_measure(DipoleFitMeasurement(), field.inputs())


@pytest.fixture(scope="module")
def free(field: Any, run_measure: Callable[..., Table]) -> Table:
    return run_measure(DipoleFitMeasurement(DipoleFitConfig(tie_fluxes=False)),
                       field.inputs())


def _angle_sigma_deg(table: Table) -> np.ndarray:
    # Orientation error: the transverse position error of the two lobes over the separation.
    transverse = np.sqrt((table["dipole_pos_x_err"] ** 2 + table["dipole_pos_y_err"] ** 2
                          + table["dipole_neg_x_err"] ** 2 + table["dipole_neg_y_err"] ** 2)
                         / 2.0)
    return np.degrees(transverse / table["dipole_separation"])


def _separation_sigma(table: Table) -> np.ndarray:
    return np.sqrt((table["dipole_pos_x_err"] ** 2 + table["dipole_pos_y_err"] ** 2
                    + table["dipole_neg_x_err"] ** 2 + table["dipole_neg_y_err"] ** 2) / 2.0)


@pytest.mark.parametrize("mode", ["tied", "free"])
def test_separation_and_orientation(mode: str, request: pytest.FixtureRequest) -> None:
    table = request.getfixturevalue(mode)
    assert not table["dipole_fit_flag"].any()
    sep = np.asarray(table["dipole_separation"])
    sep_sigma = _separation_sigma(table)
    assert np.all(np.abs(sep - 1.0) < 5.0 * sep_sigma), sep
    assert abs(sep.mean() - 1.0) < 4.0 * np.median(sep_sigma) / math.sqrt(N)
    angle = np.asarray(table["dipole_orientation"])
    angle_sigma = _angle_sigma_deg(table)
    assert np.all(angle_sigma < 2.0)  # ~1.4 deg for these S/N: "a few degrees" at 5 sigma
    assert np.all(np.abs(angle - ANGLE) < 5.0 * angle_sigma), angle
    assert abs(angle.mean() - ANGLE) < 4.0 * np.median(angle_sigma) / math.sqrt(N)


@pytest.mark.parametrize("mode", ["tied", "free"])
def test_lobe_positions(mode: str, request: pytest.FixtureRequest, field: Any) -> None:
    table = request.getfixturevalue(mode)
    truth = {"pos_x": field.x + SHIFT[0], "pos_y": field.y + SHIFT[1],
             "neg_x": field.x, "neg_y": field.y}
    for key, value in truth.items():
        pull = (table[f"dipole_{key}"] - value) / table[f"dipole_{key}_err"]
        assert np.all(np.abs(pull) < 5.0), (key, pull)
    mean_x = (field.x + SHIFT[0] / 2.0)
    assert np.allclose(table["dipole_x"], mean_x, atol=0.1)


@pytest.mark.parametrize("mode", ["tied", "free"])
def test_lobe_fluxes(mode: str, request: pytest.FixtureRequest) -> None:
    table = request.getfixturevalue(mode)
    for lobe in ("pos", "neg"):
        pull = (table[f"dipole_{lobe}_flux"] - FLUX) / table[f"dipole_{lobe}_flux_err"]
        assert np.all(np.abs(pull) < 5.0), pull
        assert abs(np.mean(pull)) < 4.0 / math.sqrt(N)
    if mode == "tied":
        assert np.array_equal(table["dipole_pos_flux"], table["dipole_neg_flux"])
        # tied: S/N = sqrt(2) F / sigma_F
        expected = math.sqrt(2.0) * table["dipole_pos_flux"] / table["dipole_pos_flux_err"]
        assert np.allclose(table["dipole_sn"], expected)
    else:
        assert not np.array_equal(table["dipole_pos_flux"], table["dipole_neg_flux"])


def test_free_flux_errors(tied: Table, free: Table) -> None:
    # A tied flux is measured by both lobes (science and template), a free one by one lobe
    # (mostly one image): with equal noise in both, the error grows by about sqrt(2).
    ratio = np.median(free["dipole_pos_flux_err"]) / np.median(tied["dipole_pos_flux_err"])
    assert 1.2 < ratio < 1.7


def test_chi2_values(tied: Table) -> None:
    # The dipole is the true model: chi2/dof ~ 1 within 5 sigma of sqrt(2/dof) per source,
    # and one PSF cannot fit a 1-px dipole of a 2e4 star.
    dof = np.asarray(tied["dipole_dof"])
    assert np.all(tied["dipole_n_data"] - dof == 5)
    assert np.all(np.abs(tied["dipole_chi2dof"] - 1.0) < 5.0 * np.sqrt(2.0 / dof))
    assert np.all(tied["dipole_single_chi2dof"] > 2.0)


@pytest.mark.parametrize("mode", ["tied", "free"])
def test_classifiers_flag_every_star(mode: str, request: pytest.FixtureRequest) -> None:
    table = request.getfixturevalue(mode)
    for classifier in (SnFluxRatioClassifier(), Chi2Classifier()):
        result = classifier.run(table)
        assert result.flag.shape == (N,) and result.flag.dtype == bool
        assert result.flag.all(), type(classifier).__name__
    # Delta chi2 is hundreds: the significance is far beyond the 1e-3 threshold (3.1 sigma)
    assert np.all(Chi2Classifier().run(table).score > 10.0)


@pytest.mark.parametrize(("science", "template"), [(False, True), (True, False)])
def test_missing_plane_is_reconstructed(field: Any, tied: Table, science: bool,
                                        template: bool, run_measure: Callable[..., Table]
                                        ) -> None:
    # The difference is exactly science - template here, and the reconstructed plane's
    # variance V_d - V_other is the true one, so the fit is the same up to float32 rounding.
    plugin = DipoleFitMeasurement()
    result = plugin.run(field.inputs(science=science, template=template))
    assert result.metadata["reconstructed"] == ("science" if not science else "template")
    table = result.columns
    for name in ("dipole_pos_flux", "dipole_pos_x", "dipole_neg_y", "dipole_orientation"):
        scale = (tied[f"{name}_err"] if f"{name}_err" in tied.colnames
                 else np.ones(len(tied)))
        assert np.all(np.abs(table[name] - tied[name]) < 1e-3 * scale), name


def test_difference_only(field: Any, tied: Table) -> None:
    # Without science and template the flux and the separation are degenerate for a
    # separation below the PSF width (only F * separation is measured): the orientation is
    # still right and the errors say the flux is poorly determined.
    plugin = DipoleFitMeasurement()
    result = plugin.run(field.inputs(science=False, template=False))
    assert result.metadata["fit_mode"] == "difference"
    table = result.columns
    assert not table["dipole_fit_flag"].any()
    angle_sigma = _angle_sigma_deg(table)
    assert np.all(np.abs(table["dipole_orientation"] - ANGLE) < 5.0 * angle_sigma)
    # (a nearly singular covariance may leave an error NaN; most are finite)
    assert np.isfinite(table["dipole_pos_flux_err"]).sum() >= N - 3
    assert (np.nanmedian(table["dipole_pos_flux_err"])
            > 10.0 * np.median(tied["dipole_pos_flux_err"]))
    moment = table["dipole_pos_flux"] * table["dipole_separation"]
    assert np.all(np.abs(moment / FLUX - 1.0) < 0.1)


def test_difference_only_by_rel_weight(field: Any) -> None:
    plugin = DipoleFitMeasurement(DipoleFitConfig(rel_weight=0.0))
    result = plugin.run(field.inputs())
    assert result.metadata["fit_mode"] == "difference"
    assert not result.columns["dipole_fit_flag"].any()


def test_outputs(tied: Table, field: Any) -> None:
    result = DipoleFitMeasurement().run(field.inputs())
    assert len(result.columns) == N
    assert result.metadata["n_fitted"] == N and result.metadata["n_failed"] == 0
    assert result.columns["dipole_n_data"].dtype == np.int64
    assert result.columns["dipole_fit_flag"].dtype == bool
    assert not set(result.columns.colnames) & set(field.catalog.colnames)
    assert isinstance(result, skydiff.MeasurementResult)
