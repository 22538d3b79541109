"""Reading the real image pairs of ../shared/data (skipped when the data are absent)."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage

from skydiff.errors import InputError
from skydiff.exposure import Exposure
from skydiff.io import read_exposure
from skydiff.psf import PolynomialPsf

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = pytest.mark.data


def data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_sha256(path: Path) -> str:
    """The checksum the data set's MANIFEST.txt records for ``path``."""
    for line in (path.parent / "MANIFEST.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == f"./{path.name}":
            return parts[1]
    pytest.fail(f"{path.name} is not listed in MANIFEST.txt")


def raw_data(path: Path, hdu: int = 0) -> np.ndarray:
    with fits.open(path) as hdul:
        return np.array(hdul[hdu].data)


# ------------------------------------------------------------------------------------------
# TOROS: uint16 with BZERO, saturation at 65535, no WCS


TOROS = "toros_eso085_030_1min/aligned_eso085-030-004.fits"


def test_toros_uint16_values_exact_and_saturation() -> None:
    path = data_file(TOROS)
    raw = raw_data(path)
    assert raw.dtype == np.uint16
    exposure = read_exposure(path, saturation_grow=0)
    np.testing.assert_array_equal(exposure.image, raw.astype(np.float32))
    saturated = raw == 65535
    assert saturated.sum() > 0
    assert np.array_equal(exposure.masked("SAT"), saturated)
    exact = {"saturation_grow": 0}
    assert np.array_equal(read_exposure(path, saturation=65535, **exact).masked("SAT"), saturated)
    level = 50000
    assert np.array_equal(read_exposure(path, saturation=level, **exact).masked("SAT"),
                          raw >= level)
    # The default grows saturated regions by one pixel.
    grown = ndimage.maximum_filter(saturated, size=3, mode="constant")
    assert np.array_equal(read_exposure(path).masked("SAT"), grown)
    assert exposure.wcs is None
    assert exposure.filter == "Clear"
    assert exposure.visit_info.exposure_time == 60.0
    assert exposure.visit_info.date.isot == "2015-12-27T06:26:24.000"
    assert np.all(np.isfinite(exposure.variance)) and np.all(exposure.variance > 0)


# ------------------------------------------------------------------------------------------
# JWST NIRCam: NaNs, sigma map, 205x205 WebbPSF model


JWST = "jwst_nircam_a2744_f200w/"
JWST_TEMPLATE = JWST + "template_jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits"


def test_jwst_nans_sigma_and_psf() -> None:
    image_path = data_file(JWST_TEMPLATE)
    sigma_path = data_file(JWST + "template_noise_sigma.fits")
    psf_path = data_file(JWST + "template_psf_webbpsf.fits")
    raw = raw_data(image_path)
    sigma = raw_data(sigma_path).astype(np.float64)
    psf_raw = raw_data(psf_path).astype(np.float64)
    exposure = read_exposure(image_path, sigma=sigma_path, psf=psf_path)

    nan = np.isnan(raw)
    assert nan.sum() == 5
    assert np.array_equal(exposure.masked("NO_DATA"), nan)
    assert np.all(exposure.image[nan] == 0.0)
    np.testing.assert_array_equal(exposure.image[~nan], raw[~nan])

    np.testing.assert_allclose(exposure.variance[~nan], (sigma**2)[~nan], rtol=1e-6)
    assert np.all(np.isfinite(exposure.variance))

    assert exposure.psf.image.shape == (205, 205)
    assert exposure.psf.image.sum() == pytest.approx(1.0, abs=1e-12)
    assert psf_raw.sum() == pytest.approx(0.98, abs=0.01)  # the file itself is not normalised
    np.testing.assert_allclose(exposure.psf.image, psf_raw / psf_raw.sum(), rtol=1e-12)

    assert exposure.filter == "F200W"
    assert exposure.visit_info.date.mjd == pytest.approx(59759.41449846442, abs=1e-9)
    center = exposure.wcs.pixel_to_world_values(449.5, 449.5)
    assert center == pytest.approx((3.52727, -30.36498), abs=2e-4)


# ------------------------------------------------------------------------------------------
# DECam: GAIN, RDNOISE, SATURATE headers; variance estimated from them and the sky


DECAM = "decam_i_256_seeing/"


def _source_free(image: np.ndarray) -> np.ndarray:
    """Pixels away from sources: the smoothed image below median + 3σ, grown by 5 px."""
    smooth = ndimage.gaussian_filter(image.astype(np.float64), 2.0)
    _, median, std = sigma_clipped_stats(smooth)
    return ~ndimage.binary_dilation(smooth > median + 3.0 * std, iterations=5)


@pytest.mark.parametrize("name", ["science_stack_DEC-OBS04.fits", "template_stack_DEC-OBS18.fits",
                                  "frames/science_DEC-OBS04a.mini.fits",
                                  "frames/template_DEC-OBS18a.mini.fits"])
def test_decam_estimated_variance_matches_sky_noise(name: str) -> None:
    path = data_file(DECAM + name)
    exposure = read_exposure(path)
    free = _source_free(exposure.image)
    assert free.mean() > 0.5
    _, _, sky_sigma = sigma_clipped_stats(exposure.image, mask=~free, sigma=3.0)
    assert np.median(exposure.variance[free]) == pytest.approx(sky_sigma**2, rel=0.15)


def test_decam_gain_read_noise_and_saturate_headers(tmp_path: Path) -> None:
    path = data_file(DECAM + "frames/science_DEC-OBS04a.mini.fits")
    header = fits.getheader(path)
    gain, read_noise, level = header["GAIN"], header["RDNOISE"], header["SATURATE"]
    image = raw_data(path).astype(np.float64)
    exposure = read_exposure(path)
    # GAIN: the variance of a star exceeds the sky's by its photon noise, counts / gain.
    peak = np.unravel_index(np.argmax(image), image.shape)
    sky_variance = np.median(exposure.variance)
    excess = (image[peak] - np.median(np.maximum(image, 0.0))) / gain
    assert exposure.variance[peak] - sky_variance == pytest.approx(excess, rel=1e-3)
    assert excess > 2 * sky_variance
    # SATURATE: nothing in this cut-out reaches it ...
    assert image.max() < level and not exposure.masked("SAT").any()
    # ... and a lower SATURATE in the header flags exactly the pixels at or above it.
    copy = tmp_path / "lowsat.fits"
    shutil.copyfile(path, copy)
    with fits.open(copy, mode="update") as hdul:
        hdul[0].header["SATURATE"] = 5000.0
    assert np.array_equal(read_exposure(copy, saturation_grow=0).masked("SAT"), image >= 5000.0)
    # RDNOISE: the read-noise floor (RDNOISE/GAIN)^2 bounds the sky variance from below.
    with fits.open(copy, mode="update") as hdul:
        hdul[0].header["RDNOISE"] = 40.0 * read_noise
    floored = read_exposure(copy)
    assert np.median(floored.variance) == pytest.approx((40.0 * read_noise / gain) ** 2,
                                                        rel=1e-5)


# ------------------------------------------------------------------------------------------
# legacypipe: weight, data-quality mask, PSFEx model, WCS


LEGACY = "decam_legacypipe_tiny/"
LEGACY_EPOCHS = ["c4d_140818_232043_{}_z_ls9.N12.fits", "c4d_150412_073257_{}_z_ls9.N11.fits",
                 "c4d_180218_090701_{}_z_ls9.N10.fits"]


@pytest.mark.parametrize("pattern", LEGACY_EPOCHS)
def test_legacypipe_weight_mask_wcs(pattern: str) -> None:
    image_path = data_file(LEGACY + pattern.format("ooi"))
    weight_path = data_file(LEGACY + pattern.format("oow"))
    mask_path = data_file(LEGACY + pattern.format("ood"))
    psf_path = data_file(LEGACY + pattern.format("ooi").replace(".N", "-N")
                         .replace(".fits", "-psfex.fits"))
    exposure = read_exposure(image_path, weight=weight_path, mask=mask_path, psf=psf_path)
    weight = raw_data(weight_path, 1).astype(np.float64)
    quality = raw_data(mask_path, 1)
    assert exposure.shape == (51, 41)
    np.testing.assert_allclose(exposure.variance, (1.0 / weight).astype(np.float32),
                               rtol=1e-7)
    assert np.array_equal(exposure.masked("BAD"), quality != 0)
    assert isinstance(exposure.psf, PolynomialPsf)
    assert exposure.psf.kernel_image().sum() == pytest.approx(1.0, abs=1e-12)
    # The WCS is the file's (TPV), evaluated identically.
    with fits.open(image_path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # RADECSYS is deprecated
        reference = WCS(hdul[1].header)
    rows, cols = np.mgrid[0:51:10, 0:41:10]
    np.testing.assert_allclose(exposure.wcs.pixel_to_world_values(cols, rows),
                               reference.pixel_to_world_values(cols, rows), rtol=0, atol=1e-10)
    center = exposure.wcs.pixel_to_world_values(20.0, 25.0)
    assert center == pytest.approx((244.7797, 12.0724), abs=1e-3)
    assert exposure.filter.startswith("z DECam")  # from the inherited primary header
    assert exposure.metadata["ZD"] > 0 and "CTYPE1" not in exposure.metadata
    assert exposure.visit_info.airmass > 1.0


def test_legacypipe_nonzero_quality_flags_are_bad(tmp_path: Path) -> None:
    image_path = data_file(LEGACY + LEGACY_EPOCHS[0].format("ooi"))
    mask_path = data_file(LEGACY + LEGACY_EPOCHS[0].format("ood"))
    copy = tmp_path / "ood.fits"
    shutil.copyfile(mask_path, copy)
    with fits.open(copy, mode="update") as hdul:
        hdul[1].data[3, 4] = 1
        hdul[1].data[10, 20] = 2048
    exposure = read_exposure(image_path, mask=copy)
    expected = np.zeros((51, 41), dtype=bool)
    expected[3, 4] = expected[10, 20] = True
    assert np.array_equal(exposure.masked("BAD"), expected)


def test_legacypipe_weight_of_the_wrong_shape() -> None:
    image_path = data_file(LEGACY + LEGACY_EPOCHS[0].format("ooi"))
    jwst_sigma = data_file(JWST + "template_noise_sigma.fits")
    with pytest.raises(InputError, match=r"weight map .*template_noise_sigma\.fits has shape "
                                        r"\(900, 900\) but the image .* \(51, 41\)"):
        read_exposure(image_path, weight=jwst_sigma)


# ------------------------------------------------------------------------------------------
# inputs untouched; round trip of real exposures


def test_reading_leaves_the_files_unchanged(tmp_path: Path) -> None:
    paths = [data_file(TOROS), data_file(JWST_TEMPLATE),
             data_file(JWST + "template_noise_sigma.fits"),
             data_file(JWST + "template_psf_webbpsf.fits"),
             data_file(DECAM + "science_stack_DEC-OBS04.fits"),
             data_file(LEGACY + LEGACY_EPOCHS[0].format("ooi")),
             data_file(LEGACY + LEGACY_EPOCHS[0].format("oow")),
             data_file(LEGACY + LEGACY_EPOCHS[0].format("ood"))]
    before = {path: sha256(path) for path in paths}
    assert all(before[path] == manifest_sha256(path) for path in paths)
    read_exposure(paths[0], saturation=60000)
    read_exposure(paths[1], sigma=paths[2], psf=paths[3])
    read_exposure(paths[4])
    read_exposure(paths[5], weight=paths[6], mask=paths[7])
    assert {path: sha256(path) for path in paths} == before


@pytest.mark.parametrize("relative", [TOROS, JWST_TEMPLATE, DECAM + "science_stack_DEC-OBS04.fits",
                                      LEGACY + LEGACY_EPOCHS[1].format("ooi")])
def test_real_exposures_survive_a_round_trip(tmp_path: Path, relative: str) -> None:
    exposure = Exposure.read(data_file(relative))
    exposure.write(tmp_path / "copy.fits")
    assert Exposure.read(tmp_path / "copy.fits") == exposure
