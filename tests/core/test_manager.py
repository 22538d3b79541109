"""Tests of skydiff._manager and skydiff.hookspecs: loading, isolation and failure tolerance."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import sys
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

import skydiff
import skydiff._manager as manager_module
from skydiff import hookspecs
from skydiff._manager import (
    PluginManager,
    PluginRecord,
    SkydiffPluginWarning,
    get_manager,
    get_registries,
    use_manager,
)
from skydiff.errors import ConfigError, PluginLoadError
from skydiff.hookspecs import hookimpl
from skydiff.registry import Registries

# Source of small, real plugin modules. Each registers fake Task subclasses.
PLUGIN_HEADER = """
from skydiff.config import Config, Field, configclass
from skydiff.hookspecs import hookimpl
from skydiff.task import Task


@configclass
class FakeConfig(Config):
    level: int = Field(1, doc="A setting.")


def make(name, order=0):
    def run(self):
        return name
    return type(name.title(), (Task,), {"name": name, "ConfigClass": FakeConfig,
                                        "order": order, "run": run})
"""

PLUGINS = {
    "skd_alpha": """
@hookimpl
def skydiff_register_algorithms(registries):
    registries.subtraction.add(make("alpha"))
    registries.metric.add(make("counts"))
""",
    "skd_beta": """
@hookimpl
def skydiff_register_algorithms(registries):
    registries.subtraction.add(make("beta"))
""",
    "skd_duplicate": """
@hookimpl
def skydiff_register_algorithms(registries):
    registries.metric.add(make("unique_metric"))
    registries.subtraction.add(make("alpha"))
""",
    "skd_broken_import": """
raise RuntimeError("this plugin is broken at import")
""",
    "skd_broken_hook": """
@hookimpl
def skydiff_register_algorithms(registries):
    registries.detection.add(make("half_done"))
    raise ValueError("this plugin is broken in its hook")
""",
    "skd_typo_hook": """
@hookimpl
def skydiff_register_algorithm(registries):
    registries.subtraction.add(make("typo"))
""",
    "skd_bad_signature": """
@hookimpl
def skydiff_register_algorithms(registries, extra):
    registries.subtraction.add(make("bad"))
""",
    "skd_wrapper": """
@hookimpl(wrapper=True)
def skydiff_register_algorithms(registries):
    registries.subtraction.add(make("wrapped"))
    return (yield)
""",
    "skd_no_args": """
CALLS = []


@hookimpl
def skydiff_register_algorithms():
    CALLS.append(1)
""",
    "skd_cli": """
@hookimpl
def skydiff_add_cli_commands(subparsers):
    parser = subparsers.add_parser("hello", help="say hello")
    parser.set_defaults(func=lambda args: 0)
""",
    "skd_broken_cli": """
@hookimpl
def skydiff_add_cli_commands(subparsers):
    raise RuntimeError("no commands today")
""",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No autoload switches from the outside, and no role base classes for the fakes."""
    monkeypatch.delenv("SKYDIFF_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("SKYDIFF_PLUGINS", raising=False)
    try:
        roles = importlib.import_module("skydiff.roles")
    except ModuleNotFoundError:
        return
    monkeypatch.setattr(roles, "ROLE_BASES", {}, raising=False)


@pytest.fixture
def plugin_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Write the PLUGINS modules to a temporary directory on sys.path; forget them after."""
    for module_name, body in PLUGINS.items():
        source = PLUGIN_HEADER + textwrap.dedent(body)
        (tmp_path / f"{module_name}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield list(PLUGINS)
    for module_name in PLUGINS:
        sys.modules.pop(module_name, None)


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version


class FakeEntryPoint:
    """What the manager uses of importlib.metadata.EntryPoint: name, dist and load()."""

    def __init__(self, name: str, module: str, dist: FakeDist | None) -> None:
        self.name = name
        self.module = module
        self.dist = dist
        self.group = "skydiff.plugins"

    def load(self) -> Any:
        return importlib.import_module(self.module)


def install_entry_points(monkeypatch: pytest.MonkeyPatch, entry_points: list[Any],
                         ) -> list[str]:
    """Make importlib.metadata.entry_points return ``entry_points``; record groups asked."""
    groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[Any]:
        groups.append(group)
        return [ep for ep in entry_points if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    return groups


def isolated() -> PluginManager:
    manager = PluginManager()
    manager.load(builtins=False, entry_points=False)
    return manager


def error_plugins(manager: PluginManager) -> list[str | None]:
    return [error.plugin for error in manager.load_errors]


# -- registration --------------------------------------------------------------------------


def test_register_real_module(plugin_modules: list[str]) -> None:
    manager = isolated()
    module = importlib.import_module("skd_alpha")
    assert manager.register(module, distribution="skydiff-alpha", version="1.0") == "skd_alpha"
    registries = manager.registries
    entry = registries.subtraction["alpha"]
    assert (entry.provider, entry.distribution, entry.version) == (
        "skd_alpha", "skydiff-alpha", "1.0")
    assert registries.metric.names() == ("counts",)
    assert manager.plugins() == [PluginRecord(
        "skd_alpha", "skydiff-alpha", "1.0", {"subtraction": ("alpha",), "metric": ("counts",)})]


def test_register_module_object_with_explicit_name() -> None:
    @hookimpl
    def skydiff_register_algorithms(registries: Registries) -> None:
        registries.executor.add(Dummy)

    from skydiff.config import Config
    from skydiff.task import Task

    class Dummy(Task):
        name = "dummy"
        ConfigClass = Config

        def run(self) -> None:
            return None

    module = types.ModuleType("inline_plugin")
    module.skydiff_register_algorithms = skydiff_register_algorithms  # type: ignore[attr-defined]
    manager = isolated()
    assert manager.register(module, name="inline") == "inline"
    assert manager.registries.executor["dummy"].provider == "inline"
    assert manager.plugins()[0].distribution is None


def test_opt_in_arguments(plugin_modules: list[str]) -> None:
    manager = isolated()
    module = importlib.import_module("skd_no_args")
    manager.register(module)
    assert module.CALLS == [1]


def test_register_is_loaded_once_per_plugin(plugin_modules: list[str]) -> None:
    manager = isolated()
    manager.register(importlib.import_module("skd_alpha"))
    manager.register(importlib.import_module("skd_beta"))
    assert manager.registries.subtraction.names() == ("alpha", "beta")
    assert [record.name for record in manager.plugins()] == ["skd_alpha", "skd_beta"]


def test_duplicate_algorithm_names_both_distributions(plugin_modules: list[str]) -> None:
    manager = isolated()
    manager.register(importlib.import_module("skd_alpha"), distribution="skydiff-alpha")
    with pytest.raises(PluginLoadError) as error:
        manager.register(importlib.import_module("skd_duplicate"),
                         distribution="skydiff-duplicate")
    message = str(error.value)
    assert "alpha" in message
    assert "skydiff-alpha" in message
    assert "skydiff-duplicate" in message
    assert isinstance(error.value.__cause__, ConfigError)
    assert error.value.plugin == "skd_duplicate"
    assert error.value.distribution == "skydiff-duplicate"
    # nothing of the failed plugin stays registered, the first one is intact
    assert "unique_metric" not in manager.registries.metric
    assert manager.registries.subtraction["alpha"].distribution == "skydiff-alpha"
    assert [record.name for record in manager.plugins()] == ["skd_alpha"]


def test_failing_hook_is_rolled_back(plugin_modules: list[str]) -> None:
    manager = isolated()
    with pytest.raises(PluginLoadError) as error:
        manager.register(importlib.import_module("skd_broken_hook"), distribution="broken")
    assert isinstance(error.value.__cause__, ValueError)
    assert error.value.distribution == "broken"
    assert "half_done" not in manager.registries.detection
    assert manager.plugins() == []
    # the name is free again
    manager.register(importlib.import_module("skd_alpha"), name="skd_broken_hook")
    assert manager.registries.subtraction.names() == ("alpha",)


@pytest.mark.parametrize("module_name", ["skd_typo_hook", "skd_bad_signature", "skd_wrapper"])
def test_invalid_hook_implementations(plugin_modules: list[str], module_name: str) -> None:
    manager = isolated()
    with pytest.raises(PluginLoadError) as error:
        manager.register(importlib.import_module(module_name))
    assert error.value.plugin == module_name
    assert isinstance(error.value.__cause__, pluggy.PluginValidationError)
    assert manager.plugins() == []
    assert all(len(manager.registries[role]) == 0 for role in manager.registries)


def test_typo_hook_lists_valid_hooks(plugin_modules: list[str]) -> None:
    manager = isolated()
    with pytest.raises(PluginLoadError) as error:
        manager.register(importlib.import_module("skd_typo_hook"))
    assert "skydiff_register_algorithm" in str(error.value)
    assert "skydiff_register_algorithms" in str(error.value)


def test_plugin_name_taken(plugin_modules: list[str]) -> None:
    manager = isolated()
    manager.register(importlib.import_module("skd_alpha"), name="same", distribution="one")
    with pytest.raises(PluginLoadError) as error:
        manager.register(importlib.import_module("skd_beta"), name="same", distribution="two")
    assert "one" in str(error.value)
    assert "two" in str(error.value)
    assert manager.registries.subtraction.names() == ("alpha",)


def test_same_object_twice(plugin_modules: list[str]) -> None:
    manager = isolated()
    module = importlib.import_module("skd_alpha")
    manager.register(module)
    with pytest.raises(PluginLoadError):
        manager.register(module, name="again")
    assert manager.registries.subtraction["alpha"].provider == "skd_alpha"


def test_unregister(plugin_modules: list[str]) -> None:
    manager = isolated()
    manager.register(importlib.import_module("skd_alpha"))
    manager.unregister("skd_alpha")
    assert manager.plugins() == []
    assert manager.registries.subtraction.names() == ()
    with pytest.raises(PluginLoadError):
        manager.unregister("skd_alpha")


# -- built-ins -----------------------------------------------------------------------------


def test_builtins_are_lazy_and_load_once(plugin_modules: list[str]) -> None:
    manager = PluginManager(builtin_modules=["skd_alpha", "skd_beta"])
    assert "skd_alpha" not in sys.modules
    registries = manager.registries
    assert "skd_alpha" in sys.modules
    assert registries.subtraction.names() == ("alpha", "beta")
    manager.load()
    assert manager.registries is registries
    assert registries.subtraction.names() == ("alpha", "beta")
    record = manager.plugins()[0]
    assert record.name == "skd_alpha"
    assert record.distribution == "skydiff"
    assert record.version == skydiff.__version__


def test_builtin_failures_are_captured(plugin_modules: list[str]) -> None:
    manager = PluginManager(builtin_modules=[
        "skd_alpha", "skd_broken_import", "skd_broken_hook", "skd_not_there", "skd_beta"])
    with pytest.warns(SkydiffPluginWarning) as warned:
        registries = manager.registries
    assert registries.subtraction.names() == ("alpha", "beta")
    assert "half_done" not in registries.detection
    assert error_plugins(manager) == ["skd_broken_import", "skd_broken_hook", "skd_not_there"]
    assert all(error.distribution == "skydiff" for error in manager.load_errors)
    assert isinstance(manager.load_errors[0].__cause__, RuntimeError)
    assert isinstance(manager.load_errors[1].__cause__, ValueError)
    assert isinstance(manager.load_errors[2].__cause__, ModuleNotFoundError)
    assert len(warned) == 3
    assert registries.load_errors == manager.load_errors
    assert [record.name for record in manager.plugins()] == ["skd_alpha", "skd_beta"]


def test_builtin_plugins_default(plugin_modules: list[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "BUILTIN_PLUGINS", ("skd_beta",))
    manager = PluginManager()
    manager.load(entry_points=False)
    assert manager.registries.subtraction.names() == ("beta",)


def test_load_without_builtins(plugin_modules: list[str]) -> None:
    manager = PluginManager(builtin_modules=["skd_alpha"])
    manager.load(builtins=False, entry_points=False)
    assert manager.registries.subtraction.names() == ()
    assert "skd_alpha" not in sys.modules


def test_builtins_module_names_are_strings() -> None:
    assert isinstance(manager_module.BUILTIN_PLUGINS, tuple)
    assert all(isinstance(name, str) for name in manager_module.BUILTIN_PLUGINS)


# -- entry points --------------------------------------------------------------------------


def entry_point_set() -> list[Any]:
    return [
        FakeEntryPoint("alpha", "skd_alpha", FakeDist("skydiff-alpha", "1.0")),
        FakeEntryPoint("broken", "skd_broken_import", FakeDist("skydiff-broken", "0.1")),
        FakeEntryPoint("hooky", "skd_broken_hook", FakeDist("skydiff-hooky", "0.2")),
        FakeEntryPoint("beta", "skd_beta", FakeDist("skydiff-beta", "2.0")),
    ]


def test_entry_points_are_loaded_one_by_one(plugin_modules: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    groups = install_entry_points(monkeypatch, entry_point_set())
    manager = PluginManager(builtin_modules=[])
    with pytest.warns(SkydiffPluginWarning):
        registries = manager.registries
    assert groups == ["skydiff.plugins"]
    assert registries.subtraction.names() == ("alpha", "beta")
    assert registries.subtraction["beta"].distribution == "skydiff-beta"
    assert registries.subtraction["beta"].version == "2.0"
    assert [(r.name, r.distribution, r.version) for r in manager.plugins()] == [
        ("alpha", "skydiff-alpha", "1.0"), ("beta", "skydiff-beta", "2.0")]
    assert [(e.plugin, e.distribution) for e in manager.load_errors] == [
        ("broken", "skydiff-broken"), ("hooky", "skydiff-hooky")]
    assert "skydiff-broken" in str(manager.load_errors[0])


def test_entry_point_duplicate_names_both_distributions(
        plugin_modules: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_points(monkeypatch, [
        FakeEntryPoint("alpha", "skd_alpha", FakeDist("skydiff-alpha", "1.0")),
        FakeEntryPoint("dup", "skd_duplicate", FakeDist("skydiff-dup", "3.0")),
    ])
    manager = PluginManager(builtin_modules=[])
    with pytest.warns(SkydiffPluginWarning):
        manager.load()
    (error,) = manager.load_errors
    assert (error.plugin, error.distribution) == ("dup", "skydiff-dup")
    assert "skydiff-alpha" in str(error)
    assert "skydiff-dup" in str(error)
    assert "unique_metric" not in manager.registries.metric


def test_entry_point_clashing_with_builtin(plugin_modules: list[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_points(monkeypatch, [
        FakeEntryPoint("dup", "skd_duplicate", FakeDist("skydiff-dup", "3.0"))])
    manager = PluginManager(builtin_modules=["skd_alpha"])
    with pytest.warns(SkydiffPluginWarning):
        manager.load()
    (error,) = manager.load_errors
    assert "skydiff-dup" in str(error)
    assert "'skydiff'" in str(error)
    assert manager.registries.subtraction["alpha"].provider == "skd_alpha"


def test_real_entry_point_without_distribution(plugin_modules: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    entry_point = importlib.metadata.EntryPoint("beta", "skd_beta", "skydiff.plugins")
    install_entry_points(monkeypatch, [entry_point])
    manager = PluginManager(builtin_modules=[])
    assert manager.registries.subtraction["beta"].provider == "beta"
    assert manager.plugins()[0].distribution is None


@pytest.mark.parametrize("value", ["1", "true", "yes", "anything"])
def test_disable_autoload(plugin_modules: list[str], monkeypatch: pytest.MonkeyPatch,
                          value: str) -> None:
    groups = install_entry_points(monkeypatch, entry_point_set())
    monkeypatch.setenv("SKYDIFF_DISABLE_PLUGIN_AUTOLOAD", value)
    manager = PluginManager(builtin_modules=["skd_alpha"])
    assert manager.registries.subtraction.names() == ("alpha",)
    assert manager.plugins()[0].distribution == "skydiff"
    assert groups == []
    assert manager.load_errors == []


@pytest.mark.parametrize("value", ["", "0", "false", "No", " off "])
def test_autoload_falsy_values(plugin_modules: list[str], monkeypatch: pytest.MonkeyPatch,
                               value: str) -> None:
    install_entry_points(monkeypatch, entry_point_set()[:1])
    monkeypatch.setenv("SKYDIFF_DISABLE_PLUGIN_AUTOLOAD", value)
    manager = PluginManager(builtin_modules=[])
    assert manager.registries.subtraction.names() == ("alpha",)


def test_allow_list(plugin_modules: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_points(monkeypatch, entry_point_set())
    monkeypatch.setenv("SKYDIFF_PLUGINS", " beta , nothing_by_this_name")
    manager = PluginManager(builtin_modules=[])
    assert manager.registries.subtraction.names() == ("beta",)
    assert manager.load_errors == []
    assert "skd_broken_import" not in sys.modules


def test_empty_allow_list_loads_no_entry_point(plugin_modules: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_points(monkeypatch, entry_point_set())
    monkeypatch.setenv("SKYDIFF_PLUGINS", "")
    manager = PluginManager(builtin_modules=["skd_beta"])
    assert manager.registries.subtraction.names() == ("beta",)


def test_load_without_entry_points(plugin_modules: list[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    groups = install_entry_points(monkeypatch, entry_point_set())
    manager = PluginManager(builtin_modules=[])
    manager.load(entry_points=False)
    assert groups == []
    assert manager.registries.subtraction.names() == ()


def test_custom_group(plugin_modules: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    groups = install_entry_points(monkeypatch, [])
    PluginManager(builtin_modules=[], group="other.group").load()
    assert groups == ["other.group"]


# -- command-line hook ---------------------------------------------------------------------


def test_add_cli_commands(plugin_modules: list[str]) -> None:
    manager = isolated()
    for name in ("skd_broken_cli", "skd_cli", "skd_alpha"):
        manager.register(importlib.import_module(name))
    parser = argparse.ArgumentParser(prog="skydiff")
    subparsers = parser.add_subparsers(dest="command")
    with pytest.warns(SkydiffPluginWarning):
        manager.add_cli_commands(subparsers)
    assert parser.parse_args(["hello"]).command == "hello"
    (error,) = manager.load_errors
    assert error.plugin == "skd_broken_cli"
    assert isinstance(error.__cause__, RuntimeError)


def test_hook_relay_loads_plugins(plugin_modules: list[str]) -> None:
    manager = PluginManager(builtin_modules=["skd_cli"])
    parser = argparse.ArgumentParser(prog="skydiff")
    manager.hook.skydiff_add_cli_commands(subparsers=parser.add_subparsers(dest="command"))
    assert parser.parse_args(["hello"]).command == "hello"


def test_hook_relay(plugin_modules: list[str]) -> None:
    manager = isolated()
    manager.register(importlib.import_module("skd_cli"))
    parser = argparse.ArgumentParser(prog="skydiff")
    manager.hook.skydiff_add_cli_commands(subparsers=parser.add_subparsers(dest="command"))
    assert parser.parse_args(["hello"]).command == "hello"


# -- process-wide manager ------------------------------------------------------------------


def test_get_manager_is_a_singleton() -> None:
    assert get_manager() is get_manager()


def test_use_manager_swaps_and_restores(plugin_modules: list[str]) -> None:
    outer = get_manager()
    with use_manager() as manager:
        assert get_manager() is manager
        assert manager is not outer
        manager.register(importlib.import_module("skd_alpha"))
        assert get_registries().subtraction.names() == ("alpha",)
        inner = PluginManager(builtin_modules=["skd_beta"])
        with use_manager(inner) as same:
            assert same is inner
            assert get_registries().subtraction.names() == ("beta",)
        assert get_manager() is manager
    assert get_manager() is outer


def test_use_manager_restores_on_error() -> None:
    outer = get_manager()
    with pytest.raises(RuntimeError), use_manager():
        raise RuntimeError("boom")
    assert get_manager() is outer


def test_default_use_manager_is_empty() -> None:
    with use_manager() as manager:
        registries = get_registries()
    assert all(len(registries[role]) == 0 for role in registries)
    assert manager.plugins() == []


def test_concurrent_first_access_loads_once(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "skd_counting.py").write_text(PLUGIN_HEADER + textwrap.dedent("""
        import time
        CALLS = []


        @hookimpl
        def skydiff_register_algorithms(registries):
            CALLS.append(1)
            time.sleep(0.05)
            registries.subtraction.add(make("counted"))
        """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "skd_counting", raising=False)
    manager = PluginManager(builtin_modules=["skd_counting"])
    barrier = threading.Barrier(4)
    seen: list[tuple[Registries, tuple[str, ...]]] = []

    def worker() -> None:
        barrier.wait()
        registries = manager.registries
        seen.append((registries, registries.subtraction.names()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sys.modules["skd_counting"].CALLS == [1]
    assert len(seen) == 4
    # every thread waited for the load to finish and got the same registries
    assert all(registries is seen[0][0] for registries, _ in seen)
    assert all(names == ("counted",) for _, names in seen)
    sys.modules.pop("skd_counting", None)


# -- hook specifications -------------------------------------------------------------------


HOOKS = ("skydiff_register_algorithms", "skydiff_add_cli_commands")


def hookspec_functions() -> list[Callable[..., Any]]:
    return [getattr(hookspecs, name) for name in HOOKS]


def test_hookspecs_are_registered() -> None:
    manager = isolated()
    for name in HOOKS:
        caller = getattr(manager.hook, name)
        assert caller.has_spec()
        assert caller.spec is not None
        assert caller.spec.opts["firstresult"] is False
    assert sorted(n for n in vars(hookspecs) if n.startswith("skydiff_")) == sorted(HOOKS)


@pytest.mark.parametrize("function", hookspec_functions(), ids=HOOKS)
def test_hookspecs_are_typed_and_documented(function: Callable[..., Any]) -> None:
    signature = inspect.signature(function)
    assert all(p.annotation is not inspect.Parameter.empty
               for p in signature.parameters.values())
    assert signature.return_annotation == "None"
    doc = inspect.getdoc(function) or ""
    for section in ("Parameters", "Returns", "Call order", "firstresult"):
        assert section in doc


def test_hookimpl_marker_matches_project() -> None:
    assert hookimpl.project_name == hookspecs.PROJECT_NAME == "skydiff"
