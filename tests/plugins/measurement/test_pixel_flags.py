"""``pixel_flags``: mask planes in the footprint (or a 5x5 box) and in the 3x3 centre."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff_plugins.measurement import PixelFlagsMeasurement

PLANES = ["bad", "sat", "cr", "edge", "no_data", "intrp", "suspect", "sat_template"]


def _scene() -> tuple[skydiff.Exposure, Table, np.ndarray]:
    shape = (60, 60)
    rows, cols = np.indices(shape)
    x = np.array([15.0, 40.0, 15.0, 40.0, -5.0, 3.2])
    y = np.array([15.0, 15.0, 40.0, 40.0, 10.0, 30.0])
    ids = np.arange(1, 7, dtype=np.int64)
    footprints = np.zeros(shape, dtype=np.int32)
    for k in (0, 1, 2, 5):  # source 4 (index 3) has no footprint, source 5 is off the image
        footprints[(rows - y[k]) ** 2 + (cols - x[k]) ** 2 <= 16] = ids[k]
    planes = skydiff.MaskPlanes.default()
    mask = np.zeros(shape, dtype=np.uint32)

    def put(plane: str, row: int, col: int) -> None:
        mask[row, col] |= np.uint32(1 << planes.bit(plane))

    put("SAT", 15, 15)  # centre of source 1
    put("CR", 15, 43)  # 3 px right of source 2: footprint, not centre
    put("INTRP", 40, 16)  # next to the centre of source 3 (a sky source with a disk)
    put("BAD", 42, 42)  # inside the 5x5 box of source 4 (no footprint), outside its 3x3 centre
    put("SUSPECT", 40, 43)  # outside that 5x5 box
    mask[:, :2] |= np.uint32(1 << planes.bit("EDGE"))  # columns 0-1: footprint of source 6 only
    put("SAT_TEMPLATE", 31, 4)  # in the centre of source 6
    exposure = skydiff.Exposure.from_arrays(np.zeros(shape, np.float32), mask=mask,
                                            mask_planes=planes,
                                            variance=np.ones(shape, np.float32))
    catalog = Table({"id": ids, "x": x, "y": y,
                     "sky_source": np.array([False, False, True, True, False, False])})
    return exposure, catalog, footprints


def test_columns_in_order() -> None:
    exposure, catalog, footprints = _scene()
    inputs = skydiff.MeasurementInputs(catalog=catalog, difference=exposure,
                                       footprints=footprints)
    columns = PixelFlagsMeasurement().run(inputs).columns
    expected = [name for plane in PLANES for name in (f"flag_{plane}", f"flag_{plane}_center")]
    assert columns.colnames == [*expected, "off_image", "pixel_flags_flag"]
    assert all(columns[name].dtype == bool for name in columns.colnames)


def test_footprint_box_and_centre_flags() -> None:
    exposure, catalog, footprints = _scene()
    inputs = skydiff.MeasurementInputs(catalog=catalog, difference=exposure,
                                       footprints=footprints)
    columns = PixelFlagsMeasurement().run(inputs).columns
    expected_any = {
        "sat": [True, False, False, False, False, False],
        "cr": [False, True, False, False, False, False],
        "intrp": [False, False, True, False, False, False],
        "bad": [False, False, False, True, False, False],
        "suspect": [False] * 6,
        "edge": [False, False, False, False, False, True],
        "sat_template": [False, False, False, False, False, True],
        "no_data": [False] * 6,
    }
    expected_center = {
        "sat": [True, False, False, False, False, False],
        "cr": [False] * 6,
        "intrp": [False, False, True, False, False, False],
        "bad": [False] * 6,
        "suspect": [False] * 6,
        "edge": [False] * 6,
        "sat_template": [False, False, False, False, False, True],
        "no_data": [False] * 6,
    }
    for plane in PLANES:
        np.testing.assert_array_equal(columns[f"flag_{plane}"], expected_any[plane],
                                      err_msg=plane)
        np.testing.assert_array_equal(columns[f"flag_{plane}_center"], expected_center[plane],
                                      err_msg=plane)
    np.testing.assert_array_equal(columns["off_image"], [False] * 4 + [True, False])
    np.testing.assert_array_equal(columns["pixel_flags_flag"], columns["off_image"])


def test_without_footprints_the_box_is_used() -> None:
    exposure, catalog, _ = _scene()
    inputs = skydiff.MeasurementInputs(catalog=catalog, difference=exposure)
    columns = PixelFlagsMeasurement().run(inputs).columns
    # the CR 3 px from source 2 is outside its 5x5 box; the EDGE columns are 2-3 px from
    # source 6 (box columns 1-5): inside
    np.testing.assert_array_equal(columns["flag_cr"], [False] * 6)
    np.testing.assert_array_equal(columns["flag_edge"], [False] * 5 + [True])
    np.testing.assert_array_equal(columns["flag_bad"], [False, False, False, True, False, False])


def test_custom_planes_and_missing_planes() -> None:
    exposure, catalog, footprints = _scene()
    config = PixelFlagsMeasurement.ConfigClass(planes=["SAT", "NOT_A_PLANE"])
    inputs = skydiff.MeasurementInputs(catalog=catalog, difference=exposure,
                                       footprints=footprints)
    columns = PixelFlagsMeasurement(config).run(inputs).columns
    assert columns.colnames == ["flag_sat", "flag_sat_center", "flag_not_a_plane",
                                "flag_not_a_plane_center", "off_image", "pixel_flags_flag"]
    assert not columns["flag_not_a_plane"].any()
    with pytest.raises(skydiff.ConfigError):
        PixelFlagsMeasurement(PixelFlagsMeasurement.ConfigClass(center_size=4))


def test_bad_footprints_raise() -> None:
    exposure, catalog, _ = _scene()
    inputs = skydiff.MeasurementInputs(catalog=catalog, difference=exposure,
                                       footprints=np.zeros((5, 5), np.int32))
    with pytest.raises(skydiff.InputError):
        PixelFlagsMeasurement().run(inputs)
