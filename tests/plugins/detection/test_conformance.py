"""The conformance suite over the built-in ``threshold`` detector (the call third parties make)."""

from __future__ import annotations

from typing import Any

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["detection:threshold"])
def test_detector_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
