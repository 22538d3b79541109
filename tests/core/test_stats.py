"""Tests of skydiff.stats: clipped statistics, background meshes and variance scaling."""

from __future__ import annotations

import numpy as np
import pytest

import skydiff
from skydiff.errors import AlgorithmError, InputError
from skydiff.sim import make_test_image, simulate_pair
from skydiff.stats import (
    IQR_TO_SIGMA,
    ClippedStats,
    background_mesh,
    clipped_stats,
    robust_std,
    variance_scale_factor,
)


def _reference_clip(values: np.ndarray, n_sigma: float = 3.0, n_iter: int = 3) -> ClippedStats:
    """A literal transcription of afw's MEANCLIP/STDEVCLIP loop (for comparison)."""
    q25, q75 = np.percentile(values, [25, 75])
    center, half = np.median(values), n_sigma * IQR_TO_SIGMA * (q75 - q25)
    kept = values
    for _ in range(n_iter):
        kept = values[np.abs(values - center) <= half]
        center, half = kept.mean(), n_sigma * kept.std(ddof=1)
    return ClippedStats(kept.mean(), np.median(kept), kept.std(ddof=1), kept.size)


# ------------------------------------------------------------------------------------------
# clipped_stats / robust_std


def test_clipped_stats_rejects_only_the_outlier_a18() -> None:
    # ipdiffim A18: kernel sums [1,1,1,1,2,3,4,50]: only the 50 is clipped
    sums = np.array([1, 1, 1, 1, 2, 3, 4, 50], dtype=float)
    stats = clipped_stats(sums)
    assert stats.n == 7
    assert stats.mean == pytest.approx(13 / 7)
    assert stats.std == pytest.approx(np.std(sums[:-1], ddof=1))
    assert stats.median == 1.0
    rejected = np.abs(sums - stats.mean) > 3.0 * stats.std
    assert rejected.tolist() == [False] * 7 + [True]


def test_clipped_stats_matches_afw_loop_on_contaminated_gaussian() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(10.0, 2.0, 5000), rng.uniform(30, 100, 200)])
    stats = clipped_stats(values)
    ref = _reference_clip(values)
    assert stats.n == ref.n
    assert stats.mean == pytest.approx(ref.mean, rel=1e-12)
    assert stats.std == pytest.approx(ref.std, rel=1e-12)
    assert stats.mean == pytest.approx(10.0, abs=0.1)
    assert stats.std == pytest.approx(2.0, rel=0.05)


def test_clipped_stats_is_nan_aware_and_honours_the_mask() -> None:
    values = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, 1e6]])
    mask = np.array([[False, False, False], [False, False, True]])
    stats = clipped_stats(values, mask=mask)
    assert stats.n == 3
    assert stats.mean == pytest.approx(2.0)


def test_clipped_stats_keeps_a_constant_sample() -> None:
    stats = clipped_stats(np.full(10, 0.1))
    assert stats == ClippedStats(pytest.approx(0.1), pytest.approx(0.1), 0.0, 10)


def test_clipped_stats_does_not_modify_its_input() -> None:
    values = np.array([3.0, 1.0, np.nan, 2.0])
    values.setflags(write=False)
    clipped_stats(values)
    np.testing.assert_array_equal(values, [3.0, 1.0, np.nan, 2.0])


@pytest.mark.parametrize(("values", "kwargs"), [
    ([np.nan, np.inf], {}),
    ([1.0, 2.0], {"mask": [True, True]}),
    ([1.0, 2.0], {"mask": [True]}),
    ([1.0, 2.0], {"n_sigma": 0.0}),
    ([1.0, 2.0], {"n_iter": 0}),
])
def test_clipped_stats_errors(values: list[float], kwargs: dict) -> None:
    with pytest.raises(InputError):
        clipped_stats(values, **kwargs)


def test_robust_std() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(0.0, 3.0, 100_000)
    values[:1000] = 1e4
    assert robust_std(values) == pytest.approx(3.0, rel=0.02)
    mask = np.zeros(values.shape, dtype=bool)
    mask[1000:] = True
    assert robust_std(values, mask=mask) == 0.0  # only the 1e4 outliers are left
    with pytest.raises(InputError):
        robust_std([np.nan])


def test_facade_exports() -> None:
    for name in ("ClippedStats", "clipped_stats", "robust_std", "background_mesh",
                 "variance_scale_factor"):
        assert getattr(skydiff, name) is getattr(skydiff.stats, name)
        assert name in skydiff.__all__


# ------------------------------------------------------------------------------------------
# background_mesh


def _smooth_sky(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    u = 2 * cols / (shape[1] - 1) - 1
    v = 2 * rows / (shape[0] - 1) - 1
    return 100.0 + 8.0 * u - 5.0 * v + 3.0 * u * u + 2.0 * u * v - 2.0 * v * v


@pytest.mark.parametrize("shape", [(512, 640), (500, 613), (97, 150)])
def test_background_mesh_reproduces_a_noiseless_linear_sky(shape: tuple[int, int]) -> None:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    sky = 50.0 + 0.03 * cols - 0.02 * rows
    for statistic in ("median", "clipped_mean"):
        result = background_mesh(sky, bin_size=64, statistic=statistic)
        assert result.shape == shape
        assert result.dtype == np.float32
        np.testing.assert_allclose(result, sky, atol=2e-3)


@pytest.mark.parametrize("statistic", ["median", "clipped_mean"])
def test_background_mesh_recovers_a_smooth_gradient_within_the_noise(statistic: str) -> None:
    shape, sigma, bin_size = (600, 700), 10.0, 64
    rng = np.random.default_rng(3)
    sky = _smooth_sky(shape)
    image = sky + rng.normal(0.0, sigma, shape)
    result = background_mesh(image, bin_size=bin_size, statistic=statistic)
    # statistical error of one bin: 1.2533 σ/√N (median) or σ/√N (mean)
    bin_error = 1.2533 * sigma / bin_size
    error = result - sky
    assert np.sqrt(np.mean(error**2)) < 1.5 * bin_error
    assert np.max(np.abs(error)) < 6.0 * bin_error


def test_background_mesh_ignores_masked_and_non_finite_pixels_and_fills_empty_bins() -> None:
    shape = (384, 384)
    rng = np.random.default_rng(4)
    sky = _smooth_sky(shape)
    image = sky + rng.normal(0.0, 5.0, shape)
    mask = np.zeros(shape, dtype=bool)
    image[100:120, :] = 1e5       # a bright streak, masked
    mask[100:120, :] = True
    image[200:300, 200:300] = -1e4  # a whole empty region (more than one bin), masked
    mask[200:300, 200:300] = True
    image[5, 5] = np.nan
    result = background_mesh(image, mask=mask, bin_size=48)
    assert np.all(np.isfinite(result))
    assert np.max(np.abs(result - sky)) < 1.5
    assert not np.isnan(image[6, 6])  # the input is not modified


def test_background_mesh_median_filter_removes_a_bright_bin() -> None:
    image = np.full((256, 256), 10.0)
    image[64:128, 64:128] += 100.0  # one bin covered by a huge galaxy
    filtered = background_mesh(image, bin_size=64)
    unfiltered = background_mesh(image, bin_size=64, filter_size=1)
    assert np.max(np.abs(filtered - 10.0)) < 1e-3
    assert unfiltered[96, 96] > 100.0


def test_background_mesh_small_images_and_linear_interpolation() -> None:
    image = np.arange(12.0).reshape(3, 4)
    assert background_mesh(image, bin_size=64).shape == (3, 4)
    cols = np.mgrid[0:200, 0:300][1]
    sky = 1.0 + 0.01 * cols
    np.testing.assert_allclose(background_mesh(sky, bin_size=50, interpolation="linear"), sky,
                               atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    {"bin_size": 0}, {"statistic": "mode"}, {"interpolation": "quintic"}, {"filter_size": 2},
    {"mask": np.zeros((3, 3), dtype=bool)},
])
def test_background_mesh_errors(kwargs: dict) -> None:
    with pytest.raises(InputError):
        background_mesh(np.zeros((10, 10)), **kwargs)


def test_background_mesh_all_masked_raises() -> None:
    with pytest.raises(InputError):
        background_mesh(np.full((10, 10), np.nan))
    with pytest.raises(InputError):
        background_mesh(np.zeros(10))


def test_row_medians_match_nanmedian() -> None:
    from skydiff.stats import _row_medians

    rng = np.random.default_rng(11)
    for n in (1, 2, 5, 64, 257):
        values = rng.normal(size=(40, n)).astype(np.float32)
        values[:, ::3] = np.round(values[:, ::3])  # ties
        valid = rng.random((40, n)) > 0.4
        valid[0] = False  # an empty row
        with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
            expected = np.nanmedian(np.where(valid, values, np.nan).astype(np.float64), axis=1)
        np.testing.assert_array_equal(_row_medians(values, valid), expected)
        np.testing.assert_array_equal(_row_medians(values.copy(), valid, overwrite=True),
                                      expected)
        np.testing.assert_array_equal(_row_medians(values, None),
                                      np.median(values.astype(np.float64), axis=1))


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_mesh_from_a_sampled_mask_and_by_row_blocks(stride: int) -> None:
    from skydiff.stats import _background_mesh, _mesh_model

    rng = np.random.default_rng(12)
    image = rng.normal(100.0, 3.0, (300, 420)).astype(np.float32)
    mask = rng.random(image.shape) < 0.3
    full = _mesh_model(image, mask=mask, bin_size=64, stride=stride)
    sampled = _mesh_model(image, mask=mask[::stride, ::stride], bin_size=64, stride=stride,
                          sampled_mask=True, like=full)
    np.testing.assert_array_equal(sampled.values, full.values)
    assert sampled.rows is full.rows and sampled.columns is full.columns
    np.testing.assert_allclose(full.evaluate(),
                               _background_mesh(image, mask=mask, bin_size=64, stride=stride),
                               rtol=1e-6)
    blocks = np.empty(image.shape, np.float32)
    for rows, block in full.blocks(full.values, 37):
        blocks[rows] = block
    np.testing.assert_allclose(blocks, full.evaluate(), rtol=1e-6)
    with pytest.raises(InputError, match="multiple"):
        _mesh_model(image, mask=mask[::3, ::3], bin_size=64, stride=3, sampled_mask=True)


# ------------------------------------------------------------------------------------------
# variance_scale_factor


@pytest.mark.parametrize("detect", [True, False])
@pytest.mark.parametrize("noise", [4.0, 2.0])
def test_variance_scale_factor_lsst_a6(detect: bool, noise: float) -> None:
    # ipdiffim A6: variance planes divided by 1.345 -> recovered factor 1.345 ± 0.05;
    # a correct plane -> 1 ± 0.05. detect=False exercises the source masking by threshold.
    synthetic = make_test_image(noise_level=noise, variance="exact", detect=detect)
    exposure = synthetic.exposure
    assert bool(exposure.masked("DETECTED").any()) is detect
    assert variance_scale_factor(exposure) == pytest.approx(1.0, abs=0.05)
    scaled = exposure.evolve(variance=exposure.variance / 1.345)
    assert variance_scale_factor(scaled) == pytest.approx(1.345, abs=0.05)


def test_variance_scale_factor_on_a_simulated_star_field() -> None:
    pair = simulate_pair(shape=(512, 512), n_stars=400, seed=7,
                         science={"n_cosmic_rays": 5, "n_bad_columns": 1,
                                  "sky_gradient": (20.0, -10.0)})
    science = pair.science
    assert variance_scale_factor(science) == pytest.approx(1.0, abs=0.05)
    assert variance_scale_factor(science.evolve(variance=science.variance / 1.345)) \
        == pytest.approx(1.345, abs=0.05)
    # the input exposure is never modified
    np.testing.assert_array_equal(science.variance, pair.science.variance)


def test_variance_scale_factor_falls_back_to_the_image_estimate_and_then_raises() -> None:
    rng = np.random.default_rng(5)
    image = rng.normal(0.0, 1.0, (256, 256))
    variance = np.full(image.shape, 0.25)
    variance[:, :128] = 0.25
    variance[:100, :] = 1e-4  # 40 % of the plane absurdly small: pixel-based factor explodes
    exposure = skydiff.Exposure(image, variance=variance)
    factor = variance_scale_factor(exposure, limit=10.0)
    assert factor == pytest.approx(1.0 / 0.25, rel=0.1)  # the image-based estimate
    with pytest.raises(AlgorithmError) as info:
        variance_scale_factor(skydiff.Exposure(image, variance=np.full(image.shape, 1e-4)))
    assert info.value.metadata["factor"] > 10.0


def test_variance_scale_factor_input_errors() -> None:
    with pytest.raises(InputError):
        variance_scale_factor(np.zeros((10, 10)))  # type: ignore[arg-type]
    exposure = skydiff.Exposure(np.zeros((16, 16)), variance=np.zeros((16, 16)))
    with pytest.raises(InputError):
        variance_scale_factor(exposure)
