"""Tests of the conformance suite (skydiff.testing.checks) and the opt-in pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import skydiff.config as sc
from skydiff._manager import PluginManager, get_registries
from skydiff.errors import ConfigError, InputError, PluginLoadError
from skydiff.exposure import Exposure
from skydiff.hookspecs import hookimpl
from skydiff.roles import Metric, MetricInputs, MetricResult
from skydiff.testing import (
    CheckSkipped,
    ConformanceError,
    PluginUnderTest,
    check_plugin,
    parametrize_with_checks,
    register_check,
    registered_checks,
    resolve_plugin,
    select_checks,
    unregister_check,
)
from skydiff.testing import checks as checks_module
from skydiff.testing.checks import (
    check_error_types,
    check_pickle,
    check_purity,
    check_registration,
    check_thread_safety,
    differences,
)

pytest_plugins = ["pytester", "skydiff.testing.pytest_plugin"]

EXAMPLE_PLUGIN = (Path(__file__).resolve().parents[1] / "example_plugin" / "skydiff_example"
                  / "__init__.py")

API_CHECKS = ("check_registration", "check_config_defaults", "check_config_roundtrip",
              "check_config_freeze", "check_purity", "check_pickle", "check_result_type",
              "check_error_types", "check_thread_safety", "check_determinism")


# ------------------------------------------------------------------------------------------
# small test plugins


@sc.configclass
class MeanConfig(sc.Config):
    """Options of the test metrics."""

    scale: float = sc.Field(1.0, doc="Multiplier of the mean.")


def _difference(inputs: Any) -> Exposure:
    if not isinstance(inputs, MetricInputs) or not isinstance(inputs.difference, Exposure):
        msg = "needs MetricInputs with a difference Exposure"
        raise InputError(msg)
    return inputs.difference


class MeanMetric(Metric):
    """A correct metric: the mean of the difference image."""

    name = "mean_value"
    ConfigClass = MeanConfig

    def run(self, inputs: MetricInputs) -> MetricResult:
        difference = _difference(inputs)
        return MetricResult(values={"mean": self.config.scale * float(difference.image.mean())})


class ImpureMetric(MeanMetric):
    """Writes a card into the input exposure's header (which is mutable)."""

    name = "impure"

    def run(self, inputs: MetricInputs) -> MetricResult:
        difference = _difference(inputs)
        difference.metadata["TOUCHED"] = True
        return super().run(inputs)


class InPlaceMetric(MeanMetric):
    """Appends a column to the input catalog."""

    name = "in_place"

    def run(self, inputs: MetricInputs) -> MetricResult:
        result = super().run(inputs)
        inputs.catalog["extra"] = np.zeros(len(inputs.catalog))
        return result


class OverwritingMetric(MeanMetric):
    """Writes into a catalog column in place (the suite makes input arrays read-only)."""

    name = "overwriting"

    def run(self, inputs: MetricInputs) -> MetricResult:
        inputs.catalog["x"][0] = -1.0
        return super().run(inputs)


class UnpicklableMetric(MeanMetric):
    """Holds a lock, which cannot be pickled."""

    name = "unpicklable"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()


class ValueErrorMetric(MeanMetric):
    """Raises a plain ValueError on bad input instead of a SkydiffError."""

    name = "value_error"

    def run(self, inputs: MetricInputs) -> MetricResult:
        if not isinstance(inputs.difference, Exposure):
            msg = "difference must be an Exposure"
            raise ValueError(msg)
        return super().run(inputs)


class LenientMetric(MeanMetric):
    """Accepts anything and returns a value even for bad input."""

    name = "lenient"

    def run(self, inputs: MetricInputs) -> MetricResult:
        return MetricResult(values={"mean": float(np.mean(inputs.difference))})


_CALLS = {"count": 0}


class StatefulMetric(MeanMetric):
    """Depends on module-level state: every call returns a new value."""

    name = "stateful"

    def run(self, inputs: MetricInputs) -> MetricResult:
        _difference(inputs)
        _CALLS["count"] += 1
        return MetricResult(values={"calls": float(_CALLS["count"])})


class WrongResultMetric(MeanMetric):
    """Returns a bare dict instead of a MetricResult."""

    name = "wrong_result"

    def run(self, inputs: MetricInputs) -> Any:
        _difference(inputs)
        return {"mean": 0.0}


class ParallelMetric(MeanMetric):
    """Declares the "parallel" tag, which exempts it from the thread-safety check."""

    name = "parallel_mean"
    tags = frozenset({"parallel"})


class NotAPlugin:
    """No role."""

    name = "nothing"


# ------------------------------------------------------------------------------------------
# the API tier on good and bad plugins


def test_correct_plugin_passes_every_check() -> None:
    outcomes = check_plugin(MeanMetric)
    assert [o.check for o in outcomes] == list(API_CHECKS)
    assert {o.status for o in outcomes} == {"passed"}


@pytest.mark.parametrize("plugin", [ImpureMetric, InPlaceMetric], ids=["header", "catalog"])
def test_impure_plugin_fails_check_purity(plugin: type) -> None:
    with pytest.raises(AssertionError, match="modified its inputs"):
        check_purity(resolve_plugin(plugin))
    outcomes = {o.check: o.status for o in check_plugin(plugin, raise_on_failure=False)}
    assert outcomes["check_purity"] == "failed"
    assert outcomes["check_registration"] == "passed"


def test_in_place_write_fails_check_purity() -> None:
    with pytest.raises(ValueError, match="read-only"):
        check_purity(resolve_plugin(OverwritingMetric))


def test_unpicklable_plugin_fails_check_pickle() -> None:
    with pytest.raises(AssertionError, match="cannot be pickled") as info:
        check_pickle(resolve_plugin(UnpicklableMetric))
    assert isinstance(info.value.__cause__, TypeError)


def test_value_error_plugin_fails_check_error_types() -> None:
    with pytest.raises(AssertionError, match="raised ValueError") as info:
        check_error_types(resolve_plugin(ValueErrorMetric))
    assert type(info.value.__cause__) is ValueError


def test_lenient_plugin_fails_check_error_types() -> None:
    with pytest.raises(AssertionError, match="accepted invalid input"):
        check_error_types(resolve_plugin(LenientMetric))


def test_stateful_plugin_fails_determinism_and_thread_safety() -> None:
    outcomes = {o.check: o.status for o in check_plugin(StatefulMetric, raise_on_failure=False)}
    assert outcomes["check_determinism"] == "failed"
    assert outcomes["check_thread_safety"] == "failed"
    assert outcomes["check_purity"] == "passed"


def test_wrong_result_type_fails_check_result_type() -> None:
    outcomes = {o.check: o for o in check_plugin(WrongResultMetric, raise_on_failure=False)}
    assert outcomes["check_result_type"].status == "failed"
    assert isinstance(outcomes["check_result_type"].error, AssertionError)


def test_check_plugin_raises_listing_every_failure() -> None:
    with pytest.raises(ConformanceError) as info:
        check_plugin(StatefulMetric)
    failed = {o.check for o in info.value.outcomes if o.status == "failed"}
    assert failed == {"check_determinism", "check_thread_safety", "check_pickle"}
    for name in failed:
        assert name in str(info.value)


def test_check_plugin_expected_failures_are_xfailed_and_strict() -> None:
    outcomes = check_plugin(ImpureMetric,
                            expected_failed_checks={"check_purity": "writes its header"})
    assert {o.check: o.status for o in outcomes}["check_purity"] == "xfailed"
    with pytest.raises(ConformanceError, match="check_pickle: passed but is listed"):
        check_plugin(MeanMetric, expected_failed_checks={"check_pickle": "not really"})
    with pytest.raises(ConfigError, match="unknown checks"):
        check_plugin(MeanMetric, expected_failed_checks={"check_typo": "?"})


def test_thread_safety_is_not_selected_for_parallel_plugins() -> None:
    assert "check_thread_safety" in {c.name for c in select_checks(MeanMetric)}
    assert "check_thread_safety" not in {c.name for c in select_checks(ParallelMetric)}


def test_registration_check() -> None:
    check_registration(resolve_plugin(MeanMetric))
    with pytest.raises(ConfigError, match="not a plugin class"):
        resolve_plugin(NotAPlugin)
    with pytest.raises(ConfigError, match="role:name"):
        resolve_plugin("pixel_stats")


def test_registration_check_of_a_reference_needs_the_same_class(
        register_plugin: Any) -> None:
    plugin = types.SimpleNamespace(skydiff_register_algorithms=hookimpl(
        lambda registries: registries.metric.add(MeanMetric)))
    register_plugin(plugin, name="mean-plugin", distribution="test-dist")
    resolved = resolve_plugin("metric:mean_value")
    check_registration(resolved)
    impostor = PluginUnderTest("metric", "mean_value", ImpureMetric, frozenset(),
                               "metric:mean_value")
    with pytest.raises(AssertionError, match="resolves to"):
        check_registration(impostor)


# ------------------------------------------------------------------------------------------
# the numerical tier and built-in executors


def test_executor_checks_on_a_minimal_executor() -> None:
    from skydiff.roles import Executor, ExecutorResult

    @sc.configclass
    class NoConfig(sc.Config):
        """No options."""

    class ReversedExecutor(Executor):
        """Runs items in reverse and forgets to restore the order (a bug)."""

        name = "reversed"
        ConfigClass = NoConfig

        def run(self, function: Any, items: Any) -> ExecutorResult:
            results, errors = [], []
            for item in reversed(list(items)):
                try:
                    results.append(function(item))
                    errors.append(None)
                except Exception as exc:
                    results.append(None)
                    errors.append(exc)
            return ExecutorResult(results=results, errors=errors)

    outcomes = {o.check: o.status
                for o in check_plugin(ReversedExecutor, tiers=("numerical",),
                                      raise_on_failure=False)}
    assert outcomes == {"check_executor_order": "failed", "check_executor_failures": "failed"}


def test_builtin_executors_pass_both_tiers(plugin_manager: PluginManager) -> None:
    executors = plugin_manager.registries.executor.names()
    if not executors:
        pytest.skip("no built-in executor is registered (BUILTIN_PLUGINS is empty)")
    for name in executors:
        outcomes = check_plugin(f"executor:{name}")
        assert "check_executor_order" in {o.check for o in outcomes}


# ------------------------------------------------------------------------------------------
# the check registry


def test_register_check_selects_by_role_tier_and_tags() -> None:
    seen: list[str] = []

    @register_check(roles={"metric"}, tier="numerical", requires_tags={"linear"},
                    name="check_test_linear_metric")
    def check_linear(plugin: PluginUnderTest) -> None:
        seen.append(plugin.id)

    try:
        class LinearMetric(MeanMetric):
            """Declares the tag."""

            name = "linear_mean"
            tags = frozenset({"linear"})

        names = [c.name for c in select_checks(LinearMetric, tiers="numerical")]
        assert names == ["check_test_linear_metric"]
        assert select_checks(MeanMetric, tiers="numerical") == []
        assert "check_test_linear_metric" not in [c.name for c in select_checks(LinearMetric,
                                                                                  tiers="api")]
        check_plugin(LinearMetric, tiers=("numerical",))
        assert seen == ["metric:linear_mean"]
        with pytest.raises(ConfigError, match="already registered"):
            register_check(check_linear, name="check_test_linear_metric")
    finally:
        removed = unregister_check("check_test_linear_metric")
    assert removed.tier == "numerical"
    assert "check_test_linear_metric" not in {c.name for c in registered_checks()}


def test_register_check_validates_arguments() -> None:
    with pytest.raises(ConfigError, match="tier"):
        register_check(lambda plugin: None, tier="fast", name="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="role"):
        register_check(lambda plugin: None, roles={"subtractions"}, name="x")
    with pytest.raises(ConfigError, match="not the string"):
        register_check(lambda plugin: None, requires_tags="linear", name="x")
    with pytest.raises(ConfigError, match="no conformance check"):
        unregister_check("x")


def test_skipping_check_is_reported_as_skipped() -> None:
    @register_check(name="check_test_skips")
    def check_skips(plugin: PluginUnderTest) -> None:
        raise CheckSkipped("cannot judge")

    try:
        outcomes = {o.check: o.status for o in check_plugin(MeanMetric)}
    finally:
        unregister_check("check_test_skips")
    assert outcomes["check_test_skips"] == "skipped"


def test_thread_safety_check_reports_a_crashing_thread() -> None:
    class RacyMetric(MeanMetric):
        """Fails when two calls overlap."""

        name = "racy"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._busy = threading.Lock()

        def __reduce__(self) -> Any:  # picklable despite the lock
            return (type(self), ())

        def run(self, inputs: MetricInputs) -> MetricResult:
            if not self._busy.acquire(blocking=False):
                msg = "concurrent call"
                raise RuntimeError(msg)
            try:
                threading.Event().wait(0.05)
                return super().run(inputs)
            finally:
                self._busy.release()

    with pytest.raises(AssertionError, match="concurrently") as info:
        check_thread_safety(resolve_plugin(RacyMetric))
    assert isinstance(info.value.__cause__, RuntimeError)


# ------------------------------------------------------------------------------------------
# structural comparison


def test_differences_compare_structurally() -> None:
    a = {"x": np.array([1.0, np.nan]), "meta": {"run.wall_s": 1.0, "n": 2}, "t": [1, "a"]}
    b = {"x": np.array([1.0, np.nan]), "meta": {"run.wall_s": 2.0, "n": 2}, "t": [1, "a"]}
    assert differences(a, b, ignore_volatile=True) == []
    assert differences(a, b) == ["value['meta']['run.wall_s']: 1.0 became 2.0"]
    c = {**a, "x": np.array([1.0, 2.0])}
    assert differences(a, c, ignore_volatile=True) == ["value['x']: array values differ"]
    assert differences(ValueError("a"), ValueError("a")) == []
    assert differences(ValueError("a"), TypeError("a")) != []


# ------------------------------------------------------------------------------------------
# parametrize_with_checks


def _params(mark: pytest.MarkDecorator) -> list[Any]:
    argnames, params = mark.args
    assert argnames == "plugin, check"
    return list(params)


def test_parametrize_ids_are_readable() -> None:
    params = _params(parametrize_with_checks([MeanMetric, ImpureMetric], tiers=("api",)))
    ids = [p.id for p in params]
    assert ids[0] == "metric:mean_value-check_registration"
    assert "metric:impure-check_purity" in ids
    assert len(ids) == 2 * len(API_CHECKS) == len(set(ids))
    plugin, check = params[0].values
    assert isinstance(plugin, PluginUnderTest) and check.name == "check_registration"


def test_parametrize_expected_failures_become_strict_xfails() -> None:
    mark = parametrize_with_checks(
        [MeanMetric, ImpureMetric],
        expected_failed_checks={ImpureMetric: {"check_purity": "writes its header"}})
    marked = {p.id: p.marks for p in _params(mark) if p.marks}
    assert list(marked) == ["metric:impure-check_purity"]
    (xfail,) = marked["metric:impure-check_purity"]
    assert xfail.name == "xfail"
    assert xfail.kwargs == {"strict": True, "reason": "writes its header"}


def test_parametrize_accepts_a_callable_for_expected_failures() -> None:
    def expected(plugin: PluginUnderTest) -> dict[str, str]:
        return {"check_purity": "known"} if plugin.name == "impure" else {}

    mark = parametrize_with_checks([MeanMetric, ImpureMetric], tiers="api",
                                   expected_failed_checks=expected)
    assert [p.id for p in _params(mark) if p.marks] == ["metric:impure-check_purity"]


def test_parametrize_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="not among the plugins"):
        parametrize_with_checks([MeanMetric], expected_failed_checks={
            "metric:other": {"check_purity": "?"}})
    with pytest.raises(ConfigError, match="unknown checks"):
        parametrize_with_checks([MeanMetric], expected_failed_checks={
            MeanMetric: {"check_purety": "typo"}})
    with pytest.raises(ConfigError, match="tiers"):
        parametrize_with_checks([MeanMetric], tiers=("fast",))


def test_parametrize_runs_items_with_xfail_under_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner="""
        import skydiff.config as sc
        from skydiff.roles import Metric, MetricResult
        from skydiff.testing import parametrize_with_checks


        @sc.configclass
        class Config(sc.Config):
            scale: float = sc.Field(1.0, doc="Multiplier.")


        class Good(Metric):
            name = "good"
            ConfigClass = Config

            def run(self, inputs):
                if not hasattr(inputs.difference, "image"):
                    from skydiff.errors import InputError
                    raise InputError("needs a difference")
                return MetricResult(values={"mean": float(inputs.difference.image.mean())})


        class Impure(Good):
            name = "impure"

            def run(self, inputs):
                result = super().run(inputs)
                inputs.difference.metadata["TOUCHED"] = True
                return result


        @parametrize_with_checks(
            [Good, Impure], tiers=("api",),
            expected_failed_checks={Impure: {"check_purity": "writes its header"},
                                    Good: {"check_pickle": "wrongly listed"}})
        def test_conformance(plugin, check):
            check(plugin)
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q", "-rxX")
    result.assert_outcomes(passed=2 * len(API_CHECKS) - 2, xfailed=1, failed=1)
    result.stdout.fnmatch_lines(["*metric:good-check_pickle*", "*XPASS(strict)*"])


# ------------------------------------------------------------------------------------------
# the fixtures and the example plugin, registered in process


@pytest.fixture
def example_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The example third-party plugin, imported from its source file (not installed)."""
    spec = importlib.util.spec_from_file_location("skydiff_example", EXAMPLE_PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "skydiff_example", module)  # so pickle finds it
    spec.loader.exec_module(module)
    return module


def test_plugin_manager_fixture_is_isolated_and_installed(
        plugin_manager: PluginManager) -> None:
    assert get_registries() is plugin_manager.registries
    assert all(record.distribution == "skydiff" for record in plugin_manager.plugins())
    assert plugin_manager.load_errors == []


def test_register_plugin_fixture_registers_for_the_test(
        register_plugin: Any, plugin_manager: PluginManager,
        example_module: types.ModuleType) -> None:
    name = register_plugin(example_module, name="example", distribution="skydiff-example",
                           version="0.1.0")
    assert name == "example"
    info = get_registries().metric["pixel_stats"]
    assert (info.distribution, info.version, info.target) == (
        "skydiff-example", "0.1.0", example_module.PixelStats)
    with pytest.raises(PluginLoadError):
        register_plugin(example_module, name="example")


def test_example_plugin_passes_check_plugin_in_process(
        register_plugin: Any, example_module: types.ModuleType) -> None:
    register_plugin(example_module, name="example", distribution="skydiff-example",
                    version="0.1.0")
    outcomes = check_plugin("metric:pixel_stats")
    assert [o.check for o in outcomes] == list(API_CHECKS)
    assert {o.status for o in outcomes} == {"passed"}


def test_checks_module_exports_documented_names() -> None:
    for name in checks_module.__all__:
        assert hasattr(checks_module, name), name
