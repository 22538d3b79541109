"""The numerical subtraction checks tell good plugins from broken ones.

Toy subtraction plugins (not registered) with known defects are run through the checks of
``skydiff.testing._subtraction_checks``: the naive difference ``S - T`` (exact for the null
pair, linear, antisymmetric) passes them all; a wrong variance plane, an additive offset, a
flux-losing difference and an asymmetric one each fail the check that targets them.
"""

from __future__ import annotations

import numpy as np
import pytest

import skydiff
from skydiff.testing import registered_checks, resolve_plugin
from skydiff.testing._subtraction_checks import (
    check_subtraction_linearity,
    check_subtraction_null,
    check_subtraction_point_source,
    check_subtraction_swap,
)


@skydiff.configclass
class ToyConfig(skydiff.Config):
    """No settings."""


class Naive(skydiff.Subtraction):
    """D = S - a T + c with variance v (V_S + a² V_T); a = 1, c = 0, v = 1 by default."""

    name = "naive"
    ConfigClass = ToyConfig
    tags = frozenset({"linear", "symmetric"})
    scale, offset, variance_factor, flux_factor = 1.0, 0.0, 1.0, 1.0

    def run(self, science, template, *, sources=None):
        image = (self.flux_factor * science.image - self.scale * template.image + self.offset)
        variance = self.variance_factor * (science.variance + self.scale**2 * template.variance)
        mask = science.mask | template.mask
        difference = science.evolve(image=image, variance=variance, mask=mask)
        return skydiff.SubtractionResult(difference=difference, convolved="none")


class WrongVariance(Naive):
    name = "wrong_variance"
    variance_factor = 4.0


class Offset(Naive):
    name = "offset"
    offset = 5.0


class LosesFlux(Naive):
    name = "loses_flux"
    flux_factor = 0.9


class Asymmetric(Naive):
    name = "asymmetric"
    scale = 0.5


def test_checks_are_registered_for_the_subtraction_role():
    names = {check.name: check for check in registered_checks()}
    for name, tags in (("check_subtraction_null", set()),
                       ("check_subtraction_linearity", {"linear"}),
                       ("check_subtraction_point_source", set()),
                       ("check_subtraction_swap", {"symmetric"})):
        check = names[name]
        assert check.tier == "numerical" and check.roles == {"subtraction"}
        assert check.requires_tags == tags


@pytest.mark.parametrize("check", [check_subtraction_null, check_subtraction_linearity,
                                   check_subtraction_point_source, check_subtraction_swap])
def test_the_naive_difference_passes(check):
    check(resolve_plugin(Naive))


@pytest.mark.parametrize(("plugin", "check"), [
    (WrongVariance, check_subtraction_null),
    (Offset, check_subtraction_null),
    (Offset, check_subtraction_linearity),
    (LosesFlux, check_subtraction_point_source),
    (Asymmetric, check_subtraction_swap),
])
def test_defects_are_caught(plugin, check):
    with pytest.raises(AssertionError):
        check(resolve_plugin(plugin))


def test_the_null_pair_is_noise_only():
    from skydiff.testing._subtraction_checks import _null_pair

    pair = _null_pair()
    assert pair.science.psf == pair.template.psf
    assert np.all(np.asarray(pair.truth["flux_science"]) == np.asarray(
        pair.truth["flux_template"]))
