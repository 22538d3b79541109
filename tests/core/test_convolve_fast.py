"""The fast paths of skydiff.convolve: separable mask dilation, the FFT engine, fast variance.

Each fast path is checked against an exact reference: the FFT (or direct) dilation, a direct
per-pixel sum with the kernel evaluated at the output pixel, ``variance="exact"``.
"""

from __future__ import annotations

import importlib
import threading

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from skydiff.bench import al_matching_kernel
from skydiff.convolve import convolve, direct_convolve
from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel, n_spatial_terms, spatial_functions
from skydiff.psf import GaussianPsf
from skydiff.sim import SimConfig, simulate_pair

# The facade re-exports the function ``convolve`` under the same name as the module.
_convolve = importlib.import_module("skydiff.convolve")
_fft = importlib.import_module("skydiff._fft")


def _random_bits(rng, shape, planes=(0, 3, 5, 9)):
    """A uint32 mask with sparse pixels, a column, a row and corner pixels in several bits."""
    mask = np.zeros(shape, np.uint32)
    for bit in planes:
        mask[rng.random(shape) < 0.003] |= np.uint32(1 << bit)
    mask[:, shape[1] // 3] |= np.uint32(1 << planes[0])
    mask[shape[0] // 2, :] |= np.uint32(1 << planes[-1])
    mask[0, 0] |= np.uint32(1 << planes[1])
    mask[-1, -1] |= np.uint32(1 << planes[2])
    mask[0, -1] |= np.uint32(1 << planes[1])
    return mask


def _reference_dilation(bits, footprint):
    """Per plane, output pixels whose footprint neighbourhood holds a set input pixel."""
    out = np.zeros_like(bits)
    for bit in range(32):
        plane = (bits >> np.uint32(bit)) & np.uint32(1)
        if plane.any():
            grown = direct_convolve(plane.astype(float), footprint.astype(float)) > 0.5
            out |= grown.astype(np.uint32) << np.uint32(bit)
    return out


def _footprint(shape, rows=None, cols=None):
    footprint = np.zeros(shape, dtype=bool)
    footprint[rows if rows is not None else slice(None),
              cols if cols is not None else slice(None)] = True
    return footprint


RECTANGLES = [
    _footprint((21, 21)),
    _footprint((5, 3)),
    _footprint((1, 7)),
    _footprint((9, 1)),
    _footprint((7, 9), slice(1, 5), slice(2, 9)),  # off-centre rectangle
    _footprint((5, 5), slice(0, 1), slice(4, 5)),  # a single off-centre pixel: a shift
    _footprint((3, 3), slice(1, 2), slice(1, 2)),  # the identity
]


# -- mask dilation --------------------------------------------------------------------------


@pytest.mark.parametrize("footprint", RECTANGLES, ids=lambda f: f"{f.shape}-{int(f.sum())}")
@pytest.mark.parametrize("shape", [(37, 23), (600, 300)])
def test_separable_dilation_equals_exact_dilation(footprint, shape):
    rng = np.random.default_rng(100)
    bits = _random_bits(rng, shape)
    expected = _reference_dilation(bits, footprint)
    fast = _convolve._dilate(bits, footprint)
    assert _convolve._rectangle_offsets(footprint) is not None
    np.testing.assert_array_equal(fast, expected)
    # and the FFT fallback agrees on the same footprint
    present = int(np.bitwise_or.reduce(bits, axis=None))
    np.testing.assert_array_equal(_convolve._dilate_fft(bits, present, footprint), expected)


@pytest.mark.parametrize(("planes", "dtype"), [((1, 3, 4), np.uint8), ((2, 9, 12), np.uint16),
                                               ((0, 17, 31), np.uint32)],
                         ids=["uint8", "uint16", "uint32"])
@pytest.mark.parametrize("rectangular", [True, False])
def test_dilating_selected_planes_in_narrow_types(planes, dtype, rectangular):
    rng = np.random.default_rng(117)
    mask = _random_bits(rng, (300, 200), planes=(*planes, 30))  # bit 30: not dilated
    selected = sum(1 << bit for bit in planes)
    footprint = np.ones((7, 5), dtype=bool)
    if not rectangular:
        footprint[0, 0] = False
    expected = _reference_dilation(mask & np.uint32(selected), footprint)
    result = _convolve._dilate_planes(mask, selected, footprint)
    assert result.dtype == dtype
    np.testing.assert_array_equal(result.astype(np.uint32), expected)


def test_separable_dilation_matches_scipy_binary_dilation():
    rng = np.random.default_rng(101)
    bits = _random_bits(rng, (300, 257), planes=(2, 2, 2))
    footprint = np.ones((21, 21), dtype=bool)
    fast = (_convolve._dilate(bits, footprint) >> np.uint32(2)) & np.uint32(1)
    expected = scipy.ndimage.binary_dilation((bits >> np.uint32(2)) & np.uint32(1),
                                             structure=footprint)
    np.testing.assert_array_equal(fast.astype(bool), expected)


def test_non_rectangular_footprints_use_the_exact_fft_dilation():
    rng = np.random.default_rng(102)
    bits = _random_bits(rng, (64, 80))
    yy, xx = np.mgrid[-4:5, -4:5]
    disc = xx**2 + yy**2 <= 16
    assert _convolve._rectangle_offsets(disc) is None
    np.testing.assert_array_equal(_convolve._dilate(bits, disc), _reference_dilation(bits, disc))
    empty = np.zeros((3, 3), dtype=bool)
    assert not _convolve._dilate(bits, empty).any()


def test_convolve_dilates_all_present_planes_and_preserves_the_others():
    rng = np.random.default_rng(103)
    image = rng.normal(size=(120, 90)).astype(np.float32)
    exposure = Exposure(image, variance=np.ones_like(image))
    for plane in ("CR", "SAT", "SUSPECT", "BAD"):
        exposure = exposure.with_mask(plane, rng.random(image.shape) < 0.004)
    kernel = GaussianPsf(1.5, size=11).kernel_image()
    out = convolve(exposure, kernel)
    footprint = kernel != 0
    for plane in ("CR", "SAT", "SUSPECT"):
        expected = direct_convolve(exposure.masked(plane).astype(float),
                                   footprint.astype(float)) > 0.5
        np.testing.assert_array_equal(out.masked(plane), expected)
    np.testing.assert_array_equal(out.masked("BAD"), exposure.masked("BAD"))


# -- the FFT engine -------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_shape", [(1, 1), (5, 3), (21, 21), (51, 7)])
def test_kernel_spectrum_equals_padded_rfft2(kernel_shape):
    rng = np.random.default_rng(104)
    engine = _fft.FFTConvolver((70, 90), kernel_shape)
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    expected = scipy.fft.rfft2(kernel, s=engine.padded)
    spectrum = engine.kernel_spectrum(kernel)
    assert spectrum.dtype == np.complex64
    np.testing.assert_allclose(spectrum, expected, atol=2e-5 * np.abs(kernel).sum())


@pytest.mark.parametrize(("shape", "kernel_shape", "padded"), [
    ((70, 90), (21, 21), (81, 100)),  # odd number of padded rows: no self-mirrored row
    ((1000, 1100), (21, 19), None),  # large enough to be shared out among threads
    ((30, 5600), (47, 3), None),  # a row wider than one single-threaded GEMM block
])
def test_kernel_spectrum_times_a_spectrum(shape, kernel_shape, padded):
    rng = np.random.default_rng(107)
    engine = _fft.FFTConvolver(shape, kernel_shape, padded=padded)
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    expected = scipy.fft.rfft2(kernel.astype(np.float64), s=engine.padded)
    spectrum = engine.kernel_spectrum(kernel)
    np.testing.assert_allclose(spectrum, expected, atol=2e-5 * np.abs(kernel).sum())
    image = engine.forward(rng.normal(size=shape).astype(np.float32))
    product = spectrum * image
    scale = np.abs(product).max()
    np.testing.assert_allclose(engine.kernel_spectrum(kernel, times=image), product,
                               rtol=0, atol=1e-6 * scale)
    in_place = image.copy()
    engine.kernel_spectrum(kernel, out=in_place, times=in_place)
    np.testing.assert_allclose(in_place, product, rtol=0, atol=1e-6 * scale)


def test_same_shape_padding_is_minimal_and_alias_free():
    padded = _fft.same_shape_padding((2048, 4096), (21, 21))
    assert padded[0] >= 2048 + 10 and padded[1] >= 4096 + 10
    assert padded[0] < 2048 + 20 + 64  # smaller than the full n + k - 1 would need, rounded
    rng = np.random.default_rng(105)
    image = rng.normal(size=(40, 33)).astype(np.float32)  # non-zero up to the borders
    kernel = rng.normal(size=(9, 7))
    engine = _fft.FFTConvolver(image.shape, kernel.shape)
    out = engine.convolve_terms(engine.forward(image), kernel[np.newaxis], [(None, None)])
    np.testing.assert_allclose(out, direct_convolve(image, kernel), atol=2e-5 * 40)


def test_fixed_kernel_image_equals_direct_sum_to_float32_rounding():
    rng = np.random.default_rng(106)
    image = rng.normal(100.0, 10.0, size=(150, 211)).astype(np.float32)
    exposure = Exposure(image, variance=np.full_like(image, 4.0))
    kernel = np.exp(-((np.arange(21) - 10)[:, None] ** 2 + (np.arange(21) - 10) ** 2) / 18.0)
    out = convolve(exposure, kernel)
    expected = direct_convolve(image, kernel)
    # float32 rounding of an O(|I| * sum|K|) result
    scale = float(np.abs(image).max() * np.abs(kernel).sum())
    np.testing.assert_allclose(out.image, expected, rtol=0, atol=4 * np.finfo(np.float32).eps
                               * scale * np.log2(image.size))


@pytest.mark.parametrize("kind", ["chebyshev", "polynomial"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_spatially_varying_image_and_exact_variance_equal_per_pixel_sums(kind, order):
    rng = np.random.default_rng(107 + order)
    shape = (40, 57)
    origin = (13, -7)
    image = rng.normal(20.0, 5.0, size=shape).astype(np.float32)
    variance = rng.uniform(1.0, 3.0, size=shape).astype(np.float32)
    exposure = Exposure(image, variance=variance, origin=origin)
    basis = rng.normal(size=(4, 7, 5))
    coefficients = rng.normal(size=(4, n_spatial_terms(order)))
    coefficients[2] = 0.0  # a basis image that contributes nothing
    kernel = BasisKernel(basis, coefficients, order=order, kind=kind,
                         bbox=(0.0, -20.0, 80.0, 45.0))
    out = convolve(exposure, kernel, variance="exact")
    rows = rng.integers(0, shape[0], 40)
    cols = rng.integers(0, shape[1], 40)
    padded_image = np.pad(image.astype(np.float64), ((3, 3), (2, 2)))
    padded_var = np.pad(variance.astype(np.float64), ((3, 3), (2, 2)))
    for r, c in zip(rows, cols, strict=True):
        k = kernel.image_at(c + origin[0], r + origin[1])
        window = padded_image[r:r + 7, c:c + 5][::-1, ::-1]
        window_var = padded_var[r:r + 7, c:c + 5][::-1, ::-1]
        expected = float((k * window).sum())
        expected_var = float((k**2 * window_var).sum())
        scale_image = float(np.abs(k).sum() * 40.0)
        scale_var = float((k**2).sum() * 3.0)
        assert abs(out.image[r, c] - expected) <= 1e-5 * scale_image * len(kernel.basis)
        assert abs(out.variance[r, c] - expected_var) <= 1e-5 * scale_var * 10


@pytest.mark.parametrize("kind", ["chebyshev", "polynomial"])
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_squared_kernel_expansion_is_exact(kind, order):
    rng = np.random.default_rng(110)
    kernel = BasisKernel(rng.normal(size=(3, 5, 5)),
                         rng.normal(size=(3, n_spatial_terms(order))), order=order, kind=kind,
                         bbox=(0.0, 0.0, 50.0, 30.0))
    images, terms = _convolve._squared_kernel_expansion(kernel)
    assert len(terms) == n_spatial_terms(2 * order)
    xs, ys = rng.uniform(-10, 60, 6), rng.uniform(-5, 35, 6)
    g = spatial_functions(xs, ys, order=2 * order, bbox=kernel.bbox, kind=kind)
    for n in range(xs.size):
        expected = kernel.image_at(xs[n], ys[n]) ** 2
        np.testing.assert_allclose(np.tensordot(g[:, n], images, axes=(0, 0)), expected,
                                   rtol=1e-10, atol=1e-12)


# -- variance modes -------------------------------------------------------------------------


def test_fast_and_exact_variance_are_identical_for_spatially_constant_kernels():
    rng = np.random.default_rng(111)
    image = rng.normal(size=(64, 48)).astype(np.float32)
    variance = rng.uniform(0.5, 4.0, size=image.shape).astype(np.float32)
    exposure = Exposure(image, variance=variance)
    fixed = rng.uniform(-0.1, 1.0, size=(7, 5))
    coefficients = np.zeros((2, 3))
    coefficients[:, 0] = [1.0, 0.5]
    constant = BasisKernel(np.stack([fixed, fixed[::-1]]),
                           coefficients, order=1, bbox=(0, 0, 48, 64))
    for kernel in (fixed, FixedKernel(fixed), constant):
        fast = convolve(exposure, kernel)
        exact = convolve(exposure, kernel, variance="exact")
        np.testing.assert_array_equal(fast.variance, exact.variance)
        np.testing.assert_array_equal(fast.image, exact.image)
        np.testing.assert_array_equal(fast.mask, exact.mask)
    square = fixed**2
    np.testing.assert_allclose(convolve(exposure, fixed).variance,
                               direct_convolve(variance, square), rtol=1e-5, atol=1e-5)


def test_variance_modes_and_the_deprecated_flag():
    rng = np.random.default_rng(112)
    exposure = Exposure(rng.normal(size=(20, 20)), variance=rng.uniform(1, 2, (20, 20)))
    kernel = np.full((3, 3), 1 / 9)
    none = convolve(exposure, kernel, variance="none")
    np.testing.assert_array_equal(none.variance, exposure.variance)
    legacy = convolve(exposure, kernel, propagate_variance=False)
    np.testing.assert_array_equal(legacy.variance, exposure.variance)
    default = convolve(exposure, kernel)
    np.testing.assert_array_equal(convolve(exposure, kernel, propagate_variance=True).variance,
                                  default.variance)
    assert not np.array_equal(default.variance, exposure.variance)
    with pytest.raises(InputError, match="variance must be one of"):
        convolve(exposure, kernel, variance="approximate")  # type: ignore[arg-type]


def _local_range(plane, size):
    """max and min of ``plane`` over the size x size neighbourhood of each pixel."""
    high = scipy.ndimage.maximum_filter(plane, size=size, mode="nearest")
    low = scipy.ndimage.minimum_filter(plane, size=size, mode="nearest")
    return high, low


@pytest.fixture(scope="module")
def simulated_variance():
    """A simulated template (sky gradient, stars) and the AL kernel matching it to a science
    image whose FWHM varies by ±10 % across the field."""
    config = SimConfig(shape=(192, 384), n_stars=120, offset=(0.3, -0.2), flux_scale=1.1,
                       science={"fwhm": 4.0, "fwhm_gradient": (0.1, 0.0), "sky_level": 400.0,
                                "sky_gradient": (40.0, 20.0)},
                       template={"fwhm": 3.0, "sky_level": 400.0,
                                 "sky_gradient": (40.0, 20.0)})
    pair = simulate_pair(config, seed=3)
    kernel = al_matching_kernel(config, order=2)
    assert kernel.is_spatially_varying
    return pair.template, kernel


def test_fast_variance_error_is_below_one_percent_where_the_variance_is_smooth(
        simulated_variance):
    template, kernel = simulated_variance
    fast = convolve(template, kernel)
    exact = convolve(template, kernel, variance="exact")
    np.testing.assert_array_equal(fast.image, exact.image)
    np.testing.assert_array_equal(fast.mask, exact.mask)
    relative = np.abs(fast.variance.astype(np.float64) - exact.variance) / exact.variance
    high, low = _local_range(template.variance, kernel.shape[0])
    # V smooth on the kernel scale: it changes by less than 10 % across the footprint (sky
    # gradient, faint wings); EDGE pixels see the zero padding, a jump in V.
    smooth = ((high - low) / low < 0.1) & ~exact.masked("EDGE")
    assert smooth.mean() > 0.3
    assert relative[smooth].max() <= 0.01
    # where V is flat to 5 % the approximation is exact to float32 rounding
    flat = ((high - low) / low < 0.05) & ~exact.masked("EDGE")
    assert flat.any()
    assert relative[flat].max() <= 1e-5
    # near stars the error follows the documented bound (next test); overall it stays small
    assert np.median(relative) <= 1e-5
    # the kernel changes substantially across the field, so the test is not vacuous
    corner = kernel.image_at(*template.bbox[:2])
    centre = kernel.image_at()
    assert np.abs(corner - centre).sum() > 0.05 * np.abs(centre).sum()


def test_fast_variance_error_obeys_the_documented_bound(simulated_variance):
    template, kernel = simulated_variance
    fast = convolve(template, kernel)
    exact = convolve(template, kernel, variance="exact")
    height, width = template.shape
    x0, y0 = template.origin
    centre = kernel.image_at(x0 + (width - 1) / 2, y0 + (height - 1) / 2)
    high, low = _local_range(template.variance, kernel.shape[0])
    rng = np.random.default_rng(113)
    half = kernel.shape[0] // 2
    rows = rng.integers(half, height - half, 300)
    cols = rng.integers(half, width - half, 300)
    for r, c in zip(rows, cols, strict=True):
        k2 = kernel.image_at(c + x0, r + y0) ** 2
        ratio = k2.sum() / (centre**2).sum()
        eta = np.abs(k2 - ratio * centre**2).sum() / (2 * k2.sum())
        bound = eta * (high[r, c] - low[r, c]) / low[r, c]
        error = abs(float(fast.variance[r, c]) - float(exact.variance[r, c]))
        assert error <= bound * exact.variance[r, c] * (1 + 1e-3) + 1e-4 * exact.variance[r, c]


def test_convolve_is_thread_safe_and_deterministic():
    rng = np.random.default_rng(114)
    image = rng.normal(size=(600, 140)).astype(np.float32)
    exposure = Exposure(image, variance=np.ones_like(image))
    exposure = exposure.with_mask("CR", rng.random(image.shape) < 0.01)
    kernel = BasisKernel(rng.normal(size=(2, 9, 9)), rng.normal(size=(2, 3)), order=1,
                         bbox=exposure.bbox)
    serial = convolve(exposure, kernel)
    barrier = threading.Barrier(4)
    results: list = [None] * 4

    def work(n):
        barrier.wait()
        results[n] = convolve(exposure, kernel)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_array_equal(result.image, serial.image)
        np.testing.assert_array_equal(result.variance, serial.variance)
        np.testing.assert_array_equal(result.mask, serial.mask)


def test_outputs_are_frozen_and_not_copied_again():
    rng = np.random.default_rng(115)
    exposure = Exposure(rng.normal(size=(30, 30)), variance=np.ones((30, 30)))
    out = convolve(exposure, np.ones((3, 3)) / 9)
    for plane in (out.image, out.mask, out.variance):
        assert not plane.flags.writeable
        assert plane.flags.owndata
    assert out.image.dtype == np.float32 and out.variance.dtype == np.float32


def test_public_scipy_fft_fallback_gives_the_same_results(monkeypatch):
    rng = np.random.default_rng(116)
    image = rng.normal(size=(90, 70)).astype(np.float32)
    exposure = Exposure(image, variance=rng.uniform(1, 2, image.shape).astype(np.float32))
    exposure = exposure.with_mask("CR", rng.random(image.shape) < 0.01)
    kernel = BasisKernel(rng.normal(size=(3, 7, 7)), rng.normal(size=(3, 6)), order=2,
                         bbox=exposure.bbox)
    disc = np.zeros((5, 5))
    disc[2, :] = disc[:, 2] = 1.0  # a non-rectangular footprint: FFT dilation
    assert _fft.POCKETFFT is not None  # the buffer-reusing path is the one normally used
    results = [convolve(exposure, k, variance=mode) for k in (kernel, disc)
               for mode in ("fast", "exact")]
    monkeypatch.setattr(_fft, "POCKETFFT", None)
    fallback = [convolve(exposure, k, variance=mode) for k in (kernel, disc)
                for mode in ("fast", "exact")]
    for a, b in zip(results, fallback, strict=True):
        np.testing.assert_allclose(a.image, b.image, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(a.variance, b.variance, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(a.mask, b.mask)
