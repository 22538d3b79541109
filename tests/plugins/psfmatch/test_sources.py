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
    # all clean sources are offered (neither the cells nor the variable test starve a fit
    # that needs many)
    reasons = np.asarray(selection.table["reason"])
    n_clean = selection.n_selected + int(np.sum(np.isin(reasons, ["cell_full", "variable"])))
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


@pytest.fixture(scope="module")
def variable_pair():
    """512 x 512, 150 constant stars and 20 variables (+-50 %), flux scale 0.9."""
    return simulate_pair(shape=(512, 512), n_stars=150, seed=4, flux_min=3e3, flux_max=2e5,
                         n_variables=20, variable_flux=(5e3, 5e4), variable_fraction=0.5,
                         flux_scale=0.9, science={"fwhm": 4.0}, template={"fwhm": 3.0})


def _near(table, truth, kind, radius=2.0):
    chosen = truth[np.asarray(truth["kind"]) == kind]
    xy = np.column_stack([chosen["x"], chosen["y"]])
    return np.array([np.min(np.hypot(*(xy - [x, y]).T)) < radius
                     for x, y in zip(table["x"], table["y"], strict=True)])


def _blended(x, y, truth, radius=8.0):
    """Whether a second true source lies within ``radius`` (2 FWHM) of each position."""
    xy = np.column_stack([truth["x"], truth["y"]])
    return np.array([np.sort(np.hypot(*(xy - [u, v]).T))[1] < radius
                     for u, v in zip(x, y, strict=True)])


def test_variable_stars_are_rejected_and_constant_ones_kept(variable_pair):
    pair = variable_pair
    selection = select_kernel_sources(pair.science, pair.template, kernel_size=K,
                                      config=KernelSourcesConfig(target_sources=0),
                                      min_sources=3, fwhm=4.0, template_fwhm=3.0)
    table = selection.table
    variable = _near(table, pair.truth, "variable")
    rejected = np.asarray(table["reason"]) == "variable"
    z = np.asarray(table["ratio_z"])
    # every variable that reached the test is rejected, with a large deviation
    tested = np.isfinite(z)
    assert np.count_nonzero(variable & tested) >= 8
    assert np.all(rejected[variable & tested])
    assert np.all(np.abs(z[variable & tested]) > 4.0)
    # unblended constant stars: deviations of unit scale, none rejected (4 sigma); stars
    # blended with a neighbour within 2 FWHM may be (the PSF fits see the pair differently)
    constant = tested & ~variable & ~_blended(table["x"], table["y"], pair.truth)
    assert np.count_nonzero(constant) >= 50
    assert not np.any(rejected[constant])
    assert 0.6 < 1.4826 * np.median(np.abs(z[constant])) < 1.4
    assert not np.any(variable[selection.index])
    off = select_kernel_sources(pair.science, pair.template, kernel_size=K,
                                config=KernelSourcesConfig(target_sources=0,
                                                           reject_variables=False),
                                min_sources=3, fwhm=4.0, template_fwhm=3.0)
    assert "variable" not in set(off.table["reason"])
    assert np.all(np.isnan(np.asarray(off.table["ratio_z"])))
    assert np.any(_near(off.table, pair.truth, "variable")[off.index])


def test_ratio_deviations_are_scaled_when_the_variance_underestimates_the_noise(
        variable_pair):
    """Constant, unblended stars have deviations of unit scale whether the variance planes
    are right or 4x too small (as with correlated noise): the scale and the relative floor
    absorb the missing noise, and none of them would be rejected."""
    pair = variable_pair
    truth = pair.truth
    stars = truth[(np.asarray(truth["kind"]) == "star")
                  & (np.asarray(truth["flux_template"]) > 3e3)]
    x, y = np.asarray(stars["x"], float), np.asarray(stars["y"], float)
    inside = (x > 30) & (x < 481) & (y > 30) & (y < 481) & ~_blended(x, y, truth)
    x, y = x[inside], y[inside]
    assert x.size >= 30
    small = [e.evolve(variance=e.variance / np.float32(4.0)) for e in (pair.science,
                                                                       pair.template)]
    spreads = []
    for science, template in ((pair.science, pair.template), small):
        z, floor, scale = _sources.flux_ratio_deviations(science, template, x, y, 4.0)
        assert np.all(np.isfinite(z)) and floor >= 0.0 and scale >= 1.0
        assert np.max(np.abs(z)) < 4.0
        spread = 1.4826 * float(np.median(np.abs(z)))
        # the median of |z| over N ~ 90 stars is known to ~ 1.25 / sqrt(N) ~ 13 %
        assert 0.6 < spread < 1.25
        spreads.append((floor, scale))
    (floor, scale), (floor_small, scale_small) = spreads
    assert floor_small == pytest.approx(floor, rel=1e-6)  # the ratios themselves are the same
    assert scale_small > scale  # the errors halved: part of the spread goes into the scale


def test_the_variable_test_never_starves_the_fit(variable_pair):
    """When rejecting every flagged star would leave fewer than twice the required number
    of candidates, the least deviant flagged stars are given back."""
    pair = variable_pair

    def run(min_sources):
        return select_kernel_sources(pair.science, pair.template, kernel_size=K,
                                     config=KernelSourcesConfig(target_sources=0),
                                     min_sources=min_sources, fwhm=4.0, template_fwhm=3.0)

    free = run(3).table
    z = np.asarray(free["ratio_z"])
    # the candidates that reach the test (a few have no positive flux: z is NaN)
    tested = int(np.count_nonzero(np.isin(np.asarray(free["reason"]),
                                          ["", "variable", "cell_full", "max_sources"])))
    flagged = np.abs(z) > 4.0
    n_flagged = int(np.count_nonzero(flagged))
    assert n_flagged >= 10 and np.all(np.asarray(free["reason"])[flagged] == "variable")
    needed = (tested - n_flagged) // 2 + 3  # 2 x needed exceeds the unflagged by 5 or 6
    tight = run(needed).table  # (with many needed, every detection is measured)
    z_tight = np.asarray(tight["ratio_z"])
    reasons = np.asarray(tight["reason"])
    reaching = int(np.count_nonzero(np.isin(reasons, ["", "variable", "cell_full",
                                                      "max_sources"])))
    rejected = reasons == "variable"
    given_back = (np.abs(z_tight) > 4.0) & ~rejected
    assert np.count_nonzero(given_back) >= 3
    assert np.count_nonzero(rejected) == reaching - 2 * needed
    assert np.abs(z_tight[given_back]).max() < np.abs(z_tight[rejected]).min()
