"""The two-pass background of the ``threshold`` detector."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from skydiff_plugins.detection import ThresholdDetector, ThresholdDetectorConfig
from skydiff_plugins.detection._background import fine_mesh, two_pass_background

SHAPE = (512, 512)


def _gradient() -> np.ndarray:
    """A smooth background of ~10 sigma peak to peak: a plane plus a curvature."""
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]] / (SHAPE[0] - 1.0)
    return (6.0 * cols - 3.0 * rows + 4.0 * (cols - 0.5) ** 2).astype(np.float32)


def test_gradient_is_removed(helpers: Any) -> None:
    # 49 point sources of S/N 15 on unit white noise, with and without a smooth gradient of
    # ~10 sigma peak to peak (the PSF-filtered gradient alone would be ~45 sigma).
    gradient = _gradient()
    x, y = helpers.grid_positions(SHAPE, 64.0, seed=21, margin=32)
    flux = np.full(x.size, helpers.optimal_flux(15.0))
    with_gradient = helpers.make_difference(SHAPE, seed=22, x=x, y=y, flux=flux,
                                            background=gradient)
    flat = helpers.make_difference(SHAPE, seed=22, x=x, y=y, flux=flux)
    result = ThresholdDetector().run(with_gradient)
    reference = ThresholdDetector().run(flat)
    # no spurious detection where the gradient is: the same detections as without it
    assert len(result.catalog) == len(reference.catalog) == x.size
    assert sorted(zip(result.catalog["x"], result.catalog["y"], strict=True)) == sorted(
        zip(reference.catalog["x"], reference.catalog["y"], strict=True))
    # The background is the gradient: the bin-64 median of unit noise has an error of
    # 1.2533 / 64 = 0.02 sigma per bin (less after interpolation); measured rms 0.022, max
    # 0.10 (the 3 x 3 median filter of background_mesh biases curved backgrounds slightly).
    assert result.background is not None
    error = result.background - gradient
    assert float(np.sqrt(np.mean(error**2))) < 0.04
    assert float(np.abs(error).max()) < 0.2
    # a background error b shifts the significance by b sqrt(NEA) = 4.5 b: < 0.9 here
    shift = np.abs(np.sort(np.asarray(result.catalog["significance"]))
                   - np.sort(np.asarray(reference.catalog["significance"])))
    assert float(shift.max()) < 0.9
    # without the background subtraction the gradient is one huge footprint (deblending,
    # off here, would cut it into many spurious children at its noise peaks)
    raw = ThresholdDetector(ThresholdDetectorConfig(subtract_background=False,
                                                    deblend=False)).run(with_gradient)
    assert raw.background is None
    assert int(np.max(raw.catalog["footprint_area"])) > 0.25 * SHAPE[0] * SHAPE[1]


def test_sources_are_masked_in_the_second_pass(helpers: Any) -> None:
    # Bright, dense sources bias a mesh that does not mask them: with the first-pass mask
    # the fitted background stays within the noise of the mesh.
    x, y = helpers.grid_positions(SHAPE, 16.0, seed=23, margin=8)
    flux = np.full(x.size, helpers.optimal_flux(60.0))
    exposure = helpers.make_difference(SHAPE, seed=24, x=x, y=y, flux=flux)
    data = exposure.image
    variance = exposure.variance
    options = dict(psf_sigma=3.0 / 2.3548, is_score=False, fine_bin_size=8, bin_size=64,
                   statistic="median", grow_radius=3.0)
    masked, fraction = two_pass_background(data, variance, mask_threshold=3.0, **options)
    unmasked, none = two_pass_background(data, variance, mask_threshold=1e6, **options)
    assert masked is not None and unmasked is not None
    assert 0.2 < fraction < 0.9 and none == 0.0
    # one source per 16 x 16 pixels pushes the unmasked median up by a good part of sigma
    assert float(np.median(unmasked)) > 0.1
    assert abs(float(np.median(masked))) < 0.05


def test_fine_mesh_follows_a_plane_and_ignores_nan() -> None:
    rows, cols = np.mgrid[0:96, 0:128].astype(np.float32)
    plane = 0.1 * cols - 0.05 * rows + 3.0
    mesh = fine_mesh(plane, 8)
    assert mesh is not None
    # the median of a bin of a plane is its centre value, the point-reflected median filter
    # keeps a plane, and bilinear interpolation between bin centres reproduces it exactly
    # inside the outer centres (constant beyond them)
    inner = (slice(4, 92), slice(4, 124))
    assert np.allclose(mesh[inner], plane[inner], atol=1e-4)
    holed = plane.copy()
    holed[10:40, 20:70] = np.nan  # empty bins are filled from their nearest neighbours
    mesh = fine_mesh(holed, 8)
    assert mesh is not None and np.all(np.isfinite(mesh))
    far = (slice(56, 92), slice(84, 124))  # two bins and more away from the hole
    assert np.allclose(mesh[far], plane[far], atol=1e-4)
    assert fine_mesh(np.full((32, 32), np.nan, np.float32), 8) is None


@pytest.mark.parametrize("is_score", [False, True])
def test_background_of_a_blank_image_is_zero(helpers: Any, is_score: bool) -> None:
    exposure = helpers.make_difference((128, 128), seed=25)
    blank = exposure.evolve(image=np.zeros((128, 128), np.float32))
    result = ThresholdDetector().run(blank, is_score=is_score)
    assert result.background is not None and not np.any(result.background)
