"""The global DMTN-021 decorrelation and ``none``: ports of lsst.ip.diffim's A7/A8 and more.

Inputs are built by hand (numpy, skydiff.sim.render_stars, skydiff.convolve) with a known
Gaussian matching kernel, as in ``test_imageDecorrelation.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import skydiff
from skydiff.sim import render_stars
from skydiff_plugins.decorrelation import (
    DecorrelationConfig,
    Dmtn021Decorrelator,
    NoDecorrelation,
)

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
SIGMA_SCIENCE, SIGMA_TEMPLATE = 3.3, 2.2
SIGMA_KERNEL = math.sqrt(SIGMA_SCIENCE**2 - SIGMA_TEMPLATE**2)
BORDER = 17


def gaussian_image(sigma: float, size: int) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    image = np.outer(profile, profile)
    return image / image.sum()


def make_pair(svar: float, tvar: float, *, n_sources: int = 50, shape: tuple[int, int] = (256, 256),
              seed: int = 0, noise: bool = True, convolve_science: bool = False,
              template_scale: float = 1.0
              ) -> tuple[skydiff.Exposure, skydiff.Exposure, skydiff.SubtractionResult]:
    """A7-like inputs: Gaussian stars, white noise, D = S − κ⊗T (or (κ⊗S − T)/kSum)."""
    rng = np.random.default_rng(seed)
    sig_s, sig_t = ((SIGMA_TEMPLATE, SIGMA_SCIENCE) if convolve_science
                    else (SIGMA_SCIENCE, SIGMA_TEMPLATE))
    x = rng.uniform(16, shape[1] - 5, n_sources)
    y = rng.uniform(16, shape[0] - 5, n_sources)
    flux = rng.uniform(50, 30000, n_sources)
    science = render_stars(shape, x, y, flux, fwhm=sig_s * FWHM) if n_sources else np.zeros(shape)
    template = (render_stars(shape, x, y, flux * template_scale, fwhm=sig_t * FWHM)
                if n_sources else np.zeros(shape))
    if noise:
        science = science + rng.normal(0.0, math.sqrt(svar), shape)
        template = template + rng.normal(0.0, math.sqrt(tvar), shape)
    sci = skydiff.Exposure(science, variance=np.full(shape, svar),
                           psf=skydiff.GaussianPsf(sig_s, size=25))
    tmp = skydiff.Exposure(template, variance=np.full(shape, tvar),
                           psf=skydiff.GaussianPsf(sig_t, size=25))
    kernel = skydiff.FixedKernel(
        gaussian_image(SIGMA_KERNEL, 31) * (template_scale if convolve_science else 1.0))
    if convolve_science:
        matched = skydiff.convolve(sci, kernel)
        k_sum = kernel.sum
        difference = tmp.evolve(image=(matched.image - tmp.image) / k_sum,
                                variance=(matched.variance + tmp.variance) / k_sum**2,
                                mask=matched.mask, mask_planes=matched.mask_planes)
        convolved = "science"
    else:
        matched = skydiff.convolve(tmp, kernel)
        difference = sci.evolve(image=sci.image - matched.image,
                                variance=sci.variance + matched.variance,
                                mask=matched.mask, mask_planes=matched.mask_planes)
        convolved = "template"
    return sci, tmp, skydiff.SubtractionResult(difference=difference, matched_image=matched,
                                                kernel=kernel, convolved=convolved)


def clipped(values: np.ndarray, *, variance: bool) -> float:
    """afw MEANCLIP / VARIANCECLIP: 3σ, 3 iterations, from the median and IQR."""
    a = np.asarray(values, dtype=np.float64).ravel()
    center = np.median(a)
    sigma = 0.7413 * np.subtract(*np.percentile(a, [75, 25]))
    for _ in range(3):
        kept = a[np.abs(a - center) <= 3 * sigma]
        center, sigma = kept.mean(), kept.std()
    return float(sigma**2 if variance else center)


def interior(array: np.ndarray, border: int = BORDER) -> np.ndarray:
    return array[border:-border, border:-border]


def correlation(image: np.ndarray, distance: int, *, n_pairs: int = 10000,
                seed: int = 1) -> float:
    """ρ(r) along rows from random pixel pairs, a 17-pixel border excluded (upstream A8)."""
    rng = np.random.default_rng(seed)
    height, width = image.shape
    rows = rng.integers(BORDER, height - BORDER, n_pairs)
    cols = rng.integers(BORDER, width - BORDER - distance, n_pairs)
    a = image[rows, cols].astype(np.float64)
    b = image[rows, cols + distance].astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize(("svar", "tvar"), [(0.04, 0.04), (0.08, 0.04), (0.04, 0.08)])
@pytest.mark.parametrize("complete_variance", [False, True])
def test_a7_diffim_correction(svar: float, tvar: float, complete_variance: bool) -> None:
    science, template, subtraction = make_pair(svar, tvar)
    expected = svar + tvar
    raw = subtraction.difference
    assert clipped(interior(raw.variance), variance=False) < expected
    assert clipped(interior(raw.image), variance=True) < expected

    config = DecorrelationConfig(complete_variance=complete_variance)
    result = Dmtn021Decorrelator(config).run(science, template, subtraction)
    corrected = result.difference
    pixel = clipped(interior(corrected.image), variance=True)
    plane = clipped(interior(corrected.variance), variance=False)
    assert pixel == pytest.approx(expected, rel=0.05)
    assert plane == pytest.approx(expected, rel=0.02)
    assert pixel == pytest.approx(plane, rel=0.05)
    assert result.metadata["sigma2_science"] == pytest.approx(svar, rel=1e-6)
    assert result.metadata["sigma2_template"] == pytest.approx(tvar, rel=1e-6)
    assert corrected.image.dtype == np.float32 and corrected.variance.dtype == np.float32


def test_a8_noise_correlation() -> None:
    science, template, subtraction = make_pair(1.0, 100.0, n_sources=0, shape=(512, 512))
    raw = subtraction.difference.image
    corrected = Dmtn021Decorrelator().run(science, template, subtraction).difference.image
    for image in (science.image, raw, corrected):
        assert correlation(image, 0) == pytest.approx(1.0, abs=0.1)
    for r in (1, 2, 3):
        assert abs(correlation(science.image, r)) < 0.1
        assert correlation(raw, r) > 0.2
        assert abs(correlation(corrected, r)) < 0.1
    for r in (4, 5, 8):
        assert abs(correlation(corrected, r)) < 0.1


def _annulus_power(image: np.ndarray, low: float, high: float) -> tuple[float, int]:
    power = np.abs(np.fft.rfft2(image - image.mean())) ** 2
    kr = np.fft.fftfreq(image.shape[0])[:, None]
    kc = np.fft.rfftfreq(image.shape[1])[None, :]
    radius = np.hypot(kr, kc)
    ring = (radius >= low) & (radius < high)
    return float(power[ring].mean()), int(ring.sum())


def test_whitening_flat_power_spectrum() -> None:
    svar, tvar = 1.0, 9.0
    science, template, subtraction = make_pair(svar, tvar, n_sources=0, shape=(512, 512), seed=4)
    corrected = Dmtn021Decorrelator().run(science, template, subtraction).difference.image
    crop = interior(corrected, 40).astype(np.float64)
    low, n_low = _annulus_power(crop, 0.03, 0.12)
    high, n_high = _annulus_power(crop, 0.35, 0.48)
    # each annulus mean has relative error 1/sqrt(n) (exponential power of each mode)
    error = math.sqrt(1.0 / n_low + 1.0 / n_high)
    assert high / low == pytest.approx(1.0, abs=4 * error)
    # the level is the flat σ²_S + σ²_T per pixel: mean power = N σ²
    assert low / crop.size == pytest.approx(svar + tvar, rel=0.05)
    raw = interior(subtraction.difference.image, 40).astype(np.float64)
    raw_low, _ = _annulus_power(raw, 0.03, 0.12)
    raw_high, _ = _annulus_power(raw, 0.35, 0.48)
    assert raw_low / raw_high > 3.0


def _point_source(shape: tuple[int, int], position: tuple[int, int], flux: float,
                  sigma: float) -> np.ndarray:
    image = np.zeros(shape)
    psf = gaussian_image(sigma, 41)
    row, col = position
    image[row - 20:row + 21, col - 20:col + 21] = flux * psf
    return image


def _transient_pair(convolve_science: bool = False
                    ) -> tuple[skydiff.Exposure, skydiff.Exposure, skydiff.SubtractionResult,
                               tuple[int, int], float]:
    """Noiseless transient in the science (the filter depends on the variance planes only)."""
    science, template, subtraction = make_pair(0.04, 0.08, n_sources=0, noise=False,
                                               convolve_science=convolve_science)
    position, flux = (121, 134), 5000.0
    # a science transient has the broad PSF in D in both modes (κ⊗P_S = P_T when the
    # science is convolved)
    source = _point_source(science.shape, position, flux, SIGMA_SCIENCE)
    image = subtraction.difference.image + source.astype(np.float32)
    difference = subtraction.difference.evolve(image=image)
    subtraction = skydiff.SubtractionResult(difference=difference, kernel=subtraction.kernel,
                                            convolved=subtraction.convolved)
    return science, template, subtraction, position, flux


def _psf_flux(image: np.ndarray, psf: np.ndarray, position: tuple[int, int]) -> float:
    half = psf.shape[0] // 2
    row, col = position
    stamp = image[row - half:row + half + 1, col - half:col + half + 1].astype(np.float64)
    return float((stamp * psf).sum() / (psf**2).sum())


def test_flux_preserved() -> None:
    science, template, subtraction, position, flux = _transient_pair()
    psf_before = subtraction.difference.psf or science.psf
    assert psf_before is not None
    before = _psf_flux(subtraction.difference.image, psf_before.kernel_image(), position)
    result = Dmtn021Decorrelator().run(science, template, subtraction)
    corrected = result.difference
    assert corrected.psf is not None
    after = _psf_flux(corrected.image, corrected.psf.kernel_image(), position)
    assert before == pytest.approx(flux, rel=1e-3)
    assert after == pytest.approx(before, rel=0.005)
    row, col = position
    box = (slice(row - 40, row + 41), slice(col - 40, col + 41))
    assert float(corrected.image[box].sum()) == pytest.approx(flux, rel=1e-4)


def test_psf_updated_matches_point_source() -> None:
    science, template, subtraction, position, _ = _transient_pair()
    result = Dmtn021Decorrelator().run(science, template, subtraction)
    psf = result.difference.psf
    assert isinstance(psf, skydiff.ImagePsf) and result.metadata["psf_updated"]
    model = psf.kernel_image()
    assert model.sum() == pytest.approx(1.0, abs=1e-12)
    half = model.shape[0] // 2
    row, col = position
    stamp = result.difference.image[row - half:row + half + 1, col - half:col + half + 1]
    stamp = stamp / stamp.sum()
    residual = np.linalg.norm(stamp - model) / np.linalg.norm(model)
    assert residual < 0.02
    # the decorrelated PSF is sharper than the science PSF (φ boosts high frequencies)
    assert psf.fwhm() < science.psf.fwhm()  # type: ignore[union-attr]
    stale = Dmtn021Decorrelator(DecorrelationConfig(update_psf=False)).run(
        science, template, subtraction)
    assert stale.difference.psf == subtraction.difference.psf
    assert not stale.metadata["psf_updated"]


@pytest.mark.parametrize("complete_variance", [False, True])
def test_convolve_science(complete_variance: bool) -> None:
    svar, tvar, scale = 0.08, 0.04, 1.5
    science, template, subtraction = make_pair(svar, tvar, n_sources=20, convolve_science=True,
                                               template_scale=scale, shape=(384, 384))
    config = DecorrelationConfig(complete_variance=complete_variance)
    result = Dmtn021Decorrelator(config).run(science, template, subtraction)
    expected = svar + tvar / scale**2  # science units
    corrected = result.difference
    assert clipped(interior(corrected.image), variance=True) == pytest.approx(expected, rel=0.05)
    assert clipped(interior(corrected.variance), variance=False) == pytest.approx(expected,
                                                                                 rel=0.02)
    assert result.metadata["kernel_sum"] == pytest.approx(scale)
    assert result.metadata["sigma2_science"] == pytest.approx(svar)
    assert abs(correlation(corrected.image, 1)) < 0.1
    # PSF: φ ⊗ template PSF
    assert corrected.psf is not None and template.psf is not None
    assert corrected.psf.fwhm() < template.psf.fwhm()


def test_convolve_science_flux_and_psf() -> None:
    science, template, subtraction, position, flux = _transient_pair(convolve_science=True)
    result = Dmtn021Decorrelator().run(science, template, subtraction)
    corrected = result.difference
    assert corrected.psf is not None
    assert _psf_flux(corrected.image, corrected.psf.kernel_image(), position) == pytest.approx(
        flux, rel=0.005)


def test_nan_and_no_data_pixels_restored() -> None:
    science, template, subtraction = make_pair(0.04, 0.04, n_sources=10)
    image = np.array(subtraction.difference.image)
    image[50, 60] = np.nan
    image[100:103, 30] = np.inf
    image[200, 200] = 1e6  # garbage under NO_DATA
    no_data = np.zeros(image.shape, dtype=bool)
    no_data[200, 200] = True
    difference = subtraction.difference.evolve(image=image).with_mask("NO_DATA", no_data)
    subtraction = skydiff.SubtractionResult(difference=difference, kernel=subtraction.kernel)
    corrected = Dmtn021Decorrelator().run(science, template, subtraction).difference.image
    assert np.isnan(corrected[50, 60]) and np.all(np.isposinf(corrected[100:103, 30]))
    assert corrected[200, 200] == np.float32(1e6)
    bad = ~np.isfinite(image) | no_data
    assert np.all(np.isfinite(corrected[~bad]))
    # the neighbours are not contaminated by the garbage value
    assert np.abs(corrected[190:211, 190:211][~no_data[190:211, 190:211]]).max() < 5.0


def test_complete_variance_follows_structure() -> None:
    science, template, subtraction = make_pair(0.04, 0.04, n_sources=0, noise=False)
    variance = np.full(science.shape, 0.04, dtype=np.float32)
    variance[100:140, 100:140] = 0.4  # a bright region of the science
    science = science.evolve(variance=variance)
    default = Dmtn021Decorrelator().run(science, template, subtraction).difference.variance
    complete = Dmtn021Decorrelator(DecorrelationConfig(complete_variance=True)).run(
        science, template, subtraction).difference.variance
    # away from the structure and the edges both modes agree
    np.testing.assert_allclose(complete[30:60, 30:60], default[30:60, 30:60], rtol=1e-4)
    # the complete propagation smooths the step; its integral is preserved
    assert complete[120, 120] == pytest.approx(default[120, 120], rel=0.01)
    assert 0.04 < complete[100, 120] < default[100, 120]
    assert complete[60:180, 60:180].sum() == pytest.approx(default[60:180, 60:180].sum(),
                                                           rel=1e-3)


def test_kernel_evaluated_at_centre_of_parent_frame() -> None:
    science, template, subtraction = make_pair(0.04, 0.08, n_sources=0)
    narrow, wide = gaussian_image(1.0, 31), gaussian_image(SIGMA_KERNEL, 31)
    x0, y0 = 1000, 2000
    # the kernel equals `wide` at the centre of the parent frame of the exposures only
    bbox = (x0 - 255.0, y0, x0 + 255.0, y0 + 255.0)
    kernel = skydiff.BasisKernel(np.stack([narrow, wide - narrow]), [[1, 0, 0], [0.5, 0.5, 0]],
                                 order=1, bbox=bbox)
    moved = [e.evolve(origin=(x0, y0)) for e in (science, template, subtraction.difference)]
    varying = skydiff.SubtractionResult(difference=moved[2], kernel=kernel)
    fixed = skydiff.SubtractionResult(difference=moved[2], kernel=skydiff.FixedKernel(
        kernel.image_at(x0 + 127.5, y0 + 127.5)))
    a = Dmtn021Decorrelator().run(moved[0], moved[1], varying).difference
    b = Dmtn021Decorrelator().run(moved[0], moved[1], fixed).difference
    np.testing.assert_array_equal(a.image, b.image)


def test_none_passes_through() -> None:
    science, template, subtraction = make_pair(0.04, 0.04, n_sources=5)
    result = NoDecorrelation().run(science, template, subtraction)
    assert result.difference is subtraction.difference
    assert result.score is None
    with pytest.raises(skydiff.InputError):
        NoDecorrelation().run(science, template.cutout(slice(0, 100), slice(0, 100)),
                              subtraction)


def test_input_errors() -> None:
    science, template, subtraction = make_pair(0.04, 0.04, n_sources=0, shape=(64, 64))
    plugin = Dmtn021Decorrelator()
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, skydiff.SubtractionResult(
            difference=subtraction.difference, kernel=None))
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, skydiff.SubtractionResult(
            difference=subtraction.difference, kernel=subtraction.kernel, convolved="none"))
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template.cutout(slice(0, 40), slice(0, 64)), subtraction)
    with pytest.raises(skydiff.InputError):
        plugin.run(science.image, template, subtraction)  # type: ignore[arg-type]
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, subtraction.difference)  # type: ignore[arg-type]
    zero = np.zeros(science.shape, dtype=np.float32)
    with pytest.raises(skydiff.InputError):  # nothing to whiten
        plugin.run(science.evolve(variance=zero), template.evolve(variance=zero), subtraction)
    nan = np.full(science.shape, np.nan, dtype=np.float32)
    with pytest.raises(skydiff.InputError):  # no usable variance
        plugin.run(science.evolve(variance=nan), template, subtraction)
    negative = skydiff.SubtractionResult(difference=subtraction.difference,
                                         kernel=skydiff.FixedKernel(-gaussian_image(2.0, 15)))
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, negative)


def test_divergence_warning(caplog: pytest.LogCaptureFixture) -> None:
    science, template, subtraction = make_pair(1e-9, 1.0, n_sources=0, noise=False,
                                               shape=(64, 64))
    with caplog.at_level("WARNING", logger="skydiff"):
        Dmtn021Decorrelator().run(science, template, subtraction)
    assert any("deconvolution" in record.getMessage() for record in caplog.records)
