"""The conformance suite over the built-in PSF estimators (the call third parties make)."""

from __future__ import annotations

from typing import Any

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["psf_estimator:empirical", "psf_estimator:gaussian_moments"])
def test_psf_estimator_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
