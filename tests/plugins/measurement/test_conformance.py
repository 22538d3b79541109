"""The conformance suite over the built-in measurement plugins (the call third parties make)."""

from __future__ import annotations

from typing import Any

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["measurement:centroid", "measurement:pixel_flags",
                          "measurement:psf_flux", "measurement:aperture_flux",
                          "measurement:shape", "measurement:forced_psf"])
def test_measurement_conformance(plugin: Any, check: Any) -> None:
    check(plugin)
