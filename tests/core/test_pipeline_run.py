"""Tests of skydiff.pipeline.run_pipeline and the full PipelineConfig, with fake plugins.

A private plugin manager holds fakes registered under the contract's names (subtraction
``al``, executor ``serial``, detection ``threshold``, the seven measurements, the two dipole
classifiers and the four metrics), so the orchestration is tested independently of the
built-in algorithms. The fake subtraction is the plain difference S - T of a pair simulated
with identical PSFs, so the difference is noise plus the injected transients.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
from astropy.table import Table
from scipy import ndimage

import skydiff
from skydiff.detect import DEFAULT_MEASUREMENTS
from skydiff.errors import BadSubtractionError, ConfigError, InputError
from skydiff.pipeline import (
    DEFAULT_METRICS,
    PipelineConfig,
    PipelineResult,
    detection_inputs,
    run_pipeline,
)
from skydiff.sim import simulate_pair

# --------------------------------------------------------------------------------------------
# fakes


@skydiff.configclass
class FakeSubtractionConfig(skydiff.Config):
    make_score: bool = skydiff.Field(False, doc="Also return a score image (D / 2).")
    convolved: str = skydiff.ChoiceField("template", allowed=("template", "science", "none"),
                                         doc="What the fake claims it convolved.")


class FakeAl(skydiff.Subtraction):
    """D = S - T, matched image = T (a fake)."""

    name = "al"
    ConfigClass = FakeSubtractionConfig

    def run(self, science: skydiff.Exposure, template: skydiff.Exposure, *,
            sources: Table | None = None) -> skydiff.SubtractionResult:
        difference = science.evolve(image=science.image - template.image,
                                    variance=science.variance + template.variance,
                                    mask=science.mask | template.mask)
        score = difference.evolve(image=difference.image / 2) if self.config.make_score \
            else None
        kernel_sources = Table({"x": [10.0, 20.0], "y": [30.0, 40.0]})
        return skydiff.SubtractionResult(
            difference=difference, matched_image=template, score=score,
            kernel=skydiff.FixedKernel([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
            kernel_sources=kernel_sources, convolved=self.config.convolved,
            metadata={"kernel_sum": 1.0})


class FakeSerial(skydiff.Executor):
    name = "serial"
    ConfigClass = skydiff.Config

    def run(self, function: Any, items: Any) -> skydiff.ExecutorResult:
        results = [function(item) for item in items]
        return skydiff.ExecutorResult(results=results, errors=[None] * len(results))


class FakeThreshold(skydiff.Detector):
    """Footprints of |D|/sigma > 5 (a fake)."""

    name = "threshold"
    ConfigClass = skydiff.Config

    def run(self, image: skydiff.Exposure, *, is_score: bool = False) -> skydiff.DetectionResult:
        snr = np.asarray(image.image, float) / np.sqrt(np.asarray(image.variance, float))
        labels, n = ndimage.label(np.abs(snr) > 5, structure=np.ones((3, 3)))
        index = np.arange(1, n + 1)
        peaks = ndimage.maximum_position(np.abs(snr), labels, index) if n else []
        ys = np.array([p[0] for p in peaks], dtype=float)
        xs = np.array([p[1] for p in peaks], dtype=float)
        significance = snr[ys.astype(int), xs.astype(int)] if n else np.zeros(0)
        catalog = Table({"id": index.astype(np.int64), "x": xs, "y": ys,
                         "significance": significance, "is_negative": significance < 0})
        return skydiff.DetectionResult(catalog=catalog, footprints=labels.astype(np.int32),
                                       metadata={"threshold": 5.0})


def make_measurement(plugin_name: str, plugin_order: float) -> type[skydiff.Measurement]:
    """A fake measurement plugin: ``<name>_flag`` plus, for psf_flux, a 5x5 box flux."""

    class Fake(skydiff.Measurement):
        name = plugin_name
        order: ClassVar[float] = plugin_order
        ConfigClass = skydiff.Config

        def run(self, inputs: skydiff.MeasurementInputs) -> skydiff.MeasurementResult:
            cat = inputs.catalog
            n = len(cat)
            columns = Table({f"{plugin_name}_flag": np.zeros(n, dtype=bool)})
            if plugin_name == "psf_flux":
                image = np.asarray(inputs.difference.image, dtype=float)
                rows = np.clip(np.rint(np.asarray(cat["y"], float)).astype(int), 2, 125)
                cols = np.clip(np.rint(np.asarray(cat["x"], float)).astype(int), 2, 125)
                offsets = np.arange(-2, 3)
                box = image[rows[:, None, None] + offsets[None, :, None],
                            cols[:, None, None] + offsets[None, None, :]]
                columns["psf_flux"] = box.reshape(n, 25).sum(axis=1)
                columns["psf_flux_err"] = np.full(n, 5.0 * np.sqrt(2.0) * 5.0)
            if plugin_name == "centroid":
                columns["centroid_x"] = np.asarray(cat["x"], float)
                columns["centroid_y"] = np.asarray(cat["y"], float)
            return skydiff.MeasurementResult(columns=columns)

    Fake.__name__ = Fake.__qualname__ = f"Fake_{plugin_name}"
    return Fake


ORDERS = {"centroid": 0.0, "pixel_flags": 1.0, "psf_flux": 2.0, "aperture_flux": 2.0,
          "shape": 2.0, "dipole_fit": 3.0, "forced_psf": 4.0}


def make_classifier(plugin_name: str) -> type[skydiff.DipoleClassifier]:
    class Fake(skydiff.DipoleClassifier):
        name = plugin_name
        ConfigClass = skydiff.Config

        def run(self, catalog: Table) -> skydiff.ClassificationResult:
            n = len(catalog)
            return skydiff.ClassificationResult(flag=np.zeros(n, bool), score=np.zeros(n))

    Fake.__name__ = Fake.__qualname__ = f"Fake_{plugin_name}"
    return Fake


#: Every MetricInputs a fake metric received (reset by the fixture).
SEEN: list[skydiff.MetricInputs] = []


@skydiff.configclass
class MetricConfig(skydiff.Config):
    fail: str = skydiff.ChoiceField("no", allowed=("no", "bad", "crash"),
                                    doc="Raise BadSubtractionError, RuntimeError or nothing.")


def make_metric(plugin_name: str, plugin_order: float) -> type[skydiff.Metric]:
    class Fake(skydiff.Metric):
        name = plugin_name
        order: ClassVar[float] = plugin_order
        ConfigClass = MetricConfig

        def run(self, inputs: skydiff.MetricInputs) -> skydiff.MetricResult:
            SEEN.append(inputs)
            if self.config.fail == "bad":
                msg = "residual footprint ratio 0.5 > 0.2"
                raise BadSubtractionError(msg, mean=0.5, label="x")
            if self.config.fail == "crash":
                msg = "metric crashed"
                raise RuntimeError(msg)
            assert inputs.catalog is not None
            n = int(np.count_nonzero(~np.asarray(inputs.catalog["sky_source"], bool)))
            table = Table({"x": [1.0], "value": [float(n)]}) if plugin_name == "spatial" \
                else None
            return skydiff.MetricResult(values={"n": n, "order": plugin_order}, table=table)

    Fake.__name__ = Fake.__qualname__ = f"Fake_{plugin_name}"
    return Fake


@skydiff.hookimpl
def skydiff_register_algorithms(registries: skydiff.Registries) -> None:
    registries.subtraction.add(FakeAl)
    registries.executor.add(FakeSerial)
    registries.detection.add(FakeThreshold)
    for name, order in ORDERS.items():
        registries.measurement.add(make_measurement(name, order))
    for name in ("sn_flux_ratio", "chi2"):
        registries.dipole_classifier.add(make_classifier(name))
    for order, name in enumerate(DEFAULT_METRICS):
        registries.metric.add(make_metric(name, float(order)))
    registries.metric.add(make_metric("extra", 9.0))


FAKES = types.ModuleType("skydiff_fake_pipeline_plugins")
FAKES.skydiff_register_algorithms = skydiff_register_algorithms  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def fake_plugins() -> Iterator[skydiff.PluginManager]:
    SEEN.clear()
    with skydiff.use_manager() as manager:
        manager.register(FAKES, name="fakes", distribution="skydiff-fakes", version="0")
        yield manager


TRANSIENTS = 3


@pytest.fixture(scope="module")
def pair() -> Any:
    """128x128, identical 3-px PSFs, no offset: S - T is noise plus the transients."""
    return simulate_pair(shape=(128, 128), n_stars=25, n_transients=TRANSIENTS,
                         transient_flux=(8000.0, 12000.0), flux_max=3000.0, seed=4,
                         science={"fwhm": 3.0, "n_cosmic_rays": 0, "n_bad_columns": 0},
                         template={"fwhm": 3.0, "n_cosmic_rays": 0, "n_bad_columns": 0})


def pipeline(*overrides: str) -> PipelineConfig:
    config = PipelineConfig()
    config.apply_overrides(list(overrides))
    return config


# --------------------------------------------------------------------------------------------
# configuration


def test_pipeline_config_has_detect_and_metrics() -> None:
    config = PipelineConfig()
    assert config.detect.detection.name == "threshold"
    assert set(config.detect.measurement.names) == set(DEFAULT_MEASUREMENTS)
    assert config.metrics.names == DEFAULT_METRICS
    assert config.fail_on_bad_subtraction is True
    config.validate()


def test_pipeline_config_toml_round_trip() -> None:
    default = PipelineConfig()
    text = default.dump_toml()
    assert "[detect]" in text and "[metrics]" in text
    assert PipelineConfig.load_toml(text) == default
    changed = pipeline("detect.n_sky_sources=12", "detect.use_score=never",
                       'metrics.names=["source_count", "extra"]',
                       "metrics.extra.fail=crash", "fail_on_bad_subtraction=false",
                       "subtract.al.make_score=true")
    text = changed.dump_toml()
    loaded = PipelineConfig.load_toml(text)
    assert loaded == changed and loaded != default
    assert loaded.dump_toml() == text
    assert loaded.detect.n_sky_sources == 12 and loaded.metrics["extra"].fail == "crash"
    assert loaded.metrics.names == ("source_count", "extra")


def test_bad_keys_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"detect\.nope"):
        pipeline("detect.nope=1")
    with pytest.raises(ConfigError, match=r"metrics\.names.*unknown metric algorithm 'bogus'"):
        pipeline('metrics.names=["bogus"]')


# --------------------------------------------------------------------------------------------
# running


def test_run_pipeline_returns_every_product(pair: Any) -> None:
    result = run_pipeline(pair.science, pair.template, pipeline("detect.n_sky_sources=4"))
    assert isinstance(result, PipelineResult)
    assert isinstance(result.subtraction, skydiff.SubtractionResult)
    cat = result.detection.catalog
    real = cat[~cat["sky_source"]]
    # Sky 100 ADU, gain 1, read noise 5 e-: each image has variance ~125, the difference ~250
    # (sigma 15.8). An 8000-count transient with FWHM 3 (sigma 1.27 px) peaks at
    # 8000 / (2 pi 1.27^2) = 790, i.e. 50 sigma: every transient must be found.
    truth = pair.truth[pair.truth["kind"] == "transient"]
    for row in truth:
        d = np.hypot(real["x"] - row["x"], real["y"] - row["y"])
        assert d.min() < 1.5
    assert np.count_nonzero(cat["sky_source"]) == 4
    assert sorted(result.metrics) == sorted(DEFAULT_METRICS)
    assert result.metrics["source_count"]["n"] == len(real)
    assert list(result.metric_tables) == ["spatial"]
    assert result.science_sources is not None and len(result.science_sources) >= 10
    assert result.metadata["metric_errors"] == {}
    assert result.metadata["bad_subtraction"] is False
    assert set(result.metadata["timing"]) == {"subtract", "detect", "science_sources",
                                              "metrics"}
    # What the metrics received.
    inputs = SEEN[0]
    assert inputs.catalog is cat
    assert inputs.difference is result.detection.difference
    assert inputs.kernel is result.subtraction.kernel
    assert inputs.kernel_sources is result.subtraction.kernel_sources
    assert inputs.science_sources is result.science_sources
    assert inputs.science is pair.science and inputs.template is result.subtraction.matched_image


def test_score_is_used_for_detection(pair: Any) -> None:
    result = run_pipeline(pair.science, pair.template,
                          pipeline("subtract.al.make_score=true", "detect.n_sky_sources=0"))
    assert result.detection.metadata["detected_on"] == "score"
    result = run_pipeline(pair.science, pair.template,
                          pipeline("subtract.al.make_score=true", "detect.use_score=never",
                                   "detect.n_sky_sources=0"))
    assert result.detection.metadata["detected_on"] == "difference"


def test_failing_metric_is_recorded_and_the_others_run(pair: Any) -> None:
    result = run_pipeline(pair.science, pair.template,
                          pipeline("metrics.dia_fraction.fail=crash", "detect.n_sky_sources=0"))
    assert result.metrics["dia_fraction"] == {}
    assert "metric crashed" in result.metadata["metric_errors"]["dia_fraction"]
    assert result.metrics["spatial"]["n"] >= TRANSIENTS
    assert len(SEEN) == 4


def test_bad_subtraction_raises_after_all_metrics_with_the_result(pair: Any) -> None:
    config = pipeline("metrics.residual_footprint_ratio.fail=bad", "detect.n_sky_sources=0")
    with pytest.raises(BadSubtractionError, match=r"0\.5 > 0\.2") as error:
        run_pipeline(pair.science, pair.template, config)
    assert len(SEEN) == 4  # spatial, after the failing metric, still ran
    result = error.value.result  # type: ignore[attr-defined]
    assert isinstance(result, PipelineResult)
    assert result.metrics["residual_footprint_ratio"] == {"mean": 0.5}
    assert result.metadata["bad_subtraction"] is True
    config.fail_on_bad_subtraction = False
    quiet = run_pipeline(pair.science, pair.template, config)
    assert "BadSubtractionError" in quiet.metadata["metric_errors"]["residual_footprint_ratio"]


def test_config_errors_come_before_any_work(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(skydiff.pipeline, "subtract", lambda *a, **k: calls.append(a))
    config = PipelineConfig()
    config.detect.centroid_slot = "nonexistent"
    with pytest.raises(ConfigError, match="centroid_slot"):
        run_pipeline(pair.science, pair.template, config)
    assert calls == []


def test_inputs_are_checked(pair: Any) -> None:
    with pytest.raises(InputError, match=r"science must be a skydiff\.Exposure"):
        run_pipeline(np.zeros((4, 4)), pair.template)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="PipelineConfig"):
        run_pipeline(pair.science, pair.template, config={})  # type: ignore[arg-type]


@pytest.mark.parametrize(("convolved", "expected"), [("template", ("science", "matched")),
                                                      ("science", ("matched", "template")),
                                                      ("none", ("science", "template"))])
def test_detection_inputs_follow_what_was_convolved(pair: Any, convolved: str,
                                                    expected: tuple[str, str]) -> None:
    matched = pair.template.evolve(image=pair.template.image * 2)
    sub = skydiff.SubtractionResult(difference=pair.science, matched_image=matched,
                                    convolved=convolved)
    named = {"science": pair.science, "template": pair.template, "matched": matched}
    got = detection_inputs(pair.science, pair.template, sub)
    assert got[0] is named[expected[0]] and got[1] is named[expected[1]]


# --------------------------------------------------------------------------------------------
# products: regions, metrics JSON, QA figure


def test_regions_colours_offsets_and_sky_sources(tmp_path) -> None:
    from skydiff.io import write_regions

    catalog = Table({"id": [1, 2, 3, 4], "x": [0.0, 10.5, 20.0, 30.0],
                     "y": [0.0, 5.25, 8.0, 9.0], "is_negative": [False, True, False, False],
                     "is_dipole": [False, False, True, False],
                     "sky_source": [False, False, False, True]})
    path = tmp_path / "sources.reg"
    write_regions(catalog, path, radius=4.0)
    lines = path.read_text().splitlines()
    assert lines[0] == "# Region file format: DS9 version 4.1" and "image" in lines
    circles = [line for line in lines if line.startswith("circle")]
    # DS9 image coordinates are 1-based: pixel (0, 0) is drawn at (1, 1).
    assert circles == ["circle(1.000,1.000,4) # color=green text={1}",
                       "circle(11.500,6.250,4) # color=red text={2}",
                       "circle(21.000,9.000,4) # color=magenta text={3}"]
    with pytest.raises(InputError, match="exists"):
        write_regions(catalog, path)
    write_regions(catalog, path, sky=True, overwrite=True)
    assert "circle(31.000,10.000,6) # color=cyan dash=1 background text={4}" in \
        path.read_text()
    with pytest.raises(InputError, match="no y column"):
        write_regions(Table({"x": [1.0]}), tmp_path / "bad.reg")


def test_metrics_json_is_sorted_with_null_for_nan(tmp_path) -> None:
    import json
    import math

    from skydiff.io import read_metrics, write_metrics

    path = tmp_path / "metrics.json"
    write_metrics({"zeta": {"b": 1.0, "a": np.float64(np.nan)}, "alpha": {"n": np.int64(3)}},
                  path, errors={"beta": "RuntimeError: boom"}, extra={"science": "s.fits"})
    text = path.read_text()
    assert "NaN" not in text and '"a": null' in text
    data = json.loads(text)
    assert list(data) == ["errors", "metrics", "science", "skydiff_version"]
    assert list(data["metrics"]) == ["alpha", "zeta"] and list(data["metrics"]["zeta"]) == [
        "a", "b"]
    assert data["metrics"]["alpha"]["n"] == 3 and data["errors"] == {"beta": "RuntimeError: boom"}
    back = read_metrics(path)
    assert math.isnan(back["metrics"]["zeta"]["a"]) and back["metrics"]["zeta"]["b"] == 1.0
    with pytest.raises(InputError, match="exists"):
        write_metrics({}, path)
    with pytest.raises(InputError, match="reserved"):
        write_metrics({}, tmp_path / "m2.json", extra={"metrics": 1})
    with pytest.raises(InputError, match=r"metrics\.x\.y"):
        write_metrics({"x": {"y": [object()]}}, tmp_path / "m3.json")
    assert not (tmp_path / "m3.json").exists()


def test_detection_qa_figure(pair: Any, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from skydiff.qa import plot_detection_qa

    result = run_pipeline(pair.science, pair.template, pipeline("detect.n_sky_sources=3"))
    path = tmp_path / "qa.png"
    plot_detection_qa(result, path, science=pair.science, n_sources=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="exists"):
        plot_detection_qa(result.detection, path)
    # A detection result alone, no sources at all, and bad arguments.
    empty = run_pipeline(pair.science, pair.science, pipeline("detect.n_sky_sources=0"))
    assert len(empty.detection.catalog) == 0
    plot_detection_qa(empty.detection, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
    with pytest.raises(InputError, match="DetectAndMeasureResult or PipelineResult"):
        plot_detection_qa(result.subtraction, tmp_path / "x.png")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="n_sources"):
        plot_detection_qa(result, tmp_path / "x.png", n_sources=0)
    # Without matplotlib: a one-line InputError naming the extra.
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(InputError, match=r"skydiff\[qa\]"):
        plot_detection_qa(result, tmp_path / "y.png")
