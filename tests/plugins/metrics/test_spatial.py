"""The ``spatial`` metric: Halton positions, densities, medians, mask fractions, PSF, kernel."""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

import skydiff
from skydiff_plugins.metrics import SpatialMetric, SpatialMetricConfig, halton_positions

SHAPE = (300, 400)  # (H, W)


def metric(**settings) -> SpatialMetric:
    config = SpatialMetricConfig()
    config.update(**settings)
    return SpatialMetric(config)


def exposure(value: float = 0.0, variance: float = 1.0, shape=SHAPE, **fields):
    return skydiff.Exposure.from_arrays(np.full(shape, value), variance=np.full(shape, variance),
                                        **fields)


def tan_wcs(scale_arcsec: float = 0.2, shape=SHAPE) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [shape[1] / 2 + 1, shape[0] / 2 + 1]
    wcs.wcs.cd = [[-scale_arcsec / 3600.0, 0.0], [0.0, scale_arcsec / 3600.0]]
    wcs.wcs.set()
    return wcs


def radical_inverse(index: int, base: int) -> float:
    """The van der Corput radical inverse: the digits of ``index`` mirrored after the point."""
    result, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        result += digit * scale
        scale /= base
    return result


# -- positions --------------------------------------------------------------------------------


def test_unscrambled_positions_are_the_halton_sequence():
    """Without scrambling, position j is (φ₂(j), φ₃(j)) scaled to the pixel range."""
    x, y = halton_positions(SHAPE, 12, scramble=False)
    height, width = SHAPE
    expected_x = [radical_inverse(j, 2) * (width - 1) for j in range(12)]
    expected_y = [radical_inverse(j, 3) * (height - 1) for j in range(12)]
    np.testing.assert_allclose(x, expected_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, expected_y, rtol=0, atol=1e-9)


def test_positions_inside_deterministic_and_even():
    """Inside the image (and margin), same seed → same positions, other seed → others.

    Low discrepancy: the star discrepancy of a 2-D Halton set of n = 100 points is
    O(log² n / n) ≈ 0.2; every quadrant holds 25 ± 5 positions (a random set would have a
    binomial spread of ±4.3 per quadrant and miss this 1/3 of the time).
    """
    difference = exposure()
    first = metric().run(skydiff.MetricInputs(difference=difference)).table
    second = metric().run(skydiff.MetricInputs(difference=difference)).table
    other = metric(seed=7).run(skydiff.MetricInputs(difference=difference)).table
    assert len(first) == 100
    height, width = SHAPE
    x, y = np.asarray(first["x"]), np.asarray(first["y"])
    assert np.all((x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1))
    np.testing.assert_array_equal(x, second["x"])
    np.testing.assert_array_equal(y, second["y"])
    assert not np.allclose(x, other["x"])
    quadrant = (x > (width - 1) / 2).astype(int) + 2 * (y > (height - 1) / 2)
    assert np.all(np.abs(np.bincount(quadrant, minlength=4) - 25) <= 5)
    inner = metric(margin=50.0, n_positions=37).run(skydiff.MetricInputs(difference=difference))
    xi, yi = np.asarray(inner.table["x"]), np.asarray(inner.table["y"])
    assert len(inner.table) == inner.values["n_positions"] == 37
    assert np.all((xi >= 50) & (xi <= width - 51) & (yi >= 50) & (yi <= height - 51))


# -- densities --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradient_catalog() -> tuple[Table, float, float]:
    """Sources with density ρ(x) = a (1 + 3x/W) per pixel², Poisson-sampled (seed 11).

    Drawn with inverse-CDF sampling in x (the density is linear in x) and uniformly in y.
    """
    rng = np.random.default_rng(11)
    height, width = SHAPE
    a = 0.5
    total = rng.poisson(a * height * width * 2.5)  # ∫ρ = a H W (1 + 3/2)
    # CDF of p(x) ∝ 1 + 3x/W on [−0.5, W − 0.5]: solve the quadratic for a uniform draw
    lo, hi = -0.5, width - 0.5
    c = 3.0 / width
    u_draw = rng.uniform(size=total)
    span = (hi + c * hi**2 / 2) - (lo + c * lo**2 / 2)
    target = lo + c * lo**2 / 2 + u_draw * span
    x = (-1 + np.sqrt(1 + 2 * c * target)) / c
    y = rng.uniform(-0.5, height - 0.5, size=total)
    catalog = Table({"x": x, "y": y, "is_dipole": np.zeros(total, dtype=bool),
                     "sky_source": np.zeros(total, dtype=bool)})
    # sky sources everywhere, denser than the real ones: they must not count
    n_sky = 20000
    sky = Table({"x": rng.uniform(0, width - 1, n_sky), "y": rng.uniform(0, height - 1, n_sky),
                 "is_dipole": np.ones(n_sky, dtype=bool), "sky_source": np.ones(n_sky, dtype=bool)})
    from astropy.table import vstack

    return vstack([catalog, sky]), a, c


def expected_counts(table: Table, a: float, c: float) -> np.ndarray:
    """∫ρ over each box: the box area times ρ at the box's mean x (ρ is linear in x)."""
    x_lo = np.asarray(table["x_min"]) - 0.5
    x_hi = np.asarray(table["x_max"]) + 0.5
    n_rows = np.asarray(table["y_max"]) - np.asarray(table["y_min"]) + 1
    return a * n_rows * (x_hi - x_lo) * (1 + c * 0.5 * (x_lo + x_hi))


def test_densities_follow_the_gradient_without_wcs(gradient_catalog):
    """Counts within 5√E of the expected E ≈ 4000–26000 per box; density = count/area × 10⁶.

    Sky sources (with is_dipole set) are excluded from both densities. The fitted slope of the
    density against the box centre (not the position: edge boxes are clipped) is a ρ₀ 3/W
    within 10 %: the boxes overlap, so only ~8 box areas of ~1.5e4 sources are independent,
    and the slope's Poisson error is ≈ √2 × 0.8 % / (their spread in x, ~1/3 of the width)
    ≈ 3 %.
    """
    catalog, a, c = gradient_catalog
    result = metric(box_half_size=60).run(skydiff.MetricInputs(difference=exposure(),
                                                                catalog=catalog))
    table = result.table
    expected = expected_counts(table, a, c)
    counts = np.asarray(table["n_dia_sources"], dtype=np.float64)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    np.testing.assert_allclose(table["source_density"], counts / table["n_pixels"] * 1e6,
                               rtol=1e-12)
    assert table["source_density"].unit == u.Unit("1e-6 ct / pix2")
    assert result.metadata["density_unit"] == "1e-06 ct / pix2"
    # the gradient: density grows 4x from the left to the right edge
    centre = 0.5 * (np.asarray(table["x_min"]) + np.asarray(table["x_max"]))
    slope = np.polyfit(centre, np.asarray(table["source_density"]), 1)[0]
    assert slope == pytest.approx(a * c * 1e6, rel=0.1)
    assert np.all(np.asarray(table["dipole_density"]) == 0)
    assert result.values["dipole_density_max"] == 0.0


def test_densities_per_square_degree_with_a_wcs(gradient_catalog):
    """With a 0.2"/px TAN WCS, density per deg² = density per pixel / (0.2/3600)².

    TAN distortion over ±40" from the tangent point changes the pixel area by < 1e-7.
    """
    catalog, _, _ = gradient_catalog
    plain = metric().run(skydiff.MetricInputs(difference=exposure(), catalog=catalog)).table
    with_wcs = metric().run(skydiff.MetricInputs(difference=exposure(wcs=tan_wcs()),
                                                 catalog=catalog))
    table = with_wcs.table
    pixel_deg2 = (0.2 / 3600.0) ** 2
    np.testing.assert_allclose(table["source_density"],
                               np.asarray(plain["source_density"]) * 1e-6 / pixel_deg2,
                               rtol=1e-6)
    assert with_wcs.metadata["density_unit"] == "ct / deg2"
    assert np.all(np.isfinite(table["ra"])) and np.all(np.isfinite(table["dec"]))
    centre = np.argmin(np.hypot(table["x"] - SHAPE[1] / 2, table["y"] - SHAPE[0] / 2))
    assert table["dec"][centre] == pytest.approx(2.0, abs=0.2 * 60 / 3600)


def test_dipole_orientation_circular_mean_and_separation():
    """Dipoles at 350° and 10° average to 0° (not 180°); separations 2 and 4 average to 3."""
    shape = (100, 100)  # every box (half size 100) covers the whole image
    catalog = Table({"x": [10.0, 60.0, 90.0, 30.0], "y": [10.0, 60.0, 90.0, 80.0],
                     "is_dipole": [True, True, False, True],
                     "dipole_orientation": [350.0, 10.0, 90.0, 180.0],
                     "dipole_separation": [2.0, 4.0, 10.0, 50.0],
                     "sky_source": [False, False, False, True]})
    table = metric().run(skydiff.MetricInputs(difference=exposure(shape=shape),
                                              catalog=catalog)).table
    assert np.all(np.asarray(table["n_pixels"]) == 100 * 100)
    np.testing.assert_allclose(table["dipole_orientation"], 0.0, atol=1e-9)
    np.testing.assert_allclose(table["dipole_separation"], 3.0, rtol=1e-12)
    np.testing.assert_array_equal(table["n_dipoles"], 2)
    np.testing.assert_allclose(table["dipole_density"], 2 / (100 * 100) * 1e6, rtol=1e-12)
    np.testing.assert_allclose(table["source_density"], 3 / (100 * 100) * 1e6, rtol=1e-12)


# -- pixels -----------------------------------------------------------------------------------


def test_mask_fractions_exact():
    """BAD on columns < 60, SAT on rows ≥ 150 (and a plane the mask lacks → NaN)."""
    planes = skydiff.MaskPlanes.default()
    mask = np.zeros(SHAPE, dtype=np.uint32)
    mask[:, :60] |= planes.value("BAD")
    mask[150:, :] |= planes.value("SAT")
    difference = exposure(mask=mask)
    result = metric(box_half_size=50, mask_planes=["BAD", "SAT", "EDGE", "GHOST"]).run(
        skydiff.MetricInputs(difference=difference))
    table = result.table
    x_min, x_max = np.asarray(table["x_min"]), np.asarray(table["x_max"])
    y_min, y_max = np.asarray(table["y_min"]), np.asarray(table["y_max"])
    width = x_max - x_min + 1
    height = y_max - y_min + 1
    bad = np.clip(60 - x_min, 0, width) / width
    sat = np.clip(y_max - 150 + 1, 0, height) / height
    np.testing.assert_allclose(table["bad_fraction"], bad, rtol=1e-12, atol=0)
    np.testing.assert_allclose(table["sat_fraction"], sat, rtol=1e-12, atol=0)
    assert np.all(np.asarray(table["edge_fraction"]) == 0)
    assert np.all(np.isnan(table["ghost_fraction"]))
    assert 0 < bad.max() and 0 < sat.max() and bad.min() == 0
    assert any("GHOST" in note for note in result.metadata["notes"])


def test_medians_exclude_masked_pixels():
    """Constant planes give exact medians; NO_DATA pixels (value 1000) are left out."""
    planes = skydiff.MaskPlanes.default()
    image = np.full(SHAPE, 5.0)
    mask = np.zeros(SHAPE, dtype=np.uint32)
    image[:, 200:] = 1000.0
    mask[:, 200:] = planes.value("NO_DATA")
    science = skydiff.Exposure.from_arrays(image, variance=np.full(SHAPE, 4.0), mask=mask)
    inputs = skydiff.MetricInputs(science=science, template=exposure(3.0, 1.0),
                                  difference=exposure(2.0, 5.0))
    table = metric(box_half_size=30).run(inputs).table
    x_min = np.asarray(table["x_min"])
    covered = x_min < 200  # boxes with some valid science pixels
    np.testing.assert_array_equal(np.asarray(table["science_value"])[covered], 5.0)
    assert np.all(np.isnan(np.asarray(table["science_value"])[~covered]))
    np.testing.assert_array_equal(np.asarray(table["science_variance"])[covered], 4.0)
    np.testing.assert_array_equal(table["template_value"], 3.0)
    np.testing.assert_array_equal(table["difference_value"], 2.0)
    np.testing.assert_array_equal(table["template_variance"], 1.0)
    np.testing.assert_array_equal(table["difference_variance"], 5.0)
    unmasked = metric(box_half_size=30, exclude_planes=[]).run(inputs).table
    assert np.all(np.asarray(unmasked["science_value"])[~covered] == 1000.0)


def test_psf_fwhm_and_kernel_at_the_positions():
    """Gaussian PSFs give their FWHM; a linearly varying kernel gives its sum at each position.

    The kernel is a delta shifted by +1 column with a Chebyshev order-1 amplitude
    1 + 0.1 u over the parent bbox (origin (1000, 2000)): sum 1 + 0.1 u(x), centroid dx = 1.
    """
    origin = (1000, 2000)
    height, width = SHAPE
    delta = np.zeros((1, 5, 5))
    delta[0, 2, 3] = 1.0
    bbox = (origin[0], origin[1], origin[0] + width, origin[1] + height)
    kernel = skydiff.BasisKernel(delta, [[1.0, 0.1, 0.0]], order=1, bbox=bbox)
    science = exposure(psf=skydiff.GaussianPsf(2.0), origin=origin)
    template = exposure(psf=skydiff.GaussianPsf(1.5), origin=origin)
    inputs = skydiff.MetricInputs(science=science, template=template,
                                  difference=exposure(origin=origin), kernel=kernel)
    result = metric().run(inputs)
    table = result.table
    np.testing.assert_allclose(table["science_fwhm"], 2.0 * 2.35482, rtol=1e-5)
    np.testing.assert_allclose(table["template_fwhm"], 1.5 * 2.35482, rtol=1e-5)
    assert np.all(np.isnan(table["difference_fwhm"]))
    u_norm = (2 * (np.asarray(table["x"]) + origin[0]) - (bbox[0] + bbox[2])) / width
    np.testing.assert_allclose(table["kernel_sum"], 1 + 0.1 * u_norm, rtol=1e-12)
    np.testing.assert_allclose(table["kernel_dx"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(table["kernel_dy"], 0.0, atol=1e-12)
    assert result.values["kernel_sum_max"] == pytest.approx(np.max(1 + 0.1 * u_norm))
    assert result.values["science_fwhm_median"] == pytest.approx(2.0 * 2.35482, rel=1e-5)
    fixed = metric().run(skydiff.MetricInputs(difference=exposure(),
                                              kernel=skydiff.FixedKernel(1.3 * delta[0])))
    np.testing.assert_allclose(fixed.table["kernel_sum"], 1.3, rtol=1e-12)


def test_missing_inputs_give_nan_with_notes():
    """Only a difference image: everything else is NaN and explained; nothing at all: no table."""
    result = metric().run(skydiff.MetricInputs(difference=exposure(1.0, 2.0)))
    values = result.values
    assert values["n_positions"] == 100
    assert values["difference_value_median"] == 1.0
    assert values["difference_variance_max"] == 2.0
    for key in ("source_density_median", "science_value_median", "kernel_sum_max",
                "science_fwhm_median", "dipole_density_max"):
        assert math.isnan(values[key]), key
    notes = " ".join(result.metadata["notes"])
    assert "catalog" in notes and "kernel" in notes and "science" in notes
    empty = metric().run(skydiff.MetricInputs())
    assert empty.table is None and empty.values["n_positions"] == 0
    assert all(math.isnan(v) for k, v in empty.values.items() if k != "n_positions")


def test_wrong_inputs_raise_input_error():
    with pytest.raises(skydiff.InputError, match="catalog"):
        metric().run(skydiff.MetricInputs(difference=exposure(),
                                          catalog=np.zeros((3, 2))))  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError, match="kernel"):
        metric().run(skydiff.MetricInputs(difference=exposure(),
                                          kernel=np.ones((3, 3))))  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError, match="column"):
        metric().run(skydiff.MetricInputs(difference=exposure(), catalog=Table({"x": [1.0]})))
