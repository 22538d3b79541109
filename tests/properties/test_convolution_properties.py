"""Hypothesis properties of skydiff.convolve (differential, metamorphic and bounds).

Inputs are built constructively: hypothesis draws sizes, scales and a seed, and NumPy builds the
arrays from that seed, so every example is reproducible and shrinks on the sizes.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, target
from hypothesis import strategies as st

from skydiff.convolve import FourierImage, convolve, direct_convolve, fft_convolve
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel, n_spatial_terms

SIDES = st.integers(16, 48)
HALF_WIDTHS = st.integers(0, 4)
SEEDS = st.integers(0, 2**32 - 1)
SCALES = st.sampled_from([1e-3, 1.0, 1e4])


@st.composite
def images(draw, *, positive=False):
    """A float32 image of 16–48 pixels a side."""
    shape = (draw(SIDES), draw(SIDES))
    rng = np.random.default_rng(draw(SEEDS))
    scale = draw(SCALES)
    values = rng.uniform(0.0, 2.0, shape) if positive else rng.normal(size=shape)
    return (scale * values).astype(np.float32)


@st.composite
def kernel_arrays(draw, *, positive=False):
    """An odd-sized (1–9 per axis) kernel image."""
    shape = (2 * draw(HALF_WIDTHS) + 1, 2 * draw(HALF_WIDTHS) + 1)
    rng = np.random.default_rng(draw(SEEDS))
    if positive:
        return rng.uniform(0.05, 1.0, shape)
    return rng.normal(size=shape)


@st.composite
def exposures(draw):
    """An exposure with a positive variance, a few CR pixels and a parent-frame origin."""
    image = draw(images())
    rng = np.random.default_rng(draw(SEEDS))
    variance = rng.uniform(0.5, 4.0, image.shape).astype(np.float32)
    mask = np.where(rng.random(image.shape) < 0.02, np.uint32(1 << 3), np.uint32(0))
    origin = (draw(st.integers(-500, 500)), draw(st.integers(-500, 500)))
    return Exposure(image, mask, variance, origin=origin)


@st.composite
def basis_kernels(draw, exposure, *, constant=False):
    """A BasisKernel whose bbox covers ``exposure`` (in its parent frame), order 0–2."""
    order = draw(st.integers(0, 2))
    n_basis = draw(st.integers(1, 3))
    shape = (2 * draw(st.integers(0, 3)) + 1, 2 * draw(st.integers(0, 3)) + 1)
    rng = np.random.default_rng(draw(SEEDS))
    basis = rng.normal(size=(n_basis, *shape))
    coefficients = rng.normal(size=(n_basis, n_spatial_terms(order)))
    if constant:
        coefficients[:, 1:] = 0.0
    x0, y0, x1, y1 = exposure.bbox
    margin = draw(st.integers(0, 20))
    kind = draw(st.sampled_from(["chebyshev", "polynomial"]))
    return BasisKernel(basis, coefficients, order=order, kind=kind,
                       bbox=(x0 - margin, y0 - margin, x1 + margin, y1 + margin))


def _tolerance(image, kernel):
    """float32 FFT round-off scale: eps32 x |image|max x sum|kernel| x a log factor."""
    scale = float(np.abs(image).max()) * float(np.abs(kernel).sum())
    return 2e-6 * scale * np.log2(image.size)


def _report(actual, expected, atol):
    error = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    target(error / atol if atol > 0 else error, label="error / tolerance")


def _direct_at(plane, kernel_at, rows, cols, shape):
    """Direct sums at the given pixels with the kernel returned by ``kernel_at(r, c)``."""
    k_r, k_c = shape
    padded = np.pad(np.asarray(plane, np.float64), ((k_r, k_r), (k_c, k_c)))
    out = []
    for r, c in zip(rows, cols, strict=True):
        window = padded[r + k_r - k_r // 2: r + k_r + k_r // 2 + 1,
                        c + k_c - k_c // 2: c + k_c + k_c // 2 + 1]
        out.append(float((kernel_at(r, c) * window[::-1, ::-1]).sum()))
    return np.array(out)


@given(image=images(), kernel=kernel_arrays())
def test_fft_convolution_equals_direct_convolution(image, kernel):
    result = fft_convolve(image, kernel)
    expected = direct_convolve(image, kernel)
    atol = _tolerance(image, kernel)
    _report(result, expected, atol)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=atol)


@given(first=images(), data=st.data(), kernel=kernel_arrays(),
       a=st.floats(-3, 3, allow_subnormal=False), b=st.floats(-3, 3, allow_subnormal=False))
def test_convolution_is_linear(first, data, kernel, a, b):
    rng = np.random.default_rng(data.draw(SEEDS))
    second = rng.normal(size=first.shape).astype(np.float32) * np.abs(first).max()
    combined = (np.float32(a) * first + np.float32(b) * second).astype(np.float32)
    fourier = FourierImage(combined, kernel.shape)
    left = fourier.convolve(kernel)
    right = a * fft_convolve(first, kernel) + b * fft_convolve(second, kernel)
    atol = 3 * (abs(a) + abs(b) + 1) * _tolerance(np.stack([first, second]), kernel)
    _report(left, right, atol)
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=atol)


@given(data=st.data(), kernel=kernel_arrays(positive=True),
       flux=st.floats(1e-2, 1e6, allow_subnormal=False))
def test_flux_is_conserved_away_from_the_border(data, kernel, flux):
    shape = (data.draw(SIDES), data.draw(SIDES))
    h_r, h_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    row = data.draw(st.integers(h_r, shape[0] - 1 - h_r))
    col = data.draw(st.integers(h_c, shape[1] - 1 - h_c))
    image = np.zeros(shape, np.float32)
    image[row, col] = flux
    exposure = Exposure(image, variance=np.ones(shape, np.float32))
    out = convolve(exposure, kernel)
    expected = flux * kernel.sum()
    assert abs(float(out.image.astype(np.float64).sum()) - expected) <= 1e-5 * expected
    assert np.all(out.variance >= 0)


@given(data=st.data(), exposure=exposures())
def test_spatially_varying_convolution_equals_per_pixel_evaluation(data, exposure):
    kernel = data.draw(basis_kernels(exposure))
    out = convolve(exposure, kernel, variance="exact")
    rng = np.random.default_rng(data.draw(SEEDS))
    rows = rng.integers(0, exposure.shape[0], 20)
    cols = rng.integers(0, exposure.shape[1], 20)
    x0, y0 = exposure.origin

    def kernel_at(r, c):
        return kernel.image_at(c + x0, r + y0)

    def squared_at(r, c):
        return kernel.image_at(c + x0, r + y0) ** 2

    expected = _direct_at(exposure.image, kernel_at, rows, cols, kernel.shape)
    spatial = kernel.spatial_images()
    atol = 4 * _tolerance(exposure.image, np.abs(spatial).sum(axis=0)) * len(spatial)
    _report(out.image[rows, cols], expected, atol)
    np.testing.assert_allclose(out.image[rows, cols], expected, rtol=1e-4, atol=atol)
    # variance="exact": V convolved with K(x, y)^2, the kernel taken at the output pixel
    expected_var = _direct_at(exposure.variance, squared_at, rows, cols, kernel.shape)
    var_atol = (4 * _tolerance(exposure.variance, (np.abs(spatial).sum(axis=0)) ** 2)
                * len(spatial) ** 2)
    np.testing.assert_allclose(out.variance[rows, cols], expected_var, rtol=1e-4, atol=var_atol)
    assert np.all(out.variance >= 0)


@given(exposure=exposures(), kernel=kernel_arrays())
def test_variance_propagation_equals_direct_variance_times_squared_kernel(exposure, kernel):
    out = convolve(exposure, kernel)
    expected = direct_convolve(exposure.variance, kernel**2)
    atol = _tolerance(exposure.variance, kernel**2)
    _report(out.variance, expected, atol)
    np.testing.assert_allclose(out.variance, expected, rtol=1e-5, atol=atol)


@given(data=st.data(), exposure=exposures())
def test_constant_basis_kernel_equals_fixed_kernel(data, exposure):
    kernel = data.draw(basis_kernels(exposure, constant=True))
    fixed = FixedKernel(kernel.spatial_images()[0])
    np.testing.assert_allclose(kernel.image_at(*exposure.origin), fixed.image, atol=1e-12)
    a = convolve(exposure, kernel)
    b = convolve(exposure, fixed)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.variance, b.variance)
    np.testing.assert_array_equal(a.mask, b.mask)


@given(exposure=exposures(), kernel=kernel_arrays())
def test_masks_are_only_ored_and_dilated_by_the_footprint(exposure, kernel):
    out = convolve(exposure, kernel)
    cr = exposure.masked("CR")
    footprint = (kernel != 0).astype(float)
    expected = direct_convolve(cr.astype(float), footprint) > 0.5
    np.testing.assert_array_equal(out.masked("CR"), expected)
    # a bit set in the input stays set (the footprint always holds its centre or neighbours)
    assert np.all(out.masked("CR")[cr] | (kernel[kernel.shape[0] // 2,
                                                  kernel.shape[1] // 2] == 0))
    edge = out.masked("EDGE")
    h_r, h_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    interior = np.zeros(exposure.shape, dtype=bool)
    interior[h_r:exposure.shape[0] - h_r, h_c:exposure.shape[1] - h_c] = True
    np.testing.assert_array_equal(edge, ~interior)


@given(image=images(), kernel=kernel_arrays(), data=st.data())
def test_convolution_commutes_with_integer_translations(image, kernel, data):
    dr = data.draw(st.integers(-5, 5))
    dc = data.draw(st.integers(-5, 5))
    shifted = np.zeros_like(image)
    height, width = image.shape
    src = (slice(max(-dr, 0), height - max(dr, 0)), slice(max(-dc, 0), width - max(dc, 0)))
    dst = (slice(max(dr, 0), height - max(-dr, 0)), slice(max(dc, 0), width - max(-dc, 0)))
    shifted[dst] = image[src]
    a = fft_convolve(shifted, kernel)
    b = fft_convolve(image, kernel)
    # compare away from the borders, where zero padding differs
    h_r, h_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    margin_r, margin_c = abs(dr) + 2 * h_r, abs(dc) + 2 * h_c
    if height <= 2 * margin_r or width <= 2 * margin_c:
        return
    inner = (slice(margin_r, height - margin_r), slice(margin_c, width - margin_c))
    moved = (slice(margin_r - dr, height - margin_r - dr),
             slice(margin_c - dc, width - margin_c - dc))
    np.testing.assert_allclose(a[inner], b[moved], rtol=1e-5, atol=2 * _tolerance(image, kernel))
