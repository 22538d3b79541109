"""The conformance suite over the dipole plugins (the call third parties make)."""

from __future__ import annotations

from typing import Any

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["measurement:dipole_fit", "dipole_classifier:sn_flux_ratio",
                          "dipole_classifier:chi2"])
def test_dipole_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
