"""Kernel-source selection (``_sources.select_kernel_sources``).

Port of ip_diffim's ``test_kernel_source_selector`` (ipdiffim §3.3) adapted to skydiff's
selector: flagged (here: masked) sources are dropped, the rest kept brightest first and capped
by ``max_sources``; plus the edge, template, S/N and per-cell rules and the error raised when
too few remain.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

import skydiff
from skydiff.sim import make_test_image, simulate_pair
from skydiff_plugins.psfmatch import KernelSourcesConfig, _sources, select_kernel_sources
from skydiff_plugins.psfmatch._sources import cell_side

K = 21


@pytest.fixture(scope="module")
def images():
    science = make_test_image(psf_sigma=2.4, noise_level=1.0, noise_seed=6, n_src=40,
                              clear_edge_mask=True)
    template = make_test_image(psf_sigma=2.0, noise_level=1.0, noise_seed=7, n_src=40,
                               clear_edge_mask=True)
    return science.exposure, template.exposure, science.truth


def select(science, template, sources=None, min_sources=3, **settings):
    return select_kernel_sources(science, template, kernel_size=K,
                                 config=KernelSourcesConfig(**settings),
                                 min_sources=min_sources, sources=sources)


def inner(truth, margin=K):
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    return (np.rint(x) >= margin) & (np.rint(x) <= 255 - margin) & (np.rint(y) >= margin) & (
        np.rint(y) <= 255 - margin)


def test_selects_the_clean_inner_sources_brightest_first(images):
    science, template, truth = images
    selection = select(science, template, truth, n_per_cell=100)
    table = selection.table
    chosen = table[selection.index]
    assert len(chosen) == int(inner(truth).sum())
    assert np.all(np.diff(np.asarray(chosen["flux"])) <= 0)  # brightest first
    assert set(table["reason"][~np.asarray(table["selected"])]) == {"edge"}


def test_masked_sources_are_dropped_and_max_sources_caps(images):
    """Every third inner source gets a bad pixel at its centre: exactly the sources whose
    (2K+1)² stamp holds such a pixel are rejected, in science or template alike."""
    science, template, truth = images
    keep = np.flatnonzero(inner(truth))
    flagged = keep[::3]
    rows = np.rint(np.asarray(truth["y"])).astype(int)
    cols = np.rint(np.asarray(truth["x"])).astype(int)
    bad = np.zeros(science.shape, dtype=bool)
    bad[rows[flagged], cols[flagged]] = True
    hit = np.array([np.any((np.abs(rows[flagged] - rows[i]) <= K)
                           & (np.abs(cols[flagged] - cols[i]) <= K)) for i in keep])
    expected_masked = set(keep[hit])
    masked_science = science.with_mask("CR", bad)
    selection = select(masked_science, template, truth, n_per_cell=100, min_sources=1)
    table = selection.table
    reason_of = {float(x): str(r) for x, r in zip(table["x"], table["reason"], strict=True)}
    for index in keep:
        expected = "masked_science" if index in expected_masked else ""
        assert reason_of[float(truth["x"][index])] == expected
    assert selection.n_selected == keep.size - len(expected_masked)
    capped = select(masked_science, template, truth, n_per_cell=100, max_sources=4,
                    min_sources=1)
    assert capped.n_selected == 4
    brightest = np.sort(np.asarray(table[selection.index]["flux"]))[::-1][:4]
    np.testing.assert_array_equal(np.sort(np.asarray(capped.table[capped.index]["flux"]))[::-1],
                                  brightest)
    masked_template = select(science, template.with_mask("SAT", bad), truth, n_per_cell=100,
                             min_sources=1)
    assert np.sum(masked_template.table["reason"] == "masked_template") == len(expected_masked)


def test_snr_window_and_template_detection(images):
    science, template, truth = images
    selection = select(science, template, truth, n_per_cell=100)
    snr = np.asarray(selection.table["snr"])[selection.index]
    window = select(science, template, truth, n_per_cell=100, min_snr=float(np.median(snr)),
                    max_snr=float(np.max(snr)) - 1e-6)
    assert np.all(np.asarray(window.table["snr"])[window.index] >= np.median(snr))
    assert "high_snr" in set(window.table["reason"])
    assert "low_snr" in set(window.table["reason"])
    blank = template.evolve(image=np.zeros(template.shape, dtype=np.float32))
    with pytest.raises(skydiff.InsufficientKernelSourcesError) as info:
        select(science, blank, truth, n_per_cell=100)
    assert info.value.metadata["n_template_faint"] == int(inner(truth).sum())


def test_cells_thin_out_but_never_starve(images):
    science, template, truth = images
    n_inner = int(inner(truth).sum())
    one_per_cell = select(science, template, truth, n_per_cell=1, cell_size=64)
    table = one_per_cell.table[one_per_cell.index]
    cells = (np.rint(table["y"]).astype(int) // 64) * 10 + np.rint(table["x"]).astype(int) // 64
    assert len(np.unique(cells)) == len(cells)
    assert 0 < len(cells) < n_inner
    # one cell covering the whole image with n_per_cell = 1 would keep a single source: the
    # selection is topped up to twice the required number, brightest first
    topped = select(science, template, truth, n_per_cell=1, cell_size=512, min_sources=4)
    assert topped.n_selected == min(8, n_inner)


def test_found_sources_and_the_insufficient_error():
    pair = simulate_pair(shape=(256, 256), n_stars=60, seed=5, flux_min=3e3, flux_max=1e5,
                         science={"fwhm": 3.5}, template={"fwhm": 2.5})
    selection = select(pair.science, pair.template)
    assert selection.n_selected >= 6
    table = selection.table[selection.index]
    truth_xy = np.column_stack([pair.truth["x"], pair.truth["y"]])
    for x, y in zip(table["x"], table["y"], strict=True):  # every pick is a real star
        assert np.min(np.hypot(*(truth_xy - [x, y]).T)) < 2.0
    with pytest.raises(skydiff.InsufficientKernelSourcesError) as info:
        select(pair.science, pair.template, min_sources=10_000)
    metadata = info.value.metadata
    # all clean sources are offered (the cells do not starve a fit that needs many)
    n_clean = selection.n_selected + int(np.sum(selection.table["reason"] == "cell_full"))
    assert metadata["n_needed"] == 10_000 and metadata["n_found"] == n_clean
    assert "lower spatial_kernel_order" in str(info.value)


def test_given_table_needs_x_and_y(images):
    science, template, _ = images
    with pytest.raises(skydiff.InputError, match="x and y"):
        select(science, template, Table({"ra": [1.0]}))


def test_cells_grow_to_offer_about_target_sources():
    config = KernelSourcesConfig(cell_size=128, n_per_cell=5, target_sources=250)
    assert cell_side((256, 256), config) == 128  # small images keep cell_size
    side = cell_side((2048, 4096), config)
    assert side == 410
    n_cells = -(-2048 // side) * -(-4096 // side)
    assert 200 <= n_cells * config.n_per_cell <= 300
    assert cell_side((2048, 4096), KernelSourcesConfig(target_sources=0)) == 128


def test_large_images_measure_only_the_best_detections_per_cell(monkeypatch):
    """With target_sources the cells grow and only 2 n_per_cell detections per cell are measured;
    the selection is the one the full candidate list gives."""
    pair = simulate_pair(shape=(512, 768), n_stars=500, seed=8, flux_min=3e3, flux_max=2e5,
                         science={"fwhm": 3.5}, template={"fwhm": 2.5})
    settings = {"cell_size": 64, "n_per_cell": 2, "target_sources": 40}
    config = KernelSourcesConfig(**settings)
    side = cell_side(pair.science.shape, config)
    assert side > 64
    thinned = select(pair.science, pair.template, **settings)
    monkeypatch.setattr(_sources, "_PRESELECT_FACTOR", 10_000)  # measure every detection
    full = select(pair.science, pair.template, **settings)
    assert len(thinned.table) < len(full.table)
    table = thinned.table[thinned.index]
    cells = (np.rint(table["y"]).astype(int) // side) * 100 + np.rint(table["x"]).astype(int) \
        // side
    assert np.bincount(np.unique(cells, return_inverse=True)[1]).max() <= 2
    assert thinned.n_selected >= 0.9 * full.n_selected
    chosen = {(round(float(x), 2), round(float(y), 2)) for x, y in table.iterrows("x", "y")}
    reference = {(round(float(x), 2), round(float(y), 2))
                 for x, y in full.table[full.index].iterrows("x", "y")}
    assert len(chosen & reference) >= 0.8 * len(reference)


@pytest.mark.parametrize(("fwhm", "expected"), [
    (None, 1), (2.9, 1), (3.0, 2), (4.0, 2), (4.6, 3), (6.0, 4), (40.0, 4)])
def test_automatic_binning_keeps_the_psf_at_least_1_5_binned_pixels(fwhm, expected):
    assert _sources.binning_factor(fwhm, KernelSourcesConfig()) == expected
    assert _sources.binning_factor(fwhm, KernelSourcesConfig(bin_factor=1)) == 1
    assert _sources.binning_factor(fwhm, KernelSourcesConfig(bin_factor=3)) == 3


def test_binning_sums_image_and_variance_and_ors_the_mask():
    rng = np.random.default_rng(11)
    image = rng.normal(size=(7, 9)).astype(np.float32)
    variance = rng.uniform(1.0, 2.0, size=(7, 9)).astype(np.float32)
    planes = skydiff.MaskPlanes.default()
    mask = np.zeros((7, 9), np.uint32)
    mask[3, 4] = planes.value("SAT")
    mask[0, 0] = planes.value("BAD")
    exposure = skydiff.Exposure(image, mask=mask, variance=variance, mask_planes=planes)
    for factor in (2, 3):
        binned = _sources._binned(exposure, factor)
        rows, cols = 7 // factor, 9 // factor  # incomplete bins are dropped
        assert binned.shape == (rows, cols)
        blocks = image[:rows * factor, :cols * factor].reshape(rows, factor, cols, factor)
        np.testing.assert_allclose(binned.image, blocks.sum(axis=(1, 3)), rtol=1e-6)
        var_blocks = variance[:rows * factor, :cols * factor].reshape(rows, factor, cols,
                                                                      factor)
        np.testing.assert_allclose(binned.variance, var_blocks.sum(axis=(1, 3)), rtol=1e-6)
        assert binned.mask[0, 0] == planes.value("BAD")
        assert binned.mask[3 // factor, 4 // factor] == planes.value("SAT")
        assert np.count_nonzero(binned.mask) == 2
    # the original is untouched
    assert exposure.mask[3, 4] == planes.value("SAT") and exposure.image.shape == (7, 9)


def test_the_binned_search_selects_real_stars_at_their_positions():
    """FWHM 4 px: the default search (binned 2 x 2) picks stars within a fraction of a pixel
    of their true positions, and about as many as the full-resolution search."""
    pair = simulate_pair(shape=(512, 512), n_stars=150, seed=9, flux_min=3e3, flux_max=2e5,
                         science={"fwhm": 4.0}, template={"fwhm": 3.0})
    def run(**settings):
        return select_kernel_sources(pair.science, pair.template, kernel_size=K,
                                     config=KernelSourcesConfig(**settings), min_sources=3,
                                     fwhm=4.0)

    binned, full = run(), run(bin_factor=1)
    assert _sources.binning_factor(4.0, KernelSourcesConfig()) == 2
    truth = np.column_stack([pair.truth["x"], pair.truth["y"]])

    def distances(selection):
        table = selection.table[selection.index]
        return np.array([np.min(np.hypot(*(truth - [x, y]).T))
                         for x, y in zip(table["x"], table["y"], strict=True)])

    near, reference = distances(binned), distances(full)
    # blends of two stars are measured at their light centre by either search
    assert np.quantile(near, 0.9) < 0.3 and np.median(near) < 0.15
    assert near.max() <= reference.max() + 0.5
    assert abs(binned.n_selected - full.n_selected) <= 0.1 * full.n_selected
