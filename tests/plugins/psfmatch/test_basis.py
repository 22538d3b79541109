"""Tests of the PSF-matching bases and regularization operators (ipdiffim A17, §2.1, §2.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from skydiff_plugins.psfmatch._basis import (
    FWHM_PER_SIGMA,
    alard_lupton_basis,
    alard_lupton_kernel_size,
    alard_lupton_sigmas,
    central_difference_matrix,
    delta_function_basis,
    forward_difference_matrix,
    monomial_exponents,
    pca_basis,
    renormalize_basis,
)

# ---------------------------------------------------------------------------------------------
# A17: basis sanity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sigmas", "degrees"),
    [
        (21, (0.7, 1.5, 3.0), (4, 2, 2)),
        (23, (0.98, 1.96, 3.92), (4, 2, 2)),
        (15, (1.0,), (3,)),
        (19, (0.5, 2.5), (0, 5)),
    ],
)
def test_alard_lupton_basis_counts_and_normalisation(size, sigmas, degrees):
    basis = alard_lupton_basis(size, sigmas, degrees)
    expected = sum((d + 1) * (d + 2) // 2 for d in degrees)
    assert basis.shape == (expected, size, size)
    if degrees == (4, 2, 2):
        assert expected == 27
    sums = basis.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-7)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-7)
    norms = np.sqrt((basis[1:] ** 2).sum(axis=(1, 2)))
    np.testing.assert_allclose(norms, 1.0, atol=1e-7)
    # the basis is linearly independent (otherwise the normal equations are singular)
    assert np.linalg.matrix_rank(basis.reshape(expected, -1)) == expected


def test_alard_lupton_basis_monomial_order_and_coordinates():
    size, sigma = 11, 1.7
    basis = alard_lupton_basis(size, (sigma,), (2,))
    half = size // 2
    off = np.arange(size) - half
    gauss = np.exp(-(off[:, None] ** 2 + off[None, :] ** 2) / (2 * sigma**2))
    gauss /= gauss.sum()
    u = (off / half)[None, :]  # x = column
    v = (off / half)[:, None]  # y = row
    np.testing.assert_allclose(basis[0], gauss, rtol=1e-12)

    def zero_sum_unit(img):
        img = img / img.sum() - gauss if abs(img.sum()) > 1e-6 else img
        return img / np.sqrt((img**2).sum())

    raw = [gauss * u, gauss * v, gauss * u**2, gauss * u * v, gauss * v**2]
    for i, img in enumerate(raw, start=1):
        np.testing.assert_allclose(basis[i], zero_sum_unit(img), atol=1e-12)
    # x-odd kernel is antisymmetric across columns, y-odd across rows
    np.testing.assert_allclose(basis[1], -basis[1][:, ::-1], atol=1e-15)
    np.testing.assert_allclose(basis[2], -basis[2][::-1, :], atol=1e-15)


def test_monomial_exponents_afw_order():
    assert monomial_exponents(0) == [(0, 0)]
    assert monomial_exponents(3) == [
        (0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3),
    ]


@pytest.mark.parametrize("size", [1, 3, 21])
def test_delta_function_basis(size):
    basis = delta_function_basis(size)
    assert basis.shape == (size * size, size, size)
    flat = basis.reshape(size * size, -1)
    np.testing.assert_array_equal(flat, np.eye(size * size))
    rows, cols = np.divmod(np.arange(size * size), size)
    assert np.all(basis[np.arange(size * size), rows, cols] == 1.0)


def test_renormalize_basis_errors_and_independence_of_scale():
    rng = np.random.default_rng(11)
    raw = rng.random((4, 5, 5)) + 0.1
    a = renormalize_basis(raw)
    b = renormalize_basis(raw * 1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="non-zero sum"):
        renormalize_basis(np.stack([raw[0] - raw[0].mean(), raw[1]]))
    with pytest.raises(ValueError, match="vanishes"):
        renormalize_basis(np.stack([raw[0], 3.0 * raw[0]]))
    with pytest.raises(ValueError, match="shape"):
        renormalize_basis(raw[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((20, (1.0,), (1,)), "odd"),
        ((21, (1.0, 2.0), (1,)), "same length"),
        ((21, (-1.0,), (1,)), "positive"),
        ((21, (1.0,), (-1,)), ">= 0"),
    ],
)
def test_alard_lupton_basis_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        alard_lupton_basis(*args)


# ---------------------------------------------------------------------------------------------
# §2.1 worked examples, modes, continuity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma_science", "expected", "size"),
    [(2.4, (0.70, 1.40, 2.80), 21), (2.8, (0.98, 1.96, 3.92), 23)],
)
def test_worked_examples(sigma_science, expected, size):
    sigma_template = 2.0
    sigmas, mode = alard_lupton_sigmas(
        sigma_template * FWHM_PER_SIGMA, sigma_science * FWHM_PER_SIGMA
    )
    assert mode == "convolution"
    assert [round(s, 2) for s in sigmas] == list(expected)
    # exact values of the continuous rule
    sigma_k = math.sqrt(sigma_science**2 - sigma_template**2)
    first = max(0.7, sigma_k / 2.0)
    np.testing.assert_allclose(sigmas, [first, 2 * first, 4 * first], rtol=1e-12)
    assert alard_lupton_kernel_size(sigmas) == size


def test_sigma_modes():
    defaults = (0.7, 1.5, 3.0)
    assert alard_lupton_sigmas(None, 5.0) == (defaults, "config")
    assert alard_lupton_sigmas(5.0, 5.0) == (defaults, "equal")
    # deconvolution: target broader than reference, floor 0.4 instead of 0.7
    sig, mode = alard_lupton_sigmas(2.4 * FWHM_PER_SIGMA, 2.0 * FWHM_PER_SIGMA)
    assert mode == "deconvolution"
    sigma_k = math.sqrt(2.4**2 - 2.0**2)
    np.testing.assert_allclose(sig, [sigma_k / 2, sigma_k, 2 * sigma_k], rtol=1e-12)
    sig, _ = alard_lupton_sigmas(2.05 * FWHM_PER_SIGMA, 2.0 * FWHM_PER_SIGMA)
    np.testing.assert_allclose(sig, [0.4, 0.8, 1.6], rtol=1e-12)
    sig, _ = alard_lupton_sigmas(2.0, 3.0, n_gauss=1, default_sigmas=(1.0,))
    assert len(sig) == 1
    with pytest.raises(ValueError, match="default_sigmas"):
        alard_lupton_sigmas(2.0, 3.0, n_gauss=2)
    with pytest.raises(ValueError, match="positive"):
        alard_lupton_sigmas(-1.0, 3.0)


@settings(max_examples=200, deadline=None)
@given(
    sigma_t=st.floats(0.8, 5.0),
    gap=st.floats(0.02, 3.0),
    convolution=st.booleans(),
    eps=st.floats(-1e-6, 1e-6),
)
# the pre-2026 rule jumped by a factor beta at sigma_k / beta == min_sigma (sigma_S = 2.4413)
@example(sigma_t=2.0, gap=math.sqrt(4.0 + 1.96) - 2.0, convolution=True, eps=1e-9)
@example(sigma_t=2.0, gap=math.sqrt(4.0 + 1.96) - 2.0, convolution=True, eps=-1e-9)
def test_sigmas_are_continuous_in_fwhm(sigma_t, gap, convolution, eps):
    sigma_r = sigma_t + gap if convolution else sigma_t - gap
    if sigma_r <= 0.1:
        sigma_r = sigma_t + gap  # stay in a valid, same-side configuration
        convolution = True
    fwhm_t, fwhm_r = sigma_t * FWHM_PER_SIGMA, sigma_r * FWHM_PER_SIGMA
    s1, m1 = alard_lupton_sigmas(fwhm_t, fwhm_r)
    s2, m2 = alard_lupton_sigmas(fwhm_t, fwhm_r + eps * FWHM_PER_SIGMA)
    assert m1 == m2 == ("convolution" if convolution else "deconvolution")
    # Lipschitz bound: d(sigma_k)/d(sigma_r) = sigma_r / sigma_k <= 8.1 / 0.4, times beta^2
    lipschitz = 4.0 * (sigma_t + gap + 1e-6) / 0.4
    assert np.max(np.abs(np.subtract(s1, s2))) <= lipschitz * abs(eps) + 1e-12


def test_kernel_size_rules():
    assert alard_lupton_kernel_size([0.7, 1.5, 3.0]) == 21  # int(18) -> 19 -> clamp 21
    assert alard_lupton_kernel_size([4.0]) == 25  # int(24) -> 25
    assert alard_lupton_kernel_size([5.5]) == 33  # int(33) odd
    assert alard_lupton_kernel_size([100.0]) == 35
    assert alard_lupton_kernel_size([4.0], size_min=3, size_max=101) % 2 == 1
    with pytest.raises(ValueError, match="odd"):
        alard_lupton_kernel_size([1.0], size_max=34)
    with pytest.raises(ValueError, match="positive"):
        alard_lupton_kernel_size([])


# ---------------------------------------------------------------------------------------------
# §2.3 regularization matrices
# ---------------------------------------------------------------------------------------------


def _check_psd(h):
    np.testing.assert_allclose(h, h.T, atol=0)
    assert np.linalg.eigvalsh(h).min() > -1e-9 * np.abs(h).max()


@pytest.mark.parametrize("stencil", [5, 9])
def test_central_difference_matrix(stencil):
    size, penalty = 9, 3.0
    h = central_difference_matrix(size, stencil=stencil, border_penalty=penalty)
    n = size * size
    assert h.shape == (n + 1, n + 1)
    _check_psd(h)
    assert np.all(h[n] == 0) and np.all(h[:, n] == 0)
    rows, cols = np.divmod(np.arange(n), size)
    border = (rows == 0) | (cols == 0) | (rows == size - 1) | (cols == size - 1)
    # Both stencils are exact for quadratics: Laplacian(col^2) = 2 on interior pixels.
    a = np.append(cols.astype(float) ** 2, 123.0)  # background value is not penalised
    expected = 4.0 * np.sum(~border) + np.sum((penalty * a[:n][border]) ** 2)
    assert a @ h @ a == pytest.approx(expected, rel=1e-12)
    # constants and linear ramps have zero Laplacian
    ramp = np.append(2.0 + 0.5 * rows - 0.25 * cols, 0.0)
    expected = np.sum((penalty * ramp[:n][border]) ** 2)
    assert ramp @ h @ ramp == pytest.approx(expected, rel=1e-12)
    h_nobg = central_difference_matrix(size, stencil=stencil, border_penalty=penalty,
                                       fit_background=False)
    np.testing.assert_array_equal(h_nobg, h[:n, :n])


@pytest.mark.parametrize("orders", [(1,), (2,), (3,), (1, 2), (1, 2, 3)])
def test_forward_difference_matrix_constant_kernel(orders):
    size, penalty = 7, 2.5
    h = forward_difference_matrix(size, orders=orders, border_penalty=penalty)
    n = size * size
    _check_psd(h)
    assert np.all(h[n] == 0)
    # All difference rows sum to zero, so a constant kernel only feels the far-edge penalties:
    # B 1 = n_orders * penalty * ([col == K-1] + [row == K-1]).
    ones = np.ones(n + 1)
    n_o = len(orders)
    expected = (n_o * penalty) ** 2 * (2 * (size - 1)) + (2 * n_o * penalty) ** 2
    assert ones @ h @ ones == pytest.approx(expected, rel=1e-12)


def test_forward_difference_first_order_of_ramp():
    size = 5
    h = forward_difference_matrix(size, orders=(1,), border_penalty=0.0, fit_background=False)
    cols = np.arange(size * size) % size
    a = cols.astype(float)  # forward x-difference 1 except in the last column, y-difference 0
    assert a @ h @ a == pytest.approx(size * (size - 1), rel=1e-12)


def test_regularization_matrix_errors():
    with pytest.raises(ValueError, match="stencil"):
        central_difference_matrix(5, stencil=7)
    with pytest.raises(ValueError, match="border_penalty"):
        central_difference_matrix(5, border_penalty=-1.0)
    with pytest.raises(ValueError, match="orders"):
        forward_difference_matrix(5, orders=(4,))
    with pytest.raises(ValueError, match="orders"):
        forward_difference_matrix(5, orders=())
    with pytest.raises(ValueError, match="odd"):
        forward_difference_matrix(4)


# ---------------------------------------------------------------------------------------------
# PCA basis
# ---------------------------------------------------------------------------------------------


def _gauss(size, sigma, dx=0.0):
    off = np.arange(size) - size // 2
    img = np.exp(-((off[None, :] - dx) ** 2 + off[:, None] ** 2) / (2 * sigma**2))
    return img / img.sum()


def test_pca_basis_spans_two_component_family():
    rng = np.random.default_rng(3)
    size = 11
    g1, g2 = _gauss(size, 1.2), _gauss(size, 2.3, dx=0.4)
    w = rng.uniform(0.1, 0.9, 12)
    scale = rng.uniform(0.5, 2.0, 12)
    kernels = scale[:, None, None] * (w[:, None, None] * g1 + (1 - w)[:, None, None] * g2)
    basis = pca_basis(kernels, n_components=5)
    # centred data have rank 1 -> mean + one component, the rest is trimmed
    assert basis.shape == (2, size, size)
    assert basis[0].sum() == pytest.approx(1.0, abs=1e-12)
    assert abs(basis[1].sum()) < 1e-10
    assert np.sqrt((basis[1] ** 2).sum()) == pytest.approx(1.0, abs=1e-12)
    # every unit-sum kernel is reproduced exactly by the basis
    design = basis.reshape(2, -1).T
    target = (kernels / kernels.sum(axis=(1, 2))[:, None, None]).reshape(12, -1).T
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(design @ coef, target, atol=1e-12)
    np.testing.assert_allclose(coef[0], 1.0, atol=1e-10)  # unit sum carried by B0 alone
    # the mean image is the first basis function
    np.testing.assert_allclose(basis[0], target.mean(axis=1).reshape(size, size), atol=1e-14)


def test_pca_basis_without_mean_and_bad_input():
    size = 9
    kernels = np.stack([_gauss(size, s) for s in (1.0, 1.5, 2.0, 2.5)])
    basis = pca_basis(kernels, n_components=3, subtract_mean=False)
    assert basis.shape == (3, size, size)
    assert basis[0].sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(basis[1:].sum(axis=(1, 2)), 0.0, atol=1e-10)
    bad = kernels.copy()
    bad[0, 0, 0] = np.nan
    assert pca_basis(bad, n_components=3).shape[0] <= 3  # the NaN kernel is skipped
    with pytest.raises(ValueError, match="at least one"):
        pca_basis(np.zeros((3, size, size)), n_components=2)
    with pytest.raises(ValueError, match="n_components"):
        pca_basis(kernels, n_components=0)
