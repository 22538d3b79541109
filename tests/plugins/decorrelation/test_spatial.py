"""The spatially varying DMTN-021 decorrelation (``dmtn021_spatial``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import skydiff
from skydiff.sim import render_stars
from skydiff_plugins.decorrelation import (
    DecorrelationConfig,
    Dmtn021Decorrelator,
    SpatialDecorrelationConfig,
    SpatialDmtn021Decorrelator,
)

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
BORDER = 17


def gaussian_image(sigma: float, size: int) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    image = np.outer(profile, profile)
    return image / image.sum()


def clipped(values: np.ndarray, *, variance: bool) -> float:
    """afw MEANCLIP / VARIANCECLIP: 3σ, 3 iterations, from the median and IQR."""
    a = np.asarray(values, dtype=np.float64).ravel()
    center = np.median(a)
    sigma = 0.7413 * np.subtract(*np.percentile(a, [75, 25]))
    for _ in range(3):
        kept = a[np.abs(a - center) <= 3 * sigma]
        center, sigma = kept.mean(), kept.std()
    return float(sigma**2 if variance else center)


def interior(array: np.ndarray) -> np.ndarray:
    return array[BORDER:-BORDER, BORDER:-BORDER]


def make_inputs(svar: float, tvar: float, kernel: skydiff.FixedKernel | skydiff.BasisKernel, *,
                shape: tuple[int, int], n_sources: int, seed: int = 0
                ) -> tuple[skydiff.Exposure, skydiff.Exposure, skydiff.SubtractionResult]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(16, shape[1] - 5, n_sources)
    y = rng.uniform(16, shape[0] - 5, n_sources)
    flux = rng.uniform(50, 30000, n_sources)
    science = rng.normal(0.0, math.sqrt(svar), shape)
    template = rng.normal(0.0, math.sqrt(tvar), shape)
    if n_sources:
        science += render_stars(shape, x, y, flux, fwhm=3.3 * FWHM)
        template += render_stars(shape, x, y, flux, fwhm=2.2 * FWHM)
    sci = skydiff.Exposure(science, variance=np.full(shape, svar),
                           psf=skydiff.GaussianPsf(3.3, size=25))
    tmp = skydiff.Exposure(template, variance=np.full(shape, tvar),
                           psf=skydiff.GaussianPsf(2.2, size=25))
    matched = skydiff.convolve(tmp, kernel)
    difference = sci.evolve(image=sci.image - matched.image,
                            variance=sci.variance + matched.variance, mask=matched.mask,
                            mask_planes=matched.mask_planes)
    return sci, tmp, skydiff.SubtractionResult(difference=difference, matched_image=matched,
                                                kernel=kernel)


SMALL_CELLS = SpatialDecorrelationConfig(cell_size_fwhm=10.0, border_fwhm=4.0)


@pytest.mark.parametrize(("svar", "tvar"), [(0.04, 0.04), (0.08, 0.04), (0.04, 0.08)])
def test_agrees_with_global_for_constant_kernel(svar: float, tvar: float) -> None:
    kernel = skydiff.FixedKernel(gaussian_image(math.sqrt(3.3**2 - 2.2**2), 31))
    science, template, subtraction = make_inputs(svar, tvar, kernel, shape=(256, 256),
                                                 n_sources=50)
    spatial = SpatialDmtn021Decorrelator(SMALL_CELLS).run(science, template, subtraction)
    global_ = Dmtn021Decorrelator().run(science, template, subtraction)
    assert spatial.metadata["n_cells"] == 16  # 4 × 4 cells of ≤ 78 px (10 FWHM)
    expected = svar + tvar
    stats = {}
    for label, result in (("spatial", spatial), ("global", global_)):
        image, variance = result.difference.image, result.difference.variance
        stats[label] = (clipped(interior(image), variance=True),
                        clipped(interior(variance), variance=False))
        assert stats[label][0] == pytest.approx(expected, rel=0.05)
        assert stats[label][1] == pytest.approx(expected, rel=0.02)
    assert stats["spatial"][0] == pytest.approx(stats["global"][0], rel=0.03)
    assert stats["spatial"][1] == pytest.approx(stats["global"][1], rel=0.03)
    difference = interior(spatial.difference.image - global_.difference.image)
    assert np.std(difference) < 0.03 * math.sqrt(expected)


def _varying_kernel(shape: tuple[int, int]) -> skydiff.BasisKernel:
    """Unit-sum Gaussian kernel whose width grows from σ=1 (left) to σ=3.5 (right)."""
    narrow, wide = gaussian_image(1.0, 31), gaussian_image(3.5, 31)
    bbox = (0.0, 0.0, shape[1] - 1.0, shape[0] - 1.0)
    # p1 = (1 + u) / 2 goes from 0 at x = 0 to 1 at x = W - 1
    return skydiff.BasisKernel(np.stack([narrow, wide - narrow]),
                               [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], order=1, bbox=bbox)


def test_spatially_varying_kernel_local_variance() -> None:
    shape = (384, 512)
    svar, tvar = 1.0, 4.0
    kernel = _varying_kernel(shape)
    science, template, subtraction = make_inputs(svar, tvar, kernel, shape=shape,
                                                 n_sources=0, seed=3)
    config = SpatialDecorrelationConfig(cell_size_fwhm=8.0, border_fwhm=4.0)
    result = SpatialDmtn021Decorrelator(config).run(science, template, subtraction)
    assert result.metadata["n_cells"] > 9
    sums = np.array(result.metadata["kernel_sum"])
    np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    corrected = result.difference
    global_ = Dmtn021Decorrelator().run(science, template, subtraction).difference
    expected = svar + tvar
    worst_global = 0.0
    for rows in np.array_split(np.arange(BORDER, shape[0] - BORDER), 3):
        for cols in np.array_split(np.arange(BORDER, shape[1] - BORDER), 4):
            region = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            assert np.var(corrected.image[region]) == pytest.approx(expected, rel=0.05)
            assert np.mean(corrected.variance[region]) == pytest.approx(expected, rel=0.02)
            worst_global = max(worst_global, abs(np.var(global_.image[region]) / expected - 1))
    # the global correction with the centre kernel is off at the edges of the field
    assert worst_global > 0.05


def test_psf_is_polynomial_over_cells() -> None:
    shape = (320, 320)
    kernel = _varying_kernel(shape)
    science, template, subtraction = make_inputs(0.04, 0.08, kernel, shape=shape, n_sources=0)
    config = SpatialDecorrelationConfig(cell_size_fwhm=10.0, border_fwhm=4.0)
    result = SpatialDmtn021Decorrelator(config).run(science, template, subtraction)
    psf = result.difference.psf
    assert isinstance(psf, skydiff.PolynomialPsf) and result.metadata["psf_updated"]
    assert psf.order == 2
    # at the cell centres it reproduces each cell's decorrelated PSF (3 × 3 cells = 6 terms
    # fitted to 16 cells: close, not exact)
    left = Dmtn021Decorrelator().run(
        science, template, skydiff.SubtractionResult(
            difference=subtraction.difference,
            kernel=skydiff.FixedKernel(kernel.image_at(result.metadata["cell_x"][0],
                                                       result.metadata["cell_y"][0]))))
    expected = left.difference.psf
    assert expected is not None
    x, y = result.metadata["cell_x"][0], result.metadata["cell_y"][0]
    model = psf.kernel_image(x, y)
    reference = expected.kernel_image()
    pad = (model.shape[0] - reference.shape[0]) // 2
    if pad > 0:
        reference = np.pad(reference, pad)
    assert np.linalg.norm(model - reference) / np.linalg.norm(reference) < 0.05
    # a narrow kernel barely correlates the noise: φ ≈ δ, the PSF stays broad on the left
    assert psf.fwhm(10, 160) > psf.fwhm(310, 160)


def test_single_cell_gives_image_psf_and_matches_global() -> None:
    kernel = skydiff.FixedKernel(gaussian_image(2.0, 21))
    science, template, subtraction = make_inputs(0.04, 0.04, kernel, shape=(96, 96),
                                                 n_sources=5)
    spatial = SpatialDmtn021Decorrelator().run(science, template, subtraction)
    global_ = Dmtn021Decorrelator().run(science, template, subtraction)
    assert spatial.metadata["n_cells"] == 1
    assert isinstance(spatial.difference.psf, skydiff.ImagePsf)
    np.testing.assert_allclose(spatial.difference.image, global_.difference.image, atol=1e-5)
    np.testing.assert_allclose(spatial.difference.psf.image, global_.difference.psf.image,
                               atol=1e-10)


def test_grid_sizes_scale_with_fwhm() -> None:
    plugin = SpatialDmtn021Decorrelator()
    assert plugin.grid_sizes(4.0, (21, 21)) == (160, 32)
    assert plugin.grid_sizes(1.0, (21, 21)) == (64, 21)
    assert isinstance(SMALL_CELLS, DecorrelationConfig)
