"""Which sources dipole_fit fits, how it flags the others, and how it rejects bad inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff_plugins.dipoles import DIPOLE_COLUMNS, DipoleFitConfig, DipoleFitMeasurement


@pytest.fixture(scope="module")
def small(field_factory: Callable[..., Any]) -> Any:
    # Three bright 1-px dipoles far apart.
    return field_factory(seed=5, x=[15.3, 40.3, 62.3], y=[20.3, 52.3, 25.3],
                         science_flux=20000.0, template_flux=20000.0, shift=(1.0, 0.0),
                         shape=(72, 80))


def _run(inputs: skydiff.MeasurementInputs, **config: Any) -> skydiff.MeasurementResult:
    return DipoleFitMeasurement(DipoleFitConfig(**config)).run(inputs)


def test_columns_and_types(small: Any) -> None:
    result = _run(small.inputs())
    assert result.columns.colnames == list(DIPOLE_COLUMNS)
    assert not result.columns["dipole_fit_flag"].any()
    for name in DIPOLE_COLUMNS:
        kind = result.columns[name].dtype.kind
        assert kind == ("b" if name.endswith("flag") else
                        "i" if name in ("dipole_n_data", "dipole_dof") else "f"), name


def test_sky_sources(small: Any) -> None:
    catalog = small.catalog.copy()
    catalog["sky_source"][1] = True
    flags = _run(small.inputs(catalog=catalog)).columns["dipole_fit_flag"]
    assert flags.tolist() == [False, True, False]
    assert not _run(small.inputs(catalog=catalog), fit_all=True).columns[
        "dipole_fit_flag"].any()


def test_missing_peaks(small: Any) -> None:
    catalog = small.catalog.copy()
    catalog["neg_peak_x"][0] = np.nan
    flags = _run(small.inputs(catalog=catalog)).columns["dipole_fit_flag"]
    assert flags.tolist() == [True, False, False]
    # fit_all: the missing negative peak is replaced by the faintest difference pixel
    with_all = _run(small.inputs(catalog=catalog), fit_all=True).columns
    assert not with_all["dipole_fit_flag"].any()
    assert abs(with_all["dipole_separation"][0] - 1.0) < 0.2


def test_catalog_without_peak_columns(small: Any) -> None:
    catalog = small.catalog.copy()
    catalog.remove_columns(["pos_peak_x", "pos_peak_y", "neg_peak_x", "neg_peak_y"])
    result = _run(small.inputs(catalog=catalog))
    assert result.columns["dipole_fit_flag"].all()
    assert np.isnan(result.columns["dipole_pos_flux"]).all()
    assert result.metadata["n_candidates"] == 0
    fitted = _run(small.inputs(catalog=catalog), fit_all=True).columns
    assert not fitted["dipole_fit_flag"].any()
    assert np.all(np.abs(fitted["dipole_separation"] - 1.0) < 0.2)


def test_footprint_area_limit(small: Any) -> None:
    area = int(small.catalog["footprint_area"][0])
    flags = _run(small.inputs(), max_footprint_area=area - 1).columns["dipole_fit_flag"]
    assert flags.all()
    assert not _run(small.inputs(), max_footprint_area=area).columns["dipole_fit_flag"].any()


def test_without_footprints(small: Any) -> None:
    # No label image: the fit box is drawn around the catalog position and the peaks.
    inputs = skydiff.MeasurementInputs(catalog=small.catalog, difference=small.difference,
                                       footprints=None, science=small.science,
                                       template=small.template)
    table = _run(inputs).columns
    assert not table["dipole_fit_flag"].any()
    assert np.all(np.abs(table["dipole_separation"] - 1.0) < 0.1)


def test_without_psf(small: Any) -> None:
    inputs = skydiff.MeasurementInputs(catalog=small.catalog,
                                       difference=small.difference.evolve(psf=None),
                                       footprints=small.footprints, science=small.science,
                                       template=small.template)
    result = _run(inputs)
    assert result.columns["dipole_fit_flag"].all()
    assert result.metadata["has_psf"] is False


def test_masked_pixels_are_left_out(small: Any) -> None:
    reference = _run(small.inputs()).columns
    mask = np.zeros(small.difference.shape, dtype=bool)
    row, col = round(float(small.catalog["y"][0])), round(float(small.catalog["x"][0]))
    mask[row - 1:row + 2, col + 3] = True  # three pixels in the first source's box
    difference = small.difference.with_mask("BAD", mask)
    image = np.array(difference.image)
    image[mask] = 1e6  # garbage under the mask must not matter
    difference = difference.evolve(image=image)
    inputs = skydiff.MeasurementInputs(catalog=small.catalog, difference=difference,
                                       footprints=small.footprints, science=small.science,
                                       template=small.template)
    table = _run(inputs).columns
    assert table["dipole_n_data"][0] == reference["dipole_n_data"][0] - 3
    assert table["dipole_n_data"][1] == reference["dipole_n_data"][1]
    assert abs(table["dipole_separation"][0] - 1.0) < 0.1


def test_source_off_image(small: Any) -> None:
    catalog = small.catalog.copy()
    for name in ("x", "pos_peak_x", "neg_peak_x"):
        catalog[name][2] = 500.0
    result = _run(skydiff.MeasurementInputs(catalog=catalog, difference=small.difference,
                                            footprints=None, science=small.science,
                                            template=small.template))
    assert result.columns["dipole_fit_flag"].tolist() == [False, False, True]


def test_empty_catalog(small: Any) -> None:
    result = _run(small.inputs(catalog=small.catalog[:0]))
    assert len(result.columns) == 0
    assert result.columns.colnames == list(DIPOLE_COLUMNS)


def test_inputs_not_modified(small: Any) -> None:
    catalog = small.catalog.copy()
    before = catalog.copy()
    _run(small.inputs(catalog=catalog))
    assert catalog.colnames == before.colnames
    assert all(np.array_equal(catalog[c], before[c], equal_nan=True)
               for c in catalog.colnames if catalog[c].dtype.kind == "f")


@pytest.mark.parametrize("case", ["not_inputs", "difference", "science", "shape",
                                  "footprints", "no_x", "existing"])
def test_bad_inputs(small: Any, case: str) -> None:
    inputs: Any
    if case == "not_inputs":
        inputs = small.difference
    elif case == "difference":
        inputs = skydiff.MeasurementInputs(catalog=small.catalog,
                                           difference=np.zeros((72, 80)))  # type: ignore[arg-type]
    elif case == "science":
        inputs = skydiff.MeasurementInputs(catalog=small.catalog, difference=small.difference,
                                           science=np.zeros((72, 80)))  # type: ignore[arg-type]
    elif case == "shape":
        inputs = skydiff.MeasurementInputs(
            catalog=small.catalog, difference=small.difference,
            template=small.template.cutout(slice(0, 40), slice(0, 40)))
    elif case == "footprints":
        inputs = skydiff.MeasurementInputs(catalog=small.catalog, difference=small.difference,
                                           footprints=np.zeros((3, 3), dtype=np.int32))
    elif case == "no_x":
        catalog = small.catalog.copy()
        catalog.remove_column("x")
        inputs = small.inputs(catalog=catalog)
    else:
        catalog = Table(small.catalog, copy=True)
        catalog["dipole_sn"] = 1.0
        inputs = small.inputs(catalog=catalog)
    with pytest.raises(skydiff.InputError):
        DipoleFitMeasurement().run(inputs)
