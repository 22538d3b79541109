"""Unit tests of skydiff.psf: GaussianPsf, ImagePsf, PolynomialPsf and the PSFEx reader."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from astropy.io import fits

from skydiff.errors import InputError
from skydiff.kernel import spatial_functions
from skydiff.psf import (
    FWHM_PER_SIGMA,
    GaussianPsf,
    ImagePsf,
    PolynomialPsf,
    Psf,
    psf_fwhm_from_image,
    psf_moments,
)

LEGACYPIPE = "decam_legacypipe_tiny"


def _gaussian(size, sigma, dx=0.0, dy=0.0, sigma_y=None):
    sigma_y = sigma if sigma_y is None else sigma_y
    offsets = np.arange(size) - size // 2
    gy = np.exp(-0.5 * ((offsets - dy) / sigma_y) ** 2)
    gx = np.exp(-0.5 * ((offsets - dx) / sigma) ** 2)
    image = np.outer(gy, gx)
    return image / image.sum()


def _centroid(image):
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return (image * cols).sum() / total, (image * rows).sum() / total


# -- GaussianPsf ----------------------------------------------------------------------------


def test_gaussian_psf_image_and_fwhm():
    psf = GaussianPsf(1.7)
    image = psf.kernel_image()
    assert psf.size == 2 * math.ceil(4 * 1.7) + 1
    assert image.shape == (psf.size, psf.size)
    assert image.sum() == pytest.approx(1.0, abs=1e-12)
    assert _centroid(image) == pytest.approx((psf.size // 2, psf.size // 2), abs=1e-9)
    assert psf.fwhm() == pytest.approx(FWHM_PER_SIGMA * 1.7)
    assert psf_fwhm_from_image(image) == pytest.approx(psf.fwhm(), rel=1e-4)
    assert psf.average_position == (0.0, 0.0)
    assert isinstance(psf, Psf)


def test_gaussian_psf_sizes():
    assert GaussianPsf(0.1).size == 3
    assert GaussianPsf(1.0, size=9).kernel_image().shape == (9, 9)
    assert GaussianPsf(1.0, size=None).size == 9
    for bad in (4, 1, 2.5):
        with pytest.raises(InputError, match="odd integer"):
            GaussianPsf(1.0, size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_gaussian_psf_rejects_bad_sigma(sigma):
    with pytest.raises(InputError, match="positive finite"):
        GaussianPsf(sigma)


def test_gaussian_from_fwhm_hash_pickle():
    psf = GaussianPsf.from_fwhm(4.0, size=21)
    assert psf.fwhm() == pytest.approx(4.0)
    assert psf.size == 21
    assert pickle.loads(pickle.dumps(psf)) == psf
    assert hash(psf) == hash(GaussianPsf(psf.sigma, size=21))


# -- moments --------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "rel"), [(1.0, 1e-3), (2.0, 1e-6), (3.5, 1e-6)])
def test_adaptive_moments_recover_gaussian_width_and_centre(sigma, rel):
    # sampling a Gaussian at pixel centres biases its moments by ~exp(-2 pi^2 sigma_p^2),
    # sigma_p^2 = sigma^2 / 2 the width of PSF x weight: 5e-5 at sigma = 1, 1e-17 at 2
    image = _gaussian(41, sigma, dx=0.3, dy=-0.7) * 123.0
    x, y, width = psf_moments(image)
    assert width == pytest.approx(sigma, rel=rel)
    assert (x, y) == pytest.approx((20.3, 19.3), abs=rel)


def test_adaptive_moments_of_elliptical_gaussian_lie_between_axes():
    fwhm = psf_fwhm_from_image(_gaussian(41, 1.5, sigma_y=2.5))
    assert FWHM_PER_SIGMA * 1.5 < fwhm < FWHM_PER_SIGMA * 2.5


def test_moments_reject_empty_or_negative_images():
    with pytest.raises(InputError, match="positive flux"):
        psf_moments(-np.ones((5, 5)))
    with pytest.raises(InputError, match="2-D"):
        psf_moments(np.ones(5))
    with pytest.raises(InputError, match="NaN"):
        psf_moments(np.full((3, 3), np.nan))


# -- ImagePsf -------------------------------------------------------------------------------


def test_image_psf_normalises_a_copy():
    source = _gaussian(15, 2.0) * 5.0
    original = source.copy()
    psf = ImagePsf(source, position=(3, 4))
    np.testing.assert_array_equal(source, original)
    assert psf.image.sum() == pytest.approx(1.0)
    assert not psf.image.flags.writeable
    assert psf.average_position == (3.0, 4.0)
    image = psf.kernel_image(100.0, 200.0)
    image[0, 0] = 7.0  # callers get a copy they may modify
    assert psf.image[0, 0] != 7.0
    assert psf.fwhm() == pytest.approx(FWHM_PER_SIGMA * 2.0, rel=1e-3)
    assert isinstance(psf, Psf)


@pytest.mark.parametrize("image", [np.ones((4, 4)), np.ones((5, 7)), np.ones(5),
                                   np.zeros((5, 5)), np.full((3, 3), np.nan)])
def test_image_psf_rejects_invalid_images(image):
    with pytest.raises(InputError):
        ImagePsf(image)


def test_image_psf_equality_hash_pickle():
    a = ImagePsf(_gaussian(9, 1.2))
    b = ImagePsf(_gaussian(9, 1.2))
    assert a == b
    assert hash(a) == hash(b)
    assert a != ImagePsf(_gaussian(9, 1.3))
    restored = pickle.loads(pickle.dumps(a))
    assert restored == a
    assert not restored.image.flags.writeable


# -- PolynomialPsf --------------------------------------------------------------------------


def _two_gaussian_psf(kind="chebyshev"):
    narrow, wide = _gaussian(21, 1.5), _gaussian(21, 3.0)
    basis = np.stack([narrow, wide - narrow])
    coefficients = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    return PolynomialPsf(basis, coefficients, order=1, bbox=(0, 0, 200, 100), kind=kind)


def test_polynomial_psf_evaluation():
    psf = _two_gaussian_psf()
    assert psf.average_position == (100.0, 50.0)
    assert psf.size == 21
    image = psf.kernel_image(150.0, 20.0)
    weights = psf.coefficients @ spatial_functions(150.0, 20.0, order=1, bbox=psf.bbox)
    expected = np.tensordot(weights, psf.basis, axes=(0, 0))
    np.testing.assert_allclose(image, expected / expected.sum(), rtol=1e-12)
    assert image.sum() == pytest.approx(1.0)
    # the width grows from left (pure narrow Gaussian) to right (pure wide one)
    assert psf.fwhm(0.0, 50.0) == pytest.approx(FWHM_PER_SIGMA * 1.5, rel=1e-3)
    assert psf.fwhm(200.0, 50.0) == pytest.approx(FWHM_PER_SIGMA * 3.0, rel=1e-3)
    stack = psf.kernel_images([0.0, 150.0], [50.0, 20.0])
    np.testing.assert_allclose(stack[1], image, rtol=1e-12)
    assert isinstance(psf, Psf)


def test_polynomial_psf_non_positive_sum_raises():
    psf = _two_gaussian_psf()
    basis = np.stack([psf.basis[0], psf.basis[0]])
    bad = PolynomialPsf(basis, [[1.0, 0.0, 0.0], [0.0, -2.0, 0.0]], order=1, bbox=psf.bbox)
    with pytest.raises(InputError, match="non-positive sum"):
        bad.kernel_image(200.0, 50.0)


def test_polynomial_psf_validation_and_pickle():
    psf = _two_gaussian_psf("polynomial")
    with pytest.raises(InputError, match="expected"):
        PolynomialPsf(psf.basis, np.ones((2, 6)), order=1, bbox=psf.bbox)
    with pytest.raises(InputError, match="odd"):
        PolynomialPsf(np.ones((2, 4, 4)), np.ones((2, 1)), order=0, bbox=psf.bbox)
    with pytest.raises(InputError, match="odd"):
        PolynomialPsf(np.ones((2, 5, 7)), np.ones((2, 1)), order=0, bbox=psf.bbox)
    restored = pickle.loads(pickle.dumps(psf))
    assert restored == psf
    assert hash(restored) == hash(psf)
    assert not restored.basis.flags.writeable


# -- PSFEx ----------------------------------------------------------------------------------


def _write_psfex(path, basis, *, degree, zero=(1000.0, 2000.0), scale=(500.0, 800.0),
                 samp=1.0, ngrp=1, names=("X_IMAGE", "Y_IMAGE")):
    """A PSFEx ``.psf`` file in the standard layout (keywords in the table header)."""
    n, size2, size1 = basis.shape
    column = fits.Column(name="PSF_MASK", format=f"{basis.size}E", dim=f"({size1},{size2},{n})",
                         array=basis[np.newaxis].astype(np.float32))
    table = fits.BinTableHDU.from_columns([column], name="PSF_DATA")
    header = table.header
    header["POLNAXIS"] = 2
    header["POLGRP1"] = 1
    header["POLNAME1"] = names[0]
    header["POLZERO1"] = zero[0]
    header["POLSCAL1"] = scale[0]
    header["POLGRP2"] = 1
    header["POLNAME2"] = names[1]
    header["POLZERO2"] = zero[1]
    header["POLSCAL2"] = scale[1]
    header["POLNGRP"] = ngrp
    header["POLDEG1"] = degree
    header["PSF_SAMP"] = samp
    header["PSFNAXIS"] = 3
    header["PSFAXIS1"] = size1
    header["PSFAXIS2"] = size2
    header["PSFAXIS3"] = n
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    return path


def _psfex_reference(basis, degree, zero, scale, x_fits, y_fits):
    """Independent PSFEx evaluation (GalSim des_psfex convention, 1-based positions)."""
    u = (x_fits - zero[0]) / scale[0]
    v = (y_fits - zero[1]) / scale[1]
    weights = [u**i * v**j for j in range(degree + 1) for i in range(degree + 1 - j)]
    image = np.tensordot(np.array(weights), basis, axes=(0, 0))
    return image / image.sum()


def test_from_psfex_standard_file_follows_psfex_convention(tmp_path):
    rng = np.random.default_rng(21)
    degree = 2
    basis = np.stack([_gaussian(25, 2.0)] + [0.01 * rng.normal(size=(25, 25)) for _ in range(5)])
    path = _write_psfex(tmp_path / "model.psf", basis, degree=degree)
    psf = PolynomialPsf.from_psfex(path)
    assert psf.kind == "polynomial"
    assert psf.order == degree
    for x, y in [(0.0, 0.0), (1234.0, 2345.5), (730.0, 1500.0)]:
        expected = _psfex_reference(basis.astype(np.float32), degree, (1000.0, 2000.0),
                                    (500.0, 800.0), x + 1.0, y + 1.0)
        np.testing.assert_allclose(psf.kernel_image(x, y), expected, rtol=1e-5, atol=1e-9)


def test_from_psfex_resamples_oversampled_models(tmp_path):
    # PSF_SAMP = 0.5: two model pixels per image pixel; sigma 3 model px = 1.5 image px.
    basis = _gaussian(41, 3.0)[np.newaxis]
    path = _write_psfex(tmp_path / "over.psf", basis, degree=0, samp=0.5)
    psf = PolynomialPsf.from_psfex(path)
    image = psf.kernel_image(10.0, 10.0)
    assert image.shape == (21, 21)
    assert image.sum() == pytest.approx(1.0)
    assert psf.fwhm() == pytest.approx(FWHM_PER_SIGMA * 1.5, rel=2e-3)
    assert psf_moments(image)[:2] == pytest.approx((10.0, 10.0), abs=1e-6)


def test_from_psfex_pads_even_models(tmp_path):
    basis = _gaussian(21, 2.0)[np.newaxis, :20, :20]  # PSFEx centres it on pixel S/2 = 10
    path = _write_psfex(tmp_path / "even.psf", basis, degree=0)
    image = PolynomialPsf.from_psfex(path).kernel_image()
    assert image.shape == (21, 21)
    assert np.unravel_index(np.argmax(image), image.shape) == (10, 10)
    assert image[20, :].sum() == 0.0  # the padded row


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ngrp": 2}, "one group"),
    ({"names": ("MAG_AUTO", "Y_IMAGE")}, "image positions"),
])
def test_from_psfex_rejects_unsupported_contexts(tmp_path, kwargs, match):
    path = _write_psfex(tmp_path / "bad.psf", np.ones((3, 5, 5)), degree=1, **kwargs)
    with pytest.raises(InputError, match=match):
        PolynomialPsf.from_psfex(path)


def test_from_psfex_rejects_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        PolynomialPsf.from_psfex(tmp_path / "missing.psf")
    path = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((3, 3))).writeto(path)
    with pytest.raises(InputError, match="PSF_MASK"):
        PolynomialPsf.from_psfex(path)


@pytest.mark.data
def test_from_psfex_reads_legacypipe_models(data_dir):
    folder = data_dir / LEGACYPIPE
    paths = sorted(folder.glob("*-psfex.fits"))
    if not paths:
        pytest.skip(f"no PSFEx files in {folder}")
    for path in paths:
        psf = PolynomialPsf.from_psfex(path)
        with fits.open(path) as hdul:
            row = hdul[1].data[0]
            raw = np.asarray(row["psf_mask"], dtype=np.float64)
            zero = (float(row["polzero1"]), float(row["polzero2"]))
            scale = (float(row["polscal1"]), float(row["polscal2"]))
            degree = int(row["poldeg1"])
        image_path = folder / path.name.replace("-psfex.fits", ".fits").replace("-N", ".N")
        with fits.open(image_path) as hdul:
            height, width = hdul[1].data.shape
            header_fwhm = float(hdul[1].header["FWHM"])  # the DECam CP's median FWHM (px)
        for x, y in [(0.0, 0.0), ((width - 1) / 2, (height - 1) / 2), (width - 1.0, height - 1.0)]:
            image = psf.kernel_image(x, y)
            assert image.shape == (63, 63)
            assert image.sum() == pytest.approx(1.0, abs=1e-12)
            # the PSFEx convention, evaluated independently
            expected = _psfex_reference(raw, degree, zero, scale, x + 1.0, y + 1.0)
            np.testing.assert_allclose(image, expected, rtol=1e-9, atol=1e-12)
            cx, cy, _ = psf_moments(image)
            assert (cx, cy) == pytest.approx((31.0, 31.0), abs=0.1)
            fwhm = psf.fwhm(x, y)
            assert 2.5 < fwhm < 5.0
            assert fwhm == pytest.approx(header_fwhm, rel=0.15)
