"""Input preparation helpers of the PSF-matching plugins (``_common``) against plain NumPy.

Mask bookkeeping with different bit layouts, the separable evaluation of
spatial polynomials and the BLAS-serial matrix product.
"""

from __future__ import annotations

import numpy as np
import pytest

import skydiff
from skydiff_plugins.psfmatch._common import (
    mask_hygiene,
    merge_masks,
    spatial_image,
)


def _exposure(mask: np.ndarray, planes: skydiff.MaskPlanes) -> skydiff.Exposure:
    shape = mask.shape
    return skydiff.Exposure(np.zeros(shape, np.float32), mask=mask,
                            variance=np.ones(shape, np.float32), mask_planes=planes)


def _random_mask(rng: np.random.Generator, shape: tuple[int, int],
                 planes: skydiff.MaskPlanes, names: tuple[str, ...]) -> np.ndarray:
    mask = np.zeros(shape, np.uint32)
    for name in names:
        mask |= np.where(rng.random(shape) < 0.1, np.uint32(planes.value(name)), np.uint32(0))
    return mask


def test_merge_masks_translates_bits_by_plane_name() -> None:
    rng = np.random.default_rng(21)
    shape = (300, 70)  # more rows than a block
    first_planes = skydiff.MaskPlanes({"BAD": 0, "SAT": 1, "CR": 2})
    second_planes = skydiff.MaskPlanes({"CR": 2, "SAT": 5, "EDGE": 7, "NO_DATA": 9})
    first = _exposure(_random_mask(rng, shape, first_planes, ("BAD", "SAT", "CR")),
                      first_planes)
    second = _random_mask(rng, shape, second_planes, ("CR", "SAT", "EDGE"))  # NO_DATA unused
    merged, planes = merge_masks(first, second, second_planes)
    assert planes.names[:3] == ("BAD", "SAT", "CR")
    assert "EDGE" in planes.names and "NO_DATA" not in planes.names
    for name in ("BAD", "SAT", "CR", "EDGE"):
        expected = np.zeros(shape, bool)
        if name in first_planes.names:
            expected |= (first.mask & np.uint32(first_planes.value(name))) != 0
        if name in second_planes.names:
            expected |= (second & np.uint32(second_planes.value(name))) != 0
        np.testing.assert_array_equal((merged & np.uint32(planes.value(name))) != 0, expected,
                                      err_msg=name)
    assert not first.mask.flags.writeable  # the input is untouched (and shared, not modified)


def test_mask_hygiene_moves_and_clears_planes_and_shares_unchanged_masks() -> None:
    rng = np.random.default_rng(22)
    shape = (260, 40)
    planes = skydiff.MaskPlanes({"BAD": 0, "SAT": 1, "CR": 2, "NO_DATA": 3, "DETECTED": 4,
                                 "INJECTED": 5})
    names = ("BAD", "SAT", "CR", "NO_DATA", "INJECTED")
    template = _exposure(_random_mask(rng, shape, planes, names), planes)
    science = _exposure(_random_mask(rng, shape, planes, ("CR", "SAT")), planes)
    science_c, template_c = mask_hygiene(science, template,
                                         preserve_template_planes=("NO_DATA", "BAD"))
    assert science_c is science  # no detection bit set: nothing to clear, nothing copied
    for name, source in (("SAT_TEMPLATE", "SAT"), ("INJECTED_TEMPLATE", "INJECTED"),
                         ("NO_DATA", "NO_DATA"), ("BAD", "BAD")):
        np.testing.assert_array_equal(template_c.masked(name), template.masked(source),
                                      err_msg=name)
    for name in ("SAT", "CR", "INJECTED"):
        assert not template_c.masked(name).any(), name
    detected = science.with_mask("DETECTED", rng.random(shape) < 0.2)
    cleared, _ = mask_hygiene(detected, template, preserve_template_planes=("NO_DATA",))
    assert not cleared.masked("DETECTED").any()
    np.testing.assert_array_equal(cleared.masked("CR", "SAT"), science.masked("CR", "SAT"))


@pytest.mark.parametrize("kind", ["chebyshev", "polynomial"])
@pytest.mark.parametrize("stride", [1, 3])
def test_spatial_image_matches_a_direct_evaluation(kind: str, stride: int) -> None:
    order = 2
    coefficients = np.array([1.5, -0.3, 0.2, 0.05, -0.07, 0.11])
    shape, origin = (45, 61), (10, -4)
    bbox = (9.5, -4.5, 70.5, 40.5)
    image = spatial_image(coefficients, order=order, bbox=bbox, kind=kind, shape=shape,
                          origin=origin, stride=stride)
    rows = np.arange(0, shape[0], stride) + origin[1]
    cols = np.arange(0, shape[1], stride) + origin[0]
    u = (2.0 * cols - (bbox[0] + bbox[2])) / (bbox[2] - bbox[0])
    v = (2.0 * rows - (bbox[1] + bbox[3])) / (bbox[3] - bbox[1])
    uu, vv = np.meshgrid(u, v)
    unit = np.eye(order + 1)
    expected = np.zeros(uu.shape)
    for c, (i, j) in zip(coefficients, skydiff.chebyshev_terms(order), strict=True):
        if kind == "chebyshev":
            expected += (c * np.polynomial.chebyshev.chebval(uu, unit[i])
                         * np.polynomial.chebyshev.chebval(vv, unit[j]))
        else:
            expected += c * uu**i * vv**j
    assert image.dtype == np.float32 and image.shape == uu.shape
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
    out = np.empty(uu.shape, np.float32)
    assert spatial_image(coefficients, order=order, bbox=bbox, kind=kind, shape=shape,
                         origin=origin, stride=stride, out=out) is out
    zero = spatial_image(np.zeros(6), order=order, bbox=bbox, kind=kind, shape=shape,
                         origin=origin, stride=stride, out=out)
    assert zero is out and not zero.any()


