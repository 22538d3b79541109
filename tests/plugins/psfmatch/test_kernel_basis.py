"""The ``kernel_basis`` plugins ``al`` and ``df``, and the delta-function path of ``al``.

A17 (basis sanity, ipdiffim §3.4) through the plugins: the AL count Σ(d+1)(d+2)/2, unit-sum
first kernel, zero-sum unit-norm others, the DF count K²; plus the FWHM-driven sizes of the
worked examples of §2.1 and the regularization matrix the DF plugin hands to the solver.
"""

from __future__ import annotations

import numpy as np
import pytest

import skydiff
from skydiff.sim import make_test_image
from skydiff.stats import clipped_stats
from skydiff_plugins.psfmatch import (
    AlBasisConfig,
    AlKernelBasis,
    AlSubtraction,
    AlSubtractionConfig,
    DfBasisConfig,
    DfKernelBasis,
)

FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


@pytest.mark.parametrize(("science_sigma", "sigmas", "size"),
                         [(2.4, (0.70, 1.40, 2.80), 21), (2.8, (0.98, 1.96, 3.92), 23)])
def test_al_worked_examples(science_sigma, sigmas, size):
    """σ_T = 2.0 against σ_S = 2.4 / 2.8 (ipdiffim §2.1): widths and kernel size."""
    result = AlKernelBasis().run(target_fwhm=2.0 * FWHM, reference_fwhm=science_sigma * FWHM)
    assert result.metadata["mode"] == "convolution"
    np.testing.assert_allclose(result.metadata["sigmas"], sigmas, atol=0.005)
    assert result.basis.shape == (27, size, size)
    assert result.constant_first and result.regularization is None


def test_a17_al_basis_normalisation():
    basis = AlKernelBasis().run(target_fwhm=None, reference_fwhm=None).basis
    assert basis.shape == (27, 21, 21)  # Σ(d+1)(d+2)/2 for degrees (4, 2, 2)
    assert basis[0].sum() == pytest.approx(1.0, abs=1e-7)
    np.testing.assert_allclose(basis[1:].sum(axis=(1, 2)), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.sqrt((basis[1:] ** 2).sum(axis=(1, 2))), 1.0, atol=1e-7)


def test_al_config_modes_and_validation():
    config = AlBasisConfig(scale_by_fwhm=False, kernel_size=25)
    result = AlKernelBasis(config).run(target_fwhm=3.0, reference_fwhm=5.0)
    assert result.metadata["mode"] == "config" and result.basis.shape[1] == 25
    equal = AlKernelBasis().run(target_fwhm=4.0, reference_fwhm=4.0)
    assert equal.metadata["mode"] == "equal"
    deconvolution = AlKernelBasis().run(target_fwhm=6.0, reference_fwhm=4.0)
    assert deconvolution.metadata["mode"] == "deconvolution"
    with pytest.raises(skydiff.ConfigError):
        AlKernelBasis(AlBasisConfig(n_gauss=2))  # degrees/sigmas still have 3 entries
    with pytest.raises(skydiff.ConfigError):
        AlBasisConfig(kernel_size=20)
    with pytest.raises(skydiff.InputError):
        AlKernelBasis().run(target_fwhm=-1.0, reference_fwhm=4.0)


@pytest.mark.parametrize("kind", ["central", "forward"])
def test_a17_df_basis_and_regularization(kind):
    config = DfBasisConfig(kernel_size=11, regularization_type=kind)
    result = DfKernelBasis(config).run(target_fwhm=3.0, reference_fwhm=4.0)
    assert result.basis.shape == (121, 11, 11)
    np.testing.assert_array_equal(result.basis.reshape(121, 121), np.eye(121))
    assert not result.constant_first
    h = result.regularization
    assert h.shape == (122, 122)
    np.testing.assert_allclose(h, h.T)
    assert np.all(h[-1] == 0.0)  # the background is not regularised
    assert np.linalg.eigvalsh(h).min() > -1e-9
    settings = result.metadata["regularization"]
    assert settings["lambda_type"] == "minimize_unbiased_risk" and settings["enabled"]
    plain = DfKernelBasis(DfBasisConfig(use_regularization=False)).run(
        target_fwhm=None, reference_fwhm=None)
    assert plain.regularization is None


def test_df_size_from_fwhm():
    config = DfBasisConfig(scale_by_fwhm=True)
    result = DfKernelBasis(config).run(target_fwhm=2.0 * FWHM, reference_fwhm=2.8 * FWHM)
    assert result.basis.shape == (529, 23, 23)


@pytest.mark.slow
def test_subtraction_with_the_delta_function_basis():
    """``kernel_basis = df`` with the risk-minimising λ: per-stamp regularised DF kernels, a
    PCA basis for the spatial model, and a difference at the noise level (A2 tolerances)."""
    science = make_test_image(psf_sigma=2.4, noise_level=1.0, noise_seed=6)
    template = make_test_image(psf_sigma=2.0, noise_level=1.0, noise_seed=7, template_border=20)
    cut = template.exposure.cutout(slice(20, -20), slice(20, -20))
    config = AlSubtractionConfig()
    config.kernel_basis.name = "df"
    result = AlSubtraction(config).run(science.exposure, cut, sources=science.truth)
    assert result.metadata["basis"]["kind"] == "df"
    assert result.kernel.basis.shape[0] == config.n_pca_components
    difference = result.difference
    bad = difference.masked("EDGE", "BAD", "NO_DATA", "SAT")
    assert clipped_stats(difference.image, mask=bad).std == pytest.approx(np.sqrt(2.0), rel=0.1)
    assert result.metadata["kernel_sum"] == pytest.approx(1.0, abs=0.05)


def test_degenerate_narrow_basis_is_reduced_to_its_principal_directions():
    """Near-equal seeing on the deconvolution side gives widths (0.4, 0.8, 1.6), whose
    zero-sum functions are nearly dependent (Gram condition ~1e10); the plugin keeps the
    well-determined directions so every stamp fit stays well conditioned."""
    import numpy as np

    from skydiff_plugins.psfmatch._kernel_basis import AlKernelBasis as AlBasis

    result = AlBasis().run(target_fwhm=3.1294, reference_fwhm=3.1140)
    basis = result.basis
    assert result.metadata["mode"] == "deconvolution"
    assert result.metadata["n_basis_dropped"] > 0
    assert basis.shape[0] == 27 - result.metadata["n_basis_dropped"]
    assert basis[0].sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(basis[1:].sum(axis=(1, 2)), 0.0, atol=1e-10)
    rows = basis[1:].reshape(basis.shape[0] - 1, -1)
    assert np.linalg.cond(rows @ rows.T) <= 1e8 * (1 + 1e-6)
    # A well-conditioned basis (ordinary convolution case) is left exactly as built.
    plain = AlBasis().run(target_fwhm=3.0, reference_fwhm=4.0)
    assert plain.metadata["n_basis_dropped"] == 0 and plain.basis.shape[0] == 27
