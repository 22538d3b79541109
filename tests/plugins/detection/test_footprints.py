"""The footprint helpers against their scipy.ndimage definitions (differential tests)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from skydiff_plugins.detection._footprints import (
    Peaks,
    dilate,
    disk_offsets,
    label_footprints,
    local_peaks,
)


@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.4, 3.0, 5.7])
def test_dilate_equals_binary_dilation_by_a_disk(radius: float) -> None:
    rng = np.random.default_rng(int(radius * 10))
    shape = (90, 70)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    seeds_mask = smooth > 0.25  # blobs of many shapes, some touching the border
    seeds = np.flatnonzero(seeds_mask)
    grown = np.zeros(shape, bool)
    grown.reshape(-1)[seeds] = True
    dilate(grown, seeds, radius)
    d_row, d_col = disk_offsets(radius)
    half = int(np.floor(radius))
    disk = np.zeros((2 * half + 1, 2 * half + 1), bool)
    disk[d_row + half, d_col + half] = True
    expected = seeds_mask if radius < 1 else ndimage.binary_dilation(seeds_mask, disk)
    assert np.array_equal(grown, expected)


def test_disk_offsets() -> None:
    rows, cols = disk_offsets(2.0)
    assert rows.size == 13  # the digital disk of radius 2
    assert np.all(rows**2 + cols**2 <= 4)
    assert disk_offsets(0.5)[0].tolist() == [0]


@pytest.mark.parametrize("negative", [False, True])
def test_local_peaks_are_the_maximum_filter_extrema(negative: bool) -> None:
    rng = np.random.default_rng(3)
    image = ndimage.gaussian_filter(rng.standard_normal((60, 80)), 1.5).astype(np.float32)
    image /= image.std()
    sign = -1.0 if negative else 1.0
    seeds = np.flatnonzero(sign * image > 1.0)
    peaks = local_peaks(image, seeds, negative=negative)
    # reference: maximum filter over 3 x 3 with the outside ignored (-inf padding)
    extremum = ndimage.maximum_filter(sign * image, size=3, mode="constant", cval=-np.inf)
    expected = np.flatnonzero((sign * image > 1.0) & (sign * image >= extremum))
    assert np.array_equal(np.sort(peaks), expected)
    assert peaks.size > 5


def test_labels_and_strongest_peaks() -> None:
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[3, 3] = True  # touches the first blob diagonally: same footprint
    mask[7:9, 6:9] = True
    labels, n, pixels, pixel_labels = label_footprints(mask)
    assert n == 2 and labels.dtype == np.int32
    assert np.array_equal(pixels, np.flatnonzero(mask))
    assert np.array_equal(np.bincount(pixel_labels), [0, 5, 6])
    peaks = Peaks(np.array([11, 33, 76, 77]), np.array([4.0, -9.0, 6.0, 5.0]),
                  np.array([1, 1, 2, 2], dtype=np.int32))
    assert peaks.strongest(2).tolist() == [-1, 1, 2]
    assert peaks.strongest(2, sign=1).tolist() == [-1, 0, 2]
    assert peaks.strongest(2, sign=-1).tolist() == [-1, 1, -1]
    assert peaks.count(2).tolist() == [0, 2, 2]
