"""The examples in the metric plugins' docstrings run (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["_counts", "_footprint", "_spatial"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"skydiff_plugins.metrics.{name}")
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0
