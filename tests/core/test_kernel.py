"""Unit tests of skydiff.kernel: spatial functions, FixedKernel and BasisKernel."""

from __future__ import annotations

import pickle

import attrs
import numpy as np
import pytest
from numpy.polynomial import chebyshev

from skydiff.errors import InputError
from skydiff.kernel import (
    BasisKernel,
    FixedKernel,
    chebyshev_terms,
    evaluate_on_grid,
    n_spatial_terms,
    normalize_positions,
    separable_spatial_functions,
    spatial_functions,
)

BBOX = (10.0, 20.0, 110.0, 70.0)


def _basis(rng, n=3, shape=(5, 7)):
    return rng.normal(size=(n, *shape))


def test_chebyshev_terms_order():
    assert chebyshev_terms(0) == [(0, 0)]
    assert chebyshev_terms(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    assert chebyshev_terms(3)[6:] == [(3, 0), (2, 1), (1, 2), (0, 3)]
    with pytest.raises(InputError, match="non-negative"):
        chebyshev_terms(-1)
    with pytest.raises(InputError, match="non-negative"):
        chebyshev_terms(1.5)  # type: ignore[arg-type]


def test_normalize_positions_maps_bbox_corners():
    u, v = normalize_positions([10.0, 110.0, 60.0], [20.0, 70.0, 45.0], BBOX)
    np.testing.assert_allclose(u, [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(v, [-1.0, 1.0, 0.0])
    with pytest.raises(InputError, match="empty"):
        normalize_positions(0.0, 0.0, (5, 5, 5, 10))
    with pytest.raises(InputError, match="four"):
        normalize_positions(0.0, 0.0, (5, 5, 10))  # type: ignore[arg-type]


def test_spatial_functions_match_numpy_chebyshev():
    rng = np.random.default_rng(11)
    x = rng.uniform(10, 110, size=(4, 6))
    y = rng.uniform(20, 70, size=(4, 6))
    order = 3
    values = spatial_functions(x, y, order=order, bbox=BBOX)
    assert values.shape == (n_spatial_terms(order), 4, 6)
    u, v = normalize_positions(x, y, BBOX)
    for t, (i, j) in enumerate(chebyshev_terms(order)):
        ci = np.zeros(i + 1)
        ci[i] = 1.0
        cj = np.zeros(j + 1)
        cj[j] = 1.0
        expected = chebyshev.chebval(u, ci) * chebyshev.chebval(v, cj)
        np.testing.assert_allclose(values[t], expected, rtol=1e-12, atol=1e-12)


def test_polynomial_kind_gives_monomials():
    values = spatial_functions(110.0, 45.0, order=2, bbox=BBOX, kind="polynomial")
    # u = 1, v = 0: 1, u, v, u², uv, v²
    np.testing.assert_allclose(values, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    with pytest.raises(InputError, match="unknown spatial function kind"):
        spatial_functions(0.0, 0.0, order=1, bbox=BBOX, kind="legendre")  # type: ignore[arg-type]


def test_separable_functions_reproduce_the_grid():
    cols = np.arange(10.0, 20.0)
    rows = np.arange(30.0, 37.0)
    terms, fx, fy = separable_spatial_functions(cols, rows, order=2, bbox=BBOX)
    grid_x, grid_y = np.meshgrid(cols, rows)
    full = spatial_functions(grid_x, grid_y, order=2, bbox=BBOX)
    for t, (i, j) in enumerate(terms):
        np.testing.assert_allclose(fy[j][:, None] * fx[i][None, :], full[t], rtol=1e-13)


# -- FixedKernel ----------------------------------------------------------------------------


def test_fixed_kernel_basic_properties():
    image = np.arange(15.0).reshape(3, 5)
    kernel = FixedKernel(image)
    assert kernel.shape == (3, 5)
    assert kernel.sum == pytest.approx(105.0)
    assert not kernel.is_spatially_varying
    np.testing.assert_array_equal(kernel.image_at(1e6, -3.0), image)
    assert kernel.images_at([0, 1, 2], [0, 1, 2]).shape == (3, 3, 5)
    np.testing.assert_allclose(kernel.sum_at([1.0, 2.0], [0.0, 0.0]), [105.0, 105.0])


@pytest.mark.parametrize("shape", [(4, 5), (5, 4), (2, 2)])
def test_fixed_kernel_rejects_even_sizes(shape):
    with pytest.raises(InputError, match="odd"):
        FixedKernel(np.ones(shape))


def test_fixed_kernel_rejects_bad_input():
    with pytest.raises(InputError, match="2-D"):
        FixedKernel(np.ones(5))
    bad = np.ones((3, 3))
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="finite"):
        FixedKernel(bad)


def test_fixed_kernel_copies_and_is_read_only():
    source = np.ones((3, 3))
    kernel = FixedKernel(source)
    source[1, 1] = 99.0
    assert kernel.image[1, 1] == 1.0
    assert not kernel.image.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        kernel.image[0, 0] = 5.0


def test_fixed_kernel_equality_hash_pickle():
    a = FixedKernel(np.eye(3))
    b = FixedKernel(np.eye(3))
    assert a == b
    assert hash(a) == hash(b)
    assert a != FixedKernel(2 * np.eye(3))
    restored = pickle.loads(pickle.dumps(a))
    assert restored == a
    assert not restored.image.flags.writeable


# -- BasisKernel ----------------------------------------------------------------------------


def test_basis_kernel_evaluates_the_linear_combination():
    rng = np.random.default_rng(5)
    basis = _basis(rng)
    coefficients = rng.normal(size=(3, 3))
    kernel = BasisKernel(basis, coefficients, order=1, bbox=BBOX)
    x, y = 37.0, 61.0
    u, v = normalize_positions(x, y, BBOX)
    p = coefficients @ np.array([1.0, float(u), float(v)])
    expected = np.tensordot(p, basis, axes=(0, 0))
    np.testing.assert_allclose(kernel.image_at(x, y), expected, rtol=1e-12, atol=1e-12)
    assert kernel.sum_at(x, y) == pytest.approx(expected.sum(), rel=1e-12)
    assert kernel.is_spatially_varying
    assert kernel.shape == (5, 7)
    assert kernel.n_terms == 3


def test_basis_kernel_images_at_matches_image_at():
    rng = np.random.default_rng(6)
    kernel = BasisKernel(_basis(rng), rng.normal(size=(3, 6)), order=2, bbox=BBOX)
    xs = rng.uniform(10, 110, 7)
    ys = rng.uniform(20, 70, 7)
    stack = kernel.images_at(xs, ys)
    assert stack.shape == (7, 5, 7)
    for n in range(7):
        np.testing.assert_allclose(stack[n], kernel.image_at(xs[n], ys[n]), rtol=1e-12)
    np.testing.assert_allclose(kernel.sum_at(xs, ys), stack.sum(axis=(1, 2)), rtol=1e-10)


def test_basis_kernel_default_position_is_bbox_centre():
    rng = np.random.default_rng(7)
    kernel = BasisKernel(_basis(rng), rng.normal(size=(3, 3)), order=1, bbox=BBOX)
    np.testing.assert_allclose(kernel.image_at(), kernel.image_at(60.0, 45.0))
    # at the centre only the constant term contributes
    np.testing.assert_allclose(kernel.image_at(), kernel.spatial_images()[0], atol=1e-12)


def test_basis_kernel_constant_coefficients_are_not_spatially_varying():
    rng = np.random.default_rng(8)
    coefficients = np.zeros((3, 6))
    coefficients[:, 0] = rng.normal(size=3)
    kernel = BasisKernel(_basis(rng), coefficients, order=2, bbox=BBOX)
    assert not kernel.is_spatially_varying


def test_basis_kernel_validation():
    rng = np.random.default_rng(9)
    with pytest.raises(InputError, match="expected"):
        BasisKernel(_basis(rng), np.ones((3, 4)), order=1, bbox=BBOX)
    with pytest.raises(InputError, match="odd"):
        BasisKernel(np.ones((2, 4, 5)), np.ones((2, 1)), order=0, bbox=BBOX)
    with pytest.raises(InputError, match="shape"):
        BasisKernel(np.ones((5, 5)), np.ones((1, 1)), order=0, bbox=BBOX)
    with pytest.raises(InputError, match="coefficients"):
        BasisKernel(np.ones((2, 3, 3)), np.ones(2), order=0, bbox=BBOX)
    with pytest.raises(InputError, match="empty"):
        BasisKernel(np.ones((1, 3, 3)), np.ones((1, 1)), order=0, bbox=(0, 0, 0, 1))


def test_basis_kernel_evolve_revalidates_and_inputs_are_untouched():
    rng = np.random.default_rng(10)
    basis = _basis(rng)
    coefficients = rng.normal(size=(3, 3))
    basis_copy, coefficients_copy = basis.copy(), coefficients.copy()
    kernel = BasisKernel(basis, coefficients, order=1, bbox=BBOX)
    basis[:] = 0.0
    assert not np.array_equal(kernel.basis, basis)
    np.testing.assert_array_equal(kernel.basis, basis_copy)
    np.testing.assert_array_equal(kernel.coefficients, coefficients_copy)
    with pytest.raises(InputError):
        attrs.evolve(kernel, order=2)
    changed = attrs.evolve(kernel, coefficients=np.zeros((3, 3)))
    assert changed != kernel
    assert changed.bbox == kernel.bbox


def test_basis_kernel_pickle_keeps_read_only_arrays():
    rng = np.random.default_rng(12)
    kernel = BasisKernel(_basis(rng), rng.normal(size=(3, 3)), order=1, bbox=BBOX,
                         kind="polynomial")
    restored = pickle.loads(pickle.dumps(kernel))
    assert restored == kernel
    assert hash(restored) == hash(kernel)
    assert not restored.basis.flags.writeable
    assert not restored.coefficients.flags.writeable


def test_evaluate_on_grid():
    rng = np.random.default_rng(13)
    kernel = BasisKernel(_basis(rng), rng.normal(size=(3, 3)), order=1, bbox=(0, 0, 50, 40))
    grid = evaluate_on_grid(kernel, (40, 50), n=(2, 3))
    assert grid.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(grid[1, 2], kernel.image_at(49.0, 39.0), rtol=1e-12)
    fixed = evaluate_on_grid(FixedKernel(np.ones((3, 3))), (10, 10), n=(2, 2))
    assert fixed.shape == (2, 2, 3, 3)
