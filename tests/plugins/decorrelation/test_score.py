"""The DMTN-179 score correction (``score``): ZOGY equivalence, pre-filter path, variance, PSF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal

import skydiff
from skydiff.sim import render_stars
from skydiff_plugins.decorrelation import ScoreDecorrelator, ScoreDecorrelatorConfig

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
SIGMA_SCIENCE, SIGMA_TEMPLATE = 2.4, 2.0
EDGE = 40


def gaussian_image(sigma: float, size: int) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    image = np.outer(profile, profile)
    return image / image.sum()


def interior(array: np.ndarray, border: int = EDGE) -> np.ndarray:
    return array[border:-border, border:-border]


def make_pair(svar: float, tvar: float, *, shape: tuple[int, int] = (256, 256),
              n_sources: int = 30, seed: int = 0, sigma_science: float = SIGMA_SCIENCE,
              sigma_template: float = SIGMA_TEMPLATE, transient: float = 0.0,
              ) -> tuple[skydiff.Exposure, skydiff.Exposure, skydiff.SubtractionResult]:
    """Gaussian stars with white noise; D = S − κ⊗T with the exact Gaussian kernel."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, shape[1] - 20, n_sources)
    y = rng.uniform(20, shape[0] - 20, n_sources)
    flux = rng.uniform(100, 20000, n_sources)
    science = rng.normal(0.0, math.sqrt(svar), shape)
    template = rng.normal(0.0, math.sqrt(tvar), shape)
    if n_sources:
        science += render_stars(shape, x, y, flux, fwhm=sigma_science * FWHM)
        template += render_stars(shape, x, y, flux, fwhm=sigma_template * FWHM)
    if transient:
        science += render_stars(shape, [shape[1] / 2], [shape[0] / 2], [transient],
                                fwhm=sigma_science * FWHM)
    sci = skydiff.Exposure(science, variance=np.full(shape, svar),
                           psf=skydiff.GaussianPsf(sigma_science, size=25))
    tmp = skydiff.Exposure(template, variance=np.full(shape, tvar),
                           psf=skydiff.GaussianPsf(sigma_template, size=25))
    if sigma_science > sigma_template:
        kernel_image = gaussian_image(math.sqrt(sigma_science**2 - sigma_template**2), 31)
    else:
        kernel_image = np.zeros((31, 31))
        kernel_image[15, 15] = 1.0
    kernel = skydiff.FixedKernel(kernel_image)
    matched = skydiff.convolve(tmp, kernel)
    difference = sci.evolve(image=sci.image - matched.image,
                            variance=sci.variance + matched.variance)
    return sci, tmp, skydiff.SubtractionResult(difference=difference, matched_image=matched,
                                                kernel=kernel)


def preconvolved(science: skydiff.Exposure, template: skydiff.Exposure,
                 subtraction: skydiff.SubtractionResult) -> skydiff.SubtractionResult:
    """The al_preconvolve result: S' = H⊗S, κ' = H⊗κ matches T to S', score₀ = S' − κ'⊗T."""
    assert science.psf is not None and subtraction.kernel is not None
    prefilter = science.psf.kernel_image()[::-1, ::-1]
    kernel = skydiff.FixedKernel(scipy.signal.fftconvolve(prefilter,
                                                          subtraction.kernel.image))
    filtered = skydiff.convolve(science, prefilter)
    matched = skydiff.convolve(template, kernel)
    score0 = filtered.evolve(image=filtered.image - matched.image,
                             variance=filtered.variance + matched.variance)
    return skydiff.SubtractionResult(difference=score0, matched_image=matched, kernel=kernel,
                                     score=score0, prefilter=prefilter)


def _spectrum(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    padded = np.zeros(shape)
    half = psf.shape[0] // 2
    padded[:psf.shape[0], :psf.shape[1]] = psf
    return np.fft.fft2(np.roll(padded, (-half, -half), axis=(0, 1)))


def test_score_equals_zogy_up_to_a_constant() -> None:
    svar, tvar = 1.0, 4.0
    science, template, subtraction = make_pair(svar, tvar, transient=3000.0)
    result = ScoreDecorrelator().run(science, template, subtraction)
    assert result.difference is subtraction.difference
    assert result.score is not None and not result.metadata["prefiltered"]
    # ZOGY (Zackay et al. 2016, eq. 12 with F = 1), periodic on the image grid
    p_s = _spectrum(science.psf.kernel_image(), science.shape)  # type: ignore[union-attr]
    p_t = _spectrum(template.psf.kernel_image(), science.shape)  # type: ignore[union-attr]
    numerator = (np.conj(p_s) * np.abs(p_t) ** 2 * np.fft.fft2(science.image)
                 - np.conj(p_t) * np.abs(p_s) ** 2 * np.fft.fft2(template.image))
    zogy = np.real(np.fft.ifft2(numerator / (svar * np.abs(p_t) ** 2
                                             + tvar * np.abs(p_s) ** 2)))
    constant = svar + tvar  # the flux-preserving numerator, kSum = 1
    ours = interior(result.score.image).astype(np.float64)
    expected = constant * interior(zogy)
    assert np.corrcoef(ours.ravel(), expected.ravel())[0, 1] > 0.999
    assert np.std(ours - expected) < 0.02 * np.std(expected)


def test_prefiltered_and_plain_paths_agree() -> None:
    science, template, subtraction = make_pair(1.0, 2.0, transient=2000.0)
    plain = ScoreDecorrelator().run(science, template, subtraction)
    pre_subtraction = preconvolved(science, template, subtraction)
    pre = ScoreDecorrelator().run(science, template, pre_subtraction)
    assert pre.metadata["prefiltered"] and not plain.metadata["prefiltered"]
    assert plain.score is not None and pre.score is not None
    a = interior(plain.score.image, 60).astype(np.float64)
    b = interior(pre.score.image, 60).astype(np.float64)
    assert np.std(a - b) < 1e-4 * np.std(a)
    np.testing.assert_allclose(pre.score.variance, plain.score.variance, rtol=1e-3)
    assert pre.score.psf is not None and plain.score.psf is not None
    assert pre.score.psf.fwhm() == pytest.approx(plain.score.psf.fwhm(), rel=1e-3)
    # without an explicit score the difference (S' − κ'⊗T) is the input
    no_score = skydiff.SubtractionResult(difference=pre_subtraction.difference,
                                         kernel=pre_subtraction.kernel,
                                         prefilter=pre_subtraction.prefilter)
    again = ScoreDecorrelator().run(science, template, no_score)
    assert again.score is not None
    np.testing.assert_array_equal(again.score.image, pre.score.image)


def test_noiseless_template_gives_science_matched_filter() -> None:
    science, template, subtraction = make_pair(1.0, 1e-10, transient=1500.0)
    result = ScoreDecorrelator().run(science, template, subtraction)
    assert result.score is not None
    prefilter = science.psf.kernel_image()[::-1, ::-1]  # type: ignore[union-attr]
    matched_filter = skydiff.fft_convolve(subtraction.difference.image, prefilter)
    ours = interior(result.score.image).astype(np.float64).ravel()
    reference = interior(matched_filter).astype(np.float64).ravel()
    scale = float(ours @ reference / (reference @ reference))
    assert scale == pytest.approx(1.0, rel=1e-6)
    assert np.std(ours - scale * reference) < 1e-4 * np.std(reference)
    # and its PSF is the PSF correlated with itself
    psf = science.psf.kernel_image()  # type: ignore[union-attr]
    auto = scipy.signal.correlate(psf, psf)
    auto /= auto.sum()
    model = result.score.psf.kernel_image()  # type: ignore[union-attr]
    pad = (model.shape[0] - auto.shape[0]) // 2
    np.testing.assert_allclose(model[pad:pad + auto.shape[0], pad:pad + auto.shape[0]], auto,
                               atol=1e-6)


def test_equal_psfs_score_noise_level() -> None:
    """A9: σ_S = σ_T = 2.4, noise 1/1: score std = √2 / √NEA (NEA = 1/Σp²)."""
    science, template, subtraction = make_pair(1.0, 1.0, shape=(400, 400), n_sources=20,
                                               sigma_template=SIGMA_SCIENCE)
    result = ScoreDecorrelator().run(science, template, subtraction)
    assert result.score is not None
    psf = science.psf.kernel_image()  # type: ignore[union-attr]
    expected = math.sqrt(2.0 * (psf**2).sum())
    pixels = interior(result.score.image)
    mean, _, std = _clipped_stats(pixels)
    assert std == pytest.approx(expected, rel=0.1)
    assert abs(mean) < 5 * expected / math.sqrt(pixels.size)
    assert float(np.mean(interior(result.score.variance))) == pytest.approx(expected**2,
                                                                           rel=0.01)


def _clipped_stats(values: np.ndarray) -> tuple[float, float, float]:
    a = np.asarray(values, dtype=np.float64).ravel()
    center = np.median(a)
    sigma = 0.7413 * np.subtract(*np.percentile(a, [75, 25]))
    for _ in range(3):
        kept = a[np.abs(a - center) <= 3 * sigma]
        center, sigma = kept.mean(), kept.std()
    return float(center), float(sigma**2), float(sigma)


@pytest.mark.parametrize("complete_variance", [False, True])
def test_score_variance_plane_matches_pixels(complete_variance: bool) -> None:
    science, template, subtraction = make_pair(1.0, 4.0, shape=(384, 384), n_sources=0)
    plugin = ScoreDecorrelator(ScoreDecorrelatorConfig(complete_variance=complete_variance))
    for subtraction_ in (subtraction, preconvolved(science, template, subtraction)):
        result = plugin.run(science, template, subtraction_)
        assert result.score is not None
        pixel_variance = float(np.var(interior(result.score.image, 60)))
        plane = float(np.mean(interior(result.score.variance, 60)))
        assert pixel_variance == pytest.approx(plane, rel=0.05)


def test_psf_matches_point_source_response() -> None:
    science, template, subtraction = make_pair(1.0, 4.0, n_sources=0, transient=0.0)
    noiseless = [e.evolve(image=np.zeros(e.shape, np.float32)) for e in (science, template)]
    image = np.zeros(science.shape)
    image[128 - 12:128 + 13, 128 - 12:128 + 13] = 1000.0 * science.psf.kernel_image()  # type: ignore[union-attr]
    difference = subtraction.difference.evolve(image=image)
    result = ScoreDecorrelator().run(*noiseless, skydiff.SubtractionResult(
        difference=difference, kernel=subtraction.kernel))
    assert result.score is not None and result.score.psf is not None
    model = result.score.psf.kernel_image()
    half = model.shape[0] // 2
    stamp = result.score.image[128 - half:128 + half + 1, 128 - half:128 + half + 1]
    stamp = stamp / stamp.sum()
    assert model.sum() == pytest.approx(1.0)
    assert np.linalg.norm(stamp - model) / np.linalg.norm(model) < 0.02


def test_convolve_science_score() -> None:
    science, template, _ = make_pair(4.0, 1.0, n_sources=0, shape=(320, 320),
                                               sigma_science=2.0, sigma_template=2.4)
    kernel = skydiff.FixedKernel(1.3 * gaussian_image(math.sqrt(2.4**2 - 2.0**2), 31))
    matched = skydiff.convolve(science, kernel)
    difference = template.evolve(image=(matched.image - template.image) / kernel.sum)
    result = ScoreDecorrelator().run(science, template, skydiff.SubtractionResult(
        difference=difference, kernel=kernel, convolved="science"))
    assert result.score is not None
    pixel_variance = float(np.var(interior(result.score.image, 60)))
    plane = float(np.mean(interior(result.score.variance, 60)))
    assert pixel_variance == pytest.approx(plane, rel=0.05)
    assert result.metadata["sigma2_science"] == pytest.approx(4.0)


def test_score_input_errors() -> None:
    science, template, subtraction = make_pair(1.0, 1.0, shape=(64, 64), n_sources=0)
    plugin = ScoreDecorrelator()
    no_psf = [e.evolve(psf=None) for e in (science, template, subtraction.difference)]
    with pytest.raises(skydiff.InputError):
        plugin.run(no_psf[0], no_psf[1], skydiff.SubtractionResult(
            difference=no_psf[2], kernel=subtraction.kernel))
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, skydiff.SubtractionResult(
            difference=subtraction.difference, kernel=subtraction.kernel,
            prefilter=np.ones((4, 4))))
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, skydiff.SubtractionResult(
            difference=subtraction.difference, kernel=subtraction.kernel,
            prefilter=np.ones((5, 5)), convolved="science"))
    with pytest.raises(skydiff.InputError):
        plugin.run(science, template, skydiff.SubtractionResult(
            difference=subtraction.difference, kernel=None))
