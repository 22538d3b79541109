"""Tests of skydiff.detect: the detect-and-measure orchestration, with fake plugins.

Every plugin here is a small fake registered under the contract's names through a private
plugin manager (``skydiff.use_manager``), so these tests do not depend on the built-in
detection, measurement and classification plugins. The fakes are deliberately transparent
(e.g. the fake centroid is the detection peak plus a configured shift) so the orchestration
can be checked exactly.
"""

from __future__ import annotations

import json
import logging
import math
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

import skydiff
from skydiff.detect import (
    CATALOG_COLUMNS,
    DEFAULT_MEASUREMENTS,
    DetectAndMeasureConfig,
    DetectAndMeasureResult,
    DetectAndMeasureTask,
    detect_and_measure,
    place_sky_sources,
)
from skydiff.errors import ConfigError, InputError

SIGMA = 1.5  # PSF sigma of the fake images, pixels
SHAPE = (128, 128)

# --------------------------------------------------------------------------------------------
# fake plugins


@skydiff.configclass
class FakeDetectionConfig(skydiff.Config):
    threshold: float = skydiff.Field(5.0, doc="Pixel S/N threshold.")
    background: float = skydiff.Field(0.0, doc="Constant background reported and removed.")
    cr_level: float = skydiff.Field(math.inf, doc="Pixels above this are cosmic rays.")


class FakeThreshold(skydiff.Detector):
    """Pixel thresholding at +-threshold sigma, 8-connected footprints (a fake)."""

    name = "threshold"
    ConfigClass = FakeDetectionConfig

    def run(self, image: skydiff.Exposure, *, is_score: bool = False) -> skydiff.DetectionResult:
        cfg = self.config
        data = np.asarray(image.image, dtype=np.float64) - cfg.background
        snr = data / np.sqrt(np.asarray(image.variance, dtype=np.float64))
        pos, neg = snr > cfg.threshold, snr < -cfg.threshold
        labels, n = ndimage.label(pos | neg, structure=np.ones((3, 3)))
        rows = []
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            inside = labels[region] == index
            local = np.where(inside, snr[region], 0.0)
            r0, c0 = region[0].start, region[1].start
            peak = np.unravel_index(np.argmax(np.abs(local)), local.shape)
            has_pos, has_neg = local.max() > cfg.threshold, local.min() < -cfg.threshold
            pmax = np.unravel_index(np.argmax(local), local.shape)
            pmin = np.unravel_index(np.argmin(local), local.shape)
            rows.append({
                "x": float(c0 + peak[1]), "y": float(r0 + peak[0]),
                "peak_value": float(data[r0 + peak[0], c0 + peak[1]]),
                "significance": float(local[peak]), "is_negative": bool(not has_pos),
                "footprint_area": int(inside.sum()), "n_peaks": int(has_pos) + int(has_neg),
                "pos_peak_x": float(c0 + pmax[1]) if has_pos else np.nan,
                "pos_peak_y": float(r0 + pmax[0]) if has_pos else np.nan,
                "neg_peak_x": float(c0 + pmin[1]) if has_neg else np.nan,
                "neg_peak_y": float(r0 + pmin[0]) if has_neg else np.nan,
                "label": index})
        rows.sort(key=lambda row: -abs(row["significance"]))
        lookup = np.zeros(n + 1, dtype=np.int32)
        for new_id, row in enumerate(rows, start=1):
            lookup[row.pop("label")] = new_id
        names = ["x", "y", "peak_value", "significance", "is_negative", "footprint_area",
                 "n_peaks", "pos_peak_x", "pos_peak_y", "neg_peak_x", "neg_peak_y"]
        catalog = Table({"id": np.arange(1, len(rows) + 1, dtype=np.int64)})
        for key in names:
            dtype = {"is_negative": bool, "footprint_area": np.int64, "n_peaks": np.int64}.get(
                key, np.float64)
            catalog[key] = np.array([row[key] for row in rows], dtype=dtype)
        cosmic = (data > cfg.cr_level) if math.isfinite(cfg.cr_level) else None
        background = (np.full(image.shape, cfg.background, dtype=np.float32)
                      if cfg.background else None)
        return skydiff.DetectionResult(
            catalog=catalog, footprints=lookup[labels], background=background,
            cosmic_rays=cosmic, metadata={"threshold": cfg.threshold, "noise": 1.0,
                                          "is_score": is_score})


class FakeBadDetector(skydiff.Detector):
    """Returns footprints of the wrong shape (a broken plugin)."""

    name = "bad_shape"
    ConfigClass = skydiff.Config

    def run(self, image: skydiff.Exposure, *, is_score: bool = False) -> skydiff.DetectionResult:
        return skydiff.DetectionResult(catalog=Table({"id": [], "x": [], "y": []}),
                                       footprints=np.zeros((3, 3), dtype=np.int32))


@skydiff.configclass
class CentroidConfig(skydiff.Config):
    dx: float = skydiff.Field(0.25, doc="Shift added to x.")
    dy: float = skydiff.Field(-0.5, doc="Shift added to y.")
    flag_ids: tuple[int, ...] = skydiff.ListField((), dtype=int, doc="Ids to flag.")
    nan_ids: tuple[int, ...] = skydiff.ListField((), dtype=int, doc="Ids with NaN output.")


class FakeCentroid(skydiff.Measurement):
    """The detection peak plus a configured shift (a fake)."""

    name = "centroid"
    order: ClassVar[float] = 0.0
    ConfigClass = CentroidConfig

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        cat = inputs.catalog
        ids = np.asarray(cat["id"])
        cx = np.asarray(cat["x"], dtype=float) + self.config.dx
        cy = np.asarray(cat["y"], dtype=float) + self.config.dy
        nan = np.isin(ids, self.config.nan_ids)
        cx[nan] = np.nan
        columns = Table({"centroid_x": cx, "centroid_y": cy,
                         "centroid_x_err": np.full(len(cat), 0.1),
                         "centroid_y_err": np.full(len(cat), 0.1),
                         "centroid_flag": np.isin(ids, self.config.flag_ids)})
        return skydiff.MeasurementResult(columns=columns, metadata={"n": len(cat)})


def _box(inputs: skydiff.MeasurementInputs, image: np.ndarray, half: int = 2) -> np.ndarray:
    """Sum of ``image`` over the (2 half + 1)^2 box at each rounded position (0 off image)."""
    height, width = image.shape
    cat = inputs.catalog
    cols = np.rint(np.asarray(cat["x"], dtype=float)).astype(int)
    rows = np.rint(np.asarray(cat["y"], dtype=float)).astype(int)
    offsets = np.arange(-half, half + 1)
    rr = np.clip(rows[:, None, None] + offsets[None, :, None], 0, height - 1)
    cc = np.clip(cols[:, None, None] + offsets[None, None, :], 0, width - 1)
    return image[rr, cc].reshape(len(cat), (2 * half + 1) ** 2)


class FakePixelFlags(skydiff.Measurement):
    """Centre flags of BAD and EDGE, and off_image (a fake)."""

    name = "pixel_flags"
    order: ClassVar[float] = 1.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        diff = inputs.difference
        cat = inputs.catalog
        x, y = np.asarray(cat["x"], dtype=float), np.asarray(cat["y"], dtype=float)
        off = (x < -0.5) | (y < -0.5) | (x > diff.shape[1] - 0.5) | (y > diff.shape[0] - 0.5)
        columns = Table({"off_image": off})
        for plane in ("BAD", "EDGE"):
            columns[f"flag_{plane.lower()}_center"] = _box(
                inputs, diff.masked(plane).astype(np.int8), half=1).any(axis=1)
        columns["pixel_flags_flag"] = off
        return skydiff.MeasurementResult(columns=columns)


class FakePsfFlux(skydiff.Measurement):
    """Sum over a 7x7 box and its error (a fake PSF flux)."""

    name = "psf_flux"
    order: ClassVar[float] = 2.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        diff = inputs.difference
        flux = _box(inputs, np.asarray(diff.image, dtype=np.float64), half=3).sum(axis=1)
        var = _box(inputs, np.asarray(diff.variance, dtype=np.float64), half=3).sum(axis=1)
        columns = Table({"psf_flux": flux, "psf_flux_err": np.sqrt(var),
                         "psf_chi2dof": np.ones(len(flux)),
                         "psf_flux_flag": np.zeros(len(flux), dtype=bool)})
        return skydiff.MeasurementResult(columns=columns)


@skydiff.configclass
class FailConfig(skydiff.Config):
    fail: bool = skydiff.Field(False, doc="Raise for any non-empty catalog.")


class FakeApertureFlux(skydiff.Measurement):
    """A fake aperture flux that can be told to fail."""

    name = "aperture_flux"
    order: ClassVar[float] = 2.0
    ConfigClass = FailConfig

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        n = len(inputs.catalog)
        if self.config.fail and n:
            msg = "deliberate failure"
            raise RuntimeError(msg)
        flux = _box(inputs, np.asarray(inputs.difference.image, dtype=np.float64)).sum(axis=1)
        columns = Table({"aperture_flux_3_0": flux, "aperture_flux_3_0_err": np.ones(n),
                         "aperture_flux_flag": np.zeros(n, dtype=bool)})
        columns["aperture_flux_3_0"].description = "plugin's own description"
        return skydiff.MeasurementResult(columns=columns)


class FakeShape(skydiff.Measurement):
    name = "shape"
    order: ClassVar[float] = 2.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        n = len(inputs.catalog)
        columns = Table({"shape_xx": np.full(n, SIGMA**2), "shape_yy": np.full(n, SIGMA**2),
                         "shape_xy": np.zeros(n), "shape_flag": np.zeros(n, dtype=bool),
                         "shape_extra_x": np.zeros(n)})
        return skydiff.MeasurementResult(columns=columns)


class FakeDipoleFit(skydiff.Measurement):
    name = "dipole_fit"
    order: ClassVar[float] = 3.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        cat = inputs.catalog
        both = (np.isfinite(np.asarray(cat["pos_peak_x"], dtype=float))
                & np.isfinite(np.asarray(cat["neg_peak_x"], dtype=float)))
        columns = Table({"dipole_sn": np.abs(np.asarray(cat["significance"], dtype=float)),
                         "dipole_separation": np.where(both, 3.0, np.nan),
                         "dipole_orientation": np.where(both, 180.0, np.nan),
                         "dipole_x": np.where(both, 0.5 * (np.asarray(cat["pos_peak_x"])
                                                           + np.asarray(cat["neg_peak_x"])),
                                              np.nan),
                         "dipole_y": np.where(both, 0.5 * (np.asarray(cat["pos_peak_y"])
                                                           + np.asarray(cat["neg_peak_y"])),
                                              np.nan),
                         "dipole_fit_flag": ~both})
        return skydiff.MeasurementResult(columns=columns)


class FakeForcedPsf(skydiff.Measurement):
    name = "forced_psf"
    order: ClassVar[float] = 4.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        n = len(inputs.catalog)
        columns = Table()
        flag = np.zeros(n, dtype=bool)
        for which, exposure in (("science", inputs.science), ("template", inputs.template)):
            if exposure is None:
                columns[f"forced_{which}_flux"] = np.full(n, np.nan)
                flag[:] = True
            else:
                columns[f"forced_{which}_flux"] = _box(
                    inputs, np.asarray(exposure.image, dtype=np.float64), half=3).sum(axis=1)
            columns[f"forced_{which}_flux_err"] = np.ones(n)
        columns["forced_psf_flag"] = flag
        return skydiff.MeasurementResult(columns=columns)


class FakeBadInput(skydiff.Measurement):
    name = "bad_input"
    order: ClassVar[float] = 5.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        msg = "wrong input type"
        raise InputError(msg)


class FakeWrongRows(skydiff.Measurement):
    name = "wrong_rows"
    order: ClassVar[float] = 5.0
    ConfigClass = skydiff.Config

    def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
        n = len(inputs.catalog) + 1
        return skydiff.MeasurementResult(columns=Table({"wrong_rows_flag": np.zeros(n, bool)}))


@skydiff.configclass
class SnConfig(skydiff.Config):
    min_sn: float = skydiff.Field(5.0, doc="S/N above which a fitted dipole is one.")


class FakeSnFluxRatio(skydiff.DipoleClassifier):
    name = "sn_flux_ratio"
    ConfigClass = SnConfig

    def run(self, catalog: Table) -> skydiff.ClassificationResult:
        sn = np.asarray(catalog["dipole_sn"], dtype=float)
        flag = (sn > self.config.min_sn) & ~np.asarray(catalog["dipole_fit_flag"], dtype=bool)
        return skydiff.ClassificationResult(flag=flag, score=sn)


@skydiff.configclass
class AreaConfig(skydiff.Config):
    min_area: int = skydiff.Field(0, doc="Smallest footprint area of a dipole.")


class FakeChi2(skydiff.DipoleClassifier):
    name = "chi2"
    order: ClassVar[float] = 1.0
    ConfigClass = AreaConfig

    def run(self, catalog: Table) -> skydiff.ClassificationResult:
        area = np.asarray(catalog["footprint_area"], dtype=float)
        return skydiff.ClassificationResult(flag=area > self.config.min_area, score=area)


class FakeBrokenClassifier(skydiff.DipoleClassifier):
    name = "broken"
    order: ClassVar[float] = 2.0
    ConfigClass = skydiff.Config

    def run(self, catalog: Table) -> skydiff.ClassificationResult:
        msg = "classifier exploded"
        raise ZeroDivisionError(msg)


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.detection.add(FakeThreshold)
    registries.detection.add(FakeBadDetector)
    for cls in (FakeCentroid, FakePixelFlags, FakePsfFlux, FakeApertureFlux, FakeShape,
                FakeDipoleFit, FakeForcedPsf, FakeBadInput, FakeWrongRows):
        registries.measurement.add(cls)
    for cls in (FakeSnFluxRatio, FakeChi2, FakeBrokenClassifier):
        registries.dipole_classifier.add(cls)


FAKES = types.ModuleType("skydiff_fake_detect_plugins")
FAKES.skydiff_register_algorithms = skydiff_register_algorithms  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def fake_plugins() -> Iterator[skydiff.PluginManager]:
    """A private plugin manager holding only the fakes of this module."""
    with skydiff.use_manager() as manager:
        manager.register(FAKES, name="fakes", distribution="skydiff-fakes", version="0")
        yield manager


# --------------------------------------------------------------------------------------------
# images


def gaussian_sources(shape: tuple[int, int], sources: list[tuple[float, float, float]]
                     ) -> np.ndarray:
    """Sum of unit-sum Gaussian PSFs (sigma SIGMA) of the given (x, y, flux)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = np.zeros(shape)
    for x, y, flux in sources:
        image += flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA**2)) / (
            2 * math.pi * SIGMA**2)
    return image


def make_exposure(sources: list[tuple[float, float, float]], *, seed: int = 1,
                  shape: tuple[int, int] = SHAPE, **kwargs: Any) -> skydiff.Exposure:
    """Unit-variance white noise plus Gaussian sources, with a Gaussian PSF."""
    rng = np.random.default_rng(seed)
    image = gaussian_sources(shape, sources) + rng.normal(size=shape)
    return skydiff.Exposure(image.astype(np.float32), variance=np.ones(shape, np.float32),
                            psf=skydiff.GaussianPsf(SIGMA), **kwargs)


POSITIVE = [(30.0, 40.0, 600.0), (90.0, 95.0, 400.0)]
NEGATIVE = [(70.0, 30.0, -500.0)]
DIPOLE = [(40.0, 100.0, 500.0), (43.0, 100.0, -500.0)]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return repr(value)


def config(**changes: Any) -> DetectAndMeasureConfig:
    """The default config with ``key=value`` overrides (dotted keys through ``**{}``)."""
    cfg = DetectAndMeasureConfig()
    cfg.apply_overrides([f"{key}={_toml(value)}" for key, value in changes.items()])
    return cfg


def run(difference: skydiff.Exposure, cfg: DetectAndMeasureConfig | None = None,
        **kwargs: Any) -> DetectAndMeasureResult:
    return detect_and_measure(difference, config=cfg, **kwargs)


def nearest(catalog: Table, x: float, y: float) -> Any:
    d = np.hypot(np.asarray(catalog["x"]) - x, np.asarray(catalog["y"]) - y)
    return catalog[int(np.argmin(d))], float(d.min())


# --------------------------------------------------------------------------------------------
# configuration


def test_defaults_follow_the_contracts() -> None:
    cfg = DetectAndMeasureConfig()
    assert cfg.detection.name == "threshold"
    # executed by order, then name: order-2 plugins run alphabetically
    assert cfg.measurement.names == ("centroid", "pixel_flags", "aperture_flux", "psf_flux",
                                     "shape", "dipole_fit", "forced_psf")
    assert set(cfg.measurement.names) == set(DEFAULT_MEASUREMENTS)
    assert cfg.dipole_classifier.names == ("sn_flux_ratio", "chi2")
    assert (cfg.use_score, cfg.centroid_slot, cfg.n_sky_sources, cfg.sky_source_radius) == (
        "auto", "centroid", 100, 8.0)
    assert "flag_edge_center" in cfg.remove_flagged and "off_image" in cfg.remove_flagged


def test_config_toml_round_trip() -> None:
    cfg = DetectAndMeasureConfig()
    cfg.apply_overrides(["n_sky_sources=7", "detection.threshold.threshold=4.5",
                         "measurement.names=[\"centroid\", \"psf_flux\"]",
                         "measurement.centroid.dx=1.5", "remove_flagged=[]",
                         "use_score=never"])
    text = cfg.dump_toml()
    loaded = DetectAndMeasureConfig.load_toml(text)
    assert loaded == cfg
    assert loaded.dump_toml() == text
    assert loaded.measurement.names == ("centroid", "psf_flux")
    assert loaded.measurement["centroid"].dx == 1.5
    assert loaded.remove_flagged == ()


def test_unknown_centroid_slot_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"centroid_slot.*centriod"):
        DetectAndMeasureTask(config(centroid_slot="centriod"))
    with pytest.raises(ConfigError, match="use_score"):
        config(use_score="sometimes")


def test_wrong_config_type_and_inputs() -> None:
    diff = make_exposure(POSITIVE)
    with pytest.raises(ConfigError, match="DetectAndMeasureConfig"):
        detect_and_measure(diff, config=skydiff.PipelineConfig())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="difference must be"):
        detect_and_measure(np.zeros((4, 4)))  # type: ignore[arg-type]
    small = make_exposure([], shape=(64, 64))
    with pytest.raises(InputError, match=r"science has shape \(64, 64\)"):
        detect_and_measure(diff, science=small)
    with pytest.raises(InputError, match="use_score is 'always'"):
        detect_and_measure(diff, config=config(use_score="always"))


def test_a_detector_breaking_its_contract_is_a_bug_not_bad_input() -> None:
    with pytest.raises(ValueError, match=r"'bad_shape' returned footprints of shape \(3, 3\)"
                       ) as error:
        run(make_exposure(POSITIVE), config(**{"detection.name": "bad_shape"}))
    assert not isinstance(error.value, skydiff.SkydiffError)


# --------------------------------------------------------------------------------------------
# detection products


def test_catalog_counts_polarity_and_dipoles() -> None:
    diff = make_exposure(POSITIVE + NEGATIVE + DIPOLE)
    result = run(diff, config(n_sky_sources=0))
    cat = result.catalog
    assert not np.any(cat["sky_source"])
    assert len(cat) == 4
    np.testing.assert_array_equal(cat["id"], np.arange(1, 5))
    # 600-count source: brightest pixel 600/(2 pi 1.5^2) = 42 sigma, found within a pixel
    # of the truth even with the fake centroid's (0.25, -0.5) shift.
    for x, y, _ in POSITIVE + NEGATIVE:
        _, distance = nearest(cat, x, y)
        assert distance < 1.2
    row, _ = nearest(cat, 70.0, 30.0)
    assert row["is_negative"] and row["snr"] < 0
    dipole, _ = nearest(cat, 41.5, 100.0)
    assert dipole["is_dipole"] and dipole["is_dipole_sn_flux_ratio"] and dipole["is_dipole_chi2"]
    assert np.count_nonzero(cat["is_dipole"]) == 1
    meta = result.metadata
    assert (meta["n_positive"], meta["n_negative"], meta["n_dipoles"]) == (2, 1, 1)
    assert meta["detected_on"] == "difference"


def test_footprints_and_detected_planes() -> None:
    # A stale DETECTED bit far from every source must be cleared.
    base = make_exposure(POSITIVE + NEGATIVE + DIPOLE)
    stale = np.zeros(SHAPE, dtype=bool)
    stale[5, 5] = True
    diff = base.with_mask("DETECTED", stale)
    result = run(diff, config(n_sky_sources=0))
    labels = result.footprints
    assert labels.dtype == np.int32 and labels.shape == SHAPE
    assert set(np.unique(labels)) == {0, *result.catalog["id"]}
    processed = result.difference
    detected, negative = processed.masked("DETECTED"), processed.masked("DETECTED_NEGATIVE")
    assert not detected[5, 5]
    np.testing.assert_array_equal(detected | negative, labels > 0)
    assert not np.any(detected & negative)
    cat = result.catalog
    neg_id = nearest(cat, 70.0, 30.0)[0]["id"]
    assert np.all(negative[labels == neg_id])
    dip_id = nearest(cat, 41.5, 100.0)[0]["id"]
    inside = labels == dip_id
    # The merged dipole footprint is split by the sign of the pixels.
    assert detected[100, 40] and negative[100, 43]
    np.testing.assert_array_equal(negative[inside], processed.image[inside] < 0)
    # The input is untouched.
    assert diff.masked("DETECTED")[5, 5]


def test_background_is_subtracted_and_cosmic_rays_masked() -> None:
    diff = make_exposure(POSITIVE)
    offset = 3.0
    shifted = diff.evolve(image=diff.image + np.float32(offset))
    result = run(shifted, config(n_sky_sources=0, **{"detection.threshold.background": offset,
                                                     "detection.threshold.cr_level": 30.0}))
    np.testing.assert_allclose(result.difference.image, diff.image, atol=1e-5)
    assert result.metadata["background_subtracted"] is True
    cr = result.difference.masked("CR")
    # Only the peak pixels of the 600-count source exceed 30 (peak 42.4).
    assert 0 < np.count_nonzero(cr) < 10
    assert cr[40, 30]


def test_empty_detections_give_an_empty_catalog_with_every_column() -> None:
    full = run(make_exposure(POSITIVE + NEGATIVE + DIPOLE), config(n_sky_sources=3))
    empty = run(make_exposure([], seed=5), config(n_sky_sources=0))
    assert len(empty.catalog) == 0
    assert empty.catalog.colnames == full.catalog.colnames
    for name in full.catalog.colnames:
        assert empty.catalog[name].dtype == full.catalog[name].dtype, name
    assert not np.any(empty.footprints)
    assert empty.sky_sources == 0


# --------------------------------------------------------------------------------------------
# sky sources


def test_place_sky_sources_geometry() -> None:
    forbidden = np.zeros((100, 120), dtype=bool)
    forbidden[:, :60] = True
    x, y = place_sky_sources(forbidden, n=50, radius=5.0, seed=3)
    assert 5 <= len(x) <= 50
    # every disk is in the allowed half, inside the image, and no two disks overlap
    assert np.all(x - 5 > 59) and np.all(x + 5 <= 119) and np.all(y - 5 >= 0)
    assert np.all(y + 5 <= 99)
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) + np.eye(len(x)) * 1e9
    assert d.min() > 10.0
    x2, y2 = place_sky_sources(forbidden, n=50, radius=5.0, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = place_sky_sources(forbidden, n=50, radius=5.0, seed=4)
    assert not np.array_equal(np.sort(x), np.sort(x3))
    none = place_sky_sources(np.ones((50, 50), dtype=bool), n=10, radius=3.0)
    assert len(none[0]) == 0


def test_sky_sources_avoid_detections_and_masks() -> None:
    diff = make_exposure(POSITIVE + NEGATIVE + DIPOLE)
    bad = np.zeros(SHAPE, dtype=bool)
    bad[:, 100:110] = True  # a bad band
    diff = diff.with_mask("BAD", bad)
    radius = 6.0
    result = run(diff, config(n_sky_sources=20, sky_source_radius=radius,
                              remove_flagged=[]))
    cat = result.catalog
    sky = cat[cat["sky_source"]]
    assert len(sky) == result.sky_sources == result.metadata["n_sky_sources"] == 20
    assert not np.any(sky["is_dipole"])
    assert np.all(sky["n_peaks"] == 0) and np.all(np.isnan(sky["pos_peak_x"]))
    labels = result.footprints
    detections = np.isin(labels, cat["id"][~cat["sky_source"]])
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    for row in sky:
        disk = (xx - row["x"]) ** 2 + (yy - row["y"]) ** 2 <= radius**2
        assert np.all(labels[disk] == row["id"])
        assert row["footprint_area"] == np.count_nonzero(disk)
        # The disk touches no detection footprint and no BAD pixel.
        assert not np.any(disk & (detections | bad))
    # sky positions are not moved by the centroid slot
    np.testing.assert_array_equal(sky["x"], sky["peak_x"])


def test_sky_sources_are_deterministic_and_seeded() -> None:
    diff = make_exposure(POSITIVE)
    a = run(diff, config(n_sky_sources=10)).catalog
    b = run(diff, config(n_sky_sources=10)).catalog
    c = run(diff, config(n_sky_sources=10, sky_source_seed=9)).catalog
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"][a["sky_source"]], c["x"][c["sky_source"]])


# --------------------------------------------------------------------------------------------
# measurement orchestration


def test_centroid_slot_moves_good_rows_only() -> None:
    diff = make_exposure(POSITIVE + NEGATIVE)
    result = run(diff, config(n_sky_sources=2, **{"measurement.centroid.flag_ids": [1],
                                                  "measurement.centroid.nan_ids": [2]}))
    cat = result.catalog
    real = cat[~cat["sky_source"]]
    by_id = {int(row["id"]): row for row in real}
    # id 1 flagged and id 2 NaN keep their peaks; id 3 moves by (0.25, -0.5)
    for i in (1, 2):
        assert (by_id[i]["x"], by_id[i]["y"]) == (by_id[i]["peak_x"], by_id[i]["peak_y"])
    assert by_id[3]["x"] == by_id[3]["peak_x"] + 0.25
    assert by_id[3]["y"] == by_id[3]["peak_y"] - 0.5
    assert result.metadata["centroid_slot_applied"] is True
    unslotted = run(diff, config(n_sky_sources=2, centroid_slot=""))
    assert np.all(unslotted.catalog["x"] == unslotted.catalog["peak_x"])
    assert unslotted.metadata["centroid_slot_applied"] is False


def test_one_plugin_failure_flags_its_rows_and_the_others_run(caplog) -> None:
    diff = make_exposure(POSITIVE + NEGATIVE)
    with caplog.at_level(logging.WARNING, logger="skydiff"):
        result = run(diff, config(n_sky_sources=3, **{"measurement.aperture_flux.fail": True}))
    cat = result.catalog
    assert np.all(cat["aperture_flux_flag"])
    # the schema of the failed plugin (from a zero-row call) is kept, filled with NaN
    assert np.all(np.isnan(cat["aperture_flux_3_0"]))
    # the others ran: psf_flux (same order), shape and forced_psf (later) are measured
    assert np.all(np.isfinite(cat["psf_flux"])) and not np.any(cat["psf_flux_flag"])
    assert np.all(cat["shape_xx"] == SIGMA**2)
    assert "forced_psf_flag" in cat.colnames
    assert result.metadata["measurement_failed"] == ["aperture_flux"]
    assert "deliberate failure" in result.metadata["measurement_errors"]["aperture_flux"]
    assert any("aperture_flux" in record.getMessage() and record.levelno == logging.WARNING
               for record in caplog.records)


def test_contract_violation_is_a_plugin_failure() -> None:
    cfg = config(n_sky_sources=0)
    cfg.measurement.names = ["centroid", "psf_flux", "wrong_rows"]
    result = run(make_exposure(POSITIVE), cfg)
    assert np.all(result.catalog["wrong_rows_flag"])
    assert "rows" in result.metadata["measurement_errors"]["wrong_rows"]


def test_input_errors_of_plugins_propagate() -> None:
    cfg = config(n_sky_sources=0)
    cfg.measurement.names = ["centroid", "bad_input"]
    with pytest.raises(InputError, match="wrong input type"):
        run(make_exposure(POSITIVE), cfg)


def test_plugins_see_science_and_template() -> None:
    diff = make_exposure(POSITIVE)
    science = make_exposure([(30.0, 40.0, 900.0)], seed=2)
    result = run(diff, config(n_sky_sources=0), science=science)
    cat = result.catalog
    assert np.all(np.isfinite(cat["forced_science_flux"]))
    assert np.all(np.isnan(cat["forced_template_flux"])) and np.all(cat["forced_psf_flag"])


# --------------------------------------------------------------------------------------------
# classification


def test_is_dipole_is_the_and_of_the_classifiers() -> None:
    diff = make_exposure(POSITIVE + NEGATIVE + DIPOLE)
    area = int(nearest(run(diff, config(n_sky_sources=0)).catalog, 41.5, 100.0)[0][
        "footprint_area"])
    # chi2 (fake) now rejects the dipole's footprint: the AND must be False everywhere.
    result = run(diff, config(n_sky_sources=0, **{"dipole_classifier.chi2.min_area": area}))
    cat = result.catalog
    dipole = nearest(cat, 41.5, 100.0)[0]
    assert dipole["is_dipole_sn_flux_ratio"] and not dipole["is_dipole_chi2"]
    assert not np.any(cat["is_dipole"])
    np.testing.assert_array_equal(cat["dipole_score_chi2"], cat["footprint_area"])
    np.testing.assert_array_equal(
        cat["is_dipole"], cat["is_dipole_sn_flux_ratio"] & cat["is_dipole_chi2"])


def test_dipoles_are_placed_at_their_mean_centroid() -> None:
    diff = make_exposure(POSITIVE + NEGATIVE + DIPOLE)
    result = run(diff, config(n_sky_sources=0))
    cat = result.catalog
    dipoles = cat[cat["is_dipole"]]
    assert len(dipoles) == 1
    (row,) = dipoles
    assert (row["x"], row["y"]) == (row["dipole_x"], row["dipole_y"])
    assert (row["x"], row["y"]) != (row["peak_x"], row["peak_y"])
    others = cat[~cat["is_dipole"]]
    assert np.all(np.isnan(others["dipole_x"]))
    assert result.metadata["n_dipole_positions"] == 1


def test_failing_or_absent_classifiers() -> None:
    diff = make_exposure(POSITIVE + DIPOLE)
    cfg = config(n_sky_sources=0)
    cfg.dipole_classifier.names = ["sn_flux_ratio", "broken"]
    result = run(diff, cfg)
    cat = result.catalog
    assert not np.any(cat["is_dipole_broken"]) and np.all(np.isnan(cat["dipole_score_broken"]))
    assert not np.any(cat["is_dipole"])
    assert result.metadata["classifier_failed"] == ["broken"]
    cfg.dipole_classifier.names = []
    result = run(diff, cfg)
    assert not np.any(result.catalog["is_dipole"])
    assert not any(name.startswith("is_dipole_") for name in result.catalog.colnames)


# --------------------------------------------------------------------------------------------
# removal, finishing


def test_flagged_rows_are_removed_and_ids_renumbered() -> None:
    edge = np.zeros(SHAPE, dtype=bool)
    edge[:, :34] = True  # covers the centre of the source at x = 30
    diff = make_exposure(POSITIVE + NEGATIVE + DIPOLE).with_mask("EDGE", edge)
    kept = run(diff, config(n_sky_sources=5, sky_source_avoid_planes=["DETECTED"]))
    everything = run(diff, config(n_sky_sources=5, sky_source_avoid_planes=["DETECTED"],
                                  remove_flagged=[]))
    removed = int(np.count_nonzero(everything.catalog["flag_edge_center"]))
    assert removed >= 1
    assert len(kept.catalog) == len(everything.catalog) - removed
    assert not np.any(kept.catalog["flag_edge_center"])
    assert kept.metadata["removed_by"]["flag_edge_center"] == removed
    np.testing.assert_array_equal(kept.catalog["id"], np.arange(1, len(kept.catalog) + 1))
    assert set(np.unique(kept.footprints)) == {0, *kept.catalog["id"]}
    # Each kept row's footprint is the same set of pixels as before the renumbering.
    for row in kept.catalog:
        old = nearest(everything.catalog, row["x"], row["y"])[0]["id"]
        np.testing.assert_array_equal(kept.footprints == row["id"],
                                      everything.footprints == old)


def test_units_descriptions_and_meta() -> None:
    diff = make_exposure(POSITIVE + DIPOLE, metadata={"BUNIT": "nJy"})
    cat = run(diff, config(n_sky_sources=2)).catalog
    for name in cat.colnames:
        assert cat[name].description, name
    assert cat["x"].unit == u.pix and cat["centroid_x_err"].unit == u.pix
    assert cat["ra"].unit == u.deg and cat["dipole_orientation"].unit == u.deg
    assert cat["psf_flux"].unit == u.nJy and cat["peak_value"].unit == u.nJy
    assert cat["aperture_flux_3_0"].unit == u.nJy
    assert cat["shape_xx"].unit == u.pix**2 and cat["footprint_area"].unit == u.pix**2
    assert cat["snr"].unit == u.dimensionless_unscaled
    assert cat["id"].unit is None and cat["is_dipole"].unit is None
    assert cat["aperture_flux_3_0"].description == "plugin's own description"
    assert "radius 3.0" in cat["aperture_flux_3_0_err"].description
    assert "EDGE" in cat["flag_edge_center"].description
    assert "shape" in cat["shape_extra_x"].description and cat["shape_extra_x"].unit == u.pix
    assert cat.colnames[:8] == ["id", "x", "y", "ra", "dec", "snr", "is_dipole", "sky_source"]
    assert cat.meta["flux_unit"] == "nJy" and cat.meta["threshold"] == 5.0
    assert cat.meta["detection"] == "threshold" and cat.meta["n_sky_sources"] == 2
    np.testing.assert_allclose(cat["snr"], cat["psf_flux"] / cat["psf_flux_err"])
    # An unparsable BUNIT, or none, gives dimensionless fluxes.
    odd = run(make_exposure(POSITIVE, metadata={"BUNIT": "counts per fortnight"}),
              config(n_sky_sources=0)).catalog
    assert odd["psf_flux"].unit == u.dimensionless_unscaled
    assert np.all(np.isnan(odd["ra"]))


def test_documented_columns_cover_the_default_catalog() -> None:
    documented = {column.name for column in CATALOG_COLUMNS}
    for column in CATALOG_COLUMNS:
        assert column.description.endswith(".") and column.unit in (
            None, "", "pix", "pix2", "deg", "flux")
    cat = run(make_exposure(POSITIVE), config(n_sky_sources=1)).catalog
    for name in cat.colnames:
        generic = (name.replace("3_0", "<r>").replace("is_dipole_", "is_dipole_<name>|")
                   .replace("dipole_score_", "dipole_score_<name>|"))
        generic = generic.split("|")[0]
        if name.startswith("flag_"):
            generic = "flag_<plane>_center" if name.endswith("_center") else "flag_<plane>"
        if name == "shape_extra_x":  # the fakes' own extra column
            continue
        assert generic in documented, name


def _tan_wcs(shape: tuple[int, int]) -> WCS:
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0,
                          "CRVAL2": 2.0, "CRPIX1": shape[1] / 2 + 0.5,
                          "CRPIX2": shape[0] / 2 + 0.5, "CD1_1": -5.5e-5, "CD1_2": 0.0,
                          "CD2_1": 0.0, "CD2_2": 5.5e-5, "CUNIT1": "deg", "CUNIT2": "deg"})
    return WCS(header)


def test_ra_dec_from_the_wcs_and_cutouts_agree() -> None:
    wcs = _tan_wcs(SHAPE)
    diff = make_exposure(POSITIVE + NEGATIVE, wcs=wcs, origin=(1000, 2000))
    cat = run(diff, config(n_sky_sources=0)).catalog
    sky = wcs.pixel_to_world(np.asarray(cat["x"]), np.asarray(cat["y"]))
    np.testing.assert_allclose(cat["ra"], sky.ra.deg, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cat["dec"], sky.dec.deg, rtol=0, atol=1e-10)
    # The same source measured on a cutout (other origin, sliced WCS) has the same ra/dec:
    # 0.2"/px, so 1e-7 deg is 1/550 px.
    cut = diff.cutout(slice(20, 70), slice(10, 60))
    sub = run(cut, config(n_sky_sources=0)).catalog
    row, _ = nearest(cat, 30.0, 40.0)
    subrow, distance = nearest(sub, 30.0 - 10, 40.0 - 20)
    assert distance < 1.5
    assert subrow["x"] + 10 == pytest.approx(row["x"])
    assert subrow["ra"] == pytest.approx(row["ra"], abs=1e-7)
    assert subrow["dec"] == pytest.approx(row["dec"], abs=1e-7)


def test_use_score_selects_the_detection_image() -> None:
    diff = make_exposure(POSITIVE)
    score = make_exposure([(100.0, 20.0, 800.0)], seed=7)  # a source only in the score
    auto = run(diff, config(n_sky_sources=0), score=score)
    assert auto.metadata["detected_on"] == "score" and auto.catalog.meta["detected_on"] == "score"
    assert auto.metadata["detection"]["result"]["is_score"] is True
    assert len(auto.catalog) == 1 and nearest(auto.catalog, 100.0, 20.0)[1] < 1.2
    # the measurement ran on the difference, where there is nothing at that position
    assert abs(auto.catalog["snr"][0]) < 5
    # peak_value is in the score's unit (none here), the fluxes in the difference's
    flux_diff = make_exposure(POSITIVE, metadata={"BUNIT": "nJy"})
    on_score = run(flux_diff, config(n_sky_sources=0), score=score).catalog
    assert on_score["peak_value"].unit == u.dimensionless_unscaled
    assert on_score["psf_flux"].unit == u.nJy
    never = run(diff, config(n_sky_sources=0, use_score="never"), score=score)
    assert never.metadata["detected_on"] == "difference" and len(never.catalog) == 2
    assert never.metadata["detection"]["result"]["is_score"] is False


def test_task_metadata_and_result_are_frozen() -> None:
    task = DetectAndMeasureTask(config(n_sky_sources=1))
    result = task.run(make_exposure(POSITIVE))
    assert set(task.measurement) == set(DEFAULT_MEASUREMENTS)
    assert list(task.dipole_classifier) == ["sn_flux_ratio", "chi2"]
    assert result.metadata["timing"]["detection"]["wall_s"] >= 0
    assert not result.footprints.flags.writeable
    with pytest.raises(AttributeError):
        result.sky_sources = 3  # type: ignore[misc]
