"""Statistics of the ``zogy`` outputs on simulated pairs (issue 5's test list).

* null test: source-free pairs (one cell and a forced grid) -- the pixel variance of the
  difference and its variance plane within 5 % of the expectation
  :math:`\\sigma_N^2 + r^2\\sigma_R^2`, and no :math:`|S_\\mathrm{corr}| > 5`;
* a variable star brightened by 10 % is detected in :math:`S_\\mathrm{corr}` at the
  significance expected from the truth, its flux difference is measured on the difference
  with the difference PSF, and no static star reaches :math:`|S_\\mathrm{corr}| = 5`;
* the score of ``al_preconvolve`` and ZOGY's agree up to noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from skydiff.sim import simulate_pair
from skydiff_plugins.psfmatch import AlPreconvolveSubtraction
from skydiff_plugins.zogy import ZogyConfig, ZogySubtraction


def subtract(science, template, **settings):
    config = ZogyConfig()
    config.update(**settings)
    return ZogySubtraction(config).run(science, template)


def significance(exposure):
    """``(image / sqrt(variance), unmasked)``."""
    good = ~exposure.masked() & (exposure.variance > 0)
    z = np.zeros(exposure.shape)
    z[good] = exposure.image[good] / np.sqrt(exposure.variance[good])
    return z, good


# ------------------------------------------------------------------------------------------
# null test


@pytest.fixture(scope="module")
def empty_pair():
    # source-free; different PSFs, noise levels and photometric scale (template noisier in
    # its own units: sky 400 ADU, scale 0.8)
    return simulate_pair(shape=(512, 512), n_stars=0, seed=41, flux_scale=0.8,
                         science={"fwhm": 3.2, "sky_level": 150.0},
                         template={"fwhm": 2.4, "sky_level": 400.0})


@pytest.mark.parametrize("grid", ["never", "always"])
def test_null_difference_variance_and_score(empty_pair, grid):
    result = subtract(empty_pair.science, empty_pair.template, grid=grid, cell_size=128)
    meta = result.metadata
    assert meta["n_cells"] == (1 if grid == "never" else 16)
    assert meta["flux_scaling"] == "calibration"
    assert meta["flux_ratio"] == pytest.approx(0.8)
    # expectation in science units: sigma_N^2 + r^2 sigma_R^2 with the simulated variances
    # (sky + read noise) of each image
    r = meta["flux_ratio"]
    expected = (float(np.median(empty_pair.science.variance))
                + r**2 * float(np.median(empty_pair.template.variance)))
    difference = result.difference
    good = ~difference.masked()
    # 250 000 pixels: the sample variance has a relative sd of sqrt(2/N) = 0.3 % (x2 for
    # the filter's correlation of neighbouring pixels): 5 % is far outside the noise
    assert np.var(difference.image[good]) == pytest.approx(expected, rel=0.05)
    assert float(np.median(difference.variance[good])) == pytest.approx(expected, rel=0.05)
    assert abs(float(np.mean(difference.image[good]))) < 5 * math.sqrt(expected / good.sum()
                                                                         * 10)
    z, good_s = significance(result.score)
    assert good_s.mean() > 0.9
    # S_corr is unit normal: P(|z| > 5) = 5.7e-7 per pixel, < 0.2 expected over 250 000
    # (correlated) pixels
    assert np.abs(z[good_s]).max() < 5.0
    assert np.std(z[good_s]) == pytest.approx(1.0, abs=0.03)
    assert meta["n_matched_stars"] == 0 and meta["registration"] == "none"


# ------------------------------------------------------------------------------------------
# a variable star


@pytest.fixture(scope="module")
def variable_pair():
    # seed 5 makes the one variable brighter (+10 %) in the science image; bright stars
    # (up to 3e5 ADU) around it must not reach |S_corr| = 5
    pair = simulate_pair(shape=(384, 384), n_stars=150, flux_min=1000, flux_max=3e5, seed=5,
                         n_variables=1, variable_fraction=0.1, variable_flux=(1.5e5, 1.5e5),
                         science={"fwhm": 3.4}, template={"fwhm": 2.6})
    return pair


def test_variable_star_brightened_by_ten_percent_is_detected(variable_pair):
    pair = variable_pair
    truth = pair.truth[pair.truth["kind"] == "variable"][0]
    delta = float(truth["flux_science"] - truth["flux_template"])
    assert delta == pytest.approx(0.1 * float(truth["flux_template"]), rel=1e-6)
    result = subtract(pair.science, pair.template)
    z, good = significance(result.score)
    x, y = float(truth["x"]), float(truth["y"])
    row, col = round(y), round(x)
    peak = z[row - 2:row + 3, col - 2:col + 3].max()
    # expected significance: delta / sigma(PSF flux of D) with the difference PSF and
    # variance at the star (both planes include the star's shot noise)
    difference = result.difference
    psf = difference.psf.kernel_image(x, y)
    half = psf.shape[0] // 2
    stamp = (slice(row - half, row + half + 1), slice(col - half, col + half + 1))
    variance = difference.variance[stamp].astype(np.float64)
    norm = float(np.sum(psf**2))
    flux = float(np.sum(psf * difference.image[stamp])) / norm
    flux_err = math.sqrt(float(np.sum(psf**2 * variance))) / norm
    assert peak > 5.0
    # the sub-pixel position and the score's matched filter: within 25 % of the flux S/N
    assert peak == pytest.approx(delta / flux_err, rel=0.25)
    # the PSF-weighted flux of the difference is the flux change (4 sigma)
    assert abs(flux - delta) < 4 * flux_err
    # nothing else in the image reaches 5 sigma: the static stars cancel, their shot noise
    # is in the score's variance
    far = np.ones(z.shape, dtype=bool)
    far[row - 6:row + 7, col - 6:col + 7] = False
    assert np.abs(z[good & far]).max() < 5.0


# ------------------------------------------------------------------------------------------
# agreement with al_preconvolve


@pytest.fixture(scope="module")
def transient_pair():
    return simulate_pair(shape=(384, 384), n_stars=150, seed=21, n_transients=5,
                         science={"fwhm": 3.5}, template={"fwhm": 2.5})


def test_al_preconvolve_score_and_zogy_score_agree_up_to_noise(transient_pair):
    pair = transient_pair
    al = AlPreconvolveSubtraction().run(pair.science, pair.template)
    zogy = subtract(pair.science, pair.template)
    z_al, good_al = significance(al.score)
    z_zogy, good_zogy = significance(zogy.score)
    good = good_al & good_zogy
    rows, cols = np.indices(z_al.shape)
    blank = good.copy()
    for source in pair.truth:
        blank &= np.hypot(cols - source["x"], rows - source["y"]) > 12
    assert blank.sum() > 50_000
    # both are the likelihood score of the same data: on blank pixels they differ by a
    # small fraction of their (unit) noise (measured: rms 0.03, correlation 0.9995)
    delta = z_al[blank] - z_zogy[blank]
    assert np.sqrt(np.mean(delta**2)) < 0.1
    assert np.corrcoef(z_al[blank], z_zogy[blank])[0, 1] > 0.99
    assert np.std(z_zogy[blank]) == pytest.approx(1.0, abs=0.05)
    # every transient is found by both at a similar significance; ZOGY's is optimal (the
    # template noise is propagated exactly) and not lower than AL's by more than 5 %
    for source in pair.truth[pair.truth["kind"] == "transient"]:
        row, col = round(float(source["y"])), round(float(source["x"]))
        box = (slice(row - 2, row + 3), slice(col - 2, col + 3))
        a, b = z_al[box].max(), z_zogy[box].max()
        assert a > 5 and b > 5
        assert b >= 0.95 * a
