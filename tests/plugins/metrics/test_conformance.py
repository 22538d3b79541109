"""The conformance suite over the built-in metrics (the call third parties make)."""

from __future__ import annotations

from typing import Any

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["metric:source_count", "metric:dia_fraction",
                          "metric:residual_footprint_ratio", "metric:spatial"])
def test_metric_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
