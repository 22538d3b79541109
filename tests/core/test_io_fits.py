"""Tests of skydiff.io.fits: the multi-extension layout, plain images with companions, errors."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import skydiff.io.fits as skfits
from skydiff.errors import InputError
from skydiff.exposure import Exposure, PhotoCalib, VisitInfo
from skydiff.io import Provenance, read_exposure, read_provenance, write_exposure
from skydiff.mask import DEFAULT_PLANES, MaskPlanes
from skydiff.psf import GaussianPsf, ImagePsf, PolynomialPsf

# ------------------------------------------------------------------------------------------
# helpers


def make_wcs(*, sip: bool = False) -> WCS:
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if sip else (
        "RA---TAN", "DEC--TAN")
    header["CRVAL1"], header["CRVAL2"] = 150.123456789012, 2.2050123456789
    header["CRPIX1"], header["CRPIX2"] = 12.5, 9.25
    header["CD1_1"], header["CD1_2"] = -7.2e-05, 1.1e-07
    header["CD2_1"], header["CD2_2"] = 1.3e-07, 7.2e-05
    header["RADESYS"] = "ICRS"
    if sip:
        header["A_ORDER"], header["B_ORDER"] = 2, 2
        header["A_2_0"], header["B_0_2"] = 1.5e-06, -2.5e-06
    return WCS(header)


def polynomial_psf() -> PolynomialPsf:
    g1, g2 = GaussianPsf(1.5, size=9), GaussianPsf(2.5, size=9)
    basis = np.stack([g1.kernel_image(), g2.kernel_image() - g1.kernel_image()])
    return PolynomialPsf(basis, [[1.0, 0.0, 0.0], [0.5, 0.25, -0.125]], order=1,
                         bbox=(0.0, 0.0, 63.5, 41.0), kind="chebyshev")


class WingPsf:
    """A user PSF implementing only the skydiff.Psf protocol (written as an ImagePsf)."""

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        image = np.outer([1.0, 3.0, 1.0], [1.0, 2.0, 1.0])
        return image / image.sum()

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        return 2.0

    @property
    def average_position(self) -> tuple[float, float]:
        return (4.5, 7.25)


def full_exposure(rng: np.random.Generator, *, psf: Any = None,
                  shape: tuple[int, int] = (20, 30)) -> Exposure:
    """An exposure using every field, including a custom plane on the uint32 high bit."""
    planes = MaskPlanes({**MaskPlanes.default().planes, "GHOST": 31})
    mask = rng.integers(0, 2**14, size=shape, dtype=np.uint32)
    mask[3, 4] |= np.uint32(1 << 31)
    metadata = fits.Header()
    metadata["OBJECT"] = ("NGC 1234", "target")
    metadata["SEEING"] = 0.1 + 0.2  # a float needing 17 significant digits
    metadata["HIERARCH ESO DET CHIP NAME"] = "chip-7"
    metadata["LONGSTR"] = "x" * 150  # CONTINUE cards
    metadata["COMMENT"] = "first comment"
    metadata["HISTORY"] = "made by a test"
    return Exposure(
        rng.normal(100.0, 5.0, size=shape).astype(np.float32),
        mask,
        rng.uniform(1.0, 30.0, size=shape).astype(np.float32),
        mask_planes=planes,
        psf=psf,
        wcs=make_wcs(),
        photo_calib=PhotoCalib(scale=0.1 + 0.7, scale_err=1.0 / 3.0),
        filter="HSC-R2",
        visit_info=VisitInfo(date=Time("2021-03-04T05:06:07.123456789", scale="tai"),
                             exposure_time=30.000000000000004, airmass=1.2345678901234567,
                             parallactic_angle=-47.5),
        origin=(17, -5),
        metadata=metadata,
    )


def assert_identical(read: Exposure, expected: Exposure) -> None:
    """Every field equal (checked one by one for readable failures), then the whole."""
    np.testing.assert_array_equal(read.image, expected.image)
    np.testing.assert_array_equal(read.mask, expected.mask)
    np.testing.assert_array_equal(read.variance, expected.variance)
    assert read.image.dtype == np.float32 and read.variance.dtype == np.float32
    assert read.mask.dtype == np.uint32
    for name in ("mask_planes", "psf", "photo_calib", "filter", "visit_info", "origin"):
        assert getattr(read, name) == getattr(expected, name), name
    assert (read.wcs is None) == (expected.wcs is None)
    if expected.wcs is not None:
        assert read.wcs.to_header_string(relax=True) == expected.wcs.to_header_string(relax=True)
    assert str(read.metadata) == str(expected.metadata)
    assert read == expected


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_plain(path: Path, data: np.ndarray, **keywords: Any) -> Path:
    header = fits.Header()
    for key, value in keywords.items():
        header[key.replace("_", "-") if key in ("DATE_OBS", "MJD_OBS") else key] = value
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


# ------------------------------------------------------------------------------------------
# multi-extension round trips


@pytest.mark.parametrize("psf", [None, GaussianPsf(1.7320508075688772, size=11),
                                 ImagePsf(np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 7.0,
                                          position=(12.25, 3.5)),
                                 polynomial_psf()],
                         ids=["none", "gaussian", "image", "polynomial"])
def test_mef_round_trip_is_identical(tmp_path: Path, psf: Any) -> None:
    rng = np.random.default_rng(101)
    exposure = full_exposure(rng, psf=psf)
    path = tmp_path / "exp.fits"
    write_exposure(exposure, path)
    assert_identical(read_exposure(path), exposure)


def test_mef_round_trip_with_sip_wcs_and_nan_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(102)
    image = rng.normal(size=(9, 7)).astype(np.float32)
    image[2, 3] = np.nan
    image[4, 4] = np.inf
    exposure = Exposure(image, variance=np.ones((9, 7)), wcs=make_wcs(sip=True))
    write_exposure(exposure, tmp_path / "sip.fits")
    read = read_exposure(tmp_path / "sip.fits")
    assert_identical(read, exposure)
    assert "SIP" in read.wcs.to_header_string(relax=True) or read.wcs.sip is not None


def test_protocol_psf_is_written_as_image_psf(tmp_path: Path) -> None:
    psf = WingPsf()
    exposure = Exposure(np.zeros((5, 5)), variance=np.ones((5, 5)), psf=psf)
    write_exposure(exposure, tmp_path / "p.fits")
    read = read_exposure(tmp_path / "p.fits").psf
    assert isinstance(read, ImagePsf)
    np.testing.assert_array_equal(read.image, psf.kernel_image())
    assert read.position == psf.average_position


def test_on_disk_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(103)
    exposure = full_exposure(rng, psf=polynomial_psf())
    provenance = Provenance(plugins={"al": "1.2"}, config_toml="[subtract]\nname = 'al'\n")
    path = tmp_path / "layout.fits"
    write_exposure(exposure, path, provenance=provenance)
    with fits.open(path) as hdul:
        assert [hdu.name for hdu in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF",
                                              "PSFCOEF", "PROVCONF"]
        primary, image, mask, variance, psf, coef, config = hdul
        assert primary.data is None
        assert primary.header["SKDFMT"] == 1
        assert primary.header["PLUG1"] == "al=1.2"
        assert image.header["BITPIX"] == -32 and variance.header["BITPIX"] == -32
        assert mask.header["BITPIX"] == 32 and mask.header["BZERO"] == 2**31
        assert mask.data.dtype == np.uint32
        assert mask.header["MP_BAD"] == 0 and mask.header["MP_GHOST"] == 31
        assert mask.header["MP_DETECTED_NEGATIVE"] == 6
        for hdu in (image, mask, variance):
            assert (hdu.header["LTV1"], hdu.header["LTV2"]) == (-17, 5)
            assert hdu.header["CTYPE1"] == "RA---TAN"
        assert image.header["FILTER"] == "HSC-R2"
        assert image.header["PHOTSCAL"] == 0.1 + 0.7
        assert image.header["TIMESYS"] == "TAI"
        assert image.header["DATE-OBS"] == "2021-03-04T05:06:07.123456789"
        assert image.header["EXPTIME"] == 30.000000000000004
        assert image.header["OBJECT"] == "NGC 1234"
        assert psf.header["PSFTYPE"] == "polynomial" and psf.data.shape == (2, 9, 9)
        assert coef.data.shape == (2, 3)
        assert config.header["TOMLLEN"] == len(provenance.config_toml)
        assert all("CHECKSUM" in hdu.header for hdu in hdul)
    assert read_provenance(path) == provenance


def test_zero_variance_and_all_none_visit_info(tmp_path: Path) -> None:
    exposure = Exposure(np.ones((3, 4)), variance=np.zeros((3, 4)), visit_info=VisitInfo(),
                        photo_calib=PhotoCalib())
    write_exposure(exposure, tmp_path / "z.fits")
    read = read_exposure(tmp_path / "z.fits")
    # An empty VisitInfo has nothing to write and reads back as None (documented).
    assert read.visit_info is None
    assert read.photo_calib == PhotoCalib()
    assert read == exposure.evolve(visit_info=None)


_SAFE_KEYS = ("OBJECT", "OBSERVER", "RUNID", "CCDNUM", "SEEING", "NOTE", "PROGRAM", "TEMPCCD")


@st.composite
def exposures(draw: st.DrawFn) -> Exposure:
    """Small random exposures using every field (built directly, not filtered)."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shape = (rows, cols)
    floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    image = np.array(draw(st.lists(floats32, min_size=rows * cols, max_size=rows * cols)),
                     dtype=np.float32).reshape(shape)
    positive32 = st.floats(min_value=0.0, width=32, allow_infinity=False)
    variance = np.array(draw(st.lists(positive32, min_size=rows * cols, max_size=rows * cols)),
                        dtype=np.float32).reshape(shape)
    named = MaskPlanes.default().value(*DEFAULT_PLANES)
    mask = np.array(draw(st.lists(st.integers(0, named), min_size=rows * cols,
                                  max_size=rows * cols)), dtype=np.uint32).reshape(shape)
    sigma = draw(st.floats(0.3, 4.0))
    side = draw(st.sampled_from([1, 3, 5]))
    psf = draw(st.sampled_from([
        None,
        GaussianPsf(sigma),
        ImagePsf(np.random.default_rng(int(sigma * 1000)).uniform(0.01, 1.0, (side, side)),
                 position=(sigma, -sigma)) if side > 1 else GaussianPsf(sigma, size=3),
    ]))
    visit = draw(st.one_of(st.none(), st.builds(
        VisitInfo,
        date=st.floats(40000.0, 60000.0).map(lambda mjd: Time(mjd, format="mjd", scale="utc")),
        exposure_time=st.floats(0.0, 1e5),
        airmass=st.one_of(st.none(), st.floats(1.0, 5.0)),
        parallactic_angle=st.one_of(st.none(), st.floats(-180.0, 180.0)))))
    calib = draw(st.one_of(st.none(), st.builds(PhotoCalib, scale=st.floats(1e-6, 1e6),
                                                 scale_err=st.floats(0.0, 1e3))))
    keys = draw(st.lists(st.sampled_from(_SAFE_KEYS), unique=True, max_size=3))
    values = st.one_of(st.integers(-10**9, 10**9), st.floats(-1e6, 1e6),
                       st.text("abcdefghijklmnopqrstuvwxyz0123456789 -_", max_size=20))
    metadata = fits.Header([(key, draw(values)) for key in keys])
    return Exposure(
        image, mask, variance, psf=psf,
        wcs=draw(st.sampled_from([None, make_wcs()])),
        photo_calib=calib,
        filter=draw(st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_.-]{0,12}",
                                                        fullmatch=True))),
        visit_info=visit,
        origin=(draw(st.integers(-10**6, 10**6)), draw(st.integers(-10**6, 10**6))),
        metadata=metadata,
    )


@settings(max_examples=15, deadline=None)
@given(exposure=exposures())
def test_mef_round_trip_property(tmp_path_factory: pytest.TempPathFactory,
                                 exposure: Exposure) -> None:
    path = tmp_path_factory.mktemp("prop") / "exp.fits"
    write_exposure(exposure, path)
    assert_identical(read_exposure(path), exposure)


# ------------------------------------------------------------------------------------------
# unified I/O


def test_unified_read_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(104)
    exposure = full_exposure(rng, psf=GaussianPsf(2.0))
    path = tmp_path / "u.fits"
    exposure.write(path, provenance=Provenance(plugins={"zogy": "0.3"}))
    assert_identical(Exposure.read(path), exposure)
    assert_identical(Exposure.read(str(path), format="skydiff-mef"), exposure)
    assert read_provenance(path).plugins == {"zogy": "0.3"}
    # The IMAGE HDU alone, as a plain image: same pixels, no mask planes from the file.
    plain = Exposure.read(path, format="fits-image", hdu="IMAGE")
    np.testing.assert_array_equal(plain.image, exposure.image)
    assert plain.mask.max() == 0
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        exposure.write(path)
    exposure.write(path, overwrite=True)


def test_unified_format_identification(tmp_path: Path) -> None:
    plain = write_plain(tmp_path / "plain.fits", np.arange(12.0).reshape(3, 4))
    exposure = Exposure.read(plain)
    np.testing.assert_array_equal(exposure.image, np.arange(12.0).reshape(3, 4))
    write_exposure(exposure, tmp_path / "mef.fit")
    assert skfits._identify_mef("read", str(tmp_path / "mef.fit"), None)
    assert not skfits._identify_image("read", str(tmp_path / "mef.fit"), None)
    assert skfits._identify_image("read", str(plain), None)
    assert not skfits._identify_mef("read", str(plain), None)
    with pytest.raises(InputError, match="format='skydiff-mef'"):
        exposure.write(tmp_path / "out.png")
    with pytest.raises(InputError, match="does not exist"):
        Exposure.read(tmp_path / "missing.dat")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="pass format="):
        Exposure.read(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="is a directory"):
        Exposure.read(tmp_path)
    with pytest.raises(InputError, match="not a multi-extension exposure"):
        Exposure.read(plain, format="skydiff-mef")
    with pytest.raises(InputError, match="needs a file path"):
        Exposure.read(42)
    with pytest.raises(InputError, match="format='fits-image' to use it"):
        Exposure.read(tmp_path / "mef.fit", format="skydiff-mef", hdu=1)
    with pytest.raises(InputError, match="pass a format listed by"):
        Exposure.read(plain, format="votable")


def test_list_formats_names_both_formats() -> None:
    import io

    out = io.StringIO()
    Exposure.read.list_formats(out=out)
    assert "skydiff-mef" in out.getvalue() and "fits-image" in out.getvalue()


# ------------------------------------------------------------------------------------------
# afw-style files


def test_reads_afw_style_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(105)
    shape = (6, 8)
    primary = fits.PrimaryHDU()
    primary.header["FILTER"] = "r"
    primary.header["FLUXMAG0"] = 1.0e11
    primary.header["EXPTIME"] = 15.0
    primary.header["TELESCOP"] = "LSST"
    image = fits.ImageHDU(rng.normal(size=shape).astype(np.float32), name="IMAGE")
    image.header["INHERIT"] = True
    image.header["LTV1"], image.header["LTV2"] = -100, -200
    mask_data = np.zeros(shape, dtype=np.int32)
    mask_data[1, 2] = 1 << 1
    mask_data[0, 0] = np.int32(-(2**31))  # bit 31 in a signed mask
    mask = fits.ImageHDU(mask_data, name="MASK")
    mask.header["MP_BAD"], mask.header["MP_SAT"], mask.header["MP_EDGE"] = 0, 1, 4
    mask.header["HIERARCH MP_TOP"] = 31
    variance = fits.ImageHDU(np.full(shape, 2.0, dtype=np.float32), name="VARIANCE")
    fits.HDUList([primary, image, mask, variance]).writeto(tmp_path / "calexp.fits")
    exposure = read_exposure(tmp_path / "calexp.fits")
    assert exposure.filter == "r"
    assert exposure.origin == (100, 200)
    assert exposure.photo_calib.zero_point == pytest.approx(27.5, abs=1e-9)
    assert exposure.visit_info.exposure_time == 15.0
    assert exposure.metadata["TELESCOP"] == "LSST"
    assert "FILTER" not in exposure.metadata and "LTV1" not in exposure.metadata
    assert exposure.masked("SAT")[1, 2] and exposure.masked("TOP")[0, 0]
    assert exposure.mask[0, 0] == 2**31
    np.testing.assert_array_equal(exposure.variance, 2.0)


# ------------------------------------------------------------------------------------------
# plain images


def test_uint16_bzero_values_exact_and_saturation(tmp_path: Path) -> None:
    rng = np.random.default_rng(106)
    data = rng.integers(0, 60000, size=(16, 20), dtype=np.uint16)
    data[3, 3] = 65535
    data[5, 7] = 61000
    path = write_plain(tmp_path / "u16.fits", data)
    with fits.open(path) as hdul:
        assert hdul[0].header["BZERO"] == 32768 and hdul[0].header["BITPIX"] == 16
    exposure = read_exposure(path, saturation_grow=0)
    np.testing.assert_array_equal(exposure.image, data.astype(np.float32))
    # Digital saturation: the largest value a uint16 holds is flagged even without a level.
    assert np.array_equal(exposure.masked("SAT"), data == 65535)
    flagged = read_exposure(path, saturation=60500, saturation_grow=0).masked("SAT")
    assert np.array_equal(flagged, data >= 60500)
    # By default the saturated pixels are grown by one pixel (charge spills over).
    grown = ndimage.maximum_filter(data >= 60500, size=3, mode="constant")
    assert np.array_equal(read_exposure(path, saturation=60500).masked("SAT"), grown)
    with pytest.raises(InputError, match="saturation_grow"):
        read_exposure(path, saturation_grow=-1)


def test_saturate_keyword_and_override(tmp_path: Path) -> None:
    rng = np.random.default_rng(107)
    data = rng.uniform(0.0, 1000.0, size=(12, 12))
    path = write_plain(tmp_path / "sat.fits", data, SATURATE=800.0)
    exact = {"saturation_grow": 0}
    assert np.array_equal(read_exposure(path, **exact).masked("SAT"), data >= 800.0)
    assert np.array_equal(read_exposure(path, saturation=900.0, **exact).masked("SAT"),
                          data >= 900.0)
    assert not read_exposure(path, saturation=math.inf).masked("SAT").any()
    assert read_exposure(path).metadata["SATURATE"] == 800.0


def test_nan_pixels_become_no_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(108)
    data = rng.normal(50.0, 3.0, size=(40, 40)).astype(np.float32)
    data[5, 6] = np.nan
    data[7, :] = np.inf
    exposure = read_exposure(write_plain(tmp_path / "nan.fits", data))
    bad = ~np.isfinite(data)
    assert np.array_equal(exposure.masked("NO_DATA"), bad)
    assert np.all(exposure.image[bad] == 0.0)
    assert np.all(np.isfinite(exposure.variance))
    np.testing.assert_array_equal(exposure.image[~bad], data[~bad])


def test_blank_integer_pixels_become_no_data(tmp_path: Path) -> None:
    data = np.arange(20, dtype=np.int16).reshape(4, 5)
    data[1, 1] = -999
    path = write_plain(tmp_path / "blank.fits", data, BLANK=-999)
    exposure = read_exposure(path)
    assert exposure.masked("NO_DATA")[1, 1] and exposure.masked("NO_DATA").sum() == 1


def test_estimated_variance_from_sky_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(109)
    sigma = 5.0
    data = rng.normal(200.0, sigma, size=(128, 128))
    exposure = read_exposure(write_plain(tmp_path / "sky.fits", data))
    # robust σ of N = 16384 pixels: relative std error of σ² ≈ 2·1.17/sqrt(N) ≈ 1.8 %.
    assert np.median(exposure.variance) == pytest.approx(sigma**2, rel=0.08)


def test_estimated_variance_with_gain_and_read_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(110)
    gain, read_noise, sky = 2.0, 6.0, 1000.0
    electrons = rng.poisson(sky * gain, size=(128, 128)).astype(float)
    electrons[60:63, 60:63] += rng.poisson(50000.0, size=(3, 3))
    data = (electrons + rng.normal(0.0, read_noise, electrons.shape)) / gain
    path = write_plain(tmp_path / "gain.fits", data, GAIN=gain, RDNOISE=read_noise)
    exposure = read_exposure(path)
    expected_sky = sky / gain + (read_noise / gain) ** 2
    assert np.median(exposure.variance) == pytest.approx(expected_sky, rel=0.08)
    # Photon noise of the source above the sky, from the header gain.
    excess = exposure.variance[61, 61] - np.median(exposure.variance)
    assert excess == pytest.approx((data[61, 61] - np.median(data)) / gain, rel=0.05)
    # An explicit gain overrides the header.
    other = read_exposure(path, gain=2 * gain, read_noise=read_noise)
    assert other.variance[61, 61] - np.median(other.variance) == pytest.approx(excess / 2,
                                                                               rel=0.05)


def test_header_metadata_and_visit_info(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "meta.fits", np.ones((4, 4)), FILTER="g ", EXPTIME=60.0,
                       DATE_OBS="2015-12-27T06:26:24", AIRMASS=1.3, OBJECT="eso085")
    exposure = read_exposure(path)
    assert exposure.filter == "g"
    assert exposure.visit_info == VisitInfo(date=Time("2015-12-27T06:26:24", scale="utc"),
                                            exposure_time=60.0, airmass=1.3)
    assert list(exposure.metadata) == ["OBJECT"]
    assert exposure.origin == (0, 0)


def test_mjd_obs_date(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "mjd.fits", np.ones((3, 3)), MJD_OBS=59885.5765909287)
    date = read_exposure(path).visit_info.date
    assert date.mjd == pytest.approx(59885.5765909287, abs=1e-9)


@pytest.mark.parametrize("as_path", [True, False], ids=["path", "array"])
def test_companions(tmp_path: Path, as_path: bool) -> None:
    rng = np.random.default_rng(111)
    shape = (10, 12)
    data = rng.normal(10.0, 1.0, shape)
    image_path = write_plain(tmp_path / "img.fits", data)
    variance = rng.uniform(1.0, 2.0, shape)
    weight = 1.0 / variance
    weight[2, 3] = 0.0
    weight[4, 5] = -1.0
    sigma = np.sqrt(variance)
    mask = np.zeros(shape, dtype=np.int32)
    mask[6, 7] = 8
    psf_image = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])

    def companion(name: str, array: np.ndarray) -> Any:
        if not as_path:
            return array
        return write_plain(tmp_path / f"{name}.fits", array)

    from_var = read_exposure(image_path, variance=companion("var", variance),
                             mask=companion("mask", mask), psf=companion("psf", psf_image))
    np.testing.assert_allclose(from_var.variance, variance.astype(np.float32))
    assert np.array_equal(from_var.masked("BAD"), mask != 0)
    np.testing.assert_allclose(from_var.psf.image, psf_image / 16.0)

    from_weight = read_exposure(image_path, weight=companion("weight", weight))
    unusable = weight <= 0
    assert np.array_equal(from_weight.masked("NO_DATA"), unusable)
    np.testing.assert_allclose(from_weight.variance[~unusable], variance[~unusable], rtol=1e-6)
    assert np.all(from_weight.variance[unusable] == np.median(from_weight.variance[~unusable]))
    # Pixels without a weight keep their image value (only non-finite pixels become 0).
    np.testing.assert_array_equal(from_weight.image, data.astype(np.float32))

    from_sigma = read_exposure(image_path, sigma=companion("sigma", sigma))
    np.testing.assert_allclose(from_sigma.variance, variance, rtol=1e-6)


def test_psf_companion_object_and_extname_matching(tmp_path: Path) -> None:
    shape = (5, 6)
    primary = fits.PrimaryHDU()
    fits.HDUList([primary, fits.ImageHDU(np.ones(shape), name="CCD1"),
                  fits.ImageHDU(np.full(shape, 3.0), name="CCD2")]).writeto(tmp_path / "i.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.full(shape, 0.5), name="CCD1"),
                  fits.ImageHDU(np.full(shape, 0.25), name="CCD2")]).writeto(tmp_path / "w.fits")
    exposure = read_exposure(tmp_path / "i.fits", hdu="CCD2", weight=tmp_path / "w.fits",
                             psf=GaussianPsf(1.0))
    np.testing.assert_array_equal(exposure.image, 3.0)
    np.testing.assert_array_equal(exposure.variance, 4.0)  # weight of CCD2, not CCD1
    assert exposure.psf == GaussianPsf(1.0)
    assert read_exposure(tmp_path / "i.fits", hdu=2).image[0, 0] == 3.0
    assert read_exposure(tmp_path / "i.fits").image[0, 0] == 1.0  # first 2-D HDU


def test_companions_on_a_mef_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(112)
    exposure = full_exposure(rng, psf=GaussianPsf(1.0))
    write_exposure(exposure, tmp_path / "m.fits")
    extra = np.zeros(exposure.shape, dtype=bool)
    extra[0, 0] = True
    read = read_exposure(tmp_path / "m.fits", variance=np.full(exposure.shape, 9.0),
                         mask=extra, psf=np.ones((3, 3)))
    np.testing.assert_array_equal(read.variance, 9.0)
    assert read.masked("BAD")[0, 0]
    assert np.array_equal(read.mask & ~np.uint32(1), exposure.mask & ~np.uint32(1))
    assert isinstance(read.psf, ImagePsf)


def test_reading_never_modifies_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(113)
    data = rng.integers(0, 65535, size=(8, 9), dtype=np.uint16)
    image = write_plain(tmp_path / "i.fits", data, SATURATE=30000)
    weight = write_plain(tmp_path / "w.fits", rng.uniform(0.0, 1.0, (8, 9)))
    weight_array = rng.uniform(0.5, 1.0, (8, 9))
    weight_copy = weight_array.copy()
    before = {path: sha256(path) for path in (image, weight)}
    read_exposure(image, weight=weight, mask=weight)
    read_exposure(image, weight=weight_array)
    assert {path: sha256(path) for path in (image, weight)} == before
    np.testing.assert_array_equal(weight_array, weight_copy)


# ------------------------------------------------------------------------------------------
# atomic writes and overwriting


def _failing_writeto(self: fits.HDUList, fileobj: Any, *args: Any, **kwargs: Any) -> None:
    Path(fileobj).write_bytes(b"SIMPLE  =                    T" + b" " * 100)  # partial
    msg = "disk full"
    raise OSError(msg)


def test_failed_write_leaves_no_partial_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    exposure = Exposure(np.ones((4, 4)), variance=np.ones((4, 4)))
    monkeypatch.setattr(fits.HDUList, "writeto", _failing_writeto)
    with pytest.raises(OSError, match="disk full"):
        write_exposure(exposure, tmp_path / "new.fits")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_original(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    original = Exposure(np.ones((4, 4)), variance=np.ones((4, 4)), filter="r")
    path = tmp_path / "exp.fits"
    write_exposure(original, path)
    digest = sha256(path)
    monkeypatch.setattr(fits.HDUList, "writeto", _failing_writeto)
    with pytest.raises(OSError, match="disk full"):
        write_exposure(original.evolve(filter="i"), path, overwrite=True)
    monkeypatch.undo()
    assert sha256(path) == digest
    assert read_exposure(path) == original
    assert [p.name for p in tmp_path.iterdir()] == ["exp.fits"]


def test_overwrite_refused_then_allowed(tmp_path: Path) -> None:
    path = tmp_path / "exp.fits"
    first = Exposure(np.ones((3, 3)), variance=np.ones((3, 3)))
    write_exposure(first, path)
    second = first.evolve(image=np.full((3, 3), 2.0))
    with pytest.raises(InputError, match=r"exp\.fits exists; pass overwrite=True"):
        write_exposure(second, path)
    assert read_exposure(path) == first
    write_exposure(second, path, overwrite=True)
    assert read_exposure(path) == second


def test_refuses_to_write_onto_an_input(tmp_path: Path) -> None:
    source = write_plain(tmp_path / "sci.fits", np.ones((3, 3)))
    exposure = read_exposure(source)
    provenance = Provenance.collect(inputs=[source], plugins={})
    digest = sha256(source)
    with pytest.raises(InputError, match=r"refusing to write .*it is an input"):
        write_exposure(exposure, source, overwrite=True, provenance=provenance)
    link = tmp_path / "alias.fits"
    link.symlink_to(source)
    with pytest.raises(InputError, match="refusing to write"):
        write_exposure(exposure, link, overwrite=True, provenance=provenance)
    assert sha256(source) == digest


# ------------------------------------------------------------------------------------------
# errors


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing\.fits does not exist; check the path"):
        read_exposure(tmp_path / "missing.fits")
    with pytest.raises(InputError, match="is a directory"):
        read_exposure(tmp_path)
    with pytest.raises(InputError, match=r"directory .* does not exist; create it first"):
        write_exposure(Exposure(np.ones((2, 2)), variance=np.ones((2, 2))),
                       tmp_path / "no" / "such" / "dir.fits")


def test_not_fits_and_truncated_files(tmp_path: Path) -> None:
    text = tmp_path / "text.fits"
    text.write_text("hello\n" * 100)
    with pytest.raises(InputError, match="is not a readable FITS file"):
        read_exposure(text)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="is not a readable FITS file"):
        read_exposure(empty)
    good = write_plain(tmp_path / "good.fits", np.ones((50, 50)))
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(good.read_bytes()[:2880 + 1000])
    with pytest.raises(InputError, match=r"truncated or corrupt.*re-create or re-download"):
        read_exposure(truncated)
    half_header = tmp_path / "half.fits"
    half_header.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"half\.fits"):
        read_exposure(half_header)


def test_damaged_skydiff_file_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(Exposure(np.ones((30, 30)), variance=np.ones((30, 30))), path)
    with fits.open(path) as hdul:
        offset = hdul.fileinfo(1)["datLoc"]
    raw = bytearray(path.read_bytes())
    raw[offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="Checksum verification failed"):
        read_exposure(path)


def test_non_2d_data(tmp_path: Path) -> None:
    fits.PrimaryHDU(np.zeros((2, 3, 4))).writeto(tmp_path / "cube.fits")
    with pytest.raises(InputError, match=r"no 2-D image HDU \(0:PRIMARY\(3-D 2x3x4\)\)"):
        read_exposure(tmp_path / "cube.fits")
    fits.PrimaryHDU(np.zeros(5)).writeto(tmp_path / "line.fits")
    with pytest.raises(InputError, match="no 2-D image HDU"):
        read_exposure(tmp_path / "line.fits")
    fits.HDUList([fits.PrimaryHDU(np.zeros((2, 3, 4))),
                  fits.ImageHDU(np.ones((3, 3)), name="SCI")]).writeto(tmp_path / "two.fits")
    with pytest.raises(InputError, match=r"HDU 0 .* does not hold a 2-D image"):
        read_exposure(tmp_path / "two.fits", hdu=0)
    with pytest.raises(InputError, match="has no HDU 'NOPE'; available: 0:PRIMARY"):
        read_exposure(tmp_path / "two.fits", hdu="NOPE")
    with pytest.raises(InputError, match="has no HDU 7"):
        read_exposure(tmp_path / "two.fits", hdu=7)
    assert read_exposure(tmp_path / "two.fits").shape == (3, 3)


def test_all_nan_image(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "nan.fits", np.full((3, 3), np.nan))
    with pytest.raises(InputError, match="has no finite pixel"):
        read_exposure(path)


def test_companion_shape_mismatch_names_the_file(tmp_path: Path) -> None:
    image = write_plain(tmp_path / "img.fits", np.ones((10, 12)))
    weight = write_plain(tmp_path / "wht.fits", np.ones((10, 11)))
    with pytest.raises(InputError, match=r"weight map .*wht\.fits has shape \(10, 11\) but the "
                                         r"image .*img\.fits has shape \(10, 12\)"):
        read_exposure(image, weight=weight)
    with pytest.raises(InputError, match=r"variance map array has shape \(3, 3\)"):
        read_exposure(image, variance=np.ones((3, 3)))
    with pytest.raises(InputError, match="mask array has 3 dimensions"):
        read_exposure(image, mask=np.ones((2, 10, 12)))
    with pytest.raises(InputError, match=r"sigma map .*nothere\.fits does not exist"):
        read_exposure(image, sigma=tmp_path / "nothere.fits")


def test_a_few_negative_noise_values_become_unusable_pixels(tmp_path: Path) -> None:
    # Real noise maps (e.g. the JWST pair in shared/data) carry the odd negative pixel.
    sigma = np.full((40, 40), 2.0)
    sigma[3, 5] = -1e-5
    exposure = read_exposure(write_plain(tmp_path / "img.fits", np.ones((40, 40))), sigma=sigma)
    flagged = exposure.masked("NO_DATA", "BAD")
    assert flagged[3, 5]
    assert np.count_nonzero(flagged) == 1
    assert np.all(exposure.variance[~flagged] == 4.0)


def test_companion_value_errors(tmp_path: Path) -> None:
    image = write_plain(tmp_path / "img.fits", np.ones((4, 4)))
    with pytest.raises(InputError, match="pass only one of variance=, weight=, sigma="):
        read_exposure(image, variance=np.ones((4, 4)), weight=np.ones((4, 4)))
    with pytest.raises(InputError, match="variance map array has 16 negative values"):
        read_exposure(image, variance=-np.ones((4, 4)))
    with pytest.raises(InputError, match="sigma map array has 16 negative values"):
        read_exposure(image, sigma=-np.ones((4, 4)))
    with pytest.raises(InputError, match="not numbers"):
        read_exposure(image, weight=np.full((4, 4), "a"))
    with pytest.raises(InputError, match=r"PSF image array .* odd size"):
        read_exposure(image, psf=np.ones((4, 4)))
    even = write_plain(tmp_path / "psf.fits", np.ones((6, 6)))
    with pytest.raises(InputError, match=r"PSF image .*psf\.fits for .*img\.fits is unusable"):
        read_exposure(image, psf=even)


def test_damaged_mef_content(tmp_path: Path) -> None:
    path = tmp_path / "m.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 4)), name="IMAGE"),
                  fits.ImageHDU(np.zeros((4, 5), dtype=np.int32), name="MASK")]).writeto(path)
    with pytest.raises(InputError, match=r"MASK HDU has shape \(4, 5\), the IMAGE \(4, 4\)"):
        read_exposure(path)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 4)), name="IMAGE"),
                  fits.ImageHDU(np.full((4, 4), 1 << 20, dtype=np.int32), name="MASK"),
                  ]).writeto(path, overwrite=True)
    with pytest.raises(InputError, match="does not make a valid exposure: mask uses bits"):
        read_exposure(path)
    psf = fits.ImageHDU(np.ones((3, 3)), name="PSF")
    psf.header["PSFTYPE"] = "zernike"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 4)), name="IMAGE"),
                  fits.ImageHDU(np.ones((4, 4), dtype=np.float32), name="VARIANCE"),
                  psf]).writeto(path, overwrite=True)
    with pytest.raises(InputError, match="unknown PSFTYPE 'zernike'"):
        read_exposure(path)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 4)), name="IMAGE"),
                  fits.ImageHDU(-np.ones((4, 4), dtype=np.float32), name="VARIANCE"),
                  ]).writeto(path, overwrite=True)
    with pytest.raises(InputError, match="VARIANCE HDU has negative values"):
        read_exposure(path)


def test_unwritable_values(tmp_path: Path) -> None:
    exposure = Exposure(np.ones((2, 2)), variance=np.ones((2, 2)), filter="rÅ")
    with pytest.raises(InputError, match="not ASCII"):
        write_exposure(exposure, tmp_path / "x.fits")
    assert not (tmp_path / "x.fits").exists()


def test_ltv_must_be_whole_pixels(tmp_path: Path) -> None:
    image = fits.ImageHDU(np.ones((3, 3), dtype=np.float32), name="IMAGE")
    image.header["LTV1"] = 0.5
    fits.HDUList([fits.PrimaryHDU(), image,
                  fits.ImageHDU(np.ones((3, 3), dtype=np.float32), name="VARIANCE")]
                 ).writeto(tmp_path / "ltv.fits")
    with pytest.raises(InputError, match=r"LTV1=0\.5 is not a whole number of pixels"):
        read_exposure(tmp_path / "ltv.fits")


def test_non_standard_header_cards_are_repaired_not_fatal(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "odd.fits", np.ones((3, 3)), OBJECT="x")
    raw = bytearray(path.read_bytes())
    index = raw.index(b"OBJECT  =")
    raw[index:index + 80] = b"BADVAL  = 12.3.4 / not a number".ljust(80)
    path.write_bytes(bytes(raw))
    before = sha256(path)
    exposure = read_exposure(path)
    assert exposure.metadata["BADVAL"] == "12.3.4"
    assert sha256(path) == before


def test_gzip_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(114)
    exposure = full_exposure(rng, psf=GaussianPsf(1.2))
    path = tmp_path / "exp.fits.gz"
    write_exposure(exposure, path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed
    assert_identical(read_exposure(path), exposure)
    plain = tmp_path / "plain.fits.gz"
    fits.PrimaryHDU(np.arange(6.0).reshape(2, 3)).writeto(plain)
    np.testing.assert_array_equal(Exposure.read(plain).image, np.arange(6.0).reshape(2, 3))


def test_path_types(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "p.fits", np.ones((2, 3)))
    assert read_exposure(os.fspath(path)).shape == (2, 3)
    assert read_exposure(path).shape == (2, 3)
