"""Tests of skydiff.task: Task construction, subtasks, metadata and timers."""

from __future__ import annotations

import importlib
import logging
import math
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from skydiff._manager import PluginManager, use_manager
from skydiff.config import (
    Config,
    ConfigField,
    ConfigurableField,
    ConfigurableInstance,
    Field,
    RegistryField,
    RegistrySelection,
    configclass,
)
from skydiff.errors import ConfigError
from skydiff.hookspecs import hookimpl
from skydiff.registry import Registries
from skydiff.task import Task, TaskMetadata

# -- fake tasks ----------------------------------------------------------------------------


@configclass
class ScaleConfig(Config):
    factor: float = Field(2.0, doc="Multiplier.")
    low: float = Field(0.0, doc="Lower limit.")
    high: float = Field(10.0, doc="Upper limit.")

    def _validate(self) -> None:
        if self.low >= self.high:
            msg = "low must be below high"
            raise ConfigError(msg)


class Scale(Task):
    ConfigClass = ScaleConfig
    default_name = "scale"

    def __init__(self, config: Config | None = None, *, name: str | None = None,
                 parent: Task | None = None, **extra: Any) -> None:
        super().__init__(config, name=name, parent=parent)
        self.extra = extra

    def run(self, value: float) -> float:
        with self.timer("run"):
            self.metadata["n_calls"] = self.metadata.get("n_calls", 0) + 1
            return value * self.config.factor


class Offset(Scale):
    default_name = "offset"

    def run(self, value: float) -> float:
        return value + self.config.factor


@configclass
class AlgoConfig(Config):
    strength: int = Field(1, doc="Strength of the fake algorithm.")


class FakeAlgorithm(Task):
    ConfigClass = AlgoConfig

    def run(self) -> str:
        return type(self).name  # type: ignore[attr-defined, no-any-return]


class Alpha(FakeAlgorithm):
    name = "alpha"


class Beta(FakeAlgorithm):
    name = "beta"


class First(FakeAlgorithm):
    name = "first"
    order = 1


class Second(FakeAlgorithm):
    name = "second"
    order = 2


@hookimpl
def skydiff_register_algorithms(registries: Registries) -> None:
    registries.subtraction.add(Alpha)
    registries.subtraction.add(Beta)
    registries.metric.add(Second)
    registries.metric.add(First)


FAKE_PLUGIN = types.ModuleType("skydiff_fake_task_plugin")
FAKE_PLUGIN.skydiff_register_algorithms = skydiff_register_algorithms  # type: ignore[attr-defined]


@configclass
class ParentConfig(Config):
    scale: ConfigurableInstance = ConfigurableField(Scale, doc="The scaling step.")
    subtract: RegistrySelection = RegistryField("subtraction", default="alpha",
                                                doc="The subtraction algorithm.")
    metrics: RegistrySelection = RegistryField("metric", default=["second", "first"],
                                               doc="Metrics.")
    extra: RegistrySelection = RegistryField("subtraction", default=None, optional=True,
                                             doc="Optional extra step.")
    plain: ScaleConfig = ConfigField(ScaleConfig, doc="A nested config, not a subtask.")
    threshold: float = Field(5.0, doc="A plain setting.")
    run_twice: bool = Field(False, doc="Shadows nothing but is not a subtask.")
    log: float = Field(1.0, doc="A field whose name is a Task attribute.")


class Parent(Task):
    ConfigClass = ParentConfig
    default_name = "pipeline"

    def run(self) -> dict[str, Any]:
        with self.timer("run"):
            return {"scaled": self.scale.run(1.0), "subtract": self.subtract.run()}


@pytest.fixture(autouse=True)
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginManager]:
    try:
        roles = importlib.import_module("skydiff.roles")
    except ModuleNotFoundError:
        roles = None
    if roles is not None:
        monkeypatch.setattr(roles, "ROLE_BASES", {}, raising=False)
    with use_manager() as manager:
        manager.register(FAKE_PLUGIN, name="fake", distribution="skydiff-fake", version="0.1")
        yield manager


# -- TaskMetadata --------------------------------------------------------------------------


def test_metadata_dotted_keys() -> None:
    metadata = TaskMetadata()
    metadata["fit.n_stars"] = 12
    metadata["fit.chi2"] = 1.5
    metadata["label"] = "ok"
    assert metadata["fit.n_stars"] == 12
    assert isinstance(metadata["fit"], TaskMetadata)
    assert metadata["fit"]["chi2"] == 1.5
    assert "fit.chi2" in metadata
    assert "fit.missing" not in metadata
    assert "label.deeper" not in metadata
    assert list(metadata) == ["fit", "label"]
    assert len(metadata) == 2
    assert metadata.to_dict() == {"fit": {"n_stars": 12, "chi2": 1.5}, "label": "ok"}
    metadata["fit.n_stars"] = 13  # assignment replaces, it does not accumulate
    assert metadata["fit.n_stars"] == 13
    del metadata["fit.chi2"]
    assert metadata.to_dict() == {"fit": {"n_stars": 13}, "label": "ok"}
    assert "TaskMetadata" in repr(metadata)


def test_metadata_value_conversion() -> None:
    metadata = TaskMetadata({"nested": {"a": 1}})
    metadata["np_float"] = np.float32(0.5)
    metadata["np_int"] = np.int64(3)
    metadata["np_bool"] = np.bool_(True)
    metadata["values"] = [1, 2.5, "x", np.float64(4.0)]
    metadata["array"] = np.arange(3)
    assert type(metadata["np_float"]) is float
    assert type(metadata["np_int"]) is int
    assert metadata["np_bool"] is True
    assert metadata["values"] == (1, 2.5, "x", 4.0)
    assert all(type(v) is int for v in metadata["array"])
    data = metadata.to_dict()
    assert data["values"] == [1, 2.5, "x", 4.0]
    assert data["array"] == [0, 1, 2]
    assert data["nested"] == {"a": 1}


@pytest.mark.parametrize("value", [None, object(), [[1, 2]], np.zeros((2, 2)), {1, 2},
                                   [None]])
def test_metadata_rejects_non_scalars(value: Any) -> None:
    metadata = TaskMetadata()
    with pytest.raises(TypeError):
        metadata["key"] = value
    assert "key" not in metadata


def test_metadata_key_errors() -> None:
    metadata = TaskMetadata()
    metadata["scalar"] = 1
    with pytest.raises(TypeError):
        metadata["scalar.below"] = 2
    for key in ("", "a..b", ".a", 3):
        with pytest.raises(TypeError):
            metadata[key] = 1  # type: ignore[index]
    with pytest.raises(KeyError):
        _ = metadata["missing"]
    with pytest.raises(KeyError):
        _ = metadata["missing.deeper"]
    with pytest.raises(KeyError):
        del metadata["missing.deeper"]
    assert metadata.to_dict() == {"scalar": 1}


def test_metadata_nests_by_reference() -> None:
    child = TaskMetadata()
    parent = TaskMetadata()
    parent["child"] = child
    child["x"] = 1
    assert parent.to_dict() == {"child": {"x": 1}}


# -- construction --------------------------------------------------------------------------


def test_task_is_abstract() -> None:
    with pytest.raises(TypeError):
        Task()  # type: ignore[abstract]

    class NoRun(Task):
        default_name = "no_run"

    with pytest.raises(TypeError):
        NoRun()  # type: ignore[abstract]


def test_default_config_name_and_logger() -> None:
    task = Scale()
    assert task.config == ScaleConfig()
    assert task.config.frozen
    assert task.name == "scale"
    assert task.full_name == "scale"
    assert task.parent is None
    assert isinstance(task.log, logging.Logger)
    assert task.log.name == "skydiff.scale"
    assert task.run(3.0) == 6.0
    assert "scale" in repr(task)


def test_explicit_name() -> None:
    task = Scale(name="custom")
    assert task.full_name == "custom"
    assert task.log.name == "skydiff.custom"


def test_name_is_required() -> None:
    class Nameless(Task):
        def run(self) -> None:
            return None

    with pytest.raises(ConfigError, match="name"):
        Nameless()
    with pytest.raises(ConfigError):
        Scale(name="")


def test_given_config_is_copied_then_frozen() -> None:
    config = ScaleConfig(factor=3.0)
    task = Scale(config)
    assert task.config == config
    assert task.config is not config
    assert task.config.frozen
    assert not config.frozen
    config.factor = 4.0  # the caller's config stays theirs
    assert task.config.factor == 3.0
    with pytest.raises(ConfigError):
        task.config.factor = 5.0


def test_frozen_config_is_used_as_is() -> None:
    config = ScaleConfig(factor=3.0)
    config.freeze()
    assert Scale(config).config is config


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="low"):
        Scale(ScaleConfig(low=20.0))


def test_config_type_is_checked() -> None:
    with pytest.raises(ConfigError) as error:
        Scale(AlgoConfig())
    assert "ScaleConfig" in str(error.value)
    assert "AlgoConfig" in str(error.value)


def test_registry_name_and_task_name_are_distinct() -> None:
    task = Alpha(name="subtract")
    assert task.name == "subtract"
    assert type(task).name == "alpha"


# -- subtasks ------------------------------------------------------------------------------


def test_make_subtask_configurable() -> None:
    config = ParentConfig()
    config.scale.factor = 4.0
    parent = Parent(config)
    scale = parent.make_subtask("scale", flavour="x")
    assert parent.scale is scale
    assert isinstance(scale, Scale)
    assert scale.parent is parent
    assert scale.name == "scale"
    assert scale.full_name == "pipeline.scale"
    assert scale.log.name == "skydiff.pipeline.scale"
    assert scale.config is parent.config.scale.config
    assert scale.config.factor == 4.0
    assert scale.extra == {"flavour": "x"}


def test_make_subtask_configurable_retargeted() -> None:
    config = ParentConfig()
    config.scale.retarget(Offset)
    parent = Parent(config)
    assert isinstance(parent.make_subtask("scale"), Offset)
    assert parent.scale.run(1.0) == 3.0


def test_make_subtask_registry_single() -> None:
    config = ParentConfig()
    config.subtract.name = "beta"
    config.subtract["beta"].strength = 3
    parent = Parent(config)
    subtask = parent.make_subtask("subtract")
    assert isinstance(subtask, Beta)
    assert parent.subtract is subtask
    assert subtask.name == "subtract"
    assert subtask.full_name == "pipeline.subtract"
    assert subtask.config.strength == 3
    assert subtask.config is parent.config.subtract.active


def test_make_subtask_registry_multi() -> None:
    parent = Parent()
    subtasks = parent.make_subtask("metrics")
    assert list(subtasks) == ["first", "second"]
    assert [type(task) for task in subtasks.values()] == [First, Second]
    assert subtasks["first"].full_name == "pipeline.metrics.first"
    assert subtasks["first"].config is parent.config.metrics["first"]
    assert parent.metrics is subtasks
    subtasks["second"].metadata["value"] = 1.0
    assert parent.metadata.to_dict()["metrics"] == {"first": {}, "second": {"value": 1.0}}


def test_make_subtask_empty_optional_selection() -> None:
    parent = Parent()
    assert parent.make_subtask("extra") is None
    assert parent.extra is None


@pytest.mark.parametrize("name", ["threshold", "plain", "run_twice", "nope"])
def test_make_subtask_needs_a_subtask_field(name: str) -> None:
    parent = Parent()
    with pytest.raises(ConfigError) as error:
        parent.make_subtask(name)
    message = str(error.value)
    assert name in message
    for valid in ("extra", "metrics", "scale", "subtract"):
        assert valid in message


@pytest.mark.parametrize("name", ["log", "run", "metadata", "config", "timer"])
def test_make_subtask_refuses_to_shadow_attributes(name: str) -> None:
    parent = Parent()
    before = getattr(parent, name)
    with pytest.raises(ConfigError):
        parent.make_subtask(name)
    assert getattr(parent, name) == before


def test_subtask_config_from_parent() -> None:
    config = ParentConfig()
    config.scale.factor = 7.0
    config.plain.factor = 9.0
    config.subtract["alpha"].strength = 2
    parent = Parent(config)
    assert Scale(name="scale", parent=parent).config.factor == 7.0
    assert Scale(name="plain", parent=parent).config.factor == 9.0
    assert Alpha(name="subtract", parent=parent).config.strength == 2
    with pytest.raises(ConfigError) as error:
        Scale(name="threshold", parent=parent)
    assert "pipeline.threshold" in str(error.value)
    with pytest.raises(ConfigError):
        Alpha(name="metrics", parent=parent)  # multi selection: pass config=
    with pytest.raises(ConfigError):
        Scale(name="subtract", parent=parent)  # wrong config class


def test_nested_metadata_and_logger_hierarchy() -> None:
    parent = Parent()
    parent.make_subtask("scale")
    parent.make_subtask("subtract")
    result = parent.run()
    assert result == {"scaled": 2.0, "subtract": "alpha"}
    data = parent.metadata.to_dict()
    assert data["scale"]["n_calls"] == 1
    assert set(data["scale"]["run"]) == {"wall_s", "cpu_s", "max_rss_mb"}
    assert set(data["run"]) == {"wall_s", "cpu_s", "max_rss_mb"}
    assert data["subtract"] == {}
    assert parent.scale.log.parent is not None
    assert logging.getLogger("skydiff.pipeline").getChild("scale") is parent.scale.log


# -- timers --------------------------------------------------------------------------------


def test_timer_records_wall_cpu_and_memory() -> None:
    task = Scale()
    with task.timer("sleep"):
        time.sleep(0.02)
    with task.timer("busy.loop"):
        total = sum(range(200_000))
    assert total > 0
    sleep = task.metadata["sleep"]
    assert sleep["wall_s"] >= 0.02
    assert 0.0 <= sleep["cpu_s"] < sleep["wall_s"]
    assert sleep["max_rss_mb"] > 1.0
    assert task.metadata["busy.loop.cpu_s"] >= 0.0
    assert math.isfinite(task.metadata["busy.loop.wall_s"])


def test_timer_records_on_error() -> None:
    task = Scale()
    with pytest.raises(RuntimeError), task.timer("failing"):
        raise RuntimeError("boom")
    assert set(task.metadata["failing"]) == {"wall_s", "cpu_s", "max_rss_mb"}


def test_timer_overwrites() -> None:
    task = Scale()
    with task.timer("step"):
        time.sleep(0.02)
    with task.timer("step"):
        pass
    assert task.metadata["step.wall_s"] < 0.02


def test_timer_records_traced_peak_of_nested_blocks():
    import tracemalloc

    import numpy as np

    import skydiff
    from skydiff.task import Task

    @skydiff.configclass
    class ProbeConfig(skydiff.Config):
        size: int = skydiff.Field(1, doc="Unused.")

    class Probe(Task):
        ConfigClass = ProbeConfig
        default_name = "probe"

        def run(self) -> None:
            with self.timer("outer"):
                big = np.ones(4_000_000)  # 32 MB, freed before the inner block
                del big
                with self.timer("inner"):
                    small = np.ones(1_000_000)  # 8 MB
                    del small

    tracemalloc.start()
    try:
        task = Probe()
        task.run()
    finally:
        tracemalloc.stop()
    meta = task.metadata.to_dict()
    assert 30 < meta["outer"]["peak_mb"] < 34
    assert 7 < meta["inner"]["peak_mb"] < 9



def test_timer_yields_its_record_filled_on_exit() -> None:
    task = Scale()
    timings: dict[str, dict[str, float]] = {}
    with task.timer("step") as timings["step"]:
        time.sleep(0.02)
        assert timings["step"] == {}  # filled when the block ends
    assert set(timings["step"]) == {"wall_s", "cpu_s"}
    assert timings["step"]["wall_s"] == task.metadata["step.wall_s"] >= 0.02
    assert timings["step"]["cpu_s"] == task.metadata["step.cpu_s"]
