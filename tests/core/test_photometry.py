"""Tests of skydiff.photometry: stacked cut-outs, sub-pixel PSF stamps and linear PSF fits."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

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
