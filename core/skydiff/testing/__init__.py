"""Testing tools for skydiff and its plugins: conformance checks and hypothesis strategies.

This package is public API for plugin authors (it needs the ``testing`` extra:
``pip install skydiff[testing]``).

* :func:`parametrize_with_checks` and :func:`check_plugin` run the conformance suite of
  :mod:`skydiff.testing.checks` on plugins, with an ``"api"`` and a ``"numerical"`` tier;
  :func:`register_check` adds checks.
* :mod:`skydiff.testing.strategies` holds the hypothesis strategies (``psfs()``,
  ``kernels()``, ``exposures()``, ``star_fields()``, ``stamps()``); it is not imported here, so
  that the checks work without hypothesis.
* :mod:`skydiff.testing.pytest_plugin` provides opt-in fixtures (an isolated plugin manager
  and temporary registration): add ``pytest_plugins = ["skydiff.testing.pytest_plugin"]`` to
  your top-level ``conftest.py``.

Examples
--------
A plugin distribution's conformance test::

    from skydiff.testing import parametrize_with_checks

    @parametrize_with_checks(["metric:pixel_stats"])
    def test_conformance(plugin, check):
        check(plugin)
"""

from skydiff.testing.checks import (
    TIERS,
    Check,
    CheckOutcome,
    CheckSkipped,
    ConformanceError,
    PluginUnderTest,
    assert_equivalent,
    check_plugin,
    parametrize_with_checks,
    register_check,
    registered_checks,
    resolve_plugin,
    select_checks,
    unregister_check,
)

__all__ = [
    "TIERS",
    "Check",
    "CheckOutcome",
    "CheckSkipped",
    "ConformanceError",
    "PluginUnderTest",
    "assert_equivalent",
    "check_plugin",
    "parametrize_with_checks",
    "register_check",
    "registered_checks",
    "resolve_plugin",
    "select_checks",
    "unregister_check",
]
