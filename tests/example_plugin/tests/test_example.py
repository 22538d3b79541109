"""Tests of the installed skydiff-example distribution, through real entry-point discovery.

They run in the tox ``plugin-api`` environment, where ``tests/example_plugin`` is installed,
``SKYDIFF_DISABLE_PLUGIN_AUTOLOAD=0`` and ``SKYDIFF_EXPECT_EXAMPLE_PLUGIN=1``. Elsewhere the
module is skipped, unless ``SKYDIFF_EXPECT_EXAMPLE_PLUGIN=1`` demands the plugin, in which
case a missing or undiscovered plugin is an error.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import numpy as np
import pytest

import skydiff
from skydiff.testing import parametrize_with_checks

EXPECTED = os.environ.get("SKYDIFF_EXPECT_EXAMPLE_PLUGIN", "") == "1"


def _discovered() -> bool:
    try:
        importlib.metadata.distribution("skydiff-example")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "pixel_stats" in skydiff.get_registries().metric


if not _discovered():
    if EXPECTED:
        msg = ("SKYDIFF_EXPECT_EXAMPLE_PLUGIN=1 but the metric 'pixel_stats' of skydiff-example "
               "was not discovered; install ./tests/example_plugin and set "
               "SKYDIFF_DISABLE_PLUGIN_AUTOLOAD=0")
        raise RuntimeError(msg)
    pytest.skip("skydiff-example is not installed and autoloaded (tox -e plugin-api runs these)",
                allow_module_level=True)

import skydiff_example  # noqa: E402 - only importable when installed

PLUGIN_REFERENCES = ["metric:pixel_stats", "measurement:box_flux"]


# ------------------------------------------------------------------------------------------
# discovery and selection


def test_discovered_through_the_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group="skydiff.plugins", name="example")
    assert [ep.value for ep in entry_points] == ["skydiff_example"]
    (entry_point,) = entry_points
    assert entry_point.dist is not None and entry_point.dist.name == "skydiff-example"
    version = importlib.metadata.version("skydiff-example")
    records = {record.name: record for record in skydiff.get_manager().plugins()}
    record = records["example"]
    assert (record.distribution, record.version) == ("skydiff-example", version)
    assert dict(record.algorithms) == {"measurement": ("box_flux",), "metric": ("pixel_stats",)}
    info = skydiff.get_registries().metric["pixel_stats"]
    assert info.target is skydiff_example.PixelStats
    assert (info.provider, info.distribution, info.version) == (
        "example", "skydiff-example", version)
    assert not [error for error in skydiff.get_manager().load_errors
                if error.distribution == "skydiff-example"]


@skydiff.configclass
class MetricsConfig(skydiff.Config):
    """A pipeline step selecting metrics by name."""

    metrics: skydiff.RegistrySelection = skydiff.RegistryField(
        "metric", default=(), multi=True, optional=True, doc="Metrics to compute.")


TOML = """\
[metrics]
names = ["pixel_stats"]

[metrics.pixel_stats]
clip = 4.0
bad_mask_planes = ["BAD", "NO_DATA"]
"""


def test_selectable_from_a_toml_config() -> None:
    config = MetricsConfig.load_toml(TOML)
    selection = config.metrics
    assert selection.names == ("pixel_stats",)
    assert selection.targets == (skydiff_example.PixelStats,)
    (active,) = selection.active
    assert isinstance(active, skydiff_example.PixelStatsConfig)
    assert (active.clip, active.bad_mask_planes) == (4.0, ("BAD", "NO_DATA"))
    assert MetricsConfig.load_toml(config.dump_toml()) == config
    (metric,) = selection.apply()
    rng = np.random.default_rng(7)
    difference = skydiff.Exposure(rng.normal(0.0, 3.0, (48, 48)), variance=np.full((48, 48), 9.0))
    values = metric.run(skydiff.MetricInputs(difference=difference)).values
    assert values["n_pixels"] == 48 * 48


def test_unknown_metric_name_lists_pixel_stats() -> None:
    with pytest.raises(skydiff.ConfigError, match="pixel_stats"):
        MetricsConfig.load_toml('[metrics]\nnames = ["pixel_stat"]\n')


# ------------------------------------------------------------------------------------------
# the conformance suite, exactly as a third party runs it


@parametrize_with_checks(PLUGIN_REFERENCES)
def test_conformance(plugin: Any, check: Any) -> None:
    check(plugin)


# ------------------------------------------------------------------------------------------
# what the metric computes


def _noise_difference(rng: np.random.Generator, shape: tuple[int, int], sigma: float
                      ) -> skydiff.Exposure:
    return skydiff.Exposure(rng.normal(0.0, sigma, shape),
                            variance=np.full(shape, sigma**2, dtype=np.float32))


def test_pure_noise_gives_zero_mean_unit_std() -> None:
    rng = np.random.default_rng(11)
    difference = _noise_difference(rng, (128, 128), 4.0)
    values = skydiff_example.PixelStats().run(skydiff.MetricInputs(difference=difference)).values
    n = 128 * 128
    # Iterated 3-sigma clipping of a Gaussian converges to 0.985 of its std.
    assert abs(values["z_mean"]) < 5.0 / np.sqrt(n)
    assert values["z_std"] == pytest.approx(0.985, abs=5.0 / np.sqrt(2.0 * n))
    # P(|z| > 5) = 5.7e-7: no outlier expected among 16384 pixels.
    assert values["z_outlier_fraction"] == 0.0
    assert values["n_pixels"] == n


def test_outliers_and_masks() -> None:
    rng = np.random.default_rng(12)
    shape = (100, 100)
    image = rng.normal(0.0, 1.0, shape)
    image[10, :50] = 100.0  # 50 artefact pixels
    image[20:30, 20:30] = 1e6  # masked block: must not count at all
    difference = skydiff.Exposure(image, variance=np.ones(shape))
    bad = np.zeros(shape, dtype=bool)
    bad[20:30, 20:30] = True
    difference = difference.with_mask("BAD", bad)
    values = skydiff_example.PixelStats().run(skydiff.MetricInputs(difference=difference)).values
    n = 100 * 100 - 100
    assert values["n_pixels"] == n
    assert values["z_outlier_fraction"] == pytest.approx(50 / n)
    assert abs(values["z_mean"]) < 5.0 / np.sqrt(n)
    assert values["z_std"] == pytest.approx(0.985, abs=5.0 / np.sqrt(2.0 * n))


def test_config_controls_clip_and_planes() -> None:
    rng = np.random.default_rng(13)
    image = rng.normal(0.0, 1.0, (64, 64))
    image[:, 0] = 50.0
    flagged = np.zeros((64, 64), dtype=bool)
    flagged[:, 0] = True
    difference = skydiff.Exposure(image, variance=np.ones((64, 64))).with_mask("CR", flagged)
    inputs = skydiff.MetricInputs(difference=difference)
    default = skydiff_example.PixelStats().run(inputs).values
    keep_cr = skydiff_example.PixelStats(
        skydiff_example.PixelStatsConfig(bad_mask_planes=["BAD"])).run(inputs).values
    assert default["n_pixels"] == 64 * 63 and default["z_outlier_fraction"] == 0.0
    assert keep_cr["n_pixels"] == 64 * 64
    assert keep_cr["z_outlier_fraction"] == pytest.approx(1 / 64)


def test_everything_masked_is_an_algorithm_error() -> None:
    shape = (16, 16)
    difference = skydiff.Exposure(np.zeros(shape), variance=np.ones(shape)).with_mask(
        "NO_DATA", np.ones(shape, dtype=bool))
    with pytest.raises(skydiff.AlgorithmError) as info:
        skydiff_example.PixelStats().run(skydiff.MetricInputs(difference=difference))
    assert info.value.metadata["n_pixels"] == 0


def test_missing_difference_is_an_input_error() -> None:
    with pytest.raises(skydiff.InputError):
        skydiff_example.PixelStats().run(skydiff.MetricInputs())


# ------------------------------------------------------------------------------------------
# the measurement plugin inside the detect step


def test_box_flux_adds_its_columns_to_the_pipeline_catalog() -> None:
    """Selected by name next to the built-ins, box_flux adds its three columns to the catalog.

    One Gaussian source of flux 5000 (sigma 1.5 px) on unit-variance noise: a 9 x 9 box holds
    all but 1e-3 of its flux, so box_flux = 5000 within 3 sigma = 3 * 9 = 27 (+ 5 of
    truncation), with box_flux_err = 9 exactly.
    """
    rng = np.random.default_rng(5)
    shape = (96, 96)
    rows, cols = np.indices(shape)
    sigma = 1.5
    source = 5000.0 * np.exp(-((rows - 40.2) ** 2 + (cols - 51.7) ** 2) / (2 * sigma**2))
    source /= 2 * np.pi * sigma**2
    difference = skydiff.Exposure(source + rng.normal(0.0, 1.0, shape),
                                  variance=np.ones(shape), psf=skydiff.GaussianPsf(sigma))
    config = skydiff.DetectAndMeasureConfig()
    config.measurement.names = ["centroid", "psf_flux", "box_flux"]
    config.measurement["box_flux"].half_size = 4
    config.dipole_classifier.names = []
    config.n_sky_sources = 0
    catalog = skydiff.detect_and_measure(difference, config=config).catalog
    assert {"box_flux", "box_flux_err", "box_flux_flag"} <= set(catalog.colnames)
    (row,) = catalog[np.hypot(catalog["x"] - 51.7, catalog["y"] - 40.2) < 1.0]
    assert not row["box_flux_flag"]
    assert row["box_flux_err"] == pytest.approx(9.0)
    assert row["box_flux"] == pytest.approx(5000.0, abs=3 * 9.0 + 5.0)
    assert row["psf_flux"] == pytest.approx(row["box_flux"], rel=0.02)
