"""Unit tests of skydiff.exposure: Exposure, PhotoCalib, VisitInfo and the variance estimate."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import (
    CCDData,
    InverseVariance,
    NDData,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.time import Time
from astropy.wcs import WCS

from skydiff.errors import InputError
from skydiff.exposure import (
    Exposure,
    PhotoCalib,
    VisitInfo,
    estimate_variance,
    robust_sigma,
)
from skydiff.mask import MaskPlanes
from skydiff.psf import GaussianPsf, ImagePsf


def _wcs(crval=(150.0, 2.0)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [20.0, 15.0]
    wcs.wcs.cdelt = [-5e-5, 5e-5]
    return wcs


def _full_exposure(rng, shape=(30, 40)):
    image = rng.normal(100.0, 3.0, size=shape).astype(np.float32)
    variance = np.full(shape, 9.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint32)
    mask[3, 4] = 1 << 3
    return Exposure(image, mask, variance, psf=GaussianPsf(1.8), wcs=_wcs(),
                    photo_calib=PhotoCalib.from_zero_point(28.5, 0.01), filter="r",
                    visit_info=VisitInfo(date=Time("2021-05-06T07:08:09", scale="tai"),
                                         exposure_time=30.0, airmass=1.2,
                                         parallactic_angle=-40.0),
                    origin=(100, 200), metadata={"OBJECT": "field 7", "SEEING": 1.1})


# -- construction and validation ------------------------------------------------------------


def test_arrays_are_read_only_typed_copies():
    image = np.arange(12.0).reshape(3, 4)
    variance = np.ones((3, 4))
    mask = np.zeros((3, 4), dtype=np.int64)
    exposure = Exposure(image, mask, variance)
    assert exposure.image.dtype == np.float32
    assert exposure.variance.dtype == np.float32
    assert exposure.mask.dtype == np.uint32
    for array in (exposure.image, exposure.mask, exposure.variance):
        assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        exposure.image[0, 0] = 1.0
    image[0, 0] = 99.0  # the caller's array is not aliased
    variance[:] = 5.0
    assert exposure.image[0, 0] == 0.0
    assert exposure.variance[0, 0] == 1.0


def test_input_arrays_are_never_modified():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(8, 9)).astype(np.float32)
    image[2, 2] = np.nan
    mask = np.zeros((8, 9), dtype=bool)
    mask[1, 1] = True
    copies = image.copy(), mask.copy()
    Exposure.from_arrays(image, mask=mask)
    np.testing.assert_array_equal(image, copies[0])
    np.testing.assert_array_equal(mask, copies[1])


def test_default_mask_and_planes():
    exposure = Exposure(np.zeros((4, 5)), variance=np.ones((4, 5)))
    np.testing.assert_array_equal(exposure.mask, np.zeros((4, 5)))
    assert exposure.mask_planes == MaskPlanes.default()
    assert exposure.metadata == fits.Header()
    assert exposure.origin == (0, 0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image": np.zeros(5), "variance": np.ones(5)}, "2-D"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 4))}, "variance shape"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "mask": np.zeros((2, 3), int)},
     "mask shape"),
    ({"image": np.zeros((3, 3)), "variance": -np.ones((3, 3))}, "negative"),
    ({"image": np.zeros((3, 3))}, "needs a variance"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "mask": np.ones((3, 3), bool)},
     "boolean"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "mask": -np.ones((3, 3), int)},
     "0..2"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "mask": np.ones((3, 3))},
     "integer"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)),
      "mask": np.full((3, 3), 1 << 20, np.uint32)}, "does not name"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "origin": (1.5, 0)}, "origin"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "psf": "gauss"}, "Psf"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "wcs": "TAN"}, "WCS"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "photo_calib": 27.0},
     "PhotoCalib"),
    ({"image": np.zeros((3, 3)), "variance": np.ones((3, 3)), "metadata": 5}, "Header"),
])
def test_validators_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        Exposure(**kwargs)


def test_non_finite_variance_is_allowed_but_negative_is_not():
    variance = np.ones((3, 3))
    variance[1, 1] = np.nan
    exposure = Exposure(np.zeros((3, 3)), variance=variance)
    assert np.isnan(exposure.variance[1, 1])


def test_properties():
    rng = np.random.default_rng(2)
    exposure = _full_exposure(rng)
    assert exposure.shape == (30, 40)
    assert exposure.bbox == (100, 200, 140, 230)
    assert exposure.dtype == np.float32
    assert exposure.nbytes == 3 * 30 * 40 * 4


# -- equality, hashing, pickling, evolve -------------------------------------------------------


def test_equality_compares_arrays_wcs_and_header():
    rng = np.random.default_rng(3)
    a = _full_exposure(rng)
    b = a.evolve()
    assert a == b
    assert hash(a) == hash(b)
    assert a != a.evolve(wcs=_wcs(crval=(150.0, 2.001)))
    assert a != a.evolve(wcs=None)
    assert a != a.evolve(metadata={"OBJECT": "field 8"})
    assert a != a.evolve(image=a.image + 1)
    assert a != a.evolve(origin=(0, 0))
    nan_image = a.image.copy()
    nan_image[0, 0] = np.nan
    assert a.evolve(image=nan_image) == a.evolve(image=nan_image)


def test_evolve_validates_and_shares_frozen_arrays():
    rng = np.random.default_rng(4)
    exposure = _full_exposure(rng)
    changed = exposure.evolve(filter="i")
    assert changed.filter == "i" and exposure.filter == "r"
    assert changed.image is exposure.image  # frozen arrays are shared, not copied
    with pytest.raises(InputError, match="variance shape"):
        exposure.evolve(variance=np.ones((2, 2)))


def test_wcs_is_copied():
    wcs = _wcs()
    exposure = Exposure(np.zeros((3, 3)), variance=np.ones((3, 3)), wcs=wcs)
    wcs.wcs.crval = [0.0, 0.0]
    assert list(exposure.wcs.wcs.crval) == [150.0, 2.0]


def test_pickle_round_trip():
    rng = np.random.default_rng(5)
    exposure = _full_exposure(rng)
    restored = pickle.loads(pickle.dumps(exposure))
    assert restored == exposure
    assert restored.visit_info.date.scale == "tai"
    for array in (restored.image, restored.mask, restored.variance):
        assert not array.flags.writeable


# -- masks and cut-outs -----------------------------------------------------------------------


def test_masked_and_with_mask():
    rng = np.random.default_rng(6)
    exposure = _full_exposure(rng)
    where = np.zeros(exposure.shape, dtype=bool)
    where[10, 10] = True
    flagged = exposure.with_mask("GHOST", where)
    assert "GHOST" in flagged.mask_planes.names
    assert "GHOST" not in exposure.mask_planes.names
    assert flagged.masked("GHOST").sum() == 1
    assert flagged.masked("CR")[3, 4]
    assert flagged.masked().sum() == 2
    assert flagged.masked("BAD").sum() == 0
    twice = flagged.with_mask("CR", where)
    assert twice.masked("CR")[10, 10] and twice.masked("GHOST")[10, 10]
    with pytest.raises(InputError, match="boolean"):
        exposure.with_mask("CR", where.astype(int))
    with pytest.raises(InputError, match="unknown mask plane"):
        exposure.masked("NOPE")


def test_cutout_updates_origin_and_wcs():
    rng = np.random.default_rng(7)
    exposure = _full_exposure(rng)
    cut = exposure.cutout(slice(5, 20), slice(10, -5))
    assert cut.shape == (15, 25)
    assert cut.origin == (110, 205)
    np.testing.assert_array_equal(cut.image, exposure.image[5:20, 10:35])
    parent = exposure.wcs.pixel_to_world(10 + 3, 5 + 2)
    child = cut.wcs.pixel_to_world(3, 2)
    assert parent.separation(child).arcsec < 1e-6
    assert cut.psf == exposure.psf
    with pytest.raises(InputError, match="step 1"):
        exposure.cutout(slice(0, 10, 2), slice(0, 5))
    with pytest.raises(InputError, match="non-empty"):
        exposure.cutout(slice(5, 5), slice(0, 5))


# -- from_arrays and variance estimates ------------------------------------------------------


def test_from_arrays_cleans_non_finite_pixels():
    rng = np.random.default_rng(8)
    image = rng.normal(10.0, 1.0, size=(20, 20))
    image[4, 5] = np.nan
    image[6, 7] = -np.inf
    variance = np.full((20, 20), 2.0)
    variance[8, 9] = np.inf
    mask = np.zeros((20, 20), dtype=bool)
    mask[1, 2] = True
    exposure = Exposure.from_arrays(image, variance=variance, mask=mask)
    assert exposure.image[4, 5] == 0.0 and exposure.image[6, 7] == 0.0
    assert np.all(np.isfinite(exposure.variance))
    assert exposure.variance[8, 9] == 2.0
    no_data = exposure.masked("NO_DATA")
    assert set(zip(*np.nonzero(no_data), strict=True)) == {(4, 5), (6, 7), (8, 9)}
    assert exposure.masked("BAD")[1, 2] and exposure.masked("BAD").sum() == 1


def test_from_arrays_rejects_negative_variance():
    with pytest.raises(InputError, match="negative"):
        Exposure.from_arrays(np.zeros((3, 3)), variance=-np.ones((3, 3)))


def test_estimate_variance_poisson_and_read_noise():
    rng = np.random.default_rng(9)
    gain, read_noise = 2.5, 6.0
    rows, cols = np.indices((200, 200))
    model = 800.0 + 2.0 * cols + 1.0 * rows  # ADU
    model[100:103, 100:103] += 5e4  # a bright star
    image = rng.poisson(model * gain) / gain + rng.normal(0.0, read_noise / gain, model.shape)
    truth = model / gain + (read_noise / gain) ** 2
    estimate = estimate_variance(image, gain=gain, read_noise=read_noise)
    assert estimate.dtype == np.float32 and estimate.shape == model.shape
    # unbiased: E[max(image, 0) / g] = model / g; each pixel scatters by sqrt(truth) / g
    n = model.size
    residual = estimate - truth
    assert abs(residual.mean()) < 5.0 * np.sqrt(truth.mean()) / gain / np.sqrt(n)
    # the estimate normalises the noise: var(chi) = 1 within 5 sigma of sqrt(2/N)
    chi = (image - model) / np.sqrt(estimate)
    assert abs(chi.var() - 1.0) < 5.0 * np.sqrt(2.0 / n)
    no_read = estimate_variance(np.full((2, 2), 400.0), gain=4.0)
    np.testing.assert_allclose(no_read, 100.0)


def test_estimate_variance_from_sky_noise():
    rng = np.random.default_rng(10)
    sigma = 7.0
    rows, cols = np.indices((128, 128))
    sky = 300.0 + 0.05 * cols - 0.03 * rows
    image = sky + rng.normal(0.0, sigma, sky.shape)
    mask = np.zeros(sky.shape, dtype=np.uint32)
    image[::10, ::10] += 1e4  # hot pixels, masked
    mask[::10, ::10] = 1
    estimate = estimate_variance(image, mask=mask)
    assert np.ptp(estimate) == 0.0
    n = int((mask == 0).sum())
    # MAD-based sigma: standard error 1.166 sigma / sqrt(N); allow 5 of them plus 0.5 % bias
    tolerance = 5.0 * 1.166 / np.sqrt(n) + 0.005
    assert math.sqrt(float(estimate[0, 0])) == pytest.approx(sigma, rel=tolerance)


def test_estimate_variance_errors():
    with pytest.raises(InputError, match="gain"):
        estimate_variance(np.ones((3, 3)), gain=0.0)
    with pytest.raises(InputError, match="read_noise"):
        estimate_variance(np.ones((3, 3)), gain=1.0, read_noise=-1.0)
    with pytest.raises(InputError, match="masked"):
        estimate_variance(np.ones((3, 3)), mask=np.ones((3, 3)))
    with pytest.raises(InputError, match="no finite"):
        estimate_variance(np.full((3, 3), np.nan))


def test_from_arrays_estimates_variance_with_gain():
    image = np.full((10, 10), 1000.0)
    exposure = Exposure.from_arrays(image, gain=2.0, read_noise=4.0)
    np.testing.assert_allclose(exposure.variance, 1000.0 / 2.0 + 4.0)


def test_robust_sigma():
    assert robust_sigma([1.0, 2.0, 3.0, np.nan, 1e9]) == pytest.approx(1.4826)
    rng = np.random.default_rng(11)
    values = rng.normal(0.0, 3.0, 40_000)
    assert robust_sigma(values) == pytest.approx(3.0, rel=5 * 1.166 / np.sqrt(40_000))
    with pytest.raises(InputError, match="finite"):
        robust_sigma([np.nan, np.inf])


# -- calibration and visit info ---------------------------------------------------------------


def test_photo_calib():
    calib = PhotoCalib.from_zero_point(27.0, 0.02)
    assert calib.zero_point == pytest.approx(27.0)
    assert calib.zero_point_err == pytest.approx(0.02)
    assert PhotoCalib().zero_point == pytest.approx(31.4)
    assert calib.to_nanojansky(2.0) == pytest.approx(2.0 * calib.scale)
    assert calib.to_magnitude(1.0) == pytest.approx(27.0)
    assert np.isnan(calib.to_magnitude(-1.0))
    with pytest.raises(InputError, match="> 0"):
        PhotoCalib(scale=0.0)
    with pytest.raises(InputError, match="≥ 0"):
        PhotoCalib(scale_err=-1.0)


def test_visit_info_equality_and_validation():
    a = VisitInfo(date="2020-01-01T00:00:00", exposure_time=30, airmass=1.1)
    b = VisitInfo(date=Time(58849.0, format="mjd"), exposure_time=30.0, airmass=1.1)
    assert a == b
    assert hash(a) == hash(b)
    assert a != VisitInfo(date="2020-01-01T00:00:01", exposure_time=30, airmass=1.1)
    with pytest.raises(InputError, match="exposure_time"):
        VisitInfo(exposure_time=-1.0)
    with pytest.raises(InputError, match="airmass"):
        VisitInfo(airmass=0.0)
    with pytest.raises(InputError, match="date"):
        VisitInfo(date="yesterday")


# -- astropy.nddata --------------------------------------------------------------------------


def test_nddata_round_trip_is_lossless():
    rng = np.random.default_rng(12)
    exposure = _full_exposure(rng)
    nd = exposure.to_nddata()
    assert isinstance(nd, NDData)
    assert isinstance(nd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(nd.mask, exposure.mask)
    np.testing.assert_allclose(nd.psf, exposure.psf.kernel_image())
    assert Exposure.from_nddata(nd) == exposure


def test_ccddata_round_trip_through_a_file(tmp_path):
    rng = np.random.default_rng(13)
    exposure = _full_exposure(rng).evolve(psf=ImagePsf(GaussianPsf(1.8).kernel_image()))
    ccd = exposure.to_ccddata(unit="adu")
    assert ccd.mask.dtype == bool
    path = tmp_path / "ccd.fits"
    ccd.write(path, hdu_psf="PSFIMAGE")
    back = Exposure.from_ccddata(CCDData.read(path, hdu_psf="PSFIMAGE"))
    expected = exposure.evolve(mask=np.where(exposure.mask != 0, 1, 0).astype(np.uint32))
    np.testing.assert_array_equal(back.image, expected.image)
    np.testing.assert_array_equal(back.variance, expected.variance)
    np.testing.assert_array_equal(back.mask, expected.mask)  # the mask collapses to BAD
    assert back.mask_planes == expected.mask_planes
    assert back.filter == "r"
    assert back.origin == (100, 200)
    assert back.visit_info == expected.visit_info
    assert back.photo_calib == expected.photo_calib
    assert back.psf == expected.psf
    assert back.metadata["OBJECT"] == "field 7"
    assert "LTV1" not in back.metadata
    pixels = np.array([[0.0, 0.0], [39.0, 29.0]])
    np.testing.assert_allclose(back.wcs.wcs_pix2world(pixels, 0),
                               expected.wcs.wcs_pix2world(pixels, 0), rtol=1e-12)
    in_memory = Exposure.from_ccddata(ccd)
    assert in_memory.evolve(metadata=expected.metadata) == expected.evolve(
        metadata=expected.metadata)


def test_from_nddata_accepts_other_uncertainties():
    data = np.full((4, 4), 10.0)
    sigma = Exposure.from_nddata(NDData(data, uncertainty=StdDevUncertainty(np.full((4, 4), 3.0))))
    np.testing.assert_allclose(sigma.variance, 9.0)
    weights = np.full((4, 4), 0.25)
    weights[0, 0] = 0.0
    inverse = Exposure.from_nddata(NDData(data, uncertainty=InverseVariance(weights)))
    np.testing.assert_allclose(inverse.variance, 4.0)
    assert inverse.masked("NO_DATA")[0, 0] and inverse.masked("NO_DATA").sum() == 1
    with pytest.raises(InputError, match="NDData"):
        Exposure.from_nddata(data)
    with pytest.raises(InputError, match="CCDData"):
        Exposure.from_ccddata(NDData(data))


# -- unified I/O and import order --------------------------------------------------------------


def test_read_write_descriptors_are_attached():
    assert type(Exposure.__dict__["read"]).__name__ == "UnifiedReadWriteMethod"
    assert type(Exposure.__dict__["write"]).__name__ == "UnifiedReadWriteMethod"


def test_write_read_round_trip_through_the_unified_io(tmp_path):
    rng = np.random.default_rng(14)
    exposure = _full_exposure(rng)
    path = tmp_path / "exposure.fits"
    exposure.write(path)
    assert Exposure.read(path) == exposure


def test_exposure_imports_first_in_a_fresh_interpreter():
    code = ("import skydiff.exposure as e, skydiff.convolve; "
            "print(e.Exposure.read.__class__.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ExposureRead"
