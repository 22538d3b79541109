"""Every built-in plugin passes the public conformance suite, exactly as a third party would.

The built-ins are enumerated from the registries when this module is collected, so a new
built-in algorithm is checked without touching this file. Known, accepted failures go in
``EXPECTED_FAILED_CHECKS`` with a reason; they become strict xfails, so fixing the plugin
forces removing the entry.
"""

from __future__ import annotations

from typing import Any

from skydiff import get_registries
from skydiff.testing import parametrize_with_checks

#: ``{"role:name": {check name: reason}}`` of known failures of built-in plugins.
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {}


def builtin_plugins() -> list[str]:
    """``"role:name"`` of every algorithm registered by skydiff itself, role by role."""
    registries = get_registries()
    return [f"{role}:{name}" for role in registries
            for name, info in registries[role].items() if info.distribution == "skydiff"]


BUILTINS = builtin_plugins()


def test_builtins_are_registered() -> None:
    assert BUILTINS, "no built-in plugin is registered; check skydiff.BUILTIN_PLUGINS"
    assert not get_registries().load_errors


@parametrize_with_checks(BUILTINS, expected_failed_checks=EXPECTED_FAILED_CHECKS)
def test_builtin_plugin_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
