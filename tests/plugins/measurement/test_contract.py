"""The contract every measurement plugin keeps (SPEC "Measurement"): names, orders, rows,
new columns only, a bool flag, untouched inputs, InputError for wrong types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import astropy.units as u
import numpy as np
import pytest
from astropy.table import MaskedColumn, Table

import skydiff
import skydiff_plugins.measurement as measurement_plugins
from skydiff_plugins.measurement import (
    ApertureFluxMeasurement,
    CentroidMeasurement,
    ForcedPsfMeasurement,
    PixelFlagsMeasurement,
    PsfFluxMeasurement,
    ShapeMeasurement,
)

PLUGINS = {
    CentroidMeasurement: 0.0,
    PixelFlagsMeasurement: 1.0,
    PsfFluxMeasurement: 2.0,
    ApertureFluxMeasurement: 2.0,
    ShapeMeasurement: 2.0,
    ForcedPsfMeasurement: 4.0,
}


def test_registered_names_and_orders() -> None:
    # The hook registers exactly these classes with the measurement registry (the full
    # registry round trip is the conformance suite's check_registration).
    added: list[type] = []

    class Recorder:
        def add(self, cls: type) -> None:
            added.append(cls)

    class FakeRegistries:
        measurement = Recorder()

    measurement_plugins.skydiff_register_algorithms(FakeRegistries())  # type: ignore[arg-type]
    assert added == list(PLUGINS)
    names = [cls.name for cls in added]
    assert names == ["centroid", "pixel_flags", "psf_flux", "aperture_flux", "shape",
                     "forced_psf"]
    for cls, order in PLUGINS.items():
        assert cls.order == order
        assert issubclass(cls, skydiff.Measurement)


@pytest.mark.parametrize("cls", list(PLUGINS), ids=lambda c: c.name)
def test_rows_columns_and_purity(cls: type[skydiff.Measurement],
                                 scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=9, shape=(120, 120), spacing=30)
    catalog = scene.catalog.copy()
    catalog.add_row(catalog[0])
    catalog["x"][-1] = 500.0  # off the image
    before = catalog.copy()
    inputs = scene.inputs(catalog, science=scene.exposure, template=scene.exposure)
    result = cls().run(inputs)
    columns = result.columns
    assert len(columns) == len(catalog)
    assert not set(columns.colnames) & set(catalog.colnames)
    flag = f"{cls.name}_flag"
    assert columns.colnames[-1] == flag and columns[flag].dtype == bool
    assert columns[flag][-1]  # the off-image source cannot be measured
    for name in columns.colnames[:-1]:
        assert columns[name].dtype in (np.float64, np.bool_), name
    assert all(np.array_equal(catalog[c], before[c], equal_nan=catalog[c].dtype.kind == "f")
               for c in catalog.colnames)
    assert catalog.colnames == before.colnames
    assert result.metadata["n_sources"] == len(catalog)


@pytest.mark.parametrize("cls", list(PLUGINS), ids=lambda c: c.name)
def test_empty_catalog_and_quantity_columns(cls: type[skydiff.Measurement],
                                            scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=9, shape=(120, 120), spacing=30)
    empty = cls().run(scene.inputs(scene.catalog[:0], science=scene.exposure))
    assert len(empty.columns) == 0 and f"{cls.name}_flag" in empty.columns.colnames
    # positions with units and a masked entry (as read from an ECSV with units)
    catalog = Table({"id": scene.catalog["id"],
                     "x": np.asarray(scene.truth["x"]) * u.pix,
                     "y": MaskedColumn(np.asarray(scene.truth["y"]),
                                       mask=np.arange(len(scene.truth)) == 0, unit="pix")})
    columns = cls().run(scene.inputs(catalog, science=scene.exposure,
                                     template=scene.exposure)).columns
    flag = np.asarray(columns[f"{cls.name}_flag"])
    assert flag[0]
    if cls is not PixelFlagsMeasurement:  # masks are empty: nothing to flag there
        assert not flag[1:].any()


@pytest.mark.parametrize("cls", list(PLUGINS), ids=lambda c: c.name)
def test_wrong_types_raise_input_error(cls: type[skydiff.Measurement],
                                       scene_factory: Callable[..., Any]) -> None:
    scene = scene_factory(seed=9, shape=(120, 120), spacing=30)
    bad_inputs: list[Any] = [
        scene.exposure,
        skydiff.MeasurementInputs(catalog=scene.catalog, difference=np.zeros((4, 4))),  # type: ignore[arg-type]
        skydiff.MeasurementInputs(catalog={"x": [1.0]}, difference=scene.exposure),  # type: ignore[arg-type]
        skydiff.MeasurementInputs(catalog=Table({"a": [1.0]}), difference=scene.exposure),
        skydiff.MeasurementInputs(catalog=scene.catalog, difference=scene.exposure,
                                  template="template.fits"),  # type: ignore[arg-type]
    ]
    for inputs in bad_inputs:
        with pytest.raises(skydiff.InputError):
            cls().run(inputs)
