r"""The two-pass background of the ``threshold`` detector (``DetectAndMeasureTask`` step 2).

Pass 1 fits a *fine* mesh (``background_fine_bin_size`` = 8 pixels, median) to a copy of the
image and detects on the copy minus that mesh, only to find the sources; pass 2 fits the
*coarse* mesh (``background_bin_size``) that is subtracted, with the pass-1 detections (grown
like the footprints) masked, using :func:`skydiff.background_mesh`.

Pass 1 only has to produce a mask, and it runs on the image binned :math:`b \times b`
(:math:`b = 2` when the PSF sigma is at least one pixel, else 1), which costs little
matched-filter S/N and makes the pass four times cheaper:

* the fine mesh is the median of every bin (the :math:`(n/b)^2` binned pixels of an
  :math:`n`-pixel bin), empty bins filled from the nearest filled one, median-filtered over
  3 × 3 bins with point-reflected edges (as ``background_mesh`` does, so that a plane stays
  a plane) and interpolated bilinearly between bin centres (constant beyond the outer
  centres). ``background_mesh`` is not used here because its
  dense spline evaluation costs :math:`O(N\,n_\mathrm{bins})`, about 1.7 s for an 8-pixel
  mesh of a 2048 × 4096 frame, against a few milliseconds for the bilinear evaluation;
* the matched filter is a separable Gaussian of the binned PSF width
  :math:`\sigma_b = \sqrt{\sigma^2 + (b^2-1)/12}/b` (a sampled PSF averaged over :math:`b`
  pixels gains the variance :math:`(b^2-1)/12` of a discrete uniform distribution), and the
  significance uses the local variance, :math:`\nu_1 = (r \star g)/\sqrt{V_b \sum g^2}`
  (exact for a variance that is constant over the filter);
* on a score image (already filtered) there is no smoothing, and the binned variance is the
  mean variance (neighbouring score pixels are fully correlated on the binning scale), which
  underestimates the significance: the mask is conservative.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

import skydiff

from ._footprints import dilate

__all__ = ["fine_mesh", "two_pass_background"]

#: Smallest PSF sigma (pixels) for which the first pass runs on 2 x 2 binned pixels.
_MIN_SIGMA_FOR_BINNING = 1.0
#: Truncation of the first-pass Gaussian filter, in sigmas.
_TRUNCATE = 4.0
#: A fine-mesh bin needs at least this fraction of valid pixels (as background_mesh).
_MIN_BIN_FRACTION = 0.1


def _bin(data: NDArray[np.float32], variance: NDArray[np.float32], factor: int, *,
         correlated: bool) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    r"""Mean of the finite pixels of every ``factor`` x ``factor`` block, and its variance.

    Non-finite ``data`` pixels are left out (a block without any is NaN, variance 0). The
    variance of the mean of :math:`n` independent pixels is :math:`\sum V / n^2`; with
    ``correlated`` (score images) it is the mean variance :math:`\sum V / n`. Blocks are
    summed with strided slices (rows, then columns); only the blocks that hold a non-finite
    pixel are summed again without it.
    """
    if factor == 1:
        return data, np.where(np.isfinite(data), variance, np.float32(0.0)).astype(np.float32)
    height, width = data.shape
    rows, cols = -(-height // factor) * factor, -(-width // factor) * factor
    if (rows, cols) != (height, width):
        data = np.pad(data, ((0, rows - height), (0, cols - width)), constant_values=np.nan)
        variance = np.pad(variance, ((0, rows - height), (0, cols - width)))

    def block_sum(plane: NDArray[np.float32]) -> NDArray[np.float32]:
        strip = plane[0::factor].copy()
        for i in range(1, factor):  # rows, then columns: contiguous strided adds
            strip += plane[i::factor]
        total = strip[:, 0::factor].copy()
        for j in range(1, factor):
            total += strip[:, j::factor]
        return total

    n = np.float32(factor * factor)
    mean = block_sum(data) / n
    var = block_sum(variance)
    var /= n if correlated else n * n
    broken = np.flatnonzero(~np.isfinite(mean))
    if broken.size:  # blocks with non-finite pixels: the mean of their finite pixels
        block_rows, block_cols = np.divmod(broken, mean.shape[1])
        offsets = np.arange(factor)
        pixel_rows = (block_rows[:, None] * factor + offsets)[:, :, None]
        pixel_cols = (block_cols[:, None] * factor + offsets)[:, None, :]
        values = data[pixel_rows, pixel_cols].reshape(broken.size, -1).astype(np.float64)
        variances = variance[pixel_rows, pixel_cols].reshape(broken.size, -1)
        finite = np.isfinite(values)
        count = finite.sum(axis=1)
        total = np.where(finite, values, 0.0).sum(axis=1)
        var_total = np.where(finite, variances, 0.0).sum(axis=1)
        safe = np.maximum(count, 1)
        mean.reshape(-1)[broken] = np.where(count > 0, total / safe, np.nan)
        var.reshape(-1)[broken] = np.where(
            count > 0, var_total / (safe if correlated else safe * safe), 0.0)
    return mean, var


def _bin_medians(image: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """Median of the finite pixels of every full ``size`` x ``size`` bin (NaN if too few).

    Each row of the ``(n_bins, size²)`` array of bin pixels is sorted (NaN last), which is
    faster than a partition for small bins; the median is read at the middle of the finite
    values.
    """
    height, width = image.shape
    size_r, size_c = min(size, height), min(size, width)
    n_r, n_c = height // size_r, width // size_c
    blocks = image[:n_r * size_r, :n_c * size_c].reshape(n_r, size_r, n_c, size_c)
    blocks = np.sort(blocks.transpose(0, 2, 1, 3).reshape(n_r * n_c, size_r * size_c), axis=1)
    count = np.isfinite(blocks).sum(axis=1)
    lower = np.maximum((count - 1) // 2, 0)[:, None]
    upper = np.minimum(count // 2, blocks.shape[1] - 1)[:, None]
    median = 0.5 * (np.take_along_axis(blocks, lower, axis=1)[:, 0]
                    + np.take_along_axis(blocks, upper, axis=1)[:, 0])
    median[count < max(1.0, _MIN_BIN_FRACTION * blocks.shape[1])] = np.nan
    return median.reshape(n_r, n_c).astype(np.float32)


def _lerp_axis(mesh: NDArray[np.float32], size: int, length: int, axis: int
               ) -> NDArray[np.float32]:
    """Linear interpolation along ``axis`` from bin centres ``(i + 1/2) size - 1/2``."""
    n = mesh.shape[axis]
    position = (np.arange(length, dtype=np.float64) + 0.5) / size - 0.5
    low = np.clip(np.floor(position), 0, n - 1).astype(np.intp)
    high = np.minimum(low + 1, n - 1)
    frac = np.clip(position - low, 0.0, 1.0).astype(np.float32)
    shape = [1, 1]
    shape[axis] = length
    frac = frac.reshape(shape)
    return (np.take(mesh, low, axis=axis) * (1 - frac)
            + np.take(mesh, high, axis=axis) * frac).astype(np.float32)


def fine_mesh(image: NDArray[np.float32], size: int) -> NDArray[np.float32] | None:
    """The fine background of pass 1 at every pixel of ``image`` (None if no bin is valid).

    Parameters
    ----------
    image : ndarray of float32, shape (H, W)
        NaN at the pixels to ignore.
    size : int
        Bin size in pixels of ``image``.
    """
    mesh = _bin_medians(image, size)
    empty = ~np.isfinite(mesh)
    if empty.all():
        return None
    if empty.any():
        nearest = ndimage.distance_transform_edt(empty, return_distances=False,
                                                 return_indices=True)
        mesh = mesh[tuple(nearest)]
    # point-reflected padding keeps the filtered mesh of a plane a plane, edges included
    padded = np.pad(mesh, 1, mode="reflect", reflect_type="odd")
    mesh = ndimage.median_filter(padded, size=3)[1:-1, 1:-1]
    rows = _lerp_axis(mesh, min(size, image.shape[0]), image.shape[0], axis=0)
    return _lerp_axis(rows, min(size, image.shape[1]), image.shape[1], axis=1)


def _gaussian_weights(sigma: float) -> NDArray[np.float64]:
    """Unit-sum 1-D Gaussian weights of width ``sigma`` truncated at 4 sigma."""
    half = max(1, int(_TRUNCATE * sigma + 0.5))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _smooth(image: NDArray[np.float32], weights: NDArray[np.float64]) -> NDArray[np.float32]:
    """Separable correlation with ``outer(weights, weights)``, zero padding.

    Along the rows a sum of shifted row slices (cache-friendly), along the columns
    :func:`scipy.ndimage.correlate1d`.
    """
    half = weights.size // 2
    height = image.shape[0]
    out = np.zeros_like(image)
    for k, weight in enumerate(weights):  # loop over the filter taps
        shift = k - half
        lo, hi = max(0, -shift), min(height, height - shift)
        if hi > lo:
            out[lo:hi] += np.float32(weight) * image[lo + shift:hi + shift]
    return ndimage.correlate1d(out, weights, axis=1, mode="constant")


def _first_pass_significance(residual: NDArray[np.float32], variance: NDArray[np.float32],
                             sigma: float | None) -> NDArray[np.float32]:
    """Significance of ``residual`` (NaN-free): matched-filtered, or as is for a score."""
    out = np.zeros(residual.shape, dtype=np.float32)
    if sigma is None:  # a score image: already filtered
        np.divide(residual, np.sqrt(variance), out=out, where=variance > 0)
        return out
    weights = _gaussian_weights(sigma)
    norm = np.float32(float((weights**2).sum()) ** 2)
    smoothed = _smooth(residual, weights)
    np.divide(smoothed, np.sqrt(variance * norm), out=out, where=variance > 0)
    return out


def two_pass_background(data: NDArray[np.float32], variance: NDArray[np.float32], *,
                        psf_sigma: float | None, is_score: bool, fine_bin_size: int,
                        bin_size: int, statistic: str, mask_threshold: float,
                        grow_radius: float) -> tuple[NDArray[np.float32] | None, float]:
    r"""Fit the background to subtract, ignoring the sources found on a fine-mesh copy.

    Parameters
    ----------
    data : ndarray of float32, shape (H, W)
        The image, NaN at every pixel to ignore (no data, bad planes). Not modified.
    variance : ndarray of float32, shape (H, W)
        Its variance (any value where ``data`` is NaN).
    psf_sigma : float or None
        Gaussian sigma of the PSF in pixels (None for a score image without PSF).
    is_score : bool
        ``data`` is a score (already matched-filtered) image.
    fine_bin_size, bin_size : int
        Bin sizes of the first and second meshes (pixels).
    statistic : {"median", "clipped_mean"}
        Statistic of the second mesh.
    mask_threshold : float
        Significance (either sign) of the first-pass pixels that are masked.
    grow_radius : float
        Growth of the first-pass detections before masking (pixels).

    Returns
    -------
    background : ndarray of float32, shape (H, W), or None
        The second-pass mesh; None when no bin has enough valid pixels.
    masked_fraction : float
        Fraction of the pixels masked as sources in the second pass.
    """
    height, width = data.shape
    factor = 2 if (fine_bin_size % 2 == 0 and min(height, width) >= 2 * fine_bin_size
                   and (is_score or (psf_sigma is not None
                                     and psf_sigma >= _MIN_SIGMA_FOR_BINNING))) else 1
    binned, binned_var = _bin(data, variance, factor, correlated=is_score)
    fine = fine_mesh(binned, max(1, fine_bin_size // factor))
    if fine is None:  # no bin has enough valid pixels: nothing to fit
        return None, 0.0
    residual = binned - fine
    residual[~np.isfinite(residual)] = 0.0
    sigma = None
    if not is_score and psf_sigma is not None:
        sigma = math.sqrt(psf_sigma**2 + (factor**2 - 1) / 12.0) / factor
    significance = _first_pass_significance(residual, binned_var, sigma)
    seeds = np.flatnonzero(np.abs(significance) > mask_threshold)
    sources = np.zeros(binned.shape, dtype=bool)
    sources.reshape(-1)[seeds] = True
    dilate(sources, seeds, grow_radius / factor)
    if factor > 1:
        sources = np.repeat(np.repeat(sources, factor, axis=0), factor, axis=1)
        sources = sources[:height, :width]
    masked_fraction = float(np.count_nonzero(sources)) / sources.size
    try:
        background = skydiff.background_mesh(data, mask=sources, bin_size=bin_size,
                                              statistic=statistic)  # type: ignore[arg-type]
    except skydiff.InputError:  # the sources cover every bin: fit without their mask
        background = skydiff.background_mesh(data, bin_size=bin_size,
                                              statistic=statistic)  # type: ignore[arg-type]
    return background, masked_fraction
