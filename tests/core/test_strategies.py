"""Tests of the public hypothesis strategies in skydiff.testing.strategies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

from skydiff.exposure import Exposure
from skydiff.kernel import BasisKernel, FixedKernel
from skydiff.psf import FWHM_PER_SIGMA, GaussianPsf, ImagePsf, PolynomialPsf, Psf
from skydiff.testing.strategies import (
    StarField,
    exposures,
    kernels,
    psfs,
    render_point_sources,
    stamps,
    star_fields,
)


def _first(strategy: st.SearchStrategy[object]) -> object:
    """Draw one value (raising what the strategy raises), without hypothesis' example()."""
    found: list[object] = []

    @settings(max_examples=1, database=None)
    @given(strategy)
    def draw(value: object) -> None:
        found.append(value)

    draw()
    return found[0]


def _assert_valid_psf_image(image: np.ndarray) -> None:
    assert image.ndim == 2 and image.shape[0] == image.shape[1] and image.shape[0] % 2 == 1
    assert np.all(np.isfinite(image))
    assert image.sum() == pytest.approx(1.0, abs=1e-9)
    centre = image.shape[0] // 2
    assert np.unravel_index(np.argmax(image), image.shape) == (centre, centre)


# ------------------------------------------------------------------------------------------
# psfs


@given(psfs())
def test_psfs_are_valid(psf: Psf) -> None:
    assert isinstance(psf, Psf)
    _assert_valid_psf_image(psf.kernel_image())
    assert math.isfinite(psf.fwhm()) and psf.fwhm() > 0


@given(psfs(kind=st.just("gaussian"), sigma=st.floats(1.0, 1.5)))
def test_psfs_narrow_kind_and_sigma(psf: Psf) -> None:
    assert isinstance(psf, GaussianPsf)
    assert 1.0 <= psf.sigma <= 1.5
    assert psf.fwhm() == pytest.approx(FWHM_PER_SIGMA * psf.sigma)


@given(psfs(kind=st.just("image"), sigma=st.floats(1.0, 2.0)))
def test_psfs_image_kind(psf: Psf) -> None:
    assert isinstance(psf, ImagePsf)
    _assert_valid_psf_image(psf.kernel_image())
    # Geometric-mean width sigma and ellipticity <= 0.3: FWHM within 15 % of 2.3548 sigma.
    assert FWHM_PER_SIGMA * 1.0 * 0.85 <= psf.fwhm() <= FWHM_PER_SIGMA * 2.0 * 1.15


@given(psfs(kind=st.just("polynomial")))
def test_psfs_polynomial_kind_varies_and_stays_valid(psf: Psf) -> None:
    assert isinstance(psf, PolynomialPsf)
    for x, y in [(0.0, 0.0), (63.0, 0.0), (0.0, 63.0), (63.0, 63.0), (31.5, 31.5)]:
        _assert_valid_psf_image(psf.kernel_image(x, y))


@given(psfs(size=st.just(10)))
def test_psfs_size_is_made_odd(psf: Psf) -> None:
    assert psf.kernel_image().shape == (11, 11)


def test_psfs_reject_non_strategies() -> None:
    with pytest.raises(InvalidArgument):
        psfs(sigma=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        _first(psfs(kind=st.just("moffat")))


# ------------------------------------------------------------------------------------------
# kernels


@given(kernels())
def test_kernels_are_odd_with_positive_sum(kernel: FixedKernel | BasisKernel) -> None:
    rows, cols = kernel.shape
    assert rows % 2 == 1 and cols % 2 == 1
    assert np.all(np.isfinite(kernel.image_at()))
    assert kernel.sum > 0


@given(kernels(spatially_varying=st.just(False), scale=st.just(1.5), size=st.just(8)))
def test_kernels_narrow_to_fixed(kernel: FixedKernel | BasisKernel) -> None:
    assert isinstance(kernel, FixedKernel)
    assert kernel.shape == (9, 9)
    assert kernel.sum == pytest.approx(1.5, rel=1e-12)


@given(kernels(spatially_varying=st.just(True), order=st.integers(0, 2),
               n_basis=st.integers(1, 3), scale=st.floats(0.5, 2.0)))
def test_kernels_narrow_to_varying(kernel: FixedKernel | BasisKernel) -> None:
    assert isinstance(kernel, BasisKernel)
    assert kernel.is_spatially_varying and kernel.order >= 1
    x_min, y_min, x_max, y_max = kernel.bbox
    xs = np.array([x_min, x_max, x_min, x_max, 0.5 * (x_min + x_max)])
    ys = np.array([y_min, y_min, y_max, y_max, 0.5 * (y_min + y_max)])
    sums = np.asarray(kernel.sum_at(xs, ys))
    # Documented bound: within (0.9, 1.1) times the central sum over the bbox.
    assert np.all(sums > 0.9 * kernel.coefficients[0, 0] - 1e-12)
    assert np.all(sums < 1.1 * kernel.coefficients[0, 0] + 1e-12)


# ------------------------------------------------------------------------------------------
# exposures


@given(exposures())
def test_exposures_have_matching_planes(exposure: Exposure) -> None:
    shape = exposure.shape
    assert exposure.image.shape == exposure.mask.shape == exposure.variance.shape == shape
    assert 16 <= shape[0] <= 48 and 16 <= shape[1] <= 48
    assert np.all(exposure.variance > 0)
    assert np.all(np.isfinite(exposure.image))
    assert not exposure.image.flags.writeable


@given(exposures(shape=st.just((20, 30)), noise=st.just(2.0), masks=st.just(True),
                 wcs=st.just(True), psf=st.none(), origin=st.just((5, 7))))
def test_exposures_narrowed(exposure: Exposure) -> None:
    assert exposure.shape == (20, 30)
    assert np.all(exposure.variance == 4.0)
    assert exposure.masked("BAD").any() and exposure.masked("SAT").any()
    assert exposure.masked("CR").any()
    assert exposure.psf is None
    assert exposure.origin == (5, 7)
    assert exposure.wcs is not None
    sky = exposure.wcs.pixel_to_world(0.0, 0.0)
    assert np.isfinite(sky.ra.deg) and np.isfinite(sky.dec.deg)


@given(exposures(masks=st.just(False), wcs=st.just(False)))
def test_exposures_without_masks_or_wcs(exposure: Exposure) -> None:
    assert not exposure.mask.any()
    assert exposure.wcs is None


def _constant_images(shape: tuple[int, int]) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, shape, elements=st.just(np.float32(3.0)))


@given(exposures(image=_constant_images, shape=st.just((17, 19))))
def test_exposures_image_strategy(exposure: Exposure) -> None:
    assert exposure.shape == (17, 19)
    assert np.all(exposure.image == 3.0)


@given(exposures(shape=st.just((48, 48)), noise=st.just(3.0), masks=st.just(False),
                 psf=st.none(), wcs=st.just(False)))
def test_exposures_noise_matches_variance(exposure: Exposure) -> None:
    # Default image: white noise whose variance is the variance plane.
    n = exposure.image.size
    sample_var = float(np.var(exposure.image, ddof=1))
    # Relative standard error of a sample variance: sqrt(2 / (n - 1)); allow 6 of them.
    assert abs(sample_var / 9.0 - 1.0) < 6 * math.sqrt(2.0 / (n - 1))


def test_exposures_reject_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        exposures(shape=(10, 10))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        exposures(image=st.just(np.zeros((3, 3))))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        _first(exposures(shape=st.just((2, 10))))


# ------------------------------------------------------------------------------------------
# star fields and stamps


@given(star_fields())
def test_star_fields_truth_is_inside_the_frame(field: StarField) -> None:
    rows, cols = field.exposure.shape
    truth = field.truth
    assert len(truth) == field.n_stars >= 1
    assert np.all((truth["x"] >= 0) & (truth["x"] <= cols - 1))
    assert np.all((truth["y"] >= 0) & (truth["y"] <= rows - 1))
    assert np.all(field.flux > 0)
    assert field.exposure.psf is not None
    assert not field.x.flags.writeable


@given(star_fields(shape=st.tuples(st.integers(32, 48), st.integers(32, 48)),
                   n_stars=st.integers(1, 4), noise=st.just(2.0),
                   psf=psfs(sigma=st.floats(0.8, 1.2))))
def test_star_fields_conserve_flux(field: StarField) -> None:
    exposure = field.exposure
    total = float(exposure.image.astype(np.float64).sum())
    noise = math.sqrt(float(exposure.variance.astype(np.float64).sum()))
    # Stars are >= 4 sigma_PSF from the edges: flux lost off the frame is < 1e-3.
    target(abs(total - field.flux.sum()) / noise, label="flux error in noise units")
    assert abs(total - field.flux.sum()) < 6.0 * noise + 1e-3 * field.flux.sum()
    # The variance plane is background plus source noise.
    assert np.all(exposure.variance >= 4.0 - 1e-4)


@given(star_fields(n_stars=st.just(0)))
def test_star_fields_can_be_empty(field: StarField) -> None:
    assert field.n_stars == 0 and len(field.truth) == 0


@given(stamps(size=st.just(21), offset=st.tuples(st.floats(-0.3, 0.3), st.floats(-0.3, 0.3))))
def test_stamps_hold_one_centred_star(stamp: StarField) -> None:
    assert stamp.exposure.shape == (21, 21)
    assert stamp.n_stars == 1
    assert abs(stamp.x[0] - 10) <= 0.3 + 1e-9 and abs(stamp.y[0] - 10) <= 0.3 + 1e-9


@pytest.mark.parametrize("psf", [GaussianPsf(1.3), ImagePsf(GaussianPsf(1.3).kernel_image())],
                         ids=["analytic", "shifted-image"])
def test_render_point_sources_centroid_and_flux(psf: Psf) -> None:
    image = render_point_sources((40, 40), np.array([19.3]), np.array([20.6]),
                                 np.array([1000.0]), psf)
    rows, cols = np.indices(image.shape)
    assert image.sum() == pytest.approx(1000.0, rel=1e-6)
    assert (image * cols).sum() / image.sum() == pytest.approx(19.3, abs=0.02)
    assert (image * rows).sum() / image.sum() == pytest.approx(20.6, abs=0.02)
