"""Tests of skydiff.photometry: stacked cut-outs, sub-pixel PSF stamps and linear PSF fits."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import scipy.signal

import skydiff
import skydiff.photometry as photometry
from skydiff.photometry import cutouts, fit_psf_flux, nearest_pixel, psf_stamps


def _gaussian_stamps(sigma: float, dx: np.ndarray, dy: np.ndarray, size: int) -> np.ndarray:
    """Unit-integral circular Gaussians sampled at pixel centres, centred at (h+dx, h+dy)."""
    c = np.arange(size, dtype=np.float64) - size // 2
    gx = np.exp(-0.5 * ((c[None, :] - dx[:, None]) / sigma) ** 2)
    gy = np.exp(-0.5 * ((c[None, :] - dy[:, None]) / sigma) ** 2)
    return gy[:, :, None] * gx[:, None, :] / (2.0 * math.pi * sigma**2)


class _CountingPsf:
    """A spatially varying Gaussian PSF (sigma grows with x) that records its evaluations."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    @property
    def average_position(self) -> tuple[float, float]:
        return (0.0, 0.0)

    def sigma(self, x: float) -> float:
        return 1.5 + 0.01 * x

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        assert x is not None and y is not None
        self.calls.append((x, y))
        return skydiff.GaussianPsf(self.sigma(x), size=31).kernel_image()

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        return 2.3548 * self.sigma(x or 0.0)


def test_docstring_examples() -> None:
    results = doctest.testmod(photometry, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 5
    assert results.failed == 0


# -- nearest_pixel / cutouts -------------------------------------------------------------------


def test_nearest_pixel_rounds_halves_up() -> None:
    ix, iy, dx, dy = nearest_pixel([2.5, -0.5, 3.49, np.nan], [0.0, 1.5, -2.51, 1.0])
    assert ix[:3].tolist() == [3, 0, 3]
    assert iy[:3].tolist() == [0, 2, -3]
    np.testing.assert_allclose(dx[:3], [-0.5, -0.5, 0.49], atol=1e-12)
    assert np.isnan(dx[3]) and np.isnan(dy[3])


def test_cutouts_match_slices_and_fill_edges() -> None:
    rng = np.random.default_rng(11)
    image = rng.normal(size=(30, 40)).astype(np.float32)
    x = np.array([20.2, 0.4, 39.6, 10.0, np.nan])
    y = np.array([15.7, 2.0, 29.5, -10.0, 3.0])
    stamps = cutouts(image, x, y, size=5)
    assert stamps.shape == (5, 5, 5) and stamps.dtype == np.float32
    np.testing.assert_array_equal(stamps[0], image[14:19, 18:23])
    # Source 1 sits at column 0: the two leftmost stamp columns are off the image.
    assert np.isnan(stamps[1][:, :2]).all()
    np.testing.assert_array_equal(stamps[1][:, 2:], image[0:5, 0:3])
    # Source 2 rounds to (30, 40), one past the last row and column.
    np.testing.assert_array_equal(stamps[2][:2, :2], image[28:30, 38:40])
    assert np.isnan(stamps[2][2:]).all() and np.isnan(stamps[2][:, 2:]).all()
    assert np.isnan(stamps[3]).all() and np.isnan(stamps[4]).all()


def test_cutouts_keep_integer_and_bool_dtypes() -> None:
    mask = np.arange(100, dtype=np.uint32).reshape(10, 10)
    stamps = cutouts(mask, [0.0], [0.0], size=3, fill=0)
    assert stamps.dtype == np.uint32
    np.testing.assert_array_equal(stamps[0], [[0, 0, 0], [0, 0, 1], [0, 10, 11]])
    flags = cutouts(mask > 50, [9.0], [9.0], size=3, fill=False)
    assert flags.dtype == bool and flags[0].sum() == 4
    assert cutouts(mask, [5.0], [5.0], size=3).dtype == np.float64  # NaN fill promotes


def test_cutouts_do_not_modify_input() -> None:
    image = np.ones((8, 8), dtype=np.float32)
    image.setflags(write=False)
    stamps = cutouts(image, [4.0], [4.0], size=3)
    stamps[:] = 7.0
    assert (image == 1.0).all()


@pytest.mark.parametrize("kwargs", [{"size": 4}, {"size": 0}, {"size": 3.0}])
def test_cutouts_reject_bad_size(kwargs: dict[str, object]) -> None:
    with pytest.raises(skydiff.InputError):
        cutouts(np.zeros((5, 5)), [1.0], [1.0], **kwargs)  # type: ignore[arg-type]


def test_cutouts_reject_bad_arrays() -> None:
    with pytest.raises(skydiff.InputError):
        cutouts(np.zeros((5, 5, 2)), [1.0], [1.0], size=3)
    with pytest.raises(skydiff.InputError):
        cutouts(np.zeros((5, 5)), [1.0, 2.0], [1.0], size=3)


# -- psf_stamps ---------------------------------------------------------------------------------


def test_psf_stamps_integer_position_is_the_kernel_image() -> None:
    psf = skydiff.GaussianPsf(1.7, size=15)
    stamps = psf_stamps(psf, [10.0, 3.0], [4.0, 7.0], size=21)
    expected = np.zeros((21, 21))
    expected[3:18, 3:18] = psf.kernel_image()
    np.testing.assert_allclose(stamps[0], expected, atol=1e-15)
    np.testing.assert_allclose(stamps[1], expected, atol=1e-15)
    # Cropping below the PSF size keeps the central part without renormalising.
    small = psf_stamps(psf, [10.0], [4.0], size=5)[0]
    np.testing.assert_allclose(small, psf.kernel_image()[5:10, 5:10], atol=1e-15)


def test_psf_stamps_subpixel_shift_accuracy() -> None:
    # A Gaussian of sigma = 1.5 px is band-limited to e^{-pi^2 sigma^2 / 2} = 1.5e-5 of its
    # zero-frequency value at Nyquist; the Fourier shift must then match the analytically
    # shifted, sampled Gaussian to a few 1e-5 of the peak (measured: 2.1e-5).
    rng = np.random.default_rng(3)
    sigma = 1.5
    x = rng.uniform(5.0, 50.0, 200)
    y = rng.uniform(5.0, 50.0, 200)
    stamps = psf_stamps(skydiff.GaussianPsf(sigma, size=25), x, y, size=17)
    _, _, dx, dy = nearest_pixel(x, y)
    expected = _gaussian_stamps(sigma, dx, dy, 17)
    peak = expected.max()
    assert np.abs(stamps - expected).max() < 5e-5 * peak
    # The first moment of the model is the sub-pixel offset, up to the same aliasing
    # (measured 6e-6 px).
    c = np.arange(17) - 8
    sums = stamps.sum(axis=(1, 2))
    np.testing.assert_allclose((stamps * c[None, None, :]).sum(axis=(1, 2)) / sums, dx,
                               atol=2e-5)
    np.testing.assert_allclose((stamps * c[None, :, None]).sum(axis=(1, 2)) / sums, dy,
                               atol=2e-5)


def test_psf_stamps_unit_sum_and_nan_positions() -> None:
    psf = skydiff.GaussianPsf(2.0, size=31)
    stamps = psf_stamps(psf, [5.3, np.nan], [8.9, 2.0], size=41)
    assert stamps.dtype == np.float64
    # Unit sum over the plane: the Fourier shift keeps the zero frequency.
    assert stamps[0].sum() == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(stamps[1]).all()


def test_psf_stamps_varying_psf_origin_and_cache() -> None:
    psf = _CountingPsf()
    x = np.array([10.2, 80.7, 10.2, 80.7])
    y = np.array([5.5, 40.1, 5.5, 40.1])
    stamps = psf_stamps(psf, x, y, size=21, origin=(100.0, 200.0))
    # Two distinct positions: two evaluations, at parent coordinates.
    assert sorted(psf.calls) == [(110.2, 205.5), (180.7, 240.1)]
    np.testing.assert_array_equal(stamps[0], stamps[2])
    _, _, dx, dy = nearest_pixel(x, y)
    for k in (0, 1):
        expected = _gaussian_stamps(psf.sigma(x[k] + 100.0), dx[k:k + 1], dy[k:k + 1], 21)[0]
        assert np.abs(stamps[k] - expected).max() < 5e-5 * expected.max()


def test_psf_stamps_polynomial_psf_matches_kernel_image() -> None:
    g1, g2 = skydiff.GaussianPsf(1.5, size=15), skydiff.GaussianPsf(2.5, size=15)
    basis = np.stack([g1.kernel_image(), g2.kernel_image() - g1.kernel_image()])
    psf = skydiff.PolynomialPsf(basis, [[1, 0, 0], [0.5, 0.5, 0]], order=1,
                                bbox=(0, 0, 100, 100))
    stamps = psf_stamps(psf, [20.0, 90.0], [50.0, 50.0], size=15)
    np.testing.assert_allclose(stamps[0], psf.kernel_image(20.0, 50.0), atol=1e-14)
    np.testing.assert_allclose(stamps[1], psf.kernel_image(90.0, 50.0), atol=1e-14)


def test_psf_stamps_reject_non_psf() -> None:
    with pytest.raises(skydiff.InputError):
        psf_stamps(np.ones((3, 3)), [1.0], [1.0], size=3)  # type: ignore[arg-type]


# -- fit_psf_flux -------------------------------------------------------------------------------


def test_fit_psf_flux_noiseless_and_masked() -> None:
    model = psf_stamps(skydiff.GaussianPsf(1.5), [3.3, 7.8], [1.2, 9.6], size=15)
    data = np.array([250.0, -80.0])[:, None, None] * model
    data[0, 7, 7] += 1e6  # an outlier excluded by `valid`
    data[1, 0, 0] = np.nan  # non-finite pixels are excluded automatically
    valid = np.ones(data.shape, dtype=bool)
    valid[0, 7, 7] = False
    flux, err, chi2 = fit_psf_flux(data, np.full(data.shape, 2.0, np.float32), model,
                                   valid=valid)
    np.testing.assert_allclose(flux, [250.0, -80.0], rtol=1e-10)
    assert np.all(chi2 < 1e-12)
    # sigma_F^2 = v / sum(m^2) over the usable pixels.
    m2 = (model**2).sum(axis=(1, 2)) - np.array([model[0, 7, 7] ** 2, model[1, 0, 0] ** 2])
    np.testing.assert_allclose(err, np.sqrt(2.0 / m2), rtol=1e-12)


def test_fit_psf_flux_no_usable_pixel_gives_nan() -> None:
    model = np.zeros((2, 5, 5))
    model[1, 2, 2] = 1.0
    data = np.ones((2, 5, 5))
    variance = np.ones((2, 5, 5))
    variance[1, 2, 2] = 0.0  # zero variance: unusable
    flux, err, chi2 = fit_psf_flux(data, variance, model)
    assert np.isnan(flux).all() and np.isnan(err).all() and np.isnan(chi2).all()


def test_fit_psf_flux_broadcasts_one_model() -> None:
    model = psf_stamps(skydiff.GaussianPsf(2.0), [0.0], [0.0], size=11)[0]
    data = np.array([1.0, 2.0, 3.0])[:, None, None] * model
    flux, _, _ = fit_psf_flux(data, 1.0, model)
    np.testing.assert_allclose(flux, [1.0, 2.0, 3.0], rtol=1e-12)
    with pytest.raises(skydiff.InputError):
        fit_psf_flux(np.ones((2, 5, 5)), 1.0, np.ones((3, 5, 5)))


def test_fit_psf_flux_error_matches_scatter() -> None:
    # 4000 noise draws of a S/N ~ 24 source on a stamp with non-uniform variance. For the
    # exact linear estimator the pulls (F - F_true)/sigma_F are N(0, 1): their sample std has
    # standard error 1/sqrt(2(n-1)) = 0.0112, the mean 1/sqrt(n) = 0.0158 -> 4-sigma bounds
    # 0.045 and 0.064. The reduced chi2 of one draw has variance 2/(N-1) with N = 225 pixels,
    # so its mean over n draws has std sqrt(2/224/4000) = 0.0015 -> bound 0.0075 (5 sigma).
    rng = np.random.default_rng(2024)
    n, size = 4000, 15
    x = rng.uniform(10.0, 20.0, n)
    y = rng.uniform(10.0, 20.0, n)
    model = psf_stamps(skydiff.GaussianPsf(1.8), x, y, size=size)
    variance = rng.uniform(5.0, 20.0, (n, size, size))
    true_flux = 500.0
    data = true_flux * model + rng.normal(size=(n, size, size)) * np.sqrt(variance)
    flux, err, chi2 = fit_psf_flux(data, variance, model)
    pulls = (flux - true_flux) / err
    assert abs(pulls.std(ddof=1) - 1.0) < 0.045
    assert abs(pulls.mean()) < 0.064
    assert abs(chi2.mean() - 1.0) < 0.0075
    assert 20.0 < np.median(true_flux / err) < 35.0  # the S/N the comment assumes


# -- psf_noise_scale ---------------------------------------------------------------------------


def _noise_exposure(image: np.ndarray, variance: float, sigma_psf: float = 1.5
                    ) -> skydiff.Exposure:
    return skydiff.Exposure.from_arrays(
        image.astype(np.float32), variance=np.full(image.shape, variance, np.float32),
        psf=skydiff.GaussianPsf(sigma_psf))


def _gaussian_kernel(sigma: float, half: int) -> np.ndarray:
    c = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * (c[:, None] ** 2 + c[None, :] ** 2) / sigma**2)
    return g / g.sum()


# For white noise on a 256^2 image with a sigma = 1.5 px PSF, nu_0 has the correlation
# rho = P*P/sum P^2 (a Gaussian of sigma sqrt(2) 1.5 px): the MAD's n_eff = n / sum g(rho)
# with sum g ~ 1 + 0.37 (2 pi 1.5^2 - 1) ~ 5.9, so n_eff ~ 11000 and the standard error of
# the scale is sqrt(1.36 / n_eff) = 0.011 (measured over 20 seeds: 0.0127; the function's
# own `error` says 0.0127). Bounds below are 4 of those errors.


def test_noise_scale_white_noise_is_one() -> None:
    rng = np.random.default_rng(1)
    result = photometry.psf_noise_scale(_noise_exposure(rng.normal(0.0, 3.0, (256, 256)), 9.0))
    assert result.n_pixels == 256 * 256
    assert 0.005 < result.error < 0.02
    assert abs(result.scale - 1.0) < 4 * result.error  # measured 1.005


def test_noise_scale_variance_off_by_four_is_two() -> None:
    # The variance plane is 4 times too small: every nu_0 is twice as large.
    rng = np.random.default_rng(2)
    result = photometry.psf_noise_scale(_noise_exposure(rng.normal(0.0, 2.0, (256, 256)), 1.0))
    assert abs(result.scale - 2.0) < 4 * result.error  # error ~ 0.025; measured 2.00


def test_noise_scale_gaussian_correlated_noise_matches_analytic_factor() -> None:
    # White noise n of unit variance smoothed by g (Gaussian, sigma 1 px): m = g * n has the
    # per-pixel variance sigma'^2 = sum g^2, which is what the variance plane says. The
    # PSF-weighted sum S = sum_i P_i m_i = sum_j n_j (P conv g)_j has Var S = sum (P conv g)^2,
    # while independent pixels of variance sigma'^2 predict sum P^2 sum g^2: the measured
    # scale must be kappa = [sum (P conv g)^2 / (sum P^2 sum g^2)]^(1/2) (continuous limit
    # 4 pi sp^2 sg^2 / (sp^2 + sg^2) = 8.70 -> kappa = 2.95 for sp = 1.5, sg = 1). The noise
    # is correlated, so the statistical error (~0.037) is a lower bound; bound 0.15 (5 %).
    rng = np.random.default_rng(3)
    g = _gaussian_kernel(1.0, 6)
    noise = rng.normal(size=(256 + 12, 256 + 12))
    smoothed = scipy.signal.fftconvolve(noise, g, mode="valid")
    exposure = _noise_exposure(smoothed, float(np.sum(g**2)))
    psf = exposure.psf.kernel_image()
    kappa = math.sqrt(float(np.sum(scipy.signal.fftconvolve(psf, g) ** 2))
                      / (float(np.sum(psf**2)) * float(np.sum(g**2))))
    assert 2.9 < kappa < 3.0
    result = photometry.psf_noise_scale(exposure)
    assert abs(result.scale - kappa) < 0.15  # measured 2.97 vs 2.95


def test_noise_scale_ignores_sources_masks_and_exclude() -> None:
    # Bright point sources, a masked block of garbage and an excluded block of garbage leave
    # the white-noise scale at 1; the 5-sigma source cut alone also removes such blocks.
    rng = np.random.default_rng(4)
    shape = (256, 256)
    image = rng.normal(size=shape)
    model = psf_stamps(skydiff.GaussianPsf(1.5), [0.0], [0.0], size=21)[0]
    for row in range(20, 240, 40):
        for col in range(20, 240, 40):
            image[row - 10:row + 11, col - 10:col + 11] += 5000.0 * model
    image[100:140, 0:40] = 1e4 * rng.normal(size=(40, 40))
    image[0:40, 100:140] = 1e4 * rng.normal(size=(40, 40))
    exposure = _noise_exposure(image, 1.0)
    bad = np.zeros(shape, dtype=bool)
    bad[100:140, 0:40] = True
    exposure = exposure.with_mask("BAD", bad)
    exclude = np.zeros(shape, dtype=np.int32)
    exclude[0:40, 100:140] = 7
    result = photometry.psf_noise_scale(exposure, exclude=exclude)
    assert result.n_pixels < 256 * 256 - 2 * 1600
    assert abs(result.scale - 1.0) < 0.06  # 4 errors of ~0.014; measured 1.01
    unmasked = photometry.psf_noise_scale(_noise_exposure(image, 1.0))
    assert abs(unmasked.scale - 1.0) < 0.06
    assert unmasked.n_pixels < result.n_pixels + 2 * 1600


def test_noise_scale_background_mesh_removes_a_sky_gradient() -> None:
    # A sky of 100 + 0.5 x (in units of the noise 1): nu_0 would carry it; the mesh removes it.
    rng = np.random.default_rng(5)
    shape = (256, 256)
    sky = 100.0 + 0.5 * np.arange(shape[1])[None, :] * np.ones((shape[0], 1))
    exposure = _noise_exposure(sky + rng.normal(size=shape), 1.0)
    result = photometry.psf_noise_scale(exposure, background_bin_size=32)
    assert abs(result.scale - 1.0) < 0.06  # 4 errors; measured 1.00
    assert photometry.psf_noise_scale(exposure).scale > 1.5


def test_noise_scale_region_and_minimum() -> None:
    rng = np.random.default_rng(6)
    exposure = _noise_exposure(rng.normal(size=(300, 200)), 1.0)
    result = photometry.psf_noise_scale(exposure, max_pixels=10_000)
    assert 0 < result.n_pixels <= 10_000
    assert abs(result.scale - 1.0) < 4 * result.error  # error ~ 0.05
    # 30 x 30 pixels hold ~150 independent values of nu_0, fewer than needed when 2/3 of
    # them are masked: not measured.
    small = _noise_exposure(rng.normal(size=(30, 30)), 1.0)
    bad = np.zeros((30, 30), dtype=bool)
    bad[:20] = True
    assert photometry.psf_noise_scale(small.with_mask("BAD", bad)) == (1.0, 0, pytest.approx(
        math.nan, nan_ok=True))


def test_noise_scale_bad_inputs() -> None:
    exposure = _noise_exposure(np.zeros((50, 50)), 1.0)
    with pytest.raises(skydiff.InputError):
        photometry.psf_noise_scale(np.zeros((50, 50)))  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError):
        photometry.psf_noise_scale(exposure.evolve(psf=None))
    with pytest.raises(skydiff.InputError):
        photometry.psf_noise_scale(exposure, exclude=np.zeros((10, 10), dtype=bool))
    with pytest.raises(skydiff.InputError):
        photometry.psf_noise_scale(exposure, max_pixels=0)
