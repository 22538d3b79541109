"""The ZOGY filters of one cell (``_filters``): whiteness, ZOGY's equations, recentring.

The filters are checked against ZOGY's equations (Zackay, Ofek & Gal-Yam 2016, eqs. 12-17)
coded independently here from the PSF spectra, and for the properties the module promises:
the difference is white at every frequency, its PSF has unit sum, the score is the matched
filter of the difference, and the kernels used for the variances are the image-space
squares of the kernels applied to the images.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import scipy.fft

import skydiff
from skydiff_plugins.zogy import _filters


def gaussian(sigma: float, size: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    image = np.exp(-0.5 * (((offsets[None, :] - dx) ** 2 + (offsets[:, None] - dy) ** 2)
                           / sigma**2))
    return image / image.sum()


def spectra(sigma_n=1.7, sigma_r=1.3, *, shape=(96, 96), floor=1e-4, shift=(0.0, 0.0),
            flux_r=0.8, s2n=120.0, s2r=45.0, exact=False):
    psf_n = _filters.prepare_psf(gaussian(sigma_n, 25), size=25, recentre=True)
    psf_r = _filters.prepare_psf(gaussian(sigma_r, 25), size=25, recentre=True)
    if exact:  # no Wiener window: the models are taken as noiseless
        psf_n, psf_r = attrs.evolve(psf_n, noise=0.0), attrs.evolve(psf_r, noise=0.0)
    result = _filters._zogy_spectra(psf_n, psf_r, shape, flux_n=1.0, flux_r=flux_r,
                                    sigma2_n=s2n, sigma2_r=s2r, floor=floor, shift=shift)
    return psf_n, psf_r, result


@pytest.mark.parametrize(("sigma_n", "sigma_r"), [(1.7, 1.3), (1.3, 1.7), (1.5, 1.5)])
@pytest.mark.parametrize("floor", [0.0, 1e-4, 1e-2])
def test_difference_is_white_at_every_frequency(sigma_n, sigma_r, floor):
    # sigma_N^2 |c_N|^2 + sigma_R^2 |c_R|^2 = 1 / F_D^2 at every k (regularised or not):
    # the noise of D is white. Float32 filters: relative round-off ~1e-6.
    s2n, s2r = 120.0, 45.0
    _, _, result = spectra(sigma_n, sigma_r, floor=floor, shift=(0.3, -0.2), s2n=s2n, s2r=s2r)
    power = s2n * np.abs(result.c_n) ** 2 + s2r * np.abs(result.c_r) ** 2
    np.testing.assert_allclose(power * result.f_d**2, 1.0, rtol=2e-5)


def test_filters_are_zogys_equations_without_regularisation():
    # floor = 0 and exact Gaussian PSFs: c_N = F_R P_R / (F_D den), c_R = F_N P_N / (F_D den),
    # P_D = F_R F_N P_R P_N / (F_D den) (eqs. 13-15), S kernels (eq. 12 / 17), from the
    # PSF spectra computed here in double precision.
    shape = (64, 64)
    flux_r, s2n, s2r = 0.8, 120.0, 45.0
    psf_n, psf_r, result = spectra(shape=shape, floor=0.0, flux_r=flux_r, s2n=s2n, s2r=s2r,
                                   exact=True)
    p_n = scipy.fft.rfft2(np.roll(np.pad(psf_n.image, ((0, 39), (0, 39))), (-12, -12), (0, 1)))
    p_r = scipy.fft.rfft2(np.roll(np.pad(psf_r.image, ((0, 39), (0, 39))), (-12, -12), (0, 1)))
    den = np.sqrt(s2n * flux_r**2 * np.abs(p_r) ** 2 + s2r * np.abs(p_n) ** 2)
    f_d = flux_r / np.sqrt(s2n * flux_r**2 + s2r)
    assert result.f_d == pytest.approx(f_d, rel=1e-6)
    c_n = flux_r * p_r / (f_d * den)
    c_r = p_n / (f_d * den)
    p_d = flux_r * p_r * p_n / (f_d * den)
    k_n = flux_r**2 * np.conj(p_n) * np.abs(p_r) ** 2 / den**2
    k_r = flux_r * np.conj(p_r) * np.abs(p_n) ** 2 / den**2
    # float32 spectra: absolute errors ~1e-7 of the largest values
    for ours, theirs in ((result.c_n, c_n), (result.c_r, c_r), (result.p_d, p_d),
                         (result.k_n, k_n), (result.k_r, k_r)):
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * scale)


def test_difference_psf_and_score_psf_have_unit_sum():
    psf_n, psf_r, _ = spectra()
    images, f_d = _filters.kernel_images(psf_n, psf_r, grid=128, flux_n=1.0, flux_r=0.8,
                                         sigma2_n=120.0, sigma2_r=45.0, floor=1e-4,
                                         shift=(0.0, 0.0))
    assert images["psf_d"].sum() == pytest.approx(1.0, abs=1e-6)
    centre = 64
    assert np.unravel_index(np.argmax(images["psf_d"]), (128, 128)) == (centre, centre)
    # P_S is |P_D|^2 in Fourier space: the autocorrelation of P_D, with its sum squared
    assert images["psf_s"].sum() == pytest.approx(1.0, abs=1e-6)
    assert f_d > 0


def test_kernel_spectra_equal_the_transform_of_the_wrapped_kernel():
    rng = np.random.default_rng(1)
    kernels = rng.normal(size=(3, 9, 9)).astype(np.float32)
    shape = (40, 34)
    ours = _filters.kernel_spectra(kernels, shape)
    for kernel, spectrum in zip(kernels, ours, strict=True):
        grid = np.zeros(shape)
        grid[:9, :9] = kernel
        expected = scipy.fft.rfft2(np.roll(grid, (-4, -4), axis=(0, 1)))
        np.testing.assert_allclose(spectrum, expected, rtol=0, atol=1e-5)


def test_recentring_removes_a_psf_centroid_offset():
    # A Gaussian model offset by (0.3, -0.2) px: its adaptive centroid is measured and the
    # recentred spectrum is the centred Gaussian's (sub-pixel Fourier shift; the residual is
    # the sampling and tapering error, < 1e-3 of the peak).
    shifted = _filters.prepare_psf(gaussian(1.6, 25, dx=0.3, dy=-0.2), size=25, recentre=True)
    centred = _filters.prepare_psf(gaussian(1.6, 25), size=25, recentre=True)
    assert shifted.centroid == pytest.approx((0.3, -0.2), abs=2e-3)
    a = _filters._psf_spectrum(shifted, (64, 64))
    b = _filters._psf_spectrum(centred, (64, 64))
    assert np.abs(a - b).max() < 1e-3
    kept = _filters.prepare_psf(gaussian(1.6, 25, dx=0.3, dy=-0.2), size=25, recentre=False)
    assert kept.centroid == (0.0, 0.0)


def test_psf_model_noise_is_measured():
    # An analytic Gaussian has no model noise beyond round-off; white noise of 1e-4 of the
    # peak added to its image shows up at the level of its Fourier amplitude.
    clean = _filters.prepare_psf(gaussian(2.2, 33), size=33, recentre=True)
    rng = np.random.default_rng(2)
    image = gaussian(2.2, 33)
    noisy_image = image + 1e-4 * image.max() * rng.normal(size=image.shape)
    noisy = _filters.prepare_psf(noisy_image, size=33, recentre=True)
    assert clean.noise < 1e-7
    # |sum of 33^2 x (1e-4 peak) noise| ~ 33 x 1e-4 x 0.033 ~ 1e-4 (Rayleigh median ~0.8 x)
    assert 3e-5 < noisy.noise < 3e-4
    window = _filters._noise_window(noisy, (64, 64))
    assert float(np.min(window)) < 0.1 and float(np.max(window)) > 0.99


def test_cell_filters_squared_kernels_match_the_image_kernels():
    # The variance propagation uses exactly the squares of the kernels applied to the
    # images: convolving a delta image with c_N gives c_N, with c_N^2 its square.
    psf_n, psf_r, _ = spectra()
    shape = (80, 80)
    filters = _filters.cell_filters(psf_n, psf_r, fft_shape=shape, grid=128, border=30,
                                    flux_n=1.0, flux_r=0.8, sigma2_n=120.0, sigma2_r=45.0,
                                    floor=1e-4, shift=(0.2, 0.1), mask_threshold=1e-2,
                                    support_tolerance=1e-5, psf_size=25, score_psf_size=31)
    delta = np.zeros(shape, dtype=np.float32)
    delta[40, 40] = 1.0
    spectrum = scipy.fft.rfft2(delta)
    kernel = scipy.fft.irfft2(filters.c_r * spectrum, s=shape)
    squared = scipy.fft.irfft2(filters.c_r2 * spectrum, s=shape)
    np.testing.assert_allclose(squared, kernel**2, rtol=0, atol=1e-6 * float(kernel.max()**2))
    assert filters.tail < 1e-6
    # the registration shift moves the template kernel by -d
    row, col = np.unravel_index(np.argmax(np.abs(kernel)), shape)
    assert (row, col) == (40, 40)
    assert filters.footprint["difference_template"][0] < 30


def test_apply_filters_on_white_noise_matches_the_variance_plane():
    # Pure white noise of variances 120 and 45: the difference's pixel variance equals its
    # variance plane (1/F_D^2 in the interior) within the sampling error of 40 000 pixels
    # (relative sd sqrt(2/N) = 0.7 %; 4 % allows ~5 sd).
    psf_n, psf_r, _ = spectra()
    shape = (256, 256)
    filters = _filters.cell_filters(psf_n, psf_r, fft_shape=shape, grid=128, border=30,
                                    flux_n=1.0, flux_r=0.8, sigma2_n=120.0, sigma2_r=45.0,
                                    floor=1e-4, shift=(0.0, 0.0), mask_threshold=1e-2,
                                    support_tolerance=1e-5, psf_size=25, score_psf_size=31)
    rng = np.random.default_rng(3)
    n = 200
    planes = [rng.normal(scale=np.sqrt(120.0), size=(n, n)).astype(np.float32),
              np.full((n, n), 120.0, dtype=np.float32),
              rng.normal(scale=np.sqrt(45.0), size=(n, n)).astype(np.float32),
              np.full((n, n), 45.0, dtype=np.float32)]
    inner = (slice(30, 170), slice(30, 170))
    out = _filters.apply_filters(filters, planes, fft_shape=shape, region=inner,
                                 astrometric=(0.0, 0.0), matched=True)
    expected = 1.0 / filters.f_d**2
    assert out["difference_variance"] == pytest.approx(expected, rel=1e-3)
    assert np.var(out["difference"]) == pytest.approx(expected, rel=0.04)
    # the template's share: sigma_R^2 sum c_R^2, less than the whole
    assert 0 < float(out["matched_variance"].mean()) < expected
    assert np.var(out["matched"]) == pytest.approx(float(out["matched_variance"].mean()),
                                                   rel=0.06)
    z = out["score"] / np.sqrt(out["score_variance"])
    assert np.std(z) == pytest.approx(1.0, rel=0.1)
    assert "score_astrometric" not in out
    astro = _filters.apply_filters(filters, planes, fft_shape=shape, region=inner,
                                   astrometric=(0.01, 0.04), matched=False)
    assert "matched" not in astro
    assert np.all(astro["score_astrometric"] >= 0) and astro["score_astrometric"].max() > 0


def test_support_radius():
    image = np.zeros((11, 11))
    image[5, 5] = 1.0
    assert _filters.support_radius(image, fraction=1e-3) == 0
    image[5, 9] = 0.01
    assert _filters.support_radius(image, fraction=1e-3) == 4
    assert _filters.support_radius(image, fraction=0.02) == 0


def test_prepared_psf_is_normalised_and_tapered():
    psf = skydiff.GaussianPsf(2.0, size=31).kernel_image()
    prepared = _filters.prepare_psf(psf, size=21, recentre=True)
    assert prepared.image.shape == (21, 21)
    assert prepared.image.sum() == pytest.approx(1.0)
    assert abs(prepared.image[0, 0]) < 1e-30 and abs(prepared.image[0, 10]) < 1e-30
    assert prepared.width == pytest.approx(2.0, rel=0.01)
