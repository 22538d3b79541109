"""The conformance suite (API and numerical tiers) on the psfmatch plugins.

The API tier runs on the role's shared 128 × 128 sample call; the numerical tier of the
subtraction role (``skydiff.testing._subtraction_checks``) brings its own 128 × 128 pairs.
A subtraction needs the larger sample: a kernel stamp is 2K + 1 = 43 pixels (K = 21, the
smallest Alard–Lupton kernel), so a kernel source must lie 21 pixels from every edge, and the
default spatial model (kernel order 1, background order 2) needs six of them. ``model_psf``
needs no stars: its kernel candidates are the two PSF models on a 5 × 5 grid.
"""

from __future__ import annotations

from skydiff.testing import parametrize_with_checks


@parametrize_with_checks(["subtraction:al", "subtraction:al_preconvolve", "subtraction:model_psf",
                          "kernel_basis:al", "kernel_basis:df"])
def test_conformance(plugin, check):
    check(plugin)
