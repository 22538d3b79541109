r"""Spatially varying PSFs, sub-pixel offsets and flux scales (:func:`skydiff.sim.simulate_pair`).

The statistic of the "bright-star cores are noise-limited" tests
----------------------------------------------------------------
For every *bright* star of the truth table (constant star, science flux ≥ 10⁴ ADU, i.e. a peak
S/N above ~100; not saturated; at least 25 px from the edges) the central 3 × 3 pixels of the
difference are normalised by its variance plane, :math:`z = D/\sqrt V`; stars with any masked
pixel there are skipped. With :math:`N` the number of such pixels,

.. math::

    \mathrm{rms} = \sqrt{\tfrac{1}{N}\sum z^2}, \qquad
    |\mathrm{rms} - 1| \le 0.02 + 2\,\sigma_\mathrm{rms}, \quad
    \sigma_\mathrm{rms} = 1/\sqrt{2N},

i.e. the residuals in the cores equal the noise to within 2 % plus twice the statistical
error of an rms of :math:`N` unit Gaussians. Any kernel mismatch shows up here first: a 1 %
error of the kernel leaves ~0.5σ in the core of a star of peak S/N 50, and these stars have
peak S/N 100–2000. ``lsst.ip.diffim`` has no such test; HOTPANTS reaches about 1.7 % above the
noise on comparable data (issue 3).

The science PSF FWHM varies linearly by ±20 % across the field (``fwhm_gradient=(0.2, 0)``;
template constant). The kernel then varies non-linearly with position (its width is
:math:`\sqrt{\sigma_S^2 - \sigma_T^2}`), so these tests use ``spatial_kernel_order = 2``: with
the default order 1 the core rms is about 1.3 (see the module's slow test), which is the
documented reason to raise the order for strongly varying seeing.
"""

from __future__ import annotations

import numpy as np
import pytest

from skydiff.sim import simulate_pair
from skydiff_plugins.psfmatch import AlSubtraction, AlSubtractionConfig

BRIGHT_FLUX = 1e4


def core_rms(result, pair, *, margin: int = 25) -> tuple[float, int]:
    """rms of D/sqrt(V) over the central 3 × 3 pixels of the bright unsaturated stars."""
    difference = result.difference
    z = difference.image / np.sqrt(difference.variance)
    truth = pair.truth
    height, width = difference.shape
    bright = ((np.asarray(truth["kind"]) == "star") & ~np.asarray(truth["saturated"])
              & (np.asarray(truth["flux_science"]) >= BRIGHT_FLUX))
    cols = np.rint(np.asarray(truth["x"])[bright]).astype(int)
    rows = np.rint(np.asarray(truth["y"])[bright]).astype(int)
    inside = (cols >= margin) & (cols < width - margin) & (rows >= margin) & (rows < height
                                                                              - margin)
    cols, rows = cols[inside], rows[inside]
    offsets = np.arange(-1, 2)
    rr = rows[:, None, None] + offsets[None, :, None]
    cc = cols[:, None, None] + offsets[None, None, :]
    clean = ~difference.masked()[rr, cc].any(axis=(1, 2))
    values = z[rr, cc][clean]
    return float(np.sqrt(np.mean(values**2))), int(values.size)


def assert_noise_limited(rms: float, n: int) -> None:
    assert n >= 90  # at least ten bright stars
    assert abs(rms - 1.0) <= 0.02 + 2.0 / np.sqrt(2.0 * n), (rms, n)


def varying_pair(shape, n_stars, seed, **kwargs):
    return simulate_pair(shape=shape, n_stars=n_stars, seed=seed, flux_min=1e3, flux_max=3e5,
                         flux_slope=1.0, science={"fwhm": 4.0, "fwhm_gradient": (0.2, 0.0)},
                         template={"fwhm": 3.0}, **kwargs)


def subtract(pair, **settings):
    config = AlSubtractionConfig()
    config.update(**settings)
    return AlSubtraction(config).run(pair.science, pair.template)


def test_spatially_varying_psf_bright_star_cores_are_noise_limited():
    """256², 100 stars, science FWHM 4 px ± 20 % across the field, kernel order 2."""
    pair = varying_pair((256, 256), 100, seed=12)
    result = subtract(pair, spatial_kernel_order=2)
    assert result.kernel.is_spatially_varying
    assert_noise_limited(*core_rms(result, pair))


def test_subpixel_offset_and_flux_scale_are_absorbed():
    """The same field with a (0.4, -0.3) px shift and a 0.85 flux scale: the kernel sum is the
    scale, the difference is in science units and the bright-star cores stay noise-limited."""
    pair = varying_pair((256, 256), 100, seed=12, offset=(0.4, -0.3), flux_scale=0.85)
    result = subtract(pair, spatial_kernel_order=2)
    assert result.metadata["kernel_sum"] == pytest.approx(0.85, rel=0.01)
    assert_noise_limited(*core_rms(result, pair))
    # the kernel's centroid carries the shift: template → science is +0.4 px in x, -0.3 in y
    image = result.kernel.image_at()
    offsets = np.arange(image.shape[0]) - image.shape[0] // 2
    cx = float((image.sum(axis=0) @ offsets) / image.sum())
    cy = float((image.sum(axis=1) @ offsets) / image.sum())
    assert cx == pytest.approx(0.4, abs=0.05)
    assert cy == pytest.approx(-0.3, abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{}, {"offset": (0.4, -0.3), "flux_scale": 0.85}],
                         ids=["plain", "offset-scale"])
def test_spatially_varying_psf_512(kwargs):
    """512², 300 stars (about 130 bright): order 2 is noise-limited, order 1 is not."""
    pair = varying_pair((512, 512), 300, seed=11, **kwargs)
    assert_noise_limited(*core_rms(subtract(pair, spatial_kernel_order=2), pair))
    rms_order1, _ = core_rms(subtract(pair), pair)
    assert rms_order1 > 1.1
