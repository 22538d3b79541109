"""The cell layout (``_grid``) and the matched-star measurements (``_stars``).

* tent weights: a partition of unity that reproduces linear functions of position (the
  property that makes blending per-cell outputs first-order exact in the PSF variation);
* the flux ratio of a simulated pair with a known photometric scale, fitted on the
  PSF-cross-convolved stars, within its statistical error; the error itself is checked on
  synthetic fluxes (the pulls of 400 fits);
* the registration offset and the astrometric scatter of matched stars.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff.sim import simulate_pair
from skydiff_plugins.zogy import _grid, _stars
from skydiff_plugins.zogy._prepare import fill_mask


@pytest.mark.parametrize(("shape", "cell"), [((300, 517), 64), ((97, 200), 50), ((64, 64), None)])
def test_tent_weights_are_a_partition_of_unity_reproducing_linear_functions(shape, cell):
    layout = _grid.make_layout(shape, cell_size=cell, border=7)
    total = np.zeros(shape)
    first_moment_rows = np.zeros(shape)
    first_moment_cols = np.zeros(shape)
    for c in layout.cells:
        weight = c.weight_rows[:, None].astype(np.float64) * c.weight_cols[None, :]
        total[c.support] += weight
        first_moment_rows[c.support] += weight * c.centre[0]
        first_moment_cols[c.support] += weight * c.centre[1]
        # the outer cut-out holds the support grown by the border; the FFT grid is larger
        (rows, cols), (outer_r, outer_c) = c.support, c.outer
        assert outer_r.start == max(0, rows.start - 7) and outer_c.stop == min(shape[1],
                                                                                 cols.stop + 7)
        assert c.fft_shape[0] >= (outer_r.stop - outer_r.start) + 7
        assert c.fft_shape[1] >= (outer_c.stop - outer_c.start) + 7
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    rows, cols = np.indices(shape, dtype=np.float64)
    centres_r = sorted({c.centre[0] for c in layout.cells})
    centres_c = sorted({c.centre[1] for c in layout.cells})
    inside = ((rows >= centres_r[0]) & (rows <= centres_r[-1])
              & (cols >= centres_c[0]) & (cols <= centres_c[-1]))
    # between the first and last centres the weights interpolate position linearly (float32
    # weights: ~1e-7 relative)
    np.testing.assert_allclose(first_moment_rows[inside], rows[inside], atol=1e-3)
    np.testing.assert_allclose(first_moment_cols[inside], cols[inside], atol=1e-3)
    if cell is None:
        assert layout.n_cells == (1, 1)


def test_choose_cell_size():
    assert _grid.choose_cell_size(0.0, max_change=0.05, minimum=64, shape=(500, 800)) == 800
    assert _grid.choose_cell_size(1e-3, max_change=0.05, minimum=64, shape=(500, 800)) == 64
    assert _grid.choose_cell_size(1e-4, max_change=0.05, minimum=64, shape=(500, 800)) == 500


# ------------------------------------------------------------------------------------------
# flux ratio


@pytest.fixture(scope="module")
def scaled_pair():
    # science = 1.25 x template photometrically; different PSFs (FWHM 3.5 vs 2.6)
    return simulate_pair(shape=(512, 512), n_stars=250, flux_min=3000, flux_max=2e5, seed=31,
                         flux_scale=1.25, science={"fwhm": 3.5}, template={"fwhm": 2.6})


def test_flux_ratio_recovers_the_photometric_scale(scaled_pair):
    science, template = scaled_pair.science, scaled_pair.template
    stars = _stars.match_stars(science, template, sources=None, threshold=10.0, min_snr=30.0,
                               max_stars=500, match_radius=2.0,
                               bad_planes=skydiff.DEFAULT_BAD_PLANES)
    assert len(stars) >= 30
    filled = fill_mask(science, ()) | fill_mask(template, ())
    sky_n = skydiff.background_mesh(science.image, bin_size=128)
    sky_r = skydiff.background_mesh(template.image, bin_size=128)
    f_n, v_n, f_r, v_r, ok = _stars.psf_matched_fluxes(
        science.image - sky_n, science.variance, template.image - sky_r, template.variance,
        filled, stars, psf_science=science.psf, psf_template=template.psf,
        origin=science.origin, size=21)
    fit = _stars.fit_flux_ratio(f_n, v_n, f_r, v_r, ok, clip=4.0, min_stars=5)
    assert fit is not None and fit.n_used >= 30
    # the truth is 1.25; a 3-sigma tolerance with the fit's own statistical error (which is
    # ~0.3 %, far below any PSF-mismatch bias a flux estimator without cross-convolution has)
    assert abs(fit.value - 1.25) <= 3.0 * fit.error
    assert fit.error < 0.01
    # the fluxes are on one scale: the template fluxes times the ratio are the science ones
    pulls = (f_n - fit.value * f_r)[fit.used] / np.sqrt(v_n + fit.value**2 * v_r)[fit.used]
    assert np.std(pulls) < 2.0


def test_flux_ratio_error_is_calibrated_on_synthetic_fluxes():
    # 400 fits of 40 stars with fluxes known in both images and Gaussian noise: the pull
    # (r - 1.3)/sigma_r has a standard deviation of 1 within 3 standard errors
    # (sqrt(1/(2 x 400)) = 3.5 %, so 0.9..1.1), and mean 0 within 3/sqrt(400) = 0.15.
    rng = np.random.default_rng(7)
    pulls = []
    for _ in range(400):
        alpha = rng.uniform(2e3, 5e4, 40)
        v_n = alpha * 1.3 + 400.0
        v_r = alpha + 300.0
        f_n = 1.3 * alpha + rng.normal(size=40) * np.sqrt(v_n)
        f_r = alpha + rng.normal(size=40) * np.sqrt(v_r)
        fit = _stars.fit_flux_ratio(f_n, v_n, f_r, v_r, np.ones(40, bool), clip=10.0,
                                    min_stars=5)
        assert fit is not None
        pulls.append((fit.value - 1.3) / fit.error)
    pulls = np.array(pulls)
    assert abs(np.mean(pulls)) < 0.15
    assert 0.9 < np.std(pulls) < 1.1


def test_flux_ratio_rejects_variables():
    rng = np.random.default_rng(8)
    alpha = rng.uniform(5e3, 5e4, 50)
    f_r = alpha + rng.normal(size=50) * 50.0
    f_n = 0.9 * alpha + rng.normal(size=50) * 50.0
    f_n[:5] *= 1.5  # five variables
    fit = _stars.fit_flux_ratio(f_n, np.full(50, 2500.0), f_r, np.full(50, 2500.0),
                                np.ones(50, bool), clip=4.0, min_stars=5)
    assert fit is not None and fit.n_rejected >= 5 and not fit.used[:5].any()
    assert abs(fit.value - 0.9) < 3 * fit.error
    assert _stars.fit_flux_ratio(f_n[:3], np.ones(3), f_r[:3], np.ones(3), np.ones(3, bool),
                                 clip=4.0, min_stars=5) is None


# ------------------------------------------------------------------------------------------
# registration


def test_registration_offset_of_a_shifted_pair():
    pair = simulate_pair(shape=(512, 512), n_stars=250, flux_min=3000, flux_max=2e5, seed=32,
                         offset=(0.3, -0.2))
    stars = _stars.match_stars(pair.science, pair.template, sources=None, threshold=10.0,
                               min_snr=30.0, max_stars=500, match_radius=2.0,
                               bad_planes=skydiff.DEFAULT_BAD_PLANES)
    registration = _stars.fit_registration(stars, mode="shift", shape=(512, 512), min_stars=5)
    dx, dy = registration.offset(256.0, 256.0)
    # template minus science = -offset, within 4 standard errors (~0.003 px each)
    assert abs(dx + 0.3) < 4 * registration.error_x + 1e-3
    assert abs(dy - 0.2) < 4 * registration.error_y + 1e-3
    assert registration.error_x < 0.01
    # no registration noise was simulated: the scatter is the centroids' photon noise
    assert registration.sigma_x < 0.02 and registration.sigma_y < 0.02


def test_astrometric_scatter_and_affine_model_on_synthetic_offsets():
    # 300 stars with centroid errors from their S/N plus 0.05 px of registration noise and an
    # affine offset field; the model and the scatter are recovered (scatter within 15 %:
    # the MAD of 300 values has a relative error of ~1.1/sqrt(300) = 6 %).
    rng = np.random.default_rng(9)
    n = 300
    x, y = rng.uniform(0, 1000, n), rng.uniform(0, 800, n)
    snr = rng.uniform(50, 500, n)
    fwhm = np.full(n, 3.0)
    noise = np.sqrt(2 * (3.0 / 2.3548 / snr) ** 2 * 2)
    dx = 0.2 + 1e-4 * x + rng.normal(size=n) * np.hypot(noise, 0.05)
    dy = -0.1 - 2e-4 * y + rng.normal(size=n) * np.hypot(noise, 0.05)
    stars = Table({"x": x, "y": y, "snr": snr, "fwhm": fwhm, "x_template": x + dx,
                   "y_template": y + dy, "snr_template": snr, "fwhm_template": fwhm})
    registration = _stars.fit_registration(stars, mode="affine", shape=(801, 1001),
                                           min_stars=5)
    assert registration.mode == "affine"
    for x0, y0 in ((0.0, 0.0), (1000.0, 800.0), (500.0, 400.0)):
        mx, my = registration.offset(x0, y0)
        assert mx == pytest.approx(0.2 + 1e-4 * x0, abs=0.02)
        assert my == pytest.approx(-0.1 - 2e-4 * y0, abs=0.02)
    assert registration.sigma_x == pytest.approx(0.05, rel=0.15)
    assert registration.sigma_y == pytest.approx(0.05, rel=0.15)
    shift = _stars.fit_registration(stars[:10], mode="affine", shape=(801, 1001), min_stars=5)
    assert shift.mode == "shift"  # too few stars for an affine model
    none = _stars.fit_registration(stars[:3], mode="shift", shape=(801, 1001), min_stars=5)
    assert none.mode == "none" and none.offset(0.0, 0.0) == (0.0, 0.0)
