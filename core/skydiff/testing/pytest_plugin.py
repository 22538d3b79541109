"""Opt-in pytest fixtures for testing skydiff plugins.

The plugin is *not* registered through the ``pytest11`` entry point, so installing skydiff never
changes anyone's test runs. Enable it in your top-level ``conftest.py``::

    pytest_plugins = ["skydiff.testing.pytest_plugin"]

Fixtures
--------
``plugin_manager``
    An isolated :class:`~skydiff._manager.PluginManager` holding the built-in algorithms only
    (installed third-party plugins are never autoloaded), installed as the process-wide
    manager with :func:`~skydiff._manager.use_manager` for the duration of the test, so
    that registry lookups and :func:`~skydiff.config.RegistryField` selections see it.
``register_plugin``
    ``register_plugin(module_or_object, *, name=None, distribution=None, version=None)``
    registers a plugin (a module or object with ``@skydiff.hookimpl`` functions) with that
    isolated manager for the test's duration and returns its plugin name.

This module imports neither hypothesis nor any plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from skydiff._manager import PluginManager, use_manager
from skydiff.errors import PluginLoadError

__all__ = ["plugin_manager", "register_plugin"]


@pytest.fixture
def plugin_manager() -> Iterator[PluginManager]:
    """An isolated plugin manager with the built-in plugins only, installed for this test.

    Yields
    ------
    PluginManager
        The manager (already loaded: built-ins, no entry points); the previous process-wide
        manager is restored afterwards.

    Examples
    --------
    ::

        def test_serial_is_builtin(plugin_manager):
            assert "serial" in plugin_manager.registries.executor
    """
    manager = PluginManager()
    manager.load(builtins=True, entry_points=False)
    with use_manager(manager):
        yield manager


@pytest.fixture
def register_plugin(plugin_manager: PluginManager) -> Iterator[Callable[..., str]]:
    """Register plugins with the isolated :func:`plugin_manager` for this test.

    Yields
    ------
    callable
        ``register(plugin, *, name=None, distribution=None, version=None) -> str``, which
        calls :meth:`PluginManager.register` (raising
        :class:`~skydiff.errors.PluginLoadError` for an invalid plugin) and returns the
        plugin name. Every plugin registered this way is unregistered afterwards.

    Examples
    --------
    ::

        import my_plugin

        def test_my_metric_is_selectable(register_plugin):
            register_plugin(my_plugin, distribution="my-plugin")
            ...
    """
    registered: list[str] = []

    def register(plugin: object, *, name: str | None = None, distribution: str | None = None,
                 version: str | None = None) -> str:
        plugin_name = plugin_manager.register(plugin, name=name, distribution=distribution,
                                              version=version)
        registered.append(plugin_name)
        return plugin_name

    yield register
    for plugin_name in reversed(registered):
        try:
            plugin_manager.unregister(plugin_name)
        except PluginLoadError:  # the test unregistered it itself
            continue
