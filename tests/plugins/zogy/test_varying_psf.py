"""A science PSF whose width varies by ±20 % across the field (issue 5).

The science FWHM runs from 2.4 px on the left edge to 3.6 px on the right (template 2.5 px,
constant); the PSF models are the simulation's PolynomialPsf (order 5, exact to 3e-5 of the
peak). With the automatic grid (576 cells, 44 px apart) the normalised residual
:math:`z = D/\\sqrt{V}` in the 5 × 5 cores of ~1100 bright stars must have an rms within 2 %
of 1: with ~29 000 core pixels the rms of pure noise has a relative standard deviation of
:math:`1/\\sqrt{2N} = 0.4 %`, so 2 % is five of them (and 3 % below 1 as the other bound).
Measured: 1.009; the same stars with a constant PSF give 1.008 (the template's FWHM of 2.5 px
is slightly undersampled: stars at sub-pixel positions differ from the shifted PSF model by
~0.4 % of their peak). Without the grid the same cores show the PSF mismatch (rms 7.5),
which proves the test can fail. Transients injected across the field keep the flux measured
with the difference's (spatially varying) PSF.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from skydiff.sim import simulate_pair
from skydiff_plugins.zogy import ZogyConfig, ZogySubtraction

SHAPE = (1024, 1024)


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(shape=SHAPE, n_stars=1200, flux_min=2e4, flux_max=2e5, flux_slope=1.0,
                         seed=11, n_transients=12, transient_flux=(2e4, 4e4),
                         science={"fwhm": 3.0, "fwhm_gradient": (0.2, 0.0)},
                         template={"fwhm": 2.5}, psf_model_order=5)


def subtract(pair, **settings):
    config = ZogyConfig()
    config.update(**settings)
    return ZogySubtraction(config).run(pair.science, pair.template)


@pytest.fixture(scope="module")
def gridded(pair):
    return subtract(pair)


def core_rms(pair, result) -> tuple[float, int]:
    difference = result.difference
    good = ~difference.masked() & (difference.variance > 0)
    z = np.zeros(SHAPE)
    z[good] = difference.image[good] / np.sqrt(difference.variance[good])
    truth = pair.truth[(pair.truth["kind"] == "star") & ~pair.truth["saturated"]]
    cores = np.zeros(SHAPE, dtype=bool)
    for row, col in zip(np.rint(truth["y"]).astype(int), np.rint(truth["x"]).astype(int),
                        strict=True):
        cores[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3] = True
    use = good & cores
    return float(np.sqrt(np.mean(z[use] ** 2))), int(use.sum())


def test_bright_star_cores_are_noise_with_the_grid(pair, gridded):
    meta = gridded.metadata
    assert meta["n_cells"] > 50  # the automatic spacing follows the PSF change
    assert meta["psf_variation"] > 0.3
    rms, n = core_rms(pair, gridded)
    assert n > 15_000
    assert 0.97 < rms < 1.02


def test_without_the_grid_the_cores_show_the_psf_variation(pair):
    rms, _ = core_rms(pair, subtract(pair, grid="never"))
    assert rms > 2.0


def test_transient_fluxes_with_the_varying_difference_psf(pair, gridded):
    difference = gridded.difference
    x0, y0 = difference.origin
    pulls = []
    for source in pair.truth[pair.truth["kind"] == "transient"]:
        x, y = float(source["x"]), float(source["y"])
        row, col = round(y), round(x)
        psf = difference.psf.kernel_image(x + x0, y + y0)
        # move the model from the pixel centre to the sub-pixel position (Fourier shift)
        freq = np.fft.fftfreq(psf.shape[0])
        ramp = np.exp(-2j * np.pi * (freq[:, None] * (y - row) + freq[None, :] * (x - col)))
        psf = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(psf)) * ramp).real)
        half = psf.shape[0] // 2
        stamp = (slice(row - half, row + half + 1), slice(col - half, col + half + 1))
        norm = float(np.sum(psf**2))
        flux = float(np.sum(psf * difference.image[stamp])) / norm
        error = math.sqrt(float(np.sum(psf**2 * difference.variance[stamp]))) / norm
        pulls.append((flux - float(source["flux_science"])) / error)
    pulls = np.array(pulls)
    # 12 transients of S/N ~ 100 across the field: unbiased to a few sigma each
    assert np.all(np.abs(pulls) < 4.0)
    assert abs(np.mean(pulls)) < 2.0
