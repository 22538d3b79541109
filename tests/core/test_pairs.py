"""skydiff.validate_pair, skydiff.template_coverage and the tiled variance scale factor."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

import skydiff


def _exposure(mask: np.ndarray, planes: skydiff.MaskPlanes,
              image: np.ndarray | None = None) -> skydiff.Exposure:
    shape = mask.shape
    image = np.zeros(shape, np.float32) if image is None else image
    return skydiff.Exposure(image, mask=mask, variance=np.ones(shape, np.float32),
                            mask_planes=planes)


def _wcs(crpix: tuple[float, float]) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return wcs


def test_template_coverage_counts_no_data_and_nan_in_either_image() -> None:
    planes = skydiff.MaskPlanes({"BAD": 0, "NO_DATA": 3})
    other = skydiff.MaskPlanes({"NO_DATA": 6})
    shape = (300, 20)
    s_mask = np.zeros(shape, np.uint32)
    s_mask[:30] = planes.value("NO_DATA")
    s_mask[30:60] = planes.value("BAD")  # BAD does not count
    t_mask = np.zeros(shape, np.uint32)
    t_mask[250:] = other.value("NO_DATA")
    image = np.zeros(shape, np.float32)
    image[100:110] = np.nan  # 10 more rows without data
    coverage = skydiff.template_coverage(_exposure(s_mask, planes),
                                         _exposure(t_mask, other, image))
    assert coverage == pytest.approx(1.0 - 90 / 300)
    bare = skydiff.MaskPlanes({"BAD": 0})
    assert skydiff.template_coverage(_exposure(np.zeros(shape, np.uint32), bare),
                                     _exposure(np.zeros(shape, np.uint32), bare)) == 1.0


def test_validate_pair_accepts_the_same_grid_and_small_wcs_offsets() -> None:
    shape = (40, 60)
    science = skydiff.Exposure(np.zeros(shape), variance=np.ones(shape), wcs=_wcs((30.0, 20.0)))
    template = science.evolve(wcs=_wcs((30.4, 20.3)))  # 0.5 px offset
    skydiff.validate_pair(science, template)
    skydiff.validate_pair(science, template.evolve(wcs=None))
    with pytest.raises(skydiff.InputError, match=r"offset by 0\.5 pixels"):
        skydiff.validate_pair(science, template, max_wcs_offset=0.25)


@pytest.mark.parametrize("change", ["shape", "origin", "type"])
def test_validate_pair_rejects_other_grids(change: str) -> None:
    science = skydiff.Exposure(np.zeros((20, 20)), variance=np.ones((20, 20)))
    template: object = {
        "shape": science.cutout(slice(0, 10), slice(0, 20)),
        "origin": science.evolve(origin=(5, 0)),
        "type": np.zeros((20, 20)),
    }[change]
    with pytest.raises(skydiff.InputError, match="template"):
        skydiff.validate_pair(science, template)


def test_tiled_variance_scale_factor_agrees_with_the_full_image() -> None:
    """Tiles of 128 x 128 over a 512 x 768 frame whose variance plane is 1.3 x too small.

    The full-image factor has a relative error of about 2.2 / sqrt(393216) = 0.35 %, the
    tiled one (6 tiles, 98304 pixels) about 0.7 %; they must agree within 3 % and both
    recover 1.3 within 3 %.
    """
    rng = np.random.default_rng(4)
    shape = (512, 768)
    image = rng.normal(100.0, np.sqrt(1.3 * 4.0), shape).astype(np.float32)
    exposure = skydiff.Exposure(image, variance=np.full(shape, 4.0, np.float32))
    full = skydiff.variance_scale_factor(exposure)
    tiled = skydiff.variance_scale_factor(exposure, max_pixels=6 * 128 * 128, tile=128)
    assert full == pytest.approx(1.3, rel=0.03)
    assert tiled == pytest.approx(full, rel=0.03)
    assert tiled != full  # the tiles are a sample, not the whole image


def test_template_coverage_with_huge_finite_values_is_complete() -> None:
    """Rows of float32 values near the maximum overflow a float32 sum: such images take the
    pixel-by-pixel count, which still finds every pixel covered."""
    image = np.full((8, 16), 3.0e38, np.float32)
    science = skydiff.Exposure(image, variance=np.ones((8, 16), np.float32))
    template = skydiff.Exposure(np.zeros((8, 16), np.float32),
                                variance=np.ones((8, 16), np.float32))
    assert skydiff.template_coverage(science, template) == 1.0
    image = image.copy()
    image[0, 0] = np.inf
    assert skydiff.template_coverage(skydiff.Exposure(image, variance=np.ones((8, 16), np.float32)),
                             template) == 1.0 - 1.0 / 128
