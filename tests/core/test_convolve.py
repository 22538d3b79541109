"""Unit tests of skydiff.convolve."""

from __future__ import annotations

import numpy as np
import pytest

from skydiff.convolve import (
    FourierImage,
    convolve,
    direct_convolve,
    fft_convolve,
    padded_shape,
)
from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel
from skydiff.mask import MaskPlanes
from skydiff.psf import FWHM_PER_SIGMA, GaussianPsf


def _exposure(rng, shape=(30, 40), **kwargs):
    image = rng.normal(50.0, 5.0, size=shape).astype(np.float32)
    variance = rng.uniform(1.0, 3.0, size=shape).astype(np.float32)
    return Exposure(image, variance=variance, **kwargs)


def _snapshot(exposure):
    return exposure.image.copy(), exposure.mask.copy(), exposure.variance.copy()


def test_padded_shape_is_fast_and_large_enough():
    shape = padded_shape((100, 37), (11, 5))
    assert shape == (120, 45)  # 5-smooth sizes >= 110 and >= 41


def test_fft_convolve_matches_direct_for_non_square_kernel():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(33, 47)).astype(np.float32)
    kernel = rng.normal(size=(5, 9))
    result = fft_convolve(image, kernel)
    assert result.dtype == np.float32
    assert result.shape == image.shape
    np.testing.assert_allclose(result, direct_convolve(image, kernel), atol=1e-4)


def test_fft_convolve_delta_kernel_is_identity_and_shift():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(20, 25)).astype(np.float32)
    delta = np.zeros((3, 5))
    delta[1, 2] = 1.0
    np.testing.assert_allclose(fft_convolve(image, delta), image, atol=1e-6)
    shift = np.zeros((3, 3))
    shift[1, 0] = 1.0  # out[r, c] = image[r, c + 1]
    np.testing.assert_allclose(fft_convolve(image, shift)[:, :-1], image[:, 1:], atol=1e-6)


def test_fourier_image_reuses_the_forward_transform():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(24, 31))
    fourier = FourierImage(image, (7, 7))
    assert fourier.shape == (24, 31)
    assert not fourier.spectrum.flags.writeable
    for size in ((1, 1), (3, 5), (7, 7)):
        kernel = rng.normal(size=size)
        np.testing.assert_allclose(fourier.convolve(kernel), direct_convolve(image, kernel),
                                   atol=1e-4)
    with pytest.raises(InputError, match="larger"):
        fourier.convolve(np.ones((9, 9)))
    with pytest.raises(InputError, match="odd"):
        fourier.convolve(np.ones((2, 3)))
    with pytest.raises(InputError, match="odd"):
        FourierImage(image, (4, 3))
    with pytest.raises(InputError, match="NaN"):
        FourierImage(np.full((4, 4), np.nan), (3, 3))


def test_fft_convolve_rejects_even_kernels_and_bad_images():
    with pytest.raises(InputError, match="odd"):
        fft_convolve(np.ones((8, 8)), np.ones((4, 3)))
    with pytest.raises(InputError, match="2-D"):
        fft_convolve(np.ones(8), np.ones((3, 3)))
    with pytest.raises(InputError, match="finite"):
        fft_convolve(np.ones((8, 8)), np.full((3, 3), np.inf))


# -- convolve(Exposure) ----------------------------------------------------------------------


def test_convolve_never_modifies_its_input():
    rng = np.random.default_rng(4)
    exposure = _exposure(rng, psf=GaussianPsf(1.5))
    exposure = exposure.with_mask("CR", rng.random(exposure.shape) < 0.02)
    before = _snapshot(exposure)
    kernel_image = GaussianPsf(1.0).kernel_image()
    kernel_copy = kernel_image.copy()
    convolve(exposure, kernel_image)
    for old, new in zip(before, _snapshot(exposure), strict=True):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(kernel_image, kernel_copy)


def test_convolve_with_delta_kernel_keeps_pixels_and_flags_no_edge():
    rng = np.random.default_rng(5)
    exposure = _exposure(rng).with_mask("CR", rng.random((30, 40)) < 0.05)
    delta = np.zeros((1, 1))
    delta[0, 0] = 1.0
    out = convolve(exposure, delta)
    np.testing.assert_allclose(out.image, exposure.image, rtol=1e-6)
    np.testing.assert_allclose(out.variance, exposure.variance, rtol=1e-6)
    np.testing.assert_array_equal(out.mask, exposure.mask)


def test_convolve_flags_exactly_the_border_half_kernel_as_edge():
    rng = np.random.default_rng(6)
    exposure = _exposure(rng, shape=(20, 30))
    out = convolve(exposure, np.ones((5, 7)) / 35.0)
    edge = out.masked("EDGE")
    expected = np.ones((20, 30), dtype=bool)
    expected[2:-2, 3:-3] = False
    np.testing.assert_array_equal(edge, expected)


def test_convolve_adds_a_missing_edge_plane():
    rng = np.random.default_rng(7)
    planes = MaskPlanes({"BAD": 0, "NO_DATA": 1})
    exposure = _exposure(rng, shape=(12, 12), mask_planes=planes)
    out = convolve(exposure, np.ones((3, 3)), edge_plane="BORDER")
    assert "BORDER" in out.mask_planes.names
    assert out.masked("BORDER")[0, 0] and not out.masked("BORDER")[5, 5]


def test_mask_dilation_follows_the_convolution_orientation():
    rng = np.random.default_rng(8)
    exposure = _exposure(rng, shape=(25, 25))
    cr = np.zeros((25, 25), dtype=bool)
    cr[12, 12] = True
    exposure = exposure.with_mask("CR", cr).with_mask("BAD", np.roll(cr, 5, axis=0))
    kernel = np.zeros((3, 5))
    kernel[0, 4] = 1.0  # an asymmetric footprint: out[r, c] uses image[r + 1, c - 2]
    kernel[1, 2] = 0.5
    out = convolve(exposure, kernel)
    expected = direct_convolve(cr.astype(float), (kernel != 0).astype(float)) > 0.5
    np.testing.assert_array_equal(out.masked("CR"), expected)
    assert out.masked("CR")[11, 14]
    # BAD is preserved: copied, not dilated
    np.testing.assert_array_equal(out.masked("BAD"), exposure.masked("BAD"))
    undilated = convolve(exposure, kernel, mask_dilate=False)
    np.testing.assert_array_equal(undilated.masked("CR"), cr)


def test_preserve_planes_can_be_changed():
    rng = np.random.default_rng(9)
    exposure = _exposure(rng, shape=(15, 15))
    bad = np.zeros((15, 15), dtype=bool)
    bad[7, 7] = True
    exposure = exposure.with_mask("BAD", bad)
    out = convolve(exposure, np.ones((3, 3)), preserve_planes=())
    assert out.masked("BAD").sum() == 9


def test_non_finite_pixels_are_zeroed_and_flagged():
    rng = np.random.default_rng(10)
    image = rng.normal(size=(20, 20)).astype(np.float32)
    image[5, 5] = np.nan
    image[10, 10] = np.inf
    image[15, 15] = np.nan
    variance = np.ones((20, 20), np.float32)
    variance[3, 14] = np.nan
    mask = np.zeros((20, 20), np.uint32)
    mask[15, 15] = 1  # BAD already: no NO_DATA
    exposure = Exposure(image, mask, variance)
    kernel = GaussianPsf(1.0, size=5).kernel_image()
    out = convolve(exposure, kernel)
    assert np.all(np.isfinite(out.image))
    assert np.all(np.isfinite(out.variance))
    no_data = out.masked("NO_DATA")
    assert no_data[5, 5] and no_data[10, 10] and no_data[3, 14]
    assert not no_data[15, 15]
    assert no_data.sum() == 3  # NO_DATA is preserved (not dilated) by default
    clean = np.where(np.isfinite(image) & np.isfinite(variance), image, 0.0)
    np.testing.assert_allclose(out.image, direct_convolve(clean, kernel), atol=1e-5)


def test_convolve_variance_is_variance_times_squared_kernel():
    rng = np.random.default_rng(11)
    exposure = _exposure(rng, shape=(26, 33))
    kernel = rng.uniform(-0.2, 1.0, size=(5, 3))
    out = convolve(exposure, kernel)
    np.testing.assert_allclose(out.image, direct_convolve(exposure.image, kernel),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.variance, direct_convolve(exposure.variance, kernel**2),
                               rtol=1e-5, atol=1e-5)
    copied = convolve(exposure, kernel, propagate_variance=False)
    np.testing.assert_array_equal(copied.variance, exposure.variance)


def test_convolve_normalize_divides_by_kernel_sum():
    rng = np.random.default_rng(12)
    exposure = _exposure(rng)
    kernel = 3.0 * GaussianPsf(1.0, size=5).kernel_image()
    raw = convolve(exposure, kernel)
    normalised = convolve(exposure, kernel, normalize=True)
    np.testing.assert_allclose(normalised.image, raw.image / 3.0, rtol=1e-6)
    np.testing.assert_allclose(normalised.variance, raw.variance / 9.0, rtol=1e-6)
    with pytest.raises(InputError, match="zero"):
        convolve(exposure, np.array([[1.0, 0.0, -1.0]]), normalize=True)


def test_convolve_updates_the_psf():
    rng = np.random.default_rng(13)
    exposure = _exposure(rng, shape=(41, 41), psf=GaussianPsf(2.0))
    out = convolve(exposure, GaussianPsf(1.5).kernel_image())
    expected = FWHM_PER_SIGMA * np.hypot(2.0, 1.5)
    assert out.psf.fwhm() == pytest.approx(expected, rel=1e-3)
    assert out.psf.average_position == (20.0, 20.0)
    assert convolve(exposure.evolve(psf=None), np.ones((3, 3))).psf is None


def test_convolve_keeps_the_other_metadata():
    rng = np.random.default_rng(14)
    exposure = _exposure(rng, origin=(5, 7), filter="r", metadata={"OBJECT": "field"})
    out = convolve(exposure, np.ones((3, 3)) / 9)
    assert out.origin == (5, 7)
    assert out.filter == "r"
    assert out.metadata["OBJECT"] == "field"
    assert out.image.dtype == np.float32 and out.mask.dtype == np.uint32


def test_convolve_rejects_bad_arguments():
    rng = np.random.default_rng(15)
    exposure = _exposure(rng)
    with pytest.raises(InputError, match="Exposure"):
        convolve(exposure.image, np.ones((3, 3)))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="kernel must be"):
        convolve(exposure, "gaussian")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="odd"):
        convolve(exposure, np.ones((2, 2)))


def test_constant_basis_kernel_equals_fixed_kernel():
    rng = np.random.default_rng(16)
    exposure = _exposure(rng)
    basis = rng.normal(size=(3, 5, 5))
    coefficients = np.zeros((3, 6))
    coefficients[:, 0] = rng.normal(size=3)
    basis_kernel = BasisKernel(basis, coefficients, order=2, bbox=exposure.bbox)
    fixed = FixedKernel(np.tensordot(coefficients[:, 0], basis, axes=(0, 0)))
    a = convolve(exposure, basis_kernel)
    b = convolve(exposure, fixed)
    np.testing.assert_allclose(a.image, b.image, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(a.variance, b.variance, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(a.mask, b.mask)


def _direct_spatial(image, kernel, rows, cols, origin):
    """Per-pixel direct sum with the kernel evaluated at each output pixel."""
    k_r, k_c = kernel.shape
    padded = np.pad(np.asarray(image, dtype=np.float64), ((k_r, k_r), (k_c, k_c)))
    values = []
    for r, c in zip(rows, cols, strict=True):
        k = kernel.image_at(c + origin[0], r + origin[1])
        # out[r, c] = sum_ij k[i, j] image[r - i + k_r//2, c - j + k_c//2]
        window = padded[r + k_r - k_r // 2: r + k_r + k_r // 2 + 1,
                        c + k_c - k_c // 2: c + k_c + k_c // 2 + 1]
        values.append(float((k * window[::-1, ::-1]).sum()))
    return np.array(values)


def test_spatially_varying_convolution_uses_the_kernel_at_each_output_pixel():
    rng = np.random.default_rng(17)
    exposure = _exposure(rng, shape=(30, 44), origin=(100, -20))
    basis = rng.normal(size=(2, 5, 3))
    coefficients = rng.normal(size=(2, 3))
    kernel = BasisKernel(basis, coefficients, order=1, bbox=(90, -30, 160, 20))
    out = convolve(exposure, kernel, variance="exact")
    rows = rng.integers(0, 30, 25)
    cols = rng.integers(0, 44, 25)
    # the reference itself agrees with scipy for a fixed kernel
    fixed = FixedKernel(basis[0])
    np.testing.assert_allclose(_direct_spatial(exposure.image, fixed, rows, cols, (0, 0)),
                               direct_convolve(exposure.image, basis[0])[rows, cols], rtol=1e-10)
    expected = _direct_spatial(exposure.image, kernel, rows, cols, exposure.origin)
    np.testing.assert_allclose(out.image[rows, cols], expected, rtol=1e-4, atol=1e-3)
    # variance="exact": V convolved with K(x, y)^2 (the default "fast" mode approximates it for
    # a varying kernel; see tests/core/test_convolve_fast.py)
    expected_var = []
    for r, c in zip(rows, cols, strict=True):
        k2 = kernel.image_at(c + 100, r - 20) ** 2
        expected_var.append(_direct_spatial(exposure.variance, FixedKernel(k2), [r], [c],
                                            (0, 0))[0])
    np.testing.assert_allclose(out.variance[rows, cols], expected_var, rtol=1e-4, atol=1e-4)
    # normalisation uses the local kernel sum
    normalised = convolve(exposure, kernel, normalize=True)
    sums = kernel.sum_at(cols + 100.0, rows - 20.0)
    np.testing.assert_allclose(normalised.image[rows, cols], out.image[rows, cols] / sums,
                               rtol=1e-4, atol=1e-4)
