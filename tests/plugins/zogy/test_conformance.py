"""The conformance suite (API and numerical tiers) on the ``zogy`` subtraction.

The API tier runs on the role's shared 128 × 128 sample call; the numerical tier of the
subtraction role (``skydiff.testing._subtraction_checks``: null, linearity, point source and,
since ``zogy`` is tagged ``symmetric``, the swap check) brings its own 128 × 128 pairs.
"""

from __future__ import annotations

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["subtraction:zogy"])
def test_conformance(plugin, check):
    check(plugin)
