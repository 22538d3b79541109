"""Acceptance tests of ``skydiff.subtract`` (and ``skydiff subtract``) on the real pairs of
``../shared/data`` (issue 3, "Tests": real pairs).

Every statistic is defined once, next to its helper, and every tolerance is justified where it is
used. "Unmasked" always means: no mask bit at all set in the difference (``EDGE``, ``NO_DATA``,
``SAT``, ``SAT_TEMPLATE``, ``BAD``, ...), finite, positive variance; ``z = D / sqrt(V)`` with
``D`` and ``V`` the image and variance planes of the (decorrelated) difference.

Measured when written (2 cores; default configuration unless stated; ours vs upstream/limit):

* JWST, std(z) over |z| < 5: 0.996 with the WebbPSF PSFs and noise maps (SFFT: 1.207,
  limit 1.15); 1.061 with ``do_scale_variance = false``; 1.016 without companions.
* DECam stacks (``header-gain`` / ``no-gain-keywords``): rms(z) within 1 FWHM of each used
  kernel star at most 1.06 / 1.21 (raw difference: 1.19 / 1.67; limit 3); kernel sum
  1.0208 / 1.0328 (upstream 1.0333 ± 0.02); robust sigma of the raw difference 9.50 / 9.22
  (upstream 9.21 on the same pixels, 9.30 on all; limit ± 10 %), decorrelated 18.7 / 18.5
  (upstream 20.3; limit + 5 %).
* TOROS 004-005: robust std(z) 0.972 (1 ± 0.10); sky pixels: 0 beyond 5 sigma (limit 5), 25
  beyond 4 sigma (Gaussian 34, limit 68); all pixels: 0.070 % beyond 5 sigma (allowance 0.21 %
  for 154 hot pixels).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

import skydiff
from skydiff.io import read_exposure, read_provenance

pytestmark = pytest.mark.data

# The bar for JWST: std of D/sqrt(V) over pixels with |z| < 5.
JWST_STD_LIMIT = 1.15


# ------------------------------------------------------------------------------------------
# statistics


def normalized(exposure: skydiff.Exposure) -> tuple[np.ndarray, np.ndarray]:
    """``(z, good)``: D/sqrt(V) and the unmasked pixels (no mask bit, finite, V > 0)."""
    image = np.asarray(exposure.image, dtype=np.float64)
    variance = np.asarray(exposure.variance, dtype=np.float64)
    good = ~exposure.masked() & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    z = np.zeros(exposure.shape)
    z[good] = image[good] / np.sqrt(variance[good])
    return z, good


def std_inside(values: np.ndarray, limit: float = 5.0) -> float:
    """Standard deviation of the values with |value| < ``limit`` (the issue's statistic)."""
    return float(np.std(values[np.abs(values) < limit]))


def config(*overrides: str) -> skydiff.PipelineConfig:
    pipeline = skydiff.PipelineConfig()
    pipeline.apply_overrides(list(overrides))
    return pipeline


def tail_probability(k: float) -> float:
    """P(|x| > k) for a standard normal variable."""
    return math.erfc(k / math.sqrt(2.0))


def star_rms(z: np.ndarray, good: np.ndarray, x: float, y: float, radius: float) -> float:
    """rms of ``z`` over the unmasked pixels within ``radius`` of (x, y) (0-based column,
    row); NaN when more than 10 % of them are masked (a mask must not hide a residual)."""
    rows, cols = np.ogrid[:z.shape[0], :z.shape[1]]
    inside = np.hypot(cols - x, rows - y) <= radius
    if good[inside].mean() < 0.9:
        return float("nan")
    return float(np.sqrt(np.mean(z[inside & good] ** 2)))


# ------------------------------------------------------------------------------------------
# JWST NIRCam F200W, Abell 2744 (given WebbPSF PSFs and 1-sigma noise maps)


@pytest.fixture(scope="module")
def sfft_std(jwst_files: SimpleNamespace) -> float:
    """The issue's statistic on the published SFFT decorrelated SNR map.

    Upstream writes exactly 0 where it masked (39 116 pixels, 4.8 %); those are left out, as
    our masked pixels are. This gives 1.207, the README's "1.21" (with the zeros: 1.178).
    """
    snr = fits.getdata(jwst_files.sfft_snr).astype(np.float64)
    return std_inside(snr[np.isfinite(snr) & (snr != 0)])


@pytest.fixture(scope="module")
def jwst_given(jwst_files: SimpleNamespace) -> tuple[skydiff.Exposure, skydiff.Exposure]:
    """The pair read with the WebbPSF PSFs and the noise maps as ``sigma=`` companions."""
    f = jwst_files
    science = read_exposure(f.science, sigma=f.science_sigma, psf=f.science_psf)
    template = read_exposure(f.template, sigma=f.template_sigma, psf=f.template_psf)
    return science, template


@pytest.fixture(scope="module")
def jwst_bare(jwst_files: SimpleNamespace) -> tuple[skydiff.Exposure, skydiff.Exposure]:
    """The same pair read without companions: variance from the sky noise, PSF estimated."""
    return read_exposure(jwst_files.science), read_exposure(jwst_files.template)


@pytest.fixture(scope="module")
def jwst_given_result(jwst_given: tuple[skydiff.Exposure, skydiff.Exposure]
                      ) -> skydiff.SubtractionResult:
    return skydiff.subtract(*jwst_given)


@pytest.fixture(scope="module")
def jwst_bare_result(jwst_bare: tuple[skydiff.Exposure, skydiff.Exposure]
                     ) -> skydiff.SubtractionResult:
    return skydiff.subtract(*jwst_bare)


def test_sfft_reference_statistic_matches_the_readme(sfft_std: float) -> None:
    # Guards the definition of the statistic we compare against: README "std ... = 1.21".
    assert sfft_std == pytest.approx(1.21, abs=0.01)


def test_jwst_given_psf_and_noise_beats_sfft(jwst_given_result, jwst_given, sfft_std,
                                             jwst_files, record_property) -> None:
    result = jwst_given_result
    meta = result.metadata
    assert (meta["science_psf"], meta["template_psf"]) == ("given", "given")
    z, good = normalized(result.difference)
    ours = std_inside(z[good])
    record_property("jwst_std_given_default", ours)
    record_property("jwst_std_sfft", sfft_std)
    assert ours <= JWST_STD_LIMIT
    assert ours < sfft_std
    # The pixels the noise analysis uses must be most of the field (the kernel border, NaNs
    # and their kernel footprints are masked): at least 90 % of 900x900.
    assert good.mean() >= 0.90
    # The 5 NaN pixels of the template are NO_DATA in the difference, never finite garbage.
    nan_template = ~np.isfinite(fits.getdata(jwst_files.template))
    assert nan_template.sum() == 5
    assert result.difference.masked("NO_DATA")[nan_template].all()
    # Tails: upstream has 0.05 % of its pixels beyond 5 sigma (astrophysical changes plus
    # residuals); the same field subtracted by us may not be more than twice as bad.
    snr = fits.getdata(jwst_files.sfft_snr).astype(np.float64)
    valid = np.isfinite(snr) & (snr != 0)
    sfft_tail = float(np.mean(np.abs(snr[valid]) > 5))
    ours_tail = float(np.mean(np.abs(z[good]) > 5))
    record_property("jwst_tail5_given", ours_tail)
    assert ours_tail <= 2 * sfft_tail


def test_jwst_given_without_variance_rescaling(jwst_given, jwst_given_result, sfft_std,
                                               record_property) -> None:
    # doScaleVariance off: the noise maps are used as they are. The WebbPSF/i2d noise maps
    # underestimate the pixel noise of the drizzled images (the default rescaling measures a
    # factor ~1.13 in variance), so the statistic rises, but must still meet the bar.
    result = skydiff.subtract(*jwst_given, config("subtract.al.do_scale_variance=false"))
    meta = result.metadata
    assert meta["variance_scale_science"] == meta["variance_scale_template"] == 1.0
    default = jwst_given_result.metadata
    assert default["variance_scale_science"] != 1.0  # the default did rescale
    z, good = normalized(result.difference)
    ours = std_inside(z[good])
    record_property("jwst_std_given_no_rescaling", ours)
    assert ours <= JWST_STD_LIMIT
    assert ours < sfft_std


def test_jwst_without_companions_meets_the_same_bar(jwst_bare_result, jwst_bare, jwst_files,
                                                    sfft_std, record_property) -> None:
    result = jwst_bare_result
    meta = result.metadata
    assert meta["science_psf"].startswith("estimated:")
    assert meta["template_psf"].startswith("estimated:")
    z, good = normalized(result.difference)
    ours = std_inside(z[good])
    record_property("jwst_std_no_companions", ours)
    assert ours <= JWST_STD_LIMIT
    assert ours < sfft_std
    # The variance estimated from the sky noise agrees with the published noise map where the
    # sky dominates: medians within 10 % (measured: 1.5 %).
    science, _ = jwst_bare
    sigma = fits.getdata(jwst_files.science_sigma).astype(np.float64)
    published = float(np.nanmedian(sigma[sigma > 0] ** 2))
    assert float(np.median(science.variance)) == pytest.approx(published, rel=0.10)


def test_jwst_estimated_psf_has_the_stellar_width(jwst_bare, jwst_files) -> None:
    # The PSF FWHMs drive the AL basis (issue, item 6). WebbPSF gives 2.03 / 2.01 px; the
    # drizzled i2d images are a little broader, so accept up to 50 % more (and 30 % less).
    estimator = skydiff.get_registries().psf_estimator.get("empirical").target()
    for exposure, psf_file in zip(jwst_bare, (jwst_files.science_psf, jwst_files.template_psf),
                                  strict=True):
        webbpsf = skydiff.psf_fwhm_from_image(fits.getdata(psf_file).astype(np.float64))
        psf = estimator.run(exposure).psf
        ny, nx = exposure.shape
        for x, y in ((nx / 2, ny / 2), (0.05 * nx, 0.05 * ny), (0.95 * nx, 0.95 * ny)):
            assert 0.7 * webbpsf <= psf.fwhm(x, y) <= 1.5 * webbpsf


def test_jwst_without_companions_nor_variance_rescaling(jwst_bare, sfft_std,
                                                        record_property) -> None:
    result = skydiff.subtract(*jwst_bare, config("subtract.al.do_scale_variance=false"))
    z, good = normalized(result.difference)
    ours = std_inside(z[good])
    record_property("jwst_std_no_companions_no_rescaling", ours)
    assert ours <= JWST_STD_LIMIT
    assert ours < sfft_std


def test_jwst_cli_with_companions_leaves_inputs_unchanged(jwst_files, jwst_given_result, cli,
                                                          tmp_path, sha256,
                                                          manifest_sha256) -> None:
    f = jwst_files
    inputs = [f.science, f.template, f.science_psf, f.template_psf, f.science_sigma,
              f.template_sigma]
    before = {path: sha256(path) for path in inputs}
    assert all(before[path] == manifest_sha256(path) for path in inputs)
    output = tmp_path / "diff.fits"
    run = cli("subtract", f.science, f.template, "-o", output,
              "--science-psf", f.science_psf, "--template-psf", f.template_psf,
              "--science-sigma", f.science_sigma, "--template-sigma", f.template_sigma, "-q")
    assert run.code == 0, run.err
    assert {path: sha256(path) for path in inputs} == before
    # The command line computes what the API computes on the same inputs.
    written = read_exposure(output)
    expected = jwst_given_result.difference
    np.testing.assert_array_equal(written.mask, expected.mask)
    np.testing.assert_allclose(written.image, expected.image, rtol=0, atol=1e-6 * float(
        np.sqrt(np.median(expected.variance))))
    z, good = normalized(written)
    assert std_inside(z[good]) <= JWST_STD_LIMIT
    recorded = dict(read_provenance(output).inputs)
    assert recorded[str(f.science.resolve())] == before[f.science]
    assert recorded[str(f.template.resolve())] == before[f.template]


# ------------------------------------------------------------------------------------------
# DECam i-band median stacks (template sharper)


def _strip_detector_keywords(source: Path, target: Path) -> Path:
    """Copy a plain FITS image without GAIN, RDNOISE and SATURATE (a stack that lacks them)."""
    with fits.open(source) as hdul:
        header = hdul[0].header.copy()
        data = np.array(hdul[0].data)
    for key in ("GAIN", "RDNOISE", "SATURATE"):
        header.remove(key, ignore_missing=True, remove_all=True)
    fits.PrimaryHDU(data, header).writeto(target)
    return target


@pytest.fixture(scope="module", params=["header-gain", "no-gain-keywords"])
def decam(request: pytest.FixtureRequest, decam_files: SimpleNamespace,
          tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The stacks as delivered (GAIN/RDNOISE/SATURATE copied from frame a: variance with a
    Poisson term) and stripped of those keywords (variance from the sky noise only). Neither
    has a PSF: both are estimated (``empirical``). ``auto`` mode chooses what to convolve."""
    f = decam_files
    science_path, template_path = f.science, f.template
    if request.param == "no-gain-keywords":
        folder = tmp_path_factory.mktemp("decam-no-gain")
        science_path = _strip_detector_keywords(f.science, folder / f.science.name)
        template_path = _strip_detector_keywords(f.template, folder / f.template.name)
    science, template = read_exposure(science_path), read_exposure(template_path)
    result = skydiff.subtract(science, template, config("subtract.al.mode=auto"))
    raw = skydiff.subtract(science, template, config("subtract.al.mode=auto",
                                                     "subtract.al.decorrelation.name=none"))
    return SimpleNamespace(variant=request.param, science=science, template=template,
                           result=result, raw=raw)


def test_decam_auto_mode_convolves_the_sharper_template(decam) -> None:
    meta = decam.result.metadata
    assert meta["mode"] == "convolveTemplate"
    assert meta["science_psf"].startswith("estimated:")
    # README: FWHM ~5.2 (science) and ~3.8 px (template), crude half-max-area estimates;
    # the estimated PSFs must agree within 10 % (measured 5.47 and 3.99 px).
    assert meta["fwhm_science"] == pytest.approx(5.2, rel=0.10)
    assert meta["fwhm_template"] == pytest.approx(3.8, rel=0.10)


def test_decam_residuals_at_kernel_stars_within_3_sigma(decam, record_property) -> None:
    # For every kernel star used, the rms of D/sqrt(V) within one science FWHM of it must be
    # at most 3 (the issue: "residual at kernel stars within 3x the noise"); both for the
    # decorrelated difference and for the raw one (D = S - k*T - b, V = V_S + k^2*V_T).
    radius = decam.result.metadata["fwhm_science"]
    for name, result in (("decorrelated", decam.result), ("raw", decam.raw)):
        stars = result.kernel_sources[np.asarray(result.kernel_sources["used"], dtype=bool)]
        assert len(stars) >= 6
        z, good = normalized(result.difference)
        rms = [star_rms(z, good, float(s["x"]), float(s["y"]), radius) for s in stars]
        record_property(f"decam_{decam.variant}_{name}_star_rms", [round(r, 3) for r in rms])
        assert all(value <= 3.0 for value in rms), (name, rms)  # NaN (masked) fails too


def test_decam_kernel_sum_matches_upstream(decam, decam_files, record_property) -> None:
    upstream = float(fits.getdata(decam_files.reference_kernel).sum())
    assert upstream == pytest.approx(1.033, abs=5e-4)
    ours = decam.result.metadata["kernel_sum"]
    record_property(f"decam_{decam.variant}_kernel_sum", ours)
    # Tolerance 0.02: aperture photometry of the two brightest isolated stars gives a
    # science/template ratio of 1.013-1.034 for apertures of 2-4 science FWHM (the 5.5-px
    # science PSF's curve of growth), so the photometric scale itself is known to about
    # ±1 %; the per-star kernel sums scatter by 0.06. 0.02 is twice the first.
    assert ours == pytest.approx(upstream, abs=0.02)
    # The kernel sum is the photometric scale, constant over the field.
    x0, y0 = decam.result.difference.origin
    ny, nx = decam.result.difference.shape
    for x, y in ((x0, y0), (x0 + nx - 1, y0 + ny - 1), (x0 + nx / 2, y0 + ny / 2)):
        assert float(decam.result.kernel.sum_at(x, y)) == pytest.approx(ours, rel=1e-6)


def test_decam_difference_noise_versus_upstream(decam, decam_files, record_property) -> None:
    # Robust sigma (1.4826 MAD) of the difference image over our unmasked pixels, in science
    # ADU, for our raw and decorrelated differences and upstream's (README: 9.3 and 20.3).
    _, good = normalized(decam.result.difference)
    upstream_raw = skydiff.robust_sigma(fits.getdata(decam_files.reference_difference)[good])
    upstream_dec = skydiff.robust_sigma(
        fits.getdata(decam_files.reference_decorrelated)[good])
    ours_raw = skydiff.robust_sigma(np.asarray(decam.raw.difference.image)[good])
    ours_dec = skydiff.robust_sigma(np.asarray(decam.result.difference.image)[good])
    record_property(f"decam_{decam.variant}_noise",
                    {"ours_raw": ours_raw, "upstream_raw": upstream_raw,
                     "ours_decorrelated": ours_dec, "upstream_decorrelated": upstream_dec})
    assert upstream_raw == pytest.approx(9.3, rel=0.03)
    assert upstream_dec == pytest.approx(20.3, rel=0.03)
    # Raw: both kernels match the same PSF pair, so the noise they let through from the
    # (correlated, stacked) template agrees to a few per cent; 10 % either way means a
    # different kernel. Decorrelated: not noisier than upstream (5 %: the robust sigma of
    # 60 000 pixels of correlated noise is uncertain by ~1 %, and the two variants estimate
    # the variance differently, which moves the kernel).
    assert ours_raw == pytest.approx(upstream_raw, rel=0.10)
    assert ours_dec <= 1.05 * upstream_dec
    # After decorrelation the noise is white with the variance of both inputs:
    # sigma_S^2 + k^2 sigma_T^2 (DMTN-021); and the variance plane says so (within 10 %).
    meta = decam.result.metadata
    dec = meta["decorrelation"]
    white = math.sqrt(dec["sigma2_science"] + meta["kernel_sum"] ** 2 * dec["sigma2_template"])
    assert ours_dec == pytest.approx(white, rel=0.10)
    z, good = normalized(decam.result.difference)
    assert skydiff.robust_sigma(z[good]) == pytest.approx(1.0, abs=0.10)


def test_decam_cli_leaves_inputs_unchanged(decam_files, cli, tmp_path, sha256,
                                           manifest_sha256) -> None:
    f = decam_files
    inputs = [f.science, f.template]
    before = {path: sha256(path) for path in inputs}
    assert all(before[path] == manifest_sha256(path) for path in inputs)
    output = tmp_path / "diff.fits"
    run = cli("subtract", f.science, f.template, "-o", output, "-c", "subtract.al.mode=auto",
              "-q")
    assert run.code == 0, run.err
    assert {path: sha256(path) for path in inputs} == before
    assert "kernel sum: " in run.out
    assert float(run.out.split("kernel sum: ")[1].split()[0]) == pytest.approx(1.033, abs=0.02)


# ------------------------------------------------------------------------------------------
# TOROS null test: raw uint16 frames 74 s apart, no WCS, saturation at 65535


def _input_spikes(image: np.ndarray) -> np.ndarray:
    """Single-pixel spikes (hot pixels, cosmic rays): local maxima more than 10 sky sigma
    above the sky whose four neighbours are below half of it. A star of the ~2.8-px PSF has
    neighbours at ~0.7 of its peak, so no star qualifies."""
    sky = float(np.median(image))
    above = image - sky
    cross = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    neighbours = ndimage.maximum_filter(image, footprint=cross) - sky
    return ((above > 10 * skydiff.robust_sigma(image)) & (neighbours < 0.5 * above)
            & (image == ndimage.maximum_filter(image, size=3)))


def _sources(image: np.ndarray) -> np.ndarray:
    """Pixels on or near sources: the image minus a 64-px median background, smoothed by a
    1-px Gaussian, above 3 robust sigma, grown by 4 px (1.5 FWHM)."""
    coarse = ndimage.median_filter(image[::4, ::4], size=16)
    background = ndimage.zoom(coarse, 4, order=1)[:image.shape[0], :image.shape[1]]
    smooth = ndimage.gaussian_filter(image - background, 1.0)
    return ndimage.binary_dilation(smooth > 3 * skydiff.robust_sigma(smooth), iterations=4)


@pytest.fixture(scope="module", params=[
    pytest.param(("frame_004", "frame_005"), id="004-005"),
    # 005/004 has near-equal FWHMs on the "deconvolution" side: narrow basis Gaussians whose
    # degenerate directions the al basis must drop (max_basis_condition).
    pytest.param(("frame_005", "frame_004"), id="005-004"),
])
def toros(request: pytest.FixtureRequest, toros_files: SimpleNamespace) -> SimpleNamespace:
    """The null test in both orders with the default configuration (a null test must not
    depend on which frame is called the science)."""
    science_path = getattr(toros_files, request.param[0])
    template_path = getattr(toros_files, request.param[1])
    science, template = read_exposure(science_path), read_exposure(template_path)
    raw = {}
    for key, path in (("science", science_path), ("template", template_path)):
        with fits.open(path) as hdul:
            raw[key] = np.array(hdul[0].data)
            assert hdul[0].header["BZERO"] == 32768
    result = skydiff.subtract(science, template)
    return SimpleNamespace(science=science, template=template, result=result,
                           raw_science=raw["science"], raw_template=raw["template"],
                           science_path=science_path, template_path=template_path)


def test_toros_null_difference_is_noise(toros, record_property) -> None:
    science, template, result = toros.science, toros.template, toros.result
    assert science.wcs is None and template.wcs is None
    assert toros.raw_science.dtype == np.uint16
    np.testing.assert_array_equal(science.image, toros.raw_science.astype(np.float32))
    # Two 60 s exposures 74 s apart: the photometric scale is 1 to the per cent (transparency).
    assert result.metadata["kernel_sum"] == pytest.approx(1.0, abs=0.03)

    z, good = normalized(result.difference)
    robust = skydiff.robust_sigma(z[good])
    record_property("toros_robust_sigma_z", robust)
    assert robust == pytest.approx(1.0, abs=0.10)

    # Sky pixels (away from every source of either frame, ~80 % of the field): pure noise.
    # Gaussian expectation for |z| > 5 is 0.3 pixels; allow 5 for cosmic rays that hit the
    # sky in one of the frames (the frames carry no CR mask). |z| > 4 must not exceed twice
    # its Gaussian expectation (measured 25 for 34 expected).
    sky = good & ~_sources(np.asarray(science.image, dtype=np.float64)) \
        & ~_sources(np.asarray(template.image, dtype=np.float64))
    assert sky.sum() >= 0.7 * good.sum()
    z_sky = z[sky]
    n5, n4 = int(np.sum(np.abs(z_sky) > 5)), int(np.sum(np.abs(z_sky) > 4))
    record_property("toros_sky_counts", {"n_sky": int(sky.sum()), "n_gt5": n5, "n_gt4": n4})
    assert np.std(z_sky) == pytest.approx(1.0, abs=0.10)
    assert n5 <= 5
    assert n4 <= 2 * sky.sum() * tail_probability(4.0)

    # All unmasked pixels: the frames have ~150 hot pixels at the same place in both (found
    # here as single-pixel spikes), which frame 004's resampling smeared with ringing, so each
    # leaves a residual over its 3x3 neighbourhood; no bad-pixel mask comes with the data.
    # The |z| > 5 fraction may exceed the Gaussian one by at most 9 pixels per spike.
    spikes = _input_spikes(np.asarray(science.image, dtype=np.float64)) \
        | _input_spikes(np.asarray(template.image, dtype=np.float64))
    fraction = float(np.mean(np.abs(z[good]) > 5))
    allowance = tail_probability(5.0) + 9 * int(spikes.sum()) / int(good.sum())
    record_property("toros_tail5", {"fraction": fraction, "allowance": allowance,
                                    "n_spikes": int(spikes.sum())})
    assert fraction <= allowance


def test_toros_saturated_cores_are_masked_and_dilated(toros, request) -> None:
    # The saturated hot pixel of 005 at (x=117, y=43) is held resampled (58974) in 004 and
    # spills into its neighbours: saturation is grown by one pixel on reading.
    difference, meta = toros.result.difference, toros.result.metadata
    science_sat = toros.raw_science == 65535
    template_sat = toros.raw_template == 65535
    assert science_sat.any() and template_sat.any()
    # Science saturation is SAT, template saturation SAT_TEMPLATE, in the difference mask.
    assert difference.masked("SAT")[science_sat].all()
    assert difference.masked("SAT_TEMPLATE")[template_sat].all()
    # The convolved (template) saturation is dilated by the whole kernel footprint.
    assert meta["mode"] == "convolveTemplate"
    size = int(meta["kernel_size"])
    footprint = ndimage.binary_dilation(template_sat, structure=np.ones((size, size), bool))
    assert difference.masked("SAT_TEMPLATE")[footprint].all()
    # No unmasked pixel touches a saturated input pixel (8-neighbourhood): the values next
    # to a clipped core are not noise either.
    touching = ndimage.binary_dilation(science_sat | template_sat, structure=np.ones((3, 3)))
    assert difference.masked()[touching].all()


def test_toros_cli_matches_api_and_leaves_inputs_unchanged(toros, cli, tmp_path, sha256,
                                                          manifest_sha256) -> None:
    # uint16 files with BZERO: the reader must scale a copy, never the (memory-mapped) file.
    science, template = toros.science_path, toros.template_path
    before = {path: sha256(path) for path in (science, template)}
    assert all(before[path] == manifest_sha256(path) for path in before)
    output = tmp_path / "diff.fits"
    run = cli("subtract", science, template, "-o", output, "-q")
    assert run.code == 0, run.err
    assert {path: sha256(path) for path in before} == before
    written = read_exposure(output)
    expected = toros.result.difference
    np.testing.assert_array_equal(written.mask, expected.mask)
    np.testing.assert_array_equal(written.image, expected.image)


# ------------------------------------------------------------------------------------------
# legacypipe cut-outs: 41x51 on different CCD grids, one or two stars


@pytest.fixture(scope="module")
def legacypipe(legacypipe_files: SimpleNamespace) -> dict[str, skydiff.Exposure]:
    f = legacypipe_files
    return {epoch: read_exposure(getattr(f, f"{epoch}_i"), weight=getattr(f, f"{epoch}_w"),
                                 mask=getattr(f, f"{epoch}_d"), psf=getattr(f, f"{epoch}_psf"))
            for epoch in ("e2014", "e2015", "e2018")}


@pytest.mark.parametrize("template_epoch", ["e2015", "e2018"])
@pytest.mark.parametrize("overrides", [
    (), ("subtract.al.spatial_kernel_order=0", "subtract.al.spatial_bg_order=0"),
    ("subtract.name=al_preconvolve",), ("subtract.al.kernel_basis.name=df",),
], ids=["default", "order-0", "al_preconvolve", "df-basis"])
def test_legacypipe_cutouts_fail_cleanly(legacypipe, template_epoch, overrides) -> None:
    with pytest.raises(skydiff.InsufficientKernelSourcesError) as info:
        skydiff.subtract(legacypipe["e2014"], legacypipe[template_epoch], config(*overrides))
    message = str(info.value)
    assert "\n" not in message
    # Says how many stars were found and needed, and what to change.
    found, needed = info.value.metadata["n_found"], info.value.metadata["n_needed"]
    assert found < needed
    assert f"found {found} " in message and str(needed) in message
    assert "source list" in message or "spatial_kernel_order" in message


def test_legacypipe_grid_mismatch_asks_for_resampling(legacypipe) -> None:
    # 2014 vs 2015: the grids differ by 0.52-0.54 px (CHECK.txt); below the default 1-px
    # limit the kernel absorbs the offset, above a stricter one the user is told to resample.
    with pytest.raises(skydiff.InputError, match="resample the template") as info:
        skydiff.subtract(legacypipe["e2014"], legacypipe["e2015"],
                         config("subtract.al.max_wcs_offset=0.1"))
    assert "0.54" in str(info.value)


def test_legacypipe_without_companions_fails_cleanly(legacypipe_files) -> None:
    f = legacypipe_files
    with pytest.raises(skydiff.AlgorithmError):
        skydiff.subtract(read_exposure(f.e2014_i), read_exposure(f.e2015_i))


def test_legacypipe_cli_one_line_error_and_inputs_unchanged(legacypipe_files, cli, tmp_path,
                                                           sha256) -> None:
    f = legacypipe_files
    inputs = [f.e2014_i, f.e2014_w, f.e2014_d, f.e2014_psf, f.e2015_i, f.e2015_w, f.e2015_d,
              f.e2015_psf]
    before = {path: sha256(path) for path in inputs}
    output = tmp_path / "diff.fits"
    run = cli("subtract", f.e2014_i, f.e2015_i, "-o", output,
              "--science-weight", f.e2014_w, "--science-mask", f.e2014_d,
              "--science-psf", f.e2014_psf, "--template-weight", f.e2015_w,
              "--template-mask", f.e2015_d, "--template-psf", f.e2015_psf, "-q")
    assert run.code == 1
    assert run.out == ""
    assert run.err.count("\n") == 1
    assert run.err.startswith("skydiff: error: ") and "kernel source" in run.err
    assert not output.exists()
    assert {path: sha256(path) for path in inputs} == before


# ------------------------------------------------------------------------------------------
# provenance of a real-data CLI run


def test_decam_cli_provenance_records_effective_config(decam_files, cli, tmp_path) -> None:
    f = decam_files
    science = tmp_path / "science.fits"
    template = tmp_path / "template.fits"
    shutil.copyfile(f.science, science)
    shutil.copyfile(f.template, template)
    output = tmp_path / "diff.fits"
    run = cli("subtract", science, template, "-o", output, "-c", "subtract.al.mode=auto", "-q")
    assert run.code == 0, run.err
    provenance = read_provenance(output)
    loaded = skydiff.PipelineConfig.load_toml(provenance.config_toml)
    assert loaded == config("subtract.al.mode=auto")
    assert [Path(path) for path, _ in provenance.inputs] == [science.resolve(),
                                                             template.resolve()]
