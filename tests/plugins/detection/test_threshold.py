"""Behaviour of the ``threshold`` detector: catalog contract, polarity, merging, masks, inputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import scipy.signal

import skydiff
from skydiff_plugins.detection import (
    CATALOG_COLUMNS,
    ThresholdDetector,
    ThresholdDetectorConfig,
)

SHAPE = (160, 160)


def _run(exposure: skydiff.Exposure, **options: Any) -> skydiff.DetectionResult:
    return ThresholdDetector(ThresholdDetectorConfig(**options)).run(exposure)


def test_catalog_contract(helpers: Any) -> None:
    x = np.array([30.2, 80.0, 120.7, 50.0, 130.0])
    y = np.array([40.0, 90.4, 30.0, 130.0, 120.0])
    flux = helpers.optimal_flux(1.0) * np.array([12.0, 40.0, -25.0, 8.0, -60.0])
    exposure = helpers.make_difference(SHAPE, seed=1, x=x, y=y, flux=flux)
    result = _run(exposure)
    catalog = result.catalog
    assert catalog.colnames == [name for name, _ in CATALOG_COLUMNS]
    for name, dtype in CATALOG_COLUMNS:
        assert catalog[name].dtype == np.dtype(dtype), name
    n = len(catalog)
    assert n == 5
    assert list(catalog["id"]) == list(range(1, n + 1))
    significance = np.abs(np.asarray(catalog["significance"]))
    assert np.all(np.diff(significance) <= 0)  # sorted by decreasing |significance|
    # every source found once, with the sign of its flux
    matched = helpers.match(catalog, x, y)
    assert sorted(matched) == list(range(n))
    assert np.array_equal(np.asarray(catalog["is_negative"])[matched], flux < 0)
    assert np.array_equal(np.sign(np.asarray(catalog["significance"])[matched]),
                          np.sign(flux))
    # the label image: int32, ids of the catalog, each footprint holds its peak
    footprints = result.footprints
    assert footprints.dtype == np.int32 and footprints.shape == SHAPE
    assert set(np.unique(footprints)) == set(range(n + 1))
    rows, cols = np.asarray(catalog["y"], int), np.asarray(catalog["x"], int)
    assert np.array_equal(footprints[rows, cols], np.asarray(catalog["id"]))
    assert np.array_equal(np.bincount(footprints.ravel(), minlength=n + 1)[1:],
                          np.asarray(catalog["footprint_area"]))
    assert np.all(np.asarray(catalog["n_peaks"]) >= 1)
    # peak_value is the background-subtracted image at the peak
    assert result.background is not None
    expected_peak = exposure.image[rows, cols] - result.background[rows, cols]
    assert np.allclose(catalog["peak_value"], expected_peak, rtol=1e-6, atol=1e-6)
    # metadata
    metadata = result.metadata
    assert metadata["n_sources"] == n and metadata["threshold"] == 5.0
    assert metadata["n_positive"] == 3 and metadata["n_negative"] == 2
    assert metadata["n_merged"] == 0 and metadata["n_rejected_masked"] == 0
    # the matched-filter noise of unit white noise is sqrt(sum P^2) = 1/sqrt(NEA)
    kernel = skydiff.GaussianPsf.from_fwhm(3.0).kernel_image()
    assert metadata["noise"] == pytest.approx(math.sqrt(float((kernel**2).sum())), rel=1e-4)


def test_empty_field_gives_empty_catalog(helpers: Any) -> None:
    # 160 x 160 pixels of white noise: the expected number of 5-sigma excursions of the
    # PSF-filtered field is 2 A lambda_2 u exp(-u^2/2) / (2 pi)^1.5 ~ 0.02: none.
    exposure = helpers.make_difference(SHAPE, seed=2)
    result = _run(exposure)
    assert len(result.catalog) == 0
    assert result.catalog.colnames == [name for name, _ in CATALOG_COLUMNS]
    for name, dtype in CATALOG_COLUMNS:
        assert result.catalog[name].dtype == np.dtype(dtype), name
    assert result.footprints.dtype == np.int32 and not result.footprints.any()
    assert result.metadata["n_sources"] == 0
    # a blank image with a variance plane: nothing either, and no error
    blank = exposure.evolve(image=np.zeros(SHAPE, np.float32))
    assert len(_run(blank).catalog) == 0


def test_all_pixels_without_data(helpers: Any) -> None:
    exposure = helpers.make_difference((64, 64), seed=3)
    no_data = np.full((64, 64), exposure.mask_planes.value("NO_DATA"), np.uint32)
    result = _run(exposure.evolve(mask=no_data))
    assert len(result.catalog) == 0 and not result.footprints.any()


def test_input_errors(helpers: Any) -> None:
    with pytest.raises(skydiff.InputError):
        ThresholdDetector().run(np.zeros(SHAPE, np.float32))  # type: ignore[arg-type]
    without_psf = helpers.make_difference(SHAPE, seed=4, psf=False)
    with pytest.raises(skydiff.InputError, match="PSF"):
        ThresholdDetector().run(without_psf)
    # a score image needs no PSF (it is not smoothed again)
    assert len(ThresholdDetector().run(without_psf, is_score=True).catalog) == 0
    # a variance plane without any positive value gives no noise to threshold against
    no_variance = without_psf.evolve(variance=np.zeros(SHAPE, np.float32))
    with pytest.raises(skydiff.InputError, match="variance"):
        ThresholdDetector().run(no_variance, is_score=True)


def test_negative_source(helpers: Any) -> None:
    flux = -helpers.optimal_flux(20.0)
    exposure = helpers.make_difference(SHAPE, seed=5, x=[70.3], y=[88.6], flux=[flux])
    catalog = _run(exposure).catalog
    assert len(catalog) == 1
    row = catalog[0]
    assert row["is_negative"] and row["significance"] < -15
    assert (row["x"], row["y"]) == (70.0, 89.0)
    assert (row["neg_peak_x"], row["neg_peak_y"]) == (70.0, 89.0)
    assert math.isnan(row["pos_peak_x"]) and math.isnan(row["pos_peak_y"])
    assert row["peak_value"] < 0
    # polarity "positive" ignores it
    assert len(_run(exposure, polarity="positive").catalog) == 0


def test_dipole_is_one_merged_footprint(helpers: Any) -> None:
    # lobes 4 pixels apart (1.3 FWHM): their grown footprints overlap
    flux = helpers.optimal_flux(25.0)
    exposure = helpers.make_difference(SHAPE, seed=6, x=[78.0, 82.0], y=[80.0, 80.0],
                                       flux=[flux, -flux])
    result = _run(exposure)
    catalog = result.catalog
    assert len(catalog) == 1
    row = catalog[0]
    assert not row["is_negative"]
    assert row["n_peaks"] >= 2
    for key in ("pos_peak_x", "pos_peak_y", "neg_peak_x", "neg_peak_y"):
        assert math.isfinite(row[key])
    assert row["pos_peak_x"] < row["neg_peak_x"]  # positive lobe on the left
    assert abs(row["pos_peak_y"] - 80) <= 1 and abs(row["neg_peak_y"] - 80) <= 1
    assert result.metadata["n_merged"] == 1
    # each polarity alone gives one footprint of its sign
    positive = _run(exposure, polarity="positive").catalog
    negative = _run(exposure, polarity="negative").catalog
    assert len(positive) == len(negative) == 1
    assert not positive[0]["is_negative"] and negative[0]["is_negative"]
    # the merge comes from growing: the thresholded lobes alone are two footprints
    ungrown = _run(exposure, grow_radius=0.0)
    assert len(ungrown.catalog) == 2 and ungrown.metadata["n_merged"] == 0
    assert sorted(ungrown.catalog["is_negative"]) == [False, True]


@pytest.mark.parametrize("plane", ["SAT", "NO_DATA", "EDGE", "BAD"])
def test_masked_centre_is_rejected(helpers: Any, plane: str) -> None:
    flux = helpers.optimal_flux(30.0)
    x, y = np.array([50.0, 110.0]), np.array([80.0, 80.0])
    exposure = helpers.make_difference(SHAPE, seed=7, x=x, y=y, flux=[flux, flux])
    mask = np.zeros(SHAPE, np.uint32)
    mask[79:82, 49:52] = exposure.mask_planes.value(plane)  # 3 x 3 centre of the first
    result = _run(exposure.evolve(mask=mask))
    catalog = result.catalog
    assert len(catalog) == 1
    assert (catalog[0]["x"], catalog[0]["y"]) == (110.0, 80.0)  # the unmasked twin
    assert result.metadata["n_rejected_masked"] == 1
    assert not result.footprints[75:86, 45:56].any()  # its footprint is removed too
    # a plane that is not in bad_planes does not reject
    kept = _run(exposure.evolve(mask=mask), bad_planes=["GHOST"], ignore_planes=[])
    assert len(kept.catalog) == 2 and kept.metadata["n_rejected_masked"] == 0


def test_planes_absent_from_the_exposure_are_ignored(helpers: Any) -> None:
    planes = skydiff.MaskPlanes.from_header({"MP_BAD": 0, "MP_EDGE": 1})
    flux = helpers.optimal_flux(30.0)
    base = helpers.make_difference(SHAPE, seed=8, x=[80.0], y=[80.0], flux=[flux])
    exposure = base.evolve(mask=np.zeros(SHAPE, np.uint32), mask_planes=planes)
    result = _run(exposure)  # SAT and NO_DATA are not planes of this exposure
    assert len(result.catalog) == 1


def test_nan_and_no_data_pixels_never_create_detections(helpers: Any) -> None:
    flux = helpers.optimal_flux(30.0)
    exposure = helpers.make_difference(SHAPE, seed=9, x=[120.0], y=[120.0], flux=[flux])
    image = exposure.image.copy()
    mask = np.zeros(SHAPE, np.uint32)
    image[20:60, 20:60] = np.nan  # a block of NaN
    rng = np.random.default_rng(10)
    scattered = rng.integers(0, SHAPE[0] * SHAPE[1], 200)
    image.reshape(-1)[scattered] = np.nan  # scattered NaN pixels
    image[100:104, 10:40] = 1e6  # garbage under NO_DATA
    mask[100:104, 10:40] = exposure.mask_planes.value("NO_DATA")
    variance = exposure.variance.copy()
    variance[70:74, 70:90] = np.nan  # NaN variance
    image[70:74, 70:90] = 50.0
    dirty = exposure.evolve(image=image, mask=mask, variance=variance)
    result = _run(dirty)
    catalog = result.catalog
    assert len(catalog) == 1 and (catalog[0]["x"], catalog[0]["y"]) == (120.0, 120.0)
    for config in ({"subtract_background": False}, {"polarity": "negative"},
                   {"threshold": 3.0}):
        others = _run(dirty, **config).catalog
        bad = (np.hypot(np.asarray(others["x"]) - 120, np.asarray(others["y"]) - 120) > 5)
        # the only detections allowed are noise at the lowered threshold, away from the
        # defects (which would give hundreds of sigma)
        assert np.all(np.abs(np.asarray(others["significance"])[bad]) < 5.0), config


def test_footprints_grow_with_the_radius(helpers: Any) -> None:
    flux = helpers.optimal_flux(15.0)
    exposure = helpers.make_difference(SHAPE, seed=11, x=[80.0], y=[80.0], flux=[flux])
    areas = [int(_run(exposure, grow_radius=radius).catalog[0]["footprint_area"])
             for radius in (0.0, 2.0, 5.0)]
    assert areas[0] < areas[1] < areas[2]
    # growing a disk-like footprint of radius r0 by r gives ~pi (r0 + r)^2
    r0 = math.sqrt(areas[0] / math.pi)
    assert areas[2] == pytest.approx(math.pi * (r0 + 5.0) ** 2, rel=0.15)
    default = _run(exposure)
    sigma = 3.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    assert default.metadata["grow_radius"] == pytest.approx(2.4 * sigma)


def test_score_image_is_not_smoothed_again(helpers: Any) -> None:
    # A likelihood image made by hand: the difference correlated with its PSF, with the
    # variance of that correlation (sigma^2 sum P^2). Detecting on it with is_score=True
    # must reproduce the detection of the difference itself (same peaks, same
    # significance), while smoothing it a second time would change the significance.
    x = np.array([40.0, 100.5, 120.0])
    y = np.array([50.0, 60.0, 120.3])
    flux = helpers.optimal_flux(1.0) * np.array([12.0, -20.0, 9.0])
    difference = helpers.make_difference(SHAPE, seed=12, x=x, y=y, flux=flux)
    kernel = skydiff.GaussianPsf.from_fwhm(3.0).kernel_image()
    score = scipy.signal.correlate(difference.image.astype(np.float64), kernel, mode="same")
    score_variance = np.full(SHAPE, float((kernel**2).sum()), np.float32)
    score_exposure = skydiff.Exposure(score.astype(np.float32), variance=score_variance)
    direct = ThresholdDetector(ThresholdDetectorConfig(subtract_background=False))
    from_score = direct.run(score_exposure, is_score=True)
    from_difference = direct.run(difference, is_score=False)
    assert len(from_score.catalog) == len(from_difference.catalog) == 3
    for name in ("x", "y", "is_negative"):
        assert np.array_equal(from_score.catalog[name], from_difference.catalog[name])
    assert np.allclose(from_score.catalog["significance"],
                       from_difference.catalog["significance"], atol=1e-3)
    rows = np.asarray(from_score.catalog["y"], int)
    cols = np.asarray(from_score.catalog["x"], int)
    expected = score[rows, cols] / np.sqrt(score_variance[rows, cols])
    assert np.allclose(from_score.catalog["significance"], expected, rtol=1e-5)
    # the same image treated as a difference is smoothed again: the significance changes
    # (with the variance plane taken at its word; the measured noise calibration sees the
    # correlated pixels of the score and rescales, see test_calibration)
    twice = ThresholdDetector(ThresholdDetectorConfig(subtract_background=False,
                                                      noise_calibration="variance"))
    smoothed_twice = twice.run(score_exposure.evolve(psf=difference.psf), is_score=False)
    assert not np.allclose(smoothed_twice.catalog["significance"][:3],
                           from_score.catalog["significance"], rtol=0.05)
    assert from_score.cosmic_rays is None  # no cosmic-ray search on a score image


def test_metadata_and_task_metadata(helpers: Any) -> None:
    exposure = helpers.make_difference(SHAPE, seed=13, x=[80.0], y=[80.0],
                                       flux=[helpers.optimal_flux(20.0)])
    detector = ThresholdDetector()
    result = detector.run(exposure)
    for key in ("threshold", "n_positive", "n_negative", "n_merged", "n_rejected_masked",
                "n_cosmic_rays", "noise", "n_rejected_cosmic_rays", "grow_radius",
                "n_masked_cosmic_rays", "noise_calibration", "significance_scale",
                "significance_scale_measured", "significance_scale_error",
                "significance_scale_pixels"):
        assert key in result.metadata
    assert detector.metadata["n_sources"] == 1
    assert detector.metadata["run.wall_s"] > 0
    assert _run(exposure, subtract_background=False).background is None
