"""The decorrelation plugins pass the public conformance suite, as a third party's would."""

from __future__ import annotations

from typing import Any

from skydiff.testing import parametrize_with_checks

PLUGINS = ["decorrelation:none", "decorrelation:dmtn021", "decorrelation:dmtn021_spatial",
           "decorrelation:score"]


@parametrize_with_checks(PLUGINS)
def test_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
