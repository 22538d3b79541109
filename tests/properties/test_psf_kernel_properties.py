"""Hypothesis properties of skydiff.psf and skydiff.kernel (bounds, round-trip, metamorphic)."""

from __future__ import annotations

import pickle

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from skydiff.kernel import (
    BasisKernel,
    FixedKernel,
    chebyshev_terms,
    n_spatial_terms,
    spatial_functions,
)
from skydiff.psf import FWHM_PER_SIGMA, GaussianPsf, ImagePsf, PolynomialPsf, psf_fwhm_from_image

SEEDS = st.integers(0, 2**32 - 1)
ORDERS = st.integers(0, 6)
SIGMAS = st.floats(0.3, 6.0, allow_nan=False, allow_subnormal=False)


@st.composite
def bboxes(draw):
    """A non-degenerate (x_min, y_min, x_max, y_max) in parent pixels."""
    x0 = draw(st.integers(-2000, 2000))
    y0 = draw(st.integers(-2000, 2000))
    return (x0, y0, x0 + draw(st.integers(1, 4000)), y0 + draw(st.integers(1, 4000)))


@st.composite
def symmetric_images(draw, *, positive=True):
    """An odd square image with point symmetry about its centre (so its centroid is exact)."""
    size = 2 * draw(st.integers(1, 10)) + 1
    rng = np.random.default_rng(draw(SEEDS))
    image = rng.uniform(0.0, 1.0, (size, size)) if positive else rng.normal(size=(size, size))
    return image + image[::-1, ::-1]


def _first_moments(image):
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return (image * cols).sum() / total, (image * rows).sum() / total


def _inside(draw, bbox):
    x = draw(st.floats(bbox[0], bbox[2], allow_nan=False))
    y = draw(st.floats(bbox[1], bbox[3], allow_nan=False))
    return x, y


# -- spatial functions ----------------------------------------------------------------------


@given(order=ORDERS)
def test_chebyshev_term_counts_and_order(order):
    terms = chebyshev_terms(order)
    assert len(terms) == (order + 1) * (order + 2) // 2 == n_spatial_terms(order)
    assert len(set(terms)) == len(terms)
    keys = [(i + j, -i) for i, j in terms]
    assert keys == sorted(keys)  # total degree ascending, x power descending
    assert all(i + j <= order and i >= 0 and j >= 0 for i, j in terms)


@given(order=ORDERS, bbox=bboxes(), data=st.data())
def test_chebyshev_functions_are_bounded_inside_the_bbox(order, bbox, data):
    x, y = _inside(data.draw, bbox)
    values = spatial_functions(x, y, order=order, bbox=bbox)
    assert values.shape == (n_spatial_terms(order),)
    assert values[0] == 1.0
    assert np.all(np.abs(values) <= 1.0 + 1e-12)


# -- kernels --------------------------------------------------------------------------------


@given(order=st.integers(0, 3), bbox=bboxes(), seed=SEEDS, data=st.data())
def test_constant_basis_kernel_equals_fixed_kernel_everywhere(order, bbox, seed, data):
    rng = np.random.default_rng(seed)
    n_basis = int(rng.integers(1, 4))
    basis = rng.normal(size=(n_basis, 5, 3))
    coefficients = np.zeros((n_basis, n_spatial_terms(order)))
    coefficients[:, 0] = rng.normal(size=n_basis)
    kernel = BasisKernel(basis, coefficients, order=order, bbox=bbox)
    fixed = FixedKernel(np.tensordot(coefficients[:, 0], basis, axes=(0, 0)))
    x = data.draw(st.floats(-1e4, 1e4, allow_nan=False))
    y = data.draw(st.floats(-1e4, 1e4, allow_nan=False))
    assert not kernel.is_spatially_varying
    np.testing.assert_allclose(kernel.image_at(x, y), fixed.image_at(x, y), rtol=1e-12,
                               atol=1e-12)
    assert np.isclose(kernel.sum_at(x, y), fixed.sum, rtol=1e-12, atol=1e-12)


@given(order=st.integers(0, 3), bbox=bboxes(), seed=SEEDS, data=st.data())
def test_basis_kernel_is_linear_in_its_coefficients(order, bbox, seed, data):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(2, 3, 5))
    c1 = rng.normal(size=(2, n_spatial_terms(order)))
    c2 = rng.normal(size=(2, n_spatial_terms(order)))
    k1 = BasisKernel(basis, c1, order=order, bbox=bbox)
    k2 = BasisKernel(basis, c2, order=order, bbox=bbox)
    k12 = BasisKernel(basis, c1 + c2, order=order, bbox=bbox)
    x, y = _inside(data.draw, bbox)
    np.testing.assert_allclose(k12.image_at(x, y), k1.image_at(x, y) + k2.image_at(x, y),
                               rtol=1e-10, atol=1e-10)
    xs = rng.uniform(bbox[0], bbox[2], 5)
    ys = rng.uniform(bbox[1], bbox[3], 5)
    stack = k1.images_at(xs, ys)
    for n in range(5):
        np.testing.assert_allclose(stack[n], k1.image_at(xs[n], ys[n]), rtol=1e-12, atol=1e-12)
    restored = pickle.loads(pickle.dumps(k12))
    assert restored == k12


# -- PSFs -----------------------------------------------------------------------------------


@given(sigma=SIGMAS)
def test_gaussian_psf_has_unit_sum_and_is_centred(sigma):
    psf = GaussianPsf(sigma)
    image = psf.kernel_image()
    size = image.shape[0]
    assert image.shape == (size, size) and size % 2 == 1
    assert abs(image.sum() - 1.0) < 1e-12
    cx, cy = _first_moments(image)
    assert abs(cx - size // 2) < 1e-6 and abs(cy - size // 2) < 1e-6
    assert np.all(image >= 0)


@given(sigma=st.floats(1.5, 6.0, allow_nan=False))
def test_moment_fwhm_of_gaussian_psf_is_exact(sigma):
    # sampling at pixel centres biases the weighted moments by ~exp(-pi^2 sigma^2): < 1e-9 here
    psf = GaussianPsf(sigma, size=2 * int(np.ceil(6 * sigma)) + 1)
    assert abs(psf_fwhm_from_image(psf.kernel_image()) / (FWHM_PER_SIGMA * sigma) - 1) < 1e-5


@given(image=symmetric_images(), scale=st.floats(1e-3, 1e6, allow_nan=False))
def test_image_psf_has_unit_sum_and_is_centred(image, scale):
    psf = ImagePsf(scale * image)
    kernel = psf.kernel_image()
    assert abs(kernel.sum() - 1.0) < 1e-12
    cx, cy = _first_moments(kernel)
    centre = kernel.shape[0] // 2
    assert abs(cx - centre) < 1e-6 and abs(cy - centre) < 1e-6
    np.testing.assert_allclose(psf.image, ImagePsf(image).image, rtol=1e-12)
    assert psf.fwhm() > 0


@given(core=symmetric_images(), data=st.data(), bbox=bboxes(), order=st.integers(0, 2))
def test_polynomial_psf_has_unit_sum_and_is_centred(core, data, bbox, order):
    rng = np.random.default_rng(data.draw(SEEDS))
    size = core.shape[0]
    n_terms = n_spatial_terms(order)
    # zero-sum, point-symmetric perturbations keep the sum positive and the centroid exact
    perturbations = []
    for _ in range(2):
        noise = rng.normal(size=(size, size))
        noise = noise + noise[::-1, ::-1]
        perturbations.append(0.05 * (noise - noise.mean()))
    basis = np.stack([core, *perturbations])
    coefficients = rng.normal(size=(3, n_terms))
    coefficients[0] = 0.0
    coefficients[0, 0] = 1.0
    psf = PolynomialPsf(basis, coefficients, order=order, bbox=bbox,
                        kind=data.draw(st.sampled_from(["chebyshev", "polynomial"])))
    x, y = _inside(data.draw, bbox)
    image = psf.kernel_image(x, y)
    assert image.shape == (size, size)
    assert abs(image.sum() - 1.0) < 1e-12
    cx, cy = _first_moments(image)
    assert abs(cx - size // 2) < 1e-6 and abs(cy - size // 2) < 1e-6
